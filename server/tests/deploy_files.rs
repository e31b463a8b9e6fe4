//! The deployment files under `deploy/`: the Kubernetes manifests against the Kubernetes JSON
//! schemas (kubernetes-validate, strict: unknown fields are errors), the Dockerfiles through
//! hadolint, and both through `deploy/check.py`, the project's own rules (non-root images, a
//! health check, pinned bases, a GPU and a Secret token for workers, mounts listed in
//! SLEAP_RTC_MOUNTS, WebSocket-friendly ingress...). All three tools come from the test venv
//! (server/tests/py/requirements.txt) and run offline. Plus the image's health probe,
//! `sleap-rtc-server --health-check`, against a real server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the server crate is inside the repository").to_path_buf()
}

/// An executable the test venv installs next to its interpreter.
fn venv_tool(name: &str) -> PathBuf {
    let py = python();
    let tool = Path::new(&py).with_file_name(name);
    assert!(tool.exists(), "{name} is not in the test venv ({}); run ./scripts/test.sh", tool.display());
    tool
}

fn run(cmd: &mut Command) -> Output {
    cmd.current_dir(repo()).output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn files_under(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display()));
        for entry in entries {
            let path = entry.unwrap_or_else(|e| panic!("read {}: {e}", d.display())).path();
            if path.is_dir() {
                stack.push(path);
            } else if keep(&path) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn kubernetes_manifests_match_the_kubernetes_schemas() {
    // kustomization.yaml is kustomize's file, not a resource: deploy/check.py checks it.
    let manifests = files_under(&repo().join("deploy/k8s"), &|p| {
        p.extension().is_some_and(|e| e == "yaml") && p.file_name().is_some_and(|n| n != "kustomization.yaml")
    });
    assert!(manifests.len() >= 10, "only {} manifests under deploy/k8s", manifests.len());
    let out = run(Command::new(venv_tool("kubernetes-validate")).arg("--strict").args(&manifests));
    let report = text(&out);
    assert!(out.status.success(), "kubernetes-validate rejected a manifest:\n{report}");
    // Every file was really checked against a schema: a kind it has no schema for is only a
    // warning, which would let a typo in `kind` or `apiVersion` through.
    assert!(!report.contains("WARN") && !report.contains("ERROR"), "kubernetes-validate:\n{report}");
    for m in &manifests {
        let rel = m.strip_prefix(repo()).unwrap_or(m).display().to_string();
        assert!(report.contains(&format!("{rel} passed")), "{rel} was not validated:\n{report}");
    }
}

#[test]
fn dockerfiles_pass_hadolint() {
    let dockerfiles = files_under(&repo().join("deploy/docker"), &|p| {
        p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".Dockerfile"))
    });
    assert_eq!(dockerfiles.len(), 2, "expected the server and worker Dockerfiles: {dockerfiles:?}");
    // Any finding fails, down to `info`; a deliberate exception is an inline `# hadolint ignore=`.
    let out =
        run(Command::new(venv_tool("hadolint")).args(["--no-color", "--failure-threshold", "info"]).args(&dockerfiles));
    assert!(out.status.success(), "hadolint:\n{}", text(&out));
}

#[test]
fn deployment_files_follow_the_project_rules() {
    let out = run(Command::new(python()).arg("deploy/check.py"));
    assert!(out.status.success(), "deploy/check.py:\n{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_mode_probes_a_running_server() {
    const BIN: &str = env!("CARGO_BIN_EXE_sleap-rtc-server");
    let s = start().await;
    let addr = s.http.trim_start_matches("http://").to_owned();
    let probe = |args: &[&str], listen: Option<&str>| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("--health-check").args(args).env_remove("SLEAP_RTC_LISTEN");
        if let Some(l) = listen {
            cmd.env("SLEAP_RTC_LISTEN", l);
        }
        cmd.output().expect("run sleap-rtc-server --health-check")
    };
    let ok = probe(&[&format!("{}/health", s.http)], None);
    assert!(ok.status.success(), "{}", text(&ok));
    // Without a URL it probes the first SLEAP_RTC_LISTEN address, as the image's HEALTHCHECK does.
    let port = addr.rsplit(':').next().unwrap_or_default();
    let ok = probe(&[], Some(&format!("0.0.0.0:{port}")));
    assert!(ok.status.success(), "{}", text(&ok));
    let not_health = probe(&[&format!("{}/no-such-path", s.http)], None);
    assert_eq!(not_health.status.code(), Some(1), "{}", text(&not_health));
    assert!(text(&not_health).contains("answered 404"), "{}", text(&not_health));

    s.stop().await;
    let down = probe(&[&format!("http://{addr}/health")], None);
    assert_eq!(down.status.code(), Some(1), "{}", text(&down));
    assert!(text(&down).starts_with("unhealthy: "), "{}", text(&down));
}
