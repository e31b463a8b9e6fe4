//! The connection task: one per connection, it owns the `Session` and the sockets, feeds them
//! datagrams, timers and commands, and reports events to the handle.

use super::*;

impl<R: Runtime> Driver<R> {
    pub(super) async fn run(mut self, mut cmd_rx: mpsc::UnboundedReceiver<Cmd>) {
        let (io_tx, mut io_rx) = mpsc::unbounded_channel();
        self.io_tx = Some(io_tx);
        let mut rx = RxBatch::new();
        let mut closing: Option<Instant> = None;
        // One timer future, replaced only when the deadline moves (or after it fired: a
        // completed future must not be polled again), not one per datagram.
        let mut sleep = std::pin::pin!(R::sleep_until(Instant::now() + Duration::from_secs(3600)));
        let mut sleep_at: Option<Instant> = None;
        let mut timed_out = false;
        loop {
            let deadline = match self.drain().await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "peer connection failed");
                    break;
                }
            };
            // Everything goes out before the task waits for anything.
            self.flush().await;
            if self.upstream_label.get().is_some() {
                self.upstream_backlog.store(self.session.upstream_backlog(), Ordering::Relaxed);
            }
            if let Some(since) = closing {
                if !self.session.peer().is_alive() {
                    break;
                }
                // The remote never acknowledged our last messages: stop waiting.
                if since.elapsed() > Duration::from_secs(3) {
                    self.session.abort();
                    break;
                }
            }
            if *self.state_tx.borrow() == ConnState::Closed {
                break;
            }
            let mut wake = deadline;
            if closing.is_some() {
                wake = wake.min(Instant::now() + Duration::from_millis(200));
            }
            // A deadline that passed while a burst was being handled is served at once: with
            // datagrams always ready, the (last, biased) timer branch below would never be
            // reached. Only once in a row, so that a deadline str0m keeps in the past cannot
            // shut out the other branches.
            let now = Instant::now();
            if wake <= now && !timed_out {
                timed_out = true;
                if let Err(e) = self.session.handle_timeout(now) {
                    tracing::warn!(error = %e, "peer connection error");
                    break;
                }
                continue;
            }
            timed_out = false;
            if sleep_at != Some(wake) {
                sleep.set(R::sleep_until(wake));
                sleep_at = Some(wake);
            }
            let res = tokio::select! {
                biased;
                c = cmd_rx.recv(), if closing.is_none() => match c {
                    Some(Cmd::Close) | None => {
                        tracing::debug!(handle_dropped = c.is_none(), "closing");
                        closing = Some(Instant::now());
                        self.session.close();
                        Ok(())
                    }
                    Some(c) => { self.on_cmd(c); Ok(()) }
                },
                Some(d) = io_rx.recv() => { self.on_io_done(d); Ok(()) },
                i = rx.recv(&self.socks, BURST) => self.receive_burst(&mut rx, i, deadline).await,
                _ = &mut sleep => {
                    sleep_at = None;
                    self.session.handle_timeout(Instant::now())
                }
            };
            if let Err(e) = res {
                tracing::warn!(error = %e, "peer connection error");
                break;
            }
        }
        // Whatever the last drain queued (a DTLS close alert, an abort) still goes out, and the
        // TURN allocations are released rather than left to expire.
        let now = Instant::now();
        for (sock, r) in &mut self.turn {
            r.release(now);
            while let Some(d) = r.poll_transmit(now) {
                self.tx.push(*sock, r.server(), &d);
            }
        }
        self.flush().await;
        tracing::debug!(
            received = rx.received_datagrams,
            recv_calls = rx.recv_calls,
            sent = self.tx.sent_datagrams,
            send_calls = self.tx.send_calls,
            "connection ended: UDP datagrams and syscalls"
        );
        let _ = self.state_tx.send(ConnState::Closed);
        for (_, o) in self.outgoing.drain() {
            if let Some(r) = o.reply {
                let _ = r.send(Err(TransferFailure::Closed));
            }
        }
        for (_, i) in self.incoming.drain() {
            if let Some(r) = i.reply {
                let _ = r.send(Err(TransferFailure::ClosedPartsKept));
            }
        }
        for w in self.receive_waiters.drain(..) {
            let _ = w.reply.send(Err(TransferFailure::Closed));
        }
    }

    /// Feeds the datagrams `rx` holds (from socket `sock`), then whatever else is ready, up to
    /// [`BURST`] datagrams or until `deadline`. Each one is followed by a full drain (str0m's
    /// single-mutation invariant); only the sending is deferred, to [`Driver::flush`].
    pub(super) async fn receive_burst(
        &mut self,
        rx: &mut RxBatch,
        mut sock: usize,
        mut deadline: Instant,
    ) -> Result<(), sleap_rtc_core::peer::PeerError> {
        let mut fed = 0;
        loop {
            let Some(&(_, local)) = self.socks.get(sock) else { return Ok(()) };
            let now = Instant::now();
            for (src, data) in rx.datagrams() {
                let relay = self.turn.iter_mut().find(|(i, r)| *i == sock && r.server() == src).map(|(_, r)| r);
                let res = match relay {
                    None => self.session.handle_receive(now, src, local, data),
                    Some(r) => {
                        let relayed = r.relayed();
                        let got = r.handle_receive(now, src, data);
                        if r.take_dirty() {
                            self.turn_due = None;
                        }
                        match (got, relayed) {
                            (Relayed::Peer { from, data }, Some(to)) => {
                                self.session.handle_receive(now, from, to, &data)
                            }
                            (Relayed::NotOurs, _) => self.session.handle_receive(now, src, local, data),
                            _ => Ok(()),
                        }
                    }
                };
                // Anyone can send us a datagram: one that str0m rejects is dropped, it must not
                // end the connection.
                if let Err(e) = res {
                    tracing::debug!(%src, error = %e, "dropping a datagram str0m refused");
                }
                deadline = self.drain().await?;
                fed += 1;
            }
            if fed >= BURST || Instant::now() >= deadline {
                return Ok(());
            }
            match rx.try_recv(&self.socks, BURST - fed) {
                Some(i) => sock = i,
                None => return Ok(()),
            }
        }
    }

    /// Drains session output until its next timeout. Transmits are queued (sent once the batch
    /// is large, otherwise by the caller's [`Driver::flush`]).
    pub(super) async fn drain(&mut self) -> Result<Instant, sleap_rtc_core::peer::PeerError> {
        loop {
            match self.session.poll_output()? {
                SessionOutput::Timeout(t) => return Ok(t.min(self.pump_relays())),
                SessionOutput::Transmit { source, destination, contents } => {
                    if self.socks.is_empty() {
                        continue;
                    }
                    let relayed = self.turn.iter().position(|(_, r)| r.relayed() == Some(source));
                    // DTLS records (first byte 20..=63, RFC 7983) go only over the pair ICE
                    // chose: they tell which route the connection took.
                    if contents.first().is_some_and(|b| (20..=63).contains(b)) {
                        let via_relay = relayed.is_some() || self.remote_relays.contains(&destination);
                        self.route.store(if via_relay { ROUTE_RELAYED } else { ROUTE_DIRECT }, Ordering::Relaxed);
                    }
                    if let Some(k) = relayed {
                        let (sock, r) = &mut self.turn[k];
                        match r.send(Instant::now(), destination, &contents) {
                            Ok(d) => self.tx.push(*sock, r.server(), &d),
                            Err(e) => tracing::trace!(%destination, error = %e, "not relayed"),
                        }
                        if r.take_dirty() {
                            self.turn_due = None;
                        }
                        continue;
                    }
                    let sock = self.socks.iter().position(|(_, l)| *l == source).unwrap_or(0);
                    self.tx.push(sock, destination, &contents);
                    if self.tx.len() >= TX_FLUSH {
                        self.flush().await;
                    }
                }
                SessionOutput::Io(io) => self.on_io(io),
                SessionOutput::Event(e) => self.on_event(e),
            }
        }
    }

    /// Gives the TURN relays their time (retransmits, refreshes, permission and channel requests
    /// made by the last sends) and queues what they send; returns when they next need it.
    fn pump_relays(&mut self) -> Instant {
        let now = Instant::now();
        if self.turn.is_empty() {
            return now + Duration::from_secs(3600);
        }
        if let Some(due) = self.turn_due.filter(|d| *d > now) {
            return due;
        }
        let mut next = now + Duration::from_secs(3600);
        for (sock, r) in &mut self.turn {
            next = next.min(r.poll_timeout(now));
            while let Some(d) = r.poll_transmit(now) {
                self.tx.push(*sock, r.server(), &d);
            }
            r.take_dirty();
        }
        self.turn_due = Some(next);
        next
    }

    /// Sends the queued transmits (GSO runs where possible), waiting out a full socket buffer.
    pub(super) async fn flush(&mut self) {
        if !self.tx.is_empty() {
            self.tx.flush(&self.socks).await;
        }
    }

    pub(super) fn on_cmd(&mut self, c: Cmd) {
        tracing::debug!(cmd = c.name(), "command");
        match c {
            Cmd::Message(m) => {
                // Size was checked by the handle; nothing else can fail here.
                let _ = self.session.send_message(m);
            }
            Cmd::SendFiles { set, progress, reply, id } => {
                let n = set.paths.len();
                let tid = match self.session.send_files(set.manifest.clone()) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                        return;
                    }
                };
                let _ = id.send(tid);
                self.outgoing.insert(
                    tid,
                    OutFiles {
                        set,
                        resumed_bytes: 0,
                        handles: (0..n).map(|_| None).collect(),
                        progress,
                        reply: Some(reply),
                    },
                );
            }
            Cmd::ReceiveFiles { dir, progress, reply } => {
                self.receive_waiters.push_back(ReceiveWaiter { dir, progress, reply });
                if let Some((t, m)) = self.unclaimed.pop_front() {
                    self.prepare(t, m);
                }
            }
            Cmd::Cancel(t, why) => self.session.cancel(t, &why),
            Cmd::Upstream(binary, data) => self.session.send_upstream(binary, data),
            Cmd::RemoteCandidate(c) => {
                if let Some((addr, relay)) = sleap_rtc_core::peer::candidate_addr(&c) {
                    if relay {
                        self.remote_relays.insert(addr);
                    }
                    for (_, r) in &mut self.turn {
                        r.permit(Instant::now(), addr.ip());
                    }
                    self.turn_due = None;
                }
                if let Err(e) = self.session.peer().add_remote_candidate(&c) {
                    tracing::debug!(error = %e, "ignoring remote candidate");
                }
            }
            Cmd::Close => {}
        }
    }

    pub(super) fn on_event(&mut self, e: SessionEvent) {
        // Control messages carry tickets and MACs: log their size, never their text.
        match &e {
            SessionEvent::Message(m) => tracing::debug!(bytes = m.len(), "session event: control message"),
            SessionEvent::Upstream { data, .. } => {
                tracing::trace!(bytes = data.len(), "session event: upstream message")
            }
            other => tracing::debug!(event = ?other, "session event"),
        }
        match e {
            SessionEvent::Open => {
                let remote_fingerprint = self.session.peer().remote_fingerprint();
                let _ = self.state_tx.send(ConnState::Open { remote_fingerprint });
            }
            SessionEvent::Message(m) => {
                let _ = self.msg_tx.send(m);
            }
            SessionEvent::UpstreamOpen(label) => {
                let _ = self.upstream_label.set(label);
                let remote_fingerprint = self.session.peer().remote_fingerprint();
                let _ = self.state_tx.send(ConnState::Open { remote_fingerprint });
            }
            SessionEvent::Upstream { binary, data } => {
                let _ = self.upstream_tx.send((binary, data));
            }
            SessionEvent::Progress { transfer, direction, progress } => {
                let w = match direction {
                    Direction::Send => self.outgoing.get(&transfer).map(|o| &o.progress),
                    Direction::Receive => self.incoming.get(&transfer).map(|i| &i.progress),
                };
                if let Some(w) = w {
                    let _ = w.send(progress);
                }
            }
            SessionEvent::FileDone { transfer, direction: Direction::Receive, file, ok: false, error } => {
                if let Some(i) = self.incoming.get_mut(&transfer) {
                    let name = i.manifest.files.get(file as usize).map(|f| f.name.clone()).unwrap_or_default();
                    i.failed.push((name, error.unwrap_or_default()));
                }
            }
            SessionEvent::FileDone { .. } => {}
            SessionEvent::Accepted { transfer, resumed_bytes } => {
                if let Some(o) = self.outgoing.get_mut(&transfer) {
                    o.resumed_bytes = resumed_bytes;
                }
            }
            SessionEvent::TransferDone { transfer, direction: Direction::Send, result } => {
                if let Some(mut o) = self.outgoing.remove(&transfer) {
                    let res = result.map_err(TransferFailure::from).map(|failed| Sent {
                        transfer_id: transfer,
                        bytes: o.set.manifest.total_size(),
                        resumed_bytes: o.resumed_bytes,
                        failed: failed
                            .iter()
                            .filter_map(|i| o.set.manifest.files.get(*i as usize))
                            .map(|f| f.name.clone())
                            .collect(),
                    });
                    if let Some(r) = o.reply.take() {
                        let _ = r.send(res);
                    }
                }
            }
            SessionEvent::TransferDone { transfer, direction: Direction::Receive, result } => match result {
                Err(e) => {
                    // An offer nobody claimed yet may be cancelled before it is.
                    let unclaimed = self.unclaimed.len();
                    self.unclaimed.retain(|(t, _)| *t != transfer);
                    if let Some(mut i) = self.incoming.remove(&transfer) {
                        if let Some(r) = i.reply.take() {
                            let _ = r.send(Err(e.into()));
                        }
                    } else if self.unclaimed.len() == unclaimed && !self.answered.remove(&transfer) {
                        // Refused at the offer (unsafe name, too large, ...): whoever waits for
                        // the next upload hears why, instead of waiting for one that never comes.
                        // A refusal nobody waits for is not kept: it would fail a later upload.
                        if let Some(w) = self.receive_waiters.pop_front() {
                            let _ = w.reply.send(Err(e.into()));
                        }
                    }
                }
                // The core ends a receive only after every verified file was committed, so the
                // list of committed files is complete here.
                Ok(_) => {
                    if let Some(mut i) = self.incoming.remove(&transfer) {
                        if let Some(r) = i.reply.take() {
                            let _ = r.send(Ok(Received {
                                files: std::mem::take(&mut i.committed),
                                failed: std::mem::take(&mut i.failed),
                            }));
                        }
                    }
                }
            },
            SessionEvent::Closed => {
                let _ = self.state_tx.send(ConnState::Closed);
            }
            SessionEvent::Connected | SessionEvent::Disconnected => {}
        }
    }
}
