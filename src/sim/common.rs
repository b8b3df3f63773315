//! Pieces every CRM simulator shares: fault injection, vendor-style rate windows, request
//! statistics, and the deterministic company data the simulators are seeded with.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Which faults a simulator injects, as probabilities per request (0.0 ..= 1.0).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultConfig {
    /// Probability of answering 500 or 503 (chosen at random).
    pub server_error: f64,
    /// Probability of answering only after `slow_by` (past a client's timeout).
    pub slow: f64,
    /// How long a slow answer takes.
    pub slow_by: Duration,
    /// Probability of a 200 whose body is truncated, invalid JSON.
    pub malformed: f64,
    /// Probability of closing the connection mid-response.
    pub drop_connection: f64,
    /// Latency added to every answer.
    pub extra_latency: Duration,
    /// Probability of the vendor's throttling answer although the caller kept to the
    /// limits (Rally and amoCRM: 429; Marketo: 606 or 615), as real APIs do when a
    /// limit is shared with other clients. Counted as a fault, not a limit rejection, and
    /// never towards amoCRM's ban.
    #[serde(default)]
    pub throttle: f64,
}

/// One fault picked for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this 5xx status.
    ServerError(u16),
    /// Sleep this long before answering normally.
    Slow(Duration),
    /// Answer 200 with broken JSON.
    Malformed,
    /// Close the connection mid-response.
    DropConnection,
    /// Answer the vendor's throttling response (the request is not carried out).
    Throttled,
}

/// Thread-safe fault picker with its own seeded random source.
#[derive(Debug)]
pub struct Faults {
    config: Mutex<FaultConfig>,
    rng: Mutex<StdRng>,
}

impl Faults {
    /// A picker that injects nothing until configured.
    pub fn new(seed: u64) -> Self {
        Faults {
            config: Mutex::new(FaultConfig::default()),
            rng: Mutex::new(StdRng::seed_from_u64(seed ^ 0xfa17)),
        }
    }

    /// Replaces the fault configuration.
    pub fn set(&self, config: FaultConfig) {
        *self.config.lock().unwrap() = config;
    }

    /// The current configuration.
    pub fn get(&self) -> FaultConfig {
        self.config.lock().unwrap().clone()
    }

    /// Picks the fault for one request, if any.
    pub fn pick(&self) -> Option<Fault> {
        let c = self.config.lock().unwrap().clone();
        let mut rng = self.rng.lock().unwrap();
        let roll: f64 = rng.random();
        let mut edge = c.server_error;
        if roll < edge {
            return Some(Fault::ServerError(if rng.random_bool(0.5) {
                500
            } else {
                503
            }));
        }
        edge += c.slow;
        if roll < edge {
            return Some(Fault::Slow(c.slow_by));
        }
        edge += c.malformed;
        if roll < edge {
            return Some(Fault::Malformed);
        }
        edge += c.drop_connection;
        if roll < edge {
            return Some(Fault::DropConnection);
        }
        edge += c.throttle;
        if roll < edge {
            return Some(Fault::Throttled);
        }
        None
    }

    /// Latency added to every answer.
    pub fn extra_latency(&self) -> Duration {
        self.config.lock().unwrap().extra_latency
    }
}

/// A rolling window that admits at most `limit` events per `window`, as vendors count
/// (Marketo: 100 calls per rolling 20 s; Rally and amoCRM: per second).
#[derive(Debug)]
pub struct RollingWindow {
    limit: usize,
    window: Duration,
    events: Mutex<VecDeque<Instant>>,
}

impl RollingWindow {
    /// A window admitting `limit` events per `window`; `limit == 0` admits everything.
    pub fn new(limit: usize, window: Duration) -> Self {
        RollingWindow {
            limit,
            window,
            events: Mutex::new(VecDeque::new()),
        }
    }

    /// Records an event now if the window has room; false when it would exceed the limit
    /// (the event is then not recorded).
    pub fn try_admit(&self) -> bool {
        if self.limit == 0 {
            return true;
        }
        let now = Instant::now();
        let mut ev = self.events.lock().unwrap();
        while ev
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            ev.pop_front();
        }
        if ev.len() >= self.limit {
            return false;
        }
        ev.push_back(now);
        true
    }

    /// Time until the oldest event in the window leaves it (a fair `Retry-After`).
    pub fn retry_after(&self) -> Duration {
        let ev = self.events.lock().unwrap();
        ev.front()
            .map(|t| self.window.saturating_sub(t.elapsed()))
            .unwrap_or_default()
    }
}

/// What a simulator counts, for tests, the demo and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    requests: Mutex<BTreeMap<String, u64>>,
    rejections: Mutex<BTreeMap<String, u64>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    faults: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatsSnapshot {
    /// Requests per endpoint (`"GET /api/v1/companies"`), limit rejections included.
    pub requests: BTreeMap<String, u64>,
    /// Limit rejections per kind (`"429"`, `"606"`, `"615"`, `"607"`, `"403-ban"`).
    pub rejections: BTreeMap<String, u64>,
    /// Highest number of requests in flight at once.
    pub max_in_flight: usize,
    /// Injected faults.
    pub faults: u64,
}

impl StatsSnapshot {
    /// Total requests across endpoints.
    pub fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }

    /// Total limit rejections.
    pub fn total_rejections(&self) -> u64 {
        self.rejections.values().sum()
    }
}

impl Stats {
    /// Counts a request to `endpoint`.
    pub fn request(&self, endpoint: &str) {
        *self
            .requests
            .lock()
            .unwrap()
            .entry(endpoint.to_string())
            .or_default() += 1;
    }

