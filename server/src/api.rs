//! HTTP API. Paths, request and response fields follow the upstream server where it defined them
//! (`upstream-signaling-server.md` §3); errors are JSON `{"detail": ..., "code": ...}` (upstream
//! clients read `detail`). Timestamps are Unix seconds.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::auth::{
    ACCOUNT_KEY_PREFIX, WORKER_TOKEN_PREFIX, hash_secret, new_id, new_invite_code, new_room_token, new_secret,
    normalize_invite,
};
use crate::openapi::*;
use crate::store::{AccountKey, AddedKey, Invite, Membership, PublicKey, Role, Room, StoreError, User, WorkerToken};
use crate::{AppState, now_millis, unix_now, ws};

/// Frames above this close the connection outright; between `--max-message-bytes` and this they
/// are answered with MESSAGE_TOO_LARGE and the connection stays open.
const HARD_MAX_FRAME: usize = 1024 * 1024;
const LEGACY_ROOM_TTL_SECS: i64 = 2 * 3600;
const INVITE_TTL_SECS: i64 = 3600;
const DAY: i64 = 86_400;
/// Ed25519 public keys a user may register (one per device; upstream registers one per login).
pub const MAX_PUBLIC_KEYS_PER_USER: usize = 32;
const DEVICE_NAME_MAX: usize = 64;

type S = State<Arc<AppState>>;

// The deprecated handlers are upstream's removed endpoints, kept to answer 410.
#[allow(deprecated)]
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(ws_root))
        .route("/ws", get(ws_only))
        .route("/dashboard/{name}", get(dashboard_asset))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/anonymous-signin", post(anonymous_signin))
        .route("/create-room", post(legacy_create_room))
        .route("/delete-peer", post(removed_endpoint))
        .route("/delete-peers-and-room", post(removed_room_endpoint))
        .route("/openapi.json", get(openapi_json))
        .route("/api/auth/me", get(me))
        .route("/api/auth/account-keys", post(create_account_key).get(list_account_keys))
        .route("/api/auth/account-keys/{id}", delete(delete_account_key))
        .route("/api/auth/public-keys", post(register_public_key).get(list_public_keys))
        .route("/api/auth/public-keys/{key_id}", delete(delete_public_key))
        .route("/api/auth/rooms", post(create_room).get(list_rooms))
        .route("/api/auth/rooms/join", post(join_room))
        .route("/api/auth/rooms/{id}", get(get_room).patch(patch_room).delete(delete_room))
        .route("/api/auth/rooms/{id}/invite", post(create_invite))
        .route("/api/auth/rooms/{id}/members", get(list_members))
        .route("/api/auth/rooms/{id}/members/{user_id}", delete(remove_member))
        .route("/api/auth/token", post(create_worker_token))
        .route("/api/auth/token/{id}", delete(revoke_worker_token))
        .route("/api/auth/tokens", get(list_worker_tokens))
        .route("/api/auth/tokens/{id}", delete(delete_worker_token))
        .route("/api/rooms/{id}/workers", get(room_workers))
        .route("/api/rooms/{id}/authorized-keys", get(authorized_keys))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Errors and extractors
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError { status, code, detail: detail.into() }
    }
    fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", detail)
    }
    fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", detail)
    }
    fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "FORBIDDEN", detail)
    }
    fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", detail)
    }
    /// With `--redis`, an action other instances must carry out (a revocation, a deletion) is
    /// refused while this instance is out of the cluster, rather than done here only.
    fn cluster_ready(state: &AppState) -> Result<(), ApiError> {
        match &state.cluster {
            Some(c) if !c.is_ready() => Err(Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "CLUSTER_UNAVAILABLE",
                "this server instance is reconnecting to its cluster; try again",
            )),
            _ => Ok(()),
        }
    }
    fn rate_limited() -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", "too many requests from this address; slow down")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Self::new(StatusCode::CONFLICT, "CONFLICT", "already exists"),
            StoreError::Backend(msg) => {
                tracing::error!(error = %msg, "storage error");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "STORAGE_UNAVAILABLE", "storage unavailable; try again")
            }
        }
    }
}

