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

mod keys;
mod ops;
mod rooms;
mod signin;
mod tokens;

use keys::*;
use ops::*;
use rooms::*;
use signin::*;
use tokens::*;

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

/// The OpenAPI document, generated from the `#[utoipa::path]` attributes of the handlers.
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
