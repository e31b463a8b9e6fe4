//! Fuzz harnesses for everything in `sleap-rtc-core` that a remote party can feed.
//!
//! Each harness checks properties, not only "no panic": decoders must round-trip what they
//! accept, the room hub must keep its invariants and never deliver across rooms or under a
//! forged sender, the transfer receiver must never commit bytes that did not verify, and every
//! path a job spec or transfer manifest lets through must stay inside its directory.
//!
//! The same functions run under libFuzzer (`fuzz/run.sh`) and under `cargo test`, which replays
//! the committed corpora and every past crash (`tests/corpus.rs`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Component, Path};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use serde_json::{Value, json};
use sleap_rtc_core::job::{self, PathRef, PathVerdict, bridge};
use sleap_rtc_core::room::{ConnId, Grant, Hub, Limits, Millis, Output, Principal, RegisterRequest};
use sleap_rtc_core::signal::{self, ServerEnvelope, ServerMessage};
use sleap_rtc_core::transfer::{self, FileEntry, Manifest, Receiver, ReceiverAction, TransferMsg};
use sleap_rtc_core::{peer, registry, session, stun};

/// A relative name that a receiver will join onto its directory must only have normal
/// components: no root, no prefix, no `.`/`..`, no NUL.
fn assert_confined(name: &str) {
    assert!(!name.contains('\0'), "NUL let through in {name:?}");
    for c in Path::new(name).components() {
        assert!(matches!(c, Component::Normal(_)), "{name:?} has a {c:?} component");
    }
}

fn pick<'a>(pool: &[&'a str], i: u8) -> &'a str {
    pool[i as usize % pool.len()]
}

mod control;
mod frames;
mod hub;
mod jobs;
mod manifest;
mod upstream_msgs;
mod webrtc;
mod wire;

pub use control::ctl_and_bridge;
pub use frames::{transfer_decode, transfer_receiver};
pub use hub::{cluster_msg, room_sequence};
pub use jobs::job_spec;
pub use manifest::registry_manifest;
pub use upstream_msgs::upstream_codec;
pub use webrtc::peer_sdp;
pub use wire::signal_decode;
