//! The sync engine: merges polled pages into the canonical store (identity, conflicts,
//! echoes) together with the cursor and outbox entries in one redb transaction, and drains
//! each target's outbox in batches. It never talks HTTP itself: connectors do.

mod drain;
#[cfg(test)]
mod edit_race_tests;
mod fresh;
#[cfg(test)]
mod ingest_tests;
pub mod merge;
mod run;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::Utc;
use tracing::{debug, error_span, warn};

use crate::connector::{Connector, ConnectorError, Cursor, Page, VendorRecord};
use crate::daemon::metrics::Metrics;
use crate::mapping::{Mapping, MappingError};
#[cfg(test)]
use crate::model::content_hash;
use crate::model::{CanonicalId, Company, FieldPrints, Fields, content_hash_of};
use crate::store::{
    DeadLetterNew, Direction, EncodedCompany, LedgerEntry, ReadTx, Store, StoreError, WriteTx,
};

pub use drain::MAX_IN_FLIGHT;
pub use merge::{ConflictPolicy, MatchKeyKind};
pub use run::{BackfillOptions, BackfillReport, DryRunCounts, RunHandle};

/// One connector as the engine drives it.
pub struct Endpoint {
    /// The configured instance name.
    pub name: String,
    /// The CRM client.
    pub connector: Arc<dyn Connector>,
    /// How long to wait between poll cycles once caught up.
    pub poll_interval: Duration,
    /// Its compiled mapping, fitted to what the CRM has: known once the connector is up
    /// (its start read the field catalogue), and never replaced.
    mapping: OnceLock<Mapping>,
    /// True once `mapping` is set; the connector's loops wait for it.
    up: tokio::sync::watch::Sender<bool>,
}

impl Endpoint {
    /// A connector that is up, with its fitted `mapping`.
    pub fn new(
        name: impl Into<String>,
        connector: Arc<dyn Connector>,
        mapping: Mapping,
        poll_interval: Duration,
    ) -> Self {
        let ep = Endpoint::starting(name, connector, poll_interval);
        ep.bring_up(mapping);
        ep
    }

    /// A connector still starting: nothing is read from or written to it until
    /// [`Endpoint::bring_up`] gives it its mapping. The others sync meanwhile.
    pub fn starting(
        name: impl Into<String>,
        connector: Arc<dyn Connector>,
        poll_interval: Duration,
    ) -> Self {
        Endpoint {
            name: name.into(),
            connector,
            poll_interval,
            mapping: OnceLock::new(),
            up: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Marks the connector up with its fitted `mapping`; its loops start. A second call
    /// changes nothing (a mapping in use is never swapped).
    pub fn bring_up(&self, mapping: Mapping) {
        if self.mapping.set(mapping).is_ok() {
            self.up.send_replace(true);
        }
    }

    /// True once the connector is up.
    pub fn is_up(&self) -> bool {
        self.mapping.get().is_some()
    }

    /// Waits until the connector is up.
    pub async fn wait_up(&self) {
        // The sender lives as long as `self`: the wait ends only by the value.
        let _ = self.up.subscribe().wait_for(|up| *up).await;
    }

    /// The fitted mapping; an error while the connector is still starting.
    pub fn mapping(&self) -> Result<&Mapping, EngineError> {
        self.mapping
            .get()
            .ok_or_else(|| EngineError::NotUp(self.name.clone()))
    }
}

/// Sync rules derived from the configuration.
#[derive(Debug, Clone, Default)]
pub struct EngineSettings {
    /// For each connector, the connectors its records must reach.
    pub targets: BTreeMap<String, Vec<String>>,
    /// Per-field conflict policy.
    pub policy: ConflictPolicy,
    /// Identifiers for matching first-seen records, in order.
    pub match_keys: Vec<MatchKeyKind>,
}

/// Errors of the engine itself (the store failed, or a connector failed as a whole).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The store failed; nothing of the operation was committed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A connector call failed as a whole.
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    /// A name that is not a configured connector.
    #[error("unknown connector {0:?}")]
    UnknownConnector(String),
    /// A blocking store task panicked or was cancelled.
    #[error("store task failed: {0}")]
    Join(String),
    /// The connector has not started yet (its CRM was unreachable so far).
    #[error("connector {0:?} has not started yet")]
    NotUp(String),
}

/// What ingesting one page did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Records in the page.
    pub read: usize,
    /// Records equal to what we last pushed to or read from them (echoes, re-reads).
    pub unchanged: usize,
    /// Records that changed at least one canonical field.
    pub merged: usize,
    /// Canonical companies created.
    pub created: usize,
    /// Records sent to the dead-letter table.
    pub dead: usize,
    /// Outbox entries newly queued.
    pub queued: usize,
}

/// What draining one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Entries taken from the outbox.
    pub taken: usize,
    /// Records written by the target.
    pub written: usize,
    /// Of those, created.
    pub created: usize,
    /// Entries dropped because the target already holds the content.
    pub skipped: usize,
    /// Records the target rejected (now dead letters).
    pub rejected: usize,
    /// Entries kept for a later attempt.
    pub retried: usize,
    /// Records sent without a value the target cannot hold (each noted in a dead letter).
    pub left_out: usize,
}

