//! A company edited in two CRMs close together: each CRM's change must survive, whatever
//! the order in which the engine reads the records and writes them back. Two connectors:
//! "a" (Rally's mapping) and "b" (Marketo's), fed pages directly, with "b" a fake that
//! records what is written to it and what it is asked to read first.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use serde_json::{Value as Json, json};
use tokio_util::sync::CancellationToken;

use super::{Endpoint, Engine, EngineSettings, MatchKeyKind};
use crate::connector::{
    Connector, ConnectorError, Cursor, Page, PollMode, PreWriteRead, PushItem, PushOutcome,
    VendorRecord,
};
use crate::daemon::metrics::Metrics;
use crate::mapping::{Mapping, MappingRules};
use crate::model::{CrmKind, Value};
use crate::store::Store;

/// A CRM that stores what is pushed to it (ids `b1`, `b2`, …) and whose records can be
/// edited behind the engine's back.
struct FakeCrm {
    name: String,
    how: PreWriteRead,
    /// The records as the CRM holds them, by id.
    records: Mutex<BTreeMap<String, VendorRecord>>,
    /// Ids changed behind the engine's back since its last poll.
    changed: Mutex<Vec<String>>,
    polls: AtomicUsize,
    read_ids: Mutex<Vec<Vec<String>>>,
    pushes: Mutex<Vec<PushItem>>,
    /// Holds one record per website: a create with a website already held writes onto
    /// that record (as Rally's upsert by domain does).
    one_per_website: bool,
    /// Declares its updates partial (it always stores only the fields sent).
    partial: bool,
    /// Once set, a push stores its records, notifies this, and never answers (the
    /// process dies before the outcome is stored).
    dies_after_storing: Option<Arc<tokio::sync::Notify>>,
    /// Once armed, the next push waits for the test's go, stores its records (noted as
    /// changed, for the next poll) and never answers: a write whose outcome the engine
    /// has not recorded yet.
    held: Mutex<Option<HeldPush>>,
}

/// The steps of a held push (see [`FakeCrm::held`]).
#[derive(Clone, Default)]
struct HeldPush {
    /// Notified when the push arrives (its batch is planned).
    arrived: Arc<tokio::sync::Notify>,
    /// The test lets it store its records.
    go: Arc<tokio::sync::Notify>,
    /// Notified once they are stored.
    stored: Arc<tokio::sync::Notify>,
}

impl FakeCrm {
    fn new(name: &str, how: PreWriteRead) -> Self {
        FakeCrm {
            name: name.into(),
            how,
            records: Mutex::default(),
            changed: Mutex::default(),
            polls: AtomicUsize::new(0),
            read_ids: Mutex::default(),
            pushes: Mutex::default(),
            one_per_website: false,
            partial: false,
            dies_after_storing: None,
            held: Mutex::default(),
        }
    }

    /// A user edits record `id` at vendor second `at`.
    fn edit(&self, id: &str, patch: Json, at: i64) {
        let mut records = self.records.lock().unwrap();
        let r = records.get_mut(id).expect("record exists");
        for (k, v) in patch.as_object().unwrap() {
            r.fields.insert(k.clone(), v.clone());
        }
        r.updated_at = ts(at);
        self.changed.lock().unwrap().push(id.to_string());
    }

    fn record(&self, id: &str) -> VendorRecord {
        self.records.lock().unwrap()[id].clone()
    }
}

