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

mod names;
mod receiver;
mod sender;

pub use names::*;
pub use receiver::*;
pub use sender::*;

#[cfg(test)]
mod tests;
