//! The body shape `POST /companies/bulk` takes, learnt from the server's answers.
//!
//! Rally documents the bulk answer but not the request body. We send a bare JSON array of
//! companies (the shape the list answer uses); a server that wants them wrapped as
//! `{"companies": [...]}` refuses that as a whole with a 4xx naming no index, and every
//! bulk would then go item by item — correct, but one call per record instead of one per
//! hundred. So the first few such refusals, before any bulk has succeeded, try the wrapped
//! shape once; the shape that succeeds is kept for the life of the process.

use std::sync::atomic::{AtomicU8, Ordering};

use serde_json::{Map, Value};

/// How a bulk call's companies are laid out in its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BulkShape {
    /// `[{...}, {...}]`.
    Array,
    /// `{"companies": [{...}, {...}]}`.
    Wrapped,
}

impl BulkShape {
    /// The body for `companies` in this shape.
    pub(super) fn body(self, companies: Vec<Value>) -> Value {
        match self {
            BulkShape::Array => Value::Array(companies),
            BulkShape::Wrapped => {
                let mut m = Map::with_capacity(1);
                m.insert("companies".into(), Value::Array(companies));
                Value::Object(m)
            }
        }
    }
}

/// Unknown while no bulk has succeeded yet.
const UNKNOWN: u8 = 0;
const ARRAY: u8 = 1;
const WRAPPED: u8 = 2;
/// Tries of the other shape before giving up on it: a whole-bulk refusal can also be a
/// record the server's validation refuses, in either shape, so one failed try proves
/// nothing, and a few bound what refusals of that kind cost.
const MAX_PROBES: u8 = 3;

/// The bulk body shape this server takes, as far as its answers have shown it.
#[derive(Debug, Default)]
pub(super) struct LearntBulkShape {
    known: AtomicU8,
    probes: AtomicU8,
}

impl LearntBulkShape {
    /// The shape to send: the one that last succeeded, else a bare array.
    pub(super) fn current(&self) -> BulkShape {
        match self.known.load(Ordering::Relaxed) {
            WRAPPED => BulkShape::Wrapped,
            _ => BulkShape::Array,
        }
    }

    /// A bulk in `shape` succeeded: keep sending that.
    pub(super) fn confirm(&self, shape: BulkShape) {
        let v = match shape {
            BulkShape::Array => ARRAY,
            BulkShape::Wrapped => WRAPPED,
        };
        self.known.store(v, Ordering::Relaxed);
    }

    /// Whether a bulk refused as a whole in `sent` should be tried once in the other
    /// shape: only while no shape has succeeded and tries are left (each call to this
    /// that answers yes uses one).
    pub(super) fn should_probe(&self, sent: BulkShape) -> bool {
        sent == BulkShape::Array
            && self.known.load(Ordering::Relaxed) == UNKNOWN
            && self
                .probes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < MAX_PROBES).then_some(n + 1)
                })
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn probes_are_bounded_and_stop_once_a_shape_is_known() {
        let s = LearntBulkShape::default();
        assert_eq!(s.current(), BulkShape::Array);
        assert!((0..MAX_PROBES).all(|_| s.should_probe(BulkShape::Array)));
        assert!(!s.should_probe(BulkShape::Array), "probe budget spent");

        let s = LearntBulkShape::default();
        s.confirm(BulkShape::Array);
        assert!(!s.should_probe(BulkShape::Array), "the array was accepted");

        let s = LearntBulkShape::default();
        s.confirm(BulkShape::Wrapped);
        assert_eq!(s.current(), BulkShape::Wrapped);
        assert!(!s.should_probe(BulkShape::Wrapped));
    }

    #[test]
    fn wrapped_bodies_name_the_companies() {
        let c = vec![json!({"name": "A"})];
        assert_eq!(BulkShape::Array.body(c.clone()), json!([{"name": "A"}]));
        assert_eq!(
            BulkShape::Wrapped.body(c),
            json!({"companies": [{"name": "A"}]})
        );
    }
}
