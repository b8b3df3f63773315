//! amoCRM's JSON as the connector reads it: the custom field catalogue, and companies
//! flattened into the flat vendor keys of `mapping::defaults` (`name`,
//! `responsible_user_id`, `tags`, `cf.id.*`, `cf.code.*`, `cf.name.*`).
//!
//! Everything is picked from `serde_json::Value` by hand: the crate runs serde_json with
//! `arbitrary_precision`, and numeric custom field values must reach the mapping exactly
//! as the vendor wrote them (amoCRM returns them as strings such as `"1234567.50"`).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::connector::{MalformedRecord, VendorRecord};
use crate::mapping::defaults::{AMO_CF_CODE, AMO_CF_ID, AMO_CF_NAME};

/// One choice of a select, radio or multitext field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnumChoice {
    /// The enum id (`enum_id` on values).
    pub id: i64,
    /// The text (`WORK` for multitext, the option label for selects).
    pub value: String,
}

/// One company custom field of the account (`GET /api/v4/companies/custom_fields`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomField {
    /// `id`.
    pub id: i64,
    /// `name`, as shown in the UI.
    pub name: String,
    /// `code` (only the standard fields `PHONE`, `EMAIL`, `WEB`, `ADDRESS` have one).
    pub code: Option<String>,
    /// `type`: `text`, `numeric`, `multitext`, `select`, `url`, `textarea` …
    pub kind: String,
    /// `enums`, for fields with choices.
    pub enums: Vec<EnumChoice>,
}

