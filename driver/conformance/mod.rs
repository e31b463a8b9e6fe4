//! The runtime conformance suite: one set of cases, generic over [`Runtime`], that every runtime
//! crate runs against real parts — an in-process signaling server on 127.0.0.1 over real
//! WebSockets, real UDP/ICE/DTLS/SCTP between two peers on loopback, real files, and for the job
//! case the worker of sleap-rtc-tokio driving the fake sleap-nn fixture (`cli/tests/fixtures`).
//!
//! A runtime crate includes this file from an integration test and instantiates it:
//!
//! ```ignore
//! #[path = "../../driver/conformance/mod.rs"]
//! mod conformance;
//! conformance::suite!(sleap_rtc_smol::Smol, smol::block_on);
//! ```
//!
//! The fixtures (server, worker) are tokio programs and run on the suite's own tokio runtime, on
//! its own threads; the code under test (every `SignalingClient<R>`, `PeerConnection<R>`,
//! `JobClient<R>`) runs under `$block_on` with `R`'s executor, timers and sockets only.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sleap_rtc_core::job::{JobMsg, JobState, Progress};
use sleap_rtc_core::signal::{Filters, Register, ServerMessage};
use sleap_rtc_driver::client::{ClientAuth, JobClient};
use sleap_rtc_driver::conn::{self, ConnState, PeerConnection, PeerOptions};
use sleap_rtc_driver::signaling::SignalingClient;
use sleap_rtc_driver::{Runtime, timeout};

// Shared with runtime-tokio's older tests (`tests/common`).
mod data;
use data::write_random;

/// Instantiates every case as a `#[test]` for runtime `$rt`, each run to completion by
/// `$block_on` (a function from a future to its output).
macro_rules! suite {
    ($rt:ty, $block_on:path) => {
        #[test]
        fn conformance_signaling_flow() {
            let env = conformance::Env::start();
            $block_on(conformance::signaling_flow::<$rt>(&env));
        }
        #[test]
        fn conformance_peer_connection() {
            let env = conformance::Env::start();
            $block_on(conformance::peer_connection::<$rt>(&env));
        }
        #[test]
        fn conformance_file_and_directory_transfer() {
            let env = conformance::Env::start();
            $block_on(conformance::file_and_directory_transfer::<$rt>(&env));
        }
        #[test]
        fn conformance_resume_after_a_cut() {
            let env = conformance::Env::start();
            $block_on(conformance::resume_after_a_cut::<$rt>(&env));
        }
        #[test]
        fn conformance_job_end_to_end() {
            let mut env = conformance::Env::start();
            env.start_worker();
            $block_on(conformance::job_end_to_end::<$rt>(&env));
        }
    };
}
pub(crate) use suite;

/// A bound on every wait, so a broken runtime fails a case instead of hanging CI.
const WAIT: Duration = Duration::from_secs(30);

/// The fixtures: a signaling server with a signed-in user, a room and a worker token.
pub struct Env {
    fixtures: tokio::runtime::Runtime,
    server: Option<sleap_rtc_server::Server>,
    dir: tempfile::TempDir,
    pub ws: String,
    pub jwt: String,
    pub room: String,
    pub token: String,
    worker: Option<(Arc<sleap_rtc_tokio::worker::Worker>, tokio::sync::oneshot::Sender<()>)>,
}

