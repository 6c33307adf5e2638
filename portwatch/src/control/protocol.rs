//! The control protocol's requests, and how a line becomes one.
//!
//! The format is described in the module documentation of
//! [`crate::control`]. Decoding never panics, whatever the bytes: every
//! malformed line becomes a [`ProtocolError`] whose message names the
//! problem, and the server sends it back as `{"ok":false,"error":…}`.

use serde::{Deserialize, Serialize};

/// The longest request line accepted, in bytes, without its newline.
pub const MAX_LINE: usize = 64 * 1024;

/// The command names, in the order the documentation lists them.
pub const COMMANDS: &[&str] = &[
    "allow",
    "deny",
    "policy",
    "reload",
    "status",
    "subscribe",
    "shutdown",
];

/// What a subscriber receives: JSON Lines (as `guard --json` prints) or
/// aligned text (as `guard` prints on a terminal).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Json,
    Human,
}

/// One request, as sent on the wire: `{"cmd":"allow","spec":"tcp/8080"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Permit `spec` (`tcp/PORT`, `udp/PORT`, `tcp/LO-HI`), from the
    /// networks in `from` (addresses or CIDRs), or from anywhere when empty.
    Allow {
        spec: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        from: Vec<String>,
    },
    /// Stop permitting `spec`; rules that reach past it keep the rest.
    Deny { spec: String },
    /// The policy in force.
    Policy,
    /// Read the policy file again and apply it.
    Reload,
    /// Mode, interfaces, counters and listeners with their exposure.
    Status,
    /// The guard's event stream, from now on.
    Subscribe {
        #[serde(default)]
        format: Format,
        #[serde(default)]
        colour: bool,
    },
    /// Stop the guard; `detach` leaves its kernel programs in place.
    Shutdown {
        #[serde(default)]
        detach: bool,
    },
}

impl Request {
    /// The command's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Allow { .. } => "allow",
            Request::Deny { .. } => "deny",
            Request::Policy => "policy",
            Request::Reload => "reload",
            Request::Status => "status",
            Request::Subscribe { .. } => "subscribe",
            Request::Shutdown { .. } => "shutdown",
        }
    }

    /// Whether the command changes the guard (and so needs root or
    /// CAP_NET_ADMIN, not only membership in the read group).
    pub fn needs_write(&self) -> bool {
        match self {
            Request::Allow { .. }
            | Request::Deny { .. }
            | Request::Reload
            | Request::Shutdown { .. } => true,
            Request::Policy | Request::Status | Request::Subscribe { .. } => false,
        }
    }

    /// The request as one line, newline included.
    pub fn to_line(&self) -> String {
        // Serializing this enum cannot fail: every field is a string, a
        // bool or a list of strings.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }
}

/// Why a line is not a request. The messages go back to the client as they
/// are, so each one names the problem.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("request too large: {len} bytes (the limit is {MAX_LINE} bytes per line)")]
    TooLarge { len: usize },

    #[error("request is not UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },

    #[error("empty request: send one JSON object per line, e.g. {{\"cmd\":\"status\"}}")]
    Empty,

    #[error("request is not JSON: {0}")]
    NotJson(String),

    #[error("request is not a JSON object: send one per line, e.g. {{\"cmd\":\"status\"}}")]
    NotObject,

    #[error("request has no \"cmd\" field (expected one of {})", COMMANDS.join(", "))]
    MissingCommand,

    #[error("\"cmd\" must be a string (expected one of {})", COMMANDS.join(", "))]
    CommandNotString,

    #[error("unknown command {0:?} (expected {list})", list = COMMANDS.join(", "))]
    UnknownCommand(String),

    /// A known command with a missing, unknown or mistyped field.
    #[error("bad {cmd:?} request: {message}")]
    BadFields { cmd: String, message: String },
}

