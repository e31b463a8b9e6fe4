//! The signaling server's room and peer logic as a pure state machine.
//!
//! [`Hub`] owns every connection's session and every live room. It never touches a socket, a clock
//! or storage: the caller feeds it events (`connect`, `handle`, `complete_register`, `disconnect`,
//! `handle_timeout`, administrative evictions) with the current time, and drains [`Output`]s:
//! messages to deliver to connection ids, connections to close, and credentials to verify.
//!
//! Invariants (checked by [`Hub::check_invariants`] and the property tests):
//! - a connection acts only as the peer bound to it at `register`; sender fields that name anyone
//!   else are refused (upstream B1);
//! - nothing but `register` is accepted before registration completes;
//! - peer ids are unique within a room; a room's peer map and the sessions agree exactly, so a
//!   connection's cleanup removes only what it owns (B3, B4);
//! - deliveries never cross rooms;
//! - metadata keys starting with `_` are server-only and never accepted from or echoed to clients
//!   (B2, B19).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;

use crate::cluster::{ClusterMsg, PeerAt, PeerUp};
use crate::signal::{
    ClientMessage, Credential, DecodeError, DiscoverPeers, Envelope, ErrorCode, Filters, IceServer, MeshKind,
    MeshRelay, Object, PeerInfo, PeerMessage, Register, Relay, RelayKind, RequestId, RequestTicket, ServerEnvelope,
    ServerMessage, SignalError, UpdateMetadata,
};

/// Identifies one WebSocket connection; chosen by the caller, never reused while the hub knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Wall-clock time in Unix milliseconds, supplied by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Millis(pub u64);

impl Millis {
    pub fn secs_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }
    pub fn plus_ms(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
}

/// WebSocket close codes the hub asks for (4000–4999 is the application range).
pub mod close_code {
    /// Too many failed `register` attempts on one connection.
    pub const AUTH_FAILED: u16 = 4001;
    /// The credential was revoked or the peer's membership removed.
    pub const REVOKED: u16 = 4003;
    /// The room expired or was deleted (`room_closed` was sent first).
    pub const ROOM_CLOSED: u16 = 4004;
    /// No successful `register` within the registration timeout.
    pub const REGISTER_TIMEOUT: u16 = 4008;
    /// The same principal registered the same peer id on a newer connection.
    pub const SUPERSEDED: u16 = 4009;
    /// The outbound queue filled: the peer does not read fast enough.
    pub const SLOW_CONSUMER: u16 = 4013;
    /// The connection kept sending far beyond its rate limit.
    pub const RATE_LIMITED: u16 = 4029;
    /// Server shutting down.
    pub const GOING_AWAY: u16 = 1001;
}

/// Limits enforced by the hub. Every one answers with a clear error code instead of an effect.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted text frame, in bytes.
    pub max_message_bytes: usize,
    /// Largest peer metadata, serialized, in bytes.
    pub max_metadata_bytes: usize,
    pub max_peers_per_room: usize,
    /// Live rooms (rooms with at least one connected peer) per server.
    pub max_rooms: usize,
    /// Sustained messages per second per connection.
    pub rate_per_sec: f64,
    /// Burst size of the per-connection token bucket.
    pub rate_burst: f64,
    /// Frames over the limit (in a row) before the connection is closed.
    pub rate_strikes_before_close: u32,
    /// Time a connection may stay unregistered.
    pub register_timeout_ms: u64,
    /// Failed `register` attempts before the connection is closed.
    pub max_failed_registers: u32,
    pub max_peer_id_len: usize,
    pub max_role_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            max_metadata_bytes: 16 * 1024,
            max_peers_per_room: 1000,
            max_rooms: 10_000,
            rate_per_sec: 50.0,
            rate_burst: 200.0,
            rate_strikes_before_close: 200,
            register_timeout_ms: 10_000,
            max_failed_registers: 5,
            max_peer_id_len: 128,
            max_role_len: 64,
        }
    }
}

/// Who a registered peer is, as established by the credential check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: String,
    /// Identifies the credential (a worker token's or account key's non-secret id, or `jwt:<sub>`),
    /// so that revoking it can evict the peers that used it.
    pub credential_id: String,
}

/// What the caller must verify before a `register` can complete.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisterRequest {
    pub credential: Credential,
    pub room_id: Option<String>,
    pub peer_id: Option<String>,
    pub role: String,
}

/// The caller's verdict on a [`RegisterRequest`] that succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub room_id: String,
    /// Used when the client asked for no particular peer id (the caller picks it so the hub needs
    /// no randomness).
    pub default_peer_id: String,
    pub principal: Principal,
    pub room_expires_at: Option<Millis>,
    /// Echoed as `registered_auth.token` (upstream's legacy path echoes the room token).
    pub token_echo: Option<String>,
    /// Server-private label shown to room members through the HTTP API, never in metadata.
    pub worker_name: Option<String>,
}

/// Something the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Deliver `msg` to every connection in `to`.
    Send { to: Vec<ConnId>, msg: Arc<ServerEnvelope> },
    /// Close the connection with this WebSocket close code. The hub has already forgotten it.
    Close { conn: ConnId, code: u16, reason: String },
    /// Verify these credentials, then call [`Hub::complete_register`] with the result.
    Authenticate { conn: ConnId, request: Box<RegisterRequest> },
    /// Sign a peer ticket with these facts (all established by the hub) and send it to `conn` as
    /// `peer_ticket` with `request_id`.
    IssueTicket { conn: ConnId, request_id: Option<RequestId>, ticket: TicketFacts },
    /// Cluster mode: ask the broker to admit this peer cluster-wide (peer id unique, room and
    /// server limits). A refusal comes back through [`Hub::complete_claim`]; success arrives as
    /// the peer's own [`ClusterMsg::PeerUp`] through [`Hub::handle_cluster`].
    Claim { conn: ConnId, up: Box<PeerUp> },
    /// Cluster mode: something other instances must learn.
    Publish(Publish),
}

/// Cluster-mode work for the broker. Ownership-checked operations are no-ops at the broker when
/// `at` no longer owns the peer (it was superseded on another instance).
#[derive(Debug, Clone, PartialEq)]
pub enum Publish {
    /// A local peer's metadata changed: store it and broadcast the `PeerUp` if `at` still owns it.
    Update(Box<PeerUp>),
    /// A local peer left: remove it and broadcast `PeerDown` if `at` still owns it.
    Release { room_id: String, peer_id: String, at: PeerAt, reason: String },
    /// Tell every instance, this one included (administrative actions; applying them twice is
    /// harmless).
    Broadcast(ClusterMsg),
    /// Hand a message to one instance.
    Forward { instance: u64, msg: ClusterMsg },
}

/// What a peer ticket asserts; every field comes from the hub's own state except `fingerprint`,
/// which the requester states about itself (the worker checks it against the DTLS handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketFacts {
    pub user_id: String,
    pub room_id: String,
    pub client: String,
    pub worker: String,
    pub fingerprint: String,
}

/// Where a registered peer's connection lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    Local(ConnId),
    /// On another instance (cluster mode); this hub holds a replica.
    Remote(PeerAt),
}

