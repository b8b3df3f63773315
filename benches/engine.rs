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

fn record(i: usize) -> VendorRecord {
    synthetic_record(i, "r", None, 1_700_000_000)
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

    // The engine: map, match, merge, ledger, outbox to two targets, cursor; one durable
    // commit per page.
    let store_path = dir.path().join("engine.redb");
    let store = Arc::new(Store::open(&store_path).unwrap());
    let mapping = Mapping::compile(CrmKind::Rally, &MappingRules::default()).unwrap();
    let endpoints = ["rally", "marketo", "amocrm"]
        .iter()
        .map(|n| Endpoint {
            name: n.to_string(),
            connector: Arc::new(Offline(n.to_string())),
            mapping: mapping.clone(),
            poll_interval: std::time::Duration::from_secs(60),
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
    let t0 = Instant::now();
    for (i, chunk) in records.chunks(page_size).enumerate() {
        let page = Page {
            records: chunk.to_vec(),
            malformed: vec![],
            next: Cursor(json!(i)),
            more: true,
        };
        engine.ingest_page("rally", &page, "rally").unwrap();
    }
    let engine_secs = t0.elapsed().as_secs_f64();
    drop(engine);
    drop(store);
    let bytes = std::fs::metadata(&store_path).unwrap().len();

    println!("records: {n}, page size {page_size}, one durable commit per page");
    println!(
        "raw redb inserts : {:>9.0} records/s ({raw_secs:.2} s)",
        n as f64 / raw_secs
    );
    println!(
        "engine ingest    : {:>9.0} records/s ({engine_secs:.2} s)  = {:.2} of raw",
        n as f64 / engine_secs,
        raw_secs / engine_secs
    );
    println!(
        "store size       : {bytes} bytes = {:.0} bytes per company (incl. outbox for 2 targets)",
        bytes as f64 / n as f64
    );
}
