//! `sleap-rtc`: the command line of sleap-rtc. See `sleap-rtc --help`.

mod config;
mod creds;
mod doctor;
mod jobs;
mod manage;
mod models;
#[cfg(unix)]
mod quickstart;
#[cfg(not(unix))]
#[path = "quickstart_unsupported.rs"]
mod quickstart;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use serde_json::{Value, json};
use sleap_rtc_core::job::JobKind;
use sleap_rtc_tokio::PeerOptions;
use sleap_rtc_tokio::client::ClientAuth;
#[cfg(unix)]
use sleap_rtc_tokio::worker::{Worker, WorkerConfig};

use crate::config::Settings;
use crate::jobs::{Output, Target, TrackArgs, TrainArgs, Ui};
use crate::manage::{ApiArgs, KeyCmd, LoginArgs, LogoutArgs, RoomCmd, ServerArg, TokenCmd};

const EXIT_CODES: &str = "\
Exit codes of train, track and job attach:
  0    the job completed (or was stopped early by you) and its results were written
  1    the job failed, or results could not be fetched
  2    the worker (or a local check) rejected the job spec
  3    the connection to the worker was lost; the job goes on (see `sleap-rtc job attach`)
  130  the job was cancelled";

#[derive(Parser)]
#[command(
    name = "sleap-rtc",
    version,
    about = "Train and run SLEAP models on a remote GPU worker, peer to peer over WebRTC",
    after_help = EXIT_CODES
)]
struct Cli {
    /// More output: the trainer's log lines, debug logs (RUST_LOG overrides).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sign in to a signaling server and store the credential (anonymous, or with an account key);
    /// the server becomes the default.
    Login(LoginArgs),
    /// Forget the stored credential of a server (or of every server).
    Logout(LogoutArgs),
    /// Who the stored credential signs in as, and when it expires.
    Whoami {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        json: bool,
    },
    /// Rooms: create, list, info, delete, invite, join, members, set-default.
    #[command(subcommand)]
    Room(RoomCmd),
    /// Worker tokens: create, list, revoke, delete.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Account keys (slp_acct_...): create, list, revoke.
    #[command(subcommand)]
    Key(KeyCmd),
    /// The config files: show, path, set, unset, add-mount, ...
    #[command(subcommand)]
    Config(ConfigCmd),
    /// What this machine has stored: config, default server and room, credentials. No network.
    Status(doctor::StatusArgs),
    /// Check that this machine can reach the server, sign in, join the room and reach STUN over
    /// UDP; with --worker, that it can run jobs (sleap-nn, GPU, mounts, work dir).
    Doctor(doctor::DoctorArgs),
    /// Print a shell completion script: `sleap-rtc completions bash > ~/.local/share/bash-completion/completions/sleap-rtc`.
    Completions { shell: clap_complete::Shell },
    /// List the workers online in a room.
    Workers(ConnArgs),
    /// Run a GPU worker: receive jobs from room members, run sleap-nn, send results back.
    Worker(WorkerArgs),
    /// Train a model on a worker and download the run directory.
    #[command(after_help = EXIT_CODES)]
    Train(TrainCli),
    /// Run inference with trained models on a worker and download the predictions.
    #[command(after_help = EXIT_CODES)]
    Track(TrackCli),
    /// Jobs submitted from this machine.
    #[command(subcommand)]
    Job(JobCmd),
    /// The room's model registry: publish, list, alias, tag, pull.
    #[command(subcommand)]
    Models(models::ModelsCmd),
    /// Start a local server and worker, then train and run inference on a bundled tiny dataset
    /// with the real sleap-nn.
    Quickstart(quickstart::QuickstartArgs),
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// The effective settings and where each comes from.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// The config files, in the order they are read, and which exist.
    Path,
    /// Set a key: server, room, registry, worker.name, worker.work_dir, worker.sleap_nn,
    /// worker.python, worker.device, worker.upload_cache_gb, worker.model_cache_gb.
    Set {
        key: String,
        value: String,
        /// In ./sleap-rtc.toml instead of the user's file.
        #[arg(long)]
        project: bool,
    },
    /// Remove a key (the next file, or the default, applies again).
    Unset {
        key: String,
        #[arg(long)]
        project: bool,
    },
    /// Let a worker's jobs name files under DIR by absolute path.
    AddMount {
        dir: PathBuf,
        #[arg(long)]
        project: bool,
    },
    /// Stop offering DIR to jobs.
    RemoveMount {
        dir: PathBuf,
        #[arg(long)]
        project: bool,
    },
    /// Files under LOCAL are on the worker as WORKER (a shared drive): they are not uploaded.
    AddPathMapping {
        local: PathBuf,
        worker: String,
        #[arg(long)]
        project: bool,
    },
    /// Upload files under LOCAL again.
    RemovePathMapping {
        local: PathBuf,
        #[arg(long)]
        project: bool,
    },
}

