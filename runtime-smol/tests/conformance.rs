//! The runtime conformance suite (driver/conformance) on smol: the same cases sleap-rtc-tokio
//! runs, against a real signaling server, real UDP/DTLS and the fake trainer. The code under
//! test (client and worker) runs under `smol::block_on` and smol's global executor; only the
//! signaling server uses tokio, on its own threads.

#[path = "../../driver/conformance/mod.rs"]
mod conformance;

conformance::suite!(sleap_rtc_smol::Smol, smol::block_on);

#[path = "../examples/embed.rs"]
#[allow(dead_code)]
mod embed;

/// The embedding example's own code trains a model through a real server and worker.
#[test]
fn the_embedding_example_trains_a_model() {
    let env = conformance::Env::start();
    let out = tempfile::tempdir().expect("tempdir");
    let assets = conformance::assets();
    let (status, files) = smol::block_on(async {
        // A real application would retry "no worker in the room"; the test waits for it.
        let worker = env.start_worker::<sleap_rtc_smol::Smol>().await;
        conformance::wait_for_worker(&env.client::<sleap_rtc_smol::Smol>().await, &worker).await;
        let (config, labels) = (assets.join("tiny_single.yaml"), assets.join("labels.pkg.slp"));
        embed::train(&env.ws, &env.jwt, &env.room, &config, &labels, out.path()).await.expect("the example trains")
    });
    assert_eq!(status.state, sleap_rtc_core::job::JobState::Completed, "{status:?}");
    assert!(files.iter().any(|f| f.ends_with("best.ckpt")), "{files:?}");
}
