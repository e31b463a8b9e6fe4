//! One regression test per weakness of the upstream server (`upstream-signaling-server.md` §11)
//! that applies to this design, named after it. Each drives a real server over real sockets.

mod common;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// B1: identity is bound at `register`; nothing else is accepted before it, and sender fields
/// naming another peer are refused.
#[tokio::test]
async fn b01_sender_spoofing_and_unauthenticated_use() {
    let s = start().await;
    let (jwt, _) = s.signin().await;
    let (room, _) = s.room(&jwt).await;
    let mut victim = s.connect().await;
    victim.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "victim"})).await;
    let mut other = s.connect().await;
    other.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "other"})).await;
    victim.recv_type("peer_joined").await;

    // A socket that never registered can do nothing, whatever ids it names.
    let mut anon = s.connect().await;
    for m in [
        json!({"type": "peer_message", "from_peer_id": "victim", "to_peer_id": "other", "payload": {"x": 1}}),
        json!({"type": "discover_peers", "from_peer_id": "victim"}),
        json!({"type": "update_metadata", "peer_id": "victim", "metadata": {"properties": {"status": "busy"}}}),
        json!({"type": "offer", "sender": "victim", "target": "other", "sdp": "x"}),
        json!({"type": "ice_candidate", "from_peer_id": "victim", "target_peer_id": "other", "candidate": {}}),
    ] {
        anon.send(m).await;
        let e = anon.recv().await;
        assert_eq!(e["code"], "NOT_REGISTERED", "{e}");
    }

    // A registered peer cannot speak as another.
    let mut attacker = s.connect().await;
    attacker.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "attacker"})).await;
    attacker
        .send(json!({"type": "peer_message", "from_peer_id": "victim", "to_peer_id": "other", "payload": {"x": 1}}))
        .await;
    assert_eq!(attacker.recv().await["code"], "SENDER_MISMATCH");
    attacker.send(json!({"type": "answer", "sender": "victim", "target": "other", "sdp": "x"})).await;
    assert_eq!(attacker.recv().await["code"], "SENDER_MISMATCH");
    attacker.send(json!({"type": "update_metadata", "peer_id": "victim", "metadata": {"a": 1}})).await;
    assert_eq!(attacker.recv().await["code"], "SENDER_MISMATCH");
    // Victim metadata untouched, and `other` saw only the attacker joining.
    assert_eq!(other.recv().await["peer_id"], "attacker");
    other.quiet().await;
    s.stop().await;
}

/// B2: worker tokens never reach other peers, listings or the database in clear.
#[tokio::test]
async fn b02_worker_api_keys_do_not_leak() {
    let s = start().await;
    let (jwt, _) = s.signin().await;
    let (room, _) = s.room(&jwt).await;
    let (secret, id) = s.worker_token(&jwt, &room, "w").await;
    let mut w = s.connect().await;
    w.register(json!({"type": "register", "role": "worker", "api_key": secret, "metadata": {"properties": {"a": 1}}}))
        .await;
    let mut c = s.connect().await;
    let reg = c.register(json!({"type": "register", "jwt": jwt, "room_id": room})).await;
    let c_text = reg.to_string();
    c.send(json!({"type": "discover_peers"})).await;
    let list = c.recv().await.to_string();
    let workers = s.ok("GET", &format!("/api/rooms/{room}/workers"), Some(&jwt), None).await.to_string();
    let tokens = s.ok("GET", "/api/auth/tokens", Some(&jwt), None).await;
    assert_eq!(tokens["tokens"][0]["id"], id.as_str());
    for text in [c_text, list, workers, tokens.to_string()] {
        assert!(!text.contains(&secret), "secret leaked: {text}");
        assert!(!text.contains("_token_id"), "{text}");
    }
    // The revocation URL uses the non-secret id; the database holds only hashes.
    let dir = s.stop().await;
    let db = std::fs::read(dir.path().join("sleap-rtc.sqlite")).unwrap();
    let wal = std::fs::read(dir.path().join("sleap-rtc.sqlite-wal")).unwrap_or_default();
    let needle = secret.as_bytes();
    for bytes in [db, wal] {
        assert!(!bytes.windows(needle.len()).any(|w| w == needle), "secret stored in clear");
    }
}

