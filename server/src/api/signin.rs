//! Sign-in (anonymous) and who the caller is; upstream's legacy room creation.

use super::*;

pub(super) fn client_ip(addr: &SocketAddr) -> IpAddr {
    addr.ip()
}

#[utoipa::path(post, path = "/anonymous-signin", tag = "auth", responses((status = 200, description = "A new anonymous user and its JWT", body = Signin), (status = 429, description = "Rate limited", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn anonymous_signin(State(state): S, ConnectInfo(addr): ConnectInfo<SocketAddr>) -> ApiResult {
    if !state.allow_auth_call(client_ip(&addr)).await {
        return Err(ApiError::rate_limited());
    }
    let id = new_id()?;
    let user = User { username: format!("anon-{}", &id[..8]), id, created_at: unix_now() };
    state.store.put_user(&user).await?;
    let jwt = state.keys.issue(&user.id, &user.username, unix_now())?;
    Ok(Json(json!({"id_token": jwt, "jwt": jwt, "user_id": user.id, "username": user.username})))
}

#[utoipa::path(get, path = "/api/auth/me", tag = "auth", security(("bearer" = [])), responses((status = 200, description = "The caller", body = Me), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn me(State(state): S, user: AuthUser) -> ApiResult {
    let created = state.store.get_user(&user.user_id).await?.map(|u| u.created_at);
    Ok(Json(json!({"user_id": user.user_id, "username": user.username, "created_at": created})))
}

pub(super) async fn new_room(
    state: &AppState,
    user: &AuthUser,
    name: String,
    ttl_secs: i64,
) -> ApiResult<(Room, String)> {
    let now = unix_now();
    let token = new_room_token()?;
    let room = Room {
        id: new_id()?,
        name,
        created_by: user.user_id.clone(),
        token_hash: hash_secret(&token),
        created_at: now,
        expires_at: Some(now + ttl_secs),
    };
    let owner = Membership {
        user_id: user.user_id.clone(),
        room_id: room.id.clone(),
        role: Role::Owner,
        invited_by: None,
        joined_at: now,
    };
    state.store.create_room(&room, &owner).await?;
    Ok((room, token))
}

#[utoipa::path(post, path = "/create-room", tag = "legacy", security(("bearer" = [])), responses((status = 200, description = "A room that expires in 2 hours", body = LegacyRoom), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn legacy_create_room(State(state): S, user: AuthUser) -> ApiResult {
    let (room, token) = new_room(&state, &user, String::new(), LEGACY_ROOM_TTL_SECS).await?;
    Ok(Json(json!({"room_id": room.id, "token": token, "expires_at": room.expires_at})))
}
