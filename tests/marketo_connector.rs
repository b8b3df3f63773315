//! The Marketo connector against wiremock fixtures (`wiremock-fixtures/marketo/`): token
//! caching and refresh, Marketo's HTTP-200 error codes, per-record sync outcomes, batch
//! splitting, query paging and malformed rows. One behaviour per test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use crmbridge::config::{CommonConnectorConfig, Limits, Timeouts};
use crmbridge::connector::{Connector, ConnectorError, Cursor, PollMode, PushItem, PushOutcome};
use crmbridge::connectors::BuildContext;
use crmbridge::connectors::marketo::{MarketoConnector, MarketoOptions};
use crmbridge::daemon::metrics::Metrics;
use crmbridge::http::QuotaReset;
use crmbridge::secret::Secret;
use crmbridge::store::Store;
use serde_json::{Value, json};
use wiremock::matchers::{body_string_contains, header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!("../wiremock-fixtures/marketo/", $name))
    };
}

const TOKEN: &str = fixture!("token.json");
const TOKEN2: &str = fixture!("token2.json");
const TOKEN_SHORT: &str = fixture!("token_short.json");
const TOKEN_BAD: &str = fixture!("token_bad_credentials.json");
const DESCRIBE: &str = fixture!("describe.json");
const PAGE1: &str = fixture!("query_page1.json");
const PAGE2: &str = fixture!("query_page2.json");
const MALFORMED: &str = fixture!("query_malformed.json");
const SYNC_MIXED: &str = fixture!("sync_mixed.json");
const SYNC_DUP: &str = fixture!("sync_duplicate.json");
const E601: &str = fixture!("err_601.json");
const E602: &str = fixture!("err_602.json");
const E606: &str = fixture!("err_606.json");
const E607: &str = fixture!("err_607.json");
const E615: &str = fixture!("err_615.json");

const TOKEN_PATH: &str = "/identity/oauth/token";
const DESCRIBE_PATH: &str = "/rest/v1/companies/describe.json";
const COMPANIES_PATH: &str = "/rest/v1/companies.json";

fn json_resp(body: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body, "application/json;charset=UTF-8")
}

struct Conn {
    conn: MarketoConnector,
    _dir: tempfile::TempDir,
}

fn connector_with(server: &MockServer, daily_quota: Option<u64>, share: f64) -> Conn {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
    let ctx = BuildContext {
        store,
        metrics: Arc::new(Metrics::new()),
    };
    let common = CommonConnectorConfig {
        // The base URL as an admin copies it, with `/rest` and a trailing slash.
        base_url: url::Url::parse(&format!("{}/rest/", server.uri())).unwrap(),
        poll_interval: Duration::from_secs(1),
        batch_size: 300,
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(5),
            write: Duration::from_secs(5),
        },
        limits: Limits {
            requests_per_second: None,
            requests_per_window: Some((1000, Duration::from_secs(20))),
            max_concurrent: 10,
            daily_quota,
            daily_share: share,
        },
        enabled: true,
    };
    let opts = MarketoOptions {
        windows_per_poll: 1,
        wait_606: Duration::from_millis(300),
        wait_615: Duration::from_millis(50),
        ..MarketoOptions::default()
    };
    let conn = MarketoConnector::with_options(
        "marketo",
        &common,
        Secret::new("cid"),
        Secret::new("csecret"),
        &ctx,
        opts,
    )
    .unwrap();
    Conn { conn, _dir: dir }
}

fn connector(server: &MockServer) -> Conn {
    connector_with(server, None, 1.0)
}

async fn mount_token(server: &MockServer, body: &'static str) {
    Mock::given(method("GET"))
        .and(path(TOKEN_PATH))
        .respond_with(json_resp(body))
        .mount(server)
        .await;
}

async fn mount_describe(server: &MockServer) {
    Mock::given(method("GET"))
        .and(path(DESCRIBE_PATH))
        .respond_with(json_resp(DESCRIBE))
        .mount(server)
        .await;
}

