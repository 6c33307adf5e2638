//! The state of `portwatch top`, free of any terminal: listeners, sorting,
//! filtering, selection, the mode the keys act in, and the event log. Fed by
//! [`App::on_event`] (a stream line), [`App::on_status`] (a status answer)
//! and [`App::on_key`]; [`super::ui`] draws it.

use std::{
    cmp::Ordering,
    collections::{HashMap, VecDeque},
    time::Instant,
};

use portwatch::{
    control::protocol::{ListenerStatus, StatusResponse},
    format::{self, endpoint, proto_name, time_of_day},
    model::{Event, EventKind, Listener, Origin},
    sinks::{human::DROP_WINDOW, json::Line},
};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::learn::{CONFIRM_WITHIN, LearnAction, LearnView};

/// How many lines the event log keeps.
pub const LOG_LINES: usize = 500;

/// What the caller of [`App::on_key`] has to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Quit,
    /// Send `{"cmd":"allow","spec":SPEC}` to the guard.
    Allow(String),
    /// Send `{"cmd":"deny","spec":SPEC}` to the guard.
    Deny(String),
    /// No guard: follow `portwatch watch --local` instead.
    WatchOnly,
    /// What the learned-policy view asks for.
    Learn(LearnAction),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Allow,
    Deny,
}

impl Verb {
    pub fn name(self) -> &'static str {
        match self {
            Verb::Allow => "allow",
            Verb::Deny => "deny",
        }
    }
}

/// A change waiting for its confirmation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub verb: Verb,
    /// `tcp/6379`
    pub spec: String,
    /// The listener it was asked for, for the dialog.
    pub target: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Typing a filter (applied as typed).
    Filter,
    Confirm(Pending),
    Help,
    /// The learned-policy view (`L`).
    Learn,
    /// No guard answered at the socket: the message screen.
    NoGuard,
}

/// Where the listeners come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    Guard,
    /// `portwatch watch --local`: listeners only, no policy, no counters.
    WatchOnly,
}

/// The columns, in the order `s` cycles through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortColumn {
    Port,
    Proto,
    Address,
    Pid,
    Process,
    User,
    Exposure,
    Passed,
    Dropped,
    Rate,
    LastBlocked,
}

impl SortColumn {
    pub const ALL: [SortColumn; 11] = [
        SortColumn::Port,
        SortColumn::Proto,
        SortColumn::Address,
        SortColumn::Pid,
        SortColumn::Process,
        SortColumn::User,
        SortColumn::Exposure,
        SortColumn::Passed,
        SortColumn::Dropped,
        SortColumn::Rate,
        SortColumn::LastBlocked,
    ];

    pub fn next(self) -> Self {
        let i = Self::ALL.iter().position(|c| *c == self).unwrap_or(0);
        Self::ALL.get(i + 1).copied().unwrap_or(SortColumn::Port)
    }

    pub fn label(self) -> &'static str {
        match self {
            SortColumn::Port => "port",
            SortColumn::Proto => "proto",
            SortColumn::Address => "address",
            SortColumn::Pid => "pid",
            SortColumn::Process => "process",
            SortColumn::User => "user",
            SortColumn::Exposure => "exposure",
            SortColumn::Passed => "passed",
            SortColumn::Dropped => "dropped",
            SortColumn::Rate => "drop rate",
            SortColumn::LastBlocked => "last blocked",
        }
    }
}

/// A listener's identity. The netns is part of it: the guard's stream
/// reports every namespace, and two may each have a `0.0.0.0:22`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowKey {
    pub proto: String,
    pub addr: String,
    pub port: u16,
    pub netns: Option<u64>,
}

impl RowKey {
    /// The key of a listener from the stream.
    pub fn of(l: &Listener) -> Self {
        Self {
            proto: l.proto.as_str().to_owned(),
            addr: l.addr.to_string(),
            port: l.port,
            netns: l.netns,
        }
    }

    /// The key of a listener in a status answer.
    pub fn of_status(l: &ListenerStatus) -> Self {
        Self {
            proto: l.proto.as_str().to_owned(),
            addr: l.addr.to_string(),
            port: l.port,
            netns: l.netns,
        }
    }
}

/// One listener in the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub key: RowKey,
    pub pid: Option<u64>,
    pub process: Option<String>,
    pub user: Option<String>,
    pub exposure: Option<String>,
    pub passed: Option<u64>,
    pub dropped: Option<u64>,
    /// Drops per second between the last two status answers.
    pub rate: Option<f64>,
    /// The previous status answer's drop count, for the rate.
    sample: Option<(u64, Instant)>,
    /// On an owned port: whether this listener is its owner.
    pub is_owner: Option<bool>,
}

impl Row {
    /// `0.0.0.0:22`, `[::]:22`.
    pub fn address(&self) -> String {
        address(&self.key.addr, self.key.port)
    }

    /// What allow/deny act on: `tcp/6379`.
    pub fn spec(&self) -> String {
        format!("{}/{}", self.key.proto, self.key.port)
    }
}

