//! The one HTTP client every connector calls its CRM through. It owns everything that
//! keeps us a polite API citizen (DESIGN invariant 5): a rate limiter that never lets a
//! vendor's counting window see more calls than allowed, a concurrency cap, a daily call
//! budget, retries with jittered exponential backoff honouring `Retry-After`, single-flight
//! token refresh, and a circuit that stops all calls during a ban or quota suspension.
//! It never prints a secret (invariant 6): URLs, headers and bodies go through [`redact`].
//!
//! A connector builds one [`HttpClient`] from an [`HttpConfig`], then calls
//! [`HttpClient::send`] with an [`ApiRequest`] and its vendor's [`Classifier`]:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use crmbridge::http::*;
//! # async fn f() -> Result<(), HttpError> {
//! let cfg = HttpConfig {
//!     rate: RateLimit::PerWindow { calls: 100, window: std::time::Duration::from_secs(20) },
//!     max_concurrent: 10,
//!     daily_budget: Some(40_000),
//!     quota_reset: QuotaReset::UsCentralMidnight,
//!     ..HttpConfig::new("marketo")
//! };
//! let client = HttpClient::new(cfg, Arc::new(MemoryQuotaLedger::new()))?;
//! let url = url::Url::parse("https://123-abc-456.mktorest.com/rest/v1/companies/describe.json").unwrap();
//! let resp = client.send(ApiRequest::get("GET companies/describe", url), &DefaultClassifier).await?;
//! let _json = resp.json_value()?;
//! # Ok(()) }
//! ```
//!
//! # Why the limiter is provably safe
//! Vendors count calls in rolling windows ("100 per 20 s", "7 per second"). A token bucket
//! (GCRA) with burst `n` would allow `n` calls at once and then refill during the same
//! window: up to almost `2n` in one window. We configure governor's GCRA with **burst 1**
//! and a replenish period `T = window / calls × (1 + safety_margin)`: consecutive calls are
//! then at least `T` apart, so any window of length `W` holds at most `⌈W / T⌉ ≤ calls`
//! calls. The margin (default 5 %) absorbs network jitter: a window the *server* counts
//! over arrival times still holds at most `calls` as long as arrival jitter stays under
//! `margin × W` (1 s for Marketo's 20 s window, 50 ms for a 1 s window), and throughput
//! stays at `1 / (1 + margin)` ≈ 95 % of the allowed rate. The limiter is passed right
//! before the request is written (after the concurrency permit is held), so nothing can
//! bunch admitted calls back together; waiters queue in FIFO order so a crowd of tasks
//! does not poll it in a thundering herd. Every attempt, retries included, passes it.

pub mod auth;
pub mod classify;
pub mod error;
pub mod quota;
pub mod redact;

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, USER_AGENT};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::Instrument;
use url::Url;

pub use auth::{AuthProvider, BearerAuth, StaticHeaderAuth, Token, TokenSource};
pub use classify::{Classifier, DefaultClassifier, Outcome, parse_retry_after, status_class};
pub use error::HttpError;
pub use quota::{MemoryQuotaLedger, QuotaLedger, QuotaReset};

/// How fast a vendor lets us call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateLimit {
    /// At most this many calls in any one-second window (amoCRM 7, Rally 10).
    PerSecond(f64),
    /// At most `calls` in any rolling `window` (Marketo: 100 per 20 s).
    PerWindow {
        /// Calls allowed per window.
        calls: u32,
        /// The window length.
        window: Duration,
    },
    /// No client-side limit (tests, identity endpoints that do not count).
    Unlimited,
}

