//! One step's results: turns the engines' raw counts, the histograms and the CPU readings taken
//! around the step into its `StepOut` (rates, percentiles, CPU per delivery) and decides
//! whether the step held (no loss, no duplicates, no refusals, p99 within the limit).

use crate::plan::{new_hist, Plan, StepStats};
use crate::procstat::{Snapshot, Watched};
use crate::report::{ProcStep, StepOut};

/// What a step measured, as the controller gathered it.
pub(crate) struct StepInput {
    pub(crate) rate: f64,
    pub(crate) secs: f64,
    pub(crate) start_us: u64,
    pub(crate) epoch_us: u64,
    pub(crate) sent: u64,
    pub(crate) rejected: u64,
    pub(crate) unacked: u64,
    pub(crate) late_us: u64,
    pub(crate) expected: u64,
    pub(crate) stats: Vec<StepStats>,
    pub(crate) before: Snapshot,
    pub(crate) after: Snapshot,
    pub(crate) wall: f64,
    pub(crate) own_cpu_us: u64,
    /// TCP data segments the servers sent during the step (`segments`).
    pub(crate) segments: Option<u64>,
    pub(crate) machine_busy_us: u64,
}

/// The results of one step. `members` is ready members per room, per engine; a step holds
/// when nothing was lost, duplicated, refused, closed or lagged and p99 ≤ `p99_limit_ms`.
pub(crate) fn summarize(
    plan: &Plan,
    members: &[Vec<u32>],
    watched: &[Watched],
    p99_limit_ms: f64,
    i: StepInput,
) -> StepOut {
    let mut hist = new_hist(3);
    let mut s = StepOut {
        rate_msgs: i.rate,
        send_secs: i.secs,
        sent: i.sent,
        rejected: i.rejected,
        unacked: i.unacked,
        expected: i.expected,
        max_send_late_ms: i.late_us as f64 / 1000.0,
        ..StepOut::default()
    };
    // Offered deliveries per second: each room's senders times its members.
    let mut per_room = vec![0u64; plan.rooms as usize];
    for m in members {
        for (r, &v) in m.iter().enumerate() {
            per_room[r] += u64::from(v);
        }
    }
    let per_sender_rate = i.rate / f64::from(plan.senders.max(1));
    s.target_deliveries_per_s = (0..plan.rooms)
        .map(|r| f64::from(plan.senders_in_room(r)) * per_room[r as usize] as f64)
        .sum::<f64>()
        * per_sender_rate;
    let mut last_us = 0;
    for st in &i.stats {
        let StepStats {
            unique,
            dups,
            reordered,
            foreign,
            lagged,
            closed,
            errors,
            last_us: l,
            latency,
            ..
        } = st;
        s.delivered += unique;
        s.dups += dups;
        s.reordered += reordered;
        s.foreign += foreign;
        s.lagged += lagged;
        s.closed += closed;
        for (k, v) in errors {
            *s.errors.entry(k.clone()).or_default() += v;
        }
        last_us = last_us.max(*l);
        latency.add_to(&mut hist);
    }
    s.lost = i.expected.saturating_sub(s.delivered);
    let window = last_us.saturating_sub(i.start_us) as f64 / 1e6;
    s.deliveries_per_s = if window > 0.0 {
        s.delivered as f64 / window.max(i.secs)
    } else {
        0.0
    };
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    if !hist.is_empty() {
        s.p50_ms = ms(0.5);
        s.p99_ms = ms(0.99);
        s.p999_ms = ms(0.999);
        s.max_ms = hist.max() as f64 / 1000.0;
    }
    s.server_cpu_us = i.after.cpu_since(&i.before, watched, "server");
    s.server_sys_us = i.after.sys_since(&i.before, watched, "server");
    s.broker_cpu_us = i.after.cpu_since(&i.before, watched, "broker");
    s.per_server = i
        .after
        .usage_since(&i.before)
        .into_iter()
        .zip(watched)
        .filter(|(_, w)| w.role == "server")
        .map(|(u, w)| ProcStep {
            pid: w.pid,
            user_us: u.user_us,
            sys_us: u.sys_us,
            writes: u.writes,
        })
        .collect();
    s.server_segments = i.segments;
    // Counted only if every server's could be read: a partial sum would look like batching.
    s.server_writes = s
        .per_server
        .iter()
        .map(|p| p.writes)
        .sum::<Option<u64>>()
        .filter(|_| !s.per_server.is_empty());
    if s.delivered > 0 {
        let d = s.delivered as f64;
        s.server_cpu_us_per_delivery = s.server_cpu_us as f64 / d;
        s.total_cpu_us_per_delivery = (s.server_cpu_us + s.broker_cpu_us) as f64 / d;
        s.server_sys_us_per_delivery = s.server_sys_us as f64 / d;
        s.server_user_us_per_delivery = s.server_cpu_us.saturating_sub(s.server_sys_us) as f64 / d;
        s.server_writes_per_delivery = s.server_writes.map(|w| w as f64 / d);
        s.server_segments_per_delivery = i.segments.map(|n| n as f64 / d);
    }
    let wall_us = i.wall * 1e6;
    if wall_us > 0.0 {
        s.server_cpu_pct = s.server_cpu_us as f64 / wall_us * 100.0;
        s.broker_cpu_pct = s.broker_cpu_us as f64 / wall_us * 100.0;
        s.loadgen_cpu_pct = i.own_cpu_us as f64 / wall_us * 100.0;
        let ours = s.server_cpu_us + s.broker_cpu_us + i.own_cpu_us;
        s.other_cpu_pct = i.machine_busy_us.saturating_sub(ours) as f64 / wall_us * 100.0;
    }
    s.server_rss_bytes = i.after.rss(watched, "server");
    s.t_start = i.start_us.saturating_sub(i.epoch_us) as f64 / 1e6;
    s.t_end = last_us.max(i.start_us).saturating_sub(i.epoch_us) as f64 / 1e6;
    let mut why = Vec::new();
    if s.lost > 0 {
        why.push(format!("{} lost", s.lost));
    }
    if s.dups > 0 {
        why.push(format!("{} duplicated", s.dups));
    }
    if s.rejected > 0 {
        why.push(format!("{} rejected", s.rejected));
    }
    if s.closed > 0 {
        why.push(format!("{} connections closed", s.closed));
    }
    if s.lagged > 0 {
        why.push(format!("{} lagged", s.lagged));
    }
    if s.p99_ms > p99_limit_ms {
        why.push(format!("p99 {:.1} ms > {} ms", s.p99_ms, p99_limit_ms));
    }
    if s.delivered == 0 && s.expected > 0 {
        why.push("nothing delivered".into());
    }
    s.held = why.is_empty();
    s.why_not = why.join(", ");
    s
}
