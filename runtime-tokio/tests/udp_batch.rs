//! The batched UDP path on tokio's sockets (see driver/conformance/udp_batch.rs).

#[path = "../../driver/conformance/udp_batch.rs"]
mod udp_batch;

use sleap_rtc_tokio::Tokio;

#[tokio::test]
async fn burst_of_mixed_datagrams_arrives_complete() {
    udp_batch::burst_of_mixed_datagrams_arrives_complete::<Tokio>().await;
}

#[tokio::test]
async fn batch_recv_returns_several_per_call() {
    udp_batch::batch_recv_returns_several_per_call::<Tokio>().await;
}

#[test]
fn socket_buffers_are_enlarged() {
    udp_batch::socket_buffers_are_enlarged();
}
