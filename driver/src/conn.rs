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
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sleap_rtc_core::session::{Direction, IoRequest, Session, SessionConfig, SessionEvent, SessionOutput};
use sleap_rtc_core::signal::ServerMessage;
use sleap_rtc_core::stun;
use sleap_rtc_core::transfer::{Manifest, Progress, TransferError};
use tokio::sync::{mpsc, oneshot, watch};

use crate::files::{self, SendSet};
use crate::signaling::{SignalingClient, SignalingError};
use crate::udp::{self, RxBatch, TxBatch};
use crate::{Runtime, UdpSocket};

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
}

impl Default for PeerOptions {
    fn default() -> Self {
        PeerOptions {
            session: SessionConfig::default(),
            bind_ips: default_ips(),
            connect_timeout: Duration::from_secs(20),
            ice_servers: Vec::new(),
            stun_timeout: Duration::from_millis(500),
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
    #[error("transfer failed: {0}")]
    Transfer(String),
}

/// Connection state, as the handle sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnState {
    Connecting,
    Open { remote_fingerprint: Option<String> },
    Closed,
}

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
    pub done: oneshot::Receiver<Result<T, String>>,
}

impl<T> Transfer<T> {
    /// Waits for the end of the transfer.
    pub async fn finish(self) -> Result<T, ConnError> {
        self.done.await.map_err(|_| ConnError::Closed)?.map_err(ConnError::Transfer)
    }
}

enum Cmd {
    Message(String),
    SendFiles {
        set: SendSet,
        progress: watch::Sender<Progress>,
        reply: oneshot::Sender<Result<Sent, String>>,
        id: oneshot::Sender<u32>,
    },
    ReceiveFiles {
        dir: PathBuf,
        progress: watch::Sender<Progress>,
        reply: oneshot::Sender<Result<Received, String>>,
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

    /// Our ICE candidates as SDP `candidate:` lines (host and server-reflexive).
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
        sleap_rtc_core::session::check_ctl_size(&text).map_err(ConnError::Transfer)?;
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
            .ok_or_else(|| ConnError::Transfer("hashing the files panicked".into()))?
            .map_err(|e| ConnError::Transfer(e.to_string()))?;
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

/// Binds one UDP socket per address, adds host candidates, then server-reflexive candidates
/// from STUN. Returns the sockets and every candidate line added.
async fn bind<R: Runtime>(
    opts: &PeerOptions,
    extra_ice: &[String],
    session: &mut Session,
) -> Result<(Sockets<R::Udp>, Vec<String>), ConnError> {
    let mut socks = Vec::new();
    let mut cands = Vec::new();
    for ip in &opts.bind_ips {
        let sock = match udp::bind(SocketAddr::new(*ip, 0)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%ip, error = %e, "skipping address");
                continue;
            }
        };
        let local = sock.local_addr()?;
        let sock = R::udp(sock)?;
        cands.extend(session.peer().add_local_candidate(local, None)?);
        socks.push((sock, local));
    }
    if socks.is_empty() {
        return Err(ConnError::Io(io::Error::new(io::ErrorKind::AddrNotAvailable, "no local address could be bound")));
    }
    let servers: Vec<String> = opts.ice_servers.iter().chain(extra_ice).cloned().collect();
    for (mapped, base) in gather_srflx::<R>(&socks, &servers, opts.stun_timeout).await {
        if mapped != base {
            cands.extend(session.peer().add_local_candidate(mapped, Some(base))?);
        }
    }
    Ok((socks, cands))
}

