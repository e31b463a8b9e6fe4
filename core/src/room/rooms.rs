//! The live rooms and when they expire. [`Rooms`] owns both the room map and the expiry index,
//! so the rules that tie them together are written once: a room exists only while it has a peer,
//! and a room is in the expiry index exactly when it has an expiry, at that time. Each room also
//! indexes its peers by role and its local peers by the roles they want to hear of, so that a
//! join, a leave or a metadata change costs the peers who want it, not every peer of the room.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde_json::Value;

use super::presence::Interest;
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
    /// Whose presence this peer is told. Replicas of other instances' peers keep
    /// [`Interest::Nobody`]: their own instance tells them.
    pub interest: Interest,
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
    /// Every peer's id by its role, so a snapshot for `["worker"]` reads the workers only.
    by_role: HashMap<String, HashSet<String>>,
    /// Local peers that want to hear of a role: role → peer id → connection.
    watchers: HashMap<String, HashMap<String, ConnId>>,
    /// Local peers that want to hear of every role.
    watch_all: HashMap<String, ConnId>,
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

    /// The local connections that want presence of `peer_id`, a peer of `role` (never its own).
    /// Costs the number of those connections, whatever the room's size.
    pub(super) fn presence_targets(&self, peer_id: &str, role: &str) -> Vec<ConnId> {
        let by_role = self.watchers.get(role).into_iter().flatten();
        by_role.chain(&self.watch_all).filter(|(id, _)| id.as_str() != peer_id).map(|(_, c)| *c).collect()
    }

    /// What `registered_auth` lists for a peer with this interest: the ids and metadata of the
    /// peers it wants, `except` itself.
    pub(super) fn snapshot(&self, interest: &Interest, except: &str) -> (Vec<String>, Object) {
        let mut ids = Vec::new();
        let mut metadata = Object::new();
        let mut add = |id: &String, p: &PeerEntry| {
            if id != except {
                ids.push(id.clone());
                metadata.insert(id.clone(), Value::Object(p.metadata.clone()));
            }
        };
        match interest {
            Interest::Nobody => {}
            Interest::Everyone => self.peers.iter().for_each(|(id, p)| add(id, p)),
            Interest::Roles(roles) => {
                for id in roles.iter().filter_map(|r| self.by_role.get(r)).flatten() {
                    if let Some(p) = self.peers.get(id) {
                        add(id, p);
                    }
                }
            }
        }
        (ids, metadata)
    }

    fn insert(&mut self, peer_id: &str, entry: PeerEntry) {
        if let Some(old) = self.peers.remove(peer_id) {
            self.unindex(peer_id, &old);
        }
        self.by_role.entry(entry.role.clone()).or_default().insert(peer_id.to_owned());
        if let Some(conn) = entry.local() {
            match &entry.interest {
                Interest::Nobody => {}
                Interest::Everyone => {
                    self.watch_all.insert(peer_id.to_owned(), conn);
                }
                Interest::Roles(roles) => {
                    for r in roles {
                        self.watchers.entry(r.clone()).or_default().insert(peer_id.to_owned(), conn);
                    }
                }
            }
        }
        self.peers.insert(peer_id.to_owned(), entry);
    }

    fn remove(&mut self, peer_id: &str) -> Option<PeerEntry> {
        let old = self.peers.remove(peer_id)?;
        self.unindex(peer_id, &old);
        Some(old)
    }

    fn unindex(&mut self, peer_id: &str, p: &PeerEntry) {
        if let Some(ids) = self.by_role.get_mut(&p.role) {
            ids.remove(peer_id);
            if ids.is_empty() {
                self.by_role.remove(&p.role);
            }
        }
        self.watch_all.remove(peer_id);
        if let Interest::Roles(roles) = &p.interest {
            for r in roles {
                if let Some(w) = self.watchers.get_mut(r) {
                    w.remove(peer_id);
                    if w.is_empty() {
                        self.watchers.remove(r);
                    }
                }
            }
        }
    }

    /// The indexes, rebuilt from the peers, equal the ones kept.
    fn check_indexes(&self, rid: &str) -> Result<(), String> {
        let mut expected = Room::default();
        for (id, p) in &self.peers {
            expected.insert(id, p.clone());
        }
        if expected.by_role != self.by_role
            || expected.watchers != self.watchers
            || expected.watch_all != self.watch_all
        {
            return Err(format!("presence indexes of room {rid} disagree with its peers"));
        }
        Ok(())
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
        room.insert(peer_id, entry);
        room
    }

    /// Removes a peer (and its admin mark); the room goes, with its expiry, once empty. Returns
    /// the local connections still in the room that want to hear the peer left.
    pub(super) fn remove_peer(&mut self, room_id: &str, peer_id: &str) -> Vec<ConnId> {
        let Some(room) = self.map.get_mut(room_id) else { return Vec::new() };
        let removed = room.remove(peer_id);
        if room.admin.as_deref() == Some(peer_id) {
            room.admin = None;
        }
        if room.peers.is_empty() {
            self.close(room_id);
            return Vec::new();
        }
        removed.map(|p| room.presence_targets(peer_id, &p.role)).unwrap_or_default()
    }

    /// Keeps only the peers `keep` selects, in every room; rooms left empty go.
    pub(super) fn retain_peers(&mut self, keep: impl Fn(&PeerEntry) -> bool) {
        for room in self.map.values_mut() {
            let gone: Vec<String> = room.peers.iter().filter(|(_, p)| !keep(p)).map(|(id, _)| id.clone()).collect();
            for id in gone {
                room.remove(&id);
            }
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
            room.check_indexes(rid)?;
        }
        for (t, rid) in &self.expiries {
            if self.map.get(rid).and_then(|r| r.expires_at) != Some(*t) {
                return Err(format!("stale expiry {t:?} of room {rid}"));
            }
        }
        Ok(())
    }
}
