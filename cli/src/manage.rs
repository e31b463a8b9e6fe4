//! Account, room, token and key management over the server's HTTP API: `login`, `logout`,
//! `whoami`, `room ...`, `token ...`, `key ...`. Every listing has `--json` (the server's own
//! objects, unchanged) for scripts.

use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::config::{self, Settings};
use crate::creds;
use crate::jobs::ServerUrl;

/// `--server`, defaulting to the config file's `server` (which `login` sets).
#[derive(Args, Clone, Default)]
pub struct ServerArg {
    /// Signaling server, e.g. https://rtc.example.org or http://127.0.0.1:8080. Default: the
    /// config file's `server`, which `sleap-rtc login` sets.
    #[arg(long, env = "SLEAP_RTC_SERVER")]
    pub server: Option<String>,
}

impl ServerArg {
    pub fn resolve(&self, s: &Settings) -> Result<ServerUrl> {
        match self.server.clone().filter(|v| !v.is_empty()).or_else(|| s.server()) {
            Some(url) => ServerUrl::parse(&url),
            None => bail!(
                "no server: pass --server URL, set SLEAP_RTC_SERVER, or log in once with \
                 `sleap-rtc login --server URL` (it becomes the default)"
            ),
        }
    }
}

/// The server and a credential for its API.
#[derive(Args, Clone, Default)]
pub struct ApiArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Credential: a user JWT or an account key (default: what `login` stored).
    #[arg(long, env = "SLEAP_RTC_JWT", hide_env_values = true)]
    pub jwt: Option<String>,
}

/// An authenticated HTTP client of one server.
pub struct Api {
    http: reqwest::Client,
    pub server: ServerUrl,
    credential: String,
}