/// How a client reaches a worker.
#[derive(Args, Clone)]
struct ConnArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Room id (default: the config file's `room`; see `sleap-rtc room set-default`).
    #[arg(long, env = "SLEAP_RTC_ROOM")]
    room: Option<String>,
    /// Credential: a user JWT or an account key (default: what `login` stored).
    #[arg(long, env = "SLEAP_RTC_JWT", hide_env_values = true)]
    jwt: Option<String>,
    /// Prove room membership with the room's shared secret instead of a server-signed ticket.
    #[arg(long, env = "SLEAP_RTC_ROOM_SECRET", hide_env_values = true)]
    room_secret: Option<String>,
    /// Use this worker (a peer id from `sleap-rtc workers`).
    #[arg(long)]
    worker: Option<String>,
    /// Pick the available worker with the most GPU memory (the default when --worker is not given).
    #[arg(long, conflicts_with = "worker")]
    auto_select: bool,
    /// With auto-selection, only consider workers with at least this much GPU memory.
    #[arg(long, default_value_t = 0, value_name = "MB")]
    min_gpu_memory: u64,
    /// Local addresses for the peer connection (default: every interface).
    #[arg(long = "bind", value_name = "IP")]
    bind: Vec<IpAddr>,
    /// Connect only through the room's TURN relay (when the server hands one out): no direct
    /// path is tried and the other side never learns this machine's addresses.
    #[arg(long, env = "SLEAP_RTC_RELAY_ONLY")]
    relay_only: bool,
    /// Machine-readable events, one JSON object per line on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct WorkerArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Room to join (a worker token already names its room).
    #[arg(long, env = "SLEAP_RTC_ROOM")]
    room: Option<String>,
    /// Worker token (slp_...) from `sleap-rtc token create`, or an account key.
    #[arg(long, env = "SLEAP_RTC_TOKEN", hide_env_values = true)]
    token: String,
    /// Name shown to room members (default: worker.name in the config file, else the host name).
    #[arg(long, env = "SLEAP_RTC_WORKER_NAME")]
    name: Option<String>,
    /// Where jobs, their uploads and results live (default: worker.work_dir in the config file,
    /// else ~/.local/share/sleap-rtc/worker).
    #[arg(long, env = "SLEAP_RTC_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// The sleap-nn executable (default: worker.sleap_nn in the config file, else `sleap-nn` on PATH).
    #[arg(long, env = "SLEAP_NN")]
    sleap_nn: Option<PathBuf>,
    /// A directory whose files jobs may name by absolute path (repeatable; the environment
    /// variable takes a colon-separated list; default: worker.mounts in the config file).
    #[arg(long = "mount", env = "SLEAP_RTC_MOUNTS", value_delimiter = ':', value_name = "DIR")]
    mounts: Vec<PathBuf>,
    /// A Python with sleap-io, for the SLEAP GUI's path check: it lists the videos a .slp names
    /// so the GUI can say which are missing on this machine. Default: the interpreter of the
    /// sleap-nn script (its environment has sleap-io); without one the check reports no videos.
    #[arg(long, env = "SLEAP_RTC_WORKER_PYTHON", value_name = "PATH")]
    python: Option<PathBuf>,
    /// Require the room's shared secret from clients instead of a server-signed ticket.
    #[arg(long, env = "SLEAP_RTC_ROOM_SECRET", hide_env_values = true)]
    room_secret: Option<String>,
    /// Inference device passed to sleap-nn: auto, cpu, cuda, cuda:0, mps (default: worker.device
    /// in the config file, else auto).
    #[arg(long, env = "SLEAP_RTC_DEVICE")]
    device: Option<String>,
    /// Local addresses for peer connections (default: every interface).
    #[arg(long = "bind", value_name = "IP")]
    bind: Vec<IpAddr>,
    /// Connect only through the room's TURN relay (when the server hands one out): no direct
    /// path is tried and the other side never learns this machine's addresses.
    #[arg(long, env = "SLEAP_RTC_RELAY_ONLY")]
    relay_only: bool,
    /// Seconds between SIGTERM and SIGKILL when a job is cancelled.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    cancel_grace: f64,
    /// Seconds to wait for sleap-nn to honour a stop before interrupting it (SIGINT).
    #[arg(long, default_value_t = 120.0, value_name = "SECS")]
    stop_timeout: f64,
    /// Upload cache size (repeated datasets are not transferred again); default 20, or
    /// worker.upload_cache_gb in the config file.
    #[arg(long, value_name = "GB")]
    upload_cache_gb: Option<u64>,
    /// Publish every trained model to the room's registry: s3://bucket/prefix or a directory
    /// (default: `registry` in the config file).
    #[arg(long, env = "SLEAP_RTC_REGISTRY", value_name = "URL|PATH")]
    registry: Option<String>,
    /// Cache of registry models fetched for inference (least recently used evicted first);
    /// default 50, or worker.model_cache_gb in the config file.
    #[arg(long, value_name = "GB")]
    model_cache_gb: Option<u64>,
    /// Publish the running job's progress (epoch, loss, a short loss history) to the room, for
    /// the dashboard's loss chart; the signaling server relays it. Off: only the job's client
    /// sees progress.
    #[arg(long, env = "SLEAP_RTC_PUBLISH_PROGRESS")]
    publish_progress: bool,
    /// Jobs that may wait while one runs: they upload at once, then run in turn (first come,
    /// first served); more are refused as busy. 0: one job at a time, others refused.
    #[arg(long, env = "SLEAP_RTC_QUEUE", default_value_t = 4, value_name = "N")]
    queue: usize,
    /// Remove a finished job's directory (inputs, model, logs) this many days after it ended
    /// (at least 1: a cut-off client has a day to fetch its results with `job attach`); default
    /// 14, or worker.keep_days in the config file.
    #[arg(long, value_name = "DAYS")]
    keep_days: Option<u64>,
    /// Keep all job directories under this many GB by removing finished jobs, oldest first
    /// (never one that ended less than a day ago); default: no cap, or worker.jobs_disk_gb.
    #[arg(long, value_name = "GB")]
    jobs_disk_gb: Option<u64>,
    /// POST a JSON summary of every finished job to this URL (a Slack/Mattermost/Teams incoming
    /// webhook shows its `text`); default: worker.notify_url in the config file.
    #[arg(long, env = "SLEAP_RTC_NOTIFY_URL", value_name = "URL")]
    notify_url: Option<String>,
}

