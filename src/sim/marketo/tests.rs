//! Wire tests of the Marketo simulator: real HTTP from reqwest to the sim on 127.0.0.1:0.

use std::time::Duration;

use serde_json::{Value, json};

use super::{MarketoSim, MarketoSimConfig, Mutation};
use crate::sim::common::FaultConfig;

fn cfg(n: usize) -> MarketoSimConfig {
    MarketoSimConfig {
        seed_indices: (0..n).collect(),
        ..MarketoSimConfig::default()
    }
}

async fn start(cfg: MarketoSimConfig) -> MarketoSim {
    MarketoSim::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .expect("sim starts")
}

/// A client plus a fresh token for `sim`.
struct Api<'a> {
    sim: &'a MarketoSim,
    http: reqwest::Client,
    token: String,
}

impl<'a> Api<'a> {
    async fn new(sim: &'a MarketoSim) -> Api<'a> {
        let http = reqwest::Client::new();
        let token = token_body(&http, sim).await["access_token"]
            .as_str()
            .expect("token issued")
            .to_string();
        Api { sim, http, token }
    }

    async fn get(&self, path_and_query: &str) -> Value {
        let resp = self
            .http
            .get(format!("{}{path_and_query}", self.sim.base_url()))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "GET {path_and_query}");
        resp.json().await.unwrap()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .post(format!("{}{path}", self.sim.base_url()))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "POST {path}");
        resp.json().await.unwrap()
    }

    async fn sync(&self, body: Value) -> Value {
        self.post("/rest/v1/companies.json", body).await
    }
}

async fn token_body(http: &reqwest::Client, sim: &MarketoSim) -> Value {
    http.get(format!(
        "{}/identity/oauth/token?grant_type=client_credentials&client_id=marketo-client&client_secret=marketo-secret",
        sim.base_url()
    ))
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap()
}

fn error_code(body: &Value) -> &str {
    assert_eq!(body["success"], false, "expected a failure: {body}");
    body["errors"][0]["code"].as_str().unwrap_or("")
}

fn reason(result: &Value) -> &str {
    assert_eq!(result["status"], "skipped", "expected skipped: {result}");
    result["reasons"][0]["code"].as_str().unwrap_or("")
}

