//! What upstream clients see of the worker's files: the mounts, listings, `FS_RESOLVE`'s search,
//! `FS_SCAN_DIR`, and `USE_WORKER_PATH` with the videos a `.slp` names. Everything resolves
//! symlinks and stays inside the mounts (and the upload area).

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
}
