//! The owner of the guard's maps: the only code that changes them at run
//! time. Control-socket requests and SIGHUP arrive here as typed requests;
//! a change is validated, written to the policy file (atomically), then
//! applied to the maps (openings before closings), and announced in the
//! stream. If the file cannot be written, the maps are not touched.

use std::{path::PathBuf, time::SystemTime};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{
    commands::write_atomically,
    compile::compile,
    control::{
        protocol::{Format, Request},
        server::{Peer, Reply},
    },
    guard::{attach::Attached, exposure_of, links::LinkChange, pins::PinDir},
    maps::MapImage,
    model::{Event, EventKind, ListenerEvent, Origin, PolicyEvent},
    policy::{Mode, Policy, PortRange, Rule},
    sinks::{SharedBuf, Sink, human::HumanSink, json::JsonSink},
    stream::Stream,
};

/// A client of the control socket that follows the stream.
pub struct Subscriber {
    sink: Box<dyn Sink>,
    buf: SharedBuf,
    tx: mpsc::Sender<String>,
}

impl Subscriber {
    /// Renders `event` for this subscriber; false once it is gone or too
    /// slow (its queue full), so the owner drops it rather than wait.
    pub fn send(&mut self, event: &Event) -> bool {
        if self.sink.event(event).is_err() {
            return false;
        }
        let bytes = self.buf.take();
        if bytes.is_empty() {
            return true;
        }
        self.tx
            .try_send(String::from_utf8_lossy(&bytes).into_owned())
            .is_ok()
    }
}

/// What the guard was started with, for reloads.
#[derive(Clone, Debug)]
pub struct StartArgs {
    pub policy_path: PathBuf,
    pub allow: Vec<String>,
    pub mode: Option<Mode>,
}

/// Runtime state of the guard the owner keeps next to the maps.
pub struct GuardState {
    pub start: StartArgs,
    pub mode: Mode,
    pub image: MapImage,
    pub attached: Vec<Attached>,
    pub pin_dir: Option<PathBuf>,
    /// The interfaces to guard and the XDP mode asked for, to re-attach an
    /// interface that comes back.
    pub ifaces: Vec<String>,
    pub xdp_mode: crate::guard::attach::XdpModeArg,
    pub subscribers: Vec<Subscriber>,
    /// Set by a `shutdown` request: (requested, detach).
    pub shutdown: Option<bool>,
}

fn ok(mut v: Value) -> Value {
    if let Some(obj) = v.as_object_mut() {
        obj.insert("ok".into(), Value::Bool(true));
    }
    v
}

fn err(msg: impl Into<String>) -> Value {
    json!({"ok": false, "error": msg.into()})
}

impl Stream {
    /// Follows a guarded interface going away (its program went with it)
    /// and coming back (attach again, at once).
    pub fn on_link_change(&mut self, datapath: &mut crate::loader::Datapath, change: LinkChange) {
        let Some(g) = self.guard.as_mut() else {
            return;
        };
        let (name, index, up) = match &change {
            LinkChange::Up { name, index } => (name.clone(), *index, true),
            LinkChange::Gone { name, index } => (name.clone(), *index, false),
        };
        if !g.state.ifaces.contains(&name) {
            return;
        }
        let attached_here = g
            .state
            .attached
            .iter()
            .any(|a| a.iface == name && a.ifindex == index);
        if up && attached_here {
            return; // a flag change of an interface already guarded
        }
        let Some(pin_dir) = g.state.pin_dir.clone() else {
            return;
        };
        let pins = PinDir::new(&pin_dir);
        let was_attached = g.state.attached.iter().any(|a| a.iface == name);
        if was_attached {
            // Gone, or back under a new index: the old links are defunct.
            pins.detach(&name);
            g.state.attached.retain(|a| a.iface != name);
            g.ifnames.retain(|_, n| *n != name);
            if !up {
                log::warn!("{name} was removed: the guard is off there until it comes back");
                let _ = self.emit(Event::Interface {
                    ts: SystemTime::now(),
                    iface: name.clone(),
                    change: "removed".into(),
                    xdp_mode: None,
                });
                let _ = self.flush();
                return;
            }
        }
        if !up {
            return;
        }
        let mode = g.state.xdp_mode;
        let event = match datapath.attach_guard(&pins, &name, mode) {
            Ok(attached) => {
                log::info!(
                    "{name} is back: guard re-attached ({} XDP)",
                    attached.xdp_mode
                );
                g.ifnames.insert(attached.ifindex, attached.iface.clone());
                let xdp_mode = attached.xdp_mode;
                g.state.attached.push(attached);
                Event::Interface {
                    ts: SystemTime::now(),
                    iface: name,
                    change: "attached".into(),
                    xdp_mode: Some(xdp_mode),
                }
            }
            Err(e) => {
                log::error!("{name} is back but attaching the guard failed: {e}");
                Event::Interface {
                    ts: SystemTime::now(),
                    iface: name,
                    change: format!("attach failed: {e}"),
                    xdp_mode: None,
                }
            }
        };
        let _ = self.emit(event);
        let _ = self.flush();
    }

