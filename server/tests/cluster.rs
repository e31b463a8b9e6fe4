//! Several server instances sharing rooms through a real redis-server, on one real (moto)
//! DynamoDB store: the signaling flow with peers split across instances, limits and identity
//! rules that hold across instances, administrative actions reaching every instance, per-sender
//! ordering, an instance crash noticed within its lease, and Redis itself going away.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use sleap_rtc_server::store::dynamo::{DynamoStore, DynamoUrl};
use sleap_rtc_server::{Config, Server};

/// Two in-process instances (A and B) on one Redis and one DynamoDB, sharing A's signing key.
struct Pair {
    a: TestServer,
    b: TestServer,
    redis: Redis,
    _moto: Moto,
}

async fn dynamo(moto: &Moto) -> Arc<DynamoStore> {
    let url = DynamoUrl::parse(&format!("dynamodb://cl?endpoint={}&region=us-east-1", moto.url)).unwrap();
    // moto accepts any credentials, but the SDK signs with some.
    let s = DynamoStore::connect_with_static_credentials(&url, "testing", "testing").await;
    s.init().await.expect("tables created");
    Arc::new(s)
}

impl Pair {
    async fn start(tweak: impl Fn(&mut Config)) -> Pair {
        let redis = Redis::start().await;
        let moto = Moto::start().await;
        let store = dynamo(&moto).await;
        let url = redis.url.clone();
        let with_redis = |c: &mut Config| {
            c.redis = Some(url.clone());
            c.redis_lease_secs = 2;
            tweak(c);
        };
        let a = start_on(tempfile::tempdir().unwrap(), Some(store.clone()), &with_redis).await;
        let key = a.dir.path().join("jwt-ed25519.pem");
        let b = start_on(tempfile::tempdir().unwrap(), Some(store), |c| {
            with_redis(c);
            c.jwt_key_file = Some(key);
        })
        .await;
        Pair { a, b, redis, _moto: moto }
    }
}

impl Pair {
    /// The owner's JWT and a room with peer `a` registered on A and `b` on B.
    async fn room_across(&self) -> (String, String, Ws, Ws) {
        let (owner, _) = self.a.signin().await;
        let (room, _) = self.a.room(&owner).await;
        let mut a = self.a.connect().await;
        a.register(register(&owner, &room, "a")).await;
        let mut b = self.b.connect().await;
        b.register(register(&owner, &room, "b")).await;
        a.recv_type("peer_joined").await;
        (owner, room, a, b)
    }
}

