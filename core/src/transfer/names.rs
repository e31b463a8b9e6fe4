//! What a remote peer may name: file names (no escape from the directory, no look-alikes) and
//! manifests (sizes, counts, hashes).

use super::{Manifest, TransferError};

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
