//! Embedding the sleap-rtc client in a plain smol application: no tokio runtime, no CLI.
//!
//! Finds a worker in a room, connects to it over WebRTC (the server signs a ticket that proves
//! our room membership), submits a training job with its labels, prints the worker's progress
//! and fetches the trained model.
//!
//! ```text
//! SLEAP_RTC_SERVER=ws://127.0.0.1:8080/ws SLEAP_RTC_JWT=eyJ... SLEAP_RTC_ROOM=... \
//!     cargo run -p sleap-rtc-smol --example embed -- config.yaml labels.pkg.slp models/
//! ```
//!
//! (`sleap-rtc login` stores a JWT in ~/.config/sleap-rtc/credentials.json; `sleap-rtc room
//! list` shows room ids.)

use std::error::Error;
use std::path::{Path, PathBuf};

use serde_json::json;
use sleap_rtc_core::job::{JobMsg, JobStatus, Progress};
use sleap_rtc_core::signal::{Filters, Register};
use sleap_rtc_smol::client::{ClientAuth, JobClient};
use sleap_rtc_smol::{PeerOptions, SignalingClient};

fn main() -> Result<(), Box<dyn Error>> {
    // The whole application is one smol::block_on; sleap-rtc's own tasks (the signaling reader,
    // one per peer connection) go to smol's global executor.
    smol::block_on(run())
}

async fn run() -> Result<(), Box<dyn Error>> {
    let var = |k: &str| std::env::var(k).map_err(|_| format!("set {k}"));
    let (server, jwt, room) = (var("SLEAP_RTC_SERVER")?, var("SLEAP_RTC_JWT")?, var("SLEAP_RTC_ROOM")?);
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [config, labels, out] = &args[..] else {
        return Err("usage: embed CONFIG.yaml LABELS.pkg.slp OUT_DIR".into());
    };
    let (status, files) = train(&server, &jwt, &room, config, labels, out).await?;
    println!("job {}: {:?} {}", status.job_id, status.state, status.message.unwrap_or_default());
    for f in files {
        println!("received {}", f.display());
    }
    Ok(())
}

/// Trains on the first worker of `room`; returns the job's final status and the files received
/// into `out`. (runtime-smol's conformance test calls this against a real server and worker.)
pub async fn train(
    server: &str,
    jwt: &str,
    room: &str,
    config: &Path,
    labels: &Path,
    out: &Path,
) -> Result<(JobStatus, Vec<PathBuf>), Box<dyn Error>> {
    let labels_name = labels.file_name().and_then(|n| n.to_str()).ok_or("the labels path has no file name")?;
    // The config goes inline in the job spec; smol's async file API reads it.
    let config_text = smol::fs::read_to_string(config).await.map_err(|e| format!("{}: {e}", config.display()))?;

    let reg = Register {
        role: Some("client".into()),
        jwt: Some(jwt.to_owned()),
        room_id: Some(room.to_owned()),
        ..Default::default()
    };
    // A connection to the worker follows: make the DTLS key while we register.
    sleap_rtc_smol::conn::prepare_certificate();
    let sig = SignalingClient::connect(server, reg).await?;
    let workers = sig.discover(Filters { role: Some("worker".into()), ..Default::default() }).await?;
    let worker = workers.first().ok_or("no worker in the room")?;
    println!("worker {} ({} in the room)", worker.peer_id, workers.len());

    let client = JobClient::connect(&sig, &worker.peer_id, PeerOptions::default(), &ClientAuth::Ticket).await?;
    let spec = json!({"type": "train", "labels_path": labels_name, "config_contents": [config_text]});
    let (job_id, upload) = client.submit(&spec, &[labels.to_path_buf()]).await?;
    println!("job {job_id} accepted");
    if let Some(upload) = upload {
        let sent = upload.finish().await?;
        println!("uploaded {} bytes ({} already on the worker)", sent.bytes, sent.resumed_bytes);
    }
    let status = loop {
        match client.next().await {
            Some(JobMsg::JobProgress { progress: Progress::EpochEnd { epoch, loss, val_loss }, .. }) => {
                println!("epoch {epoch}: loss {loss:?}, val_loss {val_loss:?}");
            }
            Some(JobMsg::JobDone { status }) => break status,
            Some(_) => {}
            None => return Err("the connection to the worker closed".into()),
        }
    };
    let mut files = Vec::new();
    if !status.results.is_empty() {
        files = client.receive_results(out)?.finish().await?.files;
    }
    client.close().await;
    Ok((status, files))
}
