//! How many bulk bytes a connection keeps buffered in its SCTP association: a window that follows
//! the path.
//!
//! Bytes in flight are capped by the smallest of three windows: this one (what the application
//! hands to str0m before the peer acknowledges it), SCTP's congestion window, and the receiver's
//! window. SCTP's own congestion control probes the path, but it only grows its window while
//! data is queued beyond what is in flight, so this window must stay ahead of it: a fixed 64 KiB
//! is 64 KiB per round trip (1.6 MB/s at 40 ms). It must not be huge either: control messages
//! share the association and queue behind buffered bulk data, and buffered data is memory.
//!
//! So the window is the delivery rate the connection measures (acknowledged bytes per second,
//! the best of the last few samples) times a target drain time, between a floor and a ceiling.
//! A control message then waits at most about the target behind bulk data, and on any path whose
//! round trip is below the target the window exceeds the bandwidth-delay product: each sample at
//! rate r = w/RTT sets w' = r·target = w·target/RTT, so the window grows geometrically until the
//! path (SCTP's congestion window, the bottleneck) limits the rate, then holds.

use std::time::{Duration, Instant};

/// Tunables of [`BulkWindow`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowConfig {
    /// The window before anything was measured, and its floor.
    pub min: usize,
    /// Its ceiling (bounds memory per connection).
    pub max: usize,
    /// How long the buffered bytes should take to drain at the measured rate.
    pub target: Duration,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig { min: 256 * 1024, max: 16 * 1024 * 1024, target: Duration::from_millis(500) }
    }
}

/// Shortest span of one rate sample (SACKs arrive in bursts).
const SAMPLE: Duration = Duration::from_millis(50);
/// Samples remembered; the window follows the best of them, so a short stall (a loss recovery,
/// a slow disk read) does not shrink it, and a slower path shows within SAMPLES × SAMPLE.
const SAMPLES: usize = 8;

/// See the module docs. Pure: the caller reports time and the acknowledged byte count.
#[derive(Debug, Clone)]
pub struct BulkWindow {
    cfg: WindowConfig,
    window: usize,
    /// Start of the current sample: (time, acknowledged bytes then).
    start: Option<(Instant, u64)>,
    rates: [f64; SAMPLES],
    next: usize,
}

impl BulkWindow {
    pub fn new(cfg: WindowConfig) -> BulkWindow {
        let min = cfg.min.min(cfg.max);
        BulkWindow { cfg: WindowConfig { min, ..cfg }, window: min, start: None, rates: [0.0; SAMPLES], next: 0 }
    }

    /// Bytes that may be buffered now.
    pub fn get(&self) -> usize {
        self.window
    }

    /// Best delivery rate of the recent samples, bytes per second.
    pub fn rate(&self) -> f64 {
        self.rates.iter().copied().fold(0.0, f64::max)
    }

    /// Whether [`BulkWindow::sample`] wants to be called at `now` (lets the caller skip counting
    /// acknowledged bytes on most packets).
    pub fn due(&self, now: Instant) -> bool {
        self.start.is_none_or(|(t, _)| now.saturating_duration_since(t) >= SAMPLE)
    }

    /// `acked` is the total of bulk bytes the peer acknowledged so far; `busy` says whether the
    /// sender had data waiting the whole time (an idle sender's rate says nothing of the path).
    pub fn sample(&mut self, now: Instant, acked: u64, busy: bool) {
        if !busy {
            self.start = None;
            return;
        }
        let Some((t0, a0)) = self.start else {
            self.start = Some((now, acked));
            return;
        };
        let span = now.saturating_duration_since(t0);
        if span < SAMPLE {
            return;
        }
        self.start = Some((now, acked));
        // A span far longer than asked for means the caller was not called (no packets, no
        // timers): a stall, not a rate.
        if span > SAMPLE * 20 {
            return;
        }
        self.rates[self.next] = acked.saturating_sub(a0) as f64 / span.as_secs_f64();
        self.next = (self.next + 1) % SAMPLES;
        let want = self.rate() * self.cfg.target.as_secs_f64();
        self.window = (want as usize).clamp(self.cfg.min, self.cfg.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A path of `rtt` whose bottleneck carries `cap` bytes/s, driven by the window: acked bytes
    /// per round trip are min(window, cap·rtt).
    fn run(rtt: Duration, cap: f64, rounds: usize) -> BulkWindow {
        let mut w = BulkWindow::new(WindowConfig::default());
        let t0 = Instant::now();
        let (mut acked, mut t) = (0u64, t0);
        for _ in 0..rounds {
            acked += (w.get() as f64).min(cap * rtt.as_secs_f64()) as u64;
            t += rtt;
            w.sample(t, acked, true);
        }
        w
    }

    #[test]
    fn grows_past_the_bandwidth_delay_product_and_holds() {
        // 40 ms, 100 MB/s: a BDP of 4 MB; the window ends at the 500 ms target's 50 MB, capped.
        let w = run(ms(40), 100e6, 100);
        assert_eq!(w.get(), 16 * 1024 * 1024);
        // 40 ms, 2 MB/s: BDP 80 kB; the window is the rate times the target, well above it.
        let w = run(ms(40), 2e6, 100);
        assert!((w.get() as f64 - 1e6).abs() < 0.05e6, "{}", w.get());
    }

    #[test]
    fn an_idle_sender_keeps_its_window() {
        let mut w = run(ms(20), 50e6, 50);
        let before = w.get();
        let t = Instant::now() + Duration::from_secs(100);
        w.sample(t, 0, false);
        w.sample(t + ms(500), 0, false);
        assert_eq!(w.get(), before);
    }

    #[test]
    fn a_stall_is_not_a_sample_and_a_slower_path_shows() {
        let mut w = BulkWindow::new(WindowConfig::default());
        let t0 = Instant::now();
        for i in 1..=20u64 {
            w.sample(t0 + ms(50 * i), 500_000 * i, true);
        }
        let before = w.get();
        // Two seconds without a call, then nothing acknowledged: ignored.
        w.sample(t0 + ms(3000), 10_000_000, true);
        assert_eq!(w.get(), before);
        // From now on 1 MB/s: after SAMPLES samples the window follows it down.
        let mut acked = 10_000_000;
        for i in 1..=20u64 {
            acked += 50_000;
            w.sample(t0 + ms(3000 + 50 * i), acked, true);
        }
        assert_eq!(w.get(), WindowConfig::default().min.max(500_000));
    }

    #[test]
    fn the_floor_holds_before_any_sample() {
        let w = BulkWindow::new(WindowConfig { min: 64 * 1024, ..WindowConfig::default() });
        assert_eq!(w.get(), 64 * 1024);
        assert!(w.due(Instant::now()));
    }
}
