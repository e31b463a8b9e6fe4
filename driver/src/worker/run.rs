//! Running an admitted job: the trainer or predictor, its events relayed, publishing, the end.

use super::*;

impl<R: Runtime> Worker<R> {
    /// Maps a spec path to an absolute worker path.
    pub(super) fn resolve(&self, job: &ActiveJob<R>, p: &str) -> PathBuf {
        if p.starts_with('/') { PathBuf::from(p) } else { job.dir.join("input").join(p) }
    }

    /// Forwards trainer events to the attached clients and the journal.
    /// The receiver completes when the relay has forwarded the last event.
    pub(super) fn relay(
        &self,
        job: &Arc<ActiveJob<R>>,
    ) -> (mpsc::UnboundedSender<TrainerEvent>, tokio::sync::oneshot::Receiver<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<TrainerEvent>();
        let job = job.clone();
        let published = self.cfg.publish_progress.then(|| self.progress.clone());
        let mut board = ProgressBoard::new(&job.id);
        let (done, task) = tokio::sync::oneshot::channel();
        R::spawn(async move {
            let _done = done;
            // Output lines are relayed at most LOG_BURST per second; a trainer that prints more
            // (a runaway loop) must not flood the client. The full output is in trainer.log.
            const LOG_BURST: u32 = 200;
            let mut window = std::time::Instant::now();
            let (mut sent, mut dropped) = (0u32, 0u64);
            while let Some(ev) = rx.recv().await {
                if window.elapsed() >= Duration::from_secs(1) {
                    if dropped > 0 {
                        job.emit(&JobMsg::JobLog {
                            job_id: job.id.clone(),
                            stream: Stream::Stderr,
                            text: format!(
                                "[{dropped} lines of output not relayed; the worker keeps them in trainer.log]"
                            ),
                            cr: false,
                        });
                    }
                    window = std::time::Instant::now();
                    (sent, dropped) = (0, 0);
                }
                if let TrainerEvent::Log(_) = &ev {
                    if sent >= LOG_BURST {
                        dropped += 1;
                        continue;
                    }
                    sent += 1;
                }
                match ev {
                    TrainerEvent::Spawned(pid) => {
                        if let Ok(mut e) = job.entry.lock() {
                            e.trainer_pid = Some(pid);
                        }
                        job.save();
                    }
                    TrainerEvent::Progress(p) => {
                        if let Some(tx) = &published {
                            if board.apply(&p) {
                                tx.send_replace(Some(board.to_value()));
                            }
                        }
                        if matches!(p, Progress::EpochEnd { .. }) {
                            if let Ok(mut e) = job.entry.lock() {
                                e.status.last_epoch = Some(p.clone());
                                e.updated_at = unix_now();
                            }
                            job.save();
                        }
                        job.emit(&JobMsg::JobProgress { job_id: job.id.clone(), progress: p });
                    }
                    TrainerEvent::Log(l) => {
                        job.emit(&JobMsg::JobLog { job_id: job.id.clone(), stream: l.stream, text: l.text, cr: l.cr })
                    }
                    TrainerEvent::Report(raw) => job.emit_report(&raw),
                }
            }
        });
        (tx, task)
    }

