//! Draining a target's outbox: several batches in flight per target (up to the
//! connector's [`Connector::max_in_flight`]), each holding entries no other batch of this
//! process holds, with the store work of planning and recording on blocking threads.
//!
//! A batch is three steps: *plan* (one write transaction: take unclaimed entries, drop
//! no-ops, dead-letter what cannot be mapped or failed too often, mark the rest as being
//! sent, claim them), *push* (async, the connector's call), *record* (one write
//! transaction: links, ledger, dead letters, and removing or failing each entry; then the
//! claims are released). The claims are what keeps a company out of two concurrent pushes
//! — the outbox holds one entry per (target, company), so disjoint entries are disjoint
//! companies, and a new company is never created twice by two batches at once.
//!
//! [`Connector::max_in_flight`]: crate::connector::Connector::max_in_flight

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value as Json};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error_span, warn};

use super::run::MAX_PUSH_ATTEMPTS;
use super::{DrainStats, Endpoint, Engine, EngineError, visible_hash};
use crate::connector::{ConnectorError, PushItem, PushOutcome};
use crate::mapping::Before;
use crate::model::{Company, FieldPrints, Fields, Value};
use crate::store::{DeadLetterNew, Direction, LedgerEntry};

/// The most batches of one target ever in flight at once, whatever the connector allows:
/// every in-flight batch is up to `max_batch` entries marked "sending" that a crash would
/// leave to be re-sent.
pub const MAX_IN_FLIGHT: usize = 16;

/// Outbox entries (by seq, per target) that are in a batch of this process right now, and
/// what those batches write to existing records. Planning skips claimed entries; they are
/// released once the batch's outcome is committed (or its recording failed). Empty after
/// a restart: entries a crashed process left "sending" are planned again like any other.
#[derive(Debug, Default)]
pub(super) struct Claims(Mutex<ClaimState>);

#[derive(Debug, Default)]
struct ClaimState {
    /// Claimed outbox seqs, per target.
    seqs: BTreeMap<String, HashSet<u64>>,
    /// Per `(target, vendor id)`: the ledger entry of what a claimed batch writes there.
    writing: HashMap<(String, String), LedgerEntry>,
}

impl Claims {
    /// How many entries of `target` are claimed.
    fn count(&self, target: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .seqs
            .get(target)
            .map_or(0, HashSet::len)
    }

    /// True when entry `seq` of `target` is claimed.
    fn contains(&self, target: &str, seq: u64) -> bool {
        self.0
            .lock()
            .unwrap()
            .seqs
            .get(target)
            .is_some_and(|s| s.contains(&seq))
    }

    /// What a batch in flight writes to `target`'s record `vendor_id`, if one does: a read
    /// of that record may show it before its outcome is recorded.
    pub(super) fn in_flight(&self, target: &str, vendor_id: &str) -> Option<LedgerEntry> {
        self.0
            .lock()
            .unwrap()
            .writing
            .get(&(target.to_string(), vendor_id.to_string()))
            .cloned()
    }

    /// Claims `seqs` of `target`, and notes `writes` (vendor id, what is written there),
    /// until the returned guard is dropped.
    fn claim(
        self: &Arc<Self>,
        target: &str,
        seqs: Vec<u64>,
        writes: Vec<(String, LedgerEntry)>,
    ) -> ClaimGuard {
        let mut state = self.0.lock().unwrap();
        let set = state.seqs.entry(target.to_string()).or_default();
        for s in &seqs {
            let fresh = set.insert(*s);
            debug_assert!(fresh, "outbox entry {target}/{s} claimed twice");
        }
        let mut vendor_ids = Vec::with_capacity(writes.len());
        for (vendor_id, entry) in writes {
            state
                .writing
                .insert((target.to_string(), vendor_id.clone()), entry);
            vendor_ids.push(vendor_id);
        }
        ClaimGuard {
            claims: self.clone(),
            target: target.to_string(),
            seqs,
            vendor_ids,
        }
    }
}

/// Entries claimed by one batch; dropping it releases them (also when the batch's task is
/// aborted, so that a later drain can take them again).
#[derive(Debug)]
struct ClaimGuard {
    claims: Arc<Claims>,
    target: String,
    seqs: Vec<u64>,
    /// The records the batch writes (see [`ClaimState::writing`]).
    vendor_ids: Vec<String>,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let mut state = self.claims.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = state.seqs.get_mut(&self.target) {
            for s in &self.seqs {
                set.remove(s);
            }
        }
        for v in self.vendor_ids.drain(..) {
            state.writing.remove(&(self.target.clone(), v));
        }
    }
}

