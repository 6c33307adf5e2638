//! `portwatch top` in a real terminal: tmux runs it on a private server
//! (`tmux -L`), the test reads the screen with `capture-pane` and types
//! with `send-keys`. A guard runs in the lab's server namespace (host mount
//! namespace, as in steer.rs) with its own socket and pin directory.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use portwatch_tests::{
    Result,
    net::{
        GuardPaths, Lab, TempFile, path_str, pinned_guard, succeeded, tcp_reachable, tcp_server,
        udp_echo, udp_server,
    },
    portwatch_bin, run, unique_name,
};

/// A tmux server of the test's own with one 100x30 session running
/// `command`, then `echo top-exited-STATUS` and a pause: the terminal as the
/// command left it can be inspected. The server is killed on drop.
struct Tmux {
    name: String,
}

impl Tmux {
    fn start(command: &str) -> Result<Self> {
        let tmux = Self {
            name: unique_name("tmux"),
        };
        let out = Command::new("tmux")
            .args(["-L", &tmux.name, "-f", "/dev/null"])
            .args([
                "new-session",
                "-d",
                "-s",
                &tmux.name,
                "-x",
                "100",
                "-y",
                "30",
            ])
            .arg(format!("{command}; echo top-exited-$?; sleep 60"))
            .env_remove("TMUX")
            .output()
            .context("running tmux")?;
        ensure!(
            out.status.success(),
            "tmux new-session failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(tmux)
    }

    fn tmux(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-L", &self.name];
        all.extend_from_slice(args);
        run("tmux", &all)
    }

    /// The pane as text (the alternate screen while `top` shows it).
    fn screen(&self) -> Result<String> {
        self.tmux(&["capture-pane", "-p", "-t", &self.name])
    }

    /// Keys by tmux's names (`Enter`, `C-c`, `d`).
    fn keys(&self, keys: &[&str]) -> Result {
        let mut args = vec!["send-keys", "-t", &self.name];
        args.extend_from_slice(keys);
        self.tmux(&args).map(drop)
    }

    /// Text typed as it is.
    fn type_text(&self, text: &str) -> Result {
        self.tmux(&["send-keys", "-t", &self.name, "-l", text])
            .map(drop)
    }

    /// A pane variable, e.g. `#{pane_dead}`.
    fn pane(&self, format: &str) -> Result<String> {
        Ok(self
            .tmux(&["display-message", "-p", "-t", &self.name, format])?
            .trim()
            .to_owned())
    }

    /// Polls the screen until `pred` holds; fails with the last screen.
    fn wait_for(
        &self,
        within: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let screen = self.screen()?;
            if pred(&screen) {
                return Ok(screen);
            }
            if Instant::now() > deadline {
                bail!("the screen did not show {what} within {within:?}:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the command to exit; checks that it exited 0 and left the
    /// terminal as it found it: main screen, cursor shown, cooked mode.
    fn wait_exit_restored(&self) -> Result {
        let screen = self.wait_for(Duration::from_secs(5), "top's exit", |s| {
            s.contains("top-exited-")
        })?;
        ensure!(screen.contains("top-exited-0"), "exit status:\n{screen}");
        ensure!(
            !screen.contains("PROTO") && !screen.contains("Events"),
            "the table is still on the screen:\n{screen}"
        );
        let state = self.pane("#{alternate_on} #{cursor_flag}")?;
        ensure!(
            state == "0 1",
            "alternate screen, cursor shown: {state:?} (want \"0 1\")"
        );
        let tty = self.pane("#{pane_tty}")?;
        let modes = run("stty", &["-F", &tty, "-a"])?;
        for mode in ["icanon", "echo", "isig"] {
            ensure!(
                modes.split_whitespace().any(|m| m == mode),
                "the terminal was left without {mode}: {modes}"
            );
        }
        Ok(())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.name, "kill-session", "-t", &self.name])
            .output();
        let _ = Command::new("tmux")
            .args(["-L", &self.name, "kill-server"])
            .output();
        if let Ok(meta) = std::fs::metadata("/proc/self") {
            let dir = std::env::var_os("TMUX_TMPDIR")
                .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
            let _ = std::fs::remove_file(dir.join(format!("tmux-{}", meta.uid())).join(&self.name));
        }
    }
}

/// `'BIN' top --socket 'SOCKET'` for tmux's shell.
fn top_command(socket: &Path) -> Result<String> {
    Ok(format!(
        "'{}' top --socket '{}'",
        path_str(&portwatch_bin())?,
        path_str(socket)?
    ))
}

/// The screen line that shows `needle` in the table (not in the log).
fn table_line<'a>(screen: &'a str, needle: &str) -> Option<&'a str> {
    screen
        .lines()
        .take_while(|l| !l.contains(" Events "))
        .find(|l| l.contains(needle))
}

/// Processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                // The parent is the second field after the `(comm)`.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|ppid| ppid.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// The pid of the process running `portwatch top --socket SOCKET`.
fn top_pid(socket: &Path) -> Result<u32> {
    let want = format!("top\0--socket\0{}\0", path_str(socket)?);
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).ends_with(&want))
        {
            return Ok(pid);
        }
    }
    bail!(
        "no process runs portwatch top --socket {}",
        socket.display()
    )
}

