//! The Rally simulator's in-memory company table: validation of request bodies, the
//! wire JSON of a record, and the listing order (by `createdAt`, then `id` — never by
//! `updatedAt`, so offset paging over a changing set skips and repeats rows as Rally does).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration as ChronoDuration, SecondsFormat, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::model::{decimal_to_json, parse_decimal};
use crate::sim::common::SeedCompany;

/// The tenant every simulated record belongs to (the one in Rally's published example).
pub const TENANT_ID: &str = "3fa85f64-5717-4562-b3fc-2c963f66afa6";

/// The owner given to every third seeded company (the one in Rally's published example).
const SEED_OWNER: &str = "e4d909c2-90d0-4b2b-88c5-8e9a0fa1e4b1";

/// Nullable text fields of a company, in wire order.
pub const TEXT_FIELDS: [&str; 12] = [
    "domain",
    "industry",
    "description",
    "phone",
    "website",
    "linkedInUrl",
    "address",
    "city",
    "state",
    "country",
    "postalCode",
    "notes",
];

/// Every field of the wire record (`CompanyResponse`), in the order Rally writes them.
pub const RESPONSE_FIELDS: [&str; 21] = [
    "id",
    "tenantId",
    "name",
    "domain",
    "industry",
    "description",
    "employeeCount",
    "annualRevenue",
    "phone",
    "website",
    "linkedInUrl",
    "address",
    "city",
    "state",
    "country",
    "postalCode",
    "tags",
    "notes",
    "ownerId",
    "createdAt",
    "updatedAt",
];

const DOMAIN: usize = 0;
const INDUSTRY: usize = 1;
const PHONE: usize = 3;
const WEBSITE: usize = 4;
const CITY: usize = 7;
const COUNTRY: usize = 9;

/// A request the API refuses, with the status Rally would answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the body or a parameter is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no company has this id.
    #[error("Company not found")]
    NotFound,
    /// 409: another company already has this domain.
    #[error("A company with domain '{0}' already exists")]
    Conflict(String),
}

/// One stored company.
#[derive(Debug, Clone)]
pub struct Record {
    /// Rally's id.
    pub id: Uuid,
    /// Company name, never empty.
    pub name: String,
    /// The [`TEXT_FIELDS`], same order.
    pub text: [Option<String>; 12],
    /// Employee count (a .NET `int`).
    pub employee_count: Option<i32>,
    /// Annual revenue, exact.
    pub annual_revenue: Option<Decimal>,
    /// Tags, in the order they were sent.
    pub tags: Vec<String>,
    /// Owner.
    pub owner_id: Option<Uuid>,
    /// Creation time (millisecond precision); with `id` the listing key.
    pub created_at: DateTime<Utc>,
    /// Last write (millisecond precision).
    pub updated_at: DateTime<Utc>,
}

