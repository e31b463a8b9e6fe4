//! `sleap-rtc status` (what this machine has stored, no network) and `sleap-rtc doctor` (can
//! this machine reach the server, sign in, join its room and see a worker; and, with
//! `--worker`, can it be one).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use serde_json::{Value, json};

use crate::config::{self, Settings};
use crate::creds;
use crate::manage::{ApiArgs, client, credential_info, http_json, private_mode, unix_now, when};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

#[derive(Default)]
struct Report {
    checks: Vec<Check>,
}

impl Report {
    fn add(&mut self, name: &'static str, verdict: Verdict, detail: impl Into<String>) {
        self.checks.push(Check { name, verdict, detail: detail.into() });
    }
    fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.verdict == Verdict::Fail)
    }
}

#[derive(Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub json: bool,
}

/// What is stored on this machine: config files, the default server and room, credentials
/// (masked) and their expiry, local job records. Makes no network call.
pub fn status(a: StatusArgs) -> Result<i32> {
    let settings = Settings::load();
    let now = unix_now();
    let files = [("project", config::project_path()), ("user", config::user_path())];
    let creds_path = creds::path();
    let mode = private_mode(&creds_path);
    let servers = creds::servers().unwrap_or_default();
    let logins: Vec<Value> = servers
        .iter()
        .map(|(url, s)| {
            let (kind, exp) = credential_info(&s.credential);
            json!({"server": url, "username": s.username, "credential": kind, "masked": mask(&s.credential),
                   "expires_at": exp, "expired": exp.is_some_and(|t| t <= now)})
        })
        .collect();
    let jobs = creds::list_jobs().len();
    let (server, room) = match &settings {
        Ok(s) => (s.server(), s.room()),
        Err(_) => (None, None),
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "config_files": files.iter().map(|(k, p)| json!({"scope": k, "path": p, "exists": p.exists()})).collect::<Vec<_>>(),
                "config_error": settings.as_ref().err().map(|e| format!("{e:#}")),
                "server": server, "room": room,
                "credentials_file": creds_path, "credentials_private": mode.map(|m| m.0),
                "logins": logins, "local_job_records": jobs,
            }))?
        );
        return Ok(0);
    }
    for (k, p) in &files {
        println!("{k} config: {} {}", p.display(), if p.exists() { "" } else { "(none)" });
    }
    if let Err(e) = &settings {
        println!("config error: {e:#}");
    }
    println!("server:  {}", server.as_deref().unwrap_or("(none: pass --server or `sleap-rtc login --server URL`)"));
    println!("room:    {}", room.as_deref().unwrap_or("(none: `sleap-rtc room set-default ROOM`)"));
    match mode {
        Some((true, m)) => println!("credentials: {} (mode {m:o})", creds_path.display()),
        Some((false, m)) => {
            println!("credentials: {} (mode {m:o}: readable by others! chmod 600 it)", creds_path.display())
        }
        None => println!("credentials: none stored"),
    }
    for l in &logins {
        let exp = l["expires_at"].as_i64();
        println!(
            "  {}  {}  {} {}{}",
            l["server"].as_str().unwrap_or(""),
            l["username"].as_str().unwrap_or("?"),
            l["credential"].as_str().unwrap_or(""),
            l["masked"].as_str().unwrap_or(""),
            match exp {
                Some(t) if t <= now => " EXPIRED: log in again".to_owned(),
                Some(t) => format!(", expires {}", when(Some(t), now)),
                None => String::new(),
            }
        );
    }
    println!("jobs submitted from here: {jobs} (`sleap-rtc job list`)");
    Ok(0)
}

/// The first and last few characters of a secret.
fn mask(secret: &str) -> String {
    let n = secret.chars().count();
    if n <= 12 {
        return "*".repeat(n);
    }
    let head: String = secret.chars().take(8).collect();
    let tail: String = secret.chars().skip(n - 4).collect();
    format!("{head}…{tail}")
}

#[derive(Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Room to check (default: the default room).
    #[arg(long, env = "SLEAP_RTC_ROOM")]
    pub room: Option<String>,
    /// Also check this machine as a worker: sleap-nn, GPU, mounts, work dir.
    #[arg(long)]
    pub worker: bool,
    /// The sleap-nn executable to check (with --worker).
    #[arg(long, env = "SLEAP_NN")]
    pub sleap_nn: Option<PathBuf>,
    /// Mounts to check (with --worker; default: the config file's worker.mounts).
    #[arg(long = "mount", env = "SLEAP_RTC_MOUNTS", value_delimiter = ':', value_name = "DIR")]
    pub mounts: Vec<PathBuf>,
    /// Work dir to check (with --worker).
    #[arg(long, env = "SLEAP_RTC_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// Runs every check that can run, in order; a failed step skips only what depends on it.
