//! The web dashboard: a handful of hand-written ES modules, a stylesheet and an icon, compiled into
//! the binary (`include_bytes!`) so the server works offline and a page can never load code from
//! anywhere but here. The page itself is only a client of the public HTTP API and of WebSocket
//! signaling on the same origin; it has no endpoint of its own and no server-side session.
//!
//! Every response carries a Content-Security-Policy that allows scripts, styles and connections
//! from this origin only and no inline script, so an injected string can never run: the page
//! holds a bearer credential (in `sessionStorage`), and that policy is what keeps it there.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Directives: nothing by default; the app's own modules, styles, icon and same-origin
/// fetch/WebSocket only. `connect-src 'self'` covers `ws:`/`wss:` to this host (CSP level 3).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The files under `/dashboard/`, by name.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../dashboard/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_bytes!("../dashboard/api.js")),
    ("live.js", "text/javascript; charset=utf-8", include_bytes!("../dashboard/live.js")),
    ("chart.js", "text/javascript; charset=utf-8", include_bytes!("../dashboard/chart.js")),
    ("dom.js", "text/javascript; charset=utf-8", include_bytes!("../dashboard/dom.js")),
    ("style.css", "text/css; charset=utf-8", include_bytes!("../dashboard/style.css")),
    ("icon.svg", "image/svg+xml", include_bytes!("../dashboard/icon.svg")),
];

const INDEX: &[u8] = include_bytes!("../dashboard/index.html");

/// The page (`GET /` without a WebSocket upgrade).
pub fn index(req: &HeaderMap) -> Response {
    serve(req, "text/html; charset=utf-8", INDEX)
}

/// `GET /dashboard/{file}`.
pub fn asset(req: &HeaderMap, name: &str) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, ty, body)) => serve(req, ty, body),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The names of every embedded file, for tests.
pub fn asset_names() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|(n, _, _)| *n)
}

fn serve(req: &HeaderMap, content_type: &'static str, body: &'static [u8]) -> Response {
    // Revalidated on every load (`no-cache`) so a server upgrade is seen at once; the ETag makes
    // that a 304 when nothing changed. Hashing a few KiB per request costs microseconds.
    let etag = format!("\"{}\"", &blake3::hash(body).to_hex()[..32]);
    let fresh = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(',').any(|t| {
            let t = t.trim();
            t == etag || t.strip_prefix("W/") == Some(etag.as_str())
        })
    });
    let mut resp = if fresh { StatusCode::NOT_MODIFIED.into_response() } else { body.into_response() };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_reference_is_embedded_and_nothing_is_inline_or_remote() {
        let html = std::str::from_utf8(INDEX).unwrap();
        for (i, _) in html.match_indices("/dashboard/") {
            let name: String = html[i + 11..].chars().take_while(|c| *c != '"').collect();
            assert!(asset_names().any(|n| n == name), "index.html names {name}, which is not embedded");
        }
        assert!(!html.contains("<script>") && !html.contains("style="), "no inline script or style");
        for (name, _, body) in ASSETS {
            // The SVG namespace is an identifier, not something fetched.
            let text = String::from_utf8_lossy(body).replace("http://www.w3.org/2000/svg", "");
            for remote in ["http://", "https://", "@import"] {
                assert!(!text.contains(remote), "{name} refers to {remote}: everything must come from this server");
            }
            assert!(!text.contains("innerHTML"), "{name}: build DOM nodes, never parse strings as HTML");
            assert!(!text.contains("eval("), "{name}: no eval");
        }
    }

    #[test]
    fn etag_revalidation() {
        let first = index(&HeaderMap::new());
        assert_eq!(first.status(), StatusCode::OK);
        let etag = first.headers()[header::ETAG].clone();
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(index(&again).status(), StatusCode::NOT_MODIFIED);
        assert_eq!(asset(&HeaderMap::new(), "../Cargo.toml").status(), StatusCode::NOT_FOUND);
    }
}
