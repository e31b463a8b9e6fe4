//! Server-reflexive candidates: the signaling server hands out a STUN URL in
//! `registered_auth.ice_servers`; both peers ask that STUN server (a responder on 127.0.0.1 that
//! encodes its answers with str0m's STUN implementation, not ours) and put the mapped address in
//! their SDP as a `srflx` candidate, then connect.

use std::time::Duration;

use serde_json::json;
use sleap_rtc_core::signal::{Register, ServerMessage};
use sleap_rtc_tokio::{PeerOptions, SignalingClient, accept, connect};

/// Answers every Binding request with a made-up public address (TEST-NET-2) and the request's
/// source port, as a NAT'd STUN server would.
async fn stun_responder() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, src)) = sock.recv_from(&mut buf).await {
            if n < 20 || buf[0..2] != [0x00, 0x01] {
                continue;
            }
            let mut id = [0u8; 12];
            id.copy_from_slice(&buf[8..20]);
            let trans: str0m::ice::TransId = serde_json::from_value(json!(id)).unwrap();
            let mapped = std::net::SocketAddr::new("198.51.100.7".parse().unwrap(), src.port());
            let mut out = [0u8; 256];
            let len =
                str0m::ice::StunMessage::binding_reply(trans, mapped).to_bytes(None, &mut out, |_, _| [0; 20]).unwrap();
            let _ = sock.send_to(&out[..len], src).await;
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_from_registered_auth_yields_srflx_candidates() {
    let (stun_addr, _stun) = stun_responder().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sleap_rtc_server::Config::local(dir.path());
    cfg.ice_servers = vec![format!("stun:{stun_addr}")];
    let server = sleap_rtc_server::Server::start(cfg).await.unwrap();
    let base = format!("http://{}", server.local_addrs()[0]);
    let http = reqwest::Client::new();
    let v: serde_json::Value =
        http.post(format!("{base}/anonymous-signin")).send().await.unwrap().json().await.unwrap();
    let jwt = v["jwt"].as_str().unwrap().to_owned();
    let v: serde_json::Value = http
        .post(format!("{base}/api/auth/rooms"))
        .bearer_auth(&jwt)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let room = v["room_id"].as_str().unwrap().to_owned();
    let ws = format!("ws://{}/ws", server.local_addrs()[0]);
    let reg = |id: &str| Register {
        jwt: Some(jwt.clone()),
        room_id: Some(room.clone()),
        peer_id: Some(id.into()),
        ..Default::default()
    };
    let a = SignalingClient::connect(&ws, reg("a")).await.unwrap();
    let b = SignalingClient::connect(&ws, reg("b")).await.unwrap();
    assert_eq!(a.registered().ice_servers[0].urls, vec![format!("stun:{stun_addr}")]);

    let (ca, cb) = tokio::join!(connect(&a, "b", PeerOptions::loopback()), async {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), b.next_event()).await.unwrap().unwrap();
            if let ServerMessage::Offer(_) = ev.msg {
                return accept(&b, &ev.msg, PeerOptions::loopback()).await;
            }
        }
    });
    let (ca, cb) = (ca.unwrap(), cb.unwrap());
    for c in [&ca, &cb] {
        let srflx: Vec<&String> = c.local_candidates().iter().filter(|l| l.contains("typ srflx")).collect();
        assert_eq!(srflx.len(), 1, "{:?}", c.local_candidates());
        assert!(srflx[0].contains(" 198.51.100.7 "), "{}", srflx[0]);
    }
    ca.send_message(&json!({"type": "hello"})).unwrap();
    assert!(cb.recv_message().await.unwrap().contains("hello"));
    server.shutdown().await;
}

#[tokio::test]
async fn silent_stun_server_costs_only_the_stun_timeout() {
    // A bound socket that never answers.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sleap_rtc_server::Config::local(dir.path());
    cfg.ice_servers = vec![format!("stun:{}", silent.local_addr().unwrap()), "turn:ignored.example:3478".into()];
    let server = sleap_rtc_server::Server::start(cfg).await.unwrap();
    let base = format!("http://{}", server.local_addrs()[0]);
    let http = reqwest::Client::new();
    let v: serde_json::Value =
        http.post(format!("{base}/anonymous-signin")).send().await.unwrap().json().await.unwrap();
    let jwt = v["jwt"].as_str().unwrap().to_owned();
    let v: serde_json::Value = http
        .post(format!("{base}/api/auth/rooms"))
        .bearer_auth(&jwt)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let room = v["room_id"].as_str().unwrap().to_owned();
    let ws = format!("ws://{}/ws", server.local_addrs()[0]);
    let reg = |id: &str| Register {
        jwt: Some(jwt.clone()),
        room_id: Some(room.clone()),
        peer_id: Some(id.into()),
        ..Default::default()
    };
    let a = SignalingClient::connect(&ws, reg("a")).await.unwrap();
    let b = SignalingClient::connect(&ws, reg("b")).await.unwrap();
    let (ca, cb) = tokio::join!(connect(&a, "b", PeerOptions::loopback()), async {
        loop {
            let ev = b.next_event().await.unwrap();
            if let ServerMessage::Offer(_) = ev.msg {
                return accept(&b, &ev.msg, PeerOptions::loopback()).await;
            }
        }
    });
    let (ca, _cb) = (ca.unwrap(), cb.unwrap());
    assert!(ca.local_candidates().iter().all(|l| l.contains("typ host")), "{:?}", ca.local_candidates());
    server.shutdown().await;
}
