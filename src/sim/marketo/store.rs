//! The simulated Marketo company database: field metadata, records with their id and
//! `externalCompanyId` indexes, and the query / sync / delete rules the REST handlers apply.
//! Pure data without I/O, so every rule is testable without a server.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};

use chrono::{DateTime, SubsecRound, Utc};
use rust_decimal::Decimal;
use serde_json::{Map, Value, json};

use crate::model::{decimal_to_json, parse_decimal};

/// Marketo's cap on records per sync/delete call, `filterValues` per query and `batchSize`.
pub(crate) const MAX_BATCH: usize = 300;

/// The data types Marketo reports for company fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataType {
    Datetime,
    Integer,
    String,
    Url,
    Currency,
}

impl DataType {
    fn wire(self) -> &'static str {
        match self {
            DataType::Datetime => "datetime",
            DataType::Integer => "integer",
            DataType::String => "string",
            DataType::Url => "url",
            DataType::Currency => "currency",
        }
    }
}

/// Metadata of one company field, as `describe` and the schema endpoints report it.
#[derive(Debug)]
pub(crate) struct FieldDef {
    pub name: &'static str,
    pub display: &'static str,
    pub data_type: DataType,
    /// Maximum length in characters, for text fields.
    pub length: Option<usize>,
    /// Whether a sync may write the field (`externalCompanyId` only at creation).
    pub updateable: bool,
}

const fn text(name: &'static str, display: &'static str, length: usize) -> FieldDef {
    FieldDef {
        name,
        display,
        data_type: DataType::String,
        length: Some(length),
        updateable: true,
    }
}

/// The company fields of a typical instance without CRM sync. Instances differ (some lack
/// `billingStreet`, some have `site`); this one deliberately has no `site` or `description`
/// so connectors that hard-code field lists fail here as they would in the field.
pub(crate) const FIELDS: &[FieldDef] = &[
    FieldDef {
        name: "createdAt",
        display: "Created At",
        data_type: DataType::Datetime,
        length: None,
        updateable: false,
    },
    FieldDef {
        name: "externalCompanyId",
        display: "External Company Id",
        data_type: DataType::String,
        length: Some(100),
        updateable: false,
    },
    FieldDef {
        name: "id",
        display: "Id",
        data_type: DataType::Integer,
        length: None,
        updateable: false,
    },
    FieldDef {
        name: "updatedAt",
        display: "Updated At",
        data_type: DataType::Datetime,
        length: None,
        updateable: false,
    },
    FieldDef {
        name: "annualRevenue",
        display: "Annual Revenue",
        data_type: DataType::Currency,
        length: None,
        updateable: true,
    },
    text("billingCity", "Billing City", 255),
    text("billingCountry", "Billing Country", 255),
    text("billingPostalCode", "Billing Postal Code", 255),
    text("billingState", "Billing State", 255),
    text("billingStreet", "Billing Address", 255),
    text("company", "Company Name", 255),
    text("industry", "Industry", 255),
    text("mainPhone", "Main Phone", 255),
    FieldDef {
        name: "numberOfEmployees",
        display: "Num Employees",
        data_type: DataType::Integer,
        length: None,
        updateable: true,
    },
    text("sicCode", "SIC Code", 40),
    FieldDef {
        name: "website",
        display: "Website",
        data_type: DataType::Url,
        length: Some(255),
        updateable: true,
    },
];

/// The field named `name`, if this instance has it (names are case-sensitive, as in Marketo).
pub(crate) fn field(name: &str) -> Option<&'static FieldDef> {
    FIELDS.iter().find(|f| f.name == name)
}

/// A field as the `describe` endpoint lists it.
pub(crate) fn describe_json(f: &FieldDef) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(f.name));
    m.insert("displayName".into(), json!(f.display));
    m.insert("dataType".into(), json!(f.data_type.wire()));
    if let Some(len) = f.length {
        m.insert("length".into(), json!(len));
    }
    m.insert("updateable".into(), json!(f.updateable));
    Value::Object(m)
}

