//! `[connectors.<name>]`: the settings of one CRM instance, the defaults of each kind, and
//! the checks of its mapping rules against what that CRM can address.

use std::time::Duration;

use toml::de::DeValue;

use super::parse::unknown_field_message;
use super::reader::{Ctx, Node, SecretSite, Table, deserialize, join, type_error};
use super::{
    AmoAuth, AmocrmConfig, CommonConnectorConfig, ConnectorConfig, Limits, MarketoConfig,
    RallyConfig, SecretRef, Timeouts,
};
use crate::mapping::{Direction, FieldRule, MappingRules};
use crate::model::{CrmKind, FieldType, field_type};

const COMMON_KEYS: [&str; 8] = [
    "kind",
    "enabled",
    "base_url",
    "poll_interval",
    "batch_size",
    "timeouts",
    "limits",
    "mapping",
];
const RALLY_KEYS: &[&str] = &[
    "kind",
    "enabled",
    "base_url",
    "poll_interval",
    "batch_size",
    "timeouts",
    "limits",
    "mapping",
    "api_key",
    "page_size",
];
const MARKETO_KEYS: &[&str] = &[
    "kind",
    "enabled",
    "base_url",
    "poll_interval",
    "batch_size",
    "timeouts",
    "limits",
    "mapping",
    "client_id",
    "client_secret",
];
const AMOCRM_KEYS: &[&str] = &[
    "kind",
    "enabled",
    "base_url",
    "poll_interval",
    "batch_size",
    "timeouts",
    "limits",
    "mapping",
    "auth",
];
const TIMEOUT_KEYS: &[&str] = &["connect", "read", "write"];
const LIMIT_KEYS: &[&str] = &[
    "requests_per_second",
    "requests_per_window",
    "max_concurrent",
    "daily_quota",
    "daily_share",
];

/// Rally's company fields (`rally-companies.txt`) that a mapping may write; the
/// connector owns the list.
pub(crate) const RALLY_FIELDS: &[&str] = &crate::connectors::rally::WRITABLE_FIELDS;
/// Rally fields the API returns but never accepts.
pub(crate) const RALLY_READ_ONLY: &[&str] = &["id", "tenantId", "createdAt", "updatedAt"];

/// Defaults and hard maxima of one CRM kind.
struct KindDefaults {
    poll_interval: Duration,
    batch_size: usize,
    /// The API's own maximum per write call.
    max_batch: usize,
    timeouts: Timeouts,
    limits: Limits,
}

fn defaults(kind: CrmKind) -> KindDefaults {
    let timeouts = Timeouts {
        connect: Duration::from_secs(10),
        read: Duration::from_secs(30),
        write: Duration::from_secs(60),
    };
    match kind {
        // Rally documents no rate limit: 10/s is our assumption (see rally-notes).
        CrmKind::Rally => KindDefaults {
            poll_interval: Duration::from_secs(60),
            batch_size: 100,
            max_batch: 100,
            timeouts,
            limits: Limits {
                requests_per_second: Some(10.0),
                requests_per_window: None,
                max_concurrent: 4,
                daily_quota: None,
                daily_share: 1.0,
            },
        },
        // Marketo: 100 calls / 20 s, 10 concurrent, 50k/day shared with other integrations;
        // 30 s read / 60 s write timeouts are from Adobe's document.
        CrmKind::Marketo => KindDefaults {
            poll_interval: Duration::from_secs(300),
            batch_size: 300,
            max_batch: 300,
            timeouts,
            limits: Limits {
                requests_per_second: None,
                requests_per_window: Some((100, Duration::from_secs(20))),
                max_concurrent: 10,
                daily_quota: Some(50_000),
                daily_share: 0.5,
            },
        },
        // amoCRM: 7 requests/s (bans follow repeated 429s); 50 per batch recommended, 250 max.
        CrmKind::Amocrm => KindDefaults {
            poll_interval: Duration::from_secs(60),
            batch_size: 50,
            max_batch: 250,
            timeouts,
            limits: Limits {
                requests_per_second: Some(7.0),
                requests_per_window: None,
                max_concurrent: 4,
                daily_quota: None,
                daily_share: 1.0,
            },
        },
    }
}

