//! Rooms: create, list (with upstream's query parameters), read, change, delete, invites,
//! members, and the workers connected now.

use super::*;

#[derive(Deserialize, ToSchema)]
pub(super) struct CreateRoom {
    /// Up to 50 characters, no control characters.
    #[schema(max_length = 50, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    name: Option<String>,
    /// 1 to 365; default 30.
    #[serde(default, deserialize_with = "whole_days")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 365)]
    expires_in_days: Option<i64>,
}

#[utoipa::path(post, path = "/api/auth/rooms", tag = "rooms", security(("bearer" = [])), request_body(content = CreateRoom, description = "All fields optional; an empty body is accepted"), responses((status = 200, description = "The room; its token is shown once", body = CreatedRoom), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 415, description = "Body is not JSON", body = ErrorBody), (status = 422, description = "Body fails validation", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn create_room(State(state): S, user: AuthUser, Body(b): Body<CreateRoom>) -> ApiResult {
    let name = bounded_name(b.name, "name", 50, false)?.unwrap_or_default();
    let d = days(b.expires_in_days, 30, "expires_in_days")?;
    let (room, token) = new_room(&state, &user, name, d * DAY).await?;
    Ok(Json(json!({
        "room_id": room.id, "room_token": token, "name": room.name, "expires_at": room.expires_at,
        "created_at": room.created_at,
    })))
}

#[derive(Deserialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RoleFilter {
    Owner,
    Member,
}

impl RoleFilter {
    fn matches(self, r: Role) -> bool {
        matches!((self, r), (RoleFilter::Owner, Role::Owner) | (RoleFilter::Member, Role::Member))
    }
}

#[derive(Deserialize, ToSchema, Clone, Copy, Default)]
#[serde(rename_all = "snake_case")]
pub(super) enum RoomSort {
    Name,
    #[default]
    JoinedAt,
    ExpiresAt,
    Role,
}

#[derive(Deserialize, ToSchema, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum SortOrder {
    Asc,
    #[default]
    Desc,
}

/// Upstream's query parameters (`sleap-rtc room list` sends them all). An unknown value is a
/// 400 that names the allowed ones.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListRooms {
    /// Only rooms where the caller has this role.
    #[param(inline)]
    role: Option<RoleFilter>,
    /// Sort key; default `joined_at`. `name` ignores case; for `expires_at` a room without
    /// expiry counts as the latest.
    #[param(inline)]
    sort_by: Option<RoomSort>,
    /// Default `desc`.
    #[param(inline)]
    sort_order: Option<SortOrder>,
    /// Case-insensitive substring of the room name.
    search: Option<String>,
}

/// The order of two (membership, room) rows under `sort`, ascending; ties go by room id so the
/// listing is stable.
pub(super) fn room_order(sort: RoomSort, a: &(Membership, Room), b: &(Membership, Room)) -> std::cmp::Ordering {
    let by = match sort {
        RoomSort::Name => a.1.name.to_lowercase().cmp(&b.1.name.to_lowercase()),
        RoomSort::JoinedAt => a.0.joined_at.cmp(&b.0.joined_at),
        // `None` (never expires) after every time.
        RoomSort::ExpiresAt => a.1.expires_at.map_or(i64::MAX, |t| t).cmp(&b.1.expires_at.map_or(i64::MAX, |t| t)),
        RoomSort::Role => a.0.role.as_str().cmp(b.0.role.as_str()),
    };
    by.then_with(|| a.1.id.cmp(&b.1.id))
}

pub(super) fn room_json(room: &Room, m: &Membership, now: i64) -> Value {
    json!({
        "room_id": room.id, "name": room.name, "role": m.role.as_str(), "joined_at": m.joined_at,
        "created_at": room.created_at, "expires_at": room.expires_at, "expired": room.is_expired(now),
    })
}

#[utoipa::path(get, path = "/api/auth/rooms", tag = "rooms", security(("bearer" = [])), params(ListRooms), responses((status = 200, description = "Rooms the caller belongs to", body = RoomList), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn list_rooms(State(state): S, user: AuthUser, Q(q): Q<ListRooms>) -> ApiResult {
    let now = unix_now();
    let search = q.search.map(|s| s.to_lowercase());
    let mut rows: Vec<(Membership, Room)> = state
        .store
        .list_user_rooms(&user.user_id)
        .await?
        .into_iter()
        .filter(|(m, _)| q.role.is_none_or(|r| r.matches(m.role)))
        .filter(|(_, r)| search.as_deref().is_none_or(|s| r.name.to_lowercase().contains(s)))
        .collect();
    let (sort, desc) = (q.sort_by.unwrap_or_default(), q.sort_order.unwrap_or_default() == SortOrder::Desc);
    rows.sort_by(|a, b| if desc { room_order(sort, b, a) } else { room_order(sort, a, b) });
    let rooms: Vec<Value> = rows.iter().map(|(m, r)| room_json(r, m, now)).collect();
    Ok(Json(json!({"rooms": rooms})))
}

