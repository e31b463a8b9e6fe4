//! A peer connection driven by a [`Runtime`]: UDP sockets, the session timer, and file I/O for
//! `core::session::Session`.
//!
//! One task owns the [`Session`], the sockets and the open files; the [`PeerConnection`] handle
//! talks to it through channels. Chunk reads and `.part` writes are plain positioned reads and
//! writes on that task: they hit the page cache in microseconds, far less than a hop through a
//! thread pool per 16 KiB chunk would cost. Hashing a finished file and fsync+rename can take
//! seconds, so they run on the runtime's blocking pool and report back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sleap_rtc_core::relay::{Relay, Relayed};
use sleap_rtc_core::session::{
    Direction, IoRequest, SendError, Session, SessionConfig, SessionEvent, SessionOutput, TransferFailed,
};
use sleap_rtc_core::signal::ServerMessage;
use sleap_rtc_core::stun;
use sleap_rtc_core::transfer::{Manifest, Progress, TransferError};
use tokio::sync::{mpsc, oneshot, watch};

use crate::files::{self, SendSet};

mod file_io;
mod gather;
mod handshake;
mod task;

use gather::*;

use crate::signaling::{SignalingClient, SignalingError};
use crate::udp::{self, RxBatch, TxBatch};
use crate::{Runtime, UdpSocket};
pub use handshake::{accept, certificate_ready, connect, prepare_certificate};

/// How a connection is set up.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    pub session: SessionConfig,
    /// Local addresses to bind (one UDP socket each, port chosen by the OS); each becomes a host
    /// candidate. Default: every up interface's IPv4 address, loopback included.
    pub bind_ips: Vec<IpAddr>,
    /// How long connecting may take (signaling round trip + ICE + DTLS + SCTP).
    pub connect_timeout: Duration,
    /// STUN server URLs (`stun:host:port`) for server-reflexive candidates, in addition to the
    /// `ice_servers` the signaling server hands out in `registered_auth`.
    pub ice_servers: Vec<String>,
    /// How long to wait for STUN answers before connecting with what we have.
    pub stun_timeout: Duration,
    /// How long TURN allocations may take (two round trips to the relay: a challenge, then the
    /// allocation) before connecting without them.
    pub turn_timeout: Duration,
    /// Offer only relayed candidates (WebRTC's `iceTransportPolicy: "relay"`): every byte goes
    /// through the TURN server, and the peer never learns our addresses. Fails with
    /// [`ConnError::NoRelay`] when no TURN server allocated an address.
    pub relay_only: bool,
}

impl Default for PeerOptions {
    fn default() -> Self {
        PeerOptions {
            session: SessionConfig::default(),
            bind_ips: default_ips(),
            connect_timeout: Duration::from_secs(20),
            ice_servers: Vec::new(),
            stun_timeout: Duration::from_millis(500),
            turn_timeout: Duration::from_secs(3),
            relay_only: false,
        }
    }
}

impl PeerOptions {
    /// Loopback only: for tests and same-machine use.
    pub fn loopback() -> Self {
        PeerOptions { bind_ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)], ..Default::default() }
    }
}

/// IPv4 addresses of the machine's interfaces (loopback last), for host candidates.
pub fn default_ips() -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = if_addrs::get_if_addrs()
        .map(|v| v.into_iter().map(|i| i.ip()).filter(|ip| ip.is_ipv4() && !ip.is_loopback()).collect())
        .unwrap_or_default();
    ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    ips
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Signaling(#[from] SignalingError),
    #[error("WebRTC negotiation failed: {0}")]
    Peer(#[from] sleap_rtc_core::peer::PeerError),
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    #[error("the peer did not answer the offer within {0:?}")]
    NoAnswer(Duration),
    #[error("the connection did not open within {0:?} (no route between the peers' candidates?)")]
    OpenTimeout(Duration),
    #[error("the offer is malformed: {0}")]
    BadOffer(String),
    #[error("the connection closed")]
    Closed,
    #[error(
        "relay-only was asked for, but no TURN server gave us a relayed address (does the signaling server hand out turn: servers?)"
    )]
    NoRelay,
    #[error("transfer failed: {0}")]
    Transfer(#[from] TransferFailure),
}