#[derive(Args)]
struct TrainCli {
    #[command(flatten)]
    conn: ConnArgs,
    /// sleap-nn training config (YAML); repeat for a multi-model pipeline.
    #[arg(long = "config", short = 'c', value_name = "CFG.yaml", required = true)]
    configs: Vec<PathBuf>,
    /// Labels to train on: a self-contained .pkg.slp (uploaded), or worker:/path on the worker.
    /// Default: the config's train_labels_path, relative to the config file.
    #[arg(long, value_name = "DATA.pkg.slp")]
    labels: Option<String>,
    #[arg(long, value_name = "VAL.pkg.slp")]
    val_labels: Option<String>,
    #[arg(long)]
    max_epochs: Option<u32>,
    #[arg(long)]
    batch_size: Option<u32>,
    #[arg(long)]
    learning_rate: Option<f64>,
    #[arg(long)]
    run_name: Option<String>,
    /// Resume from a checkpoint (local file, uploaded; or worker:/path).
    #[arg(long, value_name = "CKPT")]
    resume: Option<String>,
    /// Directory for the trained run directory.
    #[arg(short = 'o', long = "output", value_name = "OUTDIR")]
    outdir: PathBuf,
}

#[derive(Args)]
struct TrackCli {
    #[command(flatten)]
    conn: ConnArgs,
    /// A trained run directory (uploaded), a model of the room's registry by id or alias (the
    /// worker fetches it), or worker:/path; repeat for top-down pipelines.
    #[arg(long = "model", short = 'm', value_name = "RUN_DIR", required = true)]
    models: Vec<String>,
    /// What to run on: a .pkg.slp or video file (uploaded), or worker:/path.
    #[arg(long, short = 'd', value_name = "DATA")]
    data: String,
    /// Where to write the predictions.
    #[arg(short = 'o', long = "output", value_name = "PREDICTIONS.slp")]
    output: PathBuf,
    #[arg(long)]
    batch_size: Option<u32>,
    /// Minimum confidence of a detected peak, 0..1.
    #[arg(long)]
    peak_threshold: Option<f64>,
    /// Frames to run on: 1,2,3 or 10-20.
    #[arg(long)]
    frames: Option<String>,
    /// Only suggested frames.
    #[arg(long)]
    only_suggested_frames: bool,
    /// Only frames with user labels.
    #[arg(long)]
    only_labeled_frames: bool,
    #[arg(long)]
    exclude_user_labeled: bool,
    #[arg(long)]
    video_index: Option<u32>,
}

