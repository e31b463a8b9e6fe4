//! Signaling client: one WebSocket to a sleap-rtc (or upstream-compatible) signaling server.
//!
//! A single reader task owns the socket's read half and routes every incoming message: replies
//! that carry a `request_id` we are waiting for complete that request; WebRTC relay messages
//! (`offer`/`answer`/`candidate`) from a peer someone subscribed to go to that subscription;
//! everything else goes to [`SignalingClient::next_event`]. So concurrent requests and relays
//! never steal each other's frames (a flaw of the upstream clients).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_tungstenite::tungstenite::Message;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sleap_rtc_core::signal::{
    ErrorCode, Filters, IceServer, PeerInfo, Register, RequestId, ServerEnvelope, ServerMessage,
};
use tokio::sync::{mpsc, oneshot};

use crate::Runtime;

#[derive(Debug, thiserror::Error)]
pub enum SignalingError {
    #[error("cannot connect to the signaling server at {url}: {source}")]
    Connect { url: String, source: async_tungstenite::tungstenite::Error },
    #[error("the signaling connection closed")]
    Closed,
    #[error("the server refused: {code}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("no answer from the signaling server within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

/// What `registered_auth` told us.
#[derive(Debug, Clone)]
pub struct Registered {
    pub room_id: String,
    pub peer_id: String,
    pub peers: Vec<String>,
    pub ice_servers: Vec<IceServer>,
}

type Pending = Arc<Mutex<HashMap<i64, oneshot::Sender<ServerEnvelope>>>>;
type Relays = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<ServerMessage>>>>;

/// A registered signaling connection on runtime `R`. Cheap to share by reference; the reader
/// task ends when the socket closes.
pub struct SignalingClient<R> {
    out: mpsc::UnboundedSender<Message>,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<ServerEnvelope>>,
    pending: Pending,
    relays: Relays,
    next_id: AtomicI64,
    registered: Registered,
    timeout: Duration,
    // `fn() -> R`: the client holds no `R`, so it is Send and Sync whatever `R` is.
    _rt: PhantomData<fn() -> R>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl<R: Runtime> SignalingClient<R> {
    /// Connects to `url` (e.g. `ws://host:8080/ws`) and registers. Fails with the server's
    /// reason if registration is refused.
    pub async fn connect(url: &str, register: Register) -> Result<SignalingClient<R>, SignalingError> {
        let ws = R::ws_connect(url.to_owned())
            .await
            .map_err(|source| SignalingError::Connect { url: url.to_owned(), source })?;
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let (ev_tx, events) = mpsc::unbounded_channel();
        let pending: Pending = Default::default();
        let relays: Relays = Default::default();
        R::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        {
            let (pending, relays) = (pending.clone(), relays.clone());
            R::spawn(async move {
                while let Some(Ok(m)) = stream.next().await {
                    let Message::Text(t) = m else { continue };
                    let Ok(env) = ServerEnvelope::from_json(t.as_str()) else {
                        tracing::debug!(frame = %t.as_str(), "ignoring unparseable signaling frame");
                        continue;
                    };
                    if let Some(RequestId::Num(id)) = env.request_id {
                        let waiter = pending.lock().ok().and_then(|mut p| p.remove(&id));
                        if let Some(w) = waiter {
                            let _ = w.send(env);
                            continue;
                        }
                    }
                    // Answers and candidates belong to a connection being set up; an offer is
                    // always a new connection and goes to `next_event`.
                    let from = match &env.msg {
                        ServerMessage::Answer(o) | ServerMessage::Candidate(o) => {
                            o.get("sender").and_then(Value::as_str).map(str::to_owned)
                        }
                        _ => None,
                    };
                    if let Some(from) = from {
                        let sink = relays.lock().ok().and_then(|r| r.get(&from).cloned());
                        if let Some(s) = sink {
                            if s.send(env.msg.clone()).is_ok() {
                                continue;
                            }
                            if let Ok(mut r) = relays.lock() {
                                r.remove(&from);
                            }
                        }
                    }
                    if ev_tx.send(env).is_err() {
                        break;
                    }
                }
                // Wake every waiter: the connection is gone.
                if let Ok(mut p) = pending.lock() {
                    p.clear();
                }
            });
        }
        let mut client = SignalingClient {
            out,
            events: tokio::sync::Mutex::new(events),
            pending,
            relays,
            next_id: AtomicI64::new(1),
            registered: Registered {
                room_id: String::new(),
                peer_id: String::new(),
                peers: vec![],
                ice_servers: vec![],
            },
            timeout: REQUEST_TIMEOUT,
            _rt: PhantomData,
        };
        let mut msg = serde_json::to_value(&register).unwrap_or_default();
        msg["type"] = json!("register");
        match client.request(msg).await?.msg {
            ServerMessage::RegisteredAuth { room_id, peer_id, peer_list, ice_servers, .. } => {
                client.registered = Registered { room_id, peer_id, peers: peer_list, ice_servers };
                Ok(client)
            }
            other => Err(SignalingError::Unexpected(format!("{other:?}"))),
        }
    }

    pub fn registered(&self) -> &Registered {
        &self.registered
    }

    pub fn peer_id(&self) -> &str {
        &self.registered.peer_id
    }

    /// Sends a message without waiting for a reply.
    pub fn send(&self, msg: Value) -> Result<(), SignalingError> {
        self.out.send(Message::text(msg.to_string())).map_err(|_| SignalingError::Closed)
    }

    /// Sends a message with a fresh `request_id` and waits for the reply that echoes it. Error
    /// replies become [`SignalingError::Refused`].
    pub async fn request(&self, mut msg: Value) -> Result<ServerEnvelope, SignalingError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        msg["request_id"] = json!(id);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().map_err(|_| SignalingError::Closed)?.insert(id, tx);
        self.send(msg)?;
        let env = match crate::timeout::<R, _>(self.timeout, rx).await {
            Err(_) => {
                if let Ok(mut p) = self.pending.lock() {
                    p.remove(&id);
                }
                return Err(SignalingError::Timeout(self.timeout));
            }
            Ok(Err(_)) => return Err(SignalingError::Closed),
            Ok(Ok(env)) => env,
        };
        if let ServerMessage::Error { code, message, .. } = &env.msg {
            return Err(SignalingError::Refused { code: code.clone(), message: message.clone() });
        }
        Ok(env)
    }

    /// Peers of the room matching `filters`.
    pub async fn discover(&self, filters: Filters) -> Result<Vec<PeerInfo>, SignalingError> {
        match self.request(json!({"type": "discover_peers", "filters": filters})).await?.msg {
            ServerMessage::PeerList { peers, .. } => Ok(peers),
            other => Err(SignalingError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Merges into our metadata (`update_metadata`).
    pub async fn update_metadata(&self, metadata: Value) -> Result<(), SignalingError> {
        self.request(json!({"type": "update_metadata", "metadata": metadata})).await.map(|_| ())
    }

    /// Routes `offer`/`answer`/`candidate` messages from `peer` to the returned receiver
    /// instead of [`SignalingClient::next_event`], until it is dropped.
    pub fn subscribe_relays(&self, peer: &str) -> mpsc::UnboundedReceiver<ServerMessage> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut r) = self.relays.lock() {
            r.insert(peer.to_owned(), tx);
        }
        rx
    }

    /// Next message nobody else claimed (presence, peer messages, offers from new peers...).
    /// `None` once the connection is closed.
    pub async fn next_event(&self) -> Option<ServerEnvelope> {
        self.events.lock().await.recv().await
    }
}
