//! A wire-faithful simulator of amoCRM API v4 companies: OAuth with rotating refresh
//! tokens and long-lived tokens, HAL lists with 204 for "nothing", whole-second
//! timestamps, all-or-nothing batch validation, 7 rps with 429s that are sometimes HTML,
//! and nginx 403 bans. It listens on loopback only and never persists anything.
//!
//! Where amoCRM's documents are silent the simulator picks the stricter reading, so a
//! client that passes here survives the real thing:
//! - numeric custom field values are read back as strings holding the exact text written
//!   (`"1234567.50"`), and accepted as JSON numbers or numeric strings;
//! - a batch of more than 250 entities answers 400 problem+json (the notes also mention
//!   422: clients should treat both as "split the batch", never retry as is);
//! - PATCH ignores `created_at`/`updated_at` (every write stamps "now") and rejects
//!   `created_by`/`updated_by`; POST honours `created_at`/`updated_at` for imports;
//! - a bare `filter[updated_at]=TS` matches that exact second only;
//! - `values: []` or only empty strings leave a field unchanged; `values: null` clears it;
//! - a dropped connection happens after the request was carried out (lost answer).

// Helpers hand back a ready HTTP answer as their error; boxing it would only add noise.
#![allow(clippy::result_large_err)]

mod auth;
mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::sim::common::{Fault, Faults, RollingWindow, Stats, StatsSnapshot};

use auth::Auth;
use store::{Account, EntityErrors, ListQuery, MAX_BATCH, OrderKey, WriteKind, Written};

/// How the simulated amoCRM account behaves.
#[derive(Clone)]
pub struct AmoSimConfig {
    /// Seed of the company universe (`common::seed_company`) and of random mutations.
    pub seed: u64,
    /// Which universe companies the account starts with, in id order from 5 000 000.
    pub seed_indices: Vec<usize>,
    /// The private integration's long-lived token; `None` disables it.
    pub long_lived_token: Option<String>,
    /// OAuth client id the token endpoint accepts.
    pub client_id: String,
    /// OAuth client secret the token endpoint accepts.
    pub client_secret: String,
    /// Redirect URI the token endpoint requires.
    pub redirect_uri: String,
    /// The refresh token that works at start.
    pub initial_refresh_token: String,
    /// How long an access token works.
    pub access_ttl: Duration,
    /// Requests admitted per rolling second (amoCRM: 7); 0 admits everything.
    pub rps: u32,
    /// More 429s than this within `ban_window` ban the client.
    pub ban_after_violations: u32,
    /// Window over which 429s are counted towards a ban.
    pub ban_window: Duration,
    /// How long a ban lasts unless lifted.
    pub ban_duration: Duration,
    /// Whether list filters work (`is_api_filter_enabled`); when false they are ignored.
    pub api_filter_enabled: bool,
    /// Perturbs a few seeded values deterministically (0: none).
    pub variant: u8,
}

impl std::fmt::Debug for AmoSimConfig {
    /// Token and secret values are redacted, as everywhere in crmbridge.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmoSimConfig")
            .field("seed", &self.seed)
            .field("seed_indices", &self.seed_indices.len())
            .field(
                "long_lived_token",
                &self.long_lived_token.as_ref().map(|_| "<redacted>"),
            )
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("redirect_uri", &self.redirect_uri)
            .field("initial_refresh_token", &"<redacted>")
            .field("access_ttl", &self.access_ttl)
            .field("rps", &self.rps)
            .field("ban_after_violations", &self.ban_after_violations)
            .field("ban_window", &self.ban_window)
            .field("ban_duration", &self.ban_duration)
            .field("api_filter_enabled", &self.api_filter_enabled)
            .field("variant", &self.variant)
            .finish()
    }
}