/// Where a job is, for `job attach|logs|stop|cancel` (server, room and worker default to what was
/// recorded when it was submitted from here) and `job list`.
#[derive(Args)]
struct JobAt {
    /// Server (default: the job's local record; for `job list`, the config file's).
    #[arg(long, env = "SLEAP_RTC_SERVER")]
    server: Option<String>,
    /// Room (default: the job's local record; for `job list`, SLEAP_RTC_ROOM or the config file's).
    #[arg(long)]
    room: Option<String>,
    /// Worker (default: the job's local record; for `job list`, every worker of the room).
    #[arg(long)]
    worker: Option<String>,
    #[arg(long, env = "SLEAP_RTC_JWT", hide_env_values = true)]
    jwt: Option<String>,
    #[arg(long, env = "SLEAP_RTC_ROOM_SECRET", hide_env_values = true)]
    room_secret: Option<String>,
    #[arg(long = "bind", value_name = "IP")]
    bind: Vec<IpAddr>,
    #[arg(long, env = "SLEAP_RTC_RELAY_ONLY")]
    relay_only: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum JobCmd {
    /// Follow a job again after a disconnect, and fetch its results if it has finished.
    Attach {
        job_id: String,
        /// Where results go (default: the output given at submission).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        #[command(flatten)]
        at: JobAt,
    },
    /// Stop a job early from any shell: it finishes its current epoch and its model is kept (a
    /// queued job is cancelled: nothing has run yet). Only its submitter may.
    Stop {
        job_id: String,
        #[command(flatten)]
        at: JobAt,
    },
    /// Cancel a job (running or queued) from any shell: the trainer is killed, nothing is
    /// returned. Only its submitter may.
    Cancel {
        job_id: String,
        #[command(flatten)]
        at: JobAt,
    },
    /// A job's trainer log, from its worker: the last lines, then (with --follow) new ones as
    /// they come, until the job ends. Only its submitter may.
    Logs {
        job_id: String,
        /// How many of the last lines to show (at most 10000).
        #[arg(long, short = 'n', default_value_t = 100)]
        tail: u32,
        /// Keep printing new lines until the job ends (Ctrl-C to leave; the job goes on).
        #[arg(long, short = 'f')]
        follow: bool,
        #[command(flatten)]
        at: JobAt,
    },
    /// Jobs submitted from this machine.
    List {
        /// Only the jobs submitted from this machine (no connection; where each one's results
        /// go). Default: ask every worker of the room (or --worker) for this user's jobs, with
        /// state, queue position, progress and age.
        #[arg(long)]
        local: bool,
        #[command(flatten)]
        at: JobAt,
    },
}

fn peer_options(bind: &[IpAddr], relay_only: bool) -> PeerOptions {
    let mut o = PeerOptions { relay_only, ..PeerOptions::default() };
    if !bind.is_empty() {
        o.bind_ips = bind.to_vec();
    }
    o
}

/// The room from a flag or its environment variable, else the config file's default room.
pub(crate) fn room_or_default(room: Option<String>, s: &Settings) -> Result<String> {
    match room.filter(|r| !r.is_empty()).or_else(|| s.room()) {
        Some(r) => Ok(r),
        None => bail!(
            "no room: pass --room ROOM, set SLEAP_RTC_ROOM, or choose a default with \
             `sleap-rtc room set-default ROOM` (`sleap-rtc room list` shows yours)"
        ),
    }
}

fn target(c: &ConnArgs) -> Result<Target> {
    let settings = Settings::load()?;
    let server = c.server.resolve(&settings)?;
    let credential = creds::resolve(&server.http, c.jwt.as_deref())?;
    let room = room_or_default(c.room.clone(), &settings)?;
    Ok(Target {
        server,
        room,
        credential,
        worker: c.worker.clone(),
        min_gpu_memory_mb: c.min_gpu_memory,
        auth: match &c.room_secret {
            Some(s) if !s.is_empty() => ClientAuth::RoomSecret(s.clone()),
            _ => ClientAuth::Ticket,
        },
        peer: peer_options(&c.bind, c.relay_only),
    })
}

async fn workers(c: ConnArgs) -> Result<i32> {
    let t = target(&c)?;
    let reg = jobs::client_register(&t.room, &t.credential);
    let sig = sleap_rtc_tokio::SignalingClient::connect(&t.server.ws, reg).await?;
    let peers =
        sig.discover(sleap_rtc_core::signal::Filters { role: Some("worker".into()), ..Default::default() }).await?;
    if c.json {
        println!("{}", serde_json::to_string(&peers)?);
        return Ok(0);
    }
    if peers.is_empty() {
        eprintln!("no worker online in room {}", t.room);
    }
    for p in peers {
        let prop = |k: &str| p.metadata.get("properties").and_then(|v| v.get(k)).cloned().unwrap_or(Value::Null);
        println!(
            "{}  {}  {} ({} MB)  sleap-nn {}  {}",
            p.peer_id,
            prop("status").as_str().unwrap_or("?"),
            prop("gpu_model").as_str().unwrap_or("?"),
            prop("gpu_memory_mb"),
            prop("sleap_nn_version").as_str().unwrap_or("?"),
            prop("current_job").as_str().unwrap_or(""),
        );
    }
    Ok(0)
}

#[cfg(unix)]
/// The worker's settings: flags and environment variables first, then the config files'
/// `[worker]` table, then the defaults.
fn worker_config(a: &WorkerArgs, s: &Settings) -> Result<WorkerConfig> {
    let server = a.server.resolve(s)?;
    let work_dir = a
        .work_dir
        .clone()
        .or_else(|| s.worker(|w| w.work_dir.clone()))
        .unwrap_or_else(|| creds::data_dir().join("worker"));
    let sleap_nn =
        a.sleap_nn.clone().or_else(|| s.worker(|w| w.sleap_nn.clone())).unwrap_or_else(|| PathBuf::from("sleap-nn"));
    let mut cfg = WorkerConfig::new(&server.ws, &a.token, &work_dir, &sleap_nn);
    // A worker token names its room; only an account key needs one, and may take the default.
    cfg.room = match &a.room {
        Some(r) => Some(r.clone()),
        None if a.token.starts_with("slp_acct_") => s.room(),
        None => None,
    };
    cfg.name = a.name.clone().or_else(|| s.worker(|w| w.name.clone()));
    let mounts =
        if a.mounts.is_empty() { s.worker(|w| w.mounts.clone()).unwrap_or_default() } else { a.mounts.clone() };
    for m in &mounts {
        if !m.is_dir() {
            bail!("mount {}: not a directory", m.display());
        }
    }
    cfg.mounts = mounts;
    cfg.python = a.python.clone().or_else(|| s.worker(|w| w.python.clone()));
    cfg.room_secret = a.room_secret.clone().filter(|s| !s.is_empty());
    cfg.device = a.device.clone().or_else(|| s.worker(|w| w.device.clone())).unwrap_or_else(|| "auto".into());
    cfg.peer = peer_options(&a.bind, a.relay_only);
    let secs = |s: f64, what: &str| {
        if s.is_finite() && s >= 0.0 {
            Ok(Duration::from_secs_f64(s))
        } else {
            Err(anyhow::anyhow!("{what} must be ≥ 0"))
        }
    };
    cfg.supervision.cancel_grace = secs(a.cancel_grace, "--cancel-grace")?;
    cfg.supervision.stop_sigint_after = secs(a.stop_timeout, "--stop-timeout")?;
    let gb =
        |flag: Option<u64>, file: Option<u64>, default: u64| flag.or(file).unwrap_or(default).saturating_mul(1 << 30);
    cfg.upload_cache_bytes = gb(a.upload_cache_gb, s.worker(|w| w.upload_cache_gb), 20);
    cfg.registry = a.registry.clone().filter(|r| !r.is_empty()).or_else(|| s.registry());
    cfg.model_cache_bytes = gb(a.model_cache_gb, s.worker(|w| w.model_cache_gb), 50);
    cfg.publish_progress = a.publish_progress;
    cfg.queue = a.queue;
    let keep_days = a.keep_days.or_else(|| s.worker(|w| w.keep_days)).unwrap_or(14);
    if keep_days == 0 {
        bail!("--keep-days must be at least 1: a client that was cut off has a day to fetch its results");
    }
    cfg.keep_finished = Duration::from_secs(keep_days.saturating_mul(86_400));
    cfg.jobs_cap_bytes = a.jobs_disk_gb.or_else(|| s.worker(|w| w.jobs_disk_gb)).map(|g| g.saturating_mul(1 << 30));
    cfg.notify_url = a.notify_url.clone().filter(|u| !u.is_empty()).or_else(|| s.worker(|w| w.notify_url.clone()));
    if let Some(u) = &cfg.notify_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            bail!("--notify-url must be an http:// or https:// URL");
        }
    }
    Ok(cfg)
}

