//! The live rooms and when they expire. [`Rooms`] owns both the room map and the expiry index,
//! so the rules that tie them together are written once: a room exists only while it has a peer,
//! and a room is in the expiry index exactly when it has an expiry, at that time.

use std::collections::{BTreeSet, HashMap};

use super::{ConnId, Millis};
use crate::cluster::PeerAt;
use crate::signal::{Object, PeerInfo};

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
    pub principal: super::Principal,
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

    pub(super) fn info(&self, peer_id: &str) -> PeerInfo {
        PeerInfo {
            peer_id: peer_id.to_owned(),
            role: self.role.clone(),
            metadata: self.metadata.clone(),
            connected_at: self.connected_at.secs_f64(),
        }
    }
}

/// One live room. Peers are added and removed only through [`Rooms`].
#[derive(Debug, Default)]
pub(super) struct Room {
    peers: HashMap<String, PeerEntry>,
    expires_at: Option<Millis>,
    admin: Option<String>,
}

impl Room {
    pub(super) fn peers(&self) -> &HashMap<String, PeerEntry> {
        &self.peers
    }

    /// A peer to change in place (its metadata); removal goes through [`Rooms::remove_peer`].
    pub(super) fn peer_mut(&mut self, peer_id: &str) -> Option<&mut PeerEntry> {
        self.peers.get_mut(peer_id)
    }

    pub(super) fn admin(&self) -> Option<&str> {
        self.admin.as_deref()
    }

    /// Makes `peer_id` the room's admin unless another peer is: then that one is returned.
    pub(super) fn claim_admin(&mut self, peer_id: &str) -> Option<String> {
        match &self.admin {
            Some(a) if a != peer_id => Some(a.clone()),
            _ => {
                self.admin = Some(peer_id.to_owned());
                None
            }
        }
    }

    pub(super) fn expires_at(&self) -> Option<Millis> {
        self.expires_at
    }

    /// The local connections of every peer but `except`.
    pub(super) fn local_conns(&self, except: Option<&str>) -> Vec<ConnId> {
        self.peers.iter().filter(|(id, _)| Some(id.as_str()) != except).filter_map(|(_, p)| p.local()).collect()
    }
}

#[derive(Debug, Default)]
pub(super) struct Rooms {
    map: HashMap<String, Room>,
    expiries: BTreeSet<(Millis, String)>,
}

impl Rooms {
    pub(super) fn get(&self, room_id: &str) -> Option<&Room> {
        self.map.get(room_id)
    }

    pub(super) fn get_mut(&mut self, room_id: &str) -> Option<&mut Room> {
        self.map.get_mut(room_id)
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &Room)> {
        self.map.iter()
    }

    pub(super) fn ids(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }

    /// Puts a peer into its room (creating the room) with the room's expiry as the credential
    /// check saw it.
    pub(super) fn join(
        &mut self,
        room_id: &str,
        peer_id: &str,
        entry: PeerEntry,
        expires_at: Option<Millis>,
    ) -> &mut Room {
        let room = self.map.entry(room_id.to_owned()).or_default();
        if room.expires_at != expires_at {
            Self::reschedule(&mut self.expiries, room_id, room, expires_at);
        }
        room.peers.insert(peer_id.to_owned(), entry);
        room
    }

    /// Removes a peer (and its admin mark); the room goes, with its expiry, once empty. Returns
    /// the local connections of the peers still in the room.
    pub(super) fn remove_peer(&mut self, room_id: &str, peer_id: &str) -> Vec<ConnId> {
        let Some(room) = self.map.get_mut(room_id) else { return Vec::new() };
        room.peers.remove(peer_id);
        if room.admin.as_deref() == Some(peer_id) {
            room.admin = None;
        }
        if room.peers.is_empty() {
            self.close(room_id);
            return Vec::new();
        }
        room.local_conns(None)
    }

    /// Keeps only the peers `keep` selects, in every room; rooms left empty go.
    pub(super) fn retain_peers(&mut self, keep: impl Fn(&PeerEntry) -> bool) {
        for room in self.map.values_mut() {
            room.peers.retain(|_, p| keep(p));
            if room.admin.as_ref().is_some_and(|a| !room.peers.contains_key(a)) {
                room.admin = None;
            }
        }
        let empty: Vec<String> = self.map.iter().filter(|(_, r)| r.peers.is_empty()).map(|(k, _)| k.clone()).collect();
        for id in empty {
            self.close(&id);
        }
    }

    /// Removes a room with all its peers, and its expiry.
    pub(super) fn close(&mut self, room_id: &str) -> Option<Room> {
        let room = self.map.remove(room_id)?;
        if let Some(t) = room.expires_at {
            self.expiries.remove(&(t, room_id.to_owned()));
        }
        Some(room)
    }

    /// Changes a live room's expiry (`None`: it no longer expires). A room not live here is left
    /// alone: the next peer to join brings the expiry its credential check saw.
    pub(super) fn set_expiry(&mut self, room_id: &str, expires_at: Option<Millis>) {
        if let Some(room) = self.map.get_mut(room_id) {
            Self::reschedule(&mut self.expiries, room_id, room, expires_at);
        }
    }

    fn reschedule(expiries: &mut BTreeSet<(Millis, String)>, room_id: &str, room: &mut Room, at: Option<Millis>) {
        if let Some(t) = room.expires_at {
            expiries.remove(&(t, room_id.to_owned()));
        }
        room.expires_at = at;
        if let Some(t) = at {
            expiries.insert((t, room_id.to_owned()));
        }
    }

    pub(super) fn next_expiry(&self) -> Option<Millis> {
        self.expiries.first().map(|(t, _)| *t)
    }

    /// The next room whose expiry is due at `now`, taken off the index (the caller closes it).
    pub(super) fn pop_expired(&mut self, now: Millis) -> Option<String> {
        if self.expiries.first().is_some_and(|(t, _)| *t <= now) {
            return self.expiries.pop_first().map(|(_, id)| id);
        }
        None
    }

    /// The invariants this type exists for.
    pub(super) fn check(&self) -> Result<(), String> {
        for (rid, room) in &self.map {
            if room.peers.is_empty() {
                return Err(format!("empty room {rid} kept"));
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
        for (t, rid) in &self.expiries {
            if self.map.get(rid).and_then(|r| r.expires_at) != Some(*t) {
                return Err(format!("stale expiry {t:?} of room {rid}"));
            }
        }
        Ok(())
    }
}
