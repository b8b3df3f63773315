//! The amoCRM connector against recorded-style answers (wiremock, fixtures under
//! `wiremock-fixtures/amocrm/`): one test per error class and paging edge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crmbridge::config::{
    AmoAuth, AmocrmConfig, CommonConnectorConfig, Limits, SecretRef, Timeouts,
};
use crmbridge::connector::{Connector, ConnectorError, Cursor, PollMode, PushItem, PushOutcome};
use crmbridge::connectors::BuildContext;
use crmbridge::connectors::amocrm::AmocrmConnector;
use crmbridge::connectors::amocrm::poll::AmoCursor;
use crmbridge::daemon::metrics::Metrics;
use crmbridge::mapping::MappingRules;
use crmbridge::store::Store;
use serde_json::{Value, json};
use tempfile::TempDir;
use wiremock::matchers::{body_string_contains, method, path, query_param};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

fn fixture(name: &str) -> String {
    let p = format!(
        "{}/wiremock-fixtures/amocrm/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("fixture {p}: {e}"))
}

fn hal(name: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(fixture(name), "application/hal+json")
}

fn problem(status: u16, name: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(fixture(name), "application/problem+json")
}

fn html(status: u16, name: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(fixture(name), "text/html")
}

struct Rig {
    server: MockServer,
    conn: AmocrmConnector,
    store: Arc<Store>,
    _dir: TempDir,
}

fn secret(dir: &TempDir, name: &str, value: &str) -> SecretRef {
    let p = dir.path().join(name);
    std::fs::write(&p, value).unwrap();
    SecretRef::File(p)
}

/// A connector against a fresh mock server; `account` is the account fixture mounted
/// (with the custom field catalogue) unless `None`.
async fn rig_with(oauth: bool, account: Option<&str>, write_timeout: Duration) -> Rig {
    let server = MockServer::start().await;
    if let Some(account) = account {
        Mock::given(method("GET"))
            .and(path("/api/v4/account"))
            .respond_with(hal(account))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/api/v4/companies/custom_fields"))
            .and(query_param("page", "1"))
            .respond_with(hal("custom_fields.json"))
            .mount(&server)
            .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let auth = if oauth {
        AmoAuth::OAuth {
            client_id: secret(&dir, "id", "client-id"),
            client_secret: secret(&dir, "secret", "client-secret"),
            redirect_uri: "https://bridge.example.com/oauth".into(),
            refresh_token: secret(&dir, "refresh", "refresh-zero"),
        }
    } else {
        AmoAuth::LongLived {
            token: secret(&dir, "token", "long-lived-token"),
        }
    };
    let cfg = AmocrmConfig {
        common: CommonConnectorConfig {
            base_url: url::Url::parse(&format!("{}/", server.uri())).unwrap(),
            poll_interval: Duration::from_secs(60),
            batch_size: 50,
            timeouts: Timeouts {
                connect: Duration::from_secs(1),
                read: Duration::from_secs(5),
                write: write_timeout,
            },
            limits: Limits {
                requests_per_second: None,
                requests_per_window: None,
                max_concurrent: 4,
                daily_quota: None,
                daily_share: 1.0,
            },
            enabled: true,
        },
        auth,
        mapping: MappingRules::default(),
    };
    let store = Arc::new(Store::open(&dir.path().join("store.redb")).unwrap());
    let ctx = BuildContext {
        store: store.clone(),
        metrics: Arc::new(Metrics::new()),
    };
    let conn = AmocrmConnector::new("amo", &cfg, &ctx).unwrap();
    Rig {
        server,
        conn,
        store,
        _dir: dir,
    }
}

async fn rig() -> Rig {
    let r = rig_with(
        false,
        Some("account_filter_on.json"),
        Duration::from_secs(5),
    )
    .await;
    r.conn.start().await.unwrap();
    r
}

async fn requests_to(server: &MockServer, m: &str, p: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.method.as_str() == m && r.url.path() == p)
        .collect()
}

fn query(r: &Request, key: &str) -> Option<String> {
    r.url
        .query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn cursor_at(ts: i64, ids: &[i64]) -> Cursor {
    AmoCursor {
        ts,
        ids: ids.iter().copied().collect(),
        ..AmoCursor::default()
    }
    .to_cursor()
}

fn item(fields: Value, vendor_id: Option<&str>, prior_attempts: u32) -> PushItem {
    PushItem {
        canonical_id: "c-1".into(),
        vendor_id: vendor_id.map(str::to_string),
        fields: fields.as_object().cloned().unwrap(),
        prior_attempts,
        unconfirmed_since: (prior_attempts > 0)
            .then(|| chrono::Utc::now() - chrono::Duration::minutes(5)),
    }
}

#[tokio::test]
async fn a_204_ends_the_cycle_and_moves_the_cursor_to_the_upper_bound() {
    let r = rig().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&r.server)
        .await;
    let page = r
        .conn
        .poll(&cursor_at(1_700_000_000, &[]), &PollMode::Incremental)
        .await
        .unwrap();
    assert!(!page.more && page.records.is_empty(), "{page:?}");
    let next: AmoCursor = serde_json::from_value(page.next.0).unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!(
        next.ts >= now - 1 && next.ts <= now + 1 && next.upper.is_none(),
        "{next:?}"
    );
}

#[tokio::test]
async fn keyset_paging_drops_records_already_returned_at_the_cursor_second() {
    let r = rig().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        // One second before the cursor: this server has not yet shown that it lists
        // `from` itself (inclusively).
        .and(query_param("filter[updated_at][from]", "1700000099"))
        .and(query_param("order[updated_at]", "asc"))
        .and(query_param("page", "1"))
        .respond_with(hal("companies_keyset.json"))
        .mount(&r.server)
        .await;
    let page = r
        .conn
        .poll(&cursor_at(1_700_000_100, &[7001]), &PollMode::Incremental)
        .await
        .unwrap();
    let ids: Vec<&str> = page.records.iter().map(|r| r.vendor_id.as_str()).collect();
    assert_eq!(ids, ["7002", "7003"]);
    let rec = &page.records[0];
    assert_eq!(rec.fields["cf.name.Annual revenue"], json!("1234567.50"));
    assert_eq!(rec.fields["cf.code.PHONE"], json!("+1 415 555 0100"));
    assert_eq!(
        rec.fields["cf.id.452001"],
        Value::Null,
        "absent field must read as null"
    );
    assert_eq!(rec.fields["tags"], json!(["vip"]));
    let sent = requests_to(&r.server, "GET", "/api/v4/companies").await;
    let to: i64 = query(&sent[0], "filter[updated_at][to]")
        .unwrap()
        .parse()
        .unwrap();
    // One past the cycle's upper bound (for a server reading `to` as exclusive), which
    // is a second that is over.
    assert!(
        to <= chrono::Utc::now().timestamp(),
        "upper bound {} is not in the past",
        to - 1
    );
}

#[tokio::test]
async fn a_full_page_inside_one_second_is_paged_exactly_without_stalling() {
    let r = rig().await;
    let template: Value = serde_json::from_str(&fixture("company_template.json")).unwrap();
    let page_of = |ids: std::ops::Range<i64>| {
        let list: Vec<Value> = ids
            .map(|id| {
                let mut c = template.clone();
                c["id"] = json!(id);
                c
            })
            .collect();
        ResponseTemplate::new(200).set_body_json(json!({"_page": 1,
            "_links": {"self": {"href": "x"}, "next": {"href": "y"}},
            "_embedded": {"companies": list}}))
    };
    // 300 records share second 1700000200: the keyset page is full with them. `from` is
    // one second early (this server never shows that it lists `from` itself).
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("filter[updated_at][from]", "1700000199"))
        .and(query_param("filter[updated_at][to]", "1700000201"))
        .and(query_param("page", "2"))
        .respond_with(page_of(1_250..1_300))
        .mount(&r.server)
        .await;
    // This server links every page onwards, the last one too: past it, it answers 204.
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("filter[updated_at][from]", "1700000199"))
        .and(query_param("page", "3"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&r.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("filter[updated_at][from]", "1700000199"))
        .and(query_param("page", "1"))
        .respond_with(page_of(1_000..1_250))
        .mount(&r.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("filter[updated_at][from]", "1700000200"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&r.server)
        .await;
    let mut cursor = cursor_at(1_700_000_200, &[]);
    let mut got = std::collections::BTreeMap::<String, usize>::new();
    let mut calls = 0;
    loop {
        let page = r.conn.poll(&cursor, &PollMode::Incremental).await.unwrap();
        for rec in page.records {
            *got.entry(rec.vendor_id).or_default() += 1;
        }
        cursor = page.next;
        calls += 1;
        assert!(calls < 20, "stalled: {cursor:?}");
        if !page.more {
            break;
        }
    }
    assert_eq!(got.len(), 300, "skipped some");
    assert!(got.values().all(|n| *n == 1), "repeated some");
}

#[tokio::test]
async fn a_next_link_to_a_204_page_is_the_end_of_the_fallback_scan() {
    let r = rig_with(
        false,
        Some("account_filter_off.json"),
        Duration::from_secs(5),
    )
    .await;
    r.conn.start().await.unwrap();
    let template: Value = serde_json::from_str(&fixture("company_template.json")).unwrap();
    let list: Vec<Value> = (0..250)
        .map(|i| {
            let mut c = template.clone();
            c["id"] = json!(2_000 + i);
            c["updated_at"] = json!(1_700_000_500 - i);
            c
        })
        .collect();
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("order[updated_at]", "desc"))
        .and(query_param("page", "1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"_page": 1,
            "_links": {"next": {"href": format!("{}/api/v4/companies?page=2", r.server.uri())}},
            "_embedded": {"companies": list}})))
        .expect(1)
        .mount(&r.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("page", "2"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&r.server)
        .await;
    let first = r
        .conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    assert!(
        first.more && first.records.len() == 250,
        "{}",
        first.records.len()
    );
    let second = r
        .conn
        .poll(&first.next, &PollMode::Incremental)
        .await
        .unwrap();
    assert!(!second.more && second.records.is_empty());
    let sent = requests_to(&r.server, "GET", "/api/v4/companies").await;
    assert!(
        sent.iter()
            .all(|q| query(q, "filter[updated_at][from]").is_none())
    );
}

