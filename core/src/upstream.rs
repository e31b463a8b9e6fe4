//! Upstream sleap-rtc 0.0.7's data-channel protocol, which the SLEAP GUI's remote-training API
//! (`sleap_rtc.api`), the Python CLI and sleap-app speak to a worker: one ordered, reliable data
//! channel carrying UTF-8 text messages `TYPE` / `TYPE::arg::arg` and raw binary file chunks.
//!
//! This module is the codec only: [`parse_client`] reads what a client sends, [`WorkerMsg::encode`]
//! writes what a worker answers, and [`auth`] holds the two challenge proofs. It is pure and
//! total: garbage gives a [`CodecError`], never a panic. The positions where fields are split are
//! the clients' own (see `../shared/reference/upstream-clients.md`), which differ per message:
//! `JOB_COMPLETE::{json}` carries its JSON right after the first `::` (the API splits once),
//! `JOB_FAILED::{job}::{json}` after the second (the API splits twice), `FILE_META::name:size:hint`
//! uses single colons. Where upstream's parse breaks on a `::` inside a path we split from the
//! end instead, so a path with `::` still round-trips.

use serde_json::Value;

/// Field separator of text messages.
pub const SEP: &str = "::";
/// The keep-alive both sides send every 15 s, as binary (sleap-app also sends it as text). It is
/// dropped by exact equality before anything treats bytes as file data.
pub const KEEP_ALIVE: &[u8] = b"KEEP_ALIVE";
/// Bytes of randomness in an `AUTH_CHALLENGE` nonce (43 characters of url-safe base64).
pub const NONCE_BYTES: usize = 32;
/// Size of the binary chunks a worker streams results in (upstream's 32 KiB).
pub const RESULT_CHUNK: usize = 32 * 1024;
/// Page size of `FS_LIST_DIR` (upstream's `MAX_RESULTS`).
pub const LIST_PAGE: usize = 20;
/// Largest text message accepted: a `JOB_SUBMIT` with the maximum number of inline configs.
pub const MAX_TEXT: usize = crate::job::MAX_CONFIGS * crate::job::MAX_CONFIG_BYTES + 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("message of {0} bytes is larger than the {MAX_TEXT}-byte limit")]
    TooLarge(usize),
    #[error("message is not UTF-8 text")]
    NotText,
    #[error("{kind}: missing field {field}")]
    MissingField { kind: &'static str, field: &'static str },
    #[error("{kind}: {field} is not a valid number: {value:.40}")]
    BadNumber { kind: &'static str, field: &'static str, value: String },
}

/// A message from an upstream client.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMsg {
    /// `AUTH_RESPONSE::{value}`: an Ed25519 signature, an HMAC, or `missing`.
    AuthResponse(String),
    /// `KEEP_ALIVE` as text (sleap-app).
    KeepAlive,
    /// `USE_WORKER_PATH::{path}`.
    UseWorkerPath(String),
    /// `FS_GET_INFO`.
    FsGetInfo,
    /// `FS_GET_MOUNTS`.
    FsGetMounts,
    /// `FS_LIST_DIR::{path}::{offset}` (offset optional).
    FsListDir { path: String, offset: usize },
    /// `FS_RESOLVE::{pattern}::{file_size}::{max_depth}::{mount_label}` (empty fields allowed).
    FsResolve { pattern: String, file_size: Option<u64>, max_depth: Option<u32>, mount: Option<String> },
    /// `FS_SCAN_DIR::{"directory","filenames":[...]}` (the JSON as sent).
    FsScanDir(String),
    /// `FS_WRITE_SLP::{"slp_path","output_dir","filename_map":{old:new},"output_filename"?}` (the
    /// JSON as sent): a copy of a `.slp` with its videos pointed at paths on the worker.
    FsWriteSlp(String),
    /// `FS_RESOLVE_WITH_PREFIX::{"original_path","new_path","other_missing":[...]}` (the JSON as
    /// sent): what one located video's prefix change would do to the other missing ones.
    FsResolveWithPrefix(String),
    /// `FS_APPLY_PREFIX::{"confirmed":true}` (upstream's worker only acknowledges it).
    FsApplyPrefix,
    /// `FILE_UPLOAD_CHECK::{sha256}::{filename}`.
    FileUploadCheck { sha256: String, name: String },
    /// `FILE_UPLOAD_START::{filename}::{total_bytes}::{dest_dir}::{1|0}`.
    FileUploadStart { name: String, size: u64, dest_dir: String, create_subdir: bool },
    /// `FILE_UPLOAD_END`.
    FileUploadEnd,
    /// `JOB_SUBMIT::{client_job_id}::{spec_json}` (the JSON unparsed: the job module checks it).
    JobSubmit { client_job_id: String, spec: String },
    /// `CONTROL_COMMAND::{raw}` or the legacy `ZMQ_CTRL::{raw}`: a message for sleap-nn's
    /// training controller, e.g. `{"command":"stop"}`.
    ControlCommand(String),
    /// `JOB_CANCEL` (SIGTERM, then SIGKILL).
    JobCancel,
    /// `JOB_STOP` (legacy: stop early).
    JobStop,
    /// Any other message type (the type only: the rest may be large or secret).
    Unknown(String),
}

