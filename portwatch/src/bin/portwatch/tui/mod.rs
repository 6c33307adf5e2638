//! `portwatch top`: a full-screen view of the listeners, their exposure
//! and drops, fed by a running guard's control socket.
//!
//! - [`app`]: the state (rows, sort, filter, selection, modes, event log)
//!   and what keys and data do to it; no terminal involved, unit-tested.
//! - [`learn`]: the learned-policy view's state (`L`).
//! - [`ui`]: draws the state with ratatui.
//! - [`source`]: threads that read the guard's stream, poll its status,
//!   send allow/deny, run `portwatch watch` in watch-only mode and catch
//!   signals; all report over one channel.
//! - here: the terminal (raw mode, alternate screen, restored on every way
//!   out, panics included) and the loop: apply what arrived, draw, wait up
//!   to [`TICK`] for a key.

mod app;
mod learn;
mod source;
mod ui;

use std::{
    io::{self, IsTerminal as _, Stdout},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Once, mpsc::Receiver},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use ratatui::{
    Terminal,
    backend::CrosstermBackend,
    crossterm::{
        cursor, event, execute,
        terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
    },
    layout::Rect,
};

use self::{
    app::{Action, App, Mode},
    source::{Msg, Sources},
};
use portwatch::control::{DEFAULT_SOCKET, client};

/// The longest the loop waits for a key before it redraws with new data.
const TICK: Duration = Duration::from_millis(200);

/// At most this many messages are applied between two draws, so that a
/// flood of events cannot starve the keys.
const BATCH: usize = 5_000;

#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// `portwatch top`.
pub fn run(args: TopArgs) -> anyhow::Result<ExitCode> {
    let socket = args.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    if !io::stdout().is_terminal() || !io::stdin().is_terminal() {
        bail!(
            "portwatch top needs a terminal; in scripts use `portwatch status --json` or \
             `portwatch watch --json`"
        );
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let mut sources = Sources::new(tx);
    sources.watch_signals()?;
    let mut app = App::new(socket.display().to_string());
    if client::guard_running(&socket) {
        sources.start_guard(&socket);
        app.guard_found();
    } else {
        app.no_guard();
    }
    let mut terminal = TerminalGuard::enter()?;
    let result = event_loop(&mut terminal.terminal, &mut app, &rx, &mut sources, &socket);
    // The terminal first, so that nothing below can leave it raw.
    drop(terminal);
    drop(sources);
    result.map(|()| ExitCode::SUCCESS)
}

enum Input {
    Ready,
    None,
    /// The terminal is gone (its emulator or tmux pane closed).
    HungUp,
}

/// Waits up to `timeout` for input on stdin, the terminal.
fn wait_for_input(timeout: Duration) -> Input {
    use std::os::fd::AsFd as _;

    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

    let stdin = io::stdin();
    let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, timeout) {
        // EINTR (a resize): the caller redraws and waits again.
        Err(_) | Ok(0) => Input::None,
        Ok(_) => match fds[0].revents() {
            Some(r)
                if r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL) =>
            {
                Input::HungUp
            }
            _ => Input::Ready,
        },
    }
}

/// Leaves raw mode and the alternate screen and shows the cursor. Safe to
/// call more than once, and on a terminal that was never set up.
fn restore_terminal() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
}

/// The terminal in raw mode on the alternate screen; restored on drop.
struct TerminalGuard {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl TerminalGuard {
    fn enter() -> anyhow::Result<Self> {
        // A panic restores the terminal before its message is printed, or
        // the message would land on the alternate screen and vanish.
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                previous(info);
            }));
        });
        terminal::enable_raw_mode().context("switching the terminal to raw mode")?;
        // From here on, an error restores what was done.
        let setup = (|| {
            execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)?;
            let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
            terminal.clear()?;
            Ok::<_, io::Error>(terminal)
        })();
        match setup {
            Ok(terminal) => Ok(Self { terminal }),
            Err(e) => {
                restore_terminal();
                Err(e).context("setting up the terminal")
            }
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn event_loop(
    terminal: &mut Terminal<CrosstermBackend<Stdout>>,
    app: &mut App,
    rx: &Receiver<Msg>,
    sources: &mut Sources,
    socket: &Path,
) -> anyhow::Result<()> {
    let mut last_check = Instant::now();
    // The latest status error, to report each one once, not every second.
    let mut status_error: Option<String> = None;
    loop {
        for msg in rx.try_iter().take(BATCH) {
            match msg {
                Msg::Line(line, user) => app.on_line(&line, user),
                Msg::Subscribed => app.on_subscribed(),
                Msg::StreamDown(why) => app.notice(why, true),
                Msg::Status(status) => {
                    status_error = None;
                    app.on_status(&status, Instant::now());
                }
                Msg::StatusError(e) => {
                    if status_error.as_ref() != Some(&e) {
                        app.notice(format!("status: {e}"), true);
                        status_error = Some(e);
                    }
                }
                Msg::Change { verb, spec, result } => app.on_change(verb, &spec, result),
                Msg::Proposal(result) => app.on_proposal(result),
                // Its errors (e.g. missing privileges) on the status line
                // too; its notes only in the log.
                Msg::ChildStderr(line) if line.contains("error") => {
                    app.notice(format!("watch: {line}"), true);
                }
                Msg::ChildStderr(line) => {
                    app.log(app::LogKind::Info, app::clock(), format!("watch: {line}"));
                }
                Msg::Signal => return Ok(()),
            }
        }
        // The message screen switches over as soon as a guard answers.
        if app.mode == Mode::NoGuard && last_check.elapsed() >= source::POLL {
            last_check = Instant::now();
            if client::guard_running(socket) {
                sources.start_guard(socket);
                app.guard_found();
            }
        }
        let size = terminal.size().context("reading the terminal's size")?;
        app.page = ui::table_page(Rect::new(0, 0, size.width, size.height));
        terminal
            .draw(|frame| ui::draw(frame, app))
            .context("drawing")?;
        // Waiting on the terminal ourselves: crossterm, asked to wait, spins
        // forever on a terminal that hangs up meanwhile (reads of 0 bytes).
        match wait_for_input(TICK) {
            Input::HungUp => return Ok(()),
            Input::None => continue,
            Input::Ready => {}
        }
        if !event::poll(Duration::ZERO).context("reading the terminal")? {
            continue;
        }
        // Every key already typed, then a redraw. A resize needs nothing
        // more: the next draw fits the new size.
        loop {
            if let event::Event::Key(key) = event::read().context("reading the terminal")?
                && let Some(action) = app.on_key(key)
            {
                match action {
                    Action::Quit => return Ok(()),
                    Action::Allow(spec) => sources.change(socket, "allow", spec),
                    Action::Deny(spec) => sources.change(socket, "deny", spec),
                    Action::Learn(learn::LearnAction::Fetch) => sources.learn(socket),
                    Action::Learn(learn::LearnAction::Apply(text)) => {
                        sources.apply(socket, Some(text), learn::CONFIRM_WITHIN);
                    }
                    Action::Learn(learn::LearnAction::Confirm) => {
                        sources.apply(socket, None, learn::CONFIRM_WITHIN);
                    }
                    Action::Learn(learn::LearnAction::Close) => {}
                    Action::WatchOnly => match sources.start_watch() {
                        Ok(()) => app.watch_only(),
                        Err(e) => app.notice(format!("{e:#}"), true),
                    },
                }
            }
            if !event::poll(Duration::ZERO).context("reading the terminal")? {
                break;
            }
        }
    }
}
