//! Progress reporting for image builds.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

pub trait Progress: Send + Sync {
    /// A new build step began (`index` of `total`, 1-based).
    fn step(&self, index: usize, total: usize, what: &str);
    /// A line of output from a tool, for the user to follow long steps.
    fn detail(&self, line: &str);
}

/// Prints a bar per step and tool output to stderr.
pub struct StderrProgress {
    started: Instant,
    verbose: bool,
    last: Mutex<Option<Instant>>,
}

impl StderrProgress {
    pub fn new(verbose: bool) -> StderrProgress {
        StderrProgress {
            started: Instant::now(),
            verbose,
            last: Mutex::new(None),
        }
    }
}

impl Progress for StderrProgress {
    fn step(&self, index: usize, total: usize, what: &str) {
        const WIDTH: usize = 24;
        let filled = WIDTH * index.saturating_sub(1) / total.max(1);
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(WIDTH - filled));
        let elapsed = self.started.elapsed().as_secs();
        let _ = writeln!(
            std::io::stderr(),
            "[{bar}] {index}/{total} {what} (t+{elapsed}s)"
        );
        if let Ok(mut l) = self.last.lock() {
            *l = Some(Instant::now());
        }
    }

    fn detail(&self, line: &str) {
        if self.verbose {
            let _ = writeln!(std::io::stderr(), "    {line}");
        }
    }
}

/// Discards everything (for library users that log elsewhere).
pub struct NoProgress;

impl Progress for NoProgress {
    fn step(&self, _: usize, _: usize, _: &str) {}
    fn detail(&self, _: &str) {}
}
