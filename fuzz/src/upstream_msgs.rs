//! Upstream sleap-rtc 0.0.7's data-channel protocol.

use super::*;

/// One data-channel message from an upstream client (first byte: binary or text), then the same
/// bytes as the fields of every worker message: what the worker sends must split where the
/// clients split, whatever a path or a log line contains.
pub fn upstream_codec(data: &[u8]) {
    use sleap_rtc_core::upstream::{self as up, WorkerMsg};
    let Some((&first, rest)) = data.split_first() else { return };
    let _ = up::parse_frame(first & 1 == 1, rest.to_vec());
    let text = String::from_utf8_lossy(rest).into_owned();
    if let Ok(up::ClientMsg::FsListDir { path, .. }) = up::parse_client(&text) {
        assert!(text.contains(&path), "FS_LIST_DIR path {path:?} is not from {text:?}");
    }
    let _ = up::control_command(&text);
    for m in [
        WorkerMsg::Redraw(text.clone()),
        WorkerMsg::Line(text.clone()),
        WorkerMsg::JobLog { text: text.clone(), redraw: true },
        WorkerMsg::AuthFailure(text.clone()),
        WorkerMsg::WorkerPathError(text.clone()),
        WorkerMsg::InferenceLog(text.clone()),
    ] {
        let e = m.encode();
        assert!(!e.trim_end_matches('\n').contains(['\n', '\r']), "a line break inside {e:?}");
    }
    let meta = WorkerMsg::FileMeta { name: text.clone(), size: 7, hint: text.clone() }.encode();
    assert_eq!(meta.trim_start_matches("FILE_META::").split(':').count(), 3, "{meta:?}");
    let detail = json!({"message": text});
    let failed = WorkerMsg::JobFailed { job_id: text.clone(), detail: detail.clone() }.encode();
    // sleap_rtc.api: split("::", 2)[2] is the JSON.
    let parts: Vec<&str> = failed.splitn(3, "::").collect();
    assert_eq!(parts.get(2).and_then(|j| serde_json::from_str::<Value>(j).ok()), Some(detail.clone()), "{failed:?}");
    let done = WorkerMsg::JobComplete(detail.clone()).encode();
    let json_part = done.split_once("::").map(|(_, j)| j).unwrap_or_default();
    assert_eq!(serde_json::from_str::<Value>(json_part).ok(), Some(detail), "{done:?}");
    let mid = (0..=text.len() / 2).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    let (a, b) = text.split_at(mid);
    if let Some(mac) = up::auth::room_secret_hmac(a, b) {
        assert!(up::auth::room_secret_matches(a, b, &mac));
    }
    assert!(!up::auth::ed25519_matches(a, b, &text) || a.len() >= 43, "a short key cannot verify");
}