/// `1.2.3.4:80`, `[::]:80`, from the key's text.
pub fn address(addr: &str, port: u16) -> String {
    match addr.parse() {
        Ok(ip) => endpoint(&ip, port),
        Err(_) => format!("{addr}:{port}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogKind {
    Listen,
    Close,
    Drop,
    Policy,
    Info,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// `HH:MM:SS` (UTC)
    pub time: String,
    pub kind: LogKind,
    pub text: String,
}

/// The guard's state from its last status answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// `enforce` or `audit`.
    pub mode: Option<String>,
    /// `eth0 (native)`
    pub interfaces: Vec<String>,
    pub passed: Option<u64>,
    /// (label, count) per drop reason.
    pub drops: Vec<(&'static str, u64)>,
    pub suppressed: Option<u64>,
    pub events_lost: Option<u64>,
    /// Owned ports: `tcp/6379 open (redis-server)`, `udp/53 closed`.
    pub owned: Vec<String>,
    /// Binds of owned ports by others: refused, audited.
    pub binds: (u64, u64),
    /// The guard's last verify: `ok`, or `FAILED (2)` and what disagreed;
    /// and how far one under way has got.
    pub verify: Option<String>,
}

pub struct App {
    /// The control socket, as shown.
    pub socket: String,
    pub feed: Feed,
    pub mode: Mode,
    rows: HashMap<RowKey, Row>,
    /// Keys of the rows shown, filtered and sorted.
    view: Vec<RowKey>,
    selected: usize,
    selected_key: Option<RowKey>,
    /// First row shown (the table scrolls to keep the selection visible).
    pub scroll: usize,
    /// Rows the table shows at once; set by the loop from the screen size.
    pub page: usize,
    pub sort: SortColumn,
    pub reverse: bool,
    pub filter: String,
    /// The source and port of the latest drop, per (proto, port).
    last_blocked: HashMap<(String, u16), String>,
    pub log: VecDeque<LogLine>,
    /// Log lines written since start (a line's number, to find it again).
    logged: u64,
    /// The drop reports held back in the current window: when it began,
    /// how many, and the number of the log line that says so (updated in
    /// place: a flood brings a count per batch of reports read).
    held_back: Option<(std::time::SystemTime, u64, u64)>,
    pub header: Header,
    /// The status line: a message, and whether it reports a failure.
    pub status: Option<(String, bool)>,
    /// Events the stream said it lost (`lost` lines), for watch-only mode.
    pub stream_lost: u64,
    /// The learned-policy view's state.
    pub learn: LearnView,
}

/// Now, `HH:MM:SS` UTC.
pub fn clock() -> String {
    time_of_day(std::time::SystemTime::now())
}

/// A count in at most 4 characters: `9999`, `12k`, `1.2M`, `999G`.
pub fn compact(n: u64) -> String {
    if n < 10_000 {
        return n.to_string();
    }
    let mut value = n as f64;
    for unit in ["k", "M", "G", "T", "P", "E"] {
        value /= 1000.0;
        // Rounding must not widen it: 9.96k is `10k`, 999.6k is `1.0M`.
        if value < 9.95 {
            return format!("{value:.1}{unit}");
        }
        if value < 999.5 {
            return format!("{value:.0}{unit}");
        }
    }
    n.to_string()
}

/// A drop rate per second: `-` before two samples, `0`, `2.5`, `120`.
pub fn rate_text(rate: Option<f64>) -> String {
    match rate {
        None => "-".to_owned(),
        Some(r) if r <= 0.0 => "0".to_owned(),
        Some(r) if r < 10.0 => format!("{r:.1}"),
        Some(r) if r < 9_999.5 => format!("{r:.0}"),
        // Whole drops per second: truncation is the intent.
        Some(r) => compact(r as u64),
    }
}

/// Compares values present in both, reversed on request; a missing value
/// (`-` on screen) sorts after every value, whichever the direction.
fn cmp_present<T: PartialOrd>(a: Option<T>, b: Option<T>, reverse: bool) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => {
            let ord = a.partial_cmp(&b).unwrap_or(Ordering::Equal);
            if reverse { ord.reverse() } else { ord }
        }
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

fn is_ctrl_c(key: &KeyEvent) -> bool {
    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL)
}

impl App {
    pub fn new(socket: impl Into<String>) -> Self {
        Self {
            socket: socket.into(),
            feed: Feed::Guard,
            mode: Mode::Normal,
            rows: HashMap::new(),
            view: Vec::new(),
            selected: 0,
            selected_key: None,
            scroll: 0,
            page: 10,
            sort: SortColumn::Port,
            reverse: false,
            filter: String::new(),
            last_blocked: HashMap::new(),
            log: VecDeque::new(),
            logged: 0,
            held_back: None,
            header: Header::default(),
            status: None,
            stream_lost: 0,
            learn: LearnView::default(),
        }
    }

    // ---- what the table shows ------------------------------------------

    /// The rows shown, in order.
    pub fn visible(&self) -> impl Iterator<Item = &Row> {
        self.view.iter().filter_map(|k| self.rows.get(k))
    }

    pub fn visible_len(&self) -> usize {
        self.view.len()
    }

    pub fn total_len(&self) -> usize {
        self.rows.len()
    }

    /// The index of the selected row among the visible ones.
    pub fn selected(&self) -> Option<usize> {
        (!self.view.is_empty()).then_some(self.selected)
    }

    pub fn selected_row(&self) -> Option<&Row> {
        self.view.get(self.selected).and_then(|k| self.rows.get(k))
    }

    /// `src:port` of the latest drop to this row's port.
    pub fn last_blocked(&self, row: &Row) -> Option<&str> {
        self.last_blocked
            .get(&(row.key.proto.clone(), row.key.port))
            .map(String::as_str)
    }

    fn matches(&self, row: &Row) -> bool {
        let filter = self.filter.to_lowercase();
        let fields = [
            row.key.proto.clone(),
            row.address(),
            row.key.port.to_string(),
            row.spec(),
            row.process.clone().unwrap_or_default(),
            row.user.clone().unwrap_or_default(),
            row.pid.map(|p| p.to_string()).unwrap_or_default(),
        ]
        .map(|f| f.to_lowercase());
        // Every word must match some field: `tcp 80`.
        filter
            .split_whitespace()
            .all(|word| fields.iter().any(|f| f.contains(word)))
    }

    fn compare(&self, a: &Row, b: &Row) -> Ordering {
        let r = self.reverse;
        let by = match self.sort {
            SortColumn::Port => cmp_present(Some(a.key.port), Some(b.key.port), r),
            SortColumn::Proto => cmp_present(Some(&a.key.proto), Some(&b.key.proto), r),
            SortColumn::Address => {
                // Numerically where both parse, so 10.0.0.2 < 10.0.0.10.
                let parse = |r: &Row| r.key.addr.parse::<std::net::IpAddr>().ok();
                match (parse(a), parse(b)) {
                    (Some(x), Some(y)) => cmp_present(Some(x), Some(y), r),
                    _ => cmp_present(Some(&a.key.addr), Some(&b.key.addr), r),
                }
            }
            SortColumn::Pid => cmp_present(a.pid, b.pid, r),
            SortColumn::Process => cmp_present(a.process.as_ref(), b.process.as_ref(), r),
            SortColumn::User => cmp_present(a.user.as_ref(), b.user.as_ref(), r),
            SortColumn::Exposure => cmp_present(a.exposure.as_ref(), b.exposure.as_ref(), r),
            SortColumn::Passed => cmp_present(a.passed, b.passed, r),
            SortColumn::Dropped => cmp_present(a.dropped, b.dropped, r),
            SortColumn::Rate => cmp_present(a.rate, b.rate, r),
            SortColumn::LastBlocked => cmp_present(self.last_blocked(a), self.last_blocked(b), r),
        };
        // Ties in a stable order: proto, port, address, namespace.
        by.then_with(|| a.key.proto.cmp(&b.key.proto))
            .then_with(|| a.key.port.cmp(&b.key.port))
            .then_with(|| a.key.addr.cmp(&b.key.addr))
            .then_with(|| a.key.netns.cmp(&b.key.netns))
    }

    /// Recomputes the view after any change. Once the user has moved the
    /// selection it stays on the same listener while that is shown (else
    /// it keeps its place); before, it stays on the first row.
    fn refresh(&mut self) {
        let mut view: Vec<&Row> = self.rows.values().filter(|r| self.matches(r)).collect();
        view.sort_by(|a, b| self.compare(a, b));
        self.view = view.into_iter().map(|r| r.key.clone()).collect();
        let followed = self.selected_key.is_some();
        match self
            .selected_key
            .as_ref()
            .and_then(|k| self.view.iter().position(|v| v == k))
        {
            Some(i) => self.select(i),
            None if followed => self.select(self.selected),
            None => {
                self.select(self.selected);
                self.selected_key = None;
            }
        }
    }

    /// Selects the row at `index` (clamped) and follows its listener.
    fn select(&mut self, index: usize) {
        self.selected = index.min(self.view.len().saturating_sub(1));
        self.selected_key = self.view.get(self.selected).cloned();
        let page = self.page.max(1);
        if self.selected < self.scroll {
            self.scroll = self.selected;
        } else if self.selected >= self.scroll + page {
            self.scroll = self.selected + 1 - page;
        }
        // No empty space below the last row while rows are hidden above.
        self.scroll = self.scroll.min(self.view.len().saturating_sub(page));
    }

    fn set_status(&mut self, text: impl Into<String>, error: bool) {
        self.status = Some((text.into(), error));
    }

    pub fn log(&mut self, kind: LogKind, time: String, text: String) {
        if self.log.len() >= LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(LogLine { time, kind, text });
        self.logged += 1;
    }

    /// The log line numbered `n`, while it is still in the log.
    fn logged_line(&mut self, n: u64) -> Option<&mut LogLine> {
        let back = usize::try_from(self.logged.checked_sub(n + 1)?).ok()?;
        let i = self.log.len().checked_sub(back + 1)?;
        self.log.get_mut(i)
    }

    /// Drop reports the kernel held back: one line per window of
    /// [`DROP_WINDOW`], its count summed, as the text stream does.
    fn held_back(&mut self, ts: std::time::SystemTime, count: u64) {
        let text = |n: u64| format!("{n} drop reports held back by the rate limit");
        if let Some((start, sum, line)) = self.held_back
            && ts.duration_since(start).is_ok_and(|d| d < DROP_WINDOW)
        {
            let sum = sum + count;
            if let Some(l) = self.logged_line(line) {
                l.text = text(sum);
                self.held_back = Some((start, sum, line));
                return;
            }
        }
        self.log(LogKind::Info, time_of_day(ts), text(count));
        self.held_back = Some((ts, count, self.logged - 1));
    }

    // ---- modes ------------------------------------------------------------

    /// No guard answered: the message screen.
    pub fn no_guard(&mut self) {
        self.mode = Mode::NoGuard;
    }

    /// A guard answered (at start, or later on the message screen).
    pub fn guard_found(&mut self) {
        self.feed = Feed::Guard;
        self.mode = Mode::Normal;
        self.set_status("connected to the guard", false);
    }

    pub fn watch_only(&mut self) {
        self.feed = Feed::WatchOnly;
        self.mode = Mode::Normal;
        self.header = Header::default();
        self.set_status(
            "watch-only mode: no guard, so no exposure or counters, and a/d are disabled",
            false,
        );
    }

    // ---- keys -------------------------------------------------------------

    pub fn on_key(&mut self, key: KeyEvent) -> Option<Action> {
        if key.kind == KeyEventKind::Release {
            return None;
        }
        if is_ctrl_c(&key) {
            return Some(Action::Quit);
        }
        match self.mode.clone() {
            Mode::NoGuard => match key.code {
                KeyCode::Char('w' | 'W') => Some(Action::WatchOnly),
                KeyCode::Char('q' | 'Q') | KeyCode::Esc => Some(Action::Quit),
                _ => None,
            },
            Mode::Help => {
                match key.code {
                    KeyCode::Char('q') => return Some(Action::Quit),
                    KeyCode::Char('?') | KeyCode::Esc | KeyCode::Enter => self.mode = Mode::Normal,
                    _ => {}
                }
                None
            }
            Mode::Filter => {
                match key.code {
                    KeyCode::Enter => self.mode = Mode::Normal,
                    KeyCode::Esc => {
                        self.filter.clear();
                        self.mode = Mode::Normal;
                    }
                    KeyCode::Backspace => {
                        self.filter.pop();
                    }
                    KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
                        self.filter.push(c);
                    }
                    _ => {}
                }
                self.refresh();
                None
            }
            Mode::Confirm(pending) => match key.code {
                KeyCode::Char('y' | 'Y') | KeyCode::Enter => {
                    self.mode = Mode::Normal;
                    self.set_status(format!("{} {}…", pending.verb.name(), pending.spec), false);
                    Some(match pending.verb {
                        Verb::Allow => Action::Allow(pending.spec),
                        Verb::Deny => Action::Deny(pending.spec),
                    })
                }
                KeyCode::Char('n' | 'N' | 'q') | KeyCode::Esc => {
                    self.mode = Mode::Normal;
                    self.set_status(
                        format!("cancelled: {} {}", pending.verb.name(), pending.spec),
                        false,
                    );
                    None
                }
                _ => None,
            },
            Mode::Learn => match self.learn.on_key(key)? {
                LearnAction::Close => {
                    self.mode = Mode::Normal;
                    None
                }
                LearnAction::Apply(text) => {
                    self.set_status(
                        format!(
                            "applying {} learned rules (reverts in {CONFIRM_WITHIN} s unless confirmed: C)…",
                            self.learn.accepted_count()
                        ),
                        false,
                    );
                    Some(Action::Learn(LearnAction::Apply(text)))
                }
                other => Some(Action::Learn(other)),
            },
            Mode::Normal => self.normal_key(key),
        }
    }

    /// The guard's proposal (or why there is none).
    pub fn on_proposal(
        &mut self,
        proposal: Result<portwatch::control::protocol::Proposal, String>,
    ) {
        if let Err(e) = &proposal {
            self.notice(format!("learn: {e}"), true);
        }
        self.learn.on_proposal(proposal);
    }

    fn normal_key(&mut self, key: KeyEvent) -> Option<Action> {
        let page = self.page.max(1);
        match key.code {
            KeyCode::Char('q' | 'Q') => return Some(Action::Quit),
            KeyCode::Up | KeyCode::Char('k') => self.select(self.selected.saturating_sub(1)),
            KeyCode::Down | KeyCode::Char('j') => self.select(self.selected + 1),
            KeyCode::PageUp => self.select(self.selected.saturating_sub(page)),
            KeyCode::PageDown => self.select(self.selected + page),
            KeyCode::Home | KeyCode::Char('g') => self.select(0),
            KeyCode::End | KeyCode::Char('G') => self.select(usize::MAX),
            KeyCode::Char('s') => {
                self.sort = self.sort.next();
                self.refresh();
            }
            KeyCode::Char('S') => {
                self.reverse = !self.reverse;
                self.refresh();
            }
            KeyCode::Char('/') => self.mode = Mode::Filter,
            KeyCode::Esc if !self.filter.is_empty() => {
                self.filter.clear();
                self.refresh();
            }
            KeyCode::Char('?') => self.mode = Mode::Help,
            KeyCode::Char('a') => self.ask(Verb::Allow),
            KeyCode::Char('d') => self.ask(Verb::Deny),
            KeyCode::Char('L') if self.feed == Feed::Guard => {
                self.mode = Mode::Learn;
                self.learn.proposal = None;
                return Some(Action::Learn(LearnAction::Fetch));
            }
            KeyCode::Char('L') => self.set_status(
                "learn is disabled in watch-only mode: it needs a running guard".to_owned(),
                true,
            ),
            _ => {}
        }
        None
    }

    /// `a`/`d`: the confirmation dialog, when there is something to act on.
    fn ask(&mut self, verb: Verb) {
        if self.feed == Feed::WatchOnly {
            self.set_status(
                format!(
                    "{} is disabled in watch-only mode: it needs a running guard",
                    verb.name()
                ),
                true,
            );
            return;
        }
        let Some(row) = self.selected_row() else {
            self.set_status(format!("no listener selected to {}", verb.name()), true);
            return;
        };
        let who = match (&row.process, row.pid) {
            (Some(p), Some(pid)) => format!(" ({p}, pid {pid})"),
            (Some(p), None) => format!(" ({p})"),
            (None, Some(pid)) => format!(" (pid {pid})"),
            (None, None) => String::new(),
        };
        let pending = Pending {
            verb,
            spec: row.spec(),
            target: format!("{} {}{who}", row.key.proto, row.address()),
        };
        self.mode = Mode::Confirm(pending);
    }

    // ---- data ---------------------------------------------------------------

    /// A (re)subscription started: its snapshot replaces the rows.
    pub fn on_subscribed(&mut self) {
        self.rows.clear();
        self.refresh();
    }

    /// One line of the stream (the guard's, or `watch --json`'s), with the
    /// name of the listener's user where it is known.
    pub fn on_line(&mut self, line: &Line, user: Option<String>) {
        match line {
            Line::Event(event) => self.on_event(event, user),
            Line::Summary(_) => {
                self.log(LogKind::Info, clock(), "the stream ended".to_owned());
                self.refresh();
            }
        }
    }

    /// One event of the stream.
    pub fn on_event(&mut self, event: &Event, user: Option<String>) {
        match event {
            Event::Listener(ev) => {
                let time = time_of_day(ev.ts);
                let l = &ev.listener;
                let key = RowKey::of(l);
                let pid = l.process.pid.map(u64::from);
                let process = l.process.comm.as_deref().map(str::to_owned);
                let who = match (&process, pid) {
                    (Some(p), Some(pid)) => format!(" {p} (pid {pid})"),
                    (None, Some(pid)) => format!(" pid {pid}"),
                    _ => String::new(),
                };
                let verb = match ev.kind {
                    EventKind::Listen => "listen",
                    EventKind::Close => "close",
                };
                let text = format!("{verb} {} {}{who}", key.proto, endpoint(&l.addr, l.port));
                if ev.kind == EventKind::Listen {
                    let exposure = ev
                        .reach
                        .as_ref()
                        .map(|r| format::exposure(r.exposure, &r.unguarded));
                    let user = user.or_else(|| l.process.uid.map(|u| u.to_string()));
                    let old = self.rows.remove(&key);
                    let text = match &exposure {
                        Some(e) => format!("{text} {e}"),
                        None => text,
                    };
                    self.rows.insert(
                        key.clone(),
                        Row {
                            key,
                            pid,
                            process,
                            user,
                            exposure,
                            // Counters stay until the next status answer.
                            passed: old.as_ref().and_then(|o| o.passed),
                            dropped: old.as_ref().and_then(|o| o.dropped),
                            rate: old.as_ref().and_then(|o| o.rate),
                            is_owner: old.as_ref().and_then(|o| o.is_owner),
                            sample: old.and_then(|o| o.sample),
                        },
                    );
                    if ev.origin != Origin::Snapshot {
                        self.log(LogKind::Listen, time, text);
                    }
                } else {
                    self.rows.remove(&key);
                    self.log(LogKind::Close, time, text);
                }
            }
            Event::Drop(d) => {
                let proto = proto_name(d.proto);
                let side = |addr: Option<std::net::IpAddr>, port: u16| match addr {
                    Some(ip) => endpoint(&ip, port),
                    None => format!("?:{port}"),
                };
                let from = side(d.src, d.src_port);
                self.last_blocked
                    .insert((proto.clone(), d.dst_port), from.clone());
                let reason = d.reason.as_str().replace('_', " ");
                let iface = d
                    .iface
                    .as_ref()
                    .map(|i| format!(" on {i}"))
                    .unwrap_or_default();
                let audit = if d.audit { " (audit: passed)" } else { "" };
                let to = side(d.dst, d.dst_port);
                self.log(
                    LogKind::Drop,
                    time_of_day(d.ts),
                    format!("drop {proto} {from} -> {to} ({reason}){iface}{audit}"),
                );
            }
            Event::Policy(p) => {
                let by =
                    p.by.uid
                        .map(|u| format!(" (by uid {u})"))
                        .unwrap_or_default();
                self.log(
                    LogKind::Policy,
                    time_of_day(p.ts),
                    format!("policy: {}{by}", p.change),
                );
            }
            Event::Gate(g) => {
                let text = if g.open {
                    let who = portwatch::format::process(g.comm.as_deref(), g.pid);
                    format!("port {} opened: {who} listens", g.port)
                } else {
                    format!("port {} closed: owner gone ({})", g.port, g.owner)
                };
                self.log(LogKind::Policy, time_of_day(g.ts), text);
            }
            Event::NotOwner(n) => {
                self.log(
                    LogKind::Policy,
                    time_of_day(n.ts),
                    portwatch::format::not_owner(n),
                );
            }
            Event::Bind(b) => {
                let kind = if b.audit {
                    LogKind::Policy
                } else {
                    LogKind::Error
                };
                self.log(kind, time_of_day(b.ts), portwatch::format::bind(b));
            }
            Event::Lost { ts, count, total } => {
                self.stream_lost = *total;
                self.log(
                    LogKind::Error,
                    time_of_day(*ts),
                    format!("{count} events lost (ring buffer full)"),
                );
            }
            Event::Missed { ts, count, .. } => {
                // The listeners now follow, as a snapshot: start over.
                self.rows.clear();
                self.log(
                    LogKind::Error,
                    time_of_day(*ts),
                    format!(
                        "{count} events missed (this view could not keep up); listeners reloaded"
                    ),
                );
            }
            Event::Suppressed { ts, count, .. } => self.held_back(*ts, *count),
            Event::Ready { ts, snapshot } => {
                self.log(
                    LogKind::Info,
                    time_of_day(*ts),
                    format!("{snapshot} listeners at start; live events follow"),
                );
            }
            Event::Interface { .. } => return,
        }
        self.refresh();
    }

    /// A status answer: header, and counters, exposure and drop rate of
    /// the rows it names. It adds no rows: the stream says what listens,
    /// and an answer that crossed a `close` must not bring a row back.
    pub fn on_status(&mut self, status: &StatusResponse, now: Instant) {
        let header = &mut self.header;
        header.mode = status.mode.map(|m| m.as_str().to_owned());
        header.interfaces = status
            .interfaces
            .iter()
            .map(|i| format!("{} ({})", i.iface, i.xdp_mode))
            .collect();
        let t = &status.totals;
        header.passed = Some(t.passed);
        header.drops = vec![
            ("no rule", t.drop_no_rule),
            ("source", t.drop_source),
            ("malformed", t.drop_malformed),
            ("fragment", t.drop_fragment),
            ("rate limited", t.drop_rate_limited),
        ];
        header.suppressed = Some(t.reports_suppressed);
        header.events_lost = Some(t.events_lost);
        header.binds = (t.binds_refused, t.binds_audited);
        let last = status.verify.as_ref().map(|v| {
            if v.ok {
                "ok".to_owned()
            } else {
                format!("FAILED: {}", v.disagreements.join("; "))
            }
        });
        header.verify = match (&status.verifying, last) {
            (Some(run), last) => Some(format!(
                "{}verifying {}/{}",
                last.map(|l| format!("{l}, ")).unwrap_or_default(),
                run.probed,
                run.listeners
            )),
            (None, last) => last,
        };
        header.owned = status
            .owned
            .iter()
            .map(|o| {
                let state = match (&o.comm, o.open) {
                    (Some(comm), true) => format!("open ({comm})"),
                    (None, true) => "open".to_owned(),
                    (_, false) => "closed".to_owned(),
                };
                let squat = match o.squatters {
                    0 => String::new(),
                    n => format!(", {n} squatting"),
                };
                format!("{} {state}{squat}", o.port)
            })
            .collect();
        for l in &status.listeners {
            let Some(row) = self.rows.get_mut(&RowKey::of_status(l)) else {
                continue;
            };
            if let Some(e) = l.exposure {
                row.exposure = Some(format::exposure(e, &l.exposed_via));
            }
            row.is_owner = l.is_owner;
            row.passed = Some(l.pass_packets);
            row.dropped = Some(l.drop_packets);
            if let Some((before, then)) = row.sample {
                let secs = now.saturating_duration_since(then).as_secs_f64();
                if secs > 0.0 {
                    // A counter that went down was reset: no rate from it.
                    row.rate = Some(l.drop_packets.saturating_sub(before) as f64 / secs);
                }
            }
            row.sample = Some((l.drop_packets, now));
        }
        self.refresh();
    }

    /// The guard's answer to an allow/deny: its `change` text, or its error.
    pub fn on_change(&mut self, verb: &str, spec: &str, result: Result<String, String>) {
        match result {
            Ok(change) => {
                self.set_status(change.clone(), false);
                self.log(LogKind::Policy, clock(), format!("you: {change}"));
            }
            Err(e) => {
                let text = format!("{verb} {spec} failed: {e}");
                self.set_status(text.clone(), true);
                self.log(LogKind::Error, clock(), text);
            }
        }
    }

    /// A message for the status line and the log.
    pub fn notice(&mut self, text: impl Into<String>, error: bool) {
        let text = text.into();
        self.log(
            if error { LogKind::Error } else { LogKind::Info },
            clock(),
            text.clone(),
        );
        self.set_status(text, error);
    }
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, time::Duration};

    use portwatch::{
        control::protocol::Totals,
        datapath::attach::Attached,
        format::{parse_rfc3339, truncate, truncate_endpoint as truncate_address},
        model::{
            AttachedMode, DropEvent, DropReason, Exposure, Family, ListenerEvent, Mode as Policy,
            PolicyEvent, ProcessInfo, Proto, Reach, Requester, SockId,
        },
    };

    use super::*;

    fn at(ts: &str) -> std::time::SystemTime {
        parse_rfc3339(ts).unwrap_or(std::time::UNIX_EPOCH)
    }

    fn ip(addr: &str) -> IpAddr {
        addr.parse().unwrap_or(IpAddr::from([0u8; 4]))
    }

    fn proto(name: &str) -> Proto {
        if name == "udp" {
            Proto::Udp
        } else {
            Proto::Tcp
        }
    }

    /// A live listen with exposure `exposed`, in netns 1.
    fn listen_event(
        proto_name: &str,
        addr: &str,
        port: u16,
        comm: &str,
        pid: u32,
    ) -> ListenerEvent {
        ListenerEvent {
            ts: at("2026-11-25T02:20:02.175043Z"),
            kind: EventKind::Listen,
            origin: Origin::Live,
            listener: Listener {
                proto: proto(proto_name),
                addr: ip(addr),
                port,
                sock_id: SockId::Unknown,
                netns: Some(1),
                process: ProcessInfo {
                    pid: Some(pid),
                    comm: Some(comm.into()),
                    uid: Some(0),
                    ..ProcessInfo::default()
                }
                .into(),
            },
            reach: Some(Reach::guarded(Exposure::Exposed)),
        }
    }

    fn listen(proto_name: &str, addr: &str, port: u16, comm: &str, pid: u32) -> Event {
        Event::Listener(listen_event(proto_name, addr, port, comm, pid))
    }

    fn close(proto_name: &str, addr: &str, port: u16, netns: u64) -> Event {
        let mut ev = listen_event(proto_name, addr, port, "sshd", 999);
        ev.kind = EventKind::Close;
        ev.listener.netns = Some(netns);
        ev.reach = None;
        Event::Listener(ev)
    }

    fn policy(change: &str, uid: Option<u32>) -> Event {
        Event::Policy(PolicyEvent {
            ts: at("2026-11-25T02:22:00.000000Z"),
            change: change.into(),
            by: Requester { uid, pid: None },
            mode: Policy::Enforce,
            rules: 1,
        })
    }

    fn status_listener(addr: &str, port: u16, pass: u64, dropped: u64) -> ListenerStatus {
        ListenerStatus {
            proto: Proto::Tcp,
            family: Family::of(&ip(addr)),
            addr: ip(addr),
            port,
            pid: None,
            comm: None,
            uid: None,
            exe: None,
            cmdline: None,
            netns: Some(1),
            exposure: None,
            exposed_via: vec![],
            is_owner: None,
            pass_packets: pass,
            pass_bytes: 0,
            drop_packets: dropped,
            drop_bytes: 0,
        }
    }

    fn key(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)
    }

    fn code(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    /// redis on 6379, sshd on 22, dnsmasq on udp/53.
    fn app() -> App {
        let mut app = App::new("/run/portwatch/control.sock");
        let root = || Some("root".to_owned());
        app.on_event(&listen("tcp", "0.0.0.0", 6379, "redis", 300), root());
        app.on_event(&listen("tcp", "0.0.0.0", 22, "sshd", 100), root());
        app.on_event(&listen("udp", "::", 53, "dnsmasq", 200), root());
        app
    }

    fn ports(app: &App) -> Vec<u16> {
        app.visible().map(|r| r.key.port).collect()
    }

    #[test]
    fn reports_held_back_are_one_log_line_per_window() {
        let mut app = App::new("x");
        let t0 = at("2026-11-25T02:21:00.000000Z");
        let held = |secs: u64, count| Event::Suppressed {
            ts: t0 + Duration::from_secs(secs),
            count,
            total: 0,
        };
        let texts = |app: &App| -> Vec<String> { app.log.iter().map(|l| l.text.clone()).collect() };
        app.on_event(&held(0, 10), None);
        app.notice("between", false);
        app.on_event(&held(2, 5), None);
        app.on_event(&held(4, 1), None);
        assert_eq!(
            texts(&app),
            ["16 drop reports held back by the rate limit", "between"]
        );
        // A new window, a new line.
        app.on_event(&held(5, 3), None);
        assert_eq!(
            texts(&app).last().map(String::as_str),
            Some("3 drop reports held back by the rate limit")
        );
        assert_eq!(app.log.len(), 3);
        // A window whose line scrolled out of the log starts a new one.
        for i in 0..LOG_LINES {
            app.notice(format!("line {i}"), false);
        }
        app.on_event(&held(6, 2), None);
        assert_eq!(
            texts(&app).last().map(String::as_str),
            Some("2 drop reports held back by the rate limit")
        );
        assert_eq!(app.log.len(), LOG_LINES);
    }

    #[test]
    fn selection_stays_in_bounds() {
        let mut app = app();
        assert_eq!(app.selected(), Some(0));
        app.on_key(code(KeyCode::Up));
        assert_eq!(app.selected(), Some(0));
        app.on_key(key('j'));
        app.on_key(code(KeyCode::Down));
        app.on_key(code(KeyCode::Down));
        assert_eq!(app.selected(), Some(2));
        app.on_key(key('k'));
        assert_eq!(app.selected(), Some(1));
        app.on_key(code(KeyCode::PageDown));
        assert_eq!(app.selected(), Some(2));
        app.on_key(code(KeyCode::PageUp));
        assert_eq!(app.selected(), Some(0));
        app.on_key(code(KeyCode::End));
        assert_eq!(app.selected(), Some(2));
        app.on_key(code(KeyCode::Home));
        assert_eq!(app.selected(), Some(0));
        assert_eq!(App::new("x").selected(), None);
    }

    #[test]
    fn selection_follows_its_listener_and_scrolls() {
        let mut app = app();
        app.page = 2;
        app.on_key(code(KeyCode::End));
        assert_eq!(app.selected_row().map(|r| r.key.port), Some(6379));
        assert_eq!(app.scroll, 1, "the last row is visible");
        // A new listener sorted before it: the selection stays on 6379.
        app.on_event(&listen("tcp", "0.0.0.0", 80, "nginx", 400), None);
        assert_eq!(app.selected_row().map(|r| r.key.port), Some(6379));
        assert_eq!(app.selected(), Some(3));
        assert_eq!(app.scroll, 2);
        app.on_key(code(KeyCode::Home));
        assert_eq!(app.scroll, 0);
        // Its listener closes: the selection stays in bounds.
        app.on_key(code(KeyCode::End));
        app.on_event(&close("tcp", "0.0.0.0", 6379, 1), None);
        assert_eq!(app.selected(), Some(2));
        assert_eq!(app.selected_row().map(|r| r.key.port), Some(80));
    }

    #[test]
    fn sorting_per_column_and_reversed() {
        let mut app = app();
        assert_eq!(app.sort, SortColumn::Port);
        assert_eq!(ports(&app), [22, 53, 6379]);
        app.on_key(key('S'));
        assert_eq!(ports(&app), [6379, 53, 22]);
        app.on_key(key('S'));
        app.on_key(key('s'));
        assert_eq!(app.sort, SortColumn::Proto);
        assert_eq!(ports(&app), [22, 6379, 53]);
        app.on_key(key('s'));
        assert_eq!(app.sort, SortColumn::Address);
        assert_eq!(ports(&app), [22, 6379, 53], "0.0.0.0 before ::");
        app.on_key(key('s'));
        assert_eq!(app.sort, SortColumn::Pid);
        assert_eq!(ports(&app), [22, 53, 6379]);
        app.on_key(key('s'));
        assert_eq!(app.sort, SortColumn::Process);
        assert_eq!(ports(&app), [53, 6379, 22]);
        // Counters: rows without any sort last.
        app.on_status(
            &StatusResponse {
                listeners: vec![
                    status_listener("0.0.0.0", 22, 5, 9),
                    status_listener("0.0.0.0", 6379, 7, 1),
                ],
                ..StatusResponse::default()
            },
            Instant::now(),
        );
        app.sort = SortColumn::Passed;
        app.refresh();
        assert_eq!(ports(&app), [22, 6379, 53], "ascending, None last");
        app.on_key(key('S'));
        assert_eq!(ports(&app), [6379, 22, 53], "descending, None still last");
        app.reverse = false;
        app.sort = SortColumn::Dropped;
        app.refresh();
        assert_eq!(ports(&app), [6379, 22, 53]);
        app.on_key(key('s'));
        assert_eq!(app.sort, SortColumn::Rate);
        // The cycle comes back round.
        let mut column = SortColumn::Port;
        for _ in 0..SortColumn::ALL.len() {
            column = column.next();
        }
        assert_eq!(column, SortColumn::Port);
    }

    #[test]
    fn filtering() {
        let mut app = app();
        app.on_key(key('/'));
        assert_eq!(app.mode, Mode::Filter);
        for c in "6379".chars() {
            app.on_key(key(c));
        }
        assert_eq!(ports(&app), [6379], "applied as typed");
        app.on_key(code(KeyCode::Enter));
        assert_eq!(app.mode, Mode::Normal);
        assert_eq!(app.filter, "6379");
        assert_eq!(ports(&app), [6379]);
        assert_eq!(app.total_len(), 3);
        // Esc in the input clears it.
        app.on_key(key('/'));
        app.on_key(code(KeyCode::Esc));
        assert_eq!(app.filter, "");
        assert_eq!(ports(&app), [22, 53, 6379]);
        // By process, user, proto, spec; words must all match.
        for (filter, want) in [
            ("SSHD", vec![22]),
            ("root", vec![22, 53, 6379]),
            ("udp", vec![53]),
            ("tcp/22", vec![22]),
            ("tcp 63", vec![6379]),
            ("[::]", vec![53]),
            ("nothing", vec![]),
        ] {
            app.filter = filter.to_owned();
            app.refresh();
            assert_eq!(ports(&app), want, "{filter}");
        }
        assert_eq!(app.selected(), None);
        // Backspace edits.
        app.filter.clear();
        app.on_key(key('/'));
        app.on_key(key('5'));
        app.on_key(key('x'));
        app.on_key(code(KeyCode::Backspace));
        app.on_key(code(KeyCode::Enter));
        assert_eq!(app.filter, "5");
        assert_eq!(ports(&app), [53]);
    }

    #[test]
    fn deny_asks_first() {
        let mut app = app();
        app.on_key(code(KeyCode::End));
        assert_eq!(app.on_key(key('d')), None);
        assert_eq!(
            app.mode,
            Mode::Confirm(Pending {
                verb: Verb::Deny,
                spec: "tcp/6379".into(),
                target: "tcp 0.0.0.0:6379 (redis, pid 300)".into(),
            })
        );
        // Other keys do nothing while it asks.
        assert_eq!(app.on_key(key('j')), None);
        assert_eq!(app.on_key(key('y')), Some(Action::Deny("tcp/6379".into())));
        assert_eq!(app.mode, Mode::Normal);

        app.on_key(key('d'));
        assert_eq!(app.on_key(key('n')), None);
        assert_eq!(app.mode, Mode::Normal);
        assert!(
            app.status
                .as_ref()
                .is_some_and(|s| s.0.contains("cancelled"))
        );

        app.on_key(key('a'));
        assert_eq!(app.on_key(code(KeyCode::Esc)), None);
        app.on_key(key('a'));
        assert_eq!(
            app.on_key(code(KeyCode::Enter)),
            Some(Action::Allow("tcp/6379".into()))
        );
        // Nothing selected, nothing asked.
        let mut empty = App::new("x");
        empty.on_key(key('d'));
        assert_eq!(empty.mode, Mode::Normal);
    }

    #[test]
    fn other_keys() {
        let mut app = app();
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(app.on_key(key('?')), None);
        assert_eq!(app.mode, Mode::Help);
        assert_eq!(app.on_key(key('?')), None);
        assert_eq!(app.mode, Mode::Normal);
        assert_eq!(app.on_key(key('q')), Some(Action::Quit));
        app.on_key(key('/'));
        assert_eq!(app.on_key(key('q')), None, "q is text in the filter");
        assert_eq!(app.on_key(ctrl_c), Some(Action::Quit));
        app.on_key(code(KeyCode::Esc));
        app.on_key(key('d'));
        assert_eq!(app.on_key(ctrl_c), Some(Action::Quit));

        app.mode = Mode::Normal;
        app.no_guard();
        assert_eq!(app.on_key(key('j')), None);
        assert_eq!(app.on_key(key('w')), Some(Action::WatchOnly));
        assert_eq!(app.on_key(key('q')), Some(Action::Quit));
        app.watch_only();
        assert_eq!(app.mode, Mode::Normal);
        assert_eq!(app.on_key(key('d')), None);
        assert_eq!(app.mode, Mode::Normal, "no dialog without a guard");
        assert!(
            app.status
                .as_ref()
                .is_some_and(|s| s.1 && s.0.contains("watch-only"))
        );
    }

    #[test]
    fn events_apply() {
        let mut app = app();
        assert!(app.log.iter().any(|l| l.time == "02:20:02"
            && l.kind == LogKind::Listen
            && l.text == "listen tcp 0.0.0.0:6379 redis (pid 300) exposed"));
        // A snapshot listener is a row, not a log line.
        let mut snap = listen_event("tcp", "127.0.0.1", 631, "cupsd", 50);
        snap.origin = Origin::Snapshot;
        snap.reach = Some(Reach::guarded(Exposure::Blocked));
        let logged = app.log.len();
        app.on_event(&Event::Listener(snap), None);
        assert_eq!(app.log.len(), logged);
        assert_eq!(ports(&app), [22, 53, 631, 6379]);

        // The same address and port in another namespace is another row.
        let mut other = listen_event("tcp", "0.0.0.0", 22, "sshd", 999);
        other.listener.netns = Some(2);
        app.on_event(&Event::Listener(other), None);
        assert_eq!(ports(&app), [22, 22, 53, 631, 6379]);
        app.on_event(&close("tcp", "0.0.0.0", 22, 2), None);
        assert_eq!(ports(&app), [22, 53, 631, 6379]);
        assert_eq!(
            app.log.back().map(|l| (l.kind, l.text.as_str())),
            Some((LogKind::Close, "close tcp 0.0.0.0:22 sshd (pid 999)"))
        );

        let drop = |reason, src: &str, src_port, dst: &str, audit| {
            Event::Drop(DropEvent {
                ts: at("2026-11-25T02:21:00.000000Z"),
                iface: Some("eth0".into()),
                reason,
                proto: 6,
                src: Some(ip(src)),
                dst: Some(ip(dst)),
                src_port,
                dst_port: 6379,
                audit,
            })
        };
        app.on_event(
            &drop(DropReason::NoRule, "198.51.100.7", 40000, "10.0.0.1", false),
            None,
        );
        app.on_event(
            &drop(
                DropReason::SourceNotAllowed,
                "2001:db8::9",
                41000,
                "2001:db8::1",
                true,
            ),
            None,
        );
        let redis = app
            .visible()
            .find(|r| r.key.port == 6379)
            .cloned()
            .expect("redis row");
        assert_eq!(app.last_blocked(&redis), Some("[2001:db8::9]:41000"));
        let drops: Vec<&str> = app
            .log
            .iter()
            .filter(|l| l.kind == LogKind::Drop)
            .map(|l| l.text.as_str())
            .collect();
        assert_eq!(
            drops,
            [
                "drop tcp 198.51.100.7:40000 -> 10.0.0.1:6379 (no rule) on eth0",
                "drop tcp [2001:db8::9]:41000 -> [2001:db8::1]:6379 (source not allowed) on eth0 (audit: passed)",
            ]
        );

        app.on_event(&policy("deny tcp/6379", Some(0)), None);
        assert_eq!(
            app.log.back().map(|l| (l.kind, l.text.as_str())),
            Some((LogKind::Policy, "policy: deny tcp/6379 (by uid 0)"))
        );
        app.on_event(
            &Event::Lost {
                ts: at("2026-11-25T02:22:00.000000Z"),
                count: 3,
                total: 7,
            },
            None,
        );
        assert_eq!(app.stream_lost, 7);
        // An interface change is the guard's business, not the table's.
        let before = app.log.len();
        app.on_event(
            &Event::Interface {
                ts: at("2026-11-25T02:22:00.000000Z"),
                iface: "eth0".into(),
                change: "attached".into(),
                xdp_mode: Some(AttachedMode::Native),
            },
            None,
        );
        assert_eq!(app.log.len(), before);
        // The summary line ends the stream.
        app.on_line(&Line::Summary(Default::default()), None);
        assert_eq!(
            app.log.back().map(|l| l.text.as_str()),
            Some("the stream ended")
        );
        assert_eq!(app.total_len(), 4);

        // A new subscription's snapshot replaces the rows.
        app.on_subscribed();
        assert_eq!(app.total_len(), 0);
    }

    #[test]
    fn log_is_bounded() {
        let mut app = App::new("x");
        for i in 0..LOG_LINES + 10 {
            app.on_event(&policy(&format!("allow tcp/{i}"), None), None);
        }
        assert_eq!(app.log.len(), LOG_LINES);
        assert_eq!(
            app.log.back().map(|l| l.text.as_str()),
            Some(format!("policy: allow tcp/{}", LOG_LINES + 9).as_str())
        );
    }

    #[test]
    fn drop_rate_from_two_samples() {
        let mut app = app();
        let status = |drops: u64| StatusResponse {
            mode: Some(Policy::Enforce),
            interfaces: vec![Attached {
                iface: "eth0".into(),
                ifindex: 2,
                xdp_mode: AttachedMode::Native,
                why: None,
            }],
            totals: Totals {
                passed: 10,
                drop_no_rule: drops,
                drop_source: 1,
                binds_refused: 2,
                ..Totals::default()
            },
            owned: vec![portwatch::control::protocol::OwnedPort {
                port: "tcp/6379".parse().expect("a port"),
                owner: "unit redis-server.service".into(),
                open: false,
                pid: None,
                comm: None,
                squatters: 1,
            }],
            listeners: vec![
                ListenerStatus {
                    exposure: Some(Exposure::Blocked),
                    is_owner: Some(false),
                    ..status_listener("0.0.0.0", 6379, 4, drops)
                },
                // Not in the stream (yet, or any more): not added.
                status_listener("0.0.0.0", 9999, 0, 0),
            ],
            ..StatusResponse::default()
        };
        let t0 = Instant::now();
        app.on_status(&status(100), t0);
        let redis = |app: &App| {
            app.visible()
                .find(|r| r.key.port == 6379)
                .cloned()
                .expect("redis row")
        };
        assert_eq!(redis(&app).rate, None, "one sample: no rate yet");
        assert_eq!(redis(&app).dropped, Some(100));
        assert_eq!(redis(&app).exposure.as_deref(), Some("blocked"));
        assert_eq!(redis(&app).is_owner, Some(false), "a squatter");
        assert_eq!(app.total_len(), 3);
        app.on_status(&status(130), t0 + Duration::from_secs(2));
        assert_eq!(redis(&app).rate, Some(15.0));
        app.on_status(&status(130), t0 + Duration::from_secs(3));
        assert_eq!(redis(&app).rate, Some(0.0));
        // A counter reset (a new guard) is not a negative rate.
        app.on_status(&status(5), t0 + Duration::from_secs(4));
        assert_eq!(redis(&app).rate, Some(0.0));
        // A re-announced listener keeps its counters.
        app.on_event(&listen("tcp", "0.0.0.0", 6379, "redis", 300), None);
        assert_eq!(redis(&app).dropped, Some(5));
        assert_eq!(
            app.header,
            Header {
                mode: Some("enforce".into()),
                interfaces: vec!["eth0 (native)".into()],
                passed: Some(10),
                drops: vec![
                    ("no rule", 5),
                    ("source", 1),
                    ("malformed", 0),
                    ("fragment", 0),
                    ("rate limited", 0)
                ],
                suppressed: Some(0),
                events_lost: Some(0),
                owned: vec!["tcp/6379 closed, 1 squatting".into()],
                binds: (2, 0),
                verify: None,
            }
        );
        assert_eq!(rate_text(None), "-");
        assert_eq!(rate_text(Some(0.0)), "0");
        assert_eq!(rate_text(Some(2.54)), "2.5");
        assert_eq!(rate_text(Some(120.4)), "120");
        assert_eq!(rate_text(Some(9_999.4)), "9999");
        assert_eq!(rate_text(Some(2.5e6)), "2.5M");
    }

    #[test]
    fn change_results() {
        let mut app = app();
        app.on_change("deny", "tcp/6379", Ok("deny tcp/6379".into()));
        assert_eq!(app.status, Some(("deny tcp/6379".into(), false)));
        assert_eq!(
            app.log.back().map(|l| l.text.as_str()),
            Some("you: deny tcp/6379")
        );
        app.on_change(
            "deny",
            "tcp/1",
            Err("tcp/1 is not permitted by any rule".into()),
        );
        assert_eq!(
            app.status,
            Some((
                "deny tcp/1 failed: tcp/1 is not permitted by any rule".into(),
                true
            ))
        );
    }

    #[test]
    fn truncation() {
        assert_eq!(truncate("redis-server", 12), "redis-server");
        assert_eq!(truncate("redis-server", 6), "redis…");
        assert_eq!(truncate("redis", 1), "…");
        assert_eq!(truncate("redis", 0), "");
        assert_eq!(truncate("", 3), "");
        assert_eq!(truncate("añé✓xyz", 4), "añé…");
        assert_eq!(
            truncate_address("198.18.200.1:6379", 17),
            "198.18.200.1:6379"
        );
        assert_eq!(truncate_address("198.18.200.1:6379", 12), "198.18…:6379");
        assert_eq!(truncate_address("[fd7e:200::1]:6379", 10), "[fd7…:6379");
        assert_eq!(truncate_address("[::]:65535", 5), "[::]…");
        assert_eq!(truncate_address("nocolon", 4), "noc…");
        assert_eq!(compact(9_999), "9999");
        assert_eq!(compact(10_000), "10k");
        assert_eq!(compact(99_999), "100k");
        assert_eq!(compact(123_456), "123k");
        assert_eq!(compact(999_499), "999k");
        assert_eq!(compact(999_500), "1.0M");
        assert_eq!(compact(1_234_567), "1.2M");
        assert_eq!(compact(9_960_000), "10M");
        assert_eq!(compact(45_000_000_000), "45G");
        assert_eq!(compact(u64::MAX), "18E");
    }
}
