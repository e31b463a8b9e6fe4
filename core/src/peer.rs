//! A WebRTC peer connection with data channels only, over str0m (sans-IO).
//!
//! [`Peer`] wraps `str0m::Rtc` and fixes the shape sleap-rtc needs: two reliable, ordered data
//! channels, `ctl` (JSON text) and `bulk` (binary frames, see [`crate::transfer`]); SDP and trickle
//! ICE candidates as strings for the signaling `offer`/`answer`/`candidate` messages; host and
//! server-reflexive candidates supplied by the caller (str0m gathers nothing itself). The caller
//! owns the socket and the clock: it feeds datagrams and timeouts in, and drains
//! [`Peer::poll_output`] after every call, until it returns [`PeerOutput::Timeout`].

use std::net::SocketAddr;
use std::time::Instant;

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId, Reliability};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

pub use str0m::config::DtlsCert;

/// Label of the control channel (JSON messages).
pub const CTL_LABEL: &str = "ctl";
/// Label of the bulk channel (binary transfer frames).
pub const BULK_LABEL: &str = "bulk";

/// Whether a data channel opened by the remote speaks upstream's `TYPE::args` protocol (see
/// [`crate::upstream`]): any label but ours. sleap-rtc 0.0.7's clients open exactly one channel,
/// labelled `training`, `inference`, `pathcheck` (GUI API), `my-data-channel` (CLI) or `sleap-app`.
pub fn is_upstream_label(label: &str) -> bool {
    label != CTL_LABEL && label != BULK_LABEL
}

/// Tunables of a peer connection.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Largest UDP payload str0m builds. 1200 fits every path with the IPv6 minimum MTU (1280)
    /// after IP/UDP headers, including VPNs and tunnels, as QUIC's default does; loopback and
    /// LANs can use up to 1472 for fewer packets per byte (see BENCHMARKS.md).
    pub mtu: usize,
    /// Bytes str0m may buffer (written but not yet acknowledged) across both channels. Must
    /// exceed the bulk window's ceiling so control messages still fit while bulk is busy.
    pub max_buffered: usize,
    /// Largest message we accept (advertised as `a=max-message-size`).
    pub max_message_size: u32,
    /// Our SCTP receive window: how many bytes the remote may have in flight to us. It caps a
    /// connection at `receive_window / RTT`, so it is sized for long fat paths; memory is spent
    /// only while packets are missing (data is handed on as soon as it is in order). str0m sets
    /// the window to max(its receive message limit, 1 MiB), so the advertised
    /// `a=max-message-size` becomes max(`max_message_size`, this); the session enforces its own,
    /// smaller limits on what it accepts.
    pub receive_window: u32,
    /// DTLS certificate to use. Generating one takes tens of milliseconds, so runtimes make one
    /// per process ([`generate_certificate`]) instead of one per connection.
    pub cert: Option<DtlsCert>,
}

/// A fresh self-signed DTLS certificate (ECDSA P-256) from str0m's crypto provider.
pub fn generate_certificate() -> Option<DtlsCert> {
    str0m::crypto::from_feature_flags().dtls_provider.generate_certificate()
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            mtu: 1200,
            max_buffered: crate::window::WindowConfig::default().max + 1024 * 1024,
            max_message_size: 256 * 1024,
            receive_window: 16 * 1024 * 1024,
            cert: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("invalid SDP: {0}")]
    Sdp(String),
    #[error("invalid ICE candidate {0:?}: {1}")]
    Candidate(String, String),
    #[error("negotiation out of order: {0}")]
    State(&'static str),
    #[error("WebRTC error: {0}")]
    Rtc(#[from] str0m::RtcError),
    #[error("channel {0} is not open")]
    NotOpen(&'static str),
}

/// Something that happened on the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerEvent {
    /// ICE + DTLS are up.
    Connected,
    /// Both `ctl` and `bulk` are open: the connection is usable.
    Open,
    /// A control message arrived.
    Ctl(String),
    /// A bulk frame arrived.
    Bulk(Vec<u8>),
    /// The remote opened an upstream-protocol channel (see [`is_upstream_label`]) instead of
    /// `ctl` + `bulk`: the connection is usable for that protocol.
    UpstreamOpen(String),
    /// A message on the upstream channel: text (`binary` false) or raw bytes.
    Upstream {
        binary: bool,
        data: Vec<u8>,
    },
    /// ICE reports the path is gone (it may recover) or the connection closed for good.
    Disconnected,
    /// ICE has a working path again (after [`PeerEvent::Disconnected`]).
    Reconnected,
    Closed,
}

/// What the caller must do next.
#[derive(Debug)]
pub enum PeerOutput {
    Transmit {
        source: SocketAddr,
        destination: SocketAddr,
        contents: Vec<u8>,
    },
    Event(PeerEvent),
    /// Nothing more now: call [`Peer::handle_timeout`] at this instant at the latest.
    Timeout(Instant),
}

/// One data-channel peer connection.
pub struct Peer {
    rtc: Rtc,
    pending: Option<SdpPendingOffer>,
    ctl: Option<ChannelId>,
    bulk: Option<ChannelId>,
    upstream: Option<ChannelId>,
    open_announced: bool,
    closed: bool,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").field("ctl", &self.ctl).field("bulk", &self.bulk).finish_non_exhaustive()
    }
}