#[cfg(unix)]
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// The worker runs sleap-nn under Unix process groups and signals; on Windows, use WSL2 (or a
/// Linux container), where the Linux build runs unchanged.
#[cfg(not(unix))]
async fn worker(_: WorkerArgs) -> Result<i32> {
    bail!("the worker runs on Linux and macOS only; on Windows run it in WSL2 or a Linux container")
}

#[cfg(unix)]
async fn worker(a: WorkerArgs) -> Result<i32> {
    let cfg = worker_config(&a, &Settings::load()?)?;
    let w = Worker::new(cfg).await?;
    let caps = w.capabilities();
    eprintln!(
        "worker {} ready: {} ({} MB), sleap-nn {}, {} MB free; Ctrl-C to stop",
        w.peer_id(),
        caps.gpu_model,
        caps.gpu_memory_mb,
        caps.sleap_nn_version.as_deref().unwrap_or("NOT FOUND"),
        caps.free_disk_mb
    );
    w.run(shutdown_signal()).await?;
    Ok(0)
}

async fn train(a: TrainCli, verbose: bool) -> Result<i32> {
    let t = target(&a.conn)?;
    let ui = Ui { json: a.conn.json, verbose };
    let maps = Settings::load()?.path_mappings();
    let map = |v: Option<String>| v.map(|v| config::map_arg(&maps, &v));
    let args = TrainArgs {
        configs: a.configs,
        labels: map(a.labels),
        val_labels: map(a.val_labels),
        max_epochs: a.max_epochs,
        batch_size: a.batch_size,
        learning_rate: a.learning_rate,
        run_name: a.run_name,
        resume: map(a.resume),
    };
    let (spec, uploads, epochs) = match jobs::train_spec(&args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(jobs::EXIT_REJECTED);
        }
    };
    std::fs::create_dir_all(&a.outdir).with_context(|| format!("cannot create {}", a.outdir.display()))?;
    jobs::run(&t, JobKind::Train, spec, uploads, Output::Dir(a.outdir), epochs, ui).await
}

