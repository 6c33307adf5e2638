//! Who a port belongs to: an `owner` on an allow rule names the process
//! that should listen there (by systemd unit, cgroup, user, command name or
//! executable; every key given must match). The guard opens such a port at
//! XDP only while a matching process listens on it.

use std::{collections::BTreeSet, fmt};

use crate::model::ProcessInfo;

/// Socket activation as the host's service manager has it: the owners'
/// units that a socket unit starts, and the manager's own cgroup. The
/// manager binds and listens on such a unit's port for it (`ssh.socket`
/// for `ssh.service`), so it counts as that owner.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Activation {
    pub units: BTreeSet<String>,
    /// The service manager's cgroup v2 path (PID 1's, e.g. `/init.scope`).
    pub manager_cgroup: Option<String>,
    /// Per unit, the cgroup of the slice its socket unit runs in
    /// (`/system.slice`): systemd makes the socket there, in a helper
    /// process named `(sd-listen)`.
    pub helper_slices: std::collections::BTreeMap<String, String>,
}

/// The command name of systemd's socket-making helper.
pub const SYSTEMD_LISTEN_HELPER: &str = "(sd-listen)";

/// The user an owner names: as written (for the file), and the uid it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerUser {
    pub uid: u32,
    /// The name as written; `None` when the file gave a number.
    pub name: Option<String>,
}

/// What a listener's process must be for an owned port to open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// A systemd unit: the process's cgroup is the unit's or below it
    /// (nested slices included, wherever the unit's slice is).
    pub unit: Option<String>,
    /// A cgroup v2 path: the process's cgroup is it or below it.
    pub cgroup: Option<String>,
    pub user: Option<OwnerUser>,
    /// The kernel's command name (at most 15 bytes).
    pub comm: Option<String>,
    /// The executable's path.
    pub exe: Option<String>,
    /// The SHA-256 of the executable's contents (64 hex digits, lower
    /// case), checked with `exe`.
    pub sha256: Option<String>,
}

/// Why an owner as written cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OwnerError {
    #[error("an owner needs at least one of unit, cgroup, user, comm or exe")]
    Empty,
    #[error("unit {0:?} is not a systemd unit name (e.g. \"redis-server.service\")")]
    BadUnit(String),
    #[error(
        "cgroup {0:?} is not an absolute cgroup v2 path (e.g. \"/system.slice/redis.service\")"
    )]
    BadCgroup(String),
    #[error("user {0:?} does not exist on this host")]
    UnknownUser(String),
    #[error("user {0} is not a uid (0 to 4294967294)")]
    BadUid(i64),
    #[error("comm {0:?} cannot match: the kernel keeps 1 to 15 bytes of a command name")]
    BadComm(String),
    #[error("exe {0:?} is not an absolute path")]
    BadExe(String),
    #[error("sha256 {0:?} is not a SHA-256 digest (64 hex digits)")]
    BadSha256(String),
    #[error("sha256 is checked against the executable: give exe too")]
    Sha256WithoutExe,
    #[error(
        "an owner rule names one port (e.g. \"tcp/6379\"), not {0}: the port opens while its \
         owner listens on it"
    )]
    NotOnePort(String),
}

impl OwnerUser {
    /// A user name, looked up on this host.
    pub fn named(name: &str) -> Result<Self, OwnerError> {
        match nix::unistd::User::from_name(name) {
            Ok(Some(user)) => Ok(OwnerUser {
                uid: user.uid.as_raw(),
                name: Some(name.to_owned()),
            }),
            _ => Err(OwnerError::UnknownUser(name.to_owned())),
        }
    }

    /// A numeric uid; (uid_t)-1 means "no user" to the kernel.
    pub fn id(uid: i64) -> Result<Self, OwnerError> {
        u32::try_from(uid)
            .ok()
            .filter(|u| *u != u32::MAX)
            .map(|uid| OwnerUser { uid, name: None })
            .ok_or(OwnerError::BadUid(uid))
    }
}

/// An owner as people type it on the command line or send it over the
/// control socket: strings, `user` a name or a uid.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl OwnerSpec {
    /// Whether no key is given (then there is no owner).
    pub fn is_empty(&self) -> bool {
        *self == OwnerSpec::default()
    }

    /// The owner it names, checked; `user` is looked up on this host.
    pub fn resolve(&self) -> Result<Owner, OwnerError> {
        let user = match self.user.as_deref() {
            None => None,
            Some(text) => Some(match text.parse::<i64>() {
                Ok(uid) => OwnerUser::id(uid)?,
                Err(_) => OwnerUser::named(text)?,
            }),
        };
        let owner = Owner {
            unit: self.unit.clone(),
            cgroup: self.cgroup.clone(),
            user,
            comm: self.comm.clone(),
            exe: self.exe.clone(),
            sha256: self.sha256.as_deref().map(str::to_ascii_lowercase),
        };
        owner.check()?;
        Ok(owner)
    }
}

