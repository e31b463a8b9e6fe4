//! The emulated path: two network namespaces, each holding one end of a point-to-point TUN
//! device whose other end is a file descriptor in this process. Every packet between the
//! namespaces passes through [`forward`], which asks a `sleap_rtc_core::netsim::Link` (the same
//! model the virtual-time simulation uses) when, and whether, to deliver it. This kernel has no
//! netem qdisc, so the emulation has to live in userspace.
//!
//! Also here: starting children inside a namespace with their CPU time and peak RSS taken from
//! `wait4`, and the teardown that must happen on any exit (children killed, namespaces deleted —
//! which also removes the devices — even on Ctrl-C or SIGTERM).

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sleap_rtc_core::netsim::{Link, LinkParams, LinkStats};

/// What must be undone if this process stops for any reason.
struct Live {
    pids: Vec<i32>,
    netns: Vec<String>,
}

static LIVE: Mutex<Live> = Mutex::new(Live { pids: Vec::new(), netns: Vec::new() });

fn live() -> std::sync::MutexGuard<'static, Live> {
    // A panic while holding the lock must not stop the teardown.
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kills every child still running and deletes every namespace this run created.
pub fn cleanup_all() {
    let mut l = live();
    for pid in l.pids.drain(..) {
        // SAFETY: plain syscall; the pid is still ours because reaping removes it under this lock.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for ns in l.netns.drain(..) {
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
    }
}

