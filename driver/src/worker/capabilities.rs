//! What the worker tells the room about its machine: GPU, sleap-nn, free disk.

use super::*;

/// What the worker tells the room about itself (`metadata.properties`, upstream's keys).
#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    pub gpu_model: String,
    pub gpu_memory_mb: u64,
    pub sleap_nn_version: Option<String>,
    pub free_disk_mb: u64,
    pub hostname: String,
}

/// GPU from `nvidia-smi` when present, else "CPU"; sleap-nn's version; free disk in `dir`.
pub async fn probe_capabilities<R: Runtime>(sleap_nn: &Path, dir: &Path) -> Capabilities {
    let gpu = async {
        let mut cmd = std::process::Command::new("nvidia-smi");
        cmd.args(["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]);
        let (_, stdout) = crate::output::<R>(cmd, Duration::from_secs(5)).await?;
        let text = String::from_utf8_lossy(&stdout).into_owned();
        let first = text.lines().next()?.to_owned();
        let (name, mem) = first.rsplit_once(',')?;
        Some((name.trim().to_owned(), mem.trim().parse::<u64>().ok()?))
    };
    let (gpu, version) = tokio::join!(gpu, trainer::sleap_nn_version::<R>(sleap_nn));
    let (gpu_model, gpu_memory_mb) = gpu.unwrap_or_else(|| ("CPU".into(), 0));
    Capabilities {
        gpu_model,
        gpu_memory_mb,
        sleap_nn_version: version,
        free_disk_mb: free_disk_mb(dir),
        hostname: hostname(),
    }
}

pub(super) fn free_disk_mb(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return 0 };
    // SAFETY: statvfs writes into a zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return 0;
        }
        (s.f_bavail as u64).saturating_mul(s.f_frsize as u64) >> 20
    }
}

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "host".into())
}
