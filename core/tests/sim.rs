//! Two real str0m peers joined by an in-memory link in virtual time, with loss, duplication,
//! reordering and delay, moving files with `core::transfer` — then a cut mid-transfer, a fresh
//! connection and a resume. Everything is deterministic per seed.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sleap_rtc_core::peer::{Peer, PeerConfig, PeerEvent, PeerOutput};
use sleap_rtc_core::transfer::{
    self, FileEntry, Limits, Manifest, Receiver, ReceiverAction, Sender, SenderEvent, TransferMsg,
};

const A: &str = "127.0.0.1:10001";
const B: &str = "127.0.0.1:10002";
const HIGH_WATER: usize = 64 * 1024;

#[derive(Clone, Copy, Debug)]
struct LinkParams {
    loss: f64,
    dup: f64,
    delay_ms: u64,
    jitter_ms: u64,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
    }
}

/// The receiving application: in-memory `.part` files and finished files.
#[derive(Default)]
struct Disk {
    part: HashMap<u32, Vec<u8>>,
    done: HashMap<String, Vec<u8>>,
}

struct Side {
    peer: Peer,
    addr: SocketAddr,
    timeout: Instant,
    open: bool,
    ctl_out: Vec<String>,
}

struct Conn {
    a: Side,
    b: Side,
    /// (delivery time, sequence) → (destination is b?, datagram).
    wire: BTreeMap<(Instant, u64), (bool, Vec<u8>)>,
    seq: u64,
}

fn side(now: Instant, addr: &str) -> Side {
    let addr: SocketAddr = addr.parse().unwrap();
    let mut peer = Peer::new(&PeerConfig::default(), now);
    peer.add_local_candidate(addr, None).unwrap();
    Side { peer, addr, timeout: now, open: false, ctl_out: Vec::new() }
}

fn connect(now: Instant) -> Conn {
    let mut a = side(now, A);
    let mut b = side(now, B);
    let offer = a.peer.create_offer().unwrap();
    let answer = b.peer.accept_offer(&offer).unwrap();
    a.peer.accept_answer(&answer).unwrap();
    Conn { a, b, wire: BTreeMap::new(), seq: 0 }
}

struct World {
    now: Instant,
    rng: Rng,
    link: LinkParams,
}

impl World {
    /// Drains one side's output onto the wire; returns its events.
    fn drain(&mut self, conn: &mut Conn, is_a: bool) -> Vec<PeerEvent> {
        let mut events = Vec::new();
        loop {
            let s = if is_a { &mut conn.a } else { &mut conn.b };
            match s.peer.poll_output().unwrap() {
                PeerOutput::Timeout(t) => {
                    s.timeout = t;
                    break;
                }
                PeerOutput::Transmit { contents, .. } => {
                    if self.rng.chance(self.link.loss) {
                        continue;
                    }
                    let copies = if self.rng.chance(self.link.dup) { 2 } else { 1 };
                    for _ in 0..copies {
                        let jitter = if self.link.jitter_ms > 0 { self.rng.next() % self.link.jitter_ms } else { 0 };
                        let at = self.now + Duration::from_millis(self.link.delay_ms + jitter);
                        conn.seq += 1;
                        conn.wire.insert((at, conn.seq), (is_a, contents.clone()));
                    }
                }
                PeerOutput::Event(e) => events.push(e),
            }
        }
        events
    }

    /// Advances virtual time to the next packet or timer and handles exactly one of them (str0m
    /// wants its output drained after every input).
    fn step(&mut self, conn: &mut Conn) {
        let next_pkt = conn.wire.keys().next().copied();
        let next_timer = conn.a.timeout.min(conn.b.timeout);
        match next_pkt {
            Some((at, seq)) if at <= next_timer => {
                self.now = self.now.max(at);
                let (to_b, data) = conn.wire.remove(&(at, seq)).unwrap();
                let (dst, src) = if to_b { (&mut conn.b, conn.a.addr) } else { (&mut conn.a, conn.b.addr) };
                dst.peer.handle_receive(self.now, src, dst.addr, &data).unwrap();
            }
            _ => {
                self.now = self.now.max(next_timer);
                if conn.a.timeout <= self.now {
                    conn.a.peer.handle_timeout(self.now).unwrap();
                } else {
                    conn.b.peer.handle_timeout(self.now).unwrap();
                }
            }
        }
    }
}

fn entry(name: &str, d: &[u8]) -> FileEntry {
    FileEntry { name: name.into(), size: d.len() as u64, blake3: blake3::hash(d).to_hex().to_string() }
}

