//! Where `portwatch top`'s data comes from, each on its own thread so the
//! UI loop never blocks on I/O: the guard's JSON stream, its status polled
//! every second, allow/deny requests, a `portwatch watch` child in
//! watch-only mode, and termination signals. All report over one channel.

use std::{
    collections::HashMap,
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
use serde_json::Value;

use crate::control::{
    Format, Request,
    client::{self, ClientError},
};

/// How often the guard's status is asked for.
pub const POLL: Duration = Duration::from_secs(1);

/// What the threads report to the UI loop.
#[derive(Debug)]
pub enum Msg {
    /// A line of the stream, as JSON.
    Event(Value),
    /// A (re)subscription started; its snapshot follows.
    Subscribed,
    /// The stream ended or could not be had; why.
    StreamDown(String),
    Status(Value),
    StatusError(String),
    /// The answer to an allow/deny: the guard's `change`, or its error.
    Change {
        verb: &'static str,
        spec: String,
        result: Result<String, String>,
    },
    /// A line `portwatch watch` wrote to stderr.
    ChildStderr(String),
    /// SIGINT, SIGTERM or SIGHUP: quit.
    Signal,
}

/// User names by uid, looked up once each.
#[derive(Default)]
struct Users(HashMap<u64, Option<String>>);

impl Users {
    fn name(&mut self, uid: u64) -> Option<String> {
        self.0
            .entry(uid)
            .or_insert_with(|| {
                let uid = u32::try_from(uid).ok()?;
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }

    /// Adds `"user"` next to `"uid"` where the name is known.
    fn annotate(&mut self, v: &mut Value) {
        if let Some(uid) = v.get("uid").and_then(Value::as_u64)
            && let Some(name) = self.name(uid)
            && let Some(obj) = v.as_object_mut()
        {
            obj.insert("user".to_owned(), Value::String(name));
        }
    }
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
            let mut users = Users::default();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut v) = serde_json::from_str::<Value>(&line) {
                    users.annotate(&mut v);
                    if tx.send(Msg::Event(v)).is_err() {
                        return;
                    }
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
            let request = match verb {
                "allow" => Request::Allow {
                    spec: spec.clone(),
                    from: Vec::new(),
                },
                _ => Request::Deny { spec: spec.clone() },
            };
            let result = client::request(&path, &request)
                .map(|answer| {
                    answer
                        .get("change")
                        .and_then(Value::as_str)
                        .map_or_else(|| format!("{verb} {spec}"), str::to_owned)
                })
                .map_err(|e| e.to_string());
            let _ = tx.send(Msg::Change { verb, spec, result });
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
    let mut users = Users::default();
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
                    let Ok(mut v) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    users.annotate(&mut v);
                    if tx.send(Msg::Event(v)).is_err() {
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
    let mut users = Users::default();
    while !stop.load(Ordering::Relaxed) {
        let msg = match client::request(path, &Request::Status) {
            Ok(mut v) => {
                if let Some(list) = v.get_mut("listeners").and_then(Value::as_array_mut) {
                    list.iter_mut().for_each(|l| users.annotate(l));
                }
                Msg::Status(v)
            }
            Err(e) => Msg::StatusError(e.to_string()),
        };
        if tx.send(msg).is_err() {
            return;
        }
        std::thread::sleep(POLL);
    }
}
