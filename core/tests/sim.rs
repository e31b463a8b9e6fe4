//! Two real str0m peers joined by an in-memory link in virtual time, with loss, duplication,
//! reordering and delay, moving files with `core::session` (transfer over the peer) — then a cut
//! mid-transfer, a fresh connection and a resume. Everything is deterministic per seed.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sleap_rtc_core::session::{Direction, IoRequest, Session, SessionConfig, SessionEvent, SessionOutput};
use sleap_rtc_core::transfer::{FileEntry, Manifest};

const A: &str = "127.0.0.1:10001";
const B: &str = "127.0.0.1:10002";

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

/// The receiving application's "disk": `.part` files and finished files, in memory.
#[derive(Default)]
struct Disk {
    part: HashMap<u32, Vec<u8>>,
    done: HashMap<String, Vec<u8>>,
    names: HashMap<u32, String>,
}

struct Side {
    session: Session,
    addr: SocketAddr,
    timeout: Instant,
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
    let cfg = SessionConfig { chunk: 8 * 1024, high_water: 64 * 1024, ..SessionConfig::default() };
    let mut session = Session::new(cfg, now);
    session.peer().add_local_candidate(addr, None).unwrap();
    Side { session, addr, timeout: now }
}

fn connect(now: Instant) -> Conn {
    let mut a = side(now, A);
    let mut b = side(now, B);
    let offer = a.session.peer().create_offer().unwrap();
    let answer = b.session.peer().accept_offer(&offer).unwrap();
    a.session.peer().accept_answer(&answer).unwrap();
    Conn { a, b, wire: BTreeMap::new(), seq: 0 }
}

struct World {
    now: Instant,
    rng: Rng,
    link: LinkParams,
}

/// What happened while draining one side.
#[derive(Default)]
struct Drained {
    frames_written: usize,
    send_done: Option<Result<Vec<u32>, String>>,
    recv_done: Option<Result<Vec<u32>, String>>,
    opened: usize,
    closed: usize,
}

impl World {
    /// Drains one side's output: datagrams onto the wire, file I/O against `disk` (side B
    /// receives) or `files` (side A sends).
    fn drain(&mut self, conn: &mut Conn, is_a: bool, files: &[Vec<u8>], disk: &mut Disk, out: &mut Drained) {
        loop {
            let s = if is_a { &mut conn.a } else { &mut conn.b };
            match s.session.poll_output().unwrap() {
                SessionOutput::Timeout(t) => {
                    s.timeout = t;
                    break;
                }
                SessionOutput::Transmit { contents, .. } => {
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
                SessionOutput::Io(io) => match io {
                    IoRequest::Read { transfer, chunk } => {
                        let f = &files[chunk.file as usize];
                        let data = f[chunk.offset as usize..chunk.offset as usize + chunk.len].to_vec();
                        s.session.read_done(transfer, chunk, Ok(data));
                    }
                    IoRequest::Prepare { transfer, manifest } => {
                        let existing: Vec<u64> = (0..manifest.files.len() as u32)
                            .map(|i| {
                                disk.names.insert(i, manifest.files[i as usize].name.clone());
                                disk.part.get(&i).map_or(0, |p| p.len() as u64)
                            })
                            .collect();
                        s.session.prepared(transfer, Ok(existing));
                    }
                    IoRequest::Write { transfer, file, offset, data } => {
                        let part = disk.part.entry(file).or_default();
                        assert_eq!(part.len() as u64, offset, "writes are sequential");
                        part.extend_from_slice(&data);
                        out.frames_written += 1;
                        s.session.write_done(transfer, file, offset + data.len() as u64, Ok(()));
                    }
                    IoRequest::Verify { transfer, file } => {
                        let h = blake3::hash(disk.part.get(&file).map_or(&[][..], |p| p)).to_hex().to_string();
                        s.session.verified(transfer, file, Ok(h));
                    }
                    IoRequest::Commit { transfer, file } => {
                        let d = disk.part.remove(&file).unwrap_or_default();
                        disk.done.insert(disk.names[&file].clone(), d);
                        s.session.committed(transfer, file, Ok(()));
                    }
                    IoRequest::Discard { file, .. } => {
                        disk.part.remove(&file);
                    }
                },
                SessionOutput::Event(SessionEvent::TransferDone { direction, result, .. }) => match direction {
                    Direction::Send => out.send_done = Some(result),
                    Direction::Receive => out.recv_done = Some(result),
                },
                SessionOutput::Event(SessionEvent::Open) => out.opened += 1,
                SessionOutput::Event(SessionEvent::Closed) => out.closed += 1,
                SessionOutput::Event(_) => {}
            }
        }
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
                dst.session.handle_receive(self.now, src, dst.addr, &data).unwrap();
            }
            _ => {
                self.now = self.now.max(next_timer);
                if conn.a.timeout <= self.now {
                    conn.a.session.handle_timeout(self.now).unwrap();
                } else {
                    conn.b.session.handle_timeout(self.now).unwrap();
                }
            }
        }
    }
}

