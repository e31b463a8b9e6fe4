use super::*;
use proptest::prelude::*;
use serde_json::json;

const T0: Millis = Millis(1_700_000_000_000);

fn grant(room: &str, user: &str, default_peer: &str) -> Grant {
    Grant {
        room_id: room.into(),
        default_peer_id: default_peer.into(),
        principal: Principal { user_id: user.into(), credential_id: format!("cred-{user}") },
        room_expires_at: None,
        token_echo: None,
        worker_name: None,
    }
}

/// Drives a hub and records outputs per connection.
struct Harness {
    hub: Hub,
    now: Millis,
    inbox: HashMap<ConnId, Vec<ServerEnvelope>>,
    closed: HashMap<ConnId, u16>,
    auth: Vec<(ConnId, RegisterRequest)>,
    tickets: Vec<(ConnId, TicketFacts)>,
}

impl Harness {
    fn new(limits: Limits) -> Self {
        Harness {
            hub: Hub::new(limits),
            now: T0,
            inbox: HashMap::new(),
            closed: HashMap::new(),
            auth: Vec::new(),
            tickets: Vec::new(),
        }
    }

    fn pump(&mut self) {
        while let Some(o) = self.hub.poll_output() {
            match o {
                Output::Send { to, msg } => {
                    for c in to {
                        assert!(!self.closed.contains_key(&c), "delivery to closed {c:?}: {msg:?}");
                        self.inbox.entry(c).or_default().push((*msg).clone());
                    }
                }
                Output::Close { conn, code, .. } => {
                    self.closed.insert(conn, code.code());
                }
                Output::Authenticate { conn, request } => self.auth.push((conn, *request)),
                Output::IssueTicket { conn, ticket, .. } => self.tickets.push((conn, ticket)),
                Output::Claim { .. } | Output::Publish(_) => panic!("cluster output from a single-instance hub"),
            }
        }
        self.hub.check_invariants().unwrap();
    }

    fn send(&mut self, c: u64, v: serde_json::Value) {
        self.hub.handle_text(ConnId(c), &v.to_string(), self.now);
        self.pump();
    }

    /// A worker that wants everyone's presence (these tests predate `subscribe`).
    fn register(&mut self, c: u64, room: &str, user: &str, peer: Option<&str>) {
        self.register_with(c, room, user, peer, "worker", Some(json!(["*"])));
    }

    fn register_with(
        &mut self,
        c: u64,
        room: &str,
        user: &str,
        peer: Option<&str>,
        role: &str,
        subscribe: Option<serde_json::Value>,
    ) {
        self.hub.connect(ConnId(c), self.now);
        let mut msg = json!({"type":"register","jwt":"x","room_id":room,"role":role,
            "metadata":{"tags":["gpu"],"properties":{"mem":8000,"status":"available"}}});
        if let Some(p) = peer {
            msg["peer_id"] = json!(p);
        }
        if let Some(s) = subscribe {
            msg["subscribe"] = s;
        }
        self.send(c, msg);
        let (conn, _) = self.auth.pop().expect("authenticate requested");
        assert_eq!(conn, ConnId(c));
        self.hub.complete_register(conn, Ok(grant(room, user, &format!("auto-{c}"))), self.now);
        self.pump();
    }

    fn take(&mut self, c: u64) -> Vec<ServerEnvelope> {
        self.inbox.remove(&ConnId(c)).unwrap_or_default()
    }

    fn last(&mut self, c: u64) -> ServerMessage {
        self.take(c).pop().expect("a message").msg
    }
}

fn error_code(m: &ServerMessage) -> ErrorCode {
    match m {
        ServerMessage::Error { code, .. } => code.clone(),
        other => panic!("expected error, got {other:?}"),
    }
}

#[test]
fn nothing_but_register_before_registration() {
    let mut h = Harness::new(Limits::default());
    h.hub.connect(ConnId(1), h.now);
    for m in [
        json!({"type":"discover_peers"}),
        json!({"type":"peer_message","to_peer_id":"x","payload":{"a":1}}),
        json!({"type":"offer","target":"x","sdp":"s"}),
        json!({"type":"update_metadata","metadata":{"a":1}}),
    ] {
        h.send(1, m);
        assert_eq!(error_code(&h.last(1)), ErrorCode::NotRegistered);
    }
}

#[test]
fn register_flow_presence_and_routing() {
    let mut h = Harness::new(Limits::default());
    h.register(1, "r", "u1", Some("w1"));
    match h.last(1) {
        ServerMessage::RegisteredAuth { peer_id, peer_list, .. } => {
            assert_eq!(peer_id, "w1");
            assert!(peer_list.is_empty());
        }
        other => panic!("{other:?}"),
    }
    h.register(2, "r", "u2", None);
    match h.last(2) {
        ServerMessage::RegisteredAuth { peer_id, peer_list, peer_metadata, .. } => {
            assert_eq!(peer_id, "auto-2");
            assert_eq!(peer_list, vec!["w1".to_string()]);
            assert_eq!(peer_metadata["w1"]["properties"]["mem"], 8000);
        }
        other => panic!("{other:?}"),
    }
    match h.last(1) {
        ServerMessage::PeerJoined { peer } => assert_eq!(peer.peer_id, "auto-2"),
        other => panic!("{other:?}"),
    }
    h.send(2, json!({"type":"peer_message","to_peer_id":"w1","payload":{"hi":1},"request_id":"q1"}));
    let acks = h.take(2);
    assert!(matches!(acks[0].msg, ServerMessage::Ack {}));
    assert_eq!(acks[0].request_id, Some(RequestId::Str("q1".into())));
    match h.last(1) {
        ServerMessage::PeerMessage { from_peer_id, payload, .. } => {
            assert_eq!(from_peer_id, "auto-2");
            assert_eq!(payload, json!({"hi":1}));
        }
        other => panic!("{other:?}"),
    }
    h.hub.disconnect(ConnId(2), h.now);
    h.pump();
    assert!(matches!(h.last(1), ServerMessage::PeerLeft { ref peer_id, .. } if peer_id == "auto-2"));
}

