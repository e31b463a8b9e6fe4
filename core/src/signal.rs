//! Signaling wire types: the JSON messages peers exchange with the signaling server.
//!
//! Field and type names follow the upstream Python server (`upstream-signaling-server.md` §4) so that
//! existing Python and browser peers interoperate. Additions over upstream:
//! - an optional `request_id` (string or number) that the server echoes on every reply to that message;
//! - presence pushes `peer_joined`, `peer_left`, `metadata_updated` (to the other peers of the room);
//! - `ack` for routed messages that carried a `request_id` (upstream sent nothing on success);
//! - `room_closed` when a room expires or is deleted;
//! - one error shape `{"type":"error","code","message","reason"}`; `reason` repeats the message for
//!   old clients that only read it.
//!
//! Decoding never panics: anything that is not a JSON object with a known `type` and the right field
//! types becomes a [`DecodeError`] carrying the code to answer with. Unknown fields are ignored.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// JSON object, as used for metadata, payloads and verbatim relays.
pub type Object = Map<String, Value>;

/// A client-chosen correlation id. Strings and integers are accepted; it is echoed verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    Num(i64),
    Str(String),
}

/// Longest accepted `request_id` string; longer ones are refused so echoes stay cheap.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Declares [`ErrorCode`] from one list of `Variant => "WIRE_SPELLING"`, so that encoding and
/// decoding cannot disagree and a new code cannot be added to one direction only.
macro_rules! error_codes {
    ($($variant:ident => $wire:literal,)*) => {
        /// Machine-readable error codes. Upstream codes keep their upstream spelling.
        ///
        /// `Unknown` keeps a code this build does not know (a newer or an upstream server's):
        /// without it one unfamiliar code made the whole frame undecodable, and a client waited
        /// for a timeout instead of showing the refusal. It encodes back as the same string.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($variant,)*
            /// A code this build does not know, kept verbatim.
            Unknown(String),
        }

        impl ErrorCode {
            /// Every code this build knows.
            pub const KNOWN: &[ErrorCode] = &[$(ErrorCode::$variant,)*];

            pub fn as_str(&self) -> &str {
                match self {
                    $(ErrorCode::$variant => $wire,)*
                    ErrorCode::Unknown(s) => s,
                }
            }

            /// The code spelled `s` on the wire; never fails (see [`ErrorCode::Unknown`]).
            pub fn parse(s: &str) -> ErrorCode {
                match s {
                    $($wire => ErrorCode::$variant,)*
                    other => ErrorCode::Unknown(other.to_owned()),
                }
            }
        }
    };
}

error_codes! {
    InvalidJson => "INVALID_JSON",
    InvalidMessage => "INVALID_MESSAGE",
    UnknownMessageType => "UNKNOWN_MESSAGE_TYPE",
    MessageTooLarge => "MESSAGE_TOO_LARGE",
    NotRegistered => "NOT_REGISTERED",
    AlreadyRegistered => "ALREADY_REGISTERED",
    RegistrationPending => "REGISTRATION_PENDING",
    AuthFailed => "AUTH_FAILED",
    RoomNotFound => "ROOM_NOT_FOUND",
    RoomExpired => "ROOM_EXPIRED",
    RoomFull => "ROOM_FULL",
    ServerFull => "SERVER_FULL",
    PeerIdTaken => "PEER_ID_TAKEN",
    InvalidPeerId => "INVALID_PEER_ID",
    MetadataTooLarge => "METADATA_TOO_LARGE",
    ReservedMetadataKey => "RESERVED_METADATA_KEY",
    NotInRoom => "NOT_IN_ROOM",
    PeerNotFound => "PEER_NOT_FOUND",
    PeerNotInRoom => "PEER_NOT_IN_ROOM",
    SenderMismatch => "SENDER_MISMATCH",
    DeliveryFailed => "DELIVERY_FAILED",
    RateLimited => "RATE_LIMITED",
    Internal => "INTERNAL",
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(ErrorCode::parse(&String::deserialize(d)?))
    }
}

