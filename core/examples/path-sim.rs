//! Protocol-level transfer figures over an emulated path in virtual time: two real str0m peers
//! (`core::session`) joined by `core::netsim` links, no CPU or socket in the way. Deterministic:
//! the same flags give the same figures on any machine.
//!
//! ```text
//! cargo run --release -p sleap-rtc-core --example path-sim -- --rtt 40 --size 128MiB
//! cargo run --release -p sleap-rtc-core --example path-sim -- --rtt 40 --loss 0.1 --size 32MiB
//! cargo run --release -p sleap-rtc-core --example path-sim -- --rtt 40 --rate 1000 --queue-ms 40 --size 128MiB
//! cargo run --release -p sleap-rtc-core --example path-sim -- --rtt 40 --fixed-window 65536
//! ```
//! Flags: `--rtt MS`, `--jitter MS`, `--loss PERCENT`, `--burst PACKETS`, `--reorder PERCENT`,
//! `--dup PERCENT`, `--rate MBIT`, `--queue-ms MS` (bottleneck queue as time at the rate),
//! `--size N[KiB|MiB|GiB]`, `--seed N`, `--fixed-window BYTES` (the old behaviour: no adaptive
//! window), `--chunk BYTES`, `--limit SECS` (virtual time). `PATH_SIM_TRACE='(FR)|T3-rtx'`
//! prints the sctp-proto and dimpl log records that contain any of the `|`-separated strings.
//!
//! `--jitter` without `--rate` is not a physical path: the unlimited link takes a whole window at
//! one instant and the jitter shuffles it, the first packet of a burst behind thousands of later
//! ones. Give jitter a bottleneck (`--rate`) for figures that mean something.

#[path = "../tests/common/simnet.rs"]
mod simnet;

use std::time::{Duration, Instant};

use simnet::{Disk, Files, World, run_connection};
use sleap_rtc_core::netsim::LinkParams;
use sleap_rtc_core::session::SessionConfig;
use sleap_rtc_core::transfer::Manifest;

/// Counts sctp-proto's congestion events and dimpl's refused records from their log records
/// (neither exposes counters through str0m).
struct Events {
    t3: std::sync::atomic::AtomicU64,
    fast_recovery: std::sync::atomic::AtomicU64,
    /// Recoveries undone because the peer reported every resent chunk as a duplicate.
    undone: std::sync::atomic::AtomicU64,
    /// DTLS records dropped by the receiver's anti-replay window: reordered deeper than it, they
    /// are lost to SCTP as if the path had dropped them.
    replay_drops: std::sync::atomic::AtomicU64,
}

