use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;

use super::auth::*;
use super::bridge::*;
use super::*;

const CONFIG: &str = "data_config:\n  train_labels_path: [labels.pkg.slp]\n  val_labels_path: null\nmodel_config:\n  head_configs:\n    single_instance:\n      confmaps: {sigma: 5.0}\n    centroid: null\ntrainer_config:\n  run_name: null\n  max_epochs: 2\n";

fn fields(r: Result<JobSpec, Vec<FieldError>>) -> Vec<(String, ErrorCode)> {
    r.err().unwrap_or_default().into_iter().map(|e| (e.field, e.code)).collect()
}

#[test]
fn train_spec_with_upstream_aliases() {
    let s = parse_spec(&json!({
        "type": "train", "config_path": "cfg.yaml", "labels_path": "labels.pkg.slp",
        "max_epochs": 20, "batch_size": 4, "learning_rate": 0.001, "run_name": "run1",
        "some_future_field": 1
    }))
    .unwrap();
    let JobSpec::Train(t) = s else { panic!("not train") };
    assert_eq!(t.config_paths, vec!["cfg.yaml"]);
    assert_eq!((t.max_epochs, t.batch_size, t.learning_rate), (Some(20), Some(4), Some(0.001)));
    // Round trip through the wire form.
    let back = parse_spec(&serde_json::to_value(JobSpec::Train(t.clone())).unwrap()).unwrap();
    assert_eq!(back, JobSpec::Train(t));
}

#[test]
fn the_singular_config_is_an_alias_not_an_extra_config() {
    // What sleap_rtc 0.0.7's TrainJobSpec(config_content=...).to_json() sends: both forms.
    let yaml = CONFIG;
    let s = parse_spec(&json!({"type": "train", "config_content": yaml, "config_contents": [yaml],
        "config_path": "/m/c.yaml", "config_paths": ["/m/c.yaml"]}))
    .unwrap();
    let JobSpec::Train(t) = s else { panic!("not train") };
    assert_eq!(t.config_contents, vec![yaml]);
    assert_eq!(t.config_paths, vec!["/m/c.yaml"]);
    let s = parse_spec(&json!({"type": "train", "config_content": yaml})).unwrap();
    let JobSpec::Train(t) = s else { panic!("not train") };
    assert_eq!(t.config_contents, vec![yaml]);
}

#[test]
fn inference_outcomes_name_the_clearest_reason() {
    let ok = TrackExit { code: Some(0), output_exists: true, ..Default::default() };
    assert_eq!(classify_track(&ok).0, JobState::Completed);
    let cancelled = TrackExit { cancel_requested: true, ..ok.clone() };
    assert_eq!(classify_track(&cancelled).0, JobState::Cancelled);
    let empty = TrackExit { output_exists: false, ..ok.clone() };
    assert_eq!(classify_track(&empty), (JobState::Failed, "sleap-nn exited 0 but wrote no predictions file".into()));
    let said = TrackExit { code: Some(1), error: Some("Model path does not exist".into()), ..Default::default() };
    assert_eq!(classify_track(&said).1, "Model path does not exist");
    let tail = (0..5).map(|i| format!("line {i}")).collect();
    let code = TrackExit { code: Some(2), stderr_tail: tail, ..Default::default() };
    assert_eq!(classify_track(&code).1, "sleap-nn exited with code 2; last output: line 2 | line 3 | line 4");
    let killed = TrackExit { signal: Some(9), ..Default::default() };
    assert_eq!(classify_track(&killed).1, "sleap-nn was killed by signal 9");
}