/// The engine: connectors, their mappings, the store and the sync rules.
pub struct Engine {
    store: Arc<Store>,
    endpoints: BTreeMap<String, Arc<Endpoint>>,
    settings: EngineSettings,
    metrics: Arc<Metrics>,
    /// Per loop (`"poll:<name>"`, `"drain:<name>"`), when its current unit of work began;
    /// `None` while idle. The systemd watchdog is fed only while none is stuck.
    busy_since: std::sync::Mutex<BTreeMap<String, Option<std::time::Instant>>>,
    /// Outbox entries in a batch of this process right now (see `drain`).
    claims: Arc<drain::Claims>,
    /// Per connector, wakes its drain loop when entries were queued for it.
    wake: BTreeMap<String, Arc<tokio::sync::Notify>>,
    /// Per connector, held through each incremental poll cycle (see `fresh`).
    poll_gates: fresh::PollGates,
}

/// The hash of what connector `mapping` can hold of `fields`: the canonical values as they
/// would read back after writing them. Comparing this with the ledger tells an echo of our
/// own write (or an unchanged re-read) from a real change, and a no-op push from a real one.
pub fn visible_hash(mapping: &Mapping, fields: &Fields) -> String {
    // Read-only fields (e.g. a domain derived from a website) come back from the write as
    // well; only what the write carries counts. Null, absent and an empty tag list are the
    // same content for a target (a CRM returns null or `[]` for what we never wrote), so
    // none takes part.
    match mapping.visible(fields) {
        Some(round) => content_hash_of(round.iter().map(|(k, v)| (*k, v.as_ref()))),
        None => content_hash_of(
            fields
                .iter()
                .filter(|(_, v)| !v.is_nothing())
                .map(|(k, v)| (k.as_str(), v)),
        ),
    }
}

/// [`visible_hash`] the long way: an actual write and read through the mapping. Kept as
/// the reference the fast path is tested against.
#[cfg(test)]
fn visible_hash_by_round_trip(mapping: &Mapping, fields: &Fields) -> String {
    // `write` may suffix amoCRM keys with an enum code (`cf.code.PHONE@WORK`) that `read`
    // does not know: strip it, as the connector does before sending.
    let round_trip = mapping.write(fields).and_then(|w| {
        let w: serde_json::Map<String, serde_json::Value> = w
            .into_iter()
            .map(|(k, v)| (crate::mapping::split_enum_suffix(&k).0.to_string(), v))
            .collect();
        mapping.read(&w)
    });
    match round_trip {
        Ok(round) => {
            let writable: Fields = round
                .into_iter()
                .filter(|(k, v)| fields.contains_key(k) && !v.is_nothing())
                .collect();
            content_hash(&writable)
        }
        Err(_) => content_hash(
            &fields
                .iter()
                .filter(|(_, v)| !v.is_nothing())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
    }
}

/// Pages smaller than this are prepared inline: a thread is not worth it for them.
const PARALLEL_PREPARE_MIN: usize = 32;
/// Records the prepare thread hands over at a time (one channel message).
const PREPARE_CHUNK: usize = 32;

/// The part of ingesting one record that needs no write: it runs ahead of (and beside)
/// the write transaction, on a second thread.
// Boxing `Mapped` would cost an allocation per record read; all but a few records are
// `Mapped`, so no space is wasted on the small variants.
#[allow(clippy::large_enum_variant)]
enum Prepared {
    /// Deleted in the source (not propagated).
    Deleted,
    /// The mapping rejected the record.
    Failed(MappingError),
    /// The canonical values read (`None` once they went into [`Fresh`]), their
    /// [`visible_hash`] and their match keys, with what the page's snapshot said about the
    /// record, when there was one.
    Mapped {
        fields: Option<Fields>,
        hash: String,
        prints: FieldPrints,
        keys: Vec<String>,
        seen: Option<Seen>,
    },
}

/// What the snapshot the page's write transaction started from said about a record:
/// still true unless that transaction has since written something it rests on, which the
/// store step checks ([`PageWrites`]) before using it.
struct Seen {
    /// The record's link and ledger entry.
    link: Option<CanonicalId>,
    ledger: Option<LedgerEntry>,
    /// For a record without a link: the match keys looked up (in order, up to the one
    /// chosen) and whether each pointed at a company.
    looked_up: Vec<bool>,
    /// For a record without a link: the company its keys chose.
    found: Option<CanonicalId>,
    /// For a linked record that changed: its company.
    company: Option<Company>,
    /// For a record without a link whose keys chose no company: the company it creates,
    /// already merged and encoded (most records of a backfill).
    fresh: Option<Fresh>,
}

/// A new company made from one record ahead of the store step (its match keys are the
/// record's).
struct Fresh {
    id: CanonicalId,
    encoded: EncodedCompany,
    /// False when the record had no non-null value (nothing to queue).
    changed: bool,
}

/// What the page's write transaction wrote so far that a [`Seen`] may rest on.
#[derive(Default)]
struct PageWrites<'p> {
    /// Records already handled in this page (their rows may have changed).
    vendor_ids: HashSet<&'p str>,
    /// Match keys written.
    keys: HashSet<String>,
    /// Companies written or newly linked to a record of the source.
    companies: HashSet<CanonicalId>,
}

impl PageWrites<'_> {
    /// True when nothing `seen` was derived from has been written since the snapshot.
    fn still_holds(&self, seen: &Seen, keys: &[String]) -> bool {
        if seen.link.is_none() && keys.iter().any(|k| self.keys.contains(k)) {
            return false;
        }
        let depends_on = seen.link.as_ref().or(seen.found.as_ref());
        depends_on.is_none_or(|cid| !self.companies.contains(cid))
    }
}

