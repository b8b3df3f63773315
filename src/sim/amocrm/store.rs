//! The simulated amoCRM account behind the HTTP layer: companies, custom field
//! definitions and tags, with API v4's write rules (validate the whole batch, then store
//! all of it or nothing) and its read shapes. No I/O and no clock: callers pass `now`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value, json};

use crate::sim::common::{SeedCompany, seed_company};

/// The account every record belongs to (`account_id`).
pub(crate) const ACCOUNT_ID: i64 = 28_805_383;
/// The user the API integration acts as (`created_by` / `updated_by` of API writes).
pub(crate) const API_USER_ID: i64 = 504_141;
/// The human who edits companies in the UI (`AmoSim::create/update/delete`).
pub(crate) const UI_USER_ID: i64 = 504_142;
/// Seeded companies get ids from here on, in `seed_indices` order.
const FIRST_COMPANY_ID: i64 = 5_000_000;
/// Seeded companies were created around this instant (Unix seconds, Nov 2023), one
/// index per minute, so seeds never collide with "now" writes.
const SEED_EPOCH: i64 = 1_700_000_000;
/// Most entities a POST or PATCH may carry.
pub(crate) const MAX_BATCH: usize = 250;

/// Stable ids of the account's company custom fields.
pub(crate) mod field_ids {
    pub const PHONE: i64 = 301_101;
    pub const EMAIL: i64 = 301_103;
    pub const WEB: i64 = 301_105;
    pub const ADDRESS: i64 = 301_107;
    pub const DOMAIN: i64 = 452_001;
    pub const INDUSTRY: i64 = 452_003;
    pub const EMPLOYEES: i64 = 452_005;
    pub const ANNUAL_REVENUE: i64 = 452_007;
    pub const CITY: i64 = 452_009;
    pub const COUNTRY: i64 = 452_011;
}

/// Industries the "Industry" select offers; industries met while seeding are appended.
const INDUSTRY_CHOICES: &[&str] = &[
    "Technology",
    "Manufacturing",
    "Retail",
    "Finance",
    "Healthcare",
    "Energy",
    "Education",
    "Logistics",
    "Media",
    "Hospitality",
];

/// amoCRM custom field types the simulator implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldKind {
    Text,
    Textarea,
    Url,
    Multitext,
    Select,
    Numeric,
}

impl FieldKind {
    fn wire(self) -> &'static str {
        match self {
            FieldKind::Text => "text",
            FieldKind::Textarea => "textarea",
            FieldKind::Url => "url",
            FieldKind::Multitext => "multitext",
            FieldKind::Select => "select",
            FieldKind::Numeric => "numeric",
        }
    }
}

/// One choice of a select or multitext field.
#[derive(Debug, Clone)]
pub(crate) struct EnumDef {
    id: i64,
    value: String,
    sort: i64,
}

/// One custom field definition of the account.
#[derive(Debug, Clone)]
pub(crate) struct FieldDef {
    id: i64,
    name: String,
    /// Only the standard fields (PHONE, EMAIL, WEB, ADDRESS) have a code.
    code: Option<&'static str>,
    kind: FieldKind,
    sort: i64,
    enums: Vec<EnumDef>,
}

impl FieldDef {
    fn enum_by_id(&self, id: i64) -> Option<&EnumDef> {
        self.enums.iter().find(|e| e.id == id)
    }

    fn enum_by_value(&self, value: &str) -> Option<&EnumDef> {
        self.enums.iter().find(|e| e.value == value)
    }
}

/// One stored custom field value. Values are kept as the text that was written, so a
/// numeric "1234.50" keeps its scale.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredValue {
    value: String,
    enum_id: Option<i64>,
}

/// One live company.
#[derive(Debug, Clone)]
pub(crate) struct Company {
    id: i64,
    name: String,
    responsible_user_id: i64,
    created_by: i64,
    updated_by: i64,
    created_at: i64,
    updated_at: i64,
    /// Custom field values by field id; a field without values is absent.
    cf: BTreeMap<i64, Vec<StoredValue>>,
    /// Tag ids in the order they were attached.
    tags: Vec<i64>,
}

/// What is left of a company deleted in the UI.
#[derive(Debug, Clone)]
struct Tombstone {
    updated_at: i64,
    updated_by: i64,
}

/// One validation failure, as amoCRM lists it under `validation-errors[].errors`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FieldError {
    pub code: &'static str,
    pub path: String,
    pub detail: String,
}

impl FieldError {
    fn new(code: &'static str, path: impl Into<String>, detail: impl Into<String>) -> Self {
        FieldError {
            code,
            path: path.into(),
            detail: detail.into(),
        }
    }

    fn invalid_type(path: impl Into<String>, ty: &str) -> Self {
        FieldError::new(
            "InvalidType",
            path,
            format!("This value should be of type {ty}."),
        )
    }

