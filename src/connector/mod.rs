//! The `Connector` trait every CRM implements, and the types that cross it: pages of
//! vendor records with the cursor that follows them, push items and their outcomes, and
//! the error classes the engine acts on. Connectors never touch the store or the mapping.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::CanonicalId;

/// One record as a CRM returned it, flattened so the mapping can address every field by
/// one key (amoCRM custom fields become `cf.id.<id>` / `cf.code.<CODE>` / `cf.name.<name>`,
/// tags become `tags`, etc.; each connector documents its keys).
#[derive(Debug, Clone, PartialEq)]
pub struct VendorRecord {
    /// The vendor's id of the record, as text.
    pub vendor_id: String,
    /// The vendor's last-modified time (UTC).
    pub updated_at: DateTime<Utc>,
    /// The record's fields, flat.
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// True when the vendor reports the record deleted.
    pub deleted: bool,
}

/// A record the connector could not even parse into a [`VendorRecord`] (missing id, wrong
/// types): it goes to the dead-letter table with the reason, and the page goes on.
#[derive(Debug, Clone, PartialEq)]
pub struct MalformedRecord {
    /// The vendor id if one could be read.
    pub vendor_id: Option<String>,
    /// The raw JSON (or text) of the record, possibly truncated.
    pub raw: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A connector's position in its change feed. Opaque to the engine: each connector
/// defines its own JSON shape. Stored in redb in the same transaction as the records read
/// under it, so it never runs ahead of what was stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cursor(pub serde_json::Value);

impl Cursor {
    /// The cursor of a connector that has never polled: the next poll starts from the
    /// beginning (a full read).
    pub fn start() -> Self {
        Cursor(serde_json::Value::Null)
    }
}

/// One page of changes.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// The records read (possibly repeats of earlier ones: the engine de-duplicates).
    pub records: Vec<VendorRecord>,
    /// Records that could not be parsed.
    pub malformed: Vec<MalformedRecord>,
    /// The cursor to store together with this page's records.
    pub next: Cursor,
    /// False once this poll cycle has caught up; the engine then waits a poll interval.
    pub more: bool,
}

/// How a poll cycle should read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollMode {
    /// Changes since the stored cursor.
    Incremental,
    /// Everything (or everything updated since a date), ignoring the stored cursor; used
    /// by `backfill`.
    Full {
        /// Only records updated at or after this time.
        since: Option<DateTime<Utc>>,
    },
}

/// How the engine reads a CRM's latest changes right before writing to it, so that a
/// write carries them instead of overwriting them (a company edited here while another
/// CRM's change to it was on its way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreWriteRead {
    /// Run an incremental poll cycle (cheap where the API filters by update time: one
    /// call when little changed).
    Poll,
    /// Read the records about to be written, by id ([`Connector::read_by_ids`]): for an
    /// API whose incremental poll is expensive (Marketo's scan).
    ById,
    /// Nothing: writes may overwrite changes made since the last poll.
    Nothing,
}

/// One record to write to a CRM.
#[derive(Debug, Clone, PartialEq)]
pub struct PushItem {
    /// The canonical company this write carries.
    pub canonical_id: CanonicalId,
    /// The target's id of the record when a link exists (update), else `None` (create or
    /// upsert by match key).
    pub vendor_id: Option<String>,
    /// The fields to write, in the connector's flat shape (see [`VendorRecord::fields`]).
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// How many times this write was attempted before.
    pub prior_attempts: u32,
    /// Set when an earlier send of this write may have reached the vendor without its
    /// answer reaching us (a timeout or dropped connection after sending, a crash
    /// mid-send): no earlier than this time. Without a `vendor_id`, an earlier create may
    /// then have landed unseen, so a connector without an idempotent create must look for
    /// the record (created at or after this time) before creating it again.
    pub unconfirmed_since: Option<DateTime<Utc>>,
}

/// What happened to one pushed item.
#[derive(Debug, Clone, PartialEq)]
pub enum PushOutcome {
    /// Stored by the vendor under `vendor_id`.
    Written {
        /// The vendor's id of the record.
        vendor_id: String,
        /// True if the vendor created it.
        created: bool,
    },
    /// The vendor refused this record for a reason retrying will not fix.
    Rejected {
        /// The vendor's reason, verbatim where possible.
        reason: String,
    },
    /// Not written this time for a transient reason, and certainly not stored by the
    /// vendor (throttled, refused as a whole, never sent); stays in the outbox.
    Retry {
        /// Why.
        reason: String,
    },
    /// Sent, but whether the vendor stored it is unknown (a timeout or dropped connection
    /// after sending, an accepted batch that did not list it); stays in the outbox, and
    /// later pushes carry [`PushItem::unconfirmed_since`].
    Unconfirmed {
        /// Why.
        reason: String,
    },
}

/// Errors of a whole call, classified by what the caller should do about them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectorError {
    /// Transient (429/5xx/606/615/timeouts/resets) after bounded retries: try again in a
    /// later cycle.
    #[error("{connector}: temporary failure: {detail}")]
    Transient {
        /// The connector.
        connector: String,
        /// What failed.
        detail: String,
        /// When the vendor asked us to come back, if it said.
        retry_after: Option<Duration>,
    },
    /// Credentials rejected even after a refresh.
    #[error("{connector}: authentication failed: {detail}")]
    Auth {
        /// The connector.
        connector: String,
        /// What failed (never the secret).
        detail: String,
    },
    /// The connector must not call the vendor until `until` (Marketo 607 daily quota,
    /// amoCRM 403 ban, our own daily budget).
    #[error("{connector}: suspended until {until}: {detail}")]
    Suspended {
        /// The connector.
        connector: String,
        /// Why.
        detail: String,
        /// When calls may resume.
        until: DateTime<Utc>,
    },
    /// A bug or misconfiguration retrying will not fix (bad base URL, read-only API).
    #[error("{connector}: {detail}")]
    Fatal {
        /// The connector.
        connector: String,
        /// What is wrong.
        detail: String,
    },
}

