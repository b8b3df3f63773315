//! The operator endpoint on a loopback address: `/metrics` (Prometheus text), `/healthz`
//! (200 or 503 with the reason) and `/status` (JSON, what `crmbridge status` prints).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use crate::store::Store;

/// One connector's state as `status` shows it. Holds no secrets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectorStatus {
    /// Connector name.
    pub name: String,
    /// CRM kind.
    pub kind: String,
    /// The stored incremental cursor (connector-defined JSON).
    pub cursor: serde_json::Value,
    /// Last completed poll cycle.
    pub last_success: Option<DateTime<Utc>>,
    /// Seconds since the last completed poll cycle.
    pub lag_seconds: Option<f64>,
    /// Pushes queued for this connector.
    pub outbox_depth: u64,
    /// Calls counted against today's daily budget.
    pub quota_used_today: u64,
    /// Today's daily budget, if any.
    pub quota_budget: Option<u64>,
    /// Set while the connector must not call its vendor (ban, quota), until this time.
    pub suspended_until: Option<DateTime<Utc>>,
}

/// The whole daemon's state as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Whether this came from a running daemon (or from the store while it is stopped).
    pub daemon_running: bool,
    /// Companies in the canonical store.
    pub companies: u64,
    /// Records in the dead-letter table.
    pub dead_letters: u64,
    /// Per connector.
    pub connectors: Vec<ConnectorStatus>,
    /// Health verdict and reasons.
    pub healthy: bool,
    /// Why not healthy.
    pub problems: Vec<String>,
}

/// Static facts about a connector the status report needs.
#[derive(Debug, Clone)]
pub struct ConnectorInfo {
    /// Name.
    pub name: String,
    /// CRM kind.
    pub kind: String,
    /// Daily budget of calls, if any.
    pub quota_budget: Option<u64>,
    /// When the vendor's daily quota resets (decides what "today" is).
    pub quota_reset: crate::http::QuotaReset,
}

/// Builds the status report from the store and the metrics.
pub fn status_report(
    store: &Store,
    metrics: Option<&Metrics>,
    connectors: &[ConnectorInfo],
    unhealthy_after: Duration,
    started: DateTime<Utc>,
) -> Result<StatusReport, crate::store::StoreError> {
    let tx = store.begin_read()?;
    let now = Utc::now();
    let mut report = StatusReport {
        daemon_running: metrics.is_some(),
        companies: tx.company_count()?,
        dead_letters: tx.dead_letter_count()?,
        healthy: true,
        ..Default::default()
    };
    for c in connectors {
        let l = [("connector", c.name.as_str())];
        let last = metrics
            .and_then(|m| m.get("crmbridge_last_successful_poll_timestamp_seconds", &l))
            .and_then(|t| DateTime::from_timestamp(t as i64, 0));
        let suspended = metrics
            .and_then(|m| m.get("crmbridge_suspended_until_timestamp_seconds", &l))
            .and_then(|t| DateTime::from_timestamp(t as i64, 0))
            .filter(|t| *t > now);
        let lag = last.map(|t| (now - t).num_milliseconds() as f64 / 1000.0);
        let day = c.quota_reset.day_key(now);
        let st = ConnectorStatus {
            name: c.name.clone(),
            kind: c.kind.clone(),
            cursor: tx.cursor(&c.name)?.map(|c| c.0).unwrap_or_default(),
            last_success: last,
            lag_seconds: lag,
            outbox_depth: tx.outbox_len(&c.name)?,
            quota_used_today: tx.quota_used(&c.name, &day)?,
            quota_budget: c.quota_budget,
            suspended_until: suspended,
        };
        if metrics.is_some() {
            let since = last.unwrap_or(started);
            if (now - since).to_std().unwrap_or_default() > unhealthy_after {
                report.problems.push(format!(
                    "{}: no successful poll for more than {}",
                    c.name,
                    humantime::format_duration(unhealthy_after)
                ));
            }
            if let Some(u) = suspended {
                report
                    .problems
                    .push(format!("{}: suspended until {u}", c.name));
            }
        }
        report.connectors.push(st);
    }
    report.healthy = report.problems.is_empty();
    Ok(report)
}

