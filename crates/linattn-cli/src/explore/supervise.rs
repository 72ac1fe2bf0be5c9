//! Measurements run in child processes of this binary, watched: a child is killed when
//! its request is cancelled (or its client goes away), when it runs past its time
//! limit, or when it holds more memory than the server's budget. Killing is the one
//! way to stop a computation at once and get all its memory back, whatever it was
//! doing.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How often the watcher looks at the cancel flag, the clock and the child's memory: the
/// delay of a cancel, at most.
const POLL: Duration = Duration::from_millis(50);

/// Why a watched child ended.
#[derive(Debug)]
pub enum Ended {
    /// It exited by itself; with what it wrote on stderr when it failed.
    Exited { success: bool, stderr: String },
    /// Its request was cancelled.
    Cancelled,
    /// It ran past its time limit.
    TimedOut(Duration),
    /// It held this many bytes, more than the budget.
    OverBudget(u64),
    /// It could not be started or watched.
    Failed(String),
}

/// What the watcher enforces.
pub struct Limits<'a> {
    /// Set by whoever wants the child stopped.
    pub cancel: &'a AtomicBool,
    /// Most bytes the child may hold (its resident memory).
    pub memory_budget: u64,
}

/// Runs `command` with `input` on its stdin, hands each line it prints to `on_line`, and
/// stops it as [`Limits`] say. `on_line` returns the time limit from then on (`None`: the
/// one before stays), so a child running several cases gives each its own.
pub fn run(
    mut command: Command,
    input: &[u8],
    limits: &Limits,
    first_deadline: Option<Duration>,
    mut on_line: impl FnMut(&str) -> Option<Duration>,
) -> Ended {
    let spawned = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => KillOnDrop(child),
        Err(error) => return Ended::Failed(format!("cannot start a measurement: {error}")),
    };
    // Written from a thread: a child that never reads its stdin must not block us.
    let mut stdin = child.0.stdin.take().expect("piped");
    let input = input.to_vec();
    std::thread::spawn(move || stdin.write_all(&input));
    let stdout = child.0.stdout.take().expect("piped");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.0.stderr.take().expect("piped");
    let stderr_text = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut limit = first_deadline.map(|limit| (Instant::now(), limit));
    loop {
        match lines.recv_timeout(POLL) {
            Ok(line) => {
                if let Some(new_limit) = on_line(&line) {
                    limit = Some((Instant::now(), new_limit));
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = child.0.wait();
                let stderr = stderr_text.join().unwrap_or_default();
                return match status {
                    Ok(status) => Ended::Exited {
                        success: status.success(),
                        stderr: stderr.trim().to_string(),
                    },
                    Err(error) => Ended::Failed(error.to_string()),
                };
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if limits.cancel.load(Ordering::Relaxed) {
            return Ended::Cancelled;
        }
        if let Some((since, limit)) = limit
            && since.elapsed() > limit
        {
            return Ended::TimedOut(limit);
        }
        if let Some(held) = resident_bytes(child.0.id())
            && held > limits.memory_budget
        {
            return Ended::OverBudget(held);
        }
    }
}

/// A child killed and reaped when the watcher returns, however it returns.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Resident memory of process `pid` (Linux: VmRSS of /proc/pid/status); `None`
/// elsewhere, where only the library's own estimates bound a child.
fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Sets its flag when dropped: a request handler holds one so that a client that goes
/// away (the handler's future dropped) cancels the child working for it.
pub struct CancelOnDrop(pub std::sync::Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