/// A registered peer, as the room holds it.
#[derive(Debug, Clone)]
pub struct PeerEntry {
    pub at: At,
    pub role: String,
    pub metadata: Object,
    pub connected_at: Millis,
    pub principal: Principal,
    pub worker_name: Option<String>,
}

impl PeerEntry {
    /// The connection, when the peer is connected to this instance.
    pub fn local(&self) -> Option<ConnId> {
        match self.at {
            At::Local(c) => Some(c),
            At::Remote(_) => None,
        }
    }

    fn info(&self, peer_id: &str) -> PeerInfo {
        PeerInfo {
            peer_id: peer_id.to_owned(),
            role: self.role.clone(),
            metadata: self.metadata.clone(),
            connected_at: self.connected_at.secs_f64(),
        }
    }
}

#[derive(Debug, Default)]
struct Room {
    peers: HashMap<String, PeerEntry>,
    expires_at: Option<Millis>,
    admin: Option<String>,
}

#[derive(Debug, Clone)]
struct TokenBucket {
    tokens: f64,
    last: Millis,
}

impl TokenBucket {
    fn new(burst: f64, now: Millis) -> Self {
        TokenBucket { tokens: burst, last: now }
    }

    fn allow(&mut self, now: Millis, rate: f64, burst: f64) -> bool {
        let dt = now.0.saturating_sub(self.last.0) as f64 / 1000.0;
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A standalone token bucket for callers that rate-limit other things (e.g. per-IP HTTP calls).
#[derive(Debug, Clone)]
pub struct RateLimiter {
    bucket: TokenBucket,
    rate: f64,
    burst: f64,
}

impl RateLimiter {
    pub fn new(rate_per_sec: f64, burst: f64, now: Millis) -> Self {
        RateLimiter { bucket: TokenBucket::new(burst, now), rate: rate_per_sec, burst }
    }
    pub fn allow(&mut self, now: Millis) -> bool {
        self.bucket.allow(now, self.rate, self.burst)
    }
    /// True once the bucket is full again, i.e. the limiter carries no state worth keeping.
    pub fn is_idle(&self, now: Millis) -> bool {
        let dt = now.0.saturating_sub(self.bucket.last.0) as f64 / 1000.0;
        self.bucket.tokens + dt * self.rate >= self.burst
    }
}

#[derive(Debug)]
enum State {
    Fresh {
        deadline: Millis,
    },
    Pending {
        deadline: Millis,
        reg: Box<PendingRegister>,
        request_id: Option<RequestId>,
    },
    /// Cluster mode: credentials verified, waiting for the broker to admit the peer.
    Claiming {
        deadline: Millis,
        claim: Box<Claiming>,
    },
    Registered {
        room_id: String,
        peer_id: String,
    },
}

#[derive(Debug)]
struct PendingRegister {
    peer_id: Option<String>,
    role: String,
    metadata: Object,
    is_admin: bool,
}

#[derive(Debug)]
struct Claiming {
    room_id: String,
    peer_id: String,
    request_id: Option<RequestId>,
    token_echo: Option<String>,
}

#[derive(Debug)]
struct Session {
    state: State,
    bucket: TokenBucket,
    strikes: u32,
    failed_registers: u32,
}

/// Counts for metrics and health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub connections: usize,
    /// Peers connected to this instance.
    pub registered: usize,
    /// Rooms with at least one peer connected to this instance.
    pub rooms: usize,
    /// Cluster mode: peers of other instances this hub holds replicas of.
    pub remote_peers: usize,
}

/// The server-side signaling state machine. See the module docs.
#[derive(Debug, Default)]
pub struct Hub {
    limits: Limits,
    sessions: HashMap<ConnId, Session>,
    rooms: HashMap<String, Room>,
    /// Rooms closed recently, so a registration whose credential check raced with the close is
    /// still refused. Entries are dropped after [`TOMBSTONE_MS`].
    tombstones: HashMap<String, Millis>,
    deadlines: BTreeSet<(Millis, ConnId)>,
    expiries: BTreeSet<(Millis, String)>,
    out: VecDeque<Output>,
    ice_servers: Vec<IceServer>,
    /// Cluster mode: this instance's id.
    cluster: Option<u64>,
}

const TOMBSTONE_MS: u64 = 5 * 60 * 1000;

impl Hub {
    pub fn new(limits: Limits) -> Self {
        Hub { limits, ..Default::default() }
    }

