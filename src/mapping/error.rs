//! Errors of compiling mapping rules and of converting records through them. Each says
//! which canonical field and vendor key are involved and, for data errors, shows the
//! offending value (truncated, so a huge blob cannot flood a log line).

use crate::model::{CrmKind, FieldType};

/// Longest rendering of an offending value kept in an error, in characters.
const MAX_VALUE_CHARS: usize = 80;

/// What went wrong compiling a mapping or converting a record through it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MappingError {
    /// A vendor value has a JSON type the canonical field cannot take.
    #[error("field {canonical:?} (vendor key {vendor:?}): expected {expected}, got {value}")]
    WrongType {
        /// Canonical field.
        canonical: String,
        /// Vendor key the value was read from or is written to.
        vendor: String,
        /// What the field takes.
        expected: &'static str,
        /// The offending value, truncated.
        value: String,
    },
    /// A number (or numeric text) that cannot be taken exactly.
    #[error("field {canonical:?} (vendor key {vendor:?}): {value} is not {expected}")]
    BadNumber {
        /// Canonical field.
        canonical: String,
        /// Vendor key the value was read from.
        vendor: String,
        /// What the field takes (`a whole number`, `an exact decimal`).
        expected: &'static str,
        /// The offending value, truncated.
        value: String,
    },
    /// A rule or `ignore` entry names a canonical field that does not exist.
    #[error("unknown canonical field {canonical:?} (standard fields or custom.<name>)")]
    UnknownCanonical {
        /// The name given.
        canonical: String,
    },
    /// A rule says neither `vendor`, `field_code`, `field_id` nor `field_name`.
    #[error(
        "rule for {canonical:?} names no vendor field (set vendor, field_code, field_id or field_name)"
    )]
    NoVendorField {
        /// Canonical field of the rule.
        canonical: String,
    },
    /// A rule names its vendor field more than one way.
    #[error(
        "rule for {canonical:?} names its vendor field more than once (use one of vendor, field_code, field_id, field_name)"
    )]
    AmbiguousVendorField {
        /// Canonical field of the rule.
        canonical: String,
    },
    /// A rule uses an option the CRM does not have (amoCRM custom field options elsewhere).
    #[error("rule for {canonical:?}: {option} is not available for {kind}")]
    OptionNotForKind {
        /// Canonical field of the rule.
        canonical: String,
        /// The option (`field_code`, `enum_code`, …).
        option: &'static str,
        /// The connector's CRM.
        kind: CrmKind,
    },
    /// An `enum_code` that cannot be written: on a key that is not an amoCRM custom field,
    /// or not an upper-case code such as `WORK`.
    #[error("rule for {canonical:?}: enum code {enum_code:?} on vendor key {vendor:?}: {reason}")]
    BadEnumCode {
        /// Canonical field of the rule.
        canonical: String,
        /// The vendor key.
        vendor: String,
        /// The code given.
        enum_code: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// Two rules for one canonical field would both read, or both write, it.
    #[error("two rules for canonical field {canonical:?} overlap in direction")]
    DuplicateRule {
        /// Canonical field.
        canonical: String,
    },
    /// Two rules would write the same vendor key.
    #[error("vendor key {vendor:?} is written by both {first:?} and {second:?}")]
    VendorKeyConflict {
        /// Vendor key.
        vendor: String,
        /// Canonical field of one rule.
        first: String,
        /// Canonical field of the other.
        second: String,
    },
    /// A transform or value map on a field whose type it cannot apply to.
    #[error("rule for {canonical:?}: {what} cannot apply to a {ty:?} field")]
    NotForType {
        /// Canonical field.
        canonical: String,
        /// The transform or option.
        what: String,
        /// The field's type.
        ty: FieldType,
    },
    /// A rule's `default` does not fit the canonical field's type.
    #[error("rule for {canonical:?}: default {value} is not {expected}")]
    BadDefault {
        /// Canonical field.
        canonical: String,
        /// What the field takes.
        expected: &'static str,
        /// The default as written, truncated.
        value: String,
    },
}

/// Renders a value for an error message, cut to [`MAX_VALUE_CHARS`] characters.
pub(crate) fn truncate_value(text: impl std::fmt::Display) -> String {
    let text = text.to_string();
    match text.char_indices().nth(MAX_VALUE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}