/// A WebSocket to `s` once it serves again (upgrades are refused while out of the cluster).
async fn reconnect(s: &TestServer) -> Ws {
    for _ in 0..100 {
        if let Ok((inner, _)) = tokio_tungstenite::connect_async(&s.ws).await {
            return Ws { inner };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} did not serve again after Redis came back", s.ws);
}

fn register(jwt: &str, room: &str, peer: &str) -> Value {
    // Everyone's presence: these tests check that presence crosses instances, whatever the role.
    json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": peer, "role": "client", "subscribe": ["*"]})
}

/// Waits for the registration's answer, whatever it is.
async fn answer(ws: &mut Ws, msg: Value) -> Value {
    ws.send(msg).await;
    ws.recv().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_flow_with_the_worker_and_the_client_on_different_instances() {
    let p = Pair::start(|_| {}).await;
    // Worker on A, client on B (and the HTTP calls on A), then the other way round.
    upstream_flow(&p.a, &p.a, &p.b).await;
    upstream_flow(&p.b, &p.b, &p.a).await;
    let remote = p.a.ok("GET", "/metrics", None, None).await;
    let text = remote.as_str().unwrap_or_default().to_owned();
    assert!(text.contains("sleap_rtc_cluster_messages_received_total"), "{text}");
}

/// Room size, peer-id ownership and the shared sign-in rate limit are decided for the cluster,
/// not per instance; a reconnect of the same principal on another instance supersedes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_peer_identity_hold_across_instances() {
    let p = Pair::start(|c| c.max_peers_per_room = 3).await;
    let (owner, _) = p.a.signin().await;
    let (room, _) = p.a.room(&owner).await;
    let (other, _) = p.b.signin().await;
    p.b.join(&owner, &other, &room).await;

    let mut p1 = p.a.connect().await;
    p1.register(register(&owner, &room, "p1")).await;
    let mut p2 = p.b.connect().await;
    let reg = p2.register(register(&owner, &room, "p2")).await;
    assert_eq!(reg["peer_list"], json!(["p1"]));
    assert_eq!(p1.recv_type("peer_joined").await["peer_id"], "p2");

    // Someone else cannot take p1's id through the other instance.
    let mut thief = p.b.connect().await;
    let e = answer(&mut thief, register(&other, &room, "p1")).await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("PEER_ID_TAKEN")), "{e}");

    let mut p3 = p.a.connect().await;
    p3.register(register(&other, &room, "p3")).await;
    // Three peers on two instances: the room is full for both.
    for side in [&p.a, &p.b] {
        let mut p4 = side.connect().await;
        let e = answer(&mut p4, register(&other, &room, "p4")).await;
        assert_eq!(e["code"], "ROOM_FULL", "{e}");
    }

    // The same principal re-registering p2 on A supersedes the connection on B.
    let mut p2_again = p.a.connect().await;
    let reg = p2_again.register(register(&owner, &room, "p2")).await;
    assert_eq!(reg["peer_id"], "p2");
    assert_eq!(p2.closed().await, 4009);
    let left = p1.recv_type("peer_left").await;
    assert_eq!(left["peer_id"], "p2");
    assert_eq!(p1.recv_type("peer_joined").await["peer_id"], "p2");
    // The new p2 is reachable from B.
    p3.send(json!({"type": "peer_message", "to_peer_id": "p2", "payload": {"n": 1}})).await;
    assert_eq!(p2_again.recv_type("peer_message").await["payload"]["n"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sign_in_rate_limit_is_shared_by_the_instances() {
    let p = Pair::start(|c| c.auth_rate_per_min = 4.0).await;
    for side in [&p.a, &p.b, &p.a, &p.b] {
        side.signin().await;
    }
    for side in [&p.a, &p.b] {
        let (status, body) = side.call("POST", "/anonymous-signin", None, None).await;
        assert_eq!(status, 429, "{body}");
    }
}

/// A sender's messages arrive in the order sent, whatever their kind, across instances; deleting
/// a room, revoking a token and removing a member on one instance act on every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_and_administrative_actions_across_instances() {
    let p = Pair::start(|c| c.rate_burst = 2_000.0).await;
    let (owner, room, mut a, mut b) = p.room_across().await;

    for i in 0..600u32 {
        if i % 100 == 50 {
            a.send(json!({"type": "update_metadata", "metadata": {"properties": {"seq": i}}})).await;
        } else {
            a.send(json!({"type": "peer_message", "to_peer_id": "b", "payload": {"seq": i}})).await;
        }
    }
    for i in 0..600u32 {
        let m = b.recv().await;
        if i % 100 == 50 {
            assert_eq!(m["type"], "metadata_updated", "{m}");
            assert_eq!(m["metadata"]["properties"]["seq"], i);
        } else {
            assert_eq!((m["type"].as_str(), &m["payload"]["seq"]), (Some("peer_message"), &json!(i)), "{m}");
        }
    }
    // The metadata is part of the replica discovery answers from.
    b.send(json!({"type": "discover_peers", "filters": {"properties": {"seq": 550}}})).await;
    assert_eq!(b.recv_type("peer_list").await["count"], 1);

    // A worker token revoked through B disconnects the worker connected to A.
    let (token, token_id) = p.b.worker_token(&owner, &room, "gpu").await;
    let mut w = p.a.connect().await;
    w.register(json!({"type": "register", "role": "worker", "api_key": token})).await;
    b.recv_type("peer_joined").await;
    let del = p.b.ok("DELETE", &format!("/api/auth/token/{token_id}"), Some(&owner), None).await;
    assert_eq!(del["disconnected"], 1, "{del}");
    assert_eq!(w.closed().await, 4003);
    assert_eq!(b.recv_type("peer_left").await["reason"], "credential revoked");

    // A member removed through A loses its peer on B.
    let (member, member_id) = p.a.signin().await;
    p.a.join(&owner, &member, &room).await;
    let mut m = p.b.connect().await;
    m.register(register(&member, &room, "m")).await;
    a.recv_type("peer_joined").await;
    p.a.ok("DELETE", &format!("/api/auth/rooms/{room}/members/{member_id}"), Some(&owner), None).await;
    assert_eq!(m.closed().await, 4003);

    // Deleting the room through A closes b on B with room_closed.
    p.a.ok("DELETE", &format!("/api/auth/rooms/{room}"), Some(&owner), None).await;
    assert_eq!(b.recv_type("room_closed").await["room_id"], room.as_str());
    assert_eq!(b.closed().await, 4004);
    assert_eq!(a.closed().await, 4004);
}

/// Redis goes away: the instance closes its peers (they reconnect) and refuses new ones; when
/// Redis is back it rejoins and serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_rejoins_after_redis_comes_back() {
    let mut p = Pair::start(|_| {}).await;
    let (owner, _) = p.a.signin().await;
    let (room, _) = p.a.room(&owner).await;
    let mut a = p.a.connect().await;
    a.register(register(&owner, &room, "a")).await;
    let port = p.redis.port;
    p.redis.kill();
    let code = a.closed().await;
    assert_eq!(code, 1001);
    // Out of the cluster: unhealthy for the load balancer, and WebSockets are refused.
    let (status, health) = p.a.call("GET", "/health", None, None).await;
    assert_eq!((status, health["cluster"].as_str()), (503, Some("unavailable")), "{health}");
    // Deleting the room now would not reach the other instance: refused, nothing changed.
    let (status, body) = p.a.call("DELETE", &format!("/api/auth/rooms/{room}"), Some(&owner), None).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("CLUSTER_UNAVAILABLE")), "{body}");
    assert!(tokio_tungstenite::connect_async(&p.a.ws).await.is_err());
    let _redis = Redis::start_on(port).await;
    // Both instances rejoin with fresh ids and an empty Redis (upgrades are refused meanwhile);
    // peers register again.
    let mut a2 = reconnect(&p.a).await;
    a2.register(register(&owner, &room, "a")).await;
    let mut b2 = reconnect(&p.b).await;
    let reg = b2.register(register(&owner, &room, "b")).await;
    assert_eq!(reg["peer_list"], json!(["a"]));
    assert_eq!(a2.recv_type("peer_joined").await["peer_id"], "b");
}

