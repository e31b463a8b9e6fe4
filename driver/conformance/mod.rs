//! The runtime conformance suite: one set of cases, generic over [`Runtime`], that every runtime
//! crate runs against real parts — an in-process signaling server on 127.0.0.1 over real
//! WebSockets, real UDP/ICE/DTLS/SCTP between two peers on loopback, real files, and for the job
//! cases a worker on the runtime under test driving the fake sleap-nn fixture
//! (`cli/tests/fixtures`) as a real child process, with a real directory registry.
//!
//! A runtime crate includes this file from an integration test and instantiates it:
//!
//! ```ignore
//! #[path = "../../driver/conformance/mod.rs"]
//! mod conformance;
//! conformance::suite!(sleap_rtc_smol::Smol, smol::block_on);
//! ```
//!
//! The signaling server is a tokio program and runs on the suite's own tokio runtime, on its own
//! threads; the code under test (every `SignalingClient<R>`, `PeerConnection<R>`, `JobClient<R>`,
//! `Worker<R>`, `LocalStore<R>`) runs under `$block_on` with `R`'s executor, timers, sockets and
//! processes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use sleap_rtc_core::job::{JobMsg, JobState, Progress, Stream};
use sleap_rtc_core::signal::{Filters, Register, ServerMessage};
use sleap_rtc_driver::client::{ClientAuth, JobClient};
use sleap_rtc_driver::conn::{self, ConnState, PeerConnection, PeerOptions};
use sleap_rtc_driver::registry::{self, LocalStore, Store};
use sleap_rtc_driver::signaling::SignalingClient;
use sleap_rtc_driver::worker::{Worker, WorkerConfig};
use sleap_rtc_driver::{ChildProcess, Runtime, timeout};

// Shared with runtime-tokio's older tests (`tests/common`).
mod data;
use data::write_random;

/// Instantiates every case as a `#[test]` (named after the case) for runtime `$rt`, each on a
/// fresh [`Env`] and run to completion by `$block_on` (a function from a future to its output).
macro_rules! suite {
    ($rt:ty, $block_on:path) => {
        conformance::suite!(@cases $rt, $block_on;
            signaling_flow, peer_connection, file_and_directory_transfer, resume_after_a_cut,
            job_end_to_end, job_stop_and_cancel, job_client_keeps_what_it_did_not_wait_for,
            registry_store, child_processes);
    };
    (@cases $rt:ty, $block_on:path; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let env = conformance::Env::start();
                $block_on(conformance::$case::<$rt>(&env));
            }
        )*
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
}

