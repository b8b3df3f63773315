//! The TOML schema of mapping rules, as written under `[connectors.<name>.mapping]`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Mapping rules of one connector. The built-in defaults for its CRM apply first; these
/// rules replace the default rule of the same canonical field, add new ones, or drop some.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingRules {
    /// Start from the built-in mapping of this CRM (default true).
    #[serde(default = "default_true")]
    pub use_defaults: bool,
    /// Canonical fields whose default rule is dropped (the field is not synced here).
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Field rules, replacing default rules for the same canonical field.
    #[serde(default)]
    pub fields: Vec<FieldRule>,
}

impl Default for MappingRules {
    /// The built-in mapping of the CRM, unchanged (what an absent `[mapping]` means).
    fn default() -> Self {
        MappingRules {
            use_defaults: true,
            ignore: Vec::new(),
            fields: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// One canonical field ↔ vendor field rule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldRule {
    /// Canonical field name (`industry`, `annualRevenue`, `custom.segment`, …).
    pub canonical: String,
    /// Vendor field by its API name (Rally, Marketo, amoCRM built-in fields such as
    /// `name`), or a flat key as the connector documents it.
    #[serde(default)]
    pub vendor: Option<String>,
    /// amoCRM custom field by `field_code` (e.g. `PHONE`, `WEB`).
    #[serde(default)]
    pub field_code: Option<String>,
    /// amoCRM custom field by numeric id.
    #[serde(default)]
    pub field_id: Option<u64>,
    /// amoCRM custom field by its name as shown in the account.
    #[serde(default)]
    pub field_name: Option<String>,
    /// amoCRM multitext enum code to write with the value (e.g. `WORK`).
    #[serde(default)]
    pub enum_code: Option<String>,
    /// Which way values flow (default both).
    #[serde(default)]
    pub direction: Direction,
    /// Transforms applied on read (vendor → canonical), in order.
    #[serde(default)]
    pub transforms: Vec<Transform>,
    /// Value map, vendor value → canonical value (applied in reverse on write).
    #[serde(default)]
    pub values: BTreeMap<String, String>,
    /// Canonical value to use when the vendor value is null or missing on read.
    #[serde(default)]
    pub default: Option<toml::Value>,
}

/// Which way a rule carries values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Read from the vendor and write to it.
    #[default]
    Both,
    /// Only read from the vendor (never written back).
    ReadOnly,
    /// Only written to the vendor (never read).
    WriteOnly,
}

/// A transform applied to a text value on read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// Strip surrounding white space.
    Trim,
    /// Lowercase.
    Lowercase,
    /// Uppercase.
    Uppercase,
    /// Take the normalised domain out of a URL (`https://www.acme.com/x` → `acme.com`).
    DomainFromUrl,
}
