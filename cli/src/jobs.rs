//! `train`, `track` and `job attach`: connect to a worker through the room, submit, upload,
//! follow progress, handle Ctrl-C (once = stop early, twice = cancel), fetch results.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use sleap_rtc_core::job::bridge::ConfigInfo;
use sleap_rtc_core::job::{JobKind, JobMsg, JobState, JobStatus, Progress, Stream};
use sleap_rtc_core::signal::{Filters, PeerInfo, Register};
use sleap_rtc_tokio::client::{ClientAuth, JobClient, JobClientError};
use sleap_rtc_tokio::{PeerOptions, SignalingClient};

use crate::creds::{self, JobRecord};

/// Exit codes (documented in `--help`).
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_REJECTED: i32 = 2;
pub const EXIT_DISCONNECTED: i32 = 3;
pub const EXIT_CANCELLED: i32 = 130;

/// Inline configs up to this size travel in the job message; larger ones are uploaded.
const INLINE_CONFIG_MAX: usize = 40 * 1024;

/// A signaling server given as `http(s)://host:port` or `ws(s)://host:port[/ws]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerUrl {
    pub ws: String,
    pub http: String,
}

impl ServerUrl {
    pub fn parse(s: &str) -> Result<ServerUrl> {
        let s = s.trim();
        let (scheme, rest) = s.split_once("://").unwrap_or(("http", s));
        let (ws_scheme, http_scheme) = match scheme {
            "http" | "ws" => ("ws", "http"),
            "https" | "wss" => ("wss", "https"),
            other => bail!("--server {s}: unsupported scheme {other}:// (use http://, https://, ws:// or wss://)"),
        };
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() {
            bail!("--server {s}: no host");
        }
        let url = ServerUrl { ws: format!("{ws_scheme}://{host}/ws"), http: format!("{http_scheme}://{host}") };
        if let Some(w) = url.plaintext_warning() {
            eprintln!("warning: {w}");
        }
        Ok(url)
    }

    /// Upstream defaulted to plain `ws://` (B25): tokens crossed the network in clear. Plain
    /// HTTP stays allowed (a lab LAN, an SSH tunnel) but anything beyond loopback is called out.
    pub fn plaintext_warning(&self) -> Option<String> {
        let host = self.http.strip_prefix("http://")?;
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host.split(':').next().unwrap_or_default(),
        };
        let loopback =
            name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        (!loopback).then(|| {
            format!(
                "{} is plain HTTP: your credentials and the room's signaling cross the network unencrypted; \
                 use https:// (a TLS-terminating proxy in front of the server)",
                self.http
            )
        })
    }
}

/// How to reach a worker.
#[derive(Debug, Clone)]
pub struct Target {
    pub server: ServerUrl,
    pub room: String,
    pub credential: String,
    pub worker: Option<String>,
    pub min_gpu_memory_mb: u64,
    pub auth: ClientAuth,
    pub peer: PeerOptions,
}

/// How to show what happens.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ui {
    /// One JSON object per line on stdout instead of bars and prose.
    pub json: bool,
    /// Show the trainer's output lines.
    pub verbose: bool,
}

impl Ui {
    fn event(&self, v: Value) {
        if self.json {
            println!("{v}");
        }
    }

    fn say(&self, bar: Option<&ProgressBar>, text: impl AsRef<str>) {
        if self.json {
            return;
        }
        match bar {
            Some(b) if !b.is_hidden() => b.println(text.as_ref()),
            _ => eprintln!("{}", text.as_ref()),
        }
    }
}

fn register(target: &Target) -> Register {
    client_register(&target.room, &target.credential)
}

/// A client's `register` for `room`: an `slp_` key goes as `api_key`, anything else as `jwt`.
pub fn client_register(room: &str, credential: &str) -> Register {
    let mut r = Register { role: Some("client".into()), room_id: Some(room.to_owned()), ..Default::default() };
    if credential.starts_with("slp_") {
        r.api_key = Some(credential.to_owned());
    } else {
        r.jwt = Some(credential.to_owned());
    }
    r
}

fn prop<'a>(p: &'a PeerInfo, key: &str) -> Option<&'a Value> {
    p.metadata.get("properties").and_then(|v| v.get(key))
}

