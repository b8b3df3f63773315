//! The canonical company: the one shape every CRM record is mapped into and out of, its
//! typed field values, and normalisation helpers (domains, decimals). Pure data, no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The id crmbridge gives a company, independent of any CRM (a UUID v7 in text form).
pub type CanonicalId = String;

/// Name of a configured connector instance (e.g. `"rally"`, `"marketo-emea"`).
pub type ConnectorName = String;

/// The CRM products crmbridge speaks to. A connector instance has a name and a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrmKind {
    /// Rally CRM (`/api/v1/companies`).
    Rally,
    /// Adobe Marketo Engage (`/rest/v1/companies.json`).
    Marketo,
    /// amoCRM (`/api/v4/companies`).
    Amocrm,
}

impl CrmKind {
    /// The kind's name as written in config (`rally`, `marketo`, `amocrm`).
    pub fn as_str(self) -> &'static str {
        match self {
            CrmKind::Rally => "rally",
            CrmKind::Marketo => "marketo",
            CrmKind::Amocrm => "amocrm",
        }
    }
}

impl fmt::Display for CrmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Prefix of canonical field names that carry custom fields passed through unmapped.
pub const CUSTOM_PREFIX: &str = "custom.";

/// The type a canonical field holds. Values of another type are a mapping error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// Free text; `""` (empty) and null are different values.
    Text,
    /// A whole number (64-bit).
    Int,
    /// An exact decimal; never passes through a float.
    Decimal,
    /// A set of tags (order and duplicates carry no meaning).
    Tags,
    /// Any JSON value, passed through untouched (custom fields).
    Json,
}

/// The standard canonical fields (Rally's company model) with their types.
pub const STANDARD_FIELDS: &[(&str, FieldType)] = &[
    ("name", FieldType::Text),
    ("domain", FieldType::Text),
    ("industry", FieldType::Text),
    ("description", FieldType::Text),
    ("employeeCount", FieldType::Int),
    ("annualRevenue", FieldType::Decimal),
    ("phone", FieldType::Text),
    ("website", FieldType::Text),
    ("linkedInUrl", FieldType::Text),
    ("address", FieldType::Text),
    ("city", FieldType::Text),
    ("state", FieldType::Text),
    ("country", FieldType::Text),
    ("postalCode", FieldType::Text),
    ("tags", FieldType::Tags),
    ("notes", FieldType::Text),
    ("ownerId", FieldType::Text),
    ("externalCompanyId", FieldType::Text),
];

/// The type of canonical field `name`: a standard field, or a `custom.*` pass-through
/// (JSON). `None` for a name that is neither.
pub fn field_type(name: &str) -> Option<FieldType> {
    if let Some(rest) = name.strip_prefix(CUSTOM_PREFIX) {
        return (!rest.is_empty()).then_some(FieldType::Json);
    }
    STANDARD_FIELDS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
}

/// One canonical field value. Null is a value of its own: a CRM that says "no industry"
/// is different from a CRM that does not map industry at all (the field is then absent).
///
/// Externally tagged on purpose: serde_json runs with `arbitrary_precision`, which breaks
/// numbers inside internally tagged or untagged enums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    /// Explicitly no value.
    Null,
    /// Text (may be empty).
    Text(String),
    /// A whole number.
    Int(i64),
    /// An exact decimal.
    Decimal(Decimal),
    /// A tag set.
    Tags(BTreeSet<String>),
    /// Raw JSON (custom fields).
    Json(serde_json::Value),
}

impl Value {
    /// True for [`Value::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// True for a value that holds nothing: null, or an empty tag list (CRMs answer `[]`
    /// for tags never set, so the two mean the same).
    pub fn is_nothing(&self) -> bool {
        match self {
            Value::Null => true,
            Value::Tags(t) => t.is_empty(),
            _ => false,
        }
    }

    /// The value with its representation made unique, so that equal meanings compare and
    /// hash equal: decimals lose trailing zeros (`45.50` → `45.5`).
    pub fn normalized(&self) -> Value {
        match self {
            Value::Decimal(d) => Value::Decimal(d.normalize()),
            other => other.clone(),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Text(s) => write!(f, "{s:?}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Decimal(d) => write!(f, "{d}"),
            Value::Tags(t) => write!(f, "{t:?}"),
            Value::Json(j) => write!(f, "{j}"),
        }
    }
}

/// Canonical field values as read from or written to one CRM record, keyed by canonical
/// field name. A field that is absent was not mapped; [`Value::Null`] means "empty".
pub type Fields = BTreeMap<String, Value>;

/// Where a field's current value came from: the connector and the vendor's timestamp of
/// the record it was read in. The conflict policy compares these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// Connector the value was last taken from.
    pub connector: ConnectorName,
    /// The vendor's `updatedAt` of the record carrying the value (UTC).
    pub vendor_ts: DateTime<Utc>,
}