/// Maps `rec` through `mapping` and computes what the store step needs of it; with a
/// snapshot, also its look-ups (see [`Seen`]).
fn prepare(
    mapping: &Mapping,
    kinds: &[MatchKeyKind],
    policy: &ConflictPolicy,
    source: &str,
    snapshot: Option<&ReadTx>,
    rec: &VendorRecord,
) -> Result<Prepared, StoreError> {
    if rec.deleted {
        return Ok(Prepared::Deleted);
    }
    let fields = match mapping.read(&rec.fields) {
        Ok(fields) => fields,
        Err(e) => return Ok(Prepared::Failed(e)),
    };
    let hash = visible_hash(mapping, &fields);
    let prints = mapping.read_prints(&fields);
    let keys = merge::match_keys(&fields, kinds);
    let (fields, seen) = match snapshot {
        Some(snap) => {
            let (seen, fields) = look_up(snap, source, policy, rec, fields, &hash, &keys)?;
            (fields, Some(seen))
        }
        None => (Some(fields), None),
    };
    Ok(Prepared::Mapped {
        fields,
        hash,
        prints,
        keys,
        seen,
    })
}

/// The snapshot's answers for one mapped record (see [`Seen`]); mirrors the look-ups of
/// [`Engine::store_page`]. Gives `fields` back unless they went into a new company.
fn look_up(
    snap: &ReadTx,
    source: &str,
    policy: &ConflictPolicy,
    rec: &VendorRecord,
    fields: Fields,
    hash: &str,
    keys: &[String],
) -> Result<(Seen, Option<Fields>), StoreError> {
    let (link, ledger) = snap.link_and_ledger(source, &rec.vendor_id)?;
    let mut seen = Seen {
        link,
        ledger,
        looked_up: Vec::new(),
        found: None,
        company: None,
        fresh: None,
    };
    if let Some(cid) = &seen.link {
        // An unchanged record (our own write coming back, a re-read) needs no company.
        if seen.ledger.as_ref().is_none_or(|l| l.hash != hash) {
            seen.company = snap.get_company(cid)?;
        }
        return Ok((seen, Some(fields)));
    }
    if let Some(id) = named_company(&fields)
        && snap.get_company(id)?.is_some()
        && snap.vendor_id_of(id, source)?.is_none()
    {
        seen.found = Some(id.to_string());
        return Ok((seen, Some(fields)));
    }
    // A create of ours that landed but whose outcome was never stored (the process died
    // in between), recognised by its content: without this, a company without a domain
    // would be created twice, and one with a domain another company shares could be
    // linked to that other company by the key.
    if let Some(cid) = snap.unlinked_create_in_flight(source, hash)? {
        seen.found = Some(cid);
        return Ok((seen, Some(fields)));
    }
    for k in keys {
        let hit = snap.match_key(k)?;
        seen.looked_up.push(hit.is_some());
        if let Some(cid) = hit
            && snap.vendor_id_of(&cid, source)?.is_none()
        {
            seen.found = Some(cid);
            break;
        }
    }
    if seen.found.is_some() {
        return Ok((seen, Some(fields)));
    }
    // The fields move into the company (and are dropped with it here, off the store
    // thread); should the store step find this stale, it maps the record again.
    let mut company = Company::new(Company::new_id());
    // A new company: nothing for a derived value to defer to.
    let outcome = merge::merge_owned(&mut company, fields, source, rec.updated_at, policy, &[]);
    seen.fresh = Some(Fresh {
        encoded: EncodedCompany::new(&company),
        id: company.id,
        changed: !outcome.is_unchanged(),
    });
    Ok((seen, None))
}

/// Removes from `fields` (read from a record) the fields whose value the record already
/// held at `base` (its last read or write): the record did not change them, so they are
/// no news, however new the record's timestamp — letting them merge would undo a newer
/// change made elsewhere to the same company. True when the company holds another value
/// for one of them: the record is stale there and needs the company's value pushed. (Not
/// when the company holds nothing: a write leaves out what the company lacks, so pushing
/// would change nothing — e.g. a field another company's write left in a record two
/// companies share.)
fn drop_unchanged(
    mapping: &Mapping,
    fields: &mut Fields,
    prints: &FieldPrints,
    base: &FieldPrints,
    company: &Company,
) -> bool {
    let mut stale = false;
    for (i, name) in mapping.print_fields().enumerate() {
        if !prints.unchanged_since(base, i) {
            continue;
        }
        if let Some(value) = fields.remove(name) {
            let held = company.get(name).filter(|h| !h.is_nothing());
            if held.is_some_and(|h| !merge::same_meaning(h, &value)) {
                debug!(field = name, held = ?held, record = ?value, "record still holds an older value");
                stale = true;
            }
        }
    }
    stale
}

/// Removes from `fields` — a record seen for the first time, matched to a company another
/// CRM made — the fields it leaves empty: a CRM that never held a value says nothing about
/// it, and letting its emptiness win by timestamp would erase the other CRM's value
/// everywhere. True when the company holds a value for one of them (the record needs it).
fn drop_empty(fields: &mut Fields, company: &Company) -> bool {
    let mut stale = false;
    fields.retain(|name, value| {
        if !value.is_nothing() {
            return true;
        }
        stale |= company.get(name).is_some_and(|h| !h.is_nothing());
        false
    });
    stale
}