/// B3: registering someone else's peer id and disconnecting evicts nobody; ids are per room.
#[tokio::test]
async fn b03_disconnect_based_eviction_is_impossible() {
    let s = start().await;
    let (alice, _) = s.signin().await;
    let (mallory, _) = s.signin().await;
    let (room, _) = s.room(&alice).await;
    s.join(&alice, &mallory, &room).await;
    let mut victim = s.connect().await;
    victim.register(json!({"type": "register", "jwt": alice, "room_id": room, "peer_id": "worker-1"})).await;

    // Mallory claims the same id: refused (and with bad credentials too), then disconnects.
    let mut m = s.connect().await;
    m.send(json!({"type": "register", "jwt": mallory, "room_id": room, "peer_id": "worker-1"})).await;
    assert_eq!(m.recv().await["code"], "PEER_ID_TAKEN");
    m.send(json!({"type": "register", "jwt": "forged", "room_id": room, "peer_id": "worker-1"})).await;
    assert_eq!(m.recv().await["code"], "AUTH_FAILED");
    drop(m);

    // The victim is still routable.
    let mut c = s.connect().await;
    c.register(json!({"type": "register", "jwt": mallory, "room_id": room, "peer_id": "client"})).await;
    c.send(json!({"type": "peer_message", "to_peer_id": "worker-1", "payload": {"still": "here"}})).await;
    assert_eq!(victim.recv_type("peer_message").await["payload"]["still"], "here");

    // The same id in another room is another peer: no cross-room routing.
    let (room2, _) = s.room(&mallory).await;
    let mut twin = s.connect().await;
    twin.register(json!({"type": "register", "jwt": mallory, "room_id": room2, "peer_id": "worker-1"})).await;
    let mut c2 = s.connect().await;
    c2.register(json!({"type": "register", "jwt": mallory, "room_id": room2, "peer_id": "c2"})).await;
    c2.send(json!({"type": "peer_message", "to_peer_id": "worker-1", "payload": {"room": 2}})).await;
    assert_eq!(twin.recv_type("peer_message").await["payload"]["room"], 2);
    victim.quiet().await;
    s.stop().await;
}

/// B4: peers with server-generated ids are removed on disconnect (no ghosts).
#[tokio::test]
async fn b04_no_ghost_peers() {
    let s = start().await;
    let (jwt, _) = s.signin().await;
    let (room, _) = s.room(&jwt).await;
    let (token, _) = s.worker_token(&jwt, &room, "w").await;
    let mut c = s.connect().await;
    c.register(json!({"type": "register", "jwt": jwt, "room_id": room})).await;
    let mut w = s.connect().await;
    let id = w.register(json!({"type": "register", "role": "worker", "api_key": token})).await["peer_id"].clone();
    assert_eq!(c.recv_type("peer_joined").await["peer_id"], id);
    drop(w);
    assert_eq!(c.recv_type("peer_left").await["peer_id"], id);
    c.send(json!({"type": "discover_peers"})).await;
    assert_eq!(c.recv().await["count"], 0);
    let workers = s.ok("GET", &format!("/api/rooms/{room}/workers"), Some(&jwt), None).await;
    assert_eq!(workers["count"], 0);
    s.stop().await;
}

/// B5: no unauthenticated destructive endpoints; sign-in is rate limited.
#[tokio::test]
async fn b05_no_unauthenticated_destructive_endpoints() {
    let s = start_with(|c| c.auth_rate_per_min = 3.0).await;
    for path in ["/delete-peer", "/delete-peers-and-room"] {
        let (st, v) = s.call("POST", path, None, Some(json!({"peer_id": "x", "room_id": "y"}))).await;
        assert_eq!(st, 410, "{v}");
    }
    let (st, _) = s.call("DELETE", "/api/auth/rooms/whatever", None, None).await;
    assert_eq!(st, 401);
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(s.call("POST", "/anonymous-signin", None, None).await.0);
    }
    assert_eq!(codes, vec![200, 200, 200, 429, 429]);
    s.stop().await;
}

