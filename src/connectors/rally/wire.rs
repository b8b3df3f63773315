//! Rally's JSON on the wire: turning list rows into [`VendorRecord`]s (or
//! [`MalformedRecord`]s), timestamps in and out, error messages, and the classifiers that
//! tell the HTTP client which answers are the connector's to judge.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

use crate::connector::{MalformedRecord, VendorRecord};
use crate::http::{ApiResponse, Classifier, DefaultClassifier, Outcome};

/// Rally's writable company fields (`CreateCompanyRequest`), the flat keys of
/// [`crate::mapping::defaults`].
pub const WRITABLE_FIELDS: [&str; 17] = [
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
];

/// Fields of a `CompanyResponse` that are not in [`VendorRecord::fields`] because the
/// record carries them itself.
const LIFTED_FIELDS: [&str; 2] = ["id", "updatedAt"];

/// Longest raw JSON kept with a malformed record.
const RAW_MAX: usize = 4000;

/// Formats a cursor time as Rally is sent it: RFC 3339, UTC, explicit `Z`, milliseconds.
/// Truncation (not rounding) only moves the bound earlier, which re-reads, never skips.
pub fn wire_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses a Rally timestamp: RFC 3339 with any fraction and zone; a time without a zone is
/// UTC (the server's clock), as .NET serialises `DateTimeKind.Unspecified`.
pub fn parse_time(raw: &str) -> Option<DateTime<Utc>> {
    let t = raw.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Some(d.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|d| d.and_utc())
}

/// One list row parsed: the record, or why it cannot be one.
pub fn parse_record(row: &Value) -> Result<VendorRecord, MalformedRecord> {
    let malformed = |vendor_id: Option<String>, reason: String| MalformedRecord {
        vendor_id,
        raw: truncate(&row.to_string(), RAW_MAX),
        reason,
    };
    let Value::Object(obj) = row else {
        return Err(malformed(None, format!("not a JSON object: {}", kind(row))));
    };
    let id = match obj.get("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(malformed(None, "id is empty".into())),
        None | Some(Value::Null) => return Err(malformed(None, "id is missing".into())),
        Some(other) => {
            return Err(malformed(
                None,
                format!("id is {}, not a string", kind(other)),
            ));
        }
    };
    let some_id = || Some(id.clone());
    let updated_at = match obj.get("updatedAt") {
        Some(Value::String(s)) => parse_time(s).ok_or_else(|| {
            malformed(
                some_id(),
                format!("updatedAt {s:?} is not an ISO-8601 time"),
            )
        })?,
        None | Some(Value::Null) => {
            return Err(malformed(some_id(), "updatedAt is missing".into()));
        }
        Some(other) => {
            return Err(malformed(
                some_id(),
                format!("updatedAt is {}, not a string", kind(other)),
            ));
        }
    };
    match obj.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => {}
        None | Some(Value::Null) => {
            return Err(malformed(some_id(), "name is missing".into()));
        }
        Some(Value::String(_)) => return Err(malformed(some_id(), "name is empty".into())),
        Some(other) => {
            return Err(malformed(
                some_id(),
                format!("name is {}, not a string", kind(other)),
            ));
        }
    }
    let mut fields = Map::new();
    for (key, value) in obj {
        if LIFTED_FIELDS.contains(&key.as_str()) {
            continue;
        }
        check_type(key, value).map_err(|reason| malformed(some_id(), reason))?;
        // Numbers stay the JSON numbers they arrived as (arbitrary precision): the
        // mapping converts `annualRevenue` to a decimal exactly.
        fields.insert(key.clone(), value.clone());
    }
    Ok(VendorRecord {
        vendor_id: id,
        updated_at,
        fields,
        deleted: false,
    })
}

/// Checks the JSON type of a documented field; unknown fields pass as they are.
fn check_type(key: &str, value: &Value) -> Result<(), String> {
    let ok = match (key, value) {
        (_, Value::Null) => true,
        ("employeeCount", Value::Number(n)) => n.as_i64().is_some(),
        ("annualRevenue", Value::Number(n)) => {
            crate::model::parse_decimal(&n.to_string()).is_some()
        }
        ("tags", Value::Array(items)) => items.iter().all(Value::is_string),
        ("employeeCount" | "annualRevenue" | "tags", _) => false,
        (k, Value::String(_)) if is_text_field(k) => true,
        (k, _) if is_text_field(k) => false,
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        let want = match key {
            "employeeCount" => "an integer",
            "annualRevenue" => "a decimal number",
            "tags" => "an array of strings",
            _ => "a string",
        };
        Err(format!("{key} is {}, not {want}", describe(value)))
    }
}

fn is_text_field(key: &str) -> bool {
    matches!(key, "tenantId" | "createdAt")
        || (WRITABLE_FIELDS.contains(&key)
            && !matches!(key, "employeeCount" | "annualRevenue" | "tags"))
}