impl ErrorCode {
    /// Whether a refused worker registration will be refused again however long the worker waits, so that
    /// retrying would only hide a misconfiguration. Exhaustive on purpose: a new code must be
    /// decided here, not fall into a default.
    pub fn refusal_is_final(&self) -> bool {
        match self {
            // A bad or revoked worker token, or a room that was deleted.
            ErrorCode::AuthFailed | ErrorCode::RoomNotFound => true,
            ErrorCode::InvalidJson
            | ErrorCode::InvalidMessage
            | ErrorCode::UnknownMessageType
            | ErrorCode::MessageTooLarge
            | ErrorCode::NotRegistered
            | ErrorCode::AlreadyRegistered
            | ErrorCode::RegistrationPending
            | ErrorCode::RoomExpired
            | ErrorCode::RoomFull
            | ErrorCode::ServerFull
            | ErrorCode::PeerIdTaken
            | ErrorCode::InvalidPeerId
            | ErrorCode::MetadataTooLarge
            | ErrorCode::ReservedMetadataKey
            | ErrorCode::NotInRoom
            | ErrorCode::PeerNotFound
            | ErrorCode::PeerNotInRoom
            | ErrorCode::SenderMismatch
            | ErrorCode::DeliveryFailed
            | ErrorCode::RateLimited
            | ErrorCode::Internal => false,
            // A newer or foreign server's code: a worker is a long-running service, so it keeps
            // retrying (with backoff, logged) rather than exit on something it cannot judge.
            ErrorCode::Unknown(_) => false,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A protocol-level error: what the server answers with, and what decoding produces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct SignalError {
    pub code: ErrorCode,
    pub message: String,
}

impl SignalError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        SignalError { code, message: message.into() }
    }
}

/// Decoding failure, with the request id when the frame was a readable object that carried one,
/// so the error reply can still be correlated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub error: SignalError,
    pub request_id: Option<RequestId>,
}

// ---------------------------------------------------------------------------------------------
// Client → server
// ---------------------------------------------------------------------------------------------

/// `register`: the only message accepted on a fresh connection. Exactly which credential wins follows
/// upstream precedence: `api_key` (prefix `slp_`), then `jwt`, then `id_token` (+ `token`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Register {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Object>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_admin: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
    /// Room token (legacy `id_token` path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The credential a `register` presents, after upstream's precedence rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// Worker token `slp_...` or account key `slp_acct_...`.
    ApiKey(String),
    Jwt(String),
    /// Legacy: signed-in identity plus the room token.
    IdToken {
        id_token: String,
        room_token: String,
    },
}

impl Register {
    /// Picks the credential the way upstream does: an `api_key` without the `slp_` prefix falls
    /// through to the next kind.
    pub fn credential(&self) -> Result<Credential, SignalError> {
        if let Some(k) = self.api_key.as_deref().filter(|k| k.starts_with("slp_")) {
            return Ok(Credential::ApiKey(k.to_owned()));
        }
        if let Some(j) = self.jwt.as_deref().filter(|j| !j.is_empty()) {
            return Ok(Credential::Jwt(j.to_owned()));
        }
        if let Some(t) = self.id_token.as_deref().filter(|t| !t.is_empty()) {
            let room_token = self.token.clone().unwrap_or_default();
            if room_token.is_empty() || self.room_id.is_none() {
                return Err(SignalError::new(
                    ErrorCode::InvalidMessage,
                    "Missing required fields during registration.",
                ));
            }
            return Ok(Credential::IdToken { id_token: t.to_owned(), room_token });
        }
        Err(SignalError::new(ErrorCode::AuthFailed, "No authentication provided. Use api_key, jwt, or id_token."))
    }
}

/// A property filter: an exact value, or an object of comparison operators.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct Filters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Object>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct DiscoverPeers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_peer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Filters>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct UpdateMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
    pub metadata: Object,
}

/// `request_ticket`: ask the server for a peer ticket (see `job::auth`) naming us, `target` (a
/// worker in our room) and our DTLS fingerprint. Answered with `peer_ticket`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct RequestTicket {
    pub target: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct PeerMessage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_peer_id: Option<String>,
    pub to_peer_id: String,
    pub payload: Value,
}

/// Which WebRTC relay an `offer`/`answer`/`candidate` is; upstream forwards the whole message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayKind {
    Offer,
    Answer,
    Candidate,
}

impl RelayKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayKind::Offer => "offer",
            RelayKind::Answer => "answer",
            RelayKind::Candidate => "candidate",
        }
    }
}

/// `offer` / `answer` / `candidate`: forwarded verbatim to `target`, with `sender` set by the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Relay {
    pub kind: RelayKind,
    pub sender: Option<String>,
    pub target: String,
    /// All fields of the message except `type`, `sender`, `target` and `request_id`.
    pub body: Object,
}

