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

/// Where the time of a connector's last vendor call is kept (in the cursors table).
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
    let last = store
        .begin_read()
        .and_then(|tx| tx.cursor(&last_call_key(name)))
        .ok()
        .flatten()
        .and_then(|c| c.0.as_i64())
        .and_then(chrono::DateTime::from_timestamp_millis);
    if let (Some(last), Some(window)) = (last, client.rate_window()) {
        let since = (Utc::now() - last).to_std().unwrap_or_default();
        if since < window {
            client.hold_until(tokio::time::Instant::now() + (window - since));
        }
    }
    Ok(client)
}
