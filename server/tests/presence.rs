//! Presence goes only to the peers that want it (issue 19, large rooms), over real WebSockets:
//! workers hear of no one, clients and dashboards of workers, and a `register` without
//! `subscribe` (every upstream peer's) gets what its role got before.

mod common;

use common::*;
use serde_json::{Value, json};

fn listed(reg: &Value) -> Vec<String> {
    let mut ids: Vec<String> =
        reg["peer_list"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    ids.sort();
    let mut keys: Vec<String> = reg["peer_metadata"].as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(ids, keys, "peer_metadata covers exactly peer_list: {reg}");
    ids
}

#[tokio::test]
async fn workers_hear_of_no_one_and_clients_and_dashboards_hear_of_workers() {
    let s = start().await;
    let (owner, _) = s.signin().await;
    let (room, _) = s.room(&owner).await;
    let (token1, _) = s.worker_token(&owner, &room, "gpu-1").await;
    let (token2, _) = s.worker_token(&owner, &room, "gpu-2").await;
    let (client_jwt, _) = s.signin().await;
    s.join(&owner, &client_jwt, &room).await;
    let meta = json!({"tags": ["sleap-rtc", "training-worker"], "properties": {"status": "available"}});

    // A dashboard as ours registers (role only), then a client exactly as upstream's sends it.
    let mut dash = s.connect().await;
    dash.register(json!({"type": "register", "room_id": room, "role": "dashboard", "jwt": owner,
                         "metadata": {"tags": ["dashboard"]}}))
        .await;
    let mut client = s.connect().await;
    let reg = client
        .register(json!({"type": "register", "peer_id": "client-1", "room_id": room, "role": "client",
                         "jwt": client_jwt, "metadata": {"tags": ["training-client"]}}))
        .await;
    assert!(listed(&reg).is_empty(), "the dashboard is not a worker: {reg}");

    // A worker joins: the client and the dashboard are told, and the worker is listed no one.
    let mut w1 = s.connect().await;
    let reg = w1
        .register(json!({"type": "register", "peer_id": "w1", "role": "worker", "api_key": token1, "metadata": meta}))
        .await;
    assert!(listed(&reg).is_empty(), "{reg}");
    for ws in [&mut client, &mut dash] {
        let j = ws.recv().await;
        assert_eq!(
            (j["type"].as_str(), j["peer_id"].as_str(), j["role"].as_str()),
            (Some("peer_joined"), Some("w1"), Some("worker"))
        );
    }

    // A peer of another role, or of none (upstream's legacy register names none), keeps hearing
    // of everyone, as every peer did before `subscribe`.
    let mut any = s.connect().await;
    let reg = any.register(json!({"type": "register", "peer_id": "any", "room_id": room, "jwt": owner})).await;
    assert_eq!(listed(&reg).len(), 3, "{reg}");

    // A second worker that asks for clients.
    let mut w2 = s.connect().await;
    let reg = w2
        .register(json!({"type": "register", "peer_id": "w2", "role": "worker", "api_key": token2,
                         "metadata": meta, "subscribe": ["client"]}))
        .await;
    assert_eq!(listed(&reg), ["client-1"]);
    for ws in [&mut client, &mut dash, &mut any] {
        assert_eq!(ws.recv_type("peer_joined").await["peer_id"], "w2");
    }

    // A worker's status reaches those that follow workers; the updater gets its reply only.
    w1.send(json!({"type": "update_metadata", "request_id": 1, "metadata": {"properties": {"status": "busy"}}})).await;
    let upd = w1.recv().await;
    assert_eq!((upd["type"].as_str(), upd["request_id"].as_i64()), (Some("metadata_updated"), Some(1)));
    for ws in [&mut client, &mut dash, &mut any] {
        let m = ws.recv().await;
        assert_eq!((m["type"].as_str(), m["peer_id"].as_str()), (Some("metadata_updated"), Some("w1")));
        assert_eq!(m["metadata"]["properties"]["status"], "busy");
    }

    // A worker leaves: the same peers are told; the other worker is not.
    drop(w1);
    for ws in [&mut client, &mut dash, &mut any] {
        let m = ws.recv_type("peer_left").await;
        assert_eq!(m["peer_id"], "w1");
    }
    // The client leaving is news only to the worker that asked for clients and to `any`.
    drop(client);
    assert_eq!(w2.recv().await, json!({"type": "peer_left", "peer_id": "client-1", "reason": "disconnected"}));
    assert_eq!(any.recv().await["peer_id"], "client-1");
    // Nothing else was pushed to the workers or the dashboard: w2 heard of clients only, and the
    // dashboard of workers only.
    w2.quiet().await;
    dash.quiet().await;

    // A refused subscription is an ordinary register error.
    let mut bad = s.connect().await;
    bad.send(json!({"type": "register", "room_id": room, "jwt": owner, "subscribe": "worker", "request_id": 9})).await;
    let err = bad.recv().await;
    assert_eq!((err["code"].as_str(), err["request_id"].as_i64()), (Some("INVALID_MESSAGE"), Some(9)), "{err}");
    s.stop().await;
}

/// Clients, dashboards and other workers join a worker's room: it is told of none of them, while
/// each client and dashboard is listed the workers already there.
#[tokio::test]
async fn a_worker_hears_nothing_while_a_room_fills() {
    let s = start().await;
    let (owner, _) = s.signin().await;
    let (room, _) = s.room(&owner).await;
    let (token, _) = s.worker_token(&owner, &room, "gpu").await;
    let mut w = s.connect().await;
    w.register(json!({"type": "register", "role": "worker", "api_key": token})).await;
    let mut others = Vec::new();
    for (i, role) in ["client", "dashboard", "client", "worker"].iter().enumerate() {
        let mut p = s.connect().await;
        let reg = p
            .register(
                json!({"type": "register", "peer_id": format!("p{i}"), "room_id": room, "role": role, "jwt": owner}),
            )
            .await;
        let want_workers = *role != "worker";
        assert_eq!(listed(&reg).len(), usize::from(want_workers), "{role}: {reg}");
        others.push(p);
    }
    w.quiet().await;
    s.stop().await;
}