    /// ICE servers handed to every peer in `registered_auth`.
    pub fn set_ice_servers(&mut self, servers: Vec<IceServer>) {
        self.ice_servers = servers;
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Switches to cluster mode as instance `instance`: admissions go through the broker
    /// ([`Output::Claim`]) and changes are published ([`Output::Publish`]). Call before any
    /// connection.
    pub fn set_cluster(&mut self, instance: u64) {
        self.cluster = Some(instance);
    }

    pub fn cluster_instance(&self) -> Option<u64> {
        self.cluster
    }

    /// The link to the broker was lost: forgets every remote peer (without telling anyone: call
    /// after [`Hub::close_all`]) until a new [`Hub::set_cluster`] and snapshot.
    pub fn leave_cluster(&mut self) {
        for room in self.rooms.values_mut() {
            room.peers.retain(|_, p| p.local().is_some());
            if room.admin.as_ref().is_some_and(|a| !room.peers.contains_key(a)) {
                room.admin = None;
            }
        }
        let empty: Vec<String> =
            self.rooms.iter().filter(|(_, r)| r.peers.is_empty()).map(|(k, _)| k.clone()).collect();
        for id in empty {
            if let Some(t) = self.rooms.remove(&id).and_then(|r| r.expires_at) {
                self.expiries.remove(&(t, id));
            }
        }
    }

    pub fn stats(&self) -> Stats {
        let mut st = Stats { connections: self.sessions.len(), ..Stats::default() };
        for r in self.rooms.values() {
            let local = r.peers.values().filter(|p| p.local().is_some()).count();
            st.registered += local;
            st.remote_peers += r.peers.len() - local;
            st.rooms += usize::from(local > 0);
        }
        st
    }

    /// Next output, if any. Drain after every call that takes an event.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Earliest time at which [`Hub::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let a = self.deadlines.first().map(|(t, _)| *t);
        let b = self.expiries.first().map(|(t, _)| *t);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The live peers of a room (for the HTTP API's worker list and the dashboard).
    pub fn room_peers(&self, room_id: &str) -> impl Iterator<Item = (&str, &PeerEntry)> {
        self.rooms.get(room_id).into_iter().flat_map(|r| r.peers.iter().map(|(k, v)| (k.as_str(), v)))
    }

    /// The room and peer id a connection is registered as.
    pub fn identity(&self, conn: ConnId) -> Option<(&str, &str)> {
        match &self.sessions.get(&conn)?.state {
            State::Registered { room_id, peer_id } => Some((room_id, peer_id)),
            _ => None,
        }
    }

    pub fn connect(&mut self, conn: ConnId, now: Millis) {
        let deadline = now.plus_ms(self.limits.register_timeout_ms);
        if let Some(old) = self.sessions.remove(&conn) {
            // A caller reusing a live id is a caller bug; forget the old session cleanly.
            self.forget(conn, old, now, "replaced");
        }
        self.sessions.insert(
            conn,
            Session {
                state: State::Fresh { deadline },
                bucket: TokenBucket::new(self.limits.rate_burst, now),
                strikes: 0,
                failed_registers: 0,
            },
        );
        self.deadlines.insert((deadline, conn));
    }

    /// The connection went away. Removes only what this connection owns.
    pub fn disconnect(&mut self, conn: ConnId, now: Millis) {
        if let Some(s) = self.sessions.remove(&conn) {
            self.forget(conn, s, now, "disconnected");
        }
    }

    /// Convenience for callers that do not decode off-thread: decode and handle one text frame.
    pub fn handle_text(&mut self, conn: ConnId, text: &str, now: Millis) {
        let decoded = crate::signal::decode(text, self.limits.max_message_bytes);
        self.handle(conn, decoded, now);
    }

    /// Handles one decoded (or undecodable) frame from `conn`.
    pub fn handle(&mut self, conn: ConnId, frame: Result<Envelope, DecodeError>, now: Millis) {
        let limits = &self.limits;
        let Some(session) = self.sessions.get_mut(&conn) else { return };
        if !session.bucket.allow(now, limits.rate_per_sec, limits.rate_burst) {
            session.strikes += 1;
            if session.strikes >= limits.rate_strikes_before_close {
                self.close(conn, close_code::RATE_LIMITED, "rate limit exceeded", now);
                return;
            }
            let rid = match &frame {
                Ok(e) => e.request_id.clone(),
                Err(e) => e.request_id.clone(),
            };
            let err = SignalError::new(
                ErrorCode::RateLimited,
                format!("rate limit exceeded ({} messages/s)", limits.rate_per_sec),
            );
            self.reply(conn, err.into(), rid);
            return;
        }
        session.strikes = 0;
        let Envelope { request_id, msg } = match frame {
            Ok(env) => env,
            Err(e) => {
                self.reply(conn, e.error.into(), e.request_id);
                return;
            }
        };
        let result = match msg {
            ClientMessage::Register(reg) => self.on_register(conn, *reg, request_id.clone(), now),
            ClientMessage::Ping => {
                self.reply(conn, ServerMessage::Pong {}, request_id.clone());
                Ok(())
            }
            other => match self.sessions.get(&conn).map(|s| &s.state) {
                Some(State::Registered { room_id, peer_id }) => {
                    let (room_id, peer_id) = (room_id.clone(), peer_id.clone());
                    self.on_registered(conn, &room_id, &peer_id, other, request_id.clone(), now)
                }
                Some(State::Pending { .. } | State::Claiming { .. }) => Err(SignalError::new(
                    ErrorCode::RegistrationPending,
                    "registration in progress; wait for registered_auth",
                )),
                _ => Err(SignalError::new(ErrorCode::NotRegistered, "Peer not registered; send register first")),
            },
        };
        if let Err(e) = result {
            self.reply(conn, e.into(), request_id);
        }
    }

    fn on_register(
        &mut self,
        conn: ConnId,
        reg: Register,
        request_id: Option<RequestId>,
        _now: Millis,
    ) -> Result<(), SignalError> {
        let Some(session) = self.sessions.get(&conn) else { return Ok(()) };
        let deadline = match &session.state {
            State::Fresh { deadline } => *deadline,
            State::Pending { .. } | State::Claiming { .. } => {
                return Err(SignalError::new(ErrorCode::RegistrationPending, "registration already in progress"));
            }
            State::Registered { .. } => {
                return Err(SignalError::new(
                    ErrorCode::AlreadyRegistered,
                    "this connection is already registered; open a new connection for another peer",
                ));
            }
        };
        let credential = reg.credential()?;
        if let Some(p) = &reg.peer_id {
            validate_peer_id(p, self.limits.max_peer_id_len)?;
        }
        let role = reg.role.clone().unwrap_or_else(|| "peer".to_owned());
        if role.is_empty() || role.len() > self.limits.max_role_len {
            return Err(SignalError::new(
                ErrorCode::InvalidMessage,
                format!("role must be 1 to {} bytes", self.limits.max_role_len),
            ));
        }
        let metadata = reg.metadata.clone().unwrap_or_default();
        validate_metadata(&metadata, self.limits.max_metadata_bytes)?;
        let request = RegisterRequest {
            credential,
            room_id: reg.room_id.clone(),
            peer_id: reg.peer_id.clone(),
            role: role.clone(),
        };
        let pending = PendingRegister { peer_id: reg.peer_id, role, metadata, is_admin: reg.is_admin };
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.state = State::Pending { deadline, reg: Box::new(pending), request_id };
        }
        self.out.push_back(Output::Authenticate { conn, request: Box::new(request) });
        Ok(())
    }

    /// Completes a registration that [`Output::Authenticate`] asked for. `Err` carries the error
    /// to tell the client (e.g. `AUTH_FAILED` "Invalid API key").
    pub fn complete_register(&mut self, conn: ConnId, verdict: Result<Grant, SignalError>, now: Millis) {
        let Some(session) = self.sessions.get_mut(&conn) else { return };
        let State::Pending { deadline, .. } = &session.state else { return };
        let deadline = *deadline;
        let State::Pending { reg, request_id, .. } = std::mem::replace(&mut session.state, State::Fresh { deadline })
        else {
            return;
        };
        if let Err(e) = verdict.and_then(|g| self.admit(conn, *reg, g, request_id.clone(), now)) {
            self.fail_register(conn, e, request_id, now);
        }
    }

    fn admit(
        &mut self,
        conn: ConnId,
        reg: PendingRegister,
        grant: Grant,
        request_id: Option<RequestId>,
        now: Millis,
    ) -> Result<(), SignalError> {
        if self.tombstones.contains_key(&grant.room_id) {
            return Err(SignalError::new(ErrorCode::RoomNotFound, "Room not found"));
        }
        if grant.room_expires_at.is_some_and(|t| t <= now) {
            return Err(SignalError::new(ErrorCode::RoomExpired, "Room expired"));
        }
        let peer_id = reg.peer_id.clone().unwrap_or_else(|| grant.default_peer_id.clone());
        validate_peer_id(&peer_id, self.limits.max_peer_id_len)?;
        if let Some(instance) = self.cluster {
            // The broker decides uniqueness and limits for the whole cluster; the registration
            // completes when our own PeerUp comes back in the broker's order.
            let up = PeerUp {
                room_id: grant.room_id.clone(),
                peer_id: peer_id.clone(),
                at: PeerAt { instance, conn: conn.0 },
                role: reg.role,
                metadata: Value::Object(reg.metadata).to_string(),
                connected_at: now.0,
                user_id: grant.principal.user_id,
                credential_id: grant.principal.credential_id,
                worker_name: grant.worker_name,
                is_admin: reg.is_admin,
                room_expires_at: grant.room_expires_at.map(|t| t.0),
            };
            if let Some(s) = self.sessions.get_mut(&conn) {
                let deadline = match s.state {
                    State::Fresh { deadline } => deadline,
                    _ => return Ok(()),
                };
                let claim = Claiming { room_id: grant.room_id, peer_id, request_id, token_echo: grant.token_echo };
                s.state = State::Claiming { deadline, claim: Box::new(claim) };
                self.out.push_back(Output::Claim { conn, up: Box::new(up) });
            }
            return Ok(());
        }
        let mut superseded = None;
        match self.rooms.get(&grant.room_id) {
            None if self.rooms.len() >= self.limits.max_rooms => {
                return Err(SignalError::new(ErrorCode::ServerFull, "server has reached its room limit"));
            }
            None => {}
            Some(room) => {
                if let Some(existing) = room.peers.get(&peer_id) {
                    if existing.principal == grant.principal {
                        superseded = existing.local();
                    } else {
                        return Err(SignalError::new(
                            ErrorCode::PeerIdTaken,
                            format!("peer id '{peer_id}' is already in use in this room"),
                        ));
                    }
                } else if room.peers.len() >= self.limits.max_peers_per_room {
                    return Err(SignalError::new(
                        ErrorCode::RoomFull,
                        format!("room has reached its limit of {} peers", self.limits.max_peers_per_room),
                    ));
                }
            }
        }
        if let Some(old) = superseded {
            self.close(old, close_code::SUPERSEDED, "peer id registered again on a newer connection", now);
        }
        let entry = PeerEntry {
            at: At::Local(conn),
            role: reg.role,
            metadata: reg.metadata,
            connected_at: now,
            principal: grant.principal,
            worker_name: grant.worker_name,
        };
        let claim = Claiming { room_id: grant.room_id, peer_id, request_id, token_echo: grant.token_echo };
        self.insert_local(conn, claim, entry, reg.is_admin, grant.room_expires_at);
        Ok(())
    }

    /// Puts a peer into its room (creating the room) and schedules the room's expiry.
    fn insert_entry(
        &mut self,
        room_id: &str,
        peer_id: &str,
        entry: PeerEntry,
        expires_at: Option<Millis>,
    ) -> &mut Room {
        let room = self.rooms.entry(room_id.to_owned()).or_default();
        if room.expires_at != expires_at {
            if let Some(t) = room.expires_at {
                self.expiries.remove(&(t, room_id.to_owned()));
            }
            room.expires_at = expires_at;
            if let Some(t) = expires_at {
                self.expiries.insert((t, room_id.to_owned()));
            }
        }
        room.peers.insert(peer_id.to_owned(), entry);
        room
    }

    /// Completes the registration of a local connection whose admission was decided: the room
    /// learns of the peer, the peer gets `registered_auth` with everyone already there.
    fn insert_local(
        &mut self,
        conn: ConnId,
        claim: Claiming,
        entry: PeerEntry,
        is_admin: bool,
        expires_at: Option<Millis>,
    ) {
        let Claiming { room_id, peer_id, request_id, token_echo } = claim;
        let joined = ServerMessage::PeerJoined { peer: entry.info(&peer_id) };
        let (others, peer_list, peer_metadata) = match self.rooms.get(&room_id) {
            Some(room) => (
                room.peers.iter().filter(|(id, _)| **id != peer_id).filter_map(|(_, p)| p.local()).collect(),
                room.peers.keys().filter(|id| **id != peer_id).cloned().collect(),
                room.peers
                    .iter()
                    .filter(|(id, _)| **id != peer_id)
                    .map(|(id, p)| (id.clone(), Value::Object(p.metadata.clone())))
                    .collect(),
            ),
            None => (Vec::new(), Vec::new(), Object::new()),
        };
        let room = self.insert_entry(&room_id, &peer_id, entry, expires_at);
        let mut admin_conflict = None;
        if is_admin {
            match &room.admin {
                Some(a) if *a != peer_id => admin_conflict = Some(a.clone()),
                _ => room.admin = Some(peer_id.clone()),
            }
        }
        let admin_peer_id = room.admin.clone();
        if let Some(s) = self.sessions.get_mut(&conn) {
            if let State::Fresh { deadline } | State::Claiming { deadline, .. } = s.state {
                self.deadlines.remove(&(deadline, conn));
            }
            s.state = State::Registered { room_id: room_id.clone(), peer_id: peer_id.clone() };
            s.failed_registers = 0;
        }
        self.reply(
            conn,
            ServerMessage::RegisteredAuth {
                room_id: room_id.clone(),
                token: token_echo,
                peer_id,
                admin_peer_id,
                peer_list,
                peer_metadata,
                ice_servers: self.ice_servers.clone(),
                mesh_ice_servers: self.ice_servers.clone(),
            },
            request_id,
        );
        if let Some(current_admin) = admin_conflict {
            self.reply(conn, ServerMessage::AdminConflict { room_id, current_admin }, None);
        }
        if !others.is_empty() {
            self.out.push_back(Output::Send { to: others, msg: Arc::new(ServerEnvelope::new(joined)) });
        }
    }

    /// Cluster mode: the broker refused (or could not run) the admission asked for by
    /// [`Output::Claim`]. Success needs no call: it arrives as the peer's `PeerUp`.
    pub fn complete_claim(&mut self, conn: ConnId, refusal: SignalError, now: Millis) {
        let Some(s) = self.sessions.get_mut(&conn) else { return };
        let State::Claiming { deadline, .. } = s.state else { return };
        let State::Claiming { claim, .. } = std::mem::replace(&mut s.state, State::Fresh { deadline }) else {
            return;
        };
        self.fail_register(conn, refusal, claim.request_id, now);
    }

    fn fail_register(&mut self, conn: ConnId, e: SignalError, request_id: Option<RequestId>, now: Millis) {
        self.reply(conn, e.into(), request_id);
        let limit = self.limits.max_failed_registers;
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.failed_registers += 1;
            if s.failed_registers >= limit {
                self.close(conn, close_code::AUTH_FAILED, "too many failed registrations", now);
            }
        }
    }

