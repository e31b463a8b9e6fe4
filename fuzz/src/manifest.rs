//! Registry manifest.

use super::*;

#[derive(Arbitrary, Debug)]
enum RegOp {
    Add { id: u8, alias: Option<u8>, worker: u8, tag: u8, file: Option<String> },
    SetAlias { alias: String, id: u8 },
    RemoveAlias(String),
    Tag { id: u8, tag: String },
    Untag { id: u8, tag: String },
    Notes { id: u8, notes: String },
    Remove(u8),
    AddWorker { id: u8, worker: String },
    RemoveWorker { id: u8, worker: String },
    Resolve(String),
}

const MODEL_IDS: [&str; 4] = ["a1b2c3d4e5f6", "a1b2c3d4ffff", "0011223344", "../etc"];

/// A `manifest.json` read from a shared store (anyone with write access to the bucket could have
/// written it), then the registry operations applied to it.
pub fn registry_manifest(data: &[u8]) {
    // Layout: u16 big-endian length, that many bytes of manifest, then the operations (so a real
    // manifest.json can be a seed).
    let (bytes, ops) = match data {
        [a, b, rest @ ..] => rest.split_at((u16::from_be_bytes([*a, *b]) as usize).min(rest.len())),
        _ => (data, &[][..]),
    };
    let mut u = Unstructured::new(ops);
    let mut m = match registry::Manifest::decode(bytes, "room-a") {
        Ok(m) => {
            let again = registry::Manifest::decode(&m.to_json(), "room-a").expect("a decoded manifest re-encodes");
            assert_eq!(again, m, "manifest does not round-trip");
            m
        }
        Err(_) => registry::Manifest::new("room-a"),
    };
    for _ in 0..32 {
        let Ok(op) = u.arbitrary::<RegOp>() else { break };
        let id = |i: u8| pick(&MODEL_IDS, i).to_owned();
        let op = match op {
            RegOp::Add { id: i, alias, worker, tag, file } => {
                let entry = registry::ModelEntry {
                    id: id(i),
                    alias: alias.map(|a| format!("alias{}", a % 3)),
                    available_on_workers: vec![format!("w{}", worker % 3)],
                    tags: vec![format!("t{}", tag % 3)],
                    files: file
                        .map(|name| vec![registry::ModelFile { name, size: 1, blake3: "00".repeat(32) }])
                        .unwrap_or_default(),
                    ..Default::default()
                };
                registry::Op::AddModel(Box::new(entry))
            }
            RegOp::SetAlias { alias, id: i } => registry::Op::SetAlias { alias, id: id(i) },
            RegOp::RemoveAlias(alias) => registry::Op::RemoveAlias { alias },
            RegOp::Tag { id: i, tag } => registry::Op::Tag { id: id(i), tag },
            RegOp::Untag { id: i, tag } => registry::Op::Untag { id: id(i), tag },
            RegOp::Notes { id: i, notes } => registry::Op::SetNotes { id: id(i), notes },
            RegOp::Remove(i) => registry::Op::RemoveModel { id: id(i) },
            RegOp::AddWorker { id: i, worker } => registry::Op::AddWorker { id: id(i), worker },
            RegOp::RemoveWorker { id: i, worker } => registry::Op::RemoveWorker { id: id(i), worker },
            RegOp::Resolve(q) => {
                if let Ok(e) = m.resolve(&q) {
                    assert!(m.models.contains_key(&e.id));
                }
                continue;
            }
        };
        let before = m.clone();
        match registry::apply(&mut m, &op, "2026-11-22T00:00:00Z") {
            Err(_) => assert_eq!(m, before, "a failed operation changed the manifest"),
            Ok(_) => {
                if let Err(e) = m.check() {
                    panic!("operation {op:?} left an invalid manifest: {e}");
                }
                registry::Manifest::decode(&m.to_json(), "room-a").expect("what we write we can read");
                for e in m.models.values() {
                    assert_confined(&e.id);
                    for f in &e.files {
                        assert_confined(&f.name);
                    }
                }
            }
        }
    }
}
