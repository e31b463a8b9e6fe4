//! Transfer benchmark on tokio (the benchmark itself is driver/bench/transfer_bench.rs, shared
//! with sleap-rtc-smol's twin):
//!
//! ```text
//! cargo run --release -p sleap-rtc-tokio --example transfer-bench -- --size 1GiB
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
    // The measured side: a 2-thread tokio runtime, as the benchmark always used.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(bench::child::<sleap_rtc_tokio::Tokio>(a))
}
