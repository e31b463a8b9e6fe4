//! The S3 registry store on smol: the AWS SDK is tokio-based and runs under `Smol::tokio_compat`
//! (async-compat's background reactor). Against a real moto server on 127.0.0.1: publish a run
//! directory, see the manifest, pull it back verified, a manifest update. Everything runs under
//! `smol::block_on`; the only tokio runtime is the one async-compat starts for the SDK.
//!
//! Alone in its test binary because the AWS SDK takes its endpoint and credentials from the
//! environment, which is process-wide.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sleap_rtc_core::registry::Op;
use sleap_rtc_smol::registry::{AnyStore, PublishInfo, manifest, publish, pull, update};

/// Python with moto[server] and boto3 (scripts/test.sh makes the venv).
fn python() -> String {
    if let Ok(p) = std::env::var("SLEAP_RTC_TEST_PYTHON") {
        return p;
    }
    let venv = format!("{}/.cache/sleap-rtc/venv/bin/python", std::env::var("HOME").unwrap_or_default());
    if Path::new(&venv).exists() { venv } else { "python3".into() }
}

/// moto on a free port, killed on drop.
struct Moto(std::process::Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> (Moto, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
    let child = Command::new(python())
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python with moto[server] (scripts/test.sh installs it)");
    let moto = Moto(child);
    let url = format!("http://127.0.0.1:{port}");
    let create = format!(
        "import boto3; boto3.client('s3', endpoint_url='{url}', region_name='us-east-1', \
         aws_access_key_id='test', aws_secret_access_key='test').create_bucket(Bucket='models')"
    );
    for _ in 0..400 {
        let made = Command::new(python()).args(["-c", &create]).stderr(Stdio::null()).status();
        if made.is_ok_and(|s| s.success()) {
            return (moto, url);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("moto did not start");
}

#[test]
fn s3_registry_on_smol() {
    let (_moto, url) = start_moto();
    // SAFETY: the only test in this binary, and nothing else has started threads that read the
    // environment yet.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL", &url);
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    let d = tempfile::tempdir().expect("tempdir");
    let run = d.path().join("run");
    std::fs::create_dir_all(&run).expect("mkdir");
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/assets");
    std::fs::copy(assets.join("tiny_single.yaml"), run.join("training_config.yaml")).expect("config");
    let ckpt: Vec<u8> = (0..1_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(run.join("best.ckpt"), &ckpt).expect("ckpt");

    smol::block_on(async {
        let store = AnyStore::open("s3://models/lab").await.expect("the S3 store opens");
        let info = PublishInfo { trained_by: "me".into(), alias: Some("v1".into()), ..Default::default() };
        let e = publish(&store, "room1", &run, info).await.expect("published to S3");
        assert!(e.s3_path.starts_with("s3://models/lab/room1/"), "{}", e.s3_path);
        let m = manifest(&store, "room1").await.expect("manifest");
        assert_eq!(m.resolve("v1").expect("the alias resolves").id, e.id);
        let (got, dir) = pull(&store, "room1", "v1", &d.path().join("pulled")).await.expect("pulled");
        assert_eq!(got.id, e.id);
        assert_eq!(std::fs::read(dir.join("best.ckpt")).expect("read"), ckpt);
        let m = update(&store, "room1", vec![Op::SetAlias { alias: "best".into(), id: e.id.clone() }])
            .await
            .expect("a conditional manifest write");
        assert_eq!(m.resolve("best").expect("the new alias").id, e.id);
    });
}
