//! Server → client: what the server sends a peer, and its envelope.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ErrorCode, Object, RequestId, SignalError};

/// An ICE server as handed to peers in `registered_auth` (WebRTC `RTCIceServer` shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// A peer as listed in `peer_list` and announced in `peer_joined`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub peer_id: String,
    pub role: String,
    pub metadata: Object,
    /// Unix seconds (float, as upstream).
    pub connected_at: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    RegisteredAuth {
        room_id: String,
        /// Upstream echoes the room token of the legacy path; `null` otherwise.
        token: Option<String>,
        peer_id: String,
        admin_peer_id: Option<String>,
        peer_list: Vec<String>,
        peer_metadata: Object,
        ice_servers: Vec<IceServer>,
        mesh_ice_servers: Vec<IceServer>,
    },
    AdminConflict {
        room_id: String,
        current_admin: String,
    },
    PeerList {
        to_peer_id: String,
        peers: Vec<PeerInfo>,
        count: usize,
    },
    MetadataUpdated {
        peer_id: String,
        metadata: Object,
    },
    PeerJoined {
        #[serde(flatten)]
        peer: PeerInfo,
    },
    PeerLeft {
        peer_id: String,
        reason: String,
    },
    PeerMessage {
        from_peer_id: String,
        to_peer_id: String,
        payload: Value,
    },
    Offer(Object),
    Answer(Object),
    Candidate(Object),
    MeshOffer {
        from_peer_id: String,
        offer: Value,
    },
    MeshAnswer {
        from_peer_id: String,
        answer: Value,
    },
    IceCandidate {
        from_peer_id: String,
        candidate: Value,
    },
    /// Delivery receipt for a routed message that carried a `request_id`.
    Ack {},
    Pong {},
    /// Reply to `request_ticket`: a signed, short-lived ticket for the named worker.
    PeerTicket {
        ticket: String,
    },
    RoomClosed {
        room_id: String,
        reason: String,
        /// Unix seconds.
        timestamp: f64,
    },
    Error {
        code: ErrorCode,
        message: String,
        /// Same text as `message`: upstream's register errors carried only `reason`.
        reason: String,
    },
}

impl From<SignalError> for ServerMessage {
    fn from(e: SignalError) -> Self {
        ServerMessage::Error { code: e.code, reason: e.message.clone(), message: e.message }
    }
}

/// A server message plus the `request_id` of the client message it answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerEnvelope {
    #[serde(flatten)]
    pub msg: ServerMessage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<RequestId>,
}

impl ServerEnvelope {
    pub fn new(msg: ServerMessage) -> Self {
        ServerEnvelope { msg, request_id: None }
    }

    pub fn reply(msg: ServerMessage, request_id: Option<RequestId>) -> Self {
        ServerEnvelope { msg, request_id }
    }

    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: every map key is a string and no custom
        // serializer returns an error.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"INTERNAL","message":"encoding failed","reason":"encoding failed"}"#.to_owned()
        })
    }

    /// Parses a server frame (for Rust clients). Unknown types and malformed frames are errors.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}
