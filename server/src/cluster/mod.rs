//! Several server instances sharing rooms through Redis (`--redis redis://...`).
//!
//! Each instance keeps, in its [`Hub`](sleap_rtc_core::room::Hub), a replica of every room: its
//! own peers and the other instances' peers. Redis is the sequencer and the source of truth for
//! who is where:
//!
//! - `P:room:{room}` (hash: peer → `instance:conn|principal`) and `P:data:{room}` (hash: peer →
//!   encoded `PeerUp`) hold every registered peer; `P:rooms` the live rooms; `P:expiry` their
//!   expiry (kept current by PATCHes, for instances that join later); `P:owned:{instance}` what
//!   each instance owns, so a dead instance's peers can be removed.
//! - `P:instances` lists the live instances; `P:lease:{instance}` expires unless the instance
//!   renews it every lease/3 (in a task and on a connection of its own, so load cannot delay
//!   it), so a crashed instance is noticed and reaped by the others within about 4/3 of a lease.
//! - `P:inbox:{instance}` is each instance's pub/sub channel. Every state change runs as one Lua
//!   script that checks, writes and publishes to every inbox atomically, so all instances see
//!   changes in one order; deliveries to a peer on another instance are published to that
//!   instance's inbox on the same connection, in the same pipeline, so a sender's messages keep
//!   their order.
//!
//! One Redis (a primary, optionally with replicas) is assumed, not Redis Cluster: the scripts
//! touch keys of many rooms. If Redis is lost, the instance closes its WebSockets (clients
//! reconnect, possibly elsewhere), refuses new ones and rejoins under a new instance id once
//! Redis is back, first removing what its previous id owned.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use sleap_rtc_core::cluster::ClusterMsg;
use sleap_rtc_core::room::{ConnId, Output, Publish};
use sleap_rtc_core::signal::{ErrorCode, SignalError};
use tokio::sync::{mpsc, watch};

use crate::{AppState, now_millis, ws};

mod scripts;

use scripts::Script;

/// Cluster settings from the command line.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub url: String,
    pub prefix: String,
    pub lease: Duration,
}

/// A job for the broker, in the order the hub produced it.
enum Job {
    Claim { conn: ConnId, up: Box<sleap_rtc_core::cluster::PeerUp> },
    Publish(Box<Publish>),
}

/// Session tag of jobs valid in any session: administrative broadcasts name no instance and
/// applying them twice is harmless, so one that could not be sent is sent after a rejoin.
const ANY_SESSION: u64 = 0;

/// Jobs queued for Redis beyond which the link counts as unable to keep up: the instance drops
/// its connections and rejoins rather than growing without bound.
const MAX_QUEUED: usize = 200_000;

/// The running cluster link, shared by request handlers and connection tasks.
pub struct Cluster {
    config: ClusterConfig,
    client: redis::Client,
    jobs: mpsc::UnboundedSender<(u64, Job)>,
    jobs_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<(u64, Job)>>>,
    queued: AtomicUsize,
    overloaded: AtomicBool,
    /// The Redis session this process is in, changed under the hub lock together with the hub's
    /// instance id, so a job's tag says which id its peers carry. Jobs of an older session are
    /// dropped (their connections were closed).
    session: AtomicU64,
    /// The id of the last session, reaped at the next join so its peers do not linger for a
    /// lease in everyone's replica.
    previous: AtomicU64,
    ready: AtomicBool,
    /// For the shared rate limiter; replaced on reconnect.
    con: tokio::sync::Mutex<Option<(MultiplexedConnection, Vec<String>)>>,
}

