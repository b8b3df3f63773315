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

/// A connector the engine holds but that is not up yet: [`ConnectorStart`] starts it
/// (token, field catalogue) and fits its mapping to what the CRM has.
pub struct ConnectorStart {
    config: ConnectorConfig,
    endpoint: Arc<Endpoint>,
}

/// Why one attempt to bring a connector up failed.
enum StartFailure {
    /// Worth another attempt (the CRM was unreachable, throttled, or its quota is spent
    /// until the given time).
    Later {
        error: ConnectorError,
        until: Option<chrono::DateTime<Utc>>,
    },
    /// Another attempt would fail the same way (credentials refused, mapping invalid).
    Never(DaemonError),
}

impl ConnectorStart {
    /// The connector's name.
    pub fn name(&self) -> &str {
        &self.endpoint.name
    }

    /// One attempt: starts the connector and, on success, brings its endpoint up with the
    /// mapping fitted to the instance. Rules whose vendor field the instance lacks are
    /// dropped with a warning.
    async fn attempt(&self) -> Result<(), StartFailure> {
        let name = &self.endpoint.name;
        let connector = &self.endpoint.connector;
        match connector.start().await {
            Ok(()) => {}
            Err(error @ ConnectorError::Suspended { until, .. }) => {
                return Err(StartFailure::Later {
                    error,
                    until: Some(until),
                });
            }
            Err(error @ ConnectorError::Transient { .. }) => {
                return Err(StartFailure::Later { error, until: None });
            }
            Err(e) => {
                return Err(StartFailure::Never(DaemonError::Connector {
                    connector: name.clone(),
                    detail: e.to_string(),
                }));
            }
        }
        let cfg = &self.config;
        let fitted = Mapping::fit(cfg.kind(), cfg.mapping(), |keys| {
            connector.unavailable_fields(keys)
        })
        .map_err(|errs| {
            StartFailure::Never(DaemonError::Mapping {
                connector: name.clone(),
                detail: errs
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            })
        })?;
        if !fitted.missing.is_empty() {
            warn!(connector = %name, missing = ?fitted.missing, dropped = ?fitted.dropped,
                stand_ins = ?fitted.stand_ins,
                "vendor fields missing on this instance; those mapping rules are skipped");
        }
        self.endpoint.bring_up(fitted.mapping);
        info!(connector = %name, "connector up");
        Ok(())
    }