/// Reads one connector; `None` if it has errors (all of them recorded).
pub(crate) fn parse_connector(
    ctx: &mut Ctx<'_>,
    node: &Node<'_>,
    path: &str,
    sites: &mut Vec<SecretSite>,
) -> Option<ConnectorConfig> {
    // Look at `kind` first: it decides which keys are allowed.
    let probe = Table::new(ctx, node, path, &COMMON_KEYS)?;
    let (kind_name, kind_span) = match probe.require(ctx, "kind") {
        Some(_) => probe.string(ctx, "kind")?,
        None => return None,
    };
    let kind = match kind_name.as_str() {
        "rally" => CrmKind::Rally,
        "marketo" => CrmKind::Marketo,
        "amocrm" => CrmKind::Amocrm,
        other => {
            ctx.error(
                &kind_span,
                &join(path, "kind"),
                format!(
                    "unknown connector kind {other:?}; expected one of: rally, marketo, amocrm"
                ),
            );
            return None;
        }
    };
    let allowed = match kind {
        CrmKind::Rally => RALLY_KEYS,
        CrmKind::Marketo => MARKETO_KEYS,
        CrmKind::Amocrm => AMOCRM_KEYS,
    };
    let t = Table::new(ctx, node, path, allowed)?;
    let errors_before = ctx.errors.len();
    let d = defaults(kind);
    let enabled = t.bool(ctx, "enabled").unwrap_or(true);
    let mut sites_here = Vec::new();

    let base_url = parse_base_url(ctx, &t, kind);
    let poll_interval = t
        .duration(ctx, "poll_interval", false)
        .unwrap_or(d.poll_interval);
    let batch_size = t
        .int(ctx, "batch_size", 1, d.max_batch as i64)
        .map_or(d.batch_size, |v| v as usize);
    let timeouts = parse_timeouts(ctx, &t, d.timeouts);
    let limits = parse_limits(ctx, &t, d.limits);
    let mapping = parse_mapping(ctx, &t, kind);
    let mut secret = |ctx: &mut Ctx<'_>, table: &Table<'_, '_>, key: &str| -> Option<SecretRef> {
        let (s, span) = table.secret(ctx, key)?;
        sites_here.push(SecretSite {
            secret: s.clone(),
            key: table.key_path(key),
            span,
            enabled,
        });
        Some(s)
    };

    // Kind-specific keys; each is `None` when missing or wrong (already reported).
    let specific = match kind {
        CrmKind::Rally => {
            let api_key = secret(ctx, &t, "api_key");
            let page_size = t.int(ctx, "page_size", 1, 100).map_or(100, |v| v as usize);
            api_key.map(|api_key| Specific::Rally { api_key, page_size })
        }
        CrmKind::Marketo => {
            let client_id = secret(ctx, &t, "client_id");
            let client_secret = secret(ctx, &t, "client_secret");
            client_id
                .zip(client_secret)
                .map(|(client_id, client_secret)| Specific::Marketo {
                    client_id,
                    client_secret,
                })
        }
        CrmKind::Amocrm => t
            .require(ctx, "auth")
            .and_then(|_| parse_amo_auth(ctx, &t, &mut secret))
            .map(Specific::Amocrm),
    };
    t.finish(ctx);
    sites.extend(sites_here);
    if ctx.errors.len() > errors_before {
        return None;
    }
    let common = CommonConnectorConfig {
        base_url: base_url?,
        poll_interval,
        batch_size,
        timeouts,
        limits,
        enabled,
    };
    let mapping = mapping?;
    Some(match specific? {
        Specific::Rally { api_key, page_size } => ConnectorConfig::Rally(RallyConfig {
            common,
            api_key,
            page_size,
            mapping,
        }),
        Specific::Marketo {
            client_id,
            client_secret,
        } => ConnectorConfig::Marketo(MarketoConfig {
            common,
            client_id,
            client_secret,
            mapping,
        }),
        Specific::Amocrm(auth) => ConnectorConfig::Amocrm(AmocrmConfig {
            common,
            auth,
            mapping,
        }),
    })
}

/// The settings only one kind has, read before the connector is assembled.
enum Specific {
    Rally {
        api_key: SecretRef,
        page_size: usize,
    },
    Marketo {
        client_id: SecretRef,
        client_secret: SecretRef,
    },
    Amocrm(AmoAuth),
}

