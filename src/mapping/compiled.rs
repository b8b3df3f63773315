//! The compiled mapping of one connector: its rules validated and resolved to flat vendor
//! keys, converting vendor records to canonical fields and back. Conversions are exact —
//! numbers never pass through a float — and never invent values: a vendor key absent from
//! a record leaves the canonical field absent, and JSON null is [`Value::Null`].

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rust_decimal::Decimal;

use serde_json::{Map, Value as Json};

use crate::model::{
    CrmKind, FieldPrinter, FieldPrints, FieldType, Fields, Value, decimal_to_json, field_type,
    normalize_domain, parse_decimal,
};

use super::defaults::{AMO_CF_CODE, AMO_CF_ID, AMO_CF_NAME, default_rules, split_enum_suffix};
use super::error::{MappingError, truncate_value};
use super::rules::{Direction, FieldRule, MappingRules, Transform};

/// One rule, validated and resolved.
#[derive(Debug, Clone)]
struct Rule {
    canonical: String,
    ty: FieldType,
    /// Key looked up by `read`, and written by `write` unless `enum_code` adds a suffix.
    key: String,
    /// amoCRM enum code `write` appends as `@<code>`.
    enum_code: Option<String>,
    direction: Direction,
    transforms: Vec<Transform>,
    /// Vendor value → canonical value.
    to_canonical: BTreeMap<String, String>,
    /// Canonical value → vendor value (the reverse of `to_canonical`).
    to_vendor: BTreeMap<String, String>,
    /// Canonical value read when the vendor value is null or missing.
    default: Option<Value>,
}

impl Rule {
    fn reads(&self) -> bool {
        self.direction != Direction::WriteOnly
    }

    fn writes(&self) -> bool {
        self.direction != Direction::ReadOnly
    }

    fn write_key(&self) -> String {
        match &self.enum_code {
            Some(code) => format!("{}@{code}", self.key),
            None => self.key.clone(),
        }
    }
}

/// A connector's mapping, compiled from the CRM's defaults and its `[mapping]` rules.
/// Cloning is cheap (the rules are shared).
#[derive(Debug, Clone)]
pub struct Mapping {
    kind: CrmKind,
    rules: Arc<[Rule]>,
    /// How each field reads back after a write, for [`Mapping::visible`].
    plan: Arc<RoundTripPlan>,
}

/// Which rules meet in a write-then-read round trip, worked out once per mapping so that
/// [`Mapping::visible`] can follow single fields instead of building vendor JSON.
#[derive(Debug)]
struct RoundTripPlan {
    /// Canonical field → index of the rule that reads it.
    reader_of: BTreeMap<String, usize>,
    /// Per rule: the index of the rule whose written key it reads (if it reads, and some
    /// rule writes that key).
    source: Vec<Option<usize>>,
    /// Per rule: reading back what it wrote itself returns the same value (no transforms,
    /// value maps or enum suffix in the way), for values of the rule's own type.
    identity: Vec<bool>,
    /// Per rule: reading what its source writes can fail for some values. Such a reader
    /// makes the whole round trip fail, so `visible` defers to the real one.
    may_fail: Vec<bool>,
    /// Canonical fields this CRM only derives from another field it holds (a read-only
    /// rule reading a key that a rule of another field writes, e.g. Marketo's domain from
    /// `website`): see [`Mapping::derived_fields`].
    derived: Vec<String>,
    /// Fingerprint of the read fields' sorted names (the keys of `reader_of`), the
    /// layout of this mapping's [`FieldPrints`].
    layout: u32,
}

impl RoundTripPlan {
    fn new(rules: &[Rule]) -> Self {
        let mut reader_of = BTreeMap::new();
        let mut source = Vec::with_capacity(rules.len());
        let mut identity = Vec::with_capacity(rules.len());
        let mut may_fail = Vec::with_capacity(rules.len());
        let mut derived = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let src = r
                .reads()
                .then(|| {
                    rules
                        .iter()
                        // The connector strips an `@ENUM` suffix before sending, so the
                        // suffixed key is read back under the bare one.
                        .position(|w| {
                            w.writes() && super::split_enum_suffix(&w.write_key()).0 == r.key
                        })
                })
                .flatten();
            if r.reads() {
                reader_of.insert(r.canonical.clone(), i);
            }
            identity.push(
                src == Some(i)
                    && r.transforms.is_empty()
                    && r.to_canonical.is_empty()
                    && r.enum_code.is_none(),
            );
            may_fail.push(match src {
                None => false,
                Some(w) => !matches!(
                    (r.ty, rules[w].ty),
                    (FieldType::Json, _)
                        | (
                            FieldType::Text,
                            FieldType::Text | FieldType::Int | FieldType::Decimal
                        )
                ),
            });
            if !r.writes() && src.is_some_and(|w| rules[w].canonical != r.canonical) {
                derived.push(r.canonical.clone());
            }
            source.push(src);
        }
        RoundTripPlan {
            layout: crate::model::layout_print(reader_of.keys().map(String::as_str)),
            reader_of,
            source,
            identity,
            may_fail,
            derived,
        }
    }
}

