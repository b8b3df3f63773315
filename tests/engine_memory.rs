//! Engine behaviour against in-memory CRMs that speak Rally's flat field names: identity
//! by domain, field-level merge, outbox draining, echo suppression and settling.
//! (End-to-end tests against the wire simulators live in `tests/sync_sim.rs`.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use crmbridge::connector::{
    Connector, ConnectorError, Cursor, Page, PollMode, PushItem, PushOutcome, VendorRecord,
};
use crmbridge::daemon::metrics::Metrics;
use crmbridge::engine::{BackfillOptions, Endpoint, Engine, EngineSettings, MatchKeyKind};
use crmbridge::mapping::{Mapping, MappingRules};
use crmbridge::model::CrmKind;
use crmbridge::store::Store;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

/// A CRM kept in memory: records with a modification counter as their clock.
#[derive(Default)]
struct MemoryCrm {
    name: String,
    state: Mutex<MemState>,
}

#[derive(Default)]
struct MemState {
    clock: i64,
    next_id: u64,
    records: BTreeMap<String, (i64, Map<String, Value>)>,
    writes: u64,
    reject_names: Vec<String>,
}

impl MemoryCrm {
    fn new(name: &str) -> Arc<Self> {
        Arc::new(MemoryCrm {
            name: name.into(),
            state: Mutex::default(),
        })
    }

    fn put(&self, id: Option<&str>, fields: Value) -> String {
        let mut s = self.state.lock().unwrap();
        s.clock += 1;
        let id = id.map(str::to_string).unwrap_or_else(|| {
            s.next_id += 1;
            format!("{}-{}", self.name, s.next_id)
        });
        let clock = s.clock;
        let entry = s.records.entry(id.clone()).or_insert((clock, Map::new()));
        entry.0 = clock;
        for (k, v) in fields.as_object().unwrap() {
            entry.1.insert(k.clone(), v.clone());
        }
        id
    }

    fn by_domain(&self) -> BTreeMap<String, Map<String, Value>> {
        self.state
            .lock()
            .unwrap()
            .records
            .values()
            .map(|(_, f)| (f["domain"].as_str().unwrap_or("").to_string(), f.clone()))
            .collect()
    }

    fn writes(&self) -> u64 {
        self.state.lock().unwrap().writes
    }
}

fn ts(clock: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + clock, 0).unwrap()
}

#[async_trait]
impl Connector for MemoryCrm {
    fn name(&self) -> &str {
        &self.name
    }
    async fn start(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn poll(&self, cursor: &Cursor, mode: &PollMode) -> Result<Page, ConnectorError> {
        let since = match mode {
            PollMode::Full { .. } => 0,
            PollMode::Incremental => cursor.0.as_i64().unwrap_or(0),
        };
        let s = self.state.lock().unwrap();
        let records = s
            .records
            .iter()
            .filter(|(_, (c, _))| *c > since)
            .map(|(id, (c, f))| VendorRecord {
                vendor_id: id.clone(),
                updated_at: ts(*c),
                fields: f.clone(),
                deleted: false,
            })
            .collect();
        Ok(Page {
            records,
            malformed: vec![],
            next: Cursor(json!(s.clock)),
            more: false,
        })
    }
    fn max_batch(&self) -> usize {
        2
    }
    async fn push(&self, items: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        let mut out = Vec::new();
        for it in items {
            let rejected = {
                let s = self.state.lock().unwrap();
                it.fields
                    .get("name")
                    .and_then(|n| n.as_str())
                    .is_some_and(|n| s.reject_names.iter().any(|r| r == n))
            };
            if rejected {
                out.push(PushOutcome::Rejected {
                    reason: "name is on the reject list".into(),
                });
                continue;
            }
            let created = it.vendor_id.is_none();
            let id = self.put(it.vendor_id.as_deref(), Value::Object(it.fields.clone()));
            self.state.lock().unwrap().writes += 1;
            out.push(PushOutcome::Written {
                vendor_id: id,
                created,
            });
        }
        Ok(out)
    }
}

struct Rig {
    engine: Arc<Engine>,
    crms: Vec<Arc<MemoryCrm>>,
    _dir: tempfile::TempDir,
}

fn rig(names: &[&str]) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
    let crms: Vec<Arc<MemoryCrm>> = names.iter().map(|n| MemoryCrm::new(n)).collect();
    let mapping = Mapping::compile(CrmKind::Rally, &MappingRules::default()).unwrap();
    let endpoints = crms
        .iter()
        .map(|c| {
            Endpoint::new(
                c.name.clone(),
                c.clone(),
                mapping.clone(),
                Duration::from_millis(20),
            )
        })
        .collect();
    let targets = names
        .iter()
        .map(|n| {
            (
                n.to_string(),
                names
                    .iter()
                    .filter(|t| *t != n)
                    .map(|t| t.to_string())
                    .collect(),
            )
        })
        .collect();
    let settings = EngineSettings {
        targets,
        match_keys: vec![MatchKeyKind::Domain],
        ..Default::default()
    };
    let engine = Arc::new(Engine::new(
        store,
        endpoints,
        settings,
        Arc::new(Metrics::new()),
    ));
    Rig {
        engine,
        crms,
        _dir: dir,
    }
}