impl Cluster {
    pub fn new(config: ClusterConfig) -> anyhow::Result<Arc<Cluster>> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| anyhow::anyhow!("--redis {}: {e}", redact(&config.url)))?;
        let (jobs, rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Cluster {
            config,
            client,
            jobs,
            jobs_rx: std::sync::Mutex::new(Some(rx)),
            queued: AtomicUsize::new(0),
            overloaded: AtomicBool::new(false),
            session: AtomicU64::new(0),
            previous: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            con: tokio::sync::Mutex::new(None),
        }))
    }

    /// True while joined: signaling is only accepted then.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Queues the hub's cluster outputs (called under the hub lock, never blocks).
    pub fn submit(&self, out: Output) {
        let (session, job) = match out {
            Output::Claim { conn, up } => (self.session.load(Ordering::Acquire), Job::Claim { conn, up }),
            Output::Publish(p @ Publish::Broadcast(_)) => (ANY_SESSION, Job::Publish(Box::new(p))),
            Output::Publish(p) => (self.session.load(Ordering::Acquire), Job::Publish(Box::new(p))),
            _ => return,
        };
        if self.queued.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUED {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.overloaded.store(true, Ordering::Release);
            return;
        }
        let _ = self.jobs.send((session, job));
    }

    /// One shared token bucket per key across every instance. `None` if Redis could not answer
    /// (the caller falls back to its local limiter).
    pub async fn allow(&self, key: &str, per_sec: f64, burst: f64) -> Option<bool> {
        if !self.is_ready() {
            return None;
        }
        let guard = self.con.lock().await;
        let (con, shas) = guard.as_ref()?;
        let mut con = con.clone();
        let sha = shas.get(Script::Rate as usize)?.clone();
        drop(guard);
        let key = format!("{}:rate:{key}", self.config.prefix);
        let r: redis::RedisResult<i64> =
            redis::cmd("EVALSHA").arg(sha).arg(0).arg(key).arg(per_sec).arg(burst).query_async(&mut con).await;
        r.ok().map(|v| v == 1)
    }

    /// Connects, checks the signing key against the cluster's, joins and loads every room's
    /// peers into the hub. The first join is done before the server serves anything, so a
    /// misconfiguration fails the start, not the first registration.
    pub async fn start(self: &Arc<Self>, state: &Arc<AppState>) -> anyhow::Result<Link> {
        self.join(state).await
    }

    async fn connect(&self) -> anyhow::Result<MultiplexedConnection> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        self.client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to Redis at {}: {e}", redact(&self.config.url)))
    }

    async fn join(self: &Arc<Self>, state: &Arc<AppState>) -> anyhow::Result<Link> {
        let url = redact(&self.config.url);
        let mut con = self.connect().await?;
        let mut shas = Vec::with_capacity(Script::ALL.len());
        for s in Script::ALL {
            let sha: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(s.source())
                .query_async(&mut con)
                .await
                .map_err(|e| anyhow::anyhow!("Redis at {url} refused our Lua scripts: {e}"))?;
            shas.push(sha);
        }
        let prefix = self.config.prefix.clone();
        // Every instance must sign tickets and JWTs with the same key, or a JWT from one instance
        // is refused by the next.
        let kid_key = format!("{prefix}:kid");
        let _: Value = redis::cmd("SET").arg(&kid_key).arg(state.keys.kid()).arg("NX").query_async(&mut con).await?;
        let kid: String = redis::cmd("GET").arg(&kid_key).query_async(&mut con).await?;
        if kid != state.keys.kid() {
            anyhow::bail!(
                "this instance's JWT signing key (kid {}) differs from the cluster's (kid {kid}): give every \
                 instance the same key with --jwt-key-file (or copy jwt-ed25519.pem into each --data-dir); \
                 after rotating the key on every instance, delete the Redis key {kid_key}",
                state.keys.kid()
            );
        }
        let instance = loop {
            let id = u64::from_le_bytes(crate::auth::random_bytes::<8>()?);
            if id != 0 {
                break id;
            }
        };
        let mut pubsub = tokio::time::timeout(Duration::from_secs(5), self.client.get_async_pubsub())
            .await
            .map_err(|_| anyhow::anyhow!("timed out opening a Redis pub/sub connection to {url}"))?
            .map_err(|e| anyhow::anyhow!("cannot open a Redis pub/sub connection to {url}: {e}"))?;
        pubsub.subscribe(format!("{prefix}:inbox:{instance}")).await?;
        // Our peers from before a lost link: their releases were never sent. Drop them for
        // everyone now rather than after their lease.
        let previous = self.previous.load(Ordering::Acquire);
        if previous != 0 {
            reap(&mut con, &shas, &prefix, previous, true).await?;
        }
        let lease_ms = self.config.lease.as_millis() as u64;
        let (peers, expiries): (Vec<Vec<u8>>, Vec<String>) = redis::cmd("EVALSHA")
            .arg(&shas[Script::Join as usize])
            .arg(0)
            .arg(&prefix)
            .arg(instance)
            .arg(lease_ms)
            .query_async(&mut con)
            .await?;
        let mut bad = 0usize;
        let mut session = 0;
        ws::drive(state, |hub| {
            // The id and the session change together, under the hub lock: every job tagged
            // with the new session carries the new id.
            hub.set_cluster(instance);
            session = self.session.fetch_add(1, Ordering::AcqRel) + 1;
            let now = now_millis();
            for blob in &peers {
                match ClusterMsg::decode(blob) {
                    Ok(m) => hub.handle_cluster(m, now),
                    Err(_) => bad += 1,
                }
            }
            // After the peers: a PATCH since their registration left a newer expiry here.
            for pair in expiries.chunks_exact(2) {
                let expires_at = pair[1].parse::<u64>().ok();
                hub.handle_cluster(ClusterMsg::RoomExpiry { room_id: pair[0].clone(), expires_at }, now);
            }
        });
        if bad > 0 {
            tracing::warn!(bad, "skipped undecodable peer records in Redis (another version on this prefix?)");
        }
        self.previous.store(instance, Ordering::Release);
        *self.con.lock().await = Some((con.clone(), shas.clone()));
        let lease_con = self.connect().await?;
        self.overloaded.store(false, Ordering::Release);
        self.ready.store(true, Ordering::Release);
        tracing::info!(instance, peers = peers.len(), redis = %url, "joined the cluster");
        Ok(Link { instance, session, con, lease_con: Some(lease_con), shas, pubsub: Some(pubsub) })
    }

    /// Runs the link until `stop`; on losing Redis, closes local connections and rejoins.
    pub async fn run(self: Arc<Self>, state: Arc<AppState>, mut link: Link, mut stop: watch::Receiver<bool>) {
        let Some(mut rx) = self.jobs_rx.lock().ok().and_then(|mut g| g.take()) else { return };
        loop {
            let result = self.serve(&state, &mut link, &mut rx, &mut stop).await;
            self.ready.store(false, Ordering::Release);
            match result {
                Ok(()) => return,
                Err(e) => {
                    tracing::error!(error = %e, instance = link.instance, "lost the cluster; closing local connections")
                }
            }
            ws::drive(&state, |hub| {
                hub.close_all("signaling cluster unavailable; reconnect", now_millis());
                hub.leave_cluster();
            });
            loop {
                if *stop.borrow() {
                    return;
                }
                match self.join(&state).await {
                    Ok(l) => {
                        link = l;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rejoining the cluster");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = stop.changed() => {}
                        }
                    }
                }
            }
        }
    }

    async fn serve(
        &self,
        state: &Arc<AppState>,
        link: &mut Link,
        rx: &mut mpsc::UnboundedReceiver<(u64, Job)>,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let Some(pubsub) = link.pubsub.take() else { anyhow::bail!("no pub/sub connection") };
        let Some(lease_con) = link.lease_con.take() else { anyhow::bail!("no lease connection") };
        let mut inbox = pubsub.into_on_message();
        // The lease has its own task and connection: a busy pipeline or inbox must never delay
        // the renewal that keeps this instance's peers alive for the others.
        let mut lease = AbortOnDrop(tokio::spawn(keep_lease(
            lease_con,
            link.shas.clone(),
            self.config.prefix.clone(),
            link.instance,
            self.config.lease,
        )));
        let prefix = self.config.prefix.clone();
        let me = link.instance;
        while !*stop.borrow() {
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                }
                ended = &mut lease.0 => {
                    match ended {
                        Ok(Err(e)) => return Err(e),
                        _ => anyhow::bail!("the lease task ended"),
                    }
                }
                msg = inbox.next() => {
                    let Some(msg) = msg else { anyhow::bail!("Redis closed the pub/sub connection") };
                    let mut msgs = vec![msg];
                    while msgs.len() < 256 {
                        match futures_util::FutureExt::now_or_never(inbox.next()) {
                            Some(Some(m)) => msgs.push(m),
                            Some(None) => anyhow::bail!("Redis closed the pub/sub connection"),
                            None => break,
                        }
                    }
                    let mut bad = 0u64;
                    let decoded: Vec<ClusterMsg> = msgs
                        .iter()
                        .filter_map(|m| match ClusterMsg::decode(m.get_payload_bytes()) {
                            Ok(m) => Some(m),
                            Err(e) => {
                                bad += 1;
                                tracing::warn!(error = %e, "undecodable cluster message");
                                None
                            }
                        })
                        .collect();
                    state.metrics.cluster_received.inc_by(decoded.len() as u64);
                    state.metrics.cluster_decode_errors.inc_by(bad);
                    ws::drive(state, |hub| {
                        let now = now_millis();
                        for m in decoded {
                            hub.handle_cluster(m, now);
                        }
                    });
                }
                job = rx.recv() => {
                    let Some(first) = job else { return Ok(()) };
                    let mut batch = vec![first];
                    while batch.len() < 1024 {
                        match rx.try_recv() {
                            Ok(j) => batch.push(j),
                            Err(_) => break,
                        }
                    }
                    self.flush(state, link, batch).await?;
                    if self.overloaded.load(Ordering::Acquire) {
                        anyhow::bail!("more than {MAX_QUEUED} messages queued for Redis: it cannot keep up");
                    }
                }
            }
        }
        // Graceful stop: the hub already closed its connections; send their releases, then
        // leave so the others drop our peers now rather than after the lease.
        let mut batch = Vec::new();
        while let Ok(j) = rx.try_recv() {
            batch.push(j);
        }
        self.flush(state, link, batch).await?;
        reap(&mut link.con, &link.shas, &prefix, me, true).await?;
        self.previous.store(0, Ordering::Release);
        tracing::info!(instance = me, "left the cluster");
        Ok(())
    }

    /// Sends one batch as one pipeline (in order) and reports refused claims to the hub.
    async fn flush(&self, state: &Arc<AppState>, link: &mut Link, batch: Vec<(u64, Job)>) -> anyhow::Result<()> {
        let prefix = &self.config.prefix;
        let me = link.instance;
        let limits = &state.config;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // Per command: the claim it answers, or the broadcast to retry if the pipeline fails.
        let mut sent: Vec<(Option<ConnId>, Option<ClusterMsg>)> = Vec::new();
        let mut refused = Vec::new();
        self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        for (session, job) in batch {
            let current = session == link.session;
            let sha = |s: Script| link.shas[s as usize].as_str();
            match job {
                Job::Claim { conn, up } => {
                    if !current || up.at.instance != me {
                        // Asked for under a lost session: refuse rather than leave it hanging.
                        refused.push((conn, unavailable()));
                        continue;
                    }
                    let owner = format!("{}:{}", up.at.instance, up.at.conn);
                    let expiry = up.room_expires_at.map(|t| t.to_string()).unwrap_or_default();
                    let blob = ClusterMsg::PeerUp((*up).clone()).encode();
                    pipe.cmd("EVALSHA")
                        .arg(sha(Script::Claim))
                        .arg(0)
                        .arg(prefix)
                        .arg(me)
                        .arg(&up.room_id)
                        .arg(&up.peer_id)
                        .arg(owner)
                        .arg(up.principal_key())
                        .arg(limits.max_peers_per_room)
                        .arg(limits.max_rooms)
                        .arg(blob)
                        .arg(expiry);
                    sent.push((Some(conn), None));
                }
                Job::Publish(p) => match *p {
                    Publish::Broadcast(msg) => {
                        match &msg {
                            ClusterMsg::RoomExpiry { room_id, expires_at } => {
                                let expiry = expires_at.map(|t| t.to_string()).unwrap_or_default();
                                pipe.cmd("EVALSHA")
                                    .arg(sha(Script::Expiry))
                                    .arg(0)
                                    .arg(prefix)
                                    .arg(room_id)
                                    .arg(expiry)
                                    .arg(msg.encode());
                            }
                            _ => {
                                pipe.cmd("EVALSHA").arg(sha(Script::Broadcast)).arg(0).arg(prefix).arg(msg.encode());
                            }
                        }
                        sent.push((None, Some(msg)));
                    }
                    // The rest concern connections of this session only.
                    _ if !current => {}
                    Publish::Update(up) => {
                        let owner = format!("{}:{}", up.at.instance, up.at.conn);
                        let (room, peer) = (up.room_id.clone(), up.peer_id.clone());
                        let blob = ClusterMsg::PeerUp(*up).encode();
                        pipe.cmd("EVALSHA")
                            .arg(sha(Script::Update))
                            .arg(0)
                            .arg(prefix)
                            .arg(room)
                            .arg(peer)
                            .arg(owner)
                            .arg(blob);
                        sent.push((None, None));
                    }
                    Publish::Release { room_id, peer_id, at, reason } => {
                        let owner = format!("{}:{}", at.instance, at.conn);
                        let blob =
                            ClusterMsg::PeerDown { room_id: room_id.clone(), peer_id: peer_id.clone(), at, reason }
                                .encode();
                        pipe.cmd("EVALSHA")
                            .arg(sha(Script::Release))
                            .arg(0)
                            .arg(prefix)
                            .arg(me)
                            .arg(room_id)
                            .arg(peer_id)
                            .arg(owner)
                            .arg(blob);
                        sent.push((None, None));
                    }
                    Publish::Forward { instance, msg } => {
                        pipe.cmd("PUBLISH").arg(format!("{prefix}:inbox:{instance}")).arg(msg.encode());
                        sent.push((None, None));
                    }
                },
            }
        }
        let results: Vec<redis::RedisResult<Value>> = if sent.is_empty() {
            Vec::new()
        } else {
            match pipe.query_async(&mut link.con).await {
                Ok(r) => r,
                Err(e) => {
                    for (conn, retry) in sent {
                        if let Some(c) = conn {
                            refused.push((c, unavailable()));
                        }
                        if let Some(msg) = retry {
                            // Sent again after the rejoin.
                            self.queued.fetch_add(1, Ordering::AcqRel);
                            let _ = self.jobs.send((ANY_SESSION, Job::Publish(Box::new(Publish::Broadcast(msg)))));
                        }
                    }
                    report(state, refused);
                    return Err(e.into());
                }
            }
        };
        state.metrics.cluster_sent.inc_by(sent.len() as u64);
        let mut gone = false;
        for ((conn, _), r) in sent.into_iter().zip(results) {
            let Some(conn) = conn else {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cluster publish failed");
                }
                continue;
            };
            let verdict = match r {
                Ok(Value::SimpleString(s)) => s,
                Ok(Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
                Ok(other) => format!("{other:?}"),
                Err(e) => format!("error: {e}"),
            };
            let err = match verdict.as_str() {
                "OK" => continue,
                "TAKEN" => SignalError::new(ErrorCode::PeerIdTaken, "this peer id is already in use in this room"),
                "ROOM_FULL" => SignalError::new(
                    ErrorCode::RoomFull,
                    format!("room has reached its limit of {} peers", limits.max_peers_per_room),
                ),
                "SERVER_FULL" => SignalError::new(ErrorCode::ServerFull, "server has reached its room limit"),
                "GONE" => {
                    gone = true;
                    unavailable()
                }
                other => {
                    tracing::error!(verdict = other, "unexpected answer to a cluster claim");
                    unavailable()
                }
            };
            refused.push((conn, err));
        }
        report(state, refused);
        if gone {
            anyhow::bail!("the cluster declared this instance down (lease not renewed in time)");
        }
        Ok(())
    }
}

