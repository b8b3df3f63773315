//! Behaviour of the concurrent drain against a fake target that delays its answers and
//! records what is in flight at once.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::super::{Endpoint, Engine, EngineError, EngineSettings};
use crate::connector::{Connector, ConnectorError, Cursor, Page, PollMode, PushItem, PushOutcome};
use crate::daemon::metrics::Metrics;
use crate::mapping::{Mapping, MappingRules};
use crate::model::{Company, CrmKind, FieldState, Provenance, Value};
use crate::store::Store;

const TARGET: &str = "rally";

/// What the fake target saw.
#[derive(Debug, Default)]
struct Seen {
    calls: usize,
    in_flight: usize,
    max_in_flight: usize,
    /// Companies currently inside a push.
    pushing: HashSet<String>,
    /// Companies that were in two pushes at once.
    overlaps: Vec<String>,
    /// Per company, the names pushed, in order.
    names: BTreeMap<String, Vec<String>>,
    /// Per company, `prior_attempts` of its pushes.
    prior: BTreeMap<String, Vec<u32>>,
    /// Per company, `unconfirmed_since` of its pushes.
    unconfirmed: BTreeMap<String, Vec<Option<DateTime<Utc>>>>,
}

/// What a push should do instead of writing: fail with the error once this many other
/// pushes have completed.
type Failure = (usize, ConnectorError);

type Hook = Box<dyn Fn(&[PushItem], usize) -> Option<Failure> + Send + Sync>;

/// A target that answers each push after `delay`, writing every item unless `hook`
/// (called with the items and the call number, before the delay) returns a failure.
struct FakeTarget {
    batch: usize,
    width: usize,
    delay: Duration,
    seen: Mutex<Seen>,
    hook: Option<Hook>,
    /// Companies the target answers `Retry` for.
    retry: HashSet<String>,
    /// Companies the target answers `Retry` for once, then writes.
    retry_once: Mutex<HashSet<String>>,
    /// Companies the target answers `Unconfirmed` for once, then writes.
    unconfirmed_once: Mutex<HashSet<String>>,
    /// Every poll fails with a transient error.
    poll_fails: bool,
    /// Every create lands on one and the same record (as a Rally bulk upsert of two
    /// companies with one domain does).
    one_record: bool,
    /// Pushes completed, for hooks that wait on other batches.
    done: tokio::sync::watch::Sender<usize>,
}

impl FakeTarget {
    fn new(batch: usize, width: usize, delay: Duration) -> Self {
        FakeTarget {
            batch,
            width,
            delay,
            seen: Mutex::default(),
            hook: None,
            retry: HashSet::new(),
            retry_once: Mutex::default(),
            unconfirmed_once: Mutex::default(),
            poll_fails: false,
            one_record: false,
            done: tokio::sync::watch::channel(0).0,
        }
    }
}

