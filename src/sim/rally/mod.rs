//! A wire-faithful simulator of Rally CRM's Companies API (`/api/v1/companies`), for tests,
//! the demo and benchmarks. It listens on loopback only and never persists anything.
//!
//! What it does where Rally's page is silent (see `rally-notes.md`):
//! - Lists are ordered by `createdAt`, then `id` — not by `updatedAt` — and answer a bare
//!   array. Offset paging over a set that changes between pages skips or repeats rows.
//! - `limit` defaults to 25; larger than `max_page` is cut down silently.
//! - `updatedSince` is inclusive (`>=`); RFC 3339 with `Z`, an offset or none (= UTC).
//! - `fields` projects each row; unknown names are ignored and `id` always comes back.
//! - `PUT /{id}` and a matched upsert change only the keys sent; `null` clears a field.
//! - Domains match case-insensitively; a create or update that would duplicate one is 409.
//! - Every write gets an `updatedAt` strictly after the previous write, except that all
//!   records of one bulk call share one timestamp. Seeded companies were "bulk imported":
//!   [`store::SEED_IMPORT_BATCH`] of them share each `updatedAt`, more than a page holds.
//! - Faults that damage an answer (malformed body, dropped connection) do so after the
//!   request was processed: the write happened, only its answer is lost.

mod server;
pub mod store;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::sim::common::{Faults, StatsSnapshot, seed_company};
use server::Shared;
use store::{Patch, Store};

pub use server::{BULK_MAX, DEFAULT_LIMIT};
pub use store::TENANT_ID;

/// How a [`RallySim`] is set up.
#[derive(Debug, Clone)]
pub struct RallySimConfig {
    /// Seed of the company universe, the ids and the mutator.
    pub seed: u64,
    /// Which companies of the universe ([`seed_company`] indices) exist at start.
    pub seed_indices: Vec<usize>,
    /// The key `X-Api-Key` must carry.
    pub api_key: String,
    /// Requests admitted per rolling second; `0` = unlimited.
    pub rate_limit_rps: u32,
    /// Largest page a list answers.
    pub max_page: usize,
    /// Perturbs seeded values slightly (0 = as seeded), so the same company looks a
    /// little different in different CRMs; see [`store::seed_record`].
    pub variant: u8,
}

impl Default for RallySimConfig {
    fn default() -> Self {
        RallySimConfig {
            seed: 1,
            seed_indices: (0..100).collect(),
            api_key: "rally-test-key".into(),
            rate_limit_rps: 10,
            max_page: 100,
            variant: 0,
        }
    }
}

/// One change made behind the API's back (by [`RallySim::mutate_random`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// A company with this id was created.
    Created(String),
    /// The company with this id was updated.
    Updated(String),
    /// The company with this id was deleted.
    Deleted(String),
}

/// A running Rally simulator. Dropping it stops the server without waiting.
#[derive(Debug)]
pub struct RallySim {
    shared: Arc<Shared>,
    addr: SocketAddr,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl RallySim {
    /// Seeds the table, binds `addr` (port 0 picks a free port) and starts serving.
    pub async fn start(addr: SocketAddr, cfg: RallySimConfig) -> std::io::Result<RallySim> {
        let mut table = Store::new(cfg.seed);
        for &i in &cfg.seed_indices {
            table.insert_seed(cfg.seed, &seed_company(cfg.seed, i), cfg.variant);
        }
        let shared = Arc::new(Shared {
            api_key: cfg.api_key,
            max_page: cfg.max_page.max(1),
            store: Mutex::new(table),
            faults: Faults::new(cfg.seed),
            stats: Default::default(),
            limiter: Mutex::new(server::limiter(cfg.rate_limit_rps)),
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let app = server::router(shared.clone());
        let stop = cancel.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::warn!(error = %e, "rally simulator stopped with an error");
            }
        });
        Ok(RallySim {
            shared,
            addr,
            cancel,
            task: Some(task),
        })
    }

    /// Where the simulator listens, e.g. `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The fault injector; configure it with [`Faults::set`].
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Request counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Clears the request counters.
    pub fn reset_stats(&self) {
        self.shared.stats.reset();
    }

    /// Changes the requests-per-second limit (`0` = unlimited), starting a fresh window.
    pub fn set_rate_limit(&self, rps: u32) {
        *self.shared.limiter.lock().unwrap() = server::limiter(rps);
    }

    /// Number of live companies; cheap, unlike `dump().len()`, which renders every record.
    pub fn company_count(&self) -> usize {
        self.shared.store.lock().unwrap().len()
    }

    /// Every live company as wire JSON, sorted by id.
    pub fn dump(&self) -> Vec<Value> {
        let store = self.shared.store.lock().unwrap();
        let mut rows: Vec<_> = store.iter().collect();
        rows.sort_by_key(|r| r.id);
        rows.into_iter().map(|r| r.to_json()).collect()
    }

