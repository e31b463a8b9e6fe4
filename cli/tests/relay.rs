//! A training job over a path where only a TURN relay connects the peers: the worker and the
//! client run in two network namespaces of their own, each joined to this one by a veth pair
//! that does not forward, so each can reach the signaling server and coturn here but never the
//! other. The job must still run, over coturn, and the client must say it was relayed.
//!
//! Needs root (namespaces, veth); without it the test says so and does nothing. The same relay
//! path without namespaces is runtime-tokio/tests/turn.rs, which runs everywhere.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command as StdCommand;
use std::time::Duration;

use common::*;

#[path = "../../driver/conformance/coturn.rs"]
mod coturn;

/// Two namespaces, `a` and `b`, each with one veth to this namespace (10.N.1.0/24 and
/// 10.N.2.0/24; this side is .1, theirs .2). Deleted on drop.
struct Isolated {
    ns: [String; 2],
    host_ips: [Ipv4Addr; 2],
}

fn ip(args: &[&str]) {
    let st = StdCommand::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {}", args.join(" "));
}

impl Isolated {
    fn create() -> Option<Isolated> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let root = status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
        if !root {
            eprintln!(
                "SKIPPED: network namespaces need root; runtime-tokio/tests/turn.rs covers the relay on loopback"
            );
            return None;
        }
        let id = std::process::id();
        let octet = 100 + (id % 100) as u8;
        let ns = [format!("srta{id}"), format!("srtb{id}")];
        let host_ips = [Ipv4Addr::new(10, octet, 1, 1), Ipv4Addr::new(10, octet, 2, 1)];
        let me = Isolated { ns: ns.clone(), host_ips };
        for (i, n) in ns.iter().enumerate() {
            let (here, there) = (format!("srh{i}{id}"), format!("srp{i}{id}"));
            let _ = StdCommand::new("ip").args(["netns", "del", n]).stderr(std::process::Stdio::null()).status();
            ip(&["netns", "add", n]);
            ip(&["link", "add", &here, "type", "veth", "peer", "name", &there]);
            ip(&["link", "set", &there, "netns", n]);
            ip(&["addr", "add", &format!("{}/24", host_ips[i]), "dev", &here]);
            ip(&["link", "set", &here, "up"]);
            // Nothing that arrives on this veth is forwarded: the namespaces reach this host's
            // addresses only, never each other, whatever the host's own ip_forward says.
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{here}/forwarding"), "0").expect("no forwarding");
            let peer_ip = Ipv4Addr::new(10, octet, i as u8 + 1, 2);
            ip(&["-n", n, "addr", "add", &format!("{peer_ip}/24"), "dev", &there]);
            ip(&["-n", n, "link", "set", &there, "up"]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
            ip(&["-n", n, "route", "add", "default", "via", &host_ips[i].to_string()]);
        }
        Some(me)
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end, and with it ours.
        for n in &self.ns {
            let _ = StdCommand::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_over_a_turn_relay_when_the_peers_cannot_reach_each_other() {
    let Some(net) = Isolated::create() else { return };
    let [ha, hb] = net.host_ips.map(IpAddr::V4);
    let scratch = tempfile::tempdir().unwrap();
    let turn = coturn::Coturn::start(&[ha, hb], "relay-secret", scratch.path(), false);
    let turn_port = turn.port;
    let env = env_with(|c, dir| {
        c.listen.push((ha, 0).into());
        c.listen.push((hb, 0).into());
        let f = dir.join("turn-secret");
        std::fs::write(&f, "relay-secret").unwrap();
        c.turn_urls = vec![format!("turn:{ha}:{turn_port}")];
        c.turn_secret_file = Some(f);
    })
    .await;
    let addrs = env.server.as_ref().unwrap().local_addrs();
    let url_in = |host: IpAddr| format!("http://{}", addrs.iter().find(|a| a.ip() == host).unwrap());

    // The worker, in namespace a.
    let wd = env.path("w");
    let log = std::fs::File::create(env.path("w.log")).unwrap();
    let (wd_s, fake) = (wd.display().to_string(), env.fake.display().to_string());
    let args = ["worker", "--token", &env.token, "--work-dir", &wd_s, "--sleap-nn", &fake, "--cancel-grace", "2"];
    let mut w = env.cmd_in(&net.ns[0], &args);
    w.env("SLEAP_RTC_SERVER", url_in(ha)).env("RUST_LOG", "info").stdout(std::process::Stdio::null()).stderr(log);
    let _worker = w.spawn().unwrap();
    let mut registered = false;
    for _ in 0..400 {
        let id = env.worker_id(&wd);
        if !id.is_empty() && env.worker_ids().await.contains(&id) {
            registered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(registered, "worker did not register:\n{}", std::fs::read_to_string(env.path("w.log")).unwrap_or_default());

    // The client, in namespace b, trains with the bundled labels.
    let cfg = env.config("cfg.yaml", "");
    let labels = asset("labels.pkg.slp").display().to_string();
    let out = env.path("out").display().to_string();
    let cfg_s = cfg.display().to_string();
    let args = ["train", "--config", &cfg_s, "--labels", &labels, "--json", "-o", &out];
    let mut c = env.cmd_in(&net.ns[1], &args);
    c.env("SLEAP_RTC_SERVER", url_in(hb));
    let (code, events, err) = Client::spawn_cmd(c).finish(90).await;
    let worker_log = std::fs::read_to_string(env.path("w.log")).unwrap_or_default();
    assert_eq!(code, 0, "{err}\n{events:#?}\nworker:\n{worker_log}\ncoturn:\n{}", turn.log_text());
    assert_eq!(done(&events)["state"], "completed");
    let connected = event(&events, "connected").expect("a connected event");
    assert_eq!(connected["route"], "relayed", "{connected}");
    assert!(worker_log.contains("relayed through TURN"), "the worker logs the route:\n{worker_log}");
    // The model came back through the relay.
    assert!(env.path("out/single_instance/best.ckpt").is_file());
    // And coturn really relayed: it logged allocations and channel traffic.
    let tl = turn.log_text();
    assert!(tl.contains("ALLOCATE") || tl.contains("allocation"), "coturn log:\n{tl}");
}
