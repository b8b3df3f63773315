//! Malformed vendor payloads (`wiremock-fixtures/bad-input/<crm>/`) served by wiremock to
//! each connector's list/query endpoint and driven through the engine: a bad record is a
//! dead letter whose reason names the problem while the good records of its page are
//! stored and the cursor advances; a page that is garbage as a whole is a clear connector
//! error, stores nothing and leaves the cursor where it was. Nothing panics.

use std::sync::Arc;
use std::time::Duration;

use crmbridge::config::{
    AmoAuth, AmocrmConfig, CommonConnectorConfig, ConnectorConfig, Limits, MarketoConfig,
    RallyConfig, SecretRef, Timeouts,
};
use crmbridge::connector::{Cursor, PollMode};
use crmbridge::connectors::{BuildContext, build};
use crmbridge::daemon::metrics::Metrics;
use crmbridge::engine::{Endpoint, Engine, EngineSettings};
use crmbridge::mapping::{Mapping, MappingRules};
use crmbridge::model::CrmKind;
use crmbridge::store::Store;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// What one malformed payload must lead to.
enum Expect {
    /// The page is stored: these vendor ids are linked to companies, and one dead letter
    /// per reason fragment exists whose reason contains it (and nothing else is stored).
    Records {
        good: &'static [&'static str],
        bad: &'static [&'static str],
    },
    /// The poll fails as a whole with an error containing this fragment; nothing is
    /// stored and the cursor does not move.
    PageError(&'static str),
}

use Expect::*;