#[test]
fn top_shows_listeners_and_denies_the_selected_port_after_confirmation() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("top")?;
    let policy = TempFile::new("top", "allow = [\"tcp/6379\"]\n")?;
    let _pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    let tmux = Tmux::start(&top_command(&paths.socket())?)?;
    tmux.wait_for(Duration::from_secs(10), "the table", |s| {
        s.contains("PROTO") && s.contains("mode enforce")
    })?;

    let _redis = tcp_server(&lab.server, 6379)?;
    let _web = tcp_server(&lab.server, 8080)?;
    let _dns = udp_server(&lab.server, 5353)?;
    let screen = tmux.wait_for(Duration::from_secs(10), "the listener on 6379", |s| {
        table_line(s, ":6379").is_some()
    })?;
    let row = table_line(&screen, ":6379").context("the 6379 row")?;
    ensure!(row.contains("exposed") && row.contains("socat"), "{row}");
    let server = lab.server_v4();
    ensure!(
        tcp_reachable(&lab.client, server, 6379)?,
        "6379 is permitted"
    );

    // Blocked traffic: the rows show the drops and who sent them.
    ensure!(
        !tcp_reachable(&lab.client, server, 8080)?,
        "8080 is not permitted"
    );
    ensure!(
        !udp_echo(&lab.client, server, 5353)?,
        "udp/5353 is not permitted"
    );
    let client = lab.client_v4().to_string();
    let screen = tmux.wait_for(Duration::from_secs(10), "the drops", |s| {
        table_line(s, ":8080").is_some_and(|row| row.contains("blocked") && row.contains(&client))
            && s.contains("drop tcp")
            && s.contains("(no rule")
    })?;
    // One more status poll, so that the counters and rates are in.
    std::thread::sleep(Duration::from_millis(2_500));
    let screen_shot = tmux.screen()?;
    eprintln!("---- portwatch top, 100x30 ----\n{screen_shot}---- end ----");
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/top-screen.txt");
    std::fs::write(&target, &screen_shot)
        .with_context(|| format!("writing {}", target.display()))?;
    let row = table_line(&screen_shot, ":8080").context("the 8080 row")?;
    ensure!(
        row.split_whitespace()
            .any(|w| w.parse::<u64>().is_ok_and(|n| n >= 1)),
        "no drop counted on the 8080 row: {row}\n{screen}"
    );

    // At 80x24 nothing essential is cut: ports, exposure, counters, keys.
    tmux.tmux(&["resize-window", "-t", &tmux.name, "-x", "80", "-y", "24"])?;
    let small = tmux.wait_for(Duration::from_secs(3), "the 80x24 layout", |s| {
        s.lines().count() <= 24
            && s.lines().all(|l| l.chars().count() <= 80)
            && s.lines().any(|l| l.contains("?:help"))
            && table_line(s, ":6379").is_some_and(|row| row.contains("exposed"))
            && table_line(s, ":8080").is_some_and(|row| row.contains("blocked"))
    })?;
    eprintln!("---- portwatch top, 80x24 ----\n{small}---- end ----");

    // Filter down to 6379, ask to deny it, confirm.
    tmux.keys(&["/"])?;
    tmux.type_text("6379")?;
    tmux.keys(&["Enter"])?;
    tmux.wait_for(Duration::from_secs(3), "the filter", |s| {
        s.contains("filter: 6379") && table_line(s, ":8080").is_none()
    })?;
    tmux.keys(&["d"])?;
    tmux.wait_for(Duration::from_secs(3), "the confirmation", |s| {
        s.contains("Deny tcp/6379?") && s.contains("y / Enter: confirm")
    })?;
    ensure!(
        tcp_reachable(&lab.client, server, 6379)?,
        "nothing changes before the confirmation"
    );
    tmux.keys(&["y"])?;
    let start = Instant::now();
    while tcp_reachable(&lab.client, server, 6379)? {
        if start.elapsed() > Duration::from_secs(5) {
            bail!(
                "6379 still reachable 5 s after the deny:\n{}",
                tmux.screen()?
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let screen = tmux.wait_for(Duration::from_secs(5), "the deny", |s| {
        s.contains("deny tcp/6379")
            && table_line(s, ":6379").is_some_and(|row| row.contains("blocked"))
    })?;
    ensure!(
        !screen.contains("Deny tcp/6379?"),
        "the dialog closed:\n{screen}"
    );
    let file = std::fs::read_to_string(policy.as_str()?)?;
    ensure!(!file.contains("tcp/6379"), "the policy file: {file}");

    tmux.keys(&["q"])?;
    tmux.wait_exit_restored()
}

#[test]
fn top_without_a_guard_says_so_and_offers_watch_only_mode() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("top")?;
    let socket = paths.socket();
    let tmux = Tmux::start(&top_command(&socket)?)?;
    let message = format!(
        "No portwatch guard is running (no control socket at {}). Press w for watch-only mode \
         (listeners only), q to quit.",
        socket.display()
    );
    // The message wraps: compare with the lines joined.
    let joined = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    tmux.wait_for(Duration::from_secs(10), "the no-guard message", |s| {
        joined(s).contains(&message)
    })?;

    tmux.keys(&["w"])?;
    tmux.wait_for(Duration::from_secs(30), "watch-only mode, ready", |s| {
        s.contains("watch-only") && s.contains("listeners at start")
    })?;
    let top = top_pid(&socket)?;
    let watchers = children(top);
    ensure!(
        watchers.len() == 1,
        "top should have one child (portwatch watch), has {watchers:?}"
    );
    let _server = tcp_server(&lab.server, 6380)?;
    let screen = tmux.wait_for(Duration::from_secs(10), "the listener on 6380", |s| {
        table_line(s, ":6380").is_some()
    })?;
    let row = table_line(&screen, ":6380").context("the 6380 row")?;
    ensure!(
        row.contains("socat") && !row.contains("exposed") && !row.contains("blocked"),
        "no exposure without a guard: {row}"
    );
    tmux.keys(&["d"])?;
    tmux.wait_for(Duration::from_secs(3), "a/d disabled", |s| {
        s.contains("disabled in watch-only mode") && !s.contains("Deny tcp/")
    })?;

    // Ctrl-C quits as q does, and the watch child goes with top.
    tmux.keys(&["C-c"])?;
    tmux.wait_exit_restored()?;
    for pid in watchers {
        let alive = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("watch"));
        ensure!(!alive, "portwatch watch ({pid}) outlived top");
    }
    Ok(())
}