async fn sync_round(r: &Rig) {
    let sd = CancellationToken::new();
    for c in &r.crms {
        r.engine
            .poll_cycle(&c.name, &c.name, &PollMode::Incremental, &sd, &|_| {})
            .await
            .unwrap();
    }
    for c in &r.crms {
        r.engine.drain_all(&c.name, &sd).await.unwrap();
    }
}

#[tokio::test]
async fn overlapping_companies_converge_without_duplicates() {
    let r = rig(&["a", "b", "c"]);
    r.crms[0].put(
        None,
        json!({"name": "Acme", "domain": "acme.com", "annualRevenue": 10.50}),
    );
    r.crms[0].put(None, json!({"name": "Solo", "domain": "solo.io"}));
    // b's copy of Acme is newer (its clock is ahead).
    let b_acme = r.crms[1].put(None, json!({"name": "Acme Inc", "domain": "WWW.ACME.COM"}));
    r.crms[1].put(Some(&b_acme), json!({"city": "Zürich"}));
    r.crms[2].put(
        None,
        json!({"name": "Gamma", "domain": "gamma.net", "tags": ["x", "y"]}),
    );
    let report = r
        .engine
        .backfill(
            &BackfillOptions::default(),
            &CancellationToken::new(),
            &|_, _| {},
        )
        .await
        .unwrap();
    assert!(report.ok(), "{report:?}");
    let views: Vec<_> = r.crms.iter().map(|c| c.by_domain()).collect();
    for v in &views {
        assert_eq!(
            v.len(),
            3,
            "each CRM holds 3 companies (no duplicates): {v:#?}"
        );
    }
    // b's record is newer, so its name wins everywhere; a's revenue and
    // b's city both survive (field-level merge).
    let acme_c = views[2]
        .values()
        .find(|f| f["name"] == "Acme Inc")
        .expect("merged Acme reached c");
    assert_eq!(acme_c["city"], "Zürich");
    assert_eq!(acme_c["annualRevenue"].to_string(), "10.5");
    assert_eq!(views[0]["gamma.net"]["tags"], json!(["x", "y"]));
}

#[tokio::test]
async fn our_own_writes_coming_back_cause_no_pushes() {
    let r = rig(&["a", "b"]);
    r.crms[0].put(None, json!({"name": "Acme", "domain": "acme.com"}));
    sync_round(&r).await;
    assert_eq!(r.crms[1].writes(), 1);
    // Several more rounds: b's copy is read back (an echo) and nothing moves.
    for _ in 0..3 {
        sync_round(&r).await;
    }
    assert_eq!(r.crms[0].writes(), 0, "echo pushed back to the source");
    assert_eq!(r.crms[1].writes(), 1, "no-op pushes were sent");
}

#[tokio::test]
async fn an_update_in_either_crm_reaches_the_other_and_settles() {
    let r = rig(&["a", "b"]);
    let id = r.crms[0].put(None, json!({"name": "Acme", "domain": "acme.com"}));
    sync_round(&r).await;
    r.crms[0].put(Some(&id), json!({"industry": "Retail"}));
    sync_round(&r).await;
    assert_eq!(r.crms[1].by_domain()["acme.com"]["industry"], "Retail");
    let bid = r.crms[1]
        .state
        .lock()
        .unwrap()
        .records
        .keys()
        .next()
        .cloned()
        .unwrap();
    r.crms[1].put(Some(&bid), json!({"industry": "Energy"}));
    sync_round(&r).await;
    sync_round(&r).await;
    assert_eq!(r.crms[0].by_domain()["acme.com"]["industry"], "Energy");
    let writes = (r.crms[0].writes(), r.crms[1].writes());
    sync_round(&r).await;
    sync_round(&r).await;
    assert_eq!(
        writes,
        (r.crms[0].writes(), r.crms[1].writes()),
        "did not settle"
    );
}

#[tokio::test]
async fn a_rejected_record_is_dead_lettered_and_the_batch_goes_on() {
    let r = rig(&["a", "b"]);
    r.crms[1].state.lock().unwrap().reject_names = vec!["Bad".into()];
    r.crms[0].put(None, json!({"name": "Bad", "domain": "bad.com"}));
    r.crms[0].put(None, json!({"name": "Good", "domain": "good.com"}));
    sync_round(&r).await;
    assert_eq!(r.crms[1].by_domain().len(), 1);
    let tx = r.engine.store().begin_read().unwrap();
    let dead = tx.dead_letters(10, 0).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, "name is on the reject list");
    assert_eq!(tx.outbox_len("b").unwrap(), 0);
}

#[tokio::test]
async fn a_record_that_cannot_be_mapped_is_dead_lettered_on_read() {
    let r = rig(&["a", "b"]);
    r.crms[0].put(
        None,
        json!({"name": "Bad", "domain": "bad.com", "employeeCount": "many"}),
    );
    r.crms[0].put(None, json!({"name": "Good", "domain": "good.com"}));
    sync_round(&r).await;
    assert_eq!(r.crms[1].by_domain().len(), 1);
    let tx = r.engine.store().begin_read().unwrap();
    let dead = tx.dead_letters(10, 0).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].reason.contains("employeeCount"),
        "{}",
        dead[0].reason
    );
}