    fn choice(path: impl Into<String>) -> Self {
        FieldError::new(
            "NotSupportedChoice",
            path,
            "The value you selected is not a valid choice.",
        )
    }
}

/// All failures of one entity of a batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EntityErrors {
    pub request_id: String,
    pub errors: Vec<FieldError>,
}

impl EntityErrors {
    /// The `validation-errors` array of a 400 answer.
    pub(crate) fn to_json(list: &[EntityErrors]) -> Value {
        Value::Array(
            list.iter()
                .map(|e| {
                    json!({
                        "request_id": e.request_id,
                        "errors": e.errors.iter().map(|f| json!({
                            "code": f.code, "path": f.path, "detail": f.detail,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        )
    }
}

/// Whether a write creates or updates, and who makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteKind {
    /// `POST /api/v4/companies`.
    ApiCreate,
    /// `PATCH /api/v4/companies[/{id}]`.
    ApiUpdate,
    /// A human in the UI creating a company.
    UiCreate,
    /// A human in the UI editing a company.
    UiUpdate,
}

impl WriteKind {
    fn is_update(self) -> bool {
        matches!(self, WriteKind::ApiUpdate | WriteKind::UiUpdate)
    }

    fn actor(self) -> i64 {
        match self {
            WriteKind::ApiCreate | WriteKind::ApiUpdate => API_USER_ID,
            WriteKind::UiCreate | WriteKind::UiUpdate => UI_USER_ID,
        }
    }
}

/// A tag named in a write, by id or by name.
#[derive(Debug, Clone)]
enum TagRef {
    Id(i64),
    Name(String),
}

/// What a write does to one custom field.
#[derive(Debug, Clone)]
enum CfOp {
    Clear,
    Set(Vec<StoredValue>),
}

/// One validated entity of a write batch, ready to apply.
#[derive(Debug, Clone)]
struct Change {
    id: Option<i64>,
    request_id: String,
    name: Option<String>,
    responsible_user_id: Option<i64>,
    created_at: Option<i64>,
    updated_at: Option<i64>,
    cf: Vec<(i64, CfOp)>,
    tags_replace: Option<Vec<TagRef>>,
    tags_add: Vec<TagRef>,
    tags_delete: Vec<TagRef>,
}

/// The answer of one applied entity: its id, its request id and its new `updated_at`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Written {
    pub id: i64,
    pub request_id: String,
    pub name: String,
    pub updated_at: i64,
}

/// Sort key of a list request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OrderKey {
    Id,
    UpdatedAt,
    CreatedAt,
}

/// A parsed `GET /api/v4/companies` request.
#[derive(Debug, Clone)]
pub(crate) struct ListQuery {
    pub page: usize,
    pub limit: usize,
    pub order: OrderKey,
    pub desc: bool,
    pub ids: Option<BTreeSet<i64>>,
    /// Inclusive `updated_at` bounds.
    pub updated: Option<(i64, i64)>,
    pub query: Option<String>,
    pub only_deleted: bool,
    pub with: Vec<String>,
}

/// The whole account.
#[derive(Debug)]
pub(crate) struct Account {
    base_url: String,
    fields: Vec<FieldDef>,
    live: BTreeMap<i64, Company>,
    deleted: BTreeMap<i64, Tombstone>,
    /// `(updated_at, id)` of every live company, for `order[updated_at]` and the filter.
    by_updated: BTreeSet<(i64, i64)>,
    /// `(created_at, id)` of every live company, for `order[created_at]`.
    by_created: BTreeSet<(i64, i64)>,
    tag_by_name: HashMap<String, i64>,
    tag_names: BTreeMap<i64, String>,
    next_id: i64,
    next_tag_id: i64,
}

fn standard_fields() -> Vec<FieldDef> {
    let en = |base: i64, values: &[&str]| -> Vec<EnumDef> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| EnumDef {
                id: base + i as i64,
                value: (*v).to_string(),
                sort: 2 * (i as i64 + 1),
            })
            .collect()
    };
    let def = |id, name: &str, code, kind, sort, enums| FieldDef {
        id,
        name: name.to_string(),
        code,
        kind,
        sort,
        enums,
    };
    use field_ids::*;
    vec![
        def(
            PHONE,
            "Phone",
            Some("PHONE"),
            FieldKind::Multitext,
            4,
            en(640_101, &["WORK", "WORKDD", "MOB", "FAX", "HOME", "OTHER"]),
        ),
        def(
            EMAIL,
            "Email",
            Some("EMAIL"),
            FieldKind::Multitext,
            6,
            en(640_201, &["WORK", "PRIV", "OTHER"]),
        ),
        def(WEB, "Web", Some("WEB"), FieldKind::Url, 8, vec![]),
        def(
            ADDRESS,
            "Address",
            Some("ADDRESS"),
            FieldKind::Textarea,
            10,
            vec![],
        ),
        def(DOMAIN, "Domain", None, FieldKind::Text, 502, vec![]),
        def(
            INDUSTRY,
            "Industry",
            None,
            FieldKind::Select,
            504,
            en(640_301, INDUSTRY_CHOICES),
        ),
        def(
            EMPLOYEES,
            "Employees",
            None,
            FieldKind::Numeric,
            506,
            vec![],
        ),
        def(
            ANNUAL_REVENUE,
            "Annual revenue",
            None,
            FieldKind::Numeric,
            508,
            vec![],
        ),
        def(CITY, "City", None, FieldKind::Text, 510, vec![]),
        def(COUNTRY, "Country", None, FieldKind::Text, 512, vec![]),
    ]
}

/// Whether `s` is a decimal number as amoCRM's numeric fields accept it.
fn is_numeric_text(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    !(int.is_empty() && frac.is_empty())
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && !s.ends_with('.')
}

fn as_int(v: &Value) -> Option<i64> {
    v.as_i64()
}

impl Account {
    /// An account seeded with `seed_company(seed, i)` for every `i` of `indices`, with
    /// `variant` perturbing a few values deterministically.
    pub(crate) fn new(base_url: String, seed: u64, indices: &[usize], variant: u8) -> Self {
        let mut acc = Account {
            base_url,
            fields: standard_fields(),
            live: BTreeMap::new(),
            deleted: BTreeMap::new(),
            by_updated: BTreeSet::new(),
            by_created: BTreeSet::new(),
            tag_by_name: HashMap::new(),
            tag_names: BTreeMap::new(),
            next_id: FIRST_COMPANY_ID,
            next_tag_id: 90_001,
        };
        for &index in indices {
            let s = seed_company(seed, index);
            let created_at = SEED_EPOCH + index as i64 * 60;
            let updated_at = created_at + (index as i64 * 7_919) % 86_400;
            let id = acc.next_id;
            acc.next_id += 1;
            let mut c = acc.company_from_seed(id, &s, variant);
            c.created_at = created_at;
            c.updated_at = updated_at;
            acc.put(c);
        }
        acc
    }

    /// A company carrying the seed's data (ids and timestamps left for the caller).
    fn company_from_seed(&mut self, id: i64, s: &SeedCompany, variant: u8) -> Company {
        use field_ids::*;
        let mut employees = s.employee_count;
        let mut city = s.city.clone();
        let mut tags = s.tags.clone();
        // A variant models "the same companies, edited a little differently in amoCRM".
        if variant > 0 {
            match (s.index * 31 + variant as usize * 17) % 10 {
                0 => employees += variant as i64,
                1 => city = format!("{city} (HQ)"),
                2 => tags.push(format!("amo-v{variant}")),
                _ => {}
            }
        }
        let industry = self.industry_enum(&s.industry);
        let text = |v: String| {
            vec![StoredValue {
                value: v,
                enum_id: None,
            }]
        };
        let mut cf = BTreeMap::new();
        cf.insert(
            PHONE,
            vec![StoredValue {
                value: s.phone.clone(),
                enum_id: Some(640_101),
            }],
        );
        cf.insert(WEB, text(format!("https://{}", s.domain)));
        cf.insert(DOMAIN, text(s.domain.clone()));
        cf.insert(
            INDUSTRY,
            vec![StoredValue {
                value: s.industry.clone(),
                enum_id: Some(industry),
            }],
        );
        cf.insert(EMPLOYEES, text(employees.to_string()));
        cf.insert(ANNUAL_REVENUE, text(s.annual_revenue.to_string()));
        cf.insert(CITY, text(city));
        cf.insert(COUNTRY, text(s.country.clone()));
        let tags = tags.iter().map(|t| self.tag_id(t)).collect();
        Company {
            id,
            name: s.name.clone(),
            responsible_user_id: UI_USER_ID,
            created_by: UI_USER_ID,
            updated_by: UI_USER_ID,
            created_at: 0,
            updated_at: 0,
            cf,
            tags,
        }
    }

    /// The enum id of `industry` in the Industry select, adding the choice if new.
    fn industry_enum(&mut self, industry: &str) -> i64 {
        let field = self
            .fields
            .iter_mut()
            .find(|f| f.id == field_ids::INDUSTRY)
            .expect("Industry field is defined");
        if let Some(e) = field.enum_by_value(industry) {
            return e.id;
        }
        let id = field.enums.iter().map(|e| e.id).max().unwrap_or(640_300) + 1;
        let sort = field.enums.len() as i64 * 2 + 2;
        field.enums.push(EnumDef {
            id,
            value: industry.to_string(),
            sort,
        });
        id
    }

    /// The id of tag `name`, creating the tag if new: ids are stable per name.
    fn tag_id(&mut self, name: &str) -> i64 {
        if let Some(id) = self.tag_by_name.get(name) {
            return *id;
        }
        let id = self.next_tag_id;
        self.next_tag_id += 1;
        self.tag_by_name.insert(name.to_string(), id);
        self.tag_names.insert(id, name.to_string());
        id
    }

    /// Stores `c`, keeping the order indexes in step.
    fn put(&mut self, c: Company) {
        if let Some(old) = self.live.get(&c.id) {
            self.by_updated.remove(&(old.updated_at, old.id));
            self.by_created.remove(&(old.created_at, old.id));
        }
        self.by_updated.insert((c.updated_at, c.id));
        self.by_created.insert((c.created_at, c.id));
        self.live.insert(c.id, c);
    }

    /// Number of live companies.
    pub(crate) fn len(&self) -> usize {
        self.live.len()
    }

    /// Ids of live companies, ascending.
    pub(crate) fn live_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.live.keys().copied()
    }

    /// The id of the `n`-th live company (ascending ids).
    pub(crate) fn nth_id(&self, n: usize) -> Option<i64> {
        self.live.keys().nth(n).copied()
    }

    /// A field definition by id.
    fn field(&self, id: i64) -> Option<&FieldDef> {
        self.fields.iter().find(|f| f.id == id)
    }

    /// Validates one entity of a write batch.
    fn parse_entity(
        &self,
        index: usize,
        v: &Value,
        kind: WriteKind,
        path_id: Option<i64>,
    ) -> Result<Change, EntityErrors> {
        let request_id = match v.get("request_id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => index.to_string(),
        };
        let mut errs = Vec::new();
        let mut ch = Change {
            id: None,
            request_id: request_id.clone(),
            name: None,
            responsible_user_id: None,
            created_at: None,
            updated_at: None,
            cf: Vec::new(),
            tags_replace: None,
            tags_add: Vec::new(),
            tags_delete: Vec::new(),
        };
        let Some(obj) = v.as_object() else {
            return Err(EntityErrors {
                request_id,
                errors: vec![FieldError::invalid_type("", "object")],
            });
        };
        if kind.is_update() {
            let id = match path_id {
                Some(id) => Some(id),
                None => match obj.get("id") {
                    None | Some(Value::Null) => {
                        errs.push(FieldError::new(
                            "NotBlank",
                            "id",
                            "This value should not be blank.",
                        ));
                        None
                    }
                    Some(x) => match as_int(x) {
                        Some(id) => Some(id),
                        None => {
                            errs.push(FieldError::invalid_type("id", "int"));
                            None
                        }
                    },
                },
            };
            if let Some(id) = id {
                if self.live.contains_key(&id) {
                    ch.id = Some(id);
                } else {
                    errs.push(FieldError::new(
                        "NotFound",
                        "id",
                        format!("Company {id} not found."),
                    ));
                }
            }
            if kind == WriteKind::ApiUpdate {
                // The notes: sending back read-only fields has caused validation errors.
                for ro in ["created_by", "updated_by"] {
                    if obj.contains_key(ro) {
                        errs.push(FieldError::new(
                            "ReadOnly",
                            ro,
                            "This field is read-only and cannot be updated.",
                        ));
                    }
                }
            }
        }
        if let Some(n) = obj.get("name") {
            match n {
                Value::String(s) => ch.name = Some(s.clone()),
                _ => errs.push(FieldError::invalid_type("name", "string")),
            }
        }
        for (key, slot) in [
            ("responsible_user_id", &mut ch.responsible_user_id),
            ("created_at", &mut ch.created_at),
            ("updated_at", &mut ch.updated_at),
        ] {
            if let Some(x) = obj.get(key) {
                match as_int(x) {
                    Some(i) => *slot = Some(i),
                    None => errs.push(FieldError::invalid_type(key, "int")),
                }
            }
        }
        if !kind.is_update() {
            for key in ["created_by", "updated_by"] {
                if let Some(x) = obj.get(key)
                    && as_int(x).is_none()
                {
                    errs.push(FieldError::invalid_type(key, "int"));
                }
            }
        }
        match obj.get("custom_fields_values") {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                for (i, entry) in list.iter().enumerate() {
                    match self.parse_cf(i, entry) {
                        Ok(Some(op)) => ch.cf.push(op),
                        Ok(None) => {}
                        Err(e) => errs.extend(e),
                    }
                }
            }
            Some(_) => errs.push(FieldError::invalid_type("custom_fields_values", "array")),
        }
        match obj.get("_embedded") {
            None | Some(Value::Null) => {}
            Some(Value::Object(emb)) => {
                if let Some(t) = emb.get("tags") {
                    match t {
                        Value::Null => ch.tags_replace = Some(Vec::new()),
                        _ => {
                            ch.tags_replace = Some(self.parse_tags("_embedded.tags", t, &mut errs))
                        }
                    }
                }
            }
            Some(_) => errs.push(FieldError::invalid_type("_embedded", "object")),
        }
        if let Some(t) = obj.get("tags_to_add") {
            ch.tags_add = self.parse_tags("tags_to_add", t, &mut errs);
        }
        if let Some(t) = obj.get("tags_to_delete") {
            ch.tags_delete = self.parse_tags("tags_to_delete", t, &mut errs);
        }
        if errs.is_empty() {
            Ok(ch)
        } else {
            Err(EntityErrors {
                request_id,
                errors: errs,
            })
        }
    }