/// Why a transfer did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferFailure {
    /// The transfer protocol ended it (a cancel, a refusal, a bad frame).
    #[error(transparent)]
    Session(#[from] TransferFailed),
    /// It could not be queued (a manifest too large for one message, the same files already
    /// being sent).
    #[error(transparent)]
    NotQueued(#[from] SendError),
    /// The files to send could not be read or hashed.
    #[error("{0}")]
    Files(String),
    /// The connection closed first.
    #[error("connection closed")]
    Closed,
    /// The connection closed during a receive; its `.part` files are kept for a resume.
    #[error("connection closed; .part files are kept for a resume")]
    ClosedPartsKept,
}

/// Connection state, as the handle sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnState {
    Connecting,
    Open { remote_fingerprint: Option<String> },
    Closed,
}

/// The path a connection's traffic takes, once known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Straight between the peers' own (or NAT-mapped) addresses.
    Direct,
    /// Through a TURN server (ours, the remote's, or both).
    Relayed,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Route::Direct => "direct",
            Route::Relayed => "relayed through TURN",
        })
    }
}

const ROUTE_UNKNOWN: u8 = 0;
const ROUTE_DIRECT: u8 = 1;
const ROUTE_RELAYED: u8 = 2;

/// What a finished incoming transfer produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// Final paths of the files that arrived and verified.
    pub files: Vec<PathBuf>,
    /// Relative names of files that failed, with why.
    pub failed: Vec<(String, String)>,
}

/// Result of an outgoing transfer: names of files the receiver could not verify.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub transfer_id: u32,
    pub bytes: u64,
    /// Bytes the receiver already held from an interrupted attempt (not sent again).
    pub resumed_bytes: u64,
    pub failed: Vec<String>,
}

/// A transfer under way: watch `progress`, await `done`.
pub struct Transfer<T> {
    pub id: u32,
    pub progress: watch::Receiver<Progress>,
    pub done: oneshot::Receiver<Result<T, TransferFailure>>,
}

impl<T> Transfer<T> {
    /// Waits for the end of the transfer.
    pub async fn finish(self) -> Result<T, ConnError> {
        Ok(self.done.await.map_err(|_| ConnError::Closed)??)
    }
}

enum Cmd {
    Message(String),
    SendFiles {
        set: SendSet,
        progress: watch::Sender<Progress>,
        reply: oneshot::Sender<Result<Sent, TransferFailure>>,
        id: oneshot::Sender<u32>,
    },
    ReceiveFiles {
        dir: PathBuf,
        progress: watch::Sender<Progress>,
        reply: oneshot::Sender<Result<Received, TransferFailure>>,
    },
    Cancel(u32, String),
    RemoteCandidate(String),
    /// A message for the upstream channel (`true`: binary).
    Upstream(bool, Vec<u8>),
    Close,
}

impl Cmd {
    fn name(&self) -> &'static str {
        match self {
            Cmd::Message(_) => "message",
            Cmd::SendFiles { .. } => "send_files",
            Cmd::ReceiveFiles { .. } => "receive_files",
            Cmd::Cancel(..) => "cancel",
            Cmd::RemoteCandidate(_) => "remote_candidate",
            Cmd::Upstream(..) => "upstream",
            Cmd::Close => "close",
        }
    }
}

/// Handle to a connected peer, driven on runtime `R`.
pub struct PeerConnection<R> {
    cmd: mpsc::UnboundedSender<Cmd>,
    messages: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    upstream: tokio::sync::Mutex<mpsc::UnboundedReceiver<(bool, Vec<u8>)>>,
    upstream_label: Arc<OnceLock<String>>,
    /// Upstream bytes not yet acknowledged by the remote (queued or in flight).
    upstream_backlog: Arc<AtomicUsize>,
    state: watch::Receiver<ConnState>,
    local_fingerprint: String,
    local_candidates: Vec<String>,
    remote_peer: String,
    route: Arc<AtomicU8>,
    _rt: PhantomData<fn() -> R>,
}

impl<R> Drop for PeerConnection<R> {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Close);
    }
}

impl<R: Runtime> PeerConnection<R> {
    /// The peer id (in the signaling room) of the other side.
    pub fn remote_peer(&self) -> &str {
        &self.remote_peer
    }

