//! Crash safety of the real binary: `crmbridge run` is killed with SIGKILL at random
//! moments, 20 times, while companies are created and edited in all three CRMs; after
//! the final restart every CRM converges with no lost update and no duplicate.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

fn start_daemon(config: &std::path::Path, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_crmbridge"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "crmbridge=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start crmbridge run")
}

/// Sum of a metric's values over all label sets in a Prometheus text exposition.
fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (cluster, path) = cluster_with_config(18, dir.path(), "1s", Some(listen)).await;
    let log = dir.path().join("daemon.log");
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261124);
    let mut mutator = TestMutator::new();

    for kill in 0..20 {
        let mut child = start_daemon(&path, &log);
        // The random moment: anywhere from start-up to mid-push.
        let alive_for = Duration::from_millis(rng.random_range(150..1500));
        let until = Instant::now() + alive_for;
        while Instant::now() < until {
            mutator.step(&cluster);
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "daemon exited on its own before kill {kill}: {status}\n{}",
                tail(&log)
            );
        }
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
    }

    // Final run, no more mutations: wait until the daemon's own metrics say it is idle
    // (empty outboxes, no push for a while), stop it with SIGTERM, then compare the CRMs.
    let mut child = start_daemon(&path, &log);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut last: Option<(f64, Instant)> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(Some(status)) = child.try_wait() {
            panic!("daemon exited: {status}\n{}", tail(&log));
        }
        assert!(Instant::now() < deadline, "did not settle\n{}", tail(&log));
        let Ok(resp) = client.get(format!("http://{listen}/metrics")).send().await else {
            continue;
        };
        let text = resp.text().await.unwrap_or_default();
        let (pushed, depth) = (
            sum_metric(&text, "crmbridge_records_pushed_total"),
            sum_metric(&text, "crmbridge_outbox_depth"),
        );
        let polled = CRMS.iter().all(|c| {
            text.contains(&format!(
                "crmbridge_last_successful_poll_timestamp_seconds{{connector=\"{c}\"}}"
            ))
        });
        match last {
            Some((p, since)) if p == pushed && depth == 0.0 && polled => {
                if since.elapsed() > Duration::from_secs(4) {
                    break;
                }
            }
            _ => last = Some((pushed, Instant::now())),
        }
    }
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let stopped = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            assert!(status.success(), "unclean exit {status}\n{}", tail(&log));
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(35),
            "did not stop within the grace period"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let views = crm_views(&path).await;
    assert_converged(&views);
    assert_expectations(&views, &mutator.expect);
    for (name, s) in [
        ("rally", cluster.rally.stats()),
        ("marketo", cluster.marketo.stats()),
        ("amocrm", cluster.amocrm.stats()),
    ] {
        assert_eq!(
            s.total_rejections(),
            0,
            "{name} rate-limit rejections: {s:?}"
        );
    }
    cluster.shutdown().await;
}
