//! Built-in mappings of the three CRMs, and the flat vendor keys their connectors produce
//! and consume. A mapping never sees vendor JSON as the API sends it: each connector
//! flattens a record into a `serde_json::Map` of the keys documented here before
//! [`Mapping::read`](super::Mapping::read), and expands the map that
//! [`Mapping::write`](super::Mapping::write) returns back into the API's shape.
//!
//! # Rally
//! The keys are Rally's JSON field names exactly: `name`, `domain`, `industry`,
//! `description`, `employeeCount`, `annualRevenue`, `phone`, `website`, `linkedInUrl`,
//! `address`, `city`, `state`, `country`, `postalCode`, `tags` (array of strings), `notes`,
//! `ownerId`.
//!
//! # Marketo
//! The keys are the company object's API field names (`GET /rest/v1/companies/describe.json`):
//! `company`, `website`, `mainPhone`, `industry`, `numberOfEmployees`, `annualRevenue`,
//! `billingStreet`, `billingCity`, `billingState`, `billingCountry`, `billingPostalCode`,
//! `externalCompanyId`, `sicCode`, and any custom company field by its API name.
//!
//! # amoCRM
//! - Built-in fields: `name`, `responsible_user_id`, and `tags` (array of tag names).
//! - Custom fields, each carrying the text or number of the field's *first* value:
//!   `cf.code.<CODE>` (by `field_code`, e.g. `cf.code.PHONE`), `cf.id.<id>` (by `field_id`),
//!   `cf.name.<Field Name>` (by `field_name`, e.g. `cf.name.Annual revenue`).
//! - A key that `write` returns may end in `@<ENUM>` (e.g. `cf.code.PHONE@WORK`): the value
//!   is to be written with that `enum_code`. Keys given to `read` never carry the suffix;
//!   [`split_enum_suffix`] separates the two parts.

use crate::model::{CrmKind, STANDARD_FIELDS};

use super::rules::{Direction, FieldRule, Transform};

/// Prefix of amoCRM custom field keys addressed by `field_code`.
pub const AMO_CF_CODE: &str = "cf.code.";
/// Prefix of amoCRM custom field keys addressed by `field_id`.
pub const AMO_CF_ID: &str = "cf.id.";
/// Prefix of amoCRM custom field keys addressed by `field_name`.
pub const AMO_CF_NAME: &str = "cf.name.";

/// Splits a flat key as returned by `write` into the key `read` uses and the amoCRM enum
/// code to write with the value, if any: `cf.code.PHONE@WORK` → (`cf.code.PHONE`,
/// `Some("WORK")`). Only `cf.*` keys carry a suffix; other keys come back unchanged.
///
/// ```
/// use crmbridge::mapping::defaults::split_enum_suffix;
/// assert_eq!(split_enum_suffix("cf.code.PHONE@WORK"), ("cf.code.PHONE", Some("WORK")));
/// assert_eq!(split_enum_suffix("name"), ("name", None));
/// ```
pub fn split_enum_suffix(key: &str) -> (&str, Option<&str>) {
    if !key.starts_with("cf.") {
        return (key, None);
    }
    match key.rsplit_once('@') {
        // Enum codes are upper-case identifiers (`WORK`, `MOB`); anything else after an `@`
        // is part of a field name such as `cf.name.E@mail`.
        Some((base, code))
            if !code.is_empty()
                && code
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') =>
        {
            (base, Some(code))
        }
        _ => (key, None),
    }
}

/// The built-in rules of a CRM, before a connector's `[mapping]` section is applied.
pub fn default_rules(kind: CrmKind) -> Vec<FieldRule> {
    match kind {
        CrmKind::Rally => STANDARD_FIELDS
            .iter()
            // Rally has no external company id; it is Marketo's dedupe key.
            .filter(|(name, _)| *name != "externalCompanyId")
            .map(|(name, _)| vendor_rule(name, name))
            .collect(),
        CrmKind::Marketo => vec![
            vendor_rule("name", "company"),
            vendor_rule("website", "website"),
            FieldRule {
                direction: Direction::ReadOnly,
                transforms: vec![Transform::DomainFromUrl],
                ..vendor_rule("domain", "website")
            },
            vendor_rule("phone", "mainPhone"),
            vendor_rule("industry", "industry"),
            vendor_rule("employeeCount", "numberOfEmployees"),
            vendor_rule("annualRevenue", "annualRevenue"),
            vendor_rule("address", "billingStreet"),
            vendor_rule("city", "billingCity"),
            vendor_rule("state", "billingState"),
            vendor_rule("country", "billingCountry"),
            vendor_rule("postalCode", "billingPostalCode"),
            vendor_rule("externalCompanyId", "externalCompanyId"),
        ],
        CrmKind::Amocrm => vec![
            vendor_rule("name", "name"),
            vendor_rule("tags", "tags"),
            FieldRule {
                enum_code: Some("WORK".into()),
                ..code_rule("phone", "PHONE")
            },
            code_rule("website", "WEB"),
            code_rule("address", "ADDRESS"),
            // Account-specific fields: a connector drops these at start when the account
            // lacks them (`Mapping::fit`; the domain then comes from Web, see
            // `fallback_rules`).
            name_rule("domain", "Domain"),
            name_rule("industry", "Industry"),
            name_rule("employeeCount", "Employees"),
            name_rule("annualRevenue", "Annual revenue"),
            name_rule("city", "City"),
            name_rule("country", "Country"),
        ],
    }
}

/// Rules that stand in for a built-in rule whose vendor field the instance lacks (see
/// [`Mapping::fit`](super::Mapping::fit)). amoCRM has no domain field of its own: the
/// built-in rule reads an account field named "Domain" where one exists, and otherwise the
/// domain is taken from the standard Web field (as Marketo's is from `website`), so that
/// companies still match across CRMs by domain.
pub fn fallback_rules(kind: CrmKind) -> Vec<FieldRule> {
    match kind {
        CrmKind::Amocrm => vec![FieldRule {
            direction: Direction::ReadOnly,
            transforms: vec![Transform::DomainFromUrl],
            ..code_rule("domain", "WEB")
        }],
        CrmKind::Rally | CrmKind::Marketo => Vec::new(),
    }
}

fn vendor_rule(canonical: &str, vendor: &str) -> FieldRule {
    FieldRule {
        canonical: canonical.into(),
        vendor: Some(vendor.into()),
        ..FieldRule::default()
    }
}

fn code_rule(canonical: &str, code: &str) -> FieldRule {
    FieldRule {
        canonical: canonical.into(),
        field_code: Some(code.into()),
        ..FieldRule::default()
    }
}

fn name_rule(canonical: &str, name: &str) -> FieldRule {
    FieldRule {
        canonical: canonical.into(),
        field_name: Some(name.into()),
        ..FieldRule::default()
    }
}
