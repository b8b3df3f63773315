//! End-to-end benchmarks of crmbridge against the built-in wire simulators at the vendors'
//! limits scaled by a factor: backfill throughput against the ceiling the limits allow,
//! memory with a large store during a sync, and change-to-arrival latency. Run:
//! `cargo bench --bench e2e` (results and knobs in BENCHMARKS.md).
//!
//! Each part runs in its own child process (this binary again, with `E2E_ROLE` set), so
//! its peak RSS (VmHWM) and CPU time are its own. The simulators run inside that process
//! too: CPU and RSS figures include them. Part 1 also reports the live heap (a counting
//! global allocator) and splits it into the simulators' share (what stays allocated once
//! the engine is dropped) and crmbridge's.

mod support;

use mimalloc::MiMalloc;
use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{Offline, synthetic_record};

use crmbridge::config::Config;
use crmbridge::connector::{Cursor, Page, VendorRecord};
use crmbridge::daemon::metrics::Metrics;
use crmbridge::daemon::service::{build_engine, open_store};
use crmbridge::engine::{BackfillOptions, Endpoint, Engine, EngineSettings, MatchKeyKind};
use crmbridge::mapping::{Mapping, MappingRules};
use crmbridge::model::{CrmKind, normalize_domain};
use crmbridge::sim::amocrm::{AmoSim, AmoSimConfig};
use crmbridge::sim::cluster::{SIM_MARKETO_DAILY_QUOTA, overlapping_indices};
use crmbridge::sim::common::StatsSnapshot;
use crmbridge::sim::marketo::{MarketoSim, MarketoSimConfig};
use crmbridge::sim::rally::{RallySim, RallySimConfig};
use crmbridge::store::Store;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Connector names, in the order the engine walks them.
const CRMS: [&str; 3] = ["amocrm", "marketo", "rally"];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// Process measurements
// ---------------------------------------------------------------------------------------

/// Clock ticks per second of /proc/self/stat times (`getconf CLK_TCK`, 100 on Linux).
fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of this process so far (all threads).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / clk_tck()
}

/// A `/proc/self/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The product's allocator (mimalloc), counting the bytes allocated and not yet freed, so the report can
/// tell memory in use (live heap) from memory the allocator merely keeps (RSS − heap).
struct CountingAlloc;

static HEAP_LIVE: AtomicUsize = AtomicUsize::new(0);
static HEAP_PEAK: AtomicUsize = AtomicUsize::new(0);

impl CountingAlloc {
    fn added(n: usize) {
        let now = HEAP_LIVE.fetch_add(n, Ordering::Relaxed) + n;
        HEAP_PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to mimalloc (the allocator of the crmbridge
// binary, src/main.rs); only counters are updated.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { MiMalloc.alloc(layout) };
        if !p.is_null() {
            Self::added(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::added(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { MiMalloc.dealloc(ptr, layout) };
        HEAP_LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HEAP_LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            Self::added(new_size);
        }
        p
    }
}

crmbridge::allocator_settings!();

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Live heap bytes in KiB (see [`CountingAlloc`]).
fn heap_kib() -> u64 {
    (HEAP_LIVE.load(Ordering::Relaxed) / 1024) as u64
}

/// VmRSS and live heap now, in KiB.
#[derive(Clone, Copy, Default)]
struct Mem {
    rss: u64,
    heap: u64,
}

impl Mem {
    fn now() -> Mem {
        Mem {
            rss: status_kib("VmRSS:"),
            heap: heap_kib(),
        }
    }
}

impl std::fmt::Display for Mem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.0} ({:.0}) MiB", mib(self.rss), mib(self.heap))
    }
}

// ---------------------------------------------------------------------------------------
// Simulators and config at scaled limits
// ---------------------------------------------------------------------------------------

/// Vendor limits multiplied by `scale`.
#[derive(Clone, Copy)]
struct Limits {
    scale: u32,
}

