//! The process does not grow with the number of records crmbridge pushes: rounds of edits
//! in Rally, each pushed to Marketo and amoCRM through the real connectors, HTTP layer and
//! wire simulators, leave the live heap where the first rounds left it. (A per-push leak
//! anywhere — engine, connectors, metrics, store, or a simulator keeping every call — shows
//! up here as heap growth; the simulators' record counts do not change under edits.)

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use crmbridge::config::Config;
use crmbridge::connector::PollMode;
use crmbridge::daemon::metrics::Metrics;
use crmbridge::daemon::service::{build_engine, open_store};
use crmbridge::engine::{BackfillOptions, Engine};
use crmbridge::sim::cluster::ClusterConfig;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The system allocator, counting the bytes allocated and not yet freed.
struct CountingAlloc;

static HEAP_LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`; only a counter is updated.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HEAP_LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            HEAP_LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        HEAP_LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HEAP_LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            HEAP_LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn pushed(m: &Metrics) -> f64 {
    ["marketo", "amocrm"]
        .iter()
        .map(|c| {
            m.get("crmbridge_records_pushed_total", &[("connector", c)])
                .unwrap_or(0.0)
        })
        .sum()
}

/// Edits every Rally company (same value length each round, so the simulators' records
/// keep their size), reads the changes and pushes them to both targets.
async fn edit_round(
    cluster: &crmbridge::sim::cluster::SimCluster,
    engine: &Arc<Engine>,
    ids: &[String],
    round: usize,
) {
    for id in ids {
        cluster
            .rally
            .update(id, json!({"city": format!("City {round:04}")}))
            .expect("rally company exists");
    }
    let sd = CancellationToken::new();
    engine
        .poll_cycle("rally", "rally", &PollMode::Incremental, &sd, &|_| {})
        .await
        .unwrap_or_else(|e| panic!("poll rally: {e}"));
    for target in ["marketo", "amocrm"] {
        engine
            .drain_all(target, &sd)
            .await
            .unwrap_or_else(|e| panic!("drain {target}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_heap_stays_flat_over_thousands_of_pushes() {
    const WARM_UP: usize = 3;
    const MEASURED: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    // The limits are not the subject here: ×10 keeps the 15 rounds quick.
    let cluster_cfg = ClusterConfig {
        companies: 400,
        limit_scale: 10,
        ..Default::default()
    };
    let (cluster, path) = cluster_and_config(&cluster_cfg, dir.path(), "1m", None).await;
    let cfg = Config::load(&path).unwrap();
    let metrics = Arc::new(Metrics::new());
    let engine = build_engine(&cfg, open_store(&cfg).unwrap(), metrics.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let report = engine
        .backfill(
            &BackfillOptions::default(),
            &CancellationToken::new(),
            &|_, _| {},
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.ok(), "backfill failed: {report:?}");
    let ids: Vec<String> = cluster
        .rally
        .dump()
        .iter()
        .map(|r| r["id"].as_str().expect("rally id").to_string())
        .collect();

    for round in 0..WARM_UP {
        edit_round(&cluster, &engine, &ids, round).await;
    }
    let (heap_before, pushed_before) = (HEAP_LIVE.load(Ordering::Relaxed), pushed(&metrics));
    for round in WARM_UP..WARM_UP + MEASURED {
        edit_round(&cluster, &engine, &ids, round).await;
    }
    let (heap_after, pushed_after) = (HEAP_LIVE.load(Ordering::Relaxed), pushed(&metrics));

    let pushes = pushed_after - pushed_before;
    assert_eq!(
        pushes,
        (2 * ids.len() * MEASURED) as f64,
        "every edit reaches both targets once per round"
    );
    let dead = engine
        .store()
        .begin_read()
        .unwrap()
        .dead_letter_count()
        .unwrap();
    assert_eq!(
        dead, 0,
        "edits were dead-lettered (they would grow the store)"
    );
    let growth = heap_after as i64 - heap_before as i64;
    eprintln!("heap growth {growth} bytes over {pushes} pushes");
    // 9,600 pushes: measured growth is a few bytes per push; 1 MiB (~110 bytes per push)
    // leaves room for connection buffers and caches settling, while keeping even a small
    // `{seq, status, id}` per record in a simulator's log grows it by ~2.5 MiB.
    assert!(
        growth < 1 << 20,
        "live heap grew {growth} bytes over {pushes} pushes ({:.0} bytes per push): {heap_before} -> {heap_after}",
        growth as f64 / pushes
    );
    cluster.shutdown().await;
}
