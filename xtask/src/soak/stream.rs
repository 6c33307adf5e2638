//! The guard's JSON Lines: captured to a file while the run goes on, then
//! read back and accounted for (churn events, losses, policy changes,
//! drops).

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead as _, BufReader, BufWriter, Write as _},
    path::{Path, PathBuf},
    thread::JoinHandle,
};

use anyhow::{Context as _, Result};
use portwatch_lab::Lines;
use serde_json::Value;

use super::{TCP_FLIP, churn::ChurnProc};

/// Copies the guard's JSON Lines to `path` as they come, until its stdout
/// closes; the number of lines.
pub fn spawn_capture(lines: Lines, path: PathBuf) -> JoinHandle<Result<u64>> {
    std::thread::spawn(move || -> Result<u64> {
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::new(file);
        let mut n = 0;
        for (_, line) in lines {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
            n += 1;
        }
        out.flush()?;
        Ok(n)
    })
}

#[derive(Default, Debug)]
pub struct Stream {
    pub lines: u64,
    pub unparsable: u64,
    /// Live listen/close events of churn pids in the server namespace (or
    /// in none), per pid.
    pub listens: HashMap<u64, u64>,
    pub closes: HashMap<u64, u64>,
    /// Of those, events without a namespace (the process had exited).
    pub without_netns: u64,
    /// Events of a churn pid in another namespace (not counted as seen).
    pub elsewhere: u64,
    /// Sum of the `lost` lines' counts.
    pub lost_announced: u64,
    /// `policy` lines about the flipped port.
    pub policy_flip: u64,
    pub policy_other: u64,
    pub drops: HashMap<u64, u64>,
    pub suppressed_announced: u64,
    pub summary: Option<Value>,
}

pub fn read_stream(
    path: &Path,
    churn_pids: &HashMap<u64, &ChurnProc>,
    netns: u64,
) -> Result<Stream> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut s = Stream::default();
    let flip = format!("tcp/{TCP_FLIP}");
    for line in BufReader::new(file).lines() {
        let line = line?;
        s.lines += 1;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            s.unparsable += 1;
            continue;
        };
        match v["event"].as_str() {
            Some(kind @ ("listen" | "close")) => {
                let pid = v["pid"].as_u64().unwrap_or(0);
                if v["origin"] != "live" || !churn_pids.contains_key(&pid) {
                    continue;
                }
                // The namespace comes from /proc when the event is read: a
                // fixture that already exited has none (pid and comm come
                // from the kernel).
                if v["netns"].is_null() && v["comm"] == "python3" {
                    s.without_netns += 1;
                } else if v["netns"] != netns {
                    s.elsewhere += 1;
                    continue;
                }
                let map = if kind == "listen" {
                    &mut s.listens
                } else {
                    &mut s.closes
                };
                *map.entry(pid).or_default() += 1;
            }
            Some("lost") => s.lost_announced += v["count"].as_u64().unwrap_or(0),
            Some("suppressed") => s.suppressed_announced += v["count"].as_u64().unwrap_or(0),
            Some("policy") => {
                if v["change"].as_str().is_some_and(|c| c.contains(&flip)) {
                    s.policy_flip += 1;
                } else {
                    s.policy_other += 1;
                }
            }
            Some("drop") => {
                *s.drops
                    .entry(v["dst_port"].as_u64().unwrap_or(0))
                    .or_default() += 1
            }
            Some("summary") => s.summary = Some(v),
            _ => {}
        }
    }
    Ok(s)
}
