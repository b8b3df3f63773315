//! Wire-faithful simulator of Marketo's REST Companies API: OAuth identity, describe, schema
//! fields, query (also as `POST ?_method=GET`), sync, delete and daily usage, with Marketo's
//! HTTP-200 error bodies, its 606/615/607 limits, 413/414, and injectable faults.
//! Loopback only; it must never stand in for a real instance outside tests and demos.
//!
//! Assumptions where Marketo's documents are silent (chosen to match real instances):
//! - a sync that updates a record bumps `updatedAt` even when no value changed;
//! - the daily quota resets at midnight UTC−6 (US Central standard time, DST ignored);
//! - 601/602 answers do not count towards limits; 606 and 615 rejections count towards the
//!   daily quota, 607 rejections do not;
//! - query results are ordered by filter value, then id, and page with a keyset token.

mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes, to_bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::sim::common::{Fault, Faults, InFlight, Stats, StatsSnapshot, seed_company};
use store::{Action, FIELDS, FieldDef, KeyField, MAX_BATCH, QueryCursor, Store, Stored};

/// Largest request body Marketo accepts (413 beyond).
const MAX_PAYLOAD: usize = 1024 * 1024;
/// Longest request URI Marketo accepts (414 beyond).
const MAX_URI: usize = 8 * 1024;
/// First id handed out by default; Marketo company ids are positive integers that only grow.
const FIRST_ID: i64 = 1000;
/// The `scope` the identity service reports: the API-only user the client belongs to.
const API_USER: &str = "api.user@sim.marketo.example";

/// How a simulated Marketo instance behaves.
#[derive(Clone)]
pub struct MarketoSimConfig {
    /// Seed of the shared company universe.
    pub seed: u64,
    /// Which universe companies this instance holds initially (ids from `first_id` in this
    /// order).
    pub seed_indices: Vec<usize>,
    /// The first company id handed out (1000 by default; real instances start anywhere).
    pub first_id: i64,
    /// The LaunchPoint client id accepted by the identity service.
    pub client_id: String,
    /// The LaunchPoint client secret accepted by the identity service.
    pub client_secret: String,
    /// Lifetime of an access token.
    pub token_ttl: Duration,
    /// Calls admitted per rolling `window` before 606.
    pub calls_per_window: usize,
    /// Length of the rolling rate window.
    pub window: Duration,
    /// Calls in flight at once before 615.
    pub max_concurrent: usize,
    /// Calls per day before 607.
    pub daily_quota: u64,
    /// Simulates native CRM sync: every write is skipped with reason 1018.
    pub read_only: bool,
    /// Perturbs some seeded values deterministically, so instances seeded alike still differ.
    pub variant: u8,
}

impl Default for MarketoSimConfig {
    fn default() -> Self {
        MarketoSimConfig {
            seed: 1,
            seed_indices: (0..100).collect(),
            first_id: FIRST_ID,
            client_id: "marketo-client".into(),
            client_secret: "marketo-secret".into(),
            token_ttl: Duration::from_secs(3600),
            calls_per_window: 100,
            window: Duration::from_secs(20),
            max_concurrent: 10,
            daily_quota: 50_000,
            read_only: false,
            variant: 0,
        }
    }
}

impl fmt::Debug for MarketoSimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MarketoSimConfig")
            .field("seed", &self.seed)
            .field("seed_indices", &self.seed_indices.len())
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("token_ttl", &self.token_ttl)
            .field("calls_per_window", &self.calls_per_window)
            .field("window", &self.window)
            .field("max_concurrent", &self.max_concurrent)
            .field("daily_quota", &self.daily_quota)
            .field("read_only", &self.read_only)
            .field("variant", &self.variant)
            .finish()
    }
}

/// One change made behind the API's back (as a Marketo user or another integration would).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// A company was created with this id.
    Created(i64),
    /// The company with this id was changed.
    Updated(i64),
    /// The company with this id was deleted.
    Deleted(i64),
}

/// A background task mutating companies; it stops when dropped.
#[derive(Debug)]
pub struct MutatorHandle {
    cancel: CancellationToken,
}

impl Drop for MutatorHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Tokens issued so far; the last issued valid one is handed out again until it expires.
#[derive(Debug, Default)]
struct Tokens {
    expiry: HashMap<String, Instant>,
    current: Option<String>,
}

