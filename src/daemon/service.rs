//! `crmbridge run`: opens the store, builds the engine from the config, serves metrics and
//! health, talks to systemd (READY, STATUS, WATCHDOG, STOPPING) and stops gracefully on
//! SIGTERM/SIGINT within the configured grace period.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::metrics::Metrics;
use super::server::{self, ConnectorInfo, ServerState};
use crate::config::{Config, ConnectorConfig};
use crate::connector::ConnectorError;
use crate::engine::{ConflictPolicy, Endpoint, Engine, EngineSettings, MatchKeyKind};
use crate::http::QuotaReset;
use crate::mapping::Mapping;
use crate::store::{Store, StoreError};

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The store could not be opened.
    #[error("store {path}: {source}")]
    Store {
        /// The store file.
        path: String,
        /// What failed.
        #[source]
        source: Box<StoreError>,
    },
    /// A connector could not be built or started.
    #[error("connector {connector}: {detail}")]
    Connector {
        /// Connector name.
        connector: String,
        /// What failed.
        detail: String,
    },
    /// A connector's mapping does not compile.
    #[error("connector {connector}: mapping: {detail}")]
    Mapping {
        /// Connector name.
        connector: String,
        /// What is wrong.
        detail: String,
    },
    /// The metrics/health endpoint could not listen.
    #[error("listen {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// Opens the store named by the config, turning "locked" into advice.
pub fn open_store(config: &Config) -> Result<Arc<Store>, DaemonError> {
    Store::open(&config.store.path)
        .map(Arc::new)
        .map_err(|source| DaemonError::Store {
            path: config.store.path.display().to_string(),
            source: Box::new(source),
        })
}

impl DaemonError {
    /// True when the store is held by another process (most likely the running daemon).
    pub fn is_store_locked(&self) -> bool {
        matches!(self, DaemonError::Store { source, .. } if matches!(**source, StoreError::Locked { .. }))
    }
}

/// Sync rules from the config.
pub fn engine_settings(config: &Config) -> EngineSettings {
    let enabled: Vec<&String> = config
        .connectors
        .iter()
        .filter(|(_, c)| c.common().enabled)
        .map(|(n, _)| n)
        .collect();
    let targets = enabled
        .iter()
        .map(|n| {
            let t = config
                .targets_of(n)
                .into_iter()
                .filter(|t| enabled.contains(&t))
                .collect();
            ((*n).clone(), t)
        })
        .collect();
    let default_priority = match &config.conflict.default {
        crate::config::ConflictRule::Newest => Vec::new(),
        crate::config::ConflictRule::Priority(p) => p.clone(),
    };
    EngineSettings {
        targets,
        policy: ConflictPolicy {
            priority: config.conflict.priority.clone(),
            default_priority,
        },
        match_keys: config
            .match_keys
            .iter()
            .map(|k| match k {
                crate::config::MatchKey::Domain => MatchKeyKind::Domain,
                crate::config::MatchKey::ExternalCompanyId => MatchKeyKind::ExternalCompanyId,
            })
            .collect(),
    }
}

/// Facts about each enabled connector for status and health.
pub fn connector_infos(config: &Config) -> Vec<ConnectorInfo> {
    config
        .connectors
        .iter()
        .filter(|(_, c)| c.common().enabled)
        .map(|(name, c)| {
            let limits = &c.common().limits;
            ConnectorInfo {
                name: name.clone(),
                kind: c.kind().to_string(),
                quota_budget: limits
                    .daily_quota
                    .map(|q| (q as f64 * limits.daily_share).floor() as u64),
                quota_reset: match c {
                    ConnectorConfig::Marketo(_) => QuotaReset::UsCentralMidnight,
                    _ => QuotaReset::UtcMidnight,
                },
            }
        })
        .collect()
}

