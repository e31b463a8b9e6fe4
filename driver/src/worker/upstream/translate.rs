//! `Translator`: one upstream connection's job events turned into the messages its client parses,
//! at their split positions; and upstream's post-training inference.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sleap_rtc_core::job::{Interrupt, JobKind, JobMsg, JobState, JobStatus, Progress, Stream};
use sleap_rtc_core::upstream::{self as up, WorkerMsg};
use tokio::sync::mpsc;

use super::super::{Attached, Worker};
use super::JobEvent;
use crate::conn::PeerConnection;
use crate::{Runtime, timeout};

/// Results stream while at most this many bytes are unacknowledged (upstream: 16 MiB).
const STREAM_HIGH_WATER: usize = 4 * 1024 * 1024;

/// Turns one upstream connection's job events into upstream messages.
pub(super) struct Translator<R: Runtime> {
    /// For the inference upstream runs after every training (a job of its own, same user).
    worker: Arc<Worker<R>>,
    user: String,
    /// The training's labels (a worker path), which that inference predicts on.
    labels: Option<String>,
    c: Arc<PeerConnection<R>>,
    jobs_dir: PathBuf,
    current: Arc<Mutex<Option<String>>>,
    kind: JobKind,
    model_types: Vec<String>,
    models_started: usize,
    run_names: Vec<String>,
    started: Instant,
    /// A job of this connection was accepted and has not ended.
    active: bool,
}

impl<R: Runtime> Translator<R> {
    pub(super) fn new(
        worker: Arc<Worker<R>>,
        user: String,
        c: Arc<PeerConnection<R>>,
        current: Arc<Mutex<Option<String>>>,
    ) -> Self {
        Translator {
            jobs_dir: worker.jobs_dir.clone(),
            worker,
            user,
            labels: None,
            c,
            current,
            kind: JobKind::Train,
            model_types: vec![],
            models_started: 0,
            run_names: vec![],
            started: Instant::now(),
            active: false,
        }
    }

    fn send(&self, m: WorkerMsg) {
        let _ = self.c.send_upstream_text(&m.encode());
    }

    fn job_id(&self) -> String {
        self.current.lock().ok().and_then(|g| g.clone()).unwrap_or_default()
    }

    fn log(&self, text: String, redraw: bool) {
        match (self.kind, redraw) {
            (JobKind::Train, false) => self.send(WorkerMsg::Line(text)),
            (JobKind::Train, true) => self.send(WorkerMsg::Redraw(text)),
            (JobKind::Track, redraw) => self.send(WorkerMsg::JobLog { text, redraw }),
        }
    }