/// Asks each STUN server, from each socket of a compatible address family and scope, for our
/// mapped address. Unreachable or silent servers cost at most `timeout`.
async fn gather_srflx<R: Runtime>(
    socks: &Sockets<R::Udp>,
    servers: &[String],
    timeout: Duration,
) -> Vec<(SocketAddr, SocketAddr)> {
    if servers.is_empty() {
        return Vec::new();
    }
    let deadline = Instant::now() + timeout;
    let mut targets = Vec::new();
    for url in servers {
        let Some((host, port)) = stun::parse_stun_url(url) else { continue };
        match crate::timeout_at::<R, _>(deadline, R::resolve(host, port)).await {
            Ok(Ok(addrs)) => targets.extend(addrs),
            _ => tracing::debug!(url, "STUN server did not resolve"),
        }
    }
    // (socket index, server, request)
    let mut pending: Vec<(usize, SocketAddr, stun::BindingRequest)> = Vec::new();
    for (i, (_, local)) in socks.iter().enumerate() {
        for t in &targets {
            if t.is_ipv4() == local.is_ipv4() && t.ip().is_loopback() == local.ip().is_loopback() {
                pending.push((i, *t, stun::binding_request()));
            }
        }
    }
    let mut found = Vec::new();
    let mut buf = vec![0u8; 2048];
    let mut resend = Instant::now();
    while !pending.is_empty() && Instant::now() < deadline {
        if Instant::now() >= resend {
            for (i, server, req) in &pending {
                let _ = socks[*i].0.try_send_to(&req.bytes, *server);
            }
            resend = Instant::now() + Duration::from_millis(150);
        }
        let wake = resend.min(deadline);
        tokio::select! {
            (n, src, local) = RecvAny { socks, buf: &mut buf } => {
                let answer = pending.iter().find_map(|(i, server, req)| {
                    (socks[*i].1 == local && *server == src).then(|| stun::mapped_address(&buf[..n], req.id)).flatten()
                });
                if let Some(mapped) = answer {
                    found.push((mapped, local));
                    // One answer per socket is enough.
                    pending.retain(|(i, _, _)| socks[*i].1 != local);
                }
            }
            _ = R::sleep_until(wake) => {}
        }
    }
    found
}