impl From<crate::auth::NoRandomness> for ApiError {
    fn from(e: crate::auth::NoRandomness) -> Self {
        tracing::error!(error = %e, "cannot make an id or a secret");
        // 503, which every minting handler lists already: the server is unable, the request fine.
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "RANDOMNESS_UNAVAILABLE", "no system randomness; try again")
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!(error = %e, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "internal error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"detail": self.detail, "code": self.code}))).into_response()
    }
}

type ApiResult<T = Json<Value>> = Result<T, ApiError>;

/// A JSON body whose rejections are JSON errors too. An absent or empty body reads as `{}` so
/// endpoints whose fields are all optional accept bodiless POSTs, as upstream's did.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let empty =
            req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() == "0")
                || (!req.headers().contains_key(header::CONTENT_TYPE)
                    && !req.headers().contains_key(header::TRANSFER_ENCODING)
                    && !req.headers().contains_key(header::CONTENT_LENGTH));
        if empty {
            return serde_json::from_value(json!({}))
                .map(Body)
                .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "INVALID_BODY", e.to_string()));
        }
        match Json::<Value>::from_request(req, state).await {
            // Anything but an object is refused (serde would otherwise fill a struct from an
            // array).
            Ok(Json(v @ Value::Object(_))) => serde_json::from_value(v)
                .map(Body)
                .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "INVALID_BODY", e.to_string())),
            Ok(Json(_)) => {
                Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "INVALID_BODY", "the body must be a JSON object"))
            }
            Err(JsonRejection::JsonDataError(e)) => {
                Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "INVALID_BODY", e.body_text()))
            }
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                "send the body as JSON with Content-Type: application/json",
            )),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// Path parameters whose rejections are JSON errors like every other (axum's are plain text).
pub struct P<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<Arc<AppState>> for P<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(P(v)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// Query parameters, likewise.
pub struct Q<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<Arc<AppState>> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Q(v)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// The caller, from `Authorization: Bearer <JWT | account key>`.
pub struct AuthUser {
    pub user_id: String,
    pub username: String,
}

impl FromRequestParts<Arc<AppState>> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or_else(|| ApiError::unauthorized("Invalid authorization header"))?;
        AuthUser::from_bearer(state, token).await
    }
}

impl AuthUser {
    /// From a bearer credential: an account key or a JWT.
    async fn from_bearer(state: &AppState, token: &str) -> Result<Self, ApiError> {
        if token.starts_with(ACCOUNT_KEY_PREFIX) {
            let key = state
                .store
                .find_account_key(&hash_secret(token))
                .await?
                .filter(|k| k.expires_at.is_none_or(|t| t > unix_now()))
                .ok_or_else(|| ApiError::unauthorized("Invalid or expired account key"))?;
            let user = state.store.get_user(&key.user_id).await?;
            return Ok(AuthUser { username: user.map_or_else(String::new, |u| u.username), user_id: key.user_id });
        }
        let claims = state.keys.verify(token).map_err(|e| ApiError::unauthorized(format!("Invalid token: {e}")))?;
        Ok(AuthUser { user_id: claims.sub, username: claims.username })
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let t = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))?.trim();
    (!t.is_empty()).then_some(t)
}

async fn membership(state: &AppState, room_id: &str, user_id: &str) -> ApiResult<(Room, Membership)> {
    let not_found = || ApiError::not_found("Room not found or you don't have access");
    let m = state.store.get_member(room_id, user_id).await?.ok_or_else(not_found)?;
    let room = state.store.get_room(room_id).await?.ok_or_else(not_found)?;
    Ok((room, m))
}

async fn owner(state: &AppState, room_id: &str, user_id: &str, what: &str) -> ApiResult<Room> {
    let (room, m) = membership(state, room_id, user_id).await?;
    if m.role != Role::Owner {
        return Err(ApiError::forbidden(format!("Only the room owner can {what}")));
    }
    Ok(room)
}

fn days(v: Option<i64>, default: i64, field: &str) -> ApiResult<i64> {
    let d = v.unwrap_or(default);
    if !(1..=365).contains(&d) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_BODY",
            format!("{field} must be between 1 and 365"),
        ));
    }
    Ok(d)
}