fn report(state: &Arc<AppState>, refused: Vec<(ConnId, SignalError)>) {
    if refused.is_empty() {
        return;
    }
    ws::drive(state, |hub| {
        let now = now_millis();
        for (c, e) in refused {
            hub.complete_claim(c, e, now);
        }
    });
}

/// Renews this instance's lease every third of it and reaps instances whose lease lapsed.
/// Returns only on failure (Redis lost, or this instance was declared down).
async fn keep_lease(
    mut con: MultiplexedConnection,
    shas: Vec<String>,
    prefix: String,
    me: u64,
    lease: Duration,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lease_ms = lease.as_millis() as u64;
    loop {
        tick.tick().await;
        let alive: i64 = redis::cmd("EVALSHA")
            .arg(&shas[Script::Renew as usize])
            .arg(0)
            .arg(&prefix)
            .arg(me)
            .arg(lease_ms)
            .query_async(&mut con)
            .await?;
        if alive != 1 {
            anyhow::bail!("the cluster declared this instance down (lease not renewed in time)");
        }
        let dead: Vec<String> =
            redis::cmd("EVALSHA").arg(&shas[Script::Dead as usize]).arg(0).arg(&prefix).query_async(&mut con).await?;
        for d in dead {
            let Ok(id) = d.parse::<u64>() else { continue };
            if reap(&mut con, &shas, &prefix, id, false).await? {
                tracing::warn!(instance = id, "reaped a server instance whose lease expired");
            }
        }
    }
}

