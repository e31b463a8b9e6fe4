use proptest::prelude::*;

use super::*;

fn model(id: &str) -> ModelEntry {
    ModelEntry { id: id.into(), model_type: "single_instance".into(), ..Default::default() }
}

fn add(id: &str) -> Op {
    Op::AddModel(Box::new(model(id)))
}

#[test]
fn resolve_by_id_alias_and_unique_prefix() {
    let mut m = Manifest::new("r");
    for op in [add("a3f5e8c9aaaa0000"), add("a3f5ffff00000000"), add("b0000000000000000")] {
        apply(&mut m, &op, "t").unwrap();
    }
    apply(&mut m, &Op::SetAlias { alias: "prod".into(), id: "b000".into() }, "t").unwrap();
    assert_eq!(m.resolve("a3f5e8c9aaaa0000").unwrap().id, "a3f5e8c9aaaa0000");
    assert_eq!(m.resolve("prod").unwrap().id, "b0000000000000000");
    assert_eq!(m.resolve("a3f5e").unwrap().id, "a3f5e8c9aaaa0000");
    assert!(matches!(m.resolve("a3f5"), Err(RegistryError::Ambiguous { ids, .. }) if ids.len() == 2));
    assert!(matches!(m.resolve("a3f"), Err(RegistryError::NotFound(_))), "prefixes shorter than 4 are not guessed");
    assert!(matches!(m.resolve("zzzz"), Err(RegistryError::NotFound(_))));
}

#[test]
fn aliases_tags_notes_workers_and_removal() {
    let mut m = Manifest::new("r");
    apply(&mut m, &add("m1"), "t1").unwrap();
    assert!(apply(&mut m, &Op::SetAlias { alias: "v1".into(), id: "m1".into() }, "t2").unwrap());
    assert!(!apply(&mut m, &Op::SetAlias { alias: "v1".into(), id: "m1".into() }, "t3").unwrap(), "idempotent");
    assert_eq!(m.updated_at, "t2");
    apply(&mut m, &add("m2"), "t").unwrap();
    assert_eq!(
        apply(&mut m, &Op::SetAlias { alias: "v1".into(), id: "m2".into() }, "t"),
        Err(RegistryError::AliasTaken("v1".into(), "m1".into()))
    );
    assert!(apply(&mut m, &Op::Tag { id: "m1".into(), tag: "validated".into() }, "t").unwrap());
    assert!(!apply(&mut m, &Op::Tag { id: "m1".into(), tag: "validated".into() }, "t").unwrap());
    assert!(apply(&mut m, &Op::AddWorker { id: "v1".into(), worker: "worker-a".into() }, "t").unwrap());
    assert!(apply(&mut m, &Op::SetNotes { id: "m1".into(), notes: "good".into() }, "t").unwrap());
    assert!(apply(&mut m, &Op::Tag { id: "m1".into(), tag: "bad tag!".into() }, "t").is_err());
    let before = m.clone();
    assert!(apply(&mut m, &Op::Tag { id: "nope".into(), tag: "x".into() }, "t").is_err());
    assert_eq!(m, before, "a failed op changes nothing");
    assert!(apply(&mut m, &Op::RemoveModel { id: "v1".into() }, "t").unwrap());
    assert!(m.aliases.is_empty(), "aliases of a removed model go with it");
    m.check().unwrap();
}

#[test]
fn adding_the_same_model_again_merges() {
    let mut m = Manifest::new("r");
    let mut e = model("m1");
    e.available_on_workers = vec!["w1".into()];
    apply(&mut m, &Op::AddModel(Box::new(e.clone())), "t").unwrap();
    e.available_on_workers = vec!["w2".into()];
    e.notes = "ignored: the first publication's facts stay".into();
    assert!(apply(&mut m, &Op::AddModel(Box::new(e.clone())), "t").unwrap());
    assert_eq!(m.models["m1"].available_on_workers, vec!["w1", "w2"]);
    assert_eq!(m.models["m1"].notes, "");
    assert!(!apply(&mut m, &Op::AddModel(Box::new(e)), "t").unwrap());
}

#[test]
fn model_ids_come_from_content() {
    assert_eq!(model_id("cfg", "d1"), model_id("cfg", "d1"));
    assert_ne!(model_id("cfg", "d1"), model_id("cfg", "d2"));
    assert_ne!(model_id("cfg2", "d1"), model_id("cfg", "d1"));
    assert_eq!(model_id("cfg", "d1").len(), 16);
}

#[test]
fn corrupt_or_foreign_manifests_are_refused_and_not_overwritten() {
    for bad in [
        &b"{not json"[..],
        br#"{"version":"2.0","room_id":"r"}"#,
        br#"{"version":"1.0","room_id":"other"}"#,
        br#"{"version":"1.0","room_id":"r","aliases":{"a":"missing"}}"#,
        br#"{"version":"1.0","room_id":"r","models":{"..":{"id":".."}}}"#,
        br#"{"version":"1.0","room_id":"r","models":{"m":{"id":"m","files":[{"name":"../x","size":1,"blake3":""}]}}}"#,
    ] {
        assert!(matches!(Manifest::decode(bad, "r"), Err(RegistryError::Corrupt(_))));
        let mut u: Update<u64> = Update::new("r", vec![add("m1")], "t");
        assert!(matches!(u.on_read(Some((bad, 1))), Err(RegistryError::Corrupt(_))), "no write is proposed");
    }
}

