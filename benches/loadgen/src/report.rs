//! The results of a run: the JSON document, the human table and the SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The whole run, as written to `NAME.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct RunReport {
    pub(crate) tool: String,
    pub(crate) name: String,
    pub(crate) label: String,
    /// UTC, `YYYY-MM-DD HH:MM:SS`.
    pub(crate) date: String,
    pub(crate) machine: Machine,
    pub(crate) protocol: String,
    pub(crate) urls: Vec<String>,
    pub(crate) clients: u32,
    pub(crate) rooms: u32,
    pub(crate) senders: u32,
    pub(crate) size: usize,
    pub(crate) procs: u32,
    pub(crate) watched: Vec<WatchedOut>,
    pub(crate) connect: ConnectOut,
    pub(crate) idle: Vec<IdleOut>,
    pub(crate) steps: Vec<StepOut>,
    /// Index into `steps` of the highest rate that held (ramp runs).
    pub(crate) max_held: Option<usize>,
    pub(crate) p99_limit_ms: f64,
    pub(crate) series: Vec<Point>,
    pub(crate) bucket_ms: u64,
    /// Lost + duplicated over all steps; connect failures.
    pub(crate) lost_total: u64,
    pub(crate) dups_total: u64,
    pub(crate) wall_secs: f64,
}

/// Where the run happened.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) cpu_model: String,
    pub(crate) kernel: String,
    pub(crate) mem_total_mib: u64,
}

impl Machine {
    pub(crate) fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let mem_total_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kb| kb / 1024);
        Self {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            kernel,
            mem_total_mib,
        }
    }
}

/// A watched process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct WatchedOut {
    pub(crate) pid: u32,
    pub(crate) role: String,
    pub(crate) name: String,
}

/// The connect phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ConnectOut {
    pub(crate) ready: u32,
    pub(crate) failed: u32,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) secs: f64,
}

/// One idle checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct IdleOut {
    pub(crate) connections: u32,
    pub(crate) server_rss_bytes: u64,
    pub(crate) baseline_rss_bytes: u64,
    pub(crate) rss_per_connection_bytes: f64,
}

/// One load step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct StepOut {
    /// Messages per second sent, over all senders.
    pub(crate) rate_msgs: f64,
    pub(crate) target_deliveries_per_s: f64,
    pub(crate) send_secs: f64,
    pub(crate) sent: u64,
    pub(crate) rejected: u64,
    pub(crate) unacked: u64,
    pub(crate) expected: u64,
    pub(crate) delivered: u64,
    pub(crate) lost: u64,
    pub(crate) dups: u64,
    pub(crate) reordered: u64,
    pub(crate) foreign: u64,
    pub(crate) lagged: u64,
    pub(crate) closed: u64,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) deliveries_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) server_cpu_us: u64,
    /// The system (kernel) part of `server_cpu_us` (the rest is user time).
    #[serde(default)]
    pub(crate) server_sys_us: u64,
    pub(crate) broker_cpu_us: u64,
    /// Server processes' CPU per unique delivery.
    pub(crate) server_cpu_us_per_delivery: f64,
    /// Servers + brokers per unique delivery.
    pub(crate) total_cpu_us_per_delivery: f64,
    /// The user part of `server_cpu_us_per_delivery`: what the server programs add.
    #[serde(default)]
    pub(crate) server_user_us_per_delivery: f64,
    /// The system part: mostly the kernel's per-packet work, which every server pays.
    #[serde(default)]
    pub(crate) server_sys_us_per_delivery: f64,
    /// `write`/`writev` system calls of the server processes (`syscw` of `/proc/PID/io`; it
    /// does not count `send`, `sendto` or `sendmsg`, so it reads near zero for servers that
    /// write sockets with `send`, as Rust's standard library does); `None` where
    /// `/proc/PID/io` could not be read.
    #[serde(default)]
    pub(crate) server_writes: Option<u64>,
    /// `server_writes` per unique delivery (below 1: several frames per system call).
    #[serde(default)]
    pub(crate) server_writes_per_delivery: Option<f64>,
    /// TCP data segments the servers sent to their clients (`tcpi_data_segs_out`, see
    /// `segments`); `None` where `ss` could not be run.
    #[serde(default)]
    pub(crate) server_segments: Option<u64>,
    /// `server_segments` per unique delivery (below 1: several frames per segment).
    #[serde(default)]
    pub(crate) server_segments_per_delivery: Option<f64>,
    /// The same per server process, in `watched` order.
    #[serde(default)]
    pub(crate) per_server: Vec<ProcStep>,
    /// Server CPU as a share of one core over the step (100 = one core).
    pub(crate) server_cpu_pct: f64,
    pub(crate) broker_cpu_pct: f64,
    pub(crate) loadgen_cpu_pct: f64,
    /// CPU used on the machine by everything else (other processes, unattributed kernel
    /// work), share of one core: the noise of a shared machine.
    pub(crate) other_cpu_pct: f64,
    pub(crate) server_rss_bytes: u64,
    /// How far the generator fell behind its send schedule at worst.
    pub(crate) max_send_late_ms: f64,
    pub(crate) held: bool,
    pub(crate) why_not: String,
    /// Seconds since the run's epoch when the step started (for the chart).
    pub(crate) t_start: f64,
    pub(crate) t_end: f64,
}