/// Runs one connection: A sends `manifest` to B until done or B has received `cut_after` frames.
/// Returns true when the transfer completed.
fn run_connection(w: &mut World, files: &[Vec<u8>], manifest: &Manifest, disk: &mut Disk, cut_after: usize) -> bool {
    let mut conn = connect(w.now);
    let id = manifest.derived_id();
    let mut sender = Sender::new(id, manifest.clone(), 8 * 1024);
    let mut receiver: Option<Receiver> = None;
    let mut frames_received = 0usize;
    let deadline = w.now + Duration::from_secs(120);
    let mut complete = false;
    while w.now < deadline && !complete {
        for is_a in [true, false] {
            for ev in w.drain(&mut conn, is_a) {
                let s = if is_a { &mut conn.a } else { &mut conn.b };
                match ev {
                    PeerEvent::Open => {
                        s.open = true;
                        if is_a {
                            s.ctl_out.push(sender.offer().to_json());
                        }
                    }
                    PeerEvent::Ctl(text) => {
                        let msg = TransferMsg::from_json(&text).unwrap();
                        if is_a {
                            if let Some(SenderEvent::Complete { failed }) = sender.on_message(&msg).unwrap() {
                                assert!(failed.is_empty(), "files failed: {failed:?}");
                                complete = true;
                            }
                        } else if let TransferMsg::TransferOffer { transfer_id, manifest } = msg {
                            transfer::validate_manifest(&manifest, &Limits::default()).unwrap();
                            let existing: Vec<u64> = (0..manifest.files.len() as u32)
                                .map(|i| disk.part.get(&i).map_or(0, |p| p.len() as u64))
                                .collect();
                            receiver = Some(Receiver::new(transfer_id, manifest, &existing));
                        }
                    }
                    PeerEvent::Bulk(frame) => {
                        frames_received += 1;
                        if frames_received > cut_after {
                            return false;
                        }
                        let r = receiver.as_mut().expect("frames after the offer");
                        if let Some(wr) = r.on_frame(&frame).unwrap() {
                            let part = disk.part.entry(wr.file).or_default();
                            assert_eq!(part.len() as u64, wr.offset);
                            part.extend_from_slice(wr.data);
                            let end = wr.offset + wr.data.len() as u64;
                            r.written(wr.file, end);
                        }
                    }
                    PeerEvent::Connected | PeerEvent::Disconnected | PeerEvent::Closed => {}
                }
            }
        }
        // Receiver application: carry out actions.
        if let Some(r) = receiver.as_mut() {
            while let Some(a) = r.poll_action() {
                match a {
                    ReceiverAction::Send(m) => conn.b.ctl_out.push(m.to_json()),
                    ReceiverAction::Verify { file } => {
                        let data = disk.part.get(&file).cloned().unwrap_or_default();
                        r.verified(file, &blake3::hash(&data).to_hex());
                    }
                    ReceiverAction::Commit { file } => {
                        let d = disk.part.remove(&file).unwrap_or_default();
                        disk.done.insert(r.manifest().files[file as usize].name.clone(), d);
                    }
                    ReceiverAction::Discard { file } => {
                        disk.part.remove(&file);
                    }
                    ReceiverAction::Finished { failed, .. } => assert!(failed.is_empty()),
                }
            }
        }
        for s in [&mut conn.a, &mut conn.b] {
            while let Some(m) = s.ctl_out.first() {
                if !s.open || !s.peer.send_ctl(m).unwrap() {
                    break;
                }
                s.ctl_out.remove(0);
            }
        }
        // Sender application: frames while under the high watermark.
        if conn.a.open {
            while conn.a.peer.bulk_buffered() < HIGH_WATER {
                let Some(c) = sender.next_chunk() else { break };
                let mut frame = Vec::new();
                let f = &files[c.file as usize];
                transfer::encode_frame(c.header(id), &f[c.offset as usize..c.offset as usize + c.len], &mut frame);
                assert!(conn.a.peer.send_bulk(&frame).unwrap(), "str0m refused a frame under the watermark");
            }
        }
        w.drain(&mut conn, true);
        w.step(&mut conn);
    }
    complete
}

fn scenario(seed: u64, link: LinkParams, sizes: &[usize], cut_after: Option<usize>) {
    let files: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut r = Rng(seed.wrapping_mul(0x9E37_79B9) ^ (i as u64 + 1));
            (0..*n).map(|_| r.next() as u8).collect()
        })
        .collect();
    let manifest =
        Manifest { files: files.iter().enumerate().map(|(i, d)| entry(&format!("model/f{i}.bin"), d)).collect() };
    let mut w = World { now: Instant::now(), rng: Rng(seed | 1), link };
    let mut disk = Disk::default();
    if let Some(cut) = cut_after {
        assert!(!run_connection(&mut w, &files, &manifest, &mut disk, cut), "cut happened before completion");
        let held: usize =
            disk.part.values().map(Vec::len).sum::<usize>() + disk.done.values().map(Vec::len).sum::<usize>();
        assert!(held > 0, "something arrived before the cut");
    }
    assert!(run_connection(&mut w, &files, &manifest, &mut disk, usize::MAX), "transfer did not complete");
    for (i, f) in files.iter().enumerate() {
        assert_eq!(disk.done.get(&format!("model/f{i}.bin")), Some(f), "file {i} differs");
    }
}

#[test]
fn clean_link_transfer() {
    let link = LinkParams { loss: 0.0, dup: 0.0, delay_ms: 5, jitter_ms: 0 };
    scenario(1, link, &[300_000, 0, 12_345], None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// 5 % loss, 2 % duplication, reordering through jitter, 20–60 ms delay; cut after some
    /// frames, then a new connection resumes from the receiver's `.part` files.
    #[test]
    fn lossy_link_cut_and_resume(seed in 1u64..u64::MAX, cut in 3usize..25) {
        let link = LinkParams { loss: 0.05, dup: 0.02, delay_ms: 20, jitter_ms: 40 };
        scenario(seed, link, &[200_000, 70_000], Some(cut));
    }
}
