//! The upload and model caches on disk, and sending results back.

use super::*;

/// Keeps the upload cache under its cap, dropping the least recently modified entries.
pub(super) fn trim_upload_cache(dir: &Path, cap: u64) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let entries: Vec<(SystemTime, u64, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
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

/// Copies cached uploads (by content hash) into `input` as complete `.part`s.
pub(super) fn place_cached(cache_dir: &Path, input: &Path, files: &[FileEntry]) {
    for f in files {
        let cached = cache_dir.join(&f.blake3);
        let ok_hash = f.blake3.len() == 64 && f.blake3.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok_hash || sleap_rtc_core::transfer::validate_name(&f.name).is_err() {
            continue;
        }
        // symlink_metadata: a link planted in the cache must not make us copy whatever it
        // points at into the job.
        if std::fs::symlink_metadata(&cached).map(|m| m.file_type().is_file() && m.len() == f.size).unwrap_or(false) {
            let part = input.join(format!("{}{}", f.name, crate::files::PART_SUFFIX));
            if let Some(parent) = part.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            // A copy, not a link: a resumed transfer appends to `.part`, which must never
            // write into the cache.
            let _ = std::fs::copy(&cached, &part);
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
