//! `sleap-rtc`: the command line of sleap-rtc. See `sleap-rtc --help`.

mod creds;
mod jobs;
mod models;
mod quickstart;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use sleap_rtc_core::job::JobKind;
use sleap_rtc_tokio::PeerOptions;
use sleap_rtc_tokio::client::ClientAuth;
use sleap_rtc_tokio::worker::{Worker, WorkerConfig};

use crate::jobs::{Output, ServerUrl, Target, TrackArgs, TrainArgs, Ui};

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
    /// Sign in to a signaling server and store the credential (anonymous, or with an account key).
    Login(LoginArgs),
    /// Create rooms and worker tokens.
    #[command(subcommand)]
    Room(RoomCmd),
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

#[derive(Args, Clone)]
struct ServerArg {
    /// Signaling server, e.g. http://127.0.0.1:8080 or https://rtc.example.org.
    #[arg(long, env = "SLEAP_RTC_SERVER")]
    server: String,
}

#[derive(Args)]
struct LoginArgs {
    #[command(flatten)]
    server: ServerArg,
    /// An account key (slp_acct_...) to store instead of signing in anonymously.
    #[arg(long, env = "SLEAP_RTC_ACCOUNT_KEY", hide_env_values = true)]
    account_key: Option<String>,
    /// Also sign in the SLEAP GUI (upstream's Python `sleap_rtc` package, which cannot sign in to
    /// this server itself): writes its ~/.sleap-rtc/credentials.json (the JWT, and a new Ed25519
    /// device key whose public half is registered here, so workers accept its challenge answers).
    /// Needs a JWT: not with --account-key.
    #[arg(long, conflicts_with = "account_key")]
    for_sleap_gui: bool,
}

#[derive(Subcommand)]
enum RoomCmd {
    /// Create a room; prints its id.
    Create {
        #[command(flatten)]
        server: ServerArg,
        /// A name for the room.
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, env = "SLEAP_RTC_JWT", hide_env_values = true)]
        jwt: Option<String>,
    },
    /// Create a worker token for a room; prints it (it is shown only once).
    Token {
        #[command(flatten)]
        server: ServerArg,
        #[arg(long, env = "SLEAP_RTC_ROOM")]
        room: String,
        /// The worker's display name.
        #[arg(long, default_value = "worker")]
        name: String,
        #[arg(long, env = "SLEAP_RTC_JWT", hide_env_values = true)]
        jwt: Option<String>,
    },
}

/// How a client reaches a worker.
#[derive(Args, Clone)]
struct ConnArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Room id (required: `login` stores no room).
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
    /// Worker token (slp_...) from `sleap-rtc room token`, or an account key.
    #[arg(long, env = "SLEAP_RTC_TOKEN", hide_env_values = true)]
    token: String,
    /// Name shown to room members.
    #[arg(long)]
    name: Option<String>,
    /// Where jobs, their uploads and results live.
    #[arg(long, env = "SLEAP_RTC_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// The sleap-nn executable.
    #[arg(long, env = "SLEAP_NN", default_value = "sleap-nn")]
    sleap_nn: PathBuf,
    /// A directory whose files jobs may name by absolute path (repeatable).
    #[arg(long = "mount", value_name = "DIR")]
    mounts: Vec<PathBuf>,
    /// A Python with sleap-io, for the SLEAP GUI's path check: it lists the videos a .slp names
    /// so the GUI can say which are missing on this machine. Default: the interpreter of the
    /// sleap-nn script (its environment has sleap-io); without one the check reports no videos.
    #[arg(long, env = "SLEAP_RTC_WORKER_PYTHON", value_name = "PATH")]
    python: Option<PathBuf>,
    /// Require the room's shared secret from clients instead of a server-signed ticket.
    #[arg(long, env = "SLEAP_RTC_ROOM_SECRET", hide_env_values = true)]
    room_secret: Option<String>,
    /// Inference device passed to sleap-nn (auto, cpu, cuda, cuda:0, mps).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Local addresses for peer connections (default: every interface).
    #[arg(long = "bind", value_name = "IP")]
    bind: Vec<IpAddr>,
    /// Seconds between SIGTERM and SIGKILL when a job is cancelled.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    cancel_grace: f64,
    /// Seconds to wait for sleap-nn to honour a stop before interrupting it (SIGINT).
    #[arg(long, default_value_t = 120.0, value_name = "SECS")]
    stop_timeout: f64,
    /// Upload cache size (repeated datasets are not transferred again).
    #[arg(long, default_value_t = 20, value_name = "GB")]
    upload_cache_gb: u64,
    /// Publish every trained model to the room's registry: s3://bucket/prefix or a directory.
    #[arg(long, env = "SLEAP_RTC_REGISTRY", value_name = "URL|PATH")]
    registry: Option<String>,
    /// Cache of registry models fetched for inference (least recently used evicted first).
    #[arg(long, default_value_t = 50, value_name = "GB")]
    model_cache_gb: u64,
    /// Publish the running job's progress (epoch, loss, a short loss history) to the room, for
    /// the dashboard's loss chart; the signaling server relays it. Off: only the job's client
    /// sees progress.
    #[arg(long, env = "SLEAP_RTC_PUBLISH_PROGRESS")]
    publish_progress: bool,
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