#[async_trait]
impl Connector for FakeCrm {
    fn name(&self) -> &str {
        &self.name
    }
    async fn start(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn poll(&self, _: &Cursor, _: &PollMode) -> Result<Page, ConnectorError> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        let ids = std::mem::take(&mut *self.changed.lock().unwrap());
        let records = ids.iter().map(|id| self.record(id)).collect();
        Ok(Page {
            records,
            next: Cursor(json!(self.polls.load(Ordering::SeqCst))),
            ..Default::default()
        })
    }
    fn pre_write_read(&self) -> PreWriteRead {
        self.how
    }
    async fn read_by_ids(&self, ids: &[String]) -> Result<Page, ConnectorError> {
        self.read_ids.lock().unwrap().push(ids.to_vec());
        Ok(Page {
            records: ids.iter().map(|id| self.record(id)).collect(),
            ..Default::default()
        })
    }
    fn updates_are_partial(&self) -> bool {
        self.partial
    }
    fn max_batch(&self) -> usize {
        100
    }
    async fn push(&self, items: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        let held = self.held.lock().unwrap().take();
        if let Some(h) = held {
            h.arrived.notify_one();
            h.go.notified().await;
            for out in self.store_pushed(items) {
                if let PushOutcome::Written { vendor_id, .. } = out {
                    self.changed.lock().unwrap().push(vendor_id);
                }
            }
            h.stored.notify_one();
            std::future::pending::<()>().await;
        }
        let out = self.store_pushed(items);
        if let Some(stored) = &self.dies_after_storing {
            stored.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(out)
    }
}

impl FakeCrm {
    /// Stores what `items` write, as the CRM would, and says what became of each.
    fn store_pushed(&self, items: &[PushItem]) -> Vec<PushOutcome> {
        let mut records = self.records.lock().unwrap();
        let mut out = Vec::new();
        for it in items {
            self.pushes.lock().unwrap().push(it.clone());
            let created = it.vendor_id.is_none();
            let same_site = || {
                records
                    .values()
                    .find(|r| {
                        self.one_per_website && r.fields.get("website") == it.fields.get("website")
                    })
                    .map(|r| r.vendor_id.clone())
            };
            let id = it
                .vendor_id
                .clone()
                .or_else(same_site)
                .unwrap_or_else(|| format!("b{}", records.len() + 1));
            let rec = records.entry(id.clone()).or_insert_with(|| VendorRecord {
                vendor_id: id.clone(),
                updated_at: ts(0),
                fields: Default::default(),
                deleted: false,
            });
            for (k, v) in &it.fields {
                rec.fields.insert(k.clone(), v.clone());
            }
            // Our write stamps the record "now": later than any edit of these tests.
            rec.updated_at = ts(10_000);
            out.push(PushOutcome::Written {
                vendor_id: id,
                created,
            });
        }
        out
    }
}

/// Connector "a" is never called: its pages are fed to the engine.
struct FedOnly;

#[async_trait]
impl Connector for FedOnly {
    fn name(&self) -> &str {
        "a"
    }
    async fn start(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn poll(&self, _: &Cursor, _: &PollMode) -> Result<Page, ConnectorError> {
        Ok(Page::default())
    }
    fn max_batch(&self) -> usize {
        100
    }
    async fn push(&self, _: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        unreachable!("nothing is pushed to a here")
    }
}

fn ts(s: i64) -> chrono::DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
}

fn engine(dir: &tempfile::TempDir, b: Arc<FakeCrm>) -> Arc<Engine> {
    let store = Arc::new(Store::open(&dir.path().join("race.redb")).unwrap());
    let endpoint = |name: &str, kind, connector: Arc<dyn Connector>| {
        Endpoint::new(
            name,
            connector,
            Mapping::compile(kind, &MappingRules::default()).unwrap(),
            std::time::Duration::from_secs(60),
        )
    };
    let endpoints = vec![
        endpoint("a", CrmKind::Rally, Arc::new(FedOnly)),
        endpoint("b", CrmKind::Marketo, b),
    ];
    let settings = EngineSettings {
        targets: [
            ("a".into(), vec!["b".into()]),
            ("b".into(), vec!["a".into()]),
        ]
        .into(),
        match_keys: vec![MatchKeyKind::Domain],
        ..Default::default()
    };
    Arc::new(Engine::new(
        store,
        endpoints,
        settings,
        Arc::new(Metrics::new()),
    ))
}

/// Rally's record `a1` of acme.example at vendor second `at`.
fn rally(name: &str, phone: &str, at: i64) -> Page {
    let fields = json!({"name": name, "domain": "acme.example", "phone": phone});
    Page {
        records: vec![vendor_record("a1", at, fields)],
        next: Cursor(json!(at)),
        ..Default::default()
    }
}

/// What "b" changed since its last poll, read and stored as the poll loop would.
async fn read_b(e: &Engine, b: &FakeCrm) -> super::IngestStats {
    let page = b
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    e.ingest_page("b", &page, "b").unwrap()
}

/// A record `id` of any CRM at vendor second `at`.
fn vendor_record(id: &str, at: i64, fields: Json) -> VendorRecord {
    VendorRecord {
        vendor_id: id.into(),
        updated_at: ts(at),
        fields: fields.as_object().unwrap().clone(),
        deleted: false,
    }
}

/// The one company's name and phone.
fn company(e: &Engine) -> (Option<Value>, Option<Value>) {
    let tx = e.store().begin_read().unwrap();
    let cid = tx.link_of("a", "a1").unwrap().expect("a1 linked");
    let c = tx.get_company(&cid).unwrap().unwrap();
    (c.get("name").cloned(), c.get("phone").cloned())
}

fn text(s: &str) -> Option<Value> {
    Some(Value::Text(s.into()))
}

/// Company acme.example created in "a" and written to "b" as `b1`.
async fn synced(b: &Arc<FakeCrm>, dir: &tempfile::TempDir) -> Arc<Engine> {
    let e = engine(dir, b.clone());
    e.ingest_page("a", &rally("Acme", "+1 555 0100", 100), "a")
        .unwrap();
    let sd = CancellationToken::new();
    let s = e.drain_all("b", &sd).await.unwrap();
    assert_eq!((s.written, s.created), (1, 1));
    assert_eq!(b.record("b1").fields["company"], json!("Acme"));
    e
}

#[tokio::test]
async fn a_newer_record_does_not_undo_a_change_to_a_field_it_did_not_change() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FakeCrm::new("b", PreWriteRead::Nothing));
    let e = synced(&b, &dir).await;
    // "a" renames the company; before that reaches "b", a user of "b" changes its phone.
    e.ingest_page("a", &rally("Acme Renamed", "+1 555 0100", 200), "a")
        .unwrap();
    b.edit("b1", json!({"mainPhone": "+1 555 0199"}), 300);
    // "b" is read first: its record is newer than the rename, but it still holds the old
    // name only because the rename has not reached it — that must not win.
    let stats = read_b(&e, &b).await;
    assert_eq!(stats.merged, 1);
    assert_eq!(
        company(&e),
        (text("Acme Renamed"), text("+1 555 0199")),
        "each CRM's change survives"
    );
    // Both travel on: the phone to "a", the name to "b".
    let sd = CancellationToken::new();
    e.drain_all("b", &sd).await.unwrap();
    let rec = b.record("b1");
    assert_eq!(rec.fields["company"], json!("Acme Renamed"));
    assert_eq!(rec.fields["mainPhone"], json!("+1 555 0199"));
    let tx = e.store().begin_read().unwrap();
    assert_eq!(tx.outbox_len("a").unwrap(), 1, "the phone goes to a");
}

