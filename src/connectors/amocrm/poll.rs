//! The amoCRM change feed: a keyset cursor on `(updated_at, id)` with an exact-second
//! procedure for seconds holding more than a page of records, and a descending-scan
//! fallback for accounts without API filtering. See the module docs of `amocrm` for the
//! design; this file holds the cursor type and one poll step.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::AmocrmConnector;
use super::wire::ParsedPage;
use crate::connector::{ConnectorError, Cursor, Page, PollMode, VendorRecord};

/// Records per list call (amoCRM's maximum).
pub const PAGE_LIMIT: usize = 250;

/// State of a running exact-second procedure (more than a page of records share the
/// cursor's second).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondScan {
    /// The page of `from=to=ts` to read next.
    pub page: u32,
    /// Whether the running pass found an id not seen before.
    pub added: bool,
    /// Rows the running pass has listed so far.
    pub count: u64,
    /// Rows the previous complete pass listed.
    pub prev_count: Option<u64>,
}

/// The connector's position, stored by the engine as JSON.
///
/// Invariant: every record with `updated_at < ts` has been returned, and of the records
/// with `updated_at == ts` those in `ids`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmoCursor {
    /// Unix seconds.
    pub ts: i64,
    /// Ids already returned at second `ts`.
    #[serde(default)]
    pub ids: BTreeSet<i64>,
    /// The running cycle's upper bound (Unix seconds, inclusive), fixed when the cycle
    /// starts; `None` between cycles.
    #[serde(default)]
    pub upper: Option<i64>,
    /// The exact-second procedure for second `ts`, when one is running.
    #[serde(default)]
    pub second: Option<SecondScan>,
    /// Fallback (no API filter): the next page of the descending scan.
    #[serde(default)]
    pub scan_page: Option<u32>,
}

impl AmoCursor {
    /// Reads the engine's cursor; JSON null starts at `since` (or the beginning).
    pub fn from_cursor(c: &Cursor, mode: &PollMode) -> Result<AmoCursor, String> {
        if c.0.is_null() {
            let since = match mode {
                PollMode::Full { since: Some(s) } => s.timestamp().max(0),
                _ => 0,
            };
            return Ok(AmoCursor {
                ts: since,
                ..AmoCursor::default()
            });
        }
        serde_json::from_value(c.0.clone()).map_err(|e| format!("unreadable amoCRM cursor: {e}"))
    }

    /// The engine's form.
    pub fn to_cursor(&self) -> Cursor {
        Cursor(serde_json::to_value(self).expect("the cursor serialises"))
    }

    /// Ends the cycle: everything up to `upper` has been returned.
    fn finish(&mut self, upper: i64) {
        if upper + 1 > self.ts {
            self.ts = upper + 1;
            self.ids.clear();
        }
        self.upper = None;
        self.second = None;
        self.scan_page = None;
    }

    /// Keyset step: keeps `r` if it is after the cursor, and moves the cursor to it.
    fn take(&mut self, r: &VendorRecord) -> bool {
        let ts = r.updated_at.timestamp();
        let Ok(id) = r.vendor_id.parse::<i64>() else {
            return false;
        };
        if ts > self.ts {
            self.ts = ts;
            self.ids.clear();
            self.ids.insert(id);
            true
        } else if ts == self.ts {
            self.ids.insert(id)
        } else {
            false
        }
    }
}

/// How long after a second ends the writes stamped with it are all taken to be listed: a
/// write stamped just before the second ended may be stored a little later (a batch of
/// 250 takes the server a while), and the server's clock may be a little behind ours.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(300);

/// The last second a cycle starting at `now` reads: whole seconds that were over
/// [`SETTLE`] ago, so a later write cannot land in them.
fn upper_bound(now: chrono::DateTime<Utc>) -> i64 {
    let settled = now - chrono::Duration::from_std(SETTLE).expect("a short duration");
    settled.timestamp() - 1
}

/// Drops from `p` the records updated after second `last` (they stay uncounted in its raw
/// count); true if there were any.
fn drop_after(p: &mut ParsedPage, last: i64) -> bool {
    let before = p.records.len();
    p.records.retain(|r| r.updated_at.timestamp() <= last);
    let dropped = before - p.records.len();
    p.raw_count -= dropped;
    dropped > 0
}

fn page_of(records: Vec<VendorRecord>, p: &mut ParsedPage, c: &AmoCursor, more: bool) -> Page {
    Page {
        records,
        malformed: std::mem::take(&mut p.malformed),
        next: c.to_cursor(),
        more,
    }
}

