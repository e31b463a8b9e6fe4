//! A peer connection with file transfers on top: the glue every runtime would otherwise repeat.
//!
//! [`Session`] owns a [`Peer`], queues control messages until the `ctl` channel takes them,
//! dispatches `transfer_*` messages to the transfer state machines, applies bulk flow control
//! (read the next chunk only while the channel's buffered amount is under the high watermark),
//! and turns everything that needs a file into an [`IoRequest`]. A runtime's whole job is: move
//! datagrams between a UDP socket and [`Session::handle_receive`] / [`SessionOutput::Transmit`],
//! keep the timer, and carry out `IoRequest`s, answering with the matching `*_done` call.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::peer::{Peer, PeerConfig, PeerError, PeerEvent, PeerOutput};
use crate::transfer::{
    self, Chunk, Manifest, Progress, Receiver, ReceiverAction, Sender, SenderEvent, TransferError, TransferMsg,
};
use crate::window::{BulkWindow, WindowConfig};

/// Largest control message we send. Browsers and aiortc accept 256 KiB, but SCTP messages of
/// that size cost latency on the shared association; 60 KiB is plenty for jobs and manifests of a
/// few hundred files.
pub const MAX_CTL_MESSAGE: usize = 60 * 1024;

/// Largest control message we accept: the limit we advertised before the receive window grew
/// (browsers and aiortc send at most this much in one message).
pub const MAX_CTL_INBOUND: usize = 256 * 1024;

/// Why a control message or a transfer could not be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    #[error(
        "control message of {size} bytes exceeds the {MAX_CTL_MESSAGE}-byte limit; for a transfer of many \
         files, send fewer at once or pack them into one archive"
    )]
    TooLarge { size: usize },
    #[error("these files are already being sent on this connection")]
    AlreadySending,
}

/// Why a transfer ended as a whole without completing (files that failed on their own are
/// listed in a completed transfer instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferFailed {
    /// This side cancelled its outgoing transfer (the caller, or a file that could not be read).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The sender cancelled an offer before it was set up here.
    #[error("cancelled by the sender: {0}")]
    CancelledBySender(String),
    /// The receiving state machine ended it, in its own words (a cancel from either side, a
    /// frame that does not fit).
    #[error("{0}")]
    Aborted(String),
    /// Refused or broken by the protocol (an unsafe name, a bad frame, a refusal by the peer).
    #[error(transparent)]
    Protocol(#[from] TransferError),
}

/// Refuses a control message that is too large to send, with a clear reason.
pub fn check_ctl_size(json: &str) -> Result<(), SendError> {
    if json.len() > MAX_CTL_MESSAGE {
        return Err(SendError::TooLarge { size: json.len() });
    }
    Ok(())
}

/// Incoming transfers offered and not finished, at most (further offers are refused as busy).
pub const MAX_INCOMING: usize = 8;

/// Session tunables.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub peer: PeerConfig,
    /// Payload bytes per bulk frame.
    pub chunk: usize,
    /// Stop reading new chunks while this many bytes are buffered in `bulk` (plus reads under
    /// way)... at first: the window then follows the measured delivery rate (see
    /// [`crate::window`]) up to `max_window`. This is its floor.
    pub high_water: usize,
    /// The bulk window's ceiling. `peer.max_buffered` must exceed it (control messages need room)
    /// and so should the remote's receive window (`peer.receive_window`). Set it to `high_water`
    /// for a fixed window.
    pub max_window: usize,
    /// How long buffered bulk bytes should take to drain at the measured rate: about the longest
    /// a control message waits behind bulk data. Paths with a longer round trip than this get
    /// less than their bandwidth-delay product.
    pub window_target: Duration,
    pub limits: transfer::Limits,
    /// How long an open connection may hear nothing from the other side before it is declared
    /// dead and closed. ICE consent checks make a live peer answer at least every 3 s, so
    /// silence means it crashed or the path is gone (str0m itself may sit in "checking" forever).
    pub disconnect_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            peer: PeerConfig::default(),
            chunk: transfer::DEFAULT_CHUNK,
            high_water: WindowConfig::default().min,
            max_window: WindowConfig::default().max,
            window_target: WindowConfig::default().target,
            limits: transfer::Limits::default(),
            disconnect_timeout: Duration::from_secs(10),
        }
    }
}

