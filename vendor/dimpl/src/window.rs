/// Sliding replay window for DTLS record sequence numbers.
///
/// Maintains the latest accepted sequence number and a bitmap of the last
/// [`WINDOW`] sequence numbers to reject duplicates and old records.
///
/// sleap-rtc patch: the window was 64 records, RFC 6347's default. Records
/// reordered deeper than the window are refused as replays, which the layer
/// above sees as loss: at 100 MB/s (~85 records per millisecond) one
/// millisecond of reordering on the path already loses packets, and SCTP then
/// spends a recovery (a window reduction) on each. RFC 6347 §4.1.2.6 and
/// RFC 9147 §4.5.1 let a receiver choose a larger window; 4096 records cover
/// tens of milliseconds at these rates for 512 bytes of state.
///
/// Each epoch should have its own `ReplayWindow` instance. The caller is
/// responsible for routing records to the correct per-epoch window.
#[derive(Debug)]
pub struct ReplayWindow {
    max_seq: u64,
    /// Bit `s % WINDOW` says whether `s` was seen, for `s` in `(max_seq - WINDOW, max_seq]`.
    seen: [u64; WORDS],
}

/// How many sequence numbers behind the newest one are still accepted (once each).
pub const WINDOW: u64 = 4096;
const WORDS: usize = (WINDOW / 64) as usize;

impl Default for ReplayWindow {
    fn default() -> Self {
        Self {
            max_seq: 0,
            seen: [0; WORDS],
        }
    }
}

