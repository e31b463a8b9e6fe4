//! What a worker tells its room beyond "available"/"busy", for people watching (the dashboard):
//! the running job's progress with a bounded loss history (only with `--publish-progress`: the
//! signaling server relays metadata, so by default progress stays peer to peer), and a summary
//! of the room's model registry answered to `registry_list`.

use serde_json::{Value, json};
use sleap_rtc_core::job::Progress;
use sleap_rtc_core::registry::Manifest;

/// Loss points kept in the metadata. Each is ~30 bytes; the whole progress object stays a few
/// KiB, far below the server's metadata cap (16 KiB), since every update is pushed to every
/// peer of the room.
pub const MAX_HISTORY: usize = 64;

/// The published progress of one trainer run (one model of a job).
#[derive(Debug, Clone, Default)]
pub struct ProgressBoard {
    job_id: String,
    model: Option<String>,
    epoch: Option<u32>,
    batch: Option<u32>,
    loss: Option<f64>,
    val_loss: Option<f64>,
    n_processed: Option<u64>,
    n_total: Option<u64>,
    /// `(epoch, loss, val_loss)` at each epoch end, thinned when full.
    history: Vec<(u32, Option<f64>, Option<f64>)>,
}

impl ProgressBoard {
    pub fn new(job_id: &str) -> Self {
        ProgressBoard { job_id: job_id.to_owned(), ..Default::default() }
    }

    /// Folds one trainer event in; `false` when it changes nothing worth publishing.
    pub fn apply(&mut self, p: &Progress) -> bool {
        match p {
            Progress::Started { model } => {
                // A new run of a multi-model job starts its own curve.
                *self = ProgressBoard {
                    job_id: std::mem::take(&mut self.job_id),
                    model: model.clone(),
                    ..Default::default()
                };
            }
            Progress::TrainBegin | Progress::TrainEnd => return false,
            Progress::EpochBegin { epoch } => {
                self.epoch = Some(*epoch);
                self.batch = None;
            }
            Progress::Batch { epoch, batch, loss } => {
                self.epoch = Some(*epoch);
                self.batch = Some(*batch);
                if loss.is_some() {
                    self.loss = *loss;
                }
            }
            Progress::EpochEnd { epoch, loss, val_loss } => {
                self.epoch = Some(*epoch);
                self.batch = None;
                self.loss = loss.or(self.loss);
                self.val_loss = *val_loss;
                if self.history.len() >= MAX_HISTORY {
                    // Keep the whole run at half the resolution rather than only its tail: the
                    // shape of the curve is what a person looks at.
                    let mut i = 0;
                    self.history.retain(|_| {
                        i += 1;
                        i % 2 == 1
                    });
                }
                self.history.push((*epoch, finite(*loss), finite(*val_loss)));
            }
            Progress::Inference { n_processed, n_total, .. } => {
                self.n_processed = Some(*n_processed);
                self.n_total = *n_total;
            }
        }
        true
    }

    /// `metadata.properties.progress`.
    pub fn to_value(&self) -> Value {
        let history: Vec<Value> = self.history.iter().map(|(e, l, v)| json!([e, l, v])).collect();
        let mut v = json!({"job_id": self.job_id, "history": history});
        let mut put = |k: &str, x: Value| {
            if !x.is_null() {
                v[k] = x;
            }
        };
        put("model", json!(self.model));
        put("epoch", json!(self.epoch));
        put("batch", json!(self.batch));
        put("loss", json!(finite(self.loss)));
        put("val_loss", json!(finite(self.val_loss)));
        put("n_processed", json!(self.n_processed));
        put("n_total", json!(self.n_total));
        v
    }
}

/// NaN and infinities (a diverging run) are not JSON numbers.
fn finite(x: Option<f64>) -> Option<f64> {
    x.filter(|f| f.is_finite())
}

/// Largest `registry_list_answer`: it travels as a signaling `peer_message`, whose frames the
/// server caps at 64 KiB by default.
pub const MAX_REGISTRY_ANSWER: usize = 48 * 1024;

