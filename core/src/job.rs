//! Jobs: what a client asks a worker to run, how the request is checked, the life of a job, and
//! the control messages that carry it over the `ctl` data channel.
//!
//! The spec fields are upstream's (`TrainJobSpec` / `TrackJobSpec`), so a job means the same thing
//! here as there. One rule is new: a *relative* path in a spec names a file the client uploads
//! with the job (it lands in the job's own directory on the worker), an *absolute* path names a
//! file already on the worker, which must lie inside one of the worker's mounts. Upstream only had
//! worker paths and a side channel for uploads.
//!
//! - [`parse_spec`] turns the JSON a peer sent into a [`JobSpec`] or a list of [`FieldError`]s
//!   (every problem at once, each naming its field), never a panic.
//! - [`validate`] applies upstream's ranges and rules; [`check_paths`] asks the caller (who owns the
//!   filesystem) about each path.
//! - [`Job`] is the state machine: submitted → accepted/rejected → running → completed / failed /
//!   stopped early / cancelled.
//! - [`JobMsg`] is the wire format on `ctl`; large files go over `bulk` as transfers.
//! - [`bridge`] holds the pure parts of driving sleap-nn: argv, ZMQ progress, log coalescing, and
//!   the success rule. [`auth`] holds the peer-authentication checks.

pub mod auth;
pub mod bridge;
pub mod housekeeping;
mod msg;
mod state;
#[cfg(test)]
mod tests;

pub use msg::*;
pub use state::*;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Upstream's numeric limits (`NUMERIC_CONSTRAINTS`).
pub const MAX_EPOCHS: (u64, u64) = (1, 10_000);
pub const BATCH_SIZE: (u64, u64) = (1, 256);
pub const LEARNING_RATE: (f64, f64) = (1e-10, 1.0);
pub const PEAK_THRESHOLD: (f64, f64) = (0.0, 1.0);
/// More configs than any real pipeline uses (upstream's largest is two: centroid + centered
/// instance); a bound so a spec cannot make a worker queue thousands of trainings.
pub const MAX_CONFIGS: usize = 8;
pub const MAX_MODELS: usize = 8;
/// Longest path or name accepted in a spec.
pub const MAX_PATH_LEN: usize = 4096;
/// Largest inline config (`config_contents`) accepted.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

/// A problem with one field of a spec. `field` uses upstream's names (`max_epochs`,
/// `config_paths[1]`, `config.train_labels_path[0]`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
    pub code: ErrorCode,
}

impl FieldError {
    pub fn new(field: impl Into<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into(), code }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Machine-readable reason for a [`FieldError`]. Upstream's codes where it had them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    MissingConfig,
    MissingField,
    InvalidType,
    OutOfRange,
    InvalidValue,
    InvalidPath,
    NotAllowed,
    PathNotFound,
    ConfigParseError,
    Unsupported,
    /// The worker is running another job.
    Busy,
    /// The peer has not proven membership of the worker's room.
    Unauthenticated,
    Internal,
}

/// Which frames a track job runs on (upstream's `frame_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameFilter {
    Suggested,
    User,
    Predicted,
}

/// `{"type":"train", ...}`: upstream's `TrainJobSpec`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainSpec {
    /// Configs to train, in order (a multi-model pipeline has several). Upstream's `config_path`
    /// and `config_paths` both land here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_paths: Vec<String>,
    /// Inline YAML configs (upstream's `config_content(s)`); trained after `config_paths`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_contents: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_labels_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_epochs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_ckpt_path: Option<String>,
    /// `client_path → worker_path`, applied to the spec's paths before validation.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub path_mappings: BTreeMap<String, String>,
}

/// `{"type":"track", ...}`: upstream's `TrackJobSpec`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrackSpec {
    pub data_path: String,
    pub model_paths: Vec<String>,
    /// File name of the predictions on the worker (inside the job directory); the client decides
    /// where its copy goes. Default: `<data stem>.predictions.slp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_filter: Option<FrameFilter>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exclude_user_labeled: bool,
    /// `1,2,3` or `10-20` (sleap-nn accepts one form or the other, not a mix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_index: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub path_mappings: BTreeMap<String, String>,
}

/// How a job ended: its final state, the message for the user, and its results (paths relative to
/// the job's directory).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub state: JobState,
    pub message: String,
    pub results: Vec<String>,
}

impl Outcome {
    pub fn new(state: JobState, message: impl Into<String>, results: Vec<String>) -> Self {
        Outcome { state, message: message.into(), results }
    }

