//! Marketo's wire format: the classifier that reads HTTP-200-with-`success:false` bodies,
//! the `describe` answer, query records and sync results. Hand-written and tolerant: Adobe's
//! Swagger marks fields required that real answers omit (`errors`, `id` on skipped rows).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::connector::MalformedRecord;
use crate::connector::VendorRecord;
use crate::http::{ApiResponse, Classifier, Outcome, QuotaReset, parse_retry_after, status_class};

/// The first error of a `success: false` body: `(code, message)`.
pub fn first_error(body: &Value) -> Option<(String, String)> {
    let err = body.get("errors")?.as_array()?.first()?;
    let code = match err.get("code")? {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Some((code, message))
}

/// A static label for a Marketo error code (metric keys need `&'static str`).
pub fn code_class(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "601", "602", "603", "604", "605", "606", "607", "608", "609", "610", "611", "612", "613",
        "614", "615", "616", "701", "702", "703", "704", "709", "710", "711", "712", "713", "1001",
        "1002", "1003", "1004", "1005", "1006", "1007", "1008", "1013", "1018", "1029", "1035",
        "1036",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or("marketo_error")
}

/// Marketo's classifier: HTTP status first, then the `success`/`errors` of a 200 body.
///
/// | answer | outcome |
/// |---|---|
/// | `success: true`, or a 2xx without `success` (identity) | `Success` |
/// | 601 invalid / 602 expired token | `Reauth` (one refresh, one retry) |
/// | 606 rate window full | `Throttled` after [`MarketoClassifier::wait_606`] (all tasks hold back) |
/// | 615 concurrency | `Throttled` after [`MarketoClassifier::wait_615`] |
/// | 604 / 608 / 611 / 713 | `Retry` (idempotent requests only) |
/// | 607 daily quota | `Suspend` until the next US-Central midnight |
/// | other codes (1003, 1006, 1018, 1029 …), HTTP 413/414/4xx | `Fail` with the vendor's reason |
/// | HTTP 429 / 408 / 5xx | `Throttled` / `Retry` |
#[derive(Debug, Clone, Copy)]
pub struct MarketoClassifier {
    /// How long to pause after a 606: the rolling 20 s window must let some calls age out.
    pub wait_606: Duration,
    /// How long to pause after a 615: another call only has to finish.
    pub wait_615: Duration,
}

impl Default for MarketoClassifier {
    fn default() -> Self {
        MarketoClassifier {
            wait_606: Duration::from_secs(3),
            wait_615: Duration::from_millis(500),
        }
    }
}

impl Classifier for MarketoClassifier {
    fn classify(&self, resp: &ApiResponse) -> Outcome {
        let status = resp.status.as_u16();
        let after = parse_retry_after(&resp.headers, Utc::now());
        match status {
            200..=299 => {}
            429 => {
                return Outcome::Throttled {
                    after,
                    class: "429",
                };
            }
            408 | 500..=599 => {
                return Outcome::Retry {
                    after,
                    class: status_class(status),
                };
            }
            // Marketo answers its errors with HTTP 200, but a server (or a proxy) may
            // send them with a 4xx: a body with Marketo's `errors` is read as on a 200.
            _ if resp.json.as_ref().and_then(first_error).is_some() => {}
            // Bad client credentials at the identity service: nothing to refresh.
            _ => {
                return Outcome::Fail {
                    class: status_class(status),
                    detail: resp.text_snippet(),
                };
            }
        }
        let Some(body) = resp.json.as_ref() else {
            // Not JSON on a 2xx: a truncated answer or a proxy page; retry reads.
            return Outcome::Retry {
                after: None,
                class: "decode",
            };
        };
        if body.get("success").and_then(Value::as_bool) != Some(false) && status < 300 {
            return Outcome::Success;
        }
        let (code, message) = first_error(body).unwrap_or_else(|| {
            (
                "unknown".into(),
                "success: false without errors".to_string(),
            )
        });
        let detail = format!("{code}: {message}");
        match code.as_str() {
            "601" | "602" => Outcome::Reauth,
            "606" => Outcome::Throttled {
                after: Some(self.wait_606),
                class: "606",
            },
            "615" => Outcome::Throttled {
                after: Some(self.wait_615),
                class: "615",
            },
            "604" | "608" | "611" | "713" => Outcome::Retry {
                after: None,
                class: code_class(&code),
            },
            "607" => {
                let until = QuotaReset::UsCentralMidnight.next_reset(Utc::now());
                Outcome::Suspend {
                    until,
                    class: "607",
                    detail: format!(
                        "Marketo's daily API quota of the whole instance is exhausted \
                         ({detail}); no calls until it resets at midnight US Central ({until})"
                    ),
                }
            }
            _ => Outcome::Fail {
                class: code_class(&code),
                detail,
            },
        }
    }
}

/// One field of the company object as `describe` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMeta {
    /// The API name.
    pub name: String,
    /// Whether a sync may write it (`externalCompanyId` is settable only at creation).
    pub updateable: bool,
    /// The most characters a text field holds (`length`; 255 for Marketo's strings), when
    /// described.
    pub length: Option<usize>,
}

