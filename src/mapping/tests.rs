//! Unit tests of the compiled mapping: rule semantics, type conversion and errors.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value as Json, json};

use super::*;
use crate::model::{CrmKind, FieldPrints, Fields, Value, parse_decimal};

fn obj(v: Json) -> Map<String, Json> {
    match v {
        Json::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn fields(pairs: &[(&str, Value)]) -> Fields {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn rule(canonical: &str, vendor: &str) -> FieldRule {
    FieldRule {
        canonical: canonical.into(),
        vendor: Some(vendor.into()),
        ..FieldRule::default()
    }
}

/// A mapping of only the given rules (no defaults).
fn only(kind: CrmKind, rules: Vec<FieldRule>) -> Mapping {
    let rules = MappingRules {
        use_defaults: false,
        ignore: vec![],
        fields: rules,
    };
    Mapping::compile(kind, &rules).unwrap_or_else(|e| panic!("compile failed: {e:?}"))
}

fn defaults(kind: CrmKind) -> Mapping {
    Mapping::compile(
        kind,
        &MappingRules {
            use_defaults: true,
            ..MappingRules::default()
        },
    )
    .unwrap_or_else(|e| panic!("defaults of {kind} do not compile: {e:?}"))
}

fn with_transforms(ts: &[Transform]) -> Mapping {
    only(
        CrmKind::Rally,
        vec![FieldRule {
            transforms: ts.to_vec(),
            ..rule("industry", "ind")
        }],
    )
}

fn read_industry(m: &Mapping, raw: &str) -> Option<Value> {
    m.read(&obj(json!({ "ind": raw })))
        .unwrap()
        .get("industry")
        .cloned()
}

#[test]
fn default_mappings_of_every_crm_compile() {
    for kind in [CrmKind::Rally, CrmKind::Marketo, CrmKind::Amocrm] {
        defaults(kind);
    }
}

#[test]
fn rally_defaults_are_identity_without_external_company_id() {
    let m = defaults(CrmKind::Rally);
    let keys = m.vendor_keys();
    assert!(!keys.contains(&"externalCompanyId".to_string()), "{keys:?}");
    assert_eq!(
        m.read_fields(),
        keys,
        "every Rally key is its canonical name"
    );
    assert_eq!(keys.len(), 17, "{keys:?}");
}

#[test]
fn transform_trim_strips_surrounding_space() {
    let m = with_transforms(&[Transform::Trim]);
    assert_eq!(read_industry(&m, " \t Retail \n"), Some(text("Retail")));
}

#[test]
fn transform_lowercase_lowers_unicode_text() {
    let m = with_transforms(&[Transform::Lowercase]);
    assert_eq!(read_industry(&m, "ÉNERGIE"), Some(text("énergie")));
}

#[test]
fn transform_uppercase_raises_text() {
    let m = with_transforms(&[Transform::Uppercase]);
    assert_eq!(read_industry(&m, "retail"), Some(text("RETAIL")));
}

#[test]
fn transform_domain_from_url_keeps_the_bare_host() {
    let m = with_transforms(&[Transform::DomainFromUrl]);
    assert_eq!(
        read_industry(&m, "HTTPS://www.Acme.com/about"),
        Some(text("acme.com"))
    );
}

#[test]
fn transform_domain_from_url_reads_no_domain_as_null() {
    let m = with_transforms(&[Transform::DomainFromUrl]);
    assert_eq!(read_industry(&m, "not a url"), Some(Value::Null));
}

#[test]
fn transforms_apply_in_order() {
    let m = with_transforms(&[Transform::Trim, Transform::Uppercase]);
    assert_eq!(read_industry(&m, "  it "), Some(text("IT")));
}

#[test]
fn transforms_do_not_apply_on_write() {
    let m = with_transforms(&[Transform::Uppercase]);
    let out = m.write(&fields(&[("industry", text("retail"))])).unwrap();
    assert_eq!(out.get("ind"), Some(&json!("retail")));
}

fn value_mapped() -> Mapping {
    only(
        CrmKind::Marketo,
        vec![FieldRule {
            values: BTreeMap::from([
                ("Tech".to_string(), "technology".to_string()),
                ("Technology".to_string(), "technology".to_string()),
                ("Fin".to_string(), "finance".to_string()),
            ]),
            ..rule("industry", "industry")
        }],
    )
}

#[test]
fn value_map_translates_vendor_values_on_read() {
    let m = value_mapped();
    let got = m.read(&obj(json!({"industry": "Fin"}))).unwrap();
    assert_eq!(got.get("industry"), Some(&text("finance")));
}

#[test]
fn value_map_translates_canonical_values_back_on_write() {
    let m = value_mapped();
    let out = m.write(&fields(&[("industry", text("finance"))])).unwrap();
    assert_eq!(out.get("industry"), Some(&json!("Fin")));
}

#[test]
fn value_map_writes_the_first_vendor_value_of_several() {
    let m = value_mapped();
    let out = m
        .write(&fields(&[("industry", text("technology"))]))
        .unwrap();
    assert_eq!(out.get("industry"), Some(&json!("Tech")));
}

#[test]
fn value_map_passes_unmapped_values_through_both_ways() {
    let m = value_mapped();
    let got = m.read(&obj(json!({"industry": "Retail"}))).unwrap();
    assert_eq!(got.get("industry"), Some(&text("Retail")));
    let out = m.write(&fields(&[("industry", text("Retail"))])).unwrap();
    assert_eq!(out.get("industry"), Some(&json!("Retail")));
}

#[test]
fn value_map_applies_to_each_tag() {
    let m = only(
        CrmKind::Rally,
        vec![FieldRule {
            values: BTreeMap::from([("VIP".to_string(), "vip".to_string())]),
            ..rule("tags", "tags")
        }],
    );
    let got = m.read(&obj(json!({"tags": ["VIP", "x"]}))).unwrap();
    let want = Value::Tags(BTreeSet::from(["vip".to_string(), "x".to_string()]));
    assert_eq!(got.get("tags"), Some(&want));
    assert_eq!(
        m.write(&got).unwrap().get("tags"),
        Some(&json!(["VIP", "x"]))
    );
}

fn defaulted() -> Mapping {
    only(
        CrmKind::Rally,
        vec![FieldRule {
            default: Some(toml::Value::String("unknown".into())),
            ..rule("industry", "industry")
        }],
    )
}

#[test]
fn default_applies_on_read_when_vendor_key_is_missing() {
    let got = defaulted().read(&Map::new()).unwrap();
    assert_eq!(got.get("industry"), Some(&text("unknown")));
}

#[test]
fn default_applies_on_read_when_vendor_value_is_null() {
    let got = defaulted().read(&obj(json!({"industry": null}))).unwrap();
    assert_eq!(got.get("industry"), Some(&text("unknown")));
}

#[test]
fn default_does_not_replace_a_present_value() {
    let got = defaulted()
        .read(&obj(json!({"industry": "Retail"})))
        .unwrap();
    assert_eq!(got.get("industry"), Some(&text("Retail")));
}

#[test]
fn empty_text_reads_as_no_value() {
    // Rally answers "", Marketo null, amoCRM leaves the field out: one meaning, one value
    // (else a write of "" that amoCRM drops reads back as a change).
    for raw in [json!(""), json!("   "), json!(null)] {
        let got = defaulted().read(&obj(json!({"industry": raw}))).unwrap();
        assert_eq!(got.get("industry"), Some(&text("unknown")), "{raw}");
    }
    let plain = Mapping::compile(CrmKind::Rally, &MappingRules::default()).unwrap();
    let got = plain
        .read(&obj(json!({"name": "Acme", "city": ""})))
        .unwrap();
    assert_eq!(got.get("city"), Some(&Value::Null));
}

#[test]
fn default_of_the_wrong_type_fails_compile() {
    let rules = MappingRules {
        use_defaults: false,
        ignore: vec![],
        fields: vec![FieldRule {
            default: Some(toml::Value::String("many".into())),
            ..rule("employeeCount", "employeeCount")
        }],
    };
    let errs = Mapping::compile(CrmKind::Rally, &rules).unwrap_err();
    assert!(
        matches!(&errs[..], [MappingError::BadDefault { canonical, .. }] if canonical == "employeeCount"),
        "{errs:?}"
    );
}

#[test]
fn absent_vendor_key_leaves_canonical_field_absent() {
    let got = defaults(CrmKind::Rally)
        .read(&obj(json!({"name": "Acme"})))
        .unwrap();
    assert_eq!(got, fields(&[("name", text("Acme"))]));
}

#[test]
fn json_null_reads_as_null_and_null_writes_as_json_null() {
    let m = defaults(CrmKind::Rally);
    let got = m.read(&obj(json!({"annualRevenue": null}))).unwrap();
    assert_eq!(got.get("annualRevenue"), Some(&Value::Null));
    assert_eq!(m.write(&got).unwrap(), obj(json!({"annualRevenue": null})));
}

#[test]
fn absent_canonical_field_is_not_written() {
    let out = defaults(CrmKind::Rally)
        .write(&fields(&[("city", text("Oslo"))]))
        .unwrap();
    assert_eq!(out, obj(json!({"city": "Oslo"})));
}

#[test]
fn read_only_rule_is_never_written() {
    let m = defaults(CrmKind::Marketo);
    assert!(m.read_fields().contains(&"domain".to_string()));
    assert!(!m.write_fields().contains(&"domain".to_string()));
    let out = m
        .write(&fields(&[
            ("domain", text("acme.com")),
            ("website", text("https://www.acme.com")),
        ]))
        .unwrap();
    assert_eq!(out, obj(json!({"website": "https://www.acme.com"})));
}

#[test]
fn marketo_derives_domain_from_website_on_read() {
    let got = defaults(CrmKind::Marketo)
        .read(&obj(json!({"website": "http://WWW.Acme.com/x"})))
        .unwrap();
    assert_eq!(got.get("domain"), Some(&text("acme.com")));
    assert_eq!(got.get("website"), Some(&text("http://WWW.Acme.com/x")));
}

#[test]
fn write_only_rule_is_never_read() {
    let m = only(
        CrmKind::Rally,
        vec![FieldRule {
            direction: Direction::WriteOnly,
            ..rule("notes", "notes")
        }],
    );
    assert_eq!(m.read_fields(), Vec::<String>::new());
    assert_eq!(m.write_fields(), vec!["notes".to_string()]);
    assert_eq!(m.read(&obj(json!({"notes": "x"}))).unwrap(), Fields::new());
}

#[test]
fn ignore_drops_a_default_rule() {
    let m = Mapping::compile(
        CrmKind::Marketo,
        &MappingRules {
            use_defaults: true,
            ignore: vec!["phone".into()],
            fields: vec![],
        },
    )
    .unwrap();
    assert!(!m.read_fields().contains(&"phone".to_string()));
    assert!(!m.vendor_keys().contains(&"mainPhone".to_string()));
}

#[test]
fn ignore_of_an_unknown_field_fails_compile() {
    let errs = Mapping::compile(
        CrmKind::Marketo,
        &MappingRules {
            use_defaults: true,
            ignore: vec!["phnoe".into()],
            fields: vec![],
        },
    )
    .unwrap_err();
    assert_eq!(
        errs,
        vec![MappingError::UnknownCanonical {
            canonical: "phnoe".into()
        }]
    );
}

#[test]
fn override_replaces_a_default_rule() {
    let m = Mapping::compile(
        CrmKind::Marketo,
        &MappingRules {
            use_defaults: true,
            ignore: vec![],
            fields: vec![rule("industry", "sicCode")],
        },
    )
    .unwrap();
    let got = m
        .read(&obj(json!({"industry": "Retail", "sicCode": "5411"})))
        .unwrap();
    assert_eq!(got.get("industry"), Some(&text("5411")));
    assert!(!m.vendor_keys().contains(&"industry".to_string()));
}

#[test]
fn rule_adds_a_custom_field_as_json() {
    let m = Mapping::compile(
        CrmKind::Rally,
        &MappingRules {
            use_defaults: true,
            ignore: vec![],
            fields: vec![rule("custom.segment", "segment")],
        },
    )
    .unwrap();
    // Parsed from text: `json!` would pass 1.50 through an f64.
    let segment: Json = serde_json::from_str(r#"{"tier": 1, "x": [1.50]}"#).unwrap();
    let got = m.read(&obj(json!({ "segment": segment.clone() }))).unwrap();
    assert_eq!(got.get("custom.segment"), Some(&Value::Json(segment)));
    assert_eq!(
        m.write(&got).unwrap().get("segment").map(|v| v.to_string()),
        Some(r#"{"tier":1,"x":[1.50]}"#.to_string())
    );
}

#[test]
fn two_rules_writing_one_vendor_key_fail_compile() {
    let errs = Mapping::compile(
        CrmKind::Rally,
        &MappingRules {
            use_defaults: true,
            ignore: vec![],
            fields: vec![rule("custom.town", "city")],
        },
    )
    .unwrap_err();
    assert!(
        matches!(&errs[..], [MappingError::VendorKeyConflict { vendor, .. }] if vendor == "city"),
        "{errs:?}"
    );
}

#[test]
fn amocrm_options_are_rejected_for_other_crms() {
    let errs = Mapping::compile(
        CrmKind::Rally,
        &MappingRules {
            use_defaults: false,
            ignore: vec![],
            fields: vec![FieldRule {
                canonical: "phone".into(),
                field_code: Some("PHONE".into()),
                ..FieldRule::default()
            }],
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            &errs[..],
            [MappingError::OptionNotForKind {
                option: "field_code",
                ..
            }]
        ),
        "{errs:?}"
    );
}

#[test]
fn amocrm_write_key_carries_the_enum_suffix() {
    let out = defaults(CrmKind::Amocrm)
        .write(&fields(&[("phone", text("+7 495 000-00-00"))]))
        .unwrap();
    assert_eq!(out, obj(json!({"cf.code.PHONE@WORK": "+7 495 000-00-00"})));
}

#[test]
fn amocrm_read_key_has_no_enum_suffix() {
    let m = defaults(CrmKind::Amocrm);
    let got = m
        .read(&obj(json!({"cf.code.PHONE": "+7 495 000-00-00"})))
        .unwrap();
    assert_eq!(got.get("phone"), Some(&text("+7 495 000-00-00")));
    assert!(m.vendor_keys().contains(&"cf.code.PHONE".to_string()));
}

#[test]
fn amocrm_rules_address_fields_by_code_id_and_name() {
    let m = only(
        CrmKind::Amocrm,
        vec![
            FieldRule {
                canonical: "custom.vat".into(),
                field_id: Some(1234),
                ..FieldRule::default()
            },
            FieldRule {
                canonical: "notes".into(),
                field_name: Some("Notes".into()),
                ..FieldRule::default()
            },
            FieldRule {
                canonical: "phone".into(),
                vendor: Some("cf.code.PHONE@MOB".into()),
                ..FieldRule::default()
            },
        ],
    );
    assert_eq!(
        m.vendor_keys(),
        vec!["cf.code.PHONE", "cf.id.1234", "cf.name.Notes"]
    );
    let out = m.write(&fields(&[("phone", text("1"))])).unwrap();
    assert_eq!(out, obj(json!({"cf.code.PHONE@MOB": "1"})));
}

#[test]
fn split_enum_suffix_keeps_at_signs_of_field_names() {
    assert_eq!(
        split_enum_suffix("cf.code.PHONE@WORK"),
        ("cf.code.PHONE", Some("WORK"))
    );
    assert_eq!(
        split_enum_suffix("cf.name.E@mail"),
        ("cf.name.E@mail", None)
    );
    assert_eq!(split_enum_suffix("a@B"), ("a@B", None));
}

#[test]
fn without_vendor_keys_drops_rules_and_names_their_fields() {
    let m = defaults(CrmKind::Amocrm);
    let (m2, dropped) = m.without_vendor_keys(&[
        "cf.name.Industry".to_string(),
        "cf.code.PHONE@WORK".to_string(),
        "cf.name.NotMapped".to_string(),
    ]);
    assert_eq!(dropped, vec!["industry".to_string(), "phone".to_string()]);
    assert!(!m2.read_fields().contains(&"industry".to_string()));
    assert!(!m2.write_fields().contains(&"phone".to_string()));
    assert_eq!(m2.read_fields().len(), m.read_fields().len() - 2);
    let got = m2
        .read(&obj(json!({"cf.name.Industry": "x", "name": "Acme"})))
        .unwrap();
    assert_eq!(got, fields(&[("name", text("Acme"))]));
}

#[test]
fn an_amocrm_account_without_a_domain_field_reads_the_domain_from_web() {
    let lacking = |absent: &'static [&'static str]| {
        move |keys: &[String]| -> Vec<String> {
            keys.iter()
                .filter(|k| absent.contains(&k.as_str()))
                .cloned()
                .collect()
        }
    };
    let fitted = Mapping::fit(
        CrmKind::Amocrm,
        &MappingRules::default(),
        lacking(&["cf.name.Domain"]),
    )
    .unwrap();
    assert_eq!(fitted.dropped, ["domain"]);
    assert_eq!(fitted.stand_ins, ["domain"]);
    let got = fitted
        .mapping
        .read(&obj(
            json!({"name": "Acme", "cf.code.WEB": "https://www.Acme.com/about"}),
        ))
        .unwrap();
    assert_eq!(got.get("domain"), Some(&text("acme.com")));
    assert_eq!(
        got.get("website"),
        Some(&text("https://www.Acme.com/about"))
    );
    // Read only: the domain is never written into Web.
    let written = fitted
        .mapping
        .write(&fields(&[
            ("name", text("Acme")),
            ("domain", text("acme.com")),
        ]))
        .unwrap();
    assert!(!written.keys().any(|k| k.contains("WEB")), "{written:?}");

    // An account with a Domain field keeps it; a config that maps or ignores the domain
    // itself gets no stand-in.
    let with = Mapping::fit(CrmKind::Amocrm, &MappingRules::default(), lacking(&[])).unwrap();
    assert!(with.stand_ins.is_empty() && with.missing.is_empty());
    let ignoring = MappingRules {
        ignore: vec!["domain".into()],
        ..MappingRules::default()
    };
    let fitted = Mapping::fit(CrmKind::Amocrm, &ignoring, lacking(&["cf.name.Domain"])).unwrap();
    assert!(fitted.stand_ins.is_empty(), "{fitted:?}");
    assert!(!fitted.mapping.read_fields().contains(&"domain".to_string()));
}

#[test]
fn decimal_survives_exactly_both_ways() {
    let m = defaults(CrmKind::Rally);
    let raw: Map<String, Json> =
        serde_json::from_str(r#"{"annualRevenue": 12345678901234567890.12}"#).unwrap();
    let got = m.read(&raw).unwrap();
    let want = parse_decimal("12345678901234567890.12").unwrap();
    assert_eq!(got.get("annualRevenue"), Some(&Value::Decimal(want)));
    let text = serde_json::to_string(&m.write(&got).unwrap()).unwrap();
    assert_eq!(text, r#"{"annualRevenue":12345678901234567890.12}"#);
}

#[test]
fn decimal_reads_from_numeric_text() {
    let got = defaults(CrmKind::Rally)
        .read(&obj(json!({"annualRevenue": "-0.10"})))
        .unwrap();
    assert_eq!(
        got.get("annualRevenue"),
        Some(&Value::Decimal(parse_decimal("-0.1").unwrap()))
    );
}

#[test]
fn int_reads_numbers_and_numeric_text() {
    let m = defaults(CrmKind::Marketo);
    for (raw, want) in [
        (json!(250), 250),
        (json!("  -7 "), -7),
        (json!(1e3), 1000),
        (json!("12.0"), 12),
    ] {
        let got = m.read(&obj(json!({ "numberOfEmployees": raw }))).unwrap();
        assert_eq!(got.get("employeeCount"), Some(&Value::Int(want)), "{raw}");
    }
}

#[test]
fn empty_text_for_a_number_reads_as_null() {
    let got = defaults(CrmKind::Marketo)
        .read(&obj(json!({"numberOfEmployees": "", "annualRevenue": " "})))
        .unwrap();
    assert_eq!(got.get("employeeCount"), Some(&Value::Null));
    assert_eq!(got.get("annualRevenue"), Some(&Value::Null));
}

#[test]
fn fractional_int_is_an_error_naming_field_key_and_value() {
    let err = defaults(CrmKind::Marketo)
        .read(&obj(json!({"numberOfEmployees": 12.5})))
        .unwrap_err();
    assert_eq!(
        err,
        MappingError::BadNumber {
            canonical: "employeeCount".into(),
            vendor: "numberOfEmployees".into(),
            expected: "a whole number",
            value: "12.5".into(),
        }
    );
    let msg = err.to_string();
    assert!(
        msg.contains("employeeCount") && msg.contains("numberOfEmployees") && msg.contains("12.5"),
        "{msg}"
    );
}

#[test]
fn garbage_decimal_is_an_error_naming_field_and_value() {
    let err = defaults(CrmKind::Rally)
        .read(&obj(json!({"annualRevenue": "about 3M"})))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("annualRevenue") && msg.contains("about 3M"),
        "{msg}"
    );
}

#[test]
fn wrong_json_type_is_an_error_naming_field_and_value() {
    let err = defaults(CrmKind::Rally)
        .read(&obj(json!({"city": {"name": "Oslo"}})))
        .unwrap_err();
    assert!(
        matches!(&err, MappingError::WrongType { canonical, value, .. }
            if canonical == "city" && value.contains("Oslo")),
        "{err:?}"
    );
}

#[test]
fn wrong_canonical_type_is_an_error_on_write() {
    let err = defaults(CrmKind::Rally)
        .write(&fields(&[("employeeCount", text("many"))]))
        .unwrap_err();
    assert!(
        matches!(&err, MappingError::WrongType { canonical, vendor, value, .. }
            if canonical == "employeeCount" && vendor == "employeeCount" && value.contains("many")),
        "{err:?}"
    );
}

#[test]
fn error_values_are_truncated() {
    let long = "x".repeat(500);
    let err = defaults(CrmKind::Rally)
        .read(&obj(json!({"annualRevenue": long})))
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.len() < 250 && msg.contains('…'), "{msg}");
}

#[test]
fn text_reads_numbers_and_bools_as_their_text() {
    let got = defaults(CrmKind::Rally)
        .read(&obj(json!({"postalCode": 1050, "notes": true})))
        .unwrap();
    assert_eq!(got.get("postalCode"), Some(&text("1050")));
    assert_eq!(got.get("notes"), Some(&text("true")));
}

#[test]
fn tags_read_from_strings_objects_or_comma_text_as_a_set() {
    let m = defaults(CrmKind::Amocrm);
    let want = Value::Tags(BTreeSet::from(["a".to_string(), "b c".to_string()]));
    for raw in [
        json!(["b c", "a", "a"]),
        json!([{"id": 1, "name": "a"}, {"name": "b c"}]),
        json!("a, b c,,a"),
    ] {
        let got = m.read(&obj(json!({ "tags": raw }))).unwrap();
        assert_eq!(got.get("tags"), Some(&want), "{raw}");
    }
}

#[test]
fn tags_write_as_a_sorted_array() {
    let tags = Value::Tags(BTreeSet::from([
        "z".to_string(),
        "ä".to_string(),
        "a".to_string(),
    ]));
    let out = defaults(CrmKind::Rally)
        .write(&fields(&[("tags", tags)]))
        .unwrap();
    assert_eq!(out.get("tags"), Some(&json!(["a", "z", "ä"])));
}

#[test]
fn decimal_with_more_digits_than_it_can_hold_is_an_error_not_rounded() {
    let m = defaults(CrmKind::Rally);
    for raw in [
        "1.00000000000000000000000000001",
        "12345678901234567890123456789.5",
        "123456789012345678901234567890",
        "1e40",
    ] {
        let vendor: Map<String, Json> =
            serde_json::from_str(&format!(r#"{{"annualRevenue": {raw}}}"#)).unwrap();
        let err = m.read(&vendor);
        assert!(
            matches!(&err, Err(MappingError::BadNumber { canonical, .. }) if canonical == "annualRevenue"),
            "{raw}: {err:?}"
        );
    }
}

#[test]
fn decimal_keeps_trailing_zeros_and_leading_zeros_meaningless() {
    let m = defaults(CrmKind::Rally);
    for (raw, want) in [
        ("007.500", "7.5"),
        ("-0.000", "0"),
        ("+3", "3"),
        ("1.5e3", "1500"),
    ] {
        let got = m.read(&obj(json!({ "annualRevenue": raw }))).unwrap();
        assert_eq!(
            got.get("annualRevenue").map(Value::normalized),
            Some(Value::Decimal(parse_decimal(want).unwrap())),
            "{raw}"
        );
    }
}

#[test]
fn rules_parse_from_toml_and_compile() {
    let rules: MappingRules = toml::from_str(
        r#"
        ignore = ["state"]
        [[fields]]
        canonical = "industry"
        vendor = "sicCode"
        direction = "read-only"
        transforms = ["trim", "uppercase"]
        values = { "5411" = "GROCERY" }
        [[fields]]
        canonical = "custom.tier"
        vendor = "tier"
        default = 3
        "#,
    )
    .unwrap();
    let m = Mapping::compile(CrmKind::Marketo, &rules).unwrap();
    assert!(!m.read_fields().contains(&"state".to_string()));
    assert!(!m.write_fields().contains(&"industry".to_string()));
    let got = m.read(&obj(json!({"sicCode": " 5411 "}))).unwrap();
    assert_eq!(got.get("industry"), Some(&text("GROCERY")));
    assert_eq!(got.get("custom.tier"), Some(&Value::Json(json!(3))));
}

#[test]
fn compile_reports_every_bad_rule() {
    let rules = MappingRules {
        use_defaults: false,
        ignore: vec![],
        fields: vec![
            FieldRule {
                canonical: "phone".into(),
                ..FieldRule::default()
            },
            FieldRule {
                transforms: vec![Transform::Lowercase],
                ..rule("employeeCount", "n")
            },
            rule("nosuch", "x"),
        ],
    };
    let errs = Mapping::compile(CrmKind::Rally, &rules).unwrap_err();
    assert_eq!(errs.len(), 3, "{errs:?}");
}

#[test]
fn enum_code_on_a_built_in_amocrm_field_fails_compile() {
    let errs = Mapping::compile(
        CrmKind::Amocrm,
        &MappingRules {
            use_defaults: false,
            ignore: vec![],
            fields: vec![FieldRule {
                enum_code: Some("WORK".into()),
                ..rule("name", "name")
            }],
        },
    )
    .unwrap_err();
    assert!(
        matches!(&errs[..], [MappingError::BadEnumCode { vendor, .. }] if vendor == "name"),
        "{errs:?}"
    );
}

#[test]
fn lower_case_enum_code_fails_compile() {
    let errs = Mapping::compile(
        CrmKind::Amocrm,
        &MappingRules {
            use_defaults: false,
            ignore: vec![],
            fields: vec![FieldRule {
                canonical: "phone".into(),
                field_code: Some("PHONE".into()),
                enum_code: Some("work".into()),
                ..FieldRule::default()
            }],
        },
    )
    .unwrap_err();
    assert!(
        matches!(&errs[..], [MappingError::BadEnumCode { enum_code, .. }] if enum_code == "work"),
        "{errs:?}"
    );
}

#[test]
fn keys_the_record_already_holds_are_left_out_of_a_partial_update() {
    // amoCRM's defaults and a write-only field.
    let m = Mapping::compile(
        CrmKind::Amocrm,
        &MappingRules {
            use_defaults: true,
            ignore: vec![],
            fields: vec![FieldRule {
                direction: Direction::WriteOnly,
                ..rule("custom.source", "cf.Source")
            }],
        },
    )
    .unwrap();
    let held = obj(json!({
        "name": "Acme", "cf.code.WEB": "https://acme.example", "cf.code.PHONE": "+1 555 0100",
        "cf.name.Industry": "Retail",
    }));
    let before = m.read_prints(&m.read(&held).unwrap());
    let mut company = m.read(&held).unwrap();
    company.insert("name".into(), text("Acme Renamed"));
    company.insert("custom.source".into(), text("crm"));
    company.insert("phone".into(), text("+1 555 0111"));
    let mut written = m.write(&company).unwrap();
    let after = m.written_prints(&company, Before::Record(&before)).unwrap();
    m.drop_held_keys(&mut written, &before, &after);
    let mut keys: Vec<&str> = written.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        // The changed name and phone, and the write-only field (what the record holds
        // there is unknown); Web and Industry are held already.
        ["cf.Source", "cf.code.PHONE@WORK", "name"],
    );
    // Prints of another layout say nothing about these fields.
    let mut all = m.write(&company).unwrap();
    let other = FieldPrints {
        layout: before.layout ^ 1,
        ..before.clone()
    };
    m.drop_held_keys(&mut all, &other, &after);
    assert_eq!(all.len(), m.write(&company).unwrap().len());
    assert!(all.contains_key("cf.code.WEB") && all.contains_key("cf.name.Industry"));
    // An unknown print (a write left it so) is not a held value.
    let mut unknown = before.clone();
    unknown
        .values
        .iter_mut()
        .for_each(|p| *p = FieldPrints::UNKNOWN);
    let mut all = m.write(&company).unwrap();
    m.drop_held_keys(&mut all, &unknown, &after);
    assert_eq!(all.len(), m.write(&company).unwrap().len());
}

#[test]
fn a_write_knows_the_domain_amocrm_reads_off_the_website_it_sets() {
    // An account without a "Domain" field: the domain is read off the website. The
    // write sets only the website; the record then reads back with that domain, and a
    // print left unknown made our own write read back as a change of the domain.
    let m = Mapping::fit(CrmKind::Amocrm, &MappingRules::default(), |keys| {
        keys.iter()
            .filter(|k| k.ends_with("Domain"))
            .cloned()
            .collect()
    })
    .unwrap()
    .mapping;
    let values: Fields = [
        ("name".to_string(), text("Acme")),
        ("website".to_string(), text("https://www.acme.example/en")),
    ]
    .into_iter()
    .collect();
    let written = m.written_prints(&values, Before::New).unwrap();
    let read = m.read_prints(&m.read(&m.write(&values).unwrap()).unwrap());
    let i = m.print_fields().position(|f| f == "domain").unwrap();
    assert_ne!(written.values[i], FieldPrints::UNKNOWN);
    assert_eq!(written.values[i], read.values[i]);
    assert_eq!(
        m.read(&m.write(&values).unwrap()).unwrap().get("domain"),
        Some(&text("acme.example"))
    );
}