/// The company a first-seen record names as its own. A company crmbridge creates in
/// Marketo without an `externalCompanyId` gets its canonical id as one (the dedupe key of
/// an idempotent create), so a record carrying a canonical id is that company's — also when
/// it is read before its link was stored (a crash between the push and its outcome), where
/// a domainless company would otherwise match nothing and be created twice.
fn named_company(fields: &Fields) -> Option<&str> {
    match fields.get("externalCompanyId") {
        // Canonical ids are 26 characters (36 in stores made before they were shortened).
        Some(crate::model::Value::Text(t)) if matches!(t.trim().len(), 26 | 36) => Some(t.trim()),
        _ => None,
    }
}

/// `rec` mapped again (it mapped once already: the mapping is deterministic).
fn mapping_of(mapping: &Mapping, rec: &VendorRecord) -> Result<Fields, EngineError> {
    mapping
        .read(&rec.fields)
        .map_err(|e| EngineError::Join(format!("record {} no longer maps: {e}", rec.vendor_id)))
}

/// The cursor key of an incremental poll.
pub fn cursor_key(connector: &str) -> String {
    connector.to_string()
}

/// The cursor key of a (resumable) backfill.
pub fn backfill_cursor_key(connector: &str) -> String {
    format!("backfill:{connector}")
}

/// The key under which the store notes that `connector` has been read in full once (a
/// backfill without `since`, or any complete poll cycle: the first one starts from the
/// beginning). Only then are all its records linked, so that a create there cannot
/// duplicate a company it already holds.
pub fn full_read_key(connector: &str) -> String {
    format!("read:{connector}")
}

impl Engine {
    /// An engine over `store` and `endpoints`.
    pub fn new(
        store: Arc<Store>,
        endpoints: Vec<Endpoint>,
        settings: EngineSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let endpoints: BTreeMap<String, Arc<Endpoint>> = endpoints
            .into_iter()
            .map(|e| (e.name.clone(), Arc::new(e)))
            .collect();
        Engine {
            wake: endpoints
                .keys()
                .map(|k| (k.clone(), Arc::default()))
                .collect(),
            poll_gates: fresh::PollGates::new(endpoints.keys()),
            store,
            endpoints,
            settings,
            metrics,
            busy_since: Default::default(),
            claims: Default::default(),
        }
    }

    /// Marks loop `name` busy (a unit of work began) or idle.
    pub(crate) fn set_busy(&self, name: &str, busy: bool) {
        self.busy_since
            .lock()
            .unwrap()
            .insert(name.to_string(), busy.then(std::time::Instant::now));
    }

    /// A loop that has been on one unit of work (a page, a batch) for longer than
    /// `limit`, if any: a sign it hangs.
    pub fn stalled_longer_than(&self, limit: Duration) -> Option<String> {
        self.busy_since
            .lock()
            .unwrap()
            .iter()
            .find(|(_, t)| t.is_some_and(|t| t.elapsed() > limit))
            .map(|(n, _)| n.clone())
    }

