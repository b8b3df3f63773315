//! Compact binary encodings of the store's hot values (companies, record rows with link
//! and ledger entry, outbox entries and each company's pending entries): varints, length-prefixed strings and timestamps as seconds + nanoseconds.
//! JSON spent most of an ingest's time and most of the file on field names, RFC 3339
//! timestamps and repeated connector names. Every value starts with a format byte so the
//! encoding can change without a guess.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::model::{
    CanonicalId, Company, FieldPrints, FieldState, Provenance, STANDARD_FIELDS, Value,
};

use super::types::{LedgerEntry, OutboxEntry};

/// Format byte of every value this module writes.
const FORMAT: u8 = 1;
/// Field-name byte meaning "a name follows as a string" (a custom field).
const CUSTOM_NAME: u8 = 0xff;

/// Why bytes could not be decoded.
pub(crate) type DecodeError = &'static str;

/// Appends values to a byte buffer.
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    fn with_capacity(n: usize) -> Self {
        Writer(Vec::with_capacity(n))
    }

    fn u8(&mut self, b: u8) {
        self.0.push(b);
    }

    fn varint(&mut self, mut v: u128) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn int(&mut self, v: i64) {
        // Zigzag: small magnitudes of either sign stay short.
        self.varint(((v << 1) ^ (v >> 63)) as u64 as u128);
    }

    fn str(&mut self, s: &str) {
        self.varint(s.len() as u128);
        self.0.extend_from_slice(s.as_bytes());
    }

    fn time(&mut self, t: &DateTime<Utc>) {
        self.int(t.timestamp());
        self.varint(t.timestamp_subsec_nanos() as u128);
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.u8(0),
            Value::Text(s) => {
                self.u8(1);
                self.str(s);
            }
            Value::Int(i) => {
                self.u8(2);
                self.int(*i);
            }
            Value::Decimal(d) => {
                // Sign and scale in one byte (scale ≤ 28), then the 96-bit magnitude.
                self.u8(3);
                self.u8(d.scale() as u8 | if d.is_sign_negative() { 0x80 } else { 0 });
                self.varint(d.mantissa().unsigned_abs());
            }
            Value::Tags(tags) => {
                self.u8(4);
                self.varint(tags.len() as u128);
                for t in tags {
                    self.str(t);
                }
            }
            Value::Json(j) => {
                self.u8(5);
                // serde_json writes any `Value` (its map keys are strings).
                self.str(&serde_json::to_string(j).unwrap_or_else(|_| "null".into()));
            }
        }
    }
}

/// Reads values back from a byte slice.
pub(crate) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.0.split_first().ok_or("value ends early")?;
        self.0 = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u128, DecodeError> {
        let mut v: u128 = 0;
        for shift in (0..128).step_by(7) {
            let b = self.u8()?;
            v |= u128::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long")
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        u64::try_from(self.varint()?).map_err(|_| "number out of range")
    }

    fn len(&mut self) -> Result<usize, DecodeError> {
        let n = usize::try_from(self.varint()?).map_err(|_| "length out of range")?;
        // A length beyond the remaining bytes is corruption, not a reason to allocate.
        if n > self.0.len() {
            return Err("length beyond the value");
        }
        Ok(n)
    }

    fn int(&mut self) -> Result<i64, DecodeError> {
        let z = self.u64()?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.0.len() {
            return Err("value ends early");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.len()?;
        std::str::from_utf8(self.bytes(n)?).map_err(|_| "text is not UTF-8")
    }

    fn time(&mut self) -> Result<DateTime<Utc>, DecodeError> {
        let secs = self.int()?;
        let nanos = u32::try_from(self.varint()?).map_err(|_| "bad nanoseconds")?;
        DateTime::from_timestamp(secs, nanos).ok_or("timestamp out of range")
    }

    fn value(&mut self) -> Result<Value, DecodeError> {
        Ok(match self.u8()? {
            0 => Value::Null,
            1 => Value::Text(self.str()?.to_owned()),
            2 => Value::Int(self.int()?),
            3 => {
                let flags = self.u8()?;
                let magnitude = i128::try_from(self.varint()?).map_err(|_| "bad decimal")?;
                let m = if flags & 0x80 != 0 {
                    -magnitude
                } else {
                    magnitude
                };
                let mut d = Decimal::try_from_i128_with_scale(m, u32::from(flags & 0x7f))
                    .map_err(|_| "bad decimal")?;
                // A negative zero has no negative mantissa to carry its sign.
                d.set_sign_negative(flags & 0x80 != 0);
                Value::Decimal(d)
            }
            4 => {
                let n = self.len()?;
                let mut tags = BTreeSet::new();
                for _ in 0..n {
                    tags.insert(self.str()?.to_owned());
                }
                Value::Tags(tags)
            }
            5 => Value::Json(serde_json::from_str(self.str()?).map_err(|_| "bad JSON value")?),
            _ => return Err("unknown value type"),
        })
    }

    fn format(&mut self) -> Result<(), DecodeError> {
        match self.u8()? {
            FORMAT => Ok(()),
            _ => Err("unknown format"),
        }
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err("trailing bytes")
        }
    }
}

