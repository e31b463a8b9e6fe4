//! The batched UDP path on async-io's sockets (see driver/conformance/udp_batch.rs).

#[path = "../../driver/conformance/udp_batch.rs"]
mod udp_batch;

use sleap_rtc_smol::Smol;

#[test]
fn burst_of_mixed_datagrams_arrives_complete() {
    smol::block_on(udp_batch::burst_of_mixed_datagrams_arrives_complete::<Smol>());
}

#[test]
fn batch_recv_returns_several_per_call() {
    smol::block_on(udp_batch::batch_recv_returns_several_per_call::<Smol>());
}

#[test]
fn socket_buffers_are_enlarged() {
    udp_batch::socket_buffers_are_enlarged();
}
