//! The Rally connector against wiremock: one test per error class and paging edge, with
//! JSON fixtures from `wiremock-fixtures/rally/`.

use std::sync::Arc;
use std::time::Duration;

use crmbridge::config::{CommonConnectorConfig, Limits, RallyConfig, SecretRef, Timeouts};
use crmbridge::connector::{Connector, ConnectorError, Cursor, PollMode, PushItem, PushOutcome};
use crmbridge::connectors::BuildContext;
use crmbridge::connectors::rally::RallyConnector;
use crmbridge::daemon::metrics::Metrics;
use crmbridge::mapping::MappingRules;
use crmbridge::model::CanonicalId;
use crmbridge::store::Store;
use serde_json::{Value, json};
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "rk_test_secret_key";

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!("../wiremock-fixtures/rally/", $name))
    };
}

fn ok_json(text: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(text.as_bytes().to_vec(), "application/json")
}

fn status_json(status: u16, text: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(text.as_bytes().to_vec(), "application/json")
}

/// A connector for `server` with page size `page_size`, no client rate limit.
struct Fixture {
    conn: RallyConnector,
    _dir: tempfile::TempDir,
}

fn connector(server: &MockServer, page_size: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("rally.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let cfg = RallyConfig {
        common: CommonConnectorConfig {
            base_url: url::Url::parse(&format!("{}/", server.uri())).unwrap(),
            poll_interval: Duration::from_secs(60),
            batch_size: 100,
            timeouts: Timeouts {
                connect: Duration::from_secs(2),
                read: Duration::from_secs(5),
                write: Duration::from_secs(5),
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
        api_key: SecretRef::File(key_file),
        page_size,
        mapping: MappingRules::default(),
    };
    let ctx = BuildContext {
        store: Arc::new(Store::open(&dir.path().join("store.redb")).unwrap()),
        metrics: Arc::new(Metrics::new()),
    };
    Fixture {
        conn: RallyConnector::new("rally", &cfg, &ctx).expect("connector builds"),
        _dir: dir,
    }
}

/// Pushes two new companies, x.example.com and y.example.com, through one bulk; asserts
/// that x was created and y (already in Rally) updated, each with its record's id.
async fn push_x_and_y_to(server: &MockServer) {
    let out = connector(server, 3)
        .conn
        .push(&[
            item(None, json!({"name": "N", "domain": "x.example.com"}), 0),
            item(None, json!({"name": "N", "domain": "y.example.com"}), 0),
        ])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            PushOutcome::Written {
                vendor_id: "10000000-0000-4000-8000-000000000001".into(),
                created: true
            },
            PushOutcome::Written {
                vendor_id: "20000000-0000-4000-8000-000000000002".into(),
                created: false
            },
        ]
    );
}

fn item(vendor_id: Option<&str>, fields: Value, prior_attempts: u32) -> PushItem {
    let Value::Object(fields) = fields else {
        panic!("fields must be an object")
    };
    PushItem {
        canonical_id: CanonicalId::from("c-1"),
        vendor_id: vendor_id.map(str::to_string),
        fields,
        prior_attempts,
        unconfirmed_since: (prior_attempts > 0)
            .then(|| chrono::Utc::now() - chrono::Duration::minutes(5)),
    }
}

fn ids(page: &crmbridge::connector::Page) -> Vec<String> {
    page.records
        .iter()
        .map(|r| r.fields["name"].to_string())
        .collect()
}

async fn mount_list(server: &MockServer, offset: &str, body: &str) {
    Mock::given(method("GET"))
        .and(path("/api/v1/companies"))
        .and(query_param("offset", offset))
        .respond_with(ok_json(body))
        .mount(server)
        .await;
}

#[tokio::test]
async fn start_sends_the_key_and_fails_with_auth_on_401() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/companies"))
        .and(header("x-api-key", KEY))
        .and(query_param("limit", "1"))
        .respond_with(status_json(401, fixture!("error_401.json")))
        .expect(1)
        .mount(&server)
        .await;
    let f = connector(&server, 100);
    let err = f.conn.start().await.expect_err("401 must fail start");
    assert!(matches!(err, ConnectorError::Auth { .. }), "{err:?}");
    assert!(!err.to_string().contains(KEY), "secret leaked: {err}");
}

