//! Load tool for the signaling server.
//!
//! Holds `--peers` registered WebSocket peers in rooms of `--room-size`, routes `peer_message`s
//! between random pairs of the same room at `--rate` messages/s for `--duration` seconds, and
//! prints peers held, messages/s, routing latency percentiles (send → receive, both ends in this
//! process), and the server's CPU time and RSS (total, and per idle peer).
//!
//! By default it starts the server as a child process (this same binary, re-executed) so the
//! server's RSS and CPU are its own; `--server http://HOST:PORT` targets a running one instead.
//!
//! `--one-room` puts every peer into one room (large rooms, issue 19); `--role-mix
//! worker=95,client=4,dashboard=1` gives the peers roles in those proportions (default: every
//! peer `peer`), registered without `subscribe` so the server's defaults by role apply, unless
//! `--subscribe` names the roles every peer subscribes to. It reports registrations/s and the
//! presence frames (`peer_joined`, `peer_left`, `metadata_updated`) the peers received.
//!
//! `--instances N` starts N servers sharing rooms through Redis (a `redis-server` it starts, or
//! `--redis URL`) and one data directory (SQLite file and signing key), and spreads the peers of
//! every room over them round-robin; latencies are then reported separately for messages whose
//! ends are on the same instance and on different ones. Repeating `--server` does the same
//! against running instances.
//!
//! ```text
//! cargo run --release -p sleap-rtc-server --example signal-load -- --peers 10000 --rate 10000
//! cargo run --release -p sleap-rtc-server --example signal-load -- --instances 2 --peers 2000 --rate 5000
//! cargo run --release -p sleap-rtc-server --example signal-load -- --one-room --peers 2000 \
//!     --role-mix worker=95,client=4,dashboard=1 --rate 2000
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(about = "Load-test the sleap-rtc signaling server")]
struct Args {
    /// Peers to hold connected and registered.
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// peer_messages per second to route, in total.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Peers per room.
    #[arg(long, default_value_t = 100)]
    room_size: usize,
    /// Every peer in one room (the same as --room-size equal to --peers).
    #[arg(long)]
    one_room: bool,
    /// Roles of the peers and their weights, e.g. `worker=95,client=4,dashboard=1`: peer i takes
    /// the role whose share of the weights holds i modulo their sum.
    #[arg(long, default_value = "peer=1")]
    role_mix: String,
    /// Send `subscribe` with these roles (comma-separated; `*` every role, empty for none) on
    /// every `register`; default: no `subscribe`, so the server's defaults by role apply.
    #[arg(long)]
    subscribe: Option<String>,
    /// Base URL of a running server (e.g. http://127.0.0.1:8080); repeat for instances of one
    /// cluster. Default: start servers.
    #[arg(long)]
    server: Vec<String>,
    /// Servers to start (with --instances > 1 they share rooms through Redis).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Redis for the started instances; default: start a redis-server on a free port.
    #[arg(long)]
    redis: Option<String>,
    /// Server process id for RSS/CPU readings when using --server.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Registrations in flight at once while connecting.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Internal: run as the server child process listening here.
    #[arg(long, hide = true)]
    internal_serve: Option<String>,
    /// Internal: the child's Redis.
    #[arg(long, hide = true)]
    internal_redis: Option<String>,
}

/// `worker=95,client=5` → the role of every position in a cycle of 100.
fn role_cycle(mix: &str) -> anyhow::Result<Vec<String>> {
    let mut cycle = Vec::new();
    for part in mix.split(',').filter(|p| !p.trim().is_empty()) {
        let (role, weight) = part.split_once('=').unwrap_or((part, "1"));
        let weight: usize = weight.trim().parse().map_err(|e| anyhow::anyhow!("--role-mix {part}: {e}"))?;
        cycle.extend(std::iter::repeat_n(role.trim().to_owned(), weight));
    }
    anyhow::ensure!(!cycle.is_empty(), "--role-mix names no role");
    Ok(cycle)
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.one_room {
        args.room_size = args.peers.max(1);
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if let Some(dir) = &args.internal_serve {
        return rt.block_on(serve_child(dir, args.internal_redis.clone()));
    }
    rt.block_on(run(args))
}

/// The child process: a plain server on a free loopback port, printing its address.
async fn serve_child(dir: &str, redis: Option<String>) -> anyhow::Result<()> {
    let mut cfg = sleap_rtc_server::Config::local(dir);
    cfg.max_peers_per_room = 100_000;
    cfg.auth_rate_per_min = 1e9;
    cfg.redis = redis;
    let server = sleap_rtc_server::Server::start(cfg).await?;
    println!("{}", server.local_addrs()[0]);
    // Exit when the parent closes our stdin.
    let _ = tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    })
    .await;
    server.shutdown().await;
    Ok(())
}

