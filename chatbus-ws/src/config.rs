//! [`WsConfig`]: limits, origins, heartbeats, the auth hook and the application's hooks.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::Verifier;
use crate::hooks::Hooks;
use crate::ip::IpLimits;

/// A per-connection token bucket: `burst` frames at once, refilled at `per_second`.
///
/// ```
/// use chatbus_ws::RateLimit;
///
/// let limit = RateLimit::new(10, 5.0);
/// assert_eq!((limit.burst, limit.per_second), (10, 5.0));
/// assert_eq!(RateLimit::default().with_burst(80).burst, 80);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RateLimit {
    /// Frames allowed in a burst (the bucket size). At least 1.
    pub burst: u32,
    /// Frames per second refilled.
    pub per_second: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new(40, 20.0)
    }
}

impl RateLimit {
    /// `burst` frames at once, refilled at `per_second` frames per second.
    pub const fn new(burst: u32, per_second: f64) -> Self {
        Self { burst, per_second }
    }

    /// Sets [`burst`](Self::burst).
    #[must_use]
    pub const fn with_burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// Sets [`per_second`](Self::per_second).
    #[must_use]
    pub const fn with_per_second(mut self, per_second: f64) -> Self {
        self.per_second = per_second;
        self
    }
}

/// Which browser origins may open a socket (checked on the `Origin` header at the handshake).
///
/// Clients that send no `Origin` (non-browser clients) are always accepted: the check exists to
/// stop other web sites from using a visitor's browser, which always sends `Origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// The server's own origin (the `Origin`'s host and port equal the request's `Host`), plus
    /// these exact origins (e.g. `"https://app.example.com"`).
    SameHost {
        /// Further origins accepted, compared case-insensitively.
        also: Vec<String>,
    },
    /// Any origin.
    Any,
}

impl Default for AllowedOrigins {
    fn default() -> Self {
        Self::SameHost { also: Vec::new() }
    }
}

impl AllowedOrigins {
    /// Whether a request with this `Origin` (if any) and `Host` (if any) is accepted.
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        match self {
            Self::Any => true,
            Self::SameHost { also } => {
                let origin = origin.trim_end_matches('/');
                if also
                    .iter()
                    .any(|o| o.trim_end_matches('/').eq_ignore_ascii_case(origin))
                {
                    return true;
                }
                let authority = origin
                    .strip_prefix("http://")
                    .or_else(|| origin.strip_prefix("https://"));
                match (authority, host) {
                    (Some(a), Some(h)) => same_authority(a, h),
                    _ => false,
                }
            }
        }
    }
}

fn same_authority(origin: &str, host: &str) -> bool {
    // Only a default port may be omitted on one side; browsers never send ":80" for http, but a
    // Host header might, so both spellings compare equal.
    let strip = |s: &str| -> String {
        let s = s.to_ascii_lowercase();
        match s.strip_suffix(":80").or_else(|| s.strip_suffix(":443")) {
            Some(bare) => bare.to_owned(),
            None => s,
        }
    };
    strip(origin) == strip(host)
}

