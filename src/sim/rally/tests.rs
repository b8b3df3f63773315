//! Conformance tests of the Rally simulator, over real HTTP on loopback.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::*;
use crate::sim::common::FaultConfig;

const KEY: &str = "rally-test-key";

/// Rally's documented create example.
fn doc_create_body() -> Value {
    json!({
        "name": "Acme Corporation",
        "domain": "acme.com",
        "industry": "Technology",
        "employeeCount": 250,
        "annualRevenue": 45000000,
        "website": "https://acme.com",
        "city": "San Francisco",
        "state": "CA",
        "country": "US"
    })
}

/// Rally's documented upsert example.
fn doc_upsert_body() -> Value {
    json!({
        "name": "Acme Corporation",
        "domain": "acme.com",
        "industry": "Technology",
        "employeeCount": 300
    })
}

/// A simulator with `n` seeded companies and no rate limit.
async fn sim_with(n: usize) -> RallySim {
    sim_cfg(RallySimConfig {
        seed_indices: (0..n).collect(),
        rate_limit_rps: 0,
        ..Default::default()
    })
    .await
}

async fn sim_cfg(cfg: RallySimConfig) -> RallySim {
    RallySim::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .expect("simulator starts")
}

/// Sends one request with the right key; answers the status and the parsed body
/// (`Value::Null` for an empty body).
async fn call(
    sim: &RallySim,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let resp = send(sim, method.clone(), path, body, Some(KEY)).await;
    let status = resp.status();
    let bytes = resp.bytes().await.expect("body reads");
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {bytes:?}"))
    };
    (status, value)
}

