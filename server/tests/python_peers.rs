//! Interop with upstream-style Python peers (the `websockets` library), run by the venv that
//! `scripts/test.sh` prepares (`SLEAP_RTC_TEST_PYTHON`).

mod common;

use std::process::Command;

/// The interpreter with the test venv's packages. Missing venv is a set-up error, not a pass.
fn python() -> String {
    if let Ok(p) = std::env::var("SLEAP_RTC_TEST_PYTHON") {
        return p;
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = format!("{home}/.cache/sleap-rtc/venv/bin/python");
    assert!(
        std::path::Path::new(&p).exists(),
        "no Python test venv: run ./scripts/test.sh once (it creates {p}) or set SLEAP_RTC_TEST_PYTHON"
    );
    p
}

#[tokio::test]
async fn upstream_python_clients_complete_both_flows() {
    let s = common::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/upstream_client.py");
    let base = s.http.clone();
    let out = tokio::task::spawn_blocking(move || Command::new(python()).arg(script).arg(base).output())
        .await
        .unwrap()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.stop().await;
}