/// Whether `write_value` accepts `value` for a rule of type `ty`.
fn writable(ty: FieldType, value: &Value) -> bool {
    matches!(
        (ty, value),
        (_, Value::Null)
            | (FieldType::Text, Value::Text(_))
            | (FieldType::Int, Value::Int(_))
            | (FieldType::Decimal, Value::Decimal(_) | Value::Int(_))
            | (FieldType::Tags, Value::Tags(_))
            | (FieldType::Json, _)
    )
}

/// Whether a value of a rule of type `ty` reads back unchanged (decimals up to
/// normalisation) from what the same rule wrote; null-like values read back as null.
fn same_type(ty: FieldType, value: &Value) -> bool {
    matches!(
        (ty, value),
        (FieldType::Text, Value::Text(s)) if !s.trim().is_empty()
    ) || matches!(
        (ty, value),
        (FieldType::Int, Value::Int(_))
            | (FieldType::Decimal, Value::Decimal(_))
            | (FieldType::Tags, Value::Tags(_))
    ) || matches!((ty, value), (FieldType::Json, Value::Json(j)) if !j.is_null())
}

fn null_like(value: &Value) -> bool {
    matches!(value, Value::Null | Value::Json(Json::Null))
}

/// What a record held before a write, for [`Mapping::written_prints`].
#[derive(Debug, Clone, Copy)]
pub enum Before<'a> {
    /// Its prints as last read or written.
    Record(&'a FieldPrints),
    /// Not known.
    Unknown,
    /// Nothing: the write creates it.
    New,
}

/// A mapping fitted to an instance ([`Mapping::fit`]).
#[derive(Debug, Clone)]
pub struct Fitted {
    /// The rules the instance can serve.
    pub mapping: Mapping,
    /// Vendor keys of the full mapping the instance lacks.
    pub missing: Vec<String>,
    /// Canonical fields whose rule was dropped for that.
    pub dropped: Vec<String>,
    /// Of those, the fields synced through a stand-in rule instead.
    pub stand_ins: Vec<String>,
}

impl Mapping {
    /// Compiles the mapping of a connector of `kind`: the built-in rules (when
    /// `use_defaults`) minus the `ignore`d fields, with a rule in `rules.fields` replacing
    /// the default rule of its canonical field or adding a new one. Every problem found
    /// is reported, not just the first.
    pub fn compile(kind: CrmKind, rules: &MappingRules) -> Result<Mapping, Vec<MappingError>> {
        let mut errors = Vec::new();
        for name in &rules.ignore {
            if field_type(name).is_none() {
                errors.push(MappingError::UnknownCanonical {
                    canonical: name.clone(),
                });
            }
        }
        let overridden: BTreeSet<&str> =
            rules.fields.iter().map(|r| r.canonical.as_str()).collect();
        let defaults = if rules.use_defaults {
            default_rules(kind)
        } else {
            Vec::new()
        };
        let chosen = defaults
            .iter()
            .filter(|r| {
                !rules.ignore.contains(&r.canonical) && !overridden.contains(r.canonical.as_str())
            })
            .chain(&rules.fields);

        let mut compiled: Vec<Rule> = Vec::new();
        for rule in chosen {
            match compile_rule(kind, rule) {
                Ok(r) => compiled.push(r),
                Err(mut e) => errors.append(&mut e),
            }
        }
        check_overlaps(&compiled, &mut errors);
        if errors.is_empty() {
            Ok(Mapping {
                kind,
                plan: Arc::new(RoundTripPlan::new(&compiled)),
                rules: compiled.into(),
            })
        } else {
            Err(errors)
        }
    }

    /// The CRM this mapping is for.
    pub fn kind(&self) -> CrmKind {
        self.kind
    }