impl From<&Owner> for OwnerSpec {
    fn from(owner: &Owner) -> Self {
        OwnerSpec {
            unit: owner.unit.clone(),
            cgroup: owner.cgroup.clone(),
            user: owner.user.as_ref().map(|u| match &u.name {
                Some(name) => name.clone(),
                None => u.uid.to_string(),
            }),
            comm: owner.comm.clone(),
            exe: owner.exe.clone(),
            sha256: owner.sha256.clone(),
        }
    }
}

impl Owner {
    /// Checks what was written; each key on its own.
    pub fn check(&self) -> Result<(), OwnerError> {
        let Owner {
            unit,
            cgroup,
            user,
            comm,
            exe,
            sha256,
        } = self;
        if unit.is_none() && cgroup.is_none() && user.is_none() && comm.is_none() && exe.is_none() {
            return Err(OwnerError::Empty);
        }
        if let Some(unit) = unit {
            let valid = unit.contains('.')
                && !unit.starts_with('.')
                && !unit.contains('/')
                && !unit.chars().any(|c| c.is_whitespace() || c.is_control());
            if !valid {
                return Err(OwnerError::BadUnit(unit.clone()));
            }
        }
        if let Some(cgroup) = cgroup
            && (!cgroup.starts_with('/') || cgroup.contains("/../") || cgroup.ends_with("/.."))
        {
            return Err(OwnerError::BadCgroup(cgroup.clone()));
        }
        if let Some(comm) = comm
            && (comm.is_empty() || comm.len() > 15 || comm.contains('\0'))
        {
            return Err(OwnerError::BadComm(comm.clone()));
        }
        if let Some(exe) = exe
            && !exe.starts_with('/')
        {
            return Err(OwnerError::BadExe(exe.clone()));
        }
        if let Some(digest) = sha256 {
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(OwnerError::BadSha256(digest.clone()));
            }
            if exe.is_none() {
                return Err(OwnerError::Sha256WithoutExe);
            }
        }
        Ok(())
    }

    /// Whether `process` is this owner. What is not known of the process
    /// (it exited before /proc was read) does not match: an owned port
    /// opens only for a process shown to be its owner.
    pub fn matches(&self, process: &ProcessInfo) -> bool {
        let cgroup = process.cgroup.as_deref();
        let unit_ok = self
            .unit
            .as_deref()
            .is_none_or(|unit| cgroup.is_some_and(|path| path.split('/').any(|part| part == unit)));
        let cgroup_ok = self
            .cgroup
            .as_deref()
            .is_none_or(|want| cgroup.is_some_and(|path| cgroup_under(path, want)));
        let user_ok = self
            .user
            .as_ref()
            .is_none_or(|u| process.uid == Some(u.uid));
        let comm_ok = self
            .comm
            .as_deref()
            .is_none_or(|c| process.comm.as_deref() == Some(c));
        let exe_ok = self
            .exe
            .as_deref()
            .is_none_or(|e| process.exe.as_deref() == Some(e));
        // Last: the only check that may read a file (once per executable).
        let digest_ok = || {
            self.sha256.as_deref().is_none_or(|want| {
                process
                    .pid
                    .and_then(crate::procinfo::exe_sha256)
                    .is_some_and(|got| got.eq_ignore_ascii_case(want))
            })
        };
        unit_ok && cgroup_ok && user_ok && comm_ok && exe_ok && digest_ok()
    }

    /// Whether `process` holds the port for this owner: it is the owner,
    /// or the owner is a socket-activated unit and `process` is the service
    /// manager that listens for it.
    pub fn holds(&self, process: &ProcessInfo, activation: &Activation) -> bool {
        if self.matches(process) {
            return true;
        }
        let Some(unit) = self.unit.as_ref().filter(|u| activation.units.contains(*u)) else {
            return false;
        };
        let manager = activation.manager_cgroup.is_some()
            && process.cgroup.as_deref() == activation.manager_cgroup.as_deref();
        // The helper exits as soon as the socket is made: what is known of
        // it is what the kernel said (command name and uid).
        let helper = activation.helper_slices.contains_key(unit)
            && process.comm.as_deref() == Some(SYSTEMD_LISTEN_HELPER)
            && process.uid == Some(0);
        manager || helper
    }

    /// The owner as a TOML inline table.
    pub fn to_toml(&self) -> String {
        let mut keys = Vec::new();
        if let Some(unit) = &self.unit {
            keys.push(format!("unit = {}", super::toml_str(unit)));
        }
        if let Some(cgroup) = &self.cgroup {
            keys.push(format!("cgroup = {}", super::toml_str(cgroup)));
        }
        match &self.user {
            Some(OwnerUser {
                name: Some(name), ..
            }) => keys.push(format!("user = {}", super::toml_str(name))),
            Some(OwnerUser { uid, name: None }) => keys.push(format!("user = {uid}")),
            None => {}
        }
        if let Some(comm) = &self.comm {
            keys.push(format!("comm = {}", super::toml_str(comm)));
        }
        if let Some(exe) = &self.exe {
            keys.push(format!("exe = {}", super::toml_str(exe)));
        }
        if let Some(digest) = &self.sha256 {
            keys.push(format!("sha256 = {}", super::toml_str(digest)));
        }
        format!("{{ {} }}", keys.join(", "))
    }
}