/// What the endpoint serves from.
#[derive(Clone)]
pub struct ServerState {
    /// The store (read transactions only).
    pub store: Arc<Store>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Connector facts.
    pub connectors: Arc<Vec<ConnectorInfo>>,
    /// Failure age that makes `/healthz` unhealthy.
    pub unhealthy_after: Duration,
    /// When the daemon started.
    pub started: DateTime<Utc>,
    /// The engine, whose connectors' HTTP counters are exported.
    pub engine: Option<Arc<crate::engine::Engine>>,
}

impl ServerState {
    fn report(&self) -> Result<StatusReport, String> {
        status_report(
            &self.store,
            Some(&self.metrics),
            &self.connectors,
            self.unhealthy_after,
            self.started,
        )
        .map_err(|e| e.to_string())
    }
}

/// Copies the connectors' HTTP client counters into the registry.
fn export_http_metrics(s: &ServerState) {
    let Some(engine) = &s.engine else { return };
    for ep in engine.endpoints() {
        let Some(h) = ep.connector.http_metrics() else {
            continue;
        };
        let l = [("connector", ep.name.as_str())];
        s.metrics
            .set("crmbridge_http_calls_total", &l, h.calls as f64);
        s.metrics.set(
            "crmbridge_limiter_wait_seconds_total",
            &l,
            h.limiter_wait_ms as f64 / 1000.0,
        );
        for (class, n) in &h.rejections {
            s.metrics.set(
                "crmbridge_limit_rejections_total",
                &[("connector", ep.name.as_str()), ("class", class.as_str())],
                *n as f64,
            );
        }
        if let Some(until) = h.suspended_until {
            s.metrics.set(
                "crmbridge_suspended_until_timestamp_seconds",
                &l,
                until.timestamp() as f64,
            );
        }
    }
}

async fn metrics_handler(State(s): State<ServerState>) -> impl IntoResponse {
    export_http_metrics(&s);
    // Gauges that live in the store are read at scrape time.
    if let Ok(r) = s.report() {
        s.metrics
            .set("crmbridge_dead_letters", &[], r.dead_letters as f64);
        for c in &r.connectors {
            let l = [("connector", c.name.as_str())];
            s.metrics
                .set("crmbridge_outbox_depth", &l, c.outbox_depth as f64);
            s.metrics
                .set("crmbridge_quota_used", &l, c.quota_used_today as f64);
            if let Some(b) = c.quota_budget {
                s.metrics.set(
                    "crmbridge_quota_left",
                    &l,
                    b.saturating_sub(c.quota_used_today) as f64,
                );
            }
            let lag = c
                .lag_seconds
                .unwrap_or_else(|| (Utc::now() - s.started).num_seconds() as f64);
            s.metrics.set("crmbridge_lag_seconds", &l, lag);
            s.metrics.set(
                "crmbridge_suspended",
                &l,
                if c.suspended_until.is_some() {
                    1.0
                } else {
                    0.0
                },
            );
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn health_handler(State(s): State<ServerState>) -> impl IntoResponse {
    export_http_metrics(&s);
    match s.report() {
        Ok(r) if r.healthy => (StatusCode::OK, "ok\n".to_string()),
        Ok(r) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy\n{}\n", r.problems.join("\n")),
        ),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")),
    }
}

async fn status_handler(State(s): State<ServerState>) -> impl IntoResponse {
    export_http_metrics(&s);
    match s.report() {
        Ok(r) => (
            StatusCode::OK,
            axum::Json(serde_json::to_value(r).unwrap_or_default()),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({ "error": e })),
        ),
    }
}

/// The endpoint's routes.
pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .route("/status", get(status_handler))
        .with_state(state)
}

/// Serves the endpoint on `addr` until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    state: ServerState,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router(state))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(bound)
}
