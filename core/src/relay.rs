//! One TURN allocation (RFC 8656 over UDP), sans-IO: the relayed address a peer offers as its
//! `typ relay` candidate when no direct path exists.
//!
//! The protocol is `turn-client-proto`'s; this module adds what a WebRTC peer needs around it:
//! permissions and a channel for each remote address ICE talks to (made on first use, so the
//! caller only says "send this to that peer"), one error type, and our time base. Time comes in
//! as `std::time::Instant`; the crate counts from a base given at construction.
//!
//! The driver owns the socket: datagrams from the TURN server go to [`Relay::handle_receive`],
//! and a session transmit whose source is [`Relay::relayed`] goes to [`Relay::send`]. What either
//! yields, and [`Relay::poll_transmit`], is sent from the allocation's local socket to
//! [`Relay::server`].

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use turn_client_proto::api::{TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::prelude::*;
use turn_client_proto::stun::Instant as TurnInstant;
use turn_client_proto::stun::agent::Transmit;
use turn_client_proto::types::{TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

/// Where an allocation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayState {
    Allocating,
    /// The server relays for us from this address.
    Allocated(SocketAddr),
    /// The server refused (wrong credentials, quota) or stopped answering; nothing more will
    /// happen on this allocation.
    Failed(String),
}

/// What a datagram from the TURN server's address was.
#[derive(Debug, PartialEq, Eq)]
pub enum Relayed {
    /// Not TURN traffic of this allocation: hand it to the session as any other datagram.
    NotOurs,
    /// A TURN control message (an answer, a refresh), consumed.
    Handled,
    /// Data a remote peer sent to our relayed address.
    Peer { from: SocketAddr, data: Vec<u8> },
}

/// Why a datagram could not be sent through the relay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    #[error("the TURN allocation is not ready")]
    NotAllocated,
    /// A permission for the peer was asked for; ICE retransmits, so the datagram is dropped.
    #[error("waiting for the TURN server to permit {0}")]
    AwaitingPermission(IpAddr),
    #[error("the TURN server refused a permission for {0}")]
    PermissionRefused(IpAddr),
    #[error("TURN send failed: {0}")]
    Send(String),
}

#[derive(Debug)]
pub struct Relay {
    client: TurnClientUdp,
    base: Instant,
    server: SocketAddr,
    local: SocketAddr,
    state: RelayState,
    asked_permission: HashSet<IpAddr>,
    refused: HashSet<IpAddr>,
    asked_channel: HashSet<SocketAddr>,
    /// A request was queued or an answer consumed since the last [`Relay::take_dirty`]: the
    /// caller should poll for transmits and a new timeout.
    dirty: bool,
}

impl Relay {
    /// Starts allocating on `server` from the local socket `local`, with the long-term
    /// credentials the signaling server handed out.
    pub fn new(local: SocketAddr, server: SocketAddr, username: &str, password: &str, now: Instant) -> Relay {
        let config = TurnConfig::new(TurnCredentials::new(username, password));
        Relay {
            client: TurnClientUdp::allocate(local, server, config),
            base: now,
            server,
            local,
            state: RelayState::Allocating,
            asked_permission: HashSet::new(),
            refused: HashSet::new(),
            asked_channel: HashSet::new(),
            dirty: true,
        }
    }