/// Which mesh relay, and the name of the field carrying the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshKind {
    /// `mesh_connect {offer}` → delivered as `mesh_offer`.
    Connect,
    /// `mesh_answer {answer}` → delivered as `mesh_answer`.
    Answer,
    /// `ice_candidate {candidate}` → delivered as `ice_candidate`.
    IceCandidate,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MeshRelay {
    pub kind: MeshKind,
    pub from_peer_id: Option<String>,
    pub target_peer_id: String,
    pub body: Value,
}

/// Every message a peer may send to the server.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Register(Box<Register>),
    DiscoverPeers(DiscoverPeers),
    UpdateMetadata(UpdateMetadata),
    PeerMessage(PeerMessage),
    Relay(Relay),
    Mesh(MeshRelay),
    /// Application-level keepalive; answered with `pong`.
    Ping,
    RequestTicket(RequestTicket),
}

impl ClientMessage {
    /// The wire `type` of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientMessage::Register(_) => "register",
            ClientMessage::DiscoverPeers(_) => "discover_peers",
            ClientMessage::UpdateMetadata(_) => "update_metadata",
            ClientMessage::PeerMessage(_) => "peer_message",
            ClientMessage::Relay(r) => r.kind.as_str(),
            ClientMessage::Mesh(m) => match m.kind {
                MeshKind::Connect => "mesh_connect",
                MeshKind::Answer => "mesh_answer",
                MeshKind::IceCandidate => "ice_candidate",
            },
            ClientMessage::Ping => "ping",
            ClientMessage::RequestTicket(_) => "request_ticket",
        }
    }
}

/// A decoded client frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub request_id: Option<RequestId>,
    pub msg: ClientMessage,
}

fn invalid(msg: impl Into<String>) -> SignalError {
    SignalError::new(ErrorCode::InvalidMessage, msg)
}

fn take_request_id(obj: &mut Object) -> Result<Option<RequestId>, SignalError> {
    match obj.remove("request_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_REQUEST_ID_LEN => Ok(Some(RequestId::Str(s))),
        Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64().map(RequestId::Num)),
        Some(_) => {
            Err(invalid(format!("request_id must be a string of at most {MAX_REQUEST_ID_LEN} bytes or an integer")))
        }
    }
}

fn from_obj<T: serde::de::DeserializeOwned>(ty: &str, obj: Object) -> Result<T, SignalError> {
    serde_json::from_value(Value::Object(obj)).map_err(|e| invalid(format!("invalid {ty}: {e}")))
}

fn take_opt_string(obj: &mut Object, key: &str, ty: &str) -> Result<Option<String>, SignalError> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("{ty}: field '{key}' must be a string"))),
    }
}

fn take_string(obj: &mut Object, key: &str, ty: &str) -> Result<String, SignalError> {
    take_opt_string(obj, key, ty)?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid(format!("{ty}: missing required field '{key}'")))
}

/// Decodes one text frame. `max_len` is the largest frame accepted (bytes); larger frames are
/// refused before parsing so a flood of huge frames costs no JSON work.
pub fn decode(text: &str, max_len: usize) -> Result<Envelope, DecodeError> {
    if text.len() > max_len {
        return Err(DecodeError {
            error: SignalError::new(
                ErrorCode::MessageTooLarge,
                format!("message of {} bytes exceeds the limit of {max_len} bytes", text.len()),
            ),
            request_id: None,
        });
    }
    let value: Value = serde_json::from_str(text).map_err(|_| DecodeError {
        error: SignalError::new(ErrorCode::InvalidJson, "Invalid JSON format"),
        request_id: None,
    })?;
    let Value::Object(mut obj) = value else {
        return Err(DecodeError { error: invalid("message must be a JSON object"), request_id: None });
    };
    let request_id = take_request_id(&mut obj).map_err(|error| DecodeError { error, request_id: None })?;
    decode_object(obj)
        .map(|msg| Envelope { request_id: request_id.clone(), msg })
        .map_err(|error| DecodeError { error, request_id })
}