async fn send(
    sim: &RallySim,
    method: Method,
    path: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", sim.base_url()));
    if let Some(k) = key {
        req = req.header("X-Api-Key", k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.expect("request is answered")
}

async fn list(sim: &RallySim, query: &str) -> Vec<Value> {
    let (status, body) = call(sim, Method::GET, &format!("/api/v1/companies{query}"), None).await;
    assert_eq!(status, StatusCode::OK, "list{query}: {body}");
    match body {
        Value::Array(rows) => rows,
        other => panic!("list{query} did not answer a bare array: {other}"),
    }
}

fn ids(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn is_wire_time(v: &Value) -> bool {
    // 2025-02-01T10:00:00.000Z
    v.as_str().is_some_and(|s| {
        s.len() == 24 && s.ends_with('Z') && s.as_bytes()[19] == b'.' && parse_since_ok(s)
    })
}

fn parse_since_ok(s: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

#[tokio::test]
async fn list_answers_a_bare_array_of_complete_company_responses_25_by_default() {
    let sim = sim_with(40).await;
    let rows = list(&sim, "").await;
    assert_eq!(rows.len(), DEFAULT_LIMIT);
    for row in &rows {
        let obj = row.as_object().unwrap();
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        assert_eq!(keys, store::RESPONSE_FIELDS.to_vec(), "row {row}");
        assert_eq!(row["tenantId"], TENANT_ID);
        assert!(
            uuid::Uuid::parse_str(row["id"].as_str().unwrap()).is_ok(),
            "{row}"
        );
        assert!(
            is_wire_time(&row["createdAt"]) && is_wire_time(&row["updatedAt"]),
            "{row}"
        );
        assert!(row["annualRevenue"].is_number(), "{row}");
        assert!(row["tags"].is_array(), "{row}");
    }
}

#[tokio::test]
async fn limit_above_max_page_is_cut_down_silently() {
    let sim = sim_cfg(RallySimConfig {
        seed_indices: (0..30).collect(),
        rate_limit_rps: 0,
        max_page: 10,
        ..Default::default()
    })
    .await;
    assert_eq!(list(&sim, "?limit=500").await.len(), 10);
    assert_eq!(list(&sim, "?limit=3").await.len(), 3);
}

#[tokio::test]
async fn invalid_limit_or_offset_is_400() {
    let sim = sim_with(3).await;
    for q in ["?limit=0", "?limit=abc", "?offset=-1"] {
        let (status, body) = call(&sim, Method::GET, &format!("/api/v1/companies{q}"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}: {body}");
        assert!(body["error"].is_string(), "{q}: {body}");
    }
}

#[tokio::test]
async fn offset_paging_visits_every_row_once_when_nothing_changes() {
    let sim = sim_with(57).await;
    let mut seen = Vec::new();
    for offset in (0..).step_by(10) {
        let page = list(&sim, &format!("?limit=10&offset={offset}")).await;
        seen.extend(ids(&page));
        if page.len() < 10 {
            break;
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (57, 57));
}

#[tokio::test]
async fn list_order_is_by_creation_not_by_update() {
    let sim = sim_with(5).await;
    let before = ids(&list(&sim, "").await);
    sim.update(&before[0], json!({"industry": "Touched"}))
        .unwrap();
    let after = ids(&list(&sim, "").await);
    assert_eq!(before, after, "an update moved a row");
}

#[tokio::test]
async fn offset_paging_skips_a_row_when_an_earlier_row_is_deleted_between_pages() {
    let sim = sim_with(20).await;
    let all = ids(&list(&sim, "?limit=100").await);
    let first = ids(&list(&sim, "?limit=10&offset=0").await);
    assert!(sim.delete(&first[3]), "delete {}", first[3]);
    let second = ids(&list(&sim, "?limit=10&offset=10").await);
    // Row 10 moved into the first page's range and is never seen by this scan.
    assert_eq!(second[0], all[11], "second page should start one row later");
    assert!(!first.contains(&all[10]) && !second.contains(&all[10]));
}

#[tokio::test]
async fn updated_since_is_inclusive_to_the_millisecond() {
    let sim = sim_with(10).await;
    let rec = sim.create(json!({"name": "Edge Co", "domain": "edge.example"}));
    let at = rec["updatedAt"].as_str().unwrap().to_string();
    let at_ms = chrono::DateTime::parse_from_rfc3339(&at).unwrap();
    let same = list(&sim, &format!("?updatedSince={at}")).await;
    assert_eq!(ids(&same), vec![rec["id"].as_str().unwrap().to_string()]);
    let later = (at_ms + chrono::Duration::milliseconds(1)).to_rfc3339();
    let later = list(&sim, &format!("?updatedSince={}", urlencode(&later))).await;
    assert!(later.is_empty(), "{later:?}");
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn updated_since_accepts_offsets_and_fractional_seconds() {
    let sim = sim_with(0).await;
    let rec = sim.create(json!({"name": "Zone Co"}));
    let t = chrono::DateTime::parse_from_rfc3339(rec["updatedAt"].as_str().unwrap()).unwrap();
    let ist = chrono::FixedOffset::east_opt(5 * 3600 + 1800).unwrap();
    let west = chrono::FixedOffset::west_opt(7 * 3600).unwrap();
    for since in [
        t.with_timezone(&ist).to_rfc3339(),
        t.with_timezone(&west).to_rfc3339(),
        t.with_timezone(&chrono::Utc)
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string(),
    ] {
        assert_eq!(
            list(&sim, &format!("?updatedSince={}", urlencode(&since)))
                .await
                .len(),
            1,
            "{since}"
        );
    }
    let just_after = (t + chrono::Duration::microseconds(500)).to_rfc3339();
    assert!(
        list(&sim, &format!("?updatedSince={}", urlencode(&just_after)))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn updated_since_that_is_not_a_date_is_400() {
    let sim = sim_with(1).await;
    let (status, body) = call(
        &sim,
        Method::GET,
        "/api/v1/companies?updatedSince=yesterday",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn fields_projects_rows_to_the_named_fields_and_id() {
    let sim = sim_with(3).await;
    let rows = list(&sim, "?fields=name,updatedAt,nonsense").await;
    assert_eq!(rows.len(), 3);
    for row in rows {
        let keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, vec!["id", "name", "updatedAt"], "{row}");
    }
}

#[tokio::test]
async fn create_of_the_documented_example_answers_201_with_the_record() {
    let sim = sim_with(0).await;
    let (status, rec) = call(
        &sim,
        Method::POST,
        "/api/v1/companies",
        Some(doc_create_body()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["name"], "Acme Corporation");
    assert_eq!(rec["annualRevenue"].to_string(), "45000000");
    assert_eq!(rec["employeeCount"], 250);
    assert_eq!(rec["notes"], Value::Null);
    assert_eq!(rec["tags"], json!([]));
    assert_eq!(rec["createdAt"], rec["updatedAt"]);
    let id = rec["id"].as_str().unwrap();
    assert_eq!(sim.get(id), Some(rec.clone()));
}

#[tokio::test]
async fn annual_revenue_round_trips_exactly() {
    let sim = sim_with(0).await;
    let body: Value =
        serde_json::from_str(r#"{"name": "Big", "annualRevenue": 12345678901234567.89}"#).unwrap();
    let (status, rec) = call(&sim, Method::POST, "/api/v1/companies", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["annualRevenue"].to_string(), "12345678901234567.89");
}

#[tokio::test]
async fn create_without_a_name_is_400() {
    let sim = sim_with(0).await;
    for body in [
        json!({"domain": "x.com"}),
        json!({"name": ""}),
        json!({"name": null}),
    ] {
        let (status, err) = call(&sim, Method::POST, "/api/v1/companies", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
        assert_eq!(err["error"], "Company name is required", "{body}");
    }
}

#[tokio::test]
async fn wrong_field_types_are_400() {
    let sim = sim_with(0).await;
    for body in [
        json!({"name": "A", "employeeCount": "abc"}),
        json!({"name": "A", "employeeCount": 1.5}),
        json!({"name": "A", "annualRevenue": "45000000"}),
        json!({"name": "A", "tags": "vip"}),
        json!({"name": "A", "ownerId": "not-a-guid"}),
        json!({"name": 7}),
        json!(["not", "an", "object"]),
    ] {
        let (status, err) = call(&sim, Method::POST, "/api/v1/companies", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
        assert!(err["error"].is_string(), "{body}: {err}");
    }
    assert!(sim.dump().is_empty(), "a refused create stored something");
}

#[tokio::test]
async fn unknown_keys_in_a_body_are_ignored() {
    let sim = sim_with(0).await;
    let body = json!({"name": "A", "id": "ignored", "favouriteColour": "teal"});
    let (status, rec) = call(&sim, Method::POST, "/api/v1/companies", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{rec}");
    assert!(
        rec.get("favouriteColour").is_none() && rec["id"] != "ignored",
        "{rec}"
    );
}

#[tokio::test]
async fn create_with_a_taken_domain_is_409_case_insensitively() {
    let sim = sim_with(0).await;
    sim.create(doc_create_body());
    let mut dup = doc_create_body();
    dup["domain"] = json!("ACME.com");
    let (status, err) = call(&sim, Method::POST, "/api/v1/companies", Some(dup)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert_eq!(sim.dump().len(), 1);
}

#[tokio::test]
async fn get_by_id_answers_the_record_404_when_missing_400_when_not_a_guid() {
    let sim = sim_with(2).await;
    let id = ids(&list(&sim, "").await)[1].clone();
    let (status, rec) = call(&sim, Method::GET, &format!("/api/v1/companies/{id}"), None).await;
    assert_eq!(
        (status, rec["id"].as_str()),
        (StatusCode::OK, Some(id.as_str()))
    );
    let missing = uuid::Uuid::new_v4();
    let (status, err) = call(
        &sim,
        Method::GET,
        &format!("/api/v1/companies/{missing}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    let (status, err) = call(&sim, Method::GET, "/api/v1/companies/42", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
}

#[tokio::test]
async fn put_changes_only_the_keys_sent_and_bumps_updated_at() {
    let sim = sim_with(0).await;
    let rec = sim.create(doc_create_body());
    let id = rec["id"].as_str().unwrap();
    let patch = json!({"employeeCount": 300, "city": null});
    let (status, after) = call(
        &sim,
        Method::PUT,
        &format!("/api/v1/companies/{id}"),
        Some(patch),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after["employeeCount"], 300);
    assert_eq!(after["city"], Value::Null);
    assert_eq!(after["industry"], "Technology", "an unsent key changed");
    assert_eq!(after["createdAt"], rec["createdAt"]);
    assert!(
        after["updatedAt"].as_str() > rec["updatedAt"].as_str(),
        "{rec} -> {after}"
    );
}

#[tokio::test]
async fn put_to_a_missing_id_is_404_and_to_a_taken_domain_409() {
    let sim = sim_with(0).await;
    let a = sim.create(json!({"name": "A", "domain": "a.com"}));
    sim.create(json!({"name": "B", "domain": "b.com"}));
    let missing = uuid::Uuid::new_v4();
    let (status, _) = call(
        &sim,
        Method::PUT,
        &format!("/api/v1/companies/{missing}"),
        Some(json!({"name": "X"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let path = format!("/api/v1/companies/{}", a["id"].as_str().unwrap());
    let (status, err) = call(&sim, Method::PUT, &path, Some(json!({"domain": "B.COM"}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    let (status, _) = call(&sim, Method::PUT, &path, Some(json!({"domain": "A.com"}))).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "re-casing one's own domain is no conflict"
    );
}

#[tokio::test]
async fn delete_answers_204_then_404() {
    let sim = sim_with(3).await;
    let id = ids(&list(&sim, "").await)[0].clone();
    let path = format!("/api/v1/companies/{id}");
    let (status, body) = call(&sim, Method::DELETE, &path, None).await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    let (status, _) = call(&sim, Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(list(&sim, "").await.len(), 2);
}

#[tokio::test]
async fn upsert_creates_then_updates_the_company_matched_by_domain() {
    let sim = sim_with(0).await;
    let (status, first) = call(
        &sim,
        Method::PUT,
        "/api/v1/companies/upsert",
        Some(doc_upsert_body()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["action"], "created");
    let mut again = doc_upsert_body();
    again["domain"] = json!("Acme.COM");
    again["employeeCount"] = json!(310);
    let (status, second) = call(&sim, Method::PUT, "/api/v1/companies/upsert", Some(again)).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second, json!({"action": "updated", "id": first["id"]}));
    let rec = sim.get(first["id"].as_str().unwrap()).unwrap();
    assert_eq!(rec["employeeCount"], 310);
    assert_eq!(sim.dump().len(), 1);
}

#[tokio::test]
async fn upsert_without_a_domain_is_400() {
    let sim = sim_with(0).await;
    let (status, err) = call(
        &sim,
        Method::PUT,
        "/api/v1/companies/upsert",
        Some(json!({"name": "A"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
}

#[tokio::test]
async fn bulk_upserts_by_domain_and_reports_errors_by_index() {
    let sim = sim_with(0).await;
    let existing = sim.create(json!({"name": "Old", "domain": "old.com"}));
    let body = json!([
        {"name": "New One", "domain": "one.com"},
        {"name": "Old Renamed", "domain": "OLD.com"},
        {"domain": "nameless.com"},
        {"name": "No Domain"},
        {"name": "Bad", "employeeCount": "abc"},
    ]);
    let (status, out) = call(&sim, Method::POST, "/api/v1/companies/bulk", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(
        (
            out["created"].clone(),
            out["updated"].clone(),
            out["failed"].clone()
        ),
        (json!(2), json!(1), json!(2)),
        "{out}"
    );
    assert_eq!(out["createdIds"].as_array().unwrap().len(), 2, "{out}");
    assert_eq!(
        out["errors"][0],
        json!({"index": 2, "error": "Company name is required"})
    );
    assert_eq!(out["errors"][1]["index"], 4, "{out}");
    let old = sim.get(existing["id"].as_str().unwrap()).unwrap();
    assert_eq!(old["name"], "Old Renamed");
}

#[tokio::test]
async fn bulk_writes_share_one_updated_at() {
    let sim = sim_with(0).await;
    let body = json!([{"name": "A"}, {"name": "B"}, {"name": "C"}]);
    let (_, out) = call(&sim, Method::POST, "/api/v1/companies/bulk", Some(body)).await;
    let stamps: Vec<Value> = out["createdIds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| sim.get(id.as_str().unwrap()).unwrap()["updatedAt"].clone())
        .collect();
    assert!(
        stamps.len() == 3 && stamps.iter().all(|s| *s == stamps[0]),
        "{stamps:?}"
    );
}

#[tokio::test]
async fn bulk_of_more_than_100_is_400_and_writes_nothing() {
    let sim = sim_with(0).await;
    let body = Value::Array((0..101).map(|i| json!({"name": format!("C{i}")})).collect());
    let (status, err) = call(&sim, Method::POST, "/api/v1/companies/bulk", Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(sim.dump().is_empty());
}

#[tokio::test]
async fn separate_writes_never_share_an_updated_at() {
    let sim = sim_with(0).await;
    let stamps: Vec<String> = (0..50)
        .map(|i| {
            sim.create(json!({"name": format!("C{i}")}))["updatedAt"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
}

#[tokio::test]
async fn a_missing_or_wrong_api_key_is_401_without_echoing_it() {
    let sim = sim_with(1).await;
    for key in [None, Some("rk_live_wrong")] {
        let resp = send(&sim, Method::GET, "/api/v1/companies", None, key).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "key {key:?}");
        let body: Value = resp.json().await.unwrap();
        assert!(
            body["error"].is_string() && !body.to_string().contains("rk_live"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn requests_over_the_rate_limit_get_429_with_retry_after() {
    let sim = sim_cfg(RallySimConfig {
        seed_indices: vec![0],
        rate_limit_rps: 2,
        ..Default::default()
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            send(&sim, Method::GET, "/api/v1/companies", None, Some(KEY))
                .await
                .status(),
            StatusCode::OK
        );
    }
    let resp = send(&sim, Method::GET, "/api/v1/companies", None, Some(KEY)).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry = resp.headers()["retry-after"].to_str().unwrap().to_string();
    assert_eq!(retry, "1");
    assert_eq!(sim.stats().rejections.get("429"), Some(&1));
    assert_eq!(sim.stats().requests.get("GET /api/v1/companies"), Some(&3));
}

#[tokio::test]
async fn raising_the_rate_limit_takes_effect_at_once() {
    let sim = sim_cfg(RallySimConfig {
        seed_indices: vec![0],
        rate_limit_rps: 1,
        ..Default::default()
    })
    .await;
    send(&sim, Method::GET, "/api/v1/companies", None, Some(KEY)).await;
    sim.set_rate_limit(0);
    for _ in 0..5 {
        assert_eq!(
            send(&sim, Method::GET, "/api/v1/companies", None, Some(KEY))
                .await
                .status(),
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn server_error_fault_answers_5xx_json() {
    let sim = sim_with(1).await;
    sim.faults().set(FaultConfig {
        server_error: 1.0,
        ..Default::default()
    });
    let resp = send(&sim, Method::GET, "/api/v1/companies", None, Some(KEY)).await;
    assert!(
        matches!(resp.status().as_u16(), 500 | 503),
        "{}",
        resp.status()
    );
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(sim.stats().faults, 1);
}

#[tokio::test]
async fn slow_fault_outlasts_a_client_timeout() {
    let sim = sim_with(1).await;
    sim.faults().set(FaultConfig {
        slow: 1.0,
        slow_by: Duration::from_millis(800),
        ..Default::default()
    });
    let err = reqwest::Client::new()
        .get(format!("{}/api/v1/companies", sim.base_url()))
        .header("X-Api-Key", KEY)
        .timeout(Duration::from_millis(100))
        .send()
        .await
        .expect_err("the answer comes after the timeout");
    assert!(err.is_timeout(), "{err}");
}

#[tokio::test]
async fn malformed_fault_answers_200_with_broken_json() {
    let sim = sim_with(3).await;
    sim.faults().set(FaultConfig {
        malformed: 1.0,
        ..Default::default()
    });
    let resp = send(&sim, Method::GET, "/api/v1/companies", None, Some(KEY)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.bytes().await.unwrap();
    assert!(!bytes.is_empty());
    assert!(
        serde_json::from_slice::<Value>(&bytes).is_err(),
        "{bytes:?}"
    );
}

#[tokio::test]
async fn drop_fault_breaks_the_connection_mid_body() {
    let sim = sim_with(3).await;
    sim.faults().set(FaultConfig {
        drop_connection: 1.0,
        ..Default::default()
    });
    let resp = send(&sim, Method::GET, "/api/v1/companies", None, Some(KEY)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.bytes().await;
    assert!(body.is_err(), "the body arrived whole: {body:?}");
}

#[tokio::test]
async fn a_write_whose_answer_is_dropped_still_happened() {
    let sim = sim_with(0).await;
    sim.faults().set(FaultConfig {
        drop_connection: 1.0,
        ..Default::default()
    });
    let resp = send(
        &sim,
        Method::POST,
        "/api/v1/companies",
        Some(doc_create_body()),
        Some(KEY),
    )
    .await;
    assert!(resp.bytes().await.is_err());
    assert_eq!(sim.dump().len(), 1, "the create was not applied");
}

#[tokio::test]
async fn stats_count_requests_per_endpoint_and_concurrency() {
    let sim = sim_with(2).await;
    let id = ids(&list(&sim, "").await)[0].clone();
    sim.reset_stats();
    sim.faults().set(FaultConfig {
        extra_latency: Duration::from_millis(100),
        ..Default::default()
    });
    let path = format!("/api/v1/companies/{id}");
    let (a, b, c) = tokio::join!(
        call(&sim, Method::GET, &path, None),
        call(&sim, Method::GET, &path, None),
        call(&sim, Method::GET, "/api/v1/companies", None),
    );
    assert_eq!(
        (a.0, b.0, c.0),
        (StatusCode::OK, StatusCode::OK, StatusCode::OK)
    );
    let stats = sim.stats();
    assert_eq!(
        stats.requests.get("GET /api/v1/companies/{id}"),
        Some(&2),
        "{stats:?}"
    );
    assert_eq!(
        stats.requests.get("GET /api/v1/companies"),
        Some(&1),
        "{stats:?}"
    );
    assert_eq!(stats.max_in_flight, 3, "{stats:?}");
}

#[tokio::test]
async fn mutations_are_visible_through_the_api() {
    let sim = sim_with(30).await;
    let before = sim.dump();
    let changes = sim.mutate_random(40);
    assert_eq!(changes.len(), 40);
    let live: Vec<String> = ids(&list(&sim, "?limit=100").await);
    for change in &changes {
        match change {
            Mutation::Created(id) | Mutation::Updated(id) => {
                let deleted_later = changes.iter().any(|c| *c == Mutation::Deleted(id.clone()));
                assert!(deleted_later || live.contains(id), "{change:?} not listed");
            }
            Mutation::Deleted(id) => assert!(!live.contains(id), "{change:?} still listed"),
        }
    }
    let kinds = |f: fn(&Mutation) -> bool| changes.iter().filter(|c| f(c)).count();
    assert!(
        kinds(|c| matches!(c, Mutation::Created(_))) > 0,
        "{changes:?}"
    );
    assert!(
        kinds(|c| matches!(c, Mutation::Updated(_))) > 0,
        "{changes:?}"
    );
    assert!(
        kinds(|c| matches!(c, Mutation::Deleted(_))) > 0,
        "{changes:?}"
    );
    assert_ne!(before, sim.dump());
}

#[tokio::test]
async fn same_seed_mutates_the_same_way() {
    let (a, b) = (sim_with(20).await, sim_with(20).await);
    assert_eq!(a.mutate_random(25), b.mutate_random(25));
}

#[tokio::test]
async fn background_mutator_runs_until_stopped() {
    let sim = sim_with(10).await;
    let started = std::time::Instant::now();
    let handle = sim.spawn_mutator(200.0);
    // Real time is the behaviour under test: ~20 changes in 100 ms at 200/s.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let made = handle.stop().await;
    let ceiling = started.elapsed().as_secs_f64() * 200.0 + 2.0;
    assert!(
        made >= 1 && made as f64 <= ceiling,
        "made {made} changes, at most {ceiling} allowed at 200/s"
    );
    let snapshot = sim.dump();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(snapshot, sim.dump(), "changes continued after stop");
}

#[tokio::test]
async fn variants_change_some_values_but_never_domains() {
    let plain = sim_with(50).await;
    let other = sim_cfg(RallySimConfig {
        seed_indices: (0..50).collect(),
        rate_limit_rps: 0,
        variant: 1,
        ..Default::default()
    })
    .await;
    let (a, b) = (plain.dump(), other.dump());
    let by_domain = |rows: &[Value]| {
        let mut m: Vec<(String, Value)> = rows
            .iter()
            .map(|r| (r["domain"].as_str().unwrap().to_string(), r.clone()))
            .collect();
        m.sort_by(|x, y| x.0.cmp(&y.0));
        m
    };
    let (a, b) = (by_domain(&a), by_domain(&b));
    assert_eq!(
        a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        b.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    let differing = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.1["industry"] != y.1["industry"] || x.1["phone"] != y.1["phone"])
        .count();
    assert!((5..50).contains(&differing), "{differing} of 50 differ");
}

#[tokio::test]
async fn dump_is_sorted_by_id() {
    let sim = sim_with(25).await;
    let dumped = ids(&sim.dump());
    let mut sorted = dumped.clone();
    sorted.sort();
    assert_eq!(dumped, sorted);
}

#[tokio::test]
async fn a_hundred_thousand_companies_answer_a_deep_filtered_page() {
    let sim = sim_with(100_000).await;
    let deep = list(&sim, "?limit=100&offset=99900").await;
    assert_eq!(deep.len(), 100);
    // Seeds share updatedAt in import batches; the last batch starts at index 99_800.
    let last_batch = list(
        &sim,
        "?limit=100&offset=100&updatedSince=2024-06-01T08:19:00Z",
    )
    .await;
    assert_eq!(
        last_batch.len(),
        100,
        "second page of the last import batch"
    );
}

/// Rally's documented list example, one row.
const DOC_LIST_EXAMPLE: &str = r#"[{"id": "b5c7e1a2-3d4f-5678-9abc-def012345678",
 "tenantId": "3fa85f64-5717-4562-b3fc-2c963f66afa6", "name": "Acme Corporation",
 "domain": "acme.com", "industry": "Technology",
 "description": "Enterprise software solutions provider", "employeeCount": 250,
 "annualRevenue": 45000000, "phone": "+1-555-0100", "website": "https://acme.com",
 "linkedInUrl": "https://linkedin.com/company/acme", "address": "100 Market Street",
 "city": "San Francisco", "state": "CA", "country": "US", "postalCode": "94105",
 "tags": ["enterprise", "technology"], "notes": null,
 "ownerId": "e4d909c2-90d0-4b2b-88c5-8e9a0fa1e4b1",
 "createdAt": "2025-02-01T10:00:00Z", "updatedAt": "2025-06-12T08:45:00Z"}]"#;

/// Rally's documented bulk response.
const DOC_BULK_EXAMPLE: &str = r#"{"created": 2, "updated": 0, "failed": 1,
 "createdIds": ["b5c7e1a2-3d4f-5678-9abc-def012345678", "c6d8f2b3-4e5a-6789-bcde-f01234567890"],
 "errors": [{"index": 2, "error": "Company name is required"}]}"#;

fn keys(v: &Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[tokio::test]
async fn rows_have_the_documented_fields_in_the_documented_order() {
    let doc: Value = serde_json::from_str(DOC_LIST_EXAMPLE).unwrap();
    let sim = sim_with(0).await;
    // Create the documented record itself and read it back through the list.
    let rec = sim.create(doc[0].clone());
    let rows = list(&sim, "").await;
    assert_eq!(keys(&rows[0]), keys(&doc[0]));
    for field in [
        "name",
        "domain",
        "description",
        "employeeCount",
        "annualRevenue",
        "phone",
        "linkedInUrl",
        "postalCode",
        "tags",
        "notes",
        "ownerId",
        "tenantId",
    ] {
        assert_eq!(rows[0][field], doc[0][field], "field {field}");
    }
    assert_ne!(
        rec["id"], doc[0]["id"],
        "the id in a create body must be ignored"
    );
}

#[tokio::test]
async fn bulk_answer_has_the_documented_shape() {
    let doc: Value = serde_json::from_str(DOC_BULK_EXAMPLE).unwrap();
    let sim = sim_with(0).await;
    let body = json!([{"name": "A"}, {"name": "B"}, {"domain": "c.com"}]);
    let (_, out) = call(&sim, Method::POST, "/api/v1/companies/bulk", Some(body)).await;
    assert_eq!(keys(&out), keys(&doc));
    assert_eq!(out["errors"], doc["errors"]);
    assert_eq!(
        (&out["created"], &out["updated"], &out["failed"]),
        (&doc["created"], &doc["updated"], &doc["failed"])
    );
}

#[tokio::test]
async fn updated_since_without_a_zone_is_taken_as_utc() {
    let sim = sim_with(400).await;
    // Seeds 200..399 were imported at 2024-06-01T00:01:00Z.
    let naive = list(
        &sim,
        "?limit=100&offset=100&updatedSince=2024-06-01T00:01:00",
    )
    .await;
    let zoned = list(
        &sim,
        "?limit=100&offset=100&updatedSince=2024-06-01T00:01:00Z",
    )
    .await;
    assert_eq!(ids(&naive), ids(&zoned));
    assert_eq!(naive.len(), 100);
    assert_eq!(
        list(&sim, "?limit=100&offset=200&updatedSince=2024-06-01")
            .await
            .len(),
        100
    );
}

#[tokio::test]
async fn query_parameter_and_field_names_are_case_insensitive() {
    let sim = sim_with(5).await;
    let rows = list(&sim, "?LIMIT=2&Fields=NAME").await;
    assert_eq!(rows.len(), 2);
    assert_eq!(keys(&rows[0]), vec!["id", "name"]);
}

#[tokio::test]
async fn an_unsupported_method_is_405_json() {
    let sim = sim_with(0).await;
    let (status, body) = call(&sim, Method::GET, "/api/v1/companies/upsert", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    assert!(body["error"].is_string(), "{body}");
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let sim = sim_with(1).await;
    let url = format!("{}/api/v1/companies", sim.base_url());
    assert_eq!(list(&sim, "").await.len(), 1);
    sim.shutdown().await;
    let after = reqwest::Client::new()
        .get(&url)
        .header("X-Api-Key", KEY)
        .send()
        .await;
    assert!(after.is_err(), "still answering after shutdown: {after:?}");
}

#[tokio::test]
async fn company_count_follows_creates_and_deletes() {
    let sim = sim_with(3).await;
    let first = ids(&list(&sim, "").await)[0].clone();
    sim.create(json!({"name": "New", "domain": "new.example.com"}));
    assert!(sim.delete(&first));
    assert_eq!(sim.company_count(), 3);
    assert_eq!(sim.company_count(), sim.dump().len());
}
