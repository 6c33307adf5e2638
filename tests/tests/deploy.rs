//! The deployment material in `deploy/`, checked with the tools that consume
//! it: promtool for the alert rules, kubernetes-validate for the Kubernetes
//! manifest, ansible-playbook for the fleet rollout, and portwatch itself
//! for every policy they carry. No kernel programs are loaded here.
//!
//! The tools come from `cargo xtask setup`: ansible-playbook from Debian,
//! promtool and a virtualenv with kubernetes-validate under `target/tools/`
//! (xtask/src/deploy_tools.rs; keep the paths in step).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use portwatch::{
    control::protocol::{ChangeResponse, PolicyView, Request, Response, decode_request},
    datapath::maps::GuardTotals,
    metrics::{self, GuardSnapshot, PortLabel, Snapshot, Tally},
    model::{AttachedMode, Mode, Proto},
    policy::Policy,
};
use portwatch_common::{GUARD_STATS_LEN, GuardStat, PortCounters};
use portwatch_tests::{portwatch_bin, unique_name};
use serde_json::{Value, json};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn deploy(rel: &str) -> PathBuf {
    Path::new(ROOT).join("deploy").join(rel)
}

/// A tool `cargo xtask setup` installs; a missing one fails the test with
/// what to do (tests never skip).
fn tool(path: PathBuf) -> PathBuf {
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask setup`, which installs the tools the deploy/ checks use",
        path.display()
    );
    path
}

fn promtool() -> PathBuf {
    tool(Path::new(ROOT).join("target/tools/prometheus/promtool"))
}

fn venv_bin(name: &str) -> PathBuf {
    tool(Path::new(ROOT).join("target/tools/venv/bin").join(name))
}

fn ansible_playbook() -> PathBuf {
    tool(PathBuf::from("/usr/bin/ansible-playbook"))
}

/// Runs `cmd`, returning its output whatever the exit status.
fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` and fails the test unless it succeeds; returns stdout+stderr.
fn succeeds(cmd: &mut Command) -> String {
    let out = output(cmd);
    let all = text(&out);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{all}",
        out.status
    );
    all
}

/// Runs `cmd` and fails the test unless it fails; returns stdout+stderr.
fn fails(cmd: &mut Command) -> String {
    let out = output(cmd);
    let all = text(&out);
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded, expected a failure:\n{all}"
    );
    all
}

/// A directory removed with everything in it when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&dir).expect("creating a temporary directory");
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every document of a YAML file, as JSON (PyYAML from the tools venv).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let out = output(
        Command::new(venv_bin("python"))
            .args([
                "-c",
                "import json, sys, yaml\n\
                 json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
            ])
            .arg(path),
    );
    assert!(
        out.status.success(),
        "{} is not YAML:\n{}",
        path.display(),
        text(&out)
    );
    serde_json::from_slice(&out.stdout).expect("the YAML converter printed JSON")
}

fn write(path: &Path, contents: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("creating a directory");
    }
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `portwatch check-policy` on `text`, which must pass; returns the policy.
fn checked_policy(text: &str, dir: &Path) -> Policy {
    let file = dir.join("policy.toml");
    write(&file, text);
    succeeds(Command::new(portwatch_bin()).arg("check-policy").arg(&file));
    Policy::parse(text).expect("check-policy accepted it, so the library parses it")
}

// ---- Prometheus alert rules ----

const RULES: &str = "prometheus/portwatch-alerts.yml";
const RULE_TESTS: &str = "prometheus/portwatch-alerts.test.yml";

