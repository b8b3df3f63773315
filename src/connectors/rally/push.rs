//! Writing to Rally: updates by id (every mapped field), bulk upserts by domain (with an upsert
//! fallback to learn the ids of matched records), bulk creates of records without a domain
//! on their first attempt, and guarded one-by-one creates for their replays. A bulk Rally
//! refuses as a whole is sent again item by item, so one bad record cannot sink a hundred.
//! One outcome per item; per-record verdicts become `Rejected`.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::Utc;
use futures::StreamExt;
use serde_json::{Map, Value};

use super::RallyConnector;
use super::bulk_shape::BulkShape;
use super::wire::{RecordVerdictClassifier, error_message, list_rows, wire_time};
use crate::connector::{ConnectorError, PushItem, PushOutcome};
use crate::http::{ApiRequest, ApiResponse, HttpError};

/// How much earlier than a create's first attempt, by our clock, Rally may date the record
/// it made (clocks differ): a same-named record created before that is someone else's.
const TWIN_CLOCK_SLACK: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Most records one `POST /companies/bulk` takes (Rally's documented limit).
pub const BULK_MAX: usize = 100;

/// How far before the start of a bulk (on the server's clock: its `Date` minus the call's
/// duration) the look-up of the records it touched starts: `Date` has whole seconds.
/// Kept short, since the rows a busy backfill updated in a wider window would push the
/// bulk's own rows (the newest: the list is ordered by creation) pages further.
const BULK_LOOKUP_SLACK: chrono::TimeDelta = chrono::TimeDelta::seconds(2);

/// The time a response's `Date` header gives, if it gives one.
fn response_date(resp: &ApiResponse) -> Option<chrono::DateTime<Utc>> {
    resp.headers
        .get(reqwest::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| chrono::DateTime::parse_from_rfc2822(s).ok())
        .map(|d| d.with_timezone(&Utc))
}

/// What happened to one item: a definite outcome, or an error that concerns the whole
/// connector (credentials, suspension, misconfiguration).
type ItemResult = Result<PushOutcome, ConnectorError>;

/// One unit of work of a push.
enum Job {
    /// `PUT /companies/{id}` for the item at this index.
    Update(usize),
    /// `POST /companies/bulk` for these items (all with a domain).
    Bulk(Vec<usize>),
    /// `POST /companies/bulk` for these items, all without a domain and never sent before
    /// (a bulk create is not idempotent without a domain: an unknown outcome makes each
    /// item a replay, which looks for its twin before creating it alone).
    BulkNew(Vec<usize>),
    /// `POST /companies` for the item at this index (no domain).
    Create(usize),
}

/// The item's domain, if it has a non-blank one (the upsert match key).
fn domain_of(fields: &Map<String, Value>) -> Option<&str> {
    fields
        .get("domain")
        .and_then(Value::as_str)
        .filter(|d| !d.trim().is_empty())
}

/// Turns a failed call for one item into its outcome: transient failures (the client has
/// already retried) are `Retry`; failures of the whole connector stay errors.
fn item_error(e: HttpError) -> ItemResult {
    match e {
        HttpError::Transient { .. }
        | HttpError::Timeout { .. }
        | HttpError::Connection { .. }
        | HttpError::Decode { .. } => Ok(PushOutcome::Retry {
            reason: e.to_string(),
        }),
        HttpError::Rejected { detail, .. } => Ok(PushOutcome::Rejected { reason: detail }),
        other => Err(other.into()),
    }
}

/// A verdict answer (4xx the [`RecordVerdictClassifier`] lets through) as `Rejected`.
fn rejected(resp: &ApiResponse) -> PushOutcome {
    PushOutcome::Rejected {
        reason: error_message(resp),
    }
}

impl RallyConnector {
    /// Writes `items` (see the module docs); outcomes in item order.
    pub(super) async fn push_items(
        &self,
        items: &[PushItem],
    ) -> Result<Vec<PushOutcome>, ConnectorError> {
        let mut jobs = Vec::new();
        let mut bulk: Vec<usize> = Vec::new();
        let mut fresh: Vec<usize> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if item.vendor_id.is_some() {
                jobs.push(Job::Update(i));
            } else if domain_of(&item.fields).is_some() {
                bulk.push(i);
            } else if item.unconfirmed_since.is_none() {
                fresh.push(i);
            } else {
                jobs.push(Job::Create(i));
            }
        }
        let size = BULK_MAX.min(self.max_batch).max(1);
        jobs.extend(bulk.chunks(size).map(|c| Job::Bulk(c.to_vec())));
        jobs.extend(fresh.chunks(size).map(|c| Job::BulkNew(c.to_vec())));
        let results: Vec<Vec<(usize, ItemResult)>> = futures::stream::iter(jobs)
            .map(|job| self.run_job(job, items))
            .buffer_unordered(self.max_concurrent)
            .collect()
            .await;
        let mut slots: Vec<Option<ItemResult>> = (0..items.len()).map(|_| None).collect();
        for (i, r) in results.into_iter().flatten() {
            slots[i] = Some(r);
        }
        let slots: Vec<ItemResult> = slots
            .into_iter()
            .map(|s| {
                s.unwrap_or_else(|| {
                    Ok(PushOutcome::Retry {
                        reason: "no outcome was recorded for this item".into(),
                    })
                })
            })
            .collect();
        // An `Err` only when nothing definite can be said about any item.
        if slots.iter().all(Result::is_err) {
            if let Some(Err(e)) = slots.into_iter().next() {
                return Err(e);
            }
            return Ok(Vec::new());
        }
        Ok(slots
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|e| PushOutcome::Retry {
                    reason: e.to_string(),
                })
            })
            .collect())
    }

    async fn run_job(&self, job: Job, items: &[PushItem]) -> Vec<(usize, ItemResult)> {
        match job {
            Job::Update(i) => vec![(i, self.update_one(&items[i]).await)],
            Job::Create(i) => vec![(i, self.create_guarded(&items[i]).await)],
            Job::Bulk(idx) => self.bulk(&idx, items).await,
            Job::BulkNew(idx) => self.bulk_new(&idx, items).await,
        }
    }

    /// Each item on its own, after Rally refused their bulk as a whole (a 4xx naming no
    /// index): upserts for items with a domain, creates for the others (the refusal
    /// stored nothing, so these are first attempts).
    async fn one_by_one(&self, idx: &[usize], items: &[PushItem]) -> Vec<(usize, ItemResult)> {
        futures::stream::iter(idx.iter().copied())
            .map(|i| async move {
                let r = match domain_of(&items[i].fields) {
                    Some(_) => self.upsert_one(&items[i].fields, None).await,
                    None => self.create_guarded(&items[i]).await,
                };
                (i, r)
            })
            .buffer_unordered(self.max_concurrent)
            .collect()
            .await
    }

    /// `POST /companies/bulk` with the fields of items `idx`, in that order, in `shape`.
    fn bulk_request(&self, idx: &[usize], items: &[PushItem], shape: BulkShape) -> ApiRequest {
        let companies: Vec<Value> = idx
            .iter()
            .map(|&i| Value::Object(items[i].fields.clone()))
            .collect();
        ApiRequest::post("POST companies/bulk", self.url("api/v1/companies/bulk"))
            .auth(self.auth.clone())
            .json(shape.body(companies))
            .idempotent(idx.iter().all(|&i| domain_of(&items[i].fields).is_some()))
    }

    /// Sends the bulk of items `idx` in the body shape the server takes (see
    /// `bulk_shape`): a refusal as a whole that names no item, before any bulk has
    /// succeeded, is tried once more in the other shape, and the answer of that try is
    /// returned when it succeeds (the refusal otherwise).
    async fn send_bulk(&self, idx: &[usize], items: &[PushItem]) -> Result<ApiResponse, HttpError> {
        let shape = self.bulk_shape.current();
        let resp = self
            .client
            .send(
                self.bulk_request(idx, items, shape),
                &RecordVerdictClassifier,
            )
            .await?;
        if resp.status.is_success() {
            self.bulk_shape.confirm(shape);
            return Ok(resp);
        }
        let names_an_item = resp
            .json
            .as_ref()
            .and_then(BulkAnswer::parse)
            .is_some_and(|a| !a.errors.is_empty());
        if !matches!(resp.status.as_u16(), 400 | 415 | 422)
            || names_an_item
            || !self.bulk_shape.should_probe(shape)
        {
            return Ok(resp);
        }
        let other = BulkShape::Wrapped;
        let retry = self
            .client
            .send(
                self.bulk_request(idx, items, other),
                &RecordVerdictClassifier,
            )
            .await?;
        if !retry.status.is_success() {
            return Ok(resp);
        }
        tracing::info!(
            connector = %self.name,
            "Rally refused a bulk sent as a JSON array and took it as {{\"companies\": [...]}}: \
             bulks are sent so from now on"
        );
        self.bulk_shape.confirm(other);
        Ok(retry)
    }

    /// `POST /companies/bulk` creating items without a domain (see [`Job::BulkNew`]).
    async fn bulk_new(&self, idx: &[usize], items: &[PushItem]) -> Vec<(usize, ItemResult)> {
        let unknown = |why: String| -> Vec<(usize, ItemResult)> {
            idx.iter()
                .map(|&i| {
                    (
                        i,
                        Ok(PushOutcome::Unconfirmed {
                            reason: format!(
                                "{why}; the companies may have been created: each replay looks \
                                 for its twin first"
                            ),
                        }),
                    )
                })
                .collect()
        };
        let resp = match self.send_bulk(idx, items).await {
            Ok(r) => r,
            Err(e) if e.may_have_applied() => return unknown(e.to_string()),
            Err(e) => {
                let r = item_error(e);
                return idx.iter().map(|&i| (i, dup(&r))).collect();
            }
        };
        if !resp.status.is_success() {
            return self.one_by_one(idx, items).await;
        }
        let Some(answer) = resp.json.as_ref().and_then(BulkAnswer::parse) else {
            return unknown(format!("bulk answer unreadable: {}", resp.text_snippet()));
        };
        let (mut out, ok) = sort_bulk_answer(idx, &answer);
        if ok.is_empty() {
            return out;
        }
        // Created, but which id is whose is unclear: the replays find each by its twin.
        let why = format!(
            "bulk created {} of {} without saying which ids are whose",
            answer.created,
            ok.len()
        );
        out.extend(unknown(why).into_iter().filter(|(i, _)| ok.contains(i)));
        out
    }

    /// `PUT /companies/{id}` with the item's fields (a partial update).
    async fn update_one(&self, item: &PushItem) -> ItemResult {
        let id = item.vendor_id.as_deref().unwrap_or_default();
        let req = ApiRequest::new(
            reqwest::Method::PUT,
            "PUT companies/{id}",
            self.company_url(id),
        )
        .auth(self.auth.clone())
        .json(Value::Object(item.fields.clone()));
        let resp = match self.client.send(req, &RecordVerdictClassifier).await {
            Ok(r) => r,
            Err(e) => return item_error(e),
        };
        match resp.status.as_u16() {
            200..=299 => Ok(PushOutcome::Written {
                vendor_id: resp
                    .json
                    .as_ref()
                    .and_then(|j| j.get("id"))
                    .and_then(Value::as_str)
                    .unwrap_or(id)
                    .to_string(),
                created: false,
            }),
            404 if self.opts.recreate_deleted => {
                tracing::info!(connector = %self.name, vendor_id = id, "record deleted in Rally: creating it again");
                match domain_of(&item.fields) {
                    Some(_) => self.upsert_one(&item.fields, None).await,
                    None => self.create_guarded(item).await,
                }
            }
            404 => Ok(PushOutcome::Rejected {
                reason: format!(
                    "deleted in Rally (404: {}); not re-created (recreate_deleted is off)",
                    error_message(&resp)
                ),
            }),
            _ => Ok(rejected(&resp)),
        }
    }

    /// `PUT /companies/upsert` (idempotent by domain). `created_ids`, when given, says which
    /// ids an earlier bulk call created (the upsert then reports them as updated).
    async fn upsert_one(
        &self,
        fields: &Map<String, Value>,
        created_ids: Option<&HashSet<String>>,
    ) -> ItemResult {
        let req = ApiRequest::new(
            reqwest::Method::PUT,
            "PUT companies/upsert",
            self.url("api/v1/companies/upsert"),
        )
        .auth(self.auth.clone())
        .json(Value::Object(fields.clone()));
        let resp = match self.client.send(req, &RecordVerdictClassifier).await {
            Ok(r) => r,
            Err(e) => return item_error(e),
        };
        if !resp.status.is_success() {
            return Ok(rejected(&resp));
        }
        let body = resp.json.as_ref();
        let id = body.and_then(|j| j.get("id")).and_then(Value::as_str);
        let action = body.and_then(|j| j.get("action")).and_then(Value::as_str);
        match id {
            Some(id) => Ok(PushOutcome::Written {
                vendor_id: id.to_string(),
                created: created_ids.map_or(action == Some("created"), |c| c.contains(id)),
            }),
            // Written, but we cannot tell where: an idempotent replay will tell.
            None => Ok(PushOutcome::Retry {
                reason: format!("upsert answer without an id: {}", resp.text_snippet()),
            }),
        }
    }

    /// `POST /companies/bulk` for items with a domain (matched like upsert, so the call is
    /// idempotent and replayed freely).
    async fn bulk(&self, idx: &[usize], items: &[PushItem]) -> Vec<(usize, ItemResult)> {
        let all = |r: ItemResult| -> Vec<(usize, ItemResult)> {
            idx.iter().map(|&i| (i, dup(&r))).collect()
        };
        let sent = std::time::Instant::now();
        let resp = match self.send_bulk(idx, items).await {
            Ok(r) => r,
            Err(e) => return all(item_error(e)),
        };
        if !resp.status.is_success() {
            return self.one_by_one(idx, items).await;
        }
        let Some(answer) = resp.json.as_ref().and_then(BulkAnswer::parse) else {
            return all(Ok(PushOutcome::Retry {
                reason: format!("bulk answer unreadable: {}", resp.text_snippet()),
            }));
        };
        let (mut out, ok) = sort_bulk_answer(idx, &answer);
        if ok.is_empty() {
            return out;
        }
        // Some matched an existing domain and were updated: the answer does not say which
        // ids belong to whom. Rally keeps one company per domain, so the records the bulk
        // touched, listed by `updatedSince`, name each item's id by its domain; an item
        // the list does not settle is upserted again (same body, idempotent) to learn it.
        let created: HashSet<String> = answer.created_ids.iter().cloned().collect();
        // Rally stamped the rows between receiving the call and its `Date`: both on its
        // clock, so the window needs no allowance for skew between the clocks.
        let took = chrono::TimeDelta::from_std(sent.elapsed()).unwrap_or_default();
        let since = match response_date(&resp) {
            Some(date) => date - took - BULK_LOOKUP_SLACK,
            None => Utc::now() - took - BULK_LOOKUP_SLACK * 5,
        };
        let by_domain = self.ids_by_domain(&ok, items, since).await;
        let (known, ok): (Vec<usize>, Vec<usize>) =
            ok.into_iter().partition(|i| by_domain.contains_key(i));
        out.extend(known.into_iter().map(|i| {
            let id = by_domain[&i].clone();
            let was_created = created.contains(&id);
            (
                i,
                Ok(PushOutcome::Written {
                    vendor_id: id,
                    created: was_created,
                }),
            )
        }));
        let resolved: Vec<(usize, ItemResult)> = futures::stream::iter(ok)
            .map(|i| {
                let created = &created;
                async move { (i, self.upsert_one(&items[i].fields, Some(created)).await) }
            })
            .buffer_unordered(self.max_concurrent)
            .collect()
            .await;
        out.extend(resolved);
        out
    }

    /// The ids of bulk items `idx` by their domain, among the records updated since
    /// `since` (paged to the end, or until every domain is seen, at most one page per
    /// item). Best effort: a failed or unreadable call ends the look-up, and a domain two
    /// records share is left out, so those items fall back to an upsert.
    async fn ids_by_domain(
        &self,
        idx: &[usize],
        items: &[PushItem],
        since: chrono::DateTime<Utc>,
    ) -> HashMap<usize, String> {
        let key = |d: &str| d.trim().to_lowercase();
        let mut wanted: HashMap<String, Vec<usize>> = HashMap::new();
        for &i in idx {
            if let Some(d) = domain_of(&items[i].fields) {
                wanted.entry(key(d)).or_default().push(i);
            }
        }
        // Domain → the one id seen with it (None once two ids were).
        let mut seen: HashMap<String, Option<String>> = HashMap::new();
        let page_size = self.page_size.get();
        let since = wire_time(&since);
        // Other bulks in flight at once touched rows in the same window, as many as a
        // busy backfill writes in a few seconds; the records sought may lie anywhere in
        // the listing. Paging on until it ends costs less than upserting the items it
        // would settle, up to one page per item.
        let pages = idx.len().max(1);
        for page in 0..pages {
            let req = ApiRequest::get("GET companies", self.url("api/v1/companies"))
                .auth(self.auth.clone())
                .query("limit", page_size.to_string())
                .query("offset", (page * page_size).to_string())
                .query("updatedSince", since.clone());
            let Ok(resp) = self.client.send(req, &crate::http::DefaultClassifier).await else {
                break;
            };
            let Some(rows) = resp.json.as_ref().and_then(list_rows) else {
                break;
            };
            for row in rows {
                let (Some(d), Some(id)) = (
                    row.get("domain").and_then(Value::as_str),
                    row.get("id").and_then(Value::as_str),
                ) else {
                    continue;
                };
                let d = key(d);
                if !wanted.contains_key(&d) {
                    continue;
                }
                match seen.get(&d) {
                    None => {
                        seen.insert(d, Some(id.to_string()));
                    }
                    Some(Some(other)) if other != id => {
                        seen.insert(d, None);
                    }
                    Some(_) => {}
                }
            }
            if rows.len() < page_size || seen.len() == wanted.len() {
                break;
            }
        }
        tracing::debug!(
            connector = %self.name,
            wanted = wanted.len(),
            found = seen.values().filter(|id| id.is_some()).count(),
            shared = seen.values().filter(|id| id.is_none()).count(),
            "ids of bulk items Rally updated, looked up by domain"
        );
        let mut out = HashMap::new();
        for (d, id) in seen {
            if let Some(id) = id {
                for &i in &wanted[&d] {
                    out.insert(i, id.clone());
                }
            }
        }
        out
    }

    /// `POST /companies` for an item without a domain. POST is not idempotent: after an
    /// earlier attempt (which may have landed unseen) a recent record of the same name is
    /// linked instead of creating a duplicate.
    async fn create_guarded(&self, item: &PushItem) -> ItemResult {
        if let Some(since) = item.unconfirmed_since {
            match self.find_recent_twin(&item.fields, since).await {
                Ok(Some(id)) => {
                    tracing::info!(connector = %self.name, vendor_id = %id, "linking a record an earlier create attempt left behind");
                    return Ok(PushOutcome::Written {
                        vendor_id: id,
                        created: true,
                    });
                }
                Ok(None) => {}
                Err(e) => return item_error(e),
            }
        }
        let req = ApiRequest::post("POST companies", self.url("api/v1/companies"))
            .auth(self.auth.clone())
            .json(Value::Object(item.fields.clone()));
        let resp = match self.client.send(req, &RecordVerdictClassifier).await {
            Ok(r) => r,
            Err(e) if e.may_have_applied() => {
                return Ok(PushOutcome::Unconfirmed {
                    reason: format!(
                        "{e}; the company may have been created: the replay looks for it first"
                    ),
                });
            }
            Err(e) => return item_error(e),
        };
        if !resp.status.is_success() {
            return Ok(rejected(&resp));
        }
        match resp
            .json
            .as_ref()
            .and_then(|j| j.get("id"))
            .and_then(Value::as_str)
        {
            Some(id) => Ok(PushOutcome::Written {
                vendor_id: id.to_string(),
                created: true,
            }),
            None => Ok(PushOutcome::Unconfirmed {
                reason: format!("create answer without an id: {}", resp.text_snippet()),
            }),
        }
    }

    /// A record updated within the lookup window whose name equals the item's; among
    /// several, the one agreeing on most pushed fields, then the newest.
    async fn find_recent_twin(
        &self,
        fields: &Map<String, Value>,
        first_sent: chrono::DateTime<Utc>,
    ) -> Result<Option<String>, HttpError> {
        // A record created before the first attempt cannot be its work (same-named
        // companies are common); a minute of slack for the server's clock.
        let not_before = first_sent - TWIN_CLOCK_SLACK;
        let Some(name) = fields.get("name").and_then(Value::as_str) else {
            return Ok(None);
        };
        let since = wire_time(&(Utc::now() - self.opts.lookup_window));
        let mut best: Option<(usize, String, String)> = None;
        let page_size = self.page_size.get();
        for page in 0..self.opts.lookup_max_pages {
            let req = ApiRequest::get("GET companies", self.url("api/v1/companies"))
                .auth(self.auth.clone())
                .query("limit", page_size.to_string())
                .query("offset", (page * page_size).to_string())
                .query("updatedSince", since.clone());
            let resp = self
                .client
                .send(req, &crate::http::DefaultClassifier)
                .await?;
            // An unreadable answer must not read as "no such record": that would create
            // the duplicate this look-up exists to prevent.
            let Some(rows) = resp.json.as_ref().and_then(list_rows) else {
                return Err(HttpError::Decode {
                    connector: self.name.clone(),
                    endpoint: "GET companies",
                    detail: format!("not a JSON array: {}", resp.text_snippet()),
                });
            };
            for row in rows {
                if row.get("name").and_then(Value::as_str) != Some(name) {
                    continue;
                }
                let Some(id) = row.get("id").and_then(Value::as_str) else {
                    continue;
                };
                let created_at = row
                    .get("createdAt")
                    .and_then(Value::as_str)
                    .and_then(super::wire::parse_time);
                if created_at.is_some_and(|t| t < not_before) {
                    continue;
                }
                let agree = fields
                    .iter()
                    .filter(|(k, v)| row.get(*k) == Some(v))
                    .count();
                let created = row
                    .get("createdAt")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let better = best
                    .as_ref()
                    .is_none_or(|(a, _, c)| (agree, &created) > (*a, c));
                if better {
                    best = Some((agree, created, id.to_string()));
                }
            }
            if rows.len() < page_size {
                break;
            }
        }
        Ok(best.map(|(_, _, id)| id))
    }
}

