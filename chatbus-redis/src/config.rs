//! [`RedisConfig`]: where the server is and how the broker behaves.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use chatbus_core::Result;
use redis::IntoConnectionInfo;

use crate::error;

/// The longest accepted [`RedisConfig::prefix`], in bytes.
pub const MAX_PREFIX_LEN: usize = 64;

/// Configuration of a [`RedisBroker`](crate::RedisBroker).
///
/// Build it with [`Default`] and the `with_*` setters, or from the environment with
/// [`from_env`](Self::from_env). `Debug` never prints the password.
///
/// ```
/// use std::time::Duration;
/// use chatbus_redis::RedisConfig;
///
/// let config = RedisConfig::default()
///     .with_url("redis://:secret@127.0.0.1:6380/2")
///     .with_prefix("myapp")
///     .with_history_len(500)
///     .with_command_timeout(Duration::from_secs(1));
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The server: `redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS (needs
    /// the `tls` feature; the server's certificate is always verified, against the webpki
    /// roots or [`tls_ca_file`](Self::tls_ca_file)). Default `redis://127.0.0.1:6379/`.
    pub url: String,
    /// A password used when the URL has none (it needs no URL escaping here). Default none.
    pub password: Option<String>,
    /// For `rediss://`: a PEM file with the CA certificate(s) that signed the server's
    /// certificate, trusted instead of the usual web roots (a private CA, as managed Redis
    /// services and self-hosted TLS setups use). Default none: the webpki roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Prefix of every channel and key, so one Redis can serve several apps (or several
    /// chatbus deployments). 1 to [`MAX_PREFIX_LEN`] bytes of `[A-Za-z0-9._:-]`. Default
    /// `"chatbus"`.
    pub prefix: String,
    /// The history window: durable messages kept per room in a Redis stream for `replay` and
    /// `history`. 0 (the default) keeps none: `replay`/`history` then answer
    /// `Error::Unsupported` and `publish` carries the envelope's cursor through unchanged.
    pub history_len: usize,
    /// Buffer of each subscription, in messages. Default 4,096.
    pub subscriber_capacity: usize,
    /// Limit for making one connection (TCP, TLS and authentication). Default 5 s.
    pub connect_timeout: Duration,
    /// Limit for one operation (publish, subscribe, replay, history, health): past it the
    /// operation fails with `Error::Timeout` instead of waiting for a reconnect. Default 2 s.
    pub command_timeout: Duration,
    /// First delay before reconnecting after the connection dropped; it doubles per failed
    /// attempt (with jitter) up to [`backoff_max`](Self::backoff_max). Default 100 ms.
    ///
    /// An attempt fails when the connection cannot be made, when re-subscribing on it fails,
    /// or when it is lost again within 5 s. Only the loss of a connection that served
    /// longer resets the delay (and is retried at once).
    pub backoff_min: Duration,
    /// Cap of the reconnect delay. Default 2 s.
    pub backoff_max: Duration,
    /// How long the pub/sub connection may be silent before it is checked with a `PING`, to
    /// notice a server that hangs without closing the connection: a hung server is given up
    /// within `ping_interval + command_timeout` of the last thing it sent (7 s with the
    /// defaults). Default 5 s.
    pub ping_interval: Duration,
    /// Redis Cluster seed nodes, `host:port` each (a `redis://host:port` form is accepted
    /// too). Empty (the default): a single Redis at [`url`](Self::url). Non-empty: the broker
    /// speaks to that cluster, with sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`, Redis 7); the
    /// URL's host is then ignored, its password (or [`password`](Self::password)) is used on
    /// every node. TLS is not supported in cluster mode yet.
    pub cluster: Vec<String>,
    /// In cluster mode, whether `Interest::All` is served: every publish then also sends a
    /// classic `PUBLISH` on one broadcast channel, which Redis Cluster forwards to every node,
    /// and an `Interest::All` subscription listens to it on one node. This is what a `DualBus`
    /// over a cluster needs (its merger subscribes `Interest::All`), and it costs what sharded
    /// pub/sub saves: every message reaches every node. Default false: `Interest::All` fails
    /// with `Error::Config` in cluster mode. Ignored without [`cluster`](Self::cluster).
    pub cluster_broadcast: bool,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/".to_owned(),
            password: None,
            tls_ca_file: None,
            prefix: "chatbus".to_owned(),
            history_len: 0,
            subscriber_capacity: 4096,
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            ping_interval: Duration::from_secs(5),
            cluster: Vec::new(),
            cluster_broadcast: false,
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls_ca_file", &self.tls_ca_file)
            .field("prefix", &self.prefix)
            .field("history_len", &self.history_len)
            .field("subscriber_capacity", &self.subscriber_capacity)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("ping_interval", &self.ping_interval)
            .field("cluster", &self.cluster)
            .field("cluster_broadcast", &self.cluster_broadcast)
            .finish()
    }
}

