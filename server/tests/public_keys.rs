//! Users' Ed25519 public keys (`/api/auth/public-keys`, what upstream's `sleap-rtc login`
//! registers) and the list a worker fetches to check a client's signature
//! (`GET /api/rooms/{id}/authorized-keys`), plus upstream's `room list` query parameters: a real
//! server over real HTTP, every scenario on both storage backends (SQLite, and DynamoDB on a
//! real moto server).

mod common;

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use common::*;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde_json::{Value, json};
use sleap_rtc_server::store::dynamo::{DynamoStore, DynamoUrl};

/// A device's key pair from a seed; the public half as upstream sends it (no padding).
fn device(seed: u8) -> (SigningKey, String) {
    let sk = SigningKey::from_bytes(&[seed; 32]);
    let public = URL_SAFE_NO_PAD.encode(sk.verifying_key().to_bytes());
    (sk, public)
}

async fn register(s: &TestServer, bearer: &str, public_key: &str, device_name: &str) -> (u16, Value) {
    s.call(
        "POST",
        "/api/auth/public-keys",
        Some(bearer),
        Some(json!({"public_key": public_key, "device_name": device_name})),
    )
    .await
}

async fn my_keys(s: &TestServer, bearer: &str) -> Vec<Value> {
    let v = s.ok("GET", "/api/auth/public-keys", Some(bearer), None).await;
    v["public_keys"].as_array().cloned().unwrap_or_default()
}

async fn authorized(s: &TestServer, room: &str, bearer: Option<&str>) -> (u16, Value) {
    s.call("GET", &format!("/api/rooms/{room}/authorized-keys"), bearer, None).await
}

