//! Room hub driven by several connections.

use super::*;

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
