//! A worker runs nothing for a client that has not proven membership of its room, and the proof
//! cannot be replayed on another connection. Attackers here are real WebRTC peers in this process;
//! the worker is a real `sleap-rtc worker` process.

mod common;

use common::*;
use serde_json::{Value, json};
use sleap_rtc_core::signal::ServerMessage;
use sleap_rtc_tokio::PeerOptions;

fn submit() -> Value {
    json!({"type": "job_submit", "client_job_id": "x",
           "spec": {"type": "train", "config_contents": [std::fs::read_to_string(asset("tiny_single.yaml")).unwrap()],
                    "labels_path": "/etc/hostname"}})
}

fn jobs_run(env: &Env) -> usize {
    std::fs::read_dir(env.path("w/jobs")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_without_proof_are_refused_and_the_connection_closed() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let wid = env.worker_id(&env.path("w"));
    let sig = signaling_client(&env).await;
    let c = sleap_rtc_tokio::connect(&sig, &wid, PeerOptions::loopback()).await.unwrap();
    c.send_message(&submit()).unwrap();
    c.send_message(&json!({"type": "job_attach", "job_id": "job_0000000000000000"})).unwrap();
    let m = next_ctl(&c).await.expect("a refusal");
    assert_eq!(m["type"], "auth_failed", "{m}");
    assert!(m["reason"].as_str().unwrap().contains("prove room membership"), "{m}");
    // Nothing else comes: the worker closes the connection.
    assert_eq!(next_ctl(&c).await, None);
    assert_eq!(jobs_run(&env), 0);

    // Garbage first is no better.
    let c = sleap_rtc_tokio::connect(&sig, &wid, PeerOptions::loopback()).await.unwrap();
    c.send_message(&json!({"type": "auth_ticket", "ticket": "not.a.jwt"})).unwrap();
    let m = next_ctl(&c).await.unwrap();
    assert_eq!(m["type"], "auth_failed");
    assert_eq!(next_ctl(&c).await, None);

    // A user JWT is not a ticket (another audience), though the same key signed it.
    let c = sleap_rtc_tokio::connect(&sig, &wid, PeerOptions::loopback()).await.unwrap();
    c.send_message(&json!({"type": "auth_ticket", "ticket": env.jwt})).unwrap();
    let m = next_ctl(&c).await.unwrap();
    assert_eq!(m["type"], "auth_failed", "{m}");
    assert_eq!(jobs_run(&env), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_cannot_be_replayed_on_another_connection() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let wid = env.worker_id(&env.path("w"));
    // A obtains a genuine ticket for its own connection.
    let a = signaling_client(&env).await;
    let ca = sleap_rtc_tokio::connect(&a, &wid, PeerOptions::loopback()).await.unwrap();
    let fp = ca.local_fingerprint().to_owned();
    let ticket = match a.request(json!({"type": "request_ticket", "target": wid, "fingerprint": fp})).await.unwrap().msg
    {
        ServerMessage::PeerTicket { ticket } => ticket,
        other => panic!("{other:?}"),
    };
    // B (another peer of the same user, even) presents it on B's connection.
    let b = signaling_client(&env).await;
    let cb = sleap_rtc_tokio::connect(&b, &wid, PeerOptions::loopback()).await.unwrap();
    cb.send_message(&json!({"type": "auth_ticket", "ticket": ticket})).unwrap();
    let m = next_ctl(&cb).await.unwrap();
    assert_eq!(m["type"], "auth_failed");
    assert!(m["reason"].as_str().unwrap().contains("another peer"), "{m}");
    // B asks for a ticket claiming A's fingerprint while its own DTLS key differs (as it would
    // in another process; this process shares one certificate, so B gets a fresh one here).
    let mut opts = PeerOptions::loopback();
    opts.session.peer.cert = sleap_rtc_core::peer::generate_certificate();
    let cb = sleap_rtc_tokio::connect(&b, &wid, opts).await.unwrap();
    assert_ne!(cb.local_fingerprint(), fp);
    let forged = match b.request(json!({"type": "request_ticket", "target": wid, "fingerprint": fp})).await.unwrap().msg
    {
        ServerMessage::PeerTicket { ticket } => ticket,
        other => panic!("{other:?}"),
    };
    cb.send_message(&json!({"type": "auth_ticket", "ticket": forged})).unwrap();
    let m = next_ctl(&cb).await.unwrap();
    assert_eq!(m["type"], "auth_failed");
    assert!(m["reason"].as_str().unwrap().contains("DTLS"), "{m}");
    // A's own use of its ticket works.
    ca.send_message(&json!({"type": "auth_ticket", "ticket": ticket})).unwrap();
    let m = next_ctl(&ca).await.unwrap();
    assert_eq!(m["type"], "auth_ok", "{m}");
    assert_eq!(jobs_run(&env), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_secret_mode() {
    let env = env().await;
    let _w = env.worker("w", &["--room-secret", "correct horse"], "").await;
    let cfg = env.config("cfg.yaml", "");
    // No secret: told what is needed.
    let (code, _, err) = Client::spawn(&env, &env.train_args(&cfg, "o1")).finish(60).await;
    assert_eq!(code, 1);
    assert!(err.contains("room secret"), "{err}");
    // A wrong secret.
    let mut c = env.cmd(&env.train_args(&cfg, "o2").iter().map(String::as_str).collect::<Vec<_>>());
    c.env("SLEAP_RTC_ROOM_SECRET", "battery staple");
    let out = c.output().await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not match"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(jobs_run(&env), 0);
    // The right one.
    let mut c = env.cmd(&env.train_args(&cfg, "o3").iter().map(String::as_str).collect::<Vec<_>>());
    c.env("SLEAP_RTC_ROOM_SECRET", "correct horse");
    let out = c.output().await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.path("o3/single_instance/best.ckpt").is_file());
}
