//! The three simulators started together with overlapping company data — the same real
//! companies under different ids and slightly different values in each CRM — as used by
//! `crmbridge sim`, the demo, integration tests and benchmarks.

use std::net::{Ipv4Addr, SocketAddr};

use super::amocrm::{AmoSim, AmoSimConfig};
use super::marketo::{MarketoSim, MarketoSimConfig};
use super::rally::{RallySim, RallySimConfig};

/// The daily call quota of the cluster's Marketo (the real default is 50,000).
pub const SIM_MARKETO_DAILY_QUOTA: u64 = 20_000_000;

/// Rally's default rate limit (requests per second).
const RALLY_RPS: u32 = 10;
/// Marketo's default rate limit: calls per rolling window…
const MARKETO_CALLS: usize = 100;
/// …of this length.
const MARKETO_WINDOW: std::time::Duration = std::time::Duration::from_secs(20);
/// amoCRM's rate limit (requests per second).
const AMOCRM_RPS: u32 = 7;

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Seed of the company universe.
    pub seed: u64,
    /// Companies in the universe; each CRM holds an overlapping ~60% of them.
    pub companies: usize,
    /// Ports (0 = any free port).
    pub rally_port: u16,
    /// Marketo port.
    pub marketo_port: u16,
    /// amoCRM port.
    pub amocrm_port: u16,
    /// Every vendor rate limit × this factor, in the simulators and in the generated
    /// config alike (1 = the vendors' real limits; Marketo keeps 100 calls in a window
    /// 1/K as long), for tests about something other than the limits that need more calls
    /// than the real limits allow in seconds.
    pub limit_scale: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            seed: 1,
            companies: 30,
            rally_port: 0,
            marketo_port: 0,
            amocrm_port: 0,
            limit_scale: 1,
        }
    }
}

/// The universe indices each CRM starts with: Rally the first 60%, Marketo the last 60%,
/// amoCRM the middle 60% — every company is in at least one CRM, many in two or three.
pub fn overlapping_indices(n: usize) -> [Vec<usize>; 3] {
    let cut = |a: f64, b: f64| ((n as f64 * a) as usize)..((n as f64 * b).ceil() as usize).min(n);
    [
        cut(0.0, 0.6).collect(),
        cut(0.4, 1.0).collect(),
        cut(0.2, 0.8).collect(),
    ]
}

/// Three running simulators.
pub struct SimCluster {
    /// Rally.
    pub rally: RallySim,
    /// Marketo.
    pub marketo: MarketoSim,
    /// amoCRM.
    pub amocrm: AmoSim,
    /// The factor the vendor limits are scaled by ([`ClusterConfig::limit_scale`]); the
    /// generated config scales its `limits` alike.
    pub limit_scale: u32,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

impl SimCluster {
    /// Starts the three simulators with vendor-default limits and overlapping data.
    pub async fn start(cfg: &ClusterConfig) -> std::io::Result<SimCluster> {
        let [r, m, a] = overlapping_indices(cfg.companies);
        let scale = cfg.limit_scale.max(1);
        let rally = RallySim::start(
            loopback(cfg.rally_port),
            RallySimConfig {
                seed: cfg.seed,
                seed_indices: r,
                variant: 0,
                rate_limit_rps: RALLY_RPS * scale,
                ..Default::default()
            },
        )
        .await?;
        let marketo = MarketoSim::start(
            loopback(cfg.marketo_port),
            MarketoSimConfig {
                seed: cfg.seed,
                seed_indices: m,
                variant: 1,
                // A simulated instance with a large daily quota, so that the connector's
                // quota pacing lets change detection cycle every few seconds.
                daily_quota: SIM_MARKETO_DAILY_QUOTA,
                // The same calls in a shorter window: a restarted process then waits out
                // only that window for the previous one's calls (see `connectors::shared`).
                window: MARKETO_WINDOW / scale,
                ..Default::default()
            },
        )
        .await?;
        let amocrm = AmoSim::start(
            loopback(cfg.amocrm_port),
            AmoSimConfig {
                seed: cfg.seed,
                seed_indices: a,
                variant: 2,
                rps: AMOCRM_RPS * scale,
                ..Default::default()
            },
        )
        .await?;
        Ok(SimCluster {
            rally,
            marketo,
            amocrm,
            limit_scale: scale,
        })
    }