    /// Cluster mode: applies a message from the broker (this instance's inbox).
    pub fn handle_cluster(&mut self, msg: ClusterMsg, now: Millis) {
        let Some(me) = self.cluster else { return };
        match msg {
            ClusterMsg::PeerUp(up) => self.on_peer_up(me, up, now),
            ClusterMsg::PeerDown { room_id, peer_id, at, reason } => {
                self.remove_remote(&room_id, |id, p| id == peer_id && p.at == At::Remote(at), &reason);
            }
            ClusterMsg::Deliver { room_id, peer_id, conn, envelope } => {
                let conn = ConnId(conn);
                let current = self.rooms.get(&room_id).and_then(|r| r.peers.get(&peer_id)).map(|p| p.at);
                if current != Some(At::Local(conn)) {
                    return;
                }
                if let Ok(env) = ServerEnvelope::from_json(&envelope) {
                    self.out.push_back(Output::Send { to: vec![conn], msg: Arc::new(env) });
                }
            }
            ClusterMsg::InstanceDown { instance } => {
                let rooms: Vec<String> = self.rooms.keys().cloned().collect();
                for r in rooms {
                    self.remove_remote(
                        &r,
                        |_, p| matches!(p.at, At::Remote(a) if a.instance == instance),
                        "server instance lost",
                    );
                }
            }
            ClusterMsg::CloseRoom { room_id, reason } => {
                self.tombstones.insert(room_id.clone(), now);
                self.shut_room(&room_id, &reason, now);
            }
            ClusterMsg::RoomExpiry { room_id, expires_at } => self.set_expiry_here(&room_id, expires_at.map(Millis)),
            ClusterMsg::Revoke { credential_id } => {
                self.evict(|_, p| p.principal.credential_id == credential_id, "credential revoked", now);
            }
            ClusterMsg::RemoveMember { room_id, user_id } => {
                self.evict(|r, p| r == room_id && p.principal.user_id == user_id, "membership removed", now);
            }
        }
    }