impl Default for AmoSimConfig {
    fn default() -> Self {
        AmoSimConfig {
            seed: 1,
            seed_indices: (0..100).collect(),
            long_lived_token: Some("amo-long-lived-token".into()),
            client_id: "amo-client-id".into(),
            client_secret: "amo-client-secret".into(),
            redirect_uri: "https://crmbridge.example.com/oauth/amocrm".into(),
            initial_refresh_token: "amo-refresh-0".into(),
            access_ttl: Duration::from_secs(24 * 3600),
            rps: 7,
            ban_after_violations: 20,
            ban_window: Duration::from_secs(60),
            ban_duration: Duration::from_secs(600),
            api_filter_enabled: true,
            variant: 0,
        }
    }
}

/// One change `mutate_random` made, as a UI user would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// A company was created with this id.
    Created(i64),
    /// The company with this id was edited.
    Updated(i64),
    /// The company with this id was deleted.
    Deleted(i64),
}

/// A background task making random UI edits; it stops when dropped.
#[derive(Debug)]
pub struct MutatorHandle {
    cancel: CancellationToken,
    task: Option<JoinHandle<u64>>,
}

impl MutatorHandle {
    /// Stops the mutator and returns how many mutations it made.
    pub async fn stop(mut self) -> u64 {
        self.cancel.cancel();
        match self.task.take() {
            Some(t) => t.await.unwrap_or(0),
            None => 0,
        }
    }
}

