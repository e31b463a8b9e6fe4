//! The whole upstream flow against a real server over real WebSockets.

mod common;

use common::*;
use serde_json::json;

/// sign-in → room → worker registers with a token → client registers with a JWT → filtered
/// discovery → peer_message both ways → offer/answer/candidate relay → disconnect → peer_left.
#[tokio::test]
async fn upstream_flow_end_to_end() {
    let s = start().await;
    upstream_flow(&s, &s, &s).await;
    s.stop().await;
}

/// Upstream's legacy path: anonymous sign-in, `/create-room`, and a `register` with `peer_id`,
/// `room_id`, `token`, `id_token` on the root path, as old Python workers send it.
#[tokio::test]
async fn legacy_cognito_style_flow_on_root_path() {
    let s = start().await;
    let signin = s.ok("POST", "/anonymous-signin", None, None).await;
    for k in ["id_token", "jwt", "user_id", "username"] {
        assert!(signin[k].is_string(), "{k} missing: {signin}");
    }
    let id_token = signin["id_token"].as_str().unwrap();
    let created = s.ok("POST", "/create-room", Some(id_token), None).await;
    let (room, token) = (created["room_id"].as_str().unwrap(), created["token"].as_str().unwrap());
    let root = s.ws.trim_end_matches("/ws").to_owned();
    let mut w = Ws::connect(&root).await;
    let reg = w
        .register(
            json!({"type": "register", "peer_id": "worker-abc", "room_id": room, "token": token, "id_token": id_token}),
        )
        .await;
    assert_eq!(reg["peer_id"], "worker-abc");
    assert_eq!(reg["token"], token);
    assert_eq!(reg["ice_servers"], json!([]));
    let mut c = Ws::connect(&root).await;
    let reg = c
        .register(
            json!({"type": "register", "peer_id": "client-1", "room_id": room, "token": token, "id_token": id_token}),
        )
        .await;
    assert_eq!(reg["peer_list"], json!(["worker-abc"]));
    c.send(json!({"type": "offer", "sender": "client-1", "target": "worker-abc", "sdp": "x"})).await;
    assert_eq!(w.recv_type("offer").await["sdp"], "x");
    s.stop().await;
}

#[tokio::test]
async fn health_jwks_and_metrics() {
    let s = start_with(|c| c.ice_servers = vec!["stun:stun.example.org:3478".into()]).await;
    let h = s.ok("GET", "/health", None, None).await;
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["storage"], "ok");
    let jwks = s.ok("GET", "/.well-known/jwks.json", None, None).await;
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
    let (jwt, _) = s.signin().await;
    let header = jwt.split('.').next().unwrap();
    use base64::Engine;
    let header: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    assert_eq!(header["kid"], jwks["keys"][0]["kid"]);

    let (room, _) = s.room(&jwt).await;
    let mut p = s.connect().await;
    let reg = p.register(json!({"type": "register", "jwt": jwt, "room_id": room})).await;
    assert_eq!(reg["ice_servers"], json!([{"urls": ["stun:stun.example.org:3478"]}]));
    let text = s.client.get(format!("{}/metrics", s.http)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("sleap_rtc_peers 1"), "{text}");
    assert!(text.contains("sleap_rtc_registrations_total{result=\"ok\"} 1"), "{text}");
    assert!(text.contains("# EOF"));
    let (st, _) = s.call("GET", "/ws", None, None).await;
    assert_eq!(st, 426);
    s.stop().await;
}

/// Rooms expired for longer than the grace period are deleted from the SQLite file by the
/// periodic sweep, with their memberships, worker tokens and invites, and counted in
/// `/metrics`; a room that expired recently (still listed, still extendable) and a live one
/// stay. The sweep used to exist only for live peers: the database kept every room forever.
#[tokio::test]
async fn expired_rooms_are_deleted_from_storage_and_counted() {
    use sleap_rtc_server::store::ROOM_GRACE_SECS;
    let s = start_with(|c| c.room_purge_secs = 1).await;
    let (jwt, _) = s.signin().await;
    let (gone, _) = s.room(&jwt).await;
    let (recent, _) = s.room(&jwt).await;
    let (live, _) = s.room(&jwt).await;
    s.worker_token(&jwt, &gone, "w").await;
    s.ok("POST", &format!("/api/auth/rooms/{gone}/invite"), Some(&jwt), None).await;

    // Room lifetimes are whole days through the API: age the rooms in the file itself.
    let db = rusqlite::Connection::open(s.dir.path().join("sleap-rtc.sqlite")).unwrap();
    let now = sleap_rtc_server::unix_now();
    let set_expiry = |room: &str, at: i64| {
        db.execute("UPDATE rooms SET expires_at = ?2 WHERE id = ?1", rusqlite::params![room, at]).unwrap()
    };
    assert_eq!(set_expiry(&gone, now - ROOM_GRACE_SECS - 60), 1);
    assert_eq!(set_expiry(&recent, now - 60), 1);
    let count = |sql: &str, room: &str| db.query_row(sql, [room], |r| r.get::<_, i64>(0)).unwrap();

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while count("SELECT count(*) FROM rooms WHERE id = ?1", &gone) > 0 {
        assert!(std::time::Instant::now() < deadline, "the long-expired room is still in the database");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for table in ["memberships", "worker_tokens", "invites"] {
        assert_eq!(count(&format!("SELECT count(*) FROM {table} WHERE room_id = ?1"), &gone), 0, "{table}");
    }
    assert_eq!(count("SELECT count(*) FROM rooms WHERE id = ?1", &recent), 1, "still within its grace");
    assert_eq!(count("SELECT count(*) FROM rooms WHERE id = ?1", &live), 1);
    let (st, _) = s.call("GET", &format!("/api/auth/rooms/{gone}"), Some(&jwt), None).await;
    assert_eq!(st, 404);
    assert_eq!(s.ok("GET", &format!("/api/auth/rooms/{recent}"), Some(&jwt), None).await["expired"], true);

    let text = s.client.get(format!("{}/metrics", s.http)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("sleap_rtc_rooms_expired_total 1\n"), "{text}");
    s.stop().await;
}
