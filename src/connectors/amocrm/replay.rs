//! Finding the companies that creates of unknown outcome may have made, so that their
//! replay updates them instead of creating duplicates: one scan of the newest companies
//! for a whole batch, and a search per company only where the scan cannot be conclusive.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;

use super::AmocrmConnector;
use super::push::{CallFailure, Entry, value_text};
use super::wire::{Catalogue, CustomField};
use crate::connector::{ConnectorError, PushItem, PushOutcome};
use crate::http::{ApiRequest, HttpError};
use crate::mapping::split_enum_suffix;
use crate::model::normalize_domain;

/// How far amoCRM's clock may lag ours: the scan looks this much further back than the
/// earliest unconfirmed send.
const CLOCK_SKEW: TimeDelta = TimeDelta::minutes(5);

/// The most pages one scan reads (250 companies each) before the remaining items are
/// searched one by one; a scan never reads more pages than it has items to find.
const MAX_SCAN_PAGES: usize = 40;

/// amoCRM's largest page.
const PAGE_SIZE: usize = 250;

/// What identifies the company an item would have created.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum MatchKey {
    /// The normalised value of the "Domain" custom field.
    Domain(String),
    /// The exact name, for items without a domain.
    Name(String),
}

impl MatchKey {
    /// The key of `item`: its domain if it has one, else its name; `None` when it has
    /// neither (nothing to search by).
    pub(super) fn of(item: &PushItem, catalogue: &Catalogue) -> Option<MatchKey> {
        let domain = catalogue.domain_field().and_then(|df| {
            item.fields.iter().find_map(|(k, v)| {
                let (base, _) = split_enum_suffix(k);
                (catalogue.resolve(base).map(|f| f.id) == Some(df.id))
                    .then(|| value_text(v))
                    .flatten()
                    .and_then(|t| normalize_domain(&t))
            })
        });
        if let Some(d) = domain {
            return Some(MatchKey::Domain(d));
        }
        item.fields
            .get("name")
            .and_then(value_text)
            .filter(|t| !t.trim().is_empty())
            .map(MatchKey::Name)
    }

    /// The text amoCRM's `query` search is given.
    fn query(&self) -> &str {
        match self {
            MatchKey::Domain(d) | MatchKey::Name(d) => d,
        }
    }
}

