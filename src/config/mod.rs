//! The configuration: TOML → typed [`Config`], validated as a whole. Every mistake in a
//! file is reported at once with file, line, column, dotted key and what is wrong
//! ([`ConfigErrors`]). Secrets are only *referenced* here ([`SecretRef`]: env var or file);
//! this module never stores or prints a secret value.

mod connectors;
mod error;
mod parse;
mod reader;
mod secret;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::{ConfigError, ConfigErrors};
pub use secret::{SecretError, SecretRef};

use crate::mapping::MappingRules;
use crate::model::CrmKind;

/// The whole configuration of one crmbridge instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this config was read from (as given).
    pub source: PathBuf,
    /// `[store]`: where the redb database lives.
    pub store: StoreConfig,
    /// `[daemon]`: health/metrics endpoint, timings, log format.
    pub daemon: DaemonConfig,
    /// `[connectors.<name>]`: the CRM instances, by name.
    pub connectors: BTreeMap<String, ConnectorConfig>,
    /// `[[flows]]`: which connector's records go where.
    pub flows: Vec<Flow>,
    /// `[conflict]`: who wins when two CRMs changed the same field.
    pub conflict: ConflictPolicy,
    /// `match_keys`: how a record seen for the first time is matched to an existing
    /// company, in order. Default `["domain", "externalCompanyId"]`.
    pub match_keys: Vec<MatchKey>,
    /// `propagate_deletes`: delete a company in the targets when it is deleted in a source.
    /// Default `false` (deletes inferred wrongly destroy data; see pitfalls).
    pub propagate_deletes: bool,
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// `path`: the redb file. Default `$STATE_DIRECTORY/crmbridge.redb` when systemd sets
    /// `STATE_DIRECTORY` (its first entry), else `crmbridge.redb` next to the config file.
    /// A relative path resolves against the config file's directory.
    pub path: PathBuf,
}

/// `[daemon]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// `listen`: address of the metrics and health endpoint. Default `127.0.0.1:9464`;
    /// `listen = false` switches it off. Must be a loopback address unless
    /// `allow_non_loopback = true` (the endpoint has no authentication).
    pub listen: Option<SocketAddr>,
    /// `unhealthy_after`: the health endpoint reports unhealthy when a connector has not
    /// completed a poll for this long. Default `"15m"`.
    pub unhealthy_after: Duration,
    /// `shutdown_grace`: how long a shutdown waits for in-flight pushes. Default `"30s"`.
    pub shutdown_grace: Duration,
    /// `log_format`: `auto` (default: journald when run by systemd, else human), `human`,
    /// `journald` or `json`.
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// journald when stderr is connected to the journal, human otherwise.
    #[default]
    Auto,
    /// Human-readable lines.
    Human,
    /// journald native fields.
    Journald,
    /// One JSON object per line.
    Json,
}

/// `[connectors.<name>]`, chosen by `kind = "rally" | "marketo" | "amocrm"`.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectorConfig {
    /// `kind = "rally"`.
    Rally(RallyConfig),
    /// `kind = "marketo"`.
    Marketo(MarketoConfig),
    /// `kind = "amocrm"`.
    Amocrm(AmocrmConfig),
}

impl ConnectorConfig {
    /// The CRM product of this connector.
    pub fn kind(&self) -> CrmKind {
        match self {
            ConnectorConfig::Rally(_) => CrmKind::Rally,
            ConnectorConfig::Marketo(_) => CrmKind::Marketo,
            ConnectorConfig::Amocrm(_) => CrmKind::Amocrm,
        }
    }

    /// Settings every connector has.
    pub fn common(&self) -> &CommonConnectorConfig {
        match self {
            ConnectorConfig::Rally(c) => &c.common,
            ConnectorConfig::Marketo(c) => &c.common,
            ConnectorConfig::Amocrm(c) => &c.common,
        }
    }

