//! The connector implementations, one folder per CRM, and the registry that builds them
//! from config. Adding a CRM: a new folder implementing [`crate::connector::Connector`]
//! and one line in [`build`] (plus its config variant).

pub mod amocrm;
pub mod marketo;
pub mod rally;
pub mod shared;

use std::sync::Arc;

use crate::config::{Config, ConnectorConfig};
use crate::connector::{Connector, ConnectorError};
use crate::daemon::metrics::Metrics;
use crate::store::Store;

/// What every connector may use besides its own config.
#[derive(Clone)]
pub struct BuildContext {
    /// The store: OAuth tokens and the daily quota ledger live there.
    pub store: Arc<Store>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
}

/// Builds the connector named `name` from its config. Secrets are resolved here.
pub fn build(
    name: &str,
    cfg: &ConnectorConfig,
    ctx: &BuildContext,
) -> Result<Arc<dyn Connector>, ConnectorError> {
    match cfg {
        ConnectorConfig::Rally(c) => Ok(Arc::new(rally::RallyConnector::new(name, c, ctx)?)),
        ConnectorConfig::Marketo(c) => Ok(Arc::new(marketo::MarketoConnector::new(name, c, ctx)?)),
        ConnectorConfig::Amocrm(c) => Ok(Arc::new(amocrm::AmocrmConnector::new(name, c, ctx)?)),
    }
}

/// The config file's name and text, and the connector whose rules are looked up in it,
/// so that problems with a mapping rule can say where the rule is.
pub struct ConfigText<'a> {
    /// The file, as it is named in messages.
    pub file: &'a std::path::Path,
    /// Its text (empty when it could not be read again: no positions then).
    pub text: &'a str,
    /// The connector (its table name).
    pub connector: &'a str,
}

impl ConfigText<'_> {
    /// `file:line:column: key` of the connector's mapping rule `index`.
    fn rule(&self, index: usize) -> Option<String> {
        let at = crate::config::mapping_rule_position(self.text, self.connector, index)?;
        Some(format!("{}:{at}", self.file.display()))
    }
}

/// What `check --online` found out about one connector's instance.
#[derive(Debug, Default)]
pub struct OnlineFindings {
    /// Problems that make the configuration unusable as written: credentials, read-only
    /// APIs, fields the user's own mapping rules name that the instance lacks.
    pub problems: Vec<String>,
    /// Things the daemon copes with on its own: built-in mapping rules whose vendor
    /// field the instance lacks (the daemon skips them at start, with a warning).
    pub notes: Vec<String>,
}

/// `check --online`: per connector, what talking to the instance revealed (credentials,
/// mapped fields missing, read-only APIs). Empty problem lists mean all is well.
pub async fn check_online(config: &Config) -> Result<Vec<(String, OnlineFindings)>, String> {
    let store_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    // The daemon's store when it exists and the daemon is not running: amoCRM's refresh
    // tokens are single-use, so a token the check rotates must be kept where the daemon
    // looks for it, and the calls the check makes count towards the limits the daemon
    // then honours. Otherwise a scratch store (the check must not create the daemon's
    // store, nor wait for its lock).
    let daemon_store = config
        .store
        .path
        .exists()
        .then(|| Store::open(&config.store.path).ok())
        .flatten();
    let scratch = daemon_store.is_none();
    let store = match daemon_store {
        Some(s) => Arc::new(s),
        None => {
            Arc::new(Store::open(&store_dir.path().join("check.redb")).map_err(|e| e.to_string())?)
        }
    };
    let ctx = BuildContext {
        store,
        metrics: Arc::new(Metrics::new()),
    };
    let text = std::fs::read_to_string(&config.source).unwrap_or_default();
    let mut out = Vec::new();
    for (name, cfg) in config.connectors.iter().filter(|(_, c)| c.common().enabled) {
        let mut found = OnlineFindings::default();
        if scratch && rotates_refresh_tokens(cfg) {
            let path = config.store.path.display();
            let why = if config.store.path.exists() {
                format!("the daemon holds its store {path}")
            } else {
                format!("the daemon has not run yet (no store at {path})")
            };
            found.notes.push(format!(
                "not checked online: amoCRM refresh tokens are single-use, and {why}, so \
                 the check could not keep the new one for the daemon; the daemon checks the \
                 sign-in as it starts (and `check --online` does once the daemon has run and \
                 is stopped)"
            ));
            out.push((name.clone(), found));
            continue;
        }
        match build(name, cfg, &ctx) {
            Err(e) => found.problems.push(e.to_string()),
            Ok(conn) => match conn.start().await {
                Err(e) => found.problems.push(e.to_string()),
                Ok(()) => {
                    let fitted = crate::mapping::Mapping::fit(cfg.kind(), cfg.mapping(), |k| {
                        conn.unavailable_fields(k)
                    });
                    match fitted {
                        Ok(f) => {
                            let at = ConfigText {
                                file: &config.source,
                                text: &text,
                                connector: name,
                            };
                            sort_missing_fields(cfg, &f, &mut found, &at);
                        }
                        Err(errs) => found.problems.extend(errs.iter().map(|e| e.to_string())),
                    }
                    found.problems.extend(conn.online_problems().await);
                }
            },
        }
        out.push((name.clone(), found));
    }
    Ok(out)
}

