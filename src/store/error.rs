//! The store's error type: every failure says which table and operation it hit, and wraps
//! the specific redb error type that produced it (redb 4 splits its errors by operation).

use std::path::PathBuf;

/// A failure of the redb-backed store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process (or another `Store` in this process) has the file open.
    #[error(
        "store {path} is locked: another crmbridge process (the daemon?) holds it; stop it or \
         point store.path elsewhere"
    )]
    Locked {
        /// The store file.
        path: PathBuf,
    },

    /// The file was written by a newer crmbridge with a schema this one does not know.
    #[error(
        "store {path} has schema version {found}, this crmbridge supports up to {supported}: \
         written by a newer crmbridge; upgrade or point store.path elsewhere"
    )]
    NewerSchema {
        /// The store file.
        path: PathBuf,
        /// The version found in the file.
        found: u32,
        /// The newest version this build understands.
        supported: u32,
    },

    /// The store's directory could not be created.
    #[error("cannot create the directory of store {path}: {source}")]
    CreateDir {
        /// The store file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// redb could not open or create the file.
    #[error("cannot open store {path}: {source}")]
    Open {
        /// The store file.
        path: PathBuf,
        /// redb's reason.
        source: redb::DatabaseError,
    },

    /// A transaction could not be started.
    #[error("cannot begin a {kind} transaction: {source}")]
    Begin {
        /// `"read"` or `"write"`.
        kind: &'static str,
        /// redb's reason.
        source: redb::TransactionError,
    },

    /// A table could not be opened (missing, or its key/value types changed).
    #[error("cannot open table {table}: {source}")]
    Table {
        /// The table.
        table: &'static str,
        /// redb's reason.
        source: redb::TableError,
    },

    /// Reading or writing a table failed at the storage level (I/O, corruption).
    #[error("{op} on table {table} failed: {source}")]
    Storage {
        /// The table.
        table: &'static str,
        /// The operation (`"get"`, `"insert"`, `"remove"`, `"range"`, `"len"`).
        op: &'static str,
        /// redb's reason.
        source: redb::StorageError,
    },

    /// The commit did not reach the disk; nothing of the transaction is stored.
    #[error("commit failed: {source}")]
    Commit {
        /// redb's reason.
        source: redb::CommitError,
    },

    /// A value could not be serialised.
    #[error("cannot encode a value for table {table}: {source}")]
    Encode {
        /// The table.
        table: &'static str,
        /// serde_json's reason.
        source: serde_json::Error,
    },

    /// A stored value could not be read back (written by an incompatible build, or corrupt).
    #[error("cannot decode the value of {key} in table {table}: {source}")]
    Decode {
        /// The table.
        table: &'static str,
        /// The key, as text.
        key: String,
        /// serde_json's reason.
        source: serde_json::Error,
    },

    /// A stored binary value could not be read back (written by an incompatible build, or
    /// corrupt).
    #[error("cannot decode the value of {key} in table {table}: {reason}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// The key, as text.
        key: String,
        /// What was wrong with the bytes.
        reason: &'static str,
    },
}

/// Attaches the table and operation to a redb storage error.
pub(crate) trait StorageContext<T> {
    /// Maps the error to [`StoreError::Storage`].
    fn at(self, table: &'static str, op: &'static str) -> Result<T, StoreError>;
}

impl<T> StorageContext<T> for Result<T, redb::StorageError> {
    fn at(self, table: &'static str, op: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Storage { table, op, source })
    }
}
