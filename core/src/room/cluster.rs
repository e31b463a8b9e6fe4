//! Cluster mode: the replicas of peers connected to other instances, kept from the broker's
//! messages in the broker's order, and what this instance does when told to.

use std::sync::Arc;

use serde_json::Value;

use super::metadata::{validate_metadata, validate_peer_id};
use super::presence::Interest;
use super::registration::Principal;
use super::rooms::{At, PeerEntry};
use super::{CloseCode, ConnId, Hub, Millis, Output, Publish, Session, State};
use crate::cluster::{ClusterMsg, PeerUp};
use crate::signal::{ErrorCode, Object, ServerEnvelope, ServerMessage, SignalError};

impl Hub {
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
                let current = self.rooms.get(&room_id).and_then(|r| r.peers().get(&peer_id)).map(|p| p.at);
                if current != Some(At::Local(conn)) {
                    return;
                }
                if let Ok(env) = ServerEnvelope::from_json(&envelope) {
                    self.out.push_back(Output::Send { to: vec![conn], msg: Arc::new(env) });
                }
            }
            ClusterMsg::InstanceDown { instance } => {
                for r in self.rooms.ids() {
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
            ClusterMsg::RoomExpiry { room_id, expires_at } => self.rooms.set_expiry(&room_id, expires_at.map(Millis)),
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
        let existing = self.rooms.get(&up.room_id).and_then(|r| r.peers().get(&up.peer_id)).map(|p| p.at);
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
                self.close(old, CloseCode::Superseded, "peer id registered again on a newer connection", now)
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
            // A local peer's comes from its claim (`insert_local`); a replica's is never read.
            interest: Interest::Nobody,
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
        let room = self.rooms.join(&up.room_id, &up.peer_id, entry, expires_at);
        if up.is_admin {
            // Another admin stays admin.
            let _ = room.claim_admin(&up.peer_id);
        }
        let others = room.presence_targets(&up.peer_id, &up.role);
        if !others.is_empty() {
            self.out.push_back(Output::Send { to: others, msg: Arc::new(ServerEnvelope::new(joined)) });
        }
    }

    fn remote_metadata(&mut self, room_id: &str, peer_id: &str, metadata: Object) {
        let Some(room) = self.rooms.get_mut(room_id) else { return };
        let Some(entry) = room.peer_mut(peer_id) else { return };
        entry.metadata = metadata.clone();
        let role = entry.role.clone();
        let others = room.presence_targets(peer_id, &role);
        if !others.is_empty() {
            let msg = ServerMessage::MetadataUpdated { peer_id: peer_id.to_owned(), metadata };
            self.out.push_back(Output::Send { to: others, msg: Arc::new(ServerEnvelope::new(msg)) });
        }
    }

    /// Drops the replicas of remote peers of a room that `pred` selects; local peers are told.
    fn remove_remote(&mut self, room_id: &str, pred: impl Fn(&str, &PeerEntry) -> bool, reason: &str) {
        let Some(room) = self.rooms.get(room_id) else { return };
        let gone: Vec<String> = room
            .peers()
            .iter()
            .filter(|(id, p)| matches!(p.at, At::Remote(_)) && pred(id, p))
            .map(|(id, _)| id.clone())
            .collect();
        for peer_id in gone {
            let others = self.rooms.remove_peer(room_id, &peer_id);
            if !others.is_empty() {
                let msg = ServerMessage::PeerLeft { peer_id, reason: reason.to_owned() };
                self.out.push_back(Output::Send { to: others, msg: Arc::new(ServerEnvelope::new(msg)) });
            }
        }
    }

    /// The link to the broker was lost: forgets every remote peer (without telling anyone: call
    /// after [`Hub::close_all`]) until a new [`Hub::set_cluster`] and snapshot.
    pub fn leave_cluster(&mut self) {
        self.rooms.retain_peers(|p| p.local().is_some());
    }
}
