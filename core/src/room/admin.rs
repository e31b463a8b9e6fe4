//! What the server does to rooms and peers from outside the signaling protocol: closing a room
//! (deleted or expired), changing its expiry, evicting the peers of a revoked credential or a
//! removed member, shutting down, and the timers (registration deadlines, expiries).

use std::sync::Arc;

use super::rooms::{At, PeerEntry};
use super::{CloseCode, ConnId, Hub, Millis, Output, Publish, TOMBSTONE_MS};
use crate::cluster::{ClusterMsg, PeerAt};
use crate::signal::{ServerEnvelope, ServerMessage};

impl Hub {
    /// Closes a room (expired or deleted): every peer gets `room_closed` and is disconnected, and
    /// registrations that were being checked while it closed are refused.
    /// In cluster mode every instance is told (their peers of the room are closed there).
    pub fn close_room(&mut self, room_id: &str, reason: &str, now: Millis) {
        self.tombstones.insert(room_id.to_owned(), now);
        self.shut_room(room_id, reason, now);
        self.broadcast(|| ClusterMsg::CloseRoom { room_id: room_id.to_owned(), reason: reason.to_owned() });
    }

    pub(super) fn broadcast(&mut self, msg: impl FnOnce() -> ClusterMsg) {
        if self.cluster.is_some() {
            self.out.push_back(Output::Publish(Publish::Broadcast(msg())));
        }
    }

    /// Evicts a room's peers without remembering the room as deleted (expiry: the room may be
    /// extended and rejoined later; the expiry check at admission refuses it until then).
    pub(super) fn shut_room(&mut self, room_id: &str, reason: &str, now: Millis) {
        let Some(room) = self.rooms.close(room_id) else { return };
        let conns = room.local_conns(None);
        if let Some(instance) = self.cluster {
            for (peer_id, p) in room.peers() {
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
                self.out.push_back(Output::Close { conn: c, code: CloseCode::RoomClosed, reason: reason.to_owned() });
            }
        }
    }

    /// Updates a live room's expiry (after PATCH); `None` means it no longer expires.
    pub fn set_room_expiry(&mut self, room_id: &str, expires_at: Option<Millis>) {
        self.rooms.set_expiry(room_id, expires_at);
        self.broadcast(|| ClusterMsg::RoomExpiry { room_id: room_id.to_owned(), expires_at: expires_at.map(|t| t.0) });
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
    pub(super) fn evict(&mut self, pred: impl Fn(&str, &PeerEntry) -> bool, reason: &str, now: Millis) -> usize {
        let mut count = 0;
        let mut victims = Vec::new();
        for (rid, r) in self.rooms.iter() {
            for p in r.peers().values().filter(|p| pred(rid, p)) {
                count += 1;
                victims.extend(p.local());
            }
        }
        for c in victims {
            self.close(c, CloseCode::Revoked, reason, now);
        }
        count
    }

    /// Closes every connection (server shutdown).
    pub fn close_all(&mut self, reason: &str, now: Millis) {
        let conns: Vec<ConnId> = self.sessions.keys().copied().collect();
        for c in conns {
            self.close(c, CloseCode::GoingAway, reason, now);
        }
    }

    /// Expires rooms and unregistered connections whose time has come.
    pub fn handle_timeout(&mut self, now: Millis) {
        while let Some(&(t, conn)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            self.close(conn, CloseCode::RegisterTimeout, "registration timeout", now);
        }
        while let Some(room) = self.rooms.pop_expired(now) {
            self.shut_room(&room, "Room expired", now);
        }
        self.tombstones.retain(|_, t| now.0.saturating_sub(t.0) < TOMBSTONE_MS);
    }
}