    /// The path the connection's packets take (known once it is open; it can change if ICE
    /// switches pairs).
    pub fn route(&self) -> Option<Route> {
        match self.route.load(Ordering::Relaxed) {
            ROUTE_DIRECT => Some(Route::Direct),
            ROUTE_RELAYED => Some(Route::Relayed),
            _ => None,
        }
    }

    /// Our ICE candidates as SDP `candidate:` lines (host, server-reflexive, relayed).
    pub fn local_candidates(&self) -> &[String] {
        &self.local_candidates
    }

    /// Our DTLS certificate fingerprint (`sha-256 AB:...`).
    pub fn local_fingerprint(&self) -> &str {
        &self.local_fingerprint
    }

    /// The other side's DTLS fingerprint, once open.
    pub fn remote_fingerprint(&self) -> Option<String> {
        match &*self.state.borrow() {
            ConnState::Open { remote_fingerprint } => remote_fingerprint.clone(),
            _ => None,
        }
    }

    pub fn state(&self) -> ConnState {
        self.state.borrow().clone()
    }

    /// Sends a control message (a JSON object, e.g. a job message) on the `ctl` channel.
    pub fn send_message(&self, msg: &Value) -> Result<(), ConnError> {
        let text = msg.to_string();
        sleap_rtc_core::session::check_ctl_size(&text).map_err(TransferFailure::from)?;
        self.cmd.send(Cmd::Message(text)).map_err(|_| ConnError::Closed)
    }

    /// Next control message from the peer that is not part of the transfer protocol; `None`
    /// once the connection is closed.
    pub async fn recv_message(&self) -> Option<String> {
        self.messages.lock().await.recv().await
    }

    /// The label of the channel the remote opened if it speaks upstream's `TYPE::args` protocol
    /// (see `sleap_rtc_core::upstream`) instead of ours; known once the connection is open.
    pub fn upstream_label(&self) -> Option<&str> {
        self.upstream_label.get().map(String::as_str)
    }

    /// Sends a text message on the upstream channel.
    pub fn send_upstream_text(&self, text: &str) -> Result<(), ConnError> {
        self.send_upstream(false, text.as_bytes().to_vec())
    }

    /// Sends a message on the upstream channel (`binary`: raw bytes, else UTF-8 text).
    pub fn send_upstream(&self, binary: bool, data: Vec<u8>) -> Result<(), ConnError> {
        self.upstream_backlog.fetch_add(data.len(), Ordering::Relaxed);
        self.cmd.send(Cmd::Upstream(binary, data)).map_err(|_| ConnError::Closed)
    }

