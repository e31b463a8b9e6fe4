//! End-to-end set-up: a real signaling server (in this process, on 127.0.0.1:0), a real
//! `sleap-rtc worker` process driving the fake sleap-nn (`fixtures/fake_sleap_nn.py`, which speaks
//! sleap-nn's CLI, ZMQ and output layout), and real `sleap-rtc` client processes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_sleap-rtc");

/// Python with pyzmq (scripts/test.sh makes a venv and exports SLEAP_RTC_TEST_PYTHON).
pub fn python() -> String {
    if let Ok(p) = std::env::var("SLEAP_RTC_TEST_PYTHON") {
        return p;
    }
    let venv = format!("{}/.cache/sleap-rtc/venv/bin/python", std::env::var("HOME").unwrap_or_default());
    if Path::new(&venv).exists() { venv } else { "python3".into() }
}

pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_sleap_nn.py")
}

pub fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets").join(name)
}

pub struct Env {
    pub server: Option<sleap_rtc_server::Server>,
    pub dir: tempfile::TempDir,
    pub url: String,
    pub jwt: String,
    pub room: String,
    pub token: String,
    /// A `sleap-nn` executable running the fixture.
    pub fake: PathBuf,
}

pub async fn env() -> Env {
    env_with(|_, _| {}).await
}

