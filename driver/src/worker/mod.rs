//! The GPU worker: registers in a room with its capabilities, authenticates every client before
//! acting on anything it says, runs one job at a time through `sleap-nn`, relays progress, and
//! sends results back. Jobs live independently of connections: a journal on disk
//! (`WORK_DIR/jobs/<id>/job.json`) keeps their state, so a client can disconnect and `job_attach`
//! later, and a restarted worker knows what happened. The signaling connection is re-established
//! with backoff (1 s doubling to 5 min) without touching running jobs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sleap_rtc_core::job::auth::{self, AuthError, Expected, TicketClaims};
use sleap_rtc_core::job::bridge::{self, TrackExit, TrainExit, TrainRun};
use sleap_rtc_core::job::{
    ErrorCode, FieldError, Interrupt, Job, JobMsg, JobSpec, JobState, JobStatus, JobSummary, Outcome, PathRef,
    PathVerdict, Progress, Stream, check_paths, parse_spec,
};
use sleap_rtc_core::signal::{Register, ServerMessage};
use sleap_rtc_core::transfer::FileEntry;
use tokio::sync::{mpsc, watch};

use crate::conn::{self, PeerConnection, PeerOptions, Received, Transfer};
use crate::signaling::{SignalingClient, SignalingError};
use crate::trainer::{self, Launch, Supervision, TrainerEvent};
use crate::{Runtime, sleep, timeout};

mod caches;
mod capabilities;
mod config;
mod housekeeping;
mod journal;
mod live;
mod models;
mod notify;
mod peer_auth;
mod queue;
mod requests;
mod run;
mod upstream;

use caches::*;
use capabilities::*;
use journal::*;

pub use capabilities::{Capabilities, probe_capabilities};
pub use config::{WorkerConfig, WorkerError};
pub use housekeeping::ATTACH_WINDOW;
pub use journal::JournalEntry;
pub use live::{ProgressBoard, registry_summary};

