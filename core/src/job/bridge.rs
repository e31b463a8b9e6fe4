//! The pure half of driving `sleap-nn` (see `shared/reference/sleap-nn-interface.md`): the argv,
//! reading its ZMQ progress and `--gui` JSON, coalescing its `\r` progress bars, and deciding
//! whether a run succeeded. The runtime owns the process, the sockets and the clock.

use std::time::Duration;

use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

use super::{FrameFilter, Progress, Stream, TrackSpec, TrainSpec};

/// What the worker needs from a training config.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConfigInfo {
    /// `data_config.train_labels_path` (a string or a list in the YAML).
    pub train_labels: Vec<String>,
    pub val_labels: Option<String>,
    pub run_name: Option<String>,
    /// The head type (`single_instance`, `centroid`, ...), for default run names.
    pub model_type: Option<String>,
}

impl ConfigInfo {
    /// Parses a sleap-nn YAML config. Errors read like upstream's `CONFIG_PARSE_ERROR`s.
    pub fn parse(text: &str) -> Result<ConfigInfo, String> {
        let docs = YamlLoader::load_from_str(text).map_err(|e| format!("Failed to parse config file: {e}"))?;
        let doc = match docs.as_slice() {
            [d @ Yaml::Hash(_)] => d,
            _ => return Err("Config file is not a valid YAML mapping".into()),
        };
        for section in ["data_config", "model_config", "trainer_config"] {
            if !matches!(doc[section], Yaml::Hash(_)) {
                return Err(format!("Config file has no '{section}' section (is this a sleap-nn training config?)"));
            }
        }
        let strs = |y: &Yaml| -> Vec<String> {
            match y {
                Yaml::String(s) => vec![s.clone()],
                Yaml::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
                _ => vec![],
            }
        };
        let model_type = doc["model_config"]["head_configs"].as_hash().and_then(|h| {
            h.iter().find(|(_, v)| !matches!(v, Yaml::Null)).and_then(|(k, _)| k.as_str().map(str::to_owned))
        });
        Ok(ConfigInfo {
            train_labels: strs(&doc["data_config"]["train_labels_path"]),
            val_labels: doc["data_config"]["val_labels_path"].as_str().map(str::to_owned),
            run_name: doc["trainer_config"]["run_name"].as_str().map(str::to_owned),
            model_type,
        })
    }
}

/// Quotes a Hydra override value when it holds anything Hydra's grammar treats specially.
pub fn hydra_value(s: &str) -> String {
    let plain = !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-./:@~+".contains(c));
    if plain {
        s.to_owned()
    } else {
        let mut q = String::with_capacity(s.len() + 2);
        q.push('"');
        for c in s.chars() {
            if c == '"' || c == '\\' {
                q.push('\\');
            }
            q.push(c);
        }
        q.push('"');
        q
    }
}

/// Everything about one training run that the worker decided (absolute paths on the worker).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainRun {
    pub config: String,
    pub labels: Option<String>,
    pub val_labels: Option<String>,
    pub resume: Option<String>,
    pub ckpt_dir: String,
    pub run_name: String,
    /// Where sleap-nn publishes progress (the worker's bound SUB).
    pub publish_port: u16,
    /// Where sleap-nn listens for commands (the worker's bound PUB).
    pub controller_port: u16,
}

/// `sleap-nn train` arguments (after the program name). `++` (add or override) works whether or
/// not the YAML has the key, which plain and `+` overrides do not.
pub fn train_args(spec: &TrainSpec, run: &TrainRun) -> Vec<String> {
    let mut a = vec!["train".to_owned(), run.config.clone()];
    let mut set = |k: &str, v: String| a.push(format!("++{k}={v}"));
    if let Some(l) = &run.labels {
        set("data_config.train_labels_path", format!("[{}]", hydra_value(l)));
    }
    if let Some(v) = &run.val_labels {
        set("data_config.val_labels_path", hydra_value(v));
    }
    if let Some(n) = spec.max_epochs {
        set("trainer_config.max_epochs", n.to_string());
    }
    if let Some(b) = spec.batch_size {
        set("trainer_config.train_data_loader.batch_size", b.to_string());
        set("trainer_config.val_data_loader.batch_size", b.to_string());
    }
    if let Some(lr) = spec.learning_rate {
        set("trainer_config.optimizer.lr", format!("{lr:e}"));
    }
    if let Some(r) = &run.resume {
        set("trainer_config.resume_ckpt_path", hydra_value(r));
    }
    set("trainer_config.ckpt_dir", hydra_value(&run.ckpt_dir));
    set("trainer_config.run_name", hydra_value(&run.run_name));
    set("trainer_config.zmq.publish_port", run.publish_port.to_string());
    set("trainer_config.zmq.controller_port", run.controller_port.to_string());
    a
}