/// An optional field that, when present, must not be `null` (a PATCH of `"name": null` would
/// otherwise read as "no change" while looking like "clear the name").
fn not_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

/// JSON Schema counts `1.0` as an integer; accept any whole number for a day count.
fn whole_days<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => whole(n),
    }
}

/// As [`whole_days`], but `null` is refused (for PATCH, where absent means "unchanged").
fn some_whole_days<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    whole(serde_json::Number::deserialize(d)?)
}

fn whole<E: serde::de::Error>(n: serde_json::Number) -> Result<Option<i64>, E> {
    n.as_i64()
        .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 1e15).map(|f| f as i64))
        .map(Some)
        .ok_or_else(|| E::custom("expires_in_days must be a whole number of days"))
}

/// Checked on the string as sent, so the rules are exactly the ones the OpenAPI schema states
/// (no control characters anywhere, at most `max` characters, not all whitespace when required);
/// what is stored is trimmed.
fn bounded_name(v: Option<String>, field: &str, max: usize, required: bool) -> ApiResult<Option<String>> {
    let Some(raw) = v else { return Ok(None) };
    let invalid = |why: String| Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "INVALID_BODY", why));
    if raw.chars().any(char::is_control) {
        return invalid(format!("{field} must not contain control characters"));
    }
    if raw.chars().count() > max || (required && raw.chars().all(char::is_whitespace)) {
        return invalid(format!("{field} must be 1 to {max} characters"));
    }
    Ok(Some(raw.trim().to_owned()))
}

// ---------------------------------------------------------------------------------------------
// WebSocket, health, metrics, keys
// ---------------------------------------------------------------------------------------------

#[utoipa::path(get, path = "/", tag = "signaling", responses((status = 200, description = "Without an Upgrade header: the web dashboard (HTML). With one: the WebSocket signaling protocol (101).", body = String, content_type = "text/html")))]
async fn ws_root(
    state: S,
    connect: ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: Result<axum::extract::WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match upgrade {
        Ok(u) => accept(state, connect, &headers, u),
        // A browser asking for the page: the dashboard (upstream clients only ever upgrade here).
        Err(_) => crate::dashboard::index(&headers),
    }
}

/// The dashboard's scripts, stylesheet and icon (not part of the API, so not in the OpenAPI
/// document).
async fn dashboard_asset(headers: HeaderMap, Path(name): Path<String>) -> Response {
    crate::dashboard::asset(&headers, &name)
}

#[utoipa::path(get, path = "/ws", tag = "signaling", responses((status = 101, description = "WebSocket signaling protocol"), (status = 403, description = "A browser page from a web origin that is not allowed", body = ErrorBody), (status = 426, description = "Not a WebSocket upgrade", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
async fn ws_only(
    state: S,
    connect: ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: Result<axum::extract::WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match upgrade {
        Ok(u) => accept(state, connect, &headers, u),
        Err(e) => {
            ApiError::new(StatusCode::UPGRADE_REQUIRED, "UPGRADE_REQUIRED", format!("WebSocket upgrade required: {e}"))
                .into_response()
        }
    }
}

fn accept(
    State(state): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: &HeaderMap,
    u: axum::extract::WebSocketUpgrade,
) -> Response {
    if !origin_allowed(headers, &state.config.allowed_origins) {
        return ApiError::forbidden("WebSocket upgrades from this web origin are not allowed (see --allowed-origin)")
            .into_response();
    }
    if !state.reserve_socket() {
        let why = if state.is_draining() { "server shutting down" } else { "server at its connection limit" };
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", why).into_response();
    }
    let failed = state.clone();
    // tungstenite zero-fills its whole read buffer on first read (128 KiB by default), which
    // would make every idle peer cost 128 KiB of RSS; 1 KiB covers typical signaling frames
    // and grows on demand for larger ones.
    u.read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(HARD_MAX_FRAME)
        .max_frame_size(HARD_MAX_FRAME)
        .on_failed_upgrade(move |_| {
            failed.live_sockets.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        })
        .on_upgrade(move |socket| ws::serve_socket(state, socket, addr))
}

