//! Mapping rules between each CRM's flat vendor fields and the canonical company: the TOML
//! schema of the rules, built-in defaults per CRM, and the compiled form that converts
//! records both ways with transforms and value maps.

pub mod rules;

pub use rules::{Direction, FieldRule, MappingRules, Transform};