/// Settings of one connector's client.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The connector name, in every log line, metric and error.
    pub connector: String,
    /// Time allowed to establish a connection (TCP + TLS).
    pub connect_timeout: Duration,
    /// Time allowed for a whole read call (request sent → body received).
    pub read_timeout: Duration,
    /// Time allowed for a whole write call ([`ApiRequest::is_write`]); Marketo documents
    /// 60 s for sync and delete.
    pub write_timeout: Duration,
    /// The vendor's rate limit.
    pub rate: RateLimit,
    /// The fraction by which calls are spaced wider than the limit strictly needs, to
    /// absorb network jitter (0.05 = 5 %; see the module docs).
    pub rate_safety_margin: f64,
    /// Calls in flight at most (Marketo: 10, shared per instance).
    pub max_concurrent: usize,
    /// Calls per quota day this daemon may make; `None` = no budget (calls still counted).
    pub daily_budget: Option<u64>,
    /// When the vendor's quota day starts over.
    pub quota_reset: QuotaReset,
    /// Retries after the first attempt for retryable outcomes.
    pub max_retries: u32,
    /// The first backoff delay (then doubling, with jitter).
    pub backoff_min: Duration,
    /// The largest backoff delay.
    pub backoff_max: Duration,
    /// The longest vendor-requested wait (`Retry-After`) the client sleeps through inside
    /// one `send`; a longer one ends the call with [`HttpError::Transient`] carrying it.
    pub max_retry_after: Duration,
    /// The `User-Agent` header.
    pub user_agent: String,
}

impl HttpConfig {
    /// Defaults for `connector`: 10 s connect, 30 s read, 60 s write, 10 calls/s, 5 %
    /// margin, 4 concurrent, no budget, UTC reset, 4 retries from 500 ms to 30 s, waits up
    /// to 120 s for `Retry-After`.
    pub fn new(connector: &str) -> Self {
        HttpConfig {
            connector: connector.to_string(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            rate: RateLimit::PerSecond(10.0),
            rate_safety_margin: 0.05,
            max_concurrent: 4,
            daily_budget: None,
            quota_reset: QuotaReset::UtcMidnight,
            max_retries: 4,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(120),
            user_agent: format!("crmbridge/{}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// The minimum spacing between two calls, or `None` when unlimited.
    pub fn call_spacing(&self) -> Result<Option<Duration>, HttpError> {
        let bad = |detail: String| HttpError::Config {
            connector: self.connector.clone(),
            detail,
        };
        if !(self.rate_safety_margin.is_finite() && (0.0..=1.0).contains(&self.rate_safety_margin))
        {
            return Err(bad(format!(
                "rate_safety_margin must be within 0..=1, got {}",
                self.rate_safety_margin
            )));
        }
        let base = match self.rate {
            RateLimit::Unlimited => return Ok(None),
            RateLimit::PerSecond(r) => {
                if !(r.is_finite() && r > 0.0) {
                    return Err(bad(format!("rate must be a positive number, got {r}")));
                }
                Duration::from_secs_f64(1.0 / r)
            }
            RateLimit::PerWindow { calls, window } => {
                if calls == 0 || window.is_zero() {
                    return Err(bad(format!(
                        "rate window needs calls > 0 and a non-zero window, got {calls} per {window:?}"
                    )));
                }
                window / calls
            }
        };
        Ok(Some(base.mul_f64(1.0 + self.rate_safety_margin)))
    }
}

/// A request body.
#[derive(Clone, PartialEq)]
pub enum Body {
    /// A JSON document (`Content-Type: application/json`).
    Json(serde_json::Value),
    /// Form fields (`application/x-www-form-urlencoded`), e.g. Marketo `_method=GET`.
    Form(Vec<(String, String)>),
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Body::Json(v) => {
                let text = v.to_string();
                write!(f, "Json({})", redact::redact_text(&text, 2000))
            }
            Body::Form(pairs) => f
                .debug_tuple("Form")
                .field(&redact::redact_pairs(pairs))
                .finish(),
        }
    }
}

/// One call to make.
#[derive(Clone)]
pub struct ApiRequest {
    /// The HTTP method.
    pub method: Method,
    /// The URL (query parameters may also go in [`ApiRequest::query`]).
    pub url: Url,
    /// Query parameters appended to the URL.
    pub query: Vec<(String, String)>,
    /// Extra headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body, if any.
    pub body: Option<Body>,
    /// Who signs the request; `None` for unauthenticated calls.
    pub auth: Option<Arc<dyn AuthProvider>>,
    /// True if repeating the request cannot do harm (GET, upserts by key). Non-idempotent
    /// requests are retried only after rejections that guarantee nothing was done.
    pub idempotent: bool,
    /// True for writes: picks [`HttpConfig::write_timeout`].
    pub is_write: bool,
    /// A static label for logs and metrics, e.g. `"GET companies"`.
    pub endpoint: &'static str,
}

impl ApiRequest {
    /// A request with no query, headers, body or auth; idempotent unless POST or PATCH.
    pub fn new(method: Method, endpoint: &'static str, url: Url) -> Self {
        let idempotent = !matches!(method, Method::POST | Method::PATCH);
        let is_write = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
        ApiRequest {
            method,
            url,
            query: Vec::new(),
            headers: Vec::new(),
            body: None,
            auth: None,
            idempotent,
            is_write,
            endpoint,
        }
    }

    /// A GET (idempotent, read timeout).
    pub fn get(endpoint: &'static str, url: Url) -> Self {
        Self::new(Method::GET, endpoint, url)
    }

    /// A POST (not idempotent unless [`ApiRequest::idempotent`] says so; write timeout).
    pub fn post(endpoint: &'static str, url: Url) -> Self {
        Self::new(Method::POST, endpoint, url)
    }

    /// Adds a query parameter.
    pub fn query(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.query.push((name.into(), value.into()));
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Sets a JSON body.
    pub fn json(mut self, body: serde_json::Value) -> Self {
        self.body = Some(Body::Json(body));
        self
    }

    /// Sets a form body.
    pub fn form(mut self, fields: Vec<(String, String)>) -> Self {
        self.body = Some(Body::Form(fields));
        self
    }

    /// Sets the auth provider.
    pub fn auth(mut self, auth: Arc<dyn AuthProvider>) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Overrides whether the request may be repeated safely.
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }

    /// Overrides whether the write timeout applies.
    pub fn write(mut self, is_write: bool) -> Self {
        self.is_write = is_write;
        self
    }

    /// The URL with the query applied, secrets redacted: safe to print.
    pub fn redacted_url(&self) -> String {
        let mut u = self.url.clone();
        if !self.query.is_empty() {
            u.query_pairs_mut().extend_pairs(&self.query);
        }
        redact::redact_url(&u)
    }
}

impl fmt::Debug for ApiRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(n, v)| {
                let shown = if redact::is_secret_header(n) || v.is_sensitive() {
                    redact::REDACTED
                } else {
                    v.to_str().unwrap_or("[binary]")
                };
                (n.as_str(), shown)
            })
            .collect();
        f.debug_struct("ApiRequest")
            .field("endpoint", &self.endpoint)
            .field("method", &self.method)
            .field("url", &self.redacted_url())
            .field("headers", &headers)
            .field("body", &self.body)
            .field("auth", &self.auth.as_ref().map(|_| redact::REDACTED))
            .field("idempotent", &self.idempotent)
            .field("is_write", &self.is_write)
            .finish()
    }
}