/// The answer to `{"type": "registry_list"}`: what a person needs to see about each model (ids,
/// aliases, tags, sizes, where it was trained and which workers hold it), newest first, cut to
/// fit one message. Store locations (`s3_path`, `checkpoint_path`), file lists and the user id
/// that trained a model are left out: the server relays this, and the dashboard does not need
/// them.
pub fn registry_summary(m: &Manifest, cached: &[String]) -> Value {
    let mut entries: Vec<_> = m.models.values().collect();
    entries.sort_by(|a, b| b.trained_at.cmp(&a.trained_at).then_with(|| a.id.cmp(&b.id)));
    let mut models = Vec::new();
    let mut used = 256 + cached.iter().map(|c| c.len() + 3).sum::<usize>();
    for e in &entries {
        let aliases: Vec<&String> = m.aliases.iter().filter(|(_, id)| **id == e.id).map(|(a, _)| a).collect();
        let v = json!({
            "id": e.id, "model_type": e.model_type, "aliases": aliases, "tags": e.tags,
            "size_bytes": e.size_bytes, "trained_at": e.trained_at, "trained_on_worker": e.trained_on_worker,
            "available_on_workers": e.available_on_workers, "epochs": e.training.epochs,
            "final_loss": finite(e.training.final_loss),
        });
        let len = v.to_string().len() + 1;
        if used + len > MAX_REGISTRY_ANSWER {
            break;
        }
        used += len;
        models.push(v);
    }
    json!({
        "type": "registry_list_answer", "registry": true, "total": m.models.len(),
        "truncated": models.len() < m.models.len(), "models": models, "cached": cached,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sleap_rtc_core::registry::ModelEntry;

    #[test]
    fn history_is_bounded_and_keeps_the_whole_run() {
        let mut b = ProgressBoard::new("job_0123456789abcdef");
        assert!(b.apply(&Progress::Started { model: Some("centroid".into()) }));
        for epoch in 0..1000 {
            b.apply(&Progress::Batch { epoch, batch: 3, loss: Some(1.0) });
            b.apply(&Progress::EpochEnd { epoch, loss: Some(1.0 / (epoch + 1) as f64), val_loss: Some(f64::NAN) });
        }
        let v = b.to_value();
        let h = v["history"].as_array().unwrap();
        assert!(h.len() <= MAX_HISTORY && h.len() > MAX_HISTORY / 2, "{}", h.len());
        assert_eq!(h[0][0], 0, "the first epoch is still there");
        assert_eq!(h[h.len() - 1][0], 999, "and the last");
        assert!(h.iter().all(|p| p[2].is_null()), "NaN is published as null");
        assert_eq!(v["model"], "centroid");
        assert!(v.to_string().len() < 4096, "a few KiB at most: {}", v.to_string().len());
        // The next model of a multi-model job starts afresh, same job.
        b.apply(&Progress::Started { model: Some("centered_instance".into()) });
        assert_eq!(b.to_value()["history"].as_array().unwrap().len(), 0);
        assert_eq!(b.to_value()["job_id"], "job_0123456789abcdef");
        assert!(!b.apply(&Progress::TrainEnd));
    }

    #[test]
    fn registry_summary_leaves_out_locations_and_fits_one_message() {
        let mut m = Manifest::new("room");
        for i in 0..2000 {
            let id = format!("{i:016x}");
            let e = ModelEntry {
                id: id.clone(),
                model_type: "single_instance".into(),
                trained_at: format!("2026-01-01T00:{:02}:{:02}Z", i / 60 % 60, i % 60),
                trained_by: "user_secretish".into(),
                s3_path: "s3://bucket/prefix/room/models/x/".into(),
                tags: vec!["a".into()],
                ..Default::default()
            };
            m.models.insert(id, e);
        }
        m.aliases.insert("prod".into(), format!("{:016x}", 1));
        let v = registry_summary(&m, &["x".into()]);
        let text = v.to_string();
        assert!(text.len() <= MAX_REGISTRY_ANSWER, "{}", text.len());
        assert!(!text.contains("s3://") && !text.contains("user_secretish"));
        assert_eq!(v["truncated"], true);
        assert_eq!(v["total"], 2000);
        let small = registry_summary(&Manifest { models: m.models.clone().into_iter().take(3).collect(), ..m }, &[]);
        assert_eq!(small["truncated"], false);
        assert_eq!(small["models"].as_array().unwrap().len(), 3);
        assert!(small["models"].as_array().unwrap().iter().any(|e| e["aliases"][0] == "prod"));
    }
}
