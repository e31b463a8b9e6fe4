//! sleap-rtc-driver: the I/O drivers of sleap-rtc, written once against [`Runtime`].
//!
//! `sleap-rtc-core` holds the protocol as sans-IO state machines; this crate does the waiting
//! (sockets, timers, files, tasks) for the signaling client, peer connections, file transfer and
//! the job client, but through the small [`Runtime`] trait instead of a particular executor.
//! `sleap-rtc-tokio` and `sleap-rtc-smol` implement the trait and re-export this API under the
//! same names ([`runtime_api!`]); docs/runtime-seam.md describes what a third runtime provides.
//!
//! - [`signaling::SignalingClient`]: registers with a signaling server, discovery, requests with
//!   `request_id` correlation, relay subscriptions.
//! - [`conn::connect`] / [`conn::accept`]: WebRTC data-channel connections to a peer found
//!   through signaling, over the runtime's UDP sockets; [`conn::PeerConnection`] sends and
//!   receives control messages and files (resumable, verified).
//! - [`client::JobClient`]: the client half of the job protocol.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::{Error as WsError, Message};
use futures_util::{Sink, Stream};

pub mod client;
pub mod conn;
pub mod files;
pub mod signaling;

/// What a runtime provides to the drivers: tasks, a blocking pool, timers, UDP sockets, name
/// resolution and a WebSocket connection. Everything else (protocol, flow control, file layout)
/// is shared. Implemented by a zero-sized marker type (`sleap_rtc_tokio::Tokio`,
/// `sleap_rtc_smol::Smol`); the drivers only call its associated functions.
pub trait Runtime: Send + Sync + Sized + 'static {
    /// A bound, non-blocking UDP socket registered with the runtime's reactor.
    type Udp: UdpSocket;
    /// A connected WebSocket client (`async_tungstenite::WebSocketStream` over the runtime's TCP).
    type Ws: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Send + Unpin + 'static;

    /// Runs `f` in the background until it finishes (detached: nobody awaits it).
    fn spawn<F: Future<Output = ()> + Send + 'static>(f: F);
    /// Runs `f` on a thread that may block (hashing, fsync, certificate generation). `None` if
    /// it panicked. A runtime may cancel work not yet started when the returned future is
    /// dropped (smol does), so fire-and-forget callers await it inside [`Runtime::spawn`].
    fn spawn_blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        f: F,
    ) -> impl Future<Output = Option<T>> + Send;
    /// Completes at `deadline` (at once if it has passed).
    fn sleep_until(deadline: Instant) -> impl Future<Output = ()> + Send;
    /// Registers an already bound std socket (set non-blocking by the caller) with the reactor.
    fn udp(sock: std::net::UdpSocket) -> io::Result<Self::Udp>;
    /// Resolves `host:port` (STUN servers).
    fn resolve(host: String, port: u16) -> impl Future<Output = io::Result<Vec<SocketAddr>>> + Send;
    /// Opens a WebSocket to `url` (`ws://` or `wss://`) and completes the handshake.
    fn ws_connect(url: String) -> impl Future<Output = Result<Self::Ws, WsError>> + Send;
}

/// The UDP operations a peer connection needs.
pub trait UdpSocket: Send + Sync + 'static {
    /// Receives one datagram, registering `cx`'s waker when none is ready.
    fn poll_recv_from(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<(usize, SocketAddr)>>;
    /// Sends without waiting (`WouldBlock` when the socket buffer is full).
    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize>;
    /// Sends, waiting for room in the socket buffer.
    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> impl Future<Output = io::Result<usize>> + Send + 'a;
}

/// `f` did not finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `f` until `deadline`, on any [`Runtime`]'s timer.
pub async fn timeout_at<R: Runtime, F: Future>(deadline: Instant, f: F) -> Result<F::Output, Elapsed> {
    tokio::select! {
        biased;
        v = f => Ok(v),
        _ = R::sleep_until(deadline) => Err(Elapsed),
    }
}

/// Runs `f` for at most `d`.
pub async fn timeout<R: Runtime, F: Future>(d: Duration, f: F) -> Result<F::Output, Elapsed> {
    timeout_at::<R, F>(Instant::now() + d, f).await
}

/// Fills `buf` from the OS's random source (getrandom(2)). The fallback, for kernels without it
/// (< 3.17), mixes time and pid: unique enough for ids, never used for secrets here.
pub fn random_bytes(buf: &mut [u8]) {
    // SAFETY: getrandom(2) writes at most `buf.len()` bytes into our buffer.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let mut x = blake3::Hasher::new();
        x.update(&t.to_le_bytes()).update(&std::process::id().to_le_bytes());
        x.finalize_xof().fill(buf);
    }
}

/// Declares, in a runtime crate, the public API every runtime crate shares: the modules
/// `signaling`, `conn`, `client` and `files` and the crate-root re-exports, with the generic
/// types fixed to `$rt` (so `SignalingClient`, `PeerConnection` and `JobClient` are plain names,
/// as in sleap-rtc-tokio before the split). Written once here so that the two crates cannot
/// drift apart.
#[macro_export]
macro_rules! runtime_api {
    ($rt:ty) => {
        pub mod signaling {
            //! Signaling client: one WebSocket to a sleap-rtc (or upstream-compatible) signaling
            //! server (see [`sleap_rtc_driver::signaling`]).
            pub use $crate::signaling::{Registered, SignalingError};
            /// A registered signaling connection on this runtime.
            pub type SignalingClient = $crate::signaling::SignalingClient<$rt>;
        }
        pub mod conn {
            //! WebRTC peer connections over this runtime's UDP sockets (see
            //! [`sleap_rtc_driver::conn`]).
            pub use $crate::conn::{
                ConnError, ConnState, PeerOptions, Received, Sent, Transfer, accept, connect, default_ips,
            };
            /// Handle to a connected peer on this runtime.
            pub type PeerConnection = $crate::conn::PeerConnection<$rt>;
            /// Generates this process's DTLS certificate in the background.
            pub fn prepare_certificate() {
                $crate::conn::prepare_certificate::<$rt>()
            }
            /// Waits until this process's DTLS certificate exists.
            pub async fn certificate_ready() {
                $crate::conn::certificate_ready::<$rt>().await
            }
        }
        pub mod client {
            //! The client half of the job protocol (see [`sleap_rtc_driver::client`]).
            pub use $crate::client::{ClientAuth, JobClientError};
            /// An authenticated connection to a worker on this runtime.
            pub type JobClient = $crate::client::JobClient<$rt>;
        }
        pub use conn::{ConnError, PeerConnection, PeerOptions, Received, Sent, Transfer, accept, connect};
        pub use signaling::{Registered, SignalingClient, SignalingError};
        pub use $crate::files;
    };
}