impl ClientMsg {
    /// The message type, for logs (never the arguments: they can carry proofs and paths).
    pub fn kind(&self) -> &str {
        match self {
            ClientMsg::AuthResponse(_) => "AUTH_RESPONSE",
            ClientMsg::KeepAlive => "KEEP_ALIVE",
            ClientMsg::UseWorkerPath(_) => "USE_WORKER_PATH",
            ClientMsg::FsGetInfo => "FS_GET_INFO",
            ClientMsg::FsGetMounts => "FS_GET_MOUNTS",
            ClientMsg::FsListDir { .. } => "FS_LIST_DIR",
            ClientMsg::FsResolve { .. } => "FS_RESOLVE",
            ClientMsg::FsScanDir(_) => "FS_SCAN_DIR",
            ClientMsg::FsWriteSlp(_) => "FS_WRITE_SLP",
            ClientMsg::FsResolveWithPrefix(_) => "FS_RESOLVE_WITH_PREFIX",
            ClientMsg::FsApplyPrefix => "FS_APPLY_PREFIX",
            ClientMsg::FileUploadCheck { .. } => "FILE_UPLOAD_CHECK",
            ClientMsg::FileUploadStart { .. } => "FILE_UPLOAD_START",
            ClientMsg::FileUploadEnd => "FILE_UPLOAD_END",
            ClientMsg::JobSubmit { .. } => "JOB_SUBMIT",
            ClientMsg::ControlCommand(_) => "CONTROL_COMMAND",
            ClientMsg::JobCancel => "JOB_CANCEL",
            ClientMsg::JobStop => "JOB_STOP",
            ClientMsg::Unknown(k) => k,
        }
    }
}

/// What arrived on an upstream channel, once classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Msg(ClientMsg),
    /// Binary keep-alive: to be dropped.
    KeepAlive,
    /// Raw bytes: the chunks of an upload under way.
    Data(Vec<u8>),
}

/// Classifies one data-channel message.
pub fn parse_frame(binary: bool, data: Vec<u8>) -> Result<Frame, CodecError> {
    if data == KEEP_ALIVE {
        return Ok(Frame::KeepAlive);
    }
    if binary {
        return Ok(Frame::Data(data));
    }
    let text = String::from_utf8(data).map_err(|_| CodecError::NotText)?;
    parse_client(&text).map(Frame::Msg)
}

fn number<T: std::str::FromStr>(kind: &'static str, field: &'static str, s: &str) -> Result<T, CodecError> {
    s.trim().parse().map_err(|_| CodecError::BadNumber { kind, field, value: s.to_owned() })
}

fn optional<T: std::str::FromStr>(kind: &'static str, field: &'static str, s: &str) -> Result<Option<T>, CodecError> {
    if s.trim().is_empty() { Ok(None) } else { number(kind, field, s).map(Some) }
}

