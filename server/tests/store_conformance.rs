//! One behaviour for every storage backend: the same suite runs against the embedded SQLite store
//! and against the DynamoDB store on a real moto server (127.0.0.1), including what differs most
//! between them: conditional creates, single-use invites under concurrency, listings that span
//! several DynamoDB pages and batches, and room deletion with more dependents than one DynamoDB
//! transaction holds.

mod common;

use std::sync::Arc;

use sleap_rtc_server::store::dynamo::{DynamoStore, DynamoUrl};
use sleap_rtc_server::store::*;

fn room(id: &str, owner: &str, created: i64, expires: Option<i64>) -> (Room, Membership) {
    (
        Room {
            id: id.into(),
            name: format!("room {id}"),
            created_by: owner.into(),
            token_hash: format!("th-{id}"),
            created_at: created,
            expires_at: expires,
        },
        Membership {
            user_id: owner.into(),
            room_id: id.into(),
            role: Role::Owner,
            invited_by: None,
            joined_at: created,
        },
    )
}

fn member(room: &str, user: &str, at: i64) -> Membership {
    Membership {
        user_id: user.into(),
        room_id: room.into(),
        role: Role::Member,
        invited_by: Some("o".into()),
        joined_at: at,
    }
}

fn token(id: &str, user: &str, room: &str, created: i64) -> WorkerToken {
    WorkerToken {
        id: id.into(),
        secret_hash: format!("sh-{id}"),
        user_id: user.into(),
        room_id: room.into(),
        worker_name: format!("w-{id}"),
        created_at: created,
        expires_at: Some(created + 100),
        revoked_at: None,
    }
}

fn key(id: &str, user: &str, created: i64) -> AccountKey {
    AccountKey {
        id: id.into(),
        secret_hash: format!("kh-{id}"),
        user_id: user.into(),
        name: format!("key {id}"),
        created_at: created,
        expires_at: None,
    }
}