impl Drop for MutatorHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// State shared by the HTTP handlers and the test-facing methods.
struct Shared {
    cfg: AmoSimConfig,
    base_url: String,
    account: Mutex<Account>,
    auth: Mutex<Auth>,
    faults: Faults,
    stats: Stats,
    window: RollingWindow,
    /// Instants of recent 429s, for the ban rule.
    violations: Mutex<VecDeque<Instant>>,
    banned_until: Mutex<Option<Instant>>,
    /// Alternates the 429 body between JSON and HTML.
    too_many_count: AtomicU64,
    rng: Mutex<StdRng>,
    /// Next universe index for companies created by mutations and imports.
    next_universe_index: AtomicU64,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A running amoCRM simulator.
pub struct AmoSim {
    shared: Arc<Shared>,
    addr: SocketAddr,
    cancel: CancellationToken,
    server: Option<JoinHandle<()>>,
}

impl AmoSim {
    /// Seeds the account and starts serving on `addr` (use `127.0.0.1:0`).
    pub async fn start(addr: SocketAddr, cfg: AmoSimConfig) -> std::io::Result<AmoSim> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let base_url = format!("http://127.0.0.1:{}", addr.port());
        let account = Account::new(base_url.clone(), cfg.seed, &cfg.seed_indices, cfg.variant);
        let auth = Auth::new(
            cfg.long_lived_token.clone(),
            cfg.client_id.clone(),
            cfg.client_secret.clone(),
            cfg.redirect_uri.clone(),
            cfg.initial_refresh_token.clone(),
            cfg.access_ttl,
            cfg.seed,
        );
        let first_new = cfg
            .seed_indices
            .iter()
            .max()
            .map_or(0, |m| m + 1)
            .max(1_000_000);
        let shared = Arc::new(Shared {
            window: RollingWindow::new(cfg.rps as usize, Duration::from_secs(1)),
            faults: Faults::new(cfg.seed),
            stats: Stats::default(),
            account: Mutex::new(account),
            auth: Mutex::new(auth),
            violations: Mutex::new(VecDeque::new()),
            banned_until: Mutex::new(None),
            too_many_count: AtomicU64::new(0),
            rng: Mutex::new(StdRng::seed_from_u64(cfg.seed ^ 0xa3c0_11ed)),
            next_universe_index: AtomicU64::new(first_new as u64),
            base_url,
            cfg,
        });
        let app = router(shared.clone());
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                stop.cancelled().await;
            });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "amoCRM simulator server stopped with an error");
            }
        });
        Ok(AmoSim {
            shared,
            addr,
            cancel,
            server: Some(server),
        })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The address the simulator listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The fault injector; configure it with `faults().set(..)`.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Request, rejection and fault counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Clears the counters.
    pub fn reset_stats(&self) {
        self.shared.stats.reset();
    }

    /// Whether the client is banned (every endpoint answers 403).
    pub fn is_banned(&self) -> bool {
        self.shared.banned()
    }

    /// Lifts a ban and forgets past violations, as support would.
    pub fn lift_ban(&self) {
        *self.shared.banned_until.lock().unwrap() = None;
        self.shared.violations.lock().unwrap().clear();
    }

    /// The newest refresh token the account has issued.
    pub fn current_refresh_token(&self) -> String {
        self.shared.auth.lock().unwrap().current_refresh()
    }

    /// Expires every access token issued so far (the next API call answers 401).
    pub fn expire_access_tokens(&self) {
        self.shared.auth.lock().unwrap().expire_access_tokens();
    }

    /// Number of live companies; cheap, unlike `dump().len()`, which renders every record.
    pub fn company_count(&self) -> usize {
        self.shared.account.lock().unwrap().len()
    }

    /// Every live company as `GET /api/v4/companies/{id}` returns it, sorted by id.
    pub fn dump(&self) -> Vec<Value> {
        let acc = self.shared.account.lock().unwrap();
        acc.live_ids()
            .filter_map(|id| acc.render(id, &[]))
            .collect()
    }

    /// One live company as `GET /api/v4/companies/{id}` returns it.
    pub fn get(&self, id: i64) -> Option<Value> {
        self.shared.account.lock().unwrap().render(id, &[])
    }

    /// Creates a company as a UI user would, from an API-shaped body (`name`,
    /// `custom_fields_values`, `_embedded.tags`), and returns it as read.
    ///
    /// # Panics
    /// When `body` would fail amoCRM's validation: a test bug, not a simulated error.
    pub fn create(&self, body: Value) -> Value {
        let w = self
            .shared
            .write_one(body, WriteKind::UiCreate, None)
            .unwrap_or_else(|e| panic!("invalid company for AmoSim::create: {e:?}"));
        self.get(w.id).expect("company just created")
    }

    /// Edits a company as a UI user would (PATCH semantics); `None` when it does not
    /// exist.
    ///
    /// # Panics
    /// When `patch` would fail amoCRM's validation.
    pub fn update(&self, id: i64, patch: Value) -> Option<Value> {
        match self.shared.write_one(patch, WriteKind::UiUpdate, Some(id)) {
            Ok(w) => self.get(w.id),
            Err(errs)
                if errs.iter().any(|e| {
                    e.errors
                        .iter()
                        .any(|f| f.code == "NotFound" && f.path == "id")
                }) =>
            {
                None
            }
            Err(errs) => panic!("invalid patch for AmoSim::update({id}): {errs:?}"),
        }
    }

    /// Deletes a company in the UI (the API cannot); `with=only_deleted` then lists it.
    pub fn delete(&self, id: i64) -> bool {
        self.shared.account.lock().unwrap().delete(id, now_unix())
    }

    /// Imports `n` new companies that all share one `updated_at` second: the "more
    /// than a page in one second" case.
    pub fn bulk_import(&self, n: usize) -> Vec<i64> {
        self.shared.bulk_import(n)
    }

    /// Makes `n` random UI edits (about 20 % creates, 70 % updates, 10 % deletes).
    pub fn mutate_random(&self, n: usize) -> Vec<Mutation> {
        (0..n).filter_map(|_| self.shared.mutate_once()).collect()
    }

    /// Makes random UI edits in the background at about `per_second`, until the handle
    /// is dropped or stopped.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn spawn_mutator(&self, per_second: f64) -> MutatorHandle {
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let shared = self.shared.clone();
        let period = Duration::from_secs_f64(1.0 / per_second.max(0.001));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut made = 0u64;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        if shared.mutate_once().is_some() {
                            made += 1;
                        }
                    }
                }
            }
            made
        });
        MutatorHandle {
            cancel,
            task: Some(task),
        }
    }

    /// Stops serving and waits for the server task to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(mut task) = self.server.take() {
            // Idle keep-alive connections could hold graceful shutdown open; cap the wait.
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl std::fmt::Debug for AmoSim {
    /// Only where it listens: the account can hold 100k companies and live tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmoSim")
            .field("base_url", &self.shared.base_url)
            .finish_non_exhaustive()
    }
}

