use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

fn entry(name: &str, data: &[u8]) -> FileEntry {
    FileEntry { name: name.into(), size: data.len() as u64, blake3: blake3::hash(data).to_hex().to_string() }
}

/// An in-memory receiving "disk": `.part` contents per file, and committed final files.
#[derive(Default)]
struct Disk {
    part: HashMap<u32, Vec<u8>>,
    done: HashMap<u32, Vec<u8>>,
}

/// Runs receiver actions against the in-memory disk; returns control messages for the sender and
/// whether the receiver finished.
fn run_actions(r: &mut Receiver, disk: &mut Disk, corrupt: Option<u32>) -> (Vec<TransferMsg>, Option<Vec<u32>>) {
    let mut msgs = Vec::new();
    let mut finished = None;
    while let Some(a) = r.poll_action() {
        match a {
            ReceiverAction::Send(m) => msgs.push(m),
            ReceiverAction::Verify { file } => {
                let mut data = disk.part.get(&file).cloned().unwrap_or_default();
                if corrupt == Some(file) && !data.is_empty() {
                    data[0] ^= 1;
                }
                r.verified(file, &blake3::hash(&data).to_hex());
            }
            ReceiverAction::Commit { file } => {
                let d = disk.part.remove(&file).unwrap_or_default();
                disk.done.insert(file, d);
                r.committed(file, Ok(()));
            }
            ReceiverAction::Discard { file } => {
                disk.part.remove(&file);
            }
            ReceiverAction::Finished { failed, .. } => finished = Some(failed),
        }
    }
    (msgs, finished)
}

/// Sends frames until `budget` frames went out (a cut) or the sender has nothing left.
fn pump(s: &mut Sender, r: &mut Receiver, disk: &mut Disk, files: &[Vec<u8>], budget: usize) -> usize {
    let mut n = 0;
    while n < budget {
        let Some(c) = s.next_chunk() else { break };
        let f = &files[c.file as usize];
        let mut frame = Vec::new();
        encode_frame(c.header(s.transfer_id()), &f[c.offset as usize..c.offset as usize + c.len], &mut frame);
        if let Some(w) = r.on_frame(&frame).unwrap() {
            let part = disk.part.entry(w.file).or_default();
            assert_eq!(part.len() as u64, w.offset, "writes are sequential");
            part.extend_from_slice(w.data);
            let end = w.offset + w.data.len() as u64;
            r.written(w.file, end);
        }
        n += 1;
    }
    n
}

#[test]
fn frame_round_trip_and_garbage() {
    let h = FrameHeader { transfer_id: 0xdead_beef, file: 7, offset: 1 << 40 };
    let mut buf = Vec::new();
    encode_frame(h, b"hello", &mut buf);
    assert_eq!(buf.len(), HEADER_LEN + 5);
    assert_eq!(decode_frame(&buf).unwrap(), (h, &b"hello"[..]));
    assert!(decode_frame(&buf[..10]).is_err());
    let mut bad = buf.clone();
    bad[0] = 9;
    assert!(decode_frame(&bad).is_err());
    let mut bad = buf.clone();
    bad[2] = 1;
    assert!(decode_frame(&bad).is_err());
}

#[test]
fn unsafe_names_are_refused() {
    for n in [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a//b",
        "./a",
        "a/.",
        "nul\0byte",
        "tab\there",
        "CON",
        "con.txt",
        "dir/LPT1.log",
        "c:evil",
        "a\\b",
        "evil\u{2215}slash",
        "rtl\u{202E}gpj.exe",
        "trailing.",
        "space ",
        &"x".repeat(256),
        &"a/".repeat(600),
    ] {
        assert!(validate_name(n).is_err(), "{n:?} accepted");
    }
    for n in ["labels.pkg.slp", "models/run1/best.ckpt", "données/vidéo 1.mp4", ".hidden", "a.b.c", "console.log"] {
        validate_name(n).unwrap_or_else(|e| panic!("{n:?} refused: {e}"));
    }
}

#[test]
fn manifests_over_limits_or_ambiguous_are_refused() {
    let m = |files: Vec<FileEntry>| Manifest { files };
    let l = Limits { max_files: 2, max_file_size: 10, max_total_size: 15 };
    let e = |n: &str, s: u64| FileEntry { name: n.into(), size: s, blake3: "0".repeat(64) };
    assert!(validate_manifest(&m(vec![e("a", 10), e("b", 5)]), &l).is_ok());
    assert!(matches!(validate_manifest(&m(vec![e("a", 11)]), &l), Err(TransferError::TooLarge(_))));
    assert!(matches!(validate_manifest(&m(vec![e("a", 10), e("b", 6)]), &l), Err(TransferError::TooLarge(_))));
    assert!(matches!(validate_manifest(&m(vec![e("a", 1); 3]), &l), Err(TransferError::TooManyFiles(3, 2))));
    assert!(matches!(validate_manifest(&m(vec![e("a", 1), e("A", 1)]), &l), Err(TransferError::DuplicateName(_))));
    assert!(matches!(validate_manifest(&m(vec![e("a", 1), e("a/b", 1)]), &l), Err(TransferError::DuplicateName(_))));
    let bad_hash = FileEntry { name: "x".into(), size: 1, blake3: "zz".into() };
    assert!(matches!(validate_manifest(&m(vec![bad_hash]), &l), Err(TransferError::BadManifest(_))));
}

