//! Which finished job directories a worker removes, and why: the decision only (the worker
//! measures the directories and deletes them).
//!
//! A finished job's directory holds its inputs, the trained model and the logs; a client that
//! was cut off fetches its results from it with `job attach`. So a directory goes when it is
//! older than the keep period, or, oldest first, while the job directories together exceed the
//! disk cap; but never while it is within the attach window, and never a job that is not
//! finished (those are not even offered to [`plan`]).

/// A finished job as found on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedJob {
    pub id: String,
    /// When it finished (Unix seconds; the journal's last update).
    pub finished_at: f64,
    /// What its directory holds.
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Finished jobs older than this (seconds) are removed.
    pub keep_secs: f64,
    /// All job directories together (finished or not) are kept under this many bytes by
    /// removing finished ones, oldest first.
    pub cap_bytes: Option<u64>,
    /// A job that finished less than this long ago (seconds) is never removed, whatever the cap
    /// says: its client may still come back for the results.
    pub attach_window_secs: f64,
}

/// Why a job directory is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Older than the keep period.
    Age,
    /// Over the disk cap.
    DiskCap,
}

/// The jobs to remove, oldest first. `unfinished_bytes`: what the directories of jobs that are
/// not finished hold (they count toward the cap but cannot be removed).
pub fn plan(jobs: &[FinishedJob], unfinished_bytes: u64, now: f64, p: &Policy) -> Vec<(String, Removal)> {
    let mut by_age: Vec<&FinishedJob> = jobs.iter().collect();
    by_age.sort_by(|a, b| a.finished_at.total_cmp(&b.finished_at).then_with(|| a.id.cmp(&b.id)));
    let protected = |j: &FinishedJob| now - j.finished_at < p.attach_window_secs;
    let mut total = unfinished_bytes.saturating_add(jobs.iter().map(|j| j.bytes).fold(0u64, u64::saturating_add));
    let mut out = Vec::new();
    for j in by_age {
        if protected(j) {
            continue;
        }
        let why = if now - j.finished_at > p.keep_secs {
            Removal::Age
        } else if p.cap_bytes.is_some_and(|cap| total > cap) {
            Removal::DiskCap
        } else {
            continue;
        };
        total = total.saturating_sub(j.bytes);
        out.push((j.id.clone(), why));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: f64 = 86_400.0;

    fn job(id: &str, days_ago: f64, gb: u64) -> FinishedJob {
        FinishedJob { id: id.into(), finished_at: 100.0 * DAY - days_ago * DAY, bytes: gb << 30 }
    }

    fn policy(keep_days: f64, cap_gb: Option<u64>) -> Policy {
        Policy { keep_secs: keep_days * DAY, cap_bytes: cap_gb.map(|g| g << 30), attach_window_secs: DAY }
    }

    #[test]
    fn old_jobs_go_and_recent_ones_stay() {
        let jobs = [job("a", 20.0, 1), job("b", 13.0, 1), job("c", 15.0, 1)];
        let got = plan(&jobs, 0, 100.0 * DAY, &policy(14.0, None));
        assert_eq!(got, vec![("a".into(), Removal::Age), ("c".into(), Removal::Age)]);
    }

    #[test]
    fn the_cap_removes_oldest_first_until_under_it() {
        let jobs = [job("new", 2.0, 4), job("old", 5.0, 4), job("mid", 3.0, 4)];
        // 12 GB of finished jobs and 3 GB running, cap 8: the two oldest go.
        let got = plan(&jobs, 3 << 30, 100.0 * DAY, &policy(14.0, Some(8)));
        assert_eq!(got, vec![("old".into(), Removal::DiskCap), ("mid".into(), Removal::DiskCap)]);
    }

    #[test]
    fn the_attach_window_beats_the_cap() {
        let jobs = [job("just-done", 0.5, 10), job("older", 2.0, 1)];
        let got = plan(&jobs, 0, 100.0 * DAY, &policy(14.0, Some(1)));
        // Only the older one can go, though the cap is still exceeded after it.
        assert_eq!(got, vec![("older".into(), Removal::DiskCap)]);
    }

    #[test]
    fn nothing_to_do_is_nothing() {
        assert!(plan(&[], 50 << 30, 0.0, &policy(14.0, Some(1))).is_empty());
        let jobs = [job("a", 1.5, 1)];
        assert!(plan(&jobs, 0, 100.0 * DAY, &policy(14.0, Some(2))).is_empty());
    }
}
