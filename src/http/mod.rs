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
//! # For connector authors: what a vendor classifier should return
//! | answer | [`Outcome`] |
//! |---|---|
//! | 2xx (Marketo: `success: true`) | `Success` (per-record failures are the connector's business) |
//! | 429, Marketo 606 (rate), 615 (concurrency) | `Throttled` — nothing was done, so even a non-idempotent POST is retried |
//! | 5xx, 408, Marketo 604/608/611/713 | `Retry` — retried only if [`ApiRequest::idempotent`] |
//! | 401, Marketo 601/602 | `Reauth` — one refresh through the request's [`AuthProvider`], then one retry |
//! | Marketo 607 (daily quota) | `Suspend { until: QuotaReset::UsCentralMidnight.next_reset(now) }` |
//! | amoCRM 403 that is not a permission error (HTML/nginx) | `Suspend` for a while (e.g. 1 h): the circuit closes then and the next call probes |
//! | anything else | `Fail` with the vendor's reason |
//!
//! Timeouts and connection resets after the request was written are retried only for
//! idempotent requests; for the others the call ends with [`HttpError::Timeout`] /
//! [`HttpError::Connection`] (`maybe_applied: true`) and the outbox replay decides.
//! A refused connection (nothing written) is retried for every request.
//!
//! # Why the limiter is provably safe
//! Vendors count calls in rolling windows ("100 per 20 s", "7 per second"). Two parts keep
//! every window within the limit.
//!
//! *Spacing.* A token bucket (GCRA) with burst `n` would allow `n` calls at once and then
//! refill during the same window: up to almost `2n` in one window. We use governor's GCRA
//! with a tiny burst `b` (1, or 2 for limits of 20 calls per window and more) and emission
//! interval `T = W / (calls + 1 − b)`. GCRA admits a call at `t` only if
//! `t ≥ TAT − (b − 1)·T`, and then sets `TAT = max(TAT, t) + T`. Take `n` calls admitted in
//! a window `[s, s + W)`: after the first (at `t₁`) `TAT ≥ t₁ + T`, and each further call
//! pushes it by `T`, so the n-th needs `tₙ ≥ t₁ + (n − 1)·T − (b − 1)·T`. With
//! `tₙ − t₁ < W` this gives `n < W/T + b = calls + 1`, i.e. `n ≤ calls` *admissions* per
//! window, evenly spread (no bursts for vendors that dislike them).
//!
//! *The call log* ([`window::CallWindow`]). The vendor counts a call when it arrives, not
//! when we admit it, and network delay can bunch admitted calls together. Every admitted
//! call therefore holds one of `calls` slots until one window after the vendor can last
//! have counted it: until its answer (or `margin × W` after admission, if the answer takes
//! longer) plus `W`. That bounds the vendor's count in every window by `calls` for *any*
//! delay when answers come back within `margin × W`, and for delay differences under
//! `margin × W` otherwise (the proof is in [`window`]). The margin (default 5 %; the
//! connectors use 10 % for per-second limits: 100 ms) costs nothing on a fast link —
//! `calls` calls take `W + round trip`, ≈ 99 % of the limit — and at worst
//! `1 / (1 + margin)` of the limit when answers are slow. With `b = 2` a waiter that wakes
//! a little late can catch up, so timer lateness does not accumulate (with `b = 1` each
//! late wake-up is lost for good, which only matters when `T` is a few milliseconds).
//!
//! The limiter is passed right before the request is written (after the concurrency
//! permit is held), so nothing can bunch admitted calls back together; waiters queue in
//! FIFO order so a crowd of tasks does not poll it in a thundering herd. Every attempt,
//! retries included, passes it, and holds its slot in the log until its answer is in.
//! A fractional per-second rate `r` (`PerSecond(2.5)`) is one call per window of `1/r`.
//!
//! # Adaptive pacing
//! The margin only covers the delay it was sized for. When a rate rejection (429, Marketo
//! 606) still arrives for a call the current limiter admitted, the server counted
//! differently: the client spaces calls [`PACING_STEP`] (5 %) wider and lets the call log
//! assume a delay one step longer, up to [`PACING_MAX_STEPS`] times, and takes one step
//! back after each quiet [`HttpConfig::pacing_recovery`] (10 min). Without it a loaded box
//! would keep collecting the same occasional 429 — and amoCRM turns repeated 429s into a
//! ban.

