//! Routing cost of `core::room::Hub` alone: decode + route one `peer_message` between two peers of a
//! room that holds many others, and one presence broadcast. Run: `cargo bench -p sleap-rtc-core`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sleap_rtc_core::room::{ConnId, Grant, Hub, Limits, Millis, Output, Principal};
use std::hint::black_box;

fn hub_with(peers: u64) -> Hub {
    let limits = Limits { rate_per_sec: 1e9, rate_burst: 1e9, max_peers_per_room: 100_000, ..Limits::default() };
    let mut hub = Hub::new(limits);
    let now = Millis(1);
    for c in 0..peers {
        hub.connect(ConnId(c), now);
        // Every peer wants everyone's presence, so the broadcast below reaches the whole room.
        let reg = r#"{"type":"register","jwt":"x","room_id":"r","role":"worker","subscribe":["*"]}"#;
        hub.handle_text(ConnId(c), reg, now);
        let grant = Grant {
            room_id: "r".into(),
            default_peer_id: format!("p{c}"),
            principal: Principal { user_id: format!("u{c}"), credential_id: format!("c{c}") },
            room_expires_at: None,
            token_echo: None,
            worker_name: None,
        };
        hub.complete_register(ConnId(c), Ok(grant), now);
        while hub.poll_output().is_some() {}
    }
    hub
}

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("room");
    g.throughput(Throughput::Elements(1));
    for peers in [2u64, 1000] {
        let mut hub = hub_with(peers);
        let msg =
            r#"{"type":"peer_message","to_peer_id":"p1","payload":{"app_message_type":"job_status","progress":0.5}}"#;
        g.bench_function(format!("peer_message/{peers}_peers"), |b| {
            b.iter(|| {
                hub.handle_text(ConnId(0), black_box(msg), Millis(2));
                while let Some(o) = hub.poll_output() {
                    if let Output::Send { msg, .. } = o {
                        black_box(msg.to_json());
                    }
                }
            })
        });
        g.bench_function(format!("update_metadata_broadcast/{peers}_peers"), |b| {
            let msg = r#"{"type":"update_metadata","metadata":{"properties":{"status":"busy"}}}"#;
            b.iter(|| {
                hub.handle_text(ConnId(0), black_box(msg), Millis(2));
                while let Some(o) = hub.poll_output() {
                    if let Output::Send { msg, .. } = o {
                        black_box(msg.to_json());
                    }
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
