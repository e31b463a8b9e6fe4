//! TURN relays with a real coturn on 127.0.0.1: the signaling server hands each peer its own
//! time-limited credentials (TURN REST, coturn's `use-auth-secret`), the peers allocate relayed
//! addresses, and a relay-only connection carries a verified file through coturn. Two network
//! namespaces that can reach only the relay are cli/tests/relay.rs.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use sleap_rtc_tokio::conn::Route;
use sleap_rtc_tokio::{ConnError, PeerOptions, connect};

#[path = "../../driver/conformance/coturn.rs"]
mod coturn;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn relay_only() -> PeerOptions {
    PeerOptions { relay_only: true, ..PeerOptions::loopback() }
}

fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn env_with_turn(dir: &std::path::Path, turn_port: u16, secret: &str) -> common::Env {
    let secret_file = dir.join(format!("turn-secret-{turn_port}"));
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    common::env_with(move |c| {
        c.turn_urls = vec![format!("turn:127.0.0.1:{turn_port}?transport=udp")];
        c.turn_secret_file = Some(secret_file);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_connection_carries_a_verified_file_through_coturn() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let turn = coturn::Coturn::start(&[LOOPBACK], "lab-secret", dir.path(), true);
    let env = env_with_turn(dir.path(), turn.port, "lab-secret").await;
    let worker = env.worker().await;
    let client = env.client().await;

    // Each peer gets its own credentials: `EXPIRY:PEER` and an HMAC of it.
    let ice = &client.registered().ice_servers;
    let t = ice.iter().find(|s| s.urls.iter().any(|u| u.starts_with("turn:"))).expect("a turn: server");
    let user = t.username.as_deref().expect("a TURN username");
    let (expiry, peer) = user.split_once(':').expect("EXPIRY:PEER");
    assert_eq!(peer, client.peer_id());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(expiry.parse::<u64>().unwrap() > now + 3600, "credentials expire after the configured lifetime");
    assert!(t.credential.as_deref().is_some_and(|c| c.len() == 28), "base64 of a 20-byte HMAC-SHA1");

    let (c, w) = match common::pair_with(&client, &worker, relay_only()).await {
        (Ok(c), Ok(w)) => (c, w),
        other => panic!("relay-only connection failed: {:?}\ncoturn log:\n{}", other.0.err(), turn.log_text()),
    };
    for cand in c.local_candidates().iter().chain(w.local_candidates()) {
        assert!(cand.contains("typ relay"), "relay-only offered a non-relay candidate: {cand}");
    }
    assert_eq!(c.route(), Some(Route::Relayed));
    assert_eq!(w.route(), Some(Route::Relayed));

    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // SLEAP_RTC_TURN_TEST_MIB: a larger file for a figure (BENCHMARKS.md, "TURN relay").
    let mib: usize = std::env::var("SLEAP_RTC_TURN_TEST_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let size = mib << 20;
    common::write_random(&src.join("labels.pkg.slp"), size, 7);
    let dst = dir.path().join("dst");
    let incoming = w.receive_files(&dst).expect("receive");
    let t0 = Instant::now();
    let sent = c.send_files(&[src.join("labels.pkg.slp")]).await.expect("send");
    let (sent, received) =
        tokio::time::timeout(Duration::from_secs(120), async { tokio::join!(sent.finish(), incoming.finish()) })
            .await
            .expect("the relayed transfer finishes");
    let secs = t0.elapsed().as_secs_f64();
    let sent = sent.expect("sent");
    let received = received.expect("received");
    assert_eq!(sent.bytes, size as u64);
    assert!(sent.failed.is_empty() && received.failed.is_empty());
    assert_eq!(std::fs::read(dst.join("labels.pkg.slp")).unwrap(), std::fs::read(src.join("labels.pkg.slp")).unwrap());
    c.close().await;
    w.close().await;

    // The same file directly, for comparison: figures for the reader, never assertions.
    let (c, w) = common::pair(&client, &worker).await;
    let (c, w) = (c.expect("direct"), w.expect("direct"));
    assert_eq!(c.route(), Some(Route::Direct));
    let dst2 = dir.path().join("dst2");
    let incoming = w.receive_files(&dst2).expect("receive");
    let t1 = Instant::now();
    let sent = c.send_files(&[src.join("labels.pkg.slp")]).await.expect("send");
    let (s2, r2) = tokio::join!(sent.finish(), incoming.finish());
    let direct = t1.elapsed().as_secs_f64();
    assert!(s2.is_ok() && r2.is_ok());
    let mb = size as f64 / 1e6;
    eprintln!(
        "{mib} MiB on loopback: relayed through coturn {:.1} MB/s ({secs:.2} s), direct {:.1} MB/s ({direct:.2} s)",
        mb / secs,
        mb / direct
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_refuses_the_credentials_is_a_clear_error_not_a_hang() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let turn = coturn::Coturn::start(&[LOOPBACK], "the-relays-secret", dir.path(), true);
    // The signaling server signs with another secret: coturn answers 401 to every allocation.
    let env = env_with_turn(dir.path(), turn.port, "a-different-secret").await;
    let worker = env.worker().await;
    let client = env.client().await;
    let t0 = Instant::now();
    let r = connect(&client, worker.peer_id(), relay_only()).await;
    assert!(matches!(r, Err(ConnError::NoRelay)), "{:?}", r.err());
    assert!(t0.elapsed() < Duration::from_secs(10), "gave up only after {:?}", t0.elapsed());

    // Without relay-only the same peers still connect directly, the failed relay aside.
    let (c, w) = common::pair(&client, &worker).await;
    let c = c.expect("direct connection");
    let _w = w.expect("direct connection");
    assert_eq!(c.route(), Some(Route::Direct));
}