    fn parse_tags(&self, path: &str, v: &Value, errs: &mut Vec<FieldError>) -> Vec<TagRef> {
        let Some(list) = v.as_array() else {
            errs.push(FieldError::invalid_type(path, "array"));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, t) in list.iter().enumerate() {
            let p = format!("{path}.{k}");
            let Some(o) = t.as_object() else {
                errs.push(FieldError::invalid_type(p, "object"));
                continue;
            };
            match (o.get("id").filter(|x| !x.is_null()), o.get("name")) {
                (Some(id), _) => match as_int(id) {
                    Some(id) if self.tag_names.contains_key(&id) => out.push(TagRef::Id(id)),
                    Some(id) => errs.push(FieldError::new(
                        "NotFound",
                        format!("{p}.id"),
                        format!("Tag {id} not found."),
                    )),
                    None => errs.push(FieldError::invalid_type(format!("{p}.id"), "int")),
                },
                (None, Some(Value::String(n))) if !n.trim().is_empty() => {
                    out.push(TagRef::Name(n.trim().to_string()))
                }
                (None, Some(Value::String(_))) => errs.push(FieldError::new(
                    "NotBlank",
                    format!("{p}.name"),
                    "This value should not be blank.",
                )),
                (None, _) => errs.push(FieldError::invalid_type(format!("{p}.name"), "string")),
            }
        }
        out
    }