fn candidate_line(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("candidate").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// Offers a connection to `target` (a peer id in our room) and waits until it is open.
pub async fn connect<R: Runtime>(
    signaling: &SignalingClient<R>,
    target: &str,
    opts: PeerOptions,
) -> Result<PeerConnection<R>, ConnError> {
    let mut session = new_session::<R>(&opts).await;
    let (socks, cands) = bind::<R>(&opts, &ice_urls(signaling), &mut session).await?;
    let offer = session.peer().create_offer()?;
    let mut relays = signaling.subscribe_relays(target);
    signaling.request(json!({"type": "offer", "target": target, "sdp": offer, "role": "client"})).await?;
    let mut early = Vec::new();
    let answer = crate::timeout::<R, _>(opts.connect_timeout, async {
        while let Some(m) = relays.recv().await {
            match m {
                ServerMessage::Answer(o) => return o.get("sdp").and_then(Value::as_str).map(str::to_owned),
                ServerMessage::Candidate(o) => early.extend(o.get("candidate").and_then(candidate_line)),
                _ => {}
            }
        }
        None
    })
    .await
    .map_err(|_| ConnError::NoAnswer(opts.connect_timeout))?
    .ok_or(ConnError::Closed)?;
    session.peer().accept_answer(&answer)?;
    for c in early {
        let _ = session.peer().add_remote_candidate(&c);
    }
    let conn = spawn(session, socks, cands, relays, target);
    conn.wait_open(opts.connect_timeout).await?;
    Ok(conn)
}

static CERT: std::sync::OnceLock<Option<sleap_rtc_core::peer::DtlsCert>> = std::sync::OnceLock::new();

/// Generates this process's DTLS certificate in the background, so the first connection does not
/// pay for it. [`SignalingClient::connect`] calls it; calling it again is free.
pub fn prepare_certificate<R: Runtime>() {
    if CERT.get().is_none() {
        // Spawned, not just started: a runtime may cancel blocking work whose future is dropped.
        R::spawn(async {
            let _ = R::spawn_blocking(|| CERT.get_or_init(sleap_rtc_core::peer::generate_certificate).is_some()).await;
        });
    }
}

/// Waits until this process's DTLS certificate exists (generating it if needed), so that a
/// following `connect` measures only the connection itself.
pub async fn certificate_ready<R: Runtime>() {
    let _ = R::spawn_blocking(|| CERT.get_or_init(sleap_rtc_core::peer::generate_certificate).is_some()).await;
}

async fn new_session<R: Runtime>(opts: &PeerOptions) -> Session {
    let mut cfg = opts.session.clone();
    if cfg.peer.cert.is_none() {
        cfg.peer.cert = match CERT.get() {
            Some(c) => c.clone(),
            None => R::spawn_blocking(|| CERT.get_or_init(sleap_rtc_core::peer::generate_certificate).clone())
                .await
                .flatten(),
        };
    }
    Session::new(cfg, Instant::now())
}

fn ice_urls<R: Runtime>(signaling: &SignalingClient<R>) -> Vec<String> {
    signaling.registered().ice_servers.iter().flat_map(|s| s.urls.iter().cloned()).collect()
}

/// Answers an `offer` received through signaling and waits until the connection is open.
pub async fn accept<R: Runtime>(
    signaling: &SignalingClient<R>,
    offer: &ServerMessage,
    opts: PeerOptions,
) -> Result<PeerConnection<R>, ConnError> {
    let ServerMessage::Offer(o) = offer else { return Err(ConnError::BadOffer("not an offer".into())) };
    let from = o.get("sender").and_then(Value::as_str).ok_or_else(|| ConnError::BadOffer("no sender".into()))?;
    let sdp = o.get("sdp").and_then(Value::as_str).ok_or_else(|| ConnError::BadOffer("no sdp".into()))?;
    let mut session = new_session::<R>(&opts).await;
    let (socks, cands) = bind::<R>(&opts, &ice_urls(signaling), &mut session).await?;
    let relays = signaling.subscribe_relays(from);
    let answer = session.peer().accept_offer(sdp)?;
    signaling.request(json!({"type": "answer", "target": from, "sdp": answer})).await?;
    let conn = spawn(session, socks, cands, relays, from);
    conn.wait_open(opts.connect_timeout).await?;
    Ok(conn)
}

fn spawn<R: Runtime>(
    mut session: Session,
    socks: Sockets<R::Udp>,
    local_candidates: Vec<String>,
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
    let driver = Driver::<R> {
        session,
        socks,
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
        _rt: PhantomData,
    }
}

struct OutFiles {
    set: SendSet,
    resumed_bytes: u64,
    handles: Vec<Option<File>>,
    progress: watch::Sender<Progress>,
    reply: Option<oneshot::Sender<Result<Sent, String>>>,
}

struct ReceiveWaiter {
    dir: PathBuf,
    progress: watch::Sender<Progress>,
    reply: oneshot::Sender<Result<Received, String>>,
}

struct InFiles {
    manifest: Manifest,
    parts: Vec<PathBuf>,
    finals: Vec<PathBuf>,
    handles: Vec<Option<File>>,
    committed: Vec<PathBuf>,
    failed: Vec<(String, String)>,
    progress: watch::Sender<Progress>,
    reply: Option<oneshot::Sender<Result<Received, String>>>,
}

enum IoDone {
    Verified { transfer: u32, file: u32, result: Result<String, String> },
    Committed { transfer: u32, file: u32, result: Result<(), String> },
}

struct Driver<R: Runtime> {
    session: Session,
    socks: Sockets<R::Udp>,
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

/// Receives from whichever socket has a datagram first.
struct RecvAny<'a, U> {
    socks: &'a Sockets<U>,
    buf: &'a mut [u8],
}

impl<U: UdpSocket> Future for RecvAny<'_, U> {
    type Output = (usize, SocketAddr, SocketAddr);
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        for (sock, local) in this.socks {
            loop {
                match sock.poll_recv_from(cx, this.buf) {
                    Poll::Ready(Ok((n, src))) => return Poll::Ready((n, src, *local)),
                    // Errors (e.g. an ICMP port-unreachable reported on the next recv) are
                    // per-datagram noise for a connectionless socket: poll again, so the
                    // socket's waker stays registered.
                    Poll::Ready(Err(_)) => continue,
                    Poll::Pending => break,
                }
            }
        }
        Poll::Pending
    }
}

