//! The daily call budget: which "day" a vendor counts calls in (UTC, or US Central time
//! for Marketo), when that day ends, and the ledger that remembers how many calls we made.
//! The US daylight-saving rules are computed here on purpose: no time-zone database crate
//! is needed for the one zone we care about.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveDate, TimeZone, Utc, Weekday};

/// When a vendor's daily quota starts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuotaReset {
    /// Midnight UTC.
    #[default]
    UtcMidnight,
    /// Midnight in America/Chicago (Marketo): UTC−6, or UTC−5 while US daylight saving
    /// time is in effect (second Sunday of March 02:00 → first Sunday of November 02:00,
    /// local time; the rules in force since 2007).
    UsCentralMidnight,
}

impl QuotaReset {
    /// The key of the quota day `now` falls in, as `YYYY-MM-DD` of the vendor's calendar.
    pub fn day_key(self, now: DateTime<Utc>) -> String {
        self.local_date(now).format("%Y-%m-%d").to_string()
    }

    /// The vendor's calendar date at `now`.
    pub fn local_date(self, now: DateTime<Utc>) -> NaiveDate {
        match self {
            QuotaReset::UtcMidnight => now.date_naive(),
            QuotaReset::UsCentralMidnight => (now + us_central_offset(now)).date_naive(),
        }
    }

    /// The first instant after `now` at which the quota starts over.
    pub fn next_reset(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let tomorrow = self
            .local_date(now)
            .succ_opt()
            .expect("date within chrono's range");
        let midnight = tomorrow.and_hms_opt(0, 0, 0).expect("midnight exists");
        match self {
            QuotaReset::UtcMidnight => Utc.from_utc_datetime(&midnight),
            QuotaReset::UsCentralMidnight => {
                // Local midnight is never inside a transition (those happen at 02:00), so
                // the offset in force at midnight follows from the date alone.
                let offset_hours = if central_dst_at_local_midnight(tomorrow) {
                    5
                } else {
                    6
                };
                Utc.from_utc_datetime(&(midnight + ChronoDuration::hours(offset_hours)))
            }
        }
    }
}

/// The n-th (1-based) given weekday of a month.
fn nth_weekday(year: i32, month: u32, weekday: Weekday, n: u32) -> NaiveDate {
    NaiveDate::from_weekday_of_month_opt(year, month, weekday, n as u8)
        .expect("every month has a first and second Sunday")
}

/// The UTC instants at which US Central daylight time starts and ends in `year`.
/// Start: second Sunday of March, 02:00 CST = 08:00 UTC. End: first Sunday of November,
/// 02:00 CDT = 07:00 UTC.
fn central_dst_bounds(year: i32) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = nth_weekday(year, 3, Weekday::Sun, 2)
        .and_hms_opt(8, 0, 0)
        .expect("valid time");
    let end = nth_weekday(year, 11, Weekday::Sun, 1)
        .and_hms_opt(7, 0, 0)
        .expect("valid time");
    (Utc.from_utc_datetime(&start), Utc.from_utc_datetime(&end))
}

/// America/Chicago's offset from UTC at `now` (negative: −5 h or −6 h).
pub fn us_central_offset(now: DateTime<Utc>) -> ChronoDuration {
    let (start, end) = central_dst_bounds(now.year());
    if now >= start && now < end {
        ChronoDuration::hours(-5)
    } else {
        ChronoDuration::hours(-6)
    }
}

/// Whether daylight time is in effect at 00:00 local time on `date` in America/Chicago.
fn central_dst_at_local_midnight(date: NaiveDate) -> bool {
    let start = nth_weekday(date.year(), 3, Weekday::Sun, 2);
    let end = nth_weekday(date.year(), 11, Weekday::Sun, 1);
    // At midnight of the start Sunday it is still standard time; at midnight of the end
    // Sunday it is still daylight time.
    date > start && date <= end
}

/// Where the daily call count lives. The store implements it durably so that a restart
/// does not forget calls already spent today; [`MemoryQuotaLedger`] serves tests.
///
/// Both methods are called on the request path, once per attempt, under a lock that makes
/// "check, then count" atomic within the daemon: keep them quick and non-blocking-ish
/// (a small redb write is fine at vendor rates of a few calls per second).
pub trait QuotaLedger: Send + Sync {
    /// Calls counted so far under `day` (a [`QuotaReset::day_key`]).
    fn used(&self, day: &str) -> u64;
    /// Counts `n` more calls under `day` and returns the new total.
    fn add(&self, day: &str, n: u64) -> u64;
}

/// An in-memory [`QuotaLedger`], for tests and for connectors without a store.
#[derive(Debug, Default)]
pub struct MemoryQuotaLedger {
    days: Mutex<HashMap<String, u64>>,
}

impl MemoryQuotaLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }
}

impl QuotaLedger for MemoryQuotaLedger {
    fn used(&self, day: &str) -> u64 {
        let days = self.days.lock().unwrap_or_else(|e| e.into_inner());
        days.get(day).copied().unwrap_or(0)
    }

