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
    let e =
        dec(r#"{"type":"discover_peers","from_peer_id":"a","zzz":[1,2],"filters":{"role":"worker","x":1}}"#).unwrap();
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
    let e = dec(r#"{"type":"offer","sender":"a","target":"b","sdp":"v=0","role":"client","request_id":7}"#).unwrap();
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
