//! The whole upstream flow against a real server over real WebSockets.

mod common;

use common::*;
use serde_json::json;

/// sign-in → room → worker registers with a token → client registers with a JWT → filtered
/// discovery → peer_message both ways → offer/answer/candidate relay → disconnect → peer_left.
#[tokio::test]
async fn upstream_flow_end_to_end() {
    let s = start().await;
    let (owner, _) = s.signin().await;
    let (room, _) = s.room(&owner).await;
    let (token, _) = s.worker_token(&owner, &room, "gpu-box").await;
    let (client_jwt, _) = s.signin().await;
    s.join(&owner, &client_jwt, &room).await;

    let mut worker = s.connect().await;
    let reg = worker
        .register(json!({
            "type": "register", "role": "worker", "api_key": token, "request_id": "w1",
            "metadata": {"tags": ["sleap-rtc", "training-worker"],
                         "properties": {"gpu_memory_mb": 24576, "gpu_model": "A5000", "status": "available"}}
        }))
        .await;
    assert_eq!(reg["room_id"], room.as_str());
    assert_eq!(reg["request_id"], "w1");
    assert_eq!(reg["token"], serde_json::Value::Null);
    let worker_id = reg["peer_id"].as_str().unwrap().to_owned();
    assert!(worker_id.starts_with("worker-gpu-box-"), "{worker_id}");

    let mut client = s.connect().await;
    let reg = client
        .register(json!({"type": "register", "role": "client", "jwt": client_jwt, "room_id": room,
                         "peer_id": "laptop-1", "metadata": {"tags": ["training-client"]}}))
        .await;
    assert_eq!(reg["peer_id"], "laptop-1");
    assert_eq!(reg["peer_list"], json!([worker_id]));
    assert_eq!(reg["peer_metadata"][&worker_id]["properties"]["gpu_model"], "A5000");

    let joined = worker.recv().await;
    assert_eq!(joined["type"], "peer_joined");
    assert_eq!(joined["peer_id"], "laptop-1");
    assert_eq!(joined["role"], "client");

    // Filtered discovery, upstream shape.
    client
        .send(json!({"type": "discover_peers", "from_peer_id": "laptop-1", "request_id": 7, "filters": {
            "role": "worker", "tags": ["nope", "training-worker"],
            "properties": {"status": "available", "gpu_memory_mb": {"$gte": 8192}}}}))
        .await;
    let list = client.recv().await;
    assert_eq!(list["type"], "peer_list");
    assert_eq!(list["request_id"], 7);
    assert_eq!(list["count"], 1);
    assert_eq!(list["to_peer_id"], "laptop-1");
    assert_eq!(list["peers"][0]["peer_id"], worker_id.as_str());
    assert!(list["peers"][0]["connected_at"].as_f64().unwrap() > 1.6e9);
    client.send(json!({"type": "discover_peers", "filters": {"properties": {"gpu_memory_mb": {"$gte": 50000}}}})).await;
    assert_eq!(client.recv().await["count"], 0);

    // peer_message both ways.
    client
        .send(json!({"type": "peer_message", "from_peer_id": "laptop-1", "to_peer_id": worker_id,
                     "payload": {"app_message_type": "job_request", "job_id": "j1"}}))
        .await;
    let m = worker.recv().await;
    assert_eq!(
        m,
        json!({"type": "peer_message", "from_peer_id": "laptop-1", "to_peer_id": worker_id,
                         "payload": {"app_message_type": "job_request", "job_id": "j1"}})
    );
    worker
        .send(json!({"type": "peer_message", "to_peer_id": "laptop-1", "request_id": "ack-me",
                     "payload": {"app_message_type": "job_response", "accepted": true}}))
        .await;
    let ack = worker.recv().await;
    assert_eq!((ack["type"].as_str(), ack["request_id"].as_str()), (Some("ack"), Some("ack-me")));
    let m = client.recv().await;
    assert_eq!(m["from_peer_id"], worker_id.as_str());
    assert_eq!(m["payload"]["accepted"], true);

    // Status update reaches the room.
    worker.send(json!({"type": "update_metadata", "metadata": {"properties": {"status": "busy"}}})).await;
    let upd = worker.recv().await;
    assert_eq!(upd["type"], "metadata_updated");
    assert_eq!(upd["metadata"]["properties"]["gpu_model"], "A5000");
    let pushed = client.recv().await;
    assert_eq!(pushed["type"], "metadata_updated");
    assert_eq!(pushed["peer_id"], worker_id.as_str());
    assert_eq!(pushed["metadata"]["properties"]["status"], "busy");

    // WebRTC relay: forwarded verbatim with the server-bound sender.
    client
        .send(json!({"type": "offer", "sender": "laptop-1", "target": worker_id, "sdp": "v=0 offer", "role": "client"}))
        .await;
    let offer = worker.recv().await;
    assert_eq!(
        offer,
        json!({"type": "offer", "sender": "laptop-1", "target": worker_id, "sdp": "v=0 offer", "role": "client"})
    );
    worker.send(json!({"type": "answer", "target": "laptop-1", "sdp": "v=0 answer"})).await;
    let answer = client.recv().await;
    assert_eq!(answer, json!({"type": "answer", "sender": worker_id, "target": "laptop-1", "sdp": "v=0 answer"}));
    let cand = json!({"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMid": "0", "sdpMLineIndex": 0});
    client.send(json!({"type": "candidate", "sender": "laptop-1", "target": worker_id, "candidate": cand})).await;
    assert_eq!(worker.recv().await["candidate"], cand);

    // Mesh relay types.
    worker
        .send(json!({"type": "mesh_connect", "target_peer_id": "laptop-1", "offer": {"sdp": "s", "type": "offer"}}))
        .await;
    let mo = client.recv().await;
    assert_eq!(mo, json!({"type": "mesh_offer", "from_peer_id": worker_id, "offer": {"sdp": "s", "type": "offer"}}));
    client
        .send(json!({"type": "mesh_answer", "target_peer_id": worker_id, "answer": {"sdp": "a", "type": "answer"}}))
        .await;
    assert_eq!(worker.recv().await["type"], "mesh_answer");
    client.send(json!({"type": "ice_candidate", "target_peer_id": worker_id, "candidate": cand})).await;
    let ic = worker.recv().await;
    assert_eq!((ic["type"].as_str(), ic["from_peer_id"].as_str()), (Some("ice_candidate"), Some("laptop-1")));

    // Live worker list over HTTP.
    let w = s.ok("GET", &format!("/api/rooms/{room}/workers"), Some(&client_jwt), None).await;
    assert_eq!(w["count"], 1);
    assert_eq!(w["workers"][0]["worker_name"], "gpu-box");
    assert_eq!(w["workers"][0]["peer_id"], worker_id.as_str());

    // Disconnect → peer_left.
    drop(client);
    let left = worker.recv().await;
    assert_eq!(left["type"], "peer_left");
    assert_eq!(left["peer_id"], "laptop-1");
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