/// Serves the descending (no-filter) scan from `companies_keyset.json` and polls once
/// from a cursor inside it.
async fn poll_by_descending_scan(r: &Rig) -> crmbridge::connector::Page {
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("order[updated_at]", "desc"))
        .respond_with(hal("companies_keyset.json"))
        .mount(&r.server)
        .await;
    r.conn
        .poll(&cursor_at(1_700_000_101, &[]), &PollMode::Incremental)
        .await
        .unwrap()
}

#[tokio::test]
async fn without_filtering_the_scan_stops_at_records_older_than_the_cursor() {
    let r = rig_with(
        false,
        Some("account_filter_off.json"),
        Duration::from_secs(5),
    )
    .await;
    r.conn.start().await.unwrap();
    let page = poll_by_descending_scan(&r).await;
    let ids: Vec<&str> = page.records.iter().map(|r| r.vendor_id.as_str()).collect();
    assert_eq!(ids, ["7003"]);
    assert!(!page.more);
}

#[tokio::test]
async fn malformed_records_go_to_page_malformed_and_the_page_goes_on() {
    let r = rig().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .respond_with(hal("companies_malformed.json"))
        .mount(&r.server)
        .await;
    let page = r
        .conn
        .poll(&cursor_at(1_700_000_000, &[]), &PollMode::Incremental)
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1, "{:?}", page.records);
    assert_eq!(page.malformed.len(), 2, "{:?}", page.malformed);
    assert_eq!(page.malformed[1].vendor_id.as_deref(), Some("7005"));
}