/// Decodes one request line (a trailing `\n` or `\r\n` is allowed).
pub fn decode_request(line: &[u8]) -> Result<Request, ProtocolError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_LINE {
        return Err(ProtocolError::TooLarge { len: line.len() });
    }
    let text = std::str::from_utf8(line).map_err(|e| ProtocolError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    if text.trim().is_empty() {
        return Err(ProtocolError::Empty);
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ProtocolError::NotJson(e.to_string()))?;
    let serde_json::Value::Object(fields) = &value else {
        return Err(ProtocolError::NotObject);
    };
    let cmd = match fields.get("cmd") {
        None => return Err(ProtocolError::MissingCommand),
        Some(serde_json::Value::String(cmd)) => cmd.clone(),
        Some(_) => return Err(ProtocolError::CommandNotString),
    };
    if !COMMANDS.contains(&cmd.as_str()) {
        return Err(ProtocolError::UnknownCommand(cmd));
    }
    let bad = |message: String| ProtocolError::BadFields {
        cmd: cmd.clone(),
        message,
    };
    // serde ignores extra fields of unit variants in an internally tagged
    // enum, whatever `deny_unknown_fields` says: checked here.
    if matches!(cmd.as_str(), "policy" | "reload" | "status")
        && let Some(extra) = fields.keys().find(|k| *k != "cmd")
    {
        return Err(bad(format!("unknown field `{extra}`, there are no fields")));
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

/// `{"ok":false,"error":msg}`.
pub fn error_response(msg: &str) -> serde_json::Value {
    serde_json::json!({ "ok": false, "error": msg })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Result<Request, String> {
        decode_request(s.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn every_command_decodes() {
        let cases = [
            (
                r#"{"cmd":"allow","spec":"tcp/8080"}"#,
                Request::Allow {
                    spec: "tcp/8080".into(),
                    from: vec![],
                },
            ),
            (
                r#"{"cmd":"allow","spec":"tcp/5432","from":["10.0.0.0/8","fd00::/8"]}"#,
                Request::Allow {
                    spec: "tcp/5432".into(),
                    from: vec!["10.0.0.0/8".into(), "fd00::/8".into()],
                },
            ),
            (
                r#"{"spec":"udp/53","cmd":"deny"}"#,
                Request::Deny {
                    spec: "udp/53".into(),
                },
            ),
            (r#"{"cmd":"policy"}"#, Request::Policy),
            (r#"{"cmd":"reload"}"#, Request::Reload),
            (" {\"cmd\":\"status\"} \r\n", Request::Status),
            (
                r#"{"cmd":"subscribe"}"#,
                Request::Subscribe {
                    format: Format::Json,
                    colour: false,
                },
            ),
            (
                r#"{"cmd":"subscribe","format":"human","colour":true}"#,
                Request::Subscribe {
                    format: Format::Human,
                    colour: true,
                },
            ),
            (r#"{"cmd":"shutdown"}"#, Request::Shutdown { detach: false }),
            (
                r#"{"cmd":"shutdown","detach":true}"#,
                Request::Shutdown { detach: true },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(decode(line), Ok(want.clone()), "{line}");
            // What the client sends decodes to what it meant.
            assert_eq!(decode(&want.to_line()), Ok(want.clone()), "{want:?}");
            assert_eq!(COMMANDS.iter().filter(|c| **c == want.name()).count(), 1);
        }
    }

    #[test]
    fn write_commands() {
        let writes: Vec<&str> = [
            Request::Allow {
                spec: String::new(),
                from: vec![],
            },
            Request::Deny {
                spec: String::new(),
            },
            Request::Policy,
            Request::Reload,
            Request::Status,
            Request::Subscribe {
                format: Format::Json,
                colour: false,
            },
            Request::Shutdown { detach: false },
        ]
        .iter()
        .filter(|r| r.needs_write())
        .map(Request::name)
        .collect();
        assert_eq!(writes, ["allow", "deny", "reload", "shutdown"]);
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (
                r#"{"cmd":"frobnicate"}"#,
                r#"unknown command "frobnicate" (expected allow, deny, policy, reload, status, subscribe, shutdown)"#,
            ),
            (
                r#"{"cmd":"Status"}"#,
                r#"unknown command "Status" (expected allow, deny, policy, reload, status, subscribe, shutdown)"#,
            ),
            (
                r#"{"spec":"tcp/1"}"#,
                r#"request has no "cmd" field (expected one of allow, deny, policy, reload, status, subscribe, shutdown)"#,
            ),
            (
                r#"{"cmd":7}"#,
                r#""cmd" must be a string (expected one of allow, deny, policy, reload, status, subscribe, shutdown)"#,
            ),
            (
                r#"{"cmd":"allow"}"#,
                r#"bad "allow" request: missing field `spec`"#,
            ),
            (
                r#"{"cmd":"deny","spec":"tcp/1","from":[]}"#,
                r#"bad "deny" request: unknown field `from`, expected `spec`"#,
            ),
            (
                r#"{"cmd":"status","verbose":true}"#,
                r#"bad "status" request: unknown field `verbose`, there are no fields"#,
            ),
            (
                r#"{"cmd":"allow","spec":22}"#,
                r#"bad "allow" request: invalid type: integer `22`, expected a string"#,
            ),
            (
                r#"{"cmd":"subscribe","format":"xml"}"#,
                r#"bad "subscribe" request: unknown variant `xml`, expected `json` or `human`"#,
            ),
            (
                r#"{"cmd":"status""#,
                "request is not JSON: EOF while parsing an object at line 1 column 15",
            ),
            (
                "status",
                "request is not JSON: expected value at line 1 column 1",
            ),
            (
                r#"["status"]"#,
                r#"request is not a JSON object: send one per line, e.g. {"cmd":"status"}"#,
            ),
            (
                "",
                r#"empty request: send one JSON object per line, e.g. {"cmd":"status"}"#,
            ),
            (
                r#"{"cmd":"status"} {"cmd":"status"}"#,
                "request is not JSON: trailing characters at line 1 column 18",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(decode(line), Err(want.to_owned()), "{line}");
        }
    }

    #[test]
    fn not_utf8() {
        assert_eq!(
            decode_request(b"{\"cmd\":\"st\xffatus\"}").map_err(|e| e.to_string()),
            Err("request is not UTF-8 (invalid byte at offset 10)".to_owned())
        );
    }

    #[test]
    fn size_limit() {
        // Exactly the limit is fine (padded with JSON whitespace).
        let cmd = r#"{"cmd":"status"}"#;
        let mut line = cmd.to_owned();
        line.push_str(&" ".repeat(MAX_LINE - cmd.len()));
        assert_eq!(line.len(), MAX_LINE);
        assert_eq!(decode(&format!("{line}\n")), Ok(Request::Status));
        line.push(' ');
        assert_eq!(
            decode(&line),
            Err("request too large: 65537 bytes (the limit is 65536 bytes per line)".to_owned())
        );
    }

    #[test]
    fn error_response_shape() {
        assert_eq!(
            error_response("no \"x\"").to_string(),
            r#"{"error":"no \"x\"","ok":false}"#
        );
    }

    /// Random bytes, and random mixes of request fragments: never a panic.
    #[test]
    fn random_lines_never_panic() {
        const PIECES: &[&[u8]] = &[
            b"{",
            b"}",
            b"\"cmd\"",
            b":",
            b",",
            b"\"allow\"",
            b"\"status\"",
            b"\"spec\"",
            b"\"tcp/22\"",
            b"[",
            b"]",
            b"\"from\"",
            b"true",
            b"null",
            b"1e999",
            b"\xff",
            b"\\u0000",
            b"\"",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut decoded = 0;
        for i in 0..1_000 {
            let len = usize::try_from(next() % 200).unwrap_or(0);
            let line: Vec<u8> = if i % 2 == 0 {
                (0..len).map(|_| next().to_le_bytes()[0]).collect()
            } else {
                (0..len / 4)
                    .flat_map(|_| {
                        let n = usize::try_from(next() % PIECES.len() as u64).unwrap_or(0);
                        PIECES.get(n).copied().unwrap_or(b"")
                    })
                    .copied()
                    .collect()
            };
            match decode_request(&line) {
                Ok(_) => decoded += 1,
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
        // Deeply nested input stops at serde_json's recursion limit.
        let deep = "[".repeat(100_000);
        assert!(decode(&deep).is_err() || deep.len() > MAX_LINE);
        let deep = "[".repeat(MAX_LINE);
        assert!(decode(&deep).is_err());
        assert!(decoded < 1_000);
    }
}
