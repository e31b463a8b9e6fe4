//! The configuration files: the user's `~/.config/sleap-rtc/config.toml` and a project's
//! `./sleap-rtc.toml` (in the working directory, so a lab can commit one next to its data).
//!
//! Each setting comes from the first of: its flag, its environment variable, `./sleap-rtc.toml`,
//! the user's file. Clap resolves the first two; [`Settings`] the other two. A list (`mounts`,
//! `path_mappings`) is taken whole from the first file that has it, never merged, so a project
//! can narrow what a user's file allows.
//!
//! Files are read strictly (an unknown key is an error naming the file and the key: a typo must
//! not silently do nothing) and edited with `toml_edit`, which keeps the user's comments and order.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use toml_edit::{DocumentMut, Item, Table, TableLike, value};

/// The project file's name, looked for in the working directory only.
pub const PROJECT_FILE: &str = "sleap-rtc.toml";

/// One file's contents.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Signaling server URL.
    pub server: Option<String>,
    /// Default room id.
    pub room: Option<String>,
    /// The room's model registry (`s3://bucket/prefix` or a shared directory).
    pub registry: Option<String>,
    #[serde(default)]
    pub worker: WorkerFile,
    /// Local prefixes that the worker sees under another path (a shared drive mounted on both).
    pub path_mappings: Option<Vec<PathMapping>>,
}

/// The `[worker]` table: defaults of `sleap-rtc worker`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkerFile {
    pub name: Option<String>,
    pub work_dir: Option<PathBuf>,
    pub sleap_nn: Option<PathBuf>,
    pub python: Option<PathBuf>,
    pub device: Option<String>,
    pub mounts: Option<Vec<PathBuf>>,
    pub upload_cache_gb: Option<u64>,
    pub model_cache_gb: Option<u64>,
    pub keep_days: Option<u64>,
    pub jobs_disk_gb: Option<u64>,
    pub notify_url: Option<String>,
}

/// A local directory that the worker reaches as `worker`: a file under `local` is not uploaded,
/// the worker reads it in place.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PathMapping {
    pub local: PathBuf,
    pub worker: String,
}

/// Where a setting came from, for `config show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Project,
    User,
    Unset,
}

/// Both files, read.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub project: Option<(PathBuf, FileConfig)>,
    pub user: Option<(PathBuf, FileConfig)>,
}

/// `$SLEAP_RTC_CONFIG_DIR/config.toml`, else `$XDG_CONFIG_HOME/sleap-rtc/config.toml`, else
/// `~/.config/sleap-rtc/config.toml` (the credentials file lives beside it).
pub fn user_path() -> PathBuf {
    crate::creds::config_dir().join("config.toml")
}

/// `./sleap-rtc.toml`.
pub fn project_path() -> PathBuf {
    PathBuf::from(PROJECT_FILE)
}

fn read(path: &Path) -> Result<Option<FileConfig>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let cfg: FileConfig = toml_edit::de::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Some(cfg))
}

impl Settings {
    /// Reads `./sleap-rtc.toml` and the user's file; a missing file is no error, a malformed one is.
    pub fn load() -> Result<Settings> {
        Self::load_from(&project_path(), &user_path())
    }

    pub fn load_from(project: &Path, user: &Path) -> Result<Settings> {
        Ok(Settings {
            project: read(project)?.map(|c| (project.to_path_buf(), c)),
            user: read(user)?.map(|c| (user.to_path_buf(), c)),
        })
    }

    /// The first file's value of `get`, and which file it was.
    pub fn pick<T: Clone>(&self, get: impl Fn(&FileConfig) -> Option<T>) -> (Option<T>, Source) {
        for (src, f) in [(Source::Project, &self.project), (Source::User, &self.user)] {
            if let Some(v) = f.as_ref().and_then(|(_, c)| get(c)) {
                return (Some(v), src);
            }
        }
        (None, Source::Unset)
    }

    pub fn server(&self) -> Option<String> {
        self.pick(|c| c.server.clone()).0
    }

    pub fn room(&self) -> Option<String> {
        self.pick(|c| c.room.clone()).0
    }

    pub fn registry(&self) -> Option<String> {
        self.pick(|c| c.registry.clone()).0
    }