/// Calls counted towards the daily quota, per Marketo day.
#[derive(Debug)]
struct Usage {
    day: NaiveDate,
    calls: u64,
}

/// State shared by the server tasks and the test-facing handle.
struct Inner {
    cfg: MarketoSimConfig,
    store: RwLock<Store>,
    faults: Faults,
    stats: Stats,
    window: crate::sim::common::RollingWindow,
    tokens: Mutex<Tokens>,
    daily_quota: AtomicU64,
    usage: Mutex<Usage>,
    request_seq: AtomicU64,
    rng: Mutex<StdRng>,
    /// Universe index of the next company a mutation creates.
    next_universe_index: AtomicUsize,
}

/// A running simulated Marketo instance on loopback.
pub struct MarketoSim {
    inner: Arc<Inner>,
    addr: SocketAddr,
    cancel: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

/// The day the quota counts in: Marketo resets at midnight US Central time.
fn marketo_day(now: DateTime<Utc>) -> NaiveDate {
    (now - chrono::Duration::hours(6)).date_naive()
}

fn now_utc() -> DateTime<Utc> {
    Utc::now()
}

/// The values of universe company `idx` as this instance stores them.
fn seeded_values(seed: u64, idx: usize, variant: u8) -> BTreeMap<&'static str, Stored> {
    let s = seed_company(seed, idx);
    let mut employees = s.employee_count;
    let mut phone = s.phone.clone();
    let v = variant as usize;
    if v != 0 && (idx + v).is_multiple_of(4) {
        employees += v as i64;
    }
    if v != 0 && (idx + v).is_multiple_of(6) {
        phone = format!("{phone} x{v}");
    }
    let mut m = BTreeMap::new();
    if !idx.is_multiple_of(3) {
        m.insert("externalCompanyId", Stored::Text(format!("EXT-{idx}")));
    }
    m.insert("company", Stored::Text(s.name));
    m.insert("website", Stored::Text(format!("https://{}", s.domain)));
    m.insert("mainPhone", Stored::Text(phone));
    m.insert("industry", Stored::Text(s.industry));
    m.insert("numberOfEmployees", Stored::Int(employees));
    m.insert("annualRevenue", Stored::Money(s.annual_revenue));
    m.insert("billingCity", Stored::Text(s.city));
    m.insert("billingCountry", Stored::Text(s.country));
    m
}

impl Inner {
    fn new(cfg: MarketoSimConfig) -> Self {
        let mut store = Store::new(cfg.first_id);
        let base = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
        for &idx in &cfg.seed_indices {
            let created = base + chrono::Duration::minutes(idx as i64);
            let updated = created + chrono::Duration::seconds(((idx * 7919) % 7_776_000) as i64);
            store.insert(seeded_values(cfg.seed, idx, cfg.variant), created, updated);
        }
        let next_universe = cfg.seed_indices.iter().max().map_or(0, |m| m + 1);
        Inner {
            store: RwLock::new(store),
            faults: Faults::new(cfg.seed),
            stats: Stats::default(),
            window: crate::sim::common::RollingWindow::new(cfg.calls_per_window, cfg.window),
            tokens: Mutex::new(Tokens::default()),
            daily_quota: AtomicU64::new(cfg.daily_quota),
            usage: Mutex::new(Usage {
                day: marketo_day(now_utc()),
                calls: 0,
            }),
            request_seq: AtomicU64::new(0),
            rng: Mutex::new(StdRng::seed_from_u64(cfg.seed ^ 0x6d61_726b)),
            next_universe_index: AtomicUsize::new(next_universe),
            cfg,
        }
    }

    /// A Marketo-style request id: four hex digits, `#`, a hex millisecond clock.
    fn request_id(&self) -> String {
        let n = self.request_seq.fetch_add(1, Ordering::Relaxed);
        let ms = Utc::now().timestamp_millis();
        format!(
            "{:04x}#{ms:x}",
            (n.wrapping_mul(0x9e37) ^ ms as u64) & 0xffff
        )
    }

    fn calls_today(&self) -> u64 {
        let mut u = self.usage.lock().unwrap();
        let today = marketo_day(now_utc());
        if u.day != today {
            u.day = today;
            u.calls = 0;
        }
        u.calls
    }

