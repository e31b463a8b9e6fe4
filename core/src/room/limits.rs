//! What the hub allows: the size, count and rate limits, and the token buckets behind the rate
//! limits (per connection here, and per caller for other users such as the HTTP API).

use super::Millis;

/// Limits enforced by the hub. Every one answers with a clear error code instead of an effect.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted text frame, in bytes.
    pub max_message_bytes: usize,
    /// Largest peer metadata, serialized, in bytes.
    pub max_metadata_bytes: usize,
    pub max_peers_per_room: usize,
    /// Live rooms (rooms with at least one connected peer) per server.
    pub max_rooms: usize,
    /// Sustained messages per second per connection.
    pub rate_per_sec: f64,
    /// Burst size of the per-connection token bucket.
    pub rate_burst: f64,
    /// Frames over the limit (in a row) before the connection is closed.
    pub rate_strikes_before_close: u32,
    /// Time a connection may stay unregistered.
    pub register_timeout_ms: u64,
    /// Failed `register` attempts before the connection is closed.
    pub max_failed_registers: u32,
    pub max_peer_id_len: usize,
    pub max_role_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            max_metadata_bytes: 16 * 1024,
            max_peers_per_room: 1000,
            max_rooms: 10_000,
            rate_per_sec: 50.0,
            rate_burst: 200.0,
            rate_strikes_before_close: 200,
            register_timeout_ms: 10_000,
            max_failed_registers: 5,
            max_peer_id_len: 128,
            max_role_len: 64,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct TokenBucket {
    tokens: f64,
    last: Millis,
}

impl TokenBucket {
    pub(super) fn new(burst: f64, now: Millis) -> Self {
        TokenBucket { tokens: burst, last: now }
    }

    pub(super) fn allow(&mut self, now: Millis, rate: f64, burst: f64) -> bool {
        let dt = now.0.saturating_sub(self.last.0) as f64 / 1000.0;
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A standalone token bucket for callers that rate-limit other things (e.g. per-IP HTTP calls).
#[derive(Debug, Clone)]
pub struct RateLimiter {
    bucket: TokenBucket,
    rate: f64,
    burst: f64,
}

impl RateLimiter {
    pub fn new(rate_per_sec: f64, burst: f64, now: Millis) -> Self {
        RateLimiter { bucket: TokenBucket::new(burst, now), rate: rate_per_sec, burst }
    }
    pub fn allow(&mut self, now: Millis) -> bool {
        self.bucket.allow(now, self.rate, self.burst)
    }
    /// True once the bucket is full again, i.e. the limiter carries no state worth keeping.
    pub fn is_idle(&self, now: Millis) -> bool {
        let dt = now.0.saturating_sub(self.bucket.last.0) as f64 / 1000.0;
        self.bucket.tokens + dt * self.rate >= self.burst
    }
}
