//! The redb-backed store: canonical companies, identity links, match keys, cursors, the
//! outbox, dead letters, the echo ledger, OAuth tokens and API quota counters.
//!
//! This is the only module that touches redb. Everything goes through a transaction:
//! [`ReadTx`] for consistent snapshots, [`WriteTx`] for changes that become visible (and
//! durable, fsync'ed) together on [`WriteTx::commit`] and not at all when the transaction
//! is dropped without one. That is what lets the engine store a page of records, the
//! cursor after it and the outbox entries it causes as one step.
//!
//! Companies, ledger and outbox entries, written for every record ingested, use the
//! compact binary encoding of the `codec` module; the rarely written rest (cursors, dead letters,
//! tokens) is JSON (serde_json). Counters and ids use redb's fixed-width integers;
//! composite keys are redb tuples such as `(connector, vendor_id)`.

mod codec;
mod error;
mod types;

#[cfg(test)]
mod tests;

use std::cell::{RefCell, RefMut};
use std::fmt::Display;
use std::mem::ManuallyDrop;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use redb::{
    Database, DatabaseError, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::connector::Cursor;
use crate::model::{CanonicalId, Company};

use error::StorageContext;
pub use error::StoreError;
pub use types::{
    DeadLetter, DeadLetterNew, Direction, LedgerEntry, OutboxEntry, OutboxRemoval, TokenRecord,
};

/// The schema version this build writes and understands. Bump it (and add a migration in
/// [`Store::open`]) whenever a table's key or value encoding changes.
///
/// - 1: every value JSON.
/// - 2: companies, ledger and outbox entries in the binary encoding of `codec`; ledger
///   hashes are those of the hand-written [`crate::model::content_hash`].
/// - 3: a record's link and ledger entry share one row (`records`, replacing `links` and
///   `ledger`), and a company's pending outbox entries for all targets share one row
///   (`outbox_pending`, replacing `outbox_index`): two fewer rows written per ingested
///   record, one fewer look-up per re-read.
pub const SCHEMA_VERSION: u32 = 3;

/// Bytes of redb page cache (the default would be 1 GiB).
const STORE_CACHE_BYTES: usize = 32 << 20;

/// A [`Tbl`] named `$name` whose open handles live in the `$field` slot of
/// [`OpenTables`] and [`ReadTables`].
macro_rules! tbl {
    ($name:literal, $field:ident) => {
        Tbl::new($name, |t| &t.$field, |t| &t.$field)
    };
}

// The meta table's types must never change: it is read before the version is known.
const META: Tbl<&str, u32> = tbl!("meta", meta);
const SCHEMA_KEY: &str = "schema_version";
/// Monotonic counters (outbox seq, dead-letter id), so ids are never reused.
const SEQUENCES: Tbl<&str, u64> = tbl!("sequences", sequences);
const OUTBOX_SEQ: &str = "outbox";
const DEAD_LETTER_SEQ: &str = "dead_letter";

const COMPANIES: Tbl<&str, &[u8]> = tbl!("companies", companies);
/// (connector, vendor_id) → the record's link and ledger entry ([`codec::RecordRow`]).
const RECORDS: Tbl<(&str, &str), &[u8]> = tbl!("records", records);
/// (canonical id, connector) → vendor_id.
const REVERSE_LINKS: Tbl<(&str, &str), &str> = tbl!("reverse_links", reverse_links);
const MATCH_KEYS: Tbl<&str, &str> = tbl!("match_keys", match_keys);
const CURSORS: Tbl<&str, &[u8]> = tbl!("cursors", cursors);
/// (target, seq) → OutboxEntry.
const OUTBOX: Tbl<(&str, u64), &[u8]> = tbl!("outbox", outbox);
/// canonical id → `(target, seq)` of its one pending entry per target
/// ([`codec::encode_pending`]).
const OUTBOX_PENDING: Tbl<&str, &[u8]> = tbl!("outbox_pending", outbox_pending);
/// target → number of entries, so lengths are O(1) and not a scan.
const OUTBOX_COUNTS: Tbl<&str, u64> = tbl!("outbox_counts", outbox_counts);
const DEAD_LETTERS: Tbl<u64, &[u8]> = tbl!("dead_letters", dead_letters);
/// (connector, canonical id) → id of the company's push dead letter there: a company
/// rejected again (queued anew by each of its changes) updates its letter instead of
/// adding one per attempt.
const PUSH_DEAD_LETTERS: Tbl<(&str, &str), u64> = tbl!("push_dead_letters", push_dead_letters);
/// (connector, canonical id) → the company's match keys when its create there landed on
/// another company's record: not created there again while its keys are the same (until
/// its dead letter is retried or dropped).
const BLOCKED_CREATES: Tbl<(&str, &str), &str> = tbl!("blocked_creates", blocked_creates);
/// (target, content hash) → the companies whose create was sent to `target` with that
/// content and has no recorded outcome yet (newline-separated ids; almost always one).
/// A record read from `target` with that content and no link is such a create that
/// landed — found after a crash between the send and its outcome, before the replay
/// could look for it — and is linked to its company instead of becoming a new one.
const CREATES_IN_FLIGHT: Tbl<(&str, &str), &str> = tbl!("creates_in_flight", creates_in_flight);
// Tables of schema 2 and before, read only by the migrations (which then delete them).
/// (connector, vendor_id) → canonical id.
const V2_LINKS: Tbl<(&str, &str), &str> = tbl!("links", v2_links);
/// (connector, vendor_id) → LedgerEntry.
const V2_LEDGER: Tbl<(&str, &str), &[u8]> = tbl!("ledger", v2_ledger);
/// (target, canonical id) → seq of its one pending entry.
const V2_OUTBOX_INDEX: Tbl<(&str, &str), u64> = tbl!("outbox_index", v2_outbox_index);
const TOKENS: Tbl<&str, &[u8]> = tbl!("tokens", tokens);
/// (connector, "YYYY-MM-DD") → calls made that day.
const QUOTA: Tbl<(&str, &str), u64> = tbl!("quota", quota);

/// A table's name and key/value types. Unlike redb's `TableDefinition`, its name is
/// `&'static str`, so errors can carry it without allocating.
struct Tbl<K: redb::Key + 'static, V: redb::Value + 'static> {
    name: &'static str,
    /// Where a write transaction caches this table's open handle.
    slot: fn(&OpenTables) -> &Slot<K, V>,
    /// Where a read transaction caches it.
    read_slot: fn(&ReadTables) -> &ReadSlot<K, V>,
}

impl<K: redb::Key + 'static, V: redb::Value + 'static> Clone for Tbl<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K: redb::Key + 'static, V: redb::Value + 'static> Copy for Tbl<K, V> {}

impl<K: redb::Key + 'static, V: redb::Value + 'static> Tbl<K, V> {
    const fn new(
        name: &'static str,
        slot: fn(&OpenTables) -> &Slot<K, V>,
        read_slot: fn(&ReadTables) -> &ReadSlot<K, V>,
    ) -> Self {
        Tbl {
            name,
            slot,
            read_slot,
        }
    }

    fn def(self) -> TableDefinition<'static, K, V> {
        TableDefinition::new(self.name)
    }
}

fn encode<T: Serialize>(table: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode { table, source })
}

/// Maps a [`codec`] failure to [`StoreError::Corrupt`] naming the table and key.
fn corrupt<T>(
    table: &'static str,
    key: impl Display,
    result: Result<T, codec::DecodeError>,
) -> Result<T, StoreError> {
    result.map_err(|reason| StoreError::Corrupt {
        table,
        key: key.to_string(),
        reason,
    })
}

fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: impl std::fmt::Display,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        table,
        key: key.to_string(),
        source,
    })
}

