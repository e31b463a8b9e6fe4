//! The `ctl` messages between client and worker (`JobMsg`), and the progress and status they carry.

use super::*;

/// Live progress of a job, from sleap-nn's ZMQ events (train) or `--gui` JSON lines (track).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// The trainer process started (sleap-nn spends ~10 s importing before `train_begin`).
    Started {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
    },
    TrainBegin,
    EpochBegin {
        epoch: u32,
    },
    /// Latest batch of an epoch (throttled: not every batch is sent).
    Batch {
        epoch: u32,
        batch: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loss: Option<f64>,
    },
    EpochEnd {
        epoch: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loss: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        val_loss: Option<f64>,
    },
    TrainEnd,
    Inference {
        n_processed: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        n_total: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rate: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eta: Option<f64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A snapshot of a job for `job_attach` and the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job_id: String,
    pub kind: JobKind,
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_epoch: Option<Progress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Names (relative to the job's result root) the worker sends back once it has finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<f64>,
    /// Model ids this job published to the room's registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<String>,
}

/// Everything said on the `ctl` channel between a client and a worker, as JSON objects with a
/// `type` (snake_case). Transfer messages (`transfer_*`) share the channel and are handled below
/// this layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobMsg {
    // -- authentication, before anything else
    /// W→C in room-secret mode: prove you know the secret.
    AuthChallenge {
        nonce: String,
    },
    /// C→W: a ticket from the signaling server (server-trust mode).
    AuthTicket {
        ticket: String,
    },
    /// C→W: the room-secret proof over the challenge and this connection.
    AuthResponse {
        mac: String,
    },
    AuthOk {
        worker: String,
    },
    /// W→C, then the worker closes the connection.
    AuthFailed {
        reason: String,
    },

    // -- jobs
    /// C→W. `files` is the manifest of what the client uploads right after acceptance (so the
    /// worker can check the spec's relative paths against it, and reuse files it already has).
    JobSubmit {
        client_job_id: String,
        spec: Value,
        #[serde(default)]
        files: Vec<crate::transfer::FileEntry>,
    },
    JobRejected {
        client_job_id: String,
        errors: Vec<FieldError>,
    },
    JobAccepted {
        client_job_id: String,
        job_id: String,
    },
    JobState {
        job_id: String,
        state: JobState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    JobProgress {
        job_id: String,
        progress: Progress,
    },
    /// A line of trainer output. `cr` marks a `\r` redraw (a progress bar) that replaces the
    /// previous `cr` line rather than adding a new one.
    JobLog {
        job_id: String,
        stream: Stream,
        text: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cr: bool,
    },
    /// W→C: the job ended. If `status.results` is not empty, a transfer with those names follows.
    JobDone {
        status: JobStatus,
    },
    /// C→W.
    JobStop {
        job_id: String,
    },
    JobCancel {
        job_id: String,
    },
    /// C→W: the last `tail` lines of the job's trainer log (as `job_log` messages), then its
    /// `job_status`; with `follow`, the connection is then attached, so new lines keep coming
    /// until `job_done`.
    JobLogs {
        job_id: String,
        #[serde(default = "default_tail")]
        tail: u32,
        #[serde(default)]
        follow: bool,
    },
    /// C→W: this user's jobs on the worker; answered with `job_listing`.
    JobList {},
    /// W→C: the asking user's jobs, newest first.
    JobListing {
        jobs: Vec<JobSummary>,
    },
    /// C→W: follow a job again (after a disconnect); `fetch` asks for its results if it has them.
    JobAttach {
        job_id: String,
        #[serde(default)]
        fetch: bool,
    },
    /// W→C: reply to `job_attach`.
    JobStatus {
        status: JobStatus,
    },
    /// W→C: a request the worker could not act on (unknown job, not yours, ...).
    JobError {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<String>,
        code: ErrorCode,
        message: String,
    },
}

/// One job in a `job_listing`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    pub status: JobStatus,
    /// Unix seconds.
    pub created_at: f64,
    pub updated_at: f64,
    /// Jobs ahead of it for the GPU, while it is queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ahead: Option<u32>,
}

fn default_tail() -> u32 {
    100
}

impl JobMsg {
    /// Decodes a `ctl` text message. `Ok(None)` for messages of other layers (transfers).
    pub fn decode(text: &str) -> Result<Option<JobMsg>, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let ty = v.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
        if ty.starts_with("transfer_") {
            return Ok(None);
        }
        serde_json::from_value(v).map(Some).map_err(|e| format!("bad {ty:.40} message: {e}"))
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}