#[test]
fn alert_rules_pass_promtool_check() {
    let out = succeeds(
        Command::new(promtool())
            .args(["check", "rules"])
            .arg(deploy(RULES)),
    );
    assert!(out.contains("SUCCESS: 6 rules found"), "{out}");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let out = succeeds(
        Command::new(promtool())
            .args(["test", "rules"])
            .arg(deploy(RULE_TESTS)),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

/// The unit tests have teeth: without the floor, the quiet host's trickle
/// counts as a spike, and the tests say so; bad PromQL fails the check.
#[test]
fn alert_rule_checks_catch_broken_rules() {
    let dir = TempDir::new("rules");
    let rules = read(&deploy(RULES));
    let floor = "(rate(portwatch_dropped_packets_total[5m])) > 1\n";
    assert!(rules.contains(floor), "the drops rule has its floor");
    write(
        &dir.path().join("portwatch-alerts.yml"),
        &rules.replace(floor, "(rate(portwatch_dropped_packets_total[5m])) > 0\n"),
    );
    let tests = dir.path().join("portwatch-alerts.test.yml");
    write(&tests, &read(&deploy(RULE_TESTS)));
    let out = fails(Command::new(promtool()).args(["test", "rules"]).arg(&tests));
    assert!(
        out.contains("quiet1"),
        "the failure names the quiet host:\n{out}"
    );

    let broken = dir.path().join("broken.yml");
    write(
        &broken,
        &rules.replace(
            "increase(portwatch_events_lost_total[10m])",
            "increase(portwatch_events_lost_total[10m]",
        ),
    );
    let out = fails(
        Command::new(promtool())
            .args(["check", "rules"])
            .arg(&broken),
    );
    assert!(
        out.contains("\"PortwatchEventsLost\": could not parse expression"),
        "{out}"
    );
}

/// Metric name -> label names, from portwatch's own encoder on a guard's
/// snapshot with every counter non-zero.
fn exported_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let mut totals = [1u64; GUARD_STATS_LEN as usize];
    totals[GuardStat::DropNoRule as usize] = 7;
    let counters = PortCounters {
        pass_packets: 1,
        pass_bytes: 60,
        drop_packets: 2,
        drop_bytes: 120,
    };
    let snapshot = Snapshot {
        listeners: [("exposed", 1), ("blocked", 1)].into_iter().collect(),
        unguarded: [("eth1".to_owned(), 1)].into_iter().collect(),
        events_lost: 1,
        tally: Tally {
            blocked_listeners_opened: 1,
            policy_changes: 1,
            follower_events_missed: 0,
        },
        guard: Some(GuardSnapshot {
            mode: Mode::Enforce,
            interfaces: vec![("eth0".into(), AttachedMode::Native)],
            ports: [(
                PortLabel {
                    proto: "tcp".into(),
                    port: "22".into(),
                },
                counters,
            )]
            .into_iter()
            .collect(),
            totals: GuardTotals(totals),
            owned: vec![metrics::OwnedSeries {
                proto: "tcp".into(),
                port: "6379".into(),
                open: true,
                squatters: 0,
            }],
            limited_sources: 1,
            verify: Some(metrics::VerifySeries {
                ok: true,
                disagreements: 0,
                at: 1,
            }),
        }),
    };
    let text = metrics::encode(snapshot).expect("portwatch encodes its metrics");
    let mut exported: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => (name, rest.split_once('}').map_or("", |(l, _)| l)),
            None => (line.split_whitespace().next().unwrap_or_default(), ""),
        };
        let labels = labels
            .split(',')
            .filter_map(|pair| pair.split_once('=').map(|(k, _)| k.to_owned()));
        exported.entry(name.to_owned()).or_default().extend(labels);
    }
    exported
}