/// One planned batch: what to push, and per item its entry and the hash being pushed.
struct Plan {
    stats: DrainStats,
    items: Vec<PushItem>,
    /// Per item: its outbox seq, and the ledger entry of the content pushed (recorded
    /// once the target stored it).
    planned: Vec<(u64, LedgerEntry)>,
    /// The seqs of items sent without a value the target cannot hold.
    left_out: HashSet<u64>,
    /// Held until the outcome is committed.
    claim: Option<ClaimGuard>,
    /// When the batch was planned: its send starts no earlier.
    planned_at: DateTime<Utc>,
}

/// What the batches of one `drain_all` call share.
#[derive(Default)]
struct DrainShared {
    /// Entries that asked for a retry in this call: not taken again until the next call.
    failed: Arc<Mutex<HashSet<u64>>>,
    /// Set by the first error: no new batch starts.
    stop: AtomicBool,
    /// The error to report (the first, or a later suspension: it says how long to wait).
    error: Mutex<Option<EngineError>>,
    total: Mutex<DrainStats>,
    /// Per worker, when its current batch began.
    started: Mutex<Vec<Option<Instant>>>,
    /// Read the target's latest changes before planning each batch (the daemon; a
    /// backfill has just read everything).
    read_first: bool,
    /// Held from that read through the plan, so that the batch planned is the one whose
    /// records were read (two workers would otherwise read the same next batch).
    read_and_plan: tokio::sync::Mutex<()>,
}

impl DrainShared {
    fn fail(&self, err: EngineError) {
        self.stop.store(true, Ordering::SeqCst);
        let mut slot = self.error.lock().unwrap();
        let suspension = matches!(
            err,
            EngineError::Connector(ConnectorError::Suspended { .. })
        );
        if slot.is_none() || suspension {
            *slot = Some(err);
        }
    }
}

fn add_drain(total: &mut DrainStats, s: &DrainStats) {
    total.taken += s.taken;
    total.written += s.written;
    total.created += s.created;
    total.skipped += s.skipped;
    total.rejected += s.rejected;
    total.retried += s.retried;
    total.left_out += s.left_out;
}

impl Engine {
    /// Drains `target`'s outbox until it is empty or only holds entries that failed in
    /// this call, with up to the connector's [`max_in_flight`] batches in flight (capped at
    /// [`MAX_IN_FLIGHT`]); entries failing too often become dead letters. On `shutdown`,
    /// or after an error of any batch, no new batch starts and the ones in flight finish
    /// and record their outcome; the (first) error is returned then, a suspension taking
    /// precedence since it says how long to wait.
    ///
    /// [`max_in_flight`]: crate::connector::Connector::max_in_flight
    pub async fn drain_all(
        self: &Arc<Self>,
        target: &str,
        shutdown: &CancellationToken,
    ) -> Result<DrainStats, EngineError> {
        self.drain_with(target, shutdown, false).await
    }

    /// [`Engine::drain_all`] reading the target's latest changes before each batch that
    /// updates records of it (README, "Read before write"), so that a write does not
    /// overwrite an edit made there since its last poll. The daemon drains this way.
    pub async fn drain_fresh(
        self: &Arc<Self>,
        target: &str,
        shutdown: &CancellationToken,
    ) -> Result<DrainStats, EngineError> {
        self.drain_with(target, shutdown, true).await
    }

    async fn drain_with(
        self: &Arc<Self>,
        target: &str,
        shutdown: &CancellationToken,
        read_first: bool,
    ) -> Result<DrainStats, EngineError> {
        let ep = self.endpoint(target)?.clone();
        let width = ep.connector.max_in_flight().clamp(1, MAX_IN_FLIGHT);
        let batch = ep.connector.max_batch().max(1) as u64;
        let queued = {
            let t = target.to_string();
            self.blocking(move |e| Ok(e.store.begin_read()?.outbox_len(&t)?))
                .await?
        };
        // No more workers than batches: an idle one would only cost an empty plan.
        let workers = (queued.div_ceil(batch) as usize).clamp(1, width);
        let shared = Arc::new(DrainShared {
            started: Mutex::new(vec![None; workers]),
            read_first,
            ..Default::default()
        });
        let mut set = tokio::task::JoinSet::new();
        for slot in 0..workers {
            let (me, t, sh, sd) = (
                self.clone(),
                target.to_string(),
                shared.clone(),
                shutdown.clone(),
            );
            set.spawn(async move { me.drain_worker(slot, &t, &sh, &sd).await });
        }
        while let Some(joined) = set.join_next().await {
            if let Err(e) = joined {
                shared.fail(EngineError::Join(e.to_string()));
            }
        }
        self.set_busy(&format!("drain:{target}"), false);
        if let Some(err) = shared.error.lock().unwrap().take() {
            return Err(err);
        }
        let total = shared.total.lock().unwrap().clone();
        Ok(total)
    }

