//! Who a connection is: the [`Verifier`] hook, [`Identity`], and the JWT implementation.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::access::RoomGrants;

/// The longest user id accepted, in bytes.
pub const MAX_USER_LEN: usize = 128;
/// The longest display name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 32;

/// The authenticated identity of a connection.
///
/// `user` is what every message carries as `from` and what presence lists; `name` is an
/// optional display name shown next to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id: 1 to [`MAX_USER_LEN`] bytes, no control characters.
    pub user: Arc<str>,
    /// A display name, if different from the id.
    pub name: Option<Arc<str>>,
    /// When the credential behind this identity stops being valid (for a JWT: `exp` plus
    /// the verifier's leeway). A connection is closed with 4003 at this instant unless the
    /// client sends a `refresh` frame with a new token for the same user first. `None`: the
    /// connection keeps its identity until it closes.
    pub expires_at: Option<SystemTime>,
    /// The rooms this user may join, read and post in (the JWT claim `rooms`); `None`: every
    /// public room. Direct conversations of the user are allowed either way.
    pub rooms: Option<RoomGrants>,
}

impl Identity {
    /// An identity for a user id, validated ([`validate_user`]).
    pub fn new(user: &str) -> Result<Self, AuthError> {
        validate_user(user)?;
        Ok(Self {
            user: Arc::from(user),
            name: None,
            expires_at: None,
            rooms: None,
        })
    }

    /// Sets [`expires_at`](Self::expires_at).
    #[must_use]
    pub fn with_expiry(mut self, expires_at: Option<SystemTime>) -> Self {
        self.expires_at = expires_at;
        self
    }

    /// Sets [`rooms`](Self::rooms).
    #[must_use]
    pub fn with_rooms(mut self, rooms: Option<RoomGrants>) -> Self {
        self.rooms = rooms;
        self
    }

    /// Sets the display name (validated like [`display_name`]); an empty or equal name is
    /// dropped.
    pub fn with_name(mut self, name: &str) -> Result<Self, AuthError> {
        let name = display_name(name)?;
        self.name = (!name.is_empty() && name != &*self.user).then(|| Arc::from(name));
        Ok(self)
    }

