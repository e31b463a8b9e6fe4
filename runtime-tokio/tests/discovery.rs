//! A process that only registers and discovers (`sleap-rtc workers`) makes no DTLS key: the key
//! is made for the first connection, or earlier by a caller about to connect. Its own test
//! binary, because the key is one per process.

mod common;

use sleap_rtc_core::signal::Filters;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_and_discovering_make_no_dtls_key() {
    let env = common::env().await;
    let _worker = env.worker().await;
    let client = env.client().await;
    let workers =
        client.discover(Filters { role: Some("worker".into()), ..Default::default() }).await.expect("discover");
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert!(!sleap_rtc_driver::cert::asked(), "registering and discovering made a DTLS key");
    sleap_rtc_tokio::conn::prepare_certificate();
    assert!(sleap_rtc_driver::cert::asked(), "a caller about to connect has the key made");
}
