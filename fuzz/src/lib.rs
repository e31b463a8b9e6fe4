//! Fuzz harnesses for everything in `sleap-rtc-core` that a remote party can feed.
//!
//! Each harness checks properties, not only "no panic": decoders must round-trip what they
//! accept, the room hub must keep its invariants and never deliver across rooms or under a
//! forged sender, the transfer receiver must never commit bytes that did not verify, and every
//! path a job spec or transfer manifest lets through must stay inside its directory.
//!
//! The same functions run under libFuzzer (`fuzz/run.sh`) and under `cargo test`, which replays
//! the committed corpora and every past crash (`tests/corpus.rs`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Component, Path};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use serde_json::{Value, json};
use sleap_rtc_core::job::{self, PathRef, PathVerdict, bridge};
use sleap_rtc_core::room::{ConnId, Grant, Hub, Limits, Millis, Output, Principal, RegisterRequest};
use sleap_rtc_core::signal::{self, ServerEnvelope, ServerMessage};
use sleap_rtc_core::transfer::{self, FileEntry, Manifest, Receiver, ReceiverAction, TransferMsg};
use sleap_rtc_core::{peer, registry, session, stun};

/// A relative name that a receiver will join onto its directory must only have normal
/// components: no root, no prefix, no `.`/`..`, no NUL.
fn assert_confined(name: &str) {
    assert!(!name.contains('\0'), "NUL let through in {name:?}");
    for c in Path::new(name).components() {
        assert!(matches!(c, Component::Normal(_)), "{name:?} has a {c:?} component");
    }
}

// ---------------------------------------------------------------------------------------------
// Signaling wire format

/// One text frame from a WebSocket client, and the same text as a client would decode a server
/// frame.
pub fn signal_decode(data: &[u8]) {
    // WebSocket text frames are UTF-8 (tungstenite rejects anything else before we see it).
    let Ok(text) = std::str::from_utf8(data) else { return };
    match signal::decode(text, 64 * 1024) {
        Ok(env) => {
            let again = signal::decode(&env.to_json(), usize::MAX).expect("a decoded message re-encodes decodably");
            assert_eq!(again, env, "client message does not round-trip");
        }
        Err(e) => {
            // The error reply must itself be a valid server frame.
            let reply = ServerEnvelope::reply(ServerMessage::from(e.error), e.request_id).to_json();
            ServerEnvelope::from_json(&reply).expect("error reply decodes");
        }
    }
    if let Ok(m) = ServerEnvelope::from_json(text) {
        let back = ServerEnvelope::from_json(&m.to_json()).expect("a decoded server frame re-encodes decodably");
        assert_eq!(json_of(&back), json_of(&m), "server message does not round-trip");
    }
}

