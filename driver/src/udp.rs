//! Batched UDP I/O for peer connections.
//!
//! str0m wants a full `poll_output` drain after every input, so datagrams cannot be fed to it in
//! bulk; what the driver *can* choose is when the socket is read and written. A connection's task
//! therefore reads every datagram that is ready in a few syscalls ([`RxBatch`]: recvmmsg, and
//! UDP GRO, which hands over a GSO sender's train of datagrams in one buffer), feeds them one by
//! one, keeps the `Transmit`s each drain produces ([`TxBatch`]) and writes them together: one
//! `sendmsg` with `UDP_SEGMENT` (GSO) per run of equal-size datagrams to one destination. On
//! loopback that turns ~2 syscalls and 2 trips through the UDP stack per datagram into a few per
//! burst.
//!
//! The socket-level work (cmsg encoding, capability probing, the fallback when a device rejects
//! GSO) is quinn-udp's, wrapped by [`BatchIo`] for the runtime crates, which only add their
//! readiness handling around it.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
/// A socket handle that quinn-udp and socket2 accept: a file descriptor on Unix, a SOCKET on
/// Windows.
#[cfg(unix)]
pub use std::os::fd::AsFd as AsSocketHandle;
#[cfg(windows)]
pub use std::os::windows::io::AsSocket as AsSocketHandle;
use std::task::{Context, Poll, Waker};

use crate::UdpSocket;

/// Socket buffer size asked for (SO_RCVBUF / SO_SNDBUF): the bulk window's ceiling, so that a
/// window that arrives while the receiving task is busy still fits. A datagram the kernel drops
/// for want of buffer is a loss to SCTP (a retransmission and a window cut). Linux caps the
/// request at `net.core.rmem_max`/`wmem_max` (212992 on a stock kernel; it doubles what it grants
/// for bookkeeping) unless the process may force it (CAP_NET_ADMIN, see [`bind`]). Measured
/// (BENCHMARKS.md, loopback 1 GiB): 68 MB/s and 3,931 dropped datagrams with the stock cap,
/// 88 MB/s with 4 MiB, 188–195 MB/s and none with 16 MiB.
pub const SOCKET_BUFFER: usize = 16 << 20;

/// Messages per receive call (quinn-udp's recvmmsg batch).
pub const RX_SLOTS: usize = quinn_udp::BATCH_SIZE;

/// Each receive buffer holds the largest UDP payload: with GRO one message can carry a whole
/// 64 KiB train of segments, and a shorter buffer would truncate it (losing segments).
const RX_SLOT_BYTES: usize = 1 << 16;

/// Bytes per GSO send. The kernel refuses (EINVAL) a train longer than the maximum IP datagram
/// (65,507 bytes of UDP payload over IPv4), and quinn-udp turns GSO off for good after an EINVAL,
/// so stay clearly below it.
const MAX_GSO_BYTES: usize = 64_000;

/// What one received buffer holds.
#[derive(Debug, Clone, Copy)]
pub struct RecvMeta {
    /// The sender.
    pub src: SocketAddr,
    /// Bytes written into the buffer.
    pub len: usize,
    /// Size of each datagram in it. GRO coalesces consecutive equal-size datagrams of one sender
    /// (the last may be shorter); `stride == len` when the buffer holds one datagram.
    pub stride: usize,
}

impl Default for RecvMeta {
    fn default() -> Self {
        RecvMeta { src: SocketAddr::from(([0, 0, 0, 0], 0)), len: 0, stride: 0 }
    }
}

/// Datagrams for one destination laid end to end: each `segment_size` bytes, except that the
/// last may be shorter. One datagram when `contents.len() <= segment_size`.
#[derive(Debug, Clone, Copy)]
pub struct Datagrams<'a> {
    pub destination: SocketAddr,
    pub contents: &'a [u8],
    pub segment_size: usize,
}