    /// A failure with no results.
    pub fn failed(message: impl Into<String>) -> Self {
        Outcome::new(JobState::Failed, message, vec![])
    }
}

/// A job request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobSpec {
    Train(TrainSpec),
    Track(TrackSpec),
}

impl JobSpec {
    pub fn kind(&self) -> JobKind {
        match self {
            JobSpec::Train(_) => JobKind::Train,
            JobSpec::Track(_) => JobKind::Track,
        }
    }

    /// Every path the spec names, with the field it came from.
    pub fn paths(&self) -> Vec<(String, &str)> {
        let mut out = Vec::new();
        match self {
            JobSpec::Train(t) => {
                for (i, p) in t.config_paths.iter().enumerate() {
                    out.push((indexed("config_paths", i, t.config_paths.len()), p.as_str()));
                }
                if let Some(p) = &t.labels_path {
                    out.push(("labels_path".into(), p));
                }
                if let Some(p) = &t.val_labels_path {
                    out.push(("val_labels_path".into(), p));
                }
                if let Some(p) = &t.resume_ckpt_path {
                    out.push(("resume_ckpt_path".into(), p));
                }
            }
            JobSpec::Track(t) => {
                out.push(("data_path".into(), t.data_path.as_str()));
                for (i, p) in t.model_paths.iter().enumerate() {
                    out.push((format!("model_paths[{i}]"), p.as_str()));
                }
            }
        }
        out
    }
}

fn indexed(field: &str, i: usize, len: usize) -> String {
    if len == 1 { field.trim_end_matches('s').to_owned() } else { format!("{field}[{i}]") }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Train,
    Track,
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobKind::Train => "train",
            JobKind::Track => "track",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing

struct Fields {
    obj: Map<String, Value>,
    errors: Vec<FieldError>,
}

impl Fields {
    fn err(&mut self, field: &str, code: ErrorCode, msg: impl Into<String>) {
        self.errors.push(FieldError::new(field, code, msg));
    }

    fn string(&mut self, key: &str) -> Option<String> {
        match self.obj.remove(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.len() > MAX_PATH_LEN => {
                self.err(key, ErrorCode::InvalidValue, format!("longer than {MAX_PATH_LEN} bytes"));
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                self.err(key, ErrorCode::InvalidType, "must be a string");
                None
            }
        }
    }

    fn strings(&mut self, key: &str, max: usize, max_len: usize) -> Vec<String> {
        match self.obj.remove(key) {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) if a.len() > max => {
                self.err(key, ErrorCode::InvalidValue, format!("at most {max} entries"));
                vec![]
            }
            Some(Value::Array(a)) => {
                let mut out = Vec::new();
                for (i, v) in a.into_iter().enumerate() {
                    match v {
                        Value::String(s) if s.len() <= max_len => out.push(s),
                        Value::String(_) => self.err(
                            &format!("{key}[{i}]"),
                            ErrorCode::InvalidValue,
                            format!("longer than {max_len} bytes"),
                        ),
                        _ => self.err(&format!("{key}[{i}]"), ErrorCode::InvalidType, "must be a string"),
                    }
                }
                out
            }
            Some(_) => {
                self.err(key, ErrorCode::InvalidType, "must be a list of strings");
                vec![]
            }
        }
    }

    fn int(&mut self, key: &str, (lo, hi): (u64, u64)) -> Option<u32> {
        let v = self.obj.remove(key)?;
        if v.is_null() {
            return None;
        }
        let n = match &v {
            Value::Number(n) => {
                n.as_u64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64))
            }
            _ => None,
        };
        match n {
            Some(n) if (lo..=hi).contains(&n) => Some(n as u32),
            Some(_) | None if v.is_number() => {
                self.err(
                    key,
                    ErrorCode::OutOfRange,
                    format!("Value must be an integer between {lo} and {hi}, got {v}"),
                );
                None
            }
            _ => {
                self.err(key, ErrorCode::InvalidType, format!("must be an integer, got {v}"));
                None
            }
        }
    }

    fn float(&mut self, key: &str, (lo, hi): (f64, f64)) -> Option<f64> {
        match self.obj.remove(key)? {
            Value::Null => None,
            Value::Number(n) => match n.as_f64() {
                Some(f) if f >= lo && f <= hi => Some(f),
                _ => {
                    self.err(key, ErrorCode::OutOfRange, format!("Value must be between {lo} and {hi}, got {n}"));
                    None
                }
            },
            v => {
                self.err(key, ErrorCode::InvalidType, format!("must be a number, got {v}"));
                None
            }
        }
    }

    fn boolean(&mut self, key: &str) -> bool {
        match self.obj.remove(key) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(_) => {
                self.err(key, ErrorCode::InvalidType, "must be true or false");
                false
            }
        }
    }

    fn mappings(&mut self) -> BTreeMap<String, String> {
        match self.obj.remove("path_mappings") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(m)) if m.len() <= 64 => {
                let mut out = BTreeMap::new();
                for (k, v) in m {
                    match v {
                        Value::String(s) if !k.is_empty() && k.len() <= MAX_PATH_LEN && s.len() <= MAX_PATH_LEN => {
                            out.insert(k, s);
                        }
                        _ => self.err(
                            &format!("path_mappings[{k:.64}]"),
                            ErrorCode::InvalidValue,
                            "must map a non-empty path to a path string",
                        ),
                    }
                }
                out
            }
            Some(_) => {
                self.err(
                    "path_mappings",
                    ErrorCode::InvalidType,
                    "must be an object of at most 64 path → path entries",
                );
                BTreeMap::new()
            }
        }
    }
}