fn json_of(m: &ServerEnvelope) -> Value {
    serde_json::from_str(&m.to_json()).unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------------------------
// Room hub driven by several connections

const ROOMS: [&str; 3] = ["room-a", "room-b", "room-c"];
const PEERS: [&str; 6] = ["p0", "p1", "p2", "worker-1", "client-1", "bad id!"];
const USERS: [&str; 3] = ["u0", "u1", "u2"];
const T0: u64 = 1_700_000_000_000;

#[derive(Arbitrary, Debug)]
enum Meta {
    None,
    Tags(Vec<u8>),
    Property { key: u8, value: i32 },
    Reserved,
    Big(u16),
}

impl Meta {
    fn value(&self) -> Value {
        match self {
            Meta::None => json!({}),
            Meta::Tags(t) => json!({"tags": t.iter().map(|b| format!("t{}", b % 4)).collect::<Vec<_>>()}),
            Meta::Property { key, value } => {
                let key = ["gpu", "status", "_token_id", "mem"][*key as usize % 4];
                json!({"properties": {key: value}})
            }
            Meta::Reserved => json!({"_token_id": "slp_secret"}),
            Meta::Big(n) => json!({"blob": "x".repeat(*n as usize)}),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Msg {
    Register { room: Option<u8>, peer: Option<u8>, role: u8, meta: Meta, cred: u8, admin: bool },
    Discover { role: Option<u8>, tag: Option<u8>, from: Option<u8> },
    UpdateMetadata { peer: Option<u8>, meta: Meta },
    PeerMessage { to: u8, from: Option<u8>, payload: Option<u8> },
    Relay { kind: u8, sender: Option<u8>, target: u8 },
    Mesh { kind: u8, from: Option<u8>, target: u8 },
    Ping,
    Ticket { target: u8, fingerprint: Option<u8> },
}

fn pick<'a>(pool: &[&'a str], i: u8) -> &'a str {
    pool[i as usize % pool.len()]
}

impl Msg {
    fn value(&self) -> Value {
        let peer = |i: &Option<u8>| i.map(|i| pick(&PEERS, i));
        match self {
            Msg::Register { room, peer: p, role, meta, cred, admin } => {
                let role = ["worker", "client", ""][*role as usize % 3];
                let mut v = json!({"type": "register", "role": role,
                    "metadata": meta.value(), "is_admin": admin});
                match cred % 3 {
                    0 => v["jwt"] = json!("jwt"),
                    1 => v["api_key"] = json!("slp_key"),
                    _ => {
                        v["id_token"] = json!("id");
                        v["token"] = json!("abc123");
                    }
                }
                if let Some(r) = room {
                    v["room_id"] = json!(pick(&ROOMS, *r));
                }
                if let Some(p) = peer(p) {
                    v["peer_id"] = json!(p);
                }
                v
            }
            Msg::Discover { role, tag, from } => {
                let mut f = json!({});
                if let Some(r) = role {
                    f["role"] = json!(["worker", "client"][*r as usize % 2]);
                }
                if let Some(t) = tag {
                    f["tags"] = json!([format!("t{}", t % 4)]);
                }
                json!({"type": "discover_peers", "filters": f, "from_peer_id": peer(from)})
            }
            Msg::UpdateMetadata { peer: p, meta } => {
                json!({"type": "update_metadata", "peer_id": peer(p), "metadata": meta.value()})
            }
            Msg::PeerMessage { to, from, payload } => json!({"type": "peer_message", "to_peer_id": pick(&PEERS, *to),
                "from_peer_id": peer(from), "payload": payload.map(|p| json!({"n": p}))}),
            Msg::Relay { kind, sender, target } => {
                let ty = ["offer", "answer", "candidate"][*kind as usize % 3];
                json!({"type": ty, "sender": peer(sender), "target": pick(&PEERS, *target), "sdp": "v=0"})
            }
            Msg::Mesh { kind, from, target } => {
                let (ty, field) =
                    [("mesh_connect", "offer"), ("mesh_answer", "answer"), ("ice_candidate", "candidate")]
                        [*kind as usize % 3];
                json!({"type": ty, field: {"x": 1}, "from_peer_id": peer(from), "target_peer_id": pick(&PEERS, *target)})
            }
            Msg::Ping => json!({"type": "ping", "request_id": 7}),
            Msg::Ticket { target, fingerprint } => json!({"type": "request_ticket", "target": pick(&PEERS, *target),
                "fingerprint": fingerprint.map(|f| format!("sha-256 {f:02X}")).unwrap_or_default()}),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum RoomOp {
    Connect(u8),
    Disconnect(u8),
    Raw(u8, String),
    Msg(u8, Msg),
    /// Answers the oldest pending credential check.
    Verdict {
        ok: bool,
        user: u8,
        expires_in: Option<u16>,
    },
    Advance(u16),
    Revoke(u8),
    RemoveMember(u8, u8),
    CloseRoom(u8),
    SetExpiry(u8, Option<u16>),
}

struct RoomModel {
    hub: Hub,
    now: u64,
    next_conn: u64,
    /// Slot -> the connection currently using it (connection ids are never reused, as in the
    /// server).
    slots: HashMap<u8, ConnId>,
    open: HashSet<ConnId>,
    connected_at: HashMap<ConnId, u64>,
    pending: VecDeque<(ConnId, RegisterRequest)>,
}

impl RoomModel {
    fn conn(&self, slot: u8) -> Option<ConnId> {
        self.slots.get(&(slot % 8)).copied().filter(|c| self.open.contains(c))
    }

    fn identity(&self, c: ConnId) -> Option<(String, String)> {
        self.hub.identity(c).map(|(r, p)| (r.to_owned(), p.to_owned()))
    }

    /// Drains the hub's outputs and checks each against the model. `from` is the connection
    /// whose frame caused them, with the identity it had before that frame.
    fn pump(&mut self, from: Option<(ConnId, Option<(String, String)>)>) {
        while let Some(o) = self.hub.poll_output() {
            match o {
                Output::Send { to, msg } => {
                    let text = msg.to_json();
                    let v: Value = serde_json::from_str(&text).expect("server frames are JSON");
                    ServerEnvelope::from_json(&text).expect("server frames decode");
                    for c in &to {
                        assert!(self.open.contains(c), "delivery to closed {c:?}: {text}");
                    }
                    let Some((src, ident)) = &from else { continue };
                    for c in to.iter().filter(|c| *c != src) {
                        let Some((room, peer)) = ident else {
                            panic!("unregistered {src:?} caused delivery to {c:?}: {text}");
                        };
                        let to_room = self.identity(*c).map(|(r, _)| r);
                        assert_eq!(to_room.as_deref(), Some(room.as_str()), "cross-room delivery: {text}");
                        for key in ["sender", "from_peer_id"] {
                            if let Some(s) = v.get(key).and_then(Value::as_str) {
                                assert_eq!(s, peer, "forged {key} delivered: {text}");
                            }
                        }
                    }
                }
                Output::Close { conn, .. } => {
                    assert!(self.open.remove(&conn), "close of a connection that is not open: {conn:?}");
                }
                Output::Authenticate { conn, request } => {
                    assert!(self.open.contains(&conn), "authentication for closed {conn:?}");
                    self.pending.push_back((conn, *request));
                }
                Output::Claim { .. } | Output::Publish(_) => panic!("cluster output from a single-instance hub"),
                Output::IssueTicket { conn, ticket, .. } => {
                    let (room, peer) = self.identity(conn).expect("ticket for an unregistered connection");
                    assert_eq!(ticket.room_id, room);
                    assert_eq!(ticket.client, peer);
                    let mut peers = self.hub.room_peers(&room);
                    let me = peers.find(|(p, _)| *p == peer).map(|(_, e)| e.principal.user_id.clone());
                    assert_eq!(me.as_deref(), Some(ticket.user_id.as_str()), "ticket names another user");
                    assert!(
                        self.hub.room_peers(&room).any(|(p, _)| p == ticket.worker),
                        "ticket for a peer outside the room"
                    );
                }
            }
        }
        if let Err(e) = self.hub.check_invariants() {
            panic!("hub invariant broken: {e}");
        }
    }

    fn step(&mut self, op: RoomOp) {
        let now = Millis(self.now);
        match op {
            RoomOp::Connect(s) => {
                if self.conn(s).is_some() {
                    return;
                }
                self.next_conn += 1;
                let c = ConnId(self.next_conn);
                self.slots.insert(s % 8, c);
                self.open.insert(c);
                self.connected_at.insert(c, self.now);
                self.hub.connect(c, now);
                self.pump(None);
            }
            RoomOp::Disconnect(s) => {
                let Some(c) = self.conn(s) else { return };
                self.open.remove(&c);
                self.hub.disconnect(c, now);
                self.pump(None);
            }
            RoomOp::Raw(s, text) => self.text(s, &text),
            RoomOp::Msg(s, m) => self.text(s, &m.value().to_string()),
            RoomOp::Verdict { ok, user, expires_in } => {
                let Some((c, req)) = self.pending.pop_front() else { return };
                let verdict = if ok {
                    Ok(Grant {
                        room_id: req.room_id.clone().unwrap_or_else(|| "room-a".into()),
                        default_peer_id: format!("auto-{}", c.0),
                        principal: Principal {
                            user_id: pick(&USERS, user).into(),
                            credential_id: format!("cred-{user}"),
                        },
                        room_expires_at: expires_in.map(|e| Millis(self.now + e as u64 * 10)),
                        token_echo: None,
                        worker_name: None,
                    })
                } else {
                    Err(signal::SignalError::new(signal::ErrorCode::AuthFailed, "no"))
                };
                // The connection may have gone while its credentials were checked, as in the server.
                self.hub.complete_register(c, verdict, now);
                self.pump(None);
            }
            RoomOp::Advance(ms) => {
                self.now += ms as u64 * 10;
                let now = Millis(self.now);
                if self.hub.poll_timeout().is_some_and(|t| t <= now) {
                    self.hub.handle_timeout(now);
                }
                self.pump(None);
                let timeout = self.hub.limits().register_timeout_ms;
                for c in &self.open {
                    if self.identity(*c).is_none() {
                        let age = self.now - self.connected_at[c];
                        assert!(age <= timeout, "{c:?} unregistered for {age} ms and still open");
                    }
                }
            }
            RoomOp::Revoke(u) => {
                self.hub.revoke_credential(&format!("cred-{u}"), now);
                self.pump(None);
            }
            RoomOp::RemoveMember(r, u) => {
                self.hub.remove_member(pick(&ROOMS, r), pick(&USERS, u), now);
                self.pump(None);
            }
            RoomOp::CloseRoom(r) => {
                self.hub.close_room(pick(&ROOMS, r), "deleted", now);
                self.pump(None);
            }
            RoomOp::SetExpiry(r, e) => {
                self.hub.set_room_expiry(pick(&ROOMS, r), e.map(|e| Millis(self.now + e as u64 * 10)));
                self.pump(None);
            }
        }
    }

    fn text(&mut self, slot: u8, text: &str) {
        let Some(c) = self.conn(slot) else { return };
        let before = self.identity(c);
        self.hub.handle_text(c, text, Millis(self.now));
        self.pump(Some((c, before)));
    }
}

/// Bytes from the cluster broker (another instance or whoever can write to Redis): the decoder
/// refuses garbage, round-trips what it accepts, and a cluster-mode hub with live local peers
/// applies any sequence of accepted messages keeping its invariants, delivering only to open
/// connections.
pub fn cluster_msg(data: &[u8]) {
    use sleap_rtc_core::cluster::ClusterMsg;
    let mut hub = Hub::new(Limits::default());
    hub.set_cluster(1);
    let now = Millis(1_700_000_000_000);
    let mut open = HashSet::new();
    for (c, peer) in [(1u64, "a"), (2, "b")] {
        hub.connect(ConnId(c), now);
        open.insert(ConnId(c));
        hub.handle_text(ConnId(c), &json!({"type":"register","jwt":"x","room_id":"r","peer_id":peer}).to_string(), now);
    }
    let mut claims = Vec::new();
    loop {
        while let Some(o) = hub.poll_output() {
            match o {
                Output::Authenticate { conn, .. } => {
                    let grant = Grant {
                        room_id: "r".into(),
                        default_peer_id: "x".into(),
                        principal: Principal { user_id: "u".into(), credential_id: "c".into() },
                        room_expires_at: None,
                        token_echo: None,
                        worker_name: None,
                    };
                    hub.complete_register(conn, Ok(grant), now);
                }
                Output::Claim { up, .. } => claims.push(ClusterMsg::PeerUp(*up)),
                Output::Send { to, .. } => assert!(to.iter().all(|c| open.contains(c)), "delivery to a closed conn"),
                Output::Close { conn, .. } => {
                    open.remove(&conn);
                }
                _ => {}
            }
        }
        let Some(m) = claims.pop() else { break };
        hub.handle_cluster(m, now);
    }
    // Frames: u16 length prefixes.
    let mut rest = data;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (frame, tail) = rest[2..].split_at(n);
        rest = tail;
        let Ok(msg) = ClusterMsg::decode(frame) else { continue };
        assert_eq!(ClusterMsg::decode(&msg.encode()).as_ref(), Ok(&msg), "accepted message does not round-trip");
        hub.handle_cluster(msg, now);
        while let Some(o) = hub.poll_output() {
            match o {
                Output::Send { to, msg } => {
                    assert!(to.iter().all(|c| open.contains(c)), "delivery to a closed conn: {msg:?}");
                    ServerEnvelope::from_json(&msg.to_json()).expect("server frames decode");
                }
                Output::Close { conn, .. } => assert!(open.remove(&conn), "double close of {conn:?}"),
                _ => {}
            }
        }
        if let Err(e) = hub.check_invariants() {
            panic!("invariant broken: {e}");
        }
    }
}

/// Arbitrary interleavings of connects, frames, credential verdicts, time, revocations and room
/// deletions from up to 8 connections.
pub fn room_sequence(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let limits = Limits {
        max_peers_per_room: 4,
        max_rooms: 2,
        rate_per_sec: 5.0,
        rate_burst: 10.0,
        rate_strikes_before_close: 5,
        register_timeout_ms: 2_000,
        max_failed_registers: 2,
        max_metadata_bytes: 512,
        ..Limits::default()
    };
    let mut m = RoomModel {
        hub: Hub::new(limits),
        now: T0,
        next_conn: 0,
        slots: HashMap::new(),
        open: HashSet::new(),
        connected_at: HashMap::new(),
        pending: VecDeque::new(),
    };
    for _ in 0..256 {
        let Ok(op) = u.arbitrary::<RoomOp>() else { break };
        m.step(op);
        if u.is_empty() {
            break;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transfer frames and manifests

/// A bulk frame, a control message and a file name, all from the remote peer.
pub fn transfer_decode(data: &[u8]) {
    if let Ok((h, payload)) = transfer::decode_frame(data) {
        let mut out = Vec::new();
        transfer::encode_frame(h, payload, &mut out);
        assert_eq!(out, data, "frame does not round-trip");
    }
    let text = String::from_utf8_lossy(data);
    if transfer::validate_name(&text).is_ok() {
        assert_confined(&text);
    }
    if let Ok(msg) = TransferMsg::from_json(&text) {
        let back = TransferMsg::from_json(&msg.to_json()).expect("a decoded transfer message re-encodes decodably");
        assert_eq!(back.to_json(), msg.to_json());
        if let TransferMsg::TransferOffer { manifest, .. } = &msg {
            let _ = manifest.derived_id();
            let _ = manifest.total_size();
            if transfer::validate_manifest(manifest, &transfer::Limits::default()).is_ok() {
                for f in &manifest.files {
                    assert_confined(&f.name);
                    assert!(!f.name.ends_with(".part"));
                }
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
enum RecvOp {
    /// A frame of the real content (`corrupt` flips a byte).
    Frame {
        file: u8,
        offset: u16,
        len: u16,
        corrupt: bool,
        write_now: bool,
    },
    Raw(Vec<u8>),
    Written(u8),
    /// The runtime could not write or hash the file.
    IoError(u8),
    Cancel,
    SenderCancel,
}

/// The receiving state machine against a model of the file system: arbitrary (also wrong,
/// overlapping, out-of-order and foreign) frames, partial writes, I/O failures and cancels.
pub fn transfer_receiver(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(n) = u.int_in_range(1..=3usize) else { return };
    let mut contents = Vec::new();
    let mut files = Vec::new();
    for i in 0..n {
        let size = u.int_in_range(0..=3000usize).unwrap_or(0);
        let seed = u.arbitrary::<u8>().unwrap_or(0);
        let body: Vec<u8> = (0..size).map(|j| (j as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        files.push(FileEntry {
            name: format!("f{i}.bin"),
            size: size as u64,
            blake3: blake3::hash(&body).to_hex().to_string(),
        });
        contents.push(body);
    }
    let manifest = Manifest { files };
    transfer::validate_manifest(&manifest, &transfer::Limits::default()).expect("harness manifest is valid");
    let existing: Vec<u64> = (0..n).map(|_| u.int_in_range(0..=3100u64).unwrap_or(0)).collect();
    let id = manifest.derived_id();
    let mut rx = Receiver::new(id, manifest.clone(), &existing);
    // What each `.part` holds; a resumed `.part` holds the real prefix.
    let mut parts: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let have = existing[i] as usize;
            if have <= contents[i].len() { contents[i][..have].to_vec() } else { Vec::new() }
        })
        .collect();
    let mut written: Vec<u64> = parts.iter().map(|p| p.len() as u64).collect();
    let mut committed = HashSet::new();
    let mut finished = false;
    let mut fail_commit = false;

    let drain = |rx: &mut Receiver,
                 parts: &mut Vec<Vec<u8>>,
                 written: &mut Vec<u64>,
                 committed: &mut HashSet<u32>,
                 finished: &mut bool,
                 fail_commit: bool| {
        while let Some(a) = rx.poll_action() {
            match a {
                ReceiverAction::Send(msg) => {
                    TransferMsg::from_json(&msg.to_json()).expect("receiver messages decode");
                    match msg {
                        TransferMsg::TransferFileResult { file, ok: true, .. } => {
                            assert!(committed.contains(&file), "ok reported for uncommitted file {file}")
                        }
                        TransferMsg::TransferComplete { ok, .. } => {
                            assert_eq!(ok as usize, committed.len(), "complete miscounts")
                        }
                        TransferMsg::TransferAck { file, offset, .. } => {
                            assert!(offset <= written[file as usize], "ack beyond written bytes")
                        }
                        _ => {}
                    }
                }
                ReceiverAction::Verify { file } => {
                    assert!(!*finished, "verify after finish");
                    let i = file as usize;
                    assert_eq!(parts[i].len(), contents[i].len(), "verify before the file is whole");
                    rx.verified(file, &blake3::hash(&parts[i]).to_hex());
                }
                ReceiverAction::Commit { file } => {
                    assert!(!*finished, "commit after finish");
                    let i = file as usize;
                    assert_eq!(parts[i], contents[i], "commit of bytes that are not the sender's file");
                    if fail_commit {
                        rx.committed(file, Err("disk full".into()));
                    } else {
                        committed.insert(file);
                        rx.committed(file, Ok(()));
                    }
                }
                ReceiverAction::Discard { file } => {
                    assert!(!committed.contains(&file), "discard of a committed file");
                    parts[file as usize].clear();
                    written[file as usize] = 0;
                }
                ReceiverAction::Finished { ok, failed, .. } => {
                    assert!(!*finished, "finished twice");
                    *finished = true;
                    assert_eq!(ok as usize + failed.len(), contents.len());
                    assert_eq!(ok as usize, committed.len());
                }
            }
        }
    };

    drain(&mut rx, &mut parts, &mut written, &mut committed, &mut finished, fail_commit);
    for _ in 0..128 {
        let Ok(op) = u.arbitrary::<RecvOp>() else { break };
        fail_commit = u.ratio(1, 8).unwrap_or(false);
        let mut frame = Vec::new();
        let (bytes, write_now) = match op {
            RecvOp::Frame { file, offset, len, corrupt, write_now } => {
                let i = file as usize % (n + 1);
                let body = contents.get(i).map(Vec::as_slice).unwrap_or(&[]);
                let start = (offset as usize).min(body.len() + 2);
                let end = (start + len as usize % 2048).min(body.len().max(start));
                let mut payload = body.get(start..end).map(<[u8]>::to_vec).unwrap_or_else(|| vec![0; 3]);
                if corrupt && !payload.is_empty() {
                    payload[0] ^= 0xff;
                }
                let h = transfer::FrameHeader { transfer_id: id, file: i as u32, offset: start as u64 };
                transfer::encode_frame(h, &payload, &mut frame);
                (true, write_now)
            }
            RecvOp::Raw(b) => {
                frame = b;
                (true, true)
            }
            RecvOp::Written(f) => {
                let i = f as usize % n;
                rx.written(i as u32, parts[i].len() as u64);
                written[i] = written[i].max(parts[i].len() as u64);
                (false, false)
            }
            RecvOp::IoError(f) => {
                rx.file_failed(f as u32 % n as u32, "I/O error");
                (false, false)
            }
            RecvOp::Cancel => {
                rx.cancel("user");
                (false, false)
            }
            RecvOp::SenderCancel => {
                rx.on_cancel("sender");
                (false, false)
            }
        };
        if bytes {
            match rx.on_frame(&frame) {
                Ok(Some(w)) => {
                    let i = w.file as usize;
                    assert!(!finished, "write accepted after the transfer ended");
                    assert_eq!(w.offset, parts[i].len() as u64, "write is not contiguous");
                    assert!(w.offset + w.data.len() as u64 <= contents[i].len() as u64, "write beyond the file size");
                    parts[i].extend_from_slice(w.data);
                    if write_now {
                        written[i] = parts[i].len() as u64;
                        rx.written(w.file, parts[i].len() as u64);
                    }
                }
                Ok(None) => {}
                // The runtime cancels on any frame error.
                Err(e) => rx.cancel(&e.to_string()),
            }
        }
        drain(&mut rx, &mut parts, &mut written, &mut committed, &mut finished, fail_commit);
        if finished {
            assert!(rx.is_over());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Job specs

/// A `job_submit` spec from a client, through parsing, validation, path mappings and the path
/// checks the worker makes before touching the file system.
pub fn job_spec(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_path_ref(&text);
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    match job::parse_spec(&v) {
        Ok(spec) => {
            let _ = job::validate(&spec);
            let again = serde_json::to_value(&spec).expect("spec serializes");
            assert_eq!(job::parse_spec(&again).as_ref().ok(), Some(&spec), "spec does not round-trip");
            let mapped = spec.mapped();
            let _ = job::check_paths(&mapped, |r| {
                check_ref(&r);
                PathVerdict::Ok
            });
        }
        Err(errors) => assert!(!errors.is_empty(), "rejection without a reason"),
    }
}

fn check_path_ref(p: &str) {
    if let Ok(r) = job::classify_path(p) {
        check_ref(&r);
    }
}

fn check_ref(r: &PathRef<'_>) {
    match r {
        PathRef::Upload(p) => assert_confined(p),
        PathRef::Worker(p) => {
            assert!(p.starts_with('/') && !p.contains('\0'), "worker path {p:?}");
            assert!(!Path::new(p).components().any(|c| c == Component::ParentDir), "worker path {p:?} has '..'");
        }
        PathRef::Model(id) => {
            registry::check_name("model id", id).expect("model ref passes the registry's name check");
            assert_confined(id);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Control channel messages and the trainer bridge

/// What arrives on the `ctl` data channel, and what the worker reads from sleap-nn (ZMQ progress
/// JSON, stdout/stderr, the uploaded training config).
pub fn ctl_and_bridge(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = session::check_ctl_size(&text);
    if let Ok(Some(m)) = job::JobMsg::decode(&text) {
        let v = m.to_value();
        let back = job::JobMsg::decode(&v.to_string()).expect("re-encoded job message decodes");
        assert_eq!(back.map(|b| b.to_value()), Some(v), "job message does not round-trip");
    }
    let _ = bridge::lenient_json(&text);
    let mut relay = bridge::ProgressRelay::new(Duration::from_millis(500));
    for (i, line) in text.split('\n').take(64).enumerate() {
        let now = Duration::from_millis(i as u64 * 137);
        for p in relay.on_message(line, now) {
            serde_json::to_string(&p).expect("progress serializes");
        }
        let _ = relay.poll(now);
        let _ = bridge::parse_inference_line(line);
    }
    let clean = bridge::strip_ansi(&text);
    assert!(!clean.contains('\u{1b}'), "escape left in {clean:?}");
    let mut logs = bridge::LogCoalescer::new(job::Stream::Stdout, Duration::from_millis(250));
    for (i, chunk) in data.chunks(7).enumerate() {
        for line in logs.push(chunk, Duration::from_millis(i as u64 * 40)) {
            assert!(!line.text.contains('\u{1b}'), "escape left in a log line");
        }
    }
    let _ = logs.finish();
    if let Ok(info) = bridge::ConfigInfo::parse(&text) {
        let _ = format!("{info:?}");
    }
    let _ = bridge::hydra_value(&text);
    let _ = bridge::predictions_name(&text);
    let _ = job::check_frames(&text);
    let _ = job::check_run_name(&text);
    let fp = job::auth::normalize_fingerprint(&text);
    let _ = job::auth::mac_matches(&fp, &text);
}

// ---------------------------------------------------------------------------------------------
// Registry manifest

#[derive(Arbitrary, Debug)]
enum RegOp {
    Add { id: u8, alias: Option<u8>, worker: u8, tag: u8, file: Option<String> },
    SetAlias { alias: String, id: u8 },
    RemoveAlias(String),
    Tag { id: u8, tag: String },
    Untag { id: u8, tag: String },
    Notes { id: u8, notes: String },
    Remove(u8),
    AddWorker { id: u8, worker: String },
    RemoveWorker { id: u8, worker: String },
    Resolve(String),
}

const MODEL_IDS: [&str; 4] = ["a1b2c3d4e5f6", "a1b2c3d4ffff", "0011223344", "../etc"];

/// A `manifest.json` read from a shared store (anyone with write access to the bucket could have
/// written it), then the registry operations applied to it.
pub fn registry_manifest(data: &[u8]) {
    // Layout: u16 big-endian length, that many bytes of manifest, then the operations (so a real
    // manifest.json can be a seed).
    let (bytes, ops) = match data {
        [a, b, rest @ ..] => rest.split_at((u16::from_be_bytes([*a, *b]) as usize).min(rest.len())),
        _ => (data, &[][..]),
    };
    let mut u = Unstructured::new(ops);
    let mut m = match registry::Manifest::decode(bytes, "room-a") {
        Ok(m) => {
            let again = registry::Manifest::decode(&m.to_json(), "room-a").expect("a decoded manifest re-encodes");
            assert_eq!(again, m, "manifest does not round-trip");
            m
        }
        Err(_) => registry::Manifest::new("room-a"),
    };
    for _ in 0..32 {
        let Ok(op) = u.arbitrary::<RegOp>() else { break };
        let id = |i: u8| pick(&MODEL_IDS, i).to_owned();
        let op = match op {
            RegOp::Add { id: i, alias, worker, tag, file } => {
                let entry = registry::ModelEntry {
                    id: id(i),
                    alias: alias.map(|a| format!("alias{}", a % 3)),
                    available_on_workers: vec![format!("w{}", worker % 3)],
                    tags: vec![format!("t{}", tag % 3)],
                    files: file
                        .map(|name| vec![registry::ModelFile { name, size: 1, blake3: "00".repeat(32) }])
                        .unwrap_or_default(),
                    ..Default::default()
                };
                registry::Op::AddModel(Box::new(entry))
            }
            RegOp::SetAlias { alias, id: i } => registry::Op::SetAlias { alias, id: id(i) },
            RegOp::RemoveAlias(alias) => registry::Op::RemoveAlias { alias },
            RegOp::Tag { id: i, tag } => registry::Op::Tag { id: id(i), tag },
            RegOp::Untag { id: i, tag } => registry::Op::Untag { id: id(i), tag },
            RegOp::Notes { id: i, notes } => registry::Op::SetNotes { id: id(i), notes },
            RegOp::Remove(i) => registry::Op::RemoveModel { id: id(i) },
            RegOp::AddWorker { id: i, worker } => registry::Op::AddWorker { id: id(i), worker },
            RegOp::RemoveWorker { id: i, worker } => registry::Op::RemoveWorker { id: id(i), worker },
            RegOp::Resolve(q) => {
                if let Ok(e) = m.resolve(&q) {
                    assert!(m.models.contains_key(&e.id));
                }
                continue;
            }
        };
        let before = m.clone();
        match registry::apply(&mut m, &op, "2026-11-22T00:00:00Z") {
            Err(_) => assert_eq!(m, before, "a failed operation changed the manifest"),
            Ok(_) => {
                if let Err(e) = m.check() {
                    panic!("operation {op:?} left an invalid manifest: {e}");
                }
                registry::Manifest::decode(&m.to_json(), "room-a").expect("what we write we can read");
                for e in m.models.values() {
                    assert_confined(&e.id);
                    for f in &e.files {
                        assert_confined(&f.name);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WebRTC: SDP, trickled candidates, datagrams

fn cert() -> Option<peer::DtlsCert> {
    static CERT: OnceLock<Option<peer::DtlsCert>> = OnceLock::new();
    CERT.get_or_init(peer::generate_certificate).clone()
}

fn drain_peer(p: &mut peer::Peer) {
    for _ in 0..64 {
        match p.poll_output() {
            Ok(peer::PeerOutput::Timeout(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// An SDP offer or answer, trickled candidate lines or a datagram from the remote peer (which
/// the signaling server relays verbatim, so anyone in the room can send them), and a STUN
/// server's reply.
pub fn peer_sdp(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let cfg = peer::PeerConfig { cert: cert(), ..Default::default() };
    let now = Instant::now();
    let local: std::net::SocketAddr = ([127, 0, 0, 1], 5000).into();
    let remote: std::net::SocketAddr = ([127, 0, 0, 1], 6000).into();
    let mut p = peer::Peer::new(&cfg, now);
    let _ = p.add_local_candidate(local, None);
    match mode % 5 {
        0 => {
            let _ = p.accept_offer(&text);
        }
        1 => {
            if p.create_offer().is_ok() {
                let _ = p.accept_answer(&text);
            }
        }
        2 => {
            for line in text.lines().take(32) {
                let _ = p.add_remote_candidate(line);
            }
        }
        3 => {
            // A datagram to a peer in the middle of ICE, from an address it has been told about.
            let mut offerer = peer::Peer::new(&cfg, now);
            let _ = offerer.add_local_candidate(remote, None);
            if let Ok(offer) = offerer.create_offer() {
                let _ = p.accept_offer(&offer);
                let _ = p.add_remote_candidate(&format!(
                    "candidate:1 1 udp 2130706431 {} {} typ host",
                    remote.ip(),
                    remote.port()
                ));
                drain_peer(&mut p);
                let _ = p.handle_receive(now + Duration::from_millis(5), remote, local, rest);
            }
        }
        _ => {
            let req = stun::binding_request();
            let _ = stun::mapped_address(rest, req.id);
            let _ = stun::parse_stun_url(&text);
            return;
        }
    }
    drain_peer(&mut p);
    let _ = p.handle_timeout(now + Duration::from_millis(50));
    drain_peer(&mut p);
}

// ---------------------------------------------------------------------------------------------
// Upstream sleap-rtc 0.0.7's data-channel protocol

/// One data-channel message from an upstream client (first byte: binary or text), then the same
/// bytes as the fields of every worker message: what the worker sends must split where the
/// clients split, whatever a path or a log line contains.
pub fn upstream_codec(data: &[u8]) {
    use sleap_rtc_core::upstream::{self as up, WorkerMsg};
    let Some((&first, rest)) = data.split_first() else { return };
    let _ = up::parse_frame(first & 1 == 1, rest.to_vec());
    let text = String::from_utf8_lossy(rest).into_owned();
    if let Ok(up::ClientMsg::FsListDir { path, .. }) = up::parse_client(&text) {
        assert!(text.contains(&path), "FS_LIST_DIR path {path:?} is not from {text:?}");
    }
    let _ = up::control_command(&text);
    for m in [
        WorkerMsg::Redraw(text.clone()),
        WorkerMsg::Line(text.clone()),
        WorkerMsg::JobLog { text: text.clone(), redraw: true },
        WorkerMsg::AuthFailure(text.clone()),
        WorkerMsg::WorkerPathError(text.clone()),
        WorkerMsg::InferenceLog(text.clone()),
    ] {
        let e = m.encode();
        assert!(!e.trim_end_matches('\n').contains(['\n', '\r']), "a line break inside {e:?}");
    }
    let meta = WorkerMsg::FileMeta { name: text.clone(), size: 7, hint: text.clone() }.encode();
    assert_eq!(meta.trim_start_matches("FILE_META::").split(':').count(), 3, "{meta:?}");
    let detail = json!({"message": text});
    let failed = WorkerMsg::JobFailed { job_id: text.clone(), detail: detail.clone() }.encode();
    // sleap_rtc.api: split("::", 2)[2] is the JSON.
    let parts: Vec<&str> = failed.splitn(3, "::").collect();
    assert_eq!(parts.get(2).and_then(|j| serde_json::from_str::<Value>(j).ok()), Some(detail.clone()), "{failed:?}");
    let done = WorkerMsg::JobComplete(detail.clone()).encode();
    let json_part = done.split_once("::").map(|(_, j)| j).unwrap_or_default();
    assert_eq!(serde_json::from_str::<Value>(json_part).ok(), Some(detail), "{done:?}");
    let mid = (0..=text.len() / 2).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    let (a, b) = text.split_at(mid);
    if let Some(mac) = up::auth::room_secret_hmac(a, b) {
        assert!(up::auth::room_secret_matches(a, b, &mac));
    }
    assert!(!up::auth::ed25519_matches(a, b, &text) || a.len() >= 43, "a short key cannot verify");
}