impl CustomField {
    /// Parses one catalogue entry; `None` when it has no integer id.
    pub fn from_json(v: &Value) -> Option<CustomField> {
        let id = v.get("id")?.as_i64()?;
        let enums = v
            .get("enums")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|e| {
                        Some(EnumChoice {
                            id: e.get("id")?.as_i64()?,
                            value: e.get("value")?.as_str()?.to_string(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(CustomField {
            id,
            name: v
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            code: v
                .get("code")
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
                .map(str::to_string),
            kind: v
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("text")
                .to_string(),
            enums,
        })
    }

    /// The flat keys this field is read under: `cf.id.<id>`, `cf.code.<CODE>` (when it
    /// has a code) and `cf.name.<name>`.
    pub fn keys(&self) -> Vec<String> {
        flat_keys(self.id, self.code.as_deref(), Some(&self.name))
    }

    /// Whether values of this field carry an enum code (`WORK`, `MOB` …).
    pub fn is_multitext(&self) -> bool {
        self.kind == "multitext"
    }

    /// Whether values of this field are picked from `enums` by id.
    pub fn is_choice(&self) -> bool {
        matches!(self.kind.as_str(), "select" | "radiobutton" | "multiselect")
    }

    /// Whether the field holds a number.
    pub fn is_numeric(&self) -> bool {
        matches!(self.kind.as_str(), "numeric" | "price" | "monetary")
    }
}

fn flat_keys(id: i64, code: Option<&str>, name: Option<&str>) -> Vec<String> {
    let mut keys = vec![format!("{AMO_CF_ID}{id}")];
    if let Some(c) = code.filter(|c| !c.is_empty()) {
        keys.push(format!("{AMO_CF_CODE}{c}"));
    }
    if let Some(n) = name.filter(|n| !n.is_empty()) {
        keys.push(format!("{AMO_CF_NAME}{n}"));
    }
    keys
}

/// The account's custom fields, addressable by every flat key form.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    fields: Vec<CustomField>,
}

impl Catalogue {
    /// A catalogue of `fields`.
    pub fn new(fields: Vec<CustomField>) -> Self {
        Catalogue { fields }
    }

    /// All fields.
    pub fn fields(&self) -> &[CustomField] {
        &self.fields
    }

    /// The field a flat key (without `@ENUM` suffix) names: `cf.id.N` by id, `cf.code.X`
    /// by code (case-insensitive, as amoCRM matches codes), `cf.name.X` by exact name.
    pub fn resolve(&self, key: &str) -> Option<&CustomField> {
        if let Some(id) = key.strip_prefix(AMO_CF_ID) {
            let id: i64 = id.parse().ok()?;
            self.fields.iter().find(|f| f.id == id)
        } else if let Some(code) = key.strip_prefix(AMO_CF_CODE) {
            self.fields.iter().find(|f| {
                f.code
                    .as_deref()
                    .is_some_and(|c| c.eq_ignore_ascii_case(code))
            })
        } else if let Some(name) = key.strip_prefix(AMO_CF_NAME) {
            self.fields.iter().find(|f| f.name == name)
        } else {
            None
        }
    }

    /// The field used to recognise an existing company on a replayed create: the one
    /// named "Domain" (any case), if the account has it.
    pub fn domain_field(&self) -> Option<&CustomField> {
        self.fields
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case("domain"))
    }
}

/// What a list page held.
#[derive(Debug, Default)]
pub struct ParsedPage {
    /// Records in the order the vendor listed them.
    pub records: Vec<VendorRecord>,
    /// Records that could not be parsed.
    pub malformed: Vec<MalformedRecord>,
    /// How many entries the page had before parsing (decides whether the page was full).
    pub raw_count: usize,
    /// Whether `_links.next` was present.
    pub has_next: bool,
}

impl ParsedPage {
    /// Whether a next page may hold more: this one was full (`limit` rows), or the server
    /// linked a next page after a non-empty one — a server that caps pages below the
    /// `limit` asked for says so only by that link.
    pub fn may_continue(&self, limit: usize) -> bool {
        self.raw_count >= limit || (self.has_next && self.raw_count > 0)
    }
}

/// Parses a HAL list answer of `GET /api/v4/companies`.
pub fn parse_company_page(body: &Value, catalogue: &Catalogue) -> Result<ParsedPage, String> {
    let list = body
        .get("_embedded")
        .and_then(|e| e.get("companies"))
        .and_then(Value::as_array)
        .ok_or_else(|| "the list answer has no _embedded.companies array".to_string())?;
    let mut page = ParsedPage {
        raw_count: list.len(),
        has_next: body
            .get("_links")
            .and_then(|l| l.get("next"))
            .and_then(|n| n.get("href"))
            .is_some_and(Value::is_string),
        ..ParsedPage::default()
    };
    for raw in list {
        match flatten_company(raw, catalogue) {
            Ok(r) => page.records.push(r),
            Err(m) => page.malformed.push(m),
        }
    }
    Ok(page)
}

/// The raw JSON of a record for a dead letter, cut to a readable size.
fn raw_text(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 4000 {
        let mut cut = 4000;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Flattens one company into its flat keys. Custom fields of the catalogue that the
/// record does not carry are emitted as JSON null so that a cleared field is visible.
pub fn flatten_company(
    raw: &Value,
    catalogue: &Catalogue,
) -> Result<VendorRecord, MalformedRecord> {
    let bad = |vendor_id: Option<String>, reason: String| MalformedRecord {
        vendor_id,
        raw: raw_text(raw),
        reason,
    };
    let Some(obj) = raw.as_object() else {
        return Err(bad(None, "the record is not a JSON object".into()));
    };
    let Some(id) = obj.get("id").and_then(Value::as_i64) else {
        return Err(bad(None, "the record has no integer id".into()));
    };
    let vid = Some(id.to_string());
    let Some(ts) = obj.get("updated_at").and_then(Value::as_i64) else {
        return Err(bad(vid, "updated_at is missing or not an integer".into()));
    };
    let Some(updated_at) = DateTime::<Utc>::from_timestamp(ts, 0) else {
        return Err(bad(vid, format!("updated_at {ts} is out of range")));
    };
    let cfv = match obj.get("custom_fields_values") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(a)) => a.as_slice(),
        Some(_) => {
            return Err(bad(
                vid,
                "custom_fields_values is neither null nor an array".into(),
            ));
        }
    };
    let mut fields = Map::new();
    fields.insert(
        "name".into(),
        obj.get("name").cloned().unwrap_or(Value::Null),
    );
    fields.insert(
        "responsible_user_id".into(),
        obj.get("responsible_user_id")
            .cloned()
            .unwrap_or(Value::Null),
    );
    let tags: Vec<Value> = obj
        .get("_embedded")
        .and_then(|e| e.get("tags"))
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(|tag| tag.get("name").and_then(Value::as_str))
                .map(|n| Value::String(n.to_string()))
                .collect()
        })
        .unwrap_or_default();
    fields.insert("tags".into(), Value::Array(tags));