/// What one server process used during a step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ProcStep {
    pub(crate) pid: u32,
    pub(crate) user_us: u64,
    pub(crate) sys_us: u64,
    pub(crate) writes: Option<u64>,
}

/// One bucket of the time series.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Point {
    pub(crate) t: f64,
    pub(crate) deliveries_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a Unix time.
pub(crate) fn utc(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn kib(bytes: f64) -> String {
    format!("{:.2} KiB", bytes / 1024.0)
}

/// The human summary.
pub(crate) fn table(r: &RunReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "== {} ({}) {} | {} clients, {} rooms, {} senders, {} B bodies, {} | {} CPUs {}",
        r.name,
        r.label,
        r.date,
        r.clients,
        r.rooms,
        r.senders,
        r.size,
        r.protocol,
        r.machine.cpus,
        r.machine.cpu_model
    );
    let _ = writeln!(
        o,
        "connect: {} ready, {} failed in {:.1} s {:?}",
        r.connect.ready, r.connect.failed, r.connect.secs, r.connect.errors
    );
    for i in &r.idle {
        let _ = writeln!(
            o,
            "idle: {:>6} connections  server RSS {:>9} (baseline {})  => {} per connection",
            i.connections,
            kib(i.server_rss_bytes as f64),
            kib(i.baseline_rss_bytes as f64),
            kib(i.rss_per_connection_bytes)
        );
    }
    if !r.steps.is_empty() {
        let _ = writeln!(
            o,
            "{:>8} {:>10} {:>10} {:>9} {:>6} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6}  held",
            "msg/s", "target/s", "dlv/s", "delivered", "lost", "dup", "p50 ms", "p99 ms",
            "p99.9", "max ms", "srv µs/d", "usr µs/d", "sys µs/d", "+brk µs/d", "seg/d", "srv%",
            "brk%", "lg%", "oth%"
        );
    }
    for s in &r.steps {
        let _ = writeln!(
            o,
            "{:>8.1} {:>10.0} {:>10.0} {:>9} {:>6} {:>5} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>6} {:>6.0} {:>6.0} {:>6.0} {:>6.0}  {}",
            s.rate_msgs,
            s.target_deliveries_per_s,
            s.deliveries_per_s,
            s.delivered,
            s.lost,
            s.dups,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.max_ms,
            s.server_cpu_us_per_delivery,
            s.server_user_us_per_delivery,
            s.server_sys_us_per_delivery,
            s.total_cpu_us_per_delivery,
            s.server_segments_per_delivery
                .map_or("n/a".to_owned(), |w| format!("{w:.3}")),
            s.server_cpu_pct,
            s.broker_cpu_pct,
            s.loadgen_cpu_pct,
            s.other_cpu_pct,
            if s.held { "yes".to_owned() } else { format!("no: {}", s.why_not) }
        );
    }
    if let Some(s) = r.max_held.and_then(|i| r.steps.get(i)) {
        let _ = writeln!(
            o,
            "max held: {:.0} deliveries/s ({:.1} msg/s), p99 {:.2} ms, server {:.2} µs CPU/delivery",
            s.deliveries_per_s, s.rate_msgs, s.p99_ms, s.server_cpu_us_per_delivery
        );
    }
    let _ = writeln!(o, "lost {} dup {} total", r.lost_total, r.dups_total);
    o
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" axis maximum at or above `v`.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * p {
            return m * p;
        }
    }
    10.0 * p
}

