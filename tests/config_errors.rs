//! Config validation as an operator meets it: each class of mistake is reported with its
//! line, column, key and message; all mistakes of a file at once; secrets are fetched from
//! env vars or files (under `$CREDENTIALS_DIRECTORY`) and never shown.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crmbridge::config::{Config, ConfigError, ConnectorConfig, SecretRef, check_report};

/// Serialises the tests that change process environment variables.
static ENV_LOCK: Mutex<()> = Mutex::new(());

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

/// Parses a fixture that must be rejected (secrets are not fetched) and returns its errors.
fn parse_errors(name: &str) -> Vec<ConfigError> {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path).unwrap();
    match Config::parse(&text, &path) {
        Ok(c) => panic!("{name} should be rejected, but parsed: {c:#?}"),
        Err(e) => e.errors,
    }
}

/// The single error of a fixture, with a readable failure when there are more or none.
fn only_error(name: &str) -> ConfigError {
    let errors = parse_errors(name);
    assert_eq!(
        errors.len(),
        1,
        "expected exactly one error in {name}, got: {errors:#?}"
    );
    errors.into_iter().next().unwrap()
}

fn assert_error(e: &ConfigError, line: usize, column: usize, key: &str, message: &str) {
    assert_eq!(
        (e.line, e.column, e.key.as_str(), e.message.as_str()),
        (line, column, key, message),
        "full error: {e}"
    );
}

/// A valid config text with three connectors whose secrets are files, plus `flows`.
fn three_connectors(flows: &str) -> String {
    format!(
        r#"
[connectors.rally]
kind = "rally"
base_url = "http://127.0.0.1:1"
api_key = {{ file = "/dev/null" }}

[connectors.marketo]
kind = "marketo"
base_url = "http://127.0.0.1:2"
client_id = {{ file = "/dev/null" }}
client_secret = {{ file = "/dev/null" }}

[connectors.amocrm]
kind = "amocrm"
base_url = "http://127.0.0.1:3"
auth = {{ type = "long_lived", token = {{ file = "/dev/null" }} }}

{flows}
"#
    )
}

fn parse_ok(text: &str) -> Config {
    Config::parse(text, Path::new("/etc/crmbridge/test.toml"))
        .unwrap_or_else(|e| panic!("config should parse:\n{e}\n---\n{text}"))
}

#[test]
fn unknown_key_is_reported_with_a_suggestion() {
    let e = only_error("unknown_key.toml");
    assert_error(
        &e,
        8,
        1,
        "connectors.rally.pol_interval",
        "unknown key `pol_interval`; did you mean `poll_interval`?",
    );
    assert!(e.file.ends_with("unknown_key.toml"), "{e}");
}

#[test]
fn wrong_type_names_expected_and_found_types() {
    let e = only_error("wrong_type.toml");
    assert_error(
        &e,
        8,
        14,
        "connectors.rally.batch_size",
        "expected an integer, found string",
    );
}

#[test]
fn missing_secret_env_var_is_an_error_at_load() {
    let path = fixture("missing_secret_env.toml");
    let errors = Config::load(&path)
        .expect_err("secret env var is unset")
        .errors;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_error(
        &errors[0],
        7,
        11,
        "connectors.rally.api_key",
        "env var CRMBRIDGE_TEST_SURELY_UNSET_4F1B is not set",
    );
    // `parse` alone does not fetch secrets, so the same text is structurally valid.
    let text = std::fs::read_to_string(&path).unwrap();
    Config::parse(&text, &path).expect("structurally valid");
}

#[test]
fn inline_secret_is_rejected_without_echoing_it() {
    let e = only_error("inline_secret.toml");
    assert_error(
        &e,
        7,
        11,
        "connectors.rally.api_key",
        "secrets must not be written inline: use { env = \"VAR\" } or { file = \"path\" }",
    );
    let (ok, report) = check_report(&fixture("inline_secret.toml"));
    assert!(!ok);
    assert!(
        !report.contains("rk_live_pasted_inline_0042"),
        "secret leaked: {report}"
    );
}

#[test]
fn unknown_connector_in_flow_lists_the_declared_ones() {
    let e = only_error("unknown_connector_in_flow.toml");
    assert_error(
        &e,
        9,
        7,
        "flows[0].to",
        "unknown connector `salesforce`; declared connectors: rally",
    );
}

#[test]
fn unknown_canonical_field_in_mapping_suggests_the_close_one() {
    let e = only_error("unknown_canonical_field.toml");
    assert_error(
        &e,
        10,
        13,
        "connectors.rally.mapping.fields[0].canonical",
        "unknown canonical field `industy`; did you mean `industry`?",
    );
}

