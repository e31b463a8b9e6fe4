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
use sleap_rtc_core::job::bridge::{self, TrainExit, TrainRun};
use sleap_rtc_core::job::{
    ErrorCode, FieldError, Interrupt, Job, JobMsg, JobSpec, JobState, JobStatus, PathRef, PathVerdict, Progress,
    Stream, check_paths, parse_spec,
};
use sleap_rtc_core::signal::{Register, ServerMessage};
use sleap_rtc_core::transfer::FileEntry;
use tokio::sync::{mpsc, watch};

use crate::conn::{self, PeerConnection, PeerOptions, Received, Transfer};
use crate::signaling::{SignalingClient, SignalingError};
use crate::trainer::{self, Launch, Supervision, TrainerEvent};
use crate::{Runtime, sleep, timeout};

mod live;
mod upstream;
pub use live::{ProgressBoard, registry_summary};

/// How long a client has to prove room membership after the channel opens.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Progress changes reach the room's metadata at most this often: every update is pushed to
/// every peer of the room, and the server's per-connection limit (50/s) is shared with signaling.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Everything a worker is configured with.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Signaling WebSocket URL (`ws://host:port/ws`).
    pub server: String,
    /// The worker token (`slp_...`) or account key (`slp_acct_...`).
    pub token: String,
    /// Room to join (needed with an account key; a worker token names its room).
    pub room: Option<String>,
    pub name: Option<String>,
    pub work_dir: PathBuf,
    /// The `sleap-nn` executable.
    pub sleap_nn: PathBuf,
    /// Worker directories that jobs may name by absolute path (canonicalized).
    pub mounts: Vec<PathBuf>,
    /// A Python with sleap-io, to list the videos of a `.slp` for upstream clients' path check;
    /// `None`: the interpreter of the `sleap-nn` script, if it is a Python script.
    pub python: Option<PathBuf>,
    /// Room-secret mode: clients prove knowledge of this secret instead of a server ticket.
    pub room_secret: Option<String>,
    /// `--device` for inference (`auto`, `cpu`, `cuda:0`).
    pub device: String,
    pub peer: PeerOptions,
    pub supervision: Supervision,
    /// Uploaded files are kept (by content hash) up to this many bytes, so the same dataset sent
    /// again is not transferred again.
    pub upload_cache_bytes: u64,
    /// First reconnect delay (doubles up to 5 minutes).
    pub backoff_start: Duration,
    /// A model registry (`s3://bucket/prefix` or a directory): successful trainings are
    /// published to the room's manifest.
    pub registry: Option<String>,
    /// Registry models fetched for inference are kept up to this many bytes (least recently
    /// used first out).
    pub model_cache_bytes: u64,
    /// Publish the running job's progress (epoch, loss, a bounded loss history) in the room
    /// metadata, which the signaling server relays; off, progress goes only to the job's client.
    pub publish_progress: bool,
}