#[tokio::test]
async fn an_html_429_without_retry_after_is_backed_off_and_retried() {
    let r = rig().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .respond_with(html(429, "too_many.html"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&r.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&r.server)
        .await;
    let started = Instant::now();
    r.conn
        .poll(&cursor_at(1_700_000_000, &[]), &PollMode::Incremental)
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        requests_to(&r.server, "GET", "/api/v4/companies")
            .await
            .len(),
        2
    );
}

/// Polls through one `first` answer followed by a good page: the poll retries and reads
/// the page.
async fn poll_retries_after(first: ResponseTemplate) {
    let r = rig().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .respond_with(first)
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&r.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .respond_with(hal("companies_keyset.json"))
        .mount(&r.server)
        .await;
    let page = r
        .conn
        .poll(&cursor_at(1_700_000_000, &[]), &PollMode::Incremental)
        .await
        .unwrap();
    assert_eq!(page.records.len(), 3);
}

#[tokio::test]
async fn a_json_429_is_retried() {
    poll_retries_after(problem(429, "too_many.json")).await;
}

#[tokio::test]
async fn a_5xx_is_retried() {
    poll_retries_after(html(503, "unavailable_503.html")).await;
}

#[tokio::test]
async fn an_html_403_ban_suspends_without_any_retry() {
    let r = rig().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .respond_with(html(403, "ban_403.html"))
        .mount(&r.server)
        .await;
    let cursor = cursor_at(1_700_000_000, &[]);
    for _ in 0..3 {
        let err = r
            .conn
            .poll(&cursor, &PollMode::Incremental)
            .await
            .unwrap_err();
        let ConnectorError::Suspended { until, .. } = err else {
            panic!("expected Suspended, got {err:?}");
        };
        assert!(
            until > chrono::Utc::now() + chrono::Duration::minutes(20),
            "{until}"
        );
    }
    // One call reached the server; the open circuit kept the others home.
    assert_eq!(
        requests_to(&r.server, "GET", "/api/v4/companies")
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn a_permission_403_is_fatal_not_a_ban() {
    let r = rig().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .respond_with(problem(403, "forbidden_permission.json"))
        .mount(&r.server)
        .await;
    let err = r
        .conn
        .poll(&cursor_at(1_700_000_000, &[]), &PollMode::Incremental)
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Fatal { .. }), "{err:?}");
    assert!(r.conn.http().suspended_until().is_none());
}