#[test]
fn unknown_rally_vendor_field_is_rejected() {
    let e = only_error("unknown_rally_field.toml");
    assert_eq!((e.line, e.column), (11, 10), "{e}");
    assert_eq!(e.key, "connectors.rally.mapping.fields[0].vendor", "{e}");
    assert!(
        e.message
            .starts_with("unknown Rally field `revenue` (Rally's schema is fixed)"),
        "{e}"
    );
}

#[test]
fn two_errors_in_one_file_are_both_reported_in_file_order() {
    let errors = parse_errors("two_errors.toml");
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert_error(
        &errors[0],
        5,
        18,
        "daemon.shutdown_grace",
        "a duration needs a unit: write \"30s\" (or \"5m\", \"1h\")",
    );
    assert_error(
        &errors[1],
        10,
        14,
        "connectors.amocrm.batch_size",
        "500 is out of range: must be between 1 and 250",
    );
}

#[test]
fn syntax_error_points_at_the_broken_line() {
    let errors = parse_errors("syntax_error.toml");
    assert_eq!(errors[0].line, 4, "{errors:#?}");
    // The key written on the broken line, under its table.
    assert_eq!(errors[0].key, "connectors.rally.kind", "{errors:#?}");
}

#[test]
fn display_is_file_line_column_key_message_one_per_line() {
    let path = fixture("two_errors.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let shown = Config::parse(&text, &path).unwrap_err().to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 2, "{shown}");
    assert_eq!(
        lines[1],
        format!(
            "{}:10:14: connectors.amocrm.batch_size: 500 is out of range: must be between 1 and 250",
            path.display()
        )
    );
}

#[test]
fn example_config_loads_when_its_documented_secrets_are_provided() {
    let _guard = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Its secrets are the credentials the shipped unit loads, by the same names.
    let example = std::fs::read_to_string(root.join("config/crmbridge.toml")).unwrap();
    let unit = std::fs::read_to_string(root.join("systemd/crmbridge.service")).unwrap();
    let names: Vec<&str> = example
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split("{ file = \"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");
    let creds = tempfile::tempdir().unwrap();
    for name in &names {
        assert!(
            unit.contains(&format!("LoadCredential={name}:")),
            "the unit loads no credential {name}"
        );
        std::fs::write(creds.path().join(name), format!("value-of-{name}\n")).unwrap();
    }
    // SAFETY: tests that touch the environment hold ENV_LOCK; std serialises env access.
    unsafe {
        std::env::set_var("CREDENTIALS_DIRECTORY", creds.path());
    }
    let path = root.join("config/crmbridge.toml");
    let loaded = Config::load(&path);
    let (ok, report) = check_report(&path);
    unsafe {
        std::env::remove_var("CREDENTIALS_DIRECTORY");
    }
    let config = loaded.unwrap_or_else(|e| panic!("example config must load:\n{e}"));
    assert!(ok, "{report}");
    assert_eq!(
        config.connectors.keys().collect::<Vec<_>>(),
        ["amocrm", "marketo", "rally"]
    );
    // The Marketo endpoint as copied from the admin page loses its `/rest` (hosts are
    // case-insensitive; the URL parser lowercases them).
    let marketo = &config.connectors["marketo"];
    assert_eq!(
        marketo.common().base_url.as_str(),
        "https://123-abc-456.mktorest.com/"
    );
    assert_eq!(config.targets_of("rally"), ["amocrm", "marketo"]);
    assert_eq!(config.targets_of("marketo"), Vec::<String>::new());
    assert!(report.contains("rally → amocrm, marketo"), "{report}");
}

#[test]
fn relative_secret_file_resolves_under_credentials_directory() {
    let _guard = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("rally-key"), "rk_live_from_credentials\n").unwrap();
    let text = r#"
flows = []
[connectors.rally]
kind = "rally"
base_url = "https://acme.rallycrm.io"
api_key = { file = "rally-key" }
"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crmbridge.toml");
    std::fs::write(&path, text).unwrap();
    // SAFETY: tests that touch the environment hold ENV_LOCK; std serialises env access.
    unsafe { std::env::set_var("CREDENTIALS_DIRECTORY", creds.path()) };
    let loaded = Config::load(&path);
    let secret = SecretRef::File("rally-key".into()).resolve();
    unsafe { std::env::remove_var("CREDENTIALS_DIRECTORY") };

    let config = loaded.unwrap_or_else(|e| panic!("{e}"));
    let ConnectorConfig::Rally(rally) = &config.connectors["rally"] else {
        panic!("not rally: {config:?}");
    };
    assert_eq!(rally.api_key, SecretRef::File("rally-key".into()));
    assert_eq!(secret.unwrap().expose(), "rk_live_from_credentials");
}