    // Only `sleap-rtc worker` and `doctor --worker` read it: both Unix-only.
    #[cfg_attr(not(unix), allow(dead_code))]
    pub fn worker<T: Clone>(&self, get: impl Fn(&WorkerFile) -> Option<T>) -> Option<T> {
        self.pick(|c| get(&c.worker)).0
    }

    pub fn path_mappings(&self) -> Vec<PathMapping> {
        self.pick(|c| c.path_mappings.clone()).0.unwrap_or_default()
    }

    /// Every key with its effective file value and source (flags and environment variables are
    /// shown by `config show` separately).
    pub fn entries(&self) -> Vec<(&'static str, Option<String>, Source)> {
        let s = |v: Option<String>| v;
        let p = |v: Option<PathBuf>| v.map(|p| p.display().to_string());
        let n = |v: Option<u64>| v.map(|n| n.to_string());
        let list = |v: Option<Vec<PathBuf>>| {
            v.map(|l| l.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
        };
        let maps = |v: Option<Vec<PathMapping>>| {
            v.map(|l| l.iter().map(|m| format!("{} → {}", m.local.display(), m.worker)).collect::<Vec<_>>().join(", "))
        };
        let e = |k, (v, src): (Option<String>, Source)| (k, v, src);
        vec![
            e("server", self.pick(|c| s(c.server.clone()))),
            e("room", self.pick(|c| s(c.room.clone()))),
            e("registry", self.pick(|c| s(c.registry.clone()))),
            e("worker.name", self.pick(|c| s(c.worker.name.clone()))),
            e("worker.work_dir", self.pick(|c| p(c.worker.work_dir.clone()))),
            e("worker.sleap_nn", self.pick(|c| p(c.worker.sleap_nn.clone()))),
            e("worker.python", self.pick(|c| p(c.worker.python.clone()))),
            e("worker.device", self.pick(|c| s(c.worker.device.clone()))),
            e("worker.mounts", self.pick(|c| list(c.worker.mounts.clone()))),
            e("worker.upload_cache_gb", self.pick(|c| n(c.worker.upload_cache_gb))),
            e("worker.model_cache_gb", self.pick(|c| n(c.worker.model_cache_gb))),
            e("worker.keep_days", self.pick(|c| n(c.worker.keep_days))),
            e("worker.jobs_disk_gb", self.pick(|c| n(c.worker.jobs_disk_gb))),
            e("worker.notify_url", self.pick(|c| s(c.worker.notify_url.clone()))),
            e("path_mappings", self.pick(|c| maps(c.path_mappings.clone()))),
        ]
    }
}

/// The keys `config set` and `config unset` accept, with what their values must be.
pub const KEYS: &[(&str, Kind)] = &[
    ("server", Kind::Url),
    ("room", Kind::Text),
    ("registry", Kind::Text),
    ("worker.name", Kind::Text),
    ("worker.work_dir", Kind::Path),
    ("worker.sleap_nn", Kind::Path),
    ("worker.python", Kind::Path),
    ("worker.device", Kind::Text),
    ("worker.upload_cache_gb", Kind::Number),
    ("worker.model_cache_gb", Kind::Number),
    ("worker.keep_days", Kind::Number),
    ("worker.jobs_disk_gb", Kind::Number),
    ("worker.notify_url", Kind::Text),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Url,
    Path,
    Number,
}

fn key_kind(key: &str) -> Result<Kind> {
    match KEYS.iter().find(|(k, _)| *k == key) {
        Some((_, kind)) => Ok(*kind),
        None if key == "worker.mounts" => bail!("use `sleap-rtc config add-mount DIR` / `remove-mount DIR`"),
        None if key == "path_mappings" => {
            bail!("use `sleap-rtc config add-path-mapping LOCAL WORKER` / `remove-path-mapping LOCAL`")
        }
        None => {
            bail!("unknown key {key:?}; the keys are: {}", KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", "))
        }
    }
}

/// A file opened for editing; written back by [`Edit::save`] (atomically, comments kept).
pub struct Edit {
    path: PathBuf,
    doc: DocumentMut,
}

