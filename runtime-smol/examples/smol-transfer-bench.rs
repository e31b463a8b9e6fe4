//! Transfer benchmark on smol, the twin of sleap-rtc-tokio's (both include
//! driver/bench/transfer_bench.rs):
//!
//! ```text
//! cargo run --release -p sleap-rtc-smol --example smol-transfer-bench -- --size 1GiB
//! ```

#[path = "../../driver/bench/transfer_bench.rs"]
mod bench;

fn main() -> anyhow::Result<()> {
    let a = bench::init();
    if a.role.is_none() {
        return bench::run_parent(a);
    }
    // The TCP baseline's children need no runtime.
    if let Some(r) = bench::run_plain(&a) {
        return r;
    }
    // The measured side: smol::block_on plus smol's global executor (SMOL_THREADS, default 1),
    // which runs the connection's task; no tokio runtime exists in this process.
    smol::block_on(bench::child::<sleap_rtc_smol::Smol>(a))
}
