//! `loadgen compare`: reads the fanout ramp reports of chatbus, the peer and (optionally) the
//! floor, and their idle runs, and prints the figures the benchmark targets are stated in as
//! one markdown table: each server's value, chatbus / peer and chatbus / floor. CPU per
//! delivery is given whole and split into user and system time, with TCP data segments per
//! delivery beside it (and `write`/`writev` calls, which miss `send`/`sendmsg`). `--svg` also draws the three ramps on one chart (`compare_chart`).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::CompareArgs;
use crate::compare_chart;
use crate::report::{IdleOut, RunReport, StepOut};

fn load(path: &PathBuf) -> Result<RunReport, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("parse {}: {e}", path.display()))
}

fn load_opt(path: Option<&PathBuf>) -> Result<Option<RunReport>, String> {
    path.map(load).transpose()
}

/// The step at `rate`: a held attempt if there is one, and of those the least disturbed by
/// other processes.
pub(crate) fn step_at(r: &RunReport, rate: f64) -> Option<&StepOut> {
    r.steps
        .iter()
        .filter(|s| (s.rate_msgs - rate).abs() <= rate * 0.01)
        .min_by(|a, b| {
            b.held
                .cmp(&a.held)
                .then(a.other_cpu_pct.total_cmp(&b.other_cpu_pct))
        })
}

fn max_held(r: &RunReport) -> Option<&StepOut> {
    r.max_held.and_then(|i| r.steps.get(i))
}

fn idle_at(r: &RunReport, n: u32) -> Option<&IdleOut> {
    r.idle
        .iter()
        .find(|i| i.connections >= n * 99 / 100 && i.connections <= n)
}

fn num(v: Option<f64>, d: usize) -> String {
    v.map_or("n/a".to_owned(), |v| format!("{v:.d$}"))
}

fn ratio(c: Option<f64>, o: Option<f64>) -> String {
    match (c, o) {
        (Some(c), Some(o)) if o > 0.0 => format!("{:.3}", c / o),
        _ => "n/a".into(),
    }
}

/// The table being written, and the verdicts of the rows that have a target.
struct Table {
    text: String,
    verdicts: Vec<bool>,
}

/// One row's values: chatbus, peer, floor.
type Values = [Option<f64>; 3];

impl Table {
    fn row(&mut self, name: &str, v: Values, d: usize, target: &str, ok: Option<bool>) {
        self.row_with(name, v, d, target, ok, true);
    }

    /// `ratios`: false for a figure whose ratio would mislead (one that some servers' calls
    /// do not show up in).
    fn row_with(
        &mut self,
        name: &str,
        v: Values,
        d: usize,
        target: &str,
        ok: Option<bool>,
        ratios: bool,
    ) {
        let mark = match ok {
            Some(true) => " (met)",
            Some(false) => " (MISSED)",
            None => "",
        };
        let (to_peer, to_floor) = if ratios {
            (ratio(v[0], v[1]), ratio(v[0], v[2]))
        } else {
            ("—".to_owned(), "—".to_owned())
        };
        self.text.push_str(&format!(
            "| {name} | {} | {} | {} | {to_peer} | {to_floor} | {target}{mark} |\n",
            num(v[0], d),
            num(v[1], d),
            num(v[2], d),
        ));
        if let Some(ok) = ok {
            self.verdicts.push(ok);
        }
    }
}

/// `f` of each server's step (None where a report or its step is missing).
fn of(steps: [Option<&StepOut>; 3], f: impl Fn(&StepOut) -> Option<f64>) -> Values {
    steps.map(|s| s.and_then(&f))
}