    fn count_call(&self) {
        self.calls_today();
        self.usage.lock().unwrap().calls += 1;
    }

    /// The current token (issuing a new one if none is valid) and its seconds left.
    fn token(&self) -> (String, u64) {
        let mut t = self.tokens.lock().unwrap();
        let now = Instant::now();
        if let Some(cur) = &t.current {
            let left = t.expiry[cur].saturating_duration_since(now).as_secs();
            if left > 0 {
                return (cur.clone(), left);
            }
        }
        let value = format!("{}:sj", uuid::Uuid::new_v4());
        t.expiry.insert(value.clone(), now + self.cfg.token_ttl);
        t.current = Some(value.clone());
        // A fresh token reports one second less than its lifetime, as Marketo's does.
        (value, self.cfg.token_ttl.as_secs().saturating_sub(1))
    }

    /// `Ok` for a valid token, else the Marketo error code (601 invalid, 602 expired).
    fn check_token(&self, token: Option<&str>) -> Result<(), &'static str> {
        let t = self.tokens.lock().unwrap();
        match token.and_then(|tok| t.expiry.get(tok)) {
            None => Err("601"),
            Some(exp) if *exp <= Instant::now() => Err("602"),
            Some(_) => Ok(()),
        }
    }

    /// Applies the daily quota, concurrency and rate limits to one authenticated call.
    fn admit(&self) -> Result<InFlight<'_>, &'static str> {
        if self.calls_today() >= self.daily_quota.load(Ordering::SeqCst) {
            self.stats.rejection("607");
            return Err("607");
        }
        let (guard, in_flight) = self.stats.enter();
        if in_flight > self.cfg.max_concurrent {
            self.count_call();
            self.stats.rejection("615");
            return Err("615");
        }
        if !self.window.try_admit() {
            self.count_call();
            self.stats.rejection("606");
            return Err("606");
        }
        self.count_call();
        Ok(guard)
    }

    fn ok(&self, result: Vec<Value>, extra: Map<String, Value>) -> Response {
        let mut m = Map::new();
        m.insert("requestId".into(), json!(self.request_id()));
        m.insert("result".into(), Value::Array(result));
        m.insert("success".into(), json!(true));
        m.extend(extra);
        marketo_json(&Value::Object(m))
    }

    fn fail(&self, code: &str, message: &str) -> Response {
        marketo_json(&json!({
            "requestId": self.request_id(),
            "success": false,
            "errors": [{"code": code, "message": message}],
        }))
    }

    fn mutate_random(&self, n: usize) -> Vec<Mutation> {
        let mut rng = self.rng.lock().unwrap();
        let mut store = self.store.write().unwrap();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let roll = rng.random_range(0..10);
            let target = store
                .id_bounds()
                .and_then(|(lo, hi)| store.id_near(rng.random_range(lo..=hi)));
            let now = now_utc();
            match (roll, target) {
                (0..=1, _) | (_, None) => {
                    let idx = self.next_universe_index.fetch_add(1, Ordering::Relaxed);
                    let mut values = seeded_values(self.cfg.seed, idx, self.cfg.variant);
                    if let Some(Stored::Text(ext)) = values.get("externalCompanyId")
                        && store.id_by_external(ext).is_some()
                    {
                        values.remove("externalCompanyId");
                    }
                    out.push(Mutation::Created(store.insert(values, now, now)));
                }
                (2..=7, Some(id)) => {
                    let change = match rng.random_range(0..4) {
                        0 => (
                            "numberOfEmployees",
                            Stored::Int(rng.random_range(1..50_000)),
                        ),
                        1 => (
                            "mainPhone",
                            Stored::Text(format!("+1-555-{:04}", rng.random_range(0..10_000))),
                        ),
                        2 => (
                            "industry",
                            Stored::Text(
                                ["Technology", "Retail", "Finance", "Energy", "Media"]
                                    [rng.random_range(0..5)]
                                .into(),
                            ),
                        ),
                        _ => (
                            "annualRevenue",
                            Stored::Money(rust_decimal::Decimal::new(
                                rng.random_range(0..100_000_000_000i64),
                                2,
                            )),
                        ),
                    };
                    store.apply(id, vec![(change.0, Some(change.1))], now);
                    out.push(Mutation::Updated(id));
                }
                (_, Some(id)) => {
                    store.remove(id);
                    out.push(Mutation::Deleted(id));
                }
            }
        }
        out
    }

    /// Converts a UI-style patch; panics on unknown fields or invalid values, which are
    /// mistakes in the test that calls it.
    fn ui_changes(patch: &Value) -> Vec<(&'static str, Option<Stored>)> {
        let obj = patch
            .as_object()
            .unwrap_or_else(|| panic!("Marketo sim: fields must be a JSON object, got {patch}"));
        obj.iter()
            .filter(|(k, _)| !matches!(k.as_str(), "id" | "createdAt" | "updatedAt"))
            .map(|(k, v)| {
                let f = store::field(k)
                    .unwrap_or_else(|| panic!("Marketo sim: no company field '{k}'"));
                let stored = store::coerce(f, v)
                    .unwrap_or_else(|r| panic!("Marketo sim: field '{k}': {}", r.message));
                (f.name, stored)
            })
            .collect()
    }
}

