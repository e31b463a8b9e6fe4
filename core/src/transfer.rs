//! Framed, resumable, verified file transfer (sans-IO).
//!
//! A transfer is one [`Manifest`] (relative names, sizes, BLAKE3 hashes) announced on the `ctl`
//! channel, followed by binary frames on the `bulk` channel, each a [`HEADER_LEN`]-byte header
//! (version, kind, transfer id, file index, offset) and a payload. Both channels are reliable and
//! ordered, so frames of one transfer arrive in order.
//!
//! ```text
//! sender                                   receiver
//!   transfer_offer {id, manifest}  ─ctl─▶    validate names/sizes; look for .part files
//!                                  ◀─ctl─    transfer_accept {id, committed: [offset per file]}
//!   frames from the committed offsets ─bulk─▶ write to .part, ack committed offsets now and then
//!                                  ◀─ctl─    transfer_ack {id, file, offset}
//!                                            file complete → hash .part → rename or discard
//!                                  ◀─ctl─    transfer_file_result {id, file, ok, error}
//!                                  ◀─ctl─    transfer_complete {id, ok, failed}
//! ```
//!
//! Resume is a re-offer: on a new connection the sender offers the same manifest (same id); the
//! receiver answers with what its `.part` files already hold and the sender continues there.
//! Either side may send `transfer_cancel`. Nothing here touches a file: the state machines say
//! what to read, write, hash, rename or delete, and the runtime does it.

use serde::{Deserialize, Serialize};

/// Frame layout version.
pub const FRAME_VERSION: u8 = 1;
/// Kind byte of a data frame.
pub const KIND_DATA: u8 = 0;
/// `version u8 | kind u8 | reserved u16 | transfer_id u32 | file u32 | offset u64`, big-endian.
pub const HEADER_LEN: usize = 20;
/// Default payload bytes per frame: small frames keep str0m's SCTP queue short (see
/// `BENCHMARKS.md` for the sweep that chose it).
pub const DEFAULT_CHUNK: usize = 16 * 1024;
/// Receiver acknowledges committed bytes at least this often (and at every file end).
pub const ACK_EVERY: u64 = 1024 * 1024;

/// One file of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative path with `/` separators; see [`validate_name`].
    pub name: String,
    pub size: u64,
    /// BLAKE3 of the whole file, lowercase hex.
    pub blake3: String,
}

/// What a transfer carries: one file, or every file of a directory (e.g. a trained model folder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Manifest {
    pub files: Vec<FileEntry>,
}

impl Manifest {
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).fold(0u64, u64::saturating_add)
    }

    /// A transfer id derived from the content, so re-sending the same files after a cut resumes
    /// the same transfer.
    pub fn derived_id(&self) -> u32 {
        let mut h = blake3::Hasher::new();
        for f in &self.files {
            h.update(f.name.as_bytes());
            h.update(&[0]);
            h.update(&f.size.to_be_bytes());
            h.update(f.blake3.as_bytes());
        }
        let b = h.finalize();
        u32::from_be_bytes([b.as_bytes()[0], b.as_bytes()[1], b.as_bytes()[2], b.as_bytes()[3]])
    }
}

/// Control messages of the transfer protocol (JSON on the `ctl` channel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TransferMsg {
    TransferOffer { transfer_id: u32, manifest: Manifest },
    TransferAccept { transfer_id: u32, committed: Vec<u64> },
    TransferReject { transfer_id: u32, code: RejectCode, message: String },
    TransferAck { transfer_id: u32, file: u32, offset: u64 },
    TransferFileResult { transfer_id: u32, file: u32, ok: bool, error: Option<String> },
    TransferComplete { transfer_id: u32, ok: u32, failed: u32 },
    TransferCancel { transfer_id: u32, reason: String },
}

