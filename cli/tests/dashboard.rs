//! The web dashboard in a real browser: Debian's chromium, driven headless by playwright-core
//! (`server/dashboard/test/browser.mjs`), against the real `sleap-rtc-server` binary, with a real
//! `sleap-rtc worker` process (fake sleap-nn) and a real `sleap-rtc train` client.
//!
//! The script signs in, creates a room, an invite and a worker token through the page and prints
//! what it got; this test starts the worker with that token (and a directory registry, and
//! `--publish-progress`), tells the script when the server lists the worker (the card must show
//! within 2 s), runs a training job (busy status, loss chart), and lets the script check the
//! published model in the registry table, the JWT and account-key sign-ins and a narrow screen.
//! Screenshots of every screen land in `target/dashboard-screenshots/`.
//!
//! Needs `node`, chromium (`SLEAP_RTC_TEST_CHROMIUM`, default `/usr/bin/chromium`) and
//! `npm ci` in `server/dashboard/test`; `scripts/test.sh` installs all three.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{BIN, asset, fixture, python};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The server binary, built by `cargo test --workspace`; built here when only this package's
/// tests are being run.
fn server_binary() -> PathBuf {
    let bin = Path::new(BIN).with_file_name("sleap-rtc-server");
    if !bin.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "sleap-rtc-server", "--bin", "sleap-rtc-server"])
            .current_dir(repo())
            .status()
            .expect("run cargo");
        assert!(status.success(), "cannot build sleap-rtc-server");
    }
    bin
}

/// The real server on 127.0.0.1 (random port); returns it and its base URL.
async fn start_server(data: &Path) -> (Child, String) {
    let mut child = Command::new(server_binary())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("SLEAP_RTC_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start sleap-rtc-server");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), out.next_line())
        .await
        .expect("server prints its address")
        .expect("read server stdout")
        .unwrap_or_default();
    let addr = line.trim().strip_prefix("listening on ").expect("'listening on ADDR'").to_owned();
    (child, format!("http://{addr}"))
}

struct Script {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stdin: tokio::process::ChildStdin,
}