impl Drop for AmoSim {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Shared {
    fn banned(&self) -> bool {
        let mut b = self.banned_until.lock().unwrap();
        match *b {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                *b = None;
                false
            }
            None => false,
        }
    }

    /// Counts a 429 and bans when there were too many in the window.
    fn record_violation(&self) {
        let now = Instant::now();
        let mut v = self.violations.lock().unwrap();
        v.push_back(now);
        while v
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.cfg.ban_window)
        {
            v.pop_front();
        }
        if v.len() > self.cfg.ban_after_violations as usize {
            *self.banned_until.lock().unwrap() = Some(now + self.cfg.ban_duration);
            v.clear();
        }
    }

    fn write_one(
        &self,
        body: Value,
        kind: WriteKind,
        path_id: Option<i64>,
    ) -> Result<Written, Vec<EntityErrors>> {
        let mut acc = self.account.lock().unwrap();
        acc.write(&[body], kind, path_id, now_unix())
            .map(|mut w| w.remove(0))
    }

    fn bulk_import(&self, n: usize) -> Vec<i64> {
        let first = self
            .next_universe_index
            .fetch_add(n as u64, Ordering::SeqCst) as usize;
        self.account
            .lock()
            .unwrap()
            .import_seeds(self.cfg.seed, first, n, now_unix())
    }

    /// One random UI edit; `None` when the account is empty and an edit was picked.
    fn mutate_once(&self) -> Option<Mutation> {
        let (roll, pick, edit, value) = {
            let mut rng = self.rng.lock().unwrap();
            (
                rng.random_range(0..100u32),
                rng.random_range(0..usize::MAX),
                rng.random_range(0..4u32),
                rng.random_range(1..100_000i64),
            )
        };
        if roll < 20 {
            return self.bulk_import(1).first().map(|id| Mutation::Created(*id));
        }
        let mut acc = self.account.lock().unwrap();
        if acc.len() == 0 {
            return None;
        }
        let id = acc.nth_id(pick % acc.len())?;
        if roll < 30 {
            return acc.delete(id, now_unix()).then_some(Mutation::Deleted(id));
        }
        let patch = match edit {
            0 => json!({"custom_fields_values": [{"field_id": store::field_ids::EMPLOYEES,
                "values": [{"value": value}]}]}),
            1 => json!({"name": format!("Renamed Co {value}")}),
            2 => json!({"tags_to_add": [{"name": format!("tag-{}", value % 20)}]}),
            _ => json!({"custom_fields_values": [{"field_id": store::field_ids::CITY,
                "values": [{"value": format!("City {value}")}]}]}),
        };
        acc.write(&[patch], WriteKind::UiUpdate, Some(id), now_unix())
            .ok()
            .map(|_| Mutation::Updated(id))
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), Response> {
        let h = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        self.auth
            .lock()
            .unwrap()
            .check_bearer(h)
            .map_err(|detail| problem(StatusCode::UNAUTHORIZED, "Unauthorized", detail))
    }
}

// ---------- HTTP layer ----------

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/oauth2/access_token", post(token))
        .route("/api/v4/account", get(account))
        .route(
            "/api/v4/companies",
            get(list_companies)
                .post(create_companies)
                .patch(update_companies),
        )
        .route("/api/v4/companies/custom_fields", get(custom_fields))
        .route(
            "/api/v4/companies/{id}",
            get(get_company).patch(update_company),
        )
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared)
}

