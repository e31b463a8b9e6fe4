//! The worker's adapter for upstream sleap-rtc 0.0.7 clients (the SLEAP GUI's remote-training API,
//! the Python CLI, sleap-app): their `TYPE::args` data-channel protocol
//! (`sleap_rtc_core::upstream`) translated onto the same job machinery, journal and caches as our
//! own clients. It challenges on open and processes nothing but the handshake until the client
//! has proven room membership (upstream kept processing after a failure; we do not). Paths stay
//! inside the mounts; upload names are reduced to a safe base name; the upload's claimed SHA-256
//! is checked. What a job says arrives as [`JobEvent`]s through `Attached::Upstream`, and
//! [`Translator`] turns each into the messages the clients parse, at their split positions.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::Digest as _;
use sleap_rtc_core::job::{Interrupt, JobKind, JobMsg, JobSpec, JobState, JobStatus, Progress, Stream, parse_spec};
use sleap_rtc_core::upstream::{self as up, ClientMsg, ControlCommand, Frame, FsErrorCode, WorkerMsg, auth};
use tokio::sync::mpsc;

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
/// Results stream while at most this many bytes are unacknowledged (upstream: 16 MiB).
const STREAM_HIGH_WATER: usize = 4 * 1024 * 1024;
/// `FILE_UPLOAD_PROGRESS` at most this often (upstream's interval).
const UPLOAD_PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Largest upload accepted.
const MAX_UPLOAD: u64 = 1 << 40;

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

/// An upload under way (`FILE_UPLOAD_START` … `FILE_UPLOAD_END`).
struct Upload {
    part: PathBuf,
    name: String,
    file: std::fs::File,
    size: u64,
    received: u64,
    sha: sha2::Sha256,
    claimed: Option<String>,
    last_progress: Instant,
    failed: Option<String>,
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
        let translator = Translator {
            worker: self.clone(),
            user: user.clone(),
            labels: None,
            c: c.clone(),
            jobs_dir: self.jobs_dir.clone(),
            current: current.clone(),
            kind: JobKind::Train,
            model_types: vec![],
            models_started: 0,
            run_names: vec![],
            started: Instant::now(),
            active: false,
        };
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