impl Api {
    pub fn new(a: &ApiArgs, s: &Settings) -> Result<Api> {
        let server = a.server.resolve(s)?;
        let credential = creds::resolve(&server.http, a.jwt.as_deref())?;
        Ok(Api { http: client()?, server, credential })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.http)
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        http_json(self.http.get(self.url(path)).bearer_auth(&self.credential)).await
    }

    pub async fn get_query(&self, path: &str, q: &[(&str, String)]) -> Result<Value> {
        http_json(self.http.get(self.url(path)).query(q).bearer_auth(&self.credential)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        http_json(self.http.post(self.url(path)).bearer_auth(&self.credential).json(&body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value> {
        http_json(self.http.delete(self.url(path)).bearer_auth(&self.credential)).await
    }
}

/// An HTTP client that gives up on a silent server instead of hanging a terminal.
pub fn client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("cannot make an HTTP client")
}

pub async fn http_json(req: reqwest::RequestBuilder) -> Result<Value> {
    let resp = req.send().await.map_err(|e| anyhow::anyhow!("cannot reach the server: {e}"))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let detail = body.get("detail").and_then(Value::as_str).unwrap_or("no detail");
        bail!("the server answered {status}: {detail}");
    }
    Ok(body)
}

/// A path segment from user input: ids are opaque, but a `/` or `..` must not reach another route.
fn seg(id: &str) -> Result<&str> {
    if id.is_empty() || id.contains(['/', '?', '#', '%']) || id == "." || id == ".." {
        bail!("{id:?} is not an id");
    }
    Ok(id)
}

/// `ts` (Unix seconds) relative to `now`: "in 3 d", "2 h ago", "never".
pub fn when(ts: Option<i64>, now: i64) -> String {
    let Some(ts) = ts else { return "never".into() };
    let d = ts - now;
    let a = d.unsigned_abs();
    let span = match a {
        0..=119 => format!("{a} s"),
        120..=7199 => format!("{} min", a / 60),
        7200..=172_799 => format!("{} h", a / 3600),
        _ => format!("{} d", a / 86_400),
    };
    if d >= 0 { format!("in {span}") } else { format!("{span} ago") }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Prints rows as aligned columns (the last column is not padded).
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let mut out = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(&c);
            } else {
                out.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A listing: the server's array as JSON, or one table row per element (`empty` when none).
fn show_list(
    list: &Value,
    json: bool,
    empty: &str,
    header: &[&str],
    row: impl Fn(&Value) -> Vec<String>,
) -> Result<()> {
    if json {
        return print_json(list);
    }
    let rows: Vec<Vec<String>> = list.as_array().into_iter().flatten().map(row).collect();
    if rows.is_empty() {
        eprintln!("{empty}");
    } else {
        table(header, &rows);
    }
    Ok(())
}

/// A DELETE whose answer counts the connections it closed; says so on stderr.
async fn remove(api: &Api, path: &str, said: &str, closed: &str) -> Result<()> {
    let r = api.delete(path).await?;
    let n = r.get("disconnected").and_then(Value::as_u64).unwrap_or(0);
    eprintln!("{said}; {n} {closed}");
    Ok(())
}

// ---- login, logout, whoami

#[derive(Args)]
pub struct LoginArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// An account key (slp_acct_...) to store instead of signing in anonymously.
    #[arg(long, env = "SLEAP_RTC_ACCOUNT_KEY", hide_env_values = true)]
    pub account_key: Option<String>,
    /// Also sign in the SLEAP GUI (upstream's Python `sleap_rtc` package, which cannot sign in to
    /// this server itself): writes its ~/.sleap-rtc/credentials.json (the JWT, and a new Ed25519
    /// device key whose public half is registered here, so workers accept its challenge answers).
    /// Needs a JWT: not with --account-key.
    #[arg(long, conflicts_with = "account_key")]
    pub for_sleap_gui: bool,
}

pub async fn login(a: LoginArgs) -> Result<i32> {
    let settings = Settings::load()?;
    let server = a.server.resolve(&settings)?;
    let http = client()?;
    let saved = match a.account_key {
        Some(key) => {
            let me = http_json(http.get(format!("{}/api/auth/me", server.http)).bearer_auth(&key)).await?;
            creds::Saved {
                credential: key,
                username: me.get("username").and_then(Value::as_str).map(str::to_owned),
                default_room: None,
            }
        }
        None => {
            let r = http_json(http.post(format!("{}/anonymous-signin", server.http))).await?;
            creds::Saved {
                credential: r["jwt"].as_str().context("no jwt in the sign-in reply")?.to_owned(),
                username: r.get("username").and_then(Value::as_str).map(str::to_owned),
                default_room: None,
            }
        }
    };
    let user = saved.username.clone().unwrap_or_default();
    let jwt = saved.credential.clone();
    let path = creds::put(&server.http, saved)?;
    eprintln!("logged in to {} as {user}; credential stored in {}", server.http, path.display());
    // The server just logged in to becomes the default, so later commands need no --server.
    if settings.server().as_deref() != Some(server.http.as_str()) {
        let mut e = config::Edit::open(&config::user_path())?;
        e.set("server", &server.http)?;
        let p = e.save()?;
        eprintln!("default server: {} (in {})", server.http, p.display());
        if let Some((pp, c)) = &settings.project
            && c.server.as_deref().is_some_and(|s| s != server.http)
        {
            eprintln!("note: {} names another server, and wins in this directory", pp.display());
        }
    }
    if a.for_sleap_gui {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness for the device key: {e}"))?;
        let (private, public) = sleap_rtc_core::upstream::auth::device_key(&seed);
        http_json(
            http.post(format!("{}/api/auth/public-keys", server.http))
                .bearer_auth(&jwt)
                .json(&json!({"public_key": public, "device_name": "sleap-gui"})),
        )
        .await
        .context("registering the SLEAP GUI's device key")?;
        let me = http_json(http.get(format!("{}/api/auth/me", server.http)).bearer_auth(&jwt)).await?;
        let id = me.get("user_id").or(me.get("id")).and_then(Value::as_str).unwrap_or_default();
        let up = creds::write_upstream(&jwt, id, &user, &private)?;
        let ws = server.http.replacen("http", "ws", 1);
        eprintln!(
            "the SLEAP GUI is signed in too ({}); point it at this server with\n  \
             export SLEAP_RTC_SIGNALING_WS={ws}/ws SLEAP_RTC_SIGNALING_HTTP={}\n\
             The sign-in lasts as long as the JWT (7 days by default): run this again then.",
            up.display(),
            server.http
        );
    }
    Ok(0)
}

#[derive(Args)]
pub struct LogoutArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Forget the credentials of every server.
    #[arg(long)]
    pub all: bool,
}

