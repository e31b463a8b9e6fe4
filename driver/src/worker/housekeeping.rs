//! Removing finished job directories (`--keep-days`, `--jobs-disk-gb`): the worker measures
//! `WORK_DIR/jobs/*`, `core::job::housekeeping::plan` decides, and what it removed is logged.
//! Runs at start and after every job, on the blocking pool.

use sleap_rtc_core::job::housekeeping::{FinishedJob, Policy, Removal, plan};

use super::*;

/// A finished job is never removed within this long of its end, whatever the cap says: a client
/// that was cut off comes back for its results with `job attach`.
pub const ATTACH_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// What one sweep removed: (job id, why, bytes).
pub(super) fn sweep(jobs: &Path, keep: Duration, cap_bytes: Option<u64>, now: f64) -> Vec<(String, Removal, u64)> {
    let Ok(rd) = std::fs::read_dir(jobs) else { return vec![] };
    let mut finished = Vec::new();
    let mut unfinished = 0u64;
    for e in rd.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        if !valid_job_id(&id) {
            continue;
        }
        let bytes = dir_bytes(&e.path());
        match read_journal(jobs, &id) {
            Some(j) if j.status.state.is_terminal() => {
                finished.push(FinishedJob { id, finished_at: j.updated_at, bytes })
            }
            // Running, queued, or a record being written: counted, never removed.
            _ => unfinished = unfinished.saturating_add(bytes),
        }
    }
    let policy = Policy { keep_secs: keep.as_secs_f64(), cap_bytes, attach_window_secs: ATTACH_WINDOW.as_secs_f64() };
    let mut removed = Vec::new();
    for (id, why) in plan(&finished, unfinished, now, &policy) {
        let bytes = finished.iter().find(|j| j.id == id).map_or(0, |j| j.bytes);
        match std::fs::remove_dir_all(jobs.join(&id)) {
            Ok(()) => {
                let reason = match why {
                    Removal::Age => "older than --keep-days",
                    Removal::DiskCap => "job directories over --jobs-disk-gb",
                };
                tracing::info!(job = %id, mb = bytes / 1_000_000, reason, "removed a finished job's directory");
                removed.push((id, why, bytes));
            }
            Err(e) => tracing::warn!(job = %id, error = %e, "could not remove a finished job's directory"),
        }
    }
    removed
}

/// Bytes under `dir` (files only; symlinks are not followed).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                total = total.saturating_add(md.len());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use sleap_rtc_core::job::{Job, JobKind, JobSpec, JobStatus};

    fn write_job(jobs: &Path, id: &str, state: JobState, finished_days_ago: f64, bytes: usize, now: f64) {
        let dir = jobs.join(id);
        std::fs::create_dir_all(dir.join("runs")).unwrap();
        std::fs::write(dir.join("runs/model.ckpt"), vec![0u8; bytes]).unwrap();
        let spec: JobSpec = serde_json::from_value(json!({
            "type": "track", "model_paths": ["m"], "data_path": "d.slp"
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let mut job = Job::new(id, JobKind::Track);
        job.state = state;
        let entry = JournalEntry {
            job,
            owner: "u".into(),
            spec,
            status: JobStatus {
                job_id: id.into(),
                kind: JobKind::Track,
                state,
                last_epoch: None,
                message: None,
                results: vec![],
                duration_secs: None,
                published: vec![],
            },
            created_at: now - finished_days_ago * 86_400.0 - 10.0,
            updated_at: now - finished_days_ago * 86_400.0,
            trainer_pid: None,
        };
        std::fs::write(journal_path(jobs, id), serde_json::to_vec(&entry).unwrap()).unwrap();
    }

    #[test]
    fn a_sweep_removes_old_and_over_cap_finished_jobs_only() {
        let tmp = tempfile::tempdir().unwrap();
        let jobs = tmp.path();
        let now = 1_800_000_000.0;
        let id = |n: u8| format!("job_{:016x}", n);
        write_job(jobs, &id(1), JobState::Completed, 30.0, 1000, now); // too old
        write_job(jobs, &id(2), JobState::Failed, 5.0, 4000, now); // over the cap, oldest
        write_job(jobs, &id(3), JobState::Completed, 2.0, 4000, now); // fits once 2 is gone
        write_job(jobs, &id(4), JobState::Running, 40.0, 4000, now); // not finished: kept
        write_job(jobs, &id(5), JobState::Completed, 0.2, 4000, now); // in the attach window
        std::fs::create_dir_all(jobs.join("not-a-job")).unwrap();
        // 17 kB of payload plus the five job.json files: 16 kB is exceeded until job 2 is gone.
        let removed = sweep(jobs, Duration::from_secs(14 * 86_400), Some(16_000), now);
        let ids: Vec<&str> = removed.iter().map(|(i, _, _)| i.as_str()).collect();
        assert_eq!(ids, vec![id(1), id(2)]);
        assert_eq!(removed[0].1, Removal::Age);
        assert_eq!(removed[1].1, Removal::DiskCap);
        assert!(removed[1].2 >= 4000, "sizes are measured");
        for n in [3, 4, 5] {
            assert!(jobs.join(id(n)).is_dir(), "job {n} kept");
        }
        assert!(jobs.join("not-a-job").is_dir(), "what is not a job directory is never touched");
    }
}
