//! The comparison chart of `loadgen compare --svg`: the fanout ramps of chatbus, the peer and
//! the floor on one offered-rate axis (log scale), in three panels: p99 latency, server CPU
//! per delivery (user solid, system dashed) and TCP data segments per delivery. One point
//! per rate tried (its best attempt, as in the table); a hollow point did not hold.

use std::fmt::Write as _;

use crate::compare::step_at;
use crate::report::{esc, fmt_si, RunReport, StepOut};

const COLOURS: [&str; 3] = ["#1f77b4", "#ff7f0e", "#2ca02c"];

/// Each rate of a ramp once, with its best attempt, in rising order.
fn points(r: &RunReport) -> Vec<&StepOut> {
    let mut rates: Vec<f64> = r.steps.iter().map(|s| s.rate_msgs).collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup_by(|a, b| (*a - *b).abs() <= *b * 0.01);
    rates.into_iter().filter_map(|x| step_at(r, x)).collect()
}

/// A log10 axis from 10^lo to 10^hi onto [a, b] (a: the low end's pixel).
#[derive(Clone, Copy)]
struct LogAxis {
    lo: f64,
    hi: f64,
    a: f64,
    b: f64,
}

impl LogAxis {
    fn new(min: f64, max: f64, a: f64, b: f64) -> Self {
        let lo = min.max(1e-3).log10().floor();
        let hi = max.max(min * 10.0).max(1e-3).log10().ceil().max(lo + 1.0);
        Self { lo, hi, a, b }
    }

