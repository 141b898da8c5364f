//! The subscriber's pub/sub link, to a single Redis or to a Redis Cluster, and the
//! publishing connection of either: what differs between the two modes, behind one face, so
//! that the subscriber's ordering logic (`subscriber.rs`) and the broker are written once.

use std::collections::HashSet;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use redis::aio::{ConnectionLike, ConnectionManager, PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::cluster::{ClusterLink, Event};
use crate::error;
use crate::wire::Keys;

/// The connection commands (publish, history, health) go through.
#[derive(Clone)]
pub(crate) enum Publisher {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Publisher {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// How to open a link.
pub(crate) enum Connector {
    Single(redis::Client),
    Cluster {
        publisher: ClusterConnection,
        settings: redis::RedisConnectionInfo,
    },
}

/// An open pub/sub link.
pub(crate) enum Link {
    /// One RESP2 pub/sub connection; `Interest::All` is a pattern subscription.
    Single(PubSubSink, PubSubStream),
    /// One connection per master, sharded pub/sub; `Interest::All` is the broadcast channel.
    /// (Boxed: it is much larger than the single connection's handles.)
    Cluster(Box<ClusterLink>),
}

impl Connector {
    /// Opens a link, bounded by `timing`'s connect timeout.
    pub(crate) async fn connect(
        &self,
        keys: &Keys,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> chatbus_core::Result<Link> {
        let f = async {
            match self {
                Self::Single(client) => {
                    let (sink, stream) = client.get_async_pubsub().await?.split();
                    Ok(Link::Single(sink, stream))
                }
                Self::Cluster {
                    publisher,
                    settings,
                } => {
                    let mut publisher = publisher.clone();
                    ClusterLink::connect(
                        &mut publisher,
                        settings,
                        keys.broadcast(),
                        connect_timeout,
                        command_timeout,
                    )
                    .await
                    .map(|c| Link::Cluster(Box::new(c)))
                }
            }
        };
        match tokio::time::timeout(connect_timeout, f).await {
            Err(_) => Err(error::timeout("connect", connect_timeout)),
            Ok(Err(e)) => Err(error::map("connect", e, connect_timeout)),
            Ok(Ok(l)) => Ok(l),
        }
    }
}

impl Connector {
    /// Makes `link` usable again after a loss: on a cluster, the link re-reads the topology
    /// and keeps its connections to the masters that are still up (see
    /// `ClusterLink::refresh`); otherwise a new link replaces it.
    pub(crate) async fn reconnect(
        &self,
        link: &mut Option<Link>,
        keys: &Keys,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> chatbus_core::Result<()> {
        if let (Self::Cluster { publisher, .. }, Some(Link::Cluster(c))) = (self, link.as_mut()) {
            let mut publisher = publisher.clone();
            return match tokio::time::timeout(connect_timeout, c.refresh(&mut publisher)).await {
                Err(_) => Err(error::timeout("connect", connect_timeout)),
                Ok(Err(e)) => Err(error::map("connect", e, connect_timeout)),
                Ok(Ok(())) => Ok(()),
            };
        }
        *link = None;
        *link = Some(self.connect(keys, connect_timeout, command_timeout).await?);
        Ok(())
    }
}

impl Link {
    /// Subscribes room channels; returns once the server confirmed them.
    pub(crate) async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            Self::Single(sink, _) => sink.subscribe(channels).await,
            Self::Cluster(c) => c.subscribe(channels).await,
        }
    }

    pub(crate) async fn unsubscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            Self::Single(sink, _) => sink.unsubscribe(channels).await,
            Self::Cluster(c) => c.unsubscribe(channels).await,
        }
    }

    /// After a reconnect: drops the room subscriptions that a kept connection still has but
    /// nobody wants (`wanted`: the channels of every room with local subscribers). A new
    /// connection has none.
    pub(crate) async fn prune(&mut self, wanted: &HashSet<String>) -> redis::RedisResult<()> {
        match self {
            Self::Single(..) => Ok(()),
            Self::Cluster(c) => c.prune(wanted).await,
        }
    }

    /// Subscribes what `Interest::All` listens to.
    pub(crate) async fn subscribe_all(&mut self, keys: &Keys) -> redis::RedisResult<()> {
        match self {
            Self::Single(sink, _) => sink.psubscribe(keys.pattern()).await,
            Self::Cluster(c) => c.subscribe_all().await,
        }
    }

    pub(crate) async fn unsubscribe_all(&mut self, keys: &Keys) -> redis::RedisResult<()> {
        match self {
            Self::Single(sink, _) => sink.punsubscribe(keys.pattern()).await,
            Self::Cluster(c) => c.unsubscribe_all().await,
        }
    }

    /// A round trip on every connection: once it is back, every message read before it is
    /// queued for [`try_next`](Self::try_next).
    pub(crate) async fn barrier(&mut self) -> redis::RedisResult<()> {
        match self {
            Self::Single(sink, _) => sink.ping::<Value>().await.map(|_| ()),
            Self::Cluster(c) => c.barrier().await,
        }
    }

    /// The next message, or the loss of the link.
    pub(crate) async fn next(&mut self) -> Event {
        match self {
            Self::Single(_, stream) => match stream.next().await {
                Some(m) => Event::Message(m),
                None => Event::Lost("the server closed the connection".into()),
            },
            Self::Cluster(c) => c.next().await,
        }
    }

    /// What was read already, without waiting.
    pub(crate) fn try_next(&mut self) -> Option<Event> {
        match self {
            Self::Single(_, stream) => match stream.next().now_or_never()? {
                Some(m) => Some(Event::Message(m)),
                None => Some(Event::Lost("the server closed the connection".into())),
            },
            Self::Cluster(c) => c.try_next(),
        }
    }

    /// The cluster node that serves `channel` now (`None` on a single Redis, or when no
    /// master serves its slot).
    pub(crate) fn owner(&self, channel: &str) -> Option<usize> {
        match self {
            Self::Single(..) => None,
            Self::Cluster(c) => c.owner(channel).ok(),
        }
    }

    /// For logs: where the link goes.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Single(..) => "redis".to_owned(),
            Self::Cluster(c) => {
                let mut nodes: Vec<String> = c.node_names().into_iter().collect();
                nodes.sort();
                format!("redis cluster masters {}", nodes.join(","))
            }
        }
    }
}