fn parse_base_url(ctx: &mut Ctx<'_>, t: &Table<'_, '_>, kind: CrmKind) -> Option<url::Url> {
    t.require(ctx, "base_url")?;
    let (text, span) = t.string(ctx, "base_url")?;
    let key = t.key_path("base_url");
    let mut url = match url::Url::parse(&text) {
        Ok(u) => u,
        Err(e) => {
            ctx.error(&span, &key, format!("{text:?} is not a URL: {e}"));
            return None;
        }
    };
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        ctx.error(
            &span,
            &key,
            format!("{text:?} must be an http:// or https:// URL with a host"),
        );
        return None;
    }
    if !url.username().is_empty() || url.password().is_some() {
        ctx.error(
            &span,
            &key,
            "base_url must not carry credentials; put them in the secret keys",
        );
        return None;
    }
    if url.query().is_some() || url.fragment().is_some() {
        ctx.error(&span, &key, "base_url must not have a query or fragment");
        return None;
    }
    let mut path = url.path().trim_end_matches('/').to_string();
    // Admins copy Marketo's REST endpoint as `https://123-ABC-456.mktorest.com/rest`; the
    // connector adds `/rest/v1/…` and `/identity/…` itself, so we keep the instance root.
    if kind == CrmKind::Marketo
        && let Some(stripped) = path.strip_suffix("/rest")
    {
        path = stripped.to_string();
    }
    url.set_path(&format!("{path}/"));
    Some(url)
}

fn parse_timeouts(ctx: &mut Ctx<'_>, t: &Table<'_, '_>, mut timeouts: Timeouts) -> Timeouts {
    let Some(tt) = t.table(ctx, "timeouts", TIMEOUT_KEYS) else {
        return timeouts;
    };
    if let Some(d) = tt.duration(ctx, "connect", false) {
        timeouts.connect = d;
    }
    if let Some(d) = tt.duration(ctx, "read", false) {
        timeouts.read = d;
    }
    if let Some(d) = tt.duration(ctx, "write", false) {
        timeouts.write = d;
    }
    tt.finish(ctx);
    timeouts
}

fn parse_limits(ctx: &mut Ctx<'_>, t: &Table<'_, '_>, mut limits: Limits) -> Limits {
    let Some(lt) = t.table(ctx, "limits", LIMIT_KEYS) else {
        return limits;
    };
    if let Some((rps, span)) = lt.number(ctx, "requests_per_second") {
        if rps > 0.0 {
            limits.requests_per_second = Some(rps);
        } else {
            ctx.error(
                &span,
                &lt.key_path("requests_per_second"),
                "must be greater than zero",
            );
        }
    }
    if let Some(wt) = lt.table(ctx, "requests_per_window", &["requests", "window"]) {
        let requests = wt
            .require(ctx, "requests")
            .and_then(|_| wt.int(ctx, "requests", 1, u32::MAX as i64));
        let window = wt
            .require(ctx, "window")
            .and_then(|_| wt.duration(ctx, "window", false));
        if let (Some(r), Some(w)) = (requests, window) {
            limits.requests_per_window = Some((r as u32, w));
        }
        wt.finish(ctx);
    }
    if let Some(n) = lt.int(ctx, "max_concurrent", 1, 1024) {
        limits.max_concurrent = n as usize;
    }
    if let Some(n) = lt.int(ctx, "daily_quota", 1, i64::MAX) {
        limits.daily_quota = Some(n as u64);
    }
    if let Some((share, span)) = lt.number(ctx, "daily_share") {
        if (0.0..=1.0).contains(&share) {
            limits.daily_share = share;
        } else {
            ctx.error(
                &span,
                &lt.key_path("daily_share"),
                format!("{share} is outside 0..=1 (it is a share of daily_quota, e.g. 0.5)"),
            );
        }
    }
    lt.finish(ctx);
    limits
}