/// Answers API calls: 401 for the first access token, 200 for the second — and records
/// whether the store already held the new refresh token when the new access token
/// arrived (persisted before use).
struct ApiWithExpiringToken {
    store: Arc<Store>,
    persisted_before_use: Arc<AtomicBool>,
    body: String,
}

impl Respond for ApiWithExpiringToken {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let auth = req
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if auth == "Bearer access-two" {
            let stored = self
                .store
                .begin_read()
                .unwrap()
                .token("amo")
                .unwrap()
                .and_then(|t| t.refresh_token);
            if stored.as_deref() == Some("refresh-two") {
                self.persisted_before_use.store(true, Ordering::SeqCst);
            }
            ResponseTemplate::new(200).set_body_raw(self.body.clone(), "application/hal+json")
        } else {
            problem(401, "unauthorized.json")
        }
    }
}

#[tokio::test]
async fn a_401_refreshes_once_and_persists_the_rotated_token_before_using_it() {
    let r = rig_with(true, None, Duration::from_secs(5)).await;
    let seen_refresh = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = seen_refresh.clone();
    Mock::given(method("POST"))
        .and(path("/oauth2/access_token"))
        .respond_with(move |req: &Request| {
            let body: Value = serde_json::from_slice(&req.body).unwrap();
            let used = body["refresh_token"].as_str().unwrap_or("").to_string();
            log.lock().unwrap().push(used.clone());
            match used.as_str() {
                "refresh-zero" => hal("token_first.json"),
                "refresh-one" => hal("token_second.json"),
                _ => problem(401, "token_revoked.json"),
            }
        })
        .mount(&r.server)
        .await;
    let persisted = Arc::new(AtomicBool::new(false));
    Mock::given(method("GET"))
        .and(path("/api/v4/account"))
        .respond_with(ApiWithExpiringToken {
            store: r.store.clone(),
            persisted_before_use: persisted.clone(),
            body: fixture("account_filter_on.json"),
        })
        .mount(&r.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies/custom_fields"))
        .respond_with(hal("custom_fields.json"))
        .mount(&r.server)
        .await;
    r.conn.start().await.unwrap();
    assert_eq!(
        *seen_refresh.lock().unwrap(),
        ["refresh-zero", "refresh-one"]
    );
    assert!(
        persisted.load(Ordering::SeqCst),
        "new token used before it was stored"
    );
    let tok = r.store.begin_read().unwrap().token("amo").unwrap().unwrap();
    assert_eq!(tok.refresh_token.as_deref(), Some("refresh-two"));
    assert!(
        !format!("{tok:?}").contains("refresh-two"),
        "Debug leaks the token"
    );
}

#[tokio::test]
async fn a_revoked_refresh_token_is_an_auth_error_asking_for_reauthorisation() {
    let r = rig_with(true, None, Duration::from_secs(5)).await;
    Mock::given(method("POST"))
        .and(path("/oauth2/access_token"))
        .respond_with(problem(401, "token_revoked.json"))
        .expect(1)
        .mount(&r.server)
        .await;
    let err = r.conn.start().await.unwrap_err();
    let ConnectorError::Auth { detail, .. } = &err else {
        panic!("expected Auth, got {err:?}");
    };
    assert!(
        detail.contains("re-authorise") && detail.contains("revoked"),
        "{detail}"
    );
    assert!(
        !detail.contains("refresh-zero"),
        "the token leaked: {detail}"
    );
}

#[tokio::test]
async fn validation_errors_reject_the_named_item_and_the_rest_is_resent_and_written() {
    let r = rig().await;
    Mock::given(method("POST"))
        .and(path("/api/v4/companies"))
        .respond_with(problem(400, "validation_errors.json"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&r.server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v4/companies"))
        .respond_with(hal("created.json"))
        .mount(&r.server)
        .await;
    let items = [
        item(json!({"name": "Good One"}), None, 0),
        item(json!({"name": "Bad", "cf.name.Annual revenue": 5}), None, 0),
        item(
            json!({"name": "Good Two", "cf.code.PHONE@MOB": "+1"}),
            None,
            0,
        ),
    ];
    let out = r.conn.push(&items).await.unwrap();
    assert_eq!(out[0], written("8100", true));
    assert!(
        matches!(&out[1], PushOutcome::Rejected { reason } if reason.contains("should be of type numeric")),
        "{:?}",
        out[1]
    );
    assert_eq!(out[2], written("8102", true));
    let posts = requests_to(&r.server, "POST", "/api/v4/companies").await;
    assert_eq!(posts.len(), 2);
    let resent: Value = serde_json::from_slice(&posts[1].body).unwrap();
    let names: Vec<&str> = resent
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Good One", "Good Two"]);
    assert_eq!(
        resent[1]["custom_fields_values"],
        json!([{"field_id": 301101, "values": [{"value": "+1", "enum_code": "MOB"}]}])
    );
}

#[tokio::test]
async fn a_create_retried_after_a_certain_failure_is_sent_without_a_look_up() {
    let r = rig().await;
    Mock::given(method("POST"))
        .and(path("/api/v4/companies"))
        .respond_with(hal("created.json"))
        .expect(1)
        .mount(&r.server)
        .await;
    // Tried twice before, both certainly not stored (e.g. throttled): nothing to find.
    let retried = PushItem {
        unconfirmed_since: None,
        ..item(
            json!({"name": "Acme", "cf.name.Domain": "acme.com"}),
            None,
            2,
        )
    };
    let out = r.conn.push(&[retried]).await.unwrap();
    assert!(
        matches!(&out[0], PushOutcome::Written { created: true, .. }),
        "{out:?}"
    );
    let gets = requests_to(&r.server, "GET", "/api/v4/companies").await;
    assert!(
        gets.is_empty(),
        "looked up: {:?}",
        gets.iter().map(|g| g.url.to_string()).collect::<Vec<_>>()
    );
}

/// Expects exactly one `method` (PATCH or POST) batch, answered with these
/// `(id, request_id)` pairs.
async fn expect_write(server: &MockServer, verb: &str, written: &[(i64, &str)]) {
    let rows: Vec<Value> = written
        .iter()
        .map(|(id, rid)| json!({"id": id, "request_id": rid}))
        .collect();
    Mock::given(method(verb))
        .and(path("/api/v4/companies"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"_embedded": {"companies": rows}})),
        )
        .expect(1)
        .mount(server)
        .await;
}

fn written(id: &str, created: bool) -> PushOutcome {
    PushOutcome::Written {
        vendor_id: id.into(),
        created,
    }
}

fn unconfirmed(domain: &str) -> PushItem {
    item(json!({"name": domain, "cf.name.Domain": domain}), None, 1)
}

#[tokio::test]
async fn replayed_creates_of_a_batch_are_resolved_by_one_scan_of_the_newest_companies() {
    let r = rig().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("order[created_at]", "desc"))
        .and(query_param("page", "1"))
        .respond_with(hal("newest_first.json"))
        .expect(1)
        .mount(&r.server)
        .await;
    expect_write(&r.server, "PATCH", &[(9003, "0"), (9002, "1")]).await;
    expect_write(&r.server, "POST", &[(9100, "2")]).await;
    let out = r
        .conn
        .push(&[
            unconfirmed("alpha.com"),
            unconfirmed("beta.com"),
            unconfirmed("gamma.com"),
        ])
        .await
        .unwrap();
    // The scan reached companies older than the sends: gamma.com was never created.
    assert_eq!(
        out,
        [
            written("9003", false),
            written("9002", false),
            written("9100", true)
        ]
    );
    let gets = requests_to(&r.server, "GET", "/api/v4/companies").await;
    assert_eq!(gets.len(), 1, "one scan, no search per company");
    let patch = &requests_to(&r.server, "PATCH", "/api/v4/companies").await[0];
    let body: Value = serde_json::from_slice(&patch.body).unwrap();
    let ids: Vec<i64> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [9003, 9002]);
    let post = &requests_to(&r.server, "POST", "/api/v4/companies").await[0];
    let body: Value = serde_json::from_slice(&post.body).unwrap();
    assert_eq!(
        body.as_array().unwrap().len(),
        1,
        "only gamma.com created: {body}"
    );
}