    /// [`Engine::drain_all`] again while it makes progress and entries asked for a retry,
    /// so a one-shot run (backfill) does not leave behind what a second attempt would
    /// push. Stops when a call writes, rejects and skips nothing, on an error or shutdown,
    /// or after `MAX_PUSH_ATTEMPTS` calls.
    pub async fn drain_settled(
        self: &Arc<Self>,
        target: &str,
        shutdown: &CancellationToken,
    ) -> Result<DrainStats, EngineError> {
        let mut total = DrainStats::default();
        for _ in 0..MAX_PUSH_ATTEMPTS {
            let s = self.drain_all(target, shutdown).await?;
            add_drain(&mut total, &s);
            let progress = s.written + s.rejected + s.skipped > 0;
            if s.retried == 0 || !progress || shutdown.is_cancelled() {
                break;
            }
            // What is left are entries the target answered "retry" for.
            total.retried -= s.retried;
        }
        Ok(total)
    }

    /// Pushes one batch of `target`'s outbox (no other batch of this call in flight).
    /// Entries are marked as attempted (durably) before the push, and leave the outbox
    /// only after the target answered for them.
    pub async fn drain_batch(self: &Arc<Self>, target: &str) -> Result<DrainStats, EngineError> {
        let failed = Arc::new(Mutex::new(HashSet::new()));
        let plan = {
            let t = target.to_string();
            self.blocking(move |e| e.plan_batch(&t, &Mutex::default()))
                .await?
        };
        self.push_planned(target, plan, &failed).await
    }

    /// One worker of [`Engine::drain_all`]: plan, push, record, until nothing is left to
    /// take, an error stops the call, or shutdown.
    async fn drain_worker(
        self: &Arc<Self>,
        slot: usize,
        target: &str,
        shared: &Arc<DrainShared>,
        shutdown: &CancellationToken,
    ) {
        let busy = format!("drain:{target}");
        while !shutdown.is_cancelled() && !shared.stop.load(Ordering::SeqCst) {
            self.mark_started(&busy, shared, slot, Some(Instant::now()));
            let reading = if shared.read_first {
                let held = shared.read_and_plan.lock().await;
                if let Err(e) = self
                    .read_before_write(target, &shared.failed, shutdown)
                    .await
                {
                    self.mark_started(&busy, shared, slot, None);
                    self.note_error(target, &e);
                    shared.fail(e);
                    break;
                }
                Some(held)
            } else {
                None
            };
            let plan = {
                let (t, failed) = (target.to_string(), shared.failed.clone());
                self.blocking(move |e| e.plan_batch(&t, &failed)).await
            };
            drop(reading);
            let plan = match plan {
                Ok(p) => p,
                Err(e) => {
                    self.mark_started(&busy, shared, slot, None);
                    self.note_error(target, &e);
                    shared.fail(e);
                    break;
                }
            };
            if plan.stats.taken == 0 {
                self.mark_started(&busy, shared, slot, None);
                break;
            }
            let result = self.push_planned(target, plan, &shared.failed).await;
            self.mark_started(&busy, shared, slot, None);
            match result {
                Ok(stats) => add_drain(&mut shared.total.lock().unwrap(), &stats),
                Err(e) => {
                    self.note_error(target, &e);
                    shared.fail(e);
                    break;
                }
            }
        }
    }

    /// Records when worker `slot`'s batch began (`None`: it is idle) and sets the drain
    /// loop's busy mark to the oldest batch in flight, so a hung push shows in
    /// [`Engine::stalled_longer_than`] even while other batches progress.
    fn mark_started(&self, busy: &str, shared: &DrainShared, slot: usize, at: Option<Instant>) {
        let oldest = {
            let mut started = shared.started.lock().unwrap();
            started[slot] = at;
            started.iter().flatten().min().copied()
        };
        self.busy_since
            .lock()
            .unwrap()
            .insert(busy.to_string(), oldest);
    }