fn parse_amo_auth(
    ctx: &mut Ctx<'_>,
    t: &Table<'_, '_>,
    secret: &mut impl FnMut(&mut Ctx<'_>, &Table<'_, '_>, &str) -> Option<SecretRef>,
) -> Option<AmoAuth> {
    let probe = t.table(ctx, "auth", &["type"])?;
    probe.require(ctx, "type")?;
    let (ty, span) = probe.string(ctx, "type")?;
    match ty.as_str() {
        "long_lived" => {
            let a = t.table(ctx, "auth", &["type", "token"])?;
            let token = secret(ctx, &a, "token");
            a.finish(ctx);
            Some(AmoAuth::LongLived { token: token? })
        }
        "oauth" => {
            let a = t.table(
                ctx,
                "auth",
                &[
                    "type",
                    "client_id",
                    "client_secret",
                    "redirect_uri",
                    "refresh_token",
                ],
            )?;
            let client_id = secret(ctx, &a, "client_id");
            let client_secret = secret(ctx, &a, "client_secret");
            let refresh_token = secret(ctx, &a, "refresh_token");
            let redirect_uri = a
                .require(ctx, "redirect_uri")
                .and_then(|_| a.string(ctx, "redirect_uri"));
            if let Some((uri, span)) = &redirect_uri
                && url::Url::parse(uri).is_err()
            {
                ctx.error(
                    span,
                    &a.key_path("redirect_uri"),
                    format!("{uri:?} is not a URL"),
                );
            }
            a.finish(ctx);
            Some(AmoAuth::OAuth {
                client_id: client_id?,
                client_secret: client_secret?,
                redirect_uri: redirect_uri?.0,
                refresh_token: refresh_token?,
            })
        }
        other => {
            ctx.error(
                &span,
                &probe.key_path("type"),
                format!("unknown auth type {other:?}; expected \"long_lived\" or \"oauth\""),
            );
            None
        }
    }
}

/// Reads `[connectors.<name>.mapping]` rule by rule and checks each against the CRM.
fn parse_mapping(ctx: &mut Ctx<'_>, t: &Table<'_, '_>, kind: CrmKind) -> Option<MappingRules> {
    let mut rules = MappingRules {
        use_defaults: true,
        ..MappingRules::default()
    };
    let Some(mt) = t.table(ctx, "mapping", &["use_defaults", "ignore", "fields"]) else {
        // Absent mapping means the defaults; a present non-table was reported.
        return t.get("mapping").is_none().then_some(rules);
    };
    let before = ctx.errors.len();
    if let Some(b) = mt.bool(ctx, "use_defaults") {
        rules.use_defaults = b;
    }
    if let Some(list) = mt.names(ctx, "ignore") {
        for (name, span) in list {
            if field_type(&name).is_none() {
                ctx.error(&span, &mt.key_path("ignore"), unknown_field_message(&name));
            } else if rules.ignore.contains(&name) {
                ctx.error(
                    &span,
                    &mt.key_path("ignore"),
                    format!("`{name}` is listed twice"),
                );
            } else {
                rules.ignore.push(name);
            }
        }
    }
    if let Some(node) = mt.get("fields") {
        let path = mt.key_path("fields");
        match node.get_ref() {
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let rpath = format!("{path}[{i}]");
                    let Some(rule) = deserialize::<FieldRule>(ctx, item, &rpath) else {
                        continue;
                    };
                    check_rule(ctx, item, &rpath, &rule, kind, &rules);
                    rules.fields.push(rule);
                }
            }
            other => type_error(
                ctx,
                node,
                &path,
                "an array of rules ([[…mapping.fields]])",
                other,
            ),
        }
    }
    mt.finish(ctx);
    (ctx.errors.len() == before).then_some(rules)
}

/// Span of `key` inside a rule (for precise positions), else of the rule itself.
fn span_of(item: &Node<'_>, key: &str) -> std::ops::Range<usize> {
    match item.get_ref() {
        DeValue::Table(t) => t.get(key).map_or_else(|| item.span(), |v| v.span()),
        _ => item.span(),
    }
}

