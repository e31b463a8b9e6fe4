//! This process's DTLS certificate: made once, on the blocking pool, the first time a peer
//! connection needs it (or earlier, when a caller that is about to connect asks for it, so the
//! key is made while it registers). A process that only talks to the signaling server, such as
//! `sleap-rtc workers`, never makes one.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use sleap_rtc_core::peer::{DtlsCert, generate_certificate};

use crate::Runtime;

static CERT: OnceLock<Option<DtlsCert>> = OnceLock::new();
/// Whether anything asked for the certificate (it may still be in the making).
static ASKED: AtomicBool = AtomicBool::new(false);

/// Starts making the certificate in the background; calling it again is free.
pub fn prepare<R: Runtime>() {
    ASKED.store(true, Ordering::Relaxed);
    if CERT.get().is_none() {
        // Spawned, not just started: a runtime may cancel blocking work whose future is dropped.
        R::spawn(async {
            let _ = R::spawn_blocking(|| CERT.get_or_init(generate_certificate).is_some()).await;
        });
    }
}

/// Waits until the certificate exists (making it if needed).
pub async fn ready<R: Runtime>() {
    let _ = get::<R>().await;
}

/// The certificate, made now if it was not yet; `None` if it cannot be made.
pub async fn get<R: Runtime>() -> Option<DtlsCert> {
    ASKED.store(true, Ordering::Relaxed);
    match CERT.get() {
        Some(c) => c.clone(),
        None => R::spawn_blocking(|| CERT.get_or_init(generate_certificate).clone()).await.flatten(),
    }
}

/// Whether anything asked for the certificate yet (made, or in the making): for tests of who
/// pays for it.
pub fn asked() -> bool {
    ASKED.load(Ordering::Relaxed)
}
