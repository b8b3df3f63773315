//! The top level of the config document: store, daemon, flows, conflict policy, match
//! keys; connectors are read in `connectors.rs`. Every section is read even when an
//! earlier one failed, so that all errors are reported together.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::{DeTable, DeValue};

use super::connectors::parse_connector;
use super::reader::{Ctx, Node, SecretSite, Table, type_error};
use super::{
    Config, ConfigErrors, ConflictPolicy, ConflictRule, ConnectorConfig, DaemonConfig, Flow,
    LogFormat, MatchKey, StoreConfig,
};

const TOP_KEYS: &[&str] = &[
    "store",
    "daemon",
    "connectors",
    "flows",
    "conflict",
    "match_keys",
    "propagate_deletes",
];

/// Parses and validates `text`; with `resolve_secrets`, also fetches every secret of an
/// enabled connector and reports those that cannot be fetched.
pub(crate) fn parse(
    text: &str,
    source: &Path,
    resolve_secrets: bool,
) -> Result<Config, ConfigErrors> {
    let mut ctx = Ctx::new(text, source);
    let (root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        // A broken line makes the parser report follow-on errors on the same line; the
        // first one per line is the useful one.
        let mut lines = BTreeSet::new();
        for e in &syntax {
            let span = e.span().unwrap_or(0..0);
            let before = ctx.errors.len();
            let key = key_at(text, span.start);
            ctx.error(&span, &key, e.message().trim().to_string());
            let line = ctx.errors[before].line;
            if !lines.insert(line) {
                ctx.errors.pop();
            }
        }
        return Err(finish(ctx));
    }
    let root_node: Node<'_> = toml::Spanned::new(root.span(), DeValue::Table(root.into_inner()));
    let Some(top) = Table::new(&mut ctx, &root_node, "", TOP_KEYS) else {
        return Err(finish(ctx));
    };

    let mut sites = Vec::new();
    let store = parse_store(&mut ctx, &top, source);
    let daemon = parse_daemon(&mut ctx, &top);
    let (connectors, names) = parse_connectors(&mut ctx, &top, &mut sites);
    let flows = parse_flows(&mut ctx, &top, &names);
    let conflict = parse_conflict(&mut ctx, &top, &names);
    let match_keys = parse_match_keys(&mut ctx, &top);
    let propagate_deletes = top.bool(&mut ctx, "propagate_deletes").unwrap_or(false);
    if propagate_deletes && let Some(node) = top.get("propagate_deletes") {
        // Refuse rather than silently ignore: deleting in targets is not implemented.
        ctx.error(
            &node.span(),
            "propagate_deletes",
            "propagating deletes is not supported: deletes are never inferred or propagated; \
             remove the key or set it to false",
        );
    }
    top.finish(&mut ctx);

    // Secrets are fetched even when other errors were found, so one `check` lists them all.
    if resolve_secrets {
        for site in sites.iter().filter(|s| s.enabled) {
            if let Err(e) = site.secret.resolve() {
                ctx.error(&site.span, &site.key, e.to_string());
            }
        }
    }
    if !ctx.errors.is_empty() {
        return Err(finish(ctx));
    }
    Ok(Config {
        source: source.to_path_buf(),
        store,
        daemon: daemon.expect("daemon parsed without errors"),
        connectors,
        flows,
        conflict,
        match_keys,
        propagate_deletes,
    })
}

fn finish(mut ctx: Ctx<'_>) -> ConfigErrors {
    ctx.errors.sort_by_key(|e| (e.line, e.column));
    ConfigErrors { errors: ctx.errors }
}

