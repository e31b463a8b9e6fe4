//! Test data shared by the conformance suite and the runtime crates' own tests.

use std::path::Path;

/// Writes `len` pseudo-random (incompressible) bytes.
pub fn write_random(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, data).expect("write a test file");
}