/// Parses a text message from a client.
pub fn parse_client(text: &str) -> Result<ClientMsg, CodecError> {
    if text.len() > MAX_TEXT {
        return Err(CodecError::TooLarge(text.len()));
    }
    let (kind, rest) = match text.split_once(SEP) {
        Some((k, r)) => (k, Some(r)),
        None => (text.trim_end(), None),
    };
    let need = |kind: &'static str, field: &'static str| {
        rest.map(str::to_owned).ok_or(CodecError::MissingField { kind, field })
    };
    Ok(match kind {
        "AUTH_RESPONSE" => ClientMsg::AuthResponse(need("AUTH_RESPONSE", "value")?.trim().to_owned()),
        "KEEP_ALIVE" => ClientMsg::KeepAlive,
        "USE_WORKER_PATH" => ClientMsg::UseWorkerPath(need("USE_WORKER_PATH", "path")?),
        "FS_GET_INFO" => ClientMsg::FsGetInfo,
        "FS_GET_MOUNTS" => ClientMsg::FsGetMounts,
        "FS_LIST_DIR" => {
            let rest = need("FS_LIST_DIR", "path")?;
            // The offset is the last field; a path may itself contain `::`.
            match rest.rsplit_once(SEP) {
                Some((path, off)) if off.trim().parse::<usize>().is_ok() => {
                    ClientMsg::FsListDir { path: path.to_owned(), offset: number("FS_LIST_DIR", "offset", off)? }
                }
                _ => ClientMsg::FsListDir { path: rest, offset: 0 },
            }
        }
        "FS_RESOLVE" => {
            let rest = need("FS_RESOLVE", "pattern")?;
            let mut it = rest.rsplitn(4, SEP);
            let fields: Vec<&str> = it.by_ref().collect();
            // rsplitn yields from the end: mount, depth, size, pattern.
            let (pattern, size, depth, mount) = match fields.as_slice() {
                [m, d, s, p] => (*p, *s, *d, *m),
                [d, s, p] => (*p, *s, *d, ""),
                [s, p] => (*p, *s, "", ""),
                [p] => (*p, "", "", ""),
                _ => ("", "", "", ""),
            };
            let mount = mount.trim();
            ClientMsg::FsResolve {
                pattern: pattern.to_owned(),
                file_size: optional("FS_RESOLVE", "file_size", size)?,
                max_depth: optional("FS_RESOLVE", "max_depth", depth)?,
                mount: (!mount.is_empty() && mount != "all").then(|| mount.to_owned()),
            }
        }
        "FS_SCAN_DIR" => ClientMsg::FsScanDir(need("FS_SCAN_DIR", "json")?),
        "FS_WRITE_SLP" => ClientMsg::FsWriteSlp(need("FS_WRITE_SLP", "json")?),
        "FS_RESOLVE_WITH_PREFIX" => ClientMsg::FsResolveWithPrefix(need("FS_RESOLVE_WITH_PREFIX", "json")?),
        "FS_APPLY_PREFIX" => ClientMsg::FsApplyPrefix,
        "FILE_UPLOAD_CHECK" => {
            let rest = need("FILE_UPLOAD_CHECK", "sha256")?;
            let (sha, name) = rest
                .split_once(SEP)
                .ok_or(CodecError::MissingField { kind: "FILE_UPLOAD_CHECK", field: "filename" })?;
            ClientMsg::FileUploadCheck { sha256: sha.trim().to_ascii_lowercase(), name: name.to_owned() }
        }
        "FILE_UPLOAD_START" => {
            const K: &str = "FILE_UPLOAD_START";
            let rest = need(K, "filename")?;
            let missing = |field| CodecError::MissingField { kind: K, field };
            let (name, rest) = rest.split_once(SEP).ok_or(missing("total_bytes"))?;
            let (size, rest) = rest.split_once(SEP).ok_or(missing("dest_dir"))?;
            // dest_dir is a path (it may contain `::`); the flag is the last field.
            let (dest, flag) = match rest.rsplit_once(SEP) {
                Some((d, f)) if matches!(f.trim(), "0" | "1") => (d, f.trim() == "1"),
                _ => (rest, false),
            };
            ClientMsg::FileUploadStart {
                name: name.to_owned(),
                size: number(K, "total_bytes", size)?,
                dest_dir: dest.to_owned(),
                create_subdir: flag,
            }
        }
        "FILE_UPLOAD_END" => ClientMsg::FileUploadEnd,
        "JOB_SUBMIT" => {
            let rest = need("JOB_SUBMIT", "client_job_id")?;
            let (id, spec) =
                rest.split_once(SEP).ok_or(CodecError::MissingField { kind: "JOB_SUBMIT", field: "spec" })?;
            ClientMsg::JobSubmit { client_job_id: id.to_owned(), spec: spec.to_owned() }
        }
        "CONTROL_COMMAND" => ClientMsg::ControlCommand(need("CONTROL_COMMAND", "command")?),
        "ZMQ_CTRL" => ClientMsg::ControlCommand(need("ZMQ_CTRL", "command")?),
        "JOB_CANCEL" => ClientMsg::JobCancel,
        "JOB_STOP" => ClientMsg::JobStop,
        other => ClientMsg::Unknown(other.chars().take(64).collect()),
    })
}

