//! Behaviour of the store: atomicity, persistence, schema and lock checks, and the
//! semantics of each table's operations.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;
use tempfile::TempDir;

use super::*;
use crate::model::{FieldState, Provenance, Value};

fn temp_store() -> (TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("state.redb")).expect("open store");
    (dir, store)
}

fn ts(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
}

fn company(id: &str, name: &str) -> Company {
    let mut fields = BTreeMap::new();
    fields.insert(
        "name".to_owned(),
        FieldState {
            value: Value::Text(name.to_owned()),
            source: Provenance {
                connector: "rally".to_owned(),
                vendor_ts: ts(0),
            },
        },
    );
    fields.insert(
        "annualRevenue".to_owned(),
        FieldState {
            value: Value::Decimal(crate::model::parse_decimal("1234567.891").unwrap()),
            source: Provenance {
                connector: "marketo".to_owned(),
                vendor_ts: ts(5),
            },
        },
    );
    Company {
        id: id.to_owned(),
        fields,
    }
}

fn dead_letter_new(reason: &str) -> DeadLetterNew {
    DeadLetterNew {
        connector: "amocrm".to_owned(),
        direction: Direction::Push,
        canonical_id: Some("c1".to_owned()),
        vendor_id: None,
        record: json!({"name": "Acme", "revenue": 12.50}),
        reason: reason.to_owned(),
        attempts: 3,
        first_at: ts(0),
        last_at: ts(60),
    }
}

#[test]
fn dropped_write_transaction_leaves_nothing_behind() {
    let (_dir, store) = temp_store();
    {
        let tx = store.begin_write().unwrap();
        tx.put_company(&company("c1", "Acme")).unwrap();
        tx.put_link("rally", "R1", "c1").unwrap();
        tx.put_match_key("domain:acme.com", "c1").unwrap();
        tx.put_cursor("rally", &Cursor(json!({"since": "2024-01-01"})))
            .unwrap();
        assert!(tx.enqueue("marketo", "c1", ts(0)).unwrap());
        tx.add_dead_letter(dead_letter_new("bad")).unwrap();
        tx.add_quota("rally", "2024-01-01", 7).unwrap();
        // The transaction sees its own writes...
        assert_eq!(tx.link_of("rally", "R1").unwrap().as_deref(), Some("c1"));
        // ...and is dropped here without commit.
    }
    let rx = store.begin_read().unwrap();
    assert_eq!(rx.get_company("c1").unwrap(), None);
    assert_eq!(rx.company_count().unwrap(), 0);
    assert_eq!(rx.link_of("rally", "R1").unwrap(), None);
    assert_eq!(rx.vendor_id_of("c1", "rally").unwrap(), None);
    assert_eq!(rx.match_key("domain:acme.com").unwrap(), None);
    assert_eq!(rx.cursor("rally").unwrap(), None);
    assert_eq!(rx.outbox_len("marketo").unwrap(), 0);
    assert!(rx.outbox_batch("marketo", 10).unwrap().is_empty());
    assert_eq!(rx.dead_letter_count().unwrap(), 0);
    assert_eq!(rx.quota_used("rally", "2024-01-01").unwrap(), 0);
}

#[test]
fn uncommitted_writes_are_invisible_to_readers() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.put_company(&company("c1", "Acme")).unwrap();
    let rx = store.begin_read().unwrap();
    assert_eq!(rx.get_company("c1").unwrap(), None);
    tx.commit().unwrap();
    // A snapshot taken before the commit keeps its view; a new one sees the commit.
    assert_eq!(rx.get_company("c1").unwrap(), None);
    let rx2 = store.begin_read().unwrap();
    assert_eq!(rx2.get_company("c1").unwrap(), Some(company("c1", "Acme")));
}

