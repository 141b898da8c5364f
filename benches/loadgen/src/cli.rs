//! The command line: subcommands and their flags (clap derive). Parsing only; what each
//! subcommand does lives in `run`, `compare`, `link` (the worker) and `net`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::proto::Protocol;

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "WebSocket chat load generator (chatbus, Socket.IO and the floor)"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Sub,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Sub {
    /// Connect, load, measure, report.
    Run(RunArgs),
    /// Print chatbus against the peer and the floor: ratios of their fanout ramps and idle
    /// runs, and a chart of the ramps.
    Compare(CompareArgs),
    /// Internal: one engine in a child process, driven over stdin/stdout.
    #[command(hide = true)]
    Worker,
    /// Print a free TCP port on 127.0.0.1 (for the scripts).
    FreePort,
    /// Wait until `GET URL` answers 200 (loopback only); exit 1 after the timeout.
    WaitHttp {
        /// http://127.0.0.1:PORT/path
        url: String,
        /// Seconds to wait at most.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
}

#[derive(Args, Debug, Clone)]
pub(crate) struct RunArgs {
    /// Protocol spoken to the servers.
    #[arg(long, value_enum, default_value = "chatbus")]
    pub(crate) protocol: Protocol,
    /// Server URLs (repeat or comma-separate); client i uses URL i % count. Loopback only.
    /// chatbus: ws://127.0.0.1:PORT/ws; socketio: ws://127.0.0.1:PORT (the Engine.IO path
    /// is added); floor: ws://127.0.0.1:PORT.
    #[arg(long = "url", required = true, value_delimiter = ',')]
    pub(crate) urls: Vec<String>,
    /// Clients to connect.
    #[arg(long, default_value_t = 100)]
    pub(crate) clients: u32,
    /// Rooms; clients are split evenly (contiguous blocks, so a room spans every URL).
    #[arg(long, default_value_t = 1)]
    pub(crate) rooms: u32,
    /// Put each room's members on at most this many of the URLs (room `r` on URLs `r`,
    /// `r + 1`, ... modulo their number), as a deployment that routes by room would; 0: every
    /// room spans every URL.
    #[arg(long, default_value_t = 0)]
    pub(crate) room_spread: u32,
    /// Clients that send (spread over the rooms).
    #[arg(long, default_value_t = 10)]
    pub(crate) senders: u32,
    /// Body size in bytes.
    #[arg(long, default_value_t = 100)]
    pub(crate) size: usize,
    /// Total messages per second over all senders (fixed-rate run). 0: connect only.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) rate: f64,
    /// Seconds of sending for a fixed-rate run.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) duration: f64,
    /// Open-loop ramp: steps of rising rate until p99 > --p99-limit-ms or any loss.
    #[arg(long)]
    pub(crate) ramp: bool,
    /// Explicit ramp steps (messages/s, comma-separated) instead of a geometric series.
    #[arg(long, value_delimiter = ',')]
    pub(crate) rates: Vec<f64>,
    /// First rate of the ramp (messages/s); --rate is used as the first step if given.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) ramp_from: f64,
    /// Each ramp step multiplies the rate by this.
    #[arg(long, default_value_t = 1.25)]
    pub(crate) ramp_factor: f64,
    /// Highest rate tried (messages/s).
    #[arg(long, default_value_t = 1_000_000.0)]
    pub(crate) ramp_max: f64,
    /// Seconds of sending per ramp step.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) step_secs: f64,
    /// In a ramp, a rate that fails is tried again this many times before the ramp stops
    /// (the machine is shared: one noisy step should not end the search).
    #[arg(long, default_value_t = 1)]
    pub(crate) retries: u32,
    /// A failed ramp step during which other processes used more than this much CPU (% of one
    /// core) is repeated without counting as a retry (at most 3 times per run).
    #[arg(long, default_value_t = 25.0)]
    pub(crate) noise_pct: f64,
    /// A step holds while its p99 stays at or below this.
    #[arg(long, default_value_t = 50.0)]
    pub(crate) p99_limit_ms: f64,
    /// After sending, wait at most this long for the last deliveries.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) drain_secs: f64,
    /// Idle checkpoints: after connecting this many clients, wait --settle-secs and read the
    /// server's RSS (e.g. 10000,19000).
    #[arg(long, value_delimiter = ',')]
    pub(crate) idle_at: Vec<u32>,
    /// Seconds to let the server settle before an idle RSS reading.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) settle_secs: f64,
    /// Server process ids (CPU and RSS are sampled; repeat or comma-separate).
    #[arg(long = "server-pid", value_delimiter = ',')]
    pub(crate) server_pids: Vec<u32>,
    /// Broker process ids (redis-server, tansu), whose CPU is added to the servers'.
    #[arg(long = "broker-pid", value_delimiter = ',')]
    pub(crate) broker_pids: Vec<u32>,
    /// Generator processes (each holds its share of the sockets; the per-process open-file
    /// limit is what forces more than one for large idle runs).
    #[arg(long, default_value_t = 1)]
    pub(crate) procs: u32,
    /// Bind client sockets to this many source addresses 127.0.0.1, 127.0.0.2, ... (spreads
    /// the ephemeral ports; 1 lets the kernel choose).
    #[arg(long, default_value_t = 1)]
    pub(crate) sources: u8,
    /// New connections per second.
    #[arg(long, default_value_t = 4000)]
    pub(crate) connect_rate: u32,
    /// Connections in their handshake at once, per process.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_pending: u32,
    /// A connection not ready after this many seconds counts as a connect error.
    #[arg(long, default_value_t = 15.0)]
    pub(crate) connect_timeout: f64,
    /// Hard bound on the whole run, seconds (steps that would start later are skipped).
    #[arg(long, default_value_t = 170.0)]
    pub(crate) max_secs: f64,
    /// Output name: target/loadgen/NAME.json and NAME.svg.
    #[arg(long, default_value = "loadgen")]
    pub(crate) name: String,
    /// Free text for the report (e.g. "chatbus redis x2").
    #[arg(long, default_value = "")]
    pub(crate) label: String,
    /// Output directory (default: target/loadgen of the workspace).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Width of a time-series bucket, ms.
    #[arg(long, default_value_t = 250)]
    pub(crate) bucket_ms: u64,
    /// Exit non-zero unless every client connected and nothing was lost or duplicated.
    #[arg(long)]
    pub(crate) assert_clean: bool,
}

#[derive(Args, Debug)]
pub(crate) struct CompareArgs {
    /// chatbus fanout ramp report (JSON).
    #[arg(long)]
    pub(crate) chatbus_fanout: PathBuf,
    /// Peer fanout ramp report (JSON).
    #[arg(long)]
    pub(crate) peer_fanout: PathBuf,
    /// chatbus idle report (JSON).
    #[arg(long)]
    pub(crate) chatbus_idle: Option<PathBuf>,
    /// Peer idle report (JSON).
    #[arg(long)]
    pub(crate) peer_idle: Option<PathBuf>,
    /// Floor fanout ramp report (JSON; `benches/floor`).
    #[arg(long)]
    pub(crate) floor_fanout: Option<PathBuf>,
    /// Floor idle report (JSON).
    #[arg(long)]
    pub(crate) floor_idle: Option<PathBuf>,
    /// The fixed rate (messages/s) at which CPU per delivery and p99 are compared; default:
    /// the first step of the chatbus report.
    #[arg(long)]
    pub(crate) fixed_rate: Option<f64>,
    /// Also write the table here (markdown).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Write the chart of the fanout ramps here (SVG: p99 and CPU per delivery against the
    /// offered rate, one series per server).
    #[arg(long)]
    pub(crate) svg: Option<PathBuf>,
}