fn decode_object(mut obj: Object) -> Result<ClientMessage, SignalError> {
    let ty = match obj.remove("type") {
        Some(Value::String(t)) => t,
        Some(_) => return Err(invalid("field 'type' must be a string")),
        None => return Err(invalid("missing field 'type'")),
    };
    let msg = match ty.as_str() {
        "register" => ClientMessage::Register(Box::new(from_obj(&ty, obj)?)),
        "discover_peers" => ClientMessage::DiscoverPeers(from_obj(&ty, obj)?),
        "update_metadata" => ClientMessage::UpdateMetadata(from_obj(&ty, obj)?),
        "peer_message" => {
            let m: PeerMessage = from_obj(&ty, obj)?;
            // Upstream rejects empty payloads; keep that so old clients see the same behaviour.
            let empty = match &m.payload {
                Value::Null => true,
                Value::Object(o) => o.is_empty(),
                Value::String(s) => s.is_empty(),
                Value::Array(a) => a.is_empty(),
                _ => false,
            };
            if empty || m.to_peer_id.is_empty() {
                return Err(invalid("Missing required fields: to_peer_id, payload"));
            }
            ClientMessage::PeerMessage(m)
        }
        "offer" | "answer" | "candidate" => {
            let kind = match ty.as_str() {
                "offer" => RelayKind::Offer,
                "answer" => RelayKind::Answer,
                _ => RelayKind::Candidate,
            };
            let sender = take_opt_string(&mut obj, "sender", &ty)?;
            let target = take_string(&mut obj, "target", &ty)?;
            ClientMessage::Relay(Relay { kind, sender, target, body: obj })
        }
        "mesh_connect" | "mesh_answer" | "ice_candidate" => {
            let (kind, field) = match ty.as_str() {
                "mesh_connect" => (MeshKind::Connect, "offer"),
                "mesh_answer" => (MeshKind::Answer, "answer"),
                _ => (MeshKind::IceCandidate, "candidate"),
            };
            let from_peer_id = take_opt_string(&mut obj, "from_peer_id", &ty)?;
            let target_peer_id = take_string(&mut obj, "target_peer_id", &ty)?;
            let body = obj
                .remove(field)
                .filter(|v| !v.is_null())
                .ok_or_else(|| invalid(format!("{ty}: missing required field '{field}'")))?;
            ClientMessage::Mesh(MeshRelay { kind, from_peer_id, target_peer_id, body })
        }
        "ping" => ClientMessage::Ping,
        "request_ticket" => {
            let r: RequestTicket = from_obj(&ty, obj)?;
            if r.target.is_empty() || r.fingerprint.is_empty() || r.fingerprint.len() > 256 {
                return Err(invalid("request_ticket needs a target and a fingerprint of at most 256 bytes"));
            }
            ClientMessage::RequestTicket(r)
        }
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(SignalError::new(ErrorCode::UnknownMessageType, format!("Unknown message type: {shown}")));
        }
    };
    Ok(msg)
}

impl Envelope {
    /// Encodes a client message (used by Rust clients and tests). Round-trips through [`decode`].
    pub fn to_json(&self) -> String {
        let mut obj = match &self.msg {
            ClientMessage::Register(r) => to_obj(r),
            ClientMessage::DiscoverPeers(d) => to_obj(d),
            ClientMessage::UpdateMetadata(u) => to_obj(u),
            ClientMessage::PeerMessage(p) => to_obj(p),
            ClientMessage::Relay(r) => {
                let mut o = r.body.clone();
                if let Some(s) = &r.sender {
                    o.insert("sender".into(), Value::String(s.clone()));
                }
                o.insert("target".into(), Value::String(r.target.clone()));
                o
            }
            ClientMessage::Mesh(m) => {
                let mut o = Object::new();
                if let Some(s) = &m.from_peer_id {
                    o.insert("from_peer_id".into(), Value::String(s.clone()));
                }
                o.insert("target_peer_id".into(), Value::String(m.target_peer_id.clone()));
                let field = match m.kind {
                    MeshKind::Connect => "offer",
                    MeshKind::Answer => "answer",
                    MeshKind::IceCandidate => "candidate",
                };
                o.insert(field.into(), m.body.clone());
                o
            }
            ClientMessage::Ping => Object::new(),
            ClientMessage::RequestTicket(r) => to_obj(r),
        };
        obj.insert("type".into(), Value::String(self.msg.type_name().into()));
        if let Some(id) = &self.request_id {
            obj.insert("request_id".into(), serde_json::to_value(id).unwrap_or(Value::Null));
        }
        Value::Object(obj).to_string()
    }
}

