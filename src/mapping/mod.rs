//! Mapping rules between each CRM's flat vendor fields and the canonical company: the TOML
//! schema of the rules, built-in defaults per CRM, and the compiled form that converts
//! records both ways with transforms and value maps. Pure data, no I/O.

mod compiled;
pub mod defaults;
mod error;
pub mod rules;

pub use compiled::{Before, Fitted, Mapping};
pub use defaults::{default_rules, split_enum_suffix};
pub use error::MappingError;
pub use rules::{Direction, FieldRule, MappingRules, Transform};

#[cfg(test)]
mod tests;