impl ReplayWindow {
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(seqno: u64) -> (usize, u64) {
        let i = seqno % WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Check if the given sequence number is acceptable (not a replay, not too old).
    /// Read-only: does not modify the window state.
    pub fn check(&self, seqno: u64) -> bool {
        if seqno > self.max_seq {
            true
        } else {
            let offset = self.max_seq - seqno;
            if offset >= WINDOW {
                return false; // too old
            }
            let (word, mask) = Self::slot(seqno);
            (self.seen[word] & mask) == 0 // false if duplicate
        }
    }

    /// Update the window state to record that `seqno` has been received.
    /// Must only be called after the record has been authenticated (decrypted successfully).
    pub fn update(&mut self, seqno: u64) {
        if seqno > self.max_seq {
            let delta = seqno - self.max_seq;
            if delta >= WINDOW {
                // Jump exceeds window size: clear entirely, only newest is seen
                self.seen = [0; WORDS];
            } else {
                // The slots of the sequence numbers skipped over held ones a window older.
                for s in self.max_seq + 1..seqno {
                    let (word, mask) = Self::slot(s);
                    self.seen[word] &= !mask;
                }
            }
            let (word, mask) = Self::slot(seqno);
            self.seen[word] |= mask; // mark newest as seen
            self.max_seq = seqno;
        } else {
            let offset = self.max_seq - seqno;
            if offset < WINDOW {
                let (word, mask) = Self::slot(seqno);
                self.seen[word] |= mask;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Helper: check and update in one step (simulates authenticated record).
    fn check_and_update(w: &mut ReplayWindow, seqno: u64) -> bool {
        if w.check(seqno) {
            w.update(seqno);
            true
        } else {
            false
        }
    }

    #[test]
    fn accepts_fresh_and_rejects_duplicate() {
        let mut w = ReplayWindow::new();
        assert!(check_and_update(&mut w, 1));
        assert!(!check_and_update(&mut w, 1)); // duplicate
        assert!(check_and_update(&mut w, 2)); // next fresh
    }

    #[test]
    fn accepts_out_of_order_within_window() {
        let mut w = ReplayWindow::new();
        assert!(check_and_update(&mut w, 10)); // establish max=10
        assert!(check_and_update(&mut w, 8)); // unseen within 64
        assert!(!check_and_update(&mut w, 8)); // duplicate now
        assert!(check_and_update(&mut w, 9)); // unseen within 64
    }

    #[test]
    fn rejects_too_old() {
        let mut w = ReplayWindow::new();
        assert!(check_and_update(&mut w, WINDOW + 100));
        // offset = WINDOW -> too old
        assert!(!check_and_update(&mut w, 100));
        // offset = WINDOW - 1 -> allowed once
        assert!(check_and_update(&mut w, 101));
        assert!(!check_and_update(&mut w, 101));
    }

    /// sleap-rtc patch: records reordered far deeper than the old 64 are still accepted once.
    #[test]
    fn accepts_deep_reordering_once() {
        let mut w = ReplayWindow::new();
        for seq in (0..3000u64).rev().step_by(7) {
            if seq > 2000 {
                assert!(check_and_update(&mut w, seq));
            }
        }
        assert!(check_and_update(&mut w, 3000));
        for seq in 1..3000u64 {
            let first_time = seq <= 2000 || (2999 - seq) % 7 != 0;
            assert_eq!(check_and_update(&mut w, seq), first_time, "seq {seq}");
        }
        for seq in 1..=3000u64 {
            assert!(!check_and_update(&mut w, seq), "seq {seq} replayed");
        }
    }

    /// sleap-rtc patch: against a model (a set of everything accepted), over a long stream
    /// reordered and duplicated by a deterministic generator, across many window wraps.
    #[test]
    fn agrees_with_a_model_over_many_wraps() {
        let mut w = ReplayWindow::new();
        let mut accepted = std::collections::HashSet::new();
        let mut max: Option<u64> = None;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly in order, displaced by up to 300 either way, sometimes far behind.
            let d = (x % 601) as i64 - 300;
            let seq = if x % 97 == 0 { i.saturating_sub(5000) } else { (i as i64 + d).max(0) as u64 };
            let want = !accepted.contains(&seq) && max.map_or(true, |m| seq > m || m - seq < WINDOW);
            assert_eq!(check_and_update(&mut w, seq), want, "step {i} seq {seq} max {max:?}");
            if want {
                accepted.insert(seq);
                max = Some(max.map_or(seq, |m| m.max(seq)));
            }
        }
    }

    /// sleap-rtc patch: a slot reused after the window slid must not still hold the old bit.
    #[test]
    fn slid_slots_do_not_keep_stale_bits() {
        let mut w = ReplayWindow::new();
        for seq in 0..WINDOW {
            assert!(check_and_update(&mut w, seq));
        }
        // WINDOW + 5 skips over WINDOW..WINDOW+4, whose slots held 0..4.
        assert!(check_and_update(&mut w, WINDOW + 5));
        for seq in WINDOW..WINDOW + 5 {
            assert!(check_and_update(&mut w, seq), "seq {seq}");
        }
        assert!(!check_and_update(&mut w, 5), "now a window behind");
        assert!(!check_and_update(&mut w, 6), "seen, and just inside the window");
    }

    #[test]
    fn handles_large_jump_and_window_shift() {
        let mut w = ReplayWindow::new();
        assert!(check_and_update(&mut w, 1));
        // Large forward jump clears the window entirely
        assert!(check_and_update(&mut w, WINDOW + 16));
        // Within window of new max and unseen
        assert!(check_and_update(&mut w, WINDOW + 15));
        // Too old relative to new max
        assert!(!check_and_update(&mut w, 15));
    }

    #[test]
    fn large_jump_does_not_leave_stale_bits() {
        let mut w = ReplayWindow::new();
        assert!(check_and_update(&mut w, 0));
        // A jump that exceeds the window size must clear it fully so no
        // stale bit from seq 0 remains (WINDOW * 3 shares seq 0's slot).
        assert!(check_and_update(&mut w, WINDOW * 3));
        // Within the window of the new max and never seen: accepted.
        assert!(check_and_update(&mut w, WINDOW * 2 + 1));
        assert!(check_and_update(&mut w, WINDOW * 2 + 64));
    }

    #[test]
    fn check_does_not_modify_window() {
        let mut w = ReplayWindow::new();
        w.update(10);
        // check alone should not change state
        assert!(w.check(11));
        assert!(w.check(11)); // still acceptable because update was never called
        w.update(11);
        assert!(!w.check(11)); // now it's a duplicate
    }

    #[test]
    fn failed_auth_does_not_advance_window() {
        let mut w = ReplayWindow::new();
        w.update(5);
        // Simulate receiving seq 200 that passes check but fails authentication
        assert!(w.check(200));
        // Do NOT call update (authentication failed)
        // Legitimate packet at seq 6 should still be accepted
        assert!(w.check(6));
        w.update(6);
    }
}