fn ids(body: &Value) -> Vec<i64> {
    body["result"]
        .as_array()
        .unwrap_or_else(|| panic!("no result: {body}"))
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn token_is_reused_and_expires_in_counts_down() {
    let sim = start(cfg(1)).await;
    let http = reqwest::Client::new();
    let first = token_body(&http, &sim).await;
    assert_eq!(first["token_type"], "bearer");
    assert!(first["scope"].is_string(), "{first}");
    assert_eq!(first["expires_in"], 3599, "{first}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = token_body(&http, &sim).await;
    assert_eq!(first["access_token"], second["access_token"]);
    assert!(
        second["expires_in"].as_u64().unwrap() < 3599,
        "expires_in did not count down: {second}"
    );
}

#[tokio::test]
async fn token_is_issued_for_a_post_form_request_too() {
    let sim = start(cfg(1)).await;
    let body: Value = reqwest::Client::new()
        .post(format!("{}/identity/oauth/token", sim.base_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "marketo-client"),
            ("client_secret", "marketo-secret"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(body["access_token"].is_string(), "{body}");
}

#[tokio::test]
async fn bad_client_credentials_get_http_401_with_oauth_error() {
    let sim = start(cfg(1)).await;
    let resp = reqwest::Client::new()
        .get(format!(
            "{}/identity/oauth/token?grant_type=client_credentials&client_id=marketo-client&client_secret=wrong",
            sim.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized", "{body}");
    assert!(body["error_description"].is_string(), "{body}");
}

#[tokio::test]
async fn missing_or_unknown_token_is_601_as_http_200() {
    let sim = start(cfg(1)).await;
    let http = reqwest::Client::new();
    let url = format!("{}/rest/v1/companies/describe.json", sim.base_url());
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(error_code(&body), "601", "{body}");
    assert!(body["requestId"].as_str().unwrap().contains('#'), "{body}");
    let body: Value = http
        .get(&url)
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(error_code(&body), "601", "{body}");
}

#[tokio::test]
async fn expired_token_is_602_and_a_refreshed_token_works() {
    let sim = start(cfg(1)).await;
    let mut api = Api::new(&sim).await;
    sim.expire_tokens();
    let body = api.get("/rest/v1/companies/describe.json").await;
    assert_eq!(error_code(&body), "602", "{body}");
    let fresh = token_body(&api.http, &sim).await;
    assert_ne!(fresh["access_token"].as_str().unwrap(), api.token);
    api.token = fresh["access_token"].as_str().unwrap().to_string();
    let body = api.get("/rest/v1/companies/describe.json").await;
    assert_eq!(body["success"], true, "{body}");
}

#[tokio::test]
async fn deprecated_access_token_query_parameter_is_accepted() {
    let sim = start(cfg(1)).await;
    let api = Api::new(&sim).await;
    let body: Value = api
        .http
        .get(format!(
            "{}/rest/v1/companies/describe.json?access_token={}",
            sim.base_url(),
            api.token
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["success"], true, "{body}");
}

#[tokio::test]
async fn calls_over_the_rolling_window_get_606_until_it_rolls() {
    let sim = start(MarketoSimConfig {
        calls_per_window: 3,
        window: Duration::from_millis(300),
        ..cfg(1)
    })
    .await;
    let api = Api::new(&sim).await;
    for i in 0..3 {
        let body = api.get("/rest/v1/companies/describe.json").await;
        assert_eq!(body["success"], true, "call {i}: {body}");
    }
    let body = api.get("/rest/v1/companies/describe.json").await;
    assert_eq!(error_code(&body), "606", "{body}");
    assert_eq!(sim.stats().rejections.get("606"), Some(&1));
    tokio::time::sleep(Duration::from_millis(350)).await;
    let body = api.get("/rest/v1/companies/describe.json").await;
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(
        sim.calls_today(),
        5,
        "606 rejections count towards the quota"
    );
}

#[tokio::test]
async fn calls_beyond_the_concurrency_limit_get_615() {
    let sim = start(MarketoSimConfig {
        max_concurrent: 2,
        ..cfg(1)
    })
    .await;
    let api = Api::new(&sim).await;
    sim.faults().set(FaultConfig {
        extra_latency: Duration::from_millis(400),
        ..FaultConfig::default()
    });
    let calls = (0..5).map(|_| api.get("/rest/v1/companies/describe.json"));
    let bodies = futures::future::join_all(calls).await;
    let ok = bodies.iter().filter(|b| b["success"] == true).count();
    let rejected = bodies
        .iter()
        .filter(|b| b["success"] == false && b["errors"][0]["code"] == "615")
        .count();
    assert!(
        (1..=2).contains(&ok),
        "at most 2 admitted at once: {bodies:?}"
    );
    assert_eq!(ok + rejected, 5, "{bodies:?}");
    assert_eq!(sim.stats().rejections.get("615"), Some(&(rejected as u64)));
}

#[tokio::test]
async fn calls_beyond_the_daily_quota_get_607() {
    let sim = start(MarketoSimConfig {
        daily_quota: 2,
        ..cfg(1)
    })
    .await;
    let api = Api::new(&sim).await;
    for _ in 0..2 {
        assert_eq!(api.get("/rest/v1/stats/usage.json").await["success"], true);
    }
    let body = api.get("/rest/v1/stats/usage.json").await;
    assert_eq!(error_code(&body), "607", "{body}");
    assert_eq!(sim.calls_today(), 2, "607 answers do not count");
    sim.set_daily_quota(3);
    let body = api.get("/rest/v1/stats/usage.json").await;
    assert_eq!(body["result"][0]["total"], 3, "{body}");
    assert_eq!(body["result"][0]["users"][0]["count"], 3, "{body}");
}

#[tokio::test]
async fn identity_calls_do_not_count_against_the_quota() {
    let sim = start(cfg(1)).await;
    let http = reqwest::Client::new();
    for _ in 0..3 {
        token_body(&http, &sim).await;
    }
    assert_eq!(sim.calls_today(), 0);
}

#[tokio::test]
async fn describe_reports_id_dedupe_and_searchable_fields() {
    let sim = start(cfg(1)).await;
    let body = Api::new(&sim)
        .await
        .get("/rest/v1/companies/describe.json")
        .await;
    let d = &body["result"][0];
    assert_eq!(d["name"], "Company");
    assert_eq!(d["idField"], "id");
    assert_eq!(d["dedupeFields"], json!(["externalCompanyId"]));
    assert_eq!(
        d["searchableFields"],
        json!([["externalCompanyId"], ["id"], ["company"]])
    );
    let field = |name: &str| {
        d["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no field {name} in {d}"))
    };
    // The document's own entries, verbatim.
    assert_eq!(
        field("externalCompanyId"),
        json!({"name":"externalCompanyId","displayName":"External Company Id","dataType":"string","length":100,"updateable":false})
    );
    assert_eq!(
        field("annualRevenue"),
        json!({"name":"annualRevenue","displayName":"Annual Revenue","dataType":"currency","updateable":true})
    );
    assert_eq!(field("numberOfEmployees")["dataType"], "integer");
    assert!(
        d["fields"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["name"] != "site"),
        "this instance has no 'site': {d}"
    );
}

#[tokio::test]
async fn query_by_id_pages_with_next_page_token() {
    let sim = start(cfg(5)).await;
    let api = Api::new(&sim).await;
    let base = "/rest/v1/companies.json?filterType=id&filterValues=1000,1001,1002,1003,1004,999999&batchSize=2";
    let mut got = Vec::new();
    let mut url = base.to_string();
    let mut pages = 0;
    loop {
        let body = api.get(&url).await;
        assert_eq!(body["success"], true, "{body}");
        let seqs: Vec<_> = body["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "{body}");
        got.extend(ids(&body));
        pages += 1;
        match body["nextPageToken"].as_str() {
            Some(t) => url = format!("{base}&nextPageToken={t}"),
            None => break,
        }
    }
    assert_eq!(got, vec![1000, 1001, 1002, 1003, 1004]);
    assert_eq!(pages, 3);
}

#[tokio::test]
async fn query_returns_default_fields_and_omits_nulls() {
    let sim = start(cfg(3)).await;
    let api = Api::new(&sim).await;
    // Index 0 has no externalCompanyId (about a third of the seeds lack one).
    let body = api
        .get("/rest/v1/companies.json?filterType=id&filterValues=1000,1001")
        .await;
    let r = body["result"].as_array().unwrap();
    let keys0: Vec<_> = r[0].as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys0, ["seq", "id", "updatedAt", "createdAt"], "{body}");
    assert_eq!(r[1]["externalCompanyId"], "EXT-1", "{body}");
    let ts = r[1]["updatedAt"].as_str().unwrap();
    assert!(
        ts.ends_with('Z') && ts.len() == 20,
        "whole-second UTC: {ts}"
    );
}

#[tokio::test]
async fn query_by_external_id_and_by_exact_company_name() {
    let sim = start(cfg(5)).await;
    let api = Api::new(&sim).await;
    let body = api
        .get("/rest/v1/companies.json?filterType=externalCompanyId&filterValues=EXT-2,EXT-4,EXT-404&fields=company,externalCompanyId")
        .await;
    assert_eq!(ids(&body), vec![1002, 1004], "{body}");
    let name = sim.get(1003).unwrap()["company"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!(
        "/rest/v1/companies.json?filterType=company&filterValues={}&fields=company,annualRevenue",
        url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()
    );
    let body = api.get(&url).await;
    assert_eq!(ids(&body), vec![1003], "{body}");
    assert_eq!(body["result"][0]["company"], name.as_str());
    assert_eq!(
        body["result"][0]["annualRevenue"],
        sim.get(1003).unwrap()["annualRevenue"]
    );
}

#[tokio::test]
async fn query_refuses_bad_filter_type_fields_and_sizes() {
    let sim = start(cfg(1)).await;
    let api = Api::new(&sim).await;
    let body = api
        .get("/rest/v1/companies.json?filterType=updatedAt&filterValues=x")
        .await;
    assert_eq!(error_code(&body), "1003", "{body}");
    let many: Vec<String> = (0..301).map(|i| i.to_string()).collect();
    let body = api
        .get(&format!(
            "/rest/v1/companies.json?filterType=id&filterValues={}",
            many.join(",")
        ))
        .await;
    assert_eq!(error_code(&body), "1003", "{body}");
    let body = api
        .get("/rest/v1/companies.json?filterType=id&filterValues=1000&batchSize=301")
        .await;
    assert_eq!(error_code(&body), "1003", "{body}");
    let body = api
        .get("/rest/v1/companies.json?filterType=id&filterValues=1000&fields=company,site")
        .await;
    assert_eq!(error_code(&body), "1006", "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("site"),
        "{body}"
    );
}

#[tokio::test]
async fn query_as_post_with_method_get_reads_the_form_body() {
    let sim = start(cfg(400)).await;
    let api = Api::new(&sim).await;
    let values: Vec<String> = (1000..1300).map(|i| i.to_string()).collect();
    let body: Value = api
        .http
        .post(format!(
            "{}/rest/v1/companies.json?_method=GET",
            sim.base_url()
        ))
        .bearer_auth(&api.token)
        .form(&[
            ("filterType", "id"),
            ("filterValues", values.join(",").as_str()),
            ("fields", "company"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&body).len(), 300, "{}", body["errors"]);
    assert!(body["nextPageToken"].is_null());
}

#[tokio::test]
async fn sync_create_or_update_matches_the_documented_example() {
    let sim = start(cfg(0)).await;
    let existing =
        sim.create(json!({"externalCompanyId": "19UYA31581L000000", "company": "Gogle"}));
    let api = Api::new(&sim).await;
    let body = api
        .sync(json!({
            "action": "createOrUpdate",
            "dedupeBy": "dedupeFields",
            "input": [
                {"externalCompanyId": "19UYA31581L000000", "company": "Google"},
                {"externalCompanyId": "29UYA31581L000000", "company": "Yahoo"}
            ]
        }))
        .await;
    assert_eq!(body["success"], true, "{body}");
    let r = &body["result"];
    assert_eq!(
        r[0],
        json!({"seq": 0, "status": "updated", "id": existing["id"]})
    );
    assert_eq!(r[1]["status"], "created", "{body}");
    let new_id = r[1]["id"].as_i64().unwrap();
    assert_eq!(sim.get(new_id).unwrap()["company"], "Yahoo");
    assert_eq!(
        sim.get(existing["id"].as_i64().unwrap()).unwrap()["company"],
        "Google"
    );
}

#[tokio::test]
async fn create_only_skips_existing_with_1005() {
    let sim = start(cfg(3)).await;
    let body = Api::new(&sim)
        .await
        .sync(json!({"action": "createOnly", "input": [{"externalCompanyId": "EXT-1", "company": "X"}]}))
        .await;
    assert_eq!(reason(&body["result"][0]), "1005", "{body}");
}

#[tokio::test]
async fn update_only_skips_missing_with_1013() {
    let sim = start(cfg(3)).await;
    let body = Api::new(&sim)
        .await
        .sync(json!({"action": "updateOnly", "input": [
            {"externalCompanyId": "EXT-404", "company": "X"},
            {"externalCompanyId": "EXT-2", "industry": "Retail"}
        ]}))
        .await;
    assert_eq!(reason(&body["result"][0]), "1013", "{body}");
    assert_eq!(body["result"][1]["status"], "updated", "{body}");
    assert_eq!(sim.get(1002).unwrap()["industry"], "Retail");
}

#[tokio::test]
async fn duplicate_external_id_in_one_batch_skips_the_second_with_1036() {
    let sim = start(cfg(0)).await;
    let body = Api::new(&sim)
        .await
        .sync(json!({"input": [
            {"externalCompanyId": "D-1", "company": "First"},
            {"externalCompanyId": "D-1", "company": "Second"}
        ]}))
        .await;
    assert_eq!(body["result"][0]["status"], "created", "{body}");
    assert_eq!(reason(&body["result"][1]), "1036", "{body}");
    assert_eq!(sim.dump().len(), 1);
    assert_eq!(sim.dump()[0]["company"], "First");
}

#[tokio::test]
async fn invalid_values_skip_with_1003_and_unknown_fields_with_1006() {
    let sim = start(cfg(3)).await;
    let body = Api::new(&sim)
        .await
        .sync(json!({"input": [
            {"externalCompanyId": "EXT-1", "numberOfEmployees": "many"},
            {"externalCompanyId": "EXT-1b", "annualRevenue": "lots"},
            {"externalCompanyId": "EXT-2", "site": "x"},
            {"company": "no key"}
        ]}))
        .await;
    let r = &body["result"];
    assert_eq!(reason(&r[0]), "1003", "{body}");
    assert_eq!(reason(&r[1]), "1003", "{body}");
    assert_eq!(reason(&r[2]), "1006", "{body}");
    assert_eq!(reason(&r[3]), "1003", "{body}");
}

#[tokio::test]
async fn read_only_instance_skips_every_write_with_1018() {
    let sim = start(MarketoSimConfig {
        read_only: true,
        ..cfg(3)
    })
    .await;
    let api = Api::new(&sim).await;
    let body = api
        .sync(json!({"input": [{"externalCompanyId": "EXT-1", "company": "X"}]}))
        .await;
    assert_eq!(reason(&body["result"][0]), "1018", "{body}");
    let body = api
        .post(
            "/rest/v1/companies/delete.json",
            json!({"input": [{"externalCompanyId": "EXT-1"}]}),
        )
        .await;
    assert_eq!(reason(&body["result"][0]), "1018", "{body}");
    assert_eq!(sim.dump().len(), 3);
}

#[tokio::test]
async fn id_field_dedupe_is_refused_with_create_only() {
    let sim = start(cfg(1)).await;
    let body = Api::new(&sim)
        .await
        .sync(json!({"action": "createOnly", "dedupeBy": "idField", "input": [{"id": 1000}]}))
        .await;
    assert_eq!(error_code(&body), "1003", "{body}");
}

#[tokio::test]
async fn sync_with_broken_json_is_609_and_without_json_content_type_is_612() {
    let sim = start(cfg(0)).await;
    let api = Api::new(&sim).await;
    let send = |ct: &'static str, body: &'static str| {
        api.http
            .post(format!("{}/rest/v1/companies.json", sim.base_url()))
            .bearer_auth(&api.token)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let body: Value = send("application/json", "{\"input\": [")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(error_code(&body), "609", "{body}");
    let body: Value = send("text/plain", "{\"input\": []}")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(error_code(&body), "612", "{body}");
}

#[tokio::test]
async fn sync_refuses_more_than_300_records() {
    let sim = start(cfg(0)).await;
    let input: Vec<Value> = (0..301)
        .map(|i| json!({"externalCompanyId": format!("B-{i}")}))
        .collect();
    let body = Api::new(&sim).await.sync(json!({"input": input})).await;
    assert_eq!(error_code(&body), "1003", "{body}");
    assert!(sim.dump().is_empty());
}

#[tokio::test]
async fn external_id_cannot_change_after_creation() {
    let sim = start(cfg(3)).await;
    let body = Api::new(&sim)
        .await
        .sync(json!({"dedupeBy": "idField", "input": [
            {"id": 1001, "externalCompanyId": "OTHER"},
            {"id": 1002, "externalCompanyId": "EXT-2", "company": "Same key"}
        ]}))
        .await;
    assert_eq!(reason(&body["result"][0]), "1003", "{body}");
    assert_eq!(body["result"][1]["status"], "updated", "{body}");
    assert_eq!(sim.get(1001).unwrap()["externalCompanyId"], "EXT-1");
}

#[tokio::test]
async fn null_and_empty_string_clear_a_field_and_writes_bump_updated_at() {
    let sim = start(cfg(3)).await;
    let before = sim.get(1001).unwrap();
    let body = Api::new(&sim)
        .await
        .sync(json!({"dedupeBy": "idField", "input": [{"id": 1001, "industry": null, "mainPhone": ""}]}))
        .await;
    assert_eq!(body["result"][0]["status"], "updated", "{body}");
    let after = sim.get(1001).unwrap();
    assert!(
        after.get("industry").is_none() && after.get("mainPhone").is_none(),
        "{after}"
    );
    assert_ne!(before["updatedAt"], after["updatedAt"]);
    assert_eq!(before["createdAt"], after["createdAt"]);
}

#[tokio::test]
async fn annual_revenue_round_trips_exactly() {
    let sim = start(cfg(0)).await;
    let api = Api::new(&sim).await;
    let body: Value = serde_json::from_str(
        r#"{"input":[{"externalCompanyId":"R-1","annualRevenue":12345678901234567.89}]}"#,
    )
    .unwrap();
    let id = api.sync(body).await["result"][0]["id"].as_i64().unwrap();
    let text = api
        .http
        .get(format!(
            "{}/rest/v1/companies.json?filterType=id&filterValues={id}&fields=annualRevenue",
            sim.base_url()
        ))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(r#""annualRevenue":12345678901234567.89"#),
        "{text}"
    );
}

#[tokio::test]
async fn delete_matches_the_documented_example() {
    let sim = start(cfg(0)).await;
    let a = sim.create(json!({"externalCompanyId": "19UYA31581L000000"}));
    let b = sim.create(json!({"externalCompanyId": "29UYA31581L000000"}));
    let body = Api::new(&sim)
        .await
        .post(
            "/rest/v1/companies/delete.json",
            json!({"deleteBy": "dedupeFields", "input": [
                {"externalCompanyId": "19UYA31581L000000"},
                {"externalCompanyId": "29UYA31581L000000"},
                {"externalCompanyId": "39UYA31581L000000"}
            ]}),
        )
        .await;
    assert_eq!(
        body["result"],
        json!([
            {"seq": 0, "id": a["id"], "status": "deleted"},
            {"seq": 1, "id": b["id"], "status": "deleted"},
            {"seq": 2, "status": "skipped", "reasons": [{"code": "1013", "message": "Record not found"}]}
        ])
    );
    assert!(sim.dump().is_empty());
}

#[tokio::test]
async fn delete_by_id_field_removes_the_record() {
    let sim = start(cfg(2)).await;
    let body = Api::new(&sim)
        .await
        .post(
            "/rest/v1/companies/delete.json",
            json!({"deleteBy": "idField", "input": [{"id": 1001}]}),
        )
        .await;
    assert_eq!(body["result"][0]["status"], "deleted", "{body}");
    assert!(sim.get(1001).is_none());
    assert!(sim.get(1000).is_some());
}

#[tokio::test]
async fn schema_fields_page_until_more_result_is_false() {
    let sim = start(cfg(0)).await;
    let api = Api::new(&sim).await;
    let mut names = Vec::new();
    let mut url = "/rest/v1/companies/schema/fields.json?batchSize=5".to_string();
    loop {
        let body = api.get(&url).await;
        let page = body["result"].as_array().unwrap();
        assert!(page.len() <= 5, "{body}");
        names.extend(page.iter().map(|f| f["name"].as_str().unwrap().to_string()));
        if body["moreResult"] == false {
            break;
        }
        let token = body["nextPageToken"].as_str().expect("token while more");
        assert!(token.ends_with('=') || token.len() % 8 == 0, "{token}");
        url = format!("/rest/v1/companies/schema/fields.json?batchSize=5&nextPageToken={token}");
    }
    assert_eq!(names.len(), super::FIELDS.len(), "{names:?}");
    assert!(names.contains(&"billingCity".to_string()));
}

#[tokio::test]
async fn schema_field_by_name_matches_the_documented_example_or_is_1006() {
    let sim = start(cfg(0)).await;
    let api = Api::new(&sim).await;
    let body = api
        .get("/rest/v1/companies/schema/fields/industry.json")
        .await;
    assert_eq!(
        body["result"][0],
        json!({"displayName":"Industry","name":"industry","description":null,"dataType":"string","length":255,
               "isHidden":false,"isHtmlEncodingInEmail":true,"isSensitive":false,"isCustom":false,"isApiCreated":false})
    );
    let body = api.get("/rest/v1/companies/schema/fields/site.json").await;
    assert_eq!(error_code(&body), "1006", "{body}");
}

#[tokio::test]
async fn oversized_body_is_http_413_and_long_uri_is_http_414() {
    let sim = start(cfg(0)).await;
    let api = Api::new(&sim).await;
    let big = "x".repeat(1024 * 1024 + 1);
    let resp = api
        .http
        .post(format!("{}/rest/v1/companies.json", sim.base_url()))
        .bearer_auth(&api.token)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let long = format!(
        "{}/rest/v1/companies.json?filterType=id&filterValues={}",
        sim.base_url(),
        "1,".repeat(4200)
    );
    let resp = api
        .http
        .get(long)
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 414);
}

#[tokio::test]
async fn server_error_fault_answers_5xx() {
    let sim = start(cfg(0)).await;
    let api = Api::new(&sim).await;
    sim.faults().set(FaultConfig {
        server_error: 1.0,
        ..FaultConfig::default()
    });
    let resp = api
        .http
        .get(format!("{}/rest/v1/stats/usage.json", sim.base_url()))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_server_error(), "{}", resp.status());
    assert_eq!(sim.stats().faults, 1);
}

#[tokio::test]
async fn malformed_fault_answers_200_with_broken_json() {
    let sim = start(cfg(1)).await;
    let api = Api::new(&sim).await;
    sim.faults().set(FaultConfig {
        malformed: 1.0,
        ..FaultConfig::default()
    });
    let resp = api
        .http
        .get(format!(
            "{}/rest/v1/companies/describe.json",
            sim.base_url()
        ))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
}

#[tokio::test]
async fn dropped_connection_fault_breaks_the_body_after_the_write_happened() {
    let sim = start(cfg(0)).await;
    let api = Api::new(&sim).await;
    sim.faults().set(FaultConfig {
        drop_connection: 1.0,
        ..FaultConfig::default()
    });
    let result = api
        .http
        .post(format!("{}/rest/v1/companies.json", sim.base_url()))
        .bearer_auth(&api.token)
        .json(&json!({"input": [{"externalCompanyId": "LOST-1"}]}))
        .send()
        .await;
    let body = match result {
        Ok(resp) => resp.bytes().await,
        Err(e) => Err(e),
    };
    assert!(body.is_err(), "expected a broken body, got {body:?}");
    assert_eq!(sim.dump().len(), 1, "the write itself went through");
}

#[tokio::test]
async fn slow_fault_outlasts_a_client_timeout() {
    let sim = start(cfg(0)).await;
    let api = Api::new(&sim).await;
    sim.faults().set(FaultConfig {
        slow: 1.0,
        slow_by: Duration::from_millis(500),
        ..FaultConfig::default()
    });
    let err = api
        .http
        .get(format!("{}/rest/v1/stats/usage.json", sim.base_url()))
        .bearer_auth(&api.token)
        .timeout(Duration::from_millis(100))
        .send()
        .await
        .expect_err("slow answer must time out");
    assert!(err.is_timeout(), "{err}");
}

#[tokio::test]
async fn extra_latency_delays_every_answer() {
    let sim = start(cfg(0)).await;
    let api = Api::new(&sim).await;
    sim.faults().set(FaultConfig {
        extra_latency: Duration::from_millis(150),
        ..FaultConfig::default()
    });
    let t = std::time::Instant::now();
    api.get("/rest/v1/stats/usage.json").await;
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn stats_count_requests_per_endpoint() {
    let sim = start(cfg(1)).await;
    let api = Api::new(&sim).await;
    api.get("/rest/v1/companies.json?filterType=id&filterValues=1000")
        .await;
    api.get("/rest/v1/companies/schema/fields/company.json")
        .await;
    let s = sim.stats();
    assert_eq!(
        s.requests.get("GET /rest/v1/companies.json"),
        Some(&1),
        "{s:?}"
    );
    assert_eq!(
        s.requests
            .get("GET /rest/v1/companies/schema/fields/{fieldApiName}.json"),
        Some(&1),
        "{s:?}"
    );
    assert_eq!(
        s.requests.get("GET /identity/oauth/token"),
        Some(&1),
        "{s:?}"
    );
    sim.reset_stats();
    assert_eq!(sim.stats().total_requests(), 0);
}

#[tokio::test]
async fn hundred_thousand_companies_answer_a_300_id_query() {
    let sim = start(cfg(100_000)).await;
    let api = Api::new(&sim).await;
    let values: Vec<String> = (100_000..100_300).map(|i| i.to_string()).collect();
    let body = api
        .get(&format!(
            "/rest/v1/companies.json?filterType=id&filterValues={}&fields=company",
            values.join(",")
        ))
        .await;
    assert_eq!(ids(&body).len(), 300, "{}", body["errors"]);
    let last = api
        .get("/rest/v1/companies.json?filterType=id&filterValues=100999,101000")
        .await;
    assert_eq!(ids(&last), vec![100_999], "ids run 1000..=100999: {last}");
}

#[tokio::test]
async fn seeding_is_deterministic_and_variant_perturbs_some_values() {
    let a = start(cfg(50)).await;
    let b = start(cfg(50)).await;
    assert_eq!(a.dump(), b.dump());
    let c = start(MarketoSimConfig {
        variant: 3,
        ..cfg(50)
    })
    .await;
    let differing = a
        .dump()
        .iter()
        .zip(c.dump())
        .filter(|(x, y)| **x != *y)
        .count();
    assert!(differing > 0 && differing < 50, "{differing} of 50 differ");
    let without_ext = a
        .dump()
        .iter()
        .filter(|r| r.get("externalCompanyId").is_none())
        .count();
    assert_eq!(
        without_ext, 17,
        "indices divisible by 3 have no externalCompanyId"
    );
}

#[tokio::test]
async fn mutate_random_changes_are_visible_through_the_api_helpers() {
    let sim = start(cfg(20)).await;
    let muts = sim.mutate_random(30);
    assert_eq!(muts.len(), 30);
    for m in muts {
        match m {
            Mutation::Created(id) | Mutation::Updated(id) => {
                // A later mutation may have deleted it; if present it must be readable.
                if let Some(r) = sim.get(id) {
                    assert_eq!(r["id"], id);
                }
            }
            Mutation::Deleted(id) => assert!(sim.get(id).is_none(), "{id} still there"),
        }
    }
}

#[tokio::test]
async fn spawned_mutator_changes_records_and_stops_on_drop() {
    let sim = start(cfg(20)).await;
    let before = sim.dump();
    let handle = sim.spawn_mutator(200.0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(handle);
    // Let a mutation already under way finish before taking the reference dump.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stopped = sim.dump();
    assert_ne!(before, stopped, "mutator made no change");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(stopped, sim.dump(), "mutator kept running after drop");
}

#[tokio::test]
async fn ui_update_bumps_updated_at_and_delete_removes() {
    let sim = start(cfg(2)).await;
    let before = sim.get(1001).unwrap();
    let after = sim.update(1001, json!({"industry": "Energy"})).unwrap();
    assert_eq!(after["industry"], "Energy");
    assert_ne!(before["updatedAt"], after["updatedAt"]);
    assert!(sim.update(9, json!({})).is_none());
    assert!(sim.delete(1001));
    assert!(!sim.delete(1001));
}

#[tokio::test]
async fn shutdown_stops_answering() {
    let sim = start(cfg(0)).await;
    let url = sim.base_url();
    sim.shutdown().await;
    let res = reqwest::Client::new()
        .get(format!("{url}/rest/v1/stats/usage.json"))
        .send()
        .await;
    assert!(res.is_err(), "{res:?}");
}

#[test]
fn config_debug_hides_the_secret() {
    let text = format!("{:?}", MarketoSimConfig::default());
    assert!(!text.contains("marketo-secret"), "{text}");
}

#[tokio::test]
async fn company_count_follows_creates_and_deletes() {
    let sim = start(cfg(3)).await;
    sim.create(json!({"externalCompanyId": "NEW-1", "company": "New"}));
    assert!(sim.delete(1001));
    assert_eq!(sim.company_count(), 3);
    assert_eq!(sim.company_count(), sim.dump().len());
}