#[test]
fn receiver_refuses_frames_that_do_not_fit() {
    let data = vec![1u8; 100];
    let m = Manifest { files: vec![entry("a", &data)] };
    let mut r = Receiver::new(5, m, &[]);
    let frame = |id: u32, file: u32, off: u64, len: usize| {
        let mut b = Vec::new();
        encode_frame(FrameHeader { transfer_id: id, file, offset: off }, &vec![0u8; len], &mut b);
        b
    };
    assert!(matches!(r.on_frame(&frame(6, 0, 0, 1)), Err(TransferError::WrongTransfer { .. })));
    assert!(matches!(r.on_frame(&frame(5, 1, 0, 1)), Err(TransferError::OutOfOrder { .. })));
    assert!(matches!(r.on_frame(&frame(5, 0, 10, 1)), Err(TransferError::OutOfOrder { .. })));
    assert!(matches!(r.on_frame(&frame(5, 0, 90, 20)), Err(TransferError::OutOfOrder { .. })));
    assert!(matches!(r.on_frame(&frame(5, 0, u64::MAX, 1)), Err(TransferError::BadFrame(_))));
    assert_eq!(r.on_frame(&frame(5, 0, 0, 10)).unwrap().unwrap().data.len(), 10);
    // A retransmission of bytes already held is ignored; an overlap yields only the new part.
    assert_eq!(r.on_frame(&frame(5, 0, 0, 10)).unwrap(), None);
    let overlap = frame(5, 0, 5, 10);
    let w = r.on_frame(&overlap).unwrap().unwrap();
    assert_eq!((w.offset, w.data.len()), (10, 5));
}

#[test]
fn hash_mismatch_fails_that_file_and_keeps_the_rest() {
    let files = vec![vec![1u8; 5000], vec![2u8; 3000], vec![]];
    let m = Manifest { files: vec![entry("a", &files[0]), entry("b/c", &files[1]), entry("empty", &files[2])] };
    let mut s = Sender::new(m.derived_id(), m.clone(), 1000);
    let mut disk = Disk::default();
    let mut r = Receiver::new(s.transfer_id(), m, &[]);
    let (msgs, _) = run_actions(&mut r, &mut disk, Some(1));
    for msg in &msgs {
        s.on_message(msg).unwrap();
    }
    pump(&mut s, &mut r, &mut disk, &files, usize::MAX);
    let (msgs, finished) = run_actions(&mut r, &mut disk, Some(1));
    assert_eq!(finished, Some(vec![1]));
    let mut complete = None;
    for msg in &msgs {
        if let Some(SenderEvent::Complete { failed }) = s.on_message(msg).unwrap() {
            complete = Some(failed);
        }
    }
    assert_eq!(complete, Some(vec![1]));
    assert_eq!(disk.done.get(&0), Some(&files[0]));
    assert_eq!(disk.done.get(&2), Some(&files[2]));
    assert!(!disk.done.contains_key(&1) && !disk.part.contains_key(&1));
}

#[test]
fn cancel_from_either_side_discards_incomplete_files() {
    let files = vec![vec![3u8; 10_000]];
    let m = Manifest { files: vec![entry("a", &files[0])] };
    let mut s = Sender::new(1, m.clone(), 1000);
    let mut r = Receiver::new(1, m, &[]);
    let mut disk = Disk::default();
    let (msgs, _) = run_actions(&mut r, &mut disk, None);
    s.on_message(&msgs[0]).unwrap();
    pump(&mut s, &mut r, &mut disk, &files, 3);
    r.on_cancel("test");
    let (_, finished) = run_actions(&mut r, &mut disk, None);
    assert_eq!(finished, Some(vec![0]));
    assert!(disk.part.is_empty());
    let mut r2 = Receiver::new(1, Manifest { files: vec![entry("a", &files[0])] }, &[]);
    r2.cancel("user pressed Ctrl-C");
    let (msgs, _) = run_actions(&mut r2, &mut Disk::default(), None);
    let cancel = msgs.iter().find(|m| matches!(m, TransferMsg::TransferCancel { .. })).unwrap();
    assert!(matches!(s.on_message(cancel), Err(TransferError::Cancelled(_))));
    assert!(s.is_over());
}