/// Which way a transfer goes, from this side's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Send,
    Receive,
}

/// File work for the runtime. Each request names the transfer it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub enum IoRequest {
    /// Read `chunk.len` bytes of file `chunk.file` at `chunk.offset`; answer with
    /// [`Session::read_done`].
    Read { transfer: u32, chunk: Chunk },
    /// The remote offers files: decide where they go and report how many bytes each `.part`
    /// already holds with [`Session::prepared`] (or refuse).
    Prepare { transfer: u32, manifest: Manifest },
    /// Write `data` at `offset` of the file's `.part`; answer with [`Session::write_done`].
    Write { transfer: u32, file: u32, offset: u64, data: Vec<u8> },
    /// Hash the file's complete `.part`; answer with [`Session::verified`].
    Verify { transfer: u32, file: u32 },
    /// Make the `.part` durable and rename it to its final name; answer with
    /// [`Session::committed`].
    Commit { transfer: u32, file: u32 },
    /// Delete the `.part`.
    Discard { transfer: u32, file: u32 },
}

#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// ICE and DTLS are up.
    Connected,
    /// Both channels are open.
    Open,
    /// The remote opened an upstream-protocol channel with this label instead (see
    /// [`crate::upstream`]); messages on it arrive as [`SessionEvent::Upstream`].
    UpstreamOpen(String),
    /// A message on the upstream channel (text when `binary` is false).
    Upstream {
        binary: bool,
        data: Vec<u8>,
    },
    /// A control message that is not part of the transfer protocol (e.g. jobs), as JSON text.
    Message(String),
    Progress {
        transfer: u32,
        direction: Direction,
        progress: Progress,
    },
    /// The receiver accepted an outgoing transfer; `resumed_bytes` it already held from an
    /// earlier, interrupted attempt.
    Accepted {
        transfer: u32,
        resumed_bytes: u64,
    },
    /// A file of a transfer finished (`ok` false: hash mismatch or I/O failure).
    FileDone {
        transfer: u32,
        direction: Direction,
        file: u32,
        ok: bool,
        error: Option<String>,
    },
    /// A transfer ended: `failed` lists files that did not verify; `Err` if it was refused or
    /// cancelled as a whole.
    TransferDone {
        transfer: u32,
        direction: Direction,
        result: Result<Vec<u32>, TransferFailed>,
    },
    Disconnected,
    Closed,
}

#[derive(Debug)]
pub enum SessionOutput {
    Transmit { source: SocketAddr, destination: SocketAddr, contents: Vec<u8> },
    Io(IoRequest),
    Event(SessionEvent),
    Timeout(Instant),
}

struct Outgoing {
    sender: Sender,
    reads_in_flight: usize,
    /// Frames read but not yet accepted by the channel (str0m's buffer was full).
    ready: VecDeque<Vec<u8>>,
}

struct Incoming {
    receiver: Receiver,
    total: u64,
    written: u64,
}

