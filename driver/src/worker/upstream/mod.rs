//! The worker's adapter for upstream sleap-rtc 0.0.7 clients (the SLEAP GUI's remote-training API,
//! the Python CLI, sleap-app): their `TYPE::args` data-channel protocol
//! (`sleap_rtc_core::upstream`) translated onto the same job machinery, journal and caches as our
//! own clients. It challenges on open and processes nothing but the handshake until the client
//! has proven room membership (upstream kept processing after a failure; we do not). Paths stay
//! inside the mounts; upload names are reduced to a safe base name; the upload's claimed SHA-256
//! is checked. What a job says arrives as [`JobEvent`]s through `Attached::Upstream`, and
//! [`Translator`] turns each into the messages the clients parse, at their split positions.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sleap_rtc_core::job::{Interrupt, JobKind, JobMsg, JobSpec, parse_spec};
use sleap_rtc_core::upstream::{self as up, ClientMsg, ControlCommand, Frame, FsErrorCode, WorkerMsg, auth};
use tokio::sync::mpsc;

mod fs;
mod translate;
mod upload;

use translate::Translator;
use upload::Upload;

use super::{Attached, PeerCtx, Worker};
use crate::conn::PeerConnection;
use crate::{Runtime, sleep, timeout};

/// How long a client has to answer the challenge (upstream's worker waits 10 s).
const AUTH_WAIT: Duration = Duration::from_secs(10);
/// Messages other than `AUTH_RESPONSE` that may arrive before the proof: kept unread, and handled
/// only once the client has authenticated (the Python CLI sends its `JOB_SUBMIT` as soon as the
/// channel opens, before it has even seen the challenge). More, or more bytes, fail the handshake.
const PRE_AUTH_BACKLOG: usize = 16;
const PRE_AUTH_BYTES: usize = 2 * up::MAX_TEXT;
/// The room's authorized keys are reused this long (upstream: 300 s; shorter, so a removed member
/// or deleted key stops working sooner).
const KEYS_TTL: Duration = Duration::from_secs(60);
/// An unknown key triggers a refetch, but not more often than this.
const KEYS_REFETCH: Duration = Duration::from_secs(2);

/// What a job tells an upstream client's adapter.
pub(super) enum JobEvent {
    /// Sent by the adapter before it submits: what the job is, for the framing of its messages.
    Submitted {
        kind: JobKind,
        model_types: Vec<String>,
        labels: Option<String>,
    },
    Msg(JobMsg),
    /// sleap-nn's ZMQ message, unchanged (`PROGRESS_REPORT::`).
    Report(String),
}

/// A cached copy of `GET /api/rooms/{room}/authorized-keys`.
#[derive(Default)]
pub(super) struct KeyCache {
    keys: Vec<AuthorizedKey>,
    fetched: Option<Instant>,
    /// The last fetch that an unknown key asked for.
    refetched: Option<Instant>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct AuthorizedKey {
    public_key: String,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    username: Option<String>,
}

#[derive(serde::Deserialize)]
struct AuthorizedKeys {
    #[serde(default)]
    authorized_keys: Vec<AuthorizedKey>,
}

impl<R: Runtime> Worker<R> {
    fn uploads_dir(&self) -> PathBuf {
        self.cfg.work_dir.join("uploads")
    }

    /// Whether `p` (canonical) lies in the directory upstream clients upload into; jobs may name
    /// such files as worker paths, as they name files in the mounts.
    pub(super) fn in_uploads(&self, real: &Path) -> bool {
        self.uploads_dir().canonicalize().is_ok_and(|u| real.starts_with(u))
    }