    /// Validates one `custom_fields_values` entry. `Ok(None)`: the entry changes nothing
    /// (only empty strings: amoCRM does not clear a field for them).
    fn parse_cf(&self, i: usize, entry: &Value) -> Result<Option<(i64, CfOp)>, Vec<FieldError>> {
        let base = format!("custom_fields_values.{i}");
        let Some(o) = entry.as_object() else {
            return Err(vec![FieldError::invalid_type(base, "object")]);
        };
        let field = match (
            o.get("field_id").filter(|x| !x.is_null()),
            o.get("field_code"),
        ) {
            (Some(id), _) => match as_int(id) {
                Some(id) => self
                    .field(id)
                    .ok_or_else(|| vec![FieldError::choice(format!("{base}.field_id"))])?,
                None => {
                    return Err(vec![FieldError::invalid_type(
                        format!("{base}.field_id"),
                        "int",
                    )]);
                }
            },
            (None, Some(Value::String(code))) => self
                .fields
                .iter()
                .find(|f| f.code.is_some_and(|c| c.eq_ignore_ascii_case(code)))
                .ok_or_else(|| vec![FieldError::choice(format!("{base}.field_code"))])?,
            (None, _) => {
                return Err(vec![FieldError::new(
                    "NotBlank",
                    format!("{base}.field_id"),
                    "Either field_id or field_code is required.",
                )]);
            }
        };
        let values = match o.get("values") {
            Some(Value::Null) => return Ok(Some((field.id, CfOp::Clear))),
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(vec![FieldError::invalid_type(
                    format!("{base}.values"),
                    "array",
                )]);
            }
            None => {
                return Err(vec![FieldError::new(
                    "NotBlank",
                    format!("{base}.values"),
                    "This value should not be blank.",
                )]);
            }
        };
        let mut errs = Vec::new();
        let mut out = Vec::new();
        for (j, val) in values.iter().enumerate() {
            let vp = format!("{base}.values.{j}");
            let Some(vo) = val.as_object() else {
                errs.push(FieldError::invalid_type(vp, "object"));
                continue;
            };
            match self.parse_value(field, &vp, vo) {
                Ok(Some(sv)) => out.push(sv),
                Ok(None) => {}
                Err(e) => errs.push(e),
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        if out.is_empty() {
            return Ok(None);
        }
        if field.kind != FieldKind::Multitext {
            // Single-valued fields keep the first value only.
            out.truncate(1);
        }
        Ok(Some((field.id, CfOp::Set(out))))
    }

    /// Validates one value of a field; `Ok(None)` for an empty string.
    fn parse_value(
        &self,
        field: &FieldDef,
        vp: &str,
        vo: &Map<String, Value>,
    ) -> Result<Option<StoredValue>, FieldError> {
        let text = match vo.get("value") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(Value::Bool(_)) | Some(Value::Array(_)) | Some(Value::Object(_)) => {
                let ty = if field.kind == FieldKind::Numeric {
                    "numeric"
                } else {
                    "string"
                };
                return Err(FieldError::invalid_type(format!("{vp}.value"), ty));
            }
            None | Some(Value::Null) => None,
        };
        match field.kind {
            FieldKind::Select => {
                let by_id = vo.get("enum_id").filter(|x| !x.is_null());
                let e = if let Some(id) = by_id {
                    let id = as_int(id)
                        .ok_or_else(|| FieldError::invalid_type(format!("{vp}.enum_id"), "int"))?;
                    field
                        .enum_by_id(id)
                        .ok_or_else(|| FieldError::choice(format!("{vp}.enum_id")))?
                } else {
                    match text.as_deref() {
                        Some("") | None => return Ok(None),
                        Some(t) => field
                            .enum_by_value(t)
                            .ok_or_else(|| FieldError::choice(format!("{vp}.value")))?,
                    }
                };
                Ok(Some(StoredValue {
                    value: e.value.clone(),
                    enum_id: Some(e.id),
                }))
            }
            FieldKind::Multitext => {
                let Some(t) = text.filter(|t| !t.is_empty()) else {
                    return Ok(None);
                };
                let code = vo
                    .get("enum_code")
                    .or_else(|| vo.get("enum"))
                    .filter(|x| !x.is_null());
                let e = match (vo.get("enum_id").filter(|x| !x.is_null()), code) {
                    (Some(id), _) => {
                        let id = as_int(id).ok_or_else(|| {
                            FieldError::invalid_type(format!("{vp}.enum_id"), "int")
                        })?;
                        field
                            .enum_by_id(id)
                            .ok_or_else(|| FieldError::choice(format!("{vp}.enum_id")))?
                    }
                    (None, Some(Value::String(c))) => field
                        .enum_by_value(c)
                        .ok_or_else(|| FieldError::choice(format!("{vp}.enum_code")))?,
                    (None, Some(_)) => {
                        return Err(FieldError::invalid_type(
                            format!("{vp}.enum_code"),
                            "string",
                        ));
                    }
                    (None, None) => &field.enums[0],
                };
                Ok(Some(StoredValue {
                    value: t,
                    enum_id: Some(e.id),
                }))
            }
            FieldKind::Numeric => match text {
                None => Ok(None),
                Some(t) if t.is_empty() => Ok(None),
                Some(t) if is_numeric_text(t.trim()) => Ok(Some(StoredValue {
                    value: t.trim().to_string(),
                    enum_id: None,
                })),
                Some(_) => Err(FieldError::invalid_type(format!("{vp}.value"), "numeric")),
            },
            FieldKind::Text | FieldKind::Textarea | FieldKind::Url => match text {
                None => Ok(None),
                Some(t) if t.is_empty() => Ok(None),
                Some(t) => Ok(Some(StoredValue {
                    value: t,
                    enum_id: None,
                })),
            },
        }
    }

