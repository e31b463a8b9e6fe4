//! Measures the job path on loopback with real processes (release build):
//!
//! 1. **submit → spawn**: from starting `sleap-rtc train` until the worker starts the trainer,
//!    with a 200 MB `.pkg.slp` (first upload, then again when the worker already has it) and with
//!    the 188 KB bundled package.
//! 2. **relay CPU**: the worker's CPU use while it relays a training run's progress to a client,
//!    at sleap-nn's real rate (~10 batches/s) and at a stress rate.
//!
//! ```text
//! cargo build --release -p sleap-rtc --examples
//! ./target/release/examples/job-bench            # needs python3 with pyzmq (SLEAP_RTC_TEST_PYTHON)
//! ```
//!
//! `--smol-worker` measures sleap-rtc-smol's worker example instead of `sleap-rtc worker` (the
//! same driver code on the other runtime; `cargo build --release -p sleap-rtc-smol --example
//! worker` first).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

fn bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().and_then(Path::parent).expect("target dir").join("sleap-rtc")
}

fn manifest(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc_sysconf(2) } as f64; // _SC_CLK_TCK
    ticks / hz
}

unsafe extern "C" {
    #[link_name = "sysconf"]
    fn libc_sysconf(name: i32) -> i64;
}

fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

struct Setup {
    dir: tempfile::TempDir,
    url: String,
    jwt: String,
    room: String,
    token: String,
}