#[test]
fn everything_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/state.redb");
    let token = TokenRecord {
        access_token: "at-1".to_owned(),
        refresh_token: Some("rt-1".to_owned()),
        expires_at: Some(ts(3600)),
    };
    let ledger = LedgerEntry {
        hash: "abc123".to_owned(),
        at: ts(9),
        prints: None,
    };
    let cursor = Cursor(json!({"updatedAt": "2024-05-01T00:00:00Z", "offset": 200}));
    {
        let store = Store::open(&path).unwrap();
        let tx = store.begin_write().unwrap();
        tx.put_company(&company("c1", "Acme")).unwrap();
        tx.put_link("rally", "R1", "c1").unwrap();
        tx.put_match_key("ext:EXT-1", "c1").unwrap();
        tx.put_cursor("rally", &cursor).unwrap();
        tx.enqueue("marketo", "c1", ts(1)).unwrap();
        tx.add_dead_letter(dead_letter_new("rejected")).unwrap();
        tx.put_ledger("rally", "R1", &ledger).unwrap();
        tx.put_token("amocrm", &token).unwrap();
        tx.add_quota("marketo", "2024-05-01", 42).unwrap();
        tx.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let rx = store.begin_read().unwrap();
    assert_eq!(rx.get_company("c1").unwrap(), Some(company("c1", "Acme")));
    assert_eq!(rx.link_of("rally", "R1").unwrap().as_deref(), Some("c1"));
    assert_eq!(
        rx.vendor_id_of("c1", "rally").unwrap().as_deref(),
        Some("R1")
    );
    assert_eq!(rx.match_key("ext:EXT-1").unwrap().as_deref(), Some("c1"));
    assert_eq!(rx.cursor("rally").unwrap(), Some(cursor));
    let batch = rx.outbox_batch("marketo", 10).unwrap();
    assert_eq!(batch.len(), 1, "outbox after reopen: {batch:?}");
    assert_eq!(batch[0].1.canonical_id, "c1");
    assert_eq!(batch[0].1.enqueued_at, ts(1));
    assert_eq!(rx.dead_letter_count().unwrap(), 1);
    assert_eq!(rx.ledger("rally", "R1").unwrap(), Some(ledger));
    assert_eq!(rx.token("amocrm").unwrap(), Some(token));
    assert_eq!(rx.quota_used("marketo", "2024-05-01").unwrap(), 42);
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
}

#[test]
fn decimals_keep_full_precision_through_the_store() {
    let (_dir, store) = temp_store();
    let mut c = company("c1", "Acme");
    c.fields.get_mut("annualRevenue").unwrap().value =
        Value::Decimal(crate::model::parse_decimal("12345678901234567.8901").unwrap());
    let tx = store.begin_write().unwrap();
    tx.put_company(&c).unwrap();
    tx.commit().unwrap();
    let back = store.begin_read().unwrap().get_company("c1").unwrap();
    assert_eq!(back, Some(c));
}

#[test]
fn newer_schema_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    {
        let store = Store::open(&path).unwrap();
        let tx = store.begin_write().unwrap();
        tx.table(META)
            .unwrap()
            .insert(SCHEMA_KEY, SCHEMA_VERSION + 1)
            .unwrap();
        tx.commit().unwrap();
    }
    let err = Store::open(&path).expect_err("a newer schema must be refused");
    assert!(
        matches!(err, StoreError::NewerSchema { found, supported, .. }
            if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "unexpected error: {err:?}"
    );
    let msg = err.to_string();
    for needle in [
        format!("schema version {}", SCHEMA_VERSION + 1),
        format!("supports up to {SCHEMA_VERSION}"),
        "newer crmbridge".to_owned(),
        "store.path".to_owned(),
    ] {
        assert!(msg.contains(&needle), "{msg:?} lacks {needle:?}");
    }
}

#[test]
fn second_open_of_an_open_file_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let _first = Store::open(&path).unwrap();
    let err = Store::open(&path).expect_err("second open must fail");
    assert!(
        matches!(&err, StoreError::Locked { path: p } if p == &path),
        "unexpected error: {err:?}"
    );
    assert!(
        err.to_string().contains("another crmbridge process"),
        "message: {err}"
    );
}

#[test]
fn file_can_be_reopened_after_the_store_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let first = Store::open(&path).unwrap();
    let clone = first.clone();
    drop(first);
    assert!(matches!(Store::open(&path), Err(StoreError::Locked { .. })));
    drop(clone);
    Store::open(&path).expect("reopen after the last clone is dropped");
}

#[test]
fn enqueue_keeps_one_pending_entry_per_target_and_company() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    assert!(tx.enqueue("marketo", "c1", ts(0)).unwrap());
    assert!(!tx.enqueue("marketo", "c1", ts(1)).unwrap());
    // Another target is another queue.
    assert!(tx.enqueue("amocrm", "c1", ts(2)).unwrap());
    tx.commit().unwrap();
    let tx = store.begin_write().unwrap();
    assert!(!tx.enqueue("marketo", "c1", ts(3)).unwrap());
    tx.commit().unwrap();

    let rx = store.begin_read().unwrap();
    let batch = rx.outbox_batch("marketo", 10).unwrap();
    assert_eq!(batch.len(), 1, "marketo outbox: {batch:?}");
    assert_eq!(
        batch[0].1.enqueued_at,
        ts(0),
        "the first enqueue time is kept"
    );
    assert_eq!(rx.outbox_len("marketo").unwrap(), 1);
    assert_eq!(rx.outbox_len("amocrm").unwrap(), 1);
    assert_eq!(
        rx.outbox_targets().unwrap(),
        vec![("amocrm".to_owned(), 1), ("marketo".to_owned(), 1)]
    );
}