    /// Pushes a planned batch and records its outcome (on a blocking thread); entries
    /// that asked for a retry are added to `failed`. Counts the batch in the metrics.
    async fn push_planned(
        self: &Arc<Self>,
        target: &str,
        plan: Plan,
        failed: &Arc<Mutex<HashSet<u64>>>,
    ) -> Result<DrainStats, EngineError> {
        if plan.items.is_empty() {
            self.count_pushed(target, &plan.stats);
            return Ok(plan.stats);
        }
        let ep = self.endpoint(target)?.clone();
        // The batch is named by its first outbox entry's sequence number (as the store
        // and `dead-letters` know it); the vendor calls and the outcomes run inside.
        let span = error_span!(
            "push_batch",
            connector = target,
            batch = plan.planned.first().map_or(0, |(seq, _)| *seq),
            records = plan.items.len(),
        );
        let result = ep
            .connector
            .push(&plan.items)
            .instrument(span.clone())
            .await;
        let (t, f) = (target.to_string(), failed.clone());
        let (stats, err) = self
            .blocking(move |e| span.in_scope(|| e.record_batch(&t, plan, result, &f)))
            .await?;
        self.count_pushed(target, &stats);
        match err {
            Some(e) => Err(e.into()),
            None => Ok(stats),
        }
    }

    /// Adds one batch's counts to the push metrics.
    fn count_pushed(&self, target: &str, stats: &DrainStats) {
        let l = [("connector", target)];
        self.metrics
            .inc("crmbridge_records_pushed_total", &l, stats.written as f64);
        self.metrics
            .inc("crmbridge_records_skipped_total", &l, stats.skipped as f64);
        self.metrics.inc(
            "crmbridge_records_rejected_total",
            &l,
            stats.rejected as f64,
        );
    }

    /// A company's match keys as one line, to tell whether they changed.
    pub(super) fn match_keys_line(&self, company: &crate::model::Company) -> String {
        super::merge::match_keys_of(|n| company.get(n), &self.settings.match_keys).join("\n")
    }

    /// How many outbox entries of `target` to read so that the `limit` oldest ones
    /// neither claimed nor in `skip` are among them.
    fn batch_window(&self, target: &str, limit: usize, skip: &Mutex<HashSet<u64>>) -> usize {
        limit + self.claims.count(target) + skip.lock().unwrap().len()
    }

    /// Of `entries` (oldest first), the first `limit` neither claimed by a batch nor in
    /// `skip`: what the next batch takes.
    fn unclaimed<T>(
        &self,
        target: &str,
        limit: usize,
        skip: &Mutex<HashSet<u64>>,
        entries: Vec<(u64, T)>,
    ) -> Vec<(u64, T)> {
        let skip = skip.lock().unwrap();
        entries
            .into_iter()
            .filter(|(seq, _)| !skip.contains(seq) && !self.claims.contains(target, *seq))
            .take(limit)
            .collect()
    }

    /// The target's ids of the records the next batch of `target` would update (blocking:
    /// one read transaction); empty when it only creates. Another batch may take some of
    /// those entries first: then this one is read for nothing, never the other way round.
    pub(super) fn next_batch_vendor_ids(
        &self,
        target: &str,
        skip: &Mutex<HashSet<u64>>,
    ) -> Result<Vec<String>, EngineError> {
        let limit = self.endpoint(target)?.connector.max_batch().max(1);
        let tx = self.store.begin_read()?;
        let entries = tx.outbox_batch(target, self.batch_window(target, limit, skip))?;
        let mut ids = Vec::new();
        for (_, entry) in self.unclaimed(target, limit, skip, entries) {
            if let Some(vid) = tx.vendor_id_of(&entry.canonical_id, target)? {
                ids.push(vid);
            }
        }
        Ok(ids)
    }