/// Whether a `CONTROL_COMMAND` payload asks to stop early (`{"command":"stop"}`) or to cancel
/// (`{"command":"cancel"}`), the two commands the GUI's LossViewer sends. `None` for anything
/// else (which is not forwarded: sleap-nn's controller crashes on payloads it does not expect).
pub fn control_command(raw: &str) -> Option<ControlCommand> {
    let v: Value = serde_json::from_str(raw.trim()).ok()?;
    match v.get("command").and_then(Value::as_str)? {
        "stop" => Some(ControlCommand::Stop),
        "cancel" => Some(ControlCommand::Cancel),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlCommand {
    Stop,
    Cancel,
}

/// `FS_ERROR` codes upstream's clients know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsErrorCode {
    AccessDenied,
    PathNotFound,
    InvalidRequest,
    MountNotFound,
    PatternTooBroad,
}

impl FsErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            FsErrorCode::AccessDenied => "ACCESS_DENIED",
            FsErrorCode::PathNotFound => "PATH_NOT_FOUND",
            FsErrorCode::InvalidRequest => "INVALID_REQUEST",
            FsErrorCode::MountNotFound => "MOUNT_NOT_FOUND",
            FsErrorCode::PatternTooBroad => "PATTERN_TOO_BROAD",
        }
    }
}