#[utoipa::path(get, path = "/api/auth/rooms/{id}", tag = "rooms", security(("bearer" = [])), params(("id" = String, Path, description = "Room id")), responses((status = 200, description = "The room (with its members for the owner)", body = RoomInfo), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn get_room(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
    let (room, m) = membership(&state, &id, &user.user_id).await?;
    let mut v = room_json(&room, &m, unix_now());
    if m.role == Role::Owner {
        let members: Vec<Value> = state
            .store
            .list_members(&id)
            .await?
            .iter()
            .map(|(m, _)| json!({"user_id": m.user_id, "role": m.role.as_str(), "joined_at": m.joined_at}))
            .collect();
        v["members"] = Value::Array(members);
    }
    Ok(Json(v))
}

/// At least one of the fields.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchRoom {
    /// 1 to 50 characters, not all blank, no control characters.
    #[serde(default, deserialize_with = "not_null")]
    #[schema(
        nullable = false,
        min_length = 1,
        max_length = 50,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    name: Option<String>,
    /// New expiry, counted from now: 1 to 365.
    #[serde(default, deserialize_with = "some_whole_days")]
    #[schema(value_type = i64, minimum = 1, maximum = 365)]
    expires_in_days: Option<i64>,
}

#[utoipa::path(patch, path = "/api/auth/rooms/{id}", tag = "rooms", security(("bearer" = [])), params(("id" = String, Path, description = "Room id")), request_body = PatchRoom, responses((status = 200, description = "Updated", body = PatchedRoom), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 415, description = "Body is not JSON", body = ErrorBody), (status = 422, description = "Body fails validation", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 403, description = "Not allowed for this caller", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn patch_room(
    State(state): S,
    user: AuthUser,
    P(id): P<String>,
    Body(b): Body<PatchRoom>,
) -> ApiResult {
    ApiError::cluster_ready(&state)?;
    owner(&state, &id, &user.user_id, "update room settings").await?;
    let name = bounded_name(b.name, "name", 50, true)?;
    let expires = match b.expires_in_days {
        Some(d) => Some(Some(unix_now() + days(Some(d), 30, "expires_in_days")? * DAY)),
        None => None,
    };
    if name.is_none() && expires.is_none() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_BODY",
            "nothing to update: give name or expires_in_days",
        ));
    }
    let room = state
        .store
        .update_room(&id, name.as_deref(), expires)
        .await?
        .ok_or_else(|| ApiError::not_found("Room not found"))?;
    if expires.is_some() {
        let at = room.expires_at.map(|t| sleap_rtc_core::room::Millis((t.max(0) as u64) * 1000));
        ws::drive(&state, |hub| hub.set_room_expiry(&id, at));
    }
    Ok(Json(json!({"room_id": room.id, "name": room.name, "expires_at": room.expires_at})))
}

#[utoipa::path(delete, path = "/api/auth/rooms/{id}", tag = "rooms", security(("bearer" = [])), params(("id" = String, Path, description = "Room id")), responses((status = 200, description = "Deleted; its connected peers were disconnected", body = Status), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 403, description = "Not allowed for this caller", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn delete_room(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
    ApiError::cluster_ready(&state)?;
    owner(&state, &id, &user.user_id, "delete a room").await?;
    state.store.delete_room(&id).await?;
    ws::drive(&state, |hub| hub.close_room(&id, "Room deleted", now_millis()));
    Ok(Json(json!({"status": "deleted", "room_id": id})))
}

#[utoipa::path(post, path = "/api/auth/rooms/{id}/invite", tag = "rooms", security(("bearer" = [])), params(("id" = String, Path, description = "Room id")), responses((status = 200, description = "A single-use invite code, shown once", body = InviteCreated), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 403, description = "Not allowed for this caller", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn create_invite(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
    owner(&state, &id, &user.user_id, "create invites").await?;
    let code = new_invite_code()?;
    let inv = Invite {
        code_hash: hash_secret(&code),
        room_id: id.clone(),
        created_by: user.user_id,
        expires_at: unix_now() + INVITE_TTL_SECS,
    };
    state.store.put_invite(&inv).await?;
    Ok(Json(json!({"invite_code": code, "room_id": id, "expires_in_seconds": INVITE_TTL_SECS, "single_use": true})))
}

