//! Property tests: for each CRM's default mapping (plus a custom JSON field), canonical
//! fields over the rules that go both ways survive `write`, the vendor JSON as text, and
//! `read` unchanged — Unicode, blank text (which reads back as null), and exact decimals
//! included.

use std::collections::BTreeSet;

use crmbridge::mapping::{FieldRule, Mapping, MappingRules, split_enum_suffix};
use crmbridge::model::{CrmKind, FieldType, Fields, Value, field_type};
use proptest::prelude::*;
use rust_decimal::Decimal;
use serde_json::{Map, Value as Json};

/// Text pieces that break naive handling: emoji (incl. ZWJ sequences), right-to-left
/// scripts, combining marks, quotes, escapes and commas.
fn tricky_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("👩‍👩‍👧".to_string()),
        Just("🏳️‍🌈".to_string()),
        Just("שלום".to_string()),
        Just("مرحبا\u{200F}".to_string()),
        Just("e\u{0301}\u{0308}".to_string()),
        Just("\"quoted\" \\ back/slash".to_string()),
        Just("a, b,c".to_string()),
        Just(" \t\n".to_string()),
        Just("\u{0000}\u{001F}".to_string()),
        "\\PC{0,12}",
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        prop::collection::vec(tricky_piece(), 1..4).prop_map(|p| p.concat()),
    ]
}

/// Decimals with up to 28 significant digits at any scale, either sign.
fn decimal() -> impl Strategy<Value = Decimal> {
    let max = 10i128.pow(28) - 1;
    (
        prop_oneof![-max..=max, -1_000_000i128..=1_000_000i128],
        0u32..=28,
    )
        .prop_map(|(m, scale)| Decimal::from_i128_with_scale(m, scale))
}

/// JSON numbers made from text, so they keep every digit (`arbitrary_precision`).
fn json_number() -> impl Strategy<Value = Json> {
    decimal().prop_map(|d| serde_json::from_str(&d.to_string()).expect("decimal text is JSON"))
}

/// Any JSON except a top-level null (which reads back as `Value::Null`, not JSON null).
fn json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        json_number(),
        text().prop_map(Json::String),
    ];
    let tree = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            prop::collection::vec((text(), inner), 0..4)
                .prop_map(|kv| Json::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    });
    tree.prop_filter("top-level null", |j| !j.is_null())
}

fn value_of(ty: FieldType) -> BoxedStrategy<Value> {
    match ty {
        FieldType::Text => text().prop_map(Value::Text).boxed(),
        FieldType::Int => any::<i64>().prop_map(Value::Int).boxed(),
        FieldType::Decimal => decimal().prop_map(Value::Decimal).boxed(),
        FieldType::Tags => prop::collection::btree_set(text(), 0..5)
            .prop_map(Value::Tags)
            .boxed(),
        FieldType::Json => json().prop_map(Value::Json).boxed(),
    }
}

/// Each field absent, null, or a value of its type.
fn canonical_fields(names: Vec<String>) -> BoxedStrategy<Fields> {
    let per_field: Vec<BoxedStrategy<Option<(String, Value)>>> = names
        .into_iter()
        .map(|name| {
            let ty = field_type(&name).expect("mapped fields have a type");
            let present = prop_oneof![Just(Value::Null), value_of(ty)];
            prop::option::of(present.prop_map(move |v| (name.clone(), v))).boxed()
        })
        .collect();
    per_field
        .prop_map(|pairs| pairs.into_iter().flatten().collect())
        .boxed()
}

fn mapping(kind: CrmKind) -> Mapping {
    let vendor_key = match kind {
        CrmKind::Amocrm => "cf.id.777",
        _ => "segmentBlob",
    };
    let rules = MappingRules {
        use_defaults: true,
        ignore: vec![],
        fields: vec![FieldRule {
            canonical: "custom.segment".into(),
            vendor: Some(vendor_key.into()),
            ..FieldRule::default()
        }],
    };
    Mapping::compile(kind, &rules).unwrap_or_else(|e| panic!("{kind}: {e:?}"))
}

/// Canonical fields the mapping both reads and writes.
fn both_ways(m: &Mapping) -> Vec<String> {
    let writes: BTreeSet<String> = m.write_fields().into_iter().collect();
    m.read_fields()
        .into_iter()
        .filter(|f| writes.contains(f))
        .collect()
}

fn normalized(fields: &Fields, keep: &[String]) -> Fields {
    fields
        .iter()
        .filter(|(k, _)| keep.contains(k))
        .map(|(k, v)| match v {
            // Blank text is no value: it reads back as null.
            Value::Text(t) if t.trim().is_empty() => (k.clone(), Value::Null),
            v => (k.clone(), v.normalized()),
        })
        .collect()
}

/// write → JSON text → parse → (connector strips amoCRM enum suffixes) → read.
fn round_trip(m: &Mapping, fields: &Fields) -> Result<Fields, TestCaseError> {
    let written = m
        .write(fields)
        .map_err(|e| TestCaseError::fail(format!("write: {e}")))?;
    let text = serde_json::to_string(&written).expect("a JSON map serialises");
    let parsed: Map<String, Json> =
        serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
    let vendor: Map<String, Json> = parsed
        .into_iter()
        .map(|(k, v)| (split_enum_suffix(&k).0.to_string(), v))
        .collect();
    m.read(&vendor)
        .map_err(|e| TestCaseError::fail(format!("read: {e}; vendor JSON {text}")))
}

fn check_round_trip(kind: CrmKind) {
    let m = mapping(kind);
    let keep = both_ways(&m);
    assert!(
        keep.contains(&"custom.segment".to_string()),
        "{kind}: {keep:?}"
    );
    proptest!(ProptestConfig::with_cases(300), |(fields in canonical_fields(keep.clone()))| {
        let back = round_trip(&m, &fields)?;
        prop_assert_eq!(normalized(&back, &keep), normalized(&fields, &keep));
    });
}

#[test]
fn rally_defaults_round_trip_canonical_fields_through_vendor_json_text() {
    check_round_trip(CrmKind::Rally);
}

#[test]
fn marketo_defaults_round_trip_canonical_fields_through_vendor_json_text() {
    check_round_trip(CrmKind::Marketo);
}

#[test]
fn amocrm_defaults_round_trip_canonical_fields_through_vendor_json_text() {
    check_round_trip(CrmKind::Amocrm);
}

#[test]
fn both_way_fields_of_each_default_mapping_are_as_documented() {
    let marketo = both_ways(&mapping(CrmKind::Marketo));
    assert!(
        !marketo.contains(&"domain".to_string()),
        "Marketo domain is read-only: {marketo:?}"
    );
    let amo = both_ways(&mapping(CrmKind::Amocrm));
    for f in ["name", "tags", "phone", "annualRevenue", "employeeCount"] {
        assert!(amo.contains(&f.to_string()), "amoCRM lacks {f}: {amo:?}");
    }
    let rally = both_ways(&mapping(CrmKind::Rally));
    assert_eq!(
        rally.len(),
        18,
        "17 standard fields + custom.segment: {rally:?}"
    );
}
