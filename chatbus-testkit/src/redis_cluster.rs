//! A real Redis Cluster on loopback for tests: three masters and three replicas.
//!
//! Six [`RedisServer`]s (so the processes are run, killed and cleaned up exactly as a single
//! test server is), each with `--cluster-enabled yes`, a short `--cluster-node-timeout` (1 s,
//! so that a killed master's replica is promoted within a few seconds) and
//! `--cluster-require-full-coverage no` (so that the other shards keep serving while one
//! fails over, as a production cluster should be configured for chat traffic), joined with
//! `redis-cli --cluster create … --cluster-replicas 1`. [`RedisCluster::start`] returns once
//! every node reports `cluster_state:ok` and agrees on who serves every slot.
//!
//! ```no_run
//! # async fn f() {
//! let mut cluster = chatbus_testkit::redis_cluster::RedisCluster::start().await;
//! let seeds = cluster.seeds(); // ["127.0.0.1:port", ...]
//! let node = cluster.master_of("chatbus:{general}");
//! cluster.kill(node);
//! let took = cluster.wait_failover(node, std::time::Duration::from_secs(20)).await;
//! # }
//! ```

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::redis::{RedisOptions, RedisServer};
use crate::require_program;

/// How to install `redis-cli`, for the failure message when it is missing.
pub const CLI_INSTALL_HINT: &str = "Install it with `apt-get install redis-tools` (Debian/Ubuntu; \
     the redis-server package depends on it) or `brew install redis`.";

/// The cluster node timeout the nodes run with.
pub const NODE_TIMEOUT: Duration = Duration::from_millis(1000);

/// How long the cluster may take to form.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// One line of `CLUSTER NODES`: a node's port, whether it is a master that is not failed,
/// and the slot ranges it serves.
#[derive(Debug, Clone)]
struct NodeLine {
    port: u16,
    live_master: bool,
    slots: Vec<(u16, u16)>,
}

fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let addr = parts.get(1)?;
            let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags = parts.get(2)?;
            let live_master = flags.contains("master") && !flags.contains("fail");
            let slots = parts
                .iter()
                .skip(8)
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => {
                        let v = s.parse().ok()?;
                        Some((v, v))
                    }
                })
                .collect();
            Some(NodeLine {
                port,
                live_master,
                slots,
            })
        })
        .collect()
}

/// Three masters and three replicas of `redis-server --cluster-enabled yes`; killed on drop.
pub struct RedisCluster {
    cli: PathBuf,
    password: String,
    servers: Vec<RedisServer>,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster")
            .field("ports", &self.ports())
            .finish_non_exhaustive()
    }
}

/// The `redis-cli` program, or a panic saying how to install it.
pub fn redis_cli_program() -> PathBuf {
    require_program("redis-cli", &[], CLI_INSTALL_HINT)
}

