//! [`PostgresConfig`]: where the database is and how long to wait for it.

use std::fmt;
use std::time::Duration;

use chatbus_core::{Error, Result};

/// Settings of a [`PostgresStore`](crate::PostgresStore).
///
/// ```
/// use std::time::Duration;
/// use chatbus_postgres::PostgresConfig;
///
/// let config = PostgresConfig::default()
///     .with_url("postgres://chat@db.internal/chat")
///     .with_pool_size(16)
///     .with_statement_timeout(Duration::from_secs(2));
/// assert_eq!(config.pool_size, 16);
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct PostgresConfig {
    /// A `postgres://` URL (or key=value string) as `tokio_postgres::Config` parses it.
    /// Default `postgres://postgres@localhost/postgres`.
    pub url: String,
    /// Pooled connections (at least 1); claims use connections of their own, outside it.
    /// Default 8.
    pub pool_size: usize,
    /// The longest one statement may run on the server (`statement_timeout`), and the budget
    /// of one call's queries on the client side. Default 5 s.
    pub statement_timeout: Duration,
    /// The longest opening a connection, or waiting for a free pooled one, may take.
    /// Default 5 s.
    pub connect_timeout: Duration,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@localhost/postgres".to_owned(),
            pool_size: 8,
            statement_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl PostgresConfig {
    /// The default settings with this URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self::default().with_url(url)
    }

    /// Settings from the environment, each variable overriding its default:
    ///
    /// | variable | setting |
    /// |---|---|
    /// | `CHATBUS_POSTGRES_URL` (else `DATABASE_URL`) | [`url`](Self::url) |
    /// | `CHATBUS_POSTGRES_POOL_SIZE` | [`pool_size`](Self::pool_size) |
    /// | `CHATBUS_POSTGRES_STATEMENT_TIMEOUT_MS` | [`statement_timeout`](Self::statement_timeout) |
    /// | `CHATBUS_POSTGRES_CONNECT_TIMEOUT_MS` | [`connect_timeout`](Self::connect_timeout) |
    ///
    /// A variable with a bad value is an `Error::Config` naming it.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any lookup function (for tests and for other sources
    /// of settings).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let number = |name: &str| -> Result<Option<u64>> {
            get(name)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| Error::Config(format!("{name} must be a number, got {v:?}")))
                })
                .transpose()
        };
        let mut config = Self::default();
        if let Some(url) = get("CHATBUS_POSTGRES_URL").or_else(|| get("DATABASE_URL")) {
            config.url = url;
        }
        if let Some(n) = number("CHATBUS_POSTGRES_POOL_SIZE")? {
            config = config.with_pool_size(usize::try_from(n).unwrap_or(usize::MAX));
        }
        if let Some(ms) = number("CHATBUS_POSTGRES_STATEMENT_TIMEOUT_MS")? {
            config = config.with_statement_timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = number("CHATBUS_POSTGRES_CONNECT_TIMEOUT_MS")? {
            config = config.with_connect_timeout(Duration::from_millis(ms));
        }
        Ok(config)
    }

    /// Sets [`url`](Self::url).
    #[must_use]
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Sets [`pool_size`](Self::pool_size) (at least 1).
    #[must_use]
    pub fn with_pool_size(mut self, n: usize) -> Self {
        self.pool_size = n.max(1);
        self
    }

    /// Sets [`statement_timeout`](Self::statement_timeout) (at least 1 ms).
    #[must_use]
    pub fn with_statement_timeout(mut self, t: Duration) -> Self {
        self.statement_timeout = t.max(Duration::from_millis(1));
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout) (at least 1 ms).
    #[must_use]
    pub fn with_connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t.max(Duration::from_millis(1));
        self
    }

    /// The whole budget of one call: a connection, then its statements. Past it the call
    /// fails with `Timeout` instead of waiting on a server that does not answer.
    pub(crate) fn call_budget(&self) -> Duration {
        self.connect_timeout + self.statement_timeout
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redacted(&self.url))
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// The URL without its password, for logs: `postgres://user:***@host/db`, or
/// `password=***` in the key=value form.
fn redacted(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***@{host}{path}");
            }
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{redacted, PostgresConfig};

    #[test]
    fn settings_from_the_environment() {
        let env = |name: &str| match name {
            "CHATBUS_POSTGRES_URL" => Some("postgres://a@b/c".to_owned()),
            "DATABASE_URL" => Some("postgres://not-this/".to_owned()),
            "CHATBUS_POSTGRES_POOL_SIZE" => Some(" 3 ".to_owned()),
            "CHATBUS_POSTGRES_STATEMENT_TIMEOUT_MS" => Some("250".to_owned()),
            _ => None,
        };
        let c = PostgresConfig::from_lookup(env).expect("config");
        assert_eq!(c.url, "postgres://a@b/c");
        assert_eq!(c.pool_size, 3);
        assert_eq!(c.statement_timeout, Duration::from_millis(250));
        assert_eq!(c.connect_timeout, PostgresConfig::default().connect_timeout);
        let bad = PostgresConfig::from_lookup(|n| {
            (n == "CHATBUS_POSTGRES_CONNECT_TIMEOUT_MS").then(|| "soon".to_owned())
        });
        let err = bad.expect_err("a bad number").to_string();
        assert!(err.contains("CHATBUS_POSTGRES_CONNECT_TIMEOUT_MS"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redacted("postgres://chat:s3cret@db:5432/chat"),
            "postgres://chat:***@db:5432/chat"
        );
        assert_eq!(
            redacted("postgres://chat@db/chat"),
            "postgres://chat@db/chat"
        );
        assert_eq!(
            redacted("host=db password=s3cret user=chat"),
            "host=db password=*** user=chat"
        );
    }
}