#[test]
fn outbox_batch_is_oldest_first_and_limited() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    for (i, id) in ["c3", "c1", "c2", "c5", "c4"].iter().enumerate() {
        tx.enqueue("marketo", id, ts(i as i64)).unwrap();
    }
    tx.enqueue("rally", "c9", ts(0)).unwrap();
    tx.commit().unwrap();
    let rx = store.begin_read().unwrap();
    let ids: Vec<String> = rx
        .outbox_batch("marketo", 3)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.canonical_id)
        .collect();
    assert_eq!(ids, ["c3", "c1", "c2"]);
    let seqs: Vec<u64> = rx
        .outbox_batch("marketo", 10)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert!(seqs.is_sorted(), "seqs not increasing: {seqs:?}");
    assert_eq!(seqs.len(), 5);
}

#[test]
fn removed_entry_can_be_enqueued_again_behind_the_others() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.enqueue("marketo", "c1", ts(0)).unwrap();
    tx.enqueue("marketo", "c2", ts(1)).unwrap();
    let (seq, _) = tx.outbox_batch("marketo", 1).unwrap()[0].clone();
    assert_eq!(
        tx.outbox_remove("marketo", seq).unwrap(),
        OutboxRemoval::Removed
    );
    assert_eq!(tx.outbox_len("marketo").unwrap(), 1);
    assert!(tx.enqueue("marketo", "c1", ts(2)).unwrap());
    let ids: Vec<String> = tx
        .outbox_batch("marketo", 10)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.canonical_id)
        .collect();
    assert_eq!(ids, ["c2", "c1"]);
    assert_eq!(
        tx.outbox_remove("marketo", seq).unwrap(),
        OutboxRemoval::NotFound
    );
}

#[test]
fn emptied_outbox_disappears_from_targets() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.enqueue("marketo", "c1", ts(0)).unwrap();
    let (seq, _) = tx.outbox_batch("marketo", 1).unwrap()[0].clone();
    tx.outbox_remove("marketo", seq).unwrap();
    assert_eq!(tx.outbox_len("marketo").unwrap(), 0);
    assert_eq!(tx.outbox_targets().unwrap(), vec![]);
}

#[test]
fn mark_sending_and_fail_track_attempts_and_errors() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.enqueue("amocrm", "c1", ts(0)).unwrap();
    let (seq, _) = tx.outbox_batch("amocrm", 1).unwrap()[0].clone();
    let sending = tx.outbox_mark_sending("amocrm", seq).unwrap().unwrap();
    assert_eq!((sending.attempts, sending.sending), (1, true));
    let failed = tx
        .outbox_fail("amocrm", seq, "HTTP 504 from amoCRM")
        .unwrap()
        .unwrap();
    assert!(!failed.sending);
    assert_eq!(failed.attempts, 1);
    assert_eq!(failed.last_error.as_deref(), Some("HTTP 504 from amoCRM"));
    tx.outbox_mark_sending("amocrm", seq).unwrap();
    tx.commit().unwrap();
    let stored = store
        .begin_read()
        .unwrap()
        .outbox_batch("amocrm", 1)
        .unwrap();
    assert_eq!(stored[0].0, seq);
    assert_eq!(
        (stored[0].1.attempts, stored[0].1.sending),
        (2, true),
        "entry: {stored:?}"
    );
    let tx = store.begin_write().unwrap();
    assert_eq!(tx.outbox_mark_sending("amocrm", seq + 100).unwrap(), None);
    assert_eq!(tx.outbox_fail("amocrm", seq + 100, "x").unwrap(), None);
}

#[test]
fn an_unconfirmed_send_stays_unconfirmed_from_its_earliest_time_until_the_entry_leaves() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.enqueue("amocrm", "c1", ts(0)).unwrap();
    let (seq, _) = tx.outbox_batch("amocrm", 1).unwrap()[0].clone();
    tx.outbox_mark_sending("amocrm", seq).unwrap();
    let e = tx
        .outbox_fail_unconfirmed("amocrm", seq, "timed out", ts(20))
        .unwrap()
        .unwrap();
    assert_eq!(e.unconfirmed_since, Some(ts(20)));
    // A later send that certainly failed says nothing about the earlier one.
    tx.outbox_mark_sending("amocrm", seq).unwrap();
    let e = tx.outbox_fail("amocrm", seq, "429").unwrap().unwrap();
    assert_eq!(e.unconfirmed_since, Some(ts(20)));
    // Another unknown outcome later keeps the earliest time.
    tx.outbox_mark_sending("amocrm", seq).unwrap();
    let e = tx
        .outbox_fail_unconfirmed("amocrm", seq, "reset", ts(40))
        .unwrap()
        .unwrap();
    assert_eq!(e.unconfirmed_since, Some(ts(20)));
    tx.commit().unwrap();
    let stored = store
        .begin_read()
        .unwrap()
        .outbox_batch("amocrm", 1)
        .unwrap();
    assert_eq!(stored[0].1.unconfirmed_since, Some(ts(20)), "durable");
}