/// Exit code 1 when any check failed.
pub async fn doctor(a: DoctorArgs) -> Result<i32> {
    let mut r = Report::default();
    let settings = match Settings::load() {
        Ok(s) => {
            let used: Vec<String> =
                [&s.project, &s.user].into_iter().flatten().map(|(p, _)| p.display().to_string()).collect();
            r.add(
                "config",
                Verdict::Ok,
                if used.is_empty() { "no config file (defaults)".into() } else { used.join(", ") },
            );
            s
        }
        Err(e) => {
            r.add("config", Verdict::Fail, format!("{e:#}"));
            Settings::default()
        }
    };
    let server = match a.api.server.resolve(&settings) {
        Ok(s) => Some(s),
        Err(e) => {
            r.add("server", Verdict::Fail, format!("{e:#}"));
            None
        }
    };
    let mut healthy = false;
    if let Some(server) = &server {
        let t0 = Instant::now();
        match http_json(client()?.get(format!("{}/health", server.http))).await {
            Ok(h) => {
                healthy = true;
                let ms = t0.elapsed().as_millis();
                r.add("server", Verdict::Ok, format!("{} healthy ({ms} ms): {h}", server.http));
            }
            Err(e) => r.add("server", Verdict::Fail, format!("{}: {e:#}", server.http)),
        }
        if let Some(w) = server.plaintext_warning() {
            r.add("tls", Verdict::Warn, w);
        }
    }
    let creds_path = creds::path();
    match private_mode(&creds_path) {
        Some((true, m)) => r.add("credentials file", Verdict::Ok, format!("{} (mode {m:o})", creds_path.display())),
        Some((false, m)) => r.add(
            "credentials file",
            Verdict::Fail,
            format!("{} has mode {m:o}: others can read your credential; run chmod 600 on it", creds_path.display()),
        ),
        None => r.add("credentials file", Verdict::Skip, "none stored yet"),
    }
    let mut credential = None;
    if let (Some(server), true) = (&server, healthy) {
        match creds::resolve(&server.http, a.api.jwt.as_deref()) {
            Err(e) => r.add("login", Verdict::Fail, format!("{e:#}")),
            Ok(c) => {
                let me = http_json(client()?.get(format!("{}/api/auth/me", server.http)).bearer_auth(&c)).await;
                let (_, exp) = credential_info(&c);
                match me {
                    Ok(me) => {
                        let user = me.get("username").and_then(Value::as_str).unwrap_or("?");
                        match exp {
                            Some(t) if t - unix_now() < 86_400 => r.add(
                                "login",
                                Verdict::Warn,
                                format!("{user}; the JWT expires {}: log in again soon", when(Some(t), unix_now())),
                            ),
                            _ => r.add("login", Verdict::Ok, user.to_owned()),
                        }
                        credential = Some(c);
                    }
                    Err(e) => {
                        r.add("login", Verdict::Fail, format!("the stored credential is refused ({e:#}); log in again"))
                    }
                }
            }
        }
    }
    let room = a.room.clone().or_else(|| settings.room());
    let mut servers: Vec<sleap_rtc_core::signal::IceServer> = Vec::new();
    if let (Some(server), Some(cred)) = (&server, &credential) {
        match &room {
            None => r.add("room", Verdict::Fail, "no room: pass --room or `sleap-rtc room set-default ROOM`"),
            Some(room) => {
                let reg = crate::jobs::client_register(room, cred);
                let connect = sleap_rtc_tokio::SignalingClient::connect(&server.ws, reg);
                match tokio::time::timeout(Duration::from_secs(15), connect).await {
                    Err(_) => r.add("room", Verdict::Fail, format!("{}: no answer in 15 s", server.ws)),
                    Ok(Err(e)) => r.add("room", Verdict::Fail, format!("joining {room}: {e}")),
                    Ok(Ok(sig)) => {
                        servers = sig.registered().ice_servers.clone();
                        r.add("room", Verdict::Ok, format!("joined {room} over {}", server.ws));
                        let filters =
                            sleap_rtc_core::signal::Filters { role: Some("worker".into()), ..Default::default() };
                        match sig.discover(filters).await {
                            Ok(w) if w.is_empty() => r.add("workers", Verdict::Warn, "none online in this room"),
                            Ok(w) => r.add("workers", Verdict::Ok, format!("{} online", w.len())),
                            Err(e) => r.add("workers", Verdict::Fail, format!("{e}")),
                        }
                    }
                }
            }
        }
    }
    let ice: Vec<String> = servers.iter().flat_map(|s| s.urls.iter().cloned()).collect();
    stun_checks(&mut r, &ice).await;
    turn_checks(&mut r, &servers).await;
    if a.worker {
        worker_checks(&mut r, &a, &settings).await;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json!({"ok": !r.failed(), "checks": r.checks}))?);
    } else {
        for c in &r.checks {
            let mark = match c.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
                Verdict::Skip => "skip",
            };
            println!("[{mark}] {:<17} {}", c.name, c.detail);
        }
        println!("{}", if r.failed() { "some checks failed (see above)" } else { "all checks passed" });
    }
    Ok(if r.failed() { 1 } else { 0 })
}

