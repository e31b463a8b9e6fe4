//! A model of one direction of a network path: delay, jitter, random and bursty loss,
//! reordering, duplication, and a bottleneck of fixed rate with a bounded tail-drop queue.
//!
//! It only decides *when* (and whether) a packet arrives; it never holds one. The same model
//! drives the deterministic simulation (`core/tests/sim.rs`, virtual time) and the userspace
//! forwarder of the emulated-path benchmark (real time, between two network namespaces), so a
//! protocol-level figure and a real-process figure are taken over the same link.
//!
//! Order of effects for a packet entering at `now`: random/bursty loss (before the bottleneck,
//! like a lossy access link), then the bottleneck queue (tail drop when it holds more than
//! `queue_bytes`; serialization at `rate_bps`), then propagation `delay` plus `jitter` (jitter
//! alone can reorder; `reorder` holds a packet back on purpose), then duplication.

use std::time::{Duration, Instant};

/// Parameters of one direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Extra delay, uniform in `[0, jitter)`, per packet. Packets may overtake each other.
    pub jitter: Duration,
    /// Average fraction of packets lost at random (0..1).
    pub loss: f64,
    /// Mean length of a loss burst in packets (Gilbert–Elliott). 1 = independent losses.
    pub burst: f64,
    /// Fraction of packets held back by `reorder_gap` so that later ones overtake them.
    pub reorder: f64,
    /// How long a reordered packet is held back.
    pub reorder_gap: Duration,
    /// Fraction of packets delivered twice.
    pub dup: f64,
    /// Bottleneck rate in bits per second; `None` = unlimited.
    pub rate_bps: Option<u64>,
    /// Bytes the bottleneck queue holds before it drops arrivals (only with a rate).
    pub queue_bytes: usize,
}

impl LinkParams {
    /// A loss-free, unlimited link with a fixed one-way delay.
    pub fn clean(delay: Duration) -> LinkParams {
        LinkParams {
            delay,
            jitter: Duration::ZERO,
            loss: 0.0,
            burst: 1.0,
            reorder: 0.0,
            reorder_gap: Duration::from_millis(5),
            dup: 0.0,
            rate_bps: None,
            queue_bytes: usize::MAX,
        }
    }

    /// The queue that holds `time` worth of traffic at the link's rate (a common way to size a
    /// bottleneck buffer: one bandwidth-delay product). Unlimited without a rate.
    pub fn queue_for(rate_bps: u64, time: Duration) -> usize {
        ((rate_bps as f64 / 8.0) * time.as_secs_f64()).ceil() as usize
    }
}

/// What happened to the packets offered to a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub sent: u64,
    pub delivered: u64,
    pub dropped_random: u64,
    pub dropped_queue: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Largest bottleneck queue seen, in bytes.
    pub peak_queue: usize,
}

/// One direction of a path. Deterministic for a given seed and sequence of calls.
#[derive(Debug, Clone)]
pub struct Link {
    params: LinkParams,
    rng: u64,
    /// Gilbert–Elliott state: in a loss burst.
    bad: bool,
    /// When the bottleneck finishes sending what it already holds.
    busy_until: Option<Instant>,
    stats: LinkStats,
}

