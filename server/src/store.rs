//! Persistent state: users, rooms, memberships, worker tokens, account keys, users' Ed25519
//! public keys and invites.
//!
//! [`Store`] is the seam between the server and its database. The embedded default is SQLite in
//! the data directory ([`SqliteStore`]); other backends (DynamoDB) implement the same trait.
//! Secrets never reach a store: tokens, keys and invite codes are stored as BLAKE3 hashes.
//! All times are Unix seconds.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};

pub mod dynamo;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A conditional create found an existing item (ids collide, or a unique key is taken).
    #[error("already exists")]
    Conflict,
    #[error("storage backend error: {0}")]
    Backend(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                StoreError::Conflict
            }
            other => StoreError::Backend(other.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// How long an expired room stays (listed as expired, and its owner can still extend it) before
/// it is deleted with everything that belongs to it; the same for every backend.
pub const ROOM_GRACE_SECS: i64 = 7 * 86_400;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub username: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub id: String,
    pub name: String,
    pub created_by: String,
    /// BLAKE3 (hex) of the room token used by the legacy `id_token` + `token` registration.
    pub token_hash: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

impl Room {
    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Owner,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Member => "member",
        }
    }
    fn parse(s: &str) -> Role {
        if s == "owner" { Role::Owner } else { Role::Member }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub user_id: String,
    pub room_id: String,
    pub role: Role,
    pub invited_by: Option<String>,
    pub joined_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerToken {
    /// Non-secret id, used in URLs and listings.
    pub id: String,
    pub secret_hash: String,
    pub user_id: String,
    pub room_id: String,
    pub worker_name: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl WorkerToken {
    pub fn is_active(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|t| t > now)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountKey {
    pub id: String,
    pub secret_hash: String,
    pub user_id: String,
    pub name: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

/// A user's Ed25519 public key (one per device), registered so that the workers of the rooms the
/// user belongs to accept the user's signatures (upstream's P2P challenge). Not a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// Non-secret id, used in URLs and listings.
    pub id: String,
    pub user_id: String,
    /// The raw 32-byte key in canonical url-safe base64 without padding; unique among all users.
    pub public_key: String,
    pub device_name: String,
    pub created_at: i64,
}

/// What [`Store::add_public_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddedKey {
    Created,
    /// The user had registered this key already: the stored record, unchanged.
    Existing(PublicKey),
    /// Another user registered this key.
    TakenByOther,
    /// The user has the maximum number of keys already.
    LimitReached,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    pub code_hash: String,
    pub room_id: String,
    pub created_by: String,
    pub expires_at: i64,
}

/// The storage a server needs. Every method is a single round trip or one transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap liveness check of the backend.
    async fn health(&self) -> Result<()>;

    async fn put_user(&self, user: &User) -> Result<()>;
    async fn get_user(&self, id: &str) -> Result<Option<User>>;

    /// Creates a room and its owner's membership together; `Conflict` if the id exists.
    async fn create_room(&self, room: &Room, owner: &Membership) -> Result<()>;
    async fn get_room(&self, id: &str) -> Result<Option<Room>>;
    /// Updates an existing room; `None` if it does not exist (never creates one).
    async fn update_room(&self, id: &str, name: Option<&str>, expires_at: Option<Option<i64>>) -> Result<Option<Room>>;
    /// Deletes a room with its memberships, worker tokens and invites, atomically.
    async fn delete_room(&self, id: &str) -> Result<bool>;
    /// Deletes up to `limit` rooms that expired more than [`ROOM_GRACE_SECS`] before `now`, each
    /// like [`Store::delete_room`]; returns how many. A backend whose database deletes them by
    /// itself (DynamoDB's TTL) returns 0.
    async fn purge_expired_rooms(&self, now: i64, limit: usize) -> Result<u64>;

    /// Adds a membership; `false` if the user already is a member.
    async fn add_member(&self, m: &Membership) -> Result<bool>;
    async fn get_member(&self, room_id: &str, user_id: &str) -> Result<Option<Membership>>;
    async fn list_user_rooms(&self, user_id: &str) -> Result<Vec<(Membership, Room)>>;
    async fn list_members(&self, room_id: &str) -> Result<Vec<(Membership, Option<User>)>>;
    async fn remove_member(&self, room_id: &str, user_id: &str) -> Result<bool>;

    async fn put_worker_token(&self, t: &WorkerToken) -> Result<()>;
    async fn find_worker_token(&self, secret_hash: &str) -> Result<Option<WorkerToken>>;
    async fn get_worker_token(&self, id: &str) -> Result<Option<WorkerToken>>;
    /// Tokens created by `user_id`, optionally in one room.
    async fn list_worker_tokens(&self, user_id: &str, room_id: Option<&str>) -> Result<Vec<WorkerToken>>;
    async fn revoke_worker_token(&self, id: &str, at: i64) -> Result<bool>;
    async fn delete_worker_token(&self, id: &str) -> Result<bool>;

    async fn put_account_key(&self, k: &AccountKey) -> Result<()>;
    async fn find_account_key(&self, secret_hash: &str) -> Result<Option<AccountKey>>;
    async fn list_account_keys(&self, user_id: &str) -> Result<Vec<AccountKey>>;
    async fn delete_account_key(&self, user_id: &str, id: &str) -> Result<bool>;

    /// Registers a public key for its user, atomically: idempotent for the same user and key,
    /// refused when another user has the key or the user already has `max_per_user` keys.
    async fn add_public_key(&self, k: &PublicKey, max_per_user: usize) -> Result<AddedKey>;
    /// The user's public keys, newest first.
    async fn list_public_keys(&self, user_id: &str) -> Result<Vec<PublicKey>>;
    /// Deletes one of the user's keys; `false` if the user has no key with this id.
    async fn delete_public_key(&self, user_id: &str, id: &str) -> Result<bool>;
    /// The public keys of every current member of the room (by join time, then key age), each
    /// with its user if that user's row exists. Nothing is stored per room: a removed member's
    /// keys, or those of a deleted room, are gone from this answer at once.
    async fn room_public_keys(&self, room_id: &str) -> Result<Vec<(PublicKey, Option<User>)>>;

    async fn put_invite(&self, inv: &Invite) -> Result<()>;
    /// Consumes an unexpired invite atomically: at most one caller gets it.
    async fn take_invite(&self, code_hash: &str, now: i64) -> Result<Option<Invite>>;
}

/// SQLite in the data directory. One connection behind a mutex, used from tokio's blocking pool:
/// signaling never waits on it (only HTTP handlers and registration checks do), and SQLite
/// serializes writers anyway.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = r#"
PRAGMA journal_mode = WAL;
PRAGMA foreign_keys = ON;
PRAGMA busy_timeout = 5000;
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, username TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rooms (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, created_by TEXT NOT NULL, token_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER);
CREATE INDEX IF NOT EXISTS rooms_expires ON rooms(expires_at);
CREATE TABLE IF NOT EXISTS memberships (
    user_id TEXT NOT NULL, room_id TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    role TEXT NOT NULL, invited_by TEXT, joined_at INTEGER NOT NULL, PRIMARY KEY (user_id, room_id));
CREATE INDEX IF NOT EXISTS memberships_room ON memberships(room_id);
CREATE TABLE IF NOT EXISTS worker_tokens (
    id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
    room_id TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE, worker_name TEXT NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER, revoked_at INTEGER);
CREATE INDEX IF NOT EXISTS worker_tokens_user ON worker_tokens(user_id);
CREATE TABLE IF NOT EXISTS account_keys (
    id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL, name TEXT NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER);
CREATE INDEX IF NOT EXISTS account_keys_user ON account_keys(user_id);
CREATE TABLE IF NOT EXISTS public_keys (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, public_key TEXT NOT NULL UNIQUE, device_name TEXT NOT NULL,
    created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS public_keys_user ON public_keys(user_id);
CREATE TABLE IF NOT EXISTS invites (
    code_hash TEXT PRIMARY KEY, room_id TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    created_by TEXT NOT NULL, expires_at INTEGER NOT NULL);
"#;

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        Ok(SqliteStore { conn: Arc::new(Mutex::new(conn)) })
    }

    async fn with<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| StoreError::Backend("store mutex poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }
}

fn room_row(r: &Row<'_>) -> rusqlite::Result<Room> {
    Ok(Room {
        id: r.get("id")?,
        name: r.get("name")?,
        created_by: r.get("created_by")?,
        token_hash: r.get("token_hash")?,
        created_at: r.get("created_at")?,
        expires_at: r.get("expires_at")?,
    })
}

fn member_row(r: &Row<'_>) -> rusqlite::Result<Membership> {
    Ok(Membership {
        user_id: r.get("user_id")?,
        room_id: r.get("room_id")?,
        role: Role::parse(&r.get::<_, String>("role")?),
        invited_by: r.get("invited_by")?,
        joined_at: r.get("joined_at")?,
    })
}

fn token_row(r: &Row<'_>) -> rusqlite::Result<WorkerToken> {
    Ok(WorkerToken {
        id: r.get("id")?,
        secret_hash: r.get("secret_hash")?,
        user_id: r.get("user_id")?,
        room_id: r.get("room_id")?,
        worker_name: r.get("worker_name")?,
        created_at: r.get("created_at")?,
        expires_at: r.get("expires_at")?,
        revoked_at: r.get("revoked_at")?,
    })
}

fn key_row(r: &Row<'_>) -> rusqlite::Result<AccountKey> {
    Ok(AccountKey {
        id: r.get("id")?,
        secret_hash: r.get("secret_hash")?,
        user_id: r.get("user_id")?,
        name: r.get("name")?,
        created_at: r.get("created_at")?,
        expires_at: r.get("expires_at")?,
    })
}

fn public_key_row(r: &Row<'_>) -> rusqlite::Result<PublicKey> {
    Ok(PublicKey {
        id: r.get("id")?,
        user_id: r.get("user_id")?,
        public_key: r.get("public_key")?,
        device_name: r.get("device_name")?,
        created_at: r.get("created_at")?,
    })
}

fn user_row(r: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User { id: r.get("id")?, username: r.get("username")?, created_at: r.get("created_at")? })
}