#[test]
fn a_send_that_never_got_an_outcome_is_unconfirmed_since_the_entry_was_queued() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.enqueue("amocrm", "c1", ts(5)).unwrap();
    let (seq, _) = tx.outbox_batch("amocrm", 1).unwrap()[0].clone();
    let first = tx.outbox_mark_sending("amocrm", seq).unwrap().unwrap();
    assert_eq!(first.unconfirmed_since, None);
    // No outcome was recorded (the process died): the next send finds it still sending.
    let again = tx.outbox_mark_sending("amocrm", seq).unwrap().unwrap();
    assert_eq!(again.unconfirmed_since, Some(ts(5)));
    let e = tx.outbox_fail("amocrm", seq, "503").unwrap().unwrap();
    assert_eq!(
        e.unconfirmed_since,
        Some(ts(5)),
        "kept after a certain failure"
    );
}

#[test]
fn change_during_a_send_keeps_the_entry_queued_after_success() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.enqueue("rally", "c1", ts(0)).unwrap();
    let (seq, _) = tx.outbox_batch("rally", 1).unwrap()[0].clone();
    tx.outbox_mark_sending("rally", seq).unwrap();
    // The company changes while the push (carrying older state) is in flight.
    assert!(tx.enqueue("rally", "c1", ts(1)).unwrap());
    assert!(!tx.enqueue("rally", "c1", ts(2)).unwrap());
    assert_eq!(tx.outbox_len("rally").unwrap(), 1);
    assert_eq!(
        tx.outbox_remove("rally", seq).unwrap(),
        OutboxRemoval::Requeued
    );
    let batch = tx.outbox_batch("rally", 10).unwrap();
    assert_eq!(batch.len(), 1, "outbox: {batch:?}");
    let entry = &batch[0].1;
    assert!(!entry.sending && entry.attempts == 0, "entry: {entry:?}");
    // The next successful send removes it for good.
    tx.outbox_mark_sending("rally", seq).unwrap();
    assert_eq!(
        tx.outbox_remove("rally", seq).unwrap(),
        OutboxRemoval::Removed
    );
    assert_eq!(tx.outbox_len("rally").unwrap(), 0);
}

#[test]
fn dead_letters_are_added_listed_and_removed() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    // Three companies (one company's letters are one letter: see the next test).
    let ids: Vec<u64> = ["first", "second", "third"]
        .iter()
        .enumerate()
        .map(|(i, r)| {
            tx.add_dead_letter(DeadLetterNew {
                canonical_id: Some(format!("c{i}")),
                ..dead_letter_new(r)
            })
            .unwrap()
        })
        .collect();
    tx.commit().unwrap();
    assert!(ids.is_sorted() && ids[0] < ids[2], "ids: {ids:?}");

    let rx = store.begin_read().unwrap();
    assert_eq!(rx.dead_letter_count().unwrap(), 3);
    let all: Vec<String> = rx
        .dead_letters(10, 0)
        .unwrap()
        .into_iter()
        .map(|d| d.reason)
        .collect();
    assert_eq!(all, ["first", "second", "third"]);
    let page: Vec<u64> = rx
        .dead_letters(1, 1)
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(page, [ids[1]]);
    let one = rx.dead_letter(ids[0]).unwrap().unwrap();
    assert_eq!(one.record, json!({"name": "Acme", "revenue": 12.50}));
    assert_eq!(one.direction, Direction::Push);
    assert_eq!(
        (one.first_at, one.last_at, one.attempts),
        (ts(0), ts(60), 3)
    );

    let tx = store.begin_write().unwrap();
    let removed = tx.remove_dead_letter(ids[1]).unwrap().unwrap();
    assert_eq!(removed.reason, "second");
    assert_eq!(tx.remove_dead_letter(ids[1]).unwrap(), None);
    tx.commit().unwrap();
    let rx = store.begin_read().unwrap();
    assert_eq!(rx.dead_letter_count().unwrap(), 2);
    assert_eq!(rx.dead_letter(ids[1]).unwrap(), None);
}

#[test]
fn dead_letter_ids_are_not_reused_after_removal() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    let a = tx.add_dead_letter(dead_letter_new("a")).unwrap();
    tx.remove_dead_letter(a).unwrap();
    let b = tx.add_dead_letter(dead_letter_new("b")).unwrap();
    assert!(b > a, "id {b} reused or went back (was {a})");
}

