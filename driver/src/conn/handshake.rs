//! Setting a connection up: offering (`connect`) or answering (`accept`) through signaling, with
//! one DTLS certificate per process.

use super::*;
use sleap_rtc_core::peer::candidate_addr;

/// Offers a connection to `target` (a peer id in our room) and waits until it is open.
pub async fn connect<R: Runtime>(
    signaling: &SignalingClient<R>,
    target: &str,
    opts: PeerOptions,
) -> Result<PeerConnection<R>, ConnError> {
    let mut session = new_session::<R>(&opts).await;
    let gathered = bind::<R>(&opts, &signaling.registered().ice_servers, &mut session).await?;
    let offer = session.peer().create_offer()?;
    let mut relays = signaling.subscribe_relays(target);
    signaling.request(json!({"type": "offer", "target": target, "sdp": offer, "role": "client"})).await?;
    let mut early = Vec::new();
    let answer = crate::timeout::<R, _>(opts.connect_timeout, async {
        while let Some(m) = relays.recv().await {
            match m {
                ServerMessage::Answer(o) => return o.get("sdp").and_then(Value::as_str).map(str::to_owned),
                ServerMessage::Candidate(o) => early.extend(o.get("candidate").and_then(candidate_line)),
                _ => {}
            }
        }
        None
    })
    .await
    .map_err(|_| ConnError::NoAnswer(opts.connect_timeout))?
    .ok_or(ConnError::Closed)?;
    session.peer().accept_answer(&answer)?;
    let mut remote = remote_addrs(answer.lines());
    for c in early {
        remote.extend(candidate_addr(&c));
        let _ = session.peer().add_remote_candidate(&c);
    }
    let conn = spawn(session, gathered, remote, relays, target);
    conn.wait_open(opts.connect_timeout).await?;
    Ok(conn)
}

/// `prepare_certificate`: make the DTLS key in the background before registering, so the
/// first connection does not pay for it. `certificate_ready`: wait for it, so a following
/// `connect` measures only the connection.
pub use crate::cert::{prepare as prepare_certificate, ready as certificate_ready};

async fn new_session<R: Runtime>(opts: &PeerOptions) -> Session {
    let mut cfg = opts.session.clone();
    if cfg.peer.cert.is_none() {
        cfg.peer.cert = crate::cert::get::<R>().await;
    }
    Session::new(cfg, Instant::now())
}

/// The remote's candidate addresses in an SDP (and whether each is relayed).
fn remote_addrs<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<(SocketAddr, bool)> {
    lines.filter_map(candidate_addr).collect()
}

/// Answers an `offer` received through signaling and waits until the connection is open.
pub async fn accept<R: Runtime>(
    signaling: &SignalingClient<R>,
    offer: &ServerMessage,
    opts: PeerOptions,
) -> Result<PeerConnection<R>, ConnError> {
    let ServerMessage::Offer(o) = offer else { return Err(ConnError::BadOffer("not an offer".into())) };
    let from = o.get("sender").and_then(Value::as_str).ok_or_else(|| ConnError::BadOffer("no sender".into()))?;
    let sdp = o.get("sdp").and_then(Value::as_str).ok_or_else(|| ConnError::BadOffer("no sdp".into()))?;
    let mut session = new_session::<R>(&opts).await;
    let gathered = bind::<R>(&opts, &signaling.registered().ice_servers, &mut session).await?;
    let relays = signaling.subscribe_relays(from);
    let answer = session.peer().accept_offer(sdp)?;
    signaling.request(json!({"type": "answer", "target": from, "sdp": answer})).await?;
    let conn = spawn(session, gathered, remote_addrs(sdp.lines()), relays, from);
    conn.wait_open(opts.connect_timeout).await?;
    Ok(conn)
}
