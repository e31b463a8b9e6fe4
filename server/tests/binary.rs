//! The `sleap-rtc-server` binary as a user runs it: `--help`, start-up, SIGTERM drain.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Ws;
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
            _ => env,
        };
        assert!(help.contains(&format!("[env: {env}")), "--{f} lacks its env var {env}:\n{help}");
    }
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
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("SLEAP_RTC_LOG", "warn")
        .stdout(Stdio::piped())
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
    let http = reqwest::Client::new();
    let signin: serde_json::Value =
        http.post(format!("http://{addr}/anonymous-signin")).send().await.unwrap().json().await.unwrap();
    let jwt = signin["jwt"].as_str().unwrap();
    let room: serde_json::Value = http
        .post(format!("http://{addr}/api/auth/rooms"))
        .bearer_auth(jwt)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ws = Ws::connect(&format!("ws://{addr}/ws")).await;
    ws.register(json!({"type": "register", "jwt": jwt, "room_id": room["room_id"]})).await;

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(ws.closed().await, 1001, "peers are told the server is going away");
    let started = Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "server did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(code.success(), "exit status {code:?}");
}