impl Edit {
    pub fn open(path: &Path) -> Result<Edit> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let doc: DocumentMut = text.parse().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // Refuse to edit a file that would not load afterwards anyway.
        toml_edit::de::from_document::<FileConfig>(doc.clone())
            .map_err(|e| anyhow::anyhow!("{}: {e}; fix it first", path.display()))?;
        Ok(Edit { path: path.to_path_buf(), doc })
    }

    /// The table that holds `key` (`worker.x` → `[worker]`, made if missing) and the key's last part.
    fn table(&mut self, key: &str) -> Result<(&mut dyn TableLike, String)> {
        let Some((t, k)) = key.split_once('.') else { return Ok((self.doc.as_table_mut(), key.to_owned())) };
        let root = self.doc.as_table_mut();
        if root.get(t).is_none() {
            root.insert(t, Item::Table(Table::new()));
        }
        // `[worker]` or `worker = { ... }` both do; anything else failed the load check in `open`.
        let tbl = root.get_mut(t).and_then(Item::as_table_like_mut).with_context(|| format!("{t} is not a table"))?;
        Ok((tbl, k.to_owned()))
    }

    /// Sets `key` (one of [`KEYS`]) after checking the value.
    pub fn set(&mut self, key: &str, raw: &str) -> Result<()> {
        let item = match key_kind(key)? {
            Kind::Text if raw.trim().is_empty() => bail!("{key} must not be empty (use `config unset {key}`)"),
            Kind::Text => value(raw),
            Kind::Url => value(crate::jobs::ServerUrl::parse(raw)?.http),
            Kind::Path => value(absolute(Path::new(raw))?.display().to_string()),
            Kind::Number => value(
                raw.parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .with_context(|| format!("{key} must be a whole number ≥ 0, not {raw:?}"))?,
            ),
        };
        let (t, k) = self.table(key)?;
        t.insert(&k, item);
        Ok(())
    }

    /// Removes `key`; says whether it was set.
    pub fn unset(&mut self, key: &str) -> Result<bool> {
        if !matches!(key, "worker.mounts" | "path_mappings") {
            key_kind(key)?;
        }
        let (t, k) = self.table(key)?;
        Ok(t.remove(&k).is_some())
    }

    fn array(&mut self, key: &str) -> Result<&mut toml_edit::Array> {
        let (t, k) = self.table(key)?;
        if t.get(&k).is_none_or(|i| i.as_array().is_none()) {
            t.insert(&k, value(toml_edit::Array::new()));
        }
        t.get_mut(&k).and_then(Item::as_array_mut).with_context(|| format!("{key} is not a list"))
    }

    /// Adds a worker mount (absolute, must be a directory); false if it was already there.
    pub fn add_mount(&mut self, dir: &Path) -> Result<bool> {
        let dir = absolute(dir)?;
        if !dir.is_dir() {
            bail!("{}: not a directory", dir.display());
        }
        let s = dir.display().to_string();
        let arr = self.array("worker.mounts")?;
        if arr.iter().any(|v| v.as_str() == Some(s.as_str())) {
            return Ok(false);
        }
        arr.push(s);
        Ok(true)
    }

    /// Removes a worker mount; false if it was not there.
    pub fn remove_mount(&mut self, dir: &Path) -> Result<bool> {
        let s = absolute(dir)?.display().to_string();
        let arr = self.array("worker.mounts")?;
        let before = arr.len();
        arr.retain(|v| v.as_str() != Some(s.as_str()));
        Ok(arr.len() != before)
    }

    /// Maps a local directory to the worker's path for it (replacing a mapping of the same local
    /// directory).
    pub fn add_path_mapping(&mut self, local: &Path, worker: &str) -> Result<()> {
        let local = absolute(local)?;
        if !worker.starts_with('/') {
            bail!("the worker path must be absolute, not {worker:?}");
        }
        self.remove_path_mapping(&local)?;
        let mut t = toml_edit::InlineTable::new();
        t.insert("local", local.display().to_string().into());
        t.insert("worker", worker.trim_end_matches('/').to_owned().into());
        self.array("path_mappings")?.push(t);
        Ok(())
    }

    pub fn remove_path_mapping(&mut self, local: &Path) -> Result<bool> {
        let local = absolute(local)?.display().to_string();
        let arr = self.array("path_mappings")?;
        let before = arr.len();
        arr.retain(|v| v.as_inline_table().and_then(|t| t.get("local")).and_then(|l| l.as_str()) != Some(&local));
        Ok(arr.len() != before)
    }

    /// Checks the result still loads, then writes it atomically.
    pub fn save(self) -> Result<PathBuf> {
        let text = self.doc.to_string();
        toml_edit::de::from_str::<FileConfig>(&text)
            .map_err(|e| anyhow::anyhow!("internal: the edit broke {}: {e}", self.path.display()))?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = dir.join(format!(".{}.tmp", self.path.file_name().and_then(|n| n.to_str()).unwrap_or("config")));
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path).with_context(|| format!("cannot replace {}", self.path.display()))?;
        Ok(self.path)
    }
}

