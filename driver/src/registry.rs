//! Model registry stores and the operations on top of them: publish a run directory, pull a
//! model with verification, and apply manifest changes through the core's optimistic-concurrency
//! loop ([`sleap_rtc_core::registry::Update`]).
//!
//! [`LocalStore`] keeps `{root}/{room_id}/manifest.json` and `{root}/{room_id}/models/{id}/...` in
//! a directory. A manifest write is a compare-and-swap: under an exclusive `flock` on
//! `manifest.lock` the current manifest's BLAKE3 is compared with the version the writer read,
//! and only then is the new one written to a temporary file, synced and renamed into place. That
//! is safe across processes (and across machines only on filesystems with working `flock`).

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Runtime;

use sleap_rtc_core::registry::{Manifest, ModelEntry, ModelFile, Op, RegistryError, Step, TrainingInfo, Update};

#[cfg(feature = "s3")]
pub mod s3;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}")]
    Other(String),
    #[error("{name}: downloaded content does not match the registry's hash (expected {expected}, got {got})")]
    HashMismatch { name: String, expected: String, got: String },
    #[error(transparent)]
    NoRandomness(#[from] crate::NoRandomness),
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> StoreError {
    move |e| StoreError::Io(what.to_string(), e)
}

/// Runs blocking file work on `R`'s pool.
async fn blocking<R: Runtime, T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    R::spawn_blocking(f).await.unwrap_or_else(|| Err(StoreError::Other("a file operation panicked".into())))
}

/// A registry backend. Versions are opaque strings (an S3 ETag, a content hash).
pub trait Store: Send + Sync {
    /// The runtime the store's operations (and [`update`]'s backoff) run on.
    type Rt: Runtime;
    /// The manifest and its version, or `None` if the room has none.
    fn read_manifest(
        &self,
        room: &str,
    ) -> impl std::future::Future<Output = Result<Option<(Vec<u8>, String)>, StoreError>> + Send;
    /// Writes only if the stored version is `expected` (`None`: only if absent). `Ok(false)` when
    /// another writer got there first.
    fn write_manifest(
        &self,
        room: &str,
        bytes: &[u8],
        expected: Option<&str>,
    ) -> impl std::future::Future<Output = Result<bool, StoreError>> + Send;
    fn put_file(
        &self,
        room: &str,
        model: &str,
        name: &str,
        src: &Path,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
    fn get_file(
        &self,
        room: &str,
        model: &str,
        name: &str,
        dest: &Path,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
    /// Where a model's files live, for `s3_path` in the manifest.
    fn location(&self, room: &str, model: &str) -> String;
}

/// Room ids and model ids become path components: refuse anything else.
fn component(what: &str, s: &str) -> Result<(), StoreError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok { Ok(()) } else { Err(StoreError::Other(format!("invalid {what} {s:.80?}"))) }
}

/// A directory store (the embedded default).
#[derive(Debug, Clone)]
pub struct LocalStore<R> {
    root: PathBuf,
    rt: PhantomData<fn() -> R>,
}

impl<R: Runtime> LocalStore<R> {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore { root: root.into(), rt: PhantomData }
    }

    fn room_dir(&self, room: &str) -> Result<PathBuf, StoreError> {
        component("room id", room)?;
        Ok(self.root.join(room))
    }

    fn file_path(&self, room: &str, model: &str, name: &str) -> Result<PathBuf, StoreError> {
        component("model id", model)?;
        sleap_rtc_core::transfer::validate_name(name).map_err(|e| StoreError::Other(e.to_string()))?;
        Ok(self.room_dir(room)?.join("models").join(model).join(name))
    }
}

