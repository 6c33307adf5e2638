//! CPU time and memory from /proc: the figures the benchmarks and the soak
//! measure processes and the machine by.

use anyhow::{Context as _, Result, ensure};

/// The unit of /proc's CPU counters (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// The whole machine's busy CPU time so far (all CPUs, everything but idle
/// and iowait), in seconds, from /proc/stat.
pub fn cpu_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    // user nice system idle iowait irq softirq steal (guest is within user)
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    ensure!(f.len() == 8, "short cpu line in /proc/stat: {line}");
    Ok((f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) as f64 / USER_HZ)
}

/// utime + stime of a process so far, in seconds, from /proc/PID/stat.
pub fn proc_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // utime and stime are the 14th and 15th fields of the line.
    stat_seconds(&stat, [11, 12])
}

/// Time a process's threads have run so far, in seconds, to the
/// nanosecond: the sum of /proc/PID/task/*/schedstat. /proc/PID/stat
/// counts in 10 ms ticks, a fifth of a microsecond per event over a
/// 45,000-event burst, coarser than the differences measured with it. A
/// thread that exited between two reads is not counted: for a span in
/// which the process's threads stay (a watcher's loop and its /proc
/// worker), not for its whole life.
pub fn proc_run_seconds(pid: u32) -> Result<f64> {
    let dir = format!("/proc/{pid}/task");
    let mut ns: u64 = 0;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = task
            .with_context(|| format!("reading {dir}"))?
            .path()
            .join("schedstat");
        // A thread that ended since the listing has nothing left to add.
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .with_context(|| format!("parsing {}: {stat}", path.display()))?;
    }
    Ok(ns as f64 / 1e9)
}

/// cutime + cstime of a /proc/PID/stat line (its waited-for children's CPU
/// time), in seconds.
pub fn children_cpu_seconds(stat: &str) -> Result<f64> {
    // cutime and cstime are the 16th and 17th fields of the line.
    stat_seconds(stat, [13, 14])
}

/// The sum of two tick counters of a /proc/PID/stat line, in seconds;
/// `fields` count from the state (the 3rd field of the line), after the
/// command name, which may hold spaces.
fn stat_seconds(stat: &str, fields: [usize; 2]) -> Result<f64> {
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no ')' in /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let mut ticks = 0;
    for i in fields {
        ticks += f
            .get(i)
            .context("short /proc/PID/stat")?
            .parse::<u64>()
            .context("parsing /proc/PID/stat")?;
    }
    Ok(ticks as f64 / USER_HZ)
}

/// VmRSS and VmHWM of a process, MB.
pub fn memory_mb(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb = |field: &str| -> Result<f64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no {field} in /proc/{pid}/status"))
    };
    Ok((kb("VmRSS:")? / 1024.0, kb("VmHWM:")? / 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_after_the_command_name() -> Result<()> {
        // pid (comm with ") x") state ppid ... utime=250 stime=50 cutime=100 cstime=30
        let line = "42 (a b) x) S 1 1 1 0 -1 0 0 0 0 0 250 50 100 30 20 0";
        assert_eq!(stat_seconds(line, [11, 12])?, 3.0);
        assert_eq!(children_cpu_seconds(line)?, 1.3);
        assert!(stat_seconds("42 (x) S 1", [11, 12]).is_err());
        Ok(())
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() -> Result<()> {
        assert!(proc_cpu_seconds(std::process::id())? >= 0.0);
        let (rss, hwm) = memory_mb(std::process::id())?;
        assert!(rss > 0.0 && hwm >= rss);
        Ok(())
    }
}