#[derive(Subcommand)]
enum JobCmd {
    /// Follow a job again after a disconnect, and fetch its results if it has finished.
    Attach {
        job_id: String,
        /// Server, room and worker default to what was recorded when the job was submitted.
        #[arg(long, env = "SLEAP_RTC_SERVER")]
        server: Option<String>,
        #[arg(long)]
        room: Option<String>,
        #[arg(long)]
        worker: Option<String>,
        #[arg(long, env = "SLEAP_RTC_JWT", hide_env_values = true)]
        jwt: Option<String>,
        #[arg(long, env = "SLEAP_RTC_ROOM_SECRET", hide_env_values = true)]
        room_secret: Option<String>,
        /// Where results go (default: the output given at submission).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        #[arg(long = "bind", value_name = "IP")]
        bind: Vec<IpAddr>,
        #[arg(long)]
        json: bool,
    },
    /// Jobs submitted from this machine.
    List,
}

fn peer_options(bind: &[IpAddr]) -> PeerOptions {
    let mut o = PeerOptions::default();
    if !bind.is_empty() {
        o.bind_ips = bind.to_vec();
    }
    o
}

fn target(c: &ConnArgs) -> Result<Target> {
    let server = ServerUrl::parse(&c.server.server)?;
    let saved = creds::get(&server.http)?;
    let credential = creds::resolve(&server.http, c.jwt.as_deref())?;
    let room = match (&c.room, saved.and_then(|s| s.default_room)) {
        (Some(r), _) => r.clone(),
        (None, Some(r)) => r,
        (None, None) => bail!("--room is required (or set SLEAP_RTC_ROOM)"),
    };
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
        peer: peer_options(&c.bind),
    })
}

async fn http_json(req: reqwest::RequestBuilder) -> Result<Value> {
    let resp = req.send().await.context("cannot reach the server")?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let detail = body.get("detail").and_then(Value::as_str).unwrap_or("no detail");
        bail!("the server answered {status}: {detail}");
    }
    Ok(body)
}