#[tokio::test]
async fn a_record_read_before_its_first_write_keeps_its_untouched_fields_out_too() {
    // The base is what was read, not only what was written.
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FakeCrm::new("b", PreWriteRead::Nothing));
    let e = engine(&dir, b.clone());
    let b_rec = |name: &str, phone: &str, at: i64| Page {
        records: vec![vendor_record(
            "m7",
            at,
            json!({"company": name, "website": "https://acme.example", "mainPhone": phone}),
        )],
        ..Default::default()
    };
    e.ingest_page("a", &rally("Acme", "+1 555 0100", 100), "a")
        .unwrap();
    e.ingest_page("b", &b_rec("Acme", "+1 555 0100", 100), "b")
        .unwrap();
    e.ingest_page("a", &rally("Acme Renamed", "+1 555 0100", 200), "a")
        .unwrap();
    e.ingest_page("b", &b_rec("Acme", "+1 555 0199", 300), "b")
        .unwrap();
    assert_eq!(company(&e), (text("Acme Renamed"), text("+1 555 0199")));
    // "b" still holds the old name: it is queued to get the new one.
    let tx = e.store().begin_read().unwrap();
    assert_eq!(tx.outbox_len("b").unwrap(), 1);
}

#[tokio::test]
async fn a_field_the_record_did_change_still_follows_the_newest_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FakeCrm::new("b", PreWriteRead::Nothing));
    let e = synced(&b, &dir).await;
    e.ingest_page("a", &rally("Acme A", "+1 555 0100", 200), "a")
        .unwrap();
    // Both renamed it; "b" did so later: its name wins.
    b.edit("b1", json!({"company": "Acme B"}), 300);
    read_b(&e, &b).await;
    assert_eq!(company(&e).0, text("Acme B"));
}

/// "a" renames the company while a user of "b" has just changed its phone, unseen: the
/// daemon's drain reads "b" before writing, so the write carries both.
async fn push_after_unseen_edit(how: PreWriteRead) -> Arc<FakeCrm> {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FakeCrm::new("b", how));
    let e = synced(&b, &dir).await;
    e.ingest_page("a", &rally("Acme Renamed", "+1 555 0100", 200), "a")
        .unwrap();
    b.edit("b1", json!({"mainPhone": "+1 555 0199"}), 300);
    let sd = CancellationToken::new();
    let s = e.drain_fresh("b", &sd).await.unwrap();
    assert_eq!(s.written, 1);
    let rec = b.record("b1");
    assert_eq!(rec.fields["company"], json!("Acme Renamed"));
    assert_eq!(
        rec.fields["mainPhone"],
        json!("+1 555 0199"),
        "the write overwrote an edit made in the target since its last poll"
    );
    assert_eq!(company(&e), (text("Acme Renamed"), text("+1 555 0199")));
    b
}

