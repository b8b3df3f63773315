//! Writing companies to amoCRM: flat keys → API bodies, batched `PATCH` (items with a
//! vendor id) and `POST` (new ones), per-item rejection from `validation-errors`
//! (amoCRM stores nothing of a batch that fails validation, so the good items are sent
//! again), batch splitting on 413/422/504, and the replay lookup that keeps a retried
//! create from making a duplicate.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use reqwest::Method;
use serde_json::{Map, Number, Value, json};

use super::AmocrmConnector;
use super::classify::{AmoClassifier, CallKind};
use super::wire::{Catalogue, CustomField};
use crate::connector::{ConnectorError, PushItem, PushOutcome};
use crate::http::{ApiRequest, HttpError};
use crate::mapping::split_enum_suffix;

/// Enum code of multitext values written without an `@ENUM` suffix.
pub(super) const DEFAULT_ENUM_CODE: &str = "WORK";

/// One item on its way into a batch.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    /// Index of the item in the `push` call.
    pub idx: usize,
    /// The vendor id to update, `None` to create.
    pub id: Option<i64>,
    /// The body without `id` / `request_id`.
    pub body: Map<String, Value>,
}

/// The text of a flat value (first element of an array).
pub(super) fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(a) => a.first().and_then(value_text),
        Value::Null | Value::Object(_) => None,
    }
}

