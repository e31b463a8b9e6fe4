//! Account keys, and users' Ed25519 public keys with the room's authorized-keys list that
//! workers read for upstream clients' challenges.

use super::*;

#[derive(Deserialize, ToSchema)]
pub(super) struct CreateKey {
    /// Up to 64 characters, no control characters; default `default`.
    #[schema(max_length = 64, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    name: Option<String>,
    /// 1 to 365; no expiry when absent.
    #[serde(default, deserialize_with = "whole_days")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 365)]
    expires_in_days: Option<i64>,
}

#[utoipa::path(post, path = "/api/auth/account-keys", tag = "auth", security(("bearer" = [])), request_body(content = CreateKey, description = "All fields optional; an empty body is accepted"), responses((status = 200, description = "The key; its secret is shown once", body = KeyCreated), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 415, description = "Body is not JSON", body = ErrorBody), (status = 422, description = "Body fails validation", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn create_account_key(State(state): S, user: AuthUser, Body(b): Body<CreateKey>) -> ApiResult {
    let name = bounded_name(b.name, "name", 64, false)?.filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
    let expires_at = match b.expires_in_days {
        Some(d) => Some(unix_now() + days(Some(d), 365, "expires_in_days")? * DAY),
        None => None,
    };
    let secret = new_secret(ACCOUNT_KEY_PREFIX)?;
    let k = AccountKey {
        id: new_id()?,
        secret_hash: hash_secret(&secret),
        user_id: user.user_id,
        name,
        created_at: unix_now(),
        expires_at,
    };
    state.store.put_account_key(&k).await?;
    Ok(Json(
        json!({"key_id": secret, "id": k.id, "name": k.name, "created_at": k.created_at, "expires_at": k.expires_at}),
    ))
}

#[utoipa::path(get, path = "/api/auth/account-keys", tag = "auth", security(("bearer" = [])), responses((status = 200, description = "The caller's account keys (no secrets)", body = KeyList), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn list_account_keys(State(state): S, user: AuthUser) -> ApiResult {
    let keys: Vec<Value> = state
        .store
        .list_account_keys(&user.user_id)
        .await?
        .into_iter()
        .map(|k| json!({"id": k.id, "name": k.name, "created_at": k.created_at, "expires_at": k.expires_at}))
        .collect();
    Ok(Json(json!({"keys": keys})))
}

#[utoipa::path(delete, path = "/api/auth/account-keys/{id}", tag = "auth", security(("bearer" = [])), params(("id" = String, Path, description = "Key id (not the secret)")), responses((status = 200, description = "Deleted; peers using it were disconnected", body = Deleted), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn delete_account_key(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
    ApiError::cluster_ready(&state)?;
    if !state.store.delete_account_key(&user.user_id, &id).await? {
        return Err(ApiError::not_found("Key not found"));
    }
    let disconnected = evict_credential(&state, &format!("acct:{id}"));
    Ok(Json(json!({"deleted": id, "disconnected": disconnected})))
}

#[derive(Deserialize, ToSchema)]
pub(super) struct RegisterPublicKey {
    /// The raw 32-byte Ed25519 public key in url-safe base64 (padding optional).
    #[schema(format = "ed25519-public-key", example = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")]
    public_key: String,
    /// Up to 64 characters, no control characters; default `default`.
    #[schema(max_length = 64, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    device_name: Option<String>,
}

/// The url-safe base64 alphabet, padding optional, trailing bits must be zero (so every key has
/// exactly one accepted spelling besides the padding).
pub(super) const KEY_B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Checks that `raw` is an Ed25519 public key a worker could verify signatures with, and returns
/// its canonical spelling (url-safe base64 without padding, as upstream clients send it).
pub(super) fn parse_public_key(raw: &str) -> ApiResult<String> {
    use base64::Engine;
    let bad = |why: &str| {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_PUBLIC_KEY",
            format!("public_key {why}; send the raw 32-byte Ed25519 public key in url-safe base64"),
        ))
    };
    // 32 bytes are 43 characters, 44 with padding; refuse anything longer before decoding it.
    if raw.len() > 44 {
        return bad("is too long");
    }
    let Ok(bytes) = KEY_B64.decode(raw) else { return bad("is not url-safe base64") };
    let Ok(bytes) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        return bad(&format!("decodes to {} bytes, not 32", bytes.len()));
    };
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&bytes) else {
        return bad("is not a point on the Ed25519 curve");
    };
    if key.to_bytes() != bytes {
        return bad("is not the canonical encoding of its point");
    }
    // A small-order key verifies signatures nobody made with a private key.
    if key.is_weak() {
        return bad("is a small-order (weak) point");
    }
    Ok(KEY_B64.encode(bytes).trim_end_matches('=').to_owned())
}

pub(super) fn public_key_json(k: &PublicKey) -> Value {
    json!({"key_id": k.id, "public_key": k.public_key, "device_name": k.device_name, "created_at": k.created_at})
}