fn channel(label: &str) -> ChannelConfig {
    ChannelConfig {
        label: label.to_owned(),
        ordered: true,
        reliability: Reliability::Reliable,
        negotiated: None,
        protocol: String::new(),
    }
}

impl Peer {
    pub fn new(cfg: &PeerConfig, now: Instant) -> Peer {
        let mtu = cfg.mtu.clamp(str0m::DATAGRAM_MTU_TARGET_MIN, str0m::DATAGRAM_MTU_TARGET_MAX);
        let mut builder = Rtc::builder();
        if let Some(c) = &cfg.cert {
            builder = builder.set_dtls_cert(c.clone());
        }
        let rtc = builder
            // The range is target..=warn-threshold: the start is the packet size str0m aims for.
            .set_mtu(mtu..=usize::MAX)
            .set_sctp_max_buffered_amount(cfg.max_buffered)
            .set_sctp_max_message_size(cfg.max_message_size.max(cfg.receive_window))
            .build(now);
        Peer { rtc, pending: None, ctl: None, bulk: None, upstream: None, open_announced: false, closed: false }
    }

    /// Adds a local candidate: a host address of the caller's socket, or a server-reflexive
    /// address learnt from STUN (`base` is the socket's local address).
    pub fn add_local_candidate(
        &mut self,
        addr: SocketAddr,
        base: Option<SocketAddr>,
    ) -> Result<Option<String>, PeerError> {
        let c = match base {
            None => Candidate::host(addr, "udp"),
            Some(b) => Candidate::server_reflexive(addr, b, "udp"),
        }
        .map_err(|e| PeerError::Candidate(addr.to_string(), e.to_string()))?;
        Ok(self.rtc.add_local_candidate(c).map(|c| c.to_sdp_string()))
    }

    /// A relayed candidate: `relayed` is the address a TURN server allocated for us, `local`
    /// the socket the allocation was made from (where the relayed traffic really arrives).
    pub fn add_relay_candidate(&mut self, relayed: SocketAddr, local: SocketAddr) -> Result<Option<String>, PeerError> {
        let c = Candidate::relayed(relayed, local, "udp")
            .map_err(|e| PeerError::Candidate(relayed.to_string(), e.to_string()))?;
        Ok(self.rtc.add_local_candidate(c).map(|c| c.to_sdp_string()))
    }

    /// A trickled candidate from the remote peer (`candidate:...` line, with or without `a=`).
    pub fn add_remote_candidate(&mut self, line: &str) -> Result<(), PeerError> {
        let l = line.trim().trim_start_matches("a=");
        if l.is_empty() {
            // End-of-candidates marker some stacks send.
            return Ok(());
        }
        let c = Candidate::from_sdp_string(l)
            .map_err(|e| PeerError::Candidate(l.chars().take(200).collect(), e.to_string()))?;
        self.rtc.add_remote_candidate(c);
        Ok(())
    }

    /// Offerer: creates both channels and returns the SDP offer.
    pub fn create_offer(&mut self) -> Result<String, PeerError> {
        if self.pending.is_some() || self.ctl.is_some() {
            return Err(PeerError::State("an offer was already created"));
        }
        let mut api = self.rtc.sdp_api();
        let ctl = api.add_channel_with_config(channel(CTL_LABEL));
        let bulk = api.add_channel_with_config(channel(BULK_LABEL));
        let (offer, pending) = api.apply().ok_or(PeerError::State("nothing to negotiate"))?;
        self.ctl = Some(ctl);
        self.bulk = Some(bulk);
        self.pending = Some(pending);
        Ok(offer.to_sdp_string())
    }

