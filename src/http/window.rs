//! The call log that keeps every vendor window within its limit whatever the network
//! delay: a call holds one of the window's `calls` slots from the instant it is admitted
//! until one window after the vendor can last have counted it.
//!
//! A vendor counts a call at some instant `c` between our admission `s` (nothing is
//! written before it) and the answer `r` (nothing is answered before it is counted).
//! A slot is freed at `min(r, s + delay) + W`, where `delay` is the longest a request is
//! assumed to take to reach the vendor when its answer comes later still. Take `calls + 1`
//! calls the vendor counted within one window `[t, t + W)` and let `j` be the one admitted
//! last: at `s_j` every other one was already admitted, and each had its slot until at
//! least `c_i + W > c_j ≥ s_j` (if `c_i ≤ s_i + delay`, which always holds when the answer
//! came back within `delay`). So all `calls` slots were taken when `j` was admitted — a
//! contradiction. Hence no window holds more than `calls`, for any delay of a call whose
//! answer arrives within `delay` of its admission, and for any *difference* of delays
//! under `delay` otherwise (the guarantee a plain spacing margin gives).
//!
//! The cost: each slot is held for the call's round trip (capped at `delay`) on top of
//! the window, so `calls` calls take `W + min(round trip, delay)` — about 99 % of the
//! limit on a fast link, and never less than `1 / (1 + delay/W)` of it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A slot: the call's admission and, once its answer (or failure) is in, when it frees.
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u64,
    admitted: Instant,
    frees_at: Option<Instant>,
}

impl Slot {
    /// When the slot frees at the latest: its answer's time if in, else as if the answer
    /// came now or later (a call in flight for longer than `delay` frees `delay + window`
    /// after admission, answered or not).
    fn latest_free(&self, delay: Duration, window: Duration) -> Instant {
        self.frees_at.unwrap_or(self.admitted + delay + window)
    }
}

#[derive(Debug)]
struct State {
    slots: VecDeque<Slot>,
    next_id: u64,
    delay: Duration,
}

/// At most `calls` calls in any vendor window of `window`, counted wherever between
/// admission and answer the vendor counts them.
#[derive(Debug)]
pub struct CallWindow {
    calls: usize,
    window: Duration,
    state: Mutex<State>,
    freed: Notify,
}

/// A call's hold on a slot of a [`CallWindow`]; dropping it (when the answer, a failure
/// or a cancellation ends the attempt) starts the slot's last window.
#[derive(Debug)]
pub struct WindowSlot {
    log: Arc<CallWindow>,
    id: u64,
}

impl CallWindow {
    /// A log of `calls` slots per `window`, assuming calls reach the vendor within `delay`
    /// when their answers take longer.
    pub fn new(calls: usize, window: Duration, delay: Duration) -> Arc<Self> {
        Arc::new(CallWindow {
            calls: calls.max(1),
            window,
            state: Mutex::new(State {
                slots: VecDeque::new(),
                next_id: 0,
                delay,
            }),
            freed: Notify::new(),
        })
    }

    /// The assumed delay to the vendor changed (adaptive pacing widened or narrowed it).
    /// Slots already freeing keep their time; calls in flight use the new delay.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// The assumed delay in force.
    pub fn delay(&self) -> Duration {
        self.lock().delay
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a free slot and takes it; the call must be sent right after.
    pub async fn admit(self: &Arc<Self>) -> WindowSlot {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a slot freed in between still wakes us.
            freed.as_mut().enable();
            let wake_at = {
                let mut s = self.lock();
                let now = Instant::now();
                let delay = s.delay;
                s.slots
                    .retain(|slot| slot.latest_free(delay, self.window) > now);
                if s.slots.len() < self.calls {
                    let id = s.next_id;
                    s.next_id += 1;
                    s.slots.push_back(Slot {
                        id,
                        admitted: now,
                        frees_at: None,
                    });
                    return WindowSlot {
                        log: self.clone(),
                        id,
                    };
                }
                // A call in flight frees at the latest `delay + window` after admission;
                // its answer (a notification) may free it sooner.
                s.slots
                    .iter()
                    .map(|slot| slot.latest_free(delay, self.window))
                    .min()
                    .expect("the log is full, so not empty")
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = &mut freed => {}
            }
        }
    }

