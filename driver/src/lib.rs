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
//! - [`client::JobClient`]: the client half of the job protocol; [`worker::Worker`] the worker
//!   half, running `sleap-nn` through [`trainer`] and publishing to a model [`registry`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::{Error as WsError, Message};
use futures_util::{Sink, Stream};

pub mod cert;
pub mod client;
pub mod conn;
pub mod files;
pub mod registry;
pub mod signaling;
// The worker (and the trainer it supervises: process groups, signals) is Unix-only; the
// client half builds for Windows too.
#[cfg(unix)]
pub mod trainer;
pub mod udp;
#[cfg(unix)]
pub mod worker;

/// What a runtime provides to the drivers: tasks, a blocking pool, timers, UDP sockets, name
/// resolution, a WebSocket connection, child processes, and a way to run tokio-based libraries'
/// futures. Everything else (protocol, flow control, file layout, jobs, the trainer, registry
/// stores) is shared. Implemented by a zero-sized marker type (`sleap_rtc_tokio::Tokio`,
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

    /// A child process started by [`Runtime::spawn_process`].
    type Child: ChildProcess;
    /// Starts `cmd` with stdin from /dev/null, stdout and stderr piped (readable through
    /// [`ChildProcess::take_stdout`]/[`ChildProcess::take_stderr`]), killed if the handle is
    /// dropped before it exits. Everything else (argv, cwd, env, process group, `pre_exec`) is
    /// as `cmd` says.
    fn spawn_process(cmd: std::process::Command) -> io::Result<Self::Child>;
    /// Runs `f`, a future of a tokio-based I/O library (zeromq's TCP transport, reqwest, the AWS
    /// SDK), with a tokio reactor available. On tokio this is `f` itself; other runtimes
    /// provide one (smol: async-compat's background single-thread tokio runtime).
    fn tokio_compat<F: Future + Send>(f: F) -> impl Future<Output = F::Output> + Send;
}

/// A pipe from a child process.
pub type ChildPipe = std::pin::Pin<Box<dyn futures_util::AsyncRead + Send>>;

/// What the trainer needs of a running child process.
pub trait ChildProcess: Send + 'static {
    /// Its pid, `None` once it has been reaped.
    fn id(&self) -> Option<u32>;
    /// Its stdout, once.
    fn take_stdout(&mut self) -> Option<ChildPipe>;
    /// Its stderr, once.
    fn take_stderr(&mut self) -> Option<ChildPipe>;
    /// Waits for it to exit (and reaps it). Cancel-safe: may be dropped and called again.
    fn wait(&mut self) -> impl Future<Output = io::Result<std::process::ExitStatus>> + Send;
}

/// Runs `cmd` to completion for at most `limit`: its exit status and stdout. stderr is read and
/// discarded (closing it instead would kill a chatty child, one printing a Python warning say,
/// with EPIPE). `None` if it could not be started, failed to be waited for, or ran too long (it
/// is then killed).
pub async fn output<R: Runtime>(
    cmd: std::process::Command,
    limit: Duration,
) -> Option<(std::process::ExitStatus, Vec<u8>)> {
    use futures_util::AsyncReadExt;
    let mut child = R::spawn_process(cmd).ok()?;
    let (mut out, mut err) = (child.take_stdout()?, child.take_stderr()?);
    timeout::<R, _>(limit, async move {
        let (mut buf, mut sink) = (Vec::new(), Vec::new());
        let (o, _) = tokio::join!(out.read_to_end(&mut buf), err.read_to_end(&mut sink));
        o.ok()?;
        let st = child.wait().await.ok()?;
        Some((st, buf))
    })
    .await
    .ok()
    .flatten()
}

/// Spawns `f` on `R`, returning a handle that stops it (the future is dropped at its next wake).
pub fn spawn_abortable<R: Runtime, F: Future<Output = ()> + Send + 'static>(f: F) -> futures_util::future::AbortHandle {
    let (f, handle) = futures_util::future::abortable(f);
    R::spawn(async move {
        let _ = f.await;
    });
    handle
}

/// Sleeps for `d` on `R`'s timer.
pub async fn sleep<R: Runtime>(d: Duration) {
    R::sleep_until(Instant::now() + d).await
}

