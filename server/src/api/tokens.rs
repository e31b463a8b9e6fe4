//! Worker tokens: create, list, revoke, delete (revocation evicts the connected peers).

use super::*;

#[derive(Deserialize, ToSchema)]
pub(super) struct CreateToken {
    room_id: String,
    /// 1 to 64 characters, not all blank, no control characters.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    worker_name: String,
    /// 1 to 365; default 7.
    #[serde(default, deserialize_with = "whole_days")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 365)]
    expires_in_days: Option<i64>,
}

#[utoipa::path(post, path = "/api/auth/token", tag = "tokens", security(("bearer" = [])), request_body = CreateToken, responses((status = 200, description = "The token; its secret is shown once", body = TokenCreated), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 415, description = "Body is not JSON", body = ErrorBody), (status = 422, description = "Body fails validation", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 403, description = "Not allowed for this caller", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn create_worker_token(State(state): S, user: AuthUser, Body(b): Body<CreateToken>) -> ApiResult {
    let worker_name = bounded_name(Some(b.worker_name), "worker_name", 64, true)?.unwrap_or_default();
    let d = days(b.expires_in_days, 7, "expires_in_days")?;
    membership(&state, &b.room_id, &user.user_id).await.map_err(|e| {
        if e.status == StatusCode::NOT_FOUND { ApiError::forbidden("You don't have access to this room") } else { e }
    })?;
    let secret = new_secret(WORKER_TOKEN_PREFIX)?;
    let now = unix_now();
    let t = WorkerToken {
        id: new_id()?,
        secret_hash: hash_secret(&secret),
        user_id: user.user_id,
        room_id: b.room_id,
        worker_name,
        created_at: now,
        expires_at: Some(now + d * DAY),
        revoked_at: None,
    };
    state.store.put_worker_token(&t).await?;
    Ok(Json(json!({
        "token_id": secret, "id": t.id, "room_id": t.room_id, "worker_name": t.worker_name,
        "created_at": t.created_at, "expires_at": t.expires_at,
    })))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListTokens {
    /// Only tokens of this room.
    room_id: Option<String>,
    /// Leave out revoked and expired tokens.
    #[serde(default)]
    active_only: bool,
}

#[utoipa::path(get, path = "/api/auth/tokens", tag = "tokens", security(("bearer" = [])), params(ListTokens), responses((status = 200, description = "Tokens the caller created", body = TokenList), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn list_worker_tokens(State(state): S, user: AuthUser, Q(q): Q<ListTokens>) -> ApiResult {
    let now = unix_now();
    let tokens: Vec<Value> = state
        .store
        .list_worker_tokens(&user.user_id, q.room_id.as_deref())
        .await?
        .into_iter()
        .filter(|t| !q.active_only || t.is_active(now))
        .map(|t| {
            json!({"id": t.id, "room_id": t.room_id, "worker_name": t.worker_name, "created_at": t.created_at,
                   "expires_at": t.expires_at, "revoked_at": t.revoked_at, "is_active": t.is_active(now)})
        })
        .collect();
    Ok(Json(json!({"tokens": tokens})))
}

/// The token, if the caller created it or owns its room.
pub(super) async fn manageable_token(state: &AppState, user: &AuthUser, id: &str) -> ApiResult<WorkerToken> {
    let t = state.store.get_worker_token(id).await?.ok_or_else(|| ApiError::not_found("Token not found"))?;
    if t.user_id != user.user_id {
        let owns_room = state.store.get_member(&t.room_id, &user.user_id).await?.is_some_and(|m| m.role == Role::Owner);
        if !owns_room {
            return Err(ApiError::forbidden("You don't own this token"));
        }
    }
    Ok(t)
}

#[utoipa::path(delete, path = "/api/auth/token/{id}", tag = "tokens", security(("bearer" = [])), params(("id" = String, Path, description = "Token id (not the secret)")), responses((status = 200, description = "Revoked; peers using it were disconnected", body = Revoked), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 403, description = "Not allowed for this caller", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn revoke_worker_token(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
    ApiError::cluster_ready(&state)?;
    let t = manageable_token(&state, &user, &id).await?;
    state.store.revoke_worker_token(&t.id, unix_now()).await?;
    let disconnected = evict_credential(&state, &format!("wt:{}", t.id));
    Ok(Json(json!({"revoked": true, "id": t.id, "disconnected": disconnected})))
}

#[utoipa::path(delete, path = "/api/auth/tokens/{id}", tag = "tokens", security(("bearer" = [])), params(("id" = String, Path, description = "Token id (not the secret)")), responses((status = 200, description = "Deleted; peers using it were disconnected", body = Deleted), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 403, description = "Not allowed for this caller", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn delete_worker_token(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
    ApiError::cluster_ready(&state)?;
    let t = manageable_token(&state, &user, &id).await?;
    state.store.delete_worker_token(&t.id).await?;
    let disconnected = evict_credential(&state, &format!("wt:{}", t.id));
    Ok(Json(json!({"deleted": t.id, "disconnected": disconnected})))
}

pub(super) fn evict_credential(state: &Arc<AppState>, credential_id: &str) -> usize {
    let mut n = 0;
    ws::drive(state, |hub| n = hub.revoke_credential(credential_id, now_millis()));
    n
}
