//! The job journal on disk (`WORK_DIR/jobs/<id>/job.json`), and recovery after a restart.

use super::*;

/// One job as recorded on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    pub job: Job,
    /// The user id that submitted it (from the ticket), or `room-secret`.
    pub owner: String,
    pub spec: JobSpec,
    pub status: JobStatus,
    pub created_at: f64,
    pub updated_at: f64,
    /// Process group of the running trainer, so a restarted worker can end an orphan.
    #[serde(default)]
    pub trainer_pid: Option<u32>,
}

pub(super) fn journal_path(jobs: &Path, id: &str) -> PathBuf {
    jobs.join(id).join("job.json")
}

pub(super) fn read_journal(jobs: &Path, id: &str) -> Option<JournalEntry> {
    if !valid_job_id(id) {
        return None;
    }
    serde_json::from_slice(&std::fs::read(journal_path(jobs, id)).ok()?).ok()
}

pub(super) fn valid_job_id(id: &str) -> bool {
    id.len() == 20 && id.starts_with("job_") && id[4..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Marks jobs a previous run of the worker left unfinished as failed, and ends their trainers;
/// returns the queued ones (uploaded, not started), oldest first, to be run again.
pub(super) fn recover_journal(jobs: &Path) -> Vec<JournalEntry> {
    let mut queued = Vec::new();
    let Ok(rd) = std::fs::read_dir(jobs) else { return queued };
    for e in rd.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        let Some(mut j) = read_journal(jobs, &id) else { continue };
        if j.job.state.is_terminal() {
            continue;
        }
        if j.job.state == JobState::Queued && j.job.id == id {
            queued.push(j);
            continue;
        }
        if let Some(pid) = j.trainer_pid {
            // Only if that process still runs *this* job (its argv names the job directory).
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&id) {
                // SAFETY: kill(2) on the orphaned trainer's process group.
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
        }
        j.job.state = JobState::Failed;
        j.status.state = JobState::Failed;
        j.status.message = Some("the worker restarted while this job was running; submit it again".into());
        j.updated_at = unix_now();
        if let Ok(b) = serde_json::to_vec_pretty(&j) {
            let _ = crate::files::write_atomic(&journal_path(jobs, &id), &b);
        }
        tracing::warn!(job = %id, "job was interrupted by a worker restart; marked failed");
    }
    queued.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
    queued
}