/// Whether a value means "no value": null, blank text, an empty list.
fn is_blank(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// What amoCRM keeps of `v` written to `field`, when that is not `v` itself: a choice in
/// the spelling of the account's option (options match regardless of case). `None` when
/// it keeps `v` as written, or `v` cannot be written there at all.
pub(crate) fn stored_form(field: &CustomField, v: &Value) -> Option<Value> {
    if is_blank(v) {
        return None;
    }
    let text = value_text(v)?;
    if field.is_choice() {
        if field.enums.iter().any(|e| e.value == text) {
            return None;
        }
        let option = field
            .enums
            .iter()
            .find(|e| e.value.eq_ignore_ascii_case(&text))?;
        return Some(Value::String(option.value.clone()));
    }
    None
}

/// The `values` of one custom field entry; JSON null clears the field (an empty string
/// would leave it unchanged in amoCRM).
fn cf_values(field: &CustomField, v: &Value, enum_code: Option<&str>) -> Result<Value, String> {
    if is_blank(v) {
        return Ok(Value::Null);
    }
    let text = value_text(v)
        .ok_or_else(|| format!("field {:?}: cannot write a JSON object", field.name))?;
    if field.is_multitext() {
        let code = enum_code.unwrap_or(DEFAULT_ENUM_CODE);
        return Ok(json!([{"value": text, "enum_code": code}]));
    }
    if field.is_choice() {
        let choice = field
            .enums
            .iter()
            .find(|e| e.value == text)
            .or_else(|| {
                field
                    .enums
                    .iter()
                    .find(|e| e.value.eq_ignore_ascii_case(&text))
            })
            .ok_or_else(|| {
                let options: Vec<&str> = field.enums.iter().map(|e| e.value.as_str()).collect();
                format!(
                    "{text:?} is not an option of the select field {:?} (options: {})",
                    field.name,
                    options.join(", ")
                )
            })?;
        return Ok(json!([{"enum_id": choice.id}]));
    }
    if field.is_numeric() {
        let n = match v {
            Value::Number(n) => n.clone(),
            _ => serde_json::from_str::<Number>(text.trim())
                .map_err(|_| format!("field {:?}: {text:?} is not a number", field.name))?,
        };
        return Ok(json!([{"value": n}]));
    }
    if field.kind == "checkbox" {
        let b = match v {
            Value::Bool(b) => *b,
            _ => matches!(text.trim(), "true" | "1" | "yes"),
        };
        return Ok(json!([{"value": b}]));
    }
    Ok(json!([{"value": text}]))
}

/// The minimal API body of one item: only the keys it carries, never read-only fields.
pub(crate) fn build_body(
    fields: &Map<String, Value>,
    catalogue: &Catalogue,
) -> Result<Map<String, Value>, String> {
    let mut body = Map::new();
    // One entry per field id, in first-seen order; a later key for the same field wins.
    let mut cfs: Vec<(i64, Value)> = Vec::new();
    for (key, v) in fields {
        let (base, enum_code) = split_enum_suffix(key);
        match base {
            "name" => match v {
                Value::Null => {}
                _ => {
                    let text = value_text(v).ok_or("name must be text")?;
                    body.insert("name".into(), Value::String(text));
                }
            },
            "responsible_user_id" => match v {
                Value::Null => {}
                Value::Number(n) if n.as_i64().is_some() => {
                    body.insert(base.into(), v.clone());
                }
                Value::String(s) if s.trim().parse::<i64>().is_ok() => {
                    body.insert(base.into(), json!(s.trim().parse::<i64>().unwrap_or(0)));
                }
                other => {
                    return Err(format!(
                        "responsible_user_id must be an integer, got {other}"
                    ));
                }
            },
            "tags" => {
                let names: Vec<Value> = match v {
                    Value::Array(a) => a
                        .iter()
                        .filter_map(value_text)
                        .map(|t| t.trim().to_string())
                        .filter(|t| !t.is_empty())
                        .map(|t| json!({"name": t}))
                        .collect(),
                    Value::String(s) => s
                        .split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(|t| json!({"name": t}))
                        .collect(),
                    _ => Vec::new(),
                };
                // `_embedded.tags` replaces the whole set; null removes every tag.
                let tags = if names.is_empty() {
                    Value::Null
                } else {
                    Value::Array(names)
                };
                body.insert("_embedded".into(), json!({ "tags": tags }));
            }
            k if k.starts_with("cf.") => {
                let field = catalogue
                    .resolve(k)
                    .ok_or_else(|| format!("custom field {k:?} does not exist on this account"))?;
                let values = cf_values(field, v, enum_code)?;
                match cfs.iter_mut().find(|(id, _)| *id == field.id) {
                    Some(slot) => slot.1 = values,
                    None => cfs.push((field.id, values)),
                }
            }
            // Read-only or bookkeeping keys never go back (amoCRM rejects some of them).
            _ => tracing::debug!(key = %key, "flat key not writable to amoCRM: skipped"),
        }
    }
    if !cfs.is_empty() {
        body.insert(
            "custom_fields_values".into(),
            Value::Array(
                cfs.into_iter()
                    .map(|(id, values)| json!({"field_id": id, "values": values}))
                    .collect(),
            ),
        );
    }
    Ok(body)
}

/// The `validation-errors` of a 400 answer as request id → reason.
fn validation_errors(v: &Value) -> Option<BTreeMap<String, String>> {
    let list = v.get("validation-errors")?.as_array()?;
    let mut out = BTreeMap::new();
    for e in list {
        let rid = match e.get("request_id")? {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        let reasons: Vec<String> = e
            .get("errors")
            .and_then(Value::as_array)
            .map(|errs| {
                errs.iter()
                    .map(|x| {
                        let s = |k: &str| x.get(k).and_then(Value::as_str).unwrap_or("");
                        format!("{}: {} ({})", s("path"), s("detail"), s("code"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.insert(rid, reasons.join("; "));
    }
    (!out.is_empty()).then_some(out)
}

/// What a failed call means for the items of its batch.
pub(super) enum CallFailure {
    /// These items get `Retry` with this reason; the push goes on.
    Retry(String),
    /// These items get `Unconfirmed` with this reason (a create that may have landed);
    /// the push goes on.
    Unconfirmed(String),
    /// Nothing more can be sent in this push (ban, credentials, misconfiguration).
    Stop(ConnectorError),
}

impl AmocrmConnector {
    /// Writes `items`; see the module docs.
    pub(crate) async fn push_items(
        &self,
        items: &[PushItem],
    ) -> Result<Vec<PushOutcome>, ConnectorError> {
        let catalogue = self.catalogue();
        let mut out: Vec<Option<PushOutcome>> = vec![None; items.len()];
        let mut updates = Vec::new();
        let mut creates = Vec::new();
        let mut replays = Vec::new();
        for (idx, item) in items.iter().enumerate() {
            let body = match build_body(&item.fields, &catalogue) {
                Ok(b) => b,
                Err(reason) => {
                    out[idx] = Some(PushOutcome::Rejected { reason });
                    continue;
                }
            };
            match &item.vendor_id {
                Some(v) => match v.trim().parse::<i64>() {
                    // Nothing left to set (an update carries only what changed, and a
                    // null name sets nothing): the record already holds it; no call.
                    Ok(id) if body.is_empty() => {
                        out[idx] = Some(PushOutcome::Written {
                            vendor_id: id.to_string(),
                            created: false,
                        });
                    }
                    Ok(id) => updates.push(Entry {
                        idx,
                        id: Some(id),
                        body,
                    }),
                    Err(_) => {
                        out[idx] = Some(PushOutcome::Rejected {
                            reason: format!("{v:?} is not an amoCRM company id"),
                        })
                    }
                },
                None if item.unconfirmed_since.is_some() => replays.push(Entry {
                    idx,
                    id: None,
                    body,
                }),
                None => creates.push(Entry {
                    idx,
                    id: None,
                    body,
                }),
            }
        }
        // A replayed create may have landed before: find it rather than create it twice.
        let resolved = self
            .resolve_replays(items, replays, &catalogue, &mut out)
            .await;
        updates.extend(resolved.updates);
        creates.extend(resolved.creates);
        let mut stop = resolved.stop;
        if stop.is_none() {
            stop = self
                .keep_other_multitext_values(&mut updates, &catalogue)
                .await
                .err();
        }
        if stop.is_none() {
            stop = self.send_all(updates, &mut out).await.err();
        }
        if stop.is_none() {
            stop = self.send_all(creates, &mut out).await.err();
        }
        if let Some(err) = stop {
            if out.iter().all(Option::is_none) {
                return Err(err);
            }
            let reason = err.to_string();
            for o in out.iter_mut().filter(|o| o.is_none()) {
                *o = Some(PushOutcome::Retry {
                    reason: reason.clone(),
                });
            }
        }
        Ok(out
            .into_iter()
            .map(|o| {
                o.unwrap_or(PushOutcome::Retry {
                    reason: "not sent".into(),
                })
            })
            .collect())
    }

    /// Classifies a failed call for the items it carried.
    pub(super) fn failure(&self, e: HttpError, was_create: bool) -> CallFailure {
        match e {
            e if was_create && e.may_have_applied() => CallFailure::Unconfirmed(format!(
                "{e}; the companies may have been created: the replay looks them up first"
            )),
            e if e.is_transient() => CallFailure::Retry(e.to_string()),
            e => CallFailure::Stop(e.into()),
        }
    }

    /// Sends entries in batches of at most `max_batch` (creates: the adaptive limit).
    async fn send_all(
        &self,
        entries: Vec<Entry>,
        out: &mut [Option<PushOutcome>],
    ) -> Result<(), ConnectorError> {
        let create = entries.first().is_some_and(|e| e.id.is_none());
        let limit = if create {
            self.create_batch_limit
                .load(Ordering::Relaxed)
                .clamp(1, self.batch_size)
        } else {
            self.batch_size
        };
        let mut stack: Vec<Vec<Entry>> = Vec::new();
        let mut rest = entries;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(limit));
            stack.push(rest);
            rest = tail;
        }
        stack.reverse();
        while let Some(batch) = stack.pop() {
            if batch.is_empty() {
                continue;
            }
            self.send_batch(batch, out, &mut stack).await?;
        }
        Ok(())
    }

    /// Sends one batch; follow-up batches (the valid rest, halves) go on `stack`.
    async fn send_batch(
        &self,
        batch: Vec<Entry>,
        out: &mut [Option<PushOutcome>],
        stack: &mut Vec<Vec<Entry>>,
    ) -> Result<(), ConnectorError> {
        let create = batch[0].id.is_none();
        let bodies: Vec<Value> = batch
            .iter()
            .map(|e| {
                let mut b = e.body.clone();
                if let Some(id) = e.id {
                    b.insert("id".into(), json!(id));
                }
                // Validation errors name entities by request_id: the item's index.
                b.insert("request_id".into(), Value::String(e.idx.to_string()));
                Value::Object(b)
            })
            .collect();
        let (method, endpoint) = if create {
            (Method::POST, "POST companies")
        } else {
            (Method::PATCH, "PATCH companies")
        };
        // A PATCH sets absolute values: repeating it is harmless. A POST is not.
        let req = ApiRequest::new(method, endpoint, self.url("api/v4/companies"))
            .json(Value::Array(bodies))
            .auth(self.auth.clone())
            .idempotent(!create);
        let classify = AmoClassifier {
            kind: CallKind::BatchWrite,
            ban_cooldown: self.ban_cooldown,
        };
        let resp = match self.client.send(req, &classify).await {
            Ok(r) => r,
            Err(e) => {
                return match self.failure(e, create) {
                    CallFailure::Retry(reason) => {
                        for e in &batch {
                            out[e.idx] = Some(PushOutcome::Retry {
                                reason: reason.clone(),
                            });
                        }
                        Ok(())
                    }
                    CallFailure::Unconfirmed(reason) => {
                        for e in &batch {
                            out[e.idx] = Some(PushOutcome::Unconfirmed {
                                reason: reason.clone(),
                            });
                        }
                        Ok(())
                    }
                    CallFailure::Stop(err) => Err(err),
                };
            }
        };
        let status = resp.status.as_u16();
        let json = resp.json.clone().unwrap_or(Value::Null);
        match status {
            200..=299 => {
                // Nothing at all (not an answer that failed to parse, which proves
                // nothing): the server accepted the batch without listing it.
                let empty = status == 204 || resp.body.iter().all(u8::is_ascii_whitespace);
                self.record_written(&batch, &json, create, empty, out);
                Ok(())
            }
            400 if validation_errors(&json).is_some_and(|errs| {
                errs.keys()
                    .all(|k| batch.iter().any(|e| e.idx.to_string() == *k))
            }) =>
            {
                // Nothing of the batch was stored: reject the named items, resend the rest.
                let errs = validation_errors(&json).unwrap_or_default();
                let mut rest = Vec::new();
                for e in batch {
                    match errs.get(&e.idx.to_string()) {
                        Some(reason) => {
                            out[e.idx] = Some(PushOutcome::Rejected {
                                reason: reason.clone(),
                            })
                        }
                        None => rest.push(e),
                    }
                }
                stack.push(rest);
                Ok(())
            }
            504 if create => {
                // The creates may have been stored: never resend as is. The replay looks
                // each one up; later creates go out in smaller batches.
                let half = (batch.len() / 2).max(1);
                self.create_batch_limit.store(half, Ordering::Relaxed);
                for e in &batch {
                    out[e.idx] = Some(PushOutcome::Unconfirmed {
                        reason: "HTTP 504 on create: the companies may have been created; the \
                                 replay looks them up first"
                            .into(),
                    });
                }
                Ok(())
            }
            _ if batch.len() > 1 => {
                // Over-size (413/422), a batch-level 400, or a PATCH 504: halve and retry.
                tracing::warn!(connector = %self.name, status, size = batch.len(), "amoCRM refused the batch as a whole: splitting it");
                let mut first = batch;
                let second = first.split_off(first.len() / 2);
                stack.push(second);
                stack.push(first);
                Ok(())
            }
            504 => {
                out[batch[0].idx] = Some(PushOutcome::Retry {
                    reason: format!("HTTP 504: {}", resp.text_snippet()),
                });
                Ok(())
            }
            _ => {
                let reason = validation_errors(&json)
                    .map(|m| m.into_values().collect::<Vec<_>>().join("; "))
                    .unwrap_or_else(|| format!("HTTP {status}: {}", resp.text_snippet()));
                out[batch[0].idx] = Some(PushOutcome::Rejected { reason });
                Ok(())
            }
        }
    }

    /// Reads the ids of a successful write answer.
    fn record_written(
        &self,
        batch: &[Entry],
        json: &Value,
        create: bool,
        empty_answer: bool,
        out: &mut [Option<PushOutcome>],
    ) {
        let listed: Vec<&Value> = json
            .get("_embedded")
            .and_then(|e| e.get("companies"))
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let rid = |v: &Value| match v.get("request_id") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        for (pos, e) in batch.iter().enumerate() {
            let key = e.idx.to_string();
            let by_rid = listed
                .iter()
                .find(|v| rid(v).as_deref() == Some(key.as_str()));
            let found = match e.id {
                Some(id) => by_rid
                    .or_else(|| {
                        listed
                            .iter()
                            .find(|v| v.get("id").and_then(Value::as_i64) == Some(id))
                    })
                    .map(|_| id),
                // Without request ids amoCRM lists created entities in request order.
                None => by_rid
                    .or_else(|| listed.get(pos).filter(|v| rid(v).is_none()))
                    .and_then(|v| v.get("id").and_then(Value::as_i64)),
            };
            out[e.idx] = Some(match (found, e.id) {
                (Some(id), _) => PushOutcome::Written {
                    vendor_id: id.to_string(),
                    created: create,
                },
                (None, _) if create => PushOutcome::Unconfirmed {
                    reason: "amoCRM accepted the batch but listed no id for this company; the \
                             replay looks it up first"
                        .into(),
                },
                // An update accepted with an empty answer (a 204, no body): the write is
                // done; re-sending the PATCH would not confirm it either.
                (None, Some(id)) if empty_answer => PushOutcome::Written {
                    vendor_id: id.to_string(),
                    created: false,
                },
                (None, _) => PushOutcome::Retry {
                    reason: "amoCRM accepted the batch but did not confirm this company".into(),
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::amocrm::wire::EnumChoice;

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
                id: 4,
                name: "Industry".into(),
                code: None,
                kind: "select".into(),
                enums: vec![EnumChoice {
                    id: 40,
                    value: "Retail".into(),
                }],
            },
            CustomField {
                id: 5,
                name: "Annual revenue".into(),
                code: None,
                kind: "numeric".into(),
                enums: vec![],
            },
            CustomField {
                id: 6,
                name: "City".into(),
                code: None,
                kind: "text".into(),
                enums: vec![],
            },
        ])
    }

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_choice_is_stored_in_the_spelling_of_the_accounts_option() {
        let cat = catalogue();
        let industry = cat.resolve("cf.name.Industry").unwrap();
        assert_eq!(
            stored_form(industry, &json!("RETAIL")),
            Some(json!("Retail"))
        );
        assert_eq!(stored_form(industry, &json!("Retail")), None);
        // Not an option at all: not held (see `unholdable`), so no stored form.
        assert_eq!(stored_form(industry, &json!("Mining")), None);
        let city = cat.resolve("cf.name.City").unwrap();
        assert_eq!(stored_form(city, &json!("LEEDS")), None);
    }

    #[test]
    fn bodies_carry_enum_codes_enum_ids_numbers_and_clears() {
        let body = build_body(
            &fields(json!({"name": "Acme", "cf.code.PHONE@MOB": "+1",
                "cf.name.Industry": "Retail", "cf.id.5": "1234567.50", "cf.name.City": null,
                "tags": ["a", "b"], "updated_at": 5})),
            &catalogue(),
        )
        .unwrap();
        assert_eq!(
            Value::Object(body),
            json!({"name": "Acme", "_embedded": {"tags": [{"name": "a"}, {"name": "b"}]},
                "custom_fields_values": [
                    {"field_id": 3, "values": [{"value": "+1", "enum_code": "MOB"}]},
                    {"field_id": 4, "values": [{"enum_id": 40}]},
                    {"field_id": 5, "values": [{"value": serde_json::from_str::<Number>("1234567.50").unwrap()}]},
                    {"field_id": 6, "values": null}]})
        );
    }

    #[test]
    fn multitext_defaults_to_work_and_empty_tags_clear_the_set() {
        let body = build_body(
            &fields(json!({"cf.code.PHONE": "+1", "tags": []})),
            &catalogue(),
        )
        .unwrap();
        assert_eq!(
            body["custom_fields_values"][0]["values"][0]["enum_code"],
            "WORK"
        );
        assert_eq!(body["_embedded"], json!({"tags": null}));
    }

    #[test]
    fn unknown_select_options_and_fields_are_refused() {
        let e =
            build_body(&fields(json!({"cf.name.Industry": "Mining"})), &catalogue()).unwrap_err();
        assert!(e.contains("Mining") && e.contains("Retail"), "{e}");
        let e = build_body(&fields(json!({"cf.name.Nope": "x"})), &catalogue()).unwrap_err();
        assert!(e.contains("cf.name.Nope"), "{e}");
    }

    #[test]
    fn validation_errors_are_keyed_by_request_id() {
        let v = json!({"validation-errors": [{"request_id": "2", "errors": [
            {"code": "InvalidType", "path": "custom_fields_values.0.values.0.value",
             "detail": "This value should be of type numeric."}]}]});
        let m = validation_errors(&v).unwrap();
        assert_eq!(
            m["2"],
            "custom_fields_values.0.values.0.value: This value should be of type numeric. (InvalidType)"
        );
    }
}
