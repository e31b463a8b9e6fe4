//! Client → server: what a peer sends, and [`decode`], which turns any text into a message or
//! the error to answer with.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{DecodeError, ErrorCode, MAX_REQUEST_ID_LEN, Object, RequestId, SignalError};

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
    /// The roles whose presence this peer wants (`peer_joined`, `peer_left`, `metadata_updated`
    /// of other peers, and the `peer_list`/`peer_metadata` of `registered_auth`): `["worker"]`,
    /// `["*"]` for every role, `[]` for none. Absent (every upstream peer): by the peer's role,
    /// see [`crate::room::Interest::for_register`]. An addition over upstream, which ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Vec<String>>,
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
