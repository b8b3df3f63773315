//! List calls sent ahead of the poll that will want them, so that a long read is paced by
//! Rally's rate limit rather than by its answer time.
//!
//! One call at a time gets `1 / latency` calls per second: below Rally's 10/s as soon as
//! answers take longer than 100 ms. After a full page the next offsets are known (the
//! page's last row, less the slack; the one after that if the next page is full too), so
//! their calls go out at once and wait for their poll. Paging stays as safe as before: the
//! argument in the module docs asks only that each answer is a consistent snapshot and
//! that the tail is found in it, not that answers are taken in any order. A call whose
//! offset the read does not reach (the listing ended, rows shifted) is wasted: at most
//! [`READ_AHEAD`] per cycle, none for a cycle of one or two pages (the poll sends one page
//! ahead after a cycle's first page).

use std::sync::Mutex;

use tokio::task::JoinHandle;

use crate::http::{ApiResponse, HttpError};

/// Pages in flight ahead of the one being read.
pub const READ_AHEAD: usize = 2;

/// What a list call asked: an answer serves only the poll that would ask the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListKey {
    /// `updatedSince` as sent.
    pub since: Option<String>,
    /// The cycle the call belongs to (its `cycle_start` as stored).
    pub cycle: Option<String>,
    /// `limit` as sent.
    pub limit: usize,
    /// `offset` as sent.
    pub offset: usize,
}

/// A call sent ahead; aborted if dropped unused.
struct Ahead {
    key: ListKey,
    call: Option<JoinHandle<Result<ApiResponse, HttpError>>>,
}

impl Drop for Ahead {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.abort();
        }
    }
}

/// The calls in flight ahead of the read, oldest first.
#[derive(Default)]
pub struct ReadAhead(Mutex<Vec<Ahead>>);

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<usize> = self.lock().iter().map(|a| a.key.offset).collect();
        f.debug_tuple("ReadAhead").field(&keys).finish()
    }
}

impl ReadAhead {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Ahead>> {
        // A panic while holding it leaves nothing half-done: the list is only pushed to
        // or drained.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The call sent ahead for `key`, if there is one; calls for offsets before it can
    /// no longer be wanted and are dropped (all of them when there is none for `key`).
    pub fn take(&self, key: &ListKey) -> Option<JoinHandle<Result<ApiResponse, HttpError>>> {
        let mut list = self.lock();
        let Some(i) = list.iter().position(|a| &a.key == key) else {
            list.clear();
            return None;
        };
        let mut rest = list.split_off(i);
        let mut found = rest.remove(0);
        *list = rest;
        found.call.take()
    }

    /// Keeps calls in flight for exactly `keys` (in order): sends the missing ones with
    /// `send`, drops any other.
    pub fn keep(
        &self,
        keys: &[ListKey],
        send: impl Fn(&ListKey) -> JoinHandle<Result<ApiResponse, HttpError>>,
    ) {
        let mut list = self.lock();
        let mut old: Vec<Ahead> = std::mem::take(&mut *list);
        for key in keys {
            let ahead = match old.iter().position(|a| &a.key == key) {
                Some(i) => old.remove(i),
                None => Ahead {
                    key: key.clone(),
                    call: Some(send(key)),
                },
            };
            list.push(ahead);
        }
    }

    /// Drops every call in flight (the read ended or lost its place).
    pub fn clear(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn key(offset: usize) -> ListKey {
        ListKey {
            since: None,
            cycle: Some("2026-01-01T00:00:00Z".into()),
            limit: 100,
            offset,
        }
    }

    #[tokio::test]
    async fn calls_are_sent_once_taken_once_and_dropped_when_passed() {
        let ahead = ReadAhead::default();
        let sent = AtomicUsize::new(0);
        let send = |_: &ListKey| {
            sent.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(std::future::pending())
        };
        ahead.keep(&[key(99), key(198)], send);
        // The next page's keys overlap the last: only the new one is sent.
        ahead.keep(&[key(198), key(297)], send);
        assert_eq!(sent.load(Ordering::SeqCst), 3);
        let call = ahead.take(&key(198)).expect("sent ahead");
        assert!(!call.is_finished());
        ahead.keep(&[key(297), key(396)], send);
        assert_eq!(sent.load(Ordering::SeqCst), 4, "297 is still in flight");
        // Nothing for this key (another cycle, say): everything ahead is dropped.
        assert!(
            ahead
                .take(&ListKey {
                    cycle: None,
                    ..key(297)
                })
                .is_none()
        );
        assert!(ahead.take(&key(396)).is_none(), "dropped with the rest");
        assert!(ahead.take(&key(198)).is_none(), "taken once");
    }
}
