//! Two real str0m peers (`core::session`) joined by a [`Link`] per direction in virtual time:
//! the harness of `tests/sim.rs` and of the `path-sim` example. Deterministic per seed.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sleap_rtc_core::netsim::{Link, LinkParams, LinkStats};
use sleap_rtc_core::session::{
    Direction, IoRequest, Session, SessionConfig, SessionEvent, SessionOutput, TransferFailed,
};
use sleap_rtc_core::transfer::{FileEntry, Manifest};

const A: &str = "127.0.0.1:10001";
const B: &str = "127.0.0.1:10002";

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The receiving application's "disk": `.part` files and finished files, in memory. With
/// `keep: false` only lengths and a running hash are kept, so large transfers cost no memory.
pub struct Disk {
    pub keep: bool,
    pub part: HashMap<u32, Vec<u8>>,
    pub part_len: HashMap<u32, u64>,
    pub hashers: HashMap<u32, blake3::Hasher>,
    pub done: HashMap<String, Vec<u8>>,
    pub done_hash: HashMap<String, String>,
    pub names: HashMap<u32, String>,
}

impl Disk {
    pub fn new(keep: bool) -> Disk {
        Disk {
            keep,
            part: HashMap::new(),
            part_len: HashMap::new(),
            hashers: HashMap::new(),
            done: HashMap::new(),
            done_hash: HashMap::new(),
            names: HashMap::new(),
        }
    }

    pub fn held(&self) -> u64 {
        self.part_len.values().sum::<u64>() + self.done.values().map(|d| d.len() as u64).sum::<u64>()
    }
}

/// What the sender reads: either real bytes or a deterministic pattern generated on demand.
pub enum Files {
    Bytes(Vec<Vec<u8>>),
    /// (size, seed) per file: byte i is `pattern(seed, i)`.
    Pattern(Vec<(u64, u64)>),
}

pub fn pattern_block(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
            (x ^ (x >> 29)) as u8
        })
        .collect()
}

impl Files {
    pub fn read(&self, file: u32, offset: u64, len: usize) -> Vec<u8> {
        match self {
            Files::Bytes(v) => v[file as usize][offset as usize..offset as usize + len].to_vec(),
            Files::Pattern(v) => pattern_block(v[file as usize].1, offset, len),
        }
    }

    pub fn entries(&self) -> Vec<FileEntry> {
        match self {
            Files::Bytes(v) => v
                .iter()
                .enumerate()
                .map(|(i, d)| FileEntry {
                    name: format!("model/f{i}.bin"),
                    size: d.len() as u64,
                    blake3: blake3::hash(d).to_hex().to_string(),
                })
                .collect(),
            Files::Pattern(v) => v
                .iter()
                .enumerate()
                .map(|(i, (size, seed))| {
                    let mut h = blake3::Hasher::new();
                    let mut off = 0;
                    while off < *size {
                        let n = (*size - off).min(1 << 20) as usize;
                        h.update(&pattern_block(*seed, off, n));
                        off += n as u64;
                    }
                    FileEntry {
                        name: format!("model/f{i}.bin"),
                        size: *size,
                        blake3: h.finalize().to_hex().to_string(),
                    }
                })
                .collect(),
        }
    }
}

pub struct Side {
    pub session: Session,
    pub addr: SocketAddr,
    pub timeout: Instant,
}

pub struct Conn {
    pub a: Side,
    pub b: Side,
    /// (delivery time, sequence) → (destination is b?, datagram).
    pub wire: BTreeMap<(Instant, u64), (bool, Vec<u8>)>,
    pub seq: u64,
}

fn side(now: Instant, addr: &str, cfg: &SessionConfig) -> Side {
    let addr: SocketAddr = addr.parse().expect("static address");
    let mut session = Session::new(cfg.clone(), now);
    session.peer().add_local_candidate(addr, None).expect("host candidate");
    Side { session, addr, timeout: now }
}

pub fn connect(now: Instant, cfg: &SessionConfig) -> Conn {
    let mut a = side(now, A, cfg);
    let mut b = side(now, B, cfg);
    let offer = a.session.peer().create_offer().expect("offer");
    let answer = b.session.peer().accept_offer(&offer).expect("answer");
    a.session.peer().accept_answer(&answer).expect("accept answer");
    Conn { a, b, wire: BTreeMap::new(), seq: 0 }
}

