//! `crmbridge backfill`: a one-shot full (or from-date) sync with a progress bar per
//! connector on a terminal and plain log lines otherwise.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use chrono::{DateTime, NaiveDate, Utc};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::daemon::metrics::Metrics;
use crate::daemon::service::{build_engine, open_store};
use crate::engine::{BackfillOptions, BackfillReport};

/// Arguments of `backfill`.
#[derive(Debug, clap::Args)]
pub struct BackfillArgs {
    /// The config file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Only read from this connector (repeatable; default all).
    #[arg(long = "connector")]
    pub connectors: Vec<String>,
    /// Only records updated on or after this date (YYYY-MM-DD) or time (RFC 3339).
    #[arg(long, value_parser = parse_since)]
    pub since: Option<DateTime<Utc>>,
    /// Write to no CRM; print would-create / would-update / unchanged / invalid per target.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc())
        .map_err(|_| format!("{s:?} is neither YYYY-MM-DD nor an RFC 3339 time"))
}

/// Runs `backfill`; exit 0 when nothing failed, 1 when something did, 2 on bad input.
pub async fn run(args: BackfillArgs) -> ExitCode {
    let Some(cfg) = super::load(&args.config) else {
        return ExitCode::from(2);
    };
    crate::daemon::logging::init(cfg.daemon.log_format);
    // Before anything signs in or opens the store: a typo is a usage error.
    let enabled: Vec<&str> = cfg
        .connectors
        .iter()
        .filter(|(_, c)| c.common().enabled)
        .map(|(n, _)| n.as_str())
        .collect();
    let unknown: Vec<&str> = args
        .connectors
        .iter()
        .map(String::as_str)
        .filter(|c| !enabled.contains(c))
        .collect();
    if !unknown.is_empty() {
        eprintln!(
            "error: --connector {}: no such enabled connector in {} (configured: {})",
            unknown.join(", "),
            args.config.display(),
            enabled.join(", ")
        );
        return ExitCode::from(2);
    }
    let store = match open_store(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            if !e.is_store_locked() {
                return ExitCode::FAILURE;
            }
            eprintln!(
                "hint: the daemon is probably running and holds the store; stop it first \
                 (systemctl stop crmbridge) — its own loops keep syncing meanwhile — \
                 then run backfill and start it again"
            );
            return ExitCode::FAILURE;
        }
    };
    // A dry run works on a copy of the store, deleted afterwards, so that it leaves no
    // companies or queued pushes behind; only what talking to the vendors changed (a
    // rotated amoCRM refresh token, quota counts) is copied back. The store stays open
    // (locked) meanwhile, so no daemon starts on it.
    let mut copy = None;
    let engine_store = if args.dry_run {
        match ScratchCopy::of(&store, &cfg.store.path) {
            Ok(c) => {
                let s = c.store.clone();
                copy = Some(c);
                s
            }
            Err(e) => {
                eprintln!("error: cannot copy the store for the dry run: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        store.clone()
    };
    let engine = match build_engine(&cfg, engine_store, std::sync::Arc::new(Metrics::new())).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    {
        let sd = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: finishing the current page; run backfill again to resume");
                sd.cancel();
            }
        });
    }
    let opts = BackfillOptions {
        sources: args.connectors.clone(),
        since: args.since,
        dry_run: args.dry_run,
    };
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let bars: Mutex<BTreeMap<String, ProgressBar>> = Mutex::new(BTreeMap::new());
    let on_page = |source: &str, st: &crate::engine::IngestStats| {
        if tty {
            let mut bars = bars.lock().unwrap();
            let bar = bars.entry(source.to_string()).or_insert_with(|| {
                let b = multi.add(ProgressBar::new_spinner());
                b.set_style(
                    ProgressStyle::with_template("{spinner} {prefix:>10} {pos} records read {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                b.set_prefix(source.to_string());
                b
            });
            bar.inc(st.read as u64);
            bar.set_message(format!("(+{} changed, {} invalid)", st.merged, st.dead));
        } else {
            tracing::info!(
                connector = source,
                read = st.read,
                merged = st.merged,
                dead = st.dead,
                "backfill page"
            );
        }
    };
    let result = engine.backfill(&opts, &shutdown, &on_page).await;
    for b in bars.lock().unwrap().values() {
        b.finish();
    }
    drop(engine);
    if let Some(copy) = copy.take()
        && let Err(e) = copy.finish()
    {
        eprintln!("error: cannot keep the dry run's tokens and quota counts in the store: {e}");
        return ExitCode::FAILURE;
    }
    match result {
        Ok(report) => {
            print_report(&report, args.dry_run);
            if shutdown.is_cancelled() {
                println!("interrupted: run the same command again to resume");
                return ExitCode::FAILURE;
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_report(r: &BackfillReport, dry_run: bool) {
    println!("read:");
    for (c, s) in &r.read {
        println!(
            "  {c:<12} {:>8} records, {:>8} changed, {:>6} new companies, {:>5} invalid",
            s.read, s.merged, s.created, s.dead
        );
    }
    if dry_run {
        println!("dry run (nothing written to any CRM nor kept in the store):");
        for (t, d) in &r.dry_run {
            println!(
                "  {t:<12} would create {:>7}, would update {:>7}, unchanged {:>7}, invalid {:>5}",
                d.would_create, d.would_update, d.unchanged, d.invalid
            );
        }
    } else {
        println!("written:");
        for (t, s) in &r.pushed {
            let pending = r.pending.get(t).copied().unwrap_or(0);
            println!(
                "  {t:<12} {:>8} written ({} created), {:>6} unchanged, {:>5} rejected, {:>5} pending",
                s.written, s.created, s.skipped, s.rejected, pending
            );
            if s.left_out > 0 {
                println!(
                    "  {:<12} {:>8} of them without a value {t} cannot hold (see `dead-letters list`)",
                    "", s.left_out
                );
            }
        }
    }
    for t in &r.never_read {
        let pending = r.pending.get(t).copied().unwrap_or(0);
        println!(
            "  {t:<12} not written: never read in full yet, so creates could duplicate its \
             companies; {pending} pending for the daemon, which reads it first"
        );
    }
    for (c, e) in &r.failures {
        println!("FAILED {c}: {e}");
    }
}

/// A copy of the store next to it (`<store>.dry-run`) for a dry run, deleted when
/// dropped; what talking to the vendors changed in it goes back to the real store then
/// (or by [`ScratchCopy::finish`], which reports a failure), whichever way the run ends.
struct ScratchCopy {
    store: std::sync::Arc<crate::store::Store>,
    real: std::sync::Arc<crate::store::Store>,
    path: PathBuf,
    /// The vendor state went back already.
    done: bool,
}

impl ScratchCopy {
    /// Copies the store `real` at `path`, which the caller holds open with no transaction
    /// running: the file is at rest, and no other process can write it meanwhile.
    fn of(
        real: &std::sync::Arc<crate::store::Store>,
        path: &std::path::Path,
    ) -> Result<Self, String> {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".dry-run");
        let copy = path.with_file_name(name);
        let _ = std::fs::remove_file(&copy);
        std::fs::copy(path, &copy).map_err(|e| format!("{}: {e}", copy.display()))?;
        match crate::store::Store::open(&copy) {
            Ok(store) => Ok(ScratchCopy {
                store: std::sync::Arc::new(store),
                real: real.clone(),
                path: copy,
                done: false,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&copy);
                Err(e.to_string())
            }
        }
    }

    /// Copies the vendor state back now, reporting a failure.
    fn finish(mut self) -> Result<(), crate::store::StoreError> {
        self.done = true;
        self.real.take_vendor_state_from(&self.store)
    }
}

impl Drop for ScratchCopy {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: the run ended early (a rotated token must not be lost).
            let _ = self.real.take_vendor_state_from(&self.store);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