    /// Answerer: accepts the remote offer and returns the SDP answer. The channels are learnt
    /// when they open.
    pub fn accept_offer(&mut self, sdp: &str) -> Result<String, PeerError> {
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| PeerError::Sdp(e.to_string()))?;
        let answer = self.rtc.sdp_api().accept_offer(offer)?;
        Ok(answer.to_sdp_string())
    }

    /// Offerer: applies the remote answer.
    pub fn accept_answer(&mut self, sdp: &str) -> Result<(), PeerError> {
        let pending = self.pending.take().ok_or(PeerError::State("no offer is pending"))?;
        let answer = SdpAnswer::from_sdp_string(sdp).map_err(|e| PeerError::Sdp(e.to_string()))?;
        self.rtc.sdp_api().accept_answer(pending, answer)?;
        Ok(())
    }

    /// A datagram arrived on the caller's socket. Datagrams that are not STUN/DTLS/RTP (e.g.
    /// stray traffic) are ignored.
    pub fn handle_receive(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) -> Result<(), PeerError> {
        let Ok(contents) = data.try_into() else { return Ok(()) };
        // No `Rtc::accepts` filter: it is for demultiplexing several Rtc on one socket, and
        // before this side has nominated its ICE pair it refuses the remote's first DTLS flight,
        // which then costs a 1 s retransmission. Each Peer has its own sockets.
        let input = Input::Receive(now, Receive { proto: Protocol::Udp, source, destination, contents });
        self.rtc.handle_input(input)?;
        Ok(())
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), PeerError> {
        self.rtc.handle_input(Input::Timeout(now))?;
        Ok(())
    }

    pub fn poll_output(&mut self) -> Result<PeerOutput, PeerError> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(t) => return Ok(PeerOutput::Timeout(t)),
                Output::Transmit(t) => {
                    return Ok(PeerOutput::Transmit {
                        source: t.source,
                        destination: t.destination,
                        contents: t.contents.into(),
                    });
                }
                Output::Event(e) => {
                    if let Some(ev) = self.on_event(e) {
                        return Ok(PeerOutput::Event(ev));
                    }
                }
            }
        }
    }

    fn on_event(&mut self, e: Event) -> Option<PeerEvent> {
        match e {
            Event::Connected => Some(PeerEvent::Connected),
            Event::ChannelOpen(id, label) => {
                match label.as_str() {
                    CTL_LABEL => self.ctl = Some(id),
                    BULK_LABEL => self.bulk = Some(id),
                    // One protocol per connection: the first channel decides, later ones of
                    // the other kind are ignored.
                    l if is_upstream_label(l) && self.upstream.is_none() && self.ctl.is_none() => {
                        self.upstream = Some(id);
                        self.open_announced = true;
                        return Some(PeerEvent::UpstreamOpen(label));
                    }
                    _ => return None,
                }
                if self.upstream.is_some() {
                    return None;
                }
                self.announce_open()
            }
            Event::ChannelData(d) => {
                if Some(d.id) == self.ctl {
                    // Control messages are JSON text; invalid UTF-8 is surfaced lossily so the
                    // decoder above rejects it with a clear error.
                    Some(PeerEvent::Ctl(
                        String::from_utf8(d.data)
                            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                    ))
                } else if Some(d.id) == self.bulk {
                    Some(PeerEvent::Bulk(d.data))
                } else if Some(d.id) == self.upstream {
                    Some(PeerEvent::Upstream { binary: d.binary, data: d.data })
                } else {
                    None
                }
            }
            Event::ChannelClose(id) if Some(id) == self.ctl || Some(id) == self.bulk || Some(id) == self.upstream => {
                self.mark_closed()
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => Some(PeerEvent::Disconnected),
            Event::IceConnectionStateChange(IceConnectionState::Connected | IceConnectionState::Completed) => {
                Some(PeerEvent::Reconnected)
            }
            Event::Closed => self.mark_closed(),
            _ => None,
        }
    }

    fn mark_closed(&mut self) -> Option<PeerEvent> {
        if self.closed {
            return None;
        }
        self.closed = true;
        Some(PeerEvent::Closed)
    }

    fn announce_open(&mut self) -> Option<PeerEvent> {
        let both = self.ctl.is_some_and(|c| self.rtc.channel(c).is_some())
            && self.bulk.is_some_and(|b| self.rtc.channel(b).is_some());
        if both && !self.open_announced {
            self.open_announced = true;
            return Some(PeerEvent::Open);
        }
        None
    }

    pub fn is_open(&self) -> bool {
        self.open_announced && !self.closed
    }

    pub fn is_alive(&self) -> bool {
        self.rtc.is_alive()
    }

    /// Sends a control message; `Ok(false)` when str0m's buffer is full (try again later).
    pub fn send_ctl(&mut self, text: &str) -> Result<bool, PeerError> {
        let id = self.ctl.ok_or(PeerError::NotOpen(CTL_LABEL))?;
        let mut ch = self.rtc.channel(id).ok_or(PeerError::NotOpen(CTL_LABEL))?;
        Ok(ch.write(false, text.as_bytes())?)
    }

    /// Sends a bulk frame; `Ok(false)` when str0m's buffer is full.
    pub fn send_bulk(&mut self, frame: &[u8]) -> Result<bool, PeerError> {
        let id = self.bulk.ok_or(PeerError::NotOpen(BULK_LABEL))?;
        let mut ch = self.rtc.channel(id).ok_or(PeerError::NotOpen(BULK_LABEL))?;
        Ok(ch.write(true, frame)?)
    }

    /// Sends on the upstream channel (text or binary); `Ok(false)` when str0m's buffer is full.
    pub fn send_upstream(&mut self, binary: bool, data: &[u8]) -> Result<bool, PeerError> {
        const LABEL: &str = "upstream";
        let id = self.upstream.ok_or(PeerError::NotOpen(LABEL))?;
        let mut ch = self.rtc.channel(id).ok_or(PeerError::NotOpen(LABEL))?;
        Ok(ch.write(binary, data)?)
    }

    /// Bytes written to any channel and not yet acknowledged by the remote SCTP stack.
    pub fn buffered(&mut self) -> usize {
        let mut n = self.bulk_buffered();
        for id in [self.ctl, self.upstream].into_iter().flatten() {
            if let Some(mut ch) = self.rtc.channel(id) {
                n += ch.buffered_amount();
            }
        }
        n
    }

    /// Bytes written to `bulk` and not yet acknowledged by the remote SCTP stack.
    pub fn bulk_buffered(&mut self) -> usize {
        match self.bulk.and_then(|b| self.rtc.channel(b)) {
            Some(mut ch) => ch.buffered_amount(),
            None => 0,
        }
    }

    /// Our DTLS certificate fingerprint (`sha-256 AB:CD:...`), which binds proofs to this
    /// connection.
    pub fn local_fingerprint(&mut self) -> String {
        self.rtc.direct_api().local_dtls_fingerprint().to_string()
    }

    /// The remote DTLS fingerprint, once negotiated.
    pub fn remote_fingerprint(&mut self) -> Option<String> {
        self.rtc.direct_api().remote_dtls_fingerprint().map(|f| f.to_string())
    }

    /// Starts a graceful close (keep draining output until [`Peer::is_alive`] is false).
    pub fn close(&mut self) {
        let _ = self.rtc.close();
    }
}