    /// Plans the next batch of `target` (blocking: one write transaction): takes up to
    /// `max_batch` entries, oldest first, that are neither claimed by another batch nor
    /// in `skip`; drops no-ops, dead-letters entries that cannot be mapped or failed
    /// [`MAX_PUSH_ATTEMPTS`] times, marks the rest as being sent and claims them.
    fn plan_batch(&self, target: &str, skip: &Mutex<HashSet<u64>>) -> Result<Plan, EngineError> {
        let ep = self.endpoint(target)?;
        let limit = ep.connector.max_batch().max(1);
        let mut stats = DrainStats::default();
        let tx = self.store.begin_write()?;
        // Write transactions are serialised, so no other plan runs between reading the
        // claims here and adding ours before the commit.
        let entries = self.unclaimed(
            target,
            limit,
            skip,
            tx.outbox_batch(target, self.batch_window(target, limit, skip))?,
        );
        stats.taken = entries.len();
        if entries.is_empty() {
            tx.abort()?;
            return Ok(Plan {
                stats,
                items: Vec::new(),
                planned: Vec::new(),
                left_out: HashSet::new(),
                claim: None,
                planned_at: Utc::now(),
            });
        }
        let mut items = Vec::new();
        let mut planned = Vec::new();
        let mut left_out = HashSet::new();
        for (seq, entry) in entries {
            if entry.attempts >= MAX_PUSH_ATTEMPTS {
                warn!(connector = target, canonical_id = %entry.canonical_id, attempts = entry.attempts, "giving up on push; dead-lettered");
                tx.add_dead_letter(DeadLetterNew {
                    connector: target.to_string(),
                    direction: Direction::Push,
                    canonical_id: Some(entry.canonical_id.clone()),
                    vendor_id: tx.vendor_id_of(&entry.canonical_id, target)?,
                    record: serde_json::Value::Null,
                    reason: format!(
                        "gave up after {} attempts: {}",
                        entry.attempts,
                        entry.last_error.unwrap_or_default()
                    ),
                    attempts: entry.attempts,
                    first_at: Utc::now(),
                    last_at: Utc::now(),
                })?;
                tx.outbox_remove(target, seq)?;
                continue;
            }
            let Some(company) = tx.get_company(&entry.canonical_id)? else {
                tx.outbox_remove(target, seq)?;
                continue;
            };
            let vendor_id = tx.vendor_id_of(&entry.canonical_id, target)?;
            let (mut values, unheld) = ep.values_to_write(&company, vendor_id.is_none())?;
            // What the record held when last read or written.
            let before = match &vendor_id {
                Some(vid) => tx.ledger(target, vid)?,
                None => None,
            };
            if let Some(held) = before.as_ref().and_then(|l| l.prints.as_ref())
                && !ep.connector.updates_are_partial()
            {
                ep.clear_what_the_company_lacks(&mut values, held)?;
            }
            // Its create landed on another company's record (a dead letter says so): sent
            // again with the same keys, it would land there again and overwrite that
            // record until the owner's content is restored.
            if vendor_id.is_none()
                && tx
                    .blocked_create(target, &entry.canonical_id)?
                    .is_some_and(|keys| keys == self.match_keys_line(&company))
            {
                tx.outbox_remove(target, seq)?;
                stats.skipped += 1;
                continue;
            }
            let mut fields = match ep.mapping()?.write(&values) {
                Ok(f) => f,
                Err(e) => {
                    warn!(connector = target, canonical_id = %entry.canonical_id, error = %e, "cannot map for target");
                    tx.add_dead_letter(DeadLetterNew {
                        connector: target.to_string(),
                        direction: Direction::Push,
                        canonical_id: Some(entry.canonical_id.clone()),
                        vendor_id: vendor_id.clone(),
                        record: serde_json::to_value(&values).unwrap_or_default(),
                        reason: e.to_string(),
                        attempts: entry.attempts + 1,
                        first_at: Utc::now(),
                        last_at: Utc::now(),
                    })?;
                    tx.outbox_remove(target, seq)?;
                    stats.rejected += 1;
                    continue;
                }
            };
            let hash = visible_hash(ep.mapping()?, &values);
            if fields.is_empty() {
                tx.outbox_remove(target, seq)?;
                stats.skipped += 1;
                continue;
            }
            if before.as_ref().is_some_and(|l| l.hash == hash) {
                tx.outbox_remove(target, seq)?;
                stats.skipped += 1;
                continue;
            }
            let prints =
                ep.trim_write(&values, &mut fields, vendor_id.is_some(), before.as_ref())?;
            if fields.is_empty() {
                // The record holds every value already (it differs only in fields the
                // company lacks, which a write leaves alone).
                tx.outbox_remove(target, seq)?;
                stats.skipped += 1;
                continue;
            }
            // Marking it sending also notes a send left without an outcome by a crash.
            let unconfirmed_since = tx
                .outbox_mark_sending(target, seq)?
                .and_then(|e| e.unconfirmed_since);
            if vendor_id.is_none() {
                // Should the process die before the outcome is stored, a read of the target
                // recognises the record this create made by its content.
                tx.note_create_in_flight(target, &hash, &entry.canonical_id)?;
            }
            if !unheld.is_empty() {
                stats.left_out += 1;
                left_out.insert(seq);
                let reason = unheld
                    .iter()
                    .map(|u| format!("written without {}: {}", u.field, u.reason))
                    .collect::<Vec<_>>()
                    .join("; ");
                warn!(connector = target, canonical_id = %entry.canonical_id, reason = %reason, "a value the target cannot hold is left out; dead letter kept");
                let held_back: Map<String, Json> = unheld
                    .iter()
                    .map(|u| (u.field.clone(), u.value.clone()))
                    .collect();
                tx.add_dead_letter(DeadLetterNew {
                    connector: target.to_string(),
                    direction: Direction::Push,
                    canonical_id: Some(entry.canonical_id.clone()),
                    vendor_id: vendor_id.clone(),
                    record: Json::Object(held_back),
                    reason,
                    attempts: 1,
                    first_at: Utc::now(),
                    last_at: Utc::now(),
                })?;
            }
            items.push(PushItem {
                canonical_id: entry.canonical_id.clone(),
                vendor_id,
                fields,
                prior_attempts: entry.attempts,
                unconfirmed_since,
            });
            // `at` is set when the outcome is recorded.
            let at = Utc::now();
            planned.push((seq, LedgerEntry { hash, at, prints }));
        }
        // Claimed before the commit makes them visible as "sending"; a failed commit drops
        // the guard and so releases them.
        let writes = items
            .iter()
            .zip(&planned)
            .filter_map(|(item, (_, entry))| Some((item.vendor_id.clone()?, entry.clone())))
            .collect();
        let claim = self
            .claims
            .claim(target, planned.iter().map(|(s, _)| *s).collect(), writes);
        tx.commit()?;
        Ok(Plan {
            stats,
            items,
            planned,
            left_out,
            claim: Some(claim),
            planned_at: Utc::now(),
        })
    }

