//! Messages between signaling server instances that share rooms through a broker (Redis).
//!
//! Every instance keeps a replica of every room's peers: its own (local) peers plus the peers of
//! the other instances (remote), learned from [`ClusterMsg::PeerUp`]/[`ClusterMsg::PeerDown`].
//! The broker is the sequencer: a peer becomes part of a room only when the broker admitted it
//! (atomically checking peer-id uniqueness and room limits) and published its `PeerUp` to every
//! instance's inbox in one step, so every instance applies joins in the same order and the
//! owning instance completes the registration when its own `PeerUp` comes back.
//!
//! These are internal messages, never seen by clients: encoded with rkyv (compact, validated on
//! decode by bytecheck) behind a two-byte header so a mixed-version deployment fails loudly
//! instead of misreading frames. Client-visible payloads inside them (metadata, a relayed
//! envelope) stay JSON text, exactly as the client will receive it.

use rkyv::rancor;

/// Where a peer's connection lives: the owning instance and its connection id there.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAt {
    pub instance: u64,
    pub conn: u64,
}

/// A peer admitted to a room (or, with the same `at`, its metadata changed).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct PeerUp {
    pub room_id: String,
    pub peer_id: String,
    pub at: PeerAt,
    pub role: String,
    /// The peer's metadata object as JSON text.
    pub metadata: String,
    /// Unix milliseconds.
    pub connected_at: u64,
    pub user_id: String,
    pub credential_id: String,
    pub worker_name: Option<String>,
    pub is_admin: bool,
    /// Unix milliseconds.
    pub room_expires_at: Option<u64>,
}

impl PeerUp {
    /// What the broker compares to decide whether a re-registration of the same peer id is the
    /// same principal (it supersedes) or someone else (refused).
    pub fn principal_key(&self) -> String {
        format!("{}\u{1f}{}", self.user_id, self.credential_id)
    }
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub enum ClusterMsg {
    PeerUp(PeerUp),
    /// The owner removed its peer (disconnect, eviction); ignored unless `at` still owns it.
    PeerDown {
        room_id: String,
        peer_id: String,
        at: PeerAt,
        reason: String,
    },
    /// A server message for a peer of the receiving instance, as the JSON the peer will read.
    /// Dropped unless `conn` still is that peer's connection.
    Deliver {
        room_id: String,
        peer_id: String,
        conn: u64,
        envelope: String,
    },
    /// The instance stopped renewing its lease (crashed or cut off): forget its peers.
    InstanceDown {
        instance: u64,
    },
    CloseRoom {
        room_id: String,
        reason: String,
    },
    /// Unix milliseconds; `None`: the room no longer expires.
    RoomExpiry {
        room_id: String,
        expires_at: Option<u64>,
    },
    Revoke {
        credential_id: String,
    },
    RemoveMember {
        room_id: String,
        user_id: String,
    },
}

const MAGIC: u8 = 0xC5;
/// Bump when [`ClusterMsg`]'s layout changes: instances of different layouts must not share a
/// broker (the decoder says so rather than guessing).
pub const FORMAT_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClusterDecodeError {
    #[error("not a sleap-rtc cluster message (bad header)")]
    BadHeader,
    #[error("cluster message format {0}, this instance speaks {FORMAT_VERSION}: run one version per broker prefix")]
    Version(u8),
    #[error("corrupt cluster message: {0}")]
    Corrupt(String),
}

impl ClusterMsg {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![MAGIC, FORMAT_VERSION];
        // Serializing owned strings and integers into a growable buffer has no failure mode; the
        // fallback keeps this total rather than panicking.
        match rkyv::to_bytes::<rancor::Error>(self) {
            Ok(b) => out.extend_from_slice(&b),
            Err(_) => out.clear(),
        }
        out
    }

    /// Decodes and validates a frame from the broker; garbage is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<ClusterMsg, ClusterDecodeError> {
        match bytes {
            [MAGIC, FORMAT_VERSION, body @ ..] => {
                // The broker hands out byte strings with no alignment guarantee; rkyv reads
                // archived values in place, so copy into an aligned buffer first.
                let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
                aligned.extend_from_slice(body);
                rkyv::from_bytes::<ClusterMsg, rancor::Error>(&aligned)
                    .map_err(|e| ClusterDecodeError::Corrupt(e.to_string()))
            }
            [MAGIC, v, ..] => Err(ClusterDecodeError::Version(*v)),
            _ => Err(ClusterDecodeError::BadHeader),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up() -> PeerUp {
        PeerUp {
            room_id: "r1".into(),
            peer_id: "w-1".into(),
            at: PeerAt { instance: 7, conn: 42 },
            role: "worker".into(),
            metadata: r#"{"tags":["a"]}"#.into(),
            connected_at: 1_700_000_000_000,
            user_id: "u".into(),
            credential_id: "wt:1".into(),
            worker_name: Some("gpu".into()),
            is_admin: false,
            room_expires_at: None,
        }
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = [
            ClusterMsg::PeerUp(up()),
            ClusterMsg::PeerDown {
                room_id: "r".into(),
                peer_id: "p".into(),
                at: PeerAt { instance: 1, conn: 2 },
                reason: "x".into(),
            },
            ClusterMsg::Deliver { room_id: "r".into(), peer_id: "p".into(), conn: 9, envelope: "{}".into() },
            ClusterMsg::InstanceDown { instance: u64::MAX },
            ClusterMsg::CloseRoom { room_id: "r".into(), reason: "gone".into() },
            ClusterMsg::RoomExpiry { room_id: "r".into(), expires_at: Some(5) },
            ClusterMsg::Revoke { credential_id: "c".into() },
            ClusterMsg::RemoveMember { room_id: "r".into(), user_id: "u".into() },
        ];
        for m in msgs {
            assert_eq!(ClusterMsg::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        assert_eq!(ClusterMsg::decode(b""), Err(ClusterDecodeError::BadHeader));
        assert_eq!(ClusterMsg::decode(b"{\"type\":1}"), Err(ClusterDecodeError::BadHeader));
        assert_eq!(ClusterMsg::decode(&[MAGIC, 99, 1, 2]), Err(ClusterDecodeError::Version(99)));
        let good = ClusterMsg::PeerUp(up()).encode();
        for cut in 0..good.len() {
            let _ = ClusterMsg::decode(&good[..cut]);
        }
        let mut flipped = good.clone();
        for i in 2..flipped.len() {
            flipped[i] ^= 0xFF;
            let _ = ClusterMsg::decode(&flipped);
            flipped[i] ^= 0xFF;
        }
        assert!(matches!(ClusterMsg::decode(&[MAGIC, FORMAT_VERSION, 0, 0, 0]), Err(ClusterDecodeError::Corrupt(_))));
    }
}
