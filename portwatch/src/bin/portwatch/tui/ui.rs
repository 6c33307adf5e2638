//! Drawing `portwatch top` from its [`App`] state; nothing here changes it.
//!
//! ```text
//! header      two lines: source, mode, interfaces; totals
//! listeners   the table (sorted, filtered, the selection highlighted)
//! events      the latest log lines, newest at the bottom
//! status      one line: the latest message, or the keys
//! ```
//!
//! Columns get their minimum width first and what is left in order of
//! importance; a cell wider than its column ends in an ellipsis (an
//! address keeps its port).

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Clear, Paragraph, Row as TableRow, Table, TableState, Wrap},
};

use portwatch::format::{truncate, truncate_endpoint};

use super::app::{App, Feed, LogKind, Mode, Row, SortColumn, Verb, compact, rate_text};

/// A table column: its title, the width it never goes below, the width it
/// never needs to exceed, and whether its numbers align right.
struct Column {
    title: &'static str,
    min: u16,
    max: u16,
    right: bool,
    sort: &'static [SortColumn],
}

const COLUMNS: [Column; 10] = [
    Column {
        title: "PROTO",
        min: 5,
        max: 5,
        right: false,
        sort: &[SortColumn::Proto],
    },
    Column {
        title: "ADDRESS",
        min: 12,
        max: 47,
        right: false,
        sort: &[SortColumn::Address, SortColumn::Port],
    },
    Column {
        title: "PID",
        min: 7,
        max: 7,
        right: true,
        sort: &[SortColumn::Pid],
    },
    Column {
        title: "PROCESS",
        min: 7,
        max: 15,
        right: false,
        sort: &[SortColumn::Process],
    },
    Column {
        title: "USER",
        min: 4,
        max: 12,
        right: false,
        sort: &[SortColumn::User],
    },
    Column {
        title: "EXPOSURE",
        min: 8,
        max: 8,
        right: false,
        sort: &[SortColumn::Exposure],
    },
    Column {
        title: "PASS",
        min: 4,
        max: 4,
        right: true,
        sort: &[SortColumn::Passed],
    },
    Column {
        title: "DROP",
        min: 4,
        max: 4,
        right: true,
        sort: &[SortColumn::Dropped],
    },
    Column {
        title: "DROP/S",
        min: 6,
        max: 6,
        right: true,
        sort: &[SortColumn::Rate],
    },
    Column {
        title: "LAST BLOCKED",
        min: 14,
        max: 47,
        right: false,
        sort: &[SortColumn::LastBlocked],
    },
];

/// Which columns get spare width first: address, last blocked source,
/// process, user.
const GROW_ORDER: [usize; 4] = [1, 9, 3, 4];

/// Column widths for `total` cells: each gets its minimum, then spare
/// width goes in [`GROW_ORDER`] up to what each wants (its content, within
/// its maximum). Gaps of one between columns are included in `total`.
pub fn column_widths(total: u16, wanted: &[u16; 10]) -> [u16; 10] {
    let mut widths = COLUMNS.each_ref().map(|c| c.min);
    let gaps = u16::try_from(COLUMNS.len() - 1).unwrap_or(0);
    let used: u16 = widths.iter().sum::<u16>() + gaps;
    let mut spare = total.saturating_sub(used);
    for i in GROW_ORDER {
        let (Some(w), Some(want), Some(col)) = (widths.get_mut(i), wanted.get(i), COLUMNS.get(i))
        else {
            continue;
        };
        let target = (*want).clamp(col.min, col.max);
        let grow = target.saturating_sub(*w).min(spare);
        *w += grow;
        spare -= grow;
    }
    widths
}

/// The rows the table shows at once in a terminal of `area`.
pub fn table_page(area: Rect) -> usize {
    // The top border (with the title) and the column titles.
    usize::from(areas(area)[1].height.saturating_sub(2)).max(1)
}

/// Header, table, event log, status line.
fn areas(area: Rect) -> [Rect; 4] {
    let log = match area.height {
        0..20 => 4,
        20..30 => 7,
        _ => 9,
    };
    Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(4),
        Constraint::Length(log),
        Constraint::Length(1),
    ])
    .areas(area)
}