/// A versioned in-memory store, for driving `Update`s.
#[derive(Default)]
struct Mem {
    bytes: Option<Vec<u8>>,
    version: u64,
}

/// Runs several updates interleaved in the order `schedule` picks, the way concurrent writers
/// against S3 or the local store would, and returns the final manifest.
fn race(ops: Vec<Vec<Op>>, schedule: &[usize]) -> Manifest {
    let mut store = Mem::default();
    let mut ups: Vec<Update<u64>> = ops.into_iter().map(|o| Update::new("r", o, "t")).collect();
    let mut steps: Vec<Option<Step<u64>>> = ups.iter().map(|u| Some(u.start())).collect();
    let mut k = 0;
    let mut jitter = 1u64;
    while steps.iter().any(|s| !matches!(s, None | Some(Step::Done(_)))) {
        let live: Vec<usize> = (0..ups.len()).filter(|&i| !matches!(steps[i], None | Some(Step::Done(_)))).collect();
        let i = live[schedule.get(k).copied().unwrap_or(0) % live.len()];
        k += 1;
        jitter = jitter.wrapping_mul(6364136223846793005).wrapping_add(1);
        let next = match steps[i].take().unwrap() {
            Step::Read => {
                let stored = store.bytes.clone().map(|b| (b, store.version));
                ups[i].on_read(stored.as_ref().map(|(b, v)| (&b[..], *v))).unwrap()
            }
            Step::Write { bytes, expected } => {
                let current = store.bytes.as_ref().map(|_| store.version);
                let ok = current == expected;
                if ok {
                    store.bytes = Some(bytes);
                    store.version += 1;
                }
                ups[i].on_write(ok, jitter).unwrap()
            }
            Step::Backoff(_) => Step::Read,
            done @ Step::Done(_) => done,
        };
        steps[i] = Some(next);
    }
    store.bytes.map(|b| Manifest::decode(&b, "r").unwrap()).unwrap_or_else(|| Manifest::new("r"))
}

#[test]
fn sixteen_concurrent_publishers_lose_nothing() {
    let ops: Vec<Vec<Op>> = (0..16).map(|i| vec![add(&format!("model{i:02}"))]).collect();
    // Round-robin interleaving: every writer reads before anyone writes, the worst case.
    let schedule: Vec<usize> = (0..10_000).collect();
    let m = race(ops, &schedule);
    assert_eq!(m.models.len(), 16);
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let id = (0u8..6).prop_map(|i| format!("m{i}"));
    let name = (0u8..4).prop_map(|i| format!("n{i}"));
    prop_oneof![
        id.clone().prop_map(|i| add(&i)),
        (name.clone(), id.clone()).prop_map(|(alias, id)| Op::SetAlias { alias, id }),
        name.clone().prop_map(|alias| Op::RemoveAlias { alias }),
        (id.clone(), name.clone()).prop_map(|(id, tag)| Op::Tag { id, tag }),
        (id.clone(), name.clone()).prop_map(|(id, tag)| Op::Untag { id, tag }),
        id.clone().prop_map(|id| Op::RemoveModel { id }),
        (id.clone(), name).prop_map(|(id, worker)| Op::AddWorker { id, worker }),
    ]
}

proptest! {
    #[test]
    fn operations_keep_the_manifest_consistent(ops in proptest::collection::vec(op_strategy(), 0..60)) {
        let mut m = Manifest::new("r");
        for op in &ops {
            let before = m.clone();
            if apply(&mut m, op, "t").is_err() {
                prop_assert_eq!(&m, &before);
            }
            prop_assert!(m.check().is_ok());
            let round = Manifest::decode(&m.to_json(), "r").unwrap();
            prop_assert_eq!(&round, &m);
        }
    }

    #[test]
    fn concurrent_adds_all_land_whatever_the_interleaving(
        n in 2usize..10, schedule in proptest::collection::vec(any::<usize>(), 0..400)
    ) {
        let ops: Vec<Vec<Op>> = (0..n).map(|i| vec![add(&format!("w{i}")), Op::Tag { id: format!("w{i}"), tag: "t".into() }]).collect();
        let m = race(ops, &schedule);
        prop_assert_eq!(m.models.len(), n);
        prop_assert!(m.models.values().all(|e| e.tags == vec!["t".to_owned()]));
    }

    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Manifest::decode(&bytes, "r");
    }
}

/// Found by `fuzz/registry_manifest`: a model whose file name `check` refuses used to be
/// accepted by `apply`, and the written manifest then read as corrupt for everyone in the room.
#[test]
fn a_model_with_an_unsafe_file_name_is_refused_on_write() {
    let mut m = Manifest::new("r");
    for name in ["N`\u{1c}", "../x", "/abs", "a\0b", "a\u{2215}b"] {
        let mut e = model("a1b2c3d4e5f6");
        e.files = vec![ModelFile { name: name.into(), size: 1, blake3: "00".repeat(32) }];
        let before = m.clone();
        assert!(matches!(apply(&mut m, &Op::AddModel(Box::new(e)), "t"), Err(RegistryError::Invalid("file name", _))));
        assert_eq!(m, before);
    }
    assert!(Manifest::decode(&m.to_json(), "r").is_ok());
}