    /// Calls holding a slot now (in flight or within their last window).
    #[cfg(test)]
    fn held(&self) -> usize {
        let now = Instant::now();
        let s = self.lock();
        s.slots
            .iter()
            .filter(|slot| slot.latest_free(s.delay, self.window) > now)
            .count()
    }
}

impl Drop for WindowSlot {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut s = self.log.lock();
        let delay = s.delay;
        if let Some(slot) = s.slots.iter_mut().find(|slot| slot.id == self.id) {
            slot.frees_at = Some(now.min(slot.admitted + delay) + self.log.window);
        }
        drop(s);
        self.log.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random sequence (xorshift), so failures replay.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Most instants of `times` (sorted) within any half-open window of `w`.
    fn most_in_a_window(times: &[Instant], w: Duration) -> usize {
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| t.duration_since(times[i]) < w)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// `tasks` tasks make `per_task` calls each; a call's round trip is random up to
    /// `max_trip` and the vendor counts it at a random instant of it, capped at `delay`
    /// after admission. Returns the sorted count instants and the run's length.
    async fn run(
        calls: usize,
        window: Duration,
        delay: Duration,
        tasks: usize,
        per_task: usize,
        max_trip: Duration,
        seed: u64,
    ) -> (Vec<Instant>, Duration) {
        let log = CallWindow::new(calls, window, delay);
        let counted = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let log = log.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(t as u64) | 1);
                    for _ in 0..per_task {
                        let slot = log.admit().await;
                        let admitted = Instant::now();
                        let trip_us = rng.below(max_trip.as_micros() as u64 + 1);
                        let trip = Duration::from_micros(trip_us);
                        let count_at = Duration::from_micros(rng.below(trip_us + 1)).min(delay);
                        counted.lock().unwrap().push(admitted + count_at);
                        tokio::time::sleep(trip).await;
                        drop(slot);
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        let elapsed = start.elapsed();
        let mut times = counted.lock().unwrap().clone();
        times.sort();
        (times, elapsed)
    }

    #[tokio::test(start_paused = true)]
    async fn no_vendor_window_ever_holds_more_than_the_limit() {
        for seed in 1..40u64 {
            let mut rng = Rng(seed * 7919);
            let calls = 1 + rng.below(12) as usize;
            let window = Duration::from_millis(200 + rng.below(2000));
            let delay = window.mul_f64(0.1);
            let tasks = 1 + rng.below(6) as usize;
            let max_trip = Duration::from_millis(rng.below(600));
            let (times, _) = run(calls, window, delay, tasks, 30, max_trip, seed).await;
            let most = most_in_a_window(&times, window);
            assert!(
                most <= calls,
                "seed {seed}: {most} calls counted within {window:?} (limit {calls}, \
                 {tasks} tasks, round trips up to {max_trip:?})"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fast_answers_use_nearly_the_whole_limit() {
        // 10 per second, answers in 5 ms, one call at a time (a paging reader).
        let (times, elapsed) = run(
            10,
            Duration::from_secs(1),
            Duration::from_millis(100),
            1,
            200,
            Duration::from_millis(5),
            3,
        )
        .await;
        assert_eq!(times.len(), 200);
        let rate = 200.0 / elapsed.as_secs_f64();
        assert!(rate >= 9.8, "{rate:.2} calls/s of 10");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_answers_cost_at_most_the_assumed_delay_per_window() {
        // 7 per second, answers in up to 2 s, twenty at a time: a slot is held for at
        // most 1 s + 100 ms, so at least 7 / 1.1 calls per second get through.
        let (times, elapsed) = run(
            7,
            Duration::from_secs(1),
            Duration::from_millis(100),
            20,
            10,
            Duration::from_secs(2),
            5,
        )
        .await;
        assert_eq!(times.len(), 200);
        // The last calls' round trips come after their admission: leave 2 s for them.
        let rate = 200.0 / (elapsed.as_secs_f64() - 2.0);
        assert!(rate >= 7.0 / 1.1, "{rate:.2} calls/s");
        assert!(most_in_a_window(&times, Duration::from_secs(1)) <= 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_call_frees_its_slot_like_an_answered_one() {
        let log = CallWindow::new(1, Duration::from_secs(1), Duration::from_millis(100));
        let first = log.admit().await;
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(first);
        let _second = log.admit().await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(1030));
        assert_eq!(log.held(), 1);
    }
}
