//! Credentials: the server's JWT signing key, JWT issue/verify, and random secrets.
//!
//! JWTs are EdDSA (Ed25519): small keys, deterministic signatures, fast verification, and
//! supported by PyJWT, jose and WebCrypto. The key pair is created in the data directory on first
//! start (`jwt-ed25519.pem`, mode 0600) and its public half is served as a JWKS with a `kid`, so
//! workers and other services can verify tokens offline.
//!
//! Secrets (worker tokens, account keys, room tokens, invite codes) are random with at least 96
//! bits and are stored only as BLAKE3 hashes; a high-entropy secret needs no salt or slow hash.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const ISSUER: &str = "sleap-rtc";
pub const AUDIENCE: &str = "sleap-rtc";
/// Prefix of worker tokens (upstream's per-room API keys).
pub const WORKER_TOKEN_PREFIX: &str = "slp_";
/// Prefix of account keys; checked before [`WORKER_TOKEN_PREFIX`], which it extends.
pub const ACCOUNT_KEY_PREFIX: &str = "slp_acct_";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub username: String,
    pub iat: i64,
    pub exp: i64,
    pub iss: String,
    pub aud: String,
}

pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    kid: String,
    public_x: String,
    ttl_secs: i64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("kid", &self.kid).finish_non_exhaustive()
    }
}

const KEY_FILE: &str = "jwt-ed25519.pem";

impl Keys {
    /// Loads the signing key from `dir`, creating it on first start.
    pub fn load_or_create(dir: &Path, ttl_secs: i64) -> anyhow::Result<Keys> {
        let path = dir.join(KEY_FILE);
        let signing = if path.exists() {
            read_key(&path)?
        } else {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
            let key = SigningKey::from_bytes(&seed);
            let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| anyhow::anyhow!("encoding JWT key: {e}"))?;
            write_private(&path, pem.as_bytes())?;
            key
        };
        Self::from_signing_key(&signing, ttl_secs)
    }

    /// Loads the signing key from a file that must exist (`--jwt-key-file`; shared by the
    /// instances of a cluster).
    pub fn load(path: &Path, ttl_secs: i64) -> anyhow::Result<Keys> {
        Self::from_signing_key(&read_key(path)?, ttl_secs)
    }

    fn from_signing_key(signing: &SigningKey, ttl_secs: i64) -> anyhow::Result<Keys> {
        let pem = signing.to_pkcs8_pem(LineEnding::LF).map_err(|e| anyhow::anyhow!("encoding JWT key: {e}"))?;
        let encoding = EncodingKey::from_ed_pem(pem.as_bytes())?;
        let public = signing.verifying_key().to_bytes();
        let public_x = B64.encode(public);
        let decoding = DecodingKey::from_ed_components(&public_x)?;
        let kid = blake3::hash(&public).to_hex()[..16].to_owned();
        Ok(Keys { encoding, decoding, kid, public_x, ttl_secs })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key set, as served at `/.well-known/jwks.json`.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "x": self.public_x, "kid": self.kid, "alg": "EdDSA", "use": "sig"
        }]})
    }

    pub fn issue(&self, user_id: &str, username: &str, now: i64) -> anyhow::Result<String> {
        let claims = Claims {
            sub: user_id.to_owned(),
            username: username.to_owned(),
            iat: now,
            exp: now + self.ttl_secs,
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, &claims, &self.encoding)?)
    }

    /// Verifies signature, issuer, audience and expiry (60 s leeway for clock skew).
    /// Signs a peer ticket (see `sleap_rtc_core::job::auth`). Its audience differs from a user
    /// JWT's, so [`Keys::verify`] refuses a ticket and a worker refuses a JWT.
    pub fn issue_ticket(&self, facts: &sleap_rtc_core::room::TicketFacts, now: i64) -> anyhow::Result<String> {
        use sleap_rtc_core::job::auth::{TICKET_AUDIENCE, TICKET_TTL_SECS, TicketClaims};
        let claims = TicketClaims {
            iss: ISSUER.into(),
            aud: TICKET_AUDIENCE.into(),
            sub: facts.user_id.clone(),
            room: facts.room_id.clone(),
            client: facts.client.clone(),
            worker: facts.worker.clone(),
            fp: facts.fingerprint.clone(),
            iat: now,
            exp: now + TICKET_TTL_SECS,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, &claims, &self.encoding)?)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[AUDIENCE]);
        v.leeway = 60;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &v).map(|d| d.claims).map_err(|e| e.to_string())
    }
}

