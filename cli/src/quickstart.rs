//! `sleap-rtc quickstart`: everything on this machine, for real. An embedded signaling server, a
//! worker, a sign-in, a room and a worker token; then `train` on the bundled tiny dataset and
//! `track` with the model it returns, through the same code paths as the separate commands
//! (WebRTC over loopback, server-signed tickets, verified transfers, the real sleap-nn).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use sleap_rtc_core::job::JobKind;
use sleap_rtc_tokio::PeerOptions;
use sleap_rtc_tokio::client::ClientAuth;
use sleap_rtc_tokio::worker::{Worker, WorkerConfig};

use crate::jobs::{self, Output, ServerUrl, Target, TrackArgs, TrainArgs, Ui};

const LABELS: &[u8] = include_bytes!("../assets/labels.pkg.slp");
const CONFIG: &str = include_str!("../assets/tiny_single.yaml");

#[derive(Args)]
pub struct QuickstartArgs {
    /// The sleap-nn executable (default: $SLEAP_NN, `sleap-nn` on PATH, or the venv that
    /// scripts/quickstart.sh creates).
    #[arg(long)]
    sleap_nn: Option<PathBuf>,
    /// Where the server, worker, dataset and results go (default: ~/.local/share/sleap-rtc/quickstart).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Epochs to train (10 steps each, about a second on a CPU). With fewer than ~15 the tiny
    /// model does not yet find the animal, and the predictions file holds no instances.
    #[arg(long, default_value_t = 20)]
    max_epochs: u32,
}

/// Looks for sleap-nn where a user would have put it.
pub fn find_sleap_nn(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("SLEAP_NN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("sleap-nn"))
        .find(|p| p.is_file());
    on_path.or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = PathBuf::from(home).join(".cache/sleap-rtc/sleap-nn-venv/bin/sleap-nn");
        p.is_file().then_some(p)
    })
}

fn step(n: u32, text: &str) {
    eprintln!("\n==> [{n}/6] {text}");
}