/// Whether cgroup `path` is `want` or below it.
pub fn cgroup_under(path: &str, want: &str) -> bool {
    let want = want.trim_end_matches('/');
    want.is_empty()
        || path == want
        || path
            .strip_prefix(want)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// `unit redis-server.service, user redis`.
impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(unit) = &self.unit {
            parts.push(format!("unit {unit}"));
        }
        if let Some(cgroup) = &self.cgroup {
            parts.push(format!("cgroup {cgroup}"));
        }
        match &self.user {
            Some(OwnerUser {
                name: Some(name), ..
            }) => parts.push(format!("user {name}")),
            Some(OwnerUser { uid, name: None }) => parts.push(format!("uid {uid}")),
            None => {}
        }
        if let Some(comm) = &self.comm {
            parts.push(format!("comm {comm}"));
        }
        if let Some(exe) = &self.exe {
            parts.push(format!("exe {exe}"));
        }
        if let Some(digest) = &self.sha256 {
            // Enough to tell builds apart in a line; the policy has it all.
            parts.push(format!("sha256 {}…", &digest[..digest.len().min(16)]));
        }
        f.write_str(&parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn process(comm: &str, uid: u32, cgroup: &str, exe: &str) -> ProcessInfo {
        ProcessInfo {
            pid: Some(812),
            comm: Some(Arc::from(comm)),
            uid: Some(uid),
            exe: Some(Arc::from(exe)),
            cmdline: None,
            cgroup: Some(Arc::from(cgroup)),
        }
    }

    #[test]
    fn every_key_given_must_match() {
        let redis = process(
            "redis-server",
            110,
            "/system.slice/redis-server.service",
            "/usr/bin/redis-server",
        );
        let owner = Owner {
            unit: Some("redis-server.service".into()),
            user: Some(OwnerUser {
                uid: 110,
                name: None,
            }),
            ..Owner::default()
        };
        assert!(owner.matches(&redis));
        let mut stranger = redis.clone();
        stranger.uid = Some(1000);
        assert!(!owner.matches(&stranger), "another user");
        let debug = process(
            "python3",
            110,
            "/user.slice/user-110.slice/session-4.scope",
            "/usr/bin/python3.11",
        );
        assert!(!owner.matches(&debug), "same user, another unit");

        // Nested slices: the unit is a component, wherever its slice is.
        let nested = process(
            "nginx",
            33,
            "/system.slice/web.slice/nginx.service",
            "/usr/sbin/nginx",
        );
        let by_unit = Owner {
            unit: Some("nginx.service".into()),
            ..Owner::default()
        };
        assert!(by_unit.matches(&nested));
        let prefix_only = process(
            "nginx",
            33,
            "/system.slice/nginx.service-helper",
            "/usr/sbin/nginx",
        );
        assert!(!by_unit.matches(&prefix_only));

        let by_cgroup = Owner {
            cgroup: Some("/system.slice/web.slice".into()),
            ..Owner::default()
        };
        assert!(by_cgroup.matches(&nested));
        let sibling = process(
            "nginx",
            33,
            "/system.slice/web.slice2/x.service",
            "/usr/sbin/nginx",
        );
        assert!(
            !by_cgroup.matches(&sibling),
            "a prefix of a name is not a parent"
        );

        let by_exe = Owner {
            exe: Some("/usr/sbin/nginx".into()),
            comm: Some("nginx".into()),
            ..Owner::default()
        };
        assert!(by_exe.matches(&nested));
        let renamed = process("nginx", 33, "/", "/tmp/nginx");
        assert!(!by_exe.matches(&renamed));
    }

    #[test]
    fn the_service_manager_holds_a_socket_activated_units_port() {
        let systemd = process("systemd", 0, "/init.scope", "/usr/lib/systemd/systemd");
        let ssh = Owner {
            unit: Some("ssh.service".into()),
            ..Owner::default()
        };
        let none = Activation::default();
        assert!(!ssh.holds(&systemd, &none));
        let activated = Activation {
            units: BTreeSet::from(["ssh.service".to_owned()]),
            manager_cgroup: Some("/init.scope".into()),
            helper_slices: [("ssh.service".to_owned(), "/system.slice".to_owned())].into(),
        };
        assert!(ssh.holds(&systemd, &activated));
        let helper = ProcessInfo {
            pid: Some(4242),
            comm: Some(Arc::from("(sd-listen)")),
            uid: Some(0),
            ..ProcessInfo::default()
        };
        assert!(ssh.holds(&helper, &activated), "systemd's helper");
        let user_helper = ProcessInfo {
            uid: Some(1000),
            ..helper.clone()
        };
        assert!(!ssh.holds(&user_helper, &activated), "not root");
        let sshd = process("sshd", 0, "/system.slice/ssh.service", "/usr/sbin/sshd");
        assert!(ssh.holds(&sshd, &activated), "the service itself too");
        let stranger = process(
            "python3",
            0,
            "/user.slice/session-1.scope",
            "/usr/bin/python3",
        );
        assert!(!ssh.holds(&stranger, &activated));
        let other = Owner {
            unit: Some("nginx.service".into()),
            ..Owner::default()
        };
        assert!(!other.holds(&systemd, &activated), "not activated");
    }

    #[test]
    fn what_is_not_known_does_not_match() {
        let gone = ProcessInfo {
            pid: Some(9),
            comm: Some(Arc::from("redis-server")),
            ..ProcessInfo::default()
        };
        let owner = Owner {
            unit: Some("redis-server.service".into()),
            ..Owner::default()
        };
        assert!(!owner.matches(&gone));
        let by_comm = Owner {
            comm: Some("redis-server".into()),
            ..Owner::default()
        };
        assert!(by_comm.matches(&gone));
    }

    #[test]
    fn an_owner_as_typed_resolves_and_goes_back() {
        let spec = OwnerSpec {
            user: Some("root".into()),
            comm: Some("nginx".into()),
            ..OwnerSpec::default()
        };
        let owner = spec.resolve().expect("valid");
        assert_eq!(owner.user.as_ref().map(|u| u.uid), Some(0));
        assert_eq!(OwnerSpec::from(&owner), spec);
        let by_uid = OwnerSpec {
            user: Some("33".into()),
            ..OwnerSpec::default()
        };
        assert_eq!(by_uid.resolve().map(|o| o.to_string()), Ok("uid 33".into()));
        assert_eq!(OwnerSpec::from(&by_uid.resolve().expect("valid")), by_uid);
        assert!(OwnerSpec::default().is_empty());
        assert_eq!(OwnerSpec::default().resolve(), Err(OwnerError::Empty));
        assert!(matches!(
            OwnerSpec {
                user: Some("no-such-user-portwatch".into()),
                ..OwnerSpec::default()
            }
            .resolve(),
            Err(OwnerError::UnknownUser(_))
        ));
    }

    #[test]
    fn bad_owners_are_named() {
        let check = |owner: Owner| owner.check().map_err(|e| e.to_string());
        assert!(check(Owner::default()).is_err_and(|e| e.contains("at least one")));
        for (owner, says) in [
            (
                Owner {
                    unit: Some("redis".into()),
                    ..Owner::default()
                },
                "not a systemd unit name",
            ),
            (
                Owner {
                    cgroup: Some("system.slice".into()),
                    ..Owner::default()
                },
                "not an absolute cgroup v2 path",
            ),
            (
                Owner {
                    comm: Some("a-very-long-command".into()),
                    ..Owner::default()
                },
                "1 to 15 bytes",
            ),
            (
                Owner {
                    exe: Some("nginx".into()),
                    ..Owner::default()
                },
                "not an absolute path",
            ),
            (
                Owner {
                    exe: Some("/usr/sbin/nginx".into()),
                    sha256: Some("abc".into()),
                    ..Owner::default()
                },
                "not a SHA-256 digest",
            ),
            (
                Owner {
                    comm: Some("nginx".into()),
                    sha256: Some("0".repeat(64)),
                    ..Owner::default()
                },
                "give exe too",
            ),
        ] {
            let e = check(owner.clone()).expect_err("refused");
            assert!(e.contains(says), "{owner:?}: {e}");
        }
        assert!(OwnerUser::named("no-such-user-portwatch").is_err());
        assert_eq!(OwnerUser::named("root").map(|u| u.uid), Ok(0));
        assert!(OwnerUser::id(-1).is_err() && OwnerUser::id(1 << 32).is_err());
        assert_eq!(OwnerUser::id(33).map(|u| u.uid), Ok(33));
    }
}