/// What `GET companies/describe.json` told us about this instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Describe {
    /// Every field, in the order listed.
    pub fields: Vec<FieldMeta>,
    /// Fields (single-field keys) a query may filter on.
    pub searchable: Vec<String>,
    /// The dedupe fields (normally `externalCompanyId`).
    pub dedupe: Vec<String>,
}

impl Describe {
    /// Parses the `result[0]` of a describe answer.
    pub fn parse(body: &Value) -> Result<Describe, String> {
        let obj = body
            .get("result")
            .and_then(Value::as_array)
            .and_then(|r| r.first())
            .ok_or("describe answered without a result")?;
        let fields = obj
            .get("fields")
            .and_then(Value::as_array)
            .ok_or("describe answered without fields")?
            .iter()
            .filter_map(|f| {
                let name = f.get("name")?.as_str()?;
                // Optional in Marketo's schema: a field without it is taken as writable
                // unless it is one the system keeps (dropping it silently would leave
                // the company unsynced while counting it written).
                let system = matches!(name, "id" | "createdAt" | "updatedAt");
                Some(FieldMeta {
                    name: name.to_string(),
                    updateable: f
                        .get("updateable")
                        .and_then(Value::as_bool)
                        .unwrap_or(!system),
                    length: f
                        .get("length")
                        .and_then(Value::as_u64)
                        .and_then(|l| usize::try_from(l).ok())
                        .filter(|l| *l > 0),
                })
            })
            .collect();
        let searchable = obj
            .get("searchableFields")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|k| match k {
                Value::Array(parts) if parts.len() == 1 => parts[0].as_str().map(str::to_string),
                Value::String(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        let dedupe = obj
            .get("dedupeFields")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        Ok(Describe {
            fields,
            searchable,
            dedupe,
        })
    }

    /// The field named `name`, if this instance has it.
    pub fn field(&self, name: &str) -> Option<&FieldMeta> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// True if the instance has field `name`.
    pub fn has(&self, name: &str) -> bool {
        self.field(name).is_some()
    }
}

/// Parses Marketo's timestamps: `2024-01-01T10:00:00Z`, also `+0000` offsets.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%z"))
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A record's `id`, as a number or numeric text.
pub fn record_id(rec: &Map<String, Value>) -> Option<i64> {
    match rec.get("id")? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A query result row as a [`VendorRecord`] (flat keys = Marketo API names, `seq` dropped),
/// or why it cannot be one.
pub fn parse_record(row: &Value) -> Result<(i64, VendorRecord), MalformedRecord> {
    let raw = || {
        let mut s = row.to_string();
        if s.len() > 2000 {
            let mut cut = 2000;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
        s
    };
    let Some(obj) = row.as_object() else {
        return Err(MalformedRecord {
            vendor_id: None,
            raw: raw(),
            reason: "query result row is not a JSON object".into(),
        });
    };
    let Some(id) = record_id(obj) else {
        return Err(MalformedRecord {
            vendor_id: None,
            raw: raw(),
            reason: "company without a usable integer `id`".into(),
        });
    };
    let updated = obj.get("updatedAt").and_then(Value::as_str);
    let Some(updated_at) = updated.and_then(parse_time) else {
        return Err(MalformedRecord {
            vendor_id: Some(id.to_string()),
            raw: raw(),
            reason: format!(
                "company {id}: `updatedAt` missing or not a timestamp ({})",
                obj.get("updatedAt")
                    .map_or("absent".into(), Value::to_string)
            ),
        });
    };
    let mut fields = obj.clone();
    fields.remove("seq");
    Ok((
        id,
        VendorRecord {
            vendor_id: id.to_string(),
            updated_at,
            fields,
            deleted: false,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(status: u16, body: Value) -> ApiResponse {
        ApiResponse {
            connector: "m".into(),
            endpoint: "GET companies",
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            headers: Default::default(),
            body: body.to_string().into_bytes(),
            json: Some(body),
        }
    }

    #[test]
    fn marketo_errors_are_read_on_a_4xx_too() {
        let c = MarketoClassifier::default();
        let expired = json!({"success": false, "errors": [{"code": "602", "message": "Access token expired"}]});
        assert!(matches!(
            c.classify(&answer(200, expired.clone())),
            Outcome::Reauth
        ));
        assert!(matches!(c.classify(&answer(401, expired)), Outcome::Reauth));
        let throttled = json!({"errors": [{"code": 606, "message": "Max rate limit exceeded"}]});
        assert!(matches!(
            c.classify(&answer(403, throttled)),
            Outcome::Throttled { .. }
        ));
        // Without Marketo's errors (the identity service's own shape): a plain failure.
        let identity =
            json!({"error": "unauthorized", "error_description": "Bad client credentials"});
        assert!(matches!(
            c.classify(&answer(401, identity)),
            Outcome::Fail { .. }
        ));
    }

    #[test]
    fn marketo_timestamps_parse_with_z_and_numeric_offsets() {
        let a = parse_time("2024-03-01T10:00:05Z").unwrap();
        let b = parse_time("2024-03-01T10:00:05+0000").unwrap();
        assert_eq!(a, b);
        assert!(parse_time("yesterday").is_none());
    }

    #[test]
    fn rows_without_id_or_with_bad_updated_at_are_malformed() {
        let no_id = parse_record(&json!({"seq": 0, "updatedAt": "2024-01-01T00:00:00Z"}));
        assert!(no_id.unwrap_err().reason.contains("id"));
        let bad_time = parse_record(&json!({"seq": 1, "id": 7, "updatedAt": "soon"})).unwrap_err();
        assert_eq!(bad_time.vendor_id.as_deref(), Some("7"));
    }

    #[test]
    fn describe_lists_fields_searchables_and_dedupe_fields() {
        let d = Describe::parse(&json!({"success": true, "result": [{
            "idField": "id", "dedupeFields": ["externalCompanyId"],
            "searchableFields": [["externalCompanyId"], ["id"], ["company"]],
            "fields": [{"name": "id", "updateable": false}, {"name": "company", "updateable": true}]
        }]}))
        .unwrap();
        assert_eq!(d.searchable, ["externalCompanyId", "id", "company"]);
        assert_eq!(d.dedupe, ["externalCompanyId"]);
        assert!(d.field("company").unwrap().updateable);
        // Without `updateable`: writable, but for the fields the system keeps.
        let lean = Describe::parse(&json!({"success": true, "result": [{
            "idField": "id",
            "fields": [{"name": "id"}, {"name": "updatedAt"}, {"name": "industry"}]
        }]}))
        .unwrap();
        assert!(lean.field("industry").unwrap().updateable);
        assert!(!lean.field("id").unwrap().updateable);
        assert!(!lean.field("updatedAt").unwrap().updateable);
        assert!(!d.has("site"));
    }
}
