//! The unmodified upstream SLEAP client, sleap-rtc 0.0.7 from PyPI (what the SLEAP GUI's
//! remote-training dialog imports), drives our server and a real `sleap-rtc worker` with the fake
//! sleap-nn: key registration, the Ed25519 challenge, training with the GUI's callbacks (raw
//! sleap-nn progress for LossViewer, log lines, stop early), inference, the path check, and a
//! client without a proof that gets nothing done. The client runs from its own venv
//! (`server/tests/py/upstream-requirements.txt`, made by scripts/test.sh).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Upstream's room secrets: 32 random bytes, url-safe base64 without padding.
const SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";
const WRONG_SECRET: &str = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1-f4CBgoM";

/// Python of the venv with sleap-rtc 0.0.7 (scripts/test.sh exports it).
fn upstream_python() -> String {
    if let Ok(p) = std::env::var("SLEAP_RTC_UPSTREAM_PYTHON") {
        return p;
    }
    format!("{}/.cache/sleap-rtc/upstream-venv/bin/python", std::env::var("HOME").unwrap_or_default())
}

fn driver() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream_gui.py")
}

/// Runs the upstream client in `mode` with `args`, as a fresh user whose home is `home`.
async fn upstream(env: &Env, home: &Path, mode: &str, args: Value) -> Value {
    std::fs::create_dir_all(home).unwrap();
    let ws = format!("{}/ws", env.url.replace("http://", "ws://"));
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(upstream_python())
            .arg(driver())
            .arg(mode)
            .arg(args.to_string())
            .env("HOME", home)
            .env("SLEAP_RTC_SIGNALING_WS", &ws)
            .env("SLEAP_RTC_SIGNALING_HTTP", &env.url)
            .env("SLEAP_RTC_ENV", "production")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the upstream client did not finish within 180 s")
    .expect("cannot run the upstream client's Python (scripts/test.sh makes its venv)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "no outcome from the upstream client ({e}); stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A worker with a mount holding the labels; returns it and the labels' worker path.
async fn worker_with_mount(env: &Env, extra: &[&str], fake: &str) -> (tokio::process::Child, PathBuf) {
    let mount = env.path("lab-data");
    std::fs::create_dir_all(&mount).unwrap();
    let labels = mount.join("labels.pkg.slp");
    std::fs::copy(asset("labels.pkg.slp"), &labels).unwrap();
    let m = mount.display().to_string();
    let mut args = vec!["--mount", m.as_str()];
    args.extend(extra);
    let w = env.worker("w", &args, fake).await;
    (w, labels.canonicalize().unwrap())
}

fn config_text(markers: &str) -> String {
    let mut text = std::fs::read_to_string(asset("tiny_single.yaml")).unwrap();
    if !markers.is_empty() {
        text.push_str(&format!("# fake-sleap-nn: {markers}\n"));
    }
    text
}

fn jobs(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.path("w").join("jobs"))
        .map(|r| r.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Every job's journal on the worker.
fn journals(env: &Env) -> Vec<Value> {
    jobs(env)
        .iter()
        .filter_map(|j| std::fs::read(env.path("w").join("jobs").join(j).join("job.json")).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

fn count_kind(env: &Env, kind: &str) -> usize {
    journals(env).iter().filter(|j| j["status"]["kind"] == kind).count()
}

fn log_of(env: &Env) -> String {
    std::fs::read_to_string(env.path("w.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gui_api_trains_tracks_and_checks_paths_with_its_own_key() {
    let env = env().await;
    let (_w, labels) = worker_with_mount(&env, &[], "batch_ms=10").await;
    let home = env.path("gui-home");
    let base = json!({"jwt": env.jwt, "room": env.room, "register_key": true});

    // Path check first, as the GUI's pre-submission does.
    let mut a = base.clone();
    a["slp_path"] = json!(labels.display().to_string());
    let r = upstream(&env, &home, "pathcheck", a).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    assert_eq!(r["all_found"], true, "{r:#}");
    assert_eq!(r["slp_path"], labels.display().to_string());

    // The GUI's remote file browser on the mounts.
    let mut a = base.clone();
    a["slp_path"] = json!("/laptop/labels.pkg.slp");
    let r = upstream(&env, &home, "browse", a).await;
    assert_eq!(r["ok"], true, "{r:#}");
    let mount = labels.parent().unwrap().display().to_string();
    let mounts: Value = serde_json::from_str(r["mounts"].as_str().unwrap().split_once("::").unwrap().1).unwrap();
    assert_eq!(mounts, json!([{"path": mount, "label": "lab-data"}]));
    let listing: Value = serde_json::from_str(r["listing"].as_str().unwrap().split_once("::").unwrap().1).unwrap();
    assert_eq!(listing["path"], mount);
    assert_eq!(listing["entries"][0]["name"], "labels.pkg.slp", "{listing:#}");
    assert_eq!(listing["entries"][0]["type"], "file");
    assert_eq!(listing["has_more"], false);
    assert!(r["outside"].as_str().unwrap().starts_with("FS_ERROR::ACCESS_DENIED::"), "{r:#}");
    assert!(r["path_error"].as_str().unwrap().contains("not within configured mounts"), "{r:#}");

    // Training with every callback the GUI passes; the labels named by the laptop's path and a
    // path mapping, as the GUI sends them.
    let mut a = base.clone();
    a["config_content"] = json!(config_text(""));
    a["labels_path"] = json!("/laptop/labels.pkg.slp");
    a["path_mappings"] = json!({"/laptop/labels.pkg.slp": labels.display().to_string()});
    a["max_epochs"] = json!(3);
    a["inference"] = json!(true);
    let r = upstream(&env, &home, "train", a).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    assert_eq!(r["success"], true);
    let model = PathBuf::from(r["model_path"].as_str().expect("JOB_COMPLETE carries output_path"));
    assert!(model.join("best.ckpt").is_file(), "{model:?} is the trained model on the worker");
    // LossViewer gets sleap-nn's own messages, unchanged.
    let reports = r["reports"].as_array().unwrap();
    let ev = |name: &str| reports.iter().filter(|m| m["event"] == name).count();
    assert_eq!(ev("train_begin"), 1, "{reports:#?}");
    assert_eq!(ev("epoch_end"), 3, "{reports:#?}");
    assert_eq!(ev("train_end"), 1, "{reports:#?}");
    let last = reports.iter().rfind(|m| m["event"] == "epoch_end").unwrap();
    assert!(last["logs"]["train/loss"].is_number(), "{last}");
    // JOB_PROGRESS parsed into the result; the terminal output reached on_log.
    assert_eq!(r["final_epoch"], 2, "{r:#}");
    assert!(r["final_train_loss"].is_number(), "{r:#}");
    let logs: Vec<&str> = r["logs"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(logs.iter().any(|l| l.contains("Epoch")), "{logs:#?}");
    // tqdm's redraws arrive as CR::, which the API hands on with a leading \r.
    assert!(logs.iter().any(|l| l.starts_with('\r')), "{logs:#?}");
    let events: Vec<&Value> = r["events"].as_array().unwrap().iter().collect();
    assert_eq!(events.first().map(|e| &e["type"]), Some(&json!("train_begin")));
    assert!(events.iter().any(|e| e["type"] == "train_end" && e["success"] == true), "{events:#?}");
    // With on_inference_message the API waits for the post-training inference, as upstream runs it.
    let inference = r["inference"].as_array().unwrap();
    assert_eq!(inference.first().map(|m| &m[0]), Some(&json!("INFERENCE_BEGIN")), "{r:#}");
    assert!(inference.iter().any(|m| m[0] == "INFERENCE_PROGRESS" && m[1]["n_processed"].is_number()), "{r:#}");
    let last = inference.last().unwrap();
    assert_eq!(last[0], "INFERENCE_COMPLETE", "{r:#}\n{}", log_of(&env));
    assert!(Path::new(last[1]["predictions_path"].as_str().unwrap()).is_file(), "{last}");

    // Inference with the new model: the predictions file the API names exists.
    let mut a = base.clone();
    a["data_path"] = json!(labels.display().to_string());
    a["model_paths"] = json!([model.display().to_string()]);
    let r = upstream(&env, &home, "track", a).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    assert_eq!(r["success"], true);
    let preds = PathBuf::from(r["predictions_path"].as_str().unwrap());
    assert!(preds.is_file() && preds.to_string_lossy().ends_with(".predictions.slp"), "{preds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_path_check_names_the_videos_missing_on_the_worker() {
    let env = env().await;
    let py = upstream_python();
    let (_w, labels) = worker_with_mount(&env, &["--python", &py], "batch_ms=10").await;
    let mount = labels.parent().unwrap().to_path_buf();
    std::fs::write(mount.join("fly1.mp4"), b"not really a video").unwrap();
    let slp = mount.join("session.slp");
    let here = mount.join("fly1.mp4").display().to_string();
    let a = json!({"jwt": env.jwt, "template": asset("labels.pkg.slp"), "out": slp,
        "videos": [here, "/lab/old-share/fly2.mp4"]});
    let r = upstream(&env, &env.path("maker"), "make_slp", a).await;
    assert_eq!(r["ok"], true, "{r:#}");
    let home = env.path("gui-home");
    let a = json!({"jwt": env.jwt, "room": env.room, "register_key": true, "slp_path": slp.display().to_string()});
    let r = upstream(&env, &home, "pathcheck", a).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    assert_eq!(
        (r["total_videos"].as_u64(), r["found_count"].as_u64(), r["missing_count"].as_u64()),
        (Some(2), Some(1), Some(1)),
        "{r:#}"
    );
    assert_eq!(r["all_found"], false);
    assert_eq!(r["missing"], json!(["/lab/old-share/fly2.mp4"]));
    // A training package carries its frames.
    let a = json!({"jwt": env.jwt, "room": env.room, "slp_path": labels.display().to_string()});
    let r = upstream(&env, &home, "pathcheck", a).await;
    assert_eq!((r["all_found"].as_bool(), r["embedded_count"].as_u64()), (Some(true), Some(1)), "{r:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_early_from_the_gui_keeps_the_model() {
    let env = env().await;
    let (_w, labels) = worker_with_mount(&env, &[], "batch_ms=60 steps=5").await;
    let home = env.path("gui-home");
    let a = json!({"jwt": env.jwt, "room": env.room, "register_key": true,
        "config_content": config_text(""), "labels_path": labels.display().to_string(),
        "max_epochs": 200, "stop_after_epoch": 1});
    let r = upstream(&env, &home, "train", a).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    assert_eq!(r["stop_sent"], true);
    assert_eq!(r["success"], true, "a stop early is a success: {r:#}");
    let epochs = r["reports"].as_array().unwrap().iter().filter(|m| m["event"] == "epoch_end").count();
    assert!((2..20).contains(&epochs), "stopped after {epochs} of 200 epochs");
    let model = PathBuf::from(r["model_path"].as_str().unwrap());
    assert!(model.join("best.ckpt").is_file(), "{model:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_proof_gets_nothing_done() {
    let env = env().await;
    let (_w, labels) = worker_with_mount(&env, &[], "batch_ms=10").await;
    // No registered key (and this worker has no room secret): the API answers `missing`.
    let a = json!({"jwt": env.jwt, "room": env.room, "register_key": false,
        "config_content": config_text(""), "labels_path": labels.display().to_string()});
    let r = upstream(&env, &env.path("stranger"), "train", a).await;
    assert_eq!(r["ok"], false, "{r:#}");
    assert!(r["error"].as_str().unwrap().contains("Authentication failed: missing"), "{r:#}");
    assert!(jobs(&env).is_empty(), "no job may exist: {:?}", jobs(&env));
    assert!(log_of(&env).contains("refused an unauthenticated upstream client"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_the_gui_ends_the_job_as_cancelled() {
    let env = env().await;
    let (_w, labels) = worker_with_mount(&env, &[], "batch_ms=60 steps=5").await;
    let a = json!({"jwt": env.jwt, "room": env.room, "register_key": true,
        "config_content": config_text(""), "labels_path": labels.display().to_string(),
        "max_epochs": 200, "cancel_after_epoch": 0});
    let r = upstream(&env, &env.path("gui-home"), "train", a).await;
    assert_eq!(r["ok"], false, "the API raises JobError for a cancelled job: {r:#}");
    assert_eq!(r["error_type"], "JobError", "{r:#}");
    // JOB_FAILED carries the message where the API reads it (not "Job failed").
    assert!(r["error"].as_str().unwrap().contains("cancel"), "{r:#}");
    let js = journals(&env);
    assert_eq!(js.len(), 1, "a cancelled training has no inference after it: {js:#?}");
    assert_eq!(js[0]["status"]["state"], "cancelled", "{js:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_model_pipeline_completes_once_per_model() {
    let env = env().await;
    let (_w, labels) = worker_with_mount(&env, &[], "batch_ms=10").await;
    let a = json!({"jwt": env.jwt, "room": env.room, "register_key": true,
        "configs": [config_text(""), config_text("")], "model_types": ["centroid", "centered_instance"],
        "labels_path": labels.display().to_string(), "max_epochs": 2});
    let r = upstream(&env, &env.path("gui-home"), "train", a).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    // The API returns after the second JOB_COMPLETE, with the second model.
    assert_eq!(r["model_types"], json!(["centered_instance"]), "MODEL_TYPE between the models: {r:#}");
    let model = PathBuf::from(r["model_path"].as_str().unwrap());
    assert!(model.ends_with("runs/centered_instance") && model.join("best.ckpt").is_file(), "{model:?}");
    let begins = r["reports"].as_array().unwrap().iter().filter(|m| m["event"] == "train_begin").count();
    assert_eq!(begins, 2, "each model's progress reaches LossViewer");
    let logs: Vec<&str> = r["logs"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(logs.iter().any(|l| l.contains("Training model 2/2")), "{logs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guis_upload_thread_sends_a_dataset_the_worker_then_trains_on() {
    let env = env().await;
    let (_w, _) = worker_with_mount(&env, &[], "batch_ms=10").await;
    // A dataset only the laptop has.
    let local = env.path("laptop").join("my labels.pkg.slp");
    std::fs::create_dir_all(local.parent().unwrap()).unwrap();
    std::fs::copy(asset("labels.pkg.slp"), &local).unwrap();
    let home = env.path("gui-home");
    let a = json!({"jwt": env.jwt, "room": env.room, "register_key": true,
        "local_path": local.display().to_string(), "dest_dir": env.path("lab-data").display().to_string()});
    let r = upstream(&env, &home, "upload", a.clone()).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    assert!(r["rejected"].as_str().unwrap().contains("not within configured mounts"), "{r:#}");
    let uploaded = PathBuf::from(r["uploaded"].as_str().expect("FILE_UPLOAD_COMPLETE"));
    assert_eq!(std::fs::read(&uploaded).unwrap(), std::fs::read(&local).unwrap(), "the bytes arrived intact");
    assert!(uploaded.starts_with(env.path("w").join("uploads").canonicalize().unwrap()), "{uploaded:?}");
    assert_eq!(r["slp_path"], uploaded.display().to_string(), "the path check went on with the upload");
    assert!(r["replies"].as_array().unwrap().contains(&json!("FILE_UPLOAD_COMPLETE")), "{r:#}");
    // The same file again is not sent again.
    let r = upstream(&env, &home, "upload", a).await;
    assert_eq!(r["replies"], json!(["FILE_UPLOAD_CACHE_HIT"]), "{r:#}");
    assert_eq!(r["uploaded"], uploaded.display().to_string());
    // And the GUI trains on it.
    let a = json!({"jwt": env.jwt, "room": env.room, "config_content": config_text(""),
        "labels_path": uploaded.display().to_string(), "max_epochs": 1});
    let r = upstream(&env, &home, "train", a).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
}

/// The upstream CLI (`sleap-rtc` of the PyPI package) with `args`, as a fresh user whose home is
/// `home`, until a line of its output contains `until` (it does not exit by itself after a job:
/// upstream's CLI keeps its signaling connection open). Its "Confirm Job Paths" prompt, which it
/// shows even with `--non-interactive`, is answered `s` (submit). Returns its output so far.
async fn upstream_cli(env: &Env, home: &Path, args: &[&str], until: &str) -> String {
    use tokio::io::AsyncBufReadExt;
    std::fs::create_dir_all(home).unwrap();
    // Signed in as the Python client keeps it: a JWT in ~/.sleap-rtc/credentials.json.
    std::fs::create_dir_all(home.join(".sleap-rtc")).unwrap();
    let creds = json!({"jwt": env.jwt, "user": {"id": "u", "username": "researcher"}});
    std::fs::write(home.join(".sleap-rtc/credentials.json"), creds.to_string()).unwrap();
    let bin = Path::new(&upstream_python()).with_file_name("sleap-rtc");
    let mut child = tokio::process::Command::new(bin)
        .args(args)
        .current_dir(home)
        .env("HOME", home)
        .env("SLEAP_RTC_SIGNALING_WS", format!("{}/ws", env.url.replace("http://", "ws://")))
        .env("SLEAP_RTC_SIGNALING_HTTP", &env.url)
        .env("SLEAP_RTC_ENV", "production")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the upstream CLI (scripts/test.sh makes its venv)");
    let mut stdin = child.stdin.take().unwrap();
    {
        use tokio::io::AsyncWriteExt;
        stdin.write_all(b"s\n").await.unwrap();
    }
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(l)) = lines.next_line().await {
            seen.push_str(&l);
            seen.push('\n');
            if l.contains(until) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    drop(stdin);
    let _ = child.kill().await;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = tokio::time::timeout(Duration::from_secs(5), e.read_to_string(&mut err)).await;
    }
    assert!(
        found,
        "the upstream CLI never printed {until:?}; stdout:\n{seen}\nstderr:\n{err}\nworker:\n{}",
        log_of(env)
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_cli_trains_and_tracks_with_a_room_secret() {
    let env = env().await;
    let secret = SECRET;
    let (_w, labels) = worker_with_mount(&env, &["--room-secret", secret], "batch_ms=10").await;
    let cfg = env.path("lab-data").join("tiny.yaml");
    std::fs::write(&cfg, config_text("")).unwrap();
    let (cfg, labels) = (cfg.display().to_string(), labels.display().to_string());
    let home = env.path("cli-home");
    let cli_train =
        ["train", "--room", &env.room, "--auto-select", "--config", &cfg, "--labels", &labels, "--non-interactive"];
    let args = [&cli_train[..], &["--max-epochs", "2", "--room-secret", secret][..]].concat();
    let out = upstream_cli(&env, &home, &args, "Completed Successfully").await;
    assert!(!out.contains("authentication failed"), "{out}");
    let train: Vec<Value> = journals(&env).into_iter().filter(|j| j["status"]["kind"] == "train").collect();
    assert_eq!(train.len(), 1, "{train:?}");
    // The run is named after the config's head, as sleap-nn would.
    let id = train[0]["status"]["job_id"].as_str().unwrap();
    let model = env.path("w").join("jobs").join(id).join("runs/single_instance");
    assert!(model.join("best.ckpt").is_file(), "{model:?}\n{out}");

    // Inference: the CLI writes the streamed predictions into its working directory.
    let m = model.display().to_string();
    let out = upstream_cli(
        &env,
        &home,
        &["track", "--room", &env.room, "--auto-select", "-d", &labels, "-m", &m, "--room-secret", secret],
        "Completed Successfully",
    )
    .await;
    // The newest track job is this one (the one before it is the inference after the training).
    let mut track: Vec<Value> = journals(&env).into_iter().filter(|j| j["status"]["kind"] == "track").collect();
    track.sort_by(|a, b| a["created_at"].as_f64().partial_cmp(&b["created_at"].as_f64()).unwrap());
    let last = track.last().expect("a track job");
    let result = last["status"]["results"][0].as_str().expect("predictions");
    let on_worker = env.path("w").join("jobs").join(last["status"]["job_id"].as_str().unwrap()).join(result);
    let local = home.join(on_worker.file_name().unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(std::fs::read(&local).ok(), std::fs::read(&on_worker).ok(), "{local:?}\n{out}");

    // A wrong secret gets nothing done.
    let args = [&cli_train[..], &["--room-secret", WRONG_SECRET][..]].concat();
    let out = upstream_cli(&env, &env.path("cli-home-2"), &args, "authentication failed").await;
    assert!(out.contains("invalid"), "{out}");
    assert_eq!(count_kind(&env, "train"), 1, "the refused client trained nothing");
}

/// A second user, signed in and joined to the room with an invite.
async fn second_member(env: &Env) -> String {
    let jwt =
        reqwest::Client::new().post(format!("{}/anonymous-signin", env.url)).json(&json!({})).send().await.unwrap();
    let jwt = jwt.json::<Value>().await.unwrap()["jwt"].as_str().unwrap().to_owned();
    join_room(env, &jwt).await;
    jwt
}

/// The user of `jwt` joins the test's room with an invite from its owner.
async fn join_room(env: &Env, jwt: &str) {
    let http = reqwest::Client::new();
    let invite = http.post(format!("{}/api/auth/rooms/{}/invite", env.url, env.room)).bearer_auth(&env.jwt);
    let inv = invite.json(&json!({})).send().await.unwrap().json::<Value>().await.unwrap();
    let join = http.post(format!("{}/api/auth/rooms/join", env.url)).bearer_auth(jwt);
    let joined = join.json(&json!({"invite_code": inv["invite_code"]})).send().await.unwrap();
    assert!(joined.status().is_success(), "{:?}", joined.text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_members_model_and_paths_outside_the_mounts_are_not_inputs() {
    let env = env().await;
    let (_w, labels) = worker_with_mount(&env, &[], "batch_ms=10").await;
    let a = json!({"jwt": env.jwt, "room": env.room, "register_key": true,
        "config_content": config_text(""), "labels_path": labels.display().to_string(), "max_epochs": 1});
    let r = upstream(&env, &env.path("alice"), "train", a).await;
    assert_eq!(r["ok"], true, "{r:#}");
    let model = r["model_path"].as_str().unwrap().to_owned();
    // Bob is a member with his own registered key: authenticated, but Alice's model is not his.
    let bob = second_member(&env).await;
    let a = json!({"jwt": bob, "room": env.room, "register_key": true,
        "data_path": labels.display().to_string(), "model_paths": [model]});
    let r = upstream(&env, &env.path("bob"), "track", a).await;
    assert_eq!(r["ok"], false, "{r:#}");
    assert!(r["error"].as_str().unwrap().contains("Job rejected"), "{r:#}");
    // Nor is anything outside the mounts, whoever asks.
    let a = json!({"jwt": env.jwt, "room": env.room, "slp_path": "/etc/passwd"});
    let r = upstream(&env, &env.path("alice"), "pathcheck", a).await;
    assert_eq!(r["ok"], false, "{r:#}");
    assert!(r["error"].as_str().unwrap().contains("not within configured mounts"), "{r:#}");
    assert_eq!(count_kind(&env, "train"), 1, "only Alice's training ran");
    let alice = journals(&env)[0]["owner"].clone();
    assert!(journals(&env).iter().all(|j| j["owner"] == alice), "Bob ran nothing");
}

/// By hand, with the real trainer (see cli/tests/real_sleap_nn.rs for making its venv):
/// `SLEAP_NN=~/.cache/sleap-rtc/sleap-nn-venv/bin/sleap-nn cargo test -p sleap-rtc --test
/// upstream_client real -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real sleap-nn: SLEAP_NN=/path/to/sleap-nn"]
async fn real_sleap_nn_through_the_gui_api() {
    let mut env = env().await;
    env.fake = PathBuf::from(std::env::var("SLEAP_NN").expect("set SLEAP_NN to the real sleap-nn executable"));
    let (_w, labels) = worker_with_mount(&env, &[], "").await;
    let home = env.path("gui-home");
    let a = json!({"jwt": env.jwt, "room": env.room, "register_key": true, "timeout": 1800, "inference": true,
        "config_content": config_text(""), "labels_path": labels.display().to_string(), "max_epochs": 3});
    let t = std::time::Instant::now();
    let r = upstream(&env, &home, "train", a).await;
    let train_secs = t.elapsed().as_secs_f64();
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    let reports = r["reports"].as_array().unwrap();
    let count = |e: &str| reports.iter().filter(|m| m["event"] == e).count();
    println!(
        "real sleap-nn via sleap_rtc.api.run_training: {train_secs:.1} s wall, worker-reported {:.1} s; \
         PROGRESS_REPORT train_begin {} epoch_begin {} epoch_end {} batch_end {} train_end {}; \
         final epoch {} train loss {} val loss {}; {} log lines",
        r["duration"].as_f64().unwrap_or_default(),
        count("train_begin"),
        count("epoch_begin"),
        count("epoch_end"),
        count("batch_end"),
        count("train_end"),
        r["final_epoch"],
        r["final_train_loss"],
        r["final_val_loss"],
        r["logs"].as_array().map_or(0, Vec::len)
    );
    assert_eq!(count("epoch_end"), 3);
    let inference = r["inference"].as_array().unwrap();
    println!(
        "real sleap-nn post-training inference: {} messages, last {}",
        inference.len(),
        inference.last().map(|m| m.to_string()).unwrap_or_default()
    );
    assert_eq!(inference.last().map(|m| &m[0]), Some(&json!("INFERENCE_COMPLETE")), "{inference:#?}");
    let model = r["model_path"].as_str().unwrap().to_owned();
    assert!(Path::new(&model).join("best.ckpt").is_file());
    let a = json!({"jwt": env.jwt, "room": env.room, "timeout": 1800,
        "data_path": labels.display().to_string(), "model_paths": [model]});
    let t = std::time::Instant::now();
    let r = upstream(&env, &home, "track", a).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    let preds = PathBuf::from(r["predictions_path"].as_str().unwrap());
    println!(
        "real sleap-nn via sleap_rtc.api.run_inference: {:.1} s wall; predictions {} ({} bytes)",
        t.elapsed().as_secs_f64(),
        preds.display(),
        std::fs::metadata(&preds).map(|m| m.len()).unwrap_or(0)
    );
    // LossViewer's "Stop Early" after the second epoch of 30.
    let a = json!({"jwt": env.jwt, "room": env.room, "timeout": 1800, "stop_after_epoch": 1,
        "config_content": config_text(""), "labels_path": labels.display().to_string(), "max_epochs": 30});
    let t = std::time::Instant::now();
    let r = upstream(&env, &home, "train", a).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    let epochs = r["reports"].as_array().unwrap().iter().filter(|m| m["event"] == "epoch_end").count();
    println!("real sleap-nn stop early: {epochs} of 30 epochs, {:.1} s wall", t.elapsed().as_secs_f64());
    assert!(epochs < 30 && Path::new(r["model_path"].as_str().unwrap()).join("best.ckpt").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_login_signs_the_gui_in() {
    let env = env().await;
    let (_w, labels) = worker_with_mount(&env, &[], "batch_ms=10").await;
    let home = env.path("gui-home");
    std::fs::create_dir_all(&home).unwrap();
    let out = env.cmd(&["login", "--server", &env.url, "--for-sleap-gui"]).env("HOME", &home).output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("SLEAP_RTC_SIGNALING_WS=ws://"), "{err}");
    let path = home.join(".sleap-rtc/credentials.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let creds: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let jwt = creds["jwt"].as_str().unwrap().to_owned();
    // The new user joins the lab's room, as with any invite.
    join_room(&env, &jwt).await;
    // The GUI API, with nothing but what login stored, trains.
    let a = json!({"room": env.room, "config_content": config_text(""),
        "labels_path": labels.display().to_string(), "max_epochs": 1});
    let r = upstream(&env, &home, "train", a).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    assert_eq!(r["success"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_scan_info_and_a_forged_upload_hash() {
    let env = env().await;
    let (_w, labels) = worker_with_mount(&env, &[], "batch_ms=10").await;
    let mount = labels.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(mount.join("videos/day1")).unwrap();
    std::fs::write(mount.join("videos/day1/Fly1.mp4"), vec![0u8; 1000]).unwrap();
    std::fs::write(mount.join("videos/fly1.mp4.bak"), b"x").unwrap();
    let dir = mount.display().to_string();
    let sha_of_other = "ab".repeat(32);
    let a = json!({"jwt": env.jwt, "room": env.room, "register_key": true, "expect": 9, "send": [
        "FS_RESOLVE::/laptop/videos/fly1.mp4::1000::::all",
        "FS_RESOLVE::*.*::::::",
        "FS_RESOLVE::fly1.mp4::::::no-such-mount",
        format!("FS_SCAN_DIR::{}", json!({"directory": format!("{dir}/videos/day1"), "filenames": ["Fly1.mp4", "gone.mp4", "../../etc/passwd"]})),
        "FS_GET_INFO",
        "FS_FROBNICATE",
        format!("FILE_UPLOAD_CHECK::{sha_of_other}::x.pkg.slp"),
        format!("FILE_UPLOAD_START::../../x.pkg.slp::3::{dir}::1"),
        {"bytes_hex": "616263"},
        "FILE_UPLOAD_END",
    ]});
    let r = upstream(&env, &env.path("home"), "raw", a).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    let replies: Vec<&str> = r["replies"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let json_of = |m: &str| -> Value { serde_json::from_str(m.split_once("::").unwrap().1).unwrap() };
    // The exact name with the exact size, deepest but best; then the substring match.
    let found = json_of(replies[0]);
    assert!(replies[0].starts_with("FS_RESOLVE_RESPONSE::"), "{replies:#?}");
    assert_eq!(found["candidates"][0]["name"], "Fly1.mp4", "{found:#}");
    assert_eq!(found["candidates"][0]["match_type"], "exact");
    assert_eq!(found["candidates"][1]["match_type"], "substring");
    assert_eq!(found["truncated"], false);
    assert!(replies[1].starts_with("FS_ERROR::PATTERN_TOO_BROAD::"), "{}", replies[1]);
    assert!(replies[2].starts_with("FS_ERROR::MOUNT_NOT_FOUND::"), "{}", replies[2]);
    let scan = json_of(replies[3]);
    assert!(scan["found"]["Fly1.mp4"].as_str().unwrap().ends_with("videos/day1/Fly1.mp4"), "{scan:#}");
    assert_eq!(scan["found"]["gone.mp4"], Value::Null);
    assert_eq!(scan["found"]["../../etc/passwd"], Value::Null, "no walking out: {scan:#}");
    let info = json_of(replies[4]);
    assert_eq!(info["mounts"][0]["path"], dir, "{info:#}");
    assert!(replies[5].starts_with("FS_ERROR::INVALID_REQUEST::Unknown FS message type"), "{}", replies[5]);
    assert_eq!(replies[6], "FILE_UPLOAD_READY");
    assert_eq!(replies[7], "FILE_UPLOAD_READY", "the name is cut to x.pkg.slp, not refused");
    // The bytes are not what the client announced: refused, nothing kept.
    assert!(replies[8].starts_with("FILE_UPLOAD_ERROR::") && replies[8].contains("SHA-256"), "{}", replies[8]);
    let kept: Vec<_> = walk(&env.path("w").join("uploads")).into_iter().filter(|p| p.is_file()).collect();
    assert!(kept.is_empty(), "{kept:?}");
    assert!(!env.path("x.pkg.slp").exists() && !mount.join("x.pkg.slp").exists());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apis_handshake_with_a_room_secret_and_without() {
    let env = env().await;
    let (_w, _) = worker_with_mount(&env, &["--room-secret", SECRET], "batch_ms=10").await;
    // sleap_rtc.api._authenticate_channel's HMAC path (the API's own function, given the secret).
    let a = json!({"jwt": env.jwt, "room": env.room, "room_secret": SECRET, "expect": 1, "send": ["FS_GET_MOUNTS"]});
    let r = upstream(&env, &env.path("a"), "raw", a).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    assert!(r["replies"][0].as_str().unwrap().starts_with("FS_MOUNTS_RESPONSE::"), "{r:#}");
    // The wrong secret: AUTH_FAILURE, and the message sent after it is never answered.
    let a = json!({"jwt": env.jwt, "room": env.room, "room_secret": WRONG_SECRET,
        "expect": 1, "send": ["FS_GET_MOUNTS"]});
    let r = upstream(&env, &env.path("b"), "raw", a).await;
    assert_eq!(r["ok"], false, "{r:#}");
    assert!(r["error"].as_str().unwrap().contains("Authentication failed: invalid"), "{r:#}");
}

/// The Python CLI's video-path resolution (and the TUI's): the user locates one moved video,
/// the worker proposes the same prefix change for the others, and a copy of the labels pointing
/// at the located files is written into the mount, never over an existing file nor outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_videos_are_fixed_by_a_prefix_change_and_a_rewritten_slp() {
    let env = env().await;
    let py = upstream_python();
    let (_w, labels) = worker_with_mount(&env, &["--python", &py], "batch_ms=10").await;
    let mount = labels.parent().unwrap().to_path_buf();
    for day in ["day1/fly1.mp4", "day2/fly2.mp4"] {
        let p = mount.join("share").join(day);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"not really a video").unwrap();
    }
    let (old1, old2, old3) = ("/lab/old-share/day1/fly1.mp4", "/lab/old-share/day2/fly2.mp4", "/elsewhere/fly3.mp4");
    let slp = mount.join("session.slp");
    let a = json!({"jwt": env.jwt, "template": asset("labels.pkg.slp"), "out": slp, "videos": [old1, old2, old3]});
    assert_eq!(upstream(&env, &env.path("maker"), "make_slp", a).await["ok"], true);
    let m = mount.display().to_string();
    let (new1, new2) = (format!("{m}/share/day1/fly1.mp4"), format!("{m}/share/day2/fly2.mp4"));
    let slp = slp.display().to_string();
    let write = |out_dir: &str, map: Value, name: Option<&str>| {
        let mut req = json!({"slp_path": slp, "output_dir": out_dir, "filename_map": map});
        if let Some(n) = name {
            req["output_filename"] = json!(n);
        }
        format!("FS_WRITE_SLP::{req}")
    };
    let map = json!({old1: new1, old2: new2});
    let send = json!([
        format!(
            "FS_RESOLVE_WITH_PREFIX::{}",
            json!({"original_path": old1, "new_path": new1, "other_missing": [old2, old3]})
        ),
        format!(
            "FS_RESOLVE_WITH_PREFIX::{}",
            json!({"original_path": old1, "new_path": "/etc/hosts", "other_missing": []})
        ),
        r#"FS_APPLY_PREFIX::{"confirmed": true}"#,
        write(&m, map.clone(), Some("fixed.slp")),
        write(&m, map.clone(), Some("fixed.slp")),
        write(&m, map.clone(), Some("../../escape.slp")),
        write("/tmp", map.clone(), None),
        write(&m, json!({old3: "/etc/passwd"}), None),
        write(&m, map, None),
        format!("USE_WORKER_PATH::{m}/fixed.slp"),
    ]);
    let a = json!({"jwt": env.jwt, "room": env.room, "register_key": true, "expect": 11, "send": send});
    let r = upstream(&env, &env.path("home"), "raw", a).await;
    assert_eq!(r["ok"], true, "{r:#}\n{}", log_of(&env));
    let replies: Vec<&str> = r["replies"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let json_of = |m: &str| -> Value { serde_json::from_str(m.split_once("::").unwrap().1).unwrap() };
    assert!(replies[0].starts_with("FS_PREFIX_PROPOSAL::"), "{replies:#?}");
    let proposal = json_of(replies[0]);
    assert_eq!(proposal["old_prefix"], "/lab/old-share");
    assert_eq!(proposal["new_prefix"], format!("{m}/share"));
    assert_eq!(proposal["would_resolve"], json!([{"original": old2, "resolved": new2}]), "{proposal:#}");
    assert_eq!(proposal["would_not_resolve"], json!([old3]));
    assert!(replies[1].starts_with("FS_ERROR::ACCESS_DENIED::"), "{}", replies[1]);
    assert_eq!(replies[2], r#"FS_PREFIX_APPLIED::{"success":true}"#);
    let written = json_of(replies[3]);
    assert!(replies[3].starts_with("FS_WRITE_SLP_OK::"), "{}\n{}", replies[3], log_of(&env));
    assert_eq!(
        (written["output_path"].as_str(), written["videos_updated"].as_u64()),
        (Some(&*format!("{m}/fixed.slp")), Some(2))
    );
    // The same name again is not overwritten; a name with directories is cut to its base name.
    assert_eq!(json_of(replies[4])["output_path"], format!("{m}/fixed_2.slp"));
    assert_eq!(json_of(replies[5])["output_path"], format!("{m}/escape.slp"));
    assert!(!mount.parent().unwrap().join("escape.slp").exists());
    assert!(
        replies[6].starts_with("FS_WRITE_SLP_ERROR::") && replies[6].contains("outside configured mounts"),
        "{}",
        replies[6]
    );
    assert!(replies[7].starts_with("FS_WRITE_SLP_ERROR::") && replies[7].contains(old3), "{}", replies[7]);
    let default = json_of(replies[8])["output_path"].as_str().unwrap().to_owned();
    let name = default.strip_prefix(&format!("{m}/resolved_")).expect("upstream's default name");
    assert!(name.len() == "20261207_session.slp".len() && name.ends_with("_session.slp"), "{default}");
    // The rewritten labels name the located files: the path check finds them.
    assert_eq!(replies[9], format!("WORKER_PATH_OK::{m}/fixed.slp"));
    let check = json_of(replies[10]);
    assert_eq!((check["total_videos"].as_u64(), check["accessible"].as_u64()), (Some(3), Some(2)), "{check:#}");
    assert_eq!(check["missing"][0]["original_path"], old3);
    // Nothing half-written is left behind.
    let mut stray: Vec<_> =
        walk(&mount).into_iter().filter(|p| p.to_string_lossy().contains(".sleap-rtc-write")).collect();
    stray.extend(walk(&env.path("w")).into_iter().filter(|p| p.to_string_lossy().contains(".slp-map-")));
    assert!(stray.is_empty(), "{stray:?}");
}