struct Proc {
    pid: u32,
}

impl Proc {
    fn rss_kib(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
    }
    fn cpu_secs(&self) -> Option<f64> {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        let rest = s.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    }
}

struct Shared {
    start: Instant,
    presence: AtomicU64,
    latencies: std::sync::Mutex<Vec<u32>>,
    cross_latencies: std::sync::Mutex<Vec<u32>>,
    received: AtomicU64,
    errors: AtomicU64,
    measuring: std::sync::atomic::AtomicBool,
}

struct Procs(Vec<Proc>);

impl Procs {
    fn rss_kib(&self) -> Option<u64> {
        self.0.iter().map(Proc::rss_kib).sum()
    }
    fn cpu_secs(&self) -> Option<f64> {
        self.0.iter().map(Proc::cpu_secs).sum()
    }
}

/// A redis-server on a free loopback port for the run, killed on drop.
async fn start_redis() -> anyhow::Result<(tokio::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = tokio::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start redis-server (give --redis URL or install it): {e}"))?;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok((child, format!("redis://127.0.0.1:{port}")));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("redis-server did not start")
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut children = Vec::new();
    let mut _redis = None;
    let _dir = tempfile::tempdir()?;
    let (bases, procs): (Vec<String>, Option<Procs>) = if !args.server.is_empty() {
        let bases = args.server.iter().map(|s| s.trim_end_matches('/').to_owned()).collect();
        (bases, args.server_pid.map(|pid| Procs(vec![Proc { pid }])))
    } else {
        let n = args.instances.max(1);
        let redis = match (&args.redis, n) {
            (_, 1) => None,
            (Some(r), _) => Some(r.clone()),
            (None, _) => {
                let (child, url) = start_redis().await?;
                _redis = Some(child);
                Some(url)
            }
        };
        let mut bases = Vec::new();
        let mut procs = Vec::new();
        // One after the other: the first creates the signing key the others read.
        for _ in 0..n {
            let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
            cmd.arg("--internal-serve").arg(_dir.path());
            if let Some(r) = &redis {
                cmd.arg("--internal-redis").arg(r);
            }
            let mut c = cmd
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let stdout = c.stdout.take().ok_or_else(|| anyhow::anyhow!("no child stdout"))?;
            let mut lines = tokio::io::BufReader::new(stdout);
            let mut line = String::new();
            tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line).await?;
            if line.trim().is_empty() {
                anyhow::bail!("a server instance did not start");
            }
            procs.push(Proc { pid: c.id().unwrap_or(0) });
            bases.push(format!("http://{}", line.trim()));
            children.push(c);
        }
        (bases, Some(Procs(procs)))
    };
    let base = bases[0].clone();
    let proc_ = procs;
    let redis_proc = _redis.as_ref().and_then(|c| c.id()).map(|pid| Proc { pid });
    let ws_urls: Vec<String> = bases.iter().map(|b| format!("{}/ws", b.replacen("http", "ws", 1))).collect();
    let instances = ws_urls.len();
    let http = reqwest::Client::new();
    let signin: Value = http.post(format!("{base}/anonymous-signin")).send().await?.json().await?;
    let jwt = signin["jwt"].as_str().ok_or_else(|| anyhow::anyhow!("sign-in failed: {signin}"))?.to_owned();
    let rooms_needed = args.peers.div_ceil(args.room_size.max(1));
    let mut rooms = Vec::new();
    for _ in 0..rooms_needed {
        let r: Value = http
            .post(format!("{base}/api/auth/rooms"))
            .bearer_auth(&jwt)
            .json(&json!({"name": "load"}))
            .send()
            .await?
            .json()
            .await?;
        rooms.push(r["room_id"].as_str().ok_or_else(|| anyhow::anyhow!("room creation failed: {r}"))?.to_owned());
    }
    let rss_empty = proc_.as_ref().and_then(Procs::rss_kib);
    let roles = role_cycle(&args.role_mix)?;
    let subscribe: Option<Vec<String>> =
        args.subscribe.as_deref().map(|s| s.split(',').filter(|r| !r.is_empty()).map(str::to_owned).collect());

    let shared = Arc::new(Shared {
        start: Instant::now(),
        latencies: std::sync::Mutex::new(Vec::with_capacity((args.rate * args.duration as f64) as usize + 1024)),
        cross_latencies: std::sync::Mutex::new(Vec::new()),
        received: AtomicU64::new(0),
        presence: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        measuring: false.into(),
    });

    // Connect and register every peer, `connect_concurrency` at a time.
    let cpu_connect = proc_.as_ref().and_then(Procs::cpu_secs);
    let t_connect = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency.max(1)));
    let mut joins = Vec::with_capacity(args.peers);
    for i in 0..args.peers {
        let permit = sem.clone().acquire_owned().await?;
        // Round-robin over the instances: neighbours in a room are on different instances.
        let url = ws_urls[i % instances].clone();
        let (jwt, room, shared) = (jwt.clone(), rooms[i / args.room_size].clone(), shared.clone());
        let mut reg = json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": format!("p{i}"),
                             "role": roles[i % roles.len()]});
        if let Some(s) = &subscribe {
            reg["subscribe"] = json!(s);
        }
        joins.push(tokio::spawn(async move {
            let r = connect_peer(&url, reg, i, shared).await;
            drop(permit);
            r
        }));
    }
    let mut senders: Vec<mpsc::UnboundedSender<String>> = Vec::with_capacity(args.peers);
    for j in joins {
        senders.push(j.await??);
    }
    let connect_secs = t_connect.elapsed().as_secs_f64();
    // The server's own CPU per registration: on a machine shared with the load generator (and
    // anything else), registrations/s measures the machine; this measures the server.
    let cpu_registered = proc_.as_ref().and_then(Procs::cpu_secs);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = proc_.as_ref().and_then(Procs::rss_kib);
    println!(
        "peers held:            {} in {} rooms on {instances} instance(s) (connected+registered in {:.2} s, {:.0} registrations/s)",
        senders.len(),
        rooms.len(),
        connect_secs,
        senders.len() as f64 / connect_secs
    );
    if let (Some(a), Some(b)) = (cpu_connect, cpu_registered) {
        println!(
            "server CPU:            {:.2} s while registering ({:.0} µs per registration: {:.0} registrations/s per core)",
            b - a,
            (b - a) * 1e6 / senders.len().max(1) as f64,
            senders.len() as f64 / (b - a).max(1e-9)
        );
    }
    println!(
        "presence frames:       {} received by the peers while they registered (roles {}, subscribe {})",
        shared.presence.load(Ordering::Acquire),
        args.role_mix,
        args.subscribe.as_deref().map_or("by role".to_owned(), |s| format!("[{s}]"))
    );
    if let (Some(e), Some(i)) = (rss_empty, rss_idle) {
        println!(
            "server RSS:            {:.1} MiB empty, {:.1} MiB with {} idle peers ({:.2} KiB per idle peer)",
            e as f64 / 1024.0,
            i as f64 / 1024.0,
            senders.len(),
            (i.saturating_sub(e)) as f64 / senders.len().max(1) as f64
        );
    }

    // Routed load.
    let cpu0 = proc_.as_ref().and_then(Procs::cpu_secs);
    let redis_cpu0 = redis_proc.as_ref().and_then(Proc::cpu_secs);
    shared.measuring.store(true, Ordering::Release);
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let total = (args.rate * args.duration as f64) as u64;
    let room_size = args.room_size.max(2);
    while sent < total {
        tick.tick().await;
        let due = ((t0.elapsed().as_secs_f64() * args.rate) as u64).min(total);
        while sent < due {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let from = (rng % senders.len() as u64) as usize;
            let room_base = from / room_size * room_size;
            let in_room = (senders.len() - room_base).min(room_size);
            let mut to = room_base + ((rng >> 32) % in_room as u64) as usize;
            if to == from {
                to = room_base + (to - room_base + 1) % in_room;
            }
            let t = shared.start.elapsed().as_micros() as u64;
            let cross = u8::from(from % instances != to % instances);
            let msg = format!(r#"{{"type":"peer_message","to_peer_id":"p{to}","payload":{{"c":{cross},"t":{t}}}}}"#);
            let _ = senders[from].send(msg);
            sent += 1;
        }
    }
    let send_secs = t0.elapsed().as_secs_f64();
    // Let the tail arrive.
    let deadline = Instant::now() + Duration::from_secs(5);
    while shared.received.load(Ordering::Acquire) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = proc_.as_ref().and_then(Procs::cpu_secs);
    let redis_cpu1 = redis_proc.as_ref().and_then(Proc::cpu_secs);
    let rss_load = proc_.as_ref().and_then(Procs::rss_kib);
    let received = shared.received.load(Ordering::Acquire);
    let mut lat = shared.latencies.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort_unstable();
    let mut cross = shared.cross_latencies.lock().map(|l| l.clone()).unwrap_or_default();
    cross.sort_unstable();
    let pick =
        |v: &[u32], p: f64| v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or(0);
    let pct = |p: f64| pick(&lat, p);
    if sent == 0 {
        // --duration 0 or --rate 0: registrations and idle memory only.
        drop(senders);
        for c in &mut children {
            drop(c.stdin.take());
        }
        for c in &mut children {
            let _ = tokio::time::timeout(Duration::from_secs(15), c.wait()).await;
        }
        return Ok(());
    }
    println!(
        "messages:              {sent} sent in {send_secs:.2} s ({:.0}/s), {received} received ({:.0}/s), {} errors",
        sent as f64 / send_secs,
        received as f64 / wall,
        shared.errors.load(Ordering::Acquire)
    );
    let label = if instances > 1 { "same-instance latency:" } else { "routing latency:      " };
    println!(
        "{label} p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} messages)",
        pct(0.5) as f64 / 1000.0,
        pct(0.9) as f64 / 1000.0,
        pct(0.99) as f64 / 1000.0,
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        lat.len()
    );
    if instances > 1 {
        println!(
            "cross-instance latency: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} messages)",
            pick(&cross, 0.5) as f64 / 1000.0,
            pick(&cross, 0.9) as f64 / 1000.0,
            pick(&cross, 0.99) as f64 / 1000.0,
            cross.last().copied().unwrap_or(0) as f64 / 1000.0,
            cross.len()
        );
    }
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        println!(
            "server CPU:            {:.2} s over {wall:.2} s ({:.0}% of one core, all instances)",
            b - a,
            (b - a) / wall * 100.0
        );
    }
    if let (Some(a), Some(b)) = (redis_cpu0, redis_cpu1) {
        println!("redis-server CPU:      {:.2} s over {wall:.2} s ({:.0}% of one core)", b - a, (b - a) / wall * 100.0);
    }
    if let Some(r) = rss_load {
        println!("server RSS under load: {:.1} MiB", r as f64 / 1024.0);
    }
    drop(senders);
    for c in &mut children {
        drop(c.stdin.take());
    }
    for c in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(15), c.wait()).await;
    }
    Ok(())
}