/// The address of a candidate line (`candidate:...` or `a=candidate:...`) and whether it is a
/// `typ relay` one: a TURN allocation must permit every remote address before anything from it
/// is let through, and traffic to a relay candidate goes through the remote's TURN server.
pub fn candidate_addr(line: &str) -> Option<(SocketAddr, bool)> {
    let l = line.trim().trim_start_matches("a=");
    let f: Vec<&str> = l.split_ascii_whitespace().collect();
    if f.len() < 8 || !f[0].starts_with("candidate:") || f[6] != "typ" {
        return None;
    }
    let ip: std::net::IpAddr = f[4].parse().ok()?;
    Some((SocketAddr::new(ip, f[5].parse().ok()?), f[7] == "relay"))
}

/// The address of a `typ relay` candidate line.
pub fn relay_candidate_addr(line: &str) -> Option<SocketAddr> {
    candidate_addr(line).and_then(|(a, relay)| relay.then_some(a))
}

#[cfg(test)]
mod relay_line_tests {
    use super::relay_candidate_addr;

    #[test]
    fn relay_lines() {
        let l = "a=candidate:7 1 udp 16777215 10.9.0.1 49152 typ relay raddr 0.0.0.0 rport 0";
        assert_eq!(relay_candidate_addr(l), Some("10.9.0.1:49152".parse().unwrap()));
        assert_eq!(relay_candidate_addr("candidate:1 1 udp 2113929471 10.0.0.2 5000 typ host"), None);
        assert_eq!(relay_candidate_addr("candidate:7 1 udp 1 nonsense 49152 typ relay"), None);
        assert_eq!(relay_candidate_addr("candidate:7 1 udp 1 10.0.0.1 99999 typ relay"), None);
        assert_eq!(relay_candidate_addr(""), None);
        assert_eq!(
            super::candidate_addr("candidate:1 1 udp 2113929471 10.0.0.2 5000 typ host"),
            Some(("10.0.0.2:5000".parse().unwrap(), false))
        );
    }
}
