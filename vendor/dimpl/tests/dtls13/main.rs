#[cfg(sleap_rtc_wolfssl)] // sleap-rtc patch: wolfSSL interop not built (SLEAP-RTC-PATCH.md)
#[path = "../wolfssl/mod.rs"]
mod wolfssl_helper;

mod ack;
mod common;
mod conformance;
mod data;
mod edge;
mod fragmentation;
mod handshake;
mod key_update;
mod reorder;
mod retransmit;

#[cfg(sleap_rtc_wolfssl)] // sleap-rtc patch: wolfSSL interop not built (SLEAP-RTC-PATCH.md)
mod wolfssl;