/// A field as the `schema/fields` endpoints list it.
pub(crate) fn schema_json(f: &FieldDef) -> Value {
    let textual = matches!(f.data_type, DataType::String | DataType::Url);
    let mut m = Map::new();
    m.insert("displayName".into(), json!(f.display));
    m.insert("name".into(), json!(f.name));
    m.insert("description".into(), Value::Null);
    m.insert("dataType".into(), json!(f.data_type.wire()));
    if let Some(len) = f.length {
        m.insert("length".into(), json!(len));
    }
    m.insert("isHidden".into(), json!(false));
    m.insert("isHtmlEncodingInEmail".into(), json!(textual));
    m.insert("isSensitive".into(), json!(false));
    m.insert("isCustom".into(), json!(false));
    m.insert("isApiCreated".into(), json!(false));
    Value::Object(m)
}

/// Why one record of a batch was skipped, as Marketo's `reasons` entries carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reason {
    pub code: &'static str,
    pub message: String,
}

impl Reason {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Reason {
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Reason::new("1003", message)
    }

    fn not_found() -> Self {
        Reason::new("1013", "Record not found")
    }

    fn json(&self) -> Value {
        json!({"code": self.code, "message": self.message})
    }
}

/// A stored field value; absence means null (Marketo omits null fields from answers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stored {
    Text(String),
    Int(i64),
    /// Currency, kept exact: never through `f64`.
    Money(Decimal),
}

impl Stored {
    fn json(&self) -> Value {
        match self {
            Stored::Text(s) => json!(s),
            Stored::Int(i) => json!(i),
            Stored::Money(d) => decimal_to_json(d),
        }
    }
}

/// One company record.
#[derive(Debug, Clone)]
pub(crate) struct Company {
    pub id: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Non-null values of the writable fields and `externalCompanyId`.
    pub values: BTreeMap<&'static str, Stored>,
}

/// Marketo's timestamp format: ISO-8601 UTC with `Z`, whole seconds.
pub(crate) fn wire_time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

impl Company {
    fn external_id(&self) -> Option<&str> {
        match self.values.get("externalCompanyId") {
            Some(Stored::Text(s)) => Some(s),
            _ => None,
        }
    }

    fn name(&self) -> Option<&str> {
        match self.values.get("company") {
            Some(Stored::Text(s)) => Some(s),
            _ => None,
        }
    }

    /// The value of `name` on the wire, `None` when null.
    fn wire_value(&self, name: &str) -> Option<Value> {
        match name {
            "id" => Some(json!(self.id)),
            "createdAt" => Some(json!(wire_time(&self.created_at))),
            "updatedAt" => Some(json!(wire_time(&self.updated_at))),
            other => self.values.get(other).map(Stored::json),
        }
    }

    /// The record with `id` first and then `fields` in order, null fields omitted.
    pub(crate) fn render(&self, fields: &[&'static FieldDef]) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        for f in fields {
            if f.name == "id" {
                continue;
            }
            if let Some(v) = self.wire_value(f.name) {
                m.insert(f.name.into(), v);
            }
        }
        m
    }

    /// Every non-null field on the wire.
    pub(crate) fn render_all(&self) -> Value {
        let all: Vec<&'static FieldDef> = FIELDS.iter().collect();
        Value::Object(self.render(&all))
    }
}

/// Converts one input value for field `f`; `Ok(None)` writes null (`null` or `""`).
pub(crate) fn coerce(f: &FieldDef, v: &Value) -> Result<Option<Stored>, Reason> {
    let bad = || {
        Reason::invalid(format!(
            "Invalid {} value '{}' for field '{}'",
            f.data_type.wire(),
            v,
            f.name
        ))
    };
    match v {
        Value::Null => return Ok(None),
        Value::String(s) if s.is_empty() => return Ok(None),
        _ => {}
    }
    match f.data_type {
        DataType::String | DataType::Url => {
            let s = match v {
                Value::String(s) => s.clone(),
                // Marketo stores a number sent to a text field as its text.
                Value::Number(n) => n.to_string(),
                _ => return Err(bad()),
            };
            if let Some(max) = f.length
                && s.chars().count() > max
            {
                return Err(Reason::invalid(format!(
                    "Value for field '{}' exceeds the maximum length of {max}",
                    f.name
                )));
            }
            Ok(Some(Stored::Text(s)))
        }
        DataType::Integer => {
            let text = match v {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.trim().to_string(),
                _ => return Err(bad()),
            };
            text.parse::<i64>()
                .map(|i| Some(Stored::Int(i)))
                .map_err(|_| bad())
        }
        DataType::Currency => {
            let text = match v {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.clone(),
                _ => return Err(bad()),
            };
            parse_decimal(&text)
                .map(|d| Some(Stored::Money(d)))
                .ok_or_else(bad)
        }
        DataType::Datetime => Err(Reason::invalid(format!(
            "Field '{}' is not updateable",
            f.name
        ))),
    }
}