const HAL: &str = "application/hal+json";
const PROBLEM: &str = "application/problem+json";

fn with_type(status: StatusCode, content_type: &'static str, body: impl Into<Body>) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn hal(v: &Value) -> Response {
    with_type(StatusCode::OK, HAL, v.to_string())
}

fn problem_body(status: StatusCode, title: &str, detail: &str) -> Value {
    json!({
        "title": title,
        "type": format!("https://httpstatus.es/{}", status.as_u16()),
        "status": status.as_u16(),
        "detail": detail,
    })
}

fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    with_type(
        status,
        PROBLEM,
        problem_body(status, title, detail).to_string(),
    )
}

fn validation_failed(errors: &[EntityErrors]) -> Response {
    let mut body = problem_body(
        StatusCode::BAD_REQUEST,
        "Bad Request",
        "Request validation failed",
    );
    body["validation-errors"] = EntityErrors::to_json(errors);
    with_type(StatusCode::BAD_REQUEST, PROBLEM, body.to_string())
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

const NGINX_403: &str = "<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n<center><h1>403 Forbidden</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
const HTML_429: &str = "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>429 Too Many Requests</title></head>\n<body><h1>Too Many Requests</h1><p>You have sent too many requests. Please slow down.</p></body></html>\n";
const NGINX_503: &str = "<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/// Runs before every handler: counting, bans, the rate limit, then injected faults.
async fn gate(State(sh): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    sh.stats.request(&format!("{} {}", req.method(), path));
    let (_in_flight, _) = sh.stats.enter();
    let latency = sh.faults.extra_latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if sh.banned() {
        sh.stats.rejection("403-ban");
        return with_type(StatusCode::FORBIDDEN, "text/html", NGINX_403);
    }
    if !sh.window.try_admit() {
        sh.stats.rejection("429");
        sh.record_violation();
        return too_many_requests(&sh);
    }
    match sh.faults.pick() {
        None => next.run(req).await,
        Some(fault) => {
            sh.stats.fault();
            match fault {
                Fault::ServerError(503) => {
                    with_type(StatusCode::SERVICE_UNAVAILABLE, "text/html", NGINX_503)
                }
                Fault::ServerError(code) => problem(
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    "Internal Server Error",
                    "Internal server error",
                ),
                Fault::Slow(d) => {
                    tokio::time::sleep(d).await;
                    next.run(req).await
                }
                Fault::Malformed => with_type(
                    StatusCode::OK,
                    HAL,
                    "{\"_page\":1,\"_links\":{\"self\":{\"href\":\"",
                ),
                // The request is carried out; only its answer is lost.
                Fault::DropConnection => drop_midway(next.run(req).await).await,
                // Not a violation of the caller's: it does not count towards a ban.
                Fault::Throttled => {
                    sh.stats.rejection("429-injected");
                    too_many_requests(&sh)
                }
            }
        }
    }
}

fn too_many_requests(sh: &Shared) -> Response {
    // The official answer is JSON with retry_after, but it is often an HTML page with
    // no Retry-After at all: clients must classify by status alone.
    if sh
        .too_many_count
        .fetch_add(1, Ordering::Relaxed)
        .is_multiple_of(2)
    {
        let secs = sh.window.retry_after().as_secs_f64().ceil().max(1.0) as u64;
        let mut body = problem_body(
            StatusCode::TOO_MANY_REQUESTS,
            "Too Many Requests",
            "Too many requests",
        );
        body["retry_after"] = json!(secs);
        let mut r = with_type(StatusCode::TOO_MANY_REQUESTS, PROBLEM, body.to_string());
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        r
    } else {
        with_type(StatusCode::TOO_MANY_REQUESTS, "text/html", HTML_429)
    }
}

/// Sends the head and part of `resp`'s body, then fails the stream so the connection
/// is cut mid-answer.
async fn drop_midway(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let partial = if bytes.is_empty() {
        parts.status = StatusCode::OK;
        parts
            .headers
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(HAL));
        Bytes::from_static(b"{\"_page\":1,\"_embedded\":{\"companies\":[")
    } else {
        bytes.slice(..bytes.len() / 2)
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(partial),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "simulated connection drop",
        )),
    ];
    let stream = futures::stream::iter(chunks).then(|c| async move {
        // Let the head and the first chunk reach the client before the cut.
        tokio::time::sleep(Duration::from_millis(5)).await;
        c
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

async fn not_found() -> Response {
    problem(StatusCode::NOT_FOUND, "Not Found", "Resource not found")
}

fn parse_params(raw: &Option<String>) -> Vec<(String, String)> {
    raw.as_deref()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

async fn token(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.contains("json"))
        || body.trim_ascii_start().starts_with(b"{");
    let params: HashMap<String, String> = if is_json {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(m)) => m
                .into_iter()
                .filter_map(|(k, v)| match v {
                    Value::String(s) => Some((k, s)),
                    Value::Number(n) => Some((k, n.to_string())),
                    _ => None,
                })
                .collect(),
            _ => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Bad Request",
                    "Request body is not a JSON object",
                );
            }
        }
    } else {
        url::form_urlencoded::parse(&body).into_owned().collect()
    };
    let result = sh.auth.lock().unwrap().grant(&params, now_unix());
    match result {
        Ok(v) => with_type(StatusCode::OK, "application/json", v.to_string()),
        Err(e) => {
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
            let mut body = problem_body(status, e.title, &e.detail);
            body["hint"] = json!(e.detail);
            with_type(status, PROBLEM, body.to_string())
        }
    }
}

