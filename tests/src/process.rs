//! Processes a test starts: their lines on a channel, signals by pid, killed and reaped when
//! dropped; and the peak resident memory of a process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

/// A child process whose standard output lines arrive on a channel as `(tag, line)`; killed
/// and reaped when dropped.
pub struct Spawned {
    /// The process.
    pub child: Child,
}

impl Spawned {
    /// Starts `cmd` with its standard output piped, sending each line to `tx` with `tag`.
    ///
    /// # Panics
    /// If the process cannot start.
    pub fn start<T: Clone + Send + 'static>(
        mut cmd: Command,
        tag: T,
        tx: mpsc::Sender<(T, String)>,
    ) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("start a process");
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((tag.clone(), line)).is_err() {
                    return;
                }
            }
        });
        Spawned { child }
    }

    /// Sends `sig` (`-STOP`, `-CONT`, `-TERM`, ...) to the process, by its pid.
    ///
    /// # Panics
    /// If `kill` fails.
    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` to the process `pid` (one the test started).
///
/// # Panics
/// If `kill` fails.
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}

/// The peak resident set (VmHWM) of the process `pid` (this process when `None`), in MiB; 0
/// where /proc cannot tell.
pub fn peak_rss_mib(pid: Option<u32>) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// The resident set (VmRSS) of the process `pid` (this process when `None`) now, in MiB; 0
/// where /proc cannot tell.
pub fn rss_mib(pid: Option<u32>) -> f64 {
    status_mib(pid, "VmRSS:")
}

fn status_mib(pid: Option<u32>, field: &str) -> f64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_owned(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