    pub(super) async fn run_training(&self, job: &Arc<ActiveJob<R>>, spec: &JobSpec) -> Outcome {
        let JobSpec::Train(t) = spec else { return Outcome::failed("not a training job") };
        // Configs: worker/uploaded files first, then inline ones (upstream's order).
        let mut configs = Vec::new();
        for p in &t.config_paths {
            match std::fs::read_to_string(self.resolve(job, p)) {
                Ok(text) => configs.push(text),
                Err(e) => return Outcome::failed(format!("cannot read config {p}: {e}")),
            }
        }
        configs.extend(t.config_contents.iter().cloned());
        let runs_dir = job.dir.join("runs");
        let mut results = Vec::new();
        let mut outcome = (JobState::Completed, "training completed".to_owned());
        let n = configs.len();
        for (i, text) in configs.iter().enumerate() {
            let info = match bridge::ConfigInfo::parse(text) {
                Ok(i) => i,
                Err(e) => return Outcome::new(JobState::Failed, format!("config {}: {e}", i + 1), results),
            };
            let model_type =
                t.model_types.get(i).cloned().or(info.model_type.clone()).unwrap_or_else(|| "model".into());
            let run_name = match (&t.run_name, n) {
                (Some(r), 1) => r.clone(),
                (Some(r), _) => format!("{r}.{model_type}"),
                (None, _) => info.run_name.clone().unwrap_or(model_type.clone()),
            };
            // The name becomes a directory under runs/: whatever the config says, it must be safe.
            let run_name =
                if sleap_rtc_core::job::check_run_name(&run_name).is_ok() { run_name } else { format!("model_{i}") };
            let config_path = job.dir.join(format!("config_{i}.yaml"));
            if let Err(e) = std::fs::write(&config_path, text) {
                return Outcome::new(JobState::Failed, format!("cannot write the config: {e}"), results);
            }
            if n > 1 {
                job.emit(&JobMsg::JobLog {
                    job_id: job.id.clone(),
                    stream: Stream::Stdout,
                    text: format!("Training model {}/{n}: {model_type}", i + 1),
                    cr: false,
                });
            }
            let run = TrainRun {
                config: config_path.display().to_string(),
                labels: t.labels_path.as_deref().map(|p| self.resolve(job, p).display().to_string()),
                val_labels: t.val_labels_path.as_deref().map(|p| self.resolve(job, p).display().to_string()),
                resume: t.resume_ckpt_path.as_deref().map(|p| self.resolve(job, p).display().to_string()),
                ckpt_dir: runs_dir.display().to_string(),
                run_name: run_name.clone(),
                publish_port: 0,
                controller_port: 0,
            };
            let launch = Launch {
                program: self.cfg.sleap_nn.clone(),
                cwd: job.dir.clone(),
                log_file: job.dir.join("trainer.log"),
            };
            let (tx, relay_task) = self.relay(job);
            let _ = tx.send(TrainerEvent::Progress(Progress::Started { model: Some(run_name.clone()) }));
            let mut interrupt = job.interrupt.subscribe();
            interrupt.mark_changed();
            let pid_job = job.clone();
            let exit = trainer::run_train::<R>(
                &launch,
                move |publish_port, controller_port| {
                    let run = TrainRun { publish_port, controller_port, ..run };
                    bridge::train_args(t, &run)
                },
                &self.cfg.supervision,
                interrupt,
                tx,
            )
            .await;
            let _ = relay_task.await;
            if let Ok(mut e) = pid_job.entry.lock() {
                e.trainer_pid = None;
            }
            let exit = match exit {
                Ok(e) => e,
                Err(e) => return Outcome::new(JobState::Failed, e.to_string(), results),
            };
            let (stop, cancel) =
                job.entry.lock().map(|e| (e.job.stop_requested, e.job.cancel_requested)).unwrap_or_default();
            let run_dir = runs_dir.join(&run_name);
            let te = TrainExit {
                code: exit.code,
                signal: exit.signal,
                train_end: exit.train_end,
                best_ckpt: run_dir.join("best.ckpt").is_file(),
                stop_requested: stop,
                cancel_requested: cancel,
            };
            let (state, mut message) = bridge::classify_train(&te);
            if state == JobState::Failed && !exit.stderr_tail.is_empty() {
                let tail: Vec<&String> =
                    exit.stderr_tail.iter().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
                message = format!(
                    "{message}; last output: {}",
                    tail.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" | ")
                );
            }
            if state.has_results() {
                results.push(format!("runs/{run_name}"));
                message = self.publish(job, &run_dir, message).await;
            }
            outcome = (state, message);
            if state != JobState::Completed {
                break;
            }
        }
        Outcome::new(outcome.0, outcome.1, results)
    }

    /// Publishes a finished run to the room's registry, if one is configured. A failure to
    /// publish does not fail the job (the model still goes back to the client); it is reported.
    pub(super) async fn publish(&self, job: &Arc<ActiveJob<R>>, run_dir: &Path, message: String) -> String {
        let Some(root) = &self.cfg.registry else { return message };
        let Some(room) = self.room.lock().ok().and_then(|r| r.clone()) else { return message };
        let last = job.entry.lock().ok().and_then(|e| e.status.last_epoch.clone());
        let (epochs, final_loss) = match last {
            Some(Progress::EpochEnd { epoch, loss, val_loss }) => (Some(epoch + 1), val_loss.or(loss)),
            _ => (None, None),
        };
        // Reads and hashes the dataset splits: the blocking pool.
        let dir = run_dir.to_path_buf();
        let dataset_hash = R::spawn_blocking(move || crate::registry::dataset_hash(&dir)).await.unwrap_or_default();
        let info = crate::registry::PublishInfo {
            trained_by: job.owner.clone(),
            trained_on_worker: self.peer_id.clone(),
            dataset_hash,
            epochs,
            final_loss,
            training_duration_sec: Some(job.started.elapsed().as_secs_f64()),
            ..Default::default()
        };
        let store = match crate::registry::AnyStore::<R>::open(root).await {
            Ok(s) => s,
            Err(err) => return format!("{message}; cannot open the registry {root}: {err}"),
        };
        match crate::registry::publish(&store, &room, run_dir, info).await {
            Ok(e) => {
                tracing::info!(job = %job.id, model = %e.id, "model published to the room registry");
                if let Ok(mut en) = job.entry.lock() {
                    en.status.published.push(e.id.clone());
                }
                format!("{message}; published to the room registry as model {}", e.id)
            }
            Err(err) => {
                tracing::warn!(job = %job.id, error = %err, "publishing the model failed");
                format!("{message}; publishing to the registry failed: {err}")
            }
        }
    }

    pub(super) async fn run_tracking(&self, job: &Arc<ActiveJob<R>>, spec: &JobSpec) -> Outcome {
        let JobSpec::Track(t) = spec else { return Outcome::failed("not a track job") };
        let data = self.resolve(job, &t.data_path).display().to_string();
        let mut models: Vec<String> = Vec::new();
        let mut cached: Vec<String> = Vec::new();
        for m in &t.model_paths {
            match m.strip_prefix(sleap_rtc_core::job::MODEL_REF) {
                Some(id) => match self.ensure_model(id).await {
                    Ok(dir) => {
                        cached.extend(dir.file_name().map(|n| n.to_string_lossy().into_owned()));
                        models.push(dir.display().to_string());
                    }
                    Err(e) => {
                        return Outcome::failed(format!("cannot fetch model {id} from the registry: {e}"));
                    }
                },
                None => models.push(self.resolve(job, m).display().to_string()),
            }
        }
        let out_name = t.output_path.clone().unwrap_or_else(|| bridge::predictions_name(&t.data_path));
        let out_dir = job.dir.join("output");
        if let Err(e) = std::fs::create_dir_all(&out_dir) {
            return Outcome::failed(format!("cannot create the output directory: {e}"));
        }
        let output = out_dir.join(&out_name);
        let argv = bridge::track_args(t, &data, &models, &output.display().to_string(), &self.cfg.device);
        let launch =
            Launch { program: self.cfg.sleap_nn.clone(), cwd: job.dir.clone(), log_file: job.dir.join("trainer.log") };
        let (tx, relay_task) = self.relay(job);
        let mut interrupt = job.interrupt.subscribe();
        interrupt.mark_changed();
        let exit = trainer::run_predict::<R>(&launch, &argv, &self.cfg.supervision, interrupt, tx).await;
        let _ = relay_task.await;
        if !cached.is_empty() {
            let (cache, cap) = (self.model_cache(), self.cfg.model_cache_bytes);
            R::spawn_blocking(move || trim_model_cache(&cache, &cached, cap)).await;
        }
        let exit = match exit {
            Ok(e) => e,
            Err(e) => return Outcome::failed(e.to_string()),
        };
        let te = TrackExit {
            code: exit.code,
            signal: exit.signal,
            error: exit.error,
            stderr_tail: exit.stderr_tail,
            output_exists: output.is_file(),
            cancel_requested: job.entry.lock().map(|e| e.job.cancel_requested).unwrap_or(false),
        };
        let (state, message) = bridge::classify_track(&te);
        let results = if state == JobState::Completed { vec![format!("output/{out_name}")] } else { vec![] };
        Outcome::new(state, message, results)
    }

    pub(super) async fn finish(&self, job: &Arc<ActiveJob<R>>, outcome: Outcome) {
        let Outcome { state, message, results } = outcome;
        let duration = job.started.elapsed().as_secs_f64();
        if let Ok(mut e) = job.entry.lock() {
            if e.job.transition(state).is_err() {
                e.job.state = state;
            }
            e.status.state = state;
            e.status.message = Some(message.clone());
            e.status.results = results.clone();
            e.status.duration_secs = Some(duration);
            e.updated_at = unix_now();
        }
        job.save();
        tracing::info!(job = %job.id, %state, %message, "job finished");
        let status = job.status();
        // Free the GPU before saying so: a client that resubmits on job_done must not see busy.
        self.progress.send_replace(None);
        self.release(&job.id);
        let conns: Vec<Attached<R>> = job.attached.lock().map(|a| a.clone()).unwrap_or_default();
        job.emit(&JobMsg::JobDone { status: status.clone() });
        let (jobs, keep, cap) = (self.jobs_dir.clone(), self.cfg.keep_finished, self.cfg.jobs_cap_bytes);
        R::spawn(async move {
            R::spawn_blocking(move || housekeeping::sweep(&jobs, keep, cap, unix_now())).await;
        });
        if let Some(url) = self.cfg.notify_url.clone() {
            let summary = notify::summary(&self.peer_id, &job.owner, &status);
            R::spawn(async move { notify::post::<R>(&url, summary).await });
        }
        if !results.is_empty() {
            // Upstream clients get their results from their adapter, in their own framing.
            for c in conns.into_iter().filter_map(|c| match c {
                Attached::Native(c) => Some(c),
                Attached::Upstream(_) => None,
            }) {
                if c.state() != conn::ConnState::Closed {
                    let (dir, results) = (job.dir.clone(), results.clone());
                    R::spawn(async move { send_results(c, &dir, &results).await });
                }
            }
        }
    }
}