/// A field's value with its provenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldState {
    /// The current value.
    pub value: Value,
    /// Where it came from.
    pub source: Provenance,
}

/// The canonical company as stored in redb.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Company {
    /// crmbridge's own id.
    pub id: CanonicalId,
    /// Every known field with its provenance.
    pub fields: BTreeMap<String, FieldState>,
}

/// `v` as 26 Crockford base32 digits, most significant first (the first digit holds the
/// top 3 bits): equal-length strings that sort as the numbers do.
fn crockford_base32(v: u128) -> String {
    const DIGITS: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    (0..26)
        .rev()
        .map(|i| DIGITS[((v >> (i * 5)) & 31) as usize] as char)
        .collect()
}

impl Company {
    /// A company with no fields yet.
    pub fn new(id: CanonicalId) -> Self {
        Company {
            id,
            fields: BTreeMap::new(),
        }
    }

    /// A fresh canonical id: a time-ordered UUID (v7), so new companies append to the
    /// store's B-tree instead of touching random pages, written as 26 characters of
    /// Crockford base32 (as a ULID is) rather than 36 of hyphenated hex — the id is a key
    /// or value in seven rows per company. The encoding keeps the order of the bytes.
    pub fn new_id() -> CanonicalId {
        crockford_base32(uuid::Uuid::now_v7().as_u128())
    }

    /// The current values without provenance.
    pub fn values(&self) -> Fields {
        self.fields
            .iter()
            .map(|(k, s)| (k.clone(), s.value.clone()))
            .collect()
    }

    /// The value of field `name`, if known.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.get(name).map(|s| &s.value)
    }

    /// The text value of field `name`, if it is known and text.
    pub fn text(&self, name: &str) -> Option<&str> {
        match self.get(name) {
            Some(Value::Text(s)) => Some(s),
            _ => None,
        }
    }
}

/// A stable content hash of canonical values (normalised), used by the echo ledger to
/// recognise our own writes coming back and to skip no-op pushes.
pub fn content_hash(fields: &Fields) -> String {
    content_hash_of(fields.iter().map(|(k, v)| (k.as_str(), v)))
}

/// [`content_hash`] of `(name, value)` pairs given in name order, so callers can hash a
/// selection of values without collecting it into a [`Fields`] first.
///
/// The bytes hashed are a hand-written, length-prefixed encoding of each normalised value
/// (not serde output), so the hash is stable across library versions and never collides
/// two different field sets by concatenation.
pub fn content_hash_of<'a>(fields: impl IntoIterator<Item = (&'a str, &'a Value)>) -> String {
    let mut buf = Vec::with_capacity(512);
    for (k, v) in fields {
        put_bytes(&mut buf, k.as_bytes());
        hash_value(&mut buf, v);
    }
    hex::encode(Sha256::digest(&buf))
}

fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    buf.extend_from_slice(bytes);
}

/// Appends the hashed form of `v`: a type tag, then a length-prefixed or fixed-width body.
fn hash_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => buf.push(0),
        Value::Text(s) => {
            buf.push(1);
            put_bytes(buf, s.as_bytes());
        }
        Value::Int(i) => {
            buf.push(2);
            buf.extend_from_slice(&i.to_le_bytes());
        }
        Value::Decimal(d) => {
            // As the nearest 64-bit float: a CRM that stores numbers so (amoCRM's numeric
            // fields, JSON readers in general) reads back a revenue of 17 significant
            // digits cut to 16, which is no change of ours to carry elsewhere. The exact
            // decimal is still what is stored and written; only a difference beyond a
            // float's precision goes unnoticed.
            let float: f64 = d.to_string().parse().unwrap_or(f64::NAN);
            let float = if float == 0.0 { 0.0 } else { float };
            buf.push(3);
            buf.extend_from_slice(&float.to_bits().to_le_bytes());
        }
        Value::Tags(tags) => {
            // Tags differing only in case are the same tags: amoCRM keeps one tag per
            // name whatever its case (a written "vip" reads back as the account's "VIP"),
            // and a change of case alone is no news to carry elsewhere.
            let folded: BTreeSet<String> = tags.iter().map(|t| t.to_lowercase()).collect();
            buf.push(4);
            buf.extend_from_slice(&(folded.len() as u64).to_le_bytes());
            for t in &folded {
                put_bytes(buf, t.as_bytes());
            }
        }
        Value::Json(j) => {
            // serde_json with `preserve_order` keeps object keys in insertion order, which
            // is the vendor's order: stable for one vendor record.
            buf.push(5);
            put_bytes(buf, &serde_json::to_vec(j).unwrap_or_default());
        }
    }
}