impl TransferMsg {
    pub fn transfer_id(&self) -> u32 {
        match self {
            TransferMsg::TransferOffer { transfer_id, .. }
            | TransferMsg::TransferAccept { transfer_id, .. }
            | TransferMsg::TransferReject { transfer_id, .. }
            | TransferMsg::TransferAck { transfer_id, .. }
            | TransferMsg::TransferFileResult { transfer_id, .. }
            | TransferMsg::TransferComplete { transfer_id, .. }
            | TransferMsg::TransferCancel { transfer_id, .. } => *transfer_id,
        }
    }

    /// True for `type` values this module owns, so a control-channel dispatcher can route them.
    pub fn is_transfer_type(ty: &str) -> bool {
        ty.starts_with("transfer_")
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(s: &str) -> Result<Self, TransferError> {
        serde_json::from_str(s).map_err(|e| TransferError::BadMessage(e.to_string()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RejectCode {
    UnsafeName,
    TooLarge,
    TooManyFiles,
    DuplicateName,
    BadManifest,
    Busy,
    Io,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("unsafe file name {name:?}: {why}")]
    UnsafeName { name: String, why: &'static str },
    #[error("{0}")]
    TooLarge(String),
    #[error("manifest lists {0} files; the limit is {1}")]
    TooManyFiles(usize, usize),
    #[error("manifest lists {0:?} twice")]
    DuplicateName(String),
    #[error("bad manifest: {0}")]
    BadManifest(String),
    #[error("bad frame: {0}")]
    BadFrame(&'static str),
    #[error("frame for transfer {got:#x}, expected {want:#x}")]
    WrongTransfer { got: u32, want: u32 },
    #[error("frame for file {file} at offset {offset} does not fit: {why}")]
    OutOfOrder { file: u32, offset: u64, why: &'static str },
    #[error("bad control message: {0}")]
    BadMessage(String),
    #[error("transfer rejected ({code:?}): {message}")]
    Rejected { code: RejectCode, message: String },
    #[error("transfer cancelled: {0}")]
    Cancelled(String),
}

impl TransferError {
    pub fn reject_code(&self) -> RejectCode {
        match self {
            TransferError::UnsafeName { .. } => RejectCode::UnsafeName,
            TransferError::TooLarge(_) => RejectCode::TooLarge,
            TransferError::TooManyFiles(..) => RejectCode::TooManyFiles,
            TransferError::DuplicateName(_) => RejectCode::DuplicateName,
            _ => RejectCode::BadManifest,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Names and limits
// ---------------------------------------------------------------------------------------------

/// Longest accepted relative name, in bytes.
pub const MAX_NAME_LEN: usize = 1024;
/// Longest accepted path component, in bytes (common file-system limit).
pub const MAX_COMPONENT_LEN: usize = 255;

const WINDOWS_DEVICES: [&str; 22] = [
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8", "COM9", "LPT1", "LPT2",
    "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// Characters that render as or act like path separators, or reorder text, in some systems.
fn is_confusable(c: char) -> bool {
    matches!(
        c,
        '\\' | ':' // Windows separators / drive and stream syntax
            | '\u{2215}' | '\u{2044}' | '\u{FF0F}' | '\u{29F8}' | '\u{FF3C}' | '\u{2216}' // slash look-alikes
            | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' // bidi controls
            | '\u{FEFF}' | '\u{200B}'..='\u{200D}' // invisible
    )
}

/// A relative name is safe when it cannot leave the destination directory or alias something
/// else on any common platform: relative, `/`-separated, no empty / `.` / `..` components, no NUL
/// or control characters, no Windows device names, separators or trailing dots/spaces, no
/// look-alike slashes or bidi controls, and within length limits.
pub fn validate_name(name: &str) -> Result<(), TransferError> {
    let bad = |why: &'static str| Err(TransferError::UnsafeName { name: name.chars().take(200).collect(), why });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 1024 bytes");
    }
    if name.starts_with('/') {
        return bad("absolute path");
    }
    if name.chars().any(|c| c == '\0') {
        return bad("contains NUL");
    }
    if name.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    if name.chars().any(is_confusable) {
        return bad("contains a backslash, colon, look-alike slash or invisible/bidi character");
    }
    for comp in name.split('/') {
        match comp {
            "" => return bad("empty path component"),
            "." | ".." => return bad("'.' or '..' component"),
            _ => {}
        }
        if comp.len() > MAX_COMPONENT_LEN {
            return bad("path component longer than 255 bytes");
        }
        if comp.ends_with('.') || comp.ends_with(' ') {
            return bad("component ends with a dot or space");
        }
        let stem = comp.split('.').next().unwrap_or(comp).trim_end();
        if WINDOWS_DEVICES.iter().any(|d| d.eq_ignore_ascii_case(stem)) {
            return bad("Windows device name");
        }
    }
    Ok(())
}

/// What a receiver is willing to accept.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_files: usize,
    pub max_file_size: u64,
    pub max_total_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_files: 10_000, max_file_size: 256 << 30, max_total_size: 1 << 40 }
    }
}

fn is_hex_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks a manifest against the limits and the naming rules before anything is written.
pub fn validate_manifest(m: &Manifest, limits: &Limits) -> Result<(), TransferError> {
    if m.files.len() > limits.max_files {
        return Err(TransferError::TooManyFiles(m.files.len(), limits.max_files));
    }
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    for f in &m.files {
        validate_name(&f.name)?;
        if !is_hex_hash(&f.blake3) {
            return Err(TransferError::BadManifest(format!("{}: blake3 must be 64 lowercase hex digits", f.name)));
        }
        if f.size > limits.max_file_size {
            return Err(TransferError::TooLarge(format!(
                "{} is {} bytes; the limit per file is {} bytes",
                f.name, f.size, limits.max_file_size
            )));
        }
        total = total.saturating_add(f.size);
        // A name ending in the receiver's `.part` suffix could collide with another file's
        // temporary name.
        if f.name.ends_with(".part") {
            return Err(TransferError::UnsafeName {
                name: f.name.clone(),
                why: "ends in .part (reserved for partial files)",
            });
        }
        // Case-insensitive file systems would merge names differing only in case.
        if !seen.insert(f.name.to_lowercase()) {
            return Err(TransferError::DuplicateName(f.name.clone()));
        }
        // A file and a directory of the same name cannot both exist.
        let mut prefix = String::new();
        for comp in f.name.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(comp);
            if prefix.len() < f.name.len() && m.files.iter().any(|o| o.name.eq_ignore_ascii_case(&prefix)) {
                return Err(TransferError::DuplicateName(prefix));
            }
        }
    }
    if total > limits.max_total_size {
        return Err(TransferError::TooLarge(format!(
            "transfer is {total} bytes; the limit is {} bytes",
            limits.max_total_size
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub transfer_id: u32,
    pub file: u32,
    pub offset: u64,
}

/// Appends one data frame (header + payload) to `out`.
pub fn encode_frame(h: FrameHeader, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&[FRAME_VERSION, KIND_DATA, 0, 0]);
    out.extend_from_slice(&h.transfer_id.to_be_bytes());
    out.extend_from_slice(&h.file.to_be_bytes());
    out.extend_from_slice(&h.offset.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Splits a frame into header and payload, rejecting anything malformed.
pub fn decode_frame(buf: &[u8]) -> Result<(FrameHeader, &[u8]), TransferError> {
    if buf.len() < HEADER_LEN {
        return Err(TransferError::BadFrame("shorter than the header"));
    }
    if buf[0] != FRAME_VERSION {
        return Err(TransferError::BadFrame("unknown frame version"));
    }
    if buf[1] != KIND_DATA || buf[2] != 0 || buf[3] != 0 {
        return Err(TransferError::BadFrame("unknown frame kind or reserved bits set"));
    }
    let u32_at = |i: usize| u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let mut off = [0u8; 8];
    off.copy_from_slice(&buf[12..20]);
    Ok((FrameHeader { transfer_id: u32_at(4), file: u32_at(8), offset: u64::from_be_bytes(off) }, &buf[HEADER_LEN..]))
}

// ---------------------------------------------------------------------------------------------
// Receiver
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Sender
// ---------------------------------------------------------------------------------------------

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

#[cfg(test)]
mod tests;
