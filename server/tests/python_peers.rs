//! Interop with upstream-style Python peers (the `websockets` library), run by the venv that
//! `scripts/test.sh` prepares (`SLEAP_RTC_TEST_PYTHON`).

mod common;

use std::process::Command;

#[tokio::test]
async fn upstream_python_clients_complete_both_flows() {
    let s = common::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/upstream_client.py");
    let base = s.http.clone();
    let out = tokio::task::spawn_blocking(move || Command::new(common::python()).arg(script).arg(base).output())
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
