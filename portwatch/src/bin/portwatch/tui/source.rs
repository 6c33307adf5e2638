//! Where `portwatch top`'s data comes from, each on its own thread so the
//! UI loop never blocks on I/O: the guard's JSON stream, its status polled
//! every second, allow/deny requests, a `portwatch watch` child in
//! watch-only mode, and termination signals. All report over one channel.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::Sender,
    },
    time::Duration,
};

use anyhow::Context as _;
use portwatch::{
    control::{
        Format,
        client::{self, ClientError},
        protocol::{ChangeResponse, Proposal, Request, StatusResponse},
    },
    format::UserNames,
    model::Event,
    policy::{Policy, PortRange, Rule},
    sinks::json::{Line, parse_line},
};

/// How often the guard's status is asked for.
pub const POLL: Duration = Duration::from_secs(1);

/// What the threads report to the UI loop.
#[derive(Debug)]
pub enum Msg {
    /// A line of the stream, with the name of its listener's user.
    Line(Line, Option<String>),
    /// A (re)subscription started; its snapshot follows.
    Subscribed,
    /// The stream ended or could not be had; why.
    StreamDown(String),
    Status(Box<StatusResponse>),
    StatusError(String),
    /// The answer to an allow/deny: the guard's `change`, or its error.
    Change {
        verb: &'static str,
        spec: String,
        result: Result<String, String>,
    },
    /// The guard's learned proposal, or why there is none.
    Proposal(Result<Proposal, String>),
    /// A line `portwatch watch` wrote to stderr.
    ChildStderr(String),
    /// SIGINT, SIGTERM or SIGHUP: quit.
    Signal,
}

/// A stream line read, with its listener's user name looked up.
fn read_line(text: &str, users: &mut UserNames) -> Option<Msg> {
    let line = parse_line(text).ok()?;
    let user = match &line {
        Line::Event(Event::Listener(ev)) => ev.listener.process.uid.and_then(|u| users.lookup(u)),
        _ => None,
    };
    Some(Msg::Line(line, user))
}

/// The running sources; stops them (and kills the watch child) on drop.
pub struct Sources {
    tx: Sender<Msg>,
    stop: Arc<AtomicBool>,
    child: Option<Child>,
}

impl Sources {
    pub fn new(tx: Sender<Msg>) -> Self {
        Self {
            tx,
            stop: Arc::new(AtomicBool::new(false)),
            child: None,
        }
    }

    /// The guard's stream and its status, each on a thread. The stream is
    /// subscribed to again when it ends while the guard keeps answering.
    pub fn start_guard(&self, socket: &Path) {
        let (tx, stop, path) = (self.tx.clone(), self.stop.clone(), socket.to_owned());
        std::thread::spawn(move || follow_stream(&path, &tx, &stop));
        let (tx, stop, path) = (self.tx.clone(), self.stop.clone(), socket.to_owned());
        std::thread::spawn(move || poll_status(&path, &tx, &stop));
    }

