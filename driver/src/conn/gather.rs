//! Gathering: one UDP socket per local address (host candidates), server-reflexive candidates
//! from STUN, and receiving from whichever socket has a datagram.

use super::*;
use sleap_rtc_core::relay::{self, Relay, RelayState};
use sleap_rtc_core::signal::IceServer;

/// What gathering found: the sockets, the candidate lines added to the session, and the TURN
/// allocations (each with the index of the socket it was made from).
pub(super) struct Gathered<U> {
    pub socks: Sockets<U>,
    pub cands: Vec<String>,
    pub relays: Vec<(usize, Relay)>,
}

/// Binds one UDP socket per address, adds host candidates, then server-reflexive candidates
/// from STUN, then relayed candidates from TURN (`turn:` servers with credentials). With
/// `relay_only`, only the relayed candidates are offered.
pub(super) async fn bind<R: Runtime>(
    opts: &PeerOptions,
    extra_ice: &[IceServer],
    session: &mut Session,
) -> Result<Gathered<R::Udp>, ConnError> {
    let mut socks = Vec::new();
    let mut cands = Vec::new();
    for ip in &opts.bind_ips {
        let sock = match udp::bind(SocketAddr::new(*ip, 0)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%ip, error = %e, "skipping address");
                continue;
            }
        };
        let local = sock.local_addr()?;
        let sock = R::udp(sock)?;
        if !opts.relay_only {
            cands.extend(session.peer().add_local_candidate(local, None)?);
        }
        socks.push((sock, local));
    }
    if socks.is_empty() {
        return Err(ConnError::Io(io::Error::new(io::ErrorKind::AddrNotAvailable, "no local address could be bound")));
    }
    if !opts.relay_only {
        let servers: Vec<String> =
            opts.ice_servers.iter().cloned().chain(extra_ice.iter().flat_map(|s| s.urls.iter().cloned())).collect();
        for (mapped, base) in gather_srflx::<R>(&socks, &servers, opts.stun_timeout).await {
            if mapped != base {
                cands.extend(session.peer().add_local_candidate(mapped, Some(base))?);
            }
        }
    }
    let relays = allocate_relays::<R>(&socks, extra_ice, opts.turn_timeout).await;
    for (i, r) in &relays {
        if let Some(addr) = r.relayed() {
            cands.extend(session.peer().add_relay_candidate(addr, socks[*i].1)?);
        }
    }
    if opts.relay_only && relays.is_empty() {
        return Err(ConnError::NoRelay);
    }
    Ok(Gathered { socks, cands, relays })
}

/// Allocates a relayed address on each TURN server (UDP; `turns:` and TCP are skipped) from the
/// first socket of the same address family and scope. Servers that refuse or stay silent are
/// dropped, with a warning, after at most `timeout`.
pub(super) async fn allocate_relays<R: Runtime>(
    socks: &Sockets<R::Udp>,
    servers: &[IceServer],
    timeout: Duration,
) -> Vec<(usize, Relay)> {
    let deadline = Instant::now() + timeout;
    let mut relays = Vec::new();
    for s in servers {
        let (Some(user), Some(pass)) = (&s.username, &s.credential) else { continue };
        for url in &s.urls {
            if !url.starts_with("turn") {
                continue;
            }
            let Some((host, port)) = relay::parse_turn_url(url) else {
                tracing::info!(url, "skipping a TURN server this client cannot use (TLS or TCP)");
                continue;
            };
            let addrs = match crate::timeout_at::<R, _>(deadline, R::resolve(host.to_owned(), port)).await {
                Ok(Ok(a)) => a,
                _ => {
                    tracing::warn!(url, "TURN server did not resolve");
                    continue;
                }
            };
            let found = addrs.iter().find_map(|t| {
                let i = socks
                    .iter()
                    .position(|(_, l)| l.is_ipv4() == t.is_ipv4() && l.ip().is_loopback() == t.ip().is_loopback())?;
                Some((i, *t))
            });
            if let Some((i, server)) = found {
                relays.push((i, Relay::new(socks[i].1, server, user, pass, Instant::now())));
            }
        }
    }
    let mut buf = vec![0u8; 2048];
    while !relays.is_empty() {
        let now = Instant::now();
        let mut wake = deadline;
        for (i, r) in relays.iter_mut() {
            let next = r.poll_timeout(now);
            while let Some(d) = r.poll_transmit(now) {
                let _ = socks[*i].0.try_send_to(&d, r.server());
            }
            wake = wake.min(next);
        }
        if now >= deadline || relays.iter().all(|(_, r)| *r.state() != RelayState::Allocating) {
            break;
        }
        tokio::select! {
            (n, src, local) = RecvAny { socks, buf: &mut buf } => {
                for (i, r) in relays.iter_mut() {
                    if socks[*i].1 == local {
                        r.handle_receive(Instant::now(), src, &buf[..n]);
                    }
                }
            }
            _ = R::sleep_until(wake) => {}
        }
    }
    relays.retain(|(_, r)| match r.state() {
        RelayState::Allocated(a) => {
            tracing::info!(server = %r.server(), relayed = %a, "TURN allocation");
            true
        }
        RelayState::Failed(why) => {
            tracing::warn!(server = %r.server(), why, "no TURN relay");
            false
        }
        _ => {
            tracing::warn!(server = %r.server(), "no TURN relay: no answer in {timeout:?}");
            false
        }
    });
    relays
}