impl Limits {
    fn rally_rps(self) -> u32 {
        10 * self.scale
    }
    fn marketo_calls(self) -> usize {
        100 * self.scale as usize
    }
    const MARKETO_WINDOW_S: u64 = 20;
    fn marketo_rps(self) -> f64 {
        self.marketo_calls() as f64 / Self::MARKETO_WINDOW_S as f64
    }
    fn amo_rps(self) -> u32 {
        7 * self.scale
    }
    /// amoCRM documents no concurrency limit, only the rate: calls in flight at once
    /// (`max_concurrent`, the connector's default is 4). At x10 a POST of 250 takes
    /// longer than 4 / 70 s, so 4 in flight cannot reach the rate: set 8 there.
    fn amo_concurrent(self) -> usize {
        env_or("E2E_AMO_CONCURRENCY", 4)
    }
}

/// Records per call at full batches: Rally list page, Marketo sync, amoCRM POST.
const RALLY_PAGE: usize = 100;
const MARKETO_BATCH: usize = 300;
const AMO_BATCH: usize = 250;

struct Sims {
    rally: RallySim,
    marketo: MarketoSim,
    amocrm: AmoSim,
}

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

impl Sims {
    /// Starts the three simulators at the scaled limits with the given seed companies.
    async fn start(l: Limits, [r, m, a]: [Vec<usize>; 3]) -> Sims {
        let rally = RallySim::start(
            loopback(),
            RallySimConfig {
                seed_indices: r,
                rate_limit_rps: l.rally_rps(),
                max_page: RALLY_PAGE,
                variant: 0,
                ..Default::default()
            },
        )
        .await
        .expect("rally sim");
        let marketo = MarketoSim::start(
            loopback(),
            MarketoSimConfig {
                seed_indices: m,
                calls_per_window: l.marketo_calls(),
                window: Duration::from_secs(Limits::MARKETO_WINDOW_S),
                daily_quota: SIM_MARKETO_DAILY_QUOTA,
                variant: 1,
                ..Default::default()
            },
        )
        .await
        .expect("marketo sim");
        let amocrm = AmoSim::start(
            loopback(),
            AmoSimConfig {
                seed_indices: a,
                rps: l.amo_rps(),
                variant: 2,
                ..Default::default()
            },
        )
        .await
        .expect("amocrm sim");
        Sims {
            rally,
            marketo,
            amocrm,
        }
    }

    fn stats(&self) -> BTreeMap<&'static str, StatsSnapshot> {
        [
            ("rally", self.rally.stats()),
            ("marketo", self.marketo.stats()),
            ("amocrm", self.amocrm.stats()),
        ]
        .into_iter()
        .collect()
    }

    /// A two-way config for the three simulators with the same scaled limits, written
    /// into `dir` with its secrets; returns the loaded config.
    fn config(&self, l: Limits, dir: &Path, store: &Path, poll: &str) -> Config {
        let secret = |name: &str, value: &str| {
            let p = dir.join(name);
            std::fs::write(&p, value).unwrap();
            p.display().to_string()
        };
        let text = format!(
            r#"match_keys = ["domain", "externalCompanyId"]

[store]
path = "{store}"

[daemon]
listen = false

[connectors.rally]
kind = "rally"
base_url = "{rally}"
api_key = {{ file = "{rally_key}" }}
poll_interval = "{poll}"
batch_size = 100
page_size = {RALLY_PAGE}
limits = {{ requests_per_second = {rally_rps}, max_concurrent = 4 }}

[connectors.marketo]
kind = "marketo"
base_url = "{marketo}"
client_id = {{ file = "{mk_id}" }}
client_secret = {{ file = "{mk_secret}" }}
poll_interval = "{poll}"
batch_size = {MARKETO_BATCH}
limits = {{ requests_per_window = {{ requests = {mk_calls}, window = "{mk_window}s" }}, max_concurrent = 10, daily_quota = {mk_quota}, daily_share = 0.5 }}

[connectors.amocrm]
kind = "amocrm"
base_url = "{amocrm}"
poll_interval = "{poll}"
batch_size = {AMO_BATCH}
limits = {{ requests_per_second = {amo_rps}, max_concurrent = {amo_conc} }}

[connectors.amocrm.auth]
type = "long_lived"
token = {{ file = "{amo_token}" }}

[[flows]]
between = ["rally", "marketo", "amocrm"]
"#,
            store = store.display(),
            rally = self.rally.base_url(),
            marketo = self.marketo.base_url(),
            amocrm = self.amocrm.base_url(),
            rally_key = secret("rally_api_key", "rally-test-key"),
            mk_id = secret("marketo_client_id", "marketo-client"),
            mk_secret = secret("marketo_client_secret", "marketo-secret"),
            amo_token = secret("amocrm_token", "amo-long-lived-token"),
            rally_rps = l.rally_rps(),
            mk_calls = l.marketo_calls(),
            mk_window = Limits::MARKETO_WINDOW_S,
            mk_quota = SIM_MARKETO_DAILY_QUOTA,
            amo_rps = l.amo_rps(),
            amo_conc = l.amo_concurrent(),
        );
        let path = dir.join("crmbridge.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    async fn shutdown(self) {
        self.rally.shutdown().await;
        self.marketo.shutdown().await;
        self.amocrm.shutdown().await;
    }
}

