//! sleap-rtc-server: the signaling server.
//!
//! One binary serves, on every listener, the HTTP API (accounts, rooms, invites, worker tokens,
//! health, metrics, JWKS) and WebSocket signaling on `/ws` and `/`. Room and peer rules live in
//! `sleap_rtc_core::room::Hub`; this crate does the I/O around it: sockets, storage, credential
//! checks, timers and shutdown.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod metrics;
pub mod openapi;
pub mod store;
pub mod ws;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sleap_rtc_core::room::{Hub, Millis, RateLimiter};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

pub use config::Config;

use crate::auth::Keys;
use crate::cluster::{Cluster, ClusterConfig};
use crate::metrics::Metrics;
use crate::store::dynamo::{DynamoStore, DynamoUrl};
use crate::store::{SqliteStore, Store};
use crate::ws::HubState;

/// Everything request handlers and connection tasks share.
pub struct AppState {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub keys: Keys,
    pub metrics: Metrics,
    pub hub: Mutex<HubState>,
    /// Set with `--redis`: the link to the other instances.
    pub cluster: Option<Arc<Cluster>>,
    next_conn: AtomicU64,
    live_sockets: AtomicUsize,
    socket_closed: Notify,
    draining: watch::Sender<bool>,
    ip_limits: Mutex<HashMap<IpAddr, RateLimiter>>,
}

