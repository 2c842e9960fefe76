//! Store health: up/down flips only after `rise` good or `fall` bad results in a row (active probes), or
//! `fall` failed connects from logins in a row (passive ejection). Each flip is logged once by the caller.
//! No I/O here except [`probe_loop`], which runs the active probe on a timer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::connection::{AskCapa, Connector, KnownCaps};
use super::dns::Endpoint;
use crate::config::StoreTlsMode;

/// One store's health.
#[derive(Debug)]
pub struct HealthState {
    up: AtomicBool,
    good: AtomicU32,
    bad: AtomicU32,
    connect_failures: AtomicU32,
    /// Unix seconds of the last flip (or of the start).
    changed_at: AtomicU64,
    /// Unix seconds of the last active probe (0: none yet).
    probed_at: AtomicU64,
    /// Whether the last active probe succeeded.
    probe_ok: AtomicBool,
}

impl Default for HealthState {
    /// Stores start up: a new store takes traffic at once, and the first probes correct that quickly.
    fn default() -> Self {
        Self {
            up: AtomicBool::new(true),
            good: AtomicU32::new(0),
            bad: AtomicU32::new(0),
            connect_failures: AtomicU32::new(0),
            changed_at: AtomicU64::new(unix_now()),
            probed_at: AtomicU64::new(0),
            probe_ok: AtomicBool::new(false),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl HealthState {
    /// Whether the store takes new sessions.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Unix seconds of the last flip up or down (or of the start).
    pub fn changed_at(&self) -> u64 {
        self.changed_at.load(Ordering::Relaxed)
    }

    /// The last active probe: Unix seconds and whether it succeeded; `None` before the first.
    pub fn last_probe(&self) -> Option<(u64, bool)> {
        match self.probed_at.load(Ordering::Relaxed) {
            0 => None,
            at => Some((at, self.probe_ok.load(Ordering::Relaxed))),
        }
    }

    /// Records an active probe; returns the new state when it flipped.
    pub fn record_probe(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        self.probe_ok.store(ok, Ordering::Relaxed);
        self.probed_at.store(unix_now(), Ordering::Relaxed);
        let flipped = self.probed(ok, rise, fall);
        if flipped.is_some() {
            self.changed_at.store(unix_now(), Ordering::Relaxed);
        }
        flipped
    }

    fn probed(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.bad.store(0, Ordering::Relaxed);
            self.connect_failures.store(0, Ordering::Relaxed);
            let good = self.good.fetch_add(1, Ordering::Relaxed).saturating_add(1);
            (good >= rise && !self.up.swap(true, Ordering::Relaxed)).then_some(true)
        } else {
            self.good.store(0, Ordering::Relaxed);
            let bad = self.bad.fetch_add(1, Ordering::Relaxed).saturating_add(1);
            (bad >= fall && self.up.swap(false, Ordering::Relaxed)).then_some(false)
        }
    }

    /// Records a login's connection attempt; only failures in a row can flip the store down.
    pub fn record_connect(&self, ok: bool, fall: u32) -> Option<bool> {
        if ok {
            self.connect_failures.store(0, Ordering::Relaxed);
            return None;
        }
        let failures = self
            .connect_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures >= fall && self.up.swap(false, Ordering::Relaxed) {
            // Active probes must now see `rise` good results before the store is back.
            self.good.store(0, Ordering::Relaxed);
            self.changed_at.store(unix_now(), Ordering::Relaxed);
            return Some(false);
        }
        None
    }
}

/// Probe settings.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSettings {
    /// Time between probes.
    pub interval: Duration,
    /// One probe's limit.
    pub timeout: Duration,
    /// Good results in a row to come up.
    pub rise: u32,
    /// Bad results in a row to go down.
    pub fall: u32,
}

/// The store a probe loop watches, and how to reach it.
#[derive(Debug)]
pub struct ProbeTarget {
    /// The tenant's connector.
    pub connector: Arc<Connector>,
    /// The store.
    pub endpoint: Endpoint,
    /// TLS on the way there.
    pub mode: StoreTlsMode,
    /// Refreshed by each probe's CAPA.
    pub caps: Arc<KnownCaps>,
}

/// Probes the target every interval until `stop`, reporting flips through `on_change(up, reason)`.
pub async fn probe_loop(
    target: ProbeTarget,
    state: Arc<HealthState>,
    settings: ProbeSettings,
    on_change: impl Fn(bool, &str) + Send,
    stop: CancellationToken,
) {
    let ProbeTarget {
        connector,
        endpoint,
        mode,
        caps,
    } = target;
    // Probes start every `interval` (not `interval` after the last one ended), so a store that stops
    // answering is down after about `fall × interval` when `timeout` is below `interval`.
    let mut ticks = tokio::time::interval(settings.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // Each probe asks for CAPA and refreshes what new connections to this store take as its answer.
        let result = tokio::time::timeout(
            settings.timeout,
            connector.prepare(&endpoint, mode, None, AskCapa::Refresh(&caps)),
        )
        .await;
        let (ok, reason) = match result {
            Ok(Ok(_conn)) => (true, String::new()),
            Ok(Err(e)) => (false, e.to_string()),
            Err(_) => (false, "probe timed out".to_string()),
        };
        if !ok {
            caps.forget();
        }
        if let Some(up) = state.record_probe(ok, settings.rise, settings.fall) {
            on_change(up, &reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_only_after_rise_and_fall_in_a_row() {
        let h = HealthState::default();
        assert!(h.is_up());
        assert_eq!(h.record_probe(false, 2, 3), None);
        assert_eq!(h.record_probe(false, 2, 3), None);
        assert_eq!(
            h.record_probe(true, 2, 3),
            None,
            "a good result resets the bad streak"
        );
        assert_eq!(h.record_probe(false, 2, 3), None);
        assert_eq!(h.record_probe(false, 2, 3), None);
        assert_eq!(h.record_probe(false, 2, 3), Some(false));
        assert_eq!(h.record_probe(false, 2, 3), None, "a flip is reported once");
        assert!(!h.is_up());
        assert_eq!(h.record_probe(true, 2, 3), None);
        assert_eq!(h.record_probe(true, 2, 3), Some(true));
        assert_eq!(h.record_probe(true, 2, 3), None);
    }

    #[test]
    fn connect_failures_eject_and_successes_reset() {
        let h = HealthState::default();
        assert_eq!(h.record_connect(false, 3), None);
        assert_eq!(h.record_connect(false, 3), None);
        assert_eq!(h.record_connect(true, 3), None);
        assert_eq!(h.record_connect(false, 3), None);
        assert_eq!(h.record_connect(false, 3), None);
        assert_eq!(h.record_connect(false, 3), Some(false));
        assert!(!h.is_up());
        assert_eq!(
            h.record_connect(true, 3),
            None,
            "only probes bring a store back"
        );
        assert!(!h.is_up());
        assert_eq!(h.record_probe(true, 2, 3), None);
        assert_eq!(h.record_probe(true, 2, 3), Some(true));
    }
}
