//! Users across instances: who is connected here ([`Users`], the registry behind "disconnect a
//! user everywhere" and user status), and whether a watched user is online anywhere.
//!
//! How status travels (all ephemeral envelopes, see `payload`):
//! - An instance announces `status{online}` on a user's status channel (`_s:<h(user)>`) when
//!   the user's first connection on it opens or its last one closes, and again whenever it is
//!   probed for that user.
//! - An instance with watchers of a user subscribes to the user's status channel (its watching
//!   sessions are members of it), probes the user's personal channel (`_u:<h(user)>`, to which
//!   every instance with a connection of the user is subscribed) when the watch starts and
//!   then every presence interval, and keeps the latest announcement per instance.
//! - An instance that stops answering (killed) is forgotten after two intervals; the check runs
//!   every half interval, so its users go offline within 2.5 intervals (documented as 3).
//!
//! A user is online when it has a connection on this instance or an instance announced it
//! online and has not been forgotten. Several connections count as one user.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chatbus_core::{CloseReason, Envelope, Hub, MessageId, SessionHandle};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::access::{status_channel, user_channel};
use crate::chat::lock;
use crate::payload::{self, UserStatus};
use crate::protocol;

/// How long a `watch` waits for other instances to answer its probe before it reports a user
/// offline (an online answer ends the wait at once).
pub(crate) const PROBE_WAIT: Duration = Duration::from_millis(300);

pub(crate) struct Users {
    instance: u128,
    interval: Duration,
    state: Mutex<State>,
    /// Wakes the task: statuses to announce.
    wake: Notify,
    /// Wakes `watch`es waiting for probe answers.
    answered: Notify,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("instance", &format_args!("{:032x}", self.instance))
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    /// This instance's connections, by user.
    local: HashMap<Arc<str>, Vec<SessionHandle>>,
    /// Users whose status this instance must announce soon (a change, or a probe).
    announce: HashSet<Arc<str>>,
    /// Users watched by connections of this instance: what the other instances said.
    watched: HashMap<Arc<str>, View>,
    seq: u64,
}

#[derive(Default)]
struct View {
    instances: HashMap<u128, Seen>,
    /// What local watchers were last told, to push changes only.
    emitted: Option<bool>,
}

struct Seen {
    seq: u64,
    online: bool,
    at: Instant,
}

impl View {
    fn online(&self, now: Instant, ttl: Duration) -> bool {
        self.instances
            .values()
            .any(|s| s.online && now.saturating_duration_since(s.at) < ttl)
    }
}