/// Redis cuts both instances' inboxes (their leases stay alive): each closes its peers and
/// rejoins under a new id, and the peers of the old ids are gone at once, not after a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_inbox_leaves_no_ghosts_after_the_rejoin() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = Pair::start(|c| c.redis_lease_secs = 30).await;
    let (owner, room, mut a, mut b) = p.room_across().await;
    let mut redis = tokio::net::TcpStream::connect(("127.0.0.1", p.redis.port)).await.unwrap();
    redis.write_all(b"*4\r\n$6\r\nCLIENT\r\n$4\r\nKILL\r\n$4\r\nTYPE\r\n$6\r\npubsub\r\n").await.unwrap();
    let mut reply = [0u8; 16];
    let n = redis.read(&mut reply).await.unwrap();
    assert_eq!(&reply[..n], b":2\r\n", "both instances' subscribers cut");
    assert_eq!(a.closed().await, 1001);
    assert_eq!(b.closed().await, 1001);
    let mut a2 = reconnect(&p.a).await;
    a2.register(register(&owner, &room, "a2")).await;
    let mut b2 = reconnect(&p.b).await;
    let reg = b2.register(register(&owner, &room, "b2")).await;
    assert_eq!(reg["peer_list"], json!(["a2"]), "peers of the old instance ids linger");
}

/// An instance with another signing key would issue JWTs the others refuse: it must not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_a_different_signing_key_refuses_to_start() {
    let p = Pair::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::local(dir.path());
    cfg.redis = Some(p.redis.url.clone());
    let err = match Server::start(cfg).await {
        Ok(_) => panic!("started with a foreign key"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("--jwt-key-file"), "{err}");
}

