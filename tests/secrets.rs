//! Secrets never leak: the real binary runs at `RUST_LOG=trace` against the three
//! simulators with recognisable credentials, refreshes expired tokens mid-run, and is
//! asked for `/metrics`, `/healthz`, `/status` and `crmbridge status`; `check` is run
//! with an unreadable secret file. None of the configured secrets and none of the
//! tokens the simulators issued may appear anywhere the operator can see.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crmbridge::sim::amocrm::{AmoSim, AmoSimConfig};
use crmbridge::sim::marketo::{MarketoSim, MarketoSimConfig};
use crmbridge::sim::rally::{RallySim, RallySimConfig};

const RALLY_KEY: &str = "rk_SECRET_rally_7f3a";
const MK_CLIENT_ID: &str = "mk_client_SECRET_b81e";
const MK_SECRET: &str = "mk_SECRET_9c2d";
const AMO_CLIENT_SECRET: &str = "amo_SECRET_44e1";
const AMO_REFRESH_0: &str = "amo_SECRET_refresh_0";

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

struct Sims {
    rally: RallySim,
    marketo: MarketoSim,
    amocrm: AmoSim,
}

async fn start_sims() -> Sims {
    let rally = RallySim::start(
        loopback(),
        RallySimConfig {
            seed_indices: (0..20).collect(),
            api_key: RALLY_KEY.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let marketo = MarketoSim::start(
        loopback(),
        MarketoSimConfig {
            seed_indices: (10..30).collect(),
            client_id: MK_CLIENT_ID.into(),
            client_secret: MK_SECRET.into(),
            daily_quota: 1_000_000,
            variant: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let amocrm = AmoSim::start(
        loopback(),
        AmoSimConfig {
            seed_indices: (5..25).collect(),
            long_lived_token: None,
            client_secret: AMO_CLIENT_SECRET.into(),
            initial_refresh_token: AMO_REFRESH_0.into(),
            variant: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    Sims {
        rally,
        marketo,
        amocrm,
    }
}

/// Writes every secret into its own file in `dir` and a two-way config using them.
fn write_config(dir: &Path, sims: &Sims, listen: SocketAddr) -> std::path::PathBuf {
    let secret = |name: &str, value: &str| {
        let p = dir.join(name);
        std::fs::write(&p, value).unwrap();
        p.display().to_string()
    };
    let rally_key = secret("rally_api_key", RALLY_KEY);
    let mk_id = secret("marketo_client_id", MK_CLIENT_ID);
    let mk_secret = secret("marketo_client_secret", MK_SECRET);
    let amo_id = secret("amo_client_id", "amo-client-id");
    let amo_secret = secret("amo_client_secret", AMO_CLIENT_SECRET);
    let amo_refresh = secret("amo_refresh_token", AMO_REFRESH_0);
    let text = format!(
        r#"match_keys = ["domain", "externalCompanyId"]

[store]
path = "{store}"

[daemon]
listen = "{listen}"

[connectors.rally]
kind = "rally"
base_url = "{rally}"
api_key = {{ file = "{rally_key}" }}
poll_interval = "1s"

[connectors.marketo]
kind = "marketo"
base_url = "{marketo}"
client_id = {{ file = "{mk_id}" }}
client_secret = {{ file = "{mk_secret}" }}
poll_interval = "1s"
limits = {{ daily_quota = 1000000, daily_share = 0.5 }}

[connectors.amocrm]
kind = "amocrm"
base_url = "{amocrm}"
poll_interval = "1s"

[connectors.amocrm.auth]
type = "oauth"
client_id = {{ file = "{amo_id}" }}
client_secret = {{ file = "{amo_secret}" }}
redirect_uri = "https://crmbridge.example.com/oauth/amocrm"
refresh_token = {{ file = "{amo_refresh}" }}

[[flows]]
between = ["rally", "marketo", "amocrm"]
"#,
        store = dir.join("crmbridge.redb").display(),
        rally = sims.rally.base_url(),
        marketo = sims.marketo.base_url(),
        amocrm = sims.amocrm.base_url(),
    );
    let path = dir.join("crmbridge.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Every token-shaped string in `text` the simulators could have issued: amoCRM access
/// and refresh tokens (`amo-access-N-…`, `amo-refresh-N-…`) and Marketo access tokens
/// (`<uuid>:sj`). The simulators do not list the tokens they issued, but they mint
/// them only in these shapes, so finding the shape finds every one of them.
fn issued_token_shapes(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for kind in ["amo-access-", "amo-refresh-"] {
        for (i, _) in text.match_indices(kind) {
            let b = text.as_bytes();
            found.push(String::from_utf8_lossy(&b[i..(i + 40).min(b.len())]).into_owned());
        }
    }
    for (i, _) in text.match_indices(":sj") {
        if i >= 36 {
            let cand = &text.as_bytes()[i - 36..i];
            let uuid_like = cand.iter().enumerate().all(|(k, b)| {
                if [8, 13, 18, 23].contains(&k) {
                    *b == b'-'
                } else {
                    b.is_ascii_hexdigit()
                }
            });
            if uuid_like {
                found.push(text[i - 36..i + 3].to_string());
            }
        }
    }
    found
}

/// Panics naming `what` when `text` holds a secret or an issued token.
fn assert_clean(what: &str, text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(
            !text.contains(s.as_str()),
            "secret {s:?} appears in {what}:\n{}",
            excerpt(text, s)
        );
    }
    let tokens = issued_token_shapes(text);
    assert!(tokens.is_empty(), "issued tokens in {what}: {tokens:?}");
}

fn excerpt(text: &str, needle: &str) -> String {
    let i = text.find(needle).unwrap_or(0);
    let b = text.as_bytes();
    String::from_utf8_lossy(&b[i.saturating_sub(300)..(i + 300).min(b.len())]).into_owned()
}

async fn get(client: &reqwest::Client, url: String) -> Option<(u16, String)> {
    let r = client.get(url).send().await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_token_reaches_logs_metrics_status_or_check() {
    let sims = start_sims().await;
    let dir = tempfile::tempdir().unwrap();
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = write_config(dir.path(), &sims, listen);
    let log_path = dir.path().join("daemon.log");
    let out_path = dir.path().join("daemon.out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_crmbridge"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "trace")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let metrics_url = format!("http://{listen}/metrics");
    let mk_identity_calls = |m: &MarketoSim| -> u64 {
        m.stats()
            .requests
            .iter()
            .filter(|(k, _)| k.contains("/identity/"))
            .map(|(_, v)| v)
            .sum()
    };

    // Three rounds: wait until both token-based CRMs have signed in (again), then expire
    // every token they hold so the daemon has to refresh.
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut refresh_tokens_seen = vec![AMO_REFRESH_0.to_string()];
    let mut mk_signins = 0;
    for round in 0..3 {
        loop {
            assert!(
                Instant::now() < deadline,
                "round {round}: no fresh sign-in (amo refresh tokens {}, marketo identity calls {})",
                refresh_tokens_seen.len(),
                mk_identity_calls(&sims.marketo)
            );
            if let Ok(Some(s)) = child.try_wait() {
                panic!(
                    "daemon exited early: {s}\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let amo_now = sims.amocrm.current_refresh_token();
            if !refresh_tokens_seen.contains(&amo_now) {
                refresh_tokens_seen.push(amo_now);
            }
            let mk_now = mk_identity_calls(&sims.marketo);
            if refresh_tokens_seen.len() > round + 1 && mk_now > mk_signins {
                mk_signins = mk_now;
                break;
            }
        }
        // Let calls with the fresh tokens happen, then expire them.
        tokio::time::sleep(Duration::from_millis(500)).await;
        sims.marketo.expire_tokens();
        sims.amocrm.expire_access_tokens();
    }
    assert!(
        refresh_tokens_seen.len() >= 4,
        "amoCRM rotated its refresh token {} times",
        refresh_tokens_seen.len() - 1
    );

    // Everything the operator can look at while it runs.
    let mut visible = Vec::new();
    let (code, metrics) = get(&client, metrics_url.clone()).await.expect("metrics");
    assert_eq!(code, 200, "{metrics}");
    assert!(metrics.contains("crmbridge_http_calls_total"), "{metrics}");
    visible.push(("/metrics", metrics));
    let (_, health) = get(&client, format!("http://{listen}/healthz"))
        .await
        .expect("healthz");
    visible.push(("/healthz", health));
    let (code, status_ep) = get(&client, format!("http://{listen}/status"))
        .await
        .expect("status endpoint");
    assert_eq!(code, 200, "{status_ep}");
    visible.push(("/status", status_ep));
    for args in [
        &["status", "--config"][..],
        &["status", "--json", "--config"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_crmbridge"))
            .args(args)
            .arg(&config)
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{args:?} failed: {text}");
        assert!(text.contains("amocrm"), "{text}");
        visible.push(("crmbridge status", text));
    }

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit {status}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    // The trace log really is a trace log of the token traffic, or the check below
    // would prove nothing.
    assert!(log.contains("TRACE"), "no trace lines in the log");
    assert!(log.lines().count() > 100, "log too short:\n{log}");
    visible.push(("the daemon's stderr", log));
    visible.push((
        "the daemon's stdout",
        std::fs::read_to_string(&out_path).unwrap(),
    ));

    // `check` with one secret file unreadable and, separately, missing.
    let amo_secret_file = dir.path().join("amo_client_secret");
    let mk_secret_file = dir.path().join("marketo_client_secret");
    std::fs::remove_file(&mk_secret_file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&amo_secret_file, std::fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads a mode-0 file anyway; then only the missing file is the failure.
    let unreadable = std::fs::read(&amo_secret_file).is_err();
    let out = Command::new(env!("CARGO_BIN_EXE_crmbridge"))
        .args(["check", "--config"])
        .arg(&config)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "check must fail: {text}");
    assert!(text.contains("marketo_client_secret"), "{text}");
    if unreadable {
        assert!(text.contains("amo_client_secret"), "{text}");
    }
    visible.push(("crmbridge check", text));

    let mut secrets: Vec<String> = [RALLY_KEY, MK_CLIENT_ID, MK_SECRET, AMO_CLIENT_SECRET]
        .iter()
        .map(|s| s.to_string())
        .collect();
    secrets.extend(refresh_tokens_seen);
    secrets.push(sims.amocrm.current_refresh_token());
    for (what, text) in &visible {
        assert_clean(what, text, &secrets);
    }
    sims.rally.shutdown().await;
    sims.marketo.shutdown().await;
    sims.amocrm.shutdown().await;
}

#[test]
fn token_shape_detector_finds_both_simulators_token_formats() {
    let text = "x Bearer amo-access-3-0123456789abcdef y refresh=amo-refresh-4-fedcba9876543210 \
                access_token=0f8c2a4e-1b3d-4c5e-8f70-123456789abc:sj&batchSize=300";
    let found = issued_token_shapes(text);
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(issued_token_shapes("company ab:sj is fine, amo-client-id too").is_empty());
}

/// amoCRM's refresh tokens are single-use: `check --online` must not spend the one the
/// daemon will need. Without the daemon's store it does not sign in to amoCRM (OAuth);
/// with it, the rotated pair is kept there, where the daemon looks first.
#[tokio::test]
async fn check_online_never_spends_the_refresh_token_the_daemon_needs() {
    let sims = start_sims().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sims, loopback());
    let cfg = crmbridge::config::Config::load(&config).unwrap_or_else(|e| panic!("{e}"));

    let found = crmbridge::connectors::check_online(&cfg).await.unwrap();
    let amo = &found.iter().find(|(n, _)| n == "amocrm").unwrap().1;
    assert!(amo.problems.is_empty(), "{amo:?}");
    assert!(
        amo.notes.iter().any(|n| n.contains("not checked online")),
        "{amo:?}"
    );
    assert_eq!(sims.amocrm.current_refresh_token(), AMO_REFRESH_0);
    assert!(
        !cfg.store.path.exists(),
        "the check created the daemon's store"
    );

    // With the daemon's store present (and free), the check signs in and keeps the pair.
    drop(crmbridge::store::Store::open(&cfg.store.path).unwrap());
    let found = crmbridge::connectors::check_online(&cfg).await.unwrap();
    let amo = &found.iter().find(|(n, _)| n == "amocrm").unwrap().1;
    assert!(amo.problems.is_empty() && amo.notes.is_empty(), "{amo:?}");
    let rotated = sims.amocrm.current_refresh_token();
    assert_ne!(rotated, AMO_REFRESH_0);
    let store = crmbridge::store::Store::open(&cfg.store.path).unwrap();
    let kept = store.begin_read().unwrap().token("amocrm").unwrap();
    assert_eq!(
        kept.and_then(|t| t.refresh_token).as_deref(),
        Some(rotated.as_str())
    );
}