/// Removes an instance and its peers from the cluster, telling every other instance. Unless
/// `force` (ourselves, leaving or rejoining), only if its lease has lapsed. True if it was there.
async fn reap(
    con: &mut MultiplexedConnection,
    shas: &[String],
    prefix: &str,
    instance: u64,
    force: bool,
) -> redis::RedisResult<bool> {
    let blob = ClusterMsg::InstanceDown { instance }.encode();
    let reaped: i64 = redis::cmd("EVALSHA")
        .arg(&shas[Script::Reap as usize])
        .arg(0)
        .arg(prefix)
        .arg(instance)
        .arg(blob)
        .arg(if force { "1" } else { "0" })
        .query_async(con)
        .await?;
    Ok(reaped == 1)
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The connections of one cluster session.
pub struct Link {
    instance: u64,
    session: u64,
    con: MultiplexedConnection,
    lease_con: Option<MultiplexedConnection>,
    shas: Vec<String>,
    pubsub: Option<redis::aio::PubSub>,
}

fn unavailable() -> SignalError {
    SignalError::new(ErrorCode::Internal, "signaling cluster unavailable; try again")
}

/// The URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(at)) if at > scheme.len() + 3 => {
            let host = &url[at + 1..];
            let user = rest.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(super::redact("redis://:hunter2@cache:6379/0"), "redis://:***@cache:6379/0");
        assert_eq!(super::redact("rediss://app:pw@cache:6379"), "rediss://app:***@cache:6379");
        assert_eq!(super::redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
