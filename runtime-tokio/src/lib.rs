//! sleap-rtc-tokio: drives `sleap-rtc-core` with tokio.
//!
//! - [`signaling::SignalingClient`]: registers with a signaling server (async-tungstenite),
//!   discovery, requests with `request_id` correlation, relay subscriptions.
//! - [`conn::connect`] / [`conn::accept`]: WebRTC data-channel connections to a peer found through
//!   signaling, driven over tokio UDP sockets; [`conn::PeerConnection`] sends and receives control
//!   messages and files (resumable, verified).
//! - [`client`], [`worker`], [`trainer`], [`registry`]: the job protocol's two halves.
//!
//! The first four modules are `sleap-rtc-driver`'s runtime-generic code with [`Tokio`] as the
//! runtime (the same API as `sleap-rtc-smol`); the worker, trainer and registry are tokio-only.

pub mod registry;
pub mod trainer;
pub mod worker;

sleap_rtc_driver::runtime_api!(crate::Tokio);

pub(crate) use sleap_rtc_driver::random_bytes;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Instant;

/// The tokio [`sleap_rtc_driver::Runtime`]: tasks on the current tokio runtime, its blocking
/// pool, timer and reactor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tokio;

/// A tokio UDP socket.
#[derive(Debug)]
pub struct TokioUdp(tokio::net::UdpSocket);

impl sleap_rtc_driver::UdpSocket for TokioUdp {
    fn poll_recv_from(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<(usize, SocketAddr)>> {
        let mut rb = tokio::io::ReadBuf::new(buf);
        self.0.poll_recv_from(cx, &mut rb).map_ok(|src| (rb.filled().len(), src))
    }

    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.0.try_send_to(buf, to)
    }

    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        self.0.send_to(buf, to)
    }
}

impl sleap_rtc_driver::Runtime for Tokio {
    type Udp = TokioUdp;
    type Ws = async_tungstenite::WebSocketStream<async_tungstenite::tokio::ConnectStream>;

    fn spawn<F: Future<Output = ()> + Send + 'static>(f: F) {
        tokio::spawn(f);
    }

    fn spawn_blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        f: F,
    ) -> impl Future<Output = Option<T>> + Send {
        let task = tokio::task::spawn_blocking(f);
        async move { task.await.ok() }
    }

    fn sleep_until(deadline: Instant) -> impl Future<Output = ()> + Send {
        tokio::time::sleep_until(deadline.into())
    }

    fn udp(sock: std::net::UdpSocket) -> io::Result<TokioUdp> {
        tokio::net::UdpSocket::from_std(sock).map(TokioUdp)
    }

    async fn resolve(host: String, port: u16) -> io::Result<Vec<SocketAddr>> {
        tokio::net::lookup_host((host.as_str(), port)).await.map(Iterator::collect)
    }

    fn ws_connect(url: String) -> impl Future<Output = Result<Self::Ws, async_tungstenite::tungstenite::Error>> + Send {
        init_tls();
        async move { async_tungstenite::tokio::connect_async(url).await.map(|(ws, _)| ws) }
    }
}

/// Selects the TLS crypto provider (aws-lc-rs) for `wss://` and `https://` servers. Idempotent;
/// called before any connection is made.
pub fn init_tls() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
