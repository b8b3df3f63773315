//! The real binary as an operator runs it: `crmbridge run` against the simulators, its
//! `/metrics` and `/healthz` checked against the simulators' own counts, `status` asked
//! while it runs, and a clean SIGTERM stop.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn metric(text: &str, name: &str, connector: &str) -> Option<f64> {
    let prefix = format!("{name}{{connector=\"{connector}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_status_match_the_simulators() {
    let dir = tempfile::tempdir().unwrap();
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // A long poll interval: after the first cycle and its pushes the daemon is idle, so
    // its counters and the simulators' can be compared exactly.
    let (cluster, path) = cluster_with_config(12, dir.path(), "10m", Some(listen)).await;
    let rally_seeded = cluster.rally.dump().len() as f64;
    let mut child = Command::new(env!("CARGO_BIN_EXE_crmbridge"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "crmbridge=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stable: Option<(String, Instant)> = None;
    let text = loop {
        assert!(Instant::now() < deadline, "daemon did not become idle");
        if let Ok(Some(s)) = child.try_wait() {
            panic!("daemon exited early: {s}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Ok(r) = client.get(format!("http://{listen}/metrics")).send().await else {
            continue;
        };
        let text = r.text().await.unwrap();
        let all_polled = CRMS.iter().all(|c| {
            metric(&text, "crmbridge_last_successful_poll_timestamp_seconds", c).is_some()
                && metric(&text, "crmbridge_outbox_depth", c) == Some(0.0)
        });
        // Idle = the HTTP call counters did not move for a second.
        let calls: String = CRMS
            .iter()
            .map(|c| format!("{:?}", metric(&text, "crmbridge_http_calls_total", c)))
            .collect();
        match &stable {
            Some((prev, since)) if *prev == calls && all_polled => {
                if since.elapsed() > Duration::from_secs(1) {
                    break text;
                }
            }
            _ => stable = Some((calls, Instant::now())),
        }
    };

    // Calls the daemon says it made = requests the simulators saw (identity calls of
    // Marketo go through a separate client that does not count against limits).
    let rally = cluster.rally.stats();
    let amo = cluster.amocrm.stats();
    let mk = cluster.marketo.stats();
    let mk_rest: u64 = mk
        .requests
        .iter()
        .filter(|(k, _)| !k.contains("/identity/"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        metric(&text, "crmbridge_http_calls_total", "rally"),
        Some(rally.total_requests() as f64),
        "rally: {rally:?}\n{text}"
    );
    assert_eq!(
        metric(&text, "crmbridge_http_calls_total", "amocrm"),
        Some(amo.total_requests() as f64),
        "amocrm: {amo:?}\n{text}"
    );
    assert_eq!(
        metric(&text, "crmbridge_http_calls_total", "marketo"),
        Some(mk_rest as f64),
        "marketo: {mk:?}\n{text}"
    );
    assert_eq!(
        rally.total_rejections() + amo.total_rejections() + mk.total_rejections(),
        0
    );
    // Everything Rally held at the start was read.
    let read = metric(&text, "crmbridge_records_read_total", "rally").unwrap();
    assert!(read >= rally_seeded, "read {read}\n{text}");
    assert_eq!(
        metric(&text, "crmbridge_quota_used", "marketo"),
        Some(mk_rest as f64)
    );

    let health = client
        .get(format!("http://{listen}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // `status` while the daemon runs (it holds the store: status asks the endpoint).
    let out = Command::new(env!("CARGO_BIN_EXE_crmbridge"))
        .args(["status", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("daemon: running"), "{stdout}");
    for c in CRMS {
        assert!(stdout.contains(c), "{c} missing from status:\n{stdout}");
    }
    assert!(
        !stdout.contains("rally-test-key"),
        "secret in status output"
    );

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "exit {}", out.status);
    let log = String::from_utf8_lossy(&out.stderr);
    for secret in ["rally-test-key", "marketo-secret", "amo-long-lived-token"] {
        assert!(!log.contains(secret), "secret {secret} in the log");
    }
    cluster.shutdown().await;
}
