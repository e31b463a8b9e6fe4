//! Shared set-up for the runtime's integration tests: a real signaling server on 127.0.0.1:0,
//! a signed-in user, a room and a worker token, and helpers to connect two peers through it.
#![allow(dead_code)]

use std::time::Duration;

use sleap_rtc_core::signal::{Register, ServerMessage};
use sleap_rtc_tokio::{ConnError, PeerConnection, PeerOptions, SignalingClient, accept, connect};

pub struct Env {
    pub server: sleap_rtc_server::Server,
    _dir: tempfile::TempDir,
    pub ws: String,
    pub jwt: String,
    pub room: String,
    pub token: String,
}

pub async fn env() -> Env {
    env_with(|_| {}).await
}

pub async fn env_with(tweak: impl FnOnce(&mut sleap_rtc_server::Config)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sleap_rtc_server::Config::local(dir.path());
    cfg.auth_rate_per_min = 1e6;
    tweak(&mut cfg);
    let server = sleap_rtc_server::Server::start(cfg).await.unwrap();
    let (jwt, room, token) = data::sign_in(&format!("http://{}", server.local_addrs()[0])).await;
    Env { ws: format!("ws://{}/ws", server.local_addrs()[0]), server, _dir: dir, jwt, room, token }
}

impl Env {
    /// Registered with the worker token.
    pub async fn worker(&self) -> SignalingClient {
        let reg = Register { role: Some("worker".into()), api_key: Some(self.token.clone()), ..Default::default() };
        SignalingClient::connect(&self.ws, reg).await.unwrap()
    }

    /// Registered with the user's JWT, with this peer id (or a server-assigned one).
    pub async fn client_as(&self, peer_id: Option<&str>) -> SignalingClient {
        let reg = Register {
            role: Some("client".into()),
            jwt: Some(self.jwt.clone()),
            room_id: Some(self.room.clone()),
            peer_id: peer_id.map(str::to_owned),
            ..Default::default()
        };
        SignalingClient::connect(&self.ws, reg).await.unwrap()
    }

    pub async fn client(&self) -> SignalingClient {
        self.client_as(None).await
    }
}

/// Waits for the next `offer` on a signaling connection.
pub async fn next_offer(sig: &SignalingClient) -> ServerMessage {
    loop {
        // Generous: a Python peer needs seconds just to import aiortc.
        let ev =
            tokio::time::timeout(Duration::from_secs(60), sig.next_event()).await.expect("an offer arrives").unwrap();
        if let ServerMessage::Offer(_) = ev.msg {
            return ev.msg;
        }
    }
}

/// `from` offers a loopback connection to `to`, which accepts it.
pub async fn pair(
    from: &SignalingClient,
    to: &SignalingClient,
) -> (Result<PeerConnection, ConnError>, Result<PeerConnection, ConnError>) {
    pair_with(from, to, PeerOptions::loopback()).await
}

/// Like [`pair`], both sides with `opts`.
pub async fn pair_with(
    from: &SignalingClient,
    to: &SignalingClient,
    opts: PeerOptions,
) -> (Result<PeerConnection, ConnError>, Result<PeerConnection, ConnError>) {
    tokio::join!(connect(from, to.peer_id(), opts.clone()), async {
        let offer = next_offer(to).await;
        accept(to, &offer, opts).await
    })
}

#[path = "../../../driver/conformance/data.rs"]
mod data;
// Not every test binary that includes `common` writes test data.
#[allow(unused_imports)]
pub use data::write_random;
