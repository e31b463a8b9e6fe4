//! A real coturn (Debian's `turnserver`) for the TURN tests, in the TURN REST mode the signaling
//! server's credentials are made for (`use-auth-secret`). Started on a free port of the given
//! addresses, stopped (and its log kept in the temp dir) on drop.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Coturn {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

/// The `turnserver` to run: `$SLEAP_RTC_TEST_TURNSERVER`, else the one on PATH.
pub fn turnserver() -> String {
    if let Ok(p) = std::env::var("SLEAP_RTC_TEST_TURNSERVER") {
        return p;
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("turnserver"))
        .find(|p| p.is_file());
    match found {
        Some(p) => p.display().to_string(),
        None => panic!("coturn's `turnserver` is not installed (scripts/test.sh installs the Debian package `coturn`)"),
    }
}

impl Coturn {
    /// Listens on `listen` (the first one is also the relay address), with `secret`, writing its
    /// log under `dir`. `loopback_peers`: allow relaying to 127.x (tests on one machine).
    pub fn start(listen: &[IpAddr], secret: &str, dir: &Path, loopback_peers: bool) -> Coturn {
        // A free port: the OS picks one for UDP on the first address, then coturn takes it.
        let port = UdpSocket::bind(SocketAddr::new(listen[0], 0)).unwrap().local_addr().unwrap().port();
        let log = dir.join(format!("coturn-{port}.log"));
        let mut cmd = Command::new(turnserver());
        cmd.args(["-n", "-v", "--no-cli", "--no-tls", "--no-dtls", "--fingerprint", "--simple-log", "--no-stdout-log"])
            .args(["--realm", "sleap-rtc.test", "--use-auth-secret", "--static-auth-secret", secret])
            .args(["--listening-port", &port.to_string(), "--relay-ip", &listen[0].to_string()])
            .args(["--min-port", "49152", "--max-port", "65535", "--log-file", &log.display().to_string()])
            .args(["--pidfile", &dir.join(format!("coturn-{port}.pid")).display().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for ip in listen {
            cmd.args(["--listening-ip", &ip.to_string()]);
        }
        if loopback_peers {
            cmd.arg("--allow-loopback-peers");
        }
        let child = cmd.spawn().expect("start turnserver");
        let c = Coturn { child, port, log };
        c.wait_ready(SocketAddr::new(listen[0], port));
        c
    }

    /// Until the server answers a STUN Binding request (coturn is also a STUN server).
    fn wait_ready(&self, addr: SocketAddr) {
        let sock = UdpSocket::bind(SocketAddr::new(addr.ip(), 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            let req = sleap_rtc_core::stun::binding_request();
            let _ = sock.send_to(&req.bytes, addr);
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                if sleap_rtc_core::stun::mapped_address(&buf[..n], req.id).is_some() {
                    return;
                }
            }
        }
        panic!("turnserver did not answer on {addr}; its log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
