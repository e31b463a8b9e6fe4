//! A sleap-rtc worker in a plain smol application: no tokio runtime of our own, no CLI.
//!
//! Registers in the room its token belongs to, accepts authenticated clients, runs their
//! training and inference jobs with `sleap-nn` and publishes trained models to a directory
//! registry. Close stdin (Ctrl-D) to stop: the running job is cancelled and the worker leaves the
//! room. (Ctrl-C kills it instead; the next start marks an interrupted job failed.)
//!
//! ```text
//! SLEAP_RTC_SERVER=ws://127.0.0.1:8080/ws SLEAP_RTC_TOKEN=slp_... \
//!     cargo run -p sleap-rtc-smol --example worker -- /var/tmp/sleap-worker [path/to/sleap-nn]
//! ```
//!
//! Optional: `SLEAP_RTC_REGISTRY` (a directory or `s3://` URL to publish trained models to;
//! `s3://` needs the crate's `s3` feature), `SLEAP_RTC_BIND` (comma-separated local addresses for
//! peer connections; default every interface).
//!
//! (`sleap-rtc room token` makes a worker token; `sleap-rtc worker --help` lists what the
//! `WorkerConfig` fields mean.)

use std::error::Error;
use std::path::PathBuf;

use sleap_rtc_smol::worker::{Worker, WorkerConfig};

fn main() -> Result<(), Box<dyn Error>> {
    smol::block_on(async {
        let var = |k: &str| std::env::var(k).map_err(|_| format!("set {k}"));
        let (server, token) = (var("SLEAP_RTC_SERVER")?, var("SLEAP_RTC_TOKEN")?);
        let mut args = std::env::args_os().skip(1).map(PathBuf::from);
        let work_dir = args.next().ok_or("usage: worker WORK_DIR [SLEAP_NN]")?;
        let sleap_nn = args.next().unwrap_or_else(|| "sleap-nn".into());
        let mut cfg = WorkerConfig::new(&server, &token, &work_dir, &sleap_nn);
        cfg.registry = std::env::var("SLEAP_RTC_REGISTRY").ok();
        if let Ok(ips) = std::env::var("SLEAP_RTC_BIND") {
            let ips: Result<Vec<std::net::IpAddr>, _> = ips.split(',').map(|ip| ip.trim().parse()).collect();
            cfg.peer.bind_ips = ips.map_err(|e| format!("SLEAP_RTC_BIND: {e}"))?;
        }

        let worker = Worker::new(cfg).await?;
        let caps = worker.capabilities();
        println!(
            "worker {} ({}, sleap-nn {}); Ctrl-D stops it",
            worker.peer_id(),
            caps.gpu_model,
            caps.sleap_nn_version.as_deref().unwrap_or("not found")
        );
        // stdin is blocking: smol reads it on its blocking pool.
        let stdin_closed = async {
            use smol::io::AsyncReadExt;
            let mut sink = Vec::new();
            let _ = smol::Unblock::new(std::io::stdin()).read_to_end(&mut sink).await;
        };
        worker.run(stdin_closed).await?;
        println!("stopped");
        Ok(())
    })
}
