//! Peer authentication of this project's own clients: a server-signed ticket bound to the
//! connection, or the room-secret MAC.

use super::*;

impl<R: Runtime> Worker<R> {
    pub(super) async fn jwks_key(&self, kid: Option<&str>) -> Result<jsonwebtoken::DecodingKey, String> {
        let mut cache = self.jwks.lock().await;
        let find = |set: &jsonwebtoken::jwk::JwkSet| {
            let jwk = match kid {
                Some(k) => set.find(k),
                None => set.keys.first(),
            };
            jwk.and_then(|j| jsonwebtoken::DecodingKey::from_jwk(j).ok())
        };
        if let Some(k) = cache.0.as_ref().and_then(find) {
            return Ok(k);
        }
        // Unknown key: refetch, but not more than every 10 s (a bogus kid must not make us
        // hammer the server).
        let recent = cache.1.is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        if recent && cache.0.is_some() {
            return Err("unknown signing key".into());
        }
        let url = format!("{}/.well-known/jwks.json", self.http_base);
        crate::init_tls();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
        // reqwest is tokio-based: run it with a tokio reactor whatever our runtime is.
        let set: jsonwebtoken::jwk::JwkSet = R::tokio_compat(async {
            http.get(&url)
                .send()
                .await
                .map_err(|e| format!("cannot fetch {url}: {e}"))?
                .json()
                .await
                .map_err(|e| format!("bad JWKS from {url}: {e}"))
        })
        .await?;
        cache.1 = Some(std::time::Instant::now());
        let k = find(&set).ok_or_else(|| "unknown signing key".to_owned());
        cache.0 = Some(set);
        k
    }

    pub(super) async fn verify_ticket(
        &self,
        ctx: &PeerCtx,
        c: &PeerConnection<R>,
        ticket: &str,
    ) -> Result<String, AuthError> {
        let header = jsonwebtoken::decode_header(ticket).map_err(|e| AuthError::BadSignature(e.to_string()))?;
        if header.alg != jsonwebtoken::Algorithm::EdDSA {
            return Err(AuthError::BadSignature("tickets are EdDSA-signed".into()));
        }
        let key = self.jwks_key(header.kid.as_deref()).await.map_err(AuthError::BadSignature)?;
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        v.set_audience(&[auth::TICKET_AUDIENCE]);
        v.set_issuer(&["sleap-rtc"]);
        v.leeway = auth::LEEWAY_SECS as u64;
        let claims = jsonwebtoken::decode::<TicketClaims>(ticket, &key, &v)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                jsonwebtoken::errors::ErrorKind::InvalidAudience => AuthError::WrongAudience,
                _ => AuthError::BadSignature(e.to_string()),
            })?
            .claims;
        let fp = c.remote_fingerprint().filter(|f| !f.is_empty()).ok_or(AuthError::WrongFingerprint)?;
        let expected = Expected { room: &ctx.room, worker: &ctx.me, client: c.remote_peer(), client_fp: &fp };
        auth::check_ticket(&claims, &expected, unix_now() as i64)?;
        Ok(claims.sub)
    }

    /// Returns the authenticated user id (or `room-secret`).
    pub(super) async fn authenticate(&self, ctx: &PeerCtx, c: &PeerConnection<R>) -> Result<String, AuthError> {
        // Only the room-secret proof covers a nonce; a ticket is bound to the connection instead.
        let nonce = if self.cfg.room_secret.is_some() {
            let nonce = random_hex(32).map_err(|e| {
                tracing::error!(error = %e, "cannot make a challenge nonce");
                AuthError::NoChallenge
            })?;
            let _ = c.send_message(&JobMsg::AuthChallenge { nonce: nonce.clone() }.to_value());
            nonce
        } else {
            String::new()
        };
        let first = timeout::<R, _>(AUTH_TIMEOUT, async {
            loop {
                match c.recv_message().await {
                    None => return None,
                    Some(t) => match JobMsg::decode(&t) {
                        Ok(None) => continue,
                        Ok(Some(m)) => return Some(m),
                        Err(_) => return Some(JobMsg::AuthResponse { mac: String::new() }),
                    },
                }
            }
        })
        .await
        .map_err(|_| AuthError::Timeout)?
        .ok_or(AuthError::Missing)?;
        match (first, &self.cfg.room_secret) {
            (JobMsg::AuthResponse { mac }, Some(secret)) => {
                let worker_fp = c.local_fingerprint();
                let client_fp = c.remote_fingerprint().unwrap_or_default();
                let want =
                    auth::room_secret_mac(secret, &ctx.room, &nonce, &ctx.me, c.remote_peer(), worker_fp, &client_fp);
                if auth::mac_matches(&want, &mac) { Ok("room-secret".into()) } else { Err(AuthError::BadMac) }
            }
            (JobMsg::AuthTicket { .. }, Some(_)) => Err(AuthError::BadMac),
            (JobMsg::AuthTicket { ticket }, None) => self.verify_ticket(ctx, c, &ticket).await,
            _ => Err(AuthError::Missing),
        }
    }
}