fn version_of(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Holds an exclusive lock on a file until dropped (closing the file releases it): `flock` on
/// Unix, `LockFileEx` on Windows, so members on either share a registry directory safely.
struct Lock {
    _file: std::fs::File,
}

impl Lock {
    fn take(path: &Path) -> std::io::Result<Lock> {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
        lock_exclusive(&f)?;
        Ok(Lock { _file: f })
    }
}

#[cfg(unix)]
fn lock_exclusive(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor we own; released when the file is closed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// std's `File::lock` is `LockFileEx` there. It is Rust 1.89's, above the workspace's 1.85:
/// the Windows client needs a 1.89 toolchain (README, "Windows").
#[cfg(windows)]
#[allow(clippy::incompatible_msrv)]
fn lock_exclusive(f: &std::fs::File) -> std::io::Result<()> {
    f.lock()
}

impl<R: Runtime> Store for LocalStore<R> {
    type Rt = R;

    async fn read_manifest(&self, room: &str) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        let p = self.room_dir(room)?.join("manifest.json");
        blocking::<R, _>(move || match std::fs::read(&p) {
            Ok(b) => {
                let v = version_of(&b);
                Ok(Some((b, v)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io(p.display().to_string(), e)),
        })
        .await
    }

    async fn write_manifest(&self, room: &str, bytes: &[u8], expected: Option<&str>) -> Result<bool, StoreError> {
        let dir = self.room_dir(room)?;
        let (bytes, expected) = (bytes.to_vec(), expected.map(str::to_owned));
        blocking::<R, _>(move || {
            std::fs::create_dir_all(&dir).map_err(io(dir.display()))?;
            let _lock = Lock::take(&dir.join("manifest.lock")).map_err(io("manifest.lock"))?;
            let path = dir.join("manifest.json");
            let current = match std::fs::read(&path) {
                Ok(b) => Some(version_of(&b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(StoreError::Io(path.display().to_string(), e)),
            };
            if current != expected {
                return Ok(false);
            }
            crate::files::write_atomic(&path, &bytes).map_err(io(path.display()))?;
            Ok(true)
        })
        .await
    }

    async fn put_file(&self, room: &str, model: &str, name: &str, src: &Path) -> Result<(), StoreError> {
        let dest = self.file_path(room, model, name)?;
        let src = src.to_path_buf();
        blocking::<R, _>(move || {
            if let Some(p) = dest.parent() {
                std::fs::create_dir_all(p).map_err(io(p.display()))?;
            }
            let tmp = dest.with_extension(format!("part.{}", std::process::id()));
            std::fs::copy(&src, &tmp).map_err(io(src.display()))?;
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(tmp.display()))?;
            std::fs::rename(&tmp, &dest).map_err(io(dest.display()))
        })
        .await
    }

    async fn get_file(&self, room: &str, model: &str, name: &str, dest: &Path) -> Result<(), StoreError> {
        let src = self.file_path(room, model, name)?;
        let dest = dest.to_path_buf();
        blocking::<R, _>(move || std::fs::copy(&src, dest).map(drop).map_err(io(src.display()))).await
    }

    fn location(&self, room: &str, model: &str) -> String {
        format!("{}/", self.root.join(room).join("models").join(model).display())
    }
}

/// A store chosen at run time from a `--registry` value: `s3://bucket/prefix` or a directory.
#[derive(Debug, Clone)]
pub enum AnyStore<R> {
    Local(LocalStore<R>),
    /// The AWS SDK is tokio-based: every call runs under `R::tokio_compat`.
    #[cfg(feature = "s3")]
    S3(s3::S3Store),
}

impl<R: Runtime> AnyStore<R> {
    pub async fn open(spec: &str) -> Result<AnyStore<R>, StoreError> {
        if spec.starts_with("s3://") {
            #[cfg(feature = "s3")]
            return Ok(AnyStore::S3(R::tokio_compat(s3::S3Store::connect(spec)).await?));
            #[cfg(not(feature = "s3"))]
            return Err(StoreError::Other("this build has no S3 support (feature `s3`)".into()));
        }
        Ok(AnyStore::Local(LocalStore::new(spec)))
    }
}

impl<R: Runtime> Store for AnyStore<R> {
    type Rt = R;

    async fn read_manifest(&self, room: &str) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        match self {
            AnyStore::Local(s) => s.read_manifest(room).await,
            #[cfg(feature = "s3")]
            AnyStore::S3(s) => R::tokio_compat(s.read_manifest(room)).await,
        }
    }

    async fn write_manifest(&self, room: &str, bytes: &[u8], expected: Option<&str>) -> Result<bool, StoreError> {
        match self {
            AnyStore::Local(s) => s.write_manifest(room, bytes, expected).await,
            #[cfg(feature = "s3")]
            AnyStore::S3(s) => R::tokio_compat(s.write_manifest(room, bytes, expected)).await,
        }
    }

    async fn put_file(&self, room: &str, model: &str, name: &str, src: &Path) -> Result<(), StoreError> {
        match self {
            AnyStore::Local(s) => s.put_file(room, model, name, src).await,
            #[cfg(feature = "s3")]
            AnyStore::S3(s) => R::tokio_compat(s.put_file(room, model, name, src)).await,
        }
    }

    async fn get_file(&self, room: &str, model: &str, name: &str, dest: &Path) -> Result<(), StoreError> {
        match self {
            AnyStore::Local(s) => s.get_file(room, model, name, dest).await,
            #[cfg(feature = "s3")]
            AnyStore::S3(s) => R::tokio_compat(s.get_file(room, model, name, dest)).await,
        }
    }

    fn location(&self, room: &str, model: &str) -> String {
        match self {
            AnyStore::Local(s) => s.location(room, model),
            #[cfg(feature = "s3")]
            AnyStore::S3(s) => s.location(room, model),
        }
    }
}

fn now_rfc3339() -> String {
    // Seconds precision, UTC, from the system clock (civil-from-days, no date crate needed).
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn jitter() -> Result<u64, crate::NoRandomness> {
    let mut b = [0u8; 8];
    crate::random_bytes(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Applies `ops` to a room's manifest with optimistic concurrency; returns the stored manifest.
pub async fn update<S: Store>(store: &S, room: &str, ops: Vec<Op>) -> Result<Manifest, StoreError> {
    let mut u: Update<String> = Update::new(room, ops, &now_rfc3339()).with_retries(30, Duration::from_millis(10));
    let mut step = u.start();
    loop {
        step = match step {
            Step::Read => {
                let stored = store.read_manifest(room).await?;
                u.on_read(stored.as_ref().map(|(b, v)| (&b[..], v.clone())))?
            }
            Step::Write { bytes, expected } => {
                let ok = store.write_manifest(room, &bytes, expected.as_deref()).await?;
                u.on_write(ok, jitter()?)?
            }
            Step::Backoff(d) => {
                crate::sleep::<S::Rt>(d).await;
                Step::Read
            }
            Step::Done(m) => return Ok(*m),
        };
    }
}

/// Reads a room's manifest (an empty one if the room has none yet).
pub async fn manifest<S: Store>(store: &S, room: &str) -> Result<Manifest, StoreError> {
    match store.read_manifest(room).await? {
        Some((b, _)) => Ok(Manifest::decode(&b, room)?),
        None => Ok(Manifest::new(room)),
    }
}

/// Files of a run directory that make up a model for inference (sleap-nn needs the checkpoint
/// and its training config); the rest (predictions, metrics, last.ckpt) stays behind.
pub const MODEL_FILES: &[&str] =
    &["best.ckpt", "training_config.yaml", "training_config.json", "initial_config.yaml", "training_log.csv"];

/// What a publisher knows about a run.
#[derive(Debug, Clone, Default)]
pub struct PublishInfo {
    pub trained_by: String,
    pub trained_on_worker: String,
    pub dataset_hash: String,
    pub epochs: Option<u32>,
    pub final_loss: Option<f64>,
    pub training_duration_sec: Option<f64>,
    pub alias: Option<String>,
    pub tags: Vec<String>,
}

/// A stable identity of the data a run was trained on: the train/val splits sleap-nn wrote into
/// the run directory. Empty if they are missing.
pub fn dataset_hash(run_dir: &Path) -> String {
    let mut h = blake3::Hasher::new();
    let mut any = false;
    for name in ["labels_gt.train.0.slp", "labels_gt.val.0.slp"] {
        if let Ok(b) = std::fs::read(run_dir.join(name)) {
            h.update(&b);
            any = true;
        }
    }
    if any { h.finalize().to_hex()[..16].to_owned() } else { String::new() }
}

/// Publishes a run directory: files first (so the manifest never names a model whose files are
/// missing), then the manifest entry. The model id comes from the training config and dataset,
/// so publishing the same run twice yields one model.
pub async fn publish<S: Store>(
    store: &S,
    room: &str,
    run_dir: &Path,
    info: PublishInfo,
) -> Result<ModelEntry, StoreError> {
    let dir = run_dir.to_path_buf();
    let (config, files): (String, Vec<(ModelFile, PathBuf)>) = blocking::<S::Rt, _>(move || {
        let cfg_path = dir.join("training_config.yaml");
        let config = std::fs::read_to_string(&cfg_path).map_err(io(cfg_path.display()))?;
        if !dir.join("best.ckpt").is_file() {
            return Err(StoreError::Other(format!("{} has no best.ckpt: not a trained model", dir.display())));
        }
        let mut out = Vec::new();
        for name in MODEL_FILES {
            let p = dir.join(name);
            if let Ok(meta) = std::fs::metadata(&p) {
                if meta.is_file() {
                    let blake3 = crate::files::hash_file(&p).map_err(io(p.display()))?;
                    out.push((ModelFile { name: (*name).to_owned(), size: meta.len(), blake3 }, p));
                }
            }
        }
        Ok((config, out))
    })
    .await?;
    let dataset = if info.dataset_hash.is_empty() { "unknown".to_owned() } else { info.dataset_hash.clone() };
    let id = sleap_rtc_core::registry::model_id(&config, &dataset);
    // The same config and dataset is the same model: if the room has it, its files stay as
    // published (a retraining's slightly different weights must not replace files whose hashes
    // the manifest records); only the entry is merged (workers, tags).
    let exists = manifest(store, room).await?.models.contains_key(&id);
    if !exists {
        for (f, p) in &files {
            store.put_file(room, &id, &f.name, p).await?;
        }
    }
    let model_type =
        sleap_rtc_core::job::bridge::ConfigInfo::parse(&config).ok().and_then(|c| c.model_type).unwrap_or_default();
    let location = store.location(room, &id);
    let entry = ModelEntry {
        id: id.clone(),
        alias: info.alias.clone(),
        model_type,
        trained_at: now_rfc3339(),
        trained_by: info.trained_by,
        trained_on_worker: info.trained_on_worker.clone(),
        s3_path: location.clone(),
        checkpoint_path: format!("{location}best.ckpt"),
        size_bytes: files.iter().map(|(f, _)| f.size).sum(),
        available_on_workers: if info.trained_on_worker.is_empty() { vec![] } else { vec![info.trained_on_worker] },
        notes: String::new(),
        tags: info.tags,
        training: TrainingInfo {
            dataset_hash: info.dataset_hash,
            epochs: info.epochs,
            final_loss: info.final_loss,
            training_duration_sec: info.training_duration_sec,
        },
        files: files.into_iter().map(|(f, _)| f).collect(),
    };
    let mut ops = vec![Op::AddModel(Box::new(entry))];
    if let Some(a) = info.alias {
        // Re-publishing the same model with its alias is a no-op; an alias held by another model
        // is an error the caller sees.
        ops.push(Op::SetAlias { alias: a, id: id.clone() });
    }
    let m = update(store, room, ops).await?;
    m.models.get(&id).cloned().ok_or_else(|| StoreError::Other("published model missing from the manifest".into()))
}

/// Downloads a model (by id, alias or prefix) into `dest/<id>/`, verifying every file's BLAKE3.
/// Files land under a temporary name and are renamed only once verified.
pub async fn pull<S: Store>(
    store: &S,
    room: &str,
    query: &str,
    dest: &Path,
) -> Result<(ModelEntry, PathBuf), StoreError> {
    let m = manifest(store, room).await?;
    let e = m.resolve(query)?.clone();
    let dir = dest.join(&e.id);
    let d = dir.clone();
    blocking::<S::Rt, _>(move || std::fs::create_dir_all(&d).map_err(io(d.display()))).await?;
    for f in &e.files {
        sleap_rtc_core::transfer::validate_name(&f.name).map_err(|err| StoreError::Other(err.to_string()))?;
        let fin = dir.join(&f.name);
        let part = dir.join(format!("{}.part", f.name));
        store.get_file(room, &e.id, &f.name, &part).await?;
        let (name, expected) = (f.name.clone(), f.blake3.clone());
        // Verified before it takes the final name: a bad download never looks like a model file.
        blocking::<S::Rt, _>(move || {
            let got = crate::files::hash_file(&part).map_err(io(part.display()))?;
            if got != expected {
                let _ = std::fs::remove_file(&part);
                return Err(StoreError::HashMismatch { name, expected, got });
            }
            std::fs::rename(&part, &fin).map_err(io(fin.display()))
        })
        .await?;
    }
    Ok((e, dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let s = now_rfc3339();
        assert_eq!(s.len(), 20);
        assert!(s.starts_with("20") && s.ends_with('Z'), "{s}");
    }

    // The store itself is exercised on both runtimes by the conformance suite
    // (`driver/conformance`, `registry_store`).
}
