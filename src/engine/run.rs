//! The engine's loops: one poll loop and one drain loop per connector for `run`, and the
//! one-shot `backfill` (full read ignoring cursors, resumable, then drain to empty).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::{Engine, EngineError, IngestStats, backfill_cursor_key, full_read_key, visible_hash};
use crate::connector::{ConnectorError, Cursor, PollMode};
use crate::store::WriteTx;

/// Outbox entries that failed this many times are moved to the dead letters.
pub const MAX_PUSH_ATTEMPTS: u32 = 12;

/// Longest pause after a transient failure before trying again.
const MAX_ERROR_PAUSE: Duration = Duration::from_secs(60);

/// Handle on the running loops.
pub struct RunHandle {
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl RunHandle {
    /// Asks every loop to stop at its next safe point (after committing the page or batch
    /// in hand) and waits until all have.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Waits until every loop has stopped (after the token given to `start` is cancelled).
    pub async fn wait(self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// What `backfill` should do.
#[derive(Debug, Clone, Default)]
pub struct BackfillOptions {
    /// Only read from these connectors (all when empty).
    pub sources: Vec<String>,
    /// Only records updated at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Write to no CRM: only count what would happen.
    pub dry_run: bool,
}

/// Per-target counts of a dry run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DryRunCounts {
    /// Companies the target has no record of.
    pub would_create: u64,
    /// Companies whose target record differs.
    pub would_update: u64,
    /// Companies the target already holds as they are.
    pub unchanged: u64,
    /// Companies that cannot be mapped for the target, or whose create there landed on
    /// another company's record (see the dead letters).
    pub invalid: u64,
}

/// What a backfill did.
#[derive(Debug, Clone, Default)]
pub struct BackfillReport {
    /// Per source connector, what was read.
    pub read: BTreeMap<String, IngestStats>,
    /// Per target, records written / rejected / still queued (not in dry runs).
    pub pushed: BTreeMap<String, super::DrainStats>,
    /// Entries still in each outbox at the end (left for the daemon).
    pub pending: BTreeMap<String, u64>,
    /// Per target, dry-run counts.
    pub dry_run: BTreeMap<String, DryRunCounts>,
    /// Connectors that failed, with the error.
    pub failures: Vec<(String, String)>,
    /// Targets not pushed to because they have never been read in full: their entries
    /// wait for the daemon, which reads them before it pushes.
    pub never_read: Vec<String>,
}

impl BackfillReport {
    /// True when nothing failed and nothing was rejected.
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
            && self.pushed.values().all(|s| s.rejected == 0)
            && self.read.values().all(|s| s.dead == 0)
    }
}

fn add_ingest(total: &mut IngestStats, s: &IngestStats) {
    total.read += s.read;
    total.unchanged += s.unchanged;
    total.merged += s.merged;
    total.created += s.created;
    total.dead += s.dead;
    total.queued += s.queued;
}

/// How long to pause after `err` before the next attempt.
fn pause_after(err: &EngineError, poll_interval: Duration) -> Duration {
    match err {
        EngineError::Connector(ConnectorError::Suspended { until, .. }) => (*until - Utc::now())
            .to_std()
            .unwrap_or_default()
            .max(Duration::from_secs(1)),
        EngineError::Connector(ConnectorError::Transient {
            retry_after: Some(d),
            ..
        }) => *d,
        _ => poll_interval.min(MAX_ERROR_PAUSE),
    }
}

/// A short class name of an error, for metrics.
pub fn error_class(err: &EngineError) -> &'static str {
    match err {
        EngineError::Connector(ConnectorError::Transient { .. }) => "transient",
        EngineError::Connector(ConnectorError::Auth { .. }) => "auth",
        EngineError::Connector(ConnectorError::Suspended { .. }) => "suspended",
        EngineError::Connector(_) => "fatal",
        EngineError::Store(_) | EngineError::Join(_) => "store",
        EngineError::UnknownConnector(_) => "config",
        EngineError::NotUp(_) => "starting",
    }
}