/// Selects the TLS crypto provider (aws-lc-rs, already built for str0m's DTLS) for `wss://` and
/// `https://` connections. Idempotent; called before any connection is made.
pub fn init_tls() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The UDP operations a peer connection needs. The sockets come from [`Runtime::udp`], bound by
/// the driver ([`udp::bind`]). The single-datagram methods serve STUN gathering, before the peer
/// can send anything; the connection itself runs on the batch methods, which [`udp::BatchIo`]
/// implements for any runtime that can wait for readiness.
pub trait UdpSocket: Send + Sync + 'static {
    /// Receives one datagram, registering `cx`'s waker when none is ready. (With GRO enabled,
    /// which [`udp::BatchIo::new`] does on Linux, a train from a GSO sender would arrive here as
    /// one buffer: only STUN answers are read this way.)
    fn poll_recv_from(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<(usize, SocketAddr)>>;
    /// Sends one datagram without waiting (`WouldBlock` when the socket buffer is full).
    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize>;
    /// Receives up to `bufs.len()` messages at once (recvmmsg), filling `meta[i]` for each
    /// `bufs[i]` received; ready with how many (at least one). Registers `cx`'s waker when none
    /// is ready. A message may hold several datagrams ([`udp::RecvMeta::stride`], GRO).
    fn poll_recv_batch(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [udp::RecvMeta],
    ) -> Poll<io::Result<usize>>;
    /// Sends the datagrams of `d` in one call without waiting (UDP GSO when `d` holds several;
    /// never more than [`UdpSocket::max_segments`]). `WouldBlock` when the socket buffer is full,
    /// and then none of them was sent: wait with [`UdpSocket::poll_writable`] and retry.
    fn try_send_batch(&self, d: &udp::Datagrams<'_>) -> io::Result<()>;
    /// Ready when the socket may have room to send again, registering `cx`'s waker otherwise.
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Datagrams one [`UdpSocket::try_send_batch`] may carry (1: no GSO). May drop to 1 after a
    /// device refused GSO.
    fn max_segments(&self) -> usize;
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

/// The operating system gave no random bytes. Nothing here falls back to a guessable source
/// (the room-secret challenge nonce is made with these bytes), so whatever needed them fails.
#[derive(Debug, thiserror::Error)]
#[error("no randomness from the operating system: {0}")]
pub struct NoRandomness(getrandom::Error);

/// Fills `buf` from the operating system's random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), NoRandomness> {
    getrandom::fill(buf).map_err(NoRandomness)
}

/// Declares, in a runtime crate, the public API every runtime crate shares: the modules
/// `signaling`, `conn`, `client`, `worker`, `trainer`, `registry` and `files` and the crate-root
/// re-exports, with the generic types fixed to `$rt` (so `SignalingClient`, `PeerConnection`,
/// `JobClient` and `Worker` are plain names, as in sleap-rtc-tokio before the split). Written
/// once here so that the two crates cannot drift apart.
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
                ConnError, ConnState, PeerOptions, Received, Route, Sent, Transfer, TransferFailure, accept, connect,
                default_ips,
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
        #[cfg(unix)]
        pub mod worker {
            //! The worker half of the job protocol (see [`sleap_rtc_driver::worker`]).
            pub use $crate::worker::{
                AUTH_TIMEOUT, Capabilities, JournalEntry, PROGRESS_INTERVAL, ProgressBoard, WorkerConfig, WorkerError,
                http_base, registry_summary,
            };
            /// A worker on this runtime.
            pub type Worker = $crate::worker::Worker<$rt>;
            /// GPU, sleap-nn version, free disk (see [`sleap_rtc_driver::worker::probe_capabilities`]).
            pub async fn probe_capabilities(sleap_nn: &::std::path::Path, dir: &::std::path::Path) -> Capabilities {
                $crate::worker::probe_capabilities::<$rt>(sleap_nn, dir).await
            }
        }
        #[cfg(unix)]
        pub mod trainer {
            //! Runs `sleap-nn` (see [`sleap_rtc_driver::trainer`]).
            pub use $crate::trainer::{EventTx, Exit, InterruptRx, Launch, Supervision, TrainerError, TrainerEvent};
            /// `sleap-nn --version` (see [`sleap_rtc_driver::trainer::sleap_nn_version`]).
            pub async fn sleap_nn_version(program: &::std::path::Path) -> Option<String> {
                $crate::trainer::sleap_nn_version::<$rt>(program).await
            }
            /// Runs `sleap-nn train` (see [`sleap_rtc_driver::trainer::run_train`]).
            pub async fn run_train(
                launch: &Launch,
                args: impl FnOnce(u16, u16) -> Vec<String>,
                sup: &Supervision,
                interrupt: InterruptRx,
                events: EventTx,
            ) -> Result<Exit, TrainerError> {
                $crate::trainer::run_train::<$rt>(launch, args, sup, interrupt, events).await
            }
            /// Runs `sleap-nn predict` (see [`sleap_rtc_driver::trainer::run_predict`]).
            pub async fn run_predict(
                launch: &Launch,
                argv: &[String],
                sup: &Supervision,
                interrupt: InterruptRx,
                events: EventTx,
            ) -> Result<Exit, TrainerError> {
                $crate::trainer::run_predict::<$rt>(launch, argv, sup, interrupt, events).await
            }
        }
        pub mod registry {
            //! Model registry stores (see [`sleap_rtc_driver::registry`]).
            pub use $crate::registry::{
                MODEL_FILES, PublishInfo, Store, StoreError, dataset_hash, manifest, publish, pull, update,
            };
            /// A directory store on this runtime.
            pub type LocalStore = $crate::registry::LocalStore<$rt>;
            /// A directory or S3 store on this runtime.
            pub type AnyStore = $crate::registry::AnyStore<$rt>;
        }
        pub use conn::{
            ConnError, PeerConnection, PeerOptions, Received, Sent, Transfer, TransferFailure, accept, connect,
        };
        pub use signaling::{Registered, SignalingClient, SignalingError};
        pub use $crate::{files, init_tls};
    };
}