impl WorkerConfig {
    pub fn new(server: &str, token: &str, work_dir: &Path, sleap_nn: &Path) -> Self {
        WorkerConfig {
            server: server.to_owned(),
            token: token.to_owned(),
            room: None,
            name: None,
            work_dir: work_dir.to_path_buf(),
            sleap_nn: sleap_nn.to_path_buf(),
            mounts: vec![],
            python: None,
            room_secret: None,
            device: "auto".into(),
            peer: PeerOptions::default(),
            supervision: Supervision::default(),
            upload_cache_bytes: 20 << 30,
            backoff_start: Duration::from_secs(1),
            registry: None,
            model_cache_bytes: 50 << 30,
            publish_progress: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the work directory {0} cannot be used: {1}")]
    WorkDir(PathBuf, std::io::Error),
    #[error("the signaling server refused this worker: {0}")]
    Refused(String),
    #[error(transparent)]
    NoRandomness(#[from] crate::NoRandomness),
}

/// What the worker tells the room about itself (`metadata.properties`, upstream's keys).
#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    pub gpu_model: String,
    pub gpu_memory_mb: u64,
    pub sleap_nn_version: Option<String>,
    pub free_disk_mb: u64,
    pub hostname: String,
}

/// GPU from `nvidia-smi` when present, else "CPU"; sleap-nn's version; free disk in `dir`.
pub async fn probe_capabilities<R: Runtime>(sleap_nn: &Path, dir: &Path) -> Capabilities {
    let gpu = async {
        let mut cmd = std::process::Command::new("nvidia-smi");
        cmd.args(["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]);
        let (_, stdout) = crate::output::<R>(cmd, Duration::from_secs(5)).await?;
        let text = String::from_utf8_lossy(&stdout).into_owned();
        let first = text.lines().next()?.to_owned();
        let (name, mem) = first.rsplit_once(',')?;
        Some((name.trim().to_owned(), mem.trim().parse::<u64>().ok()?))
    };
    let (gpu, version) = tokio::join!(gpu, trainer::sleap_nn_version::<R>(sleap_nn));
    let (gpu_model, gpu_memory_mb) = gpu.unwrap_or_else(|| ("CPU".into(), 0));
    Capabilities {
        gpu_model,
        gpu_memory_mb,
        sleap_nn_version: version,
        free_disk_mb: free_disk_mb(dir),
        hostname: hostname(),
    }
}

fn free_disk_mb(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return 0 };
    // SAFETY: statvfs writes into a zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return 0;
        }
        (s.f_bavail as u64).saturating_mul(s.f_frsize as u64) >> 20
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "host".into())
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn random_hex(bytes: usize) -> Result<String, crate::NoRandomness> {
    let mut b = vec![0u8; bytes];
    crate::random_bytes(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

// ---------------------------------------------------------------------------------------------
// Journal

/// One job as recorded on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    pub job: Job,
    /// The user id that submitted it (from the ticket), or `room-secret`.
    pub owner: String,
    pub spec: JobSpec,
    pub status: JobStatus,
    pub created_at: f64,
    pub updated_at: f64,
    /// Process group of the running trainer, so a restarted worker can end an orphan.
    #[serde(default)]
    pub trainer_pid: Option<u32>,
}

fn journal_path(jobs: &Path, id: &str) -> PathBuf {
    jobs.join(id).join("job.json")
}

fn read_journal(jobs: &Path, id: &str) -> Option<JournalEntry> {
    if !valid_job_id(id) {
        return None;
    }
    serde_json::from_slice(&std::fs::read(journal_path(jobs, id)).ok()?).ok()
}

fn valid_job_id(id: &str) -> bool {
    id.len() == 20 && id.starts_with("job_") && id[4..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Marks jobs a previous run of the worker left unfinished as failed, and ends their trainers.
fn recover_journal(jobs: &Path) {
    let Ok(rd) = std::fs::read_dir(jobs) else { return };
    for e in rd.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        let Some(mut j) = read_journal(jobs, &id) else { continue };
        if j.job.state.is_terminal() {
            continue;
        }
        if let Some(pid) = j.trainer_pid {
            // Only if that process still runs *this* job (its argv names the job directory).
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&id) {
                // SAFETY: kill(2) on the orphaned trainer's process group.
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
        }
        j.job.state = JobState::Failed;
        j.status.state = JobState::Failed;
        j.status.message = Some("the worker restarted while this job was running; submit it again".into());
        j.updated_at = unix_now();
        if let Ok(b) = serde_json::to_vec_pretty(&j) {
            let _ = crate::files::write_atomic(&journal_path(jobs, &id), &b);
        }
        tracing::warn!(job = %id, "job was interrupted by a worker restart; marked failed");
    }
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
    current: Mutex<Option<Arc<ActiveJob<R>>>>,
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
        recover_journal(&jobs_dir);
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
            current: Mutex::new(None),
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

    /// Cancels the running job (if any) and waits for it to end.
    pub async fn shutdown(&self) {
        let job = self.current.lock().ok().and_then(|c| c.clone());
        if let Some(j) = job {
            let _ = j.interrupt.send(Some(Interrupt::Cancel));
            let mut st = self.status.subscribe();
            let grace = self.cfg.supervision.cancel_grace + Duration::from_secs(5);
            let _ = timeout::<R, _>(grace, st.wait_for(|(s, _)| *s == Status::Available)).await;
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
                    match conn::accept(&sig, &env.msg, me.cfg.peer.clone()).await {
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

    // -- authentication ------------------------------------------------------------------------

    async fn jwks_key(&self, kid: Option<&str>) -> Result<jsonwebtoken::DecodingKey, String> {
        let mut cache = self.jwks.lock().await;
        let find = |set: &jsonwebtoken::jwk::JwkSet| {
            let jwk = match kid {
                Some(k) => set.find(k),
                None => set.keys.first(),
            };
            jwk.and_then(|j| jsonwebtoken::DecodingKey::from_jwk(j).ok())
        };
        if let Some(k) = cache.0.as_ref().and_then(find) {
            return Ok(k);
        }
        // Unknown key: refetch, but not more than every 10 s (a bogus kid must not make us
        // hammer the server).
        let recent = cache.1.is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        if recent && cache.0.is_some() {
            return Err("unknown signing key".into());
        }
        let url = format!("{}/.well-known/jwks.json", self.http_base);
        crate::init_tls();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
        // reqwest is tokio-based: run it with a tokio reactor whatever our runtime is.
        let set: jsonwebtoken::jwk::JwkSet = R::tokio_compat(async {
            http.get(&url)
                .send()
                .await
                .map_err(|e| format!("cannot fetch {url}: {e}"))?
                .json()
                .await
                .map_err(|e| format!("bad JWKS from {url}: {e}"))
        })
        .await?;
        cache.1 = Some(std::time::Instant::now());
        let k = find(&set).ok_or_else(|| "unknown signing key".to_owned());
        cache.0 = Some(set);
        k
    }

    async fn verify_ticket(&self, ctx: &PeerCtx, c: &PeerConnection<R>, ticket: &str) -> Result<String, AuthError> {
        let header = jsonwebtoken::decode_header(ticket).map_err(|e| AuthError::BadSignature(e.to_string()))?;
        if header.alg != jsonwebtoken::Algorithm::EdDSA {
            return Err(AuthError::BadSignature("tickets are EdDSA-signed".into()));
        }
        let key = self.jwks_key(header.kid.as_deref()).await.map_err(AuthError::BadSignature)?;
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        v.set_audience(&[auth::TICKET_AUDIENCE]);
        v.set_issuer(&["sleap-rtc"]);
        v.leeway = auth::LEEWAY_SECS as u64;
        let claims = jsonwebtoken::decode::<TicketClaims>(ticket, &key, &v)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                jsonwebtoken::errors::ErrorKind::InvalidAudience => AuthError::WrongAudience,
                _ => AuthError::BadSignature(e.to_string()),
            })?
            .claims;
        let fp = c.remote_fingerprint().filter(|f| !f.is_empty()).ok_or(AuthError::WrongFingerprint)?;
        let expected = Expected { room: &ctx.room, worker: &ctx.me, client: c.remote_peer(), client_fp: &fp };
        auth::check_ticket(&claims, &expected, unix_now() as i64)?;
        Ok(claims.sub)
    }

    /// Returns the authenticated user id (or `room-secret`).
    async fn authenticate(&self, ctx: &PeerCtx, c: &PeerConnection<R>) -> Result<String, AuthError> {
        // Only the room-secret proof covers a nonce; a ticket is bound to the connection instead.
        let nonce = if self.cfg.room_secret.is_some() {
            let nonce = random_hex(32).map_err(|e| {
                tracing::error!(error = %e, "cannot make a challenge nonce");
                AuthError::NoChallenge
            })?;
            let _ = c.send_message(&JobMsg::AuthChallenge { nonce: nonce.clone() }.to_value());
            nonce
        } else {
            String::new()
        };
        let first = timeout::<R, _>(AUTH_TIMEOUT, async {
            loop {
                match c.recv_message().await {
                    None => return None,
                    Some(t) => match JobMsg::decode(&t) {
                        Ok(None) => continue,
                        Ok(Some(m)) => return Some(m),
                        Err(_) => return Some(JobMsg::AuthResponse { mac: String::new() }),
                    },
                }
            }
        })
        .await
        .map_err(|_| AuthError::Timeout)?
        .ok_or(AuthError::Missing)?;
        match (first, &self.cfg.room_secret) {
            (JobMsg::AuthResponse { mac }, Some(secret)) => {
                let worker_fp = c.local_fingerprint();
                let client_fp = c.remote_fingerprint().unwrap_or_default();
                let want =
                    auth::room_secret_mac(secret, &ctx.room, &nonce, &ctx.me, c.remote_peer(), worker_fp, &client_fp);
                if auth::mac_matches(&want, &mac) { Ok("room-secret".into()) } else { Err(AuthError::BadMac) }
            }
            (JobMsg::AuthTicket { .. }, Some(_)) => Err(AuthError::BadMac),
            (JobMsg::AuthTicket { ticket }, None) => self.verify_ticket(ctx, c, &ticket).await,
            _ => Err(AuthError::Missing),
        }
    }

    async fn serve_peer(self: Arc<Self>, ctx: PeerCtx, c: Arc<PeerConnection<R>>) {
        let peer = c.remote_peer().to_owned();
        let user = match self.authenticate(&ctx, &c).await {
            Ok(u) => u,
            Err(e) => {
                let reason = match (&e, self.cfg.room_secret.is_some()) {
                    (AuthError::BadMac, true) => {
                        "this worker requires the room secret (--room-secret); the proof did not match".to_owned()
                    }
                    _ => e.to_string(),
                };
                tracing::warn!(%peer, %reason, "refused an unauthenticated client");
                let _ = c.send_message(&JobMsg::AuthFailed { reason }.to_value());
                // Let the refusal reach the client before the connection goes.
                sleep::<R>(Duration::from_millis(300)).await;
                if let Ok(c) = Arc::try_unwrap(c) {
                    c.close().await;
                }
                return;
            }
        };
        tracing::info!(%peer, %user, "client authenticated");
        let _ = c.send_message(&JobMsg::AuthOk { worker: ctx.me.clone() }.to_value());
        while let Some(text) = c.recv_message().await {
            let msg = match JobMsg::decode(&text) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    let _ = c.send_message(
                        &JobMsg::JobError { job_id: None, code: ErrorCode::InvalidValue, message: e }.to_value(),
                    );
                    continue;
                }
            };
            match msg {
                JobMsg::JobSubmit { client_job_id, spec, files } => {
                    let (me, c, user) = (self.clone(), Attached::Native(c.clone()), user.clone());
                    R::spawn(async move { me.submit(c, user, client_job_id, spec, files).await });
                }
                JobMsg::JobStop { job_id } => self.interrupt(&c, &user, &job_id, Interrupt::Stop),
                JobMsg::JobCancel { job_id } => self.interrupt(&c, &user, &job_id, Interrupt::Cancel),
                JobMsg::JobAttach { job_id, fetch } => self.attach(&c, &user, &job_id, fetch).await,
                other => {
                    let _ = c.send_message(
                        &JobMsg::JobError {
                            job_id: None,
                            code: ErrorCode::InvalidValue,
                            message: format!("unexpected message from a client: {}", other.to_value()["type"]),
                        }
                        .to_value(),
                    );
                }
            }
        }
        tracing::info!(%peer, "client disconnected");
    }

    // -- job requests --------------------------------------------------------------------------

    fn reply_error(c: &PeerConnection<R>, job_id: &str, code: ErrorCode, message: String) {
        let _ = c.send_message(&JobMsg::JobError { job_id: Some(job_id.to_owned()), code, message }.to_value());
    }

    fn interrupt(&self, c: &PeerConnection<R>, user: &str, job_id: &str, what: Interrupt) {
        if let Err((code, message)) = self.request_interrupt(user, job_id, what) {
            Self::reply_error(c, job_id, code, message);
        }
    }

    /// Stops or cancels the running job `job_id` on behalf of `user`, who must own it.
    fn request_interrupt(&self, user: &str, job_id: &str, what: Interrupt) -> Result<(), (ErrorCode, String)> {
        let job = self.current.lock().ok().and_then(|g| g.clone()).filter(|j| j.id == job_id);
        let Some(job) = job else {
            return Err((ErrorCode::PathNotFound, format!("job {job_id:.40} is not running here")));
        };
        if job.owner != user {
            return Err((ErrorCode::NotAllowed, "this job belongs to another user".into()));
        }
        let action = job.entry.lock().map(|mut e| e.job.interrupt(what));
        match action {
            Ok(Ok(Some(a))) => {
                tracing::info!(job = %job_id, action = ?a, "interrupt requested");
                let _ = job.interrupt.send(Some(a));
                Ok(())
            }
            Ok(Ok(None)) => Ok(()),
            Ok(Err(e)) => Err((ErrorCode::InvalidValue, e.to_string())),
            Err(_) => Err((ErrorCode::Internal, "the job's record is unavailable".into())),
        }
    }

    async fn attach(&self, c: &Arc<PeerConnection<R>>, user: &str, job_id: &str, fetch: bool) {
        let active = self.current.lock().ok().and_then(|g| g.clone()).filter(|j| j.id == job_id);
        let (owner, status, dir) = match &active {
            Some(j) => (j.owner.clone(), j.status(), j.dir.clone()),
            None => match read_journal(&self.jobs_dir, job_id) {
                Some(e) => (e.owner, e.status, self.jobs_dir.join(job_id)),
                None => {
                    return Self::reply_error(
                        c,
                        job_id,
                        ErrorCode::PathNotFound,
                        format!("no job {job_id:.40} on this worker"),
                    );
                }
            },
        };
        if owner != user {
            return Self::reply_error(c, job_id, ErrorCode::NotAllowed, "this job belongs to another user".into());
        }
        // Re-read the state while holding the attach list: `finish` makes the state terminal
        // before it takes that list, so the connection gets job_done either from `finish` (it was
        // attached in time) or from here (the job had already finished).
        let status = match &active {
            Some(j) => match j.attached.lock() {
                Ok(mut a) => {
                    let st = j.status();
                    let me = Attached::Native(c.clone());
                    if !st.state.is_terminal() && !a.iter().any(|x| x.same(&me)) {
                        a.push(me);
                    }
                    st
                }
                Err(_) => status,
            },
            None => status,
        };
        let _ = c.send_message(&JobMsg::JobStatus { status: status.clone() }.to_value());
        if !status.state.is_terminal() {
            return;
        }
        let status = if fetch { status } else { JobStatus { results: vec![], ..status } };
        let _ = c.send_message(&JobMsg::JobDone { status: status.clone() }.to_value());
        if fetch && !status.results.is_empty() {
            send_results(c.clone(), &dir, &status.results).await;
        }
    }

    /// Whether `real` (canonical) is the output of one of `user`'s own jobs on this worker (a
    /// trained model under `jobs/<id>/runs/`, predictions under `jobs/<id>/output/`): the GUI
    /// predicts with the model path a training returned.
    fn own_job_output(&self, user: &str, real: &Path) -> bool {
        let Ok(jobs) = self.jobs_dir.canonicalize() else { return false };
        let Ok(rest) = real.strip_prefix(&jobs) else { return false };
        let mut parts = rest.components().map(|c| c.as_os_str().to_string_lossy().into_owned());
        let (Some(id), Some(area)) = (parts.next(), parts.next()) else { return false };
        (area == "runs" || area == "output") && read_journal(&self.jobs_dir, &id).is_some_and(|e| e.owner == user)
    }

    fn check_worker_path(&self, user: &str, p: &str) -> PathVerdict {
        let path = Path::new(p);
        match path.canonicalize() {
            Ok(real) => {
                if self.cfg.mounts.iter().any(|m| real.starts_with(m))
                    || self.in_uploads(&real)
                    || self.own_job_output(user, &real)
                {
                    PathVerdict::Ok
                } else {
                    PathVerdict::NotAllowed
                }
            }
            // Say "not allowed" rather than "not found" outside the mounts, so a client cannot
            // probe the worker's filesystem.
            Err(_) if !self.cfg.mounts.iter().any(|m| path.starts_with(m)) => PathVerdict::NotAllowed,
            Err(_) => PathVerdict::NotFound,
        }
    }

    fn check_spec(&self, user: &str, spec: &JobSpec, files: &[FileEntry]) -> Vec<FieldError> {
        let uploaded = |name: &str| {
            files.iter().any(|f| {
                f.name == name || (f.name.starts_with(name) && f.name.as_bytes().get(name.len()) == Some(&b'/'))
            })
        };
        let mut errors = check_paths(spec, |r| match r {
            PathRef::Upload(n) if uploaded(n) => PathVerdict::Ok,
            PathRef::Upload(_) => PathVerdict::NotAllowed,
            PathRef::Worker(p) => self.check_worker_path(user, p),
            PathRef::Model(_) if self.cfg.registry.is_some() => PathVerdict::Ok,
            PathRef::Model(_) => PathVerdict::NotAllowed,
        });
        if let JobSpec::Train(t) = spec {
            for (field, p) in [("labels_path", &t.labels_path), ("val_labels_path", &t.val_labels_path)] {
                if let Some(p) = p {
                    if !p.starts_with('/') && !p.ends_with(".pkg.slp") {
                        errors.push(FieldError::new(
                            field,
                            ErrorCode::Unsupported,
                            format!(
                                "{p} is a .slp that refers to video files, which are not uploaded; export a self-contained \
                                 training package (.pkg.slp) or name a path on the worker inside its mounts"
                            ),
                        ));
                    }
                }
            }
            if t.labels_path.is_none() {
                for (i, text) in t.config_contents.iter().enumerate() {
                    let info = bridge::ConfigInfo::parse(text).unwrap_or_default();
                    for (j, l) in info.train_labels.iter().enumerate() {
                        let bad = if l.starts_with('/') {
                            self.check_worker_path(user, l) != PathVerdict::Ok
                        } else {
                            !uploaded(l)
                        };
                        if bad {
                            errors.push(FieldError::new(
                                format!("config[{i}].train_labels_path[{j}]"),
                                ErrorCode::PathNotFound,
                                format!("the config trains on {l}, which is neither uploaded nor on the worker; pass labels_path"),
                            ));
                        }
                    }
                }
            }
        }
        errors
    }

    async fn submit(
        self: Arc<Self>,
        c: Attached<R>,
        user: String,
        client_job_id: String,
        spec: Value,
        files: Vec<FileEntry>,
    ) {
        let reject = |errors: Vec<FieldError>| {
            c.send(&JobMsg::JobRejected { client_job_id: client_job_id.clone(), errors });
        };
        let spec = match parse_spec(&spec) {
            Ok(s) => s.mapped(),
            Err(errors) => return reject(errors),
        };
        // path_mappings may have produced paths the unmapped spec did not have: check again.
        let errors = sleap_rtc_core::job::validate(&spec);
        if !errors.is_empty() {
            return reject(errors);
        }
        if files.len() > 10_000 {
            return reject(vec![FieldError::new("files", ErrorCode::InvalidValue, "too many files")]);
        }
        let mut errors = self.check_spec(&user, &spec, &files);
        if errors.is_empty() {
            errors = self.check_models(&spec).await;
        }
        if !errors.is_empty() {
            return reject(errors);
        }
        let job_id = match random_hex(8) {
            Ok(h) => format!("job_{h}"),
            Err(e) => {
                return reject(vec![FieldError::new(
                    "worker",
                    ErrorCode::Internal,
                    format!("cannot make a job id: {e}"),
                )]);
            }
        };
        let dir = self.jobs_dir.join(&job_id);
        let job = {
            let Ok(mut cur) = self.current.lock() else { return };
            if let Some(j) = cur.as_ref() {
                return reject(vec![FieldError::new(
                    "worker",
                    ErrorCode::Busy,
                    format!("worker {} is busy with job {}; try another worker or wait", self.peer_id, j.id),
                )]);
            }
            if let Err(e) = std::fs::create_dir_all(dir.join("input")) {
                return reject(vec![FieldError::new(
                    "worker",
                    ErrorCode::Internal,
                    format!("cannot create the job directory: {e}"),
                )]);
            }
            let mut j = Job::new(&job_id, spec.kind());
            let _ = j.transition(JobState::Accepted);
            let now = unix_now();
            let entry = JournalEntry {
                job: j,
                owner: user.clone(),
                spec: spec.clone(),
                status: JobStatus {
                    job_id: job_id.clone(),
                    kind: spec.kind(),
                    state: JobState::Accepted,
                    last_epoch: None,
                    message: None,
                    results: vec![],
                    duration_secs: None,
                    published: vec![],
                },
                created_at: now,
                updated_at: now,
                trainer_pid: None,
            };
            let job = Arc::new(ActiveJob {
                id: job_id.clone(),
                owner: user,
                dir: dir.clone(),
                started: std::time::Instant::now(),
                entry: Mutex::new(entry),
                attached: Mutex::new(vec![c.clone()]),
                interrupt: watch::channel(None).0,
            });
            *cur = Some(job.clone());
            job
        };
        job.save();
        let _ = self.status.send((Status::Busy, Some(job_id.clone())));
        tracing::info!(job = %job_id, kind = %spec.kind(), files = files.len(), "job accepted");
        // Ready to receive before the client hears "accepted" and starts sending: an offer that
        // arrived first would find nobody waiting, and its refusal (an unsafe name, say) would go
        // unheard while the job waited for an upload.
        let upload = self.expect_upload(&job, &c, &files).await;
        c.send(&JobMsg::JobAccepted { client_job_id, job_id: job_id.clone() });

        let (state, message, results) = match self.receive_upload(&job, &files, upload).await {
            Err(e) => {
                let cancelled = job.entry.lock().map(|e| e.job.cancel_requested).unwrap_or(false);
                if cancelled {
                    (JobState::Cancelled, "cancelled by the user during the upload".to_owned(), vec![])
                } else {
                    (JobState::Failed, format!("upload failed: {e}"), vec![])
                }
            }
            Ok(()) if job.entry.lock().map(|e| e.job.cancel_requested).unwrap_or(false) => {
                (JobState::Cancelled, "cancelled by the user before it started".to_owned(), vec![])
            }
            Ok(()) => {
                job.set_state(JobState::Running, None);
                let _ = self.status.send((Status::Busy, Some(job_id.clone())));
                match &spec {
                    JobSpec::Train(_) => self.run_training(&job, &spec).await,
                    JobSpec::Track(_) => self.run_tracking(&job, &spec).await,
                }
            }
        };
        self.finish(&job, state, message, results).await;
    }

    /// Places what the cache already has as complete `.part`s and starts waiting for the upload.
    async fn expect_upload(
        &self,
        job: &ActiveJob<R>,
        c: &Attached<R>,
        files: &[FileEntry],
    ) -> Result<Option<Transfer<Received>>, String> {
        if files.is_empty() {
            return Ok(None);
        }
        let Attached::Native(c) = c else {
            return Err("files can only be announced on this project's own protocol".into());
        };
        let input = job.dir.join("input");
        // Files the worker already has (same content hash) are placed as complete `.part`s:
        // the transfer then verifies them and sends nothing. Copies of datasets: the blocking pool.
        let (cache_dir, dir, wanted) = (self.cache_dir.clone(), input.clone(), files.to_vec());
        R::spawn_blocking(move || place_cached(&cache_dir, &dir, &wanted)).await;
        c.receive_files(&input).map(Some).map_err(|e| e.to_string())
    }

    async fn receive_upload(
        &self,
        job: &ActiveJob<R>,
        files: &[FileEntry],
        upload: Result<Option<Transfer<Received>>, String>,
    ) -> Result<(), String> {
        let Some(t) = upload? else { return Ok(()) };
        let input = job.dir.join("input");
        let got = timeout::<R, _>(Duration::from_secs(24 * 3600), t.finish())
            .await
            .map_err(|_| "the upload did not finish within a day".to_owned())?
            .map_err(|e| e.to_string())?;
        if !got.failed.is_empty() {
            let list: Vec<String> = got.failed.iter().map(|(n, why)| format!("{n}: {why}")).collect();
            return Err(list.join("; "));
        }
        // Only content whose hash we computed ourselves enters the cache under that hash: the
        // client's claimed hashes could otherwise poison another user's dataset slot.
        for f in files {
            let cached = self.cache_dir.join(&f.blake3);
            if cached.exists() || f.blake3.len() != 64 || sleap_rtc_core::transfer::validate_name(&f.name).is_err() {
                continue;
            }
            let src = input.join(&f.name);
            let p = src.clone();
            let actual = R::spawn_blocking(move || crate::files::hash_file(&p)).await.and_then(Result::ok);
            if actual.as_deref() == Some(f.blake3.as_str()) {
                let _ = std::fs::hard_link(&src, &cached);
            }
        }
        let (dir, cap) = (self.cache_dir.clone(), self.cfg.upload_cache_bytes);
        R::spawn_blocking(move || trim_upload_cache(&dir, cap)).await;
        Ok(())
    }

    /// Registry models a track job names must exist in the room's registry.
    async fn check_models(&self, spec: &JobSpec) -> Vec<FieldError> {
        let JobSpec::Track(t) = spec else { return vec![] };
        let refs: Vec<(usize, &str)> = t
            .model_paths
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.strip_prefix(sleap_rtc_core::job::MODEL_REF).map(|id| (i, id)))
            .collect();
        if refs.is_empty() {
            return vec![];
        }
        let field = |i: usize| format!("model_paths[{i}]");
        let manifest = match self.registry_manifest().await {
            Ok(m) => m,
            Err(e) => return vec![FieldError::new(field(refs[0].0), ErrorCode::Internal, format!("registry: {e}"))],
        };
        refs.into_iter()
            .filter_map(|(i, id)| {
                manifest.resolve(id).err().map(|e| FieldError::new(field(i), ErrorCode::PathNotFound, e.to_string()))
            })
            .collect()
    }

    async fn registry(&self) -> Result<(crate::registry::AnyStore<R>, String), String> {
        let root = self.cfg.registry.as_deref().ok_or("this worker has no model registry")?;
        let room = self.room.lock().ok().and_then(|r| r.clone()).ok_or("not registered in a room yet")?;
        let store = crate::registry::AnyStore::<R>::open(root).await.map_err(|e| e.to_string())?;
        Ok((store, room))
    }

    async fn registry_manifest(&self) -> Result<sleap_rtc_core::registry::Manifest, String> {
        let (store, room) = self.registry().await?;
        crate::registry::manifest(&store, &room).await.map_err(|e| e.to_string())
    }

    fn model_cache(&self) -> PathBuf {
        self.cfg.work_dir.join("model-cache")
    }

    /// A registry model on local disk: from the cache, or pulled (verified) into it. Records this
    /// worker in the model's `available_on_workers` and keeps the cache under its cap.
    async fn ensure_model(&self, query: &str) -> Result<PathBuf, String> {
        let (store, room) = self.registry().await?;
        let manifest = crate::registry::manifest(&store, &room).await.map_err(|e| e.to_string())?;
        let entry = manifest.resolve(query).map_err(|e| e.to_string())?.clone();
        let cache = self.model_cache();
        let dir = cache.join(&entry.id);
        let complete = dir.join(".complete");
        if complete.is_file() {
            // Recently used: LRU goes by this file's modification time.
            let _ =
                std::fs::File::options().write(true).open(&complete).and_then(|f| f.set_modified(SystemTime::now()));
            return Ok(dir);
        }
        let d = dir.clone();
        let _ = R::spawn_blocking(move || std::fs::remove_dir_all(d)).await;
        let (_, dir) = crate::registry::pull(&store, &room, &entry.id, &cache).await.map_err(|e| e.to_string())?;
        std::fs::write(&complete, b"").map_err(|e| e.to_string())?;
        let op = sleap_rtc_core::registry::Op::AddWorker { id: entry.id.clone(), worker: self.peer_id.clone() };
        if let Err(e) = crate::registry::update(&store, &room, vec![op]).await {
            tracing::warn!(model = %entry.id, error = %e, "cannot record this worker in available_on_workers");
        }
        Ok(dir)
    }

    /// `registry_query` (a signaling peer_message): does this worker have a model cached?
    async fn answer_registry_query(&self, query: &str) -> serde_json::Value {
        let id = match self.registry_manifest().await {
            Ok(m) => m.resolve(query).map(|e| e.id.clone()).ok(),
            Err(_) => None,
        };
        let cached = id.as_ref().is_some_and(|id| self.model_cache().join(id).join(".complete").is_file());
        json!({"type": "registry_answer", "model": query, "model_id": id, "cached": cached,
               "registry": self.cfg.registry.is_some()})
    }

    /// `registry_list` (a signaling peer_message from any room member, e.g. the dashboard): a
    /// summary of the room's registry and which of its models this worker has cached.
    async fn answer_registry_list(&self) -> Value {
        if self.cfg.registry.is_none() {
            return json!({"type": "registry_list_answer", "registry": false});
        }
        match self.registry_manifest().await {
            Ok(m) => {
                let cached: Vec<String> = m
                    .models
                    .keys()
                    .filter(|id| self.model_cache().join(id).join(".complete").is_file())
                    .cloned()
                    .collect();
                registry_summary(&m, &cached)
            }
            Err(e) => {
                // The detail (store addresses, SDK errors) stays in this log, not in the room.
                tracing::warn!(error = %e, "cannot read the registry for registry_list");
                json!({"type": "registry_list_answer", "registry": true, "error": "the worker cannot read the registry"})
            }
        }
    }

    /// Maps a spec path to an absolute worker path.
    fn resolve(&self, job: &ActiveJob<R>, p: &str) -> PathBuf {
        if p.starts_with('/') { PathBuf::from(p) } else { job.dir.join("input").join(p) }
    }

    /// Forwards trainer events to the attached clients and the journal.
    /// The receiver completes when the relay has forwarded the last event.
    fn relay(
        &self,
        job: &Arc<ActiveJob<R>>,
    ) -> (mpsc::UnboundedSender<TrainerEvent>, tokio::sync::oneshot::Receiver<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<TrainerEvent>();
        let job = job.clone();
        let published = self.cfg.publish_progress.then(|| self.progress.clone());
        let mut board = ProgressBoard::new(&job.id);
        let (done, task) = tokio::sync::oneshot::channel();
        R::spawn(async move {
            let _done = done;
            // Output lines are relayed at most LOG_BURST per second; a trainer that prints more
            // (a runaway loop) must not flood the client. The full output is in trainer.log.
            const LOG_BURST: u32 = 200;
            let mut window = std::time::Instant::now();
            let (mut sent, mut dropped) = (0u32, 0u64);
            while let Some(ev) = rx.recv().await {
                if window.elapsed() >= Duration::from_secs(1) {
                    if dropped > 0 {
                        job.emit(&JobMsg::JobLog {
                            job_id: job.id.clone(),
                            stream: Stream::Stderr,
                            text: format!(
                                "[{dropped} lines of output not relayed; the worker keeps them in trainer.log]"
                            ),
                            cr: false,
                        });
                    }
                    window = std::time::Instant::now();
                    (sent, dropped) = (0, 0);
                }
                if let TrainerEvent::Log(_) = &ev {
                    if sent >= LOG_BURST {
                        dropped += 1;
                        continue;
                    }
                    sent += 1;
                }
                match ev {
                    TrainerEvent::Spawned(pid) => {
                        if let Ok(mut e) = job.entry.lock() {
                            e.trainer_pid = Some(pid);
                        }
                        job.save();
                    }
                    TrainerEvent::Progress(p) => {
                        if let Some(tx) = &published {
                            if board.apply(&p) {
                                tx.send_replace(Some(board.to_value()));
                            }
                        }
                        if matches!(p, Progress::EpochEnd { .. }) {
                            if let Ok(mut e) = job.entry.lock() {
                                e.status.last_epoch = Some(p.clone());
                                e.updated_at = unix_now();
                            }
                            job.save();
                        }
                        job.emit(&JobMsg::JobProgress { job_id: job.id.clone(), progress: p });
                    }
                    TrainerEvent::Log(l) => {
                        job.emit(&JobMsg::JobLog { job_id: job.id.clone(), stream: l.stream, text: l.text, cr: l.cr })
                    }
                    TrainerEvent::Report(raw) => job.emit_report(&raw),
                }
            }
        });
        (tx, task)
    }

    async fn run_training(&self, job: &Arc<ActiveJob<R>>, spec: &JobSpec) -> (JobState, String, Vec<String>) {
        let JobSpec::Train(t) = spec else { return (JobState::Failed, "not a training job".into(), vec![]) };
        // Configs: worker/uploaded files first, then inline ones (upstream's order).
        let mut configs = Vec::new();
        for p in &t.config_paths {
            match std::fs::read_to_string(self.resolve(job, p)) {
                Ok(text) => configs.push(text),
                Err(e) => return (JobState::Failed, format!("cannot read config {p}: {e}"), vec![]),
            }
        }
        configs.extend(t.config_contents.iter().cloned());
        let runs_dir = job.dir.join("runs");
        let mut results = Vec::new();
        let mut outcome = (JobState::Completed, "training completed".to_owned());
        let n = configs.len();
        for (i, text) in configs.iter().enumerate() {
            let info = match bridge::ConfigInfo::parse(text) {
                Ok(i) => i,
                Err(e) => return (JobState::Failed, format!("config {}: {e}", i + 1), results),
            };
            let model_type =
                t.model_types.get(i).cloned().or(info.model_type.clone()).unwrap_or_else(|| "model".into());
            let run_name = match (&t.run_name, n) {
                (Some(r), 1) => r.clone(),
                (Some(r), _) => format!("{r}.{model_type}"),
                (None, _) => info.run_name.clone().unwrap_or(model_type.clone()),
            };
            // The name becomes a directory under runs/: whatever the config says, it must be safe.
            let run_name =
                if sleap_rtc_core::job::check_run_name(&run_name).is_ok() { run_name } else { format!("model_{i}") };
            let config_path = job.dir.join(format!("config_{i}.yaml"));
            if let Err(e) = std::fs::write(&config_path, text) {
                return (JobState::Failed, format!("cannot write the config: {e}"), results);
            }
            if n > 1 {
                job.emit(&JobMsg::JobLog {
                    job_id: job.id.clone(),
                    stream: Stream::Stdout,
                    text: format!("Training model {}/{n}: {model_type}", i + 1),
                    cr: false,
                });
            }
            let run = TrainRun {
                config: config_path.display().to_string(),
                labels: t.labels_path.as_deref().map(|p| self.resolve(job, p).display().to_string()),
                val_labels: t.val_labels_path.as_deref().map(|p| self.resolve(job, p).display().to_string()),
                resume: t.resume_ckpt_path.as_deref().map(|p| self.resolve(job, p).display().to_string()),
                ckpt_dir: runs_dir.display().to_string(),
                run_name: run_name.clone(),
                publish_port: 0,
                controller_port: 0,
            };
            let launch = Launch {
                program: self.cfg.sleap_nn.clone(),
                cwd: job.dir.clone(),
                log_file: job.dir.join("trainer.log"),
            };
            let (tx, relay_task) = self.relay(job);
            let _ = tx.send(TrainerEvent::Progress(Progress::Started { model: Some(run_name.clone()) }));
            let mut interrupt = job.interrupt.subscribe();
            interrupt.mark_changed();
            let pid_job = job.clone();
            let exit = trainer::run_train::<R>(
                &launch,
                move |publish_port, controller_port| {
                    let run = TrainRun { publish_port, controller_port, ..run };
                    bridge::train_args(t, &run)
                },
                &self.cfg.supervision,
                interrupt,
                tx,
            )
            .await;
            let _ = relay_task.await;
            if let Ok(mut e) = pid_job.entry.lock() {
                e.trainer_pid = None;
            }
            let exit = match exit {
                Ok(e) => e,
                Err(e) => return (JobState::Failed, e.to_string(), results),
            };
            let (stop, cancel) =
                job.entry.lock().map(|e| (e.job.stop_requested, e.job.cancel_requested)).unwrap_or_default();
            let run_dir = runs_dir.join(&run_name);
            let te = TrainExit {
                code: exit.code,
                signal: exit.signal,
                train_end: exit.train_end,
                best_ckpt: run_dir.join("best.ckpt").is_file(),
                stop_requested: stop,
                cancel_requested: cancel,
            };
            let (state, mut message) = bridge::classify_train(&te);
            if state == JobState::Failed && !exit.stderr_tail.is_empty() {
                let tail: Vec<&String> =
                    exit.stderr_tail.iter().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
                message = format!(
                    "{message}; last output: {}",
                    tail.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" | ")
                );
            }
            if state.has_results() {
                results.push(format!("runs/{run_name}"));
                message = self.publish(job, &run_dir, message).await;
            }
            outcome = (state, message);
            if state != JobState::Completed {
                break;
            }
        }
        (outcome.0, outcome.1, results)
    }

    /// Publishes a finished run to the room's registry, if one is configured. A failure to
    /// publish does not fail the job (the model still goes back to the client); it is reported.
    async fn publish(&self, job: &Arc<ActiveJob<R>>, run_dir: &Path, message: String) -> String {
        let Some(root) = &self.cfg.registry else { return message };
        let Some(room) = self.room.lock().ok().and_then(|r| r.clone()) else { return message };
        let last = job.entry.lock().ok().and_then(|e| e.status.last_epoch.clone());
        let (epochs, final_loss) = match last {
            Some(Progress::EpochEnd { epoch, loss, val_loss }) => (Some(epoch + 1), val_loss.or(loss)),
            _ => (None, None),
        };
        // Reads and hashes the dataset splits: the blocking pool.
        let dir = run_dir.to_path_buf();
        let dataset_hash = R::spawn_blocking(move || crate::registry::dataset_hash(&dir)).await.unwrap_or_default();
        let info = crate::registry::PublishInfo {
            trained_by: job.owner.clone(),
            trained_on_worker: self.peer_id.clone(),
            dataset_hash,
            epochs,
            final_loss,
            training_duration_sec: Some(job.started.elapsed().as_secs_f64()),
            ..Default::default()
        };
        let store = match crate::registry::AnyStore::<R>::open(root).await {
            Ok(s) => s,
            Err(err) => return format!("{message}; cannot open the registry {root}: {err}"),
        };
        match crate::registry::publish(&store, &room, run_dir, info).await {
            Ok(e) => {
                tracing::info!(job = %job.id, model = %e.id, "model published to the room registry");
                if let Ok(mut en) = job.entry.lock() {
                    en.status.published.push(e.id.clone());
                }
                format!("{message}; published to the room registry as model {}", e.id)
            }
            Err(err) => {
                tracing::warn!(job = %job.id, error = %err, "publishing the model failed");
                format!("{message}; publishing to the registry failed: {err}")
            }
        }
    }

    async fn run_tracking(&self, job: &Arc<ActiveJob<R>>, spec: &JobSpec) -> (JobState, String, Vec<String>) {
        let JobSpec::Track(t) = spec else { return (JobState::Failed, "not a track job".into(), vec![]) };
        let data = self.resolve(job, &t.data_path).display().to_string();
        let mut models: Vec<String> = Vec::new();
        let mut cached: Vec<String> = Vec::new();
        for m in &t.model_paths {
            match m.strip_prefix(sleap_rtc_core::job::MODEL_REF) {
                Some(id) => match self.ensure_model(id).await {
                    Ok(dir) => {
                        cached.extend(dir.file_name().map(|n| n.to_string_lossy().into_owned()));
                        models.push(dir.display().to_string());
                    }
                    Err(e) => {
                        return (JobState::Failed, format!("cannot fetch model {id} from the registry: {e}"), vec![]);
                    }
                },
                None => models.push(self.resolve(job, m).display().to_string()),
            }
        }
        let out_name = t.output_path.clone().unwrap_or_else(|| bridge::predictions_name(&t.data_path));
        let out_dir = job.dir.join("output");
        if let Err(e) = std::fs::create_dir_all(&out_dir) {
            return (JobState::Failed, format!("cannot create the output directory: {e}"), vec![]);
        }
        let output = out_dir.join(&out_name);
        let argv = bridge::track_args(t, &data, &models, &output.display().to_string(), &self.cfg.device);
        let launch =
            Launch { program: self.cfg.sleap_nn.clone(), cwd: job.dir.clone(), log_file: job.dir.join("trainer.log") };
        let (tx, relay_task) = self.relay(job);
        let mut interrupt = job.interrupt.subscribe();
        interrupt.mark_changed();
        let exit = trainer::run_predict::<R>(&launch, &argv, &self.cfg.supervision, interrupt, tx).await;
        let _ = relay_task.await;
        if !cached.is_empty() {
            let (cache, cap) = (self.model_cache(), self.cfg.model_cache_bytes);
            R::spawn_blocking(move || trim_model_cache(&cache, &cached, cap)).await;
        }
        let exit = match exit {
            Ok(e) => e,
            Err(e) => return (JobState::Failed, e.to_string(), vec![]),
        };
        let cancelled = job.entry.lock().map(|e| e.job.cancel_requested).unwrap_or(false);
        if cancelled {
            return (JobState::Cancelled, "cancelled by the user".into(), vec![]);
        }
        if exit.code == Some(0) && output.is_file() {
            return (JobState::Completed, "inference completed".into(), vec![format!("output/{out_name}")]);
        }
        let why = match (exit.error, exit.code, exit.signal) {
            (Some(e), _, _) => e,
            (None, Some(0), _) => "sleap-nn exited 0 but wrote no predictions file".into(),
            (None, Some(c), _) => format!(
                "sleap-nn exited with code {c}; last output: {}",
                exit.stderr_tail.iter().rev().take(3).rev().cloned().collect::<Vec<_>>().join(" | ")
            ),
            (None, None, Some(s)) => format!("sleap-nn was killed by signal {s}"),
            _ => "sleap-nn ended for an unknown reason".into(),
        };
        (JobState::Failed, why, vec![])
    }

    async fn finish(&self, job: &Arc<ActiveJob<R>>, state: JobState, message: String, results: Vec<String>) {
        let duration = job.started.elapsed().as_secs_f64();
        if let Ok(mut e) = job.entry.lock() {
            if e.job.transition(state).is_err() {
                e.job.state = state;
            }
            e.status.state = state;
            e.status.message = Some(message.clone());
            e.status.results = results.clone();
            e.status.duration_secs = Some(duration);
            e.updated_at = unix_now();
        }
        job.save();
        tracing::info!(job = %job.id, %state, %message, "job finished");
        let status = job.status();
        // Free the worker before saying so: a client that resubmits on job_done must not see busy.
        if let Ok(mut cur) = self.current.lock() {
            *cur = None;
        }
        self.progress.send_replace(None);
        let _ = self.status.send((Status::Available, None));
        let conns: Vec<Attached<R>> = job.attached.lock().map(|a| a.clone()).unwrap_or_default();
        job.emit(&JobMsg::JobDone { status: status.clone() });
        if !results.is_empty() {
            // Upstream clients get their results from their adapter, in their own framing.
            for c in conns.into_iter().filter_map(|c| match c {
                Attached::Native(c) => Some(c),
                Attached::Upstream(_) => None,
            }) {
                if c.state() != conn::ConnState::Closed {
                    let (dir, results) = (job.dir.clone(), results.clone());
                    R::spawn(async move { send_results(c, &dir, &results).await });
                }
            }
        }
    }
}

/// Keeps the upload cache under its cap, dropping the least recently modified entries.
fn trim_upload_cache(dir: &Path, cap: u64) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let entries: Vec<(SystemTime, u64, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    evict_lru(entries, 0, cap, |p| std::fs::remove_file(p));
}

/// Evicts least recently used models from `cache` beyond `cap`, never those in `keep` (the
/// job's).
fn trim_model_cache(cache: &Path, keep: &[String], cap: u64) {
    let Ok(rd) = std::fs::read_dir(cache) else { return };
    let dirs: Vec<(SystemTime, u64, PathBuf)> = rd
        .flatten()
        .filter(|e| !keep.iter().any(|k| e.file_name() == k.as_str()))
        .filter_map(|e| {
            let used = std::fs::metadata(e.path().join(".complete")).and_then(|m| m.modified()).ok()?;
            let size: u64 =
                std::fs::read_dir(e.path()).ok()?.flatten().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
            Some((used, size, e.path()))
        })
        .collect();
    let keep_size: u64 = keep
        .iter()
        .flat_map(|k| std::fs::read_dir(cache.join(k)).into_iter().flatten().flatten())
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum();
    evict_lru(dirs, keep_size, cap, |p| {
        tracing::info!(model = %p.display(), "evicted from the model cache");
        std::fs::remove_dir_all(p)
    });
}

/// Copies cached uploads (by content hash) into `input` as complete `.part`s.
fn place_cached(cache_dir: &Path, input: &Path, files: &[FileEntry]) {
    for f in files {
        let cached = cache_dir.join(&f.blake3);
        let ok_hash = f.blake3.len() == 64 && f.blake3.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok_hash || sleap_rtc_core::transfer::validate_name(&f.name).is_err() {
            continue;
        }
        // symlink_metadata: a link planted in the cache must not make us copy whatever it
        // points at into the job.
        if std::fs::symlink_metadata(&cached).map(|m| m.file_type().is_file() && m.len() == f.size).unwrap_or(false) {
            let part = input.join(format!("{}{}", f.name, crate::files::PART_SUFFIX));
            if let Some(parent) = part.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            // A copy, not a link: a resumed transfer appends to `.part`, which must never
            // write into the cache.
            let _ = std::fs::copy(&cached, &part);
        }
    }
}

/// Removes least recently used entries `(last use, bytes, path)` until they and `pinned` bytes
/// (entries that must stay) fit in `cap`.
fn evict_lru(
    mut entries: Vec<(SystemTime, u64, PathBuf)>,
    pinned: u64,
    cap: u64,
    remove: impl Fn(&Path) -> std::io::Result<()>,
) {
    let mut total = pinned + entries.iter().map(|e| e.1).sum::<u64>();
    entries.sort();
    for (_, size, path) in entries {
        if total <= cap {
            break;
        }
        if remove(&path).is_ok() {
            total -= size;
        }
    }
}

async fn send_results<R: Runtime>(c: Arc<PeerConnection<R>>, dir: &Path, results: &[String]) {
    let paths: Vec<PathBuf> = results.iter().map(|r| dir.join(r)).collect();
    match c.send_files(&paths).await {
        Ok(t) => match t.finish().await {
            Ok(s) => tracing::info!(bytes = s.bytes, "results sent"),
            Err(e) => tracing::warn!(error = %e, "sending results failed; the client can fetch them with job attach"),
        },
        Err(e) => tracing::warn!(error = %e, "cannot send results"),
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