pub async fn run(a: QuickstartArgs, verbose: bool) -> Result<i32> {
    let t0 = Instant::now();
    let Some(sleap_nn) = find_sleap_nn(a.sleap_nn.as_deref()) else {
        bail!(
            "sleap-nn was not found (looked at --sleap-nn, $SLEAP_NN, PATH and ~/.cache/sleap-rtc/sleap-nn-venv).\n  \
             scripts/quickstart.sh installs it into a venv (a ~7 GB download), or: pip install sleap-nn==0.3.5"
        );
    };
    let dir = a.dir.clone().unwrap_or_else(|| crate::creds::data_dir().join("quickstart"));
    let data = dir.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    std::fs::write(data.join("labels.pkg.slp"), LABELS)?;
    // sleap-nn-interface.md's run2: 10 steps per epoch; 20 epochs find the animal in every frame.
    std::fs::write(
        data.join("tiny_single.yaml"),
        CONFIG.replace("min_train_steps_per_epoch: 5", "min_train_steps_per_epoch: 10"),
    )?;

    step(1, "starting a signaling server on 127.0.0.1");
    let server = sleap_rtc_server::Server::start(sleap_rtc_server::Config::local(dir.join("server")))
        .await
        .context("cannot start the embedded signaling server")?;
    let url = ServerUrl::parse(&format!("http://{}", server.local_addrs()[0]))?;
    eprintln!("    listening on {}", url.http);

    step(2, "signing in anonymously, creating a room and a worker token");
    let http = reqwest::Client::new();
    let jwt = post(&http, &format!("{}/anonymous-signin", url.http), None, json!({})).await?["jwt"]
        .as_str()
        .context("no jwt")?
        .to_owned();
    let room = post(&http, &format!("{}/api/auth/rooms", url.http), Some(&jwt), json!({"name": "quickstart"})).await?
        ["room_id"]
        .as_str()
        .context("no room id")?
        .to_owned();
    let token = post(
        &http,
        &format!("{}/api/auth/token", url.http),
        Some(&jwt),
        json!({"room_id": room, "worker_name": "quickstart"}),
    )
    .await?["token_id"]
        .as_str()
        .context("no token")?
        .to_owned();
    eprintln!("    room {room}");

    step(3, &format!("starting a worker with {} (its version check imports torch: a few seconds)", sleap_nn.display()));
    let mut cfg = WorkerConfig::new(&url.ws, &token, &dir.join("worker"), &sleap_nn);
    cfg.name = Some("quickstart".into());
    cfg.peer = PeerOptions::loopback();
    cfg.device = "cpu".into();
    let worker = Worker::new(cfg).await?;
    match &worker.capabilities().sleap_nn_version {
        Some(v) => {
            eprintln!("    worker {} ready: sleap-nn {v}, {}", worker.peer_id(), worker.capabilities().gpu_model)
        }
        None => bail!("`{} --version` failed: is sleap-nn installed there?", sleap_nn.display()),
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let w = worker.clone();
    let worker_task = tokio::spawn(async move {
        let _ = w
            .run(async move {
                let _ = stop_rx.await;
            })
            .await;
    });
    wait_for_worker(&http, &url.http, &jwt, &room).await?;

    let target = Target {
        server: url.clone(),
        room: room.clone(),
        credential: jwt.clone(),
        worker: Some(worker.peer_id().to_owned()),
        min_gpu_memory_mb: 0,
        auth: ClientAuth::Ticket,
        peer: PeerOptions::loopback(),
    };
    let ui = Ui { json: false, verbose };

    step(4, &format!("training on the bundled tiny dataset ({} epochs; Ctrl-C once stops early)", a.max_epochs));
    let models = dir.join("models");
    std::fs::create_dir_all(&models)?;
    let train = TrainArgs {
        configs: vec![data.join("tiny_single.yaml")],
        labels: None,
        max_epochs: Some(a.max_epochs),
        run_name: Some("quickstart".into()),
        ..Default::default()
    };
    let t_train = Instant::now();
    let (spec, uploads, epochs) = jobs::train_spec(&train)?;
    let code = jobs::run(&target, JobKind::Train, spec, uploads, Output::Dir(models.clone()), epochs, ui).await?;
    if code != jobs::EXIT_OK {
        bail!(
            "training did not complete (exit code {code}); the worker's log is in {}",
            dir.join("worker/jobs").display()
        );
    }
    let run_dir = models.join("quickstart");
    eprintln!("    trained in {:.1} s → {}", t_train.elapsed().as_secs_f64(), run_dir.display());

    step(5, "running inference with the trained model");
    let predictions = dir.join("predictions.slp");
    let track = TrackArgs {
        models: vec![run_dir.display().to_string()],
        data: data.join("labels.pkg.slp").display().to_string(),
        output: predictions.clone(),
        ..Default::default()
    };
    let t_track = Instant::now();
    let (spec, uploads) = jobs::track_spec(&track)?;
    let code = jobs::run(&target, JobKind::Track, spec, uploads, Output::File(predictions.clone()), None, ui).await?;
    if code != jobs::EXIT_OK {
        bail!("inference did not complete (exit code {code})");
    }
    eprintln!("    inference took {:.1} s → {}", t_track.elapsed().as_secs_f64(), predictions.display());

    step(6, "done; shutting down the worker and the server");
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), worker_task).await;
    server.shutdown().await;
    eprintln!(
        "\nquickstart finished in {:.1} s\n  model:       {}\n  predictions: {}\n\nOn real machines: `sleap-rtc worker` on the GPU box, `sleap-rtc train` on your laptop (see README).",
        t0.elapsed().as_secs_f64(),
        run_dir.display(),
        predictions.display()
    );
    Ok(0)
}

async fn post(http: &reqwest::Client, url: &str, jwt: Option<&str>, body: Value) -> Result<Value> {
    let mut r = http.post(url).json(&body);
    if let Some(j) = jwt {
        r = r.bearer_auth(j);
    }
    let resp = r.send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("POST {url}: {status} {v}");
    }
    Ok(v)
}

async fn wait_for_worker(http: &reqwest::Client, base: &str, jwt: &str, room: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http.get(format!("{base}/api/rooms/{room}/workers")).bearer_auth(jwt).send().await;
        if let Ok(r) = r {
            let v: Value = r.json().await.unwrap_or(Value::Null);
            let n = v.get("workers").and_then(Value::as_array).map_or(0, Vec::len);
            if n > 0 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the worker did not register within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