    /// Records the outcome of pushing `plan` (blocking: one write transaction), then
    /// releases its claims. Entries that asked for a retry go into `failed`. A push error
    /// fails every entry of the batch and is handed back beside the stats.
    fn record_batch(
        &self,
        target: &str,
        plan: Plan,
        result: Result<Vec<PushOutcome>, ConnectorError>,
        failed: &Mutex<HashSet<u64>>,
    ) -> Result<(DrainStats, Option<ConnectorError>), EngineError> {
        let Plan {
            mut stats,
            items,
            planned,
            left_out,
            claim,
            planned_at,
        } = plan;
        let ep = self.endpoint(target)?;
        let tx = self.store.begin_write()?;
        let outcomes = match result {
            Ok(o) => o,
            Err(e) => {
                // A connector answers a whole push with an error only when no item got an
                // outcome; a transient one may still have followed a write that landed.
                let unconfirmed = matches!(e, ConnectorError::Transient { .. });
                for (seq, _) in &planned {
                    if unconfirmed {
                        tx.outbox_fail_unconfirmed(target, *seq, &e.to_string(), planned_at)?;
                    } else {
                        tx.outbox_fail(target, *seq, &e.to_string())?;
                    }
                }
                tx.commit()?;
                drop(claim);
                failed
                    .lock()
                    .unwrap()
                    .extend(planned.iter().map(|(s, _)| *s));
                stats.retried += planned.len();
                return Ok((stats, Some(e)));
            }
        };
        let now = Utc::now();
        let mut retried = Vec::new();
        for (i, (item, (seq, planned_entry))) in items.iter().zip(&planned).enumerate() {
            // Error level so that warnings carry it at any log level (see `ingest`).
            let _span = error_span!("push", canonical_id = %item.canonical_id).entered();
            match outcomes.get(i) {
                Some(PushOutcome::Written { vendor_id, created }) => {
                    let ledger = LedgerEntry {
                        at: now,
                        ..planned_entry.clone()
                    };
                    let hash = &ledger.hash;
                    if item.vendor_id.is_none() {
                        tx.forget_create_in_flight(target, hash, &item.canonical_id)?;
                    }
                    // A create the target resolved to a record that belongs to another
                    // company (both have the domain a Rally upsert matches, a replay found
                    // the other's record): the target holds one record for the two. Moving
                    // the link would leave that record flipping between two companies, so
                    // this item is a dead letter and the owner's content goes back.
                    if let Some(owner) = tx
                        .link_of(target, vendor_id)?
                        .filter(|owner| *owner != item.canonical_id)
                    {
                        // A replay of a create that may have landed looked for its record
                        // and took another company's (same name or domain: they repeat).
                        // Had ours landed, the reads since would have linked it by its
                        // content; so it is created afresh — once: should that land on
                        // the other's record too, the target keeps one record for both.
                        if item.unconfirmed_since.is_some() && item.vendor_id.is_none() {
                            debug!(vendor_id = %vendor_id, owner = %owner, "a replayed create resolved to another company's record: creating it afresh");
                            tx.put_ledger(target, vendor_id, &ledger)?;
                            tx.enqueue(target, &owner, now)?;
                            tx.outbox_fail_as_not_landed(
                                target,
                                *seq,
                                "its replay resolved to another company's record",
                            )?;
                            stats.retried += 1;
                            retried.push(*seq);
                            continue;
                        }
                        let reason = format!(
                            "{target} resolved this new company to its record {vendor_id}, which \
                             belongs to another company ({owner}); {target} keeps one record for \
                             both (e.g. one per domain), so this one is not synced there and \
                             that record gets its own company's content back"
                        );
                        warn!(vendor_id = %vendor_id, owner = %owner, "created onto another company's record; dead-lettered");
                        tx.add_dead_letter(DeadLetterNew {
                            connector: target.to_string(),
                            direction: Direction::Push,
                            canonical_id: Some(item.canonical_id.clone()),
                            vendor_id: None,
                            record: serde_json::Value::Object(item.fields.clone()),
                            reason,
                            attempts: item.prior_attempts + 1,
                            first_at: now,
                            last_at: now,
                        })?;
                        // The record holds this item's content now, over what it held in
                        // the fields the item left out: recorded so, reading it back is an
                        // echo (not a change of the owner), the owner's push is not skipped
                        // as already there, and it clears what the owner lacks.
                        let held = tx.ledger(target, vendor_id)?.and_then(|l| l.prints);
                        let ledger = LedgerEntry {
                            prints: match (ledger.prints, held) {
                                (Some(landed), Some(held)) => Some(landed.over(&held)),
                                (landed, _) => landed,
                            },
                            ..ledger
                        };
                        tx.put_ledger(target, vendor_id, &ledger)?;
                        tx.outbox_remove(target, *seq)?;
                        tx.enqueue(target, &owner, now)?;
                        if let Some(c) = tx.get_company(&item.canonical_id)? {
                            tx.block_create(target, &item.canonical_id, &self.match_keys_line(&c))?;
                        }
                        stats.rejected += 1;
                        continue;
                    }
                    tx.put_link(target, vendor_id, &item.canonical_id)?;
                    tx.put_ledger(target, vendor_id, &ledger)?;
                    // Written whole: an earlier letter about this company here (refused,
                    // or written without a value) no longer holds.
                    if !left_out.contains(seq) {
                        tx.remove_push_dead_letter(target, &item.canonical_id)?;
                    }
                    // The company may have changed while the push was in flight; the entry
                    // then stays so the newer content goes out next time.
                    let current = match tx.get_company(&item.canonical_id)? {
                        Some(c) => Some(visible_hash(
                            ep.mapping()?,
                            &ep.values_to_write(&c, item.vendor_id.is_none())?.0,
                        )),
                        None => None,
                    };
                    if current.as_deref() == Some(hash.as_str()) {
                        tx.outbox_remove(target, *seq)?;
                    } else {
                        tx.outbox_fail(target, *seq, "changed while being pushed")?;
                    }
                    stats.written += 1;
                    if *created {
                        stats.created += 1;
                    }
                    debug!(vendor_id = %vendor_id, created, "written");
                }
                Some(PushOutcome::Rejected { reason }) => {
                    if item.vendor_id.is_none() {
                        tx.forget_create_in_flight(
                            target,
                            &planned_entry.hash,
                            &item.canonical_id,
                        )?;
                    }
                    warn!(vendor_id = item.vendor_id.as_deref().unwrap_or("-"), reason = %reason, "rejected by target; dead-lettered");
                    tx.add_dead_letter(DeadLetterNew {
                        connector: target.to_string(),
                        direction: Direction::Push,
                        canonical_id: Some(item.canonical_id.clone()),
                        vendor_id: item.vendor_id.clone(),
                        record: serde_json::Value::Object(item.fields.clone()),
                        reason: reason.clone(),
                        attempts: item.prior_attempts + 1,
                        first_at: Utc::now(),
                        last_at: Utc::now(),
                    })?;
                    tx.outbox_remove(target, *seq)?;
                    stats.rejected += 1;
                }
                Some(PushOutcome::Retry { reason }) => {
                    tx.outbox_fail(target, *seq, reason)?;
                    stats.retried += 1;
                    retried.push(*seq);
                }
                Some(PushOutcome::Unconfirmed { reason }) => {
                    tx.outbox_fail_unconfirmed(target, *seq, reason, planned_at)?;
                    stats.retried += 1;
                    retried.push(*seq);
                }
                None => {
                    // The connector lost track of it: it may have been sent.
                    tx.outbox_fail_unconfirmed(
                        target,
                        *seq,
                        "no outcome reported for this item",
                        planned_at,
                    )?;
                    stats.retried += 1;
                    retried.push(*seq);
                }
            }
        }
        tx.commit()?;
        drop(claim);
        failed.lock().unwrap().extend(retried);
        Ok((stats, None))
    }
}

