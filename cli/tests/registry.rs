//! The room model registry on both stores, a directory and S3 (a real moto server on 127.0.0.1):
//! publish, alias, pull with verification, 16 concurrent publishers in separate processes, corrupt
//! manifests, and a worker publishing what it trained.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A moto S3 server for one test, killed on drop.
struct Moto {
    child: std::process::Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn moto() -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = std::process::Command::new(python())
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python with moto[server] (scripts/test.sh installs it)");
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if reqwest::get(format!("{url}/moto-api/")).await.is_ok() {
            return Moto { child, url };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("moto did not start");
}

/// Where the registry lives for one test.
enum Reg {
    Dir(PathBuf),
    S3 { moto: Moto, bucket: String },
}

impl Reg {
    async fn new(env: &Env, s3: bool) -> Reg {
        if !s3 {
            return Reg::Dir(env.path("registry"));
        }
        let moto = moto().await;
        let bucket = "sleap-rtc-models".to_owned();
        boto(&moto, &format!("s3.create_bucket(Bucket='{bucket}')"), b"").await;
        Reg::S3 { moto, bucket }
    }

    fn spec(&self) -> String {
        match self {
            Reg::Dir(p) => p.display().to_string(),
            Reg::S3 { bucket, .. } => format!("s3://{bucket}/registry"),
        }
    }

    /// A `sleap-rtc` command that can reach the store.
    fn cmd(&self, env: &Env, args: &[&str]) -> tokio::process::Command {
        let mut c = env.cmd(args);
        if let Reg::S3 { moto, .. } = self {
            c.env("AWS_ENDPOINT_URL", &moto.url)
                .env("AWS_REGION", "us-east-1")
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env_remove("AWS_PROFILE");
        }
        c
    }

