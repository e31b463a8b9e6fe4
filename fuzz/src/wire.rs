//! Signaling wire format.

use super::*;

/// One text frame from a WebSocket client, and the same text as a client would decode a server
/// frame.
pub fn signal_decode(data: &[u8]) {
    // WebSocket text frames are UTF-8 (tungstenite rejects anything else before we see it).
    let Ok(text) = std::str::from_utf8(data) else { return };
    match signal::decode(text, 64 * 1024) {
        Ok(env) => {
            let again = signal::decode(&env.to_json(), usize::MAX).expect("a decoded message re-encodes decodably");
            assert_eq!(again, env, "client message does not round-trip");
        }
        Err(e) => {
            // The error reply must itself be a valid server frame.
            let reply = ServerEnvelope::reply(ServerMessage::from(e.error), e.request_id).to_json();
            ServerEnvelope::from_json(&reply).expect("error reply decodes");
        }
    }
    if let Ok(m) = ServerEnvelope::from_json(text) {
        let back = ServerEnvelope::from_json(&m.to_json()).expect("a decoded server frame re-encodes decodably");
        assert_eq!(json_of(&back), json_of(&m), "server message does not round-trip");
    }
}

fn json_of(m: &ServerEnvelope) -> Value {
    serde_json::from_str(&m.to_json()).unwrap_or(Value::Null)
}
