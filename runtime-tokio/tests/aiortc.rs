//! Interop with a WebRTC stack we did not write: aiortc (Python), driven by
//! `tests/py/aiortc_peer.py` from the venv that `scripts/test.sh` prepares
//! (`SLEAP_RTC_TEST_PYTHON`). Both peers meet through the real signaling server on 127.0.0.1 and
//! exchange files in both directions, each side in the role it would have in production:
//! aiortc as the offering client sending to our worker, and our client offering to an aiortc
//! worker and sending to it. Files must arrive byte-identical and verified.

mod common;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use common::{Env, env, next_offer, write_random};
use serde_json::Value;
use sleap_rtc_tokio::{PeerOptions, accept, connect};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// How long one Python peer run may take, start-up (importing aiortc) included.
const PY_TIMEOUT: Duration = Duration::from_secs(60);

/// Arguments that register the Python peer as a client of the room.
fn py_client_args(e: &Env) -> Vec<String> {
    vec!["--ws".into(), e.ws.clone(), "--jwt".into(), e.jwt.clone(), "--room".into(), e.room.clone()]
}

/// Arguments that register the Python peer as the room's worker.
fn py_worker_args(e: &Env) -> Vec<String> {
    vec!["--ws".into(), e.ws.clone(), "--api-key".into(), e.token.clone()]
}

/// The interpreter with the test venv's packages. A missing venv is a set-up error, not a pass.
fn python() -> String {
    if let Ok(p) = std::env::var("SLEAP_RTC_TEST_PYTHON") {
        return p;
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = format!("{home}/.cache/sleap-rtc/venv/bin/python");
    assert!(
        Path::new(&p).exists(),
        "no Python test venv: run ./scripts/test.sh once (it creates {p}) or set SLEAP_RTC_TEST_PYTHON"
    );
    p
}

/// A running `aiortc_peer.py`. Its stderr is collected in the background and shown in every
/// failure message; the process is killed if the test ends early.
struct PyPeer {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
}

impl PyPeer {
    fn spawn(args: Vec<String>) -> PyPeer {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/aiortc_peer.py");
        let mut child = tokio::process::Command::new(python())
            .arg(script)
            .args(&args)
            .arg("--timeout")
            .arg(PY_TIMEOUT.as_secs().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the Python peer");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut err = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s).await;
            s
        });
        PyPeer { child, stdout, stderr }
    }

    /// Next JSON line on the peer's stdout; panics (with its stderr) on EOF or timeout.
    async fn next_json(&mut self) -> Value {
        match tokio::time::timeout(PY_TIMEOUT, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("Python peer printed a non-JSON line {line:?}: {e}")),
            other => {
                let _ = self.child.start_kill();
                let stderr = self.stderr_text().await;
                let hint = if stderr.contains("ModuleNotFoundError") {
                    "\nthe venv lacks a package of server/tests/py/requirements.txt: run ./scripts/test.sh"
                } else {
                    ""
                };
                panic!("Python peer stopped talking ({other:?}); its stderr:\n{stderr}{hint}")
            }
        }
    }

    /// Waits for the `registered` line and returns the peer id the server gave it.
    async fn registered(&mut self) -> String {
        let v = self.next_json().await;
        match (v["event"].as_str(), v["peer_id"].as_str()) {
            (Some("registered"), Some(id)) => id.to_owned(),
            _ => {
                let _ = self.child.start_kill();
                panic!("Python peer did not register: {v}\nstderr:\n{}", self.stderr_text().await)
            }
        }
    }

    /// Waits for the final `result` line and the exit; returns (status, result, stderr).
    async fn finish(mut self) -> (ExitStatus, Value, String) {
        let result = self.next_json().await;
        let status = match tokio::time::timeout(PY_TIMEOUT, self.child.wait()).await {
            Ok(s) => s.expect("wait for the Python peer"),
            Err(_) => {
                let _ = self.child.start_kill();
                panic!("Python peer did not exit after its result; stderr:\n{}", self.stderr_text().await)
            }
        };
        let stderr = self.stderr_text().await;
        (status, result, stderr)
    }

    /// Everything the peer wrote to stderr (it must have exited or be killed first).
    async fn stderr_text(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(10), &mut self.stderr).await {
            Ok(Ok(s)) => s,
            _ => "(stderr unavailable)".into(),
        }
    }
}

/// A source tree with one directory (nested, with an empty file) and one big file. Returns the
/// paths to send and the relative names every receiver must end up with. The big file goes
/// last, so the receiver is still renaming it into place when it has already told the sender
/// `transfer_complete` (aiortc then closes at once: the receiver must still finish cleanly).
fn source_tree(root: &Path, big: usize, seed: u64) -> (Vec<PathBuf>, Vec<&'static str>) {
    write_random(&root.join("labels.pkg.slp"), big, seed);
    std::fs::create_dir_all(root.join("cfg/sub")).unwrap();
    std::fs::write(root.join("cfg/config.yaml"), b"trainer: {max_epochs: 3}\n").unwrap();
    write_random(&root.join("cfg/sub/init.ckpt"), 200_000, seed + 1);
    std::fs::write(root.join("cfg/sub/empty"), b"").unwrap();
    let names = vec!["labels.pkg.slp", "cfg/config.yaml", "cfg/sub/empty", "cfg/sub/init.ckpt"];
    (vec![root.join("cfg"), root.join("labels.pkg.slp")], names)
}