impl Env {
    pub fn start() -> Env {
        let fixtures = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime for the fixtures");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut cfg = sleap_rtc_server::Config::local(dir.path().join("server"));
        cfg.auth_rate_per_min = 1e6;
        let (server, jwt, room, token) = fixtures.block_on(async {
            let server = sleap_rtc_server::Server::start(cfg).await.expect("the signaling server starts");
            let base = format!("http://{}", server.local_addrs()[0]);
            let http = reqwest::Client::new();
            let post = |path: &str, jwt: Option<&str>, body: Value| {
                let mut r = http.post(format!("{base}{path}")).json(&body);
                if let Some(j) = jwt {
                    r = r.bearer_auth(j);
                }
                async move { r.send().await.expect("the server answers").json::<Value>().await.expect("JSON") }
            };
            let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}")).to_owned();
            let jwt = s(&post("/anonymous-signin", None, json!({})).await, "jwt");
            let room = s(&post("/api/auth/rooms", Some(&jwt), json!({})).await, "room_id");
            let token = s(
                &post("/api/auth/token", Some(&jwt), json!({"room_id": room, "worker_name": "gpu"})).await,
                "token_id",
            );
            (server, jwt, room, token)
        });
        let ws = format!("ws://{}/ws", server.local_addrs()[0]);
        Env { fixtures, server: Some(server), dir, ws, jwt, room, token, worker: None }
    }

    /// Starts sleap-rtc-tokio's worker, driving the fake sleap-nn, on the fixtures' runtime.
    pub fn start_worker(&mut self) {
        let fake = self.dir.path().join("sleap-nn");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/tests/fixtures/fake_sleap_nn.py");
        std::fs::write(&fake, format!("#!/bin/sh\nexec '{}' '{}' \"$@\"\n", python(), script.display()))
            .expect("write the fake sleap-nn");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("make it executable");
        let mut cfg =
            sleap_rtc_tokio::worker::WorkerConfig::new(&self.ws, &self.token, &self.dir.path().join("worker"), &fake);
        cfg.peer = sleap_rtc_tokio::PeerOptions::loopback();
        cfg.device = "cpu".into();
        let worker = self.fixtures.block_on(sleap_rtc_tokio::worker::Worker::new(cfg)).expect("the worker starts");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let w = worker.clone();
        self.fixtures.spawn(async move {
            let _ = w
                .run(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        self.worker = Some((worker, stop));
    }

    /// Registered with the worker token.
    pub async fn worker<R: Runtime>(&self) -> SignalingClient<R> {
        let reg = Register { role: Some("worker".into()), api_key: Some(self.token.clone()), ..Default::default() };
        SignalingClient::connect(&self.ws, reg).await.expect("the worker registers")
    }

    /// Registered with the user's JWT.
    pub async fn client<R: Runtime>(&self) -> SignalingClient<R> {
        let reg = Register {
            role: Some("client".into()),
            jwt: Some(self.jwt.clone()),
            room_id: Some(self.room.clone()),
            ..Default::default()
        };
        SignalingClient::connect(&self.ws, reg).await.expect("the client registers")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some((_, stop)) = self.worker.take() {
            let _ = stop.send(());
        }
        if let Some(s) = self.server.take() {
            self.fixtures.block_on(s.shutdown());
        }
    }
}

/// Python with pyzmq (scripts/test.sh makes a venv and exports SLEAP_RTC_TEST_PYTHON).
fn python() -> String {
    if let Ok(p) = std::env::var("SLEAP_RTC_TEST_PYTHON") {
        return p;
    }
    let venv = format!("{}/.cache/sleap-rtc/venv/bin/python", std::env::var("HOME").unwrap_or_default());
    if Path::new(&venv).exists() { venv } else { "python3".into() }
}

async fn within<R: Runtime, T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    timeout::<R, _>(WAIT, f).await.unwrap_or_else(|_| panic!("{what}: no result within {WAIT:?}"))
}

/// Waits for the next `offer` on a signaling connection.
async fn next_offer<R: Runtime>(sig: &SignalingClient<R>) -> ServerMessage {
    loop {
        let ev = within::<R, _>("an offer", sig.next_event()).await.expect("signaling stays open");
        if let ServerMessage::Offer(_) = ev.msg {
            return ev.msg;
        }
    }
}

/// `from` offers a loopback connection to `to`, which accepts it.
async fn pair<R: Runtime>(
    from: &SignalingClient<R>,
    to: &SignalingClient<R>,
) -> (PeerConnection<R>, PeerConnection<R>) {
    let (a, b) = join(conn::connect(from, to.peer_id(), PeerOptions::loopback()), async {
        let offer = next_offer(to).await;
        conn::accept(to, &offer, PeerOptions::loopback()).await
    })
    .await;
    (a.expect("the offerer connects"), b.expect("the answerer connects"))
}

/// Both futures to completion, concurrently, on whatever executor polls the result.
async fn join<A: std::future::Future, B: std::future::Future>(a: A, b: B) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Register (worker token and user JWT), discovery with a filter, metadata updates seen by
/// discovery, a peer message relayed, and a refused request reported as such.
pub async fn signaling_flow<R: Runtime>(env: &Env) {
    let worker = env.worker::<R>().await;
    let client = env.client::<R>().await;
    assert_eq!(client.registered().room_id, env.room);
    assert!(!worker.peer_id().is_empty() && worker.peer_id() != client.peer_id());
    worker.update_metadata(json!({"properties": {"status": "available"}})).await.expect("metadata update");
    let found = client.discover(Filters { role: Some("worker".into()), ..Default::default() }).await.expect("discover");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].peer_id, worker.peer_id());
    assert_eq!(found[0].metadata["properties"]["status"], "available", "{:?}", found[0]);

    client
        .send(json!({"type": "peer_message", "to_peer_id": worker.peer_id(), "payload": {"hello": 1}}))
        .expect("send");
    let got = within::<R, _>("the peer message", async {
        loop {
            match worker.next_event().await.map(|e| e.msg) {
                Some(ServerMessage::PeerMessage { from_peer_id, payload, .. }) => return (from_peer_id, payload),
                Some(_) => {}
                None => panic!("signaling closed"),
            }
        }
    })
    .await;
    assert_eq!(got, (client.peer_id().to_owned(), json!({"hello": 1})));

    let refused = client.request(json!({"type": "peer_message", "to_peer_id": "nobody", "payload": {}})).await;
    assert!(refused.is_err(), "a message to an unknown peer is refused: {refused:?}");
}

