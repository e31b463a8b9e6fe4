//! Hostile clients against the real server binary: thousands of connections that never
//! register, frames far over the limits, and peers that flood or never read (the last two also
//! in `upstream_weaknesses.rs`, B16). Each checks that the attacker is cut off, that memory
//! stays bounded, and that honest peers in the meantime are served normally.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt, stream};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Two honest peers in one room that can still talk to each other.
async fn honest_pair(s: &ServerProcess) -> (Ws, Ws) {
    let (_, _, a, b) = s.pair().await;
    (a, b)
}

async fn still_talking(a: &mut Ws, b: &mut Ws, n: u32) {
    a.send(json!({"type": "peer_message", "to_peer_id": "b", "payload": {"n": n}})).await;
    let m = b.recv_type("peer_message").await;
    assert_eq!(m["payload"]["n"], n);
    b.send(json!({"type": "ping"})).await;
    assert_eq!(b.recv_type("pong").await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_silent_connections_are_closed_and_memory_stays_bounded() {
    const N: usize = 10_000;
    // The test process holds the client side of every connection.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // Long enough that none of them is closed before all are open, even on a loaded machine.
    let s = ServerProcess::spawn(&["--register-timeout-secs", "30", "--max-connections", "12000"]).await;
    let (mut a, mut b) = honest_pair(&s).await;
    let before = s.rss_kib();

    let url = format!("ws://{}/ws", s.addr);
    let silent: Vec<_> = stream::iter(0..N)
        .map(|_| {
            let url = url.clone();
            async move { tokio_tungstenite::connect_async(url).await.map(|(ws, _)| ws) }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let mut silent: Vec<_> = silent.into_iter().map(|r| r.expect("connection accepted under the limit")).collect();
    let peak = s.rss_kib();
    assert_eq!(s.metric("sleap_rtc_ws_connections").await, Some((N + 2) as f64), "all open when measured");
    // Honest peers are served while 10,000 sockets sit idle.
    still_talking(&mut a, &mut b, 1).await;

    // Every silent connection is closed by the server with 4008 (no registration in time).
    let codes: Vec<Option<u16>> = stream::iter(silent.iter_mut())
        .map(|ws| async move {
            loop {
                match tokio::time::timeout(Duration::from_secs(120), ws.next()).await {
                    Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
                    Ok(Some(Ok(_))) => continue,
                    _ => return None,
                }
            }
        })
        .buffer_unordered(1024)
        .collect()
        .await;
    let closed_4008 = codes.iter().filter(|c| **c == Some(4008)).count();
    assert_eq!(closed_4008, N, "closes: {:?}", codes.iter().filter(|c| **c != Some(4008)).take(5).collect::<Vec<_>>());
    drop(silent);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = s.rss_kib();
    let per_conn = (peak.saturating_sub(before) * 1024) / N as u64;
    eprintln!(
        "server RSS: {before} KiB idle, {peak} KiB with {N} silent sockets ({per_conn} B each), {after} KiB after"
    );
    // Bounded: a few KiB per idle socket (1 KiB read buffer, no write buffer, small queue), not
    // the 128 KiB tungstenite would zero-fill by default.
    assert!(per_conn < 32 * 1024, "{per_conn} bytes per idle connection");
    still_talking(&mut a, &mut b, 2).await;
    assert_eq!(s.metric("sleap_rtc_ws_connections").await, Some(2.0), "only the honest peers remain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_binary_frames_cut_off_only_their_sender() {
    let s = ServerProcess::spawn(&["--max-message-bytes", "65536"]).await;
    let (mut a, mut b) = honest_pair(&s).await;
    let url = format!("ws://{}/ws", s.addr);

    // Over the soft limit: a clear error, the connection stays.
    let mut m = Ws::connect(&url).await;
    m.send_text("x".repeat(100_000)).await;
    assert_eq!(m.recv().await["code"], "MESSAGE_TOO_LARGE");

    // Over the hard limit (1 MiB): the connection is closed (1009 Message Too Big) before the
    // server buffers it.
    let mut huge = Ws::connect(&url).await;
    let _ = huge.inner.send(Message::text("y".repeat(4 << 20))).await;
    let code = loop {
        match huge.next_event(Duration::from_secs(10)).await {
            Event::Closed(Some((code, _))) => break u16::from(code),
            // Reset mid-frame: the server stopped reading and dropped the socket.
            Event::Closed(None) | Event::Error(_) => break 1006,
            Event::Json(_) => continue,
            Event::Timeout => panic!("server kept a connection sending a 4 MiB frame"),
        }
    };
    assert!(code == 1009 || code == 1006, "closed with {code}");

    // Binary frames are not part of the protocol: an error, then nothing else happens.
    let mut bin = Ws::connect(&url).await;
    bin.inner.send(Message::binary(vec![0u8; 1000])).await.unwrap();
    let e = bin.recv().await;
    assert_eq!(e["type"], "error", "{e}");

    // A frame that claims 2^62 bytes and sends a few.
    let mut liar = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        s.addr
    );
    liar.write_all(req.as_bytes()).await.unwrap();
    let mut frame = vec![0x81u8, 0xFF];
    frame.extend_from_slice(&(1u64 << 62).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let _ = liar.write_all(&frame).await;
    let mut buf = vec![0u8; 4096];
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    // The server answers the upgrade, then closes the socket on the oversized header.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), liar.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("server kept a connection announcing a 2^62-byte frame"),
        }
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 101"), "{}", String::from_utf8_lossy(&got));

    still_talking(&mut a, &mut b, 3).await;
    m.send(json!({"type": "ping"})).await;
    assert_eq!(m.recv().await["type"], "pong");
}
