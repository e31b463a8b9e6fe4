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
use sleap_rtc_core::job::{JobMsg, Progress};
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, labels, out] = &args[..] else {
        return Err("usage: embed CONFIG.yaml LABELS.pkg.slp OUT_DIR".into());
    };
    let labels = PathBuf::from(labels);
    let labels_name = labels.file_name().and_then(|n| n.to_str()).ok_or("the labels path has no file name")?;
    // The config goes inline in the job spec; smol's async file API reads it.
    let config_text = smol::fs::read_to_string(config).await.map_err(|e| format!("{config}: {e}"))?;

    let reg = Register { role: Some("client".into()), jwt: Some(jwt), room_id: Some(room), ..Default::default() };
    let sig = SignalingClient::connect(&server, reg).await?;
    let workers = sig.discover(Filters { role: Some("worker".into()), ..Default::default() }).await?;
    let worker = workers.first().ok_or("no worker in the room")?;
    println!("worker {} ({} in the room)", worker.peer_id, workers.len());

    let client = JobClient::connect(&sig, &worker.peer_id, PeerOptions::default(), &ClientAuth::Ticket).await?;
    let spec = json!({"type": "train", "labels_path": labels_name, "config_contents": [config_text]});
    let (job_id, upload) = client.submit(&spec, std::slice::from_ref(&labels)).await?;
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
    println!("job {}: {:?} {}", status.job_id, status.state, status.message.unwrap_or_default());
    if !status.results.is_empty() {
        let got = client.receive_results(Path::new(out))?.finish().await?;
        for f in &got.files {
            println!("received {}", f.display());
        }
    }
    client.close().await;
    Ok(())
}