#[async_trait]
impl Store for SqliteStore {
    async fn health(&self) -> Result<()> {
        self.with(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).map(|_| ())?)).await
    }

    async fn put_user(&self, u: &User) -> Result<()> {
        let u = u.clone();
        self.with(move |c| {
            c.execute(
                "INSERT INTO users (id, username, created_at) VALUES (?1, ?2, ?3)",
                params![u.id, u.username, u.created_at],
            )?;
            Ok(())
        })
        .await
    }

    async fn get_user(&self, id: &str) -> Result<Option<User>> {
        let id = id.to_owned();
        self.with(move |c| Ok(c.query_row("SELECT * FROM users WHERE id = ?1", [id], user_row).optional()?)).await
    }

    async fn create_room(&self, room: &Room, owner: &Membership) -> Result<()> {
        let (r, m) = (room.clone(), owner.clone());
        self.with(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO rooms (id, name, created_by, token_hash, created_at, expires_at) VALUES (?1,?2,?3,?4,?5,?6)",
                params![r.id, r.name, r.created_by, r.token_hash, r.created_at, r.expires_at],
            )?;
            tx.execute(
                "INSERT INTO memberships (user_id, room_id, role, invited_by, joined_at) VALUES (?1,?2,?3,?4,?5)",
                params![m.user_id, m.room_id, m.role.as_str(), m.invited_by, m.joined_at],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn get_room(&self, id: &str) -> Result<Option<Room>> {
        let id = id.to_owned();
        self.with(move |c| Ok(c.query_row("SELECT * FROM rooms WHERE id = ?1", [id], room_row).optional()?)).await
    }

    async fn update_room(&self, id: &str, name: Option<&str>, expires_at: Option<Option<i64>>) -> Result<Option<Room>> {
        let (id, name) = (id.to_owned(), name.map(str::to_owned));
        self.with(move |c| {
            let tx = c.transaction()?;
            if let Some(n) = name {
                tx.execute("UPDATE rooms SET name = ?2 WHERE id = ?1", params![id, n])?;
            }
            if let Some(e) = expires_at {
                tx.execute("UPDATE rooms SET expires_at = ?2 WHERE id = ?1", params![id, e])?;
            }
            let room = tx.query_row("SELECT * FROM rooms WHERE id = ?1", [&id], room_row).optional()?;
            tx.commit()?;
            Ok(room)
        })
        .await
    }

    async fn delete_room(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        // Foreign keys cascade to memberships, tokens and invites inside this one statement.
        self.with(move |c| Ok(c.execute("DELETE FROM rooms WHERE id = ?1", [id])? > 0)).await
    }

    async fn purge_expired_rooms(&self, now: i64, limit: usize) -> Result<u64> {
        let before = now.saturating_sub(ROOM_GRACE_SECS);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Cascades like `delete_room`; `changes` counts the rooms alone.
        self.with(move |c| {
            let n = c.execute(
                "DELETE FROM rooms WHERE id IN (SELECT id FROM rooms WHERE expires_at <= ?1 LIMIT ?2)",
                params![before, limit],
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn add_member(&self, m: &Membership) -> Result<bool> {
        let m = m.clone();
        self.with(move |c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO memberships (user_id, room_id, role, invited_by, joined_at) VALUES (?1,?2,?3,?4,?5)",
                params![m.user_id, m.room_id, m.role.as_str(), m.invited_by, m.joined_at],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn get_member(&self, room_id: &str, user_id: &str) -> Result<Option<Membership>> {
        let (r, u) = (room_id.to_owned(), user_id.to_owned());
        self.with(move |c| {
            Ok(c.query_row("SELECT * FROM memberships WHERE room_id = ?1 AND user_id = ?2", [r, u], member_row)
                .optional()?)
        })
        .await
    }

    async fn list_user_rooms(&self, user_id: &str) -> Result<Vec<(Membership, Room)>> {
        let u = user_id.to_owned();
        self.with(move |c| {
            let mut st = c.prepare(
                "SELECT m.user_id, m.room_id, m.role, m.invited_by, m.joined_at, r.id, r.name, r.created_by,
                        r.token_hash, r.created_at, r.expires_at
                 FROM memberships m JOIN rooms r ON r.id = m.room_id WHERE m.user_id = ?1 ORDER BY m.joined_at DESC",
            )?;
            let rows = st.query_map([u], |r| Ok((member_row(r)?, room_row(r)?)))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn list_members(&self, room_id: &str) -> Result<Vec<(Membership, Option<User>)>> {
        let r = room_id.to_owned();
        self.with(move |c| {
            let mut st = c.prepare(
                "SELECT m.user_id, m.room_id, m.role, m.invited_by, m.joined_at, u.username, u.created_at
                 FROM memberships m LEFT JOIN users u ON u.id = m.user_id WHERE m.room_id = ?1 ORDER BY m.joined_at",
            )?;
            let rows = st.query_map([r], |row| {
                let m = member_row(row)?;
                let user = match row.get::<_, Option<String>>("username")? {
                    Some(username) => {
                        Some(User { id: m.user_id.clone(), username, created_at: row.get("created_at")? })
                    }
                    None => None,
                };
                Ok((m, user))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn remove_member(&self, room_id: &str, user_id: &str) -> Result<bool> {
        let (r, u) = (room_id.to_owned(), user_id.to_owned());
        self.with(move |c| Ok(c.execute("DELETE FROM memberships WHERE room_id = ?1 AND user_id = ?2", [r, u])? > 0))
            .await
    }

    async fn put_worker_token(&self, t: &WorkerToken) -> Result<()> {
        let t = t.clone();
        self.with(move |c| {
            c.execute(
                "INSERT INTO worker_tokens (id, secret_hash, user_id, room_id, worker_name, created_at, expires_at, revoked_at)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
                params![t.id, t.secret_hash, t.user_id, t.room_id, t.worker_name, t.created_at, t.expires_at, t.revoked_at],
            )?;
            Ok(())
        })
        .await
    }

    async fn find_worker_token(&self, secret_hash: &str) -> Result<Option<WorkerToken>> {
        let h = secret_hash.to_owned();
        self.with(move |c| {
            Ok(c.query_row("SELECT * FROM worker_tokens WHERE secret_hash = ?1", [h], token_row).optional()?)
        })
        .await
    }

    async fn get_worker_token(&self, id: &str) -> Result<Option<WorkerToken>> {
        let id = id.to_owned();
        self.with(move |c| Ok(c.query_row("SELECT * FROM worker_tokens WHERE id = ?1", [id], token_row).optional()?))
            .await
    }

    async fn list_worker_tokens(&self, user_id: &str, room_id: Option<&str>) -> Result<Vec<WorkerToken>> {
        let (u, r) = (user_id.to_owned(), room_id.map(str::to_owned));
        self.with(move |c| {
            let mut st = c.prepare(
                "SELECT * FROM worker_tokens WHERE user_id = ?1 AND (?2 IS NULL OR room_id = ?2) ORDER BY created_at DESC",
            )?;
            let rows = st.query_map(params![u, r], token_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn revoke_worker_token(&self, id: &str, at: i64) -> Result<bool> {
        let id = id.to_owned();
        self.with(move |c| {
            Ok(c.execute(
                "UPDATE worker_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, at],
            )? > 0)
        })
        .await
    }

    async fn delete_worker_token(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.with(move |c| Ok(c.execute("DELETE FROM worker_tokens WHERE id = ?1", [id])? > 0)).await
    }

    async fn put_account_key(&self, k: &AccountKey) -> Result<()> {
        let k = k.clone();
        self.with(move |c| {
            c.execute(
                "INSERT INTO account_keys (id, secret_hash, user_id, name, created_at, expires_at) VALUES (?1,?2,?3,?4,?5,?6)",
                params![k.id, k.secret_hash, k.user_id, k.name, k.created_at, k.expires_at],
            )?;
            Ok(())
        })
        .await
    }

    async fn find_account_key(&self, secret_hash: &str) -> Result<Option<AccountKey>> {
        let h = secret_hash.to_owned();
        self.with(move |c| {
            Ok(c.query_row("SELECT * FROM account_keys WHERE secret_hash = ?1", [h], key_row).optional()?)
        })
        .await
    }

    async fn list_account_keys(&self, user_id: &str) -> Result<Vec<AccountKey>> {
        let u = user_id.to_owned();
        self.with(move |c| {
            let mut st = c.prepare("SELECT * FROM account_keys WHERE user_id = ?1 ORDER BY created_at DESC")?;
            let rows = st.query_map([u], key_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn delete_account_key(&self, user_id: &str, id: &str) -> Result<bool> {
        let (u, id) = (user_id.to_owned(), id.to_owned());
        self.with(move |c| Ok(c.execute("DELETE FROM account_keys WHERE id = ?1 AND user_id = ?2", [id, u])? > 0)).await
    }

    async fn add_public_key(&self, k: &PublicKey, max_per_user: usize) -> Result<AddedKey> {
        let k = k.clone();
        let max = i64::try_from(max_per_user).unwrap_or(i64::MAX);
        self.with(move |c| {
            // One transaction: the uniqueness check, the count and the insert see the same state.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let existing =
                tx.query_row("SELECT * FROM public_keys WHERE public_key = ?1", [&k.public_key], public_key_row).optional()?;
            let out = match existing {
                Some(e) if e.user_id == k.user_id => AddedKey::Existing(e),
                Some(_) => AddedKey::TakenByOther,
                None => {
                    let n: i64 =
                        tx.query_row("SELECT COUNT(*) FROM public_keys WHERE user_id = ?1", [&k.user_id], |r| r.get(0))?;
                    if n >= max {
                        AddedKey::LimitReached
                    } else {
                        tx.execute(
                            "INSERT INTO public_keys (id, user_id, public_key, device_name, created_at) VALUES (?1,?2,?3,?4,?5)",
                            params![k.id, k.user_id, k.public_key, k.device_name, k.created_at],
                        )?;
                        AddedKey::Created
                    }
                }
            };
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn list_public_keys(&self, user_id: &str) -> Result<Vec<PublicKey>> {
        let u = user_id.to_owned();
        self.with(move |c| {
            let mut st = c.prepare("SELECT * FROM public_keys WHERE user_id = ?1 ORDER BY created_at DESC, id")?;
            let rows = st.query_map([u], public_key_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn delete_public_key(&self, user_id: &str, id: &str) -> Result<bool> {
        let (u, id) = (user_id.to_owned(), id.to_owned());
        self.with(move |c| Ok(c.execute("DELETE FROM public_keys WHERE id = ?1 AND user_id = ?2", [id, u])? > 0)).await
    }

    async fn room_public_keys(&self, room_id: &str) -> Result<Vec<(PublicKey, Option<User>)>> {
        let r = room_id.to_owned();
        self.with(move |c| {
            let mut st = c.prepare(
                "SELECT k.id, k.user_id, k.public_key, k.device_name, k.created_at, u.username,
                        u.created_at AS user_created_at
                 FROM memberships m JOIN public_keys k ON k.user_id = m.user_id LEFT JOIN users u ON u.id = m.user_id
                 WHERE m.room_id = ?1 ORDER BY m.joined_at, m.user_id, k.created_at, k.id",
            )?;
            let rows = st.query_map([r], |row| {
                let k = public_key_row(row)?;
                let user = match row.get::<_, Option<String>>("username")? {
                    Some(username) => {
                        Some(User { id: k.user_id.clone(), username, created_at: row.get("user_created_at")? })
                    }
                    None => None,
                };
                Ok((k, user))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn put_invite(&self, inv: &Invite) -> Result<()> {
        let i = inv.clone();
        self.with(move |c| {
            c.execute(
                "INSERT INTO invites (code_hash, room_id, created_by, expires_at) VALUES (?1,?2,?3,?4)",
                params![i.code_hash, i.room_id, i.created_by, i.expires_at],
            )?;
            Ok(())
        })
        .await
    }

    async fn take_invite(&self, code_hash: &str, now: i64) -> Result<Option<Invite>> {
        let h = code_hash.to_owned();
        self.with(move |c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM invites WHERE expires_at <= ?1", [now])?;
            let inv = tx
                .query_row("SELECT * FROM invites WHERE code_hash = ?1", [&h], |r| {
                    Ok(Invite {
                        code_hash: r.get("code_hash")?,
                        room_id: r.get("room_id")?,
                        created_by: r.get("created_by")?,
                        expires_at: r.get("expires_at")?,
                    })
                })
                .optional()?;
            if inv.is_some() {
                tx.execute("DELETE FROM invites WHERE code_hash = ?1", [&h])?;
            }
            tx.commit()?;
            Ok(inv)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(id: &str) -> (Room, Membership) {
        (
            Room {
                id: id.into(),
                name: "n".into(),
                created_by: "u".into(),
                token_hash: "h".into(),
                created_at: 1,
                expires_at: Some(100),
            },
            Membership { user_id: "u".into(), room_id: id.into(), role: Role::Owner, invited_by: None, joined_at: 1 },
        )
    }

    #[tokio::test]
    async fn rooms_are_created_conditionally_and_deleted_with_dependents() {
        let dir = tempdir();
        let s = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
        let (r, m) = room("r1");
        s.create_room(&r, &m).await.unwrap();
        assert!(matches!(s.create_room(&r, &m).await, Err(StoreError::Conflict)));
        assert!(s.update_room("nope", Some("x"), None).await.unwrap().is_none(), "no phantom rooms");
        assert!(s.get_room("nope").await.unwrap().is_none());
        let t = WorkerToken {
            id: "t".into(),
            secret_hash: "sh".into(),
            user_id: "u".into(),
            room_id: "r1".into(),
            worker_name: "w".into(),
            created_at: 1,
            expires_at: None,
            revoked_at: None,
        };
        s.put_worker_token(&t).await.unwrap();
        s.put_invite(&Invite { code_hash: "c".into(), room_id: "r1".into(), created_by: "u".into(), expires_at: 50 })
            .await
            .unwrap();
        assert!(s.delete_room("r1").await.unwrap());
        assert!(s.get_worker_token("t").await.unwrap().is_none());
        assert!(s.get_member("r1", "u").await.unwrap().is_none());
        assert!(s.take_invite("c", 0).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn invites_are_single_use_and_expire() {
        let dir = tempdir();
        let s = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
        let (r, m) = room("r1");
        s.create_room(&r, &m).await.unwrap();
        for (code, exp) in [("a", 50), ("b", 10)] {
            s.put_invite(&Invite {
                code_hash: code.into(),
                room_id: "r1".into(),
                created_by: "u".into(),
                expires_at: exp,
            })
            .await
            .unwrap();
        }
        assert!(s.take_invite("a", 20).await.unwrap().is_some());
        assert!(s.take_invite("a", 20).await.unwrap().is_none());
        assert!(s.take_invite("b", 20).await.unwrap().is_none());
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }
}
