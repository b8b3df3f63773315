//! A fault storm across all three simulated CRMs (5,000 companies, 3,000 in each): about
//! a fifth of all calls fail (5xx, answers slower than the client timeout, truncated JSON,
//! dropped connections, throttling answers — 429, 606, 615), Marketo tokens expire
//! mid-paging and Rally's limit drops below the connector's pace twice — while a backfill
//! and then the daemon's loops sync two-way and a mutator edits every CRM. Nothing panics,
//! no loop stops, and once the faults end everything converges: no duplicate, no lost
//! update, no dead letter.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use crmbridge::config::Config;
use crmbridge::daemon::metrics::Metrics;
use crmbridge::daemon::service::{build_engine, open_store};
use crmbridge::engine::{BackfillOptions, Engine};
use crmbridge::sim::cluster::{ClusterConfig, SimCluster};
use crmbridge::sim::common::FaultConfig;
use tokio_util::sync::CancellationToken;

/// Panics seen anywhere in this test process (engine tasks included): a panicking task
/// would otherwise die silently inside its tokio task.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default(info);
    }));
}

/// The storm: ~20% of calls to every simulator fail, split over every injected kind
/// (5xx, timeouts, truncated JSON, dropped connections, and throttling answers — Rally and
/// amoCRM 429, Marketo 606/615 — that the limits did not call for).
/// `slow_by` is past the client timeouts the config sets (see [`with_short_timeouts`]).
fn storm() -> FaultConfig {
    FaultConfig {
        server_error: 0.05,
        slow: 0.03,
        slow_by: Duration::from_millis(1500),
        malformed: 0.04,
        drop_connection: 0.05,
        throttle: 0.03,
        extra_latency: Duration::ZERO,
    }
}

/// The company universe: each CRM holds an overlapping 60 % of it (3,000 each).
const COMPANIES: usize = 5_000;

/// Vendor limits × this, in the simulators and the config: the storm is about faults,
/// and syncing 5,000 companies two-way at the real limits takes minutes (Rally updates
/// one record per call at 10 calls/s).
const LIMIT_SCALE: u32 = 10;

/// Throttling answers the simulators injected (not rejections the limits called for).
fn injected_throttles(c: &SimCluster) -> u64 {
    [c.rally.stats(), c.marketo.stats(), c.amocrm.stats()]
        .iter()
        .flat_map(|s| s.rejections.iter())
        .filter(|(kind, _)| kind.ends_with("-injected"))
        .map(|(_, n)| n)
        .sum()
}

fn set_faults(c: &SimCluster, f: FaultConfig) {
    c.rally.faults().set(f.clone());
    c.marketo.faults().set(f.clone());
    c.amocrm.faults().set(f);
}

/// Gives every connector of the generated config client timeouts shorter than a slow
/// answer, so slow answers are timeouts the client must survive.
fn with_short_timeouts(path: &std::path::Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.replace(
        "poll_interval = \"1s\"\n",
        "poll_interval = \"1s\"\ntimeouts = { connect = \"1s\", read = \"1s\", write = \"1s\" }\n",
    );
    assert_eq!(text.matches("timeouts =").count(), 3, "{text}");
    std::fs::write(path, text).unwrap();
}

fn pushed(m: &Metrics) -> f64 {
    CRMS.iter()
        .map(|c| {
            m.get("crmbridge_records_pushed_total", &[("connector", c)])
                .unwrap_or(0.0)
        })
        .sum()
}

fn outbox_total(engine: &Engine) -> u64 {
    let tx = engine.store().begin_read().unwrap();
    CRMS.iter().map(|c| tx.outbox_len(c).unwrap()).sum()
}

fn last_poll(m: &Metrics, c: &str) -> f64 {
    m.get(
        "crmbridge_last_successful_poll_timestamp_seconds",
        &[("connector", c)],
    )
    .unwrap_or(0.0)
}