    pub(super) async fn serve_upstream(self: Arc<Self>, ctx: PeerCtx, c: Arc<PeerConnection<R>>) {
        let peer = c.remote_peer().to_owned();
        let label = c.upstream_label().unwrap_or_default().to_owned();
        let (user, mut backlog) = match self.upstream_auth(&ctx, &c).await {
            Ok(u) => u,
            Err(reason) => {
                tracing::warn!(%peer, %label, %reason, "refused an unauthenticated upstream client");
                let _ = c.send_upstream_text(&WorkerMsg::AuthFailure(reason).encode());
                // Let the refusal reach the client before the connection goes.
                sleep::<R>(Duration::from_millis(300)).await;
                if let Ok(c) = Arc::try_unwrap(c) {
                    c.close().await;
                }
                return;
            }
        };
        tracing::info!(%peer, %user, %label, "upstream client authenticated");
        let _ = c.send_upstream_text(&WorkerMsg::AuthSuccess.encode());
        let (tx, rx) = mpsc::unbounded_channel();
        let current: Arc<Mutex<Option<String>>> = Arc::default();
        let translator = Translator::new(self.clone(), user.clone(), c.clone(), current.clone());
        R::spawn(translator.run(rx));
        let mut upload: Option<Upload> = None;
        // The hash a FILE_UPLOAD_CHECK announced, for the FILE_UPLOAD_START that follows.
        let mut announced: Option<String> = None;
        loop {
            let next = match backlog.pop_front() {
                Some(f) => Some(f),
                None => c.recv_upstream().await,
            };
            let Some((binary, data)) = next else { break };
            let msg = match up::parse_frame(binary, data) {
                Ok(Frame::KeepAlive) => continue,
                Ok(Frame::Data(bytes)) => {
                    self.upload_chunk(&c, &mut upload, &bytes);
                    continue;
                }
                Ok(Frame::Msg(m)) => m,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "undecodable upstream message");
                    continue;
                }
            };
            tracing::debug!(%peer, kind = msg.kind(), "upstream message");
            let reply = |m: WorkerMsg| {
                let _ = c.send_upstream_text(&m.encode());
            };
            match msg {
                ClientMsg::KeepAlive | ClientMsg::AuthResponse(_) => {}
                ClientMsg::UseWorkerPath(p) => self.use_worker_path(&p).await.into_iter().for_each(reply),
                ClientMsg::FsGetMounts => reply(WorkerMsg::FsMounts(self.mounts_json())),
                ClientMsg::FsGetInfo => reply(WorkerMsg::FsInfo(json!({
                    "worker_id": ctx.me,
                    "working_dir": self.cfg.work_dir.display().to_string(),
                    "mounts": self.mounts_json(),
                }))),
                ClientMsg::FsListDir { path, offset } => reply(self.list_dir(&path, offset)),
                ClientMsg::FsScanDir(raw) => reply(self.scan_dir(&raw)),
                ClientMsg::FsResolve { pattern, file_size, max_depth, mount } => {
                    let m = self.fs_resolve(&pattern, file_size, max_depth, mount.as_deref()).await;
                    reply(m)
                }
                ClientMsg::FsResolveWithPrefix(raw) => reply(self.resolve_with_prefix(&raw)),
                // Upstream's worker only acknowledges: the client sends the whole map with FS_WRITE_SLP.
                ClientMsg::FsApplyPrefix => reply(WorkerMsg::FsPrefixApplied),
                ClientMsg::FsWriteSlp(raw) => {
                    let m = self.write_slp(&raw).await;
                    reply(m)
                }
                ClientMsg::FileUploadCheck { sha256, name } => reply(self.upload_check(&sha256, &name, &mut announced)),
                ClientMsg::FileUploadStart { name, size, .. } => {
                    reply(self.upload_start(&name, size, announced.take(), &mut upload))
                }
                ClientMsg::FileUploadEnd => {
                    let m = self.upload_end(upload.take()).await;
                    reply(m)
                }
                ClientMsg::JobSubmit { client_job_id, spec } => {
                    let value: Value = match serde_json::from_str(&spec) {
                        Ok(v) => v,
                        Err(e) => {
                            reply(WorkerMsg::JobRejected {
                                client_job_id,
                                errors: json!([{"field": "spec", "code": "INVALID_TYPE",
                                    "message": format!("Invalid job specification: {e}")}]),
                            });
                            continue;
                        }
                    };
                    if let Ok(s) = parse_spec(&value) {
                        let kind = s.kind();
                        let (model_types, labels) = match s.mapped() {
                            JobSpec::Train(t) => (t.model_types, t.labels_path),
                            JobSpec::Track(_) => (vec![], None),
                        };
                        let _ = tx.send(JobEvent::Submitted { kind, model_types, labels });
                    }
                    let (me, user, at) = (self.clone(), user.clone(), Attached::Upstream(tx.clone()));
                    R::spawn(async move { me.submit(at, user, client_job_id, value, vec![]).await });
                }
                ClientMsg::ControlCommand(raw) => match up::control_command(&raw) {
                    Some(ControlCommand::Stop) => self.upstream_interrupt(&c, &user, &current, Interrupt::Stop),
                    Some(ControlCommand::Cancel) => self.upstream_interrupt(&c, &user, &current, Interrupt::Cancel),
                    None => tracing::debug!(%peer, "ignored a control command other than stop or cancel"),
                },
                ClientMsg::JobStop => self.upstream_interrupt(&c, &user, &current, Interrupt::Stop),
                ClientMsg::JobCancel => self.upstream_interrupt(&c, &user, &current, Interrupt::Cancel),
                ClientMsg::Unknown(kind) if kind.starts_with("FS_") => {
                    reply(WorkerMsg::FsError(FsErrorCode::InvalidRequest, format!("Unknown FS message type: {kind}")))
                }
                ClientMsg::Unknown(kind) => tracing::debug!(%peer, %kind, "ignored an unknown upstream message"),
            }
        }
        if let Some(u) = upload {
            let _ = std::fs::remove_file(&u.part);
        }
        tracing::info!(%peer, "upstream client disconnected");
    }

    /// The challenge: an Ed25519 signature by a room member's registered key, or upstream's
    /// HMAC with the room secret (`--room-secret`). Returns who the client is, and what it sent
    /// before its proof (to be handled now that it is known).
    async fn upstream_auth(
        &self,
        ctx: &PeerCtx,
        c: &PeerConnection<R>,
    ) -> Result<(String, VecDeque<(bool, Vec<u8>)>), String> {
        let mut bytes = [0u8; up::NONCE_BYTES];
        crate::random_bytes(&mut bytes).map_err(|e| {
            tracing::error!(error = %e, "cannot make a challenge nonce");
            "the worker cannot make a challenge".to_owned()
        })?;
        let nonce = auth::nonce(&bytes);
        c.send_upstream_text(&WorkerMsg::AuthChallenge(nonce.clone()).encode()).map_err(|e| e.to_string())?;
        let mut backlog = VecDeque::new();
        let response = timeout::<R, _>(AUTH_WAIT, async {
            let mut bytes = 0;
            while let Some((binary, data)) = c.recv_upstream().await {
                if data == up::KEEP_ALIVE {
                    continue;
                }
                if !binary && data.starts_with(b"AUTH_RESPONSE") {
                    if let Ok(Frame::Msg(ClientMsg::AuthResponse(v))) = up::parse_frame(binary, data) {
                        return Some(v);
                    }
                    return None;
                }
                // Nothing is processed before the proof; a client that keeps talking fails.
                bytes += data.len();
                backlog.push_back((binary, data));
                if backlog.len() > PRE_AUTH_BACKLOG || bytes > PRE_AUTH_BYTES {
                    return None;
                }
            }
            None
        })
        .await
        .map_err(|_| "timeout".to_owned())?
        .ok_or_else(|| "missing".to_owned())?;
        if response == "missing" {
            return Err("missing".into());
        }
        if let Some(secret) = &self.cfg.room_secret {
            if auth::room_secret_matches(secret, &nonce, &response) {
                return Ok(("room-secret".into(), backlog));
            }
        }
        for refetch in [false, true] {
            let keys = self.authorized_keys(&ctx.room, refetch).await;
            if let Some(k) = keys.iter().find(|k| auth::ed25519_matches(&k.public_key, &nonce, &response)) {
                let who = k.user_id.clone().or_else(|| k.username.clone()).unwrap_or_else(|| "room-member".into());
                return Ok((who, backlog));
            }
        }
        Err("invalid".into())
    }

    /// The room's registered member keys, cached for [`KEYS_TTL`]; `refetch` asks again (at most
    /// every [`KEYS_REFETCH`]) for a key registered since.
    async fn authorized_keys(&self, room: &str, refetch: bool) -> Vec<AuthorizedKey> {
        let mut cache = self.upstream_keys.lock().await;
        let fresh = cache.fetched.is_some_and(|t| t.elapsed() < KEYS_TTL);
        // A member who registered a key a moment ago is found at once; a client sending bogus
        // signatures makes the worker ask the server at most every KEYS_REFETCH.
        let asked_recently = cache.refetched.is_some_and(|t| t.elapsed() < KEYS_REFETCH);
        if (fresh && !refetch) || (refetch && asked_recently) {
            return cache.keys.clone();
        }
        if refetch {
            cache.refetched = Some(Instant::now());
        }
        let url = format!("{}/api/rooms/{room}/authorized-keys", self.http_base);
        crate::init_tls();
        let token = self.cfg.token.clone();
        let got: Result<AuthorizedKeys, String> = R::tokio_compat(async move {
            let http =
                reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
            let resp =
                http.get(&url).bearer_auth(token).send().await.map_err(|e| format!("cannot fetch {url}: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("{url} answered {}", resp.status()));
            }
            resp.json().await.map_err(|e| format!("bad answer from {url}: {e}"))
        })
        .await;
        cache.fetched = Some(Instant::now());
        match got {
            Ok(k) => cache.keys = k.authorized_keys,
            Err(e) => tracing::warn!(error = %e, "cannot fetch the room's authorized keys"),
        }
        cache.keys.clone()
    }

    fn upstream_interrupt(&self, c: &PeerConnection<R>, user: &str, current: &Mutex<Option<String>>, what: Interrupt) {
        let job = current.lock().ok().and_then(|g| g.clone());
        let Some(job) = job else {
            tracing::debug!("an upstream client asked to interrupt before it had a job");
            return;
        };
        if let Err((_, message)) = self.request_interrupt(user, &job, what) {
            let _ = c.send_upstream_text(&WorkerMsg::Line(format!("[worker] {message}")).encode());
        }
    }
}