async fn conformance(s: Arc<dyn Store>) {
    s.health().await.unwrap();

    // Users.
    let u = User { id: "o".into(), username: "owner".into(), created_at: 5 };
    s.put_user(&u).await.unwrap();
    assert!(matches!(s.put_user(&u).await, Err(StoreError::Conflict)), "users are not overwritten");
    assert_eq!(s.get_user("o").await.unwrap(), Some(u.clone()));
    assert_eq!(s.get_user("nobody").await.unwrap(), None);

    // Rooms: conditional create, no phantom updates, expiry set and cleared.
    let (r1, m1) = room("r1", "o", 10, Some(4_000_000_000));
    s.create_room(&r1, &m1).await.unwrap();
    assert!(matches!(s.create_room(&r1, &m1).await, Err(StoreError::Conflict)));
    assert_eq!(s.get_room("r1").await.unwrap(), Some(r1.clone()));
    assert_eq!(s.get_room("nope").await.unwrap(), None);
    assert_eq!(s.update_room("nope", Some("x"), None).await.unwrap(), None, "no phantom rooms");
    assert_eq!(s.get_room("nope").await.unwrap(), None);
    let renamed = s.update_room("r1", Some("lab"), Some(Some(4_100_000_000))).await.unwrap().unwrap();
    assert_eq!((renamed.name.as_str(), renamed.expires_at), ("lab", Some(4_100_000_000)));
    let forever = s.update_room("r1", None, Some(None)).await.unwrap().unwrap();
    assert_eq!((forever.name.as_str(), forever.expires_at), ("lab", None));
    // A room that expired a moment ago is still readable, listed as expired, and no purge
    // deletes it yet (a week later DynamoDB's TTL does, and for SQLite the server's sweep).
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (old, old_m) = room("old", "o", 11, Some(now - 100));
    s.create_room(&old, &old_m).await.unwrap();
    assert_eq!(s.purge_expired_rooms(now, 100).await.unwrap(), 0);
    assert!(s.get_room("old").await.unwrap().unwrap().is_expired(now));

    // Memberships.
    assert!(s.add_member(&member("r1", "m", 20)).await.unwrap());
    assert!(!s.add_member(&member("r1", "m", 21)).await.unwrap(), "already a member");
    assert_eq!(s.get_member("r1", "m").await.unwrap().unwrap().joined_at, 20);
    assert_eq!(s.get_member("r1", "x").await.unwrap(), None);
    let listed = s.list_members("r1").await.unwrap();
    assert_eq!(listed.iter().map(|(m, _)| m.user_id.as_str()).collect::<Vec<_>>(), ["o", "m"], "by join time");
    assert_eq!(listed[0].1.as_ref().map(|u| u.username.as_str()), Some("owner"));
    assert_eq!(listed[1].1, None, "a member without a user row is listed without one");
    let mine = s.list_user_rooms("o").await.unwrap();
    assert_eq!(mine.iter().map(|(_, r)| r.id.as_str()).collect::<Vec<_>>(), ["old", "r1"], "newest first");
    assert!(s.remove_member("r1", "m").await.unwrap());
    assert!(!s.remove_member("r1", "m").await.unwrap());

    // Worker tokens: found by secret hash at once, listed per user and room, revoked once.
    let t1 = token("t1", "o", "r1", 30);
    let t2 = token("t2", "o", "old", 31);
    s.put_worker_token(&t1).await.unwrap();
    s.put_worker_token(&t2).await.unwrap();
    assert!(matches!(s.put_worker_token(&t1).await, Err(StoreError::Conflict)));
    assert_eq!(s.find_worker_token("sh-t1").await.unwrap(), Some(t1.clone()));
    assert_eq!(s.find_worker_token("kh-none").await.unwrap(), None);
    assert_eq!(s.get_worker_token("t2").await.unwrap(), Some(t2.clone()));
    let ids = |v: Vec<WorkerToken>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(s.list_worker_tokens("o", None).await.unwrap()), ["t2", "t1"], "newest first");
    assert_eq!(ids(s.list_worker_tokens("o", Some("r1")).await.unwrap()), ["t1"]);
    assert!(s.list_worker_tokens("m", None).await.unwrap().is_empty());
    assert!(s.revoke_worker_token("t1", 40).await.unwrap());
    assert!(!s.revoke_worker_token("t1", 41).await.unwrap(), "revoked once");
    assert!(!s.revoke_worker_token("nope", 41).await.unwrap());
    assert_eq!(s.get_worker_token("t1").await.unwrap().unwrap().revoked_at, Some(40));
    assert!(s.delete_worker_token("t2").await.unwrap());
    assert!(!s.delete_worker_token("t2").await.unwrap());
    assert_eq!(s.find_worker_token("sh-t2").await.unwrap(), None, "its secret goes with it");

    // Account keys: a key is not a token and vice versa; only the owner deletes.
    let k1 = key("k1", "o", 50);
    s.put_account_key(&k1).await.unwrap();
    s.put_account_key(&key("k2", "o", 51)).await.unwrap();
    assert_eq!(s.find_account_key("kh-k1").await.unwrap(), Some(k1.clone()));
    assert_eq!(s.find_account_key("sh-t1").await.unwrap(), None, "a token's hash finds no key");
    assert_eq!(s.find_worker_token("kh-k1").await.unwrap(), None, "a key's hash finds no token");
    let keys: Vec<String> = s.list_account_keys("o").await.unwrap().into_iter().map(|k| k.id).collect();
    assert_eq!(keys, ["k2", "k1"]);
    assert!(!s.delete_account_key("m", "k1").await.unwrap(), "not yours");
    assert!(s.delete_account_key("o", "k1").await.unwrap());
    assert_eq!(s.find_account_key("kh-k1").await.unwrap(), None);

    // Public keys: unique among users, idempotent for their user, capped, and a room's are its
    // current members'.
    let pk = |id: &str, user: &str, key: &str, at: i64| PublicKey {
        id: id.into(),
        user_id: user.into(),
        public_key: key.into(),
        device_name: format!("dev {id}"),
        created_at: at,
    };
    assert_eq!(s.add_public_key(&pk("p1", "o", "K1", 70), 3).await.unwrap(), AddedKey::Created);
    assert_eq!(
        s.add_public_key(&pk("p1b", "o", "K1", 71), 3).await.unwrap(),
        AddedKey::Existing(pk("p1", "o", "K1", 70)),
        "the stored record, unchanged"
    );
    assert_eq!(s.add_public_key(&pk("p9", "m", "K1", 72), 3).await.unwrap(), AddedKey::TakenByOther);
    assert_eq!(s.add_public_key(&pk("p2", "o", "K2", 73), 3).await.unwrap(), AddedKey::Created);
    assert_eq!(s.add_public_key(&pk("p3", "o", "K3", 74), 3).await.unwrap(), AddedKey::Created);
    assert_eq!(s.add_public_key(&pk("p4", "o", "K4", 75), 3).await.unwrap(), AddedKey::LimitReached);
    assert_eq!(
        s.add_public_key(&pk("p2b", "o", "K2", 76), 3).await.unwrap(),
        AddedKey::Existing(pk("p2", "o", "K2", 73))
    );
    let pids = |v: Vec<PublicKey>| v.into_iter().map(|k| k.id).collect::<Vec<_>>();
    assert_eq!(pids(s.list_public_keys("o").await.unwrap()), ["p3", "p2", "p1"], "newest first");
    assert!(s.list_public_keys("m").await.unwrap().is_empty());
    assert_eq!(s.add_public_key(&pk("p5", "m", "M1", 77), 3).await.unwrap(), AddedKey::Created);
    let room_keys = |v: Vec<(PublicKey, Option<User>)>| {
        v.into_iter().map(|(k, u)| (k.id, u.map(|u| u.username))).collect::<Vec<_>>()
    };
    let owners = vec![
        ("p1".to_owned(), Some("owner".to_owned())),
        ("p2".into(), Some("owner".into())),
        ("p3".into(), Some("owner".into())),
    ];
    assert_eq!(room_keys(s.room_public_keys("r1").await.unwrap()), owners, "m was removed from r1 above");
    assert!(s.add_member(&member("r1", "m", 80)).await.unwrap());
    let mut with_m = owners.clone();
    with_m.push(("p5".into(), None));
    assert_eq!(room_keys(s.room_public_keys("r1").await.unwrap()), with_m, "by join time, then key age");
    assert!(s.remove_member("r1", "m").await.unwrap());
    assert_eq!(room_keys(s.room_public_keys("r1").await.unwrap()), owners, "removal takes effect at once");
    assert!(s.room_public_keys("nope").await.unwrap().is_empty());
    assert!(!s.delete_public_key("m", "p1").await.unwrap(), "not yours");
    assert!(s.delete_public_key("o", "p1").await.unwrap());
    assert!(!s.delete_public_key("o", "p1").await.unwrap());
    assert_eq!(pids(s.list_public_keys("o").await.unwrap()), ["p3", "p2"]);
    assert_eq!(s.add_public_key(&pk("p6", "m", "K1", 81), 3).await.unwrap(), AddedKey::Created, "K1 is free again");
    // Concurrent writers: one key claimed by one of several users; one user's cap holds.
    let racers: Vec<_> = (0..6)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.add_public_key(&pk(&format!("race{i}"), &format!("ru{i}"), "KR", 90), 3).await.unwrap()
            })
        })
        .collect();
    let mut created = 0;
    for r in racers {
        match r.await.unwrap() {
            AddedKey::Created => created += 1,
            other => assert_eq!(other, AddedKey::TakenByOther),
        }
    }
    assert_eq!(created, 1, "exactly one user gets a contested key");
    let racers: Vec<_> = (0..6)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.add_public_key(&pk(&format!("cap{i}"), "capped", &format!("KC{i}"), 91), 4).await.unwrap()
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for r in racers {
        outcomes.push(r.await.unwrap());
    }
    assert_eq!(outcomes.iter().filter(|o| **o == AddedKey::Created).count(), 4, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| **o == AddedKey::LimitReached).count(), 2, "{outcomes:?}");
    assert_eq!(s.list_public_keys("capped").await.unwrap().len(), 4);

    // Invites: single use, expire, never overwritten, one winner under concurrency.
    let inv = |code: &str, exp: i64| Invite {
        code_hash: code.into(),
        room_id: "r1".into(),
        created_by: "o".into(),
        expires_at: exp,
    };
    s.put_invite(&inv("a", 4_000_000_000)).await.unwrap();
    assert!(matches!(s.put_invite(&inv("a", 4_000_000_000)).await, Err(StoreError::Conflict)));
    s.put_invite(&inv("b", 100)).await.unwrap();
    assert_eq!(s.take_invite("a", 200).await.unwrap(), Some(inv("a", 4_000_000_000)));
    assert_eq!(s.take_invite("a", 200).await.unwrap(), None, "single use");
    assert_eq!(s.take_invite("b", 200).await.unwrap(), None, "expired");
    s.put_invite(&inv("c", 4_000_000_000)).await.unwrap();
    let takers: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.take_invite("c", 300).await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for t in takers {
        winners += usize::from(t.await.unwrap().is_some());
    }
    assert_eq!(winners, 1, "exactly one concurrent taker gets the invite");

    // Big listings: more rooms than one batch read, more dependents than one transaction.
    for i in 0..130 {
        let (r, m) = room(&format!("big{i:03}"), "o", 100 + i, None);
        s.create_room(&r, &m).await.unwrap();
    }
    assert_eq!(s.list_user_rooms("o").await.unwrap().len(), 132);
    let (big, big_m) = room("crowded", "o", 1000, None);
    s.create_room(&big, &big_m).await.unwrap();
    for i in 0..120 {
        assert!(s.add_member(&member("crowded", &format!("u{i:03}"), 1001 + i)).await.unwrap());
    }
    s.put_worker_token(&token("tc", "o", "crowded", 60)).await.unwrap();
    s.put_invite(&Invite {
        code_hash: "d".into(),
        room_id: "crowded".into(),
        created_by: "o".into(),
        expires_at: 4_000_000_000,
    })
    .await
    .unwrap();
    assert_eq!(s.list_members("crowded").await.unwrap().len(), 121);

    // More members than one batch read; only the owner has keys (p2, p3).
    assert_eq!(s.room_public_keys("crowded").await.unwrap().len(), 2);

    // Deletion takes every dependent along.
    assert!(s.delete_room("crowded").await.unwrap());
    assert!(!s.delete_room("crowded").await.unwrap());
    assert_eq!(s.get_room("crowded").await.unwrap(), None);
    assert!(s.list_members("crowded").await.unwrap().is_empty());
    assert_eq!(s.get_member("crowded", "u007").await.unwrap(), None);
    assert_eq!(s.get_worker_token("tc").await.unwrap(), None);
    assert_eq!(s.find_worker_token("sh-tc").await.unwrap(), None);
    assert_eq!(s.take_invite("d", 0).await.unwrap(), None);
    assert!(s.list_user_rooms("u007").await.unwrap().is_empty());
    assert!(s.room_public_keys("crowded").await.unwrap().is_empty(), "a deleted room shows no keys");
}