async fn account(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    if let Err(r) = sh.authorize(&headers) {
        return r;
    }
    let with: Vec<String> = parse_params(&raw)
        .into_iter()
        .filter(|(k, _)| k == "with")
        .flat_map(|(_, v)| v.split(',').map(str::to_string).collect::<Vec<_>>())
        .collect();
    let mut body = json!({
        "id": store::ACCOUNT_ID,
        "name": "crmbridge simulated account",
        "subdomain": "crmbridge",
        "created_at": 1_600_000_000,
        "created_by": store::UI_USER_ID,
        "updated_at": 1_600_000_000,
        "updated_by": store::UI_USER_ID,
        "current_user_id": store::API_USER_ID,
        "country": "US",
        "currency": "USD",
        "currency_symbol": "$",
        "customers_mode": "disabled",
        "is_unsorted_on": true,
        "is_loss_reason_enabled": true,
        "is_helpbot_enabled": false,
        "is_technical_account": false,
        "contact_name_display_order": 1,
        "_links": {"self": {"href": format!("{}/api/v4/account", sh.base_url)}},
    });
    if with.iter().any(|w| w == "is_api_filter_enabled") {
        body["is_api_filter_enabled"] = json!(sh.cfg.api_filter_enabled);
    }
    hal(&body)
}