/// Asks each `stun:` server the room hands out for this machine's public address, over UDP.
async fn stun_checks(r: &mut Report, ice: &[String]) {
    let stun: Vec<&String> = ice.iter().filter(|u| u.starts_with("stun:")).collect();
    if stun.is_empty() {
        r.add(
            "stun",
            if ice.is_empty() { Verdict::Warn } else { Verdict::Skip },
            "the server hands out no STUN server: peers on different networks behind NAT may not connect",
        );
    }
    for url in stun {
        let Some((host, port)) = sleap_rtc_core::stun::parse_stun_url(url) else {
            r.add("stun", Verdict::Fail, format!("{url}: not a stun: URL"));
            continue;
        };
        match stun_once(&host, port).await {
            Ok((mapped, rtt)) => r.add(
                "stun",
                Verdict::Ok,
                format!("{url}: UDP works, this machine is {mapped} ({} ms)", rtt.as_millis()),
            ),
            Err(e) => r.add("stun", Verdict::Fail, format!("{url}: {e} (UDP blocked? peers may not connect)")),
        }
    }
}

/// Allocates a relayed address on each `turn:` server the room hands out, with the credentials
/// it handed to us, and releases it: what a connection that needs the relay would do.
async fn turn_checks(r: &mut Report, servers: &[sleap_rtc_core::signal::IceServer]) {
    let mut any = false;
    for s in servers {
        for url in s.urls.iter().filter(|u| u.starts_with("turn")) {
            any = true;
            let (Some(user), Some(pass)) = (&s.username, &s.credential) else {
                r.add("turn", Verdict::Fail, format!("{url}: handed out without credentials"));
                continue;
            };
            let Some((host, port)) = sleap_rtc_core::relay::parse_turn_url(url) else {
                r.add("turn", Verdict::Skip, format!("{url}: TLS/TCP relays are not used by this client"));
                continue;
            };
            match turn_once(host, port, user, pass).await {
                Ok((relayed, rtt)) => r.add(
                    "turn",
                    Verdict::Ok,
                    format!(
                        "{url}: relay allocated at {relayed} ({} ms); peers that cannot connect directly will use it",
                        rtt.as_millis()
                    ),
                ),
                Err(e) => r.add("turn", Verdict::Fail, format!("{url}: {e}")),
            }
        }
    }
    if !any {
        r.add(
            "turn",
            Verdict::Skip,
            "the server hands out no TURN relay: peers whose networks block UDP between them cannot connect",
        );
    }
}

async fn turn_once(host: &str, port: u16, user: &str, pass: &str) -> Result<(SocketAddr, Duration)> {
    use sleap_rtc_core::relay::{Relay, RelayState};
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let target = addrs.first().copied().ok_or_else(|| anyhow::anyhow!("does not resolve"))?;
    let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let sock = tokio::net::UdpSocket::bind(bind).await?;
    sock.connect(target).await?;
    let local = sock.local_addr()?;
    let t0 = Instant::now();
    let mut relay = Relay::new(local, target, user, pass, t0);
    let deadline = t0 + Duration::from_secs(5);
    let mut buf = [0u8; 1500];
    loop {
        let now = Instant::now();
        let wake = relay.poll_timeout(now).min(deadline);
        while let Some(d) = relay.poll_transmit(now) {
            sock.send(&d).await?;
        }
        match relay.state().clone() {
            RelayState::Allocated(a) => {
                let rtt = t0.elapsed();
                relay.release(Instant::now());
                while let Some(d) = relay.poll_transmit(Instant::now()) {
                    let _ = sock.send(&d).await;
                }
                return Ok((a, rtt));
            }
            RelayState::Failed(why) => anyhow::bail!(
                "{why} (are the server's --turn-secret-file and the relay's static-auth-secret the same?)"
            ),
            _ if now >= deadline => anyhow::bail!("no answer in 5 s (UDP to the relay blocked?)"),
            _ => {}
        }
        if let Ok(Ok(n)) = tokio::time::timeout_at(wake.into(), sock.recv(&mut buf)).await {
            relay.handle_receive(Instant::now(), target, &buf[..n]);
        }
    }
}

