//! `crmbridge demo`: one command, no CRM account, no config — starts the three simulators
//! with overlapping companies, runs a backfill and a short live sync with mutations, and
//! prints what happened.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::metrics::Metrics;
use crate::daemon::service::{build_engine, open_store};
use crate::engine::BackfillOptions;
use crate::model::normalize_domain;
use crate::sim::cluster::{ClusterConfig, SimCluster};

/// Arguments of `demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Companies in the shared universe.
    #[arg(long, default_value_t = 60)]
    pub companies: usize,
    /// Seconds of live sync with mutations after the backfill.
    #[arg(long, default_value_t = 8)]
    pub live_seconds: u64,
    /// Mutations per second in each CRM during the live phase.
    #[arg(long, default_value_t = 1.0)]
    pub mutations_per_second: f64,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// name per domain, per CRM.
type View = BTreeMap<&'static str, BTreeMap<String, String>>;

fn text(v: &serde_json::Value, key: &str) -> Option<String> {
    v.get(key).and_then(|x| x.as_str()).map(str::to_string)
}

fn amo_field(v: &serde_json::Value, name: &str) -> Option<String> {
    v.get("custom_fields_values")?
        .as_array()?
        .iter()
        .find(|f| f.get("field_name").and_then(|n| n.as_str()) == Some(name))?
        .get("values")?
        .get(0)?
        .get("value")
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| x.to_string())
        })
}

/// What each CRM holds, as domain → name.
pub fn view(cluster: &SimCluster) -> View {
    let mut out = View::new();
    let rally = cluster
        .rally
        .dump()
        .iter()
        .filter_map(|c| Some((normalize_domain(&text(c, "domain")?)?, text(c, "name")?)))
        .collect();
    let marketo = cluster
        .marketo
        .dump()
        .iter()
        .filter_map(|c| {
            Some((
                normalize_domain(&text(c, "website")?)?,
                text(c, "company").unwrap_or_default(),
            ))
        })
        .collect();
    let amocrm = cluster
        .amocrm
        .dump()
        .iter()
        .filter_map(|c| {
            let d = amo_field(c, "Domain").or_else(|| amo_field(c, "Web"))?;
            Some((normalize_domain(&d)?, text(c, "name").unwrap_or_default()))
        })
        .collect();
    out.insert("rally", rally);
    out.insert("marketo", marketo);
    out.insert("amocrm", amocrm);
    out
}