/// Binds a UDP socket for a peer connection: non-blocking, with [`SOCKET_BUFFER`]-sized buffers.
///
/// A process that may (root, most containers: CAP_NET_ADMIN) gets them past the sysctl cap
/// (SO_RCVBUFFORCE); any other gets what the cap allows and, once per process, a warning that
/// says which sysctl to raise, because the cost (lost datagrams, half the throughput or less) is
/// otherwise invisible.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let sock = std::net::UdpSocket::bind(addr)?;
    sock.set_nonblocking(true)?;
    let s = socket2::SockRef::from(&sock);
    // Smaller buffers only cost throughput: keep the socket if the kernel says no.
    if !force_buffer(&sock, Buffer::Receive) {
        if let Err(e) = s.set_recv_buffer_size(SOCKET_BUFFER) {
            tracing::debug!(error = %e, "could not enlarge the UDP receive buffer");
        }
    }
    if !force_buffer(&sock, Buffer::Send) {
        if let Err(e) = s.set_send_buffer_size(SOCKET_BUFFER) {
            tracing::debug!(error = %e, "could not enlarge the UDP send buffer");
        }
    }
    // Linux reports twice what it granted.
    if let Ok(granted) = s.recv_buffer_size() {
        if granted / 2 < SOCKET_BUFFER {
            static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    granted_kib = granted / 2 / 1024,
                    wanted_kib = SOCKET_BUFFER / 1024,
                    "the UDP receive buffer is smaller than a transfer window: fast transfers will \
                     lose datagrams; raise it with `sysctl -w net.core.rmem_max={SOCKET_BUFFER} \
                     net.core.wmem_max={SOCKET_BUFFER}` (or run with CAP_NET_ADMIN)"
                );
            }
        }
    }
    Ok(sock)
}

#[derive(Clone, Copy)]
enum Buffer {
    Receive,
    Send,
}

/// SO_RCVBUFFORCE / SO_SNDBUFFORCE to [`SOCKET_BUFFER`]: whether the kernel took it (it refuses
/// without CAP_NET_ADMIN).
#[cfg(target_os = "linux")]
fn force_buffer(sock: &std::net::UdpSocket, which: Buffer) -> bool {
    use std::os::fd::AsRawFd;
    let opt = match which {
        Buffer::Receive => libc::SO_RCVBUFFORCE,
        Buffer::Send => libc::SO_SNDBUFFORCE,
    };
    let size: libc::c_int = SOCKET_BUFFER as libc::c_int;
    // SAFETY: the fd is open for the duration of the call and setsockopt reads exactly
    // `size_of::<c_int>()` bytes from `size`, which lives on this stack frame.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn force_buffer(_: &std::net::UdpSocket, _: Buffer) -> bool {
    false
}

/// The kernel's receive and send buffer sizes of `sock` (as getsockopt reports them: Linux
/// doubles what was asked).
pub fn buffer_sizes(sock: &impl AsSocketHandle) -> io::Result<(usize, usize)> {
    let s = socket2::SockRef::from(sock);
    Ok((s.recv_buffer_size()?, s.send_buffer_size()?))
}

/// quinn-udp's per-socket state, for the runtime crates' [`UdpSocket`] batch methods. The calls
/// are non-blocking: the runtime supplies the readiness waiting around them.
#[derive(Debug)]
pub struct BatchIo {
    state: quinn_udp::UdpSocketState,
}

impl BatchIo {
    /// Probes what the platform supports and enables GRO on `sock` where it exists.
    pub fn new(sock: &std::net::UdpSocket) -> io::Result<Self> {
        Ok(BatchIo { state: quinn_udp::UdpSocketState::new(sock.into())? })
    }