pub fn logout(a: LogoutArgs) -> Result<i32> {
    if a.all {
        let n = creds::remove_all()?;
        eprintln!("forgot {n} stored credential(s)");
        return Ok(0);
    }
    let server = a.server.resolve(&Settings::load()?)?;
    if creds::remove(&server.http)? {
        eprintln!("logged out of {} (the stored credential is deleted)", server.http);
    } else {
        eprintln!("not logged in to {}", server.http);
    }
    Ok(0)
}

/// The claims of a JWT, read without checking its signature (only to show its expiry; the
/// server checks it).
pub fn jwt_claims(jwt: &str) -> Option<Value> {
    use base64::Engine;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// What kind of credential this is, and a JWT's expiry (Unix seconds).
pub fn credential_info(credential: &str) -> (&'static str, Option<i64>) {
    let kind = if credential.starts_with("slp_acct_") { "account key" } else { "JWT" };
    (kind, jwt_claims(credential).and_then(|c| c.get("exp").and_then(Value::as_i64)))
}

pub async fn whoami(a: ApiArgs, json: bool) -> Result<i32> {
    let api = Api::new(&a, &Settings::load()?)?;
    let me = api.get("/api/auth/me").await?;
    let (kind, exp) = credential_info(&api.credential);
    if json {
        return print_json(&json!({
            "server": api.server.http, "user_id": me.get("user_id"), "username": me.get("username"),
            "credential": kind, "expires_at": exp,
        }))
        .map(|_| 0);
    }
    println!("{} ({}) on {}", s(&me, "username"), s(&me, "user_id"), api.server.http);
    match exp {
        Some(t) => println!("credential: {kind}, expires {}", when(Some(t), unix_now())),
        None => println!("credential: {kind}"),
    }
    Ok(0)
}

// ---- rooms

#[derive(Subcommand)]
pub enum RoomCmd {
    /// Create a room; prints its id. It becomes the default room if there is none yet.
    Create {
        #[command(flatten)]
        api: ApiArgs,
        /// A name for the room.
        #[arg(long, default_value = "")]
        name: String,
        /// Days until the room expires (1 to 365).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(i64).range(1..=365))]
        expires_days: i64,
    },
    /// Rooms you own or belong to.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Only rooms where you have this role.
        #[arg(long, value_parser = ["owner", "member"])]
        role: Option<String>,
        /// Only rooms whose name contains this (any case).
        #[arg(long)]
        search: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One room: name, your role, expiry, and (for its owner) its members.
    Info {
        #[command(flatten)]
        api: ApiArgs,
        /// Room id (default: the default room).
        room: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a room you own: its tokens stop working and its peers are disconnected.
    Delete {
        #[command(flatten)]
        api: ApiArgs,
        room: String,
        /// Do not ask.
        #[arg(short, long)]
        yes: bool,
    },
    /// Make a single-use invite code for a room you own (valid for 24 hours).
    Invite {
        #[command(flatten)]
        api: ApiArgs,
        /// Room id (default: the default room).
        room: Option<String>,
    },
    /// Join a room with an invite code; it becomes the default room if there is none yet.
    Join {
        #[command(flatten)]
        api: ApiArgs,
        code: String,
    },
    /// A room's members.
    Members {
        #[command(flatten)]
        api: ApiArgs,
        /// Room id (default: the default room).
        room: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Make a room the default for every command (stored in the config file).
    SetDefault {
        room: String,
        /// Store it in ./sleap-rtc.toml instead of the user's config file.
        #[arg(long)]
        project: bool,
    },
    /// Create a worker token for a room (the same as `token create`).
    #[command(hide = true)]
    Token(TokenCreate),
}

pub async fn room(cmd: RoomCmd) -> Result<i32> {
    let settings = Settings::load()?;
    let now = unix_now();
    match cmd {
        RoomCmd::Create { api, name, expires_days } => {
            let api = Api::new(&api, &settings)?;
            let r = api.post("/api/auth/rooms", json!({"name": name, "expires_in_days": expires_days})).await?;
            let id = r["room_id"].as_str().context("no room_id in the server's answer")?;
            println!("{id}");
            default_if_none(&settings, id)?;
        }
        RoomCmd::List { api, role, search, json } => {
            let api = Api::new(&api, &settings)?;
            let mut q = Vec::new();
            if let Some(r) = role {
                q.push(("role", r));
            }
            if let Some(s) = search {
                q.push(("search", s));
            }
            let r = api.get_query("/api/auth/rooms", &q).await?;
            let rooms = r.get("rooms").cloned().unwrap_or(json!([]));
            let default = settings.room();
            let row = |r: &Value| {
                let id = s(r, "room_id");
                let mark = if default.as_deref() == Some(id) { "*" } else { "" };
                let expires = if r.get("expired").and_then(Value::as_bool) == Some(true) {
                    "EXPIRED".to_owned()
                } else {
                    when(r.get("expires_at").and_then(Value::as_i64), now)
                };
                vec![format!("{id}{mark}"), s(r, "name").to_owned(), s(r, "role").to_owned(), expires]
            };
            let empty = "no rooms; create one with `sleap-rtc room create --name NAME`";
            show_list(&rooms, json, empty, &["ROOM", "NAME", "ROLE", "EXPIRES"], row)?;
            if !json && default.is_some() && rooms.as_array().is_some_and(|a| !a.is_empty()) {
                eprintln!("* the default room");
            }
        }
        RoomCmd::Info { api, room, json } => {
            let api = Api::new(&api, &settings)?;
            let id = crate::room_or_default(room, &settings)?;
            let r = api.get(&format!("/api/auth/rooms/{}", seg(&id)?)).await?;
            if json {
                return print_json(&r).map(|_| 0);
            }
            println!("room:    {}", s(&r, "room_id"));
            println!("name:    {}", s(&r, "name"));
            println!("role:    {}", s(&r, "role"));
            println!("expires: {}", when(r.get("expires_at").and_then(Value::as_i64), now));
            if let Some(m) = r.get("members").and_then(Value::as_array) {
                println!("members: {}", m.len());
            }
        }
        RoomCmd::Delete { api, room, yes } => {
            let api = Api::new(&api, &settings)?;
            if !yes && !confirm(&format!("delete room {room} and disconnect its peers?"))? {
                eprintln!("not deleted");
                return Ok(1);
            }
            api.delete(&format!("/api/auth/rooms/{}", seg(&room)?)).await?;
            eprintln!("deleted room {room}");
            if settings.room().as_deref() == Some(room.as_str()) {
                eprintln!("it was the default room: choose another with `sleap-rtc room set-default ROOM`");
            }
        }
        RoomCmd::Invite { api, room } => {
            let api = Api::new(&api, &settings)?;
            let id = crate::room_or_default(room, &settings)?;
            let r = api.post(&format!("/api/auth/rooms/{}/invite", seg(&id)?), json!({})).await?;
            let code = r["invite_code"].as_str().context("no invite_code in the server's answer")?;
            println!("{code}");
            let hours = r.get("expires_in_seconds").and_then(Value::as_i64).unwrap_or(86_400) / 3600;
            eprintln!("single use, valid {hours} h; the invitee runs: sleap-rtc room join {code}");
        }
        RoomCmd::Join { api, code } => {
            let api = Api::new(&api, &settings)?;
            let r = api.post("/api/auth/rooms/join", json!({"invite_code": code})).await?;
            let id = r["room_id"].as_str().context("no room_id in the server's answer")?;
            println!("{id}");
            eprintln!("joined {id} ({})", s(&r, "name"));
            default_if_none(&settings, id)?;
        }
        RoomCmd::Members { api, room, json } => {
            let api = Api::new(&api, &settings)?;
            let id = crate::room_or_default(room, &settings)?;
            let r = api.get(&format!("/api/auth/rooms/{}/members", seg(&id)?)).await?;
            let members = r.get("members").cloned().unwrap_or(json!([]));
            show_list(&members, json, "no members", &["USER", "ID", "ROLE", "JOINED"], |m| {
                let joined = m.get("joined_at").and_then(Value::as_i64);
                vec![
                    s(m, "username").to_owned(),
                    s(m, "user_id").to_owned(),
                    s(m, "role").to_owned(),
                    when(joined, now),
                ]
            })?;
        }
        RoomCmd::SetDefault { room, project } => {
            let path = if project { config::project_path() } else { config::user_path() };
            let mut e = config::Edit::open(&path)?;
            e.set("room", &room)?;
            let p = e.save()?;
            eprintln!("default room: {room} (in {})", p.display());
        }
        RoomCmd::Token(t) => return token(TokenCmd::Create(t)).await,
    }
    Ok(0)
}

/// After creating or joining a room: make it the default when there is none, else say how.
fn default_if_none(settings: &Settings, id: &str) -> Result<()> {
    if settings.room().is_some() {
        eprintln!("to make it the default room: sleap-rtc room set-default {id}");
        return Ok(());
    }
    let mut e = config::Edit::open(&config::user_path())?;
    e.set("room", id)?;
    let p = e.save()?;
    eprintln!("default room: {id} (in {})", p.display());
    Ok(())
}

/// Asks on the terminal; without one (a script) the answer is no, so nothing is destroyed
/// unasked.
fn confirm(question: &str) -> Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        bail!("{question} — pass --yes to confirm (no terminal to ask on)");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes" | "YES"))
}

// ---- worker tokens

#[derive(Args)]
pub struct TokenCreate {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Room id (default: the default room).
    #[arg(long, env = "SLEAP_RTC_ROOM")]
    pub room: Option<String>,
    /// The worker's display name.
    #[arg(long, default_value = "worker")]
    pub name: String,
    /// Days until the token expires (1 to 365).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(i64).range(1..=365))]
    pub expires_days: i64,
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a worker token for a room; prints it (it is shown only once).
    Create(TokenCreate),
    /// Worker tokens you created.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Only this room's tokens.
        #[arg(long)]
        room: Option<String>,
        /// Leave out revoked and expired tokens.
        #[arg(long)]
        active_only: bool,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token (by the id `token list` shows): workers using it are disconnected.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        id: String,
    },
    /// Delete a token's record (revoking it first if it is still active).
    Delete {
        #[command(flatten)]
        api: ApiArgs,
        id: String,
    },
}

pub async fn token(cmd: TokenCmd) -> Result<i32> {
    let settings = Settings::load()?;
    let now = unix_now();
    match cmd {
        TokenCmd::Create(t) => {
            let api = Api::new(&t.api, &settings)?;
            let room = crate::room_or_default(t.room, &settings)?;
            let r = api
                .post(
                    "/api/auth/token",
                    json!({"room_id": room, "worker_name": t.name, "expires_in_days": t.expires_days}),
                )
                .await?;
            println!("{}", r["token_id"].as_str().context("no token_id in the server's answer")?);
            eprintln!(
                "this token is shown once (id {}, expires {}); start a worker with:\n  \
                 SLEAP_RTC_TOKEN=TOKEN sleap-rtc worker --server {}",
                s(&r, "id"),
                when(r.get("expires_at").and_then(Value::as_i64), now),
                api.server.http
            );
        }
        TokenCmd::List { api, room, active_only, json } => {
            let api = Api::new(&api, &settings)?;
            let mut q = Vec::new();
            if let Some(r) = room {
                q.push(("room_id", r));
            }
            if active_only {
                q.push(("active_only", "true".to_owned()));
            }
            let r = api.get_query("/api/auth/tokens", &q).await?;
            let tokens = r.get("tokens").cloned().unwrap_or(json!([]));
            show_list(&tokens, json, "no tokens", &["ID", "WORKER", "ROOM", "STATE"], |t| {
                let state = if t.get("revoked_at").is_some_and(|v| !v.is_null()) {
                    "revoked".to_owned()
                } else if t.get("is_active").and_then(Value::as_bool) == Some(true) {
                    format!("expires {}", when(t.get("expires_at").and_then(Value::as_i64), now))
                } else {
                    "expired".to_owned()
                };
                vec![s(t, "id").to_owned(), s(t, "worker_name").to_owned(), s(t, "room_id").to_owned(), state]
            })?;
        }
        TokenCmd::Revoke { api, id } => {
            let api = Api::new(&api, &settings)?;
            remove(&api, &format!("/api/auth/token/{}", seg(&id)?), &format!("revoked {id}"), "worker(s) disconnected")
                .await?;
        }
        TokenCmd::Delete { api, id } => {
            let api = Api::new(&api, &settings)?;
            remove(
                &api,
                &format!("/api/auth/tokens/{}", seg(&id)?),
                &format!("deleted {id}"),
                "worker(s) disconnected",
            )
            .await?;
        }
    }
    Ok(0)
}

// ---- account keys

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Create an account key (slp_acct_...): a long-lived credential for workers and scripts.
    /// Printed once.
    Create {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long, default_value = "")]
        name: String,
        /// Also store it as this machine's credential for the server (instead of the JWT).
        #[arg(long)]
        save: bool,
    },
    /// Your account keys (ids and names; the secrets are never shown again).
    List {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        json: bool,
    },
    /// Revoke an account key: connections signed in with it are closed.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        id: String,
    },
}