    /// Converts a flat vendor record (keys as documented in [`super::defaults`]) into
    /// canonical fields, through the rules that read (`both`, `read-only`).
    pub fn read(&self, vendor: &Map<String, Json>) -> Result<Fields, MappingError> {
        let mut out = Fields::new();
        for rule in self.rules.iter().filter(|r| r.reads()) {
            let value = match vendor.get(&rule.key) {
                Some(raw) => read_value(rule, raw)?,
                None => match &rule.default {
                    Some(d) => d.clone(),
                    None => continue,
                },
            };
            let value = match (&rule.default, value) {
                (Some(d), Value::Null) => d.clone(),
                (_, v) => v,
            };
            out.insert(rule.canonical.clone(), value);
        }
        Ok(out)
    }

    /// Converts canonical fields into a flat vendor record, through the rules that write
    /// (`both`, `write-only`). A field absent from `canonical` is left out of the record.
    pub fn write(&self, canonical: &Fields) -> Result<Map<String, Json>, MappingError> {
        let mut out = Map::new();
        for rule in self.rules.iter().filter(|r| r.writes()) {
            if let Some(value) = canonical.get(&rule.canonical) {
                out.insert(rule.write_key(), write_value(rule, value)?);
            }
        }
        Ok(out)
    }

    /// The non-null values of `read(write(canonical))` restricted to the fields of
    /// `canonical`, in name order — what the target can hold of them — computed field by
    /// field without building vendor JSON. `None` when the round trip as a whole would
    /// fail (a value of the wrong type, a reader that rejects what was written); the
    /// caller then knows it must not trust a round trip.
    pub fn visible<'a>(&'a self, canonical: &'a Fields) -> Option<Vec<(&'a str, Cow<'a, Value>)>> {
        let plan = &*self.plan;
        let rules = &*self.rules;
        // `write` fails as a whole if any written value has the wrong type.
        for r in rules.iter().filter(|r| r.writes()) {
            if let Some(v) = canonical.get(&r.canonical)
                && !writable(r.ty, v)
            {
                return None;
            }
        }
        let mut out = Vec::with_capacity(canonical.len());
        for name in canonical.keys() {
            let Some(&ri) = plan.reader_of.get(name) else {
                continue;
            };
            let reader = &rules[ri];
            let written =
                plan.source[ri].and_then(|wi| canonical.get(&rules[wi].canonical).map(|v| (wi, v)));
            let read: Cow<'a, Value> = match written {
                None => match &reader.default {
                    Some(d) => Cow::Borrowed(d),
                    None => continue,
                },
                Some((_, v)) if plan.identity[ri] && same_type(reader.ty, v) => Cow::Borrowed(v),
                Some((_, v)) if plan.identity[ri] && null_like(v) => match &reader.default {
                    Some(d) => Cow::Borrowed(d),
                    None => continue,
                },
                Some((wi, v)) => {
                    let json = write_value(&rules[wi], v).ok()?;
                    match (read_value(reader, &json).ok()?, &reader.default) {
                        (Value::Null, Some(d)) => Cow::Borrowed(d),
                        (v, _) => Cow::Owned(v),
                    }
                }
            };
            if !read.is_nothing() {
                out.push((name.as_str(), read));
            }
        }
        // `read` fails as a whole if any reader rejects what was written, even for a
        // field the caller does not keep.
        for (ri, reader) in rules.iter().enumerate() {
            if !plan.may_fail[ri] || canonical.contains_key(&reader.canonical) {
                continue;
            }
            let Some(wi) = plan.source[ri] else { continue };
            if let Some(v) = canonical.get(&rules[wi].canonical) {
                let json = write_value(&rules[wi], v).ok()?;
                read_value(reader, &json).ok()?;
            }
        }
        Some(out)
    }

    /// The canonical fields a read yields, sorted: the fields [`FieldPrints`] follow.
    pub fn print_fields(&self) -> impl Iterator<Item = &str> {
        self.plan.reader_of.keys().map(String::as_str)
    }

    /// The per-field prints of `fields` as read from a record.
    pub fn read_prints(&self, fields: &Fields) -> FieldPrints {
        let mut printer = FieldPrinter::default();
        FieldPrints {
            layout: self.plan.layout,
            values: self
                .print_fields()
                .map(|f| printer.print(f, fields.get(f)))
                .collect(),
        }
    }

    /// The per-field prints of a record after `canonical` was written to it: what each
    /// field reads back as ([`Mapping::visible`]). A field the write leaves alone (read
    /// only, or its writer's canonical field absent, so the key is not sent) keeps its
    /// print in `before`, the record's prints until then — nothing for a record the write
    /// creates, unknown when there are none. `None` when `canonical` cannot be written
    /// (the push fails anyway).
    pub fn written_prints(&self, canonical: &Fields, before: Before<'_>) -> Option<FieldPrints> {
        let round = self.visible(canonical)?;
        // Prints of another field list do not line up with these.
        let before = match before {
            Before::Record(b) if b.layout != self.plan.layout => Before::Unknown,
            other => other,
        };
        let mut printer = FieldPrinter::default();
        let values = self
            .plan
            .reader_of
            .iter()
            .enumerate()
            .map(|(i, (field, &ri))| {
                let sent = self.plan.source[ri]
                    .is_some_and(|wi| canonical.contains_key(&self.rules[wi].canonical));
                if sent && canonical.contains_key(field) {
                    let value = round
                        .iter()
                        .find(|(k, _)| k == field)
                        .map(|(_, v)| v.as_ref());
                    printer.print(field, value)
                } else if sent {
                    // Derived from another field the write sets (a stand-in: amoCRM's
                    // domain read off its website): what the record reads back as there.
                    // Unknown, it would make our own write read back as a change.
                    let reader = &self.rules[ri];
                    let derived = self.plan.source[ri].and_then(|wi| {
                        let v = canonical.get(&self.rules[wi].canonical)?;
                        let json = write_value(&self.rules[wi], v).ok()?;
                        match (read_value(reader, &json).ok()?, &reader.default) {
                            (Value::Null, Some(d)) => Some(d.clone()),
                            (v, _) => Some(v),
                        }
                    });
                    match derived {
                        Some(v) => printer.print(field, Some(&v)),
                        None => FieldPrints::UNKNOWN,
                    }
                } else {
                    match before {
                        // A new record holds nothing it was not given: it reads as the
                        // rule's default, if any.
                        Before::New => printer.print(field, self.rules[ri].default.as_ref()),
                        Before::Record(b) => {
                            b.values.get(i).copied().unwrap_or(FieldPrints::UNKNOWN)
                        }
                        Before::Unknown => FieldPrints::UNKNOWN,
                    }
                }
            })
            .collect();
        Some(FieldPrints {
            layout: self.plan.layout,
            values,
        })
    }

    /// Removes from `written` (what [`Mapping::write`] made of a company) each vendor key
    /// the record already holds as the write would leave it: every field read from the
    /// key has the same print in `before` (the record's prints until now) as in `after`
    /// ([`Mapping::written_prints`] of that write), and neither is unknown. Keys no field
    /// reads are kept (what the record holds there is unknown). Nothing is removed when
    /// the prints' layouts differ. (No two rules write one vendor field: `compile`
    /// refuses it, so leaving a key out never changes what another key sends.)
    pub fn drop_held_keys(
        &self,
        written: &mut Map<String, Json>,
        before: &FieldPrints,
        after: &FieldPrints,
    ) {
        let plan = &*self.plan;
        if before.layout != plan.layout || after.layout != plan.layout {
            return;
        }
        // Per rule: some field reads what it writes / one of those fields differs.
        let mut read = vec![false; self.rules.len()];
        let mut differs = vec![false; self.rules.len()];
        for (i, &ri) in plan.reader_of.values().enumerate() {
            let Some(w) = plan.source[ri] else { continue };
            read[w] = true;
            let (b, a) = (before.values.get(i), after.values.get(i));
            if b != a || a.is_none_or(|&a| a == FieldPrints::UNKNOWN) {
                differs[w] = true;
            }
        }
        for (w, rule) in self.rules.iter().enumerate() {
            if rule.writes() && read[w] && !differs[w] {
                written.remove(&rule.write_key());
            }
        }
    }

    /// Canonical fields this CRM does not hold but derives from another field it holds
    /// (Marketo's domain from `website`). Such a value is a guess: it fills a field the
    /// company lacks, but never overrides a value a CRM holding the field gave.
    pub fn derived_fields(&self) -> &[String] {
        &self.plan.derived
    }

    /// Canonical fields this mapping reads, sorted.
    pub fn read_fields(&self) -> Vec<String> {
        self.canonical_fields(Rule::reads)
    }

    /// The layout of this mapping's [`FieldPrints`]: prints of another layout do not line
    /// up with [`Mapping::print_fields`].
    pub fn print_layout(&self) -> u32 {
        self.plan.layout
    }

    /// Canonical fields this mapping writes, sorted.
    pub fn write_fields(&self) -> Vec<String> {
        self.canonical_fields(Rule::writes)
    }

    fn canonical_fields(&self, keep: fn(&Rule) -> bool) -> Vec<String> {
        let set: BTreeSet<&str> = self
            .rules
            .iter()
            .filter(|r| keep(r))
            .map(|r| r.canonical.as_str())
            .collect();
        set.into_iter().map(String::from).collect()
    }

    /// The canonical fields [`write`](Self::write) puts under the flat vendor key `key`.
    pub fn written_from(&self, key: &str) -> Vec<&str> {
        self.rules
            .iter()
            .filter(|r| r.writes() && r.write_key() == key)
            .map(|r| r.canonical.as_str())
            .collect()
    }

    /// Every vendor key used either way, without enum suffixes, sorted: the fields to
    /// request from the vendor and to check exist (`check --online`).
    pub fn vendor_keys(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self.rules.iter().map(|r| r.key.as_str()).collect();
        set.into_iter().map(String::from).collect()
    }

    /// The mapping of `rules` fitted to one instance: rules whose vendor key the instance
    /// lacks (`unavailable` names them, given every vendor key) are dropped, and a dropped
    /// built-in rule is replaced by its stand-in from
    /// [`fallback_rules`](super::defaults::fallback_rules) when the instance has that
    /// one's field and the config does not say otherwise for the canonical field.
    pub fn fit(
        kind: CrmKind,
        rules: &MappingRules,
        unavailable: impl Fn(&[String]) -> Vec<String>,
    ) -> Result<Fitted, Vec<MappingError>> {
        let full = Mapping::compile(kind, rules)?;
        let missing = unavailable(&full.vendor_keys());
        let (mapping, dropped) = full.without_vendor_keys(&missing);
        let stand_ins: Vec<FieldRule> = if rules.use_defaults {
            super::defaults::fallback_rules(kind)
                .into_iter()
                .filter(|f| {
                    dropped.contains(&f.canonical)
                        && !rules.ignore.contains(&f.canonical)
                        && !rules.fields.iter().any(|r| r.canonical == f.canonical)
                })
                .collect()
        } else {
            Vec::new()
        };
        if stand_ins.is_empty() {
            return Ok(Fitted {
                mapping,
                missing,
                dropped,
                stand_ins: Vec::new(),
            });
        }
        let mut with = rules.clone();
        with.fields.extend(stand_ins.iter().cloned());
        let full = Mapping::compile(kind, &with)?;
        let missing_now = unavailable(&full.vendor_keys());
        let (mapping, dropped_now) = full.without_vendor_keys(&missing_now);
        let stand_ins = stand_ins
            .into_iter()
            .filter(|f| !dropped_now.contains(&f.canonical))
            .map(|f| f.canonical)
            .collect();
        Ok(Fitted {
            mapping,
            missing,
            dropped,
            stand_ins,
        })
    }

    /// This mapping without the rules whose vendor key is in `missing` (keys as
    /// [`vendor_keys`](Self::vendor_keys) gives them; an `@ENUM` suffix is ignored), and
    /// the canonical fields whose rules were dropped — for a connector to log at start
    /// when the account lacks some custom fields.
    pub fn without_vendor_keys(&self, missing: &[String]) -> (Mapping, Vec<String>) {
        let missing: BTreeSet<&str> = missing.iter().map(|k| split_enum_suffix(k).0).collect();
        let (dropped, kept): (Vec<&Rule>, Vec<&Rule>) = self
            .rules
            .iter()
            .partition(|r| missing.contains(r.key.as_str()));
        let dropped: BTreeSet<String> = dropped.iter().map(|r| r.canonical.clone()).collect();
        let rules: Vec<Rule> = kept.into_iter().cloned().collect();
        (
            Mapping {
                kind: self.kind,
                plan: Arc::new(RoundTripPlan::new(&rules)),
                rules: rules.into(),
            },
            dropped.into_iter().collect(),
        )
    }
}