    /// A one-line summary for systemd's STATUS: records read and pushed per connector.
    pub fn status_line(&self) -> String {
        self.endpoints
            .keys()
            .map(|n| {
                let l = [("connector", n.as_str())];
                let read = self
                    .metrics
                    .get("crmbridge_records_read_total", &l)
                    .unwrap_or(0.0);
                let pushed = self
                    .metrics
                    .get("crmbridge_records_pushed_total", &l)
                    .unwrap_or(0.0);
                if self.endpoints[n].is_up() {
                    format!("{n}: {read} read, {pushed} pushed")
                } else {
                    format!("{n}: starting")
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The metrics the engine updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The connectors by name.
    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.endpoints.values()
    }

    /// The connector named `name`.
    pub fn endpoint(&self, name: &str) -> Result<&Arc<Endpoint>, EngineError> {
        self.endpoints
            .get(name)
            .ok_or_else(|| EngineError::UnknownConnector(name.to_string()))
    }

    /// Where records read from `source` go.
    pub fn targets_of(&self, source: &str) -> &[String] {
        self.settings
            .targets
            .get(source)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Stores one page read from `source`: merges every record, dead-letters the bad ones,
    /// queues outbox entries for the targets, and advances the cursor stored under
    /// `cursor_key` — all in one transaction, so a crash leaves either all of it or none.
    ///
    /// What each record needs that the transaction does not write — mapping, visible
    /// hash, match keys, and the look-ups on a snapshot of the state the transaction
    /// started from, down to a ready-made new company — runs on a second thread, streamed
    /// in record order to this one, which checks that nothing it wrote since invalidates
    /// those look-ups, then writes; on two cores the two overlap.
    pub fn ingest_page(
        &self,
        source: &str,
        page: &Page,
        cursor_key: &str,
    ) -> Result<IngestStats, EngineError> {
        self.ingest(source, page, Some(cursor_key))
    }

    /// [`Engine::ingest_page`] for records read outside the change feed (by id, before a
    /// write): no cursor moves.
    pub fn ingest_current(&self, source: &str, page: &Page) -> Result<IngestStats, EngineError> {
        self.ingest(source, page, None)
    }

    fn ingest(
        &self,
        source: &str,
        page: &Page,
        cursor_key: Option<&str>,
    ) -> Result<IngestStats, EngineError> {
        let mapping = self.endpoint(source)?.mapping()?;
        let kinds = &self.settings.match_keys;
        let policy = &self.settings.policy;
        let tx = self.store.begin_write()?;
        if page.records.len() < PARALLEL_PREPARE_MIN {
            let prepared = page
                .records
                .iter()
                .map(|r| prepare(mapping, kinds, policy, source, None, r));
            return self.store_page(tx, source, page, cursor_key, prepared);
        }
        // Begun after the write transaction, which no other write can precede now: the
        // snapshot is exactly the state it starts from.
        let snapshot = self.store.begin_read()?;
        std::thread::scope(|s| {
            // Room for the whole page: the prepare thread never waits for the store
            // thread, and the store thread (the slower one) only waits at the start, so
            // the two rarely wake each other (each wake-up is a context switch).
            let chunks = page.records.len().div_ceil(PREPARE_CHUNK);
            let (send, recv) =
                std::sync::mpsc::sync_channel::<Vec<Result<Prepared, StoreError>>>(chunks);
            // The thread owns the snapshot: it ends with the last record prepared, before
            // the commit, which then need not keep that state's pages for a reader.
            s.spawn(move || {
                for chunk in page.records.chunks(PREPARE_CHUNK) {
                    let prepared = chunk
                        .iter()
                        .map(|r| prepare(mapping, kinds, policy, source, Some(&snapshot), r))
                        .collect();
                    // The receiver is gone only when the store step failed: stop.
                    if send.send(prepared).is_err() {
                        break;
                    }
                }
            });
            // If the worker panicked its chunks stop early; the zip in `store_page` then
            // ends short, which `store_page` reports as an error (and the scope re-raises
            // the panic).
            self.store_page(tx, source, page, cursor_key, recv.into_iter().flatten())
        })
    }

    /// The store half of [`Engine::ingest_page`]: the page's write transaction, given
    /// each record's [`Prepared`] part in record order.
    fn store_page<'p>(
        &self,
        tx: WriteTx,
        source: &str,
        page: &'p Page,
        cursor_key: Option<&str>,
        prepared: impl Iterator<Item = Result<Prepared, StoreError>>,
    ) -> Result<IngestStats, EngineError> {
        let targets = self.targets_of(source);
        let mapping = self.endpoint(source)?.mapping()?;
        let derived = mapping.derived_fields();
        let receives_pushes = self
            .settings
            .targets
            .values()
            .flatten()
            .any(|t| t == source);
        let now = Utc::now();
        let mut stats = IngestStats {
            read: page.records.len(),
            ..Default::default()
        };
        for bad in &page.malformed {
            warn!(connector = source, vendor_id = bad.vendor_id.as_deref().unwrap_or("-"), reason = %bad.reason, "malformed record dead-lettered");
            tx.add_dead_letter(DeadLetterNew {
                connector: source.to_string(),
                direction: Direction::Read,
                canonical_id: None,
                vendor_id: bad.vendor_id.clone(),
                record: serde_json::Value::String(bad.raw.clone()),
                reason: bad.reason.clone(),
                attempts: 1,
                first_at: Utc::now(),
                last_at: Utc::now(),
            })?;
            stats.dead += 1;
        }
        let mut written = PageWrites::<'p>::default();
        let mut done = 0;
        for (rec, prep) in page.records.iter().zip(prepared) {
            done += 1;
            // Error level, like every span that names what a warning is about: a span is
            // enabled only where its level is, and at `RUST_LOG=warn` the warnings need it.
            let _span =
                error_span!("ingest", connector = source, vendor_id = %rec.vendor_id).entered();
            // A record seen twice in one page: its row may have changed since the snapshot.
            let repeated = !written.vendor_ids.insert(rec.vendor_id.as_str());
            let (fields, hash, prints, keys, seen) = match prep? {
                Prepared::Deleted => {
                    // Deletes are not propagated (see README): the link stays so that a
                    // later push to this record fails loudly instead of silently
                    // re-creating it.
                    debug!(vendor_id = %rec.vendor_id, "deleted in source; not propagated");
                    stats.unchanged += 1;
                    continue;
                }
                Prepared::Failed(e) => {
                    let link = tx.link_of(source, &rec.vendor_id)?;
                    warn!(canonical_id = link.as_deref().unwrap_or("-"), error = %e, "record dead-lettered: mapping failed");
                    tx.add_dead_letter(DeadLetterNew {
                        connector: source.to_string(),
                        direction: Direction::Read,
                        canonical_id: link,
                        vendor_id: Some(rec.vendor_id.clone()),
                        record: serde_json::Value::Object(rec.fields.clone()),
                        reason: e.to_string(),
                        attempts: 1,
                        first_at: Utc::now(),
                        last_at: Utc::now(),
                    })?;
                    stats.dead += 1;
                    continue;
                }
                Prepared::Mapped {
                    fields,
                    hash,
                    prints,
                    keys,
                    seen,
                } => (fields, hash, prints, keys, seen),
            };
            let seen = seen.filter(|s| !repeated && written.still_holds(s, &keys));
            let fields = match (fields, &seen) {
                (Some(f), _) => f,
                // Used by the new company, which is still what the record makes.
                (None, Some(_)) => Fields::new(),
                // The new company made ahead is stale: map the record again.
                (None, None) => mapping_of(self.endpoint(source)?.mapping()?, rec)?,
            };
            // The link and the ledger entry share a row: one look-up for both.
            let (link, ledger) = match &seen {
                Some(s) => (s.link.clone(), s.ledger.clone()),
                None => tx.link_and_ledger(source, &rec.vendor_id)?,
            };
            // What a write of ours in flight puts there (see below).
            let mut in_flight: Option<LedgerEntry> = None;
            // What the linked record held when last read or written: the base that tells
            // the fields it changed since from those it merely still holds.
            let base = match (ledger, &link) {
                (Some(l), Some(linked)) => {
                    if l.hash == hash {
                        // Unchanged; a base with gaps (the ledger predates prints, or a
                        // write left fields unknown) is completed by what was just read.
                        let gaps = l.prints.as_ref().is_none_or(|p| {
                            p.layout != prints.layout || p.values.contains(&FieldPrints::UNKNOWN)
                        });
                        if gaps {
                            let entry = LedgerEntry {
                                prints: Some(prints),
                                ..l
                            };
                            tx.put_ledger_linked(source, &rec.vendor_id, linked, &entry)?;
                        }
                        stats.unchanged += 1;
                        continue;
                    }
                    // Our own write read back before its outcome was recorded (a poll
                    // between the CRM storing it and its answer reaching us) is no news.
                    // Taken for a change of this CRM's, it would undo what the company
                    // got since the write was planned — e.g. an edit made here meanwhile,
                    // which the write may just have overwritten (the company's newer
                    // content goes out again: its entry stays queued).
                    in_flight = self.claims.in_flight(source, &rec.vendor_id);
                    if in_flight.as_ref().is_some_and(|w| w.hash == hash) {
                        debug!(vendor_id = %rec.vendor_id, "our write in flight, read back");
                        let entry = LedgerEntry {
                            hash,
                            at: now,
                            prints: Some(prints),
                        };
                        tx.put_ledger_linked(source, &rec.vendor_id, linked, &entry)?;
                        stats.unchanged += 1;
                        continue;
                    }
                    l.prints
                }
                _ => None,
            };
            // Match keys looked up for a first-seen record, with what they pointed at:
            // the keys the merged company has are mostly these, and need no second look.
            let mut looked_up: Vec<(&str, bool)> = Vec::new();
            let mut fresh = None;
            let (cid, existing) = match (&link, seen) {
                (Some(cid), Some(s)) => (cid.clone(), s.company),
                (Some(cid), None) => (cid.clone(), tx.get_company(cid)?),
                (None, Some(s)) => {
                    looked_up = keys.iter().map(String::as_str).zip(s.looked_up).collect();
                    match (s.found, s.fresh) {
                        (Some(cid), _) => {
                            let c = tx.get_company(&cid)?;
                            (cid, c)
                        }
                        (None, Some(f)) => {
                            let cid = f.id.clone();
                            fresh = Some(f);
                            (cid, None)
                        }
                        (None, None) => (Company::new_id(), None),
                    }
                }
                (None, None) => {
                    let mut found: Option<CanonicalId> = None;
                    if let Some(id) = named_company(&fields)
                        && tx.get_company(id)?.is_some()
                        && tx.vendor_id_of(id, source)?.is_none()
                    {
                        found = Some(id.to_string());
                    }
                    // As in `look_up`: a create of ours whose outcome was never stored.
                    if found.is_none() {
                        found = tx.unlinked_create_in_flight(source, &hash)?;
                    }
                    let unnamed = found.is_none();
                    for k in keys.iter().filter(|_| unnamed) {
                        let hit = tx.match_key(k)?;
                        looked_up.push((k, hit.is_some()));
                        if let Some(cid) = hit {
                            // A company already linked to another record of this same CRM
                            // is a different company that happens to share the key.
                            if tx.vendor_id_of(&cid, source)?.is_none() {
                                found = Some(cid);
                                break;
                            }
                        }
                    }
                    match found {
                        Some(cid) => {
                            let c = tx.get_company(&cid)?;
                            (cid, c)
                        }
                        None => (Company::new_id(), None),
                    }
                }
            };
            let is_new = existing.is_none();
            // The record still holds a value another CRM has since replaced.
            let mut stale_here = false;
            let (company_keys, changed) = match fresh {
                // Made and merged on the prepare thread: a new company's keys are its
                // record's, all of them looked up above (none chose a company).
                Some(f) => {
                    tx.put_encoded_company(&cid, &f.encoded)?;
                    for (k, taken) in &looked_up {
                        if !taken {
                            tx.put_match_key(k, &cid)?;
                            written.keys.insert(k.to_string());
                        }
                    }
                    (Vec::new(), f.changed)
                }
                None => {
                    let mut company = existing.unwrap_or_else(|| Company::new(cid.clone()));
                    let mut fields = fields;
                    if let Some(base) = &base {
                        stale_here = drop_unchanged(mapping, &mut fields, &prints, base, &company);
                        // A value our write in flight put there is no news either, whether
                        // read before or after that write landed.
                        if let Some(written) = in_flight.as_ref().and_then(|w| w.prints.as_ref()) {
                            stale_here |=
                                drop_unchanged(mapping, &mut fields, &prints, written, &company);
                        }
                    } else if link.is_none() && !is_new {
                        stale_here = drop_empty(&mut fields, &company);
                    }
                    let outcome = merge::merge_owned(
                        &mut company,
                        fields,
                        source,
                        rec.updated_at,
                        &self.settings.policy,
                        derived,
                    );
                    if !outcome.is_unchanged() || is_new {
                        tx.put_company(&company)?;
                    }
                    if !outcome.is_unchanged() {
                        debug!(canonical_id = %cid, changed = ?outcome.changed, "merged");
                    }
                    let keys = merge::match_keys_of(|n| company.get(n), &self.settings.match_keys);
                    (keys, !outcome.is_unchanged())
                }
            };
            if is_new {
                stats.created += 1;
            }
            for k in company_keys {
                let taken = match looked_up.iter().find(|(l, _)| *l == k) {
                    Some((_, taken)) => *taken,
                    None => tx.match_key(&k)?.is_some(),
                };
                if !taken {
                    tx.put_match_key(&k, &cid)?;
                    written.keys.insert(k);
                }
            }
            let entry = LedgerEntry {
                hash,
                at: now,
                prints: Some(prints),
            };
            match &link {
                Some(linked) => tx.put_ledger_linked(source, &rec.vendor_id, linked, &entry)?,
                // Neither side is linked yet: the record had no link, and the company is
                // new or was chosen because it has no record of this connector.
                None => tx.put_new_record(source, &rec.vendor_id, &cid, &entry)?,
            }
            // Written, or newly linked to a record of the source: a look-up that chose or
            // read this company may no longer hold.
            if changed || is_new || link.is_none() {
                written.companies.insert(cid.clone());
            }
            if stale_here && receives_pushes && tx.enqueue(source, &cid, now)? {
                stats.queued += 1;
            }
            if !changed {
                stats.unchanged += 1;
                continue;
            }
            stats.merged += 1;
            let targets = targets.iter().map(String::as_str).filter(|t| *t != source);
            if is_new {
                // A company created in this transaction has no entry anywhere yet.
                stats.queued += tx.enqueue_new(targets, &cid, now)?;
            } else {
                for t in targets {
                    if tx.enqueue(t, &cid, now)? {
                        stats.queued += 1;
                    }
                }
            }
        }
        if done != page.records.len() {
            // Only a panicked prepare thread ends the stream early; never commit a page
            // with records missing (the cursor would skip them).
            return Err(EngineError::Join(format!(
                "preparing records stopped after {done} of {}",
                page.records.len()
            )));
        }
        if let Some(key) = cursor_key {
            tx.put_cursor(key, &page.next)?;
        }
        tx.commit()?;
        Ok(stats)
    }

    /// Reads the stored cursor under `key`.
    pub fn cursor(&self, key: &str) -> Result<Cursor, EngineError> {
        Ok(self.store.begin_read()?.cursor(key)?.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::mapping::MappingRules;
    use crate::model::{CrmKind, Value, parse_decimal};

    /// Rules that exercise every kind of round trip: transforms, value maps, defaults,
    /// read-only and write-only rules, a key read by two fields, custom JSON fields.
    const TRICKY_RULES: &str = r#"
        [[fields]]
        canonical = "industry"
        vendor = "industry"
        values = { "Tech" = "Technology", "IT" = "Technology" }
        [[fields]]
        canonical = "city"
        vendor = "city"
        transforms = ["trim", "uppercase"]
        [[fields]]
        canonical = "country"
        vendor = "country"
        default = "US"
        [[fields]]
        canonical = "domain"
        vendor = "website"
        direction = "read-only"
        transforms = ["domain_from_url"]
        [[fields]]
        canonical = "notes"
        vendor = "notes"
        direction = "write-only"
        [[fields]]
        canonical = "custom.segment"
        vendor = "segment"
        [[fields]]
        canonical = "employeeCount"
        vendor = "employees"
        default = 7
        [[fields]]
        canonical = "description"
        vendor = "employees"
        direction = "read-only"
    "#;

    fn mappings() -> Vec<Mapping> {
        let tricky: MappingRules = toml::from_str(TRICKY_RULES).expect("tricky rules parse");
        let mut out: Vec<Mapping> = [CrmKind::Rally, CrmKind::Marketo, CrmKind::Amocrm]
            .into_iter()
            .map(|k| Mapping::compile(k, &MappingRules::default()).expect("defaults compile"))
            .collect();
        out.push(Mapping::compile(CrmKind::Rally, &tricky).expect("tricky rules compile"));
        // amoCRM without a "Domain" field: the domain is read off the website (a stand-in).
        let fitted = Mapping::fit(CrmKind::Amocrm, &MappingRules::default(), |keys| {
            keys.iter()
                .filter(|k| k.ends_with("Domain"))
                .cloned()
                .collect()
        })
        .expect("amoCRM defaults fit");
        assert_eq!(fitted.stand_ins, vec!["domain".to_string()]);
        out.push(fitted.mapping);
        out
    }

    fn value() -> impl Strategy<Value = Value> {
        let text = prop_oneof![
            Just(String::new()),
            Just(" Tech ".to_string()),
            Just("IT".to_string()),
            Just("Technology".to_string()),
            Just("https://www.Acme.com/x".to_string()),
            Just("12".to_string()),
            "[a-z ]{0,6}",
        ];
        prop_oneof![
            Just(Value::Null),
            text.clone().prop_map(Value::Text),
            (-5i64..5).prop_map(Value::Int),
            prop_oneof![Just("45.50"), Just("0"), Just("-1.000"), Just("1e3")]
                .prop_map(|d| Value::Decimal(parse_decimal(d).unwrap())),
            prop::collection::btree_set(text.clone(), 0..3)
                .prop_map(|t| Value::Tags(t.into_iter().collect::<BTreeSet<_>>())),
            prop_oneof![
                Just(serde_json::Value::Null),
                Just(serde_json::json!("Tech")),
                Just(serde_json::json!(1.50)),
                Just(serde_json::json!({"a": [1, null]})),
            ]
            .prop_map(Value::Json),
        ]
    }

    fn fields() -> impl Strategy<Value = Fields> {
        let names = prop_oneof![
            Just("name"),
            Just("domain"),
            Just("website"),
            Just("industry"),
            Just("city"),
            Just("country"),
            Just("notes"),
            Just("phone"),
            Just("tags"),
            Just("employeeCount"),
            Just("annualRevenue"),
            Just("description"),
            Just("externalCompanyId"),
            Just("custom.segment"),
        ];
        prop::collection::btree_map(names.prop_map(String::from), value(), 0..8)
    }

    /// Fields of the types their names declare, as a mapping reads them.
    fn typed_fields() -> impl Strategy<Value = Fields> {
        (
            "[a-z]{0,5}",
            prop_oneof![Just("acme.com"), Just("https://www.b.org/")],
            -3i64..3,
            prop_oneof![Just("45.50"), Just("0")],
            prop::collection::btree_set("[a-c]", 0..3),
            any::<bool>(),
        )
            .prop_map(|(name, site, n, rev, tags, nulls)| {
                let mut f = Fields::new();
                f.insert("name".into(), Value::Text(name.clone()));
                f.insert("website".into(), Value::Text(site.into()));
                f.insert("domain".into(), Value::Text("acme.com".into()));
                f.insert("industry".into(), Value::Text(" Tech ".into()));
                f.insert("city".into(), Value::Text(name));
                f.insert("employeeCount".into(), Value::Int(n));
                f.insert(
                    "annualRevenue".into(),
                    Value::Decimal(parse_decimal(rev).unwrap()),
                );
                f.insert("tags".into(), Value::Tags(tags));
                f.insert(
                    "country".into(),
                    if nulls {
                        Value::Null
                    } else {
                        Value::Text("DE".into())
                    },
                );
                f.insert(
                    "custom.segment".into(),
                    Value::Json(serde_json::json!("smb")),
                );
                f
            })
    }

    proptest! {
        #[test]
        fn visible_hash_equals_the_hash_of_an_actual_round_trip(f in fields()) {
            for m in mappings() {
                prop_assert_eq!(
                    visible_hash(&m, &f),
                    visible_hash_by_round_trip(&m, &f),
                    "mapping {:?}, fields {:?}", m.kind(), f
                );
            }
        }

        #[test]
        fn written_prints_are_what_the_written_record_reads_back_as(f in typed_fields()) {
            for m in mappings() {
                let Some(written) = m.written_prints(&f, crate::mapping::Before::New) else { continue };
                let Ok(w) = m.write(&f) else { continue };
                let w: serde_json::Map<String, serde_json::Value> = w
                    .into_iter()
                    .map(|(k, v)| (crate::mapping::split_enum_suffix(&k).0.to_string(), v))
                    .collect();
                let read = m.read_prints(&m.read(&w).unwrap());
                prop_assert_eq!(written.layout, read.layout);
                for (i, name) in m.print_fields().enumerate() {
                    // Unknown: the write leaves the field alone, so the record keeps
                    // whatever it held.
                    if written.values[i] != FieldPrints::UNKNOWN {
                        prop_assert_eq!(
                            written.values[i], read.values[i],
                            "mapping {:?}, field {}, fields {:?}", m.kind(), name, f
                        );
                    }
                }
            }
        }

        #[test]
        fn visible_hash_equals_the_round_trip_for_well_typed_fields(f in typed_fields()) {
            for m in mappings() {
                prop_assert_eq!(
                    visible_hash(&m, &f),
                    visible_hash_by_round_trip(&m, &f),
                    "mapping {:?}, fields {:?}", m.kind(), f
                );
            }
        }
    }
}

#[cfg(test)]
mod visible_hash_tests {
    use super::*;
    use crate::mapping::MappingRules;
    use crate::model::{CrmKind, Value};

    #[test]
    fn an_empty_tag_list_is_no_content_for_the_hash_nor_for_the_merge() {
        let m = Mapping::compile(CrmKind::Rally, &MappingRules::default()).unwrap();
        let mut without = Fields::new();
        without.insert("name".into(), Value::Text("Acme".into()));
        let mut with = without.clone();
        with.insert("tags".into(), Value::Tags(Default::default()));
        // Rally answers `tags: []` for a company we wrote without tags: an echo.
        assert_eq!(visible_hash(&m, &without), visible_hash(&m, &with));
        let mut company = Company::new(Company::new_id());
        merge::merge_owned(
            &mut company,
            without,
            "rally",
            Utc::now(),
            &Default::default(),
            &[],
        );
        let outcome = merge::merge_owned(
            &mut company,
            with,
            "rally",
            Utc::now(),
            &Default::default(),
            &[],
        );
        assert!(outcome.is_unchanged(), "{outcome:?}");
        assert!(company.get("tags").is_none());
    }

    #[test]
    fn an_amocrm_phone_only_change_changes_the_visible_hash() {
        let m = Mapping::compile(CrmKind::Amocrm, &MappingRules::default()).unwrap();
        let with = |phone: &str| -> Fields {
            [
                ("name".to_string(), Value::Text("Acme".into())),
                ("phone".to_string(), Value::Text(phone.into())),
            ]
            .into_iter()
            .collect()
        };
        assert_ne!(
            visible_hash(&m, &with("+1-555-0100")),
            visible_hash(&m, &with("+1-555-0100 x1")),
            "a field written with an enum code must take part in the hash"
        );
    }
}