    /// Datagrams one [`BatchIo::send`] may carry: above 1 when the kernel does UDP GSO.
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Receives up to `bufs.len()` messages (fewer if `meta` or the batch size is shorter).
    /// `WouldBlock` when none is ready.
    pub fn recv(
        &self,
        sock: &impl AsSocketHandle,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let mut q = [quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
        let k = bufs.len().min(meta.len()).min(q.len());
        let n = self.state.recv(sock.into(), &mut bufs[..k], &mut q[..k])?;
        for (m, q) in meta.iter_mut().zip(&q[..n.min(k)]) {
            let stride = if q.stride == 0 || q.stride > q.len { q.len } else { q.stride };
            *m = RecvMeta { src: q.addr, len: q.len, stride };
        }
        Ok(n.min(k))
    }

    /// Sends `d` in one `sendmsg` (several segments: with `UDP_SEGMENT`). `WouldBlock` when the
    /// socket buffer is full; then nothing was sent.
    pub fn send(&self, sock: &impl AsSocketHandle, d: &Datagrams<'_>) -> io::Result<()> {
        let seg = d.segment_size.max(1);
        let several = d.contents.len() > seg;
        let t = quinn_udp::Transmit {
            destination: d.destination,
            ecn: None,
            contents: d.contents,
            segment_size: several.then_some(seg),
            src_ip: None,
        };
        match self.state.try_send(sock.into(), &t) {
            Err(e) if several && e.kind() != io::ErrorKind::WouldBlock && self.state.max_gso_segments() == 1 => {
                // quinn-udp has just learnt that this path rejects GSO (EIO/EINVAL) and turned it
                // off: these datagrams went nowhere, send them one by one. Losing some here to a
                // full buffer is rare enough to leave to SCTP's retransmission.
                tracing::debug!(error = %e, "UDP GSO refused; sending without it from now on");
                for c in d.contents.chunks(seg) {
                    let one = quinn_udp::Transmit { contents: c, segment_size: None, ..t.clone() };
                    if let Err(e) = self.state.try_send(sock.into(), &one) {
                        tracing::debug!(error = %e, "send failed");
                        break;
                    }
                }
                Ok(())
            }
            r => r,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    sock: usize,
    dst: SocketAddr,
    off: usize,
    len: usize,
}

/// Datagrams waiting to be sent, in the order they were produced.
#[derive(Debug, Default)]
pub struct TxBatch {
    buf: Vec<u8>,
    queue: Vec<Pending>,
    /// Datagrams and send calls so far (for the connection's closing log line).
    pub sent_datagrams: u64,
    pub send_calls: u64,
}

impl TxBatch {
    /// Queues `contents` for `dst`, to go out of socket `sock` (an index into the sockets given
    /// to [`TxBatch::flush`]).
    pub fn push(&mut self, sock: usize, dst: SocketAddr, contents: &[u8]) {
        self.queue.push(Pending { sock, dst, off: self.buf.len(), len: contents.len() });
        self.buf.extend_from_slice(contents);
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Sends everything queued, in order: each run of consecutive datagrams with the same socket,
    /// destination and size (the last may be shorter) in one call, as long as the socket's GSO
    /// limit allows. A full socket buffer is waited out, so nothing queued is lost to it.
    pub async fn flush<U: UdpSocket>(&mut self, socks: &[(U, SocketAddr)]) {
        let mut i = 0;
        while i < self.queue.len() {
            let first = self.queue[i];
            let Some((sock, _)) = socks.get(first.sock) else {
                i += 1;
                continue;
            };
            // An empty datagram cannot be a GSO segment: it goes alone.
            let max = MAX_GSO_BYTES.checked_div(first.len).map_or(1, |m| sock.max_segments().min(m).max(1));
            let (mut j, mut end) = (i + 1, first.off + first.len);
            while j < self.queue.len() && j - i < max {
                let p = self.queue[j];
                if p.sock != first.sock || p.dst != first.dst || p.len > first.len || p.len == 0 {
                    break;
                }
                end += p.len;
                j += 1;
                if p.len < first.len {
                    break;
                }
            }
            let d = Datagrams { destination: first.dst, contents: &self.buf[first.off..end], segment_size: first.len };
            send_waiting(sock, &d).await;
            self.sent_datagrams += (j - i) as u64;
            self.send_calls += 1;
            i = j;
        }
        self.queue.clear();
        self.buf.clear();
    }
}

async fn send_waiting<U: UdpSocket>(sock: &U, d: &Datagrams<'_>) {
    loop {
        match sock.try_send_batch(d) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = std::future::poll_fn(|cx| sock.poll_writable(cx)).await {
                    tracing::debug!(error = %e, destination = %d.destination, "socket not writable");
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // UDP: a datagram that cannot go (no route, too large) is lost like any other; SCTP
            // and ICE retransmit.
            Err(e) => {
                tracing::debug!(error = %e, destination = %d.destination, bytes = d.contents.len(), "send failed");
                return;
            }
        }
    }
}

/// Receive buffers for a connection's sockets, and what the last receive put in them.
pub struct RxBatch {
    buf: Vec<u8>,
    meta: [RecvMeta; RX_SLOTS],
    /// Messages in the buffers from the last receive.
    n: usize,
    /// Socket the next poll tries first, so that a busy one does not starve the others.
    start: usize,
    /// Datagrams and receive calls so far (for the connection's closing log line).
    pub received_datagrams: u64,
    pub recv_calls: u64,
}

impl Default for RxBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for RxBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxBatch").field("n", &self.n).finish_non_exhaustive()
    }
}

impl RxBatch {
    pub fn new() -> Self {
        // Zeroed memory straight from the allocator (calloc → fresh pages): only the pages that
        // datagrams actually fill become resident.
        RxBatch {
            buf: vec![0u8; RX_SLOTS * RX_SLOT_BYTES],
            meta: [RecvMeta::default(); RX_SLOTS],
            n: 0,
            start: 0,
            received_datagrams: 0,
            recv_calls: 0,
        }
    }

    /// Receives up to `max` messages from the first socket that has any, registering `cx`'s
    /// waker with every socket otherwise. Ready with that socket's index. Errors are per
    /// datagram on a connectionless socket (an ICMP unreachable reported on the next read), so
    /// the socket is polled again.
    pub fn poll_recv<U: UdpSocket>(
        &mut self,
        cx: &mut Context<'_>,
        socks: &[(U, SocketAddr)],
        max: usize,
    ) -> Poll<usize> {
        let max = max.clamp(1, RX_SLOTS);
        for k in 0..socks.len() {
            let i = (self.start + k) % socks.len();
            // A socket that keeps failing is treated as idle until its next wake-up rather than
            // spinning here.
            for _ in 0..16 {
                let mut chunks = self.buf.chunks_mut(RX_SLOT_BYTES);
                let mut bufs: [IoSliceMut<'_>; RX_SLOTS] =
                    std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or(&mut [])));
                match socks[i].0.poll_recv_batch(cx, &mut bufs[..max], &mut self.meta[..max]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.n = n.min(max);
                        self.start = (i + 1) % socks.len();
                        self.recv_calls += 1;
                        self.received_datagrams += self.datagrams().count() as u64;
                        return Poll::Ready(i);
                    }
                    Poll::Ready(_) => continue,
                    Poll::Pending => break,
                }
            }
        }
        Poll::Pending
    }