#[tokio::test]
async fn start_is_fatal_when_the_base_url_is_not_a_rally_api() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(fixture!("not_rally.html"), "text/html"),
        )
        .mount(&server)
        .await;
    let err = connector(&server, 100).conn.start().await.unwrap_err();
    assert!(matches!(err, ConnectorError::Fatal { .. }), "{err:?}");
}

#[tokio::test]
async fn poll_sends_updated_since_in_utc_with_z_minus_the_overlap() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/companies"))
        .and(query_param("updatedSince", "2025-06-01T09:59:55.000Z"))
        .and(query_param("limit", "3"))
        .and(query_param("offset", "0"))
        .respond_with(ok_json(fixture!("list_one.json")))
        .expect(1)
        .mount(&server)
        .await;
    let f = connector(&server, 3);
    // Stored with an offset on purpose: it must go out as UTC with `Z`.
    let cursor = Cursor(json!({"since": "2025-06-01T12:00:00+02:00"}));
    let page = f.conn.poll(&cursor, &PollMode::Incremental).await.unwrap();
    assert_eq!(page.records.len(), 1, "{page:?}");
}

#[tokio::test]
async fn a_short_page_ends_the_cycle_and_the_next_since_is_the_cycle_start() {
    let server = MockServer::start().await;
    mount_list(&server, "0", fixture!("list_short_two.json")).await;
    let f = connector(&server, 3);
    let before = chrono::Utc::now();
    let page = f
        .conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    assert!(
        !page.more,
        "a short page must end the cycle: {:?}",
        page.next
    );
    assert_eq!(page.records.len(), 2);
    let since = page.next.0["since"]
        .as_str()
        .expect("since is set")
        .to_string();
    assert!(since.ends_with('Z'), "{since}");
    let since = chrono::DateTime::parse_from_rfc3339(&since).unwrap();
    assert!(
        since <= before && since > before - chrono::Duration::seconds(10),
        "since {since} should be about now − lag (now {before})"
    );
    assert!(page.next.0["cycle_start"].is_null(), "{:?}", page.next);
}

#[tokio::test]
async fn a_list_wrapped_in_an_object_is_read_like_a_bare_one() {
    let server = MockServer::start().await;
    let rows: Value = serde_json::from_str(fixture!("list_short_two.json")).unwrap();
    let wrapped = json!({"data": rows, "total": 2, "limit": 3, "offset": 0}).to_string();
    Mock::given(method("GET"))
        .and(path("/api/v1/companies"))
        .respond_with(ok_json(&wrapped))
        .mount(&server)
        .await;
    let f = connector(&server, 3);
    f.conn.start().await.expect("a Rally API");
    let page = f
        .conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    assert_eq!(page.records.len(), 2, "{page:?}");
    assert!(!page.more);
}

#[tokio::test]
async fn full_pages_are_requested_with_one_row_of_overlap() {
    let server = MockServer::start().await;
    mount_list(&server, "0", fixture!("list_a_b_c.json")).await;
    mount_list(&server, "2", fixture!("list_c_d_e.json")).await;
    mount_list(&server, "4", "[]").await;
    let f = connector(&server, 3);
    let p1 = f
        .conn
        .poll(&Cursor::start(), &PollMode::Full { since: None })
        .await
        .unwrap();
    assert!(p1.more);
    assert_eq!(p1.next.0["offset"], json!(2), "{:?}", p1.next);
    let p2 = f
        .conn
        .poll(&p1.next, &PollMode::Full { since: None })
        .await
        .unwrap();
    // `c` was the anchor: only the rows after it are new.
    assert_eq!(ids(&p2), vec!["\"Company D\"", "\"Company E\""]);
    assert_eq!(p2.next.0["offset"], json!(4));
    // Offset 4 answers nothing: not the anchor, so the connector backs up instead of
    // trusting an empty page (rows may have been deleted).
    let p3 = f
        .conn
        .poll(&p2.next, &PollMode::Full { since: None })
        .await
        .unwrap();
    assert!(p3.more && p3.records.is_empty(), "{:?}", p3.next);
    assert_eq!(p3.next.0["offset"], json!(2));
}