fn to_obj<T: Serialize>(v: &T) -> Object {
    match serde_json::to_value(v) {
        Ok(Value::Object(o)) => o,
        _ => Object::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Server → client
// ---------------------------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The worker used to compare the refusal's code with strings, two of which no server code
    /// could ever produce; a code it does not know must not end the worker either.
    #[test]
    fn only_a_bad_token_or_a_deleted_room_stops_the_worker() {
        let final_codes: Vec<&ErrorCode> = ErrorCode::KNOWN.iter().filter(|c| c.refusal_is_final()).collect();
        assert_eq!(final_codes, [&ErrorCode::AuthFailed, &ErrorCode::RoomNotFound]);
        assert!(!ErrorCode::Unknown("TOKEN_REVOKED".into()).refusal_is_final());
    }

    fn dec(s: &str) -> Result<Envelope, DecodeError> {
        decode(s, 64 * 1024)
    }

    /// Found by `fuzz/signal_decode`: serde_json's default float parser can be one ulp off, so
    /// a worker's metadata number changed on its way through the server. `float_roundtrip` is on.
    #[test]
    fn numbers_in_relayed_metadata_round_trip_exactly() {
        let text = r#"{"type":"update_metadata","metadata":{"properties":{"x":3333333333333333333333333333333333333333333.333333}}}"#;
        let env = decode(text, usize::MAX).unwrap();
        assert_eq!(decode(&env.to_json(), usize::MAX).unwrap(), env);
    }

    #[test]
    fn malformed_json_is_invalid_json() {
        let e = dec("{nope").unwrap_err();
        assert_eq!(e.error.code, ErrorCode::InvalidJson);
        assert_eq!(e.error.message, "Invalid JSON format");
    }

    #[test]
    fn non_object_json_is_invalid_message() {
        for s in ["[]", "3", "\"x\"", "null"] {
            assert_eq!(dec(s).unwrap_err().error.code, ErrorCode::InvalidMessage, "{s}");
        }
    }

    #[test]
    fn unknown_type_keeps_request_id() {
        let e = dec(r#"{"type":"query","request_id":"r1"}"#).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::UnknownMessageType);
        assert_eq!(e.error.message, "Unknown message type: query");
        assert_eq!(e.request_id, Some(RequestId::Str("r1".into())));
    }

    #[test]
    fn wrong_field_types_are_invalid_message() {
        let e = dec(r#"{"type":"peer_message","to_peer_id":5,"payload":{"a":1}}"#).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::InvalidMessage);
        let e = dec(r#"{"type":"discover_peers","filters":{"tags":"x"}}"#).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::InvalidMessage);
        let e = dec(r#"{"type":"offer","target":["a"]}"#).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::InvalidMessage);
        let e = dec(r#"{"type":"ping","request_id":{"x":1}}"#).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::InvalidMessage);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let e = dec(r#"{"type":"discover_peers","from_peer_id":"a","zzz":[1,2],"filters":{"role":"worker","x":1}}"#)
            .unwrap();
        match e.msg {
            ClientMessage::DiscoverPeers(d) => assert_eq!(d.filters.unwrap().role.as_deref(), Some("worker")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_payload_rejected_like_upstream() {
        let e = dec(r#"{"type":"peer_message","to_peer_id":"b","payload":{}}"#).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::InvalidMessage);
    }

    #[test]
    fn too_large_is_refused_before_parsing() {
        let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(100));
        assert_eq!(decode(&big, 50).unwrap_err().error.code, ErrorCode::MessageTooLarge);
    }

    #[test]
    fn relay_keeps_body_verbatim() {
        let e =
            dec(r#"{"type":"offer","sender":"a","target":"b","sdp":"v=0","role":"client","request_id":7}"#).unwrap();
        assert_eq!(e.request_id, Some(RequestId::Num(7)));
        let ClientMessage::Relay(r) = e.msg else { panic!() };
        assert_eq!(r.kind, RelayKind::Offer);
        assert_eq!(r.sender.as_deref(), Some("a"));
        assert_eq!(r.body.get("sdp"), Some(&Value::String("v=0".into())));
        assert_eq!(r.body.get("role"), Some(&Value::String("client".into())));
        assert!(!r.body.contains_key("target") && !r.body.contains_key("request_id"));
    }

    #[test]
    fn credential_precedence_follows_upstream() {
        let r = Register { api_key: Some("nope".into()), jwt: Some("j".into()), ..Default::default() };
        assert_eq!(r.credential().unwrap(), Credential::Jwt("j".into()));
        let r = Register { api_key: Some("slp_x".into()), jwt: Some("j".into()), ..Default::default() };
        assert_eq!(r.credential().unwrap(), Credential::ApiKey("slp_x".into()));
        let r = Register { id_token: Some("i".into()), ..Default::default() };
        assert_eq!(r.credential().unwrap_err().code, ErrorCode::InvalidMessage);
        assert_eq!(Register::default().credential().unwrap_err().code, ErrorCode::AuthFailed);
    }

    #[test]
    fn client_messages_round_trip() {
        let samples = [
            r#"{"type":"register","peer_id":"w1","room_id":"r","role":"worker","jwt":"x","metadata":{"tags":["a"]}}"#,
            r#"{"type":"discover_peers","filters":{"role":"worker","properties":{"gpu":{"$gte":3}}},"request_id":"q"}"#,
            r#"{"type":"update_metadata","metadata":{"properties":{"status":"busy"}}}"#,
            r#"{"type":"peer_message","to_peer_id":"b","payload":{"k":[1,2]}}"#,
            r#"{"type":"candidate","target":"b","candidate":{"candidate":"c"}}"#,
            r#"{"type":"mesh_connect","target_peer_id":"b","offer":{"sdp":"s","type":"offer"}}"#,
            r#"{"type":"ping"}"#,
        ];
        for s in samples {
            let e = dec(s).unwrap();
            assert_eq!(dec(&e.to_json()).unwrap(), e, "{s}");
        }
    }

    #[test]
    fn error_shape_has_code_message_and_reason() {
        let env = ServerEnvelope::reply(
            SignalError::new(ErrorCode::RoomNotFound, "Room not found").into(),
            Some(RequestId::Num(3)),
        );
        let v: Value = serde_json::from_str(&env.to_json()).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "ROOM_NOT_FOUND");
        assert_eq!(v["message"], "Room not found");
        assert_eq!(v["reason"], "Room not found");
        assert_eq!(v["request_id"], 3);
        assert_eq!(ServerEnvelope::from_json(&env.to_json()).unwrap(), env);
    }

    /// A refusal with a code this build does not know must still reach the client as a refusal
    /// (it used to make the whole frame undecodable: the client waited for a timeout).
    #[test]
    fn unknown_error_code_decodes_and_round_trips() {
        let text = r#"{"type":"error","code":"TOKEN_REVOKED","message":"gone","reason":"gone","request_id":4}"#;
        let env = ServerEnvelope::from_json(text).unwrap();
        match &env.msg {
            ServerMessage::Error { code, message, .. } => {
                assert_eq!(*code, ErrorCode::Unknown("TOKEN_REVOKED".into()));
                assert_eq!(message, "gone");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(env.request_id, Some(RequestId::Num(4)));
        let v: Value = serde_json::from_str(&env.to_json()).unwrap();
        assert_eq!(v["code"], "TOKEN_REVOKED");
        assert_eq!(ServerEnvelope::from_json(&env.to_json()).unwrap(), env);
    }

    #[test]
    fn known_error_codes_keep_their_wire_spelling() {
        for code in ErrorCode::KNOWN {
            let wire = serde_json::to_value(code).unwrap();
            assert_eq!(wire, Value::String(code.as_str().to_owned()));
            assert_eq!(&serde_json::from_value::<ErrorCode>(wire).unwrap(), code);
        }
        assert_eq!(serde_json::to_value(ErrorCode::PeerIdTaken).unwrap(), "PEER_ID_TAKEN");
        assert_eq!(ErrorCode::parse("RATE_LIMITED"), ErrorCode::RateLimited);
        assert!(serde_json::from_value::<ErrorCode>(serde_json::json!(7)).is_err(), "a code is a string");
    }

    #[test]
    fn verbatim_relay_serializes_flat() {
        let mut o = Object::new();
        o.insert("sender".into(), "a".into());
        o.insert("target".into(), "b".into());
        o.insert("sdp".into(), "v=0".into());
        let v: Value = serde_json::from_str(&ServerEnvelope::new(ServerMessage::Offer(o)).to_json()).unwrap();
        assert_eq!(v["type"], "offer");
        assert_eq!(v["sdp"], "v=0");
        assert_eq!(v["sender"], "a");
    }
}