    fn job_type(&self) -> &'static str {
        match self.kind {
            JobKind::Train => "train",
            JobKind::Track => "track",
        }
    }

    fn complete(&self, status: Option<&JobStatus>, output: Option<String>, stopped_early: bool) {
        let mut v = json!({
            "job_id": self.job_id(),
            "job_type": self.job_type(),
            "duration_seconds": status.and_then(|s| s.duration_secs).unwrap_or_else(|| self.started.elapsed().as_secs_f64()),
            "success": true,
            "stopped_early": stopped_early,
        });
        if let Some(o) = output {
            v["output_path"] = Value::String(o);
        }
        self.send(WorkerMsg::JobComplete(v));
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<JobEvent>) {
        while let Some(ev) = rx.recv().await {
            let msg = match ev {
                JobEvent::Report(raw) => {
                    self.send(WorkerMsg::ProgressReport(raw));
                    continue;
                }
                // A second submission while a job runs is refused (busy); it must not reframe
                // the running job's messages.
                JobEvent::Submitted { .. } if self.active => continue,
                JobEvent::Submitted { kind, model_types, labels } => {
                    self.kind = kind;
                    self.model_types = model_types;
                    self.labels = labels;
                    self.models_started = 0;
                    self.run_names.clear();
                    continue;
                }
                JobEvent::Msg(m) => m,
            };
            match msg {
                JobMsg::JobAccepted { job_id, .. } => {
                    if let Ok(mut c) = self.current.lock() {
                        *c = Some(job_id.clone());
                    }
                    self.active = true;
                    self.started = Instant::now();
                    self.send(WorkerMsg::JobAccepted(job_id));
                }
                JobMsg::JobRejected { client_job_id, errors } => {
                    self.send(WorkerMsg::JobRejected { client_job_id, errors: json!(errors) })
                }
                JobMsg::JobProgress { progress, .. } => self.progress(progress),
                JobMsg::JobLog { stream, text, cr, .. } => {
                    let text = if stream == Stream::Stderr && !cr && self.kind == JobKind::Train {
                        format!("[stderr] {text}")
                    } else {
                        text
                    };
                    self.log(text, cr)
                }
                JobMsg::JobError { message, .. } => self.log(format!("[worker] {message}"), false),
                JobMsg::JobDone { status } => self.done(status).await,
                _ => {}
            }
        }
    }

    fn progress(&mut self, p: Progress) {
        match p {
            Progress::Started { model } if self.kind == JobKind::Train => {
                self.models_started += 1;
                // Upstream sends one JOB_COMPLETE per model of a pipeline and MODEL_TYPE before
                // every model but the first (the API counts completions; LossViewer resets).
                if self.models_started > 1 {
                    let prev = self.run_names.last().map(|r| self.run_dir(r));
                    self.complete(None, prev, false);
                    let ty = self
                        .model_types
                        .get(self.models_started - 1)
                        .cloned()
                        .or(model.clone())
                        .unwrap_or_else(|| "model".into());
                    self.send(WorkerMsg::ModelType(ty));
                }
                self.run_names.extend(model);
            }
            Progress::EpochEnd { epoch, loss, val_loss } => {
                self.send(WorkerMsg::JobProgress(json!({"epoch": epoch, "loss": loss, "val_loss": val_loss})))
            }
            Progress::Inference { n_processed, n_total, rate, eta } => self.log(
                match n_total {
                    Some(t) => format!(
                        "Predicting... {n_processed}/{t} frames{}",
                        rate.map(|r| format!(" {r:.1} FPS")).unwrap_or_default()
                    ),
                    None => format!("Predicting... {n_processed} frames"),
                } + &eta.map(|e| format!(" ETA {e:.0} s")).unwrap_or_default(),
                true,
            ),
            _ => {}
        }
    }

    fn run_dir(&self, run: &str) -> String {
        self.jobs_dir.join(self.job_id()).join("runs").join(run).display().to_string()
    }

    async fn done(&mut self, status: JobStatus) {
        self.active = false;
        let dir = self.jobs_dir.join(&status.job_id);
        let ok = matches!(status.state, JobState::Completed | JobState::StoppedEarly);
        if !ok {
            let message = status.message.clone().unwrap_or_else(|| format!("job {}", status.state));
            self.send(WorkerMsg::JobFailed {
                job_id: status.job_id.clone(),
                detail: json!({
                    "job_id": status.job_id, "job_type": self.job_type(), "success": false,
                    "duration_seconds": status.duration_secs, "message": message, "state": status.state,
                }),
            });
            if self.kind == JobKind::Train {
                let reason = if status.state == JobState::Cancelled { "cancelled" } else { "training_failed" };
                self.send(WorkerMsg::InferenceSkipped(json!({"reason": reason})));
            }
            return;
        }
        let output = status.results.last().map(|r| dir.join(r).display().to_string());
        if self.kind == JobKind::Track {
            // Track results stream before JOB_COMPLETE, as upstream does.
            for r in &status.results {
                if let Err(e) = self.stream_file(&dir.join(r)).await {
                    tracing::warn!(job = %status.job_id, error = %e, "cannot stream the predictions");
                    self.log(format!("[worker] failed to stream output: {e}"), false);
                }
            }
        }
        self.complete(Some(&status), output, status.state == JobState::StoppedEarly);
        if self.kind == JobKind::Train {
            let models: Vec<String> = status.results.iter().map(|r| dir.join(r).display().to_string()).collect();
            match self.labels.clone() {
                Some(labels) if !models.is_empty() => self.post_inference(labels, models).await,
                Some(_) => self.send(WorkerMsg::InferenceSkipped(json!({"reason": "no_checkpoint"}))),
                None => self.send(WorkerMsg::InferenceSkipped(json!({"reason": "no_labels_path"}))),
            }
        }
    }

    /// Upstream's post-training inference, as the GUI expects it: the new models predict the
    /// labels' suggested frames, with `INFERENCE_*` progress, the predictions streamed back, then
    /// `INFERENCE_COMPLETE`. It is an ordinary track job of the same user (journal, limits, stop
    /// and cancel); a client that goes away cancels it, since only it would read the result.
    async fn post_inference(&mut self, labels: String, models: Vec<String>) {
        self.send(WorkerMsg::InferenceBegin);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let spec = json!({"type": "track", "data_path": labels, "model_paths": models, "frame_filter": "suggested"});
        let (me, user) = (self.worker.clone(), self.user.clone());
        R::spawn(async move { me.submit(Attached::Upstream(tx), user, "post-training".into(), spec, vec![]).await });
        let mut job: Option<String> = None;
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = self.c.closed() => {
                    // Gone before the job was accepted: wait for that (briefly), then cancel.
                    let job = match job.take() {
                        Some(j) => Some(j),
                        None => timeout::<R, _>(Duration::from_secs(10), async {
                            while let Some(ev) = rx.recv().await {
                                match ev {
                                    JobEvent::Msg(JobMsg::JobAccepted { job_id, .. }) => return Some(job_id),
                                    JobEvent::Msg(JobMsg::JobRejected { .. } | JobMsg::JobDone { .. }) => return None,
                                    _ => {}
                                }
                            }
                            None
                        })
                        .await
                        .ok()
                        .flatten(),
                    };
                    if let Some(j) = job {
                        tracing::info!(job = %j, "the client left; cancelling its post-training inference");
                        let _ = self.worker.request_interrupt(&self.user, &j, Interrupt::Cancel);
                    }
                    return;
                }
            };
            let msg = match ev {
                Some(JobEvent::Msg(m)) => m,
                Some(_) => continue,
                None => {
                    self.send(WorkerMsg::InferenceFailed(json!({"error": "the inference job ended without a result"})));
                    return;
                }
            };
            match msg {
                JobMsg::JobAccepted { job_id, .. } => {
                    // JOB_CANCEL now reaches the inference.
                    if let Ok(mut c) = self.current.lock() {
                        *c = Some(job_id.clone());
                    }
                    job = Some(job_id);
                }
                JobMsg::JobRejected { errors, .. } => {
                    let why: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                    self.send(WorkerMsg::InferenceFailed(json!({"error": why.join("; ")})));
                    return;
                }
                JobMsg::JobProgress { progress: Progress::Inference { n_processed, n_total, rate, eta }, .. } => {
                    let v = json!({"n_processed": n_processed, "n_total": n_total, "rate": rate, "eta": eta});
                    self.send(WorkerMsg::InferenceProgress(v))
                }
                JobMsg::JobLog { text, .. } => self.send(WorkerMsg::InferenceLog(text)),
                JobMsg::JobDone { status } => {
                    let dir = self.jobs_dir.join(&status.job_id);
                    let preds = status.results.first().map(|r| dir.join(r));
                    let end = match (status.state, preds) {
                        (JobState::Completed, Some(p)) => match self.stream_file(&p).await {
                            Ok(()) => {
                                WorkerMsg::InferenceComplete(json!({"predictions_path": p.display().to_string()}))
                            }
                            Err(e) => WorkerMsg::InferenceFailed(
                                json!({"error": format!("failed to stream predictions: {e}")}),
                            ),
                        },
                        (JobState::Cancelled, _) => WorkerMsg::InferenceFailed(json!({"error": "cancelled"})),
                        _ => WorkerMsg::InferenceFailed(
                            json!({"error": status.message.unwrap_or_else(|| "no output file".into())}),
                        ),
                    };
                    self.send(end);
                    return;
                }
                _ => {}
            }
        }
    }

    /// `FILE_META` + 32 KiB binary chunks + `END_OF_FILE`, paced by the channel's backlog.
    async fn stream_file(&self, path: &Path) -> Result<(), String> {
        use std::io::Read as _;
        let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let size = f.metadata().map_err(|e| e.to_string())?.len();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.send(WorkerMsg::FileMeta { name, size, hint: String::new() });
        let mut buf = vec![0u8; up::RESULT_CHUNK];
        loop {
            let n = f.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            self.c.upstream_drained(STREAM_HIGH_WATER).await.map_err(|e| e.to_string())?;
            self.c.send_upstream(true, buf[..n].to_vec()).map_err(|e| e.to_string())?;
        }
        self.send(WorkerMsg::EndOfFile);
        Ok(())
    }
}