/// A value of a company that a CRM cannot hold, left out of the write to it.
pub(super) struct Unheld {
    /// The canonical field.
    field: String,
    /// Its value as the write would have carried it.
    value: Json,
    /// Why the CRM cannot hold it.
    reason: String,
}

impl Endpoint {
    /// The values a write of `company` carries here: the company's, plus its canonical
    /// id in the field a create fills with it (see
    /// [`Connector::create_fills_with_canonical_id`](crate::connector::Connector::create_fills_with_canonical_id)).
    ///
    /// Values this CRM cannot hold ([`Connector::unholdable`](crate::connector::Connector::unholdable))
    /// are left out of a new record and cleared in an existing one; they come back as
    /// [`Unheld`]. Values it keeps in another form ([`Connector::stored_as`](crate::connector::Connector::stored_as))
    /// are given in that form. The values are what the record then reads back as, so
    /// reading it is no news and the write is not repeated.
    pub(super) fn values_to_write(
        &self,
        company: &Company,
        creating: bool,
    ) -> Result<(Fields, Vec<Unheld>), EngineError> {
        let mapping = self.mapping()?;
        let mut values = company.values();
        if creating
            && let Some(field) = self.connector.create_fills_with_canonical_id()
            && values.get(field).is_none_or(Value::is_nothing)
        {
            values.insert(field.to_string(), Value::Text(company.id.clone()));
        }
        // A mapping error is the caller's to report, on the write it makes.
        let Ok(fields) = mapping.write(&values) else {
            return Ok((values, Vec::new()));
        };
        let mut unheld = Vec::new();
        for (key, reason) in self.connector.unholdable(&fields) {
            for field in mapping.written_from(&key) {
                if creating {
                    values.remove(field);
                } else {
                    values.insert(field.to_string(), Value::Null);
                }
                unheld.push(Unheld {
                    field: field.to_string(),
                    value: fields.get(&key).cloned().unwrap_or(Json::Null),
                    reason: reason.clone(),
                });
            }
        }
        // Values the CRM keeps in another form count as written in that form.
        for (key, stored) in self.connector.stored_as(&fields) {
            let one = Map::from_iter([(key.clone(), stored)]);
            let Ok(read) = mapping.read(&one) else {
                continue;
            };
            for field in mapping.written_from(&key) {
                if let Some(v) = read.get(field) {
                    values.insert(field.to_string(), v.clone());
                }
            }
        }
        Ok((values, unheld))
    }