/// Configuration of the WebSocket transport. Every limit has a sane default.
///
/// Start from [`Default`] and change what you need with the `with_*` setters (the struct is
/// `#[non_exhaustive]`, so new settings can be added without breaking callers); the fields
/// stay public to read.
///
/// ```
/// use std::time::Duration;
/// use chatbus_ws::{RateLimit, WsConfig};
///
/// let config = WsConfig::default()
///     .with_max_rooms(8)
///     .with_rate_limit(Some(RateLimit::new(10, 5.0)))
///     .with_idle_timeout(Duration::from_secs(30));
/// assert_eq!(config.max_rooms, 8);
/// assert_eq!(config.path, "/ws");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WsConfig {
    /// The route of the socket in [`WsService::router`](crate::WsService::router). Default
    /// `/ws`.
    pub path: String,
    /// Largest client frame handled. A larger one is answered with `too_large` and dropped;
    /// the connection stays. Default 16 KiB.
    pub max_frame_size: usize,
    /// Largest frame the socket reads at all; a larger one closes the connection with 1009
    /// after a `too_large` error. Default 1 MiB.
    pub hard_frame_size: usize,
    /// Per-connection rate limit; `None` disables it. Default 40 burst, 20/s.
    pub rate_limit: Option<RateLimit>,
    /// Per-connection budget of WebSocket control frames (pings and pongs, which the socket
    /// library answers or swallows without the text-frame rate limit seeing them); a client
    /// past it gets a `rate_limited` error and is closed with 4008. `None` disables it.
    /// Default 20 burst, 2/s: a browser answers the server's ping every 20 s, and a client
    /// pinging for keep-alive does it every few seconds.
    pub control_rate_limit: Option<RateLimit>,
    /// Rooms one connection may be in at once; joining more is `forbidden`. Default 64.
    pub max_rooms: usize,
    /// Most messages one `history` request returns. Default 100.
    pub max_history: usize,
    /// Messages a `history` request returns when it gives no `limit`. Default 50.
    pub default_history: usize,
    /// Browser origins allowed to connect. Default: the server's own.
    pub allowed_origins: AllowedOrigins,
    /// How often the server sends a WebSocket ping. Default 20 s.
    pub ping_interval: Duration,
    /// A connection that sends nothing at all (not even a pong) for this long is dead and is
    /// closed (4001). Default 60 s.
    pub idle_timeout: Duration,
    /// A socket write that takes longer than this drops the connection. Default 10 s.
    pub write_timeout: Duration,
    /// How long the writer holds a connection's batch open for more frames before it flushes
    /// (a *write delay*, like Centrifugo's `write_delay`). Zero (the default) flushes as soon
    /// as what is already queued is written, as before; the delay costs nothing then.
    ///
    /// When set, the writer starts a batch with the first frame that is ready and writes
    /// further frames into it as they arrive, flushing once the batch is full (64 frames) or
    /// this long after the first frame, whichever comes first. A connection in a busy room
    /// then takes several frames per socket write instead of one: fewer `writev`/`sendto`
    /// calls and TCP segments per delivery, at the price of up to this much added latency
    /// per frame. A lone frame goes out at most this late. The wire does not change.
    ///
    /// Measure before turning it on: without it the writer already puts into one write what
    /// queued while it was busy, and where frames are further apart than the delay there is
    /// nothing to coalesce, only a timer per batch to pay (`docs/BENCHMARKS.md`, "Write
    /// delay").
    pub write_delay: Duration,
    /// On shutdown, how long connections may take to flush and close. Default 5 s.
    pub drain_timeout: Duration,
    /// How long a new TCP connection may take to send its first complete HTTP request (the
    /// WebSocket upgrade) in [`WsService::serve`](crate::WsService::serve); one that sent
    /// nothing, or only part of its headers, by then is closed and counted
    /// (`chatbus_handshake_timeouts_total`). Later requests on a kept-alive HTTP connection
    /// get the same time for their headers. Default 10 s.
    pub handshake_timeout: Duration,
    /// Limits per client address (concurrent connections, attempts), checked at the
    /// handshake. Default: off.
    pub ip_limits: IpLimits,
    /// The token check; `None` accepts everyone, named by `?name=`.
    pub verifier: Option<Arc<dyn Verifier>>,
    /// The application's [`Hooks`]; `None` (the default) allows what the built-in checks allow
    /// and calls nothing.
    pub hooks: Option<Arc<dyn Hooks>>,
    /// How long one hook call may take; past it the action is denied (and counted as a
    /// failure). Default 2 s.
    pub hook_timeout: Duration,
    /// Users one connection may [`watch`](crate) at once; a `watch` past it is `forbidden`.
    /// Default 100.
    pub max_watch: usize,
    /// WebSocket connections this instance holds at once, handshakes in progress included; a
    /// handshake past it is refused with HTTP 503 `unavailable` and counted
    /// (`chatbus_connections_refused_total`). Default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
}

