//! The sending side's state machine: what to read and send, and when a file is done.

use super::*;

/// A chunk the sending runtime must read and frame: `len` bytes of `file` at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub file: u32,
    pub offset: u64,
    pub len: usize,
}

impl Chunk {
    pub fn header(&self, transfer_id: u32) -> FrameHeader {
        FrameHeader { transfer_id, file: self.file, offset: self.offset }
    }
}

/// Progress, in bytes and files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub total_bytes: u64,
    /// Bytes framed and handed to the channel (includes bytes skipped by resume).
    pub sent_bytes: u64,
    /// Bytes the receiver reported written (includes what it already held).
    pub acked_bytes: u64,
    pub files_total: u32,
    pub files_ok: u32,
    pub files_failed: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SenderEvent {
    Accepted {
        resumed_bytes: u64,
    },
    Progress(Progress),
    FileResult {
        file: u32,
        ok: bool,
        error: Option<String>,
    },
    /// The receiver has every file (`failed` lists those whose hash did not match).
    Complete {
        failed: Vec<u32>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendState {
    Offered,
    Sending,
    Over,
}

/// The sending side of one transfer.
#[derive(Debug)]
pub struct Sender {
    id: u32,
    manifest: Manifest,
    chunk: usize,
    state: SendState,
    file: usize,
    offset: u64,
    acked: Vec<u64>,
    results: Vec<Option<bool>>,
    sent_bytes: u64,
}

impl Sender {
    pub fn new(transfer_id: u32, manifest: Manifest, chunk: usize) -> Sender {
        let n = manifest.files.len();
        Sender {
            id: transfer_id,
            manifest,
            chunk: chunk.max(1),
            state: SendState::Offered,
            file: 0,
            offset: 0,
            acked: vec![0; n],
            results: vec![None; n],
            sent_bytes: 0,
        }
    }

    pub fn transfer_id(&self) -> u32 {
        self.id
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn offer(&self) -> TransferMsg {
        TransferMsg::TransferOffer { transfer_id: self.id, manifest: self.manifest.clone() }
    }

    pub fn is_over(&self) -> bool {
        self.state == SendState::Over
    }

    pub fn progress(&self) -> Progress {
        Progress {
            total_bytes: self.manifest.total_size(),
            sent_bytes: self.sent_bytes,
            acked_bytes: self.acked.iter().sum(),
            files_total: self.manifest.files.len() as u32,
            files_ok: self.results.iter().filter(|r| **r == Some(true)).count() as u32,
            files_failed: self.results.iter().filter(|r| **r == Some(false)).count() as u32,
        }
    }

    /// Handles a control message from the receiver.
    pub fn on_message(&mut self, msg: &TransferMsg) -> Result<Option<SenderEvent>, TransferError> {
        if msg.transfer_id() != self.id {
            return Ok(None);
        }
        match msg {
            TransferMsg::TransferAccept { committed, .. } => {
                if self.state != SendState::Offered {
                    return Err(TransferError::BadMessage("transfer_accept after the transfer started".into()));
                }
                if committed.len() != self.manifest.files.len() {
                    return Err(TransferError::BadMessage("transfer_accept lists the wrong number of files".into()));
                }
                for (i, (&c, f)) in committed.iter().zip(&self.manifest.files).enumerate() {
                    if c > f.size {
                        return Err(TransferError::BadMessage(format!("committed offset beyond the size of file {i}")));
                    }
                    self.acked[i] = c;
                }
                self.state = SendState::Sending;
                self.file = 0;
                self.offset = self.acked.first().copied().unwrap_or(0);
                self.sent_bytes = self.acked.iter().sum();
                let resumed_bytes = self.sent_bytes;
                self.skip_complete();
                Ok(Some(SenderEvent::Accepted { resumed_bytes }))
            }
            TransferMsg::TransferAck { file, offset, .. } => {
                let i = *file as usize;
                let size = self
                    .manifest
                    .files
                    .get(i)
                    .map(|f| f.size)
                    .ok_or_else(|| TransferError::BadMessage(format!("transfer_ack for unknown file {file}")))?;
                self.acked[i] = self.acked[i].max((*offset).min(size));
                Ok(Some(SenderEvent::Progress(self.progress())))
            }
            TransferMsg::TransferFileResult { file, ok, error, .. } => {
                let i = *file as usize;
                if i >= self.results.len() {
                    return Err(TransferError::BadMessage(format!("result for unknown file {file}")));
                }
                self.results[i] = Some(*ok);
                Ok(Some(SenderEvent::FileResult { file: *file, ok: *ok, error: error.clone() }))
            }
            TransferMsg::TransferComplete { .. } => {
                self.state = SendState::Over;
                let failed =
                    self.results.iter().enumerate().filter(|(_, r)| **r != Some(true)).map(|(i, _)| i as u32).collect();
                Ok(Some(SenderEvent::Complete { failed }))
            }
            TransferMsg::TransferReject { code, message, .. } => {
                self.state = SendState::Over;
                Err(TransferError::Rejected { code: *code, message: message.clone() })
            }
            TransferMsg::TransferCancel { reason, .. } => {
                self.state = SendState::Over;
                Err(TransferError::Cancelled(reason.clone()))
            }
            TransferMsg::TransferOffer { .. } => Ok(None),
        }
    }

    fn skip_complete(&mut self) {
        while let Some(f) = self.manifest.files.get(self.file) {
            if self.offset < f.size {
                break;
            }
            self.file += 1;
            self.offset = self.acked.get(self.file).copied().unwrap_or(0);
        }
    }

    /// The next chunk to read and send, or `None` when everything is sent (or not accepted yet).
    pub fn next_chunk(&mut self) -> Option<Chunk> {
        if self.state != SendState::Sending {
            return None;
        }
        self.skip_complete();
        let f = self.manifest.files.get(self.file)?;
        let len = (f.size - self.offset).min(self.chunk as u64) as usize;
        let c = Chunk { file: self.file as u32, offset: self.offset, len };
        self.offset += len as u64;
        self.sent_bytes += len as u64;
        Some(c)
    }

    /// True once every byte has been handed out by [`Sender::next_chunk`].
    /// Accepted by the receiver and not over: frames are (or will be) going out.
    pub fn is_sending(&self) -> bool {
        self.state == SendState::Sending
    }

    pub fn all_sent(&self) -> bool {
        self.state == SendState::Sending && self.file >= self.manifest.files.len()
    }

    /// Cancels locally; returns the message to send.
    pub fn cancel(&mut self, reason: &str) -> TransferMsg {
        self.state = SendState::Over;
        TransferMsg::TransferCancel { transfer_id: self.id, reason: reason.to_owned() }
    }
}