impl log::Log for Events {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.target().starts_with("sctp_proto") || m.target().starts_with("dimpl")
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let msg = r.args().to_string();
        // PATH_SIM_TRACE=a|b prints the sctp-proto and dimpl records that contain a or b (with the
        // virtual time they happened at unknown: order is what a trace is for here).
        static TRACE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        let trace = TRACE.get_or_init(|| {
            std::env::var("PATH_SIM_TRACE").map(|p| p.split('|').map(str::to_owned).collect()).unwrap_or_default()
        });
        if trace.iter().any(|p| msg.contains(p.as_str())) {
            eprintln!("{msg}");
        }
        if msg.contains("T3-rtx timed out") {
            self.t3.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else if msg.ends_with("(FR)") {
            self.fast_recovery.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else if msg.ends_with("(undo)") {
            self.undone.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else if msg == "Discarding replayed rec" {
            self.replay_drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    fn flush(&self) {}
}

static EVENTS: Events = Events {
    t3: std::sync::atomic::AtomicU64::new(0),
    fast_recovery: std::sync::atomic::AtomicU64::new(0),
    undone: std::sync::atomic::AtomicU64::new(0),
    replay_drops: std::sync::atomic::AtomicU64::new(0),
};

fn parse_size(s: &str) -> Result<u64, String> {
    let (n, mul) = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
        .unwrap_or((s, 1));
    n.trim().parse::<u64>().map(|v| v * mul).map_err(|e| format!("bad size {s:?}: {e}"))
}

fn main() -> Result<(), String> {
    if log::set_logger(&EVENTS).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
    let mut args = std::env::args().skip(1);
    let (mut rtt, mut jitter, mut loss, mut burst, mut reorder, mut dup) = (40.0, 0.0, 0.0, 1.0, 0.0, 0.0);
    let (mut rate, mut queue_ms, mut size, mut seed) = (None::<f64>, 40.0, 64u64 << 20, 1u64);
    let (mut fixed, mut chunk, mut limit) = (None::<usize>, None::<usize>, 600.0);
    while let Some(flag) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| v.parse::<f64>().map_err(|e| format!("bad value {v:?}: {e}"));
        match flag.as_str() {
            "--rtt" => rtt = num(val()?)?,
            "--jitter" => jitter = num(val()?)?,
            "--loss" => loss = num(val()?)? / 100.0,
            "--burst" => burst = num(val()?)?,
            "--reorder" => reorder = num(val()?)? / 100.0,
            "--dup" => dup = num(val()?)? / 100.0,
            "--rate" => rate = Some(num(val()?)?),
            "--queue-ms" => queue_ms = num(val()?)?,
            "--size" => size = parse_size(&val()?)?,
            "--seed" => seed = num(val()?)? as u64,
            "--fixed-window" => fixed = Some(num(val()?)? as usize),
            "--chunk" => chunk = Some(num(val()?)? as usize),
            "--limit" => limit = num(val()?)?,
            "--help" | "-h" => {
                println!("see the doc comment of core/examples/path-sim.rs for the flags");
                return Ok(());
            }
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    let rate_bps = rate.map(|m| (m * 1e6) as u64);
    let link = LinkParams {
        jitter: Duration::from_secs_f64(jitter / 1e3),
        loss,
        burst,
        reorder,
        dup,
        rate_bps,
        queue_bytes: rate_bps.map_or(usize::MAX, |r| LinkParams::queue_for(r, Duration::from_secs_f64(queue_ms / 1e3))),
        ..LinkParams::clean(Duration::from_secs_f64(rtt / 2e3))
    };
    let mut cfg = SessionConfig::default();
    if let Some(c) = chunk {
        cfg.chunk = c;
    }
    if let Some(f) = fixed {
        cfg.high_water = f;
        cfg.max_window = f;
    }
    let files = Files::Pattern(vec![(size, seed)]);
    let manifest = Manifest { files: files.entries() };
    let mut w = World::symmetric(Instant::now(), link, seed);
    let mut disk = Disk::new(false);
    let wall = Instant::now();
    let r = run_connection(&mut w, &cfg, &files, &manifest, &mut disk, usize::MAX, Duration::from_secs_f64(limit));
    let verified = disk.done_hash.get("model/f0.bin") == Some(&manifest.files[0].blake3);
    let secs = r.transfer_time.as_secs_f64();
    let [ab, ba] = w.stats();
    println!(
        "rtt {rtt} ms, jitter {jitter} ms, loss {:.3} % (burst {burst}), reorder {:.1} %, dup {:.1} %, rate {}, queue {} ms",
        loss * 100.0,
        reorder * 100.0,
        dup * 100.0,
        rate.map_or("unlimited".to_owned(), |m| format!("{m} Mbit/s")),
        if rate.is_some() { queue_ms.to_string() } else { "-".into() },
    );
    println!(
        "size {size} B: {} in {secs:.2} s virtual = {:.2} MB/s; verified {verified}; peak window {:.1} MiB; \
         data link: {} sent, {} random drops, {} queue drops (peak queue {:.0} KiB); ack link: {} sent; \
         SCTP: {} fast recoveries ({} undone as spurious), {} T3 timeouts; DTLS: {} records refused as replays; {:.1} s wall",
        if r.completed { "completed" } else { "NOT completed" },
        r.bytes as f64 / secs.max(1e-9) / 1e6,
        r.peak_window as f64 / (1 << 20) as f64,
        ab.sent,
        ab.dropped_random,
        ab.dropped_queue,
        ab.peak_queue as f64 / 1024.0,
        ba.sent,
        EVENTS.fast_recovery.load(std::sync::atomic::Ordering::Relaxed),
        EVENTS.undone.load(std::sync::atomic::Ordering::Relaxed),
        EVENTS.t3.load(std::sync::atomic::Ordering::Relaxed),
        EVENTS.replay_drops.load(std::sync::atomic::Ordering::Relaxed),
        wall.elapsed().as_secs_f64(),
    );
    if !r.completed || !verified {
        return Err("transfer did not complete verified".into());
    }
    Ok(())
}
