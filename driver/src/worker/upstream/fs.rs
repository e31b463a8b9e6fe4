//! What upstream clients see of the worker's files: the mounts, listings, `FS_RESOLVE`'s search,
//! `FS_SCAN_DIR`, `USE_WORKER_PATH` with the videos a `.slp` names, and the two steps that fix
//! moved videos (`FS_RESOLVE_WITH_PREFIX`, then `FS_WRITE_SLP`). Everything resolves symlinks and
//! stays inside the mounts (and the upload area).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sleap_rtc_core::job::PathVerdict;
use sleap_rtc_core::upstream::{self as up, FsErrorCode, WorkerMsg};

use super::super::Worker;
use crate::Runtime;

impl<R: Runtime> Worker<R> {
    pub(super) fn mounts_json(&self) -> Value {
        let mounts: Vec<Value> = self
            .cfg
            .mounts
            .iter()
            .map(|m| {
                let label = m.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into());
                json!({"path": m.display().to_string(), "label": label})
            })
            .collect();
        Value::Array(mounts)
    }

    /// A path inside a mount, canonical; the error is what the client is told.
    pub(super) fn inside_mounts(&self, p: &str) -> Result<PathBuf, (FsErrorCode, String)> {
        if p.trim().is_empty() {
            return Err((FsErrorCode::InvalidRequest, "Path is required".into()));
        }
        self.locate(p, |_| false).map_err(|v| match v {
            PathVerdict::NotFound => (FsErrorCode::PathNotFound, format!("File not found: {p}")),
            _ => (FsErrorCode::AccessDenied, "Access denied: path is outside configured mounts".into()),
        })
    }

    pub(super) async fn use_worker_path(&self, p: &str) -> Vec<WorkerMsg> {
        match self.inside_mounts(p) {
            Err((FsErrorCode::AccessDenied, _)) => {
                vec![WorkerMsg::WorkerPathError("Path not within configured mounts".into())]
            }
            Err((_, m)) => vec![WorkerMsg::WorkerPathError(m)],
            Ok(real) => {
                let shown = real.display().to_string();
                let mut out = vec![WorkerMsg::WorkerPathOk(shown.clone())];
                // Always answered for a .slp: the client's path check waits for it.
                if shown.ends_with(".slp") {
                    out.push(WorkerMsg::FsCheckVideos(self.check_videos(&real).await));
                }
                out
            }
        }
    }

    /// The Python that can read a `.slp` (sleap-io): `--python`, or the interpreter named by the
    /// `sleap-nn` script's `#!` line.
    pub(super) fn sleap_io_python(&self) -> Option<PathBuf> {
        if let Some(p) = &self.cfg.python {
            return Some(p.clone());
        }
        let head = std::fs::read(&self.cfg.sleap_nn).ok()?;
        let line = head.split(|b| *b == b'\n').next()?;
        let interp = std::str::from_utf8(line.strip_prefix(b"#!")?).ok()?.split_whitespace().next()?;
        let path = PathBuf::from(interp);
        path.file_name()?.to_str()?.starts_with("python").then_some(path)
    }

    /// Upstream's `FS_CHECK_VIDEOS_RESPONSE`: which videos the labels name, which of them are on
    /// this machine (inside the mounts), which are missing, which are embedded. Read with sleap-io
    /// in a child process (bounded in time and output); without it, or if it fails, the answer
    /// says the check was not made rather than that nothing is missing.
    pub(super) async fn check_videos(&self, slp: &Path) -> Value {
        const SCRIPT: &str = r#"
import json, sys
import sleap_io as sio
labels = sio.load_slp(sys.argv[1], open_videos=False)
out = []
for v in labels.videos:
    f = v.filename if isinstance(v.filename, str) else (v.filename[0] if v.filename else "")
    meta = v.backend_metadata or {}
    out.append({"filename": f, "embedded": bool(meta.get("has_embedded_images"))})
print(json.dumps({"videos": out}))
"#;
        let shown = slp.display().to_string();
        let unchecked = |why: &str| {
            json!({"slp_path": shown, "total_videos": 0, "found": [], "missing": [], "accessible": 0,
                   "embedded": 0, "checked": false, "note": why})
        };
        let Some(python) = self.sleap_io_python() else {
            return unchecked("this worker has no Python with sleap-io (--python) to read the labels' videos");
        };
        let mut cmd = std::process::Command::new(&python);
        cmd.arg("-c").arg(SCRIPT).arg(slp).stdin(std::process::Stdio::null());
        let listed = match crate::output::<R>(cmd, Duration::from_secs(60)).await {
            Some((st, out)) if st.success() && out.len() < 4 << 20 => serde_json::from_slice::<Value>(&out).ok(),
            _ => None,
        };
        let Some(videos) = listed.as_ref().and_then(|v| v["videos"].as_array()) else {
            tracing::warn!(python = %python.display(), slp = %shown, "cannot list the videos of a .slp");
            return unchecked("the worker could not read the labels' video list");
        };
        let (mut found, mut missing, mut embedded) = (vec![], vec![], 0);
        for v in videos.iter().take(10_000) {
            let name = v["filename"].as_str().unwrap_or_default();
            if v["embedded"].as_bool() == Some(true) {
                embedded += 1;
                continue;
            }
            let base = Path::new(name).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match self.inside_mounts(name) {
                Ok(real) if real.is_file() => found.push(json!({"filename": base, "original_path": name,
                    "worker_path": real.display().to_string()})),
                _ => missing.push(json!({"filename": base, "original_path": name})),
            }
        }
        json!({"slp_path": shown, "total_videos": videos.len(), "accessible": found.len(), "embedded": embedded,
               "found": found, "missing": missing, "checked": true})
    }

    pub(super) fn list_dir(&self, p: &str, offset: usize) -> WorkerMsg {
        let dir = match self.inside_mounts(p) {
            Ok(d) => d,
            Err((code, m)) => return WorkerMsg::FsError(code, m),
        };
        let rd = match std::fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) => {
                return WorkerMsg::FsError(FsErrorCode::PathNotFound, format!("cannot list {}: {e}", dir.display()));
            }
        };
        let mut entries: Vec<(bool, String, u64, f64)> = rd
            .filter_map(Result::ok)
            .filter_map(|e| {
                let md = e.metadata().ok()?;
                let modified = md
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0.0, |d| d.as_secs_f64());
                Some((md.is_dir(), e.file_name().to_string_lossy().into_owned(), md.len(), modified))
            })
            .collect();
        entries.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.to_lowercase().cmp(&b.1.to_lowercase())));
        let total = entries.len();
        let page: Vec<Value> = entries
            .into_iter()
            .skip(offset)
            .take(up::LIST_PAGE)
            .map(|(is_dir, name, size, modified)| {
                json!({"name": name, "type": if is_dir { "directory" } else { "file" }, "size": size, "modified": modified})
            })
            .collect();
        WorkerMsg::FsList(json!({
            "path": dir.display().to_string(),
            "entries": page,
            "total_count": total,
            "has_more": offset.saturating_add(up::LIST_PAGE) < total,
        }))
    }

    /// `FS_RESOLVE`: the files in the mounts (or the one labelled `mount`) whose name matches,
    /// best first. The walk does not follow directory symlinks (no loops, no escape) and stops
    /// at the hit, depth and time limits of upstream.
    pub(super) async fn fs_resolve(
        &self,
        pattern: &str,
        size: Option<u64>,
        depth: Option<u32>,
        mount: Option<&str>,
    ) -> WorkerMsg {
        use up::resolve::{MAX_DEPTH, MAX_HITS, Query, QueryError, TIMEOUT_MS};
        let query = match Query::new(pattern, size) {
            Ok(q) => q,
            Err(e @ QueryError::TooBroad) => return WorkerMsg::FsError(FsErrorCode::PatternTooBroad, e.to_string()),
            Err(e) => return WorkerMsg::FsError(FsErrorCode::InvalidRequest, e.to_string()),
        };
        let label = |m: &PathBuf| m.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into());
        let roots: Vec<PathBuf> =
            self.cfg.mounts.iter().filter(|m| mount.is_none_or(|l| label(m) == l)).cloned().collect();
        if roots.is_empty() {
            return WorkerMsg::FsError(
                FsErrorCode::MountNotFound,
                format!("no mount labelled {:.64}", mount.unwrap_or("")),
            );
        }
        let depth = depth.unwrap_or(MAX_DEPTH).min(MAX_DEPTH);
        let walk = move || {
            let start = Instant::now();
            let deadline = start + Duration::from_millis(TIMEOUT_MS);
            let (mut hits, mut timed_out, mut truncated) = (Vec::new(), false, false);
            let mut stack: Vec<(PathBuf, u32)> = roots.into_iter().map(|r| (r, 0)).collect();
            'walk: while let Some((dir, d)) = stack.pop() {
                let Ok(rd) = std::fs::read_dir(&dir) else { continue };
                for e in rd.filter_map(Result::ok) {
                    if Instant::now() > deadline {
                        timed_out = true;
                        break 'walk;
                    }
                    let Ok(ft) = e.file_type() else { continue };
                    if ft.is_dir() {
                        if d < depth {
                            stack.push((e.path(), d + 1));
                        }
                        continue;
                    }
                    let Ok(md) = e.metadata() else { continue };
                    if !md.is_file() {
                        continue;
                    }
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let Some((kind, score)) = query.score(&name, md.len(), d) {
                        let modified = md
                            .modified()
                            .ok()
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map_or(0.0, |t| t.as_secs_f64());
                        hits.push(json!({"path": e.path().display().to_string(), "name": name, "size": md.len(),
                            "modified": modified, "match_type": kind.as_str(), "score": score}));
                        if hits.len() >= MAX_HITS {
                            truncated = true;
                            break 'walk;
                        }
                    }
                }
            }
            let score = |v: &Value| v["score"].as_f64().unwrap_or(0.0);
            hits.sort_by(|a, b| score(b).total_cmp(&score(a)));
            json!({"candidates": hits, "truncated": truncated, "timeout": timed_out,
                "search_time_ms": start.elapsed().as_millis() as u64})
        };
        match R::spawn_blocking(walk).await {
            Some(v) => WorkerMsg::FsResolve(v),
            None => WorkerMsg::FsError(FsErrorCode::InvalidRequest, "the search failed".into()),
        }
    }

    pub(super) fn scan_dir(&self, raw: &str) -> WorkerMsg {
        let v: Value = serde_json::from_str(raw).unwrap_or(Value::Null);
        let (Some(dir), Some(names)) =
            (v.get("directory").and_then(Value::as_str), v.get("filenames").and_then(Value::as_array))
        else {
            return WorkerMsg::FsError(FsErrorCode::InvalidRequest, "FS_SCAN_DIR needs directory and filenames".into());
        };
        let dir = match self.inside_mounts(dir) {
            Ok(d) => d,
            Err((code, m)) => return WorkerMsg::FsError(code, m),
        };
        let mut found = serde_json::Map::new();
        for n in names.iter().filter_map(Value::as_str).take(10_000) {
            // A bare file name only: no walking out of the directory.
            let ok = sleap_rtc_core::transfer::validate_name(n).is_ok() && !n.contains('/');
            let p = dir.join(n);
            let v = if ok && p.is_file() { Value::String(p.display().to_string()) } else { Value::Null };
            found.insert(n.to_owned(), v);
        }
        WorkerMsg::FsScanDir(json!({"directory": dir.display().to_string(), "found": found}))
    }

    /// `FS_RESOLVE_WITH_PREFIX`: the user located one missing video on this machine; the part of
    /// its path that changed is proposed for the other missing videos, each of which is looked up
    /// (inside the mounts) so the client can show which the change would fix.
    pub(super) fn resolve_with_prefix(&self, raw: &str) -> WorkerMsg {
        let v: Value = serde_json::from_str(raw).unwrap_or(Value::Null);
        let (Some(original), Some(new)) = (v["original_path"].as_str(), v["new_path"].as_str()) else {
            return WorkerMsg::FsError(
                FsErrorCode::InvalidRequest,
                "FS_RESOLVE_WITH_PREFIX needs original_path and new_path".into(),
            );
        };
        if let Err((code, m)) = self.inside_mounts(new) {
            return WorkerMsg::FsError(code, m);
        }
        let Some((old_prefix, new_prefix)) = up::prefix::changed(original, new) else {
            return WorkerMsg::FsError(
                FsErrorCode::InvalidRequest,
                "the located file has another name than the missing one: no prefix change explains it".into(),
            );
        };
        let (mut resolve, mut not) = (vec![], vec![]);
        let others = v["other_missing"].as_array().map(Vec::as_slice).unwrap_or_default();
        for other in others.iter().filter_map(Value::as_str).take(10_000) {
            match up::prefix::apply(other, &old_prefix, &new_prefix)
                .and_then(|p| self.inside_mounts(&p).ok())
                .filter(|p| p.is_file())
            {
                Some(p) => resolve.push(json!({"original": other, "resolved": p.display().to_string()})),
                None => not.push(Value::String(other.to_owned())),
            }
        }
        WorkerMsg::FsPrefixProposal(json!({"old_prefix": old_prefix, "new_prefix": new_prefix,
            "would_resolve": resolve, "would_not_resolve": not}))
    }

    /// `FS_WRITE_SLP`: a copy of a `.slp` whose videos point at the files the user located on this
    /// machine, written into a mount (upstream's `resolved_YYYYMMDD_<name>.slp`, or the client's
    /// `output_filename` cut to a bare name). Unlike upstream, every new video path must be a file
    /// inside the mounts, and nothing is overwritten: a taken name gets `_2`, `_3`, ... The file
    /// is written under a temporary name and linked into place, so a failed write leaves nothing.
    pub(super) async fn write_slp(&self, raw: &str) -> WorkerMsg {
        const SCRIPT: &str = r#"
import json, os, shutil, sys, time
import sleap_io as sio
src, out_dir, name = sys.argv[1], sys.argv[2], sys.argv[3]
with open(sys.argv[4]) as f:
    mapping = json.load(f)
labels = sio.load_slp(src, open_videos=False)
updated = 0
for v in labels.videos:
    if isinstance(v.filename, list):
        new = [mapping.get(f, f) for f in v.filename]
    else:
        new = mapping.get(v.filename, v.filename)
    if new != v.filename:
        v.replace_filename(new, open=False)
        updated += 1
if not name:
    name = "resolved_" + time.strftime("%Y%m%d") + "_" + os.path.basename(src)
stem = name[:-len(".pkg.slp")] if name.endswith(".pkg.slp") else name[:-len(".slp")]
ext = name[len(stem):]
tmp = os.path.join(out_dir, ".sleap-rtc-write-%d.slp" % os.getpid())
try:
    # Embedded frames keep pointing at their package rather than at an original video that may
    # be just as missing.
    sio.save_slp(labels, tmp, restore_original_videos=False, verbose=False)
    for i in range(1, 1000):
        out = os.path.join(out_dir, name if i == 1 else "%s_%d%s" % (stem, i, ext))
        try:
            os.link(tmp, out)
            break
        except FileExistsError:
            continue
        except OSError:
            # No hard links here (some network shares): an exclusive create still never
            # overwrites.
            try:
                dst = open(out, "xb")
            except FileExistsError:
                continue
            try:
                with dst, open(tmp, "rb") as written:
                    shutil.copyfileobj(written, dst)
            except BaseException:
                os.unlink(out)
                raise
            break
    else:
        raise RuntimeError("no free output name")
finally:
    if os.path.exists(tmp):
        os.unlink(tmp)
print(json.dumps({"output_path": out, "videos_updated": updated}))
"#;
        let fail = |m: String| WorkerMsg::FsWriteSlpError(json!({"error": m}));
        let v: Value = serde_json::from_str(raw).unwrap_or(Value::Null);
        let (Some(slp), Some(out_dir), Some(map)) =
            (v["slp_path"].as_str(), v["output_dir"].as_str(), v["filename_map"].as_object())
        else {
            return fail("FS_WRITE_SLP needs slp_path, output_dir and filename_map".into());
        };
        let slp = match self.inside_mounts(slp) {
            Ok(p) if p.is_file() && p.to_string_lossy().ends_with(".slp") => p,
            Ok(p) => return fail(format!("not a .slp file: {}", p.display())),
            Err((_, m)) => return fail(m),
        };
        // Into the lab's data (a mount proper), not the upload cache.
        let out_dir = match Path::new(out_dir).canonicalize() {
            Ok(d) if d.is_dir() && self.cfg.mounts.iter().any(|m| d.starts_with(m)) => d,
            Ok(d) if d.is_dir() => {
                return WorkerMsg::FsWriteSlpError(json!({"error": "Output directory is outside configured mounts",
                    "error_code": FsErrorCode::AccessDenied.as_str()}));
            }
            _ => return fail(format!("Output directory not found: {out_dir}")),
        };
        let mut mapping = serde_json::Map::new();
        for (old, new) in map.iter().take(10_000) {
            let located = new.as_str().map(|n| self.inside_mounts(n));
            match located {
                Some(Ok(real)) if real.is_file() => {
                    mapping.insert(old.clone(), Value::String(real.display().to_string()));
                }
                _ => return fail(format!("the new path for {old} is not a file inside the worker's mounts")),
            }
        }
        let name = match v["output_filename"].as_str().map(str::trim).filter(|n| !n.is_empty()) {
            None => String::new(),
            Some(n) => match super::upload::safe_name(n).filter(|n| !n.starts_with('.')) {
                Some(n) if n.ends_with(".slp") => n,
                Some(n) => format!("{n}.slp"),
                None => return fail(format!("not a usable file name: {n:.64}")),
            },
        };
        let Some(python) = self.sleap_io_python() else {
            return fail("this worker has no Python with sleap-io (--python) to write labels".into());
        };
        // In a file, not an argument: a map of many videos would pass the kernel's limit on one
        // argument (128 KiB).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let map_file = self.cfg.work_dir.join(format!(".slp-map-{}-{n}.json", std::process::id()));
        if let Err(e) = std::fs::write(&map_file, Value::Object(mapping).to_string()) {
            tracing::warn!(file = %map_file.display(), error = %e, "cannot write a video map");
            return fail("the worker could not prepare the rewrite".into());
        }
        let mut cmd = std::process::Command::new(&python);
        cmd.arg("-c").arg(SCRIPT).arg(&slp).arg(&out_dir).arg(&name).arg(&map_file).stdin(std::process::Stdio::null());
        let written = match crate::output::<R>(cmd, Duration::from_secs(300)).await {
            Some((st, out)) if st.success() => serde_json::from_slice::<Value>(&out).ok(),
            _ => None,
        };
        let _ = std::fs::remove_file(&map_file);
        match written {
            Some(v) if v["output_path"].is_string() => {
                tracing::info!(slp = %slp.display(), output = %v["output_path"], "wrote labels with located videos");
                WorkerMsg::FsWriteSlpOk(v)
            }
            _ => {
                tracing::warn!(python = %python.display(), slp = %slp.display(), "cannot write labels with new video paths");
                fail(format!("the worker could not write a copy of {}", slp.display()))
            }
        }
    }
}