pub struct World {
    pub now: Instant,
    /// a → b, b → a.
    pub links: [Link; 2],
    /// Every datagram is dropped (a vanished peer).
    pub blackout: bool,
}

impl World {
    pub fn new(now: Instant, ab: LinkParams, ba: LinkParams, seed: u64) -> World {
        World { now, links: [Link::new(ab, seed), Link::new(ba, seed ^ 0x5555)], blackout: false }
    }

    pub fn symmetric(now: Instant, p: LinkParams, seed: u64) -> World {
        World::new(now, p, p, seed)
    }

    pub fn stats(&self) -> [LinkStats; 2] {
        [self.links[0].stats(), self.links[1].stats()]
    }
}

/// What happened while draining one side.
#[derive(Default)]
pub struct Drained {
    pub frames_written: usize,
    pub bytes_written: u64,
    pub send_done: Option<Result<Vec<u32>, TransferFailed>>,
    pub recv_done: Option<Result<Vec<u32>, TransferFailed>>,
    pub opened: usize,
    pub closed: usize,
    pub messages: Vec<String>,
}

impl World {
    /// Drains one side's output: datagrams onto the wire, file I/O against `disk` (side B
    /// receives) or `files` (side A sends).
    pub fn drain(&mut self, conn: &mut Conn, is_a: bool, files: &Files, disk: &mut Disk, out: &mut Drained) {
        loop {
            let s = if is_a { &mut conn.a } else { &mut conn.b };
            match s.session.poll_output().expect("poll_output") {
                SessionOutput::Timeout(t) => {
                    s.timeout = t;
                    break;
                }
                SessionOutput::Transmit { contents, .. } => {
                    if self.blackout {
                        continue;
                    }
                    let link = &mut self.links[if is_a { 0 } else { 1 }];
                    for at in link.send(self.now, contents.len() + 28) {
                        conn.seq += 1;
                        conn.wire.insert((at, conn.seq), (is_a, contents.clone()));
                    }
                }
                SessionOutput::Io(io) => match io {
                    IoRequest::Read { transfer, chunk } => {
                        let data = files.read(chunk.file, chunk.offset, chunk.len);
                        s.session.read_done(transfer, chunk, Ok(data));
                    }
                    IoRequest::Prepare { transfer, manifest } => {
                        let existing: Vec<u64> = (0..manifest.files.len() as u32)
                            .map(|i| {
                                disk.names.insert(i, manifest.files[i as usize].name.clone());
                                disk.part_len.get(&i).copied().unwrap_or(0)
                            })
                            .collect();
                        s.session.prepared(transfer, Ok(existing));
                    }
                    IoRequest::Write { transfer, file, offset, data } => {
                        let len = disk.part_len.entry(file).or_default();
                        assert_eq!(*len, offset, "writes are sequential");
                        *len += data.len() as u64;
                        disk.hashers.entry(file).or_default().update(&data);
                        if disk.keep {
                            disk.part.entry(file).or_default().extend_from_slice(&data);
                        }
                        out.frames_written += 1;
                        out.bytes_written += data.len() as u64;
                        s.session.write_done(transfer, file, offset + data.len() as u64, Ok(()));
                    }
                    IoRequest::Verify { transfer, file } => {
                        let h = disk.hashers.get(&file).map_or_else(
                            || blake3::hash(&[]).to_hex().to_string(),
                            |h| h.finalize().to_hex().to_string(),
                        );
                        s.session.verified(transfer, file, Ok(h));
                    }
                    IoRequest::Commit { transfer, file } => {
                        let name = disk.names[&file].clone();
                        let d = disk.part.remove(&file).unwrap_or_default();
                        let h = disk.hashers.remove(&file).map(|h| h.finalize().to_hex().to_string());
                        disk.part_len.remove(&file);
                        disk.done_hash.insert(name.clone(), h.unwrap_or_default());
                        disk.done.insert(name, d);
                        s.session.committed(transfer, file, Ok(()));
                    }
                    IoRequest::Discard { file, .. } => {
                        disk.part.remove(&file);
                        disk.part_len.remove(&file);
                        disk.hashers.remove(&file);
                    }
                },
                SessionOutput::Event(SessionEvent::TransferDone { direction, result, .. }) => match direction {
                    Direction::Send => out.send_done = Some(result),
                    Direction::Receive => out.recv_done = Some(result),
                },
                SessionOutput::Event(SessionEvent::Open) => out.opened += 1,
                SessionOutput::Event(SessionEvent::Closed) => out.closed += 1,
                SessionOutput::Event(SessionEvent::Message(m)) => out.messages.push(m),
                SessionOutput::Event(_) => {}
            }
        }
    }