/// A message from the worker to an upstream client.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerMsg {
    AuthChallenge(String),
    AuthSuccess,
    AuthFailure(String),
    WorkerPathOk(String),
    WorkerPathError(String),
    /// `FS_CHECK_VIDEOS_RESPONSE::{"slp_path","total_videos","missing","accessible","embedded"}`.
    FsCheckVideos(Value),
    FsInfo(Value),
    /// `FS_MOUNTS_RESPONSE::[{"path","label"}]`.
    FsMounts(Value),
    FsList(Value),
    FsResolve(Value),
    FsScanDir(Value),
    /// `FS_WRITE_SLP_OK::{"output_path","videos_updated"}`.
    FsWriteSlpOk(Value),
    /// `FS_WRITE_SLP_ERROR::{"error",...}`.
    FsWriteSlpError(Value),
    /// `FS_PREFIX_PROPOSAL::{"old_prefix","new_prefix","would_resolve":[{original,resolved}],"would_not_resolve":[...]}`.
    FsPrefixProposal(Value),
    /// `FS_PREFIX_APPLIED::{"success":true}`.
    FsPrefixApplied,
    FsError(FsErrorCode, String),
    UploadCacheHit(String),
    UploadReady,
    UploadProgress {
        received: u64,
        total: u64,
    },
    UploadComplete(String),
    UploadError(String),
    JobAccepted(String),
    /// `JOB_REJECTED::{client_job_id}::{"errors":[{field,message,code}]}`.
    JobRejected {
        client_job_id: String,
        errors: Value,
    },
    /// `JOB_PROGRESS::{"epoch","loss","val_loss"}`.
    JobProgress(Value),
    /// `PROGRESS_REPORT::{sleap-nn's ZMQ message, unchanged}`: the GUI re-publishes it to its
    /// LossViewer as is.
    ProgressReport(String),
    /// A trainer output line, sent bare with its `\n` (training jobs).
    Line(String),
    /// A `\r` progress-bar redraw: `CR::{text}` (training jobs).
    Redraw(String),
    /// `JOB_LOG::{text}` or `JOB_LOG::CR::{text}` (inference jobs).
    JobLog {
        text: String,
        redraw: bool,
    },
    /// `MODEL_TYPE::{type}` between the models of a pipeline.
    ModelType(String),
    /// `JOB_COMPLETE::{"job_id","job_type","duration_seconds","success","stopped_early",...}`.
    JobComplete(Value),
    /// `JOB_FAILED::{job_id}::{"message",...}`: the API reads the JSON after the second `::`.
    JobFailed {
        job_id: String,
        detail: Value,
    },
    InferenceBegin,
    InferenceProgress(Value),
    InferenceLog(String),
    InferenceComplete(Value),
    InferenceFailed(Value),
    InferenceSkipped(Value),
    /// `FILE_META::{name}:{size}:{hint}`, single colons; raw chunks and `END_OF_FILE` follow.
    FileMeta {
        name: String,
        size: u64,
        hint: String,
    },
    EndOfFile,
}

/// One line of text: a message type or a field must not smuggle in a line break where the
/// client splits lines, nor the separator where it splits fields.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// A field that others follow: no colon at all (replacing `::` alone would turn `:::` back
/// into a separator). Ids and nonces have none; a client-chosen job id might.
fn field(s: &str) -> String {
    one_line(s).replace(':', "_")
}

