//! WebSocket connections: one task per connection drives the shared [`Hub`] and a bounded
//! outbound queue.
//!
//! The hub sits behind one mutex. A frame is decoded outside it, handled inside it, and its outputs
//! are serialized and queued (`try_send`, never awaiting) before the lock is released, so per-sender
//! ordering holds and a slow receiver can never stall a sender: when a receiver's queue is full it
//! is closed as a slow consumer instead.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use sleap_rtc_core::room::{CloseCode, ConnId, Grant, Hub, Output, Principal, RegisterRequest};
use sleap_rtc_core::signal::{Credential, ErrorCode, ServerEnvelope, ServerMessage, SignalError};
use tokio::sync::{mpsc, oneshot};

use crate::auth::{ACCOUNT_KEY_PREFIX, hash_secret, secret_matches, short_suffix};
use crate::metrics::{CodeLabel, ResultLabel};
use crate::{AppState, now_millis, unix_now};

/// What the hub mutex guards: the state machine plus the queue of every live connection.
pub struct HubState {
    pub hub: Hub,
    conns: std::collections::HashMap<ConnId, ConnHandle>,
}

struct ConnHandle {
    tx: mpsc::Sender<Message>,
    kill: Option<oneshot::Sender<(CloseCode, String)>>,
}

impl HubState {
    pub fn new(hub: Hub) -> Self {
        HubState { hub, conns: Default::default() }
    }
}

/// Runs `f` on the hub, then carries out every output. Slow consumers found while queueing are
/// closed through the hub too, so their rooms see `peer_left`.
pub fn drive(state: &Arc<AppState>, f: impl FnOnce(&mut Hub)) {
    let auth = {
        let Ok(mut guard) = state.hub.lock() else { return };
        f(&mut guard.hub);
        flush(state, &mut guard)
    };
    for (conn, request) in auth {
        spawn_auth(state, conn, request);
    }
}

/// Carries out the hub's pending outputs under the lock; returns the credential checks to start.
fn flush(state: &AppState, st: &mut HubState) -> Vec<(ConnId, Box<RegisterRequest>)> {
    let mut auth = Vec::new();
    {
        let mut slow = Vec::new();
        loop {
            while let Some(out) = st.hub.poll_output() {
                match out {
                    Output::Send { to, msg } => {
                        if let sleap_rtc_core::signal::ServerMessage::Error { code, .. } = &msg.msg {
                            state.metrics.errors.get_or_create(&CodeLabel { code: code.as_str().into() }).inc();
                        }
                        let text = Utf8Bytes::from(msg.to_json());
                        for c in to {
                            let Some(h) = st.conns.get(&c) else { continue };
                            match h.tx.try_send(Message::Text(text.clone())) {
                                Ok(()) => {
                                    state.metrics.messages_delivered.inc();
                                }
                                Err(mpsc::error::TrySendError::Full(_)) => slow.push(c),
                                Err(mpsc::error::TrySendError::Closed(_)) => {}
                            }
                        }
                    }
                    Output::Close { conn, code, reason } => {
                        state.metrics.closes.get_or_create(&CodeLabel { code: code.code().to_string() }).inc();
                        if let Some(mut h) = st.conns.remove(&conn)
                            && let Some(k) = h.kill.take()
                        {
                            let _ = k.send((code, reason));
                        }
                    }
                    Output::Authenticate { conn, request } => auth.push((conn, request)),
                    out @ (Output::Claim { .. } | Output::Publish(_)) => {
                        if let Some(c) = &state.cluster {
                            c.submit(out);
                        }
                    }
                    Output::IssueTicket { conn, request_id, ticket } => {
                        // Signing is ~20 µs of ed25519; cheap enough to do under the lock, and
                        // it keeps the reply ordered with everything else sent to `conn`.
                        let msg = match state.keys.issue_ticket(&ticket, unix_now()) {
                            Ok(ticket) => ServerMessage::PeerTicket { ticket },
                            Err(e) => {
                                tracing::error!(error = %e, "cannot sign a peer ticket");
                                SignalError::new(ErrorCode::Internal, "cannot sign a ticket").into()
                            }
                        };
                        let env = ServerEnvelope::reply(msg, request_id);
                        if let Some(h) = st.conns.get(&conn)
                            && let Err(mpsc::error::TrySendError::Full(_)) =
                                h.tx.try_send(Message::Text(Utf8Bytes::from(env.to_json())))
                        {
                            slow.push(conn);
                        }
                    }
                }
            }
            if slow.is_empty() {
                break;
            }
            let now = now_millis();
            for c in slow.drain(..) {
                st.hub.close(c, CloseCode::SlowConsumer, "slow consumer: outbound queue full", now);
            }
        }
    }
    auth
}

fn spawn_auth(state: &Arc<AppState>, conn: ConnId, request: Box<RegisterRequest>) {
    let state = state.clone();
    tokio::spawn(async move {
        let verdict = verify_registration(&state, &request).await;
        let result = if verdict.is_ok() { "ok" } else { "refused" };
        state.metrics.registrations.get_or_create(&ResultLabel { result: result.into() }).inc();
        drive(&state, |hub| hub.complete_register(conn, verdict, now_millis()));
    });
}

