//! Per-address limits of the handshake: concurrent connections and connection attempts per
//! client IP ([`IpLimits`]), with the address taken from `X-Forwarded-For` only behind a
//! trusted proxy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::http::HeaderMap;

use crate::config::RateLimit;
use crate::session::TokenBucket;

/// Addresses tracked before idle ones (no open connection, attempt bucket full again) are
/// forgotten: the table must not grow with every address that ever connected.
const PRUNE_AT: usize = 4096;

/// Limits per client IP address, checked at the handshake before the token; a refusal is HTTP
/// 429 with a `rate_limited` JSON error, counted like every refusal. Off by default.
///
/// ```
/// use std::net::IpAddr;
/// use chatbus_ws::{IpLimits, RateLimit, WsConfig};
///
/// let proxy: IpAddr = "10.0.0.5".parse().expect("address");
/// let config = WsConfig::default().with_ip_limits(
///     IpLimits::default()
///         .with_max_connections(Some(50))
///         .with_attempts(Some(RateLimit::new(20, 1.0)))
///         .with_trusted_proxies(vec![proxy]),
/// );
/// assert_eq!(config.ip_limits.max_connections, Some(50));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct IpLimits {
    /// Open WebSocket connections one address may hold; `None`: no limit (the default).
    pub max_connections: Option<usize>,
    /// Handshake attempts per address, as a token bucket (every request to the socket's
    /// route counts, refused ones included); `None`: no limit (the default).
    pub attempts: Option<RateLimit>,
    /// Peers whose `X-Forwarded-For` is believed: for a connection from one of these, the
    /// client address is the right-most address of that header that is not itself a trusted
    /// proxy. From any other peer the header is ignored (anyone can send it). Exact addresses;
    /// default none.
    pub trusted_proxies: Vec<IpAddr>,
}

impl IpLimits {
    /// Sets [`max_connections`](Self::max_connections).
    #[must_use]
    pub fn with_max_connections(mut self, n: Option<usize>) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets [`attempts`](Self::attempts).
    #[must_use]
    pub fn with_attempts(mut self, limit: Option<RateLimit>) -> Self {
        self.attempts = limit;
        self
    }

    /// Sets [`trusted_proxies`](Self::trusted_proxies).
    #[must_use]
    pub fn with_trusted_proxies(mut self, proxies: Vec<IpAddr>) -> Self {
        self.trusted_proxies = proxies;
        self
    }

    /// Whether any limit is on (else the table is never touched).
    pub(crate) fn enabled(&self) -> bool {
        self.max_connections.is_some() || self.attempts.is_some()
    }

    /// The client address of a request from `peer` with these headers.
    pub(crate) fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusted_proxies.contains(&peer) {
            return peer;
        }
        let mut last = peer;
        // Right to left: each trusted proxy appended the address it got the request from; the
        // first one that is not a trusted proxy is the client as far as we can tell.
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                // A malformed entry: what is left of it cannot be trusted.
                return last;
            };
            if !self.trusted_proxies.contains(&ip) {
                return ip;
            }
            last = ip;
        }
        last
    }
}

/// Why an address was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    TooManyConnections,
    TooManyAttempts,
}

#[derive(Debug)]
struct Entry {
    open: usize,
    attempts: Option<TokenBucket>,
}

/// The per-address counts, shared by the service's handshakes.
#[derive(Debug, Default)]
pub(crate) struct IpTable {
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<IpAddr, Entry>,
    /// The size at which idle entries are next swept: doubled past what a sweep kept, so that
    /// a table full of busy addresses is not swept on every handshake.
    prune_at: usize,
}

impl IpTable {
    /// Charges one attempt and, if allowed, takes a connection slot for `ip`.
    pub(crate) fn admit(
        self: &Arc<Self>,
        limits: &IpLimits,
        ip: IpAddr,
    ) -> Result<IpSlot, Refusal> {
        // Poisoning needs a panic while the lock is held, and nothing here panics; the data
        // stays consistent either way (plain counters).
        let mut table = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if table.entries.len() >= table.prune_at.max(PRUNE_AT) {
            table
                .entries
                .retain(|_, e| e.open > 0 || e.attempts.as_mut().is_some_and(|b| !b.is_full()));
            table.prune_at = table.entries.len() * 2;
        }
        let entry = table.entries.entry(ip).or_insert_with(|| Entry {
            open: 0,
            attempts: limits.attempts.map(TokenBucket::new),
        });
        if !entry.attempts.as_mut().is_none_or(TokenBucket::allow) {
            return Err(Refusal::TooManyAttempts);
        }
        if limits.max_connections.is_some_and(|max| entry.open >= max) {
            return Err(Refusal::TooManyConnections);
        }
        entry.open += 1;
        Ok(IpSlot {
            table: self.clone(),
            ip,
        })
    }

    fn release(&self, ip: IpAddr) {
        let mut table = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = table.entries.get_mut(&ip) {
            e.open = e.open.saturating_sub(1);
        }
    }
}

/// One connection's place in its address's count, given back when dropped (the session ended,
/// or the upgrade never happened).
#[derive(Debug)]
pub(crate) struct IpSlot {
    table: Arc<IpTable>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.table.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let limits = IpLimits::default().with_trusted_proxies(vec![ip("10.0.0.1"), ip("10.0.0.2")]);
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "1.2.3.4, 5.6.7.8, 10.0.0.2".parse().expect("header"),
        );
        assert_eq!(limits.client_ip(ip("10.0.0.1"), &h), ip("5.6.7.8"));
        assert_eq!(limits.client_ip(ip("9.9.9.9"), &h), ip("9.9.9.9"));
        h.insert(
            "x-forwarded-for",
            "garbage, 10.0.0.2".parse().expect("header"),
        );
        assert_eq!(limits.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.2"));
        assert_eq!(
            limits.client_ip(ip("10.0.0.1"), &HeaderMap::new()),
            ip("10.0.0.1")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slots_and_attempts() {
        let table = Arc::new(IpTable::default());
        let limits = IpLimits::default()
            .with_max_connections(Some(1))
            .with_attempts(Some(RateLimit::new(3, 1.0)));
        let a = ip("1.1.1.1");
        let slot = table.admit(&limits, a).expect("first");
        assert_eq!(
            table.admit(&limits, a).err(),
            Some(Refusal::TooManyConnections)
        );
        assert!(table.admit(&limits, ip("2.2.2.2")).is_ok());
        drop(slot);
        let _slot = table.admit(&limits, a).expect("slot given back");
        assert_eq!(
            table.admit(&limits, a).err(),
            Some(Refusal::TooManyAttempts)
        );
    }
}