/// A bulk answer's verdicts for items `idx`: per-index errors as `Rejected`, and, when every
/// success was a creation (Rally then lists their ids in request order), the successes as
/// `Written`. The successes it cannot pair with ids are handed back, in request order.
fn sort_bulk_answer(idx: &[usize], answer: &BulkAnswer) -> (Vec<(usize, ItemResult)>, Vec<usize>) {
    let mut out = Vec::with_capacity(idx.len());
    let mut ok = Vec::new();
    for (pos, &i) in idx.iter().enumerate() {
        match answer.errors.get(&pos) {
            Some(reason) => out.push((
                i,
                Ok(PushOutcome::Rejected {
                    reason: reason.clone(),
                }),
            )),
            None => ok.push(i),
        }
    }
    if answer.created as usize == ok.len() && answer.created_ids.len() == ok.len() {
        out.extend(ok.drain(..).zip(&answer.created_ids).map(|(i, id)| {
            (
                i,
                Ok(PushOutcome::Written {
                    vendor_id: id.clone(),
                    created: true,
                }),
            )
        }));
    }
    (out, ok)
}

/// A copy of a bulk-wide result for each of its items (`ConnectorError` is not `Clone`).
fn dup(r: &ItemResult) -> ItemResult {
    match r {
        Ok(o) => Ok(o.clone()),
        Err(ConnectorError::Transient {
            connector,
            detail,
            retry_after,
        }) => Err(ConnectorError::Transient {
            connector: connector.clone(),
            detail: detail.clone(),
            retry_after: *retry_after,
        }),
        Err(ConnectorError::Auth { connector, detail }) => Err(ConnectorError::Auth {
            connector: connector.clone(),
            detail: detail.clone(),
        }),
        Err(ConnectorError::Suspended {
            connector,
            detail,
            until,
        }) => Err(ConnectorError::Suspended {
            connector: connector.clone(),
            detail: detail.clone(),
            until: *until,
        }),
        Err(ConnectorError::Fatal { connector, detail }) => Err(ConnectorError::Fatal {
            connector: connector.clone(),
            detail: detail.clone(),
        }),
    }
}