/// Picks a worker: the named one, or the available worker with the most GPU memory.
pub fn select_worker(workers: &[PeerInfo], wanted: Option<&str>, min_gpu_mb: u64) -> Result<String> {
    if let Some(w) = wanted {
        return match workers.iter().find(|p| p.peer_id == w) {
            Some(p) => Ok(p.peer_id.clone()),
            None => bail!(
                "worker {w} is not in the room (online: {})",
                workers.iter().map(|p| p.peer_id.as_str()).collect::<Vec<_>>().join(", ")
            ),
        };
    }
    if workers.is_empty() {
        bail!("no worker is online in this room; start one with `sleap-rtc worker --room ROOM --token TOKEN`");
    }
    let mem = |p: &PeerInfo| prop(p, "gpu_memory_mb").and_then(Value::as_u64).unwrap_or(0);
    let free = |p: &PeerInfo| prop(p, "status").and_then(Value::as_str).unwrap_or("available") == "available";
    // Jobs admitted (running, uploading, waiting) and how many the worker takes; a worker
    // without a queue (or an older one) takes one.
    let queued = |p: &PeerInfo| prop(p, "queue_length").and_then(Value::as_u64).unwrap_or(u64::from(!free(p)));
    let capacity = |p: &PeerInfo| prop(p, "queue_capacity").and_then(Value::as_u64).unwrap_or(1);
    let fits: Vec<&PeerInfo> = workers.iter().filter(|p| mem(p) >= min_gpu_mb).collect();
    if fits.is_empty() {
        bail!("no worker in the room has at least {min_gpu_mb} MB of GPU memory");
    }
    // The shortest wait: an idle worker, else the shortest queue with room; then the most memory.
    let best = fits.iter().filter(|p| free(p) || queued(p) < capacity(p)).min_by_key(|p| {
        let wait = if free(p) { 0 } else { queued(p).max(1) };
        (wait, std::cmp::Reverse(mem(p)))
    });
    match best {
        Some(p) => Ok(p.peer_id.clone()),
        None => bail!(
            "all {} workers in the room are busy and their queues are full; try again later or name one with --worker",
            fits.len()
        ),
    }
}

/// Registers in the room, finds a worker, connects and authenticates.
pub async fn open(target: &Target, ui: &Ui) -> Result<(SignalingClient, JobClient)> {
    // A connection to a worker follows: make the DTLS key while we register.
    sleap_rtc_tokio::conn::prepare_certificate();
    let sig = SignalingClient::connect(&target.server.ws, register(target))
        .await
        .with_context(|| format!("cannot join room {} on {}", target.room, target.server.http))?;
    let workers = sig
        .discover(Filters { role: Some("worker".into()), ..Default::default() })
        .await
        .context("cannot list the room's workers")?;
    let worker = select_worker(&workers, target.worker.as_deref(), target.min_gpu_memory_mb)?;
    if let Some(p) = workers.iter().find(|p| p.peer_id == worker) {
        let gpu = prop(p, "gpu_model").and_then(Value::as_str).unwrap_or("?");
        let nn = prop(p, "sleap_nn_version").and_then(Value::as_str).unwrap_or("?");
        ui.say(None, format!("worker {worker} ({gpu}, sleap-nn {nn})"));
    }
    ui.event(json!({"event": "worker", "worker": worker}));
    let client = JobClient::connect(&sig, &worker, target.peer.clone(), &target.auth)
        .await
        .with_context(|| format!("cannot connect to worker {worker}"))?;
    let route = client.connection().route();
    let relayed = route == Some(sleap_rtc_tokio::conn::Route::Relayed);
    ui.say(None, format!("connected to {worker} ({})", route.map_or("route unknown".to_string(), |r| r.to_string())));
    ui.event(json!({"event": "connected", "worker": worker, "route": if relayed { "relayed" } else { "direct" }}));
    Ok((sig, client))
}

/// What `train` was asked.
#[derive(Debug, Clone, Default)]
pub struct TrainArgs {
    pub configs: Vec<PathBuf>,
    pub labels: Option<String>,
    pub val_labels: Option<String>,
    pub max_epochs: Option<u32>,
    pub batch_size: Option<u32>,
    pub learning_rate: Option<f64>,
    pub run_name: Option<String>,
    pub resume: Option<String>,
}

/// `worker:/abs/path` names a file on the worker; anything else is a local file to upload.
fn worker_path(s: &str) -> Option<&str> {
    s.strip_prefix("worker:")
}

/// A local file to upload under its base name, with a check that names do not collide.
fn add_upload(uploads: &mut Vec<PathBuf>, p: &Path) -> Result<String> {
    let name = p
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no usable file name", p.display()))?
        .to_owned();
    if uploads.iter().any(|u| u.file_name().and_then(|n| n.to_str()) == Some(name.as_str()) && u != p) {
        bail!("two files to upload are both named {name}; rename one");
    }
    if !uploads.iter().any(|u| u == p) {
        uploads.push(p.to_path_buf());
    }
    Ok(name)
}

fn labels_ref(s: &str, field: &str, uploads: &mut Vec<PathBuf>, base: Option<&Path>) -> Result<String> {
    if let Some(w) = worker_path(s) {
        if !w.starts_with('/') {
            bail!("{field} {s}: a worker path must be absolute");
        }
        return Ok(w.to_owned());
    }
    let p = match base {
        Some(b) if Path::new(s).is_relative() => b.join(s),
        _ => PathBuf::from(s),
    };
    if !p.is_file() {
        bail!("{field} {}: no such file", p.display());
    }
    let name = p.to_string_lossy();
    if name.ends_with(".slp") && !name.ends_with(".pkg.slp") {
        bail!(
            "{field} {}: this .slp refers to video files, which would not be on the worker.\n  \
             Export a self-contained training package instead (SLEAP: File → Export Training Package, or\n  \
             `sio.save_slp(sio.load_slp(\"{}\"), \"labels.pkg.slp\", embed=\"user\")`), or name a file that is\n  \
             already on the worker with worker:/path/inside/its/mounts.",
            p.display(),
            p.display()
        );
    }
    add_upload(uploads, &p)
}

