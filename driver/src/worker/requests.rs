//! A client connection of ours: its messages, and the checks and admission of a job it submits.

use super::*;

impl<R: Runtime> Worker<R> {
    pub(super) async fn serve_peer(self: Arc<Self>, ctx: PeerCtx, c: Arc<PeerConnection<R>>) {
        let peer = c.remote_peer().to_owned();
        let user = match self.authenticate(&ctx, &c).await {
            Ok(u) => u,
            Err(e) => {
                let reason = match (&e, self.cfg.room_secret.is_some()) {
                    (AuthError::BadMac, true) => {
                        "this worker requires the room secret (--room-secret); the proof did not match".to_owned()
                    }
                    _ => e.to_string(),
                };
                tracing::warn!(%peer, %reason, "refused an unauthenticated client");
                let _ = c.send_message(&JobMsg::AuthFailed { reason }.to_value());
                // Let the refusal reach the client before the connection goes.
                sleep::<R>(Duration::from_millis(300)).await;
                if let Ok(c) = Arc::try_unwrap(c) {
                    c.close().await;
                }
                return;
            }
        };
        tracing::info!(%peer, %user, "client authenticated");
        let _ = c.send_message(&JobMsg::AuthOk { worker: ctx.me.clone() }.to_value());
        while let Some(text) = c.recv_message().await {
            let msg = match JobMsg::decode(&text) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    let _ = c.send_message(
                        &JobMsg::JobError { job_id: None, code: ErrorCode::InvalidValue, message: e }.to_value(),
                    );
                    continue;
                }
            };
            match msg {
                JobMsg::JobSubmit { client_job_id, spec, files } => {
                    let (me, c, user) = (self.clone(), Attached::Native(c.clone()), user.clone());
                    R::spawn(async move { me.submit(c, user, client_job_id, spec, files).await });
                }
                JobMsg::JobStop { job_id } => self.interrupt(&c, &user, &job_id, Interrupt::Stop),
                JobMsg::JobCancel { job_id } => self.interrupt(&c, &user, &job_id, Interrupt::Cancel),
                JobMsg::JobAttach { job_id, fetch } => self.attach(&c, &user, &job_id, fetch).await,
                JobMsg::JobLogs { job_id, tail, follow } => self.logs(&c, &user, &job_id, tail, follow).await,
                JobMsg::JobList {} => {
                    let jobs = self.list_for(&user).await;
                    let _ = c.send_message(&JobMsg::JobListing { jobs }.to_value());
                }
                other => {
                    let _ = c.send_message(
                        &JobMsg::JobError {
                            job_id: None,
                            code: ErrorCode::InvalidValue,
                            message: format!("unexpected message from a client: {}", other.to_value()["type"]),
                        }
                        .to_value(),
                    );
                }
            }
        }
        tracing::info!(%peer, "client disconnected");
    }

    // -- job requests --------------------------------------------------------------------------

    pub(super) fn reply_error(c: &PeerConnection<R>, job_id: &str, code: ErrorCode, message: String) {
        let _ = c.send_message(&JobMsg::JobError { job_id: Some(job_id.to_owned()), code, message }.to_value());
    }

    pub(super) fn interrupt(&self, c: &PeerConnection<R>, user: &str, job_id: &str, what: Interrupt) {
        if let Err((code, message)) = self.request_interrupt(user, job_id, what) {
            Self::reply_error(c, job_id, code, message);
        }
    }

    /// Stops or cancels the running job `job_id` on behalf of `user`, who must own it.
    pub(super) fn request_interrupt(
        &self,
        user: &str,
        job_id: &str,
        what: Interrupt,
    ) -> Result<(), (ErrorCode, String)> {
        let Some(job) = self.find_job(job_id) else {
            return Err((ErrorCode::PathNotFound, format!("job {job_id:.40} is not running or queued here")));
        };
        if job.owner != user {
            return Err((ErrorCode::NotAllowed, "this job belongs to another user".into()));
        }
        let action = job.entry.lock().map(|mut e| e.job.interrupt(what));
        match action {
            Ok(Ok(Some(a))) => {
                tracing::info!(job = %job_id, action = ?a, "interrupt requested");
                let _ = job.interrupt.send(Some(a));
                Ok(())
            }
            Ok(Ok(None)) => Ok(()),
            Ok(Err(e)) => Err((ErrorCode::InvalidValue, e.to_string())),
            Err(_) => Err((ErrorCode::Internal, "the job's record is unavailable".into())),
        }
    }

    /// `job list`: `user`'s jobs here, newest first (at most [`MAX_LISTED`]): the live state
    /// of admitted ones, the journal of the rest.
    pub(super) async fn list_for(&self, user: &str) -> Vec<JobSummary> {
        let (jobs, who) = (self.jobs_dir.clone(), user.to_owned());
        let mut all = R::spawn_blocking(move || {
            let Ok(rd) = std::fs::read_dir(&jobs) else { return vec![] };
            rd.flatten()
                .filter_map(|e| read_journal(&jobs, &e.file_name().to_string_lossy()))
                .filter(|e| e.owner == who)
                .map(|e| JobSummary {
                    status: e.status,
                    created_at: e.created_at,
                    updated_at: e.updated_at,
                    ahead: None,
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for j in self.admitted().into_iter().filter(|j| j.owner == user) {
            let live = j.entry.lock().map(|e| (e.status.clone(), e.created_at, e.updated_at));
            let Ok((status, created_at, updated_at)) = live else { continue };
            let ahead = (status.state == JobState::Queued).then(|| self.ahead_of(&j.id)).flatten();
            let row = JobSummary { status, created_at, updated_at, ahead };
            match all.iter_mut().find(|r| r.status.job_id == j.id) {
                Some(r) => *r = row,
                None => all.push(row),
            }
        }
        all.sort_by(|a, b| b.created_at.total_cmp(&a.created_at));
        all.truncate(MAX_LISTED);
        all
    }

    /// `job logs`: the tail of the job's `trainer.log` (owner only), then its status; with
    /// `follow`, attached like `job attach` (without fetching results).
    pub(super) async fn logs(&self, c: &Arc<PeerConnection<R>>, user: &str, job_id: &str, tail: u32, follow: bool) {
        let owner = match self.find_job(job_id) {
            Some(j) => Some(j.owner.clone()),
            None => read_journal(&self.jobs_dir, job_id).map(|e| e.owner),
        };
        match owner {
            None => {
                return Self::reply_error(
                    c,
                    job_id,
                    ErrorCode::PathNotFound,
                    format!("no job {job_id:.40} on this worker"),
                );
            }
            Some(o) if o != user => {
                return Self::reply_error(c, job_id, ErrorCode::NotAllowed, "this job belongs to another user".into());
            }
            Some(_) => {}
        }
        let path = self.jobs_dir.join(job_id).join("trainer.log");
        let n = tail.min(MAX_LOG_TAIL) as usize;
        let lines = R::spawn_blocking(move || tail_lines(&path, n)).await.unwrap_or_default();
        for text in lines {
            let msg = JobMsg::JobLog { job_id: job_id.to_owned(), stream: Stream::Stdout, text, cr: false };
            if c.send_message(&msg.to_value()).is_err() {
                return;
            }
        }
        if follow {
            return self.attach(c, user, job_id, false).await;
        }
        let status = match self.find_job(job_id) {
            Some(j) => j.status(),
            None => match read_journal(&self.jobs_dir, job_id) {
                Some(e) => e.status,
                None => return,
            },
        };
        let _ = c.send_message(&JobMsg::JobStatus { status }.to_value());
    }

    pub(super) async fn attach(&self, c: &Arc<PeerConnection<R>>, user: &str, job_id: &str, fetch: bool) {
        let active = self.find_job(job_id);
        let (owner, status, dir) = match &active {
            Some(j) => (j.owner.clone(), j.status(), j.dir.clone()),
            None => match read_journal(&self.jobs_dir, job_id) {
                Some(e) => (e.owner, e.status, self.jobs_dir.join(job_id)),
                None => {
                    return Self::reply_error(
                        c,
                        job_id,
                        ErrorCode::PathNotFound,
                        format!("no job {job_id:.40} on this worker"),
                    );
                }
            },
        };
        if owner != user {
            return Self::reply_error(c, job_id, ErrorCode::NotAllowed, "this job belongs to another user".into());
        }
        // Re-read the state while holding the attach list: `finish` makes the state terminal
        // before it takes that list, so the connection gets job_done either from `finish` (it was
        // attached in time) or from here (the job had already finished).
        let status = match &active {
            Some(j) => match j.attached.lock() {
                Ok(mut a) => {
                    let st = j.status();
                    let me = Attached::Native(c.clone());
                    if !st.state.is_terminal() && !a.iter().any(|x| x.same(&me)) {
                        a.push(me);
                    }
                    st
                }
                Err(_) => status,
            },
            None => status,
        };
        let _ = c.send_message(&JobMsg::JobStatus { status: status.clone() }.to_value());
        if !status.state.is_terminal() {
            return;
        }
        let status = if fetch { status } else { JobStatus { results: vec![], ..status } };
        let _ = c.send_message(&JobMsg::JobDone { status: status.clone() }.to_value());
        if fetch && !status.results.is_empty() {
            send_results(c.clone(), &dir, &status.results).await;
        }
    }

    /// Whether `real` (canonical) is the output of one of `user`'s own jobs on this worker (a
    /// trained model under `jobs/<id>/runs/`, predictions under `jobs/<id>/output/`): the GUI
    /// predicts with the model path a training returned.
    pub(super) fn own_job_output(&self, user: &str, real: &Path) -> bool {
        let Ok(jobs) = self.jobs_dir.canonicalize() else { return false };
        let Ok(rest) = real.strip_prefix(&jobs) else { return false };
        let mut parts = rest.components().map(|c| c.as_os_str().to_string_lossy().into_owned());
        let (Some(id), Some(area)) = (parts.next(), parts.next()) else { return false };
        (area == "runs" || area == "output") && read_journal(&self.jobs_dir, &id).is_some_and(|e| e.owner == user)
    }

    /// A worker path, resolved (symlinks followed): `Ok` inside a mount, the upload area, or
    /// where `also` allows; otherwise `NotAllowed`, or `NotFound` only for a missing path inside
    /// a mount, so a client cannot probe the rest of the worker's filesystem.
    pub(super) fn locate(&self, p: &str, also: impl Fn(&Path) -> bool) -> Result<PathBuf, PathVerdict> {
        let path = Path::new(p);
        match path.canonicalize() {
            Ok(real)
                if self.cfg.mounts.iter().any(|m| real.starts_with(m)) || self.in_uploads(&real) || also(&real) =>
            {
                Ok(real)
            }
            Ok(_) => Err(PathVerdict::NotAllowed),
            Err(_) if !self.cfg.mounts.iter().any(|m| path.starts_with(m)) => Err(PathVerdict::NotAllowed),
            Err(_) => Err(PathVerdict::NotFound),
        }
    }

    pub(super) fn check_worker_path(&self, user: &str, p: &str) -> PathVerdict {
        match self.locate(p, |real| self.own_job_output(user, real)) {
            Ok(_) => PathVerdict::Ok,
            Err(v) => v,
        }
    }

    pub(super) fn check_spec(&self, user: &str, spec: &JobSpec, files: &[FileEntry]) -> Vec<FieldError> {
        let uploaded = |name: &str| {
            files.iter().any(|f| {
                f.name == name || (f.name.starts_with(name) && f.name.as_bytes().get(name.len()) == Some(&b'/'))
            })
        };
        let mut errors = check_paths(spec, |r| match r {
            PathRef::Upload(n) if uploaded(n) => PathVerdict::Ok,
            PathRef::Upload(_) => PathVerdict::NotAllowed,
            PathRef::Worker(p) => self.check_worker_path(user, p),
            PathRef::Model(_) if self.cfg.registry.is_some() => PathVerdict::Ok,
            PathRef::Model(_) => PathVerdict::NotAllowed,
        });
        if let JobSpec::Train(t) = spec {
            for (field, p) in [("labels_path", &t.labels_path), ("val_labels_path", &t.val_labels_path)] {
                if let Some(p) = p {
                    if !p.starts_with('/') && !p.ends_with(".pkg.slp") {
                        errors.push(FieldError::new(
                            field,
                            ErrorCode::Unsupported,
                            format!(
                                "{p} is a .slp that refers to video files, which are not uploaded; export a self-contained \
                                 training package (.pkg.slp) or name a path on the worker inside its mounts"
                            ),
                        ));
                    }
                }
            }
            if t.labels_path.is_none() {
                for (i, text) in t.config_contents.iter().enumerate() {
                    let info = bridge::ConfigInfo::parse(text).unwrap_or_default();
                    for (j, l) in info.train_labels.iter().enumerate() {
                        let bad = if l.starts_with('/') {
                            self.check_worker_path(user, l) != PathVerdict::Ok
                        } else {
                            !uploaded(l)
                        };
                        if bad {
                            errors.push(FieldError::new(
                                format!("config[{i}].train_labels_path[{j}]"),
                                ErrorCode::PathNotFound,
                                format!("the config trains on {l}, which is neither uploaded nor on the worker; pass labels_path"),
                            ));
                        }
                    }
                }
            }
        }
        errors
    }

    pub(super) async fn submit(
        self: Arc<Self>,
        c: Attached<R>,
        user: String,
        client_job_id: String,
        spec: Value,
        files: Vec<FileEntry>,
    ) {
        let reject = |errors: Vec<FieldError>| {
            c.send(&JobMsg::JobRejected { client_job_id: client_job_id.clone(), errors });
        };
        let spec = match parse_spec(&spec) {
            Ok(s) => s.mapped(),
            Err(errors) => return reject(errors),
        };
        // path_mappings may have produced paths the unmapped spec did not have: check again.
        let errors = sleap_rtc_core::job::validate(&spec);
        if !errors.is_empty() {
            return reject(errors);
        }
        if files.len() > 10_000 {
            return reject(vec![FieldError::new("files", ErrorCode::InvalidValue, "too many files")]);
        }
        let mut errors = self.check_spec(&user, &spec, &files);
        if errors.is_empty() {
            errors = self.check_models(&spec).await;
        }
        if !errors.is_empty() {
            return reject(errors);
        }
        let job_id = match random_hex(8) {
            Ok(h) => format!("job_{h}"),
            Err(e) => {
                return reject(vec![FieldError::new(
                    "worker",
                    ErrorCode::Internal,
                    format!("cannot make a job id: {e}"),
                )]);
            }
        };
        let dir = self.jobs_dir.join(&job_id);
        let job = {
            let mut j = Job::new(&job_id, spec.kind());
            let _ = j.transition(JobState::Accepted);
            let now = unix_now();
            let entry = JournalEntry {
                job: j,
                owner: user.clone(),
                spec: spec.clone(),
                status: JobStatus {
                    job_id: job_id.clone(),
                    kind: spec.kind(),
                    state: JobState::Accepted,
                    last_epoch: None,
                    message: None,
                    results: vec![],
                    duration_secs: None,
                    published: vec![],
                },
                created_at: now,
                updated_at: now,
                trainer_pid: None,
            };
            Arc::new(ActiveJob {
                id: job_id.clone(),
                owner: user,
                dir: dir.clone(),
                started: std::time::Instant::now(),
                entry: Mutex::new(entry),
                attached: Mutex::new(vec![c.clone()]),
                interrupt: watch::channel(None).0,
            })
        };
        if let Err(busy) = self.admit(job.clone()) {
            return reject(vec![FieldError::new("worker", ErrorCode::Busy, busy)]);
        }
        if let Err(e) = std::fs::create_dir_all(dir.join("input")) {
            self.release(&job_id);
            return reject(vec![FieldError::new(
                "worker",
                ErrorCode::Internal,
                format!("cannot create the job directory: {e}"),
            )]);
        }
        job.save();
        tracing::info!(job = %job_id, kind = %spec.kind(), files = files.len(), "job accepted");
        // Ready to receive before the client hears "accepted" and starts sending: an offer that
        // arrived first would find nobody waiting, and its refusal (an unsafe name, say) would go
        // unheard while the job waited for an upload.
        let upload = self.expect_upload(&job, &c, &files).await;
        c.send(&JobMsg::JobAccepted { client_job_id, job_id: job_id.clone() });

        let outcome = match self.receive_upload(&job, &files, upload).await {
            Err(e) => {
                if e.parts_kept {
                    // A cut: keep what arrived, so the same user's next submission resumes it.
                    let (cache, input, owner, wanted) =
                        (self.cache_dir.clone(), job.dir.join("input"), job.owner.clone(), files.clone());
                    R::spawn_blocking(move || keep_partial_uploads(&cache, &input, &owner, &wanted)).await;
                }
                let cancelled = job.entry.lock().map(|e| e.job.cancel_requested).unwrap_or(false);
                if cancelled {
                    Outcome::new(JobState::Cancelled, "cancelled by the user during the upload", vec![])
                } else {
                    Outcome::failed(format!("upload failed: {}", e.message))
                }
            }
            Ok(()) if job.entry.lock().map(|e| e.job.cancel_requested).unwrap_or(false) => {
                Outcome::new(JobState::Cancelled, "cancelled by the user before it started", vec![])
            }
            Ok(()) => return self.run_admitted(job, spec).await,
        };
        self.finish(&job, outcome).await;
    }

    /// An uploaded job: waits for the GPU (the queue), runs, finishes. Also how a restarted
    /// worker takes up the jobs that were queued.
    pub(super) async fn run_admitted(self: Arc<Self>, job: Arc<ActiveJob<R>>, spec: JobSpec) {
        let outcome = if !self.wait_for_gpu(&job).await {
            Outcome::new(JobState::Cancelled, "stopped or cancelled before it started; nothing ran", vec![])
        } else {
            tracing::info!(job = %job.id, "job started");
            job.set_state(JobState::Running, None);
            match &spec {
                JobSpec::Train(_) => self.run_training(&job, &spec).await,
                JobSpec::Track(_) => self.run_tracking(&job, &spec).await,
            }
        };
        self.finish(&job, outcome).await;
    }

    /// Places what the cache already has as complete `.part`s and starts waiting for the upload.
    pub(super) async fn expect_upload(
        &self,
        job: &ActiveJob<R>,
        c: &Attached<R>,
        files: &[FileEntry],
    ) -> Result<Option<Transfer<Received>>, String> {
        if files.is_empty() {
            return Ok(None);
        }
        let Attached::Native(c) = c else {
            return Err("files can only be announced on this project's own protocol".into());
        };
        let input = job.dir.join("input");
        // Files the worker already has (same content hash) are placed as complete `.part`s:
        // the transfer then verifies them and sends nothing. Copies of datasets: the blocking pool.
        let (cache_dir, dir, wanted, owner) =
            (self.cache_dir.clone(), input.clone(), files.to_vec(), job.owner.clone());
        R::spawn_blocking(move || place_cached(&cache_dir, &dir, &owner, &wanted)).await;
        c.receive_files(&input).map(Some).map_err(|e| e.to_string())
    }

    pub(super) async fn receive_upload(
        &self,
        job: &ActiveJob<R>,
        files: &[FileEntry],
        upload: Result<Option<Transfer<Received>>, String>,
    ) -> Result<(), UploadFailure> {
        let fail = |message: String| UploadFailure { message, parts_kept: false };
        let Some(t) = upload.map_err(fail)? else { return Ok(()) };
        let input = job.dir.join("input");
        let got = match timeout::<R, _>(Duration::from_secs(24 * 3600), t.finish()).await {
            Err(_) => return Err(fail("the upload did not finish within a day".into())),
            Ok(Err(e @ conn::ConnError::Transfer(conn::TransferFailure::ClosedPartsKept))) => {
                return Err(UploadFailure { message: e.to_string(), parts_kept: true });
            }
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Ok(Ok(got)) => got,
        };
        if !got.failed.is_empty() {
            let list: Vec<String> = got.failed.iter().map(|(n, why)| format!("{n}: {why}")).collect();
            return Err(fail(list.join("; ")));
        }
        // Only content whose hash we computed ourselves enters the cache under that hash: the
        // client's claimed hashes could otherwise poison another user's dataset slot.
        for f in files {
            let cached = self.cache_dir.join(&f.blake3);
            if cached.exists() || !cacheable(f) {
                continue;
            }
            let src = input.join(&f.name);
            let p = src.clone();
            let actual = R::spawn_blocking(move || crate::files::hash_file(&p)).await.and_then(Result::ok);
            if actual.as_deref() == Some(f.blake3.as_str()) {
                let _ = std::fs::hard_link(&src, &cached);
            }
        }
        let (dir, cap) = (self.cache_dir.clone(), self.cfg.upload_cache_bytes);
        R::spawn_blocking(move || trim_upload_cache(&dir, cap)).await;
        Ok(())
    }
}

/// Why an upload did not complete. `parts_kept`: the connection was cut and the `.part` files
/// hold what arrived (a verification failure or a refusal keeps nothing worth resuming).
pub(super) struct UploadFailure {
    pub message: String,
    pub parts_kept: bool,
}

/// Jobs one `job_listing` carries at most (a control message must stay small).
const MAX_LISTED: usize = 100;

/// Lines `job logs` replays at most.
const MAX_LOG_TAIL: u32 = 10_000;

/// The last `n` lines of a log, read from at most its last MiB, each cut to 4 KiB (a control
/// message must stay small); a missing log (the job never ran) is no lines.
pub(super) fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return vec![] };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(1 << 20);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return vec![];
    }
    let mut buf = Vec::new();
    if f.take(1 << 20).read_to_end(&mut buf).is_err() {
        return vec![];
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if from > 0 && !lines.is_empty() {
        // The first line was cut by the 1 MiB window.
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    lines[skip..]
        .iter()
        .map(|l| {
            let l = l.trim_end_matches('\r');
            let mut end = l.len().min(4096);
            while !l.is_char_boundary(end) {
                end -= 1;
            }
            l[..end].to_owned()
        })
        .collect()
}

#[cfg(test)]
mod log_tests {
    use super::tail_lines;

    #[test]
    fn tails_are_the_last_lines_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("trainer.log");
        let text: String = (0..500).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        assert_eq!(tail_lines(&p, 3), vec!["line 497", "line 498", "line 499"]);
        assert_eq!(tail_lines(&p, 10_000).len(), 500);
        assert!(tail_lines(&d.path().join("missing"), 5).is_empty());
        std::fs::write(&p, format!("{}\nshort\n", "é".repeat(5000))).unwrap();
        let t = tail_lines(&p, 2);
        assert!(t[0].len() <= 4096 && t[0].starts_with('é'));
        assert_eq!(t[1], "short");
    }
}
