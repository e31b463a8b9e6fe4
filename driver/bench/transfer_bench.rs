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

/// The signaling server, on its own thread (inside namespace a when there is a path), with a
/// room and a registration for our two children.
struct SigServer {
    ws: String,
    reg: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SigServer {
    fn start(dir: PathBuf, ip: IpAddr, netns: Option<i32>) -> anyhow::Result<SigServer> {
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<(String, String)>>();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new().name("signaling".into()).spawn(move || {
            // Sockets belong to the namespace of the thread that creates them; everything this
            // runtime creates is created on this thread.
            let r = (|| -> anyhow::Result<()> {
                if let Some(fd) = netns {
                    netpath::enter_netns(fd).context("entering namespace a")?;
                }
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    let mut cfg = sleap_rtc_server::Config::local(dir);
                    cfg.listen = vec![SocketAddr::new(ip, 0)];
                    cfg.auth_rate_per_min = 1e6;
                    let server = sleap_rtc_server::Server::start(cfg).await?;
                    let addr = *server.local_addrs().first().context("server has no address")?;
                    let base = format!("http://{addr}");
                    let http = reqwest::Client::builder().no_proxy().build()?;
                    let v: Value = http.post(format!("{base}/anonymous-signin")).send().await?.json().await?;
                    let jwt = v["jwt"].as_str().context("anonymous-signin: no jwt")?.to_owned();
                    let v: Value = http
                        .post(format!("{base}/api/auth/rooms"))
                        .bearer_auth(&jwt)
                        .json(&json!({}))
                        .send()
                        .await?
                        .json()
                        .await?;
                    let room = v["room_id"].as_str().context("room create: no room_id")?.to_owned();
                    let reg = json!({"role": "peer", "jwt": jwt, "room_id": room}).to_string();
                    let _ = tx.send(Ok((format!("ws://{addr}/ws"), reg)));
                    while !stop2.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    server.shutdown().await;
                    anyhow::Ok(())
                })
            })();
            if let Err(e) = r {
                let _ = tx.send(Err(e));
            }
        })?;
        let (ws, reg) = rx.recv_timeout(Duration::from_secs(30)).context("signaling server did not start")??;
        Ok(SigServer { ws, reg, stop, thread: Some(thread) })
    }
}

impl Drop for SigServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where the transfers run: the path (if any), the two addresses, the payload.
struct Ctx {
    path: Option<NetPath>,
    addr: [IpAddr; 2],
    work: PathBuf,
    src: PathBuf,
    size: u64,
    src_hash: String,
    limit: Duration,
}

impl Ctx {
    fn netns(&self, side: usize) -> Option<i32> {
        self.path.as_ref().map(|p| p.ns_fd(side))
    }

    fn exe(&self, args: &[String]) -> anyhow::Result<Command> {
        let mut c = Command::new(std::env::current_exe()?);
        c.args(args);
        Ok(c)
    }
}

/// One transfer's outcome.
struct Row {
    name: &'static str,
    verified: bool,
    note: String,
    bytes: u64,
    secs: f64,
    sender: Exit,
    receiver: Exit,
    parent_cpu: f64,
    links: Option<[LinkStats; 2]>,
    device_drops: [u64; 2],
}