/// Builds a train spec and its uploads. Checks what can be checked locally first, so a typo
/// costs no upload.
pub fn train_spec(a: &TrainArgs) -> Result<(Value, Vec<PathBuf>, Option<u32>)> {
    if a.configs.is_empty() {
        bail!("--config is required");
    }
    let mut uploads = Vec::new();
    let mut contents = Vec::new();
    let mut paths = Vec::new();
    let mut epochs = a.max_epochs;
    let mut labels = a.labels.clone();
    for c in &a.configs {
        let text = std::fs::read_to_string(c).with_context(|| format!("cannot read config {}", c.display()))?;
        let info = ConfigInfo::parse(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", c.display()))?;
        if epochs.is_none() {
            epochs = max_epochs_of(&text);
        }
        // No --labels: train on what the config names, relative to the config's directory.
        if labels.is_none() {
            if let Some(l) = info.train_labels.first() {
                let base = c.parent().unwrap_or(Path::new("."));
                let p = if l.starts_with('/') { PathBuf::from(l) } else { base.join(l) };
                labels = Some(p.display().to_string());
            }
        }
        if text.len() <= INLINE_CONFIG_MAX {
            contents.push(text);
        } else {
            paths.push(add_upload(&mut uploads, c)?);
        }
    }
    let Some(labels) = labels else { bail!("--labels is required (the config names no train_labels_path)") };
    let labels_path = labels_ref(&labels, "--labels", &mut uploads, None)?;
    let mut spec = json!({"type": "train", "labels_path": labels_path});
    if !contents.is_empty() {
        spec["config_contents"] = json!(contents);
    }
    if !paths.is_empty() {
        spec["config_paths"] = json!(paths);
    }
    if let Some(v) = &a.val_labels {
        spec["val_labels_path"] = json!(labels_ref(v, "--val-labels", &mut uploads, None)?);
    }
    if let Some(r) = &a.resume {
        spec["resume_ckpt_path"] = json!(match worker_path(r) {
            Some(w) => w.to_owned(),
            None => add_upload(&mut uploads, Path::new(r))?,
        });
    }
    for (k, v) in [("max_epochs", a.max_epochs.map(Value::from)), ("batch_size", a.batch_size.map(Value::from))] {
        if let Some(v) = v {
            spec[k] = v;
        }
    }
    if let Some(lr) = a.learning_rate {
        spec["learning_rate"] = json!(lr);
    }
    if let Some(r) = &a.run_name {
        spec["run_name"] = json!(r);
    }
    // The worker checks again; checking here gives the error before anything is uploaded.
    if let Err(errors) = sleap_rtc_core::job::parse_spec(&spec) {
        return Err(JobClientError::Rejected(errors).into());
    }
    Ok((spec, uploads, epochs))
}

fn max_epochs_of(yaml: &str) -> Option<u32> {
    yaml.lines().find_map(|l| l.trim().strip_prefix("max_epochs:").and_then(|v| v.trim().parse().ok()))
}

/// What `track` was asked.
#[derive(Debug, Clone, Default)]
pub struct TrackArgs {
    pub models: Vec<String>,
    pub data: String,
    pub output: PathBuf,
    pub batch_size: Option<u32>,
    pub peak_threshold: Option<f64>,
    pub frames: Option<String>,
    pub frame_filter: Option<String>,
    pub exclude_user_labeled: bool,
    pub video_index: Option<u32>,
}

pub fn track_spec(a: &TrackArgs) -> Result<(Value, Vec<PathBuf>)> {
    let mut uploads = Vec::new();
    let mut models = Vec::new();
    if a.models.is_empty() {
        bail!("--model is required");
    }
    for m in &a.models {
        if let Some(w) = worker_path(m) {
            models.push(w.to_owned());
            continue;
        }
        let p = Path::new(m);
        // Not a directory here: a model of the room's registry, by id or alias.
        if !p.exists() && sleap_rtc_core::registry::check_name("model", m).is_ok() {
            models.push(format!("{}{m}", sleap_rtc_core::job::MODEL_REF));
            continue;
        }
        let ok = p.join("best.ckpt").is_file()
            && (p.join("training_config.yaml").is_file() || p.join("training_config.json").is_file());
        if !ok {
            bail!("--model {m}: not a trained model directory (it needs best.ckpt and training_config.yaml)");
        }
        models.push(add_upload(&mut uploads, p)?);
    }
    let data = match worker_path(&a.data) {
        Some(w) => w.to_owned(),
        None => labels_ref(&a.data, "--data", &mut uploads, None)?,
    };
    let out_name = a
        .output
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("-o {}: needs a file name", a.output.display()))?;
    let mut spec = json!({"type": "track", "data_path": data, "model_paths": models, "output_path": out_name});
    if let Some(b) = a.batch_size {
        spec["batch_size"] = json!(b);
    }
    if let Some(p) = a.peak_threshold {
        spec["peak_threshold"] = json!(p);
    }
    if let Some(f) = &a.frames {
        spec["frames"] = json!(f);
    }
    if let Some(f) = &a.frame_filter {
        spec["frame_filter"] = json!(f);
    }
    if a.exclude_user_labeled {
        spec["exclude_user_labeled"] = json!(true);
    }
    if let Some(v) = a.video_index {
        spec["video_index"] = json!(v);
    }
    if let Err(errors) = sleap_rtc_core::job::parse_spec(&spec) {
        return Err(JobClientError::Rejected(errors).into());
    }
    Ok((spec, uploads))
}