/// A company row of a list answer, created `ago` seconds before now.
fn listed_company(id: i64, name: &str, domain: &str, ago: i64) -> Value {
    let created = chrono::Utc::now().timestamp() - ago;
    json!({"id": id, "name": name, "created_at": created, "updated_at": created,
        "custom_fields_values": [{"field_id": 452001, "field_name": "Domain", "field_code": null,
            "field_type": "text", "values": [{"value": domain}]}]})
}

#[tokio::test]
async fn rows_repeated_by_creations_during_the_scan_do_not_make_it_inconclusive() {
    let r = rig().await;
    let page = |n: &str, rows: Vec<Value>, next: bool| {
        let mut links =
            json!({"self": {"href": format!("https://a.amocrm.com/api/v4/companies?page={n}")}});
        if next {
            links["next"] = json!({"href": "https://a.amocrm.com/api/v4/companies?page=2"});
        }
        ResponseTemplate::new(200)
            .set_body_json(json!({"_links": links, "_embedded": {"companies": rows}}))
    };
    let (c9, c8, c7) = (
        listed_company(9009, "Other 9", "o9.com", 10),
        listed_company(9008, "Other 8", "o8.com", 20),
        listed_company(9007, "Other 7", "o7.com", 30),
    );
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("page", "1"))
        .respond_with(page("1", vec![c9, c8.clone(), c7.clone()], true))
        .expect(1)
        .mount(&r.server)
        .await;
    // Two companies were created meanwhile: page 2 begins with the last two of page 1.
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("page", "2"))
        .respond_with(page(
            "2",
            vec![
                c8,
                c7,
                listed_company(9006, "Alpha", "alpha.com", 40),
                listed_company(7002, "Acme", "acme.com", 86_400),
            ],
            false,
        ))
        .expect(1)
        .mount(&r.server)
        .await;
    expect_write(&r.server, "PATCH", &[(9006, "0")]).await;
    expect_write(&r.server, "POST", &[(9100, "1")]).await;
    let out = r
        .conn
        .push(&[unconfirmed("alpha.com"), unconfirmed("beta.com")])
        .await
        .unwrap();
    assert_eq!(out, [written("9006", false), written("9100", true),]);
    assert_eq!(
        requests_to(&r.server, "GET", "/api/v4/companies")
            .await
            .len(),
        2,
        "no search per company"
    );
}

