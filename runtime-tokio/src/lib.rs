//! sleap-rtc-tokio: drives `sleap-rtc-core` with tokio.
//!
//! - [`signaling::SignalingClient`]: registers with a signaling server (async-tungstenite),
//!   discovery, requests with `request_id` correlation, relay subscriptions.
//! - [`conn::connect`] / [`conn::accept`]: WebRTC data-channel connections to a peer found through
//!   signaling, driven over tokio UDP sockets; [`conn::PeerConnection`] sends and receives control
//!   messages and files (resumable, verified).
//! - [`client`], [`worker`], [`trainer`], [`registry`]: the job protocol's two halves.
//!
//! All of it is `sleap-rtc-driver`'s runtime-generic code with [`Tokio`] as the runtime (the
//! same API as `sleap-rtc-smol`); this crate is only the [`sleap_rtc_driver::Runtime`] impl.

sleap_rtc_driver::runtime_api!(crate::Tokio);

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Instant;

use sleap_rtc_driver::udp::{BatchIo, Datagrams, RecvMeta};
use tokio::io::Interest;

/// The tokio [`sleap_rtc_driver::Runtime`]: tasks on the current tokio runtime, its blocking
/// pool, timer and reactor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tokio;

/// A tokio UDP socket, with quinn-udp's state for the batch calls.
#[derive(Debug)]
pub struct TokioUdp {
    io: tokio::net::UdpSocket,
    batch: BatchIo,
}

impl sleap_rtc_driver::UdpSocket for TokioUdp {
    fn poll_recv_from(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<(usize, SocketAddr)>> {
        let mut rb = tokio::io::ReadBuf::new(buf);
        self.io.poll_recv_from(cx, &mut rb).map_ok(|src| (rb.filled().len(), src))
    }

    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.io.try_send_to(buf, to)
    }

    fn poll_recv_batch(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // As quinn's tokio runtime does: `try_io` clears tokio's readiness on `WouldBlock`, so
        // the next `poll_recv_ready` really waits.
        loop {
            std::task::ready!(self.io.poll_recv_ready(cx))?;
            match self.io.try_io(Interest::READABLE, || self.batch.recv(&self.io, bufs, meta)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn try_send_batch(&self, d: &Datagrams<'_>) -> io::Result<()> {
        self.io.try_io(Interest::WRITABLE, || self.batch.send(&self.io, d))
    }

    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.poll_send_ready(cx)
    }

    fn max_segments(&self) -> usize {
        self.batch.max_segments()
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
        let batch = BatchIo::new(&sock)?;
        Ok(TokioUdp { io: tokio::net::UdpSocket::from_std(sock)?, batch })
    }

    async fn resolve(host: String, port: u16) -> io::Result<Vec<SocketAddr>> {
        tokio::net::lookup_host((host.as_str(), port)).await.map(Iterator::collect)
    }

    fn ws_connect(url: String) -> impl Future<Output = Result<Self::Ws, async_tungstenite::tungstenite::Error>> + Send {
        init_tls();
        async move { async_tungstenite::tokio::connect_async(url).await.map(|(ws, _)| ws) }
    }

    type Child = TokioChild;

    fn spawn_process(mut cmd: std::process::Command) -> io::Result<TokioChild> {
        use std::process::Stdio;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        tokio::process::Command::from(cmd).kill_on_drop(true).spawn().map(TokioChild)
    }

    fn tokio_compat<F: Future + Send>(f: F) -> impl Future<Output = F::Output> + Send {
        f
    }
}

/// A tokio child process.
#[derive(Debug)]
pub struct TokioChild(tokio::process::Child);

/// tokio's pipes implement tokio's `AsyncRead`; the driver reads through futures-io's.
struct Pipe<T>(T);

impl<T: tokio::io::AsyncRead + Unpin> futures_util::AsyncRead for Pipe<T> {
    fn poll_read(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut rb = tokio::io::ReadBuf::new(buf);
        std::pin::Pin::new(&mut self.get_mut().0).poll_read(cx, &mut rb).map_ok(|()| rb.filled().len())
    }
}

impl sleap_rtc_driver::ChildProcess for TokioChild {
    fn id(&self) -> Option<u32> {
        self.0.id()
    }

    fn take_stdout(&mut self) -> Option<sleap_rtc_driver::ChildPipe> {
        self.0.stdout.take().map(|p| Box::pin(Pipe(p)) as _)
    }

    fn take_stderr(&mut self) -> Option<sleap_rtc_driver::ChildPipe> {
        self.0.stderr.take().map(|p| Box::pin(Pipe(p)) as _)
    }

    fn wait(&mut self) -> impl Future<Output = io::Result<std::process::ExitStatus>> + Send {
        self.0.wait()
    }
}
