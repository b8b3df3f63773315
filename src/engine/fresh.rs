//! Reading a CRM's latest changes right before writing to it.
//!
//! A company edited in CRM B while another CRM's change to it waits for its push to B would
//! otherwise lose B's edit: the push writes the whole record from what the engine knew
//! before. So the daemon's drain first reads what changed in B — an incremental poll cycle
//! ([`PreWriteRead::Poll`], one call when little changed) or the batch's own records by id
//! ([`PreWriteRead::ById`]) — and merges it; the field prints in the ledger then keep B's
//! untouched fields from undoing the other change. What is left is the instant between that
//! read and the write (for a CRM whose updates are partial, up to [`FRESH_WINDOW`] more).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Engine, EngineError, IngestStats, cursor_key};
use crate::connector::{PollMode, PreWriteRead};

/// A poll cycle of the target that began this recently is fresh enough for a write to a
/// CRM whose updates are partial (only a same-field edit can be lost there): it bounds the
/// extra calls a long drain makes to one cycle per window. A CRM whose updates are whole
/// is read for every batch: an edit made there since the cycle began would be
/// overwritten by the write, whatever field it changed.
pub const FRESH_WINDOW: Duration = Duration::from_secs(2);

/// Per connector, a lock held through each incremental poll cycle (the poll loop's and
/// those run before a write), so two never read and store the same cursor at once; it
/// holds when the last successful cycle began.
#[derive(Debug, Default)]
pub(super) struct PollGates(BTreeMap<String, tokio::sync::Mutex<Option<Instant>>>);

impl PollGates {
    pub(super) fn new<'a>(names: impl Iterator<Item = &'a String>) -> Self {
        PollGates(names.map(|n| (n.clone(), Default::default())).collect())
    }
}

impl Engine {
    /// One incremental poll cycle of `source` under its gate; with `unless_since`, none
    /// when a successful cycle began at or after that instant (the caller's need is met).
    pub(super) async fn poll_incremental(
        self: &Arc<Self>,
        source: &str,
        unless_since: Option<Instant>,
        shutdown: &CancellationToken,
    ) -> Result<Option<IngestStats>, EngineError> {
        let gate = self
            .poll_gates
            .0
            .get(source)
            .ok_or_else(|| EngineError::UnknownConnector(source.to_string()))?;
        let mut last = gate.lock().await;
        if let (Some(need), Some(began)) = (unless_since, *last)
            && began >= need
        {
            return Ok(None);
        }
        let began = Instant::now();
        let stats = self
            .poll_cycle(
                source,
                &cursor_key(source),
                &PollMode::Incremental,
                shutdown,
                &|_| {},
            )
            .await?;
        *last = Some(began);
        Ok(Some(stats))
    }

    /// Wakes the drain loops of the targets of `source` after records read from it queued
    /// entries for them.
    pub(super) fn wake_targets_of(&self, source: &str) {
        for t in self.targets_of(source) {
            if let Some(n) = self.wake.get(t) {
                n.notify_one();
            }
        }
    }

    /// Reads what changed in `target` since it was last read, before the next batch of
    /// its outbox is planned — only when that batch holds updates of existing records
    /// (creates overwrite nothing). `skip` are the entries the batch will not take.
    pub(super) async fn read_before_write(
        self: &Arc<Self>,
        target: &str,
        skip: &Arc<Mutex<HashSet<u64>>>,
        shutdown: &CancellationToken,
    ) -> Result<(), EngineError> {
        let ep = self.endpoint(target)?.clone();
        let how = ep.connector.pre_write_read();
        if how == PreWriteRead::Nothing {
            return Ok(());
        }
        let ids = {
            let (t, skip) = (target.to_string(), skip.clone());
            self.blocking(move |e| e.next_batch_vendor_ids(&t, &skip))
                .await?
        };
        if ids.is_empty() {
            return Ok(());
        }
        let stats = match how {
            PreWriteRead::Poll => {
                let window = if ep.connector.updates_are_partial() {
                    FRESH_WINDOW
                } else {
                    // Only a cycle that began after this batch asked (another batch's,
                    // run meanwhile) has read what the write would overwrite.
                    Duration::ZERO
                };
                let need = Instant::now().checked_sub(window);
                let need = need.unwrap_or_else(Instant::now);
                self.poll_incremental(target, Some(need), shutdown).await?
            }
            PreWriteRead::ById => {
                let mut page = ep.connector.read_by_ids(&ids).await?;
                // The change feed dead-letters malformed records; not twice.
                page.malformed.clear();
                let t = target.to_string();
                Some(self.blocking(move |e| e.ingest_current(&t, &page)).await?)
            }
            PreWriteRead::Nothing => None,
        };
        if let Some(s) = stats
            && s.queued > 0
        {
            self.wake_targets_of(target);
        }
        Ok(())
    }
}