async fn login(a: LoginArgs) -> Result<i32> {
    let server = ServerUrl::parse(&a.server.server)?;
    let http = reqwest::Client::new();
    let saved = match a.account_key {
        Some(key) => {
            let me = http_json(http.get(format!("{}/api/auth/me", server.http)).bearer_auth(&key)).await?;
            creds::Saved {
                credential: key,
                username: me.get("username").and_then(Value::as_str).map(str::to_owned),
                default_room: None,
            }
        }
        None => {
            let r = http_json(http.post(format!("{}/anonymous-signin", server.http))).await?;
            creds::Saved {
                credential: r["jwt"].as_str().context("no jwt in the sign-in reply")?.to_owned(),
                username: r.get("username").and_then(Value::as_str).map(str::to_owned),
                default_room: None,
            }
        }
    };
    let user = saved.username.clone().unwrap_or_default();
    let jwt = saved.credential.clone();
    let path = creds::put(&server.http, saved)?;
    eprintln!("logged in to {} as {user}; credential stored in {}", server.http, path.display());
    if a.for_sleap_gui {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness for the device key: {e}"))?;
        let (private, public) = sleap_rtc_core::upstream::auth::device_key(&seed);
        http_json(
            http.post(format!("{}/api/auth/public-keys", server.http))
                .bearer_auth(&jwt)
                .json(&json!({"public_key": public, "device_name": "sleap-gui"})),
        )
        .await
        .context("registering the SLEAP GUI's device key")?;
        let me = http_json(http.get(format!("{}/api/auth/me", server.http)).bearer_auth(&jwt)).await?;
        let id = me.get("user_id").or(me.get("id")).and_then(Value::as_str).unwrap_or_default();
        let up = creds::write_upstream(&jwt, id, &user, &private)?;
        let ws = server.http.replacen("http", "ws", 1);
        eprintln!(
            "the SLEAP GUI is signed in too ({}); point it at this server with\n  \
             export SLEAP_RTC_SIGNALING_WS={ws}/ws SLEAP_RTC_SIGNALING_HTTP={}\n\
             The sign-in lasts as long as the JWT (7 days by default): run this again then.",
            up.display(),
            server.http
        );
    }
    Ok(0)
}

async fn room(cmd: RoomCmd) -> Result<i32> {
    let http = reqwest::Client::new();
    match cmd {
        RoomCmd::Create { server, name, jwt } => {
            let s = ServerUrl::parse(&server.server)?;
            let cred = creds::resolve(&s.http, jwt.as_deref())?;
            let r = http_json(
                http.post(format!("{}/api/auth/rooms", s.http)).bearer_auth(cred).json(&json!({"name": name})),
            )
            .await?;
            println!("{}", r["room_id"].as_str().unwrap_or_default());
        }
        RoomCmd::Token { server, room, name, jwt } => {
            let s = ServerUrl::parse(&server.server)?;
            let cred = creds::resolve(&s.http, jwt.as_deref())?;
            let r = http_json(
                http.post(format!("{}/api/auth/token", s.http))
                    .bearer_auth(cred)
                    .json(&json!({"room_id": room, "worker_name": name})),
            )
            .await?;
            println!("{}", r["token_id"].as_str().unwrap_or_default());
            eprintln!(
                "this token is shown once; start a worker with: sleap-rtc worker --server {} --token TOKEN",
                s.http
            );
        }
    }
    Ok(0)
}

