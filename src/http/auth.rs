//! How requests get their credentials: the [`AuthProvider`] hook the client calls before
//! every attempt and after a rejected token, plus two ready-made providers — a fixed header
//! (Rally's `X-Api-Key`, amoCRM long-lived tokens) and a refreshing bearer token with
//! single-flight refresh (Marketo, amoCRM OAuth).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};

use super::HttpError;
use crate::secret::Secret;

/// Puts credentials on requests and renews them when the vendor rejects them.
#[async_trait]
pub trait AuthProvider: Send + Sync {
    /// Adds the credential headers to `headers` and returns the *generation* of the
    /// credential used: a number that changes each time the credential is replaced.
    async fn apply(&self, headers: &mut HeaderMap) -> Result<u64, HttpError>;

    /// Replaces the credential that was rejected. `rejected_generation` is what
    /// [`AuthProvider::apply`] returned for the rejected attempt; if the credential has
    /// been replaced since, this is a no-op (another task already refreshed). Only one
    /// refresh may run at a time; concurrent callers wait for it and reuse its result.
    async fn refresh(&self, rejected_generation: u64) -> Result<(), HttpError>;

    /// Replaces the credential in `headers` if it was replaced since generation
    /// `applied` was added (another call refreshed it meanwhile), and returns the
    /// generation now in `headers`. Never fetches a credential: it runs between the rate
    /// limiter's admission and the send, where nothing may stall.
    async fn reapply(&self, _headers: &mut HeaderMap, applied: u64) -> u64 {
        applied
    }
}

/// A credential that never changes, sent as one header (e.g. `X-Api-Key: …`, or
/// `Authorization: Bearer …` for an amoCRM long-lived token). It cannot be refreshed:
/// a rejection is final.
pub struct StaticHeaderAuth {
    connector: String,
    name: HeaderName,
    value: HeaderValue,
}

impl StaticHeaderAuth {
    /// A provider sending `name: value`. The value is marked sensitive so that reqwest
    /// and `Debug` never show it.
    pub fn new(connector: &str, name: HeaderName, value: &Secret) -> Result<Self, HttpError> {
        let mut value = HeaderValue::from_str(value.expose()).map_err(|_| HttpError::Config {
            connector: connector.to_string(),
            detail: format!("the {name} credential is not a valid header value"),
        })?;
        value.set_sensitive(true);
        Ok(StaticHeaderAuth {
            connector: connector.to_string(),
            name,
            value,
        })
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer(connector: &str, token: &Secret) -> Result<Self, HttpError> {
        Self::new(
            connector,
            AUTHORIZATION,
            &Secret::new(format!("Bearer {}", token.expose())),
        )
    }
}

impl std::fmt::Debug for StaticHeaderAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticHeaderAuth")
            .field("connector", &self.connector)
            .field("header", &self.name)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl AuthProvider for StaticHeaderAuth {
    async fn apply(&self, headers: &mut HeaderMap) -> Result<u64, HttpError> {
        headers.insert(self.name.clone(), self.value.clone());
        Ok(0)
    }

    async fn refresh(&self, _rejected_generation: u64) -> Result<(), HttpError> {
        Err(HttpError::Auth {
            connector: self.connector.clone(),
            endpoint: "auth",
            detail: format!("the {} credential was rejected", self.name),
        })
    }
}

/// An access token and how long it lives.
#[derive(Debug, Clone)]
pub struct Token {
    /// The token text.
    pub access: Secret,
    /// When it stops working, if known.
    pub expires_at: Option<Instant>,
}

impl Token {
    /// A token valid for `expires_in` from now (`None`: until rejected).
    pub fn new(access: Secret, expires_in: Option<Duration>) -> Self {
        Token {
            access,
            expires_at: expires_in.map(|d| Instant::now() + d),
        }
    }
}

/// Where a [`BearerAuth`] gets tokens: the connector's OAuth call.
///
/// `fetch` runs under the provider's lock, so at most one runs at a time. A source whose
/// refresh tokens rotate (amoCRM) must persist the new pair durably *before* returning it.
#[async_trait]
pub trait TokenSource: Send + Sync {
    /// Obtains a fresh token. `rejected` is the token being replaced, if any.
    async fn fetch(&self, rejected: Option<&Token>) -> Result<Token, HttpError>;
}

struct BearerState {
    token: Option<Token>,
    generation: u64,
    /// The token came back from a refresh with no more than `refresh_ahead` left (Marketo
    /// hands out the same token until it expires): use it until it expires, instead of
    /// asking again on every call.
    short_lived: bool,
}

/// `Authorization: Bearer <token>` from a [`TokenSource`], refreshed ahead of expiry and
/// after a rejection, single-flight: the state lock is held across `fetch`, so concurrent
/// tasks wait for the one refresh and then use its token; a refresh asked for an already
/// replaced generation does nothing.
pub struct BearerAuth<S> {
    connector: String,
    source: S,
    refresh_ahead: Duration,
    state: tokio::sync::Mutex<BearerState>,
}

impl<S: TokenSource> BearerAuth<S> {
    /// A provider that renews the token when less than `refresh_ahead` of it is left
    /// (Marketo advises 60 s).
    pub fn new(connector: &str, source: S, refresh_ahead: Duration) -> Self {
        BearerAuth {
            connector: connector.to_string(),
            source,
            refresh_ahead,
            state: tokio::sync::Mutex::new(BearerState {
                token: None,
                generation: 0,
                short_lived: false,
            }),
        }
    }