/// The writable fields of one input record, converted; `id` and `externalCompanyId` are
/// left to the caller, which handles them as keys.
fn parse_changes(obj: &Map<String, Value>) -> Result<Vec<(&'static str, Option<Stored>)>, Reason> {
    let mut out = Vec::new();
    for (k, v) in obj {
        let Some(f) = field(k) else {
            return Err(Reason::new("1006", format!("Field '{k}' not found")));
        };
        if f.name == "id" || f.name == "externalCompanyId" {
            continue;
        }
        if !f.updateable {
            return Err(Reason::invalid(format!("Field '{k}' is not updateable")));
        }
        out.push((f.name, coerce(f, v)?));
    }
    Ok(out)
}

/// Which records a sync may create or update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    CreateOnly,
    UpdateOnly,
    CreateOrUpdate,
}

impl Action {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "createOnly" => Some(Action::CreateOnly),
            "updateOnly" => Some(Action::UpdateOnly),
            "createOrUpdate" => Some(Action::CreateOrUpdate),
            _ => None,
        }
    }
}

/// Which field identifies input records: `dedupeFields` (`externalCompanyId`) or `idField`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyField {
    Dedupe,
    Id,
}

impl KeyField {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "dedupeFields" => Some(KeyField::Dedupe),
            "idField" => Some(KeyField::Id),
            _ => None,
        }
    }
}

/// The key of one input record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    External(String),
    Id(i64),
}

fn input_key(by: KeyField, obj: &Map<String, Value>) -> Result<Key, Reason> {
    match by {
        KeyField::Dedupe => match obj.get("externalCompanyId") {
            Some(Value::String(s)) if !s.is_empty() => Ok(Key::External(s.clone())),
            Some(Value::Number(n)) => Ok(Key::External(n.to_string())),
            _ => Err(Reason::invalid(
                "Value for required field 'externalCompanyId' not specified",
            )),
        },
        KeyField::Id => match obj.get("id") {
            Some(Value::Number(n)) => n.as_i64().map(Key::Id).ok_or_else(|| {
                Reason::invalid(format!("Invalid integer value '{n}' for field 'id'"))
            }),
            Some(Value::String(s)) => s.trim().parse().map(Key::Id).map_err(|_| {
                Reason::invalid(format!("Invalid integer value '{s}' for field 'id'"))
            }),
            _ => Err(Reason::invalid(
                "Value for required field 'id' not specified",
            )),
        },
    }
}

/// Where a query stopped: position in the filter value list and the last id emitted there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueryCursor {
    pub value_pos: usize,
    pub last_id: i64,
}

/// A fingerprint of a query, so a paging token cannot be replayed against another filter.
pub(crate) fn query_fingerprint(filter_type: &str, values: &[String]) -> u64 {
    let mut h = DefaultHasher::new();
    filter_type.hash(&mut h);
    values.hash(&mut h);
    h.finish()
}

/// The company database of one simulated instance.
#[derive(Debug, Default)]
pub(crate) struct Store {
    companies: BTreeMap<i64, Company>,
    by_external: HashMap<String, i64>,
    by_name: HashMap<String, BTreeSet<i64>>,
    next_id: i64,
}

impl Store {
    /// An empty store whose first record gets `first_id`.
    pub(crate) fn new(first_id: i64) -> Self {
        Store {
            next_id: first_id,
            ..Store::default()
        }
    }

    /// Number of companies.
    pub(crate) fn len(&self) -> usize {
        self.companies.len()
    }

