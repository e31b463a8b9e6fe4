//! A room member turned hostile, with a genuine ticket (so past the authentication that
//! `peer_auth.rs` tests), against a real `sleap-rtc worker` process: paths in job specs and
//! names in uploads that try to leave the worker's directories (`..`, absolute paths, NUL,
//! look-alike slashes, bidi controls, device names, symlinks inside the mounts and in the
//! worker's own upload cache). Each is refused, and nothing is read or written outside.

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};

fn cfg() -> String {
    std::fs::read_to_string(asset("tiny_single.yaml")).unwrap()
}

/// Waits for a message of type `ty` (skipping job state/log/progress chatter).
async fn until(c: &sleap_rtc_tokio::PeerConnection, ty: &str) -> Value {
    loop {
        let m = next_ctl(c).await.unwrap_or_else(|| panic!("connection closed while waiting for {ty}"));
        if m["type"] == ty {
            return m;
        }
    }
}

/// Every file under `dir`, for "nothing appeared" checks.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_in_job_specs_are_refused() {
    let env = env().await;
    let mnt = env.path("mnt");
    let secret = env.path("secret");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("labels.slp"), "not yours").unwrap();
    // Links inside the mount that lead out of it.
    std::os::unix::fs::symlink(&secret, mnt.join("escape")).unwrap();
    std::os::unix::fs::symlink(secret.join("labels.slp"), mnt.join("link.slp")).unwrap();
    let m = mnt.display().to_string();
    let _w = env.worker("w", &["--mount", &m], "").await;
    let wid = env.worker_id(&env.path("w"));
    let sig = signaling_client(&env).await;
    let c = authed_connection(&sig, &wid).await;

    let cases = [
        ("../secret/labels.slp".to_owned(), "INVALID_PATH"),
        ("a/../../secret/labels.slp".to_owned(), "INVALID_PATH"),
        (format!("{m}/../secret/labels.slp"), "INVALID_PATH"),
        (format!("{m}/escape/labels.slp"), "NOT_ALLOWED"),
        (format!("{m}/link.slp"), "NOT_ALLOWED"),
        ("/etc/passwd".to_owned(), "NOT_ALLOWED"),
        ("/nonexistent/outside.slp".to_owned(), "NOT_ALLOWED"),
        ("labels\0.pkg.slp".to_owned(), "INVALID_PATH"),
        (format!("{m}/x\0/../../etc/passwd"), "INVALID_PATH"),
        ("labels\u{2215}..\u{2215}x.slp".to_owned(), "INVALID_PATH"),
        ("\u{202E}pls.slp".to_owned(), "INVALID_PATH"),
        ("CON.slp".to_owned(), "INVALID_PATH"),
        ("C:\\secret\\labels.slp".to_owned(), "INVALID_PATH"),
        ("model:../secret".to_owned(), "INVALID_PATH"),
    ];
    for (i, (path, code)) in cases.iter().enumerate() {
        let id = format!("bad-{i}");
        c.send_message(&json!({"type": "job_submit", "client_job_id": id,
            "spec": {"type": "train", "config_contents": [cfg()], "labels_path": path}}))
            .unwrap();
        let r = until(&c, "job_rejected").await;
        assert_eq!(r["client_job_id"], id);
        let errors = r["errors"].as_array().unwrap();
        assert!(
            errors.iter().any(|e| e["field"] == "labels_path" && e["code"] == *code),
            "{path:?}: expected {code}, got {r}"
        );
    }
    // The connection is still usable and no job ever started.
    assert!(files_under(&env.path("w/jobs")).is_empty(), "{:?}", files_under(&env.path("w/jobs")));
    assert_eq!(std::fs::read_to_string(secret.join("labels.slp")).unwrap(), "not yours");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_in_uploads_are_refused_and_nothing_escapes() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let wid = env.worker_id(&env.path("w"));
    let sig = signaling_client(&env).await;
    let c = authed_connection(&sig, &wid).await;
    let body = b"secret";
    let hash = blake3::hash(body).to_hex().to_string();
    let escape = env.path("escape.txt");
    let names = [
        "../../../escape.txt".to_owned(),
        "../../../../../../../../../../../../tmp/sleap-rtc-escape.txt".to_owned(),
        format!("{}", escape.display()),
        "a/../../escape.txt".to_owned(),
        "./labels.pkg.slp".to_owned(),
        "x\0y.txt".to_owned(),
        "x\u{2215}..\u{2215}..\u{2215}escape.txt".to_owned(),
        "..\u{FF0F}escape.txt".to_owned(),
        "\u{202E}txt.exe".to_owned(),
        "a\\..\\..\\escape.txt".to_owned(),
        "NUL".to_owned(),
        "trailing.dot.".to_owned(),
        "labels.pkg.slp.part".to_owned(),
        "\u{200B}".to_owned(),
    ];
    for (i, name) in names.iter().enumerate() {
        let id = format!("up-{i}");
        c.send_message(&json!({"type": "job_submit", "client_job_id": id,
            "spec": {"type": "train", "config_contents": [cfg()], "labels_path": "labels.pkg.slp"},
            "files": [{"name": "labels.pkg.slp", "size": body.len(), "blake3": hash}]}))
            .unwrap();
        let accepted = until(&c, "job_accepted").await;
        assert_eq!(accepted["client_job_id"], id);
        // The upload that follows names something else.
        c.send_message(&json!({"type": "transfer_offer", "transfer_id": 1000 + i,
            "manifest": {"files": [{"name": name, "size": body.len(), "blake3": hash}]}}))
            .unwrap();
        // The worker refuses the offer (UNSAFE_NAME) before touching the disk, and the job
        // that waited for it fails saying why.
        let done = until(&c, "job_done").await;
        assert_eq!(done["status"]["state"], "failed", "{name:?}: {done}");
        let why = done["status"]["message"].as_str().unwrap_or_default();
        assert!(why.starts_with("upload failed") && why.contains("unsafe file name"), "{name:?}: {why}");
    }
    assert!(!escape.exists());
    assert!(!Path::new("/tmp/sleap-rtc-escape.txt").exists());
    // Nothing anywhere in the test's directory (the worker's included) holds the bytes or is
    // named like the escape; the jobs hold nothing but their journals.
    for f in files_under(env.path("").as_path()) {
        assert!(!f.contains("escape"), "{f} appeared");
        if f.contains("/w/jobs/") {
            assert!(f.ends_with("job.json"), "unexpected file {f}");
        }
        if std::fs::metadata(&f).map(|m| m.len() == body.len() as u64).unwrap_or(false) {
            assert_ne!(std::fs::read(&f).unwrap(), body, "{f} holds the uploaded bytes");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_planted_in_the_upload_cache_is_not_followed() {
    let env = env().await;
    let _w = env.worker("w", &[], "").await;
    let wid = env.worker_id(&env.path("w"));
    let data = std::fs::read(asset("labels.pkg.slp")).unwrap();
    let hash = blake3::hash(&data).to_hex().to_string();
    // Someone with access to the worker's directory points the cache entry for this exact
    // content at a file of theirs of the same size.
    let decoy = env.path("decoy.bin");
    std::fs::write(&decoy, vec![b'd'; data.len()]).unwrap();
    let cache = env.path("w/upload-cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::os::unix::fs::symlink(&decoy, cache.join(&hash)).unwrap();

    let sig = signaling_client(&env).await;
    let c = authed_connection(&sig, &wid).await;
    c.send_message(&json!({"type": "job_submit", "client_job_id": "j",
        "spec": {"type": "train", "config_contents": [cfg()], "labels_path": "labels.pkg.slp"},
        "files": [{"name": "labels.pkg.slp", "size": data.len(), "blake3": hash}]}))
        .unwrap();
    let job_id = until(&c, "job_accepted").await["job_id"].as_str().unwrap().to_owned();
    let up = env.path("labels.pkg.slp");
    std::fs::write(&up, &data).unwrap();
    let sent = c.send_files(&[up]).await.unwrap().finish().await.unwrap();
    assert!(sent.failed.is_empty(), "{:?}", sent.failed);
    c.send_message(&json!({"type": "job_cancel", "job_id": job_id})).unwrap();
    until(&c, "job_done").await;
    let input = env.path(&format!("w/jobs/{job_id}/input/labels.pkg.slp"));
    assert_eq!(std::fs::read(&input).unwrap(), data, "the job got the client's bytes");
    assert_eq!(std::fs::read(&decoy).unwrap(), vec![b'd'; data.len()], "the decoy was neither read in nor written");
    assert!(std::fs::symlink_metadata(cache.join(&hash)).unwrap().file_type().is_symlink());
}