/// Browsers send `Origin` with every WebSocket upgrade and let any page open one: a page on
/// another site must not reach the signaling server from a visitor's browser (B13). Clients that
/// are not browsers send no `Origin` and are not affected.
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let Ok(origin) = origin.to_str() else { return false };
    if allowed.iter().any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin)) {
        return true;
    }
    // Same origin: the page was served by this server (host and port as the browser asked).
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    origin.split_once("://").is_some_and(|(_, h)| !host.is_empty() && h.eq_ignore_ascii_case(host))
}

#[utoipa::path(get, path = "/health", tag = "ops", responses((status = 200, description = "Serving, storage reachable", body = Health), (status = 503, description = "Storage failing, or (with --redis) not joined to the cluster", body = Health)))]
async fn health(State(state): S) -> Response {
    let cluster = state.cluster.as_ref().map(|c| if c.is_ready() { "joined" } else { "unavailable" });
    if cluster == Some("unavailable") {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unhealthy", "version": env!("CARGO_PKG_VERSION"), "storage": "unknown",
                        "cluster": cluster})),
        )
            .into_response();
    }
    match state.store.health().await {
        Ok(()) => Json(json!({
            "cluster": cluster,
            "status": "healthy", "version": env!("CARGO_PKG_VERSION"), "storage": "ok", "timestamp": unix_now(),
            "draining": state.is_draining(),
        }))
        .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "health check: storage failing");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unhealthy", "version": env!("CARGO_PKG_VERSION"), "storage": "error"})),
            )
                .into_response()
        }
    }
}

#[utoipa::path(get, path = "/metrics", tag = "ops", security((), ("bearer" = [])), responses((status = 200, description = "Prometheus/OpenMetrics exposition (loopback clients, or the --metrics-token bearer)", body = String, content_type = "application/openmetrics-text"), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody)))]
async fn metrics(State(state): S, ConnectInfo(addr): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    if !metrics_allowed(addr.ip(), bearer(&headers), state.config.metrics_token.as_deref()) {
        return ApiError::unauthorized("metrics require a bearer token (--metrics-token) from non-loopback addresses")
            .into_response();
    }
    // Counted on scrape, not on every frame: in cluster mode the count walks every replica.
    if let Ok(st) = state.hub.lock() {
        let stats = st.hub.stats();
        state.metrics.peers.set(stats.registered as i64);
        state.metrics.rooms.set(stats.rooms as i64);
        state.metrics.remote_peers.set(stats.remote_peers as i64);
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
        .into_response()
}

/// Loopback clients may always scrape; others need the configured bearer token.
fn metrics_allowed(ip: IpAddr, presented: Option<&str>, required: Option<&str>) -> bool {
    let loopback = match ip {
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        IpAddr::V4(v4) => v4.is_loopback(),
    };
    loopback || matches!((presented, required), (Some(p), Some(r)) if constant_eq(p.as_bytes(), r.as_bytes()))
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    blake3::hash(a) == blake3::hash(b)
}

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "ops", responses((status = 200, description = "Public keys that verify the JWTs and peer tickets this server signs", body = Object)))]
async fn jwks(State(state): S) -> Json<Value> {
    Json(state.keys.jwks())
}

#[utoipa::path(post, path = "/delete-peer", tag = "legacy", responses((status = 410, description = "Removed endpoint", body = ErrorBody)))]
#[deprecated(note = "upstream's unauthenticated delete endpoint; answers 410 Gone")]
async fn removed_endpoint() -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "GONE",
        "this unauthenticated endpoint was removed; rooms are deleted by their owner with DELETE /api/auth/rooms/{id}",
    )
}

#[utoipa::path(post, path = "/delete-peers-and-room", tag = "legacy", responses((status = 410, description = "Removed endpoint", body = ErrorBody)))]
#[deprecated(note = "upstream's unauthenticated delete endpoint; answers 410 Gone")]
#[allow(deprecated)]
async fn removed_room_endpoint() -> ApiError {
    removed_endpoint().await
}