    fn on_peer_up(&mut self, me: u64, up: PeerUp, now: Millis) {
        let mine = up.at.instance == me;
        let at = if mine { At::Local(ConnId(up.at.conn)) } else { At::Remote(up.at) };
        let release = |up: &PeerUp, reason: &str| {
            Output::Publish(Publish::Release {
                room_id: up.room_id.clone(),
                peer_id: up.peer_id.clone(),
                at: up.at,
                reason: reason.to_owned(),
            })
        };
        let metadata = match serde_json::from_str::<Value>(&up.metadata) {
            Ok(Value::Object(m)) if validate_metadata(&m, usize::MAX).is_ok() => m,
            _ => return,
        };
        if validate_peer_id(&up.peer_id, usize::MAX).is_err() {
            return;
        }
        let claiming = |s: Option<&Session>| match s.map(|s| &s.state) {
            Some(State::Claiming { claim, .. }) => claim.room_id == up.room_id && claim.peer_id == up.peer_id,
            _ => false,
        };
        if self.tombstones.contains_key(&up.room_id) {
            if mine {
                let conn = ConnId(up.at.conn);
                if claiming(self.sessions.get(&conn)) {
                    self.complete_claim(conn, SignalError::new(ErrorCode::RoomNotFound, "Room not found"), now);
                }
                self.out.push_back(release(&up, "room closed"));
            }
            return;
        }
        let existing = self.rooms.get(&up.room_id).and_then(|r| r.peers.get(&up.peer_id)).map(|p| p.at);
        if existing == Some(at) {
            // The same registration again: a metadata change (ours was applied when it happened).
            if let At::Remote(_) = at {
                self.remote_metadata(&up.room_id, &up.peer_id, metadata);
            }
            return;
        }
        match existing {
            // The broker let the same principal take the peer id over (a reconnect).
            Some(At::Local(old)) => {
                self.close(old, close_code::SUPERSEDED, "peer id registered again on a newer connection", now)
            }
            Some(At::Remote(old)) => {
                self.remove_remote(&up.room_id, |id, p| id == up.peer_id && p.at == At::Remote(old), "superseded")
            }
            None => {}
        }
        let entry = PeerEntry {
            at,
            role: up.role.clone(),
            metadata,
            connected_at: Millis(up.connected_at),
            principal: Principal { user_id: up.user_id.clone(), credential_id: up.credential_id.clone() },
            worker_name: up.worker_name.clone(),
        };
        let expires_at = up.room_expires_at.map(Millis);
        if mine {
            let conn = ConnId(up.at.conn);
            if !claiming(self.sessions.get(&conn)) {
                // The connection went away while the broker admitted it.
                self.out.push_back(release(&up, "disconnected"));
                return;
            }
            let Some(s) = self.sessions.get_mut(&conn) else { return };
            let State::Claiming { deadline, .. } = s.state else { return };
            let State::Claiming { claim, .. } = std::mem::replace(&mut s.state, State::Fresh { deadline }) else {
                return;
            };
            self.insert_local(conn, *claim, entry, up.is_admin, expires_at);
            return;
        }
        let joined = ServerMessage::PeerJoined { peer: entry.info(&up.peer_id) };
        let room = self.insert_entry(&up.room_id, &up.peer_id, entry, expires_at);
        if up.is_admin && room.admin.is_none() {
            room.admin = Some(up.peer_id.clone());
        }
        let others: Vec<ConnId> =
            room.peers.iter().filter(|(id, _)| **id != up.peer_id).filter_map(|(_, p)| p.local()).collect();
        if !others.is_empty() {
            self.out.push_back(Output::Send { to: others, msg: Arc::new(ServerEnvelope::new(joined)) });
        }
    }

    fn remote_metadata(&mut self, room_id: &str, peer_id: &str, metadata: Object) {
        let Some(room) = self.rooms.get_mut(room_id) else { return };
        let Some(entry) = room.peers.get_mut(peer_id) else { return };
        entry.metadata = metadata.clone();
        let others: Vec<ConnId> = room.peers.values().filter_map(PeerEntry::local).collect();
        if !others.is_empty() {
            let msg = ServerMessage::MetadataUpdated { peer_id: peer_id.to_owned(), metadata };
            self.out.push_back(Output::Send { to: others, msg: Arc::new(ServerEnvelope::new(msg)) });
        }
    }

    /// Drops the replicas of remote peers of a room that `pred` selects; local peers are told.
    fn remove_remote(&mut self, room_id: &str, pred: impl Fn(&str, &PeerEntry) -> bool, reason: &str) {
        let Some(room) = self.rooms.get_mut(room_id) else { return };
        let gone: Vec<String> = room
            .peers
            .iter()
            .filter(|(id, p)| matches!(p.at, At::Remote(_)) && pred(id, p))
            .map(|(id, _)| id.clone())
            .collect();
        for peer_id in gone {
            room.peers.remove(&peer_id);
            if room.admin.as_deref() == Some(peer_id.as_str()) {
                room.admin = None;
            }
            let others: Vec<ConnId> = room.peers.values().filter_map(PeerEntry::local).collect();
            if !others.is_empty() {
                let msg = ServerMessage::PeerLeft { peer_id, reason: reason.to_owned() };
                self.out.push_back(Output::Send { to: others, msg: Arc::new(ServerEnvelope::new(msg)) });
            }
        }
        if room.peers.is_empty() {
            if let Some(t) = room.expires_at {
                self.expiries.remove(&(t, room_id.to_owned()));
            }
            self.rooms.remove(room_id);
        }
    }