pub(crate) fn fmt_si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// The chart: delivery rate (with the step targets) over latency percentiles, on one time axis.
pub(crate) fn svg(r: &RunReport) -> String {
    let (w, h) = (960.0, 640.0);
    let (left, right) = (80.0, 30.0);
    let top1 = 78.0;
    let h1 = 220.0;
    let top2 = top1 + h1 + 60.0;
    let h2 = 220.0;
    let pw = w - left - right;
    let t_max = r
        .series
        .iter()
        .map(|p| p.t)
        .chain(r.steps.iter().map(|s| s.t_end))
        .fold(1.0f64, f64::max);
    let x = |t: f64| left + pw * t / t_max;
    let rate_max = nice_max(
        r.series
            .iter()
            .map(|p| p.deliveries_per_s)
            .chain(r.steps.iter().map(|s| s.target_deliveries_per_s))
            .fold(0.0, f64::max),
    );
    let y1 = |v: f64| top1 + h1 - h1 * (v / rate_max).min(1.0);
    // Latency on a log scale from 0.1 ms to the next power of ten above the worst p99.9.
    let lat_hi = r
        .series
        .iter()
        .map(|p| p.p999_ms)
        .fold(1.0f64, f64::max)
        .log10()
        .ceil()
        .max(0.0);
    let lat_lo = -1.0f64;
    let y2 = |ms: f64| {
        let l = ms.max(0.1).log10();
        top2 + h2 - h2 * ((l - lat_lo) / (lat_hi - lat_lo)).clamp(0.0, 1.0)
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="24" font-size="15" font-weight="bold">{} — {}</text>"#,
        esc(&r.name),
        esc(&r.label)
    );
    let _ = writeln!(
        o,
        r##"<text x="{left}" y="42" fill="#555">{} clients, {} rooms, {} senders, {} B, {} · {} · {} CPUs</text>"##,
        r.clients,
        r.rooms,
        r.senders,
        r.size,
        esc(&r.protocol),
        esc(&r.date),
        r.machine.cpus
    );
    // Panel frames and grids.
    for (top, hh) in [(top1, h1), (top2, h2)] {
        let _ = writeln!(
            o,
            r##"<rect x="{left}" y="{top}" width="{pw}" height="{hh}" fill="none" stroke="#999"/>"##
        );
    }
    for i in 0..=4 {
        let v = rate_max * f64::from(i) / 4.0;
        let yy = y1(v);
        let _ = writeln!(
            o,
            r##"<line x1="{left}" x2="{}" y1="{yy}" y2="{yy}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            yy + 4.0,
            fmt_si(v)
        );
    }
    let mut e = lat_lo as i32;
    while f64::from(e) <= lat_hi {
        let ms = 10f64.powi(e);
        let yy = y2(ms);
        let label = if ms < 1.0 {
            format!("{ms}")
        } else {
            format!("{ms:.0}")
        };
        let _ = writeln!(
            o,
            r##"<line x1="{left}" x2="{}" y1="{yy}" y2="{yy}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{label} ms</text>"##,
            left + pw,
            left - 6.0,
            yy + 4.0
        );
        e += 1;
    }
    let ticks = nice_max(t_max / 8.0);
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let xx = x(t);
        for (top, hh) in [(top1, h1), (top2, h2)] {
            let _ = writeln!(
                o,
                r##"<line x1="{xx}" x2="{xx}" y1="{top}" y2="{}" stroke="#eee"/><text x="{xx}" y="{}" text-anchor="middle">{t:.0}s</text>"##,
                top + hh,
                top + hh + 16.0
            );
        }
        t += ticks;
    }
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="{}" font-weight="bold">deliveries per second (line: measured; dashed: offered)</text>"#,
        top1 - 6.0
    );
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="{}" font-weight="bold">end-to-end latency, log scale (p50 green, p99 orange, p99.9 red)</text>"#,
        top2 - 6.0
    );
    // Offered rate per step.
    for s in &r.steps {
        let yy = y1(s.target_deliveries_per_s);
        let colour = if s.held { "#888" } else { "#c00" };
        let _ = writeln!(
            o,
            r#"<line x1="{}" x2="{}" y1="{yy}" y2="{yy}" stroke="{colour}" stroke-dasharray="4 3"/>"#,
            x(s.t_start),
            x(s.t_end)
        );
    }
    // Limit line on the latency panel.
    if r.p99_limit_ms > 0.0 {
        let yy = y2(r.p99_limit_ms);
        let _ = writeln!(
            o,
            r##"<line x1="{left}" x2="{}" y1="{yy}" y2="{yy}" stroke="#c00" stroke-dasharray="2 4"/><text x="{}" y="{}" fill="#c00" text-anchor="end">p99 limit {} ms</text>"##,
            left + pw,
            left + pw - 4.0,
            yy - 4.0,
            r.p99_limit_ms
        );
    }
    let poly = |f: &dyn Fn(&Point) -> (f64, f64)| -> String {
        r.series
            .iter()
            .map(|p| {
                let (a, b) = f(p);
                format!("{a:.1},{b:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let bw = r.bucket_ms as f64 / 1000.0 / 2.0;
    let _ = writeln!(
        o,
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##,
        poly(&|p| (x(p.t + bw), y1(p.deliveries_per_s)))
    );
    for (colour, f) in [
        ("#2ca02c", (|p: &Point| p.p50_ms) as fn(&Point) -> f64),
        ("#ff7f0e", |p: &Point| p.p99_ms),
        ("#d62728", |p: &Point| p.p999_ms),
    ] {
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.2" points="{}"/>"#,
            poly(&|p| (x(p.t + bw), y2(f(p))))
        );
    }
    let _ = writeln!(
        o,
        r##"<text x="{left}" y="{}" fill="#555">time since the first step (s). Written by benches/loadgen.</text>"##,
        h - 8.0
    );
    o.push_str("</svg>\n");
    o
}

/// Writes `NAME.json` and `NAME.svg` under `dir`; returns their paths.
pub(crate) fn write(r: &RunReport, dir: &Path) -> Result<(String, String), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let json = dir.join(format!("{}.json", r.name));
    let svg_path = dir.join(format!("{}.svg", r.name));
    let text = serde_json::to_string_pretty(r).map_err(|e| format!("serialise report: {e}"))?;
    std::fs::write(&json, text).map_err(|e| format!("write {}: {e}", json.display()))?;
    std::fs::write(&svg_path, svg(r)).map_err(|e| format!("write {}: {e}", svg_path.display()))?;
    Ok((json.display().to_string(), svg_path.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_767_225_599), "2025-12-31 23:59:59");
    }

    #[test]
    fn svg_is_well_formed_enough() {
        let mut r = RunReport {
            name: "x<y".into(),
            bucket_ms: 250,
            p99_limit_ms: 50.0,
            ..RunReport::default()
        };
        r.series.push(Point {
            t: 0.0,
            deliveries_per_s: 1000.0,
            p50_ms: 0.5,
            p99_ms: 2.0,
            p999_ms: 9.0,
        });
        r.steps.push(StepOut {
            target_deliveries_per_s: 1000.0,
            t_end: 3.0,
            held: true,
            ..StepOut::default()
        });
        let s = svg(&r);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(s.contains("x&lt;y"));
        assert!(!s.contains("NaN"));
    }
}
