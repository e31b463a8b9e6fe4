//! The same flows against the real sleap-nn (PyPI `sleap-nn==0.3.5`, ~7 GB with torch), which CI
//! does not install. Run them with:
//!
//! ```text
//! SLEAP_NN=~/.cache/sleap-rtc/sleap-nn-venv/bin/sleap-nn \
//!     cargo test -p sleap-rtc --test real_sleap_nn -- --ignored --nocapture
//! ```
//!
//! `scripts/quickstart.sh` creates that venv. Timings are printed (not asserted).

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::*;

fn real() -> PathBuf {
    PathBuf::from(std::env::var("SLEAP_NN").expect("set SLEAP_NN to the real sleap-nn executable"))
}

fn with_real(env: &mut Env) {
    env.fake = real();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real sleap-nn: SLEAP_NN=/path/to/sleap-nn cargo test -p sleap-rtc --test real_sleap_nn -- --ignored"]
async fn real_train_then_track() {
    let mut env = env().await;
    with_real(&mut env);
    let _w = env.worker("w", &["--device", "cpu"], "").await;
    // sleap-nn-interface.md's run2: 20 epochs of 10 steps trains a model that finds the animal.
    let cfg = env.config("cfg.yaml", "");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text = text.replace("min_train_steps_per_epoch: 5", "min_train_steps_per_epoch: 10");
    std::fs::write(&cfg, text).unwrap();
    let mut args = env.train_args(&cfg, "out");
    args.extend(["--max-epochs".into(), "20".into(), "--run-name".into(), "run2".into()]);
    let t0 = Instant::now();
    let (code, events, err) = Client::spawn(&env, &args).finish(600).await;
    let train_secs = t0.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{err}\n{events:#?}");
    assert_eq!(done(&events)["state"], "completed");
    let epochs = events.iter().filter(|e| is_epoch_end(e)).count();
    assert_eq!(epochs, 20);
    let run = env.path("out/run2");
    assert!(run.join("best.ckpt").is_file());

    let preds = env.path("preds.slp");
    let args = env.track_args(run.to_str().unwrap(), &preds);
    let t1 = Instant::now();
    let (code, events, err) = Client::spawn(&env, &args).finish(600).await;
    let track_secs = t1.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{err}\n{events:#?}");
    // Load the predictions with sleap-io from the same venv.
    let python = real().parent().unwrap().join("python");
    let out = std::process::Command::new(python)
        .args([
            "-c",
            "import sys, sleap_io as sio; l = sio.load_slp(sys.argv[1]); \
             print(len(l), sum(len(f.predicted_instances) for f in l))",
            preds.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<usize> = text.split_whitespace().filter_map(|s| s.parse().ok()).collect();
    assert_eq!(nums.len(), 2, "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(nums[0], 16, "16 frames predicted");
    assert!(nums[1] > 0, "the trained model found animals");
    eprintln!(
        "real sleap-nn: train 20 epochs {train_secs:.1} s, track {track_secs:.1} s, {} predicted instances",
        nums[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real sleap-nn: SLEAP_NN=/path/to/sleap-nn cargo test -p sleap-rtc --test real_sleap_nn -- --ignored"]
async fn real_stop_early_and_cancel() {
    let mut env = env().await;
    with_real(&mut env);
    let _w = env.worker("w", &["--device", "cpu"], "").await;
    let cfg = env.config("cfg.yaml", "");
    let mut args = env.train_args(&cfg, "stop");
    args.extend(["--max-epochs".into(), "50".into()]);
    let mut c = Client::spawn(&env, &args);
    c.until(120, is_epoch_end).await;
    let t = Instant::now();
    c.signal(SIGINT);
    let (code, events, err) = c.finish(300).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(done(&events)["state"], "stopped_early");
    assert!(env.path("stop/single_instance/best.ckpt").is_file());
    eprintln!("real sleap-nn: stop → results in {:.1} s", t.elapsed().as_secs_f64());

    let mut c = Client::spawn(&env, &env.train_args(&cfg, "cancel"));
    c.until(120, |e| e["progress"]["event"] == "train_begin").await;
    let t = Instant::now();
    c.signal(SIGINT);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    c.signal(SIGINT);
    let (code, events, err) = c.finish(120).await;
    assert_eq!(code, 130, "{err}");
    assert_eq!(done(&events)["state"], "cancelled");
    eprintln!("real sleap-nn: cancel → done in {:.1} s", t.elapsed().as_secs_f64());
}