    /// Validates a whole batch, then applies all of it at `now`, or nothing.
    /// `path_id` is the id of `PATCH /companies/{id}` (the batch then has one entity).
    pub(crate) fn write(
        &mut self,
        batch: &[Value],
        kind: WriteKind,
        path_id: Option<i64>,
        now: i64,
    ) -> Result<Vec<Written>, Vec<EntityErrors>> {
        let mut changes = Vec::with_capacity(batch.len());
        let mut errors = Vec::new();
        for (i, v) in batch.iter().enumerate() {
            match self.parse_entity(i, v, kind, path_id) {
                Ok(c) => changes.push(c),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(changes
            .into_iter()
            .map(|c| self.apply(c, kind, now))
            .collect())
    }

    fn resolve_tag(&mut self, t: &TagRef) -> i64 {
        match t {
            TagRef::Id(id) => *id,
            TagRef::Name(n) => self.tag_id(n),
        }
    }

    fn apply(&mut self, ch: Change, kind: WriteKind, now: i64) -> Written {
        let mut c = match ch.id {
            Some(id) => self.live[&id].clone(),
            None => {
                let id = self.next_id;
                self.next_id += 1;
                Company {
                    id,
                    name: String::new(),
                    responsible_user_id: kind.actor(),
                    created_by: kind.actor(),
                    updated_by: kind.actor(),
                    created_at: ch.created_at.unwrap_or(now),
                    // Imports may backdate a new record; updates always stamp "now".
                    updated_at: ch.updated_at.unwrap_or(now),
                    cf: BTreeMap::new(),
                    tags: Vec::new(),
                }
            }
        };
        if ch.id.is_some() {
            c.updated_at = now;
            c.updated_by = kind.actor();
        }
        if let Some(n) = ch.name {
            c.name = n;
        }
        if let Some(r) = ch.responsible_user_id {
            c.responsible_user_id = r;
        }
        for (fid, op) in ch.cf {
            match op {
                CfOp::Clear => {
                    c.cf.remove(&fid);
                }
                CfOp::Set(v) => {
                    c.cf.insert(fid, v);
                }
            }
        }
        if let Some(tags) = ch.tags_replace {
            c.tags.clear();
            for t in &tags {
                let id = self.resolve_tag(t);
                if !c.tags.contains(&id) {
                    c.tags.push(id);
                }
            }
        }
        for t in &ch.tags_add {
            let id = self.resolve_tag(t);
            if !c.tags.contains(&id) {
                c.tags.push(id);
            }
        }
        for t in &ch.tags_delete {
            let id = match t {
                TagRef::Id(id) => Some(*id),
                TagRef::Name(n) => self.tag_by_name.get(n).copied(),
            };
            if let Some(id) = id {
                c.tags.retain(|x| *x != id);
            }
        }
        let w = Written {
            id: c.id,
            request_id: ch.request_id,
            name: c.name.clone(),
            updated_at: c.updated_at,
        };
        self.put(c);
        w
    }

    /// Deletes a company as the UI does; false when it is not live.
    pub(crate) fn delete(&mut self, id: i64, now: i64) -> bool {
        let Some(c) = self.live.remove(&id) else {
            return false;
        };
        self.by_updated.remove(&(c.updated_at, c.id));
        self.by_created.remove(&(c.created_at, c.id));
        self.deleted.insert(
            id,
            Tombstone {
                updated_at: now,
                updated_by: UI_USER_ID,
            },
        );
        true
    }

    /// Creates `n` companies from seed data, all stamped with the same second `now`.
    pub(crate) fn import_seeds(
        &mut self,
        seed: u64,
        first_index: usize,
        n: usize,
        now: i64,
    ) -> Vec<i64> {
        (0..n)
            .map(|k| {
                let s = seed_company(seed, first_index + k);
                let id = self.next_id;
                self.next_id += 1;
                let mut c = self.company_from_seed(id, &s, 0);
                c.created_at = now;
                c.updated_at = now;
                self.put(c);
                id
            })
            .collect()
    }

    fn href(&self, id: i64) -> String {
        format!("{}/api/v4/companies/{id}", self.base_url)
    }

    /// A live company as `GET /api/v4/companies/{id}` shows it.
    pub(crate) fn render(&self, id: i64, with: &[String]) -> Option<Value> {
        let c = self.live.get(&id)?;
        let cf = if c.cf.is_empty() {
            Value::Null
        } else {
            Value::Array(
                c.cf.iter()
                    .filter_map(|(fid, vals)| Some(self.render_cf(c.id, self.field(*fid)?, vals)))
                    .collect(),
            )
        };
        let tags: Vec<Value> = c
            .tags
            .iter()
            .map(|t| json!({"id": t, "name": self.tag_names[t], "color": null}))
            .collect();
        let mut embedded = Map::new();
        embedded.insert("tags".into(), Value::Array(tags));
        for w in with {
            if matches!(
                w.as_str(),
                "contacts" | "leads" | "customers" | "catalog_elements"
            ) {
                embedded.insert(w.clone(), json!([]));
            }
        }
        Some(json!({
            "id": c.id,
            "name": c.name,
            "responsible_user_id": c.responsible_user_id,
            "group_id": 0,
            "created_by": c.created_by,
            "updated_by": c.updated_by,
            "created_at": c.created_at,
            "updated_at": c.updated_at,
            "closest_task_at": null,
            "custom_fields_values": cf,
            "account_id": ACCOUNT_ID,
            "_links": {"self": {"href": self.href(c.id)}},
            "_embedded": embedded,
        }))
    }

    fn render_cf(&self, company_id: i64, f: &FieldDef, vals: &[StoredValue]) -> Value {
        // Both spellings of the multitext code occur in the wild; alternate per record.
        let code_key = if company_id % 2 == 0 {
            "enum_code"
        } else {
            "enum"
        };
        let values: Vec<Value> = vals
            .iter()
            .map(|v| {
                let mut m = Map::new();
                m.insert("value".into(), Value::String(v.value.clone()));
                if let Some(eid) = v.enum_id {
                    m.insert("enum_id".into(), json!(eid));
                    if f.kind == FieldKind::Multitext
                        && let Some(e) = f.enum_by_id(eid)
                    {
                        m.insert(code_key.into(), Value::String(e.value.clone()));
                    }
                }
                Value::Object(m)
            })
            .collect();
        json!({
            "field_id": f.id,
            "field_name": f.name,
            "field_code": f.code,
            "field_type": f.kind.wire(),
            "values": values,
        })
    }

    fn render_deleted(&self, id: i64, t: &Tombstone) -> Value {
        json!({
            "id": id,
            "name": null,
            "responsible_user_id": null,
            "group_id": null,
            "created_by": null,
            "updated_by": t.updated_by,
            "created_at": null,
            "updated_at": t.updated_at,
            "closest_task_at": null,
            "is_deleted": true,
            "custom_fields_values": null,
            "account_id": ACCOUNT_ID,
            "_links": {"self": {"href": self.href(id)}},
            "_embedded": {"tags": []},
        })
    }

    fn matches_query(&self, c: &Company, q: &str) -> bool {
        c.name.to_lowercase().contains(q)
            || c.cf
                .values()
                .flatten()
                .any(|v| v.value.to_lowercase().contains(q))
    }

    /// One page of `GET /api/v4/companies`.
    pub(crate) fn list(&self, q: &ListQuery) -> Vec<Value> {
        let skip = (q.page.max(1) - 1).saturating_mul(q.limit);
        if q.only_deleted {
            let mut rows: Vec<(i64, i64)> = self
                .deleted
                .iter()
                .filter(|(id, t)| {
                    q.ids.as_ref().is_none_or(|s| s.contains(id))
                        && q.updated
                            .is_none_or(|(a, b)| (a..=b).contains(&t.updated_at))
                })
                .map(|(id, t)| match q.order {
                    OrderKey::UpdatedAt => (t.updated_at, *id),
                    _ => (*id, *id),
                })
                .collect();
            rows.sort_unstable();
            if q.desc {
                rows.reverse();
            }
            return rows
                .into_iter()
                .skip(skip)
                .take(q.limit)
                .map(|(_, id)| self.render_deleted(id, &self.deleted[&id]))
                .collect();
        }
        let (from, to) = q.updated.unwrap_or((i64::MIN, i64::MAX));
        if from > to {
            return Vec::new();
        }
        let in_window = || {
            self.by_updated
                .range((from, i64::MIN)..=(to, i64::MAX))
                .map(|(_, id)| *id)
        };
        // Walk the index that already enforces the most conditions, so that deep pages
        // of 100k companies skip over ids without looking records up.
        let ordered: Box<dyn DoubleEndedIterator<Item = i64> + '_> = match (q.order, &q.ids) {
            (OrderKey::UpdatedAt, _) => Box::new(in_window()),
            (OrderKey::Id, Some(set)) => Box::new(set.iter().copied()),
            (OrderKey::Id, None) if q.updated.is_some() => {
                let mut v: Vec<i64> = in_window().collect();
                v.sort_unstable();
                Box::new(v.into_iter())
            }
            (OrderKey::Id, None) => Box::new(self.live.keys().copied()),
            (OrderKey::CreatedAt, _) => Box::new(self.by_created.iter().map(|(_, id)| *id)),
        };
        let ordered: Box<dyn Iterator<Item = i64> + '_> = if q.desc {
            Box::new(ordered.rev())
        } else {
            ordered
        };
        let walked_window =
            q.order == OrderKey::UpdatedAt || (q.order == OrderKey::Id && q.ids.is_none());
        let check_window = q.updated.is_some() && !walked_window;
        let check_ids = q.order != OrderKey::Id;
        // Ids named by filter[id] need not exist.
        let check_live = q.order == OrderKey::Id && q.ids.is_some();
        let needle = q.query.as_ref().map(|s| s.to_lowercase());
        let look_up = check_window || check_live || needle.is_some();
        ordered
            .filter(|id| !check_ids || q.ids.as_ref().is_none_or(|s| s.contains(id)))
            .filter(|id| {
                if !look_up {
                    return true;
                }
                self.live.get(id).is_some_and(|c| {
                    (!check_window || (from..=to).contains(&c.updated_at))
                        && needle.as_deref().is_none_or(|n| self.matches_query(c, n))
                })
            })
            .skip(skip)
            .take(q.limit)
            .filter_map(|id| self.render(id, &q.with))
            .collect()
    }

    /// The custom field definitions as `GET /api/v4/companies/custom_fields` lists them.
    pub(crate) fn render_fields(&self) -> Vec<Value> {
        self.fields
            .iter()
            .map(|f| {
                let enums = if f.enums.is_empty() {
                    Value::Null
                } else {
                    Value::Array(
                        f.enums
                            .iter()
                            .map(|e| json!({"id": e.id, "value": e.value, "sort": e.sort}))
                            .collect(),
                    )
                };
                json!({
                    "id": f.id,
                    "name": f.name,
                    "type": f.kind.wire(),
                    "account_id": ACCOUNT_ID,
                    "code": f.code,
                    "sort": f.sort,
                    "is_api_only": false,
                    "enums": enums,
                    "group_id": null,
                    "required_statuses": [],
                    "is_deletable": f.code.is_none(),
                    "is_predefined": f.code.is_some(),
                    "entity_type": "companies",
                    "remind": null,
                    "_links": {"self": {"href": format!(
                        "{}/api/v4/companies/custom_fields/{}", self.base_url, f.id)}},
                })
            })
            .collect()
    }
}
