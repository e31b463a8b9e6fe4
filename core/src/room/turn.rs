//! TURN relay credentials in the TURN REST scheme (draft-uberti-behave-turn-rest, what coturn's
//! `use-auth-secret` checks): username `EXPIRY:PEER`, password base64(HMAC-SHA1(secret,
//! username)). The TURN server needs only the shared secret, never a list of users, and a
//! credential stops working at EXPIRY (Unix seconds) however it leaked.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use super::Millis;
use crate::signal::IceServer;

/// The TURN servers of this deployment and the secret they share with us.
#[derive(Clone)]
pub struct TurnRest {
    urls: Vec<String>,
    secret: Vec<u8>,
    ttl_secs: u64,
}

impl std::fmt::Debug for TurnRest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnRest").field("urls", &self.urls).field("ttl_secs", &self.ttl_secs).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TurnConfigError {
    #[error("a TURN secret is set but no turn: URL")]
    NoUrls,
    #[error("`{0}` is not a turn: or turns: URL")]
    BadUrl(String),
    #[error("the TURN secret is empty")]
    EmptySecret,
    #[error("the TURN credential lifetime must be at least 60 seconds")]
    TtlTooShort,
}

impl TurnRest {
    pub fn new(urls: Vec<String>, secret: &[u8], ttl_secs: u64) -> Result<TurnRest, TurnConfigError> {
        if urls.is_empty() {
            return Err(TurnConfigError::NoUrls);
        }
        if let Some(bad) = urls.iter().find(|u| !(u.starts_with("turn:") || u.starts_with("turns:"))) {
            return Err(TurnConfigError::BadUrl(bad.clone()));
        }
        if secret.is_empty() {
            return Err(TurnConfigError::EmptySecret);
        }
        if ttl_secs < 60 {
            return Err(TurnConfigError::TtlTooShort);
        }
        Ok(TurnRest { urls, secret: secret.to_vec(), ttl_secs })
    }

    /// The ICE server entry for `peer`, valid for the configured lifetime from `now`.
    pub fn ice_server(&self, peer: &str, now: Millis) -> IceServer {
        let expiry = now.0 / 1000 + self.ttl_secs;
        let username = format!("{expiry}:{peer}");
        // HMAC takes a key of any length: this cannot fail.
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(&self.secret).expect("HMAC accepts any key length");
        mac.update(username.as_bytes());
        let credential = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        IceServer { urls: self.urls.clone(), username: Some(username), credential: Some(credential) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_follow_the_turn_rest_scheme() {
        let t = TurnRest::new(vec!["turn:relay.example.org:3478".into()], b"north-wind", 3600).unwrap();
        let s = t.ice_server("peer-1", Millis(1_700_000_000_999));
        assert_eq!(s.urls, vec!["turn:relay.example.org:3478".to_string()]);
        assert_eq!(s.username.as_deref(), Some("1700003600:peer-1"));
        // Python: base64(hmac.new(b"north-wind", b"1700003600:peer-1", hashlib.sha1).digest())
        assert_eq!(s.credential.as_deref(), Some("1n76jQZ45o1DC1CvY61MiUYPePc="));
        assert!(!format!("{t:?}").contains("north-wind"), "Debug must not show the secret");
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert_eq!(TurnRest::new(vec![], b"s", 3600).unwrap_err(), TurnConfigError::NoUrls);
        assert!(matches!(TurnRest::new(vec!["stun:x".into()], b"s", 3600), Err(TurnConfigError::BadUrl(_))));
        assert_eq!(TurnRest::new(vec!["turn:x".into()], b"", 3600).unwrap_err(), TurnConfigError::EmptySecret);
        assert_eq!(TurnRest::new(vec!["turn:x".into()], b"s", 5).unwrap_err(), TurnConfigError::TtlTooShort);
    }
}