#[tokio::test]
async fn a_shifted_page_backs_up_one_page_and_skips_nothing() {
    // Listing a..h; after two pages b and c are deleted, so offset 4 holds g, not e.
    let server = MockServer::start().await;
    mount_list(&server, "0", fixture!("list_a_b_c.json")).await;
    Mock::given(method("GET"))
        .and(path("/api/v1/companies"))
        .and(query_param("offset", "2"))
        .respond_with(ok_json(fixture!("list_c_d_e.json")))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    mount_list(&server, "2", fixture!("list_backup_e_f_g.json")).await;
    mount_list(&server, "4", fixture!("list_shifted_g_h.json")).await;
    let f = connector(&server, 3);
    let mut cursor = Cursor::start();
    let mut seen = Vec::new();
    let mut offsets = Vec::new();
    for _ in 0..10 {
        offsets.push(cursor.0.get("offset").cloned().unwrap_or(json!(0)));
        let page = f.conn.poll(&cursor, &PollMode::Incremental).await.unwrap();
        seen.extend(ids(&page));
        cursor = page.next;
        if !page.more {
            break;
        }
    }
    for want in ["A", "D", "E", "F", "G", "H"] {
        assert!(
            seen.contains(&format!("\"Company {want}\"")),
            "Company {want} was skipped; seen {seen:?}, offsets {offsets:?}"
        );
    }
    assert_eq!(
        offsets,
        vec![json!(0), json!(2), json!(4), json!(2), json!(4)]
    );
}

#[tokio::test]
async fn malformed_records_go_to_page_malformed_and_the_rest_goes_on() {
    let server = MockServer::start().await;
    mount_list(&server, "0", fixture!("list_with_malformed.json")).await;
    let page = connector(&server, 10)
        .conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1, "{:?}", page.malformed);
    // The decimal arrives exactly as Rally sent it.
    assert_eq!(
        page.records[0].fields["annualRevenue"].to_string(),
        "12345678901234567890.12"
    );
    let reasons: Vec<&str> = page.malformed.iter().map(|m| m.reason.as_str()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("id is missing"), "{reasons:?}");
    assert!(reasons[1].contains("updatedAt"), "{reasons:?}");
    assert!(reasons[2].contains("employeeCount"), "{reasons:?}");
    assert!(page.malformed[2].raw.contains("lots"));
    assert!(!page.more, "a page of 4 raw rows with limit 10 is short");
}

#[tokio::test]
async fn a_rate_limited_poll_waits_for_retry_after_and_succeeds() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/companies"))
        .respond_with(
            status_json(429, fixture!("error_429.json")).insert_header("Retry-After", "1"),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    mount_list(&server, "0", fixture!("list_one.json")).await;
    let started = std::time::Instant::now();
    let page = connector(&server, 3)
        .conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After ignored: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_server_error_on_poll_is_retried() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/companies"))
        .respond_with(status_json(500, fixture!("error_500.json")))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    mount_list(&server, "0", fixture!("list_one.json")).await;
    let page = connector(&server, 3)
        .conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1);
}

#[tokio::test]
async fn updates_put_the_fields_and_verdicts_become_rejections_while_the_batch_goes_on() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path(
            "/api/v1/companies/00000000-0000-4000-8000-000000000000",
        ))
        .and(body_json(json!({"name": "Renamed A"})))
        .respond_with(ok_json(fixture!("company_updated.json")))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/api/v1/companies/gone"))
        .respond_with(status_json(404, fixture!("error_404.json")))
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/api/v1/companies/conflicting"))
        .respond_with(status_json(409, fixture!("error_409.json")))
        .mount(&server)
        .await;
    let f = connector(&server, 3);
    let out = f
        .conn
        .push(&[
            item(Some("gone"), json!({"name": "X"}), 0),
            item(
                Some("00000000-0000-4000-8000-000000000000"),
                json!({"name": "Renamed A"}),
                0,
            ),
            item(
                Some("conflicting"),
                json!({"domain": "taken.example.com"}),
                0,
            ),
        ])
        .await
        .unwrap();
    match &out[0] {
        PushOutcome::Rejected { reason } => {
            assert!(reason.contains("deleted in Rally (404"), "{reason}")
        }
        other => panic!("404 must be rejected, got {other:?}"),
    }
    assert_eq!(
        out[1],
        PushOutcome::Written {
            vendor_id: "00000000-0000-4000-8000-000000000000".into(),
            created: false
        }
    );
    assert_eq!(
        out[2],
        PushOutcome::Rejected {
            reason: "A company with domain 'taken.example.com' already exists".into()
        }
    );
}