#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses((status = 200, description = "This description", body = Object)))]
async fn openapi_json() -> Response {
    static SPEC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let spec = SPEC.get_or_init(|| ApiDoc::openapi().to_json().unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], spec.as_str()).into_response()
}

/// The OpenAPI document, generated from the `#[utoipa::path]` attributes above.
#[allow(deprecated)]
#[derive(OpenApi)]
#[openapi(
    info(
        title = "sleap-rtc signaling server",
        description = "Rooms, accounts, worker tokens and discovery for sleap-rtc. Signaling itself is the WebSocket on /ws; errors are {detail, code}."
    ),
    paths(
        ws_root, ws_only, health, metrics, jwks, openapi_json, removed_endpoint, removed_room_endpoint,
        anonymous_signin, me, legacy_create_room, create_room, list_rooms, get_room, patch_room, delete_room,
        create_invite, join_room, list_members, remove_member, room_workers, authorized_keys, create_worker_token,
        list_worker_tokens, revoke_worker_token, delete_worker_token, create_account_key, list_account_keys,
        delete_account_key, register_public_key, list_public_keys, delete_public_key
    ),
    modifiers(&BearerAuth, &PATCH_ROOM_NEEDS_A_FIELD, &OPTIONAL_BODIES)
)]
pub struct ApiDoc;

// ---------------------------------------------------------------------------------------------
// Sign-in and legacy room creation
// ---------------------------------------------------------------------------------------------

fn client_ip(addr: &SocketAddr) -> IpAddr {
    addr.ip()
}

