//! Transfer benchmark: a sender and a receiver process exchange one file over 127.0.0.1 with real
//! ICE/DTLS/SCTP (str0m), meeting through a real signaling server that this process runs.
//!
//! ```text
//! cargo run --release -p sleap-rtc-tokio --example transfer-bench -- --size 1GiB
//! cargo run --release -p sleap-rtc-smol --example smol-transfer-bench -- --size 1GiB
//! ```
//!
//! Prints, per side: MB/s (10^6 bytes/s), setup time (offer → both channels open), CPU seconds
//! and peak RSS; the receiver's file is verified (BLAKE3) by the transfer itself.
//!
//! Shared by both runtime crates (each example is a `main` that includes this file): the two
//! measured processes run [`child`] on the crate's runtime; the parent, which only hosts the
//! signaling server and starts them, is a tokio program in both.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use sleap_rtc_core::signal::{Register, ServerMessage};
use sleap_rtc_driver::Runtime;
use sleap_rtc_driver::conn::{PeerOptions, accept, certificate_ready, connect};
use sleap_rtc_driver::signaling::SignalingClient;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser, Debug, Clone)]
#[command(about = "Benchmark sleap-rtc file transfer between two processes on 127.0.0.1")]
pub struct Args {
    /// File size: bytes, or with KiB/MiB/GiB suffix.
    #[arg(long, default_value = "256MiB")]
    size: String,
    /// Payload bytes per bulk frame.
    #[arg(long, default_value_t = sleap_rtc_core::transfer::DEFAULT_CHUNK)]
    chunk: usize,
    /// Bulk high watermark in bytes.
    #[arg(long)]
    high_water: Option<usize>,
    /// UDP payload size (str0m MTU).
    #[arg(long)]
    mtu: Option<usize>,
    /// Internal: child role (sender|receiver).
    #[arg(long, hide = true)]
    pub role: Option<String>,
    #[arg(long, hide = true)]
    ws: Option<String>,
    #[arg(long, hide = true)]
    register: Option<String>,
    #[arg(long, hide = true)]
    path: Option<PathBuf>,
    #[arg(long, hide = true)]
    target: Option<String>,
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mul) =
        [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("GB", 1_000_000_000), ("MB", 1_000_000)]
            .iter()
            .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
            .unwrap_or((s, 1));
    Ok(num.trim().parse::<u64>().map_err(|e| anyhow::anyhow!("bad --size {s:?}: {e}"))? * mul)
}

fn options(a: &Args) -> PeerOptions {
    let mut o = PeerOptions::loopback();
    o.session.chunk = a.chunk;
    if let Some(h) = a.high_water {
        o.session.high_water = h;
        o.session.peer.max_buffered = o.session.peer.max_buffered.max(h + 256 * 1024);
    }
    if let Some(m) = a.mtu {
        o.session.peer.mtu = m;
    }
    o
}

/// CPU seconds (user + system) and peak RSS (KiB) of this process.
fn usage() -> (f64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (cpu, hwm)
}

/// One measured side (`--role sender|receiver`), on runtime `R`.
pub async fn child<R: Runtime>(a: Args) -> anyhow::Result<()> {
    let ws = a.ws.clone().unwrap_or_default();
    let reg: Register = serde_json::from_str(a.register.as_deref().unwrap_or("{}"))?;
    let sig = SignalingClient::<R>::connect(&ws, reg).await?;
    println!("{}", json!({"peer_id": sig.peer_id()}));
    let path = a.path.clone().unwrap_or_default();
    match a.role.as_deref() {
        Some("receiver") => {
            certificate_ready::<R>().await;
            let offer = loop {
                let ev = sig.next_event().await.ok_or_else(|| anyhow::anyhow!("signaling closed"))?;
                if let ServerMessage::Offer(_) = ev.msg {
                    break ev.msg;
                }
            };
            let t0 = Instant::now();
            let conn = accept(&sig, &offer, options(&a)).await?;
            let setup = t0.elapsed();
            let incoming = conn.receive_files(&path)?;
            let mut progress = incoming.progress.clone();
            let _ = progress.wait_for(|p| p.acked_bytes > 0).await;
            let t1 = Instant::now();
            let r = incoming.finish().await?;
            let secs = t1.elapsed().as_secs_f64();
            let (cpu, rss) = usage();
            let bytes: u64 = r.files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
            println!(
                "{}",
                json!({"side": "receiver", "ok": r.failed.is_empty(), "bytes": bytes, "secs": secs,
                       "setup_ms": setup.as_secs_f64() * 1e3, "cpu_secs": cpu, "peak_rss_kib": rss})
            );
            conn.close().await;
        }
        _ => {
            let target = a.target.clone().unwrap_or_default();
            // Certificate generation is once per process and overlaps registration in real use;
            // setup here is offer → channels open.
            let tc = Instant::now();
            certificate_ready::<R>().await;
            eprintln!("DTLS certificate ready after {:.1} ms", tc.elapsed().as_secs_f64() * 1e3);
            let t0 = Instant::now();
            let conn = connect(&sig, &target, options(&a)).await?;
            let setup = t0.elapsed();
            let th = Instant::now();
            let transfer = conn.send_files(std::slice::from_ref(&path)).await?;
            let hash_secs = th.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let sent = transfer.finish().await?;
            let secs = t1.elapsed().as_secs_f64();
            let (cpu, rss) = usage();
            println!(
                "{}",
                json!({"side": "sender", "ok": sent.failed.is_empty(), "bytes": sent.bytes, "secs": secs,
                       "hash_secs": hash_secs, "setup_ms": setup.as_secs_f64() * 1e3, "cpu_secs": cpu,
                       "peak_rss_kib": rss})
            );
            conn.close().await;
        }
    }
    Ok(())
}