impl Users {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            instance: MessageId::new().as_u128(),
            interval: interval.max(Duration::from_millis(10)),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            answered: Notify::new(),
        }
    }

    fn ttl(&self) -> Duration {
        self.interval.saturating_mul(2)
    }

    /// A connection of `handle.user()` opened here.
    pub(crate) fn connected(&self, handle: SessionHandle) {
        let mut st = lock(&self.state);
        let user = handle.user().clone();
        // Most users have one connection: room for one, not the four a first push makes.
        let list = st
            .local
            .entry(user.clone())
            .or_insert_with(|| Vec::with_capacity(1));
        list.push(handle);
        if list.len() == 1 {
            st.announce.insert(user);
            drop(st);
            self.wake.notify_one();
        }
    }

    /// The connection `session` of `user` closed.
    pub(crate) fn disconnected(&self, user: &Arc<str>, session: u64) {
        let mut st = lock(&self.state);
        let Some(list) = st.local.get_mut(user) else {
            return;
        };
        list.retain(|h| h.id() != session);
        if list.is_empty() {
            st.local.remove(user);
            st.announce.insert(user.clone());
            drop(st);
            self.wake.notify_one();
        }
    }

    /// Closes every local connection of `user` with [`CloseReason::Disconnected`].
    pub(crate) fn kick(&self, user: &str) -> usize {
        let handles = lock(&self.state)
            .local
            .get(user)
            .cloned()
            .unwrap_or_default();
        for h in &handles {
            h.close(CloseReason::Disconnected);
        }
        handles.len()
    }

    /// Another instance watches `user`: announce it if it is connected here.
    pub(crate) fn on_probe(&self, user: &str) {
        let mut st = lock(&self.state);
        if let Some((user, _)) = st.local.get_key_value(user) {
            let user = user.clone();
            st.announce.insert(user);
            drop(st);
            self.wake.notify_one();
        }
    }

    /// An instance's announcement (or this instance's own, delivered locally to recheck);
    /// returns the `status` frame for the local watchers if what they were told changed.
    pub(crate) fn on_status(&self, s: &UserStatus<'_>) -> Option<Bytes> {
        let now = Instant::now();
        let ttl = self.ttl();
        let mut st = lock(&self.state);
        let local = st.local.contains_key(s.user);
        let view = st.watched.get_mut(s.user)?;
        // This instance's own state is `local`, always current; its announcements only trigger
        // the recheck below.
        if s.instance != self.instance
            && view
                .instances
                .get(&s.instance)
                .is_none_or(|v| v.seq < s.seq)
        {
            view.instances.insert(
                s.instance,
                Seen {
                    seq: s.seq,
                    online: s.online,
                    at: now,
                },
            );
        }
        view.instances
            .retain(|_, v| now.saturating_duration_since(v.at) < ttl);
        let online = local || view.online(now, ttl);
        if online {
            self.answered.notify_waiters();
        }
        // Before the first `watch` answered (`settle`), there is nothing to push a change to:
        // the answer itself reports the state.
        if view.emitted.is_none_or(|told| told == online) {
            return None;
        }
        view.emitted = Some(online);
        Some(protocol::status(s.user, online))
    }

    /// Starts tracking `user` for a local watcher; true if it was not tracked yet (the caller
    /// probes it).
    pub(crate) fn watch(&self, user: &Arc<str>) -> bool {
        let mut st = lock(&self.state);
        if st.watched.contains_key(user) {
            return false;
        }
        st.watched.insert(user.clone(), View::default());
        true
    }

    /// Whether `user` is online, as far as this instance knows now.
    pub(crate) fn is_online(&self, user: &str) -> bool {
        let st = lock(&self.state);
        st.local.contains_key(user)
            || st
                .watched
                .get(user)
                .is_some_and(|v| v.online(Instant::now(), self.ttl()))
    }

    /// Waits (at most [`PROBE_WAIT`]) until every one of `users` is known online; returns
    /// each user's status then, and records it as what the watchers were told.
    pub(crate) async fn settle(&self, users: &[Arc<str>]) -> Vec<(Arc<str>, bool)> {
        let deadline = Instant::now() + PROBE_WAIT;
        loop {
            let answered = self.answered.notified();
            if users.iter().all(|u| self.is_online(u)) {
                break;
            }
            if tokio::time::timeout_at(deadline, answered).await.is_err() {
                break;
            }
        }
        let now = Instant::now();
        let ttl = self.ttl();
        let mut st = lock(&self.state);
        let st = &mut *st;
        users
            .iter()
            .map(|u| {
                let online = st.local.contains_key(u)
                    || st.watched.get(u).is_some_and(|v| v.online(now, ttl));
                if let Some(v) = st.watched.get_mut(u) {
                    v.emitted = Some(online);
                }
                (u.clone(), online)
            })
            .collect()
    }

    /// This instance's own announcement of `user`.
    fn own(&self, st: &mut State, user: &str) -> Envelope {
        st.seq += 1;
        let online = st.local.contains_key(user);
        Envelope::ephemeral(
            status_channel(user),
            payload::status(&UserStatus {
                instance: self.instance,
                seq: st.seq,
                online,
                user,
            }),
        )
    }

    /// Announces changes and answers probes; every half interval rechecks the watched users
    /// (forgetting instances that went silent), and every interval probes them again.
    pub(crate) async fn run(self: Arc<Self>, hub: Hub, stop: CancellationToken) {
        let half = self.interval / 2;
        let mut tick = tokio::time::interval(half);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                _ = tick.tick() => {
                    ticks += 1;
                    self.recheck(&hub, ticks.is_multiple_of(2)).await;
                }
            }
            let announce: Vec<Envelope> = {
                let mut st = lock(&self.state);
                let users: Vec<Arc<str>> = st.announce.drain().collect();
                users.iter().map(|u| self.own(&mut st, u)).collect()
            };
            for env in announce {
                // Local watchers first, without the broker's round trip.
                hub.deliver_local(&env);
                if let Err(e) = hub.publish(&env).await {
                    tracing::warn!(room = %env.room, error = %e, "status announcement failed");
                }
            }
        }
    }

    async fn recheck(&self, hub: &Hub, probe: bool) {
        // The hub's locks are never taken under `state` (the encoder takes `state` inside the
        // hub's delivery): collect, ask the hub, then prune.
        let watched: Vec<Arc<str>> = lock(&self.state).watched.keys().cloned().collect();
        let (users, gone): (Vec<_>, Vec<_>) = watched
            .into_iter()
            .partition(|u| !hub.local_members(&status_channel(u)).is_empty());
        if !gone.is_empty() {
            // Users nobody here watches any more are forgotten.
            let mut st = lock(&self.state);
            for u in &gone {
                st.watched.remove(u);
            }
        }
        for user in users {
            let env = {
                let mut st = lock(&self.state);
                self.own(&mut st, &user)
            };
            hub.deliver_local(&env);
            if probe {
                self.probe(hub, &user).await;
            }
        }
    }

    /// Publishes a probe for `user` (a watch started).
    pub(crate) async fn probe(&self, hub: &Hub, user: &str) {
        let env = Envelope::ephemeral(user_channel(user), payload::probe(user));
        if let Err(e) = hub.publish(&env).await {
            tracing::debug!(user = %user, error = %e, "status probe failed");
        }
    }
}