#[cfg(test)]
mod tests {
    /// Set in the child that [`no_randomness_is_an_error_not_a_guess`] re-executes.
    const CHILD: &str = "SLEAP_RTC_TEST_NO_RANDOMNESS";

    /// With the kernel's random source blocked (a seccomp filter refusing getrandom(2) and any
    /// file open, so /dev/urandom is out of reach too), `random_bytes` must fail. It used to
    /// fill the buffer from the time and the pid instead: a guessable room-secret nonce.
    #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
    #[test]
    fn no_randomness_is_an_error_not_a_guess() {
        if std::env::var_os(CHILD).is_some() {
            // The filter is confined to this thread (no TSYNC), which leaves through `_exit`: no
            // other code runs under it, not even the harness's report.
            block_randomness();
            let code = match super::random_bytes(&mut [0u8; 16]) {
                Err(_) => 0,
                Ok(()) => 1,
            };
            // SAFETY: ends the process; nothing is left that needs unwinding or flushing.
            unsafe { libc::_exit(code) }
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let status = std::process::Command::new(exe)
            .args(["--exact", "tests::no_randomness_is_an_error_not_a_guess", "--test-threads=1"])
            .env(CHILD, "1")
            .stdout(std::process::Stdio::null())
            .status()
            .expect("the child runs");
        assert_eq!(status.code(), Some(0), "random_bytes produced bytes without the OS's random source");
    }

    /// Installs, on the calling thread, a seccomp filter under which getrandom(2) fails with
    /// EPERM (which the getrandom crate answers by reading /dev/urandom) and every open fails
    /// with ENOENT.
    #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn block_randomness() {
        use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W, sock_filter, sock_fprog};
        #[cfg(target_arch = "x86_64")]
        const ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
        #[cfg(target_arch = "aarch64")]
        const ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
        let stmt = |code: u32, k: u32| sock_filter { code: code as u16, jt: 0, jf: 0, k };
        let jeq = |k: u32, jt: u8, jf: u8| sock_filter { code: (BPF_JMP | BPF_JEQ | BPF_K) as u16, jt, jf, k };
        let ret = |k: u32| stmt(BPF_RET | BPF_K, k);
        let errno = |e: i32| ret(libc::SECCOMP_RET_ERRNO | e as u32);
        #[cfg(target_arch = "x86_64")]
        let open = libc::SYS_open as u32;
        #[cfg(target_arch = "aarch64")]
        let open = libc::SYS_openat as u32; // aarch64 has no open(2)
        // Jump offsets count from the next instruction.
        let prog = [
            // seccomp_data: `nr` at offset 0, `arch` at 4. A foreign arch is left alone.
            stmt(BPF_LD | BPF_W | BPF_ABS, 4),
            jeq(ARCH, 0, 4),
            stmt(BPF_LD | BPF_W | BPF_ABS, 0),
            jeq(libc::SYS_getrandom as u32, 3, 0),
            jeq(libc::SYS_openat as u32, 3, 0),
            jeq(open, 2, 0),
            ret(libc::SECCOMP_RET_ALLOW),
            errno(libc::EPERM),
            errno(libc::ENOENT),
        ];
        let fprog = sock_fprog { len: prog.len() as u16, filter: prog.as_ptr().cast_mut() };
        // SAFETY: `fprog` points at `prog`, alive for the call; the kernel copies the program.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0, "no_new_privs");
            assert_eq!(
                libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &fprog as *const sock_fprog),
                0,
                "seccomp filter"
            );
        }
    }
}
