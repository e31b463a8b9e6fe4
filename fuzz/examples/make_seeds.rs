//! Writes the seed corpora under `fuzz/corpus/` from real encoders and real samples (a real SDP
//! offer and answer from str0m, real frames, a real registry manifest, sleap-nn's progress
//! messages), so the fuzzers start from valid inputs instead of discovering the formats.
//! Run: `cargo run -p sleap-rtc-fuzz --example make_seeds`.

use std::path::Path;
use std::time::Instant;

use serde_json::json;
use sleap_rtc_core::peer::{Peer, PeerConfig, generate_certificate};
use sleap_rtc_core::registry;
use sleap_rtc_core::transfer::{FileEntry, FrameHeader, Manifest, TransferMsg, encode_frame};

fn write(target: &str, name: &str, data: impl AsRef<[u8]>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    std::fs::write(dir.join(name), data).expect("write seed");
}

/// Deterministic filler for the byte-driven (Arbitrary) harnesses.
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Length-prefixed frames of real cluster messages aimed at the harness's hub (instance 1 with
/// local peers `a` on conn 1 and `b` on conn 2 in room `r`).
fn cluster_seeds() {
    use sleap_rtc_core::cluster::{ClusterMsg, PeerAt, PeerUp};
    let up = |conn: u64, meta: &str| PeerUp {
        room_id: "r".into(),
        peer_id: "w".into(),
        at: PeerAt { instance: 2, conn },
        role: "worker".into(),
        metadata: meta.into(),
        connected_at: 1_700_000_000_000,
        user_id: "u2".into(),
        credential_id: "wt:1".into(),
        worker_name: Some("gpu".into()),
        is_admin: false,
        room_expires_at: None,
    };
    let at = PeerAt { instance: 2, conn: 7 };
    let seqs: [(&str, Vec<ClusterMsg>); 4] = [
        (
            "join-update-leave",
            vec![
                ClusterMsg::PeerUp(up(7, r#"{"tags":["gpu"]}"#)),
                ClusterMsg::PeerUp(up(7, r#"{"tags":["gpu"],"properties":{"status":"busy"}}"#)),
                ClusterMsg::PeerDown { room_id: "r".into(), peer_id: "w".into(), at, reason: "disconnected".into() },
            ],
        ),
        (
            "deliver",
            vec![ClusterMsg::Deliver {
                room_id: "r".into(),
                peer_id: "a".into(),
                conn: 1,
                envelope: r#"{"type":"peer_message","from_peer_id":"w","to_peer_id":"a","payload":{}}"#.into(),
            }],
        ),
        (
            "supersede-and-crash",
            vec![
                ClusterMsg::PeerUp(up(7, "{}")),
                ClusterMsg::PeerUp(up(8, "{}")),
                ClusterMsg::InstanceDown { instance: 2 },
            ],
        ),
        (
            "admin",
            vec![
                ClusterMsg::RoomExpiry { room_id: "r".into(), expires_at: Some(1_800_000_000_000) },
                ClusterMsg::Revoke { credential_id: "c".into() },
                ClusterMsg::RemoveMember { room_id: "r".into(), user_id: "u".into() },
                ClusterMsg::CloseRoom { room_id: "r".into(), reason: "deleted".into() },
            ],
        ),
    ];
    for (name, msgs) in seqs {
        let mut out = Vec::new();
        for m in msgs {
            let b = m.encode();
            out.extend_from_slice(&(b.len() as u16).to_le_bytes());
            out.extend_from_slice(&b);
        }
        write("cluster_msg", &format!("{name}.bin"), out);
    }
}

fn main() {
    cluster_seeds();
    if std::env::args().nth(1).as_deref() == Some("cluster_msg") {
        return;
    }
    let signal = [
        json!({"type":"register","peer_id":"worker-1","room_id":"r1","role":"worker","jwt":"eyJ...",
            "metadata":{"tags":["gpu"],"properties":{"gpu_memory_mb":8000,"status":"available"}}}),
        json!({"type":"register","room_id":"r1","token":"a1b2c3","id_token":"x","role":"client"}),
        json!({"type":"discover_peers","filters":{"role":"worker","tags":["gpu"],"properties":{"gpu_memory_mb":{"$gte":4000}}},"request_id":1}),
        json!({"type":"update_metadata","metadata":{"properties":{"status":"busy"}}}),
        json!({"type":"peer_message","to_peer_id":"worker-1","payload":{"kind":"hello"},"request_id":"a"}),
        json!({"type":"offer","sender":"client-1","target":"worker-1","sdp":"v=0\r\n"}),
        json!({"type":"ice_candidate","target_peer_id":"w","candidate":{"candidate":"candidate:1 1 udp 1 1.2.3.4 5 typ host"}}),
        json!({"type":"request_ticket","target":"worker-1","fingerprint":"sha-256 AB:CD"}),
        json!({"type":"ping"}),
        json!({"type":"registered_auth","room_id":"r","token":null,"peer_id":"p","admin_peer_id":null,"peer_list":[],
            "peer_metadata":{},"ice_servers":[{"urls":["stun:stun.l.google.com:19302"]}],"mesh_ice_servers":[]}),
        json!({"type":"peer_list","to_peer_id":"p","peers":[{"peer_id":"w","role":"worker","metadata":{},"connected_at":1.5}],"count":1}),
        json!({"type":"error","code":"RATE_LIMITED","message":"slow down","reason":"slow down","request_id":3}),
    ];
    for (i, v) in signal.iter().enumerate() {
        write("signal_decode", &format!("seed-{i:02}.json"), v.to_string());
    }

    let content = b"hello sleap";
    let mut frame = Vec::new();
    encode_frame(FrameHeader { transfer_id: 7, file: 0, offset: 0 }, content, &mut frame);
    write("transfer_decode", "frame.bin", &frame);
    let manifest = Manifest {
        files: vec![
            FileEntry { name: "labels.pkg.slp".into(), size: 11, blake3: blake3::hash(content).to_hex().to_string() },
            FileEntry { name: "models/run1/best.ckpt".into(), size: 0, blake3: blake3::hash(b"").to_hex().to_string() },
        ],
    };
    let offer = TransferMsg::TransferOffer { transfer_id: manifest.derived_id(), manifest };
    write("transfer_decode", "offer.json", offer.to_json());
    write("transfer_decode", "ack.json", TransferMsg::TransferAck { transfer_id: 7, file: 0, offset: 11 }.to_json());
    for (i, name) in
        ["../etc/passwd", "/abs", "a/./b", "con.txt", "a\u{2215}b", "x\0y", "ok/name.slp"].iter().enumerate()
    {
        write("transfer_decode", &format!("name-{i}.txt"), name);
    }

    write(
        "job_spec",
        "train.json",
        json!({"type":"train","config_path":"tiny_single.yaml","labels_path":"labels.pkg.slp","max_epochs":20,
            "batch_size":4,"learning_rate":0.0001,"run_name":"run1","trainer_devices":1,
            "path_mappings":{"/home/me/data":"/mnt/data"}})
        .to_string(),
    );
    write(
        "job_spec",
        "track.json",
        json!({"type":"track","data_path":"/mnt/data/video.mp4","model_paths":["run1","model:a1b2c3d4"],
            "frames":"0-15","peak_threshold":0.2,"batch_size":4,"tracking":true,"max_instances":2})
        .to_string(),
    );
    write("job_spec", "path.txt", "/mnt/data/../../etc/shadow");

    let progress = [
        r#"{"what": "", "event": "train_begin", "logs": null, "wandb_url": null}"#,
        r#"{"what": "", "event": "batch_end", "logs": {"loss": 0.029713990166783333}, "epoch": 0, "batch": 0}"#,
        r#"{"what": "", "event": "epoch_end", "logs": {"loss": 0.02, "val/loss": NaN, "train/loss": Infinity}, "epoch": 0}"#,
        r#"{"what": "", "event": "train_end", "logs": null}"#,
        r#"{"type":"job_submit","job_id":"j1","spec":{"type":"train","config_path":"c.yaml"}}"#,
        r#"{"type":"job_attach","job_id":"j1","fetch":true}"#,
        "Predicting... \u{1b}[32m 50%\u{1b}[0m 8/16 [00:01<00:01]\r Predicting... 100% 16/16\n",
        "2026-11-22 07:03:29 | Loaded inference model | type=single_instance | backbone=unet | nodes=2",
    ];
    for (i, p) in progress.iter().enumerate() {
        write("ctl_and_bridge", &format!("seed-{i}.txt"), p);
    }
    let yaml = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/assets/tiny_single.yaml"))
        .expect("cli/assets/tiny_single.yaml");
    write("ctl_and_bridge", "config.yaml", yaml);

    let mut m = registry::Manifest::new("room-a");
    let entry = registry::ModelEntry {
        id: "a1b2c3d4e5f6".into(),
        alias: Some("best".into()),
        model_type: "single_instance".into(),
        available_on_workers: vec!["w1".into()],
        tags: vec!["mouse".into()],
        files: vec![registry::ModelFile { name: "best.ckpt".into(), size: 3, blake3: "00".repeat(32) }],
        ..Default::default()
    };
    registry::apply(&mut m, &registry::Op::AddModel(Box::new(entry)), "2026-11-22T00:00:00Z").expect("seed op");
    let json = m.to_json();
    for (i, tail) in [bytes(1, 64), bytes(2, 256)].iter().enumerate() {
        let mut seed = (json.len() as u16).to_be_bytes().to_vec();
        seed.extend_from_slice(&json);
        seed.extend_from_slice(tail);
        write("registry_manifest", &format!("manifest-{i}.bin"), seed);
    }

    let cfg = PeerConfig { cert: generate_certificate(), ..Default::default() };
    let now = Instant::now();
    let mut a = Peer::new(&cfg, now);
    let mut b = Peer::new(&cfg, now);
    let host = a.add_local_candidate(([127, 0, 0, 1], 5000).into(), None).ok().flatten().unwrap_or_default();
    let _ = b.add_local_candidate(([127, 0, 0, 1], 6000).into(), None);
    let offer = a.create_offer().expect("offer");
    let answer = b.accept_offer(&offer).expect("answer");
    write("peer_sdp", "offer.txt", [&[0u8][..], offer.as_bytes()].concat());
    write("peer_sdp", "answer.txt", [&[1u8][..], answer.as_bytes()].concat());
    write("peer_sdp", "candidates.txt", [&[2u8][..], format!("a={host}\r\n\r\n").as_bytes()].concat());
    write("peer_sdp", "datagram.bin", [&[3u8][..], &bytes(3, 100)[..]].concat());
    write("peer_sdp", "stun.bin", [&[4u8][..], b"stun:[::1]:3478"].concat());

    for (i, n) in [64usize, 512, 2048].iter().enumerate() {
        write("room_sequence", &format!("random-{i}.bin"), bytes(10 + i as u64, *n));
        write("transfer_receiver", &format!("random-{i}.bin"), bytes(20 + i as u64, *n));
    }
    println!("seeds written under {}", Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").display());
}