#[test]
fn put_link_replaces_the_previous_vendor_id_of_a_company() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.put_link("rally", "R1", "c1").unwrap();
    tx.put_link("marketo", "M1", "c1").unwrap();
    tx.put_link("rally", "R2", "c1").unwrap();
    assert_eq!(
        tx.vendor_id_of("c1", "rally").unwrap().as_deref(),
        Some("R2")
    );
    assert_eq!(tx.link_of("rally", "R2").unwrap().as_deref(), Some("c1"));
    assert_eq!(
        tx.link_of("rally", "R1").unwrap(),
        None,
        "stale forward link"
    );
    assert_eq!(
        tx.links_of("c1").unwrap(),
        vec![
            ("marketo".to_owned(), "M1".to_owned()),
            ("rally".to_owned(), "R2".to_owned())
        ]
    );
}

#[test]
fn put_link_moves_a_record_to_another_company() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.put_link("rally", "R1", "c1").unwrap();
    tx.put_link("rally", "R1", "c2").unwrap();
    assert_eq!(tx.link_of("rally", "R1").unwrap().as_deref(), Some("c2"));
    assert_eq!(tx.vendor_id_of("c1", "rally").unwrap(), None);
    assert_eq!(
        tx.vendor_id_of("c2", "rally").unwrap().as_deref(),
        Some("R1")
    );
}

#[test]
fn links_of_lists_only_that_company() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    // "c1" is a prefix of "c10": the range must stop at the first element.
    tx.put_link("rally", "R1", "c1").unwrap();
    tx.put_link("rally", "R10", "c10").unwrap();
    tx.put_link("amocrm", "A0", "c0").unwrap();
    assert_eq!(
        tx.links_of("c1").unwrap(),
        vec![("rally".to_owned(), "R1".to_owned())]
    );
    assert_eq!(tx.links_of("c2").unwrap(), vec![]);
}

#[test]
fn remove_link_drops_both_directions() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.put_link("rally", "R1", "c1").unwrap();
    assert_eq!(
        tx.remove_link("rally", "R1").unwrap().as_deref(),
        Some("c1")
    );
    assert_eq!(tx.link_of("rally", "R1").unwrap(), None);
    assert_eq!(tx.vendor_id_of("c1", "rally").unwrap(), None);
    assert_eq!(tx.remove_link("rally", "R1").unwrap(), None);
}

#[test]
fn match_keys_point_at_companies() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.put_match_key("domain:acme.com", "c1").unwrap();
    tx.put_match_key("domain:acme.com", "c2").unwrap();
    assert_eq!(
        tx.match_key("domain:acme.com").unwrap().as_deref(),
        Some("c2")
    );
    tx.remove_match_key("domain:acme.com").unwrap();
    assert_eq!(tx.match_key("domain:acme.com").unwrap(), None);
}

#[test]
fn quota_counts_per_connector_and_day() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    assert_eq!(tx.add_quota("marketo", "2024-05-01", 3).unwrap(), 3);
    assert_eq!(tx.add_quota("marketo", "2024-05-01", 4).unwrap(), 7);
    assert_eq!(tx.add_quota("marketo", "2024-05-02", 1).unwrap(), 1);
    assert_eq!(tx.add_quota("rally", "2024-05-01", 10).unwrap(), 10);
    tx.commit().unwrap();
    let rx = store.begin_read().unwrap();
    assert_eq!(rx.quota_used("marketo", "2024-05-01").unwrap(), 7);
    assert_eq!(rx.quota_used("marketo", "2024-05-02").unwrap(), 1);
    assert_eq!(rx.quota_used("rally", "2024-05-01").unwrap(), 10);
    assert_eq!(rx.quota_used("rally", "2024-05-02").unwrap(), 0);
}

#[test]
fn token_debug_redacts_both_tokens() {
    let token = TokenRecord {
        access_token: "secret-access-xyz".to_owned(),
        refresh_token: Some("secret-refresh-abc".to_owned()),
        expires_at: Some(ts(0)),
    };
    let shown = format!("{token:?}");
    assert!(
        !shown.contains("secret-access-xyz") && !shown.contains("secret-refresh-abc"),
        "tokens leak: {shown}"
    );
    assert!(shown.contains("redacted"), "{shown}");
}

#[test]
fn companies_page_in_id_order() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    for id in ["c3", "c1", "c5", "c2", "c4"] {
        tx.put_company(&company(id, id)).unwrap();
    }
    tx.commit().unwrap();
    let rx = store.begin_read().unwrap();
    assert_eq!(rx.company_count().unwrap(), 5);
    let ids = |after, limit| -> Vec<String> {
        rx.companies(after, limit)
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect()
    };
    assert_eq!(ids(None, 2), ["c1", "c2"]);
    assert_eq!(ids(Some("c2"), 2), ["c3", "c4"]);
    assert_eq!(ids(Some("c4"), 2), ["c5"]);
    assert!(ids(Some("c5"), 2).is_empty());
}