impl MarketoSim {
    /// Starts an instance listening on `addr` (use `127.0.0.1:0`), seeded per `cfg`.
    pub async fn start(addr: SocketAddr, cfg: MarketoSimConfig) -> std::io::Result<MarketoSim> {
        let inner = Arc::new(Inner::new(cfg));
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = router(inner.clone());
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
        Ok(MarketoSim {
            inner,
            addr,
            cancel,
            server: Some(server),
        })
    }

    /// The instance root, `http://127.0.0.1:PORT`; REST is under `/rest`, identity under
    /// `/identity`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The fault injector; configure it with [`Faults::set`].
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// Request, rejection and fault counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Clears the counters of [`MarketoSim::stats`].
    pub fn reset_stats(&self) {
        self.inner.stats.reset();
    }

    /// Calls counted towards today's quota.
    pub fn calls_today(&self) -> u64 {
        self.inner.calls_today()
    }

    /// Changes the daily quota (calls already made today still count).
    pub fn set_daily_quota(&self, q: u64) {
        self.inner.daily_quota.store(q, Ordering::SeqCst);
    }

    /// Expires every token issued so far: the next REST call with one answers 602.
    pub fn expire_tokens(&self) {
        let mut t = self.inner.tokens.lock().unwrap();
        let now = Instant::now();
        for exp in t.expiry.values_mut() {
            *exp = now;
        }
    }

    /// Number of companies; cheap, unlike `dump().len()`, which renders every record.
    pub fn company_count(&self) -> usize {
        self.inner.store.read().unwrap().len()
    }

    /// Every company with every non-null field, as the API would return it, sorted by id.
    pub fn dump(&self) -> Vec<Value> {
        let store = self.inner.store.read().unwrap();
        store.all().map(|c| c.render_all()).collect()
    }

    /// Company `id` with every non-null field, if it exists.
    pub fn get(&self, id: i64) -> Option<Value> {
        self.inner
            .store
            .read()
            .unwrap()
            .get(id)
            .map(|c| c.render_all())
    }

    /// Creates a company as a Marketo user would in the UI and returns it.
    ///
    /// # Panics
    /// On unknown fields, invalid values or an `externalCompanyId` already in use.
    pub fn create(&self, fields: Value) -> Value {
        let changes = Inner::ui_changes(&fields);
        let mut store = self.inner.store.write().unwrap();
        let values: BTreeMap<&'static str, Stored> = changes
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        if let Some(Stored::Text(ext)) = values.get("externalCompanyId") {
            assert!(
                store.id_by_external(ext).is_none(),
                "Marketo sim: externalCompanyId '{ext}' already in use"
            );
        }
        let now = now_utc();
        let id = store.insert(values, now, now);
        store.get(id).expect("just inserted").render_all()
    }

    /// Changes company `id` as a Marketo user would (bumping `updatedAt`); `None` if absent.
    ///
    /// # Panics
    /// On unknown fields, invalid values or an `externalCompanyId` already in use.
    pub fn update(&self, id: i64, patch: Value) -> Option<Value> {
        let changes = Inner::ui_changes(&patch);
        let mut store = self.inner.store.write().unwrap();
        for (k, v) in &changes {
            if let (&"externalCompanyId", Some(Stored::Text(ext))) = (k, v) {
                let owner = store.id_by_external(ext);
                assert!(
                    owner.is_none() || owner == Some(id),
                    "Marketo sim: externalCompanyId '{ext}' already in use"
                );
            }
        }
        store
            .apply(id, changes, now_utc())
            .then(|| store.get(id).expect("just updated").render_all())
    }