/// Builds and starts every enabled connector and compiles its mapping. Rules whose vendor
/// field the instance lacks are dropped with a warning.
pub async fn build_engine(
    config: &Config,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
) -> Result<Arc<Engine>, DaemonError> {
    let mut built = Vec::new();
    for (name, cfg) in config.connectors.iter().filter(|(_, c)| c.common().enabled) {
        let ctx = crate::connectors::BuildContext {
            store: store.clone(),
            metrics: metrics.clone(),
        };
        let connector =
            crate::connectors::build(name, cfg, &ctx).map_err(|e| DaemonError::Connector {
                connector: name.clone(),
                detail: e.to_string(),
            })?;
        built.push((name, cfg, connector));
    }
    // Started together: one CRM's start (a token, a field catalogue, the rate window a
    // previous run may still fill — Marketo's is 20 s) does not add to the others'.
    futures::future::try_join_all(
        built
            .iter()
            .map(|(name, _, connector)| start_with_patience(name, connector.as_ref())),
    )
    .await?;
    let mut endpoints = Vec::new();
    for (name, cfg, connector) in built {
        let fitted = Mapping::fit(cfg.kind(), cfg.mapping(), |keys| {
            connector.unavailable_fields(keys)
        })
        .map_err(|errs| DaemonError::Mapping {
            connector: name.clone(),
            detail: errs
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        })?;
        if !fitted.missing.is_empty() {
            warn!(connector = %name, missing = ?fitted.missing, dropped = ?fitted.dropped,
                stand_ins = ?fitted.stand_ins,
                "vendor fields missing on this instance; those mapping rules are skipped");
        }
        let mapping = fitted.mapping;
        endpoints.push(Endpoint {
            name: name.clone(),
            connector,
            mapping,
            poll_interval: cfg.common().poll_interval,
        });
    }
    Ok(Arc::new(Engine::new(
        store,
        endpoints,
        engine_settings(config),
        metrics,
    )))
}

/// Starts a connector, retrying transient failures a few times: a CRM that is briefly
/// unreachable at boot should not stop the daemon.
async fn start_with_patience(
    name: &str,
    connector: &dyn crate::connector::Connector,
) -> Result<(), DaemonError> {
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=5 {
        match connector.start().await {
            Ok(()) => return Ok(()),
            Err(ConnectorError::Transient { detail, .. }) if attempt < 5 => {
                warn!(connector = name, attempt, error = %detail, "start failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                return Err(DaemonError::Connector {
                    connector: name.to_string(),
                    detail: e.to_string(),
                });
            }
        }
    }
    unreachable!("the last attempt returns")
}

fn notify(states: &[NotifyState]) {
    // Outside systemd NOTIFY_SOCKET is unset and this does nothing.
    let _ = sd_notify::notify(states);
}

/// Runs the daemon until SIGTERM/SIGINT (or `external_stop`).
pub async fn run(config: Config, external_stop: CancellationToken) -> Result<(), DaemonError> {
    let started = Utc::now();
    // Opening a large store can take a while: ask systemd for more start time.
    notify(&[NotifyState::ExtendTimeoutUsec(120_000_000)]);
    let store = open_store(&config)?;
    let metrics = Arc::new(Metrics::new());
    let engine = build_engine(&config, store.clone(), metrics.clone()).await?;
    let shutdown = CancellationToken::new();

    if let Some(addr) = config.daemon.listen {
        let state = ServerState {
            store: store.clone(),
            metrics: metrics.clone(),
            connectors: Arc::new(connector_infos(&config)),
            unhealthy_after: config.daemon.unhealthy_after,
            started,
            engine: Some(engine.clone()),
        };
        let bound = server::serve(addr, state, shutdown.clone())
            .await
            .map_err(|source| DaemonError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        info!(%bound, "metrics and health endpoint listening");
    }

    let handle = engine.start(shutdown.clone());
    let names: Vec<String> = engine.endpoints().map(|e| e.name.clone()).collect();
    info!(connectors = ?names, "crmbridge running");
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("syncing {}", names.join(", "))),
    ]);

    // Watchdog: ping only while every loop makes progress.
    if let Some(period) = sd_notify::watchdog_enabled() {
        let (engine, sd) = (engine.clone(), shutdown.clone());
        tokio::spawn(async move {
            let tick = period / 3;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(tick) => {}
                    _ = sd.cancelled() => break,
                }
                match engine.stalled_longer_than(period) {
                    None => {
                        let status = engine.status_line();
                        notify(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
                    }
                    Some(name) => {
                        error!(connector = %name, "loop stalled; withholding watchdog ping")
                    }
                }
            }
        });
    }

    wait_for_signal(&external_stop).await;
    info!("stopping: finishing in-flight pages and batches");
    notify(&[NotifyState::Stopping]);
    shutdown.cancel();
    if tokio::time::timeout(config.daemon.shutdown_grace, handle.wait())
        .await
        .is_err()
    {
        warn!(grace = ?config.daemon.shutdown_grace,
            "loops did not stop within the grace period; uncommitted work is replayed at the next start");
    }
    info!("stopped");
    Ok(())
}

async fn wait_for_signal(external: &CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let term_fut = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term_fut => {}
        _ = external.cancelled() => {}
    }
}