/// A running [`Worker`]; stopped (its job cancelled) when dropped.
pub struct RunningWorker {
    pub peer_id: String,
    /// The worker's model registry (a directory).
    pub registry: PathBuf,
    _stop: tokio::sync::oneshot::Sender<()>,
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
            let (jwt, room, token) = data::sign_in(&format!("http://{}", server.local_addrs()[0])).await;
            (server, jwt, room, token)
        });
        let ws = format!("ws://{}/ws", server.local_addrs()[0]);
        Env { fixtures, server: Some(server), dir, ws, jwt, room, token }
    }

    /// Starts a [`Worker`] on `R` (its tasks on `R`'s executor, sleap-nn through
    /// `R::spawn_process`), driving the fake sleap-nn, with a directory registry.
    pub async fn start_worker<R: Runtime>(&self) -> RunningWorker {
        let fake = self.dir.path().join("sleap-nn");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/tests/fixtures/fake_sleap_nn.py");
        // Not `exec`: the trainer is then a member of the process group, not its leader, and a
        // cancel reaches it only if the whole group is signalled.
        std::fs::write(&fake, format!("#!/bin/sh\n'{}' '{}' \"$@\"\n", python(), script.display()))
            .expect("write the fake sleap-nn");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("make it executable");
        // The job cases against the real trainer, by hand (CI does not install it, ~7 GB):
        // SLEAP_RTC_CONFORMANCE_SLEAP_NN=~/.cache/sleap-rtc/sleap-nn-venv/bin/sleap-nn cargo test ...
        let program = std::env::var_os("SLEAP_RTC_CONFORMANCE_SLEAP_NN").map(PathBuf::from).unwrap_or(fake);
        let registry = self.dir.path().join("registry");
        let mut cfg = WorkerConfig::new(&self.ws, &self.token, &self.dir.path().join("worker"), &program);
        cfg.peer = PeerOptions::loopback();
        cfg.device = "cpu".into();
        cfg.registry = Some(registry.display().to_string());
        let worker = Worker::<R>::new(cfg).await.expect("the worker starts");
        assert!(worker.capabilities().sleap_nn_version.is_some(), "`sleap-nn --version` ran through R's processes");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let w = worker.clone();
        R::spawn(async move {
            let _ = w
                .run(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        RunningWorker { peer_id: worker.peer_id().to_owned(), registry, _stop: stop }
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
    const CUT_AFTER: u64 = 2 * 1024 * 1024;
    // Well past the cut point plus what can be in flight then (a 16 MiB bulk window and a
    // 16 MiB receive window), so the cut always lands mid-file: at 16 MiB the whole file was
    // sometimes written before the drop.
    const SIZE: usize = 48 * 1024 * 1024;
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
pub async fn wait_for_worker<R: Runtime>(sig: &SignalingClient<R>, worker: &RunningWorker) -> String {
    let worker_id = worker.peer_id.clone();
    within::<R, _>("the worker registers", async {
        loop {
            let found = sig.discover(Filters::default()).await.unwrap_or_default();
            if found.iter().any(|p| p.peer_id == worker_id) {
                return;
            }
            sleap_rtc_driver::sleep::<R>(Duration::from_millis(50)).await;
        }
    })
    .await;
    worker_id
}

/// The bundled training config and labels (`cli/assets`).
pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/assets")
}

/// A worker on `R` and a client connected and authenticated to it (with a server ticket).
async fn job_client<R: Runtime>(env: &Env) -> (RunningWorker, SignalingClient<R>, JobClient<R>) {
    let worker = env.start_worker::<R>().await;
    let sig = env.client::<R>().await;
    let worker_id = wait_for_worker(&sig, &worker).await;
    let client = JobClient::connect(&sig, &worker_id, PeerOptions::loopback(), &ClientAuth::Ticket)
        .await
        .expect("connect and authenticate");
    (worker, sig, client)
}

/// Submits a training job with the bundled config and labels (`fake` is a `# fake-sleap-nn:`
/// behaviour line, ignored by the real trainer) and waits until the labels are uploaded.
async fn submit_training<R: Runtime>(client: &JobClient<R>, run_name: &str, max_epochs: u32, fake: &str) -> String {
    let config = std::fs::read_to_string(assets().join("tiny_single.yaml")).expect("the bundled config");
    let spec = json!({
        "type": "train",
        "labels_path": "labels.pkg.slp",
        "config_contents": [format!("{config}\n# fake-sleap-nn: {fake}\n")],
        "max_epochs": max_epochs,
        "run_name": run_name,
    });
    let (job_id, upload) = client.submit(&spec, &[assets().join("labels.pkg.slp")]).await.expect("accepted");
    let upload = upload.expect("the labels are uploaded");
    assert!(within::<R, _>("the upload", upload.finish()).await.expect("uploaded").failed.is_empty());
    job_id
}

/// A training job from `JobClient<R>` to `Worker<R>`: ticket authentication (the worker fetches
/// the server's JWKS), submission with an upload, the fake trainer's ZMQ progress relayed,
/// `job_done` completed, the run directory received, the model published to the registry.
pub async fn job_end_to_end<R: Runtime>(env: &Env) {
    let (worker, _sig, client) = job_client::<R>(env).await;
    let job_id = submit_training(&client, "conformance", 2, "mode=ok").await;
    let JobEnd { status, epochs, .. } = job_done(&client).await;
    assert_eq!(status.job_id, job_id);
    assert_eq!(status.state, JobState::Completed, "{status:?}");
    assert_eq!(epochs, 2, "every epoch's progress was relayed");
    let out = tempfile::tempdir().expect("tempdir");
    let results = client.receive_results(out.path()).expect("receive");
    let got = within::<R, _>("the results", results.finish()).await.expect("results");
    assert!(got.failed.is_empty(), "{got:?}");
    assert!(out.path().join("conformance/best.ckpt").is_file(), "{:?}", got.files);
    client.close().await;
    // Published by the worker (files, then the manifest entry) through R's blocking pool.
    let store = LocalStore::<R>::new(&worker.registry);
    let m = within::<R, _>("the manifest", registry::manifest(&store, &env.room)).await.expect("the manifest");
    let entry = m.models.values().next().expect("the trained model is in the registry");
    assert_eq!(entry.trained_on_worker, worker.peer_id);
    assert!(entry.files.iter().any(|f| f.name == "best.ckpt"), "{entry:?}");
}

/// Submits a slow training job and waits for its first epoch.
async fn slow_job<R: Runtime>(client: &JobClient<R>, name: &str) -> String {
    let job_id = submit_training(client, name, 200, "batch_ms=100").await;
    within::<R, _>("the first epoch", async {
        loop {
            match client.next().await {
                Some(JobMsg::JobProgress { progress: Progress::EpochEnd { .. }, .. }) => return,
                Some(JobMsg::JobDone { status }) => panic!("ended before its first epoch: {status:?}"),
                Some(_) => {}
                None => panic!("the connection closed"),
            }
        }
    })
    .await;
    job_id
}

/// How a job ended, and what was relayed on the way.
struct JobEnd {
    status: sleap_rtc_core::job::JobStatus,
    /// Output lines relayed.
    logs: Vec<String>,
    /// `epoch_end` progress messages relayed.
    epochs: u32,
}

/// Waits for `job_done`.
async fn job_done<R: Runtime>(client: &JobClient<R>) -> JobEnd {
    within::<R, _>("job_done", async {
        let (mut logs, mut epochs) = (Vec::new(), 0);
        loop {
            match client.next().await {
                Some(JobMsg::JobDone { status }) => return JobEnd { status, logs, epochs },
                Some(JobMsg::JobLog { text, .. }) => logs.push(text),
                Some(JobMsg::JobProgress { progress: Progress::EpochEnd { .. }, .. }) => epochs += 1,
                Some(_) => {}
                None => panic!("the connection closed before job_done"),
            }
        }
    })
    .await
}

/// A stop reaches the trainer as sleap-nn's ZMQ command (the worker's PUB socket) and ends the
/// job early with its model (the SIGINT fallback comes only after 120 s, well past the wait);
/// a cancel is SIGTERM to the trainer's process group: the fake trainer runs as a member of the
/// group under a shell (see `start_worker`) and logs Lightning's "Received SIGTERM" line. Both
/// on `R`.
pub async fn job_stop_and_cancel<R: Runtime>(env: &Env) {
    let (_worker, _sig, client) = job_client::<R>(env).await;

    let job = slow_job(&client, "stopped").await;
    client.stop(&job).expect("stop");
    let status = job_done(&client).await.status;
    assert_eq!(status.state, JobState::StoppedEarly, "{status:?}");

    let job = slow_job(&client, "cancelled").await;
    client.cancel(&job).expect("cancel");
    let JobEnd { status, logs, .. } = job_done(&client).await;
    assert_eq!(status.state, JobState::Cancelled, "{status:?}");
    assert!(
        logs.iter().any(|l| l.contains("Received SIGTERM")),
        "the trainer, a group member, got SIGTERM: {:?}",
        &logs[logs.len().saturating_sub(5)..]
    );
    client.close().await;
}

/// Whatever a worker sends while the client waits for `auth_ok` or `job_accepted` comes out of
/// `JobClient::next` afterwards, in the worker's order, before what followed the reply (both
/// waits used to drop it). The worker is played by hand over a real connection, so it can send
/// what a real worker sends only in races: output of another job, a reply to someone else.
pub async fn job_client_keeps_what_it_did_not_wait_for<R: Runtime>(env: &Env) {
    let worker_sig = env.worker::<R>().await;
    let client_sig = env.client::<R>().await;
    let log = |text: &str| JobMsg::JobLog {
        job_id: "job_other".into(),
        stream: Stream::Stdout,
        text: text.into(),
        cr: false,
    };
    let state = JobMsg::JobState { job_id: "job_other".into(), state: JobState::Running, message: None };
    let someone_elses = JobMsg::JobAccepted { client_job_id: "c-not-ours".into(), job_id: "job_x".into() };
    let send = |w: &PeerConnection<R>, msgs: &[JobMsg]| {
        for m in msgs {
            w.send_message(&m.to_value()).expect("the fake worker sends");
        }
    };

    let fake_worker = async {
        let offer = next_offer(&worker_sig).await;
        let w = conn::accept(&worker_sig, &offer, PeerOptions::loopback()).await.expect("the answerer connects");
        let first = within::<R, _>("the ticket", w.recv_message()).await.expect("open");
        assert!(matches!(JobMsg::decode(&first), Ok(Some(JobMsg::AuthTicket { .. }))), "{first}");
        send(&w, &[log("before auth_ok"), state.clone(), JobMsg::AuthOk { worker: worker_sig.peer_id().into() }]);
        w
    };
    let how = ClientAuth::Ticket;
    let (client, w) =
        join(JobClient::connect(&client_sig, worker_sig.peer_id(), PeerOptions::loopback(), &how), fake_worker).await;
    let client = client.expect("connect and authenticate");

    let fake_worker = async {
        let text = within::<R, _>("job_submit", w.recv_message()).await.expect("open");
        let Ok(Some(JobMsg::JobSubmit { client_job_id, .. })) = JobMsg::decode(&text) else {
            panic!("expected job_submit, got {text}")
        };
        let ours = JobMsg::JobAccepted { client_job_id, job_id: "job_1".into() };
        send(&w, &[log("while submitting"), someone_elses.clone(), ours, log("after job_accepted")]);
    };
    let spec = json!({"type": "train", "labels_path": "/data/labels.slp"});
    let (submitted, ()) = join(within::<R, _>("the submission", client.submit(&spec, &[])), fake_worker).await;
    assert_eq!(submitted.expect("accepted").0, "job_1");

    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(within::<R, _>("a held message", client.next()).await.expect("the connection is open"));
    }
    assert_eq!(got, [log("before auth_ok"), state, log("while submitting"), someone_elses, log("after job_accepted")]);
    client.close().await;
    w.close().await;
}

/// The directory registry store on `R`: create-only and compare-and-swap manifest writes, ids
/// that are not path components refused, and a publish + verified pull of a run directory.
pub async fn registry_store<R: Runtime>(_env: &Env) {
    let d = tempfile::tempdir().expect("tempdir");
    let s = LocalStore::<R>::new(d.path().join("reg"));
    assert!(s.read_manifest("r1").await.expect("read").is_none());
    assert!(s.write_manifest("r1", b"{}", None).await.expect("create"));
    assert!(!s.write_manifest("r1", b"{1}", None).await.expect("write"), "create-only fails when it exists");
    let (b, v) = s.read_manifest("r1").await.expect("read").expect("present");
    assert_eq!(b, b"{}");
    assert!(!s.write_manifest("r1", b"x", Some("stale")).await.expect("write"));
    assert!(s.write_manifest("r1", b"x", Some(&v)).await.expect("write"));
    for bad in ["..", "a/b", "", "r\0"] {
        assert!(s.read_manifest(bad).await.is_err(), "{bad:?}");
    }
    let run = d.path().join("run");
    std::fs::create_dir_all(&run).expect("mkdir");
    let config = std::fs::read_to_string(assets().join("tiny_single.yaml")).expect("the bundled config");
    std::fs::write(run.join("training_config.yaml"), &config).expect("write");
    write_random(&run.join("best.ckpt"), 300_000, 7);
    let info = registry::PublishInfo { trained_by: "me".into(), alias: Some("first".into()), ..Default::default() };
    let e = registry::publish(&s, "r2", &run, info).await.expect("publish");
    let (got, dir) = registry::pull(&s, "r2", "first", &d.path().join("pulled")).await.expect("pull");
    assert_eq!(got.id, e.id);
    assert_eq!(read(&dir.join("best.ckpt")), read(&run.join("best.ckpt")));
}

/// `Runtime::spawn_process` as the trainer uses it: `output` reads stdout while the child writes
/// more than a pipe buffer to stderr, both pipes and the exit code, no pid once reaped, a child
/// that overruns its time limit killed, and a program that does not exist reported.
pub async fn child_processes<R: Runtime>(_env: &Env) {
    let sh = |script: &str| {
        let mut c = std::process::Command::new("/bin/sh");
        c.args(["-c", script]);
        c
    };
    // 200 KB on stderr: a reader that closed stderr would kill the child (EPIPE) and lose stdout.
    let chatty = "i=0; while [ $i -lt 4000 ]; do echo 'a warning line of about fifty bytes......' >&2; \
                  i=$((i+1)); done; echo 1.2.3";
    let (st, out) = within::<R, _>("output", sleap_rtc_driver::output::<R>(sh(chatty), WAIT)).await.expect("it runs");
    assert!(st.success(), "{st:?}");
    assert_eq!(String::from_utf8_lossy(&out).trim(), "1.2.3");

    let mut child = R::spawn_process(sh("echo out; echo err >&2; exit 3")).expect("spawn");
    assert!(child.id().is_some());
    let (mut o, mut e) = (child.take_stdout().expect("stdout"), child.take_stderr().expect("stderr"));
    assert!(child.take_stdout().is_none(), "a pipe is taken once");
    let (mut ob, mut eb) = (String::new(), String::new());
    use futures_util::AsyncReadExt;
    let (ro, re) =
        within::<R, _>("pipes", async { (o.read_to_string(&mut ob).await, e.read_to_string(&mut eb).await) }).await;
    ro.expect("stdout");
    re.expect("stderr");
    let st = within::<R, _>("wait", child.wait()).await.expect("wait");
    assert_eq!((ob.as_str(), eb.as_str(), st.code()), ("out\n", "err\n", Some(3)));
    assert_eq!(child.id(), None, "no pid once reaped: nobody may signal a recycled one");

    let d = tempfile::tempdir().expect("tempdir");
    let pid_file = d.path().join("pid");
    let script = format!("echo $$ > '{}'; exec sleep 30", pid_file.display());
    assert!(sleap_rtc_driver::output::<R>(sh(&script), Duration::from_millis(300)).await.is_none());
    let pid = std::fs::read_to_string(&pid_file).expect("the child wrote its pid");
    let stat = format!("/proc/{}/stat", pid.trim());
    within::<R, _>("the overrunning child dies", async {
        // Gone, or a zombie waiting for the runtime's reaper: either way no longer running.
        while std::fs::read_to_string(&stat)
            .is_ok_and(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.starts_with(" Z")))
        {
            sleap_rtc_driver::sleep::<R>(Duration::from_millis(20)).await;
        }
    })
    .await;

    let missing = std::process::Command::new("/nonexistent/sleap-nn");
    assert!(R::spawn_process(missing).is_err());
}