    /// Advances virtual time to the next packet or timer and handles exactly one of them (str0m
    /// wants its output drained after every input).
    pub fn step(&mut self, conn: &mut Conn) {
        let next_pkt = conn.wire.keys().next().copied();
        let next_timer = conn.a.timeout.min(conn.b.timeout);
        match next_pkt {
            Some((at, seq)) if at <= next_timer => {
                self.now = self.now.max(at);
                let Some((to_b, data)) = conn.wire.remove(&(at, seq)) else { return };
                let (dst, src) = if to_b { (&mut conn.b, conn.a.addr) } else { (&mut conn.a, conn.b.addr) };
                dst.session.handle_receive(self.now, src, dst.addr, &data).expect("handle_receive");
            }
            _ => {
                self.now = self.now.max(next_timer);
                if conn.a.timeout <= self.now {
                    conn.a.session.handle_timeout(self.now).expect("handle_timeout");
                } else {
                    conn.b.session.handle_timeout(self.now).expect("handle_timeout");
                }
            }
        }
    }
}

/// One connection's outcome.
pub struct Run {
    pub completed: bool,
    /// Virtual time from the receiver's first written byte to both sides done.
    pub transfer_time: Duration,
    pub bytes: u64,
    /// Largest bulk window the sender reached.
    pub peak_window: usize,
}

/// Runs one connection: A sends `manifest` to B until done, `limit` of virtual time passed, or B
/// has written `cut_after` frames.
pub fn run_connection(
    w: &mut World,
    cfg: &SessionConfig,
    files: &Files,
    manifest: &Manifest,
    disk: &mut Disk,
    cut_after: usize,
    limit: Duration,
) -> Run {
    let mut conn = connect(w.now, cfg);
    conn.a.session.send_files(manifest.clone()).expect("send_files");
    let deadline = w.now + limit;
    let mut d = Drained::default();
    let mut first_byte: Option<Instant> = None;
    let mut peak_window = 0;
    let run = |w: &World, completed: bool, d: &Drained, first: Option<Instant>, peak| Run {
        completed,
        transfer_time: first.map_or(Duration::ZERO, |f| w.now - f),
        bytes: d.bytes_written,
        peak_window: peak,
    };
    while w.now < deadline {
        w.drain(&mut conn, true, files, disk, &mut d);
        w.drain(&mut conn, false, files, disk, &mut d);
        peak_window = peak_window.max(conn.a.session.bulk_window());
        if first_byte.is_none() && d.bytes_written > 0 {
            first_byte = Some(w.now);
        }
        if d.frames_written > cut_after {
            return run(w, false, &d, first_byte, peak_window);
        }
        if let (Some(s), Some(r)) = (&d.send_done, &d.recv_done) {
            assert_eq!(s, &Ok(vec![]), "sender saw failures");
            assert_eq!(r, &Ok(vec![]), "receiver saw failures");
            return run(w, true, &d, first_byte, peak_window);
        }
        w.step(&mut conn);
    }
    run(w, false, &d, first_byte, peak_window)
}

/// The old harness's link: random loss and duplication, fixed delay plus jitter, no bottleneck.
pub fn lossy(loss: f64, dup: f64, delay_ms: u64, jitter_ms: u64) -> LinkParams {
    LinkParams {
        loss,
        dup,
        jitter: Duration::from_millis(jitter_ms),
        ..LinkParams::clean(Duration::from_millis(delay_ms))
    }
}