/// The rules name only metrics portwatch exports, with the labels they
/// group by or match on: a rename on either side fails here.
#[test]
fn alert_rules_use_the_metrics_portwatch_exports() {
    let exported = exported_metrics();
    let rules = read(&deploy(RULES));
    let used: BTreeSet<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("portwatch_"))
        .collect();
    let unknown: Vec<_> = used
        .iter()
        .filter(|name| !exported.contains_key(**name))
        .collect();
    assert!(
        unknown.is_empty(),
        "the rules use metrics portwatch does not export: {unknown:?}\nexported: {:?}",
        exported.keys()
    );
    for (metric, label) in [
        ("portwatch_dropped_packets_total", "reason"),
        ("portwatch_events_lost_total", "ring"),
        ("portwatch_guard_mode", "mode"),
        ("portwatch_xdp_attached", "iface"),
        ("portwatch_xdp_attached", "mode"),
    ] {
        assert!(used.contains(metric), "no rule uses {metric}");
        assert!(
            exported[metric].contains(label),
            "{metric} has no label {label}: {:?}",
            exported[metric]
        );
    }
    assert!(used.contains("portwatch_blocked_listeners_opened_total"));
}

// ---- Grafana dashboard ----

const DASHBOARD: &str = "grafana/portwatch.json";

/// Every query of the dashboard with Grafana's variables given values
/// PromQL takes, and the title of its panel.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has an expr");
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$__range", "1h")
                .replace("$instance", ".*");
            assert!(!expr.contains('$'), "an unknown variable in {expr}");
            out.push((panel["title"].as_str().unwrap_or("?").to_owned(), expr));
        }
    }
    out
}

/// Writes the queries as recording rules, the form promtool checks.
fn as_recording_rules(queries: &[(String, String)]) -> String {
    let mut rules = String::from("groups:\n  - name: portwatch-dashboard\n    rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        let quoted = serde_json::to_string(expr).expect("a string encodes");
        rules.push_str(&format!(
            "      - record: portwatch_dashboard:query{i}\n        expr: {quoted}\n"
        ));
    }
    rules
}

/// The dashboard is Grafana JSON with unique panel ids and places, a
/// Prometheus data source chosen by variable, and every panel's PromQL
/// passes promtool.
#[test]
fn grafana_dashboard_loads_and_its_queries_pass_promtool() {
    let dashboard: Value =
        serde_json::from_str(&read(&deploy(DASHBOARD))).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "portwatch");
    let panels = dashboard["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "every panel has its own id");
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = &panel["title"];
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        assert!(
            panel["gridPos"]["w"].as_u64().is_some_and(|w| w > 0),
            "{title}"
        );
        assert!(
            panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "{title} has no query"
        );
    }
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, ["datasource", "instance"]);
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 15, "{queries:?}");
    let dir = TempDir::new("dash");
    let rules = dir.path().join("dashboard.yml");
    write(&rules, &as_recording_rules(&queries));
    let out = succeeds(
        Command::new(promtool())
            .args(["check", "rules"])
            .arg(&rules),
    );
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{out}"
    );
    // The check has teeth: a query with broken PromQL fails it.
    let mut broken = queries.clone();
    broken[0].1.push(')');
    write(&rules, &as_recording_rules(&broken));
    let out = fails(
        Command::new(promtool())
            .args(["check", "rules"])
            .arg(&rules),
    );
    assert!(out.contains("could not parse expression"), "{out}");
}

