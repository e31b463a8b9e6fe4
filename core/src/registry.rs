//! The room model registry (seed `002`): every model trained in a room, with its files, aliases
//! and tags, in one `{room_id}/manifest.json` next to `{room_id}/models/{model_id}/...`.
//!
//! Everything here is pure: the manifest types, the operations on them, alias and prefix
//! resolution, content-derived model ids, and the optimistic-concurrency loop as a state machine
//! ([`Update`]) that a store drives: read (manifest, version) → apply → conditional write → on a
//! conflict read again and re-apply, a bounded number of times with jittered backoff.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;

/// Schema version written by this code. Manifests with another major version are refused
/// rather than silently rewritten.
pub const MANIFEST_VERSION: &str = "1.0";
/// Largest manifest accepted (a room with thousands of models is still far below).
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;
pub const MAX_NAME_LEN: usize = 64;
pub const MAX_NOTES_LEN: usize = 4096;
/// Shortest id prefix accepted for lookup.
pub const MIN_PREFIX: usize = 4;

/// One file of a model, verified on download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFile {
    /// Relative to the model's directory (`best.ckpt`, `training_config.yaml`).
    pub name: String,
    pub size: u64,
    pub blake3: String,
}

/// How a model was trained.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainingInfo {
    #[serde(default)]
    pub dataset_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_duration_sec: Option<f64>,
}

/// One model, as the seed's schema has it (plus `files`, which the seed left implicit).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ModelEntry {
    pub id: String,
    /// The first alias given (kept for the seed's readers; `Manifest::aliases` is authoritative).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(default)]
    pub model_type: String,
    #[serde(default)]
    pub trained_at: String,
    #[serde(default)]
    pub trained_by: String,
    #[serde(default)]
    pub trained_on_worker: String,
    /// Where the files live, as the store names it (`s3://bucket/prefix/room/models/id/` or a path).
    #[serde(default)]
    pub s3_path: String,
    #[serde(default)]
    pub checkpoint_path: String,
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default)]
    pub available_on_workers: Vec<String>,
    #[serde(default)]
    pub notes: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub training: TrainingInfo,
    #[serde(default)]
    pub files: Vec<ModelFile>,
}

/// `{room_id}/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: String,
    pub room_id: String,
    #[serde(default)]
    pub updated_at: String,
    #[serde(default)]
    pub models: BTreeMap<String, ModelEntry>,
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
}

impl Manifest {
    pub fn new(room_id: &str) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION.into(),
            room_id: room_id.into(),
            updated_at: String::new(),
            models: BTreeMap::new(),
            aliases: BTreeMap::new(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses and checks a stored manifest. A corrupt one is an error, never an empty registry
    /// (writing an empty one over it would lose every model).
    pub fn decode(bytes: &[u8], room_id: &str) -> Result<Manifest, RegistryError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(RegistryError::Corrupt(format!("manifest of {} bytes exceeds the limit", bytes.len())));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt(e.to_string()))?;
        if m.version.split('.').next() != MANIFEST_VERSION.split('.').next() {
            return Err(RegistryError::Corrupt(format!(
                "manifest version {} is not supported (this sleap-rtc writes {MANIFEST_VERSION})",
                m.version
            )));
        }
        if m.room_id != room_id {
            return Err(RegistryError::Corrupt(format!("manifest is for room {}, not {room_id}", m.room_id)));
        }
        m.check().map_err(RegistryError::Corrupt)?;
        Ok(m)
    }

    /// Internal consistency: keys match ids, aliases point at models, and every id, alias and file
    /// name is safe to use as a path component (anyone who can write the store writes these).
    pub fn check(&self) -> Result<(), String> {
        for (k, m) in &self.models {
            if k != &m.id {
                return Err(format!("model key {k} holds id {}", m.id));
            }
            check_name("model id", &m.id).map_err(|e| e.to_string())?;
            for f in &m.files {
                crate::transfer::validate_name(&f.name).map_err(|e| format!("model {}: {e}", m.id))?;
            }
        }
        for (a, id) in &self.aliases {
            check_name("alias", a).map_err(|e| e.to_string())?;
            if !self.models.contains_key(id) {
                return Err(format!("alias {a} points at missing model {id}"));
            }
        }
        Ok(())
    }

    /// Finds a model by exact id, alias, or unique id prefix (≥ 4 characters).
    pub fn resolve(&self, query: &str) -> Result<&ModelEntry, RegistryError> {
        if let Some(m) = self.models.get(query) {
            return Ok(m);
        }
        if let Some(id) = self.aliases.get(query) {
            return self.models.get(id).ok_or_else(|| RegistryError::NotFound(query.into()));
        }
        if query.len() >= MIN_PREFIX {
            let hits: Vec<&ModelEntry> = self
                .models
                .range(query.to_owned()..)
                .take_while(|(k, _)| k.starts_with(query))
                .map(|(_, m)| m)
                .collect();
            match hits.as_slice() {
                [one] => return Ok(one),
                [] => {}
                many => {
                    let ids = many.iter().map(|m| m.id.clone()).collect();
                    return Err(RegistryError::Ambiguous { query: query.into(), ids });
                }
            }
        }
        Err(RegistryError::NotFound(query.into()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("no model {0} in this room (by id, alias or id prefix)")]
    NotFound(String),
    #[error("{query} matches several models: {}", .ids.join(", "))]
    Ambiguous { query: String, ids: Vec<String> },
    #[error("the alias {0} is taken by model {1} (remove it first)")]
    AliasTaken(String, String),
    #[error("invalid {0}: {1}")]
    Invalid(&'static str, String),
    #[error("the stored manifest is corrupt: {0}; it was left untouched")]
    Corrupt(String),
    #[error("gave up after {0} conflicting concurrent updates")]
    TooManyConflicts(u32),
}

/// Names (aliases, tags, worker ids) are short and printable.
/// They are also path components, so they never start with a dot (no `.`, `..`, hidden files).
pub fn check_name(what: &'static str, s: &str) -> Result<(), RegistryError> {
    let ok = !s.is_empty()
        && !s.starts_with('.')
        && s.len() <= MAX_NAME_LEN
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(
            what,
            format!("{s:.80?}: 1-64 of letters, digits, - _ . : @, not starting with a dot"),
        ))
    }
}

