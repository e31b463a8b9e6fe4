use proptest::prelude::*;
use serde_json::json;

use super::*;

/// Python's `s.split(sep, maxsplit)`, which is how the clients take messages apart.
fn py_split<'a>(s: &'a str, sep: &str, maxsplit: usize) -> Vec<&'a str> {
    s.splitn(maxsplit + 1, sep).collect()
}

#[test]
fn job_complete_json_is_right_after_the_first_separator() {
    let m = WorkerMsg::JobComplete(json!({"job_id": "job_1", "job_type": "train", "duration_seconds": 2.5,
        "success": true, "stopped_early": false, "output_path": "/w/runs/x::y"}))
    .encode();
    // sleap_rtc.api: response.split("::", 1)[1]
    let v: Value = serde_json::from_str(py_split(&m, "::", 1)[1]).expect("the API parses the JSON");
    assert_eq!(v["output_path"], "/w/runs/x::y");
    assert_eq!(v["success"], true);
}

#[test]
fn job_failed_carries_the_message_where_the_api_reads_it() {
    let m = WorkerMsg::JobFailed { job_id: "job_1".into(), detail: json!({"message": "sleap-nn exited with code 1"}) }
        .encode();
    // sleap_rtc.api: split("::", 2)[2] is JSON with "message".
    let v: Value = serde_json::from_str(py_split(&m, "::", 2)[2]).expect("JSON after the second separator");
    assert_eq!(v["message"], "sleap-nn exited with code 1");
    // the CLI: parts[1] is the job id.
    assert_eq!(py_split(&m, "::", 2)[1], "job_1");
}

#[test]
fn rejections_accepts_and_progress_parse_as_the_clients_expect() {
    let m = WorkerMsg::JobRejected {
        client_job_id: "ab12cd34".into(),
        errors: json!([{"field": "max_epochs", "message": "Value must be between 1 and 10000", "code": "OUT_OF_RANGE"}]),
    }
    .encode();
    let v: Value = serde_json::from_str(py_split(&m, "::", 2)[2]).expect("JSON");
    assert_eq!(v["errors"][0]["field"], "max_epochs");
    let m = WorkerMsg::JobAccepted("job_0123abcd".into()).encode();
    assert_eq!(m.split("::").nth(1), Some("job_0123abcd"));
    let m = WorkerMsg::JobProgress(json!({"epoch": 3, "loss": 0.5, "val_loss": null})).encode();
    let v: Value = serde_json::from_str(py_split(&m, "::", 1)[1]).expect("JSON");
    assert_eq!(v["epoch"], 3);
}

#[test]
fn progress_report_is_sleap_nns_message_unchanged() {
    let raw = r#"{"event": "epoch_end", "what": "", "epoch": 3, "logs": {"train/loss": 0.0123, "val/loss": 0.0145}}"#;
    let m = WorkerMsg::ProgressReport(raw.into()).encode();
    assert_eq!(m.split_once("PROGRESS_REPORT::").map(|x| x.1), Some(raw));
}

#[test]
fn file_meta_has_exactly_three_colon_fields() {
    let m = WorkerMsg::FileMeta { name: "a:b::c.predictions.slp".into(), size: 123, hint: "x:y".into() }.encode();
    let (_, meta) = m.split_once("FILE_META::").expect("prefix");
    let parts: Vec<&str> = meta.split(':').collect();
    assert_eq!(parts.len(), 3, "{meta}");
    assert_eq!(parts[1], "123");
    assert!(parts[0].ends_with("predictions.slp"));
}

#[test]
fn text_fields_cannot_inject_lines_or_separators() {
    for m in [
        WorkerMsg::Redraw("a\nJOB_COMPLETE::{}".into()),
        WorkerMsg::JobLog { text: "x\r\ny".into(), redraw: true },
        WorkerMsg::AuthFailure("bad\nAUTH_SUCCESS".into()),
    ] {
        assert!(!m.encode().contains('\n'), "{m:?}");
    }
    assert_eq!(WorkerMsg::Line("Epoch 1".into()).encode(), "Epoch 1\n");
    let m = WorkerMsg::JobAccepted("a::b".into()).encode();
    assert_eq!(py_split(&m, "::", 2).len(), 2);
    // Found by fuzz `upstream_codec`: ":::" with "::" replaced is "::" again.
    let m = WorkerMsg::JobFailed { job_id: "20:::3".into(), detail: json!({"message": "x"}) }.encode();
    assert_eq!(serde_json::from_str::<Value>(py_split(&m, "::", 2)[2]).ok(), Some(json!({"message": "x"})), "{m}");
}