/// B6: room tokens are unguessable, wrong tokens fail, and repeated failures end the connection.
#[tokio::test]
async fn b06_legacy_room_token_cannot_be_brute_forced() {
    let s = start().await;
    let (jwt, _) = s.signin().await;
    let (room, token) = s.room(&jwt).await;
    assert!(token.len() >= 22, "room token has at least 128 bits");
    assert!(room.len() >= 24, "room id has at least 96 bits");
    let (outsider, _) = s.signin().await;
    let mut m = s.connect().await;
    for i in 0..5 {
        m.send(json!({"type": "register", "peer_id": "x", "room_id": room, "token": format!("{i:06x}"), "id_token": outsider})).await;
        let e = m.recv().await;
        assert_eq!(e["code"], "AUTH_FAILED");
        assert_eq!(e["reason"], "Invalid token");
    }
    assert_eq!(m.closed().await, 4001);
    // A JWT without membership cannot join either.
    let mut m = s.connect().await;
    m.send(json!({"type": "register", "jwt": outsider, "room_id": room})).await;
    assert_eq!(m.recv().await["reason"], "No access to this room");
    // The real token works (it is the room's capability).
    let mut ok = s.connect().await;
    ok.register(json!({"type": "register", "peer_id": "x", "room_id": room, "token": token, "id_token": outsider}))
        .await;
    s.stop().await;
}

/// B7 (live revocation): revoking a token, removing a member or deleting an account key
/// disconnects the peers that used it.
#[tokio::test]
async fn b07_revocation_is_enforced_live() {
    let s = start().await;
    let (owner, _) = s.signin().await;
    let (member, member_id) = s.signin().await;
    let (room, _) = s.room(&owner).await;
    s.join(&owner, &member, &room).await;
    let (token, token_id) = s.worker_token(&owner, &room, "w").await;
    let mut w = s.connect().await;
    w.register(json!({"type": "register", "role": "worker", "api_key": token})).await;
    let v = s.ok("DELETE", &format!("/api/auth/token/{token_id}"), Some(&owner), None).await;
    assert_eq!(v["disconnected"], 1);
    assert_eq!(w.closed().await, 4003);
    let mut again = s.connect().await;
    again.send(json!({"type": "register", "role": "worker", "api_key": token})).await;
    assert_eq!(again.recv().await["reason"], "Token revoked");

    let mut m = s.connect().await;
    m.register(json!({"type": "register", "jwt": member, "room_id": room})).await;
    s.ok("DELETE", &format!("/api/auth/rooms/{room}/members/{member_id}"), Some(&owner), None).await;
    assert_eq!(m.closed().await, 4003);

    let key = s.ok("POST", "/api/auth/account-keys", Some(&owner), Some(json!({"name": "lab-box"}))).await;
    let secret = key["key_id"].as_str().unwrap();
    assert!(secret.starts_with("slp_acct_"));
    let mut k = s.connect().await;
    let reg = k.register(json!({"type": "register", "role": "worker", "api_key": secret, "room_id": room})).await;
    assert!(reg["peer_id"].as_str().unwrap().starts_with("worker-"));
    // The account key also works as an HTTP bearer.
    let me = s.ok("GET", "/api/auth/me", Some(secret), None).await;
    assert!(me["user_id"].is_string());
    let listed = s.ok("GET", "/api/auth/account-keys", Some(&owner), None).await;
    assert!(!listed.to_string().contains(secret));
    s.ok("DELETE", &format!("/api/auth/account-keys/{}", key["id"].as_str().unwrap()), Some(&owner), None).await;
    assert_eq!(k.closed().await, 4003);
    s.stop().await;
}

/// B8: lifetimes and names are validated; nothing is immortal or unbounded by accident.
#[tokio::test]
async fn b08_token_and_room_parameters_are_validated() {
    let s = start().await;
    let (jwt, _) = s.signin().await;
    for days in [json!(0), json!(-1), json!(366), json!(1_000_000_000_000i64), json!("7")] {
        let (st, v) = s.call("POST", "/api/auth/rooms", Some(&jwt), Some(json!({"expires_in_days": days}))).await;
        assert_eq!(st, 422, "{days}: {v}");
        assert!(v["detail"].is_string());
    }
    let (st, _) = s.call("POST", "/api/auth/rooms", Some(&jwt), Some(json!({"name": "x".repeat(51)}))).await;
    assert_eq!(st, 422);
    // Null means "default", never "forever".
    let v = s.ok("POST", "/api/auth/rooms", Some(&jwt), Some(json!({"expires_in_days": null}))).await;
    let ttl = v["expires_at"].as_i64().unwrap() - v["created_at"].as_i64().unwrap();
    assert_eq!(ttl, 30 * 86_400);
    let room = v["room_id"].as_str().unwrap();
    for days in [json!(0), json!(-3), json!(400)] {
        let (st, _) = s
            .call(
                "POST",
                "/api/auth/token",
                Some(&jwt),
                Some(json!({"room_id": room, "worker_name": "w", "expires_in_days": days})),
            )
            .await;
        assert_eq!(st, 422, "{days}");
    }
    let (st, _) =
        s.call("POST", "/api/auth/token", Some(&jwt), Some(json!({"room_id": room, "worker_name": ""}))).await;
    assert_eq!(st, 422);
    let (st, _) = s.call("PATCH", &format!("/api/auth/rooms/{room}"), Some(&jwt), Some(json!({"name": ""}))).await;
    assert_eq!(st, 422);
    let (st, v) = s.call("POST", "/api/auth/rooms", Some(&jwt), Some(json!("not an object"))).await;
    assert_eq!(st, 422, "{v}");
    s.stop().await;
}

