//! Real UDP/DTLS/SCTP on 127.0.0.1 between two tokio peers that meet through a real signaling
//! server: control messages, a file and a directory in both directions, a cut mid-transfer and
//! a resume on a new connection.

mod common;

use std::time::Duration;

use common::{env, write_random};
use serde_json::json;
use sleap_rtc_core::signal::Filters;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_and_messages_both_ways_through_the_signaling_server() {
    let e = env().await;
    let worker_sig = e.worker().await;
    let client_sig = e.client().await;
    let workers = client_sig.discover(Filters { role: Some("worker".into()), ..Default::default() }).await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].peer_id, worker_sig.peer_id(), "discovery finds the worker");

    let (client, worker) = common::pair(&client_sig, &worker_sig).await;
    let (client, worker) = (client.unwrap(), worker.unwrap());
    assert_eq!(worker.remote_peer(), client_sig.peer_id());
    assert!(client.local_fingerprint().starts_with("sha-256 "));
    assert_eq!(worker.remote_fingerprint().as_deref(), Some(client.local_fingerprint()));

    client.send_message(&json!({"type": "job_submit", "job": 1})).unwrap();
    let m: serde_json::Value = serde_json::from_str(&worker.recv_message().await.unwrap()).unwrap();
    assert_eq!(m["job"], 1);
    worker.send_message(&json!({"type": "job_accepted"})).unwrap();
    assert!(client.recv_message().await.unwrap().contains("job_accepted"));

    // Client → worker: one file and one directory.
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("labels.pkg.slp"), 3_000_000, 7);
    std::fs::create_dir_all(src.path().join("cfg/sub")).unwrap();
    std::fs::write(src.path().join("cfg/config.yaml"), b"trainer: {}\n").unwrap();
    std::fs::write(src.path().join("cfg/sub/empty"), b"").unwrap();
    let dst = tempfile::tempdir().unwrap();
    let incoming = worker.receive_files(dst.path()).unwrap();
    let sent = client.send_files(&[src.path().join("labels.pkg.slp"), src.path().join("cfg")]).await.unwrap();
    let (sent, received) = tokio::join!(sent.finish(), incoming.finish());
    let (sent, received) = (sent.unwrap(), received.unwrap());
    assert!(sent.failed.is_empty() && received.failed.is_empty(), "{sent:?} {received:?}");
    assert_eq!(received.files.len(), 3);
    for rel in ["labels.pkg.slp", "cfg/config.yaml", "cfg/sub/empty"] {
        assert_eq!(std::fs::read(src.path().join(rel)).unwrap(), std::fs::read(dst.path().join(rel)).unwrap(), "{rel}");
    }
    assert!(!dst.path().join("labels.pkg.slp.part").exists());

    // Worker → client: a model directory.
    let run = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(run.path().join("run1")).unwrap();
    write_random(&run.path().join("run1/best.ckpt"), 1_500_000, 9);
    std::fs::write(run.path().join("run1/training_config.yaml"), b"x: 1\n").unwrap();
    let back = tempfile::tempdir().unwrap();
    let incoming = client.receive_files(back.path()).unwrap();
    let sent = worker.send_files(&[run.path().join("run1")]).await.unwrap();
    let (s, r) = tokio::join!(sent.finish(), incoming.finish());
    assert!(s.unwrap().failed.is_empty());
    assert_eq!(r.unwrap().files.len(), 2);
    assert_eq!(
        std::fs::read(run.path().join("run1/best.ckpt")).unwrap(),
        std::fs::read(back.path().join("run1/best.ckpt")).unwrap()
    );

    client.close().await;
    tokio::time::timeout(Duration::from_secs(10), worker.closed()).await.expect("worker sees the close");
    e.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_mid_transfer_then_resume_on_a_new_connection() {
    let e = env().await;
    let worker_sig = e.worker().await;
    let client_sig = e.client().await;
    let src = tempfile::tempdir().unwrap();
    let file = src.path().join("big.bin");
    write_random(&file, 24 * 1024 * 1024, 3);
    let dst = tempfile::tempdir().unwrap();

    // First attempt: cut once the worker has written a few MiB.
    {
        let (client, worker) = common::pair(&client_sig, &worker_sig).await;
        let (client, worker) = (client.unwrap(), worker.unwrap());
        let mut incoming = worker.receive_files(dst.path()).unwrap();
        let _sent = client.send_files(std::slice::from_ref(&file)).await.unwrap();
        incoming.progress.wait_for(|p| p.acked_bytes >= 4 * 1024 * 1024).await.unwrap();
        drop(client); // the cut: the client's driver stops, its socket closes
        let r = tokio::time::timeout(Duration::from_secs(60), incoming.finish()).await.expect("receiver notices");
        assert!(r.is_err(), "first attempt cannot complete: {r:?}");
        worker.close().await;
    }
    let part = dst.path().join("big.bin.part");
    let held = std::fs::metadata(&part).expect(".part kept after the cut").len();
    assert!((4 * 1024 * 1024..24 * 1024 * 1024).contains(&held), "held {held}");

    // Second attempt: a fresh connection resumes from the .part.
    let (client, worker) = common::pair(&client_sig, &worker_sig).await;
    let (client, worker) = (client.unwrap(), worker.unwrap());
    let incoming = worker.receive_files(dst.path()).unwrap();
    let sent = client.send_files(std::slice::from_ref(&file)).await.unwrap();
    let (s, r) = tokio::join!(sent.finish(), incoming.finish());
    let s = s.unwrap();
    assert_eq!(s.resumed_bytes, held, "sender continued from the receiver's .part");
    assert!(r.unwrap().failed.is_empty());
    assert_eq!(std::fs::read(&file).unwrap(), std::fs::read(dst.path().join("big.bin")).unwrap());
    client.close().await;
    e.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_manifest_is_a_clear_error_and_the_connection_survives() {
    let e = env().await;
    let worker_sig = e.worker().await;
    let client_sig = e.client().await;
    let (client, worker) = common::pair(&client_sig, &worker_sig).await;
    let (client, worker) = (client.unwrap(), worker.unwrap());
    let src = tempfile::tempdir().unwrap();
    let many = src.path().join("many");
    std::fs::create_dir(&many).unwrap();
    for i in 0..2000 {
        std::fs::write(many.join(format!("frame_{i:05}_with_a_long_descriptive_name.png")), b"x").unwrap();
    }
    let err = client.send_files(&[many]).await.err().expect("refused");
    assert!(err.to_string().contains("exceeds"), "{err}");
    client.send_message(&json!({"type": "still_alive"})).unwrap();
    assert!(worker.recv_message().await.unwrap().contains("still_alive"));
    let huge = json!({"type": "x", "blob": "y".repeat(100_000)});
    assert!(client.send_message(&huge).is_err());
    e.server.shutdown().await;
}

/// Datagrams from strangers (garbage, fake DTLS records, fake STUN) hitting a peer's socket are
/// dropped; the connection carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_datagrams_do_not_break_a_connection() {
    let e = env().await;
    let worker_sig = e.worker().await;
    let client_sig = e.client().await;
    let (client, worker) = common::pair(&client_sig, &worker_sig).await;
    let (client, worker) = (client.unwrap(), worker.unwrap());
    let line = worker.local_candidates().iter().find(|l| l.contains("typ host")).unwrap().clone();
    let f: Vec<&str> = line.split_whitespace().collect();
    let addr: std::net::SocketAddr = format!("{}:{}", f[4], f[5]).parse().unwrap();
    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut x = 12345u64;
    for i in 0..300u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut d: Vec<u8> = (0..(x % 1400) as usize).map(|j| (x >> (j % 56)) as u8).collect();
        match i % 3 {
            // DTLS application-data record header
            0 if d.len() > 13 => d[..3].copy_from_slice(&[23, 0xfe, 0xfd]),
            // STUN binding request header with the magic cookie
            1 if d.len() > 20 => d[..8].copy_from_slice(&[0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42]),
            _ => {}
        }
        stranger.send_to(&d, addr).await.unwrap();
    }
    client.send_message(&json!({"type": "still_here"})).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), worker.recv_message()).await.unwrap().unwrap();
    assert!(got.contains("still_here"));
    assert!(matches!(worker.state(), sleap_rtc_tokio::conn::ConnState::Open { .. }));
    e.server.shutdown().await;
}