#[test]
fn control_messages_round_trip_as_json() {
    let m = TransferMsg::TransferAccept { transfer_id: 3, committed: vec![0, 5] };
    let j = m.to_json();
    assert!(j.contains(r#""type":"transfer_accept""#));
    assert_eq!(TransferMsg::from_json(&j).unwrap(), m);
    assert!(TransferMsg::from_json(r#"{"type":"transfer_accept","transfer_id":-1}"#).is_err());
    assert!(TransferMsg::from_json("[").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random files, chunk sizes and cut points: after any number of cuts and resumes (a new
    /// sender and receiver each time, the receiver seeing only its `.part` files), every file
    /// arrives identical and verified.
    #[test]
    fn cut_and_resume_delivers_identical_files(
        sizes in proptest::collection::vec(0usize..20_000, 1..5),
        chunk in 1usize..5000,
        cuts in proptest::collection::vec(0usize..30, 0..4),
        seed in any::<u8>(),
    ) {
        let files: Vec<Vec<u8>> = sizes.iter().enumerate()
            .map(|(i, n)| (0..*n).map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8 ^ seed)).collect())
            .collect();
        let manifest = Manifest {
            files: files.iter().enumerate().map(|(i, d)| entry(&format!("dir/f{i}.bin"), d)).collect(),
        };
        validate_manifest(&manifest, &Limits::default()).unwrap();
        let id = manifest.derived_id();
        let mut disk = Disk::default();
        let mut budgets: Vec<usize> = cuts.clone();
        budgets.push(usize::MAX);
        let mut result = None;
        for budget in budgets {
            // New connection: the receiver reports what its .part files hold.
            let existing: Vec<u64> = (0..files.len() as u32)
                .map(|i| disk.part.get(&i).map_or(0, |p| p.len() as u64))
                .collect();
            let mut s = Sender::new(id, manifest.clone(), chunk);
            let mut r = Receiver::new(id, manifest.clone(), &existing);
            let (msgs, mut fin) = run_actions(&mut r, &mut disk, None);
            for m in &msgs { s.on_message(m).unwrap(); }
            pump(&mut s, &mut r, &mut disk, &files, budget);
            let (msgs, f2) = run_actions(&mut r, &mut disk, None);
            fin = fin.or(f2);
            for m in &msgs { let _ = s.on_message(m).unwrap(); }
            if let Some(f) = fin {
                prop_assert!(s.is_over());
                result = Some(f);
                break;
            }
        }
        prop_assert_eq!(result, Some(vec![]));
        for (i, f) in files.iter().enumerate() {
            prop_assert_eq!(disk.done.get(&(i as u32)), Some(f));
        }
    }

    /// Arbitrary bytes never panic the frame decoder or the receiver.
    #[test]
    fn receiver_survives_garbage(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..50)) {
        let m = Manifest { files: vec![entry("a", &[0u8; 40])] };
        let mut r = Receiver::new(0, m, &[]);
        for f in frames {
            if let Ok(Some(w)) = r.on_frame(&f) {
                let end = w.offset + w.data.len() as u64;
                r.written(w.file, end);
            }
        }
        while r.poll_action().is_some() {}
    }
}

#[test]
fn a_failed_file_keeps_the_rest_and_cancel_is_reported_as_cancel() {
    let files = vec![vec![1u8; 3000], vec![2u8; 3000]];
    let m = Manifest { files: vec![entry("a", &files[0]), entry("b", &files[1])] };
    let mut s = Sender::new(9, m.clone(), 1000);
    let mut r = Receiver::new(9, m.clone(), &[]);
    let mut disk = Disk::default();
    let (msgs, _) = run_actions(&mut r, &mut disk, None);
    s.on_message(&msgs[0]).unwrap();
    // The runtime could not write file 0: it fails, its remaining frames are dropped quietly.
    r.file_failed(0, "disk full");
    pump(&mut s, &mut r, &mut disk, &files, usize::MAX);
    let (_, finished) = run_actions(&mut r, &mut disk, None);
    assert_eq!(finished, Some(vec![0]));
    assert_eq!(disk.done.get(&1), Some(&files[1]));

    let mut r = Receiver::new(9, m, &[]);
    r.on_cancel("user stopped it");
    let mut cancelled = None;
    while let Some(a) = r.poll_action() {
        if let ReceiverAction::Finished { cancelled: c, .. } = a {
            cancelled = c;
        }
    }
    assert!(cancelled.unwrap().contains("user stopped it"));
}

#[test]
fn part_suffix_is_reserved() {
    let e = |n: &str| FileEntry { name: n.into(), size: 1, blake3: "0".repeat(64) };
    let m = Manifest { files: vec![e("x"), e("x.part")] };
    assert!(matches!(validate_manifest(&m, &Limits::default()), Err(TransferError::UnsafeName { .. })));
}