/// B10: invites are single-use, expire, survive a restart, and are case/dash tolerant.
#[tokio::test]
async fn b10_invites_single_use_and_persistent() {
    let s = start().await;
    let (owner, _) = s.signin().await;
    let (a, _) = s.signin().await;
    let (b, _) = s.signin().await;
    let (room, _) = s.room(&owner).await;
    let inv = s.ok("POST", &format!("/api/auth/rooms/{room}/invite"), Some(&owner), None).await;
    let code = inv["invite_code"].as_str().unwrap().to_owned();
    assert!(code.len() >= 12);
    let (st, _) = s.call("POST", &format!("/api/auth/rooms/{room}/invite"), Some(&a), None).await;
    assert_eq!(st, 404, "non-members cannot even see the room");

    // Restart the server on the same data directory: the invite is still valid.
    let dir = s.stop().await;
    let s = start_in(dir, |_| {}).await;
    let typed = format!("{}-{}", code[..6].to_lowercase(), &code[6..]);
    let v = s.ok("POST", "/api/auth/rooms/join", Some(&a), Some(json!({"invite_code": typed}))).await;
    assert_eq!(v["message"], "Joined successfully");
    let (st, v) = s.call("POST", "/api/auth/rooms/join", Some(&b), Some(json!({"invite_code": code}))).await;
    assert_eq!(st, 404, "second use refused: {v}");
    let members = s.ok("GET", &format!("/api/auth/rooms/{room}/members"), Some(&a), None).await;
    assert_eq!(members["members"].as_array().unwrap().len(), 2);
    s.stop().await;
}