    /// Deletes company `id`; false if it did not exist.
    pub fn delete(&self, id: i64) -> bool {
        self.inner.store.write().unwrap().remove(id)
    }

    /// Makes `n` random changes (about 20% creations, 60% updates, 20% deletions).
    pub fn mutate_random(&self, n: usize) -> Vec<Mutation> {
        self.inner.mutate_random(n)
    }

    /// Mutates companies in the background at about `per_second` changes a second until the
    /// handle is dropped. Must be called within a Tokio runtime.
    pub fn spawn_mutator(&self, per_second: f64) -> MutatorHandle {
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let inner = self.inner.clone();
        let period = Duration::from_secs_f64(1.0 / per_second.max(0.001));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => { inner.mutate_random(1); }
                }
            }
        });
        MutatorHandle { cancel }
    }

    /// Stops the server and waits (briefly) for its connections to finish.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(server) = self.server.take() {
            let abort = server.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), server)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl fmt::Debug for MarketoSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the store: 100k companies in a panic message help nobody.
        f.debug_struct("MarketoSim")
            .field("addr", &self.addr)
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl Drop for MarketoSim {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/identity/oauth/token", get(identity).post(identity))
        .route(
            "/rest/v1/companies.json",
            get(companies_get).post(companies_post),
        )
        .route("/rest/v1/companies/delete.json", post(companies_delete))
        .route("/rest/v1/companies/describe.json", get(describe))
        .route("/rest/v1/companies/schema/fields.json", get(schema_fields))
        .route(
            "/rest/v1/companies/schema/fields/{name}",
            get(schema_field_by_name),
        )
        .route("/rest/v1/stats/usage.json", get(usage))
        .layer(middleware::from_fn_with_state(inner.clone(), gate))
        .with_state(inner)
}

/// A JSON answer with Marketo's content type.
fn marketo_json(v: &Value) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json;charset=UTF-8"),
        )],
        v.to_string(),
    )
        .into_response()
}

fn plain_status(status: StatusCode) -> Response {
    let body =
        format!("<html><head><title>{status}</title></head><body><h1>{status}</h1></body></html>");
    (status, [(header::CONTENT_TYPE, "text/html")], body).into_response()
}

/// The endpoint name statistics are kept under.
fn endpoint_key(method: &Method, path: &str) -> String {
    let path = if path.starts_with("/rest/v1/companies/schema/fields/") {
        "/rest/v1/companies/schema/fields/{fieldApiName}.json"
    } else {
        path
    };
    format!("{method} {path}")
}

fn bearer(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    if let Some(h) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, tok) = h.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| tok.trim().to_string());
    }
    // The deprecated query parameter still works on real instances.
    form_pairs(uri.query().unwrap_or("").as_bytes()).remove("access_token")
}

fn form_pairs(raw: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(raw).into_owned().collect()
}