#[derive(Deserialize, ToSchema)]
pub(super) struct JoinRoom {
    /// As given by the room owner (case and dashes do not matter).
    invite_code: String,
}

#[utoipa::path(post, path = "/api/auth/rooms/join", tag = "rooms", security(("bearer" = [])), request_body = JoinRoom, responses((status = 200, description = "Joined (or already a member)", body = Joined), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 415, description = "Body is not JSON", body = ErrorBody), (status = 422, description = "Body fails validation", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 404, description = "Unknown or expired invite code, or its room is gone", body = ErrorBody), (status = 429, description = "Rate limited", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn join_room(
    State(state): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    user: AuthUser,
    Body(b): Body<JoinRoom>,
) -> ApiResult {
    if !state.allow_auth_call(client_ip(&addr)).await {
        return Err(ApiError::rate_limited());
    }
    let code = normalize_invite(&b.invite_code);
    let inv = state
        .store
        .take_invite(&hash_secret(&code), unix_now())
        .await?
        .ok_or_else(|| ApiError::not_found("Invalid or expired invite code"))?;
    let room = state.store.get_room(&inv.room_id).await?.filter(|r| !r.is_expired(unix_now()));
    let Some(room) = room else { return Err(ApiError::not_found("The room of this invite no longer exists")) };
    let m = Membership {
        user_id: user.user_id,
        room_id: room.id.clone(),
        role: Role::Member,
        invited_by: Some(inv.created_by),
        joined_at: unix_now(),
    };
    let added = state.store.add_member(&m).await?;
    let message = if added { "Joined successfully" } else { "Already a member" };
    Ok(Json(json!({"message": message, "room_id": room.id, "name": room.name})))
}

#[utoipa::path(get, path = "/api/auth/rooms/{id}/members", tag = "rooms", security(("bearer" = [])), params(("id" = String, Path, description = "Room id")), responses((status = 200, description = "Members of the room", body = MemberList), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn list_members(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
    membership(&state, &id, &user.user_id).await?;
    let members: Vec<Value> = state
        .store
        .list_members(&id)
        .await?
        .into_iter()
        .map(|(m, u)| {
            json!({"user_id": m.user_id, "username": u.map(|u| u.username), "role": m.role.as_str(),
                   "joined_at": m.joined_at, "invited_by": m.invited_by})
        })
        .collect();
    Ok(Json(json!({"members": members})))
}

#[utoipa::path(delete, path = "/api/auth/rooms/{id}/members/{user_id}", tag = "rooms", security(("bearer" = [])), params(("id" = String, Path, description = "Room id"), ("user_id" = String, Path, description = "Member to remove (yourself to leave)")), responses((status = 200, description = "Removed (or left); their peers were disconnected", body = Status), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 403, description = "Not allowed for this caller", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 409, description = "The owner cannot remove themselves", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn remove_member(State(state): S, user: AuthUser, P((id, target)): P<(String, String)>) -> ApiResult {
    ApiError::cluster_ready(&state)?;
    let (_, me) = membership(&state, &id, &user.user_id).await?;
    let is_self = target == user.user_id;
    if is_self && me.role == Role::Owner {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "CONFLICT",
            "Room owners cannot remove themselves. Delete the room or transfer ownership first.",
        ));
    }
    if !is_self && me.role != Role::Owner {
        return Err(ApiError::forbidden("Only room owners can remove other members"));
    }
    if !state.store.remove_member(&id, &target).await? {
        return Err(ApiError::not_found("User is not a member of this room"));
    }
    ws::drive(&state, |hub| {
        hub.remove_member(&id, &target, now_millis());
    });
    if is_self {
        Ok(Json(json!({"status": "left", "room_id": id})))
    } else {
        Ok(Json(json!({"status": "removed", "room_id": id, "user_id": target})))
    }
}

#[utoipa::path(get, path = "/api/rooms/{id}/workers", tag = "rooms", security(("bearer" = [])), params(("id" = String, Path, description = "Room id")), responses((status = 200, description = "Workers connected to the room now", body = WorkerList), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn room_workers(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
    membership(&state, &id, &user.user_id).await?;
    let workers: Vec<Value> = {
        let st = state.hub.lock().map_err(|_| anyhow::anyhow!("hub lock poisoned"))?;
        st.hub
            .room_peers(&id)
            .filter(|(_, p)| p.role == "worker")
            .map(|(pid, p)| {
                json!({"peer_id": pid, "worker_name": p.worker_name, "metadata": p.metadata,
                       "connected_at": p.connected_at.secs_f64()})
            })
            .collect()
    };
    Ok(Json(json!({"count": workers.len(), "workers": workers})))
}
