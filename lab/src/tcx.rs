//! The programs at an interface's tcx ingress hook, asked of the kernel
//! (BPF_PROG_QUERY) from inside its namespace: bpftool 7.1 lists tcx links
//! without their interface, and `tc` and `ip` do not show them at all.

use std::{ffi::CString, path::Path};

use anyhow::{Context as _, Result, bail};

use crate::{
    netns::{Netns, enter},
    run,
};

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;

/// The ids of the programs attached at tcx ingress of `iface`, in the
/// network namespace at `netns`, in their order there.
pub fn tcx_ingress_programs(netns: &Path, iface: &str) -> Result<Vec<u32>> {
    let netns = netns.to_path_buf();
    let iface = iface.to_owned();
    // setns moves one thread: a thread of its own, so the caller's stays.
    std::thread::spawn(move || {
        enter(&netns)?;
        query(&iface)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the tcx query thread panicked"))?
}

fn query(iface: &str) -> Result<Vec<u32>> {
    let name = CString::new(iface).context("interface name")?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("no interface {iface}"));
    }
    let mut ids = [0u32; 64];
    // The query part of union bpf_attr, as 8-byte words: target_ifindex
    // and attach_type, query_flags and attach_flags, prog_ids, prog_cnt,
    // then the fields left zero.
    let mut attr = [0u64; 8];
    attr[0] = u64::from(ifindex) | u64::from(BPF_TCX_INGRESS) << 32;
    attr[2] = ids.as_mut_ptr() as u64;
    attr[3] = ids.len() as u64;
    // SAFETY: `attr` is a zero-padded BPF_PROG_QUERY attribute of the size
    // passed; the kernel writes at most `ids.len()` ids into `ids` and the
    // count into `attr`, both live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        bail!("BPF_PROG_QUERY (tcx ingress) of {iface}: {e}");
    }
    let count = (attr[3] & 0xffff_ffff) as usize;
    Ok(ids[..count.min(ids.len())].to_vec())
}

/// How portwatch's guard sits on `iface` in `netns`, as the kernel says:
/// `native` or `generic` XDP (`ip link`), `tc` (its tc program at tcx
/// ingress), or None.
pub fn guard_mode(netns: &Netns, iface: &str) -> Result<Option<&'static str>> {
    let link = run("ip", &["-n", &netns.name, "link", "show", "dev", iface])?;
    if link.contains("xdp_guard") {
        return Ok(Some(if link.contains("xdpgeneric") {
            "generic"
        } else {
            "native"
        }));
    }
    for id in tcx_ingress_programs(&netns.path(), iface)? {
        if run("bpftool", &["prog", "show", "id", &id.to_string()])?.contains("name tc_guard") {
            return Ok(Some("tc"));
        }
    }
    Ok(None)
}