    fn add(&self, day: &str, n: u64) -> u64 {
        let mut days = self.days.lock().unwrap_or_else(|e| e.into_inner());
        let v = days.entry(day.to_string()).or_insert(0);
        *v += n;
        *v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn utc_day_key_and_reset_follow_utc_midnight() {
        let now = utc("2025-06-30T23:59:59Z");
        assert_eq!(QuotaReset::UtcMidnight.day_key(now), "2025-06-30");
        assert_eq!(
            QuotaReset::UtcMidnight.next_reset(now),
            utc("2025-07-01T00:00:00Z")
        );
    }

    #[test]
    fn central_winter_day_is_utc_minus_six() {
        // 05:59 UTC on 15 Jan = 23:59 CST on 14 Jan.
        let r = QuotaReset::UsCentralMidnight;
        assert_eq!(r.day_key(utc("2025-01-15T05:59:00Z")), "2025-01-14");
        assert_eq!(r.day_key(utc("2025-01-15T06:00:00Z")), "2025-01-15");
        assert_eq!(
            r.next_reset(utc("2025-01-15T05:59:00Z")),
            utc("2025-01-15T06:00:00Z")
        );
    }

    #[test]
    fn central_summer_day_is_utc_minus_five() {
        let r = QuotaReset::UsCentralMidnight;
        assert_eq!(r.day_key(utc("2025-07-04T04:59:00Z")), "2025-07-03");
        assert_eq!(r.day_key(utc("2025-07-04T05:00:00Z")), "2025-07-04");
        assert_eq!(
            r.next_reset(utc("2025-07-04T12:00:00Z")),
            utc("2025-07-05T05:00:00Z")
        );
    }

    #[test]
    fn central_dst_starts_second_sunday_of_march_at_two() {
        // 2025: second Sunday of March is the 9th. 02:00 CST = 08:00 UTC.
        assert_eq!(
            us_central_offset(utc("2025-03-09T07:59:59Z")),
            ChronoDuration::hours(-6)
        );
        assert_eq!(
            us_central_offset(utc("2025-03-09T08:00:00Z")),
            ChronoDuration::hours(-5)
        );
        let r = QuotaReset::UsCentralMidnight;
        // The day of the switch began at 00:00 CST (06:00 UTC) and is only 23 hours long:
        // it ends at 00:00 CDT on the 10th = 05:00 UTC.
        assert_eq!(r.day_key(utc("2025-03-09T06:00:00Z")), "2025-03-09");
        assert_eq!(r.day_key(utc("2025-03-09T05:59:59Z")), "2025-03-08");
        assert_eq!(
            r.next_reset(utc("2025-03-09T12:00:00Z")),
            utc("2025-03-10T05:00:00Z")
        );
        // The day before the switch ends at 00:00 CST on the 9th.
        assert_eq!(
            r.next_reset(utc("2025-03-08T12:00:00Z")),
            utc("2025-03-09T06:00:00Z")
        );
    }

    #[test]
    fn central_dst_ends_first_sunday_of_november_at_two() {
        // 2025: first Sunday of November is the 2nd. 02:00 CDT = 07:00 UTC.
        assert_eq!(
            us_central_offset(utc("2025-11-02T06:59:59Z")),
            ChronoDuration::hours(-5)
        );
        assert_eq!(
            us_central_offset(utc("2025-11-02T07:00:00Z")),
            ChronoDuration::hours(-6)
        );
        let r = QuotaReset::UsCentralMidnight;
        // The switch day began at 00:00 CDT (05:00 UTC) and is 25 hours long: it ends at
        // 00:00 CST on the 3rd = 06:00 UTC.
        assert_eq!(r.day_key(utc("2025-11-02T05:00:00Z")), "2025-11-02");
        assert_eq!(r.day_key(utc("2025-11-03T05:59:59Z")), "2025-11-02");
        assert_eq!(
            r.next_reset(utc("2025-11-02T05:00:00Z")),
            utc("2025-11-03T06:00:00Z")
        );
        // The day before the switch ends at 00:00 CDT on the 2nd.
        assert_eq!(
            r.next_reset(utc("2025-11-01T12:00:00Z")),
            utc("2025-11-02T05:00:00Z")
        );
    }

    #[test]
    fn central_dst_dates_move_with_the_calendar() {
        // 2026: second Sunday of March is the 8th; first Sunday of November is the 1st.
        assert_eq!(
            us_central_offset(utc("2026-03-08T08:00:00Z")),
            ChronoDuration::hours(-5)
        );
        assert_eq!(
            us_central_offset(utc("2026-11-01T07:00:00Z")),
            ChronoDuration::hours(-6)
        );
        assert_eq!(
            us_central_offset(utc("2026-10-31T12:00:00Z")),
            ChronoDuration::hours(-5)
        );
    }

    #[test]
    fn memory_ledger_counts_per_day() {
        let l = MemoryQuotaLedger::new();
        assert_eq!(l.add("2025-01-01", 2), 2);
        assert_eq!(l.add("2025-01-01", 1), 3);
        assert_eq!(l.used("2025-01-01"), 3);
        assert_eq!(l.used("2025-01-02"), 0);
    }
}