    /// Watch-only mode: this binary's `watch --json --local` as a child,
    /// its stdout parsed, its stderr passed on line by line.
    pub fn start_watch(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding portwatch's own binary")?;
        let mut child = Command::new(&exe)
            .args(["watch", "--json", "--local"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} watch --json --local", exe.display()))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        self.child = Some(child);
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            let mut users = UserNames::default();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(msg) = read_line(&line, &mut users)
                    && tx.send(msg).is_err()
                {
                    return;
                }
            }
            let _ = tx.send(Msg::StreamDown("portwatch watch exited".to_owned()));
        });
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(Msg::ChildStderr(line)).is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    /// Sends an allow/deny from a thread: the answer arrives as
    /// [`Msg::Change`].
    pub fn change(&self, socket: &Path, verb: &'static str, spec: String) {
        let (tx, path) = (self.tx.clone(), socket.to_owned());
        std::thread::spawn(move || {
            let result = PortRange::parse(&spec)
                .map_err(|e| e.to_string())
                .and_then(|ports| {
                    // Not forced: a change that would cut off an SSH
                    // session comes back refused, and says so.
                    let request = match verb {
                        "allow" => Request::Allow {
                            rule: Rule::anywhere(ports),
                            force: false,
                            confirm_within: None,
                        },
                        _ => Request::Deny {
                            ports,
                            force: false,
                            confirm_within: None,
                        },
                    };
                    client::request::<ChangeResponse>(&path, &request)
                        .map(|answer| answer.change)
                        .map_err(|e| e.to_string())
                });
            let _ = tx.send(Msg::Change { verb, spec, result });
        });
    }

    /// Asks for the learned proposal from a thread: it arrives as
    /// [`Msg::Proposal`].
    pub fn learn(&self, socket: &Path) {
        let (tx, path) = (self.tx.clone(), socket.to_owned());
        std::thread::spawn(move || {
            let request = Request::Learn(Box::default());
            let result = client::request::<Proposal>(&path, &request).map_err(|e| e.to_string());
            let _ = tx.send(Msg::Proposal(result));
        });
    }

    /// Applies a policy file's text, reverting unless confirmed within
    /// `within` seconds (`confirm_within`); or, with `text` None, confirms
    /// the change that waits. The answer arrives as [`Msg::Change`].
    pub fn apply(&self, socket: &Path, text: Option<String>, within: u64) {
        let (tx, path) = (self.tx.clone(), socket.to_owned());
        std::thread::spawn(move || {
            let (verb, request) = match text {
                Some(text) => (
                    "apply",
                    Policy::parse(&text)
                        .map(|policy| Request::Apply {
                            text,
                            policy: Box::new(policy),
                            force: false,
                            confirm_within: Some(within),
                        })
                        .map_err(|e| e.to_string()),
                ),
                None => ("confirm", Ok(Request::Confirm)),
            };
            let result = request.and_then(|request| {
                client::request::<ChangeResponse>(&path, &request)
                    .map(|answer| answer.change)
                    .map_err(|e| e.to_string())
            });
            let _ = tx.send(Msg::Change {
                verb,
                spec: "the learned policy".into(),
                result,
            });
        });
    }

    /// SIGINT, SIGTERM and SIGHUP become [`Msg::Signal`], so that the
    /// terminal is restored and the child killed whatever ends `top`.
    pub fn watch_signals(&self) -> anyhow::Result<()> {
        let tx = self.tx.clone();
        // Its own runtime on its own thread: `top` runs inside the CLI's
        // runtime, which this thread blocks. Installed before this returns,
        // so that from then on a signal is caught rather than fatal.
        let (installed_tx, installed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = installed_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let signals = (|| {
                    Ok::<_, std::io::Error>((
                        signal(SignalKind::interrupt())?,
                        signal(SignalKind::terminate())?,
                        signal(SignalKind::hangup())?,
                    ))
                })();
                let (mut int, mut term, mut hup) = match signals {
                    Ok(signals) => {
                        let _ = installed_tx.send(Ok(()));
                        signals
                    }
                    Err(e) => {
                        let _ = installed_tx.send(Err(e));
                        return;
                    }
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
                let _ = tx.send(Msg::Signal);
                // The signal is caught, so it cannot end a `top` stuck in a
                // terminal read: after a grace period, end the process here.
                tokio::time::sleep(SIGNAL_GRACE).await;
                super::restore_terminal();
                std::process::exit(130);
            });
        });
        installed
            .recv()
            .context("the signal thread ended")?
            .context("installing signal handlers")
    }
}

/// How long `top` has to end by itself after SIGINT, SIGTERM or SIGHUP.
const SIGNAL_GRACE: Duration = Duration::from_secs(3);

impl Drop for Sources {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(mut child) = self.child.take() {
            // By its pid (SIGKILL): `watch` keeps nothing pinned, so the
            // kernel detaches its programs as its descriptors close.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn follow_stream(path: &Path, tx: &Sender<Msg>, stop: &AtomicBool) {
    let mut users = UserNames::default();
    // Reported once per outage, not every second.
    let mut down_reported = false;
    while !stop.load(Ordering::Relaxed) {
        match client::subscribe(path, Format::Json, false) {
            Ok(lines) => {
                down_reported = false;
                if tx.send(Msg::Subscribed).is_err() {
                    return;
                }
                let mut why = "the guard ended its stream".to_owned();
                for line in lines {
                    let line = match line {
                        Ok(line) => line,
                        Err(e) => {
                            why = format!("reading the guard's stream: {e}");
                            break;
                        }
                    };
                    let Some(msg) = read_line(&line, &mut users) else {
                        continue;
                    };
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
                if tx.send(Msg::StreamDown(why)).is_err() {
                    return;
                }
            }
            Err(e) if !down_reported => {
                down_reported = true;
                let why = match e {
                    ClientError::NoGuard { .. } => e.to_string(),
                    e => format!("cannot follow the guard's stream: {e}"),
                };
                if tx.send(Msg::StreamDown(why)).is_err() {
                    return;
                }
            }
            Err(_) => {}
        }
        std::thread::sleep(POLL);
    }
}

fn poll_status(path: &Path, tx: &Sender<Msg>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let msg = match client::status(path) {
            Ok(status) => Msg::Status(Box::new(status)),
            Err(e) => Msg::StatusError(e.to_string()),
        };
        if tx.send(msg).is_err() {
            return;
        }
        std::thread::sleep(POLL);
    }
}