#[test]
fn put_company_replaces_the_stored_company() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.put_company(&company("c1", "Acme")).unwrap();
    tx.put_company(&company("c1", "Acme Corp")).unwrap();
    assert_eq!(tx.company_count().unwrap(), 1);
    assert_eq!(
        tx.get_company("c1").unwrap(),
        Some(company("c1", "Acme Corp"))
    );
}

#[test]
fn corrupt_value_reports_table_and_key() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.table(COMPANIES)
        .unwrap()
        .insert("c1", b"not json".as_slice())
        .unwrap();
    let err = tx.get_company("c1").expect_err("garbage must not decode");
    let msg = err.to_string();
    assert!(
        msg.contains("companies") && msg.contains("c1"),
        "message: {msg}"
    );
}

/// Throughput of an engine-like workload: pages of 200 records, ~10 table writes each,
/// one durable commit per page. Run with
/// `cargo test --release --lib store::tests::engine_like_throughput -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark; run on demand in release mode"]
fn engine_like_throughput() {
    let (_dir, store) = temp_store();
    let pages = 50;
    let per_page = 200;
    let started = std::time::Instant::now();
    let mut commit_time = std::time::Duration::ZERO;
    for p in 0..pages {
        let tx = store.begin_write().unwrap();
        for r in 0..per_page {
            let n = p * per_page + r;
            let id = format!("c{n:08}");
            let vid = format!("R{n}");
            assert_eq!(tx.link_of("rally", &vid).unwrap(), None);
            tx.get_company(&id).unwrap();
            tx.put_company(&company(&id, "Acme")).unwrap();
            tx.put_link("rally", &vid, &id).unwrap();
            tx.put_match_key(&format!("domain:acme{n}.com"), &id)
                .unwrap();
            tx.put_ledger(
                "rally",
                &vid,
                &LedgerEntry {
                    hash: "0123456789abcdef0123456789abcdef".to_owned(),
                    at: ts(0),
                    prints: None,
                },
            )
            .unwrap();
            tx.enqueue("marketo", &id, ts(0)).unwrap();
            tx.enqueue("amocrm", &id, ts(0)).unwrap();
        }
        tx.put_cursor("rally", &Cursor(json!({"page": p}))).unwrap();
        let c = std::time::Instant::now();
        tx.commit().unwrap();
        commit_time += c.elapsed();
    }
    let elapsed = started.elapsed();
    let rate = (pages * per_page) as f64 / elapsed.as_secs_f64();
    println!(
        "{} records in {elapsed:?} ({commit_time:?} in commits): {rate:.0} records/s",
        pages * per_page
    );
}

#[test]
fn version_1_store_is_migrated_to_the_binary_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.redb");
    let acme = company("c1", "Acme");
    let ledger = LedgerEntry {
        hash: "abc".into(),
        at: ts(7),
        prints: None,
    };
    let entry = OutboxEntry {
        canonical_id: "c1".into(),
        enqueued_at: ts(8),
        attempts: 2,
        last_error: Some("timeout".into()),
        sending: false,
        changed_while_sending: false,
        unconfirmed_since: None,
    };
    {
        let store = Store::open(&path).unwrap();
        let tx = store.begin_write().unwrap();
        tx.table(META).unwrap().insert(SCHEMA_KEY, 1).unwrap();
        tx.table(COMPANIES)
            .unwrap()
            .insert("c1", serde_json::to_vec(&acme).unwrap().as_slice())
            .unwrap();
        tx.table(V2_LEDGER)
            .unwrap()
            .insert(
                ("rally", "r1"),
                serde_json::to_vec(&ledger).unwrap().as_slice(),
            )
            .unwrap();
        tx.table(OUTBOX)
            .unwrap()
            .insert(
                ("marketo", 1),
                serde_json::to_vec(&entry).unwrap().as_slice(),
            )
            .unwrap();
        tx.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let r = store.begin_read().unwrap();
    assert_eq!(r.get_company("c1").unwrap(), Some(acme));
    assert_eq!(r.ledger("rally", "r1").unwrap(), Some(ledger));
    assert_eq!(r.outbox_batch("marketo", 10).unwrap(), vec![(1, entry)]);
}

