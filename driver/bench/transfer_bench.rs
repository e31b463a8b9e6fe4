//! Transfer benchmark: one file sent between two processes, three ways, over the same path:
//! ours (real ICE/DTLS/SCTP via str0m, meeting through a real signaling server this process
//! runs), aiortc driven by upstream sleap-rtc's send loop (driver/bench/aiortc_bench.py), and a
//! plain TCP stream copy (what scp and rsync ride on).
//!
//! ```text
//! cargo run --release -p sleap-rtc-tokio --example transfer-bench -- --size 1GiB
//! cargo run --release -p sleap-rtc-smol --example smol-transfer-bench -- --size 1GiB
//! transfer-bench --rtt 40 --rate 1Gbit --queue 5MiB --loss 0.1% --only ours,tcp
//! ```
//!
//! Without path flags the processes talk over 127.0.0.1. With any of `--rtt --jitter --loss
//! --burst --rate --queue --reorder --dup` they run in two network namespaces joined by an
//! emulated link (netpath.rs; needs root), and each side binds only its namespace address.
//!
//! Prints, per transfer: MB/s (10^6 bytes/s, receiver's first byte to its last), CPU seconds
//! per GiB and peak RSS of each process (from wait4), and whether the received file's hash
//! matched; with a path, what the link did (random drops vs queue drops).
//!
//! Shared by both runtime crates (each example is a `main` that includes this file): our two
//! measured processes run [`child`] on the crate's runtime; the parent, which only hosts the
//! signaling server, forwards packets and starts children, is the same in both.
#![allow(dead_code)]

#[path = "netpath.rs"]
mod netpath;
#[path = "parent.rs"]
mod parent;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use netpath::{Exit, NetPath, Proc};
use serde_json::{Value, json};
use sleap_rtc_core::netsim::{LinkParams, LinkStats};
use sleap_rtc_core::signal::{Register, ServerMessage};
use sleap_rtc_driver::Runtime;
use sleap_rtc_driver::conn::{PeerOptions, accept, certificate_ready, connect};
use sleap_rtc_driver::signaling::SignalingClient;

#[derive(Parser, Debug, Clone)]
#[command(about = "Benchmark sleap-rtc file transfer between two processes, against aiortc and TCP, \
                   over loopback or an emulated network path")]
pub struct Args {
    /// File size: bytes, or with KiB/MiB/GiB suffix.
    #[arg(long, default_value = "256MiB")]
    size: String,
    /// Payload bytes per bulk frame (ours).
    #[arg(long, default_value_t = sleap_rtc_core::transfer::DEFAULT_CHUNK)]
    chunk: usize,
    /// Floor (and starting value) of the bulk window in bytes (ours); the window then follows the measured rate.
    #[arg(long)]
    high_water: Option<usize>,
    /// UDP payload size (str0m MTU, ours).
    #[arg(long)]
    mtu: Option<usize>,
    /// Which transfers to run, comma-separated: ours, aiortc, tcp.
    #[arg(long, default_value = "ours,aiortc,tcp", value_delimiter = ',')]
    only: Vec<String>,
    /// Upper bound on each transfer, setup included, in seconds.
    #[arg(long, default_value_t = 300.0)]
    time_limit: f64,
    /// Emulated path: round-trip time in ms (half of it is added in each direction).
    #[arg(long)]
    rtt: Option<f64>,
    /// Emulated path: extra delay per packet, uniform in [0, jitter) ms (packets may reorder).
    #[arg(long)]
    jitter: Option<f64>,
    /// Emulated path: random loss in each direction, as a fraction (0.001) or percent (0.1%).
    #[arg(long)]
    loss: Option<String>,
    /// Emulated path: mean loss-burst length in packets (Gilbert–Elliott; 1 = independent).
    #[arg(long)]
    burst: Option<f64>,
    /// Emulated path: bottleneck rate in each direction, e.g. 1Gbit, 100Mbit, 500kbit.
    #[arg(long)]
    rate: Option<String>,
    /// Emulated path: bottleneck queue (tail drop), in bytes (5MiB) or time at the rate (50ms).
    /// Default with --rate: one bandwidth-delay product, at least 64 KiB.
    #[arg(long)]
    queue: Option<String>,
    /// Emulated path: fraction (or percent) of packets held back 5 ms so later ones overtake.
    #[arg(long)]
    reorder: Option<String>,
    /// Emulated path: fraction (or percent) of packets delivered twice.
    #[arg(long)]
    dup: Option<String>,
    /// Internal: child role (sender|receiver|tcp-sender|tcp-receiver).
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
    /// Internal: the only local address a child may use.
    #[arg(long, hide = true)]
    bind: Option<IpAddr>,
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mul) = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1000),
    ]
    .iter()
    .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
    .unwrap_or((s, 1));
    let n: f64 = num.trim().parse().map_err(|e| anyhow::anyhow!("bad size {s:?}: {e}"))?;
    if !(n >= 0.0 && n.is_finite()) {
        bail!("bad size {s:?}");
    }
    Ok((n * mul as f64) as u64)
}

