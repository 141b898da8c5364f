//! TCP data segments the servers sent, from the kernel's per-socket counters
//! (`tcpi_data_segs_out` of `TCP_INFO`, read with `ss -ti`): summed over the established
//! sockets whose local port is a server's listening port, i.e. the servers' client
//! connections only (not their broker connections, not the generator's own sockets).
//!
//! Why segments and not system calls: `syscw` of `/proc/PID/io` counts only the calls that go
//! through the VFS (`write`, `writev`), not `send`, `sendto` or `sendmsg`, which is what Rust's
//! `TcpStream::write` (and so tokio and chatbus) uses: it reads near zero for chatbus. A
//! segment is what the kernel's per-packet cost is paid for, whichever call produced it, and
//! reading it costs the servers nothing (no tracing).

use std::process::Command;

/// Data segments sent so far by the sockets on these local ports; `None` if `ss` fails.
pub(crate) fn data_segs_out(ports: &[u16]) -> Option<u64> {
    if ports.is_empty() {
        return None;
    }
    let filter = ports
        .iter()
        .map(|p| format!("sport = :{p}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let out = Command::new("ss")
        .args(["-tinH", "state", "established", &format!("( {filter} )")])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(sum_data_segs(&String::from_utf8_lossy(&out.stdout)))
}

/// The sum of the `data_segs_out:N` fields of `ss -ti` output.
fn sum_data_segs(text: &str) -> u64 {
    text.split_whitespace()
        .filter_map(|t| t.strip_prefix("data_segs_out:"))
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_data_segments() {
        let text = "0 0 127.0.0.1:42731 127.0.0.1:59174\n\t bbr wscale:10,10 segs_out:9 \
                    segs_in:11 data_segs_out:2 data_segs_in:7 delivered:3\n\
                    0 0 127.0.0.1:42731 127.0.0.1:59175\n\t data_segs_out:40 data_segs_in:1\n";
        assert_eq!(sum_data_segs(text), 42);
        assert_eq!(sum_data_segs(""), 0);
        assert_eq!(data_segs_out(&[]), None);
    }
}