#[test]
fn version_2_links_ledger_and_outbox_index_are_migrated_to_shared_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.redb");
    let linked = LedgerEntry {
        hash: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        at: ts(7),
        prints: None,
    };
    let ledger_only = LedgerEntry {
        hash: "pushed".into(),
        at: ts(9),
        prints: None,
    };
    let entry = |id: &str| OutboxEntry {
        canonical_id: id.into(),
        enqueued_at: ts(8),
        attempts: 0,
        last_error: None,
        sending: false,
        changed_while_sending: false,
        unconfirmed_since: None,
    };
    {
        // A version-2 file: the old tables, written the way version 2 wrote them.
        let store = Store::open(&path).unwrap();
        let tx = store.begin_write().unwrap();
        tx.table(META).unwrap().insert(SCHEMA_KEY, 2).unwrap();
        let mut links = tx.table(V2_LINKS).unwrap();
        links.insert(("rally", "r1"), "c1").unwrap();
        links.insert(("rally", "r2"), "c2").unwrap();
        drop(links);
        let mut reverse = tx.table(REVERSE_LINKS).unwrap();
        reverse.insert(("c1", "rally"), "r1").unwrap();
        reverse.insert(("c2", "rally"), "r2").unwrap();
        drop(reverse);
        let mut ledger = tx.table(V2_LEDGER).unwrap();
        ledger
            .insert(("rally", "r1"), codec::encode_ledger(&linked).as_slice())
            .unwrap();
        ledger
            .insert(
                ("amocrm", "a9"),
                codec::encode_ledger(&ledger_only).as_slice(),
            )
            .unwrap();
        drop(ledger);
        let mut outbox = tx.table(OUTBOX).unwrap();
        for (target, seq, id) in [
            ("marketo", 1, "c1"),
            ("amocrm", 2, "c1"),
            ("marketo", 3, "c2"),
        ] {
            outbox
                .insert((target, seq), codec::encode_outbox(&entry(id)).as_slice())
                .unwrap();
        }
        drop(outbox);
        let mut index = tx.table(V2_OUTBOX_INDEX).unwrap();
        index.insert(("marketo", "c1"), 1).unwrap();
        index.insert(("amocrm", "c1"), 2).unwrap();
        index.insert(("marketo", "c2"), 3).unwrap();
        drop(index);
        let mut counts = tx.table(OUTBOX_COUNTS).unwrap();
        counts.insert("marketo", 2).unwrap();
        counts.insert("amocrm", 1).unwrap();
        drop(counts);
        tx.table(SEQUENCES).unwrap().insert(OUTBOX_SEQ, 3).unwrap();
        tx.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let r = store.begin_read().unwrap();
    assert_eq!(
        r.link_and_ledger("rally", "r1").unwrap(),
        (Some("c1".to_owned()), Some(linked))
    );
    assert_eq!(
        r.link_and_ledger("rally", "r2").unwrap(),
        (Some("c2".to_owned()), None)
    );
    assert_eq!(
        r.link_and_ledger("amocrm", "a9").unwrap(),
        (None, Some(ledger_only))
    );
    assert_eq!(
        r.vendor_id_of("c1", "rally").unwrap().as_deref(),
        Some("r1")
    );
    drop(r);

    // The migrated index still deduplicates, and removal still clears it.
    let tx = store.begin_write().unwrap();
    assert!(!tx.enqueue("marketo", "c1", ts(10)).unwrap());
    assert!(!tx.enqueue("amocrm", "c1", ts(10)).unwrap());
    assert_eq!(
        tx.outbox_remove("marketo", 1).unwrap(),
        OutboxRemoval::Removed
    );
    assert!(tx.enqueue("marketo", "c1", ts(11)).unwrap());
    assert!(!tx.enqueue("amocrm", "c1", ts(11)).unwrap());
    tx.commit().unwrap();
    let r = store.begin_read().unwrap();
    let seqs: Vec<u64> = r
        .outbox_batch("marketo", 10)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(seqs, vec![3, 4], "c1 queued again behind c2");
    assert_eq!(r.outbox_len("marketo").unwrap(), 2);
}

#[test]
fn a_removed_link_keeps_the_ledger_entry_and_relinking_keeps_it_too() {
    let (_dir, store) = temp_store();
    let e = LedgerEntry {
        hash: "h".into(),
        at: ts(1),
        prints: None,
    };
    let tx = store.begin_write().unwrap();
    tx.put_link("rally", "r1", "c1").unwrap();
    tx.put_ledger("rally", "r1", &e).unwrap();
    assert_eq!(
        tx.remove_link("rally", "r1").unwrap().as_deref(),
        Some("c1")
    );
    assert_eq!(
        tx.link_and_ledger("rally", "r1").unwrap(),
        (None, Some(e.clone()))
    );
    assert_eq!(tx.vendor_id_of("c1", "rally").unwrap(), None);
    tx.put_new_link("rally", "r1", "c2").unwrap();
    assert_eq!(
        tx.link_and_ledger("rally", "r1").unwrap(),
        (Some("c2".to_owned()), Some(e))
    );
}

#[test]
fn enqueue_new_queues_every_target_once_and_later_enqueues_deduplicate() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    assert_eq!(
        tx.enqueue_new(["marketo", "amocrm", "marketo"], "c1", ts(0))
            .unwrap(),
        2
    );
    assert!(!tx.enqueue("marketo", "c1", ts(1)).unwrap());
    assert!(!tx.enqueue("amocrm", "c1", ts(1)).unwrap());
    tx.commit().unwrap();
    let r = store.begin_read().unwrap();
    assert_eq!(r.outbox_len("marketo").unwrap(), 1);
    assert_eq!(r.outbox_len("amocrm").unwrap(), 1);
}