#[utoipa::path(post, path = "/api/auth/public-keys", tag = "auth", security(("bearer" = [])), request_body = RegisterPublicKey, responses((status = 201, description = "Registered", body = PublicKeyInfo), (status = 200, description = "The caller had registered this key already: the stored record, unchanged", body = PublicKeyInfo), (status = 400, description = "Malformed request, or the key is not a usable Ed25519 public key", body = ErrorBody), (status = 415, description = "Body is not JSON", body = ErrorBody), (status = 422, description = "Body fails validation", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 409, description = "Another user registered this key (CONFLICT), or the caller has 32 keys already (TOO_MANY_KEYS)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn register_public_key(
    State(state): S,
    user: AuthUser,
    Body(b): Body<RegisterPublicKey>,
) -> ApiResult<Response> {
    let device_name = bounded_name(b.device_name, "device_name", DEVICE_NAME_MAX, false)?
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    let public_key = parse_public_key(&b.public_key)?;
    let k = PublicKey { id: new_id()?, user_id: user.user_id, public_key, device_name, created_at: unix_now() };
    match state.store.add_public_key(&k, MAX_PUBLIC_KEYS_PER_USER).await? {
        AddedKey::Created => Ok((StatusCode::CREATED, Json(public_key_json(&k))).into_response()),
        AddedKey::Existing(e) => Ok(Json(public_key_json(&e)).into_response()),
        AddedKey::TakenByOther => {
            Err(ApiError::new(StatusCode::CONFLICT, "CONFLICT", "This public key is registered by another user"))
        }
        AddedKey::LimitReached => Err(ApiError::new(
            StatusCode::CONFLICT,
            "TOO_MANY_KEYS",
            format!(
                "You have {MAX_PUBLIC_KEYS_PER_USER} public keys already; delete one (DELETE /api/auth/public-keys/{{key_id}}) first"
            ),
        )),
    }
}

#[utoipa::path(get, path = "/api/auth/public-keys", tag = "auth", security(("bearer" = [])), responses((status = 200, description = "The caller's public keys, newest first", body = PublicKeyList), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn list_public_keys(State(state): S, user: AuthUser) -> ApiResult {
    let keys: Vec<Value> = state.store.list_public_keys(&user.user_id).await?.iter().map(public_key_json).collect();
    Ok(Json(json!({"public_keys": keys})))
}

#[utoipa::path(delete, path = "/api/auth/public-keys/{key_id}", tag = "auth", security(("bearer" = [])), params(("key_id" = String, Path, description = "Key id (from the registration or the listing)")), responses((status = 200, description = "Deleted; workers stop accepting it at their next fetch of the room's keys", body = PublicKeyDeleted), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn delete_public_key(State(state): S, user: AuthUser, P(key_id): P<String>) -> ApiResult {
    if !state.store.delete_public_key(&user.user_id, &key_id).await? {
        return Err(ApiError::not_found("Key not found"));
    }
    Ok(Json(json!({"deleted": key_id})))
}

/// Who may read a room's authorized keys: a worker token of that room (what `sleap-rtc worker
/// --token` holds; checked as at registration: active, this room, its creator still a member),
/// or a member's JWT or account key.
pub(super) async fn may_read_room_keys(state: &AppState, headers: &HeaderMap, room_id: &str) -> ApiResult<()> {
    let token = bearer(headers).ok_or_else(|| ApiError::unauthorized("Invalid authorization header"))?;
    let now = unix_now();
    let room = if token.starts_with(WORKER_TOKEN_PREFIX) && !token.starts_with(ACCOUNT_KEY_PREFIX) {
        let t = state
            .store
            .find_worker_token(&hash_secret(token))
            .await?
            .ok_or_else(|| ApiError::unauthorized("Invalid worker token"))?;
        if t.revoked_at.is_some() {
            return Err(ApiError::unauthorized("Token revoked"));
        }
        if !t.is_active(now) {
            return Err(ApiError::unauthorized("Token expired"));
        }
        if t.room_id != room_id {
            return Err(ApiError::forbidden("This worker token belongs to another room"));
        }
        let room = state.store.get_room(room_id).await?.ok_or_else(|| ApiError::not_found("Room not found"))?;
        if state.store.get_member(room_id, &t.user_id).await?.is_none() {
            return Err(ApiError::forbidden("The creator of this worker token is no longer a member of the room"));
        }
        room
    } else {
        let user = AuthUser::from_bearer(state, token).await?;
        membership(state, room_id, &user.user_id).await?.0
    };
    if room.is_expired(now) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "ROOM_EXPIRED", "Room expired"));
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/rooms/{id}/authorized-keys", tag = "rooms", security(("bearer" = [])), params(("id" = String, Path, description = "Room id")), responses((status = 200, description = "The registered Ed25519 public keys of every current member of the room (read at each call: a removed member or a deleted key is gone from the next answer)", body = AuthorizedKeyList), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid, revoked or expired credentials", body = ErrorBody), (status = 403, description = "A worker token of another room, one whose creator left the room, or the room expired", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn authorized_keys(State(state): S, headers: HeaderMap, P(id): P<String>) -> ApiResult {
    may_read_room_keys(&state, &headers, &id).await?;
    let keys: Vec<Value> = state
        .store
        .room_public_keys(&id)
        .await?
        .into_iter()
        .map(|(k, u)| {
            json!({"public_key": k.public_key, "username": u.map(|u| u.username), "device_name": k.device_name,
                   "user_id": k.user_id})
        })
        .collect();
    Ok(Json(json!({"authorized_keys": keys})))
}