#[async_trait]
impl Connector for FakeTarget {
    fn name(&self) -> &str {
        TARGET
    }
    async fn start(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn poll(&self, _: &Cursor, _: &PollMode) -> Result<Page, ConnectorError> {
        if self.poll_fails {
            return Err(ConnectorError::Transient {
                connector: TARGET.into(),
                detail: "HTTP 503 on every page".into(),
                retry_after: None,
            });
        }
        Ok(Page::default())
    }
    fn max_batch(&self) -> usize {
        self.batch
    }
    fn max_in_flight(&self) -> usize {
        self.width
    }
    async fn push(&self, items: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        let call = {
            let mut s = self.seen.lock().unwrap();
            s.calls += 1;
            s.in_flight += 1;
            s.max_in_flight = s.max_in_flight.max(s.in_flight);
            for it in items {
                if !s.pushing.insert(it.canonical_id.clone()) {
                    s.overlaps.push(it.canonical_id.clone());
                }
                let name = it.fields.get("name").map(|v| v.to_string());
                s.names
                    .entry(it.canonical_id.clone())
                    .or_default()
                    .push(name.unwrap_or_default());
                s.prior
                    .entry(it.canonical_id.clone())
                    .or_default()
                    .push(it.prior_attempts);
                s.unconfirmed
                    .entry(it.canonical_id.clone())
                    .or_default()
                    .push(it.unconfirmed_since);
            }
            s.calls
        };
        let err = self.hook.as_ref().and_then(|h| h(items, call));
        tokio::time::sleep(self.delay).await;
        if let Some((others, _)) = &err {
            let mut done = self.done.subscribe();
            done.wait_for(|n| n >= others).await.unwrap();
        }
        {
            let mut s = self.seen.lock().unwrap();
            s.in_flight -= 1;
            for it in items {
                s.pushing.remove(&it.canonical_id);
            }
        }
        self.done.send_modify(|n| *n += 1);
        if let Some((_, e)) = err {
            return Err(e);
        }
        Ok(items
            .iter()
            .map(|it| {
                if self.retry.contains(&it.canonical_id)
                    || self.retry_once.lock().unwrap().remove(&it.canonical_id)
                {
                    PushOutcome::Retry {
                        reason: "try later".into(),
                    }
                } else if self
                    .unconfirmed_once
                    .lock()
                    .unwrap()
                    .remove(&it.canonical_id)
                {
                    PushOutcome::Unconfirmed {
                        reason: "timed out after sending".into(),
                    }
                } else if self.one_record {
                    PushOutcome::Written {
                        vendor_id: it.vendor_id.clone().unwrap_or("v-shared".into()),
                        created: it.vendor_id.is_none(),
                    }
                } else {
                    PushOutcome::Written {
                        vendor_id: format!("v-{}", it.canonical_id),
                        created: it.vendor_id.is_none(),
                    }
                }
            })
            .collect())
    }
}

fn company(id: &str, name: &str) -> Company {
    let mut c = Company::new(id.to_string());
    c.fields.insert(
        "name".into(),
        FieldState {
            value: Value::Text(name.into()),
            source: Provenance {
                connector: "marketo".into(),
                vendor_ts: Utc::now(),
            },
        },
    );
    c
}

struct Fixture {
    _dir: tempfile::TempDir,
    engine: Arc<Engine>,
    target: Arc<FakeTarget>,
    ids: Vec<String>,
}

/// An engine whose only endpoint is `target`, with `n` companies queued for it.
fn fixture(target: FakeTarget, n: usize) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(&dir.path().join("state.redb")).expect("open store"));
    let ids: Vec<String> = (0..n).map(|i| format!("c{i:04}")).collect();
    let tx = store.begin_write().unwrap();
    for id in &ids {
        tx.put_company(&company(id, &format!("{id} Inc"))).unwrap();
        tx.enqueue(TARGET, id, Utc::now()).unwrap();
    }
    tx.commit().unwrap();
    let target = Arc::new(target);
    let endpoint = Endpoint::new(
        TARGET,
        target.clone(),
        Mapping::compile(CrmKind::Rally, &MappingRules::default()).unwrap(),
        Duration::from_secs(1),
    );
    let engine = Arc::new(Engine::new(
        store,
        vec![endpoint],
        EngineSettings::default(),
        Arc::new(Metrics::new()),
    ));
    Fixture {
        _dir: dir,
        engine,
        target,
        ids,
    }
}

impl Fixture {
    fn outbox_len(&self) -> u64 {
        self.engine
            .store
            .begin_read()
            .unwrap()
            .outbox_len(TARGET)
            .unwrap()
    }

    fn linked(&self) -> usize {
        let rx = self.engine.store.begin_read().unwrap();
        self.ids
            .iter()
            .filter(|id| rx.vendor_id_of(id, TARGET).unwrap().is_some())
            .count()
    }

