//! `loadgen compare`: reads a chatbus and a peer report (fanout ramp, optionally idle runs) and
//! prints the ratios the benchmark targets are stated in, as a markdown table.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::CompareArgs;
use crate::report::{IdleOut, RunReport, StepOut};

fn load(path: &PathBuf) -> Result<RunReport, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("parse {}: {e}", path.display()))
}

/// The step at `rate`: a held attempt if there is one, and of those the least disturbed by
/// other processes.
fn step_at(r: &RunReport, rate: f64) -> Option<&StepOut> {
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

pub(crate) fn compare(a: &CompareArgs) -> Result<ExitCode, String> {
    let cf = load(&a.chatbus_fanout)?;
    let pf = load(&a.peer_fanout)?;
    let fixed = a
        .fixed_rate
        .or_else(|| cf.steps.first().map(|s| s.rate_msgs))
        .ok_or("the chatbus fanout report has no steps")?;
    let mut o = String::new();
    let ratio = |c: f64, p: f64| {
        if p > 0.0 {
            format!("{:.3}", c / p)
        } else {
            "n/a".into()
        }
    };
    let f = |v: Option<f64>, d: usize| v.map_or("n/a".to_owned(), |v| format!("{v:.d$}"));
    o.push_str(&format!(
        "chatbus vs peer — {} — {} CPUs ({}), kernel {}\n\n",
        cf.date, cf.machine.cpus, cf.machine.cpu_model, cf.machine.kernel
    ));
    o.push_str("| metric | chatbus | peer (Socket.IO) | chatbus / peer | target |\n|---|---|---|---|---|\n");
    let (cs, ps) = (step_at(&cf, fixed), step_at(&pf, fixed));
    let cpu = |s: Option<&StepOut>| s.map(|s| s.server_cpu_us_per_delivery);
    let tot = |s: Option<&StepOut>| s.map(|s| s.total_cpu_us_per_delivery);
    let p99 = |s: Option<&StepOut>| s.map(|s| s.p99_ms);
    let target_dlv = cs.or(ps).map_or(0.0, |s| s.target_deliveries_per_s);
    let mut verdicts = Vec::new();
    let mut row =
        |name: String, c: Option<f64>, p: Option<f64>, d: usize, target: &str, ok: Option<bool>| {
            let r = match (c, p) {
                (Some(c), Some(p)) => ratio(c, p),
                _ => "n/a".into(),
            };
            let mark = match ok {
                Some(true) => " (met)",
                Some(false) => " (MISSED)",
                None => "",
            };
            o.push_str(&format!(
                "| {name} | {} | {} | {r} | {target}{mark} |\n",
                f(c, d),
                f(p, d)
            ));
            if let Some(ok) = ok {
                verdicts.push(ok);
            }
        };
    let cpu_ok = match (cpu(cs), cpu(ps)) {
        (Some(c), Some(p)) if p > 0.0 => Some(c / p <= 0.1),
        _ => None,
    };
    row(
        format!("server CPU µs per delivery at {fixed:.0} msg/s ({target_dlv:.0} deliveries/s)"),
        cpu(cs),
        cpu(ps),
        2,
        "≤ 0.1",
        cpu_ok,
    );
    row(
        "…including the broker (redis-server)".into(),
        tot(cs),
        tot(ps),
        2,
        "",
        None,
    );
    let (cm, pm) = (max_held(&cf), max_held(&pf));
    let rate_ok = match (cm, pm) {
        (Some(c), Some(p)) if p.deliveries_per_s > 0.0 => {
            Some(c.deliveries_per_s / p.deliveries_per_s >= 5.0)
        }
        _ => None,
    };
    row(
        format!(
            "max deliveries/s held (p99 ≤ {} ms, no loss)",
            cf.p99_limit_ms
        ),
        cm.map(|s| s.deliveries_per_s),
        pm.map(|s| s.deliveries_per_s),
        0,
        "≥ 5",
        rate_ok,
    );
    row(
        "server CPU µs per delivery at each one's max held rate".into(),
        cm.map(|s| s.server_cpu_us_per_delivery),
        pm.map(|s| s.server_cpu_us_per_delivery),
        2,
        "",
        None,
    );
    row(
        format!("p99 latency ms at {fixed:.0} msg/s"),
        p99(cs),
        p99(ps),
        2,
        "",
        None,
    );
    if let (Some(ci), Some(pi)) = (&a.chatbus_idle, &a.peer_idle) {
        let (ci, pi) = (load(ci)?, load(pi)?);
        let kib = |i: Option<&IdleOut>| i.map(|i| i.rss_per_connection_bytes / 1024.0);
        row(
            "RSS KiB per idle connection at 10,000".into(),
            kib(idle_at(&ci, 10_000)),
            kib(idle_at(&pi, 10_000)),
            2,
            "",
            None,
        );
        if let Some(c19) = idle_at(&ci, 19_000) {
            let v = c19.rss_per_connection_bytes / 1024.0;
            row(
                "RSS KiB per idle connection at 19,000 (chatbus)".into(),
                Some(v),
                None,
                2,
                "≤ 4 KiB",
                Some(v <= 4.0),
            );
        }
    }
    print!("{o}");
    if let Some(path) = &a.out {
        std::fs::write(path, &o).map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    let missed = verdicts.iter().filter(|v| !**v).count();
    println!("targets: {} met, {missed} missed", verdicts.len() - missed);
    Ok(ExitCode::SUCCESS)
}
