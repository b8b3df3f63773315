//! Staying within vendor limits under sustained load: amoCRM's 7 requests per second (more
//! than 20 rejections a minute ban the account) while hundreds of small batches are
//! pushed and a mutator edits every CRM, and Marketo's daily quota, of which crmbridge may
//! spend only its configured share before it suspends itself.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use crmbridge::config::Config;
use crmbridge::daemon::metrics::Metrics;
use crmbridge::daemon::service::{build_engine, open_store};
use crmbridge::engine::{BackfillOptions, Engine};
use crmbridge::sim::amocrm::{AmoSim, AmoSimConfig};
use crmbridge::sim::cluster::SimCluster;
use crmbridge::sim::marketo::{MarketoSim, MarketoSimConfig};
use crmbridge::sim::rally::{RallySim, RallySimConfig};
use tokio_util::sync::CancellationToken;

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// Rally holds `rally_companies`, Marketo and amoCRM start empty; the simulators keep
/// their vendor-default limits except Marketo's daily quota.
async fn start_sims(rally_companies: usize, marketo_daily_quota: u64) -> SimCluster {
    let rally = RallySim::start(
        loopback(),
        RallySimConfig {
            seed_indices: (0..rally_companies).collect(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let marketo = MarketoSim::start(
        loopback(),
        MarketoSimConfig {
            seed_indices: Vec::new(),
            daily_quota: marketo_daily_quota,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let amocrm = AmoSim::start(
        loopback(),
        AmoSimConfig {
            seed_indices: Vec::new(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    SimCluster {
        rally,
        marketo,
        amocrm,
        limit_scale: 1,
    }
}

/// The cluster's generated two-way config with `amo_extra` appended to the amoCRM
/// connector table and Marketo's `limits` line replaced by `marketo_limits`.
fn config(c: &SimCluster, dir: &Path, amo_extra: &str, marketo_limits: &str) -> PathBuf {
    let text = c.sync_config(dir, "1s", None).unwrap();
    let text = text.replace(
        "poll_interval = \"1s\"\n\n[connectors.amocrm.auth]",
        &format!("poll_interval = \"1s\"\n{amo_extra}\n\n[connectors.amocrm.auth]"),
    );
    let (head, tail) = text.split_once("limits = { daily_quota").unwrap();
    let tail = tail.split_once('\n').unwrap().1;
    let text = format!("{head}{marketo_limits}\n{tail}");
    assert!(text.contains(amo_extra), "{text}");
    let path = dir.join("crmbridge.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn outbox_total(engine: &Engine) -> u64 {
    let tx = engine.store().begin_read().unwrap();
    CRMS.iter().map(|c| tx.outbox_len(c).unwrap()).sum()
}

fn pushed(m: &Metrics) -> f64 {
    CRMS.iter()
        .map(|c| {
            m.get("crmbridge_records_pushed_total", &[("connector", c)])
                .unwrap_or(0.0)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_pushes_to_amocrm_stay_under_its_rate_limit_and_never_get_banned() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(start_sims(600, 20_000_000).await);
    let path = config(
        &cluster,
        dir.path(),
        "batch_size = 10",
        "limits = { daily_quota = 20000000, daily_share = 0.5 }",
    );
    let cfg = Config::load(&path).unwrap();
    let metrics = Arc::new(Metrics::new());
    let engine = build_engine(&cfg, open_store(&cfg).unwrap(), metrics.clone())
        .await
        .unwrap();
    let sd = CancellationToken::new();
    let report = engine
        .backfill(&BackfillOptions::default(), &sd, &|_, _| {})
        .await
        .unwrap();
    assert!(
        report.failures.is_empty(),
        "backfill failed: {:?}",
        report.failures
    );
    assert_eq!(
        cluster.amocrm.dump().len(),
        600,
        "backfill pushed all to amoCRM"
    );

    // The daemon's loops run on while a mutator creates and edits in every CRM.
    let handle = engine.start(sd.clone());
    let mut mutator = TestMutator::new();
    for _ in 0..30 {
        mutator.step(&cluster);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Settled: the outboxes are empty and nothing was pushed for 2 s.
    let mut last = (pushed(&metrics), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = pushed(&metrics);
        if now != last.0 || outbox_total(&engine) > 0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(2) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "did not settle: outbox {}",
            outbox_total(&engine)
        );
    }
    sd.cancel();
    handle.wait().await;

    let amo = cluster.amocrm.stats();
    assert!(
        !cluster.amocrm.is_banned(),
        "amoCRM banned the client: {amo:?}"
    );
    assert_eq!(
        amo.rejections.get("429").copied().unwrap_or(0),
        0,
        "amoCRM answered 429: {amo:?}"
    );
    assert_eq!(
        amo.rejections.get("403-ban").copied().unwrap_or(0),
        0,
        "amoCRM answered 403 (ban): {amo:?}"
    );
    // The load really was sustained: at least one call per batch of 10.
    assert!(amo.total_requests() >= 60, "only {amo:?}");
    let views = crm_views(&path).await;
    assert_converged(&views);
    assert_expectations(&views, &mutator.expect);
    eprintln!(
        "amoCRM: {} requests, {:?} total",
        amo.total_requests(),
        started.elapsed()
    );
    match Arc::try_unwrap(cluster) {
        Ok(c) => c.shutdown().await,
        Err(_) => panic!("cluster still shared"),
    }
}

fn metric(text: &str, name: &str, connector: &str) -> Option<f64> {
    let prefix = format!("{name}{{connector=\"{connector}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketo_spends_only_its_share_of_the_daily_quota_then_suspends() {
    const BUDGET: u64 = 150; // daily_quota 300 × daily_share 0.5
    let dir = tempfile::tempdir().unwrap();
    // 400 companies in batches of 2 are 200 pushes: more than the budget allows.
    let cluster = start_sims(400, 300).await;
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let path = config(
        &cluster,
        dir.path(),
        "",
        "batch_size = 2\nlimits = { daily_quota = 300, daily_share = 0.5 }",
    );
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("listen = false", &format!("listen = \"{listen}\""));
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_crmbridge"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "crmbridge=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let scrape = || async {
        let r = client
            .get(format!("http://{listen}/metrics"))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut max_seen = 0;
    loop {
        max_seen = max_seen.max(cluster.marketo.calls_today());
        assert!(
            max_seen <= BUDGET,
            "Marketo saw {max_seen} calls, budget {BUDGET}"
        );
        if let Ok(Some(s)) = child.try_wait() {
            panic!("daemon exited early: {s}");
        }
        let text = scrape().await.unwrap_or_default();
        if metric(&text, "crmbridge_suspended", "marketo") == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Marketo never suspended: {} calls today\n{text}",
            cluster.marketo.calls_today()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Suspended. Calls already charged to the budget before it ran out (at most
    // `max_concurrent`, waiting for the rate limiter) still go out; then the loops keep
    // running but no further call reaches Marketo.
    let suspended_at = cluster.marketo.calls_today();
    let mut at_suspension = suspended_at;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = cluster.marketo.calls_today();
        if now == at_suspension {
            break;
        }
        at_suspension = now;
        assert!(Instant::now() < deadline, "calls never stopped: {now}");
    }
    assert!(
        at_suspension - suspended_at <= 10,
        "{} calls after the suspension, more than were in flight",
        at_suspension - suspended_at
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = cluster.marketo.calls_today();
    let text = scrape().await.expect("metrics");
    let out = Command::new(env!("CARGO_BIN_EXE_crmbridge"))
        .args(["status", "--json", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "exit {exit}");

    assert!(
        calls <= BUDGET,
        "Marketo saw {calls} calls, budget {BUDGET}"
    );
    assert_eq!(calls, at_suspension, "calls went on while suspended");
    assert_eq!(
        metric(&text, "crmbridge_quota_used", "marketo"),
        Some(calls as f64),
        "{text}"
    );
    assert_eq!(
        metric(&text, "crmbridge_quota_left", "marketo"),
        Some((BUDGET - calls) as f64),
        "{text}"
    );
    assert_eq!(
        metric(&text, "crmbridge_suspended", "marketo"),
        Some(1.0),
        "{text}"
    );
    let until = metric(
        &text,
        "crmbridge_suspended_until_timestamp_seconds",
        "marketo",
    )
    .unwrap_or(0.0);
    assert!(
        until > chrono::Utc::now().timestamp() as f64,
        "suspended until {until}\n{text}"
    );
    // A suspended connector is a problem `status` reports, with exit status 1.
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mk = status["connectors"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "marketo"))
        .unwrap_or_else(|| panic!("no marketo in {status}"))
        .clone();
    assert_eq!(mk["quota_used_today"].as_u64(), Some(calls), "{mk}");
    assert_eq!(mk["quota_budget"].as_u64(), Some(BUDGET), "{mk}");
    assert!(mk["suspended_until"].is_string(), "{mk}");
    assert!(
        status["problems"]
            .to_string()
            .contains("marketo: suspended"),
        "{status}"
    );
    let st = cluster.marketo.stats();
    assert_eq!(
        st.rejections.get("607").copied().unwrap_or(0),
        0,
        "the instance's own quota was hit: {st:?}"
    );
    eprintln!("marketo: {calls} calls of budget {BUDGET}; {st:?}");
    cluster.shutdown().await;
}
