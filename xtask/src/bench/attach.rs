//! What the sections attach to the lab's server veth: a bare XDP program
//! assembled at run time, or portwatch's guard in the mode asked for.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use portwatch_lab::{Guard, Lab, bounded::RUN_LIMIT, run_bounded, run_within};

const LLVM_MC: &str = "/usr/lib/llvm-22/bin/llvm-mc";

/// A two-instruction XDP program (`return ACTION`, frags-capable like
/// portwatch's), assembled at run time with llvm-mc (LLVM 22, which setup
/// installs) into `dir/NAME.o`. `action`: 1 XDP_DROP, 2 XDP_PASS.
pub fn bare_program(dir: &Path, name: &str, action: u8) -> Result<PathBuf> {
    let asm = dir.join(format!("{name}.s"));
    let obj = dir.join(format!("{name}.o"));
    std::fs::write(
        &asm,
        format!(
            "\t.section xdp.frags,\"ax\",@progbits\n\t.globl {name}\n\t.type {name},@function\n\
             {name}:\n\tr0 = {action}\n\texit\n\t.size {name}, .-{name}\n\
             \t.section license,\"aw\",@progbits\n\t.asciz \"GPL\"\n"
        ),
    )?;
    run_within(
        Command::new(LLVM_MC)
            .args(["-triple=bpfel", "-filetype=obj", "-o"])
            .arg(&obj)
            .arg(&asm),
        Duration::from_secs(30),
    )
    .with_context(|| format!("assembling {name}"))?;
    Ok(obj)
}

/// What a configuration attached: commands that undo it, run on drop, or
/// a guard, stopped on drop.
pub struct Attached {
    pub undo: Vec<Command>,
    pub guard: Option<Guard>,
}

impl Attached {
    /// The guard daemon's pid, when this is portwatch.
    pub fn guard_pid(&self) -> Option<u32> {
        self.guard.as_ref().map(Guard::pid)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        for cmd in &mut self.undo {
            let _ = run_bounded(cmd, None, Duration::from_secs(20), None);
        }
    }
}

/// `ip -n SERVER link set dev SERVER_IF SETTINGS...`.
fn set_server_link(lab: &Lab, settings: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", &lab.server.name, "link", "set", "dev", &lab.server_if])
        .args(settings);
    cmd
}

/// Detaches whatever XDP program the server's veth has.
pub fn xdp_off(lab: &Lab) -> Command {
    set_server_link(lab, &["xdp", "off"])
}

/// How `ip link` attaches a [`bare_program`]: `xdpdrv` (native) or
/// `xdpgeneric`.
#[derive(Clone, Copy)]
pub enum BareMode {
    Native,
    Generic,
}

/// Attaches a [`bare_program`] to the server's veth in `mode`.
pub fn attach_bare(lab: &Lab, obj: &Path, mode: BareMode) -> Result<Attached> {
    let key = match mode {
        BareMode::Native => "xdpdrv",
        BareMode::Generic => "xdpgeneric",
    };
    // `xdp off` detaches a native program only, on a device that has
    // native XDP.
    let attached = Attached {
        undo: vec![set_server_link(lab, &[key, "off"])],
        guard: None,
    };
    let obj = obj.to_str().context("object path is not UTF-8")?;
    run_within(
        &mut set_server_link(lab, &[key, "obj", obj, "sec", "xdp.frags"]),
        RUN_LIMIT,
    )?;
    Ok(attached)
}

/// The guard's header walk then XDP_DROP (`bench_parse_drop`), pinned on
/// the host's bpffs by portwatch's `kernel_worker` and attached natively
/// to the server's veth: the floor of any filter that reads the headers it
/// judges (a bare XDP_DROP never touches the packet).
pub fn attach_floor(lab: &Lab, worker: &Path) -> Result<Attached> {
    let pin = Path::new("/sys/fs/bpf").join(portwatch_lab::unique_name("floor"));
    let mut unpin = Command::new("rm");
    unpin.arg("-f").arg(&pin);
    // Undone on drop from here on, also when a step below fails.
    let attached = Attached {
        undo: vec![xdp_off(lab), unpin],
        guard: None,
    };
    run_within(
        Command::new("sh").args([
            "-c",
            "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf",
        ]),
        RUN_LIMIT,
    )?;
    run_within(
        Command::new(worker).args(["pin-floor", "--path"]).arg(&pin),
        RUN_LIMIT,
    )
    .context("pinning bench_parse_drop")?;
    // nsenter keeps the host's mounts, where the pin is (`ip -n` would
    // remount /sys).
    run_within(
        lab.server
            .nsenter("ip")
            .args(["link", "set", "dev", &lab.server_if, "xdpdrv", "pinned"])
            .arg(&pin),
        RUN_LIMIT,
    )?;
    Ok(attached)
}

/// `portwatch guard` on the lab's server veth in `mode` (native, generic
/// or tc), enforcing a policy that permits `allow`, with pins and a
/// control socket of its own; checked to be attached in that mode, not a
/// fallback.
pub fn start_guard(portwatch: &Path, lab: &Lab, mode: &str, allow: &[&str]) -> Result<Guard> {
    let guard = Guard::start(
        portwatch,
        &lab.server,
        &lab.server_if,
        allow,
        &["--xdp-mode", mode],
    )?;
    ensure!(
        lab.server_guard_mode()? == Some(mode),
        "portwatch guard --xdp-mode {mode}: not attached as asked:\n{}",
        lab.server_link()?
    );
    Ok(guard)
}

/// The guard as an operator starts it, without `--xdp-mode` (auto); the
/// mode auto chose, as `ip link` and `bpftool net` show it.
pub fn start_guard_default(
    portwatch: &Path,
    lab: &Lab,
    allow: &[&str],
) -> Result<(Guard, &'static str)> {
    let guard = Guard::start(portwatch, &lab.server, &lab.server_if, allow, &[])?;
    let mode = lab.server_guard_mode()?.with_context(|| {
        format!(
            "portwatch guard (default mode): not attached:\n{}",
            lab.server_link().unwrap_or_default()
        )
    })?;
    Ok((guard, mode))
}
