//! Unit tests of the semantic checks and defaults that the integration tests do not cover.

use std::path::Path;
use std::time::Duration;

use super::*;

const RALLY: &str = r#"
flows = []
[connectors.rally]
kind = "rally"
base_url = "https://acme.rallycrm.io"
api_key = { env = "X" }
"#;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(text, Path::new("/etc/crmbridge/crmbridge.toml"))
}

/// The messages of a config that must fail.
fn messages(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(c) => panic!("should be rejected: {c:#?}"),
        Err(e) => e
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.key, e.message))
            .collect(),
    }
}

#[test]
fn defaults_follow_each_kind() {
    let text = r#"
flows = []
[connectors.m]
kind = "marketo"
base_url = "https://1-a.mktorest.com"
client_id = { env = "A" }
client_secret = { env = "B" }
[connectors.a]
kind = "amocrm"
base_url = "https://x.amocrm.ru"
auth = { type = "long_lived", token = { env = "C" } }
"#;
    let c = parse(text).unwrap_or_else(|e| panic!("{e}"));
    let m = c.connectors["m"].common();
    assert_eq!(m.batch_size, 300);
    assert_eq!(
        m.limits.requests_per_window,
        Some((100, Duration::from_secs(20)))
    );
    assert_eq!(
        (m.limits.max_concurrent, m.limits.daily_quota),
        (10, Some(50_000))
    );
    assert_eq!(m.limits.daily_share, 0.5);
    assert_eq!(
        (m.timeouts.read, m.timeouts.write),
        (Duration::from_secs(30), Duration::from_secs(60))
    );
    let a = c.connectors["a"].common();
    assert_eq!(
        (a.batch_size, a.limits.requests_per_second),
        (50, Some(7.0))
    );
    assert_eq!(c.daemon.listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(c.daemon.unhealthy_after, Duration::from_secs(900));
    assert_eq!(
        c.match_keys,
        [MatchKey::Domain, MatchKey::ExternalCompanyId]
    );
    assert!(!c.propagate_deletes);
}

#[test]
fn relative_store_path_resolves_against_the_config_directory() {
    let c = parse(&format!("{RALLY}\n[store]\npath = \"data/x.redb\"\n")).unwrap();
    assert_eq!(c.store.path, Path::new("/etc/crmbridge/data/x.redb"));
}

#[test]
fn marketo_rest_suffix_is_stripped_and_paths_end_with_a_slash() {
    let text = r#"
flows = []
[connectors.m]
kind = "marketo"
base_url = "https://1-a.mktorest.com/rest/"
client_id = { env = "A" }
client_secret = { env = "B" }
"#;
    let c = parse(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.connectors["m"].common().base_url.as_str(),
        "https://1-a.mktorest.com/"
    );
    let r = parse(&RALLY.replace("rallycrm.io\"", "rallycrm.io/tenant\"")).unwrap();
    assert_eq!(
        r.connectors["rally"].common().base_url.as_str(),
        "https://acme.rallycrm.io/tenant/"
    );
}

#[test]
fn base_url_must_be_http_or_https() {
    let m = messages(&RALLY.replace("https://acme.rallycrm.io", "ftp://acme.rallycrm.io"));
    assert_eq!(
        m,
        [
            "connectors.rally.base_url: \"ftp://acme.rallycrm.io\" must be an http:// or https:// URL with a host"
        ]
    );
}

#[test]
fn amocrm_custom_field_keys_are_rejected_on_other_kinds() {
    let m = messages(&format!(
        "{RALLY}\n[[connectors.rally.mapping.fields]]\ncanonical = \"phone\"\nfield_code = \"PHONE\"\n"
    ));
    assert_eq!(
        m,
        [
            "connectors.rally.mapping.fields[0].field_code: `field_code` addresses amoCRM custom fields; a rally connector uses `vendor`"
        ]
    );
}

#[test]
fn a_rule_needs_exactly_one_vendor_target() {
    let text = r#"
flows = []
[connectors.a]
kind = "amocrm"
base_url = "https://x.amocrm.ru"
auth = { type = "long_lived", token = { env = "C" } }
[[connectors.a.mapping.fields]]
canonical = "phone"
[[connectors.a.mapping.fields]]
canonical = "website"
vendor = "web"
field_code = "WEB"
"#;
    assert_eq!(
        messages(text),
        [
            "connectors.a.mapping.fields[0]: a rule needs exactly one of vendor, field_code, field_id, field_name; none is given",
            "connectors.a.mapping.fields[1]: a rule needs exactly one of vendor, field_code, field_id, field_name; vendor and field_code are given",
        ]
    );
}

#[test]
fn duplicate_canonical_field_in_one_mapping_is_rejected() {
    let rule = "[[connectors.rally.mapping.fields]]\ncanonical = \"city\"\nvendor = \"city\"\n";
    let m = messages(&format!("{RALLY}\n{rule}{rule}"));
    assert_eq!(
        m,
        [
            "connectors.rally.mapping.fields[1].canonical: canonical field `city` is mapped twice in this connector"
        ]
    );
}

#[test]
fn unknown_key_inside_a_mapping_rule_is_rejected() {
    let m = messages(&format!(
        "{RALLY}\n[[connectors.rally.mapping.fields]]\ncanonical = \"city\"\nvendor = \"city\"\ntransform = [\"trim\"]\n"
    ));
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(
        m[0].starts_with("connectors.rally.mapping.fields[0].transform: unknown field `transform`"),
        "{m:?}"
    );
}

#[test]
fn batch_and_page_sizes_above_the_api_maximum_are_rejected() {
    let m = messages(&format!("{RALLY}batch_size = 101\npage_size = 500\n"));
    assert_eq!(
        m,
        [
            "connectors.rally.batch_size: 101 is out of range: must be between 1 and 100",
            "connectors.rally.page_size: 500 is out of range: must be between 1 and 100",
        ]
    );
}

#[test]
fn daily_share_outside_zero_to_one_is_rejected() {
    let m = messages(&format!(
        "{RALLY}[connectors.rally.limits]\ndaily_share = 1.5\n"
    ));
    assert_eq!(
        m,
        [
            "connectors.rally.limits.daily_share: 1.5 is outside 0..=1 (it is a share of daily_quota, e.g. 0.5)"
        ]
    );
}

#[test]
fn non_loopback_listen_needs_explicit_consent() {
    let m = messages(&format!("{RALLY}[daemon]\nlisten = \"0.0.0.0:9464\"\n"));
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(
        m[0].starts_with("daemon.listen: 0.0.0.0:9464 is not a loopback address"),
        "{m:?}"
    );
    let ok = parse(&format!(
        "{RALLY}[daemon]\nlisten = \"0.0.0.0:9464\"\nallow_non_loopback = true\n"
    ));
    assert_eq!(
        ok.unwrap().daemon.listen,
        Some("0.0.0.0:9464".parse().unwrap())
    );
}

#[test]
fn conflict_priority_checks_fields_and_connectors() {
    let m = messages(&format!(
        "{RALLY}[conflict.priority]\nindustry = [\"rally\", \"hubspot\"]\nrevenue = [\"rally\"]\n"
    ));
    assert_eq!(
        m,
        [
            "conflict.priority.industry: unknown connector `hubspot`; declared connectors: rally",
            "conflict.priority.revenue: unknown canonical field `revenue`; expected one of name, domain, industry, description, employeeCount, annualRevenue, phone, website, linkedInUrl, address, city, state, country, postalCode, tags, notes, ownerId, externalCompanyId or custom.<name>",
        ]
    );
}

#[test]
fn missing_flows_is_an_error_but_an_empty_list_is_not() {
    let m = messages(&RALLY.replace("flows = []", ""));
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].starts_with("flows: no flows defined"), "{m:?}");
}

#[test]
fn errors_from_every_connector_are_collected() {
    let text = r#"
flows = []
[connectors.one]
kind = "rally"
base_url = "https://a.example"
[connectors.two]
kind = "zoho"
"#;
    assert_eq!(
        messages(text),
        [
            "connectors.one: missing required key `api_key`",
            "connectors.two.kind: unknown connector kind \"zoho\"; expected one of: rally, marketo, amocrm",
        ]
    );
}

#[test]
fn rally_read_only_fields_need_read_only_direction() {
    let m = messages(&format!(
        "{RALLY}\n[[connectors.rally.mapping.fields]]\ncanonical = \"custom.created\"\nvendor = \"createdAt\"\n"
    ));
    assert_eq!(
        m,
        [
            "connectors.rally.mapping.fields[0].vendor: Rally field `createdAt` is read-only: add direction = \"read-only\""
        ]
    );
}