/// Whether `pid` still runs `portwatch top` (a reused pid runs something else).
fn runs_top(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("top\0--socket"))
}

#[test]
fn top_ends_when_its_terminal_goes_away() -> Result {
    let paths = GuardPaths::new("tophup")?;
    let socket = paths.socket();
    let tmux = Tmux::start(&top_command(&socket)?)?;
    tmux.wait_for(Duration::from_secs(10), "the no-guard message", |s| {
        s.contains("No portwatch guard is running")
    })?;
    let top = top_pid(&socket)?;
    // Closing the terminal under it: tmux's server goes, the pty hangs up.
    drop(tmux);
    let deadline = Instant::now() + Duration::from_secs(10);
    while runs_top(top) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if runs_top(top) {
        // Ours to end: it was started by this test's terminal.
        let _ = Command::new("kill").args(["-9", &top.to_string()]).status();
        bail!("portwatch top ({top}) still ran 10 s after its terminal closed");
    }
    Ok(())
}

/// `L`: the policy learned from traffic, rule by rule; a skipped rule stays
/// out; `A` applies the rest with a confirmation window, `C` keeps it, and
/// the guard enforces exactly the accepted rules.
#[test]
fn top_shows_the_learned_policy_and_applies_the_accepted_rules() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("tl")?;
    let policy = TempFile::new("toplearn", "mode = \"audit\"\nallow = []\n")?;
    let _web = tcp_server(&lab.server, 8080)?;
    let _db = tcp_server(&lab.server, 5432)?;
    let _pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    let server = lab.server_v4();
    ensure!(tcp_reachable(&lab.client, server, 8080)?, "audit mode");
    ensure!(tcp_reachable(&lab.client, server, 5432)?, "audit mode");
    let tmux = Tmux::start(&top_command(&paths.socket())?)?;
    tmux.wait_for(Duration::from_secs(10), "the table", |s| {
        s.contains("PROTO") && s.contains("mode audit")
    })?;
    tmux.keys(&["L"])?;
    let screen = tmux.wait_for(Duration::from_secs(10), "the proposal", |s| {
        s.contains("Learned policy") && s.contains("2 rules from") && s.contains("tcp/8080")
    })?;
    ensure!(screen.contains("[x]"), "{screen}");
    // The rules come in port order: 5432 first. Skip it.
    ensure!(
        screen.find("tcp/5432") < screen.find("tcp/8080"),
        "5432 is listed first:\n{screen}"
    );
    tmux.keys(&["Space"])?;
    tmux.wait_for(Duration::from_secs(3), "5432 skipped", |s| {
        s.lines()
            .any(|l| l.contains("[ ]") && l.contains("tcp/5432"))
            && s.contains("1 accepted")
    })?;
    tmux.keys(&["A"])?;
    tmux.wait_for(Duration::from_secs(10), "the apply", |s| {
        s.contains("reverts in 120 s") && s.contains("C: confirm")
    })?;
    tmux.keys(&["C"])?;
    tmux.wait_for(Duration::from_secs(10), "the confirmation", |s| {
        s.contains("confirm apply")
    })?;
    let text = succeeded(&paths.client(&["policy"])?)?;
    ensure!(text.contains("mode = \"enforce\""), "{text}");
    ensure!(
        text.contains("tcp/8080") && !text.contains("tcp/5432"),
        "{text}"
    );
    ensure!(tcp_reachable(&lab.client, server, 8080)?, "accepted: open");
    ensure!(
        !tcp_reachable(&lab.client, server, 5432)?,
        "skipped: closed"
    );
    tmux.keys(&["Escape"])?;
    tmux.keys(&["q"])?;
    tmux.wait_exit_restored()
}