    pub(crate) fn get(&self, id: i64) -> Option<&Company> {
        self.companies.get(&id)
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &Company> {
        self.companies.values()
    }

    pub(crate) fn id_by_external(&self, ext: &str) -> Option<i64> {
        self.by_external.get(ext).copied()
    }

    /// The id at or after `from`, wrapping to the first; for picking records at random.
    pub(crate) fn id_near(&self, from: i64) -> Option<i64> {
        self.companies
            .range(from..)
            .next()
            .or_else(|| self.companies.iter().next())
            .map(|(id, _)| *id)
    }

    /// The lowest and highest ids in use.
    pub(crate) fn id_bounds(&self) -> Option<(i64, i64)> {
        let lo = *self.companies.keys().next()?;
        let hi = *self.companies.keys().next_back()?;
        Some((lo, hi))
    }

    fn index(&mut self, c: &Company) {
        if let Some(e) = c.external_id() {
            self.by_external.insert(e.to_string(), c.id);
        }
        if let Some(n) = c.name() {
            self.by_name.entry(n.to_string()).or_default().insert(c.id);
        }
    }

    fn unindex(&mut self, c: &Company) {
        if let Some(e) = c.external_id() {
            self.by_external.remove(e);
        }
        if let Some(n) = c.name()
            && let Some(set) = self.by_name.get_mut(n)
        {
            set.remove(&c.id);
            if set.is_empty() {
                self.by_name.remove(n);
            }
        }
    }

    /// Inserts a record with the given values and timestamps; returns its new id.
    pub(crate) fn insert(
        &mut self,
        values: BTreeMap<&'static str, Stored>,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
    ) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        let c = Company {
            id,
            created_at: created_at.trunc_subsecs(0),
            updated_at: updated_at.trunc_subsecs(0),
            values,
        };
        self.index(&c);
        self.companies.insert(id, c);
        id
    }

