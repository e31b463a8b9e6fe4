//! The runtime conformance suite (driver/conformance) on tokio: the same cases sleap-rtc-smol
//! runs, against a real signaling server, real UDP/DTLS and the fake trainer.

#[path = "../../driver/conformance/mod.rs"]
mod conformance;

/// Runs a case on a fresh multi-threaded tokio runtime (the client code's `tokio::spawn`s land
/// there), as an application using sleap-rtc-tokio would.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(f)
}

conformance::suite!(sleap_rtc_tokio::Tokio, block_on);