/// Runs [`cleanup_all`] when dropped (normal return, error or panic).
pub struct CleanupGuard;

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        cleanup_all();
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (so in every thread started after it) and
/// handles them on a dedicated thread that tears down and exits. Must run before any other
/// thread starts. Children get an empty mask back from std's spawn.
pub fn install_signal_teardown() -> anyhow::Result<CleanupGuard> {
    // SAFETY: sigset manipulation on a local, then pthread_sigmask on the calling thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait on a set blocked in every thread.
        let rc = unsafe { libc::sigwait(&set, &mut sig) };
        if rc == 0 {
            eprintln!("signal {sig}: stopping children and removing the emulated path");
            cleanup_all();
            std::process::exit(128 + sig);
        }
    })?;
    Ok(CleanupGuard)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running `ip`")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn open_tun(name: &str) -> anyhow::Result<OwnedFd> {
    // SAFETY: open(2) on a constant path; the fd is owned right after.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        bail!("/dev/net/tun: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req =
        IfReq { name: [0; libc::IFNAMSIZ], flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short, _pad: [0; 22] };
    for (d, s) in req.name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn open_netns(name: &str) -> anyhow::Result<OwnedFd> {
    let p = CString::new(format!("/run/netns/{name}"))?;
    // SAFETY: open(2) on a NUL-terminated path.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        bail!("/run/netns/{name}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Moves the calling thread into the namespace `fd` refers to.
pub fn enter_netns(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: setns(2) only affects the calling thread.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The two namespaces and the forwarder between them. Side 0 ("a") hosts the signaling server
/// and the senders, side 1 ("b") the receivers.
pub struct NetPath {
    pub ns: [String; 2],
    dev: [String; 2],
    pub addr: [Ipv4Addr; 2],
    ns_fds: [OwnedFd; 2],
    /// `links[0]`: a → b, `links[1]`: b → a.
    links: [Arc<Mutex<Link>>; 2],
    params: LinkParams,
    seed: u64,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl NetPath {
    pub fn create(params: LinkParams, seed: u64) -> anyhow::Result<NetPath> {
        let pid = std::process::id();
        if !std::path::Path::new("/dev/net/tun").exists() {
            bail!("no /dev/net/tun");
        }
        // The address pair only has to be unique inside this pair of namespaces; deriving it from
        // the pid just makes concurrent runs easier to tell apart in `ip` output.
        let k = (pid % 250 + 1) as u8;
        let addr = [Ipv4Addr::new(10, 201, k, 1), Ipv4Addr::new(10, 201, k, 2)];
        let ns = [format!("srtc-{pid}-a"), format!("srtc-{pid}-b")];
        let dev = [format!("srtc{pid}a"), format!("srtc{pid}b")];
        for n in &ns {
            // A namespace of this name can only be left over from a dead process with our pid.
            let _ = Command::new("ip").args(["netns", "del", n]).stderr(Stdio::null()).status();
            live().netns.push(n.clone());
            ip(&["netns", "add", n])?;
        }
        let mut tuns = Vec::new();
        for i in 0..2 {
            let (n, d) = (&ns[i], &dev[i]);
            // No IPv6: the only traffic on the device should be what the benchmark sends.
            for key in ["net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"] {
                let _ = Command::new("ip")
                    .args(["netns", "exec", n, "sysctl", "-q", "-w", &format!("{key}=1")])
                    .stderr(Stdio::null())
                    .status();
            }
            tuns.push(open_tun(d)?);
            ip(&["link", "set", "dev", d, "netns", n])?;
            let (me, peer) = (addr[i].to_string(), addr[1 - i].to_string());
            ip(&["-n", n, "addr", "add", &me, "peer", &format!("{peer}/32"), "dev", d])?;
            // A long device queue, so that when this process is descheduled packets wait for the
            // forwarder instead of being dropped outside the model (drops still counted, below).
            ip(&["-n", n, "link", "set", "dev", d, "mtu", "1500", "txqueuelen", "10000", "up"])?;
            ip(&["-n", n, "link", "set", "dev", "lo", "up"])?;
        }
        let ns_fds = [open_netns(&ns[0])?, open_netns(&ns[1])?];
        let links =
            [Arc::new(Mutex::new(Link::new(params, seed))), Arc::new(Mutex::new(Link::new(params, seed ^ 0x5eed)))];
        let stop = Arc::new(AtomicBool::new(false));
        let tuns: Vec<Arc<OwnedFd>> = tuns.into_iter().map(Arc::new).collect();
        let mut threads = Vec::new();
        for i in 0..2 {
            let (rx, tx, link, stop) = (tuns[i].clone(), tuns[1 - i].clone(), links[i].clone(), stop.clone());
            let dst = addr[1 - i];
            threads.push(
                std::thread::Builder::new()
                    .name(format!("forward-{}", ["a>b", "b>a"][i]))
                    .spawn(move || forward(&rx, &tx, dst, &link, &stop))?,
            );
        }
        Ok(NetPath { ns, dev, addr, ns_fds, links, params, seed, stop, threads })
    }

    pub fn ns_fd(&self, side: usize) -> RawFd {
        self.ns_fds[side].as_raw_fd()
    }

    /// Packets each device dropped because the forwarder did not read them in time (a → b is
    /// device a's): losses the link model never saw.
    pub fn device_drops(&self) -> [u64; 2] {
        let drops = |i: usize| -> Option<u64> {
            let out = Command::new("ip")
                .args(["-n", &self.ns[i], "-s", "-j", "link", "show", "dev", &self.dev[i]])
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v.get(0)?.get("stats64")?.get("tx")?.get("dropped")?.as_u64()
        };
        [drops(0).unwrap_or(0), drops(1).unwrap_or(0)]
    }

    /// Starts both directions afresh with the same parameters and seeds, so that every transfer
    /// meets the same link (the same loss pattern for the same packet sequence) and the
    /// statistics, peak queue included, are its own.
    pub fn reset(&self) {
        for (i, l) in self.links.iter().enumerate() {
            let seed = if i == 0 { self.seed } else { self.seed ^ 0x5eed };
            *l.lock().unwrap_or_else(|p| p.into_inner()) = Link::new(self.params, seed);
        }
    }

    /// Statistics of both directions since the last [`NetPath::reset`] (a → b, b → a).
    pub fn stats(&self) -> [LinkStats; 2] {
        let get = |l: &Arc<Mutex<Link>>| l.lock().unwrap_or_else(|p| p.into_inner()).stats();
        [get(&self.links[0]), get(&self.links[1])]
    }
}

impl Drop for NetPath {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let mut l = live();
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).stderr(Stdio::null()).status();
            l.netns.retain(|x| x != n);
        }
    }
}

/// A packet waiting for its delivery instant; the heap pops the earliest, ties in arrival order.
struct Due {
    at: Instant,
    seq: u64,
    data: Arc<[u8]>,
}