#[tokio::test]
async fn bulk_maps_per_index_errors_and_created_ids_in_order() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/companies/bulk"))
        .and(body_json(json!([
            {"name": "X", "domain": "x.example.com"},
            {"domain": "noname.example.com"},
            {"name": "Z", "domain": "z.example.com"}
        ])))
        .respond_with(ok_json(fixture!("bulk_created_with_error.json")))
        .expect(1)
        .mount(&server)
        .await;
    let out = connector(&server, 3)
        .conn
        .push(&[
            item(None, json!({"name": "X", "domain": "x.example.com"}), 0),
            item(None, json!({"domain": "noname.example.com"}), 0),
            item(None, json!({"name": "Z", "domain": "z.example.com"}), 0),
        ])
        .await
        .unwrap();
    let written = |id: &str| PushOutcome::Written {
        vendor_id: id.into(),
        created: true,
    };
    assert_eq!(
        out,
        vec![
            written("10000000-0000-4000-8000-000000000001"),
            PushOutcome::Rejected {
                reason: "Company name is required".into()
            },
            written("10000000-0000-4000-8000-000000000003"),
        ]
    );
}

#[tokio::test]
async fn bulk_with_updated_items_finds_their_ids_by_domain_in_one_list_call() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/companies/bulk"))
        .respond_with(ok_json(fixture!("bulk_one_created_one_updated.json")))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/companies"))
        .and(query_param("offset", "0"))
        .respond_with(ok_json(fixture!("list_after_bulk_x_y.json")))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .respond_with(ok_json(fixture!("upsert_x_updated.json")))
        .expect(0)
        .mount(&server)
        .await;
    push_x_and_y_to(&server).await;
}

#[tokio::test]
async fn bulk_with_updated_items_resolves_their_ids_by_upsert() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/companies/bulk"))
        .respond_with(ok_json(fixture!("bulk_one_created_one_updated.json")))
        .expect(1)
        .mount(&server)
        .await;
    for (domain, body) in [
        ("x.example.com", fixture!("upsert_x_updated.json")),
        ("y.example.com", fixture!("upsert_y_updated.json")),
    ] {
        Mock::given(method("PUT"))
            .and(path("/api/v1/companies/upsert"))
            .and(body_json(json!({"name": "N", "domain": domain})))
            .respond_with(ok_json(body))
            .expect(1)
            .mount(&server)
            .await;
    }
    push_x_and_y_to(&server).await;
}

#[tokio::test]
async fn an_unreadable_bulk_answer_leaves_the_items_to_retry() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/companies/bulk"))
        .respond_with(ok_json(fixture!("bulk_truncated.txt")))
        .mount(&server)
        .await;
    let out = connector(&server, 3)
        .conn
        .push(&[item(
            None,
            json!({"name": "X", "domain": "x.example.com"}),
            0,
        )])
        .await
        .unwrap();
    assert!(matches!(out[0], PushOutcome::Retry { .. }), "{out:?}");
}

#[tokio::test]
async fn records_without_a_domain_are_created_in_one_bulk_on_their_first_attempt() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/companies/bulk"))
        .and(body_json(
            json!([{"name": "First Ltd"}, {"name": "Second Ltd"}]),
        ))
        .respond_with(ok_json(fixture!("bulk_created_two.json")))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/companies"))
        .respond_with(status_json(201, fixture!("company_created.json")))
        .expect(0)
        .mount(&server)
        .await;
    let out = connector(&server, 3)
        .conn
        .push(&[
            item(None, json!({"name": "First Ltd"}), 0),
            item(None, json!({"name": "Second Ltd"}), 0),
        ])
        .await
        .unwrap();
    let written = |id: &str| PushOutcome::Written {
        vendor_id: id.into(),
        created: true,
    };
    assert_eq!(
        out,
        vec![
            written("30000000-0000-4000-8000-000000000001"),
            written("30000000-0000-4000-8000-000000000002"),
        ]
    );
}