    /// The connector's mapping rules (`[connectors.<name>.mapping]`).
    pub fn mapping(&self) -> &MappingRules {
        match self {
            ConnectorConfig::Rally(c) => &c.mapping,
            ConnectorConfig::Marketo(c) => &c.mapping,
            ConnectorConfig::Amocrm(c) => &c.mapping,
        }
    }
}

/// Settings every connector has, written directly in `[connectors.<name>]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CommonConnectorConfig {
    /// `base_url` (required): http(s) root of the API, e.g. `https://acme.rallycrm.io`.
    /// Normalised to end with `/`, so `base_url.join("api/v1/companies")` keeps its path.
    /// For Marketo a trailing `/rest` (as copied from the admin page) is stripped.
    pub base_url: url::Url,
    /// `poll_interval`: pause between polls. Default rally `"1m"`, marketo `"5m"` (every
    /// Marketo read costs daily quota), amocrm `"1m"`.
    pub poll_interval: Duration,
    /// `batch_size`: records per write call. Default and maximum: rally 100/100 (bulk),
    /// marketo 300/300 (sync), amocrm 50/250 (amoCRM recommends 50).
    pub batch_size: usize,
    /// `[connectors.<name>.timeouts]`.
    pub timeouts: Timeouts,
    /// `[connectors.<name>.limits]`.
    pub limits: Limits,
    /// `enabled`: a disabled connector is neither polled nor written to. Default `true`.
    pub enabled: bool,
}

/// `[connectors.<name>.timeouts]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `connect`: TCP + TLS connect. Default `"10s"`.
    pub connect: Duration,
    /// `read`: a whole read call (list, get, describe). Default `"30s"`.
    pub read: Duration,
    /// `write`: a whole write call (upsert, bulk, sync, delete). Default `"60s"`.
    pub write: Duration,
}

/// `[connectors.<name>.limits]`: what the daemon never exceeds towards this API.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// `requests_per_second`. Default rally 10, marketo none, amocrm 7.
    pub requests_per_second: Option<f64>,
    /// `requests_per_window = { requests = N, window = "20s" }`: a rolling window.
    /// Default marketo 100 per 20 s, none elsewhere.
    pub requests_per_window: Option<(u32, Duration)>,
    /// `max_concurrent`: calls in flight at once. Default rally 4, marketo 10, amocrm 4.
    pub max_concurrent: usize,
    /// `daily_quota`: calls per day the API allows the whole instance. Default marketo
    /// 50000, none elsewhere.
    pub daily_quota: Option<u64>,
    /// `daily_share`: share (0..=1) of `daily_quota` this daemon may spend, leaving the
    /// rest to other integrations on the same instance. Default marketo 0.5, else 1.0.
    pub daily_share: f64,
}

/// `kind = "rally"`.
#[derive(Debug, Clone, PartialEq)]
pub struct RallyConfig {
    /// Settings every connector has.
    pub common: CommonConnectorConfig,
    /// `api_key` (required): sent as `X-Api-Key`.
    pub api_key: SecretRef,
    /// `page_size`: records per list call. Default and maximum 100.
    pub page_size: usize,
    /// `[connectors.<name>.mapping]`.
    pub mapping: MappingRules,
}

/// `kind = "marketo"`.
#[derive(Debug, Clone, PartialEq)]
pub struct MarketoConfig {
    /// Settings every connector has.
    pub common: CommonConnectorConfig,
    /// `client_id` (required): the LaunchPoint service's client id.
    pub client_id: SecretRef,
    /// `client_secret` (required): the LaunchPoint service's client secret.
    pub client_secret: SecretRef,
    /// `[connectors.<name>.mapping]`.
    pub mapping: MappingRules,
}

/// `kind = "amocrm"`.
#[derive(Debug, Clone, PartialEq)]
pub struct AmocrmConfig {
    /// Settings every connector has.
    pub common: CommonConnectorConfig,
    /// `[connectors.<name>.auth]` (required).
    pub auth: AmoAuth,
    /// `[connectors.<name>.mapping]`.
    pub mapping: MappingRules,
}