fn read_key(path: &Path) -> anyhow::Result<SigningKey> {
    let pem =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read JWT key {}: {e}", path.display()))?;
    SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| anyhow::anyhow!("JWT key {} is not an Ed25519 PKCS#8 PEM: {e}", path.display()))
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| anyhow::anyhow!("cannot create JWT key {}: {e}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// The operating system gave no random bytes. Ids and secrets are made from nothing else (a
/// guessable fallback would mint guessable credentials), so whatever needed them is refused.
#[derive(Debug, thiserror::Error)]
#[error("no randomness from the operating system: {0}")]
pub struct NoRandomness(pub(crate) getrandom::Error);

/// `n` random bytes from the OS.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], NoRandomness> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(NoRandomness)?;
    Ok(b)
}

/// A 96-bit random identifier in lowercase hex (24 characters).
pub fn new_id() -> Result<String, NoRandomness> {
    Ok(hex(&random_bytes::<12>()?))
}

/// A short random suffix for server-assigned peer ids.
pub fn short_suffix() -> Result<String, NoRandomness> {
    Ok(hex(&random_bytes::<3>()?))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A secret with `prefix` and 192 random bits, url-safe.
pub fn new_secret(prefix: &str) -> Result<String, NoRandomness> {
    Ok(format!("{prefix}{}", B64.encode(random_bytes::<24>()?)))
}

/// A room token: 128 random bits, url-safe (upstream used 24 bits, B6).
pub fn new_room_token() -> Result<String, NoRandomness> {
    Ok(B64.encode(random_bytes::<16>()?))
}

/// Crockford base32 without ambiguous letters: easy to read aloud and type.
const INVITE_ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
pub const INVITE_LEN: usize = 12;

/// A 60-bit invite code, upper case, e.g. `7KQ2M9XW4HTR`.
pub fn new_invite_code() -> Result<String, NoRandomness> {
    Ok(random_bytes::<INVITE_LEN>()?.iter().map(|b| INVITE_ALPHABET[(b & 31) as usize] as char).collect())
}

/// Normalizes what a user typed (case, spaces, dashes) into the canonical invite code.
pub fn normalize_invite(code: &str) -> String {
    code.chars().filter(|c| !c.is_whitespace() && *c != '-').flat_map(char::to_uppercase).collect()
}

/// The stored form of a secret.
pub fn hash_secret(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// Constant-time comparison of a presented secret against a stored hash.
pub fn secret_matches(secret: &str, stored_hash: &str) -> bool {
    match blake3::Hash::from_hex(stored_hash) {
        Ok(h) => blake3::hash(secret.as_bytes()) == h,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_round_trip_and_rejections() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::load_or_create(dir.path(), 3600).unwrap();
        let t = keys.issue("u1", "alice", 1_000).unwrap();
        // Expired long ago relative to the real clock.
        assert!(keys.verify(&t).unwrap_err().contains("Expired"));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let t = keys.issue("u1", "alice", now).unwrap();
        let c = keys.verify(&t).unwrap();
        assert_eq!((c.sub.as_str(), c.username.as_str()), ("u1", "alice"));
        // Same key after a restart.
        let again = Keys::load_or_create(dir.path(), 3600).unwrap();
        assert_eq!(again.kid(), keys.kid());
        assert!(again.verify(&t).is_ok());
        // Another server's key does not verify.
        let other = Keys::load_or_create(tempfile::tempdir().unwrap().path(), 3600).unwrap();
        assert!(other.verify(&t).is_err());
        assert!(keys.verify("garbage").is_err());
        let mut tampered = t.clone();
        tampered.pop();
        assert!(keys.verify(&tampered).is_err());
    }

    #[test]
    fn secrets_hash_and_match() {
        let s = new_secret(ACCOUNT_KEY_PREFIX).unwrap();
        assert!(s.starts_with("slp_acct_") && s.len() == 9 + 32);
        let h = hash_secret(&s);
        assert!(secret_matches(&s, &h));
        assert!(!secret_matches("slp_acct_x", &h));
        assert!(!secret_matches(&s, "not-hex"));
        assert_eq!(new_id().unwrap().len(), 24);
        assert_eq!(normalize_invite(" abcd-efgh "), "ABCDEFGH");
        assert_eq!(new_invite_code().unwrap().len(), INVITE_LEN);
    }
}
