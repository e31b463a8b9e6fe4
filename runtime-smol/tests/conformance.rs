//! The runtime conformance suite (driver/conformance) on smol: the same cases sleap-rtc-tokio
//! runs, against a real signaling server, real UDP/DTLS and the fake trainer. The code under
//! test runs under `smol::block_on` and smol's global executor; only the fixtures (server,
//! worker) use tokio, on their own threads.

#[path = "../../driver/conformance/mod.rs"]
mod conformance;

conformance::suite!(sleap_rtc_smol::Smol, smol::block_on);

#[path = "../examples/embed.rs"]
#[allow(dead_code)]
mod embed;

/// The embedding example's own code trains a model through a real server and worker.
#[test]
fn the_embedding_example_trains_a_model() {
    let mut env = conformance::Env::start();
    env.start_worker();
    let out = tempfile::tempdir().expect("tempdir");
    let assets = conformance::assets();
    let (status, files) = smol::block_on(async {
        // A real application would retry "no worker in the room"; the test waits for it.
        conformance::wait_for_worker(&env.client::<sleap_rtc_smol::Smol>().await, &env).await;
        let (config, labels) = (assets.join("tiny_single.yaml"), assets.join("labels.pkg.slp"));
        embed::train(&env.ws, &env.jwt, &env.room, &config, &labels, out.path()).await.expect("the example trains")
    });
    assert_eq!(status.state, sleap_rtc_core::job::JobState::Completed, "{status:?}");
    assert!(files.iter().any(|f| f.ends_with("best.ckpt")), "{files:?}");
}
