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
//!
//! - presence (`peer_joined`, `peer_left`, `metadata_updated` of another peer, and the peers
//!   `registered_auth` lists) goes only to the peers whose [`Interest`] wants that peer's role.
//!
//! The hub by concern: `registration` (a connection becomes a peer), `messages` (what a
//! registered peer asks of its room), `cluster` (replicas of other instances' peers), `admin`
//! (what the server does from outside the protocol, and the timers), `metadata` (peer ids,
//! metadata and filters), `presence` (who hears of whom), `limits` (limits and token buckets)
//! and `rooms` (the room map, the expiry index and the presence indexes, with one owner), and
//! `turn` (TURN relay credentials).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use crate::cluster::{ClusterMsg, PeerAt, PeerUp};
use crate::signal::{
    ClientMessage, DecodeError, Envelope, ErrorCode, IceServer, RequestId, ServerEnvelope, ServerMessage, SignalError,
};

mod admin;
mod cluster;
mod limits;
mod messages;
mod metadata;
mod presence;
mod registration;
mod rooms;
mod turn;

use limits::TokenBucket;
pub use limits::{Limits, RateLimiter};
pub use metadata::{merge_metadata, validate_peer_id};
pub use presence::{Interest, MAX_SUBSCRIBE_ROLES};
use registration::{Claiming, PendingRegister};
pub use registration::{Grant, Principal, RegisterRequest};
use rooms::Rooms;
pub use rooms::{At, PeerEntry};
pub use turn::{TurnConfigError, TurnRest};

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

/// Why the hub closes a WebSocket (4000–4999 is the application range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// Too many failed `register` attempts on one connection.
    AuthFailed,
    /// The credential was revoked or the peer's membership removed.
    Revoked,
    /// The room expired or was deleted (`room_closed` was sent first).
    RoomClosed,
    /// No successful `register` within the registration timeout.
    RegisterTimeout,
    /// The same principal registered the same peer id on a newer connection.
    Superseded,
    /// The outbound queue filled: the peer does not read fast enough.
    SlowConsumer,
    /// The connection kept sending far beyond its rate limit.
    RateLimited,
    /// Server shutting down.
    GoingAway,
}

impl CloseCode {
    /// The code on the wire.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::AuthFailed => 4001,
            CloseCode::Revoked => 4003,
            CloseCode::RoomClosed => 4004,
            CloseCode::RegisterTimeout => 4008,
            CloseCode::Superseded => 4009,
            CloseCode::SlowConsumer => 4013,
            CloseCode::RateLimited => 4029,
            CloseCode::GoingAway => 1001,
        }
    }
}

impl From<CloseCode> for u16 {
    fn from(c: CloseCode) -> u16 {
        c.code()
    }
}

/// Something the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Deliver `msg` to every connection in `to`.
    Send { to: Vec<ConnId>, msg: Arc<ServerEnvelope> },
    /// Close the connection with this WebSocket close code. The hub has already forgotten it.
    Close { conn: ConnId, code: CloseCode, reason: String },
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
    rooms: Rooms,
    /// Rooms closed recently, so a registration whose credential check raced with the close is
    /// still refused. Entries are dropped after [`TOMBSTONE_MS`].
    tombstones: HashMap<String, Millis>,
    deadlines: BTreeSet<(Millis, ConnId)>,
    out: VecDeque<Output>,
    ice_servers: Vec<IceServer>,
    /// TURN servers, with credentials made per peer at `register`.
    turn: Option<TurnRest>,
    /// Cluster mode: this instance's id.
    cluster: Option<u64>,
}

pub(super) const TOMBSTONE_MS: u64 = 5 * 60 * 1000;

impl Hub {
    pub fn new(limits: Limits) -> Self {
        Hub { limits, ..Default::default() }
    }

    /// ICE servers handed to every peer in `registered_auth`.
    pub fn set_ice_servers(&mut self, servers: Vec<IceServer>) {
        self.ice_servers = servers;
    }

    /// TURN relays: each peer gets its own time-limited credentials in `registered_auth`.
    pub fn set_turn(&mut self, turn: Option<TurnRest>) {
        self.turn = turn;
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

    pub fn stats(&self) -> Stats {
        let mut st = Stats { connections: self.sessions.len(), ..Stats::default() };
        for (_, r) in self.rooms.iter() {
            let local = r.peers().values().filter(|p| p.local().is_some()).count();
            st.registered += local;
            st.remote_peers += r.peers().len() - local;
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
        let b = self.rooms.next_expiry();
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The live peers of a room (for the HTTP API's worker list and the dashboard).
    pub fn room_peers(&self, room_id: &str) -> impl Iterator<Item = (&str, &PeerEntry)> {
        self.rooms.get(room_id).into_iter().flat_map(|r| r.peers().iter().map(|(k, v)| (k.as_str(), v)))
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
                self.close(conn, CloseCode::RateLimited, "rate limit exceeded", now);
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

    fn reply(&mut self, conn: ConnId, msg: ServerMessage, request_id: Option<RequestId>) {
        self.out.push_back(Output::Send { to: vec![conn], msg: Arc::new(ServerEnvelope::reply(msg, request_id)) });
    }

    /// Closes a connection from the server side: forgets it at once and asks the caller to close.
    pub fn close(&mut self, conn: ConnId, code: CloseCode, reason: &str, now: Millis) {
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
                // Only remove the entry if it is still ours (it may have been superseded).
                let entry = self.rooms.get(&room_id).and_then(|r| r.peers().get(&peer_id));
                if entry.is_none_or(|p| p.at != At::Local(conn)) {
                    return;
                }
                let others = self.rooms.remove_peer(&room_id, &peer_id);
                if let Some(instance) = self.cluster {
                    self.out.push_back(Output::Publish(Publish::Release {
                        room_id: room_id.clone(),
                        peer_id: peer_id.clone(),
                        at: PeerAt { instance, conn: conn.0 },
                        reason: reason.to_owned(),
                    }));
                }
                if !others.is_empty() {
                    let msg = ServerMessage::PeerLeft { peer_id, reason: reason.to_owned() };
                    self.out.push_back(Output::Send { to: others, msg: Arc::new(ServerEnvelope::new(msg)) });
                }
            }
        }
    }

    /// Verifies the internal invariants; used by property tests and fuzzers.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.rooms.check()?;
        let mut seen = 0usize;
        for (rid, room) in self.rooms.iter() {
            for (pid, p) in room.peers() {
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

#[cfg(test)]
mod tests;