#[test]
fn client_messages_parse_with_paths_that_contain_separators() {
    assert_eq!(
        parse_client("FS_LIST_DIR::/data/a::b::40").unwrap(),
        ClientMsg::FsListDir { path: "/data/a::b".into(), offset: 40 }
    );
    assert_eq!(parse_client("FS_LIST_DIR::/data").unwrap(), ClientMsg::FsListDir { path: "/data".into(), offset: 0 });
    assert_eq!(
        parse_client("FILE_UPLOAD_START::x.pkg.slp::1024::/mnt/a::b::1").unwrap(),
        ClientMsg::FileUploadStart {
            name: "x.pkg.slp".into(),
            size: 1024,
            dest_dir: "/mnt/a::b".into(),
            create_subdir: true
        }
    );
    assert_eq!(
        parse_client("FILE_UPLOAD_CHECK::ABCDEF::x.pkg.slp").unwrap(),
        ClientMsg::FileUploadCheck { sha256: "abcdef".into(), name: "x.pkg.slp".into() }
    );
    assert_eq!(
        parse_client(r#"JOB_SUBMIT::ab12cd34::{"type":"train","labels_path":"/a::b"}"#).unwrap(),
        ClientMsg::JobSubmit {
            client_job_id: "ab12cd34".into(),
            spec: r#"{"type":"train","labels_path":"/a::b"}"#.into()
        }
    );
    assert_eq!(
        parse_client("FS_RESOLVE::fly*.mp4::2048::3::all").unwrap(),
        ClientMsg::FsResolve { pattern: "fly*.mp4".into(), file_size: Some(2048), max_depth: Some(3), mount: None }
    );
    assert_eq!(
        parse_client("FS_RESOLVE::fly.mp4::::::lab").unwrap(),
        ClientMsg::FsResolve { pattern: "fly.mp4".into(), file_size: None, max_depth: None, mount: Some("lab".into()) }
    );
    assert_eq!(
        parse_client(r#"CONTROL_COMMAND::{"command": "stop"}"#).unwrap(),
        ClientMsg::ControlCommand(r#"{"command": "stop"}"#.into())
    );
    assert_eq!(parse_client("ZMQ_CTRL::{}").unwrap(), ClientMsg::ControlCommand("{}".into()));
    assert_eq!(parse_client("JOB_CANCEL").unwrap(), ClientMsg::JobCancel);
    assert_eq!(parse_client("JOB_CANCEL::job_1").unwrap(), ClientMsg::JobCancel);
    assert_eq!(parse_client("AUTH_RESPONSE::missing").unwrap(), ClientMsg::AuthResponse("missing".into()));
    assert_eq!(parse_client("WHAT::ever").unwrap(), ClientMsg::Unknown("WHAT".into()));
}

#[test]
fn malformed_client_messages_are_errors_not_panics() {
    assert!(matches!(parse_client("FILE_UPLOAD_START::x::lots::/d::1"), Err(CodecError::BadNumber { .. })));
    assert!(matches!(parse_client("FILE_UPLOAD_START::x"), Err(CodecError::MissingField { .. })));
    assert!(matches!(parse_client("JOB_SUBMIT::ab12"), Err(CodecError::MissingField { .. })));
    assert!(matches!(parse_client("AUTH_RESPONSE"), Err(CodecError::MissingField { .. })));
    assert!(matches!(parse_frame(false, vec![0xff, 0xfe]), Err(CodecError::NotText)));
    let big = format!("JOB_SUBMIT::a::{}", "x".repeat(MAX_TEXT));
    assert!(matches!(parse_client(&big), Err(CodecError::TooLarge(_))));
}

#[test]
fn keep_alive_is_dropped_by_exact_equality_only() {
    assert_eq!(parse_frame(true, KEEP_ALIVE.to_vec()).unwrap(), Frame::KeepAlive);
    assert_eq!(parse_frame(false, KEEP_ALIVE.to_vec()).unwrap(), Frame::KeepAlive);
    let chunk = b"KEEP_ALIVE and then file bytes".to_vec();
    assert_eq!(parse_frame(true, chunk.clone()).unwrap(), Frame::Data(chunk));
}

#[test]
fn control_commands_are_recognised_and_nothing_else_is() {
    assert_eq!(control_command(r#"{"command": "stop"}"#), Some(ControlCommand::Stop));
    assert_eq!(control_command(r#" {"command":"cancel"} "#), Some(ControlCommand::Cancel));
    assert_eq!(control_command(r#"{"command":"rm -rf"}"#), None);
    assert_eq!(control_command("stop"), None);
}

#[test]
fn room_secret_hmac_matches_pythons() {
    // Computed with Python's hmac/hashlib/base64 exactly as sleap_rtc.auth.psk.compute_hmac does.
    let secret = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";
    let nonce = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1-f4CBgoM";
    let want = "HLnb0Ch3S657qOL9mJCj1oNvskd0_DN6fVbuj3Q21i4";
    assert_eq!(auth::room_secret_hmac(secret, nonce).as_deref(), Some(want));
    assert!(auth::room_secret_matches(secret, nonce, want));
    assert!(auth::room_secret_matches(&format!("{secret}="), nonce, want), "padding is optional");
    assert!(!auth::room_secret_matches(secret, nonce, "HLnb0Ch3S657qOL9mJCj1oNvskd0_DN6fVbuj3Q21i5"));
    assert!(!auth::room_secret_matches(secret, nonce, "missing"));
    assert!(!auth::room_secret_matches("another", nonce, want));
}

#[test]
fn ed25519_signatures_verify_against_the_right_key_only() {
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let other = ed25519_dalek::SigningKey::from_bytes(&[8u8; 32]);
    let nonce = auth::nonce(&[1u8; NONCE_BYTES]);
    assert_eq!(nonce.len(), 43);
    let sig = b64(&key.sign(nonce.as_bytes()).to_bytes());
    let pk = b64(key.verifying_key().as_bytes());
    assert!(auth::ed25519_matches(&pk, &nonce, &sig));
    assert!(!auth::ed25519_matches(&b64(other.verifying_key().as_bytes()), &nonce, &sig));
    assert!(!auth::ed25519_matches(&pk, "another nonce", &sig));
    assert!(!auth::ed25519_matches(&pk, &nonce, "missing"));
    assert!(!auth::ed25519_matches("not a key", &nonce, &sig));
    let (private, public) = auth::device_key(&[7u8; 32]);
    assert_eq!(public, pk);
    assert_eq!(auth::decode_b64(&private), Some(vec![7u8; 32]));
}

#[test]
fn resolve_scores_as_upstream_does() {
    use resolve::{MatchType, Query, QueryError};
    let q = Query::new("/laptop/videos/Fly1.MP4", Some(1000)).unwrap();
    assert_eq!(q.score("fly1.mp4", 1000, 2), Some((MatchType::Exact, 119.8)));
    assert_eq!(q.score("FLY1.mp4", 1050, 0), Some((MatchType::Exact, 110.0)));
    assert_eq!(q.score("old_fly1.mp4.bak", 5, 1).map(|s| s.0), Some(MatchType::Substring));
    assert_eq!(q.score("fly2.mp4", 1000, 0), None);
    let w = Query::new("fly*.mp4", None).unwrap();
    assert_eq!(w.score("Fly12.mp4", 1, 0), Some((MatchType::Wildcard, 50.0)));
    assert_eq!(w.score("fly12.avi", 1, 0), None);
    assert_eq!(Query::new("*.*", None).unwrap_err(), QueryError::TooBroad);
    assert_eq!(Query::new("  ", None).unwrap_err(), QueryError::Empty);
    assert!(matches!(Query::new("fly[.mp4", None), Err(QueryError::Invalid(_))));
}

#[test]
fn slp_rewrite_and_prefix_messages_round_trip_as_the_clients_split_them() {
    let body = r#"{"slp_path": "/data/a::b.slp", "output_dir": "/data", "filename_map": {}}"#;
    assert_eq!(parse_client(&format!("FS_WRITE_SLP::{body}")), Ok(ClientMsg::FsWriteSlp(body.into())));
    let body = r#"{"original_path": "/x/v.mp4", "new_path": "/y/v.mp4", "other_missing": []}"#;
    assert_eq!(
        parse_client(&format!("FS_RESOLVE_WITH_PREFIX::{body}")),
        Ok(ClientMsg::FsResolveWithPrefix(body.into()))
    );
    assert_eq!(parse_client(r#"FS_APPLY_PREFIX::{"confirmed":true}"#), Ok(ClientMsg::FsApplyPrefix));
    assert!(matches!(parse_client("FS_WRITE_SLP"), Err(CodecError::MissingField { .. })));
    // The clients: message.split("::", 1)[1] is the JSON.
    for (m, key) in [
        (WorkerMsg::FsWriteSlpOk(json!({"output_path": "/d/resolved::x.slp", "videos_updated": 2})), "output_path"),
        (WorkerMsg::FsWriteSlpError(json!({"error": "no"})), "error"),
        (WorkerMsg::FsPrefixProposal(json!({"old_prefix": "/a", "new_prefix": "/b"})), "old_prefix"),
        (WorkerMsg::FsPrefixApplied, "success"),
    ] {
        let v: Value = serde_json::from_str(py_split(&m.encode(), "::", 1)[1]).expect("JSON after the first ::");
        assert!(!v[key].is_null(), "{m:?}");
    }
}

#[test]
fn a_located_video_gives_the_prefix_change_sleap_would_propose() {
    use prefix::{apply, changed};
    // The common tail (project/day1/vid1.mp4) is kept; what differs before it is the change.
    let (old, new) = changed("/Volumes/talmo/project/day1/vid1.mp4", "/vast/project/day1/vid1.mp4").unwrap();
    assert_eq!((old.as_str(), new.as_str()), ("/Volumes/talmo", "/vast"));
    assert_eq!(
        apply("/Volumes/talmo/project/day2/vid2.mp4", &old, &new).as_deref(),
        Some("/vast/project/day2/vid2.mp4")
    );
    assert_eq!(apply("/Volumes/other/vid3.mp4", &old, &new), None);
    // Component-wise: "/Volumes/talmo2" does not start with "/Volumes/talmo".
    assert_eq!(apply("/Volumes/talmo2/vid4.mp4", &old, &new), None);
    // A Windows laptop's path.
    let (old, new) = changed(r"C:\Users\lab\day1\vid1.mp4", "/data/lab/day1/vid1.mp4").unwrap();
    assert_eq!((old.as_str(), new.as_str()), ("C:/Users", "/data"));
    assert_eq!(apply(r"C:\Users\lab\day2\v.mp4", &old, &new).as_deref(), Some("/data/lab/day2/v.mp4"));
    // A relative original: nothing to take away, the new prefix goes in front.
    let (old, new) = changed("day1/vid1.mp4", "/data/project/day1/vid1.mp4").unwrap();
    assert_eq!((old.as_str(), new.as_str()), ("", "/data/project"));
    assert_eq!(apply("day2/vid2.mp4", &old, &new).as_deref(), Some("/data/project/day2/vid2.mp4"));
    assert_eq!(apply("/abs/day2/vid2.mp4", &old, &new), None, "the empty prefix matches relative paths only");
    // A relative original with a leading part of its own: that part is the old prefix.
    let (old, new) = changed("old/day1/vid1.mp4", "/data/new/day1/vid1.mp4").unwrap();
    assert_eq!((old.as_str(), new.as_str()), ("old", "/data/new"));
    assert_eq!(apply("old/day2/v.mp4", &old, &new).as_deref(), Some("/data/new/day2/v.mp4"));
    // No prefix change explains another file name, or no change at all.
    assert_eq!(changed("/a/vid1.mp4", "/b/vid2.mp4"), None);
    assert_eq!(changed("/a/vid1.mp4", "/a/vid1.mp4"), None);
    assert_eq!(changed("", "/a/v.mp4"), None);
}

proptest! {
    #[test]
    fn prefix_rules_are_total(a in "[/a-z\\\\:]{0,30}", b in "[/a-z\\\\:]{0,30}", c in "[/a-z\\\\:]{0,30}") {
        if let Some((old, new)) = prefix::changed(&a, &b) {
            let _ = prefix::apply(&c, &old, &new);
            // The located video itself maps onto its new path (up to separators).
            if let Some(mapped) = prefix::apply(&a, &old, &new) {
                prop_assert_eq!(mapped.trim_start_matches('/'), b.replace('\\', "/").split('/').filter(|s| !s.is_empty()).collect::<Vec<_>>().join("/"));
            }
        }
    }

    #[test]
    fn any_text_parses_or_fails_cleanly(s in ".{0,200}") {
        let _ = parse_client(&s);
        let _ = parse_frame(false, s.into_bytes());
    }

    #[test]
    fn any_known_prefix_with_junk_parses_or_fails_cleanly(
        kind in prop::sample::select(vec!["FS_LIST_DIR", "FS_RESOLVE", "FILE_UPLOAD_START", "FILE_UPLOAD_CHECK",
            "JOB_SUBMIT", "AUTH_RESPONSE", "USE_WORKER_PATH", "CONTROL_COMMAND", "FS_WRITE_SLP",
            "FS_RESOLVE_WITH_PREFIX", "FS_APPLY_PREFIX"]),
        rest in "[:a-z0-9/ ]{0,60}",
    ) {
        let _ = parse_client(&format!("{kind}::{rest}"));
    }

    #[test]
    fn encoded_text_fields_never_break_lines(t in ".{0,80}") {
        for m in [WorkerMsg::Redraw(t.clone()), WorkerMsg::JobLog { text: t.clone(), redraw: false },
                  WorkerMsg::WorkerPathError(t.clone()), WorkerMsg::InferenceLog(t.clone())] {
            prop_assert!(!m.encode().contains('\n'));
        }
        let meta = WorkerMsg::FileMeta { name: t.clone(), size: 1, hint: t }.encode();
        prop_assert_eq!(meta.trim_start_matches("FILE_META::").split(':').count(), 3);
    }
}