#[tokio::test]
async fn the_daemon_polls_the_target_before_overwriting_its_records() {
    let b = push_after_unseen_edit(PreWriteRead::Poll).await;
    assert_eq!(b.polls.load(Ordering::SeqCst), 1);
    assert!(b.read_ids.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_target_without_a_cheap_poll_has_the_batch_read_by_id() {
    let b = push_after_unseen_edit(PreWriteRead::ById).await;
    assert_eq!(*b.read_ids.lock().unwrap(), vec![vec!["b1".to_string()]]);
    assert_eq!(b.polls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn creates_are_written_without_reading_the_target_first() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FakeCrm::new("b", PreWriteRead::Poll));
    let e = engine(&dir, b.clone());
    e.ingest_page("a", &rally("Acme", "+1 555 0100", 100), "a")
        .unwrap();
    let sd = CancellationToken::new();
    let s = e.drain_fresh("b", &sd).await.unwrap();
    assert_eq!(s.created, 1);
    assert_eq!(
        b.polls.load(Ordering::SeqCst),
        0,
        "nothing there to overwrite"
    );
}

#[tokio::test]
async fn a_value_another_company_left_in_a_shared_record_is_not_pushed_over_and_over() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FakeCrm {
        one_per_website: true,
        ..FakeCrm::new("b", PreWriteRead::Nothing)
    });
    let e = engine(&dir, b.clone());
    let rec = |id: &str, name: &str, city: Option<&str>| {
        vendor_record(
            id,
            100,
            json!({"name": name, "domain": "acme.example", "website": "https://acme.example",
                       "city": city}),
        )
    };
    // Two companies of "a" with one website; "b" keeps one record for both.
    let page = Page {
        records: vec![rec("a1", "Acme", None), rec("a2", "Acme Two", Some("Oslo"))],
        ..Default::default()
    };
    e.ingest_page("a", &page, "a").unwrap();
    let sd = CancellationToken::new();
    let s = e.drain_all("b", &sd).await.unwrap();
    assert_eq!((s.written, s.rejected), (2, 1), "{s:?}");
    // b1 holds a1's company: the write that gave it back cleared the city a2's write
    // left in it (a1's company has none), so it does not stay there under a1's name.
    assert_eq!(b.record("b1").fields["billingCity"], Json::Null);
    // A user edits b1's phone: read back, nothing else is new: nothing is queued for "b".
    b.edit("b1", json!({"mainPhone": "+1 555 0199"}), 300);
    read_b(&e, &b).await;
    let tx = e.store().begin_read().unwrap();
    assert_eq!(
        tx.outbox_len("b").unwrap(),
        0,
        "b1 would be written again and again"
    );
    assert_eq!(tx.outbox_len("a").unwrap(), 1, "the phone goes to a");
}

#[tokio::test]
async fn a_field_a_create_left_empty_is_known_empty_when_the_record_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FakeCrm::new("b", PreWriteRead::Nothing));
    // Created in "b" without a city (the company had none).
    let e = synced(&b, &dir).await;
    // "a" sets the city; before it reaches "b", a user of "b" renames the company, and
    // "b" answers its empty city as an explicit null.
    let mut page = rally("Acme", "+1 555 0100", 200);
    page.records[0].fields.insert("city".into(), json!("York"));
    e.ingest_page("a", &page, "a").unwrap();
    b.edit("b1", json!({"company": "Acme B", "billingCity": null}), 300);
    read_b(&e, &b).await;
    let tx = e.store().begin_read().unwrap();
    let cid = tx.link_of("a", "a1").unwrap().unwrap();
    let c = tx.get_company(&cid).unwrap().unwrap();
    assert_eq!(c.get("name"), text("Acme B").as_ref());
    assert_eq!(
        c.get("city"),
        text("York").as_ref(),
        "the empty city of b undid a's"
    );
}

#[tokio::test]
async fn an_unchanged_record_completes_a_base_that_lacks_prints() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FakeCrm::new("b", PreWriteRead::Nothing));
    let e = synced(&b, &dir).await;
    // As a store written before prints existed: the ledger entry has none.
    let tx = e.store().begin_write().unwrap();
    let mut entry = tx.ledger("b", "b1").unwrap().unwrap();
    entry.prints = None;
    tx.put_ledger("b", "b1", &entry).unwrap();
    tx.commit().unwrap();
    // Our own write read back: unchanged, and now a base.
    b.changed.lock().unwrap().push("b1".into());
    let stats = read_b(&e, &b).await;
    assert_eq!(stats.unchanged, 1);
    let tx = e.store().begin_read().unwrap();
    let entry = tx.ledger("b", "b1").unwrap().unwrap();
    assert!(entry.prints.is_some(), "{entry:?}");
}