#[tokio::test]
async fn a_bulk_create_of_unknown_outcome_leaves_records_without_a_domain_unconfirmed() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/companies/bulk"))
        .respond_with(ok_json(fixture!("bulk_truncated.txt")))
        .expect(1)
        .mount(&server)
        .await;
    let out = connector(&server, 3)
        .conn
        .push(&[
            item(None, json!({"name": "First Ltd"}), 0),
            item(None, json!({"name": "Second Ltd"}), 0),
        ])
        .await
        .unwrap();
    // Never `Retry`: a blind resend of a create without a domain could duplicate it.
    assert!(
        out.iter()
            .all(|o| matches!(o, PushOutcome::Unconfirmed { .. })),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_server_that_wants_bulks_wrapped_gets_them_so_after_one_refusal() {
    let server = MockServer::start().await;
    let companies = json!([{"name": "First Ltd"}, {"name": "Second Ltd"}]);
    Mock::given(method("POST"))
        .and(path("/api/v1/companies/bulk"))
        .and(body_json(companies.clone()))
        .respond_with(status_json(
            400,
            r#"{"error": "The JSON value could not be converted to BulkCreateRequest"}"#,
        ))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/companies/bulk"))
        .and(body_json(json!({ "companies": companies })))
        .respond_with(ok_json(fixture!("bulk_created_two.json")))
        .expect(2)
        .mount(&server)
        .await;
    let fx = connector(&server, 3);
    let items = [
        item(None, json!({"name": "First Ltd"}), 0),
        item(None, json!({"name": "Second Ltd"}), 0),
    ];
    let want = vec![
        PushOutcome::Written {
            vendor_id: "30000000-0000-4000-8000-000000000001".into(),
            created: true,
        },
        PushOutcome::Written {
            vendor_id: "30000000-0000-4000-8000-000000000002".into(),
            created: true,
        },
    ];
    // The first push learns the shape (one refused array, one wrapped bulk); the second
    // sends it wrapped straight away. No item goes one by one.
    assert_eq!(fx.conn.push(&items).await.unwrap(), want);
    assert_eq!(fx.conn.push(&items).await.unwrap(), want);
}

#[tokio::test]
async fn a_bulk_refused_as_a_whole_is_sent_one_by_one() {
    let server = MockServer::start().await;
    // Each of the two bulks (with and without domains) is refused as a JSON array and
    // again as {"companies": [...]} (the other shape a server may want).
    Mock::given(method("POST"))
        .and(path("/api/v1/companies/bulk"))
        .respond_with(status_json(400, fixture!("error_400.json")))
        .expect(4)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/companies"))
        .and(body_json(json!({"name": "Nameless Ltd"})))
        .respond_with(status_json(201, fixture!("company_created.json")))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/companies"))
        .and(body_json(json!({"city": "Paris"})))
        .respond_with(status_json(400, fixture!("error_400.json")))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/api/v1/companies/upsert"))
        .and(body_json(json!({"name": "N", "domain": "x.example.com"})))
        .respond_with(ok_json(fixture!("upsert_x_updated.json")))
        .expect(1)
        .mount(&server)
        .await;
    let out = connector(&server, 3)
        .conn
        .push(&[
            item(None, json!({"name": "Nameless Ltd"}), 0),
            item(None, json!({"city": "Paris"}), 0),
            item(None, json!({"name": "N", "domain": "x.example.com"}), 0),
        ])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            PushOutcome::Written {
                vendor_id: "00000000-0000-4000-8000-000000000007".into(),
                created: true
            },
            PushOutcome::Rejected {
                reason: "Company name is required".into()
            },
            PushOutcome::Written {
                vendor_id: "10000000-0000-4000-8000-000000000001".into(),
                created: false
            },
        ]
    );
}

#[tokio::test]
async fn a_retried_create_links_the_recent_record_of_the_same_name() {
    let server = MockServer::start().await;
    // Two records of that name updated lately: the fixture's, created long before the
    // first attempt (another company of the same name, agreeing on every field pushed),
    // and one created since (ours; its city edited in Rally meanwhile).
    let mut rows: Vec<Value> =
        serde_json::from_str(fixture!("list_same_name_recent.json")).unwrap();
    let mut ours = rows[0].clone();
    ours["id"] = json!("00000000-0000-4000-8000-000000000008");
    ours["createdAt"] = json!((chrono::Utc::now() - chrono::Duration::minutes(4)).to_rfc3339());
    ours["city"] = json!("Munich");
    rows.push(ours);
    Mock::given(method("GET"))
        .and(path("/api/v1/companies"))
        .respond_with(ok_json(&Value::Array(rows).to_string()))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/companies"))
        .respond_with(status_json(201, fixture!("company_created.json")))
        .expect(0)
        .mount(&server)
        .await;
    let out = connector(&server, 3)
        .conn
        .push(&[item(
            None,
            json!({"name": "Nameless Ltd", "city": "Berlin", "country": "DE"}),
            1,
        )])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![PushOutcome::Written {
            vendor_id: "00000000-0000-4000-8000-000000000008".into(),
            created: true
        }]
    );
}

