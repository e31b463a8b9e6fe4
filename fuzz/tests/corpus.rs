//! Replays every committed seed (`corpus/<target>/`) and every input that once crashed a target
//! (`regressions/<target>/`) through the same harnesses the fuzzer runs, so a fixed crash stays
//! fixed without libFuzzer in the loop.

use std::path::Path;

type Harness = fn(&[u8]);

const TARGETS: &[(&str, Harness)] = &[
    ("signal_decode", sleap_rtc_fuzz::signal_decode),
    ("room_sequence", sleap_rtc_fuzz::room_sequence),
    ("transfer_decode", sleap_rtc_fuzz::transfer_decode),
    ("transfer_receiver", sleap_rtc_fuzz::transfer_receiver),
    ("job_spec", sleap_rtc_fuzz::job_spec),
    ("ctl_and_bridge", sleap_rtc_fuzz::ctl_and_bridge),
    ("registry_manifest", sleap_rtc_fuzz::registry_manifest),
    ("peer_sdp", sleap_rtc_fuzz::peer_sdp),
    ("cluster_msg", sleap_rtc_fuzz::cluster_msg),
    ("upstream_codec", sleap_rtc_fuzz::upstream_codec),
];

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_target_has_seeds_and_replays_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, harness) in TARGETS {
        let seeds = inputs(&root.join("corpus").join(name));
        assert!(!seeds.is_empty(), "no seed corpus committed for {name}");
        let regressions = inputs(&root.join("regressions").join(name));
        for path in seeds.iter().chain(&regressions) {
            let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let r = std::panic::catch_unwind(|| harness(&data));
            assert!(r.is_ok(), "{name} fails on {}", path.display());
        }
    }
}

#[test]
fn targets_match_the_fuzz_binaries() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut bins: Vec<String> = inputs(&root.join("fuzz_targets"))
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    bins.sort();
    let mut names: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(bins, names, "tests/corpus.rs must replay every fuzz target");
}
