//! sleap-rtc-core: the pure, sans-IO logic of sleap-rtc.
//!
//! Nothing in this crate opens a socket, reads a clock or a file, spawns a thread or awaits.
//! Time is an argument; results are values (messages to send, connections to close, work to do)
//! that a runtime crate or binary carries out. This keeps every protocol rule testable in a
//! deterministic simulation and reusable across runtimes (tokio, smol, a browser).
//!
//! - [`signal`]: the JSON signaling messages (upstream-compatible) and their decoder.
//! - [`room`]: the signaling server's room/peer state machine.
//! - [`transfer`]: the framed, resumable, verified file-transfer protocol.
//! - [`registry`]: the room model registry: manifest, operations, optimistic-concurrency loop.
//! - [`job`]: job specs and validation, the job state machine, the client↔worker control
//!   messages, peer authentication, and the pure half of driving sleap-nn.
//! - [`netsim`]: a model of one direction of a network path (delay, loss, bottleneck queue),
//!   shared by the simulation tests and the emulated-path benchmark.
//! - [`upstream`]: the codec of upstream sleap-rtc 0.0.7's `TYPE::args` data-channel protocol
//!   (what the SLEAP GUI's remote-training API speaks) and its two challenge proofs.
//! - [`window`]: the bulk window that follows the path (delivery rate × a drain target).
//! - `peer`, `session`, `stun` (feature `webrtc`, on by default): the str0m data-channel peer,
//!   transfers over it with flow control, and STUN for server-reflexive candidates. The
//!   signaling server builds without them.

pub mod cluster;
pub mod job;
pub mod netsim;
#[cfg(feature = "webrtc")]
pub mod peer;
pub mod registry;
#[cfg(feature = "webrtc")]
pub mod relay;
pub mod room;
#[cfg(feature = "webrtc")]
pub mod session;
pub mod signal;
#[cfg(feature = "webrtc")]
pub mod stun;
pub mod transfer;
pub mod upstream;
pub mod window;