impl AmocrmConnector {
    /// Page `page` (ascending by `updated_at`) of the companies updated from second `from`
    /// to `to` (the callers drop rows outside the seconds they want). amoCRM does not say whether `from` is
    /// inclusive: until a row updated exactly at the `from` sent proves it is, the call
    /// asks from one second earlier (an exclusive server then lists `from` too), and once
    /// proven makes that call again as asked — the page numbers of a pass must count the
    /// same rows in every call.
    async fn list_from(
        &self,
        from: i64,
        to: i64,
        page: u32,
    ) -> Result<Option<ParsedPage>, ConnectorError> {
        let params = |from: i64| {
            vec![
                ("filter[updated_at][from]".to_string(), from.to_string()),
                ("filter[updated_at][to]".to_string(), to.to_string()),
                ("order[updated_at]".to_string(), "asc".to_string()),
                ("limit".to_string(), PAGE_LIMIT.to_string()),
                ("page".to_string(), page.to_string()),
            ]
        };
        if from > 0 && !self.from_inclusive.load(Ordering::Relaxed) {
            let Some(p) = self.list(params(from - 1)).await? else {
                return Ok(None);
            };
            if !p
                .records
                .iter()
                .any(|r| r.updated_at.timestamp() == from - 1)
            {
                return Ok(Some(p));
            }
            tracing::info!(connector = %self.name, "amoCRM lists filter[updated_at][from] inclusively: asking from the cursor's own second from now on");
            self.from_inclusive.store(true, Ordering::Relaxed);
        }
        self.list(params(from)).await
    }

    /// One poll step (one list call at most).
    pub(crate) async fn poll_step(
        &self,
        cursor: &Cursor,
        mode: &PollMode,
    ) -> Result<Page, ConnectorError> {
        let mut c =
            AmoCursor::from_cursor(cursor, mode).map_err(|detail| ConnectorError::Fatal {
                connector: self.name.clone(),
                detail,
            })?;
        let upper = match c.upper {
            Some(u) => u,
            None => {
                let u = upper_bound(Utc::now());
                if c.ts > u {
                    return Ok(Page {
                        next: c.to_cursor(),
                        ..Page::default()
                    });
                }
                c.upper = Some(u);
                u
            }
        };
        if !self.filter_enabled() {
            return self.fallback_step(c, upper).await;
        }
        if c.second.is_some() {
            return self.second_step(c).await;
        }
        if c.ts > upper {
            c.finish(upper);
            return Ok(Page {
                next: c.to_cursor(),
                ..Page::default()
            });
        }
        // One past `upper`: a server reading `to` as exclusive still lists `upper`.
        let Some(mut p) = self.list_from(c.ts, upper + 1, 1).await? else {
            c.finish(upper);
            return Ok(Page {
                next: c.to_cursor(),
                ..Page::default()
            });
        };
        // Rows after `upper` are the next cycle's; listed in ascending order, one of them
        // means the window is exhausted.
        let past_upper = drop_after(&mut p, upper);
        let full = !past_upper && p.may_continue(PAGE_LIMIT);
        let one_second = p.records.first().map(|r| r.updated_at.timestamp());
        if full
            && let Some(s) = one_second
            && p.records.iter().all(|r| r.updated_at.timestamp() == s)
        {
            // A full page inside one second: keyset paging cannot get past it. This page
            // is page 1 of the first pass over that exact second.
            if s > c.ts {
                c.ts = s;
                c.ids.clear();
            }
            let mut scan = SecondScan {
                page: 2,
                ..SecondScan::default()
            };
            let records = self.take_second(&mut c, &mut scan, &p);
            c.second = Some(scan);
            tracing::info!(connector = %self.name, second = s, "more than a page of companies share one second: paging through it exactly");
            return Ok(page_of(records, &mut p, &c, true));
        }
        let records: Vec<VendorRecord> = std::mem::take(&mut p.records)
            .into_iter()
            .filter(|r| c.take(r))
            .collect();
        // A short page the server linked onwards goes on only while it brings news (a
        // server linking a last page onwards must not keep the cycle going).
        let more = full && (p.raw_count >= PAGE_LIMIT || !records.is_empty());
        if !more {
            c.finish(upper);
        }
        Ok(page_of(records, &mut p, &c, more))
    }

    /// Adds the unseen records of one exact-second page to the cursor.
    fn take_second(
        &self,
        c: &mut AmoCursor,
        scan: &mut SecondScan,
        p: &ParsedPage,
    ) -> Vec<VendorRecord> {
        scan.count += p.raw_count as u64;
        let mut out = Vec::new();
        for r in &p.records {
            if r.updated_at.timestamp() != c.ts {
                continue;
            }
            if let Ok(id) = r.vendor_id.parse::<i64>()
                && c.ids.insert(id)
            {
                scan.added = true;
                out.push(r.clone());
            }
        }
        out
    }

