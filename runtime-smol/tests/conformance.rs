//! The runtime conformance suite (driver/conformance) on smol: the same cases sleap-rtc-tokio
//! runs, against a real signaling server, real UDP/DTLS and the fake trainer. The code under
//! test runs under `smol::block_on` and smol's global executor; only the fixtures (server,
//! worker) use tokio, on their own threads.

#[path = "../../driver/conformance/mod.rs"]
mod conformance;

conformance::suite!(sleap_rtc_smol::Smol, smol::block_on);