/// An answer, fully read.
#[derive(Clone)]
pub struct ApiResponse {
    /// The connector that made the call (for errors built from the response).
    pub connector: String,
    /// The endpoint label of the call.
    pub endpoint: &'static str,
    /// The HTTP status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The raw body (empty for 204).
    pub body: Vec<u8>,
    /// The body parsed as JSON, when it is JSON (by content type or by its first byte).
    pub json: Option<serde_json::Value>,
}

impl ApiResponse {
    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first 500 characters of the body, secrets scrubbed: for error details.
    pub fn text_snippet(&self) -> String {
        redact::redact_text(&String::from_utf8_lossy(&self.body), 500)
    }

    /// The content type, if any.
    pub fn content_type(&self) -> Option<&str> {
        self.headers.get(CONTENT_TYPE)?.to_str().ok()
    }

    /// The parsed JSON body, or [`HttpError::Decode`] when the body is not JSON.
    pub fn json_value(&self) -> Result<&serde_json::Value, HttpError> {
        self.json.as_ref().ok_or_else(|| HttpError::Decode {
            connector: self.connector.clone(),
            endpoint: self.endpoint,
            detail: format!(
                "expected JSON, got HTTP {} {:?}: {}",
                self.status,
                self.content_type().unwrap_or("no content type"),
                redact::redact_text(&String::from_utf8_lossy(&self.body), 200)
            ),
        })
    }

