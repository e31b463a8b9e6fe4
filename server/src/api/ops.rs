//! The WebSocket upgrade, the dashboard's files, health, metrics, the JWKS, the OpenAPI
//! document, and upstream's removed endpoints (410).

use super::*;

#[utoipa::path(get, path = "/", tag = "signaling", responses((status = 200, description = "Without an Upgrade header: the web dashboard (HTML). With one: the WebSocket signaling protocol (101).", body = String, content_type = "text/html")))]
pub(super) async fn ws_root(
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
pub(super) async fn dashboard_asset(headers: HeaderMap, Path(name): Path<String>) -> Response {
    crate::dashboard::asset(&headers, &name)
}

#[utoipa::path(get, path = "/ws", tag = "signaling", responses((status = 101, description = "WebSocket signaling protocol"), (status = 403, description = "A browser page from a web origin that is not allowed", body = ErrorBody), (status = 426, description = "Not a WebSocket upgrade", body = ErrorBody), (status = 503, description = "Storage unavailable or server at capacity", body = ErrorBody)))]
pub(super) async fn ws_only(
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

pub(super) fn accept(
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
pub(super) fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
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
pub(super) async fn health(State(state): S) -> Response {
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
pub(super) async fn metrics(
    State(state): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
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
pub(super) fn metrics_allowed(ip: IpAddr, presented: Option<&str>, required: Option<&str>) -> bool {
    let loopback = match ip {
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        IpAddr::V4(v4) => v4.is_loopback(),
    };
    loopback || matches!((presented, required), (Some(p), Some(r)) if constant_eq(p.as_bytes(), r.as_bytes()))
}

pub(super) fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    blake3::hash(a) == blake3::hash(b)
}

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "ops", responses((status = 200, description = "Public keys that verify the JWTs and peer tickets this server signs", body = Object)))]
pub(super) async fn jwks(State(state): S) -> Json<Value> {
    Json(state.keys.jwks())
}

#[utoipa::path(post, path = "/delete-peer", tag = "legacy", responses((status = 410, description = "Removed endpoint", body = ErrorBody)))]
#[deprecated(note = "upstream's unauthenticated delete endpoint; answers 410 Gone")]
pub(super) async fn removed_endpoint() -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "GONE",
        "this unauthenticated endpoint was removed; rooms are deleted by their owner with DELETE /api/auth/rooms/{id}",
    )
}

#[utoipa::path(post, path = "/delete-peers-and-room", tag = "legacy", responses((status = 410, description = "Removed endpoint", body = ErrorBody)))]
#[deprecated(note = "upstream's unauthenticated delete endpoint; answers 410 Gone")]
#[allow(deprecated)]
pub(super) async fn removed_room_endpoint() -> ApiError {
    removed_endpoint().await
}

#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses((status = 200, description = "This description", body = Object)))]
pub(super) async fn openapi_json() -> Response {
    static SPEC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let spec = SPEC.get_or_init(|| ApiDoc::openapi().to_json().unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], spec.as_str()).into_response()
}
