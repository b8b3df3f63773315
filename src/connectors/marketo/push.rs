//! Writing companies: `POST /rest/v1/companies.json` sync calls, split by how each item is
//! keyed, with per-record outcomes and batch halving on 413/414.

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Map, Value, json};

use super::MarketoConnector;
use super::wire::Describe;
use crate::connector::{ConnectorError, PushItem, PushOutcome};
use crate::http::{ApiRequest, HttpError};

/// Per-record reason codes that retrying later can fix: limits and outages reported per
/// record, and 1036 (the same key twice in one batch: the later one goes in the next batch).
const TRANSIENT_RECORD_CODES: &[&str] = &["604", "606", "608", "611", "615", "713", "1029", "1036"];

/// How one sync call keys its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncMode {
    /// Linked items: `updateOnly` by `idField` — Marketo's id never changes, and
    /// `externalCompanyId` (immutable after creation) is never sent.
    UpdateById,
    /// Unlinked items: `createOrUpdate` by `dedupeFields` (`externalCompanyId`), idempotent.
    UpsertByExternalId,
}

impl SyncMode {
    fn body(self, input: Vec<Value>) -> Value {
        match self {
            SyncMode::UpdateById => {
                json!({"action": "updateOnly", "dedupeBy": "idField", "input": input})
            }
            SyncMode::UpsertByExternalId => {
                json!({"action": "createOrUpdate", "dedupeBy": "dedupeFields", "input": input})
            }
        }
    }
}

/// One item ready to send: its position in the push and its input object.
type Entry = (usize, Value);

impl MarketoConnector {
    pub(super) async fn push_items(
        &self,
        items: &[PushItem],
    ) -> Result<Vec<PushOutcome>, ConnectorError> {
        let d = self.ensure_described().await?;
        let mut outcomes: Vec<Option<PushOutcome>> = vec![None; items.len()];
        let mut by_id: Vec<Entry> = Vec::new();
        let mut by_ext: Vec<Entry> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item.vendor_id.as_deref() {
                Some(v) => match v.trim().parse::<i64>() {
                    Ok(id) => {
                        let input = self.update_input(&d, item, id);
                        if input.as_object().is_some_and(|m| m.len() == 1) {
                            // Nothing a sync may set is left (an update carries only what
                            // changed, and never `externalCompanyId`): no call.
                            outcomes[i] = Some(PushOutcome::Written {
                                vendor_id: id.to_string(),
                                created: false,
                            });
                        } else {
                            by_id.push((i, input));
                        }
                    }
                    Err(_) => {
                        outcomes[i] = Some(PushOutcome::Rejected {
                            reason: format!("vendor id {v:?} is not a Marketo company id"),
                        });
                    }
                },
                None => by_ext.push((i, self.upsert_input(&d, item))),
            }
        }
        let groups: Vec<(SyncMode, Vec<Entry>)> = [
            (SyncMode::UpdateById, by_id),
            (SyncMode::UpsertByExternalId, by_ext),
        ]
        .into_iter()
        .filter(|(_, e)| !e.is_empty())
        .collect();
        let mut failures: Vec<(Vec<usize>, HttpError)> = Vec::new();
        let mut any_answer = outcomes.iter().any(Option::is_some);
        for (mode, entries) in groups {
            match self.sync_split(mode, &entries).await {
                Ok(done) => {
                    any_answer = true;
                    for (i, o) in done {
                        outcomes[i] = Some(o);
                    }
                }
                Err(e) => failures.push((entries.iter().map(|(i, _)| *i).collect(), e)),
            }
        }
        if !any_answer && let Some((_, e)) = failures.pop() {
            return Err(e.into());
        }
        for (idx, e) in failures {
            let o = failure_outcome(&e);
            for i in idx {
                outcomes[i] = Some(o.clone());
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| PushOutcome::Retry {
                    reason: "no outcome for this record".into(),
                })
            })
            .collect())
    }

    /// The fields of `item` this instance has and lets a sync write; others are dropped
    /// (an unknown field would skip the record with 1006).
    fn writable(&self, d: &Describe, item: &PushItem) -> Map<String, Value> {
        let mut out = Map::new();
        for (k, v) in &item.fields {
            match d.field(k) {
                Some(f) if f.updateable && k != "id" => {
                    out.insert(k.clone(), v.clone());
                }
                Some(_) => {}
                None => {
                    tracing::debug!(connector = %self.name, field = %k, "field absent on this instance: not sent")
                }
            }
        }
        out
    }

    fn update_input(&self, d: &Describe, item: &PushItem, id: i64) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), json!(id));
        m.extend(self.writable(d, item));
        m.remove("externalCompanyId");
        Value::Object(m)
    }

    fn upsert_input(&self, d: &Describe, item: &PushItem) -> Value {
        let ext = match item.fields.get("externalCompanyId") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            // Our canonical id is stable: a replay after an unknown outcome updates the
            // record the first attempt created instead of creating a second one.
            _ => item.canonical_id.clone(),
        };
        let mut m = Map::new();
        m.insert("externalCompanyId".into(), json!(ext));
        let mut rest = self.writable(d, item);
        rest.remove("externalCompanyId");
        m.extend(rest);
        Value::Object(m)
    }

    /// Sends `entries`, halving the batch while Marketo says it is too large (413/414).
    fn sync_split<'a>(
        &'a self,
        mode: SyncMode,
        entries: &'a [Entry],
    ) -> BoxFuture<'a, Result<Vec<(usize, PushOutcome)>, HttpError>> {
        async move {
            match self.sync_call(mode, entries).await {
                Err(HttpError::Rejected { class, .. }) if matches!(class, "413" | "414") => {
                    if entries.len() == 1 {
                        return Ok(vec![(
                            entries[0].0,
                            PushOutcome::Rejected {
                                reason: format!("HTTP {class}: the record alone exceeds Marketo's request size limit"),
                            },
                        )]);
                    }
                    tracing::info!(connector = %self.name, records = entries.len(), class, "sync batch too large: splitting it in halves");
                    let (a, b) = entries.split_at(entries.len() / 2);
                    let mut out = Vec::with_capacity(entries.len());
                    for half in [a, b] {
                        match self.sync_split(mode, half).await {
                            Ok(r) => out.extend(r),
                            Err(e) => {
                                let o = failure_outcome(&e);
                                out.extend(half.iter().map(|(i, _)| (*i, o.clone())));
                            }
                        }
                    }
                    Ok(out)
                }
                other => other,
            }
        }
        .boxed()
    }

    /// One sync call; per-record outcomes by `seq`.
    async fn sync_call(
        &self,
        mode: SyncMode,
        entries: &[Entry],
    ) -> Result<Vec<(usize, PushOutcome)>, HttpError> {
        let url = self
            .url("rest/v1/companies.json")
            .map_err(|e| HttpError::Config {
                connector: self.name.clone(),
                detail: e.to_string(),
            })?;
        let body = mode.body(entries.iter().map(|(_, v)| v.clone()).collect());
        // Both modes are idempotent (update by id; upsert by a stable key), so the client
        // may retry timeouts and 5xx.
        let req = ApiRequest::post("POST companies.json (sync)", url)
            .json(body)
            .auth(self.auth.clone())
            .idempotent(true);
        let resp = self.http.send(req, &self.classifier).await?;
        let result = resp
            .json_value()?
            .get("result")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut out: Vec<Option<PushOutcome>> = vec![None; entries.len()];
        for (pos, r) in result.iter().enumerate() {
            let seq = r
                .get("seq")
                .and_then(|s| s.as_u64().or_else(|| s.as_str()?.parse().ok()))
                .map_or(pos, |s| s as usize);
            if let Some(slot) = out.get_mut(seq) {
                let outcome = record_outcome(r);
                if let PushOutcome::Written { vendor_id, .. } = &outcome
                    && let Ok(id) = vendor_id.parse::<i64>()
                {
                    self.lowest_pushed_id
                        .fetch_min(id, std::sync::atomic::Ordering::Relaxed);
                }
                *slot = Some(outcome);
            }
        }
        Ok(entries
            .iter()
            .zip(out)
            .map(|((i, _), o)| {
                (
                    *i,
                    o.unwrap_or_else(|| PushOutcome::Retry {
                        reason: "Marketo returned no result for this record".into(),
                    }),
                )
            })
            .collect())
    }
}

