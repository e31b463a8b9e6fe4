//! The benchmark's parent process: the signaling server it hosts, the three transfers it starts
//! and times (ours, aiortc, TCP), and the table it prints.

use super::*;

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
pub(super) fn parent(a: Args) -> anyhow::Result<bool> {
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
