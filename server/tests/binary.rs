//! The `sleap-rtc-server` binary as a user runs it: `--help`, start-up, SIGTERM drain.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{ServerProcess, Ws};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_sleap-rtc-server");

#[test]
fn help_documents_every_flag_and_its_environment_variable() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .filter(|f| !matches!(*f, "help" | "version"))
        .collect();
    assert!(flags.len() >= 15, "{help}");
    for f in &flags {
        let env = format!("SLEAP_RTC_{}", f.to_uppercase().replace('-', "_"));
        let env = match env.as_str() {
            "SLEAP_RTC_ICE_SERVER" => "SLEAP_RTC_ICE_SERVERS".to_owned(),
            "SLEAP_RTC_ALLOWED_ORIGIN" => "SLEAP_RTC_ALLOWED_ORIGINS".to_owned(),
            "SLEAP_RTC_TURN_URL" => "SLEAP_RTC_TURN_URLS".to_owned(),
            _ => env,
        };
        assert!(help.contains(&format!("[env: {env}")), "--{f} lacks its env var {env}:\n{help}");
    }
}

#[test]
fn bad_turn_settings_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--data-dir", &data])
            .args(args)
            .env_remove("SLEAP_RTC_TURN_SECRET_FILE")
            .env_remove("SLEAP_RTC_TURN_URLS")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A relay without its secret (or the reverse) is refused before anything starts.
    let err = run(&["--turn-url", "turn:relay.example.org:3478"]);
    assert!(err.contains("--turn-secret-file"), "{err}");
    let missing = dir.path().join("no-such-secret");
    let err = run(&["--turn-url", "turn:relay.example.org", "--turn-secret-file", missing.to_str().unwrap()]);
    assert!(err.contains("no-such-secret"), "names the file: {err}");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let err = run(&["--turn-url", "stun:relay.example.org", "--turn-secret-file", secret.to_str().unwrap()]);
    assert!(err.contains("not a turn: or turns: URL"), "{err}");
    std::fs::write(&secret, "\n").unwrap();
    let err = run(&["--turn-url", "turn:relay.example.org", "--turn-secret-file", secret.to_str().unwrap()]);
    assert!(err.contains("secret is empty"), "{err}");
}

#[test]
fn bad_listen_address_is_a_clear_error() {
    let out = Command::new(BIN).args(["--listen", "not-an-address"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--listen"), "{err}");
}

#[tokio::test]
async fn sigterm_drains_connections_and_exits_cleanly() {
    let mut s = ServerProcess::spawn(&[]).await;
    let (jwt, room) = s.signin_and_room().await;
    let mut ws = Ws::connect(&s.ws_url()).await;
    ws.register(json!({"type": "register", "jwt": jwt, "room_id": room})).await;

    let status = Command::new("kill").args(["-TERM", &s.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(ws.closed().await, 1001, "peers are told the server is going away");
    let started = Instant::now();
    let code = loop {
        if let Some(code) = s.child.try_wait().unwrap() {
            break code;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "server did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(code.success(), "exit status {code:?}");
}

/// B27: nothing in the environment is needed (no secrets passed in, no fixed ports, no cloud
/// role): the binary starts from an empty environment on whatever port it is given and creates
/// its own key and database. (That it needs no root cannot be shown here, where CI runs as root;
/// it opens no privileged port and changes no system setting beyond its own file-descriptor limit.)
#[tokio::test]
async fn b27_starts_from_an_empty_environment_on_any_port() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .env_clear()
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut l = String::new();
        BufReader::new(stdout).read_line(&mut l).unwrap();
        l
    })
    .await
    .unwrap();
    let addr = line.trim().strip_prefix("listening on ").expect("listening line").to_owned();
    let health = reqwest::get(format!("http://{addr}/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(dir.path().join("jwt-ed25519.pem").exists() && dir.path().join("sleap-rtc.sqlite").exists());
    let _ = child.kill();
    let _ = child.wait();
}