pub(crate) fn compare(a: &CompareArgs) -> Result<ExitCode, String> {
    let cf = load(&a.chatbus_fanout)?;
    let pf = load(&a.peer_fanout)?;
    let ff = load_opt(a.floor_fanout.as_ref())?;
    let fixed = a
        .fixed_rate
        .or_else(|| cf.steps.first().map(|s| s.rate_msgs))
        .ok_or("the chatbus fanout report has no steps")?;
    let mut t = Table {
        text: format!(
            "chatbus vs peer vs floor — {} — {} CPUs ({}), kernel {}\n\n",
            cf.date, cf.machine.cpus, cf.machine.cpu_model, cf.machine.kernel
        ),
        verdicts: Vec::new(),
    };
    t.text.push_str(
        "| metric | chatbus | peer (Socket.IO) | floor | chatbus / peer | chatbus / floor | target |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let at = [
        step_at(&cf, fixed),
        step_at(&pf, fixed),
        ff.as_ref().and_then(|f| step_at(f, fixed)),
    ];
    let top = [max_held(&cf), max_held(&pf), ff.as_ref().and_then(max_held)];
    let target_dlv = at
        .iter()
        .flatten()
        .next()
        .map_or(0.0, |s| s.target_deliveries_per_s);
    let held = of(top, |s| Some(s.deliveries_per_s));
    let rate_ok = match (held[0], held[1]) {
        (Some(c), Some(p)) if p > 0.0 => Some(c / p >= 5.0),
        _ => None,
    };
    t.row(
        &format!(
            "max deliveries/s held (p99 ≤ {} ms, no loss)",
            cf.p99_limit_ms
        ),
        held,
        0,
        "≥ 5",
        rate_ok,
    );
    t.row(
        &format!("p99 latency ms at {fixed:.0} msg/s ({target_dlv:.0} deliveries/s)"),
        of(at, |s| Some(s.p99_ms)),
        2,
        "",
        None,
    );
    let cpu = of(at, |s| Some(s.server_cpu_us_per_delivery));
    let cpu_ok = match (cpu[0], cpu[1]) {
        (Some(c), Some(p)) if p > 0.0 => Some(c / p <= 0.1),
        _ => None,
    };
    t.row(
        &format!("server CPU µs per delivery at {fixed:.0} msg/s"),
        cpu,
        2,
        "≤ 0.1",
        cpu_ok,
    );
    t.row(
        "…user",
        of(at, |s| Some(s.server_user_us_per_delivery)),
        2,
        "",
        None,
    );
    t.row(
        "…system",
        of(at, |s| Some(s.server_sys_us_per_delivery)),
        2,
        "",
        None,
    );
    t.row(
        "…including the broker (redis-server)",
        of(at, |s| Some(s.total_cpu_us_per_delivery)),
        2,
        "",
        None,
    );
    t.row(
        &format!("TCP data segments per delivery at {fixed:.0} msg/s"),
        of(at, |s| s.server_segments_per_delivery),
        3,
        "",
        None,
    );
    t.row_with(
        &format!(
            "write/writev calls per delivery at {fixed:.0} msg/s (syscw; send/sendto/sendmsg not counted)"
        ),
        of(at, |s| s.server_writes_per_delivery),
        3,
        "",
        None,
        false,
    );
    t.row(
        "server CPU µs per delivery at each one's max held rate",
        of(top, |s| Some(s.server_cpu_us_per_delivery)),
        2,
        "",
        None,
    );
    t.row(
        "…user",
        of(top, |s| Some(s.server_user_us_per_delivery)),
        2,
        "",
        None,
    );
    t.row(
        "…system",
        of(top, |s| Some(s.server_sys_us_per_delivery)),
        2,
        "",
        None,
    );
    t.row(
        "TCP data segments per delivery at each one's max held rate",
        of(top, |s| s.server_segments_per_delivery),
        3,
        "",
        None,
    );
    let ci = load_opt(a.chatbus_idle.as_ref())?;
    let pi = load_opt(a.peer_idle.as_ref())?;
    let fi = load_opt(a.floor_idle.as_ref())?;
    if ci.is_some() || pi.is_some() || fi.is_some() {
        let kib = |r: &Option<RunReport>, n: u32| {
            r.as_ref()
                .and_then(|r| idle_at(r, n))
                .map(|i| i.rss_per_connection_bytes / 1024.0)
        };
        t.row(
            "RSS KiB per idle connection at 10,000",
            [kib(&ci, 10_000), kib(&pi, 10_000), kib(&fi, 10_000)],
            2,
            "",
            None,
        );
        if let Some(v) = kib(&ci, 19_000) {
            t.row(
                "RSS KiB per idle connection at 19,000 (chatbus)",
                [Some(v), None, None],
                2,
                "≤ 4 KiB",
                Some(v <= 4.0),
            );
        }
    }
    print!("{}", t.text);
    if let Some(path) = &a.out {
        std::fs::write(path, &t.text).map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    if let Some(path) = &a.svg {
        let mut series = vec![("chatbus", &cf), ("peer (Socket.IO)", &pf)];
        if let Some(f) = &ff {
            series.push(("floor", f));
        }
        std::fs::write(path, compare_chart::svg(&series, fixed))
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    let missed = t.verdicts.iter().filter(|v| !**v).count();
    println!(
        "targets: {} met, {missed} missed",
        t.verdicts.len() - missed
    );
    Ok(ExitCode::SUCCESS)
}