fn self_cpu() -> f64 {
    // SAFETY: getrusage into a local.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// What a receiver reported: its final JSON line, or the last progress line before the deadline.
struct Received {
    done: Option<Value>,
    progress: (u64, f64),
    error: Option<String>,
}

fn await_receiver(r: &mut Proc, deadline: Instant) -> Received {
    let mut out = Received { done: None, progress: (0, 0.0), error: None };
    loop {
        match r.json(deadline) {
            Ok(v) if v.get("progress").is_some() => {
                out.progress = (v["progress"].as_u64().unwrap_or(0), v["secs"].as_f64().unwrap_or(0.0));
            }
            Ok(v) if v.get("side").is_some() => {
                out.done = Some(v);
                return out;
            }
            Ok(_) => {}
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
        }
    }
}

fn run_ours(ctx: &Ctx, a: &Args, n: usize) -> anyhow::Result<Row> {
    let t_start = Instant::now();
    let deadline = t_start + ctx.limit;
    let server = SigServer::start(ctx.work.join(format!("server-{n}")), ctx.addr[0], ctx.netns(0))?;
    let mut common = vec!["--size".to_owned(), a.size.clone(), "--chunk".to_owned(), a.chunk.to_string()];
    if let Some(h) = a.high_water {
        common.extend(["--high-water".to_owned(), h.to_string()]);
    }
    if let Some(m) = a.mtu {
        common.extend(["--mtu".to_owned(), m.to_string()]);
    }
    let dst = ctx.work.join(format!("received-ours-{n}"));
    let mut rargs = common.clone();
    rargs.extend(["--role", "receiver", "--ws", &server.ws, "--register", &server.reg].map(str::to_owned));
    rargs.extend(["--path".to_owned(), dst.display().to_string(), "--bind".to_owned(), ctx.addr[1].to_string()]);
    let mut rc = netpath::spawn("our receiver", ctx.exe(&rargs)?, ctx.netns(1))?;
    let target = rc.json(deadline)?["peer_id"].as_str().context("receiver sent no peer_id")?.to_owned();
    let mut sargs = common;
    sargs.extend(
        ["--role", "sender", "--ws", &server.ws, "--register", &server.reg, "--target", &target].map(str::to_owned),
    );
    sargs.extend(["--path".to_owned(), ctx.src.display().to_string(), "--bind".to_owned(), ctx.addr[0].to_string()]);
    let mut sc = netpath::spawn("our sender", ctx.exe(&sargs)?, ctx.netns(0))?;
    sc.json(deadline)?;
    let s = sc.json(deadline);
    let r = await_receiver(&mut rc, deadline);
    let grace = Instant::now() + Duration::from_secs(10);
    let (se, re) = (sc.finish(grace), rc.finish(grace));
    drop(server);
    let mut note = String::new();
    if let Ok(s) = &s {
        print_side(s);
    }
    if let Some(r) = &r.done {
        print_side(r);
    }
    let verified = match (&s, &r.done) {
        (Ok(s), Some(rv)) => {
            let same =
                sleap_rtc_driver::files::hash_file(&dst.join(file_name(&ctx.src)?)).ok() == Some(ctx.src_hash.clone());
            if !same {
                note = "received file differs".into();
            }
            same && s["ok"] == true && rv["ok"] == true
        }
        (Err(e), _) => {
            note = e.to_string();
            false
        }
        (_, None) => {
            note = r.error.clone().unwrap_or_default();
            false
        }
    };
    let (bytes, secs) =
        r.done.as_ref().map_or(r.progress, |v| (v["bytes"].as_u64().unwrap_or(0), v["secs"].as_f64().unwrap_or(0.0)));
    if r.done.is_none() {
        note +=
            &format!("; {:.1} MiB of {:.1} MiB acknowledged", bytes as f64 / 1048576.0, ctx.size as f64 / 1048576.0);
    }
    let _ = std::fs::remove_dir_all(&dst);
    Ok(Row {
        name: "ours",
        verified,
        note,
        bytes,
        secs,
        sender: se,
        receiver: re,
        parent_cpu: 0.0,
        links: None,
        device_drops: [0; 2],
    })
}

fn print_side(v: &Value) {
    let mb = v["bytes"].as_f64().unwrap_or(0.0) / v["secs"].as_f64().unwrap_or(1.0).max(1e-9) / 1e6;
    println!(
        "  ours {:<8} ok={} {:>8.1} MB/s  {:>7.2} s  setup {:>6.1} ms  cpu {:>6.2} s  peak RSS {:>6.1} MiB{}",
        v["side"].as_str().unwrap_or("?"),
        v["ok"],
        mb,
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

fn file_name(p: &Path) -> anyhow::Result<&std::ffi::OsStr> {
    p.file_name().context("payload has no file name")
}

fn python() -> PathBuf {
    std::env::var_os("SLEAP_RTC_TEST_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache/sleap-rtc/venv/bin/python")
    })
}

fn run_aiortc(ctx: &Ctx, n: usize) -> anyhow::Result<Row> {
    let py = python();
    let probe = Command::new(&py).args(["-c", "import aiortc"]).output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        bail!(
            "aiortc unavailable: {} cannot import it (set SLEAP_RTC_TEST_PYTHON, or run scripts/test.sh once to create the venv)",
            py.display()
        );
    }
    let script = ctx.work.join("aiortc_bench.py");
    std::fs::write(&script, include_str!("aiortc_bench.py"))?;
    let deadline = Instant::now() + ctx.limit;
    let dst = ctx.work.join(format!("received-aiortc-{n}"));
    let cmd = |role: &str, path: &Path| {
        let mut c = Command::new(&py);
        c.arg(&script).arg(role).arg(path);
        c
    };
    let mut sc = netpath::spawn("aiortc sender", cmd("sender", &ctx.src), ctx.netns(0))?;
    let mut rc = netpath::spawn("aiortc receiver", cmd("receiver", &dst), ctx.netns(1))?;
    let offer = sc.json(deadline)?;
    rc.send_line(&offer.to_string())?;
    let answer = rc.json(deadline)?;
    sc.send_line(&answer.to_string())?;
    let r = await_receiver(&mut rc, deadline);
    let s = if r.done.is_some() { sc.json(Instant::now() + Duration::from_secs(10)).ok() } else { None };
    let grace = Instant::now() + Duration::from_secs(10);
    let (se, re) = (sc.finish(grace), rc.finish(grace));
    let row = finish_row("aiortc", ctx, &r, s.is_some(), &dst, None, se, re);
    let _ = std::fs::remove_file(&dst);
    Ok(row)
}