impl WorkerMsg {
    pub fn encode(&self) -> String {
        let j = |kind: &str, v: &Value| format!("{kind}{SEP}{v}");
        match self {
            WorkerMsg::AuthChallenge(n) => format!("AUTH_CHALLENGE{SEP}{}", field(n)),
            WorkerMsg::AuthSuccess => "AUTH_SUCCESS".into(),
            WorkerMsg::AuthFailure(r) => format!("AUTH_FAILURE{SEP}{}", one_line(r)),
            WorkerMsg::WorkerPathOk(p) => format!("WORKER_PATH_OK{SEP}{}", one_line(p)),
            WorkerMsg::WorkerPathError(m) => format!("WORKER_PATH_ERROR{SEP}{}", one_line(m)),
            WorkerMsg::FsCheckVideos(v) => j("FS_CHECK_VIDEOS_RESPONSE", v),
            WorkerMsg::FsInfo(v) => j("FS_INFO_RESPONSE", v),
            WorkerMsg::FsMounts(v) => j("FS_MOUNTS_RESPONSE", v),
            WorkerMsg::FsList(v) => j("FS_LIST_RESPONSE", v),
            WorkerMsg::FsResolve(v) => j("FS_RESOLVE_RESPONSE", v),
            WorkerMsg::FsScanDir(v) => j("FS_SCAN_DIR_RESPONSE", v),
            WorkerMsg::FsWriteSlpOk(v) => j("FS_WRITE_SLP_OK", v),
            WorkerMsg::FsWriteSlpError(v) => j("FS_WRITE_SLP_ERROR", v),
            WorkerMsg::FsPrefixProposal(v) => j("FS_PREFIX_PROPOSAL", v),
            WorkerMsg::FsPrefixApplied => j("FS_PREFIX_APPLIED", &serde_json::json!({"success": true})),
            WorkerMsg::FsError(c, m) => format!("FS_ERROR{SEP}{}{SEP}{}", c.as_str(), one_line(m)),
            WorkerMsg::UploadCacheHit(p) => format!("FILE_UPLOAD_CACHE_HIT{SEP}{}", one_line(p)),
            WorkerMsg::UploadReady => "FILE_UPLOAD_READY".into(),
            WorkerMsg::UploadProgress { received, total } => {
                format!("FILE_UPLOAD_PROGRESS{SEP}{received}{SEP}{total}")
            }
            WorkerMsg::UploadComplete(p) => format!("FILE_UPLOAD_COMPLETE{SEP}{}", one_line(p)),
            WorkerMsg::UploadError(r) => format!("FILE_UPLOAD_ERROR{SEP}{}", one_line(r)),
            WorkerMsg::JobAccepted(id) => format!("JOB_ACCEPTED{SEP}{}", field(id)),
            WorkerMsg::JobRejected { client_job_id, errors } => {
                format!("JOB_REJECTED{SEP}{}{SEP}{}", field(client_job_id), serde_json::json!({"errors": errors}))
            }
            WorkerMsg::JobProgress(v) => j("JOB_PROGRESS", v),
            WorkerMsg::ProgressReport(raw) => format!("PROGRESS_REPORT{SEP}{raw}"),
            WorkerMsg::Line(t) => format!("{}\n", one_line(t)),
            WorkerMsg::Redraw(t) => format!("CR{SEP}{}", one_line(t)),
            WorkerMsg::JobLog { text, redraw: false } => format!("JOB_LOG{SEP}{}", one_line(text)),
            WorkerMsg::JobLog { text, redraw: true } => format!("JOB_LOG{SEP}CR{SEP}{}", one_line(text)),
            WorkerMsg::ModelType(t) => format!("MODEL_TYPE{SEP}{}", one_line(t)),
            WorkerMsg::JobComplete(v) => j("JOB_COMPLETE", v),
            WorkerMsg::JobFailed { job_id, detail } => format!("JOB_FAILED{SEP}{}{SEP}{detail}", field(job_id)),
            WorkerMsg::InferenceBegin => format!("INFERENCE_BEGIN{SEP}{{}}"),
            WorkerMsg::InferenceProgress(v) => j("INFERENCE_PROGRESS", v),
            WorkerMsg::InferenceLog(l) => format!("INFERENCE_LOG{SEP}{}", one_line(l)),
            WorkerMsg::InferenceComplete(v) => j("INFERENCE_COMPLETE", v),
            WorkerMsg::InferenceFailed(v) => j("INFERENCE_FAILED", v),
            WorkerMsg::InferenceSkipped(v) => j("INFERENCE_SKIPPED", v),
            WorkerMsg::FileMeta { name, size, hint } => {
                // The clients split on single colons: neither the name nor the hint may have one.
                let clean = |s: &str| one_line(s).replace(':', "_");
                format!("FILE_META{SEP}{}:{size}:{}", clean(name), clean(hint))
            }
            WorkerMsg::EndOfFile => "END_OF_FILE".into(),
        }
    }
}

/// Upstream's `FS_RESOLVE`: finding a file the client names by its name (and size) somewhere in
/// the worker's mounts, when the path it had does not exist there. The walk is the caller's; the
/// rules are here.
pub mod resolve {
    /// How deep below a mount the walk goes (upstream's `MAX_SEARCH_DEPTH`).
    pub const MAX_DEPTH: u32 = 5;
    /// Candidates at most (upstream stops after 20 hits).
    pub const MAX_HITS: usize = 20;
    /// A wildcard pattern needs this many other characters (upstream's `MIN_PATTERN_CHARS`).
    pub const MIN_PATTERN_CHARS: usize = 3;
    /// The walk gives up after this long (upstream's `SEARCH_TIMEOUT`), in milliseconds.
    pub const TIMEOUT_MS: u64 = 10_000;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum MatchType {
        Exact,
        Wildcard,
        Substring,
    }