    /// The body deserialised into `T` (see the crate notes on `arbitrary_precision`).
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| HttpError::Decode {
            connector: self.connector.clone(),
            endpoint: self.endpoint,
            detail: format!("{e} (HTTP {})", self.status),
        })
    }
}

impl fmt::Debug for ApiResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiResponse")
            .field("endpoint", &self.endpoint)
            .field("status", &self.status)
            .field("body", &self.text_snippet())
            .finish_non_exhaustive()
    }
}

/// A snapshot of one client's counters, for `status` and the metrics endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HttpMetrics {
    /// The connector.
    pub connector: String,
    /// Requests written to the wire (every attempt).
    pub calls: u64,
    /// Attempts after the first, for any reason.
    pub retries: u64,
    /// Total time calls waited for the rate limiter, in milliseconds.
    pub limiter_wait_ms: u64,
    /// Vendor rejections by class (`"429"`, `"606"`, `"615"`, `"5xx"` …).
    pub rejections: BTreeMap<String, u64>,
    /// Failed calls by class (`"timeout"`, `"connection"`, `"auth"`, `"404"` …).
    pub errors: BTreeMap<String, u64>,
    /// Token refreshes after a rejection.
    pub reauths: u64,
    /// How often the circuit was opened (ban, quota).
    pub suspensions: u64,
    /// Calls counted in today's quota ledger.
    pub quota_used_today: u64,
    /// Calls left of the daily budget, if there is one.
    pub quota_left_today: Option<u64>,
    /// When the open circuit closes, if it is open.
    pub suspended_until: Option<DateTime<Utc>>,
}

/// An open circuit: nothing is sent before `until`.
#[derive(Debug, Clone)]
struct Circuit {
    until: DateTime<Utc>,
    class: &'static str,
    detail: String,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    retries: AtomicU64,
    limiter_wait_us: AtomicU64,
    reauths: AtomicU64,
    suspensions: AtomicU64,
    rejections: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn bump(map: &Mutex<BTreeMap<String, u64>>, class: &str) {
        let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(class.to_string()).or_insert(0) += 1;
    }
}

struct Inner {
    cfg: HttpConfig,
    http: reqwest::Client,
    /// Governor GCRA with burst 1; `None` when unlimited.
    limiter: Option<DefaultDirectRateLimiter>,
    /// Serialises limiter waiters (tokio's mutex is FIFO-fair).
    limiter_queue: tokio::sync::Mutex<()>,
    semaphore: Semaphore,
    quota: Arc<dyn QuotaLedger>,
    /// Makes "check budget, then count the call" atomic within this daemon.
    budget_lock: Mutex<()>,
    /// The quota day for which the "budget spent" alert was already logged.
    budget_alerted: Mutex<Option<String>>,
    circuit: Mutex<Option<Circuit>>,
    /// A vendor `Retry-After` on a throttle holds back every task until then.
    throttle_until: Mutex<Option<tokio::time::Instant>>,
    counters: Counters,
}

/// The shared HTTP client of one connector. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("connector", &self.inner.cfg.connector)
            .field("rate", &self.inner.cfg.rate)
            .field("max_concurrent", &self.inner.cfg.max_concurrent)
            .finish_non_exhaustive()
    }
}

/// A transport failure of one attempt.
struct TransportFailure {
    timeout: bool,
    /// False only when the request certainly never left (connection not established).
    maybe_applied: bool,
    detail: String,
}