/// Parses the list parameters; filters are dropped when the account has no API filter.
fn list_query(params: &[(String, String)], filter_enabled: bool) -> ListQuery {
    let mut q = ListQuery {
        page: 1,
        limit: 50,
        order: OrderKey::Id,
        desc: false,
        ids: None,
        updated: None,
        query: None,
        only_deleted: false,
        with: Vec::new(),
    };
    let (mut from, mut to) = (None, None);
    for (k, v) in params {
        match k.as_str() {
            "page" => q.page = v.parse().unwrap_or(1).max(1),
            "limit" => {
                q.limit = match v.parse::<usize>() {
                    Ok(0) | Err(_) => 50,
                    // amoCRM caps silently at 250.
                    Ok(n) => n.min(MAX_BATCH),
                }
            }
            "with" => q.with.extend(v.split(',').map(|s| s.trim().to_string())),
            "query" if !v.is_empty() => q.query = Some(v.clone()),
            _ if k.starts_with("order[") && k.ends_with(']') => {
                let key = &k[6..k.len() - 1];
                let order = match key {
                    "id" => Some(OrderKey::Id),
                    "updated_at" => Some(OrderKey::UpdatedAt),
                    "created_at" => Some(OrderKey::CreatedAt),
                    _ => None,
                };
                if let Some(o) = order {
                    q.order = o;
                    q.desc = v.eq_ignore_ascii_case("desc");
                }
            }
            _ if filter_enabled && (k == "filter[id][]" || k == "filter[id]") => {
                let set = q.ids.get_or_insert_with(BTreeSet::new);
                set.extend(v.split(',').filter_map(|s| s.trim().parse::<i64>().ok()));
            }
            _ if filter_enabled && k.starts_with("filter[id][") => {
                if let Ok(id) = v.trim().parse::<i64>() {
                    q.ids.get_or_insert_with(BTreeSet::new).insert(id);
                }
            }
            "filter[updated_at][from]" if filter_enabled => from = v.trim().parse::<i64>().ok(),
            "filter[updated_at][to]" if filter_enabled => to = v.trim().parse::<i64>().ok(),
            // A bare timestamp means "exactly this second", not "since".
            "filter[updated_at]" if filter_enabled => {
                if let Ok(t) = v.trim().parse::<i64>() {
                    from = Some(t);
                    to = Some(t);
                }
            }
            _ => {}
        }
    }
    if from.is_some() || to.is_some() {
        q.updated = Some((from.unwrap_or(i64::MIN), to.unwrap_or(i64::MAX)));
    }
    q.only_deleted = q.with.iter().any(|w| w == "only_deleted");
    q
}

/// An absolute href for `path` with the request's parameters, `limit` and `page` last.
fn page_href(
    base: &str,
    path: &str,
    params: &[(String, String)],
    limit: usize,
    page: usize,
) -> String {
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        if k != "page" && k != "limit" {
            ser.append_pair(k, v);
        }
    }
    ser.append_pair("limit", &limit.to_string());
    ser.append_pair("page", &page.to_string());
    format!("{base}{path}?{}", ser.finish())
}

async fn list_companies(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    if let Err(r) = sh.authorize(&headers) {
        return r;
    }
    let params = parse_params(&raw);
    let q = list_query(&params, sh.cfg.api_filter_enabled);
    let rows = sh.account.lock().unwrap().list(&q);
    if rows.is_empty() {
        return no_content();
    }
    let path = "/api/v4/companies";
    let mut links = json!({
        "self": {"href": page_href(&sh.base_url, path, &params, q.limit, q.page)},
    });
    // amoCRM offers "next" whenever the page is full, even when nothing follows.
    if rows.len() == q.limit {
        links["next"] =
            json!({"href": page_href(&sh.base_url, path, &params, q.limit, q.page + 1)});
    }
    if q.page > 1 {
        links["prev"] =
            json!({"href": page_href(&sh.base_url, path, &params, q.limit, q.page - 1)});
    }
    hal(&json!({
        "_page": q.page,
        "_links": links,
        "_embedded": {"companies": rows},
    }))
}

async fn get_company(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    if let Err(r) = sh.authorize(&headers) {
        return r;
    }
    let Ok(id) = id.parse::<i64>() else {
        return not_found().await;
    };
    let with: Vec<String> = parse_params(&raw)
        .into_iter()
        .filter(|(k, _)| k == "with")
        .flat_map(|(_, v)| v.split(',').map(str::to_string).collect::<Vec<_>>())
        .collect();
    match sh.account.lock().unwrap().render(id, &with) {
        Some(c) => hal(&c),
        None => no_content(),
    }
}