    /// Starts the connector, retrying transient failures a few times (a CRM briefly
    /// unreachable should not fail a one-shot command); any other failure is final.
    pub async fn with_patience(&self) -> Result<(), DaemonError> {
        let mut delay = Duration::from_millis(500);
        for attempt in 1..=START_ATTEMPTS {
            match self.attempt().await {
                Ok(()) => return Ok(()),
                Err(StartFailure::Later { error, .. }) if attempt < START_ATTEMPTS => {
                    warn!(connector = self.name(), attempt, error = %error, "start failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(StartFailure::Later { error, .. }) => {
                    return Err(DaemonError::Connector {
                        connector: self.name().to_string(),
                        detail: error.to_string(),
                    });
                }
                Err(StartFailure::Never(e)) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Starts the connector in the background of a running daemon: retries until it is up
    /// or `shutdown` fires, waiting out a suspension (a spent quota, a ban) and backing off
    /// up to [`MAX_START_PAUSE`] otherwise. The first attempt's outcome goes to `first`: a
    /// final failure then (refused credentials, a mapping the instance cannot take) ends
    /// the task, for the daemon to stop on; a later one is logged and retried rarely,
    /// while the other connectors keep syncing. Failures count in `engine`'s metrics.
    async fn until_up(
        &self,
        engine: &Engine,
        shutdown: &CancellationToken,
        first: tokio::sync::oneshot::Sender<Result<(), DaemonError>>,
    ) {
        let mut first = Some(first);
        let mut delay = Duration::from_secs(1);
        loop {
            let outcome = tokio::select! {
                o = self.attempt() => o,
                _ = shutdown.cancelled() => return,
            };
            let pause = match outcome {
                Ok(()) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(Ok(()));
                    }
                    return;
                }
                Err(StartFailure::Later { error, until }) => {
                    warn!(connector = self.name(), error = %error, "start failed; retrying (the other connectors sync meanwhile)");
                    engine.note_start_error(self.name(), error);
                    let pause = until
                        .and_then(|u| (u - Utc::now()).to_std().ok())
                        .unwrap_or(delay);
                    delay = (delay * 2).min(MAX_START_PAUSE);
                    pause
                }
                Err(StartFailure::Never(e)) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(Err(e));
                        return;
                    }
                    error!(connector = self.name(), error = %e,
                        "connector cannot start; the others keep syncing (fix, then restart)");
                    engine.note_start_error(
                        self.name(),
                        ConnectorError::Fatal {
                            connector: self.name().to_string(),
                            detail: e.to_string(),
                        },
                    );
                    NEVER_START_PAUSE
                }
            };
            if let Some(first) = first.take() {
                let _ = first.send(Ok(()));
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Attempts [`ConnectorStart::with_patience`] makes (0.5 + 1 + 2 + 4 s apart).
const START_ATTEMPTS: u32 = 5;
/// Longest pause between two background start attempts after transient failures.
pub const MAX_START_PAUSE: Duration = Duration::from_secs(60);
/// Pause before retrying a start that failed in a way another attempt should not mend.
const NEVER_START_PAUSE: Duration = Duration::from_secs(300);
/// How long the daemon waits for every connector's first start attempt before it goes
/// on with those that are up: a final failure within it stops the daemon (a config or
/// credential mistake shows at `systemctl start`), a slower start (a CRM down, a rate
/// window the previous run may still fill — Marketo's is 20 s) goes on in the background.
pub const FIRST_START_WAIT: Duration = Duration::from_secs(5);

/// Builds every enabled connector and an engine over them, all still starting: each
/// [`ConnectorStart`] brings its connector up.
pub fn assemble_engine(
    config: &Config,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
) -> Result<(Arc<Engine>, Vec<ConnectorStart>), DaemonError> {
    let mut endpoints = Vec::new();
    let mut configs = Vec::new();
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
        endpoints.push(Endpoint::starting(
            name.clone(),
            connector,
            cfg.common().poll_interval,
        ));
        configs.push((name.clone(), cfg.clone()));
    }
    let engine = Arc::new(Engine::new(
        store,
        endpoints,
        engine_settings(config),
        metrics,
    ));
    let starts = configs
        .into_iter()
        .map(|(name, config)| ConnectorStart {
            endpoint: engine
                .endpoint(&name)
                .expect("the engine holds every connector built")
                .clone(),
            config,
        })
        .collect();
    Ok((engine, starts))
}

/// Builds and starts every enabled connector (all at once: one CRM's start does not add
/// to the others') and compiles its mapping. For one-shot commands, which need them all.
pub async fn build_engine(
    config: &Config,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
) -> Result<Arc<Engine>, DaemonError> {
    let (engine, starts) = assemble_engine(config, store, metrics)?;
    futures::future::try_join_all(starts.iter().map(ConnectorStart::with_patience)).await?;
    Ok(engine)
}

/// Brings the daemon's connectors up, each in its own task ([`ConnectorStart::until_up`]):
/// the engine's loops for a connector begin once it is up, so the others sync meanwhile.
/// Waits up to [`FIRST_START_WAIT`] for every first attempt, and fails on a final failure
/// among them.
async fn start_connectors(
    engine: &Arc<Engine>,
    starts: Vec<ConnectorStart>,
    tracker: &tokio_util::task::TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    let mut firsts = Vec::new();
    for start in starts {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (engine, shutdown) = (engine.clone(), shutdown.clone());
        firsts.push((start.name().to_string(), rx));
        tracker.spawn(async move { start.until_up(&engine, &shutdown, tx).await });
    }
    let deadline = tokio::time::Instant::now() + FIRST_START_WAIT;
    for (name, rx) in firsts {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Err(e))) => return Err(e),
            Ok(_) => {}
            Err(_) => info!(
                connector = %name,
                "start takes a while; the other connectors sync meanwhile"
            ),
        }
    }
    Ok(())
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
    let (engine, starts) = assemble_engine(&config, store.clone(), metrics.clone())?;
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

    // The loops first: each begins as soon as its connector is up.
    let handle = engine.start(shutdown.clone());
    let starting = tokio_util::task::TaskTracker::new();
    if let Err(e) = start_connectors(&engine, starts, &starting, &shutdown).await {
        shutdown.cancel();
        starting.close();
        handle.wait().await;
        starting.wait().await;
        return Err(e);
    }
    starting.close();
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
    let stopped = async {
        handle.wait().await;
        starting.wait().await;
    };
    if tokio::time::timeout(config.daemon.shutdown_grace, stopped)
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
