//! The connection task's file work: preparing the destination of a transfer, positioned reads
//! and `.part` writes, and hashing and committing on the blocking pool.

use super::*;

impl<R: Runtime> Driver<R> {
    pub(super) fn prepare(&mut self, transfer: u32, manifest: Manifest) {
        if self.incoming.contains_key(&transfer) {
            // Still finishing an earlier transfer with this id (e.g. a rename after a cancel).
            self.session.prepared(
                transfer,
                Err(TransferError::BadManifest("a transfer with this id is still finishing".into())),
            );
            return;
        }
        let Some(w) = self.receive_waiters.pop_front() else {
            self.unclaimed.push_back((transfer, manifest));
            return;
        };
        match files::prepare_receive(&w.dir, &manifest) {
            Ok(p) => {
                let n = manifest.files.len();
                let total = manifest.total_size();
                let _ = w.progress.send(Progress { total_bytes: total, files_total: n as u32, ..Progress::default() });
                self.incoming.insert(
                    transfer,
                    InFiles {
                        manifest,
                        parts: p.parts,
                        finals: p.finals,
                        handles: (0..n).map(|_| None).collect(),
                        committed: Vec::new(),
                        failed: Vec::new(),
                        progress: w.progress,
                        reply: Some(w.reply),
                    },
                );
                self.session.prepared(transfer, Ok(p.existing));
            }
            Err(e) => {
                let _ = w.reply.send(Err(TransferFailure::Session(e.clone().into())));
                self.answered.insert(transfer);
                self.session.prepared(transfer, Err(e));
            }
        }
    }

    pub(super) fn on_io(&mut self, io: IoRequest) {
        if !matches!(io, IoRequest::Read { .. } | IoRequest::Write { .. }) {
            tracing::debug!(request = ?IoName(&io), "file request");
        }
        match io {
            IoRequest::Read { transfer, chunk } => {
                let data = match self.outgoing.get_mut(&transfer) {
                    Some(o) => read_chunk(o, chunk.file as usize, chunk.offset, chunk.len).map_err(|e| e.to_string()),
                    None => Err("unknown transfer".into()),
                };
                self.session.read_done(transfer, chunk, data);
            }
            IoRequest::Prepare { transfer, manifest } => self.prepare(transfer, manifest),
            IoRequest::Write { transfer, file, offset, data } => {
                let res = match self.incoming.get_mut(&transfer) {
                    Some(i) => write_part(i, file as usize, offset, &data).map_err(|e| e.to_string()),
                    None => Err("unknown transfer".into()),
                };
                self.session.write_done(transfer, file, offset + data.len() as u64, res);
            }
            IoRequest::Verify { transfer, file } => {
                let Some(i) = self.incoming.get_mut(&transfer) else { return };
                // An empty file gets no writes: create its .part so there is something to hash.
                if i.handles[file as usize].is_none() {
                    if let Err(e) = write_part(i, file as usize, 0, &[]) {
                        self.session.verified(transfer, file, Err(e.to_string()));
                        return;
                    }
                }
                // Close our write handle so the hash sees everything written.
                i.handles[file as usize] = None;
                let part = i.parts[file as usize].clone();
                let tx = self.io_tx.clone();
                R::spawn(async move {
                    let result = R::spawn_blocking(move || files::hash_file(&part).map_err(|e| e.to_string()))
                        .await
                        .unwrap_or_else(|| Err("hashing panicked".into()));
                    if let Some(tx) = tx {
                        let _ = tx.send(IoDone::Verified { transfer, file, result });
                    }
                });
            }
            IoRequest::Commit { transfer, file } => {
                let Some(i) = self.incoming.get(&transfer) else { return };
                let (part, fin) = (i.parts[file as usize].clone(), i.finals[file as usize].clone());
                let tx = self.io_tx.clone();
                R::spawn(async move {
                    let result = R::spawn_blocking(move || files::commit(&part, &fin).map_err(|e| e.to_string()))
                        .await
                        .unwrap_or_else(|| Err("commit panicked".into()));
                    if let Some(tx) = tx {
                        let _ = tx.send(IoDone::Committed { transfer, file, result });
                    }
                });
            }
            IoRequest::Discard { transfer, file } => {
                if let Some(i) = self.incoming.get_mut(&transfer) {
                    i.handles[file as usize] = None;
                    let _ = std::fs::remove_file(&i.parts[file as usize]);
                }
            }
        }
    }

