//! sleap-rtc patch: a delivery-rate estimate for the loss response (TCP Westwood+, Mascolo et
//! al., "TCP Westwood: end-to-end congestion control for wired/wireless networks", 2001).
//!
//! Reno halves the window on every loss, so one flow is bound by MSS/RTT · 1.22/√p: about
//! 1 MB/s on a 40 ms path with 0.1 % random loss, whatever the path's capacity. Westwood+ sets
//! ssthresh to the bandwidth the ACKs show times the path's minimum RTT instead: after a random
//! loss that is about the window the path was carrying (little reduction); after a congestion
//! loss it is the bottleneck's bandwidth-delay product (the standing queue drains). The caller
//! never goes above its current window or below Reno's cwnd/2, so this is never more
//! aggressive than halving would be under congestion that fills more than one BDP of queue.

use std::time::{Duration, Instant};

/// Shortest interval one rate sample spans (ACK compression makes shorter ones noisy).
const MIN_SAMPLE: Duration = Duration::from_millis(10);
/// Rate samples the max filter remembers (about as many round trips).
const SAMPLES: usize = 8;

#[derive(Debug, Default)]
pub(crate) struct BandwidthEstimator {
    min_rtt: Option<Duration>,
    last_rtt: Duration,
    sample_start: Option<Instant>,
    sample_bytes: u64,
    /// The last rate samples (bytes per second), one per round trip or so; the estimate is
    /// their maximum (a windowed max filter, as BBR uses): a sample taken while losses were
    /// being repaired, or while the window was still growing, understates what the path
    /// carries, and an average would lag the window on every loss.
    samples: [f64; SAMPLES],
    next: usize,
    /// Consecutive RTT samples that showed a queue building.
    building_samples: u32,
    /// Smoothed RTT (RFC 6298's 1/8 gain): the reordering window's ceiling.
    srtt: Option<Duration>,
    /// Quarters of the minimum RTT in the reordering window (RACK's `reo_wnd_mult`; 0 means 1).
    reorder_mult: u32,
    /// Recoveries since a spurious one; after `REORDER_DECAY` the window narrows again.
    recoveries_since_spurious: u32,
}

/// Recoveries without a spurious retransmission after which the reordering window returns to
/// a quarter of the minimum RTT (RACK's 16).
const REORDER_DECAY: u32 = 16;

impl BandwidthEstimator {
    pub(crate) fn on_rtt(&mut self, rtt: Duration) {
        self.last_rtt = rtt;
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        self.srtt = Some(self.srtt.map_or(rtt, |s| s - s / 8 + rtt / 8));
    }

    /// A fast recovery began.
    pub(crate) fn on_recovery(&mut self) {
        self.recoveries_since_spurious += 1;
        if self.recoveries_since_spurious > REORDER_DECAY {
            self.reorder_mult = 1;
            self.recoveries_since_spurious = 0;
        }
    }

    /// The peer reported a fast-retransmitted chunk twice: it was reordered, not lost.
    pub(crate) fn on_spurious(&mut self) {
        self.reorder_mult = (self.reorder_mult.max(1) + 1).min(64);
        self.recoveries_since_spurious = 0;
    }

    /// `bytes` newly acknowledged (cumulatively or by gap blocks) by a SACK at `now`.
    pub(crate) fn on_acked(&mut self, bytes: u64, now: Instant) {
        let Some(start) = self.sample_start else {
            self.sample_start = Some(now);
            self.sample_bytes = 0;
            return;
        };
        self.sample_bytes += bytes;
        let span = self.last_rtt.max(MIN_SAMPLE);
        let elapsed = now.saturating_duration_since(start);
        if elapsed < span {
            return;
        }
        // A span much longer than an RTT saw an idle sender or a timeout, not the path's rate.
        if elapsed <= span * 4 {
            self.samples[self.next] = self.sample_bytes as f64 / elapsed.as_secs_f64();
            self.next = (self.next + 1) % SAMPLES;
        }
        self.sample_start = Some(now);
        self.sample_bytes = 0;
    }

    /// Bandwidth × minimum RTT in bytes, once both were measured.
    pub(crate) fn bdp(&self) -> Option<u32> {
        let rtt = self.min_rtt?;
        let bw = self.samples.iter().copied().fold(0.0, f64::max);
        (bw > 0.0).then(|| (bw * rtt.as_secs_f64()).min(u32::MAX as f64) as u32)
    }

    /// How long a chunk must have been outstanding before a gap report makes it lost: the
    /// minimum RTT plus RACK's reordering window (RFC 8985 §6.2): a quarter of the minimum RTT
    /// (at least 1 ms) times a multiplier that each spurious recovery raises, never more than
    /// the smoothed RTT.
    pub(crate) fn reorder_window(&self) -> Option<Duration> {
        self.min_rtt.map(|m| {
            let step = (m / 4).max(Duration::from_millis(1));
            let ceiling = self.srtt.unwrap_or(m).max(step);
            m + (step * self.reorder_mult.max(1)).min(ceiling)
        })
    }

    /// ssthresh after a timeout: the estimate, at least Reno's.
    pub(crate) fn ssthresh_after_timeout(&self, cwnd: u32, mtu: u32) -> u32 {
        let reno = (cwnd / 2).max(4 * mtu);
        self.bdp().map_or(reno, |bdp| bdp.max(reno))
    }