    // Every catalogue field starts as null ("cleared"); values present override it.
    for f in catalogue.fields() {
        for k in f.keys() {
            fields.insert(k, Value::Null);
        }
    }
    for (i, entry) in cfv.iter().enumerate() {
        let Some(fid) = entry.get("field_id").and_then(Value::as_i64) else {
            return Err(bad(
                vid,
                format!("custom_fields_values[{i}] has no integer field_id"),
            ));
        };
        let known = catalogue.fields().iter().find(|f| f.id == fid);
        let code = entry
            .get("field_code")
            .and_then(Value::as_str)
            .or_else(|| known.and_then(|f| f.code.as_deref()));
        let name = entry
            .get("field_name")
            .and_then(Value::as_str)
            .or_else(|| known.map(|f| f.name.as_str()));
        let value = entry
            .get("values")
            .and_then(Value::as_array)
            .and_then(|vals| vals.first())
            .and_then(|v| v.get("value"))
            .cloned()
            .unwrap_or(Value::Null);
        let mut keys = flat_keys(fid, code, name);
        if let Some(f) = known {
            // A field renamed since the catalogue was read answers to both names.
            for k in f.keys() {
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
        }
        for k in keys {
            fields.insert(k, value.clone());
        }
    }
    Ok(VendorRecord {
        vendor_id: id.to_string(),
        updated_at,
        fields,
        deleted: obj
            .get("is_deleted")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn catalogue() -> Catalogue {
        Catalogue::new(vec![
            CustomField {
                id: 3,
                name: "Phone".into(),
                code: Some("PHONE".into()),
                kind: "multitext".into(),
                enums: vec![EnumChoice {
                    id: 1,
                    value: "WORK".into(),
                }],
            },
            CustomField {
                id: 7,
                name: "Annual revenue".into(),
                code: None,
                kind: "numeric".into(),
                enums: vec![],
            },
        ])
    }

    #[test]
    fn every_key_form_carries_the_first_value_and_absent_fields_are_null() {
        let raw = json!({"id": 5, "name": "Acme", "responsible_user_id": 9, "updated_at": 1_700_000_000,
            "custom_fields_values": [{"field_id": 3, "field_name": "Phone", "field_code": "PHONE",
                "field_type": "multitext", "values": [{"value": "+1 555", "enum": "WORK"}, {"value": "+2"}]}],
            "_embedded": {"tags": [{"id": 1, "name": "vip"}]}});
        let r = flatten_company(&raw, &catalogue()).unwrap();
        assert_eq!(r.vendor_id, "5");
        assert_eq!(r.updated_at.timestamp(), 1_700_000_000);
        for k in ["cf.id.3", "cf.code.PHONE", "cf.name.Phone"] {
            assert_eq!(r.fields[k], json!("+1 555"), "{k}: {:?}", r.fields);
        }
        for k in ["cf.id.7", "cf.name.Annual revenue"] {
            assert_eq!(r.fields[k], Value::Null, "{k}: {:?}", r.fields);
        }
        assert_eq!(r.fields["tags"], json!(["vip"]));
    }

    #[test]
    fn numeric_text_is_kept_verbatim() {
        let raw = json!({"id": 5, "updated_at": 1, "custom_fields_values": [{"field_id": 7,
            "values": [{"value": "1234567.50"}]}]});
        let r = flatten_company(&raw, &catalogue()).unwrap();
        assert_eq!(r.fields["cf.name.Annual revenue"], json!("1234567.50"));
    }

    #[test]
    fn records_without_id_or_with_bad_shapes_are_malformed() {
        let cat = catalogue();
        let no_id = flatten_company(&json!({"updated_at": 1}), &cat).unwrap_err();
        assert!(no_id.reason.contains("id"), "{no_id:?}");
        let bad_ts =
            flatten_company(&json!({"id": 1, "updated_at": "yesterday"}), &cat).unwrap_err();
        assert_eq!(bad_ts.vendor_id.as_deref(), Some("1"));
        let bad_cf = flatten_company(
            &json!({"id": 1, "updated_at": 1, "custom_fields_values": {}}),
            &cat,
        )
        .unwrap_err();
        assert!(bad_cf.reason.contains("custom_fields_values"), "{bad_cf:?}");
    }
}