/// Where results go.
#[derive(Debug, Clone)]
pub enum Output {
    /// Training: run directories land inside.
    Dir(PathBuf),
    /// Inference: the predictions file.
    File(PathBuf),
}

impl Output {
    fn receive_dir(&self) -> PathBuf {
        match self {
            Output::Dir(d) => d.clone(),
            Output::File(f) => {
                f.parent().map(Path::to_path_buf).filter(|p| !p.as_os_str().is_empty()).unwrap_or(".".into())
            }
        }
    }

    fn path(&self) -> &Path {
        match self {
            Output::Dir(p) | Output::File(p) => p,
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Submits a job and follows it to the end. Returns the process exit code.
pub async fn run(
    target: &Target,
    kind: JobKind,
    spec: Value,
    uploads: Vec<PathBuf>,
    out: Output,
    epochs: Option<u32>,
    ui: Ui,
) -> Result<i32> {
    let (_sig, client) = open(target, &ui).await?;
    let worker = client.connection().remote_peer().to_owned();
    let (job_id, upload) = match client.submit(&spec, &uploads).await {
        Ok(x) => x,
        Err(JobClientError::Rejected(errors)) => {
            ui.event(json!({"event": "rejected", "errors": errors}));
            if !ui.json {
                eprintln!("{}", JobClientError::Rejected(errors));
            }
            return Ok(EXIT_REJECTED);
        }
        Err(e) => return Err(e.into()),
    };
    let record = JobRecord {
        job_id: job_id.clone(),
        kind: kind.to_string(),
        server: target.server.http.clone(),
        room: target.room.clone(),
        worker,
        output: std::path::absolute(out.path()).unwrap_or(out.path().to_path_buf()),
        submitted_at: unix_now(),
    };
    if let Err(e) = creds::save_job(&record) {
        tracing::warn!(error = %e, "cannot record the job locally; `job attach` will need --server/--room/--worker");
    }
    ui.event(json!({"event": "accepted", "job_id": job_id}));
    ui.say(None, format!("job {job_id} accepted"));
    follow(&client, &job_id, kind, &out, upload, epochs, ui).await
}

/// Reconnects to a job (after a disconnect) and follows it; fetches results if it has finished.
pub async fn attach(target: &Target, job_id: &str, kind: JobKind, out: Output, ui: Ui) -> Result<i32> {
    let (_sig, client) = open(target, &ui).await?;
    client.attach(job_id, true)?;
    follow(&client, job_id, kind, &out, None, None, ui).await
}

/// `job list`: this user's jobs on every worker of the room (or `target.worker`), newest first.
/// Workers that cannot be reached are named on stderr; the others are still listed.
pub async fn list_remote(target: &Target, ui: Ui) -> Result<i32> {
    sleap_rtc_tokio::conn::prepare_certificate();
    let sig = SignalingClient::connect(&target.server.ws, register(target))
        .await
        .with_context(|| format!("cannot join room {} on {}", target.room, target.server.http))?;
    let ids: Vec<String> = match &target.worker {
        Some(w) => vec![w.clone()],
        None => sig
            .discover(Filters { role: Some("worker".into()), ..Default::default() })
            .await
            .context("cannot list the room's workers")?
            .into_iter()
            .map(|p| p.peer_id)
            .collect(),
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let mut rows = Vec::new();
    let mut failed = 0;
    for w in &ids {
        let listed = tokio::time::timeout(Duration::from_secs(30), async {
            let c = JobClient::connect(&sig, w, target.peer.clone(), &target.auth).await?;
            // Dropping the client closes the connection.
            anyhow::Ok(c.list().await?)
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in 30 s")));
        match listed {
            Ok(jobs) => rows.extend(jobs.into_iter().map(|j| (w.clone(), j))),
            Err(e) => {
                failed += 1;
                eprintln!("warning: worker {w}: {e:#}");
            }
        }
    }
    rows.sort_by(|a, b| b.1.created_at.total_cmp(&a.1.created_at));
    if ui.json {
        let out: Vec<Value> = rows
            .iter()
            .map(|(w, j)| {
                json!({
                    "job_id": j.status.job_id, "kind": j.status.kind, "state": j.status.state, "worker": w,
                    "ahead": j.ahead, "last_epoch": j.status.last_epoch, "message": j.status.message,
                    "age_secs": (now - j.created_at).max(0.0).round(), "updated_at": j.updated_at,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if rows.is_empty() {
        eprintln!("no jobs of yours on {} worker(s) in room {}", ids.len() - failed, target.room);
    } else {
        println!("{:<22} {:<6} {:<14} {:<28} {:>8}  PROGRESS", "JOB", "KIND", "STATE", "WORKER", "AGE");
        for (w, j) in &rows {
            let progress = match (j.ahead, &j.status.last_epoch) {
                (Some(n), _) => format!("{n} job(s) ahead"),
                (None, Some(Progress::EpochEnd { epoch, loss, .. })) => {
                    format!("epoch {epoch}, loss {}", fmt_loss(*loss))
                }
                (None, Some(p)) => format!("{p:?}").chars().take(40).collect(),
                (None, None) => j.status.message.clone().unwrap_or_default().chars().take(60).collect(),
            };
            let age = age_str(now - j.created_at);
            println!(
                "{:<22} {:<6} {:<14} {:<28} {:>8}  {progress}",
                j.status.job_id, j.status.kind, j.status.state, w, age
            );
        }
    }
    Ok(if failed > 0 && rows.is_empty() { 1 } else { 0 })
}

fn age_str(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// `job logs`: the job's trainer log from its worker; with `follow`, until the job ends.
pub async fn logs(target: &Target, job_id: &str, tail: u32, follow: bool, ui: Ui) -> Result<i32> {
    let (_sig, client) = open(target, &ui).await?;
    client.logs(job_id, tail, follow)?;
    let mut replayed = false;
    loop {
        let next = tokio::select! {
            m = client.next() => m,
            _ = tokio::signal::ctrl_c() => return Ok(130),
        };
        match next {
            None => bail!("the connection to the worker closed"),
            Some(JobMsg::JobLog { text, stream, .. }) => {
                if ui.json {
                    ui.event(json!({"event": "log", "stream": stream, "text": text}));
                } else {
                    println!("{text}");
                }
            }
            Some(JobMsg::JobError { message, .. }) => {
                ui.event(json!({"event": "error", "message": message}));
                if !ui.json {
                    eprintln!("error: {message}");
                }
                return Ok(1);
            }
            Some(JobMsg::JobStatus { status }) if !replayed => {
                replayed = true;
                ui.event(json!({"event": "status", "status": status}));
                if !follow || status.state.is_terminal() {
                    if !ui.json {
                        eprintln!("job {job_id} is {}", status.state);
                    }
                    return Ok(0);
                }
            }
            Some(JobMsg::JobDone { status }) => {
                ui.event(json!({"event": "done", "job_id": job_id, "state": status.state}));
                if !ui.json {
                    eprintln!("job {job_id} {}", status.state);
                }
                return Ok(0);
            }
            Some(_) => {}
        }
    }
}

/// `job stop|cancel`: asks the job's worker, then reports what became of the job. A cancel waits
/// (up to a minute) for the job to end; a stop returns once asked, since the epoch under way
/// may take long (the job's own client, or `job attach`, gets the model).
pub async fn interrupt(target: &Target, job_id: &str, cancel: bool, ui: Ui) -> Result<i32> {
    let (_sig, client) = open(target, &ui).await?;
    if cancel {
        client.cancel(job_id)?
    } else {
        client.stop(job_id)?
    }
    // The worker answers a refused interrupt with job_error, in order, before this status.
    client.attach(job_id, false)?;
    let what = if cancel { "cancel" } else { "stop" };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(if cancel { 60 } else { 15 });
    let mut asked = false;
    loop {
        let msg = match tokio::time::timeout_at(deadline, client.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => bail!("the connection to the worker closed"),
            Err(_) if asked => {
                ui.say(None, format!("{what} asked; job {job_id} has not ended yet (follow it with `job attach`)"));
                return Ok(0);
            }
            Err(_) => bail!("the worker did not answer within the time allowed"),
        };
        match msg {
            JobMsg::JobError { code, message, .. } => {
                ui.event(json!({"event": "error", "code": code, "message": message}));
                if !ui.json {
                    eprintln!("error: cannot {what} job {job_id}: {message}");
                }
                return Ok(1);
            }
            JobMsg::JobStatus { status } | JobMsg::JobDone { status } if status.state.is_terminal() => {
                ui.event(json!({"event": "done", "job_id": job_id, "state": status.state, "message": status.message}));
                ui.say(None, format!("job {job_id} {}", status.state));
                return Ok(0);
            }
            JobMsg::JobStatus { status } => {
                asked = true;
                ui.event(json!({"event": "asked", "job_id": job_id, "action": what, "state": status.state}));
                if !cancel {
                    ui.say(
                        None,
                        format!(
                            "stop asked: job {job_id} finishes its current epoch and keeps the model so far \
                         (its client gets it; or `sleap-rtc job attach {job_id}`)"
                        ),
                    );
                    return Ok(0);
                }
                ui.say(None, format!("cancel asked: waiting for job {job_id} to end"));
            }
            _ => {}
        }
    }
}

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn fmt_loss(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.5}"))
}

/// The event loop shared by `train`, `track` and `job attach`.
async fn follow(
    client: &JobClient,
    job_id: &str,
    kind: JobKind,
    out: &Output,
    upload: Option<sleap_rtc_tokio::Transfer<sleap_rtc_tokio::Sent>>,
    epochs: Option<u32>,
    ui: Ui,
) -> Result<i32> {
    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel();
    let ctrl_c = tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if sig_tx.send(()).is_err() {
                break;
            }
        }
    });
    let _guard = AbortOnDrop(ctrl_c);
    let hidden = ui.json;
    let mk_bar = |len: u64, template: &str| {
        if hidden { ProgressBar::hidden() } else { ProgressBar::new(len).with_style(bar_style(template)) }
    };
    // Upload.
    let mut upload_bar = None;
    let upload_id = upload.as_ref().map(|t| t.id);
    let (mut up_progress, mut up_done) = match upload {
        Some(t) => {
            let total = t.progress.borrow().total_bytes;
            let b = mk_bar(total, "upload   {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}");
            upload_bar = Some(b);
            (Some(t.progress), Some(t.done))
        }
        None => (None, None),
    };
    let mut train_bar: Option<ProgressBar> = None;
    let mut interrupts = 0;
    let started = tokio::time::Instant::now();
    loop {
        tokio::select! {
            r = async { up_progress.as_mut().expect("guarded").changed().await }, if up_progress.is_some() => {
                if r.is_err() { up_progress = None; continue; }
                let p = up_progress.as_ref().map(|w| *w.borrow()).unwrap_or_default();
                if let Some(b) = &upload_bar {
                    b.set_length(p.total_bytes);
                    b.set_position(p.acked_bytes);
                }
            }
            r = async { up_done.as_mut().expect("guarded").await }, if up_done.is_some() => {
                up_done = None;
                up_progress = None;
                let bar = upload_bar.take();
                match r {
                    Ok(Ok(sent)) => {
                        if let Some(b) = &bar { b.finish_and_clear(); }
                        let secs = started.elapsed().as_secs_f64();
                        ui.event(json!({"event": "uploaded", "bytes": sent.bytes, "resumed_bytes": sent.resumed_bytes, "secs": secs}));
                        let mb = sent.bytes as f64 / 1e6;
                        let reused = if sent.resumed_bytes > 0 { format!(" ({:.1} MB already on the worker)", sent.resumed_bytes as f64 / 1e6) } else { String::new() };
                        ui.say(None, format!("uploaded {mb:.1} MB in {secs:.1} s{reused}"));
                    }
                    Ok(Err(e)) => { if let Some(b) = &bar { b.abandon(); } ui.say(None, format!("upload failed: {e}")); }
                    Err(_) => {}
                }
            }
            s = sig_rx.recv() => {
                if s.is_none() { continue; }
                interrupts += 1;
                match (interrupts, kind) {
                    (1, JobKind::Train) => {
                        ui.say(train_bar.as_ref(), "stopping after the current epoch; the model so far will be returned (Ctrl-C again to cancel)");
                        client.stop(job_id)?;
                    }
                    (1, JobKind::Track) | (2, _) => {
                        ui.say(train_bar.as_ref(), "cancelling the job (Ctrl-C again to quit without waiting)");
                        client.cancel(job_id)?;
                        // An upload under way is pointless now; stop sending.
                        if let Some(id) = upload_id.filter(|_| up_done.is_some()) {
                            client.connection().cancel(id, "the job was cancelled");
                        }
                    }
                    _ => {
                        ui.say(None, format!("quitting; the worker finishes the cancel. Check with: sleap-rtc job attach {job_id}"));
                        return Ok(EXIT_CANCELLED);
                    }
                }
            }
            m = client.next() => {
                let Some(m) = m else {
                    if let Some(b) = &train_bar { b.abandon(); }
                    ui.event(json!({"event": "disconnected", "job_id": job_id}));
                    ui.say(None, format!(
                        "the connection to the worker was lost; the job goes on there.\n  Reattach with: sleap-rtc job attach {job_id}"
                    ));
                    return Ok(EXIT_DISCONNECTED);
                };
                match m {
                    JobMsg::JobState { state, message, .. } => {
                        ui.event(json!({"event": "state", "state": state, "message": message}));
                        ui.say(train_bar.as_ref(), format!("job {state}{}", message.map(|m| format!(": {m}")).unwrap_or_default()));
                    }
                    JobMsg::JobStatus { status } => {
                        ui.event(json!({"event": "status", "status": status}));
                        let last = match &status.last_epoch {
                            Some(Progress::EpochEnd { epoch, loss, val_loss }) => format!(" (last epoch {epoch}: loss {} val {})", fmt_loss(*loss), fmt_loss(*val_loss)),
                            _ => String::new(),
                        };
                        ui.say(None, format!("job {job_id} is {}{last}", status.state));
                    }
                    JobMsg::JobProgress { progress, .. } => {
                        ui.event(json!({"event": "progress", "progress": progress}));
                        match progress {
                            Progress::Started { model } => ui.say(train_bar.as_ref(), format!(
                                "sleap-nn started{}", model.map(|m| format!(" ({m})")).unwrap_or_default())),
                            Progress::TrainBegin => {
                                let b = mk_bar(epochs.unwrap_or(0) as u64, "training {bar:30} epoch {pos}/{len} {msg}");
                                train_bar = Some(b);
                            }
                            Progress::EpochBegin { epoch } => {
                                if let Some(b) = &train_bar { b.set_position(epoch as u64); }
                            }
                            Progress::Batch { batch, loss, .. } => {
                                if let Some(b) = &train_bar { b.set_message(format!("batch {batch} loss {}", fmt_loss(loss))); }
                            }
                            Progress::EpochEnd { epoch, loss, val_loss } => {
                                if let Some(b) = &train_bar { b.set_position(epoch as u64 + 1); }
                                ui.say(train_bar.as_ref(), format!("epoch {epoch}: loss {} val_loss {}", fmt_loss(loss), fmt_loss(val_loss)));
                            }
                            Progress::TrainEnd => {
                                if let Some(b) = train_bar.take() { b.finish_and_clear(); }
                                ui.say(None, "training finished; sleap-nn is evaluating the model");
                            }
                            Progress::Inference { n_processed, n_total, .. } => {
                                let b = train_bar.get_or_insert_with(|| mk_bar(n_total.unwrap_or(0), "predict  {bar:30} {pos}/{len} frames {per_sec}"));
                                if let Some(t) = n_total { b.set_length(t); }
                                b.set_position(n_processed);
                            }
                        }
                    }
                    JobMsg::JobLog { stream, text, cr, .. } => {
                        if ui.json {
                            ui.event(json!({"event": "log", "stream": stream, "text": text, "cr": cr}));
                        } else if ui.verbose && !cr {
                            let prefix = if stream == Stream::Stderr { "! " } else { "│ " };
                            ui.say(train_bar.as_ref(), format!("{prefix}{text}"));
                        }
                    }
                    JobMsg::JobDone { status } => {
                        if let Some(b) = train_bar.take() { b.finish_and_clear(); }
                        return finish(client, job_id, &status, out, ui).await;
                    }
                    JobMsg::JobError { message, .. } => {
                        ui.event(json!({"event": "error", "message": message}));
                        if !ui.json { eprintln!("error: {message}"); }
                        return Ok(EXIT_FAILED);
                    }
                    _ => {}
                }
            }
        }
    }
}

async fn finish(client: &JobClient, job_id: &str, status: &JobStatus, out: &Output, ui: Ui) -> Result<i32> {
    let message = status.message.clone().unwrap_or_default();
    let mut files = Vec::new();
    if !status.results.is_empty() {
        let dir = out.receive_dir();
        let t = client.receive_results(&dir)?;
        let bar = if ui.json {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(0).with_style(bar_style("results  {bar:30} {bytes}/{total_bytes} {bytes_per_sec}"))
        };
        let mut progress = t.progress.clone();
        let watch_bar = bar.clone();
        let watcher = tokio::spawn(async move {
            while progress.changed().await.is_ok() {
                let p = *progress.borrow();
                watch_bar.set_length(p.total_bytes);
                watch_bar.set_position(p.acked_bytes.max(p.sent_bytes));
            }
        });
        let got = tokio::time::timeout(Duration::from_secs(24 * 3600), t.finish()).await;
        watcher.abort();
        bar.finish_and_clear();
        match got {
            Ok(Ok(r)) if r.failed.is_empty() => files = r.files,
            Ok(Ok(r)) => bail!(
                "some results failed verification: {:?}; fetch again with `sleap-rtc job attach {job_id}`",
                r.failed
            ),
            Ok(Err(e)) => bail!("receiving results failed: {e}; fetch them again with `sleap-rtc job attach {job_id}`"),
            Err(_) => bail!("results did not arrive; fetch them with `sleap-rtc job attach {job_id}`"),
        }
    }
    let tops: Vec<PathBuf> = match out {
        Output::Dir(d) => {
            let mut v: Vec<PathBuf> =
                files.iter().filter_map(|f| f.strip_prefix(d).ok()?.components().next().map(|c| d.join(c))).collect();
            v.dedup();
            v
        }
        Output::File(_) => files.clone(),
    };
    ui.event(json!({"event": "done", "job_id": job_id, "state": status.state, "message": message,
        "duration_secs": status.duration_secs, "results": tops, "published": status.published}));
    if !ui.json {
        let secs = status.duration_secs.map(|d| format!(" in {d:.1} s")).unwrap_or_default();
        eprintln!("job {job_id} {}{secs}: {message}", status.state);
        for t in &tops {
            println!("{}", t.display());
        }
    }
    Ok(match status.state {
        JobState::Completed | JobState::StoppedEarly => EXIT_OK,
        JobState::Cancelled => EXIT_CANCELLED,
        JobState::Rejected => EXIT_REJECTED,
        _ => EXIT_FAILED,
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, mem: u64, status: &str) -> PeerInfo {
        PeerInfo {
            peer_id: id.into(),
            role: "worker".into(),
            metadata: serde_json::from_value(json!({"properties": {"gpu_memory_mb": mem, "status": status}})).unwrap(),
            connected_at: 0.0,
        }
    }

    #[test]
    fn server_urls() {
        let s = ServerUrl::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!((s.ws.as_str(), s.http.as_str()), ("ws://127.0.0.1:8080/ws", "http://127.0.0.1:8080"));
        let s = ServerUrl::parse("wss://rtc.example.org/ws").unwrap();
        assert_eq!((s.ws.as_str(), s.http.as_str()), ("wss://rtc.example.org/ws", "https://rtc.example.org"));
        assert!(ServerUrl::parse("ftp://x").is_err());
        for quiet in ["http://127.0.0.1:8080", "http://localhost:1", "ws://[::1]:8080/ws", "https://lab.example.org"] {
            assert_eq!(ServerUrl::parse(quiet).unwrap().plaintext_warning(), None, "{quiet}");
        }
        for loud in ["http://10.0.0.5:8080", "ws://rtc.example.org/ws", "http://[2001:db8::1]:80"] {
            assert!(ServerUrl::parse(loud).unwrap().plaintext_warning().is_some(), "{loud}");
        }
        assert!(ServerUrl::parse("http://").is_err());
    }

    #[test]
    fn worker_selection() {
        let ws = vec![worker("a", 8000, "available"), worker("b", 24000, "busy"), worker("c", 16000, "available")];
        assert_eq!(select_worker(&ws, None, 0).unwrap(), "c");
        assert_eq!(select_worker(&ws, Some("b"), 0).unwrap(), "b");
        assert!(select_worker(&ws, None, 30000).unwrap_err().to_string().contains("30000"));
        // The only worker with enough memory is busy and takes no queue (an older worker).
        assert!(select_worker(&ws, None, 20000).unwrap_err().to_string().contains("busy"));
        assert!(select_worker(&ws, Some("zz"), 0).is_err());
        assert!(select_worker(&[], None, 0).unwrap_err().to_string().contains("no worker"));
        let busy = vec![worker("b", 1, "busy")];
        assert!(select_worker(&busy, None, 0).unwrap_err().to_string().contains("busy"));
    }

    #[test]
    fn worker_selection_prefers_the_shortest_wait() {
        let queued = |id: &str, mem: u64, len: u64, cap: u64| {
            let mut w = worker(id, mem, if len == 0 { "available" } else { "busy" });
            if let Some(Value::Object(p)) = w.metadata.get_mut("properties") {
                p.insert("queue_length".into(), json!(len));
                p.insert("queue_capacity".into(), json!(cap));
            }
            w
        };
        let ws = vec![queued("long", 48000, 4, 5), queued("short", 8000, 1, 5), queued("full", 80000, 5, 5)];
        assert_eq!(select_worker(&ws, None, 0).unwrap(), "short");
        assert_eq!(select_worker(&ws, None, 10000).unwrap(), "long", "memory first, then the wait");
        let mut with_idle = ws.clone();
        with_idle.push(queued("idle", 4000, 0, 5));
        assert_eq!(select_worker(&with_idle, None, 0).unwrap(), "idle");
        let err = select_worker(&ws[2..], None, 0).unwrap_err().to_string();
        assert!(err.contains("queues are full"), "{err}");
    }

    #[test]
    fn unpackaged_labels_are_refused_with_advice() {
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("c.yaml");
        std::fs::write(&cfg, include_str!("../assets/tiny_single.yaml")).unwrap();
        std::fs::write(d.path().join("labels.slp"), b"x").unwrap();
        let a = TrainArgs {
            configs: vec![cfg.clone()],
            labels: Some(d.path().join("labels.slp").display().to_string()),
            ..Default::default()
        };
        let e = train_spec(&a).unwrap_err().to_string();
        assert!(e.contains(".pkg.slp") && e.contains("worker:"), "{e}");
        // Without --labels, the config's relative train_labels_path is found next to the config.
        std::fs::write(d.path().join("labels.pkg.slp"), b"x").unwrap();
        let (spec, uploads, epochs) = train_spec(&TrainArgs { labels: None, ..a.clone() }).unwrap();
        assert_eq!(spec["labels_path"], "labels.pkg.slp");
        assert_eq!(uploads, vec![d.path().join("labels.pkg.slp")]);
        assert_eq!(epochs, Some(2));
        let (spec, uploads, _) =
            train_spec(&TrainArgs { labels: Some("worker:/data/x.slp".into()), ..a.clone() }).unwrap();
        assert!(uploads.is_empty() && spec["labels_path"] == "/data/x.slp", "{spec}");
    }
}