/// `sleap-nn predict` arguments, with absolute worker paths already substituted into `data`,
/// `models` and `output`. `--gui` makes stdout carry only JSON progress lines.
pub fn track_args(spec: &TrackSpec, data: &str, models: &[String], output: &str, device: &str) -> Vec<String> {
    let mut a = vec!["predict".to_owned(), "--data_path".into(), data.into()];
    for m in models {
        a.extend(["--model_paths".into(), m.clone()]);
    }
    a.extend(["--output_path".into(), output.into(), "--device".into(), device.into(), "--gui".into()]);
    if let Some(b) = spec.batch_size {
        a.extend(["--batch_size".into(), b.to_string()]);
    }
    if let Some(p) = spec.peak_threshold {
        a.extend(["--peak_threshold".into(), p.to_string()]);
    }
    match spec.frame_filter {
        Some(FrameFilter::Suggested) => a.push("--only_suggested_frames".into()),
        Some(FrameFilter::User) => a.push("--only_labeled_frames".into()),
        Some(FrameFilter::Predicted) => a.push("--only_predicted_frames".into()),
        None => {}
    }
    if spec.exclude_user_labeled {
        a.push("--exclude_user_labeled".into());
    }
    if let Some(v) = spec.video_index {
        a.extend(["--video_index".into(), v.to_string()]);
    }
    if let Some(f) = &spec.frames {
        a.extend(["--frames".into(), f.clone()]);
    }
    a
}