/// Parses a spec from JSON. Unknown fields are ignored (upstream's train behaviour; its track
/// spec crashed on them). Upstream's aliases are accepted: `config_path`, `config_content`,
/// `only_suggested_frames`.
pub fn parse_spec(v: &Value) -> Result<JobSpec, Vec<FieldError>> {
    let Value::Object(obj) = v else {
        return Err(vec![FieldError::new("spec", ErrorCode::InvalidType, "Job specification must be a JSON object")]);
    };
    let mut f = Fields { obj: obj.clone(), errors: vec![] };
    let spec = match f.string("type").as_deref() {
        Some("train") => {
            // Upstream's normalisation: the singular form is used only when the list is empty.
            // Its client sends both (`to_json` of a normalised spec), so adding them up would
            // train the same config twice.
            let single_path = f.string("config_path");
            let mut config_paths = f.strings("config_paths", MAX_CONFIGS, MAX_PATH_LEN);
            if config_paths.is_empty() {
                config_paths.extend(single_path);
            }
            let single_content = f.string_big("config_content");
            let mut config_contents = f.strings("config_contents", MAX_CONFIGS, MAX_CONFIG_BYTES);
            if config_contents.is_empty() {
                config_contents.extend(single_content);
            }
            JobSpec::Train(TrainSpec {
                config_paths,
                config_contents,
                model_types: f.strings("model_types", MAX_CONFIGS, 64),
                labels_path: f.string("labels_path"),
                val_labels_path: f.string("val_labels_path"),
                max_epochs: f.int("max_epochs", MAX_EPOCHS),
                batch_size: f.int("batch_size", BATCH_SIZE),
                learning_rate: f.float("learning_rate", LEARNING_RATE),
                run_name: f.string("run_name"),
                resume_ckpt_path: f.string("resume_ckpt_path"),
                path_mappings: f.mappings(),
            })
        }
        Some("track") => {
            let data_path = f.string("data_path").unwrap_or_default();
            let only_suggested = f.boolean("only_suggested_frames");
            let frame_filter = match f.string("frame_filter").as_deref() {
                None => only_suggested.then_some(FrameFilter::Suggested),
                Some("suggested") => Some(FrameFilter::Suggested),
                Some("user") => Some(FrameFilter::User),
                Some("predicted") => Some(FrameFilter::Predicted),
                Some("random") => {
                    f.err(
                        "frame_filter",
                        ErrorCode::Unsupported,
                        "frame_filter 'random' has no sleap-nn equivalent; use suggested, user or predicted",
                    );
                    None
                }
                Some(other) => {
                    f.err(
                        "frame_filter",
                        ErrorCode::InvalidValue,
                        format!("frame_filter must be one of suggested, user, predicted; got {other:.64}"),
                    );
                    None
                }
            };
            JobSpec::Track(TrackSpec {
                data_path,
                model_paths: f.strings("model_paths", MAX_MODELS, MAX_PATH_LEN),
                output_path: f.string("output_path"),
                batch_size: f.int("batch_size", BATCH_SIZE),
                peak_threshold: f.float("peak_threshold", PEAK_THRESHOLD),
                frame_filter,
                exclude_user_labeled: f.boolean("exclude_user_labeled"),
                frames: f.string("frames"),
                video_index: f.int("video_index", (0, 1_000_000)),
                path_mappings: f.mappings(),
            })
        }
        Some(other) => {
            return Err(vec![FieldError::new(
                "type",
                ErrorCode::InvalidValue,
                format!("Unknown job type: {other:.64} (expected train or track)"),
            )]);
        }
        None => {
            f.errors.push(FieldError::new("type", ErrorCode::MissingField, "missing job type (train or track)"));
            return Err(f.errors);
        }
    };
    let mut errors = f.errors;
    errors.extend(validate(&spec));
    if errors.is_empty() { Ok(spec) } else { Err(errors) }
}