#[tokio::test]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
    conformance(Arc::new(s)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_store_conforms() {
    let moto = common::Moto::start().await;
    let url = DynamoUrl::parse(&format!("dynamodb://sleap-test?endpoint={}&region=us-east-1", moto.url)).unwrap();
    // moto accepts any credentials, but the SDK signs with some.
    let s = DynamoStore::connect_with_static_credentials(&url, "testing", "testing").await;
    s.init().await.unwrap();
    s.init().await.expect("init is idempotent");
    conformance(Arc::new(s)).await;
}

/// The server binary on DynamoDB: refuses to start on missing tables unless told to create
/// them, creates them, keeps everything there (no SQLite file appears), and a restart finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_binary_runs_on_dynamodb() {
    use common::{ServerProcess, Ws};
    use serde_json::json;
    let moto = common::Moto::start().await;
    let store = format!("dynamodb://bin?endpoint={}&region=us-east-1", moto.url);
    let aws =
        [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_EC2_METADATA_DISABLED", "true")];

    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sleap-rtc-server"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--store", &store])
        .envs(aws)
        .output()
        .unwrap();
    assert!(!out.status.success(), "started without tables");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--store-init"), "{err}");

    let s = ServerProcess::spawn_with(&["--store", &store, "--store-init"], "warn", &aws).await;
    let (jwt, room) = s.signin_and_room().await;
    let mut w = Ws::connect(&s.ws_url()).await;
    w.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "w"})).await;
    assert!(!s.dir.path().join("sleap-rtc.sqlite").exists(), "nothing went to SQLite");
    drop(w);

    // Same data dir (the signing key), no --store-init: the room is still there.
    let dir = s.stop();
    let s = ServerProcess::spawn_in(dir, &["--store", &store], "warn", &aws).await;
    let rooms = s.json("GET", "/api/auth/rooms", Some(&jwt), None).await;
    assert_eq!(rooms["rooms"][0]["room_id"], room, "{rooms}");
    let mut w = Ws::connect(&s.ws_url()).await;
    w.register(json!({"type": "register", "jwt": jwt, "room_id": room, "peer_id": "w"})).await;
}
