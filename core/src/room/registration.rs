//! Registration: a connection becomes a peer of a room. `register` is checked here, the caller
//! verifies the credential ([`Output::Authenticate`]), and the verdict admits the peer (in
//! cluster mode through the broker's claim) or counts a failure.

use std::sync::Arc;

use serde_json::Value;

use super::metadata::{validate_metadata, validate_peer_id};
use super::presence::Interest;
use super::rooms::{At, PeerEntry};
use super::{CloseCode, ConnId, Hub, Millis, Output, State};
use crate::cluster::{PeerAt, PeerUp};
use crate::signal::{Credential, ErrorCode, Object, Register, RequestId, ServerEnvelope, ServerMessage, SignalError};

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

#[derive(Debug)]
pub(super) struct PendingRegister {
    pub(super) peer_id: Option<String>,
    role: String,
    metadata: Object,
    is_admin: bool,
    interest: Interest,
}

#[derive(Debug)]
pub(super) struct Claiming {
    pub(super) room_id: String,
    pub(super) peer_id: String,
    pub(super) request_id: Option<RequestId>,
    token_echo: Option<String>,
    /// Kept here, not in the broker's `PeerUp`: only this instance tells the peer anything.
    interest: Interest,
}

impl Hub {
    pub(super) fn on_register(
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
        let interest = Interest::for_register(reg.subscribe.as_deref(), &role, self.limits.max_role_len)?;
        let request = RegisterRequest {
            credential,
            room_id: reg.room_id.clone(),
            peer_id: reg.peer_id.clone(),
            role: role.clone(),
        };
        let pending = PendingRegister { peer_id: reg.peer_id, role, metadata, is_admin: reg.is_admin, interest };
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
                let claim = Claiming {
                    room_id: grant.room_id,
                    peer_id,
                    request_id,
                    token_echo: grant.token_echo,
                    interest: reg.interest,
                };
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
                if let Some(existing) = room.peers().get(&peer_id) {
                    if existing.principal == grant.principal {
                        superseded = existing.local();
                    } else {
                        return Err(SignalError::new(
                            ErrorCode::PeerIdTaken,
                            format!("peer id '{peer_id}' is already in use in this room"),
                        ));
                    }
                } else if room.peers().len() >= self.limits.max_peers_per_room {
                    return Err(SignalError::new(
                        ErrorCode::RoomFull,
                        format!("room has reached its limit of {} peers", self.limits.max_peers_per_room),
                    ));
                }
            }
        }
        if let Some(old) = superseded {
            self.close(old, CloseCode::Superseded, "peer id registered again on a newer connection", now);
        }
        let entry = PeerEntry {
            at: At::Local(conn),
            role: reg.role,
            metadata: reg.metadata,
            connected_at: now,
            principal: grant.principal,
            worker_name: grant.worker_name,
            interest: Interest::Nobody,
        };
        let claim = Claiming {
            room_id: grant.room_id,
            peer_id,
            request_id,
            token_echo: grant.token_echo,
            interest: reg.interest,
        };
        self.insert_local(conn, claim, entry, reg.is_admin, grant.room_expires_at);
        Ok(())
    }

    /// Completes the registration of a local connection whose admission was decided: the peers
    /// that want its role learn of it, and it gets `registered_auth` listing the peers it wants.
    pub(super) fn insert_local(
        &mut self,
        conn: ConnId,
        claim: Claiming,
        mut entry: PeerEntry,
        is_admin: bool,
        expires_at: Option<Millis>,
    ) {
        let Claiming { room_id, peer_id, request_id, token_echo, interest } = claim;
        let (others, (peer_list, peer_metadata)) = match self.rooms.get(&room_id) {
            Some(room) => (room.presence_targets(&peer_id, &entry.role), room.snapshot(&interest, &peer_id)),
            None => (Vec::new(), (Vec::new(), Object::new())),
        };
        // Built only when someone will read it: in a room of workers that is no one.
        let joined = (!others.is_empty()).then(|| ServerMessage::PeerJoined { peer: entry.info(&peer_id) });
        entry.interest = interest;
        let entry_connected_at = entry.connected_at;
        let room = self.rooms.join(&room_id, &peer_id, entry, expires_at);
        let admin_conflict = if is_admin { room.claim_admin(&peer_id) } else { None };
        let admin_peer_id = room.admin().map(str::to_owned);
        if let Some(s) = self.sessions.get_mut(&conn) {
            if let State::Fresh { deadline } | State::Claiming { deadline, .. } = s.state {
                self.deadlines.remove(&(deadline, conn));
            }
            s.state = State::Registered { room_id: room_id.clone(), peer_id: peer_id.clone() };
            s.failed_registers = 0;
        }
        let mut ice_servers = self.ice_servers.clone();
        ice_servers.extend(self.turn.as_ref().map(|t| t.ice_server(&peer_id, entry_connected_at)));
        self.reply(
            conn,
            ServerMessage::RegisteredAuth {
                room_id: room_id.clone(),
                token: token_echo,
                peer_id,
                admin_peer_id,
                peer_list,
                peer_metadata,
                ice_servers: ice_servers.clone(),
                mesh_ice_servers: ice_servers,
            },
            request_id,
        );
        if let Some(current_admin) = admin_conflict {
            self.reply(conn, ServerMessage::AdminConflict { room_id, current_admin }, None);
        }
        if let Some(joined) = joined {
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
                self.close(conn, CloseCode::AuthFailed, "too many failed registrations", now);
            }
        }
    }
}