async fn stun_once(host: &str, port: u16) -> Result<(SocketAddr, Duration)> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let target = addrs.first().copied().ok_or_else(|| anyhow::anyhow!("does not resolve"))?;
    let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let sock = tokio::net::UdpSocket::bind(bind).await?;
    let req = sleap_rtc_core::stun::binding_request();
    let t0 = Instant::now();
    let mut buf = [0u8; 1500];
    // Three tries, 500 ms apart: one lost datagram is not a verdict.
    for _ in 0..3 {
        sock.send_to(&req.bytes, target).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Ok((n, from))) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
            if from == target
                && let Some(m) = sleap_rtc_core::stun::mapped_address(&buf[..n], req.id)
            {
                return Ok((m, t0.elapsed()));
            }
        }
    }
    anyhow::bail!("no STUN answer in 1.5 s")
}

#[cfg(not(unix))]
async fn worker_checks(r: &mut Report, _: &DoctorArgs, _: &Settings) {
    r.add("worker", Verdict::Fail, "workers run on Linux and macOS only (on Windows: WSL2 or a Linux container)");
}

#[cfg(unix)]
async fn worker_checks(r: &mut Report, a: &DoctorArgs, s: &Settings) {
    let sleap_nn = a.sleap_nn.clone().or_else(|| s.worker(|w| w.sleap_nn.clone())).unwrap_or_else(|| "sleap-nn".into());
    let work_dir = a
        .work_dir
        .clone()
        .or_else(|| s.worker(|w| w.work_dir.clone()))
        .unwrap_or_else(|| creds::data_dir().join("worker"));
    let probe_dir = if work_dir.is_dir() { work_dir.clone() } else { std::env::temp_dir() };
    let caps = sleap_rtc_tokio::worker::probe_capabilities(&sleap_nn, &probe_dir).await;
    match &caps.sleap_nn_version {
        Some(v) => r.add("sleap-nn", Verdict::Ok, format!("{} {v}", sleap_nn.display())),
        None => r.add(
            "sleap-nn",
            Verdict::Fail,
            format!("{} not found or does not run (pass --sleap-nn or set SLEAP_NN)", sleap_nn.display()),
        ),
    }
    if caps.gpu_memory_mb > 0 {
        r.add("gpu", Verdict::Ok, format!("{} ({} MB)", caps.gpu_model, caps.gpu_memory_mb));
    } else {
        r.add("gpu", Verdict::Warn, "no NVIDIA GPU (nvidia-smi found none): training runs on the CPU");
    }
    let probe = work_dir.join(format!(".sleap-rtc-doctor-{}", std::process::id()));
    let writable = std::fs::create_dir_all(&work_dir).and_then(|_| std::fs::write(&probe, b"ok"));
    let _ = std::fs::remove_file(&probe);
    match writable {
        Ok(()) => {
            r.add("work dir", Verdict::Ok, format!("{} writable, {} MB free", work_dir.display(), caps.free_disk_mb))
        }
        Err(e) => r.add("work dir", Verdict::Fail, format!("{}: {e}", work_dir.display())),
    }
    let mounts =
        if a.mounts.is_empty() { s.worker(|w| w.mounts.clone()).unwrap_or_default() } else { a.mounts.clone() };
    if mounts.is_empty() {
        r.add("mounts", Verdict::Warn, "none: clients can only upload files, not name files on this machine");
    }
    for m in mounts {
        match std::fs::read_dir(&m) {
            Ok(_) => r.add("mounts", Verdict::Ok, format!("{} readable", m.display())),
            Err(e) => r.add("mounts", Verdict::Fail, format!("{}: {e}", m.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked() {
        assert_eq!(mask("short"), "*****");
        assert_eq!(mask("slp_acct_0123456789abcdef"), "slp_acct…cdef");
    }
}