fn pushed(m: &Metrics, crm: &str) -> f64 {
    m.get("crmbridge_records_pushed_total", &[("connector", crm)])
        .unwrap_or(0.0)
}

fn rejections(stats: &BTreeMap<&'static str, StatsSnapshot>) -> String {
    stats
        .iter()
        .map(|(k, s)| format!("{k} {} {:?}", s.total_rejections(), s.rejections))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------
// Part 1: backfill
// ---------------------------------------------------------------------------------------

/// Backfills N companies seeded only in Rally into Marketo and amoCRM and reports each
/// phase's records/s against the ceiling the scaled limits allow.
async fn part_backfill() {
    let n: usize = env_or("E2E_COMPANIES", 100_000);
    let l = Limits {
        scale: env_or("E2E_SCALE", 10),
    };
    let dir = tempfile::tempdir().unwrap();
    let sims = Sims::start(l, [(0..n).collect(), vec![], vec![]]).await;
    let cfg = sims.config(l, dir.path(), &dir.path().join("crmbridge.redb"), "1m");
    let mem_sims = Mem::now();
    let metrics = Arc::new(Metrics::new());
    let engine = build_engine(&cfg, open_store(&cfg).unwrap(), metrics.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mem_engine = Mem::now();
    let setup_calls: BTreeMap<&str, u64> = sims
        .stats()
        .iter()
        .map(|(k, s)| (*k, s.total_requests()))
        .collect();

    // Phase boundaries: the read phase from page callbacks; each drain phase ends when
    // its pushed counter reaches its final value (sampled every 5 ms).
    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    // Per page: source, time, and requests so far per simulator (rally, marketo, amocrm).
    type PageLog = Vec<(String, Duration, [u64; 3])>;
    let pages: Arc<Mutex<PageLog>> = Arc::default();
    // Every 5 ms: time, pushed counters (amocrm, marketo), VmRSS and heap.
    type Samples = Vec<(Duration, [f64; 2], Mem)>;
    let samples: Arc<Mutex<Samples>> = Arc::default();
    let stop = CancellationToken::new();
    let sampler = {
        let (m, samples, stop) = (metrics.clone(), samples.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let v = [pushed(&m, "amocrm"), pushed(&m, "marketo")];
                samples.lock().unwrap().push((t0.elapsed(), v, Mem::now()));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let cpu_read_end = Arc::new(Mutex::new((0.0, Mem::default())));
    let report = {
        let pages = pages.clone();
        let cpu_read_end = cpu_read_end.clone();
        let sims = &sims;
        let on_page = move |src: &str, _: &crmbridge::engine::IngestStats| {
            let calls = [
                sims.rally.stats().total_requests(),
                sims.marketo.stats().total_requests(),
                sims.amocrm.stats().total_requests(),
            ];
            pages
                .lock()
                .unwrap()
                .push((src.to_string(), t0.elapsed(), calls));
            *cpu_read_end.lock().unwrap() = (cpu_seconds(), Mem::now());
        };
        engine
            .backfill(
                &BackfillOptions::default(),
                &CancellationToken::new(),
                &on_page,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let total = t0.elapsed();
    let cpu_total = cpu_seconds() - cpu0;
    stop.cancel();
    sampler.await.unwrap();
    // Before anything below renders records (which would itself cost memory).
    let mem_end = Mem::now();
    assert!(report.ok(), "backfill failed: {report:?}");

    let pages = std::mem::take(&mut *pages.lock().unwrap());
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    // Rally read: from the last page of the source read before it to its own last page.
    let rally_first = pages.iter().position(|(s, _, _)| s == "rally").unwrap();
    let read_start = if rally_first == 0 {
        Duration::ZERO
    } else {
        pages[rally_first - 1].1
    };
    let last_page = pages.last().unwrap();
    let read_end = pages.iter().rev().find(|(s, _, _)| s == "rally").unwrap().1;
    let done_at = |i: usize, goal: f64| {
        samples
            .iter()
            .find(|(_, v, _)| v[i] >= goal)
            .map(|(t, _, mem)| (*t, *mem))
            .unwrap_or((total, mem_end))
    };
    let (amo_n, mk_n) = (pushed(&metrics, "amocrm"), pushed(&metrics, "marketo"));
    // Backfill drains all targets at once, after the reads (the empty targets are read
    // first, in name order, then Rally): both push phases start at the end of the read.
    let (amo_end, mem_amo_end) = done_at(0, amo_n);
    let (mk_end, mem_mk_end) = done_at(1, mk_n);
    let stats = sims.stats();
    // Calls of the phase: Rally's are all reads; a target's push calls are those after the
    // last page was read (its own read of an empty CRM comes before).
    let calls = |k: &str| {
        let at_read_end = match k {
            "rally" => setup_calls[k],
            "marketo" => last_page.2[1],
            _ => last_page.2[2],
        };
        stats[k].total_requests() - at_read_end
    };
    let amo_in_sim = sims.amocrm.company_count();
    let mk_in_sim = sims.marketo.company_count();

    println!(
        "\n## Part 1: backfill of {n} companies seeded only in Rally (limits x{})",
        l.scale
    );
    println!(
        "scaled limits: Rally {} rps, Marketo {} calls/{} s, amoCRM {} rps (max_concurrent {}); batch Rally page {RALLY_PAGE}, Marketo {MARKETO_BATCH}, amoCRM {AMO_BATCH}",
        l.rally_rps(),
        l.marketo_calls(),
        Limits::MARKETO_WINDOW_S,
        l.amo_rps(),
        l.amo_concurrent()
    );
    println!(
        "records in targets after: marketo {mk_in_sim}, amocrm {amo_in_sim}; pushed marketo {mk_n}, amocrm {amo_n}; pending {:?}; failures {:?}",
        report.pending, report.failures
    );
    println!(
        "| phase | records | seconds | records/s | ceiling records/s | ratio | API calls of the phase | calls/record |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let row = |phase: &str, recs: f64, d: Duration, ceiling: f64, crm: &str| {
        let rate = recs / d.as_secs_f64();
        println!(
            "| {phase} | {recs:.0} | {:.1} | {rate:.0} | {ceiling:.0} | {:.2} | {} | {:.4} |",
            d.as_secs_f64(),
            rate / ceiling,
            calls(crm),
            calls(crm) as f64 / recs
        );
    };
    row(
        "read Rally",
        n as f64,
        read_end.saturating_sub(read_start),
        l.rally_rps() as f64 * RALLY_PAGE as f64,
        "rally",
    );
    row(
        "push amoCRM",
        amo_n,
        amo_end.saturating_sub(read_end),
        l.amo_rps() as f64 * AMO_BATCH as f64,
        "amocrm",
    );
    row(
        "push Marketo",
        mk_n,
        mk_end.saturating_sub(read_end),
        l.marketo_rps() * MARKETO_BATCH as f64,
        "marketo",
    );
    println!(
        "whole backfill: {:.1} s = {:.0} companies/s end to end",
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64()
    );
    for (k, s) in &stats {
        println!(
            "calls by endpoint, {k}: {:?}; most in flight at once: {}",
            s.requests, s.max_in_flight
        );
    }
    println!(
        "reads of the empty targets before the push: marketo {} calls, amocrm {} calls",
        last_page.2[1] - setup_calls["marketo"],
        last_page.2[2] - setup_calls["amocrm"]
    );
    println!("limit rejections: {}", rejections(&stats));
    println!(
        "VmRSS (live heap): after simulators seeded {mem_sims}, after connectors started {mem_engine}, after the read {}, amoCRM push done {mem_amo_end}, Marketo push done {mem_mk_end}, at end {mem_end}; store file {:.1} MiB",
        cpu_read_end.lock().unwrap().1,
        std::fs::metadata(dir.path().join("crmbridge.redb")).map_or(0, |m| m.len()) as f64
            / 1048576.0
    );
    let cpu_read = cpu_read_end.lock().unwrap().0 - cpu0;
    println!(
        "CPU (process incl. simulators): {cpu_total:.1} s total = {:.2} s per 10k companies; read phase {:.2} s per 10k; push phases {:.2} s per 10k (2 targets)",
        cpu_total / (n as f64 / 10_000.0),
        cpu_read / (n as f64 / 10_000.0),
        (cpu_total - cpu_read) / (n as f64 / 10_000.0),
    );
    println!(
        "peak RSS (VmHWM, process incl. simulators holding {n}+{n}+{n} records): {:.1} MiB; peak live heap {:.1} MiB",
        mib(status_kib("VmHWM:")),
        HEAP_PEAK.load(Ordering::Relaxed) as f64 / 1048576.0
    );
    // What the simulators hold is what stays allocated once crmbridge (engine, connectors,
    // store) is gone; the rest of the heap at the end was crmbridge's.
    // (The bench's own page log and 5 ms samples, a few MiB, are dropped first.)
    drop((engine, metrics, pages, samples));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let heap_sims = heap_kib();
    println!(
        "live heap at end: {:.1} MiB = simulators {:.1} MiB (heap left after dropping the engine) + crmbridge {:.1} MiB",
        mib(mem_end.heap),
        mib(heap_sims),
        mib(mem_end.heap.saturating_sub(heap_sims))
    );
    sims.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Part 2: scale
// ---------------------------------------------------------------------------------------

/// A synthetic Rally record from a seed universe that the simulators (seed 1) do not use.
fn synthetic(i: usize) -> VendorRecord {
    synthetic_record(i, "fill", Some("fill"), 1_600_000_000)
}

/// Child process: fills the store at `E2E_FILL_PATH` with `E2E_FILL_N` companies linked
/// to Rally (company, link, match keys, ledger; no outbox), one commit per 250 records.
fn role_fill() {
    let path = PathBuf::from(std::env::var("E2E_FILL_PATH").expect("E2E_FILL_PATH"));
    let n: usize = env_or("E2E_FILL_N", 0);
    let store = Arc::new(Store::open(&path).unwrap());
    let endpoints = [
        ("rally", CrmKind::Rally),
        ("marketo", CrmKind::Marketo),
        ("amocrm", CrmKind::Amocrm),
    ]
    .iter()
    .map(|(name, kind)| {
        Endpoint::new(
            name.to_string(),
            Arc::new(Offline(name.to_string())),
            Mapping::compile(*kind, &MappingRules::default()).unwrap(),
            Duration::from_secs(60),
        )
    })
    .collect();
    let settings = EngineSettings {
        match_keys: vec![MatchKeyKind::Domain, MatchKeyKind::ExternalCompanyId],
        ..Default::default()
    };
    let engine = Engine::new(store.clone(), endpoints, settings, Arc::new(Metrics::new()));
    let t0 = Instant::now();
    let page_size = 250;
    let mut i = 0;
    while i < n {
        let end = (i + page_size).min(n);
        let page = Page {
            records: (i..end).map(synthetic).collect(),
            malformed: vec![],
            next: Cursor(json!(end)),
            more: end < n,
        };
        engine.ingest_page("rally", &page, "fill:rally").unwrap();
        i = end;
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(engine);
    drop(store);
    println!(
        "fill (child process): {n} companies in {secs:.1} s = {:.0}/s; fill peak RSS {:.1} MiB",
        n as f64 / secs,
        mib(status_kib("VmHWM:"))
    );
}

/// A store pre-filled with `E2E_SCALE_FILL` companies (in a child process), then a short
/// live sync against small simulators with mutators; reports this process's RSS.
async fn part_scale() {
    let fill: usize = env_or("E2E_SCALE_FILL", 1_000_000);
    let universe: usize = env_or("E2E_SCALE_SIM_COMPANIES", 1_000);
    let secs: u64 = env_or("E2E_SCALE_SYNC_SECS", 20);
    let l = Limits {
        scale: env_or("E2E_SCALE", 10),
    };
    let dir = tempfile::tempdir_in(env_or("E2E_TMP", std::env::temp_dir())).unwrap();
    let store_path = dir.path().join("crmbridge.redb");
    if fill > 0 {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .env("E2E_ROLE", "fill")
            .env("E2E_FILL_PATH", &store_path)
            .env("E2E_FILL_N", fill.to_string())
            .status()
            .expect("fill child");
        assert!(status.success(), "fill failed: {status}");
    }
    let store_bytes = std::fs::metadata(&store_path).map(|m| m.len()).unwrap_or(0);
    let rss_start = status_kib("VmRSS:");

    let sims = Sims::start(l, overlapping_indices(universe)).await;
    let cfg = sims.config(l, dir.path(), &store_path, "1s");
    let metrics = Arc::new(Metrics::new());
    let rss_sims = status_kib("VmRSS:");
    let t_open = Instant::now();
    let store = open_store(&cfg).unwrap();
    let open_s = t_open.elapsed().as_secs_f64();
    let engine = build_engine(&cfg, store, metrics.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let rss_open = status_kib("VmRSS:");
    let sd = CancellationToken::new();
    let handle = engine.start(sd.clone());
    let muts = (
        sims.rally.spawn_mutator(5.0),
        sims.marketo.spawn_mutator(5.0),
        sims.amocrm.spawn_mutator(5.0),
    );
    let cpu0 = cpu_seconds();
    let mut rss_peak_sampled = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss_peak_sampled = rss_peak_sampled.max(status_kib("VmRSS:"));
    }
    drop(muts);
    sd.cancel();
    handle.wait().await;
    let cpu = cpu_seconds() - cpu0;
    let read: f64 = CRMS
        .iter()
        .map(|c| {
            metrics
                .get("crmbridge_records_read_total", &[("connector", c)])
                .unwrap_or(0.0)
        })
        .sum();
    let pushed_total: f64 = CRMS.iter().map(|c| pushed(&metrics, c)).sum();
    let companies = engine
        .store()
        .begin_read()
        .unwrap()
        .company_count()
        .unwrap_or(0);
    let stats = sims.stats();

    println!(
        "\n## Part 2: scale — {fill} companies pre-filled, {secs} s live sync against simulators of {universe}-company universe (limits x{})",
        l.scale
    );
    if fill > 0 {
        println!(
            "store file after fill: {store_bytes} bytes = {:.0} bytes per company (company, link, match keys, ledger)",
            store_bytes as f64 / fill as f64
        );
    }
    println!(
        "companies in store after sync: {companies}; records read {read:.0}, pushed {pushed_total:.0}; CPU {cpu:.1} s; store open {open_s:.2} s"
    );
    println!("limit rejections: {}", rejections(&stats));
    println!("| point | VmRSS MiB |");
    println!("|---|---:|");
    println!(
        "| process start (after fill child exited) | {:.1} |",
        mib(rss_start)
    );
    println!("| simulators started | {:.1} |", mib(rss_sims));
    println!(
        "| store opened, connectors started | {:.1} |",
        mib(rss_open)
    );
    println!("| max sampled during sync | {:.1} |", mib(rss_peak_sampled));
    println!(
        "| VmHWM (peak, whole process) | {:.1} |",
        mib(status_kib("VmHWM:"))
    );
    println!(
        "growth during sync (peak − before open): {:.1} MiB",
        mib(status_kib("VmHWM:").saturating_sub(rss_sims))
    );
    drop(engine);
    sims.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Part 3: latency
// ---------------------------------------------------------------------------------------

/// Where one company lives in each CRM.
#[derive(Clone, Debug)]
struct Ids {
    rally: String,
    marketo: i64,
    amocrm: i64,
}

fn amo_field(rec: &Value, name: &str) -> Option<String> {
    rec["custom_fields_values"]
        .as_array()?
        .iter()
        .find(|f| f["field_name"] == name)
        .and_then(|f| f["values"][0]["value"].as_str())
        .map(str::to_string)
}

fn amo_field_id(sims: &Sims, name: &str) -> i64 {
    sims.amocrm
        .dump()
        .iter()
        .filter_map(|r| r["custom_fields_values"].as_array().cloned())
        .flatten()
        .find(|f| f["field_name"] == name)
        .and_then(|f| f["field_id"].as_i64())
        .expect("amoCRM field id")
}

/// Every company by domain with its id in each CRM (only those present in all three).
fn ids_by_domain(sims: &Sims) -> Vec<Ids> {
    let mut r = BTreeMap::new();
    for rec in sims.rally.dump() {
        if let Some(d) = rec["domain"].as_str().and_then(normalize_domain) {
            r.insert(d, rec["id"].as_str().unwrap().to_string());
        }
    }
    let mut m = BTreeMap::new();
    for rec in sims.marketo.dump() {
        if let Some(d) = rec["website"].as_str().and_then(normalize_domain) {
            m.insert(d, rec["id"].as_i64().unwrap());
        }
    }
    let mut out = Vec::new();
    for rec in sims.amocrm.dump() {
        if let Some(d) = amo_field(&rec, "Domain").and_then(|d| normalize_domain(&d))
            && let (Some(rid), Some(mid)) = (r.get(&d), m.get(&d))
        {
            out.push(Ids {
                rally: rid.clone(),
                marketo: *mid,
                amocrm: rec["id"].as_i64().unwrap(),
            });
        }
    }
    out
}

fn city_in(sims: &Sims, crm: usize, ids: &Ids) -> Option<String> {
    match crm {
        0 => sims
            .rally
            .get(&ids.rally)
            .and_then(|r| r["city"].as_str().map(str::to_string)),
        1 => sims
            .marketo
            .get(ids.marketo)
            .and_then(|r| r["billingCity"].as_str().map(str::to_string)),
        _ => sims
            .amocrm
            .get(ids.amocrm)
            .and_then(|r| amo_field(&r, "City")),
    }
}

const CRM_LABEL: [&str; 3] = ["Rally", "Marketo", "amoCRM"];

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// K city changes, round-robin over the three CRMs at a fixed rate, each on a different
/// company; arrival is seen by polling the other two simulators' records every 5 ms.
async fn part_latency() {
    let k: usize = env_or("E2E_LAT_CHANGES", 1000);
    let rate: f64 = env_or("E2E_LAT_RATE", 20.0);
    let universe: usize = env_or("E2E_LAT_COMPANIES", 1000);
    let poll: String = env_or("E2E_POLL", "1s".to_string());
    let l = Limits {
        scale: env_or("E2E_SCALE", 10),
    };
    let dir = tempfile::tempdir().unwrap();
    let sims = Arc::new(Sims::start(l, overlapping_indices(universe)).await);
    let cfg = sims.config(l, dir.path(), &dir.path().join("crmbridge.redb"), &poll);
    let metrics = Arc::new(Metrics::new());
    let engine = build_engine(&cfg, open_store(&cfg).unwrap(), metrics.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let report = engine
        .backfill(
            &BackfillOptions::default(),
            &CancellationToken::new(),
            &|_, _| {},
        )
        .await
        .unwrap();
    assert!(report.ok(), "backfill failed: {report:?}");
    let companies = ids_by_domain(&sims);
    assert!(
        companies.len() >= k.min(universe),
        "only {} companies in all three CRMs after backfill",
        companies.len()
    );
    let amo_city = amo_field_id(&sims, "City");
    let sd = CancellationToken::new();
    let handle = engine.start(sd.clone());
    // Let the first incremental cycles (which re-read what the backfill wrote) pass.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sims.rally.reset_stats();
    sims.marketo.reset_stats();
    sims.amocrm.reset_stats();

    // (company index, source crm, target crm, changed at, value)
    type Pending = Vec<(usize, usize, usize, Instant, String)>;
    let pending: Arc<Mutex<Pending>> = Arc::default();
    // (source crm, target crm, seconds from change to arrival)
    let arrivals: Arc<Mutex<Vec<(usize, usize, f64)>>> = Arc::default();
    let watch_stop = CancellationToken::new();
    let watcher = {
        let (sims, pending, arrivals, stop) = (
            sims.clone(),
            pending.clone(),
            arrivals.clone(),
            watch_stop.clone(),
        );
        let companies = companies.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let snapshot = pending.lock().unwrap().clone();
                let mut seen = Vec::new();
                for (j, (idx, _, target, at, value)) in snapshot.iter().enumerate() {
                    if city_in(&sims, *target, &companies[*idx]).as_deref() == Some(value) {
                        seen.push((j, at.elapsed().as_secs_f64()));
                    }
                }
                if !seen.is_empty() {
                    let mut p = pending.lock().unwrap();
                    let mut a = arrivals.lock().unwrap();
                    for (j, secs) in seen.iter().rev() {
                        let (_, src, target, _, _) = p.remove(*j);
                        a.push((src, target, *secs));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let gap = Duration::from_secs_f64(1.0 / rate);
    let t0 = Instant::now();
    for j in 0..k {
        let next = t0 + gap * j as u32;
        tokio::time::sleep_until(next.into()).await;
        let idx = j % companies.len();
        let ids = &companies[idx];
        let src = j % 3;
        let value = format!("Lat-{j}");
        {
            // Register before the change so the watcher cannot miss an early arrival.
            let mut p = pending.lock().unwrap();
            let at = Instant::now();
            for t in (0..3).filter(|t| *t != src) {
                p.push((idx, src, t, at, value.clone()));
            }
        }
        match src {
            0 => {
                sims.rally.update(&ids.rally, json!({"city": value}));
            }
            1 => {
                sims.marketo
                    .update(ids.marketo, json!({"billingCity": value}));
            }
            _ => {
                sims.amocrm.update(
                    ids.amocrm,
                    json!({"custom_fields_values": [{"field_id": amo_city, "values": [{"value": value}]}]}),
                );
            }
        }
    }
    let changes_secs = t0.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watch_stop.cancel();
    watcher.await.unwrap();
    sd.cancel();
    handle.wait().await;
    let lost = pending.lock().unwrap().len();
    let arrivals = arrivals.lock().unwrap().clone();
    let stats = sims.stats();

    println!(
        "\n## Part 3: latency — {k} changes at {rate}/s ({changes_secs:.0} s), round-robin over the 3 CRMs, {universe}-company universe, poll interval {poll}, limits x{}",
        l.scale
    );
    println!("| path | arrivals | p50 s | p90 s | p99 s | max s |");
    println!("|---|---:|---:|---:|---:|---:|");
    let row = |label: String, mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        println!(
            "| {label} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            v.len(),
            percentile(&v, 0.5),
            percentile(&v, 0.9),
            percentile(&v, 0.99),
            v.last().copied().unwrap_or(f64::NAN)
        );
    };
    for (s, src) in CRM_LABEL.iter().enumerate() {
        for t in (0..3).filter(|t| *t != s) {
            let v = arrivals
                .iter()
                .filter(|(ss, tt, _)| *ss == s && *tt == t)
                .map(|a| a.2)
                .collect();
            row(format!("{src} → {}", CRM_LABEL[t]), v);
        }
    }
    row("all".to_string(), arrivals.iter().map(|a| a.2).collect());
    println!("not arrived within 60 s after the last change: {lost}");
    println!(
        "limit rejections during the changes: {}",
        rejections(&stats)
    );
    for (crm, s) in &stats {
        println!("calls during the changes, {crm}: {:?}", s.requests);
    }
    println!(
        "peak RSS (process incl. simulators): {:.1} MiB",
        mib(status_kib("VmHWM:"))
    );
    drop(engine);
    match Arc::try_unwrap(sims) {
        Ok(s) => s.shutdown().await,
        Err(_) => unreachable!("watcher finished"),
    }
}

// ---------------------------------------------------------------------------------------

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn main() {
    // RUST_LOG=crmbridge=info (etc.) shows the product's logs on stderr.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let role = std::env::var("E2E_ROLE").unwrap_or_default();
    match role.as_str() {
        "fill" => return role_fill(),
        "backfill" => return runtime().block_on(part_backfill()),
        "scale" => return runtime().block_on(part_scale()),
        "latency" => return runtime().block_on(part_latency()),
        "" => {}
        other => panic!("unknown E2E_ROLE {other}"),
    }
    let parts: String = env_or("E2E_PARTS", "backfill,scale,latency".to_string());
    println!(
        "crmbridge e2e bench on {} cores ({}); parts: {parts}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |s| s.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    );
    for part in parts.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let t0 = Instant::now();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .env("E2E_ROLE", part)
            .status()
            .expect("child");
        println!(
            "({part}: {:.0} s wall, exit {status})",
            t0.elapsed().as_secs_f64()
        );
    }
}
