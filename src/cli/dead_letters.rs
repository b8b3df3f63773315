//! `crmbridge dead-letters list | retry | drop`: inspect and act on records that a CRM
//! rejected or that could not be read.

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::Utc;

use crate::daemon::service::open_store;
use crate::store::Direction;

/// Arguments of `dead-letters`.
#[derive(Debug, clap::Args)]
pub struct DeadLetterArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: DeadLetterAction,
}

/// Dead-letter actions.
#[derive(Debug, clap::Subcommand)]
pub enum DeadLetterAction {
    /// List dead letters (newest last).
    List {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print each record's JSON too.
        #[arg(long)]
        full: bool,
    },
    /// Queue push dead letters for another attempt (read ones are retried by the next
    /// backfill); the entry leaves the table.
    Retry {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Dead-letter ids (see `list`).
        ids: Vec<u64>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete dead letters.
    Drop {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Dead-letter ids.
        ids: Vec<u64>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

/// Runs `dead-letters`.
pub fn run(args: DeadLetterArgs) -> ExitCode {
    let (config, retry, ids, all, full) = match args.action {
        DeadLetterAction::List { config, full } => (config, None, vec![], false, full),
        DeadLetterAction::Retry { config, ids, all } => (config, Some(true), ids, all, false),
        DeadLetterAction::Drop { config, ids, all } => (config, Some(false), ids, all, false),
    };
    if retry.is_some() && ids.is_empty() && !all {
        eprintln!(
            "error: name the dead letters (their #ids, see `dead-letters list`) or give --all"
        );
        return ExitCode::from(2);
    }
    let Some(cfg) = super::load_without_secrets(&config) else {
        return ExitCode::from(2);
    };
    if let Some(missing) = super::missing_store(&cfg) {
        eprintln!("error: {missing}");
        return ExitCode::FAILURE;
    }
    let store = match open_store(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            if e.is_store_locked() {
                eprintln!(
                    "hint: the daemon holds the store; stop it first (systemctl stop crmbridge)"
                );
            }
            return ExitCode::FAILURE;
        }
    };
    let mut missing = 0;
    let result = (|| -> Result<(), crate::store::StoreError> {
        let Some(retry) = retry else {
            super::quiet_on_closed_pipe();
            let tx = store.begin_read()?;
            let all = tx.dead_letters(usize::MAX, 0)?;
            if all.is_empty() {
                println!("no dead letters");
            }
            for d in all {
                println!(
                    "#{:<6} {:<10} {:<5} canonical={} vendor={} attempts={} last={} reason: {}",
                    d.id,
                    d.connector,
                    match d.direction {
                        Direction::Read => "read",
                        Direction::Push => "push",
                    },
                    d.canonical_id.as_deref().unwrap_or("-"),
                    d.vendor_id.as_deref().unwrap_or("-"),
                    d.attempts,
                    d.last_at.format("%Y-%m-%dT%H:%M:%SZ"),
                    d.reason
                );
                if full {
                    println!("        {}", d.record);
                }
            }
            return Ok(());
        };
        let tx = store.begin_write()?;
        let ids: Vec<u64> = if all {
            tx.dead_letters(usize::MAX, 0)?
                .iter()
                .map(|d| d.id)
                .collect()
        } else {
            ids
        };
        for id in ids {
            let Some(d) = tx.remove_dead_letter(id)? else {
                eprintln!("#{id}: no such dead letter");
                missing += 1;
                continue;
            };
            if retry {
                match (&d.direction, &d.canonical_id) {
                    (Direction::Push, Some(cid)) => {
                        tx.enqueue(&d.connector, cid, Utc::now())?;
                        println!("#{id}: queued for {}", d.connector);
                    }
                    _ => println!(
                        "#{id}: read failures are retried by re-reading: run `crmbridge backfill --connector {}`",
                        d.connector
                    ),
                }
            } else {
                println!("#{id}: dropped");
            }
        }
        tx.commit()
    })();
    match result {
        Ok(()) if missing == 0 => ExitCode::SUCCESS,
        Ok(()) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