/// Every metric the dashboard names is one portwatch exports, with the
/// labels it groups by and matches on; and it shows what an operator
/// watches: exposure, drops per reason and port, rate-limited sources,
/// owner violations, verify, events lost.
#[test]
fn grafana_dashboard_uses_the_metrics_portwatch_exports() {
    let exported = exported_metrics();
    let dashboard: Value =
        serde_json::from_str(&read(&deploy(DASHBOARD))).expect("the dashboard is JSON");
    let queries = dashboard_queries(&dashboard);
    let mut used = BTreeSet::new();
    for (title, expr) in &queries {
        let names: Vec<&str> = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("portwatch_"))
            .collect();
        for name in &names {
            let labels = exported
                .get(*name)
                .unwrap_or_else(|| panic!("{title}: {name} is not a metric portwatch exports"));
            used.insert(name.to_string());
            // Labels matched in `name{label="..."}` and grouped `by (...)`.
            let mut wanted: Vec<&str> = Vec::new();
            if let Some(rest) = expr.split(&format!("{name}{{")).nth(1)
                && let Some(matchers) = rest.split('}').next()
            {
                wanted.extend(
                    matchers
                        .split(',')
                        .filter_map(|m| m.split(['=', '!', '~']).next())
                        .map(str::trim),
                );
            }
            if names.len() == 1 {
                for by in expr.split("by (").skip(1) {
                    wanted.extend(by.split(')').next().unwrap_or("").split(',').map(str::trim));
                }
            }
            for label in wanted
                .into_iter()
                .filter(|l| !l.is_empty() && *l != "instance")
            {
                assert!(
                    labels.contains(label),
                    "{title}: {name} has no label {label} (it has {labels:?})"
                );
            }
        }
    }
    for needed in [
        "portwatch_listeners",
        "portwatch_unguarded_listeners",
        "portwatch_dropped_packets_total",
        "portwatch_packets_total",
        "portwatch_rate_limited_sources",
        "portwatch_owned_port_binds_total",
        "portwatch_owned_port_squatters",
        "portwatch_verify_ok",
        "portwatch_verify_disagreements",
        "portwatch_events_lost_total",
        "portwatch_follower_events_missed_total",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

// ---- Kubernetes ----

const MANIFEST: &str = "kubernetes/portwatch.yaml";

fn kubernetes_validate(file: &Path, version: &str) -> Command {
    let mut cmd = Command::new(venv_bin("kubernetes-validate"));
    cmd.args(["--strict", "--kubernetes-version", version])
        .arg(file);
    cmd
}

#[test]
fn kubernetes_manifest_passes_strict_schema_validation() {
    // 1.30 is the oldest release with securityContext.appArmorProfile.
    for version in ["1.30.0", "1.37.0"] {
        let out = succeeds(&mut kubernetes_validate(&deploy(MANIFEST), version));
        for resource in [
            "namespace/portwatch",
            "serviceaccount/portwatch",
            "configmap/portwatch-policy",
            "daemonset/portwatch",
        ] {
            assert!(
                out.contains(&format!("passed for resource {resource} against")),
                "{resource} not validated against {version}:\n{out}"
            );
        }
    }
}

/// Strict validation rejects what a cluster would silently ignore (an
/// unknown field) as well as a wrong type.
#[test]
fn strict_schema_validation_rejects_broken_manifests() {
    let dir = TempDir::new("k8s");
    let manifest = read(&deploy(MANIFEST));
    let cases = [
        (
            "      hostNetwork: true\n",
            "      hostNetworks: true\n",
            "hostNetworks",
        ),
        (
            "containerPort: 9469",
            "containerPort: \"9469\"",
            "containerPort",
        ),
    ];
    for (from, to, named) in cases {
        assert!(manifest.contains(from), "the manifest has {from:?}");
        let broken = dir.path().join(format!("{named}.yaml"));
        write(&broken, &manifest.replacen(from, to, 1));
        let out = fails(&mut kubernetes_validate(&broken, "1.37.0"));
        assert!(out.contains(named), "the error names {named}:\n{out}");
    }
}

/// What the schema cannot see: the policy in the ConfigMap is one portwatch
/// accepts and that admits Prometheus to the metrics port, and the
/// DaemonSet's paths, ports and privileges fit together.
#[test]
fn kubernetes_manifest_is_consistent() {
    let docs = yaml_documents(&deploy(MANIFEST));
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in the manifest"))
    };
    let config = find("ConfigMap");
    let ds = find("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        ds["spec"]["template"]["metadata"]["labels"]
    );

    let dir = TempDir::new("k8spol");
    let policy_text = config["data"]["policy.toml"]
        .as_str()
        .expect("the ConfigMap holds policy.toml");
    let policy = checked_policy(policy_text, dir.path());

    let guard = &pod["containers"][0];
    let args: Vec<&str> = guard["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args.first(), Some(&"guard"), "{args:?}");
    let arg = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("no --{name}= in {args:?}"))
    };
    assert_eq!(arg("log-format"), "json");
    let policy_path = arg("policy");
    let metrics: std::net::SocketAddr = arg("metrics").parse().expect("--metrics is IP:PORT");
    let port = guard["ports"][0]["containerPort"]
        .as_u64()
        .expect("a container port");
    assert_eq!(u64::from(metrics.port()), port);
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(guard[probe]["httpGet"]["path"], "/metrics", "{probe}");
        assert_eq!(
            guard[probe]["httpGet"]["port"], guard["ports"][0]["name"],
            "{probe}"
        );
    }
    // Prometheus in the cluster network may scrape; the world may not.
    let inside: IpAddr = "10.1.2.3".parse().expect("an address");
    let outside: IpAddr = "192.0.2.1".parse().expect("an address");
    assert!(policy.permits(Proto::Tcp, metrics.port(), inside));
    assert!(!policy.permits(Proto::Tcp, metrics.port(), outside));

    // The policy file is the ConfigMap, read-only; the init container checks
    // the same file.
    let mounts = |container: &Value| -> Vec<(String, String, bool)> {
        container["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_owned(),
                    m["mountPath"].as_str().unwrap_or_default().to_owned(),
                    m["readOnly"] == true,
                )
            })
            .collect()
    };
    let policy_volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["configMap"]["name"] == config["metadata"]["name"])
        .expect("a volume of the ConfigMap");
    let policy_dir = Path::new(policy_path).parent().expect("a directory");
    assert!(mounts(guard).iter().any(|(name, path, ro)| {
        *name == policy_volume["name"] && Path::new(path) == policy_dir && *ro
    }));
    let check = &pod["initContainers"][0];
    assert!(
        check["args"][0]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("portwatch check-policy {policy_path}"))
    );
    assert!(mounts(check).iter().any(|(name, path, _)| {
        *name == policy_volume["name"] && Path::new(path) == policy_dir
    }));

    // Every mount has its volume; the node's paths that portwatch uses
    // appear at the same place in the pod (portwatch looks for them there).
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();
    let guard_paths: BTreeSet<String> = mounts(guard)
        .into_iter()
        .map(|(name, path, _)| {
            let volume = volumes
                .get(name.as_str())
                .unwrap_or_else(|| panic!("no volume {name}"));
            if let Some(host_path) = volume["hostPath"]["path"].as_str() {
                assert_eq!(host_path, path, "volume {name}");
            }
            path
        })
        .collect();
    for path in [
        "/sys/fs/bpf",
        "/sys/kernel/tracing",
        "/sys/fs/cgroup",
        "/run/portwatch",
    ] {
        assert!(
            guard_paths.contains(path),
            "the guard does not mount {path}"
        );
    }

    // Not privileged; exactly the capabilities the README explains.
    let security = &guard["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    let added: BTreeSet<&str> = security["capabilities"]["add"]
        .as_array()
        .expect("added capabilities")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let expected: BTreeSet<&str> = [
        "BPF",
        "PERFMON",
        "NET_ADMIN",
        "SYS_ADMIN",
        "SYS_PTRACE",
        "DAC_READ_SEARCH",
    ]
    .into();
    assert_eq!(added, expected);
}

