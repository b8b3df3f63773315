//! End-to-end sync through the wire simulators: backfill plus live two-way sync among all
//! three CRMs converges with no duplicates and settles to zero writes; a company created
//! in any CRM reaches the others and comes back unchanged.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use crmbridge::daemon::metrics::Metrics;
use crmbridge::engine::{BackfillOptions, Engine};
use crmbridge::model::Value;
use crmbridge::sim::cluster::{ClusterConfig, SimCluster};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn pushed(m: &Metrics) -> f64 {
    CRMS.iter()
        .map(|c| {
            m.get("crmbridge_records_pushed_total", &[("connector", c)])
                .unwrap_or(0.0)
        })
        .sum()
}

fn outbox_total(engine: &Engine) -> u64 {
    let tx = engine.store().begin_read().unwrap();
    CRMS.iter().map(|c| tx.outbox_len(c).unwrap()).sum()
}

/// Waits until the outboxes are empty and no push happened for `quiet`; panics after
/// `limit`. (The daemon has no "idle" event to await: quiescence is the absence of work.)
async fn settle(engine: &Engine, metrics: &Metrics, quiet: Duration, limit: Duration) {
    let start = Instant::now();
    let mut last = (pushed(metrics), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = pushed(metrics);
        if now != last.0 || outbox_total(engine) > 0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= quiet {
            return;
        }
        assert!(start.elapsed() < limit, "did not settle within {limit:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_crms_converge_under_mutations_and_then_stop_writing() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path) = cluster_with_config(24, dir.path(), "1s", None).await;
    let (engine, metrics) = engine_for(&path).await;
    let sd = CancellationToken::new();
    let report = engine
        .backfill(&BackfillOptions::default(), &sd, &|_, _| {})
        .await
        .unwrap();
    assert!(report.ok(), "backfill failed: {report:?}");

    let handle = engine.start(sd.clone());
    let mut mutator = TestMutator::new();
    for _ in 0..12 {
        mutator.step(&cluster);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    settle(
        &engine,
        &metrics,
        Duration::from_millis(2500),
        Duration::from_secs(120),
    )
    .await;

    // Zero writes within two more poll cycles.
    let before = pushed(&metrics);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        pushed(&metrics),
        before,
        "still writing after mutations stopped"
    );
    sd.cancel();
    handle.wait().await;

    let views = crm_views(&path).await;
    assert_converged(&views);
    assert_expectations(&views, &mutator.expect);
    let dead = engine
        .store()
        .begin_read()
        .unwrap()
        .dead_letter_count()
        .unwrap();
    assert_eq!(dead, 0, "unexpected dead letters");
    for (name, s) in [
        ("rally", cluster.rally.stats()),
        ("marketo", cluster.marketo.stats()),
        ("amocrm", cluster.amocrm.stats()),
    ] {
        assert_eq!(
            s.total_rejections(),
            0,
            "{name} rate-limit rejections: {s:?}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_company_created_anywhere_reaches_the_others_and_comes_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path) = cluster_with_config(3, dir.path(), "1s", None).await;
    let rally = cluster.rally.create(json!({
        "name": "Ærøskøbing Bryggeri ApS — 北京",
        "domain": "roundtrip-rally.example.org",
        "website": "https://roundtrip-rally.example.org",
        "annualRevenue": 12345678901234.56,
        "employeeCount": 42,
        "phone": "+45 12 34 56 78",
        "city": "Ærøskøbing",
        "tags": ["zeta", "alpha"],
    }));
    let ids = amo_field_ids(&cluster);
    cluster.amocrm.create(json!({
        "name": "Δέλτα Α.Ε.",
        "custom_fields_values": [
            {"field_id": ids["Domain"], "values": [{"value": "roundtrip-amo.example.org"}]},
            {"field_code": "WEB", "values": [{"value": "https://roundtrip-amo.example.org"}]},
            {"field_id": ids["Annual revenue"], "values": [{"value": "0.10"}]},
            {"field_id": ids["City"], "values": [{"value": "Αθήνα"}]},
        ],
    }));
    cluster.marketo.create(json!({
        "company": "Ünïcödé Marketo Inc.",
        "website": "https://roundtrip-marketo.example.org",
        "annualRevenue": 99999999999.99,
        "numberOfEmployees": 7,
    }));

    sync_until_settled(&path).await;

    let views = crm_views(&path).await;
    assert_converged(&views);
    let r = &views["marketo"]["roundtrip-rally.example.org"][0];
    assert_eq!(
        r.get("annualRevenue"),
        Some(&Value::Decimal("12345678901234.56".parse().unwrap()))
    );
    assert_eq!(
        views["amocrm"]["roundtrip-rally.example.org"][0].get("name"),
        Some(&Value::Text("Ærøskøbing Bryggeri ApS — 北京".into()))
    );
    assert_eq!(
        views["rally"]["roundtrip-amo.example.org"][0].get("annualRevenue"),
        Some(&Value::Decimal("0.1".parse().unwrap()))
    );
    // The Rally original was never written back: same content, same updatedAt.
    let after = cluster
        .rally
        .get(rally["id"].as_str().unwrap())
        .expect("still there");
    assert_eq!(
        after, rally,
        "the source record was modified by its own echo"
    );
    cluster.shutdown().await;
}

/// Runs the daemon's loops for the config at `path` until nothing is left to push and
/// nothing was pushed for 2.5 s, then stops them; returns the engine (its store open).
async fn sync_until_settled(path: &std::path::Path) -> Arc<Engine> {
    let (engine, metrics) = engine_for(path).await;
    let sd = CancellationToken::new();
    let handle = engine.start(sd.clone());
    settle(
        &engine,
        &metrics,
        Duration::from_millis(2500),
        Duration::from_secs(60),
    )
    .await;
    sd.cancel();
    handle.wait().await;
    engine
}

/// Simulators holding one company, created in Rally (domain `<slug>.example`, phone
/// +1 555 0100, city Leeds), and a config for them (poll interval 1 h) in `dir`.
async fn one_company_in_rally(
    dir: &std::path::Path,
    name: &str,
    slug: &str,
) -> (SimCluster, std::path::PathBuf, String) {
    let cluster = SimCluster::start(&ClusterConfig {
        companies: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let path = dir.join("crmbridge.toml");
    std::fs::write(&path, cluster.sync_config(dir, "1h", None).unwrap()).unwrap();
    let rally = cluster.rally.create(json!({
        "name": name,
        "domain": format!("{slug}.example"),
        "website": format!("https://{slug}.example"),
        "phone": "+1 555 0100",
        "city": "Leeds",
    }));
    (cluster, path, rally["id"].as_str().unwrap().to_string())
}

/// The product's engine for the config at `path`, after a backfill of every CRM.
async fn backfilled(path: &std::path::Path) -> Arc<Engine> {
    let (engine, _metrics) = engine_for(path).await;
    let none = |_: &str, _: &crmbridge::engine::IngestStats| {};
    engine
        .backfill(
            &BackfillOptions::default(),
            &CancellationToken::new(),
            &none,
        )
        .await
        .unwrap();
    engine
}

/// The ids of the company named `name` in amoCRM and in Marketo.
fn synced_ids(cluster: &SimCluster, name: &str) -> (i64, i64) {
    let find = |all: Vec<serde_json::Value>, key: &str| {
        all.into_iter()
            .find(|r| r[key] == json!(name))
            .expect("synced")["id"]
            .as_i64()
            .unwrap()
    };
    (
        find(cluster.amocrm.dump(), "name"),
        find(cluster.marketo.dump(), "company"),
    )
}

/// A user of amoCRM sets the phone to +1 555 0199, one of Marketo the city to York.
fn edit_phone_in_amocrm_and_city_in_marketo(cluster: &SimCluster, amo_id: i64, mkto_id: i64) {
    cluster.amocrm.update(
        amo_id,
        json!({"custom_fields_values": [{"field_code": "PHONE",
            "values": [{"value": "+1 555 0199", "enum_code": "WORK"}]}]}),
    );
    cluster
        .marketo
        .update(mkto_id, json!({"billingCity": "York"}));
}

/// Asserts that the company of `domain` has these values in every CRM.
fn assert_everywhere(views: &Views, domain: &str, want: &[(&str, &str)]) {
    for crm in CRMS {
        let f = &views[crm][domain][0];
        for (field, value) in want {
            assert_eq!(
                f.get(*field),
                Some(&Value::Text((*value).into())),
                "{crm}: {f:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_of_one_company_in_three_crms_at_once_all_survive() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path, rally_id) = one_company_in_rally(dir.path(), "Race Ltd", "race").await;
    // amoCRM and Marketo are read by their own poll loops once, at the start: after that,
    // only the read the daemon makes before writing to them can see their users' edits.
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "poll_interval = \"1h\"",
        "poll_interval = \"1s\"",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let (engine, metrics) = engine_for(&path).await;
    let sd = CancellationToken::new();
    let handle = engine.start(sd.clone());
    let quiet = Duration::from_millis(1500);
    settle(&engine, &metrics, quiet, Duration::from_secs(60)).await;
    let (amo_id, mkto_id) = synced_ids(&cluster, "Race Ltd");

    // Three users, three fields, within a second or two.
    edit_phone_in_amocrm_and_city_in_marketo(&cluster, amo_id, mkto_id);
    // amoCRM stamps whole seconds and is read a second only once it is over and settled:
    // its edit is in a second the read before the rename's write to amoCRM can see.
    amocrm_second_settled().await;
    cluster
        .rally
        .update(&rally_id, json!({"name": "Race Renamed Ltd"}));
    settle(&engine, &metrics, quiet, Duration::from_secs(60)).await;
    sd.cancel();
    handle.wait().await;

    let views = crm_views(&path).await;
    assert_converged(&views);
    assert_everywhere(
        &views,
        "race.example",
        &[
            ("name", "Race Renamed Ltd"),
            ("phone", "+1 555 0199"),
            ("city", "York"),
        ],
    );
    cluster.shutdown().await;
}

/// A write that goes out before the target's latest edits were read (a backfill's drain
/// reads nothing first; the daemon's leaves a moment between its read and the write):
/// amoCRM (`PATCH`) and Marketo (sync) are sent only the fields the record does not hold
/// yet, so an edit of another field made there meanwhile survives and travels on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_before_the_targets_latest_edit_was_read_keeps_that_edit() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path, rally_id) = one_company_in_rally(dir.path(), "Window Ltd", "window").await;
    let engine = backfilled(&path).await;
    let sd = CancellationToken::new();
    let (amo_id, mkto_id) = synced_ids(&cluster, "Window Ltd");

    // Users of amoCRM and Marketo edit the phone and the city; Rally's user renames it.
    edit_phone_in_amocrm_and_city_in_marketo(&cluster, amo_id, mkto_id);
    cluster
        .rally
        .update(&rally_id, json!({"name": "Window Renamed Ltd"}));
    // Only Rally is read; the rename is written to the others without reading them.
    let key = crmbridge::engine::cursor_key("rally");
    engine
        .poll_cycle(
            "rally",
            &key,
            &crmbridge::connector::PollMode::Incremental,
            &sd,
            &|_| {},
        )
        .await
        .unwrap();
    for target in ["amocrm", "marketo"] {
        let s = engine.drain_all(target, &sd).await.unwrap();
        assert_eq!(s.written, 1, "{target}: {s:?}");
    }
    let views = crm_views(&path).await;
    let amo = &views["amocrm"]["window.example"][0];
    let mkto = &views["marketo"]["window.example"][0];
    let renamed = Some(Value::Text("Window Renamed Ltd".into()));
    assert_eq!(
        (amo.get("name"), mkto.get("name")),
        (renamed.as_ref(), renamed.as_ref())
    );
    assert_eq!(
        amo.get("phone"),
        Some(&Value::Text("+1 555 0199".into())),
        "amoCRM's phone edit was overwritten: {amo:?}"
    );
    assert_eq!(
        mkto.get("city"),
        Some(&Value::Text("York".into())),
        "Marketo's city edit was overwritten: {mkto:?}"
    );

    // Read next, both edits reach every CRM.
    engine
        .backfill(&BackfillOptions::default(), &sd, &|_, _| {})
        .await
        .unwrap();
    let views = crm_views(&path).await;
    assert_converged(&views);
    assert_everywhere(
        &views,
        "window.example",
        &[("phone", "+1 555 0199"), ("city", "York")],
    );
    cluster.shutdown().await;
}

/// crmbridge gives a company it creates in Marketo its canonical id as
/// `externalCompanyId` (a replay then updates instead of duplicating): that value is part
/// of what it wrote, so reading the record back is no news.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_company_created_in_marketo_reads_back_as_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path, _) = one_company_in_rally(dir.path(), "Echo Ltd", "echo").await;
    let (engine, _metrics) = engine_for(&path).await;
    let sd = CancellationToken::new();
    let report = engine
        .backfill(&BackfillOptions::default(), &sd, &|_, _| {})
        .await
        .unwrap();
    let pushed = &report.pushed["marketo"];
    assert_eq!(
        (pushed.created, pushed.skipped),
        (1, 0),
        "the create is not queued again as changed while in flight: {pushed:?}"
    );
    let (_, mkto_id) = synced_ids(&cluster, "Echo Ltd");
    let record = cluster.marketo.get(mkto_id).expect("created");
    assert!(record["externalCompanyId"].is_string(), "{record}");
    let key = crmbridge::engine::cursor_key("marketo");
    let stats = engine
        .poll_cycle(
            "marketo",
            &key,
            &crmbridge::connector::PollMode::Full { since: None },
            &sd,
            &|_| {},
        )
        .await
        .unwrap();
    assert_eq!((stats.read, stats.merged), (1, 0), "{stats:?}");
    cluster.shutdown().await;
}

/// A backfill of one CRM does not create companies in CRMs that were never read: a
/// company they hold already (here the same one, in amoCRM) would be created twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_of_one_crm_pushes_only_to_crms_read_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path, _) = one_company_in_rally(dir.path(), "Twice Ltd", "twice").await;
    // 452001: the simulated account's "Domain" field.
    let domain = json!([{"field_id": 452_001, "values": [{"value": "twice.example"}]}]);
    cluster
        .amocrm
        .create(json!({"name": "Twice Ltd", "custom_fields_values": domain}));
    // amoCRM's connector reads a second only once it is over: let this one end.
    amocrm_second_settled().await;
    let (engine, _metrics) = engine_for(&path).await;
    let sd = CancellationToken::new();
    let only_rally = BackfillOptions {
        sources: vec!["rally".into()],
        ..Default::default()
    };
    let report = engine.backfill(&only_rally, &sd, &|_, _| {}).await.unwrap();
    assert_eq!(report.never_read, ["amocrm", "marketo"], "{report:?}");
    assert!(
        !report.pushed.contains_key("amocrm") && !report.pushed.contains_key("marketo"),
        "{report:?}"
    );
    assert_eq!(cluster.amocrm.company_count(), 1);
    assert_eq!(cluster.marketo.company_count(), 0);
    assert_eq!(
        (report.pending["amocrm"], report.pending["marketo"]),
        (1, 1)
    );

    // Once every CRM has been read, the same backfill pushes everywhere, matching the
    // company amoCRM holds instead of creating it again.
    let report = engine
        .backfill(&BackfillOptions::default(), &sd, &|_, _| {})
        .await
        .unwrap();
    assert!(report.ok() && report.never_read.is_empty(), "{report:?}");
    let report = engine.backfill(&only_rally, &sd, &|_, _| {}).await.unwrap();
    assert!(report.never_read.is_empty(), "{report:?}");
    assert_eq!(cluster.amocrm.company_count(), 1);
    assert_eq!(cluster.marketo.company_count(), 1);
    cluster.shutdown().await;
}

/// A company synced from Rally to the others, to which amoCRM's user then added a mobile
/// number after the synced one, read back: (cluster, engine, Rally id, amoCRM id). The
/// engine's store lives in `dir`.
async fn a_company_with_two_numbers_in_amocrm(
    dir: &std::path::Path,
) -> (SimCluster, Arc<Engine>, String, i64) {
    let (cluster, path, rally_id) = one_company_in_rally(dir, "Phones Ltd", "phones").await;
    let (engine, _metrics) = engine_for(&path).await;
    let sd = CancellationToken::new();
    let all = BackfillOptions::default();
    engine.backfill(&all, &sd, &|_, _| {}).await.unwrap();
    let (amo_id, _) = synced_ids(&cluster, "Phones Ltd");
    cluster.amocrm.update(
        amo_id,
        json!({"custom_fields_values": [{"field_code": "PHONE", "values": [
            {"value": "+1 555 0100", "enum_code": "WORK"},
            {"value": "+1 650 555 0123", "enum_code": "MOB"}]}]}),
    );
    // amoCRM timestamps have whole seconds, and a read of amoCRM leaves the current
    // second to the next one: the edit is read once its second is over.
    amocrm_second_settled().await;
    engine.backfill(&all, &sd, &|_, _| {}).await.unwrap();
    assert_eq!(
        amo_phones(&cluster, amo_id),
        ["+1 555 0100", "+1 650 555 0123"]
    );
    (cluster, engine, rally_id, amo_id)
}

/// The PHONE values amoCRM holds for company `id`.
fn amo_phones(cluster: &SimCluster, id: i64) -> Vec<String> {
    let record = cluster.amocrm.get(id).unwrap();
    record["custom_fields_values"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["field_code"] == "PHONE")
        .flat_map(|f| f["values"].as_array().cloned().unwrap_or_default())
        .map(|v| v["value"].as_str().unwrap().to_string())
        .collect()
}

/// amoCRM replaces all of a field's values on a write: a phone change from another CRM
/// replaces the number crmbridge syncs (the first) and keeps the company's others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_change_keeps_the_other_numbers_amocrm_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, engine, rally_id, amo_id) =
        a_company_with_two_numbers_in_amocrm(dir.path()).await;
    cluster
        .rally
        .update(&rally_id, json!({"phone": "+1 555 0199"}));
    let all = BackfillOptions::default();
    let sd = CancellationToken::new();
    engine.backfill(&all, &sd, &|_, _| {}).await.unwrap();
    assert_eq!(
        amo_phones(&cluster, amo_id),
        ["+1 555 0199", "+1 650 555 0123"]
    );
    cluster.shutdown().await;
}

/// A phone removed in another CRM removes only the number crmbridge syncs; amoCRM's next
/// number then becomes the company's phone everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_cleared_elsewhere_keeps_the_other_numbers_amocrm_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, engine, rally_id, amo_id) =
        a_company_with_two_numbers_in_amocrm(dir.path()).await;
    let all = BackfillOptions::default();
    let sd = CancellationToken::new();
    cluster.rally.update(&rally_id, json!({"phone": null}));
    // As a daemon would (its poll interval apart): the write to amoCRM lands in a later
    // second than the clear, so what amoCRM then shows is the newer value.
    amocrm_second_settled().await;
    engine.backfill(&all, &sd, &|_, _| {}).await.unwrap();
    assert_eq!(amo_phones(&cluster, amo_id), ["+1 650 555 0123"]);
    // Read once that write's second is over.
    amocrm_second_settled().await;
    engine.backfill(&all, &sd, &|_, _| {}).await.unwrap();
    assert_eq!(
        cluster.rally.get(&rally_id).unwrap()["phone"],
        "+1 650 555 0123"
    );
    cluster.shutdown().await;
}

/// Marketo's record `id`.
fn marketo_record(cluster: &SimCluster, id: i64) -> serde_json::Value {
    cluster
        .marketo
        .dump()
        .into_iter()
        .find(|r| r["id"] == json!(id))
        .expect("Marketo record")
}

/// The dead letters in `engine`'s store (the first 100).
fn dead_letters(engine: &Engine) -> Vec<crmbridge::store::DeadLetter> {
    engine
        .store()
        .begin_read()
        .unwrap()
        .dead_letters(100, 0)
        .unwrap()
}

/// Asserts that `connector` has a push dead letter whose reason contains each of `words`.
fn assert_dead_letter(engine: &Engine, connector: &str, words: &[&str]) {
    let letters = dead_letters(engine);
    assert!(
        letters
            .iter()
            .any(|l| l.connector == connector && words.iter().all(|w| l.reason.contains(w))),
        "no {connector} letter saying {words:?}: {letters:?}"
    );
}

/// The industry amoCRM's record `id` holds (the "Industry" select's value), if any.
fn amo_industry(cluster: &SimCluster, id: i64) -> Option<String> {
    let rec = cluster.amocrm.get(id).expect("amoCRM record");
    rec["custom_fields_values"]
        .as_array()?
        .iter()
        .find(|f| f["field_name"] == json!("Industry"))?["values"][0]["value"]
        .as_str()
        .map(str::to_string)
}

/// An industry amoCRM's "Industry" select does not offer: the company still reaches
/// amoCRM, without it (a dead letter says so), instead of not at all; the other CRMs keep
/// it, and reading the amoCRM record back is no news (its empty industry must not clear
/// the company's). A record that held an industry the company has since left has it
/// cleared rather than kept stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_industry_amocrm_cannot_hold_leaves_the_company_synced_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path, rally_id) = one_company_in_rally(dir.path(), "Odd Trade Ltd", "odd").await;
    cluster
        .rally
        .update(&rally_id, json!({"industry": "Underwater Basket Weaving"}));
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("poll_interval = \"1h\"", "poll_interval = \"1s\"");
    std::fs::write(&path, text).unwrap();
    let (engine, metrics) = engine_for(&path).await;
    let sd = CancellationToken::new();
    let handle = engine.start(sd.clone());
    let quiet = Duration::from_millis(2500);
    settle(&engine, &metrics, quiet, Duration::from_secs(60)).await;
    let (amo_id, mkto_id) = synced_ids(&cluster, "Odd Trade Ltd");
    assert_eq!(amo_industry(&cluster, amo_id), None);
    let mkto = |c: &SimCluster| marketo_record(c, mkto_id)["industry"].clone();
    assert_eq!(mkto(&cluster), json!("Underwater Basket Weaving"));
    assert_dead_letter(
        &engine,
        "amocrm",
        &["written without industry", "Underwater Basket Weaving"],
    );

    // An industry amoCRM offers arrives; one it does not then clears it there.
    cluster
        .rally
        .update(&rally_id, json!({"industry": "Retail"}));
    settle(&engine, &metrics, quiet, Duration::from_secs(60)).await;
    assert_eq!(amo_industry(&cluster, amo_id).as_deref(), Some("Retail"));
    let letters = dead_letters(&engine);
    assert!(
        letters.iter().all(|l| l.connector != "amocrm"),
        "the letter outlived the write that held everything: {letters:?}"
    );
    cluster
        .rally
        .update(&rally_id, json!({"industry": "Deep Sea Mining"}));
    settle(&engine, &metrics, quiet, Duration::from_secs(60)).await;
    sd.cancel();
    handle.wait().await;
    assert_eq!(amo_industry(&cluster, amo_id), None);
    assert_eq!(mkto(&cluster), json!("Deep Sea Mining"));
    assert_dead_letter(
        &engine,
        "amocrm",
        &["written without industry", "Deep Sea Mining"],
    );
    assert_eq!(
        cluster.rally.get(&rally_id).unwrap()["industry"],
        json!("Deep Sea Mining"),
        "amoCRM's empty industry came back as a change"
    );
    cluster.shutdown().await;
}

/// Text longer than a Marketo field holds (255 characters): the company reaches Marketo
/// without it (a dead letter says so) instead of not at all, and keeps it elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_longer_than_a_marketo_field_holds_leaves_the_company_synced_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path, rally_id) = one_company_in_rally(dir.path(), "Long Way Ltd", "long").await;
    let street = format!("{} Road", "Very Long ".repeat(30));
    cluster.rally.update(&rally_id, json!({"address": street}));
    let engine = sync_until_settled(&path).await;
    let (_, mkto_id) = synced_ids(&cluster, "Long Way Ltd");
    let mkto = marketo_record(&cluster, mkto_id);
    assert!(
        mkto.get("billingStreet").is_none_or(|v| v.is_null()),
        "{mkto}"
    );
    assert_eq!(mkto["billingCity"], json!("Leeds"));
    assert_eq!(
        cluster.rally.get(&rally_id).unwrap()["address"],
        json!(street),
        "Marketo's empty street came back as a change"
    );
    assert_dead_letter(&engine, "marketo", &["written without address", "255"]);
    cluster.shutdown().await;
}

/// Waits (up to `limit`) until `found` holds, checking every 100 ms: the daemon runs in
/// this process, and the simulators have no event to await.
async fn until(limit: Duration, what: &str, mut found: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !found() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crm_down_when_the_daemon_starts_does_not_hold_up_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path, _) = one_company_in_rally(dir.path(), "Halden Ropes", "halden").await;
    // Marketo answers every call with a 5xx until further notice.
    cluster
        .marketo
        .faults()
        .set(crmbridge::sim::common::FaultConfig {
            server_error: 1.0,
            ..Default::default()
        });
    let config = crmbridge::config::Config::load(&path).unwrap();
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(crmbridge::daemon::service::run(config, stop.clone()));
    let in_amocrm = || {
        cluster
            .amocrm
            .dump()
            .iter()
            .any(|r| r["name"] == json!("Halden Ropes"))
    };
    let in_marketo = || {
        cluster
            .marketo
            .dump()
            .iter()
            .any(|r| r["company"] == json!("Halden Ropes"))
    };
    // Before: the daemon gave up after a few attempts to start Marketo, and nothing
    // synced at all.
    until(
        Duration::from_secs(30),
        "Rally's company in amoCRM",
        in_amocrm,
    )
    .await;
    assert!(!daemon.is_finished(), "the daemon stopped");
    assert!(!in_marketo());
    // Marketo comes back: its connector starts, reads, and gets the company.
    cluster.marketo.faults().set(Default::default());
    until(
        Duration::from_secs(60),
        "Rally's company in Marketo",
        in_marketo,
    )
    .await;
    stop.cancel();
    daemon.await.unwrap().expect("the daemon stops cleanly");
    let marketo: Vec<_> = cluster
        .marketo
        .dump()
        .into_iter()
        .filter(|r| r["company"] == json!("Halden Ropes"))
        .collect();
    assert_eq!(marketo.len(), 1, "{marketo:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_at_start_stop_the_daemon_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_cluster, path, _) = one_company_in_rally(dir.path(), "Orm Forge", "orm").await;
    std::fs::write(dir.path().join("marketo_client_secret"), "not-the-secret").unwrap();
    let config = crmbridge::config::Config::load(&path).unwrap();
    let started = Instant::now();
    // A mistake another attempt cannot mend shows at `systemctl start`, not as a
    // connector that silently never syncs.
    let err = crmbridge::daemon::service::run(config, CancellationToken::new())
        .await
        .expect_err("refused credentials stop the daemon");
    let text = err.to_string();
    assert!(text.starts_with("connector marketo:"), "{text}");
    assert!(text.contains("authentication failed"), "{text}");
    assert!(!text.contains("not-the-secret"), "{text}");
    assert!(
        started.elapsed() < crmbridge::daemon::service::FIRST_START_WAIT,
        "after {:?}",
        started.elapsed()
    );
}

/// Rally's updates are whole: every write to it is preceded by a read that began after
/// the write was asked for, so an edit made there a moment before is merged, not
/// overwritten — even when Rally was read for an earlier write just before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_made_in_rally_just_after_a_read_for_a_write_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path, rally_id) = one_company_in_rally(dir.path(), "Tern Ltd", "tern").await;
    let engine = backfilled(&path).await;
    let sd = CancellationToken::new();
    let (_, mkto_id) = synced_ids(&cluster, "Tern Ltd");
    let key = crmbridge::engine::cursor_key("marketo");
    let marketo_edit = |patch: serde_json::Value| {
        cluster.marketo.update(mkto_id, patch);
        engine.poll_cycle(
            "marketo",
            &key,
            &crmbridge::connector::PollMode::Incremental,
            &sd,
            &|_| {},
        )
    };
    // A Marketo edit goes to Rally: the drain reads Rally, then writes.
    marketo_edit(json!({"billingCity": "York"})).await.unwrap();
    assert_eq!(engine.drain_fresh("rally", &sd).await.unwrap().written, 1);
    // A moment later Rally's user renames the company and Marketo's edits the city again.
    cluster
        .rally
        .update(&rally_id, json!({"name": "Tern Renamed Ltd"}));
    marketo_edit(json!({"billingCity": "Hull"})).await.unwrap();
    let s = engine.drain_fresh("rally", &sd).await.unwrap();
    assert_eq!(s.written, 1, "{s:?}");
    let rally = cluster.rally.get(&rally_id).unwrap();
    assert_eq!(
        (rally["name"].as_str(), rally["city"].as_str()),
        (Some("Tern Renamed Ltd"), Some("Hull")),
        "{rally}"
    );
    cluster.shutdown().await;
}

/// amoCRM keeps an industry in the spelling of its own option ("retail" is stored as
/// "Retail"): reading that back is no change of amoCRM's, so Rally and Marketo keep the
/// spelling their users gave and nothing is written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_option_amocrm_spells_its_own_way_is_no_change_to_carry_back() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, path, rally_id) =
        one_company_in_rally(dir.path(), "Lower Case Ltd", "lower").await;
    cluster
        .rally
        .update(&rally_id, json!({"industry": "retail", "tags": ["vip"]}));
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("poll_interval = \"1h\"", "poll_interval = \"1s\"");
    std::fs::write(&path, text).unwrap();
    sync_until_settled(&path).await;
    let (amo_id, mkto_id) = synced_ids(&cluster, "Lower Case Ltd");
    assert_eq!(amo_industry(&cluster, amo_id).as_deref(), Some("Retail"));
    // Before: amoCRM's "Retail" came back as amoCRM's edit and was written everywhere.
    assert_eq!(
        cluster.rally.get(&rally_id).unwrap()["industry"],
        json!("retail")
    );
    assert_eq!(
        marketo_record(&cluster, mkto_id)["industry"],
        json!("retail")
    );
    let rally_puts: u64 = cluster
        .rally
        .stats()
        .requests
        .iter()
        .filter(|(k, _)| k.starts_with("PUT"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(rally_puts, 0, "{:?}", cluster.rally.stats().requests);
    cluster.shutdown().await;
}

/// Companies of one CRM that share a domain (two of them by the same name), while Rally
/// keeps one record per domain: the creates after the first land on the first's record,
/// are dead-lettered, and the owner's content is written back — with what the others put
/// there that the owner lacks cleared. Rally's record is then one company's, whole, and no
/// company takes another's values anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn companies_sharing_a_domain_do_not_mix_in_the_one_record_rally_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = SimCluster::start(&ClusterConfig {
        companies: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let path = dir.path().join("crmbridge.toml");
    std::fs::write(&path, cluster.sync_config(dir.path(), "1h", None).unwrap()).unwrap();
    let twins = [
        json!({"company": "Twin Ltd", "website": "https://twin.example", "billingCity": "Leeds"}),
        json!({"company": "Twin Other Ltd", "website": "https://twin.example",
               "industry": "Retail", "numberOfEmployees": 40}),
        json!({"company": "Twin Ltd", "website": "https://www.twin.example",
               "mainPhone": "+1 555 0142", "billingCity": "York"}),
        json!({"company": "Twin Oy", "website": "twin.example", "numberOfEmployees": 7,
               "industry": "Energy"}),
    ];
    let ids: Vec<i64> = twins
        .iter()
        .map(|t| cluster.marketo.create(t.clone())["id"].as_i64().unwrap())
        .collect();
    // Twice: the second reads back what the first wrote.
    let engine = backfilled(&path).await;
    let none = |_: &str, _: &crmbridge::engine::IngestStats| {};
    let sd = CancellationToken::new();
    engine
        .backfill(&BackfillOptions::default(), &sd, &none)
        .await
        .unwrap();
    // Each Marketo company still holds exactly its own values.
    let keys = [
        "company",
        "billingCity",
        "industry",
        "numberOfEmployees",
        "mainPhone",
    ];
    let own = |t: &serde_json::Value, k: &str| t.get(k).cloned().unwrap_or(json!(null));
    for (t, id) in twins.iter().zip(&ids) {
        let now = marketo_record(&cluster, *id);
        for k in keys {
            assert_eq!(now[k], own(t, k), "Marketo {id} {k}: {now}");
        }
    }
    // Rally's one record is one of them, whole.
    let rally: Vec<_> = cluster
        .rally
        .dump()
        .into_iter()
        .filter(|r| r["domain"] == json!("twin.example"))
        .collect();
    assert_eq!(rally.len(), 1, "{rally:?}");
    let r = &rally[0];
    let as_rally = [
        ("company", "name"),
        ("billingCity", "city"),
        ("industry", "industry"),
        ("numberOfEmployees", "employeeCount"),
        ("mainPhone", "phone"),
    ];
    assert!(
        twins
            .iter()
            .any(|t| as_rally.iter().all(|(m, k)| r[*k] == own(t, m))),
        "Rally's record mixes companies: {r}"
    );
    cluster.shutdown().await;
}