/// Front door of every request: size limits, statistics, faults, auth and call limits.
async fn gate(State(inner): State<Arc<Inner>>, req: Request, next: Next) -> Response {
    let mut endpoint = endpoint_key(req.method(), req.uri().path());
    // A query sent as POST is a read: keep it apart from sync calls in the statistics.
    if form_pairs(req.uri().query().unwrap_or("").as_bytes())
        .get("_method")
        .map(String::as_str)
        == Some("GET")
    {
        endpoint.push_str("?_method=GET");
    }
    inner.stats.request(&endpoint);
    if req.uri().to_string().len() > MAX_URI {
        return plain_status(StatusCode::URI_TOO_LONG);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_PAYLOAD) {
        return plain_status(StatusCode::PAYLOAD_TOO_LARGE);
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_PAYLOAD).await else {
        return plain_status(StatusCode::PAYLOAD_TOO_LARGE);
    };
    let fault = inner.faults.pick();
    if fault.is_some() {
        inner.stats.fault();
    }
    if let Some(Fault::ServerError(code)) = fault {
        return plain_status(StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY));
    }
    let mut _in_flight = None;
    if parts.uri.path().starts_with("/rest/") {
        let token = bearer(&parts.headers, &parts.uri);
        match inner.check_token(token.as_deref()) {
            Err("602") => return inner.fail("602", "Access token expired"),
            Err(code) => return inner.fail(code, "Access token invalid"),
            Ok(()) => {}
        }
        if fault == Some(Fault::Throttled) {
            // Counted apart from real limit rejections: the caller kept to the limits.
            let (code, msg) = if inner.stats.fault_count() % 2 == 0 {
                ("606", "Max rate limit '100' exceeded with in '20' secs")
            } else {
                ("615", "Concurrent access limit reached")
            };
            inner.stats.rejection(&format!("{code}-injected"));
            return inner.fail(code, msg);
        }
        match inner.admit() {
            Ok(guard) => _in_flight = Some(guard),
            Err("607") => return inner.fail("607", "Daily quota reached"),
            Err("615") => return inner.fail("615", "Concurrent access limit reached"),
            Err(code) => {
                let msg = format!(
                    "Max rate limit '{}' exceeded with in '{}' secs",
                    inner.cfg.calls_per_window,
                    inner.cfg.window.as_secs()
                );
                return inner.fail(code, &msg);
            }
        }
    }
    let latency = inner.faults.extra_latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(Fault::Slow(by)) = fault {
        tokio::time::sleep(by).await;
    }
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    match fault {
        Some(Fault::Malformed) => {
            let (parts, body) = resp.into_parts();
            let full = to_bytes(body, usize::MAX).await.unwrap_or_default();
            let cut = full.slice(..full.len() / 2);
            let mut parts = parts;
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(cut))
        }
        Some(Fault::DropConnection) => {
            let (mut parts, body) = resp.into_parts();
            let full = to_bytes(body, usize::MAX).await.unwrap_or_default();
            let head = full.slice(..full.len() / 2);
            parts.headers.remove(header::CONTENT_LENGTH);
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(head),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "simulated dropped connection",
                )),
            ];
            Response::from_parts(parts, Body::from_stream(futures::stream::iter(chunks)))
        }
        _ => resp,
    }
}

async fn identity(State(inner): State<Arc<Inner>>, uri: Uri, body: Bytes) -> Response {
    let mut params = form_pairs(uri.query().unwrap_or("").as_bytes());
    params.extend(form_pairs(&body));
    let oauth_error = |status: StatusCode, error: &str, description: &str| {
        (
            status,
            [(header::CONTENT_TYPE, "application/json;charset=UTF-8")],
            json!({"error": error, "error_description": description}).to_string(),
        )
            .into_response()
    };
    match params.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {}
        Some(other) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!("Unsupported grant type: {other}"),
            );
        }
        None => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing grant type",
            );
        }
    }
    let good = params.get("client_id") == Some(&inner.cfg.client_id)
        && params.get("client_secret") == Some(&inner.cfg.client_secret);
    if !good {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Bad client credentials",
        );
    }
    let (token, left) = inner.token();
    marketo_json(&json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": left,
        "scope": API_USER,
    }))
}

async fn describe(State(inner): State<Arc<Inner>>) -> Response {
    let fields: Vec<Value> = FIELDS.iter().map(store::describe_json).collect();
    inner.ok(
        vec![json!({
            "name": "Company",
            "description": "Company object",
            "createdAt": "2015-05-11T17:11:32Z",
            "updatedAt": "2015-05-11T17:11:32Z",
            "idField": "id",
            "dedupeFields": ["externalCompanyId"],
            "searchableFields": [["externalCompanyId"], ["id"], ["company"]],
            "fields": fields,
        })],
        Map::new(),
    )
}

/// Decodes a schema-fields paging token into an offset.
fn fields_offset(token: &str) -> Option<usize> {
    let raw = store::base32_decode(token)?;
    String::from_utf8(raw)
        .ok()?
        .strip_prefix("fields:")?
        .parse()
        .ok()
}

fn parse_batch_size(raw: Option<&String>) -> Result<usize, String> {
    match raw {
        None => Ok(MAX_BATCH),
        Some(s) => match s.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_BATCH).contains(&n) => Ok(n),
            _ => Err(format!("Invalid batchSize '{s}': must be 1 to {MAX_BATCH}")),
        },
    }
}

