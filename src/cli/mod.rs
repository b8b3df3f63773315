//! Command-line interface: parses arguments with clap and dispatches to the subcommands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keeps company records in sync across Rally, Marketo and amoCRM.
#[derive(Debug, Parser)]
#[command(name = "crmbridge", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands; only those that work are listed.
#[derive(Debug, Subcommand)]
pub enum Command {}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    match Cli::parse().command {}
}