async fn custom_fields(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    if let Err(r) = sh.authorize(&headers) {
        return r;
    }
    let params = parse_params(&raw);
    let q = list_query(&params, false);
    let all = sh.account.lock().unwrap().render_fields();
    let total = all.len();
    let rows: Vec<Value> = all
        .into_iter()
        .skip((q.page - 1) * q.limit)
        .take(q.limit)
        .collect();
    if rows.is_empty() {
        return no_content();
    }
    let path = "/api/v4/companies/custom_fields";
    let mut links =
        json!({"self": {"href": page_href(&sh.base_url, path, &params, q.limit, q.page)}});
    if q.page * q.limit < total {
        links["next"] =
            json!({"href": page_href(&sh.base_url, path, &params, q.limit, q.page + 1)});
    }
    hal(&json!({
        "_total_items": total,
        "_page": q.page,
        "_page_count": total.div_ceil(q.limit),
        "_links": links,
        "_embedded": {"custom_fields": rows},
    }))
}

/// Parses a write body; `Err` is the 400 answer.
fn parse_body(body: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(body).map_err(|e| {
        problem(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            &format!("Request body is not valid JSON: {e}"),
        )
    })
}

/// Checks a batch body: a non-empty array of at most 250 entities.
fn batch_of(v: Value) -> Result<Vec<Value>, Response> {
    let Value::Array(items) = v else {
        return Err(validation_failed(&[EntityErrors {
            request_id: "0".into(),
            errors: vec![store::FieldError {
                code: "InvalidType",
                path: "".into(),
                detail: "This value should be of type array.".into(),
            }],
        }]));
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(validation_failed(&[EntityErrors {
            request_id: "0".into(),
            errors: vec![store::FieldError {
                code: "Count",
                path: "".into(),
                detail: format!(
                    "This collection should contain 1 to {MAX_BATCH} elements, got {}.",
                    items.len()
                ),
            }],
        }]));
    }
    Ok(items)
}

fn written_json(base: &str, w: &Written, update: bool) -> Value {
    let mut v = json!({"id": w.id});
    if update {
        v["name"] = json!(w.name);
        v["updated_at"] = json!(w.updated_at);
    }
    v["request_id"] = json!(w.request_id);
    v["_links"] = json!({"self": {"href": format!("{base}/api/v4/companies/{}", w.id)}});
    v
}

async fn write_batch(
    sh: Arc<Shared>,
    headers: HeaderMap,
    body: Bytes,
    kind: WriteKind,
) -> Response {
    if let Err(r) = sh.authorize(&headers) {
        return r;
    }
    let items = match parse_body(&body).and_then(batch_of) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let result = sh
        .account
        .lock()
        .unwrap()
        .write(&items, kind, None, now_unix());
    match result {
        Ok(written) => {
            let update = kind == WriteKind::ApiUpdate;
            hal(&json!({
                "_links": {"self": {"href": format!("{}/api/v4/companies", sh.base_url)}},
                "_embedded": {"companies": written.iter()
                    .map(|w| written_json(&sh.base_url, w, update)).collect::<Vec<_>>()},
            }))
        }
        Err(errs) => validation_failed(&errs),
    }
}

async fn create_companies(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    write_batch(sh, headers, body, WriteKind::ApiCreate).await
}

async fn update_companies(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    write_batch(sh, headers, body, WriteKind::ApiUpdate).await
}

async fn update_company(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(r) = sh.authorize(&headers) {
        return r;
    }
    let Ok(id) = id.parse::<i64>() else {
        return not_found().await;
    };
    let v = match parse_body(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if !v.is_object() {
        return validation_failed(&[EntityErrors {
            request_id: "0".into(),
            errors: vec![store::FieldError {
                code: "InvalidType",
                path: "".into(),
                detail: "This value should be of type object.".into(),
            }],
        }]);
    }
    match sh.write_one(v, WriteKind::ApiUpdate, Some(id)) {
        Ok(w) => hal(&written_json(&sh.base_url, &w, true)),
        Err(errs) => validation_failed(&errs),
    }
}