impl HttpClient {
    /// Builds the client (rustls, timeouts, limiter, semaphore).
    pub fn new(cfg: HttpConfig, quota: Arc<dyn QuotaLedger>) -> Result<HttpClient, HttpError> {
        let config_err = |detail: String| HttpError::Config {
            connector: cfg.connector.clone(),
            detail,
        };
        if cfg.max_concurrent == 0 {
            return Err(config_err("max_concurrent must be at least 1".into()));
        }
        if cfg.read_timeout.is_zero() || cfg.write_timeout.is_zero() {
            return Err(config_err("timeouts must be non-zero".into()));
        }
        let limiter = match cfg.call_spacing()? {
            None => None,
            Some(spacing) => {
                let quota = Quota::with_period(spacing)
                    .ok_or_else(|| config_err("rate spacing rounds to zero".into()))?
                    .allow_burst(NonZeroU32::MIN);
                Some(governor::RateLimiter::direct(quota))
            }
        };
        let user_agent = HeaderValue::from_str(&cfg.user_agent)
            .map_err(|_| config_err("user_agent is not a valid header value".into()))?;
        let mut default_headers = HeaderMap::new();
        default_headers.insert(USER_AGENT, user_agent);
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .default_headers(default_headers)
            // Redirects would re-send credentials to wherever a proxy points: refuse them.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                config_err(format!("cannot build the HTTP client: {}", e.without_url()))
            })?;
        Ok(HttpClient {
            inner: Arc::new(Inner {
                semaphore: Semaphore::new(cfg.max_concurrent),
                cfg,
                http,
                limiter,
                limiter_queue: tokio::sync::Mutex::new(()),
                quota,
                budget_lock: Mutex::new(()),
                budget_alerted: Mutex::new(None),
                circuit: Mutex::new(None),
                throttle_until: Mutex::new(None),
                counters: Counters::default(),
            }),
        })
    }

    /// The configuration the client was built with.
    pub fn config(&self) -> &HttpConfig {
        &self.inner.cfg
    }

    /// Sends `req`, retrying, throttling and re-authenticating as needed, and returns the
    /// answer `classify` calls a success.
    pub async fn send(
        &self,
        req: ApiRequest,
        classify: &dyn Classifier,
    ) -> Result<ApiResponse, HttpError> {
        let span = tracing::info_span!(
            "http_call",
            connector = %self.inner.cfg.connector,
            endpoint = req.endpoint,
            attempt = tracing::field::Empty,
        );
        let result = self.send_inner(&req, classify).instrument(span).await;
        if let Err(e) = &result {
            Counters::bump(&self.inner.counters.errors, e.class());
        }
        result
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> HttpMetrics {
        let c = &self.inner.counters;
        let cfg = &self.inner.cfg;
        let day = cfg.quota_reset.day_key(Utc::now());
        let used = self.inner.quota.used(&day);
        HttpMetrics {
            connector: cfg.connector.clone(),
            calls: c.calls.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            limiter_wait_ms: c.limiter_wait_us.load(Ordering::Relaxed) / 1000,
            rejections: c
                .rejections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            errors: c.errors.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            reauths: c.reauths.load(Ordering::Relaxed),
            suspensions: c.suspensions.load(Ordering::Relaxed),
            quota_used_today: used,
            quota_left_today: cfg.daily_budget.map(|b| b.saturating_sub(used)),
            suspended_until: self.suspended_until(),
        }
    }

    /// When the open circuit (ban, vendor quota) closes; `None` when calls may go out.
    pub fn suspended_until(&self) -> Option<DateTime<Utc>> {
        self.open_circuit().map(|c| c.until)
    }

    /// Opens the circuit until `until` (e.g. a connector that learns from a usage endpoint
    /// that the shared quota is spent). Logs loudly the first time for a given opening.
    pub fn suspend(&self, until: DateTime<Utc>, class: &'static str, detail: String) {
        let mut circuit = self.inner.circuit.lock().unwrap_or_else(|e| e.into_inner());
        let extends = circuit.as_ref().is_none_or(|c| until > c.until);
        if !extends {
            return;
        }
        let was_open = circuit.as_ref().is_some_and(|c| c.until > Utc::now());
        if !was_open {
            self.inner
                .counters
                .suspensions
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                connector = %self.inner.cfg.connector,
                %until,
                class,
                detail = %detail,
                "calls to the vendor suspended: circuit open until {until}"
            );
        }
        *circuit = Some(Circuit {
            until,
            class,
            detail,
        });
    }

    fn open_circuit(&self) -> Option<Circuit> {
        let mut circuit = self.inner.circuit.lock().unwrap_or_else(|e| e.into_inner());
        match circuit.as_ref() {
            Some(c) if c.until > Utc::now() => Some(c.clone()),
            Some(_) => {
                tracing::warn!(connector = %self.inner.cfg.connector, "circuit closed: calls resume");
                *circuit = None;
                None
            }
            None => None,
        }
    }

    fn check_circuit(&self, endpoint: &'static str) -> Result<(), HttpError> {
        match self.open_circuit() {
            Some(c) => Err(HttpError::Suspended {
                connector: self.inner.cfg.connector.clone(),
                endpoint,
                until: c.until,
                class: c.class,
                detail: c.detail,
            }),
            None => Ok(()),
        }
    }

    /// Checks the daily budget and counts one call against it, atomically.
    fn charge_budget(&self, endpoint: &'static str) -> Result<(), HttpError> {
        let cfg = &self.inner.cfg;
        let now = Utc::now();
        let day = cfg.quota_reset.day_key(now);
        let _guard = self
            .inner
            .budget_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(budget) = cfg.daily_budget {
            let used = self.inner.quota.used(&day);
            if used >= budget {
                let until = cfg.quota_reset.next_reset(now);
                let mut alerted = self
                    .inner
                    .budget_alerted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if alerted.as_deref() != Some(day.as_str()) {
                    tracing::error!(
                        connector = %cfg.connector,
                        budget,
                        used,
                        %until,
                        "daily call budget spent: no calls until the quota day resets"
                    );
                    *alerted = Some(day.clone());
                }
                return Err(HttpError::Suspended {
                    connector: cfg.connector.clone(),
                    endpoint,
                    until,
                    class: "daily_budget",
                    detail: format!("{used} of {budget} calls used on quota day {day}"),
                });
            }
        }
        self.inner.quota.add(&day, 1);
        Ok(())
    }

    async fn wait_throttle_gate(&self) {
        let until = *self
            .inner
            .throttle_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
    }

    fn hold_back_all(&self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        let mut gate = self
            .inner
            .throttle_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if gate.is_none_or(|g| g < until) {
            *gate = Some(until);
        }
    }

    async fn wait_limiter(&self) {
        let Some(limiter) = &self.inner.limiter else {
            return;
        };
        let started = Instant::now();
        let _turn = self.inner.limiter_queue.lock().await;
        limiter.until_ready().await;
        let waited = started.elapsed().as_micros() as u64;
        self.inner
            .counters
            .limiter_wait_us
            .fetch_add(waited, Ordering::Relaxed);
    }

    fn auth_error(&self, endpoint: &'static str, e: HttpError) -> HttpError {
        match e {
            // A ban or an outage of the token endpoint is not a credentials problem.
            HttpError::Suspended { .. }
            | HttpError::Transient { .. }
            | HttpError::Timeout { .. }
            | HttpError::Connection { .. } => e,
            other => HttpError::Auth {
                connector: self.inner.cfg.connector.clone(),
                endpoint,
                detail: other.to_string(),
            },
        }
    }

    async fn send_inner(
        &self,
        req: &ApiRequest,
        classify: &dyn Classifier,
    ) -> Result<ApiResponse, HttpError> {
        let cfg = &self.inner.cfg;
        let endpoint = req.endpoint;
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(cfg.backoff_min)
            .with_max_delay(cfg.backoff_max)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(cfg.max_retries as usize)
            .build();
        let mut attempt: u32 = 0;
        let mut reauthed = false;
        loop {
            attempt += 1;
            tracing::Span::current().record("attempt", attempt);
            if attempt > 1 {
                self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
            }
            self.check_circuit(endpoint)?;
            self.wait_throttle_gate().await;

            let mut headers = HeaderMap::new();
            for (n, v) in &req.headers {
                headers.append(n.clone(), v.clone());
            }
            let generation = match &req.auth {
                Some(a) => Some(
                    a.apply(&mut headers)
                        .await
                        .map_err(|e| self.auth_error(endpoint, e))?,
                ),
                None => None,
            };

            // Order matters: permit, then limiter, then send — so that admitted calls
            // cannot bunch up again behind the semaphore.
            let permit = self
                .inner
                .semaphore
                .acquire()
                .await
                .expect("the semaphore is never closed");
            self.wait_limiter().await;
            self.check_circuit(endpoint)?;
            self.charge_budget(endpoint)?;
            self.inner.counters.calls.fetch_add(1, Ordering::Relaxed);
            let result = self.attempt(req, headers).await;
            drop(permit);

            let resp = match result {
                Ok(resp) => resp,
                Err(f) => {
                    let class = if f.timeout { "timeout" } else { "connection" };
                    let fail = || {
                        if f.timeout {
                            HttpError::Timeout {
                                connector: cfg.connector.clone(),
                                endpoint,
                                timeout: self.call_timeout(req),
                                attempts: attempt,
                                maybe_applied: f.maybe_applied,
                            }
                        } else {
                            HttpError::Connection {
                                connector: cfg.connector.clone(),
                                endpoint,
                                detail: f.detail.clone(),
                                maybe_applied: f.maybe_applied,
                            }
                        }
                    };
                    if f.maybe_applied && !req.idempotent {
                        tracing::warn!(
                            class,
                            detail = %f.detail,
                            "non-idempotent request may have reached the server: not retried"
                        );
                        return Err(fail());
                    }
                    match backoff.next() {
                        Some(delay) => {
                            tracing::debug!(class, detail = %f.detail, ?delay, "retrying");
                            tokio::time::sleep(delay).await;
                            continue;
                        }
                        None => return Err(fail()),
                    }
                }
            };

            match classify.classify(&resp) {
                Outcome::Success => return Ok(resp),
                Outcome::Throttled { after, class } => {
                    Counters::bump(&self.inner.counters.rejections, class);
                    tracing::warn!(class, ?after, status = %resp.status, "vendor throttled the call");
                    if let Some(after) = after {
                        self.hold_back_all(after.min(cfg.max_retry_after));
                    }
                    self.retry_wait(&mut backoff, after, class, attempt, endpoint, &resp)
                        .await?;
                }
                Outcome::Retry { after, class } => {
                    Counters::bump(&self.inner.counters.rejections, class);
                    if !req.idempotent {
                        return Err(HttpError::Transient {
                            connector: cfg.connector.clone(),
                            endpoint,
                            attempts: attempt,
                            class,
                            detail: format!(
                                "HTTP {} on a non-idempotent request (not retried): {}",
                                resp.status,
                                resp.text_snippet()
                            ),
                            retry_after: after,
                        });
                    }
                    self.retry_wait(&mut backoff, after, class, attempt, endpoint, &resp)
                        .await?;
                }
                Outcome::Reauth => {
                    let (Some(auth), Some(generation)) = (&req.auth, generation) else {
                        return Err(HttpError::Auth {
                            connector: cfg.connector.clone(),
                            endpoint,
                            detail: format!(
                                "HTTP {} and no credentials to refresh: {}",
                                resp.status,
                                resp.text_snippet()
                            ),
                        });
                    };
                    if reauthed {
                        return Err(HttpError::Auth {
                            connector: cfg.connector.clone(),
                            endpoint,
                            detail: format!(
                                "credentials rejected again after a refresh (HTTP {}): {}",
                                resp.status,
                                resp.text_snippet()
                            ),
                        });
                    }
                    reauthed = true;
                    self.inner.counters.reauths.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(generation, "credentials rejected: refreshing once");
                    auth.refresh(generation)
                        .await
                        .map_err(|e| self.auth_error(endpoint, e))?;
                }
                Outcome::Suspend {
                    until,
                    class,
                    detail,
                } => {
                    Counters::bump(&self.inner.counters.rejections, class);
                    let detail = redact::redact_text(&detail, 500);
                    self.suspend(until, class, detail.clone());
                    return Err(HttpError::Suspended {
                        connector: cfg.connector.clone(),
                        endpoint,
                        until,
                        class,
                        detail,
                    });
                }
                Outcome::Fail { class, detail } => {
                    return Err(HttpError::Rejected {
                        connector: cfg.connector.clone(),
                        endpoint,
                        status: resp.status,
                        class,
                        detail: redact::redact_text(&detail, 500),
                    });
                }
            }
        }
    }

    /// Sleeps before the next retry (at least the vendor's `after`), or ends the call
    /// with `Transient` when retries are spent or the vendor wants a long pause.
    async fn retry_wait(
        &self,
        backoff: &mut impl Iterator<Item = Duration>,
        after: Option<Duration>,
        class: &'static str,
        attempt: u32,
        endpoint: &'static str,
        resp: &ApiResponse,
    ) -> Result<(), HttpError> {
        let cfg = &self.inner.cfg;
        let give_up = |why: &str| HttpError::Transient {
            connector: cfg.connector.clone(),
            endpoint,
            attempts: attempt,
            class,
            detail: format!("HTTP {} ({why}): {}", resp.status, resp.text_snippet()),
            retry_after: after,
        };
        if after.is_some_and(|a| a > cfg.max_retry_after) {
            return Err(give_up(
                "the vendor asked for a longer pause than we wait in-call",
            ));
        }
        let Some(delay) = backoff.next() else {
            return Err(give_up("retries exhausted"));
        };
        let delay = delay.max(after.unwrap_or_default());
        tracing::debug!(class, ?delay, "retrying after backoff");
        tokio::time::sleep(delay).await;
        Ok(())
    }

    fn call_timeout(&self, req: &ApiRequest) -> Duration {
        if req.is_write {
            self.inner.cfg.write_timeout
        } else {
            self.inner.cfg.read_timeout
        }
    }

    /// One attempt on the wire: send, read the whole body, parse JSON when it is JSON.
    async fn attempt(
        &self,
        req: &ApiRequest,
        headers: HeaderMap,
    ) -> Result<ApiResponse, TransportFailure> {
        let cfg = &self.inner.cfg;
        let timeout = self.call_timeout(req);
        let mut rb = self
            .inner
            .http
            .request(req.method.clone(), req.url.clone())
            .headers(headers)
            .timeout(timeout);
        if !req.query.is_empty() {
            rb = rb.query(&req.query);
        }
        rb = match &req.body {
            Some(Body::Json(v)) => rb.json(v),
            Some(Body::Form(pairs)) => rb.form(pairs),
            None => rb,
        };
        let started = Instant::now();
        let exchange = async {
            let resp = rb.send().await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        };
        // reqwest's own timeout covers connect-to-end-of-body; this bound also covers a
        // body that trickles forever, whatever reqwest does.
        let bound = timeout + cfg.connect_timeout;
        let outcome = tokio::time::timeout(bound, exchange).await;
        let latency_ms = started.elapsed().as_millis() as u64;
        let (status, headers, body) = match outcome {
            Err(_) => {
                tracing::debug!(method = %req.method, path = req.url.path(), latency_ms, "timed out");
                return Err(TransportFailure {
                    timeout: true,
                    maybe_applied: true,
                    detail: format!("no complete answer within {bound:?}"),
                });
            }
            Ok(Err(e)) => {
                let failure = transport_failure(&e);
                tracing::debug!(
                    method = %req.method,
                    path = req.url.path(),
                    latency_ms,
                    error = %failure.detail,
                    "transport error"
                );
                return Err(failure);
            }
            Ok(Ok(parts)) => parts,
        };
        tracing::debug!(
            method = %req.method,
            path = req.url.path(),
            status = status.as_u16(),
            latency_ms,
            "answered"
        );
        let body = body.to_vec();
        let looks_json = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("json"))
            || body
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|b| *b == b'{' || *b == b'[');
        let json = if looks_json && !body.is_empty() {
            serde_json::from_slice(&body).ok()
        } else {
            None
        };
        Ok(ApiResponse {
            connector: cfg.connector.clone(),
            endpoint: req.endpoint,
            status,
            headers,
            body,
            json,
        })
    }
}

/// Classifies a reqwest error without its URL (which may carry secrets in the query).
fn transport_failure(e: &reqwest::Error) -> TransportFailure {
    let mut detail = String::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        if !detail.is_empty() {
            detail.push_str(": ");
        }
        detail.push_str(&s.to_string());
        source = s.source();
    }
    if detail.is_empty() {
        detail = "request failed".into();
    }
    let detail = redact::redact_text(&detail, 300);
    TransportFailure {
        timeout: e.is_timeout(),
        // A failed connect means nothing was written; anything later may have been.
        maybe_applied: !e.is_connect(),
        detail,
    }
}