#[tokio::test]
async fn a_throttled_write_is_retried_after_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .respond_with(
            status_json(429, fixture!("error_429.json")).insert_header("Retry-After", "1"),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .respond_with(ok_json(fixture!("company_updated.json")))
        .mount(&server)
        .await;
    let out = connector(&server, 3)
        .conn
        .push(&[item(
            Some("00000000-0000-4000-8000-000000000000"),
            json!({"name": "A"}),
            0,
        )])
        .await
        .unwrap();
    assert!(matches!(out[0], PushOutcome::Written { .. }), "{out:?}");
}

#[tokio::test]
async fn a_rejected_key_fails_the_whole_push_with_auth() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .respond_with(status_json(401, fixture!("error_401.json")))
        .mount(&server)
        .await;
    let err = connector(&server, 3)
        .conn
        .push(&[
            item(Some("a"), json!({"name": "A"}), 0),
            item(Some("b"), json!({"name": "B"}), 0),
        ])
        .await
        .expect_err("no item has an outcome");
    assert!(matches!(err, ConnectorError::Auth { .. }), "{err:?}");
}

/// The `limit` and `offset` a list call asked for (0 when absent).
fn limit_and_offset(req: &wiremock::Request) -> (usize, usize) {
    let param = |k: &str| {
        req.url
            .query_pairs()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0)
    };
    (param("limit"), param("offset"))
}

