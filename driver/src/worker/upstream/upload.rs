//! `FILE_UPLOAD_*`: a file an upstream client sends (the GUI's `.pkg.slp` when the worker does
//! not share its filesystem). Written under `WORK_DIR/uploads/incoming/`, kept as
//! `uploads/<sha256>/<base name>` only if its SHA-256 is the one announced.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::Digest as _;
use sleap_rtc_core::upstream::WorkerMsg;

use super::super::Worker;
use crate::Runtime;
use crate::conn::PeerConnection;

/// `FILE_UPLOAD_PROGRESS` at most this often (upstream's interval).
const UPLOAD_PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Largest upload accepted.
const MAX_UPLOAD: u64 = 1 << 40;

/// An upload under way (`FILE_UPLOAD_START` … `FILE_UPLOAD_END`).
pub(super) struct Upload {
    pub(super) part: PathBuf,
    name: String,
    file: std::fs::File,
    size: u64,
    received: u64,
    sha: sha2::Sha256,
    claimed: Option<String>,
    last_progress: Instant,
    failed: Option<String>,
}

impl<R: Runtime> Worker<R> {
    /// A file of that content and name uploaded before is used again (the content is named by its
    /// hash, which `upload_end` checked when it arrived).
    pub(super) fn upload_check(&self, sha: &str, name: &str, announced: &mut Option<String>) -> WorkerMsg {
        *announced = None;
        if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            if let Some(hit) = safe_name(name).map(|n| self.uploads_dir().join(sha).join(n)).filter(|p| p.is_file()) {
                return WorkerMsg::UploadCacheHit(hit.display().to_string());
            }
            *announced = Some(sha.to_owned());
        }
        WorkerMsg::UploadReady
    }

    pub(super) fn upload_start(
        &self,
        name: &str,
        size: u64,
        claimed: Option<String>,
        upload: &mut Option<Upload>,
    ) -> WorkerMsg {
        if let Some(u) = upload.take() {
            let _ = std::fs::remove_file(&u.part);
        }
        let Some(name) = safe_name(name) else {
            return WorkerMsg::UploadError(format!("unsafe file name {name:.80}"));
        };
        if size > MAX_UPLOAD {
            return WorkerMsg::UploadError(format!("{size} bytes is more than this worker accepts"));
        }
        let mut suffix = [0u8; 8];
        if crate::random_bytes(&mut suffix).is_err() {
            return WorkerMsg::UploadError("the worker cannot name the upload".into());
        }
        let incoming = self.uploads_dir().join("incoming");
        if let Err(e) = std::fs::create_dir_all(&incoming) {
            return WorkerMsg::UploadError(format!("Cannot create the upload directory: {e}"));
        }
        let part = incoming.join(format!("{}.part", suffix.iter().map(|b| format!("{b:02x}")).collect::<String>()));
        let file = match std::fs::File::create(&part) {
            Ok(f) => f,
            Err(e) => return WorkerMsg::UploadError(format!("Cannot open file for writing: {e}")),
        };
        *upload = Some(Upload {
            part,
            name,
            file,
            size,
            received: 0,
            sha: sha2::Sha256::new(),
            claimed,
            last_progress: Instant::now(),
            failed: None,
        });
        WorkerMsg::UploadReady
    }

    pub(super) fn upload_chunk(&self, c: &PeerConnection<R>, upload: &mut Option<Upload>, bytes: &[u8]) {
        let Some(u) = upload.as_mut() else {
            tracing::debug!(bytes = bytes.len(), "binary data outside an upload dropped");
            return;
        };
        if u.failed.is_some() {
            return;
        }
        if u.received + bytes.len() as u64 > u.size {
            u.failed = Some(format!("Size mismatch: more than the announced {} bytes", u.size));
            return;
        }
        if let Err(e) = u.file.write_all(bytes) {
            u.failed = Some(format!("Write error: {e}"));
            return;
        }
        u.sha.update(bytes);
        u.received += bytes.len() as u64;
        if u.last_progress.elapsed() >= UPLOAD_PROGRESS_EVERY {
            u.last_progress = Instant::now();
            let _ = c.send_upstream_text(&WorkerMsg::UploadProgress { received: u.received, total: u.size }.encode());
        }
    }

    pub(super) async fn upload_end(&self, upload: Option<Upload>) -> WorkerMsg {
        let Some(mut u) = upload else { return WorkerMsg::UploadError("no upload is under way".into()) };
        let fail = |u: &Upload, why: String| {
            let _ = std::fs::remove_file(&u.part);
            WorkerMsg::UploadError(why)
        };
        if let Some(why) = u.failed.take() {
            return fail(&u, why);
        }
        if u.received != u.size {
            return fail(&u, format!("Size mismatch: expected {}, got {}", u.size, u.received));
        }
        let got = format!("{:x}", u.sha.clone().finalize());
        if let Some(claimed) = &u.claimed {
            if *claimed != got {
                return fail(&u, format!("the file's SHA-256 is {got}, not the {claimed} announced"));
            }
        }
        let dir = self.uploads_dir().join(&got);
        let dest = dir.join(&u.name);
        // fsync of a multi-GB file takes seconds: not on the runtime's threads.
        let (file, part, to) = (u.file.try_clone(), u.part.clone(), dest.clone());
        let stored = R::spawn_blocking(move || -> std::io::Result<()> {
            file?.sync_all()?;
            std::fs::create_dir_all(to.parent().unwrap_or(Path::new(".")))?;
            std::fs::rename(part, to)
        })
        .await;
        match stored {
            Some(Ok(())) => {}
            Some(Err(e)) => return fail(&u, format!("cannot store the upload: {e}")),
            None => return fail(&u, "cannot store the upload: the blocking pool failed".into()),
        }
        tracing::info!(name = %u.name, bytes = u.size, sha256 = %got, "upstream upload stored");
        WorkerMsg::UploadComplete(dest.canonicalize().unwrap_or(dest).display().to_string())
    }
}

/// The base name of an uploaded file, if it is a safe single component (no `..`, no slashes, no
/// control or look-alike characters).
pub(super) fn safe_name(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next()?.trim();
    sleap_rtc_core::transfer::validate_name(base).ok()?;
    (!base.is_empty() && base != "." && base != "..").then(|| base.to_owned())
}

#[cfg(test)]
mod tests {
    use super::safe_name;

    #[test]
    fn upload_names_are_reduced_to_a_safe_base_name() {
        assert_eq!(safe_name("labels.pkg.slp").as_deref(), Some("labels.pkg.slp"));
        assert_eq!(safe_name("my labels.pkg.slp").as_deref(), Some("my labels.pkg.slp"));
        // Upstream joined the name onto the destination as sent: `../` escaped it.
        assert_eq!(safe_name("../../etc/cron.d/x").as_deref(), Some("x"));
        assert_eq!(safe_name("C:\\Users\\me\\labels.slp").as_deref(), Some("labels.slp"));
        for bad in ["", "..", ".", "a/", "nul\0.slp", "\u{202e}gpj.slp"] {
            assert_eq!(safe_name(bad), None, "{bad:?}");
        }
    }
}