/// A query answer (`POST companies.json?_method=GET`) with `body`.
fn query() -> wiremock::MockBuilder {
    Mock::given(method("GET"))
        .and(path(COMPANIES_PATH))
        .and(query_param("filterType", "id"))
}

/// A sync call (`POST companies.json` with JSON).
fn sync() -> wiremock::MockBuilder {
    Mock::given(method("POST"))
        .and(path(COMPANIES_PATH))
        .and(header("content-type", "application/json"))
}

async fn requests_to(server: &MockServer, p: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.url.path() == p)
        .collect()
}

fn item(n: usize, vendor_id: Option<&str>, fields: Value) -> PushItem {
    PushItem {
        canonical_id: format!("canon-{n}"),
        vendor_id: vendor_id.map(str::to_string),
        fields: fields.as_object().unwrap().clone(),
        prior_attempts: 0,
        unconfirmed_since: None,
    }
}

#[tokio::test]
async fn the_token_is_fetched_once_and_reused_across_calls() {
    let server = MockServer::start().await;
    mount_token(&server, TOKEN).await;
    mount_describe(&server).await;
    query().respond_with(json_resp(PAGE2)).mount(&server).await;
    let c = connector(&server);
    c.conn.start().await.unwrap();
    c.conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    c.conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    assert_eq!(requests_to(&server, TOKEN_PATH).await.len(), 1);
    let q = requests_to(&server, COMPANIES_PATH).await;
    assert!(
        q.iter()
            .all(|r| r.headers.get("authorization").unwrap() == "Bearer tok-1"),
        "every call carries the cached token"
    );
}

async fn refresh_after(code_body: &'static str) {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(TOKEN_PATH))
        .respond_with(json_resp(TOKEN))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    mount_token(&server, TOKEN2).await;
    Mock::given(method("GET"))
        .and(path(DESCRIBE_PATH))
        .and(header("authorization", "Bearer tok-1"))
        .respond_with(json_resp(code_body))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(DESCRIBE_PATH))
        .and(header("authorization", "Bearer tok-2"))
        .respond_with(json_resp(DESCRIBE))
        .mount(&server)
        .await;
    let c = connector(&server);
    c.conn
        .start()
        .await
        .expect("start succeeds after one refresh");
    assert_eq!(c.conn.token_fetches(), 2, "one refresh");
    assert_eq!(requests_to(&server, DESCRIBE_PATH).await.len(), 2);
}

#[tokio::test]
async fn a_601_invalid_token_refreshes_once_and_retries() {
    refresh_after(E601).await;
}

#[tokio::test]
async fn a_602_expired_token_refreshes_once_and_retries() {
    refresh_after(E602).await;
}

#[tokio::test]
async fn bad_client_credentials_are_an_auth_error() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(401).set_body_raw(TOKEN_BAD, "application/json"))
        .mount(&server)
        .await;
    let c = connector(&server);
    let err = c.conn.start().await.unwrap_err();
    assert!(matches!(err, ConnectorError::Auth { .. }), "{err:?}");
    assert!(!err.to_string().contains("csecret"), "no secret in {err}");
}

async fn throttled_then_ok(code_body: &'static str) -> Duration {
    let server = MockServer::start().await;
    mount_token(&server, TOKEN).await;
    mount_describe(&server).await;
    query()
        .respond_with(json_resp(code_body))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    query().respond_with(json_resp(PAGE2)).mount(&server).await;
    let c = connector(&server);
    c.conn.start().await.unwrap();
    let t = Instant::now();
    let page = c
        .conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .expect("the throttled query is retried");
    assert_eq!(page.records.len(), 1);
    assert_eq!(requests_to(&server, COMPANIES_PATH).await.len(), 2);
    t.elapsed()
}

#[tokio::test]
async fn a_606_rate_limit_is_retried_after_a_pause() {
    let took = throttled_then_ok(E606).await;
    assert!(took >= Duration::from_millis(300), "paused only {took:?}");
}