    /// Waits until at most `limit` upstream bytes are unacknowledged (a sender streaming a file
    /// calls this between chunks, as upstream's clients wait on `bufferedAmount`).
    pub async fn upstream_drained(&self, limit: usize) -> Result<(), ConnError> {
        while self.upstream_backlog.load(Ordering::Relaxed) > limit {
            if self.state() == ConnState::Closed {
                return Err(ConnError::Closed);
            }
            crate::sleep::<R>(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Next message on the upstream channel (`true`: binary); `None` once closed.
    pub async fn recv_upstream(&self) -> Option<(bool, Vec<u8>)> {
        self.upstream.lock().await.recv().await
    }

    /// Sends files and directories (a directory is sent whole, under its own name). Hashes the
    /// files first (on the blocking pool), then streams them.
    pub async fn send_files(&self, paths: &[PathBuf]) -> Result<Transfer<Sent>, ConnError> {
        let paths = paths.to_vec();
        let set = R::spawn_blocking(move || files::build_send_set(&paths))
            .await
            .ok_or_else(|| TransferFailure::Files("hashing the files panicked".into()))?
            .map_err(|e| TransferFailure::Files(e.to_string()))?;
        self.send_prepared(set).await
    }

    /// Sends a set already hashed by [`files::build_send_set`] (when the caller needed the
    /// manifest first, e.g. to announce the files of a job).
    pub async fn send_prepared(&self, set: SendSet) -> Result<Transfer<Sent>, ConnError> {
        let (progress_tx, progress) = watch::channel(Progress::default());
        let (reply, done) = oneshot::channel();
        let (id_tx, id_rx) = oneshot::channel();
        self.cmd
            .send(Cmd::SendFiles { set, progress: progress_tx, reply, id: id_tx })
            .map_err(|_| ConnError::Closed)?;
        match id_rx.await {
            Ok(id) => Ok(Transfer { id, progress, done }),
            // The driver refused the transfer (e.g. manifest too large) and said why on `done`.
            Err(_) => Err(match done.await {
                Ok(Err(e)) => ConnError::Transfer(e),
                _ => ConnError::Closed,
            }),
        }
    }

    /// Accepts the next incoming transfer into `dir` (created if missing). Files are written as
    /// `NAME.part`, verified, then renamed; `.part` files left by a cut are resumed.
    pub fn receive_files(&self, dir: &Path) -> Result<Transfer<Received>, ConnError> {
        let (progress_tx, progress) = watch::channel(Progress::default());
        let (reply, done) = oneshot::channel();
        self.cmd
            .send(Cmd::ReceiveFiles { dir: dir.to_path_buf(), progress: progress_tx, reply })
            .map_err(|_| ConnError::Closed)?;
        Ok(Transfer { id: 0, progress, done })
    }

    /// Cancels a transfer (either direction).
    pub fn cancel(&self, transfer: u32, reason: &str) {
        let _ = self.cmd.send(Cmd::Cancel(transfer, reason.to_owned()));
    }

    /// Waits until the connection closes (remote close or failure).
    pub async fn closed(&self) {
        let mut s = self.state.clone();
        let _ = s.wait_for(|s| *s == ConnState::Closed).await;
    }

    /// Closes gracefully.
    pub async fn close(self) {
        let _ = self.cmd.send(Cmd::Close);
        let mut s = self.state.clone();
        let _ = crate::timeout::<R, _>(Duration::from_secs(2), s.wait_for(|s| *s == ConnState::Closed)).await;
    }

    async fn wait_open(&self, timeout: Duration) -> Result<(), ConnError> {
        let mut s = self.state.clone();
        match crate::timeout::<R, _>(timeout, s.wait_for(|s| !matches!(s, ConnState::Connecting))).await {
            Err(_) => Err(ConnError::OpenTimeout(timeout)),
            Ok(Err(_)) => Err(ConnError::Closed),
            Ok(Ok(st)) if *st == ConnState::Closed => Err(ConnError::Closed),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

type Sockets<U> = Vec<(U, SocketAddr)>;

fn spawn<R: Runtime>(
    mut session: Session,
    gathered: Gathered<R::Udp>,
    remote_candidates: Vec<(SocketAddr, bool)>,
    mut relays: mpsc::UnboundedReceiver<ServerMessage>,
    remote: &str,
) -> PeerConnection<R> {
    let (cmd, cmd_rx) = mpsc::unbounded_channel();
    let (msg_tx, messages) = mpsc::unbounded_channel();
    let (upstream_tx, upstream) = mpsc::unbounded_channel();
    let upstream_label = Arc::new(OnceLock::new());
    let upstream_backlog = Arc::new(AtomicUsize::new(0));
    let (state_tx, state) = watch::channel(ConnState::Connecting);
    let local_fingerprint = session.peer().local_fingerprint();
    // Weak: trickled candidates must not keep the connection alive after its handle is gone.
    let relay_cmd = cmd.downgrade();
    let mut relay_state = state.clone();
    R::spawn(async move {
        loop {
            let m = tokio::select! {
                m = relays.recv() => m,
                _ = relay_state.wait_for(|s| *s == ConnState::Closed) => None,
            };
            let Some(m) = m else { break };
            if let ServerMessage::Candidate(o) = m {
                if let Some(c) = o.get("candidate").and_then(candidate_line) {
                    match relay_cmd.upgrade() {
                        Some(tx) if tx.send(Cmd::RemoteCandidate(c)).is_ok() => {}
                        _ => break,
                    }
                }
            }
        }
    });
    let Gathered { socks, cands: local_candidates, relays: mut turn } = gathered;
    let now = Instant::now();
    for (_, r) in &mut turn {
        for (a, _) in &remote_candidates {
            r.permit(now, a.ip());
        }
    }
    let remote_relays = remote_candidates.iter().filter(|(_, relay)| *relay).map(|(a, _)| *a).collect();
    let route = Arc::new(AtomicU8::new(ROUTE_UNKNOWN));
    let driver = Driver::<R> {
        session,
        socks,
        turn,
        turn_due: None,
        remote_relays,
        route: route.clone(),
        msg_tx,
        upstream_tx,
        upstream_label: upstream_label.clone(),
        upstream_backlog: upstream_backlog.clone(),
        state_tx,
        outgoing: HashMap::new(),
        receive_waiters: VecDeque::new(),
        answered: HashSet::new(),
        unclaimed: VecDeque::new(),
        incoming: HashMap::new(),
        io_tx: None,
        tx: TxBatch::default(),
    };
    R::spawn(driver.run(cmd_rx));
    PeerConnection {
        cmd,
        messages: tokio::sync::Mutex::new(messages),
        upstream: tokio::sync::Mutex::new(upstream),
        upstream_label,
        upstream_backlog,
        state,
        local_fingerprint,
        local_candidates,
        remote_peer: remote.to_owned(),
        route,
        _rt: PhantomData,
    }
}

struct OutFiles {
    set: SendSet,
    resumed_bytes: u64,
    handles: Vec<Option<File>>,
    progress: watch::Sender<Progress>,
    reply: Option<oneshot::Sender<Result<Sent, TransferFailure>>>,
}

struct ReceiveWaiter {
    dir: PathBuf,
    progress: watch::Sender<Progress>,
    reply: oneshot::Sender<Result<Received, TransferFailure>>,
}

struct InFiles {
    manifest: Manifest,
    parts: Vec<PathBuf>,
    finals: Vec<PathBuf>,
    handles: Vec<Option<File>>,
    committed: Vec<PathBuf>,
    failed: Vec<(String, String)>,
    progress: watch::Sender<Progress>,
    reply: Option<oneshot::Sender<Result<Received, TransferFailure>>>,
}

enum IoDone {
    Verified { transfer: u32, file: u32, result: Result<String, String> },
    Committed { transfer: u32, file: u32, result: Result<(), String> },
}

struct Driver<R: Runtime> {
    session: Session,
    socks: Sockets<R::Udp>,
    /// TURN allocations (socket index, relay) whose relayed addresses are our relay candidates.
    turn: Vec<(usize, Relay)>,
    /// When the relays next need time (retransmits, refreshes); `None`: look now.
    turn_due: Option<Instant>,
    /// The remote's relayed candidates: traffic to them goes through its TURN server.
    remote_relays: HashSet<SocketAddr>,
    route: Arc<AtomicU8>,
    msg_tx: mpsc::UnboundedSender<String>,
    upstream_tx: mpsc::UnboundedSender<(bool, Vec<u8>)>,
    upstream_label: Arc<OnceLock<String>>,
    upstream_backlog: Arc<AtomicUsize>,
    state_tx: watch::Sender<ConnState>,
    outgoing: HashMap<u32, OutFiles>,
    receive_waiters: VecDeque<ReceiveWaiter>,
    /// Transfers whose waiter was already told they failed (while preparing the destination),
    /// so the session's own end-of-transfer event for them must not fail another waiter.
    answered: HashSet<u32>,
    /// Offers that arrived before anyone called `receive_files`.
    unclaimed: VecDeque<(u32, Manifest)>,
    incoming: HashMap<u32, InFiles>,
    io_tx: Option<mpsc::UnboundedSender<IoDone>>,
    /// Datagrams the session produced that are not sent yet (see [`Driver::flush`]).
    tx: TxBatch,
}

/// Datagrams fed to the session per wake-up before the driver looks at anything else (commands,
/// file results, the timer): enough for long GSO runs out of the drains they cause, short enough
/// to keep a burst to well under a millisecond or two.
const BURST: usize = 64;

/// Transmits buffered before they are sent even in the middle of a burst or a drain: about one
/// full GSO send, so waiting longer would not make the sends fewer, only later.
const TX_FLUSH: usize = 64;

impl From<TransferError> for ConnError {
    fn from(e: TransferError) -> Self {
        ConnError::Transfer(TransferFailure::Session(e.into()))
    }
}