// ---- Vector ----

#[test]
fn vector_config_reads_portwatch_journal_and_is_wired() {
    let docs = yaml_documents(&deploy("vector/portwatch.yaml"));
    assert_eq!(docs.len(), 1);
    let config = &docs[0];
    let section = |name: &str| {
        config[name]
            .as_object()
            .unwrap_or_else(|| panic!("no {name} in the Vector config"))
    };
    let (sources, transforms, sinks) =
        (section("sources"), section("transforms"), section("sinks"));

    let journal = sources
        .values()
        .find(|s| s["type"] == "journald")
        .expect("a journald source");
    assert_eq!(journal["include_units"], json!(["portwatch.service"]));

    // Every input names a source or transform; every source and transform
    // feeds something.
    let producers: BTreeSet<&str> = sources
        .keys()
        .chain(transforms.keys())
        .map(String::as_str)
        .collect();
    let mut consumed = BTreeSet::new();
    for (name, component) in transforms.iter().chain(sinks.iter()) {
        let inputs = component["inputs"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has no inputs"));
        assert!(!inputs.is_empty(), "{name} has no inputs");
        for input in inputs {
            let input = input.as_str().expect("an input name");
            assert!(
                producers.contains(input),
                "{name} reads {input}, which does not exist"
            );
            consumed.insert(input);
        }
    }
    assert_eq!(consumed, producers, "components that feed nothing");

    let remap = transforms
        .values()
        .find(|t| t["type"] == "remap")
        .expect("a remap transform");
    let program = remap["source"].as_str().expect("the remap program");
    assert!(program.contains("parse_json(.message)"), "{program}");
}

// ---- Ansible ----

/// Relative to `deploy/ansible`, where ansible-playbook runs.
const PLAYBOOK: &str = "portwatch.yml";

/// ansible-playbook with its state (temporary files, caches) kept in `dir`.
fn ansible(dir: &Path) -> Command {
    let mut cmd = Command::new(ansible_playbook());
    cmd.current_dir(deploy("ansible"))
        .env("ANSIBLE_HOME", dir.join("home"))
        .env("ANSIBLE_LOCAL_TEMP", dir.join("tmp"))
        .env("ANSIBLE_REMOTE_TEMP", dir.join("rtmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        .env("LC_ALL", "C.UTF-8");
    cmd
}

#[test]
fn ansible_playbook_passes_syntax_check() {
    let dir = TempDir::new("ansyn");
    let out = succeeds(ansible(dir.path()).args([
        "--syntax-check",
        "-i",
        "inventory.example.yml",
        PLAYBOOK,
    ]));
    assert!(out.contains("playbook: portwatch.yml"), "{out}");
}

/// A stand-in for a running guard's control socket: answers `reload` by
/// loading the policy file the way the guard does, and `policy` with what it
/// loaded, so the playbook's real `portwatch reload` and `portwatch policy
/// --json` calls have something true to talk to without loading programs.
struct FakeGuard {
    socket: PathBuf,
    state: Arc<Mutex<FakeState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct FakeState {
    reloads: u32,
    policy: Option<Policy>,
    /// Answers reloads without taking the file, like a guard whose command
    /// line overrides it: the playbook's check must notice.
    frozen: bool,
}

impl FakeGuard {
    fn start(socket: PathBuf, policy_file: PathBuf) -> Self {
        Self::with_state(socket, policy_file, FakeState::default())
    }

    fn with_state(socket: PathBuf, policy_file: PathBuf, state: FakeState) -> Self {
        let listener = UnixListener::bind(&socket).expect("binding the fake guard's socket");
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        serve(conn, &policy_file, &state);
                    }
                }
            })
        };
        Self {
            socket,
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn reloads(&self) -> u32 {
        self.state.lock().expect("fake guard state").reloads
    }

    fn policy(&self) -> Option<Policy> {
        self.state.lock().expect("fake guard state").policy.clone()
    }
}

fn serve(conn: UnixStream, policy_file: &Path, state: &Mutex<FakeState>) {
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let mut state = state.lock().expect("fake guard state");
        let answer = match decode_request(line.as_bytes()) {
            Ok(Request::Reload { .. }) => match Policy::load(policy_file) {
                Ok(policy) => {
                    state.reloads += 1;
                    let change = format!("reload ({} rules)", policy.rules.len());
                    if !state.frozen {
                        state.policy = Some(policy);
                    }
                    Response::Change(ChangeResponse {
                        change,
                        policy: None,
                    })
                }
                Err(e) => Response::error(e.to_string()),
            },
            Ok(Request::Policy) => match &state.policy {
                Some(policy) => Response::Policy(PolicyView::of(
                    policy,
                    policy.mode.unwrap_or(Mode::Enforce),
                    policy_file,
                )),
                None => Response::error("the fake guard has loaded no policy"),
            },
            _ => Response::error(format!("unexpected request {line}")),
        };
        drop(state);
        if writer.write_all(answer.to_line().as_bytes()).is_err() {
            return;
        }
    }
}