/// See the module docs.
pub struct Session {
    cfg: SessionConfig,
    peer: Peer,
    ctl_out: VecDeque<String>,
    /// Messages for the upstream channel not yet taken by str0m, and their bytes.
    upstream_out: VecDeque<(bool, Vec<u8>)>,
    upstream_queued: usize,
    open: bool,
    /// Transfers to send, in order; the head is active once accepted.
    outgoing: VecDeque<Outgoing>,
    incoming: HashMap<u32, Incoming>,
    /// Offers waiting for [`Session::prepared`].
    preparing: HashMap<u32, Manifest>,
    events: VecDeque<SessionOutput>,
    /// A close was asked for: it happens once queued control messages are acknowledged.
    closing: bool,
    /// When the other side was last heard from.
    last_heard: Instant,
    /// `Closed` was reported.
    closed: bool,
    window: BulkWindow,
    /// Bulk bytes str0m accepted so far (minus what it still buffers: what the peer acknowledged).
    bulk_written: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("open", &self.open).finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(cfg: SessionConfig, now: Instant) -> Session {
        let peer = Peer::new(&cfg.peer, now);
        Session {
            window: BulkWindow::new(WindowConfig {
                min: cfg.high_water,
                max: cfg.max_window,
                target: cfg.window_target,
            }),
            bulk_written: 0,
            cfg,
            peer,
            ctl_out: VecDeque::new(),
            upstream_out: VecDeque::new(),
            upstream_queued: 0,
            open: false,
            outgoing: VecDeque::new(),
            incoming: HashMap::new(),
            preparing: HashMap::new(),
            events: VecDeque::new(),
            closing: false,
            last_heard: now,
            closed: false,
        }
    }