    /// Waits for datagrams on any of `socks` (see [`RxBatch::poll_recv`]).
    pub async fn recv<U: UdpSocket>(&mut self, socks: &[(U, SocketAddr)], max: usize) -> usize {
        std::future::poll_fn(|cx| self.poll_recv(cx, socks, max)).await
    }

    /// Receives what is ready now, without waiting.
    pub fn try_recv<U: UdpSocket>(&mut self, socks: &[(U, SocketAddr)], max: usize) -> Option<usize> {
        match self.poll_recv(&mut Context::from_waker(Waker::noop()), socks, max) {
            Poll::Ready(i) => Some(i),
            Poll::Pending => None,
        }
    }

    /// The datagrams of the last receive, GRO trains split, in arrival order.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.buf.chunks(RX_SLOT_BYTES).zip(&self.meta[..self.n]).flat_map(|(b, m)| {
            let len = m.len.min(b.len());
            b[..len].chunks(m.stride.max(1)).map(move |d| (m.src, d))
        })
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// With CAP_NET_ADMIN the buffers reach [`SOCKET_BUFFER`] whatever the sysctl cap; without,
    /// the receive buffer is what the cap allows (and the warning says so).
    #[test]
    fn buffers_are_forced_past_the_sysctl_cap_where_allowed() {
        let sock = bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        let (rcv, snd) = buffer_sizes(&sock).expect("getsockopt");
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind probe");
        if force_buffer(&probe, Buffer::Receive) {
            assert!(rcv / 2 >= SOCKET_BUFFER, "receive buffer {rcv} (doubled) below {SOCKET_BUFFER}");
            assert!(snd / 2 >= SOCKET_BUFFER, "send buffer {snd} (doubled) below {SOCKET_BUFFER}");
        } else {
            let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
                .expect("rmem_max")
                .trim()
                .parse()
                .expect("a number");
            assert_eq!(rcv / 2, cap.min(SOCKET_BUFFER), "receive buffer is the sysctl cap");
        }
    }
}