/// Offer/answer through the server, ICE/DTLS/SCTP over loopback UDP, fingerprints, control
/// messages both ways, and a close the other side notices.
pub async fn peer_connection<R: Runtime>(env: &Env) {
    let worker_sig = env.worker::<R>().await;
    let client_sig = env.client::<R>().await;
    let (client, worker) = pair(&client_sig, &worker_sig).await;
    assert_eq!(worker.remote_peer(), client_sig.peer_id());
    assert!(client.local_fingerprint().starts_with("sha-256 "));
    assert_eq!(worker.remote_fingerprint().as_deref(), Some(client.local_fingerprint()));
    assert_eq!(client.remote_fingerprint().as_deref(), Some(worker.local_fingerprint()));
    assert!(matches!(client.state(), ConnState::Open { .. }));

    client.send_message(&json!({"type": "job_submit", "job": 1})).expect("send");
    let m: Value =
        serde_json::from_str(&within::<R, _>("ctl c→w", worker.recv_message()).await.expect("open")).expect("JSON");
    assert_eq!(m["job"], 1);
    worker.send_message(&json!({"type": "job_accepted"})).expect("send");
    assert!(within::<R, _>("ctl w→c", client.recv_message()).await.expect("open").contains("job_accepted"));
    assert!(client.send_message(&json!({"blob": "y".repeat(100_000)})).is_err(), "oversized ctl refused");

    client.close().await;
    within::<R, _>("the worker sees the close", worker.closed()).await;
    assert_eq!(worker.state(), ConnState::Closed);
}

/// One file and one directory (with an empty file), client → worker, verified byte for byte
/// with no `.part` left; then a directory back, worker → client.
pub async fn file_and_directory_transfer<R: Runtime>(env: &Env) {
    let worker_sig = env.worker::<R>().await;
    let client_sig = env.client::<R>().await;
    let (client, worker) = pair(&client_sig, &worker_sig).await;
    let src = tempfile::tempdir().expect("tempdir");
    write_random(&src.path().join("labels.pkg.slp"), 2_000_000, 7);
    std::fs::create_dir_all(src.path().join("cfg/sub")).expect("mkdir");
    std::fs::write(src.path().join("cfg/config.yaml"), b"trainer: {}\n").expect("write");
    std::fs::write(src.path().join("cfg/sub/empty"), b"").expect("write");
    let dst = tempfile::tempdir().expect("tempdir");
    let incoming = worker.receive_files(dst.path()).expect("receive");
    let sent = client.send_files(&[src.path().join("labels.pkg.slp"), src.path().join("cfg")]).await.expect("send");
    let (sent, received) = within::<R, _>("the upload", join(sent.finish(), incoming.finish())).await;
    let (sent, received) = (sent.expect("sent"), received.expect("received"));
    assert!(sent.failed.is_empty() && received.failed.is_empty(), "{sent:?} {received:?}");
    assert_eq!((sent.bytes, sent.resumed_bytes), (2_000_000 + 12, 0));
    assert_eq!(received.files.len(), 3);
    for rel in ["labels.pkg.slp", "cfg/config.yaml", "cfg/sub/empty"] {
        assert_eq!(read(&src.path().join(rel)), read(&dst.path().join(rel)), "{rel}");
    }
    assert!(!dst.path().join("labels.pkg.slp.part").exists());

    let run = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(run.path().join("run1")).expect("mkdir");
    write_random(&run.path().join("run1/best.ckpt"), 700_000, 9);
    std::fs::write(run.path().join("run1/training_config.yaml"), b"x: 1\n").expect("write");
    let back = tempfile::tempdir().expect("tempdir");
    let incoming = client.receive_files(back.path()).expect("receive");
    let sent = worker.send_files(&[run.path().join("run1")]).await.expect("send");
    let (s, r) = within::<R, _>("the results", join(sent.finish(), incoming.finish())).await;
    assert!(s.expect("sent").failed.is_empty());
    let r = r.expect("received");
    let mut names: Vec<PathBuf> = r.files.iter().map(|f| f.strip_prefix(back.path()).unwrap_or(f).to_owned()).collect();
    names.sort();
    assert_eq!(names, [PathBuf::from("run1/best.ckpt"), PathBuf::from("run1/training_config.yaml")]);
    assert_eq!(read(&run.path().join("run1/best.ckpt")), read(&back.path().join("run1/best.ckpt")));
    client.close().await;
}