pub async fn key(cmd: KeyCmd) -> Result<i32> {
    let settings = Settings::load()?;
    let now = unix_now();
    match cmd {
        KeyCmd::Create { api, name, save } => {
            let api = Api::new(&api, &settings)?;
            let body = if name.is_empty() { json!({}) } else { json!({"name": name}) };
            let r = api.post("/api/auth/account-keys", body).await?;
            let key = r["key_id"].as_str().context("no key in the server's answer")?;
            println!("{key}");
            eprintln!("this key is shown once (id {}); keep it like a password", s(&r, "id"));
            if save {
                let mut saved = creds::get(&api.server.http)?.unwrap_or(creds::Saved {
                    credential: String::new(),
                    username: None,
                    default_room: None,
                });
                saved.credential = key.to_owned();
                let p = creds::put(&api.server.http, saved)?;
                eprintln!("stored as this machine's credential for {} ({})", api.server.http, p.display());
            }
        }
        KeyCmd::List { api, json } => {
            let api = Api::new(&api, &settings)?;
            let r = api.get("/api/auth/account-keys").await?;
            let keys = r.get("keys").cloned().unwrap_or(json!([]));
            show_list(&keys, json, "no account keys", &["ID", "NAME", "CREATED", "EXPIRES"], |k| {
                let at = |f: &str| when(k.get(f).and_then(Value::as_i64), now);
                vec![s(k, "id").to_owned(), s(k, "name").to_owned(), at("created_at"), at("expires_at")]
            })?;
        }
        KeyCmd::Revoke { api, id } => {
            let api = Api::new(&api, &settings)?;
            remove(
                &api,
                &format!("/api/auth/account-keys/{}", seg(&id)?),
                &format!("revoked {id}"),
                "connection(s) closed",
            )
            .await?;
        }
    }
    Ok(0)
}