fn entry(name: &str, d: &[u8]) -> FileEntry {
    FileEntry { name: name.into(), size: d.len() as u64, blake3: blake3::hash(d).to_hex().to_string() }
}

/// Runs one connection: A sends `manifest` to B until done or B has written `cut_after` frames.
/// Returns true when the transfer completed on both sides.
fn run_connection(w: &mut World, files: &[Vec<u8>], manifest: &Manifest, disk: &mut Disk, cut_after: usize) -> bool {
    let mut conn = connect(w.now);
    conn.a.session.send_files(manifest.clone()).unwrap();
    let deadline = w.now + Duration::from_secs(120);
    let mut d = Drained::default();
    while w.now < deadline {
        w.drain(&mut conn, true, files, disk, &mut d);
        w.drain(&mut conn, false, files, disk, &mut d);
        if d.frames_written > cut_after {
            return false;
        }
        if let (Some(s), Some(r)) = (&d.send_done, &d.recv_done) {
            assert_eq!(s, &Ok(vec![]), "sender saw failures");
            assert_eq!(r, &Ok(vec![]), "receiver saw failures");
            return true;
        }
        w.step(&mut conn);
    }
    false
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
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// 5 % loss, 2 % duplication, reordering through jitter, 20–60 ms delay; cut after some
    /// frames, then a new connection resumes from the receiver's `.part` files.
    #[test]
    fn lossy_link_cut_and_resume(seed in 1u64..u64::MAX, cut in 3usize..25) {
        let link = LinkParams { loss: 0.05, dup: 0.02, delay_ms: 20, jitter_ms: 40 };
        scenario(seed, link, &[200_000, 70_000], Some(cut));
    }
}

/// Runs an idle connection for `secs` of virtual time; from `silence_at` (if given) on, every
/// datagram is lost (the other side crashed or the path went away). Returns (opened, closed at).
fn idle(silence_at: Option<u64>, secs: u64) -> (usize, Option<Duration>) {
    let start = Instant::now();
    let link = LinkParams { loss: 0.0, dup: 0.0, delay_ms: 10, jitter_ms: 5 };
    let mut w = World { now: start, rng: Rng(7), link };
    let mut conn = connect(w.now);
    let mut disk = Disk::default();
    let mut d = Drained::default();
    while w.now < start + Duration::from_secs(secs) {
        if silence_at.is_some_and(|s| w.now >= start + Duration::from_secs(s)) {
            w.link.loss = 1.0;
            conn.wire.clear();
        }
        w.drain(&mut conn, true, &[], &mut disk, &mut d);
        w.drain(&mut conn, false, &[], &mut disk, &mut d);
        if d.closed == 2 {
            return (d.opened, Some(w.now - start));
        }
        w.step(&mut conn);
    }
    (d.opened, None)
}

#[test]
fn an_idle_live_connection_stays_open() {
    let (opened, closed) = idle(None, 120);
    assert_eq!(opened, 2);
    assert_eq!(closed, None, "keepalives must keep a quiet connection open");
}

#[test]
fn a_vanished_peer_is_noticed_within_the_disconnect_timeout() {
    let (opened, closed) = idle(Some(5), 120);
    assert_eq!(opened, 2);
    let t = closed.expect("both sides closed");
    let limit = Duration::from_secs(5) + SessionConfig::default().disconnect_timeout + Duration::from_secs(1);
    assert!(t <= limit, "closed after {t:?}");
}