/// A connection cut mid-transfer leaves the receiver's `.part`; the same file sent on a new
/// connection continues from it and verifies.
pub async fn resume_after_a_cut<R: Runtime>(env: &Env) {
    const SIZE: usize = 16 * 1024 * 1024;
    const CUT_AFTER: u64 = 2 * 1024 * 1024;
    let worker_sig = env.worker::<R>().await;
    let client_sig = env.client::<R>().await;
    let src = tempfile::tempdir().expect("tempdir");
    let file = src.path().join("big.bin");
    write_random(&file, SIZE, 3);
    let dst = tempfile::tempdir().expect("tempdir");
    {
        let (client, worker) = pair(&client_sig, &worker_sig).await;
        let mut incoming = worker.receive_files(dst.path()).expect("receive");
        let _sent = client.send_files(std::slice::from_ref(&file)).await.expect("send");
        within::<R, _>("the first MiBs", incoming.progress.wait_for(|p| p.acked_bytes >= CUT_AFTER))
            .await
            .expect("progress");
        drop(client); // the cut: the client's driver stops, its sockets close
        let r = within::<R, _>("the receiver notices", incoming.finish()).await;
        assert!(r.is_err(), "the first attempt cannot complete: {r:?}");
        worker.close().await;
    }
    let held = std::fs::metadata(dst.path().join("big.bin.part")).expect(".part kept after the cut").len();
    assert!((CUT_AFTER..SIZE as u64).contains(&held), "held {held}");

    let (client, worker) = pair(&client_sig, &worker_sig).await;
    let incoming = worker.receive_files(dst.path()).expect("receive");
    let sent = client.send_files(std::slice::from_ref(&file)).await.expect("send");
    let (s, r) = within::<R, _>("the resumed transfer", join(sent.finish(), incoming.finish())).await;
    assert_eq!(s.expect("sent").resumed_bytes, held, "the sender continued from the receiver's .part");
    assert!(r.expect("received").failed.is_empty());
    assert_eq!(read(&file), read(&dst.path().join("big.bin")));
    client.close().await;
}

/// Waits until the worker started by [`Env::start_worker`] is registered; returns its peer id.
pub async fn wait_for_worker<R: Runtime>(sig: &SignalingClient<R>, env: &Env) -> String {
    let worker_id = env.worker.as_ref().map(|(w, _)| w.peer_id().to_owned()).expect("start_worker first");
    within::<R, _>("the worker registers", async {
        loop {
            let found = sig.discover(Filters::default()).await.unwrap_or_default();
            if found.iter().any(|p| p.peer_id == worker_id) {
                return;
            }
            R::sleep_until(std::time::Instant::now() + Duration::from_millis(50)).await;
        }
    })
    .await;
    worker_id
}

/// The bundled training config and labels (`cli/assets`).
pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/assets")
}

/// A training job through `JobClient<R>`: ticket authentication, submission with an upload, the
/// fake trainer's progress relayed, `job_done` completed, the run directory received.
pub async fn job_end_to_end<R: Runtime>(env: &Env) {
    let sig = env.client::<R>().await;
    let worker_id = wait_for_worker(&sig, env).await;
    let client = JobClient::connect(&sig, &worker_id, PeerOptions::loopback(), &ClientAuth::Ticket)
        .await
        .expect("connect and authenticate");
    let assets = assets();
    let config = std::fs::read_to_string(assets.join("tiny_single.yaml")).expect("the bundled config");
    let spec = json!({
        "type": "train",
        "labels_path": "labels.pkg.slp",
        "config_contents": [config],
        "max_epochs": 2,
        "run_name": "conformance",
    });
    let (job_id, upload) = client.submit(&spec, &[assets.join("labels.pkg.slp")]).await.expect("accepted");
    let upload = upload.expect("the labels are uploaded");
    assert!(within::<R, _>("the upload", upload.finish()).await.expect("uploaded").failed.is_empty());
    let (status, epochs) = within::<R, _>("job_done", async {
        let mut epochs = 0;
        loop {
            match client.next().await {
                Some(JobMsg::JobProgress { progress: Progress::EpochEnd { .. }, .. }) => epochs += 1,
                Some(JobMsg::JobDone { status }) => return (status, epochs),
                Some(_) => {}
                None => panic!("the connection closed before job_done"),
            }
        }
    })
    .await;
    assert_eq!(status.job_id, job_id);
    assert_eq!(status.state, JobState::Completed, "{status:?}");
    assert_eq!(epochs, 2, "every epoch's progress was relayed");
    let out = tempfile::tempdir().expect("tempdir");
    let results = client.receive_results(out.path()).expect("receive");
    let got = within::<R, _>("the results", results.finish()).await.expect("results");
    assert!(got.failed.is_empty(), "{got:?}");
    assert!(out.path().join("conformance/best.ckpt").is_file(), "{:?}", got.files);
    client.close().await;
}
