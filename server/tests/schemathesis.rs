//! The HTTP API against its own OpenAPI description (`/openapi.json`, generated from the
//! handlers), fuzzed by schemathesis (PyPI) from the test venv: no 5xx anywhere, every status
//! and body the server returns is one the description documents, schema-valid requests are
//! accepted and schema-violating ones refused, requests without credentials get 401, and the
//! stateful phase chains create → read → delete through real rooms, tokens and keys.
//!
//! `/ws` is left out: it is the WebSocket endpoint (its plain-HTTP answer, 426, is documented
//! and tested in `flow.rs`); upstream's two removed endpoints are marked deprecated and answer
//! 410 (tested in `upstream_weaknesses.rs`).

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_conforms_to_its_openapi_description() {
    let s = start_with(|c| {
        // Enough sign-ins for the run; the limit itself (429) is documented and tested elsewhere.
        c.auth_rate_per_min = 100_000.0;
    })
    .await;
    let (jwt, _) = s.signin().await;
    // A room the caller owns, so reads of rooms/members/workers reach real data.
    s.room(&jwt).await;

    let py = python();
    let st = std::path::Path::new(&py).with_file_name("schemathesis");
    assert!(st.exists(), "schemathesis is not in the test venv ({}); run ./scripts/test.sh", st.display());
    let examples = std::env::var("SLEAP_RTC_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "40".into());
    let out = tokio::process::Command::new(&st)
        .args(["run", &format!("{}/openapi.json", s.http)])
        .args(["--header", &format!("Authorization: Bearer {jwt}")])
        .args(["--checks", "all", "--max-examples", &examples, "--seed", "20261122"])
        .args(["--exclude-deprecated", "--exclude-path", "/ws", "--no-color"])
        // Only our own hooks: the generator of the one string format no pattern can describe.
        .env("SCHEMATHESIS_HOOKS", concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/schemathesis_hooks.py"))
        .current_dir(s.dir.path())
        .output()
        .await
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis found problems:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // It must really have exercised the API, not skipped it: every selected operation tested,
    // and thousands of requests.
    let number_after = |key: &str| -> u64 {
        let line = stdout.lines().find(|l| l.contains(key)).unwrap_or_default();
        let rest = &line[line.find(key).map_or(0, |i| i + key.len())..];
        rest.trim().split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let (selected, tested) = (number_after("Selected:"), number_after("Tested:"));
    assert!(tested >= 20 && tested == selected, "{tested} of {selected} operations tested:\n{stdout}");
    let generated = stdout.lines().find(|l| l.contains(" generated, ")).unwrap_or_default();
    let n: u64 = generated.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(n >= 500, "only {n} requests generated:\n{stdout}");
    eprintln!("schemathesis: {tested} operations, {}", generated.trim());
    s.stop().await;
}