/// B16: limits everywhere, with clear errors; a flood or a slow reader affects nobody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_limits_rate_and_slow_consumers() {
    // The server binary in its own process. Practically no refill during the test, so the
    // outcome does not depend on how fast this machine sends (a refill would reset the run of
    // refused frames).
    let s = ServerProcess::spawn(&[
        "--max-peers-per-room",
        "3",
        "--rate-limit",
        "0.01",
        "--rate-burst",
        "40",
        "--max-message-bytes",
        "16384",
        "--max-metadata-bytes",
        "1024",
    ])
    .await;
    let (jwt, room) = s.signin_and_room().await;
    let url = s.ws_url();
    let mut a = Ws::connect(&url).await;
    a.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "a"})).await;

    // Oversized message: error, connection stays usable.
    a.send(json!({"type": "peer_message", "to_peer_id": "a", "payload": {"x": "y".repeat(20_000)}})).await;
    assert_eq!(a.recv().await["code"], "MESSAGE_TOO_LARGE");
    a.send(json!({"type": "update_metadata", "metadata": {"blob": "z".repeat(2000)}})).await;
    assert_eq!(a.recv().await["code"], "METADATA_TOO_LARGE");
    a.send(json!({"type": "ping"})).await;
    assert_eq!(a.recv().await["type"], "pong");

    // Room capacity.
    let mut b = Ws::connect(&url).await;
    b.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "b"})).await;
    let mut slow = Ws::connect(&url).await;
    slow.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "slow"})).await;
    let mut d = Ws::connect(&url).await;
    d.send(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "d"})).await;
    assert_eq!(d.recv().await["code"], "ROOM_FULL");

    // Flood from `a`: rate limited, then closed; `b` still gets what it should.
    let mut limited = 0;
    for i in 0..300 {
        a.send(json!({"type": "peer_message", "to_peer_id": "b", "payload": {"i": i}})).await;
    }
    loop {
        match a.next_event(WAIT).await {
            Event::Json(v) if v["code"] == "RATE_LIMITED" => limited += 1,
            Event::Json(_) => {}
            Event::Closed(Some((code, _))) => {
                assert_eq!(u16::from(code), 4029);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(limited > 0);
    // `b` received the messages that were within the limit (at most the burst), and is fine.
    b.send(json!({"type": "ping"})).await;
    let mut delivered = 0;
    loop {
        let v = b.recv().await;
        match v["type"].as_str() {
            Some("peer_message") => delivered += 1,
            Some("pong") => break,
            _ => {}
        }
    }
    assert!((1..=40).contains(&delivered), "{delivered} messages of the flood delivered");
    drop(slow);
}

/// B16: a peer that never reads is closed once its bounded queue fills (4013); the sender and
/// the rest of the room are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b16_slow_consumer_is_dropped_without_slowing_others() {
    let s = ServerProcess::spawn(&["--outbound-queue", "64", "--rate-limit", "10000", "--rate-burst", "10000"]).await;
    let (jwt, room) = s.signin_and_room().await;
    let url = s.ws_url();
    let mut slow = Ws::connect(&url).await;
    slow.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "slow"})).await;
    let mut b = Ws::connect(&url).await;
    b.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "b"})).await;
    let mut sender = Ws::connect(&url).await;
    sender.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "sender"})).await;
    let big = "p".repeat(60_000);
    let mut left = None;
    // Enough to fill the kernel's socket buffers (a few MiB on loopback) plus the queue.
    'outer: for _ in 0..100 {
        for _ in 0..20 {
            sender.send(json!({"type": "peer_message", "to_peer_id": "slow", "payload": {"big": big}})).await;
        }
        while let Event::Json(v) = sender.next_event(std::time::Duration::from_millis(100)).await {
            if v["type"] == "peer_left" && v["peer_id"] == "slow" {
                left = Some(v);
                break 'outer;
            }
        }
    }
    let v = left.expect("slow consumer was dropped");
    assert!(v["reason"].as_str().unwrap().contains("slow consumer"), "{v}");
    sender.send(json!({"type": "peer_message", "to_peer_id": "b", "payload": {"after": true}})).await;
    let m = b.recv_type("peer_message").await;
    assert_eq!(m["payload"]["after"], true);
    drop(slow);
}

