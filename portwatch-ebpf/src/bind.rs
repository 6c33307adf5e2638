//! Owned ports at bind time, judged in the monitor's `post_bind4`/`post_bind6`
//! hooks at the cgroup v2 root (one program per bind, not two): they see
//! every explicit bind() (TCP and UDP, io_uring's too, kernel-picked ports
//! included) once the kernel has given the socket its port, and a 0 from
//! them undoes the bind and fails it with EPERM. A bind of an owned port in
//! the guarded namespace by a task that is not the port's owner is refused
//! (enforce) or let through (audit), and reported either way.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_ktime_get_ns,
    },
    programs::SockContext,
};
use portwatch_common::{
    BIND_AUDITED, BIND_DENIED, BindReport, GuardStat, IPPROTO_TCP, IPPROTO_UDP, MAX_CGROUP_DEPTH,
    OWNER_CGROUP, OWNER_COMM, OWNER_ENFORCE, OWNER_MANAGER, OWNER_UID, OwnerKey, OwnerRule,
    SYSTEMD_LISTEN_HELPER,
};

use crate::{
    aligned::current_comm,
    maps::{BINDS, OWNER_COUNT, OWNERS, guard_count},
};

/// Whether the bind of `proto` `port` on `addr` may stand.
#[inline(always)]
pub fn allowed(ctx: &SockContext, family: u16, addr: [u8; 16], proto: u32, port: u16) -> bool {
    // Most hosts own no port: one array read, no hash lookup.
    if OWNER_COUNT.get(0).is_none_or(|n| *n == 0) {
        return true;
    }
    if proto != u32::from(IPPROTO_TCP) && proto != u32::from(IPPROTO_UDP) {
        return true;
    }
    let key = OwnerKey {
        port,
        proto: proto as u8,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; user space may replace it,
    // never free it under us (hash values live until an RCU grace period).
    let Some(rule) = (unsafe { OWNERS.get(&key) }).copied() else {
        return true;
    };
    // SAFETY: the context is a socket, which bpf_get_netns_cookie takes.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != rule.netns_cookie {
        return true;
    }
    if is_owner(&rule) || is_manager(&rule) {
        return true;
    }
    let enforce = rule.flags & OWNER_ENFORCE != 0;
    guard_count(if enforce {
        GuardStat::BindsDenied
    } else {
        GuardStat::BindsAudited
    });
    report(port, proto as u8, family, addr, enforce);
    !enforce
}

/// The service manager (or its socket-making helper) binding a
/// socket-activated owner's port for it.
#[inline(always)]
fn is_manager(rule: &OwnerRule) -> bool {
    if rule.flags & OWNER_MANAGER == 0 {
        return false;
    }
    if within(rule.manager_cgroup_id) {
        return true;
    }
    rule.helper_slice_id != 0
        && bpf_get_current_uid_gid() as u32 == 0
        && current_comm().0 == SYSTEMD_LISTEN_HELPER
        && within(rule.helper_slice_id)
}

/// Every key the rule names must match; each helper runs only for a key
/// that is named (a bind() of an owned port pays for its own checks only).
#[inline(always)]
fn is_owner(rule: &OwnerRule) -> bool {
    if rule.flags & OWNER_CGROUP != 0 && !within(rule.cgroup_id) {
        return false;
    }
    if rule.flags & OWNER_UID != 0 && bpf_get_current_uid_gid() as u32 != rule.uid {
        return false;
    }
    if rule.flags & OWNER_COMM != 0 && current_comm().0 != rule.comm {
        return false;
    }
    true
}

/// Whether the current task's cgroup is `id` or below it. Walked from the
/// root down by id, at whatever depth (see `MAX_CGROUP_DEPTH`); id 0 is no
/// cgroup (an owner's unit that is not running).
#[inline(always)]
fn within(id: u64) -> bool {
    if id == 0 {
        return false;
    }
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        // SAFETY: the helper takes any level; past the task's own depth it
        // returns 0.
        let at = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if at == id {
            return true;
        }
        if at == 0 {
            return false;
        }
        level += 1;
    }
    false
}

#[inline(always)]
fn report(port: u16, proto: u8, family: u16, addr: [u8; 16], enforce: bool) {
    let Some(mut entry) = BINDS.reserve::<BindReport>(0) else {
        guard_count(GuardStat::BindReportsLost);
        return;
    };
    entry.write(BindReport {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        // SAFETY: no preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        port,
        family,
        proto,
        verdict: if enforce { BIND_DENIED } else { BIND_AUDITED },
        _pad: [0; 2],
        addr,
        comm: current_comm().0,
    });
    entry.submit(0);
}