    impl MatchType {
        pub fn as_str(self) -> &'static str {
            match self {
                MatchType::Exact => "exact",
                MatchType::Wildcard => "wildcard",
                MatchType::Substring => "substring",
            }
        }
    }

    /// A checked pattern.
    #[derive(Debug, Clone)]
    pub struct Query {
        lower: String,
        glob: Option<glob::Pattern>,
        size: Option<u64>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum QueryError {
        #[error("Pattern is required")]
        Empty,
        #[error("Pattern is too broad: a wildcard pattern needs at least {MIN_PATTERN_CHARS} other characters")]
        TooBroad,
        #[error("Invalid pattern: {0}")]
        Invalid(String),
    }

    impl Query {
        pub fn new(pattern: &str, size: Option<u64>) -> Result<Query, QueryError> {
            let p = pattern.trim();
            // A path was given: only its last component is looked for.
            let p = p.rsplit(['/', '\\']).next().unwrap_or(p);
            if p.is_empty() {
                return Err(QueryError::Empty);
            }
            let wild = p.contains(['*', '?', '[']);
            let glob = if wild {
                if p.chars().filter(|c| !matches!(c, '*' | '?' | '[' | ']')).count() < MIN_PATTERN_CHARS {
                    return Err(QueryError::TooBroad);
                }
                Some(glob::Pattern::new(&p.to_lowercase()).map_err(|e| QueryError::Invalid(e.to_string()))?)
            } else {
                None
            };
            Ok(Query { lower: p.to_lowercase(), glob, size })
        }

        /// How `name` (a file `depth` directories below its mount, of `size` bytes) matches, with
        /// upstream's score: exact 100, wildcard 50, substring 25; +20 for the exact size, +10
        /// within 10 %; −0.1 per directory level.
        pub fn score(&self, name: &str, size: u64, depth: u32) -> Option<(MatchType, f64)> {
            let n = name.to_lowercase();
            let (kind, mut score) = match &self.glob {
                Some(g) if g.matches(&n) => (MatchType::Wildcard, 50.0),
                Some(_) => return None,
                None if n == self.lower => (MatchType::Exact, 100.0),
                None if n.contains(&self.lower) => (MatchType::Substring, 25.0),
                None => return None,
            };
            if let Some(want) = self.size {
                if want == size {
                    score += 20.0;
                } else if want > 0 && (size as f64 - want as f64).abs() <= want as f64 * 0.1 {
                    score += 10.0;
                }
            }
            Some((kind, score - 0.1 * f64::from(depth)))
        }
    }
}

/// SLEAP's way of fixing many moved videos at once: the user locates one missing video on the
/// worker, the part of its path that changed is taken as a prefix change, and that change is
/// proposed for the other missing videos. Paths from a client may be Windows paths: both
/// separators split components, and what this produces uses `/` (the worker's own paths).
pub mod prefix {
    /// Components of a path, and whether it is absolute (a leading separator or a drive letter).
    fn parts(p: &str) -> (bool, Vec<&str>) {
        let absolute = p.starts_with(['/', '\\']) || p.as_bytes().get(1) == Some(&b':');
        (absolute, p.split(['/', '\\']).filter(|c| !c.is_empty()).collect())
    }

    fn join(absolute: bool, parts: &[&str]) -> String {
        let body = parts.join("/");
        // A drive letter ("C:") is its own root: no slash before it.
        if absolute && !parts.first().is_some_and(|p| p.ends_with(':')) { format!("/{body}") } else { body }
    }

    /// The change that turns `original` into `new`: the leading components that differ once the
    /// common tail (at least the file name) is set aside, as `(old_prefix, new_prefix)`. A relative
    /// `original` that is all tail has the empty old prefix (the new one is put in front of it).
    /// `None` when the file names differ (no prefix change explains that) or nothing changed.
    pub fn changed(original: &str, new: &str) -> Option<(String, String)> {
        let (old_abs, old) = parts(original);
        let (new_abs, new) = parts(new);
        if old.last()? != new.last()? {
            return None;
        }
        let common = old.iter().rev().zip(new.iter().rev()).take_while(|(a, b)| a == b).count();
        let (o, n) = (&old[..old.len() - common], &new[..new.len() - common]);
        if o.is_empty() && n.is_empty() && old_abs == new_abs {
            return None;
        }
        Some((join(old_abs, o), join(new_abs, n)))
    }

