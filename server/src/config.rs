//! Command-line flags (each with an environment variable) of `sleap-rtc-server`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use sleap_rtc_core::room::Limits;
use sleap_rtc_core::room::TurnRest;
use sleap_rtc_core::signal::IceServer;

/// The sleap-rtc signaling server: rooms, accounts and tokens, peer discovery and message routing
/// for sleap-rtc clients and GPU workers. It never sees datasets or models: peers exchange those
/// directly over WebRTC once the server has introduced them.
///
/// Every listener serves the HTTP API and accepts WebSocket upgrades on `/ws` and `/`.
#[derive(Debug, Clone, Parser)]
#[command(name = "sleap-rtc-server", version, about, long_about)]
pub struct Config {
    /// Address to listen on (repeat for several, e.g. one for IPv4 and one for IPv6). Port 0 picks
    /// a free port; the chosen address is logged.
    #[arg(long = "listen", env = "SLEAP_RTC_LISTEN", value_delimiter = ',', default_value = "127.0.0.1:8080")]
    pub listen: Vec<SocketAddr>,

    /// Directory for the embedded database (`sleap-rtc.sqlite`) and the JWT signing key
    /// (`jwt-ed25519.pem`). Created if missing.
    #[arg(long, env = "SLEAP_RTC_DATA_DIR", default_value = "sleap-rtc-data")]
    pub data_dir: PathBuf,

    /// Where rooms, users, memberships and tokens live: `sqlite` (the file `sleap-rtc.sqlite` in
    /// --data-dir) or `dynamodb://TABLE_PREFIX[?endpoint=URL&region=NAME]` (credentials and region
    /// from the standard AWS chain: environment, profile, instance role). Several server
    /// instances can share one DynamoDB store.
    #[arg(long, env = "SLEAP_RTC_STORE", default_value = "sqlite")]
    pub store: String,

    /// Create the DynamoDB tables that are missing and enable their TTL at start. Idempotent and
    /// safe when several instances start at once.
    #[arg(long, env = "SLEAP_RTC_STORE_INIT")]
    pub store_init: bool,

    /// Share rooms with other instances of this server through Redis (`redis://[:PASSWORD@]HOST[:PORT][/DB]`,
    /// `rediss://` for TLS): peers connected to different instances discover and reach each
    /// other, and room limits and sign-in rate limits hold across instances. Every instance must
    /// use the same signing key (--jwt-key-file) and the same storage (--store dynamodb://...).
    #[arg(long, env = "SLEAP_RTC_REDIS_URL", hide_env_values = true)]
    pub redis: Option<String>,

    /// Prefix of every Redis key and channel this server uses (several deployments can share one
    /// Redis with different prefixes).
    #[arg(long, env = "SLEAP_RTC_REDIS_PREFIX", default_value = "sleap-rtc")]
    pub redis_prefix: String,

    /// Seconds an instance's presence lease lasts in Redis. It is renewed every third of that; an
    /// instance that stops renewing (crash, network cut) has its peers removed from every room
    /// by the other instances within about 4/3 of the lease.
    #[arg(long, env = "SLEAP_RTC_REDIS_LEASE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub redis_lease_secs: u64,

    /// Ed25519 PKCS#8 PEM file with the JWT and ticket signing key, instead of
    /// `jwt-ed25519.pem` in --data-dir (which is created on first start). Give every instance
    /// of a cluster the same file.
    #[arg(long, env = "SLEAP_RTC_JWT_KEY_FILE")]
    pub jwt_key_file: Option<PathBuf>,

    /// Bearer token required for `GET /metrics` from non-loopback addresses. Without it, metrics
    /// are only served to loopback clients.
    #[arg(long, env = "SLEAP_RTC_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// Web origin (e.g. `https://lab.example.org`) whose pages may open signaling WebSockets, in
    /// addition to this server's own origin (repeatable; `*` allows any). Clients that send no
    /// Origin header (the CLI, workers, Python peers) are not affected.
    #[arg(long = "allowed-origin", env = "SLEAP_RTC_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// ICE server URL handed to peers in `registered_auth` (repeatable), e.g.
    /// `stun:stun.l.google.com:19302`.
    #[arg(long = "ice-server", env = "SLEAP_RTC_ICE_SERVERS", value_delimiter = ',')]
    pub ice_servers: Vec<String>,

    /// TURN relay URL handed to peers with per-peer credentials (repeatable), e.g.
    /// `turn:turn.example.org:3478?transport=udp`. Needs the secret the TURN server was started
    /// with (coturn: `use-auth-secret`, `static-auth-secret=...`).
    #[arg(long = "turn-url", env = "SLEAP_RTC_TURN_URLS", value_delimiter = ',', requires = "turn_secret_file")]
    pub turn_urls: Vec<String>,

    /// File holding the secret shared with the TURN server (one line; trailing whitespace is
    /// ignored). A file, not a flag, so the secret stays out of `ps` and shell history.
    #[arg(long, env = "SLEAP_RTC_TURN_SECRET_FILE", requires = "turn_urls")]
    pub turn_secret_file: Option<PathBuf>,