    /// One page of the exact-second procedure: pages 1..n of `from=to=ts`, then passes
    /// again until a pass finds no new id and lists as many rows as the pass before —
    /// rows only leave a past second, so such a pass cannot have lost one to a shift.
    async fn second_step(&self, mut c: AmoCursor) -> Result<Page, ConnectorError> {
        let mut scan = c.second.take().unwrap_or_default();
        // One past the second, as in `poll_step`; rows after it end the pass.
        let fetched = self.list_from(c.ts, c.ts + 1, scan.page.max(1)).await?;
        let mut p = fetched.unwrap_or_default();
        let past_second = drop_after(&mut p, c.ts);
        let records = self.take_second(&mut c, &mut scan, &p);
        if !past_second && p.may_continue(PAGE_LIMIT) {
            scan.page = scan.page.max(1) + 1;
            c.second = Some(scan);
            return Ok(page_of(records, &mut p, &c, true));
        }
        // The pass is over.
        if !scan.added && scan.prev_count == Some(scan.count) {
            tracing::debug!(connector = %self.name, second = c.ts, rows = scan.count, "exact second fully read");
            c.ts += 1;
            c.ids.clear();
        } else {
            c.second = Some(SecondScan {
                page: 1,
                added: false,
                count: 0,
                prev_count: Some(scan.count),
            });
        }
        Ok(page_of(records, &mut p, &c, true))
    }

    /// Without API filtering: scan `order[updated_at]=desc` page by page until records
    /// are older than the cursor. Records newer than the cycle's upper bound are left to
    /// the next cycle, which reads them because the cursor ends at `upper + 1`.
    async fn fallback_step(&self, mut c: AmoCursor, upper: i64) -> Result<Page, ConnectorError> {
        let page_no = c.scan_page.unwrap_or(1);
        let params = vec![
            ("order[updated_at]".to_string(), "desc".to_string()),
            ("limit".to_string(), PAGE_LIMIT.to_string()),
            ("page".to_string(), page_no.to_string()),
        ];
        let Some(mut p) = self.list(params).await? else {
            c.finish(upper);
            return Ok(Page {
                next: c.to_cursor(),
                ..Page::default()
            });
        };
        let mut reached_old = false;
        let records: Vec<VendorRecord> = std::mem::take(&mut p.records)
            .into_iter()
            .filter(|r| {
                let ts = r.updated_at.timestamp();
                if ts < c.ts {
                    reached_old = true;
                }
                let seen = ts == c.ts
                    && r.vendor_id
                        .parse::<i64>()
                        .is_ok_and(|id| c.ids.contains(&id));
                ts <= upper && ts >= c.ts && !seen
            })
            .collect();
        let more = !reached_old && p.may_continue(PAGE_LIMIT);
        if more {
            c.scan_page = Some(page_no + 1);
        } else {
            c.finish(upper);
        }
        Ok(page_of(records, &mut p, &c, more))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_through_json() {
        let c = AmoCursor {
            ts: 1_700_000_000,
            ids: [5, 7].into_iter().collect(),
            upper: Some(1_700_000_100),
            second: Some(SecondScan {
                page: 3,
                added: true,
                count: 500,
                prev_count: None,
            }),
            scan_page: None,
        };
        let back = AmoCursor::from_cursor(&c.to_cursor(), &PollMode::Incremental).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn a_null_cursor_starts_at_the_backfill_since() {
        let since = chrono::DateTime::from_timestamp(1_650_000_000, 0).unwrap();
        let c = AmoCursor::from_cursor(&Cursor::start(), &PollMode::Full { since: Some(since) })
            .unwrap();
        assert_eq!(c.ts, 1_650_000_000);
        let c = AmoCursor::from_cursor(&Cursor::start(), &PollMode::Incremental).unwrap();
        assert_eq!(c.ts, 0);
    }

    #[test]
    fn a_cycle_reads_only_seconds_over_for_longer_than_the_settling_time() {
        let at = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap();
        // 100.35 s: second 99 ended 350 ms ago.
        assert_eq!(upper_bound(at(100_350)), 99);
        // 100.10 s: second 99 ended only 100 ms ago; a write stamped 99 may not be
        // stored yet.
        assert_eq!(upper_bound(at(100_100)), 98);
    }

    #[test]
    fn finishing_a_cycle_moves_past_the_upper_bound_only() {
        let mut c = AmoCursor {
            ts: 10,
            ids: [1].into_iter().collect(),
            upper: Some(20),
            ..AmoCursor::default()
        };
        c.finish(20);
        assert_eq!((c.ts, c.ids.len(), c.upper), (21, 0, None));
    }
}