impl RedisCluster {
    /// Starts six nodes on free loopback ports and joins them: three masters with one
    /// replica each.
    pub async fn start() -> Self {
        let cli = redis_cli_program();
        let password = RedisOptions::default().password;
        let mut servers = Vec::with_capacity(6);
        let timeout_ms = NODE_TIMEOUT.as_millis().to_string();
        for _ in 0..6 {
            let options = RedisOptions {
                password: password.clone(),
                ..RedisOptions::default()
            }
            .with_args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                timeout_ms.as_str(),
                "--cluster-require-full-coverage",
                "no",
                "--cluster-replica-validity-factor",
                "0",
                "--masterauth",
                password.as_str(),
            ]);
            servers.push(RedisServer::start_with(options).await);
        }
        let cluster = Self {
            cli,
            password,
            servers,
        };
        let mut args = vec!["--cluster".to_owned(), "create".to_owned()];
        args.extend(cluster.ports().iter().map(|p| format!("127.0.0.1:{p}")));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(str::to_owned));
        let out = cluster.cli_any(&args);
        assert!(
            out.contains("All 16384 slots covered"),
            "redis-cli --cluster create failed:\n{out}"
        );
        let deadline = Instant::now() + FORM_TIMEOUT;
        loop {
            if cluster.is_ok() {
                return cluster;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok within {FORM_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn ports(&self) -> Vec<u16> {
        self.servers.iter().map(RedisServer::port).collect()
    }

    /// `redis-cli -p PORT -a PW ARGS…`: its stdout and stderr ("" when it cannot run).
    fn cli(&self, port: u16, args: &[String]) -> String {
        let out = Command::new(&self.cli)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-a",
                &self.password,
            ])
            .arg("--no-auth-warning")
            .args(args)
            .output();
        match out {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("cannot run redis-cli: {e}"),
        }
    }

    /// [`cli`](Self::cli) on the first running node.
    fn cli_any(&self, args: &[String]) -> String {
        let port = self
            .servers
            .iter()
            .find(|s| s.is_started())
            .map_or(0, RedisServer::port);
        self.cli(port, args)
    }

    fn live(&self) -> impl Iterator<Item = &RedisServer> {
        self.servers.iter().filter(|s| s.is_started())
    }

    /// Every running node says `cluster_state:ok`, and all agree on the masters of all
    /// 16384 slots, none of them a stopped node.
    fn is_ok(&self) -> bool {
        let mut view: Option<Vec<(u16, u16, u16)>> = None;
        for s in self.live() {
            if !self
                .cli(s.port(), &["CLUSTER".into(), "INFO".into()])
                .contains("cluster_state:ok")
            {
                return false;
            }
            let mut table: Vec<(u16, u16, u16)> =
                parse_nodes(&self.cli(s.port(), &["CLUSTER".into(), "NODES".into()]))
                    .into_iter()
                    .filter(|n| n.live_master)
                    .flat_map(|n| n.slots.into_iter().map(move |(a, b)| (a, b, n.port)))
                    .collect();
            table.sort_unstable();
            let covered: u32 = table.iter().map(|(a, b, _)| u32::from(b - a) + 1).sum();
            let dead = table
                .iter()
                .any(|(_, _, p)| !self.live().any(|s| s.port() == *p));
            if covered != 16384 || dead {
                return false;
            }
            match &view {
                Some(v) if *v != table => return false,
                _ => view = Some(table),
            }
        }
        view.is_some()
    }

    /// The password of every node.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// `host:port` of every running node (masters and replicas): seeds for a client.
    pub fn seeds(&self) -> Vec<String> {
        self.live()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect()
    }

    /// `host:port` of every node, running or not, in start order (the indexes that
    /// [`master_of`](Self::master_of) and [`kill`](Self::kill) use).
    pub fn nodes(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> u16 {
        let out = self.cli_any(&["CLUSTER".into(), "KEYSLOT".into(), key.into()]);
        match out.trim().parse() {
            Ok(s) => s,
            Err(_) => panic!("CLUSTER KEYSLOT {key}: {out}"),
        }
    }

    /// The index (into [`nodes`](Self::nodes)) of the master that serves `key`'s slot now.
    pub fn master_of(&self, key: &str) -> usize {
        self.master_of_slot(self.slot_of(key))
    }

    /// The index (into [`nodes`](Self::nodes)) of the master that serves `slot` now.
    pub fn master_of_slot(&self, slot: u16) -> usize {
        let nodes = parse_nodes(&self.cli_any(&["CLUSTER".into(), "NODES".into()]));
        let port = nodes
            .iter()
            .filter(|n| n.live_master)
            .find(|n| n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|n| n.port);
        match port.and_then(|p| self.ports().iter().position(|q| *q == p)) {
            Some(i) => i,
            None => panic!("no live master serves slot {slot}"),
        }
    }

    /// Kills node `index` at once (SIGKILL).
    pub fn kill(&mut self, index: usize) {
        self.servers[index].kill();
    }

    /// Waits until the cluster is whole again without the killed node(s) — a replica took
    /// over their slots and every running node agrees — and returns how long that took.
    /// Panics after `timeout`.
    pub async fn wait_failover(&self, killed: usize, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if !self.servers[killed].is_started() && self.is_ok() {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "no failover of node {killed} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Moves hash slot `slot`, with its keys, to the master `to` (an index into
    /// [`nodes`](Self::nodes)), the way `redis-cli --cluster reshard` does: `IMPORTING` on
    /// the target, `MIGRATING` on the source, `MIGRATE` of every key, then `SETSLOT … NODE`
    /// on every master. Returns once every node agrees on the new owner.
    pub async fn move_slot(&self, slot: u16, to: usize) {
        let from = self.master_of_slot(slot);
        assert_ne!(from, to, "slot {slot} is on node {to} already");
        let id = |i: usize| self.command(i, &["CLUSTER", "MYID"]).trim().to_owned();
        let (from_id, to_id) = (id(from), id(to));
        let slot_s = slot.to_string();
        let ok = |what: &str, out: String| assert!(out.contains("OK"), "{what}: {out}");
        ok(
            "IMPORTING",
            self.command(to, &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &from_id]),
        );
        ok(
            "MIGRATING",
            self.command(from, &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &to_id]),
        );
        let to_port = self.servers[to].port().to_string();
        loop {
            let keys = self.command(from, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"]);
            let keys: Vec<&str> = keys.split_whitespace().collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec![
                "MIGRATE",
                "127.0.0.1",
                to_port.as_str(),
                "",
                "0",
                "5000",
                "AUTH",
                self.password.as_str(),
                "KEYS",
            ];
            args.extend(keys);
            ok("MIGRATE", self.command(from, &args));
        }
        for (i, s) in self.servers.iter().enumerate() {
            if s.is_started() {
                // Replicas answer an error here; the masters' word is what counts.
                let _ = self.command(i, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id]);
            }
        }
        let deadline = Instant::now() + FORM_TIMEOUT;
        loop {
            let moved = self.live().all(|s| {
                parse_nodes(&self.cli(s.port(), &["CLUSTER".into(), "NODES".into()]))
                    .iter()
                    .any(|n| {
                        n.port == self.servers[to].port()
                            && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
                    })
            });
            if moved {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "slot {slot} did not move to node {to}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs a command on node `index` with `redis-cli` and returns its output (stdout and
    /// stderr), e.g. `["PUBSUB", "SHARDNUMSUB", channel]`.
    pub fn command(&self, index: usize, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        self.cli(self.servers[index].port(), &args)
    }

    /// The log of node `index`, for failure messages.
    pub fn log(&self, index: usize) -> String {
        self.servers[index].log()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines() {
        let text = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master,fail - 0 0 2 connected 5461-10922 [5461->-x]
c3 127.0.0.1:7002@17002 slave a1 0 0 1 connected
d4 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383 7";
        let n = parse_nodes(text);
        assert_eq!(n.len(), 4);
        assert_eq!((n[0].port, n[0].live_master), (7000, true));
        assert_eq!(n[0].slots, vec![(0, 5460)]);
        assert!(!n[1].live_master);
        assert_eq!(n[1].slots, vec![(5461, 10922)]);
        assert!(!n[2].live_master && n[2].slots.is_empty());
        assert_eq!(n[3].slots, vec![(10923, 16383), (7, 7)]);
    }
}
