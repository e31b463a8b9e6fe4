//! sleap-rtc-tokio: drives `sleap-rtc-core` with tokio.
//!
//! - [`signaling::SignalingClient`]: registers with a signaling server (async-tungstenite),
//!   discovery, requests with `request_id` correlation, relay subscriptions.
//! - [`conn::connect`] / [`conn::accept`]: WebRTC data-channel connections to a peer found through
//!   signaling, driven over tokio UDP sockets; [`conn::PeerConnection`] sends and receives control
//!   messages and files (resumable, verified).

pub mod client;
pub mod conn;
pub mod files;
pub mod registry;
pub mod signaling;
pub mod trainer;
pub mod worker;

pub use conn::{ConnError, PeerConnection, PeerOptions, Received, Sent, Transfer, accept, connect};
pub use signaling::{Registered, SignalingClient, SignalingError};

/// Selects the TLS crypto provider (aws-lc-rs) for `wss://` and `https://` servers. Idempotent;
/// called before any connection is made.
pub fn init_tls() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