    /// The underlying peer (SDP, candidates, fingerprints).
    pub fn peer(&mut self) -> &mut Peer {
        &mut self.peer
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    pub fn handle_receive(
        &mut self,
        now: Instant,
        src: SocketAddr,
        dst: SocketAddr,
        data: &[u8],
    ) -> Result<(), PeerError> {
        self.last_heard = self.last_heard.max(now);
        self.sample_window(now);
        self.peer.handle_receive(now, src, dst, data)
    }

    /// The bulk window now (bytes that may be buffered in the association).
    pub fn bulk_window(&self) -> usize {
        self.window.get()
    }

    fn sample_window(&mut self, now: Instant) {
        if self.window.due(now) {
            // The tail of a transfer drains the buffer: that is not the path's rate either.
            let busy = self.outgoing.front().is_some_and(|o| o.sender.is_sending() && !o.sender.all_sent());
            let acked = self.bulk_written.saturating_sub(self.peer.bulk_buffered() as u64);
            self.window.sample(now, acked, busy);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), PeerError> {
        if self.open && now >= self.last_heard + self.cfg.disconnect_timeout && self.peer.is_alive() {
            self.abort();
        }
        self.sample_window(now);
        self.peer.handle_timeout(now)
    }

    /// Queues a control message (JSON text); sent as soon as the channel takes it.
    pub fn send_message(&mut self, json: String) -> Result<(), SendError> {
        check_ctl_size(&json)?;
        self.ctl_out.push_back(json);
        Ok(())
    }

    /// Queues a message for the upstream channel (text when `binary` is false); sent in order
    /// as soon as the channel takes it. The caller bounds what it queues with
    /// [`Session::upstream_backlog`].
    pub fn send_upstream(&mut self, binary: bool, data: Vec<u8>) {
        self.upstream_queued += data.len();
        self.upstream_out.push_back((binary, data));
    }

    /// Upstream bytes queued here or buffered in the association and not yet acknowledged: what a
    /// sender streaming a file waits on (upstream's clients use 16 MiB of `bufferedAmount`).
    pub fn upstream_backlog(&mut self) -> usize {
        self.upstream_queued + self.peer.buffered().saturating_sub(self.peer.bulk_buffered())
    }

    /// Queues a transfer of `manifest` (its files are read through [`IoRequest::Read`]).
    /// Returns the transfer id (derived from the content, so re-sending resumes).
    pub fn send_files(&mut self, manifest: Manifest) -> Result<u32, SendError> {
        let id = manifest.derived_id();
        if self.outgoing.iter().any(|o| o.sender.transfer_id() == id) {
            return Err(SendError::AlreadySending);
        }
        let sender = Sender::new(id, manifest, self.cfg.chunk);
        let offer = sender.offer().to_json();
        check_ctl_size(&offer)?;
        self.ctl_out.push_back(offer);
        self.outgoing.push_back(Outgoing { sender, reads_in_flight: 0, ready: VecDeque::new() });
        Ok(id)
    }

    /// Cancels a transfer in either direction.
    pub fn cancel(&mut self, transfer: u32, reason: &str) {
        if let Some(pos) = self.outgoing.iter().position(|o| o.sender.transfer_id() == transfer) {
            if let Some(mut o) = self.outgoing.remove(pos) {
                let msg = o.sender.cancel(reason);
                self.ctl_out.push_back(msg.to_json());
                self.done(transfer, Direction::Send, Err(TransferFailed::Cancelled(reason.to_owned())));
            }
        }
        if let Some(inc) = self.incoming.get_mut(&transfer) {
            inc.receiver.cancel(reason);
            self.pump_receiver(transfer);
        }
    }

    /// Answer to [`IoRequest::Read`].
    pub fn read_done(&mut self, transfer: u32, chunk: Chunk, data: Result<Vec<u8>, String>) {
        let Some(o) = self.outgoing.iter_mut().find(|o| o.sender.transfer_id() == transfer) else { return };
        o.reads_in_flight = o.reads_in_flight.saturating_sub(1);
        let why = match data {
            Ok(d) if d.len() == chunk.len => {
                let mut frame = Vec::with_capacity(transfer::HEADER_LEN + d.len());
                transfer::encode_frame(chunk.header(transfer), &d, &mut frame);
                o.ready.push_back(frame);
                return;
            }
            Ok(d) => format!("file {} changed while sending (read {} of {} bytes)", chunk.file, d.len(), chunk.len),
            Err(e) => format!("cannot read file {}: {e}", chunk.file),
        };
        self.cancel(transfer, &why);
    }

    /// Answer to [`IoRequest::Prepare`]: `Ok(existing)` gives each `.part`'s current length.
    pub fn prepared(&mut self, transfer: u32, result: Result<Vec<u64>, TransferError>) {
        let Some(manifest) = self.preparing.remove(&transfer) else { return };
        match result {
            Ok(existing) => {
                let total = manifest.total_size();
                let receiver = Receiver::new(transfer, manifest, &existing);
                self.incoming.insert(transfer, Incoming { receiver, total, written: 0 });
                self.pump_receiver(transfer);
            }
            Err(e) => {
                let msg = TransferMsg::TransferReject {
                    transfer_id: transfer,
                    code: e.reject_code(),
                    message: e.to_string(),
                };
                self.ctl_out.push_back(msg.to_json());
                self.done(transfer, Direction::Receive, Err(e.into()));
            }
        }
    }

    /// Answer to [`IoRequest::Write`].
    pub fn write_done(&mut self, transfer: u32, file: u32, end: u64, result: Result<(), String>) {
        let Some(inc) = self.incoming.get_mut(&transfer) else { return };
        match result {
            Ok(()) => inc.receiver.written(file, end),
            Err(e) => inc.receiver.file_failed(file, &format!("write failed: {e}")),
        }
        self.pump_receiver(transfer);
    }

    /// Answer to [`IoRequest::Verify`] with the `.part`'s BLAKE3 (hex), or the error.
    pub fn verified(&mut self, transfer: u32, file: u32, result: Result<String, String>) {
        let Some(inc) = self.incoming.get_mut(&transfer) else { return };
        match result {
            Ok(h) => inc.receiver.verified(file, &h),
            Err(e) => inc.receiver.file_failed(file, &format!("cannot hash received file: {e}")),
        }
        self.pump_receiver(transfer);
    }

    /// Answer to [`IoRequest::Commit`].
    pub fn committed(&mut self, transfer: u32, file: u32, result: Result<(), String>) {
        let Some(inc) = self.incoming.get_mut(&transfer) else { return };
        let ok = result.is_ok();
        inc.receiver.committed(file, result);
        if ok {
            self.events.push_back(SessionOutput::Event(SessionEvent::FileDone {
                transfer,
                direction: Direction::Receive,
                file,
                ok: true,
                error: None,
            }));
        }
        self.pump_receiver(transfer);
    }

    fn done(&mut self, transfer: u32, direction: Direction, result: Result<Vec<u32>, TransferFailed>) {
        self.events.push_back(SessionOutput::Event(SessionEvent::TransferDone { transfer, direction, result }));
    }

    fn pump_receiver(&mut self, transfer: u32) {
        let Some(inc) = self.incoming.get_mut(&transfer) else { return };
        let actions: Vec<ReceiverAction> = std::iter::from_fn(|| inc.receiver.poll_action()).collect();
        for a in actions {
            let (io, file_done) = match a {
                ReceiverAction::Send(m) => {
                    self.ctl_out.push_back(m.to_json());
                    continue;
                }
                ReceiverAction::Verify { file } => (IoRequest::Verify { transfer, file }, None),
                ReceiverAction::Commit { file } => (IoRequest::Commit { transfer, file }, None),
                ReceiverAction::Discard { file } => (IoRequest::Discard { transfer, file }, Some((file, false))),
                ReceiverAction::Finished { failed, cancelled, .. } => {
                    self.incoming.remove(&transfer);
                    self.done(
                        transfer,
                        Direction::Receive,
                        cancelled.map_or(Ok(failed), |why| Err(TransferFailed::Aborted(why))),
                    );
                    continue;
                }
            };
            self.events.push_back(SessionOutput::Io(io));
            if let Some((file, ok)) = file_done {
                self.events.push_back(SessionOutput::Event(SessionEvent::FileDone {
                    transfer,
                    direction: Direction::Receive,
                    file,
                    ok,
                    error: (!ok).then(|| "discarded: hash mismatch, I/O error or cancel".to_owned()),
                }));
            }
        }
    }

    fn on_ctl(&mut self, text: String) {
        // The SCTP layer accepts messages up to the receive window (see `PeerConfig`); control
        // messages of ours are far smaller, so anything larger is refused unread.
        if text.len() > MAX_CTL_INBOUND {
            self.events.push_back(SessionOutput::Event(SessionEvent::Message(
                serde_json::json!({"type": "error", "code": "MESSAGE_TOO_LARGE",
                    "message": format!("control message of {} bytes exceeds {MAX_CTL_INBOUND}", text.len())})
                .to_string(),
            )));
            return;
        }
        let ty = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned));
        match ty {
            Some(t) if TransferMsg::is_transfer_type(&t) => match TransferMsg::from_json(&text) {
                Ok(m) => self.on_transfer_msg(m),
                Err(e) => self.events.push_back(SessionOutput::Event(SessionEvent::Message(
                    serde_json::json!({"type": "error", "code": "BAD_TRANSFER_MESSAGE", "message": e.to_string()})
                        .to_string(),
                ))),
            },
            _ => self.events.push_back(SessionOutput::Event(SessionEvent::Message(text))),
        }
    }