/// A Rally listing of `total` companies that serves at most `cap` rows whatever `limit`
/// asks for, and records the `limit` of every call.
struct CappedListing {
    total: usize,
    cap: usize,
    limits: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl wiremock::Respond for CappedListing {
    fn respond(&self, req: &wiremock::Request) -> ResponseTemplate {
        let (limit, offset) = limit_and_offset(req);
        self.limits.lock().unwrap().push(limit);
        let rows: Vec<Value> = (offset..self.total.min(offset + limit.min(self.cap)))
            .map(|i| {
                json!({"id": format!("00000000-0000-0000-0000-{i:012}"), "name": format!("Company {i}"),
                    "updatedAt": "2025-01-01T00:00:00Z", "createdAt": "2025-01-01T00:00:00Z"})
            })
            .collect();
        ResponseTemplate::new(200).set_body_json(rows)
    }
}

/// A server listing `total` companies at most `cap` a page; also the `limit` of every call.
async fn capped_server(
    total: usize,
    cap: usize,
) -> (MockServer, Arc<std::sync::Mutex<Vec<usize>>>) {
    let server = MockServer::start().await;
    let limits = Arc::new(std::sync::Mutex::new(Vec::new()));
    Mock::given(method("GET"))
        .and(path("/api/v1/companies"))
        .respond_with(CappedListing {
            total,
            cap,
            limits: limits.clone(),
        })
        .mount(&server)
        .await;
    (server, limits)
}

/// One full poll cycle: the names read, and the number of `poll` calls it took.
async fn full_cycle(conn: &RallyConnector) -> (std::collections::BTreeSet<String>, usize) {
    let mut cursor = Cursor::start();
    let mut names = std::collections::BTreeSet::new();
    for polls in 1..=50 {
        let page = conn
            .poll(&cursor, &PollMode::Full { since: None })
            .await
            .unwrap();
        names.extend(page.records.iter().map(|r| r.fields["name"].to_string()));
        cursor = page.next;
        if !page.more {
            return (names, polls);
        }
    }
    panic!("the cycle did not end in 50 polls");
}

#[tokio::test]
async fn a_server_capping_pages_below_the_page_size_is_read_to_the_end() {
    let (server, limits) = capped_server(130, 25).await;
    let f = connector(&server, 100);
    let (names, _) = full_cycle(&f.conn).await;
    assert_eq!(names.len(), 130, "a 25-row page is not the end of 130 rows");
    let limits = limits.lock().unwrap();
    assert_eq!(
        limits[..2],
        [100, 100],
        "asked, then checked once: {limits:?}"
    );
    assert!(
        limits[2..].iter().all(|l| *l == 25),
        "then asks for 25: {limits:?}"
    );
}

#[tokio::test]
async fn a_short_page_of_a_server_that_served_more_before_is_the_end_without_a_check() {
    let (server, limits) = capped_server(150, 100).await;
    let f = connector(&server, 100);
    let (names, polls) = full_cycle(&f.conn).await;
    // 100 rows, then the last 51 (one row of overlap): the 51 are fewer than the 100
    // served before, so they end the listing with no extra call.
    assert_eq!((names.len(), polls), (150, 2));
    let limits = limits.lock().unwrap().clone();
    assert_eq!(limits.len(), 2, "{limits:?}");
}

/// A listing of records a busy moment touched: `filler` records of other bulks first (the
/// listing is in creation order), then one per `domains`, with ids `w-<index>`.
struct BusyListing {
    filler: usize,
    domains: Vec<String>,
}

impl wiremock::Respond for BusyListing {
    fn respond(&self, req: &wiremock::Request) -> ResponseTemplate {
        let (limit, offset) = limit_and_offset(req);
        let total = self.filler + self.domains.len();
        let rows: Vec<Value> = (offset..total.min(offset + limit))
            .map(|i| match i.checked_sub(self.filler) {
                None => json!({"id": format!("f-{i}"), "name": "Other", "domain": format!("other-{i}.example")}),
                Some(w) => json!({"id": format!("w-{w}"), "name": "N", "domain": self.domains[w]}),
            })
            .collect();
        ResponseTemplate::new(200).set_body_json(rows)
    }
}

#[tokio::test]
async fn ids_of_updated_bulk_items_are_found_deep_in_a_busy_listing() {
    // Other bulks touched 800 records in the same seconds: the ten this bulk updated come
    // after them. Paging on (ten calls at most, one per item) beats ten upserts.
    let server = MockServer::start().await;
    let domains: Vec<String> = (0..10).map(|i| format!("busy-{i}.example")).collect();
    Mock::given(method("POST"))
        .and(path("/api/v1/companies/bulk"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"created": 0, "updated": 10, "failed": 0, "createdIds": [], "errors": []}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/companies"))
        .respond_with(BusyListing {
            filler: 800,
            domains: domains.clone(),
        })
        .expect(9)
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .respond_with(ok_json(fixture!("upsert_x_updated.json")))
        .expect(0)
        .mount(&server)
        .await;
    let items: Vec<PushItem> = domains
        .iter()
        .map(|d| item(None, json!({"name": "N", "domain": d}), 0))
        .collect();
    let out = connector(&server, 100).conn.push(&items).await.unwrap();
    for (i, o) in out.iter().enumerate() {
        assert_eq!(
            o,
            &PushOutcome::Written {
                vendor_id: format!("w-{i}"),
                created: false
            }
        );
    }
}

#[tokio::test]
async fn no_tags_are_written_as_an_empty_list_never_null() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path(
            "/api/v1/companies/00000000-0000-4000-8000-000000000000",
        ))
        .and(body_json(json!({"name": "Renamed A", "tags": []})))
        .respond_with(ok_json(fixture!("company_updated.json")))
        .expect(1)
        .mount(&server)
        .await;
    let out = connector(&server, 3)
        .conn
        .push(&[item(
            Some("00000000-0000-4000-8000-000000000000"),
            json!({"name": "Renamed A", "tags": null}),
            0,
        )])
        .await
        .unwrap();
    assert!(matches!(out[0], PushOutcome::Written { .. }), "{out:?}");
}

#[tokio::test]
async fn a_page_size_the_server_refuses_is_halved_and_the_read_goes_on() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/companies"))
        .and(query_param("limit", "100"))
        .respond_with(status_json(
            400,
            r#"{"error": "limit must be between 1 and 50"}"#,
        ))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/companies"))
        .and(query_param("limit", "50"))
        .respond_with(ok_json(fixture!("list_short_two.json")))
        .mount(&server)
        .await;
    let f = connector(&server, 100);
    let first = f.conn.poll(&Cursor::start(), &PollMode::Incremental).await;
    assert!(
        matches!(first, Err(ConnectorError::Transient { .. })),
        "{first:?}"
    );
    let page = f
        .conn
        .poll(&Cursor::start(), &PollMode::Incremental)
        .await
        .unwrap();
    assert_eq!(page.records.len(), 2);
}