#[test]
fn a_company_refused_again_by_the_same_crm_keeps_one_dead_letter() {
    let (_dir, store) = temp_store();
    let tx = store.begin_write().unwrap();
    let first = tx
        .add_dead_letter(dead_letter_new("not an option: Tech"))
        .unwrap();
    let again = tx
        .add_dead_letter(DeadLetterNew {
            first_at: ts(100),
            last_at: ts(120),
            attempts: 1,
            ..dead_letter_new("not an option: Technology")
        })
        .unwrap();
    // Another CRM, another company, and a read: letters of their own.
    let other_crm = tx
        .add_dead_letter(DeadLetterNew {
            connector: "rally".into(),
            ..dead_letter_new("x")
        })
        .unwrap();
    let read = tx
        .add_dead_letter(DeadLetterNew {
            direction: Direction::Read,
            ..dead_letter_new("unmappable")
        })
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(first, again);
    assert!(other_crm != first && read != first && read != other_crm);
    let rx = store.begin_read().unwrap();
    assert_eq!(rx.dead_letter_count().unwrap(), 3);
    let one = rx.dead_letter(first).unwrap().unwrap();
    assert_eq!(one.reason, "not an option: Technology");
    assert_eq!(
        (one.first_at, one.last_at, one.attempts),
        (ts(0), ts(120), 4)
    );
    drop(rx);
    // Once removed (retried or dropped), a new refusal is a new letter.
    let tx = store.begin_write().unwrap();
    assert!(tx.remove_dead_letter(first).unwrap().is_some());
    let next = tx.add_dead_letter(dead_letter_new("again")).unwrap();
    tx.commit().unwrap();
    assert!(next > read);
    assert_eq!(store.begin_read().unwrap().dead_letter_count().unwrap(), 3);
}

#[test]
fn vendor_state_is_taken_from_a_scratch_copy_and_nothing_else() {
    let (_a, scratch) = temp_store();
    let (_b, store) = temp_store();
    let tx = scratch.begin_write().unwrap();
    tx.put_token(
        "amocrm",
        &TokenRecord {
            access_token: "at-2".to_owned(),
            refresh_token: Some("rt-2".to_owned()),
            expires_at: None,
        },
    )
    .unwrap();
    tx.add_quota("marketo", "2026-12-06", 7).unwrap();
    tx.put_cursor("last-call:marketo", &Cursor(json!(1_700_000_000_000i64)))
        .unwrap();
    tx.put_cursor("rally", &Cursor(json!({"offset": 5})))
        .unwrap();
    tx.commit().unwrap();

    store.take_vendor_state_from(&scratch).unwrap();
    let r = store.begin_read().unwrap();
    let token = r.token("amocrm").unwrap().unwrap();
    assert_eq!(token.refresh_token.as_deref(), Some("rt-2"));
    assert_eq!(r.quota_used("marketo", "2026-12-06").unwrap(), 7);
    assert!(r.cursor("last-call:marketo").unwrap().is_some());
    assert!(
        r.cursor("rally").unwrap().is_none(),
        "sync state was copied"
    );
}

#[test]
fn creates_in_flight_are_noted_per_content_and_forgotten_one_by_one() {
    let (_d, store) = temp_store();
    let tx = store.begin_write().unwrap();
    tx.put_company(&Company::new("c1".into())).unwrap();
    tx.put_company(&Company::new("c2".into())).unwrap();
    tx.note_create_in_flight("b", "h", "c1").unwrap();
    tx.note_create_in_flight("b", "h", "c2").unwrap();
    tx.note_create_in_flight("b", "h", "c1").unwrap();
    tx.commit().unwrap();
    let r = store.begin_read().unwrap();
    assert_eq!(r.creates_in_flight("b", "h").unwrap(), ["c1", "c2"]);
    assert!(r.creates_in_flight("a", "h").unwrap().is_empty());
    assert_eq!(
        r.unlinked_create_in_flight("b", "h").unwrap().as_deref(),
        Some("c1")
    );
    drop(r);
    // c1's record is linked: c2 is the one a record with that content was made for.
    let tx = store.begin_write().unwrap();
    tx.put_link("b", "b1", "c1").unwrap();
    assert_eq!(
        tx.unlinked_create_in_flight("b", "h").unwrap().as_deref(),
        Some("c2")
    );
    tx.forget_create_in_flight("b", "h", "c2").unwrap();
    assert_eq!(tx.unlinked_create_in_flight("b", "h").unwrap(), None);
    tx.forget_create_in_flight("b", "h", "c1").unwrap();
    assert!(tx.creates_in_flight("b", "h").unwrap().is_empty());
    tx.commit().unwrap();
}
