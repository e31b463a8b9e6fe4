//! The room model registry on the local store: publish, alias, pull with verification, 16
//! concurrent publishers in separate processes, corrupt manifests, and a worker publishing what it
//! trained. (The S3 store is not built yet.)

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

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

async fn models(env: &Env, registry: &Path, args: &[&str]) -> (i32, String, String) {
    let reg = registry.display().to_string();
    let mut all = vec!["models"];
    all.extend_from_slice(&args[..1]);
    all.extend(["--registry", &reg]);
    all.extend_from_slice(&args[1..]);
    let out = env.cmd(&all).output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn manifest(registry: &Path, room: &str) -> Value {
    serde_json::from_slice(&std::fs::read(registry.join(room).join("manifest.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_alias_tag_pull_verified() {
    let env = env().await;
    let reg = env.path("registry");
    let run = run_dir(env.dir.path(), "run1", 7);
    let (code, id, err) =
        models(&env, &reg, &["push", run.to_str().unwrap(), "--alias", "v1", "--tag", "baseline"]).await;
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();
    // Pushing the same run again is the same model.
    let (code, id2, _) = models(&env, &reg, &["push", run.to_str().unwrap(), "--alias", "v1"]).await;
    assert_eq!((code, id2.trim()), (0, id.as_str()));
    let m = manifest(&reg, &env.room);
    assert_eq!(m["models"].as_object().unwrap().len(), 1);
    assert_eq!(m["aliases"]["v1"], id.as_str());
    let files: Vec<&str> =
        m["models"][&id]["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert!(files.contains(&"best.ckpt") && !files.contains(&"labels_pr.train.0.slp"), "{files:?}");
    let (code, _, _) = models(&env, &reg, &["alias", &id[..6], "prod"]).await;
    assert_eq!(code, 0, "prefix resolves");
    let (code, out, _) = models(&env, &reg, &["show", "prod"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("baseline") && out.contains("prod") && out.contains("v1"), "{out}");
    // Pull by alias: byte-identical files.
    let (code, dir, err) = models(&env, &reg, &["pull", "prod", "-o", env.path("pulled").to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let dir = PathBuf::from(dir.trim());
    assert_eq!(std::fs::read(dir.join("best.ckpt")).unwrap(), std::fs::read(run.join("best.ckpt")).unwrap());
    // A corrupted stored file is caught and not installed.
    std::fs::write(reg.join(&env.room).join("models").join(&id).join("best.ckpt"), b"tampered").unwrap();
    let out2 = env.path("pulled2");
    let (code, _, err) = models(&env, &reg, &["pull", "v1", "-o", out2.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert!(err.contains("does not match"), "{err}");
    assert!(!out2.join(&id).join("best.ckpt").exists());
    // Unknown names say so.
    let (code, _, err) = models(&env, &reg, &["show", "nope"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no model nope"), "{err}");
    let (code, _, _) = models(&env, &reg, &["rm", "v1"]).await;
    assert_eq!(code, 0);
    assert!(manifest(&reg, &env.room)["aliases"].as_object().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_publishers_at_once_lose_nothing() {
    let env = env().await;
    let reg = env.path("registry");
    let runs: Vec<PathBuf> = (0..16).map(|i| run_dir(env.dir.path(), &format!("run{i}"), i as u8)).collect();
    let regs = reg.display().to_string();
    let mut children = Vec::new();
    for r in &runs {
        let args = ["models", "push", "--registry", &regs, r.to_str().unwrap()];
        children.push(
            env.cmd(&args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap(),
        );
    }
    for mut c in children {
        assert!(c.wait().await.unwrap().success());
    }
    let m = manifest(&reg, &env.room);
    assert_eq!(m["models"].as_object().unwrap().len(), 16, "no lost update");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_manifest_is_refused_and_left_untouched() {
    let env = env().await;
    let reg = env.path("registry");
    std::fs::create_dir_all(reg.join(&env.room)).unwrap();
    let path = reg.join(&env.room).join("manifest.json");
    std::fs::write(&path, b"{\"version\": \"1.0\", \"room_id\": ").unwrap();
    let run = run_dir(env.dir.path(), "run1", 1);
    let (code, _, err) = models(&env, &reg, &["push", run.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert!(err.contains("corrupt") && err.contains("untouched"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"{\"version\": \"1.0\", \"room_id\": ");
    let (code, _, err) = models(&env, &reg, &["list"]).await;
    assert_eq!(code, 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_publishes_what_it_trained() {
    let env = env().await;
    let reg = env.path("registry");
    let regs = reg.display().to_string();
    let _w = env.worker("w", &["--registry", &regs], "").await;
    let wid = env.worker_id(&env.path("w"));
    let cfg = env.config("cfg.yaml", "");
    let (code, events, err) = Client::spawn(&env, &env.train_args(&cfg, "out")).finish(60).await;
    assert_eq!(code, 0, "{err}");
    let d = done(&events);
    let published = d["published"].as_array().expect("published ids");
    assert_eq!(published.len(), 1, "{d}");
    let id = published[0].as_str().unwrap();
    let m = manifest(&reg, &env.room);
    let e = &m["models"][id];
    assert_eq!(e["available_on_workers"][0], wid.as_str());
    assert_eq!(e["training"]["epochs"], 2);
    assert!(!e["trained_by"].as_str().unwrap().is_empty());
    // The model in the registry is the model the client got back.
    let (code, dir, err) = models(&env, &reg, &["pull", id, "-o", env.path("pulled").to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(PathBuf::from(dir.trim()).join("best.ckpt")).unwrap(),
        std::fs::read(env.path("out/single_instance/best.ckpt")).unwrap()
    );
}
