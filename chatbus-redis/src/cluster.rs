//! The pub/sub link to a Redis Cluster: one RESP3 connection per master, sharded pub/sub.
//!
//! Why not the `redis` crate's cluster connection, which can `SSUBSCRIBE` and resubscribes by
//! itself after a disconnection or a topology change? Because the Broker contract needs two
//! things it does not give: to know *when* a subscription is live (its resubscriptions run
//! in the background, unannounced, so a subscriber cannot be told `Lagged` after the
//! resubscription, only before it — and a resync done before it misses what comes between),
//! and an ordered barrier (its pushes reach the application through a relay task, so a
//! message read before a confirmation may be handed over after it). Here each master gets
//! one multiplexed RESP3 connection whose pushes are queued, tagged with the node, in the
//! order the socket delivered them, by the connection's own reader: a reply awaited on a
//! connection comes after every push read before it, which is the barrier the subscriber
//! needs (see `subscriber.rs`).
//!
//! Topology comes from `CLUSTER SLOTS`, asked through the publishing cluster connection. A
//! channel `<prefix>:{room}` is routed by its hash tag, the room, so it goes to the master
//! that owns the room's stream and meta hash too. Anything that may have lost messages — a
//! node connection lost (a master killed: its replica takes over), a `MOVED` answer to a
//! subscription, or a shard channel the server unsubscribed by itself (its slot migrated) —
//! ends the session: the subscriber then [refreshes](ClusterLink::refresh) the topology,
//! keeping the connections of the masters that are still up, resubscribes every room and
//! tells `Lagged` to the subscriptions that may have lost messages (for a lost node: those of
//! its rooms; see `subscriber.rs`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the first `{`
/// and the next `}`, when not empty) or of the whole key, modulo 16384.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// One slot range and the master (`host:port`) that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotRange {
    pub(crate) start: u16,
    pub(crate) end: u16,
    pub(crate) master: (String, u16),
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Parses a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, …], replicas…], …]`.
pub(crate) fn parse_slots(reply: &Value) -> Option<Vec<SlotRange>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(parts) = range else {
            return None;
        };
        let start = u16::try_from(int(parts.first()?)?).ok()?;
        let end = u16::try_from(int(parts.get(1)?)?).ok()?;
        let Value::Array(master) = parts.get(2)? else {
            return None;
        };
        let host = text(master.first()?)?;
        let port = u16::try_from(int(master.get(1)?)?).ok()?;
        out.push(SlotRange {
            start,
            end,
            master: (host, port),
        });
    }
    Some(out)
}

/// What the link reports.
pub(crate) enum Event {
    Message(redis::Msg),
    /// The link cannot be trusted any more (see the module docs); the reason, for logs.
    Lost(String),
    /// The connection to one master was lost; the others are intact.
    NodeLost {
        node: usize,
        reason: String,
    },
}

/// A master the link has (or had) a connection to. Indexes into the link's node list never
/// change, so that the node tag of a queued push stays right.
struct Node {
    addr: (String, u16),
    // None once the node left the topology (or before its first connection).
    conn: Option<MultiplexedConnection>,
    // Its connection reported a disconnection: it must be made again.
    dead: bool,
    // The shard channels its connection has subscribed (confirmed).
    channels: HashSet<String>,
}

/// One connection per master, and the queue their pushes arrive on.
pub(crate) struct ClusterLink {
    nodes: Vec<Node>,
    ranges: Vec<(u16, u16, usize)>,
    tx: mpsc::UnboundedSender<(usize, PushInfo)>,
    pushes: mpsc::UnboundedReceiver<(usize, PushInfo)>,
    settings: redis::RedisConnectionInfo,
    connect_timeout: Duration,
    command_timeout: Duration,
    broadcast: String,
    // The node whose connection carries the broadcast subscription.
    broadcast_node: Option<usize>,
    // Shard channels we unsubscribed and whose confirmation is still to come; any other
    // `sunsubscribe` push was the server's (a migrated slot).
    unsubscribing: HashMap<Vec<u8>, usize>,
}

fn err(what: &str, detail: String) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "redis cluster",
        format!("{what}: {detail}"),
    ))
}

/// A reply that is a server error (for example `MOVED`) becomes an error.
fn check(values: Vec<Value>) -> redis::RedisResult<()> {
    for v in values {
        if let Value::ServerError(e) = v {
            return Err(err(
                "subscription refused",
                format!("{:?} {}", e.code(), e.details().unwrap_or_default()),
            ));
        }
    }
    Ok(())
}

impl ClusterLink {
    /// Reads the topology through `publisher` and connects to every master. `settings`
    /// carries the credentials; `connect_timeout` bounds each connection.
    pub(crate) async fn connect(
        publisher: &mut redis::cluster_async::ClusterConnection,
        settings: &redis::RedisConnectionInfo,
        broadcast: String,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> redis::RedisResult<Self> {
        let (tx, pushes) = mpsc::unbounded_channel();
        let mut link = Self {
            nodes: Vec::new(),
            ranges: Vec::new(),
            tx,
            pushes,
            settings: settings.clone().set_protocol(redis::ProtocolVersion::RESP3),
            connect_timeout,
            command_timeout,
            broadcast,
            broadcast_node: None,
            unsubscribing: HashMap::new(),
        };
        link.refresh(publisher).await?;
        Ok(link)
    }

    /// Reads the topology again and makes the connections match it: the connections to
    /// masters that are still masters and still up are kept — with their subscriptions, so
    /// the healthy shards' messages keep flowing (queued) while the subscriber recovers —
    /// a connection is made to every new master, and the others are closed. On failure
    /// (a master not reachable yet) the link stays usable for another attempt.
    pub(crate) async fn refresh(
        &mut self,
        publisher: &mut redis::cluster_async::ClusterConnection,
    ) -> redis::RedisResult<()> {
        // Asked of a master whose connection is up, when there is one: the cluster
        // connection may pick the dead node and wait for its retries.
        let kept = self
            .nodes
            .iter()
            .find(|n| !n.dead)
            .and_then(|n| n.conn.clone());
        let slots = redis::cmd("CLUSTER").arg("SLOTS").to_owned();
        let reply: Value = match kept {
            Some(mut conn) => match slots.query_async(&mut conn).await {
                Ok(v) => v,
                Err(_) => slots.query_async(publisher).await?,
            },
            None => slots.query_async(publisher).await?,
        };
        let ranges = parse_slots(&reply)
            .ok_or_else(|| err("CLUSTER SLOTS", "unexpected reply".to_owned()))?;
        let mut table = Vec::with_capacity(ranges.len());
        let mut masters = HashSet::new();
        for r in ranges {
            let idx = match self.nodes.iter().position(|n| n.addr == r.master) {
                Some(i) => i,
                None => {
                    self.nodes.push(Node {
                        addr: r.master.clone(),
                        conn: None,
                        dead: false,
                        channels: HashSet::new(),
                    });
                    self.nodes.len() - 1
                }
            };
            masters.insert(idx);
            table.push((r.start, r.end, idx));
        }
        table.sort_unstable();
        if masters.is_empty() {
            return Err(err("CLUSTER SLOTS", "no master serves any slot".to_owned()));
        }
        // Close what left the topology first: a demoted master (now a replica) would go on
        // delivering sharded messages to our subscriptions there.
        for (idx, node) in self.nodes.iter_mut().enumerate() {
            if !masters.contains(&idx) {
                node.conn = None;
                node.dead = false;
                node.channels.clear();
            }
        }
        let connects = masters
            .iter()
            .copied()
            .filter(|&idx| self.nodes[idx].conn.is_none() || self.nodes[idx].dead)
            .map(|idx| {
                let tx = self.tx.clone();
                let settings = self.settings.clone();
                let (host, port) = self.nodes[idx].addr.clone();
                let (ct, rt) = (self.connect_timeout, self.command_timeout);
                async move {
                    let info = redis::ConnectionAddr::Tcp(host, port);
                    let info = redis::IntoConnectionInfo::into_connection_info(info)?
                        .set_redis_settings(settings);
                    let client = redis::Client::open(info)?;
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(ct))
                        .set_response_timeout(Some(rt))
                        .set_push_sender(move |p: PushInfo| tx.send((idx, p)));
                    let conn = client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    Ok::<_, redis::RedisError>((idx, conn))
                }
            })
            .collect::<Vec<_>>();
        // The topology is applied even if a connection fails, so that a retry only makes
        // the missing ones.
        self.ranges = table;
        if self
            .broadcast_node
            .is_some_and(|b| !masters.contains(&b) || self.nodes[b].dead)
        {
            self.broadcast_node = None;
        }
        let mut failure = None;
        for r in join_all(connects).await {
            match r {
                Ok((idx, conn)) => {
                    let node = &mut self.nodes[idx];
                    node.conn = Some(conn);
                    node.dead = false;
                    node.channels.clear();
                }
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn conn(&self, idx: usize) -> redis::RedisResult<MultiplexedConnection> {
        match self.nodes.get(idx) {
            Some(Node {
                conn: Some(c),
                dead: false,
                ..
            }) => Ok(c.clone()),
            _ => Err(err("routing", format!("no connection to node {idx}"))),
        }
    }

    /// The node serving `channel`'s slot.
    pub(crate) fn owner(&self, channel: &str) -> redis::RedisResult<usize> {
        let s = slot(channel.as_bytes());
        self.ranges
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&s))
            .map(|(_, _, idx)| *idx)
            .ok_or_else(|| {
                err(
                    "routing",
                    format!("no master serves slot {s} (cluster down?)"),
                )
            })
    }

    /// Channels grouped by the node that serves them.
    fn by_node<'a>(
        &self,
        channels: &'a [String],
    ) -> redis::RedisResult<HashMap<usize, Vec<&'a String>>> {
        let mut out: HashMap<usize, Vec<&String>> = HashMap::new();
        for c in channels {
            out.entry(self.owner(c)?).or_default().push(c);
        }
        Ok(out)
    }

    /// One single-channel command per channel, pipelined per node (a multi-channel
    /// `SSUBSCRIBE` must stay within one slot, and one confirmation per command keeps the
    /// replies countable), all nodes at once.
    async fn per_node(&mut self, command: &str, channels: &[String]) -> redis::RedisResult<()> {
        let groups = self.by_node(channels)?;
        let mut calls = Vec::with_capacity(groups.len());
        for (idx, chans) in groups {
            let chans: Vec<String> = chans.into_iter().cloned().collect();
            calls.push(self.on_node(idx, command, chans)?);
        }
        let mut result = Ok(());
        for (idx, chans, r) in join_all(calls).await {
            match r.and_then(check) {
                Ok(()) => {
                    let set = &mut self.nodes[idx].channels;
                    if command == "SSUBSCRIBE" {
                        set.extend(chans);
                    } else {
                        for c in &chans {
                            set.remove(c);
                        }
                    }
                }
                Err(e) => result = Err(e),
            }
        }
        result
    }

    /// `command` for each of `chans` on node `idx`, pipelined.
    fn on_node(
        &self,
        idx: usize,
        command: &str,
        chans: Vec<String>,
    ) -> redis::RedisResult<
        impl std::future::Future<Output = (usize, Vec<String>, redis::RedisResult<Vec<Value>>)>,
    > {
        let mut pipe = redis::pipe();
        for c in &chans {
            pipe.cmd(command).arg(c.as_str());
        }
        let mut conn = self.conn(idx)?;
        Ok(async move {
            let r = conn.send_packed_commands(&pipe, 0, chans.len()).await;
            (idx, chans, r)
        })
    }

    /// Unsubscribes, on the connections kept through a [`refresh`](Self::refresh), the shard
    /// channels no longer `wanted` (rooms left while the subscriber was reconnecting).
    pub(crate) async fn prune(&mut self, wanted: &HashSet<String>) -> redis::RedisResult<()> {
        let mut calls = Vec::new();
        for idx in 0..self.nodes.len() {
            let stale: Vec<String> = self.nodes[idx]
                .channels
                .iter()
                .filter(|c| !wanted.contains(*c))
                .cloned()
                .collect();
            if stale.is_empty() || self.conn(idx).is_err() {
                continue;
            }
            for c in &stale {
                *self.unsubscribing.entry(c.as_bytes().to_vec()).or_default() += 1;
            }
            calls.push(self.on_node(idx, "SUNSUBSCRIBE", stale)?);
        }
        for (idx, chans, r) in join_all(calls).await {
            check(r?)?;
            for c in &chans {
                self.nodes[idx].channels.remove(c);
            }
        }
        Ok(())
    }

    /// `SSUBSCRIBE`s `channels`, each on the master of its slot; returns once confirmed.
    pub(crate) async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        self.per_node("SSUBSCRIBE", channels).await
    }

    /// `SUNSUBSCRIBE`s `channels`.
    pub(crate) async fn unsubscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        for c in channels {
            *self.unsubscribing.entry(c.as_bytes().to_vec()).or_default() += 1;
        }
        self.per_node("SUNSUBSCRIBE", channels).await
    }

    /// Subscribes the broadcast channel (classic pub/sub, which the cluster forwards to every
    /// node) on one node.
    pub(crate) async fn subscribe_all(&mut self) -> redis::RedisResult<()> {
        let idx = match self.broadcast_node {
            Some(i) => i,
            None => self
                .ranges
                .first()
                .map(|r| r.2)
                .ok_or_else(|| err("routing", "no master".to_owned()))?,
        };
        let mut conn = self.conn(idx)?;
        self.broadcast_node = Some(idx);
        let cmd = redis::cmd("SUBSCRIBE").arg(&self.broadcast).to_owned();
        check(vec![conn.send_packed_command(&cmd).await?])
    }

    pub(crate) async fn unsubscribe_all(&mut self) -> redis::RedisResult<()> {
        let Some(idx) = self.broadcast_node.take() else {
            return Ok(());
        };
        let mut conn = self.conn(idx)?;
        let cmd = redis::cmd("UNSUBSCRIBE").arg(&self.broadcast).to_owned();
        check(vec![conn.send_packed_command(&cmd).await?])
    }

    /// A `PING` on every node: once answered, every push read before is in the queue.
    pub(crate) async fn barrier(&mut self) -> redis::RedisResult<()> {
        let live: Vec<MultiplexedConnection> = self
            .nodes
            .iter()
            .filter(|n| !n.dead)
            .filter_map(|n| n.conn.clone())
            .collect();
        let pings = live.into_iter().map(|mut conn| async move {
            redis::cmd("PING")
                .query_async::<Value>(&mut conn)
                .await
                .map(|_| ())
        });
        for r in join_all(pings).await {
            r?;
        }
        Ok(())
    }

    fn event(&mut self, (idx, push): (usize, PushInfo)) -> Option<Event> {
        let node = self
            .nodes
            .get(idx)
            .map_or_else(|| "?".to_owned(), |n| format!("{}:{}", n.addr.0, n.addr.1));
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                redis::Msg::from_push_info(push).map(Event::Message)
            }
            PushKind::Disconnection => {
                if let Some(n) = self.nodes.get_mut(idx) {
                    n.dead = true;
                }
                Some(Event::NodeLost {
                    node: idx,
                    reason: format!("connection to {node} lost"),
                })
            }
            PushKind::SUnsubscribe => {
                let channel = match push.data.first() {
                    Some(Value::BulkString(b)) => b.clone(),
                    _ => Vec::new(),
                };
                match self.unsubscribing.get_mut(&channel) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        None
                    }
                    Some(_) => {
                        self.unsubscribing.remove(&channel);
                        None
                    }
                    None => Some(Event::Lost(format!(
                        "{node} unsubscribed {} (its slot moved)",
                        String::from_utf8_lossy(&channel)
                    ))),
                }
            }
            // Confirmations of our own requests.
            _ => None,
        }
    }

    /// The next message or loss.
    pub(crate) async fn next(&mut self) -> Event {
        loop {
            let Some(p) = self.pushes.recv().await else {
                return Event::Lost("every node connection closed".to_owned());
            };
            if let Some(e) = self.event(p) {
                return e;
            }
        }
    }

    /// What is queued already, without waiting.
    pub(crate) fn try_next(&mut self) -> Option<Event> {
        while let Ok(p) = self.pushes.try_recv() {
            if let Some(e) = self.event(p) {
                return Some(e);
            }
        }
        None
    }

    /// The master addresses (`host:port`) with a connection, for logs.
    pub(crate) fn node_names(&self) -> HashSet<String> {
        self.nodes
            .iter()
            .filter(|n| n.conn.is_some() && !n.dead)
            .map(|n| format!("{}:{}", n.addr.0, n.addr.1))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference values of the Redis Cluster specification.
    #[test]
    fn slots_follow_the_cluster_spec() {
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"chatbus:{general}:log"), slot(b"chatbus:{general}"));
        // An empty tag hashes the whole key.
        assert_eq!(slot(b"a{}b"), crc16(b"a{}b") % SLOTS);
    }
}