#[test]
fn debug_of_config_and_resolved_secret_never_shows_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("rally.key");
    std::fs::write(&key, "rk_live_do_not_print_me").unwrap();
    let text = format!(
        "flows = []\n[connectors.rally]\nkind = \"rally\"\nbase_url = \"https://a.example\"\napi_key = {{ file = {:?} }}\n",
        key.display().to_string()
    );
    let path = dir.path().join("c.toml");
    std::fs::write(&path, &text).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let ConnectorConfig::Rally(rally) = &config.connectors["rally"] else {
        panic!("not rally");
    };
    let secret = rally.api_key.resolve().unwrap();
    assert_eq!(secret.expose(), "rk_live_do_not_print_me");
    let shown = format!(
        "{config:?} {config:#?} {secret:?} {secret} {}",
        config.summary()
    );
    assert!(!shown.contains("do_not_print_me"), "secret leaked: {shown}");
}

#[test]
fn targets_of_one_way_flow_goes_only_downstream() {
    let c = parse_ok(&three_connectors(
        "[[flows]]\nfrom = \"rally\"\nto = [\"marketo\", \"amocrm\"]",
    ));
    assert_eq!(c.targets_of("rally"), ["amocrm", "marketo"]);
    assert!(
        c.targets_of("marketo").is_empty(),
        "{:?}",
        c.targets_of("marketo")
    );
    assert!(
        c.targets_of("amocrm").is_empty(),
        "{:?}",
        c.targets_of("amocrm")
    );
}

#[test]
fn targets_of_between_flow_goes_both_ways_but_not_to_itself() {
    let c = parse_ok(&three_connectors(
        "[[flows]]\nbetween = [\"rally\", \"amocrm\"]",
    ));
    assert_eq!(c.targets_of("rally"), ["amocrm"]);
    assert_eq!(c.targets_of("amocrm"), ["rally"]);
    assert!(c.targets_of("marketo").is_empty());
}

#[test]
fn targets_of_all_flow_reaches_every_other_connector() {
    let c = parse_ok(&three_connectors("[[flows]]\nall = true"));
    assert_eq!(c.targets_of("rally"), ["amocrm", "marketo"]);
    assert_eq!(c.targets_of("marketo"), ["amocrm", "rally"]);
    assert_eq!(c.targets_of("amocrm"), ["marketo", "rally"]);
}

#[test]
fn targets_of_skips_disabled_connectors() {
    let text = three_connectors("[[flows]]\nall = true")
        .replace("kind = \"marketo\"", "kind = \"marketo\"\nenabled = false");
    let c = parse_ok(&text);
    assert_eq!(c.targets_of("rally"), ["amocrm"]);
    assert!(c.targets_of("marketo").is_empty());
}

#[test]
fn flow_from_a_connector_to_itself_is_rejected() {
    let text = three_connectors("[[flows]]\nfrom = \"rally\"\nto = [\"rally\", \"marketo\"]");
    let errors = Config::parse(&text, Path::new("t.toml"))
        .unwrap_err()
        .errors;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].key, "flows[0]");
    assert_eq!(
        errors[0].message,
        "flow sends rally to itself; use `between` for two-way sync"
    );
}

#[test]
fn propagate_deletes_true_is_refused_with_its_line() {
    let text = "propagate_deletes = true\n\n[[flows]]\nall = true\n";
    let err = crmbridge::config::Config::parse(text, std::path::Path::new("deletes.toml"))
        .expect_err("must be refused");
    let e = err
        .errors
        .iter()
        .find(|e| e.key == "propagate_deletes")
        .unwrap_or_else(|| panic!("no propagate_deletes error in {err}"));
    assert_eq!(e.line, 1, "{err}");
    assert!(e.message.contains("not supported"), "{err}");
}

#[test]
fn a_duplicate_key_names_the_key() {
    let text = "flows = []\n\n[connectors.rally]\nkind = \"rally\"\nkind = \"rally\"\n";
    let err = Config::parse(text, Path::new("dup.toml")).unwrap_err();
    let shown = err.to_string();
    assert!(shown.contains("connectors.rally.kind"), "{shown}");
}

#[test]
fn a_syntax_error_among_non_ascii_text_names_its_key_without_panicking() {
    let text = "flows = []\n\n[connectors.\"résumé\"]\n\"ключ\" = \"незакрыто\nb = 1\n";
    let err = Config::parse(text, Path::new("utf8.toml")).unwrap_err();
    let shown = err.to_string();
    assert!(shown.contains("utf8.toml:4:"), "{shown}");
    assert!(shown.contains("résumé.ключ"), "{shown}");
}