/// The URL with the `user:password@` part replaced, for logs.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://<redacted>{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl RedisConfig {
    /// Reads the configuration from the environment; unset variables keep their default.
    ///
    /// | variable | meaning |
    /// |---|---|
    /// | `CHATBUS_REDIS_URL` | [`url`](Self::url), e.g. `redis://:pw@redis:6379/0` or `rediss://…` |
    /// | `REDIS_HOST`, `REDIS_PORT` | host and port, when `CHATBUS_REDIS_URL` is unset (the variables of the stack this replaces) |
    /// | `REDIS_PASSWORD` | [`password`](Self::password), used when the URL has none |
    /// | `CHATBUS_REDIS_TLS_CA` | [`tls_ca_file`](Self::tls_ca_file) |
    /// | `CHATBUS_REDIS_PREFIX` | [`prefix`](Self::prefix) |
    /// | `CHATBUS_REDIS_HISTORY` | [`history_len`](Self::history_len) (0 = off) |
    /// | `CHATBUS_REDIS_CLUSTER` | [`cluster`](Self::cluster): `host:port,host:port,…` seed nodes of a Redis Cluster |
    /// | `CHATBUS_REDIS_CLUSTER_BROADCAST` | [`cluster_broadcast`](Self::cluster_broadcast): `true`/`false` |
    ///
    /// A variable with a bad value is an `Error::Config` naming it.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any lookup function (for tests and for other sources
    /// of settings).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let mut config = Self::default();
        if let Some(url) = get("CHATBUS_REDIS_URL") {
            config.url = url.trim().to_owned();
        } else if get("REDIS_HOST").is_some() || get("REDIS_PORT").is_some() {
            let host = get("REDIS_HOST").unwrap_or_else(|| "127.0.0.1".to_owned());
            let port = match get("REDIS_PORT") {
                Some(p) => p.trim().parse::<u16>().map_err(|_| {
                    error::config(format!("REDIS_PORT must be a port number, got {p:?}"))
                })?,
                None => 6379,
            };
            let host = host.trim();
            // An IPv6 literal needs brackets in a URL.
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host.to_owned()
            };
            config.url = format!("redis://{host}:{port}/");
        }
        if let Some(pw) = lookup("REDIS_PASSWORD").filter(|p| !p.is_empty()) {
            config.password = Some(pw);
        }
        if let Some(ca) = get("CHATBUS_REDIS_TLS_CA") {
            config.tls_ca_file = Some(PathBuf::from(ca.trim()));
        }
        if let Some(prefix) = get("CHATBUS_REDIS_PREFIX") {
            config.prefix = prefix.trim().to_owned();
        }
        if let Some(h) = get("CHATBUS_REDIS_HISTORY") {
            config.history_len = h.trim().parse().map_err(|_| {
                error::config(format!(
                    "CHATBUS_REDIS_HISTORY must be a number of messages (0 = off), got {h:?}"
                ))
            })?;
        }
        if let Some(nodes) = get("CHATBUS_REDIS_CLUSTER") {
            config.cluster = nodes
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(b) = get("CHATBUS_REDIS_CLUSTER_BROADCAST") {
            config.cluster_broadcast = match b.trim() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => {
                    return Err(error::config(format!(
                        "CHATBUS_REDIS_CLUSTER_BROADCAST must be true or false, got {b:?}"
                    )))
                }
            };
        }
        config.validate()?;
        Ok(config)
    }

    /// Sets [`cluster`](Self::cluster): the seed nodes (`host:port`) of a Redis Cluster.
    #[must_use]
    pub fn with_cluster<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cluster = nodes.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`cluster_broadcast`](Self::cluster_broadcast).
    #[must_use]
    pub fn with_cluster_broadcast(mut self, on: bool) -> Self {
        self.cluster_broadcast = on;
        self
    }

    /// Whether the broker speaks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        !self.cluster.is_empty()
    }

    /// The connection settings of every cluster seed node, with the URL's credentials.
    pub(crate) fn cluster_nodes(&self) -> Result<Vec<redis::ConnectionInfo>> {
        let base = self.connection_info()?;
        self.cluster
            .iter()
            .map(|node| {
                let n = node.trim();
                let hostport = n
                    .strip_prefix("redis://")
                    .unwrap_or(n)
                    .trim_end_matches('/');
                if hostport.contains("://") || hostport.contains('@') || hostport.contains('/') {
                    return Err(error::config(format!(
                        "a cluster node must be host:port (or redis://host:port), got {n:?}; \
                         put credentials in the URL or the password"
                    )));
                }
                let (host, port) = hostport.rsplit_once(':').ok_or_else(|| {
                    error::config(format!("a cluster node must be host:port, got {n:?}"))
                })?;
                let port: u16 = port
                    .parse()
                    .map_err(|_| error::config(format!("bad port in the cluster node {n:?}")))?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let addr = redis::ConnectionAddr::Tcp(host.to_owned(), port);
                let info = addr
                    .into_connection_info()
                    .map_err(|e| error::config(format!("bad cluster node {n:?}: {e}")))?;
                Ok(info.set_redis_settings(base.redis_settings().clone()))
            })
            .collect()
    }

    /// Sets [`url`](Self::url).
    #[must_use]
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Sets [`password`](Self::password).
    #[must_use]
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Sets [`tls_ca_file`](Self::tls_ca_file).
    #[must_use]
    pub fn with_tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// Sets [`prefix`](Self::prefix).
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets [`history_len`](Self::history_len) (0 turns the history window off).
    #[must_use]
    pub fn with_history_len(mut self, n: usize) -> Self {
        self.history_len = n;
        self
    }

    /// Sets [`subscriber_capacity`](Self::subscriber_capacity).
    #[must_use]
    pub fn with_subscriber_capacity(mut self, n: usize) -> Self {
        self.subscriber_capacity = n;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    #[must_use]
    pub fn with_connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Sets [`command_timeout`](Self::command_timeout).
    #[must_use]
    pub fn with_command_timeout(mut self, d: Duration) -> Self {
        self.command_timeout = d;
        self
    }

    /// Sets [`backoff_min`](Self::backoff_min) and [`backoff_max`](Self::backoff_max).
    #[must_use]
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max;
        self
    }

    /// Sets [`ping_interval`](Self::ping_interval).
    #[must_use]
    pub fn with_ping_interval(mut self, d: Duration) -> Self {
        self.ping_interval = d;
        self
    }

    /// Checks every value; [`RedisBroker::connect`](crate::RedisBroker::connect) calls it.
    pub fn validate(&self) -> Result<()> {
        let p = &self.prefix;
        if p.is_empty() || p.len() > MAX_PREFIX_LEN {
            return Err(error::config(format!(
                "the Redis prefix must be 1 to {MAX_PREFIX_LEN} bytes, got {} bytes",
                p.len()
            )));
        }
        // Glob characters would break the `Interest::All` pattern subscription and braces the
        // cluster hash tags, so the prefix uses the room charset.
        if !p
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(error::config(format!(
                "the Redis prefix may only use A-Z, a-z, 0-9, '.', '_', ':' and '-', got {p:?}"
            )));
        }
        if self.subscriber_capacity == 0 {
            return Err(error::config("subscriber_capacity must be at least 1"));
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("command_timeout", self.command_timeout),
            ("backoff_min", self.backoff_min),
            ("backoff_max", self.backoff_max),
            ("ping_interval", self.ping_interval),
        ] {
            if d.is_zero() {
                return Err(error::config(format!("{name} must be more than zero")));
            }
        }
        if self.backoff_min > self.backoff_max {
            return Err(error::config("backoff_min must not exceed backoff_max"));
        }
        if self.is_cluster() {
            if self.tls_ca_file.is_some() || self.url.trim().starts_with("rediss://") {
                return Err(error::config(
                    "TLS (rediss://, CHATBUS_REDIS_TLS_CA) is not supported in Redis Cluster mode yet",
                ));
            }
            if self.connection_info()?.redis_settings().db() != 0 {
                return Err(error::config("Redis Cluster has only database 0"));
            }
            return self.cluster_nodes().map(|_| ());
        }
        self.connection_info().map(|_| ())
    }

    /// The client's connection settings: the URL, with [`password`](Self::password) applied.
    pub(crate) fn connection_info(&self) -> Result<redis::ConnectionInfo> {
        let url = self.url.trim();
        let scheme = url.split("://").next().unwrap_or_default();
        match scheme {
            "redis" if self.tls_ca_file.is_some() => {
                return Err(error::config(
                    "tls_ca_file (CHATBUS_REDIS_TLS_CA) needs a rediss:// URL",
                ))
            }
            "redis" => {}
            "rediss" => {
                if url.ends_with("#insecure") {
                    return Err(error::config(
                        "rediss://...#insecure (no certificate check) is not supported; trust the \
                         server's CA with tls_ca_file (CHATBUS_REDIS_TLS_CA) instead",
                    ));
                }
                if !cfg!(feature = "tls") {
                    return Err(error::config(
                        "a rediss:// URL needs the `tls` feature of chatbus-redis",
                    ));
                }
            }
            _ => {
                return Err(error::config(format!(
                    "the Redis URL must start with redis:// or rediss://, got {:?}",
                    redact_url(url)
                )))
            }
        }
        let info = url
            .into_connection_info()
            .map_err(|e| error::config(format!("invalid Redis URL {:?}: {e}", redact_url(url))))?;
        match &self.password {
            Some(pw) if info.redis_settings().password().is_none() => {
                let settings = info.redis_settings().clone().set_password(pw);
                Ok(info.set_redis_settings(settings))
            }
            _ => Ok(info),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<RedisConfig> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        RedisConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn env_defaults_and_url() -> Result<()> {
        let c = from(&[])?;
        assert_eq!(c.url, "redis://127.0.0.1:6379/");
        assert_eq!(c.history_len, 0);
        let c = from(&[
            ("CHATBUS_REDIS_URL", "redis://:pw@10.0.0.1:6380/3"),
            ("CHATBUS_REDIS_PREFIX", "app1"),
            ("CHATBUS_REDIS_HISTORY", "100"),
            ("REDIS_HOST", "ignored"),
        ])?;
        assert_eq!(c.url, "redis://:pw@10.0.0.1:6380/3");
        assert_eq!((c.prefix.as_str(), c.history_len), ("app1", 100));
        let info = c.connection_info()?;
        assert_eq!(info.redis_settings().db(), 3);
        assert_eq!(info.redis_settings().password(), Some("pw"));
        Ok(())
    }

    #[test]
    fn env_compat_variables() -> Result<()> {
        let c = from(&[
            ("REDIS_HOST", "redis"),
            ("REDIS_PORT", "6390"),
            ("REDIS_PASSWORD", "p@ss:word"),
        ])?;
        assert_eq!(c.url, "redis://redis:6390/");
        // The password needs no URL escaping.
        let info = c.connection_info()?;
        assert_eq!(info.redis_settings().password(), Some("p@ss:word"));
        assert!(!format!("{c:?}").contains("p@ss"));
        assert_eq!(
            from(&[("REDIS_PORT", "7000")])?.url,
            "redis://127.0.0.1:7000/"
        );
        Ok(())
    }

    #[test]
    fn bad_values_are_config_errors() {
        for vars in [
            &[("REDIS_PORT", "x")][..],
            &[("CHATBUS_REDIS_HISTORY", "-1")][..],
            &[("CHATBUS_REDIS_URL", "http://x")][..],
            &[("CHATBUS_REDIS_PREFIX", "a*b")][..],
            &[("CHATBUS_REDIS_PREFIX", "a{b}")][..],
        ] {
            match from(vars) {
                Err(chatbus_core::Error::Config(msg)) => assert!(!msg.is_empty()),
                other => panic!("{vars:?}: expected a config error, got {other:?}"),
            }
        }
        let c = RedisConfig::default().with_backoff(Duration::from_secs(2), Duration::from_secs(1));
        assert!(c.validate().is_err());
        assert!(RedisConfig::default()
            .with_command_timeout(Duration::ZERO)
            .validate()
            .is_err());
    }

    #[test]
    fn env_cluster() -> Result<()> {
        let c = from(&[
            (
                "CHATBUS_REDIS_CLUSTER",
                " 10.0.0.1:7000, redis://10.0.0.2:7001/ ,",
            ),
            ("REDIS_PASSWORD", "pw"),
            ("CHATBUS_REDIS_CLUSTER_BROADCAST", "true"),
        ])?;
        assert!(c.is_cluster() && c.cluster_broadcast);
        assert_eq!(c.cluster, ["10.0.0.1:7000", "redis://10.0.0.2:7001/"]);
        let nodes = c.cluster_nodes()?;
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].addr().to_string(), "10.0.0.2:7001");
        assert_eq!(nodes[0].redis_settings().password(), Some("pw"));
        assert!(!from(&[])?.is_cluster());
        for vars in [
            &[("CHATBUS_REDIS_CLUSTER", "10.0.0.1")][..],
            &[("CHATBUS_REDIS_CLUSTER", "h:notaport")][..],
            &[("CHATBUS_REDIS_CLUSTER", "redis://:pw@h:1")][..],
            &[
                ("CHATBUS_REDIS_CLUSTER", "h:1"),
                ("CHATBUS_REDIS_URL", "redis://h/2"),
            ][..],
            &[
                ("CHATBUS_REDIS_CLUSTER", "h:1"),
                ("CHATBUS_REDIS_URL", "rediss://h/"),
            ][..],
            &[("CHATBUS_REDIS_CLUSTER_BROADCAST", "maybe")][..],
        ] {
            match from(vars) {
                Err(chatbus_core::Error::Config(msg)) => assert!(!msg.is_empty()),
                other => panic!("{vars:?}: expected a config error, got {other:?}"),
            }
        }
        Ok(())
    }

    #[test]
    fn redaction() {
        assert_eq!(redact_url("redis://:pw@h:1/"), "redis://<redacted>@h:1/");
        assert_eq!(redact_url("redis://h:1/"), "redis://h:1/");
        let c = RedisConfig::default()
            .with_url("redis://u:secret@h/")
            .with_password("other");
        let s = format!("{c:?}");
        assert!(!s.contains("secret") && !s.contains("other"), "{s}");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn rediss_without_tls_feature_is_explained() {
        match RedisConfig::default().with_url("rediss://h/").validate() {
            Err(chatbus_core::Error::Config(msg)) => assert!(msg.contains("tls"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }
}