/// A company without its id (the id is the table key). Connector names are written once
/// per company and referred to by index; standard field names by their index in
/// [`STANDARD_FIELDS`].
pub(crate) fn encode_company(c: &Company) -> Vec<u8> {
    let mut w = Writer::with_capacity(64 + c.fields.len() * 32);
    w.u8(FORMAT);
    let mut connectors: Vec<&str> = Vec::with_capacity(2);
    for s in c.fields.values() {
        if !connectors.contains(&s.source.connector.as_str()) {
            connectors.push(&s.source.connector);
        }
    }
    w.varint(connectors.len() as u128);
    for name in &connectors {
        w.str(name);
    }
    w.varint(c.fields.len() as u128);
    for (name, state) in &c.fields {
        match STANDARD_FIELDS.iter().position(|(n, _)| *n == name) {
            Some(i) => w.u8(i as u8),
            None => {
                w.u8(CUSTOM_NAME);
                w.str(name);
            }
        }
        let conn = connectors
            .iter()
            .position(|n| *n == state.source.connector)
            .expect("every connector was collected above");
        w.varint(conn as u128);
        w.time(&state.source.vendor_ts);
        w.value(&state.value);
    }
    w.0
}

/// The company stored under `id`.
pub(crate) fn decode_company(id: &str, bytes: &[u8]) -> Result<Company, DecodeError> {
    let mut r = Reader(bytes);
    r.format()?;
    let n = r.len()?;
    let mut connectors = Vec::with_capacity(n);
    for _ in 0..n {
        connectors.push(r.str()?);
    }
    let n = r.len()?;
    let mut fields = BTreeMap::new();
    for _ in 0..n {
        let name = match r.u8()? {
            CUSTOM_NAME => r.str()?.to_owned(),
            i => STANDARD_FIELDS
                .get(usize::from(i))
                .ok_or("unknown field index")?
                .0
                .to_owned(),
        };
        let conn = usize::try_from(r.varint()?).map_err(|_| "bad connector index")?;
        let connector = (*connectors.get(conn).ok_or("bad connector index")?).to_owned();
        let vendor_ts = r.time()?;
        let value = r.value()?;
        fields.insert(
            name,
            FieldState {
                value,
                source: Provenance {
                    connector,
                    vendor_ts,
                },
            },
        );
    }
    r.end()?;
    Ok(Company {
        id: CanonicalId::from(id),
        fields,
    })
}

/// Ledger hash kinds: 32 raw bytes of a lowercase hex SHA-256, or the text as given.
const HASH_RAW: u8 = 0;
const HASH_TEXT: u8 = 1;

/// The 32 bytes `hash` spells when it is 64 lowercase hex digits — the only form that
/// encodes back to the same text, hence the only one stored as bytes.
fn lower_hex_32(hash: &str) -> Option<[u8; 32]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let text: &[u8; 64] = hash.as_bytes().try_into().ok()?;
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *o = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

pub(crate) fn encode_ledger(e: &LedgerEntry) -> Vec<u8> {
    let mut w = Writer::with_capacity(48);
    w.u8(FORMAT);
    w.ledger(e);
    w.0
}

pub(crate) fn decode_ledger(bytes: &[u8]) -> Result<LedgerEntry, DecodeError> {
    let mut r = Reader(bytes);
    r.format()?;
    let e = r.ledger()?;
    r.end()?;
    Ok(e)
}