/// The store: one redb file. Cheap to clone (an `Arc` inside), `Send + Sync`.
///
/// redb allows one write transaction at a time; [`Store::begin_write`] blocks until the
/// previous one is committed or dropped, so callers on async runtimes should run write
/// transactions on blocking threads and keep them short.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens the store at `path`, creating the file (and its directory) and all tables if
    /// needed. Fails with [`StoreError::Locked`] when another process, or another `Store`
    /// in this one, has the file open, and with [`StoreError::NewerSchema`] when a newer
    /// crmbridge wrote it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: path.to_path_buf(),
                source,
            })?;
        }
        // redb's default page cache is 1 GiB; the working set of a sync is small, and the
        // daemon's memory must not grow with the store.
        let db = match redb::Builder::new()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)
        {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::Locked {
                    path: path.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let store = Store {
            db: Arc::new(db),
            path: Arc::new(path.to_path_buf()),
        };
        store.init_schema()?;
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the schema version and creates any missing table, in one transaction.
    fn init_schema(&self) -> Result<(), StoreError> {
        let tx = self.begin_write()?;
        {
            let mut meta = tx.table(META)?;
            let found = meta
                .get(SCHEMA_KEY)
                .at(META.name, "get")?
                .map(|v| v.value());
            match found {
                Some(found) if found > SCHEMA_VERSION => {
                    // Dropping `tx` aborts: the newer file stays untouched.
                    return Err(StoreError::NewerSchema {
                        path: self.path.to_path_buf(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(found) if found < SCHEMA_VERSION => {
                    drop(meta);
                    if found < 2 {
                        migrate_from_v1(&tx)?;
                    }
                    migrate_from_v2(&tx)?;
                    tx.table(META)?
                        .insert(SCHEMA_KEY, SCHEMA_VERSION)
                        .at(META.name, "insert")?;
                }
                Some(_) => {}
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION)
                        .at(META.name, "insert")?;
                }
            }
        }
        // Opening a table creates it; creating all of them here means read transactions
        // never meet a missing table.
        tx.table(SEQUENCES)?;
        tx.table(COMPANIES)?;
        tx.table(RECORDS)?;
        tx.table(REVERSE_LINKS)?;
        tx.table(MATCH_KEYS)?;
        tx.table(CURSORS)?;
        tx.table(OUTBOX)?;
        tx.table(OUTBOX_PENDING)?;
        tx.table(OUTBOX_COUNTS)?;
        tx.table(DEAD_LETTERS)?;
        tx.table(PUSH_DEAD_LETTERS)?;
        tx.table(BLOCKED_CREATES)?;
        tx.table(CREATES_IN_FLIGHT)?;
        tx.table(TOKENS)?;
        tx.table(QUOTA)?;
        tx.commit()
    }

    /// The schema version recorded in the file.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        let tx = self.begin_read()?;
        let meta = tx.table(META)?;
        Ok(meta
            .get(SCHEMA_KEY)
            .at(META.name, "get")?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Starts a write transaction, waiting for the current one (if any) to finish.
    pub fn begin_write(&self) -> Result<WriteTx, StoreError> {
        let txn = self.db.begin_write().map_err(|source| StoreError::Begin {
            kind: "write",
            source,
        })?;
        Ok(WriteTx {
            pending: RefCell::default(),
            tables: OpenTables::default(),
            txn: TxnBox::new(txn),
        })
    }

    /// Starts a read transaction: a consistent snapshot of the last commit.
    pub fn begin_read(&self) -> Result<ReadTx, StoreError> {
        let txn = self.db.begin_read().map_err(|source| StoreError::Begin {
            kind: "read",
            source,
        })?;
        Ok(ReadTx {
            tables: ReadTables::default(),
            txn,
        })
    }

    /// Copies into this store what talking to the vendors changed in `other`: OAuth
    /// tokens (amoCRM's refresh tokens are single-use), API quota counts and last-call
    /// times (cursor rows `last-call:…`). Work done on a scratch copy of the store (a dry
    /// run) then spends nothing the daemon does not know about.
    pub fn take_vendor_state_from(&self, other: &Store) -> Result<(), StoreError> {
        let from = other.begin_read()?;
        let to = self.begin_write()?;
        {
            let mut dst = to.table(TOKENS)?;
            for row in from.table(TOKENS)?.iter().at(TOKENS.name, "iter")? {
                let (k, v) = row.at(TOKENS.name, "iter")?;
                dst.insert(k.value(), v.value()).at(TOKENS.name, "insert")?;
            }
        }
        {
            let mut dst = to.table(QUOTA)?;
            for row in from.table(QUOTA)?.iter().at(QUOTA.name, "iter")? {
                let (k, v) = row.at(QUOTA.name, "iter")?;
                dst.insert(k.value(), v.value()).at(QUOTA.name, "insert")?;
            }
        }
        {
            let mut dst = to.table(CURSORS)?;
            let src = from.table(CURSORS)?;
            // `;` follows `:`: the range holds exactly the keys starting "last-call:".
            for row in src
                .range("last-call:".."last-call;")
                .at(CURSORS.name, "range")?
            {
                let (k, v) = row.at(CURSORS.name, "range")?;
                dst.insert(k.value(), v.value())
                    .at(CURSORS.name, "insert")?;
            }
        }
        to.commit()
    }
}

/// Re-encodes the JSON values of a version-1 store in the binary encoding of version 2.
/// Ledger hashes were computed differently then; a stale one only costs one redundant
/// merge or push of that record, which then records the new hash.
fn migrate_from_v1(tx: &WriteTx) -> Result<(), StoreError> {
    {
        let mut t = tx.table(COMPANIES)?;
        let mut all = Vec::new();
        for item in t.iter().at(COMPANIES.name, "iter")? {
            let (k, v) = item.at(COMPANIES.name, "iter")?;
            let c: Company = decode(COMPANIES.name, k.value(), v.value())?;
            all.push(c);
        }
        for c in all {
            t.insert(c.id.as_str(), codec::encode_company(&c).as_slice())
                .at(COMPANIES.name, "insert")?;
        }
    }
    {
        let mut t = tx.table(V2_LEDGER)?;
        let mut all = Vec::new();
        for item in t.iter().at(V2_LEDGER.name, "iter")? {
            let (k, v) = item.at(V2_LEDGER.name, "iter")?;
            let (connector, vendor_id) = k.value();
            let e: LedgerEntry = decode(V2_LEDGER.name, vendor_id, v.value())?;
            all.push((connector.to_owned(), vendor_id.to_owned(), e));
        }
        for (connector, vendor_id, e) in all {
            t.insert(
                (connector.as_str(), vendor_id.as_str()),
                codec::encode_ledger(&e).as_slice(),
            )
            .at(V2_LEDGER.name, "insert")?;
        }
    }
    let mut t = tx.table(OUTBOX)?;
    let mut all = Vec::new();
    for item in t.iter().at(OUTBOX.name, "iter")? {
        let (k, v) = item.at(OUTBOX.name, "iter")?;
        let (target, seq) = k.value();
        let e: OutboxEntry = decode(OUTBOX.name, seq, v.value())?;
        all.push((target.to_owned(), seq, e));
    }
    for (target, seq, e) in all {
        t.insert((target.as_str(), seq), codec::encode_outbox(&e).as_slice())
            .at(OUTBOX.name, "insert")?;
    }
    Ok(())
}

/// Moves version-2 links and ledger entries into the `records` rows of version 3, and
/// the per-target outbox index into one `outbox_pending` row per company; then deletes
/// the old tables.
fn migrate_from_v2(tx: &WriteTx) -> Result<(), StoreError> {
    let mut rows: std::collections::BTreeMap<(String, String), codec::RecordRow> =
        Default::default();
    for item in tx.table(V2_LINKS)?.iter().at(V2_LINKS.name, "iter")? {
        let (k, v) = item.at(V2_LINKS.name, "iter")?;
        let (connector, vendor_id) = k.value();
        rows.entry((connector.to_owned(), vendor_id.to_owned()))
            .or_default()
            .canonical_id = Some(v.value().to_owned());
    }
    for item in tx.table(V2_LEDGER)?.iter().at(V2_LEDGER.name, "iter")? {
        let (k, v) = item.at(V2_LEDGER.name, "iter")?;
        let (connector, vendor_id) = k.value();
        let e = corrupt(
            V2_LEDGER.name,
            format_args!("({connector}, {vendor_id})"),
            codec::decode_ledger(v.value()),
        )?;
        rows.entry((connector.to_owned(), vendor_id.to_owned()))
            .or_default()
            .ledger = Some(e);
    }
    {
        let mut records = tx.table(RECORDS)?;
        for ((connector, vendor_id), row) in &rows {
            let bytes = codec::encode_record(row.canonical_id.as_deref(), row.ledger.as_ref());
            records
                .insert((connector.as_str(), vendor_id.as_str()), bytes.as_slice())
                .at(RECORDS.name, "insert")?;
        }
    }
    let mut pending: std::collections::BTreeMap<String, Vec<(String, u64)>> = Default::default();
    for item in tx
        .table(V2_OUTBOX_INDEX)?
        .iter()
        .at(V2_OUTBOX_INDEX.name, "iter")?
    {
        let (k, v) = item.at(V2_OUTBOX_INDEX.name, "iter")?;
        let (target, canonical_id) = k.value();
        pending
            .entry(canonical_id.to_owned())
            .or_default()
            .push((target.to_owned(), v.value()));
    }
    {
        let mut t = tx.table(OUTBOX_PENDING)?;
        for (canonical_id, list) in &pending {
            let list: Vec<(&str, u64)> = list.iter().map(|(t, s)| (t.as_str(), *s)).collect();
            t.insert(
                canonical_id.as_str(),
                codec::encode_pending(&list).as_slice(),
            )
            .at(OUTBOX_PENDING.name, "insert")?;
        }
    }
    tx.delete_table(V2_LINKS)?;
    tx.delete_table(V2_LEDGER)?;
    tx.delete_table(V2_OUTBOX_INDEX)
}

/// A read-only snapshot. Sees exactly what was committed when it began.
pub struct ReadTx {
    tables: ReadTables,
    txn: redb::ReadTransaction,
}

impl ReadTx {
    /// The open handle of `def`, opened on first use in this transaction (opening costs
    /// a catalogue look-up, about as much as the `get` that follows; see [`OpenTables`]).
    fn table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        def: Tbl<K, V>,
    ) -> Result<&ReadOnlyTable<K, V>, StoreError> {
        let slot = (def.read_slot)(&self.tables);
        if let Some(table) = slot.get() {
            return Ok(table);
        }
        let table = self
            .txn
            .open_table(def.def())
            .map_err(|source| StoreError::Table {
                table: def.name,
                source,
            })?;
        // Another thread may have filled the slot meanwhile: both handles are equal.
        Ok(slot.get_or_init(|| table))
    }
}

/// A write transaction. Nothing it writes is visible to others until [`WriteTx::commit`];
/// dropping it without a commit discards every change.
///
/// `Send` but not `Sync`: use it from one thread at a time (ideally a blocking thread;
/// redb serialises write transactions, so keep it short and never hold it across an
/// `.await` that waits on the network).
pub struct WriteTx {
    pending: RefCell<Pending>,
    // Field order is load-bearing: `tables` borrows from `*txn` and must drop first.
    tables: OpenTables,
    txn: TxnBox,
}

/// Counter updates a write transaction keeps in memory and writes once, before commit
/// (or before a read of them): an ingest page bumps the outbox sequence and lengths once
/// per entry, and a table read + write per bump was a third of an enqueue.
#[derive(Default)]
struct Pending {
    /// Sequences used in this transaction with their latest value, and whether that
    /// value is not yet written.
    seqs: Vec<(&'static str, u64, bool)>,
    /// Outbox length changes per target, not yet written.
    counts: Vec<(String, i64)>,
}

/// The outbox table's handle type inside a write transaction.
type OutboxTable = redb::Table<'static, (&'static str, u64), &'static [u8]>;

/// A cached open table of a write transaction (see [`OpenTables`]).
type Slot<K, V> = RefCell<Option<redb::Table<'static, K, V>>>;

/// Table handles opened once per write transaction and reused by every call.
///
/// Opening a redb table costs a lookup in the table catalogue, about as much as the
/// `get` or `insert` that follows; an engine page touches ~10 tables per record, so
/// reopening per call would roughly halve throughput. redb's handles borrow the
/// transaction, hence the `'static` stand-in lifetime: see [`WriteTx::table`].
#[derive(Default)]
struct OpenTables {
    meta: Slot<&'static str, u32>,
    sequences: Slot<&'static str, u64>,
    companies: Slot<&'static str, &'static [u8]>,
    records: Slot<(&'static str, &'static str), &'static [u8]>,
    reverse_links: Slot<(&'static str, &'static str), &'static str>,
    match_keys: Slot<&'static str, &'static str>,
    cursors: Slot<&'static str, &'static [u8]>,
    outbox: Slot<(&'static str, u64), &'static [u8]>,
    outbox_pending: Slot<&'static str, &'static [u8]>,
    outbox_counts: Slot<&'static str, u64>,
    dead_letters: Slot<u64, &'static [u8]>,
    push_dead_letters: Slot<(&'static str, &'static str), u64>,
    blocked_creates: Slot<(&'static str, &'static str), &'static str>,
    creates_in_flight: Slot<(&'static str, &'static str), &'static str>,
    v2_links: Slot<(&'static str, &'static str), &'static str>,
    v2_ledger: Slot<(&'static str, &'static str), &'static [u8]>,
    v2_outbox_index: Slot<(&'static str, &'static str), u64>,
    tokens: Slot<&'static str, &'static [u8]>,
    quota: Slot<(&'static str, &'static str), u64>,
}

/// A cached open table of a read transaction (see [`ReadTables`]).
type ReadSlot<K, V> = OnceLock<ReadOnlyTable<K, V>>;

/// Table handles opened once per read transaction and reused by every call (the
/// prepare thread of an ingest page looks up several tables per record).
#[derive(Default)]
struct ReadTables {
    meta: ReadSlot<&'static str, u32>,
    sequences: ReadSlot<&'static str, u64>,
    companies: ReadSlot<&'static str, &'static [u8]>,
    records: ReadSlot<(&'static str, &'static str), &'static [u8]>,
    reverse_links: ReadSlot<(&'static str, &'static str), &'static str>,
    match_keys: ReadSlot<&'static str, &'static str>,
    cursors: ReadSlot<&'static str, &'static [u8]>,
    outbox: ReadSlot<(&'static str, u64), &'static [u8]>,
    outbox_pending: ReadSlot<&'static str, &'static [u8]>,
    outbox_counts: ReadSlot<&'static str, u64>,
    dead_letters: ReadSlot<u64, &'static [u8]>,
    push_dead_letters: ReadSlot<(&'static str, &'static str), u64>,
    blocked_creates: ReadSlot<(&'static str, &'static str), &'static str>,
    creates_in_flight: ReadSlot<(&'static str, &'static str), &'static str>,
    v2_links: ReadSlot<(&'static str, &'static str), &'static str>,
    v2_ledger: ReadSlot<(&'static str, &'static str), &'static [u8]>,
    v2_outbox_index: ReadSlot<(&'static str, &'static str), u64>,
    tokens: ReadSlot<&'static str, &'static [u8]>,
    quota: ReadSlot<(&'static str, &'static str), u64>,
}

/// The heap-allocated redb transaction the cached tables point into. A raw pointer rather
/// than a `Box` field so that moving the `WriteTx` asserts nothing about uniqueness while
/// tables hold shared references to it.
struct TxnBox(NonNull<redb::WriteTransaction>);

impl TxnBox {
    fn new(txn: redb::WriteTransaction) -> Self {
        TxnBox(NonNull::from(Box::leak(Box::new(txn))))
    }

    fn get(&self) -> &redb::WriteTransaction {
        // SAFETY: the pointer comes from `Box::leak` and is freed only by `into_inner`
        // or `drop`, both of which consume `self`.
        unsafe { self.0.as_ref() }
    }

    /// The transaction, by value. Callers must have dropped every table first.
    fn into_inner(self) -> redb::WriteTransaction {
        let this = ManuallyDrop::new(self);
        // SAFETY: as in `get`; `ManuallyDrop` keeps `drop` from freeing it a second time.
        *unsafe { Box::from_raw(this.0.as_ptr()) }
    }
}

impl Drop for TxnBox {
    fn drop(&mut self) {
        // SAFETY: as in `get`. Dropping the transaction aborts it.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

// SAFETY: `WriteTx` owns its transaction and every table borrowing it, and they always
// move together. redb's `WriteTransaction` is `Send + Sync` and its `Table` is `Send`,
// so handing the whole bundle to another thread is sound. (Not `Sync`: `RefCell`.)
unsafe impl Send for WriteTx {}

impl WriteTx {
    /// The open handle of `def`, opened (or created) on first use in this transaction.
    ///
    /// Panics if this module borrows the same table twice at once (a bug here, never a
    /// runtime condition).
    fn table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        def: Tbl<K, V>,
    ) -> Result<RefMut<'_, redb::Table<'static, K, V>>, StoreError> {
        let mut slot = (def.slot)(&self.tables).borrow_mut();
        if slot.is_none() {
            let table =
                self.txn
                    .get()
                    .open_table(def.def())
                    .map_err(|source| StoreError::Table {
                        table: def.name,
                        source,
                    })?;
            // SAFETY: the table borrows `*self.txn`, which is heap-allocated, never moves,
            // and is freed only after `self.tables` is dropped (field order in `WriteTx`;
            // `commit`/`abort` drop the tables explicitly first). The `'static` never
            // escapes this module: handles are only lent out behind `RefMut<'_>`, and no
            // method of `redb::Table` returns anything carrying its transaction lifetime.
            let table: redb::Table<'static, K, V> = unsafe { std::mem::transmute(table) };
            *slot = Some(table);
        }
        Ok(RefMut::map(slot, |t| {
            t.as_mut().expect("slot was just filled")
        }))
    }

    /// Deletes table `def` (closing its cached handle first); a missing table is fine.
    fn delete_table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        def: Tbl<K, V>,
    ) -> Result<(), StoreError> {
        (def.slot)(&self.tables).borrow_mut().take();
        self.txn
            .get()
            .delete_table(def.def())
            .map(|_| ())
            .map_err(|source| StoreError::Table {
                table: def.name,
                source,
            })
    }

    /// Makes every change of this transaction visible and durable (fsync), or none.
    pub fn commit(self) -> Result<(), StoreError> {
        self.flush_pending()?;
        let WriteTx {
            tables,
            txn,
            pending: _,
        } = self;
        // Closing the tables stages their new roots in the transaction.
        drop(tables);
        txn.into_inner()
            .commit()
            .map_err(|source| StoreError::Commit { source })
    }

    /// Discards every change (what dropping the transaction does, but explicit).
    pub fn abort(self) -> Result<(), StoreError> {
        let WriteTx {
            tables,
            txn,
            pending: _,
        } = self;
        drop(tables);
        txn.into_inner().abort().at("(all)", "abort")
    }

    fn next_seq(&self, name: &'static str) -> Result<u64, StoreError> {
        let mut pending = self.pending.borrow_mut();
        if let Some((_, value, dirty)) = pending.seqs.iter_mut().find(|(n, _, _)| *n == name) {
            *value += 1;
            *dirty = true;
            return Ok(*value);
        }
        let next = self
            .table(SEQUENCES)?
            .get(name)
            .at(SEQUENCES.name, "get")?
            .map(|v| v.value())
            .unwrap_or(0)
            + 1;
        pending.seqs.push((name, next, true));
        Ok(next)
    }

    /// Writes the counters kept in memory ([`Pending`]) to their tables.
    fn flush_pending(&self) -> Result<(), StoreError> {
        let mut pending = self.pending.borrow_mut();
        if pending.seqs.iter().any(|(_, _, dirty)| *dirty) {
            let mut t = self.table(SEQUENCES)?;
            for (name, value, dirty) in &mut pending.seqs {
                if *dirty {
                    t.insert(*name, *value).at(SEQUENCES.name, "insert")?;
                    *dirty = false;
                }
            }
        }
        if pending.counts.is_empty() {
            return Ok(());
        }
        let mut counts = self.table(OUTBOX_COUNTS)?;
        for (target, delta) in pending.counts.drain(..) {
            let current = counts
                .get(target.as_str())
                .at(OUTBOX_COUNTS.name, "get")?
                .map(|v| v.value())
                .unwrap_or(0);
            let next = current.saturating_add_signed(delta);
            if next == 0 {
                counts
                    .remove(target.as_str())
                    .at(OUTBOX_COUNTS.name, "remove")?;
            } else {
                counts
                    .insert(target.as_str(), next)
                    .at(OUTBOX_COUNTS.name, "insert")?;
            }
        }
        Ok(())
    }

    /// Stores (replaces) a canonical company.
    pub fn put_company(&self, company: &Company) -> Result<(), StoreError> {
        let bytes = codec::encode_company(company);
        self.table(COMPANIES)?
            .insert(company.id.as_str(), bytes.as_slice())
            .at(COMPANIES.name, "insert")?;
        Ok(())
    }

    /// [`put_company`](Self::put_company) with the encoding made beforehand.
    pub fn put_encoded_company(
        &self,
        id: &str,
        company: &EncodedCompany,
    ) -> Result<(), StoreError> {
        self.table(COMPANIES)?
            .insert(id, company.0.as_slice())
            .at(COMPANIES.name, "insert")?;
        Ok(())
    }

    /// Writes the record row of `connector`'s `vendor_id`, or removes it when it would
    /// hold nothing.
    fn put_record_row(
        &self,
        connector: &str,
        vendor_id: &str,
        canonical_id: Option<&str>,
        ledger: Option<&LedgerEntry>,
    ) -> Result<(), StoreError> {
        let mut records = self.table(RECORDS)?;
        if canonical_id.is_none() && ledger.is_none() {
            records
                .remove((connector, vendor_id))
                .at(RECORDS.name, "remove")?;
        } else {
            let bytes = codec::encode_record(canonical_id, ledger);
            records
                .insert((connector, vendor_id), bytes.as_slice())
                .at(RECORDS.name, "insert")?;
        }
        Ok(())
    }

    /// Links `connector`'s record `vendor_id` to `canonical_id`, both ways. A previous
    /// record of that connector linked to the same company loses its link, and so does a
    /// previous company linked to that record: each pair stays one-to-one. Ledger entries
    /// stay where they are.
    pub fn put_link(
        &self,
        connector: &str,
        vendor_id: &str,
        canonical_id: &str,
    ) -> Result<(), StoreError> {
        let old_vendor = self.vendor_id_of(canonical_id, connector)?;
        if let Some(old_vendor) = old_vendor.filter(|v| v != vendor_id)
            && let Some(row) = self.record_row(connector, &old_vendor)?
            && row.canonical_id.as_deref() == Some(canonical_id)
        {
            self.put_record_row(connector, &old_vendor, None, row.ledger.as_ref())?;
        }
        let row = self.record_row(connector, vendor_id)?.unwrap_or_default();
        let mut reverse = self.table(REVERSE_LINKS)?;
        if let Some(old_canonical) = row.canonical_id.as_deref().filter(|c| *c != canonical_id) {
            let stale = reverse
                .get((old_canonical, connector))
                .at(REVERSE_LINKS.name, "get")?
                .is_some_and(|v| v.value() == vendor_id);
            if stale {
                reverse
                    .remove((old_canonical, connector))
                    .at(REVERSE_LINKS.name, "remove")?;
            }
        }
        self.put_record_row(
            connector,
            vendor_id,
            Some(canonical_id),
            row.ledger.as_ref(),
        )?;
        reverse
            .insert((canonical_id, connector), vendor_id)
            .at(REVERSE_LINKS.name, "insert")?;
        Ok(())
    }

    /// Links `connector`'s record `vendor_id` to `canonical_id` when the caller knows that
    /// neither is linked yet (the record has no company, the company no record of that
    /// connector): [`put_link`](Self::put_link) without its checks for links to undo.
    pub fn put_new_link(
        &self,
        connector: &str,
        vendor_id: &str,
        canonical_id: &str,
    ) -> Result<(), StoreError> {
        debug_assert_eq!(self.vendor_id_of(canonical_id, connector)?, None);
        let row = self.record_row(connector, vendor_id)?.unwrap_or_default();
        debug_assert_eq!(row.canonical_id, None);
        self.put_record_row(
            connector,
            vendor_id,
            Some(canonical_id),
            row.ledger.as_ref(),
        )?;
        self.table(REVERSE_LINKS)?
            .insert((canonical_id, connector), vendor_id)
            .at(REVERSE_LINKS.name, "insert")?;
        Ok(())
    }

    /// [`put_new_link`](Self::put_new_link) and [`put_ledger`](Self::put_ledger) in one
    /// row write: for a record seen for the first time, whose (absent) row needs no read.
    pub fn put_new_record(
        &self,
        connector: &str,
        vendor_id: &str,
        canonical_id: &str,
        ledger: &LedgerEntry,
    ) -> Result<(), StoreError> {
        debug_assert_eq!(self.vendor_id_of(canonical_id, connector)?, None);
        debug_assert_eq!(self.link_of(connector, vendor_id)?, None);
        self.put_record_row(connector, vendor_id, Some(canonical_id), Some(ledger))?;
        self.table(REVERSE_LINKS)?
            .insert((canonical_id, connector), vendor_id)
            .at(REVERSE_LINKS.name, "insert")?;
        Ok(())
    }

    /// Removes the link of `connector`'s record `vendor_id` (both directions); returns the
    /// company it was linked to. Its ledger entry stays.
    pub fn remove_link(
        &self,
        connector: &str,
        vendor_id: &str,
    ) -> Result<Option<CanonicalId>, StoreError> {
        let Some(row) = self.record_row(connector, vendor_id)? else {
            return Ok(None);
        };
        let Some(canonical) = row.canonical_id else {
            return Ok(None);
        };
        self.put_record_row(connector, vendor_id, None, row.ledger.as_ref())?;
        let mut reverse = self.table(REVERSE_LINKS)?;
        let ours = reverse
            .get((canonical.as_str(), connector))
            .at(REVERSE_LINKS.name, "get")?
            .is_some_and(|v| v.value() == vendor_id);
        if ours {
            reverse
                .remove((canonical.as_str(), connector))
                .at(REVERSE_LINKS.name, "remove")?;
        }
        Ok(Some(canonical))
    }

    /// Points a match key (`"domain:acme.com"`, `"ext:EXT-1"`) at a company.
    pub fn put_match_key(&self, key: &str, canonical_id: &str) -> Result<(), StoreError> {
        self.table(MATCH_KEYS)?
            .insert(key, canonical_id)
            .at(MATCH_KEYS.name, "insert")?;
        Ok(())
    }

    /// Removes a match key (the company no longer has that domain / external id).
    pub fn remove_match_key(&self, key: &str) -> Result<(), StoreError> {
        self.table(MATCH_KEYS)?
            .remove(key)
            .at(MATCH_KEYS.name, "remove")?;
        Ok(())
    }

    /// Stores a connector's cursor. Do it in the transaction that stores what was read
    /// under it, so the cursor never runs ahead of the data.
    pub fn put_cursor(&self, connector: &str, cursor: &Cursor) -> Result<(), StoreError> {
        let bytes = encode(CURSORS.name, cursor)?;
        self.table(CURSORS)?
            .insert(connector, bytes.as_slice())
            .at(CURSORS.name, "insert")?;
        Ok(())
    }

    fn outbox_entry(
        &self,
        outbox: &OutboxTable,
        target: &str,
        seq: u64,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        outbox
            .get((target, seq))
            .at(OUTBOX.name, "get")?
            .map(|v| {
                corrupt(
                    OUTBOX.name,
                    format_args!("({target}, {seq})"),
                    codec::decode_outbox(v.value()),
                )
            })
            .transpose()
    }

    fn put_outbox_entry(
        &self,
        outbox: &mut OutboxTable,
        target: &str,
        seq: u64,
        entry: &OutboxEntry,
    ) -> Result<(), StoreError> {
        let bytes = codec::encode_outbox(entry);
        outbox
            .insert((target, seq), bytes.as_slice())
            .at(OUTBOX.name, "insert")?;
        Ok(())
    }

    /// Queues a push of `canonical_id` to `target`. Returns true if a push is newly due:
    /// a new entry, or an entry whose send is in flight with older state (it will then
    /// stay queued after that send, see [`OutboxRemoval::Requeued`]). Returns false when
    /// an entry is already waiting: the drain maps the company's latest state, so that
    /// entry covers this change too.
    pub fn enqueue(
        &self,
        target: &str,
        canonical_id: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut pending = self.pending_of(canonical_id)?;
        if let Some(&(_, seq)) = pending.iter().find(|(t, _)| t == target) {
            let mut outbox = self.table(OUTBOX)?;
            if let Some(mut entry) = self.outbox_entry(&outbox, target, seq)? {
                if entry.sending && !entry.changed_while_sending {
                    entry.changed_while_sending = true;
                    self.put_outbox_entry(&mut outbox, target, seq, &entry)?;
                    return Ok(true);
                }
                return Ok(false);
            }
            // The entry is gone without its pending pair (never written so by this
            // module): replace the pair below.
            pending.retain(|(t, _)| t != target);
        }
        let seq = self.next_seq(OUTBOX_SEQ)?;
        self.insert_new_entry(target, canonical_id, seq, now)?;
        pending.push((target.to_owned(), seq));
        self.put_pending(canonical_id, &pending)?;
        Ok(true)
    }

    /// [`enqueue`](Self::enqueue) to each of `targets` for a company created in this
    /// transaction, which has no entry yet: no look-up, and one pending row for all
    /// targets. Returns how many entries were queued (one per target).
    pub fn enqueue_new<'t>(
        &self,
        targets: impl IntoIterator<Item = &'t str>,
        canonical_id: &str,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        debug_assert!(
            self.pending_of(canonical_id)?.is_empty(),
            "enqueue_new of {canonical_id}, which has entries"
        );
        let mut pending: Vec<(&str, u64)> = Vec::with_capacity(2);
        for target in targets {
            if pending.iter().any(|(t, _)| *t == target) {
                continue;
            }
            let seq = self.next_seq(OUTBOX_SEQ)?;
            self.insert_new_entry(target, canonical_id, seq, now)?;
            pending.push((target, seq));
        }
        if !pending.is_empty() {
            self.table(OUTBOX_PENDING)?
                .insert(canonical_id, codec::encode_pending(&pending).as_slice())
                .at(OUTBOX_PENDING.name, "insert")?;
        }
        Ok(pending.len())
    }

    /// A company's pending `(target, seq)` pairs.
    fn pending_of(&self, canonical_id: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let t = self.table(OUTBOX_PENDING)?;
        let Some(v) = t.get(canonical_id).at(OUTBOX_PENDING.name, "get")? else {
            return Ok(Vec::new());
        };
        let list = corrupt(
            OUTBOX_PENDING.name,
            canonical_id,
            codec::decode_pending(v.value()),
        )?;
        Ok(list.into_iter().map(|(t, s)| (t.to_owned(), s)).collect())
    }

    /// Stores a company's pending pairs (removing the row when there are none).
    fn put_pending(&self, canonical_id: &str, pending: &[(String, u64)]) -> Result<(), StoreError> {
        let mut t = self.table(OUTBOX_PENDING)?;
        if pending.is_empty() {
            t.remove(canonical_id).at(OUTBOX_PENDING.name, "remove")?;
        } else {
            let list: Vec<(&str, u64)> = pending.iter().map(|(t, s)| (t.as_str(), *s)).collect();
            t.insert(canonical_id, codec::encode_pending(&list).as_slice())
                .at(OUTBOX_PENDING.name, "insert")?;
        }
        Ok(())
    }

    /// Writes a fresh entry `seq` for `canonical_id` and counts it (the caller records
    /// the pending pair).
    fn insert_new_entry(
        &self,
        target: &str,
        canonical_id: &str,
        seq: u64,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let entry = OutboxEntry {
            canonical_id: canonical_id.to_owned(),
            enqueued_at: now,
            attempts: 0,
            last_error: None,
            sending: false,
            changed_while_sending: false,
            unconfirmed_since: None,
        };
        self.put_outbox_entry(&mut *self.table(OUTBOX)?, target, seq, &entry)?;
        self.bump_outbox_count(target, 1)
    }

    fn bump_outbox_count(&self, target: &str, delta: i64) -> Result<(), StoreError> {
        let mut pending = self.pending.borrow_mut();
        match pending.counts.iter_mut().find(|(t, _)| t == target) {
            Some((_, d)) => *d += delta,
            None => pending.counts.push((target.to_owned(), delta)),
        }
        Ok(())
    }

    /// Records that a send of entry `seq` starts: `attempts += 1`, `sending = true`.
    /// Commit this before calling the vendor, so a crash mid-send is visible on restart.
    /// An entry still `sending` here is a send whose outcome was never recorded (a crash,
    /// or a failed outcome commit): it may have landed, so the entry becomes unconfirmed
    /// since it was queued (the only bound known). Returns the updated entry, or `None` if
    /// there is no such entry.
    pub fn outbox_mark_sending(
        &self,
        target: &str,
        seq: u64,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        let mut outbox = self.table(OUTBOX)?;
        let Some(mut entry) = self.outbox_entry(&outbox, target, seq)? else {
            return Ok(None);
        };
        if entry.sending && entry.unconfirmed_since.is_none() {
            entry.unconfirmed_since = Some(entry.enqueued_at);
        }
        entry.attempts = entry.attempts.saturating_add(1);
        entry.sending = true;
        entry.changed_while_sending = false;
        self.put_outbox_entry(&mut outbox, target, seq, &entry)?;
        Ok(Some(entry))
    }

    /// Records a failed send of entry `seq`: it stays queued with `error` as its last
    /// error. Returns the updated entry, or `None` if there is no such entry.
    pub fn outbox_fail(
        &self,
        target: &str,
        seq: u64,
        error: &str,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        self.outbox_failed(target, seq, error, |kept| kept)
    }

    /// Records a send of entry `seq`, started no earlier than `sent_at`, whose outcome is
    /// unknown (it may have landed): like [`Self::outbox_fail`], and the entry is
    /// unconfirmed since `sent_at` unless it already was since earlier.
    pub fn outbox_fail_unconfirmed(
        &self,
        target: &str,
        seq: u64,
        error: &str,
        sent_at: DateTime<Utc>,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        self.outbox_failed(target, seq, error, |kept| {
            Some(kept.map_or(sent_at, |since| since.min(sent_at)))
        })
    }

    /// Records a send of entry `seq` whose earlier, unconfirmed create is now known not to
    /// be the record the target resolved it to (a replay's look-up found another
    /// company's): like [`Self::outbox_fail`], and the entry is no longer unconfirmed, so
    /// the next send creates the company instead of looking for it again.
    pub fn outbox_fail_as_not_landed(
        &self,
        target: &str,
        seq: u64,
        error: &str,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        self.outbox_failed(target, seq, error, |_| None)
    }

    /// Records a failed send of entry `seq`; `unconfirmed` maps the entry's
    /// `unconfirmed_since` to its new value.
    fn outbox_failed(
        &self,
        target: &str,
        seq: u64,
        error: &str,
        unconfirmed: impl FnOnce(Option<DateTime<Utc>>) -> Option<DateTime<Utc>>,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        let mut outbox = self.table(OUTBOX)?;
        let Some(mut entry) = self.outbox_entry(&outbox, target, seq)? else {
            return Ok(None);
        };
        entry.sending = false;
        // The next send maps the latest state anyway.
        entry.changed_while_sending = false;
        entry.last_error = Some(error.to_owned());
        entry.unconfirmed_since = unconfirmed(entry.unconfirmed_since);
        self.put_outbox_entry(&mut outbox, target, seq, &entry)?;
        Ok(Some(entry))
    }

    /// Takes entry `seq` off the outbox after the target answered (written, or rejected
    /// and dead-lettered). If the company changed while the send was in flight, the entry
    /// stays queued instead (attempts reset), since the target has not seen that change.
    pub fn outbox_remove(&self, target: &str, seq: u64) -> Result<OutboxRemoval, StoreError> {
        let mut outbox = self.table(OUTBOX)?;
        let Some(mut entry) = self.outbox_entry(&outbox, target, seq)? else {
            return Ok(OutboxRemoval::NotFound);
        };
        if entry.changed_while_sending {
            entry.changed_while_sending = false;
            entry.sending = false;
            entry.attempts = 0;
            entry.last_error = None;
            self.put_outbox_entry(&mut outbox, target, seq, &entry)?;
            return Ok(OutboxRemoval::Requeued);
        }
        outbox.remove((target, seq)).at(OUTBOX.name, "remove")?;
        drop(outbox);
        let mut pending = self.pending_of(&entry.canonical_id)?;
        let before = pending.len();
        pending.retain(|(t, s)| !(t == target && *s == seq));
        if pending.len() != before {
            self.put_pending(&entry.canonical_id, &pending)?;
        }
        self.bump_outbox_count(target, -1)?;
        Ok(OutboxRemoval::Removed)
    }

    /// Adds a dead letter; returns its id.
    pub fn add_dead_letter(&self, new: DeadLetterNew) -> Result<u64, StoreError> {
        let push_key = match (&new.direction, &new.canonical_id) {
            (Direction::Push, Some(cid)) => Some((new.connector.clone(), cid.clone())),
            _ => None,
        };
        if let Some((connector, cid)) = &push_key {
            let existing = self
                .table(PUSH_DEAD_LETTERS)?
                .get((connector.as_str(), cid.as_str()))
                .at(PUSH_DEAD_LETTERS.name, "get")?
                .map(|v| v.value());
            let old = match existing {
                Some(id) => self
                    .table(DEAD_LETTERS)?
                    .get(id)
                    .at(DEAD_LETTERS.name, "get")?
                    .map(|v| decode::<DeadLetter>(DEAD_LETTERS.name, id, v.value()))
                    .transpose()?,
                None => None,
            };
            if let Some(old) = old {
                // The same company refused again: one letter, with the latest reason and
                // record, the first failure time and every attempt counted.
                let letter = DeadLetter {
                    attempts: old.attempts.saturating_add(new.attempts),
                    first_at: old.first_at,
                    ..DeadLetter::from_new(old.id, new)
                };
                let bytes = encode(DEAD_LETTERS.name, &letter)?;
                self.table(DEAD_LETTERS)?
                    .insert(old.id, bytes.as_slice())
                    .at(DEAD_LETTERS.name, "insert")?;
                return Ok(old.id);
            }
        }
        let id = self.next_seq(DEAD_LETTER_SEQ)?;
        if let Some((connector, cid)) = &push_key {
            self.table(PUSH_DEAD_LETTERS)?
                .insert((connector.as_str(), cid.as_str()), id)
                .at(PUSH_DEAD_LETTERS.name, "insert")?;
        }
        let letter = DeadLetter::from_new(id, new);
        let bytes = encode(DEAD_LETTERS.name, &letter)?;
        self.table(DEAD_LETTERS)?
            .insert(id, bytes.as_slice())
            .at(DEAD_LETTERS.name, "insert")?;
        Ok(id)
    }

    /// Removes the push dead letter of company `canonical_id` for `connector`, if any (a
    /// later write of it landed whole); returns whether there was one.
    pub fn remove_push_dead_letter(
        &self,
        connector: &str,
        canonical_id: &str,
    ) -> Result<bool, StoreError> {
        let id = self
            .table(PUSH_DEAD_LETTERS)?
            .get((connector, canonical_id))
            .at(PUSH_DEAD_LETTERS.name, "get")?
            .map(|v| v.value());
        match id {
            Some(id) => Ok(self.remove_dead_letter(id)?.is_some()),
            None => Ok(false),
        }
    }

    /// Removes a dead letter (replayed or discarded by an operator); returns it.
    pub fn remove_dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, StoreError> {
        let letter: Option<DeadLetter> = self
            .table(DEAD_LETTERS)?
            .remove(id)
            .at(DEAD_LETTERS.name, "remove")?
            .map(|v| decode(DEAD_LETTERS.name, id, v.value()))
            .transpose()?;
        if let Some(l) = &letter
            && l.direction == Direction::Push
            && let Some(cid) = &l.canonical_id
        {
            let mut keys = self.table(PUSH_DEAD_LETTERS)?;
            let points_here = keys
                .get((l.connector.as_str(), cid.as_str()))
                .at(PUSH_DEAD_LETTERS.name, "get")?
                .is_some_and(|v| v.value() == id);
            if points_here {
                keys.remove((l.connector.as_str(), cid.as_str()))
                    .at(PUSH_DEAD_LETTERS.name, "remove")?;
                self.table(BLOCKED_CREATES)?
                    .remove((l.connector.as_str(), cid.as_str()))
                    .at(BLOCKED_CREATES.name, "remove")?;
            }
        }
        Ok(letter)
    }

    /// Records that creating `canonical_id` in `connector` landed on another company's
    /// record while the company had match keys `keys` (see [`WriteTx::blocked_create`]).
    pub fn block_create(
        &self,
        connector: &str,
        canonical_id: &str,
        keys: &str,
    ) -> Result<(), StoreError> {
        self.table(BLOCKED_CREATES)?
            .insert((connector, canonical_id), keys)
            .at(BLOCKED_CREATES.name, "insert")?;
        Ok(())
    }

    /// Notes that a create of `canonical_id` with content `hash` is about to be sent to
    /// `target` (commit it with the batch's "sending" marks).
    pub fn note_create_in_flight(
        &self,
        target: &str,
        hash: &str,
        canonical_id: &str,
    ) -> Result<(), StoreError> {
        let mut ids = self.creates_in_flight(target, hash)?;
        if ids.iter().any(|id| id == canonical_id) {
            return Ok(());
        }
        ids.push(canonical_id.to_string());
        self.put_creates_in_flight(target, hash, &ids)
    }

    /// Forgets the create noted by [`note_create_in_flight`](Self::note_create_in_flight)
    /// once its outcome is known.
    pub fn forget_create_in_flight(
        &self,
        target: &str,
        hash: &str,
        canonical_id: &str,
    ) -> Result<(), StoreError> {
        let mut ids = self.creates_in_flight(target, hash)?;
        let before = ids.len();
        ids.retain(|id| id != canonical_id);
        if ids.len() == before {
            return Ok(());
        }
        self.put_creates_in_flight(target, hash, &ids)
    }

    /// Stores the companies of a `(target, hash)` row (removing it when there are none).
    fn put_creates_in_flight(
        &self,
        target: &str,
        hash: &str,
        ids: &[CanonicalId],
    ) -> Result<(), StoreError> {
        let mut t = self.table(CREATES_IN_FLIGHT)?;
        if ids.is_empty() {
            t.remove((target, hash))
                .at(CREATES_IN_FLIGHT.name, "remove")?;
        } else {
            t.insert((target, hash), ids.join("\n").as_str())
                .at(CREATES_IN_FLIGHT.name, "insert")?;
        }
        Ok(())
    }

    /// Records the content hash last pushed to / read from a vendor record.
    pub fn put_ledger(
        &self,
        connector: &str,
        vendor_id: &str,
        entry: &LedgerEntry,
    ) -> Result<(), StoreError> {
        let row = self.record_row(connector, vendor_id)?.unwrap_or_default();
        self.put_record_row(
            connector,
            vendor_id,
            row.canonical_id.as_deref(),
            Some(entry),
        )
    }

    /// [`put_ledger`](Self::put_ledger) for a record the caller just found linked to
    /// `canonical_id` (by [`link_and_ledger`](Self::link_and_ledger) in this
    /// transaction): writes the row without reading it again.
    pub fn put_ledger_linked(
        &self,
        connector: &str,
        vendor_id: &str,
        canonical_id: &str,
        entry: &LedgerEntry,
    ) -> Result<(), StoreError> {
        debug_assert_eq!(
            self.link_of(connector, vendor_id)?.as_deref(),
            Some(canonical_id)
        );
        self.put_record_row(connector, vendor_id, Some(canonical_id), Some(entry))
    }

    /// Stores a connector's OAuth tokens.
    pub fn put_token(&self, connector: &str, token: &TokenRecord) -> Result<(), StoreError> {
        let bytes = encode(TOKENS.name, token)?;
        self.table(TOKENS)?
            .insert(connector, bytes.as_slice())
            .at(TOKENS.name, "insert")?;
        Ok(())
    }

    /// Adds `n` API calls to a connector's count for `day` (`"YYYY-MM-DD"`); returns the
    /// new total.
    pub fn add_quota(&self, connector: &str, day: &str, n: u64) -> Result<u64, StoreError> {
        let mut t = self.table(QUOTA)?;
        let total = t
            .get((connector, day))
            .at(QUOTA.name, "get")?
            .map(|v| v.value())
            .unwrap_or(0)
            .saturating_add(n);
        t.insert((connector, day), total).at(QUOTA.name, "insert")?;
        Ok(total)
    }
}

/// The getters, identical on [`ReadTx`] and [`WriteTx`] (a write transaction reads its
/// own uncommitted writes). A macro rather than a trait so callers need no import.
macro_rules! getters {
    ($tx:ty) => {
        impl $tx {
            /// The canonical company with this id.
            pub fn get_company(&self, id: &str) -> Result<Option<Company>, StoreError> {
                self.table(COMPANIES)?
                    .get(id)
                    .at(COMPANIES.name, "get")?
                    .map(|v| corrupt(COMPANIES.name, id, codec::decode_company(id, v.value())))
                    .transpose()
            }

            /// How many canonical companies there are.
            pub fn company_count(&self) -> Result<u64, StoreError> {
                self.table(COMPANIES)?.len().at(COMPANIES.name, "len")
            }

            /// Up to `limit` companies in id order, starting after id `after` (paging for
            /// backfill, dumps and tests).
            pub fn companies(
                &self,
                after: Option<&str>,
                limit: usize,
            ) -> Result<Vec<Company>, StoreError> {
                let t = self.table(COMPANIES)?;
                let lower = match after {
                    Some(id) => Bound::Excluded(id),
                    None => Bound::Unbounded,
                };
                let range = t
                    .range::<&str>((lower, Bound::Unbounded))
                    .at(COMPANIES.name, "range")?;
                let mut out = Vec::with_capacity(limit.min(1024));
                for item in range.take(limit) {
                    let (k, v) = item.at(COMPANIES.name, "range")?;
                    let id = k.value();
                    out.push(corrupt(
                        COMPANIES.name,
                        id,
                        codec::decode_company(id, v.value()),
                    )?);
                }
                Ok(out)
            }

            /// The company `connector`'s record `vendor_id` is linked to.
            pub fn link_of(
                &self,
                connector: &str,
                vendor_id: &str,
            ) -> Result<Option<CanonicalId>, StoreError> {
                let t = self.table(RECORDS)?;
                let Some(v) = t.get((connector, vendor_id)).at(RECORDS.name, "get")? else {
                    return Ok(None);
                };
                let link = corrupt(
                    RECORDS.name,
                    format_args!("({connector}, {vendor_id})"),
                    codec::record_link(v.value()),
                )?;
                Ok(link.map(str::to_owned))
            }

            /// [`link_of`](Self::link_of) and [`ledger`](Self::ledger) in one look-up
            /// (they share a row).
            pub fn link_and_ledger(
                &self,
                connector: &str,
                vendor_id: &str,
            ) -> Result<(Option<CanonicalId>, Option<LedgerEntry>), StoreError> {
                let row = self.record_row(connector, vendor_id)?.unwrap_or_default();
                Ok((row.canonical_id, row.ledger))
            }

            /// The whole record row of `connector`'s `vendor_id`.
            fn record_row(
                &self,
                connector: &str,
                vendor_id: &str,
            ) -> Result<Option<codec::RecordRow>, StoreError> {
                self.table(RECORDS)?
                    .get((connector, vendor_id))
                    .at(RECORDS.name, "get")?
                    .map(|v| {
                        corrupt(
                            RECORDS.name,
                            format_args!("({connector}, {vendor_id})"),
                            codec::decode_record(v.value()),
                        )
                    })
                    .transpose()
            }

            /// `connector`'s record id for a company.
            pub fn vendor_id_of(
                &self,
                canonical_id: &str,
                connector: &str,
            ) -> Result<Option<String>, StoreError> {
                Ok(self
                    .table(REVERSE_LINKS)?
                    .get((canonical_id, connector))
                    .at(REVERSE_LINKS.name, "get")?
                    .map(|v| v.value().to_owned()))
            }

            /// Every `(connector, vendor_id)` linked to a company, by connector name.
            pub fn links_of(
                &self,
                canonical_id: &str,
            ) -> Result<Vec<(String, String)>, StoreError> {
                let t = self.table(REVERSE_LINKS)?;
                // ("id", "") is the smallest key with this company as its first element.
                let range = t
                    .range((canonical_id, "")..)
                    .at(REVERSE_LINKS.name, "range")?;
                let mut out = Vec::new();
                for item in range {
                    let (k, v) = item.at(REVERSE_LINKS.name, "range")?;
                    let (canonical, connector) = k.value();
                    if canonical != canonical_id {
                        break;
                    }
                    out.push((connector.to_owned(), v.value().to_owned()));
                }
                Ok(out)
            }

            /// The lowest of `connector`'s record ids that are integers (Marketo's), if any.
            /// Reads every record id of the connector: for rare look-ups only.
            pub fn lowest_numeric_vendor_id(
                &self,
                connector: &str,
            ) -> Result<Option<i64>, StoreError> {
                let t = self.table(RECORDS)?;
                let range = t.range((connector, "")..).at(RECORDS.name, "range")?;
                let mut lowest: Option<i64> = None;
                for item in range {
                    let (k, _) = item.at(RECORDS.name, "range")?;
                    let (c, vendor_id) = k.value();
                    if c != connector {
                        break;
                    }
                    if let Ok(id) = vendor_id.parse::<i64>() {
                        lowest = Some(lowest.map_or(id, |l| l.min(id)));
                    }
                }
                Ok(lowest)
            }

            /// The company a match key points at.
            pub fn match_key(&self, key: &str) -> Result<Option<CanonicalId>, StoreError> {
                Ok(self
                    .table(MATCH_KEYS)?
                    .get(key)
                    .at(MATCH_KEYS.name, "get")?
                    .map(|v| v.value().to_owned()))
            }

            /// A connector's stored cursor (`None`: never polled).
            pub fn cursor(&self, connector: &str) -> Result<Option<Cursor>, StoreError> {
                self.table(CURSORS)?
                    .get(connector)
                    .at(CURSORS.name, "get")?
                    .map(|v| decode(CURSORS.name, connector, v.value()))
                    .transpose()
            }

            /// Up to `limit` outbox entries of `target`, oldest first, with their seq.
            pub fn outbox_batch(
                &self,
                target: &str,
                limit: usize,
            ) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
                let t = self.table(OUTBOX)?;
                let range = t
                    .range((target, 0u64)..=(target, u64::MAX))
                    .at(OUTBOX.name, "range")?;
                let mut out = Vec::with_capacity(limit.min(1024));
                for item in range.take(limit) {
                    let (k, v) = item.at(OUTBOX.name, "range")?;
                    let (_, seq) = k.value();
                    let entry = corrupt(
                        OUTBOX.name,
                        format_args!("({target}, {seq})"),
                        codec::decode_outbox(v.value()),
                    )?;
                    out.push((seq, entry));
                }
                Ok(out)
            }

            /// How many entries wait for `target`.
            pub fn outbox_len(&self, target: &str) -> Result<u64, StoreError> {
                self.flush_pending()?;
                Ok(self
                    .table(OUTBOX_COUNTS)?
                    .get(target)
                    .at(OUTBOX_COUNTS.name, "get")?
                    .map(|v| v.value())
                    .unwrap_or(0))
            }

            /// Every target with a non-empty outbox, with its length, by name.
            pub fn outbox_targets(&self) -> Result<Vec<(String, u64)>, StoreError> {
                self.flush_pending()?;
                let t = self.table(OUTBOX_COUNTS)?;
                let mut out = Vec::new();
                for item in t.iter().at(OUTBOX_COUNTS.name, "iter")? {
                    let (k, v) = item.at(OUTBOX_COUNTS.name, "iter")?;
                    out.push((k.value().to_owned(), v.value()));
                }
                Ok(out)
            }

            /// Up to `limit` dead letters, oldest first, skipping the first `offset`.
            pub fn dead_letters(
                &self,
                limit: usize,
                offset: usize,
            ) -> Result<Vec<DeadLetter>, StoreError> {
                let t = self.table(DEAD_LETTERS)?;
                let mut out = Vec::with_capacity(limit.min(1024));
                for item in t
                    .iter()
                    .at(DEAD_LETTERS.name, "iter")?
                    .skip(offset)
                    .take(limit)
                {
                    let (k, v) = item.at(DEAD_LETTERS.name, "iter")?;
                    out.push(decode(DEAD_LETTERS.name, k.value(), v.value())?);
                }
                Ok(out)
            }

            /// One dead letter.
            pub fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, StoreError> {
                self.table(DEAD_LETTERS)?
                    .get(id)
                    .at(DEAD_LETTERS.name, "get")?
                    .map(|v| decode(DEAD_LETTERS.name, id, v.value()))
                    .transpose()
            }

            /// The match keys `canonical_id` had when its create in `connector` landed on
            /// another company's record, if it did (and its dead letter was not retried or
            /// dropped since).
            pub fn blocked_create(
                &self,
                connector: &str,
                canonical_id: &str,
            ) -> Result<Option<String>, StoreError> {
                Ok(self
                    .table(BLOCKED_CREATES)?
                    .get((connector, canonical_id))
                    .at(BLOCKED_CREATES.name, "get")?
                    .map(|v| v.value().to_string()))
            }

            /// The companies whose create with content `hash` was sent to `target`
            /// without a recorded outcome (see [`WriteTx::note_create_in_flight`]).
            pub fn creates_in_flight(
                &self,
                target: &str,
                hash: &str,
            ) -> Result<Vec<CanonicalId>, StoreError> {
                Ok(self
                    .table(CREATES_IN_FLIGHT)?
                    .get((target, hash))
                    .at(CREATES_IN_FLIGHT.name, "get")?
                    .map(|v| v.value().lines().map(str::to_string).collect())
                    .unwrap_or_default())
            }

            /// Of [`creates_in_flight`](Self::creates_in_flight), the first company that
            /// still exists and has no record of `target`: the one a first-seen record of
            /// `target` with content `hash` was made for.
            pub fn unlinked_create_in_flight(
                &self,
                target: &str,
                hash: &str,
            ) -> Result<Option<CanonicalId>, StoreError> {
                for cid in self.creates_in_flight(target, hash)? {
                    if self.vendor_id_of(&cid, target)?.is_none()
                        && self.get_company(&cid)?.is_some()
                    {
                        return Ok(Some(cid));
                    }
                }
                Ok(None)
            }

            /// How many dead letters there are.
            pub fn dead_letter_count(&self) -> Result<u64, StoreError> {
                self.table(DEAD_LETTERS)?.len().at(DEAD_LETTERS.name, "len")
            }

            /// The content hash last pushed to / read from a vendor record.
            pub fn ledger(
                &self,
                connector: &str,
                vendor_id: &str,
            ) -> Result<Option<LedgerEntry>, StoreError> {
                Ok(self
                    .record_row(connector, vendor_id)?
                    .and_then(|row| row.ledger))
            }

            /// A connector's stored OAuth tokens.
            pub fn token(&self, connector: &str) -> Result<Option<TokenRecord>, StoreError> {
                self.table(TOKENS)?
                    .get(connector)
                    .at(TOKENS.name, "get")?
                    .map(|v| decode(TOKENS.name, connector, v.value()))
                    .transpose()
            }

            /// API calls a connector made on `day` (`"YYYY-MM-DD"`).
            pub fn quota_used(&self, connector: &str, day: &str) -> Result<u64, StoreError> {
                Ok(self
                    .table(QUOTA)?
                    .get((connector, day))
                    .at(QUOTA.name, "get")?
                    .map(|v| v.value())
                    .unwrap_or(0))
            }
        }
    };
}

impl ReadTx {
    /// Nothing to write: a read transaction keeps no counters in memory. (The getters
    /// that read counters call this on both transaction kinds.)
    fn flush_pending(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

getters!(ReadTx);
getters!(WriteTx);

/// A company in the store's encoding, made ahead of the write transaction that stores it
/// ([`WriteTx::put_encoded_company`]).
pub struct EncodedCompany(Vec<u8>);

impl EncodedCompany {
    /// Encodes `company`.
    pub fn new(company: &Company) -> Self {
        EncodedCompany(codec::encode_company(company))
    }
}