fn print_view(title: &str, v: &View) {
    println!("\n{title}");
    let all: BTreeSet<&String> = v.values().flat_map(|m| m.keys()).collect();
    let in_all = all
        .iter()
        .filter(|d| v.values().all(|m| m.contains_key(**d)))
        .count();
    println!(
        "  companies: rally {}, marketo {}, amocrm {}; distinct domains {}; in all three {}",
        v["rally"].len(),
        v["marketo"].len(),
        v["amocrm"].len(),
        all.len(),
        in_all
    );
    println!(
        "  {:<34} {:<26} {:<26} {:<26}",
        "domain", "rally", "marketo", "amocrm"
    );
    let cell = |m: &BTreeMap<String, String>, d: &str| -> String {
        m.get(d)
            .map(|n| n.chars().take(24).collect())
            .unwrap_or_else(|| "—".to_string())
    };
    for d in all.iter().take(12) {
        println!(
            "  {:<34} {:<26} {:<26} {:<26}",
            d.chars().take(33).collect::<String>(),
            cell(&v["rally"], d),
            cell(&v["marketo"], d),
            cell(&v["amocrm"], d)
        );
    }
    if all.len() > 12 {
        println!("  … and {} more", all.len() - 12);
    }
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> ExitCode {
    crate::daemon::logging::init_with_default(crate::config::LogFormat::Human, "warn");
    // Ctrl-C ends the demo by dropping it, so its scratch directory (config, store,
    // simulator credentials) is removed as after a normal end.
    let outcome = tokio::select! {
        r = demo(args) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: demo stopped, its scratch files removed");
            return ExitCode::from(130);
        }
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: DemoArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let cluster = SimCluster::start(&ClusterConfig {
        seed: args.seed,
        companies: args.companies,
        ..Default::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let toml = cluster.sync_config(dir.path(), "1s", None)?;
    let path = dir.path().join("crmbridge.toml");
    std::fs::write(&path, &toml)?;
    println!("crmbridge demo: three simulated CRMs on loopback");
    println!("  Rally   {}", cluster.rally.base_url());
    println!("  Marketo {}", cluster.marketo.base_url());
    println!("  amoCRM  {}", cluster.amocrm.base_url());
    println!("  config  {} (two-way among all three)", path.display());
    print_view("BEFORE", &view(&cluster));

    let cfg = Config::load(&path).map_err(|e| e.to_string())?;
    let metrics = Arc::new(Metrics::new());
    let store = open_store(&cfg)?;
    let engine = build_engine(&cfg, store, metrics.clone()).await?;
    let shutdown = CancellationToken::new();

    println!("\nbackfill …");
    let report = engine
        .backfill(&BackfillOptions::default(), &shutdown, &|_, _| {})
        .await?;
    for (c, s) in &report.read {
        println!(
            "  read {c:<8} {:>5} records, {:>4} new companies",
            s.read, s.created
        );
    }
    for (t, s) in &report.pushed {
        println!(
            "  wrote {t:<7} {:>5} records ({} created, {} rejected)",
            s.written, s.created, s.rejected
        );
    }

    println!(
        "\nlive sync for {} s with {} mutations/s in each CRM …",
        args.live_seconds, args.mutations_per_second
    );
    let handle = engine.start(shutdown.clone());
    {
        let _mutators = (
            cluster.rally.spawn_mutator(args.mutations_per_second),
            cluster.marketo.spawn_mutator(args.mutations_per_second),
            cluster.amocrm.spawn_mutator(args.mutations_per_second),
        );
        tokio::time::sleep(Duration::from_secs(args.live_seconds)).await;
    }
    println!("mutations stopped; letting the daemon settle …");
    tokio::time::sleep(Duration::from_secs(4)).await;
    shutdown.cancel();
    handle.wait().await;

    print_view("AFTER", &view(&cluster));
    println!("\nwrites per target (records):");
    for t in ["rally", "marketo", "amocrm"] {
        let l = [("connector", t)];
        println!(
            "  → {t:<8} {:>5} written, {:>5} read from it",
            metrics
                .get("crmbridge_records_pushed_total", &l)
                .unwrap_or(0.0)
                + report
                    .pushed
                    .get(t)
                    .map(|s| s.written as f64)
                    .unwrap_or(0.0),
            metrics
                .get("crmbridge_records_read_total", &l)
                .unwrap_or(0.0)
        );
    }
    let rejections = cluster.rally.stats().total_rejections()
        + cluster.marketo.stats().total_rejections()
        + cluster.amocrm.stats().total_rejections();
    println!(
        "\nrate-limit rejections from the CRMs: {rejections} (calls: rally {}, marketo {}, amocrm {})",
        cluster.rally.stats().total_requests(),
        cluster.marketo.stats().total_requests(),
        cluster.amocrm.stats().total_requests()
    );
    let dead = engine.store().begin_read()?.dead_letters(usize::MAX, 0)?;
    println!("dead letters: {}", dead.len());
    for d in &dead {
        println!("  {} ({}): {}", d.connector, d.direction, d.reason);
    }
    println!(
        "\nNotes: the simulators' mutators also delete companies; deletes are not propagated \
         (propagate_deletes = false), so a company deleted in one CRM during the live phase \
         stays in the others. A record a CRM rejects is a dead letter with the vendor's \
         reason; a value it cannot hold (an industry that is not an option of amoCRM's select \
         field) is left out of the write and noted as a dead letter; the rest goes on."
    );
    cluster.shutdown().await;
    Ok(rejections == 0)
}