#[tokio::test]
async fn a_615_concurrency_limit_is_retried() {
    throttled_then_ok(E615).await;
}

#[tokio::test]
async fn a_5xx_on_a_query_is_retried() {
    let server = MockServer::start().await;
    mount_token(&server, TOKEN).await;
    mount_describe(&server).await;
    query()
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    query().respond_with(json_resp(PAGE2)).mount(&server).await;
    let c = connector(&server);
    let page = c
        .conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    assert_eq!(page.records[0].vendor_id, "103");
}

#[tokio::test]
async fn a_607_suspends_until_us_central_midnight_and_stops_calling() {
    let server = MockServer::start().await;
    mount_token(&server, TOKEN).await;
    mount_describe(&server).await;
    query().respond_with(json_resp(E607)).mount(&server).await;
    let c = connector(&server);
    c.conn.start().await.unwrap();
    let err = c
        .conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap_err();
    let ConnectorError::Suspended { until, detail, .. } = &err else {
        panic!("expected Suspended, got {err:?}");
    };
    assert_eq!(*until, QuotaReset::UsCentralMidnight.next_reset(Utc::now()));
    assert!(detail.contains("607"), "{detail}");
    let again = c.conn.push(&[item(1, None, json!({"company": "A"}))]).await;
    assert!(
        matches!(again, Err(ConnectorError::Suspended { .. })),
        "{again:?}"
    );
    assert_eq!(
        requests_to(&server, COMPANIES_PATH).await.len(),
        1,
        "no call after the 607"
    );
}

#[tokio::test]
async fn per_record_reasons_reject_only_their_records() {
    let server = MockServer::start().await;
    mount_token(&server, TOKEN).await;
    mount_describe(&server).await;
    sync()
        .respond_with(json_resp(SYNC_MIXED))
        .mount(&server)
        .await;
    let c = connector(&server);
    let items = [
        item(
            1,
            None,
            json!({"company": "New", "site": "dropped: not on this instance"}),
        ),
        item(
            2,
            None,
            json!({"company": "Bad", "numberOfEmployees": "many"}),
        ),
        item(
            3,
            None,
            json!({"externalCompanyId": "EXT-3", "company": "Old"}),
        ),
    ];
    let out = c.conn.push(&items).await.unwrap();
    assert_eq!(
        out[0],
        PushOutcome::Written {
            vendor_id: "2001".into(),
            created: true
        }
    );
    assert!(
        matches!(&out[1], PushOutcome::Rejected { reason } if reason.contains("1003") && reason.contains("numberOfEmployees")),
        "{:?}",
        out[1]
    );
    assert_eq!(
        out[2],
        PushOutcome::Written {
            vendor_id: "1500".into(),
            created: false
        }
    );
    let sent: Value = requests_to(&server, COMPANIES_PATH).await[0]
        .body_json()
        .unwrap();
    assert_eq!(sent["action"], "createOrUpdate");
    assert_eq!(sent["dedupeBy"], "dedupeFields");
    assert_eq!(
        sent["input"][0]["externalCompanyId"], "canon-1",
        "canonical id as key"
    );
    assert!(
        sent["input"][0].get("site").is_none(),
        "unknown field not sent"
    );
    assert_eq!(sent["input"][2]["externalCompanyId"], "EXT-3");
}

#[tokio::test]
async fn linked_items_update_by_id_without_external_company_id() {
    let server = MockServer::start().await;
    mount_token(&server, TOKEN).await;
    mount_describe(&server).await;
    sync()
        .respond_with(json_resp(
            r#"{"requestId":"x","success":true,"result":[{"seq":0,"status":"updated","id":1500}]}"#,
        ))
        .mount(&server)
        .await;
    let c = connector(&server);
    let out = c
        .conn
        .push(&[item(
            1,
            Some("1500"),
            json!({"externalCompanyId": "CHANGED", "industry": "Retail"}),
        )])
        .await
        .unwrap();
    assert!(matches!(&out[0], PushOutcome::Written { vendor_id, .. } if vendor_id == "1500"));
    let sent: Value = requests_to(&server, COMPANIES_PATH).await[0]
        .body_json()
        .unwrap();
    assert_eq!(sent["action"], "updateOnly");
    assert_eq!(sent["dedupeBy"], "idField");
    assert_eq!(sent["input"][0], json!({"id": 1500, "industry": "Retail"}));
}