    fn pushed_metric(&self) -> f64 {
        self.engine
            .metrics
            .get("crmbridge_records_pushed_total", &[("connector", TARGET)])
            .unwrap_or(0.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_all_keeps_max_in_flight_batches_at_the_target_at_once() {
    let delay = Duration::from_millis(150);
    let f = fixture(FakeTarget::new(10, 4, delay), 80);
    let t0 = Instant::now();
    let stats = f
        .engine
        .drain_all(TARGET, &CancellationToken::new())
        .await
        .expect("drain");
    let took = t0.elapsed();
    let seen = f.target.seen.lock().unwrap();
    assert_eq!((stats.written, seen.calls), (80, 8), "{stats:?}");
    assert_eq!(seen.max_in_flight, 4, "pushes in flight at once: {seen:?}");
    // One after another, 8 pushes cannot take less than 8 service times.
    assert!(
        took < delay * 8,
        "8 batches of {delay:?} took {took:?}: not overlapped"
    );
    assert_eq!(f.outbox_len(), 0);
    assert_eq!(f.linked(), 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_never_hold_the_same_company() {
    let mut target = FakeTarget::new(10, 4, Duration::from_millis(40));
    // While the first batches are in flight, rename their first companies: their entries
    // are then re-queued and pushed again, which must wait for the first push's outcome.
    let store_slot: Arc<Mutex<Option<Arc<Store>>>> = Arc::default();
    let slot = store_slot.clone();
    target.hook = Some(Box::new(move |items, call| {
        if call <= 4 {
            let store = slot.lock().unwrap().clone().expect("store set");
            let tx = store.begin_write().unwrap();
            let id = &items[0].canonical_id;
            tx.put_company(&company(id, &format!("{id} renamed")))
                .unwrap();
            tx.enqueue(TARGET, id, Utc::now()).unwrap();
            tx.commit().unwrap();
        }
        None
    }));
    let f = fixture(target, 40);
    *store_slot.lock().unwrap() = Some(f.engine.store.clone());
    f.engine
        .drain_all(TARGET, &CancellationToken::new())
        .await
        .expect("drain");
    let seen = f.target.seen.lock().unwrap();
    assert!(
        seen.overlaps.is_empty(),
        "in two pushes at once: {:?}",
        seen.overlaps
    );
    assert!(seen.max_in_flight > 1, "never concurrent: {seen:?}");
    let renamed: Vec<_> = seen.names.iter().filter(|(_, n)| n.len() > 1).collect();
    assert_eq!(renamed.len(), 4, "pushed twice: {renamed:?}");
    for (id, names) in &renamed {
        assert!(
            names.last().unwrap().contains("renamed"),
            "{id}: last push carried {names:?}"
        );
    }
    assert_eq!(f.outbox_len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_error_in_one_batch_keeps_the_outcomes_of_the_others() {
    let mut target = FakeTarget::new(10, 4, Duration::from_millis(20));
    target.hook = Some(Box::new(move |items, _| {
        // The batch holding the first company fails, after the three others answered.
        (items.iter().any(|i| i.canonical_id == "c0000")).then(|| {
            let e = ConnectorError::Transient {
                connector: TARGET.into(),
                detail: "503".into(),
                retry_after: None,
            };
            (3, e)
        })
    }));
    let f = fixture(target, 40);
    let res = f.engine.drain_all(TARGET, &CancellationToken::new()).await;
    assert!(
        matches!(
            res,
            Err(EngineError::Connector(ConnectorError::Transient { .. }))
        ),
        "{res:?}"
    );
    assert_eq!(f.linked(), 30, "the three other batches' links");
    assert_eq!(f.pushed_metric(), 30.0);
    let rx = f.engine.store.begin_read().unwrap();
    let left = rx.outbox_batch(TARGET, 100).unwrap();
    assert_eq!(left.len(), 10, "{left:?}");
    assert!(
        left.iter()
            .all(|(_, e)| !e.sending && e.attempts == 1 && e.last_error.is_some()),
        "{left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspension_stops_new_batches_for_the_target() {
    let mut target = FakeTarget::new(10, 2, Duration::from_millis(30));
    target.hook = Some(Box::new(|_, _| {
        let e = ConnectorError::Suspended {
            connector: TARGET.into(),
            detail: "banned".into(),
            until: Utc::now() + chrono::Duration::hours(1),
        };
        Some((0, e))
    }));
    let f = fixture(target, 100);
    let res = f.engine.drain_all(TARGET, &CancellationToken::new()).await;
    assert!(
        matches!(
            res,
            Err(EngineError::Connector(ConnectorError::Suspended { .. }))
        ),
        "{res:?}"
    );
    let calls = f.target.seen.lock().unwrap().calls;
    assert!(calls <= 2, "{calls} pushes after a suspension");
    let rx = f.engine.store.begin_read().unwrap();
    let untouched = rx
        .outbox_batch(TARGET, 1000)
        .unwrap()
        .iter()
        .filter(|(_, e)| e.attempts == 0)
        .count();
    assert_eq!(untouched, 100 - calls * 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_batches_in_flight_finish_and_starts_no_new_ones() {
    let mut target = FakeTarget::new(10, 3, Duration::from_millis(50));
    let token = CancellationToken::new();
    let sd = token.clone();
    target.hook = Some(Box::new(move |_, _| {
        sd.cancel();
        None
    }));
    let f = fixture(target, 100);
    let stats = f.engine.drain_all(TARGET, &token).await.expect("drain");
    let calls = f.target.seen.lock().unwrap().calls;
    assert!((1..=3).contains(&calls), "{calls} pushes");
    assert_eq!(stats.written, calls * 10, "{stats:?}");
    assert_eq!(f.outbox_len(), 100 - calls as u64 * 10);
    let rx = f.engine.store.begin_read().unwrap();
    let sending: Vec<_> = rx
        .outbox_batch(TARGET, 1000)
        .unwrap()
        .into_iter()
        .filter(|(_, e)| e.sending)
        .collect();
    assert!(sending.is_empty(), "left sending: {sending:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_left_sending_by_a_crashed_process_are_pushed_again() {
    let f = fixture(FakeTarget::new(10, 2, Duration::from_millis(1)), 20);
    {
        // A previous process marked the first batch as being sent, then died.
        let tx = f.engine.store.begin_write().unwrap();
        for (seq, _) in tx.outbox_batch(TARGET, 10).unwrap() {
            tx.outbox_mark_sending(TARGET, seq).unwrap();
        }
        tx.commit().unwrap();
    }
    let stats = f
        .engine
        .drain_all(TARGET, &CancellationToken::new())
        .await
        .expect("drain");
    assert_eq!(stats.written, 20);
    let seen = f.target.seen.lock().unwrap();
    let resent = seen.prior.values().filter(|p| **p == [1]).count();
    assert_eq!(resent, 10, "pushes with prior_attempts 1: {:?}", seen.prior);
    // Those sends may have landed: the target is told so, since they were queued.
    let unconfirmed = seen.unconfirmed.values().filter(|u| u[0].is_some()).count();
    assert_eq!(unconfirmed, 10, "unconfirmed_since: {:?}", seen.unconfirmed);
    assert_eq!(f.outbox_len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_of_unknown_outcome_is_sent_again_as_unconfirmed_and_a_retry_is_not() {
    let target = FakeTarget::new(10, 2, Duration::from_millis(1));
    target
        .unconfirmed_once
        .lock()
        .unwrap()
        .insert("c0003".into());
    target.retry_once.lock().unwrap().insert("c0007".into());
    let f = fixture(target, 20);
    let before = Utc::now();
    let stats = f
        .engine
        .drain_settled(TARGET, &CancellationToken::new())
        .await
        .expect("drain");
    assert_eq!((stats.written, stats.retried), (20, 0), "{stats:?}");
    let seen = f.target.seen.lock().unwrap();
    let [first, again] = seen.unconfirmed["c0003"][..] else {
        panic!("c0003 pushed twice: {:?}", seen.unconfirmed["c0003"]);
    };
    assert_eq!(first, None);
    let since = again.expect("the second push of c0003 is unconfirmed");
    assert!(
        before <= since && since <= Utc::now(),
        "unconfirmed since the first send was planned: {since} (drain began {before})"
    );
    assert_eq!(
        seen.unconfirmed["c0007"],
        [None, None],
        "a Retry is certain"
    );
    drop(seen);
    assert_eq!(f.outbox_len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_asking_for_a_retry_is_not_taken_again_in_the_same_call() {
    let mut target = FakeTarget::new(10, 2, Duration::from_millis(1));
    target.retry.insert("c0003".into());
    let f = fixture(target, 30);
    let stats = f
        .engine
        .drain_all(TARGET, &CancellationToken::new())
        .await
        .expect("drain");
    assert_eq!((stats.written, stats.retried), (29, 1), "{stats:?}");
    assert_eq!(f.target.seen.lock().unwrap().prior["c0003"], [0]);
    assert_eq!(f.outbox_len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_settled_pushes_again_what_asked_for_a_retry_while_progress_is_made() {
    let mut target = FakeTarget::new(10, 2, Duration::from_millis(1));
    target.retry.insert("c0003".into());
    target.retry_once.lock().unwrap().insert("c0007".into());
    let f = fixture(target, 30);
    let stats = f
        .engine
        .drain_settled(TARGET, &CancellationToken::new())
        .await
        .expect("drain");
    // c0007 went through on its second call; c0003 keeps asking and stays queued once
    // a call makes no progress.
    assert_eq!((stats.written, stats.retried), (29, 1), "{stats:?}");
    let seen = f.target.seen.lock().unwrap();
    assert_eq!(seen.prior["c0007"], [0, 1]);
    assert_eq!(seen.prior["c0003"], [0, 1, 2]);
    drop(seen);
    assert_eq!(f.outbox_len(), 1);
}

/// A default backfill of the fixture's engine.
async fn backfill(f: &Fixture) -> crate::engine::BackfillReport {
    f.engine
        .backfill(
            &crate::engine::BackfillOptions::default(),
            &CancellationToken::new(),
            &|_, _| {},
        )
        .await
        .expect("backfill")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_does_not_push_to_a_crm_whose_read_failed() {
    let mut target = FakeTarget::new(10, 2, Duration::from_millis(1));
    target.poll_fails = true;
    let f = fixture(target, 20);
    let report = backfill(&f).await;
    assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
    // Creating companies it was never read for could duplicate them.
    assert_eq!(
        f.target.seen.lock().unwrap().calls,
        0,
        "pushed to an unread CRM"
    );
    assert_eq!(
        report.pending.get(TARGET),
        Some(&20),
        "{:?}",
        report.pending
    );
    assert_eq!(f.outbox_len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_pushes_to_a_crm_it_read() {
    let f = fixture(FakeTarget::new(10, 2, Duration::from_millis(1)), 20);
    let report = backfill(&f).await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.pending.get(TARGET), Some(&0), "{:?}", report.pending);
    assert_eq!(f.outbox_len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_landing_on_another_companys_record_is_a_dead_letter_and_the_owner_is_restored() {
    let mut target = FakeTarget::new(10, 1, Duration::ZERO);
    target.one_record = true;
    let f = fixture(target, 2);
    f.engine
        .drain_all(TARGET, &CancellationToken::new())
        .await
        .expect("drain");
    let rx = f.engine.store.begin_read().unwrap();
    assert_eq!(
        rx.vendor_id_of("c0000", TARGET).unwrap().as_deref(),
        Some("v-shared")
    );
    assert_eq!(
        rx.vendor_id_of("c0001", TARGET).unwrap(),
        None,
        "the link must not move"
    );
    let dead = rx.dead_letters(10, 0).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].canonical_id.as_deref(), Some("c0001"));
    assert!(
        dead[0]
            .reason
            .contains("belongs to another company (c0000)"),
        "{}",
        dead[0].reason
    );
    drop(rx);
    assert_eq!(f.outbox_len(), 0);
    let seen = f.target.seen.lock().unwrap();
    // The owner's content went back to the record the other create overwrote.
    assert_eq!(seen.names["c0000"].len(), 2, "{seen:?}");
    assert_eq!(seen.names["c0001"].len(), 1, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_company_whose_create_landed_on_anothers_record_is_not_sent_there_again() {
    let mut target = FakeTarget::new(10, 1, Duration::ZERO);
    target.one_record = true;
    let f = fixture(target, 2);
    let sd = CancellationToken::new();
    f.engine.drain_all(TARGET, &sd).await.expect("drain");
    // The refused company changes (same keys) and is queued again: sending it would land
    // on the owner's record again, and the owner would have to be restored again.
    let tx = f.engine.store.begin_write().unwrap();
    tx.put_company(&company("c0001", "c0001 Renamed")).unwrap();
    tx.enqueue(TARGET, "c0001", Utc::now()).unwrap();
    tx.commit().unwrap();
    let s = f.engine.drain_all(TARGET, &sd).await.expect("drain");
    assert_eq!((s.written, s.skipped), (0, 1), "{s:?}");
    {
        let seen = f.target.seen.lock().unwrap();
        assert_eq!(seen.names["c0001"].len(), 1, "{seen:?}");
        assert_eq!(seen.names["c0000"].len(), 2, "{seen:?}");
    }
    assert_eq!(
        f.engine
            .store
            .begin_read()
            .unwrap()
            .dead_letter_count()
            .unwrap(),
        1
    );
    // A dry run says so too.
    let tx = f.engine.store.begin_write().unwrap();
    tx.enqueue(TARGET, "c0001", Utc::now()).unwrap();
    tx.commit().unwrap();
    let opts = crate::engine::BackfillOptions {
        dry_run: true,
        ..Default::default()
    };
    let report = f.engine.backfill(&opts, &sd, &|_, _| {}).await.unwrap();
    assert_eq!(report.dry_run[TARGET].invalid, 1, "{:?}", report.dry_run);
    assert_eq!(
        report.dry_run[TARGET].would_create, 0,
        "{:?}",
        report.dry_run
    );
    // An operator retries the dead letter (e.g. after giving it a domain of its own).
    let tx = f.engine.store.begin_write().unwrap();
    let id = tx.dead_letters(10, 0).unwrap()[0].id;
    tx.remove_dead_letter(id).unwrap();
    tx.enqueue(TARGET, "c0001", Utc::now()).unwrap();
    tx.commit().unwrap();
    f.engine.drain_all(TARGET, &sd).await.expect("drain");
    assert_eq!(f.target.seen.lock().unwrap().names["c0001"].len(), 2);
}