/// Per-field fingerprints of one vendor record's content as last read from or written to
/// it: the *base* a later read is compared with, field by field, to tell the fields that
/// record changed since from those it merely still holds (stale values a newer change
/// elsewhere has replaced, which must not win just because the record's timestamp is
/// newer).
///
/// One print per canonical field the connector's mapping reads, in the order of the
/// mapping's sorted field list, whose own fingerprint is `layout`: after a change of the
/// mapping, old prints no longer line up and are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPrints {
    /// Fingerprint of the sorted list of field names the prints follow.
    pub layout: u32,
    /// One per field; [`FieldPrints::UNKNOWN`] where the record's value is not known.
    pub values: Vec<u32>,
}

impl FieldPrints {
    /// The print of a field whose value in the record is not known: it matches nothing.
    pub const UNKNOWN: u32 = 0;
    /// The print of a field holding nothing (null, absent, an empty tag list), whatever
    /// its name: the layout check keeps it from matching another field's.
    pub const NOTHING: u32 = 1;

    /// The prints of a record after a write whose prints are `self` landed on a record
    /// printed `under`: where the write set nothing (a create leaves out the fields its
    /// company lacks), the record keeps what it held. `self` when the layouts differ.
    pub fn over(&self, under: &FieldPrints) -> FieldPrints {
        if self.layout != under.layout {
            return self.clone();
        }
        let values = self
            .values
            .iter()
            .zip(&under.values)
            .map(|(&top, &below)| if top == Self::NOTHING { below } else { top })
            .collect();
        FieldPrints {
            layout: self.layout,
            values,
        }
    }

    /// Whether field `i` holds the same value in `self` and in `base` (a known one).
    pub fn unchanged_since(&self, base: &FieldPrints, i: usize) -> bool {
        self.layout == base.layout
            && matches!((self.values.get(i), base.values.get(i)),
                (Some(a), Some(b)) if a == b && *a != Self::UNKNOWN)
    }
}

/// Computes field prints ([`FieldPrints::values`]), reusing one buffer.
#[derive(Debug, Default)]
pub struct FieldPrinter(Vec<u8>);

impl FieldPrinter {
    /// The fingerprint of field `name` holding `value` (null, absent and an empty tag list
    /// are the same "nothing", [`FieldPrints::NOTHING`]): FNV-1a over the name and the
    /// value in the encoding of [`content_hash`], folded to 32 bits. Stable across
    /// builds, since it is stored.
    pub fn print(&mut self, name: &str, value: Option<&Value>) -> u32 {
        let Some(v) = value.filter(|v| !v.is_nothing()) else {
            return FieldPrints::NOTHING;
        };
        self.0.clear();
        put_bytes(&mut self.0, name.as_bytes());
        hash_value(&mut self.0, v);
        // Never one of the reserved prints.
        fnv1a(&self.0).max(2)
    }
}

/// The fingerprint of a list of names (a [`FieldPrints::layout`]).
pub fn layout_print<'a>(names: impl IntoIterator<Item = &'a str>) -> u32 {
    let mut buf = Vec::with_capacity(256);
    for n in names {
        put_bytes(&mut buf, n.as_bytes());
    }
    fnv1a(&buf)
}

/// 64-bit FNV-1a folded to 32 bits.
fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 32)) as u32
}

/// Normalises a domain for matching: lowercase, no scheme, no `www.`, no port, path,
/// query or trailing dot. `None` when nothing domain-like is left.
///
/// ```
/// use crmbridge::model::normalize_domain;
/// assert_eq!(normalize_domain("HTTPS://www.Acme.com/about?x=1").as_deref(), Some("acme.com"));
/// assert_eq!(normalize_domain("  "), None);
/// ```
pub fn normalize_domain(raw: &str) -> Option<String> {
    let s = raw.trim().to_lowercase();
    let s = s.split_once("://").map(|(_, rest)| rest).unwrap_or(&s);
    let s = s.rsplit_once('@').map(|(_, host)| host).unwrap_or(s);
    let end = s.find(['/', '?', '#', ':']).unwrap_or(s.len());
    let host = s[..end].trim_end_matches('.');
    let host = host.strip_prefix("www.").unwrap_or(host);
    (!host.is_empty() && host.contains('.')).then(|| host.to_string())
}

/// Parses a decimal exactly from its JSON text (`"45000000"`, `"1.5e3"`, `"-0.10"`).
pub fn parse_decimal(text: &str) -> Option<Decimal> {
    let t = text.trim();
    t.parse::<Decimal>()
        .ok()
        .or_else(|| Decimal::from_scientific(t).ok())
}