#[tokio::test]
async fn a_duplicate_key_in_the_batch_1036_is_retried_later() {
    let server = MockServer::start().await;
    mount_token(&server, TOKEN).await;
    mount_describe(&server).await;
    sync()
        .respond_with(json_resp(SYNC_DUP))
        .mount(&server)
        .await;
    let c = connector(&server);
    let items = [
        item(
            1,
            None,
            json!({"externalCompanyId": "EXT-9", "company": "A"}),
        ),
        item(
            2,
            None,
            json!({"externalCompanyId": "EXT-9", "company": "B"}),
        ),
    ];
    let out = c.conn.push(&items).await.unwrap();
    assert!(matches!(out[0], PushOutcome::Written { .. }));
    assert!(
        matches!(&out[1], PushOutcome::Retry { reason } if reason.contains("1036")),
        "{:?}",
        out[1]
    );
}

/// Answers 413 to sync batches of more than two records; else creates each record.
struct TooLargeAboveTwo;

impl Respond for TooLargeAboveTwo {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let body: Value = req.body_json().unwrap();
        let input = body["input"].as_array().unwrap();
        if input.len() > 2 {
            return ResponseTemplate::new(413).set_body_string("<html>413</html>");
        }
        let result: Vec<Value> = input
            .iter()
            .enumerate()
            .map(|(i, rec)| {
                let n: i64 = rec["externalCompanyId"].as_str().unwrap()[6..]
                    .parse()
                    .unwrap();
                json!({"seq": i, "status": "created", "id": 3000 + n})
            })
            .collect();
        json_resp(&json!({"requestId": "r", "success": true, "result": result}).to_string())
    }
}

#[tokio::test]
async fn a_413_splits_the_batch_in_halves() {
    let server = MockServer::start().await;
    mount_token(&server, TOKEN).await;
    mount_describe(&server).await;
    sync().respond_with(TooLargeAboveTwo).mount(&server).await;
    let c = connector(&server);
    let items: Vec<PushItem> = (0..4)
        .map(|n| item(n, None, json!({"company": "X"})))
        .collect();
    let out = c.conn.push(&items).await.unwrap();
    let ids: Vec<String> = out
        .iter()
        .map(|o| match o {
            PushOutcome::Written { vendor_id, .. } => vendor_id.clone(),
            other => panic!("not written: {other:?}"),
        })
        .collect();
    assert_eq!(
        ids,
        ["3000", "3001", "3002", "3003"],
        "outcomes stay in item order"
    );
    assert_eq!(
        requests_to(&server, COMPANIES_PATH).await.len(),
        3,
        "one 413, two halves"
    );
}

#[tokio::test]
async fn query_pages_follow_next_page_token() {
    let server = MockServer::start().await;
    mount_token(&server, TOKEN).await;
    mount_describe(&server).await;
    query()
        .and(query_param("nextPageToken", "GIYDAMJQGAYDA==="))
        .respond_with(json_resp(PAGE2))
        .mount(&server)
        .await;
    query().respond_with(json_resp(PAGE1)).mount(&server).await;
    let c = connector(&server);
    let page = c
        .conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    let ids: Vec<&str> = page.records.iter().map(|r| r.vendor_id.as_str()).collect();
    assert_eq!(ids, ["101", "102", "103"]);
    assert!(page.more, "the scan continues with the next id window");
    let rev = &page.records[0].fields["annualRevenue"];
    assert_eq!(rev.to_string(), "12500000.75", "decimals kept exact");
    let q = requests_to(&server, COMPANIES_PATH).await;
    assert_eq!(q[0].method.as_str(), "GET");
    let query = q[0].url.query().unwrap_or_default().to_string();
    assert!(
        query.contains("fields=id%2CexternalCompanyId%2Ccompany%2Cwebsite"),
        "{query}"
    );
    assert!(
        !query.contains("billingStreet"),
        "fields absent from describe are not asked for: {query}"
    );
    assert!(query.contains("filterValues=1%2C2%2C3"), "{query}");
}