/// The answer of `POST /companies/bulk`.
#[derive(Debug, PartialEq)]
struct BulkAnswer {
    created: u64,
    created_ids: Vec<String>,
    /// Reason per request index.
    errors: BTreeMap<usize, String>,
}

impl BulkAnswer {
    fn parse(v: &Value) -> Option<BulkAnswer> {
        let created = v.get("created")?.as_u64()?;
        let created_ids = match v.get("createdIds") {
            None | Some(Value::Null) => Vec::new(),
            Some(ids) => ids
                .as_array()?
                .iter()
                .map(|i| i.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()?,
        };
        let mut errors = BTreeMap::new();
        if let Some(list) = v.get("errors").filter(|e| !e.is_null()) {
            for e in list.as_array()? {
                let index = usize::try_from(e.get("index")?.as_u64()?).ok()?;
                let reason = match e.get("error") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => "rejected by Rally (no reason given)".into(),
                };
                errors.insert(index, reason);
            }
        }
        Some(BulkAnswer {
            created,
            created_ids,
            errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bulk_answer_maps_errors_by_index() {
        let a = BulkAnswer::parse(&json!({
            "created": 1, "updated": 0, "failed": 1,
            "createdIds": ["x"], "errors": [{"index": 1, "error": "Company name is required"}]
        }))
        .unwrap();
        assert_eq!(a.created_ids, vec!["x".to_string()]);
        assert_eq!(
            a.errors.get(&1).map(String::as_str),
            Some("Company name is required")
        );
    }

    #[test]
    fn bulk_answer_without_counts_is_unreadable() {
        assert_eq!(BulkAnswer::parse(&json!({"createdIds": []})), None);
    }
}
