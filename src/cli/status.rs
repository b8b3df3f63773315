//! `crmbridge status`: asks the running daemon's endpoint, or reads the store directly
//! when the daemon is stopped.

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{DateTime, Utc};

use crate::daemon::server::{StatusReport, status_report};
use crate::daemon::service::{connector_infos, open_store};

/// Arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The config file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `status`; exit 0 when healthy, 1 when not.
pub async fn run(args: StatusArgs) -> ExitCode {
    let Some(cfg) = super::load_without_secrets(&args.config) else {
        return ExitCode::from(2);
    };
    let report = match from_daemon(&cfg).await {
        Some(r) => r,
        None => {
            if let Some(missing) = super::missing_store(&cfg) {
                eprintln!("error: daemon endpoint not reachable and {missing}");
                return ExitCode::FAILURE;
            }
            let store = match open_store(&cfg) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: daemon endpoint not reachable and {e}");
                    return ExitCode::FAILURE;
                }
            };
            match status_report(
                &store,
                None,
                &connector_infos(&cfg),
                cfg.daemon.unhealthy_after,
                Utc::now(),
            ) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    super::quiet_on_closed_pipe();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print_table(&report);
    }
    if report.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn from_daemon(cfg: &crate::config::Config) -> Option<StatusReport> {
    let addr = cfg.daemon.listen?;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .ok()?;
    let resp = client
        .get(format!("http://{addr}/status"))
        .send()
        .await
        .ok()?;
    resp.json::<StatusReport>().await.ok()
}

fn print_table(r: &StatusReport) {
    println!(
        "daemon: {}   companies: {}   dead letters: {}   health: {}",
        if r.daemon_running {
            "running"
        } else {
            "stopped (read from the store)"
        },
        r.companies,
        r.dead_letters,
        if r.healthy { "ok" } else { "UNHEALTHY" }
    );
    println!(
        "{:<12} {:<8} {:>10} {:<22} {:>8} {:>14} {:<22}",
        "connector", "kind", "lag", "last success", "outbox", "calls today", "suspended until"
    );
    for c in &r.connectors {
        let lag = c
            .lag_seconds
            .map(|s| format!("{s:.0}s"))
            .unwrap_or_else(|| "-".into());
        let quota = match c.quota_budget {
            Some(b) => format!("{}/{}", c.quota_used_today, b),
            None => c.quota_used_today.to_string(),
        };
        let time = |t: Option<DateTime<Utc>>| {
            t.map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{:<12} {:<8} {:>10} {:<22} {:>8} {:>14} {:<22}",
            c.name,
            c.kind,
            lag,
            time(c.last_success),
            c.outbox_depth,
            quota,
            time(c.suspended_until)
        );
    }
    // Cursors are the connectors' own JSON (long): `--json` shows them.
    for p in &r.problems {
        println!("problem: {p}");
    }
}
