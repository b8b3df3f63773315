//! Merging one CRM's view of a company into the canonical company: the per-field conflict
//! policy (newest vendor timestamp wins, or a configured source priority), and the match
//! keys that identify a record seen for the first time. Pure functions, no I/O.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::model::{Company, FieldState, Fields, Provenance, Value, normalize_domain};

/// How conflicting values of one field are settled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConflictPolicy {
    /// Per canonical field, connectors in order of authority (first wins). Connectors not
    /// listed rank below every listed one. Fields without a list use "newest wins".
    pub priority: BTreeMap<String, Vec<String>>,
    /// Connectors in order of authority for fields without their own list; empty means
    /// "newest wins" for those fields.
    pub default_priority: Vec<String>,
}

impl ConflictPolicy {
    /// Whether `incoming` should replace `current` for `field`.
    ///
    /// Newest vendor timestamp wins; on a tie the incoming value wins only if it comes from
    /// the same connector (a re-read of the same record), so two CRMs with equal
    /// timestamps cannot flip a field back and forth.
    pub fn incoming_wins(&self, field: &str, current: &Provenance, incoming: &Provenance) -> bool {
        let order = self
            .priority
            .get(field)
            .or((!self.default_priority.is_empty()).then_some(&self.default_priority));
        if let Some(order) = order {
            let rank = |c: &str| order.iter().position(|x| x == c).unwrap_or(order.len());
            let (cur, inc) = (rank(&current.connector), rank(&incoming.connector));
            if cur != inc {
                return inc < cur;
            }
        }
        match incoming.vendor_ts.cmp(&current.vendor_ts) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => incoming.connector == current.connector,
        }
    }
}

/// What merging a record changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    /// Canonical fields whose value changed.
    pub changed: Vec<String>,
}

impl MergeOutcome {
    /// True when no value changed.
    pub fn is_unchanged(&self) -> bool {
        self.changed.is_empty()
    }
}

/// Merges `incoming` values read from `connector` (vendor time `vendor_ts`) into `company`.
///
/// A field whose value is equal (by meaning: decimals normalised) keeps its provenance, so
/// re-reading our own write never moves a field's timestamp and never triggers pushes.
pub fn merge_into(
    company: &mut Company,
    incoming: &Fields,
    connector: &str,
    vendor_ts: DateTime<Utc>,
    policy: &ConflictPolicy,
) -> MergeOutcome {
    let source = Provenance {
        connector: connector.to_string(),
        vendor_ts,
    };
    let mut out = MergeOutcome::default();
    for (field, value) in incoming {
        match company.fields.get_mut(field) {
            // "No value" for a field we know nothing of is no news: recording it would
            // only make every other CRM write an explicit null.
            None if value.is_nothing() => {}
            None => {
                company.fields.insert(
                    field.clone(),
                    FieldState {
                        value: value.clone(),
                        source: source.clone(),
                    },
                );
                out.changed.push(field.clone());
            }
            Some(state) => {
                if same_meaning(&state.value, value) {
                    continue;
                }
                if policy.incoming_wins(field, &state.source, &source) {
                    state.value = value.clone();
                    state.source = source.clone();
                    out.changed.push(field.clone());
                }
            }
        }
    }
    out
}

/// [`merge_into`] taking the incoming values by value, so they move into the company
/// instead of being cloned; a new (empty) company is built in one go.
pub fn merge_owned(
    company: &mut Company,
    incoming: Fields,
    connector: &str,
    vendor_ts: DateTime<Utc>,
    policy: &ConflictPolicy,
    derived: &[String],
) -> MergeOutcome {
    let source = Provenance {
        connector: connector.to_string(),
        vendor_ts,
    };
    let mut out = MergeOutcome::default();
    if company.fields.is_empty() {
        // Every non-null value is news (as in `merge_into`); the input is sorted, which
        // lets the map be built in bulk rather than by one insert per field.
        company.fields = incoming
            .into_iter()
            .filter(|(_, v)| !v.is_nothing())
            .map(|(field, value)| {
                out.changed.push(field.clone());
                let source = source.clone();
                (field, FieldState { value, source })
            })
            .collect();
        return out;
    }
    for (field, value) in incoming {
        match company.fields.get_mut(&field) {
            None if value.is_nothing() => {}
            None => {
                out.changed.push(field.clone());
                let source = source.clone();
                company.fields.insert(field, FieldState { value, source });
            }
            Some(state) => {
                if same_meaning(&state.value, &value) {
                    continue;
                }
                // A derived value only fills a gap; the company's own value stands.
                if !state.value.is_nothing() && derived.contains(&field) {
                    continue;
                }
                if policy.incoming_wins(&field, &state.source, &source) {
                    state.value = value;
                    state.source = source.clone();
                    out.changed.push(field);
                }
            }
        }
    }
    out
}