async fn track(a: TrackCli, verbose: bool) -> Result<i32> {
    let t = target(&a.conn)?;
    let ui = Ui { json: a.conn.json, verbose };
    let frame_filter = match (a.only_suggested_frames, a.only_labeled_frames) {
        (true, true) => bail!("--only-suggested-frames and --only-labeled-frames exclude each other"),
        (true, false) => Some("suggested".to_owned()),
        (false, true) => Some("user".to_owned()),
        _ => None,
    };
    let maps = Settings::load()?.path_mappings();
    let args = TrackArgs {
        // A registry id or alias is not a path: only existing local paths are mapped.
        models: a
            .models
            .iter()
            .map(|m| if std::path::Path::new(m).exists() { config::map_arg(&maps, m) } else { m.clone() })
            .collect(),
        data: config::map_arg(&maps, &a.data),
        output: a.output.clone(),
        batch_size: a.batch_size,
        peak_threshold: a.peak_threshold,
        frames: a.frames,
        frame_filter,
        exclude_user_labeled: a.exclude_user_labeled,
        video_index: a.video_index,
    };
    let (spec, uploads) = match jobs::track_spec(&args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(jobs::EXIT_REJECTED);
        }
    };
    if let Some(p) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
    }
    jobs::run(&t, JobKind::Track, spec, uploads, Output::File(a.output), None, ui).await
}

