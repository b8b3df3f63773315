//! Helpers shared by the end-to-end tests: a simulator cluster with a config pointing at
//! it, a test-owned mutator that creates and edits companies in each CRM through the
//! simulators' back doors, and a canonical view of what each CRM holds.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crmbridge::config::Config;
use crmbridge::connector::{Cursor, PollMode};
use crmbridge::daemon::metrics::Metrics;
use crmbridge::daemon::service::build_engine;
use crmbridge::model::{Fields, Value, normalize_domain};
use crmbridge::sim::cluster::{ClusterConfig, SimCluster};
use crmbridge::store::Store;
use serde_json::json;

/// The three CRMs by connector name.
pub const CRMS: [&str; 3] = ["amocrm", "marketo", "rally"];

/// Starts a cluster of `companies` and writes a two-way config for it into `dir`.
pub async fn cluster_with_config(
    companies: usize,
    dir: &Path,
    poll: &str,
    listen: Option<std::net::SocketAddr>,
) -> (SimCluster, PathBuf) {
    let cfg = ClusterConfig {
        companies,
        ..Default::default()
    };
    cluster_and_config(&cfg, dir, poll, listen).await
}

/// Like [`cluster_with_config`], for any cluster configuration.
pub async fn cluster_and_config(
    cfg: &ClusterConfig,
    dir: &Path,
    poll: &str,
    listen: Option<std::net::SocketAddr>,
) -> (SimCluster, PathBuf) {
    let cluster = SimCluster::start(cfg).await.expect("simulators start");
    let text = cluster.sync_config(dir, poll, listen).expect("config");
    let path = dir.join("crmbridge.toml");
    std::fs::write(&path, text).unwrap();
    (cluster, path)
}