fn exposure_style(exposure: &str) -> Style {
    // "exposed via eth1" is styled as what it is: exposed.
    match exposure.split(' ').next().unwrap_or_default() {
        "exposed" => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        "partial" => Style::new().fg(Color::Yellow),
        "blocked" => Style::new().fg(Color::Green),
        _ => Style::new(),
    }
}

pub fn draw(frame: &mut Frame, app: &App) {
    let area = frame.area();
    if app.mode == Mode::NoGuard {
        draw_no_guard(frame, app, area);
        return;
    }
    let [header, table, log, status] = areas(area);
    draw_header(frame, app, header);
    draw_table(frame, app, table);
    draw_log(frame, app, log);
    draw_status(frame, app, status);
    match &app.mode {
        Mode::Confirm(pending) => {
            let (title, what) = match pending.verb {
                Verb::Allow => (
                    format!("Allow {}?", pending.spec),
                    format!("Permit {} from anywhere", pending.spec),
                ),
                Verb::Deny => (
                    format!("Deny {}?", pending.spec),
                    format!("Stop permitting {}", pending.spec),
                ),
            };
            let lines = vec![
                Line::styled(title, Style::new().add_modifier(Modifier::BOLD)),
                Line::raw(""),
                Line::raw(format!("{what} through the guard")),
                Line::raw(format!("(listener: {}).", pending.target)),
                Line::raw(""),
                Line::raw("y / Enter: confirm    n / Esc: cancel"),
            ];
            popup(frame, area, " Confirm ", lines, 60);
        }
        Mode::Help => {
            let lines = [
                "Up/Down, j/k      move the selection",
                "PgUp/PgDn         a page up/down",
                "Home/End          first/last listener",
                "s / S             next sort column / reverse",
                "/                 filter: proto, address, port,",
                "                  process, user (Enter keeps it,",
                "                  Esc clears it)",
                "a / d             allow / deny the selected",
                "                  listener's port (asks first)",
                "L                 the policy learned from traffic:",
                "                  accept/skip rules, apply",
                "?                 this help",
                "q, Ctrl-C         quit",
            ]
            .map(Line::raw)
            .to_vec();
            popup(frame, area, " Keys ", lines, 52);
        }
        Mode::Learn => draw_learn(frame, app, area),
        _ => {}
    }
}

/// The learned-policy view: the proposal's rules with accept/skip marks,
/// the selected rule's comment, what was left out, the keys.
fn draw_learn(frame: &mut Frame, app: &App, area: Rect) {
    let v = &app.learn;
    let bold = Style::new().add_modifier(Modifier::BOLD);
    // The keys first and the status line left visible: a long proposal
    // is cut at the bottom, never its keys or the answer to them.
    let mut lines: Vec<Line> = vec![Line::raw(if v.awaiting_confirm {
        "C: confirm the applied policy (else it reverts)   Esc: close"
    } else {
        "space: accept/skip  a/n: all/none  A: apply (confirm within 120 s)  r: refresh  Esc: close"
    })];
    match (&v.proposal, &v.error) {
        (None, Some(e)) => lines.push(Line::raw(format!("no proposal: {e}"))),
        (None, None) => lines.push(Line::raw("asking the guard…")),
        (Some(p), _) => {
            lines.push(Line::styled(
                format!(
                    "{} rules from {} connection attempts; {} accepted; recording {}",
                    p.rules.len(),
                    p.attempts,
                    v.accepted_count(),
                    p.recording
                ),
                bold,
            ));
            for (i, rule) in p.rules.iter().enumerate() {
                let mark = if v.accepted.get(i).copied().unwrap_or(false) {
                    "[x]"
                } else {
                    "[ ]"
                };
                let text = format!("{mark} {}", rule.toml);
                lines.push(if i == v.selected {
                    Line::styled(text, Style::new().add_modifier(Modifier::REVERSED))
                } else {
                    Line::raw(text)
                });
            }
            if p.rules.is_empty() {
                lines.push(Line::raw("(no rule: nothing that listens got traffic yet)"));
            }
            if let Some(rule) = p.rules.get(v.selected) {
                for c in &rule.comment {
                    lines.push(Line::raw(format!("  # {c}")));
                }
            }
            for l in p.left_out.iter().take(4) {
                lines.push(Line::raw(format!("left out: {l}")));
            }
            if p.left_out.len() > 4 {
                lines.push(Line::raw(format!(
                    "left out: {} more",
                    p.left_out.len() - 4
                )));
            }
        }
    }
    let above_status = Rect {
        height: area.height.saturating_sub(1),
        ..area
    };
    let width = area.width.saturating_sub(4).max(20);
    popup(frame, above_status, " Learned policy ", lines, width);
}