#[tokio::test]
async fn a_record_matched_for_the_first_time_does_not_erase_what_it_never_held() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FakeCrm::new("b", PreWriteRead::Nothing));
    let e = engine(&dir, b.clone());
    let mut page = rally("Acme", "+1 555 0100", 100);
    page.records[0]
        .fields
        .insert("industry".into(), json!("Software"));
    e.ingest_page("a", &page, "a").unwrap();
    // The same company, already in "b" without an industry (an explicit null), edited
    // there later.
    let b_page = Page {
        records: vec![vendor_record(
            "m9",
            200,
            json!({"company": "Acme", "website": "https://acme.example",
                           "industry": null, "mainPhone": "+1 555 0100"}),
        )],
        ..Default::default()
    };
    e.ingest_page("b", &b_page, "b").unwrap();
    let tx = e.store().begin_read().unwrap();
    let cid = tx.link_of("b", "m9").unwrap().expect("matched by domain");
    assert_eq!(tx.link_of("a", "a1").unwrap(), Some(cid.clone()));
    let c = tx.get_company(&cid).unwrap().unwrap();
    assert_eq!(c.get("industry"), text("Software").as_ref());
    assert_eq!(tx.outbox_len("b").unwrap(), 1, "b gets the industry");
}

/// A Marketo record crmbridge created, carrying its company's canonical id as
/// `externalCompanyId`, read before the push's outcome was stored (a crash in between),
/// in a page of `filler` other new records (a large page takes the snapshot path).
fn created_before_its_link_was_stored(filler: usize) {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FakeCrm::new("b", PreWriteRead::Nothing));
    let e = engine(&dir, b);
    let page = Page {
        records: vec![vendor_record("a1", 100, json!({"name": "No Domain Ltd"}))],
        ..Default::default()
    };
    e.ingest_page("a", &page, "a").unwrap();
    let cid = e
        .store()
        .begin_read()
        .unwrap()
        .link_of("a", "a1")
        .unwrap()
        .unwrap();
    let mut records: Vec<VendorRecord> = (0..filler)
        .map(|i| {
            let site = format!("https://f{i}.example");
            vendor_record(
                &format!("f{i}"),
                100,
                json!({"company": format!("Filler {i}"), "website": site}),
            )
        })
        .collect();
    records.push(vendor_record(
        "m1",
        101,
        json!({"company": "No Domain Ltd", "externalCompanyId": cid}),
    ));
    let stats = e
        .ingest_page(
            "b",
            &Page {
                records,
                ..Default::default()
            },
            "b",
        )
        .unwrap();
    assert_eq!(stats.created, filler, "the record made a second company");
    let tx = e.store().begin_read().unwrap();
    assert_eq!(tx.link_of("b", "m1").unwrap(), Some(cid));
}

#[test]
fn a_record_naming_its_company_by_canonical_id_is_that_company() {
    created_before_its_link_was_stored(0);
}

#[test]
fn a_record_naming_its_company_by_canonical_id_is_that_company_in_a_large_page() {
    created_before_its_link_was_stored(40);
}

#[tokio::test]
async fn a_poll_asked_for_while_another_cycle_ran_is_not_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FakeCrm::new("b", PreWriteRead::Poll));
    let e = engine(&dir, b.clone());
    let sd = CancellationToken::new();
    let asked = std::time::Instant::now();
    // Another task's cycle (a drain's read before a write) begins after `asked`…
    assert!(e.poll_incremental("b", None, &sd).await.unwrap().is_some());
    // …so the poll loop, which asked at `asked`, has nothing to read that it did not.
    assert!(
        e.poll_incremental("b", Some(asked), &sd)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(b.polls.load(Ordering::SeqCst), 1);
    // Asked after that cycle began: it runs.
    let later = std::time::Instant::now();
    assert!(
        e.poll_incremental("b", Some(later), &sd)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(b.polls.load(Ordering::SeqCst), 2);
}

/// "a" renames the company; a user of "b" has just changed its phone, and the write goes
/// out before "b" is read again (a backfill's drain reads nothing first; the daemon's
/// leaves a window between its read and the write).
async fn write_over_unseen_edit(partial: bool) -> (Arc<FakeCrm>, Arc<Engine>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FakeCrm {
        partial,
        ..FakeCrm::new("b", PreWriteRead::Nothing)
    });
    let e = synced(&b, &dir).await;
    e.ingest_page("a", &rally("Acme Renamed", "+1 555 0100", 200), "a")
        .unwrap();
    b.edit("b1", json!({"mainPhone": "+1 555 0199"}), 300);
    let sd = CancellationToken::new();
    let s = e.drain_all("b", &sd).await.unwrap();
    assert_eq!(s.written, 1);
    assert_eq!(b.record("b1").fields["company"], json!("Acme Renamed"));
    (b, e, dir)
}