/// Parses JSON the way Python's `json` module writes it: bare `NaN`, `Infinity` and `-Infinity`
/// (which jsonpickle emits for non-finite losses) become `null`.
pub fn lenient_json(text: &str) -> Option<Value> {
    if let Ok(v) = serde_json::from_str(text) {
        return Some(v);
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_str, mut esc) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            out.push(c);
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                in_str = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        let word = ["-Infinity", "Infinity", "NaN"].into_iter().find(|w| rest.starts_with(w));
        if let Some(w) = word {
            out.push_str("null");
            rest = &rest[w.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    serde_json::from_str(&out).ok()
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn uint(v: &Value, key: &str) -> Option<u32> {
    v.get(key).and_then(|n| n.as_u64().or_else(|| n.as_f64().map(|f| f as u64))).map(|n| n.min(u32::MAX as u64) as u32)
}

/// Which of sleap-nn's ZMQ messages go, unchanged, to clients that want them raw (upstream's
/// `PROGRESS_REPORT`, which the SLEAP GUI hands to its LossViewer): every event but `batch_end`,
/// and that at most once per `every` (sleap-nn sends one per batch).
#[derive(Debug)]
pub struct ReportThrottle {
    every: Duration,
    last_batch: Option<Duration>,
}

/// Largest ZMQ message forwarded raw; sleap-nn's are a few hundred bytes.
pub const MAX_REPORT: usize = 16 * 1024;

impl ReportThrottle {
    pub fn new(every: Duration) -> Self {
        ReportThrottle { every, last_batch: None }
    }

    /// Whether the message received at `now` is forwarded.
    pub fn pass(&mut self, text: &str, now: Duration) -> bool {
        if text.len() > MAX_REPORT {
            return false;
        }
        let Some(v) = lenient_json(text).filter(Value::is_object) else { return false };
        if v.get("event").and_then(Value::as_str) != Some("batch_end") {
            return true;
        }
        if self.last_batch.is_some_and(|t| now < t + self.every) {
            return false;
        }
        self.last_batch = Some(now);
        true
    }
}

/// Turns sleap-nn's ZMQ progress into [`Progress`] updates without flooding: every epoch and
/// lifecycle event is passed on at once, batch events at most once per `batch_every` (the last
/// batch of an epoch is always sent before its `epoch_end`).
#[derive(Debug)]
pub struct ProgressRelay {
    batch_every: Duration,
    last_batch_sent: Option<Duration>,
    pending_batch: Option<Progress>,
    epoch: u32,
    pub train_begin: bool,
    pub train_end: bool,
    /// Last `epoch_end` seen.
    pub last_epoch: Option<Progress>,
    /// Messages that were not JSON objects with an `event`.
    pub ignored: u64,
}

impl ProgressRelay {
    pub fn new(batch_every: Duration) -> Self {
        ProgressRelay {
            batch_every,
            last_batch_sent: None,
            pending_batch: None,
            epoch: 0,
            train_begin: false,
            train_end: false,
            last_epoch: None,
            ignored: 0,
        }
    }

    /// One ZMQ message at time `now` (any monotonic origin). Returns what to send now.
    pub fn on_message(&mut self, text: &str, now: Duration) -> Vec<Progress> {
        let Some(v) = lenient_json(text).filter(Value::is_object) else {
            self.ignored += 1;
            return vec![];
        };
        let logs = v.get("logs").cloned().unwrap_or(Value::Null);
        let mut out = Vec::new();
        match v.get("event").and_then(Value::as_str) {
            Some("train_begin") => {
                self.train_begin = true;
                out.push(Progress::TrainBegin);
            }
            Some("epoch_begin") => {
                self.epoch = uint(&v, "epoch").unwrap_or(self.epoch);
                out.extend(self.pending_batch.take());
                out.push(Progress::EpochBegin { epoch: self.epoch });
            }
            Some("batch_end") => {
                let p = Progress::Batch {
                    epoch: uint(&v, "epoch").unwrap_or(self.epoch),
                    batch: uint(&v, "batch").unwrap_or(0),
                    loss: num(&logs, "loss"),
                };
                let due = self.last_batch_sent.is_none_or(|t| now.saturating_sub(t) >= self.batch_every);
                if due {
                    self.last_batch_sent = Some(now);
                    self.pending_batch = None;
                    out.push(p);
                } else {
                    self.pending_batch = Some(p);
                }
            }
            Some("epoch_end") => {
                out.extend(self.pending_batch.take());
                let p = Progress::EpochEnd {
                    epoch: uint(&v, "epoch").unwrap_or(self.epoch),
                    loss: num(&logs, "loss"),
                    val_loss: num(&logs, "val/loss"),
                };
                self.last_epoch = Some(p.clone());
                out.push(p);
            }
            Some("train_end") => {
                self.train_end = true;
                out.extend(self.pending_batch.take());
                out.push(Progress::TrainEnd);
            }
            Some("batch_start") => {}
            _ => self.ignored += 1,
        }
        out
    }

    /// When [`ProgressRelay::poll`] wants to be called next.
    pub fn poll_at(&self) -> Option<Duration> {
        self.pending_batch.as_ref().map(|_| self.last_batch_sent.unwrap_or_default() + self.batch_every)
    }

    /// A held-back batch update that is now due.
    pub fn poll(&mut self, now: Duration) -> Option<Progress> {
        let due = self.poll_at()?;
        if now >= due {
            self.last_batch_sent = Some(now);
            self.pending_batch.take()
        } else {
            None
        }
    }
}

/// One stdout line of `sleap-nn predict --gui`.
#[derive(Debug, Clone, PartialEq)]
pub enum InferenceLine {
    Progress(Progress),
    Error {
        kind: String,
        message: String,
    },
    /// Not JSON: ordinary output.
    Text,
}

pub fn parse_inference_line(line: &str) -> InferenceLine {
    let t = line.trim();
    if !t.starts_with('{') {
        return InferenceLine::Text;
    }
    let Some(v) = lenient_json(t) else { return InferenceLine::Text };
    if v.get("error").and_then(Value::as_bool) == Some(true) {
        return InferenceLine::Error {
            kind: v.get("type").and_then(Value::as_str).unwrap_or("Error").to_owned(),
            message: v.get("message").and_then(Value::as_str).unwrap_or("inference failed").to_owned(),
        };
    }
    match v.get("n_processed").and_then(Value::as_u64) {
        Some(n) => InferenceLine::Progress(Progress::Inference {
            n_processed: n,
            n_total: v.get("n_total").and_then(Value::as_u64),
            rate: num(&v, "rate"),
            eta: num(&v, "eta"),
        }),
        None => InferenceLine::Text,
    }
}

/// A line of output ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub stream: Stream,
    pub text: String,
    /// A `\r` redraw: replaces the previous redraw instead of adding a line.
    pub cr: bool,
}

/// Longest line kept; longer ones are cut (a runaway progress bar must not grow without bound).
pub const MAX_LINE: usize = 8 * 1024;

/// Splits a process's output into lines and coalesces `\r` redraws (tqdm bars): only the latest
/// redraw is kept, and it is released at most once per `cr_every`. A redraw that a newline
/// finishes is dropped in favour of the finished line. ANSI escape sequences are removed.
#[derive(Debug)]
pub struct LogCoalescer {
    stream: Stream,
    cr_every: Duration,
    buf: Vec<u8>,
    /// The buffer holds a redraw (it began after a `\r`).
    in_cr: bool,
    pending_cr: Option<String>,
    last_cr_sent: Option<Duration>,
}

impl LogCoalescer {
    pub fn new(stream: Stream, cr_every: Duration) -> Self {
        LogCoalescer { stream, cr_every, buf: Vec::new(), in_cr: false, pending_cr: None, last_cr_sent: None }
    }

    fn text(bytes: &[u8]) -> String {
        strip_ansi(&String::from_utf8_lossy(bytes))
    }

    /// Feeds output bytes read at `now`.
    pub fn push(&mut self, data: &[u8], now: Duration) -> Vec<LogLine> {
        let mut out = Vec::new();
        for &b in data {
            match b {
                b'\n' => {
                    let text = Self::text(&self.buf);
                    self.buf.clear();
                    self.in_cr = false;
                    self.pending_cr = None;
                    out.push(LogLine { stream: self.stream, text, cr: false });
                }
                b'\r' => {
                    if !self.buf.is_empty() {
                        self.pending_cr = Some(Self::text(&self.buf));
                    }
                    self.buf.clear();
                    self.in_cr = true;
                }
                _ => {
                    if self.buf.len() < MAX_LINE {
                        self.buf.push(b);
                    }
                }
            }
        }
        if self.in_cr && !self.buf.is_empty() {
            // A redraw in progress (tqdm writes `\r` + the whole bar, then waits).
            self.pending_cr = Some(Self::text(&self.buf));
        }
        out.extend(self.poll(now));
        out
    }

    pub fn poll_at(&self) -> Option<Duration> {
        self.pending_cr.as_ref().map(|_| self.last_cr_sent.map_or(Duration::ZERO, |t| t + self.cr_every))
    }

    /// The latest redraw, if one is due.
    pub fn poll(&mut self, now: Duration) -> Option<LogLine> {
        let due = self.poll_at()?;
        if now < due {
            return None;
        }
        self.last_cr_sent = Some(now);
        let text = self.pending_cr.take()?;
        Some(LogLine { stream: self.stream, text, cr: true })
    }

    /// End of output: whatever is buffered.
    pub fn finish(&mut self) -> Option<LogLine> {
        let rest = std::mem::take(&mut self.buf);
        if !rest.is_empty() && !self.in_cr {
            return Some(LogLine { stream: self.stream, text: Self::text(&rest), cr: false });
        }
        self.pending_cr.take().map(|text| LogLine { stream: self.stream, text, cr: true })
    }
}

/// Removes ANSI CSI/OSC escape sequences (colours, cursor moves such as tqdm's `ESC[A`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match it.peek() {
            Some('[') => {
                it.next();
                for c in it.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                it.next();
                for c in it.by_ref() {
                    if c == '\u{7}' {
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// How an inference process (`sleap-nn track`) ended, as the runtime observed it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrackExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The message of sleap-nn's `{"error": true, ...}` line, if it printed one.
    pub error: Option<String>,
    /// The last lines of its stderr, oldest first.
    pub stderr_tail: Vec<String>,
    /// The predictions file exists.
    pub output_exists: bool,
    pub cancel_requested: bool,
}

/// Success is exit code 0 **and** a predictions file; otherwise the clearest reason at hand:
/// sleap-nn's own error line, then the exit code with the last output, then the signal.
pub fn classify_track(e: &TrackExit) -> (super::JobState, String) {
    use super::JobState::*;
    if e.cancel_requested {
        return (Cancelled, "cancelled by the user".into());
    }
    if e.code == Some(0) && e.output_exists {
        return (Completed, "inference completed".into());
    }
    let why = match (&e.error, e.code, e.signal) {
        (Some(msg), _, _) => msg.clone(),
        (None, Some(0), _) => "sleap-nn exited 0 but wrote no predictions file".into(),
        (None, Some(c), _) => {
            let tail: Vec<&str> = e.stderr_tail.iter().rev().take(3).rev().map(String::as_str).collect();
            format!("sleap-nn exited with code {c}; last output: {}", tail.join(" | "))
        }
        (None, None, Some(s)) => format!("sleap-nn was killed by signal {s}"),
        (None, None, None) => "sleap-nn ended for an unknown reason".into(),
    };
    (Failed, why)
}

/// How a trainer process ended, as the runtime observed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrainExit {
    /// The exit code, or `None` if a signal killed it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// sleap-nn published `train_end` over ZMQ.
    pub train_end: bool,
    /// `<ckpt_dir>/<run_name>/best.ckpt` exists.
    pub best_ckpt: bool,
    pub stop_requested: bool,
    pub cancel_requested: bool,
}

/// The reference's rule: success is exit code 0 **and** `train_end` **and** `best.ckpt`. SIGTERM
/// makes sleap-nn exit 0 without `train_end`, so "0" alone proves nothing.
pub fn classify_train(e: &TrainExit) -> (super::JobState, String) {
    use super::JobState::*;
    const SIGINT: i32 = 2;
    if e.cancel_requested {
        return (Cancelled, "cancelled by the user".into());
    }
    if e.code == Some(0) && e.train_end && e.best_ckpt {
        return if e.stop_requested {
            (StoppedEarly, "stopped early by the user; the model trained so far is the result".into())
        } else {
            (Completed, "training completed".into())
        };
    }
    // The SIGINT fallback of a stop: Lightning exits 1 but keeps the checkpoints.
    if e.stop_requested && e.best_ckpt && (e.code == Some(1) || e.signal == Some(SIGINT)) {
        return (
            StoppedEarly,
            "stopped early by the user (after an interrupt; post-training evaluation did not run)".into(),
        );
    }
    let why = match (e.code, e.signal) {
        (Some(0), _) if !e.train_end => {
            "sleap-nn exited with code 0 but never reported the end of training (was it terminated?)".to_owned()
        }
        (Some(0), _) => "training finished but wrote no best.ckpt".to_owned(),
        (Some(c), _) => format!("sleap-nn exited with code {c}"),
        (None, Some(s)) => format!("sleap-nn was killed by signal {s}"),
        (None, None) => "sleap-nn ended for an unknown reason".to_owned(),
    };
    (Failed, why)
}

/// The default predictions file name for a data file: `<stem>.predictions.slp`.
pub fn predictions_name(data_path: &str) -> String {
    let base = data_path.rsplit('/').next().unwrap_or(data_path);
    let stem = match base.strip_suffix(".pkg.slp").or_else(|| base.strip_suffix(".slp")) {
        Some(s) => s,
        None => base.rsplit_once('.').map_or(base, |(s, _)| s),
    };
    format!("{}.predictions.slp", if stem.is_empty() { "data" } else { stem })
}