fn run_tcp(ctx: &Ctx, n: usize) -> anyhow::Result<Row> {
    let deadline = Instant::now() + ctx.limit;
    let dst = ctx.work.join(format!("received-tcp-{n}"));
    let rargs = [
        "--role".into(),
        "tcp-receiver".into(),
        "--bind".into(),
        ctx.addr[1].to_string(),
        "--path".into(),
        dst.display().to_string(),
    ];
    let mut rc = netpath::spawn("tcp receiver", ctx.exe(&rargs)?, ctx.netns(1))?;
    let port = rc.json(deadline)?["port"].as_u64().context("tcp receiver sent no port")?;
    let target = SocketAddr::new(ctx.addr[1], port as u16);
    let sargs = [
        "--role".into(),
        "tcp-sender".into(),
        "--target".into(),
        target.to_string(),
        "--path".into(),
        ctx.src.display().to_string(),
    ];
    let mut sc = netpath::spawn("tcp sender", ctx.exe(&sargs)?, ctx.netns(0))?;
    let r = await_receiver(&mut rc, deadline);
    let s = if r.done.is_some() { sc.json(Instant::now() + Duration::from_secs(10)).ok() } else { None };
    let grace = Instant::now() + Duration::from_secs(10);
    let (se, re) = (sc.finish(grace), rc.finish(grace));
    let hash = r.done.as_ref().and_then(|v| v["blake3"].as_str().map(str::to_owned));
    let row = finish_row("tcp", ctx, &r, s.is_some(), &dst, hash, se, re);
    let _ = std::fs::remove_file(&dst);
    Ok(row)
}