    /// For a whole write to an existing record: adds a clearing null to `values` for each
    /// field the record holds (by its prints `held`) that the company lacks. Such a value
    /// came from elsewhere — another company's create that landed on this record (Rally
    /// keeps one record per domain) — and, left alone by the write, would stay there
    /// under this company's name and read back as its change.
    pub(super) fn clear_what_the_company_lacks(
        &self,
        values: &mut Fields,
        held: &FieldPrints,
    ) -> Result<(), EngineError> {
        let mapping = self.mapping()?;
        if mapping.print_layout() != held.layout {
            return Ok(());
        }
        let written = mapping.write_fields();
        for (i, name) in mapping.print_fields().enumerate() {
            let holds = held
                .values
                .get(i)
                .is_some_and(|p| *p != FieldPrints::NOTHING && *p != FieldPrints::UNKNOWN);
            if holds && !values.contains_key(name) && written.iter().any(|w| w == name) {
                values.insert(name.to_string(), Value::Null);
            }
        }
        Ok(())
    }

    /// Fits `fields` (the company `values` as [`Mapping::write`](crate::mapping::Mapping::write)
    /// maps them) to the record they go to — an existing one (`linked`) with its ledger
    /// entry `before`, or a new one — and returns the prints the write leaves there. Where
    /// this CRM's updates are partial, the fields the record already holds are left out:
    /// an edit made there since it was last read, to another field, then survives the
    /// write (empty `fields`: nothing to send).
    pub(super) fn trim_write(
        &self,
        values: &Fields,
        fields: &mut Map<String, Json>,
        linked: bool,
        before: Option<&LedgerEntry>,
    ) -> Result<Option<FieldPrints>, EngineError> {
        let mapping = self.mapping()?;
        let held = before.and_then(|l| l.prints.as_ref());
        let after = mapping.written_prints(
            values,
            match (linked, held) {
                (false, _) => Before::New,
                (true, Some(p)) => Before::Record(p),
                (true, None) => Before::Unknown,
            },
        );
        if let (true, Some(held), Some(after)) = (linked, held, &after)
            && self.connector.updates_are_partial()
        {
            mapping.drop_held_keys(fields, held, after);
        }
        Ok(after)
    }
}

#[cfg(test)]
mod tests;
