//! sleap-rtc-core: the pure, sans-IO logic of sleap-rtc.
//!
//! Nothing in this crate opens a socket, reads a clock or a file, spawns a thread or awaits.
//! Time is an argument; results are values (messages to send, connections to close, work to do)
//! that a runtime crate or binary carries out. This keeps every protocol rule testable in a
//! deterministic simulation and reusable across runtimes (tokio, smol, a browser).
//!
//! - [`signal`]: the JSON signaling messages (upstream-compatible) and their decoder.
//! - [`room`]: the signaling server's room/peer state machine.

pub mod peer;
pub mod room;
pub mod session;
pub mod signal;
pub mod stun;
pub mod transfer;