/// A model id from what determines the model: the training config and the dataset. The same
/// training published twice is one model.
pub fn model_id(config: &str, dataset_hash: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"sleap-rtc model v1\0");
    h.update(&(config.len() as u64).to_le_bytes());
    h.update(config.as_bytes());
    h.update(dataset_hash.as_bytes());
    h.finalize().to_hex()[..16].to_owned()
}

/// A change to a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Adds a model, or, if it is already there (same id), merges workers and tags into it.
    AddModel(Box<ModelEntry>),
    SetAlias {
        alias: String,
        id: String,
    },
    RemoveAlias {
        alias: String,
    },
    Tag {
        id: String,
        tag: String,
    },
    Untag {
        id: String,
        tag: String,
    },
    SetNotes {
        id: String,
        notes: String,
    },
    RemoveModel {
        id: String,
    },
    AddWorker {
        id: String,
        worker: String,
    },
    RemoveWorker {
        id: String,
        worker: String,
    },
}

/// Applies `op`. Returns whether anything changed (an unchanged manifest need not be written).
/// On error the manifest is unchanged.
pub fn apply(m: &mut Manifest, op: &Op, now: &str) -> Result<bool, RegistryError> {
    let changed = match op {
        Op::AddModel(e) => {
            check_name("model id", &e.id)?;
            for t in &e.tags {
                check_name("tag", t)?;
            }
            // What `check` refuses on read must be refused on write: one bad entry would make
            // the whole manifest "corrupt" for every reader (found by fuzz/registry_manifest).
            for f in &e.files {
                crate::transfer::validate_name(&f.name)
                    .map_err(|err| RegistryError::Invalid("file name", err.to_string()))?;
            }
            match m.models.get_mut(&e.id) {
                Some(have) => {
                    let before = have.clone();
                    for w in &e.available_on_workers {
                        add_unique(&mut have.available_on_workers, w);
                    }
                    for t in &e.tags {
                        add_unique(&mut have.tags, t);
                    }
                    *have != before
                }
                None => {
                    let mut e = (**e).clone();
                    if let Some(a) = &e.alias {
                        check_name("alias", a)?;
                        if let Some(other) = m.aliases.get(a) {
                            return Err(RegistryError::AliasTaken(a.clone(), other.clone()));
                        }
                        m.aliases.insert(a.clone(), e.id.clone());
                    }
                    e.tags.dedup();
                    m.models.insert(e.id.clone(), e);
                    true
                }
            }
        }
        Op::SetAlias { alias, id } => {
            check_name("alias", alias)?;
            let id = m.resolve(id)?.id.clone();
            match m.aliases.get(alias) {
                Some(cur) if *cur == id => false,
                Some(cur) => return Err(RegistryError::AliasTaken(alias.clone(), cur.clone())),
                None => {
                    m.aliases.insert(alias.clone(), id.clone());
                    if let Some(e) = m.models.get_mut(&id) {
                        e.alias.get_or_insert_with(|| alias.clone());
                    }
                    true
                }
            }
        }
        Op::RemoveAlias { alias } => match m.aliases.remove(alias) {
            None => false,
            Some(id) => {
                if let Some(e) = m.models.get_mut(&id) {
                    if e.alias.as_deref() == Some(alias.as_str()) {
                        e.alias = m.aliases.iter().find(|(_, v)| **v == id).map(|(k, _)| k.clone());
                    }
                }
                true
            }
        },
        Op::Tag { id, tag } => {
            check_name("tag", tag)?;
            add_unique(&mut entry_mut(m, id)?.tags, tag)
        }
        Op::Untag { id, tag } => remove_all(&mut entry_mut(m, id)?.tags, tag),
        Op::SetNotes { id, notes } => {
            if notes.len() > MAX_NOTES_LEN {
                return Err(RegistryError::Invalid("notes", format!("longer than {MAX_NOTES_LEN} bytes")));
            }
            let e = entry_mut(m, id)?;
            let changed = e.notes != *notes;
            e.notes = notes.clone();
            changed
        }
        Op::RemoveModel { id } => {
            let id = m.resolve(id)?.id.clone();
            m.models.remove(&id);
            m.aliases.retain(|_, v| *v != id);
            true
        }
        Op::AddWorker { id, worker } => {
            check_name("worker", worker)?;
            add_unique(&mut entry_mut(m, id)?.available_on_workers, worker)
        }
        Op::RemoveWorker { id, worker } => remove_all(&mut entry_mut(m, id)?.available_on_workers, worker),
    };
    if changed {
        m.updated_at = now.to_owned();
    }
    Ok(changed)
}

