//! The worker's queue: jobs admitted while the GPU is busy upload at once, then wait their turn.
//!
//! One lock holds every admitted, unfinished job (the capacity check), the ones whose upload is
//! done and that wait for the GPU, in the order they became ready (first come, first served),
//! and the job holding the GPU. Admission and the hand-over of the GPU happen under that lock,
//! so two jobs can never both be told they have it. Waiters are woken through a counter
//! (`slot_changed`) whenever the queue moves, and re-announce their position.

use std::collections::VecDeque;

use super::*;

pub(super) struct Queue<R: Runtime> {
    /// Admitted and unfinished, oldest first (uploading, waiting or running).
    jobs: Vec<Arc<ActiveJob<R>>>,
    /// Uploaded and waiting for the GPU, first come first served.
    waiting: VecDeque<String>,
    /// The job holding the GPU.
    running: Option<String>,
}

impl<R: Runtime> Default for Queue<R> {
    fn default() -> Self {
        Queue { jobs: Vec::new(), waiting: VecDeque::new(), running: None }
    }
}

impl<R: Runtime> Queue<R> {
    /// Jobs ahead of `id` for the GPU: the running one and those that were ready first.
    fn ahead_of(&self, id: &str) -> usize {
        let before = self.waiting.iter().take_while(|w| w.as_str() != id).count();
        before + usize::from(self.running.is_some())
    }
}

impl<R: Runtime> Worker<R> {
    /// An admitted job by id.
    pub(super) fn find_job(&self, id: &str) -> Option<Arc<ActiveJob<R>>> {
        self.queue.lock().ok()?.jobs.iter().find(|j| j.id == id).cloned()
    }

    /// The admitted jobs, oldest first.
    pub(super) fn admitted(&self) -> Vec<Arc<ActiveJob<R>>> {
        self.queue.lock().map(|q| q.jobs.clone()).unwrap_or_default()
    }

    /// Takes `job` in if the GPU and the queue (`--queue`) have room: `Err` says why not.
    pub(super) fn admit(&self, job: Arc<ActiveJob<R>>) -> Result<(), String> {
        let Ok(mut q) = self.queue.lock() else { return Err("the worker's queue is unavailable".into()) };
        let capacity = 1 + self.cfg.queue;
        if q.jobs.len() >= capacity {
            let first = q.running.clone().or_else(|| q.jobs.first().map(|j| j.id.clone())).unwrap_or_default();
            return Err(if self.cfg.queue == 0 {
                format!("worker {} is busy with job {first}; try another worker or wait", self.peer_id)
            } else {
                format!(
                    "worker {} is busy and its queue is full ({} jobs waiting); try another worker or wait",
                    self.peer_id,
                    q.jobs.len() - 1
                )
            });
        }
        q.jobs.push(job);
        drop(q);
        self.queue_moved();
        Ok(())
    }

    /// Waits until `job` (uploaded) holds the GPU, telling its clients where it stands in the
    /// queue whenever that changes. `false`: it was stopped or cancelled while waiting.
    pub(super) async fn wait_for_gpu(&self, job: &Arc<ActiveJob<R>>) -> bool {
        let mut changed = self.slot_changed.subscribe();
        let mut interrupt = job.interrupt.subscribe();
        let mut said: Option<usize> = None;
        loop {
            let ahead = {
                let Ok(mut q) = self.queue.lock() else { return false };
                if !q.waiting.contains(&job.id) {
                    q.waiting.push_back(job.id.clone());
                }
                if interrupt.borrow().is_some() {
                    q.waiting.retain(|w| *w != job.id);
                    drop(q);
                    self.queue_moved();
                    return false;
                }
                let draining = self.draining.load(std::sync::atomic::Ordering::SeqCst);
                if q.running.is_none() && q.waiting.front() == Some(&job.id) && !draining {
                    q.waiting.pop_front();
                    q.running = Some(job.id.clone());
                    drop(q);
                    self.queue_moved();
                    return true;
                }
                q.ahead_of(&job.id)
            };
            if said != Some(ahead) {
                let msg = format!("{ahead} job(s) ahead of it on this worker");
                tracing::info!(job = %job.id, ahead, "job queued");
                if said.is_none() {
                    job.set_state(JobState::Queued, Some(msg));
                } else {
                    if let Ok(mut e) = job.entry.lock() {
                        e.status.message = Some(msg.clone());
                    }
                    job.emit(&JobMsg::JobState { job_id: job.id.clone(), state: JobState::Queued, message: Some(msg) });
                }
                said = Some(ahead);
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = interrupt.changed() => {}
            }
        }
    }

    /// A job queued before a restart: back in the queue, waiting in its old place.
    pub(super) fn requeue(&self, job: Arc<ActiveJob<R>>) {
        if let Ok(mut q) = self.queue.lock() {
            q.waiting.push_back(job.id.clone());
            q.jobs.push(job);
        }
        self.queue_moved();
    }

    /// `job` ended (or never got going): it leaves the queue and frees the GPU if it held it.
    pub(super) fn release(&self, id: &str) {
        if let Ok(mut q) = self.queue.lock() {
            q.jobs.retain(|j| j.id != id);
            q.waiting.retain(|w| w != id);
            if q.running.as_deref() == Some(id) {
                q.running = None;
            }
        }
        self.queue_moved();
    }

    /// Wakes the waiters and republishes the worker's status and queue length.
    fn queue_moved(&self) {
        self.slot_changed.send_modify(|n| *n = n.wrapping_add(1));
        let (busy, first) = match self.queue.lock() {
            Ok(q) => (!q.jobs.is_empty(), q.running.clone().or_else(|| q.jobs.first().map(|j| j.id.clone()))),
            Err(_) => return,
        };
        let status = if busy { Status::Busy } else { Status::Available };
        // Always sent: the queue length in the room's metadata changes with it.
        self.status.send_replace((status, first));
    }

    /// Jobs ahead of a queued job for the GPU.
    pub(super) fn ahead_of(&self, id: &str) -> Option<u32> {
        let q = self.queue.lock().ok()?;
        q.waiting.contains(&id.to_owned()).then(|| q.ahead_of(id) as u32)
    }

    /// Jobs admitted and not finished (for the room's view of this worker).
    pub(super) fn queue_length(&self) -> usize {
        self.queue.lock().map(|q| q.jobs.len()).unwrap_or(0)
    }
}