/// The JSON number for a decimal, exact (serde_json runs with `arbitrary_precision`).
pub fn decimal_to_json(d: &Decimal) -> serde_json::Value {
    let text = d.normalize().to_string();
    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_26_characters_that_sort_by_creation() {
        assert_eq!(crockford_base32(0), "0".repeat(26));
        assert_eq!(crockford_base32(u128::MAX), format!("7{}", "Z".repeat(25)));
        assert!(crockford_base32(31) < crockford_base32(32));
        let ids: Vec<CanonicalId> = (0..200).map(|_| Company::new_id()).collect();
        assert!(ids.iter().all(|id| id.len() == 26));
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids out of creation order"
        );
    }

    #[test]
    fn decimals_hash_alike_when_a_float_cannot_tell_them_apart() {
        let dec = |t: &str| Value::Decimal(parse_decimal(t).unwrap());
        let hash = |v: Value| content_hash(&[("r".to_string(), v)].into_iter().collect());
        // What amoCRM reads back of a 17-digit revenue it stored as a float.
        assert_eq!(
            hash(dec("49417215524952837.12")),
            hash(dec("49417215524952840"))
        );
        assert_eq!(hash(dec("45.50")), hash(dec("45.5")));
        assert_eq!(hash(dec("0")), hash(dec("-0.00")));
        assert_ne!(hash(dec("45.51")), hash(dec("45.5")));
        assert_ne!(hash(dec("1234567.5")), hash(dec("1234567.05")));
    }

    #[test]
    fn prints_of_a_write_over_a_record_keep_what_the_write_left_out() {
        let p = |values: Vec<u32>| FieldPrints { layout: 9, values };
        let n = FieldPrints::NOTHING;
        assert_eq!(p(vec![5, n, 7]).over(&p(vec![3, 4, n])), p(vec![5, 4, 7]));
        let other = FieldPrints {
            layout: 8,
            values: vec![3, 4, 4],
        };
        assert_eq!(p(vec![5, n, 7]).over(&other), p(vec![5, n, 7]));
    }

    #[test]
    fn tags_differing_only_in_case_hash_and_print_alike() {
        let tags = |t: &[&str]| Value::Tags(t.iter().map(|s| s.to_string()).collect());
        let hash = |v: Value| content_hash(&[("tags".to_string(), v)].into_iter().collect());
        assert_eq!(hash(tags(&["vip", "apac"])), hash(tags(&["apac", "VIP"])));
        assert_ne!(hash(tags(&["vip", "apac"])), hash(tags(&["vip"])));
        let mut p = FieldPrinter::default();
        assert_eq!(
            p.print("tags", Some(&tags(&["Churned", "na"]))),
            p.print("tags", Some(&tags(&["churned", "NA"])))
        );
    }

    #[test]
    fn domains_normalise_to_the_bare_host() {
        for (raw, want) in [
            ("acme.com", Some("acme.com")),
            ("https://www.acme.com/", Some("acme.com")),
            ("http://Sub.Acme.COM:8080/x", Some("sub.acme.com")),
            ("www.acme.com.", Some("acme.com")),
            ("mailto:info@acme.com", Some("acme.com")),
            ("", None),
            ("localhost", None),
        ] {
            assert_eq!(normalize_domain(raw).as_deref(), want, "input {raw:?}");
        }
    }

    #[test]
    fn decimals_parse_exactly_and_hash_by_meaning() {
        let a = parse_decimal("45000000.50").unwrap();
        let b = parse_decimal("45000000.5").unwrap();
        let mut fa = Fields::new();
        fa.insert("annualRevenue".into(), Value::Decimal(a));
        let mut fb = Fields::new();
        fb.insert("annualRevenue".into(), Value::Decimal(b));
        assert_eq!(content_hash(&fa), content_hash(&fb));
        assert_eq!(
            parse_decimal("12345678901234567890.123456789")
                .unwrap()
                .to_string(),
            "12345678901234567890.123456789"
        );
        assert_eq!(decimal_to_json(&a).to_string(), "45000000.5");
    }

    #[test]
    fn null_and_empty_text_hash_differently() {
        let mut a = Fields::new();
        a.insert("notes".into(), Value::Null);
        let mut b = Fields::new();
        b.insert("notes".into(), Value::Text(String::new()));
        assert_ne!(content_hash(&a), content_hash(&b));
    }

    #[test]
    fn field_types_cover_custom_fields() {
        assert_eq!(field_type("annualRevenue"), Some(FieldType::Decimal));
        assert_eq!(field_type("custom.segment"), Some(FieldType::Json));
        assert_eq!(field_type("custom."), None);
        assert_eq!(field_type("nope"), None);
    }
}