impl PartialEq for Due {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Due {
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// One direction: read packets from `rx`, let the link decide, write them to `tx` when due.
/// Only IPv4 packets addressed to `dst` (the other namespace's address) are ever forwarded.
fn forward(rx: &OwnedFd, tx: &OwnedFd, dst: Ipv4Addr, link: &Mutex<Link>, stop: &AtomicBool) {
    let mut heap = BinaryHeap::new();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while heap.peek().is_some_and(|d: &Due| d.at <= now) {
            if let Some(d) = heap.pop() {
                // SAFETY: write(2) from a live buffer. A full device queue drops the packet,
                // as a real link would.
                unsafe { libc::write(tx.as_raw_fd(), d.data.as_ptr().cast(), d.data.len()) };
            }
        }
        let wait = heap.peek().map_or(Duration::from_millis(50), |d| d.at.saturating_duration_since(now));
        let ts = libc::timespec {
            tv_sec: wait.as_secs().min(1) as libc::time_t,
            tv_nsec: if wait.as_secs() >= 1 { 0 } else { wait.subsec_nanos() as libc::c_long },
        };
        let mut pfd = libc::pollfd { fd: rx.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd, a valid timespec, no signal mask change.
        unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        // Bounded so that due packets are not held back behind a long read burst.
        for _ in 0..64 {
            // SAFETY: read(2) into a buffer of the given length.
            let n = unsafe { libc::read(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let pkt = &buf[..n as usize];
            if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[16..20] != dst.octets() {
                continue;
            }
            let now = Instant::now();
            let times = link.lock().unwrap_or_else(|p| p.into_inner()).send(now, pkt.len());
            if times.is_empty() {
                continue;
            }
            let data: Arc<[u8]> = pkt.into();
            for at in times {
                heap.push(Due { at, seq, data: data.clone() });
                seq += 1;
            }
        }
    }
}

/// How a child ended, from `wait4`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Exit {
    pub code: Option<i32>,
    pub cpu_secs: f64,
    pub peak_rss_kib: u64,
}

/// A child process: its stdout as lines, its stdin, and its exit with resource usage.
pub struct Proc {
    pub name: String,
    pid: i32,
    lines: mpsc::Receiver<String>,
    exit: mpsc::Receiver<Exit>,
    pub stdin: Option<ChildStdin>,
    exited: Option<Exit>,
}

/// Starts `cmd` (in the namespace `netns` if given) with piped stdin/stdout.
pub fn spawn(name: &str, mut cmd: Command, netns: Option<RawFd>) -> anyhow::Result<Proc> {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    if let Some(fd) = netns {
        // SAFETY: the closure only calls setns(2), which is async-signal-safe.
        unsafe { cmd.pre_exec(move || enter_netns(fd)) };
    }
    // Registration and spawn under one lock, so a signal's teardown never misses this child.
    let mut l = live();
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let pid = child.id() as i32;
    l.pids.push(pid);
    drop(l);
    let stdout = child.stdout.take().context("child stdout")?;
    let stdin = child.stdin.take();
    // The std handle is not used to wait: the reaper below needs the rusage.
    drop(child);
    let (ltx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if ltx.send(line).is_err() {
                break;
            }
        }
    });
    let (etx, exit) = mpsc::channel();
    std::thread::spawn(move || {
        // Wait without reaping, then reap while holding the lock, so that teardown can never
        // signal a recycled pid.
        // SAFETY: waitid/wait4 on our own child with valid out-pointers.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT);
            let mut l = live();
            l.pids.retain(|p| *p != pid);
            let mut status = 0;
            let mut ru: libc::rusage = std::mem::zeroed();
            libc::wait4(pid, &mut status, 0, &mut ru);
            drop(l);
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
            let _ = etx.send(Exit {
                code,
                cpu_secs: secs(ru.ru_utime) + secs(ru.ru_stime),
                peak_rss_kib: ru.ru_maxrss as u64,
            });
        }
    });
    Ok(Proc { name: name.to_owned(), pid, lines, exit, stdin, exited: None })
}

impl Proc {
    /// The next stdout line, or an error at `deadline` or when the child closed stdout.
    pub fn line(&mut self, deadline: Instant) -> anyhow::Result<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(l) => Ok(l),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("{}: timed out", self.name),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("{}: exited without answering", self.name),
        }
    }

    /// The next stdout line that is a JSON object, skipping any other output.
    pub fn json(&mut self, deadline: Instant) -> anyhow::Result<serde_json::Value> {
        loop {
            let l = self.line(deadline)?;
            if let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str(&l) {
                return Ok(v);
            }
        }
    }

    pub fn send_line(&mut self, line: &str) -> anyhow::Result<()> {
        let w = self.stdin.as_mut().context("child stdin closed")?;
        writeln!(w, "{line}")?;
        w.flush()?;
        Ok(())
    }

    pub fn kill(&self) {
        let l = live();
        if l.pids.contains(&self.pid) {
            // SAFETY: the pid is registered, so not yet reaped and not recycled.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }

    /// Waits until `deadline` for the child to exit, then kills it; returns its usage.
    pub fn finish(&mut self, deadline: Instant) -> Exit {
        if let Some(e) = self.exited {
            return e;
        }
        self.stdin = None;
        let left = deadline.saturating_duration_since(Instant::now());
        let e = match self.exit.recv_timeout(left) {
            Ok(e) => e,
            Err(_) => {
                self.kill();
                self.exit.recv_timeout(Duration::from_secs(5)).unwrap_or_default()
            }
        };
        self.exited = Some(e);
        e
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() {
            self.kill();
        }
    }
}