impl Fields {
    fn string_big(&mut self, key: &str) -> Option<String> {
        match self.obj.remove(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.len() <= MAX_CONFIG_BYTES => Some(s),
            Some(Value::String(_)) => {
                self.err(key, ErrorCode::InvalidValue, format!("longer than {MAX_CONFIG_BYTES} bytes"));
                None
            }
            Some(_) => {
                self.err(key, ErrorCode::InvalidType, "must be a string");
                None
            }
        }
    }
}

/// Upstream's rules that need no filesystem: a config source, model paths, frame syntax,
/// names that are safe on the worker.
pub fn validate(spec: &JobSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    match spec {
        JobSpec::Train(t) => {
            if t.config_paths.is_empty() && t.config_contents.is_empty() {
                errors.push(FieldError::new(
                    "config",
                    ErrorCode::MissingConfig,
                    "Either config_paths or config_contents is required",
                ));
            }
            if t.config_paths.len() + t.config_contents.len() > MAX_CONFIGS {
                errors.push(FieldError::new(
                    "config",
                    ErrorCode::InvalidValue,
                    format!("at most {MAX_CONFIGS} configs"),
                ));
            }
            for (i, c) in t.config_contents.iter().enumerate() {
                if let Err(e) = bridge::ConfigInfo::parse(c) {
                    errors.push(FieldError::new(
                        indexed("config_contents", i, t.config_contents.len()),
                        ErrorCode::ConfigParseError,
                        e,
                    ));
                }
            }
            if let Some(r) = &t.run_name {
                if let Err(why) = check_run_name(r) {
                    errors.push(FieldError::new("run_name", ErrorCode::InvalidValue, why));
                }
            }
            for (i, m) in t.model_types.iter().enumerate() {
                if check_run_name(m).is_err() {
                    errors.push(FieldError::new(
                        format!("model_types[{i}]"),
                        ErrorCode::InvalidValue,
                        "model types are plain names such as centroid or centered_instance",
                    ));
                }
            }
        }
        JobSpec::Track(t) => {
            if t.data_path.is_empty() {
                errors.push(FieldError::new("data_path", ErrorCode::MissingField, "data_path is required"));
            }
            if t.model_paths.is_empty() {
                errors.push(FieldError::new(
                    "model_paths",
                    ErrorCode::MissingField,
                    "At least one model path is required",
                ));
            }
            if let Some(fr) = &t.frames {
                if let Err(why) = check_frames(fr) {
                    errors.push(FieldError::new("frames", ErrorCode::InvalidValue, why));
                }
            }
            if let Some(o) = &t.output_path {
                if crate::transfer::validate_name(o).is_err() || o.contains('/') {
                    errors.push(FieldError::new(
                        "output_path",
                        ErrorCode::InvalidPath,
                        "output_path is a plain file name (the worker writes it in the job directory)",
                    ));
                }
            }
        }
    }
    for (field, p) in spec.paths() {
        if let Err(e) = classify_path(p) {
            errors.push(FieldError::new(field, ErrorCode::InvalidPath, e));
        }
    }
    errors
}

/// A run name becomes a directory name on the worker.
pub fn check_run_name(r: &str) -> Result<(), String> {
    let ok = !r.is_empty()
        && r.len() <= 128
        && r != "."
        && r != ".."
        && r.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '=' | '+'));
    if ok { Ok(()) } else { Err(format!("run_name {r:.64?} must be 1-128 characters of letters, digits, _ - . = +")) }
}

/// sleap-nn's `--frames`: `1,2,3` or `1-3` (a mix such as `0-5,9` makes it crash).
pub fn check_frames(s: &str) -> Result<(), String> {
    let num = |t: &str| !t.is_empty() && t.len() <= 9 && t.bytes().all(|b| b.is_ascii_digit());
    if let Some((a, b)) = s.split_once('-') {
        if num(a) && num(b) && a.parse::<u64>().ok() <= b.parse::<u64>().ok() {
            return Ok(());
        }
    } else if s.split(',').all(num) {
        return Ok(());
    }
    Err(format!(
        "frames must be a list like 1,2,3 or one range like 10-20 (sleap-nn does not accept a mix); got {s:.64?}"
    ))
}