/// B17: garbage of every kind gets an error with a code; the connection survives.
#[tokio::test]
async fn b17_fragile_message_handling() {
    let s = start().await;
    let (jwt, _) = s.signin().await;
    let (room, _) = s.room(&jwt).await;
    let mut p = s.connect().await;
    p.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "p"})).await;
    let mut q = s.connect().await;
    q.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "q",
                      "metadata": {"properties": {"mem": "lots"}}}))
        .await;
    p.recv_type("peer_joined").await;
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "INVALID_JSON"),
        ("[1,2,3]".into(), "INVALID_MESSAGE"),
        ("\"register\"".into(), "INVALID_MESSAGE"),
        (r#"{"type": 5}"#.into(), "INVALID_MESSAGE"),
        (r#"{"type": "peer_message", "to_peer_id": ["q"], "payload": {"a": 1}}"#.into(), "INVALID_MESSAGE"),
        (r#"{"type": "peer_message", "to_peer_id": "q", "payload": {}}"#.into(), "INVALID_MESSAGE"),
        (r#"{"type": "discover_peers", "filters": "all"}"#.into(), "INVALID_MESSAGE"),
        (
            r#"{"type": "discover_peers", "filters": {"properties": {"mem": {"$where": "1"}}}}"#.into(),
            "INVALID_MESSAGE",
        ),
        (r#"{"type": "query"}"#.into(), "UNKNOWN_MESSAGE_TYPE"),
        (r#"{"type": "offer", "sdp": "x"}"#.into(), "INVALID_MESSAGE"),
        (r#"{"type": "offer", "target": "ghost", "sdp": "x"}"#.into(), "PEER_NOT_FOUND"),
        (r#"{"type": "register", "jwt": "x", "room_id": "r"}"#.into(), "ALREADY_REGISTERED"),
    ];
    for (text, code) in cases {
        p.send_text(text.clone()).await;
        let e = p.recv().await;
        assert_eq!(e["type"], "error", "{text}");
        assert_eq!(e["code"], code, "{text}: {e}");
        assert!(e["message"].is_string() && e["reason"] == e["message"]);
    }
    // Incomparable `$gte` (string vs number) just does not match (upstream dropped the connection).
    p.send(json!({"type": "discover_peers", "filters": {"properties": {"mem": {"$gte": 1}}}})).await;
    assert_eq!(p.recv().await["count"], 0);
    // Binary frames are refused with an error, too.
    use futures_util::SinkExt;
    p.inner.send(tokio_tungstenite::tungstenite::Message::binary(vec![0u8, 1, 2])).await.unwrap();
    assert_eq!(p.recv().await["code"], "INVALID_MESSAGE");
    // Request ids are echoed on errors.
    p.send(json!({"type": "nope", "request_id": "r-9"})).await;
    assert_eq!(p.recv().await["request_id"], "r-9");
    p.send(json!({"type": "ping"})).await;
    assert_eq!(p.recv().await["type"], "pong");
    s.stop().await;
}

/// B19: `update_metadata` keeps what it does not mention; reserved keys are server-only.
#[tokio::test]
async fn b19_update_metadata_keeps_fields_and_reserves_underscore_keys() {
    let s = start().await;
    let (jwt, _) = s.signin().await;
    let (room, _) = s.room(&jwt).await;
    let (token, _) = s.worker_token(&jwt, &room, "w").await;
    let mut w = s.connect().await;
    w.send(json!({"type": "register", "role": "worker", "api_key": token, "metadata": {"_worker_name": "fake"}})).await;
    assert_eq!(w.recv().await["code"], "RESERVED_METADATA_KEY");
    w.register(json!({"type": "register", "role": "worker", "api_key": token,
                      "metadata": {"tags": ["sleap-rtc"], "properties": {"status": "available", "gpu": "A100"}}}))
        .await;
    w.send(json!({"type": "update_metadata", "metadata": {"properties": {"_token_id": "x"}}})).await;
    assert_eq!(w.recv().await["code"], "RESERVED_METADATA_KEY");
    w.send(json!({"type": "update_metadata", "metadata": {"properties": {"status": "busy"}}})).await;
    let m = w.recv().await["metadata"].clone();
    assert_eq!(m, json!({"tags": ["sleap-rtc"], "properties": {"status": "busy", "gpu": "A100"}}));
    s.stop().await;
}

/// B20: deleting a room evicts its peers and refuses new ones; expiry is enforced live; PATCH
/// never creates phantom rooms.
#[tokio::test]
async fn b20_room_lifecycle_enforced() {
    let s = start().await;
    let (jwt, _) = s.signin().await;
    let (room, _) = s.room(&jwt).await;
    let mut p = s.connect().await;
    p.register(json!({"type": "register", "jwt": jwt, "room_id": room})).await;
    s.ok("DELETE", &format!("/api/auth/rooms/{room}"), Some(&jwt), None).await;
    let closed = p.recv().await;
    assert_eq!(closed["type"], "room_closed");
    assert_eq!(closed["reason"], "Room deleted");
    assert_eq!(p.closed().await, 4004);
    let mut again = s.connect().await;
    again.send(json!({"type": "register", "jwt": jwt, "room_id": room})).await;
    assert_eq!(again.recv().await["code"], "ROOM_NOT_FOUND");
    let (st, _) = s.call("PATCH", &format!("/api/auth/rooms/{room}"), Some(&jwt), Some(json!({"name": "ghost"}))).await;
    assert_eq!(st, 404);

    // Expiry while connected: an operator shortens the room's life in storage and tells the hub,
    // as PATCH does; the peer is evicted when the time comes.
    let (room2, _) = s.room(&jwt).await;
    let mut q = s.connect().await;
    q.register(json!({"type": "register", "jwt": jwt, "room_id": room2})).await;
    let state = s.server.as_ref().unwrap().state().clone();
    let soon = sleap_rtc_server::unix_now() + 1;
    state.store.update_room(&room2, None, Some(Some(soon))).await.unwrap();
    sleap_rtc_server::ws::drive(&state, |hub| {
        hub.set_room_expiry(&room2, Some(sleap_rtc_core::room::Millis(soon as u64 * 1000)))
    });
    let closed = q.recv().await;
    assert_eq!(closed["reason"], "Room expired");
    assert_eq!(q.closed().await, 4004);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let mut late = s.connect().await;
    late.send(json!({"type": "register", "jwt": jwt, "room_id": room2})).await;
    assert_eq!(late.recv().await["code"], "ROOM_EXPIRED");
    s.stop().await;
}

/// Connections that never register are closed after the registration timeout.
#[tokio::test]
async fn unregistered_connections_are_closed() {
    let s = start_with(|c| c.register_timeout_secs = 1).await;
    let mut idle = s.connect().await;
    assert_eq!(idle.closed().await, 4008);
    s.stop().await;
}

/// B9, B24: no unauthenticated CLI token hub, no resurrected OTP endpoint. `sleap-rtc login`
/// takes an account key or signs in anonymously; nothing is deposited on the server for polling.
#[tokio::test]
async fn b09_b24_no_token_hub_or_otp_endpoints() {
    let s = start().await;
    for (method, path) in [
        ("POST", "/api/auth/cli/deposit"),
        ("GET", "/api/auth/cli/poll?state=x"),
        ("POST", "/verify-otp"),
        ("POST", "/api/auth/rooms/r1/verify-otp"),
        ("GET", "/api/auth/github/callback?code=x&state=y"),
    ] {
        let (st, _) = s.call(method, path, None, Some(json!({"state": "x", "jwt": "y"}))).await;
        assert_eq!(st, 404, "{method} {path}");
    }
    s.stop().await;
}

/// B13: no CORS grant at all (the API takes bearer tokens, never cookies, so a cross-site page
/// can neither read responses nor ride on ambient credentials), whatever Origin is claimed.
#[tokio::test]
async fn b13_no_cross_origin_grant() {
    let s = start().await;
    let (jwt, _) = s.signin().await;
    for (method, path) in [("GET", "/api/auth/me"), ("OPTIONS", "/api/auth/rooms"), ("POST", "/anonymous-signin")] {
        let resp = s
            .client
            .request(method.parse().unwrap(), format!("{}{path}", s.http))
            .header("Origin", "https://evil.example")
            .header("Access-Control-Request-Method", "POST")
            .bearer_auth(&jwt)
            .send()
            .await
            .unwrap();
        for h in ["access-control-allow-origin", "access-control-allow-credentials"] {
            assert!(resp.headers().get(h).is_none(), "{method} {path} sent {h}");
        }
    }
    s.stop().await;
}

/// B13, the WebSocket half: a page from another web origin cannot open a signaling socket;
/// the server's own pages, listed origins and non-browser clients (no Origin header) can.
#[tokio::test]
async fn b13_websocket_upgrades_from_foreign_origins_are_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let s = start_with(|c| c.allowed_origins = vec!["https://lab.example.org".into()]).await;
    let host = s.ws.trim_start_matches("ws://").trim_end_matches("/ws").to_owned();
    let with_origin = |origin: &str| {
        let mut req = s.ws.as_str().into_client_request().unwrap();
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        req
    };
    for bad in ["https://evil.example", "null", &format!("https://{host}.evil.example")] {
        match tokio_tungstenite::connect_async(with_origin(bad)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403, "{bad}"),
            other => panic!("{bad}: upgrade not refused: {:?}", other.map(|_| ())),
        }
    }
    for good in [format!("http://{host}"), "https://lab.example.org".to_owned()] {
        let (mut ws, _) = tokio_tungstenite::connect_async(with_origin(&good)).await.expect(&good);
        ws.send(Message::text(r#"{"type":"ping"}"#)).await.unwrap();
    }
    let mut plain = s.connect().await;
    plain.send(json!({"type": "ping"})).await;
    let v = plain.recv().await;
    assert_eq!(v["type"], "pong", "no Origin: served as before: {v}");
    s.stop().await;
}

/// B14: storage is never awaited on the signaling path. With the database locked by another
/// process, an HTTP call that writes waits, while registered peers keep talking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b14_a_stalled_database_does_not_stall_signaling() {
    // One runtime thread: a storage call that blocked it would stop signaling outright.
    let s = ServerProcess::spawn_with(&[], "warn", &[("TOKIO_WORKER_THREADS", "1")]).await;
    let (jwt, _, mut a, mut b) = s.pair().await;

    let db = rusqlite::Connection::open(s.dir.path().join("sleap-rtc.sqlite")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let http = format!("http://{}/api/auth/rooms", s.addr);
    let jwt2 = jwt.clone();
    let write = tokio::spawn(async move {
        reqwest::Client::new()
            .post(http)
            .bearer_auth(jwt2)
            .json(&json!({"name": "later"}))
            .send()
            .await
            .unwrap()
            .status()
    });
    // Give the write time to reach the locked database (SQLite then waits up to 5 s for it).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!write.is_finished(), "the write should be waiting for the lock");
    for i in 0..5 {
        a.send(json!({"type": "peer_message", "to_peer_id": "b", "payload": {"i": i}})).await;
        assert_eq!(b.recv_type("peer_message").await["payload"]["i"], i);
        b.send(json!({"type": "ping"})).await;
        b.recv_type("pong").await;
    }
    assert!(!write.is_finished(), "the write should still be waiting for the lock");
    db.execute_batch("ROLLBACK").unwrap();
    assert_eq!(write.await.unwrap(), 200);
}

/// B12: no credential and no message payload (SDP, ICE addresses) reaches the log, even at
/// debug level. (The client's own socket address is logged at debug level on connect: that is
/// the operator's view of who connected, not something a peer sent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b12_secrets_and_addresses_stay_out_of_the_log() {
    let s = ServerProcess::spawn_logging(&[], "debug").await;
    let (jwt, room) = s.signin_and_room().await;
    let wt = s.json("POST", "/api/auth/token", Some(&jwt), Some(json!({"room_id": room, "worker_name": "w"}))).await;
    let worker_secret = wt["token_id"].as_str().unwrap().to_owned();
    let key = s.json("POST", "/api/auth/account-keys", Some(&jwt), Some(json!({}))).await;
    let account_secret = key["key_id"].as_str().unwrap().to_owned();
    let inv = s.json("POST", &format!("/api/auth/rooms/{room}/invite"), Some(&jwt), Some(json!({}))).await;
    let invite = inv["invite_code"].as_str().unwrap().to_owned();

    let url = format!("ws://{}/ws", s.addr);
    let mut w = Ws::connect(&url).await;
    w.register(json!({"type": "register", "api_key": worker_secret, "peer_id": "w", "role": "worker"})).await;
    let mut c = Ws::connect(&url).await;
    c.register(json!({"type": "register", "api_key": account_secret, "room_id": room, "peer_id": "c"})).await;
    let sdp = "v=0\r\na=fingerprint:sha-256 AB:CD:EF\r\na=candidate:1 1 udp 2130706431 192.0.2.55 50000 typ host\r\n";
    c.send(json!({"type": "offer", "target": "w", "sdp": sdp})).await;
    assert_eq!(w.recv_type("offer").await["sdp"], sdp);
    // A forged JWT on a fresh socket, so that it really goes through verification.
    let mut f = Ws::connect(&url).await;
    f.send(json!({"type": "register", "jwt": "eyJhbGciOiJFZERTQSJ9.forged.sig", "room_id": room})).await;
    assert_eq!(f.recv().await["code"], "AUTH_FAILED");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let log = std::fs::read_to_string(s.dir.path().join("server.log")).unwrap();
    assert!(log.contains("DEBUG"), "debug logging is on:\n{log}");
    assert!(!log.contains('\u{1b}'), "a log file gets no colour codes:\n{log}");
    for secret in [jwt.as_str(), &worker_secret, &account_secret, &invite, "192.0.2.55", "AB:CD:EF", "forged.sig"] {
        assert!(!log.contains(secret), "{secret:?} appears in the log");
    }
}

/// B26: the JWT signing key is generated on the server's own disk, readable by its user only;
/// it never travels through user-data, environment variables or the database.
#[tokio::test]
async fn b26_signing_key_is_generated_private() {
    use std::os::unix::fs::PermissionsExt;
    let s = start().await;
    let key = s.dir.path().join("jwt-ed25519.pem");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} has mode {mode:o}", key.display());
    let jwks = s.ok("GET", "/.well-known/jwks.json", None, None).await;
    let pem = std::fs::read_to_string(&key).unwrap();
    let private_b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!jwks.to_string().contains(&private_b64), "the private key is not published");
    s.stop().await;
}
