//! Keeping the multitext values crmbridge does not sync: amoCRM replaces all of a field's
//! values on a write, and a company may hold several (a work and a mobile phone), of which
//! crmbridge reads and writes the first. Before updates that write or clear such a field,
//! the companies' current values are read, and each write carries the others along. A
//! clear removes only the synced value: the next one becomes the company's first (and is
//! read back as its new value, which then reaches the other CRMs) instead of being lost.

use std::collections::{BTreeSet, HashMap};

use serde_json::{Map, Value};

use super::AmocrmConnector;
use super::push::Entry;
use super::wire::Catalogue;
use crate::connector::ConnectorError;

/// Ids per `filter[id][]` call (the list's page limit).
const IDS_PER_CALL: usize = 250;

/// `(company id, field id)` → the values amoCRM holds.
type Held = HashMap<(i64, i64), Vec<Value>>;

/// Whether field `id` of the account is a multitext field.
fn is_multitext(catalogue: &Catalogue, id: i64) -> bool {
    catalogue
        .fields()
        .iter()
        .any(|f| f.id == id && f.is_multitext())
}

/// Whether `body` sets or clears a multitext field.
fn writes_multitext(body: &Map<String, Value>, catalogue: &Catalogue) -> bool {
    let Some(Value::Array(cfs)) = body.get("custom_fields_values") else {
        return false;
    };
    cfs.iter()
        .filter(|cf| {
            cf.get("values")
                .is_some_and(|v| v.is_array() || v.is_null())
        })
        .filter_map(|cf| cf.get("field_id").and_then(Value::as_i64))
        .any(|id| is_multitext(catalogue, id))
}

/// Only what a write of a value takes: its text and enum.
fn writable(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(k, _)| matches!(k.as_str(), "value" | "enum_id" | "enum_code"))
                .collect(),
        ),
        other => other,
    }
}

/// The `values` that clear the synced (first) value of a field holding `held`: the others,
/// or null (clearing the field) when there are none.
fn cleared(held: &[Value]) -> Value {
    match held.get(1..) {
        Some(rest) if !rest.is_empty() => {
            Value::Array(rest.iter().cloned().map(writable).collect())
        }
        _ => Value::Null,
    }
}

