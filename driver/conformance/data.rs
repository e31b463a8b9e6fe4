//! Test data shared by the conformance suite and the runtime crates' own tests.

use std::path::Path;

use serde_json::{Value, json};

/// Signs in anonymously on the server at `base` (`http://host:port`), creates a room and a worker
/// token for it: `(jwt, room_id, token)`. Needs a tokio runtime (reqwest).
pub async fn sign_in(base: &str) -> (String, String, String) {
    let http = reqwest::Client::new();
    let post = |path: &str, jwt: Option<&str>, body: Value| {
        let mut r = http.post(format!("{base}{path}")).json(&body);
        if let Some(j) = jwt {
            r = r.bearer_auth(j);
        }
        async move { r.send().await.expect("the server answers").json::<Value>().await.expect("JSON") }
    };
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}")).to_owned();
    let jwt = s(&post("/anonymous-signin", None, json!({})).await, "jwt");
    let room = s(&post("/api/auth/rooms", Some(&jwt), json!({})).await, "room_id");
    let token =
        s(&post("/api/auth/token", Some(&jwt), json!({"room_id": room, "worker_name": "gpu"})).await, "token_id");
    (jwt, room, token)
}

/// Writes `len` pseudo-random (incompressible) bytes.
pub fn write_random(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, data).expect("write a test file");
}