fn assert_same_files(src: &Path, dst: &Path, names: &[&str]) {
    for rel in names {
        let a = std::fs::read(src.join(rel)).unwrap();
        let b = std::fs::read(dst.join(rel)).unwrap_or_else(|e| panic!("{rel} missing on the receiver: {e}"));
        assert!(a == b, "{rel}: {} bytes sent, {} bytes received, contents differ", a.len(), b.len());
        assert!(!dst.join(format!("{rel}.part")).exists(), "{rel}.part left behind");
    }
}

fn total_size(root: &Path, names: &[&str]) -> u64 {
    names.iter().map(|n| std::fs::metadata(root.join(n)).unwrap().len()).sum()
}

/// aiortc offers (creating `ctl` and `bulk`), our worker answers; aiortc sends a file and a
/// directory, our worker receives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_client_offers_and_sends_files_to_our_worker() {
    let e = env().await;
    let worker_sig = e.worker().await;
    let src = tempfile::tempdir().unwrap();
    let (paths, names) = source_tree(src.path(), 3 * 1024 * 1024 + 12_345, 11);

    let mut args = py_client_args(&e);
    args.extend(["--offer-to".into(), worker_sig.peer_id().to_owned(), "--send".into()]);
    args.extend(paths.iter().map(|p| p.display().to_string()));
    let mut py = PyPeer::spawn(args);
    let py_id = py.registered().await;

    let offer = next_offer(&worker_sig).await;
    let worker = accept(&worker_sig, &offer, PeerOptions::loopback()).await;
    let worker = match worker {
        Ok(w) => w,
        Err(err) => {
            let (_, result, stderr) = py.finish().await;
            panic!("our worker could not accept aiortc's offer: {err}\nPython result: {result}\nstderr:\n{stderr}")
        }
    };
    assert_eq!(worker.remote_peer(), py_id);
    assert!(worker.remote_fingerprint().is_some_and(|f| f.starts_with("sha-256 ")), "DTLS fingerprint of aiortc");

    let dst = tempfile::tempdir().unwrap();
    let incoming = worker.receive_files(dst.path()).unwrap();
    let received = tokio::time::timeout(PY_TIMEOUT, incoming.finish()).await;
    let (status, result, stderr) = py.finish().await;
    eprintln!("aiortc peer: {result}");
    let received = received
        .unwrap_or_else(|_| panic!("the transfer did not finish; Python said {result}\nstderr:\n{stderr}"))
        .unwrap_or_else(|err| panic!("receiving failed: {err}; Python said {result}\nstderr:\n{stderr}"));

    assert!(received.failed.is_empty(), "{received:?}");
    let mut got: Vec<String> =
        received.files.iter().map(|p| p.strip_prefix(dst.path()).unwrap().to_string_lossy().into_owned()).collect();
    got.sort();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want);
    assert_same_files(src.path(), dst.path(), &names);

    assert!(status.success(), "Python sender exited with {status}: {result}\nstderr:\n{stderr}");
    assert_eq!(result["ok"], true, "{result}\nstderr:\n{stderr}");
    assert_eq!(result["bytes"], total_size(src.path(), &names), "{result}");
    assert_eq!(result["files"].as_array().map(Vec::len), Some(names.len()), "{result}");
    // Several MiB cannot fit under the 1 MiB high watermark: the sender must have waited for
    // aiortc to drain instead of queueing everything in memory.
    assert!(result["stalls"].as_u64().is_some_and(|n| n > 0), "{result}");

    worker.close().await;
    e.server.shutdown().await;
}

/// Our client offers to an aiortc worker (which learns `ctl` and `bulk` from DCEP) and sends it
/// a file and a directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_offers_and_sends_files_to_an_aiortc_worker() {
    let e = env().await;
    let dst = tempfile::tempdir().unwrap();
    let mut args = py_worker_args(&e);
    args.extend(["--answer".into(), "--receive".into(), dst.path().display().to_string()]);
    let mut py = PyPeer::spawn(args);
    let py_id = py.registered().await;

    let client_sig = e.client().await;
    let client = match connect(&client_sig, &py_id, PeerOptions::loopback()).await {
        Ok(c) => c,
        Err(err) => {
            let (_, result, stderr) = py.finish().await;
            panic!("our client could not connect to aiortc: {err}\nPython result: {result}\nstderr:\n{stderr}")
        }
    };
    assert!(client.remote_fingerprint().is_some_and(|f| f.starts_with("sha-256 ")), "DTLS fingerprint of aiortc");

    let src = tempfile::tempdir().unwrap();
    let (paths, names) = source_tree(src.path(), 4 * 1024 * 1024 + 777, 23);
    let sent = client.send_files(&paths).await.unwrap();
    let sent = tokio::time::timeout(PY_TIMEOUT, sent.finish()).await;
    client.close().await;
    let (status, result, stderr) = py.finish().await;
    eprintln!("aiortc peer: {result}");
    let sent = sent
        .unwrap_or_else(|_| panic!("the transfer did not finish; Python said {result}\nstderr:\n{stderr}"))
        .unwrap_or_else(|err| panic!("sending failed: {err}; Python said {result}\nstderr:\n{stderr}"));

    assert!(status.success(), "Python receiver exited with {status}: {result}\nstderr:\n{stderr}");
    assert_eq!(result["ok"], true, "{result}\nstderr:\n{stderr}");
    assert!(sent.failed.is_empty(), "{sent:?}");
    let total = total_size(src.path(), &names);
    assert_eq!((sent.bytes, sent.resumed_bytes), (total, 0));
    assert_eq!(result["bytes"], total, "{result}");
    assert_eq!(result["transfer_id"], sent.transfer_id, "{result}");
    assert_same_files(src.path(), dst.path(), &names);
    e.server.shutdown().await;
}