/// Formats a timestamp as Rally does: RFC 3339, UTC, `Z`, milliseconds.
pub fn wire_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Record {
    /// The wire value of one [`RESPONSE_FIELDS`] entry.
    fn field(&self, key: &str) -> Value {
        match key {
            "id" => Value::String(self.id.to_string()),
            "tenantId" => Value::String(TENANT_ID.into()),
            "name" => Value::String(self.name.clone()),
            "employeeCount" => self.employee_count.map_or(Value::Null, |n| json!(n)),
            "annualRevenue" => self
                .annual_revenue
                .as_ref()
                .map_or(Value::Null, decimal_to_json),
            "tags" => json!(self.tags),
            "ownerId" => self
                .owner_id
                .map_or(Value::Null, |u| Value::String(u.to_string())),
            "createdAt" => Value::String(wire_time(&self.created_at)),
            "updatedAt" => Value::String(wire_time(&self.updated_at)),
            text => TEXT_FIELDS
                .iter()
                .position(|f| *f == text)
                .and_then(|i| self.text[i].clone())
                .map_or(Value::Null, Value::String),
        }
    }

    /// The exact wire JSON (`CompanyResponse`), every field present, nulls included.
    pub fn to_json(&self) -> Value {
        self.to_json_projected(&RESPONSE_FIELDS)
    }

    /// The wire JSON reduced to `fields` (names from [`RESPONSE_FIELDS`]), in wire order.
    pub fn to_json_projected(&self, fields: &[&'static str]) -> Value {
        let m: Map<String, Value> = RESPONSE_FIELDS
            .iter()
            .filter(|k| fields.contains(k))
            .map(|k| ((*k).to_string(), self.field(k)))
            .collect();
        Value::Object(m)
    }

    fn domain_key(&self) -> Option<String> {
        self.text[DOMAIN].as_deref().and_then(domain_key)
    }

    fn apply(&mut self, p: &Patch) {
        if let Some(name) = &p.name {
            self.name.clone_from(name);
        }
        for (i, v) in &p.text {
            self.text[*i].clone_from(v);
        }
        if let Some(v) = p.employee_count {
            self.employee_count = v;
        }
        if let Some(v) = p.annual_revenue {
            self.annual_revenue = v;
        }
        if let Some(v) = &p.tags {
            self.tags.clone_from(v);
        }
        if let Some(v) = p.owner_id {
            self.owner_id = v;
        }
    }
}

/// The key a domain is matched by: case-insensitive, surrounding blanks ignored; blank
/// domains match nothing.
pub fn domain_key(domain: &str) -> Option<String> {
    let t = domain.trim();
    (!t.is_empty()).then(|| t.to_lowercase())
}

/// A validated request body: `None` = key absent (leave unchanged), `Some(None)` = null.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    name: Option<String>,
    text: Vec<(usize, Option<String>)>,
    employee_count: Option<Option<i32>>,
    annual_revenue: Option<Option<Decimal>>,
    tags: Option<Vec<String>>,
    owner_id: Option<Option<Uuid>>,
}

impl Patch {
    /// Validates a JSON body. Unknown keys (including `id`, `createdAt`…) are ignored, as
    /// Rally's model binder ignores them; `name`, when `name_required`, must be present.
    pub fn parse(body: &Value, name_required: bool) -> Result<Patch, ApiError> {
        let Value::Object(obj) = body else {
            return Err(ApiError::BadRequest(
                "Request body must be a JSON object".into(),
            ));
        };
        let mut p = Patch::default();
        match obj.get("name") {
            None if name_required => {
                return Err(ApiError::BadRequest("Company name is required".into()));
            }
            None => {}
            Some(Value::String(s)) if !s.trim().is_empty() => p.name = Some(s.clone()),
            Some(Value::String(_)) | Some(Value::Null) => {
                return Err(ApiError::BadRequest("Company name is required".into()));
            }
            Some(other) => return Err(type_error("name", "a string", other)),
        }
        for (i, key) in TEXT_FIELDS.iter().enumerate() {
            match obj.get(*key) {
                None => {}
                Some(Value::Null) => p.text.push((i, None)),
                Some(Value::String(s)) => p.text.push((i, Some(s.clone()))),
                Some(other) => return Err(type_error(key, "a string", other)),
            }
        }
        p.employee_count = match obj.get("employeeCount") {
            None => None,
            Some(Value::Null) => Some(None),
            Some(v @ Value::Number(n)) => {
                let n = n
                    .as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .ok_or_else(|| type_error("employeeCount", "a 32-bit integer", v))?;
                Some(Some(n))
            }
            Some(other) => return Err(type_error("employeeCount", "an integer", other)),
        };
        p.annual_revenue = match obj.get("annualRevenue") {
            None => None,
            Some(Value::Null) => Some(None),
            Some(v @ Value::Number(n)) => {
                let d = parse_decimal(&n.to_string())
                    .ok_or_else(|| type_error("annualRevenue", "a decimal", v))?;
                Some(Some(d))
            }
            Some(other) => return Err(type_error("annualRevenue", "a number", other)),
        };
        p.tags = match obj.get("tags") {
            None => None,
            Some(Value::Null) => Some(Vec::new()),
            Some(Value::Array(items)) => {
                let mut tags = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s) => tags.push(s.clone()),
                        other => return Err(type_error("tags", "an array of strings", other)),
                    }
                }
                Some(tags)
            }
            Some(other) => return Err(type_error("tags", "an array of strings", other)),
        };
        p.owner_id = match obj.get("ownerId") {
            None => None,
            Some(Value::Null) => Some(None),
            Some(v @ Value::String(s)) => Some(Some(
                Uuid::parse_str(s).map_err(|_| type_error("ownerId", "a GUID", v))?,
            )),
            Some(other) => return Err(type_error("ownerId", "a GUID", other)),
        };
        Ok(p)
    }

    /// The domain this body sets: `None` when absent, `Some(None)` when null.
    pub fn domain(&self) -> Option<Option<&str>> {
        self.text
            .iter()
            .find(|(i, _)| *i == DOMAIN)
            .map(|(_, v)| v.as_deref())
    }
}