#[tokio::test]
async fn an_instance_refusing_long_query_urls_is_queried_by_post_from_then_on() {
    let server = MockServer::start().await;
    mount_token(&server, TOKEN).await;
    mount_describe(&server).await;
    Mock::given(method("GET"))
        .and(path(COMPANIES_PATH))
        .respond_with(ResponseTemplate::new(414))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(COMPANIES_PATH))
        .and(query_param("_method", "GET"))
        .and(body_string_contains("filterType=id"))
        .respond_with(json_resp(PAGE2))
        .expect(2)
        .mount(&server)
        .await;
    let c = connector(&server);
    let first = c
        .conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    assert!(!first.records.is_empty(), "read after the 414");
    c.conn
        .poll(&first.next, &PollMode::Incremental)
        .await
        .unwrap();
}

#[tokio::test]
async fn malformed_rows_go_to_page_malformed() {
    let server = MockServer::start().await;
    mount_token(&server, TOKEN).await;
    mount_describe(&server).await;
    query()
        .respond_with(json_resp(MALFORMED))
        .mount(&server)
        .await;
    let c = connector(&server);
    let page = c
        .conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.records[0].vendor_id, "106");
    assert_eq!(page.malformed.len(), 2, "{:?}", page.malformed);
    assert_eq!(page.malformed[1].vendor_id.as_deref(), Some("105"));
}

#[tokio::test]
async fn identity_calls_do_not_count_against_the_daily_budget() {
    let server = MockServer::start().await;
    // A token with 30 s left (refresh-ahead is 60 s): asked for once, then used until
    // it expires, since Marketo hands out the same one until then.
    mount_token(&server, TOKEN_SHORT).await;
    mount_describe(&server).await;
    query().respond_with(json_resp(PAGE2)).mount(&server).await;
    // A budget of exactly three REST calls.
    let c = connector_with(&server, Some(3), 1.0);
    c.conn.start().await.unwrap();
    c.conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    c.conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    assert_eq!(requests_to(&server, TOKEN_PATH).await.len(), 1);
    // Three REST calls (describe, two queries) and the identity call: only those three
    // count.
    assert_eq!(c.conn.http_metrics().quota_used_today, 3);
    let fourth = c.conn.poll(&Cursor::start(), &PollMode::Incremental).await;
    assert!(
        matches!(fourth, Err(ConnectorError::Suspended { .. })),
        "{fourth:?}"
    );
}

#[tokio::test]
async fn a_query_answered_object_not_found_is_an_empty_window() {
    // Some instances answer a query that matches nothing with 1013 instead of an empty
    // `result`: the scan goes on (here: an empty instance, so discovery and probes end it).
    let server = MockServer::start().await;
    mount_token(&server, TOKEN).await;
    mount_describe(&server).await;
    query()
        .respond_with(json_resp(
            r#"{"requestId":"x","success":false,"errors":[{"code":"1013","message":"Object not found"}]}"#,
        ))
        .mount(&server)
        .await;
    let c = connector(&server);
    let mut cursor = Cursor::start();
    let mut polls = 0;
    loop {
        let page = c
            .conn
            .poll(&cursor, &PollMode::Incremental)
            .await
            .expect("1013 is not an error of the scan");
        assert!(page.records.is_empty() && page.malformed.is_empty());
        cursor = page.next;
        polls += 1;
        if !page.more {
            break;
        }
        assert!(polls < 100, "the scan never ends");
    }
    assert_eq!(requests_to(&server, COMPANIES_PATH).await.len(), 40 + 16);
}