async fn spawn_child(
    args: &[String],
) -> anyhow::Result<(tokio::process::Child, tokio::io::Lines<BufReader<tokio::process::ChildStdout>>)> {
    let mut c = tokio::process::Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = c.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    Ok((c, BufReader::new(out).lines()))
}

/// Hosts the signaling server, writes the payload, runs a receiver and a sender child.
async fn parent(a: Args) -> anyhow::Result<()> {
    let size = parse_size(&a.size)?;
    let work = tempfile::tempdir()?;
    let src = work.path().join("payload.bin");
    {
        // Pseudo-random content (incompressible, not all zeros) written in 8 MiB blocks.
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src)?);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut block = vec![0u8; 8 << 20];
        let mut left = size;
        while left > 0 {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let bytes = x.to_le_bytes();
                b.copy_from_slice(&bytes[..b.len()]);
            }
            let n = left.min(block.len() as u64) as usize;
            f.write_all(&block[..n])?;
            left -= n as u64;
        }
        f.flush()?;
    }
    let mut cfg = sleap_rtc_server::Config::local(work.path().join("server"));
    cfg.auth_rate_per_min = 1e6;
    let server = sleap_rtc_server::Server::start(cfg).await?;
    let base = format!("http://{}", server.local_addrs()[0]);
    let ws = format!("ws://{}/ws", server.local_addrs()[0]);
    let http = reqwest::Client::new();
    let v: Value = http.post(format!("{base}/anonymous-signin")).send().await?.json().await?;
    let jwt = v["jwt"].as_str().unwrap_or_default().to_owned();
    let v: Value =
        http.post(format!("{base}/api/auth/rooms")).bearer_auth(&jwt).json(&json!({})).send().await?.json().await?;
    let room = v["room_id"].as_str().unwrap_or_default().to_owned();
    let reg = json!({"role": "peer", "jwt": jwt, "room_id": room}).to_string();

    let mut common = vec!["--size".to_owned(), a.size.clone(), "--chunk".to_owned(), a.chunk.to_string()];
    if let Some(h) = a.high_water {
        common.extend(["--high-water".to_owned(), h.to_string()]);
    }
    if let Some(m) = a.mtu {
        common.extend(["--mtu".to_owned(), m.to_string()]);
    }
    let dst = work.path().join("received");
    let mut rargs = common.clone();
    rargs.extend(["--role", "receiver", "--ws", &ws, "--register", &reg].map(str::to_owned));
    rargs.extend(["--path".to_owned(), dst.display().to_string()]);
    let (mut rc, mut rout) = spawn_child(&rargs).await?;
    let first: Value = serde_json::from_str(&rout.next_line().await?.unwrap_or_default())?;
    let target = first["peer_id"].as_str().unwrap_or_default().to_owned();
    let mut sargs = common;
    sargs.extend(["--role", "sender", "--ws", &ws, "--register", &reg, "--target", &target].map(str::to_owned));
    sargs.extend(["--path".to_owned(), src.display().to_string()]);
    let (mut sc, mut sout) = spawn_child(&sargs).await?;
    let _ = sout.next_line().await?;
    let timeout = Duration::from_secs(3600);
    let s: Value = serde_json::from_str(&tokio::time::timeout(timeout, sout.next_line()).await??.unwrap_or_default())?;
    let r: Value = serde_json::from_str(&tokio::time::timeout(timeout, rout.next_line()).await??.unwrap_or_default())?;
    let _ = tokio::join!(sc.wait(), rc.wait());
    let mb = |v: &Value| v["bytes"].as_f64().unwrap_or(0.0) / v["secs"].as_f64().unwrap_or(1.0) / 1e6;
    println!(
        "size {size} bytes, chunk {}, high water {}, mtu {}",
        a.chunk,
        options(&a).session.high_water,
        options(&a).session.peer.mtu
    );
    for v in [&s, &r] {
        println!(
            "{:<8} ok={} {:>8.1} MB/s  {:>7.2} s  setup {:>6.1} ms  cpu {:>6.2} s  peak RSS {:>6.1} MiB{}",
            v["side"].as_str().unwrap_or("?"),
            v["ok"],
            mb(v),
            v["secs"].as_f64().unwrap_or(0.0),
            v["setup_ms"].as_f64().unwrap_or(0.0),
            v["cpu_secs"].as_f64().unwrap_or(0.0),
            v["peak_rss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            v.get("hash_secs")
                .and_then(Value::as_f64)
                .map(|h| format!("  (hashing before send {h:.2} s)"))
                .unwrap_or_default(),
        );
    }
    let hash = sleap_rtc_driver::files::hash_file;
    let same = hash(&src)? == hash(&dst.join("payload.bin"))?;
    println!("received file identical: {same}");
    server.shutdown().await;
    if !same || s["ok"] != true || r["ok"] != true {
        anyhow::bail!("transfer failed");
    }
    Ok(())
}

/// Parses the arguments and sets up logging (`SLEAP_RTC_LOG`).
pub fn init() -> Args {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SLEAP_RTC_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    Args::parse()
}

/// The parent process, on its own tokio runtime.
pub fn run_parent(a: Args) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(parent(a))
}