/// Sleeps `d` unless `shutdown` fires first; false when shutting down.
/// `wait` moved (by at most half a second either way) so that it ends `phase` past a
/// second of the wall clock, `now` being the time since the Unix epoch. The poll interval
/// is kept on average: a cycle's own duration does not push each start a second later.
fn aligned_wait(wait: Duration, now: Duration, phase: Duration) -> Duration {
    let second = 1_000_000_000i128;
    let end = (now + wait).as_nanos() as i128;
    let phase = phase.as_nanos() as i128 % second;
    // The phase point nearest to the end.
    let mut target = end - end.rem_euclid(second) + phase;
    if target - end > second / 2 {
        target -= second;
    } else if end - target > second / 2 {
        target += second;
    }
    let wait = target - now.as_nanos() as i128;
    Duration::from_nanos(wait.max(0) as u64)
}

async fn pause(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.cancelled() => false,
    }
}

impl Engine {
    /// Runs the store work of `f` on a blocking thread (redb commits fsync).
    pub(super) async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| EngineError::Join(e.to_string()))?
    }

    /// Reads one full poll cycle of `source` (until the connector says it caught up),
    /// committing page by page under `key`. Returns the totals.
    pub async fn poll_cycle(
        self: &Arc<Self>,
        source: &str,
        key: &str,
        mode: &PollMode,
        shutdown: &CancellationToken,
        on_page: &(dyn Fn(&IngestStats) + Sync),
    ) -> Result<IngestStats, EngineError> {
        let ep = self.endpoint(source)?.clone();
        let mut cursor: Cursor = {
            let key = key.to_string();
            self.blocking(move |e| e.cursor(&key)).await?
        };
        let mut total = IngestStats::default();
        let busy = format!("poll:{source}");
        let mut prefetched: Option<crate::connector::Page> = None;
        loop {
            self.set_busy(&busy, true);
            let page = match prefetched.take() {
                Some(p) => p,
                None => ep
                    .connector
                    .poll(&cursor, mode)
                    .await
                    .inspect_err(|_| self.set_busy(&busy, false))?,
            };
            let more = page.more;
            cursor = page.next.clone();
            let ingest = {
                let (me, source, key) = (self.clone(), source.to_string(), key.to_string());
                tokio::task::spawn_blocking(move || me.ingest_page(&source, &page, &key))
            };
            // While this page commits, fetch the next one: its cursor is already known, and
            // it is stored only after this page's commit succeeded (invariant 1 holds).
            let (stats, fetched) = if more && !shutdown.is_cancelled() {
                let (stats, fetched) = tokio::join!(ingest, ep.connector.poll(&cursor, mode));
                (stats, Some(fetched))
            } else {
                (ingest.await, None)
            };
            let stats = stats
                .map_err(|e| EngineError::Join(e.to_string()))
                .and_then(|r| r)
                .inspect_err(|_| self.set_busy(&busy, false))?;
            let l = [("connector", source)];
            self.metrics
                .inc("crmbridge_records_read_total", &l, stats.read as f64);
            self.metrics
                .inc("crmbridge_records_merged_total", &l, stats.merged as f64);
            on_page(&stats);
            add_ingest(&mut total, &stats);
            if let Some(fetched) = fetched {
                prefetched = Some(fetched.inspect_err(|_| self.set_busy(&busy, false))?);
            }
            if !more {
                self.set_busy(&busy, false);
                self.metrics.set(
                    "crmbridge_last_successful_poll_timestamp_seconds",
                    &[("connector", source)],
                    Utc::now().timestamp() as f64,
                );
                break;
            }
            if shutdown.is_cancelled() {
                self.set_busy(&busy, false);
                break;
            }
        }
        Ok(total)
    }

    /// Counts a failed start of `connector` like a failed poll (metrics, suspension).
    pub fn note_start_error(&self, connector: &str, err: ConnectorError) {
        self.note_error(connector, &EngineError::Connector(err));
    }

    /// Counts an error in the metrics, and records a suspension's end.
    pub(super) fn note_error(&self, connector: &str, err: &EngineError) {
        let l = [("connector", connector)];
        self.metrics.inc(
            "crmbridge_errors_total",
            &[("connector", connector), ("class", error_class(err))],
            1.0,
        );
        if let EngineError::Connector(ConnectorError::Suspended { until, .. }) = err {
            self.metrics.set(
                "crmbridge_suspended_until_timestamp_seconds",
                &l,
                until.timestamp() as f64,
            );
        }
    }

    /// Starts one poll loop and one drain loop per connector; they run until `shutdown`
    /// is cancelled, then stop after committing what they hold.
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) -> RunHandle {
        let tracker = TaskTracker::new();
        // A target is written to only after it has been read once in this process: until
        // its records are linked, a create could duplicate a company it already holds.
        let first_read: Arc<BTreeMap<String, tokio::sync::watch::Sender<bool>>> = Arc::new(
            self.endpoints
                .keys()
                .map(|k| (k.clone(), tokio::sync::watch::channel(false).0))
                .collect(),
        );
        for ep in self.endpoints.values() {
            let name = ep.name.clone();
            let interval = ep.poll_interval;
            let phase = ep.connector.poll_phase();
            // Poll loop.
            {
                let (me, sd, name) = (self.clone(), shutdown.clone(), name.clone());
                let first_read = first_read.clone();
                let ep = ep.clone();
                tracker.spawn(async move {
                    // Nothing to read until the connector is up (its start may take
                    // long: a CRM down, a rate window to wait out).
                    tokio::select! {
                        _ = ep.wait_up() => {}
                        _ = sd.cancelled() => return,
                    }
                    while !sd.is_cancelled() {
                        // A cycle another task (a drain reading before a write) began while
                        // this one waited for the gate has read what this one would.
                        let res = me
                            .poll_incremental(&name, Some(std::time::Instant::now()), &sd)
                            .await;
                        let mut wait = match res {
                            Ok(stats) => {
                                let stats = stats.unwrap_or_default();
                                if let Some(tx) = first_read.get(&name)
                                    && !tx.send_replace(true)
                                {
                                    // A cycle completed: every record was read since the
                                    // cursor began (a later backfill may now push here).
                                    if let Err(e) = me.note_full_read_once(&name).await {
                                        warn!(connector = %name, error = %e, "could not note the complete read");
                                    }
                                }
                                if stats.queued > 0 {
                                    me.wake_targets_of(&name);
                                }
                                if stats.read > 0 {
                                    info!(connector = %name, read = stats.read, merged = stats.merged, created = stats.created, dead = stats.dead, "poll cycle done");
                                }
                                interval
                            }
                            Err(e) => {
                                me.note_error(&name, &e);
                                error!(connector = %name, error = %e, "poll failed");
                                pause_after(&e, interval)
                            }
                        };
                        if let (Some(phase), Ok(now)) = (
                            phase,
                            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH),
                        ) {
                            wait = aligned_wait(wait, now, phase);
                        }
                        if !pause(wait, &sd).await {
                            break;
                        }
                    }
                });
            }
            // Drain loop.
            {
                let (me, sd) = (self.clone(), shutdown.clone());
                let mut read_once = first_read.get(&name).map(|tx| tx.subscribe());
                let ep = ep.clone();
                tracker.spawn(async move {
                    let notify: Arc<Notify> = me.wake.get(&name).cloned().unwrap_or_default();
                    // Entries for a connector not up yet wait in its outbox.
                    tokio::select! {
                        _ = ep.wait_up() => {}
                        _ = sd.cancelled() => return,
                    }
                    if let Some(rx) = read_once.as_mut() {
                        tokio::select! {
                            _ = rx.wait_for(|done| *done) => {}
                            _ = sd.cancelled() => return,
                        }
                    }
                    while !sd.is_cancelled() {
                        let wait = match me.drain_fresh(&name, &sd).await {
                            Ok(s) => {
                                if s.taken > 0 {
                                    info!(connector = %name, written = s.written, created = s.created, skipped = s.skipped, rejected = s.rejected, retried = s.retried, "drained");
                                }
                                if s.retried > 0 { interval.min(MAX_ERROR_PAUSE) } else { interval }
                            }
                            Err(e) => {
                                warn!(connector = %name, error = %e, "push failed; entries stay queued");
                                pause_after(&e, interval)
                            }
                        };
                        tokio::select! {
                            _ = notify.notified() => {}
                            _ = tokio::time::sleep(wait) => {}
                            _ = sd.cancelled() => break,
                        }
                    }
                });
            }
        }
        RunHandle { tracker, shutdown }
    }

    /// One-shot full sync: reads every selected source at once, ignoring the incremental
    /// cursors (resuming an interrupted backfill from its own cursor), then drains every
    /// outbox of a CRM whose read did not fail.
    pub async fn backfill(
        self: &Arc<Self>,
        opts: &BackfillOptions,
        shutdown: &CancellationToken,
        on_page: &(dyn Fn(&str, &IngestStats) + Sync),
    ) -> Result<BackfillReport, EngineError> {
        let mut report = BackfillReport::default();
        let sources: Vec<String> = if opts.sources.is_empty() {
            self.endpoints.keys().cloned().collect()
        } else {
            opts.sources.clone()
        };
        for s in &sources {
            self.endpoint(s)?;
        }
        let mode = PollMode::Full { since: opts.since };
        // Sources are independent APIs with their own limits: read them at once (their
        // pages still commit one at a time, as in the daemon's concurrent poll loops).
        let reads = futures::future::join_all(sources.iter().map(|source| {
            let mode = &mode;
            async move {
                let key = backfill_cursor_key(source);
                let cb = |st: &IngestStats| on_page(source, st);
                let result = self.poll_cycle(source, &key, mode, shutdown, &cb).await;
                if result.is_ok() && !shutdown.is_cancelled() {
                    // Done: the next backfill starts from the beginning again.
                    let full = opts.since.is_none();
                    let source = source.clone();
                    self.blocking(move |e| {
                        let tx = e.store.begin_write()?;
                        tx.put_cursor(&key, &Cursor::start())?;
                        if full {
                            e.note_full_read(&tx, &source)?;
                        }
                        tx.commit()?;
                        Ok(())
                    })
                    .await?;
                }
                Ok::<_, EngineError>((source, result))
            }
        }))
        .await;
        for read in reads {
            let (source, result) = read?;
            match result {
                Ok(stats) => {
                    report.read.insert(source.clone(), stats);
                }
                Err(EngineError::Connector(e)) => {
                    error!(connector = %source, error = %e, "backfill read failed");
                    report.failures.push((source.clone(), e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        // A target whose read failed is not pushed to: its records are not all linked, so
        // a create could duplicate a company it already holds. Its entries stay queued for
        // the daemon, which pushes only after a complete read of the target.
        let unread: Vec<String> = report.failures.iter().map(|(s, _)| s.clone()).collect();
        for t in &unread {
            warn!(connector = %t, "not pushing to it: its read failed, and creates could duplicate companies it holds");
        }
        // Likewise a target this backfill did not read (`--connector`, `--since`) and that
        // was never read in full before.
        let mut targets = Vec::new();
        let snapshot = self.store.begin_read()?;
        for t in self.endpoints.keys().filter(|t| !unread.contains(t)) {
            if snapshot.cursor(&full_read_key(t))?.is_some() {
                targets.push(t.clone());
            } else {
                warn!(connector = %t, "not pushing to it: it has never been read in full (back it up without --since, or let the daemon read it first), and creates could duplicate companies it holds");
                report.never_read.push(t.clone());
            }
        }
        drop(snapshot);
        if opts.dry_run {
            for t in &targets {
                let t2 = t.clone();
                let counts = self.blocking(move |e| e.dry_run_counts(&t2)).await?;
                report.dry_run.insert(t.clone(), counts);
            }
            let tx = self.store.begin_read()?;
            for t in &report.never_read {
                report.pending.insert(t.clone(), tx.outbox_len(t)?);
            }
            return Ok(report);
        }
        // Targets are independent APIs with their own limits: drain them at once.
        let drains = futures::future::join_all(
            targets
                .iter()
                .map(|t| async move { (t, self.drain_settled(t, shutdown).await) }),
        )
        .await;
        for (t, result) in drains {
            match result {
                Ok(s) => {
                    report.pushed.insert(t.clone(), s);
                }
                Err(EngineError::Connector(e)) => {
                    error!(connector = %t, error = %e, "backfill push failed");
                    report.failures.push((t.clone(), e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        let tx = self.store.begin_read()?;
        for t in self.endpoints.keys() {
            report.pending.insert(t.clone(), tx.outbox_len(t)?);
        }
        Ok(report)
    }

    /// Notes in `tx` that `connector` has been read in full ([`full_read_key`]).
    pub(super) fn note_full_read(&self, tx: &WriteTx, connector: &str) -> Result<(), EngineError> {
        let at = Cursor(serde_json::Value::String(Utc::now().to_rfc3339()));
        tx.put_cursor(&full_read_key(connector), &at)?;
        Ok(())
    }

    /// Notes that `connector` has been read in full, unless the store knows already.
    pub(super) async fn note_full_read_once(
        self: &Arc<Self>,
        connector: &str,
    ) -> Result<(), EngineError> {
        let connector = connector.to_string();
        self.blocking(move |e| {
            if e.store
                .begin_read()?
                .cursor(&full_read_key(&connector))?
                .is_some()
            {
                return Ok(());
            }
            let tx = e.store.begin_write()?;
            e.note_full_read(&tx, &connector)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// What draining `target`'s outbox would do, without doing it.
    pub(super) fn dry_run_counts(&self, target: &str) -> Result<DryRunCounts, EngineError> {
        let ep = self.endpoint(target)?;
        let tx = self.store.begin_read()?;
        let mut counts = DryRunCounts::default();
        for (_, entry) in tx.outbox_batch(target, usize::MAX)? {
            let Some(company) = tx.get_company(&entry.canonical_id)? else {
                continue;
            };
            let values = company.values();
            let Ok(mut fields) = ep.mapping()?.write(&values) else {
                counts.invalid += 1;
                continue;
            };
            match tx.vendor_id_of(&entry.canonical_id, target)? {
                // Its create landed on another company's record before, with these keys:
                // the drain drops it (see `plan_batch`).
                None if tx
                    .blocked_create(target, &entry.canonical_id)?
                    .is_some_and(|keys| keys == self.match_keys_line(&company)) =>
                {
                    counts.invalid += 1
                }
                None => counts.would_create += 1,
                Some(vid) => {
                    let hash = visible_hash(ep.mapping()?, &values);
                    let before = tx.ledger(target, &vid)?;
                    if before.as_ref().is_some_and(|l| l.hash == hash) {
                        counts.unchanged += 1;
                        continue;
                    }
                    // What the drain would send (see `plan_batch`).
                    ep.trim_write(&values, &mut fields, true, before.as_ref())?;
                    if fields.is_empty() {
                        counts.unchanged += 1;
                    } else {
                        counts.would_update += 1;
                    }
                }
            }
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_aligned_wait_ends_at_the_nearest_phase_of_a_second() {
        let ms = Duration::from_millis;
        let now = Duration::from_secs(1_000) + ms(50);
        // A 1 s cycle that began at x.020 and ended at x.050 begins again at x+1.020,
        // not x+2.020: the interval holds.
        assert_eq!(aligned_wait(ms(1_000), now, ms(20)), ms(970));
        // Ending at x+1.600: on to x+2.020.
        assert_eq!(aligned_wait(ms(1_550), now, ms(20)), ms(1_970));
        // Ending exactly at it: unchanged.
        assert_eq!(aligned_wait(ms(1_970), now, ms(20)), ms(1_970));
        // Never a negative wait.
        assert_eq!(aligned_wait(ms(0), now + ms(450), ms(20)), ms(0));
        // A long interval moves by at most half a second.
        let w = aligned_wait(Duration::from_secs(60), now, ms(20));
        assert!(w.abs_diff(Duration::from_secs(60)) <= ms(500), "{w:?}");
        assert_eq!((now + w).as_millis() % 1_000, 20);
    }
}
