//! The one-shot commands as a user runs them: `check`, `backfill` (dry run, real,
//! repeated), `dead-letters list | retry | drop`, and `backfill` refusing while the daemon
//! holds the store.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn crmbridge(args: &[&str], config: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crmbridge"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run crmbridge")
}

/// A cluster of `companies` at ×10 the vendor limits, and its config (poll 1 s): the
/// commands are the subject here, not the limits (Marketo's first discovery alone costs
/// 40 calls, 8 s at its real limit, in every backfill).
async fn scaled_cluster(
    companies: usize,
    dir: &std::path::Path,
    listen: Option<std::net::SocketAddr>,
) -> (crmbridge::sim::cluster::SimCluster, std::path::PathBuf) {
    let cfg = crmbridge::sim::cluster::ClusterConfig {
        companies,
        limit_scale: 10,
        ..Default::default()
    };
    cluster_and_config(&cfg, dir, "1s", listen).await
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Write requests a simulator received (every non-GET request except Marketo's
/// `_method=GET` queries, should one be made, and identity calls).
fn writes(s: &crmbridge::sim::common::StatsSnapshot) -> u64 {
    s.requests
        .iter()
        .filter(|(k, _)| {
            !k.starts_with("GET ") && !k.contains("_method") && !k.contains("/identity/")
        })
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_says_where_a_rule_naming_a_missing_field_is() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path) = scaled_cluster(3, dir.path(), None).await;
    let with_rule = dir.path().join("rule.toml");
    let mut src = std::fs::read_to_string(&path).unwrap();
    src.push_str(
        "\n[[connectors.marketo.mapping.fields]]\ncanonical = \"custom.segment\"\n\
         vendor = \"segmentNoSuchField\"\n",
    );
    let line = src.lines().count();
    std::fs::write(&with_rule, &src).unwrap();
    let out = crmbridge(&["check", "--online"], &with_rule);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(2), "{shown}");
    let problem = shown
        .lines()
        .find(|l| l.contains("segmentNoSuchField"))
        .unwrap_or_else(|| panic!("no problem reported:\n{shown}"));
    assert!(
        problem.starts_with(&format!(
            "{}:{line}:10: connectors.marketo.mapping.fields[",
            with_rule.display()
        )) && problem
            .contains("].vendor: mapped vendor field \"segmentNoSuchField\" does not exist"),
        "{problem}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accepts_a_valid_config_and_rejects_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path) = scaled_cluster(3, dir.path(), None).await;
    let ok = crmbridge(&["check"], &path);
    assert!(ok.status.success(), "{}", text(&ok));
    let broken = dir.path().join("broken.toml");
    let src = std::fs::read_to_string(&path)
        .unwrap()
        .replace("poll_interval = \"1s\"", "poll_intervall = \"1s\"");
    std::fs::write(&broken, src).unwrap();
    let bad = crmbridge(&["check"], &broken);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    let out = text(&bad);
    assert!(out.contains("broken.toml:"), "{out}");
    assert!(out.contains("unknown key `poll_intervall`"), "{out}");
    assert!(
        out.matches("poll_intervall").count() >= 3,
        "all three errors listed: {out}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_dry_run_writes_nothing_then_backfill_syncs_and_a_rerun_finds_nothing_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path) = scaled_cluster(12, dir.path(), None).await;

    let dry = crmbridge(&["backfill", "--dry-run"], &path);
    let out = text(&dry);
    assert!(dry.status.success(), "{out}");
    assert!(out.contains("would create"), "{out}");
    let total_writes = writes(&cluster.rally.stats())
        + writes(&cluster.marketo.stats())
        + writes(&cluster.amocrm.stats());
    assert_eq!(total_writes, 0, "dry run wrote to a CRM: {out}");
    // Nor does it leave companies or queued pushes in the store (it ran on a copy).
    {
        let store = crmbridge::store::Store::open(&dir.path().join("crmbridge.redb")).unwrap();
        let tx = store.begin_read().unwrap();
        assert_eq!(
            tx.company_count().unwrap(),
            0,
            "dry run kept companies: {out}"
        );
        for t in ["rally", "marketo", "amocrm"] {
            assert_eq!(tx.outbox_len(t).unwrap(), 0, "dry run queued pushes: {out}");
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("dry-run"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let real = crmbridge(&["backfill"], &path);
    let out = text(&real);
    assert!(real.status.success(), "{out}");
    assert!(out.contains("written"), "{out}");
    assert_converged(&crm_views(&path).await);

    let before = (
        writes(&cluster.rally.stats()),
        writes(&cluster.marketo.stats()),
        writes(&cluster.amocrm.stats()),
    );
    let again = crmbridge(&["backfill"], &path);
    assert!(again.status.success(), "{}", text(&again));
    let after = (
        writes(&cluster.rally.stats()),
        writes(&cluster.marketo.stats()),
        writes(&cluster.amocrm.stats()),
    );
    assert_eq!(
        before,
        after,
        "a second backfill wrote again: {}",
        text(&again)
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_record_can_be_listed_retried_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path) = scaled_cluster(3, dir.path(), None).await;
    // Marketo's company names hold 255 characters, and a name is never left out of a
    // write (unlike a value a CRM cannot hold in another field): Marketo rejects it.
    let name = format!("Odd Name {}", "Ltd ".repeat(70));
    cluster.rally.create(json!({
        "name": name, "domain": "odd-name.example.org",
        "website": "https://odd-name.example.org"
    }));
    // A street longer than Marketo's field holds only leaves the street out.
    cluster.rally.create(json!({
        "name": "Long Street Ltd", "domain": "long-street.example.org",
        "address": "Long ".repeat(60)
    }));
    let run = crmbridge(&["backfill"], &path);
    assert_eq!(
        run.status.code(),
        Some(1),
        "a rejection must fail the exit status: {}",
        text(&run)
    );
    assert!(
        text(&run).contains("1 of them without a value marketo cannot hold"),
        "{}",
        text(&run)
    );

    let list = crmbridge(&["dead-letters", "list"], &path);
    let out = text(&list);
    assert!(list.status.success(), "{out}");
    assert!(out.contains("marketo"), "{out}");
    assert!(
        out.contains("maximum length"),
        "vendor reason missing: {out}"
    );
    let id = out
        .lines()
        .find(|l| l.contains("marketo"))
        .and_then(|l| l.trim_start_matches('#').split_whitespace().next())
        .expect("an id")
        .to_string();

    let retry = crmbridge(&["dead-letters", "retry", &id], &path);
    assert!(
        text(&retry).contains("queued for marketo"),
        "{}",
        text(&retry)
    );
    // The retry fails the same way and lands in the dead letters again.
    crmbridge(&["backfill"], &path);
    let drop = crmbridge(&["dead-letters", "drop", "--all"], &path);
    assert!(drop.status.success(), "{}", text(&drop));
    let list = crmbridge(&["dead-letters", "list"], &path);
    assert!(text(&list).contains("no dead letters"), "{}", text(&list));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_refuses_while_the_daemon_holds_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (cluster, path) = scaled_cluster(3, dir.path(), Some(listen)).await;
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_crmbridge"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Ready once the endpoint answers (the store is open by then).
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("http://{listen}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "daemon did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = crmbridge(&["backfill"], &path);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("stop it first"), "no advice in: {t}");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_commands_do_not_create_a_missing_store() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path) = scaled_cluster(0, dir.path(), None).await;
    let store = dir.path().join("crmbridge.redb");
    // They call no CRM: a secret they cannot fetch does not stop them.
    let text_of = std::fs::read_to_string(&path).unwrap();
    let start = text_of.find("api_key = ").unwrap();
    let end = start + text_of[start..].find('\n').unwrap();
    let unset = format!(
        "{}api_key = {{ env = \"CRMBRIDGE_TEST_UNSET_VAR\" }}{}",
        &text_of[..start],
        &text_of[end..]
    );
    let no_secrets = dir.path().join("no-secrets.toml");
    std::fs::write(&no_secrets, unset).unwrap();
    for args in [&["status"][..], &["dead-letters", "list"][..]] {
        let out = crmbridge(args, &no_secrets);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("no store at"),
            "{args:?}: {}",
            text(&out)
        );
        assert!(!store.exists(), "{args:?} created the store");
    }
    // A connector name that is not configured is a usage error, before any sign-in.
    let typo = crmbridge(&["backfill", "--connector", "salesforce"], &path);
    assert_eq!(typo.status.code(), Some(2), "{}", text(&typo));
    assert!(
        text(&typo).contains("no such enabled connector"),
        "{}",
        text(&typo)
    );
    assert!(!store.exists(), "backfill with a typo created the store");
    cluster.shutdown().await;
}