    /// Whether there may be control traffic to send or a timer that moved (see the field).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    pub fn local(&self) -> SocketAddr {
        self.local
    }

    pub fn state(&self) -> &RelayState {
        &self.state
    }

    /// The relayed address, once allocated.
    pub fn relayed(&self) -> Option<SocketAddr> {
        match self.state {
            RelayState::Allocated(a) => Some(a),
            _ => None,
        }
    }

    fn t(&self, now: Instant) -> TurnInstant {
        let d = now.saturating_duration_since(self.base);
        TurnInstant::from_nanos(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }

    fn std(&self, t: TurnInstant) -> Instant {
        self.base + t.saturating_duration_since(TurnInstant::ZERO)
    }

    /// A datagram that arrived on the allocation's local socket from `from`.
    pub fn handle_receive(&mut self, now: Instant, from: SocketAddr, data: &[u8]) -> Relayed {
        if from != self.server {
            return Relayed::NotOurs;
        }
        let t = self.t(now);
        let out = match self.client.recv(Transmit::new(data, TransportType::Udp, from, self.local), t) {
            TurnRecvRet::Handled => {
                self.dirty = true;
                Relayed::Handled
            }
            TurnRecvRet::Ignored(_) => Relayed::NotOurs,
            TurnRecvRet::PeerData(p) => Relayed::Peer { from: p.peer, data: p.data().to_vec() },
            // An ICMP error relayed from a peer: ICE learns of a dead path by its checks failing.
            TurnRecvRet::PeerIcmp { .. } => Relayed::Handled,
        };
        self.events();
        out
    }

    /// Asks the server to let `ip` reach us (a remote candidate's address), unless asked
    /// already. Both sides must do this before either can hear the other through a relay: a
    /// peer that waits for checks before it sends would otherwise never be reached.
    pub fn permit(&mut self, now: Instant, ip: IpAddr) {
        if self.relayed().is_none_or(|r| r.is_ipv4() != ip.is_ipv4()) || !self.asked_permission.insert(ip) {
            return;
        }
        let t = self.t(now);
        self.dirty = true;
        if self.client.create_permission(TransportType::Udp, ip, t).is_err() {
            self.asked_permission.remove(&ip);
        }
    }

    /// Wraps `data` for peer `to`; the result goes to [`Relay::server`]. The first datagram to
    /// a new peer address asks for a permission (and then a channel) and is dropped.
    pub fn send(&mut self, now: Instant, to: SocketAddr, data: &[u8]) -> Result<Vec<u8>, RelayError> {
        if self.relayed().is_none() {
            return Err(RelayError::NotAllocated);
        }
        let t = self.t(now);
        let ip = to.ip();
        if !self.client.have_permission(TransportType::Udp, ip) {
            if self.refused.contains(&ip) {
                return Err(RelayError::PermissionRefused(ip));
            }
            if self.asked_permission.insert(ip) {
                self.dirty = true;
                self.client
                    .create_permission(TransportType::Udp, ip, t)
                    .map_err(|e| RelayError::Send(e.to_string()))?;
            }
            return Err(RelayError::AwaitingPermission(ip));
        }
        // A channel frames each datagram in 4 bytes instead of a 36-byte Send indication.
        if self.asked_channel.insert(to) {
            self.dirty = true;
            // Refused (channel numbers exhausted): Send indications still work.
            let _ = self.client.bind_channel(TransportType::Udp, to, t);
        }
        match self.client.send_to(TransportType::Udp, to, data, t) {
            Ok(Some(b)) => Ok(b.build().data),
            Ok(None) => Err(RelayError::Send("nothing to send".into())),
            Err(e) => Err(RelayError::Send(e.to_string())),
        }
    }

    /// The next TURN control datagram (allocate, refresh, permission, channel) for the server.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        let t = self.t(now);
        let tx = self.client.poll_transmit(t)?;
        Some(tx.data.to_vec())
    }

    /// Lets time pass (the client retransmits, refreshes or gives up) and says when to call
    /// again.
    pub fn poll_timeout(&mut self, now: Instant) -> Instant {
        let t = self.t(now);
        let at = match self.client.poll(t) {
            TurnPollRet::WaitUntil(w) => self.std(w),
            TurnPollRet::Closed => {
                if self.state == RelayState::Allocating {
                    self.state = RelayState::Failed("the TURN server did not answer".into());
                }
                now + Duration::from_secs(3600)
            }
            // TCP allocations only; never asked for.
            _ => now + Duration::from_secs(1),
        };
        self.events();
        at
    }

    /// Releases the allocation (a Refresh with lifetime 0) rather than leaving it to expire;
    /// the request is in [`Relay::poll_transmit`].
    pub fn release(&mut self, now: Instant) {
        let t = self.t(now);
        if self.relayed().is_some() {
            let _ = self.client.delete(t);
        }
        self.dirty = true;
        self.state = RelayState::Failed("released".into());
    }

    fn events(&mut self) {
        while let Some(e) = self.client.poll_event() {
            match e {
                TurnEvent::AllocationCreated(TransportType::Udp, addr) if self.relayed().is_none() => {
                    self.state = RelayState::Allocated(addr);
                }
                TurnEvent::AllocationCreateFailed(_) if self.relayed().is_none() => {
                    self.state = RelayState::Failed("the TURN server refused the allocation".into());
                }
                TurnEvent::PermissionCreateFailed(_, ip) => {
                    self.refused.insert(ip);
                }
                TurnEvent::PermissionCreated(_, ip) => {
                    self.refused.remove(&ip);
                }
                _ => {}
            }
        }
    }
}

