//! Transfer frames and manifests.

use super::*;

/// A bulk frame, a control message and a file name, all from the remote peer.
pub fn transfer_decode(data: &[u8]) {
    if let Ok((h, payload)) = transfer::decode_frame(data) {
        let mut out = Vec::new();
        transfer::encode_frame(h, payload, &mut out);
        assert_eq!(out, data, "frame does not round-trip");
    }
    let text = String::from_utf8_lossy(data);
    if transfer::validate_name(&text).is_ok() {
        assert_confined(&text);
    }
    if let Ok(msg) = TransferMsg::from_json(&text) {
        let back = TransferMsg::from_json(&msg.to_json()).expect("a decoded transfer message re-encodes decodably");
        assert_eq!(back.to_json(), msg.to_json());
        if let TransferMsg::TransferOffer { manifest, .. } = &msg {
            let _ = manifest.derived_id();
            let _ = manifest.total_size();
            if transfer::validate_manifest(manifest, &transfer::Limits::default()).is_ok() {
                for f in &manifest.files {
                    assert_confined(&f.name);
                    assert!(!f.name.ends_with(".part"));
                }
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
enum RecvOp {
    /// A frame of the real content (`corrupt` flips a byte).
    Frame {
        file: u8,
        offset: u16,
        len: u16,
        corrupt: bool,
        write_now: bool,
    },
    Raw(Vec<u8>),
    Written(u8),
    /// The runtime could not write or hash the file.
    IoError(u8),
    Cancel,
    SenderCancel,
}

/// The receiving state machine against a model of the file system: arbitrary (also wrong,
/// overlapping, out-of-order and foreign) frames, partial writes, I/O failures and cancels.
pub fn transfer_receiver(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(n) = u.int_in_range(1..=3usize) else { return };
    let mut contents = Vec::new();
    let mut files = Vec::new();
    for i in 0..n {
        let size = u.int_in_range(0..=3000usize).unwrap_or(0);
        let seed = u.arbitrary::<u8>().unwrap_or(0);
        let body: Vec<u8> = (0..size).map(|j| (j as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        files.push(FileEntry {
            name: format!("f{i}.bin"),
            size: size as u64,
            blake3: blake3::hash(&body).to_hex().to_string(),
        });
        contents.push(body);
    }
    let manifest = Manifest { files };
    transfer::validate_manifest(&manifest, &transfer::Limits::default()).expect("harness manifest is valid");
    let existing: Vec<u64> = (0..n).map(|_| u.int_in_range(0..=3100u64).unwrap_or(0)).collect();
    let id = manifest.derived_id();
    let mut rx = Receiver::new(id, manifest.clone(), &existing);
    // What each `.part` holds; a resumed `.part` holds the real prefix.
    let mut parts: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let have = existing[i] as usize;
            if have <= contents[i].len() { contents[i][..have].to_vec() } else { Vec::new() }
        })
        .collect();
    let mut written: Vec<u64> = parts.iter().map(|p| p.len() as u64).collect();
    let mut committed = HashSet::new();
    let mut finished = false;
    let mut fail_commit = false;

    let drain = |rx: &mut Receiver,
                 parts: &mut Vec<Vec<u8>>,
                 written: &mut Vec<u64>,
                 committed: &mut HashSet<u32>,
                 finished: &mut bool,
                 fail_commit: bool| {
        while let Some(a) = rx.poll_action() {
            match a {
                ReceiverAction::Send(msg) => {
                    TransferMsg::from_json(&msg.to_json()).expect("receiver messages decode");
                    match msg {
                        TransferMsg::TransferFileResult { file, ok: true, .. } => {
                            assert!(committed.contains(&file), "ok reported for uncommitted file {file}")
                        }
                        TransferMsg::TransferComplete { ok, .. } => {
                            assert_eq!(ok as usize, committed.len(), "complete miscounts")
                        }
                        TransferMsg::TransferAck { file, offset, .. } => {
                            assert!(offset <= written[file as usize], "ack beyond written bytes")
                        }
                        _ => {}
                    }
                }
                ReceiverAction::Verify { file } => {
                    assert!(!*finished, "verify after finish");
                    let i = file as usize;
                    assert_eq!(parts[i].len(), contents[i].len(), "verify before the file is whole");
                    rx.verified(file, &blake3::hash(&parts[i]).to_hex());
                }
                ReceiverAction::Commit { file } => {
                    assert!(!*finished, "commit after finish");
                    let i = file as usize;
                    assert_eq!(parts[i], contents[i], "commit of bytes that are not the sender's file");
                    if fail_commit {
                        rx.committed(file, Err("disk full".into()));
                    } else {
                        committed.insert(file);
                        rx.committed(file, Ok(()));
                    }
                }
                ReceiverAction::Discard { file } => {
                    assert!(!committed.contains(&file), "discard of a committed file");
                    parts[file as usize].clear();
                    written[file as usize] = 0;
                }
                ReceiverAction::Finished { ok, failed, .. } => {
                    assert!(!*finished, "finished twice");
                    *finished = true;
                    assert_eq!(ok as usize + failed.len(), contents.len());
                    assert_eq!(ok as usize, committed.len());
                }
            }
        }
    };

    drain(&mut rx, &mut parts, &mut written, &mut committed, &mut finished, fail_commit);
    for _ in 0..128 {
        let Ok(op) = u.arbitrary::<RecvOp>() else { break };
        fail_commit = u.ratio(1, 8).unwrap_or(false);
        let mut frame = Vec::new();
        let (bytes, write_now) = match op {
            RecvOp::Frame { file, offset, len, corrupt, write_now } => {
                let i = file as usize % (n + 1);
                let body = contents.get(i).map(Vec::as_slice).unwrap_or(&[]);
                let start = (offset as usize).min(body.len() + 2);
                let end = (start + len as usize % 2048).min(body.len().max(start));
                let mut payload = body.get(start..end).map(<[u8]>::to_vec).unwrap_or_else(|| vec![0; 3]);
                if corrupt && !payload.is_empty() {
                    payload[0] ^= 0xff;
                }
                let h = transfer::FrameHeader { transfer_id: id, file: i as u32, offset: start as u64 };
                transfer::encode_frame(h, &payload, &mut frame);
                (true, write_now)
            }
            RecvOp::Raw(b) => {
                frame = b;
                (true, true)
            }
            RecvOp::Written(f) => {
                let i = f as usize % n;
                rx.written(i as u32, parts[i].len() as u64);
                written[i] = written[i].max(parts[i].len() as u64);
                (false, false)
            }
            RecvOp::IoError(f) => {
                rx.file_failed(f as u32 % n as u32, "I/O error");
                (false, false)
            }
            RecvOp::Cancel => {
                rx.cancel("user");
                (false, false)
            }
            RecvOp::SenderCancel => {
                rx.on_cancel("sender");
                (false, false)
            }
        };
        if bytes {
            match rx.on_frame(&frame) {
                Ok(Some(w)) => {
                    let i = w.file as usize;
                    assert!(!finished, "write accepted after the transfer ended");
                    assert_eq!(w.offset, parts[i].len() as u64, "write is not contiguous");
                    assert!(w.offset + w.data.len() as u64 <= contents[i].len() as u64, "write beyond the file size");
                    parts[i].extend_from_slice(w.data);
                    if write_now {
                        written[i] = parts[i].len() as u64;
                        rx.written(w.file, parts[i].len() as u64);
                    }
                }
                Ok(None) => {}
                // The runtime cancels on any frame error.
                Err(e) => rx.cancel(&e.to_string()),
            }
        }
        drain(&mut rx, &mut parts, &mut written, &mut committed, &mut finished, fail_commit);
        if finished {
            assert!(rx.is_over());
        }
    }
}
