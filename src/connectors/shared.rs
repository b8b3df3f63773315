//! Pieces every connector uses: the HTTP client built from the common connector config,
//! and the daily-quota ledger kept in the store so budgets survive restarts.

use std::sync::Arc;

use chrono::Utc;

use crate::config::CommonConnectorConfig;
use crate::connector::Cursor;
use crate::http::{HttpClient, HttpConfig, HttpError, QuotaLedger, QuotaReset, RateLimit};
use crate::store::Store;

/// Counts calls per quota day in the store (table `quota`).
pub struct StoreQuotaLedger {
    store: Arc<Store>,
    connector: String,
}

impl StoreQuotaLedger {
    /// A ledger for `connector`.
    pub fn new(store: Arc<Store>, connector: &str) -> Self {
        StoreQuotaLedger {
            store,
            connector: connector.to_string(),
        }
    }
}

impl QuotaLedger for StoreQuotaLedger {
    fn used(&self, day: &str) -> u64 {
        self.store
            .begin_read()
            .and_then(|tx| tx.quota_used(&self.connector, day))
            .unwrap_or(0)
    }

    fn add(&self, day: &str, n: u64) -> u64 {
        // A failed count must not stop the call; the vendor's own quota still protects.
        let res = self.store.begin_write().and_then(|tx| {
            let total = tx.add_quota(&self.connector, day, n)?;
            tx.put_cursor(
                &last_call_key(&self.connector),
                &Cursor(serde_json::json!(Utc::now().timestamp_millis())),
            )?;
            tx.commit()?;
            Ok(total)
        });
        match res {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(connector = %self.connector, error = %e, "quota ledger write failed");
                0
            }
        }
    }
}

/// Where the time of a connector's last vendor call is kept (in the cursors table;
/// `Store::take_vendor_state_from` copies the rows under this prefix back from a dry
/// run's scratch store).
fn last_call_key(connector: &str) -> String {
    format!("last-call:{connector}")
}

/// The HTTP client of connector `name` from its common config.
pub fn http_client(
    name: &str,
    common: &CommonConnectorConfig,
    quota_reset: QuotaReset,
    store: &Arc<Store>,
) -> Result<HttpClient, HttpError> {
    let l = &common.limits;
    let rate = match (l.requests_per_window, l.requests_per_second) {
        (Some((calls, window)), _) => RateLimit::PerWindow { calls, window },
        (None, Some(r)) => RateLimit::PerSecond(r),
        (None, None) => RateLimit::Unlimited,
    };
    // The delay the call log assumes for a call whose answer is slow (see `http`'s module
    // docs): a 1 s window has little room, so per-second limits assume 100 ms (at worst
    // ≈ 91 % of the limit, when answers take that long) and Marketo's 20 s window 1 s; on a
    // fast link both use ≈ 99 %. Should a server still count more calls, the HTTP layer
    // widens both after the first rejection (adaptive pacing).
    let rate_safety_margin = match rate {
        RateLimit::PerSecond(_) => 0.10,
        _ => 0.05,
    };
    let cfg = HttpConfig {
        rate_safety_margin,
        connect_timeout: common.timeouts.connect,
        read_timeout: common.timeouts.read,
        write_timeout: common.timeouts.write,
        rate,
        max_concurrent: l.max_concurrent.max(1),
        daily_budget: l
            .daily_quota
            .map(|q| (q as f64 * l.daily_share).floor() as u64),
        quota_reset,
        ..HttpConfig::new(name)
    };
    let client = HttpClient::new(cfg, Arc::new(StoreQuotaLedger::new(store.clone(), name)))?;
    // A restarted daemon must not add its calls to the previous process's in one window.
    // That process may have admitted calls until its last moment (a call is recorded here
    // when charged to the budget, and admitted after its turn, at most a few windows
    // later), which was before now: after a recent last call, the first call waits one
    // window plus the delay the call log allows for a call to reach the vendor.
    let last = store
        .begin_read()
        .and_then(|tx| tx.cursor(&last_call_key(name)))
        .ok()
        .flatten()
        .and_then(|c| c.0.as_i64())
        .and_then(chrono::DateTime::from_timestamp_millis);
    if let (Some(last), Some(hold)) = (last, client.window_with_delay()) {
        let since = (Utc::now() - last).to_std().unwrap_or_default();
        if since < hold + LONGEST_TURN {
            tracing::info!(
                connector = name,
                wait_secs = hold.as_secs(),
                "first call held back: the previous run's calls may still count in the vendor's rate window"
            );
            client.hold_until(tokio::time::Instant::now() + hold);
        }
    }
    Ok(client)
}

/// Longer than a call charged to the budget can wait for its turn at the limiter (the
/// concurrency cap bounds how many are charged and waiting): a previous process whose
/// last recorded call is older than this plus a window cannot share a window with us.
const LONGEST_TURN: std::time::Duration = std::time::Duration::from_secs(120);

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use wiremock::matchers::path;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;
    use crate::config::{Limits, Timeouts};
    use crate::http::{ApiRequest, DefaultClassifier};

    /// How long after the client is built its first call reaches the server, when the
    /// previous process's last call was `ago`.
    async fn first_call_delay(ago: chrono::Duration) -> Duration {
        let server = MockServer::start().await;
        Mock::given(path("/c"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
        let tx = store.begin_write().unwrap();
        let last = Cursor(serde_json::json!((Utc::now() - ago).timestamp_millis()));
        tx.put_cursor(&last_call_key("rally"), &last).unwrap();
        tx.commit().unwrap();
        let common = CommonConnectorConfig {
            base_url: url::Url::parse(&server.uri()).unwrap(),
            poll_interval: Duration::from_secs(1),
            batch_size: 100,
            timeouts: Timeouts {
                connect: Duration::from_secs(2),
                read: Duration::from_secs(5),
                write: Duration::from_secs(5),
            },
            limits: Limits {
                requests_per_second: Some(10.0),
                requests_per_window: None,
                max_concurrent: 4,
                daily_quota: None,
                daily_share: 1.0,
            },
            enabled: true,
        };
        let built = Instant::now();
        let client = http_client("rally", &common, QuotaReset::UtcMidnight, &store).unwrap();
        let url = url::Url::parse(&format!("{}/c", server.uri())).unwrap();
        client
            .send(ApiRequest::get("GET c", url), &DefaultClassifier)
            .await
            .expect("call succeeds");
        built.elapsed()
    }

    #[tokio::test]
    async fn a_restart_soon_after_the_last_call_waits_a_window_and_the_assumed_delay() {
        // 10/s: a window of 1 s, calls assumed to reach the vendor within 100 ms. Five
        // seconds ago is more than a window, but the previous process may have admitted
        // calls that waited for their turn after that.
        let waited = first_call_delay(chrono::Duration::seconds(5)).await;
        assert!(
            waited >= Duration::from_millis(1100),
            "first call after {waited:?}"
        );
    }

    #[tokio::test]
    async fn a_restart_long_after_the_last_call_does_not_wait() {
        let waited = first_call_delay(chrono::Duration::minutes(10)).await;
        assert!(
            waited < Duration::from_millis(900),
            "first call after {waited:?}"
        );
    }
}
