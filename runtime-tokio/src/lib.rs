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
pub mod signaling;
pub mod trainer;
pub mod worker;

pub use conn::{ConnError, PeerConnection, PeerOptions, Received, Sent, Transfer, accept, connect};
pub use signaling::{Registered, SignalingClient, SignalingError};