/// How long a client has to prove room membership after the channel opens.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Progress changes reach the room's metadata at most this often: every update is pushed to
/// every peer of the room, and the server's per-connection limit (50/s) is shared with signaling.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn random_hex(bytes: usize) -> Result<String, crate::NoRandomness> {
    let mut b = vec![0u8; bytes];
    crate::random_bytes(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

// ---------------------------------------------------------------------------------------------
// Jobs

/// Where a job's messages go: a client of ours (JSON on `ctl`), or an upstream client, whose
/// adapter task translates each message into the `TYPE::args` protocol.
enum Attached<R: Runtime> {
    Native(Arc<PeerConnection<R>>),
    Upstream(mpsc::UnboundedSender<upstream::JobEvent>),
}

impl<R: Runtime> Clone for Attached<R> {
    fn clone(&self) -> Self {
        match self {
            Attached::Native(c) => Attached::Native(c.clone()),
            Attached::Upstream(t) => Attached::Upstream(t.clone()),
        }
    }
}

impl<R: Runtime> Attached<R> {
    /// Sends one job message; false once the client is gone.
    fn send(&self, msg: &JobMsg) -> bool {
        match self {
            Attached::Native(c) => c.send_message(&msg.to_value()).is_ok() && c.state() != conn::ConnState::Closed,
            Attached::Upstream(t) => t.send(upstream::JobEvent::Msg(msg.clone())).is_ok(),
        }
    }

    fn same(&self, other: &Attached<R>) -> bool {
        match (self, other) {
            (Attached::Native(a), Attached::Native(b)) => Arc::ptr_eq(a, b),
            (Attached::Upstream(a), Attached::Upstream(b)) => a.same_channel(b),
            _ => false,
        }
    }
}

/// A job this worker process is running (or just ran).
struct ActiveJob<R: Runtime> {
    id: String,
    owner: String,
    dir: PathBuf,
    started: std::time::Instant,
    entry: Mutex<JournalEntry>,
    attached: Mutex<Vec<Attached<R>>>,
    interrupt: watch::Sender<Option<Interrupt>>,
}

impl<R: Runtime> ActiveJob<R> {
    fn save(&self) {
        let Ok(e) = self.entry.lock() else { return };
        match serde_json::to_vec_pretty(&*e) {
            Ok(b) => {
                if let Err(err) = crate::files::write_atomic(&self.dir.join("job.json"), &b) {
                    tracing::error!(job = %self.id, error = %err, "cannot write the job journal");
                }
            }
            Err(err) => tracing::error!(job = %self.id, error = %err, "cannot encode the job journal"),
        }
    }

    fn status(&self) -> JobStatus {
        self.entry.lock().map(|e| e.status.clone()).unwrap_or_else(|e| e.into_inner().status.clone())
    }

    fn emit(&self, msg: &JobMsg) {
        if let Ok(mut a) = self.attached.lock() {
            a.retain(|c| c.send(msg));
        }
    }

    /// sleap-nn's own progress message, for upstream clients (the GUI's LossViewer takes it as is).
    fn emit_report(&self, raw: &str) {
        if let Ok(mut a) = self.attached.lock() {
            a.retain(|c| match c {
                Attached::Native(_) => true,
                Attached::Upstream(t) => t.send(upstream::JobEvent::Report(raw.to_owned())).is_ok(),
            });
        }
    }

    fn set_state(&self, to: JobState, message: Option<String>) {
        if let Ok(mut e) = self.entry.lock() {
            if e.job.transition(to).is_err() {
                tracing::warn!(job = %self.id, from = %e.job.state, to = %to, "ignored an invalid job transition");
                return;
            }
            e.status.state = to;
            if message.is_some() {
                e.status.message = message.clone();
            }
            e.updated_at = unix_now();
        }
        self.save();
        self.emit(&JobMsg::JobState { job_id: self.id.clone(), state: to, message });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Available,
    Busy,
}

/// Shared state of a running worker.
pub struct Worker<R: Runtime> {
    rt: std::marker::PhantomData<fn() -> R>,
    cfg: WorkerConfig,
    peer_id: String,
    jobs_dir: PathBuf,
    cache_dir: PathBuf,
    caps: Capabilities,
    /// Admitted jobs, those waiting for the GPU and the one holding it (see `queue`).
    queue: Mutex<queue::Queue<R>>,
    /// Bumped whenever the queue moves, to wake the jobs waiting in it.
    slot_changed: watch::Sender<u64>,
    /// Jobs found queued in the journal at start, taken up when the worker runs.
    recovered: Mutex<Vec<JournalEntry>>,
    /// Shutting down: the GPU is handed to no further job.
    draining: std::sync::atomic::AtomicBool,
    status: watch::Sender<(Status, Option<String>)>,
    jwks: tokio::sync::Mutex<(Option<jsonwebtoken::jwk::JwkSet>, Option<std::time::Instant>)>,
    /// The room's registered member keys, for upstream clients' Ed25519 proofs.
    upstream_keys: tokio::sync::Mutex<upstream::KeyCache>,
    http_base: String,
    /// The room we are registered in (for publishing models).
    room: Mutex<Option<String>>,
    /// `metadata.properties.progress` of the running job (with `publish_progress`).
    progress: Arc<watch::Sender<Option<Value>>>,
}

/// What the worker knows about its signaling registration, for checking tickets.
#[derive(Debug, Clone)]
struct PeerCtx {
    room: String,
    me: String,
}

impl<R: Runtime> Worker<R> {
    /// Prepares the work directory, recovers the journal, probes capabilities.
    pub async fn new(mut cfg: WorkerConfig) -> Result<Arc<Worker<R>>, WorkerError> {
        let wd = |e| WorkerError::WorkDir(cfg.work_dir.clone(), e);
        std::fs::create_dir_all(&cfg.work_dir).map_err(wd)?;
        let work_dir = cfg.work_dir.canonicalize().map_err(|e| WorkerError::WorkDir(cfg.work_dir.clone(), e))?;
        cfg.work_dir = work_dir.clone();
        let jobs_dir = work_dir.join("jobs");
        let cache_dir = work_dir.join("upload-cache");
        for d in [&jobs_dir, &cache_dir] {
            std::fs::create_dir_all(d).map_err(|e| WorkerError::WorkDir(d.clone(), e))?;
        }
        cfg.mounts = cfg.mounts.iter().filter_map(|m| m.canonicalize().ok()).collect();
        let recovered = recover_journal(&jobs_dir);
        housekeeping::sweep(&jobs_dir, cfg.keep_finished, cfg.jobs_cap_bytes, unix_now());
        // A stable peer id, so clients can find the worker again after a restart.
        let id_file = work_dir.join("worker-id");
        let peer_id = match std::fs::read_to_string(&id_file) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_owned(),
            _ => {
                let base: String = cfg
                    .name
                    .clone()
                    .unwrap_or_else(hostname)
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .take(24)
                    .collect();
                let id = format!("worker-{base}-{}", random_hex(3)?);
                std::fs::write(&id_file, &id).map_err(|e| WorkerError::WorkDir(id_file.clone(), e))?;
                id
            }
        };
        let caps = probe_capabilities::<R>(&cfg.sleap_nn, &work_dir).await;
        if caps.sleap_nn_version.is_none() {
            tracing::warn!(program = %cfg.sleap_nn.display(), "`sleap-nn --version` failed; jobs will fail until it works");
        }
        let http_base = http_base(&cfg.server);
        Ok(Arc::new(Worker {
            rt: std::marker::PhantomData,
            cfg,
            peer_id,
            jobs_dir,
            cache_dir,
            caps,
            queue: Mutex::new(queue::Queue::default()),
            recovered: Mutex::new(recovered),
            draining: std::sync::atomic::AtomicBool::new(false),
            slot_changed: watch::channel(0).0,
            status: watch::channel((Status::Available, None)).0,
            jwks: tokio::sync::Mutex::new((None, None)),
            upstream_keys: tokio::sync::Mutex::new(upstream::KeyCache::default()),
            http_base,
            room: Mutex::new(None),
            progress: Arc::new(watch::channel(None).0),
        }))
    }

    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn metadata(&self) -> Value {
        let (status, job) = self.status.borrow().clone();
        let c = &self.caps;
        let mut m = json!({
            "tags": ["sleap-rtc", "training-worker", "inference-worker"],
            "properties": {
                "worker_name": self.cfg.name.clone().unwrap_or_else(|| c.hostname.clone()),
                "hostname": c.hostname,
                "gpu_model": c.gpu_model,
                "gpu_memory_mb": c.gpu_memory_mb,
                "sleap_nn_version": c.sleap_nn_version,
                "free_disk_mb": free_disk_mb(&self.cfg.work_dir),
                "status": if status == Status::Busy { "busy" } else { "available" },
                "current_job": job,
                "max_concurrent_jobs": 1,
                // Admitted and unfinished jobs (running, uploading, waiting), and how many it
                // takes: clients choosing a worker prefer the shortest wait.
                "queue_length": self.queue_length(),
                "queue_capacity": 1 + self.cfg.queue,
                "supported_job_types": ["training", "inference"],
                "auth": if self.cfg.room_secret.is_some() { "room-secret" } else { "ticket" },
                "progress_published": self.cfg.publish_progress,
            }
        });
        if self.cfg.publish_progress {
            // `null` removes the key from the room's copy (metadata merge) once the job is over.
            m["properties"]["progress"] = self.progress.borrow().clone().unwrap_or(Value::Null);
        }
        m
    }

    /// Runs until `shutdown` resolves: keeps a signaling registration (reconnecting with backoff)
    /// and serves every client it introduces. On shutdown the running job is cancelled.
    pub async fn run(self: &Arc<Self>, shutdown: impl std::future::Future<Output = ()>) -> Result<(), WorkerError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = self.cfg.backoff_start;
        // Clients will connect to us: have the DTLS key ready by then.
        crate::cert::prepare::<R>();
        self.requeue_recovered();
        loop {
            let register = Register {
                peer_id: Some(self.peer_id.clone()),
                room_id: self.cfg.room.clone(),
                role: Some("worker".into()),
                metadata: self.metadata().as_object().cloned(),
                api_key: Some(self.cfg.token.clone()),
                ..Default::default()
            };
            let attempt = tokio::select! {
                r = SignalingClient::<R>::connect(&self.cfg.server, register) => r,
                _ = &mut shutdown => break,
            };
            match attempt {
                Ok(sig) => {
                    backoff = self.cfg.backoff_start;
                    tracing::info!(peer_id = %sig.peer_id(), room = %sig.registered().room_id, "worker registered");
                    let sig = Arc::new(sig);
                    tokio::select! {
                        _ = self.serve_signaling(sig) => tracing::warn!("signaling connection lost; reconnecting"),
                        _ = &mut shutdown => break,
                    }
                }
                Err(SignalingError::Refused { code, message }) if code.refusal_is_final() => {
                    return Err(WorkerError::Refused(format!("{code}: {message}")));
                }
                Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach the signaling server"),
            }
            tokio::select! {
                _ = sleep::<R>(backoff) => {}
                _ = &mut shutdown => break,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        self.shutdown().await;
        Ok(())
    }

    /// Cancels the running job (if any) and waits for it to end. Queued jobs stay queued in
    /// the journal: the next start of the worker runs them.
    pub async fn shutdown(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        let running = self.admitted().into_iter().find(|j| j.status().state == JobState::Running);
        if let Some(j) = running {
            let _ = j.interrupt.send(Some(Interrupt::Cancel));
            let mut moved = self.slot_changed.subscribe();
            let grace = self.cfg.supervision.cancel_grace + Duration::from_secs(5);
            let gone = async {
                while self.find_job(&j.id).is_some() {
                    if moved.changed().await.is_err() {
                        break;
                    }
                }
            };
            let _ = timeout::<R, _>(grace, gone).await;
        }
    }

    /// Takes up the jobs a previous run of the worker had queued (uploaded, not started), in
    /// their old order; their clients follow them again with `job attach`.
    fn requeue_recovered(self: &Arc<Self>) {
        let entries = self.recovered.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default();
        for entry in entries {
            let id = entry.job.id.clone();
            let spec = entry.spec.clone();
            let job = Arc::new(ActiveJob {
                id: id.clone(),
                owner: entry.owner.clone(),
                dir: self.jobs_dir.join(&id),
                started: std::time::Instant::now(),
                entry: Mutex::new(entry),
                attached: Mutex::new(vec![]),
                interrupt: watch::channel(None).0,
            });
            self.requeue(job.clone());
            tracing::info!(job = %id, "job queued before a restart: queued again");
            let me = self.clone();
            R::spawn(async move { me.run_admitted(job, spec).await });
        }
    }

    async fn serve_signaling(self: &Arc<Self>, sig: Arc<SignalingClient<R>>) {
        let ctx = PeerCtx { room: sig.registered().room_id.clone(), me: sig.peer_id().to_owned() };
        if let Ok(mut r) = self.room.lock() {
            *r = Some(ctx.room.clone());
        }
        // Keep the room's view of our status (at once) and progress (coalesced) current.
        let status_task = {
            let (me, sig) = (self.clone(), sig.clone());
            let mut rx = self.status.subscribe();
            let mut progress = self.progress.subscribe();
            crate::spawn_abortable::<R, _>(async move {
                let _ = sig.update_metadata(me.metadata()).await;
                let mut last = std::time::Instant::now();
                loop {
                    tokio::select! {
                        r = rx.changed() => if r.is_err() { break },
                        r = progress.changed(), if me.cfg.publish_progress => {
                            if r.is_err() {
                                break;
                            }
                            // Changes that arrive meanwhile are folded into this one update.
                            R::sleep_until(last + PROGRESS_INTERVAL).await;
                        }
                    }
                    last = std::time::Instant::now();
                    if sig.update_metadata(me.metadata()).await.is_err() {
                        break;
                    }
                }
            })
        };
        while let Some(env) = sig.next_event().await {
            if let ServerMessage::PeerMessage { from_peer_id, payload, .. } = &env.msg {
                if payload.get("type").and_then(Value::as_str) == Some("registry_list") {
                    let (me, sig, to) = (self.clone(), sig.clone(), from_peer_id.clone());
                    R::spawn(async move {
                        let answer = me.answer_registry_list().await;
                        let _ = sig.send(json!({"type": "peer_message", "to_peer_id": to, "payload": answer}));
                    });
                }
                if payload.get("type").and_then(Value::as_str) == Some("registry_query") {
                    let query = payload.get("model").and_then(Value::as_str).unwrap_or_default().to_owned();
                    let (me, sig, to) = (self.clone(), sig.clone(), from_peer_id.clone());
                    R::spawn(async move {
                        let answer = me.answer_registry_query(&query).await;
                        let _ = sig.send(json!({"type": "peer_message", "to_peer_id": to, "payload": answer}));
                    });
                }
                continue;
            }
            if let ServerMessage::Offer(_) = &env.msg {
                let (me, sig, ctx) = (self.clone(), sig.clone(), ctx.clone());
                R::spawn(async move {
                    let accepted = conn::accept(&sig, &env.msg, me.cfg.peer.clone()).await;
                    if let Ok(c) = &accepted {
                        let route = c.route().map_or("unknown".to_string(), |r| r.to_string());
                        tracing::info!(peer = c.remote_peer(), route, "peer connected");
                    }
                    match accepted {
                        // The channel the client opened tells which protocol it speaks.
                        Ok(c) if c.upstream_label().is_some() => me.serve_upstream(ctx, Arc::new(c)).await,
                        Ok(c) => me.serve_peer(ctx, Arc::new(c)).await,
                        Err(e) => tracing::warn!(error = %e, "could not accept a connection"),
                    }
                });
            }
        }
        status_task.abort();
    }
}

/// `ws://host:port/ws` → `http://host:port`.
pub fn http_base(ws_url: &str) -> String {
    let (scheme, rest) = match ws_url.split_once("://") {
        Some(("wss", r)) => ("https", r),
        Some(("https", r)) => ("https", r),
        Some((_, r)) => ("http", r),
        None => ("http", ws_url),
    };
    let host = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{host}")
}
