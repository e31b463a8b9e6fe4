//! The receiving side's state machine: what to write, verify, commit or discard.

use super::*;

/// What the receiving runtime must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum ReceiverAction {
    /// Send this control message to the sender.
    Send(TransferMsg),
    /// Every byte of the file is written: hash its `.part` and call [`Receiver::verified`].
    Verify { file: u32 },
    /// The hash matched: make the `.part` durable, rename it to its final name, and call
    /// [`Receiver::committed`] (the sender hears "ok" only after that).
    Commit { file: u32 },
    /// Delete the `.part` (hash mismatch or cancel).
    Discard { file: u32 },
    /// The transfer is over; `failed` lists files that did not verify; `cancelled` says why the
    /// transfer was cancelled as a whole, if it was.
    Finished { ok: u32, failed: Vec<u32>, cancelled: Option<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileState {
    Receiving,
    Verifying,
    Committing,
    Done,
    Failed,
}

/// The receiving side of one transfer.
#[derive(Debug)]
pub struct Receiver {
    id: u32,
    manifest: Manifest,
    /// Next expected offset per file (= bytes the `.part` holds).
    next: Vec<u64>,
    /// Bytes reported written per file.
    written: Vec<u64>,
    last_ack: Vec<u64>,
    state: Vec<FileState>,
    out: std::collections::VecDeque<ReceiverAction>,
    over: bool,
}

/// A payload the runtime must write: `data` at `offset` of `file`.
#[derive(Debug, PartialEq, Eq)]
pub struct Write<'a> {
    pub file: u32,
    pub offset: u64,
    pub data: &'a [u8],
}

impl Receiver {
    /// Starts receiving `manifest`. `existing[i]` is how many bytes file `i`'s `.part` already
    /// holds (0 if none; values above the size restart that file). Returns the receiver and the
    /// `transfer_accept` to send. Validate the manifest first with [`validate_manifest`].
    pub fn new(transfer_id: u32, manifest: Manifest, existing: &[u64]) -> Receiver {
        let n = manifest.files.len();
        let next: Vec<u64> = (0..n)
            .map(|i| {
                let have = existing.get(i).copied().unwrap_or(0);
                if have <= manifest.files[i].size { have } else { 0 }
            })
            .collect();
        let mut r = Receiver {
            id: transfer_id,
            written: next.clone(),
            last_ack: next.clone(),
            state: vec![FileState::Receiving; n],
            next,
            manifest,
            out: Default::default(),
            over: false,
        };
        r.out.push_back(ReceiverAction::Send(TransferMsg::TransferAccept { transfer_id, committed: r.next.clone() }));
        for i in 0..n {
            r.maybe_complete(i);
        }
        r.maybe_finish();
        r
    }