    /// Applies `changes` (null removes) to record `id` and stamps `updatedAt` with `now`.
    pub(crate) fn apply(
        &mut self,
        id: i64,
        changes: Vec<(&'static str, Option<Stored>)>,
        now: DateTime<Utc>,
    ) -> bool {
        let Some(mut c) = self.companies.remove(&id) else {
            return false;
        };
        self.unindex(&c);
        for (name, v) in changes {
            match v {
                Some(v) => c.values.insert(name, v),
                None => c.values.remove(name),
            };
        }
        c.updated_at = now.trunc_subsecs(0);
        self.index(&c);
        self.companies.insert(id, c);
        true
    }

    /// Removes record `id`.
    pub(crate) fn remove(&mut self, id: i64) -> bool {
        match self.companies.remove(&id) {
            Some(c) => {
                self.unindex(&c);
                true
            }
            None => false,
        }
    }

    fn lookup(&self, key: &Key) -> Option<i64> {
        match key {
            Key::External(e) => self.id_by_external(e),
            Key::Id(id) => self.companies.contains_key(id).then_some(*id),
        }
    }

    /// Ids matching one filter value, ascending.
    fn matches(&self, filter_type: &str, value: &str) -> Vec<i64> {
        match filter_type {
            "id" => value
                .parse::<i64>()
                .ok()
                .filter(|id| self.companies.contains_key(id))
                .into_iter()
                .collect(),
            "externalCompanyId" => self.id_by_external(value).into_iter().collect(),
            "company" => self
                .by_name
                .get(value)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// One page of a query: up to `batch` records after `after`, ordered by filter value
    /// position then id, and the cursor of the last one when more remain. Keyset paging keeps
    /// a page stable when records before it are deleted mid-scan.
    pub(crate) fn query(
        &self,
        filter_type: &str,
        values: &[String],
        fields: &[&'static FieldDef],
        after: Option<QueryCursor>,
        batch: usize,
    ) -> (Vec<Value>, Option<QueryCursor>) {
        let mut out = Vec::new();
        let mut last = None;
        let start = after.map_or(0, |a| a.value_pos);
        for (pos, value) in values.iter().enumerate().skip(start) {
            for id in self.matches(filter_type, value) {
                if let Some(a) = after
                    && pos == a.value_pos
                    && id <= a.last_id
                {
                    continue;
                }
                if out.len() == batch {
                    return (out, last);
                }
                let c = &self.companies[&id];
                let mut m = Map::new();
                m.insert("seq".into(), json!(out.len()));
                m.extend(c.render(fields));
                out.push(Value::Object(m));
                last = Some(QueryCursor {
                    value_pos: pos,
                    last_id: id,
                });
            }
        }
        (out, None)
    }

    /// A sync call: per input record a result `{seq, status, id?, reasons?}`.
    pub(crate) fn sync(
        &mut self,
        action: Action,
        by: KeyField,
        input: &[Value],
        now: DateTime<Utc>,
        read_only: bool,
    ) -> Vec<Value> {
        let mut seen = HashSet::new();
        input
            .iter()
            .enumerate()
            .map(
                |(seq, rec)| match self.sync_one(action, by, rec, now, read_only, &mut seen) {
                    Ok((status, id)) => json!({"seq": seq, "status": status, "id": id}),
                    Err(r) => skipped(seq, None, &r),
                },
            )
            .collect()
    }

    fn sync_one(
        &mut self,
        action: Action,
        by: KeyField,
        rec: &Value,
        now: DateTime<Utc>,
        read_only: bool,
        seen: &mut HashSet<Key>,
    ) -> Result<(&'static str, i64), Reason> {
        if read_only {
            return Err(read_only_reason());
        }
        let obj = rec
            .as_object()
            .ok_or_else(|| Reason::invalid("Input record is not an object"))?;
        let key = input_key(by, obj)?;
        if !seen.insert(key.clone()) {
            let what = match &key {
                Key::External(e) => format!("externalCompanyId '{e}'"),
                Key::Id(id) => format!("id '{id}'"),
            };
            return Err(Reason::new("1036", format!("Duplicate {what} in input")));
        }
        let changes = parse_changes(obj)?;
        let existing = self.lookup(&key);
        match (action, existing, &key) {
            (Action::CreateOnly, Some(_), _) => Err(Reason::new("1005", "Company already exists")),
            (Action::UpdateOnly, None, _) | (_, None, Key::Id(_)) => Err(Reason::not_found()),
            (_, None, Key::External(ext)) => {
                if obj.contains_key("id") {
                    return Err(Reason::invalid("Field 'id' is not updateable"));
                }
                let mut values: BTreeMap<&'static str, Stored> = changes
                    .into_iter()
                    .filter_map(|(k, v)| v.map(|v| (k, v)))
                    .collect();
                values.insert("externalCompanyId", Stored::Text(ext.clone()));
                Ok(("created", self.insert(values, now, now)))
            }
            (_, Some(id), _) => {
                let current = &self.companies[&id];
                if by == KeyField::Id
                    && let Some(v) = obj.get("externalCompanyId")
                {
                    let f = field("externalCompanyId").expect("externalCompanyId is defined");
                    let wanted = coerce(f, v)?;
                    let have = current.external_id().map(|s| Stored::Text(s.to_string()));
                    if wanted != have {
                        return Err(Reason::invalid(
                            "Field 'externalCompanyId' is not updateable",
                        ));
                    }
                }
                if by == KeyField::Dedupe
                    && let Some(v) = obj.get("id")
                    && v.as_i64() != Some(id)
                {
                    return Err(Reason::invalid("Field 'id' is not updateable"));
                }
                self.apply(id, changes, now);
                Ok(("updated", id))
            }
        }
    }

    /// A delete call: per input record `{seq, id, status: deleted}` or skipped.
    pub(crate) fn delete(&mut self, by: KeyField, input: &[Value], read_only: bool) -> Vec<Value> {
        input
            .iter()
            .enumerate()
            .map(|(seq, rec)| {
                let outcome = if read_only {
                    Err(read_only_reason())
                } else {
                    rec.as_object()
                        .ok_or_else(|| Reason::invalid("Input record is not an object"))
                        .and_then(|o| input_key(by, o))
                        .and_then(|k| self.lookup(&k).ok_or_else(Reason::not_found))
                };
                match outcome {
                    Ok(id) => {
                        self.remove(id);
                        json!({"seq": seq, "id": id, "status": "deleted"})
                    }
                    Err(r) => skipped(seq, None, &r),
                }
            })
            .collect()
    }
}

fn read_only_reason() -> Reason {
    Reason::new(
        "1018",
        "CRM sync is enabled: the Companies API is read-only on this instance",
    )
}

fn skipped(seq: usize, id: Option<i64>, r: &Reason) -> Value {
    let mut m = Map::new();
    m.insert("seq".into(), json!(seq));
    if let Some(id) = id {
        m.insert("id".into(), json!(id));
    }
    m.insert("status".into(), json!("skipped"));
    m.insert("reasons".into(), json!([r.json()]));
    Value::Object(m)
}

const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// RFC 4648 base32 with padding, the look of Marketo's paging tokens.
pub(crate) fn base32_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 8];
        buf[3..3 + chunk.len()].copy_from_slice(chunk);
        let n = u64::from_be_bytes(buf);
        let chars = match chunk.len() {
            1 => 2,
            2 => 4,
            3 => 5,
            4 => 7,
            _ => 8,
        };
        for i in 0..8 {
            if i < chars {
                out.push(B32[((n >> (35 - 5 * i)) & 31) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Inverse of [`base32_encode`]; `None` on characters outside the alphabet.
pub(crate) fn base32_decode(s: &str) -> Option<Vec<u8>> {
    let mut bits: u64 = 0;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in s.trim_end_matches('=').bytes() {
        let v = B32.iter().position(|&b| b == c)? as u64;
        bits = (bits << 5) | v;
        nbits += 5;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2025-03-01T10:00:00Z".parse().unwrap()
    }

    fn store_with(exts: &[&str]) -> Store {
        let mut s = Store::new(1000);
        for e in exts {
            let mut v = BTreeMap::new();
            v.insert("externalCompanyId", Stored::Text(e.to_string()));
            v.insert("company", Stored::Text(format!("Co {e}")));
            s.insert(v, now(), now());
        }
        s
    }

    #[test]
    fn base32_round_trips_every_length() {
        for len in 0..12 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 5) as u8).collect();
            let enc = base32_encode(&data);
            assert_eq!(enc.len() % 8, 0, "{enc}");
            assert_eq!(base32_decode(&enc).unwrap(), data, "{enc}");
        }
        assert_eq!(base32_encode(b"foobar"), "MZXW6YTBOI======");
    }

    #[test]
    fn null_and_empty_string_both_write_null() {
        let f = field("industry").unwrap();
        assert_eq!(coerce(f, &Value::Null), Ok(None));
        assert_eq!(coerce(f, &json!("")), Ok(None));
    }

    #[test]
    fn currency_is_parsed_exactly_from_the_number_text() {
        let f = field("annualRevenue").unwrap();
        let v: Value = serde_json::from_str("12345678901234567.89").unwrap();
        assert_eq!(
            coerce(f, &v),
            Ok(Some(Stored::Money("12345678901234567.89".parse().unwrap())))
        );
    }

    #[test]
    fn integer_field_refuses_fractions_with_1003() {
        let f = field("numberOfEmployees").unwrap();
        let err = coerce(f, &json!(4.5)).unwrap_err();
        assert_eq!(err.code, "1003", "{err:?}");
    }

    #[test]
    fn text_longer_than_the_field_is_refused() {
        let f = field("sicCode").unwrap();
        assert_eq!(coerce(f, &json!("x".repeat(41))).unwrap_err().code, "1003");
    }

    #[test]
    fn renaming_a_company_moves_it_in_the_name_index() {
        let mut s = store_with(&["A"]);
        s.apply(
            1000,
            vec![("company", Some(Stored::Text("New".into())))],
            now(),
        );
        let all: Vec<&'static FieldDef> = vec![field("company").unwrap()];
        assert!(
            s.query("company", &["Co A".into()], &all, None, 10)
                .0
                .is_empty()
        );
        assert_eq!(
            s.query("company", &["New".into()], &all, None, 10).0.len(),
            1
        );
    }

    #[test]
    fn keyset_paging_survives_a_delete_mid_scan() {
        let mut s = store_with(&["A", "B", "C", "D"]);
        let f = vec![field("externalCompanyId").unwrap()];
        let ids: Vec<String> = (1000..1004).map(|i| i.to_string()).collect();
        let (p1, cur) = s.query("id", &ids, &f, None, 2);
        assert_eq!(p1.len(), 2);
        s.remove(1000);
        let (p2, cur2) = s.query("id", &ids, &f, cur, 2);
        let got: Vec<_> = p2.iter().map(|r| r["id"].as_i64().unwrap()).collect();
        assert_eq!(got, vec![1002, 1003]);
        assert_eq!(cur2, None);
    }
}