pub mod auth;
pub mod classify;
pub mod error;
pub mod quota;
pub mod redact;
pub mod window;

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
use window::{CallWindow, WindowSlot};

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
    /// The longest a call is assumed to take to reach the vendor when its answer takes
    /// longer still, as a fraction of the rate window (0.05 = 5 %; see the module docs).
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
    /// After a rate rejection the limiter did not prevent, calls are spaced wider (see
    /// [`PACING_STEP`]); each quiet period this long takes one step back.
    pub pacing_recovery: Duration,
    /// The largest answer body read; a larger one fails the attempt like a broken
    /// connection, so a server that sends without end cannot exhaust memory.
    pub max_body_bytes: usize,
}

/// [`HttpConfig::max_body_bytes`] by default: a page of the largest batches any of the
/// vendors serves is a few MiB even with long texts.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 << 20;

/// Refreshes one call may make in a row before its credentials count as bad.
const MAX_REAUTHS_IN_A_ROW: u32 = 2;

/// Extra spacing margin added after each rate rejection (429, Marketo 606) that got past
/// the limiter: the server counted more jitter than the margin absorbs, so the client
/// slows down instead of collecting more rejections (amoCRM bans after repeated 429s).
pub const PACING_STEP: f64 = 0.05;

/// Most pacing steps ever added: spacing is never widened by more than 25 %.
pub const PACING_MAX_STEPS: u32 = 5;

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
            pacing_recovery: Duration::from_secs(600),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// The limiter's GCRA parameters — replenish period and burst — or `None` when
    /// unlimited, before any adaptive widening. They keep the *admissions* in every window
    /// within the limit; see the module docs for how the vendor's count is kept there too.
    pub fn limiter_quota(&self) -> Result<Option<(Duration, NonZeroU32)>, HttpError> {
        self.check_margin(self.rate_safety_margin)?;
        self.limiter_quota_with(0.0)
    }

    fn config_error(&self, detail: String) -> HttpError {
        HttpError::Config {
            connector: self.connector.clone(),
            detail,
        }
    }

    fn check_margin(&self, m: f64) -> Result<(), HttpError> {
        if m.is_finite() && (0.0..=1.0).contains(&m) {
            Ok(())
        } else {
            Err(self.config_error(format!("rate_safety_margin must be within 0..=1, got {m}")))
        }
    }

    /// The limit as `calls` per `window`, or `None` when unlimited. A fractional rate
    /// `r` per second is one call per `1/r`.
    pub fn calls_per_window(&self) -> Result<Option<(u32, Duration)>, HttpError> {
        let (calls, window) = match self.rate {
            RateLimit::Unlimited => return Ok(None),
            RateLimit::PerSecond(r) => {
                if !(r.is_finite() && r > 0.0) {
                    return Err(
                        self.config_error(format!("rate must be a positive number, got {r}"))
                    );
                }
                if r.fract() != 0.0 || r > f64::from(u32::MAX) {
                    (1, Duration::from_secs_f64(1.0 / r))
                } else {
                    (r as u32, Duration::from_secs(1))
                }
            }
            RateLimit::PerWindow { calls, window } => (calls, window),
        };
        if calls == 0 || window.is_zero() {
            return Err(self.config_error(format!(
                "rate needs calls > 0 and a non-zero window, got {calls} per {window:?}"
            )));
        }
        Ok(Some((calls, window)))
    }

    /// [`HttpConfig::limiter_quota`] with the spacing widened by the fraction `m`.
    fn limiter_quota_with(&self, m: f64) -> Result<Option<(Duration, NonZeroU32)>, HttpError> {
        self.check_margin(m)?;
        let Some((calls, window)) = self.calls_per_window()? else {
            return Ok(None);
        };
        // Burst 2 lets a waiter that woke a little late catch up, so timer lateness does
        // not accumulate into lost throughput; it costs one call per window, worth it only
        // for larger limits.
        let burst: u32 = if calls >= 20 { 2 } else { 1 };
        let period = window.mul_f64((1.0 + m) / f64::from(calls + 1 - burst));
        if period.is_zero() {
            return Err(self.config_error("rate spacing rounds to zero".into()));
        }
        Ok(Some((
            period,
            NonZeroU32::new(burst).expect("burst is 1 or 2"),
        )))
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

/// The limiter in force and how many [`PACING_STEP`]s wider than configured it spaces calls.
struct Pacing {
    limiter: Arc<DefaultDirectRateLimiter>,
    /// The log keeping the vendor's count of every window within the limit.
    window: Arc<CallWindow>,
    /// The window's length, to turn margins into the log's assumed delay.
    window_len: Duration,
    /// The limiter's spacing (GCRA emission interval).
    period: Duration,
    /// Steps the current limiter was built with.
    steps: u32,
    /// Steps wanted: raised by a rate rejection, lowered after a quiet period.
    wanted: u32,
    /// The last rate rejection or step back.
    since: Instant,
    /// Counts limiter rebuilds: a rejection widens only if its call was admitted by the
    /// limiter now in force (calls admitted before a widening say nothing about it).
    generation: u64,
}

/// Builds a GCRA limiter with margin `margin`; `None` when the rate is unlimited.
fn build_limiter(
    cfg: &HttpConfig,
    margin: f64,
) -> Result<Option<(Arc<DefaultDirectRateLimiter>, Duration)>, HttpError> {
    let Some((period, burst)) = cfg.limiter_quota_with(margin.min(1.0))? else {
        return Ok(None);
    };
    let quota = Quota::with_period(period)
        .ok_or_else(|| HttpError::Config {
            connector: cfg.connector.clone(),
            detail: "rate spacing rounds to zero".into(),
        })?
        .allow_burst(burst);
    Ok(Some((
        Arc::new(governor::RateLimiter::direct(quota)),
        period,
    )))
}

struct Inner {
    cfg: HttpConfig,
    http: reqwest::Client,
    /// The rate limiter and its adaptive widening; `None` when unlimited.
    pacing: Option<Mutex<Pacing>>,
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
        cfg.check_margin(cfg.rate_safety_margin)?;
        let pacing = match (build_limiter(&cfg, 0.0)?, cfg.calls_per_window()?) {
            (Some((limiter, period)), Some((calls, window_len))) => Some(Mutex::new(Pacing {
                limiter,
                window: CallWindow::new(
                    calls as usize,
                    window_len,
                    window_len.mul_f64(cfg.rate_safety_margin),
                ),
                window_len,
                period,
                steps: 0,
                wanted: 0,
                since: Instant::now(),
                generation: 0,
            })),
            _ => None,
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
                pacing,
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
        // Error level so that the call's warnings (throttling, retries) carry it at any
        // log level: a span is enabled only where its level is.
        let span = tracing::error_span!(
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

    /// Holds every call back until `until` (like a vendor `Retry-After`). Used at start-up
    /// when the previous process called the vendor less than one rate window ago, so that
    /// the two processes' calls never share a window.
    pub fn hold_until(&self, until: tokio::time::Instant) {
        let mut t = self
            .inner
            .throttle_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if t.is_none_or(|cur| until > cur) {
            *t = Some(until);
        }
    }

    /// How long after its admission a call can still weigh in one of the vendor's windows:
    /// the window plus the delay the call log assumes for reaching the vendor. A restarted
    /// daemon holds its first call this long; `None` when unlimited.
    pub fn window_with_delay(&self) -> Option<Duration> {
        let p = self
            .inner
            .pacing
            .as_ref()?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Some(p.window_len + p.window.delay())
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

    /// Waits for the rate limiter and then for a slot of the call log; returns the
    /// generation of the limiter that admitted and the slot, to hold until the answer.
    async fn wait_limiter(&self) -> (u64, Option<WindowSlot>) {
        let Some(pacing) = &self.inner.pacing else {
            return (0, None);
        };
        let started = Instant::now();
        let _turn = self.inner.limiter_queue.lock().await;
        let (limiter, window, generation, settle) = self.current_limiter(pacing);
        if let Some(settle) = settle {
            // A fresh limiter admits at once; one old spacing keeps the last call's distance.
            tokio::time::sleep(settle).await;
        }
        limiter.until_ready().await;
        // Last: the call is sent right after the log admits it (the log's proof needs it).
        let slot = window.admit().await;
        let waited = started.elapsed().as_micros() as u64;
        self.inner
            .counters
            .limiter_wait_us
            .fetch_add(waited, Ordering::Relaxed);
        (generation, Some(slot))
    }

    /// The limiter to pass now, rebuilt first when the pacing changed (a rejection, or a
    /// quiet [`HttpConfig::pacing_recovery`] period taking a step back); then also the
    /// old spacing to wait before using it.
    fn current_limiter(
        &self,
        pacing: &Mutex<Pacing>,
    ) -> (
        Arc<DefaultDirectRateLimiter>,
        Arc<CallWindow>,
        u64,
        Option<Duration>,
    ) {
        let cfg = &self.inner.cfg;
        let mut p = pacing.lock().unwrap_or_else(|e| e.into_inner());
        if p.wanted > 0 && p.wanted == p.steps && p.since.elapsed() >= cfg.pacing_recovery {
            p.wanted -= 1;
            p.since = Instant::now();
        }
        if p.wanted == p.steps {
            return (p.limiter.clone(), p.window.clone(), p.generation, None);
        }
        let widening = PACING_STEP * f64::from(p.wanted);
        let margin = cfg.rate_safety_margin + widening;
        match build_limiter(cfg, widening) {
            Ok(Some((limiter, period))) => {
                let delay = p.window_len.mul_f64(margin.min(1.0));
                tracing::info!(
                    connector = %cfg.connector,
                    margin,
                    spacing_ms = period.as_secs_f64() * 1000.0,
                    assumed_delay_ms = delay.as_secs_f64() * 1000.0,
                    "rate limiter spacing changed"
                );
                let settle = p.period;
                p.limiter = limiter;
                p.window.set_delay(delay);
                p.period = period;
                p.steps = p.wanted;
                p.generation += 1;
                (
                    p.limiter.clone(),
                    p.window.clone(),
                    p.generation,
                    Some(settle),
                )
            }
            // The configured margin was valid; a wider one only changes the spacing.
            _ => {
                p.wanted = p.steps;
                (p.limiter.clone(), p.window.clone(), p.generation, None)
            }
        }
    }

    /// A rate rejection got past the limiter: space calls one [`PACING_STEP`] wider —
    /// once per limiter, i.e. only for a call that limiter admitted (`generation`), so
    /// calls rejected together count once.
    fn widen_pacing(&self, class: &str, generation: u64) {
        // 615 is Marketo's concurrency limit, which spacing does not address.
        if class == "615" {
            return;
        }
        let Some(pacing) = &self.inner.pacing else {
            return;
        };
        let mut p = pacing.lock().unwrap_or_else(|e| e.into_inner());
        p.since = Instant::now();
        if generation == p.generation && p.wanted == p.steps && p.wanted < PACING_MAX_STEPS {
            p.wanted += 1;
            tracing::warn!(
                connector = %self.inner.cfg.connector,
                class,
                steps = p.wanted,
                "rate rejection despite the limiter: spacing calls wider"
            );
        }
    }

    /// The spacing margin in force: the configured one plus any widening after rejections.
    pub fn rate_margin(&self) -> f64 {
        let steps = self.inner.pacing.as_ref().map_or(0, |p| {
            let p = p.lock().unwrap_or_else(|e| e.into_inner());
            p.wanted.max(p.steps)
        });
        self.inner.cfg.rate_safety_margin + PACING_STEP * f64::from(steps)
    }

    fn auth_error(&self, endpoint: &'static str, e: HttpError) -> HttpError {
        match e {
            // A ban or an outage of the token endpoint is not a credentials problem.
            HttpError::Suspended { .. }
            | HttpError::Transient { .. }
            | HttpError::Timeout { .. }
            | HttpError::Connection { .. } => e,
            // Already an authentication failure (of the credentials, or of the token
            // endpoint): say where, without saying "authentication failed" twice.
            HttpError::Auth {
                endpoint: "auth",
                detail,
                ..
            } => HttpError::Auth {
                connector: self.inner.cfg.connector.clone(),
                endpoint,
                detail,
            },
            HttpError::Auth {
                endpoint: inner,
                detail,
                ..
            } => HttpError::Auth {
                connector: self.inner.cfg.connector.clone(),
                endpoint,
                detail: format!("{inner}: {detail}"),
            },
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
        // Refreshes since the last non-auth answer. A token can expire between its refresh
        // and its use (Marketo hands out the same token until it expires), so a second
        // rejection gets a second refresh; a third in a row means the credentials are bad.
        let mut reauths_in_a_row: u32 = 0;
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
            // The budget is charged (a durable write, which can wait on the store) before
            // the limiter admits the call: between admission and send nothing may stall,
            // or a late call bunches with the next one in the vendor's window.
            self.check_circuit(endpoint)?;
            self.charge_budget(endpoint)?;
            let (admitted_by, window_slot) = self.wait_limiter().await;
            // The circuit may have opened while this call waited for its turn.
            self.check_circuit(endpoint)?;
            // Another call may have refreshed the token while this one waited: send the
            // current one (never fetched here, so nothing stalls between admission and send).
            let generation = match (&req.auth, generation) {
                (Some(a), Some(g)) => Some(a.reapply(&mut headers, g).await),
                _ => generation,
            };
            self.inner.counters.calls.fetch_add(1, Ordering::Relaxed);
            let result = self.attempt(req, headers).await;
            // The vendor has counted the call by now: its slot's last window starts.
            drop(window_slot);
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
                            // Auth rejections around a lost answer are not back to back:
                            // the token may have expired during it (bounded by backoff).
                            reauths_in_a_row = 0;
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
                    // The refreshed credentials were accepted; a later expiry in this
                    // retry sequence deserves its own refresh.
                    reauths_in_a_row = 0;
                    Counters::bump(&self.inner.counters.rejections, class);
                    tracing::warn!(class, ?after, status = %resp.status, "vendor throttled the call");
                    self.widen_pacing(class, admitted_by);
                    if let Some(after) = after {
                        self.hold_back_all(after.min(cfg.max_retry_after));
                    }
                    self.retry_wait(&mut backoff, after, class, attempt, endpoint, &resp)
                        .await?;
                }
                Outcome::Retry { after, class } => {
                    reauths_in_a_row = 0;
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
                    if reauths_in_a_row >= MAX_REAUTHS_IN_A_ROW {
                        return Err(HttpError::Auth {
                            connector: cfg.connector.clone(),
                            endpoint,
                            detail: format!(
                                "credentials rejected again after {reauths_in_a_row} refreshes (HTTP {}): {}",
                                resp.status,
                                resp.text_snippet()
                            ),
                        });
                    }
                    reauths_in_a_row += 1;
                    self.inner.counters.reauths.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(generation, "credentials rejected: refreshing");
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
        let max_body = cfg.max_body_bytes;
        // `Err(bytes)` inside: the answer is larger than `max_body` (at least `bytes`).
        let exchange = async {
            let mut resp = rb.send().await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let announced = resp.content_length().unwrap_or(0);
            if announced > max_body as u64 {
                return Ok(Err(announced));
            }
            let mut body = Vec::with_capacity(announced as usize);
            while let Some(chunk) = resp.chunk().await? {
                if body.len() + chunk.len() > max_body {
                    return Ok(Err((body.len() + chunk.len()) as u64));
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>(Ok((status, headers, body)))
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
            Ok(Ok(Err(bytes))) => {
                tracing::warn!(method = %req.method, path = req.url.path(), bytes, max_body, "answer too large; not read");
                return Err(TransportFailure {
                    timeout: false,
                    maybe_applied: true,
                    detail: format!(
                        "answer larger than {max_body} bytes (at least {bytes}); not read"
                    ),
                });
            }
            Ok(Ok(Ok(parts))) => parts,
        };
        tracing::debug!(
            method = %req.method,
            path = req.url.path(),
            status = status.as_u16(),
            latency_ms,
            "answered"
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound from the module docs: any window holds fewer than `W/T + b` calls.
    fn max_calls_per_window(period: Duration, burst: u32, window: Duration) -> f64 {
        window.as_secs_f64() / period.as_secs_f64() + f64::from(burst)
    }

    #[test]
    fn vendor_limits_get_limiters_admitting_at_most_the_limit_per_window() {
        let cases = [
            (
                RateLimit::PerWindow {
                    calls: 100,
                    window: Duration::from_secs(20),
                },
                100,
                20.0,
            ),
            (RateLimit::PerSecond(7.0), 7, 1.0),
            (RateLimit::PerSecond(10.0), 10, 1.0),
            (
                RateLimit::PerWindow {
                    calls: 50,
                    window: Duration::from_secs(1),
                },
                50,
                1.0,
            ),
        ];
        for (rate, calls, window_s) in cases {
            let cfg = HttpConfig {
                rate,
                ..HttpConfig::new("t")
            };
            let (period, burst) = cfg.limiter_quota().unwrap().unwrap();
            let window = Duration::from_secs_f64(window_s);
            let bound = max_calls_per_window(period, burst.get(), window);
            assert!(
                bound <= f64::from(calls) + 1.0 + 1e-6 && bound > f64::from(calls) + 0.5,
                "{rate:?}: up to {bound} calls per window (period {period:?}, burst {burst})"
            );
            let throughput = window.as_secs_f64() / period.as_secs_f64() / f64::from(calls);
            assert!(
                throughput >= 0.98,
                "{rate:?}: only {:.1}% of the limit",
                throughput * 100.0
            );
        }
    }

    #[test]
    fn fractional_rates_are_spaced_by_their_inverse() {
        let cfg = HttpConfig {
            rate: RateLimit::PerSecond(2.5),
            rate_safety_margin: 0.0,
            ..HttpConfig::new("t")
        };
        let (period, burst) = cfg.limiter_quota().unwrap().unwrap();
        assert_eq!((period, burst.get()), (Duration::from_millis(400), 1));
    }

    #[test]
    fn request_debug_hides_auth_headers() {
        let req = ApiRequest::get("GET x", Url::parse("https://h/x?api_key=k_SECRET").unwrap())
            .header(
                reqwest::header::AUTHORIZATION,
                HeaderValue::from_static("Bearer b_SECRET"),
            );
        let shown = format!("{req:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
    }
}