/// Presence kinds a connection received, in order: ("joined" | "left" | "updated", peer id).
fn presence(msgs: &[ServerEnvelope]) -> Vec<(&'static str, String)> {
    msgs.iter()
        .filter_map(|m| match &m.msg {
            ServerMessage::PeerJoined { peer } => Some(("joined", peer.peer_id.clone())),
            ServerMessage::PeerLeft { peer_id, .. } => Some(("left", peer_id.clone())),
            ServerMessage::MetadataUpdated { peer_id, .. } if m.request_id.is_none() => {
                Some(("updated", peer_id.clone()))
            }
            _ => None,
        })
        .collect()
}

fn listed(m: &ServerMessage) -> Vec<String> {
    match m {
        ServerMessage::RegisteredAuth { peer_list, peer_metadata, .. } => {
            let mut l = peer_list.clone();
            l.sort();
            let mut keys: Vec<String> = peer_metadata.keys().cloned().collect();
            keys.sort();
            assert_eq!(l, keys, "peer_metadata covers exactly peer_list");
            l
        }
        other => panic!("expected registered_auth, got {other:?}"),
    }
}

#[test]
fn presence_goes_only_to_the_peers_that_want_that_role() {
    let mut h = Harness::new(Limits::default());
    let all = |h: &mut Harness| -> Vec<Vec<(&'static str, String)>> { (1..=6).map(|c| presence(&h.take(c))).collect() };
    // Defaults by role: a worker wants no one, a client or dashboard workers, any other role everyone.
    h.register_with(1, "r", "u1", Some("w1"), "worker", None);
    assert!(listed(&h.last(1)).is_empty());
    h.register_with(2, "r", "u2", Some("c1"), "client", None);
    assert_eq!(listed(&h.last(2)), ["w1"]);
    h.register_with(3, "r", "u3", Some("g1"), "peer", None);
    assert_eq!(listed(&h.last(3)), ["c1", "w1"]);
    assert_eq!(all(&mut h), vec![vec![], vec![], vec![], vec![], vec![], vec![]], "w1 and c1 hear of no one yet");
    // Explicit subscriptions: a worker that wants clients, a client that wants no one.
    h.register_with(4, "r", "u4", Some("w2"), "worker", Some(json!(["client"])));
    assert_eq!(listed(&h.last(4)), ["c1"]);
    let w2 = ("joined", "w2".to_owned());
    assert_eq!(all(&mut h), vec![vec![], vec![w2.clone()], vec![w2], vec![], vec![], vec![]]);
    h.register_with(5, "r", "u5", Some("c2"), "client", Some(json!([])));
    assert!(listed(&h.last(5)).is_empty());
    let c2 = ("joined", "c2".to_owned());
    assert_eq!(all(&mut h), vec![vec![], vec![], vec![c2.clone()], vec![c2], vec![], vec![]]);
    h.register_with(6, "r", "u6", Some("d1"), "dashboard", None);
    assert_eq!(listed(&h.last(6)), ["w1", "w2"]);
    let d1 = ("joined", "d1".to_owned());
    assert_eq!(all(&mut h), vec![vec![], vec![], vec![d1], vec![], vec![], vec![]]);

    // A worker's status change: the updater gets its reply, the peers that want workers the push.
    h.send(1, json!({"type":"update_metadata","metadata":{"properties":{"status":"busy"}}}));
    let reply = h.take(1);
    assert!(matches!(&reply[..], [ServerEnvelope { msg: ServerMessage::MetadataUpdated { .. }, .. }]));
    let w1 = ("updated", "w1".to_owned());
    assert_eq!(all(&mut h), vec![vec![], vec![w1.clone()], vec![w1.clone()], vec![], vec![], vec![w1]]);

    // Leaving: the same rule.
    h.hub.disconnect(ConnId(2), h.now);
    h.pump();
    let c1 = ("left", "c1".to_owned());
    assert_eq!(all(&mut h), vec![vec![], vec![], vec![c1.clone()], vec![c1], vec![], vec![]]);
    h.hub.disconnect(ConnId(1), h.now);
    h.pump();
    let w1 = ("left", "w1".to_owned());
    assert_eq!(all(&mut h), vec![vec![], vec![], vec![w1.clone()], vec![], vec![], vec![w1]]);
    // Room-wide news is not presence: everyone still hears the room close.
    h.hub.close_room("r", "deleted", h.now);
    h.pump();
    for c in 3..=6 {
        assert!(matches!(h.last(c), ServerMessage::RoomClosed { .. }), "conn {c}");
    }
}

#[test]
fn a_bad_subscribe_is_refused_and_an_upstream_register_keeps_its_defaults() {
    let mut h = Harness::new(Limits::default());
    h.hub.connect(ConnId(1), h.now);
    for bad in [json!("worker"), json!([1]), json!([""]), json!([("x".repeat(65))])] {
        h.send(1, json!({"type":"register","jwt":"x","room_id":"r","role":"client","subscribe":bad}));
        assert_eq!(error_code(&h.last(1)), ErrorCode::InvalidMessage, "{bad}");
    }
    assert!(h.auth.is_empty());
    // `null` is the same as absent: a client's default.
    h.send(1, json!({"type":"register","jwt":"x","room_id":"r","role":"client","subscribe":null}));
    let (conn, req) = h.auth.pop().expect("authenticate requested");
    assert_eq!(req.role, "client");
    h.hub.complete_register(conn, Ok(grant("r", "u1", "c")), h.now);
    h.pump();
    h.register_with(2, "r", "u2", Some("w"), "worker", None);
    assert_eq!(presence(&h.take(1)), [("joined", "w".to_owned())]);
}

#[test]
fn a_room_of_workers_costs_each_registration_a_constant_number_of_frames() {
    let mut h = Harness::new(Limits { max_peers_per_room: 10_000, ..Limits::default() });
    h.register_with(1, "r", "u0", Some("dash"), "dashboard", None);
    h.take(1);
    let n = 400;
    let mut deliveries = 0;
    for i in 0..n {
        let c = 10 + i;
        h.hub.connect(ConnId(c), h.now);
        h.hub.handle_text(
            ConnId(c),
            &json!({"type":"register","jwt":"x","room_id":"r","role":"worker","peer_id":format!("w{i}")}).to_string(),
            h.now,
        );
        while h.hub.poll_output().is_some() {}
        h.hub.complete_register(ConnId(c), Ok(grant("r", &format!("u{c}"), "x")), h.now);
        while let Some(o) = h.hub.poll_output() {
            match o {
                Output::Send { to, msg } => {
                    deliveries += to.len();
                    if let ServerMessage::RegisteredAuth { peer_list, .. } = &msg.msg {
                        assert!(peer_list.is_empty(), "a worker is listed no one");
                    }
                }
                other => panic!("{other:?}"),
            }
        }
    }
    // registered_auth to each worker, and peer_joined to the dashboard: 2 per registration.
    assert_eq!(deliveries, 2 * n as usize);
    h.hub.check_invariants().unwrap();
    // A client joining late is listed the workers and only them.
    h.register_with(2, "r", "u2", Some("late"), "client", None);
    assert_eq!(listed(&h.last(2)).len(), n as usize);
    assert!(!h.inbox.contains_key(&ConnId(10)), "workers hear nothing of the client");
}

#[test]
fn spoofed_sender_is_refused() {
    let mut h = Harness::new(Limits::default());
    h.register(1, "r", "u1", Some("a"));
    h.register(2, "r", "u2", Some("b"));
    h.register(3, "r", "u3", Some("c"));
    h.take(1);
    h.take(2);
    h.take(3);
    h.send(3, json!({"type":"peer_message","from_peer_id":"a","to_peer_id":"b","payload":{"x":1}}));
    assert_eq!(error_code(&h.last(3)), ErrorCode::SenderMismatch);
    h.send(3, json!({"type":"offer","sender":"a","target":"b","sdp":"s"}));
    assert_eq!(error_code(&h.last(3)), ErrorCode::SenderMismatch);
    h.send(3, json!({"type":"update_metadata","peer_id":"a","metadata":{"x":1}}));
    assert_eq!(error_code(&h.last(3)), ErrorCode::SenderMismatch);
    assert!(h.take(2).is_empty());
    assert!(h.take(1).is_empty());
}

#[test]
fn peer_ids_unique_per_room_and_duplicates_from_others_refused() {
    let mut h = Harness::new(Limits::default());
    h.register(1, "r", "u1", Some("w"));
    h.register(2, "r", "u2", Some("w"));
    assert_eq!(error_code(&h.last(2)), ErrorCode::PeerIdTaken);
    // The victim is untouched, and the attacker disconnecting removes nothing of the victim's (B3).
    h.hub.disconnect(ConnId(2), h.now);
    h.pump();
    assert_eq!(h.hub.identity(ConnId(1)), Some(("r", "w")));
    // Same id in another room is a different peer.
    h.register(3, "other", "u3", Some("w"));
    assert!(matches!(h.last(3), ServerMessage::RegisteredAuth { .. }));
}

#[test]
fn same_principal_supersedes_its_old_connection() {
    let mut h = Harness::new(Limits::default());
    h.register(1, "r", "u1", Some("w"));
    h.register(2, "r", "u1", Some("w"));
    assert!(matches!(h.last(2), ServerMessage::RegisteredAuth { .. }));
    assert_eq!(h.closed.get(&ConnId(1)), Some(&CloseCode::Superseded.code()));
    h.hub.disconnect(ConnId(1), h.now);
    h.pump();
    assert_eq!(h.hub.identity(ConnId(2)), Some(("r", "w")));
}

#[test]
fn reserved_metadata_is_refused_and_tags_survive_updates() {
    let mut h = Harness::new(Limits::default());
    h.hub.connect(ConnId(1), h.now);
    h.send(1, json!({"type":"register","jwt":"x","room_id":"r","metadata":{"_token_id":"slp_fake"}}));
    assert_eq!(error_code(&h.last(1)), ErrorCode::ReservedMetadataKey);
    h.register(2, "r", "u", Some("w"));
    h.take(2);
    h.send(2, json!({"type":"update_metadata","metadata":{"properties":{"_x":1}}}));
    assert_eq!(error_code(&h.last(2)), ErrorCode::ReservedMetadataKey);
    h.send(2, json!({"type":"update_metadata","metadata":{"properties":{"status":"busy"}}}));
    match h.last(2) {
        ServerMessage::MetadataUpdated { metadata, .. } => {
            assert_eq!(metadata["tags"], json!(["gpu"]));
            assert_eq!(metadata["properties"], json!({"mem":8000,"status":"busy"}));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn discovery_filters() {
    let mut h = Harness::new(Limits::default());
    h.register(1, "r", "u1", Some("w"));
    h.register(2, "r", "u2", Some("c"));
    h.take(2);
    let q = |f: serde_json::Value| json!({"type":"discover_peers","filters":f});
    let count = |h: &mut Harness| match h.last(2) {
        ServerMessage::PeerList { count, .. } => count,
        other => panic!("{other:?}"),
    };
    h.send(2, q(json!({"role":"worker"})));
    assert_eq!(count(&mut h), 1);
    h.send(2, q(json!({"role":"client"})));
    assert_eq!(count(&mut h), 0);
    h.send(2, q(json!({"tags":["x","gpu"]})));
    assert_eq!(count(&mut h), 1);
    h.send(2, q(json!({"properties":{"mem":{"$gte":4000,"$lte":8000}}})));
    assert_eq!(count(&mut h), 1);
    h.send(2, q(json!({"properties":{"mem":{"$gte":"a"}}})));
    assert_eq!(count(&mut h), 0, "incomparable types do not match and do not error");
    h.send(2, q(json!({"properties":{"missing":{"$lte":1}}})));
    assert_eq!(count(&mut h), 0);
    h.send(2, q(json!({"properties":{"status":"available"}})));
    assert_eq!(count(&mut h), 1);
    h.send(2, q(json!({"properties":{"mem":{"$regex":"x"}}})));
    assert_eq!(error_code(&h.last(2)), ErrorCode::InvalidMessage);
}

#[test]
fn rate_limit_answers_then_closes() {
    let limits = Limits { rate_per_sec: 1.0, rate_burst: 2.0, rate_strikes_before_close: 3, ..Limits::default() };
    let mut h = Harness::new(limits);
    h.hub.connect(ConnId(1), h.now);
    h.send(1, json!({"type":"ping"}));
    h.send(1, json!({"type":"ping"}));
    assert!(h.take(1).iter().all(|m| matches!(m.msg, ServerMessage::Pong {})));
    h.send(1, json!({"type":"ping"}));
    assert_eq!(error_code(&h.last(1)), ErrorCode::RateLimited);
    h.now = h.now.plus_ms(1000);
    h.send(1, json!({"type":"ping"}));
    assert!(matches!(h.last(1), ServerMessage::Pong {}));
    for _ in 0..3 {
        h.send(1, json!({"type":"ping"}));
    }
    assert_eq!(h.closed.get(&ConnId(1)), Some(&CloseCode::RateLimited.code()));
}

#[test]
fn unregistered_connections_time_out() {
    let mut h = Harness::new(Limits::default());
    h.hub.connect(ConnId(1), h.now);
    h.register(2, "r", "u", None);
    assert_eq!(h.hub.poll_timeout(), Some(T0.plus_ms(10_000)));
    h.hub.handle_timeout(T0.plus_ms(10_000));
    h.pump();
    assert_eq!(h.closed.get(&ConnId(1)), Some(&CloseCode::RegisterTimeout.code()));
    assert!(!h.closed.contains_key(&ConnId(2)));
}

#[test]
fn failed_registrations_close_the_connection() {
    let mut h = Harness::new(Limits::default());
    h.hub.connect(ConnId(1), h.now);
    for i in 0..5 {
        h.send(1, json!({"type":"register","jwt":"bad","room_id":"r"}));
        let (c, _) = h.auth.pop().unwrap();
        h.hub.complete_register(c, Err(SignalError::new(ErrorCode::AuthFailed, "Invalid token")), h.now);
        h.pump();
        assert_eq!(error_code(&h.last(1)), ErrorCode::AuthFailed);
        assert_eq!(h.closed.contains_key(&ConnId(1)), i == 4);
    }
}

#[test]
fn expired_and_closed_rooms_evict_and_refuse() {
    let mut h = Harness::new(Limits::default());
    h.hub.connect(ConnId(1), h.now);
    h.send(1, json!({"type":"register","jwt":"x","room_id":"r"}));
    let (c, _) = h.auth.pop().unwrap();
    let mut g = grant("r", "u", "p1");
    g.room_expires_at = Some(T0.plus_ms(5000));
    h.hub.complete_register(c, Ok(g.clone()), h.now);
    h.pump();
    h.take(1);
    h.hub.handle_timeout(T0.plus_ms(5000));
    h.pump();
    assert!(matches!(h.last(1), ServerMessage::RoomClosed { .. }));
    assert_eq!(h.closed.get(&ConnId(1)), Some(&CloseCode::RoomClosed.code()));
    // An expired grant is refused.
    h.now = T0.plus_ms(6000);
    h.hub.connect(ConnId(2), h.now);
    h.send(2, json!({"type":"register","jwt":"x","room_id":"r"}));
    let (c, _) = h.auth.pop().unwrap();
    h.hub.complete_register(c, Ok(g), h.now);
    h.pump();
    assert_eq!(error_code(&h.last(2)), ErrorCode::RoomExpired);
    // A deleted room refuses a registration that was verified before the delete.
    h.register(3, "d", "u", None);
    h.hub.connect(ConnId(4), h.now);
    h.send(4, json!({"type":"register","jwt":"x","room_id":"d"}));
    let (c, _) = h.auth.pop().unwrap();
    h.hub.close_room("d", "Room deleted", h.now);
    h.pump();
    assert_eq!(h.closed.get(&ConnId(3)), Some(&CloseCode::RoomClosed.code()));
    h.hub.complete_register(c, Ok(grant("d", "u", "p4")), h.now);
    h.pump();
    assert_eq!(error_code(&h.last(4)), ErrorCode::RoomNotFound);
}

#[test]
fn limits_rooms_and_peers() {
    let limits = Limits { max_rooms: 1, max_peers_per_room: 1, ..Limits::default() };
    let mut h = Harness::new(limits);
    h.register(1, "a", "u", Some("p"));
    h.register(2, "a", "u2", Some("q"));
    assert_eq!(error_code(&h.last(2)), ErrorCode::RoomFull);
    h.register(3, "b", "u", Some("p"));
    assert_eq!(error_code(&h.last(3)), ErrorCode::ServerFull);
}

#[test]
fn revocation_and_member_removal_evict() {
    let mut h = Harness::new(Limits::default());
    h.register(1, "r", "u1", Some("a"));
    h.register(2, "r", "u2", Some("b"));
    h.register(3, "s", "u2", Some("b"));
    assert_eq!(h.hub.remove_member("r", "u2", h.now), 1);
    h.pump();
    assert_eq!(h.closed.get(&ConnId(2)), Some(&CloseCode::Revoked.code()));
    assert!(!h.closed.contains_key(&ConnId(3)));
    assert_eq!(h.hub.revoke_credential("cred-u1", h.now), 1);
    h.pump();
    assert_eq!(h.closed.get(&ConnId(1)), Some(&CloseCode::Revoked.code()));
}

#[test]
fn admin_is_first_come_and_conflicts_are_reported() {
    let mut h = Harness::new(Limits::default());
    for c in [1u64, 2] {
        h.hub.connect(ConnId(c), h.now);
        h.send(c, json!({"type":"register","jwt":"x","room_id":"r","is_admin":true}));
        let (conn, _) = h.auth.pop().unwrap();
        h.hub.complete_register(conn, Ok(grant("r", &format!("u{c}"), &format!("p{c}"))), h.now);
        h.pump();
    }
    let msgs = h.take(2);
    assert!(matches!(&msgs[0].msg, ServerMessage::RegisteredAuth { admin_peer_id: Some(a), .. } if a == "p1"));
    assert!(matches!(&msgs[1].msg, ServerMessage::AdminConflict { current_admin, .. } if current_admin == "p1"));
}

#[test]
fn relay_is_verbatim_with_server_sender() {
    let mut h = Harness::new(Limits::default());
    h.register(1, "r", "u1", Some("a"));
    h.register(2, "r", "u2", Some("b"));
    h.take(1);
    h.send(2, json!({"type":"offer","target":"a","sdp":"v=0","role":"client"}));
    match h.last(1) {
        ServerMessage::Offer(o) => {
            assert_eq!(o["sender"], "b");
            assert_eq!(o["target"], "a");
            assert_eq!(o["sdp"], "v=0");
            assert_eq!(o["role"], "client");
        }
        other => panic!("{other:?}"),
    }
    h.send(2, json!({"type":"candidate","target":"nobody","candidate":{}}));
    assert_eq!(error_code(&h.last(2)), ErrorCode::PeerNotFound);
}

#[test]
fn merge_metadata_semantics() {
    let old = json!({"tags":["a"],"properties":{"x":1,"y":2},"name":"n"});
    let upd = json!({"tags":["b","a"],"properties":{"y":null,"z":3}});
    let (serde_json::Value::Object(o), serde_json::Value::Object(u)) = (old, upd) else { panic!() };
    let m = merge_metadata(&o, u);
    assert_eq!(serde_json::Value::Object(m), json!({"tags":["a","b"],"properties":{"x":1,"z":3},"name":"n"}));
}

// ------------------------------------------------------------------------------------------
// Property tests: random operation sequences from several connections.
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Connect(u8),
    Register { conn: u8, room: u8, user: u8, peer: Option<u8>, ok: bool },
    Disconnect(u8),
    Message { conn: u8, from: Option<u8>, to: u8, relay: bool },
    Update { conn: u8, claimed: Option<u8> },
    Discover(u8),
    CloseRoom(u8),
    Revoke(u8),
    Tick(u16),
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0u8..6;
    prop_oneof![
        c.clone().prop_map(Op::Connect),
        (c.clone(), 0u8..3, 0u8..3, proptest::option::of(0u8..4), proptest::bool::weighted(0.8))
            .prop_map(|(conn, room, user, peer, ok)| Op::Register { conn, room, user, peer, ok }),
        c.clone().prop_map(Op::Disconnect),
        (c.clone(), proptest::option::of(0u8..4), 0u8..4, any::<bool>())
            .prop_map(|(conn, from, to, relay)| Op::Message { conn, from, to, relay }),
        (c.clone(), proptest::option::of(0u8..4)).prop_map(|(conn, claimed)| Op::Update { conn, claimed }),
        c.clone().prop_map(Op::Discover),
        (0u8..3).prop_map(Op::CloseRoom),
        (0u8..3).prop_map(Op::Revoke),
        (0u16..20_000).prop_map(Op::Tick),
    ]
}

fn pid(p: u8) -> String {
    format!("p{p}")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_operations_keep_rooms_isolated(ops in proptest::collection::vec(op(), 1..80)) {
        let mut hub = Hub::new(Limits { max_peers_per_room: 3, ..Limits::default() });
        let mut now = T0;
        let mut generation = [0u64; 6];
        let mut live: HashMap<ConnId, ()> = HashMap::new();
        let conn_of = |g: &[u64; 6], c: u8| ConnId(g[c as usize] * 16 + c as u64);
        for op in ops {
            // Where each connection stands before the op: used to judge deliveries.
            let before: HashMap<ConnId, (String, String)> = live
                .keys()
                .filter_map(|c| hub.identity(*c).map(|(r, p)| (*c, (r.to_owned(), p.to_owned()))))
                .collect();
            let mut sender: Option<ConnId> = None;
            match op {
                Op::Connect(c) => {
                    generation[c as usize] += 1;
                    let id = conn_of(&generation, c);
                    hub.connect(id, now);
                    live.insert(id, ());
                }
                Op::Register { conn, room, user, peer, ok } => {
                    let id = conn_of(&generation, conn);
                    // Roles with every default interest, so the presence indexes are exercised.
                    let role = ["worker", "client", "peer"][user as usize % 3];
                    let mut m = json!({"type":"register","jwt":"x","room_id":format!("r{room}"),"role":role});
                    if let Some(p) = peer { m["peer_id"] = json!(pid(p)); }
                    hub.handle_text(id, &m.to_string(), now);
                    let verdict = if ok {
                        Ok(grant(&format!("r{room}"), &format!("u{user}"), &format!("auto{}", id.0)))
                    } else {
                        Err(SignalError::new(ErrorCode::AuthFailed, "no"))
                    };
                    hub.complete_register(id, verdict, now);
                }
                Op::Disconnect(c) => {
                    let id = conn_of(&generation, c);
                    hub.disconnect(id, now);
                    live.remove(&id);
                }
                Op::Message { conn, from, to, relay } => {
                    let id = conn_of(&generation, conn);
                    sender = Some(id);
                    let mut m = if relay && to % 2 == 0 {
                        json!({"type":"request_ticket","target":pid(to),"fingerprint":"sha-256 AA"})
                    } else if relay {
                        json!({"type":"candidate","target":pid(to),"candidate":{"c":1}})
                    } else {
                        json!({"type":"peer_message","to_peer_id":pid(to),"payload":{"k":1}})
                    };
                    if let Some(f) = from { m[if relay {"sender"} else {"from_peer_id"}] = json!(pid(f)); }
                    hub.handle_text(id, &m.to_string(), now);
                }
                Op::Update { conn, claimed } => {
                    let id = conn_of(&generation, conn);
                    let mut m = json!({"type":"update_metadata","metadata":{"properties":{"n":1}}});
                    if let Some(p) = claimed { m["peer_id"] = json!(pid(p)); }
                    hub.handle_text(id, &m.to_string(), now);
                }
                Op::Discover(c) => hub.handle_text(conn_of(&generation, c), r#"{"type":"discover_peers"}"#, now),
                Op::CloseRoom(r) => hub.close_room(&format!("r{r}"), "deleted", now),
                Op::Revoke(u) => { hub.revoke_credential(&format!("cred-u{u}"), now); }
                Op::Tick(ms) => { now = now.plus_ms(ms as u64); hub.handle_timeout(now); }
            }
            while let Some(out) = hub.poll_output() {
                match out {
                    Output::Send { to, msg } => {
                        for t in &to {
                            match &msg.msg {
                                ServerMessage::PeerMessage { from_peer_id, .. } => {
                                    let s = sender.expect("only a message op routes");
                                    let (sr, sp) = before.get(&s).expect("sender was registered");
                                    let (tr, _) = before.get(t).expect("target was registered");
                                    prop_assert_eq!(sr, tr, "delivery crossed rooms");
                                    prop_assert_eq!(from_peer_id, sp, "spoofed sender delivered");
                                }
                                ServerMessage::Candidate(o) => {
                                    let s = sender.expect("only a message op routes");
                                    let (sr, sp) = before.get(&s).expect("sender was registered");
                                    let (tr, _) = before.get(t).expect("target was registered");
                                    prop_assert_eq!(sr, tr, "relay crossed rooms");
                                    prop_assert_eq!(o["sender"].as_str(), Some(sp.as_str()));
                                }
                                ServerMessage::PeerList { peers, .. } => {
                                    let (room, _) = before.get(t).expect("discoverer registered");
                                    for p in peers {
                                        let in_room = hub.room_peers(room).any(|(id, _)| id == p.peer_id);
                                        prop_assert!(in_room, "discovery listed a peer outside the room");
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    Output::Close { conn, .. } => { live.remove(&conn); }
                    Output::Authenticate { .. } => {}
                    Output::IssueTicket { conn, ticket, .. } => {
                        // A ticket only ever names the requester as it is registered, and a
                        // worker in the requester's own room.
                        let (room, peer) = before.get(&conn).expect("requester registered");
                        prop_assert_eq!(&ticket.room_id, room);
                        prop_assert_eq!(&ticket.client, peer);
                        prop_assert!(hub.room_peers(room).any(|(id, _)| id == ticket.worker));
                    }
                    Output::Claim { .. } | Output::Publish(_) => prop_assert!(false, "cluster output, single instance"),
                }
            }
            if let Err(e) = hub.check_invariants() {
                return Err(TestCaseError::fail(e));
            }
        }
        // Everyone leaves: nothing may remain (no ghosts, B4).
        for c in live.keys().copied().collect::<Vec<_>>() {
            hub.disconnect(c, now);
        }
        prop_assert_eq!(hub.stats(), Stats::default());
    }
}

#[test]
fn tickets_name_the_requester_and_a_peer_of_its_room() {
    let mut h = Harness::new(Limits::default());
    h.register(1, "r", "u1", Some("w1"));
    h.register(2, "r", "u2", Some("c1"));
    h.register(3, "other", "u3", Some("w9"));
    h.take(1);
    h.take(2);
    h.send(2, json!({"type":"request_ticket","target":"w1","fingerprint":"sha-256 AB","request_id":7}));
    let (conn, t) = h.tickets.pop().expect("a ticket to sign");
    assert_eq!(conn, ConnId(2));
    assert_eq!(
        t,
        TicketFacts {
            user_id: "u2".into(),
            room_id: "r".into(),
            client: "c1".into(),
            worker: "w1".into(),
            fingerprint: "sha-256 AB".into()
        }
    );
    h.send(2, json!({"type":"request_ticket","target":"w9","fingerprint":"x"}));
    assert_eq!(error_code(&h.last(2)), ErrorCode::PeerNotFound, "a peer of another room");
    h.send(2, json!({"type":"request_ticket","target":"c1","fingerprint":"x"}));
    assert_eq!(error_code(&h.last(2)), ErrorCode::InvalidMessage, "oneself");
    h.send(2, json!({"type":"request_ticket","target":"w1"}));
    assert_eq!(error_code(&h.last(2)), ErrorCode::InvalidMessage, "no fingerprint");
    h.hub.connect(ConnId(4), h.now);
    h.send(4, json!({"type":"request_ticket","target":"w1","fingerprint":"x"}));
    assert_eq!(error_code(&h.last(4)), ErrorCode::NotRegistered);
    assert!(h.tickets.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Cluster mode: several hubs and a model of the broker (the Redis scripts' rules: claims checked
// and broadcast atomically, ownership-checked updates and releases, per-inbox FIFO). The real
// broker is exercised by the server's cluster tests; this checks the hubs' side of the contract
// under every interleaving of inbox deliveries.
// ---------------------------------------------------------------------------------------------

mod cluster_sim {
    use super::*;
    use crate::cluster::{ClusterMsg, PeerAt, PeerUp};
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Broker {
        instances: Vec<u64>,
        /// room → peer → (owner, principal key, stored PeerUp)
        rooms: BTreeMap<String, BTreeMap<String, (PeerAt, String, PeerUp)>>,
        inbox: HashMap<u64, VecDeque<ClusterMsg>>,
        max_peers: usize,
    }

    impl Broker {
        fn bcast(&mut self, m: ClusterMsg) {
            for i in &self.instances {
                self.inbox.entry(*i).or_default().push_back(m.clone());
            }
        }

        fn claim(&mut self, up: PeerUp) -> Result<(), ErrorCode> {
            let room = self.rooms.entry(up.room_id.clone()).or_default();
            match room.get(&up.peer_id) {
                Some((_, key, _)) if *key != up.principal_key() => return Err(ErrorCode::PeerIdTaken),
                None if room.len() >= self.max_peers => return Err(ErrorCode::RoomFull),
                _ => {}
            }
            room.insert(up.peer_id.clone(), (up.at, up.principal_key(), up.clone()));
            self.bcast(ClusterMsg::PeerUp(up));
            Ok(())
        }

        fn owned(&self, room: &str, peer: &str, at: PeerAt) -> bool {
            self.rooms.get(room).and_then(|r| r.get(peer)).is_some_and(|(o, _, _)| *o == at)
        }

        fn apply(&mut self, p: Publish) {
            match p {
                Publish::Update(up) => {
                    if self.owned(&up.room_id, &up.peer_id, up.at) {
                        if let Some(e) = self.rooms.get_mut(&up.room_id).and_then(|r| r.get_mut(&up.peer_id)) {
                            e.2 = (*up).clone();
                        }
                        self.bcast(ClusterMsg::PeerUp(*up));
                    }
                }
                Publish::Release { room_id, peer_id, at, reason } => {
                    if self.owned(&room_id, &peer_id, at) {
                        if let Some(r) = self.rooms.get_mut(&room_id) {
                            r.remove(&peer_id);
                        }
                        self.rooms.retain(|_, r| !r.is_empty());
                        self.bcast(ClusterMsg::PeerDown { room_id, peer_id, at, reason });
                    }
                }
                Publish::Broadcast(m) => self.bcast(m),
                Publish::Forward { instance, msg } => {
                    if self.instances.contains(&instance) {
                        self.inbox.entry(instance).or_default().push_back(msg);
                    }
                }
            }
        }

        fn reap(&mut self, dead: u64) {
            self.instances.retain(|i| *i != dead);
            self.inbox.remove(&dead);
            for r in self.rooms.values_mut() {
                r.retain(|_, (at, _, _)| at.instance != dead);
            }
            self.rooms.retain(|_, r| !r.is_empty());
            self.bcast(ClusterMsg::InstanceDown { instance: dead });
        }
    }

    struct Sim {
        broker: Broker,
        hubs: BTreeMap<u64, Hub>,
        /// conn → instance
        home: HashMap<ConnId, u64>,
        inbox: HashMap<ConnId, Vec<ServerEnvelope>>,
        closed: HashMap<ConnId, u16>,
        now: Millis,
    }

    impl Sim {
        fn new(n: u64, max_peers: usize) -> Sim {
            let mut hubs = BTreeMap::new();
            for i in 1..=n {
                let mut h = Hub::new(Limits { max_peers_per_room: max_peers, ..Limits::default() });
                h.set_cluster(i);
                hubs.insert(i, h);
            }
            let broker = Broker { instances: (1..=n).collect(), max_peers, ..Broker::default() };
            Sim { broker, hubs, home: HashMap::new(), inbox: HashMap::new(), closed: HashMap::new(), now: T0 }
        }

        fn pump(&mut self, i: u64) {
            loop {
                let Some(hub) = self.hubs.get_mut(&i) else { return };
                let Some(o) = hub.poll_output() else { break };
                match o {
                    Output::Send { to, msg } => {
                        for c in to {
                            assert_eq!(self.home.get(&c), Some(&i), "delivery to another instance's conn");
                            assert!(!self.closed.contains_key(&c), "delivery to closed {c:?}: {msg:?}");
                            self.inbox.entry(c).or_default().push((*msg).clone());
                        }
                    }
                    Output::Close { conn, code, .. } => {
                        self.closed.insert(conn, code.code());
                    }
                    Output::Authenticate { conn, request } => {
                        let user = request.peer_id.clone().unwrap_or_default();
                        let user = user.split('-').next().unwrap_or_default().to_owned();
                        let g = grant(request.room_id.as_deref().unwrap_or("r"), &user, &format!("auto-{}", conn.0));
                        hub.complete_register(conn, Ok(g), self.now);
                    }
                    Output::IssueTicket { .. } => {}
                    Output::Claim { conn, up } => {
                        if let Err(code) = self.broker.claim(*up) {
                            hub.complete_claim(conn, SignalError::new(code, "refused"), self.now);
                        }
                    }
                    Output::Publish(p) => self.broker.apply(p),
                }
            }
            if let Some(h) = self.hubs.get(&i) {
                h.check_invariants().unwrap();
            }
        }

        fn deliver_one(&mut self, i: u64) {
            let Some(m) = self.broker.inbox.get_mut(&i).and_then(VecDeque::pop_front) else { return };
            if let Some(h) = self.hubs.get_mut(&i) {
                h.handle_cluster(m, self.now);
            }
            self.pump(i);
        }

        fn settle(&mut self) {
            while let Some(i) = self.broker.inbox.iter().find(|(_, q)| !q.is_empty()).map(|(i, _)| *i) {
                self.deliver_one(i);
            }
        }

        fn text(&mut self, c: ConnId, v: serde_json::Value) {
            let Some(&i) = self.home.get(&c) else { return };
            if let Some(h) = self.hubs.get_mut(&i) {
                h.handle_text(c, &v.to_string(), self.now);
            }
            self.pump(i);
        }

        /// Every live hub holds exactly the broker's view of every room.
        fn check_agreement(&self) {
            for (i, hub) in &self.hubs {
                let mut seen: BTreeMap<String, BTreeMap<String, PeerAt>> = BTreeMap::new();
                for (rid, r) in &self.broker.rooms {
                    for (pid, p) in hub.room_peers(rid) {
                        let at = match p.at {
                            At::Local(c) => PeerAt { instance: *i, conn: c.0 },
                            At::Remote(a) => a,
                        };
                        seen.entry(rid.clone()).or_default().insert(pid.to_owned(), at);
                        let meta: serde_json::Value = serde_json::from_str(&r[pid].2.metadata).unwrap();
                        assert_eq!(serde_json::Value::Object(p.metadata.clone()), meta, "metadata of {pid} on {i}");
                    }
                }
                let want: BTreeMap<String, BTreeMap<String, PeerAt>> = self
                    .broker
                    .rooms
                    .iter()
                    .map(|(r, ps)| (r.clone(), ps.iter().map(|(p, (at, _, _))| (p.clone(), *at)).collect()))
                    .collect();
                assert_eq!(seen, want, "instance {i} disagrees with the broker");
                assert_eq!(
                    hub.stats().registered + hub.stats().remote_peers,
                    want.values().map(|r| r.len()).sum::<usize>()
                );
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Connect { node: u64, user: u8, peer: u8, room: u8 },
        Drop(u8),
        Message { from: u8, to: u8 },
        Update { conn: u8, n: u8 },
        Deliver(u64),
        Crash(u64),
        CloseRoom { node: u64, room: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1..=3u64, 0..3u8, 0..4u8, 0..2u8).prop_map(|(node, user, peer, room)| Op::Connect { node, user, peer, room }),
            1 => any::<u8>().prop_map(Op::Drop),
            2 => (any::<u8>(), 0..4u8).prop_map(|(from, to)| Op::Message { from, to }),
            1 => (any::<u8>(), any::<u8>()).prop_map(|(conn, n)| Op::Update { conn, n }),
            6 => (1..=3u64).prop_map(Op::Deliver),
            1 => (1..=3u64).prop_map(Op::Crash),
            1 => (1..=3u64, 0..2u8).prop_map(|(node, room)| Op::CloseRoom { node, room }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn replicas_agree_with_the_broker_after_any_interleaving(ops in proptest::collection::vec(op(), 1..80)) {
            let mut sim = Sim::new(3, 3);
            let mut conns: Vec<ConnId> = Vec::new();
            let mut next = 1u64;
            let mut crashed = 0;
            for op in ops {
                match op {
                    Op::Connect { node, user, peer, room } => {
                        if !sim.hubs.contains_key(&node) { continue; }
                        let c = ConnId(next);
                        next += 1;
                        sim.home.insert(c, node);
                        if let Some(h) = sim.hubs.get_mut(&node) { h.connect(c, sim.now); }
                        conns.push(c);
                        // The peer id starts with the user, so the grant can name the principal.
                        sim.text(c, json!({"type":"register","jwt":"x","room_id":format!("r{room}"),
                            "peer_id":format!("u{user}-p{peer}")}));
                    }
                    Op::Drop(k) if !conns.is_empty() => {
                        let c = conns[k as usize % conns.len()];
                        if let Some(&i) = sim.home.get(&c) {
                            if let Some(h) = sim.hubs.get_mut(&i) { h.disconnect(c, sim.now); }
                            sim.pump(i);
                        }
                    }
                    Op::Message { from, to } if !conns.is_empty() => {
                        let c = conns[from as usize % conns.len()];
                        sim.text(c, json!({"type":"peer_message","to_peer_id":format!("u{}-p{}", to % 3, to),"payload":{}}));
                    }
                    Op::Update { conn, n } if !conns.is_empty() => {
                        let c = conns[conn as usize % conns.len()];
                        sim.text(c, json!({"type":"update_metadata","metadata":{"properties":{"n":n}}}));
                    }
                    Op::Deliver(i) => sim.deliver_one(i),
                    // Only one crash per run keeps two instances to compare.
                    Op::Crash(i) if crashed == 0 && sim.hubs.remove(&i).is_some() => {
                        crashed += 1;
                        sim.broker.reap(i);
                        for (c, home) in &sim.home {
                            if *home == i { sim.closed.entry(*c).or_insert(1006); }
                        }
                    }
                    Op::CloseRoom { node, room } => {
                        if let Some(h) = sim.hubs.get_mut(&node) { h.close_room(&format!("r{room}"), "deleted", sim.now); }
                        sim.pump(node);
                    }
                    _ => {}
                }
            }
            sim.settle();
            sim.check_agreement();
            // Every peer a client was told about is one the broker has, and every live registered
            // connection got exactly one registered_auth.
            for (c, msgs) in &sim.inbox {
                let auths = msgs.iter().filter(|m| matches!(m.msg, ServerMessage::RegisteredAuth { .. })).count();
                prop_assert!(auths <= 1, "{c:?} registered twice");
            }
        }
    }

    #[test]
    fn presence_across_instances_follows_each_peers_interest() {
        let mut sim = Sim::new(2, 10);
        // Instance 1: a worker and a dashboard; instance 2: a worker, then a client.
        for (c, node, peer, role) in [
            (1u64, 1u64, "u1-w1", "worker"),
            (2, 1, "u2-d", "dashboard"),
            (3, 2, "u3-w2", "worker"),
            (4, 2, "u4-c", "client"),
        ] {
            sim.home.insert(ConnId(c), node);
            sim.hubs.get_mut(&node).unwrap().connect(ConnId(c), sim.now);
            sim.text(ConnId(c), json!({"type":"register","jwt":"x","room_id":"r","peer_id":peer,"role":role}));
            sim.settle();
        }
        // The client's registration went through the broker and kept its interest: workers only.
        assert_eq!(listed(&sim.inbox[&ConnId(4)][0].msg), ["u1-w1", "u3-w2"]);
        assert!(listed(&sim.inbox[&ConnId(3)][0].msg).is_empty());
        let mut got = |c: u64| presence(&sim.inbox.remove(&ConnId(c)).unwrap_or_default());
        assert_eq!(got(1), [], "a worker hears of no one");
        assert_eq!(got(2), [("joined", "u3-w2".to_owned())], "the dashboard hears of the remote worker only");
        assert_eq!(got(3), []);
        assert_eq!(got(4), [], "the client joined last");
        // With a request id, so the updater's own reply is not counted as a push.
        sim.text(
            ConnId(1),
            json!({"type":"update_metadata","request_id":1,"metadata":{"properties":{"status":"busy"}}}),
        );
        sim.settle();
        let mut got = |c: u64| presence(&sim.inbox.remove(&ConnId(c)).unwrap_or_default());
        assert_eq!(got(1), []);
        assert_eq!(got(2), [("updated", "u1-w1".to_owned())]);
        assert_eq!(got(3), []);
        assert_eq!(got(4), [("updated", "u1-w1".to_owned())]);
        sim.hubs.get_mut(&2).unwrap().disconnect(ConnId(4), sim.now);
        sim.pump(2);
        sim.settle();
        sim.hubs.get_mut(&2).unwrap().disconnect(ConnId(3), sim.now);
        sim.pump(2);
        sim.settle();
        let mut got = |c: u64| presence(&sim.inbox.remove(&ConnId(c)).unwrap_or_default());
        assert_eq!(got(1), []);
        assert_eq!(got(2), [("left", "u3-w2".to_owned())], "the client's leaving is not the dashboard's business");
        sim.check_agreement();
    }

    #[test]
    fn a_message_to_a_peer_on_another_instance_is_forwarded_and_delivered() {
        let mut sim = Sim::new(2, 10);
        for (c, node, peer) in [(1u64, 1u64, "u1-a"), (2, 2, "u2-b")] {
            sim.home.insert(ConnId(c), node);
            sim.hubs.get_mut(&node).unwrap().connect(ConnId(c), sim.now);
            sim.text(ConnId(c), json!({"type":"register","jwt":"x","room_id":"r","peer_id":peer}));
            sim.settle();
        }
        sim.inbox.clear();
        sim.text(ConnId(1), json!({"type":"peer_message","to_peer_id":"u2-b","payload":{"k":1},"request_id":5}));
        assert!(!sim.inbox.contains_key(&ConnId(2)), "not delivered before the broker forwards it");
        sim.settle();
        let got = &sim.inbox[&ConnId(2)];
        assert_eq!(got.len(), 1);
        assert!(matches!(&got[0].msg, ServerMessage::PeerMessage { from_peer_id, .. } if from_peer_id == "u1-a"));
        assert!(matches!(sim.inbox[&ConnId(1)][0].msg, ServerMessage::Ack {}));
        // The same principal taking u2-b over on instance 1 closes the old connection on 2.
        sim.home.insert(ConnId(3), 1);
        sim.hubs.get_mut(&1).unwrap().connect(ConnId(3), sim.now);
        sim.text(ConnId(3), json!({"type":"register","jwt":"x","room_id":"r","peer_id":"u2-b"}));
        sim.settle();
        assert_eq!(sim.closed.get(&ConnId(2)), Some(&CloseCode::Superseded.code()));
        sim.check_agreement();
    }
}