    /// How long the TURN credentials handed out at `register` stay valid, in seconds. A relayed
    /// connection ends at the first allocation refresh after they expire, so this bounds how long
    /// one relayed job can run without reconnecting.
    #[arg(long, env = "SLEAP_RTC_TURN_TTL_SECS", default_value_t = 2 * 86_400)]
    pub turn_ttl_secs: u64,

    /// Lifetime of the JWTs the server issues, in hours.
    #[arg(long, env = "SLEAP_RTC_JWT_TTL_HOURS", default_value_t = 168)]
    pub jwt_ttl_hours: i64,

    /// Largest WebSocket text message accepted, in bytes. Larger ones are answered with
    /// MESSAGE_TOO_LARGE (frames over 1 MiB close the connection).
    #[arg(long, env = "SLEAP_RTC_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Largest peer metadata object (serialized), in bytes.
    #[arg(long, env = "SLEAP_RTC_MAX_METADATA_BYTES", default_value_t = 16 * 1024)]
    pub max_metadata_bytes: usize,

    /// Peers allowed in one room at once.
    #[arg(long, env = "SLEAP_RTC_MAX_PEERS_PER_ROOM", default_value_t = 1000)]
    pub max_peers_per_room: usize,

    /// Rooms with connected peers allowed at once on this server (with --redis: in the whole
    /// cluster).
    #[arg(long, env = "SLEAP_RTC_MAX_ROOMS", default_value_t = 10_000)]
    pub max_rooms: usize,

    /// WebSocket connections allowed at once; further upgrades get 503.
    #[arg(long, env = "SLEAP_RTC_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,

    /// Sustained messages per second allowed per connection (token bucket).
    #[arg(long, env = "SLEAP_RTC_RATE_LIMIT", default_value_t = 50.0)]
    pub rate_limit: f64,

    /// Burst size of the per-connection token bucket.
    #[arg(long, env = "SLEAP_RTC_RATE_BURST", default_value_t = 200.0)]
    pub rate_burst: f64,

    /// Seconds a connection may stay open without a successful `register`.
    #[arg(long, env = "SLEAP_RTC_REGISTER_TIMEOUT_SECS", default_value_t = 10)]
    pub register_timeout_secs: u64,

    /// Messages queued per connection before it counts as a slow consumer and is closed (4013).
    #[arg(long, env = "SLEAP_RTC_OUTBOUND_QUEUE", default_value_t = 512)]
    pub outbound_queue: usize,

    /// Sign-ins, room joins and other unauthenticated auth calls allowed per client IP per minute.
    #[arg(long, env = "SLEAP_RTC_AUTH_RATE_PER_MIN", default_value_t = 60.0)]
    pub auth_rate_per_min: f64,

    /// Seconds between WebSocket pings; a peer silent for three intervals is dropped.
    #[arg(long, env = "SLEAP_RTC_PING_SECS", default_value_t = 20)]
    pub ping_secs: u64,

    /// Seconds to wait for connections to close on SIGTERM before exiting anyway.
    #[arg(long, env = "SLEAP_RTC_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// Seconds between sweeps that delete rooms expired for over 7 days from storage, with their
    /// members, worker tokens and invites (until then an expired room is listed as expired and
    /// can be extended). With DynamoDB its TTL does this instead.
    #[arg(long, env = "SLEAP_RTC_ROOM_PURGE_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub room_purge_secs: u64,
}

impl Config {
    pub fn limits(&self) -> Limits {
        Limits {
            max_message_bytes: self.max_message_bytes,
            max_metadata_bytes: self.max_metadata_bytes,
            max_peers_per_room: self.max_peers_per_room,
            max_rooms: self.max_rooms,
            rate_per_sec: self.rate_limit,
            rate_burst: self.rate_burst,
            register_timeout_ms: self.register_timeout_secs.saturating_mul(1000),
            ..Limits::default()
        }
    }

    pub fn ice_servers(&self) -> Vec<IceServer> {
        self.ice_servers.iter().map(|u| IceServer { urls: vec![u.clone()], username: None, credential: None }).collect()
    }

    /// The TURN relays, if configured: reads the secret file.
    pub fn turn(&self) -> anyhow::Result<Option<TurnRest>> {
        let Some(path) = &self.turn_secret_file else { return Ok(None) };
        let secret =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--turn-secret-file {}: {e}", path.display()))?;
        let t = TurnRest::new(self.turn_urls.clone(), secret.trim_end().as_bytes(), self.turn_ttl_secs)
            .map_err(|e| anyhow::anyhow!("--turn-url/--turn-secret-file: {e}"))?;
        Ok(Some(t))
    }

    /// A config for tests and embedding: one loopback listener on a free port.
    pub fn local(data_dir: impl Into<PathBuf>) -> Config {
        let mut c = Config::parse_from(["sleap-rtc-server", "--listen", "127.0.0.1:0"]);
        c.data_dir = data_dir.into();
        c
    }
}