fn check_rule(
    ctx: &mut Ctx<'_>,
    item: &Node<'_>,
    path: &str,
    rule: &FieldRule,
    kind: CrmKind,
    earlier: &MappingRules,
) {
    let canonical_key = join(path, "canonical");
    let ftype = field_type(&rule.canonical);
    if ftype.is_none() {
        ctx.error(
            &span_of(item, "canonical"),
            &canonical_key,
            unknown_field_message(&rule.canonical),
        );
    }
    if earlier.fields.iter().any(|r| r.canonical == rule.canonical) {
        ctx.error(
            &span_of(item, "canonical"),
            &canonical_key,
            format!(
                "canonical field `{}` is mapped twice in this connector",
                rule.canonical
            ),
        );
    }
    if earlier.ignore.contains(&rule.canonical) {
        ctx.error(
            &span_of(item, "canonical"),
            &canonical_key,
            format!(
                "canonical field `{}` is both ignored and mapped",
                rule.canonical
            ),
        );
    }
    let targets = [
        ("vendor", rule.vendor.is_some()),
        ("field_code", rule.field_code.is_some()),
        ("field_id", rule.field_id.is_some()),
        ("field_name", rule.field_name.is_some()),
    ];
    let given: Vec<&str> = targets
        .iter()
        .filter(|(_, g)| *g)
        .map(|(k, _)| *k)
        .collect();
    if given.len() != 1 {
        let msg = if given.is_empty() {
            "a rule needs exactly one of vendor, field_code, field_id, field_name; none is given"
                .to_string()
        } else {
            format!(
                "a rule needs exactly one of vendor, field_code, field_id, field_name; {} are given",
                given.join(" and ")
            )
        };
        ctx.error(&item.span(), path, msg);
    }
    if kind != CrmKind::Amocrm {
        for key in ["field_code", "field_id", "field_name", "enum_code"] {
            if let DeValue::Table(t) = item.get_ref()
                && t.contains_key(key)
            {
                ctx.error(
                    &span_of(item, key),
                    &join(path, key),
                    format!(
                        "`{key}` addresses amoCRM custom fields; a {kind} connector uses `vendor`"
                    ),
                );
            }
        }
    } else if rule.enum_code.is_some() && rule.vendor.is_some() {
        ctx.error(
            &span_of(item, "enum_code"),
            &join(path, "enum_code"),
            "`enum_code` applies to multitext custom fields (field_code/field_id/field_name), not `vendor`",
        );
    }
    if kind == CrmKind::Rally
        && let Some(v) = &rule.vendor
    {
        let vkey = join(path, "vendor");
        if RALLY_READ_ONLY.contains(&v.as_str()) {
            if rule.direction != Direction::ReadOnly {
                ctx.error(
                    &span_of(item, "vendor"),
                    &vkey,
                    format!("Rally field `{v}` is read-only: add direction = \"read-only\""),
                );
            }
        } else if !RALLY_FIELDS.contains(&v.as_str()) {
            let mut all: Vec<&str> = RALLY_FIELDS.to_vec();
            all.extend_from_slice(RALLY_READ_ONLY);
            let hint = match super::reader::closest(v, &all) {
                Some(n) => format!("did you mean `{n}`?"),
                None => format!("Rally's fields are: {}", all.join(", ")),
            };
            ctx.error(
                &span_of(item, "vendor"),
                &vkey,
                format!("unknown Rally field `{v}` (Rally's schema is fixed); {hint}"),
            );
        }
    }
    if let (Some(default), Some(ft)) = (&rule.default, ftype)
        && !default_fits(default, ft)
    {
        ctx.error(
            &span_of(item, "default"),
            &join(path, "default"),
            format!(
                "default does not fit field `{}`: {}",
                rule.canonical,
                match ft {
                    FieldType::Text => "expected a string",
                    FieldType::Int => "expected an integer",
                    FieldType::Decimal =>
                        "expected a decimal as a string (\"12.50\") or an integer",
                    FieldType::Tags => "expected a list of strings",
                    FieldType::Json => "any value fits",
                }
            ),
        );
    }
}

/// Whether a rule's `default` can become a value of type `ft`. Decimals must be written
/// as strings or integers: a TOML float would already have lost precision.
fn default_fits(v: &toml::Value, ft: FieldType) -> bool {
    match ft {
        FieldType::Text => v.is_str(),
        FieldType::Int => v.is_integer(),
        FieldType::Decimal => {
            v.is_integer()
                || v.as_str()
                    .is_some_and(|s| crate::model::parse_decimal(s).is_some())
        }
        FieldType::Tags => v
            .as_array()
            .is_some_and(|a| a.iter().all(toml::Value::is_str)),
        FieldType::Json => true,
    }
}
