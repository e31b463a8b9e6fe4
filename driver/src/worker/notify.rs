//! `--notify-url`: a webhook called when a job ends, so a researcher hears of a finished (or
//! failed) training without watching a terminal: an HTTP POST of a small JSON summary, with
//! `text` for chat webhooks (Slack, Mattermost and Teams incoming webhooks show it as is).
//! Best effort: three tries over about half a minute, then a warning; a job's outcome never
//! depends on it.

use super::*;

/// The JSON posted for a finished job.
pub(super) fn summary(worker: &str, owner: &str, status: &JobStatus) -> Value {
    let secs = status.duration_secs.map(|d| format!(" after {}", human_secs(d))).unwrap_or_default();
    let msg = status.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
    json!({
        "text": format!("sleap-rtc: {} job {} on {worker} {}{secs}{msg}", status.kind, status.job_id, status.state),
        "job_id": status.job_id,
        "kind": status.kind,
        "state": status.state,
        "message": status.message,
        "duration_secs": status.duration_secs,
        "results": status.results,
        "published": status.published,
        "worker": worker,
        "owner": owner,
    })
}

fn human_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

pub(super) async fn post<R: Runtime>(url: &str, body: Value) {
    crate::init_tls();
    let http = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
        Ok(h) => h,
        Err(e) => return tracing::warn!(error = %e, "cannot make an HTTP client for --notify-url"),
    };
    let mut last = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            sleep::<R>(Duration::from_secs(5 * u64::from(attempt))).await;
        }
        let res = R::tokio_compat(http.post(url).json(&body).send()).await;
        match res {
            Ok(r) if r.status().is_success() => {
                tracing::info!(url = %redact(url), job = %body["job_id"], "job notification sent");
                return;
            }
            Ok(r) => last = format!("HTTP {}", r.status()),
            Err(e) => last = e.to_string(),
        }
    }
    tracing::warn!(url = %redact(url), error = %last, "job notification failed after 3 tries");
}

/// Webhook URLs carry their secret in the path: log the host only.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}/…", rest.split('/').next().unwrap_or("")),
        None => "…".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sleap_rtc_core::job::JobKind;

    #[test]
    fn summaries_read_well_and_urls_are_redacted() {
        let st = JobStatus {
            job_id: "job_0123456789abcdef".into(),
            kind: JobKind::Train,
            state: JobState::Completed,
            last_epoch: None,
            message: Some("trained 1 model".into()),
            results: vec!["single_instance".into()],
            duration_secs: Some(3725.0),
            published: vec![],
        };
        let v = summary("worker-gpu", "user-1", &st);
        assert_eq!(
            v["text"],
            "sleap-rtc: train job job_0123456789abcdef on worker-gpu completed after 1 h 2 min: trained 1 model"
        );
        assert_eq!(v["state"], "completed");
        assert_eq!(v["results"][0], "single_instance");
        assert_eq!(redact("https://hooks.slack.com/services/T0/B0/SECRET"), "https://hooks.slack.com/…");
        assert_eq!(human_secs(42.4), "42 s");
        assert_eq!(human_secs(61.0), "1 min 1 s");
    }
}