    fn on_registered(
        &mut self,
        conn: ConnId,
        room_id: &str,
        me: &str,
        msg: ClientMessage,
        request_id: Option<RequestId>,
        _now: Millis,
    ) -> Result<(), SignalError> {
        match msg {
            ClientMessage::Register(_) | ClientMessage::Ping => Ok(()),
            ClientMessage::DiscoverPeers(DiscoverPeers { from_peer_id, filters }) => {
                check_sender(from_peer_id.as_deref(), me)?;
                let filters = filters.unwrap_or_default();
                validate_filters(&filters)?;
                let room = self.room(room_id)?;
                let peers: Vec<PeerInfo> = room
                    .peers
                    .iter()
                    .filter(|(id, p)| id.as_str() != me && matches(&filters, p))
                    .map(|(id, p)| p.info(id))
                    .collect();
                let count = peers.len();
                self.reply(conn, ServerMessage::PeerList { to_peer_id: me.to_owned(), peers, count }, request_id);
                Ok(())
            }
            ClientMessage::UpdateMetadata(UpdateMetadata { peer_id, metadata }) => {
                check_sender(peer_id.as_deref(), me)?;
                if metadata.is_empty() {
                    return Err(SignalError::new(ErrorCode::InvalidMessage, "Missing required fields: metadata"));
                }
                let max = self.limits.max_metadata_bytes;
                validate_metadata(&metadata, max)?;
                let room = self.rooms.get_mut(room_id).ok_or_else(room_gone)?;
                let entry = room.peers.get_mut(me).ok_or_else(room_gone)?;
                let merged = merge_metadata(&entry.metadata, metadata);
                validate_metadata(&merged, max)?;
                entry.metadata = merged.clone();
                if let Some(instance) = self.cluster {
                    let up = PeerUp {
                        room_id: room_id.to_owned(),
                        peer_id: me.to_owned(),
                        at: PeerAt { instance, conn: conn.0 },
                        role: entry.role.clone(),
                        metadata: Value::Object(merged.clone()).to_string(),
                        connected_at: entry.connected_at.0,
                        user_id: entry.principal.user_id.clone(),
                        credential_id: entry.principal.credential_id.clone(),
                        worker_name: entry.worker_name.clone(),
                        is_admin: room.admin.as_deref() == Some(me),
                        room_expires_at: room.expires_at.map(|t| t.0),
                    };
                    self.out.push_back(Output::Publish(Publish::Update(Box::new(up))));
                }
                let others: Vec<ConnId> =
                    room.peers.iter().filter(|(id, _)| id.as_str() != me).filter_map(|(_, p)| p.local()).collect();
                let msg = ServerMessage::MetadataUpdated { peer_id: me.to_owned(), metadata: merged };
                if !others.is_empty() {
                    self.out.push_back(Output::Send { to: others, msg: Arc::new(ServerEnvelope::new(msg.clone())) });
                }
                self.reply(conn, msg, request_id);
                Ok(())
            }
            ClientMessage::PeerMessage(PeerMessage { from_peer_id, to_peer_id, payload }) => {
                check_sender(from_peer_id.as_deref(), me)?;
                let target = self.target(room_id, &to_peer_id)?;
                let to = to_peer_id.clone();
                let msg = ServerMessage::PeerMessage { from_peer_id: me.to_owned(), to_peer_id, payload };
                self.route(conn, (room_id, &to, target), msg, request_id);
                Ok(())
            }
            ClientMessage::Relay(Relay { kind, sender, target, mut body }) => {
                check_sender(sender.as_deref(), me)?;
                let target_at = self.target(room_id, &target)?;
                body.insert("sender".into(), Value::String(me.to_owned()));
                body.insert("target".into(), Value::String(target.clone()));
                let msg = match kind {
                    RelayKind::Offer => ServerMessage::Offer(body),
                    RelayKind::Answer => ServerMessage::Answer(body),
                    RelayKind::Candidate => ServerMessage::Candidate(body),
                };
                self.route(conn, (room_id, &target, target_at), msg, request_id);
                Ok(())
            }
            ClientMessage::RequestTicket(RequestTicket { target, fingerprint }) => {
                if target == me {
                    return Err(SignalError::new(ErrorCode::InvalidMessage, "a ticket names another peer"));
                }
                self.target(room_id, &target)?;
                let room = self.room(room_id)?;
                let user_id = room.peers.get(me).map(|p| p.principal.user_id.clone()).ok_or_else(room_gone)?;
                let ticket = TicketFacts {
                    user_id,
                    room_id: room_id.to_owned(),
                    client: me.to_owned(),
                    worker: target,
                    fingerprint,
                };
                self.out.push_back(Output::IssueTicket { conn, request_id, ticket });
                Ok(())
            }
            ClientMessage::Mesh(MeshRelay { kind, from_peer_id, target_peer_id, body }) => {
                check_sender(from_peer_id.as_deref(), me)?;
                let target = (room_id, target_peer_id.as_str(), self.target(room_id, &target_peer_id)?);
                let from_peer_id = me.to_owned();
                let msg = match kind {
                    MeshKind::Connect => ServerMessage::MeshOffer { from_peer_id, offer: body },
                    MeshKind::Answer => ServerMessage::MeshAnswer { from_peer_id, answer: body },
                    MeshKind::IceCandidate => ServerMessage::IceCandidate { from_peer_id, candidate: body },
                };
                self.route(conn, target, msg, request_id);
                Ok(())
            }
        }
    }

    fn room(&self, room_id: &str) -> Result<&Room, SignalError> {
        self.rooms.get(room_id).ok_or_else(room_gone)
    }

    fn target(&self, room_id: &str, peer_id: &str) -> Result<At, SignalError> {
        self.room(room_id)?
            .peers
            .get(peer_id)
            .map(|p| p.at)
            .ok_or_else(|| SignalError::new(ErrorCode::PeerNotFound, format!("Peer {peer_id} not found in room")))
    }

    /// Sends `msg` to a peer of the room: directly when it is connected here, through its
    /// instance's inbox otherwise (in the order this sender sent, like local deliveries).
    fn route(
        &mut self,
        from: ConnId,
        (room_id, peer_id, at): (&str, &str, At),
        msg: ServerMessage,
        request_id: Option<RequestId>,
    ) {
        let env = ServerEnvelope::new(msg);
        match at {
            At::Local(to) => self.out.push_back(Output::Send { to: vec![to], msg: Arc::new(env) }),
            At::Remote(at) => self.out.push_back(Output::Publish(Publish::Forward {
                instance: at.instance,
                msg: ClusterMsg::Deliver {
                    room_id: room_id.to_owned(),
                    peer_id: peer_id.to_owned(),
                    conn: at.conn,
                    envelope: env.to_json(),
                },
            })),
        }
        if request_id.is_some() {
            self.reply(from, ServerMessage::Ack {}, request_id);
        }
    }

    fn reply(&mut self, conn: ConnId, msg: ServerMessage, request_id: Option<RequestId>) {
        self.out.push_back(Output::Send { to: vec![conn], msg: Arc::new(ServerEnvelope::reply(msg, request_id)) });
    }

    /// Closes a connection from the server side: forgets it at once and asks the caller to close.
    pub fn close(&mut self, conn: ConnId, code: u16, reason: &str, now: Millis) {
        if let Some(s) = self.sessions.remove(&conn) {
            self.out.push_back(Output::Close { conn, code, reason: reason.to_owned() });
            self.forget(conn, s, now, reason);
        }
    }

