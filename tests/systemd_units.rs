//! Checks the unit files in `systemd/`: each passes `systemd-analyze verify`, keeps the
//! exposure reported by `systemd-analyze security` at or below 2.0, and all of them carry
//! the same hardening and the same fail-safe credential setup.
//!
//! Tests that need `systemd-analyze` print "skipped: …" (to stderr, uncaptured) and pass
//! when the tool (or its offline security mode) is missing; CI (`.ci/run`) installs it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Every unit file shipped in `systemd/`.
const UNITS: [&str; 4] = [
    "crmbridge.service",
    "crmbridge@.service",
    "crmbridge-backfill.service",
    "crmbridge-backfill@.service",
];

/// Highest acceptable "Overall exposure level" (systemd calls ≤ 2.0 "OK"/"SAFE").
const MAX_EXPOSURE: f64 = 2.0;

/// Where the units point `ExecStart=`; replaced in staged copies by the test build's binary.
const INSTALLED_BINARY: &str = "/usr/local/bin/crmbridge";

/// Credentials the daemon may read from `$CREDENTIALS_DIRECTORY`.
const CREDENTIALS: [&str; 7] = [
    "rally_api_key",
    "marketo_client_id",
    "marketo_client_secret",
    "amocrm_token",
    "amocrm_client_id",
    "amocrm_client_secret",
    "amocrm_refresh_token",
];

fn unit_source(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `systemd-analyze` from PATH, or `None` after printing why the caller skips.
fn systemd_analyze(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("systemd-analyze"))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        skipped(&format!(
            "{test}: systemd-analyze is not installed (apt-get install systemd)"
        ));
    }
    found
}

/// Reports a skip on the real stderr: libtest captures `println!`/`eprintln!` of passing
/// tests, and a skip must show up in a plain `cargo test` run.
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

/// Copies every unit into a temporary directory with `ExecStart=` pointing at the binary
/// cargo built for this test: `verify` fails when the executable does not exist. The units
/// name each other (Conflicts=, OnSuccess=), so they are staged together.
fn staged_units() -> tempfile::TempDir {
    let binary = env!("CARGO_BIN_EXE_crmbridge");
    assert!(
        !binary.contains(char::is_whitespace) && !binary.contains('%'),
        "the test binary path {binary:?} cannot be written into ExecStart= unquoted"
    );
    let dir = tempfile::tempdir().expect("create a temporary directory");
    for name in UNITS {
        let source = unit_source(name);
        assert!(
            source.contains(INSTALLED_BINARY),
            "{name} does not run {INSTALLED_BINARY}"
        );
        let staged = source.replace(INSTALLED_BINARY, binary);
        std::fs::write(dir.path().join(name), staged).expect("write a staged unit");
    }
    dir
}

/// Runs `systemd-analyze ARGS… UNIT` and returns (success, stdout + stderr).
fn run_analyze(tool: &Path, args: &[&str], unit: &Path) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .arg(unit)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", tool.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let Some(tool) = systemd_analyze("verify") else {
        return;
    };
    let dir = staged_units();
    let mut failures = Vec::new();
    for name in UNITS {
        let (ok, output) = run_analyze(&tool, &["verify"], &dir.path().join(name));
        // Unknown keys and bad values are only warnings ("…, ignoring.") and leave the exit
        // status at 0, so any line about our units counts as a failure too.
        let warned = output.lines().any(|l| l.contains("crmbridge"));
        if !ok || warned {
            failures.push(format!("--- {name} (exit ok: {ok}):\n{output}"));
        }
    }
    assert!(
        failures.is_empty(),
        "systemd-analyze verify complained:\n{}",
        failures.join("\n")
    );
}

/// The number after "Overall exposure level for UNIT:".
fn exposure(output: &str) -> Option<f64> {
    let line = output
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, after) = line.rsplit_once(": ")?;
    after.split_whitespace().next()?.parse().ok()
}