    /// `path` with `old_prefix` replaced by `new_prefix`, compared component by component; `None`
    /// if `path` does not start with it. The empty old prefix matches relative paths only.
    pub fn apply(path: &str, old_prefix: &str, new_prefix: &str) -> Option<String> {
        let (abs, parts) = parts(path);
        let (old_abs, old) = parts_of_prefix(old_prefix);
        if abs != old_abs || parts.len() <= old.len() || parts[..old.len()] != old[..] {
            return None;
        }
        let (new_abs, new) = parts_of_prefix(new_prefix);
        let mut out = new;
        out.extend_from_slice(&parts[old.len()..]);
        Some(join(new_abs, &out))
    }

    fn parts_of_prefix(p: &str) -> (bool, Vec<&str>) {
        if p.is_empty() { (false, vec![]) } else { parts(p) }
    }
}

/// The two proofs a client may answer `AUTH_CHALLENGE` with.
pub mod auth {
    use base64::Engine as _;
    use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    /// A device key pair in upstream's credential format, from 32 bytes of OS randomness: the
    /// raw private key and its public half, both url-safe base64 without padding (what
    /// `~/.sleap-rtc/credentials.json` keeps as `private_key` and `POST /api/auth/public-keys`
    /// takes as `public_key`).
    pub fn device_key(seed: &[u8; 32]) -> (String, String) {
        let key = ed25519_dalek::SigningKey::from_bytes(seed);
        (URL_SAFE_NO_PAD.encode(seed), URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()))
    }

    /// A challenge nonce from `bytes` of OS randomness: url-safe base64 without padding.
    pub fn nonce(bytes: &[u8; super::NONCE_BYTES]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Url-safe base64 with or without padding (upstream writes it without, Python's decoder
    /// wants it with).
    pub fn decode_b64(s: &str) -> Option<Vec<u8>> {
        let s = s.trim();
        URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok().or_else(|| URL_SAFE.decode(s).ok())
    }

    /// Checks an Ed25519 signature (url-safe base64) over the nonce's text against a public key
    /// (url-safe base64 of the raw 32 bytes). Malformed keys or signatures are simply no match.
    pub fn ed25519_matches(public_key_b64: &str, nonce: &str, signature_b64: &str) -> bool {
        let Some(key) = decode_b64(public_key_b64).and_then(|k| <[u8; 32]>::try_from(k).ok()) else { return false };
        let Some(sig) = decode_b64(signature_b64).and_then(|s| <[u8; 64]>::try_from(s).ok()) else { return false };
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&key) else { return false };
        key.verify_strict(nonce.as_bytes(), &ed25519_dalek::Signature::from_bytes(&sig)).is_ok()
    }

    /// Upstream's room-secret proof: HMAC-SHA256 keyed with the decoded secret over the decoded
    /// nonce, url-safe base64 without padding. A secret that is not base64 is used as its text.
    pub fn room_secret_hmac(secret: &str, nonce: &str) -> Option<String> {
        Some(URL_SAFE_NO_PAD.encode(keyed(secret, nonce)?.finalize().into_bytes()))
    }

    /// Constant-time check of a room-secret proof.
    pub fn room_secret_matches(secret: &str, nonce: &str, response: &str) -> bool {
        match (keyed(secret, nonce), decode_b64(response)) {
            (Some(mac), Some(got)) => mac.verify_slice(&got).is_ok(),
            _ => false,
        }
    }

    /// The HMAC state after the nonce, keyed with the secret as upstream decodes it.
    fn keyed(secret: &str, nonce: &str) -> Option<Hmac<Sha256>> {
        let key = decode_b64(secret).filter(|k| !k.is_empty()).unwrap_or_else(|| secret.as_bytes().to_vec());
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
        mac.update(&decode_b64(nonce)?);
        Some(mac)
    }
}

#[cfg(test)]
mod tests;