    /// Company `id` as wire JSON.
    pub fn get(&self, id: &str) -> Option<Value> {
        let id = Uuid::parse_str(id).ok()?;
        self.shared
            .store
            .lock()
            .unwrap()
            .get(&id)
            .map(|r| r.to_json())
    }

    /// Creates a company as a user would in Rally's UI; returns its wire JSON.
    ///
    /// # Panics
    /// If `body` is not a valid create request or its domain is taken (the UI refuses).
    pub fn create(&self, body: Value) -> Value {
        let p = Patch::parse(&body, true)
            .unwrap_or_else(|e| panic!("invalid company for the Rally simulator: {e}: {body}"));
        let mut store = self.shared.store.lock().unwrap();
        let at = store.next_write_time();
        match store.create(&p, at) {
            Ok(r) => r.to_json(),
            Err(e) => panic!("the Rally simulator refused {body}: {e}"),
        }
    }

    /// Changes the keys in `patch` of company `id` (bumping `updatedAt`); `None` when there
    /// is no such company.
    ///
    /// # Panics
    /// If `patch` is invalid or would duplicate another company's domain.
    pub fn update(&self, id: &str, patch: Value) -> Option<Value> {
        let id = Uuid::parse_str(id).ok()?;
        let p = Patch::parse(&patch, false)
            .unwrap_or_else(|e| panic!("invalid patch for the Rally simulator: {e}: {patch}"));
        let mut store = self.shared.store.lock().unwrap();
        store.get(&id)?;
        let at = store.next_write_time();
        match store.update(&id, &p, at) {
            Ok(r) => Some(r.to_json()),
            Err(e) => panic!("the Rally simulator refused {patch} for {id}: {e}"),
        }
    }

    /// Deletes company `id`; false when there was none.
    pub fn delete(&self, id: &str) -> bool {
        Uuid::parse_str(id).is_ok_and(|id| self.shared.store.lock().unwrap().delete(&id))
    }

    /// Makes `n` random changes — about 30 % creates (new unique domains), 50 % updates
    /// (name, industry, employee count, tags), 20 % deletes — from the seeded random source.
    pub fn mutate_random(&self, n: usize) -> Vec<Mutation> {
        let mut store = self.shared.store.lock().unwrap();
        (0..n).map(|_| mutate_once(&mut store)).collect()
    }

    /// Mutates in the background, `per_second` changes a second, until the handle is
    /// stopped or dropped.
    ///
    /// # Panics
    /// If `per_second` is not a positive finite number, or outside a Tokio runtime.
    pub fn spawn_mutator(&self, per_second: f64) -> MutatorHandle {
        assert!(
            per_second.is_finite() && per_second > 0.0,
            "mutator rate must be positive, got {per_second}"
        );
        let cancel = CancellationToken::new();
        let count = Arc::new(AtomicU64::new(0));
        let (shared, stop, counter) = (self.shared.clone(), cancel.clone(), count.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        mutate_once(&mut shared.store.lock().unwrap());
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        MutatorHandle {
            cancel,
            count,
            task: Some(task),
        }
    }

    /// Stops serving: in-flight requests get up to 5 s to finish, then are cut off.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for RallySim {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn mutate_once(store: &mut Store) -> Mutation {
    let roll = store.roll();
    let target = if store.is_empty() || roll < 0.3 {
        None
    } else {
        store.random_id()
    };
    let at = store.next_write_time();
    match target {
        None => {
            let body = store.random_new_company();
            let p = Patch::parse(&body, true).expect("generated bodies are valid");
            let id = store
                .create(&p, at)
                .expect("generated domains are unique")
                .id;
            Mutation::Created(id.to_string())
        }
        Some(id) if roll < 0.8 => {
            let body = store.random_patch();
            let p = Patch::parse(&body, false).expect("generated patches are valid");
            store.update(&id, &p, at).expect("the id is live");
            Mutation::Updated(id.to_string())
        }
        Some(id) => {
            store.delete(&id);
            Mutation::Deleted(id.to_string())
        }
    }
}

/// A background mutator started by [`RallySim::spawn_mutator`]; dropping it stops it.
#[derive(Debug)]
pub struct MutatorHandle {
    cancel: CancellationToken,
    count: Arc<AtomicU64>,
    task: Option<JoinHandle<()>>,
}

impl MutatorHandle {
    /// Changes made so far.
    pub fn mutations(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Stops the mutator and waits until it has; returns the number of changes made.
    pub async fn stop(mut self) -> u64 {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            // The task only ends by cancellation; a join error would be a panic inside it.
            let _ = task.await;
        }
        self.mutations()
    }
}

impl Drop for MutatorHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