fn type_error(field: &str, want: &str, got: &Value) -> ApiError {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::BadRequest(format!("The field '{field}' must be {want}, got {got}"))
}

/// What a domain-matched write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsertAction {
    /// A new company was created.
    Created,
    /// An existing company (same domain) was updated.
    Updated,
}

impl UpsertAction {
    /// The wire word (`"created"` / `"updated"`).
    pub fn as_str(self) -> &'static str {
        match self {
            UpsertAction::Created => "created",
            UpsertAction::Updated => "updated",
        }
    }
}

/// Listing key: creation time, then id (a UUID's byte order is its text order).
type Key = (DateTime<Utc>, Uuid);

/// The company table with its indexes.
#[derive(Debug)]
pub struct Store {
    /// Records in listing order.
    rows: BTreeMap<Key, Record>,
    /// id → (listing key, position in `ids`).
    by_id: HashMap<Uuid, (DateTime<Utc>, usize)>,
    /// Every live id, for O(1) random picks by the mutator.
    ids: Vec<Uuid>,
    /// Domain key → id; a domain belongs to at most one company.
    by_domain: HashMap<String, Uuid>,
    /// Last timestamp handed to a write; the next write is at least 1 ms later.
    last_write: DateTime<Utc>,
    /// Seeded source of ids and mutator choices.
    rng: StdRng,
    /// Counter that makes mutator-created domains unique.
    created_serial: u64,
}

/// Listing parameters, validated.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// Rows to return.
    pub limit: usize,
    /// Matching rows to skip.
    pub offset: usize,
    /// Only rows with `updatedAt >= since`.
    pub since: Option<DateTime<Utc>>,
    /// Projection; `None` = every field.
    pub fields: Option<Vec<&'static str>>,
}

impl Store {
    /// An empty table whose ids and random choices derive from `seed`.
    pub fn new(seed: u64) -> Store {
        Store {
            rows: BTreeMap::new(),
            by_id: HashMap::new(),
            ids: Vec::new(),
            by_domain: HashMap::new(),
            last_write: DateTime::<Utc>::MIN_UTC,
            rng: StdRng::seed_from_u64(seed ^ 0x7a11_7a11),
            created_serial: 0,
        }
    }

