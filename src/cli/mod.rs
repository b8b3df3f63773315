//! Command-line interface: parses arguments with clap and dispatches to the subcommands.

mod backfill;
mod dead_letters;
mod demo;
mod sim;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

/// Keeps company records in sync across Rally, Marketo and amoCRM.
#[derive(Debug, Parser)]
#[command(name = "crmbridge", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a config file and its mapping rules; exit 0 when valid, 2 when not.
    Check {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Also connect to each CRM: check credentials and that mapped fields exist.
        #[arg(long)]
        online: bool,
    },
    /// Run the sync daemon until SIGTERM/SIGINT.
    Run {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// One-shot full sync (or from a date), ignoring the daemon's cursors; resumable.
    Backfill(backfill::BackfillArgs),
    /// Show per-connector cursor, lag, outbox, dead letters, quota and bans.
    Status(status::StatusArgs),
    /// List, retry or drop dead letters.
    DeadLetters(dead_letters::DeadLetterArgs),
    /// Start the built-in Rally, Marketo and amoCRM simulators on loopback.
    Sim(sim::SimArgs),
    /// One command, no CRM account: simulators, backfill, live sync, and a report.
    Demo(demo::DemoArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Check { config, online } => check(config, online).await,
        Command::Run { config } => {
            let Some(cfg) = load(&config) else {
                return ExitCode::from(2);
            };
            crate::daemon::logging::init(cfg.daemon.log_format);
            match crate::daemon::service::run(cfg, Default::default()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "crmbridge stopped");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Backfill(args) => backfill::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::DeadLetters(args) => dead_letters::run(args),
        Command::Sim(args) => sim::run(args).await,
        Command::Demo(args) => demo::run(args).await,
    }
}

/// Loads a config, printing every error; `None` when invalid.
pub(crate) fn load(path: &std::path::Path) -> Option<Config> {
    match Config::load(path) {
        Ok(c) => Some(c),
        Err(errs) => {
            eprintln!("{errs}");
            None
        }
    }
}

/// Lets a listing piped into a reader that stops early (`| head`) end quietly, as
/// command-line tools do, instead of panicking in `println!`: Rust ignores SIGPIPE, so
/// the write fails with EPIPE. Only for listing commands; the daemon keeps ignoring it.
pub(crate) fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition has no preconditions, and no
    // other thread of this short-lived command installs handlers.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The error a command reading the store gives when there is none (it never creates one:
/// a mistyped `store.path` must not look like an empty, healthy store).
pub(crate) fn missing_store(cfg: &Config) -> Option<String> {
    (!cfg.store.path.exists()).then(|| {
        format!(
            "no store at {}: the daemon has not run yet, or store.path points elsewhere",
            cfg.store.path.display()
        )
    })
}

/// [`load`] for a command that calls no CRM (`status`, `dead-letters`): the secrets are
/// not fetched, so it runs without the daemon's credentials.
pub(crate) fn load_without_secrets(path: &std::path::Path) -> Option<Config> {
    let parsed = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read config file: {e}", path.display()))
        .and_then(|text| Config::parse(&text, path).map_err(|errs| errs.to_string()));
    match parsed {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("{e}");
            None
        }
    }
}

async fn check(path: PathBuf, online: bool) -> ExitCode {
    let (ok, report) = crate::config::check_report(&path);
    println!("{report}");
    if !ok {
        return ExitCode::from(2);
    }
    if online {
        let Some(cfg) = load(&path) else {
            return ExitCode::from(2);
        };
        crate::daemon::logging::init(crate::config::LogFormat::Human);
        return match crate::connectors::check_online(&cfg).await {
            Ok(lines) => {
                let mut failed = false;
                for (connector, found) in lines {
                    for n in &found.notes {
                        println!("{connector}: note: {n}");
                    }
                    if found.problems.is_empty() {
                        println!("{connector}: online check passed");
                    }
                    for p in found.problems {
                        failed = true;
                        // Connector errors already name their connector, and problems
                        // of a mapping rule say where it is (FILE:LINE:COL: KEY: …).
                        let file = format!("{}:", cfg.source.display());
                        if p.starts_with(&format!("{connector}:")) || p.starts_with(&file) {
                            println!("{p}");
                        } else {
                            println!("{connector}: {p}");
                        }
                    }
                }
                if failed {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
    ExitCode::SUCCESS
}