impl<R: Runtime> Driver<R> {
    async fn run(mut self, mut cmd_rx: mpsc::UnboundedReceiver<Cmd>) {
        let (io_tx, mut io_rx) = mpsc::unbounded_channel();
        self.io_tx = Some(io_tx);
        let mut rx = RxBatch::new();
        let mut closing: Option<Instant> = None;
        // One timer future, replaced only when the deadline moves (or after it fired: a
        // completed future must not be polled again), not one per datagram.
        let mut sleep = std::pin::pin!(R::sleep_until(Instant::now() + Duration::from_secs(3600)));
        let mut sleep_at: Option<Instant> = None;
        let mut timed_out = false;
        loop {
            let deadline = match self.drain().await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "peer connection failed");
                    break;
                }
            };
            // Everything goes out before the task waits for anything.
            self.flush().await;
            if self.upstream_label.get().is_some() {
                self.upstream_backlog.store(self.session.upstream_backlog(), Ordering::Relaxed);
            }
            if let Some(since) = closing {
                if !self.session.peer().is_alive() {
                    break;
                }
                // The remote never acknowledged our last messages: stop waiting.
                if since.elapsed() > Duration::from_secs(3) {
                    self.session.abort();
                    break;
                }
            }
            if *self.state_tx.borrow() == ConnState::Closed {
                break;
            }
            let mut wake = deadline;
            if closing.is_some() {
                wake = wake.min(Instant::now() + Duration::from_millis(200));
            }
            // A deadline that passed while a burst was being handled is served at once: with
            // datagrams always ready, the (last, biased) timer branch below would never be
            // reached. Only once in a row, so that a deadline str0m keeps in the past cannot
            // shut out the other branches.
            let now = Instant::now();
            if wake <= now && !timed_out {
                timed_out = true;
                if let Err(e) = self.session.handle_timeout(now) {
                    tracing::warn!(error = %e, "peer connection error");
                    break;
                }
                continue;
            }
            timed_out = false;
            if sleep_at != Some(wake) {
                sleep.set(R::sleep_until(wake));
                sleep_at = Some(wake);
            }
            let res = tokio::select! {
                biased;
                c = cmd_rx.recv(), if closing.is_none() => match c {
                    Some(Cmd::Close) | None => {
                        tracing::debug!(handle_dropped = c.is_none(), "closing");
                        closing = Some(Instant::now());
                        self.session.close();
                        Ok(())
                    }
                    Some(c) => { self.on_cmd(c); Ok(()) }
                },
                Some(d) = io_rx.recv() => { self.on_io_done(d); Ok(()) },
                i = rx.recv(&self.socks, BURST) => self.receive_burst(&mut rx, i, deadline).await,
                _ = &mut sleep => {
                    sleep_at = None;
                    self.session.handle_timeout(Instant::now())
                }
            };
            if let Err(e) = res {
                tracing::warn!(error = %e, "peer connection error");
                break;
            }
        }
        // Whatever the last drain queued (a DTLS close alert, an abort) still goes out.
        self.flush().await;
        tracing::debug!(
            received = rx.received_datagrams,
            recv_calls = rx.recv_calls,
            sent = self.tx.sent_datagrams,
            send_calls = self.tx.send_calls,
            "connection ended: UDP datagrams and syscalls"
        );
        let _ = self.state_tx.send(ConnState::Closed);
        for (_, o) in self.outgoing.drain() {
            if let Some(r) = o.reply {
                let _ = r.send(Err("connection closed".into()));
            }
        }
        for (_, i) in self.incoming.drain() {
            if let Some(r) = i.reply {
                let _ = r.send(Err("connection closed; .part files are kept for a resume".into()));
            }
        }
        for w in self.receive_waiters.drain(..) {
            let _ = w.reply.send(Err("connection closed".into()));
        }
    }

    /// Feeds the datagrams `rx` holds (from socket `sock`), then whatever else is ready, up to
    /// [`BURST`] datagrams or until `deadline`. Each one is followed by a full drain (str0m's
    /// single-mutation invariant); only the sending is deferred, to [`Driver::flush`].
    async fn receive_burst(
        &mut self,
        rx: &mut RxBatch,
        mut sock: usize,
        mut deadline: Instant,
    ) -> Result<(), sleap_rtc_core::peer::PeerError> {
        let mut fed = 0;
        loop {
            let Some(&(_, local)) = self.socks.get(sock) else { return Ok(()) };
            let now = Instant::now();
            for (src, data) in rx.datagrams() {
                // Anyone can send us a datagram: one that str0m rejects is dropped, it must not
                // end the connection.
                if let Err(e) = self.session.handle_receive(now, src, local, data) {
                    tracing::debug!(%src, error = %e, "dropping a datagram str0m refused");
                }
                deadline = self.drain().await?;
                fed += 1;
            }
            if fed >= BURST || Instant::now() >= deadline {
                return Ok(());
            }
            match rx.try_recv(&self.socks, BURST - fed) {
                Some(i) => sock = i,
                None => return Ok(()),
            }
        }
    }

    /// Drains session output until its next timeout. Transmits are queued (sent once the batch
    /// is large, otherwise by the caller's [`Driver::flush`]).
    async fn drain(&mut self) -> Result<Instant, sleap_rtc_core::peer::PeerError> {
        loop {
            match self.session.poll_output()? {
                SessionOutput::Timeout(t) => return Ok(t),
                SessionOutput::Transmit { source, destination, contents } => {
                    if self.socks.is_empty() {
                        continue;
                    }
                    let sock = self.socks.iter().position(|(_, l)| *l == source).unwrap_or(0);
                    self.tx.push(sock, destination, &contents);
                    if self.tx.len() >= TX_FLUSH {
                        self.flush().await;
                    }
                }
                SessionOutput::Io(io) => self.on_io(io),
                SessionOutput::Event(e) => self.on_event(e),
            }
        }
    }

    /// Sends the queued transmits (GSO runs where possible), waiting out a full socket buffer.
    async fn flush(&mut self) {
        if !self.tx.is_empty() {
            self.tx.flush(&self.socks).await;
        }
    }

    fn on_cmd(&mut self, c: Cmd) {
        tracing::debug!(cmd = c.name(), "command");
        match c {
            Cmd::Message(m) => {
                // Size was checked by the handle; nothing else can fail here.
                let _ = self.session.send_message(m);
            }
            Cmd::SendFiles { set, progress, reply, id } => {
                let n = set.paths.len();
                let tid = match self.session.send_files(set.manifest.clone()) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                let _ = id.send(tid);
                self.outgoing.insert(
                    tid,
                    OutFiles {
                        set,
                        resumed_bytes: 0,
                        handles: (0..n).map(|_| None).collect(),
                        progress,
                        reply: Some(reply),
                    },
                );
            }
            Cmd::ReceiveFiles { dir, progress, reply } => {
                self.receive_waiters.push_back(ReceiveWaiter { dir, progress, reply });
                if let Some((t, m)) = self.unclaimed.pop_front() {
                    self.prepare(t, m);
                }
            }
            Cmd::Cancel(t, why) => self.session.cancel(t, &why),
            Cmd::Upstream(binary, data) => self.session.send_upstream(binary, data),
            Cmd::RemoteCandidate(c) => {
                if let Err(e) = self.session.peer().add_remote_candidate(&c) {
                    tracing::debug!(error = %e, "ignoring remote candidate");
                }
            }
            Cmd::Close => {}
        }
    }

    fn on_event(&mut self, e: SessionEvent) {
        // Control messages carry tickets and MACs: log their size, never their text.
        match &e {
            SessionEvent::Message(m) => tracing::debug!(bytes = m.len(), "session event: control message"),
            SessionEvent::Upstream { data, .. } => {
                tracing::trace!(bytes = data.len(), "session event: upstream message")
            }
            other => tracing::debug!(event = ?other, "session event"),
        }
        match e {
            SessionEvent::Open => {
                let remote_fingerprint = self.session.peer().remote_fingerprint();
                let _ = self.state_tx.send(ConnState::Open { remote_fingerprint });
            }
            SessionEvent::Message(m) => {
                let _ = self.msg_tx.send(m);
            }
            SessionEvent::UpstreamOpen(label) => {
                let _ = self.upstream_label.set(label);
                let remote_fingerprint = self.session.peer().remote_fingerprint();
                let _ = self.state_tx.send(ConnState::Open { remote_fingerprint });
            }
            SessionEvent::Upstream { binary, data } => {
                let _ = self.upstream_tx.send((binary, data));
            }
            SessionEvent::Progress { transfer, direction, progress } => {
                let w = match direction {
                    Direction::Send => self.outgoing.get(&transfer).map(|o| &o.progress),
                    Direction::Receive => self.incoming.get(&transfer).map(|i| &i.progress),
                };
                if let Some(w) = w {
                    let _ = w.send(progress);
                }
            }
            SessionEvent::FileDone { transfer, direction: Direction::Receive, file, ok: false, error } => {
                if let Some(i) = self.incoming.get_mut(&transfer) {
                    let name = i.manifest.files.get(file as usize).map(|f| f.name.clone()).unwrap_or_default();
                    i.failed.push((name, error.unwrap_or_default()));
                }
            }
            SessionEvent::FileDone { .. } => {}
            SessionEvent::Accepted { transfer, resumed_bytes } => {
                if let Some(o) = self.outgoing.get_mut(&transfer) {
                    o.resumed_bytes = resumed_bytes;
                }
            }
            SessionEvent::TransferDone { transfer, direction: Direction::Send, result } => {
                if let Some(mut o) = self.outgoing.remove(&transfer) {
                    let res = result.map(|failed| Sent {
                        transfer_id: transfer,
                        bytes: o.set.manifest.total_size(),
                        resumed_bytes: o.resumed_bytes,
                        failed: failed
                            .iter()
                            .filter_map(|i| o.set.manifest.files.get(*i as usize))
                            .map(|f| f.name.clone())
                            .collect(),
                    });
                    if let Some(r) = o.reply.take() {
                        let _ = r.send(res);
                    }
                }
            }
            SessionEvent::TransferDone { transfer, direction: Direction::Receive, result } => match result {
                Err(e) => {
                    // An offer nobody claimed yet may be cancelled before it is.
                    let unclaimed = self.unclaimed.len();
                    self.unclaimed.retain(|(t, _)| *t != transfer);
                    if let Some(mut i) = self.incoming.remove(&transfer) {
                        if let Some(r) = i.reply.take() {
                            let _ = r.send(Err(e));
                        }
                    } else if self.unclaimed.len() == unclaimed && !self.answered.remove(&transfer) {
                        // Refused at the offer (unsafe name, too large, ...): whoever waits for
                        // the next upload hears why, instead of waiting for one that never comes.
                        // A refusal nobody waits for is not kept: it would fail a later upload.
                        if let Some(w) = self.receive_waiters.pop_front() {
                            let _ = w.reply.send(Err(e));
                        }
                    }
                }
                // The core ends a receive only after every verified file was committed, so the
                // list of committed files is complete here.
                Ok(_) => {
                    if let Some(mut i) = self.incoming.remove(&transfer) {
                        if let Some(r) = i.reply.take() {
                            let _ = r.send(Ok(Received {
                                files: std::mem::take(&mut i.committed),
                                failed: std::mem::take(&mut i.failed),
                            }));
                        }
                    }
                }
            },
            SessionEvent::Closed => {
                let _ = self.state_tx.send(ConnState::Closed);
            }
            SessionEvent::Connected | SessionEvent::Disconnected => {}
        }
    }

    fn prepare(&mut self, transfer: u32, manifest: Manifest) {
        if self.incoming.contains_key(&transfer) {
            // Still finishing an earlier transfer with this id (e.g. a rename after a cancel).
            self.session.prepared(
                transfer,
                Err(TransferError::BadManifest("a transfer with this id is still finishing".into())),
            );
            return;
        }
        let Some(w) = self.receive_waiters.pop_front() else {
            self.unclaimed.push_back((transfer, manifest));
            return;
        };
        match files::prepare_receive(&w.dir, &manifest) {
            Ok(p) => {
                let n = manifest.files.len();
                let total = manifest.total_size();
                let _ = w.progress.send(Progress { total_bytes: total, files_total: n as u32, ..Progress::default() });
                self.incoming.insert(
                    transfer,
                    InFiles {
                        manifest,
                        parts: p.parts,
                        finals: p.finals,
                        handles: (0..n).map(|_| None).collect(),
                        committed: Vec::new(),
                        failed: Vec::new(),
                        progress: w.progress,
                        reply: Some(w.reply),
                    },
                );
                self.session.prepared(transfer, Ok(p.existing));
            }
            Err(e) => {
                let _ = w.reply.send(Err(e.to_string()));
                self.answered.insert(transfer);
                self.session.prepared(transfer, Err(e));
            }
        }
    }

    fn on_io(&mut self, io: IoRequest) {
        if !matches!(io, IoRequest::Read { .. } | IoRequest::Write { .. }) {
            tracing::debug!(request = ?IoName(&io), "file request");
        }
        match io {
            IoRequest::Read { transfer, chunk } => {
                let data = match self.outgoing.get_mut(&transfer) {
                    Some(o) => read_chunk(o, chunk.file as usize, chunk.offset, chunk.len).map_err(|e| e.to_string()),
                    None => Err("unknown transfer".into()),
                };
                self.session.read_done(transfer, chunk, data);
            }
            IoRequest::Prepare { transfer, manifest } => self.prepare(transfer, manifest),
            IoRequest::Write { transfer, file, offset, data } => {
                let res = match self.incoming.get_mut(&transfer) {
                    Some(i) => write_part(i, file as usize, offset, &data).map_err(|e| e.to_string()),
                    None => Err("unknown transfer".into()),
                };
                self.session.write_done(transfer, file, offset + data.len() as u64, res);
            }
            IoRequest::Verify { transfer, file } => {
                let Some(i) = self.incoming.get_mut(&transfer) else { return };
                // An empty file gets no writes: create its .part so there is something to hash.
                if i.handles[file as usize].is_none() {
                    if let Err(e) = write_part(i, file as usize, 0, &[]) {
                        self.session.verified(transfer, file, Err(e.to_string()));
                        return;
                    }
                }
                // Close our write handle so the hash sees everything written.
                i.handles[file as usize] = None;
                let part = i.parts[file as usize].clone();
                let tx = self.io_tx.clone();
                R::spawn(async move {
                    let result = R::spawn_blocking(move || files::hash_file(&part).map_err(|e| e.to_string()))
                        .await
                        .unwrap_or_else(|| Err("hashing panicked".into()));
                    if let Some(tx) = tx {
                        let _ = tx.send(IoDone::Verified { transfer, file, result });
                    }
                });
            }
            IoRequest::Commit { transfer, file } => {
                let Some(i) = self.incoming.get(&transfer) else { return };
                let (part, fin) = (i.parts[file as usize].clone(), i.finals[file as usize].clone());
                let tx = self.io_tx.clone();
                R::spawn(async move {
                    let result = R::spawn_blocking(move || files::commit(&part, &fin).map_err(|e| e.to_string()))
                        .await
                        .unwrap_or_else(|| Err("commit panicked".into()));
                    if let Some(tx) = tx {
                        let _ = tx.send(IoDone::Committed { transfer, file, result });
                    }
                });
            }
            IoRequest::Discard { transfer, file } => {
                if let Some(i) = self.incoming.get_mut(&transfer) {
                    i.handles[file as usize] = None;
                    let _ = std::fs::remove_file(&i.parts[file as usize]);
                }
            }
        }
    }

    fn on_io_done(&mut self, d: IoDone) {
        match d {
            IoDone::Verified { transfer, file, result } => self.session.verified(transfer, file, result),
            IoDone::Committed { transfer, file, result } => {
                if let Some(i) = self.incoming.get_mut(&transfer) {
                    if let (Ok(()), Some(fin)) = (&result, i.finals.get(file as usize)) {
                        i.committed.push(fin.clone());
                    }
                }
                // The session reports the file (and, after the last one, the transfer) to the
                // sender only now, so "ok" always means "stored under its final name".
                self.session.committed(transfer, file, result);
            }
        }
    }
}