    /// Number of live companies.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no company is live.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn new_id(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.random()).into_uuid()
    }

    /// The timestamp of the next write: now, but strictly after the previous write, so two
    /// separate writes never share an `updatedAt`.
    pub fn next_write_time(&mut self) -> DateTime<Utc> {
        let now = truncate_ms(Utc::now());
        let t = now.max(self.last_write + ChronoDuration::milliseconds(1));
        self.last_write = t;
        t
    }

    /// Inserts a seed company (`variant` perturbs a few values, see [`seed_record`]).
    pub fn insert_seed(&mut self, seed: u64, company: &SeedCompany, variant: u8) {
        let rec = seed_record(seed, company, variant);
        self.last_write = self.last_write.max(rec.updated_at);
        self.insert(rec);
    }

    fn insert(&mut self, rec: Record) {
        if let Some(k) = rec.domain_key() {
            self.by_domain.insert(k, rec.id);
        }
        self.by_id.insert(rec.id, (rec.created_at, self.ids.len()));
        self.ids.push(rec.id);
        self.rows.insert((rec.created_at, rec.id), rec);
    }

    /// The record with this id.
    pub fn get(&self, id: &Uuid) -> Option<&Record> {
        let (created, _) = self.by_id.get(id)?;
        self.rows.get(&(*created, *id))
    }

    fn get_mut(&mut self, id: &Uuid) -> Option<&mut Record> {
        let (created, _) = self.by_id.get(id)?;
        self.rows.get_mut(&(*created, *id))
    }

    /// Every record in listing order.
    pub fn iter(&self) -> impl Iterator<Item = &Record> {
        self.rows.values()
    }

    /// One page of the listing, as wire JSON.
    pub fn list(&self, q: &ListQuery) -> Vec<Value> {
        self.rows
            .values()
            .filter(|r| q.since.is_none_or(|s| r.updated_at >= s))
            .skip(q.offset)
            .take(q.limit)
            .map(|r| match &q.fields {
                Some(f) => r.to_json_projected(f),
                None => r.to_json(),
            })
            .collect()
    }

    fn check_domain_free(&self, domain: Option<&str>, owner: Option<Uuid>) -> Result<(), ApiError> {
        let Some(d) = domain else { return Ok(()) };
        let Some(key) = domain_key(d) else {
            return Ok(());
        };
        match self.by_domain.get(&key) {
            Some(holder) if Some(*holder) != owner => Err(ApiError::Conflict(d.to_string())),
            _ => Ok(()),
        }
    }

    /// Creates a company at write time `at`; 409 if its domain is taken.
    pub fn create(&mut self, p: &Patch, at: DateTime<Utc>) -> Result<&Record, ApiError> {
        self.check_domain_free(p.domain().flatten(), None)?;
        let mut rec = Record {
            id: self.new_id(),
            name: String::new(),
            text: Default::default(),
            employee_count: None,
            annual_revenue: None,
            tags: Vec::new(),
            owner_id: None,
            created_at: at,
            updated_at: at,
        };
        rec.apply(p);
        let key = (rec.created_at, rec.id);
        self.insert(rec);
        Ok(&self.rows[&key])
    }

    /// Applies `p` to company `id` at write time `at`; 404 if missing, 409 if it would take
    /// another company's domain.
    pub fn update(&mut self, id: &Uuid, p: &Patch, at: DateTime<Utc>) -> Result<&Record, ApiError> {
        if self.get(id).is_none() {
            return Err(ApiError::NotFound);
        }
        if let Some(d) = p.domain() {
            self.check_domain_free(d, Some(*id))?;
        }
        let rec = self.get_mut(id).expect("checked above");
        let old_key = rec.domain_key();
        rec.apply(p);
        rec.updated_at = at;
        let new_key = rec.domain_key();
        if old_key != new_key {
            if let Some(k) = old_key {
                self.by_domain.remove(&k);
            }
            if let Some(k) = new_key {
                self.by_domain.insert(k, *id);
            }
        }
        Ok(self.get(id).expect("still present"))
    }

    /// Creates, or updates the company whose domain matches `p`'s (case-insensitively).
    /// Without a domain it always creates.
    pub fn upsert(
        &mut self,
        p: &Patch,
        at: DateTime<Utc>,
    ) -> Result<(UpsertAction, Uuid), ApiError> {
        let existing = p
            .domain()
            .flatten()
            .and_then(domain_key)
            .and_then(|k| self.by_domain.get(&k).copied());
        match existing {
            Some(id) => self
                .update(&id, p, at)
                .map(|r| (UpsertAction::Updated, r.id)),
            None => self.create(p, at).map(|r| (UpsertAction::Created, r.id)),
        }
    }

    /// Deletes company `id`; false if there was none.
    pub fn delete(&mut self, id: &Uuid) -> bool {
        let Some((created, pos)) = self.by_id.remove(id) else {
            return false;
        };
        let rec = self.rows.remove(&(created, *id)).expect("indexes agree");
        if let Some(k) = rec.domain_key() {
            self.by_domain.remove(&k);
        }
        self.ids.swap_remove(pos);
        if let Some(moved) = self.ids.get(pos) {
            self.by_id.get_mut(moved).expect("indexes agree").1 = pos;
        }
        true
    }

    /// A random live id, if any.
    pub fn random_id(&mut self) -> Option<Uuid> {
        if self.ids.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..self.ids.len());
        Some(self.ids[i])
    }

    /// A random number in `0.0..1.0` from the table's seeded source.
    pub fn roll(&mut self) -> f64 {
        self.rng.random()
    }

    /// A body for a new, uniquely-domained company, as a user would type it.
    pub fn random_new_company(&mut self) -> Value {
        self.created_serial += 1;
        let n = self.created_serial;
        let tag = self.rng.random_range(0..1_000_000u32);
        json!({
            "name": format!("Newco {n}-{tag}"),
            "domain": format!("newco-{n}-{tag}.example.org"),
            "industry": MUTATOR_INDUSTRIES[self.rng.random_range(0..MUTATOR_INDUSTRIES.len())],
            "employeeCount": self.rng.random_range(1..5000),
            "tags": ["new"],
        })
    }

    /// A patch changing a few fields of an existing company at random.
    pub fn random_patch(&mut self) -> Value {
        let mut m = Map::new();
        let n = self.rng.random_range(0..1_000_000u32);
        if self.rng.random_bool(0.4) {
            m.insert("name".into(), json!(format!("Renamed Company {n}")));
        }
        if self.rng.random_bool(0.4) {
            let i = self.rng.random_range(0..MUTATOR_INDUSTRIES.len());
            m.insert("industry".into(), json!(MUTATOR_INDUSTRIES[i]));
        }
        if self.rng.random_bool(0.4) {
            m.insert(
                "employeeCount".into(),
                json!(self.rng.random_range(1..50_000)),
            );
        }
        if m.is_empty() || self.rng.random_bool(0.3) {
            m.insert("tags".into(), json!([format!("touched-{}", n % 10)]));
        }
        Value::Object(m)
    }
}

