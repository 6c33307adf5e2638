//! `--log-format text|json`: how diagnostics (and, with json, the event
//! stream) are written.
//!
//! With json, stderr carries everything, one JSON object per line: the
//! events in the schema of `--json`, and the log records as
//! `{"ts","level","target","message"}`; stdout carries nothing. Under
//! systemd both streams land in the journal, interleaved: a human table on
//! stdout next to JSON on stderr would give a shipper two formats to tell
//! apart line by line, so json means one stream, one format.

use std::{
    io::{self, Write},
    time::SystemTime,
};

use portwatch::{
    format::rfc3339_micros,
    procinfo,
    sinks::{
        Sink, WholeLines,
        human::{HumanSink, terminal_width},
        json::JsonSink,
    },
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable log lines; events on stdout.
    #[default]
    Text,
    /// One JSON object per line on stderr, events and log records alike.
    Json,
}

/// A log record as written; the fields in this order, `ts` first as in the
/// event lines.
#[derive(serde::Serialize)]
struct Record<'a> {
    ts: String,
    level: &'static str,
    target: &'a str,
    message: &'a str,
}

fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "error",
        log::Level::Warn => "warn",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace",
    }
}

/// One log record as a JSON line (without the newline).
pub fn json_record(ts: SystemTime, level: log::Level, target: &str, message: &str) -> String {
    let record = Record {
        ts: rfc3339_micros(ts),
        level: level_name(level),
        target,
        message,
    };
    // Strings and a &'static str only: serializing cannot fail.
    serde_json::to_string(&record).unwrap_or_default()
}

/// Sets up env_logger (RUST_LOG, default `info`) in the chosen format.
pub fn init(format: LogFormat) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    match format {
        LogFormat::Text => {
            builder.format_timestamp(None);
        }
        LogFormat::Json => {
            builder.format(|buf, record| {
                let line = json_record(
                    SystemTime::now(),
                    record.level(),
                    record.target(),
                    &record.args().to_string(),
                );
                writeln!(buf, "{line}")
            });
        }
    }
    builder.init();
}

/// The last word of a failed run, in the chosen format.
pub fn report_error(format: LogFormat, error: &anyhow::Error) {
    match format {
        LogFormat::Text => eprintln!("portwatch: error: {error:#}"),
        LogFormat::Json => eprintln!(
            "{}",
            json_record(
                SystemTime::now(),
                log::Level::Error,
                "portwatch",
                &format!("{error:#}")
            )
        ),
    }
}

/// The event sink: stdout, as text for people or `--json`; with json logs
/// the JSON sink on stderr.
pub fn event_sink(json: bool, format: LogFormat) -> Box<dyn Sink> {
    if format == LogFormat::Json {
        return Box::new(JsonSink::new(WholeLines::new(io::stderr())));
    }
    let stdout = crate::terminal::stream_stdout();
    if json {
        Box::new(JsonSink::new(stdout))
    } else {
        Box::new(
            HumanSink::new(
                stdout,
                crate::terminal::colour_wanted(),
                procinfo::netns_of(std::process::id()),
            )
            .with_width(terminal_width()),
        )
    }
}

/// `--json` and `--log-format json` both claim the events: refuse the pair.
pub fn check_flags(json: bool, format: LogFormat) -> anyhow::Result<()> {
    if json && format == LogFormat::Json {
        anyhow::bail!(
            "--json writes events to stdout and --log-format json writes them to stderr: choose one"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn a_record_is_one_json_object_with_four_fields() -> Result<(), serde_json::Error> {
        let ts = UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456);
        let line = json_record(
            ts,
            log::Level::Warn,
            "portwatch::guard",
            "eth0: \"quoted\"\nand a second line",
        );
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line)?;
        assert_eq!(v["ts"], "2026-11-18T11:06:40.123456Z");
        assert_eq!(v["level"], "warn");
        assert_eq!(v["target"], "portwatch::guard");
        assert_eq!(v["message"], "eth0: \"quoted\"\nand a second line");
        assert_eq!(v.as_object().map(|o| o.len()), Some(4));
        assert!(line.starts_with("{\"ts\":"), "{line}");
        Ok(())
    }

    #[test]
    fn json_and_json_logs_together_are_refused() {
        assert!(check_flags(true, LogFormat::Json).is_err());
        assert!(check_flags(true, LogFormat::Text).is_ok());
        assert!(check_flags(false, LogFormat::Json).is_ok());
    }
}