#[utoipa::path(post, path = "/anonymous-signin", tag = "auth", responses((status = 200, description = "A new anonymous user and its JWT", body = Signin), (status = 429, description = "Rate limited", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
async fn anonymous_signin(State(state): S, ConnectInfo(addr): ConnectInfo<SocketAddr>) -> ApiResult {
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
async fn me(State(state): S, user: AuthUser) -> ApiResult {
    let created = state.store.get_user(&user.user_id).await?.map(|u| u.created_at);
    Ok(Json(json!({"user_id": user.user_id, "username": user.username, "created_at": created})))
}

async fn new_room(state: &AppState, user: &AuthUser, name: String, ttl_secs: i64) -> ApiResult<(Room, String)> {
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
async fn legacy_create_room(State(state): S, user: AuthUser) -> ApiResult {
    let (room, token) = new_room(&state, &user, String::new(), LEGACY_ROOM_TTL_SECS).await?;
    Ok(Json(json!({"room_id": room.id, "token": token, "expires_at": room.expires_at})))
}

// ---------------------------------------------------------------------------------------------
// Rooms
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
struct CreateRoom {
    /// Up to 50 characters, no control characters.
    #[schema(max_length = 50, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    name: Option<String>,
    /// 1 to 365; default 30.
    #[serde(default, deserialize_with = "whole_days")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 365)]
    expires_in_days: Option<i64>,
}

#[utoipa::path(post, path = "/api/auth/rooms", tag = "rooms", security(("bearer" = [])), request_body(content = CreateRoom, description = "All fields optional; an empty body is accepted"), responses((status = 200, description = "The room; its token is shown once", body = CreatedRoom), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 415, description = "Body is not JSON", body = ErrorBody), (status = 422, description = "Body fails validation", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
async fn create_room(State(state): S, user: AuthUser, Body(b): Body<CreateRoom>) -> ApiResult {
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
enum RoleFilter {
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
enum RoomSort {
    Name,
    #[default]
    JoinedAt,
    ExpiresAt,
    Role,
}

#[derive(Deserialize, ToSchema, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum SortOrder {
    Asc,
    #[default]
    Desc,
}

/// Upstream's query parameters (`sleap-rtc room list` sends them all). An unknown value is a
/// 400 that names the allowed ones.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListRooms {
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
fn room_order(sort: RoomSort, a: &(Membership, Room), b: &(Membership, Room)) -> std::cmp::Ordering {
    let by = match sort {
        RoomSort::Name => a.1.name.to_lowercase().cmp(&b.1.name.to_lowercase()),
        RoomSort::JoinedAt => a.0.joined_at.cmp(&b.0.joined_at),
        // `None` (never expires) after every time.
        RoomSort::ExpiresAt => a.1.expires_at.map_or(i64::MAX, |t| t).cmp(&b.1.expires_at.map_or(i64::MAX, |t| t)),
        RoomSort::Role => a.0.role.as_str().cmp(b.0.role.as_str()),
    };
    by.then_with(|| a.1.id.cmp(&b.1.id))
}

fn room_json(room: &Room, m: &Membership, now: i64) -> Value {
    json!({
        "room_id": room.id, "name": room.name, "role": m.role.as_str(), "joined_at": m.joined_at,
        "created_at": room.created_at, "expires_at": room.expires_at, "expired": room.is_expired(now),
    })
}

#[utoipa::path(get, path = "/api/auth/rooms", tag = "rooms", security(("bearer" = [])), params(ListRooms), responses((status = 200, description = "Rooms the caller belongs to", body = RoomList), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
async fn list_rooms(State(state): S, user: AuthUser, Q(q): Q<ListRooms>) -> ApiResult {
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
async fn get_room(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
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
struct PatchRoom {
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
async fn patch_room(State(state): S, user: AuthUser, P(id): P<String>, Body(b): Body<PatchRoom>) -> ApiResult {
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
async fn delete_room(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
    ApiError::cluster_ready(&state)?;
    owner(&state, &id, &user.user_id, "delete a room").await?;
    state.store.delete_room(&id).await?;
    ws::drive(&state, |hub| hub.close_room(&id, "Room deleted", now_millis()));
    Ok(Json(json!({"status": "deleted", "room_id": id})))
}

#[utoipa::path(post, path = "/api/auth/rooms/{id}/invite", tag = "rooms", security(("bearer" = [])), params(("id" = String, Path, description = "Room id")), responses((status = 200, description = "A single-use invite code, shown once", body = InviteCreated), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 403, description = "Not allowed for this caller", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
async fn create_invite(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
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
struct JoinRoom {
    /// As given by the room owner (case and dashes do not matter).
    invite_code: String,
}

#[utoipa::path(post, path = "/api/auth/rooms/join", tag = "rooms", security(("bearer" = [])), request_body = JoinRoom, responses((status = 200, description = "Joined (or already a member)", body = Joined), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 415, description = "Body is not JSON", body = ErrorBody), (status = 422, description = "Body fails validation", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 404, description = "Unknown or expired invite code, or its room is gone", body = ErrorBody), (status = 429, description = "Rate limited", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
async fn join_room(
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
async fn list_members(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
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
async fn remove_member(State(state): S, user: AuthUser, P((id, target)): P<(String, String)>) -> ApiResult {
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
async fn room_workers(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
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

// ---------------------------------------------------------------------------------------------
// Worker tokens
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
struct CreateToken {
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
async fn create_worker_token(State(state): S, user: AuthUser, Body(b): Body<CreateToken>) -> ApiResult {
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
struct ListTokens {
    /// Only tokens of this room.
    room_id: Option<String>,
    /// Leave out revoked and expired tokens.
    #[serde(default)]
    active_only: bool,
}

#[utoipa::path(get, path = "/api/auth/tokens", tag = "tokens", security(("bearer" = [])), params(ListTokens), responses((status = 200, description = "Tokens the caller created", body = TokenList), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
async fn list_worker_tokens(State(state): S, user: AuthUser, Q(q): Q<ListTokens>) -> ApiResult {
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
async fn manageable_token(state: &AppState, user: &AuthUser, id: &str) -> ApiResult<WorkerToken> {
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
async fn revoke_worker_token(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
    ApiError::cluster_ready(&state)?;
    let t = manageable_token(&state, &user, &id).await?;
    state.store.revoke_worker_token(&t.id, unix_now()).await?;
    let disconnected = evict_credential(&state, &format!("wt:{}", t.id));
    Ok(Json(json!({"revoked": true, "id": t.id, "disconnected": disconnected})))
}

#[utoipa::path(delete, path = "/api/auth/tokens/{id}", tag = "tokens", security(("bearer" = [])), params(("id" = String, Path, description = "Token id (not the secret)")), responses((status = 200, description = "Deleted; peers using it were disconnected", body = Deleted), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 403, description = "Not allowed for this caller", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
async fn delete_worker_token(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
    ApiError::cluster_ready(&state)?;
    let t = manageable_token(&state, &user, &id).await?;
    state.store.delete_worker_token(&t.id).await?;
    let disconnected = evict_credential(&state, &format!("wt:{}", t.id));
    Ok(Json(json!({"deleted": t.id, "disconnected": disconnected})))
}

fn evict_credential(state: &Arc<AppState>, credential_id: &str) -> usize {
    let mut n = 0;
    ws::drive(state, |hub| n = hub.revoke_credential(credential_id, now_millis()));
    n
}

// ---------------------------------------------------------------------------------------------
// Account keys
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
struct CreateKey {
    /// Up to 64 characters, no control characters; default `default`.
    #[schema(max_length = 64, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    name: Option<String>,
    /// 1 to 365; no expiry when absent.
    #[serde(default, deserialize_with = "whole_days")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 365)]
    expires_in_days: Option<i64>,
}

#[utoipa::path(post, path = "/api/auth/account-keys", tag = "auth", security(("bearer" = [])), request_body(content = CreateKey, description = "All fields optional; an empty body is accepted"), responses((status = 200, description = "The key; its secret is shown once", body = KeyCreated), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 415, description = "Body is not JSON", body = ErrorBody), (status = 422, description = "Body fails validation", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
async fn create_account_key(State(state): S, user: AuthUser, Body(b): Body<CreateKey>) -> ApiResult {
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
async fn list_account_keys(State(state): S, user: AuthUser) -> ApiResult {
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
async fn delete_account_key(State(state): S, user: AuthUser, P(id): P<String>) -> ApiResult {
    ApiError::cluster_ready(&state)?;
    if !state.store.delete_account_key(&user.user_id, &id).await? {
        return Err(ApiError::not_found("Key not found"));
    }
    let disconnected = evict_credential(&state, &format!("acct:{id}"));
    Ok(Json(json!({"deleted": id, "disconnected": disconnected})))
}

// ---------------------------------------------------------------------------------------------
// Ed25519 public keys (upstream's P2P challenge: a worker accepts a signature by any key of a
// member of its room)
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
struct RegisterPublicKey {
    /// The raw 32-byte Ed25519 public key in url-safe base64 (padding optional).
    #[schema(format = "ed25519-public-key", example = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")]
    public_key: String,
    /// Up to 64 characters, no control characters; default `default`.
    #[schema(max_length = 64, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    device_name: Option<String>,
}

/// The url-safe base64 alphabet, padding optional, trailing bits must be zero (so every key has
/// exactly one accepted spelling besides the padding).
const KEY_B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Checks that `raw` is an Ed25519 public key a worker could verify signatures with, and returns
/// its canonical spelling (url-safe base64 without padding, as upstream clients send it).
fn parse_public_key(raw: &str) -> ApiResult<String> {
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

fn public_key_json(k: &PublicKey) -> Value {
    json!({"key_id": k.id, "public_key": k.public_key, "device_name": k.device_name, "created_at": k.created_at})
}

#[utoipa::path(post, path = "/api/auth/public-keys", tag = "auth", security(("bearer" = [])), request_body = RegisterPublicKey, responses((status = 201, description = "Registered", body = PublicKeyInfo), (status = 200, description = "The caller had registered this key already: the stored record, unchanged", body = PublicKeyInfo), (status = 400, description = "Malformed request, or the key is not a usable Ed25519 public key", body = ErrorBody), (status = 415, description = "Body is not JSON", body = ErrorBody), (status = 422, description = "Body fails validation", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 409, description = "Another user registered this key (CONFLICT), or the caller has 32 keys already (TOO_MANY_KEYS)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
async fn register_public_key(State(state): S, user: AuthUser, Body(b): Body<RegisterPublicKey>) -> ApiResult<Response> {
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
async fn list_public_keys(State(state): S, user: AuthUser) -> ApiResult {
    let keys: Vec<Value> = state.store.list_public_keys(&user.user_id).await?.iter().map(public_key_json).collect();
    Ok(Json(json!({"public_keys": keys})))
}

#[utoipa::path(delete, path = "/api/auth/public-keys/{key_id}", tag = "auth", security(("bearer" = [])), params(("key_id" = String, Path, description = "Key id (from the registration or the listing)")), responses((status = 200, description = "Deleted; workers stop accepting it at their next fetch of the room's keys", body = PublicKeyDeleted), (status = 400, description = "Malformed request (bad JSON, query or path)", body = ErrorBody), (status = 401, description = "Missing, invalid or expired credentials", body = ErrorBody), (status = 404, description = "No such resource (or no access to it)", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
async fn delete_public_key(State(state): S, user: AuthUser, P(key_id): P<String>) -> ApiResult {
    if !state.store.delete_public_key(&user.user_id, &key_id).await? {
        return Err(ApiError::not_found("Key not found"));
    }
    Ok(Json(json!({"deleted": key_id})))
}

/// Who may read a room's authorized keys: a worker token of that room (what `sleap-rtc worker
/// --token` holds; checked as at registration: active, this room, its creator still a member),
/// or a member's JWT or account key.
async fn may_read_room_keys(state: &AppState, headers: &HeaderMap, room_id: &str) -> ApiResult<()> {
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
async fn authorized_keys(State(state): S, headers: HeaderMap, P(id): P<String>) -> ApiResult {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_origins() {
        let h = |origin: Option<&str>, host: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, host.parse().unwrap());
            if let Some(o) = origin {
                m.insert(header::ORIGIN, o.parse().unwrap());
            }
            m
        };
        let none: Vec<String> = vec![];
        assert!(origin_allowed(&h(None, "rtc.example.org"), &none), "non-browser clients");
        assert!(origin_allowed(&h(Some("https://rtc.example.org"), "rtc.example.org"), &none), "same origin");
        assert!(origin_allowed(&h(Some("http://127.0.0.1:8080"), "127.0.0.1:8080"), &none));
        assert!(!origin_allowed(&h(Some("https://evil.example"), "rtc.example.org"), &none));
        assert!(!origin_allowed(&h(Some("https://rtc.example.org.evil.example"), "rtc.example.org"), &none));
        assert!(!origin_allowed(&h(Some("null"), "rtc.example.org"), &none), "sandboxed or file pages");
        let lab = vec!["https://lab.example.org/".to_owned()];
        assert!(origin_allowed(&h(Some("https://lab.example.org"), "rtc.example.org"), &lab));
        assert!(origin_allowed(&h(Some("https://evil.example"), "x"), &["*".to_owned()]));
    }

    /// Minting an id or a secret without the OS's randomness is refused with a status every
    /// minting handler documents (it used to panic inside the handler, dropping the connection).
    #[test]
    fn no_randomness_is_a_documented_refusal() {
        let e = ApiError::from(crate::auth::NoRandomness(getrandom::Error::UNEXPECTED));
        assert_eq!((e.status, e.code), (StatusCode::SERVICE_UNAVAILABLE, "RANDOMNESS_UNAVAILABLE"));
    }

    #[test]
    fn metrics_open_on_loopback_and_bearer_protected_elsewhere() {
        let lan: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(metrics_allowed("127.0.0.1".parse().unwrap(), None, None));
        assert!(metrics_allowed("::1".parse().unwrap(), None, Some("t")));
        assert!(metrics_allowed("::ffff:127.0.0.1".parse().unwrap(), None, None));
        assert!(!metrics_allowed(lan, None, None));
        assert!(!metrics_allowed(lan, Some("t"), None), "no token configured: remote scrapes refused");
        assert!(!metrics_allowed(lan, Some("wrong"), Some("t")));
        assert!(!metrics_allowed(lan, None, Some("t")));
        assert!(metrics_allowed(lan, Some("t"), Some("t")));
    }
}