/// A fixture's bytes with its placeholders filled: `@@HUGE@@` becomes a 1 MB string and
/// `@@BAD_UTF8@@` raw bytes that are not UTF-8 (neither is practical to keep in a file).
fn payload(crm: &str, name: &str) -> Vec<u8> {
    let p = format!(
        "{}/wiremock-fixtures/bad-input/{crm}/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read(&p).unwrap_or_else(|e| panic!("fixture {p}: {e}"));
    let huge = "Ä".repeat(512 * 1024); // 2 bytes each: 1 MiB
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text.as_slice();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix(b"@@HUGE@@") {
            out.extend_from_slice(huge.as_bytes());
            rest = r;
        } else if let Some(r) = rest.strip_prefix(b"@@BAD_UTF8@@") {
            out.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
            rest = r;
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

fn fixture_text(dir: &str, name: &str) -> String {
    let p = format!(
        "{}/wiremock-fixtures/{dir}/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("fixture {p}: {e}"))
}

fn secret(dir: &TempDir, name: &str, value: &str) -> SecretRef {
    let p = dir.path().join(name);
    std::fs::write(&p, value).unwrap();
    SecretRef::File(p)
}

fn common(server: &MockServer) -> CommonConnectorConfig {
    CommonConnectorConfig {
        base_url: url::Url::parse(&format!("{}/", server.uri())).unwrap(),
        poll_interval: Duration::from_secs(60),
        batch_size: 50,
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(10),
            write: Duration::from_secs(10),
        },
        limits: Limits {
            requests_per_second: None,
            requests_per_window: None,
            max_concurrent: 4,
            daily_quota: None,
            daily_share: 1.0,
        },
        enabled: true,
    }
}

/// Mounts `body` as the answer of `crm`'s list/query endpoint — the first answer only
/// when `once` (an empty list follows), else every answer, so retries see it too — and
/// whatever the connector needs to start.
async fn mount(server: &MockServer, crm: &str, body: Vec<u8>, once: bool) {
    let times = if once { 1 } else { u64::MAX };
    match crm {
        "rally" => {
            // `start` probes with `limit=1`; polls ask for a full page.
            Mock::given(method("GET"))
                .and(path("/api/v1/companies"))
                .and(query_param("limit", "100"))
                .respond_with(ResponseTemplate::new(200).set_body_raw(body, "application/json"))
                .up_to_n_times(times)
                .mount(server)
                .await;
            Mock::given(method("GET"))
                .and(path("/api/v1/companies"))
                .respond_with(ResponseTemplate::new(200).set_body_raw("[]", "application/json"))
                .mount(server)
                .await;
        }
        "marketo" => {
            let json = |b: Vec<u8>| ResponseTemplate::new(200).set_body_raw(b, "application/json");
            Mock::given(method("GET"))
                .and(path("/identity/oauth/token"))
                .respond_with(json(fixture_text("marketo", "token.json").into_bytes()))
                .mount(server)
                .await;
            Mock::given(method("GET"))
                .and(path("/rest/v1/companies/describe.json"))
                .respond_with(json(fixture_text("marketo", "describe.json").into_bytes()))
                .mount(server)
                .await;
            Mock::given(method("GET"))
                .and(path("/rest/v1/companies.json"))
                .and(query_param("filterType", "id"))
                .respond_with(json(body))
                .up_to_n_times(times)
                .mount(server)
                .await;
            Mock::given(method("GET"))
                .and(path("/rest/v1/companies.json"))
                .and(query_param("filterType", "id"))
                .respond_with(json(
                    br#"{"requestId":"e#1","success":true,"result":[]}"#.to_vec(),
                ))
                .mount(server)
                .await;
        }
        "amocrm" => {
            let hal =
                |b: Vec<u8>| ResponseTemplate::new(200).set_body_raw(b, "application/hal+json");
            Mock::given(method("GET"))
                .and(path("/api/v4/account"))
                .respond_with(hal(
                    fixture_text("amocrm", "account_filter_on.json").into_bytes()
                ))
                .mount(server)
                .await;
            Mock::given(method("GET"))
                .and(path("/api/v4/companies/custom_fields"))
                .and(query_param("page", "1"))
                .respond_with(hal(
                    fixture_text("amocrm", "custom_fields.json").into_bytes()
                ))
                .mount(server)
                .await;
            Mock::given(method("GET"))
                .and(path("/api/v4/companies"))
                .respond_with(hal(body))
                .up_to_n_times(times)
                .mount(server)
                .await;
            // amoCRM answers an empty list with 204 and no body.
            Mock::given(method("GET"))
                .and(path("/api/v4/companies"))
                .respond_with(ResponseTemplate::new(204))
                .mount(server)
                .await;
        }
        other => panic!("unknown CRM {other}"),
    }
}

/// An engine with the one connector `crm` pointing at `server`, built through
/// `crmbridge::connectors::build` and started.
async fn engine_for(crm: &str, server: &MockServer, dir: &TempDir) -> Arc<Engine> {
    let (cfg, kind) = match crm {
        "rally" => (
            ConnectorConfig::Rally(RallyConfig {
                common: common(server),
                api_key: secret(dir, "rally_key", "rk_bad_input_key"),
                page_size: 100,
                mapping: MappingRules::default(),
            }),
            CrmKind::Rally,
        ),
        "marketo" => (
            ConnectorConfig::Marketo(MarketoConfig {
                common: common(server),
                client_id: secret(dir, "mk_id", "mk-bad-input-id"),
                client_secret: secret(dir, "mk_secret", "mk-bad-input-secret"),
                mapping: MappingRules::default(),
            }),
            CrmKind::Marketo,
        ),
        _ => (
            ConnectorConfig::Amocrm(AmocrmConfig {
                common: common(server),
                auth: AmoAuth::LongLived {
                    token: secret(dir, "amo_token", "amo-bad-input-token"),
                },
                mapping: MappingRules::default(),
            }),
            CrmKind::Amocrm,
        ),
    };
    let store = Arc::new(Store::open(&dir.path().join("store.redb")).unwrap());
    let metrics = Arc::new(Metrics::new());
    let ctx = BuildContext {
        store: store.clone(),
        metrics: metrics.clone(),
    };
    let connector = build(crm, &cfg, &ctx).unwrap_or_else(|e| panic!("{crm} builds: {e}"));
    connector
        .start()
        .await
        .unwrap_or_else(|e| panic!("{crm} starts: {e}"));
    let mapping = Mapping::compile(kind, &MappingRules::default()).expect("default mapping");
    let endpoint = Endpoint::new(crm.to_string(), connector, mapping, Duration::from_secs(60));
    Arc::new(Engine::new(
        store,
        vec![endpoint],
        EngineSettings::default(),
        metrics,
    ))
}

/// Serves `fixture` to `crm`, runs one poll cycle through the engine and checks `expect`.
async fn check(crm: &str, fixture: &str, expect: Expect) {
    let server = MockServer::start().await;
    let once = matches!(expect, Records { .. });
    mount(&server, crm, payload(crm, fixture), once).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_for(crm, &server, &dir).await;
    let key = "bad-input";
    let result = engine
        .poll_cycle(
            crm,
            key,
            &PollMode::Incremental,
            &CancellationToken::new(),
            &|_| {},
        )
        .await;
    let tx = engine.store().begin_read().unwrap();
    let dead = tx.dead_letters(100, 0).unwrap();
    let cursor = tx.cursor(key).unwrap().unwrap_or_default();
    let companies = tx.company_count().unwrap();
    let requests: Vec<String> = server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| format!("{} {}", r.method, r.url))
        .collect();
    let ctx = format!("{crm}/{fixture} (requests: {requests:?})");
    match expect {
        Records { good, bad } => {
            let stats = result.unwrap_or_else(|e| panic!("{ctx}: the poll failed: {e}"));
            for vid in good {
                assert!(
                    tx.link_of(crm, vid).unwrap().is_some(),
                    "{ctx}: good record {vid} was not stored ({companies} companies; dead: {dead:?})"
                );
            }
            let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
            assert_eq!(
                dead.len(),
                bad.len(),
                "{ctx}: expected one dead letter per bad record, got {reasons:?}"
            );
            for fragment in bad {
                assert!(
                    reasons
                        .iter()
                        .any(|r| r.to_lowercase().contains(&fragment.to_lowercase())),
                    "{ctx}: no dead letter's reason names {fragment:?}: {reasons:?}"
                );
            }
            assert_eq!(stats.dead, bad.len(), "{ctx}: {stats:?}");
            assert_ne!(
                cursor,
                Cursor::start(),
                "{ctx}: the cursor did not advance with the stored page"
            );
        }
        PageError(fragment) => {
            let err = match result {
                Ok(stats) => panic!(
                    "{ctx}: garbage page accepted: {stats:?}; dead letters {:?}",
                    dead.iter().map(|d| &d.reason).collect::<Vec<_>>()
                ),
                Err(e) => e.to_string(),
            };
            assert!(
                err.to_lowercase().contains(&fragment.to_lowercase()),
                "{ctx}: the error does not say what is wrong ({fragment:?}): {err}"
            );
            assert!(
                err.len() < 2000,
                "{ctx}: the error quotes too much: {} bytes",
                err.len()
            );
            assert_eq!(
                cursor,
                Cursor::start(),
                "{ctx}: the cursor moved: {cursor:?}"
            );
            assert!(
                dead.is_empty(),
                "{ctx}: dead letters from a failed page: {dead:?}"
            );
            assert_eq!(companies, 0, "{ctx}: records stored from a failed page");
        }
    }
}

const RALLY_1: &str = "00000000-0000-4000-8000-000000000001";
const RALLY_2: &str = "00000000-0000-4000-8000-000000000002";

#[tokio::test]
async fn rally_records_with_wrong_types_are_dead_letters_naming_the_field() {
    check(
        "rally",
        "wrong_types.json",
        Records {
            good: &[RALLY_1],
            bad: &["name is", "employeeCount", "updatedAt"],
        },
    )
    .await;
}

#[tokio::test]
async fn rally_records_without_ids_are_dead_letters() {
    check(
        "rally",
        "missing_ids.json",
        Records {
            good: &[RALLY_1],
            bad: &["id is missing", "id is empty"],
        },
    )
    .await;
}

#[tokio::test]
async fn rally_null_and_array_rows_are_dead_letters() {
    for fixture in ["nulls_for_objects.json", "arrays_for_objects.json"] {
        check(
            "rally",
            fixture,
            Records {
                good: &[RALLY_1, RALLY_2],
                bad: &["not a JSON object"],
            },
        )
        .await;
    }
}

#[tokio::test]
async fn rally_a_one_megabyte_name_is_stored_intact() {
    check(
        "rally",
        "huge_string.json",
        Records {
            good: &[RALLY_1, RALLY_2],
            bad: &[],
        },
    )
    .await;
}

#[tokio::test]
async fn rally_page_invalid_utf8_is_an_error_and_keeps_the_cursor() {
    check("rally", "invalid_utf8.json", PageError("non-JSON")).await;
}

#[tokio::test]
async fn rally_page_truncated_is_an_error_and_keeps_the_cursor() {
    check("rally", "truncated.json", PageError("non-JSON")).await;
}

#[tokio::test]
async fn rally_page_object_for_array_is_an_error_and_keeps_the_cursor() {
    check(
        "rally",
        "object_for_array.json",
        PageError("instead of a JSON array"),
    )
    .await;
}

#[tokio::test]
async fn rally_page_null_page_is_an_error_and_keeps_the_cursor() {
    check(
        "rally",
        "null_page.json",
        PageError("instead of a JSON array"),
    )
    .await;
}

#[tokio::test]
async fn marketo_records_with_wrong_types_are_dead_letters_naming_the_field() {
    check(
        "marketo",
        "wrong_types.json",
        Records {
            good: &["1001"],
            bad: &["integer `id`", "updatedAt", "numberOfEmployees"],
        },
    )
    .await;
}

#[tokio::test]
async fn marketo_records_without_ids_are_dead_letters() {
    check(
        "marketo",
        "missing_ids.json",
        Records {
            good: &["1001"],
            bad: &["integer `id`"],
        },
    )
    .await;
}

#[tokio::test]
async fn marketo_null_and_array_rows_are_dead_letters() {
    for fixture in ["nulls_for_objects.json", "arrays_for_objects.json"] {
        check(
            "marketo",
            fixture,
            Records {
                good: &["1001", "1002"],
                bad: &["not a JSON object"],
            },
        )
        .await;
    }
}

#[tokio::test]
async fn marketo_a_one_megabyte_name_is_stored_intact() {
    check(
        "marketo",
        "huge_string.json",
        Records {
            good: &["1001", "1002"],
            bad: &[],
        },
    )
    .await;
}

#[tokio::test]
async fn marketo_page_invalid_utf8_is_an_error_and_keeps_the_cursor() {
    check("marketo", "invalid_utf8.json", PageError("JSON")).await;
}

#[tokio::test]
async fn marketo_page_truncated_is_an_error_and_keeps_the_cursor() {
    check("marketo", "truncated.json", PageError("JSON")).await;
}

#[tokio::test]
async fn marketo_page_object_for_array_is_an_error_and_keeps_the_cursor() {
    check(
        "marketo",
        "object_for_array.json",
        PageError("`result` is an object"),
    )
    .await;
}

#[tokio::test]
async fn marketo_page_null_page_is_an_error_and_keeps_the_cursor() {
    check(
        "marketo",
        "null_page.json",
        PageError("`result` is missing"),
    )
    .await;
}

#[tokio::test]
async fn amocrm_records_with_wrong_types_are_dead_letters_naming_the_field() {
    check(
        "amocrm",
        "wrong_types.json",
        Records {
            // A number where text belongs is read as its text (the mapping's rule).
            good: &["7001", "7005"],
            bad: &["integer id", "updated_at", "custom_fields_values"],
        },
    )
    .await;
}

#[tokio::test]
async fn amocrm_records_without_ids_are_dead_letters() {
    check(
        "amocrm",
        "missing_ids.json",
        Records {
            good: &["7001"],
            bad: &["integer id"],
        },
    )
    .await;
}

#[tokio::test]
async fn amocrm_null_and_array_rows_are_dead_letters() {
    for fixture in ["nulls_for_objects.json", "arrays_for_objects.json"] {
        check(
            "amocrm",
            fixture,
            Records {
                good: &["7001", "7002"],
                bad: &["not a JSON object"],
            },
        )
        .await;
    }
}

#[tokio::test]
async fn amocrm_a_one_megabyte_name_is_stored_intact() {
    check(
        "amocrm",
        "huge_string.json",
        Records {
            good: &["7001", "7002"],
            bad: &[],
        },
    )
    .await;
}

#[tokio::test]
async fn amocrm_page_invalid_utf8_is_an_error_and_keeps_the_cursor() {
    check("amocrm", "invalid_utf8.json", PageError("JSON")).await;
}

#[tokio::test]
async fn amocrm_page_truncated_is_an_error_and_keeps_the_cursor() {
    check("amocrm", "truncated.json", PageError("JSON")).await;
}

#[tokio::test]
async fn amocrm_page_object_for_array_is_an_error_and_keeps_the_cursor() {
    check(
        "amocrm",
        "object_for_array.json",
        PageError("_embedded.companies"),
    )
    .await;
}

#[tokio::test]
async fn amocrm_page_null_page_is_an_error_and_keeps_the_cursor() {
    check("amocrm", "null_page.json", PageError("_embedded.companies")).await;
}