async fn job(cmd: JobCmd, verbose: bool) -> Result<i32> {
    match cmd {
        JobCmd::List { local: false, mut at } => {
            let ui = Ui { json: at.json, verbose };
            // `--room` of the other job commands defaults to the job's record, not the
            // environment; a listing has no record.
            at.room = at.room.or_else(|| std::env::var("SLEAP_RTC_ROOM").ok());
            let conn = at.conn(None);
            jobs::list_remote(&target(&conn)?, ui).await
        }
        JobCmd::List { local: true, at } => {
            let json = at.json;
            let jobs = creds::list_jobs();
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
                return Ok(0);
            }
            if jobs.is_empty() {
                eprintln!("no jobs submitted from this machine");
            }
            for r in jobs {
                println!("{}  {}  worker {}  room {}  → {}", r.job_id, r.kind, r.worker, r.room, r.output.display());
            }
            Ok(0)
        }
        JobCmd::Logs { job_id, tail, follow, at } => {
            let json = at.json;
            let (t, _) = job_target(&job_id, at)?;
            jobs::logs(&t, &job_id, tail, follow, Ui { json, verbose }).await
        }
        JobCmd::Stop { job_id, at } => interrupt_cmd(&job_id, at, false, verbose).await,
        JobCmd::Cancel { job_id, at } => interrupt_cmd(&job_id, at, true, verbose).await,
        JobCmd::Attach { job_id, output, at } => {
            let json = at.json;
            let (t, rec) = job_target(&job_id, at)?;
            let kind = match rec.as_ref().map(|r| r.kind.as_str()) {
                Some("track") => JobKind::Track,
                _ => JobKind::Train,
            };
            let output = output.or(rec.map(|r| r.output)).unwrap_or_else(|| PathBuf::from("."));
            let out = match kind {
                JobKind::Track => Output::File(output),
                JobKind::Train => Output::Dir(output),
            };
            jobs::attach(&t, &job_id, kind, out, Ui { json, verbose }).await
        }
    }
}

async fn interrupt_cmd(job_id: &str, at: JobAt, cancel: bool, verbose: bool) -> Result<i32> {
    let json = at.json;
    let (t, _) = job_target(job_id, at)?;
    jobs::interrupt(&t, job_id, cancel, Ui { json, verbose }).await
}

/// Where `job_id` is: flags, else what was recorded when it was submitted from here (returned
/// too, for what else it says).
fn job_target(job_id: &str, at: JobAt) -> Result<(Target, Option<creds::JobRecord>)> {
    let rec = creds::load_job(job_id)?;
    if at.server.is_none() && rec.is_none() {
        bail!("this job was not submitted from here; pass --server, --room and --worker");
    }
    let t = target(&at.conn(rec.as_ref()))?;
    Ok((t, rec))
}

impl JobAt {
    /// Connection arguments: the flags, else `rec`'s (a job's local record).
    fn conn(self, rec: Option<&creds::JobRecord>) -> ConnArgs {
        ConnArgs {
            server: ServerArg { server: self.server.or(rec.map(|r| r.server.clone())) },
            room: self.room.or(rec.map(|r| r.room.clone())),
            jwt: self.jwt,
            room_secret: self.room_secret,
            worker: self.worker.or(rec.map(|r| r.worker.clone())),
            auto_select: false,
            min_gpu_memory: 0,
            bind: self.bind,
            relay_only: self.relay_only,
            json: self.json,
        }
    }
}