/// The binaries: an instance killed outright (no goodbye) has its peers leave every room within
/// about 4/3 of its lease; an instance stopped with SIGTERM takes its peers with it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_is_noticed_within_its_lease() {
    let redis = Redis::start().await;
    let moto = Moto::start().await;
    let store = format!("dynamodb://crash?endpoint={}&region=us-east-1", moto.url);
    let aws =
        [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_EC2_METADATA_DISABLED", "true")];
    let lease = 3u64;
    let lease_s = lease.to_string();
    let base = ["--store", &store, "--store-init", "--redis", &redis.url, "--redis-lease-secs", &lease_s];
    let a = ServerProcess::spawn_with(&base, "info", &aws).await;
    let key = a.dir.path().join("jwt-ed25519.pem");
    let key = key.to_str().unwrap();
    let with_key: Vec<&str> = base.iter().copied().chain(["--jwt-key-file", key]).collect();
    let b = ServerProcess::spawn_with(&with_key, "info", &aws).await;

    let (jwt, room) = a.signin_and_room().await;
    let mut pa = Ws::connect(&a.ws_url()).await;
    pa.register(register(&jwt, &room, "on-a")).await;
    let mut pb = Ws::connect(&b.ws_url()).await;
    pb.register(register(&jwt, &room, "on-b")).await;
    assert_eq!(pa.recv_type("peer_joined").await["peer_id"], "on-b");

    let killed = Instant::now();
    drop(b); // SIGKILL
    let left = loop {
        match pa.next_event(Duration::from_secs(4 * lease)).await {
            Event::Json(v) if v["type"] == "peer_left" => break v,
            Event::Json(_) => continue,
            other => panic!("no peer_left after the instance died: {other:?}"),
        }
    };
    let noticed = killed.elapsed();
    assert_eq!(left["peer_id"], "on-b");
    assert_eq!(left["reason"], "server instance lost");
    println!("crash of an instance with a {lease} s lease noticed after {:.2} s", noticed.as_secs_f64());
    pa.send(json!({"type": "discover_peers"})).await;
    assert_eq!(pa.recv_type("peer_list").await["count"], 0);

    // A graceful stop does not wait for the lease.
    let c = ServerProcess::spawn_with(&with_key, "info", &aws).await;
    let mut pc = Ws::connect(&c.ws_url()).await;
    pc.register(register(&jwt, &room, "on-c")).await;
    pa.recv_type("peer_joined").await;
    let stopped = Instant::now();
    let status = std::process::Command::new("kill").args(["-TERM", &c.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(pa.recv_type("peer_left").await["peer_id"], "on-c");
    println!("graceful stop of an instance noticed after {:.2} s", stopped.elapsed().as_secs_f64());
}

/// `rediss://`: the link is TLS, verified against the system roots (here a test CA given with
/// `SSL_CERT_FILE`); a certificate the instance cannot verify stops it at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let openssl = |args: &[&str]| {
        let ok = std::process::Command::new("openssl")
            .args(args)
            .current_dir(d)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl on PATH");
        assert!(ok.success(), "openssl {args:?}");
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-days", "2", "-subj", "/CN=sleap-rtc test CA", "-keyout", "ca.key", "-out", "ca.crt"],
        ]
        .concat(),
    );
    openssl(&[&["req"][..], &ec, &["-subj", "/CN=localhost", "-keyout", "srv.key", "-out", "srv.csr"]].concat());
    std::fs::write(d.join("ext"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext",
        "-out",
        "srv.crt",
    ]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let path = |f: &str| d.join(f).to_str().unwrap().to_owned();
    let mut cmd = std::process::Command::new("redis-server");
    cmd.args([
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .args(["--tls-cert-file", &path("srv.crt"), "--tls-key-file", &path("srv.key")])
    .args(["--tls-ca-cert-file", &path("ca.crt"), "--tls-auth-clients", "no"]);
    let mut redis = Daemon::start(cmd, "redis-server with TLS", || listening(port)).await;
    let url = format!("rediss://localhost:{port}");
    let trusted = [("SSL_CERT_FILE", path("ca.crt"))];
    let trusted: Vec<(&str, &str)> = trusted.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = ServerProcess::spawn_with(&["--redis", &url], "warn", &trusted).await;
    let health = s.json("GET", "/health", None, None).await;
    assert_eq!(health["cluster"], "joined", "{health}");
    let (jwt, room) = s.signin_and_room().await;
    let mut a = Ws::connect(&s.ws_url()).await;
    a.register(register(&jwt, &room, "a")).await;
    drop(s);

    // The same Redis, but the instance does not trust its certificate.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sleap-rtc-server"))
        .args(["--listen", "127.0.0.1:0", "--data-dir", &path("untrusting"), "--redis", &url])
        .env("SSL_CERT_FILE", path("srv.key"))
        .output()
        .unwrap();
    redis.kill();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to Redis at rediss://localhost"), "{err}");
}