/// Validates one rule and resolves its vendor key.
fn compile_rule(kind: CrmKind, rule: &FieldRule) -> Result<Rule, Vec<MappingError>> {
    let canonical = rule.canonical.clone();
    let Some(ty) = field_type(&canonical) else {
        return Err(vec![MappingError::UnknownCanonical { canonical }]);
    };
    let mut errors = Vec::new();
    if kind != CrmKind::Amocrm {
        for (set, option) in [
            (rule.field_code.is_some(), "field_code"),
            (rule.field_id.is_some(), "field_id"),
            (rule.field_name.is_some(), "field_name"),
            (rule.enum_code.is_some(), "enum_code"),
        ] {
            if set {
                errors.push(MappingError::OptionNotForKind {
                    canonical: canonical.clone(),
                    option,
                    kind,
                });
            }
        }
    }
    let targets: Vec<String> = [
        rule.vendor.clone(),
        rule.field_code
            .as_ref()
            .map(|c| format!("{AMO_CF_CODE}{c}")),
        rule.field_id.map(|id| format!("{AMO_CF_ID}{id}")),
        rule.field_name
            .as_ref()
            .map(|n| format!("{AMO_CF_NAME}{n}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    let (key, enum_code) = match targets.as_slice() {
        [] => {
            errors.push(MappingError::NoVendorField {
                canonical: canonical.clone(),
            });
            (String::new(), None)
        }
        [one] => {
            // A key written as `cf.code.PHONE@WORK` carries its enum code inline.
            let (base, inline) = split_enum_suffix(one);
            let code = rule.enum_code.clone().or(inline.map(String::from));
            (base.to_string(), code)
        }
        _ => {
            errors.push(MappingError::AmbiguousVendorField {
                canonical: canonical.clone(),
            });
            (String::new(), None)
        }
    };
    if let Some(code) = &enum_code
        && !key.is_empty()
    {
        let reason = if !key.starts_with("cf.") {
            Some("only amoCRM custom fields (cf.*) take an enum code")
        } else if split_enum_suffix(&format!("{key}@{code}")).1 != Some(code.as_str()) {
            Some("enum codes are upper-case letters, digits and _")
        } else {
            None
        };
        if let Some(reason) = reason {
            errors.push(MappingError::BadEnumCode {
                canonical: canonical.clone(),
                vendor: key.clone(),
                enum_code: code.clone(),
                reason,
            });
        }
    }
    if key.is_empty() && targets.len() == 1 {
        errors.push(MappingError::NoVendorField {
            canonical: canonical.clone(),
        });
    }

    for t in &rule.transforms {
        let fits = match ty {
            FieldType::Text | FieldType::Json => true,
            FieldType::Tags => *t != Transform::DomainFromUrl,
            FieldType::Int | FieldType::Decimal => false,
        };
        if !fits {
            errors.push(MappingError::NotForType {
                canonical: canonical.clone(),
                what: format!("transform {t:?}"),
                ty,
            });
        }
    }
    if !rule.values.is_empty() && matches!(ty, FieldType::Int | FieldType::Decimal) {
        errors.push(MappingError::NotForType {
            canonical: canonical.clone(),
            what: "a value map".into(),
            ty,
        });
    }
    let default = match &rule.default {
        Some(d) => match default_value(&canonical, ty, d) {
            Ok(v) => Some(v),
            Err(e) => {
                errors.push(e);
                None
            }
        },
        None => None,
    };
    if !errors.is_empty() {
        return Err(errors);
    }

    let to_canonical = rule.values.clone();
    // Several vendor values may map to one canonical value; write the first of them (in
    // key order) so the choice is stable.
    let mut to_vendor = BTreeMap::new();
    for (vendor_value, canonical_value) in &to_canonical {
        to_vendor
            .entry(canonical_value.clone())
            .or_insert_with(|| vendor_value.clone());
    }
    Ok(Rule {
        canonical,
        ty,
        key,
        enum_code,
        direction: rule.direction,
        transforms: rule.transforms.clone(),
        to_canonical,
        to_vendor,
        default,
    })
}

/// Finds rules that would both read, or both write, one canonical field, and vendor keys
/// written by two rules.
fn check_overlaps(rules: &[Rule], errors: &mut Vec<MappingError>) {
    let mut readers: BTreeSet<&str> = BTreeSet::new();
    let mut writers: BTreeSet<&str> = BTreeSet::new();
    let mut reported: BTreeSet<&str> = BTreeSet::new();
    let mut written_keys: BTreeMap<&str, &str> = BTreeMap::new();
    for r in rules {
        let c = r.canonical.as_str();
        let dup_read = r.reads() && !readers.insert(c);
        let dup_write = r.writes() && !writers.insert(c);
        if (dup_read || dup_write) && reported.insert(c) {
            errors.push(MappingError::DuplicateRule {
                canonical: c.to_string(),
            });
        }
        if r.writes()
            && let Some(first) = written_keys.insert(&r.key, c)
            && first != c
        {
            errors.push(MappingError::VendorKeyConflict {
                vendor: r.key.clone(),
                first: first.to_string(),
                second: c.to_string(),
            });
        }
    }
}

/// The canonical value of a rule's TOML `default`.
fn default_value(canonical: &str, ty: FieldType, d: &toml::Value) -> Result<Value, MappingError> {
    let bad = |expected| MappingError::BadDefault {
        canonical: canonical.to_string(),
        expected,
        value: truncate_value(d),
    };
    match (ty, d) {
        (FieldType::Text, toml::Value::String(s)) => Ok(Value::Text(s.clone())),
        (FieldType::Text, _) => Err(bad("text")),
        (FieldType::Int, toml::Value::Integer(i)) => Ok(Value::Int(*i)),
        (FieldType::Int, _) => Err(bad("a whole number")),
        (FieldType::Decimal, toml::Value::Integer(i)) => Ok(Value::Decimal((*i).into())),
        // A TOML float's text is what the user wrote (shortest round-trip form); a string
        // keeps any precision.
        (FieldType::Decimal, toml::Value::Float(f)) => parse_decimal(&f.to_string())
            .map(Value::Decimal)
            .ok_or_else(|| bad("an exact decimal")),
        (FieldType::Decimal, toml::Value::String(s)) => parse_decimal(s)
            .map(Value::Decimal)
            .ok_or_else(|| bad("an exact decimal")),
        (FieldType::Decimal, _) => Err(bad("an exact decimal")),
        (FieldType::Tags, toml::Value::String(s)) => Ok(Value::Tags(split_tags(s))),
        (FieldType::Tags, toml::Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(String::from))
            .collect::<Option<BTreeSet<_>>>()
            .map(Value::Tags)
            .ok_or_else(|| bad("an array of strings")),
        (FieldType::Tags, _) => Err(bad("an array of strings")),
        (FieldType::Json, v) => serde_json::to_value(v)
            .map(Value::Json)
            .map_err(|_| bad("JSON")),
    }
}

/// A comma-separated tag list as a set, blanks dropped.
fn split_tags(s: &str) -> BTreeSet<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}

/// Converts one vendor JSON value by the rule's canonical type, then applies transforms
/// and the value map.
fn read_value(rule: &Rule, raw: &Json) -> Result<Value, MappingError> {
    let wrong = |expected| MappingError::WrongType {
        canonical: rule.canonical.clone(),
        vendor: rule.key.clone(),
        expected,
        value: truncate_value(raw),
    };
    let bad_number = |expected| MappingError::BadNumber {
        canonical: rule.canonical.clone(),
        vendor: rule.key.clone(),
        expected,
        value: truncate_value(raw),
    };
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let value = match rule.ty {
        FieldType::Text => match raw {
            // Vendors differ in how an empty field reads ("", null, absent) and in what
            // they keep of a written "": all of it means no value.
            Json::String(s) if s.trim().is_empty() => Value::Null,
            Json::String(s) => Value::Text(s.clone()),
            Json::Number(n) => Value::Text(n.to_string()),
            Json::Bool(b) => Value::Text(b.to_string()),
            _ => return Err(wrong("text")),
        },
        FieldType::Int => {
            let text = match raw {
                Json::Number(n) => n.to_string(),
                // Vendors send "" for an unset number field; it means no value.
                Json::String(s) if s.trim().is_empty() => return Ok(Value::Null),
                Json::String(s) => s.trim().to_string(),
                _ => return Err(wrong("a whole number")),
            };
            Value::Int(parse_int(&text).ok_or_else(|| bad_number("a whole number"))?)
        }
        FieldType::Decimal => {
            let text = match raw {
                Json::Number(n) => n.to_string(),
                Json::String(s) if s.trim().is_empty() => return Ok(Value::Null),
                Json::String(s) => s.clone(),
                _ => return Err(wrong("an exact decimal")),
            };
            Value::Decimal(
                parse_exact_decimal(&text).ok_or_else(|| bad_number("an exact decimal"))?,
            )
        }
        FieldType::Tags => match raw {
            Json::String(s) => Value::Tags(split_tags(s)),
            Json::Array(items) => {
                let mut tags = BTreeSet::new();
                for item in items {
                    let tag = match item {
                        Json::String(s) => s.clone(),
                        Json::Number(n) => n.to_string(),
                        Json::Object(o) => match o.get("name") {
                            Some(Json::String(s)) => s.clone(),
                            _ => return Err(wrong("an array of tag names")),
                        },
                        _ => return Err(wrong("an array of tag names")),
                    };
                    tags.insert(tag);
                }
                Value::Tags(tags)
            }
            _ => return Err(wrong("an array of tag names")),
        },
        FieldType::Json => Value::Json(raw.clone()),
    };
    Ok(apply_read_rules(rule, value))
}

/// A whole number from its JSON text; `12`, `-3`, `1e3` and `12.0` are whole, `1.5` is not.
fn parse_int(text: &str) -> Option<i64> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(i);
    }
    let d = parse_decimal(text)?;
    if d.fract().is_zero() {
        i64::try_from(d).ok()
    } else {
        None
    }
}

