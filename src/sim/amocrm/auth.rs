//! amoCRM's OAuth 2.0 and long-lived token rules for the simulator: access tokens that
//! expire, refresh tokens that rotate on every use, single-use authorisation codes.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Why a token endpoint call failed: HTTP status and the problem detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GrantError {
    pub status: u16,
    pub title: &'static str,
    pub detail: String,
}

impl GrantError {
    fn new(status: u16, title: &'static str, detail: impl Into<String>) -> Self {
        GrantError {
            status,
            title,
            detail: detail.into(),
        }
    }
}

/// Token state of the simulated account. No `Debug`: it holds live tokens.
pub(crate) struct Auth {
    long_lived: Option<String>,
    client_id: String,
    client_secret: String,
    redirect_uri: String,
    ttl: Duration,
    /// Access token → when it stops working.
    access: HashMap<String, Instant>,
    /// The newest refresh token.
    current_refresh: String,
    /// The refresh token `current_refresh` was issued for: it keeps working until
    /// `current_refresh` is used for the first time (amoCRM's grace for lost answers).
    previous_refresh: Option<String>,
    /// Refresh tokens that answer "Token has been revoked".
    revoked: HashSet<String>,
    used_codes: HashSet<String>,
    counter: u64,
    salt: u64,
}

impl Auth {
    pub(crate) fn new(
        long_lived: Option<String>,
        client_id: String,
        client_secret: String,
        redirect_uri: String,
        initial_refresh: String,
        ttl: Duration,
        seed: u64,
    ) -> Self {
        Auth {
            long_lived,
            client_id,
            client_secret,
            redirect_uri,
            ttl,
            access: HashMap::new(),
            current_refresh: initial_refresh,
            previous_refresh: None,
            revoked: HashSet::new(),
            used_codes: HashSet::new(),
            counter: 0,
            salt: seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0xa40c,
        }
    }

    /// The newest refresh token.
    pub(crate) fn current_refresh(&self) -> String {
        self.current_refresh.clone()
    }

    /// Makes every access token issued so far expired.
    pub(crate) fn expire_access_tokens(&mut self) {
        let now = Instant::now();
        for exp in self.access.values_mut() {
            *exp = now;
        }
    }

    /// Checks an `Authorization` header; `Err(detail)` for a 401.
    pub(crate) fn check_bearer(&self, header: Option<&str>) -> Result<(), &'static str> {
        let Some(h) = header else {
            return Err("Authorization header is missing");
        };
        let Some(token) = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .map(str::trim)
        else {
            return Err("Authorization header must use the Bearer scheme");
        };
        if self.long_lived.as_deref() == Some(token) {
            return Ok(());
        }
        match self.access.get(token) {
            Some(exp) if Instant::now() < *exp => Ok(()),
            Some(_) => Err("Access token has expired"),
            None => Err("Access token is invalid"),
        }
    }

    fn fresh(&mut self, kind: &str) -> String {
        self.counter += 1;
        let mix = (self.counter ^ self.salt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        format!("amo-{kind}-{}-{mix:016x}", self.counter)
    }

    fn issue(&mut self, now_unix: i64) -> Value {
        let access = self.fresh("access");
        self.access
            .insert(access.clone(), Instant::now() + self.ttl);
        json!({
            "token_type": "Bearer",
            "expires_in": self.ttl.as_secs(),
            "server_time": now_unix,
            "access_token": access,
            "refresh_token": self.current_refresh,
        })
    }

    /// `POST /oauth2/access_token` with the request parameters (JSON or form).
    pub(crate) fn grant(
        &mut self,
        p: &HashMap<String, String>,
        now_unix: i64,
    ) -> Result<Value, GrantError> {
        let get = |k: &str| p.get(k).map(String::as_str).unwrap_or("");
        for k in ["client_id", "client_secret", "grant_type", "redirect_uri"] {
            if get(k).is_empty() {
                return Err(GrantError::new(
                    400,
                    "Bad Request",
                    format!("Parameter {k} is required"),
                ));
            }
        }
        if get("client_id") != self.client_id || get("client_secret") != self.client_secret {
            return Err(GrantError::new(
                401,
                "Unauthorized",
                "Client authentication failed",
            ));
        }
        if get("redirect_uri") != self.redirect_uri {
            return Err(GrantError::new(
                400,
                "Bad Request",
                "redirect_uri does not match the integration",
            ));
        }
        match get("grant_type") {
            "refresh_token" => {
                let t = get("refresh_token");
                if t.is_empty() {
                    return Err(GrantError::new(
                        400,
                        "Bad Request",
                        "Parameter refresh_token is required",
                    ));
                }
                if t == self.current_refresh {
                    // The newest token is used: the one before it dies now.
                    if let Some(prev) = self.previous_refresh.take() {
                        self.revoked.insert(prev);
                    }
                    self.previous_refresh = Some(self.current_refresh.clone());
                } else if self.previous_refresh.as_deref() == Some(t) {
                    // The newest token was never used (its answer was lost): it is
                    // superseded by the one issued now.
                    self.revoked.insert(self.current_refresh.clone());
                } else if self.revoked.contains(t) {
                    return Err(GrantError::new(
                        401,
                        "Unauthorized",
                        "Token has been revoked",
                    ));
                } else {
                    return Err(GrantError::new(
                        401,
                        "Unauthorized",
                        "Refresh token is invalid",
                    ));
                }
                self.current_refresh = self.fresh("refresh");
                Ok(self.issue(now_unix))
            }
            "authorization_code" => {
                let code = get("code");
                if !code.starts_with("amo-code-") {
                    return Err(GrantError::new(
                        400,
                        "Bad Request",
                        "Authorization code is invalid",
                    ));
                }
                if !self.used_codes.insert(code.to_string()) {
                    return Err(GrantError::new(
                        400,
                        "Bad Request",
                        "Authorization code has been revoked",
                    ));
                }
                // A new authorisation starts a new chain; the old chain is dead.
                self.revoked.insert(self.current_refresh.clone());
                if let Some(prev) = self.previous_refresh.take() {
                    self.revoked.insert(prev);
                }
                self.current_refresh = self.fresh("refresh");
                Ok(self.issue(now_unix))
            }
            other => Err(GrantError::new(
                400,
                "Bad Request",
                format!("Unsupported grant_type {other:?}"),
            )),
        }
    }
}