/// Whether signing in to this connector spends a single-use refresh token.
fn rotates_refresh_tokens(cfg: &ConnectorConfig) -> bool {
    matches!(cfg, ConnectorConfig::Amocrm(c) if matches!(c.auth, crate::config::AmoAuth::OAuth { .. }))
}

/// Files each mapped vendor key the instance lacks: a problem when the config's own rules
/// name it (most likely a typo or the wrong instance), a note when only a built-in rule
/// does (accounts differ; the daemon skips such rules at start).
fn sort_missing_fields(
    cfg: &ConnectorConfig,
    fitted: &crate::mapping::Fitted,
    found: &mut OnlineFindings,
    rules_at: &ConfigText<'_>,
) {
    // The vendor keys of each of the config's own rules, in order.
    let own: Vec<Vec<String>> = cfg
        .mapping()
        .fields
        .iter()
        .map(|rule| {
            let alone = crate::mapping::MappingRules {
                use_defaults: false,
                ignore: Vec::new(),
                fields: vec![rule.clone()],
            };
            crate::mapping::Mapping::compile(cfg.kind(), &alone)
                .map(|m| m.vendor_keys())
                .unwrap_or_default()
        })
        .collect();
    let full = crate::mapping::Mapping::compile(cfg.kind(), cfg.mapping());
    for key in &fitted.missing {
        if let Some(index) = own.iter().position(|keys| keys.contains(key)) {
            let problem = format!("mapped vendor field {key:?} does not exist on this instance");
            found.problems.push(match rules_at.rule(index) {
                Some(at) => format!("{at}: {problem}"),
                None => problem,
            });
        } else {
            let fields = full
                .as_ref()
                .map(|m| m.without_vendor_keys(std::slice::from_ref(key)).1)
                .unwrap_or_default();
            let (stood_in, skipped): (Vec<&str>, Vec<&str>) = fields
                .iter()
                .map(String::as_str)
                .partition(|f| fitted.stand_ins.iter().any(|s| s == f));
            if !stood_in.is_empty() {
                found.notes.push(format!(
                    "built-in mapping field {key:?} does not exist on this instance; {} is \
                     synced through its stand-in rule instead (e.g. amoCRM's domain read \
                     from the Web field)",
                    stood_in.join(", "),
                ));
            }
            if !skipped.is_empty() {
                found.notes.push(format!(
                    "built-in mapping field {key:?} does not exist on this instance; the \
                     daemon skips its rule, so {} is not synced here (`ignore = {skipped:?}` \
                     in this connector's [mapping] says so explicitly)",
                    skipped.join(", "),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_of_own_rules_are_problems_and_of_built_in_rules_notes() {
        let toml = r#"
flows = []
[store]
path = "x.redb"
[connectors.amo]
kind = "amocrm"
base_url = "http://127.0.0.1:1"
[connectors.amo.auth]
type = "long_lived"
token = { env = "UNUSED_TOKEN" }
[[connectors.amo.mapping.fields]]
canonical = "city"
field_name = "Town"
[[connectors.amo.mapping.fields]]
canonical = "industry"
field_name = "Sector"
"#;
        let config = crate::config::Config::parse(toml, std::path::Path::new("t.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let cfg = &config.connectors["amo"];
        let notes_when_absent = |absent: &[&str]| {
            let fitted = crate::mapping::Mapping::fit(cfg.kind(), cfg.mapping(), |keys| {
                keys.iter()
                    .filter(|k| absent.contains(&k.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap();
            let mut found = OnlineFindings::default();
            let at = ConfigText {
                file: std::path::Path::new("t.toml"),
                text: toml,
                connector: "amo",
            };
            sort_missing_fields(cfg, &fitted, &mut found, &at);
            assert_eq!(
                found.problems,
                [
                    "t.toml:16:14: connectors.amo.mapping.fields[1].field_name: mapped vendor \
                     field \"cf.name.Sector\" does not exist on this instance"
                ]
            );
            found.notes
        };
        // No "Domain" field: the domain is read from Web instead.
        let notes = notes_when_absent(&["cf.name.Sector", "cf.name.Domain"]);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("\"cf.name.Domain\"") && notes[0].contains("stand-in"),
            "{notes:?}"
        );
        // Not even Web: domain and website are not synced.
        let notes = notes_when_absent(&["cf.name.Sector", "cf.name.Domain", "cf.code.WEB"]);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes
                .iter()
                .any(|n| n.contains("\"cf.name.Domain\"") && n.contains("ignore = [\"domain\"]")),
            "{notes:?}"
        );
    }
}