#[tokio::test]
async fn a_partial_update_leaves_out_what_the_record_holds_so_an_unseen_edit_survives() {
    let (b, e, _dir) = write_over_unseen_edit(true).await;
    let sent = b.pushes.lock().unwrap().last().unwrap().fields.clone();
    assert!(sent.contains_key("company"), "{sent:?}");
    assert!(
        !sent.contains_key("mainPhone"),
        "only the changed field is sent: {sent:?}"
    );
    assert_eq!(
        b.record("b1").fields["mainPhone"],
        json!("+1 555 0199"),
        "the edit made in b since its last read survives"
    );
    // Read next, the phone travels on to "a".
    read_b(&e, &b).await;
    assert_eq!(company(&e), (text("Acme Renamed"), text("+1 555 0199")));
    let tx = e.store().begin_read().unwrap();
    assert_eq!(tx.outbox_len("a").unwrap(), 1, "the phone goes to a");
    assert_eq!(tx.outbox_len("b").unwrap(), 0);
}

#[tokio::test]
async fn a_crm_whose_updates_may_replace_gets_every_field() {
    // What an unknown update semantics costs (Rally): the unseen edit is overwritten
    // unless the read before the write catches it.
    let (b, _e, _dir) = write_over_unseen_edit(false).await;
    let sent = b.pushes.lock().unwrap().last().unwrap().fields.clone();
    assert!(sent.contains_key("mainPhone"), "{sent:?}");
    assert_eq!(b.record("b1").fields["mainPhone"], json!("+1 555 0100"));
}

#[tokio::test]
async fn a_change_the_record_already_holds_in_full_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FakeCrm {
        one_per_website: true,
        partial: true,
        ..FakeCrm::new("b", PreWriteRead::Nothing)
    });
    let e = engine(&dir, b.clone());
    let rec = |id: &str, name: &str, city: Option<&str>, notes: &str| {
        vendor_record(
            id,
            100,
            json!({"name": name, "domain": "acme.example", "website": "https://acme.example",
                       "city": city, "notes": notes}),
        )
    };
    // Two companies of "a" with one website: "b" keeps one record for both, b1, which
    // holds a1's company and the city a2's write left in it.
    let page = Page {
        records: vec![
            rec("a1", "Acme", None, "n1"),
            rec("a2", "Acme Two", Some("Oslo"), "n1"),
        ],
        ..Default::default()
    };
    e.ingest_page("a", &page, "a").unwrap();
    let sd = CancellationToken::new();
    e.drain_all("b", &sd).await.unwrap();
    b.edit("b1", json!({"mainPhone": "+1 555 0199"}), 300);
    read_b(&e, &b).await;
    let pushes = b.pushes.lock().unwrap().len();
    // a1 changes a field "b" does not map: b1 differs from a1's company only in the city,
    // which a write would leave alone — no call.
    let page = Page {
        records: vec![rec("a1", "Acme", None, "n2")],
        ..Default::default()
    };
    e.ingest_page("a", &page, "a").unwrap();
    let tx = e.store().begin_read().unwrap();
    assert_eq!(tx.outbox_len("b").unwrap(), 1, "queued for b");
    drop(tx);
    let dry = e.dry_run_counts("b").unwrap();
    assert_eq!((dry.unchanged, dry.would_update), (1, 0), "{dry:?}");
    let s = e.drain_all("b", &sd).await.unwrap();
    assert_eq!((s.written, s.skipped), (0, 1), "{s:?}");
    assert_eq!(b.pushes.lock().unwrap().len(), pushes, "nothing sent");
}

/// The process dies after a create reached "b" and before its outcome was stored; "b" is
/// read before the create is replayed. The record it made has no domain, so no key can
/// match it: it is recognised by its content as our create, not made a second company
/// (which would then be created again in every other CRM).
#[tokio::test]
async fn a_create_whose_outcome_was_lost_is_recognised_when_read_back() {
    // Read alone (looked up in the write transaction) and among 40 other records (looked
    // up ahead on the page's snapshot).
    for others in [0, 40] {
        a_lost_create_read_back_among(others).await;
    }
}

/// An engine syncing "a" and "b" (both with Rally's mapping, matching by domain) whose
/// pushes to "b" die once stored; the `Notify` tells when they are.
fn dying_pushes(dir: &tempfile::TempDir) -> (Arc<Engine>, Arc<FakeCrm>, Arc<tokio::sync::Notify>) {
    let stored = Arc::new(tokio::sync::Notify::new());
    let b = Arc::new(FakeCrm {
        dies_after_storing: Some(stored.clone()),
        ..FakeCrm::new("b", PreWriteRead::Nothing)
    });
    let e = rally_pair(dir, b.clone(), &[("a", "b"), ("b", "a")]);
    (e, b, stored)
}