/// `0.001` or `0.1%`.
fn parse_fraction(what: &str, s: &str) -> anyhow::Result<f64> {
    let s = s.trim();
    let (num, div) = s.strip_suffix('%').map_or((s, 1.0), |n| (n, 100.0));
    let v: f64 = num.trim().parse().map_err(|e| anyhow::anyhow!("bad --{what} {s:?}: {e}"))?;
    let v = v / div;
    if !(0.0..=1.0).contains(&v) {
        bail!("--{what} {s:?} is not between 0 and 1 (or 0% and 100%)");
    }
    Ok(v)
}

/// Bits per second from `1Gbit`, `100Mbit`, `500kbit`, `2.5Gbps` or a plain number.
fn parse_rate(s: &str) -> anyhow::Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("ps").or_else(|| t.strip_suffix("/s")).unwrap_or(&t);
    let t = t.strip_suffix("bit").unwrap_or(t);
    let (num, mul) = [("g", 1e9), ("m", 1e6), ("k", 1e3)]
        .iter()
        .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n, *m)))
        .unwrap_or((t, 1.0));
    let v: f64 = num.trim().parse().map_err(|e| anyhow::anyhow!("bad --rate {s:?}: {e}"))?;
    if !(v > 0.0 && v.is_finite()) {
        bail!("bad --rate {s:?}");
    }
    Ok((v * mul) as u64)
}

/// The link model's parameters from the path flags; `None` when no path flag was given.
fn link_params(a: &Args) -> anyhow::Result<Option<LinkParams>> {
    let any = a.rtt.is_some()
        || a.jitter.is_some()
        || a.loss.is_some()
        || a.burst.is_some()
        || a.rate.is_some()
        || a.queue.is_some()
        || a.reorder.is_some()
        || a.dup.is_some();
    if !any {
        return Ok(None);
    }
    let ms = |what: &str, v: Option<f64>| -> anyhow::Result<Duration> {
        let v = v.unwrap_or(0.0);
        if !(v >= 0.0 && v.is_finite()) {
            bail!("--{what} {v} is not a duration in ms");
        }
        Ok(Duration::from_secs_f64(v / 1e3))
    };
    let rtt = ms("rtt", a.rtt)?;
    let mut p = LinkParams::clean(rtt / 2);
    p.jitter = ms("jitter", a.jitter)?;
    p.loss = a.loss.as_deref().map(|s| parse_fraction("loss", s)).transpose()?.unwrap_or(0.0);
    p.burst = a.burst.unwrap_or(1.0);
    if !(p.burst >= 1.0 && p.burst.is_finite()) {
        bail!("--burst must be at least 1 (packets)");
    }
    p.reorder = a.reorder.as_deref().map(|s| parse_fraction("reorder", s)).transpose()?.unwrap_or(0.0);
    p.dup = a.dup.as_deref().map(|s| parse_fraction("dup", s)).transpose()?.unwrap_or(0.0);
    p.rate_bps = a.rate.as_deref().map(parse_rate).transpose()?;
    p.queue_bytes = match (&a.queue, p.rate_bps) {
        (Some(_), None) => bail!("--queue needs --rate (a queue only fills behind a bottleneck)"),
        (Some(q), Some(rate)) => match q.trim().strip_suffix("ms") {
            Some(t) => {
                let t: f64 = t.trim().parse().map_err(|e| anyhow::anyhow!("bad --queue {q:?}: {e}"))?;
                LinkParams::queue_for(rate, ms("queue", Some(t))?)
            }
            None => parse_size(q)? as usize,
        },
        (None, Some(rate)) => LinkParams::queue_for(rate, rtt).max(64 << 10),
        (None, None) => usize::MAX,
    };
    Ok(Some(p))
}

