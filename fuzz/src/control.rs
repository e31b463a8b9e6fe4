//! Control channel messages and the trainer bridge.

use super::*;

/// What arrives on the `ctl` data channel, and what the worker reads from sleap-nn (ZMQ progress
/// JSON, stdout/stderr, the uploaded training config).
pub fn ctl_and_bridge(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = session::check_ctl_size(&text);
    if let Ok(Some(m)) = job::JobMsg::decode(&text) {
        let v = m.to_value();
        let back = job::JobMsg::decode(&v.to_string()).expect("re-encoded job message decodes");
        assert_eq!(back.map(|b| b.to_value()), Some(v), "job message does not round-trip");
    }
    let _ = bridge::lenient_json(&text);
    let mut relay = bridge::ProgressRelay::new(Duration::from_millis(500));
    for (i, line) in text.split('\n').take(64).enumerate() {
        let now = Duration::from_millis(i as u64 * 137);
        for p in relay.on_message(line, now) {
            serde_json::to_string(&p).expect("progress serializes");
        }
        let _ = relay.poll(now);
        let _ = bridge::parse_inference_line(line);
    }
    let clean = bridge::strip_ansi(&text);
    assert!(!clean.contains('\u{1b}'), "escape left in {clean:?}");
    let mut logs = bridge::LogCoalescer::new(job::Stream::Stdout, Duration::from_millis(250));
    for (i, chunk) in data.chunks(7).enumerate() {
        for line in logs.push(chunk, Duration::from_millis(i as u64 * 40)) {
            assert!(!line.text.contains('\u{1b}'), "escape left in a log line");
        }
    }
    let _ = logs.finish();
    if let Ok(info) = bridge::ConfigInfo::parse(&text) {
        let _ = format!("{info:?}");
    }
    let _ = bridge::hydra_value(&text);
    let _ = bridge::predictions_name(&text);
    let _ = job::check_frames(&text);
    let _ = job::check_run_name(&text);
    let fp = job::auth::normalize_fingerprint(&text);
    let _ = job::auth::mac_matches(&fp, &text);
}