    fn on_transfer_msg(&mut self, m: TransferMsg) {
        let id = m.transfer_id();
        match m {
            TransferMsg::TransferOffer { manifest, .. } => {
                let busy = if self.incoming.contains_key(&id) || self.preparing.contains_key(&id) {
                    Some("a transfer with this id is already under way")
                } else if self.incoming.len() + self.preparing.len() >= MAX_INCOMING {
                    Some("too many transfers offered at once")
                } else {
                    None
                };
                if let Some(why) = busy {
                    let msg = TransferMsg::TransferReject {
                        transfer_id: id,
                        code: transfer::RejectCode::Busy,
                        message: why.to_owned(),
                    };
                    self.ctl_out.push_back(msg.to_json());
                    return;
                }
                if let Err(e) = transfer::validate_manifest(&manifest, &self.cfg.limits) {
                    let msg =
                        TransferMsg::TransferReject { transfer_id: id, code: e.reject_code(), message: e.to_string() };
                    self.ctl_out.push_back(msg.to_json());
                    self.done(id, Direction::Receive, Err(e.into()));
                    return;
                }
                self.preparing.insert(id, manifest.clone());
                self.events.push_back(SessionOutput::Io(IoRequest::Prepare { transfer: id, manifest }));
            }
            TransferMsg::TransferCancel { reason, .. } if self.incoming.contains_key(&id) => {
                if let Some(inc) = self.incoming.get_mut(&id) {
                    inc.receiver.on_cancel(&reason);
                }
                self.pump_receiver(id);
            }
            TransferMsg::TransferCancel { reason, .. } if self.preparing.contains_key(&id) => {
                self.preparing.remove(&id);
                self.done(id, Direction::Receive, Err(TransferFailed::CancelledBySender(reason)));
            }
            other => {
                let Some(pos) = self.outgoing.iter().position(|o| o.sender.transfer_id() == id) else { return };
                let res = self.outgoing[pos].sender.on_message(&other);
                match res {
                    Ok(Some(SenderEvent::Progress(p))) => {
                        self.events.push_back(SessionOutput::Event(SessionEvent::Progress {
                            transfer: id,
                            direction: Direction::Send,
                            progress: p,
                        }))
                    }
                    Ok(Some(SenderEvent::FileResult { file, ok, error })) => {
                        self.events.push_back(SessionOutput::Event(SessionEvent::FileDone {
                            transfer: id,
                            direction: Direction::Send,
                            file,
                            ok,
                            error,
                        }))
                    }
                    Ok(Some(SenderEvent::Complete { failed })) => {
                        self.outgoing.remove(pos);
                        self.done(id, Direction::Send, Ok(failed));
                    }
                    Ok(Some(SenderEvent::Accepted { resumed_bytes })) => self
                        .events
                        .push_back(SessionOutput::Event(SessionEvent::Accepted { transfer: id, resumed_bytes })),
                    Ok(None) => {}
                    Err(e) => {
                        self.outgoing.remove(pos);
                        self.done(id, Direction::Send, Err(e.into()));
                    }
                }
            }
        }
    }