/// `turn:host:port[?transport=udp]` → (host, port). `turns:` (TLS) and `transport=tcp` are not
/// spoken by this client: `None`, so they are skipped rather than misused.
pub fn parse_turn_url(url: &str) -> Option<(&str, u16)> {
    let rest = url.strip_prefix("turn:")?;
    let (hostport, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    if let Some(q) = query {
        if q.split('&').any(|kv| kv.eq_ignore_ascii_case("transport=tcp")) {
            return None;
        }
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (hostport, 3478),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_urls() {
        assert_eq!(parse_turn_url("turn:relay.example.org:3478"), Some(("relay.example.org", 3478)));
        assert_eq!(parse_turn_url("turn:relay.example.org"), Some(("relay.example.org", 3478)));
        assert_eq!(parse_turn_url("turn:10.0.0.1:5349?transport=udp"), Some(("10.0.0.1", 5349)));
        assert_eq!(parse_turn_url("turn:[::1]:3478"), Some(("::1", 3478)));
        assert_eq!(parse_turn_url("turn:h:1?transport=tcp"), None);
        assert_eq!(parse_turn_url("turns:h:5349"), None);
        assert_eq!(parse_turn_url("stun:h:3478"), None);
        assert_eq!(parse_turn_url("turn::3478"), None);
        assert_eq!(parse_turn_url("turn:h:notaport"), None);
    }

    #[test]
    fn sending_before_allocation_is_refused() {
        let now = Instant::now();
        let mut r = Relay::new("127.0.0.1:5000".parse().unwrap(), "127.0.0.1:3478".parse().unwrap(), "u", "p", now);
        assert_eq!(r.send(now, "127.0.0.1:6000".parse().unwrap(), b"x"), Err(RelayError::NotAllocated));
        // The first thing the client does is ask the server for an allocation.
        let first = r.poll_transmit(now).expect("an allocate request");
        assert!(first.len() >= 20 && first[0] & 0xC0 == 0, "a STUN message");
        // A stranger's datagram is not the relay's to take.
        assert_eq!(r.handle_receive(now, "127.0.0.1:9".parse().unwrap(), b"hello"), Relayed::NotOurs);
        // Garbage from the server's address is not a panic.
        let _ = r.handle_receive(now, "127.0.0.1:3478".parse().unwrap(), &[0xff; 7]);
        assert_eq!(r.state(), &RelayState::Allocating);
    }

    #[test]
    fn an_unanswered_allocation_fails_in_time() {
        let t0 = Instant::now();
        let mut r = Relay::new("127.0.0.1:5000".parse().unwrap(), "127.0.0.1:3478".parse().unwrap(), "u", "p", t0);
        let mut now = t0;
        for _ in 0..200 {
            while r.poll_transmit(now).is_some() {}
            let next = r.poll_timeout(now);
            if matches!(r.state(), RelayState::Failed(_)) {
                break;
            }
            now = next.max(now + Duration::from_millis(1));
        }
        assert!(matches!(r.state(), RelayState::Failed(_)), "{:?}", r.state());
        assert!(now - t0 < Duration::from_secs(60), "gave up after {:?}", now - t0);
    }
}