async fn workers(c: ConnArgs) -> Result<i32> {
    let t = target(&c)?;
    let mut reg = sleap_rtc_core::signal::Register {
        role: Some("client".into()),
        room_id: Some(t.room.clone()),
        ..Default::default()
    };
    if t.credential.starts_with("slp_") {
        reg.api_key = Some(t.credential.clone());
    } else {
        reg.jwt = Some(t.credential.clone());
    }
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

fn worker_config(a: &WorkerArgs) -> Result<WorkerConfig> {
    let server = ServerUrl::parse(&a.server.server)?;
    let work_dir = a.work_dir.clone().unwrap_or_else(|| creds::data_dir().join("worker"));
    let mut cfg = WorkerConfig::new(&server.ws, &a.token, &work_dir, &a.sleap_nn);
    cfg.room = a.room.clone();
    cfg.name = a.name.clone();
    for m in &a.mounts {
        if !m.is_dir() {
            bail!("--mount {}: not a directory", m.display());
        }
    }
    cfg.mounts = a.mounts.clone();
    cfg.python = a.python.clone();
    cfg.room_secret = a.room_secret.clone().filter(|s| !s.is_empty());
    cfg.device = a.device.clone();
    cfg.peer = peer_options(&a.bind);
    let secs = |s: f64, what: &str| {
        if s.is_finite() && s >= 0.0 {
            Ok(Duration::from_secs_f64(s))
        } else {
            Err(anyhow::anyhow!("{what} must be ≥ 0"))
        }
    };
    cfg.supervision.cancel_grace = secs(a.cancel_grace, "--cancel-grace")?;
    cfg.supervision.stop_sigint_after = secs(a.stop_timeout, "--stop-timeout")?;
    cfg.upload_cache_bytes = a.upload_cache_gb.saturating_mul(1 << 30);
    cfg.registry = a.registry.clone().filter(|r| !r.is_empty());
    cfg.model_cache_bytes = a.model_cache_gb.saturating_mul(1 << 30);
    cfg.publish_progress = a.publish_progress;
    Ok(cfg)
}

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

async fn worker(a: WorkerArgs) -> Result<i32> {
    let cfg = worker_config(&a)?;
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
    let args = TrainArgs {
        configs: a.configs,
        labels: a.labels,
        val_labels: a.val_labels,
        max_epochs: a.max_epochs,
        batch_size: a.batch_size,
        learning_rate: a.learning_rate,
        run_name: a.run_name,
        resume: a.resume,
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
    let args = TrackArgs {
        models: a.models,
        data: a.data,
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
        JobCmd::List => {
            for r in creds::list_jobs() {
                println!("{}  {}  worker {}  room {}  → {}", r.job_id, r.kind, r.worker, r.room, r.output.display());
            }
            Ok(0)
        }
        JobCmd::Attach { job_id, server, room, worker, jwt, room_secret, output, bind, json } => {
            let rec = creds::load_job(&job_id)?;
            let server = server
                .or(rec.as_ref().map(|r| r.server.clone()))
                .context("this job was not submitted from here; pass --server, --room and --worker")?;
            let room = room.or(rec.as_ref().map(|r| r.room.clone()));
            let worker = worker.or(rec.as_ref().map(|r| r.worker.clone()));
            let kind = match rec.as_ref().map(|r| r.kind.as_str()) {
                Some("track") => JobKind::Track,
                _ => JobKind::Train,
            };
            let output = output.or(rec.as_ref().map(|r| r.output.clone())).unwrap_or_else(|| PathBuf::from("."));
            let conn = ConnArgs {
                server: ServerArg { server },
                room,
                jwt,
                room_secret,
                worker,
                auto_select: false,
                min_gpu_memory: 0,
                bind,
                json,
            };
            let t = target(&conn)?;
            let out = match kind {
                JobKind::Track => Output::File(output),
                JobKind::Train => Output::Dir(output),
            };
            jobs::attach(&t, &job_id, kind, out, Ui { json, verbose }).await
        }
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
            Cmd::Login(a) => login(a).await,
            Cmd::Room(c) => room(c).await,
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
    use clap::CommandFactory;

    /// `--room` promised a default "stored by `login`", which nothing stores: a user who
    /// believed it got "--room is required" after logging in.
    #[test]
    fn room_help_promises_no_room_from_login() {
        let cli = Cli::command();
        for sub in ["workers", "train", "track"] {
            let help = cli
                .find_subcommand(sub)
                .and_then(|c| c.get_arguments().find(|a| a.get_id() == "room"))
                .and_then(|a| a.get_help())
                .map(|h| h.to_string())
                .unwrap_or_else(|| panic!("`{sub}` has a documented --room"));
            assert!(!help.contains("stored by"), "{sub} --room: {help}");
            assert!(help.contains("required"), "{sub} --room: {help}");
        }
    }
}
