//! One `loadgen run`: builds the plan from the arguments, starts the engines, connects the
//! clients (with idle RSS checkpoints), runs the fixed-rate step or the ramp, and writes the
//! report (`--assert-clean` turns loss into a failing exit status).

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cli::RunArgs;
use crate::controller::Controller;
use crate::engine::unix_us;
use crate::link::start_engines;
use crate::net::target;
use crate::plan::Plan;
use crate::procstat::{self, Watched};
use crate::report::{self, ConnectOut, IdleOut, Machine, RunReport, WatchedOut};

fn default_out() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        // The crate sits at benches/loadgen: the workspace's target/ is two levels up.
        .unwrap_or_else(|| {
            let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
            here.ancestors().nth(2).unwrap_or(here).join("target")
        })
        .join("loadgen")
}

pub(crate) fn run(args: RunArgs) -> Result<ExitCode, String> {
    let started = Instant::now();
    let targets = args
        .urls
        .iter()
        .map(|u| target(u, args.protocol))
        .collect::<Result<Vec<_>, _>>()?;
    if args.procs == 0 || args.procs > 64 {
        return Err("--procs must be 1..=64".into());
    }
    if args.ramp && (args.ramp_factor.is_nan() || args.ramp_factor <= 1.0) {
        return Err("--ramp-factor must be above 1".into());
    }
    let sources = if args.sources > 1 {
        (1..=args.sources)
            .map(|i| Ipv4Addr::new(127, 0, 0, i))
            .collect()
    } else {
        Vec::new()
    };
    let mut seed = [0u8; 8];
    // Any varying number will do for the run id; the clock's nanoseconds and our pid suffice.
    seed.copy_from_slice(&(unix_us() ^ (u64::from(std::process::id()) << 40)).to_le_bytes());
    let plan = Plan {
        protocol: args.protocol,
        targets,
        clients: args.clients,
        rooms: args.rooms,
        room_spread: args.room_spread,
        senders: args.senders.min(args.clients),
        size: args.size.max(24),
        inst: u64::from_le_bytes(seed) % 1_000_000_000_000,
        sources,
        connect_rate: args.connect_rate.max(1),
        max_pending: args.max_pending.max(1),
        connect_timeout_ms: (args.connect_timeout * 1000.0) as u64,
        bucket_ms: args.bucket_ms.max(10),
        engine: 0,
        engines: args.procs,
    };
    plan.validate()?;
    let mut watched = Vec::new();
    for (pids, role) in [(&args.server_pids, "server"), (&args.broker_pids, "broker")] {
        for &pid in pids {
            watched.push(Watched {
                pid,
                role,
                name: procstat::comm(pid)?,
            });
        }
    }
    let ticks = procstat::clock_ticks();
    let (rtx, rrx) = mpsc::channel();
    let links = start_engines(&plan, &rtx)?;
    drop(rtx);
    let mut c = Controller {
        deadline: started + Duration::from_secs_f64(args.max_secs),
        args: args.clone(),
        plan: plan.clone(),
        links,
        replies: rrx,
        watched,
        ticks,
        members: Vec::new(),
        started,
        tty: std::io::stderr().is_terminal(),
    };
    let result = drive(&mut c);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            c.stop();
            return Err(e);
        }
    };
    c.stop();
    print!("{}", report::table(&report));
    let dir = args.out.clone().unwrap_or_else(default_out);
    let (json, svg) = report::write(&report, &dir)?;
    println!("wrote {json} and {svg}");
    if args.assert_clean {
        let steps_ok = report
            .steps
            .iter()
            .all(|s| s.lost == 0 && s.dups == 0 && s.rejected == 0);
        if report.connect.failed > 0 || !steps_ok || report.steps.iter().any(|s| s.delivered == 0) {
            eprintln!(
                "loadgen: NOT CLEAN: {} connect failures, {} lost, {} duplicated",
                report.connect.failed, report.lost_total, report.dups_total
            );
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn drive(c: &mut Controller) -> Result<RunReport, String> {
    let args = c.args.clone();
    let mut r = RunReport {
        tool: "chatbus benches/loadgen".into(),
        name: args.name.clone(),
        label: args.label.clone(),
        date: report::utc(unix_us() / 1_000_000),
        machine: Machine::detect(),
        protocol: format!("{:?}", args.protocol).to_lowercase(),
        urls: args.urls.clone(),
        clients: c.plan.clients,
        rooms: c.plan.rooms,
        senders: c.plan.senders,
        size: c.plan.size,
        procs: c.plan.engines,
        watched: c
            .watched
            .iter()
            .map(|w| WatchedOut {
                pid: w.pid,
                role: w.role.to_owned(),
                name: w.name.clone(),
            })
            .collect(),
        p99_limit_ms: args.p99_limit_ms,
        bucket_ms: c.plan.bucket_ms,
        ..RunReport::default()
    };
    let baseline = c.snapshot()?;
    let base_rss = baseline.rss(&c.watched, "server");
    let mut checkpoints: Vec<u32> = args
        .idle_at
        .iter()
        .copied()
        .filter(|&n| n > 0 && n <= c.plan.clients)
        .collect();
    checkpoints.sort_unstable();
    checkpoints.dedup();
    let idle_points = checkpoints.clone();
    if checkpoints.last() != Some(&c.plan.clients) {
        checkpoints.push(c.plan.clients);
    }
    let mut connect = ConnectOut::default();
    for cp in checkpoints {
        c.connect(cp, &mut connect)?;
        if idle_points.contains(&cp) {
            std::thread::sleep(Duration::from_secs_f64(args.settle_secs));
            let snap = c.snapshot()?;
            let rss = snap.rss(&c.watched, "server");
            let row = IdleOut {
                connections: connect.ready,
                server_rss_bytes: rss,
                baseline_rss_bytes: base_rss,
                rss_per_connection_bytes: rss.saturating_sub(base_rss) as f64
                    / f64::from(connect.ready.max(1)),
            };
            eprintln!(
                "[idle] {} connections: server RSS {:.1} MiB (baseline {:.1} MiB) = {:.2} KiB per connection",
                row.connections,
                rss as f64 / 1048576.0,
                base_rss as f64 / 1048576.0,
                row.rss_per_connection_bytes / 1024.0
            );
            r.idle.push(row);
        }
    }
    r.connect = connect;
    let rates: Vec<(f64, f64)> = if args.ramp && !args.rates.is_empty() {
        args.rates
            .iter()
            .filter(|r| **r > 0.0)
            .map(|&r| (r, args.step_secs))
            .collect()
    } else if args.ramp {
        let mut v = Vec::new();
        let mut rate = if args.rate > 0.0 {
            args.rate
        } else {
            args.ramp_from
        };
        while rate <= args.ramp_max && v.len() < 200 {
            v.push((rate, args.step_secs));
            rate *= args.ramp_factor;
        }
        v
    } else if args.rate > 0.0 {
        vec![(args.rate, args.duration)]
    } else {
        Vec::new()
    };
    let epoch_us = unix_us() + 100_000;
    let mut queue: VecDeque<(f64, f64)> = rates.into();
    let mut i = 0;
    let (mut failures, mut noisy) = (0u32, 0u32);
    while let Some(&(rate, secs)) = queue.front() {
        let need = Duration::from_secs_f64(secs + args.drain_secs.min(2.0) + 1.0);
        if Instant::now() + need > c.deadline {
            eprintln!("[load] stopping: --max-secs {} reached", args.max_secs);
            break;
        }
        i += 1;
        let s = c.step(i, rate, secs, epoch_us)?;
        eprintln!(
            "[step {i}] {:.1} msg/s -> {:.0} deliveries/s (offered {:.0}), p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms, lost {} dup {}, server {:.2} µs/delivery (user {:.2} sys {:.2}, {} segments/delivery, {:.0}% CPU), generator {:.0}% CPU, other {:.0}%{}",
            s.rate_msgs,
            s.deliveries_per_s,
            s.target_deliveries_per_s,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.lost,
            s.dups,
            s.server_cpu_us_per_delivery,
            s.server_user_us_per_delivery,
            s.server_sys_us_per_delivery,
            s.server_segments_per_delivery
                .map_or("n/a".to_owned(), |w| format!("{w:.3}")),
            s.server_cpu_pct,
            s.loadgen_cpu_pct,
            s.other_cpu_pct,
            if s.held { String::new() } else { format!(" -- NOT HELD: {}", s.why_not) }
        );
        let (held, other) = (s.held, s.other_cpu_pct);
        r.lost_total += s.lost;
        r.dups_total += s.dups;
        r.steps.push(s);
        if held {
            r.max_held = Some(r.steps.len() - 1);
            queue.pop_front();
            failures = 0;
        } else if !args.ramp {
            break;
        } else if other > args.noise_pct && noisy < 3 {
            // Something else on the machine took the CPU: this says nothing about the server.
            noisy += 1;
            eprintln!("[load] other processes used {other:.0}% CPU: trying {rate} msg/s again");
        } else if failures < args.retries.min(5) {
            failures += 1;
            eprintln!("[load] trying {rate} msg/s again");
        } else {
            break;
        }
    }
    if !r.steps.is_empty() {
        r.series = c.series()?;
    }
    r.wall_secs = c.started.elapsed().as_secs_f64();
    Ok(r)
}