    /// The token source (e.g. to read how often it was called in tests).
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Whether `token` can go on a call without a refresh first.
    fn usable(&self, token: &Token, short_lived: bool) -> bool {
        let margin = if short_lived {
            Duration::ZERO
        } else {
            self.refresh_ahead
        };
        token
            .expires_at
            .is_none_or(|exp| exp.saturating_duration_since(Instant::now()) > margin)
    }

    /// Stores a token just obtained.
    fn replace(&self, st: &mut BearerState, fresh: Token) {
        st.short_lived = !self.usable(&fresh, false);
        st.token = Some(fresh);
        st.generation += 1;
    }
}

impl<S> std::fmt::Debug for BearerAuth<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("connector", &self.connector)
            .field("refresh_ahead", &self.refresh_ahead)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<S: TokenSource> AuthProvider for BearerAuth<S> {
    async fn apply(&self, headers: &mut HeaderMap) -> Result<u64, HttpError> {
        let mut st = self.state.lock().await;
        if !st
            .token
            .as_ref()
            .is_some_and(|t| self.usable(t, st.short_lived))
        {
            let fresh = self.source.fetch(st.token.as_ref()).await?;
            self.replace(&mut st, fresh);
        }
        let token = st.token.as_ref().expect("token set above");
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.access.expose()))
            .map_err(|_| HttpError::Auth {
                connector: self.connector.clone(),
                endpoint: "auth",
                detail: "the access token is not a valid header value".into(),
            })?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
        Ok(st.generation)
    }

    async fn reapply(&self, headers: &mut HeaderMap, applied: u64) -> u64 {
        let st = self.state.lock().await;
        let Some(token) = st.token.as_ref().filter(|_| st.generation != applied) else {
            return applied;
        };
        match HeaderValue::from_str(&format!("Bearer {}", token.access.expose())) {
            Ok(mut value) => {
                value.set_sensitive(true);
                headers.insert(AUTHORIZATION, value);
                st.generation
            }
            // `apply` refused this token already; the call keeps the one it has.
            Err(_) => applied,
        }
    }

    async fn refresh(&self, rejected_generation: u64) -> Result<(), HttpError> {
        let mut st = self.state.lock().await;
        if st.generation != rejected_generation {
            return Ok(());
        }
        let fresh = self.source.fetch(st.token.as_ref()).await?;
        self.replace(&mut st, fresh);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Hands out one token with `left` to live, counting the calls.
    struct SameToken {
        left: Duration,
        fetches: AtomicUsize,
    }

    #[async_trait]
    impl TokenSource for SameToken {
        async fn fetch(&self, _rejected: Option<&Token>) -> Result<Token, HttpError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            Ok(Token::new(Secret::new("same"), Some(self.left)))
        }
    }

    #[tokio::test]
    async fn a_token_handed_out_inside_the_refresh_window_is_used_until_it_expires() {
        let auth = BearerAuth::new(
            "m",
            SameToken {
                left: Duration::from_secs(30),
                fetches: AtomicUsize::new(0),
            },
            Duration::from_secs(60),
        );
        for _ in 0..5 {
            let mut headers = HeaderMap::new();
            auth.apply(&mut headers).await.unwrap();
            assert!(headers.contains_key(AUTHORIZATION));
        }
        assert_eq!(auth.source().fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_token_inside_the_refresh_window_is_renewed_once() {
        let auth = BearerAuth::new(
            "m",
            SameToken {
                left: Duration::from_secs(3600),
                fetches: AtomicUsize::new(0),
            },
            Duration::from_secs(60),
        );
        let mut headers = HeaderMap::new();
        auth.apply(&mut headers).await.unwrap();
        // The stored token now has 30 s left: the next call renews it, once.
        auth.state.lock().await.token.as_mut().unwrap().expires_at =
            Some(Instant::now() + Duration::from_secs(30));
        for _ in 0..3 {
            auth.apply(&mut headers).await.unwrap();
        }
        assert_eq!(auth.source().fetches.load(Ordering::SeqCst), 2);
    }
}
