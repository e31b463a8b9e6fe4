//! sleap-rtc patch: spurious fast retransmissions, proven by the peer's duplicate-TSN reports.
//!
//! A chunk that was only delayed (overtaken by later ones) but deemed lost gets sent twice; the
//! peer receives both copies and lists the TSN among the duplicates of its next SACK (RFC 9260
//! §6.2, as TCP's DSACK does). When every chunk a recovery resent comes back as a duplicate, the
//! loss was reordering and the window reduction was for nothing: it is undone (as Linux undoes
//! a recovery on DSACK, and Eifel, RFC 3522, on timestamps), and the caller widens the
//! reordering window (RACK, RFC 8985 §6.2) so the same delay is not taken for a loss again.

use rustc_hash::FxHashSet;

/// What a SACK's duplicate reports proved about the current recovery.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Proof {
    /// A chunk the recovery resent was a duplicate: the first such report of a recovery.
    pub(crate) spurious: bool,
    /// Every resent chunk was a duplicate: the `(cwnd, ssthresh)` the recovery started from.
    pub(crate) restore: Option<(u32, u32)>,
}

#[derive(Debug, Default)]
pub(crate) struct RecoveryUndo {
    /// `(cwnd, ssthresh)` before the recovery reduced them; `None` once undone or given up.
    saved: Option<(u32, u32)>,
    /// TSNs fast-retransmitted in this recovery and not yet reported as duplicates.
    resent: FxHashSet<u32>,
    /// Whether this recovery already reported a spurious retransmission.
    proven: bool,
}

impl RecoveryUndo {
    /// A fast recovery begins; `cwnd` and `ssthresh` are the values it is about to reduce.
    pub(crate) fn start(&mut self, cwnd: u32, ssthresh: u32) {
        self.saved = Some((cwnd, ssthresh));
        self.resent.clear();
        self.proven = false;
    }

    /// `tsn` was fast-retransmitted.
    pub(crate) fn resent(&mut self, tsn: u32) {
        if self.saved.is_some() {
            self.resent.insert(tsn);
        }
    }

    /// A timeout retransmits everything: a duplicate then proves nothing about the recovery.
    pub(crate) fn cancel(&mut self) {
        self.saved = None;
        self.resent.clear();
    }

    /// The duplicate TSNs one SACK reported.
    pub(crate) fn on_duplicates(&mut self, dups: &[u32]) -> Proof {
        let mut proof = Proof::default();
        if self.saved.is_none() {
            return proof;
        }
        let mut hit = false;
        for tsn in dups {
            hit |= self.resent.remove(tsn);
        }
        if hit && !self.proven {
            self.proven = true;
            proof.spurious = true;
        }
        if hit && self.resent.is_empty() {
            proof.restore = self.saved.take();
        }
        proof
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undoes_only_when_every_resent_chunk_was_a_duplicate() {
        let mut u = RecoveryUndo::default();
        u.start(100_000, u32::MAX);
        u.resent(10);
        u.resent(11);
        // A duplicate of a chunk that was never resent (the network duplicated it) proves nothing.
        assert_eq!(u.on_duplicates(&[5]), Proof::default());
        let p = u.on_duplicates(&[10]);
        assert!(p.spurious);
        assert_eq!(p.restore, None);
        let p = u.on_duplicates(&[11]);
        assert!(!p.spurious, "one spurious report per recovery");
        assert_eq!(p.restore, Some((100_000, u32::MAX)));
        // Undone once; later reports change nothing.
        assert_eq!(u.on_duplicates(&[10, 11]), Proof::default());
    }

    #[test]
    fn a_real_loss_or_a_timeout_is_never_undone() {
        let mut u = RecoveryUndo::default();
        u.start(100_000, 200_000);
        u.resent(10);
        u.resent(11);
        // 11 really was lost: only 10 comes back twice.
        let p = u.on_duplicates(&[10]);
        assert!(p.spurious);
        assert_eq!(p.restore, None);
        u.start(50_000, 50_000);
        u.resent(20);
        u.cancel();
        assert_eq!(u.on_duplicates(&[20]), Proof::default());
    }
}
