//! Peer authentication: how a worker knows the client on a data channel is a member of its room
//! before it runs anything for it.
//!
//! Two modes:
//! - **Server ticket** (default). The client asks the signaling server, over its registered
//!   WebSocket, for a ticket naming the room, both peer ids and the client's DTLS fingerprint. The
//!   server signs it (EdDSA, the same key as its JWTs) only for a registered member of that room.
//!   The worker checks the signature against the server's JWKS and then every claim against *this*
//!   connection ([`check_ticket`]), so a ticket is useless on any other connection: another
//!   client's DTLS key cannot match the fingerprint, and another worker is not named.
//! - **Room secret**, for deployments that do not trust the server. The worker sends a random
//!   nonce; the client answers with a keyed BLAKE3 MAC over the nonce, both peer ids and both DTLS
//!   fingerprints ([`room_secret_mac`]), so the answer binds this connection and cannot be
//!   replayed. The server never sees the secret.

use serde::{Deserialize, Serialize};

/// `aud` of a peer ticket, distinct from the user JWT's, so neither is accepted as the other.
pub const TICKET_AUDIENCE: &str = "sleap-rtc-peer";
/// How long a ticket is valid; it is used within seconds of being issued.
pub const TICKET_TTL_SECS: i64 = 120;
/// Clock skew tolerated between server and worker.
pub const LEEWAY_SECS: i64 = 60;

/// The signed content of a peer ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketClaims {
    pub iss: String,
    pub aud: String,
    /// The client's user id.
    pub sub: String,
    pub room: String,
    /// Client peer id.
    pub client: String,
    /// Worker peer id.
    pub worker: String,
    /// The client's DTLS certificate fingerprint (`sha-256 AB:CD:...`).
    pub fp: String,
    pub iat: i64,
    pub exp: i64,
}

/// What this connection is, as the worker knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected<'a> {
    pub room: &'a str,
    pub worker: &'a str,
    pub client: &'a str,
    /// The fingerprint the client's DTLS handshake proved.
    pub client_fp: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the ticket is for another room")]
    WrongRoom,
    #[error("the ticket names another worker")]
    WrongWorker,
    #[error("the ticket was issued to another peer")]
    WrongClient,
    #[error("the ticket is bound to another DTLS certificate")]
    WrongFingerprint,
    #[error("the ticket has expired")]
    Expired,
    #[error("the ticket is not a peer ticket")]
    WrongAudience,
    #[error("the ticket's signature does not verify: {0}")]
    BadSignature(String),
    #[error("the room-secret proof does not match")]
    BadMac,
    #[error("no proof of room membership arrived in time")]
    Timeout,
    #[error("the first message must prove room membership")]
    Missing,
    /// The worker could not make a challenge nonce (its system has no randomness to give).
    #[error("the worker cannot make a challenge; try again later")]
    NoChallenge,
}

/// Fingerprints compare without regard to case or the algorithm prefix's spacing.
pub fn normalize_fingerprint(fp: &str) -> String {
    fp.split_whitespace().collect::<Vec<_>>().join(" ").to_ascii_lowercase()
}

/// Checks a ticket whose signature has already been verified against this connection.
pub fn check_ticket(c: &TicketClaims, e: &Expected<'_>, now_secs: i64) -> Result<(), AuthError> {
    if c.aud != TICKET_AUDIENCE {
        return Err(AuthError::WrongAudience);
    }
    if c.exp + LEEWAY_SECS < now_secs || c.iat - LEEWAY_SECS > now_secs {
        return Err(AuthError::Expired);
    }
    if c.room != e.room {
        return Err(AuthError::WrongRoom);
    }
    if c.worker != e.worker {
        return Err(AuthError::WrongWorker);
    }
    if c.client != e.client {
        return Err(AuthError::WrongClient);
    }
    if normalize_fingerprint(&c.fp) != normalize_fingerprint(e.client_fp) {
        return Err(AuthError::WrongFingerprint);
    }
    Ok(())
}

/// The room-secret proof: a keyed BLAKE3 hash (key derived from the secret) over the nonce and
/// this connection's identities, as lowercase hex.
pub fn room_secret_mac(
    secret: &str,
    room: &str,
    nonce: &str,
    worker: &str,
    client: &str,
    worker_fp: &str,
    client_fp: &str,
) -> String {
    let key = blake3::derive_key("sleap-rtc 2026 room secret v1", secret.as_bytes());
    let mut h = blake3::Hasher::new_keyed(&key);
    for part in [room, nonce, worker, client, &normalize_fingerprint(worker_fp), &normalize_fingerprint(client_fp)] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// Constant-time comparison of a received MAC with the expected one.
pub fn mac_matches(expected_hex: &str, got: &str) -> bool {
    match (blake3::Hash::from_hex(expected_hex), blake3::Hash::from_hex(got.trim())) {
        // `blake3::Hash`'s `==` is constant-time.
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
