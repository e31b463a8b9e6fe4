use clap::Parser;
use sleap_rtc_server::{Config, Server};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    // `sleap-rtc-server --health-check [URL]`: the probe of a container image without curl
    // (deploy/docker/server.Dockerfile's HEALTHCHECK). Handled before the server's flags so it
    // needs none of them.
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == "--health-check") {
        let url = match args.next() {
            Some(u) => u.to_string_lossy().into_owned(),
            None => health::default_url(std::env::var("SLEAP_RTC_LISTEN").ok().as_deref()),
        };
        return match health::probe(&url, std::time::Duration::from_secs(5)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("unhealthy: {url}: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("SLEAP_RTC_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal; a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        raise_fd_limit();
        let server = match Server::start(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        };
        for a in server.local_addrs() {
            // One machine-readable line per listener so scripts and tests can find the port.
            println!("listening on {a}");
        }
        wait_for_signal().await;
        tracing::info!("shutting down: draining connections");
        server.shutdown().await;
        tracing::info!("stopped");
        std::process::ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Each WebSocket is a file descriptor; the common soft limit of 1024 would cap the server far
/// below its connection limit, so raise it to the hard limit.
fn raise_fd_limit() {
    #[cfg(unix)]
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
}

/// The health probe of a container image without curl: `GET /health` over plain `http://` (it
/// targets the server on loopback inside its own container), healthy exactly on 200.
mod health {
    use std::net::SocketAddr;
    use std::time::Duration;

    /// `/health` on the first `SLEAP_RTC_LISTEN` address, with an unspecified address (`0.0.0.0`,
    /// `[::]`) replaced by loopback; `127.0.0.1:8080` (the server's default) without one.
    pub fn default_url(listen: Option<&str>) -> String {
        let first = listen.and_then(|l| l.split(',').next()).and_then(|a| a.trim().parse::<SocketAddr>().ok());
        let mut addr = first.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("http://{addr}/health")
    }

    pub fn probe(url: &str, timeout: Duration) -> Result<(), String> {
        let rest = url.strip_prefix("http://").ok_or("only http:// URLs can be probed")?;
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() || authority.contains('@') {
            return Err("the URL needs a host[:port] and no user info".into());
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(async {
            let client = reqwest::Client::builder().timeout(timeout).build().map_err(|e| e.to_string())?;
            let resp = client.get(url).send().await.map_err(|e| {
                // The innermost cause says what happened (refused, reset, a parse error).
                let mut cause: &dyn std::error::Error = &e;
                while let Some(inner) = cause.source() {
                    cause = inner;
                }
                if e.is_connect() { format!("connect: {cause}") } else { format!("not an HTTP answer: {cause}") }
            })?;
            match resp.status().as_u16() {
                200 => Ok(()),
                code => Err(format!("answered {code}")),
            }
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::io::{Read, Write};
        use std::net::TcpListener;

        /// A one-shot server that answers `response` to the first request and returns what it read.
        fn answer(response: &'static str) -> (String, std::thread::JoinHandle<String>) {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}/health", l.local_addr().unwrap());
            let t = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 256];
                while !req.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                s.write_all(response.as_bytes()).unwrap();
                String::from_utf8(req).unwrap()
            });
            (url, t)
        }

        #[test]
        fn healthy_only_on_200() {
            let (url, t) = answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}");
            assert_eq!(probe(&url, Duration::from_secs(5)), Ok(()));
            let req = t.join().unwrap();
            assert!(req.starts_with("GET /health HTTP/1.1\r\n"), "{req}");
            assert!(req.to_ascii_lowercase().contains("\r\nhost: 127.0.0.1:"), "{req}");

            let (url, t) = answer("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n");
            assert_eq!(probe(&url, Duration::from_secs(5)), Err("answered 503".into()));
            t.join().unwrap();

            let (url, t) = answer("SSH-2.0-OpenSSH\r\n");
            assert!(probe(&url, Duration::from_secs(5)).unwrap_err().starts_with("not an HTTP answer"));
            t.join().unwrap();
        }

        #[test]
        fn unreachable_and_bad_urls_fail() {
            // A port that was just free: nothing listens there.
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let e = probe(&format!("http://127.0.0.1:{port}/health"), Duration::from_secs(5)).unwrap_err();
            assert!(e.starts_with("connect"), "{e}");
            assert!(probe("https://127.0.0.1/health", Duration::from_secs(1)).is_err());
            assert!(probe("http:///health", Duration::from_secs(1)).is_err());
            assert!(probe("http://u@127.0.0.1/health", Duration::from_secs(1)).is_err());
        }

        #[test]
        fn default_url_follows_listen() {
            assert_eq!(default_url(None), "http://127.0.0.1:8080/health");
            assert_eq!(default_url(Some("0.0.0.0:9000,[::]:9000")), "http://127.0.0.1:9000/health");
            assert_eq!(default_url(Some("[::]:8081")), "http://[::1]:8081/health");
            assert_eq!(default_url(Some("10.0.0.5:8080")), "http://10.0.0.5:8080/health");
            assert_eq!(default_url(Some("garbage")), "http://127.0.0.1:8080/health");
        }
    }
}