/// The public keys of an authorized-keys answer, sorted.
fn listed_keys(v: &Value) -> Vec<String> {
    let mut keys: Vec<String> = v["authorized_keys"]
        .as_array()
        .map(|a| a.iter().filter_map(|k| k["public_key"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

async fn key_round_trip_and_idempotence(s: &TestServer) {
    let (jwt, user_id) = s.signin().await;
    let (_, public) = device(1);
    // Padding is optional on the way in; the stored spelling has none.
    let padded = URL_SAFE.encode(URL_SAFE_NO_PAD.decode(&public).unwrap());
    assert!(padded.ends_with('='));
    let (st, created) = register(s, &jwt, &padded, "gui").await;
    assert_eq!(st, 201, "{created}");
    assert_eq!(created["public_key"], public.as_str());
    assert_eq!(created["device_name"], "gui");
    let key_id = created["key_id"].as_str().unwrap().to_owned();
    assert!(created["created_at"].as_i64().unwrap() > 1_600_000_000);

    // The same key again (as upstream sends it on every login): 200 with the record unchanged.
    let (st, again) = register(s, &jwt, &public, "cli").await;
    assert_eq!(st, 200, "{again}");
    assert_eq!(again, created, "idempotent: same id, device name and time");
    assert_eq!(my_keys(s, &jwt).await, vec![created.clone()]);

    // An account key of the same user is as good a bearer; the device name is optional.
    let acct = s.ok("POST", "/api/auth/account-keys", Some(&jwt), Some(json!({"name": "box"}))).await;
    let acct = acct["key_id"].as_str().unwrap().to_owned();
    let (_, second) = device(2);
    let (st, v) = s.call("POST", "/api/auth/public-keys", Some(&acct), Some(json!({"public_key": second}))).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["device_name"], "default");
    let listed = my_keys(s, &acct).await;
    assert_eq!(listed.len(), 2);
    assert_eq!(
        sorted(listed.iter().map(|k| k["public_key"].as_str().unwrap().to_owned()).collect()),
        sorted(vec![public.clone(), second.clone()])
    );

    // Only the owner deletes; then it is gone, once.
    let (other, _) = s.signin().await;
    let (st, v) = s.call("DELETE", &format!("/api/auth/public-keys/{key_id}"), Some(&other), None).await;
    assert_eq!((st, v["code"].as_str()), (404, Some("NOT_FOUND")), "{v}");
    assert!(my_keys(s, &other).await.is_empty());
    let v = s.ok("DELETE", &format!("/api/auth/public-keys/{key_id}"), Some(&jwt), None).await;
    assert_eq!(v["deleted"], key_id.as_str());
    let (st, _) = s.call("DELETE", &format!("/api/auth/public-keys/{key_id}"), Some(&jwt), None).await;
    assert_eq!(st, 404);
    let left = my_keys(s, &jwt).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["public_key"], second.as_str());
    // A deleted key can be registered again (as a new record).
    let (st, v) = register(s, &jwt, &public, "gui").await;
    assert_eq!(st, 201, "{v}");
    assert_ne!(v["key_id"], key_id.as_str());

    // Without credentials: 401, like every /api/auth endpoint.
    let (st, _) = s.call("GET", "/api/auth/public-keys", None, None).await;
    assert_eq!(st, 401);
    let (st, _) = s.call("POST", "/api/auth/public-keys", Some("garbage"), Some(json!({"public_key": public}))).await;
    assert_eq!(st, 401);
    let _ = user_id;
}

async fn a_key_of_another_user_is_refused(s: &TestServer) {
    let (alice, _) = s.signin().await;
    let (mallory, _) = s.signin().await;
    let (_, public) = device(3);
    assert_eq!(register(s, &alice, &public, "laptop").await.0, 201);
    let (st, v) = register(s, &mallory, &public, "laptop").await;
    assert_eq!((st, v["code"].as_str()), (409, Some("CONFLICT")), "{v}");
    assert!(v["detail"].as_str().unwrap().contains("another user"), "{v}");
    assert!(my_keys(s, &mallory).await.is_empty());
    assert_eq!(my_keys(s, &alice).await.len(), 1);
}

/// Bytes that are not the encoding of any point of the curve.
fn not_a_point() -> [u8; 32] {
    (0u8..=255)
        .map(|i| {
            let mut b = [0u8; 32];
            b[0] = i;
            b[31] = 0x40;
            b
        })
        .find(|b| VerifyingKey::from_bytes(b).is_err())
        .expect("about half of all y coordinates are not on the curve")
}

async fn malformed_keys_are_refused(s: &TestServer) {
    let (jwt, _) = s.signin().await;
    let (_, good) = device(4);
    // The last character of 32 bytes carries 4 bits; a set low bit is not canonical base64.
    let mut trailing = good.clone();
    let last = trailing.pop().unwrap();
    let idx = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".iter().position(|c| *c == last as u8);
    let odd = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[(idx.unwrap() | 1) % 64] as char;
    trailing.push(odd);
    let standard = good.replace('-', "+").replace('_', "/");
    let mut identity = [0u8; 32];
    identity[0] = 1; // y = 1: the neutral element, of order 1
    let cases: Vec<(String, &str)> = vec![
        ("not base64 at all!".into(), "base64"),
        (String::new(), "0 bytes"),
        (URL_SAFE_NO_PAD.encode([7u8; 31]), "31 bytes"),
        (URL_SAFE_NO_PAD.encode([7u8; 33]), "33 bytes"),
        (URL_SAFE_NO_PAD.encode([7u8; 64]), "too long"),
        (URL_SAFE_NO_PAD.encode(not_a_point()), "curve"),
        (URL_SAFE_NO_PAD.encode(identity), "weak"),
        (format!("{}={}", &good[..10], &good[11..]), "base64"),
    ];
    let mut cases = cases;
    if trailing != good {
        cases.push((trailing, "base64"));
    }
    if standard != good {
        cases.push((standard, "base64"));
    }
    for (key, why) in &cases {
        let (st, v) = register(s, &jwt, key, "gui").await;
        assert_eq!((st, v["code"].as_str()), (400, Some("INVALID_PUBLIC_KEY")), "{key:?}: {v}");
        assert!(v["detail"].as_str().unwrap().contains(why), "{key:?}: {v}");
    }
    // Body validation as elsewhere in the API: 422.
    let (st, v) = register(s, &jwt, &good, "bad\u{7}name").await;
    assert_eq!((st, v["code"].as_str()), (422, Some("INVALID_BODY")), "{v}");
    let (st, _) = register(s, &jwt, &good, &"x".repeat(65)).await;
    assert_eq!(st, 422);
    let (st, _) = s.call("POST", "/api/auth/public-keys", Some(&jwt), Some(json!({"device_name": "gui"}))).await;
    assert_eq!(st, 422);
    let (st, _) = s.call("POST", "/api/auth/public-keys", Some(&jwt), Some(json!({"public_key": 5}))).await;
    assert_eq!(st, 422);
    assert!(my_keys(s, &jwt).await.is_empty(), "nothing was stored");
    // The longest device name is fine.
    assert_eq!(register(s, &jwt, &good, &"é".repeat(64)).await.0, 201);
}

async fn each_user_has_at_most_32_keys(s: &TestServer) {
    let (jwt, _) = s.signin().await;
    for seed in 0..32u8 {
        let (st, v) = register(s, &jwt, &device(100 + seed).1, "d").await;
        assert_eq!(st, 201, "{v}");
    }
    let (st, v) = register(s, &jwt, &device(200).1, "d").await;
    assert_eq!((st, v["code"].as_str()), (409, Some("TOO_MANY_KEYS")), "{v}");
    assert!(v["detail"].as_str().unwrap().contains("32"), "{v}");
    // Re-registering one it has is still fine; deleting one makes room.
    let (st, existing) = register(s, &jwt, &device(100).1, "d").await;
    assert_eq!(st, 200);
    s.ok("DELETE", &format!("/api/auth/public-keys/{}", existing["key_id"].as_str().unwrap()), Some(&jwt), None).await;
    assert_eq!(register(s, &jwt, &device(200).1, "d").await.0, 201);
    assert_eq!(my_keys(s, &jwt).await.len(), 32);
}

async fn authorized_keys_with_a_worker_token_list_the_members_keys(s: &TestServer) {
    let (owner, owner_id) = s.signin().await;
    let (member, member_id) = s.signin().await;
    let (outsider, _) = s.signin().await;
    let (room, _) = s.room(&owner).await;
    s.join(&owner, &member, &room).await;
    let (_, owner_key) = device(10);
    let (member_sk, member_laptop) = device(11);
    let (_, member_desktop) = device(12);
    let (_, outsider_key) = device(13);
    register(s, &owner, &owner_key, "gui").await;
    register(s, &member, &member_laptop, "laptop").await;
    register(s, &member, &member_desktop, "desktop").await;
    register(s, &outsider, &outsider_key, "cli").await;
    let (token, _) = s.worker_token(&owner, &room, "gpu-box").await;

    let (st, v) = authorized(s, &room, Some(&token)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(listed_keys(&v), sorted(vec![owner_key.clone(), member_laptop.clone(), member_desktop.clone()]));
    let entries = v["authorized_keys"].as_array().unwrap();
    let laptop = entries.iter().find(|k| k["public_key"] == member_laptop.as_str()).unwrap();
    assert_eq!(laptop["user_id"], member_id.as_str());
    assert_eq!(laptop["device_name"], "laptop");
    let me = s.ok("GET", "/api/auth/me", Some(&member), None).await;
    assert_eq!(laptop["username"], me["username"]);
    assert!(entries.iter().any(|k| k["user_id"] == owner_id.as_str()));

    // What a worker does with it: a signature over its challenge by any listed key passes.
    let nonce = "kJ3q1mO0sY7lX2cVb8nA5dE6fG9hI4jK0lM1nO2pQ3r";
    let sig = member_sk.sign(nonce.as_bytes());
    let accepted = entries.iter().any(|k| {
        let raw = URL_SAFE_NO_PAD.decode(k["public_key"].as_str().unwrap()).unwrap();
        let vk = VerifyingKey::from_bytes(&raw.try_into().unwrap()).unwrap();
        vk.verify(nonce.as_bytes(), &sig).is_ok()
    });
    assert!(accepted);

    // A member's JWT or account key reads the same list; others cannot.
    let (st, by_member) = authorized(s, &room, Some(&member)).await;
    assert_eq!((st, listed_keys(&by_member)), (200, listed_keys(&v)));
    let acct = s.ok("POST", "/api/auth/account-keys", Some(&owner), None).await;
    let (st, by_key) = authorized(s, &room, acct["key_id"].as_str()).await;
    assert_eq!((st, listed_keys(&by_key)), (200, listed_keys(&v)));
    let (st, e) = authorized(s, &room, Some(&outsider)).await;
    assert_eq!((st, e["code"].as_str()), (404, Some("NOT_FOUND")), "a non-member: {e}");
    let (st, e) = authorized(s, &room, None).await;
    assert_eq!((st, e["code"].as_str()), (401, Some("UNAUTHORIZED")), "{e}");
    let (st, _) = authorized(s, "no-such-room", Some(&owner)).await;
    assert_eq!(st, 404);
    // A worker token is good for its own room only.
    let (other_room, _) = s.room(&owner).await;
    let (st, e) = authorized(s, &other_room, Some(&token)).await;
    assert_eq!((st, e["code"].as_str()), (403, Some("FORBIDDEN")), "{e}");
    let (st, other) = authorized(s, &other_room, Some(&owner)).await;
    assert_eq!((st, listed_keys(&other)), (200, vec![owner_key.clone()]), "only the owner is a member there");
}

async fn a_revoked_token_is_refused(s: &TestServer) {
    let (owner, _) = s.signin().await;
    let (room, _) = s.room(&owner).await;
    register(s, &owner, &device(20).1, "gui").await;
    let (token, token_id) = s.worker_token(&owner, &room, "w").await;
    assert_eq!(authorized(s, &room, Some(&token)).await.0, 200);
    s.ok("DELETE", &format!("/api/auth/token/{token_id}"), Some(&owner), None).await;
    let (st, e) = authorized(s, &room, Some(&token)).await;
    assert_eq!((st, e["detail"].as_str()), (401, Some("Token revoked")), "{e}");
    s.ok("DELETE", &format!("/api/auth/tokens/{token_id}"), Some(&owner), None).await;
    let (st, e) = authorized(s, &room, Some(&token)).await;
    assert_eq!((st, e["detail"].as_str()), (401, Some("Invalid worker token")), "a deleted token: {e}");
    let (st, _) = authorized(s, &room, Some("slp_not-a-token-of-this-server")).await;
    assert_eq!(st, 401);
    // A revoked account key likewise.
    let acct = s.ok("POST", "/api/auth/account-keys", Some(&owner), None).await;
    let secret = acct["key_id"].as_str().unwrap();
    assert_eq!(authorized(s, &room, Some(secret)).await.0, 200);
    s.ok("DELETE", &format!("/api/auth/account-keys/{}", acct["id"].as_str().unwrap()), Some(&owner), None).await;
    assert_eq!(authorized(s, &room, Some(secret)).await.0, 401);
}

async fn a_removed_members_keys_disappear(s: &TestServer) {
    let (owner, _) = s.signin().await;
    let (member, member_id) = s.signin().await;
    let (leaver, leaver_id) = s.signin().await;
    let (room, _) = s.room(&owner).await;
    s.join(&owner, &member, &room).await;
    s.join(&owner, &leaver, &room).await;
    let (_, owner_key) = device(30);
    let (_, member_key) = device(31);
    let (_, leaver_key) = device(32);
    register(s, &owner, &owner_key, "gui").await;
    let (_, mk) = register(s, &member, &member_key, "gui").await;
    register(s, &leaver, &leaver_key, "gui").await;
    let (token, _) = s.worker_token(&owner, &room, "w").await;
    let keys = |v: (u16, Value)| {
        assert_eq!(v.0, 200, "{}", v.1);
        listed_keys(&v.1)
    };
    assert_eq!(keys(authorized(s, &room, Some(&token)).await).len(), 3);

    // Removed by the owner, or left: gone from the next fetch.
    s.ok("DELETE", &format!("/api/auth/rooms/{room}/members/{member_id}"), Some(&owner), None).await;
    assert_eq!(keys(authorized(s, &room, Some(&token)).await), sorted(vec![owner_key.clone(), leaver_key.clone()]));
    s.ok("DELETE", &format!("/api/auth/rooms/{room}/members/{leaver_id}"), Some(&leaver), None).await;
    assert_eq!(keys(authorized(s, &room, Some(&token)).await), vec![owner_key.clone()]);
    // The removed member's key still exists (it is theirs), it just authorizes nothing here.
    assert_eq!(my_keys(s, &member).await.len(), 1);
    // Back in through a new invite: listed again.
    s.join(&owner, &member, &room).await;
    assert_eq!(keys(authorized(s, &room, Some(&token)).await), sorted(vec![owner_key.clone(), member_key.clone()]));
    // A deleted key is gone from the next fetch too.
    s.ok("DELETE", &format!("/api/auth/public-keys/{}", mk["key_id"].as_str().unwrap()), Some(&member), None).await;
    assert_eq!(keys(authorized(s, &room, Some(&token)).await), vec![owner_key.clone()]);

    // A token whose creator left the room reads nothing (as at registration).
    let (member_token, _) = s.worker_token(&member, &room, "m").await;
    assert_eq!(authorized(s, &room, Some(&member_token)).await.0, 200);
    s.ok("DELETE", &format!("/api/auth/rooms/{room}/members/{member_id}"), Some(&member), None).await;
    let (st, e) = authorized(s, &room, Some(&member_token)).await;
    assert_eq!(st, 403, "{e}");

    // A deleted room: its tokens went with it, and its members' credentials find no room.
    s.ok("DELETE", &format!("/api/auth/rooms/{room}"), Some(&owner), None).await;
    assert_eq!(authorized(s, &room, Some(&token)).await.0, 401);
    assert_eq!(authorized(s, &room, Some(&owner)).await.0, 404);
}

async fn room_list_takes_upstreams_query_parameters(s: &TestServer) {
    let (me, _) = s.signin().await;
    let (other, _) = s.signin().await;
    let mut ids = std::collections::HashMap::new();
    for name in ["beta lab", "Alpha", "gamma"] {
        let v = s.ok("POST", "/api/auth/rooms", Some(&me), Some(json!({"name": name}))).await;
        ids.insert(name.to_owned(), v["room_id"].as_str().unwrap().to_owned());
    }
    // A room I am only a member of, expiring soonest.
    let v =
        s.ok("POST", "/api/auth/rooms", Some(&other), Some(json!({"name": "delta LAB", "expires_in_days": 1}))).await;
    let delta = v["room_id"].as_str().unwrap().to_owned();
    s.join(&other, &me, &delta).await;
    let names = |v: &Value| -> Vec<String> {
        v["rooms"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect()
    };
    let list = |q: &'static str| {
        let me = me.clone();
        async move { s.ok("GET", &format!("/api/auth/rooms{q}"), Some(&me), None).await }
    };
    let all = list("?sort_by=name&sort_order=asc").await;
    assert_eq!(names(&all), ["Alpha", "beta lab", "delta LAB", "gamma"], "case-insensitive name order");
    for r in all["rooms"].as_array().unwrap() {
        for field in ["room_id", "name", "expires_at", "role", "joined_at"] {
            assert!(r.get(field).is_some(), "upstream's {field} in {r}");
        }
    }
    assert_eq!(names(&list("?sort_by=name&sort_order=desc").await), ["gamma", "delta LAB", "beta lab", "Alpha"]);
    assert_eq!(names(&list("?role=member").await), ["delta LAB"]);
    assert_eq!(names(&list("?role=owner&sort_by=name&sort_order=asc").await), ["Alpha", "beta lab", "gamma"]);
    assert_eq!(names(&list("?search=LaB&sort_by=name&sort_order=asc").await), ["beta lab", "delta LAB"]);
    assert_eq!(names(&list("?sort_by=expires_at&sort_order=asc").await)[0], "delta LAB");
    assert_eq!(names(&list("?sort_by=role&sort_order=asc").await)[0], "delta LAB", "member before owner");
    // The default is joined_at, newest first (times are seconds, so the rooms above may tie).
    let newest_first = names(&list("?sort_by=joined_at&sort_order=desc").await);
    assert_eq!(names(&list("").await), newest_first);
    let mut oldest_first = names(&list("?sort_by=joined_at&sort_order=asc").await);
    oldest_first.reverse();
    assert_eq!(oldest_first, newest_first);
    for (q, allowed) in [
        ("?role=admin", "`owner` or `member`"),
        ("?sort_by=created", "`name`, `joined_at`, `expires_at`"),
        ("?sort_order=up", "`asc` or `desc`"),
    ] {
        let (st, v) = s.call("GET", &format!("/api/auth/rooms{q}"), Some(&me), None).await;
        assert_eq!((st, v["code"].as_str()), (400, Some("BAD_REQUEST")), "{q}: {v}");
        assert!(v["detail"].as_str().unwrap().contains(allowed), "{q}: {v}");
    }
}

async fn on_dynamodb(moto: &Moto) -> TestServer {
    let url = DynamoUrl::parse(&format!("dynamodb://pk?endpoint={}&region=us-east-1", moto.url)).unwrap();
    let store = DynamoStore::connect_with_static_credentials(&url, "testing", "testing").await;
    store.init().await.unwrap();
    start_on(tempfile::tempdir().unwrap(), Some(Arc::new(store)), |_| {}).await
}

/// Each scenario as `sqlite::NAME` and `dynamodb::NAME`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let s = super::start().await;
                    super::$name(&s).await;
                    s.stop().await;
                }
            )*
        }
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let moto = super::Moto::start().await;
                    let s = super::on_dynamodb(&moto).await;
                    super::$name(&s).await;
                    s.stop().await;
                }
            )*
        }
    };
}

on_both_stores!(
    key_round_trip_and_idempotence,
    a_key_of_another_user_is_refused,
    malformed_keys_are_refused,
    each_user_has_at_most_32_keys,
    authorized_keys_with_a_worker_token_list_the_members_keys,
    a_revoked_token_is_refused,
    a_removed_members_keys_disappear,
    room_list_takes_upstreams_query_parameters,
);