    fn at(&self, v: f64) -> f64 {
        let l = v.max(10f64.powf(self.lo)).log10();
        self.a + (self.b - self.a) * ((l - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)
    }

    fn decades(&self) -> impl Iterator<Item = f64> {
        (self.lo as i32..=self.hi as i32).map(|e| 10f64.powi(e))
    }
}

fn label(v: f64) -> String {
    if v < 1.0 {
        format!("{v}")
    } else {
        fmt_si(v)
    }
}

/// The SVG for `series` (label, fanout report); `fixed` is the rate the table compares at.
pub(crate) fn svg(series: &[(&str, &RunReport)], fixed: f64) -> String {
    let (w, h) = (960.0, 820.0);
    let (left, right) = (80.0, 170.0);
    let pw = w - left - right;
    let panels = [(80.0, 200.0), (340.0, 220.0), (620.0, 140.0)];
    let pts: Vec<Vec<&StepOut>> = series.iter().map(|(_, r)| points(r)).collect();
    let all = || pts.iter().flatten();
    let fold = |f: &dyn Fn(&StepOut) -> f64, init: f64, pick: fn(f64, f64) -> f64| {
        all().map(|s| f(s)).filter(|v| *v > 0.0).fold(init, pick)
    };
    let x = LogAxis::new(
        fold(&|s| s.target_deliveries_per_s, f64::MAX, f64::min),
        fold(&|s| s.target_deliveries_per_s, 0.0, f64::max),
        left,
        left + pw,
    );
    let (t1, h1) = panels[0];
    let lat = LogAxis::new(
        fold(&|s| s.p99_ms, f64::MAX, f64::min).min(1.0),
        fold(&|s| s.p99_ms, 0.0, f64::max),
        t1 + h1,
        t1,
    );
    let (t2, h2) = panels[1];
    let cpu = LogAxis::new(
        fold(&|s| s.server_sys_us_per_delivery, f64::MAX, f64::min).min(fold(
            &|s| s.server_user_us_per_delivery,
            f64::MAX,
            f64::min,
        )),
        fold(&|s| s.server_cpu_us_per_delivery, 0.0, f64::max),
        t2 + h2,
        t2,
    );
    let (t3, h3) = panels[2];
    let wmax = all()
        .filter_map(|s| s.server_segments_per_delivery)
        .fold(0.0f64, f64::max)
        .max(0.1);
    let wmax = (wmax * 1.1 * 10.0).ceil() / 10.0;
    let wy = |v: f64| t3 + h3 - h3 * (v / wmax).clamp(0.0, 1.0);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let first = series.first().map(|(_, r)| *r);
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="24" font-size="15" font-weight="bold">fanout: {} in one run</text>"#,
        esc(&series
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", "))
    );
    if let Some(r) = first {
        let _ = writeln!(
            o,
            r##"<text x="{left}" y="42" fill="#555">{} clients, {} room, {} senders, {} B · {} · {} CPUs {} · table compares at {fixed} msg/s</text>"##,
            r.clients,
            r.rooms,
            r.senders,
            r.size,
            esc(&r.date),
            r.machine.cpus,
            esc(&r.machine.cpu_model)
        );
    }
    for (top, hh) in panels {
        let _ = writeln!(
            o,
            r##"<rect x="{left}" y="{top}" width="{pw}" height="{hh}" fill="none" stroke="#999"/>"##
        );
        for v in x.decades() {
            let xx = x.at(v);
            let _ = writeln!(
                o,
                r##"<line x1="{xx}" x2="{xx}" y1="{top}" y2="{}" stroke="#eee"/><text x="{xx}" y="{}" text-anchor="middle">{}</text>"##,
                top + hh,
                top + hh + 16.0,
                fmt_si(v)
            );
        }
    }
    for (axis, unit) in [(lat, " ms"), (cpu, " µs")] {
        for v in axis.decades() {
            let yy = axis.at(v);
            let _ = writeln!(
                o,
                r##"<line x1="{left}" x2="{}" y1="{yy}" y2="{yy}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{}{unit}</text>"##,
                left + pw,
                left - 6.0,
                yy + 4.0,
                label(v)
            );
        }
    }
    for i in 0..=4 {
        let v = wmax * f64::from(i) / 4.0;
        let yy = wy(v);
        let _ = writeln!(
            o,
            r##"<line x1="{left}" x2="{}" y1="{yy}" y2="{yy}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{v:.2}</text>"##,
            left + pw,
            left - 6.0,
            yy + 4.0
        );
    }
    for (top, title) in [
        (t1, "p99 latency, log scale (hollow: the step did not hold)"),
        (
            t2,
            "server CPU µs per delivery, log scale (solid: user, dashed: system)",
        ),
        (
            t3,
            "TCP data segments per delivery (tcpi_data_segs_out of the servers' client sockets)",
        ),
    ] {
        let _ = writeln!(
            o,
            r#"<text x="{left}" y="{}" font-weight="bold">{title}</text>"#,
            top - 6.0
        );
    }
    if let Some(r) = first.filter(|r| r.p99_limit_ms > 0.0) {
        let yy = lat.at(r.p99_limit_ms);
        let _ = writeln!(
            o,
            r##"<line x1="{left}" x2="{}" y1="{yy}" y2="{yy}" stroke="#c00" stroke-dasharray="2 4"/><text x="{}" y="{}" fill="#c00">p99 limit</text>"##,
            left + pw,
            left + pw + 4.0,
            yy + 4.0
        );
    }
    for (i, ((name, _), steps)) in series.iter().zip(&pts).enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let line = |o: &mut String, y: &dyn Fn(&StepOut) -> Option<f64>, dash: &str| {
            let p: Vec<String> = steps
                .iter()
                .filter_map(|s| {
                    y(s).map(|yy| format!("{:.1},{yy:.1}", x.at(s.target_deliveries_per_s)))
                })
                .collect();
            let _ = writeln!(
                o,
                r#"<polyline fill="none" stroke="{c}" stroke-width="1.6"{dash} points="{}"/>"#,
                p.join(" ")
            );
            for s in steps.iter() {
                if let Some(yy) = y(s) {
                    let fill = if s.held { c } else { "white" };
                    let _ = writeln!(
                        o,
                        r#"<circle cx="{:.1}" cy="{yy:.1}" r="3" fill="{fill}" stroke="{c}"/>"#,
                        x.at(s.target_deliveries_per_s)
                    );
                }
            }
        };
        line(&mut o, &|s| (s.p99_ms > 0.0).then(|| lat.at(s.p99_ms)), "");
        line(
            &mut o,
            &|s| (s.delivered > 0).then(|| cpu.at(s.server_user_us_per_delivery)),
            "",
        );
        line(
            &mut o,
            &|s| (s.delivered > 0).then(|| cpu.at(s.server_sys_us_per_delivery)),
            r#" stroke-dasharray="5 3""#,
        );
        line(&mut o, &|s| s.server_segments_per_delivery.map(wy), "");
        let ly = 90.0 + 20.0 * i as f64;
        let _ = writeln!(
            o,
            r#"<rect x="{}" y="{}" width="14" height="4" fill="{c}"/><text x="{}" y="{ly}">{}</text>"#,
            left + pw + 14.0,
            ly - 6.0,
            left + pw + 34.0,
            esc(name)
        );
    }
    let _ = writeln!(
        o,
        r##"<text x="{left}" y="{}" fill="#555">offered deliveries per second (log scale). Written by benches/loadgen (loadgen compare --svg).</text>"##,
        h - 8.0
    );
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(rates: &[f64]) -> RunReport {
        let mut r = RunReport {
            p99_limit_ms: 50.0,
            ..RunReport::default()
        };
        for (i, &m) in rates.iter().enumerate() {
            r.steps.push(StepOut {
                rate_msgs: m,
                target_deliveries_per_s: m * 1000.0,
                delivered: 1,
                p99_ms: 5.0 + i as f64,
                server_cpu_us_per_delivery: 2.0,
                server_user_us_per_delivery: 0.5,
                server_sys_us_per_delivery: 1.5,
                server_segments_per_delivery: Some(0.5),
                held: i + 1 < rates.len(),
                ..StepOut::default()
            });
        }
        r
    }

    #[test]
    fn chart_has_every_series() {
        let (a, b) = (ramp(&[30.0, 100.0, 100.0, 300.0]), ramp(&[30.0]));
        let s = svg(&[("chatbus", &a), ("peer <x>", &b)], 30.0);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(s.contains("peer &lt;x&gt;"));
        assert!(!s.contains("NaN") && !s.contains("inf"));
        // One point per rate (100 twice counts once), in four series lines of each server.
        assert_eq!(s.matches("<circle").count(), 4 * 3 + 4);
        assert_eq!(points(&a).len(), 3);
    }
}