    /// Moves queued control messages and ready frames into the channels, and asks for more
    /// reads while the bulk buffer is under the high watermark. Returns whether anything was
    /// written (str0m then has packets to send: its last timeout is stale).
    fn flush(&mut self) -> Result<bool, PeerError> {
        let mut wrote = false;
        if !self.open {
            return Ok(wrote);
        }
        while let Some(m) = self.ctl_out.front() {
            if !self.peer.send_ctl(m)? {
                break;
            }
            self.ctl_out.pop_front();
            wrote = true;
        }
        while let Some((binary, data)) = self.upstream_out.front() {
            if !self.peer.send_upstream(*binary, data)? {
                break;
            }
            self.upstream_queued -= data.len();
            self.upstream_out.pop_front();
            wrote = true;
        }
        let Some(o) = self.outgoing.front_mut() else { return Ok(wrote) };
        while let Some(f) = o.ready.front() {
            if !self.peer.send_bulk(f)? {
                return Ok(wrote);
            }
            self.bulk_written += f.len() as u64;
            o.ready.pop_front();
            wrote = true;
        }
        let chunk = self.cfg.chunk;
        let window = self.window.get();
        while self.peer.bulk_buffered() + (o.reads_in_flight + o.ready.len()) * chunk < window {
            let Some(c) = o.sender.next_chunk() else { break };
            o.reads_in_flight += 1;
            let transfer = o.sender.transfer_id();
            self.events.push_back(SessionOutput::Io(IoRequest::Read { transfer, chunk: c }));
        }
        Ok(wrote)
    }

