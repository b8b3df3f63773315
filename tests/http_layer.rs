//! Behaviour of the shared HTTP layer against loopback servers: retries, Retry-After,
//! re-authentication, circuit breaking, concurrency and rate limits, the daily budget,
//! timeouts and secret redaction.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use crmbridge::connector::ConnectorError;
use crmbridge::http::*;
use crmbridge::secret::Secret;
use reqwest::header::{HeaderName, HeaderValue};
use url::Url;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const AMO_429: &str = include_str!("../wiremock-fixtures/http/amocrm_429_problem.json");
const ECHO_SECRETS: &str = include_str!("../wiremock-fixtures/http/error_echoing_secrets.json");
const OK_COMPANY: &str = include_str!("../wiremock-fixtures/http/ok_company.json");

/// A config with no rate limit and short backoffs, so tests run fast.
fn fast_cfg(name: &str) -> HttpConfig {
    HttpConfig {
        rate: RateLimit::Unlimited,
        max_concurrent: 16,
        max_retries: 3,
        backoff_min: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        read_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        ..HttpConfig::new(name)
    }
}

fn client(cfg: HttpConfig) -> HttpClient {
    HttpClient::new(cfg, Arc::new(MemoryQuotaLedger::new())).expect("valid config")
}

fn url(server: &MockServer, p: &str) -> Url {
    Url::parse(&format!("{}{p}", server.uri())).unwrap()
}

fn ok_json() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(OK_COMPANY, "application/json")
}

/// Hands out `t1`, `t2`, … and counts fetches, telling first fetches from refreshes.
#[derive(Default)]
struct CountingSource {
    fetches: AtomicUsize,
    refreshes: AtomicUsize,
}

#[async_trait]
impl TokenSource for CountingSource {
    async fn fetch(&self, rejected: Option<&Token>) -> Result<Token, HttpError> {
        if rejected.is_some() {
            self.refreshes.fetch_add(1, Ordering::SeqCst);
        }
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        // A slow token endpoint widens the window in which concurrent refreshes could race.
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(Token::new(Secret::new(format!("t{n}")), None))
    }
}

fn bearer(name: &str) -> Arc<BearerAuth<CountingSource>> {
    Arc::new(BearerAuth::new(
        name,
        CountingSource::default(),
        Duration::from_secs(60),
    ))
}

