//! `crmbridge sim`: runs the three CRM simulators on loopback until Ctrl-C, so users can try
//! their config and mapping rules without a CRM account.

use std::process::ExitCode;

use crate::sim::cluster::{ClusterConfig, SimCluster};

/// Arguments of `sim`.
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Rally port (0 = any free port).
    #[arg(long, default_value_t = 8701)]
    pub rally_port: u16,
    /// Marketo port.
    #[arg(long, default_value_t = 8702)]
    pub marketo_port: u16,
    /// amoCRM port.
    #[arg(long, default_value_t = 8703)]
    pub amocrm_port: u16,
    /// Seed of the generated companies.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Companies in the shared universe (each CRM holds an overlapping 60%).
    #[arg(long, default_value_t = 1000)]
    pub companies: usize,
    /// Random creates/updates/deletes per second in each CRM (0 = none).
    #[arg(long, default_value_t = 0.0)]
    pub mutations_per_second: f64,
    /// Every vendor rate limit × this factor (1 = the vendors' real limits); a crmbridge
    /// config for the simulators must scale its `limits` alike.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit_scale: u32,
}

/// Runs `sim`.
pub async fn run(args: SimArgs) -> ExitCode {
    crate::daemon::logging::init(crate::config::LogFormat::Human);
    let cfg = ClusterConfig {
        seed: args.seed,
        companies: args.companies,
        rally_port: args.rally_port,
        marketo_port: args.marketo_port,
        amocrm_port: args.amocrm_port,
        limit_scale: args.limit_scale,
    };
    let cluster = match SimCluster::start(&cfg).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot start the simulators: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "Rally   {}  (X-Api-Key: rally-test-key)",
        cluster.rally.base_url()
    );
    println!(
        "Marketo {}  (client_id marketo-client, client_secret marketo-secret)",
        cluster.marketo.base_url()
    );
    println!(
        "amoCRM  {}  (long-lived token amo-long-lived-token)",
        cluster.amocrm.base_url()
    );
    println!("These are simulator test credentials, not secrets. Ctrl-C stops.");
    let _mutators = (args.mutations_per_second > 0.0).then(|| {
        (
            cluster.rally.spawn_mutator(args.mutations_per_second),
            cluster.marketo.spawn_mutator(args.mutations_per_second),
            cluster.amocrm.spawn_mutator(args.mutations_per_second),
        )
    });
    let _ = tokio::signal::ctrl_c().await;
    cluster.shutdown().await;
    ExitCode::SUCCESS
}