/// Like [`env`], with the server's config changed first (given the test's temp dir).
pub async fn env_with(tweak: impl FnOnce(&mut sleap_rtc_server::Config, &Path)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sleap_rtc_server::Config::local(dir.path().join("server"));
    cfg.auth_rate_per_min = 1e6;
    tweak(&mut cfg, dir.path());
    let server = sleap_rtc_server::Server::start(cfg).await.unwrap();
    let url = format!("http://{}", server.local_addrs()[0]);
    let http = reqwest::Client::new();
    let post = |path: &str, jwt: Option<&str>, body: Value| {
        let mut r = http.post(format!("{url}{path}")).json(&body);
        if let Some(j) = jwt {
            r = r.bearer_auth(j);
        }
        async move { r.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let jwt = post("/anonymous-signin", None, json!({})).await["jwt"].as_str().unwrap().to_owned();
    let room =
        post("/api/auth/rooms", Some(&jwt), json!({"name": "e2e"})).await["room_id"].as_str().unwrap().to_owned();
    let token = post("/api/auth/token", Some(&jwt), json!({"room_id": room, "worker_name": "w"})).await["token_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let fake = dir.path().join("sleap-nn");
    std::fs::write(&fake, format!("#!/bin/sh\nexec '{}' '{}' \"$@\"\n", python(), fixture().display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    Env { server: Some(server), dir, url, jwt, room, token, fake }
}

impl Env {
    /// Stops the signaling server, waits `down`, and starts it again on the same address with the
    /// same data (users, rooms, tokens, signing key).
    pub async fn restart_server(&mut self, down: Duration) {
        let old = self.server.take().expect("server running");
        let addr = old.local_addrs()[0];
        old.shutdown().await;
        tokio::time::sleep(down).await;
        let mut cfg = sleap_rtc_server::Config::local(self.dir.path().join("server"));
        cfg.auth_rate_per_min = 1e6;
        cfg.listen = vec![addr];
        self.server = Some(sleap_rtc_server::Server::start(cfg).await.unwrap());
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A `sleap-rtc` command with this test's own config and data directories.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("SLEAP_RTC_CONFIG_DIR", self.path("cfg"))
            .env("SLEAP_RTC_DATA_HOME", self.path("data"))
            .env("SLEAP_RTC_SERVER", &self.url)
            .env("SLEAP_RTC_ROOM", &self.room)
            .env("SLEAP_RTC_JWT", &self.jwt)
            .env_remove("SLEAP_RTC_ROOM_SECRET")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    /// Like [`Env::cmd`], run in the network namespace `netns` (`ip netns exec`).
    pub fn cmd_in(&self, netns: &str, args: &[&str]) -> Command {
        let mut c = self.cmd(args);
        let std = c.as_std_mut();
        let mut ns = std::process::Command::new("ip");
        ns.args(["netns", "exec", netns, BIN]).args(args);
        for (k, v) in std.get_envs() {
            match v {
                Some(v) => ns.env(k, v),
                None => ns.env_remove(k),
            };
        }
        let mut c = Command::from(ns);
        c.stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    /// Starts a worker process on `work_dir` and waits until the room sees it.
    pub async fn worker(&self, work_dir: &str, extra: &[&str], fake_env: &str) -> Child {
        let wd = self.path(work_dir);
        let mut args = vec!["worker", "--token", &self.token, "--bind", "127.0.0.1", "--cancel-grace", "2"];
        let wd_s = wd.display().to_string();
        let fake = self.fake.display().to_string();
        args.extend(["--work-dir", &wd_s, "--sleap-nn", &fake]);
        args.extend(extra);
        let log = std::fs::File::create(self.path(&format!("{work_dir}.log"))).unwrap();
        let mut c = self.cmd(&args);
        c.env("FAKE_SLEAP_NN", fake_env).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(log);
        let child = c.spawn().unwrap();
        for _ in 0..400 {
            let id = self.worker_id(&wd);
            if !id.is_empty() && self.worker_ids().await.contains(&id) {
                return child;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "worker did not register; log:\n{}",
            std::fs::read_to_string(self.path(&format!("{work_dir}.log"))).unwrap_or_default()
        );
    }

    /// Waits until the room no longer lists `id`.
    pub async fn wait_gone(&self, id: &str) {
        for _ in 0..200 {
            if !self.worker_ids().await.iter().any(|w| w == id) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("worker {id} still listed");
    }

    pub fn worker_id(&self, wd: &Path) -> String {
        std::fs::read_to_string(wd.join("worker-id")).unwrap_or_default().trim().to_owned()
    }

    pub async fn worker_ids(&self) -> Vec<String> {
        let r = reqwest::Client::new()
            .get(format!("{}/api/rooms/{}/workers", self.url, self.room))
            .bearer_auth(&self.jwt)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        r["workers"].as_array().into_iter().flatten().filter_map(|w| w["peer_id"].as_str().map(str::to_owned)).collect()
    }

    /// The worker's status as the room sees it.
    pub async fn worker_status(&self, id: &str) -> Option<String> {
        let r = reqwest::Client::new()
            .get(format!("{}/api/rooms/{}/workers", self.url, self.room))
            .bearer_auth(&self.jwt)
            .send()
            .await
            .ok()?
            .json::<Value>()
            .await
            .ok()?;
        r["workers"].as_array()?.iter().find(|w| w["peer_id"] == id).and_then(|w| {
            w["metadata"]["properties"]["status"].as_str().or(w["properties"]["status"].as_str()).map(str::to_owned)
        })
    }

    /// A training config: the bundled one plus fixture behaviour markers.
    pub fn config(&self, name: &str, markers: &str) -> PathBuf {
        let p = self.path(name);
        let mut text = std::fs::read_to_string(asset("tiny_single.yaml")).unwrap();
        if !markers.is_empty() {
            text.push_str(&format!("# fake-sleap-nn: {markers}\n"));
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `sleap-rtc track` of the bundled labels with `model` (a run directory or a registry
    /// reference), writing to `out` (a path), with `--json` events.
    pub fn track_args(&self, model: &str, out: &Path) -> Vec<String> {
        let data = asset("labels.pkg.slp");
        ["track", "--model", model, "--data", data.to_str().unwrap_or_default(), "-o"]
            .iter()
            .map(|s| s.to_string())
            .chain([out.display().to_string(), "--bind".into(), "127.0.0.1".into(), "--json".into()])
            .collect()
    }

    pub fn train_args(&self, cfg: &Path, out: &str) -> Vec<String> {
        vec![
            "train".into(),
            "--config".into(),
            cfg.display().to_string(),
            "--labels".into(),
            asset("labels.pkg.slp").display().to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--json".into(),
            "-o".into(),
            self.path(out).display().to_string(),
        ]
    }
}

/// A running client whose `--json` events are read line by line.
pub struct Client {
    pub child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    pub events: Vec<Value>,
}

impl Client {
    pub fn spawn(env: &Env, args: &[String]) -> Client {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Client::spawn_cmd(env.cmd(&args))
    }

    /// Runs a prepared command (e.g. [`Env::cmd_in`]) as a client.
    pub fn spawn_cmd(mut c: Command) -> Client {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        Client { child, lines: BufReader::new(out).lines(), events: vec![] }
    }

    /// Reads events until one matches; panics after `secs`.
    pub async fn until(&mut self, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no matching event within {secs} s; got {:#?}", self.events));
            let Some(line) = line.unwrap() else {
                panic!("client exited before a matching event; got {:#?}", self.events)
            };
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
            self.events.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }

    /// Reads the remaining events and the exit code.
    pub async fn finish(mut self, secs: u64) -> (i32, Vec<Value>, String) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while let Ok(Ok(Some(line))) = tokio::time::timeout_at(deadline, self.lines.next_line()).await {
            if let Ok(v) = serde_json::from_str(&line) {
                self.events.push(v);
            }
        }
        let status = tokio::time::timeout_at(deadline, self.child.wait()).await.expect("client did not exit").unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_string(&mut err).await;
        }
        (status.code().unwrap_or(-1), self.events, err)
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc_kill(pid, sig);
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub const SIGINT: i32 = 2;
pub const SIGKILL: i32 = 9;

pub fn event<'a>(events: &'a [Value], name: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["event"] == name)
}

pub fn done(events: &[Value]) -> &Value {
    events.iter().rev().find(|e| e["event"] == "done").unwrap_or_else(|| panic!("no done event in {events:#?}"))
}

pub fn is_epoch_end(v: &Value) -> bool {
    v["event"] == "progress" && v["progress"]["event"] == "epoch_end"
}

/// A raw signaling client in the room (the attacker's starting point: any room member has one).
pub async fn signaling_client(env: &Env) -> sleap_rtc_tokio::SignalingClient {
    let reg = sleap_rtc_core::signal::Register {
        role: Some("client".into()),
        room_id: Some(env.room.clone()),
        jwt: Some(env.jwt.clone()),
        ..Default::default()
    };
    sleap_rtc_tokio::SignalingClient::connect(&format!("{}/ws", env.url.replace("http://", "ws://")), reg)
        .await
        .expect("signaling connect")
}

/// The next control message from the worker; `None` once the connection is closed.
pub async fn next_ctl(c: &sleap_rtc_tokio::PeerConnection) -> Option<Value> {
    let t = tokio::time::timeout(Duration::from_secs(15), c.recv_message()).await.expect("no message in 15 s")?;
    Some(serde_json::from_str(&t).expect("worker sends JSON"))
}

/// A data channel to worker `wid` that has proven room membership with a genuine ticket: what
/// a hostile room member holds.
pub async fn authed_connection(sig: &sleap_rtc_tokio::SignalingClient, wid: &str) -> sleap_rtc_tokio::PeerConnection {
    let c = sleap_rtc_tokio::connect(sig, wid, sleap_rtc_tokio::PeerOptions::loopback()).await.expect("connect");
    let fp = c.local_fingerprint().to_owned();
    let reply = sig.request(json!({"type": "request_ticket", "target": wid, "fingerprint": fp})).await.unwrap().msg;
    let sleap_rtc_core::signal::ServerMessage::PeerTicket { ticket } = reply else { panic!("no ticket: {reply:?}") };
    c.send_message(&json!({"type": "auth_ticket", "ticket": ticket})).unwrap();
    let m = next_ctl(&c).await.expect("auth reply");
    assert_eq!(m["type"], "auth_ok", "{m}");
    c
}