/// An engine over "a" (fed pages) and `b`, both with Rally's mapping, matching by domain,
/// with `flows` as (source, target) pairs.
fn rally_pair(
    dir: &tempfile::TempDir,
    b: Arc<dyn Connector>,
    flows: &[(&str, &str)],
) -> Arc<Engine> {
    let store = Arc::new(Store::open(&dir.path().join("pair.redb")).unwrap());
    let endpoint = |name: &str, connector: Arc<dyn Connector>| {
        Endpoint::new(
            name,
            connector,
            Mapping::compile(CrmKind::Rally, &MappingRules::default()).unwrap(),
            std::time::Duration::from_secs(60),
        )
    };
    let mut targets: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (source, target) in flows {
        targets
            .entry(source.to_string())
            .or_default()
            .push(target.to_string());
    }
    Arc::new(Engine::new(
        store,
        vec![endpoint("a", Arc::new(FedOnly)), endpoint("b", b)],
        EngineSettings {
            targets,
            match_keys: vec![MatchKeyKind::Domain],
            ..Default::default()
        },
        Arc::new(Metrics::new()),
    ))
}

/// Ingests `records` from "a", then pushes them to "b" until the process "dies".
async fn pushed_and_died(
    e: &Arc<Engine>,
    stored: &tokio::sync::Notify,
    records: Vec<VendorRecord>,
) {
    let page = Page {
        records,
        next: Cursor(json!(1)),
        ..Default::default()
    };
    e.ingest_page("a", &page, "a").unwrap();
    let drain = tokio::spawn({
        let e = e.clone();
        async move { e.drain_batch("b").await }
    });
    stored.notified().await;
    drain.abort();
    let _ = drain.await;
}

async fn a_lost_create_read_back_among(others: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (e, b, stored) = dying_pushes(&dir);
    let a1 = vendor_record("a1", 100, json!({"name": "Nameless Ltd", "city": "Leeds"}));
    pushed_and_died(&e, &stored, vec![a1]).await;

    // "b" is read: the record our create made, unlinked, after `others` of its own.
    let mut records: Vec<VendorRecord> = (0..others)
        .map(|i| {
            let fields = json!({"name": format!("B {i}"), "domain": format!("b{i}.example")});
            vendor_record(&format!("own{i}"), 50, fields)
        })
        .collect();
    records.push(b.record("b1"));
    let page = Page {
        records,
        next: Cursor(json!(2)),
        ..Default::default()
    };
    let stats = e.ingest_page("b", &page, "b").unwrap();
    assert_eq!(stats.created, others, "{stats:?}");
    let tx = e.store().begin_read().unwrap();
    assert_eq!(tx.company_count().unwrap(), 1 + others as u64);
    assert_eq!(
        tx.link_of("b", "b1").unwrap(),
        tx.link_of("a", "a1").unwrap()
    );
}

/// Two companies share a domain (two records of "a"; the key names the first), and the
/// creates of both die unconfirmed. Read back second first, the second's record must not
/// go to the first company by the key: its content says whose it is.
#[tokio::test]
async fn a_lost_create_is_linked_by_its_content_before_any_key() {
    let dir = tempfile::tempdir().unwrap();
    let (e, b, stored) = dying_pushes(&dir);
    let shared = |id: &str, name: &str| {
        vendor_record(id, 100, json!({"name": name, "domain": "shared.example"}))
    };
    pushed_and_died(
        &e,
        &stored,
        vec![shared("a1", "First Ltd"), shared("a2", "Second Ltd")],
    )
    .await;
    let (first, second) = (b.record("b1"), b.record("b2"));
    assert_eq!(second.fields["name"], json!("Second Ltd"));
    let page = Page {
        records: vec![second, first],
        next: Cursor(json!(2)),
        ..Default::default()
    };
    e.ingest_page("b", &page, "b").unwrap();
    let tx = e.store().begin_read().unwrap();
    assert_eq!(tx.company_count().unwrap(), 2);
    assert_eq!(
        tx.link_of("b", "b1").unwrap(),
        tx.link_of("a", "a1").unwrap()
    );
    assert_eq!(
        tx.link_of("b", "b2").unwrap(),
        tx.link_of("a", "a2").unwrap()
    );
}

/// A CRM whose first push leaves its creates unconfirmed (a lost answer), whose replays
/// then "find" record `b1` (another company's, of the same name), and which otherwise
/// creates `b2`, `b3`, ….
#[derive(Default)]
struct TwinGuesser {
    calls: AtomicUsize,
    created: AtomicUsize,
}