/// Waits until the outboxes are empty and nothing was pushed for `quiet`.
async fn settle(engine: &Engine, metrics: &Metrics, quiet: Duration, limit: Duration) {
    let start = Instant::now();
    let mut last = (pushed(metrics), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = pushed(metrics);
        if now != last.0 || outbox_total(engine) > 0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= quiet {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "did not settle within {limit:?}: outbox {:?}\n{}",
            CRMS.map(|c| (
                c,
                engine.store().begin_read().unwrap().outbox_len(c).unwrap()
            )),
            metrics.render()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_every_fault_kind_loses_nothing_and_converges_after_it_ends() {
    count_panics();
    if std::env::var_os("RUST_LOG").is_some() {
        crmbridge::daemon::logging::init(crmbridge::config::LogFormat::Human);
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let cluster_cfg = ClusterConfig {
        companies: COMPANIES,
        limit_scale: LIMIT_SCALE,
        ..Default::default()
    };
    let (cluster, path) = cluster_and_config(&cluster_cfg, dir.path(), "1s", None).await;
    with_short_timeouts(&path);
    let cluster = Arc::new(cluster);
    let cfg = Config::load(&path).unwrap();
    let metrics = Arc::new(Metrics::new());
    let engine = build_engine(&cfg, open_store(&cfg).unwrap(), metrics.clone())
        .await
        .unwrap();

    // The storm starts before the backfill: the initial full read pages through faults.
    set_faults(&cluster, storm());
    let sd = CancellationToken::new();
    // Marketo tokens expire every 3 s during the storm, i.e. mid-paging of many reads.
    let storm_over = CancellationToken::new();
    let expiry = {
        let (c, over) = (cluster.clone(), storm_over.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3)) => {}
                    _ = over.cancelled() => return n,
                }
                c.marketo.expire_tokens();
                n += 1;
            }
        })
    };
    // A backfill that fails part-way is fine: the daemon's own first cycle reads
    // everything again. It must return, not panic.
    let backfill = engine
        .backfill(&BackfillOptions::default(), &sd, &|_, _| {})
        .await
        .expect("the store does not fail");
    eprintln!(
        "backfill under the storm after {:?}: failures {:?}",
        started.elapsed(),
        backfill.failures
    );

    let handle = engine.start(sd.clone());
    let mut mutator = TestMutator::new();
    let rally_429s = || {
        cluster
            .rally
            .stats()
            .rejections
            .get("429")
            .copied()
            .unwrap_or(0)
    };
    // Two 429 bursts from Rally: its limit drops to 2 calls/s, far below what the connector
    // paces to. A burst lasts at least 10 steps and until Rally has answered at least one
    // 429 in it (a loaded machine may not exceed even that at once), so it surely happens.
    let mut bursts = 0;
    let mut burst: Option<(usize, u64)> = None;
    let mut step = 0usize;
    while step < 60 || burst.is_some() {
        match burst {
            None if bursts < 2 && step % 30 == 10 => {
                cluster.rally.set_rate_limit(LIMIT_SCALE / 5);
                burst = Some((step, rally_429s()));
            }
            Some((from, before)) if step >= from + 10 && rally_429s() > before => {
                cluster.rally.set_rate_limit(10 * LIMIT_SCALE);
                burst = None;
                bursts += 1;
            }
            _ => {}
        }
        assert!(
            step < 200,
            "Rally never answered 429 at 1 call/s: the daemon made at most one call a second"
        );
        mutator.step(&cluster);
        tokio::time::sleep(Duration::from_millis(250)).await;
        step += 1;
    }
    let storm_faults = [
        cluster.rally.stats().faults,
        cluster.marketo.stats().faults,
        cluster.amocrm.stats().faults,
    ];
    let rally_429s = rally_429s();
    let throttles = injected_throttles(&cluster);

    // The storm ends. The loops must still be alive: more edits made now must arrive too.
    set_faults(&cluster, FaultConfig::default());
    cluster.rally.set_rate_limit(10 * LIMIT_SCALE);
    storm_over.cancel();
    let expirations = expiry.await.unwrap();
    let calm = chrono::Utc::now().timestamp() as f64;
    for _ in 0..9 {
        mutator.step(&cluster);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    settle(
        &engine,
        &metrics,
        Duration::from_millis(2500),
        Duration::from_secs(60),
    )
    .await;
    for c in CRMS {
        assert!(
            last_poll(&metrics, c) >= calm,
            "{c} has not polled successfully since the storm ended: its loop stopped\n{}",
            metrics.render()
        );
    }
    sd.cancel();
    handle.wait().await;

    let views = crm_views(&path).await;
    assert_converged(&views);
    assert_expectations(&views, &mutator.expect);
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
    assert!(
        storm_faults.iter().all(|n| *n >= 5),
        "the storm injected too few faults (rally, marketo, amocrm): {storm_faults:?}"
    );
    assert!(rally_429s > 0, "the Rally 429 bursts never happened");
    assert!(throttles > 0, "no throttling answer was injected");
    assert!(
        expirations >= 5,
        "Marketo tokens expired only {expirations} times"
    );
    assert!(!cluster.amocrm.is_banned(), "amoCRM banned the client");
    let tx = engine.store().begin_read().unwrap();
    let dead = tx.dead_letter_count().unwrap();
    assert_eq!(dead, 0, "dead letters: {:?}", tx.dead_letters(20, 0).ok());
    eprintln!(
        "storm: {storm_faults:?} faults ({throttles} throttling answers), {rally_429s} rally 429s, {expirations} token expiries, {:?} total",
        started.elapsed()
    );
    match Arc::try_unwrap(cluster) {
        Ok(c) => c.shutdown().await,
        Err(_) => panic!("cluster still shared"),
    }
}