/// One CRM's API, as the engine sees it. Implementations live in
/// `src/connectors/<name>/` and are registered in [`crate::connectors`].
#[async_trait]
pub trait Connector: Send + Sync {
    /// The configured instance name (e.g. `"rally"`).
    fn name(&self) -> &str;

    /// Prepares for work: tokens, field catalogues (amoCRM custom fields, Marketo
    /// describe). Called once before the first poll or push.
    async fn start(&self) -> Result<(), ConnectorError>;

    /// Of the flat vendor keys a mapping uses, those this instance does not have (e.g. an
    /// amoCRM account without a "Domain" custom field, or a Marketo instance lacking a
    /// field). Called after [`Connector::start`]; their rules are dropped with a warning.
    fn unavailable_fields(&self, vendor_keys: &[String]) -> Vec<String> {
        let _ = vendor_keys;
        Vec::new()
    }

    /// Of the flat vendor fields of one write, those this instance cannot hold as they
    /// are, each with the reason (an amoCRM select field offers no such option). The
    /// engine writes the record without them — cleared there, as the record cannot show
    /// the company's value — and keeps a dead letter saying so, instead of refusing the
    /// whole company (a user would rather have the company there without its industry
    /// than not at all). Only fields that may be left empty belong here, never a name.
    /// Called after [`Connector::start`].
    fn unholdable(
        &self,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Vec<(String, String)> {
        let _ = fields;
        Vec::new()
    }

    /// Of the flat vendor fields of one write, those this instance keeps in another form
    /// than written, each with the value it will read back as (amoCRM spells a select's
    /// option its own way: "energy" is kept as "Energy"). The engine counts that form as
    /// written, so reading it back is no news — else the CRM's spelling would travel to
    /// the others as a change. Called after [`Connector::start`].
    fn stored_as(
        &self,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Vec<(String, serde_json::Value)> {
        let _ = fields;
        Vec::new()
    }

    /// Counters of the connector's HTTP client (calls, retries, limiter waits,
    /// rejections, quota), for `/metrics`.
    fn http_metrics(&self) -> Option<crate::http::HttpMetrics> {
        None
    }

    /// Problems `check --online` should report beyond missing fields (e.g. Marketo's
    /// Companies API read-only because native CRM sync is on). Called after `start`.
    async fn online_problems(&self) -> Vec<String> {
        Vec::new()
    }

    /// Reads the next page of changes after `cursor`.
    async fn poll(&self, cursor: &Cursor, mode: &PollMode) -> Result<Page, ConnectorError>;

    /// Where within a second of the wall clock a poll cycle is best begun, if anywhere:
    /// a CRM that stamps whole seconds and is read a second only once it is over
    /// (amoCRM) is read soonest after a change just after a second begins. The poll loop
    /// then moves each cycle's start to that point (by at most a second).
    fn poll_phase(&self) -> Option<Duration> {
        None
    }

    /// How to read this CRM's latest changes before writing to it (see [`PreWriteRead`]).
    fn pre_write_read(&self) -> PreWriteRead {
        PreWriteRead::Poll
    }

    /// The current state of the records `vendor_ids` (at most [`Connector::max_batch`]),
    /// for [`PreWriteRead::ById`]; records that no longer exist are left out. The page's
    /// cursor is not stored.
    async fn read_by_ids(&self, vendor_ids: &[String]) -> Result<Page, ConnectorError> {
        let _ = vendor_ids;
        Err(ConnectorError::Fatal {
            connector: self.name().to_string(),
            detail: "reading records by id is not supported".into(),
        })
    }

    /// The canonical field this connector fills with the company's canonical id when it
    /// creates a record for a company that has no value there (Marketo's
    /// `externalCompanyId`, its key for a replay that must update rather than duplicate).
    /// The engine then counts that value as written, so the record read back is no news.
    fn create_fills_with_canonical_id(&self) -> Option<&str> {
        None
    }

    /// True when an update of an existing record changes only the fields it sends, as
    /// the vendor documents it (amoCRM's `PATCH`, Marketo's sync). The engine then sends
    /// only the fields whose value the record does not already hold (by its field
    /// prints), so an edit made in the CRM since it was last read, to another field, is
    /// not overwritten. False, the default, sends every mapped field: safe whatever the
    /// API does with a field left out.
    fn updates_are_partial(&self) -> bool {
        false
    }

    /// The largest batch [`Connector::push`] accepts.
    fn max_batch(&self) -> usize;

    /// How many [`Connector::push`] calls the engine may have in flight at once (each
    /// with disjoint items). Connectors whose HTTP client allows several concurrent calls
    /// return that number (`max_concurrent`), so that batches overlap their service times
    /// instead of each paying it in turn; the client still enforces the rate limit.
    fn max_in_flight(&self) -> usize {
        1
    }

    /// Writes `items` (at most [`Connector::max_batch`]); the outcomes are in the same
    /// order as the items. An `Err` means nothing can be said about any item.
    async fn push(&self, items: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError>;
}