/// Debug form of an `IoRequest` without the data.
struct IoName<'a>(&'a IoRequest);

impl std::fmt::Debug for IoName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IoRequest::Read { transfer, chunk } => write!(f, "read {transfer} {chunk:?}"),
            IoRequest::Prepare { transfer, manifest } => {
                write!(f, "prepare {transfer} ({} files)", manifest.files.len())
            }
            IoRequest::Write { transfer, file, offset, data } => {
                write!(f, "write {transfer} {file}@{offset}+{}", data.len())
            }
            IoRequest::Verify { transfer, file } => write!(f, "verify {transfer} {file}"),
            IoRequest::Commit { transfer, file } => write!(f, "commit {transfer} {file}"),
            IoRequest::Discard { transfer, file } => write!(f, "discard {transfer} {file}"),
        }
    }
}

fn read_chunk(o: &mut OutFiles, file: usize, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let path = o.set.paths.get(file).ok_or_else(|| io::Error::other("no such file"))?;
    let slot = o.handles.get_mut(file).ok_or_else(|| io::Error::other("no such file"))?;
    if slot.is_none() {
        *slot = Some(File::open(path)?);
    }
    let f = slot.as_ref().ok_or_else(|| io::Error::other("file not open"))?;
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = f.read_at(&mut buf[filled..], offset + filled as u64)?;
        if n == 0 {
            buf.truncate(filled);
            break;
        }
        filled += n;
    }
    Ok(buf)
}

fn write_part(i: &mut InFiles, file: usize, offset: u64, data: &[u8]) -> io::Result<()> {
    let path = i.parts.get(file).ok_or_else(|| io::Error::other("no such file"))?;
    let slot = i.handles.get_mut(file).ok_or_else(|| io::Error::other("no such file"))?;
    if slot.is_none() {
        // O_NOFOLLOW: never write through a symlink planted where the .part goes.
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        *slot = Some(f);
    }
    let f = slot.as_ref().ok_or_else(|| io::Error::other("file not open"))?;
    f.write_all_at(data, offset)
}

impl From<TransferError> for ConnError {
    fn from(e: TransferError) -> Self {
        ConnError::Transfer(e.to_string())
    }
}