/// A decimal from its JSON text, refusing text it would round: `rust_decimal` keeps at
/// most 28 fractional digits and silently rounds beyond them.
fn parse_exact_decimal(text: &str) -> Option<Decimal> {
    let d = parse_decimal(text)?;
    let plain = !text.contains(['e', 'E']);
    // Exponent forms either fit exactly or fail to parse; plain forms may round.
    (!plain || plain_decimal_digits(text) == plain_decimal_digits(&d.to_string())).then_some(d)
}

/// Plain decimal text reduced to a unique form: no `+`, no leading zeros of the integer
/// part, no trailing zeros of the fraction, zero without sign.
fn plain_decimal_digits(text: &str) -> String {
    let t = text.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    let (neg, t) = t.strip_prefix('-').map_or((false, t), |rest| (true, rest));
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    if int.is_empty() && frac.is_empty() {
        return "0".into();
    }
    let sign = if neg { "-" } else { "" };
    let int = if int.is_empty() { "0" } else { int };
    if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

/// Transforms, then the value map (whose keys therefore match transformed text).
fn apply_read_rules(rule: &Rule, value: Value) -> Value {
    let map_text = |s: String| -> Option<String> {
        let mut s = s;
        for t in &rule.transforms {
            s = match t {
                Transform::Trim => s.trim().to_string(),
                Transform::Lowercase => s.to_lowercase(),
                Transform::Uppercase => s.to_uppercase(),
                Transform::DomainFromUrl => normalize_domain(&s)?,
            };
        }
        Some(rule.to_canonical.get(&s).cloned().unwrap_or(s))
    };
    match value {
        // Text that holds no domain is no value.
        Value::Text(s) => map_text(s).map_or(Value::Null, Value::Text),
        Value::Json(Json::String(s)) => {
            map_text(s).map_or(Value::Null, |s| Value::Json(Json::String(s)))
        }
        Value::Tags(tags) => Value::Tags(tags.into_iter().filter_map(map_text).collect()),
        other => other,
    }
}

/// Converts one canonical value into vendor JSON by the rule's type, reverse-mapping
/// values.
fn write_value(rule: &Rule, value: &Value) -> Result<Json, MappingError> {
    let to_vendor = |s: &str| {
        rule.to_vendor
            .get(s)
            .cloned()
            .unwrap_or_else(|| s.to_string())
    };
    let wrong = |expected| MappingError::WrongType {
        canonical: rule.canonical.clone(),
        vendor: rule.write_key(),
        expected,
        value: truncate_value(value),
    };
    Ok(match (rule.ty, value) {
        (_, Value::Null) => Json::Null,
        (FieldType::Text, Value::Text(s)) => Json::String(to_vendor(s)),
        (FieldType::Text, _) => return Err(wrong("text")),
        (FieldType::Int, Value::Int(i)) => Json::from(*i),
        (FieldType::Int, _) => return Err(wrong("a whole number")),
        (FieldType::Decimal, Value::Decimal(d)) => decimal_to_json(d),
        (FieldType::Decimal, Value::Int(i)) => Json::from(*i),
        (FieldType::Decimal, _) => return Err(wrong("an exact decimal")),
        (FieldType::Tags, Value::Tags(tags)) => {
            let vendor: BTreeSet<String> = tags.iter().map(|t| to_vendor(t)).collect();
            Json::Array(vendor.into_iter().map(Json::String).collect())
        }
        (FieldType::Tags, _) => return Err(wrong("a tag set")),
        (FieldType::Json, Value::Json(Json::String(s))) => Json::String(to_vendor(s)),
        (FieldType::Json, Value::Json(j)) => j.clone(),
        // Custom fields are JSON; a typed value stored there still has an exact JSON form.
        (FieldType::Json, Value::Text(s)) => Json::String(to_vendor(s)),
        (FieldType::Json, Value::Int(i)) => Json::from(*i),
        (FieldType::Json, Value::Decimal(d)) => decimal_to_json(d),
        (FieldType::Json, Value::Tags(tags)) => {
            Json::Array(tags.iter().map(|t| Json::String(to_vendor(t))).collect())
        }
    })
}