    /// Counts a limit rejection of `kind`.
    pub fn rejection(&self, kind: &str) {
        *self
            .rejections
            .lock()
            .unwrap()
            .entry(kind.to_string())
            .or_default() += 1;
    }

    /// Counts an injected fault.
    pub fn fault(&self) {
        self.faults.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks a request in flight until the guard drops; returns the guard and the number
    /// in flight including this one (for concurrency limits such as Marketo's 10).
    pub fn enter(&self) -> (InFlight<'_>, usize) {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        (InFlight(self), now)
    }

    /// A snapshot of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.lock().unwrap().clone(),
            rejections: self.rejections.lock().unwrap().clone(),
            max_in_flight: self.max_in_flight.load(Ordering::SeqCst),
            faults: self.faults.load(Ordering::Relaxed),
        }
    }

    /// Faults injected so far (cheap, unlike a snapshot).
    pub fn fault_count(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Clears every counter.
    pub fn reset(&self) {
        self.requests.lock().unwrap().clear();
        self.rejections.lock().unwrap().clear();
        self.max_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
        self.faults.store(0, Ordering::Relaxed);
    }
}

/// Guard of one request in flight.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Stats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One company of the shared seed universe, before a CRM's own ids and quirks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedCompany {
    /// Position in the universe; the same index means the same real company in every CRM.
    pub index: usize,
    /// Company name (some with non-ASCII letters).
    pub name: String,
    /// Unique domain, e.g. `acme-42.com`.
    pub domain: String,
    /// Industry.
    pub industry: String,
    /// Employee count.
    pub employee_count: i64,
    /// Annual revenue, exact.
    pub annual_revenue: Decimal,
    /// Phone number.
    pub phone: String,
    /// City.
    pub city: String,
    /// Country (ISO code).
    pub country: String,
    /// Tags.
    pub tags: Vec<String>,
}

const NAME_A: &[&str] = &[
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Stark",
    "Wayne",
    "Hooli",
    "Vandelay",
    "Soylent",
    "Tyrell",
    "Wonka",
    "Cyberdyne",
    "Müller",
    "Ørsted",
    "Société",
    "Nakatomi",
    "Zürich",
    "Łódź",
    "São Paulo",
    "Kraków",
];
const NAME_B: &[&str] = &[
    "Industries",
    "Labs",
    "Systems",
    "GmbH",
    "Logistics",
    "Foods",
    "Analytics",
    "Holdings",
    "Robotics",
    "Partners",
    "Textiles",
    "Energy",
    "Générale",
    "Bank",
    "Media",
];
const INDUSTRIES: &[&str] = &[
    "Technology",
    "Manufacturing",
    "Retail",
    "Finance",
    "Healthcare",
    "Energy",
    "Education",
    "Logistics",
    "Media",
    "Hospitality",
];
const CITIES: &[(&str, &str)] = &[
    ("San Francisco", "US"),
    ("New York", "US"),
    ("Berlin", "DE"),
    ("München", "DE"),
    ("Paris", "FR"),
    ("London", "GB"),
    ("Tokyo", "JP"),
    ("São Paulo", "BR"),
    ("Warszawa", "PL"),
    ("Toronto", "CA"),
];
const TAGS: &[&str] = &[
    "enterprise",
    "smb",
    "partner",
    "churn-risk",
    "vip",
    "trial",
    "emea",
    "apac",
    "amer",
];

/// The first `n` companies of the universe for `seed`: the same seed always gives the
/// same companies, with unique domains.
pub fn seed_companies(seed: u64, n: usize) -> Vec<SeedCompany> {
    (0..n).map(|i| seed_company(seed, i)).collect()
}

/// Company `index` of the universe for `seed`.
pub fn seed_company(seed: u64, index: usize) -> SeedCompany {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index as u64);
    let a = NAME_A[rng.random_range(0..NAME_A.len())];
    let b = NAME_B[rng.random_range(0..NAME_B.len())];
    let (city, country) = CITIES[rng.random_range(0..CITIES.len())];
    let cents: i64 = rng.random_range(0..100_000_000_000i64);
    let ntags = rng.random_range(0..3);
    let mut tags: Vec<String> = (0..ntags)
        .map(|_| TAGS[rng.random_range(0..TAGS.len())].to_string())
        .collect();
    tags.sort();
    tags.dedup();
    let slug: String = a
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_lowercase();
    let slug = if slug.is_empty() { "co".into() } else { slug };
    SeedCompany {
        index,
        name: format!("{a} {b} {index}"),
        domain: format!("{slug}-{index}.example.com"),
        industry: INDUSTRIES[rng.random_range(0..INDUSTRIES.len())].to_string(),
        employee_count: rng.random_range(1..50_000),
        annual_revenue: Decimal::new(cents, 2),
        phone: format!("+1-555-{:04}", rng.random_range(0..10_000)),
        city: city.to_string(),
        country: country.to_string(),
        tags,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeding_is_deterministic_and_domains_are_unique() {
        let a = seed_companies(7, 2000);
        let b = seed_companies(7, 2000);
        assert_eq!(a, b);
        let mut domains: Vec<_> = a.iter().map(|c| c.domain.clone()).collect();
        domains.sort();
        domains.dedup();
        assert_eq!(domains.len(), 2000);
    }

    #[test]
    fn rolling_window_admits_limit_then_refuses() {
        let w = RollingWindow::new(3, Duration::from_secs(60));
        assert!(w.try_admit() && w.try_admit() && w.try_admit());
        assert!(!w.try_admit());
        assert!(w.retry_after() > Duration::from_secs(50));
    }
}