    fn forget(&mut self, conn: ConnId, session: Session, _now: Millis, reason: &str) {
        match session.state {
            State::Fresh { deadline } | State::Pending { deadline, .. } | State::Claiming { deadline, .. } => {
                // A claim still at the broker is released when its PeerUp arrives.
                self.deadlines.remove(&(deadline, conn));
            }
            State::Registered { room_id, peer_id } => {
                let Some(room) = self.rooms.get_mut(&room_id) else { return };
                // Only remove the entry if it is still ours (it may have been superseded).
                if room.peers.get(&peer_id).is_none_or(|p| p.at != At::Local(conn)) {
                    return;
                }
                room.peers.remove(&peer_id);
                if let Some(instance) = self.cluster {
                    self.out.push_back(Output::Publish(Publish::Release {
                        room_id: room_id.clone(),
                        peer_id: peer_id.clone(),
                        at: PeerAt { instance, conn: conn.0 },
                        reason: reason.to_owned(),
                    }));
                }
                if room.admin.as_deref() == Some(peer_id.as_str()) {
                    room.admin = None;
                }
                if room.peers.is_empty() {
                    if let Some(t) = room.expires_at {
                        self.expiries.remove(&(t, room_id.clone()));
                    }
                    self.rooms.remove(&room_id);
                } else {
                    let others: Vec<ConnId> = room.peers.values().filter_map(PeerEntry::local).collect();
                    if !others.is_empty() {
                        let msg = ServerMessage::PeerLeft { peer_id, reason: reason.to_owned() };
                        self.out.push_back(Output::Send { to: others, msg: Arc::new(ServerEnvelope::new(msg)) });
                    }
                }
            }
        }
    }

    /// Closes a room (expired or deleted): every peer gets `room_closed` and is disconnected, and
    /// registrations that were being checked while it closed are refused.
    /// In cluster mode every instance is told (their peers of the room are closed there).
    pub fn close_room(&mut self, room_id: &str, reason: &str, now: Millis) {
        self.tombstones.insert(room_id.to_owned(), now);
        self.shut_room(room_id, reason, now);
        self.broadcast(|| ClusterMsg::CloseRoom { room_id: room_id.to_owned(), reason: reason.to_owned() });
    }

    fn broadcast(&mut self, msg: impl FnOnce() -> ClusterMsg) {
        if self.cluster.is_some() {
            self.out.push_back(Output::Publish(Publish::Broadcast(msg())));
        }
    }

    /// Evicts a room's peers without remembering the room as deleted (expiry: the room may be
    /// extended and rejoined later; the expiry check at admission refuses it until then).
    fn shut_room(&mut self, room_id: &str, reason: &str, now: Millis) {
        let Some(room) = self.rooms.remove(room_id) else { return };
        if let Some(t) = room.expires_at {
            self.expiries.remove(&(t, room_id.to_owned()));
        }
        let conns: Vec<ConnId> = room.peers.values().filter_map(PeerEntry::local).collect();
        if let Some(instance) = self.cluster {
            for (peer_id, p) in &room.peers {
                if let At::Local(c) = p.at {
                    self.out.push_back(Output::Publish(Publish::Release {
                        room_id: room_id.to_owned(),
                        peer_id: peer_id.clone(),
                        at: PeerAt { instance, conn: c.0 },
                        reason: reason.to_owned(),
                    }));
                }
            }
        }
        if !conns.is_empty() {
            let msg = ServerMessage::RoomClosed {
                room_id: room_id.to_owned(),
                reason: reason.to_owned(),
                timestamp: now.secs_f64(),
            };
            self.out.push_back(Output::Send { to: conns.clone(), msg: Arc::new(ServerEnvelope::new(msg)) });
        }
        for c in conns {
            if self.sessions.remove(&c).is_some() {
                self.out.push_back(Output::Close { conn: c, code: close_code::ROOM_CLOSED, reason: reason.to_owned() });
            }
        }
    }

    /// Updates a live room's expiry (after PATCH); `None` means it no longer expires.
    pub fn set_room_expiry(&mut self, room_id: &str, expires_at: Option<Millis>) {
        self.set_expiry_here(room_id, expires_at);
        self.broadcast(|| ClusterMsg::RoomExpiry { room_id: room_id.to_owned(), expires_at: expires_at.map(|t| t.0) });
    }

    fn set_expiry_here(&mut self, room_id: &str, expires_at: Option<Millis>) {
        let Some(room) = self.rooms.get_mut(room_id) else { return };
        if let Some(t) = room.expires_at {
            self.expiries.remove(&(t, room_id.to_owned()));
        }
        room.expires_at = expires_at;
        if let Some(t) = expires_at {
            self.expiries.insert((t, room_id.to_owned()));
        }
    }

    /// Disconnects every peer registered with this credential (it was revoked or deleted),
    /// cluster-wide; returns how many there were.
    pub fn revoke_credential(&mut self, credential_id: &str, now: Millis) -> usize {
        let n = self.evict(|_, p| p.principal.credential_id == credential_id, "credential revoked", now);
        self.broadcast(|| ClusterMsg::Revoke { credential_id: credential_id.to_owned() });
        n
    }

    /// Disconnects a user's peers in one room (their membership was removed), cluster-wide.
    pub fn remove_member(&mut self, room_id: &str, user_id: &str, now: Millis) -> usize {
        let n = self.evict(|r, p| r == room_id && p.principal.user_id == user_id, "membership removed", now);
        self.broadcast(|| ClusterMsg::RemoveMember { room_id: room_id.to_owned(), user_id: user_id.to_owned() });
        n
    }

    /// Closes the local peers `pred` selects; counts the remote ones too (their instances close
    /// them when told).
    fn evict(&mut self, pred: impl Fn(&str, &PeerEntry) -> bool, reason: &str, now: Millis) -> usize {
        let mut count = 0;
        let mut victims = Vec::new();
        for (rid, r) in &self.rooms {
            for p in r.peers.values().filter(|p| pred(rid, p)) {
                count += 1;
                victims.extend(p.local());
            }
        }
        for c in victims {
            self.close(c, close_code::REVOKED, reason, now);
        }
        count
    }

    /// Closes every connection (server shutdown).
    pub fn close_all(&mut self, reason: &str, now: Millis) {
        let conns: Vec<ConnId> = self.sessions.keys().copied().collect();
        for c in conns {
            self.close(c, close_code::GOING_AWAY, reason, now);
        }
    }

    /// Expires rooms and unregistered connections whose time has come.
    pub fn handle_timeout(&mut self, now: Millis) {
        while let Some(&(t, conn)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            self.close(conn, close_code::REGISTER_TIMEOUT, "registration timeout", now);
        }
        while let Some((t, _)) = self.expiries.first() {
            if *t > now {
                break;
            }
            let Some((_, room)) = self.expiries.pop_first() else { break };
            self.shut_room(&room, "Room expired", now);
        }
        self.tombstones.retain(|_, t| now.0.saturating_sub(t.0) < TOMBSTONE_MS);
    }

