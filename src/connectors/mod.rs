//! The connector implementations, one folder per CRM, and the registry that builds them
//! from config. Adding a CRM: a new folder implementing [`crate::connector::Connector`]
//! and one line in [`build`] (plus its config variant).

pub mod amocrm;
pub mod marketo;
pub mod rally;
pub mod shared;

use std::sync::Arc;

use crate::config::{Config, ConnectorConfig};
use crate::connector::{Connector, ConnectorError};
use crate::daemon::metrics::Metrics;
use crate::store::Store;

/// What every connector may use besides its own config.
#[derive(Clone)]
pub struct BuildContext {
    /// The store: OAuth tokens and the daily quota ledger live there.
    pub store: Arc<Store>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
}

/// Builds the connector named `name` from its config. Secrets are resolved here.
pub fn build(
    name: &str,
    cfg: &ConnectorConfig,
    ctx: &BuildContext,
) -> Result<Arc<dyn Connector>, ConnectorError> {
    match cfg {
        ConnectorConfig::Rally(c) => Ok(Arc::new(rally::RallyConnector::new(name, c, ctx)?)),
        ConnectorConfig::Marketo(c) => Ok(Arc::new(marketo::MarketoConnector::new(name, c, ctx)?)),
        ConnectorConfig::Amocrm(c) => Ok(Arc::new(amocrm::AmocrmConnector::new(name, c, ctx)?)),
    }
}

/// `check --online`: per connector, the problems found by talking to the instance
/// (credentials, mapped fields missing, read-only APIs). Empty lists mean all is well.
pub async fn check_online(config: &Config) -> Result<Vec<(String, Vec<String>)>, String> {
    let store_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    // A scratch store: the check must not need (or lock) the daemon's store.
    let store =
        Arc::new(Store::open(&store_dir.path().join("check.redb")).map_err(|e| e.to_string())?);
    let ctx = BuildContext {
        store,
        metrics: Arc::new(Metrics::new()),
    };
    let mut out = Vec::new();
    for (name, cfg) in config.connectors.iter().filter(|(_, c)| c.common().enabled) {
        let mut problems = Vec::new();
        match build(name, cfg, &ctx) {
            Err(e) => problems.push(e.to_string()),
            Ok(conn) => match conn.start().await {
                Err(e) => problems.push(e.to_string()),
                Ok(()) => {
                    match crate::mapping::Mapping::compile(cfg.kind(), cfg.mapping()) {
                        Ok(m) => {
                            for key in conn.unavailable_fields(&m.vendor_keys()) {
                                problems.push(format!(
                                    "mapped vendor field {key:?} does not exist on this instance"
                                ));
                            }
                        }
                        Err(errs) => problems.extend(errs.iter().map(|e| e.to_string())),
                    }
                    problems.extend(conn.online_problems().await);
                }
            },
        }
        out.push((name.clone(), problems));
    }
    Ok(out)
}