/// A bordered box in the middle of `area`, over what is there.
fn popup(frame: &mut Frame, area: Rect, title: &str, lines: Vec<Line>, width: u16) {
    let width = width.min(area.width);
    let height = (u16::try_from(lines.len()).unwrap_or(u16::MAX) + 2).min(area.height);
    let rect = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(title)),
        rect,
    );
}

fn draw_no_guard(frame: &mut Frame, app: &App, area: Rect) {
    let text = format!(
        "No portwatch guard is running (no control socket at {}). Press w for watch-only mode \
         (listeners only), q to quit.",
        app.socket
    );
    let width = area.width.saturating_sub(4).clamp(1, 72);
    let height = 8.min(area.height);
    let rect = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    let mut lines = vec![
        Line::styled("portwatch top", Style::new().add_modifier(Modifier::BOLD)),
        Line::raw(""),
        Line::raw(text),
    ];
    if let Some((message, true)) = &app.status {
        lines.push(Line::raw(""));
        lines.push(Line::styled(message.clone(), Style::new().fg(Color::Red)));
    }
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: true }), rect);
}

fn draw_header(frame: &mut Frame, app: &App, area: Rect) {
    let width = usize::from(area.width);
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut first = String::new();
    let mut second = String::new();
    match app.feed {
        Feed::Guard => {
            let h = &app.header;
            first.push_str(&format!("  mode {}", h.mode.as_deref().unwrap_or("?")));
            let ifaces = if h.interfaces.is_empty() {
                "-".to_owned()
            } else {
                h.interfaces.join(", ")
            };
            first.push_str(&format!("  xdp {ifaces}"));
            if let Some(verify) = &h.verify {
                first.push_str(&format!("  verify {verify}"));
            }
            first.push_str(&format!("  socket {}", app.socket));
            let count = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), compact);
            second.push_str(&format!("passed {}", count(h.passed)));
            let total: u64 = h.drops.iter().map(|(_, n)| n).sum();
            let reasons: Vec<String> = h
                .drops
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(label, n)| format!("{label} {}", compact(*n)))
                .collect();
            if h.drops.is_empty() {
                second.push_str("  dropped -");
            } else if reasons.is_empty() {
                second.push_str("  dropped 0");
            } else {
                second.push_str(&format!(
                    "  dropped {} ({})",
                    compact(total),
                    reasons.join(", ")
                ));
            }
            second.push_str(&format!("  events lost {}", count(h.events_lost)));
            if !h.owned.is_empty() {
                second.push_str(&format!("  owned: {}", h.owned.join(", ")));
            }
            let (refused, audited) = h.binds;
            if refused + audited > 0 {
                second.push_str(&format!(
                    "  binds by others refused {}, audited {}",
                    compact(refused),
                    compact(audited)
                ));
            }
            if let Some(n) = h.suppressed.filter(|n| *n > 0) {
                second.push_str(&format!("  reports held back {}", compact(n)));
            }
        }
        Feed::WatchOnly => {
            first.push_str("  watch-only: no guard (listeners from `portwatch watch --local`)");
            second.push_str(&format!(
                "no policy, exposure or counters; events lost {}",
                app.stream_lost
            ));
        }
    }
    let mode_style = match app.header.mode.as_deref() {
        Some("audit") => Style::new().fg(Color::Yellow),
        _ => Style::new(),
    };
    let title = "portwatch top";
    let lines = vec![
        Line::from(vec![
            Span::styled(title, bold),
            Span::styled(
                truncate(&first, width.saturating_sub(title.len())),
                mode_style,
            ),
        ]),
        Line::raw(truncate(&second, width)),
    ];
    frame.render_widget(Paragraph::new(lines), area);
}

