//! A child's output read line by line as it comes, each line stamped with
//! the moment it was read (the benchmarks measure latency with it).

use std::{
    io::{BufRead as _, BufReader, Read},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Result, bail};

/// Lines with the realtime clock at the moment each was read.
pub type Lines = mpsc::Receiver<(SystemTime, String)>;

/// Reads `from` (a child's stdout) line by line on a thread, until it
/// closes or nobody listens any more.
pub fn line_reader(from: impl Read + Send + 'static) -> Lines {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::with_capacity(1 << 16, from);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let at = SystemTime::now();
                    if tx.send((at, line.trim_end().to_string())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// Waits up to `limit` for a line satisfying `want`; the lines before it
/// are consumed.
pub fn wait_line(
    lines: &Lines,
    limit: Duration,
    mut want: impl FnMut(&str) -> bool,
) -> Result<(SystemTime, String)> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((at, line)) if want(&line) => return Ok((at, line)),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("no such line within {limit:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the output ended first"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_past_other_lines_and_sees_the_end() -> Result<()> {
        let lines = line_reader(&b"one\ntwo\r\nthree\n"[..]);
        let (_, line) = wait_line(&lines, Duration::from_secs(5), |l| l.starts_with("tw"))?;
        assert_eq!(line, "two");
        let err = wait_line(&lines, Duration::from_secs(5), |l| l == "four").err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("the output ended first")
        );
        Ok(())
    }
}