impl Drop for FakeGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The example inventory (two web servers, a database with a rule of its
/// own), plus an overlay that reaches each host through a local connection
/// with its own policy file and control socket. Returns the `-i` arguments.
fn rollout_inventory(dir: &Path) -> Vec<String> {
    let overlay = dir.join("local.yml");
    write(
        &overlay,
        &format!(
            r#"all:
  vars:
    ansible_connection: local
    ansible_python_interpreter: /usr/bin/python3
    ansible_become: false
    portwatch_check_ssh: false
    portwatch_bin: "{bin}"
    portwatch_socket: "{dir}/{{{{ inventory_hostname }}}}.sock"
    portwatch_policy_path: "{dir}/{{{{ inventory_hostname }}}}/policy.toml"
  hosts:
    db1.example.internal:
      portwatch_interfaces: [eth0]
"#,
            bin = portwatch_bin().display(),
            dir = dir.display(),
        ),
    );
    vec![
        "-i".into(),
        "inventory.example.yml".into(),
        "-i".into(),
        overlay.display().to_string(),
    ]
}

const HOSTS: [&str; 3] = [
    "web1.example.internal",
    "web2.example.internal",
    "db1.example.internal",
];

fn rules_of(policy: &Policy) -> BTreeSet<String> {
    policy
        .rules
        .iter()
        .map(|r| {
            let from: Vec<String> = r.from.iter().map(ToString::to_string).collect();
            if from.is_empty() {
                r.ports.to_string()
            } else {
                format!("{} from {}", r.ports, from.join(","))
            }
        })
        .collect()
}

/// The whole policy part of the rollout on three hosts: each gets its
/// group's and its own rules, checked by `portwatch check-policy` on the
/// way, then `portwatch reload` and a look at the policy in force. A second
/// run changes nothing and reloads nothing.
#[test]
fn ansible_rollout_writes_checks_and_reloads_each_host() {
    let dir = TempDir::new("anroll");
    let inventory = rollout_inventory(dir.path());
    let guards: Vec<FakeGuard> = HOSTS
        .iter()
        .map(|host| {
            FakeGuard::start(
                dir.path().join(format!("{host}.sock")),
                dir.path().join(host).join("policy.toml"),
            )
        })
        .collect();

    let run = || {
        succeeds(
            ansible(dir.path())
                .args(&inventory)
                .args([PLAYBOOK, "--tags", "policy"]),
        )
    };
    let out = run();
    for step in [
        "TASK [portwatch : Write the policy]",
        "RUNNING HANDLER [portwatch : Reload portwatch]",
        "TASK [portwatch : The guard runs the mode just written]",
    ] {
        assert!(out.contains(step), "no {step}:\n{out}");
    }

    let ssh = "tcp/22 from 203.0.113.0/24";
    let metrics = "tcp/9469 from 10.0.0.0/8";
    let web: BTreeSet<String> = [ssh, metrics, "tcp/80", "tcp/443", "udp/443"]
        .map(String::from)
        .into();
    let db: BTreeSet<String> = [
        ssh,
        metrics,
        "tcp/5432 from 10.0.0.0/8,fd00::/8",
        "tcp/5433 from 198.51.100.0/24",
    ]
    .map(String::from)
    .into();
    for (host, guard) in HOSTS.iter().zip(&guards) {
        let file = dir.path().join(host).join("policy.toml");
        let written = Policy::load(&file).expect("the playbook wrote a policy portwatch loads");
        assert_eq!(guard.reloads(), 1, "{host} reloaded once");
        let loaded = guard.policy().expect("the guard loaded a policy");
        assert_eq!(
            loaded, written,
            "{host}: the guard runs the file just written"
        );
        assert_eq!(loaded.mode.map(|m| m.as_str()), Some("audit"));
        let expected = if host.starts_with("web") { &web } else { &db };
        assert_eq!(&rules_of(&loaded), expected, "{host}");
        let interfaces: &[&str] = if host.starts_with("db1") {
            &["eth0"]
        } else {
            &[]
        };
        assert_eq!(loaded.interfaces, interfaces, "{host}");
    }

    // Idempotent: nothing to write, so no reload.
    let out = run();
    assert!(!out.contains("RUNNING HANDLER"), "{out}");
    for (host, guard) in HOSTS.iter().zip(&guards) {
        assert_eq!(guard.reloads(), 1, "{host} was not reloaded again");
    }
}

/// A policy portwatch rejects on the canary (the first host) fails it before
/// anything is replaced or reloaded, and the rollout stops there: the other
/// hosts are not touched.
#[test]
fn ansible_rollout_stops_at_a_canary_with_a_bad_policy() {
    let dir = TempDir::new("ancanary");
    let inventory = rollout_inventory(dir.path());
    let guards: Vec<FakeGuard> = HOSTS
        .iter()
        .map(|host| {
            FakeGuard::start(
                dir.path().join(format!("{host}.sock")),
                dir.path().join(host).join("policy.toml"),
            )
        })
        .collect();
    // web1 already has a policy; the new one gives it a port twice.
    let old = "mode = \"enforce\"\nallow = [\"tcp/22\"]\n";
    let web1 = dir.path().join(HOSTS[0]).join("policy.toml");
    write(&web1, old);

    let out = fails(ansible(dir.path()).args(&inventory).args([
        PLAYBOOK,
        "--tags",
        "policy",
        "--extra-vars",
        r#"{"portwatch_allow_host": ["tcp/80"]}"#,
    ]));
    assert!(out.contains("failed to validate"), "{out}");
    assert!(
        out.contains("tcp/80"),
        "portwatch's message names the port:\n{out}"
    );
    assert_eq!(read(&web1), old, "the canary's policy file is unchanged");
    for (host, guard) in HOSTS.iter().zip(&guards) {
        assert_eq!(guard.reloads(), 0, "{host} was reloaded");
    }
    for host in &HOSTS[1..] {
        assert!(
            !dir.path().join(host).exists(),
            "the rollout went on to {host}:\n{out}"
        );
    }
}

/// A guard that does not take the new file (here: it stays in enforce mode)
/// fails the canary's check after the reload, and the rollout stops.
#[test]
fn ansible_rollout_stops_when_the_guard_does_not_take_the_policy() {
    let dir = TempDir::new("anfrozen");
    let inventory = rollout_inventory(dir.path());
    let in_force =
        Policy::parse("mode = \"enforce\"\nallow = [\"tcp/22\"]\n").expect("a valid policy");
    let guards: Vec<FakeGuard> = HOSTS
        .iter()
        .map(|host| {
            FakeGuard::with_state(
                dir.path().join(format!("{host}.sock")),
                dir.path().join(host).join("policy.toml"),
                FakeState {
                    policy: Some(in_force.clone()),
                    frozen: true,
                    ..FakeState::default()
                },
            )
        })
        .collect();

    let out = fails(
        ansible(dir.path())
            .args(&inventory)
            .args([PLAYBOOK, "--tags", "policy"]),
    );
    assert!(
        out.contains("the guard runs enforce, not audit"),
        "the check names the mode in force:\n{out}"
    );
    assert_eq!(guards[0].reloads(), 1, "the canary was reloaded");
    for guard in &guards[1..] {
        assert_eq!(
            guard.reloads(),
            0,
            "the rollout went past the canary:\n{out}"
        );
    }
}