    async fn models(&self, env: &Env, args: &[&str]) -> (i32, String, String) {
        let spec = self.spec();
        let mut all = vec!["models"];
        all.extend_from_slice(&args[..1]);
        all.extend(["--registry", &spec]);
        all.extend_from_slice(&args[1..]);
        let out = self.cmd(env, &all).output().await.unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn manifest(&self, env: &Env) -> Value {
        let (code, out, err) = self.models(env, &["list", "--json"]).await;
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    }

    /// Raw bytes of the stored manifest.
    async fn raw_manifest(&self, env: &Env) -> Vec<u8> {
        match self {
            Reg::Dir(p) => std::fs::read(p.join(&env.room).join("manifest.json")).unwrap(),
            Reg::S3 { moto, bucket } => boto(moto, &format!(
                "import sys; sys.stdout.buffer.write(s3.get_object(Bucket='{bucket}', Key='registry/{}/manifest.json')['Body'].read())",
                env.room
            ), b"")
            .await,
        }
    }

    async fn put_raw(&self, env: &Env, path: &str, bytes: &[u8]) {
        match self {
            Reg::Dir(p) => {
                let f = p.join(&env.room).join(path);
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(f, bytes).unwrap();
            }
            Reg::S3 { moto, bucket } => {
                let code = format!(
                    "import sys; s3.put_object(Bucket='{bucket}', Key='registry/{}/{path}', Body=sys.stdin.buffer.read())",
                    env.room
                );
                boto(moto, &code, bytes).await;
            }
        }
    }
}

/// Runs `code` with a boto3 client `s3` for this moto (raw access behind the registry's back).
async fn boto(moto: &Moto, code: &str, stdin: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncWriteExt;
    let prelude = format!(
        "import boto3; s3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
         aws_access_key_id='test', aws_secret_access_key='test')\n",
        moto.url
    );
    let mut c = tokio::process::Command::new(python())
        .args(["-c", &format!("{prelude}{code}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut i = c.stdin.take().unwrap();
    i.write_all(stdin).await.unwrap();
    drop(i);
    let out = c.wait_with_output().await.unwrap();
    assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn run_dir(root: &Path, name: &str, seed: u8) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let cfg = std::fs::read_to_string(asset("tiny_single.yaml")).unwrap();
    std::fs::write(d.join("training_config.yaml"), format!("{cfg}# run {name}\n")).unwrap();
    std::fs::write(d.join("best.ckpt"), vec![seed; 100_000]).unwrap();
    std::fs::write(d.join("labels_gt.train.0.slp"), b"train split").unwrap();
    std::fs::write(d.join("labels_pr.train.0.slp"), b"not part of a model").unwrap();
    d
}

async fn push_alias_tag_pull_verified(s3: bool) {
    let env = env().await;
    let reg = Reg::new(&env, s3).await;
    let run = run_dir(env.dir.path(), "run1", 7);
    let (code, id, err) =
        reg.models(&env, &["push", run.to_str().unwrap(), "--alias", "v1", "--tag", "baseline"]).await;
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();
    // Pushing the same training again is the same model, and its published files stay (their
    // hashes are in the manifest) even if the new weights differ.
    std::fs::write(run.join("best.ckpt"), vec![8u8; 100_000]).unwrap();
    let (code, id2, _) = reg.models(&env, &["push", run.to_str().unwrap(), "--alias", "v1"]).await;
    assert_eq!((code, id2.trim()), (0, id.as_str()));
    std::fs::write(run.join("best.ckpt"), vec![7u8; 100_000]).unwrap();
    let m = reg.manifest(&env).await;
    assert_eq!(m["models"].as_object().unwrap().len(), 1);
    assert_eq!(m["aliases"]["v1"], id.as_str());
    let files: Vec<&str> =
        m["models"][&id]["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert!(files.contains(&"best.ckpt") && !files.contains(&"labels_pr.train.0.slp"), "{files:?}");
    if s3 {
        assert!(m["models"][&id]["s3_path"].as_str().unwrap().starts_with("s3://sleap-rtc-models/registry/"));
    }
    let (code, _, _) = reg.models(&env, &["alias", &id[..6], "prod"]).await;
    assert_eq!(code, 0, "prefix resolves");
    let (code, out, _) = reg.models(&env, &["show", "prod"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("baseline") && out.contains("prod") && out.contains("v1"), "{out}");
    // Pull by alias: byte-identical files.
    let (code, dir, err) = reg.models(&env, &["pull", "prod", "-o", env.path("pulled").to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let dir = PathBuf::from(dir.trim());
    assert_eq!(std::fs::read(dir.join("best.ckpt")).unwrap(), std::fs::read(run.join("best.ckpt")).unwrap());
    // A corrupted stored file is caught and not installed.
    reg.put_raw(&env, &format!("models/{id}/best.ckpt"), b"tampered").await;
    let out2 = env.path("pulled2");
    let (code, _, err) = reg.models(&env, &["pull", "v1", "-o", out2.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert!(err.contains("does not match"), "{err}");
    assert!(!out2.join(&id).join("best.ckpt").exists());
    let (code, _, err) = reg.models(&env, &["show", "nope"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no model nope"), "{err}");
    let (code, _, _) = reg.models(&env, &["rm", "v1"]).await;
    assert_eq!(code, 0);
    assert!(reg.manifest(&env).await["aliases"].as_object().unwrap().is_empty());
}

async fn sixteen_publishers_at_once_lose_nothing(s3: bool) {
    let env = env().await;
    let reg = Reg::new(&env, s3).await;
    let runs: Vec<PathBuf> = (0..16).map(|i| run_dir(env.dir.path(), &format!("run{i}"), i as u8)).collect();
    let spec = reg.spec();
    let mut children = Vec::new();
    for r in &runs {
        let args = ["models", "push", "--registry", &spec, r.to_str().unwrap()];
        children.push(reg.cmd(&env, &args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
    }
    for c in children {
        let out = c.wait_with_output().await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(reg.manifest(&env).await["models"].as_object().unwrap().len(), 16, "no lost update");
}

async fn a_corrupt_manifest_is_refused_and_left_untouched(s3: bool) {
    let env = env().await;
    let reg = Reg::new(&env, s3).await;
    let garbage = b"{\"version\": \"1.0\", \"room_id\": ";
    reg.put_raw(&env, "manifest.json", garbage).await;
    let run = run_dir(env.dir.path(), "run1", 1);
    let (code, _, err) = reg.models(&env, &["push", run.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert!(err.contains("corrupt") && err.contains("untouched"), "{err}");
    assert_eq!(reg.raw_manifest(&env).await, garbage);
    let (code, _, _) = reg.models(&env, &["list"]).await;
    assert_eq!(code, 1);
}

/// A worker process with `--registry`; returns it and its peer id.
async fn registry_worker(env: &Env, reg: &Reg, name: &str, extra: &[&str]) -> (tokio::process::Child, String) {
    let spec = reg.spec();
    let wd = env.path(name).display().to_string();
    let fake = env.fake.display().to_string();
    let mut args = vec![
        "worker",
        "--token",
        &env.token,
        "--bind",
        "127.0.0.1",
        "--work-dir",
        &wd,
        "--sleap-nn",
        &fake,
        "--registry",
        &spec,
    ];
    args.extend_from_slice(extra);
    let log = std::fs::File::create(env.path(&format!("{name}.log"))).unwrap();
    let w = reg.cmd(env, &args).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(log).spawn().unwrap();
    for _ in 0..400 {
        let id = env.worker_id(&env.path(name));
        if !id.is_empty() && env.worker_ids().await.contains(&id) {
            return (w, id);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("worker did not register");
}

async fn a_worker_publishes_what_it_trained(s3: bool) {
    let env = env().await;
    let reg = Reg::new(&env, s3).await;
    let (_w, wid) = registry_worker(&env, &reg, "w", &[]).await;
    let cfg = env.config("cfg.yaml", "");
    let (code, events, err) = Client::spawn(&env, &env.train_args(&cfg, "out")).finish(60).await;
    assert_eq!(code, 0, "{err}");
    let d = done(&events);
    let published = d["published"].as_array().expect("published ids");
    assert_eq!(published.len(), 1, "{d}\n{}", std::fs::read_to_string(env.path("w.log")).unwrap_or_default());
    let id = published[0].as_str().unwrap();
    let m = reg.manifest(&env).await;
    let e = &m["models"][id];
    assert_eq!(e["available_on_workers"][0], wid.as_str());
    assert_eq!(e["training"]["epochs"], 2);
    assert!(!e["trained_by"].as_str().unwrap().is_empty());
    // The model in the registry is the model the client got back.
    let (code, dir, err) = reg.models(&env, &["pull", id, "-o", env.path("pulled").to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(PathBuf::from(dir.trim()).join("best.ckpt")).unwrap(),
        std::fs::read(env.path("out/single_instance/best.ckpt")).unwrap()
    );
}

async fn track_with_a_registry_model_fetched_by_another_worker(s3: bool) {
    let env = env().await;
    let reg = Reg::new(&env, s3).await;
    let run = run_dir(env.dir.path(), "run1", 3);
    let (code, id, err) = reg.models(&env, &["push", run.to_str().unwrap(), "--alias", "prod"]).await;
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();
    let (_w, wid) = registry_worker(&env, &reg, "w2", &["--model-cache-gb", "0"]).await;
    let track = |model: &str, out: &str| -> Vec<String> {
        [
            "track",
            "--model",
            model,
            "--data",
            asset("labels.pkg.slp").to_str().unwrap(),
            "-o",
            env.path(out).to_str().unwrap(),
            "--bind",
            "127.0.0.1",
            "--json",
            "--worker",
            &wid,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (code, events, err) = Client::spawn(&env, &track("prod", "p1.slp")).finish(60).await;
    assert_eq!(code, 0, "{err}\n{events:#?}");
    assert!(std::fs::read(env.path("p1.slp")).unwrap().starts_with(b"FAKE-SLP-PREDICTIONS"));
    let cached = env.path("w2/model-cache").join(&id);
    assert!(cached.join(".complete").is_file() && cached.join("best.ckpt").is_file());
    let m = reg.manifest(&env).await;
    assert!(m["models"][&id]["available_on_workers"].as_array().unwrap().iter().any(|w| w == wid.as_str()));
    // The worker answers registry queries through signaling.
    let reg_msg = sleap_rtc_core::signal::Register {
        role: Some("client".into()),
        room_id: Some(env.room.clone()),
        jwt: Some(env.jwt.clone()),
        ..Default::default()
    };
    let sig =
        sleap_rtc_tokio::SignalingClient::connect(&format!("{}/ws", env.url.replace("http://", "ws://")), reg_msg)
            .await
            .unwrap();
    sig.send(serde_json::json!({"type": "peer_message", "to_peer_id": wid,
        "payload": {"type": "registry_query", "model": "prod"}}))
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let env = sig.next_event().await.expect("signaling open");
            if let sleap_rtc_core::signal::ServerMessage::PeerMessage { payload, .. } = env.msg {
                return payload;
            }
        }
    })
    .await
    .expect("an answer");
    assert_eq!(answer["type"], "registry_answer");
    assert_eq!(answer["model_id"], id.as_str());
    assert_eq!(answer["cached"], true);
    // A cache with no room keeps only the model in use: fetching another evicts the first.
    let run2 = run_dir(env.dir.path(), "run2", 4);
    let (code, id2, err) = reg.models(&env, &["push", run2.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let id2 = id2.trim().to_owned();
    let (code, _, err) = Client::spawn(&env, &track(&id2, "p3.slp")).finish(60).await;
    assert_eq!(code, 0, "{err}");
    assert!(env.path("w2/model-cache").join(&id2).join(".complete").is_file());
    assert!(!cached.exists(), "least recently used model evicted");
    // A model the room does not have is refused before anything runs.
    let (code, events, _) = Client::spawn(&env, &track("nosuchmodel", "p2.slp")).finish(60).await;
    assert_eq!(code, 2);
    let r = event(&events, "rejected").unwrap();
    assert_eq!(r["errors"][0]["code"], "PATH_NOT_FOUND");
}

/// A checkpoint above the 64 MiB part size goes up in parts and comes back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_round_trip() {
    let env = env().await;
    let reg = Reg::new(&env, true).await;
    let run = run_dir(env.dir.path(), "big", 9);
    let big: Vec<u8> = (0..70u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(run.join("best.ckpt"), &big).unwrap();
    let (code, id, err) = reg.models(&env, &["push", run.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let (code, dir, err) = reg.models(&env, &["pull", id.trim(), "-o", env.path("pulled").to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(PathBuf::from(dir.trim()).join("best.ckpt")).unwrap() == big);
}

macro_rules! both {
    ($($name:ident),*) => {
        mod local {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(false).await })*
        }
        mod s3 {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(true).await })*
        }
    };
}

both!(
    push_alias_tag_pull_verified,
    sixteen_publishers_at_once_lose_nothing,
    a_corrupt_manifest_is_refused_and_left_untouched,
    a_worker_publishes_what_it_trained,
    track_with_a_registry_model_fetched_by_another_worker
);
