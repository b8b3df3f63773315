//! The Marketo connector against the Marketo simulator: complete reads while companies
//! change mid-scan, zero limit rejections at default limits, budget pacing, and the 20k
//! benchmark (`#[ignore]`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::{MarketoConnector, MarketoOptions};
use crate::config::{CommonConnectorConfig, Limits, Timeouts};
use crate::connector::{Connector, ConnectorError, Cursor, PollMode, PushItem, PushOutcome};
use crate::connectors::BuildContext;
use crate::daemon::metrics::Metrics;
use crate::secret::Secret;
use crate::sim::marketo::{MarketoSim, MarketoSimConfig};
use crate::store::Store;

struct Setup {
    sim: MarketoSim,
    conn: MarketoConnector,
    store: Arc<Store>,
    _dir: tempfile::TempDir,
}

fn limits(per_window: u32, window: Duration, daily_quota: Option<u64>, share: f64) -> Limits {
    Limits {
        requests_per_second: None,
        requests_per_window: Some((per_window, window)),
        max_concurrent: 10,
        daily_quota,
        daily_share: share,
    }
}

async fn setup(
    companies: usize,
    sim_cfg: MarketoSimConfig,
    limits: Limits,
    opts: MarketoOptions,
) -> Setup {
    let sim = MarketoSim::start(
        "127.0.0.1:0".parse().unwrap(),
        MarketoSimConfig {
            seed_indices: (0..companies).collect(),
            ..sim_cfg
        },
    )
    .await
    .expect("simulator starts");
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
    let ctx = BuildContext {
        store: store.clone(),
        metrics: Arc::new(Metrics::new()),
    };
    let common = CommonConnectorConfig {
        // As admins copy it: with `/rest`.
        base_url: url::Url::parse(&format!("{}/rest", sim.base_url())).unwrap(),
        poll_interval: Duration::from_secs(1),
        batch_size: 300,
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(10),
            write: Duration::from_secs(10),
        },
        limits,
        enabled: true,
    };
    let conn = MarketoConnector::with_options(
        "marketo",
        &common,
        Secret::new("marketo-client"),
        Secret::new("marketo-secret"),
        &ctx,
        opts,
    )
    .expect("connector builds");
    conn.start().await.expect("start");
    Setup {
        sim,
        conn,
        store,
        _dir: dir,
    }
}

/// Polls until the cycle ends; returns the records by id (every version seen) and the cursor.
async fn cycle(
    conn: &MarketoConnector,
    cursor: Cursor,
    seen: &mut HashMap<String, Vec<Map<String, Value>>>,
    between_pages: &dyn Fn(),
) -> Cursor {
    let mut cursor = cursor;
    loop {
        let page = conn
            .poll(&cursor, &PollMode::Incremental)
            .await
            .expect("poll");
        assert!(page.malformed.is_empty(), "malformed: {:?}", page.malformed);
        for r in page.records {
            seen.entry(r.vendor_id).or_default().push(r.fields);
        }
        cursor = page.next;
        if !page.more {
            return cursor;
        }
        between_pages();
    }
}

fn item(n: usize, vendor_id: Option<String>, fields: Value) -> PushItem {
    PushItem {
        canonical_id: format!("canon-{n}"),
        vendor_id,
        fields: fields.as_object().unwrap().clone(),
        prior_attempts: 0,
        unconfirmed_since: None,
    }
}