async fn schema_fields(State(inner): State<Arc<Inner>>, uri: Uri) -> Response {
    let params = form_pairs(uri.query().unwrap_or("").as_bytes());
    let batch = match parse_batch_size(params.get("batchSize")) {
        Ok(b) => b,
        Err(msg) => return inner.fail("1003", &msg),
    };
    let offset = match params.get("nextPageToken") {
        None => 0,
        Some(t) => match fields_offset(t) {
            Some(o) => o,
            None => return inner.fail("1003", "Invalid nextPageToken"),
        },
    };
    let page: Vec<Value> = FIELDS
        .iter()
        .skip(offset)
        .take(batch)
        .map(store::schema_json)
        .collect();
    let end = offset + page.len();
    let more = end < FIELDS.len();
    let mut extra = Map::new();
    if more {
        extra.insert(
            "nextPageToken".into(),
            json!(store::base32_encode(format!("fields:{end}").as_bytes())),
        );
    }
    extra.insert("moreResult".into(), json!(more));
    inner.ok(page, extra)
}

async fn schema_field_by_name(
    State(inner): State<Arc<Inner>>,
    Path(name): Path<String>,
) -> Response {
    let Some(name) = name.strip_suffix(".json") else {
        return plain_status(StatusCode::NOT_FOUND);
    };
    match store::field(name) {
        Some(f) => inner.ok(vec![store::schema_json(f)], Map::new()),
        None => inner.fail("1006", &format!("Field '{name}' not found")),
    }
}

async fn usage(State(inner): State<Arc<Inner>>) -> Response {
    let total = inner.calls_today();
    let day = marketo_day(now_utc());
    inner.ok(
        vec![json!({
            "date": day.format("%Y-%m-%d").to_string(),
            "total": total,
            "users": [{"userId": API_USER, "count": total}],
        })],
        Map::new(),
    )
}

async fn companies_get(State(inner): State<Arc<Inner>>, uri: Uri) -> Response {
    let params = form_pairs(uri.query().unwrap_or("").as_bytes());
    query(&inner, &params)
}

async fn companies_post(
    State(inner): State<Arc<Inner>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut params = form_pairs(uri.query().unwrap_or("").as_bytes());
    if params.get("_method").map(String::as_str) == Some("GET") {
        params.extend(form_pairs(&body));
        return query(&inner, &params);
    }
    let req = match json_body(&inner, &headers, &body) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let action = match req.get("action") {
        None | Some(Value::Null) => Action::CreateOrUpdate,
        Some(v) => match v.as_str().and_then(Action::parse) {
            Some(a) => a,
            None => return inner.fail("1003", &format!("Invalid action '{v}'")),
        },
    };
    let by = match key_field(&inner, &req, "dedupeBy") {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if action == Action::CreateOnly && by == KeyField::Id {
        return inner.fail(
            "1003",
            "dedupeBy 'idField' is not allowed with action 'createOnly'",
        );
    }
    let input = match batch_input(&inner, &req) {
        Ok(i) => i,
        Err(resp) => return resp,
    };
    let result =
        inner
            .store
            .write()
            .unwrap()
            .sync(action, by, input, now_utc(), inner.cfg.read_only);
    inner.ok(result, Map::new())
}

async fn companies_delete(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match json_body(&inner, &headers, &body) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let by = match key_field(&inner, &req, "deleteBy") {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let input = match batch_input(&inner, &req) {
        Ok(i) => i,
        Err(resp) => return resp,
    };
    let result = inner
        .store
        .write()
        .unwrap()
        .delete(by, input, inner.cfg.read_only);
    inner.ok(result, Map::new())
}

/// The JSON object of a write call, or Marketo's 612 / 609 error answer.
#[allow(clippy::result_large_err)]
fn json_body(inner: &Inner, headers: &HeaderMap, body: &[u8]) -> Result<Value, Response> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("application/json"));
    if !is_json {
        return Err(inner.fail("612", "Invalid Content Type"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        _ => Err(inner.fail("609", "Invalid JSON")),
    }
}

#[allow(clippy::result_large_err)]
fn key_field(inner: &Inner, req: &Value, name: &str) -> Result<KeyField, Response> {
    match req.get(name) {
        None | Some(Value::Null) => Ok(KeyField::Dedupe),
        Some(v) => v
            .as_str()
            .and_then(KeyField::parse)
            .ok_or_else(|| inner.fail("1003", &format!("Invalid {name} '{v}'"))),
    }
}

#[allow(clippy::result_large_err)]
fn batch_input<'a>(inner: &Inner, req: &'a Value) -> Result<&'a [Value], Response> {
    let Some(input) = req.get("input").and_then(Value::as_array) else {
        return Err(inner.fail("1003", "Value for required field 'input' not specified"));
    };
    if input.len() > MAX_BATCH {
        return Err(inner.fail(
            "1003",
            &format!(
                "Batch size {} exceeds the limit of {MAX_BATCH}",
                input.len()
            ),
        ));
    }
    Ok(input)
}