impl Script {
    async fn expect(&mut self, step: &str, secs: u64) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(secs), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the browser script did not reach '{step}' in {secs} s"))
            .expect("read the script's stdout");
        let Some(line) = line else {
            let status = self.child.wait().await.expect("script status");
            panic!("the browser script ended ({status}) before '{step}'; its stderr is above")
        };
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON from the script: {line}: {e}"));
        assert_eq!(v["step"], step, "{v}");
        v
    }

    async fn say(&mut self, v: Value) {
        self.stdin.write_all(format!("{v}\n").as_bytes()).await.expect("write to the script");
        self.stdin.flush().await.expect("flush");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    let started = Instant::now();
    let test_dir = repo().join("server/dashboard/test");
    assert!(
        test_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run ./scripts/test.sh once, or `npm ci` in {}",
        test_dir.display()
    );
    let chromium = std::env::var("SLEAP_RTC_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no chromium at {chromium}: apt-get install chromium (scripts/test.sh does)"
    );
    let target = Path::new(BIN).parent().and_then(Path::parent).expect("target dir").to_path_buf();
    let shots = target.join("dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&shots);

    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = start_server(&dir.path().join("server")).await;

    let mut child = Command::new(std::env::var("SLEAP_RTC_TEST_NODE").unwrap_or_else(|_| "node".into()))
        .arg(test_dir.join("browser.mjs"))
        .env("DASHBOARD_URL", &url)
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", &chromium)
        .env("BROWSER_PROFILE", dir.path().join("chromium-profile"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("run node (install Node.js 18 or newer)");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let stdin = child.stdin.take().unwrap();
    let mut script = Script { child, lines, stdin };

    // Signed in, room created, invite and worker token shown once: the script hands over what
    // the page showed.
    let got = script.expect("token", 60).await;
    let token = got["token"].as_str().expect("token").to_owned();
    let room = got["room"].as_str().expect("room").to_owned();
    let jwt = got["jwt"].as_str().expect("jwt").to_owned();
    assert!(token.starts_with("slp_"), "{got}");

    // The worker: a fake sleap-nn whose epochs take ~0.5 s, so the chart has time to draw.
    let fake = dir.path().join("sleap-nn");
    std::fs::write(&fake, format!("#!/bin/sh\nexec '{}' '{}' \"$@\"\n", python(), fixture().display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let registry = dir.path().join("registry");
    let work = dir.path().join("work");
    let cmd = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("SLEAP_RTC_CONFIG_DIR", dir.path().join("cfg"))
            .env("SLEAP_RTC_DATA_HOME", dir.path().join("data"))
            .env("SLEAP_RTC_SERVER", &url)
            .env("SLEAP_RTC_ROOM", &room)
            .env("SLEAP_RTC_JWT", &jwt)
            .env_remove("SLEAP_RTC_ROOM_SECRET")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    };
    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let mut worker = cmd(&["worker", "--token", &token, "--name", "gpu-box", "--bind", "127.0.0.1"]);
    worker
        .args(["--work-dir".as_ref(), work.as_os_str(), "--sleap-nn".as_ref(), fake.as_os_str()])
        .args(["--registry".as_ref(), registry.as_os_str(), "--publish-progress".as_ref()])
        .env("FAKE_SLEAP_NN", "batch_ms=100")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
    let _worker = worker.spawn().expect("start the worker");

    // As soon as the server lists the worker, the clock starts for the page.
    let http = reqwest::Client::new();
    let listed = async {
        loop {
            let r = http.get(format!("{url}/api/rooms/{room}/workers")).bearer_auth(&jwt).send().await;
            if let Ok(r) = r {
                let v: Value = r.json().await.unwrap_or_default();
                if let Some(id) = v["workers"][0]["peer_id"].as_str() {
                    return id.to_owned();
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let peer_id = tokio::time::timeout(Duration::from_secs(30), listed).await.unwrap_or_else(|_| {
        panic!(
            "the worker did not register: {}",
            std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default()
        )
    });
    script.say(json!({"step": "worker_up", "peer_id": peer_id})).await;
    let seen = script.expect("worker_seen", 10).await;
    assert!(seen["ms"].as_f64().is_some_and(|ms| ms <= 2000.0), "{seen}");

    // A training job: busy, progress and a loss chart, then a model in the registry.
    let cfg = dir.path().join("cfg.yaml");
    std::fs::copy(asset("tiny_single.yaml"), &cfg).unwrap();
    let out = dir.path().join("out");
    let mut train = cmd(&["train", "--bind", "127.0.0.1", "--json", "--max-epochs", "10"]);
    train
        .args(["--config".as_ref(), cfg.as_os_str(), "--labels".as_ref(), asset("labels.pkg.slp").as_os_str()])
        .args(["-o".as_ref(), out.as_os_str()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let train = train.spawn().expect("start sleap-rtc train");
    script.say(json!({"step": "training"})).await;
    let done = script.expect("job_seen", 60).await;
    let trained = tokio::time::timeout(Duration::from_secs(60), train.wait_with_output())
        .await
        .expect("training finishes")
        .expect("train output");
    assert!(
        trained.status.success(),
        "train failed: {}\n{}",
        String::from_utf8_lossy(&trained.stdout),
        String::from_utf8_lossy(&trained.stderr)
    );
    assert!(done["points"].as_u64().is_some_and(|n| n >= 3), "{done}");
    script.say(json!({"step": "trained"})).await;

    let end = script.expect("done", 90).await;
    assert_eq!(end["problems"], json!([]), "console errors or CSP violations in the page");
    let status = script.child.wait().await.expect("script exit");
    assert!(status.success(), "browser script failed: {status}");
    for name in [
        "01-signin",
        "02-rooms-empty",
        "03-room-empty",
        "04-invite-shown-once",
        "05-worker-token-shown-once",
        "06-worker-joined",
        "07-job-loss-chart",
        "08-registry",
        "09-room-narrow",
        "10-signin-jwt",
        "11-account-key-room",
    ] {
        let p = shots.join(format!("{name}.png"));
        assert!(std::fs::metadata(&p).is_ok_and(|m| m.len() > 1000), "missing screenshot {}", p.display());
    }
    eprintln!("browser suite took {:.1} s; screenshots in {}", started.elapsed().as_secs_f64(), shots.display());
}