const MUTATOR_INDUSTRIES: &[&str] = &[
    "Technology",
    "Retail",
    "Finance",
    "Healthcare",
    "Consulting",
    "Agriculture",
];

fn truncate_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(t.timestamp_millis())
        .single()
        .expect("a valid millisecond timestamp")
}

/// How many seeded companies share one `updatedAt`: they were bulk-imported, and more of
/// them share a timestamp than the largest page holds (a connector must page by offset
/// within a timestamp, not re-ask from the same cursor forever).
pub const SEED_IMPORT_BATCH: usize = 200;

/// The stored record for a seed company.
///
/// `createdAt` is 2024-01-01 plus `index` seconds; `updatedAt` is 2024-06-01 plus one
/// minute per [`SEED_IMPORT_BATCH`] indices. Every third company has an owner. `variant`
/// (0 = as seeded) makes the same company look a little different in different CRMs:
/// for `v > 0`, every 7th company (offset by `v`) has another industry, every 5th a
/// differently formatted phone, every 11th an employee count off by `v`.
pub fn seed_record(seed: u64, c: &SeedCompany, variant: u8) -> Record {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_7a11 ^ (c.index as u64).rotate_left(17));
    let id = uuid::Builder::from_random_bytes(rng.random()).into_uuid();
    let created_at = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap()
        + ChronoDuration::seconds(c.index as i64);
    let updated_at = Utc.with_ymd_and_hms(2024, 6, 1, 0, 0, 0).unwrap()
        + ChronoDuration::minutes((c.index / SEED_IMPORT_BATCH) as i64);
    let mut text: [Option<String>; 12] = Default::default();
    text[DOMAIN] = Some(c.domain.clone());
    text[INDUSTRY] = Some(c.industry.clone());
    text[PHONE] = Some(c.phone.clone());
    text[WEBSITE] = Some(format!("https://{}", c.domain));
    text[CITY] = Some(c.city.clone());
    text[COUNTRY] = Some(c.country.clone());
    let mut employee_count = i32::try_from(c.employee_count).ok();
    if variant > 0 {
        let v = variant as usize;
        if c.index % 7 == v % 7 {
            text[INDUSTRY] = Some(format!("{} Services", c.industry));
        }
        if c.index % 5 == v % 5 {
            // "+1-555-0123" → "+1 (555) 0123": same number, another format.
            text[PHONE] = Some(c.phone.replacen("-", " (", 1).replacen('-', ") ", 1));
        }
        if c.index % 11 == v % 11 {
            employee_count = employee_count.map(|n| n.saturating_add(variant as i32));
        }
    }
    Record {
        id,
        name: c.name.clone(),
        text,
        employee_count,
        annual_revenue: Some(c.annual_revenue),
        tags: c.tags.clone(),
        owner_id: c
            .index
            .is_multiple_of(3)
            .then(|| Uuid::parse_str(SEED_OWNER).expect("valid")),
        created_at,
        updated_at,
    }
}
