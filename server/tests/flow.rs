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