/// Whether a file is private to its owner (credentials are bearer secrets).
#[cfg(unix)]
pub fn private_mode(p: &Path) -> Option<(bool, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(p).ok()?.permissions().mode() & 0o777;
    Some((mode & 0o077 == 0, mode))
}

/// Windows has no mode bits; the profile directory's ACL is what protects the file there.
#[cfg(not(unix))]
pub fn private_mode(p: &Path) -> Option<(bool, u32)> {
    std::fs::metadata(p).ok().map(|_| (true, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_a_person_would_say_them() {
        assert_eq!(when(None, 0), "never");
        assert_eq!(when(Some(100), 70), "in 30 s");
        assert_eq!(when(Some(0), 3 * 86_400), "3 d ago");
        assert_eq!(when(Some(7200), 0), "in 2 h");
        assert_eq!(when(Some(600), 0), "in 10 min");
    }

    #[test]
    fn ids_cannot_reach_other_routes() {
        for bad in ["", "..", "a/b", "x?y", "%2e%2e", "."] {
            assert!(seg(bad).is_err(), "{bad}");
        }
        assert_eq!(seg("abc_123").unwrap(), "abc_123");
    }

    #[test]
    fn jwt_claims_are_read_without_trusting_them() {
        use base64::Engine;
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"u1","exp":1700000000}"#);
        let c = jwt_claims(&format!("h.{p}.sig")).unwrap();
        assert_eq!(c["exp"], 1_700_000_000);
        assert!(jwt_claims("slp_acct_x").is_none());
        assert!(jwt_claims("a.!!!.c").is_none());
    }
}