/// Encodes a query paging token: the query's fingerprint and where the page stopped.
fn query_token(fingerprint: u64, c: QueryCursor) -> String {
    store::base32_encode(format!("{fingerprint:x}:{}:{}", c.value_pos, c.last_id).as_bytes())
}

fn parse_query_token(token: &str, fingerprint: u64) -> Option<QueryCursor> {
    let raw = String::from_utf8(store::base32_decode(token)?).ok()?;
    let mut it = raw.split(':');
    let fp = u64::from_str_radix(it.next()?, 16).ok()?;
    let value_pos = it.next()?.parse().ok()?;
    let last_id = it.next()?.parse().ok()?;
    (fp == fingerprint && it.next().is_none()).then_some(QueryCursor { value_pos, last_id })
}

/// The Query Companies call, from GET parameters or a `_method=GET` form body.
fn query(inner: &Inner, params: &HashMap<String, String>) -> Response {
    let Some(filter_type) = params.get("filterType").filter(|s| !s.is_empty()) else {
        return inner.fail(
            "1003",
            "Value for required field 'filterType' not specified",
        );
    };
    if !matches!(filter_type.as_str(), "id" | "externalCompanyId" | "company") {
        return inner.fail("1003", &format!("Invalid filterType '{filter_type}'"));
    }
    let mut values: Vec<String> = Vec::new();
    for v in params
        .get("filterValues")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        if !values.iter().any(|have| have == v) {
            values.push(v.to_string());
        }
    }
    if values.is_empty() {
        return inner.fail(
            "1003",
            "Value for required field 'filterValues' not specified",
        );
    }
    if values.len() > MAX_BATCH {
        return inner.fail(
            "1003",
            &format!(
                "Number of filterValues {} exceeds the limit of {MAX_BATCH}",
                values.len()
            ),
        );
    }
    if filter_type == "id"
        && let Some(bad) = values.iter().find(|v| v.parse::<i64>().is_err())
    {
        return inner.fail("1003", &format!("Invalid filterValues '{bad}' for 'id'"));
    }
    let fields: Vec<&'static FieldDef> = match params.get("fields").filter(|s| !s.is_empty()) {
        None => ["id", "externalCompanyId", "updatedAt", "createdAt"]
            .iter()
            .map(|n| store::field(n).expect("default fields are defined"))
            .collect(),
        Some(list) => {
            let mut out: Vec<&'static FieldDef> = Vec::new();
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                match store::field(name) {
                    Some(f) if !out.iter().any(|o| o.name == f.name) => out.push(f),
                    Some(_) => {}
                    None => return inner.fail("1006", &format!("Field '{name}' not found")),
                }
            }
            out
        }
    };
    let batch = match parse_batch_size(params.get("batchSize")) {
        Ok(b) => b,
        Err(msg) => return inner.fail("1003", &msg),
    };
    let fingerprint = store::query_fingerprint(filter_type, &values);
    let after = match params.get("nextPageToken").filter(|s| !s.is_empty()) {
        None => None,
        Some(t) => match parse_query_token(t, fingerprint) {
            Some(c) => Some(c),
            None => return inner.fail("1003", "Invalid nextPageToken"),
        },
    };
    let (result, next) =
        inner
            .store
            .read()
            .unwrap()
            .query(filter_type, &values, &fields, after, batch);
    let mut extra = Map::new();
    if let Some(c) = next {
        extra.insert("nextPageToken".into(), json!(query_token(fingerprint, c)));
    }
    inner.ok(result, extra)
}
