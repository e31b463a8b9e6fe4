//! Test harness: a real server on 127.0.0.1:0, real HTTP and real WebSocket clients.
#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sleap_rtc_server::{Config, Server};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

pub struct TestServer {
    pub server: Option<Server>,
    pub dir: tempfile::TempDir,
    pub http: String,
    pub ws: String,
    pub client: reqwest::Client,
}

/// The interpreter of the test venv that `scripts/test.sh` prepares (`SLEAP_RTC_TEST_PYTHON`).
/// A missing venv is a set-up error, not a pass.
pub fn python() -> String {
    if let Ok(p) = std::env::var("SLEAP_RTC_TEST_PYTHON") {
        return p;
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = format!("{home}/.cache/sleap-rtc/venv/bin/python");
    assert!(
        std::path::Path::new(&p).exists(),
        "no Python test venv: run ./scripts/test.sh once (it creates {p}) or set SLEAP_RTC_TEST_PYTHON"
    );
    p
}

pub async fn start() -> TestServer {
    start_with(|_| {}).await
}

pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir, tweak).await
}

pub async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> TestServer {
    start_on(dir, None, tweak).await
}

/// On a given storage backend (e.g. a DynamoDB store with test credentials).
pub async fn start_on(
    dir: tempfile::TempDir,
    store: Option<std::sync::Arc<dyn sleap_rtc_server::store::Store>>,
    tweak: impl FnOnce(&mut Config),
) -> TestServer {
    let mut cfg = Config::local(dir.path());
    cfg.auth_rate_per_min = 10_000.0;
    tweak(&mut cfg);
    let server = match store {
        Some(st) => Server::start_with_store(cfg, st).await,
        None => Server::start(cfg).await,
    }
    .expect("server starts");
    let addr = server.local_addrs()[0];
    TestServer {
        server: Some(server),
        dir,
        http: format!("http://{addr}"),
        ws: format!("ws://{addr}/ws"),
        client: reqwest::Client::new(),
    }
}

impl TestServer {
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        self.dir
    }

    pub async fn call(&self, method: &str, path: &str, bearer: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{}", self.http, path);
        let mut req = self.client.request(method.parse().unwrap(), url);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("http request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn ok(&self, method: &str, path: &str, bearer: Option<&str>, body: Option<Value>) -> Value {
        let (s, v) = self.call(method, path, bearer, body).await;
        assert_eq!(s, 200, "{method} {path}: {v}");
        v
    }

    /// Anonymous sign-in; returns (jwt, user_id).
    pub async fn signin(&self) -> (String, String) {
        let v = self.ok("POST", "/anonymous-signin", None, None).await;
        (v["jwt"].as_str().unwrap().to_owned(), v["user_id"].as_str().unwrap().to_owned())
    }

    /// Creates a room owned by `jwt`; returns (room_id, room_token).
    pub async fn room(&self, jwt: &str) -> (String, String) {
        let v = self.ok("POST", "/api/auth/rooms", Some(jwt), Some(json!({"name":"lab"}))).await;
        (v["room_id"].as_str().unwrap().to_owned(), v["room_token"].as_str().unwrap().to_owned())
    }

    /// Invites and joins `member_jwt` into `room`.
    pub async fn join(&self, owner_jwt: &str, member_jwt: &str, room: &str) {
        let inv = self.ok("POST", &format!("/api/auth/rooms/{room}/invite"), Some(owner_jwt), None).await;
        self.ok("POST", "/api/auth/rooms/join", Some(member_jwt), Some(json!({"invite_code": inv["invite_code"]})))
            .await;
    }

    /// A worker token for `room`; returns (secret, id).
    pub async fn worker_token(&self, jwt: &str, room: &str, name: &str) -> (String, String) {
        let v =
            self.ok("POST", "/api/auth/token", Some(jwt), Some(json!({"room_id": room, "worker_name": name}))).await;
        (v["token_id"].as_str().unwrap().to_owned(), v["id"].as_str().unwrap().to_owned())
    }

    pub async fn connect(&self) -> Ws {
        Ws::connect(&self.ws).await
    }
}

