//! sleap-rtc-smol: drives `sleap-rtc-core` with smol.
//!
//! The same API as `sleap-rtc-tokio` for the signaling client ([`signaling::SignalingClient`]),
//! peer connections ([`conn::connect`], [`conn::accept`], [`conn::PeerConnection`]), file
//! transfer ([`files`], [`conn::PeerConnection::send_files`]), the job client
//! ([`client::JobClient`]) and the worker ([`worker::Worker`], with [`trainer`] and
//! [`registry`]): both crates instantiate `sleap-rtc-driver`'s runtime-generic code, this one
//! with [`Smol`] — async-io's reactor and timers, smol's global executor and blocking pool,
//! async-tungstenite over async-net, async-process for `sleap-nn`. tokio's runtime-free `sync`
//! channels are the API's channel types (see docs/runtime-seam.md). A client starts no tokio
//! runtime; a worker's three tokio-based libraries (zeromq for sleap-nn's progress, reqwest for
//! the server's JWKS, the AWS SDK for an S3 registry) run under async-compat, which starts one
//! background thread with a single-threaded tokio reactor the first time one of them is used.

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Instant;

use sleap_rtc_driver::udp::{BatchIo, Datagrams, RecvMeta};

sleap_rtc_driver::runtime_api!(crate::Smol);

/// The smol [`sleap_rtc_driver::Runtime`]: tasks on smol's global executor (`smol::spawn`), its
/// blocking pool (`smol::unblock`), async-io timers and reactor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Smol;

/// A UDP socket registered with async-io's reactor, with quinn-udp's state for the batch calls.
#[derive(Debug)]
pub struct SmolUdp {
    io: smol::Async<std::net::UdpSocket>,
    batch: BatchIo,
}

impl sleap_rtc_driver::UdpSocket for SmolUdp {
    fn poll_recv_from(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<(usize, SocketAddr)>> {
        // The socket is non-blocking (`Async::new` made it so): try first, and wait for
        // readiness only when there is nothing to read.
        self.poll_read_with(cx, |s| s.recv_from(buf))
    }

    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.io.get_ref().send_to(buf, to)
    }

    fn poll_recv_batch(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.poll_read_with(cx, |s| self.batch.recv(s, bufs, meta))
    }

    fn try_send_batch(&self, d: &Datagrams<'_>) -> io::Result<()> {
        self.batch.send(self.io.get_ref(), d)
    }

    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.poll_writable(cx)
    }

    fn max_segments(&self) -> usize {
        self.batch.max_segments()
    }
}

impl SmolUdp {
    fn poll_read_with<T>(
        &self,
        cx: &mut Context<'_>,
        mut op: impl FnMut(&std::net::UdpSocket) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            match op(self.io.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
            std::task::ready!(self.io.poll_readable(cx))?;
        }
    }
}

impl sleap_rtc_driver::Runtime for Smol {
    type Udp = SmolUdp;
    type Ws = async_tungstenite::WebSocketStream<async_tungstenite::smol::ConnectStream>;

    fn spawn<F: Future<Output = ()> + Send + 'static>(f: F) {
        smol::spawn(f).detach();
    }

    fn spawn_blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        f: F,
    ) -> impl Future<Output = Option<T>> + Send {
        // `unblock` re-raises a panic of `f` in the awaiting task; catch it here so that a panic
        // in hashing fails one file, as on tokio, instead of the connection's task.
        smol::unblock(move || std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok())
    }

    fn sleep_until(deadline: Instant) -> impl Future<Output = ()> + Send {
        let t = smol::Timer::at(deadline);
        async move {
            t.await;
        }
    }

    fn udp(sock: std::net::UdpSocket) -> io::Result<SmolUdp> {
        let batch = BatchIo::new(&sock)?;
        Ok(SmolUdp { io: smol::Async::new(sock)?, batch })
    }

    async fn resolve(host: String, port: u16) -> io::Result<Vec<SocketAddr>> {
        smol::net::resolve((host.as_str(), port)).await
    }

    fn ws_connect(url: String) -> impl Future<Output = Result<Self::Ws, async_tungstenite::tungstenite::Error>> + Send {
        init_tls();
        async move { async_tungstenite::smol::connect_async(url).await.map(|(ws, _)| ws) }
    }

    type Child = SmolChild;

    fn spawn_process(cmd: std::process::Command) -> io::Result<SmolChild> {
        use smol::process::Stdio;
        // `From` keeps argv, cwd, env, process group and pre_exec; the pipes are set here
        // because async-process would otherwise make them inherited.
        smol::process::Command::from(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map(|c| SmolChild { child: c, reaped: false })
    }

    fn tokio_compat<F: Future + Send>(f: F) -> impl Future<Output = F::Output> + Send {
        async_compat::Compat::new(f)
    }
}

/// An async-process child.
#[derive(Debug)]
pub struct SmolChild {
    child: smol::process::Child,
    reaped: bool,
}

impl sleap_rtc_driver::ChildProcess for SmolChild {
    fn id(&self) -> Option<u32> {
        // async-process keeps the pid after reaping; the contract (tokio's) is `None` then, so
        // that nobody signals a pid that may have been reused.
        (!self.reaped).then(|| self.child.id())
    }

    fn take_stdout(&mut self) -> Option<sleap_rtc_driver::ChildPipe> {
        self.child.stdout.take().map(|p| Box::pin(p) as _)
    }

    fn take_stderr(&mut self) -> Option<sleap_rtc_driver::ChildPipe> {
        self.child.stderr.take().map(|p| Box::pin(p) as _)
    }

    async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        // `status()` would close stdin first; ours is /dev/null already.
        let st = self.child.status().await?;
        self.reaped = true;
        Ok(st)
    }
}