#[tokio::test]
async fn a_scan_not_listed_newest_first_falls_back_to_searching_each_company() {
    let r = rig().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("order[created_at]", "desc"))
        .respond_with(hal("oldest_first.json"))
        .expect(1)
        .mount(&r.server)
        .await;
    for d in ["alpha.com", "beta.com"] {
        Mock::given(method("GET"))
            .and(path("/api/v4/companies"))
            .and(query_param("query", d))
            .respond_with(ResponseTemplate::new(204))
            .expect(1)
            .mount(&r.server)
            .await;
    }
    expect_write(&r.server, "POST", &[(9100, "0"), (9101, "1")]).await;
    let out = r
        .conn
        .push(&[unconfirmed("alpha.com"), unconfirmed("beta.com")])
        .await
        .unwrap();
    assert!(
        out.iter()
            .all(|o| matches!(o, PushOutcome::Written { created: true, .. })),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_refused_scan_falls_back_to_searching_each_company() {
    let r = rig().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("order[created_at]", "desc"))
        .respond_with(problem(400, "bad_request.json"))
        .expect(1)
        .mount(&r.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("query", "alpha.com"))
        .respond_with(hal("newest_first.json"))
        .expect(1)
        .mount(&r.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("query", "gamma.com"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&r.server)
        .await;
    expect_write(&r.server, "PATCH", &[(9003, "0")]).await;
    expect_write(&r.server, "POST", &[(9100, "1")]).await;
    let out = r
        .conn
        .push(&[unconfirmed("alpha.com"), unconfirmed("gamma.com")])
        .await
        .unwrap();
    assert_eq!(out, [written("9003", false), written("9100", true),]);
}

#[tokio::test]
async fn a_replayed_create_finds_the_existing_company_instead_of_duplicating_it() {
    let r = rig().await;
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .and(query_param("query", "acme.com"))
        .respond_with(hal("search_existing.json"))
        .expect(1)
        .mount(&r.server)
        .await;
    Mock::given(method("PATCH"))
        .and(path("/api/v4/companies"))
        .and(body_string_contains("7002"))
        .respond_with(hal("patched.json"))
        .expect(1)
        .mount(&r.server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v4/companies"))
        .respond_with(hal("created.json"))
        .expect(0)
        .mount(&r.server)
        .await;
    let out = r
        .conn
        .push(&[item(
            json!({"name": "Acme", "cf.name.Domain": "acme.com"}),
            None,
            1,
        )])
        .await
        .unwrap();
    assert_eq!(out, [written("7002", false)]);
}

#[tokio::test]
async fn a_lost_answer_to_a_create_is_retried_later_not_resent() {
    let r = rig_with(
        false,
        Some("account_filter_on.json"),
        Duration::from_millis(300),
    )
    .await;
    r.conn.start().await.unwrap();
    Mock::given(method("POST"))
        .and(path("/api/v4/companies"))
        .respond_with(hal("created.json").set_delay(Duration::from_secs(3)))
        .mount(&r.server)
        .await;
    let out = r
        .conn
        .push(&[item(json!({"name": "Slow Co"}), None, 0)])
        .await
        .unwrap();
    assert!(
        matches!(&out[0], PushOutcome::Unconfirmed { reason } if reason.contains("look")),
        "{out:?}"
    );
    assert_eq!(
        requests_to(&r.server, "POST", "/api/v4/companies")
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn unknown_custom_fields_are_reported_unavailable() {
    let r = rig().await;
    let keys = [
        "cf.name.Domain".to_string(),
        "cf.code.PHONE@WORK".to_string(),
        "cf.name.Employees".to_string(),
        "name".to_string(),
    ];
    assert_eq!(r.conn.unavailable_fields(&keys), ["cf.name.Employees"]);
}

#[tokio::test]
async fn a_server_without_the_account_and_catalogue_endpoints_still_starts_and_scans() {
    // A server implementing only the companies API: the account and catalogue calls
    // answer 404. The connector must start (no filtering assumed, no custom fields) and
    // read with the descending scan, which needs neither.
    let r = rig_with(false, None, Duration::from_secs(5)).await;
    for p in ["/api/v4/account", "/api/v4/companies/custom_fields"] {
        Mock::given(method("GET"))
            .and(path(p))
            .respond_with(problem(404, "not_found.json"))
            .mount(&r.server)
            .await;
    }
    r.conn
        .start()
        .await
        .expect("starts without the optional endpoints");
    assert!(!r.conn.filter_enabled());
    assert!(r.conn.catalogue().fields().is_empty());
    assert_eq!(
        r.conn
            .unavailable_fields(&["cf.name.Domain".to_string(), "name".to_string()]),
        ["cf.name.Domain"]
    );
    let page = poll_by_descending_scan(&r).await;
    assert_eq!(page.records.len(), 1);
}

/// A company list as another amoCRM implementation might serve it: `filter[updated_at]`
/// with an exclusive `to` or `from` (or inclusive ones), ascending order, pages capped at
/// `cap` rows whatever `limit` asks, and `_links.next` only on full pages; 204 when empty.
struct StrictList {
    template: Value,
    /// (id, updated_at) in list order (ascending time, then id).
    companies: Vec<(i64, i64)>,
    cap: usize,
    to_exclusive: bool,
    from_exclusive: bool,
}

impl Respond for StrictList {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let num = |k: &str| query(req, k).and_then(|v| v.parse::<i64>().ok());
        let (from, to) = (
            num("filter[updated_at][from]"),
            num("filter[updated_at][to]"),
        );
        let limit = num("limit").unwrap_or(50).clamp(1, self.cap as i64) as usize;
        let page = num("page").unwrap_or(1).max(1) as usize;
        let rows: Vec<Value> = self
            .companies
            .iter()
            .filter(|(_, ts)| {
                from.is_none_or(|f| {
                    if self.from_exclusive {
                        *ts > f
                    } else {
                        *ts >= f
                    }
                })
            })
            .filter(|(_, ts)| to.is_none_or(|t| if self.to_exclusive { *ts < t } else { *ts <= t }))
            .skip((page - 1) * limit)
            .take(limit)
            .map(|(id, ts)| {
                let mut c = self.template.clone();
                c["id"] = json!(id);
                c["updated_at"] = json!(ts);
                c
            })
            .collect();
        if rows.is_empty() {
            return ResponseTemplate::new(204);
        }
        let mut links = json!({"self": {"href": "x"}});
        if rows.len() == limit {
            links["next"] = json!({"href": "y"});
        }
        ResponseTemplate::new(200).set_body_json(json!({"_page": page, "_links": links,
            "_embedded": {"companies": rows}}))
    }
}

/// Polls from `cursor_at(since)` until the cycle ends; returns how often each id came.
async fn read_one_cycle(r: &Rig, since: i64) -> std::collections::BTreeMap<String, usize> {
    let mut cursor = cursor_at(since, &[]);
    let mut got = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..100 {
        let page = r.conn.poll(&cursor, &PollMode::Incremental).await.unwrap();
        for rec in page.records {
            *got.entry(rec.vendor_id).or_default() += 1;
        }
        cursor = page.next;
        if !page.more {
            return got;
        }
    }
    panic!("the cycle did not end: {cursor:?}");
}

#[tokio::test]
async fn a_server_capping_pages_below_the_limit_is_read_to_the_end() {
    let r = rig().await;
    let template: Value = serde_json::from_str(&fixture("company_template.json")).unwrap();
    // 330 companies over 33 seconds, 10 a second; the server gives at most 100 a page.
    let companies = (0..330)
        .map(|i| (5_000 + i, 1_700_000_000 + i / 10))
        .collect();
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .respond_with(StrictList {
            template,
            companies,
            cap: 100,
            to_exclusive: false,
            from_exclusive: false,
        })
        .mount(&r.server)
        .await;
    let got = read_one_cycle(&r, 1_700_000_000).await;
    assert_eq!(got.len(), 330, "skipped some");
    assert!(got.values().all(|n| *n == 1), "repeated some");
}

#[tokio::test]
async fn a_server_reading_the_upper_bound_as_exclusive_misses_nothing() {
    let r = rig().await;
    let template: Value = serde_json::from_str(&fixture("company_template.json")).unwrap();
    // The newest companies are stamped with the cycle's upper bound, the last second that
    // is over; 300 share one older second (the exact-second procedure).
    // As the connector bounds a cycle: the last whole second over for `SETTLE` (the
    // connector's own bound, computed a little later, is this one or the next).
    let settle = chrono::Duration::from_std(crmbridge::connectors::amocrm::poll::SETTLE).unwrap();
    let upper = (chrono::Utc::now() - settle).timestamp() - 1;
    let mut companies: Vec<(i64, i64)> = (0..300).map(|i| (8_000 + i, upper - 5)).collect();
    companies.extend((0..20).map(|i| (9_000 + i, upper - 5 + i / 5)));
    companies.extend((0..3).map(|i| (9_500 + i, upper)));
    companies.sort_by_key(|&(id, ts)| (ts, id));
    Mock::given(method("GET"))
        .and(path("/api/v4/companies"))
        .respond_with(StrictList {
            template,
            companies,
            cap: 250,
            to_exclusive: true,
            from_exclusive: false,
        })
        .mount(&r.server)
        .await;
    let got = read_one_cycle(&r, upper - 10).await;
    assert_eq!(got.len(), 323, "skipped some");
    assert!(got.values().all(|n| *n == 1), "repeated some");
}

#[tokio::test]
async fn a_server_reading_the_lower_bound_as_exclusive_misses_nothing() {
    for from_exclusive in [true, false] {
        let r = rig().await;
        let template: Value = serde_json::from_str(&fixture("company_template.json")).unwrap();
        // 7 companies a second from the cursor's own second on, so pages of 100 end inside
        // a second; 300 more share one second (the exact-second procedure).
        let since = chrono::Utc::now().timestamp() - 200;
        let mut companies: Vec<(i64, i64)> = (0..350).map(|i| (5_000 + i, since + i / 7)).collect();
        companies.extend((0..300).map(|i| (8_000 + i, since + 60)));
        companies.sort_by_key(|&(id, ts)| (ts, id));
        Mock::given(method("GET"))
            .and(path("/api/v4/companies"))
            .respond_with(StrictList {
                template,
                companies,
                cap: 100,
                to_exclusive: false,
                from_exclusive,
            })
            .mount(&r.server)
            .await;
        let got = read_one_cycle(&r, since).await;
        assert_eq!(
            got.len(),
            650,
            "from_exclusive {from_exclusive}: skipped some"
        );
        assert!(
            got.values().all(|n| *n == 1),
            "from_exclusive {from_exclusive}: repeated some"
        );
    }
}

/// What one update (company 9003) comes back as when amoCRM answers its PATCH `answer`.
async fn update_answered(answer: ResponseTemplate) -> PushOutcome {
    let r = rig().await;
    Mock::given(method("PATCH"))
        .and(path("/api/v4/companies"))
        .respond_with(answer)
        .mount(&r.server)
        .await;
    let out = r
        .conn
        .push(&[item(json!({"name": "Acme"}), Some("9003"), 0)])
        .await
        .unwrap();
    out.into_iter().next().unwrap()
}

#[tokio::test]
async fn an_update_accepted_with_an_empty_answer_is_written() {
    let out = update_answered(ResponseTemplate::new(204)).await;
    assert_eq!(out, written("9003", false));
}

#[tokio::test]
async fn an_update_answered_with_unreadable_json_is_retried_not_taken_as_written() {
    let broken =
        ResponseTemplate::new(200).set_body_raw("{\"_embedded\": {\"compa", "application/hal+json");
    let out = update_answered(broken).await;
    assert!(matches!(out, PushOutcome::Retry { .. }), "{out:?}");
}
