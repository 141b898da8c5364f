//! CPU time, RSS and write system calls of other processes, from `/proc/PID/stat`,
//! `/proc/PID/status` and `/proc/PID/io`.
//!
//! CPU time is kept as its user and system parts: the system part is mostly the kernel's
//! per-packet cost, which every server pays; the user part is what the program itself adds.
//! `syscw` of `/proc/PID/io` counts the `write` and `writev` calls of all the process's
//! threads, but not `send`, `sendto` or `sendmsg` (they bypass the VFS): it is kept for the
//! servers that use `writev` (the floor, Node.js); segments per delivery (`segments`) are the
//! measure that holds for all.

use std::fs;

use serde::Serialize;

/// A process to watch, with the role it plays.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Watched {
    pub(crate) pid: u32,
    /// `server` or `broker`.
    pub(crate) role: &'static str,
    pub(crate) name: String,
}

/// One reading of one process.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Sample {
    /// User + system CPU time, microseconds.
    pub(crate) cpu_us: u64,
    /// The system (kernel) part of `cpu_us`.
    pub(crate) sys_us: u64,
    /// Resident set size, bytes.
    pub(crate) rss: u64,
    /// Write-family system calls so far (`syscw`); `None` if `/proc/PID/io` is not readable.
    pub(crate) syscw: Option<u64>,
}

/// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`; 100 on Linux).
pub(crate) fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// The command name of `pid`.
pub(crate) fn comm(pid: u32) -> Result<String, String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("process {pid}: {e}"))
}

/// Reads `pid`'s CPU time and RSS.
pub(crate) fn sample(pid: u32, ticks: u64) -> Result<Sample, String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // The command name (field 2) is in parentheses and may contain spaces: fields are counted
    // from after its closing parenthesis. utime and stime are fields 14 and 15.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| format!("/proc/{pid}/stat: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64, String> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat: no field {n}"))
    };
    let (utime, stime) = (field(14)?, field(15)?);
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    Ok(Sample {
        cpu_us: (utime + stime) * 1_000_000 / ticks,
        sys_us: stime * 1_000_000 / ticks,
        rss: rss_kb * 1024,
        syscw: syscw(pid),
    })
}

/// `syscw` of `/proc/PID/io` (needs the same user, or ptrace rights, to read).
fn syscw(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
}

/// What one watched process used between two snapshots.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    pub(crate) user_us: u64,
    pub(crate) sys_us: u64,
    pub(crate) writes: Option<u64>,
}

/// Busy and total CPU time of the whole machine, microseconds (from the `cpu` line of
/// `/proc/stat`; busy excludes idle and iowait).
pub(crate) fn machine_cpu(ticks: u64) -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    let us = |t: u64| t * 1_000_000 / ticks;
    Some((us(total - idle), us(total)))
}

/// Readings of every watched process at one moment.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    pub(crate) at: Option<std::time::Instant>,
    pub(crate) samples: Vec<Sample>,
}

impl Snapshot {
    pub(crate) fn take(watched: &[Watched], ticks: u64) -> Result<Self, String> {
        let samples = watched
            .iter()
            .map(|w| sample(w.pid, ticks))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            at: Some(std::time::Instant::now()),
            samples,
        })
    }

    /// CPU µs used between `earlier` and `self` by the watched processes with `role`.
    pub(crate) fn cpu_since(&self, earlier: &Snapshot, watched: &[Watched], role: &str) -> u64 {
        self.samples
            .iter()
            .zip(&earlier.samples)
            .zip(watched)
            .filter(|(_, w)| w.role == role)
            .map(|((a, b), _)| a.cpu_us.saturating_sub(b.cpu_us))
            .sum()
    }

    /// The system (kernel) part of [`cpu_since`](Self::cpu_since).
    pub(crate) fn sys_since(&self, earlier: &Snapshot, watched: &[Watched], role: &str) -> u64 {
        self.samples
            .iter()
            .zip(&earlier.samples)
            .zip(watched)
            .filter(|(_, w)| w.role == role)
            .map(|((a, b), _)| a.sys_us.saturating_sub(b.sys_us))
            .sum()
    }

    /// Per watched process (in `watched` order): CPU split and write calls since `earlier`.
    pub(crate) fn usage_since(&self, earlier: &Snapshot) -> Vec<Usage> {
        self.samples
            .iter()
            .zip(&earlier.samples)
            .map(|(a, b)| {
                let cpu = a.cpu_us.saturating_sub(b.cpu_us);
                let sys = a.sys_us.saturating_sub(b.sys_us);
                Usage {
                    user_us: cpu.saturating_sub(sys),
                    sys_us: sys,
                    writes: a.syscw.zip(b.syscw).map(|(x, y)| x.saturating_sub(y)),
                }
            })
            .collect()
    }

    /// Total RSS of the watched processes with `role`.
    pub(crate) fn rss(&self, watched: &[Watched], role: &str) -> u64 {
        self.samples
            .iter()
            .zip(watched)
            .filter(|(_, w)| w.role == role)
            .map(|(s, _)| s.rss)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let s = sample(std::process::id(), clock_ticks()).expect("reads /proc");
        assert!(s.rss > 0);
        // Our own /proc/PID/io is readable, and a write(2) is counted.
        std::fs::write("/dev/null", b"x").expect("write /dev/null");
        let later = sample(std::process::id(), clock_ticks()).expect("reads /proc");
        assert!(later.syscw.expect("own io readable") > s.syscw.expect("own io readable"));
        assert!(sample(u32::MAX, 100).is_err());
    }
}
