//! What a worker is configured with, and why it can fail to start.

use super::*;

/// Everything a worker is configured with.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Signaling WebSocket URL (`ws://host:port/ws`).
    pub server: String,
    /// The worker token (`slp_...`) or account key (`slp_acct_...`).
    pub token: String,
    /// Room to join (needed with an account key; a worker token names its room).
    pub room: Option<String>,
    pub name: Option<String>,
    pub work_dir: PathBuf,
    /// The `sleap-nn` executable.
    pub sleap_nn: PathBuf,
    /// Worker directories that jobs may name by absolute path (canonicalized).
    pub mounts: Vec<PathBuf>,
    /// A Python with sleap-io, to list the videos of a `.slp` for upstream clients' path check;
    /// `None`: the interpreter of the `sleap-nn` script, if it is a Python script.
    pub python: Option<PathBuf>,
    /// Room-secret mode: clients prove knowledge of this secret instead of a server ticket.
    pub room_secret: Option<String>,
    /// `--device` for inference (`auto`, `cpu`, `cuda:0`).
    pub device: String,
    pub peer: PeerOptions,
    pub supervision: Supervision,
    /// Uploaded files are kept (by content hash) up to this many bytes, so the same dataset sent
    /// again is not transferred again.
    pub upload_cache_bytes: u64,
    /// First reconnect delay (doubles up to 5 minutes).
    pub backoff_start: Duration,
    /// A model registry (`s3://bucket/prefix` or a directory): successful trainings are
    /// published to the room's manifest.
    pub registry: Option<String>,
    /// Registry models fetched for inference are kept up to this many bytes (least recently
    /// used first out).
    pub model_cache_bytes: u64,
    /// Publish the running job's progress (epoch, loss, a bounded loss history) in the room
    /// metadata, which the signaling server relays; off, progress goes only to the job's client.
    pub publish_progress: bool,
    /// Finished jobs' directories (inputs, models, logs) are removed this long after the job
    /// ended; never sooner than [`ATTACH_WINDOW`](super::ATTACH_WINDOW).
    pub keep_finished: Duration,
    /// The job directories together are kept under this many bytes, by removing finished ones,
    /// oldest first (never one within the attach window).
    pub jobs_cap_bytes: Option<u64>,
    /// Called (HTTP POST, JSON) with a job's summary when it ends: see `worker::notify`.
    pub notify_url: Option<String>,
    /// Jobs that may wait (uploading or uploaded) while one runs; more are refused as busy.
    pub queue: usize,
}

impl WorkerConfig {
    pub fn new(server: &str, token: &str, work_dir: &Path, sleap_nn: &Path) -> Self {
        WorkerConfig {
            server: server.to_owned(),
            token: token.to_owned(),
            room: None,
            name: None,
            work_dir: work_dir.to_path_buf(),
            sleap_nn: sleap_nn.to_path_buf(),
            mounts: vec![],
            python: None,
            room_secret: None,
            device: "auto".into(),
            peer: PeerOptions::default(),
            supervision: Supervision::default(),
            upload_cache_bytes: 20 << 30,
            backoff_start: Duration::from_secs(1),
            registry: None,
            model_cache_bytes: 50 << 30,
            publish_progress: false,
            keep_finished: Duration::from_secs(14 * 86_400),
            jobs_cap_bytes: None,
            notify_url: None,
            queue: 4,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the work directory {0} cannot be used: {1}")]
    WorkDir(PathBuf, std::io::Error),
    #[error("the signaling server refused this worker: {0}")]
    Refused(String),
    #[error(transparent)]
    NoRandomness(#[from] crate::NoRandomness),
}