/// Every key a listed company answers to: its normalised domains and its name.
fn keys_of(company: &Value, domain_field: Option<&CustomField>) -> Vec<MatchKey> {
    let mut keys = Vec::new();
    if let Some(df) = domain_field {
        let values = company
            .get("custom_fields_values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|f| f.get("field_id").and_then(Value::as_i64) == Some(df.id))
            .filter_map(|f| f.get("values").and_then(Value::as_array))
            .flatten()
            .filter_map(|x| x.get("value").and_then(value_text));
        keys.extend(
            values
                .filter_map(|t| normalize_domain(&t))
                .map(MatchKey::Domain),
        );
    }
    if let Some(name) = company.get("name").and_then(Value::as_str) {
        keys.push(MatchKey::Name(name.to_string()));
    }
    keys
}

/// The companies of a list answer (none for a 204).
fn listed(resp: &crate::http::ApiResponse) -> Result<Vec<Value>, HttpError> {
    if resp.status.as_u16() == 204 {
        return Ok(Vec::new());
    }
    Ok(resp
        .json_value()?
        .get("_embedded")
        .and_then(|e| e.get("companies"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default())
}

/// What a scan of the newest companies found.
#[derive(Debug, Default)]
struct Scan {
    /// The id found for each key (the newest company answering to it).
    found: HashMap<MatchKey, i64>,
    /// True if every company created since the scan's bound was seen: a key not found
    /// then has no company, and its item can be created.
    complete: bool,
}

/// Where each replayed item goes after the look-ups.
#[derive(Debug, Default)]
pub(super) struct Resolved {
    /// Found: update this company.
    pub updates: Vec<Entry>,
    /// Certainly not there: create it.
    pub creates: Vec<Entry>,
    /// Nothing more can be sent in this push.
    pub stop: Option<ConnectorError>,
}

impl AmocrmConnector {
    /// Decides, for creates that may have landed unseen (`replays`), which to update and
    /// which to create. Items whose look-up failed get their outcome in `out`.
    pub(super) async fn resolve_replays(
        &self,
        items: &[PushItem],
        replays: Vec<Entry>,
        catalogue: &Catalogue,
        out: &mut [Option<PushOutcome>],
    ) -> Resolved {
        let mut r = Resolved::default();
        let mut keyed = Vec::new();
        for e in replays {
            match MatchKey::of(&items[e.idx], catalogue) {
                Some(k) => keyed.push((e, k)),
                // Nothing to search by: nothing could be found either.
                None => r.creates.push(e),
            }
        }
        let mut one_by_one = Vec::new();
        if keyed.len() > 1 {
            let since = keyed
                .iter()
                .filter_map(|(e, _)| items[e.idx].unconfirmed_since)
                .min()
                .unwrap_or_else(Utc::now)
                - CLOCK_SKEW;
            let wanted: HashSet<MatchKey> = keyed.iter().map(|(_, k)| k.clone()).collect();
            let pages = keyed.len().min(MAX_SCAN_PAGES);
            match self.scan_newest(&wanted, since, pages, catalogue).await {
                Ok(scan) => {
                    tracing::info!(connector = %self.name, replays = keyed.len(), found = scan.found.len(), complete = scan.complete, "scanned the newest companies for creates that may have landed");
                    for (e, k) in keyed {
                        match scan.found.get(&k) {
                            Some(id) => r.updates.push(Entry { id: Some(*id), ..e }),
                            None if scan.complete => r.creates.push(e),
                            None => one_by_one.push((e, k)),
                        }
                    }
                }
                // An account that refuses the scan itself (a 4xx for the ordering, say)
                // still answers searches: look each one up instead.
                Err(HttpError::Rejected { status, detail, .. }) => {
                    tracing::warn!(connector = %self.name, %status, detail = %detail, "amoCRM refused the newest-first scan: looking replayed creates up one by one");
                    one_by_one = keyed;
                }
                Err(f) => {
                    match self.failure(f, false) {
                        CallFailure::Retry(reason) | CallFailure::Unconfirmed(reason) => {
                            for (e, _) in keyed {
                                out[e.idx] = Some(PushOutcome::Retry {
                                    reason: reason.clone(),
                                });
                            }
                        }
                        CallFailure::Stop(err) => r.stop = Some(err),
                    }
                    return r;
                }
            }
        } else {
            one_by_one = keyed;
        }
        for (e, k) in one_by_one {
            if r.stop.is_some() {
                break;
            }
            match self.find_existing(&k, catalogue).await {
                Ok(Some(id)) => {
                    tracing::info!(connector = %self.name, id, "replayed create found an existing company: updating it");
                    r.updates.push(Entry { id: Some(id), ..e });
                }
                Ok(None) => r.creates.push(e),
                Err(f) => match self.failure(f, false) {
                    CallFailure::Retry(reason) | CallFailure::Unconfirmed(reason) => {
                        out[e.idx] = Some(PushOutcome::Retry { reason })
                    }
                    CallFailure::Stop(err) => r.stop = Some(err),
                },
            }
        }
        r
    }

    /// Reads companies newest first (`order[created_at]=desc`) until every key in
    /// `wanted` is found, a company created before `since` is seen, the list ends, or
    /// `max_pages` were read. A list not in that order (or without `created_at`) ends
    /// the scan as inconclusive rather than trusted.
    async fn scan_newest(
        &self,
        wanted: &HashSet<MatchKey>,
        since: DateTime<Utc>,
        max_pages: usize,
        catalogue: &Catalogue,
    ) -> Result<Scan, HttpError> {
        let domain_field = catalogue.domain_field();
        let since = since.timestamp();
        let mut scan = Scan::default();
        // Ids already read: companies created while we page push rows we have read onto
        // the next page (page-number paging), so a page may begin with repeats.
        let mut seen: HashSet<i64> = HashSet::new();
        // The oldest `created_at` read so far: a row not read before must not be newer.
        let mut floor: Option<i64> = None;
        for page in 1..=max_pages {
            let req = ApiRequest::get("GET companies", self.url("api/v4/companies"))
                .query("order[created_at]", "desc")
                .query("limit", PAGE_SIZE.to_string())
                .query("page", page.to_string())
                .auth(self.auth.clone());
            let resp = self.client.send(req, &self.read_classifier()).await?;
            let list = listed(&resp)?;
            let has_next = resp
                .json
                .as_ref()
                .and_then(|v| v.get("_links"))
                .and_then(|l| l.get("next"))
                .is_some();
            let mut reached_bound = false;
            let mut previous: Option<i64> = None;
            for c in &list {
                let Some(created) = c.get("created_at").and_then(Value::as_i64) else {
                    return Ok(scan);
                };
                let Some(id) = c.get("id").and_then(Value::as_i64) else {
                    return Ok(scan);
                };
                let out_of_order = previous.is_some_and(|p| created > p)
                    || (!seen.contains(&id) && floor.is_some_and(|f| created > f));
                if out_of_order {
                    tracing::warn!(connector = %self.name, "amoCRM did not list companies newest first: looking replayed creates up one by one");
                    return Ok(scan);
                }
                previous = Some(created);
                if !seen.insert(id) {
                    continue;
                }
                floor = Some(floor.map_or(created, |f| f.min(created)));
                reached_bound |= created < since;
                for key in keys_of(c, domain_field) {
                    if wanted.contains(&key) {
                        scan.found.entry(key).or_insert(id);
                    }
                }
            }
            if scan.found.len() == wanted.len()
                || reached_bound
                || list.is_empty()
                || (list.len() < PAGE_SIZE && !has_next)
            {
                scan.complete = true;
                return Ok(scan);
            }
        }
        Ok(scan)
    }

    /// A company answering to `key` (amoCRM's search, then an exact match on the
    /// "Domain" field or the name); of several, the oldest, the stable choice.
    async fn find_existing(
        &self,
        key: &MatchKey,
        catalogue: &Catalogue,
    ) -> Result<Option<i64>, HttpError> {
        let req = ApiRequest::get("GET companies", self.url("api/v4/companies"))
            .query("query", key.query())
            .query("limit", PAGE_SIZE.to_string())
            .auth(self.auth.clone());
        let resp = self.client.send(req, &self.read_classifier()).await?;
        let domain_field = catalogue.domain_field();
        Ok(listed(&resp)?
            .iter()
            .filter(|c| keys_of(c, domain_field).contains(key))
            .filter_map(|c| c.get("id").and_then(Value::as_i64))
            .min())
    }
}
