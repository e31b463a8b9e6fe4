//! Signaling wire types: the JSON messages peers exchange with the signaling server.
//!
//! Field and type names follow the upstream Python server (`upstream-signaling-server.md` §4) so that
//! existing Python and browser peers interoperate. Additions over upstream:
//! - an optional `request_id` (string or number) that the server echoes on every reply to that message;
//! - presence pushes `peer_joined`, `peer_left`, `metadata_updated`, to the other peers of the room
//!   that want that peer's role;
//! - an optional `subscribe` on `register`: the roles whose presence the peer wants (pushes, and
//!   the `peer_list`/`peer_metadata` of `registered_auth`); `["*"]` every role, `[]` none. Without
//!   it the role decides: a `worker` wants no one, a `client` or `dashboard` wants workers, any
//!   other role everyone (what every peer got before the field existed). So a room of thousands
//!   of workers costs one small frame per registration, not one to every peer
//!   ([`crate::room::Interest`]);
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

mod client;
mod server;

pub use client::*;
pub use server::*;

#[cfg(test)]
mod tests;
