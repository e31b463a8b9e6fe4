//! WebRTC: SDP, trickled candidates, datagrams.

use super::*;

fn cert() -> Option<peer::DtlsCert> {
    static CERT: OnceLock<Option<peer::DtlsCert>> = OnceLock::new();
    CERT.get_or_init(peer::generate_certificate).clone()
}

fn drain_peer(p: &mut peer::Peer) {
    for _ in 0..64 {
        match p.poll_output() {
            Ok(peer::PeerOutput::Timeout(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// An SDP offer or answer, trickled candidate lines or a datagram from the remote peer (which
/// the signaling server relays verbatim, so anyone in the room can send them), and a STUN
/// server's reply.
pub fn peer_sdp(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let cfg = peer::PeerConfig { cert: cert(), ..Default::default() };
    let now = Instant::now();
    let local: std::net::SocketAddr = ([127, 0, 0, 1], 5000).into();
    let remote: std::net::SocketAddr = ([127, 0, 0, 1], 6000).into();
    let mut p = peer::Peer::new(&cfg, now);
    let _ = p.add_local_candidate(local, None);
    match mode % 5 {
        0 => {
            let _ = p.accept_offer(&text);
        }
        1 => {
            if p.create_offer().is_ok() {
                let _ = p.accept_answer(&text);
            }
        }
        2 => {
            for line in text.lines().take(32) {
                let _ = p.add_remote_candidate(line);
            }
        }
        3 => {
            // A datagram to a peer in the middle of ICE, from an address it has been told about.
            let mut offerer = peer::Peer::new(&cfg, now);
            let _ = offerer.add_local_candidate(remote, None);
            if let Ok(offer) = offerer.create_offer() {
                let _ = p.accept_offer(&offer);
                let _ = p.add_remote_candidate(&format!(
                    "candidate:1 1 udp 2130706431 {} {} typ host",
                    remote.ip(),
                    remote.port()
                ));
                drain_peer(&mut p);
                let _ = p.handle_receive(now + Duration::from_millis(5), remote, local, rest);
            }
        }
        _ => {
            let req = stun::binding_request();
            let _ = stun::mapped_address(rest, req.id);
            let _ = stun::parse_stun_url(&text);
            return;
        }
    }
    drain_peer(&mut p);
    let _ = p.handle_timeout(now + Duration::from_millis(50));
    drain_peer(&mut p);
}