/// A row's cells, untruncated.
fn cells(app: &App, row: &Row) -> [String; 10] {
    let dash = || "-".to_owned();
    [
        row.key.proto.clone(),
        row.address(),
        row.pid.map_or_else(dash, |p| p.to_string()),
        row.process.clone().unwrap_or_else(dash),
        row.user.clone().unwrap_or_else(dash),
        match (&row.exposure, row.is_owner) {
            (Some(e), Some(true)) => format!("{e}, owner"),
            (Some(e), Some(false)) => format!("{e}, not owner"),
            (Some(e), None) => e.clone(),
            (None, _) => dash(),
        },
        row.passed.map_or_else(dash, compact),
        row.dropped.map_or_else(dash, compact),
        if row.dropped.is_some() {
            rate_text(row.rate)
        } else {
            dash()
        },
        app.last_blocked(row).map_or_else(dash, str::to_owned),
    ]
}

fn draw_table(frame: &mut Frame, app: &App, area: Rect) {
    let rows: Vec<(&Row, [String; 10])> = app.visible().map(|r| (r, cells(app, r))).collect();
    let mut wanted = COLUMNS.each_ref().map(|c| c.title.len() as u16);
    for (_, cells) in &rows {
        for (w, cell) in wanted.iter_mut().zip(cells) {
            *w = (*w).max(u16::try_from(cell.chars().count()).unwrap_or(u16::MAX));
        }
    }
    let widths = column_widths(area.width, &wanted);
    let fit = |i: usize, text: &str| {
        let width = usize::from(widths.get(i).copied().unwrap_or(0));
        // The port says which listener; of a blocked source, the address
        // matters more than its (ephemeral) port.
        let text = if i == 1 {
            truncate_endpoint(text, width)
        } else {
            truncate(text, width)
        };
        if COLUMNS.get(i).is_some_and(|c| c.right) {
            format!("{text:>width$}")
        } else {
            text
        }
    };
    let arrow = if app.reverse { "▼" } else { "▲" };
    let header = TableRow::new(COLUMNS.iter().enumerate().map(|(i, c)| {
        let title = if c.sort.contains(&app.sort) {
            format!("{}{arrow}", c.title)
        } else {
            c.title.to_owned()
        };
        Cell::from(fit(i, &title))
    }))
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let body = rows.iter().map(|(row, cells)| {
        TableRow::new(cells.iter().enumerate().map(|(i, text)| {
            let cell = Cell::from(fit(i, text));
            if i == 5 {
                cell.style(exposure_style(text))
            } else if i == 7 && row.dropped.is_some_and(|d| d > 0) {
                cell.style(Style::new().fg(Color::Red))
            } else {
                cell
            }
        }))
    });
    let mut title = format!(
        " Listeners {} of {}  sort: {}{arrow} ",
        app.visible_len(),
        app.total_len(),
        app.sort.label()
    );
    if !app.filter.is_empty() || app.mode == Mode::Filter {
        title.push_str(&format!(" filter: {} ", app.filter));
    }
    let table = Table::new(body, widths.map(Constraint::Length))
        .header(header)
        .column_spacing(1)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .block(
            Block::new()
                .borders(Borders::TOP)
                .title(truncate(&title, usize::from(area.width))),
        );
    let mut state = TableState::new()
        .with_offset(app.scroll)
        .with_selected(app.selected());
    frame.render_stateful_widget(table, area, &mut state);
    if rows.is_empty() {
        let message = if app.total_len() > 0 {
            "no listener matches the filter (Esc clears it)"
        } else {
            "no listeners yet"
        };
        let inner = Rect {
            y: area.y.saturating_add(2),
            height: area.height.saturating_sub(2).min(1),
            ..area
        };
        frame.render_widget(
            Paragraph::new(message).style(Style::new().add_modifier(Modifier::DIM)),
            inner,
        );
    }
}