fn is_presence(s: &str) -> bool {
    [r#"{"type":"peer_joined""#, r#"{"type":"peer_left""#, r#"{"type":"metadata_updated""#]
        .iter()
        .any(|p| s.starts_with(p))
}

async fn connect_peer(
    url: &str,
    reg: Value,
    i: usize,
    shared: Arc<Shared>,
) -> anyhow::Result<mpsc::UnboundedSender<String>> {
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    let (mut sink, mut stream) = ws.split();
    sink.send(Message::text(reg.to_string())).await?;
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str())?;
                if v["type"] == "registered_auth" {
                    break;
                }
                if v["type"] == "error" {
                    anyhow::bail!("peer {i} refused: {v}");
                }
            }
            Some(Ok(_)) => {}
            other => anyhow::bail!("peer {i}: connection ended during register: {other:?}"),
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(Message::text(m)).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            let Message::Text(t) = m else { continue };
            let s = t.as_str();
            if s.starts_with(r#"{"type":"peer_message""#) {
                // Cheap scan for "t": the payload is ours.
                if let Some(pos) = s.find(r#""t":"#) {
                    let digits: String = s[pos + 4..].chars().take_while(|c| c.is_ascii_digit()).collect();
                    if let Ok(t) = digits.parse::<u64>() {
                        let now = shared.start.elapsed().as_micros() as u64;
                        let lat = now.saturating_sub(t).min(u32::MAX as u64) as u32;
                        let list = if s.contains(r#""c":1"#) { &shared.cross_latencies } else { &shared.latencies };
                        if shared.measuring.load(Ordering::Relaxed)
                            && let Ok(mut l) = list.lock()
                        {
                            l.push(lat);
                        }
                        shared.received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            } else if is_presence(s) {
                shared.presence.fetch_add(1, Ordering::Relaxed);
            } else if s.contains(r#""type":"error""#) {
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok(tx)
}