impl Writer {
    fn ledger(&mut self, e: &LedgerEntry) {
        match lower_hex_32(&e.hash) {
            Some(bytes) => {
                self.u8(HASH_RAW);
                self.0.extend_from_slice(&bytes);
            }
            None => {
                self.u8(HASH_TEXT);
                self.str(&e.hash);
            }
        }
        self.time(&e.at);
    }
}

impl Reader<'_> {
    fn ledger(&mut self) -> Result<LedgerEntry, DecodeError> {
        let hash = match self.u8()? {
            HASH_RAW => hex::encode(self.bytes(32)?),
            HASH_TEXT => self.str()?.to_owned(),
            _ => return Err("unknown hash kind"),
        };
        let at = self.time()?;
        Ok(LedgerEntry {
            hash,
            at,
            prints: None,
        })
    }

    fn prints(&mut self) -> Result<FieldPrints, DecodeError> {
        let layout = self.u32()?;
        let n = usize::try_from(self.varint()?).map_err(|_| "length out of range")?;
        // At least one mask bit per field: a count beyond that is corruption.
        if n.div_ceil(8) > self.0.len() {
            return Err("length beyond the value");
        }
        let mask = self.bytes(n.div_ceil(8))?;
        let mut values = Vec::with_capacity(n.min(256));
        for i in 0..n {
            values.push(if mask[i / 8] & (1 << (i % 8)) != 0 {
                FieldPrints::NOTHING
            } else {
                self.u32()?
            });
        }
        Ok(FieldPrints { layout, values })
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl Writer {
    /// Field prints: the layout, the count, a bit per field holding nothing (most records
    /// leave many fields empty), then the other prints, 4 bytes each.
    fn prints(&mut self, p: &FieldPrints) {
        self.0.extend_from_slice(&p.layout.to_le_bytes());
        self.varint(p.values.len() as u128);
        let mut mask = vec![0u8; p.values.len().div_ceil(8)];
        for (i, v) in p.values.iter().enumerate() {
            if *v == FieldPrints::NOTHING {
                mask[i / 8] |= 1 << (i % 8);
            }
        }
        self.0.extend_from_slice(&mask);
        for v in p.values.iter().filter(|v| **v != FieldPrints::NOTHING) {
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// What the store keeps of one vendor record (schema 3): the company it is linked to
/// and the echo-ledger entry, in one row because both are looked up by the same key at
/// the same moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RecordRow {
    /// The linked company; `None` after its link was removed (the ledger entry stays).
    pub canonical_id: Option<CanonicalId>,
    /// The content hash last pushed to / read from the record.
    pub ledger: Option<LedgerEntry>,
}

const LINKED: u8 = 1;
const HAS_LEDGER: u8 = 2;
/// The ledger entry carries field prints (rows written before them lack this flag).
const HAS_PRINTS: u8 = 4;

pub(crate) fn encode_record(canonical_id: Option<&str>, ledger: Option<&LedgerEntry>) -> Vec<u8> {
    let mut w = Writer::with_capacity(96);
    w.u8(FORMAT);
    let prints = ledger.and_then(|e| e.prints.as_ref());
    let flags = if canonical_id.is_some() { LINKED } else { 0 }
        | if ledger.is_some() { HAS_LEDGER } else { 0 }
        | if prints.is_some() { HAS_PRINTS } else { 0 };
    w.u8(flags);
    if let Some(id) = canonical_id {
        w.str(id);
    }
    if let Some(e) = ledger {
        w.ledger(e);
    }
    if let Some(p) = prints {
        w.prints(p);
    }
    w.0
}

pub(crate) fn decode_record(bytes: &[u8]) -> Result<RecordRow, DecodeError> {
    let mut r = Reader(bytes);
    r.format()?;
    let flags = r.u8()?;
    if flags & !(LINKED | HAS_LEDGER | HAS_PRINTS) != 0
        || flags & (HAS_LEDGER | HAS_PRINTS) == HAS_PRINTS
    {
        return Err("unknown record flags");
    }
    let canonical_id = if flags & LINKED != 0 {
        Some(r.str()?.to_owned())
    } else {
        None
    };
    let mut ledger = if flags & HAS_LEDGER != 0 {
        Some(r.ledger()?)
    } else {
        None
    };
    if flags & HAS_PRINTS != 0
        && let Some(e) = ledger.as_mut()
    {
        e.prints = Some(r.prints()?);
    }
    r.end()?;
    Ok(RecordRow {
        canonical_id,
        ledger,
    })
}

/// The canonical id a record row links to, without decoding its ledger entry.
pub(crate) fn record_link(bytes: &[u8]) -> Result<Option<&str>, DecodeError> {
    let mut r = Reader(bytes);
    r.format()?;
    if r.u8()? & LINKED == 0 {
        return Ok(None);
    }
    r.str().map(Some)
}

/// A company's pending outbox entries (schema 3): `(target, seq)` pairs, at most one per
/// target, in one row per company instead of one per target.
pub(crate) fn encode_pending(pending: &[(&str, u64)]) -> Vec<u8> {
    let mut w = Writer::with_capacity(4 + pending.len() * 16);
    w.u8(FORMAT);
    w.varint(pending.len() as u128);
    for (target, seq) in pending {
        w.str(target);
        w.varint(u128::from(*seq));
    }
    w.0
}

pub(crate) fn decode_pending(bytes: &[u8]) -> Result<Vec<(&str, u64)>, DecodeError> {
    let mut r = Reader(bytes);
    r.format()?;
    let n = r.len()?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let target = r.str()?;
        out.push((target, r.u64()?));
    }
    r.end()?;
    Ok(out)
}

const SENDING: u8 = 1;
const CHANGED_WHILE_SENDING: u8 = 2;
const HAS_ERROR: u8 = 4;
const UNCONFIRMED: u8 = 8;

pub(crate) fn encode_outbox(e: &OutboxEntry) -> Vec<u8> {
    let mut w = Writer::with_capacity(64);
    w.u8(FORMAT);
    let mut flags = 0;
    if e.sending {
        flags |= SENDING;
    }
    if e.changed_while_sending {
        flags |= CHANGED_WHILE_SENDING;
    }
    if e.last_error.is_some() {
        flags |= HAS_ERROR;
    }
    if e.unconfirmed_since.is_some() {
        flags |= UNCONFIRMED;
    }
    w.u8(flags);
    w.varint(u128::from(e.attempts));
    w.time(&e.enqueued_at);
    w.str(&e.canonical_id);
    if let Some(err) = &e.last_error {
        w.str(err);
    }
    if let Some(since) = &e.unconfirmed_since {
        w.time(since);
    }
    w.0
}

pub(crate) fn decode_outbox(bytes: &[u8]) -> Result<OutboxEntry, DecodeError> {
    let mut r = Reader(bytes);
    r.format()?;
    let flags = r.u8()?;
    let attempts = u32::try_from(r.varint()?).map_err(|_| "attempts out of range")?;
    let enqueued_at = r.time()?;
    let canonical_id = r.str()?.to_owned();
    let last_error = if flags & HAS_ERROR != 0 {
        Some(r.str()?.to_owned())
    } else {
        None
    };
    // Absent in entries written before the flag existed: they decode as confirmed.
    let unconfirmed_since = if flags & UNCONFIRMED != 0 {
        Some(r.time()?)
    } else {
        None
    };
    r.end()?;
    Ok(OutboxEntry {
        canonical_id,
        enqueued_at,
        attempts,
        last_error,
        sending: flags & SENDING != 0,
        changed_while_sending: flags & CHANGED_WHILE_SENDING != 0,
        unconfirmed_since,
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::model::parse_decimal;

    fn ts(secs: i64, nanos: u32) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, nanos).unwrap()
    }

    fn state(value: Value, connector: &str, t: DateTime<Utc>) -> FieldState {
        FieldState {
            value,
            source: Provenance {
                connector: connector.into(),
                vendor_ts: t,
            },
        }
    }

    #[test]
    fn companies_round_trip_every_value_type_exactly() {
        let mut c = Company::new("0190-abc".into());
        let f = &mut c.fields;
        f.insert(
            "name".into(),
            state(Value::Text("Ünïcode AG".into()), "rally", ts(1, 5)),
        );
        f.insert("notes".into(), state(Value::Null, "marketo", ts(-10, 0)));
        f.insert(
            "employeeCount".into(),
            state(Value::Int(i64::MIN), "rally", ts(0, 0)),
        );
        for (i, d) in [
            "45000000.50",
            "-0.0001",
            "79228162514264337593543950335",
            "0",
        ]
        .iter()
        .enumerate()
        {
            f.insert(
                format!("custom.d{i}"),
                state(
                    Value::Decimal(parse_decimal(d).unwrap()),
                    "amocrm",
                    ts(2, 999_999_999),
                ),
            );
        }
        f.insert(
            "tags".into(),
            state(
                Value::Tags(["a".into(), String::new()].into()),
                "rally",
                ts(3, 0),
            ),
        );
        f.insert(
            "custom.raw".into(),
            state(
                Value::Json(serde_json::json!({"z": 1.50, "a": [null, "x"]})),
                "amocrm",
                ts(4, 0),
            ),
        );
        let back = decode_company(&c.id, &encode_company(&c)).expect("decodes");
        assert_eq!(back, c);
        // Trailing zeros of decimals are kept, not normalised away.
        assert_eq!(back.get("custom.d0").unwrap().to_string(), "45000000.50");
    }

    #[test]
    fn ledger_and_outbox_entries_round_trip() {
        for hash in [
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08",
            "short",
        ] {
            let e = LedgerEntry {
                hash: hash.into(),
                at: ts(1_700_000_000, 123),
                prints: None,
            };
            assert_eq!(decode_ledger(&encode_ledger(&e)), Ok(e));
        }
        for (sending, changed, err, unconfirmed) in [
            (false, false, None, None),
            (true, true, Some("boom"), Some(ts(7, 8))),
            (true, false, None, Some(ts(9, 10))),
        ] {
            let e = OutboxEntry {
                canonical_id: "c1".into(),
                enqueued_at: ts(5, 6),
                attempts: 3,
                last_error: err.map(String::from),
                sending,
                changed_while_sending: changed,
                unconfirmed_since: unconfirmed,
            };
            assert_eq!(decode_outbox(&encode_outbox(&e)), Ok(e));
        }
    }

    #[test]
    fn record_rows_round_trip_with_and_without_link_and_ledger() {
        let e = LedgerEntry {
            hash: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            at: ts(1_700_000_000, 9),
            prints: None,
        };
        let with_prints = LedgerEntry {
            prints: Some(FieldPrints {
                layout: 0xdead_beef,
                values: vec![1, 0, u32::MAX, 77, 1, 1, 1, 1, 1, 5],
            }),
            ..e.clone()
        };
        for (id, ledger) in [
            (Some("0190-abc"), Some(&e)),
            (Some("0190-abc"), Some(&with_prints)),
            (Some("0190-abc"), None),
            (None, Some(&e)),
            (None, Some(&with_prints)),
            (None, None),
        ] {
            let bytes = encode_record(id, ledger);
            let row = decode_record(&bytes).expect("decodes");
            assert_eq!(row.canonical_id.as_deref(), id, "row {row:?}");
            assert_eq!(row.ledger.as_ref(), ledger, "row {row:?}");
            assert_eq!(record_link(&bytes), Ok(id));
        }
    }

    #[test]
    fn pending_rows_round_trip() {
        let pending = [("marketo", 7u64), ("amocrm", u64::MAX)];
        assert_eq!(
            decode_pending(&encode_pending(&pending)),
            Ok(pending.to_vec())
        );
        assert_eq!(decode_pending(&encode_pending(&[])), Ok(vec![]));
    }

    #[test]
    fn truncated_values_are_errors_not_panics() {
        let mut c = Company::new("c".into());
        c.fields.insert(
            "name".into(),
            state(Value::Text("Acme".into()), "rally", ts(1, 0)),
        );
        let bytes = encode_company(&c);
        for n in 0..bytes.len() {
            assert!(
                decode_company("c", &bytes[..n]).is_err(),
                "prefix of {n} bytes decoded"
            );
        }
        let e = LedgerEntry {
            hash: "h".into(),
            at: ts(1, 0),
            prints: Some(FieldPrints {
                layout: 9,
                values: vec![FieldPrints::NOTHING, 5, 0, FieldPrints::NOTHING, 7],
            }),
        };
        let bytes = encode_record(Some("c"), Some(&e));
        assert_eq!(decode_record(&bytes).unwrap().ledger, Some(e));
        for n in 0..bytes.len() {
            assert!(
                decode_record(&bytes[..n]).is_err(),
                "prefix of {n} bytes decoded"
            );
        }
    }
}