fn describe(p: &LinkParams) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut s = format!("rtt {:.1} ms ({:.1} ms each way)", ms(p.delay) * 2.0, ms(p.delay));
    if !p.jitter.is_zero() {
        s += &format!(", jitter {:.1} ms", ms(p.jitter));
    }
    s += &format!(", loss {:.3}% each way", p.loss * 100.0);
    if p.loss > 0.0 {
        s += &format!(" (mean burst {:.1})", p.burst);
    }
    match p.rate_bps {
        Some(r) => s += &format!(", rate {:.1} Mbit/s, queue {:.0} KiB", r as f64 / 1e6, p.queue_bytes as f64 / 1024.0),
        None => s += ", rate unlimited",
    }
    if p.reorder > 0.0 {
        s += &format!(", reorder {:.2}%", p.reorder * 100.0);
    }
    if p.dup > 0.0 {
        s += &format!(", dup {:.2}%", p.dup * 100.0);
    }
    s
}

fn options(a: &Args) -> PeerOptions {
    let mut o = PeerOptions::loopback();
    if let Some(ip) = a.bind {
        // The emulated path is the only route; binding anything else could bypass it.
        o.bind_ips = vec![ip];
    }
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

/// One of our measured sides (`--role sender|receiver`), on runtime `R`.
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
            // Progress once a second, so that a transfer the parent stops at its time limit still
            // has a figure.
            let mut tick = progress.clone();
            R::spawn(async move {
                loop {
                    R::sleep_until(Instant::now() + Duration::from_secs(1)).await;
                    let n = tick.borrow_and_update().acked_bytes;
                    println!("{}", json!({"progress": n, "secs": t1.elapsed().as_secs_f64()}));
                }
            });
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

/// The roles that need no async runtime (the TCP baseline); `None` for every other role.
pub fn run_plain(a: &Args) -> Option<anyhow::Result<()>> {
    match a.role.as_deref() {
        Some("tcp-sender") => Some(tcp_sender(a)),
        Some("tcp-receiver") => Some(tcp_receiver(a)),
        _ => None,
    }
}

/// Copies the file into one TCP connection (std uses sendfile for this), then waits for the
/// receiver to close, so the time covers delivery.
fn tcp_sender(a: &Args) -> anyhow::Result<()> {
    let target: SocketAddr = a.target.as_deref().context("--target")?.parse().context("--target")?;
    let path = a.path.as_deref().context("--path")?;
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut s = std::net::TcpStream::connect(target).with_context(|| format!("connecting to {target}"))?;
    let t0 = Instant::now();
    let n = std::io::copy(&mut f, &mut s)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let _ = s.read(&mut [0u8; 1])?;
    println!("{}", json!({"side": "sender", "bytes": n, "secs": t0.elapsed().as_secs_f64()}));
    Ok(())
}

/// Writes what arrives to the file, hashing it (BLAKE3) on the way, as a verifying copy tool must.
fn tcp_receiver(a: &Args) -> anyhow::Result<()> {
    let bind = a.bind.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let path = a.path.as_deref().context("--path")?;
    let l = std::net::TcpListener::bind((bind, 0))?;
    println!("{}", json!({"port": l.local_addr()?.port()}));
    let (mut s, _) = l.accept()?;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut n, mut first, mut report) = (0u64, None, Instant::now());
    loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        let t0 = *first.get_or_insert_with(Instant::now);
        f.write_all(&buf[..k])?;
        h.update(&buf[..k]);
        n += k as u64;
        if report.elapsed() >= Duration::from_secs(1) {
            report = Instant::now();
            println!("{}", json!({"progress": n, "secs": t0.elapsed().as_secs_f64()}));
        }
    }
    f.flush()?;
    let secs = first.map_or(0.0, |t: Instant| t.elapsed().as_secs_f64());
    println!("{}", json!({"side": "receiver", "bytes": n, "secs": secs, "blake3": h.finalize().to_hex().to_string()}));
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

/// The parent process: starts the children, forwards packets when there is a path, and hosts
/// the signaling server on a tokio runtime of its own (for both runtime crates).
pub fn run_parent(a: Args) -> anyhow::Result<()> {
    // A failed transfer is a result, not an error: no backtrace, just the exit status (the path
    // is already torn down when `parent` returns).
    if !parent::parent(a)? {
        std::process::exit(1);
    }
    Ok(())
}
