//! The records the store keeps besides canonical companies: outbox entries, dead letters,
//! ledger entries and OAuth tokens. All are serialised as JSON inside redb values.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{CanonicalId, FieldPrints};

/// One pending push of a company to a target connector. There is at most one entry per
/// (target, company): the drain maps the company's state at send time, so one suffices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The company to push.
    pub canonical_id: CanonicalId,
    /// When the entry was first queued (for lag metrics and dead-lettering by age).
    pub enqueued_at: DateTime<Utc>,
    /// How many sends were started ([`super::WriteTx::outbox_mark_sending`]).
    pub attempts: u32,
    /// Why the last send failed, if it did.
    pub last_error: Option<String>,
    /// True between "send started" and its outcome being recorded. Still true after a
    /// restart means the send may or may not have reached the target.
    pub sending: bool,
    /// The company changed again while a send was in flight: that send carried older
    /// state, so on success the entry is kept (reset) instead of removed.
    #[serde(default)]
    pub changed_while_sending: bool,
    /// An earlier send may have reached the target without its outcome being known (a
    /// timeout or dropped connection after sending, a crash mid-send): no earlier than
    /// this time. Kept until the entry leaves the outbox, since a later send that
    /// certainly failed says nothing about the earlier one.
    #[serde(default)]
    pub unconfirmed_since: Option<DateTime<Utc>>,
}

/// What [`super::WriteTx::outbox_remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxRemoval {
    /// The entry is gone.
    Removed,
    /// The company changed while the entry was being sent: the entry stays queued (same
    /// seq, attempts reset) so its newer state gets pushed too.
    Requeued,
    /// There was no entry with that seq.
    NotFound,
}

/// Which way a dead-lettered record was travelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// Read from the connector; could not be parsed or mapped.
    Read,
    /// Pushed to the connector; the vendor rejected it or retries ran out.
    Push,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Read => "read",
            Direction::Push => "push",
        })
    }
}

/// A dead letter to add; the store assigns its id.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterNew {
    /// The connector read from or pushed to.
    pub connector: String,
    /// Read or push.
    pub direction: Direction,
    /// The canonical company, when known.
    pub canonical_id: Option<CanonicalId>,
    /// The vendor's record id, when known.
    pub vendor_id: Option<String>,
    /// The record as read or as it would have been pushed; raw text goes in as a JSON
    /// string.
    pub record: serde_json::Value,
    /// Why it failed, in the vendor's words where possible.
    pub reason: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// First failure (or enqueue) time.
    pub first_at: DateTime<Utc>,
    /// Last failure time.
    pub last_at: DateTime<Utc>,
}

/// A record that failed for a reason retrying will not fix, kept for an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The store-assigned id (increasing).
    pub id: u64,
    /// The connector read from or pushed to.
    pub connector: String,
    /// Read or push.
    pub direction: Direction,
    /// The canonical company, when known.
    pub canonical_id: Option<CanonicalId>,
    /// The vendor's record id, when known.
    pub vendor_id: Option<String>,
    /// The record (raw text as a JSON string).
    pub record: serde_json::Value,
    /// Why it failed.
    pub reason: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// First failure (or enqueue) time.
    pub first_at: DateTime<Utc>,
    /// Last failure time.
    pub last_at: DateTime<Utc>,
}

impl DeadLetter {
    pub(crate) fn from_new(id: u64, new: DeadLetterNew) -> Self {
        DeadLetter {
            id,
            connector: new.connector,
            direction: new.direction,
            canonical_id: new.canonical_id,
            vendor_id: new.vendor_id,
            record: new.record,
            reason: new.reason,
            attempts: new.attempts,
            first_at: new.first_at,
            last_at: new.last_at,
        }
    }
}

/// The content hash last pushed to, or read from, one vendor record. A read whose hash
/// equals it is our own echo; a push whose hash equals it is a no-op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// [`crate::model::content_hash`] of the canonical fields.
    pub hash: String,
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// Per-field prints of the same content, the base a later read is compared with
    /// field by field; `None` in entries written before prints existed.
    #[serde(skip)]
    pub prints: Option<FieldPrints>,
}

/// OAuth tokens of one connector, persisted so a restart does not need a new grant
/// (amoCRM refresh tokens rotate: losing the latest one locks the integration out).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The bearer token.
    pub access_token: String,
    /// The refresh token, if the grant has one.
    pub refresh_token: Option<String>,
    /// When the access token expires.
    pub expires_at: Option<DateTime<Utc>>,
}

impl fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field("access_token", &"[redacted]")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .field("expires_at", &self.expires_at)
            .finish()
    }
}