impl Link {
    pub fn new(params: LinkParams, seed: u64) -> Link {
        // xorshift must not start at zero.
        let rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Link { params, rng, bad: false, busy_until: None, stats: LinkStats::default() }
    }

    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    /// Changes the parameters from now on (queued packets keep their times).
    pub fn set_params(&mut self, params: LinkParams) {
        self.params = params;
    }

    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.uniform() < p
    }

    /// Gilbert–Elliott with a lossless good state and an all-loss bad state: leaving the bad state
    /// has probability 1/burst, entering it loss/(1-loss)/burst, so the long-run loss rate is
    /// `loss` and bursts last `burst` packets on average.
    fn lost(&mut self) -> bool {
        let loss = self.params.loss.clamp(0.0, 1.0);
        if loss <= 0.0 {
            self.bad = false;
            return false;
        }
        if loss >= 1.0 {
            return true;
        }
        let r = 1.0 / self.params.burst.max(1.0);
        let p = (loss / (1.0 - loss) * r).min(1.0);
        self.bad = if self.bad { !self.chance(r) } else { self.chance(p) };
        self.bad
    }

    /// Bytes waiting in the bottleneck at `now`.
    pub fn queued_bytes(&self, now: Instant) -> usize {
        match (self.params.rate_bps, self.busy_until) {
            (Some(rate), Some(busy)) if busy > now => ((busy - now).as_secs_f64() * rate as f64 / 8.0).round() as usize,
            _ => 0,
        }
    }

    /// A packet of `len` bytes enters the link at `now`: the instants at which its copies arrive
    /// (none: dropped; two: duplicated). Arrival instants are never before `now`.
    pub fn send(&mut self, now: Instant, len: usize) -> Vec<Instant> {
        self.stats.sent += 1;
        if self.lost() {
            self.stats.dropped_random += 1;
            return Vec::new();
        }
        let mut depart = now;
        if let Some(rate) = self.params.rate_bps.filter(|r| *r > 0) {
            let queued = self.queued_bytes(now);
            if queued + len > self.params.queue_bytes.max(len) {
                self.stats.dropped_queue += 1;
                return Vec::new();
            }
            self.stats.peak_queue = self.stats.peak_queue.max(queued + len);
            let start = self.busy_until.filter(|b| *b > now).unwrap_or(now);
            let tx = Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
            depart = start + tx;
            self.busy_until = Some(depart);
        }
        let mut at = depart + self.params.delay;
        if !self.params.jitter.is_zero() {
            at += self.params.jitter.mul_f64(self.uniform());
        }
        if self.chance(self.params.reorder) {
            self.stats.reordered += 1;
            at += self.params.reorder_gap;
        }
        let mut out = vec![at];
        if self.chance(self.params.dup) {
            self.stats.duplicated += 1;
            out.push(at + Duration::from_micros(10));
        }
        self.stats.delivered += out.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn clean_link_delays_by_exactly_the_delay() {
        let t0 = Instant::now();
        let mut l = Link::new(LinkParams::clean(ms(20)), 1);
        for i in 0..100 {
            assert_eq!(l.send(t0 + ms(i), 1200), vec![t0 + ms(i) + ms(20)]);
        }
        assert_eq!(l.stats().delivered, 100);
    }

    #[test]
    fn random_loss_matches_its_rate_and_bursts_their_length() {
        let t0 = Instant::now();
        for burst in [1.0, 4.0] {
            let p = LinkParams { loss: 0.02, burst, ..LinkParams::clean(ms(1)) };
            let mut l = Link::new(p, 7);
            let (mut lost, mut bursts, mut prev_lost) = (0u64, 0u64, false);
            let n = 400_000;
            for _ in 0..n {
                let gone = l.send(t0, 100).is_empty();
                lost += gone as u64;
                bursts += (gone && !prev_lost) as u64;
                prev_lost = gone;
            }
            let rate = lost as f64 / n as f64;
            assert!((rate - 0.02).abs() < 0.003, "burst {burst}: loss rate {rate}");
            let mean_burst = lost as f64 / bursts as f64;
            // Independent losses still cluster a little by chance (mean 1/(1-p)).
            assert!((mean_burst - burst).abs() < 0.25 * burst, "burst {burst}: mean burst {mean_burst}");
        }
    }

    #[test]
    fn the_bottleneck_serializes_and_drops_at_the_tail() {
        let t0 = Instant::now();
        // 8 Mbit/s: 1000 bytes take 1 ms. A queue of 5 packets.
        let p = LinkParams { rate_bps: Some(8_000_000), queue_bytes: 5_000, ..LinkParams::clean(ms(10)) };
        let mut l = Link::new(p, 3);
        let arrivals: Vec<Vec<Instant>> = (0..8).map(|_| l.send(t0, 1000)).collect();
        for (i, a) in arrivals.iter().take(5).enumerate() {
            assert_eq!(a, &vec![t0 + ms(i as u64 + 1) + ms(10)], "packet {i}");
        }
        assert!(arrivals[5..].iter().all(Vec::is_empty), "a full queue drops arrivals");
        assert_eq!(l.stats().dropped_queue, 3);
        assert_eq!(l.queued_bytes(t0), 5_000);
        // Once it drained, it accepts again, without a queue.
        assert_eq!(l.send(t0 + ms(100), 1000), vec![t0 + ms(101) + ms(10)]);
    }

    #[test]
    fn jitter_and_reordering_let_packets_overtake() {
        let t0 = Instant::now();
        let p = LinkParams { reorder: 0.1, ..LinkParams::clean(ms(20)) };
        let mut l = Link::new(p, 11);
        let times: Vec<Instant> = (0..1000).flat_map(|i| l.send(t0 + Duration::from_micros(100 * i), 1200)).collect();
        let overtaken = times.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(overtaken > 50, "{overtaken}");
        assert!(times.iter().all(|t| *t >= t0 + ms(20)));
    }

    #[test]
    fn duplication_delivers_twice() {
        let t0 = Instant::now();
        let mut l = Link::new(LinkParams { dup: 1.0, ..LinkParams::clean(ms(1)) }, 5);
        assert_eq!(l.send(t0, 10).len(), 2);
        assert_eq!(l.stats().duplicated, 1);
    }
}
