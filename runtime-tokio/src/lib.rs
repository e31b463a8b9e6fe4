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

/// Fills `buf` from the OS's random source (getrandom(2)). The fallback, for kernels without it
/// (< 3.17), mixes time and pid: unique enough for ids, never used for secrets here.
pub(crate) fn random_bytes(buf: &mut [u8]) {
    // SAFETY: getrandom(2) writes at most `buf.len()` bytes into our buffer.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let mut x = blake3::Hasher::new();
        x.update(&t.to_le_bytes()).update(&std::process::id().to_le_bytes());
        x.finalize_xof().fill(buf);
    }
}

/// Selects the TLS crypto provider (aws-lc-rs) for `wss://` and `https://` servers. Idempotent;
/// called before any connection is made.
pub fn init_tls() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