#[async_trait]
impl Connector for TwinGuesser {
    fn name(&self) -> &str {
        "b"
    }
    async fn start(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn poll(&self, _: &Cursor, _: &PollMode) -> Result<Page, ConnectorError> {
        Ok(Page::default())
    }
    fn pre_write_read(&self) -> PreWriteRead {
        PreWriteRead::Nothing
    }
    fn max_batch(&self) -> usize {
        100
    }
    async fn push(&self, items: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        let first = self.calls.fetch_add(1, Ordering::SeqCst) == 0;
        Ok(items
            .iter()
            .map(|it| match (&it.vendor_id, it.unconfirmed_since) {
                (Some(id), _) => PushOutcome::Written {
                    vendor_id: id.clone(),
                    created: false,
                },
                (None, _) if first => PushOutcome::Unconfirmed {
                    reason: "answer lost".into(),
                },
                (None, Some(_)) => PushOutcome::Written {
                    vendor_id: "b1".into(),
                    created: true,
                },
                (None, None) => PushOutcome::Written {
                    vendor_id: format!("b{}", self.created.fetch_add(1, Ordering::SeqCst) + 2),
                    created: true,
                },
            })
            .collect())
    }
}

/// A replayed create whose look-up took another company's record (names repeat) is
/// created afresh, not dead-lettered: had it landed, the reads since would have linked
/// it by its content.
#[tokio::test]
async fn a_replay_that_finds_another_companys_record_creates_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let e = rally_pair(&dir, Arc::new(TwinGuesser::default()), &[("a", "b")]);
    let page = |id: &str, city: &str| Page {
        records: vec![vendor_record(
            id,
            100,
            json!({"name": "Same Ltd", "city": city}),
        )],
        next: Cursor(json!(1)),
        ..Default::default()
    };
    // "b" holds another company of that name; "a" has its own, new to "b".
    e.ingest_page("b", &page("b1", "Paris"), "b").unwrap();
    e.ingest_page("a", &page("a1", "Leeds"), "a").unwrap();
    let sd = CancellationToken::new();
    for _ in 0..3 {
        e.drain_all("b", &sd).await.unwrap();
    }
    let tx = e.store().begin_read().unwrap();
    assert_eq!(tx.dead_letter_count().unwrap(), 0);
    let ours = tx.link_of("a", "a1").unwrap();
    assert_eq!(tx.link_of("b", "b2").unwrap(), ours);
    assert_ne!(tx.link_of("b", "b1").unwrap(), ours);
    assert_eq!(tx.outbox_len("b").unwrap(), 0);
}

/// Company acme.example synced to "b" (`b1`); "a" then changes its phone, and the write
/// of that to "b" is planned and held (see [`FakeCrm::held`]) while a user of "b" renames
/// the company there and the engine reads that. Returns the held push and the drain.
async fn write_planned_before_an_edit_in_the_target(
    dir: &tempfile::TempDir,
) -> (
    Arc<FakeCrm>,
    Arc<Engine>,
    HeldPush,
    tokio::task::JoinHandle<()>,
) {
    let b = Arc::new(FakeCrm::new("b", PreWriteRead::Nothing));
    let e = synced(&b, dir).await;
    e.ingest_page("a", &rally("Acme", "+1 555 0111", 200), "a")
        .unwrap();
    let held = HeldPush::default();
    *b.held.lock().unwrap() = Some(held.clone());
    let drain = {
        let e = e.clone();
        tokio::spawn(async move {
            let _ = e.drain_all("b", &CancellationToken::new()).await;
        })
    };
    held.arrived.notified().await;
    b.edit("b1", json!({"company": "Acme Edited In B"}), 300);
    assert_eq!(read_b(&e, &b).await.merged, 1);
    assert_eq!(company(&e), (text("Acme Edited In B"), text("+1 555 0111")));
    (b, e, held, drain)
}

#[tokio::test]
async fn our_write_read_back_before_its_outcome_is_recorded_is_no_news() {
    let dir = tempfile::tempdir().unwrap();
    let (b, e, held, drain) = write_planned_before_an_edit_in_the_target(&dir).await;
    // The write planned before the rename lands (a full write: it puts the old name back
    // there) and is read back before its answer is in.
    held.go.notify_one();
    held.stored.notified().await;
    assert_eq!(b.record("b1").fields["company"], json!("Acme"));
    assert_eq!(read_b(&e, &b).await.merged, 0, "our own write came back");
    assert_eq!(
        company(&e),
        (text("Acme Edited In B"), text("+1 555 0111")),
        "the rename made in b was undone by our write coming back"
    );
    drain.abort();
}

#[tokio::test]
async fn a_value_our_write_in_flight_put_there_is_no_news_beside_a_later_edit() {
    let dir = tempfile::tempdir().unwrap();
    let (b, e, held, drain) = write_planned_before_an_edit_in_the_target(&dir).await;
    held.go.notify_one();
    held.stored.notified().await;
    // A user of "b" changes the phone after our write landed, before its answer is in:
    // the record is not what we wrote, but its name still is.
    b.edit("b1", json!({"mainPhone": "+1 555 0199"}), 20_000);
    assert_eq!(read_b(&e, &b).await.merged, 1);
    assert_eq!(
        company(&e),
        (text("Acme Edited In B"), text("+1 555 0199")),
        "the name our write put back in b was taken for a change"
    );
    drain.abort();
}