#[test]
fn every_unit_exposure_is_at_most_2_0() {
    let Some(tool) = systemd_analyze("security") else {
        return;
    };
    // --offline (systemd ≥ 250) analyses unit files without a running service manager.
    let help = Command::new(&tool)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !help.contains("--offline") {
        skipped("security: this systemd-analyze has no --offline mode (needs systemd ≥ 250)");
        return;
    }
    let dir = staged_units();
    let mut report = Vec::new();
    let mut too_exposed = false;
    for name in UNITS {
        // The exit status reflects --threshold, not success: judge by the figure.
        let (_, output) = run_analyze(
            &tool,
            &["security", "--offline=yes", "--no-pager"],
            &dir.path().join(name),
        );
        match exposure(&output) {
            Some(level) if level <= MAX_EXPOSURE => report.push(format!("{name}: {level}")),
            Some(level) => {
                too_exposed = true;
                // Only the settings that cost exposure, not the ~80 that pass.
                let costly: Vec<&str> = output.lines().filter(|l| l.starts_with('✗')).collect();
                report.push(format!(
                    "{name}: {level} > {MAX_EXPOSURE:.1}\n{}",
                    costly.join("\n")
                ));
            }
            None => {
                too_exposed = true;
                report.push(format!("{name}: no exposure figure in:\n{output}"));
            }
        }
    }
    assert!(
        !too_exposed,
        "exposure above {MAX_EXPOSURE:.1}:\n{}",
        report.join("\n")
    );
}

/// The settings from the "# Hardening." comment to the first `SocketBind…` line, without
/// comments and blank lines.
fn hardening(name: &str) -> Vec<String> {
    let source = unit_source(name);
    let block: Vec<String> = source
        .lines()
        .skip_while(|l| !l.starts_with("# Hardening."))
        .take_while(|l| !l.starts_with("SocketBind") && !l.starts_with('['))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    assert!(
        block.len() > 20,
        "{name}: no hardening block found (got {block:?})"
    );
    block
}

#[test]
fn hardening_settings_are_identical_in_every_unit() {
    let reference = hardening(UNITS[0]);
    for name in &UNITS[1..] {
        let block = hardening(name);
        let missing: Vec<_> = reference.iter().filter(|l| !block.contains(l)).collect();
        let extra: Vec<_> = block.iter().filter(|l| !reference.contains(l)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name} differs from {}: missing {missing:?}, extra {extra:?}",
            UNITS[0]
        );
    }
}

/// Values of `KEY=` lines in `source`.
fn values<'a>(source: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}=");
    source
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

#[test]
fn every_credential_is_loaded_with_a_fallback_so_absent_files_do_not_fail_the_start() {
    for name in UNITS {
        let source = unit_source(name);
        let loaded: Vec<&str> = values(&source, "LoadCredential")
            .into_iter()
            .filter_map(|v| v.split_once(':').map(|(id, _)| id))
            .collect();
        let fallbacks: Vec<&str> = values(&source, "SetCredential")
            .into_iter()
            .filter_map(|v| v.split_once(':').map(|(id, _)| id))
            .collect();
        assert_eq!(loaded, CREDENTIALS, "{name}: LoadCredential= ids");
        assert_eq!(
            fallbacks, CREDENTIALS,
            "{name}: SetCredential= fallbacks (without one, a missing file fails the start)"
        );
    }
}

#[test]
fn backfill_units_stop_their_daemon_and_start_it_again() {
    for (backfill, daemon) in [
        ("crmbridge-backfill.service", "crmbridge.service"),
        ("crmbridge-backfill@.service", "crmbridge@%i.service"),
    ] {
        let source = unit_source(backfill);
        for key in ["Conflicts", "After", "OnSuccess", "OnFailure"] {
            assert!(
                values(&source, key).contains(&daemon),
                "{backfill}: {key}= does not name {daemon} (has {:?})",
                values(&source, key)
            );
        }
    }
}
