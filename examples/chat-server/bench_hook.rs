//! `--bench-publish-hook-ms`: a [`Hooks`] whose `on_publish` awaits a timer, for benchmarks only.
//!
//! It exists to measure what application hooks cost (issue #12): with `N > 0` every chat
//! message waits `N` ms in `on_publish` before it is published, standing in for a hook that does
//! real async work per message (a moderation call, a database write). `scripts/bench/hooks.sh`
//! runs the fanout and rooms scenarios with it and without hooks. It does nothing else: every
//! other hook keeps its default, so the server behaves as without hooks apart from the wait
//! (and the hook runner's bookkeeping around each call). Not for production use.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chatbus_ws::{Denied, Hooks, Publish, WsConfig};

/// The flag, flattened into the server's arguments.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BenchArgs {
    /// Benchmarking only: configure a hook whose on_publish awaits this many milliseconds
    /// for every chat message (measures the cost of hooks doing async work). 0: no hooks.
    #[arg(long, env = "CHATBUS_BENCH_PUBLISH_HOOK_MS", default_value_t = 0)]
    pub(crate) bench_publish_hook_ms: u64,
}

impl BenchArgs {
    /// `config` with the benchmark hook if the flag asks for one, else unchanged.
    pub(crate) fn apply(&self, config: WsConfig) -> WsConfig {
        if self.bench_publish_hook_ms == 0 {
            return config;
        }
        tracing::warn!(
            ms = self.bench_publish_hook_ms,
            "benchmark hook: every published message waits in on_publish"
        );
        config.with_hooks(SleepOnPublish {
            delay: Duration::from_millis(self.bench_publish_hook_ms),
        })
    }
}

/// What `#[async_trait]` makes of `async fn on_publish`.
type HookFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Denied>> + Send + 'a>>;

/// Awaits `delay` in `on_publish`; every other hook is the default.
#[derive(Debug)]
struct SleepOnPublish {
    delay: Duration,
}

// Written out as `#[async_trait]` expands it: the example's dependencies do not include the
// async-trait crate, and one method does not justify adding it.
impl Hooks for SleepOnPublish {
    fn on_publish<'life0, 'life1, 'async_trait>(
        &'life0 self,
        publish: &'life1 mut Publish,
    ) -> HookFuture<'async_trait>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        let _ = publish;
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            Ok(())
        })
    }
}