/// A JSON value's kind, for reasons.
/// The rows of a list answer. Rally's document shows a bare JSON array; a server wrapping
/// the page in an object (`{"data": [...], "total": n}`, as many APIs do) is read too: the
/// array under a usual key (`data`, `items`, `companies`, `results`, `records`). Any other
/// object (a single company, say, whose `tags` are an array) is not a list: `None`.
pub fn list_rows(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(rows) => Some(rows),
        Value::Object(obj) => ["data", "items", "companies", "results", "records"]
            .iter()
            .find_map(|key| obj.get(*key).and_then(Value::as_array))
            .map(Vec::as_slice),
        _ => None,
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value's kind with a short excerpt of it, for reasons.
fn describe(v: &Value) -> String {
    format!("{} ({})", kind(v), truncate(&v.to_string(), 60))
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The vendor's reason in an error answer: its JSON `error` (or `message`/`title`), else the
/// body text.
pub fn error_message(resp: &ApiResponse) -> String {
    let from_json = resp.json.as_ref().and_then(|j| {
        ["error", "message", "title"]
            .iter()
            .find_map(|k| j.get(*k).and_then(Value::as_str))
            .map(str::to_string)
    });
    match from_json {
        Some(m) => m,
        None => {
            let text = resp.text_snippet();
            if text.trim().is_empty() {
                format!("HTTP {}", resp.status)
            } else {
                text
            }
        }
    }
}

/// Classifier of calls whose 400/404/409/422 answers are a verdict on one record (single
/// PUT/POST/upsert): those come back as answers for the connector to turn into
/// `Rejected`; everything else is [`DefaultClassifier`] (429 throttled with `Retry-After`,
/// 408/5xx retried, 401 final for a static key, other statuses fail).
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordVerdictClassifier;

impl Classifier for RecordVerdictClassifier {
    fn classify(&self, resp: &ApiResponse) -> Outcome {
        match resp.status.as_u16() {
            400 | 404 | 409 | 422 => Outcome::Success,
            _ => DefaultClassifier.classify(resp),
        }
    }
}

#[cfg(test)]
mod list_rows_tests {
    use super::list_rows;
    use serde_json::json;

    #[test]
    fn bare_and_wrapped_pages_give_their_rows() {
        let rows = [json!({"id": "a"})];
        assert_eq!(list_rows(&json!([{"id": "a"}])), Some(&rows[..]));
        assert_eq!(
            list_rows(&json!({"data": [{"id": "a"}], "total": 1})),
            Some(&rows[..])
        );
        assert_eq!(
            list_rows(&json!({"companies": [{"id": "a"}], "next": null})),
            Some(&rows[..])
        );
        // One company is not a list of its tags.
        assert_eq!(list_rows(&json!({"id": "a", "tags": ["x"]})), None);
        assert_eq!(list_rows(&json!({"error": "no"})), None);
        assert_eq!(list_rows(&json!("x")), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row() -> Value {
        json!({
            "id": "b5c7e1a2-3d4f-5678-9abc-def012345678",
            "tenantId": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
            "name": "Acme",
            "employeeCount": 250,
            "annualRevenue": 45000000.10,
            "tags": ["a"],
            "createdAt": "2025-02-01T10:00:00Z",
            "updatedAt": "2025-06-12T08:45:00.1234567Z"
        })
    }

    #[test]
    fn a_full_row_parses_with_fractional_utc_time_and_exact_revenue() {
        let raw: Value =
            serde_json::from_str(r#"{"id":"x","name":"A","annualRevenue":12345678901234567890.12,"updatedAt":"2025-06-12T10:45:00.5+02:00"}"#)
                .unwrap();
        let rec = parse_record(&raw).unwrap();
        assert_eq!(wire_time(&rec.updated_at), "2025-06-12T08:45:00.500Z");
        assert_eq!(
            rec.fields["annualRevenue"].to_string(),
            "12345678901234567890.12"
        );
        assert!(!rec.fields.contains_key("id") && !rec.fields.contains_key("updatedAt"));
        assert!(parse_record(&row()).is_ok());
    }

    #[test]
    fn a_time_without_zone_is_utc() {
        assert_eq!(
            parse_time("2025-06-12T08:45:00.25").map(|t| wire_time(&t)),
            Some("2025-06-12T08:45:00.250Z".into())
        );
    }

    #[test]
    fn wrong_types_are_malformed_with_the_field_named() {
        for (key, bad, needle) in [
            ("employeeCount", json!("many"), "employeeCount is a string"),
            ("employeeCount", json!(2.5), "employeeCount is a number"),
            ("tags", json!([1]), "tags is an array"),
            ("city", json!(7), "city is a number"),
            ("updatedAt", json!("yesterday"), "not an ISO-8601 time"),
            ("id", json!(5), "id is a number"),
            ("name", Value::Null, "name is missing"),
        ] {
            let mut r = row();
            r[key] = bad;
            let err = parse_record(&r).expect_err(key);
            assert!(err.reason.contains(needle), "{key}: {:?}", err.reason);
        }
    }
}
