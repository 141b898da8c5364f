//! How the controller reaches its engines: one engine thread in this process, or one
//! `loadgen worker` child process per engine (driven by JSON lines on stdin/stdout), and the
//! worker side of that pipe.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Waker;

use crate::engine;
use crate::plan::{Cmd, Plan, Reply};

/// How the controller reaches one engine.
pub(crate) enum Link {
    Thread {
        tx: Sender<Cmd>,
        waker: Arc<Waker>,
        handle: Option<std::thread::JoinHandle<()>>,
    },
    Child {
        stdin: ChildStdin,
        child: Child,
    },
}

impl Link {
    pub(crate) fn send(&mut self, cmd: &Cmd) -> Result<(), String> {
        match self {
            Link::Thread { tx, waker, .. } => {
                tx.send(cmd.clone())
                    .map_err(|_| "engine thread ended".to_owned())?;
                waker.wake().map_err(|e| format!("wake engine: {e}"))
            }
            Link::Child { stdin, .. } => {
                let mut line = serde_json::to_string(cmd).map_err(|e| e.to_string())?;
                line.push('\n');
                stdin
                    .write_all(line.as_bytes())
                    .and_then(|()| stdin.flush())
                    .map_err(|e| format!("write to worker: {e}"))
            }
        }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        match self {
            Link::Thread { .. } => None,
            Link::Child { child, .. } => Some(child.id()),
        }
    }

    pub(crate) fn finish(self) {
        match self {
            Link::Thread { handle, .. } => {
                if let Some(h) = handle {
                    let _ = h.join();
                }
            }
            Link::Child { stdin, mut child } => {
                drop(stdin);
                // The worker exits after Stop; do not wait forever for one that hangs.
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

pub(crate) fn start_engines(
    plan: &Plan,
    replies: &Sender<(u32, Reply)>,
) -> Result<Vec<Link>, String> {
    let mut links = Vec::new();
    if plan.engines == 1 {
        let (tx, waker, handle) =
            engine::spawn(plan.clone(), replies.clone()).map_err(|e| format!("engine: {e}"))?;
        links.push(Link::Thread {
            tx,
            waker,
            handle: Some(handle),
        });
        return Ok(links);
    }
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    for e in 0..plan.engines {
        let mut p = plan.clone();
        p.engine = e;
        let mut child = Command::new(&exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|err| format!("start worker: {err}"))?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("worker without pipes".into());
        };
        let line = serde_json::to_string(&p).map_err(|err| err.to_string())? + "\n";
        stdin
            .write_all(line.as_bytes())
            .map_err(|err| format!("write to worker: {err}"))?;
        let tx = replies.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let reply = serde_json::from_str::<Reply>(&line)
                    .unwrap_or_else(|err| Reply::Fatal(format!("worker said {line:?}: {err}")));
                if tx.send((e, reply)).is_err() {
                    break;
                }
            }
        });
        links.push(Link::Child { stdin, child });
    }
    Ok(links)
}

/// `loadgen worker`: the plan on the first stdin line, then commands; replies on stdout.
pub(crate) fn worker() -> Result<ExitCode, String> {
    // Not `stdin.lock()`: the lines are read on another thread after the first one.
    let mut lines = BufReader::new(std::io::stdin()).lines();
    let first = lines
        .next()
        .ok_or("worker: no plan on stdin")?
        .map_err(|e| format!("worker: {e}"))?;
    let plan: Plan = serde_json::from_str(&first).map_err(|e| format!("worker plan: {e}"))?;
    let (rtx, rrx) = mpsc::channel();
    let (tx, waker, handle) = engine::spawn(plan, rtx).map_err(|e| format!("engine: {e}"))?;
    std::thread::spawn(move || {
        for line in lines {
            let cmd = match line.map(|l| serde_json::from_str::<Cmd>(&l)) {
                Ok(Ok(cmd)) => cmd,
                // The controller is gone or broken: stop.
                _ => Cmd::Stop,
            };
            let stop = matches!(cmd, Cmd::Stop);
            if tx.send(cmd).is_err() || waker.wake().is_err() || stop {
                break;
            }
        }
        let _ = tx.send(Cmd::Stop);
        let _ = waker.wake();
    });
    let mut out = std::io::stdout().lock();
    for (_, reply) in rrx {
        let stopped = matches!(reply, Reply::Stopped);
        let line = serde_json::to_string(&reply).map_err(|e| e.to_string())?;
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() || stopped {
            break;
        }
    }
    let _ = handle.join();
    Ok(ExitCode::SUCCESS)
}