fn draw_log(frame: &mut Frame, app: &App, area: Rect) {
    let height = usize::from(area.height.saturating_sub(1));
    let width = usize::from(area.width);
    let skip = app.log.len().saturating_sub(height);
    let lines: Vec<Line> = app
        .log
        .iter()
        .skip(skip)
        .map(|l| {
            let style = match l.kind {
                LogKind::Listen => Style::new().fg(Color::Green),
                LogKind::Close => Style::new().add_modifier(Modifier::DIM),
                LogKind::Drop => Style::new().fg(Color::Red),
                LogKind::Policy => Style::new().fg(Color::Cyan),
                LogKind::Info => Style::new(),
                LogKind::Error => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            };
            Line::styled(truncate(&format!("{} {}", l.time, l.text), width), style)
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::new().borders(Borders::TOP).title(" Events ")),
        area,
    );
}

fn draw_status(frame: &mut Frame, app: &App, area: Rect) {
    let width = usize::from(area.width);
    if app.mode == Mode::Filter {
        let line = Line::from(vec![
            Span::styled("filter: ", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(truncate(
                &format!("{}█", app.filter),
                width.saturating_sub(8),
            )),
            Span::styled(
                "  (Enter keeps, Esc clears)",
                Style::new().add_modifier(Modifier::DIM),
            ),
        ]);
        frame.render_widget(Paragraph::new(line), area);
        return;
    }
    let keys = match app.feed {
        Feed::Guard => "?:help q:quit /:filter s:sort a/d:allow/deny",
        Feed::WatchOnly => "?:help q:quit /:filter s:sort",
    };
    let (message, style) = match &app.status {
        Some((text, true)) => (text.clone(), Style::new().fg(Color::Red)),
        Some((text, false)) => (text.clone(), Style::new()),
        None => (String::new(), Style::new()),
    };
    // The message first; the keys where they still fit.
    let room = width.saturating_sub(keys.len() + 2);
    let line = if message.chars().count() <= room {
        let pad = width.saturating_sub(message.chars().count() + keys.len());
        Line::from(vec![
            Span::styled(message, style),
            Span::raw(" ".repeat(pad)),
            Span::styled(keys, Style::new().add_modifier(Modifier::DIM)),
        ])
    } else {
        Line::styled(truncate(&message, width), style)
    };
    frame.render_widget(Paragraph::new(line), area);
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};
    use serde_json::json;

    use portwatch::{
        control::protocol::StatusResponse,
        sinks::json::{Line, parse_line},
    };

    use super::*;
    use crate::tui::app::App;

    fn line(v: serde_json::Value) -> Line {
        parse_line(&v.to_string()).expect("a stream line")
    }

    fn screen(app: &App, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("test terminal");
        terminal.draw(|f| draw(f, app)).expect("draws");
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .filter_map(|x| buffer.cell((x, y)).map(|c| c.symbol().to_owned()))
                    .collect::<String>()
            })
            .collect()
    }

    fn example() -> App {
        let mut app = App::new("/run/portwatch/control.sock");
        for (port, comm, pid) in [
            (6379, "redis-server", 4_123_456),
            (22, "sshd", 812),
            (8080, "python3", 3001),
        ] {
            app.on_line(
                &line(
                    json!({"ts": "2026-11-25T02:20:00.000000Z", "event": "listen",
                             "origin": "snapshot", "proto": "tcp", "family": "ipv4",
                             "addr": "198.18.200.1", "port": port, "pid": pid,
                             "comm": comm, "uid": 0, "netns": 1, "exposure": "exposed"}),
                ),
                Some("root".into()),
            );
        }
        app.on_line(
            &line(json!({"ts": "2026-11-25T02:21:00.000000Z", "event": "drop",
                         "reason": "no_rule", "proto": "tcp", "src": "198.18.200.2",
                         "src_port": 54321, "dst": "198.18.200.1", "dst_port": 8080,
                         "iface": "pw1s", "audit": false})),
            None,
        );
        let status: StatusResponse = serde_json::from_value(json!({"mode": "enforce",
                    "interfaces": [{"iface": "eth0", "ifindex": 2, "xdp_mode": "native"}],
                    "totals": {"passed": 1234, "drop_no_rule": 17, "drop_source": 0,
                               "drop_malformed": 0, "drop_fragment": 0,
                               "reports_suppressed": 0, "events_lost": 0},
                    "verify": {"at": 0, "trigger": "start", "ok": true, "listeners": 1,
                               "probes": 3, "disagreements": []},
                    "listeners": [{"proto": "tcp", "family": "ipv4", "addr": "198.18.200.1",
                                   "port": 8080, "netns": 1, "exposure": "blocked",
                                   "pass_packets": 0, "drop_packets": 17}]}))
        .expect("a status answer");
        app.on_status(&status, std::time::Instant::now());
        app
    }

    #[test]
    fn renders_at_80x24() {
        let app = example();
        let lines = screen(&app, 80, 24);
        let text = lines.join("\n");
        assert!(
            lines[0].starts_with("portwatch top  mode enforce  xdp eth0 (native)  verify ok"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("passed 1234  dropped 17 (no rule 17)  events lost 0"),
            "{text}"
        );
        assert!(text.contains("Listeners 3 of 3"), "{text}");
        assert!(text.contains("PROTO"), "{text}");
        // Nothing essential cut: the port, exposure and drops of each row.
        let row = lines
            .iter()
            .find(|l| l.contains(":8080"))
            .expect("the 8080 row");
        assert!(row.contains("blocked"), "{row}");
        assert!(row.contains(" 17 "), "{row}");
        assert!(
            row.contains("198.18.200.2"),
            "the last blocked source: {row}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains(":6379") && l.contains("4123456")),
            "{text}"
        );
        // A long process name is cut with an ellipsis.
        assert!(text.contains("redis-…"), "{text}");
        assert!(text.contains("Events"), "{text}");
        assert!(
            text.contains("drop tcp 198.18.200.2:54321 -> 198.18.200.1:8080"),
            "{text}"
        );
        assert!(lines[23].contains("?:help"), "{text}");
        for line in &lines {
            assert_eq!(line.chars().count(), 80);
        }
    }

    #[test]
    fn dialogs_and_screens() {
        let mut app = example();
        app.on_key(ratatui::crossterm::event::KeyEvent::new(
            ratatui::crossterm::event::KeyCode::Char('d'),
            ratatui::crossterm::event::KeyModifiers::NONE,
        ));
        let text = screen(&app, 80, 24).join("\n");
        assert!(text.contains("Deny tcp/22?"), "{text}");
        assert!(text.contains("y / Enter: confirm"), "{text}");

        app.mode = Mode::Help;
        let text = screen(&app, 80, 24).join("\n");
        assert!(text.contains("next sort column"), "{text}");

        app.no_guard();
        let text = screen(&app, 80, 24).join(" ");
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(
            words.join(" "),
            "portwatch top No portwatch guard is running (no control socket at \
             /run/portwatch/control.sock). Press w for watch-only mode (listeners only), q to \
             quit."
        );

        let mut watch = App::new("/x.sock");
        watch.watch_only();
        let text = screen(&watch, 80, 24).join("\n");
        assert!(text.contains("watch-only"), "{text}");
        assert!(text.contains("no listeners yet"), "{text}");
        // Tiny terminals do not panic.
        for (w, h) in [(1, 1), (10, 3), (20, 5), (200, 60)] {
            screen(&example(), w, h);
            screen(&app, w, h);
        }
    }

    #[test]
    fn widths() {
        let wanted = COLUMNS.each_ref().map(|c| c.title.len() as u16);
        let mins: u16 = COLUMNS.iter().map(|c| c.min).sum::<u16>() + 9;
        assert!(mins <= 80, "{mins}");
        assert_eq!(
            column_widths(80, &wanted).iter().sum::<u16>() + 9,
            mins,
            "{wanted:?}"
        );
        let mut wanted = wanted;
        wanted[1] = 40;
        wanted[9] = 40;
        let w = column_widths(80, &wanted);
        assert_eq!(w.iter().sum::<u16>() + 9, 80);
        assert_eq!(w[1], 12 + 80 - mins, "the address grows first");
        let w = column_widths(200, &wanted);
        assert_eq!((w[1], w[9]), (40, 40));
        assert_eq!(
            column_widths(10, &wanted),
            COLUMNS.each_ref().map(|c| c.min)
        );
    }
}