    /// The name to show: the display name, or else the user id.
    pub fn display(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.user)
    }

    pub(crate) fn display_name_if_different(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

/// Validates a user id: 1 to [`MAX_USER_LEN`] bytes, no control characters.
pub fn validate_user(user: &str) -> Result<(), AuthError> {
    if user.is_empty() || user.len() > MAX_USER_LEN {
        return Err(AuthError::new(format!(
            "user id must be 1 to {MAX_USER_LEN} bytes"
        )));
    }
    if user.chars().any(char::is_control) {
        return Err(AuthError::new("user id contains control characters"));
    }
    Ok(())
}

/// Validates a display name: trimmed, at most [`MAX_NAME_CHARS`] characters, no control
/// characters. Returns the trimmed name.
pub fn display_name(name: &str) -> Result<&str, AuthError> {
    let name = name.trim();
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(AuthError::new(format!(
            "name longer than {MAX_NAME_CHARS} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(AuthError::new("name contains control characters"));
    }
    Ok(name)
}

/// Why a token was refused. The message is sent to the client in the 401 body, so it never
/// contains the token or key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    message: String,
}

impl AuthError {
    /// An error with a message for the client.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AuthError {}

/// Checks the token a client presents at connect (`?token=` or `Authorization: Bearer`).
///
/// An `Err` refuses the handshake with HTTP 401 and the error's message. Called once per
/// connection before the WebSocket upgrade, and again for each `refresh` frame the connection
/// sends (whose token must prove the same [`Identity::user`]); the
/// [`Identity::expires_at`] it returns is when the connection is closed (4003).
#[async_trait]
pub trait Verifier: Send + Sync + fmt::Debug + 'static {
    /// The identity the token proves.
    async fn verify(&self, token: &str) -> Result<Identity, AuthError>;
}

#[async_trait]
impl<T: Verifier + ?Sized> Verifier for Arc<T> {
    async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        (**self).verify(token).await
    }
}

#[cfg(feature = "jwt")]
pub use jwt::JwtVerifier;

#[cfg(feature = "jwt")]
mod jwt {
    use std::fmt;
    use std::time::{Duration, UNIX_EPOCH};

    use async_trait::async_trait;
    use jsonwebtoken::errors::ErrorKind;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    use serde::Deserialize;

    use super::{AuthError, Identity, RoomGrants, Verifier};

    /// Verifies JSON Web Tokens signed with HS256 (shared secret) or RS256 (RSA public key).
    ///
    /// Claims: `sub` is the user id (required), `name` an optional display name, `rooms` an
    /// optional list of room patterns ([`RoomGrants`](crate::RoomGrants)), `exp`
    /// required and checked (with a leeway of 30 s by default for clock skew); `iss` and `aud`
    /// are checked when configured. The connection is closed (4003) at `exp` plus the leeway
    /// unless it sends a `refresh` frame with a newer token first. An expired token, a bad signature or a token signed with
    /// another algorithm is refused.
    ///
    /// ```
    /// use chatbus_ws::JwtVerifier;
    /// let verifier = JwtVerifier::hs256(b"a long random secret").with_issuer("https://auth.example");
    /// # let _ = verifier;
    /// ```
    #[derive(Clone)]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
    pub struct JwtVerifier {
        key: DecodingKey,
        validation: Validation,
    }

    impl fmt::Debug for JwtVerifier {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            // The key stays out of logs.
            f.debug_struct("JwtVerifier")
                .field("algorithms", &self.validation.algorithms)
                .field("iss", &self.validation.iss)
                .field("aud", &self.validation.aud)
                .finish_non_exhaustive()
        }
    }

    #[derive(Deserialize)]
    struct Claims {
        sub: String,
        #[serde(default)]
        name: Option<String>,
        /// Required by the validation (`set_required_spec_claims`); a token that lacks it
        /// never gets here.
        #[serde(default)]
        exp: Option<u64>,
        /// Room patterns (`["lobby", "team-a-*"]`); absent: every public room.
        #[serde(default)]
        rooms: Option<Vec<String>>,
    }

    impl JwtVerifier {
        fn with_key(key: DecodingKey, alg: Algorithm) -> Self {
            let mut validation = Validation::new(alg);
            validation.leeway = 30;
            validation.set_required_spec_claims(&["exp", "sub"]);
            // Checked only when an audience is configured (`with_audience`).
            validation.validate_aud = false;
            Self { key, validation }
        }

        /// HS256 with a shared secret.
        pub fn hs256(secret: impl AsRef<[u8]>) -> Self {
            Self::with_key(DecodingKey::from_secret(secret.as_ref()), Algorithm::HS256)
        }

        /// RS256 with an RSA public key in PEM form (`-----BEGIN PUBLIC KEY-----` or
        /// `-----BEGIN RSA PUBLIC KEY-----`).
        pub fn rs256_pem(public_key_pem: &[u8]) -> Result<Self, AuthError> {
            let key = DecodingKey::from_rsa_pem(public_key_pem)
                .map_err(|e| AuthError::new(format!("invalid RSA public key: {e}")))?;
            Ok(Self::with_key(key, Algorithm::RS256))
        }

        /// Requires `iss` to be this issuer.
        #[must_use]
        pub fn with_issuer(mut self, issuer: &str) -> Self {
            self.validation.set_issuer(&[issuer]);
            self
        }

        /// Requires `aud` to contain this audience.
        #[must_use]
        pub fn with_audience(mut self, audience: &str) -> Self {
            self.validation.set_audience(&[audience]);
            self.validation.validate_aud = true;
            self
        }

        /// Seconds of clock skew tolerated on `exp` and `nbf`. Default 30.
        #[must_use]
        pub fn with_leeway(mut self, seconds: u64) -> Self {
            self.validation.leeway = seconds;
            self
        }

        /// Verifies synchronously (JWT checks do no I/O).
        pub fn verify_token(&self, token: &str) -> Result<Identity, AuthError> {
            let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
                |e| {
                    AuthError::new(match e.kind() {
                        ErrorKind::ExpiredSignature => "token expired".to_owned(),
                        ErrorKind::InvalidSignature => "bad token signature".to_owned(),
                        ErrorKind::InvalidAlgorithm => "token algorithm not accepted".to_owned(),
                        ErrorKind::InvalidIssuer => "token issuer not accepted".to_owned(),
                        ErrorKind::InvalidAudience => "token audience not accepted".to_owned(),
                        ErrorKind::ImmatureSignature => "token not valid yet".to_owned(),
                        ErrorKind::MissingRequiredClaim(c) => format!("token lacks `{c}`"),
                        _ => "malformed token".to_owned(),
                    })
                },
            )?;
            // Valid until `exp` plus the leeway, as the validation above counts it. A time past
            // what SystemTime holds is no expiry in practice.
            let expires_at = data.claims.exp.and_then(|exp| {
                UNIX_EPOCH.checked_add(Duration::from_secs(
                    exp.saturating_add(self.validation.leeway),
                ))
            });
            let rooms = data
                .claims
                .rooms
                .map(RoomGrants::new)
                .transpose()
                .map_err(|e| AuthError::new(format!("token claim `rooms`: {e}")))?;
            let id = Identity::new(&data.claims.sub)?
                .with_expiry(expires_at)
                .with_rooms(rooms);
            match data.claims.name {
                Some(name) => id.with_name(&name),
                None => Ok(id),
            }
        }
    }

    #[async_trait]
    impl Verifier for JwtVerifier {
        async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
            self.verify_token(token)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_validated() {
        assert!(Identity::new("alice").is_ok());
        assert!(Identity::new("").is_err());
        assert!(Identity::new(&"x".repeat(129)).is_err());
        assert!(Identity::new("a\nb").is_err());
        let id = Identity::new("u1")
            .and_then(|i| i.with_name("  Ann  "))
            .expect("ok");
        assert_eq!(id.display(), "Ann");
        let same = Identity::new("bob")
            .and_then(|i| i.with_name("bob"))
            .expect("ok");
        assert_eq!(same.name, None);
        assert!(display_name(&"y".repeat(33)).is_err());
        assert!(display_name("tab\there").is_err());
    }
}