#[tokio::test]
async fn throttle_with_retry_after_is_honoured_then_succeeds() {
    let server = MockServer::start().await;
    Mock::given(path("/c"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "1")
                .set_body_raw(AMO_429, "application/problem+json"),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(path("/c"))
        .respond_with(ok_json())
        .mount(&server)
        .await;
    let c = client(fast_cfg("t"));
    let started = Instant::now();
    let resp = c
        .send(
            ApiRequest::get("GET c", url(&server, "/c")),
            &DefaultClassifier,
        )
        .await
        .expect("second attempt succeeds");
    let waited = started.elapsed();
    assert_eq!(resp.status, 200);
    assert!(
        waited >= Duration::from_secs(1),
        "Retry-After: 1 not honoured, retried after {waited:?}"
    );
    let m = c.metrics();
    assert_eq!(m.rejections.get("429"), Some(&1), "{m:?}");
    assert_eq!((m.calls, m.retries), (2, 1), "{m:?}");
}

#[tokio::test]
async fn server_errors_are_retried_up_to_max_then_transient() {
    let server = MockServer::start().await;
    Mock::given(path("/c"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let c = client(fast_cfg("t"));
    let err = c
        .send(
            ApiRequest::get("GET c", url(&server, "/c")),
            &DefaultClassifier,
        )
        .await
        .expect_err("always 503");
    assert!(
        matches!(
            err,
            HttpError::Transient {
                attempts: 4,
                class: "503",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 4);
    assert!(matches!(
        ConnectorError::from(err),
        ConnectorError::Transient { .. }
    ));
}

#[tokio::test]
async fn non_idempotent_post_is_retried_after_a_throttle() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201))
        .mount(&server)
        .await;
    let c = client(fast_cfg("t"));
    let req =
        ApiRequest::post("POST c", url(&server, "/c")).json(serde_json::json!([{"name": "A"}]));
    assert!(!req.idempotent);
    let resp = c
        .send(req, &DefaultClassifier)
        .await
        .expect("retried after 429");
    assert_eq!(resp.status, 201);
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn non_idempotent_post_is_not_retried_after_a_server_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(502))
        .mount(&server)
        .await;
    let c = client(fast_cfg("t"));
    let err = c
        .send(
            ApiRequest::post("POST c", url(&server, "/c")),
            &DefaultClassifier,
        )
        .await
        .expect_err("502");
    assert!(
        matches!(err, HttpError::Transient { attempts: 1, .. }),
        "{err:?}"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn unauthorized_refreshes_once_then_succeeds() {
    let server = MockServer::start().await;
    Mock::given(header("authorization", "Bearer t1"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    Mock::given(header("authorization", "Bearer t2"))
        .respond_with(ok_json())
        .mount(&server)
        .await;
    let auth = bearer("t");
    let c = client(fast_cfg("t"));
    let resp = c
        .send(
            ApiRequest::get("GET c", url(&server, "/c")).auth(auth.clone()),
            &DefaultClassifier,
        )
        .await
        .expect("succeeds with the refreshed token");
    assert_eq!(resp.json.unwrap()["id"], 42);
    assert_eq!(auth.source().refreshes.load(Ordering::SeqCst), 1);
    assert_eq!(c.metrics().reauths, 1);
}

#[tokio::test]
async fn unauthorized_after_refresh_is_an_auth_error() {
    let server = MockServer::start().await;
    Mock::given(path("/c"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    let auth = bearer("t");
    let c = client(fast_cfg("t"));
    let err = c
        .send(
            ApiRequest::get("GET c", url(&server, "/c")).auth(auth.clone()),
            &DefaultClassifier,
        )
        .await
        .expect_err("always 401");
    assert!(matches!(err, HttpError::Auth { .. }), "{err:?}");
    // A token may expire between its refresh and its use: a second refresh, then give up.
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
    assert_eq!(auth.source().refreshes.load(Ordering::SeqCst), 2);
    assert!(matches!(
        ConnectorError::from(err),
        ConnectorError::Auth { .. }
    ));
}

#[tokio::test]
async fn concurrent_rejections_refresh_the_token_once() {
    let server = MockServer::start().await;
    Mock::given(header("authorization", "Bearer t1"))
        .respond_with(ResponseTemplate::new(401).set_delay(Duration::from_millis(30)))
        .mount(&server)
        .await;
    Mock::given(header("authorization", "Bearer t2"))
        .respond_with(ok_json())
        .mount(&server)
        .await;
    let auth = bearer("t");
    let c = client(fast_cfg("t"));
    let calls = (0..10).map(|_| {
        let c = c.clone();
        let req = ApiRequest::get("GET c", url(&server, "/c")).auth(auth.clone());
        async move { c.send(req, &DefaultClassifier).await }
    });
    let results = futures::future::join_all(calls).await;
    let failures: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        auth.source().refreshes.load(Ordering::SeqCst),
        1,
        "10 concurrent 401s must cause exactly one refresh"
    );
    assert_eq!(auth.source().fetches.load(Ordering::SeqCst), 2);
}

/// Reads 403 as an amoCRM-style ban.
struct BanClassifier;

impl Classifier for BanClassifier {
    fn classify(&self, resp: &ApiResponse) -> Outcome {
        if resp.status == 403 {
            Outcome::Suspend {
                until: Utc::now() + chrono::Duration::hours(1),
                class: "ban",
                detail: "HTML 403 from nginx".into(),
            }
        } else {
            DefaultClassifier.classify(resp)
        }
    }
}

#[tokio::test]
async fn suspend_opens_the_circuit_and_later_calls_fail_fast() {
    let server = MockServer::start().await;
    Mock::given(path("/c"))
        .respond_with(
            ResponseTemplate::new(403).set_body_raw("<html>403 Forbidden</html>", "text/html"),
        )
        .mount(&server)
        .await;
    let c = client(fast_cfg("amocrm"));
    let first = c
        .send(ApiRequest::get("GET c", url(&server, "/c")), &BanClassifier)
        .await
        .expect_err("banned");
    assert!(
        matches!(first, HttpError::Suspended { class: "ban", .. }),
        "{first:?}"
    );
    for _ in 0..3 {
        let again = c
            .send(ApiRequest::get("GET c", url(&server, "/c")), &BanClassifier)
            .await
            .expect_err("circuit open");
        assert!(matches!(again, HttpError::Suspended { .. }), "{again:?}");
    }
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        1,
        "calls after the ban reached the server"
    );
    let until = c.suspended_until().expect("circuit open");
    assert!(until > Utc::now() + chrono::Duration::minutes(59));
    let m = c.metrics();
    assert_eq!(m.suspensions, 1, "{m:?}");
    assert_eq!(m.suspended_until, Some(until));
    assert!(matches!(
        ConnectorError::from(first),
        ConnectorError::Suspended { .. }
    ));
}

#[tokio::test]
async fn concurrency_cap_is_never_exceeded() {
    #[derive(Default)]
    struct InFlight {
        now: AtomicUsize,
        max: AtomicUsize,
    }
    let state = Arc::new(InFlight::default());
    let app = axum::Router::new()
        .route(
            "/c",
            axum::routing::get(
                |axum::extract::State(s): axum::extract::State<Arc<InFlight>>| async move {
                    let n = s.now.fetch_add(1, Ordering::SeqCst) + 1;
                    s.max.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    s.now.fetch_sub(1, Ordering::SeqCst);
                    "{}"
                },
            ),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let c = client(HttpConfig {
        max_concurrent: 3,
        ..fast_cfg("t")
    });
    let u = Url::parse(&format!("http://{addr}/c")).unwrap();
    let calls = (0..15).map(|_| {
        let c = c.clone();
        let req = ApiRequest::get("GET c", u.clone());
        async move { c.send(req, &DefaultClassifier).await }
    });
    for r in futures::future::join_all(calls).await {
        r.expect("call succeeds");
    }
    let max = state.max.load(Ordering::SeqCst);
    assert!(max <= 3, "{max} calls in flight with a cap of 3");
    assert_eq!(max, 3, "the cap should be reached under load (saw {max})");
}

/// Records when each request arrived.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<Instant>>>);

impl Respond for Arrivals {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.0.lock().unwrap().push(Instant::now());
        ResponseTemplate::new(200)
    }
}

#[tokio::test]
async fn rate_limiter_never_exceeds_a_rolling_window_and_keeps_ninety_percent() {
    // Scaled down from "50 per second": 50 per 500 ms (100/s), 300 calls ≈ 3 s.
    const CALLS: u32 = 50;
    const WINDOW: Duration = Duration::from_millis(500);
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(path("/c"))
        .respond_with(arrivals.clone())
        .mount(&server)
        .await;
    let c = client(HttpConfig {
        rate: RateLimit::PerWindow {
            calls: CALLS,
            window: WINDOW,
        },
        max_concurrent: 20,
        ..fast_cfg("t")
    });
    let calls = (0..300).map(|_| {
        let c = c.clone();
        let req = ApiRequest::get("GET c", url(&server, "/c"));
        async move { c.send(req, &DefaultClassifier).await }
    });
    for r in futures::future::join_all(calls).await {
        r.expect("call succeeds");
    }
    let mut t = arrivals.0.lock().unwrap().clone();
    t.sort();
    assert_eq!(t.len(), 300);
    let worst = (0..t.len())
        .map(|i| {
            t[i..]
                .iter()
                .take_while(|x| x.duration_since(t[i]) < WINDOW)
                .count()
        })
        .max()
        .unwrap();
    assert!(
        worst <= CALLS as usize,
        "{worst} calls arrived within one {WINDOW:?} window (limit {CALLS})"
    );
    let span = t[t.len() - 1].duration_since(t[0]).as_secs_f64();
    let rate = (t.len() - 1) as f64 / span;
    let allowed = CALLS as f64 / WINDOW.as_secs_f64();
    assert!(
        rate >= 0.9 * allowed,
        "achieved {rate:.1} calls/s, below 90% of the allowed {allowed}"
    );
    assert!(c.metrics().limiter_wait_ms > 0);
}

#[tokio::test]
async fn daily_budget_stops_calls_until_the_next_reset() {
    let server = MockServer::start().await;
    Mock::given(path("/c"))
        .respond_with(ok_json())
        .mount(&server)
        .await;
    let ledger = Arc::new(MemoryQuotaLedger::new());
    let c = HttpClient::new(
        HttpConfig {
            daily_budget: Some(3),
            quota_reset: QuotaReset::UsCentralMidnight,
            ..fast_cfg("marketo")
        },
        ledger.clone(),
    )
    .unwrap();
    for _ in 0..3 {
        c.send(
            ApiRequest::get("GET c", url(&server, "/c")),
            &DefaultClassifier,
        )
        .await
        .expect("within budget");
    }
    let err = c
        .send(
            ApiRequest::get("GET c", url(&server, "/c")),
            &DefaultClassifier,
        )
        .await
        .expect_err("budget spent");
    let expected = QuotaReset::UsCentralMidnight.next_reset(Utc::now());
    match err {
        HttpError::Suspended { until, class, .. } => {
            assert_eq!(class, "daily_budget");
            assert_eq!(until, expected);
        }
        other => panic!("expected Suspended, got {other:?}"),
    }
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
    let day = QuotaReset::UsCentralMidnight.day_key(Utc::now());
    assert_eq!(ledger.used(&day), 3);
    let m = c.metrics();
    assert_eq!(
        (m.quota_used_today, m.quota_left_today),
        (3, Some(0)),
        "{m:?}"
    );
}

#[tokio::test]
async fn secrets_are_redacted_in_errors_and_debug() {
    let server = MockServer::start().await;
    Mock::given(path("/oauth"))
        .respond_with(ResponseTemplate::new(400).set_body_raw(ECHO_SECRETS, "application/json"))
        .mount(&server)
        .await;
    let c = client(fast_cfg("t"));
    let req = ApiRequest::get("GET oauth", url(&server, "/oauth"))
        .query("client_id", "public-id")
        .query("client_secret", "cs_QUERY_SECRET")
        .header(
            HeaderName::from_static("x-api-key"),
            HeaderValue::from_static("KEY_HEADER_SECRET"),
        )
        .form(vec![("refresh_token".into(), "rt_FORM_SECRET".into())]);
    let shown = format!("{req:?} {}", req.redacted_url());
    for s in ["cs_QUERY_SECRET", "KEY_HEADER_SECRET", "rt_FORM_SECRET"] {
        assert!(!shown.contains(s), "{s} leaked: {shown}");
    }
    assert!(shown.contains("public-id"), "{shown}");
    let err = c.send(req, &DefaultClassifier).await.expect_err("400");
    let shown_err = format!("{err} {err:?}");
    let printed = format!("{shown_err} {}", ConnectorError::from(err));
    assert!(printed.contains("400"), "{printed}");
    for s in ["LEAKME", "QUERY_SECRET", "HEADER_SECRET", "FORM_SECRET"] {
        assert!(!printed.contains(s), "{s} leaked: {printed}");
    }
}

#[tokio::test]
async fn connection_errors_do_not_print_secret_urls() {
    // A port nobody listens on: bind, learn the port, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c = client(HttpConfig {
        max_retries: 1,
        ..fast_cfg("t")
    });
    let u = Url::parse(&format!(
        "http://127.0.0.1:{port}/token?access_token=at_URL_SECRET"
    ))
    .unwrap();
    let err = c
        .send(ApiRequest::post("POST token", u), &DefaultClassifier)
        .await
        .expect_err("nothing listens");
    assert!(
        matches!(
            err,
            HttpError::Connection {
                maybe_applied: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        !format!("{err} {err:?}").contains("at_URL_SECRET"),
        "{err:?}"
    );
    assert_eq!(
        c.metrics().retries,
        1,
        "a refused connect is safe to retry even for POST"
    );
}

#[tokio::test]
async fn slow_answers_time_out() {
    let server = MockServer::start().await;
    Mock::given(path("/c"))
        .respond_with(ok_json().set_delay(Duration::from_millis(600)))
        .mount(&server)
        .await;
    let c = client(HttpConfig {
        read_timeout: Duration::from_millis(100),
        max_retries: 1,
        ..fast_cfg("t")
    });
    let err = c
        .send(
            ApiRequest::get("GET c", url(&server, "/c")),
            &DefaultClassifier,
        )
        .await
        .expect_err("too slow");
    assert!(
        matches!(err, HttpError::Timeout { attempts: 2, .. }),
        "{err:?}"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn non_idempotent_post_is_not_retried_after_a_timeout() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(600)))
        .mount(&server)
        .await;
    let c = client(HttpConfig {
        write_timeout: Duration::from_millis(100),
        ..fast_cfg("t")
    });
    let err = c
        .send(
            ApiRequest::post("POST c", url(&server, "/c")).json(serde_json::json!({"name": "A"})),
            &DefaultClassifier,
        )
        .await
        .expect_err("too slow");
    assert!(
        matches!(
            err,
            HttpError::Timeout {
                attempts: 1,
                maybe_applied: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    assert!(matches!(
        ConnectorError::from(err),
        ConnectorError::Transient { .. }
    ));
}

#[tokio::test]
async fn other_client_errors_are_rejected_without_retry() {
    let server = MockServer::start().await;
    Mock::given(path("/c"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    let c = client(fast_cfg("t"));
    let err = c
        .send(
            ApiRequest::get("GET c", url(&server, "/c")),
            &DefaultClassifier,
        )
        .await
        .expect_err("404");
    assert!(
        matches!(err, HttpError::Rejected { class: "404", .. }),
        "{err:?}"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    assert_eq!(c.metrics().errors.get("404"), Some(&1));
}

#[test]
fn invalid_configs_are_refused() {
    let ledger: Arc<dyn QuotaLedger> = Arc::new(MemoryQuotaLedger::new());
    for cfg in [
        HttpConfig {
            max_concurrent: 0,
            ..HttpConfig::new("x")
        },
        HttpConfig {
            rate: RateLimit::PerSecond(0.0),
            ..HttpConfig::new("x")
        },
        HttpConfig {
            rate: RateLimit::PerWindow {
                calls: 0,
                window: Duration::from_secs(1),
            },
            ..HttpConfig::new("x")
        },
    ] {
        let r = HttpClient::new(cfg.clone(), ledger.clone());
        assert!(
            matches!(r, Err(HttpError::Config { .. })),
            "{cfg:?} accepted"
        );
    }
}

#[tokio::test]
async fn rejected_static_key_is_an_auth_error_without_a_second_call() {
    let server = MockServer::start().await;
    Mock::given(header("x-api-key", "rk_bad"))
        .respond_with(
            ResponseTemplate::new(401).set_body_raw(r#"{"error":"bad key"}"#, "application/json"),
        )
        .mount(&server)
        .await;
    let auth = Arc::new(
        StaticHeaderAuth::new(
            "rally",
            HeaderName::from_static("x-api-key"),
            &Secret::new("rk_bad"),
        )
        .unwrap(),
    );
    let c = client(fast_cfg("rally"));
    let err = c
        .send(
            ApiRequest::get("GET companies", url(&server, "/c")).auth(auth),
            &DefaultClassifier,
        )
        .await
        .expect_err("bad key");
    assert!(matches!(err, HttpError::Auth { .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("rk_bad"), "{err:?}");
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    // What a user reads: the connector, the call and the reason, each once.
    assert_eq!(
        ConnectorError::from(err).to_string(),
        "rally: authentication failed: GET companies: the x-api-key credential was rejected"
    );
}

/// A server answering the first `n` GETs with `first`, then `ok_json()`.
async fn server_failing_first(n: u64, first: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(first)
        .up_to_n_times(n)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ok_json())
        .mount(&server)
        .await;
    server
}

/// A client limited to 200 calls/s with a 5 % margin.
fn paced_client() -> HttpClient {
    client(HttpConfig {
        rate: RateLimit::PerSecond(200.0),
        rate_safety_margin: 0.05,
        ..fast_cfg("t")
    })
}

#[tokio::test]
async fn a_rate_rejection_past_the_limiter_widens_the_spacing_once_per_wave() {
    let server = server_failing_first(
        3,
        ResponseTemplate::new(429).insert_header("Retry-After", "0"),
    )
    .await;
    let c = paced_client();
    assert!((c.rate_margin() - 0.05).abs() < 1e-9, "{}", c.rate_margin());
    // Three calls rejected at once are one wave: one step.
    let calls = (0..3).map(|_| {
        let c = c.clone();
        let req = ApiRequest::get("GET c", url(&server, "/c"));
        async move { c.send(req, &DefaultClassifier).await }
    });
    for r in futures::future::join_all(calls).await {
        r.expect("retried after the 429");
    }
    let widened = c.rate_margin();
    assert!(
        (widened - (0.05 + PACING_STEP)).abs() < 1e-9,
        "margin after one wave of 429s: {widened}"
    );
    assert_eq!(c.metrics().rejections.get("429"), Some(&3));
}

#[tokio::test]
async fn widened_spacing_is_kept_by_later_calls_and_steps_back_after_a_quiet_period() {
    // 10 calls/s with no margin is 100 ms apart; one step (5 %) makes it 105 ms.
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(path("/busy"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "0"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(path("/c"))
        .respond_with(arrivals.clone())
        .mount(&server)
        .await;
    Mock::given(path("/busy"))
        .respond_with(ok_json())
        .mount(&server)
        .await;
    let recovery = Duration::from_millis(1500);
    let c = client(HttpConfig {
        rate: RateLimit::PerSecond(10.0),
        rate_safety_margin: 0.0,
        pacing_recovery: recovery,
        ..fast_cfg("t")
    });
    c.send(
        ApiRequest::get("GET busy", url(&server, "/busy")),
        &DefaultClassifier,
    )
    .await
    .expect("retried after the 429");
    let widened_at = Instant::now();
    assert!((c.rate_margin() - PACING_STEP).abs() < 1e-9);
    for _ in 0..10 {
        c.send(
            ApiRequest::get("GET c", url(&server, "/c")),
            &DefaultClassifier,
        )
        .await
        .expect("call succeeds");
    }
    let t = arrivals.0.lock().unwrap().clone();
    let span = t[t.len() - 1].duration_since(t[0]);
    // 9 intervals: 945 ms widened, 900 ms at the configured spacing.
    assert!(
        span >= Duration::from_millis(930),
        "10 calls spanned {span:?} after widening (expected about 945 ms, not 900 ms)"
    );
    // The quiet period is the behaviour under test: it has to pass on the clock.
    tokio::time::sleep((widened_at + recovery + Duration::from_millis(50)) - Instant::now()).await;
    c.send(
        ApiRequest::get("GET c", url(&server, "/c")),
        &DefaultClassifier,
    )
    .await
    .expect("call succeeds");
    assert!(
        c.rate_margin().abs() < 1e-9,
        "margin after a quiet period: {}",
        c.rate_margin()
    );
}

#[tokio::test]
async fn marketo_concurrency_rejections_do_not_widen_the_spacing() {
    struct Concurrency615;
    impl Classifier for Concurrency615 {
        fn classify(&self, resp: &ApiResponse) -> Outcome {
            if resp.status == 503 {
                Outcome::Throttled {
                    after: Some(Duration::ZERO),
                    class: "615",
                }
            } else {
                DefaultClassifier.classify(resp)
            }
        }
    }
    let server = server_failing_first(1, ResponseTemplate::new(503)).await;
    let c = paced_client();
    c.send(
        ApiRequest::get("GET c", url(&server, "/c")),
        &Concurrency615,
    )
    .await
    .expect("retried after the 615");
    assert!((c.rate_margin() - 0.05).abs() < 1e-9, "{}", c.rate_margin());
}

/// A quota ledger whose first write stalls, like a durable store write waiting for the
/// writer lock or a slow fsync.
struct StallingLedger {
    inner: MemoryQuotaLedger,
    writes: AtomicUsize,
    stall: Duration,
}

impl QuotaLedger for StallingLedger {
    fn used(&self, day: &str) -> u64 {
        self.inner.used(day)
    }
    fn add(&self, day: &str, n: u64) -> u64 {
        if self.writes.fetch_add(1, Ordering::SeqCst) == 0 {
            std::thread::sleep(self.stall);
        }
        self.inner.add(day, n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_quota_write_does_not_bunch_calls_admitted_by_the_limiter() {
    // 10 calls/s with no margin: calls 100 ms apart. The first call's quota write stalls
    // 250 ms; were it done after the limiter admitted the call, the second call (admitted
    // 100 ms later) would reach the server right behind the first.
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(path("/c"))
        .respond_with(arrivals.clone())
        .mount(&server)
        .await;
    let c = HttpClient::new(
        HttpConfig {
            rate: RateLimit::PerSecond(10.0),
            rate_safety_margin: 0.0,
            ..fast_cfg("t")
        },
        Arc::new(StallingLedger {
            inner: MemoryQuotaLedger::new(),
            writes: AtomicUsize::new(0),
            stall: Duration::from_millis(250),
        }),
    )
    .expect("valid config");
    let calls = (0..3).map(|_| {
        let c = c.clone();
        let req = ApiRequest::get("GET c", url(&server, "/c"));
        async move { c.send(req, &DefaultClassifier).await }
    });
    for r in futures::future::join_all(calls).await {
        r.expect("call succeeds");
    }
    let mut t = arrivals.0.lock().unwrap().clone();
    t.sort();
    let closest = t
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .min()
        .unwrap();
    assert!(
        closest >= Duration::from_millis(90),
        "two calls reached the server {closest:?} apart (spacing 100 ms)"
    );
}

/// Sends `Authorization: Bearer old` until switched, then `Bearer new`; counts applies.
struct SwitchableAuth {
    new: std::sync::atomic::AtomicBool,
    applied: tokio::sync::watch::Sender<usize>,
}

#[async_trait]
impl AuthProvider for SwitchableAuth {
    async fn apply(&self, headers: &mut reqwest::header::HeaderMap) -> Result<u64, HttpError> {
        let new = self.new.load(Ordering::SeqCst);
        let token = if new { "Bearer new" } else { "Bearer old" };
        headers.insert("authorization", HeaderValue::from_static(token));
        self.applied.send_modify(|n| *n += 1);
        Ok(u64::from(new))
    }
    async fn refresh(&self, _: u64) -> Result<(), HttpError> {
        Ok(())
    }
    async fn reapply(&self, headers: &mut reqwest::header::HeaderMap, applied: u64) -> u64 {
        if self.new.load(Ordering::SeqCst) && applied == 0 {
            headers.insert("authorization", HeaderValue::from_static("Bearer new"));
            return 1;
        }
        applied
    }
}

#[tokio::test]
async fn a_token_replaced_while_a_call_waits_for_the_limiter_is_the_one_sent() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ok_json())
        .mount(&server)
        .await;
    // 2 calls/s: after one call, the next waits about half a second for its turn.
    let c = client(HttpConfig {
        rate: RateLimit::PerSecond(2.0),
        rate_safety_margin: 0.0,
        ..fast_cfg("t")
    });
    let auth = Arc::new(SwitchableAuth {
        new: false.into(),
        applied: tokio::sync::watch::channel(0).0,
    });
    let get = || ApiRequest::get("GET c", url(&server, "/c")).auth(auth.clone());
    c.send(get(), &DefaultClassifier).await.expect("first call");
    let mut applied = auth.applied.subscribe();
    let waiting = {
        let (c, req) = (c.clone(), get());
        tokio::spawn(async move { c.send(req, &DefaultClassifier).await })
    };
    // The second call has taken the old token and waits for the limiter: replace it now.
    applied.wait_for(|n| *n >= 2).await.unwrap();
    auth.new.store(true, Ordering::SeqCst);
    waiting.await.unwrap().expect("second call");
    let sent: Vec<String> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| r.headers["authorization"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(sent, ["Bearer old", "Bearer new"]);
}

#[tokio::test]
async fn reapplying_a_bearer_token_picks_up_a_refresh_and_never_fetches() {
    let auth = bearer("t");
    let mut headers = reqwest::header::HeaderMap::new();
    let first = auth.apply(&mut headers).await.unwrap();
    assert_eq!(
        auth.reapply(&mut headers, first).await,
        first,
        "nothing replaced"
    );
    assert_eq!(headers["authorization"], "Bearer t1");
    auth.refresh(first).await.unwrap();
    let now = auth.reapply(&mut headers, first).await;
    assert_ne!(now, first);
    assert_eq!(headers["authorization"], "Bearer t2");
    assert_eq!(
        auth.source().fetches.load(Ordering::SeqCst),
        2,
        "one fetch, one refresh"
    );
}

/// Answers the n-th request with the n-th template (the last one from then on).
struct Sequence(Vec<ResponseTemplate>, AtomicUsize);

impl Respond for Sequence {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.1.fetch_add(1, Ordering::SeqCst);
        self.0[n.min(self.0.len() - 1)].clone()
    }
}

#[tokio::test]
async fn auth_rejections_separated_by_a_lost_answer_are_not_counted_as_in_a_row() {
    let server = MockServer::start().await;
    let lost = ResponseTemplate::new(200).set_delay(Duration::from_secs(2));
    let rejected = || ResponseTemplate::new(401);
    Mock::given(path("/c"))
        .respond_with(Sequence(
            vec![rejected(), lost, rejected(), rejected(), ok_json()],
            AtomicUsize::new(0),
        ))
        .mount(&server)
        .await;
    let auth = bearer("t");
    let c = client(HttpConfig {
        read_timeout: Duration::from_millis(300),
        ..fast_cfg("t")
    });
    let resp = c
        .send(
            ApiRequest::get("GET c", url(&server, "/c")).auth(auth.clone()),
            &DefaultClassifier,
        )
        .await
        .expect("the token expired around a lost answer, not bad credentials");
    assert_eq!(resp.status, 200);
    assert_eq!(auth.source().refreshes.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_answer_larger_than_the_limit_is_not_read() {
    // Announced by Content-Length.
    let server = MockServer::start().await;
    Mock::given(path("/c"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(vec![b' '; 4096], "application/json"))
        .mount(&server)
        .await;
    let c = client(HttpConfig {
        max_body_bytes: 1024,
        max_retries: 0,
        ..fast_cfg("t")
    });
    let err = c
        .send(
            ApiRequest::get("GET c", url(&server, "/c")),
            &DefaultClassifier,
        )
        .await
        .expect_err("too large");
    assert!(
        err.to_string().contains("answer larger than 1024 bytes"),
        "{err}"
    );

    // Streamed without a length, without end: the read stops at the limit.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = sock.read(&mut buf).await;
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                    Transfer-Encoding: chunked\r\n\r\n";
        if sock.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = format!("400\r\n{}\r\n", " ".repeat(0x400));
        while sock.write_all(chunk.as_bytes()).await.is_ok() {}
    });
    let err = c
        .send(
            ApiRequest::get("GET c", Url::parse(&format!("http://{addr}/c")).unwrap()),
            &DefaultClassifier,
        )
        .await
        .expect_err("endless");
    assert!(
        err.to_string().contains("answer larger than 1024 bytes"),
        "{err}"
    );
}
