//! Server-reflexive candidates: the signaling server hands out a STUN URL in
//! `registered_auth.ice_servers`; both peers ask that STUN server (a responder on 127.0.0.1 that
//! encodes its answers with str0m's STUN implementation, not ours) and put the mapped address in
//! their SDP as a `srflx` candidate, then connect.

mod common;

use common::{env_with, pair};
use serde_json::json;

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
    let e = env_with(|c| c.ice_servers = vec![format!("stun:{stun_addr}")]).await;
    let a = e.client_as(Some("a")).await;
    let b = e.client_as(Some("b")).await;
    assert_eq!(a.registered().ice_servers[0].urls, vec![format!("stun:{stun_addr}")]);

    let (ca, cb) = pair(&a, &b).await;
    let (ca, cb) = (ca.unwrap(), cb.unwrap());
    for c in [&ca, &cb] {
        let srflx: Vec<&String> = c.local_candidates().iter().filter(|l| l.contains("typ srflx")).collect();
        assert_eq!(srflx.len(), 1, "{:?}", c.local_candidates());
        assert!(srflx[0].contains(" 198.51.100.7 "), "{}", srflx[0]);
    }
    ca.send_message(&json!({"type": "hello"})).unwrap();
    assert!(cb.recv_message().await.unwrap().contains("hello"));
    e.server.shutdown().await;
}

#[tokio::test]
async fn silent_stun_server_costs_only_the_stun_timeout() {
    // A bound socket that never answers.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("stun:{}", silent.local_addr().unwrap());
    let e = env_with(|c| c.ice_servers = vec![silent_url, "turn:ignored.example:3478".into()]).await;
    let a = e.client_as(Some("a")).await;
    let b = e.client_as(Some("b")).await;
    let (ca, cb) = pair(&a, &b).await;
    let (ca, _cb) = (ca.unwrap(), cb.unwrap());
    assert!(ca.local_candidates().iter().all(|l| l.contains("typ host")), "{:?}", ca.local_candidates());
    e.server.shutdown().await;
}