impl AppState {
    /// Per-IP limit for unauthenticated auth endpoints (sign-in, join). Loopback is not exempt.
    /// With `--redis` the bucket is shared by every instance (the local one is the fallback
    /// while Redis does not answer).
    pub async fn allow_auth_call(&self, ip: IpAddr) -> bool {
        let per_sec = self.config.auth_rate_per_min / 60.0;
        let burst = self.config.auth_rate_per_min.max(1.0);
        if let Some(c) = &self.cluster
            && let Some(ok) = c.allow(&format!("auth:{ip}"), per_sec, burst).await
        {
            return ok;
        }
        let now = now_millis();
        let Ok(mut map) = self.ip_limits.lock() else { return false };
        if map.len() > 100_000 {
            map.retain(|_, l| !l.is_idle(now));
        }
        map.entry(ip).or_insert_with(|| RateLimiter::new(per_sec, burst, now)).allow(now)
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Reserves a WebSocket slot; `false` when at `--max-connections` or draining.
    fn reserve_socket(&self) -> bool {
        if self.is_draining() || self.cluster.as_ref().is_some_and(|c| !c.is_ready()) {
            return false;
        }
        let max = self.config.max_connections;
        self.live_sockets.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }
}

/// Current wall-clock time for the hub.
pub fn now_millis() -> Millis {
    Millis(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

/// Current wall-clock time in Unix seconds (storage timestamps).
pub fn unix_now() -> i64 {
    (now_millis().0 / 1000) as i64
}

/// Rooms deleted per store call: the SQLite store serves one call at a time, so a backlog (the
/// first sweep after an upgrade) must not hold it for long.
const PURGE_BATCH: usize = 500;

/// Deletes long-expired rooms from storage, every `--room-purge-secs` (and once at start). The
/// hub only evicts an expired room's live peers; without this the store kept every room forever.
async fn purge_expired_rooms(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(state.config.room_purge_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        loop {
            match state.store.purge_expired_rooms(unix_now(), PURGE_BATCH).await {
                Ok(n) => {
                    state.metrics.rooms_expired.inc_by(n);
                    if n > 0 {
                        tracing::info!(rooms = n, "deleted expired rooms");
                    }
                    if n < PURGE_BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot delete expired rooms; trying again at the next sweep");
                    break;
                }
            }
        }
    }
}

/// A running server.
pub struct Server {
    state: Arc<AppState>,
    addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

impl Server {
    /// Opens storage, loads or creates the signing key, binds every listener and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", config.data_dir.display()))?;
        let store: Arc<dyn Store> = match config.store.as_str() {
            "sqlite" => Arc::new(
                SqliteStore::open(&config.data_dir.join("sleap-rtc.sqlite"))
                    .map_err(|e| anyhow::anyhow!("cannot open database in {}: {e}", config.data_dir.display()))?,
            ),
            s if s.starts_with("dynamodb://") => {
                let url = DynamoUrl::parse(s).map_err(|e| anyhow::anyhow!("--store {e}"))?;
                let store = DynamoStore::connect(&url).await;
                if config.store_init {
                    store.init().await.map_err(|e| anyhow::anyhow!("--store-init on {s}: {e}"))?;
                }
                // Fail at start, not at the first sign-in (or the first use of a newer table).
                let usable = match store.health().await {
                    Ok(()) => store.check_tables().await,
                    Err(e) => Err(e),
                };
                usable.map_err(|e| {
                    anyhow::anyhow!(
                        "cannot use the DynamoDB tables {}-*: {e} (give --store-init to create them, and check \
                         the AWS credentials and region)",
                        url.prefix
                    )
                })?;
                Arc::new(store)
            }
            other => anyhow::bail!("--store {other}: expected sqlite or dynamodb://TABLE_PREFIX"),
        };
        Self::start_with_store(config, store).await
    }

    /// Like [`Server::start`] with a given storage backend.
    pub async fn start_with_store(config: Config, store: Arc<dyn Store>) -> anyhow::Result<Server> {
        // Idempotent; an embedder that installed a provider already keeps its own.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        if config.listen.is_empty() {
            anyhow::bail!("no --listen address given");
        }
        std::fs::create_dir_all(&config.data_dir)?;
        let ttl = config.jwt_ttl_hours.saturating_mul(3600);
        let keys = match &config.jwt_key_file {
            Some(f) => Keys::load(f, ttl)?,
            None => Keys::load_or_create(&config.data_dir, ttl)?,
        };
        let cluster = match &config.redis {
            Some(url) => Some(Cluster::new(ClusterConfig {
                url: url.clone(),
                prefix: config.redis_prefix.clone(),
                lease: Duration::from_secs(config.redis_lease_secs),
            })?),
            None => None,
        };
        let mut hub = Hub::new(config.limits());
        hub.set_ice_servers(config.ice_servers());
        hub.set_turn(config.turn()?);
        let (draining, _) = watch::channel(false);
        let state = Arc::new(AppState {
            store,
            keys,
            metrics: Metrics::new(),
            hub: Mutex::new(HubState::new(hub)),
            cluster,
            next_conn: AtomicU64::new(1),
            live_sockets: AtomicUsize::new(0),
            socket_closed: Notify::new(),
            draining,
            ip_limits: Mutex::new(HashMap::new()),
            config,
        });
        let (stop, _) = watch::channel(false);
        let mut tasks = Vec::new();
        if let Some(c) = state.cluster.clone() {
            let link = c.start(&state).await?;
            tasks.push(tokio::spawn(c.run(state.clone(), link, stop.subscribe())));
        }
        let mut addrs = Vec::new();
        for addr in state.config.listen.clone() {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            let local = listener.local_addr()?;
            addrs.push(local);
            let app = api::router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
            let mut stop_rx = stop.subscribe();
            tasks.push(tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                };
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                    tracing::error!(error = %e, "listener failed");
                }
            }));
            tracing::info!(%local, "listening (HTTP API, WebSocket on /ws and /)");
        }
        let ticker_state = state.clone();
        let mut stop_rx = stop.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = tick.tick() => ws::drive(&ticker_state, |hub| hub.handle_timeout(now_millis())),
                    _ = stop_rx.wait_for(|s| *s) => return,
                }
            }
        }));
        tasks.push(tokio::spawn(purge_expired_rooms(state.clone(), stop.subscribe())));
        Ok(Server { state, addrs, tasks, stop })
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Drains and stops: refuses new WebSockets, tells every peer the server is going away (close
    /// code 1001), waits up to the shutdown grace for sockets to close, then stops the listeners.
    pub async fn shutdown(self) {
        let _ = self.state.draining.send(true);
        ws::drive(&self.state, |hub| hub.close_all("server shutting down", now_millis()));
        let grace = Duration::from_secs(self.state.config.shutdown_grace_secs);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.state.socket_closed.notified();
            if self.state.live_sockets.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    open = self.state.live_sockets.load(Ordering::Acquire),
                    "shutdown grace elapsed with sockets still open"
                );
                break;
            }
        }
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(grace, t).await;
        }
    }
}