/// Directory the config file is in, for resolving relative paths.
fn config_dir(source: &Path) -> PathBuf {
    source.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn parse_store(ctx: &mut Ctx<'_>, top: &Table<'_, '_>, source: &Path) -> StoreConfig {
    let dir = config_dir(source);
    let default = || match std::env::var_os("STATE_DIRECTORY") {
        // systemd may list several directories separated by ':'; the first is ours.
        Some(s) if !s.is_empty() => {
            let s = s.to_string_lossy().into_owned();
            PathBuf::from(s.split(':').next().unwrap_or_default()).join("crmbridge.redb")
        }
        _ => dir.join("crmbridge.redb"),
    };
    let Some(t) = top.table(ctx, "store", &["path"]) else {
        return StoreConfig { path: default() };
    };
    let path = match t.string(ctx, "path") {
        Some((p, span)) if p.is_empty() => {
            ctx.error(&span, &t.key_path("path"), "store path is empty");
            default()
        }
        Some((p, _)) => {
            let p = PathBuf::from(p);
            if p.is_relative() { dir.join(p) } else { p }
        }
        None => default(),
    };
    t.finish(ctx);
    StoreConfig { path }
}

fn parse_daemon(ctx: &mut Ctx<'_>, top: &Table<'_, '_>) -> Option<DaemonConfig> {
    let mut daemon = DaemonConfig {
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        unhealthy_after: Duration::from_secs(15 * 60),
        shutdown_grace: Duration::from_secs(30),
        log_format: LogFormat::Auto,
    };
    let Some(t) = top.table(
        ctx,
        "daemon",
        &[
            "listen",
            "allow_non_loopback",
            "unhealthy_after",
            "shutdown_grace",
            "log_format",
        ],
    ) else {
        return Some(daemon);
    };
    let allow_non_loopback = t.bool(ctx, "allow_non_loopback").unwrap_or(false);
    if let Some(node) = t.get("listen") {
        let path = t.key_path("listen");
        match node.get_ref() {
            DeValue::Boolean(false) => daemon.listen = None,
            DeValue::String(s) => match s.parse::<SocketAddr>() {
                Ok(addr) if !addr.ip().is_loopback() && !allow_non_loopback => ctx.error(
                    &node.span(),
                    &path,
                    format!(
                        "{addr} is not a loopback address; the metrics/health endpoint has no \
                         authentication: set allow_non_loopback = true to expose it anyway"
                    ),
                ),
                Ok(addr) => daemon.listen = Some(addr),
                Err(_) => ctx.error(
                    &node.span(),
                    &path,
                    format!("{s:?} is not an address with port, e.g. \"127.0.0.1:9464\""),
                ),
            },
            other => type_error(
                ctx,
                node,
                &path,
                "an address such as \"127.0.0.1:9464\" or false",
                other,
            ),
        }
    }
    if let Some(d) = t.duration(ctx, "unhealthy_after", false) {
        daemon.unhealthy_after = d;
    }
    if let Some(d) = t.duration(ctx, "shutdown_grace", true) {
        daemon.shutdown_grace = d;
    }
    if let Some((f, span)) = t.string(ctx, "log_format") {
        match f.as_str() {
            "auto" => daemon.log_format = LogFormat::Auto,
            "human" => daemon.log_format = LogFormat::Human,
            "journald" => daemon.log_format = LogFormat::Journald,
            "json" => daemon.log_format = LogFormat::Json,
            _ => ctx.error(
                &span,
                &t.key_path("log_format"),
                format!("unknown log format {f:?}; expected one of: auto, human, journald, json"),
            ),
        }
    }
    t.finish(ctx);
    Some(daemon)
}

/// Connector names go into metric labels and store keys: keep them plain.
fn valid_connector_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Connectors, plus the set of every connector name declared (even those with errors),
/// so flows naming them are not reported as unknown on top of their own errors.
fn parse_connectors(
    ctx: &mut Ctx<'_>,
    top: &Table<'_, '_>,
    sites: &mut Vec<SecretSite>,
) -> (BTreeMap<String, ConnectorConfig>, BTreeSet<String>) {
    let mut out = BTreeMap::new();
    let mut names = BTreeSet::new();
    let Some(node) = top.require(ctx, "connectors") else {
        return (out, names);
    };
    let path = top.key_path("connectors");
    let DeValue::Table(table) = node.get_ref() else {
        type_error(ctx, node, &path, "a table of connectors", node.get_ref());
        return (out, names);
    };
    if table.is_empty() {
        ctx.error(&node.span(), &path, "no connectors configured");
    }
    for (k, v) in table.iter() {
        let name = k.get_ref().to_string();
        let key = format!("{path}.{name}");
        names.insert(name.clone());
        if !valid_connector_name(&name) {
            ctx.error(
                &k.span(),
                &key,
                "connector names may only use letters, digits, '-' and '_' (at most 64)",
            );
            continue;
        }
        if let Some(c) = parse_connector(ctx, v, &key, sites) {
            out.insert(name, c);
        }
    }
    (out, names)
}

/// Checks connector `names` (with spans) against the declared ones; returns the names if
/// all are known and none repeats.
fn known_names(
    ctx: &mut Ctx<'_>,
    names: Vec<(String, Range<usize>)>,
    key: &str,
    declared: &BTreeSet<String>,
) -> Option<Vec<String>> {
    let mut ok = true;
    let mut seen = BTreeSet::new();
    for (n, span) in &names {
        if !declared.contains(n) {
            let list: Vec<&str> = declared.iter().map(String::as_str).collect();
            ctx.error(
                span,
                key,
                format!(
                    "unknown connector `{n}`; declared connectors: {}",
                    list.join(", ")
                ),
            );
            ok = false;
        } else if !seen.insert(n.clone()) {
            ctx.error(span, key, format!("connector `{n}` is listed twice"));
            ok = false;
        }
    }
    ok.then(|| names.into_iter().map(|(n, _)| n).collect())
}

fn parse_flows(ctx: &mut Ctx<'_>, top: &Table<'_, '_>, declared: &BTreeSet<String>) -> Vec<Flow> {
    let mut flows = Vec::new();
    let Some(node) = top.get("flows") else {
        if !declared.is_empty() {
            ctx.error(
                &top.span,
                "flows",
                "no flows defined, so nothing would be synced: add e.g. [[flows]] with \
                 `all = true`, `between = [...]` or `from = ... to = [...]` (write `flows = []` \
                 to only read into the store)",
            );
        }
        return flows;
    };
    let DeValue::Array(items) = node.get_ref() else {
        type_error(
            ctx,
            node,
            "flows",
            "an array of tables ([[flows]])",
            node.get_ref(),
        );
        return flows;
    };
    for (i, item) in items.iter().enumerate() {
        let path = format!("flows[{i}]");
        let Some(t) = Table::new(ctx, item, &path, &["from", "to", "between", "all"]) else {
            continue;
        };
        let forms = ["from", "between", "all"]
            .iter()
            .filter(|k| t.table.contains_key(**k))
            .count();
        if forms != 1 || (t.table.contains_key("to") && !t.table.contains_key("from")) {
            ctx.error(
                &t.span,
                &path,
                "a flow is exactly one of: `from` + `to` (one-way), `between` (every listed \
                 connector to every other), or `all = true` (all connectors to all)",
            );
            t.finish(ctx);
            continue;
        }
        if t.table.contains_key("from") {
            let from = t
                .names(ctx, "from")
                .and_then(|n| known_names(ctx, n, &t.key_path("from"), declared));
            let to = match t.require(ctx, "to") {
                Some(_) => t
                    .names(ctx, "to")
                    .and_then(|n| known_names(ctx, n, &t.key_path("to"), declared)),
                None => None,
            };
            if let (Some(from), Some(to)) = (from, to) {
                let both: Vec<&String> = from.iter().filter(|f| to.contains(f)).collect();
                if from.is_empty() || to.is_empty() {
                    ctx.error(
                        &t.span,
                        &path,
                        "`from` and `to` must each name at least one connector",
                    );
                } else if !both.is_empty() {
                    let names: Vec<&str> = both.iter().map(|s| s.as_str()).collect();
                    ctx.error(
                        &t.span,
                        &path,
                        format!(
                            "flow sends {} to itself; use `between` for two-way sync",
                            names.join(", ")
                        ),
                    );
                } else {
                    flows.push(Flow { from, to });
                }
            }
        } else if t.table.contains_key("between") {
            if let Some(list) = t
                .names(ctx, "between")
                .and_then(|n| known_names(ctx, n, &t.key_path("between"), declared))
            {
                if list.len() < 2 {
                    ctx.error(
                        &t.span,
                        &t.key_path("between"),
                        "`between` needs at least two connectors",
                    );
                } else {
                    flows.push(Flow {
                        from: list.clone(),
                        to: list,
                    });
                }
            }
        } else if let Some(all) = t.bool(ctx, "all") {
            if all {
                let every: Vec<String> = declared.iter().cloned().collect();
                flows.push(Flow {
                    from: every.clone(),
                    to: every,
                });
            } else {
                ctx.error(
                    &t.span,
                    &t.key_path("all"),
                    "`all = false` describes no flow; remove this flow",
                );
            }
        }
        t.finish(ctx);
    }
    flows
}

fn parse_conflict(
    ctx: &mut Ctx<'_>,
    top: &Table<'_, '_>,
    declared: &BTreeSet<String>,
) -> ConflictPolicy {
    let mut policy = ConflictPolicy::default();
    let Some(t) = top.table(ctx, "conflict", &["default", "priority"]) else {
        return policy;
    };
    if let Some(node) = t.get("default") {
        let key = t.key_path("default");
        match node.get_ref() {
            DeValue::String(s) if s.as_ref() == "newest" => policy.default = ConflictRule::Newest,
            DeValue::String(s) => ctx.error(
                &node.span(),
                &key,
                format!("unknown conflict rule {s:?}; expected \"newest\" or a list of connectors, first wins"),
            ),
            DeValue::Array(_) => {
                if let Some(list) = t
                    .names(ctx, "default")
                    .and_then(|n| known_names(ctx, n, &key, declared))
                {
                    if list.is_empty() {
                        ctx.error(&node.span(), &key, "priority list is empty");
                    } else {
                        policy.default = ConflictRule::Priority(list);
                    }
                }
            }
            other => type_error(ctx, node, &key, "\"newest\" or a list of connectors", other),
        }
    }
    if let Some(node) = t.get("priority") {
        let path = t.key_path("priority");
        match node.get_ref() {
            DeValue::Table(fields) => {
                for (k, v) in fields.iter() {
                    let field = k.get_ref().to_string();
                    let key = format!("{path}.{field}");
                    if crate::model::field_type(&field).is_none() {
                        ctx.error(&k.span(), &key, unknown_field_message(&field));
                        continue;
                    }
                    let names = match v.get_ref() {
                        DeValue::Array(a) => {
                            let mut out = Vec::new();
                            for (i, e) in a.iter().enumerate() {
                                if let Some(s) =
                                    super::reader::as_string(ctx, e, &format!("{key}[{i}]"))
                                {
                                    out.push((s, e.span()));
                                }
                            }
                            out
                        }
                        other => {
                            type_error(ctx, v, &key, "a list of connectors", other);
                            continue;
                        }
                    };
                    if names.is_empty() {
                        ctx.error(&v.span(), &key, "priority list is empty");
                    } else if let Some(list) = known_names(ctx, names, &key, declared) {
                        policy.priority.insert(field, list);
                    }
                }
            }
            other => type_error(ctx, node, &path, "a table of field = [connectors]", other),
        }
    }
    t.finish(ctx);
    policy
}

/// "unknown canonical field" with the list of valid ones.
pub(crate) fn unknown_field_message(field: &str) -> String {
    let names: Vec<&str> = crate::model::STANDARD_FIELDS
        .iter()
        .map(|(n, _)| *n)
        .collect();
    let hint = match super::reader::closest(field, &names) {
        Some(n) => format!("did you mean `{n}`?"),
        None => format!("expected one of {} or custom.<name>", names.join(", ")),
    };
    format!("unknown canonical field `{field}`; {hint}")
}

fn parse_match_keys(ctx: &mut Ctx<'_>, top: &Table<'_, '_>) -> Vec<MatchKey> {
    let default = vec![MatchKey::Domain, MatchKey::ExternalCompanyId];
    let Some(node) = top.get("match_keys") else {
        return default;
    };
    let DeValue::Array(items) = node.get_ref() else {
        type_error(
            ctx,
            node,
            "match_keys",
            "a list such as [\"domain\", \"externalCompanyId\"]",
            node.get_ref(),
        );
        return default;
    };
    let mut keys = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("match_keys[{i}]");
        let Some(s) = super::reader::as_string(ctx, item, &path) else {
            continue;
        };
        let key = match s.as_str() {
            "domain" => MatchKey::Domain,
            "externalCompanyId" => MatchKey::ExternalCompanyId,
            _ => {
                ctx.error(
                    &item.span(),
                    &path,
                    format!(
                        "unknown match key {s:?}; expected \"domain\" or \"externalCompanyId\""
                    ),
                );
                continue;
            }
        };
        if keys.contains(&key) {
            ctx.error(
                &item.span(),
                &path,
                format!("match key {s:?} is listed twice"),
            );
        } else {
            keys.push(key);
        }
    }
    if items.is_empty() {
        ctx.error(
            &node.span(),
            "match_keys",
            "at least one match key is needed, or every record would create a new company",
        );
    }
    keys
}

/// The dotted key written on the line holding byte `offset` of `text` (the table header
/// above it, then the part before `=`), for syntax errors, which come without one; empty
/// when the line has none (a broken header names its table).
fn key_at(text: &str, offset: usize) -> String {
    let mut offset = offset.min(text.len());
    // Never slice inside a character, whatever span a broken input gets.
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[start..end].trim();
    let unquote = |k: &str| k.trim().trim_matches('"').trim_matches('\'').to_string();
    if line.starts_with('[') {
        return unquote(line.trim_start_matches('[').split(']').next().unwrap_or(""));
    }
    let Some((key, _)) = line.split_once('=') else {
        return String::new();
    };
    let key = key.split('.').map(unquote).collect::<Vec<_>>().join(".");
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|h| unquote(h.trim_start_matches('[').split(']').next().unwrap_or("")));
    match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key,
    }
}