/// Equal by meaning (decimals compared normalised), without cloning either value.
pub(crate) fn same_meaning(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Decimal(x), Value::Decimal(y)) => x.normalize() == y.normalize(),
        _ => a == b,
    }
}

/// Which identifiers a first-seen record is matched on, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchKeyKind {
    /// The normalised domain (`domain`, else the domain of `website`).
    Domain,
    /// Marketo's `externalCompanyId`.
    ExternalCompanyId,
}

/// The match keys of a record's canonical values, as stored in the match-key table
/// (`domain:acme.com`, `ext:EXT-1`), in the configured order.
pub fn match_keys(fields: &Fields, kinds: &[MatchKeyKind]) -> Vec<String> {
    match_keys_of(|name| fields.get(name), kinds)
}

/// [`match_keys`] of the values `get` returns by field name (e.g. a company's current
/// values, without collecting them into [`Fields`]).
pub fn match_keys_of<'a>(
    get: impl Fn(&str) -> Option<&'a Value>,
    kinds: &[MatchKeyKind],
) -> Vec<String> {
    let text = |name: &str| match get(name) {
        Some(Value::Text(s)) if !s.trim().is_empty() => Some(s.as_str()),
        _ => None,
    };
    kinds
        .iter()
        .filter_map(|k| match k {
            MatchKeyKind::Domain => text("domain")
                .and_then(normalize_domain)
                .or_else(|| text("website").and_then(normalize_domain))
                .map(|d| format!("domain:{d}")),
            MatchKeyKind::ExternalCompanyId => {
                text("externalCompanyId").map(|e| format!("ext:{}", e.trim()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ts(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(s, 0).unwrap()
    }

    fn fields(pairs: &[(&str, Value)]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn newest_vendor_timestamp_wins_per_field() {
        let p = ConflictPolicy::default();
        let mut c = Company::new("c1".into());
        merge_into(
            &mut c,
            &fields(&[("name", Value::Text("Old".into()))]),
            "rally",
            ts(100),
            &p,
        );
        let out = merge_into(
            &mut c,
            &fields(&[("name", Value::Text("Stale".into()))]),
            "marketo",
            ts(50),
            &p,
        );
        assert!(out.is_unchanged(), "older value must not win: {c:?}");
        let out = merge_into(
            &mut c,
            &fields(&[("name", Value::Text("New".into()))]),
            "marketo",
            ts(200),
            &p,
        );
        assert_eq!(out.changed, vec!["name".to_string()]);
        assert_eq!(c.text("name"), Some("New"));
        assert_eq!(c.fields["name"].source.connector, "marketo");
    }

    #[test]
    fn equal_values_keep_their_provenance() {
        let p = ConflictPolicy::default();
        let mut c = Company::new("c1".into());
        let d = |s: &str| Value::Decimal(s.parse().unwrap());
        merge_into(
            &mut c,
            &fields(&[("annualRevenue", d("10.50"))]),
            "rally",
            ts(1),
            &p,
        );
        let out = merge_into(
            &mut c,
            &fields(&[("annualRevenue", d("10.5"))]),
            "amocrm",
            ts(9),
            &p,
        );
        assert!(out.is_unchanged());
        assert_eq!(c.fields["annualRevenue"].source.connector, "rally");
    }

    #[test]
    fn source_priority_overrides_timestamps() {
        let mut p = ConflictPolicy::default();
        p.priority
            .insert("industry".into(), vec!["rally".into(), "marketo".into()]);
        let mut c = Company::new("c1".into());
        merge_into(
            &mut c,
            &fields(&[("industry", Value::Text("Tech".into()))]),
            "rally",
            ts(1),
            &p,
        );
        let out = merge_into(
            &mut c,
            &fields(&[("industry", Value::Text("Retail".into()))]),
            "marketo",
            ts(999),
            &p,
        );
        assert!(out.is_unchanged(), "lower-priority source won: {c:?}");
        let out = merge_into(
            &mut c,
            &fields(&[("industry", Value::Null)]),
            "rally",
            ts(5),
            &p,
        );
        assert_eq!(out.changed, vec!["industry".to_string()]);
    }

    #[test]
    fn ties_between_connectors_do_not_flip() {
        let p = ConflictPolicy::default();
        let mut c = Company::new("c1".into());
        merge_into(
            &mut c,
            &fields(&[("city", Value::Text("A".into()))]),
            "rally",
            ts(5),
            &p,
        );
        let out = merge_into(
            &mut c,
            &fields(&[("city", Value::Text("B".into()))]),
            "amocrm",
            ts(5),
            &p,
        );
        assert!(out.is_unchanged());
    }

    #[test]
    fn merge_owned_does_what_merge_into_does() {
        let p = ConflictPolicy::default();
        let d = |s: &str| Value::Decimal(s.parse().unwrap());
        let first = fields(&[
            ("name", Value::Text("Acme".into())),
            ("notes", Value::Null),
            ("annualRevenue", d("10.50")),
        ]);
        let second = fields(&[
            ("name", Value::Text("Acme Ltd".into())),
            ("annualRevenue", d("10.5")),
            ("city", Value::Text("Berlin".into())),
            ("phone", Value::Null),
        ]);
        let (mut a, mut b) = (Company::new("c1".into()), Company::new("c1".into()));
        for (f, conn, t) in [(&first, "rally", 1), (&second, "amocrm", 2)] {
            let by_ref = merge_into(&mut a, f, conn, ts(t), &p);
            let by_value = merge_owned(&mut b, f.clone(), conn, ts(t), &p, &[]);
            assert_eq!(by_ref, by_value, "outcome after {conn}");
            assert_eq!(a, b, "company after {conn}");
        }
        assert_eq!(b.fields["annualRevenue"].source.connector, "rally");
        assert_eq!(b.text("name"), Some("Acme Ltd"));
    }

    #[test]
    fn match_keys_normalise_domain_and_fall_back_to_website() {
        let kinds = [MatchKeyKind::Domain, MatchKeyKind::ExternalCompanyId];
        let f = fields(&[
            ("website", Value::Text("https://www.Acme.com/".into())),
            ("externalCompanyId", Value::Text("EXT-1".into())),
        ]);
        assert_eq!(match_keys(&f, &kinds), vec!["domain:acme.com", "ext:EXT-1"]);
        let f = fields(&[("domain", Value::Text("  ".into()))]);
        assert!(match_keys(&f, &kinds).is_empty());
    }
    #[test]
    fn a_derived_value_fills_a_gap_but_never_overrides_a_held_one() {
        let marketo = crate::mapping::Mapping::compile(
            crate::model::CrmKind::Marketo,
            &crate::mapping::MappingRules::default(),
        )
        .unwrap();
        assert_eq!(marketo.derived_fields(), ["domain".to_string()]);
        let p = ConflictPolicy::default();
        let from_rally = fields(&[("domain", Value::Text("acme.com".into()))]);
        let from_marketo = fields(&[
            ("domain", Value::Text("acme-group.io".into())),
            ("website", Value::Text("https://acme-group.io".into())),
        ]);
        let mut c = Company::new("c1".into());
        merge_owned(&mut c, from_rally, "rally", ts(1), &p, &[]);
        // Newer, but only derived from Marketo's website: Rally's domain stands.
        let out = merge_owned(
            &mut c,
            from_marketo.clone(),
            "marketo",
            ts(2),
            &p,
            marketo.derived_fields(),
        );
        assert_eq!(out.changed, ["website"]);
        assert_eq!(c.text("domain"), Some("acme.com"));
        // A company without a domain takes the derived one.
        let mut bare = Company::new("c2".into());
        merge_owned(
            &mut bare,
            fields(&[("name", Value::Text("Acme".into()))]),
            "rally",
            ts(1),
            &p,
            &[],
        );
        merge_owned(
            &mut bare,
            from_marketo,
            "marketo",
            ts(2),
            &p,
            marketo.derived_fields(),
        );
        assert_eq!(bare.text("domain"), Some("acme-group.io"));
    }
}
