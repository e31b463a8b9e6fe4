//! Where the CLI keeps what `sleap-rtc login` obtained, and local records of submitted jobs (so
//! `sleap-rtc job attach JOB_ID` knows which server, room and worker to ask).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// `$XDG_CONFIG_HOME/sleap-rtc` (or `~/.config/sleap-rtc`).
pub fn config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SLEAP_RTC_CONFIG_DIR") {
        return PathBuf::from(d);
    }
    match std::env::var_os("XDG_CONFIG_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("sleap-rtc"),
        _ => home().join(".config").join("sleap-rtc"),
    }
}

/// `$XDG_DATA_HOME/sleap-rtc` (or `~/.local/share/sleap-rtc`).
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SLEAP_RTC_DATA_HOME") {
        return PathBuf::from(d);
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("sleap-rtc"),
        _ => home().join(".local").join("share").join("sleap-rtc"),
    }
}

fn home() -> PathBuf {
    // USERPROFILE: Windows has no HOME unless a Unix-like shell set one.
    std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A credential for one server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Saved {
    /// A user JWT (anonymous sign-in) or an account key (`slp_acct_...`).
    pub credential: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub default_room: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    #[serde(default)]
    servers: BTreeMap<String, Saved>,
}

fn creds_path() -> PathBuf {
    config_dir().join("credentials.json")
}

fn load() -> Result<File> {
    match std::fs::read(creds_path()) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is not valid JSON", creds_path().display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(File::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", creds_path().display())),
    }
}

pub fn get(server: &str) -> Result<Option<Saved>> {
    Ok(load()?.servers.get(server).cloned())
}

/// Forgets one server's credential; false if none was stored.
pub fn remove(server: &str) -> Result<bool> {
    let mut f = load()?;
    if f.servers.remove(server).is_none() {
        return Ok(false);
    }
    write_private(&creds_path(), &serde_json::to_vec_pretty(&f)?)?;
    Ok(true)
}

/// Forgets every stored credential; returns how many there were.
pub fn remove_all() -> Result<usize> {
    let f = load()?;
    let n = f.servers.len();
    if n > 0 {
        write_private(&creds_path(), &serde_json::to_vec_pretty(&File::default())?)?;
    }
    Ok(n)
}

/// The servers with a stored credential.
pub fn servers() -> Result<Vec<(String, Saved)>> {
    Ok(load()?.servers.into_iter().collect())
}

/// The credentials file's path.
pub fn path() -> PathBuf {
    creds_path()
}

/// Stores a credential, readable only by the user (it is a bearer secret).
pub fn put(server: &str, saved: Saved) -> Result<PathBuf> {
    let mut f = load()?;
    f.servers.insert(server.to_owned(), saved);
    let path = creds_path();
    write_private(&path, &serde_json::to_vec_pretty(&f)?)?;
    Ok(path)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().context("no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    // Windows has no mode bits: the file inherits the profile directory's ACL, which only the
    // user (and administrators) can read.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut file = opts.open(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Where upstream's Python client (the SLEAP GUI's `sleap_rtc` package) keeps its credentials.
pub fn upstream_path() -> PathBuf {
    home().join(".sleap-rtc").join("credentials.json")
}

/// Writes what upstream's client reads to sign in and to answer a worker's challenge: the JWT,
/// the user, and the device's Ed25519 private key (registered with the server by the caller).
/// Other keys in the file (room secrets, tokens, a default room) are kept; a file that is not a
/// JSON object is refused rather than overwritten.
pub fn write_upstream(jwt: &str, user_id: &str, username: &str, private_key: &str) -> Result<PathBuf> {
    let path = upstream_path();
    let mut obj = match std::fs::read(&path) {
        Ok(b) => match serde_json::from_slice::<serde_json::Value>(&b) {
            Ok(serde_json::Value::Object(o)) => o,
            _ => bail!("{} is not a JSON object; move it away first", path.display()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Map::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    obj.insert("jwt".into(), jwt.into());
    obj.insert("user".into(), serde_json::json!({"id": user_id, "username": username}));
    obj.insert("private_key".into(), private_key.into());
    obj.insert("public_key_registered".into(), true.into());
    write_private(&path, &serde_json::to_vec_pretty(&serde_json::Value::Object(obj))?)?;
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(path)
}

/// The credential to use: `--jwt`/`SLEAP_RTC_JWT` first, then what `login` stored.
pub fn resolve(server: &str, explicit: Option<&str>) -> Result<String> {
    if let Some(c) = explicit.filter(|c| !c.is_empty()) {
        return Ok(c.to_owned());
    }
    match get(server)? {
        Some(s) => Ok(s.credential),
        None => bail!(
            "not logged in to {server}: run `sleap-rtc login --server {server}` (or pass --jwt / set SLEAP_RTC_JWT)"
        ),
    }
}

/// What the client remembers about a job it submitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub kind: String,
    pub server: String,
    pub room: String,
    pub worker: String,
    /// Where results go: the output directory (train) or the predictions file (track).
    pub output: PathBuf,
    pub submitted_at: f64,
}

fn jobs_dir() -> PathBuf {
    data_dir().join("jobs")
}

pub fn save_job(r: &JobRecord) -> Result<()> {
    let dir = jobs_dir();
    std::fs::create_dir_all(&dir)?;
    write_private(&dir.join(format!("{}.json", r.job_id)), &serde_json::to_vec_pretty(r)?)
}

pub fn load_job(job_id: &str) -> Result<Option<JobRecord>> {
    if job_id.is_empty() || !job_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        bail!("{job_id:?} is not a job id (they look like job_0123456789abcdef)");
    }
    match std::fs::read(jobs_dir().join(format!("{job_id}.json"))) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn list_jobs() -> Vec<JobRecord> {
    let mut v: Vec<JobRecord> = std::fs::read_dir(jobs_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    v.sort_by(|a, b| b.submitted_at.total_cmp(&a.submitted_at));
    v
}
