//! The driver's batched UDP path (`sleap_rtc_driver::udp`) on real sockets on 127.0.0.1, on a
//! given runtime: a burst of datagrams of mixed sizes and destinations queued in a `TxBatch`
//! arrives complete and intact through `RxBatch`, in fewer syscalls than datagrams where the
//! kernel has GSO and recvmmsg/GRO. Included by `tests/udp_batch.rs` of both runtime crates.

use std::net::SocketAddr;
use std::time::Duration;

use sleap_rtc_driver::udp::{self, RX_SLOTS, RxBatch, TxBatch};
use sleap_rtc_driver::{Runtime, UdpSocket};

/// Datagram `i` of `len` bytes: its index, then a pattern that depends on both.
fn datagram(i: u32, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len).map(|k| (k as u32).wrapping_mul(31).wrapping_add(i.wrapping_mul(7)) as u8).collect();
    v[..4].copy_from_slice(&i.to_be_bytes());
    v
}

fn socket<R: Runtime>() -> (R::Udp, SocketAddr) {
    let s = udp::bind("127.0.0.1:0".parse().unwrap()).expect("bind 127.0.0.1");
    let local = s.local_addr().unwrap();
    (R::udp(s).expect("register the socket"), local)
}

/// (receiver index, size) of each datagram, in sending order: runs long enough to be split at
/// the GSO size limit, runs ended by a shorter datagram, singles, and destinations alternating.
fn plan() -> Vec<(usize, usize)> {
    let mut p = Vec::new();
    p.extend(std::iter::repeat_n((0, 1200), 40));
    p.push((0, 700));
    p.extend(std::iter::repeat_n((1, 1200), 3));
    p.extend([(0, 90), (0, 90)]);
    p.extend(std::iter::repeat_n((0, 1400), 60));
    p.extend([(1, 100), (1, 200), (1, 300), (1, 200), (1, 100), (0, 4), (1, 1472)]);
    for k in 0..30 {
        p.push((k % 2, 1100));
    }
    p.extend(std::iter::repeat_n((1, 1472), 100));
    p
}

pub async fn burst_of_mixed_datagrams_arrives_complete<R: Runtime>() {
    let tx_socks = vec![socket::<R>()];
    let rx_socks = vec![socket::<R>(), socket::<R>()];
    let plan = plan();
    let mut tx = TxBatch::default();
    for (i, &(to, len)) in plan.iter().enumerate() {
        tx.push(0, rx_socks[to].1, &datagram(i as u32, len));
    }
    tx.flush(&tx_socks).await;
    assert_eq!(tx.sent_datagrams, plan.len() as u64);
    assert!(tx.is_empty());

    let mut rx = RxBatch::new();
    let mut seen = vec![false; plan.len()];
    let (mut got, mut most_per_call) = (0, 0);
    while got < plan.len() {
        let r = sleap_rtc_driver::timeout::<R, _>(Duration::from_secs(5), rx.recv(&rx_socks, RX_SLOTS)).await;
        let Ok(sock) = r else { panic!("only {got} of {} datagrams arrived", plan.len()) };
        let mut this_call = 0;
        for (src, d) in rx.datagrams() {
            assert_eq!(src, tx_socks[0].1);
            let i =
                u32::from_be_bytes(d[..4.min(d.len())].try_into().expect("datagram shorter than its index")) as usize;
            let &(to, len) = plan.get(i).expect("an index that was sent");
            assert_eq!(to, sock, "datagram {i} reached the wrong socket");
            assert_eq!(d, &datagram(i as u32, len)[..], "datagram {i} arrived changed");
            assert!(!seen[i], "datagram {i} arrived twice");
            seen[i] = true;
            got += 1;
            this_call += 1;
        }
        most_per_call = most_per_call.max(this_call);
    }
    assert_eq!(rx.received_datagrams, plan.len() as u64);
    eprintln!(
        "{} datagrams: {} sends, {} receive calls, at most {most_per_call} datagrams in one",
        plan.len(),
        tx.send_calls,
        rx.recv_calls
    );
    if cfg!(target_os = "linux") {
        assert!(tx_socks[0].0.max_segments() > 1, "Linux ≥ 4.18 has UDP GSO");
        // 40+1 | 3 | 2 | 45 | 15 | 1 | 1 | 300+200 | 1 | 1 | 1 | 30 singles | 43 | 43 | 14: 44 sends.
        assert!(tx.send_calls <= 60, "{} datagrams took {} sends: GSO runs were not formed", plan.len(), tx.send_calls);
        assert!(most_per_call > 1, "recvmmsg/GRO returned one datagram per call");
    }
}

pub async fn batch_recv_returns_several_per_call<R: Runtime>() {
    let (a, _) = socket::<R>();
    let (b, b_addr) = socket::<R>();
    // Plain sends (no GSO): recvmmsg, not GRO, must batch these.
    for i in 0..20u32 {
        let d = datagram(i, 300 + i as usize);
        // tokio reports a new socket writable only once its reactor has seen it so.
        loop {
            std::future::poll_fn(|cx| a.poll_writable(cx)).await.expect("writable");
            match a.try_send_to(&d, b_addr) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                r => break r.map(drop).expect("send on loopback"),
            }
        }
    }
    let mut store = vec![vec![0u8; 2048]; 8];
    let mut meta = [udp::RecvMeta::default(); 8];
    let mut got = Vec::new();
    let mut calls = 0;
    while got.len() < 20 {
        let n = sleap_rtc_driver::timeout::<R, _>(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| {
                let mut bufs: Vec<std::io::IoSliceMut<'_>> =
                    store.iter_mut().map(|b| std::io::IoSliceMut::new(b)).collect();
                b.poll_recv_batch(cx, &mut bufs, &mut meta)
            }),
        )
        .await
        .expect("datagrams arrive")
        .expect("receive");
        assert!((1..=8).contains(&n));
        calls += 1;
        for (buf, m) in store.iter().zip(&meta[..n]) {
            assert_eq!(m.stride, m.len, "unsegmented sends arrive one per buffer");
            got.push(buf[..m.len].to_vec());
        }
    }
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d, &datagram(i as u32, 300 + i), "datagram {i}");
    }
    if cfg!(target_os = "linux") {
        assert!(calls < 20, "20 queued datagrams took {calls} receive calls");
    }
}

pub fn socket_buffers_are_enlarged() {
    let s = udp::bind("127.0.0.1:0".parse().unwrap()).expect("bind 127.0.0.1");
    let (rcv, snd) = udp::buffer_sizes(&s).expect("getsockopt");
    // Linux caps the request at rmem_max/wmem_max and reports twice what it granted.
    let cap = |f: &str| std::fs::read_to_string(f).ok().and_then(|v| v.trim().parse::<usize>().ok());
    if let (Some(rmax), Some(wmax)) = (cap("/proc/sys/net/core/rmem_max"), cap("/proc/sys/net/core/wmem_max")) {
        assert!(rcv >= udp::SOCKET_BUFFER.min(rmax), "SO_RCVBUF {rcv} (rmem_max {rmax})");
        assert!(snd >= udp::SOCKET_BUFFER.min(wmax), "SO_SNDBUF {snd} (wmem_max {wmax})");
    }
}