/// The model `query` (id, alias or prefix) names, for changing it.
fn entry_mut<'a>(m: &'a mut Manifest, query: &str) -> Result<&'a mut ModelEntry, RegistryError> {
    let id = m.resolve(query)?.id.clone();
    m.models.get_mut(&id).ok_or(RegistryError::NotFound(id))
}

/// Adds `item` unless present; whether it was added.
fn add_unique(list: &mut Vec<String>, item: &str) -> bool {
    let add = !list.iter().any(|x| x == item);
    if add {
        list.push(item.to_owned());
    }
    add
}

/// Removes every `item`; whether any was there.
fn remove_all(list: &mut Vec<String>, item: &str) -> bool {
    let n = list.len();
    list.retain(|x| x != item);
    list.len() != n
}

/// What a store must do next for an [`Update`].
#[derive(Debug, Clone, PartialEq)]
pub enum Step<V> {
    /// Read the manifest; answer with [`Update::on_read`].
    Read,
    /// Write `bytes` only if the stored version is still `expected` (`None`: only if there is no
    /// manifest yet); answer with [`Update::on_write`].
    Write { bytes: Vec<u8>, expected: Option<V> },
    /// Wait, then read again (another writer won the race).
    Backoff(Duration),
    /// Finished: the manifest as stored (unchanged if nothing needed writing).
    Done(Box<Manifest>),
}

/// The optimistic-concurrency loop for one batch of operations. `V` is the store's version token
/// (an S3 ETag, a local revision number).
#[derive(Debug)]
pub struct Update<V> {
    room_id: String,
    ops: Vec<Op>,
    now: String,
    attempts: u32,
    max_attempts: u32,
    base_backoff: Duration,
    pending: Option<Manifest>,
    _v: std::marker::PhantomData<V>,
}

impl<V: Clone> Update<V> {
    pub fn new(room_id: &str, ops: Vec<Op>, now: &str) -> Self {
        Update {
            room_id: room_id.into(),
            ops,
            now: now.into(),
            attempts: 0,
            max_attempts: 20,
            base_backoff: Duration::from_millis(20),
            pending: None,
            _v: std::marker::PhantomData,
        }
    }

    pub fn with_retries(mut self, max_attempts: u32, base_backoff: Duration) -> Self {
        self.max_attempts = max_attempts.max(1);
        self.base_backoff = base_backoff;
        self
    }

    pub fn start(&self) -> Step<V> {
        Step::Read
    }

    /// The stored manifest and its version, or `None` if the room has none yet. Re-applies every
    /// operation to what was read, so a concurrent writer's changes are kept.
    pub fn on_read(&mut self, stored: Option<(&[u8], V)>) -> Result<Step<V>, RegistryError> {
        self.attempts += 1;
        let (mut m, expected) = match stored {
            Some((bytes, v)) => (Manifest::decode(bytes, &self.room_id)?, Some(v)),
            None => (Manifest::new(&self.room_id), None),
        };
        let mut changed = false;
        for op in &self.ops {
            changed |= apply(&mut m, op, &self.now)?;
        }
        if !changed {
            return Ok(Step::Done(Box::new(m)));
        }
        let bytes = m.to_json();
        self.pending = Some(m);
        Ok(Step::Write { bytes, expected })
    }

    /// Result of the conditional write: `Ok(true)` written, `Ok(false)` the version had changed.
    /// `jitter` is a random number from the caller (the core has no randomness of its own).
    pub fn on_write(&mut self, written: bool, jitter: u64) -> Result<Step<V>, RegistryError> {
        if written {
            return Ok(Step::Done(Box::new(self.pending.take().unwrap_or_else(|| Manifest::new(&self.room_id)))));
        }
        self.pending = None;
        if self.attempts >= self.max_attempts {
            return Err(RegistryError::TooManyConflicts(self.attempts));
        }
        // Exponential with full jitter, capped at 2 s.
        let cap = (self.base_backoff.as_millis() as u64).saturating_mul(1 << self.attempts.min(10)).min(2000);
        Ok(Step::Backoff(Duration::from_millis(jitter % cap.max(1))))
    }
}
