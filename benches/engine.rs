//! Engine throughput without network: records/s through map + merge + durable commit per
//! page, against raw redb inserts of the same data in the same run (the ratio to beat),
//! plus store bytes per company. Run: `cargo bench --bench engine` (results in
//! BENCHMARKS.md). `ENGINE_BENCH_RECORDS` sets the record count (default 100000).

mod support;

use std::sync::Arc;
use std::time::Instant;
use support::{Offline, synthetic_record};

use crmbridge::connector::{Cursor, Page, VendorRecord};
use crmbridge::daemon::metrics::Metrics;
use crmbridge::engine::{Endpoint, Engine, EngineSettings, MatchKeyKind};
use crmbridge::mapping::{Mapping, MappingRules};
use crmbridge::model::CrmKind;
use crmbridge::store::Store;
use serde_json::json;

// The allocator of the `crmbridge` binary, set up as there (src/main.rs), so the figures
// are the product's.
crmbridge::allocator_settings!();

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn record(i: usize) -> VendorRecord {
    synthetic_record(i, "r", None, 1_700_000_000)
}

/// User + system CPU seconds of this process so far (all threads), from /proc; 0 where
/// there is no /proc. Wall time on a shared machine is noisy, CPU time much less so.
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and
    // 15th fields overall, in clock ticks (USER_HZ, 100 on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Bytes this process has caused to be written to storage so far (`write_bytes` of
/// /proc/self/io); 0 where there is no /proc.
fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes: ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let n: usize = std::env::var("ENGINE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let page_size = 250;
    let records: Vec<VendorRecord> = (0..n).map(record).collect();
    let dir = tempfile::tempdir().unwrap();

    // Baseline: the same records as JSON, inserted raw into redb, one commit per page.
    let raw_path = dir.path().join("raw.redb");
    let raw = redb::Database::create(&raw_path).unwrap();
    let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("raw");
    let (cpu0, io0) = (cpu_secs(), written_bytes());
    let t0 = Instant::now();
    for page in records.chunks(page_size) {
        let tx = raw.begin_write().unwrap();
        {
            let mut t = tx.open_table(table).unwrap();
            for r in page {
                let bytes = serde_json::to_vec(&r.fields).unwrap();
                t.insert(r.vendor_id.as_str(), bytes.as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let raw_secs = t0.elapsed().as_secs_f64();
    let raw_cpu = cpu_secs() - cpu0;
    let raw_io = written_bytes() - io0;

    // The engine: map, match, merge, ledger, outbox to two targets, cursor; one durable
    // commit per page.
    let store_path = dir.path().join("engine.redb");
    let store = Arc::new(Store::open(&store_path).unwrap());
    let mapping = Mapping::compile(CrmKind::Rally, &MappingRules::default()).unwrap();
    let endpoints = ["rally", "marketo", "amocrm"]
        .iter()
        .map(|n| {
            Endpoint::new(
                n.to_string(),
                Arc::new(Offline(n.to_string())),
                mapping.clone(),
                std::time::Duration::from_secs(60),
            )
        })
        .collect();
    let settings = EngineSettings {
        targets: [(
            "rally".to_string(),
            vec!["marketo".to_string(), "amocrm".to_string()],
        )]
        .into_iter()
        .collect(),
        match_keys: vec![MatchKeyKind::Domain, MatchKeyKind::ExternalCompanyId],
        ..Default::default()
    };
    let engine = Engine::new(store.clone(), endpoints, settings, Arc::new(Metrics::new()));
    // Pages are built before the clock starts: a poll hands the engine owned pages, and
    // the raw baseline does not copy its records either.
    let pages: Vec<Page> = records
        .chunks(page_size)
        .enumerate()
        .map(|(i, chunk)| Page {
            records: chunk.to_vec(),
            malformed: vec![],
            next: Cursor(json!(i)),
            more: true,
        })
        .collect();
    let (cpu0, io0) = (cpu_secs(), written_bytes());
    let t0 = Instant::now();
    for page in &pages {
        engine.ingest_page("rally", page, "rally").unwrap();
    }
    let engine_secs = t0.elapsed().as_secs_f64();
    let engine_cpu = cpu_secs() - cpu0;
    let engine_io = written_bytes() - io0;
    drop(engine);
    drop(store);
    let bytes = std::fs::metadata(&store_path).unwrap().len();

    println!("records: {n}, page size {page_size}, one durable commit per page");
    println!(
        "raw redb inserts : {:>9.0} records/s ({raw_secs:.2} s, {raw_cpu:.2} s CPU, {:.0} KiB written per commit)",
        n as f64 / raw_secs,
        raw_io as f64 / 1024.0 / pages.len() as f64
    );
    println!(
        "engine ingest    : {:>9.0} records/s ({engine_secs:.2} s, {engine_cpu:.2} s CPU, {:.0} KiB written per commit)  = {:.2} of raw",
        n as f64 / engine_secs,
        engine_io as f64 / 1024.0 / pages.len() as f64,
        raw_secs / engine_secs
    );
    println!(
        "store size       : {bytes} bytes = {:.0} bytes per company (incl. outbox for 2 targets)",
        bytes as f64 / n as f64
    );
}