    fn mounts_json(&self) -> Value {
        let mounts: Vec<Value> = self
            .cfg
            .mounts
            .iter()
            .map(|m| {
                let label = m.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into());
                json!({"path": m.display().to_string(), "label": label})
            })
            .collect();
        Value::Array(mounts)
    }

    /// A path inside a mount, canonical; the error is what the client is told.
    fn inside_mounts(&self, p: &str) -> Result<PathBuf, (FsErrorCode, String)> {
        if p.trim().is_empty() {
            return Err((FsErrorCode::InvalidRequest, "Path is required".into()));
        }
        let path = Path::new(p);
        match path.canonicalize() {
            Ok(real) if self.cfg.mounts.iter().any(|m| real.starts_with(m)) || self.in_uploads(&real) => Ok(real),
            Ok(_) => Err((FsErrorCode::AccessDenied, "Access denied: path is outside configured mounts".into())),
            // "Not found" only inside the mounts: outside, the client must not learn what exists.
            Err(_) if self.cfg.mounts.iter().any(|m| path.starts_with(m)) => {
                Err((FsErrorCode::PathNotFound, format!("File not found: {p}")))
            }
            Err(_) => Err((FsErrorCode::AccessDenied, "Access denied: path is outside configured mounts".into())),
        }
    }

    async fn use_worker_path(&self, p: &str) -> Vec<WorkerMsg> {
        match self.inside_mounts(p) {
            Err((FsErrorCode::AccessDenied, _)) => {
                vec![WorkerMsg::WorkerPathError("Path not within configured mounts".into())]
            }
            Err((_, m)) => vec![WorkerMsg::WorkerPathError(m)],
            Ok(real) => {
                let shown = real.display().to_string();
                let mut out = vec![WorkerMsg::WorkerPathOk(shown.clone())];
                // Always answered for a .slp: the client's path check waits for it.
                if shown.ends_with(".slp") {
                    out.push(WorkerMsg::FsCheckVideos(self.check_videos(&real).await));
                }
                out
            }
        }
    }

    /// The Python that can read a `.slp` (sleap-io): `--python`, or the interpreter named by the
    /// `sleap-nn` script's `#!` line.
    fn sleap_io_python(&self) -> Option<PathBuf> {
        if let Some(p) = &self.cfg.python {
            return Some(p.clone());
        }
        let head = std::fs::read(&self.cfg.sleap_nn).ok()?;
        let line = head.split(|b| *b == b'\n').next()?;
        let interp = std::str::from_utf8(line.strip_prefix(b"#!")?).ok()?.split_whitespace().next()?;
        let path = PathBuf::from(interp);
        path.file_name()?.to_str()?.starts_with("python").then_some(path)
    }

    /// Upstream's `FS_CHECK_VIDEOS_RESPONSE`: which videos the labels name, which of them are on
    /// this machine (inside the mounts), which are missing, which are embedded. Read with sleap-io
    /// in a child process (bounded in time and output); without it, or if it fails, the answer
    /// says the check was not made rather than that nothing is missing.
    async fn check_videos(&self, slp: &Path) -> Value {
        const SCRIPT: &str = r#"
import json, sys
import sleap_io as sio
labels = sio.load_slp(sys.argv[1], open_videos=False)
out = []
for v in labels.videos:
    f = v.filename if isinstance(v.filename, str) else (v.filename[0] if v.filename else "")
    meta = v.backend_metadata or {}
    out.append({"filename": f, "embedded": bool(meta.get("has_embedded_images"))})
print(json.dumps({"videos": out}))
"#;
        let shown = slp.display().to_string();
        let unchecked = |why: &str| {
            json!({"slp_path": shown, "total_videos": 0, "found": [], "missing": [], "accessible": 0,
                   "embedded": 0, "checked": false, "note": why})
        };
        let Some(python) = self.sleap_io_python() else {
            return unchecked("this worker has no Python with sleap-io (--python) to read the labels' videos");
        };
        let mut cmd = std::process::Command::new(&python);
        cmd.arg("-c").arg(SCRIPT).arg(slp).stdin(std::process::Stdio::null());
        let listed = match crate::output::<R>(cmd, Duration::from_secs(60)).await {
            Some((st, out)) if st.success() && out.len() < 4 << 20 => serde_json::from_slice::<Value>(&out).ok(),
            _ => None,
        };
        let Some(videos) = listed.as_ref().and_then(|v| v["videos"].as_array()) else {
            tracing::warn!(python = %python.display(), slp = %shown, "cannot list the videos of a .slp");
            return unchecked("the worker could not read the labels' video list");
        };
        let (mut found, mut missing, mut embedded) = (vec![], vec![], 0);
        for v in videos.iter().take(10_000) {
            let name = v["filename"].as_str().unwrap_or_default();
            if v["embedded"].as_bool() == Some(true) {
                embedded += 1;
                continue;
            }
            let base = Path::new(name).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match self.inside_mounts(name) {
                Ok(real) if real.is_file() => found.push(json!({"filename": base, "original_path": name,
                    "worker_path": real.display().to_string()})),
                _ => missing.push(json!({"filename": base, "original_path": name})),
            }
        }
        json!({"slp_path": shown, "total_videos": videos.len(), "accessible": found.len(), "embedded": embedded,
               "found": found, "missing": missing, "checked": true})
    }

    fn list_dir(&self, p: &str, offset: usize) -> WorkerMsg {
        let dir = match self.inside_mounts(p) {
            Ok(d) => d,
            Err((code, m)) => return WorkerMsg::FsError(code, m),
        };
        let rd = match std::fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) => {
                return WorkerMsg::FsError(FsErrorCode::PathNotFound, format!("cannot list {}: {e}", dir.display()));
            }
        };
        let mut entries: Vec<(bool, String, u64, f64)> = rd
            .filter_map(Result::ok)
            .filter_map(|e| {
                let md = e.metadata().ok()?;
                let modified = md
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0.0, |d| d.as_secs_f64());
                Some((md.is_dir(), e.file_name().to_string_lossy().into_owned(), md.len(), modified))
            })
            .collect();
        entries.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.to_lowercase().cmp(&b.1.to_lowercase())));
        let total = entries.len();
        let page: Vec<Value> = entries
            .into_iter()
            .skip(offset)
            .take(up::LIST_PAGE)
            .map(|(is_dir, name, size, modified)| {
                json!({"name": name, "type": if is_dir { "directory" } else { "file" }, "size": size, "modified": modified})
            })
            .collect();
        WorkerMsg::FsList(json!({
            "path": dir.display().to_string(),
            "entries": page,
            "total_count": total,
            "has_more": offset.saturating_add(up::LIST_PAGE) < total,
        }))
    }

    /// `FS_RESOLVE`: the files in the mounts (or the one labelled `mount`) whose name matches,
    /// best first. The walk does not follow directory symlinks (no loops, no escape) and stops
    /// at the hit, depth and time limits of upstream.
    async fn fs_resolve(&self, pattern: &str, size: Option<u64>, depth: Option<u32>, mount: Option<&str>) -> WorkerMsg {
        use up::resolve::{MAX_DEPTH, MAX_HITS, Query, QueryError, TIMEOUT_MS};
        let query = match Query::new(pattern, size) {
            Ok(q) => q,
            Err(e @ QueryError::TooBroad) => return WorkerMsg::FsError(FsErrorCode::PatternTooBroad, e.to_string()),
            Err(e) => return WorkerMsg::FsError(FsErrorCode::InvalidRequest, e.to_string()),
        };
        let label = |m: &PathBuf| m.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into());
        let roots: Vec<PathBuf> =
            self.cfg.mounts.iter().filter(|m| mount.is_none_or(|l| label(m) == l)).cloned().collect();
        if roots.is_empty() {
            return WorkerMsg::FsError(
                FsErrorCode::MountNotFound,
                format!("no mount labelled {:.64}", mount.unwrap_or("")),
            );
        }
        let depth = depth.unwrap_or(MAX_DEPTH).min(MAX_DEPTH);
        let walk = move || {
            let start = Instant::now();
            let deadline = start + Duration::from_millis(TIMEOUT_MS);
            let (mut hits, mut timed_out, mut truncated) = (Vec::new(), false, false);
            let mut stack: Vec<(PathBuf, u32)> = roots.into_iter().map(|r| (r, 0)).collect();
            'walk: while let Some((dir, d)) = stack.pop() {
                let Ok(rd) = std::fs::read_dir(&dir) else { continue };
                for e in rd.filter_map(Result::ok) {
                    if Instant::now() > deadline {
                        timed_out = true;
                        break 'walk;
                    }
                    let Ok(ft) = e.file_type() else { continue };
                    if ft.is_dir() {
                        if d < depth {
                            stack.push((e.path(), d + 1));
                        }
                        continue;
                    }
                    let Ok(md) = e.metadata() else { continue };
                    if !md.is_file() {
                        continue;
                    }
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let Some((kind, score)) = query.score(&name, md.len(), d) {
                        let modified = md
                            .modified()
                            .ok()
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map_or(0.0, |t| t.as_secs_f64());
                        hits.push(json!({"path": e.path().display().to_string(), "name": name, "size": md.len(),
                            "modified": modified, "match_type": kind.as_str(), "score": score}));
                        if hits.len() >= MAX_HITS {
                            truncated = true;
                            break 'walk;
                        }
                    }
                }
            }
            let score = |v: &Value| v["score"].as_f64().unwrap_or(0.0);
            hits.sort_by(|a, b| score(b).total_cmp(&score(a)));
            json!({"candidates": hits, "truncated": truncated, "timeout": timed_out,
                "search_time_ms": start.elapsed().as_millis() as u64})
        };
        match R::spawn_blocking(walk).await {
            Some(v) => WorkerMsg::FsResolve(v),
            None => WorkerMsg::FsError(FsErrorCode::InvalidRequest, "the search failed".into()),
        }
    }

    fn scan_dir(&self, raw: &str) -> WorkerMsg {
        let v: Value = serde_json::from_str(raw).unwrap_or(Value::Null);
        let (Some(dir), Some(names)) =
            (v.get("directory").and_then(Value::as_str), v.get("filenames").and_then(Value::as_array))
        else {
            return WorkerMsg::FsError(FsErrorCode::InvalidRequest, "FS_SCAN_DIR needs directory and filenames".into());
        };
        let dir = match self.inside_mounts(dir) {
            Ok(d) => d,
            Err((code, m)) => return WorkerMsg::FsError(code, m),
        };
        let mut found = serde_json::Map::new();
        for n in names.iter().filter_map(Value::as_str).take(10_000) {
            // A bare file name only: no walking out of the directory.
            let ok = sleap_rtc_core::transfer::validate_name(n).is_ok() && !n.contains('/');
            let p = dir.join(n);
            let v = if ok && p.is_file() { Value::String(p.display().to_string()) } else { Value::Null };
            found.insert(n.to_owned(), v);
        }
        WorkerMsg::FsScanDir(json!({"directory": dir.display().to_string(), "found": found}))
    }

    /// A file of that content and name uploaded before is used again (the content is named by its
    /// hash, which `upload_end` checked when it arrived).
    fn upload_check(&self, sha: &str, name: &str, announced: &mut Option<String>) -> WorkerMsg {
        *announced = None;
        if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            if let Some(hit) = safe_name(name).map(|n| self.uploads_dir().join(sha).join(n)).filter(|p| p.is_file()) {
                return WorkerMsg::UploadCacheHit(hit.display().to_string());
            }
            *announced = Some(sha.to_owned());
        }
        WorkerMsg::UploadReady
    }

    fn upload_start(&self, name: &str, size: u64, claimed: Option<String>, upload: &mut Option<Upload>) -> WorkerMsg {
        if let Some(u) = upload.take() {
            let _ = std::fs::remove_file(&u.part);
        }
        let Some(name) = safe_name(name) else {
            return WorkerMsg::UploadError(format!("unsafe file name {name:.80}"));
        };
        if size > MAX_UPLOAD {
            return WorkerMsg::UploadError(format!("{size} bytes is more than this worker accepts"));
        }
        let mut suffix = [0u8; 8];
        if crate::random_bytes(&mut suffix).is_err() {
            return WorkerMsg::UploadError("the worker cannot name the upload".into());
        }
        let incoming = self.uploads_dir().join("incoming");
        if let Err(e) = std::fs::create_dir_all(&incoming) {
            return WorkerMsg::UploadError(format!("Cannot create the upload directory: {e}"));
        }
        let part = incoming.join(format!("{}.part", suffix.iter().map(|b| format!("{b:02x}")).collect::<String>()));
        let file = match std::fs::File::create(&part) {
            Ok(f) => f,
            Err(e) => return WorkerMsg::UploadError(format!("Cannot open file for writing: {e}")),
        };
        *upload = Some(Upload {
            part,
            name,
            file,
            size,
            received: 0,
            sha: sha2::Sha256::new(),
            claimed,
            last_progress: Instant::now(),
            failed: None,
        });
        WorkerMsg::UploadReady
    }

    fn upload_chunk(&self, c: &PeerConnection<R>, upload: &mut Option<Upload>, bytes: &[u8]) {
        let Some(u) = upload.as_mut() else {
            tracing::debug!(bytes = bytes.len(), "binary data outside an upload dropped");
            return;
        };
        if u.failed.is_some() {
            return;
        }
        if u.received + bytes.len() as u64 > u.size {
            u.failed = Some(format!("Size mismatch: more than the announced {} bytes", u.size));
            return;
        }
        if let Err(e) = u.file.write_all(bytes) {
            u.failed = Some(format!("Write error: {e}"));
            return;
        }
        u.sha.update(bytes);
        u.received += bytes.len() as u64;
        if u.last_progress.elapsed() >= UPLOAD_PROGRESS_EVERY {
            u.last_progress = Instant::now();
            let _ = c.send_upstream_text(&WorkerMsg::UploadProgress { received: u.received, total: u.size }.encode());
        }
    }

    async fn upload_end(&self, upload: Option<Upload>) -> WorkerMsg {
        let Some(mut u) = upload else { return WorkerMsg::UploadError("no upload is under way".into()) };
        let fail = |u: &Upload, why: String| {
            let _ = std::fs::remove_file(&u.part);
            WorkerMsg::UploadError(why)
        };
        if let Some(why) = u.failed.take() {
            return fail(&u, why);
        }
        if u.received != u.size {
            return fail(&u, format!("Size mismatch: expected {}, got {}", u.size, u.received));
        }
        let got = hex(&u.sha.clone().finalize());
        if let Some(claimed) = &u.claimed {
            if *claimed != got {
                return fail(&u, format!("the file's SHA-256 is {got}, not the {claimed} announced"));
            }
        }
        let dir = self.uploads_dir().join(&got);
        let dest = dir.join(&u.name);
        // fsync of a multi-GB file takes seconds: not on the runtime's threads.
        let (file, part, to) = (u.file.try_clone(), u.part.clone(), dest.clone());
        let stored = R::spawn_blocking(move || -> std::io::Result<()> {
            file?.sync_all()?;
            std::fs::create_dir_all(to.parent().unwrap_or(Path::new(".")))?;
            std::fs::rename(part, to)
        })
        .await;
        match stored {
            Some(Ok(())) => {}
            Some(Err(e)) => return fail(&u, format!("cannot store the upload: {e}")),
            None => return fail(&u, "cannot store the upload: the blocking pool failed".into()),
        }
        tracing::info!(name = %u.name, bytes = u.size, sha256 = %got, "upstream upload stored");
        WorkerMsg::UploadComplete(dest.canonicalize().unwrap_or(dest).display().to_string())
    }
}