    /// Verifies the internal invariants; used by property tests and fuzzers.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = 0usize;
        for (rid, room) in &self.rooms {
            if room.peers.is_empty() {
                return Err(format!("empty room {rid} kept"));
            }
            for (pid, p) in &room.peers {
                let conn = match p.at {
                    At::Local(c) => c,
                    At::Remote(at) if self.cluster.is_some_and(|me| me != at.instance) => continue,
                    At::Remote(at) => {
                        return Err(format!("room {rid} peer {pid}: remote entry {at:?} on this instance"));
                    }
                };
                seen += 1;
                match self.sessions.get(&conn).map(|s| &s.state) {
                    Some(State::Registered { room_id, peer_id }) if room_id == rid && peer_id == pid => {}
                    other => return Err(format!("room {rid} peer {pid} -> {conn:?} has session {other:?}")),
                }
                if p.metadata.keys().any(|k| k.starts_with('_')) {
                    return Err(format!("reserved metadata stored for {pid}"));
                }
            }
            if let Some(a) = &room.admin {
                if !room.peers.contains_key(a) {
                    return Err(format!("admin {a} of {rid} is gone"));
                }
            }
            if room.expires_at.is_some_and(|t| !self.expiries.contains(&(t, rid.clone()))) {
                return Err(format!("room {rid} expiry not scheduled"));
            }
        }
        let registered = self.sessions.values().filter(|s| matches!(s.state, State::Registered { .. })).count();
        if registered != seen {
            return Err(format!("{registered} registered sessions but {seen} room entries"));
        }
        for (t, c) in &self.deadlines {
            match self.sessions.get(c).map(|s| &s.state) {
                Some(
                    State::Fresh { deadline } | State::Pending { deadline, .. } | State::Claiming { deadline, .. },
                ) if deadline == t => {}
                other => return Err(format!("stale deadline for {c:?}: {other:?}")),
            }
        }
        Ok(())
    }
}

fn room_gone() -> SignalError {
    SignalError::new(ErrorCode::NotInRoom, "Peer not registered in any room")
}

fn check_sender(claimed: Option<&str>, me: &str) -> Result<(), SignalError> {
    match claimed {
        Some(c) if !c.is_empty() && c != me => Err(SignalError::new(
            ErrorCode::SenderMismatch,
            format!("this connection is registered as '{me}' and cannot send as '{c}'"),
        )),
        _ => Ok(()),
    }
}

/// Peer ids: 1..=max bytes of ASCII letters, digits and `-_.:@`.
pub fn validate_peer_id(id: &str, max: usize) -> Result<(), SignalError> {
    let ok = !id.is_empty()
        && id.len() <= max
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(SignalError::new(
            ErrorCode::InvalidPeerId,
            format!("peer_id must be 1 to {max} characters of letters, digits and - _ . : @"),
        ))
    }
}

fn validate_metadata(m: &Object, max_bytes: usize) -> Result<(), SignalError> {
    let reserved = |o: &Object| o.keys().find(|k| k.starts_with('_')).cloned();
    if let Some(k) = reserved(m) {
        return Err(SignalError::new(
            ErrorCode::ReservedMetadataKey,
            format!("metadata key '{k}' is reserved for the server (keys starting with '_')"),
        ));
    }
    match m.get("tags") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
        Some(_) => return Err(SignalError::new(ErrorCode::InvalidMessage, "metadata.tags must be a list of strings")),
    }
    match m.get("properties") {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) => {
            if let Some(k) = reserved(p) {
                return Err(SignalError::new(
                    ErrorCode::ReservedMetadataKey,
                    format!("metadata property '{k}' is reserved for the server (keys starting with '_')"),
                ));
            }
        }
        Some(_) => return Err(SignalError::new(ErrorCode::InvalidMessage, "metadata.properties must be an object")),
    }
    let size = serde_json::to_string(m).map(|s| s.len()).unwrap_or(usize::MAX);
    if size > max_bytes {
        return Err(SignalError::new(
            ErrorCode::MetadataTooLarge,
            format!("metadata of {size} bytes exceeds the limit of {max_bytes} bytes"),
        ));
    }
    Ok(())
}

/// Upstream semantics, minus its data loss (B19): `tags` are unioned, `properties` shallow-merged
/// (a `null` property deletes it), other keys replaced (a `null` deletes); omitted keys are kept.
pub fn merge_metadata(old: &Object, update: Object) -> Object {
    let mut out = old.clone();
    for (k, v) in update {
        match (k.as_str(), v) {
            ("tags", Value::Array(new)) => {
                let mut tags = match out.remove("tags") {
                    Some(Value::Array(a)) => a,
                    _ => Vec::new(),
                };
                for t in new {
                    if !tags.contains(&t) {
                        tags.push(t);
                    }
                }
                out.insert(k, Value::Array(tags));
            }
            ("properties", Value::Object(new)) => {
                let mut props = match out.remove("properties") {
                    Some(Value::Object(p)) => p,
                    _ => Object::new(),
                };
                for (pk, pv) in new {
                    if pv.is_null() {
                        props.remove(&pk);
                    } else {
                        props.insert(pk, pv);
                    }
                }
                out.insert(k, Value::Object(props));
            }
            (_, Value::Null) => {
                out.remove(&k);
            }
            (_, v) => {
                out.insert(k, v);
            }
        }
    }
    out
}

const OPERATORS: [&str; 3] = ["$eq", "$gte", "$lte"];

fn is_operator_object(v: &Value) -> Option<&Object> {
    match v {
        Value::Object(o) if !o.is_empty() && o.keys().any(|k| k.starts_with('$')) => Some(o),
        _ => None,
    }
}

fn validate_filters(f: &Filters) -> Result<(), SignalError> {
    for (k, cond) in f.properties.iter().flatten() {
        if let Some(ops) = is_operator_object(cond) {
            if let Some(bad) = ops.keys().find(|op| !OPERATORS.contains(&op.as_str())) {
                return Err(SignalError::new(
                    ErrorCode::InvalidMessage,
                    format!("filter on '{k}': unsupported operator '{bad}' (use $eq, $gte, $lte)"),
                ));
            }
        }
    }
    Ok(())
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Discovery filter: role equal; tags any-of; properties equal or `$eq`/`$gte`/`$lte`. A missing
/// or incomparable value (number vs string) simply does not match: it never errors (B17).
fn matches(f: &Filters, p: &PeerEntry) -> bool {
    if f.role.as_ref().is_some_and(|r| *r != p.role) {
        return false;
    }
    if let Some(want) = f.tags.as_ref().filter(|t| !t.is_empty()) {
        let have = p.metadata.get("tags").and_then(Value::as_array);
        let any = have.is_some_and(|h| h.iter().any(|t| t.as_str().is_some_and(|t| want.iter().any(|w| w == t))));
        if !any {
            return false;
        }
    }
    let props = p.metadata.get("properties").and_then(Value::as_object);
    for (k, cond) in f.properties.iter().flatten() {
        let Some(v) = props.and_then(|p| p.get(k)) else { return false };
        let ok = match is_operator_object(cond) {
            Some(ops) => ops.iter().all(|(op, x)| match op.as_str() {
                "$eq" => v == x,
                "$gte" => compare(v, x).is_some_and(|o| o.is_ge()),
                "$lte" => compare(v, x).is_some_and(|o| o.is_le()),
                _ => false,
            }),
            None => v == cond,
        };
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests;