fn config_cmd(cmd: ConfigCmd) -> Result<i32> {
    let file = |project: bool| if project { config::project_path() } else { config::user_path() };
    let edit = |project: bool, f: &dyn Fn(&mut config::Edit) -> Result<String>| -> Result<i32> {
        let mut e = config::Edit::open(&file(project))?;
        let said = f(&mut e)?;
        let p = e.save()?;
        eprintln!("{said} (in {})", p.display());
        Ok(0)
    };
    match cmd {
        ConfigCmd::Path => {
            for (scope, p) in [("project", config::project_path()), ("user", config::user_path())] {
                let state = if p.exists() { "exists" } else { "absent" };
                println!("{scope:<8} {}  ({state})", config::absolute(&p)?.display());
            }
            eprintln!("flags win over environment variables, which win over the project file, then the user's");
            Ok(0)
        }
        ConfigCmd::Show { json } => {
            let s = Settings::load()?;
            let envs = [
                ("server", "SLEAP_RTC_SERVER"),
                ("room", "SLEAP_RTC_ROOM"),
                ("registry", "SLEAP_RTC_REGISTRY"),
                ("worker.name", "SLEAP_RTC_WORKER_NAME"),
                ("worker.work_dir", "SLEAP_RTC_WORK_DIR"),
                ("worker.sleap_nn", "SLEAP_NN"),
                ("worker.python", "SLEAP_RTC_WORKER_PYTHON"),
                ("worker.device", "SLEAP_RTC_DEVICE"),
                ("worker.mounts", "SLEAP_RTC_MOUNTS"),
            ];
            let rows: Vec<(String, Option<String>, String)> = s
                .entries()
                .into_iter()
                .map(|(k, v, src)| {
                    let env = envs.iter().find(|(key, _)| *key == k).map(|(_, e)| *e);
                    match env.and_then(|e| std::env::var(e).ok().map(|v| (e, v))).filter(|(_, v)| !v.is_empty()) {
                        Some((e, v)) => (k.to_owned(), Some(v), format!("env {e}")),
                        None => (k.to_owned(), v, format!("{src:?}").to_lowercase()),
                    }
                })
                .collect();
            if json {
                let m: serde_json::Map<String, Value> =
                    rows.iter().map(|(k, v, src)| (k.clone(), json!({"value": v, "source": src}))).collect();
                println!("{}", serde_json::to_string_pretty(&m)?);
                return Ok(0);
            }
            for (k, v, src) in rows {
                match v {
                    Some(v) => println!("{k:<24} {v}  ({src})"),
                    None => println!("{k:<24} -"),
                }
            }
            Ok(0)
        }
        ConfigCmd::Set { key, value, project } => edit(project, &|e| {
            e.set(&key, &value)?;
            Ok(format!("{key} set"))
        }),
        ConfigCmd::Unset { key, project } => {
            edit(project, &|e| Ok(if e.unset(&key)? { format!("{key} unset") } else { format!("{key} was not set") }))
        }
        ConfigCmd::AddMount { dir, project } => edit(project, &|e| {
            Ok(if e.add_mount(&dir)? { format!("mount {} added", dir.display()) } else { "already a mount".into() })
        }),
        ConfigCmd::RemoveMount { dir, project } => edit(project, &|e| {
            Ok(if e.remove_mount(&dir)? { format!("mount {} removed", dir.display()) } else { "not a mount".into() })
        }),
        ConfigCmd::AddPathMapping { local, worker, project } => edit(project, &|e| {
            e.add_path_mapping(&local, &worker)?;
            Ok(format!("{} → {worker}", local.display()))
        }),
        ConfigCmd::RemovePathMapping { local, project } => edit(project, &|e| {
            Ok(if e.remove_path_mapping(&local)? { "mapping removed".into() } else { "no such mapping".into() })
        }),
    }
}

fn main() {
    let cli = Cli::parse();
    let default = match (&cli.cmd, cli.verbose) {
        (_, true) => "info,sleap_rtc=debug,sleap_rtc_tokio=debug",
        (Cmd::Worker(_), false) => "info,str0m=warn,sctp_proto=warn",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a worker's log is often a file or journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let verbose = cli.verbose;
    sleap_rtc_tokio::init_tls();
    let code = rt.block_on(async move {
        match cli.cmd {
            Cmd::Login(a) => manage::login(a).await,
            Cmd::Logout(a) => manage::logout(a),
            Cmd::Whoami { api, json } => manage::whoami(api, json).await,
            Cmd::Room(c) => manage::room(c).await,
            Cmd::Token(c) => manage::token(c).await,
            Cmd::Key(c) => manage::key(c).await,
            Cmd::Config(c) => config_cmd(c),
            Cmd::Status(a) => doctor::status(a),
            Cmd::Doctor(a) => doctor::doctor(a).await,
            Cmd::Completions { shell } => {
                clap_complete::generate(shell, &mut Cli::command(), "sleap-rtc", &mut std::io::stdout());
                Ok(0)
            }
            Cmd::Workers(c) => workers(c).await,
            Cmd::Worker(a) => worker(a).await,
            Cmd::Train(a) => train(a, verbose).await,
            Cmd::Track(a) => track(a, verbose).await,
            Cmd::Job(c) => job(c, verbose).await,
            Cmd::Models(c) => models::run(c).await,
            Cmd::Quickstart(a) => quickstart::run(a, verbose).await,
        }
    });
    let code = match code {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    // Peer connections close in background tasks; do not wait for them.
    rt.shutdown_timeout(Duration::from_millis(500));
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--room` once promised a default "stored by `login`", which nothing stored: a user who
    /// believed it got "--room is required" after logging in. The default now exists (the config
    /// file's `room`), and the help must say where it comes from and how to set it.
    #[test]
    fn room_help_names_the_real_default() {
        let cli = Cli::command();
        for sub in ["workers", "train", "track"] {
            let help = cli
                .find_subcommand(sub)
                .and_then(|c| c.get_arguments().find(|a| a.get_id() == "room"))
                .and_then(|a| a.get_help())
                .map(|h| h.to_string())
                .unwrap_or_else(|| panic!("`{sub}` has a documented --room"));
            assert!(!help.contains("stored by `login`"), "{sub} --room: {help}");
            assert!(help.contains("config file") && help.contains("room set-default"), "{sub} --room: {help}");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