    /// Writes the simulators' credentials as secret files into `dir` and returns a
    /// complete crmbridge config (TOML) that syncs all three both ways, with its store in
    /// `dir`. `listen` is the metrics address (`None` switches the endpoint off).
    pub fn sync_config(
        &self,
        dir: &std::path::Path,
        poll_interval: &str,
        listen: Option<SocketAddr>,
    ) -> std::io::Result<String> {
        let secret = |name: &str, value: &str| -> std::io::Result<String> {
            let path = dir.join(name);
            std::fs::write(&path, value)?;
            Ok(path.display().to_string())
        };
        let rally_key = secret("rally_api_key", "rally-test-key")?;
        let mk_id = secret("marketo_client_id", "marketo-client")?;
        let mk_secret = secret("marketo_client_secret", "marketo-secret")?;
        let amo_token = secret("amocrm_token", "amo-long-lived-token")?;
        // At the real limits the connectors' defaults are right: nothing to write.
        let scaled = |text: String| {
            if self.limit_scale > 1 {
                text
            } else {
                String::new()
            }
        };
        let listen = match listen {
            Some(a) => format!("listen = \"{a}\""),
            None => "listen = false".to_string(),
        };
        Ok(format!(
            r#"# Generated for the built-in simulators.
match_keys = ["domain", "externalCompanyId"]

[store]
path = "{store}"

[daemon]
{listen}

[connectors.rally]
kind = "rally"
base_url = "{rally}"
api_key = {{ file = "{rally_key}" }}
poll_interval = "{poll}"{rally_limits}

[connectors.marketo]
kind = "marketo"
base_url = "{marketo}"
client_id = {{ file = "{mk_id}" }}
client_secret = {{ file = "{mk_secret}" }}
poll_interval = "{poll}"
limits = {{ {mk_window}daily_quota = {mk_quota}, daily_share = 0.5 }}

[connectors.amocrm]
kind = "amocrm"
base_url = "{amocrm}"
poll_interval = "{poll}"{amo_limits}

[connectors.amocrm.auth]
type = "long_lived"
token = {{ file = "{amo_token}" }}

[[flows]]
between = ["rally", "marketo", "amocrm"]
"#,
            store = dir.join("crmbridge.redb").display(),
            rally = self.rally.base_url(),
            marketo = self.marketo.base_url(),
            amocrm = self.amocrm.base_url(),
            poll = poll_interval,
            mk_quota = SIM_MARKETO_DAILY_QUOTA,
            rally_limits = scaled(format!(
                "\nlimits = {{ requests_per_second = {} }}",
                RALLY_RPS * self.limit_scale
            )),
            mk_window = scaled(format!(
                "requests_per_window = {{ requests = {MARKETO_CALLS}, window = \"{}ms\" }}, ",
                (MARKETO_WINDOW / self.limit_scale).as_millis()
            )),
            amo_limits = scaled(format!(
                "\nlimits = {{ requests_per_second = {} }}",
                AMOCRM_RPS * self.limit_scale
            )),
        ))
    }

    /// Stops all three.
    pub async fn shutdown(self) {
        self.rally.shutdown().await;
        self.marketo.shutdown().await;
        self.amocrm.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn generated_sync_config_is_valid() {
        let cluster = SimCluster::start(&ClusterConfig {
            companies: 5,
            ..Default::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let text = cluster.sync_config(dir.path(), "2s", None).unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let cfg = crate::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.connectors.len(), 3);
        assert_eq!(cfg.targets_of("rally"), vec!["amocrm", "marketo"]);
        cluster.shutdown().await;
    }

    #[tokio::test]
    async fn a_scaled_cluster_and_its_config_share_the_scaled_limits() {
        let cluster = SimCluster::start(&ClusterConfig {
            companies: 5,
            limit_scale: 10,
            ..Default::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, cluster.sync_config(dir.path(), "2s", None).unwrap()).unwrap();
        let cfg = crate::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let limits = |name: &str| cfg.connectors[name].common().limits;
        assert_eq!(limits("rally").requests_per_second, Some(100.0));
        assert_eq!(limits("amocrm").requests_per_second, Some(70.0));
        assert_eq!(
            limits("marketo").requests_per_window,
            Some((100, std::time::Duration::from_secs(2)))
        );
        cluster.shutdown().await;
    }

    #[test]
    fn every_company_is_somewhere_and_many_overlap() {
        let [r, m, a] = overlapping_indices(100);
        for i in 0..100 {
            assert!(
                r.contains(&i) || m.contains(&i) || a.contains(&i),
                "{i} nowhere"
            );
        }
        let both = r.iter().filter(|i| m.contains(i)).count();
        assert!(both > 0, "rally and marketo share nothing");
    }
}