    pub fn transfer_id(&self) -> u32 {
        self.id
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn is_over(&self) -> bool {
        self.over
    }

    pub fn poll_action(&mut self) -> Option<ReceiverAction> {
        self.out.pop_front()
    }

    /// Checks a frame and returns the part to write (`None` for data already held, e.g. a
    /// retransmission after resume). Any error ends the transfer: cancel it.
    pub fn on_frame<'a>(&mut self, frame: &'a [u8]) -> Result<Option<Write<'a>>, TransferError> {
        let (h, data) = decode_frame(frame)?;
        if h.transfer_id != self.id {
            return Err(TransferError::WrongTransfer { got: h.transfer_id, want: self.id });
        }
        let i = h.file as usize;
        let Some(entry) = self.manifest.files.get(i) else {
            return Err(TransferError::OutOfOrder { file: h.file, offset: h.offset, why: "no such file" });
        };
        match self.state[i] {
            FileState::Receiving => {}
            // This side gave up on the file (a write failed); the sender may still be streaming
            // it. Drop its frames and keep the other files going.
            FileState::Failed => return Ok(None),
            _ => {
                return Err(TransferError::OutOfOrder { file: h.file, offset: h.offset, why: "file already complete" });
            }
        }
        let end = h.offset.checked_add(data.len() as u64).ok_or(TransferError::BadFrame("offset overflow"))?;
        if end > entry.size {
            return Err(TransferError::OutOfOrder { file: h.file, offset: h.offset, why: "beyond the file's size" });
        }
        if h.offset > self.next[i] {
            return Err(TransferError::OutOfOrder { file: h.file, offset: h.offset, why: "gap before this frame" });
        }
        if end <= self.next[i] {
            return Ok(None);
        }
        let skip = (self.next[i] - h.offset) as usize;
        let w = Write { file: h.file, offset: self.next[i], data: &data[skip..] };
        self.next[i] = end;
        Ok(Some(w))
    }

    /// The runtime has written file `file` up to `end` (exclusive).
    pub fn written(&mut self, file: u32, end: u64) {
        let i = file as usize;
        if i >= self.written.len() || self.over {
            return;
        }
        self.written[i] = self.written[i].max(end.min(self.next[i]));
        let size = self.manifest.files[i].size;
        if self.written[i] - self.last_ack[i] >= ACK_EVERY || (self.written[i] == size && self.last_ack[i] < size) {
            self.last_ack[i] = self.written[i];
            self.out.push_back(ReceiverAction::Send(TransferMsg::TransferAck {
                transfer_id: self.id,
                file,
                offset: self.written[i],
            }));
        }
        self.maybe_complete(i);
    }

    fn maybe_complete(&mut self, i: usize) {
        if self.state[i] == FileState::Receiving && self.written[i] == self.manifest.files[i].size {
            self.state[i] = FileState::Verifying;
            self.out.push_back(ReceiverAction::Verify { file: i as u32 });
        }
    }

    /// The runtime hashed file `file`'s `.part`: `blake3_hex` is what it found.
    pub fn verified(&mut self, file: u32, blake3_hex: &str) {
        let i = file as usize;
        if i >= self.state.len() || self.state[i] != FileState::Verifying || self.over {
            return;
        }
        if self.manifest.files[i].blake3.eq_ignore_ascii_case(blake3_hex) {
            self.state[i] = FileState::Committing;
            self.out.push_back(ReceiverAction::Commit { file });
        } else {
            self.fail(i, "BLAKE3 mismatch: the received bytes differ from the sender's file");
        }
    }

    /// The runtime committed (renamed) a verified file, or could not.
    pub fn committed(&mut self, file: u32, result: Result<(), String>) {
        let i = file as usize;
        if i >= self.state.len() || self.state[i] != FileState::Committing || self.over {
            return;
        }
        match result {
            Ok(()) => {
                self.state[i] = FileState::Done;
                self.out.push_back(ReceiverAction::Send(TransferMsg::TransferFileResult {
                    transfer_id: self.id,
                    file,
                    ok: true,
                    error: None,
                }));
                self.maybe_finish();
            }
            Err(e) => self.fail(i, &format!("cannot store the received file: {e}")),
        }
    }

    fn fail(&mut self, i: usize, error: &str) {
        self.state[i] = FileState::Failed;
        self.out.push_back(ReceiverAction::Discard { file: i as u32 });
        self.out.push_back(ReceiverAction::Send(TransferMsg::TransferFileResult {
            transfer_id: self.id,
            file: i as u32,
            ok: false,
            error: Some(error.to_owned()),
        }));
        self.maybe_finish();
    }

    /// The runtime could not write or hash a file: fail it, keep the rest.
    pub fn file_failed(&mut self, file: u32, error: &str) {
        let i = file as usize;
        if i >= self.state.len() || matches!(self.state[i], FileState::Done | FileState::Failed) || self.over {
            return;
        }
        self.fail(i, error);
    }

    fn maybe_finish(&mut self) {
        if self.over
            || self
                .state
                .iter()
                .any(|s| matches!(s, FileState::Receiving | FileState::Verifying | FileState::Committing))
        {
            return;
        }
        self.over = true;
        let failed: Vec<u32> =
            self.state.iter().enumerate().filter(|(_, s)| **s == FileState::Failed).map(|(i, _)| i as u32).collect();
        let ok = (self.state.len() - failed.len()) as u32;
        self.out.push_back(ReceiverAction::Send(TransferMsg::TransferComplete {
            transfer_id: self.id,
            ok,
            failed: failed.len() as u32,
        }));
        self.out.push_back(ReceiverAction::Finished { ok, failed, cancelled: None });
    }

    /// Cancels locally (tell the sender why) and discards incomplete files.
    pub fn cancel(&mut self, reason: &str) {
        if self.over {
            return;
        }
        self.out.push_back(ReceiverAction::Send(TransferMsg::TransferCancel {
            transfer_id: self.id,
            reason: reason.to_owned(),
        }));
        self.abort(format!("cancelled here: {reason}"));
    }

    /// The sender cancelled.
    pub fn on_cancel(&mut self, reason: &str) {
        self.abort(format!("cancelled by the sender: {reason}"));
    }

    fn abort(&mut self, why: String) {
        if self.over {
            return;
        }
        for i in 0..self.state.len() {
            if matches!(self.state[i], FileState::Receiving | FileState::Verifying | FileState::Committing) {
                self.state[i] = FileState::Failed;
                self.out.push_back(ReceiverAction::Discard { file: i as u32 });
            }
        }
        self.over = true;
        let failed: Vec<u32> =
            self.state.iter().enumerate().filter(|(_, s)| **s == FileState::Failed).map(|(i, _)| i as u32).collect();
        self.out.push_back(ReceiverAction::Finished {
            ok: (self.state.len() - failed.len()) as u32,
            failed,
            cancelled: Some(why),
        });
    }
}
