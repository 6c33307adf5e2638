//! The control socket: steer a running guard.
//!
//! `portwatch guard` listens on a Unix stream socket,
//! `/run/portwatch/control.sock` by default. `portwatch allow`, `deny`,
//! `apply`, `confirm`, `diff`, `policy`, `reload`, `status`, `explain` and
//! `verify` (and
//! `watch`, while a guard runs) are its
//! clients, and so is anything that can write a line to a socket:
//!
//! ```text
//! $ echo '{"cmd":"policy"}' | socat - UNIX-CONNECT:/run/portwatch/control.sock
//! {"ok":true,"toml":"# managed by portwatch; edits are kept\nmode = \"enforce\"\n…"}
//! ```
//!
//! # Who may do what
//!
//! The socket file is mode 0660, in the guard's read group when one is
//! configured. On each connection the guard reads the peer's credentials
//! (`SO_PEERCRED`, as they were at `connect()`):
//!
//! | peer | may use |
//! |---|---|
//! | uid 0, or a process with `CAP_NET_ADMIN` in the guard's user namespace | every command |
//! | a member of the read group (primary or supplementary group) | `policy`, `status`, `subscribe`, `explain`, `verify` |
//! | anyone else | nothing: one error line, then the guard closes the connection |
//!
//! A read-only peer that sends `allow`, `deny`, `apply`, `confirm`, `diff`
//! (it shows whose SSH sessions a policy would cut), `reload` or `shutdown` gets
//! a permission error, and the connection stays usable.
//!
//! # Framing
//!
//! Requests are JSON objects, one per line: UTF-8, ended by `\n`, at most
//! 65,536 bytes without the newline. A connection carries any number of
//! requests; each gets one response line, in order. `subscribe` is the
//! exception: its acknowledgement line is followed by the event stream until
//! either side closes, and nothing else is read on that connection.
//!
//! Every response is a JSON object with `"ok": true`, or `"ok": false` and an
//! `"error"` string that says what went wrong:
//!
//! ```json
//! {"ok":false,"error":"unknown command \"frobnicate\" (expected allow, deny, apply, confirm, diff, policy, reload, status, subscribe, shutdown, explain, verify, learn, record)"}
//! ```
//!
//! # Requests
//!
//! Fields not listed are errors (so is a missing `cmd`).
//!
//! | request | may | answer, besides `"ok": true` |
//! |---|---|---|
//! | `{"cmd":"allow","spec":"tcp/8080"}`, optionally `"from":["10.0.0.0/8","fd00::/8"]` | write | `change`: what changed, e.g. `"allow tcp/8080"`; `policy`: the policy now in force (as for `policy`) |
//! | `{"cmd":"deny","spec":"tcp/8080"}` | write | `change` |
//! | `{"cmd":"apply","policy":"allow = [\"tcp/22\"]\n"}`: a whole policy file's text | write | `change`; the text becomes the policy file, applied as `reload` would |
//! | `{"cmd":"confirm"}` | write | `change`: the change awaiting confirmation is kept |
//! | `{"cmd":"diff","policy":"…"}` | write | `added`, `removed` (rules), `settings` (`"mode enforce -> audit"`), `exposure` (`[{"proto","addr","port","pid","comm","from","to"}]`), `ssh` (sessions it would cut off); nothing is applied |
//! | `{"cmd":"policy"}` | read | `mode`, `file`, `interfaces`, `rules` (`[{"ports":"tcp/22","from":[]}]`) and `toml`: the policy in force, as policy file text |
//! | `{"cmd":"reload"}` | write | `change`: the policy file was read again and applied |
//! | `{"cmd":"status"}` | read | the guard's state, below |
//! | `{"cmd":"subscribe"}`, optionally `"format":"json"` (default) or `"human"`, `"colour":true` | read | an acknowledgement, then one line per event as `portwatch guard` prints them (`--json` for `json`) |
//! | `{"cmd":"explain","spec":"tcp/5432"}`, optionally `"from"`, `"to"` (addresses), `"source_port"`, `"flags":"syn,ack"` (TCP; also `null`, `xmas`) | read | `packet`, `mode`, `verdict` (`{"verdict":"drop","reason":"source_not_allowed"}`: the answer of a test run of that packet through the guard program's read-only twin, against the guard's maps), `outcome`, `rule` (`{"rule","file","line"}`), `reasons`, `predicted`, `agrees`, `pass_packets`, `drop_packets`, `last_drops`, `notes` |
//! | `{"cmd":"verify"}` | read | `rows` (one per listener: `listener`, `predicted`, `observed`, `ok`, `samples`), `interfaces` (guarded interfaces not running the guard's program), `probes`, `disagreements`; the last result also appears in `status` as `verify` |
//! | `{"cmd":"shutdown"}`, optionally `"detach":true` | write | the guard stops; its pinned datapath keeps enforcing, unless `detach` (what `portwatch down` sends): then it detaches and unpins everything |
//!
//! `allow`, `deny` and `apply` take `"force":true` (apply even if it cuts
//! off an SSH session) and `"confirm_within":SECONDS`: the change reverts
//! (file and kernel maps) unless `confirm` follows in time; while it waits,
//! other changes are refused. A guard that stops meanwhile reverts it, and
//! so does the next guard that starts (the file `POLICY.pending` records it).
//!
//! `spec` is `tcp/PORT`, `udp/PORT` or `tcp/LO-HI`, as in the policy file.
//! The status answer (clients render what is there and ignore what is not):
//!
//! ```json
//! {"ok":true,"mode":"enforce","policy_file":"/etc/portwatch/policy.toml","pinned":true,
//!  "interfaces":[{"iface":"eth0","ifindex":2,"xdp_mode":"native"}],
//!  "totals":{"passed":1,"drop_no_rule":2,"drop_source":0,"drop_malformed":0,
//!            "drop_fragment":0,"reports_suppressed":0,"events_lost":0},
//!  "listeners":[{"proto":"tcp","family":"ipv4","addr":"0.0.0.0","port":22,"pid":812,
//!                "comm":"sshd","uid":0,"exe":"/usr/sbin/sshd","cmdline":"sshd -D",
//!                "netns":4026531833,"exposure":"exposed","pass_packets":10,
//!                "pass_bytes":900,"drop_packets":0,"drop_bytes":0}]}
//! ```
//!
//! # Limits
//!
//! - A line that is not a request gets an error; the connection stays
//!   usable.
//! - A line over 65,536 bytes gets an error, then the connection is closed
//!   (where the next request starts is unknown). No connection buffers more
//!   than that.
//! - At most 64 connections at once; one more gets an error and is closed.
//! - A connection that sends nothing for 120 s while a request is awaited
//!   is closed.
//! - A subscriber that does not keep up with its stream is not waited for:
//!   the guard ends its stream (the connection closes).
//!
//! # Modules
//!
//! [`protocol`]: requests and their decoding; [`server`]: the socket in the
//! guard, which hands each request to the task that owns the guard's state;
//! [`client`]: the other end, used by the binary's client commands. The
//! server and client are tested together in `portwatch/tests/control.rs`.

pub mod client;
pub mod inspect;
pub mod protocol;
pub mod server;

pub use protocol::{Format, Request};
pub use server::DEFAULT_SOCKET;