/// `[connectors.<name>.auth]` of amoCRM, chosen by `type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmoAuth {
    /// `type = "long_lived"`: a private integration's long-lived token.
    LongLived {
        /// `token`.
        token: SecretRef,
    },
    /// `type = "oauth"`: OAuth 2.0 with rotating refresh tokens.
    OAuth {
        /// `client_id`: the integration id.
        client_id: SecretRef,
        /// `client_secret`: the integration's secret key.
        client_secret: SecretRef,
        /// `redirect_uri`: as registered with the integration (sent on refresh).
        redirect_uri: String,
        /// `refresh_token`: the *initial* refresh token. Each refresh rotates it; the
        /// rotated ones live in the store, which takes precedence over this one.
        refresh_token: SecretRef,
    },
}

/// One `[[flows]]` entry: records read from any of `from` go to every one of `to` (never
/// back to the connector they came from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// Source connectors.
    pub from: Vec<String>,
    /// Target connectors.
    pub to: Vec<String>,
}

/// `[conflict]`: which value wins when connectors disagree about a field.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConflictPolicy {
    /// `default`: the rule for fields without a priority list. Default `"newest"`.
    pub default: ConflictRule,
    /// `[conflict.priority]`: canonical field → connectors, the first that has a value wins.
    pub priority: BTreeMap<String, Vec<String>>,
}

/// How a conflict over one field is decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConflictRule {
    /// `"newest"`: the value with the newest vendor timestamp wins.
    #[default]
    Newest,
    /// A list of connectors (`["rally", "amocrm"]`): the first one that has the field wins;
    /// connectors not listed fall back to newest.
    Priority(Vec<String>),
}

/// A key by which a record seen for the first time is matched to an existing company.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MatchKey {
    /// `"domain"`: the normalised domain.
    Domain,
    /// `"externalCompanyId"`: Marketo's external company id.
    ExternalCompanyId,
}

impl MatchKey {
    /// The name as written in config.
    pub fn as_str(self) -> &'static str {
        match self {
            MatchKey::Domain => "domain",
            MatchKey::ExternalCompanyId => "externalCompanyId",
        }
    }
}