/// The product's engine for the config at `path`, on its own store, with its metrics.
pub async fn engine_for(path: &Path) -> (Arc<crmbridge::engine::Engine>, Arc<Metrics>) {
    let cfg = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
    let metrics = Arc::new(Metrics::new());
    let store = crmbridge::daemon::service::open_store(&cfg).unwrap();
    let engine = build_engine(&cfg, store, metrics.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (engine, metrics)
}

/// Per CRM, per normalised domain, every record's canonical fields (more than one entry
/// for a domain is a duplicate).
pub type Views = BTreeMap<String, BTreeMap<String, Vec<Fields>>>;

/// The [`Views`] of the CRMs of a config, read with the product's own connectors and
/// mappings into a scratch store, so it never touches the store under test.
pub async fn crm_views(config_path: &Path) -> Views {
    // amoCRM stamps whole seconds and its connector reads a second only once it is over
    // and settled: let the second of the last write get there before looking.
    amocrm_second_settled().await;
    let mut cfg = Config::load(config_path).unwrap_or_else(|e| panic!("{e}"));
    let scratch = tempfile::tempdir().unwrap();
    cfg.store.path = scratch.path().join("view.redb");
    let store = Arc::new(Store::open(&cfg.store.path).unwrap());
    let engine = build_engine(&cfg, store, Arc::new(Metrics::new()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = BTreeMap::new();
    for ep in engine.endpoints() {
        let mut cursor = Cursor::start();
        let mut by_domain: BTreeMap<String, Vec<Fields>> = BTreeMap::new();
        let mode = PollMode::Full { since: None };
        let mut seen = std::collections::BTreeMap::new();
        loop {
            let page = ep.connector.poll(&cursor, &mode).await.expect("poll");
            for rec in page.records {
                if rec.deleted {
                    continue;
                }
                let fields = ep
                    .mapping()
                    .expect("up")
                    .read(&rec.fields)
                    .expect("mappable");
                seen.insert(rec.vendor_id.clone(), fields);
            }
            cursor = page.next;
            if !page.more {
                break;
            }
        }
        for fields in seen.into_values() {
            let d = domain_of(&fields).unwrap_or_default();
            by_domain.entry(d).or_default().push(fields);
        }
        out.insert(ep.name.clone(), by_domain);
    }
    out
}

/// Returns once the current second is one amoCRM's connector reads: over, and settled
/// (`SETTLE`). amoCRM stamps whole seconds, so there is no event to wait for.
pub async fn amocrm_second_settled() {
    let now = chrono::Utc::now();
    let settled = chrono::DateTime::from_timestamp(now.timestamp() + 1, 0).unwrap()
        + chrono::Duration::from_std(crmbridge::connectors::amocrm::poll::SETTLE).unwrap()
        + chrono::Duration::milliseconds(50);
    tokio::time::sleep((settled - now).to_std().unwrap()).await;
}

/// The normalised domain of canonical fields (domain, else website).
pub fn domain_of(f: &Fields) -> Option<String> {
    let t = |k: &str| match f.get(k) {
        Some(Value::Text(s)) => normalize_domain(s),
        _ => None,
    };
    t("domain").or_else(|| t("website"))
}

/// The canonical fields every pair of CRMs both read and write with the default mappings.
pub const SHARED_FIELDS: [&str; 5] = ["name", "phone", "employeeCount", "annualRevenue", "city"];

/// Asserts every CRM holds every domain exactly once and the shared fields agree.
pub fn assert_converged(views: &Views) {
    let all: std::collections::BTreeSet<&String> = views.values().flat_map(|m| m.keys()).collect();
    let mut problems = Vec::new();
    for d in &all {
        let mut first: Option<(&str, &Fields)> = None;
        for (crm, m) in views {
            match m.get(*d).map(Vec::as_slice) {
                None | Some([]) => problems.push(format!("{d}: missing in {crm}")),
                Some([f]) => match first {
                    None => first = Some((crm, f)),
                    Some((c0, f0)) => {
                        for k in SHARED_FIELDS {
                            let a = f0.get(k).map(Value::normalized).unwrap_or(Value::Null);
                            let b = f.get(k).map(Value::normalized).unwrap_or(Value::Null);
                            if a != b {
                                problems.push(format!("{d}.{k}: {c0}={a} but {crm}={b}"));
                            }
                        }
                    }
                },
                Some(many) => problems.push(format!("{d}: {} copies in {crm}", many.len())),
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems, first 20:\n{}",
        problems.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Edits made by [`TestMutator`]: per domain, the last city written.
#[derive(Default, Clone)]
pub struct Expectations(pub Arc<Mutex<BTreeMap<String, String>>>);

/// A test-owned mutator: creates companies with fresh domains in each CRM and edits the
/// city of companies it created (each company is only ever edited in the CRM that
/// created it, so "the last write wins" has one unambiguous answer).
pub struct TestMutator {
    step: u64,
    created: Vec<(usize, String, String)>, // (crm index, vendor id, domain)
    pub expect: Expectations,
}

impl TestMutator {
    /// A mutator with nothing created yet.
    pub fn new() -> Self {
        TestMutator {
            step: 0,
            created: Vec::new(),
            expect: Expectations::default(),
        }
    }

    /// One mutation: every third step creates, the others edit a created company.
    pub fn step(&mut self, c: &SimCluster) {
        self.step += 1;
        let n = self.step;
        let crm = (n % 3) as usize;
        let mine: Vec<usize> = (0..self.created.len())
            .filter(|i| self.created[*i].0 == crm)
            .collect();
        if n % 3 == 1 || mine.is_empty() {
            let domain = format!("new-{n}-{}.example.org", CRMS[crm]);
            let name = format!("Neu GmbH №{n} ü");
            let id = match crm {
                0 => {
                    let ids = amo_field_ids(c);
                    c.amocrm
                        .create(json!({"name": name, "custom_fields_values": [
                            {"field_id": ids["Domain"], "values": [{"value": domain}]},
                            {"field_code": "WEB", "values": [{"value": format!("https://{domain}")}]},
                            {"field_id": ids["City"], "values": [{"value": "Start"}]}]}))["id"]
                        .to_string()
                }
                1 => c
                    .marketo
                    .create(json!({"company": name, "website": format!("https://{domain}"), "billingCity": "Start"}))
                    ["id"]
                    .to_string(),
                _ => c.rally.create(json!({"name": name, "domain": domain, "website": format!("https://{domain}"), "city": "Start"}))["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            };
            self.expect
                .0
                .lock()
                .unwrap()
                .insert(domain.clone(), "Start".into());
            self.created.push((crm, id, domain));
        } else {
            let (crm, id, domain) = self.created[mine[(n as usize / 3) % mine.len()]].clone();
            let city = format!("City-{n}");
            match crm {
                0 => {
                    let ids = amo_field_ids(c);
                    c.amocrm.update(
                        id.parse().unwrap(),
                        json!({"custom_fields_values": [{"field_id": ids["City"], "values": [{"value": city}]}]}),
                    );
                }
                1 => {
                    c.marketo
                        .update(id.parse().unwrap(), json!({"billingCity": city}));
                }
                _ => {
                    c.rally.update(&id, json!({"city": city}));
                }
            }
            self.expect.0.lock().unwrap().insert(domain, city);
        }
    }
}

/// amoCRM custom field ids by name, read from the simulator's field catalogue.
pub fn amo_field_ids(c: &SimCluster) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for rec in c.amocrm.dump() {
        if let Some(cfs) = rec["custom_fields_values"].as_array() {
            for f in cfs {
                if let (Some(n), Some(id)) = (f["field_name"].as_str(), f["field_id"].as_i64()) {
                    out.insert(n.to_string(), id);
                }
            }
        }
        if out.contains_key("Domain") && out.contains_key("City") {
            break;
        }
    }
    out
}

/// Asserts every edit of the mutator is present, with its last value, in every CRM.
pub fn assert_expectations(
    views: &BTreeMap<String, BTreeMap<String, Vec<Fields>>>,
    expect: &Expectations,
) {
    let mut problems = Vec::new();
    for (domain, city) in expect.0.lock().unwrap().iter() {
        for (crm, m) in views {
            match m.get(domain).map(Vec::as_slice) {
                Some([f]) => {
                    if f.get("city") != Some(&Value::Text(city.clone())) {
                        problems.push(format!(
                            "{domain}: {crm} has city {:?}, last write was {city:?}",
                            f.get("city")
                        ));
                    }
                }
                Some(many) => problems.push(format!("{domain}: {} copies in {crm}", many.len())),
                None => problems.push(format!("{domain}: missing in {crm}")),
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} lost or duplicated updates, first 20:\n{}",
        problems.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