/// The values of one field written as `written` (one value, from `cf_values`) into a
/// company that holds `held`: the first held value — the one crmbridge syncs — is
/// replaced (keeping its enum, unless the write names another one held elsewhere), the
/// others stay.
fn merged(written: &[Value], held: &[Value]) -> Vec<Value> {
    let Some(new) = written.first() else {
        return held.to_vec();
    };
    if held.len() < 2 {
        return written.to_vec();
    }
    let text = new.get("value").cloned();
    let code = new.get("enum_code").and_then(Value::as_str);
    let enum_of = |v: &Value| {
        v.get("enum_code")
            .or_else(|| v.get("enum"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    // A write naming an enum other than the default replaces the value of that enum.
    let at = match code {
        Some(c) if c != super::push::DEFAULT_ENUM_CODE => {
            held.iter().position(|v| enum_of(v).as_deref() == Some(c))
        }
        _ => Some(0),
    };
    let mut out: Vec<Value> = held.to_vec();
    match at {
        Some(i) => {
            let mut v = Map::new();
            v.insert("value".into(), text.clone().unwrap_or(Value::Null));
            // The held value's enum, as amoCRM gave it.
            match (held[i].get("enum_id"), enum_of(&held[i])) {
                (Some(id), _) if !id.is_null() => {
                    v.insert("enum_id".into(), id.clone());
                }
                (_, Some(c)) => {
                    v.insert("enum_code".into(), Value::String(c));
                }
                _ => {
                    if let Some(c) = code {
                        v.insert("enum_code".into(), Value::String(c.into()));
                    }
                }
            }
            out[i] = Value::Object(v);
        }
        None => out.insert(0, new.clone()),
    }
    // The same text twice (the new value was already among the others) once only.
    let mut seen = BTreeSet::new();
    out.retain(|v| seen.insert(v.get("value").map(Value::to_string).unwrap_or_default()));
    out.into_iter().map(writable).collect()
}

impl AmocrmConnector {
    /// Makes the updates in `entries` that write or clear a multitext field carry the
    /// company's other values of it (see the module docs). Costs one list call per 250
    /// such companies (one call each without API filtering).
    pub(super) async fn keep_other_multitext_values(
        &self,
        entries: &mut [Entry],
        catalogue: &Catalogue,
    ) -> Result<(), ConnectorError> {
        let ids: Vec<i64> = entries
            .iter()
            .filter(|e| writes_multitext(&e.body, catalogue))
            .filter_map(|e| e.id)
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let held = self.held_multitext(&ids, catalogue).await?;
        for e in entries.iter_mut() {
            let Some(id) = e.id else { continue };
            let Some(Value::Array(cfs)) = e.body.get_mut("custom_fields_values") else {
                continue;
            };
            for cf in cfs.iter_mut() {
                let Some(field) = cf.get("field_id").and_then(Value::as_i64) else {
                    continue;
                };
                let Some(held) = held.get(&(id, field)) else {
                    continue;
                };
                cf["values"] = match cf.get("values") {
                    Some(Value::Array(written)) => Value::Array(merged(written, held)),
                    Some(Value::Null) => cleared(held),
                    _ => continue,
                };
            }
        }
        Ok(())
    }

    /// The multitext values the companies `ids` hold now.
    async fn held_multitext(
        &self,
        ids: &[i64],
        catalogue: &Catalogue,
    ) -> Result<Held, ConnectorError> {
        let mut companies: Vec<Value> = Vec::new();
        if self.filter_enabled() {
            for chunk in ids.chunks(IDS_PER_CALL) {
                let mut params: Vec<(String, String)> = chunk
                    .iter()
                    .map(|id| ("filter[id][]".to_string(), id.to_string()))
                    .collect();
                params.push(("limit".into(), IDS_PER_CALL.to_string()));
                if let Some(v) = self
                    .get("GET companies", "api/v4/companies", params)
                    .await?
                {
                    companies.extend(
                        v.pointer("/_embedded/companies")
                            .and_then(Value::as_array)
                            .cloned()
                            .unwrap_or_default(),
                    );
                }
            }
        } else {
            for id in ids {
                let path = format!("api/v4/companies/{id}");
                if let Some(v) = self.get("GET company", &path, Vec::new()).await? {
                    companies.push(v);
                }
            }
        }
        let mut held = Held::new();
        for c in &companies {
            let Some(id) = c.get("id").and_then(Value::as_i64) else {
                continue;
            };
            // Only the ids asked for (a server ignoring the filter lists others too).
            if !ids.contains(&id) {
                continue;
            }
            let Some(cfs) = c.get("custom_fields_values").and_then(Value::as_array) else {
                continue;
            };
            for cf in cfs {
                let (Some(field), Some(values)) = (
                    cf.get("field_id").and_then(Value::as_i64),
                    cf.get("values").and_then(Value::as_array),
                ) else {
                    continue;
                };
                if is_multitext(catalogue, field) {
                    held.insert((id, field), values.clone());
                }
            }
        }
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_first_value_is_replaced_and_the_others_stay() {
        let held = [
            json!({"value": "+1 555 0100", "enum_id": 1001, "enum_code": "WORK"}),
            json!({"value": "+1 650 555 6916", "enum_id": 1003, "enum_code": "MOB"}),
        ];
        let out = merged(
            &[json!({"value": "+1 555 0199", "enum_code": "WORK"})],
            &held,
        );
        assert_eq!(
            out,
            [
                json!({"value": "+1 555 0199", "enum_id": 1001}),
                json!({"value": "+1 650 555 6916", "enum_id": 1003, "enum_code": "MOB"}),
            ]
        );
    }

    #[test]
    fn a_named_enum_replaces_its_own_value_and_a_repeat_is_dropped() {
        let held = [
            json!({"value": "a", "enum_code": "WORK"}),
            json!({"value": "b", "enum_code": "MOB"}),
        ];
        let out = merged(&[json!({"value": "a", "enum_code": "MOB"})], &held);
        assert_eq!(out, [json!({"value": "a", "enum_code": "WORK"})]);
        let out = merged(&[json!({"value": "c", "enum_code": "MOB"})], &held);
        assert_eq!(
            out,
            [
                json!({"value": "a", "enum_code": "WORK"}),
                json!({"value": "c", "enum_code": "MOB"})
            ]
        );
    }

    #[test]
    fn a_clear_removes_only_the_synced_value() {
        let held = [
            json!({"value": "a", "enum_id": 1001, "enum_code": "WORK"}),
            json!({"value": "b", "enum_id": 1003, "enum_code": "MOB", "x": 1}),
        ];
        assert_eq!(
            cleared(&held),
            json!([{"value": "b", "enum_id": 1003, "enum_code": "MOB"}])
        );
        assert_eq!(cleared(&held[..1]), Value::Null);
        assert_eq!(cleared(&[]), Value::Null);
    }

    #[test]
    fn a_single_held_value_is_simply_replaced() {
        let held = [json!({"value": "a", "enum_code": "WORK"})];
        let written = [json!({"value": "b", "enum_code": "WORK"})];
        assert_eq!(merged(&written, &held), written);
    }
}