#[tokio::test]
async fn changes_made_mid_scan_are_all_read_by_the_next_cycle() {
    let opts = MarketoOptions {
        overlap: Duration::ZERO,
        lag: Duration::from_secs(1),
        windows_per_poll: 1,
        ..MarketoOptions::default()
    };
    let fast = limits(5000, Duration::from_secs(20), None, 1.0);
    let sim_cfg = MarketoSimConfig {
        calls_per_window: 5000,
        ..MarketoSimConfig::default()
    };
    let s = setup(2000, sim_cfg, fast, opts).await;
    let mut seen = HashMap::new();
    let mutate = || {
        s.sim.mutate_random(15);
    };
    let mut cursor = Cursor::start();
    {
        let _bg = s.sim.spawn_mutator(200.0);
        let until = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < until {
            cursor = cycle(&s.conn, cursor, &mut seen, &mutate).await;
        }
    }
    // Mutations may still carry the current second: let the clock move past them.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    cycle(&s.conn, cursor, &mut seen, &|| {}).await;

    let dump = s.sim.dump();
    assert!(
        dump.len() > 1500,
        "the simulator kept most companies: {}",
        dump.len()
    );
    let mut missing = Vec::new();
    for rec in &dump {
        let id = rec["id"].to_string();
        let want = rec.as_object().unwrap();
        if !seen
            .get(&id)
            .is_some_and(|v| v.iter().any(|got| got == want))
        {
            missing.push((
                id.clone(),
                rec.clone(),
                seen.get(&id).and_then(|v| v.last().cloned()),
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} companies were never read in their final version, e.g. {:?}",
        missing.len(),
        dump.len(),
        &missing[..missing.len().min(3)]
    );
}

/// Options for an instance whose ids start far from 1: a short first discovery and
/// descent, so the tests make few calls.
fn far_id_opts() -> MarketoOptions {
    MarketoOptions {
        discovery_windows: 3,
        overlap: Duration::ZERO,
        ..MarketoOptions::default()
    }
}

fn fast_sim(first_id: i64) -> MarketoSimConfig {
    MarketoSimConfig {
        first_id,
        calls_per_window: 5000,
        ..MarketoSimConfig::default()
    }
}

/// `companies` companies with ids from 12,345,678, which no probe reaches, and a daily
/// budget, so that an empty cycle earns a pause of minutes.
async fn far_id_setup(companies: usize) -> Setup {
    setup(
        companies,
        fast_sim(12_345_678),
        limits(5000, Duration::from_secs(20), Some(50_000), 1.0),
        far_id_opts(),
    )
    .await
}

#[tokio::test]
async fn ids_starting_just_below_a_round_number_are_found_by_a_probe_and_a_descent() {
    // 500 companies with ids 99,900..=100,399: nothing in the first 3 windows from id 1;
    // the probe at 100,000 finds 100,000..100,299, the cycle goes on upwards, and the
    // descent below 100,000 finds 99,900..99,999.
    let s = setup(
        500,
        fast_sim(99_900),
        limits(5000, Duration::from_secs(20), None, 1.0),
        far_id_opts(),
    )
    .await;
    let mut seen = HashMap::new();
    let cursor = cycle(&s.conn, Cursor::start(), &mut seen, &|| {}).await;
    assert_eq!(seen.len(), 500, "every company read in the first cycle");
    let c = super::poll::ScanCursor::from_cursor(&cursor).unwrap();
    assert_eq!((c.min_id, c.max_id), (Some(99_900), Some(100_399)));
    assert_eq!(c.descend_from, None, "the descent is over");

    // The next cycle starts at the lowest id: 2 windows of companies + 2 empty ones.
    // The update's `updatedAt` is "now", later than the cycle's `since`.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.sim
        .update(99_950, json!({"industry": "Changed"}))
        .expect("company exists");
    let queries = || {
        s.sim
            .stats()
            .requests
            .get("GET /rest/v1/companies.json")
            .copied()
            .unwrap_or(0)
    };
    let before = queries();
    let mut again = HashMap::new();
    let cursor = super::poll::ScanCursor {
        not_before: None,
        ..super::poll::ScanCursor::from_cursor(&cursor).unwrap()
    }
    .to_cursor();
    cycle(&s.conn, cursor, &mut again, &|| {}).await;
    assert!(
        again.contains_key("99950"),
        "a change below the probe is seen"
    );
    let calls = queries() - before;
    assert!(calls <= 4, "{calls} calls for a 500-id cycle");
}

#[tokio::test]
async fn ids_no_probe_reaches_are_found_from_an_id_a_push_was_answered_with() {
    // 50 companies from id 12,345,678: no probe hits them. A push creates one more (the
    // next id); the next cycle probes there and descends to the 50, although they were
    // last updated long before the cycle's `since`.
    let s = far_id_setup(50).await;
    let mut seen = HashMap::new();
    let cursor = cycle(&s.conn, Cursor::start(), &mut seen, &|| {}).await;
    assert!(seen.is_empty(), "nothing found yet: {:?}", seen.keys());
    let paused = super::poll::ScanCursor::from_cursor(&cursor).unwrap();
    assert!(paused.not_before.is_some_and(|t| t > chrono::Utc::now()));
    let page = s.conn.poll(&cursor, &PollMode::Incremental).await.unwrap();
    assert!(
        page.records.is_empty() && !page.more,
        "paced: no new cycle yet"
    );

    let out = s
        .conn
        .push(&[item(
            1,
            None,
            json!({"company": "Created By Us", "website": "https://us.example"}),
        )])
        .await
        .expect("push");
    assert!(
        matches!(&out[0], PushOutcome::Written { vendor_id, created: true } if vendor_id == "12345728"),
        "{out:?}"
    );
    // The pushed id starts the next cycle at once, pause or not.
    let cursor = cycle(&s.conn, cursor, &mut seen, &|| {}).await;
    assert_eq!(seen.len(), 51, "the 50 and ours: {:?}", seen.keys());
    // Once only: the next cycle keeps to its pause.
    let before = s.sim.stats().total_requests();
    let page = s.conn.poll(&cursor, &PollMode::Incremental).await.unwrap();
    assert!(page.records.is_empty() && !page.more);
    assert_eq!(
        s.sim.stats().total_requests(),
        before,
        "no call while paced"
    );
}

#[tokio::test]
async fn after_a_restart_the_ids_the_store_links_are_probed() {
    // The pushed-id hint is gone with the process; the store still links a company of
    // this instance (created by us before the restart), and the probe uses its id.
    let s = far_id_setup(50).await;
    let tx = s.store.begin_write().unwrap();
    tx.put_link("marketo", "12345700", "canon-1").unwrap();
    tx.commit().unwrap();
    let mut seen = HashMap::new();
    cycle(&s.conn, Cursor::start(), &mut seen, &|| {}).await;
    assert_eq!(
        seen.len(),
        50,
        "found from the linked id: {:?}",
        seen.keys()
    );
}

#[tokio::test]
async fn a_pushed_id_that_leads_nowhere_starts_one_early_cycle_only() {
    let s = far_id_setup(0).await;
    let mut seen = HashMap::new();
    let cursor = cycle(&s.conn, Cursor::start(), &mut seen, &|| {}).await;
    let out = s
        .conn
        .push(&[item(1, None, json!({"company": "Gone Soon"}))])
        .await
        .expect("push");
    assert!(matches!(
        &out[0],
        PushOutcome::Written { created: true, .. }
    ));
    assert!(
        s.sim.delete(12_345_678),
        "the created company is deleted again"
    );
    let calls = || s.sim.stats().total_requests();

    let before = calls();
    let cursor = cycle(&s.conn, cursor, &mut seen, &|| {}).await;
    assert!(calls() > before, "the hint started a cycle at once");
    assert!(seen.is_empty());

    let before = calls();
    let page = s.conn.poll(&cursor, &PollMode::Incremental).await.unwrap();
    assert!(page.records.is_empty() && !page.more);
    assert_eq!(
        calls(),
        before,
        "the same hint does not start another cycle"
    );
}

#[tokio::test]
async fn reading_and_writing_at_default_limits_draws_no_rejections() {
    let s = setup(
        2000,
        MarketoSimConfig::default(),
        limits(100, Duration::from_secs(20), Some(50_000), 0.5),
        MarketoOptions::default(),
    )
    .await;
    let mut seen = HashMap::new();
    cycle(&s.conn, Cursor::start(), &mut seen, &|| {}).await;
    assert_eq!(seen.len(), 2000, "every company read once");

    // 2,000 writes in batches of 100, ten at a time: updates of linked companies and creates.
    let mut batches = Vec::new();
    for b in 0..20 {
        let items: Vec<PushItem> = (0..100)
            .map(|k| {
                let n = b * 100 + k;
                if n % 2 == 0 {
                    item(
                        n,
                        Some((1000 + n).to_string()),
                        json!({"industry": format!("I{n}")}),
                    )
                } else {
                    item(
                        n,
                        None,
                        json!({"company": format!("New {n}"), "website": "https://new.example"}),
                    )
                }
            })
            .collect();
        batches.push(items);
    }
    let results = futures::future::join_all(batches.iter().map(|b| s.conn.push(b))).await;
    for r in results {
        let outcomes = r.expect("push");
        let bad: Vec<_> = outcomes
            .iter()
            .filter(|o| !matches!(o, PushOutcome::Written { .. }))
            .collect();
        assert!(bad.is_empty(), "not written: {bad:?}");
    }
    let stats = s.sim.stats();
    assert!(
        stats.rejections.is_empty(),
        "limit rejections: {:?}",
        stats.rejections
    );
}

#[tokio::test]
async fn a_tiny_daily_share_paces_cycles_and_never_exceeds_the_budget() {
    // Budget: floor(50,000 × 0.0006) = 30 calls; reads may use 15 a day.
    let s = setup(
        2000,
        MarketoSimConfig::default(),
        limits(1000, Duration::from_secs(20), Some(50_000), 0.0006),
        MarketoOptions::default(),
    )
    .await;
    let mut seen = HashMap::new();
    let cursor = cycle(&s.conn, Cursor::start(), &mut seen, &|| {}).await;
    assert_eq!(seen.len(), 2000);
    let used = s.sim.calls_today();

    let page = s
        .conn
        .poll(&cursor, &PollMode::Incremental)
        .await
        .expect("paced poll");
    assert!(
        !page.more && page.records.is_empty(),
        "a paced poll reads nothing"
    );
    assert_eq!(page.next, cursor, "a paced poll keeps the cursor");
    assert_eq!(s.sim.calls_today(), used, "a paced poll makes no call");

    // Writes spend the rest of the budget, then the client refuses to call.
    let mut suspended = None;
    for n in 0..40 {
        match s.conn.push(&[item(n, None, json!({"company": "X"}))]).await {
            Ok(_) => {}
            Err(e) => {
                suspended = Some(e);
                break;
            }
        }
    }
    assert!(
        matches!(suspended, Some(ConnectorError::Suspended { .. })),
        "budget exhaustion suspends: {suspended:?}"
    );
    assert!(
        s.sim.calls_today() <= 30,
        "calls today {} exceed the budget of 30",
        s.sim.calls_today()
    );
    assert!(s.conn.http_metrics().quota_used_today <= 30);
}

#[tokio::test]
#[ignore = "benchmark: 20k companies at Marketo's default limits (~1 min); run with --ignored --nocapture"]
async fn bench_marketo_20k() {
    let s = setup(
        20_000,
        MarketoSimConfig::default(),
        limits(100, Duration::from_secs(20), Some(50_000), 0.5),
        MarketoOptions::default(),
    )
    .await;
    let allowed = 100.0 / 20.0;
    let t = Instant::now();
    let calls0 = s.conn.http_metrics().calls;
    let mut seen = HashMap::new();
    cycle(&s.conn, Cursor::start(), &mut seen, &|| {}).await;
    let read_s = t.elapsed().as_secs_f64();
    let read_calls = s.conn.http_metrics().calls - calls0;
    assert_eq!(seen.len(), 20_000);

    let t = Instant::now();
    let batches: Vec<Vec<PushItem>> = (0..20_000)
        .collect::<Vec<_>>()
        .chunks(300)
        .map(|c| {
            c.iter()
                .map(|&n| {
                    item(
                        n,
                        Some((1000 + n).to_string()),
                        json!({"industry": format!("B{n}")}),
                    )
                })
                .collect()
        })
        .collect();
    let calls1 = s.conn.http_metrics().calls;
    let results = futures::future::join_all(batches.iter().map(|b| s.conn.push(b))).await;
    let write_s = t.elapsed().as_secs_f64();
    let write_calls = s.conn.http_metrics().calls - calls1;
    let written = results
        .into_iter()
        .flat_map(|r| r.expect("push"))
        .filter(|o| matches!(o, PushOutcome::Written { .. }))
        .count();
    let total_calls = (read_calls + write_calls) as f64;
    let rate = total_calls / (read_s + write_s);
    println!(
        "bench_marketo_20k: read 20000 in {read_s:.1}s ({read_calls} calls), wrote {written} in {write_s:.1}s ({write_calls} calls); \
         {rate:.2} calls/s of {allowed} allowed = {:.0}%; rejections {:?}",
        rate / allowed * 100.0,
        s.sim.stats().rejections
    );
    assert_eq!(written, 20_000);
    assert!(s.sim.stats().rejections.is_empty());
}

#[tokio::test]
async fn records_about_to_be_written_are_read_by_id_in_one_call() {
    let s = setup(
        20,
        MarketoSimConfig::default(),
        limits(100, Duration::from_secs(20), None, 1.0),
        MarketoOptions::default(),
    )
    .await;
    let all = s.sim.dump();
    let id_of = |r: &Value| r["id"].as_i64().unwrap().to_string();
    let wanted = vec![
        id_of(&all[3]),
        id_of(&all[11]),
        // Gone, and not a Marketo id at all: neither is an error.
        "999999999".to_string(),
        "not-an-id".to_string(),
    ];
    s.sim.update(
        all[11]["id"].as_i64().unwrap(),
        json!({"mainPhone": "+1 555 0199"}),
    );
    s.sim.reset_stats();
    let page = s.conn.read_by_ids(&wanted).await.expect("read");
    let got: Vec<&str> = page.records.iter().map(|r| r.vendor_id.as_str()).collect();
    assert_eq!(got, [wanted[0].as_str(), wanted[1].as_str()]);
    assert_eq!(page.records[1].fields["mainPhone"], json!("+1 555 0199"));
    assert_eq!(s.sim.stats().total_requests(), 1);
    assert_eq!(
        s.conn.pre_write_read(),
        crate::connector::PreWriteRead::ById
    );
}

#[tokio::test]
async fn an_update_left_with_nothing_a_sync_may_set_makes_no_call() {
    let s = setup(
        5,
        MarketoSimConfig::default(),
        limits(100, Duration::from_secs(20), None, 1.0),
        MarketoOptions::default(),
    )
    .await;
    let all = s.sim.dump();
    let id = all[0]["id"].as_i64().unwrap().to_string();
    s.sim.reset_stats();
    // A partial update whose one changed key is externalCompanyId, which an update never
    // sets.
    let out = s
        .conn
        .push(&[item(
            1,
            Some(id.clone()),
            json!({"externalCompanyId": "x-1"}),
        )])
        .await
        .expect("push");
    assert_eq!(
        out,
        [PushOutcome::Written {
            vendor_id: id.clone(),
            created: false
        }]
    );
    assert_eq!(s.sim.stats().total_requests(), 0);
}