/// Asks each STUN server, from each socket of a compatible address family and scope, for our
/// mapped address. Unreachable or silent servers cost at most `timeout`.
pub(super) async fn gather_srflx<R: Runtime>(
    socks: &Sockets<R::Udp>,
    servers: &[String],
    timeout: Duration,
) -> Vec<(SocketAddr, SocketAddr)> {
    if servers.is_empty() {
        return Vec::new();
    }
    let deadline = Instant::now() + timeout;
    let mut targets = Vec::new();
    for url in servers {
        let Some((host, port)) = stun::parse_stun_url(url) else { continue };
        match crate::timeout_at::<R, _>(deadline, R::resolve(host, port)).await {
            Ok(Ok(addrs)) => targets.extend(addrs),
            _ => tracing::debug!(url, "STUN server did not resolve"),
        }
    }
    // (socket index, server, request)
    let mut pending: Vec<(usize, SocketAddr, stun::BindingRequest)> = Vec::new();
    for (i, (_, local)) in socks.iter().enumerate() {
        for t in &targets {
            if t.is_ipv4() == local.is_ipv4() && t.ip().is_loopback() == local.ip().is_loopback() {
                pending.push((i, *t, stun::binding_request()));
            }
        }
    }
    let mut found = Vec::new();
    let mut buf = vec![0u8; 2048];
    let mut resend = Instant::now();
    while !pending.is_empty() && Instant::now() < deadline {
        if Instant::now() >= resend {
            for (i, server, req) in &pending {
                let _ = socks[*i].0.try_send_to(&req.bytes, *server);
            }
            resend = Instant::now() + Duration::from_millis(150);
        }
        let wake = resend.min(deadline);
        tokio::select! {
            (n, src, local) = RecvAny { socks, buf: &mut buf } => {
                let answer = pending.iter().find_map(|(i, server, req)| {
                    (socks[*i].1 == local && *server == src).then(|| stun::mapped_address(&buf[..n], req.id)).flatten()
                });
                if let Some(mapped) = answer {
                    found.push((mapped, local));
                    // One answer per socket is enough.
                    pending.retain(|(i, _, _)| socks[*i].1 != local);
                }
            }
            _ = R::sleep_until(wake) => {}
        }
    }
    found
}

pub(super) fn candidate_line(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("candidate").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// Receives from whichever socket has a datagram first.
pub(super) struct RecvAny<'a, U> {
    socks: &'a Sockets<U>,
    buf: &'a mut [u8],
}

impl<U: UdpSocket> Future for RecvAny<'_, U> {
    type Output = (usize, SocketAddr, SocketAddr);
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        for (sock, local) in this.socks {
            loop {
                match sock.poll_recv_from(cx, this.buf) {
                    Poll::Ready(Ok((n, src))) => return Poll::Ready((n, src, *local)),
                    // Errors (e.g. an ICMP port-unreachable reported on the next recv) are
                    // per-datagram noise for a connectionless socket: poll again, so the
                    // socket's waker stays registered.
                    Poll::Ready(Err(_)) => continue,
                    Poll::Pending => break,
                }
            }
        }
        Poll::Pending
    }
}
