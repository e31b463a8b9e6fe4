//! What a registered peer may ask of its room: discovery, metadata updates, messages and WebRTC
//! relays to another peer (here or, in cluster mode, on another instance), and peer tickets.

use std::sync::Arc;

use serde_json::Value;

use super::metadata::{matches, merge_metadata, validate_filters, validate_metadata};
use super::rooms::{At, Room};
use super::{ConnId, Hub, Millis, Output, Publish, TicketFacts};
use crate::cluster::{ClusterMsg, PeerAt, PeerUp};
use crate::signal::{
    ClientMessage, DiscoverPeers, ErrorCode, MeshKind, MeshRelay, PeerInfo, PeerMessage, Relay, RelayKind, RequestId,
    RequestTicket, ServerEnvelope, ServerMessage, SignalError, UpdateMetadata,
};

impl Hub {
    pub(super) fn on_registered(
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
                    .peers()
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
                let (is_admin, expires_at) = (room.admin() == Some(me), room.expires_at());
                let entry = room.peer_mut(me).ok_or_else(room_gone)?;
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
                        is_admin,
                        room_expires_at: expires_at.map(|t| t.0),
                    };
                    self.out.push_back(Output::Publish(Publish::Update(Box::new(up))));
                }
                let role = entry.role.clone();
                let others = room.presence_targets(me, &role);
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
                let user_id = room.peers().get(me).map(|p| p.principal.user_id.clone()).ok_or_else(room_gone)?;
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
            .peers()
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
}

pub(super) fn room_gone() -> SignalError {
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
