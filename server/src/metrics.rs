//! Prometheus metrics (text exposition via `prometheus-client`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

pub struct Metrics {
    registry: Registry,
    pub connections_total: Counter,
    pub connections: Gauge,
    pub peers: Gauge,
    pub rooms: Gauge,
    pub frames_received: Counter,
    pub messages_delivered: Counter,
    pub errors: Family<CodeLabel, Counter>,
    pub closes: Family<CodeLabel, Counter>,
    pub registrations: Family<ResultLabel, Counter>,
    /// Time from a frame's arrival to its outputs being queued, in seconds.
    pub handle_seconds: Histogram,
    /// Cluster mode: peers of other instances held in this instance's replica.
    pub remote_peers: Gauge,
    /// Cluster mode: commands sent to Redis (claims, publishes, deliveries).
    pub cluster_sent: Counter,
    /// Cluster mode: messages read from this instance's inbox.
    pub cluster_received: Counter,
    pub cluster_decode_errors: Counter,
    /// Expired rooms this server deleted from storage.
    pub rooms_expired: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sleap_rtc");
        let m = Metrics {
            connections_total: Counter::default(),
            connections: Gauge::default(),
            peers: Gauge::default(),
            rooms: Gauge::default(),
            frames_received: Counter::default(),
            messages_delivered: Counter::default(),
            errors: Family::default(),
            closes: Family::default(),
            registrations: Family::default(),
            handle_seconds: Histogram::new(exponential_buckets(1e-6, 4.0, 10)),
            remote_peers: Gauge::default(),
            cluster_sent: Counter::default(),
            cluster_received: Counter::default(),
            cluster_decode_errors: Counter::default(),
            rooms_expired: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("ws_connections_opened", "WebSocket connections accepted", m.connections_total.clone());
        registry.register("ws_connections", "WebSocket connections open now", m.connections.clone());
        registry.register("peers", "Registered peers now", m.peers.clone());
        registry.register("rooms", "Rooms with connected peers now", m.rooms.clone());
        registry.register("frames_received", "Text frames received from peers", m.frames_received.clone());
        registry.register("messages_delivered", "Messages queued to peers", m.messages_delivered.clone());
        registry.register("errors_sent", "Error replies sent, by code", m.errors.clone());
        registry.register(
            "connections_closed_by_server",
            "Connections the server closed, by close code",
            m.closes.clone(),
        );
        registry.register("registrations", "Registration attempts, by result", m.registrations.clone());
        registry.register(
            "frame_handle_seconds",
            "Time to handle one frame and queue its outputs",
            m.handle_seconds.clone(),
        );
        registry.register("remote_peers", "Peers of other instances known through Redis", m.remote_peers.clone());
        registry.register("cluster_commands_sent", "Commands sent to the Redis broker", m.cluster_sent.clone());
        registry.register(
            "cluster_messages_received",
            "Messages read from this instance's inbox",
            m.cluster_received.clone(),
        );
        registry.register(
            "cluster_decode_errors",
            "Inbox messages that could not be decoded",
            m.cluster_decode_errors.clone(),
        );
        registry.register(
            "rooms_expired",
            "Expired rooms deleted from storage after their grace period",
            m.rooms_expired.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