/// The default of [`WsConfig::max_connections`]: 16,384. Every connection holds a file
/// descriptor, and a process at its open-file limit accepts nothing at all (not even its
/// metrics or health endpoints), so the bound sits below the open-file limit of the machines
/// this is run on (20,000), leaving room for broker connections, the listener and logs. At
/// about 8 KiB of server memory per idle connection (`docs/BENCHMARKS.md`) it is some 130 MiB.
/// Raise it together with the open-file limit (the benchmarks open 19,000 connections with
/// `--max-connections` raised).
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            path: "/ws".to_owned(),
            max_frame_size: 16 * 1024,
            hard_frame_size: 1024 * 1024,
            rate_limit: Some(RateLimit::default()),
            control_rate_limit: Some(RateLimit::new(20, 2.0)),
            max_rooms: 64,
            max_history: 100,
            default_history: 50,
            allowed_origins: AllowedOrigins::default(),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            write_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            ip_limits: IpLimits::default(),
            verifier: None,
            hooks: None,
            hook_timeout: Duration::from_secs(2),
            max_watch: 100,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl WsConfig {
    /// Sets [`path`](Self::path).
    #[must_use]
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// Sets [`max_frame_size`](Self::max_frame_size) (and raises
    /// [`hard_frame_size`](Self::hard_frame_size) to at least it).
    #[must_use]
    pub fn with_max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self.hard_frame_size = self.hard_frame_size.max(bytes);
        self
    }

    /// Sets [`hard_frame_size`](Self::hard_frame_size).
    #[must_use]
    pub fn with_hard_frame_size(mut self, bytes: usize) -> Self {
        self.hard_frame_size = bytes;
        self
    }

    /// Sets [`rate_limit`](Self::rate_limit).
    #[must_use]
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = limit;
        self
    }

    /// Sets [`control_rate_limit`](Self::control_rate_limit).
    #[must_use]
    pub fn with_control_rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.control_rate_limit = limit;
        self
    }

    /// Sets [`max_rooms`](Self::max_rooms).
    #[must_use]
    pub fn with_max_rooms(mut self, n: usize) -> Self {
        self.max_rooms = n;
        self
    }

    /// Sets [`max_history`](Self::max_history).
    #[must_use]
    pub fn with_max_history(mut self, n: usize) -> Self {
        self.max_history = n;
        self
    }

    /// Sets [`default_history`](Self::default_history).
    #[must_use]
    pub fn with_default_history(mut self, n: usize) -> Self {
        self.default_history = n;
        self
    }

    /// Sets [`allowed_origins`](Self::allowed_origins).
    #[must_use]
    pub fn with_allowed_origins(mut self, origins: AllowedOrigins) -> Self {
        self.allowed_origins = origins;
        self
    }

    /// Sets [`ping_interval`](Self::ping_interval).
    #[must_use]
    pub fn with_ping_interval(mut self, d: Duration) -> Self {
        self.ping_interval = d;
        self
    }

    /// Sets [`idle_timeout`](Self::idle_timeout).
    #[must_use]
    pub fn with_idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Sets [`write_timeout`](Self::write_timeout).
    #[must_use]
    pub fn with_write_timeout(mut self, d: Duration) -> Self {
        self.write_timeout = d;
        self
    }

    /// Sets [`write_delay`](Self::write_delay); `Duration::ZERO` turns it off.
    ///
    /// ```
    /// use std::time::Duration;
    /// use chatbus_ws::WsConfig;
    ///
    /// assert_eq!(WsConfig::default().write_delay, Duration::ZERO);
    /// let config = WsConfig::default().with_write_delay(Duration::from_millis(5));
    /// assert_eq!(config.write_delay, Duration::from_millis(5));
    /// ```
    #[must_use]
    pub fn with_write_delay(mut self, d: Duration) -> Self {
        self.write_delay = d;
        self
    }

    /// Sets [`drain_timeout`](Self::drain_timeout).
    #[must_use]
    pub fn with_drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// Sets [`handshake_timeout`](Self::handshake_timeout).
    #[must_use]
    pub fn with_handshake_timeout(mut self, d: Duration) -> Self {
        self.handshake_timeout = d;
        self
    }

    /// Sets [`ip_limits`](Self::ip_limits).
    #[must_use]
    pub fn with_ip_limits(mut self, limits: IpLimits) -> Self {
        self.ip_limits = limits;
        self
    }

    /// Sets the token [`verifier`](Self::verifier).
    #[must_use]
    pub fn with_verifier(mut self, verifier: impl Verifier) -> Self {
        self.verifier = Some(Arc::new(verifier));
        self
    }

    /// Sets the application's [`hooks`](Self::hooks).
    #[must_use]
    pub fn with_hooks(mut self, hooks: impl Hooks) -> Self {
        self.hooks = Some(Arc::new(hooks));
        self
    }

    /// Sets [`hook_timeout`](Self::hook_timeout).
    #[must_use]
    pub fn with_hook_timeout(mut self, d: Duration) -> Self {
        self.hook_timeout = d;
        self
    }

    /// Sets [`max_watch`](Self::max_watch).
    #[must_use]
    pub fn with_max_watch(mut self, n: usize) -> Self {
        self.max_watch = n;
        self
    }

    /// Sets [`max_connections`](Self::max_connections).
    #[must_use]
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let same = AllowedOrigins::default();
        assert!(same.allows(None, Some("x:1")));
        assert!(same.allows(Some("http://127.0.0.1:3000"), Some("127.0.0.1:3000")));
        assert!(same.allows(Some("https://Chat.Example"), Some("chat.example:443")));
        assert!(!same.allows(Some("http://evil.example"), Some("127.0.0.1:3000")));
        assert!(!same.allows(Some("null"), Some("127.0.0.1:3000")));
        assert!(!same.allows(Some("http://127.0.0.1:3001"), Some("127.0.0.1:3000")));
        assert!(!same.allows(Some("http://a"), None));
        let also = AllowedOrigins::SameHost {
            also: vec!["https://app.example".into()],
        };
        assert!(also.allows(Some("https://APP.example/"), Some("api.example")));
        assert!(AllowedOrigins::Any.allows(Some("http://evil"), None));
    }
}