impl Setup {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .env("SLEAP_RTC_CONFIG_DIR", self.dir.path().join("cfg"))
            .env("SLEAP_RTC_DATA_HOME", self.dir.path().join("data"))
            .env("SLEAP_RTC_SERVER", &self.url)
            .env("SLEAP_RTC_ROOM", &self.room)
            .env("SLEAP_RTC_JWT", &self.jwt)
            .env("RUST_LOG", "warn");
        c
    }

    // The child is handed to the caller, which kills and reaps it; the lint cannot see that.
    #[allow(clippy::zombie_processes)]
    fn worker(&self, name: &str, sleap_nn: &Path, fake_env: &str, smol: bool) -> (std::process::Child, String) {
        let wd = self.dir.path().join(name);
        let mut child = if smol {
            // The example stops when its stdin closes: keep a pipe open for its lifetime.
            let ws = format!("{}/ws", self.url.replacen("http", "ws", 1));
            Command::new(bin().parent().expect("target dir").join("examples/worker"))
                .args([&wd, sleap_nn])
                .env("SLEAP_RTC_SERVER", ws)
                .env("SLEAP_RTC_TOKEN", &self.token)
                .env("SLEAP_RTC_BIND", "127.0.0.1")
                .env("FAKE_SLEAP_NN", fake_env)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("target/release/examples/worker (cargo build --release -p sleap-rtc-smol --example worker)")
        } else {
            self.cmd(&[
                "worker",
                "--token",
                &self.token,
                "--bind",
                "127.0.0.1",
                "--work-dir",
                wd.to_str().unwrap(),
                "--sleap-nn",
                sleap_nn.to_str().unwrap(),
            ])
            .env("FAKE_SLEAP_NN", fake_env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let id = std::fs::read_to_string(wd.join("worker-id")).unwrap_or_default().trim().to_owned();
            if !id.is_empty() {
                let out = self.cmd(&["workers", "--json"]).output().unwrap();
                if String::from_utf8_lossy(&out.stdout).contains(&id) {
                    return (child, id);
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("worker did not register");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn train(&self, worker: &str, cfg: &Path, labels: &Path, out: &str) -> (i32, Vec<Value>) {
        let o = self.dir.path().join(out);
        let out = self
            .cmd(&[
                "train",
                "--worker",
                worker,
                "--config",
                cfg.to_str().unwrap(),
                "--labels",
                labels.to_str().unwrap(),
                "--bind",
                "127.0.0.1",
                "--json",
                "-o",
                o.to_str().unwrap(),
            ])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let events =
            String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        (out.status.code().unwrap_or(-1), events)
    }
}

fn setup(rt: &tokio::runtime::Runtime) -> (Setup, sleap_rtc_server::Server) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sleap_rtc_server::Config::local(dir.path().join("server"));
    cfg.auth_rate_per_min = 1e6;
    let server = rt.block_on(sleap_rtc_server::Server::start(cfg)).unwrap();
    let url = format!("http://{}", server.local_addrs()[0]);
    let post = |path: &str, jwt: Option<&str>, body: Value| -> Value {
        rt.block_on(async {
            let mut r = reqwest::Client::new().post(format!("{url}{path}")).json(&body);
            if let Some(j) = jwt {
                r = r.bearer_auth(j);
            }
            r.send().await.unwrap().json::<Value>().await.unwrap()
        })
    };
    let jwt = post("/anonymous-signin", None, json!({}))["jwt"].as_str().unwrap().to_owned();
    let room = post("/api/auth/rooms", Some(&jwt), json!({"name": "bench"}))["room_id"].as_str().unwrap().to_owned();
    let token = post("/api/auth/token", Some(&jwt), json!({"room_id": room, "worker_name": "bench"}))["token_id"]
        .as_str()
        .unwrap()
        .to_owned();
    (Setup { dir, url, jwt, room, token }, server)
}

fn main() {
    let smol = std::env::args().any(|a| a == "--smol-worker");
    let which = if smol { "sleap-rtc-smol's example worker" } else { "sleap-rtc worker (tokio)" };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (s, _server) = setup(&rt);
    let cfg = manifest("assets/tiny_single.yaml");

    // -- 1. submit → spawn ---------------------------------------------------------------------
    // A trainer stub that records when it was started, then fails fast.
    let marker = s.dir.path().join("spawned");
    let stub = s.dir.path().join("stub-sleap-nn");
    std::fs::write(
        &stub,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'sleap-nn 0.3.5'; exit 0; fi\n\
             date +%s.%N > '{}'\nexit 1\n",
            marker.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod").args(["+x", stub.to_str().unwrap()]).status().unwrap();
    let (mut w, wid) = s.worker("stub-worker", &stub, "", smol);
    let big = s.dir.path().join("big.pkg.slp");
    {
        let mut f = std::fs::File::create(&big).unwrap();
        let mut block = vec![0u8; 1 << 20];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..200 {
            for b in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            f.write_all(&block).unwrap();
        }
    }
    let small = manifest("assets/labels.pkg.slp");
    println!("submit → trainer spawned (loopback, release, {which}):");
    for (label, labels) in [
        ("188 KB package          ", &small),
        ("200 MB package, 1st     ", &big),
        ("200 MB package, cached  ", &big),
        ("200 MB package, cached  ", &big),
    ] {
        let _ = std::fs::remove_file(&marker);
        let t0 = now();
        let (code, events) = s.train(&wid, &cfg, labels, "o");
        let spawned: f64 =
            std::fs::read_to_string(&marker).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(f64::NAN);
        let up = events.iter().find(|e| e["event"] == "uploaded").cloned().unwrap_or(Value::Null);
        println!(
            "  {label} {:7.3} s   (upload {} B, {} B already on the worker; exit {code})",
            spawned - t0,
            up["bytes"],
            up["resumed_bytes"]
        );
    }
    let _ = w.kill();
    let _ = w.wait();

    // -- 2. relay CPU --------------------------------------------------------------------------
    let python = std::env::var("SLEAP_RTC_TEST_PYTHON").unwrap_or_else(|_| {
        let v = format!("{}/.cache/sleap-rtc/venv/bin/python", std::env::var("HOME").unwrap_or_default());
        if Path::new(&v).exists() { v } else { "python3".into() }
    });
    let fake = s.dir.path().join("fake-sleap-nn");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\nexec '{python}' '{}' \"$@\"\n", manifest("tests/fixtures/fake_sleap_nn.py").display()),
    )
    .unwrap();
    std::process::Command::new("chmod").args(["+x", fake.to_str().unwrap()]).status().unwrap();
    println!("\nworker CPU while relaying progress to a connected client ({which}):");
    for (label, fake_env, epochs, steps) in [
        ("sleap-nn's pace (100 ms/batch)", "batch_ms=100 steps=10 startup_ms=300", 30, 10),
        ("stress (no delay per batch)   ", "batch_ms=0 steps=500 startup_ms=300", 8, 500),
    ] {
        let (mut w, wid) = s.worker(&format!("relay-{epochs}"), &fake, fake_env, smol);
        let pid = w.id();
        let cfgp = s.dir.path().join(format!("relay-{epochs}.yaml"));
        std::fs::write(
            &cfgp,
            std::fs::read_to_string(&cfg).unwrap().replace("max_epochs: 2", &format!("max_epochs: {epochs}")),
        )
        .unwrap();
        let (c0, t0) = (cpu_secs(pid), Instant::now());
        let (code, events) = s.train(&wid, &cfgp, &small, &format!("relay-out-{epochs}"));
        let (c1, wall) = (cpu_secs(pid), t0.elapsed().as_secs_f64());
        let progress = events.iter().filter(|e| e["event"] == "progress").count();
        let batches = events.iter().filter(|e| e["progress"]["event"] == "batch").count();
        let logs = events.iter().filter(|e| e["event"] == "log").count();
        println!(
            "  {label} {} batches in {wall:.1} s ({:.0}/s): worker CPU {:.2} % of a core ({:.3} s), RSS {:.1} MiB; \
             client got {progress} progress ({batches} batch) + {logs} log messages; exit {code}",
            epochs * steps,
            (epochs * steps) as f64 / wall,
            100.0 * (c1 - c0) / wall,
            c1 - c0,
            rss_mib(pid),
        );
        let _ = w.kill();
        let _ = w.wait();
    }
}
