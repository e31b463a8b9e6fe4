//! The job state machine: submitted → accepted|rejected → [queued →] running → completed |
//! failed | stopped_early | cancelled, and stop/cancel requests.

use super::*;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Submitted,
    Rejected,
    /// Accepted; its uploads are arriving.
    Accepted,
    /// Uploaded, waiting for the GPU behind other jobs (the worker's queue).
    Queued,
    Running,
    Completed,
    Failed,
    /// Stopped by the user before `max_epochs`; the model so far is the result.
    StoppedEarly,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Rejected | JobState::Completed | JobState::Failed | JobState::StoppedEarly | JobState::Cancelled
        )
    }

    /// A finished job whose results can be fetched.
    pub fn has_results(self) -> bool {
        matches!(self, JobState::Completed | JobState::StoppedEarly)
    }

    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Submitted, Accepted | Rejected)
                | (Accepted, Queued | Running | Failed | Cancelled)
                | (Queued, Running | Failed | Cancelled)
                | (Running, Completed | Failed | StoppedEarly | Cancelled)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Submitted => "submitted",
            JobState::Rejected => "rejected",
            JobState::Accepted => "accepted",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::StoppedEarly => "stopped_early",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("job {job}: cannot go from {from} to {to}")]
    InvalidTransition { job: String, from: JobState, to: JobState },
    #[error("job {0}: already finished")]
    Finished(String),
}

/// A user's request to end a job before it finishes on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interrupt {
    /// Finish the current epoch, save, and return the model (sleap-nn's ZMQ `stop`).
    Stop,
    /// Kill the run; nothing is returned.
    Cancel,
}

/// One job's state, as the worker (and, mirrored from messages, the client) tracks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    pub state: JobState,
    #[serde(default)]
    pub stop_requested: bool,
    #[serde(default)]
    pub cancel_requested: bool,
}

impl Job {
    pub fn new(id: impl Into<String>, kind: JobKind) -> Job {
        Job { id: id.into(), kind, state: JobState::Submitted, stop_requested: false, cancel_requested: false }
    }

    pub fn transition(&mut self, to: JobState) -> Result<(), JobError> {
        if !self.state.can_become(to) {
            return Err(JobError::InvalidTransition { job: self.id.clone(), from: self.state, to });
        }
        self.state = to;
        Ok(())
    }

    /// Records an interrupt. Returns what the runtime must now do to the trainer, if anything:
    /// a repeated stop does nothing new, a cancel after a stop escalates.
    pub fn interrupt(&mut self, what: Interrupt) -> Result<Option<Interrupt>, JobError> {
        if self.state.is_terminal() {
            return Err(JobError::Finished(self.id.clone()));
        }
        Ok(match what {
            Interrupt::Stop if self.stop_requested || self.cancel_requested => None,
            // A track job has no epochs to finish; stopping it early means cancelling it.
            Interrupt::Stop if self.kind == JobKind::Track => {
                self.cancel_requested = true;
                Some(Interrupt::Cancel)
            }
            Interrupt::Stop => {
                self.stop_requested = true;
                Some(Interrupt::Stop)
            }
            Interrupt::Cancel if self.cancel_requested => None,
            Interrupt::Cancel => {
                self.cancel_requested = true;
                Some(Interrupt::Cancel)
            }
        })
    }
}
