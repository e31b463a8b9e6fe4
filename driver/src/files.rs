//! File-system side of transfers: building a manifest from paths, choosing safe destinations
//! for received files, hashing and committing.

use std::io;
use std::path::{Component, Path, PathBuf};

use sleap_rtc_core::transfer::{FileEntry, Manifest, TransferError, validate_name};

/// Files to send: the manifest and, for each entry, where to read it.
#[derive(Debug, Clone)]
pub struct SendSet {
    pub manifest: Manifest,
    pub paths: Vec<PathBuf>,
}

/// Suffix of files being received.
pub const PART_SUFFIX: &str = ".part";

/// Replaces `path` with `bytes` atomically and durably: a temporary file (named per process, so
/// concurrent writers do not share it), fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// BLAKE3 of a file, streamed (never the whole file in memory).
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize().to_hex().to_string())
}

/// Builds the manifest for `paths`: a file is sent under its file name, a directory with all
/// the regular files below it, under `DIRNAME/relative/path`. Symlinks inside directories are
/// skipped (they could point anywhere); hashing reads every file once.
pub fn build_send_set(paths: &[PathBuf]) -> io::Result<SendSet> {
    let mut set = SendSet { manifest: Manifest::default(), paths: Vec::new() };
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
        let base = p
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{}: no usable file name", p.display()))
            })?
            .to_owned();
        if meta.is_dir() {
            let mut files = Vec::new();
            walk(p, &mut files)?;
            files.sort();
            for f in files {
                let rel = f.strip_prefix(p).map_err(io::Error::other)?;
                let mut name = base.clone();
                for c in rel.components() {
                    let Component::Normal(s) = c else { continue };
                    name.push('/');
                    name.push_str(s.to_str().ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, format!("{}: name is not UTF-8", f.display()))
                    })?);
                }
                add(&mut set, name, f)?;
            }
        } else {
            add(&mut set, base, p.clone())?;
        }
    }
    Ok(set)
}

fn add(set: &mut SendSet, name: String, path: PathBuf) -> io::Result<()> {
    validate_name(&name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let size = std::fs::metadata(&path)?.len();
    let blake3 = hash_file(&path)?;
    set.manifest.files.push(FileEntry { name, size, blake3 });
    set.paths.push(path);
    Ok(())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            walk(&e.path(), out)?;
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}

/// Where each received file goes, and what earlier `.part` files hold.
pub struct Prepared {
    pub parts: Vec<PathBuf>,
    pub finals: Vec<PathBuf>,
    pub existing: Vec<u64>,
}

/// Maps every manifest name into `dir`, creating parent directories, and refuses any path that
/// would go through a symlink (a planted link must not redirect writes outside `dir`).
pub fn prepare_receive(dir: &Path, m: &Manifest) -> Result<Prepared, TransferError> {
    let io_err = |name: &str, e: io::Error| TransferError::BadManifest(format!("{name}: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| io_err(&dir.display().to_string(), e))?;
    let mut p = Prepared { parts: vec![], finals: vec![], existing: vec![] };
    for f in &m.files {
        validate_name(&f.name)?;
        let fin = dir.join(&f.name);
        let mut cur = dir.to_path_buf();
        let comps: Vec<&str> = f.name.split('/').collect();
        for (i, c) in comps.iter().enumerate() {
            cur.push(c);
            match std::fs::symlink_metadata(&cur) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(TransferError::UnsafeName { name: f.name.clone(), why: "path goes through a symlink" });
                }
                Ok(meta) if i + 1 < comps.len() && !meta.is_dir() => {
                    return Err(TransferError::UnsafeName { name: f.name.clone(), why: "a parent is not a directory" });
                }
                Ok(_) => {}
                Err(_) if i + 1 < comps.len() => std::fs::create_dir(&cur).map_err(|e| io_err(&f.name, e))?,
                Err(_) => {}
            }
        }
        let part = PathBuf::from(format!("{}{PART_SUFFIX}", fin.display()));
        let have = match std::fs::symlink_metadata(&part) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(TransferError::UnsafeName { name: f.name.clone(), why: "its .part is a symlink" });
            }
            // Longer than the file can be: a leftover of something else; start over.
            Ok(meta) if meta.is_file() && meta.len() > f.size => {
                std::fs::remove_file(&part).map_err(|e| io_err(&f.name, e))?;
                0
            }
            Ok(meta) if meta.is_file() => meta.len(),
            _ => 0,
        };
        p.parts.push(part);
        p.finals.push(fin);
        p.existing.push(have);
    }
    Ok(p)
}

/// Makes a verified `.part` durable and gives it its final name atomically.
pub fn commit(part: &Path, fin: &Path) -> io::Result<()> {
    std::fs::File::open(part)?.sync_all()?;
    if let Ok(meta) = std::fs::symlink_metadata(fin) {
        if meta.file_type().is_symlink() || meta.is_dir() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "destination is a symlink or directory"));
        }
    }
    std::fs::rename(part, fin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_becomes_one_manifest_under_its_name() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run1");
        std::fs::create_dir_all(run.join("viz")).unwrap();
        std::fs::write(run.join("best.ckpt"), b"weights").unwrap();
        std::fs::write(run.join("viz/a.png"), b"png").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", run.join("link")).unwrap();
        let set = build_send_set(&[run]).unwrap();
        let names: Vec<&str> = set.manifest.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, vec!["run1/best.ckpt", "run1/viz/a.png"]);
        assert_eq!(set.manifest.files[0].blake3, blake3::hash(b"weights").to_hex().to_string());
    }

    #[test]
    fn symlinks_in_the_destination_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("run1")).unwrap();
        let m = Manifest { files: vec![FileEntry { name: "run1/x".into(), size: 1, blake3: "0".repeat(64) }] };
        assert!(matches!(prepare_receive(d.path(), &m), Err(TransferError::UnsafeName { .. })));
        std::os::unix::fs::symlink(outside.path().join("t"), d.path().join("y.part")).unwrap();
        let m = Manifest { files: vec![FileEntry { name: "y".into(), size: 1, blake3: "0".repeat(64) }] };
        assert!(matches!(prepare_receive(d.path(), &m), Err(TransferError::UnsafeName { .. })));
    }

    #[test]
    fn a_part_longer_than_the_file_starts_over() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("y.part"), vec![7u8; 100]).unwrap();
        std::fs::write(d.path().join("z.part"), vec![7u8; 3]).unwrap();
        let e = |n: &str, size| FileEntry { name: n.into(), size, blake3: "0".repeat(64) };
        let m = Manifest { files: vec![e("y", 10), e("z", 10)] };
        let p = prepare_receive(d.path(), &m).unwrap();
        assert_eq!(p.existing, vec![0, 3]);
        assert!(!d.path().join("y.part").exists());
    }
}