/// The outcome of one sync result row.
fn record_outcome(r: &Value) -> PushOutcome {
    let id = r.get("id").and_then(|v| match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    });
    match (r.get("status").and_then(Value::as_str), id) {
        (Some("created"), Some(id)) => PushOutcome::Written {
            vendor_id: id,
            created: true,
        },
        (Some("updated"), Some(id)) => PushOutcome::Written {
            vendor_id: id,
            created: false,
        },
        (Some("skipped"), _) => {
            let reasons: Vec<(String, String)> = r
                .get("reasons")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|x| {
                    let code = match x.get("code") {
                        Some(Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                        None => "?".into(),
                    };
                    let msg = x
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    (code, msg)
                })
                .collect();
            let reason = if reasons.is_empty() {
                "skipped without a reason".to_string()
            } else {
                reasons
                    .iter()
                    .map(|(c, m)| format!("{c}: {m}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            if reasons
                .iter()
                .any(|(c, _)| TRANSIENT_RECORD_CODES.contains(&c.as_str()))
            {
                PushOutcome::Retry { reason }
            } else {
                PushOutcome::Rejected { reason }
            }
        }
        (status, _) => PushOutcome::Retry {
            reason: format!("unexpected sync result {r} (status {status:?})"),
        },
    }
}

/// What a failed call means for each of its records when other records of the push fared
/// better: a request-level refusal is the vendor's reason for each; anything else is retried.
fn failure_outcome(e: &HttpError) -> PushOutcome {
    match e {
        HttpError::Rejected { .. } => PushOutcome::Rejected {
            reason: e.to_string(),
        },
        _ => PushOutcome::Retry {
            reason: e.to_string(),
        },
    }
}