pub struct Ws {
    pub inner: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

pub const WAIT: Duration = Duration::from_secs(5);

impl Ws {
    pub async fn connect(url: &str) -> Ws {
        let (inner, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connects");
        Ws { inner }
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(v.to_string()).await;
    }

    pub async fn send_text(&mut self, s: String) {
        self.inner.send(Message::text(s)).await.expect("send");
    }

    /// Next JSON message (pings are skipped); panics after 5 s.
    pub async fn recv(&mut self) -> Value {
        match self.next_event(WAIT).await {
            Event::Json(v) => v,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Next message of type `ty`, skipping others (presence pushes and the like).
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    pub async fn next_event(&mut self, wait: Duration) -> Event {
        loop {
            match tokio::time::timeout(wait, self.inner.next()).await {
                Err(_) => return Event::Timeout,
                Ok(None) => return Event::Closed(None),
                Ok(Some(Err(e))) => return Event::Error(e.to_string()),
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Event::Json(serde_json::from_str(t.as_str()).expect("server sends JSON"));
                }
                Ok(Some(Ok(Message::Close(f)))) => return Event::Closed(f.map(|f| (f.code, f.reason.to_string()))),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Waits for the server to close this connection; returns the close code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            match self.next_event(WAIT).await {
                Event::Closed(Some((code, _))) => return u16::from(code),
                Event::Closed(None) => return 1006,
                Event::Json(_) => continue,
                other => panic!("expected close, got {other:?}"),
            }
        }
    }

    /// Asserts nothing arrives for a short while.
    pub async fn quiet(&mut self) {
        match self.next_event(Duration::from_millis(300)).await {
            Event::Timeout => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Registers and returns `registered_auth`.
    pub async fn register(&mut self, msg: Value) -> Value {
        self.send(msg).await;
        let v = self.recv().await;
        assert_eq!(v["type"], "registered_auth", "{v}");
        v
    }
}

#[derive(Debug)]
pub enum Event {
    Json(Value),
    Closed(Option<(CloseCode, String)>),
    Error(String),
    Timeout,
}

/// The upstream flow (run by `flow.rs` on one server and by `cluster.rs` with the worker and
/// the client on different instances): sign-in → room → worker registers with a token → client registers with a JWT → filtered
/// discovery → peer_message both ways → offer/answer/candidate relay → disconnect → peer_left.
/// Both register as upstream's peers do, without `subscribe`: the client follows the worker's
/// presence, the worker follows no one.
pub async fn upstream_flow(s: &TestServer, worker_side: &TestServer, client_side: &TestServer) {
    let (owner, _) = s.signin().await;
    let (room, _) = s.room(&owner).await;
    let (token, _) = s.worker_token(&owner, &room, "gpu-box").await;
    let (client_jwt, _) = s.signin().await;
    s.join(&owner, &client_jwt, &room).await;

    let mut worker = worker_side.connect().await;
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

    let mut client = client_side.connect().await;
    let reg = client
        .register(json!({"type": "register", "role": "client", "jwt": client_jwt, "room_id": room,
                         "peer_id": "laptop-1", "metadata": {"tags": ["training-client"]}}))
        .await;
    assert_eq!(reg["peer_id"], "laptop-1");
    assert_eq!(reg["peer_list"], json!([worker_id]));
    assert_eq!(reg["peer_metadata"][&worker_id]["properties"]["gpu_model"], "A5000");

    // The worker is not told of the client (workers follow no one): the next thing it receives
    // is the client's message below.

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
    let w = client_side.ok("GET", &format!("/api/rooms/{room}/workers"), Some(&client_jwt), None).await;
    assert_eq!(w["count"], 1);
    assert_eq!(w["workers"][0]["worker_name"], "gpu-box");
    assert_eq!(w["workers"][0]["peer_id"], worker_id.as_str());

    // Disconnect → peer_left, to the client that follows workers.
    drop(worker);
    let left = client.recv().await;
    assert_eq!(left["type"], "peer_left");
    assert_eq!(left["peer_id"], worker_id.as_str());
}

/// The `sleap-rtc-server` binary in its own process (so its memory can be read from /proc),
/// killed on drop.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
}

impl ServerProcess {
    pub async fn spawn(args: &[&str]) -> ServerProcess {
        Self::spawn_logging(args, "warn").await
    }

    /// With its log (stderr) at `level` in `<dir>/server.log`.
    pub async fn spawn_logging(args: &[&str], level: &str) -> ServerProcess {
        Self::spawn_with(args, level, &[]).await
    }

    /// With extra environment variables (e.g. `TOKIO_WORKER_THREADS`).
    pub async fn spawn_with(args: &[&str], level: &str, envs: &[(&str, &str)]) -> ServerProcess {
        Self::spawn_in(tempfile::tempdir().unwrap(), args, level, envs).await
    }

    /// On an existing data directory (a restart).
    pub async fn spawn_in(dir: tempfile::TempDir, args: &[&str], level: &str, envs: &[(&str, &str)]) -> ServerProcess {
        use std::io::BufRead;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.path().join("server.log")).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sleap-rtc-server"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(args)
            .env("SLEAP_RTC_LOG", level)
            .envs(envs.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start sleap-rtc-server");
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut l = String::new();
            std::io::BufReader::new(stdout).read_line(&mut l).unwrap();
            l
        })
        .await
        .unwrap();
        let Some(addr) = line.trim().strip_prefix("listening on ").map(str::to_owned) else {
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            panic!("sleap-rtc-server {args:?} did not start:\n{log}");
        };
        ServerProcess { child, addr, dir }
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The value of an unlabelled metric from `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://{}/metrics", self.addr)).await.ok()?.text().await.ok()?;
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Signs in, makes a room and registers peers `a` and `b` in it; returns (jwt, room, a, b).
    pub async fn pair(&self) -> (String, String, Ws, Ws) {
        let (jwt, room) = self.signin_and_room().await;
        let mut a = Ws::connect(&self.ws_url()).await;
        a.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "a"})).await;
        let mut b = Ws::connect(&self.ws_url()).await;
        b.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "b"})).await;
        a.recv_type("peer_joined").await;
        (jwt, room, a, b)
    }

    /// Anonymous sign-in and a room; returns (jwt, room_id).
    pub async fn signin_and_room(&self) -> (String, String) {
        let v = self.json("POST", "/anonymous-signin", None, None).await;
        let jwt = v["jwt"].as_str().unwrap().to_owned();
        let r = self.json("POST", "/api/auth/rooms", Some(&jwt), Some(json!({}))).await;
        (jwt, r["room_id"].as_str().unwrap().to_owned())
    }

    /// One HTTP call; the JSON answer.
    pub async fn json(&self, method: &str, path: &str, bearer: Option<&str>, body: Option<Value>) -> Value {
        let mut req = reqwest::Client::new().request(method.parse().unwrap(), format!("http://{}{path}", self.addr));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.expect("http request").json().await.expect("JSON answer")
    }
}

impl ServerProcess {
    /// Stops the process and hands back its data directory.
    pub fn stop(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
/// A helper process of a test (moto, redis-server), killed and reaped on drop.
pub struct Daemon(std::process::Child);

impl Daemon {
    /// Starts `cmd` with its output discarded and waits up to 10 s until `ready` says it
    /// serves; a process that never does is killed and fails the test with `what`.
    pub async fn start<F: std::future::Future<Output = bool>>(
        mut cmd: std::process::Command,
        what: &str,
        ready: impl Fn() -> F,
    ) -> Daemon {
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} (scripts/test.sh installs it): {e}"));
        let mut d = Daemon(child);
        for _ in 0..200 {
            if ready().await {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        d.kill();
        panic!("{what} did not start");
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// True once something accepts TCP connections on 127.0.0.1:`port`.
pub async fn listening(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

/// A moto server (AWS APIs, here DynamoDB) on 127.0.0.1 for one test, killed on drop.
pub struct Moto {
    _daemon: Daemon,
    pub url: String,
}

impl Moto {
    pub async fn start() -> Moto {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let mut cmd = std::process::Command::new(python());
        cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()]);
        let probe = format!("{url}/moto-api/");
        let daemon = Daemon::start(cmd, "python -m moto.server", || async { reqwest::get(&probe).await.is_ok() }).await;
        Moto { _daemon: daemon, url }
    }
}

/// A redis-server on 127.0.0.1 (Debian's package; `scripts/test.sh` installs it) for one test,
/// without persistence, killed on drop.
pub struct Redis {
    daemon: Daemon,
    pub port: u16,
    pub url: String,
}

impl Redis {
    pub async fn start() -> Redis {
        Self::start_on(free_port()).await
    }

    /// On a given port (a restart where the servers expect it).
    pub async fn start_on(port: u16) -> Redis {
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"]);
        let daemon = Daemon::start(cmd, "redis-server", || listening(port)).await;
        Redis { daemon, port, url: format!("redis://127.0.0.1:{port}") }
    }

    pub fn kill(&mut self) {
        self.daemon.kill();
    }
}
