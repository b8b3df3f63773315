//! The two ways a page is ingested must agree: a large page has its look-ups made on a
//! snapshot by the prepare thread (and checked against what the page itself wrote), a
//! small one does every look-up inside the write transaction. Records repeated within a
//! page, domains shared by several records and sources, and companies created earlier in
//! the same page are where a stale snapshot answer would show.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use serde_json::json;

use super::{Endpoint, Engine, EngineSettings, MatchKeyKind, PARALLEL_PREPARE_MIN};
use crate::connector::{
    Connector, ConnectorError, Cursor, Page, PollMode, PushItem, PushOutcome, VendorRecord,
};
use crate::daemon::metrics::Metrics;
use crate::mapping::{Mapping, MappingRules};
use crate::model::{CrmKind, Fields};
use crate::store::Store;

/// A connector the engine never calls here: pages are fed to it directly.
struct Unused(String);

#[async_trait]
impl Connector for Unused {
    fn name(&self) -> &str {
        &self.0
    }
    async fn start(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn poll(&self, _: &Cursor, _: &PollMode) -> Result<Page, ConnectorError> {
        unreachable!("pages are fed to the engine directly")
    }
    fn max_batch(&self) -> usize {
        100
    }
    async fn push(&self, _: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        unreachable!("nothing is pushed here")
    }
}

const SOURCES: [&str; 3] = ["a", "b", "c"];

fn engine(dir: &tempfile::TempDir, name: &str) -> Engine {
    let store = Arc::new(Store::open(&dir.path().join(name)).unwrap());
    let mapping = Mapping::compile(CrmKind::Rally, &MappingRules::default()).unwrap();
    let endpoints = SOURCES
        .iter()
        .map(|n| {
            Endpoint::new(
                n.to_string(),
                Arc::new(Unused(n.to_string())),
                mapping.clone(),
                std::time::Duration::from_secs(60),
            )
        })
        .collect();
    let targets = SOURCES
        .iter()
        .map(|s| {
            let others = SOURCES.iter().filter(|t| *t != s).map(|t| t.to_string());
            (s.to_string(), others.collect())
        })
        .collect();
    let settings = EngineSettings {
        targets,
        match_keys: vec![MatchKeyKind::Domain, MatchKeyKind::ExternalCompanyId],
        ..Default::default()
    };
    Engine::new(store, endpoints, settings, Arc::new(Metrics::new()))
}

/// One record: vendor id, domain (none, or one of a few), name, vendor second.
type Rec = (u8, Option<u8>, u8, u8);

fn record((id, domain, name, at): Rec) -> VendorRecord {
    let mut fields = json!({ "name": format!("Name {name}") });
    if let Some(d) = domain {
        fields["domain"] = json!(format!("d{d}.example"));
    }
    VendorRecord {
        vendor_id: format!("v{id}"),
        updated_at: Utc.timestamp_opt(1_700_000_000 + i64::from(at), 0).unwrap(),
        fields: fields.as_object().unwrap().clone(),
        deleted: false,
    }
}

/// What else a record may be: reported deleted, or with a value its mapping rejects.
#[derive(Debug, Clone, Copy)]
enum Twist {
    None,
    Deleted,
    Unmappable,
}

fn twisted(rec: Rec, twist: Twist) -> VendorRecord {
    let mut r = record(rec);
    match twist {
        Twist::None => {}
        Twist::Deleted => r.deleted = true,
        Twist::Unmappable => {
            r.fields.insert("employeeCount".into(), json!("many"));
        }
    }
    r
}

fn page(records: Vec<VendorRecord>) -> Page {
    Page {
        records,
        malformed: vec![],
        next: Cursor(json!(1)),
        more: true,
    }
}

/// What the store holds, without canonical ids (they differ between runs): per record, its
/// company's values and the records sharing that company; per target, the outbox length;
/// and the number of dead letters.
type State = (
    BTreeMap<(String, String), (Fields, Vec<(String, String)>)>,
    Vec<(String, u64)>,
);

fn state(e: &Engine) -> State {
    let tx = e.store().begin_read().unwrap();
    let mut records = BTreeMap::new();
    for c in tx.companies(None, usize::MAX).unwrap() {
        let mut links = tx.links_of(&c.id).unwrap();
        links.sort();
        for l in &links {
            records.insert(l.clone(), (c.values(), links.clone()));
        }
    }
    let mut outbox: Vec<(String, u64)> = SOURCES
        .iter()
        .map(|t| (t.to_string(), tx.outbox_len(t).unwrap()))
        .collect();
    outbox.push(("dead letters".into(), tx.dead_letter_count().unwrap()));
    (records, outbox)
}

fn rec_strategy() -> impl Strategy<Value = (Rec, Twist)> {
    let twist = prop_oneof![
        8 => Just(Twist::None),
        1 => Just(Twist::Deleted),
        1 => Just(Twist::Unmappable),
    ];
    ((0u8..12, prop::option::of(0u8..4), 0u8..3, 0u8..4), twist)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn large_pages_end_as_record_by_record_ingestion_does(
        pages in prop::collection::vec(
            (0usize..3, prop::collection::vec(rec_strategy(), PARALLEL_PREPARE_MIN..60)),
            1..5,
        )
    ) {
        let dir = tempfile::tempdir().unwrap();
        let whole = engine(&dir, "whole.redb");
        let single = engine(&dir, "single.redb");
        for (source, recs) in &pages {
            let source = SOURCES[*source];
            let records: Vec<VendorRecord> =
                recs.iter().map(|(r, t)| twisted(*r, *t)).collect();
            whole.ingest_page(source, &page(records.clone()), source).unwrap();
            for r in records {
                single.ingest_page(source, &page(vec![r]), source).unwrap();
            }
        }
        prop_assert_eq!(state(&whole), state(&single));
    }
}

#[test]
fn a_page_repeating_records_and_domains_links_each_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&dir, "s.redb");
    // 40 records of 10 vendor ids over 3 domains: each record seen four times.
    let recs: Vec<VendorRecord> = (0..40u8)
        .map(|i| record((i % 10, Some(i % 3), i % 2, i)))
        .collect();
    let stats = e.ingest_page("a", &page(recs), "a").unwrap();
    assert_eq!(stats.created, 10, "one company per record of one source");
    let tx = e.store().begin_read().unwrap();
    assert_eq!(tx.company_count().unwrap(), 10);
    for i in 0..10 {
        assert!(tx.link_of("a", &format!("v{i}")).unwrap().is_some());
    }
    // A record of another source with one of those domains joins an existing company.
    drop(tx);
    let recs: Vec<VendorRecord> = (0..32u8).map(|i| record((i, Some(0), 0, 50))).collect();
    let stats = e.ingest_page("b", &page(recs), "b").unwrap();
    assert_eq!(
        stats.created, 31,
        "the first joins the company holding d0, the rest are new"
    );
}

/// A `MakeWriter` into a shared buffer, for reading what the log said.
#[derive(Clone, Default)]
struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn warnings_name_the_connector_and_record_at_warn_level() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&dir, "warn.redb");
    let log = LogBuffer::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // tracing caches whether a call site is enabled once per process, and a test thread
    // without a subscriber that reaches the warning first would cache "never" while at most
    // one subscriber exists. A second, always-interested one keeps that from happening (the
    // cache then asks every live subscriber), and the rebuild undoes what was cached before.
    let _anchor = tracing::Dispatch::new(tracing_subscriber::registry());
    let bad = twisted((7, None, 1, 1), Twist::Unmappable);
    tracing::subscriber::with_default(subscriber, || {
        tracing::callsite::rebuild_interest_cache();
        e.ingest_page("a", &page(vec![bad]), "a").unwrap();
    });
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("mapping failed"))
        .unwrap_or_else(|| panic!("no mapping warning in:\n{text}"));
    assert!(
        line.contains("connector=\"a\"") && line.contains("vendor_id=v7"),
        "the warning does not say which record of which CRM: {line}"
    );
}