/// A row for aiortc or TCP: verified when the receiver finished with every byte and the hash
/// (the receiver's own, or the parent's of the written file) matches the payload's.
#[allow(clippy::too_many_arguments)]
fn finish_row(
    name: &'static str,
    ctx: &Ctx,
    r: &Received,
    sender_done: bool,
    dst: &Path,
    receiver_hash: Option<String>,
    sender: Exit,
    receiver: Exit,
) -> Row {
    let (bytes, secs, verified, note) = match &r.done {
        Some(v) => {
            let bytes = v["bytes"].as_u64().unwrap_or(0);
            let hash = receiver_hash.or_else(|| sleap_rtc_driver::files::hash_file(dst).ok());
            let ok = bytes == ctx.size && hash.as_deref() == Some(ctx.src_hash.as_str());
            let note = match (ok, sender_done) {
                (false, _) => format!("hash or size mismatch ({bytes} bytes)"),
                (true, false) => "sender did not report".to_owned(),
                (true, true) => String::new(),
            };
            (bytes, v["secs"].as_f64().unwrap_or(0.0), ok, note)
        }
        None => {
            let (b, s) = r.progress;
            let why = r.error.clone().unwrap_or_default();
            (
                b,
                s,
                false,
                format!("{why}; {:.1} MiB of {:.1} MiB arrived", b as f64 / 1048576.0, ctx.size as f64 / 1048576.0),
            )
        }
    };
    Row { name, verified, note, bytes, secs, sender, receiver, parent_cpu: 0.0, links: None, device_drops: [0; 2] }
}

fn write_payload(src: &Path, size: u64) -> anyhow::Result<()> {
    // Pseudo-random content (incompressible, not all zeros) written in 8 MiB blocks.
    let mut f = std::io::BufWriter::new(std::fs::File::create(src)?);
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
    Ok(())
}

/// Ok(false): everything ran but some transfer did not verify (already reported).
fn parent(a: Args) -> anyhow::Result<bool> {
    let _teardown = netpath::install_signal_teardown()?;
    for o in &a.only {
        if !["ours", "aiortc", "tcp"].contains(&o.as_str()) {
            bail!("--only: unknown transfer {o:?} (ours, aiortc, tcp)");
        }
    }
    if !(a.time_limit > 0.0 && a.time_limit.is_finite()) {
        bail!("--time-limit must be a positive number of seconds");
    }
    let size = parse_size(&a.size)?;
    let params = link_params(&a)?;
    let path = match params {
        Some(p) => match NetPath::create(p, u64::from(std::process::id())) {
            Ok(n) => Some(n),
            Err(e) => {
                netpath::cleanup_all();
                println!("network namespaces unavailable ({e:#}): falling back to loopback, path flags ignored");
                None
            }
        },
        None => None,
    };
    let addr = match &path {
        Some(p) => [IpAddr::V4(p.addr[0]), IpAddr::V4(p.addr[1])],
        None => [IpAddr::V4(Ipv4Addr::LOCALHOST); 2],
    };
    let work = tempfile::tempdir()?;
    let src = work.path().join("payload.bin");
    write_payload(&src, size)?;
    let src_hash = sleap_rtc_driver::files::hash_file(&src)?;
    let ctx = Ctx {
        path,
        addr,
        work: work.path().to_owned(),
        src,
        size,
        src_hash,
        limit: Duration::from_secs_f64(a.time_limit),
    };

    match (&ctx.path, params) {
        (Some(p), Some(lp)) => println!(
            "path: {} — namespaces {} ({}) and {} ({}), TUN MTU 1500",
            describe(&lp),
            p.ns[0],
            p.addr[0],
            p.ns[1],
            p.addr[1]
        ),
        _ => println!("path: loopback (127.0.0.1)"),
    }
    println!(
        "size {size} bytes; ours: chunk {}, high water {}, mtu {}",
        a.chunk,
        options(&a).session.high_water,
        options(&a).session.peer.mtu
    );
    let mut rows = Vec::new();
    for (n, which) in a.only.iter().enumerate() {
        let drops0 = ctx.path.as_ref().map(NetPath::device_drops);
        if let Some(p) = &ctx.path {
            p.reset();
        }
        let cpu0 = self_cpu();
        let row = match which.as_str() {
            "ours" => run_ours(&ctx, &a, n),
            "aiortc" => run_aiortc(&ctx, n),
            _ => run_tcp(&ctx, n),
        };
        let mut row = row.unwrap_or_else(|e| Row {
            name: match which.as_str() {
                "ours" => "ours",
                "aiortc" => "aiortc",
                _ => "tcp",
            },
            verified: false,
            note: format!("{e:#}"),
            bytes: 0,
            secs: 0.0,
            sender: Exit::default(),
            receiver: Exit::default(),
            parent_cpu: 0.0,
            links: None,
            device_drops: [0; 2],
        });
        row.parent_cpu = self_cpu() - cpu0;
        row.links = ctx.path.as_ref().map(NetPath::stats);
        if let (Some(p), Some(d0)) = (&ctx.path, drops0) {
            let d1 = p.device_drops();
            row.device_drops = [d1[0].saturating_sub(d0[0]), d1[1].saturating_sub(d0[1])];
        }
        rows.push(row);
    }
    print_table(&ctx, &rows);
    drop(ctx);
    let failed: Vec<String> = rows.iter().filter(|r| !r.verified).map(|r| r.name.to_owned()).collect();
    if !failed.is_empty() {
        println!("not verified: {}", failed.join(", "));
    }
    Ok(failed.is_empty())
}

