//! The client half of the job protocol: connect to a worker, prove room membership, submit a job
//! with its uploads, follow it, stop or cancel it, attach to it again later, fetch its results.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sleap_rtc_core::job::auth;
use sleap_rtc_core::job::{FieldError, JobMsg};
use sleap_rtc_core::signal::ServerMessage;

use crate::Runtime;
use crate::conn::{self, ConnError, PeerConnection, PeerOptions, Received, Sent, Transfer};
use crate::files;
use crate::signaling::{SignalingClient, SignalingError};

/// How a client proves it may use a worker.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// A ticket signed by the signaling server (the default).
    Ticket,
    /// The room's shared secret (for workers that do not trust the server).
    RoomSecret(String),
}

#[derive(Debug, thiserror::Error)]
pub enum JobClientError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error(transparent)]
    Signaling(#[from] SignalingError),
    #[error("the worker refused us: {0}")]
    AuthFailed(String),
    #[error("the worker rejected the job:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Rejected(Vec<FieldError>),
    #[error("{0}")]
    Protocol(String),
    #[error("the connection to the worker closed")]
    Closed,
    #[error("no answer from the worker within {0:?} ({1})")]
    Timeout(Duration, &'static str),
    #[error("cannot read the files to upload: {0}")]
    Files(std::io::Error),
    #[error(transparent)]
    NoRandomness(#[from] crate::NoRandomness),
}

const AUTH_WAIT: Duration = Duration::from_secs(20);
const ACCEPT_WAIT: Duration = Duration::from_secs(60);
/// How many messages may arrive while a reply is awaited before the worker counts as broken:
/// they are all kept for [`JobClient::next`], so without a bound a worker that never answers
/// could grow the queue for the whole wait.
const MAX_HELD: usize = 10_000;

/// An authenticated connection to a worker, on runtime `R`.
pub struct JobClient<R> {
    conn: Arc<PeerConnection<R>>,
    /// What arrived while `authenticate` or `submit` waited for its reply, oldest first. A worker
    /// may send anything at any time (a log line of a job this client attached to, a state
    /// change); dropping it would lose it for good, so [`JobClient::next`] hands it out first.
    held: Mutex<VecDeque<JobMsg>>,
}

impl<R: Runtime> JobClient<R> {
    /// Connects to `worker` (a peer id in our room) and authenticates.
    pub async fn connect(
        signaling: &SignalingClient<R>,
        worker: &str,
        opts: PeerOptions,
        how: &ClientAuth,
    ) -> Result<JobClient<R>, JobClientError> {
        let c = conn::connect(signaling, worker, opts).await?;
        let client = JobClient { conn: Arc::new(c), held: Mutex::new(VecDeque::new()) };
        client.authenticate(signaling, how).await?;
        Ok(client)
    }

    async fn authenticate(&self, signaling: &SignalingClient<R>, how: &ClientAuth) -> Result<(), JobClientError> {
        let worker = self.conn.remote_peer().to_owned();
        if let ClientAuth::Ticket = how {
            let req = json!({"type": "request_ticket", "target": worker, "fingerprint": self.conn.local_fingerprint()});
            match signaling.request(req).await?.msg {
                ServerMessage::PeerTicket { ticket } => self.send(&JobMsg::AuthTicket { ticket })?,
                other => {
                    return Err(JobClientError::Protocol(format!("unexpected reply to request_ticket: {other:?}")));
                }
            }
        }
        let wait = async {
            loop {
                match self.recv().await {
                    None => return Err(JobClientError::Closed),
                    Some(JobMsg::AuthOk { .. }) => return Ok(()),
                    Some(JobMsg::AuthFailed { reason }) => return Err(JobClientError::AuthFailed(reason)),
                    Some(JobMsg::AuthChallenge { nonce }) => match how {
                        ClientAuth::RoomSecret(secret) => {
                            let mac = auth::room_secret_mac(
                                secret,
                                &signaling.registered().room_id,
                                &nonce,
                                &worker,
                                signaling.peer_id(),
                                &self.conn.remote_fingerprint().unwrap_or_default(),
                                self.conn.local_fingerprint(),
                            );
                            self.send(&JobMsg::AuthResponse { mac })?;
                        }
                        ClientAuth::Ticket => {
                            return Err(JobClientError::AuthFailed(
                                "this worker requires the room secret (pass --room-secret or set SLEAP_RTC_ROOM_SECRET)"
                                    .into(),
                            ));
                        }
                    },
                    Some(other) => self.hold(other)?,
                }
            }
        };
        crate::timeout::<R, _>(AUTH_WAIT, wait)
            .await
            .map_err(|_| JobClientError::Timeout(AUTH_WAIT, "authentication"))?
    }

    pub fn connection(&self) -> &Arc<PeerConnection<R>> {
        &self.conn
    }

    pub fn send(&self, m: &JobMsg) -> Result<(), JobClientError> {
        self.conn.send_message(&m.to_value()).map_err(JobClientError::from)
    }

    /// Next job message from the worker, in the order the worker sent them (including those that
    /// arrived while [`JobClient::connect`] or [`JobClient::submit`] waited for their reply);
    /// `None` once the connection is closed and nothing is left. Undecodable messages are
    /// skipped (logged), never fatal.
    pub async fn next(&self) -> Option<JobMsg> {
        if let Some(m) = self.held.lock().unwrap_or_else(|e| e.into_inner()).pop_front() {
            return Some(m);
        }
        self.recv().await
    }

    /// Keeps a message that is not the reply being awaited, for [`JobClient::next`].
    fn hold(&self, m: JobMsg) -> Result<(), JobClientError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.len() >= MAX_HELD {
            return Err(JobClientError::Protocol(format!(
                "the worker sent more than {MAX_HELD} messages without answering"
            )));
        }
        held.push_back(m);
        Ok(())
    }

    /// Next message from the connection itself, bypassing `held`: everything held arrived
    /// before it, so `next` keeps the worker's order by draining `held` first.
    async fn recv(&self) -> Option<JobMsg> {
        loop {
            let text = self.conn.recv_message().await?;
            match JobMsg::decode(&text) {
                Ok(Some(m)) => return Some(m),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "ignoring a message from the worker"),
            }
        }
    }

    /// Submits a job and, once the worker accepts it, starts uploading `uploads` (each sent under
    /// its base name; a directory whole). Returns the worker's job id and the upload in progress.
    pub async fn submit(
        &self,
        spec: &Value,
        uploads: &[PathBuf],
    ) -> Result<(String, Option<Transfer<Sent>>), JobClientError> {
        let set = if uploads.is_empty() {
            None
        } else {
            let paths = uploads.to_vec();
            let set = R::spawn_blocking(move || files::build_send_set(&paths))
                .await
                .ok_or_else(|| JobClientError::Protocol("hashing the uploads panicked".into()))?
                .map_err(JobClientError::Files)?;
            Some(set)
        };
        let client_job_id = format!("c{:08x}", rand_u32()?);
        let files = set.as_ref().map(|s| s.manifest.files.clone()).unwrap_or_default();
        self.send(&JobMsg::JobSubmit { client_job_id: client_job_id.clone(), spec: spec.clone(), files })?;
        let wait = async {
            loop {
                match self.recv().await {
                    None => return Err(JobClientError::Closed),
                    Some(JobMsg::JobAccepted { client_job_id: c, job_id }) if c == client_job_id => return Ok(job_id),
                    Some(JobMsg::JobRejected { client_job_id: c, errors }) if c == client_job_id => {
                        return Err(JobClientError::Rejected(errors));
                    }
                    Some(JobMsg::JobError { message, .. }) => return Err(JobClientError::Protocol(message)),
                    Some(other) => self.hold(other)?,
                }
            }
        };
        let job_id = crate::timeout::<R, _>(ACCEPT_WAIT, wait)
            .await
            .map_err(|_| JobClientError::Timeout(ACCEPT_WAIT, "job submission"))??;
        let upload = match set {
            Some(set) => Some(self.conn.send_prepared(set).await?),
            None => None,
        };
        Ok((job_id, upload))
    }

    /// This user's jobs on the worker, newest first.
    pub async fn list(&self) -> Result<Vec<sleap_rtc_core::job::JobSummary>, JobClientError> {
        self.send(&JobMsg::JobList {})?;
        let wait = async {
            loop {
                match self.recv().await {
                    None => return Err(JobClientError::Closed),
                    Some(JobMsg::JobListing { jobs }) => return Ok(jobs),
                    Some(JobMsg::JobError { message, .. }) => return Err(JobClientError::Protocol(message)),
                    Some(other) => self.hold(other)?,
                }
            }
        };
        crate::timeout::<R, _>(ACCEPT_WAIT, wait).await.map_err(|_| JobClientError::Timeout(ACCEPT_WAIT, "job list"))?
    }

    /// Finish the current epoch and return the model so far.
    pub fn stop(&self, job_id: &str) -> Result<(), JobClientError> {
        self.send(&JobMsg::JobStop { job_id: job_id.to_owned() })
    }

    /// Kill the job; nothing is returned.
    pub fn cancel(&self, job_id: &str) -> Result<(), JobClientError> {
        self.send(&JobMsg::JobCancel { job_id: job_id.to_owned() })
    }

    /// Follow a job again; with `fetch`, a finished job's results are sent.
    /// Asks for the last `tail` lines of the job's trainer log (`job_log` messages, then a
    /// `job_status`); `follow` keeps the lines coming until `job_done`.
    pub fn logs(&self, job_id: &str, tail: u32, follow: bool) -> Result<(), JobClientError> {
        self.send(&JobMsg::JobLogs { job_id: job_id.to_owned(), tail, follow })
    }

    pub fn attach(&self, job_id: &str, fetch: bool) -> Result<(), JobClientError> {
        self.send(&JobMsg::JobAttach { job_id: job_id.to_owned(), fetch })
    }

    /// Accepts the results transfer (sent after `job_done`) into `dir`.
    pub fn receive_results(&self, dir: &Path) -> Result<Transfer<Received>, JobClientError> {
        Ok(self.conn.receive_files(dir)?)
    }

    /// Closes the connection gracefully.
    pub async fn close(self) {
        if let Ok(c) = Arc::try_unwrap(self.conn) {
            c.close().await;
        }
    }
}

fn rand_u32() -> Result<u32, crate::NoRandomness> {
    let mut b = [0u8; 4];
    crate::random_bytes(&mut b)?;
    Ok(u32::from_le_bytes(b))
}