    /// Next thing to do. Call after every input until it returns `Timeout`.
    pub fn poll_output(&mut self) -> Result<SessionOutput, PeerError> {
        loop {
            if let Some(o) = self.events.pop_front() {
                return Ok(o);
            }
            match self.peer.poll_output()? {
                PeerOutput::Transmit { source, destination, contents } => {
                    return Ok(SessionOutput::Transmit { source, destination, contents });
                }
                PeerOutput::Event(e) => match e {
                    PeerEvent::Connected => return Ok(SessionOutput::Event(SessionEvent::Connected)),
                    PeerEvent::Open => {
                        self.open = true;
                        self.events.push_back(SessionOutput::Event(SessionEvent::Open));
                    }
                    PeerEvent::UpstreamOpen(label) => {
                        self.open = true;
                        self.events.push_back(SessionOutput::Event(SessionEvent::UpstreamOpen(label)));
                    }
                    PeerEvent::Upstream { binary, data } => {
                        self.events.push_back(SessionOutput::Event(SessionEvent::Upstream { binary, data }));
                    }
                    PeerEvent::Ctl(t) => self.on_ctl(t),
                    PeerEvent::Bulk(frame) => self.on_bulk(frame),
                    PeerEvent::Disconnected => return Ok(SessionOutput::Event(SessionEvent::Disconnected)),
                    PeerEvent::Reconnected => {}
                    PeerEvent::Closed => {
                        if let Some(e) = self.mark_closed() {
                            return Ok(e);
                        }
                    }
                },
                PeerOutput::Timeout(t) => {
                    if self.flush()? {
                        // A write is a mutation: str0m must be polled again before its timeout
                        // means anything (else the data waits for the next timer).
                        continue;
                    }
                    if self.closing
                        && self.ctl_out.is_empty()
                        && self.upstream_out.is_empty()
                        && self.peer.buffered() == 0
                        && self.peer.is_alive()
                    {
                        self.closing = false;
                        self.peer.close();
                        continue;
                    }
                    if self.events.is_empty() {
                        let t = if self.open && self.peer.is_alive() {
                            t.min(self.last_heard + self.cfg.disconnect_timeout)
                        } else {
                            t
                        };
                        return Ok(SessionOutput::Timeout(t));
                    }
                }
            }
        }
    }

    fn on_bulk(&mut self, frame: Vec<u8>) {
        let Ok((h, _)) = transfer::decode_frame(&frame) else { return };
        let transfer = h.transfer_id;
        let Some(inc) = self.incoming.get_mut(&transfer) else { return };
        match inc.receiver.on_frame(&frame) {
            Ok(Some(w)) => {
                let (file, offset) = (w.file, w.offset);
                let data = w.data.to_vec();
                inc.written += data.len() as u64;
                let step = transfer::ACK_EVERY;
                if inc.written % step < data.len() as u64 || inc.written == inc.total {
                    let progress = Progress { total_bytes: inc.total, acked_bytes: inc.written, ..Progress::default() };
                    self.events.push_back(SessionOutput::Event(SessionEvent::Progress {
                        transfer,
                        direction: Direction::Receive,
                        progress,
                    }));
                }
                self.events.push_back(SessionOutput::Io(IoRequest::Write { transfer, file, offset, data }));
            }
            Ok(None) => {}
            Err(e) => {
                inc.receiver.cancel(&format!("protocol error: {e}"));
                self.pump_receiver(transfer);
            }
        }
    }

    /// Starts a graceful close: control messages already queued (e.g. the last
    /// `transfer_complete`) are delivered first, then the connection shuts down. Outgoing
    /// transfers still running are abandoned.
    pub fn close(&mut self) {
        self.outgoing.clear();
        if self.open {
            self.closing = true;
        } else {
            self.peer.close();
        }
    }

    /// Closes at once, without waiting for queued messages.
    pub fn abort(&mut self) {
        self.closing = false;
        self.peer.close();
        // str0m does not always report its own close; make sure the caller hears of it once.
        if let Some(e) = self.mark_closed() {
            self.events.push_back(e);
        }
    }

    fn mark_closed(&mut self) -> Option<SessionOutput> {
        if self.closed {
            return None;
        }
        self.closed = true;
        self.open = false;
        Some(SessionOutput::Event(SessionEvent::Closed))
    }
}