/// Where a spec path points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRef<'a> {
    /// Uploaded with the job; a safe relative name inside the job directory.
    Upload(&'a str),
    /// Already on the worker; must be inside one of its mounts.
    Worker(&'a str),
    /// `model:<id>`: a model of the room's registry, which the worker fetches (or has cached).
    Model(&'a str),
}

/// Prefix of a registry model reference in `model_paths`.
pub const MODEL_REF: &str = "model:";

pub fn classify_path(p: &str) -> Result<PathRef<'_>, String> {
    if p.is_empty() {
        return Err("Invalid path: empty".into());
    }
    if let Some(id) = p.strip_prefix(MODEL_REF) {
        crate::registry::check_name("model id", id).map_err(|e| e.to_string())?;
        return Ok(PathRef::Model(id));
    }
    if p.starts_with('/') {
        if p.contains('\0') || p.split('/').any(|c| c == "..") {
            return Err("Invalid path: worker paths must be absolute without '..' or NUL".into());
        }
        return Ok(PathRef::Worker(p));
    }
    crate::transfer::validate_name(p).map_err(|e| format!("Invalid path: {e}"))?;
    Ok(PathRef::Upload(p))
}

/// What the caller found when it looked at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathVerdict {
    Ok,
    /// Outside every mount (or, for uploads, not in the upload).
    NotAllowed,
    NotFound,
    Invalid(String),
}

/// Runs `look` on every path of the spec and turns bad verdicts into upstream's field errors.
pub fn check_paths(spec: &JobSpec, mut look: impl FnMut(PathRef<'_>) -> PathVerdict) -> Vec<FieldError> {
    let mut errors = Vec::new();
    for (field, p) in spec.paths() {
        let r = match classify_path(p) {
            Ok(r) => r,
            Err(e) => {
                // Reached when a path_mapping produced it: report it, never skip it.
                errors.push(FieldError::new(field, ErrorCode::InvalidPath, e));
                continue;
            }
        };
        let upload = matches!(r, PathRef::Upload(_));
        let model = matches!(r, PathRef::Model(_));
        match look(r) {
            PathVerdict::Ok => {}
            PathVerdict::NotAllowed => errors.push(FieldError::new(
                field,
                ErrorCode::NotAllowed,
                if upload {
                    "Path was not uploaded with the job".to_owned()
                } else if model {
                    "this worker has no model registry (start it with --registry)".to_owned()
                } else {
                    "Path not within allowed mounts".to_owned()
                },
            )),
            PathVerdict::NotFound => {
                errors.push(FieldError::new(field, ErrorCode::PathNotFound, "Path does not exist"))
            }
            PathVerdict::Invalid(e) => {
                errors.push(FieldError::new(field, ErrorCode::InvalidPath, format!("Invalid path: {e}")))
            }
        }
    }
    errors
}

/// Applies `path_mappings` (exact match first, then the longest matching directory prefix).
pub fn map_path(p: &str, mappings: &BTreeMap<String, String>) -> String {
    if let Some(m) = mappings.get(p) {
        return m.clone();
    }
    let best = mappings
        .iter()
        .filter(|(from, _)| {
            let from = from.trim_end_matches('/');
            !from.is_empty() && p.len() > from.len() && p.starts_with(from) && p.as_bytes()[from.len()] == b'/'
        })
        .max_by_key(|(from, _)| from.len());
    match best {
        Some((from, to)) => format!("{}{}", to.trim_end_matches('/'), &p[from.trim_end_matches('/').len()..]),
        None => p.to_owned(),
    }
}

impl JobSpec {
    /// The spec with `path_mappings` applied to its paths.
    pub fn mapped(mut self) -> JobSpec {
        match &mut self {
            JobSpec::Train(t) => {
                let m = std::mem::take(&mut t.path_mappings);
                for p in t.config_paths.iter_mut() {
                    *p = map_path(p, &m);
                }
                for p in [&mut t.labels_path, &mut t.val_labels_path, &mut t.resume_ckpt_path].into_iter().flatten() {
                    *p = map_path(p, &m);
                }
            }
            JobSpec::Track(t) => {
                let m = std::mem::take(&mut t.path_mappings);
                t.data_path = map_path(&t.data_path, &m);
                for p in t.model_paths.iter_mut() {
                    *p = map_path(p, &m);
                }
            }
        }
        self
    }
}