    /// Whether a round-trip sample shows a queue building (HyStart's delay test): a slow start
    /// that goes on past this point overfills the bottleneck and loses a large part of a window.
    ///
    /// One sample per round trip can be inflated by the peer's delayed SACK (a lone trailing
    /// packet), so it takes three in a row.
    pub(crate) fn queue_building(&mut self, rtt: Duration) -> bool {
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        let building = self.min_rtt.is_some_and(|min| {
            let slack = (min / 8).clamp(Duration::from_millis(4), Duration::from_millis(16));
            rtt > min + slack
        });
        self.building_samples = if building { self.building_samples + 1 } else { 0 };
        self.building_samples >= 3
    }

    /// ssthresh after a loss: Westwood+'s estimate, kept between Reno's `cwnd / 2` and `cwnd`.
    pub(crate) fn ssthresh_after_loss(&self, cwnd: u32, mtu: u32) -> u32 {
        let reno = (cwnd / 2).max(4 * mtu);
        match self.bdp() {
            Some(bdp) => bdp.min(cwnd).max(reno),
            None => reno,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spurious_recoveries_widen_the_reordering_window_up_to_the_smoothed_rtt() {
        let mut b = BandwidthEstimator::default();
        assert_eq!(b.reorder_window(), None);
        b.on_rtt(Duration::from_millis(40));
        let ms = |w: Option<Duration>| w.unwrap().as_millis();
        assert_eq!(ms(b.reorder_window()), 50);
        b.on_spurious();
        assert_eq!(ms(b.reorder_window()), 60);
        for _ in 0..10 {
            b.on_spurious();
        }
        assert_eq!(ms(b.reorder_window()), 80, "capped at min RTT + SRTT");
        // Sixteen recoveries without a spurious one: back to a quarter.
        for _ in 0..=REORDER_DECAY {
            b.on_recovery();
        }
        assert_eq!(ms(b.reorder_window()), 50);
    }

    #[test]
    fn estimates_the_acked_rate_times_the_minimum_rtt() {
        let t0 = Instant::now();
        let mut b = BandwidthEstimator::default();
        b.on_rtt(Duration::from_millis(50));
        b.on_rtt(Duration::from_millis(40));
        // 1 MB/s: 10 kB every 10 ms.
        for i in 0..=200u64 {
            b.on_acked(10_000, t0 + Duration::from_millis(10 * i));
        }
        let bdp = b.bdp().unwrap() as f64;
        assert!((bdp - 40_000.0).abs() < 2_000.0, "{bdp}");
        // A window of 100 kB on a path that carries 40 kB per RTT: congestion, back to the BDP.
        assert_eq!(b.ssthresh_after_loss(100_000, 1200), 50_000);
        // A window of 44 kB: random loss, keep (almost) all of it.
        assert_eq!(b.ssthresh_after_loss(44_000, 1200), bdp as u32);
    }

    #[test]
    fn a_slow_sample_during_recovery_does_not_lower_the_estimate() {
        let t0 = Instant::now();
        let mut b = BandwidthEstimator::default();
        b.on_rtt(Duration::from_millis(20));
        let mut t = t0;
        // 2 MB/s for a while, then two round trips at half that rate (a loss being repaired).
        for rate in [2_000_000u64; 20].into_iter().chain([1_000_000; 2]) {
            t += Duration::from_millis(20);
            b.on_acked(rate / 50, t);
        }
        let bdp = b.bdp().unwrap() as f64;
        assert!((bdp - 40_000.0).abs() < 2_000.0, "{bdp}");
    }

    #[test]
    fn a_queue_shows_after_three_inflated_samples() {
        let mut b = BandwidthEstimator::default();
        let ms = Duration::from_millis;
        b.on_rtt(ms(40));
        assert!(!b.queue_building(ms(90)), "one sample can be a delayed SACK");
        assert!(!b.queue_building(ms(41)));
        assert!(!b.queue_building(ms(50)));
        assert!(!b.queue_building(ms(50)));
        assert!(b.queue_building(ms(50)));
    }

    #[test]
    fn the_reordering_window_is_a_quarter_rtt_past_the_minimum() {
        let mut b = BandwidthEstimator::default();
        assert_eq!(b.reorder_window(), None);
        b.on_rtt(Duration::from_millis(40));
        assert_eq!(b.reorder_window(), Some(Duration::from_millis(50)));
        b.on_rtt(Duration::from_micros(200));
        assert_eq!(b.reorder_window(), Some(Duration::from_micros(1200)));
    }

    #[test]
    fn without_samples_it_is_reno() {
        let b = BandwidthEstimator::default();
        assert_eq!(b.ssthresh_after_loss(100_000, 1200), 50_000);
        assert_eq!(b.ssthresh_after_loss(6_000, 1200), 4_800);
    }

    #[test]
    fn an_idle_gap_is_not_a_rate_sample() {
        let t0 = Instant::now();
        let mut b = BandwidthEstimator::default();
        b.on_rtt(Duration::from_millis(20));
        for i in 0..=100u64 {
            b.on_acked(20_000, t0 + Duration::from_millis(20 * i));
        }
        let before = b.bdp().unwrap();
        b.on_acked(1_000, t0 + Duration::from_secs(30));
        b.on_acked(1_000, t0 + Duration::from_secs(30) + Duration::from_millis(1));
        assert_eq!(b.bdp().unwrap(), before);
    }
}