#[test]
fn raw_reports_pass_except_batch_ends_beyond_the_rate() {
    let mut r = ReportThrottle::new(Duration::from_millis(100));
    let batch = r#"{"event": "batch_end", "batch": 1}"#;
    assert!(r.pass(r#"{"event": "train_begin", "logs": null}"#, Duration::ZERO));
    assert!(r.pass(batch, Duration::from_millis(1)));
    assert!(!r.pass(batch, Duration::from_millis(50)));
    assert!(r.pass(r#"{"event": "epoch_end", "epoch": 0}"#, Duration::from_millis(51)));
    assert!(r.pass(batch, Duration::from_millis(101)));
    assert!(!r.pass("not json", Duration::from_millis(500)));
    assert!(!r.pass(&format!(r#"{{"event": "epoch_end", "x": "{}"}}"#, "a".repeat(MAX_REPORT)), Duration::ZERO));
}

#[test]
fn every_bad_field_is_reported_at_once() {
    let f = fields(parse_spec(&json!({
        "type": "train", "max_epochs": 0, "batch_size": 257, "learning_rate": 2.0,
        "run_name": "../x", "labels_path": "../../etc/passwd"
    })));
    assert!(f.contains(&("max_epochs".into(), ErrorCode::OutOfRange)), "{f:?}");
    assert!(f.contains(&("batch_size".into(), ErrorCode::OutOfRange)));
    assert!(f.contains(&("learning_rate".into(), ErrorCode::OutOfRange)));
    assert!(f.contains(&("run_name".into(), ErrorCode::InvalidValue)));
    assert!(f.contains(&("labels_path".into(), ErrorCode::InvalidPath)));
    assert!(f.contains(&("config".into(), ErrorCode::MissingConfig)));
}

#[test]
fn upstream_range_edges() {
    let ok = |k: &str, v: Value| parse_spec(&json!({"type": "train", "config_path": "c.yaml", k: v})).is_ok();
    assert!(ok("max_epochs", json!(1)) && ok("max_epochs", json!(10000)) && !ok("max_epochs", json!(10001)));
    assert!(ok("batch_size", json!(256)) && !ok("batch_size", json!(0)));
    assert!(ok("learning_rate", json!(1e-10)) && ok("learning_rate", json!(1.0)) && !ok("learning_rate", json!(0)));
    assert!(ok("max_epochs", json!(5.0)), "an integral float is an integer");
    assert!(!ok("max_epochs", json!(5.5)) && !ok("max_epochs", json!("5")) && !ok("max_epochs", json!(-1)));
    let f = fields(parse_spec(&json!({"type": "train", "config_path": "c.yaml", "max_epochs": "ten"})));
    assert_eq!(f, vec![("max_epochs".to_owned(), ErrorCode::InvalidType)]);
}

#[test]
fn track_spec_rules() {
    let base = json!({"type": "track", "data_path": "data.pkg.slp", "model_paths": ["run1"]});
    let JobSpec::Track(t) = parse_spec(&base).unwrap() else { panic!() };
    assert_eq!(t.frame_filter, None);
    let mut v = base.clone();
    v["only_suggested_frames"] = json!(true);
    let JobSpec::Track(t) = parse_spec(&v).unwrap() else { panic!() };
    assert_eq!(t.frame_filter, Some(FrameFilter::Suggested));
    for (k, val, field) in [
        ("frame_filter", json!("random"), "frame_filter"),
        ("frame_filter", json!("bogus"), "frame_filter"),
        ("peak_threshold", json!(1.5), "peak_threshold"),
        ("frames", json!("0-5,9"), "frames"),
        ("model_paths", json!([]), "model_paths"),
        ("output_path", json!("../x.slp"), "output_path"),
        ("data_path", json!(null), "data_path"),
    ] {
        let mut v = base.clone();
        v[k] = val;
        let f = fields(parse_spec(&v));
        assert!(f.iter().any(|(n, _)| n == field), "{k}: {f:?}");
    }
    assert!(check_frames("1,2,3").is_ok() && check_frames("10-20").is_ok() && check_frames("20-10").is_err());
}

#[test]
fn not_an_object_or_unknown_type() {
    assert_eq!(fields(parse_spec(&json!([1]))), vec![("spec".to_owned(), ErrorCode::InvalidType)]);
    assert_eq!(fields(parse_spec(&json!({"type": "mine"}))), vec![("type".to_owned(), ErrorCode::InvalidValue)]);
    assert_eq!(fields(parse_spec(&json!({}))), vec![("type".to_owned(), ErrorCode::MissingField)]);
}

#[test]
fn paths_are_uploads_or_worker_paths() {
    assert_eq!(classify_path("labels.pkg.slp"), Ok(PathRef::Upload("labels.pkg.slp")));
    assert_eq!(classify_path("run1/best.ckpt"), Ok(PathRef::Upload("run1/best.ckpt")));
    assert_eq!(classify_path("/data/x.slp"), Ok(PathRef::Worker("/data/x.slp")));
    assert_eq!(classify_path("model:a3f5e8c9"), Ok(PathRef::Model("a3f5e8c9")));
    assert!(classify_path("model:../x").is_err() && classify_path("model:").is_err());
    for bad in ["", "../x", "/data/../etc/passwd", "a/../../b", "x\0y"] {
        assert!(classify_path(bad).is_err(), "{bad:?}");
    }
    let spec =
        parse_spec(&json!({"type": "track", "data_path": "/mnt/d.slp", "model_paths": ["m", "/mnt/m2"]})).unwrap();
    let errs = check_paths(&spec, |p| match p {
        PathRef::Worker("/mnt/d.slp") => PathVerdict::NotAllowed,
        PathRef::Worker(_) => PathVerdict::NotFound,
        PathRef::Upload(_) | PathRef::Model(_) => PathVerdict::Ok,
    });
    let got: Vec<_> = errs.iter().map(|e| (e.field.as_str(), e.code)).collect();
    assert_eq!(got, vec![("data_path", ErrorCode::NotAllowed), ("model_paths[1]", ErrorCode::PathNotFound)]);
}

#[test]
fn mapped_paths_are_checked_too() {
    let spec = parse_spec(&json!({"type": "train", "config_path": "c.yaml", "labels_path": "a.pkg.slp",
        "path_mappings": {"a.pkg.slp": "/mnt/data/../../home/u/x.pkg.slp"}}))
    .unwrap()
    .mapped();
    let errs = check_paths(&spec, |_| PathVerdict::Ok);
    assert_eq!(errs.len(), 1);
    assert_eq!((errs[0].field.as_str(), errs[0].code), ("labels_path", ErrorCode::InvalidPath));
}

#[test]
fn path_mappings_exact_then_longest_prefix() {
    let m: BTreeMap<String, String> =
        [("/home/me/data", "/mnt/lab/data"), ("/home/me/data/x.slp", "/mnt/x.slp"), ("/home", "/h")]
            .into_iter()
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect();
    assert_eq!(map_path("/home/me/data/x.slp", &m), "/mnt/x.slp");
    assert_eq!(map_path("/home/me/data/y/z.slp", &m), "/mnt/lab/data/y/z.slp");
    assert_eq!(map_path("/home/other", &m), "/h/other");
    assert_eq!(map_path("/homestead", &m), "/homestead");
}

#[test]
fn state_machine_allows_only_the_documented_edges() {
    use JobState::*;
    let all = [Submitted, Rejected, Accepted, Running, Completed, Failed, StoppedEarly, Cancelled];
    let allowed = [
        (Submitted, Accepted),
        (Submitted, Rejected),
        (Accepted, Running),
        (Accepted, Failed),
        (Accepted, Cancelled),
        (Running, Completed),
        (Running, Failed),
        (Running, StoppedEarly),
        (Running, Cancelled),
    ];
    for a in all {
        for b in all {
            let mut j = Job::new("j", JobKind::Train);
            j.state = a;
            assert_eq!(j.transition(b).is_ok(), allowed.contains(&(a, b)), "{a} -> {b}");
            if a.is_terminal() {
                assert!(!a.can_become(b));
            }
        }
    }
}

#[test]
fn interrupts_escalate_and_do_not_repeat() {
    let mut j = Job::new("j", JobKind::Train);
    j.state = JobState::Running;
    assert_eq!(j.interrupt(Interrupt::Stop), Ok(Some(Interrupt::Stop)));
    assert_eq!(j.interrupt(Interrupt::Stop), Ok(None));
    assert_eq!(j.interrupt(Interrupt::Cancel), Ok(Some(Interrupt::Cancel)));
    assert_eq!(j.interrupt(Interrupt::Cancel), Ok(None));
    j.state = JobState::Cancelled;
    assert!(j.interrupt(Interrupt::Stop).is_err());
    let mut t = Job::new("t", JobKind::Track);
    t.state = JobState::Running;
    assert_eq!(t.interrupt(Interrupt::Stop), Ok(Some(Interrupt::Cancel)), "inference has no epochs to finish");
}

#[test]
fn config_parsing() {
    let c = ConfigInfo::parse(CONFIG).unwrap();
    assert_eq!(c.train_labels, vec!["labels.pkg.slp"]);
    assert_eq!(c.model_type.as_deref(), Some("single_instance"));
    assert_eq!(c.run_name, None);
    assert!(ConfigInfo::parse("- a\n- b").unwrap_err().contains("not a valid YAML mapping"));
    assert!(ConfigInfo::parse("a: [").unwrap_err().contains("Failed to parse"));
    assert!(ConfigInfo::parse("data_config: {}\nmodel_config: {}\n").unwrap_err().contains("trainer_config"));
    let shared = include_str!("../../../cli/assets/tiny_single.yaml");
    assert_eq!(ConfigInfo::parse(shared).unwrap().train_labels, vec!["labels.pkg.slp"]);
}

#[test]
fn train_argv_uses_add_or_override_and_quotes() {
    let spec = TrainSpec { max_epochs: Some(3), batch_size: Some(8), learning_rate: Some(1e-4), ..Default::default() };
    let run = TrainRun {
        config: "/w/jobs/j1/cfg.yaml".into(),
        labels: Some("/w/jobs/j1/my labels,v2.pkg.slp".into()),
        val_labels: None,
        resume: None,
        ckpt_dir: "/w/jobs/j1/runs".into(),
        run_name: "run1".into(),
        publish_port: 40001,
        controller_port: 40002,
    };
    let a = train_args(&spec, &run);
    assert_eq!(&a[..2], &["train", "/w/jobs/j1/cfg.yaml"]);
    assert!(a.contains(&"++data_config.train_labels_path=[\"/w/jobs/j1/my labels,v2.pkg.slp\"]".to_owned()), "{a:?}");
    assert!(a.contains(&"++trainer_config.max_epochs=3".to_owned()));
    assert!(a.contains(&"++trainer_config.val_data_loader.batch_size=8".to_owned()));
    assert!(a.contains(&"++trainer_config.optimizer.lr=1e-4".to_owned()));
    assert!(a.contains(&"++trainer_config.zmq.publish_port=40001".to_owned()));
    assert!(a.contains(&"++trainer_config.zmq.controller_port=40002".to_owned()));
    assert!(a.iter().skip(2).all(|x| x.starts_with("++")));
    assert_eq!(hydra_value("a\"b\\c"), "\"a\\\"b\\\\c\"");
}

#[test]
fn track_argv() {
    let spec = TrackSpec {
        frame_filter: Some(FrameFilter::Suggested),
        frames: Some("0-5".into()),
        batch_size: Some(2),
        ..Default::default()
    };
    let a = track_args(&spec, "/j/d.slp", &["/j/m1".into(), "/j/m2".into()], "/j/out.slp", "auto");
    let s = a.join(" ");
    assert_eq!(
        s,
        "predict --data_path /j/d.slp --model_paths /j/m1 --model_paths /j/m2 --output_path /j/out.slp --device auto --gui --batch_size 2 --only_suggested_frames --frames 0-5"
    );
    assert_eq!(predictions_name("/x/labels.pkg.slp"), "labels.predictions.slp");
    assert_eq!(predictions_name("video.v2.mp4"), "video.v2.predictions.slp");
}

// Verbatim shapes of sleap-nn 0.3.5's ZMQ messages (sleap-nn-output-samples/zmq_run2_pkg.log).
const ZMQ: &[&str] = &[
    r#"{"what": "", "event": "train_begin", "logs": null, "wandb_url": null}"#,
    r#"{"what": "", "event": "epoch_begin", "logs": null, "epoch": 0}"#,
    r#"{"what": "", "event": "batch_start", "logs": null, "batch": 0}"#,
    r#"{"what": "", "event": "batch_end", "logs": {"loss": 0.029713990166783333}, "epoch": 0, "batch": 0}"#,
    r#"{"what": "", "event": "batch_end", "logs": {"loss": 0.02895410731434822}, "epoch": 0, "batch": 1}"#,
    r#"{"what": "", "event": "batch_end", "logs": {"loss": NaN}, "epoch": 0, "batch": 2}"#,
    r#"{"what": "", "event": "epoch_end", "logs": {"loss": 0.0203, "val/loss": 0.0199, "epoch": 0.0}, "epoch": 0}"#,
    r#"{"what": "", "event": "train_end", "logs": null}"#,
];

#[test]
fn progress_relay_throttles_batches_but_not_epochs() {
    let mut r = ProgressRelay::new(Duration::from_millis(250));
    let ms = Duration::from_millis;
    let mut sent = Vec::new();
    for (i, m) in ZMQ.iter().enumerate() {
        sent.extend(r.on_message(m, ms(i as u64 * 10)));
    }
    assert_eq!(
        sent,
        vec![
            Progress::TrainBegin,
            Progress::EpochBegin { epoch: 0 },
            Progress::Batch { epoch: 0, batch: 0, loss: Some(0.029713990166783333) },
            // batches 1 and 2 were held back; the latest (NaN loss → None) goes out before epoch_end
            Progress::Batch { epoch: 0, batch: 2, loss: None },
            Progress::EpochEnd { epoch: 0, loss: Some(0.0203), val_loss: Some(0.0199) },
            Progress::TrainEnd,
        ]
    );
    assert!(r.train_begin && r.train_end);
    assert_eq!(r.on_message("stop", ms(1000)), vec![]);
    assert_eq!(r.on_message("{\"event\": 3}", ms(1000)), vec![]);
    assert_eq!(r.ignored, 2);
}

#[test]
fn progress_relay_releases_a_held_batch_on_poll() {
    let mut r = ProgressRelay::new(Duration::from_millis(250));
    let ms = Duration::from_millis;
    assert_eq!(r.on_message(ZMQ[3], ms(0)).len(), 1);
    assert!(r.on_message(ZMQ[4], ms(10)).is_empty());
    assert_eq!(r.poll_at(), Some(ms(250)));
    assert_eq!(r.poll(ms(100)), None);
    assert_eq!(r.poll(ms(260)), Some(Progress::Batch { epoch: 0, batch: 1, loss: Some(0.02895410731434822) }));
    assert_eq!(r.poll_at(), None);
}

#[test]
fn lenient_json_handles_python_non_finite_floats() {
    assert_eq!(
        lenient_json(r#"{"a": NaN, "b": -Infinity, "c": "NaN in a string"}"#).unwrap()["c"],
        json!("NaN in a string")
    );
    assert_eq!(lenient_json(r#"{"a": Infinity}"#).unwrap()["a"], Value::Null);
    assert!(lenient_json("{\"a\": Nope}").is_none());
}

#[test]
fn inference_lines() {
    assert_eq!(
        parse_inference_line(r#"{"n_processed": 4, "n_total": 16, "rate": 3.8, "eta": 3.1}"#),
        InferenceLine::Progress(Progress::Inference {
            n_processed: 4,
            n_total: Some(16),
            rate: Some(3.8),
            eta: Some(3.1)
        })
    );
    assert_eq!(
        parse_inference_line(r#"{"n_processed": 0, "n_total": null, "rate": 0, "eta": 0}"#),
        InferenceLine::Progress(Progress::Inference { n_processed: 0, n_total: None, rate: Some(0.0), eta: Some(0.0) })
    );
    let e = parse_inference_line(
        r#"{"error": true, "type": "FileNotFoundError", "message": "Model path does not exist: x"}"#,
    );
    assert_eq!(
        e,
        InferenceLine::Error { kind: "FileNotFoundError".into(), message: "Model path does not exist: x".into() }
    );
    assert_eq!(parse_inference_line("2026-11-22 07:15:10 | Using device: cpu"), InferenceLine::Text);
}

#[test]
fn log_coalescer_keeps_lines_and_thins_redraws() {
    let ms = Duration::from_millis;
    let mut c = LogCoalescer::new(Stream::Stdout, ms(500));
    let mut out = c.push(b"2026-11-22 07:03:07 | Starting training loop...\n", ms(0));
    // tqdm: many redraws within 500 ms; only the first and then the latest due one are sent.
    out.extend(c.push(b"\rEpoch 0:  10%|\x1b[32m#\x1b[0m | 1/10 [loss=0.03]", ms(10)));
    out.extend(c.push(b"\rEpoch 0:  20%|## | 2/10 [loss=0.029]", ms(20)));
    out.extend(c.push(b"\rEpoch 0:  30%|### | 3/10 [loss=0.028]", ms(30)));
    assert_eq!(c.poll(ms(100)), None);
    out.extend(c.poll(ms(600)));
    out.extend(c.push(b"\rEpoch 0: 100%|###| 10/10 [loss=0.02]\n", ms(700)));
    out.extend(c.push(b"tail without newline", ms(800)));
    out.extend(c.finish());
    let texts: Vec<_> = out.iter().map(|l| (l.text.as_str(), l.cr)).collect();
    assert_eq!(
        texts,
        vec![
            ("2026-11-22 07:03:07 | Starting training loop...", false),
            ("Epoch 0:  10%|# | 1/10 [loss=0.03]", true),
            ("Epoch 0:  30%|### | 3/10 [loss=0.028]", true),
            ("Epoch 0: 100%|###| 10/10 [loss=0.02]", false),
            ("tail without newline", false),
        ]
    );
}

#[test]
fn success_needs_rc0_train_end_and_best_ckpt() {
    let ok = TrainExit { code: Some(0), train_end: true, best_ckpt: true, ..Default::default() };
    assert_eq!(classify_train(&ok).0, JobState::Completed);
    assert_eq!(classify_train(&TrainExit { stop_requested: true, ..ok }).0, JobState::StoppedEarly);
    assert_eq!(classify_train(&TrainExit { cancel_requested: true, ..ok }).0, JobState::Cancelled);
    // SIGTERM: rc 0 but no train_end.
    let (s, why) = classify_train(&TrainExit { train_end: false, ..ok });
    assert_eq!(s, JobState::Failed);
    assert!(why.contains("never reported"), "{why}");
    assert_eq!(classify_train(&TrainExit { best_ckpt: false, ..ok }).0, JobState::Failed);
    assert_eq!(classify_train(&TrainExit { code: Some(1), train_end: false, ..ok }).0, JobState::Failed);
    // The SIGINT fallback of a stop keeps the checkpoint.
    let sigint =
        TrainExit { code: Some(1), train_end: false, best_ckpt: true, stop_requested: true, ..Default::default() };
    assert_eq!(classify_train(&sigint).0, JobState::StoppedEarly);
    let killed = TrainExit { code: None, signal: Some(9), ..Default::default() };
    assert!(classify_train(&killed).1.contains("signal 9"));
}

fn claims() -> TicketClaims {
    TicketClaims {
        iss: "sleap-rtc".into(),
        aud: TICKET_AUDIENCE.into(),
        sub: "u1".into(),
        room: "r1".into(),
        client: "c1".into(),
        worker: "w1".into(),
        fp: "sha-256 AB:CD".into(),
        iat: 1000,
        exp: 1000 + TICKET_TTL_SECS,
    }
}

#[test]
fn tickets_are_bound_to_the_connection() {
    let e = Expected { room: "r1", worker: "w1", client: "c1", client_fp: "SHA-256 ab:cd" };
    assert_eq!(check_ticket(&claims(), &e, 1010), Ok(()));
    assert_eq!(check_ticket(&claims(), &Expected { room: "r2", ..e.clone() }, 1010), Err(AuthError::WrongRoom));
    assert_eq!(check_ticket(&claims(), &Expected { worker: "w2", ..e.clone() }, 1010), Err(AuthError::WrongWorker));
    assert_eq!(check_ticket(&claims(), &Expected { client: "c2", ..e.clone() }, 1010), Err(AuthError::WrongClient));
    assert_eq!(
        check_ticket(&claims(), &Expected { client_fp: "sha-256 AB:CE", ..e.clone() }, 1010),
        Err(AuthError::WrongFingerprint)
    );
    assert_eq!(check_ticket(&claims(), &e, 1000 + TICKET_TTL_SECS + LEEWAY_SECS + 1), Err(AuthError::Expired));
    let jwt = TicketClaims { aud: "sleap-rtc".into(), ..claims() };
    assert_eq!(check_ticket(&jwt, &e, 1010), Err(AuthError::WrongAudience));
}

#[test]
fn room_secret_mac_binds_every_part() {
    let m = room_secret_mac("s3cret", "r", "n", "w", "c", "sha-256 AA", "sha-256 BB");
    assert!(mac_matches(&m, &m));
    assert!(mac_matches(&m, &room_secret_mac("s3cret", "r", "n", "w", "c", "SHA-256 aa", "sha-256 bb")));
    for other in [
        room_secret_mac("other", "r", "n", "w", "c", "sha-256 AA", "sha-256 BB"),
        room_secret_mac("s3cret", "r", "n2", "w", "c", "sha-256 AA", "sha-256 BB"),
        room_secret_mac("s3cret", "r", "n", "c", "w", "sha-256 AA", "sha-256 BB"),
        room_secret_mac("s3cret", "r", "n", "w", "c", "sha-256 BB", "sha-256 AA"),
    ] {
        assert!(!mac_matches(&m, &other));
    }
    assert!(!mac_matches(&m, "missing") && !mac_matches(&m, ""));
}

#[test]
fn job_messages_round_trip_and_transfers_are_passed_through() {
    let msgs = vec![
        JobMsg::AuthTicket { ticket: "t".into() },
        JobMsg::JobSubmit {
            client_job_id: "c".into(),
            spec: json!({"type": "train"}),
            files: vec![crate::transfer::FileEntry { name: "a".into(), size: 1, blake3: "00".repeat(32) }],
        },
        JobMsg::JobRejected {
            client_job_id: "c".into(),
            errors: vec![FieldError::new("worker", ErrorCode::Busy, "busy")],
        },
        JobMsg::JobProgress {
            job_id: "j".into(),
            progress: Progress::EpochEnd { epoch: 1, loss: None, val_loss: Some(0.1) },
        },
        JobMsg::JobLog { job_id: "j".into(), stream: Stream::Stderr, text: "x".into(), cr: true },
        JobMsg::JobAttach { job_id: "j".into(), fetch: true },
    ];
    for m in msgs {
        let text = m.to_value().to_string();
        assert_eq!(JobMsg::decode(&text), Ok(Some(m)));
    }
    assert_eq!(JobMsg::decode(r#"{"type":"transfer_offer","id":1}"#), Ok(None));
    assert!(JobMsg::decode("{").is_err());
    assert!(JobMsg::decode(r#"{"type":"job_stop"}"#).is_err());
}

proptest! {
    #[test]
    fn parse_spec_never_panics(s in "\\PC{0,200}") {
        if let Ok(v) = serde_json::from_str::<Value>(&s) {
            let _ = parse_spec(&v);
        }
        let _ = JobMsg::decode(&s);
        let _ = lenient_json(&s);
        let _ = parse_inference_line(&s);
        let _ = ConfigInfo::parse(&s);
    }

    #[test]
    fn specs_from_fields_never_panic(
        kind in prop_oneof![Just("train"), Just("track")],
        n in any::<i64>(), f in any::<f64>(), p in "[a-z./]{0,12}",
    ) {
        let v = json!({"type": kind, "max_epochs": n, "batch_size": f, "learning_rate": f, "peak_threshold": n,
            "labels_path": p, "config_paths": [p], "data_path": p, "model_paths": [p], "frames": p, "video_index": n});
        if let Ok(spec) = parse_spec(&v) {
            prop_assert!(validate(&spec).is_empty());
        }
    }

    #[test]
    fn coalescer_lines_are_bounded(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 0..8)) {
        let mut c = LogCoalescer::new(Stream::Stdout, Duration::from_millis(100));
        let mut t = Duration::ZERO;
        for ch in &chunks {
            t += Duration::from_millis(30);
            for l in c.push(ch, t) {
                prop_assert!(l.text.len() <= MAX_LINE * 3);
                prop_assert!(!l.text.contains('\n') && !l.text.contains('\r'));
            }
        }
        let _ = c.finish();
    }
}
