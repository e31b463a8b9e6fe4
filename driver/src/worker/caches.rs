//! The upload and model caches on disk, and sending results back.

use super::*;

/// Keeps the upload cache (complete files and users' cut uploads) under its cap, dropping the
/// least recently modified entries.
pub(super) fn trim_upload_cache(dir: &Path, cap: u64) {
    let files_in = |d: &Path| -> Vec<(SystemTime, u64, PathBuf)> {
        let Ok(rd) = std::fs::read_dir(d) else { return vec![] };
        rd.flatten()
            .filter_map(|e| {
                let m = e.path().symlink_metadata().ok()?;
                m.is_file().then_some(())?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect()
    };
    let mut entries = files_in(dir);
    if let Ok(rd) = std::fs::read_dir(dir.join("partial")) {
        for user in rd.flatten() {
            entries.extend(files_in(&user.path()));
        }
    }
    evict_lru(entries, 0, cap, |p| std::fs::remove_file(p));
}

/// Evicts least recently used models from `cache` beyond `cap`, never those in `keep` (the
/// job's).
pub(super) fn trim_model_cache(cache: &Path, keep: &[String], cap: u64) {
    let Ok(rd) = std::fs::read_dir(cache) else { return };
    let dirs: Vec<(SystemTime, u64, PathBuf)> = rd
        .flatten()
        .filter(|e| !keep.iter().any(|k| e.file_name() == k.as_str()))
        .filter_map(|e| {
            let used = std::fs::metadata(e.path().join(".complete")).and_then(|m| m.modified()).ok()?;
            let size: u64 =
                std::fs::read_dir(e.path()).ok()?.flatten().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
            Some((used, size, e.path()))
        })
        .collect();
    let keep_size: u64 = keep
        .iter()
        .flat_map(|k| std::fs::read_dir(cache.join(k)).into_iter().flatten().flatten())
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum();
    evict_lru(dirs, keep_size, cap, |p| {
        tracing::info!(model = %p.display(), "evicted from the model cache");
        std::fs::remove_dir_all(p)
    });
}

/// An announced file the caches may hold: a well-formed BLAKE3 and a safe name.
pub(super) fn cacheable(f: &FileEntry) -> bool {
    f.blake3.len() == 64
        && f.blake3.bytes().all(|b| b.is_ascii_hexdigit())
        && sleap_rtc_core::transfer::validate_name(&f.name).is_ok()
}

/// Where a cut upload of `owner`'s is kept: `upload-cache/partial/<blake3(owner)[..16]>/`. Per
/// user because a partial file cannot be verified against its claimed hash: another user's
/// upload must never resume from bytes someone else sent.
fn partial_dir(cache_dir: &Path, owner: &str) -> PathBuf {
    cache_dir.join("partial").join(&blake3::hash(owner.as_bytes()).to_hex()[..16])
}

/// After a cut upload: moves each announced file's `.part` (what arrived) to the owner's partial
/// cache under its content hash, replacing a shorter one, so the next submission resumes it.
pub(super) fn keep_partial_uploads(cache_dir: &Path, input: &Path, owner: &str, files: &[FileEntry]) {
    let dir = partial_dir(cache_dir, owner);
    for f in files.iter().filter(|f| cacheable(f)) {
        let part = input.join(format!("{}{}", f.name, crate::files::PART_SUFFIX));
        let Ok(md) = std::fs::symlink_metadata(&part) else { continue };
        if !md.is_file() || md.len() == 0 || md.len() >= f.size {
            continue;
        }
        let kept = dir.join(format!("{}{}", f.blake3, crate::files::PART_SUFFIX));
        if std::fs::symlink_metadata(&kept).is_ok_and(|k| k.len() >= md.len()) {
            continue;
        }
        if std::fs::create_dir_all(&dir).is_ok() && std::fs::rename(&part, &kept).is_ok() {
            tracing::info!(file = %f.name, bytes = md.len(), of = f.size, "kept a cut upload for a resume");
        }
    }
}

/// Copies cached uploads (by content hash) into `input` as complete `.part`s, and moves the
/// owner's cut uploads there as partial ones (the transfer then sends only the rest).
pub(super) fn place_cached(cache_dir: &Path, input: &Path, owner: &str, files: &[FileEntry]) {
    for f in files.iter().filter(|f| cacheable(f)) {
        let cached = cache_dir.join(&f.blake3);
        let partial = partial_dir(cache_dir, owner).join(format!("{}{}", f.blake3, crate::files::PART_SUFFIX));
        let part = input.join(format!("{}{}", f.name, crate::files::PART_SUFFIX));
        if let Some(parent) = part.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        // symlink_metadata: a link planted in the cache must not make us copy whatever it
        // points at into the job.
        if std::fs::symlink_metadata(&cached).is_ok_and(|m| m.file_type().is_file() && m.len() == f.size) {
            // A copy, not a link: a resumed transfer appends to `.part`, which must never
            // write into the cache.
            let _ = std::fs::copy(&cached, &part);
        } else if !cached.exists()
            && std::fs::symlink_metadata(&partial).is_ok_and(|m| m.is_file() && m.len() < f.size)
            // A move: one job resumes it; a second submission at once starts over.
            && std::fs::rename(&partial, &part).is_ok()
        {
            tracing::info!(file = %f.name, "resuming a cut upload");
        }
    }
}

/// Removes least recently used entries `(last use, bytes, path)` until they and `pinned` bytes
/// (entries that must stay) fit in `cap`.
pub(super) fn evict_lru(
    mut entries: Vec<(SystemTime, u64, PathBuf)>,
    pinned: u64,
    cap: u64,
    remove: impl Fn(&Path) -> std::io::Result<()>,
) {
    let mut total = pinned + entries.iter().map(|e| e.1).sum::<u64>();
    entries.sort();
    for (_, size, path) in entries {
        if total <= cap {
            break;
        }
        if remove(&path).is_ok() {
            total -= size;
        }
    }
}

pub(super) async fn send_results<R: Runtime>(c: Arc<PeerConnection<R>>, dir: &Path, results: &[String]) {
    let paths: Vec<PathBuf> = results.iter().map(|r| dir.join(r)).collect();
    match c.send_files(&paths).await {
        Ok(t) => match t.finish().await {
            Ok(s) => tracing::info!(bytes = s.bytes, "results sent"),
            Err(e) => tracing::warn!(error = %e, "sending results failed; the client can fetch them with job attach"),
        },
        Err(e) => tracing::warn!(error = %e, "cannot send results"),
    }
}