/// Serves one upgraded WebSocket until either side closes it.
pub async fn serve_socket(state: Arc<AppState>, socket: WebSocket, peer: SocketAddr) {
    let conn = ConnId(state.next_conn.fetch_add(1, Ordering::Relaxed));
    let (tx, mut rx) = mpsc::channel::<Message>(state.config.outbound_queue.max(1));
    let (kill_tx, mut kill_rx) = oneshot::channel::<(CloseCode, String)>();
    {
        let Ok(mut st) = state.hub.lock() else {
            state.live_sockets.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        st.conns.insert(conn, ConnHandle { tx, kill: Some(kill_tx) });
    }
    drive(&state, |hub| hub.connect(conn, now_millis()));
    state.metrics.connections_total.inc();
    state.metrics.connections.inc();
    tracing::debug!(?conn, %peer, "websocket connected");

    let (mut sink, mut stream) = socket.split();
    let last_seen = Arc::new(std::sync::Mutex::new(Instant::now()));
    let ping_every = Duration::from_secs(state.config.ping_secs.max(1));
    let write_timeout = Duration::from_secs(10);

    let writer = {
        let last_seen = last_seen.clone();
        async move {
            let mut ping = tokio::time::interval(ping_every);
            ping.tick().await;
            loop {
                tokio::select! {
                    biased;
                    kill = &mut kill_rx => {
                        let (code, reason) = kill.unwrap_or((CloseCode::GoingAway, String::new()));
                        // Flush what was queued before the close (e.g. room_closed), unless the
                        // close is because the peer does not read.
                        if code != CloseCode::SlowConsumer {
                            while let Ok(m) = rx.try_recv() {
                                if tokio::time::timeout(write_timeout, sink.send(m)).await.map_or(true, |r| r.is_err()) {
                                    return;
                                }
                            }
                        }
                        let frame = CloseFrame { code: code.code(), reason: Utf8Bytes::from(reason) };
                        let _ = tokio::time::timeout(write_timeout, sink.send(Message::Close(Some(frame)))).await;
                        return;
                    }
                    m = rx.recv() => {
                        let Some(m) = m else { return };
                        if tokio::time::timeout(write_timeout, sink.send(m)).await.map_or(true, |r| r.is_err()) {
                            return;
                        }
                    }
                    _ = ping.tick() => {
                        let idle = last_seen.lock().map(|t| t.elapsed()).unwrap_or_default();
                        if idle > ping_every * 3 {
                            let frame = CloseFrame { code: 1011, reason: Utf8Bytes::from_static("keepalive timeout") };
                            let _ = tokio::time::timeout(write_timeout, sink.send(Message::Close(Some(frame)))).await;
                            return;
                        }
                        if tokio::time::timeout(write_timeout, sink.send(Message::Ping(Default::default()))).await.map_or(true, |r| r.is_err()) {
                            return;
                        }
                    }
                }
            }
        }
    };

    let reader = {
        let state = state.clone();
        async move {
            let max = state.config.max_message_bytes;
            while let Some(Ok(msg)) = stream.next().await {
                if let Ok(mut t) = last_seen.lock() {
                    *t = Instant::now();
                }
                match msg {
                    Message::Text(text) => {
                        let started = Instant::now();
                        state.metrics.frames_received.inc();
                        let decoded = sleap_rtc_core::signal::decode(text.as_str(), max);
                        drive(&state, |hub| hub.handle(conn, decoded, now_millis()));
                        state.metrics.handle_seconds.observe(started.elapsed().as_secs_f64());
                    }
                    Message::Binary(_) => {
                        let err = SignalError::new(
                            ErrorCode::InvalidMessage,
                            "binary frames are not part of the signaling protocol; send JSON text",
                        );
                        drive(&state, |hub| {
                            hub.handle(
                                conn,
                                Err(sleap_rtc_core::signal::DecodeError { error: err, request_id: None }),
                                now_millis(),
                            )
                        });
                    }
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
        }
    };

    tokio::pin!(writer, reader);
    tokio::select! {
        _ = &mut writer => {
            // We closed (or the peer stopped reading): give the peer a moment to answer the close
            // handshake, but never wait on it indefinitely.
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut reader).await;
        }
        _ = &mut reader => {}
    }
    drive(&state, |hub| hub.disconnect(conn, now_millis()));
    if let Ok(mut st) = state.hub.lock() {
        st.conns.remove(&conn);
    }
    state.metrics.connections.dec();
    state.live_sockets.fetch_sub(1, Ordering::AcqRel);
    state.socket_closed.notify_waiters();
    tracing::debug!(?conn, "websocket closed");
}

fn refuse(code: ErrorCode, msg: impl Into<String>) -> SignalError {
    SignalError::new(code, msg)
}

fn backend(e: crate::store::StoreError) -> SignalError {
    tracing::error!(error = %e, "storage error during registration");
    refuse(ErrorCode::Internal, "storage unavailable; try again")
}

fn no_randomness(e: crate::auth::NoRandomness) -> SignalError {
    tracing::error!(error = %e, "cannot make a peer id during registration");
    refuse(ErrorCode::Internal, "no system randomness; try again")
}

/// Keeps only characters valid in peer ids so a worker name can prefix a default id.
fn id_part(s: &str) -> String {
    let p: String = s.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).take(40).collect();
    if p.is_empty() { "peer".into() } else { p }
}

/// Checks a `register`'s credential against storage and turns it into a [`Grant`].
async fn verify_registration(state: &AppState, req: &RegisterRequest) -> Result<Grant, SignalError> {
    let store = &state.store;
    let now = unix_now();
    let (user_id, credential_id, room_id, worker_name, token_echo, base) = match &req.credential {
        Credential::ApiKey(key) if key.starts_with(ACCOUNT_KEY_PREFIX) => {
            let k = store
                .find_account_key(&hash_secret(key))
                .await
                .map_err(backend)?
                .ok_or_else(|| refuse(ErrorCode::AuthFailed, "Invalid API key"))?;
            if k.expires_at.is_some_and(|t| t <= now) {
                return Err(refuse(ErrorCode::AuthFailed, "Token expired"));
            }
            let room_id = req
                .room_id
                .clone()
                .ok_or_else(|| refuse(ErrorCode::InvalidMessage, "room_id required for account key auth"))?;
            let user = store.get_user(&k.user_id).await.map_err(backend)?;
            let base = format!("{}-{}", id_part(&req.role), id_part(user.as_ref().map_or("user", |u| &u.username)));
            (k.user_id, format!("acct:{}", k.id), room_id, Some(k.name), None, base)
        }
        Credential::ApiKey(key) => {
            let t = store
                .find_worker_token(&hash_secret(key))
                .await
                .map_err(backend)?
                .ok_or_else(|| refuse(ErrorCode::AuthFailed, "Invalid API key"))?;
            if t.revoked_at.is_some() {
                return Err(refuse(ErrorCode::AuthFailed, "Token revoked"));
            }
            if !t.is_active(now) {
                return Err(refuse(ErrorCode::AuthFailed, "Token expired"));
            }
            if req.room_id.as_ref().is_some_and(|r| *r != t.room_id) {
                return Err(refuse(ErrorCode::AuthFailed, "this worker token belongs to another room"));
            }
            let base = format!("worker-{}", id_part(&t.worker_name));
            (t.user_id, format!("wt:{}", t.id), t.room_id, Some(t.worker_name), None, base)
        }
        Credential::Jwt(jwt) => {
            let claims =
                state.keys.verify(jwt).map_err(|e| refuse(ErrorCode::AuthFailed, format!("Invalid token: {e}")))?;
            let room_id = req
                .room_id
                .clone()
                .ok_or_else(|| refuse(ErrorCode::InvalidMessage, "room_id required for JWT auth"))?;
            let base = format!("{}-{}", id_part(&req.role), id_part(&claims.username));
            (claims.sub.clone(), format!("user:{}", claims.sub), room_id, None, None, base)
        }
        Credential::IdToken { id_token, room_token } => {
            let claims = state
                .keys
                .verify(id_token)
                .map_err(|e| refuse(ErrorCode::AuthFailed, format!("Invalid token: {e}")))?;
            let room_id = req.room_id.clone().unwrap_or_default();
            let room = store
                .get_room(&room_id)
                .await
                .map_err(backend)?
                .ok_or_else(|| refuse(ErrorCode::RoomNotFound, "Room not found"))?;
            if !secret_matches(room_token, &room.token_hash) {
                return Err(refuse(ErrorCode::AuthFailed, "Invalid token"));
            }
            let base = format!("{}-{}", id_part(&req.role), id_part(&claims.username));
            (claims.sub, format!("room-token:{room_id}"), room_id, None, Some(room_token.clone()), base)
        }
    };
    let room = store
        .get_room(&room_id)
        .await
        .map_err(backend)?
        .ok_or_else(|| refuse(ErrorCode::RoomNotFound, "Room not found"))?;
    if room.is_expired(now) {
        return Err(refuse(ErrorCode::RoomExpired, "Room expired"));
    }
    // Room tokens are a capability of their own (legacy path); every other credential needs a
    // current membership of the room.
    if token_echo.is_none() && store.get_member(&room_id, &user_id).await.map_err(backend)?.is_none() {
        return Err(refuse(ErrorCode::AuthFailed, "No access to this room"));
    }
    Ok(Grant {
        room_id,
        default_peer_id: format!("{base}-{}", short_suffix().map_err(no_randomness)?),
        principal: Principal { user_id, credential_id },
        room_expires_at: room.expires_at.map(|t| sleap_rtc_core::room::Millis((t.max(0) as u64).saturating_mul(1000))),
        token_echo,
        worker_name,
    })
}