fn print_table(ctx: &Ctx, rows: &[Row]) {
    let gib = ctx.size as f64 / f64::from(1u32 << 30);
    let per_gib = |e: &Exit| if gib > 0.0 { e.cpu_secs / gib } else { 0.0 };
    let rss = |e: &Exit| e.peak_rss_kib as f64 / 1024.0;
    println!();
    println!(
        "{:<7} {:>8} {:>8} {:>8}  {:>10} {:>10}  {:>9} {:>9}  {:>10}  note",
        "", "verified", "MB/s", "secs", "snd cpu", "rcv cpu", "snd RSS", "rcv RSS", "parent cpu"
    );
    println!(
        "{:<7} {:>8} {:>8} {:>8}  {:>10} {:>10}  {:>9} {:>9}  {:>10}",
        "", "", "", "", "s/GiB", "s/GiB", "MiB", "MiB", "s"
    );
    for r in rows {
        let mbs = if r.secs > 0.0 { r.bytes as f64 / r.secs / 1e6 } else { 0.0 };
        println!(
            "{:<7} {:>8} {:>8.1} {:>8.2}  {:>10.2} {:>10.2}  {:>9.1} {:>9.1}  {:>10.2}  {}",
            r.name,
            if r.verified { "yes" } else { "NO" },
            mbs,
            r.secs,
            per_gib(&r.sender),
            per_gib(&r.receiver),
            rss(&r.sender),
            rss(&r.receiver),
            r.parent_cpu,
            r.note
        );
    }
    if ctx.path.is_some() {
        println!();
        println!(
            "link, per transfer (a→b carries the data, b→a the acks; device drops: packets the TUN device dropped \
             because the forwarder fell behind, outside the model):"
        );
        for r in rows {
            if let Some(l) = &r.links {
                for ((dir, s), dev) in ["a→b", "b→a"].iter().zip(l).zip(r.device_drops) {
                    println!(
                        "  {:<7} {dir}: sent {:>8}  delivered {:>8}  dropped random {:>6}  dropped queue {:>6}  dup {:>4}  reordered {:>4}  peak queue {:>7.0} KiB  device drops {:>4}",
                        r.name,
                        s.sent,
                        s.delivered,
                        s.dropped_random,
                        s.dropped_queue,
                        s.duplicated,
                        s.reordered,
                        s.peak_queue as f64 / 1024.0,
                        dev
                    );
                }
            }
        }
    }
    println!();
    println!(
        "MB/s: 10^6 bytes/s from the receiver's first byte to its last; cpu: user+sys of the whole process \
         (wait4) per GiB of payload; RSS: peak; parent cpu: this process (forwarder, signaling server) during the transfer"
    );
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
    if !parent(a)? {
        std::process::exit(1);
    }
    Ok(())
}