    pub(super) fn on_io_done(&mut self, d: IoDone) {
        match d {
            IoDone::Verified { transfer, file, result } => self.session.verified(transfer, file, result),
            IoDone::Committed { transfer, file, result } => {
                if let Some(i) = self.incoming.get_mut(&transfer) {
                    if let (Ok(()), Some(fin)) = (&result, i.finals.get(file as usize)) {
                        i.committed.push(fin.clone());
                    }
                }
                // The session reports the file (and, after the last one, the transfer) to the
                // sender only now, so "ok" always means "stored under its final name".
                self.session.committed(transfer, file, result);
            }
        }
    }
}

/// Debug form of an `IoRequest` without the data.
pub(super) struct IoName<'a>(&'a IoRequest);

impl std::fmt::Debug for IoName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IoRequest::Read { transfer, chunk } => write!(f, "read {transfer} {chunk:?}"),
            IoRequest::Prepare { transfer, manifest } => {
                write!(f, "prepare {transfer} ({} files)", manifest.files.len())
            }
            IoRequest::Write { transfer, file, offset, data } => {
                write!(f, "write {transfer} {file}@{offset}+{}", data.len())
            }
            IoRequest::Verify { transfer, file } => write!(f, "verify {transfer} {file}"),
            IoRequest::Commit { transfer, file } => write!(f, "commit {transfer} {file}"),
            IoRequest::Discard { transfer, file } => write!(f, "discard {transfer} {file}"),
        }
    }
}

pub(super) fn read_chunk(o: &mut OutFiles, file: usize, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let path = o.set.paths.get(file).ok_or_else(|| io::Error::other("no such file"))?;
    let slot = o.handles.get_mut(file).ok_or_else(|| io::Error::other("no such file"))?;
    if slot.is_none() {
        *slot = Some(File::open(path)?);
    }
    let f = slot.as_ref().ok_or_else(|| io::Error::other("file not open"))?;
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = read_at(f, &mut buf[filled..], offset + filled as u64)?;
        if n == 0 {
            buf.truncate(filled);
            break;
        }
        filled += n;
    }
    Ok(buf)
}

pub(super) fn write_part(i: &mut InFiles, file: usize, offset: u64, data: &[u8]) -> io::Result<()> {
    let path = i.parts.get(file).ok_or_else(|| io::Error::other("no such file"))?;
    let slot = i.handles.get_mut(file).ok_or_else(|| io::Error::other("no such file"))?;
    if slot.is_none() {
        *slot = Some(open_part(path)?);
    }
    let f = slot.as_ref().ok_or_else(|| io::Error::other("file not open"))?;
    write_all_at(f, data, offset)
}

/// Opens a `.part` for writing, never through a symlink planted where it goes.
#[cfg(unix)]
fn open_part(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().create(true).truncate(false).write(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Windows: FILE_FLAG_OPEN_REPARSE_POINT opens a symlink itself, not its target; a symlink
/// found there is refused.
#[cfg(windows)]
fn open_part(path: &Path) -> io::Result<File> {
    use std::os::windows::fs::OpenOptionsExt;
    const FILE_FLAG_OPEN_REPARSE_POINT: u32 = 0x0020_0000;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(FILE_FLAG_OPEN_REPARSE_POINT)
        .open(path)?;
    if f.metadata()?.file_type().is_symlink() {
        return Err(io::Error::other(format!("{} is a symlink", path.display())));
    }
    Ok(f)
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(f, buf, offset)
}

#[cfg(unix)]
fn write_all_at(f: &File, data: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, data, offset)
}

/// Windows' positional reads move the file cursor, which nothing here relies on.
#[cfg(windows)]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(f, buf, offset)
}

#[cfg(windows)]
fn write_all_at(f: &File, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    while !data.is_empty() {
        match std::os::windows::fs::FileExt::seek_write(f, data, offset)? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => {
                data = &data[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}