/// `p` made absolute against the working directory, with `.` and `..` folded lexically (the
/// file need not exist yet; symlinks are kept as the user wrote them).
pub fn absolute(p: &Path) -> Result<PathBuf> {
    let p = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) };
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    Ok(out)
}

/// The worker's path for a local file, by the longest mapping whose local directory contains it
/// (whole components: `/data/lab` does not contain `/data/lab2`).
pub fn to_worker(mappings: &[PathMapping], local: &Path) -> Option<String> {
    let local = absolute(local).ok()?;
    mappings
        .iter()
        .filter_map(|m| local.strip_prefix(&m.local).ok().map(|rest| (m, rest)))
        .max_by_key(|(m, _)| m.local.components().count())
        .map(|(m, rest)| {
            let mut w = m.worker.trim_end_matches('/').to_owned();
            for c in rest.components() {
                w.push('/');
                w.push_str(&c.as_os_str().to_string_lossy());
            }
            if w.is_empty() { "/".to_owned() } else { w }
        })
}

/// A user's argument rewritten to `worker:PATH` when a mapping covers it (so it is not
/// uploaded); anything already `worker:` or not covered is returned as it was.
pub fn map_arg(mappings: &[PathMapping], arg: &str) -> String {
    if arg.starts_with("worker:") || mappings.is_empty() {
        return arg.to_owned();
    }
    match to_worker(mappings, Path::new(arg)) {
        Some(w) => {
            eprintln!("{arg}: on the worker as {w} (path mapping); not uploaded");
            format!("worker:{w}")
        }
        None => arg.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(project: &str, user: &str) -> (tempfile::TempDir, Settings) {
        let d = tempfile::tempdir().unwrap();
        let (p, u) = (d.path().join("p.toml"), d.path().join("u.toml"));
        if !project.is_empty() {
            std::fs::write(&p, project).unwrap();
        }
        if !user.is_empty() {
            std::fs::write(&u, user).unwrap();
        }
        let s = Settings::load_from(&p, &u).unwrap();
        (d, s)
    }

    #[test]
    fn the_project_file_wins_key_by_key_and_lists_whole() {
        let (_d, s) = files(
            "room = \"proj-room\"\n[worker]\nmounts = [\"/p\"]\n",
            "server = \"https://u.example\"\nroom = \"user-room\"\n[worker]\nmounts = [\"/u1\", \"/u2\"]\ndevice = \"cuda\"\n",
        );
        assert_eq!(s.room().as_deref(), Some("proj-room"));
        assert_eq!(s.server().as_deref(), Some("https://u.example"));
        assert_eq!(s.worker(|w| w.mounts.clone()), Some(vec![PathBuf::from("/p")]));
        assert_eq!(s.worker(|w| w.device.clone()).as_deref(), Some("cuda"));
        let e = s.entries();
        assert!(e.contains(&("room", Some("proj-room".into()), Source::Project)));
        assert!(e.contains(&("server", Some("https://u.example".into()), Source::User)));
        assert!(e.contains(&("registry", None, Source::Unset)));
    }

    #[test]
    fn a_typo_is_an_error_that_names_the_file_and_key() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sleap-rtc.toml");
        std::fs::write(&p, "sever = \"x\"\n").unwrap();
        let e = Settings::load_from(&p, &d.path().join("none")).unwrap_err().to_string();
        assert!(e.contains("sleap-rtc.toml") && e.contains("sever"), "{e}");
        std::fs::write(&p, "[worker]\nmount = [\"/x\"]\n").unwrap();
        let e = Settings::load_from(&p, &d.path().join("none")).unwrap_err().to_string();
        assert!(e.contains("mount"), "{e}");
        std::fs::write(&p, "server = [\n").unwrap();
        assert!(Settings::load_from(&p, &d.path().join("none")).is_err());
    }

    #[test]
    fn edits_keep_comments_and_check_values() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.toml");
        std::fs::write(&p, "# the lab's settings\nroom = \"r1\" # ours\n").unwrap();
        let mut e = Edit::open(&p).unwrap();
        e.set("server", "https://rtc.example.org/").unwrap();
        e.set("worker.upload_cache_gb", "40").unwrap();
        assert!(e.set("worker.upload_cache_gb", "-1").is_err());
        assert!(e.set("worker.upload_cache_gb", "lots").is_err());
        assert!(e.set("severs", "x").unwrap_err().to_string().contains("unknown key"));
        assert!(e.set("server", "ftp://x").is_err());
        assert!(e.set("room", " ").is_err());
        assert!(e.add_mount(d.path()).unwrap());
        assert!(!e.add_mount(d.path()).unwrap(), "a mount is added once");
        assert!(e.add_mount(&d.path().join("missing")).is_err());
        e.add_path_mapping(Path::new("/Volumes/lab"), "/mnt/lab/").unwrap();
        e.add_path_mapping(Path::new("/Volumes/lab"), "/mnt/lab2").unwrap();
        e.save().unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("# the lab's settings") && text.contains("# ours"), "{text}");
        let s = Settings::load_from(&d.path().join("none"), &p).unwrap();
        assert_eq!(s.server().as_deref(), Some("https://rtc.example.org"));
        assert_eq!(s.worker(|w| w.upload_cache_gb), Some(40));
        assert_eq!(s.worker(|w| w.mounts.clone()), Some(vec![d.path().to_path_buf()]));
        assert_eq!(
            s.path_mappings(),
            vec![PathMapping { local: "/Volumes/lab".into(), worker: "/mnt/lab2".into() }],
            "one mapping per local directory"
        );
        let mut e = Edit::open(&p).unwrap();
        assert!(e.remove_mount(d.path()).unwrap());
        assert!(e.unset("room").unwrap());
        assert!(!e.unset("room").unwrap());
        assert!(e.remove_path_mapping(Path::new("/Volumes/lab")).unwrap());
        e.save().unwrap();
        let s = Settings::load_from(&d.path().join("none"), &p).unwrap();
        assert_eq!(s.room(), None);
        assert_eq!(s.worker(|w| w.mounts.clone()), Some(vec![]));
        assert!(s.path_mappings().is_empty());
    }

    #[test]
    fn a_broken_file_is_not_edited() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.toml");
        std::fs::write(&p, "roon = \"x\"\n").unwrap();
        assert!(Edit::open(&p).is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "roon = \"x\"\n");
    }

    #[test]
    fn mappings_take_the_longest_whole_component_prefix() {
        let m = vec![
            PathMapping { local: "/data".into(), worker: "/mnt/data".into() },
            PathMapping { local: "/data/lab".into(), worker: "/srv/lab".into() },
        ];
        assert_eq!(to_worker(&m, Path::new("/data/lab/x.pkg.slp")).as_deref(), Some("/srv/lab/x.pkg.slp"));
        assert_eq!(to_worker(&m, Path::new("/data/lab2/x.slp")).as_deref(), Some("/mnt/data/lab2/x.slp"));
        assert_eq!(to_worker(&m, Path::new("/data/lab/../other/y")).as_deref(), Some("/mnt/data/other/y"));
        assert_eq!(to_worker(&m, Path::new("/elsewhere/y")), None);
        assert_eq!(map_arg(&m, "worker:/x"), "worker:/x");
        assert_eq!(map_arg(&m, "/data/lab/a.slp"), "worker:/srv/lab/a.slp");
        assert_eq!(map_arg(&[], "/data/lab/a.slp"), "/data/lab/a.slp");
    }
}