impl Config {
    /// Reads, parses and validates the config at `path`, and checks that every secret of
    /// an enabled connector can be fetched now (env var set, file readable), so that
    /// `crmbridge check` catches a missing secret before the daemon starts.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            errors: vec![ConfigError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot read config file: {e}"),
            }],
        })?;
        parse::parse(&text, path, true)
    }

    /// Parses and validates config `text` that came from `source` (used in error
    /// positions and to resolve relative paths). Does not fetch secrets.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigErrors> {
        parse::parse(text, source, false)
    }

    /// The connectors that records read from `connector` must be pushed to, per the
    /// flows: sorted, without `connector` itself and without disabled connectors. Empty for
    /// an unknown or disabled connector.
    pub fn targets_of(&self, connector: &str) -> Vec<String> {
        let enabled = |name: &str| {
            self.connectors
                .get(name)
                .is_some_and(|c| c.common().enabled)
        };
        if !enabled(connector) {
            return Vec::new();
        }
        let targets: BTreeSet<&String> = self
            .flows
            .iter()
            .filter(|f| f.from.iter().any(|s| s == connector))
            .flat_map(|f| f.to.iter())
            .filter(|t| *t != connector && enabled(t))
            .collect();
        targets.into_iter().cloned().collect()
    }

    /// A one-paragraph, human summary of what this config does (for `crmbridge check`).
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        let conns: Vec<String> = self
            .connectors
            .iter()
            .map(|(name, c)| {
                let common = c.common();
                format!(
                    "{name} ({}, {}, poll every {}{})",
                    c.kind(),
                    common.base_url,
                    humantime::format_duration(common.poll_interval),
                    if common.enabled { "" } else { ", DISABLED" }
                )
            })
            .collect();
        parts.push(format!(
            "{} connector{}: {}.",
            conns.len(),
            if conns.len() == 1 { "" } else { "s" },
            conns.join("; ")
        ));
        let routes: Vec<String> = self
            .connectors
            .keys()
            .map(|n| (n, self.targets_of(n)))
            .filter(|(_, t)| !t.is_empty())
            .map(|(n, t)| format!("{n} → {}", t.join(", ")))
            .collect();
        if routes.is_empty() {
            parts.push("Flows: none — nothing will be pushed anywhere.".to_string());
        } else {
            parts.push(format!("Flows: {}.", routes.join("; ")));
        }
        let mut conflict = match &self.conflict.default {
            ConflictRule::Newest => "Conflicts: newest value wins".to_string(),
            ConflictRule::Priority(p) => format!("Conflicts: first of {} wins", p.join(" > ")),
        };
        for (field, p) in &self.conflict.priority {
            conflict.push_str(&format!("; {field}: {}", p.join(" > ")));
        }
        parts.push(format!("{conflict}."));
        let keys: Vec<&str> = self.match_keys.iter().map(|k| k.as_str()).collect();
        parts.push(format!("Match keys: {}.", keys.join(", ")));
        parts.push(format!(
            "Deletes are {}propagated.",
            if self.propagate_deletes { "" } else { "not " }
        ));
        parts.push(format!("Store: {}.", self.store.path.display()));
        parts.push(match self.daemon.listen {
            Some(a) => format!("Metrics and health on http://{a}."),
            None => "Metrics and health endpoint off.".to_string(),
        });
        parts.join(" ")
    }
}

/// What `crmbridge check` prints: `(true, summary)` for a valid config (secrets
/// included), else `(false, every error, one per line, and a count)`.
pub fn check_report(path: &Path) -> (bool, String) {
    match Config::load(path) {
        Ok(config) => (
            true,
            format!("{} is valid. {}", path.display(), config.summary()),
        ),
        Err(errors) => {
            let n = errors.errors.len();
            (
                false,
                format!(
                    "{errors}\n{n} error{} in {}",
                    if n == 1 { "" } else { "s" },
                    path.display()
                ),
            )
        }
    }
}

/// Where rule `index` of connector `connector`'s `[[connectors.<name>.mapping.fields]]`
/// names its vendor field in config `text` (the rule itself when it names none):
/// `"line:column: dotted.key"`, for messages about the rule found after loading (by
/// `check --online`). `None` when the text does not hold that rule.
pub fn mapping_rule_position(text: &str, connector: &str, index: usize) -> Option<String> {
    use toml::de::{DeTable, DeValue};
    fn table<'a, 'i>(v: &'a toml::Spanned<DeValue<'i>>) -> Option<&'a DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => None,
        }
    }
    let root = DeTable::parse(text).ok()?;
    let connectors = root.get_ref().get("connectors").and_then(table)?;
    let mapping = connectors.get(connector).and_then(table)?;
    let mapping = mapping.get("mapping").and_then(table)?;
    let DeValue::Array(rules) = mapping.get("fields")?.get_ref() else {
        return None;
    };
    let rule = rules.get(index)?;
    let path = format!("connectors.{connector}.mapping.fields[{index}]");
    let (span, key) = match rule.get_ref() {
        DeValue::Table(t) => ["vendor", "field_code", "field_id", "field_name"]
            .iter()
            .find_map(|k| t.get(*k).map(|v| (v.span(), format!("{path}.{k}"))))
            .unwrap_or((rule.span(), path)),
        _ => (rule.span(), path),
    };
    let (line, column) = error::LineIndex::new(text).position(span.start);
    Some(format!("{line}:{column}: {key}"))
}
