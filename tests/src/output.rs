//! Line-by-line capture of a child process's output, so tests can wait for a given line
//! (a daemon's "ready", a guest's end marker) instead of sleeping.

use std::io::{BufRead, BufReader, Read};
use std::process::Child;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct LineLog {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

pub enum Wait {
    Found(String),
    TimedOut,
    /// The process exited (with this status) and the line never came.
    Exited(std::process::ExitStatus),
}

impl LineLog {
    /// Starts threads copying the child's stdout and stderr into a new log, each line also
    /// echoed to the test's stderr with `prefix`.
    pub fn capture(child: &mut Child, prefix: &'static str) -> Arc<LineLog> {
        let log = Arc::new(LineLog::default());
        let streams: [Option<Box<dyn Read + Send>>; 2] = [
            child.stdout.take().map(|s| Box::new(s) as _),
            child.stderr.take().map(|s| Box::new(s) as _),
        ];
        for stream in streams.into_iter().flatten() {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let line = line.trim_end_matches('\r').to_string();
                    eprintln!("[{prefix}] {line}");
                    log.lines.lock().unwrap().push(line);
                    log.changed.notify_all();
                }
            });
        }
        log
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for a line at index `from` or later containing `needle`, checking `child` for an
    /// early exit.
    pub fn wait_for(
        &self,
        needle: &str,
        from: usize,
        timeout: Duration,
        child: Option<&mut Child>,
    ) -> std::io::Result<Wait> {
        let deadline = Instant::now() + timeout;
        let mut child = child;
        let mut seen = from;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                if let Some(l) = lines
                    .get(seen..)
                    .unwrap_or(&[])
                    .iter()
                    .find(|l| l.contains(needle))
                {
                    return Ok(Wait::Found(l.clone()));
                }
                seen = lines.len().max(seen);
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Wait::TimedOut);
                }
                let _ = self
                    .changed
                    .wait_timeout(lines, left.min(Duration::from_millis(100)))
                    .unwrap();
            }
            if let Some(c) = child.as_deref_mut() {
                if let Some(status) = c.try_wait()? {
                    // Let the reader threads drain the last lines.
                    std::thread::sleep(Duration::from_millis(200));
                    let lines = self.lines.lock().unwrap();
                    if let Some(l) = lines
                        .get(from..)
                        .unwrap_or(&[])
                        .iter()
                        .find(|l| l.contains(needle))
                    {
                        return Ok(Wait::Found(l.clone()));
                    }
                    return Ok(Wait::Exited(status));
                }
            }
        }
    }
}