/// The base name of an uploaded file, if it is a safe single component (no `..`, no slashes, no
/// control or look-alike characters).
fn safe_name(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next()?.trim();
    sleap_rtc_core::transfer::validate_name(base).ok()?;
    (!base.is_empty() && base != "." && base != "..").then(|| base.to_owned())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Turns one upstream connection's job events into upstream messages.
struct Translator<R: Runtime> {
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

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<JobEvent>) {
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

#[cfg(test)]
mod tests {
    use super::safe_name;

    #[test]
    fn upload_names_are_reduced_to_a_safe_base_name() {
        assert_eq!(safe_name("labels.pkg.slp").as_deref(), Some("labels.pkg.slp"));
        assert_eq!(safe_name("my labels.pkg.slp").as_deref(), Some("my labels.pkg.slp"));
        // Upstream joined the name onto the destination as sent: `../` escaped it.
        assert_eq!(safe_name("../../etc/cron.d/x").as_deref(), Some("x"));
        assert_eq!(safe_name("C:\\Users\\me\\labels.slp").as_deref(), Some("labels.slp"));
        for bad in ["", "..", ".", "a/", "nul\0.slp", "\u{202e}gpj.slp"] {
            assert_eq!(safe_name(bad), None, "{bad:?}");
        }
    }
}