    /// Answers one control request.
    pub fn handle_control(&mut self, peer: &Peer, request: Request, events_lost: u64) -> Reply {
        let by = (Some(peer.uid), Some(peer.pid));
        Reply::Once(match request {
            Request::Allow { spec, from } => self.allow(&spec, &from, by),
            Request::Deny { spec } => self.deny(&spec, by),
            Request::Policy => self.policy_view(),
            Request::Reload => self.reload(by),
            Request::Status => self.status(events_lost),
            Request::Subscribe { format, colour } => return self.subscribe(format, colour),
            Request::Shutdown { detach } => {
                if let Some(g) = self.guard.as_mut() {
                    g.state.shutdown = Some(detach);
                }
                ok(
                    json!({"change": if detach { "shutdown, detaching" } else { "shutdown, enforcement stays" }}),
                )
            }
        })
    }

    /// SIGHUP: a reload on behalf of whoever sent the signal.
    pub fn reload_on_signal(&mut self) -> Reply {
        Reply::Once(self.reload((None, None)))
    }

    fn allow(&mut self, spec: &str, from: &[String], by: (Option<u32>, Option<u32>)) -> Value {
        let Some(guard) = self.guard.as_ref() else {
            return err("no guard");
        };
        let ports = match PortRange::parse(spec) {
            Ok(p) => p,
            Err(e) => return err(e.to_string()),
        };
        let mut nets = Vec::new();
        for cidr in from {
            match cidr
                .parse::<ipnet::IpNet>()
                .or_else(|_| cidr.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            {
                Ok(net) if net.trunc() == net => nets.push(net),
                Ok(net) => {
                    return err(format!(
                        "{cidr} has host bits set (did you mean {}?)",
                        net.trunc()
                    ));
                }
                Err(_) => return err(format!("{cidr:?} is not an address or CIDR")),
            }
        }
        let mut policy = guard.policy.clone();
        let rule = Rule {
            ports,
            from: nets,
            line: None,
        };
        let change = format!("allow {rule}");
        if let Err(e) = policy.add_rule(rule) {
            return err(e.to_string());
        }
        self.commit(policy, None, change, by, true)
    }

    fn deny(&mut self, spec: &str, by: (Option<u32>, Option<u32>)) -> Value {
        let Some(guard) = self.guard.as_ref() else {
            return err("no guard");
        };
        let ports = match PortRange::parse(spec) {
            Ok(p) => p,
            Err(e) => return err(e.to_string()),
        };
        let mut policy = guard.policy.clone();
        if let Err(e) = policy.remove_port(ports) {
            return err(e.to_string());
        }
        self.commit(policy, None, format!("deny {ports}"), by, true)
    }

    fn reload(&mut self, by: (Option<u32>, Option<u32>)) -> Value {
        let Some(guard) = self.guard.as_ref() else {
            return err("no guard");
        };
        let start = guard.state.start.clone();
        let policy = match crate::guard::effective_policy(Some(&start.policy_path), &start.allow) {
            Ok(p) => p,
            Err(e) => return err(format!("{e:#}; the policy in force is unchanged")),
        };
        let mode = start.mode.or(policy.mode).unwrap_or(guard.state.mode);
        self.commit(policy, Some(mode), "reload".into(), by, false)
    }

    /// Validates, persists (unless a reload), applies and announces.
    fn commit(
        &mut self,
        policy: Policy,
        mode: Option<Mode>,
        change: String,
        by: (Option<u32>, Option<u32>),
        persist: bool,
    ) -> Value {
        let Some(guard) = self.guard.as_mut() else {
            return err("no guard");
        };
        let image = match compile(&policy) {
            Ok(image) => image,
            Err(e) => return err(e.to_string()),
        };
        let path = guard.state.start.policy_path.clone();
        if persist {
            // Keep the file's mode and interfaces: only the rules change here.
            let mut on_disk = policy.clone();
            on_disk.mode = guard.policy.mode;
            on_disk.interfaces = guard.policy.interfaces.clone();
            if let Err(e) = write_atomically(&path, &on_disk.to_toml()) {
                return err(format!(
                    "cannot write the policy file {}: {e}; nothing changed (neither the file nor the kernel maps)",
                    path.display()
                ));
            }
        }
        let old = std::mem::take(&mut guard.state.image);
        if let Err(e) = guard.maps.apply(&old, &image) {
            // Best effort back to where we were, file included.
            let _ = guard.maps.apply(&image, &old);
            guard.state.image = old;
            if persist {
                let _ = write_atomically(&path, &guard.policy.to_toml());
            }
            return err(format!(
                "updating the kernel maps failed: {e}; the previous policy stays in force"
            ));
        }
        guard.state.image = image;
        if let Some(mode) = mode
            && mode != guard.state.mode
        {
            let mut config = match guard.maps.config() {
                Ok(c) => c,
                Err(e) => return err(e.to_string()),
            };
            config.flags = if mode == Mode::Audit {
                portwatch_common::GUARD_AUDIT
            } else {
                0
            };
            if let Err(e) = guard.maps.set_config(config) {
                return err(e.to_string());
            }
            guard.state.mode = mode;
        }
        guard.policy = policy;
        let event = PolicyEvent {
            ts: SystemTime::now(),
            change: change.clone(),
            by_uid: by.0,
            by_pid: by.1,
            mode: guard.state.mode,
            rules: guard.policy.rules.len(),
        };
        let view = policy_json(&guard.policy, guard.state.mode, &path);
        let _ = self.emit(Event::Policy(event));
        let _ = self.flush();
        ok(json!({"change": change, "policy": view}))
    }

    fn policy_view(&self) -> Value {
        match self.guard.as_ref() {
            Some(g) => ok(policy_json(
                &g.policy,
                g.state.mode,
                &g.state.start.policy_path,
            )),
            None => err("no guard"),
        }
    }

    fn status(&self, events_lost: u64) -> Value {
        let Some(g) = self.guard.as_ref() else {
            return err("no guard");
        };
        let counters = g.maps.port_counters();
        let totals = g.maps.totals();
        use portwatch_common::GuardStat as S;
        let mut listeners: Vec<Value> = self
            .listeners
            .iter()
            .filter(|l| l.netns == g.netns)
            .map(|l| {
                let proto = crate::compile::proto_number(l.proto);
                let c = counters
                    .get(&portwatch_common::counter_key(proto, l.port))
                    .copied()
                    .unwrap_or_default();
                let p = &l.process;
                json!({
                    "proto": l.proto, "family": l.family(), "addr": l.addr.to_string(), "port": l.port,
                    "pid": p.pid, "comm": p.comm, "uid": p.uid, "exe": p.exe, "cmdline": p.cmdline,
                    "netns": l.netns, "exposure": exposure_of(&g.policy, l),
                    "pass_packets": c.pass_packets, "pass_bytes": c.pass_bytes,
                    "drop_packets": c.drop_packets, "drop_bytes": c.drop_bytes,
                })
            })
            .collect();
        listeners.sort_by_key(|v| {
            (
                v["proto"].to_string(),
                v["port"].as_u64(),
                v["addr"].to_string(),
            )
        });
        ok(json!({
            "mode": g.state.mode,
            "policy_file": g.state.start.policy_path.display().to_string(),
            "pinned": g.state.pin_dir.as_ref().map(|p| p.display().to_string()),
            "interfaces": g.state.attached,
            "totals": {
                "passed": totals.get(S::Passed),
                "drop_no_rule": totals.get(S::DropNoRule),
                "drop_source": totals.get(S::DropSource),
                "drop_malformed": totals.get(S::DropMalformed),
                "drop_fragment": totals.get(S::DropFragment),
                "reports_suppressed": totals.get(S::ReportsSuppressed),
                "reports_lost": totals.get(S::ReportsLost),
                "flow_replies": totals.get(S::FlowReplies),
                "events_lost": events_lost,
            },
            "listeners": listeners,
        }))
    }

    fn subscribe(&mut self, format: Format, colour: bool) -> Reply {
        let Some(g) = self.guard.as_mut() else {
            return Reply::Once(err("no guard"));
        };
        let buf = SharedBuf::default();
        let sink: Box<dyn Sink> = match format {
            Format::Json => Box::new(JsonSink::new(buf.clone())),
            Format::Human => Box::new(HumanSink::new(buf.clone(), colour, g.netns)),
        };
        // Bounded: a subscriber that cannot keep up is dropped, never waited for.
        let (tx, rx) = mpsc::channel(4096);
        let mut subscriber = Subscriber { sink, buf, tx };
        // It starts, like `watch`, with what listens now.
        let now = SystemTime::now();
        let mut sent = 0;
        for l in self.listeners.iter() {
            let exposure = (l.netns == g.netns).then(|| exposure_of(&g.policy, l));
            subscriber.send(&Event::Listener(ListenerEvent {
                ts: now,
                kind: EventKind::Listen,
                origin: Origin::Snapshot,
                listener: l.clone(),
                exposure,
            }));
            sent += 1;
        }
        subscriber.send(&Event::Ready {
            ts: now,
            snapshot: sent,
        });
        g.state.subscribers.push(subscriber);
        Reply::Stream {
            ack: ok(json!({"subscribed": true})),
            lines: rx,
        }
    }
}

fn policy_json(policy: &Policy, mode: Mode, path: &std::path::Path) -> Value {
    let rules: Vec<Value> = policy
        .rules
        .iter()
        .map(|r| json!({"ports": r.ports.to_string(), "from": r.from.iter().map(|n| n.to_string()).collect::<Vec<_>>()}))
        .collect();
    json!({
        "mode": mode,
        "file": path.display().to_string(),
        "interfaces": policy.interfaces,
        "rules": rules,
        "toml": policy.to_toml(),
    })
}
