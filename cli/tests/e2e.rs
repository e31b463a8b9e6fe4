//! Remote training and inference end to end, with real processes on 127.0.0.1: the signaling
//! server, a `sleap-rtc worker` driving the fake sleap-nn over real ZMQ, and `sleap-rtc train` /
//! `track` / `job attach` clients over real WebRTC.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn hash(p: &std::path::Path) -> String {
    // Length and head are enough to tell files apart here; full equality is checked below.
    assert!(p.is_file(), "{}", p.display());
    std::fs::read(p).map(|b| b.len().to_string() + &format!("{:?}", &b[..b.len().min(64)])).unwrap()
}

fn journal(env: &Env, work_dir: &str, job: &str) -> Value {
    let p = env.path(work_dir).join("jobs").join(job).join("job.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_then_track_success() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let cfg = env.config("cfg.yaml", "");
    let (code, events, err) = Client::spawn(&env, &env.train_args(&cfg, "out")).finish(60).await;
    assert_eq!(code, 0, "{err}\n{events:#?}");
    let d = done(&events);
    assert_eq!(d["state"], "completed");
    let job = event(&events, "accepted").unwrap()["job_id"].as_str().unwrap().to_owned();
    assert!(events.iter().any(is_epoch_end), "epoch progress relayed");
    assert!(events.iter().any(|e| e["progress"]["event"] == "train_end"));
    // The run directory came back byte for byte.
    let run = env.path("out/single_instance");
    let worker_run = env.path("w/jobs").join(&job).join("runs/single_instance");
    for f in ["best.ckpt", "last.ckpt", "training_config.yaml", "training_log.csv"] {
        assert_eq!(hash(&run.join(f)), hash(&worker_run.join(f)), "{f}");
    }
    assert_eq!(journal(&env, "w", &job)["status"]["state"], "completed");

    // Inference with the model that came back.
    let preds = env.path("preds/p.slp");
    let args = env.track_args(run.to_str().unwrap(), &preds);
    let (code, events, err) = Client::spawn(&env, &args).finish(60).await;
    assert_eq!(code, 0, "{err}\n{events:#?}");
    assert!(events.iter().any(|e| e["progress"]["event"] == "inference" && e["progress"]["n_total"] == 16));
    let bytes = std::fs::read(&preds).unwrap();
    assert!(bytes.starts_with(b"FAKE-SLP-PREDICTIONS"), "predictions written at -o");
    let up = event(&events, "uploaded").unwrap();
    assert!(up["resumed_bytes"].as_u64().unwrap() > 0, "the labels were already on the worker: {up}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainer_failure_is_reported_with_its_output() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let cfg = env.config("cfg.yaml", "mode=fail fail_after_epochs=1");
    let (code, events, _) = Client::spawn(&env, &env.train_args(&cfg, "out")).finish(60).await;
    assert_eq!(code, 1);
    let d = done(&events);
    assert_eq!(d["state"], "failed");
    let msg = d["message"].as_str().unwrap();
    assert!(msg.contains("exited with code 1") && msg.contains("Error"), "{msg}");
    assert!(d["results"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rc0_without_train_end_or_checkpoint_is_not_success() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    for (mode, why) in [("no_train_end", "never reported"), ("no_ckpt", "no best.ckpt")] {
        let cfg = env.config(&format!("{mode}.yaml"), &format!("mode={mode}"));
        let (code, events, _) = Client::spawn(&env, &env.train_args(&cfg, mode)).finish(60).await;
        assert_eq!(code, 1, "{mode}");
        let d = done(&events);
        assert_eq!(d["state"], "failed");
        assert!(d["message"].as_str().unwrap().contains(why), "{mode}: {d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_once_stops_early_and_returns_the_model() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let cfg = env.config("cfg.yaml", "batch_ms=150 steps=4");
    let mut args = env.train_args(&cfg, "out");
    args.extend(["--max-epochs".into(), "50".into()]);
    let mut c = Client::spawn(&env, &args);
    c.until(60, is_epoch_end).await;
    c.signal(SIGINT);
    let (code, events, err) = c.finish(60).await;
    assert_eq!(code, 0, "{err}");
    let d = done(&events);
    assert_eq!(d["state"], "stopped_early");
    let epochs = events.iter().filter(|e| is_epoch_end(e)).count();
    assert!(epochs < 10, "stopped long before 50 epochs ({epochs})");
    assert!(env.path("out/single_instance/best.ckpt").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_twice_cancels_and_kills_the_trainer() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let cfg = env.config("cfg.yaml", "batch_ms=300 steps=10");
    let mut args = env.train_args(&cfg, "out");
    args.extend(["--max-epochs".into(), "50".into()]);
    let mut c = Client::spawn(&env, &args);
    let job = c.until(60, |e| e["event"] == "accepted").await["job_id"].as_str().unwrap().to_owned();
    c.until(60, |e| e["progress"]["event"] == "batch").await;
    c.signal(SIGINT);
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.signal(SIGINT);
    let (code, events, err) = c.finish(60).await;
    assert_eq!(code, 130, "{err}");
    assert_eq!(done(&events)["state"], "cancelled");
    let j = journal(&env, "w", &job);
    assert_eq!(j["status"]["state"], "cancelled");
    // The trainer's process group is gone.
    let pid = j["trainer_pid"].as_u64();
    if let Some(pid) = pid {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).map(|c| c.contains(&job)).unwrap_or(false);
        assert!(!alive, "trainer still running");
    }
    assert!(!env.path("out/single_instance").exists(), "a cancelled job returns nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_rejects_a_second_job_and_reports_busy() {
    let env = env().await;
    // No queue: one job at a time, as before queues.
    let _w = env.worker("w", &["--queue", "0"], "").await;
    let wid = env.worker_id(&env.path("w"));
    let slow = env.config("slow.yaml", "batch_ms=200 steps=5");
    let mut first = Client::spawn(&env, &env.train_args(&slow, "out1"));
    first.until(60, |e| e["event"] == "state" && e["state"] == "running").await;
    // The room sees it busy.
    let mut status = None;
    for _ in 0..40 {
        status = env.worker_status(&wid).await;
        if status.as_deref() == Some("busy") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status.as_deref(), Some("busy"));
    let quick = env.config("quick.yaml", "");
    let mut args = env.train_args(&quick, "out2");
    args.extend(["--worker".into(), wid.clone()]);
    let (code, events, _) = Client::spawn(&env, &args).finish(30).await;
    assert_eq!(code, 2);
    let r = event(&events, "rejected").expect("rejected");
    assert_eq!(r["errors"][0]["code"], "BUSY");
    assert!(r["errors"][0]["message"].as_str().unwrap().contains("busy"));
    // Auto-selection says so without connecting.
    let (code, _, err) = Client::spawn(&env, &env.train_args(&quick, "out3")).finish(30).await;
    assert_eq!(code, 1);
    assert!(err.contains("busy"), "{err}");
    first.signal(SIGKILL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_then_attach_follows_and_fetches_results() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let cfg = env.config("cfg.yaml", "batch_ms=100 steps=5");
    let mut args = env.train_args(&cfg, "out");
    args.extend(["--max-epochs".into(), "4".into()]);
    let mut c = Client::spawn(&env, &args);
    let job = c.until(60, |e| e["event"] == "accepted").await["job_id"].as_str().unwrap().to_owned();
    c.until(60, is_epoch_end).await;
    c.signal(SIGKILL);
    let _ = c.finish(10).await;
    // The job goes on without the client.
    let attach: Vec<String> =
        ["job", "attach", &job, "--bind", "127.0.0.1", "--json"].iter().map(|s| s.to_string()).collect();
    let (code, events, err) = Client::spawn(&env, &attach).finish(60).await;
    assert_eq!(code, 0, "{err}\n{events:#?}");
    assert!(event(&events, "status").is_some());
    assert_eq!(done(&events)["state"], "completed");
    assert!(env.path("out/single_instance/best.ckpt").is_file(), "results fetched into the recorded output");
    // Attaching again to a finished job fetches again.
    std::fs::remove_dir_all(env.path("out/single_instance")).unwrap();
    let (code, _, err) = Client::spawn(&env, &attach).finish(60).await;
    assert_eq!(code, 0, "{err}");
    assert!(env.path("out/single_instance/best.ckpt").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_restart_keeps_finished_results_and_fails_interrupted_jobs() {
    let env = env().await;
    let mut w = env.worker("w", &[], "").await;
    let wid = env.worker_id(&env.path("w"));
    let cfg = env.config("cfg.yaml", "");
    let (code, events, _) = Client::spawn(&env, &env.train_args(&cfg, "done")).finish(60).await;
    assert_eq!(code, 0);
    let finished = event(&events, "accepted").unwrap()["job_id"].as_str().unwrap().to_owned();
    let slow = env.config("slow.yaml", "batch_ms=300 steps=10");
    let mut c = Client::spawn(&env, &env.train_args(&slow, "running"));
    let running = c.until(60, |e| e["event"] == "accepted").await["job_id"].as_str().unwrap().to_owned();
    c.until(60, |e| e["progress"]["event"] == "batch").await;
    w.start_kill().unwrap();
    let _ = w.wait().await;
    let (code, _, _) = c.finish(60).await;
    assert_eq!(code, 3, "the client is told the connection was lost");
    env.wait_gone(&wid).await;
    let _w2 = env.worker("w", &[], "").await;
    assert_eq!(env.worker_id(&env.path("w")), wid, "same peer id after a restart");
    let j = journal(&env, "w", &running);
    assert_eq!(j["status"]["state"], "failed");
    assert!(j["status"]["message"].as_str().unwrap().contains("restarted"));
    // The orphaned trainer was ended.
    if let Some(pid) = j["trainer_pid"].as_u64() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let alive =
            std::fs::read_to_string(format!("/proc/{pid}/cmdline")).map(|c| c.contains(&running)).unwrap_or(false);
        assert!(!alive, "orphaned trainer still running");
    }
    let attach = |job: &str| -> Vec<String> {
        ["job", "attach", job, "--bind", "127.0.0.1", "--json"].iter().map(|s| s.to_string()).collect()
    };
    let (code, events, _) = Client::spawn(&env, &attach(&running)).finish(60).await;
    assert_eq!(code, 1);
    assert_eq!(done(&events)["state"], "failed");
    std::fs::remove_dir_all(env.path("done")).unwrap();
    let (code, _, err) = Client::spawn(&env, &attach(&finished)).finish(60).await;
    assert_eq!(code, 0, "{err}");
    assert!(env.path("done/single_instance/best.ckpt").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_rejected_with_field_errors() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let cfg = env.config("cfg.yaml", "");
    // Caught locally: nothing is uploaded.
    let plain = env.path("labels.slp");
    std::fs::write(&plain, b"not a package").unwrap();
    let mut args = env.train_args(&cfg, "out");
    args[4] = plain.display().to_string();
    let (code, _, err) = Client::spawn(&env, &args).finish(30).await;
    assert_eq!(code, 2);
    assert!(err.contains(".pkg.slp"), "{err}");
    let mut args = env.train_args(&cfg, "out");
    args.extend(["--max-epochs".into(), "0".into()]);
    let (code, _, err) = Client::spawn(&env, &args).finish(30).await;
    assert_eq!(code, 2);
    assert!(err.contains("max_epochs"), "{err}");
    // Caught by the worker: a worker path outside its mounts (it has none).
    let mut args = env.train_args(&cfg, "out");
    args[4] = "worker:/etc/passwd".into();
    let (code, events, _) = Client::spawn(&env, &args).finish(30).await;
    assert_eq!(code, 2);
    let r = event(&events, "rejected").unwrap();
    assert_eq!(r["errors"][0]["field"], "labels_path");
    assert_eq!(r["errors"][0]["code"], "NOT_ALLOWED");
    // A config that is not a sleap-nn config.
    let bad = env.path("bad.yaml");
    std::fs::write(&bad, "just: [a, list\n").unwrap();
    let mut args = env.train_args(&bad, "out");
    args[2] = bad.display().to_string();
    let (code, _, err) = Client::spawn(&env, &args).finish(30).await;
    assert_eq!(code, 2);
    assert!(err.contains("Failed to parse"), "{err}");
    assert!(std::fs::read_dir(env.path("w/jobs")).unwrap().next().is_none(), "the worker ran nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_failure_carries_sleap_nn_error_line() {
    let env = env().await;
    let _w = env.worker("w", &[], "mode=fail").await;
    let model = env.path("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("best.ckpt"), b"x").unwrap();
    std::fs::write(model.join("training_config.yaml"), b"x: 1").unwrap();
    let args = env.track_args(model.to_str().unwrap(), &env.path("p.slp"));
    let (code, events, _) = Client::spawn(&env, &args).finish(60).await;
    assert_eq!(code, 1);
    let d = done(&events);
    assert_eq!(d["state"], "failed");
    assert!(d["message"].as_str().unwrap().starts_with("RuntimeError"), "{d}");
    assert!(!env.path("p.slp").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signaling_outage_touches_neither_the_job_nor_its_client() {
    let mut env = env().await;
    let _w = env.worker("w", &[], "").await;
    let wid = env.worker_id(&env.path("w"));
    let cfg = env.config("cfg.yaml", "batch_ms=100 steps=5");
    let mut args = env.train_args(&cfg, "out");
    args.extend(["--max-epochs".into(), "8".into()]);
    let mut c = Client::spawn(&env, &args);
    c.until(60, is_epoch_end).await;
    env.restart_server(Duration::from_millis(1500)).await;
    let (code, events, err) = c.finish(60).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(done(&events)["state"], "completed");
    assert_eq!(events.iter().filter(|e| is_epoch_end(e)).count(), 8, "every epoch relayed across the outage");
    // The worker registers again on its own (backoff 1 s, 2 s, ...).
    let mut back = false;
    for _ in 0..200 {
        if env.worker_ids().await.contains(&wid) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "worker re-registered after the outage");
}

/// One HTTP request's body, read from a plain TCP accept (the webhook receiver), answered 200.
async fn http_body(listener: &tokio::net::TcpListener) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut s, _) = listener.accept().await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "request cut short: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= len {
                assert!(head.starts_with("POST /hook/secret-part "), "{head}");
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await.unwrap();
                return serde_json::from_str(&body[..len]).unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_announced_and_old_job_directories_removed() {
    let env = env().await;
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook/secret-part", hook.local_addr().unwrap());
    let _w = env.worker("w", &["--notify-url", &url, "--keep-days", "1"], "").await;
    let cfg = env.config("cfg.yaml", "");

    let (code, events, err) = Client::spawn(&env, &env.train_args(&cfg, "out1")).finish(60).await;
    assert_eq!(code, 0, "{err}");
    let first = event(&events, "accepted").unwrap()["job_id"].as_str().unwrap().to_owned();
    let note = tokio::time::timeout(Duration::from_secs(30), http_body(&hook)).await.expect("the webhook is called");
    assert_eq!(note["job_id"], first.as_str());
    assert_eq!(note["state"], "completed");
    assert_eq!(note["kind"], "train");
    assert!(note["text"].as_str().unwrap().contains(&first), "{note}");

    // The first job ended "two days ago": the sweep after the next job removes it, keeps the new one.
    let jp = env.path("w/jobs").join(&first).join("job.json");
    let mut j = journal(&env, "w", &first);
    j["updated_at"] = json!(j["updated_at"].as_f64().unwrap() - 2.0 * 86_400.0);
    std::fs::write(&jp, serde_json::to_vec(&j).unwrap()).unwrap();
    let (code, events, err) = Client::spawn(&env, &env.train_args(&cfg, "out2")).finish(60).await;
    assert_eq!(code, 0, "{err}");
    let second = event(&events, "accepted").unwrap()["job_id"].as_str().unwrap().to_owned();
    let note = tokio::time::timeout(Duration::from_secs(30), http_body(&hook)).await.expect("called again");
    assert_eq!(note["job_id"], second.as_str());
    let mut gone = false;
    for _ in 0..100 {
        if !env.path("w/jobs").join(&first).exists() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the old job's directory was removed");
    assert!(env.path("w/jobs").join(&second).join("job.json").is_file(), "the new one is kept");
    let log = std::fs::read_to_string(env.path("w.log")).unwrap();
    assert!(log.contains("removed a finished job's directory") && log.contains(&first), "{log}");
    assert!(!log.contains("secret-part"), "the webhook's secret path is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_upload_resumes_on_the_next_submission() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let cfg = env.config("cfg.yaml", "");
    // A dataset big enough to cut midway (the client checks only that it is a .pkg.slp).
    let size = 64usize << 20;
    let mut data = Vec::with_capacity(size);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let big = env.path("big.pkg.slp");
    std::fs::write(&big, &data).unwrap();
    let args = |out: &str| -> Vec<String> {
        ["train", "--config", cfg.to_str().unwrap(), "--labels", big.to_str().unwrap(), "--bind", "127.0.0.1"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--json".into(), "-o".into(), env.path(out).display().to_string()])
            .collect()
    };

    let mut first = Client::spawn(&env, &args("out1"));
    let job = first.until(60, |e| e["event"] == "accepted").await["job_id"].as_str().unwrap().to_owned();
    let part = env.path("w/jobs").join(&job).join("input/big.pkg.slp.part");
    let mut arrived = 0;
    for _ in 0..600 {
        arrived = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if arrived >= 8 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(arrived >= 8 << 20 && arrived < size as u64, "cut midway: {arrived} bytes had arrived");
    first.signal(SIGKILL);
    let mut failed = Value::Null;
    // The worker learns of the cut when ICE gives the dead peer up (seconds; more under load).
    for _ in 0..1200 {
        failed = journal(&env, "w", &job)["status"].clone();
        if failed["state"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(failed["message"].as_str().unwrap().contains("upload failed"), "{failed}");

    let (code, events, err) = Client::spawn(&env, &args("out2")).finish(120).await;
    let up = event(&events, "uploaded").unwrap_or_else(|| panic!("{err}\n{events:#?}"));
    let resumed = up["resumed_bytes"].as_u64().unwrap();
    assert!(resumed >= 8 << 20, "the second upload resumed what had arrived: {up}");
    eprintln!(
        "resumed upload: {:.1} of {} MiB already on the worker, the rest sent in {:.2} s (exit {code})",
        resumed as f64 / (1 << 20) as f64,
        size >> 20,
        up["secs"].as_f64().unwrap_or(0.0)
    );
    let log = std::fs::read_to_string(env.path("w.log")).unwrap();
    assert!(log.contains("kept a cut upload") && log.contains("resuming a cut upload"), "{log}");
}

/// Seconds since midnight of a tracing log line's timestamp (`2026-12-08T01:23:45.123456Z ...`).
fn log_secs(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = t.split(':');
    let (h, m, s) = (parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?, parts.next()?);
    Some(h * 3600.0 + m * 60.0 + s.parse::<f64>().ok()?)
}

fn log_time(log: &str, job: &str, what: &str) -> f64 {
    let plain = |l: &str| l.replace('\u{1b}', "");
    log.lines()
        .map(plain)
        .find(|l| l.contains(job) && l.contains(what))
        .and_then(|l| log_secs(&l))
        .unwrap_or_else(|| panic!("no `{what}` for {job} in the worker log:\n{log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_wait_in_the_queue_run_in_turn_and_a_full_queue_refuses() {
    let env = env().await;
    let _w = env.worker("w", &["--queue", "1"], "").await;
    let wid = env.worker_id(&env.path("w"));
    let slow = env.config("slow.yaml", "batch_ms=100 steps=5");
    let quick = env.config("quick.yaml", "");
    let mut first = Client::spawn(&env, &env.train_args(&slow, "out1"));
    let job1 = first.until(60, |e| e["event"] == "accepted").await["job_id"].as_str().unwrap().to_owned();
    first.until(60, |e| e["event"] == "state" && e["state"] == "running").await;

    // The second job is accepted, uploads, and waits its turn with its position shown.
    let mut args = env.train_args(&quick, "out2");
    args.extend(["--worker".into(), wid.clone()]);
    let mut second = Client::spawn(&env, &args);
    let job2 = second.until(60, |e| e["event"] == "accepted").await["job_id"].as_str().unwrap().to_owned();
    let q = second.until(60, |e| e["event"] == "state" && e["state"] == "queued").await;
    assert!(q["message"].as_str().unwrap().contains("1 job(s) ahead"), "{q}");

    // From any shell: the room's workers list this user's jobs, live.
    let out = env.cmd(&["job", "list", "--json", "--bind", "127.0.0.1"]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = |id: &str| listed.as_array().unwrap().iter().find(|r| r["job_id"] == id).cloned().unwrap_or_default();
    assert_eq!(row(&job1)["state"], "running", "{listed:#}");
    assert_eq!(row(&job2)["state"], "queued", "{listed:#}");
    assert_eq!(row(&job2)["ahead"], 1, "{listed:#}");
    assert_eq!(row(&job2)["worker"], wid.as_str());
    let text = env.cmd(&["job", "list", "--bind", "127.0.0.1"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&job2) && text.contains("1 job(s) ahead"), "{text}");

    // The queue (one place) is full: a third is refused, and auto-selection says why.
    let mut args = env.train_args(&quick, "out3");
    args.extend(["--worker".into(), wid.clone()]);
    let (code, events, _) = Client::spawn(&env, &args).finish(30).await;
    assert_eq!(code, 2);
    let r = event(&events, "rejected").expect("rejected");
    assert_eq!(r["errors"][0]["code"], "BUSY");
    assert!(r["errors"][0]["message"].as_str().unwrap().contains("queue is full"), "{r}");
    let (code, _, err) = Client::spawn(&env, &env.train_args(&quick, "out4")).finish(30).await;
    assert_eq!(code, 1);
    assert!(err.contains("queues are full"), "{err}");

    // Both finish, in order, each with its model.
    let (code, events, err) = first.finish(90).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(done(&events)["state"], "completed");
    let (code, events, err) = second.finish(90).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(done(&events)["state"], "completed");
    assert!(env.path("out2/single_instance/best.ckpt").is_file());
    let log = std::fs::read_to_string(env.path("w.log")).unwrap();
    let handover = log_time(&log, &job2, "job started") - log_time(&log, &job1, "job finished");
    assert!(handover >= 0.0, "the second job started after the first ended");
    // A figure for BENCHMARKS.md, never an assertion.
    eprintln!("queue hand-over: job 2 started {:.1} ms after job 1 ended", handover * 1000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_can_be_cancelled_and_survives_a_worker_restart() {
    let env = env().await;
    let mut w = env.worker("w", &[], "").await;
    let wid = env.worker_id(&env.path("w"));
    let slow = env.config("slow.yaml", "batch_ms=200 steps=5");
    let quick = env.config("quick.yaml", "");
    let mut first = Client::spawn(&env, &env.train_args(&slow, "out1"));
    let job1 = first.until(60, |e| e["event"] == "accepted").await["job_id"].as_str().unwrap().to_owned();
    first.until(60, |e| e["event"] == "state" && e["state"] == "running").await;
    let with_worker = |out: &str| {
        let mut a = env.train_args(&quick, out);
        a.extend(["--worker".into(), wid.clone()]);
        a
    };

    // Ctrl-C twice on a queued job cancels it without running anything.
    let mut doomed = Client::spawn(&env, &with_worker("out-doomed"));
    doomed.until(60, |e| e["event"] == "state" && e["state"] == "queued").await;
    doomed.signal(SIGINT);
    tokio::time::sleep(Duration::from_millis(300)).await;
    doomed.signal(SIGINT);
    let (code, events, err) = doomed.finish(30).await;
    assert_eq!(code, 130, "{err}\n{events:#?}");
    assert_eq!(done(&events)["state"], "cancelled");

    // Another waits in the queue; the worker dies (SIGKILL) and comes back.
    let mut second = Client::spawn(&env, &with_worker("out2"));
    let job2 = second.until(60, |e| e["event"] == "accepted").await["job_id"].as_str().unwrap().to_owned();
    second.until(60, |e| e["event"] == "state" && e["state"] == "queued").await;
    w.start_kill().unwrap();
    let _ = w.wait().await;
    first.signal(SIGKILL);
    second.signal(SIGKILL);
    assert_eq!(journal(&env, "w", &job2)["status"]["state"], "queued", "the queue is in the journal");
    let _w = env.worker("w", &[], "").await;

    // The interrupted running job failed; the queued one runs, and its client fetches the model.
    let mut done2 = Value::Null;
    for _ in 0..600 {
        done2 = journal(&env, "w", &job2)["status"].clone();
        if done2["state"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(done2["state"], "completed", "{done2}");
    assert_eq!(journal(&env, "w", &job1)["status"]["state"], "failed");
    let out = env.path("out2-attached").display().to_string();
    let mut c = env.cmd(&["job", "attach", &job2, "--worker", &wid, "-o", &out, "--bind", "127.0.0.1", "--json"]);
    let out = c.output().await.unwrap();
    assert!(out.status.success(), "job attach: {}", String::from_utf8_lossy(&out.stderr));
    assert!(env.path("out2-attached/single_instance/best.ckpt").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_stopped_and_cancelled_from_another_shell() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let slow = env.config("slow.yaml", "batch_ms=150 steps=5");
    let mut args = env.train_args(&slow, "out1");
    args.extend(["--max-epochs".into(), "40".into()]);

    // Stop: the job's own client gets the model so far.
    let mut c = Client::spawn(&env, &args);
    let job = c.until(60, |e| e["event"] == "accepted").await["job_id"].as_str().unwrap().to_owned();
    c.until(60, is_epoch_end).await;
    let out = env.cmd(&["job", "stop", &job, "--bind", "127.0.0.1", "--json"]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"asked\""), "{}", String::from_utf8_lossy(&out.stdout));
    let (code, events, err) = c.finish(60).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(done(&events)["state"], "stopped_early");
    assert!(env.path("out1/single_instance/best.ckpt").is_file(), "the model so far came back");

    // Cancel: waits for the end and says so; the job's client ends cancelled.
    let mut args = env.train_args(&slow, "out2");
    args.extend(["--max-epochs".into(), "40".into()]);
    let mut c = Client::spawn(&env, &args);
    let job = c.until(60, |e| e["event"] == "accepted").await["job_id"].as_str().unwrap().to_owned();
    c.until(60, is_epoch_end).await;
    let out = env.cmd(&["job", "cancel", &job, "--bind", "127.0.0.1", "--json"]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("\"state\":\"cancelled\""), "{said}");
    let (code, events, _) = c.finish(60).await;
    assert_eq!(code, 130);
    assert_eq!(done(&events)["state"], "cancelled");

    // A job that is not there is a clear refusal, not a hang.
    let out = env.cmd(&["job", "cancel", &job, "--bind", "127.0.0.1"]).output().await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not running or queued"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_logs_replays_the_trainer_log_and_follows_it() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let slow = env.config("slow.yaml", "batch_ms=100 steps=5");
    let mut args = env.train_args(&slow, "out");
    args.extend(["--max-epochs".into(), "6".into()]);
    let mut c = Client::spawn(&env, &args);
    let job = c.until(60, |e| e["event"] == "accepted").await["job_id"].as_str().unwrap().to_owned();
    c.until(60, is_epoch_end).await;

    // While it runs: --follow prints what is there, then new lines, until the job ends.
    let follow = env.cmd(&["job", "logs", &job, "--follow", "--bind", "127.0.0.1", "--json"]).output();
    let (follow, (code, _, err)) = tokio::join!(follow, c.finish(60));
    assert_eq!(code, 0, "{err}");
    let follow = follow.unwrap();
    assert!(follow.status.success(), "{}", String::from_utf8_lossy(&follow.stderr));
    let events: Vec<Value> =
        String::from_utf8_lossy(&follow.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(events.iter().any(|e| e["event"] == "log"), "{events:#?}");
    assert_eq!(events.last().unwrap()["event"], "done", "followed to the end: {events:#?}");

    // Afterwards: the last lines of trainer.log, as they are on the worker.
    let log = std::fs::read_to_string(env.path("w/jobs").join(&job).join("trainer.log")).unwrap();
    let want: Vec<&str> = log.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect();
    let out = env.cmd(&["job", "logs", &job, "-n", "3", "--bind", "127.0.0.1"]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = String::from_utf8_lossy(&out.stdout);
    assert_eq!(got.lines().map(|l| l.trim_end_matches('\r')).collect::<Vec<_>>(), want);
    assert!(String::from_utf8_lossy(&out.stderr).contains("completed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_down_pipeline_trains_both_models_in_order_and_returns_each() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let base = std::fs::read_to_string(asset("tiny_single.yaml")).unwrap();
    let mut cfgs = Vec::new();
    for head in ["centroid", "centered_instance"] {
        let p = env.path(&format!("{head}.yaml"));
        std::fs::write(&p, base.replace("    single_instance:\n", &format!("    {head}:\n"))).unwrap();
        cfgs.push(p);
    }
    let mut args = env.train_args(&cfgs[0], "out");
    args.extend(["--config".into(), cfgs[1].display().to_string()]);
    let (code, events, err) = Client::spawn(&env, &args).finish(90).await;
    assert_eq!(code, 0, "{err}\n{events:#?}");
    assert_eq!(done(&events)["state"], "completed");
    // Trained in the order given, each announced as it starts, and both came back.
    let started: Vec<&str> = events
        .iter()
        .filter(|e| e["progress"]["event"] == "started")
        .filter_map(|e| e["progress"]["model"].as_str())
        .collect();
    assert_eq!(started, vec!["centroid", "centered_instance"], "{events:#?}");
    for head in ["centroid", "centered_instance"] {
        assert!(env.path(&format!("out/{head}/best.ckpt")).is_file(), "{head} returned");
    }
}
