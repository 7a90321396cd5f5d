//! What `enforcer exec` adds around the command, in the process itself, before it execs: the
//! containment the kernel's cgroup hooks cannot give, and which BPF LSM would give per cgroup
//! where the kernel can run it.
//!
//! - **Landlock domain** (ABI 6 or newer): the command and everything it starts cannot reach
//!   processes outside it with ptrace-class access (`ptrace`, `pidfd_getfd`, `process_vm_*`,
//!   `/proc/PID/mem`), so it cannot borrow another process's sockets; and it cannot connect to
//!   abstract unix sockets created outside it (D-Bus and friends that would act for it).
//! - **seccomp filter**: sockets only of the families the hooks see (`AF_INET`, `AF_INET6`,
//!   `AF_UNIX`, and `AF_NETLINK` for route and diag reads); `AF_VSOCK`, `AF_PACKET`, `AF_XDP`
//!   and every other family get `EPERM`. io_uring is refused too: its socket operations do not
//!   pass through the seccomp filter.
//! - **stdio**: a command whose fd 0, 1 or 2 is an inet socket would hold a socket made
//!   outside its cgroup, which no hook sees: refused unless `--allow-socket-stdio`.
//!
//! Every step fails closed: exec stops (125) rather than run the command with less.

use std::{collections::BTreeMap, os::fd::BorrowedFd};

use landlock::{ABI, Ruleset, RulesetAttr as _, RulesetStatus, Scope};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// The families an enrolled command may create sockets of.
const ALLOWED_FAMILIES: [i32; 4] = [
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];
/// The netlink protocols it may use: route (interface and address reads) and sock_diag.
const ALLOWED_NETLINK: [i32; 2] = [libc::NETLINK_ROUTE, libc::NETLINK_SOCK_DIAG];

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "fd {fd} is an {family} socket, made outside the agent's cgroup, where no hook sees \
         it: redirect it (for example to a file or a pipe), or pass --allow-socket-stdio"
    )]
    SocketStdio { fd: i32, family: &'static str },
    #[error(
        "this kernel cannot contain the command with Landlock ({status}): Landlock ABI 6 or \
         newer (Linux 6.12) is needed to keep it from borrowing other processes' sockets and \
         reaching abstract unix sockets; boot with `lsm=...,landlock` or run a newer kernel"
    )]
    Landlock { status: String },
    #[error("building the seccomp filter failed: {0}")]
    Seccomp(String),
}

/// Refuses inet sockets on fd 0, 1 and 2.
pub fn check_stdio() -> Result<(), SandboxError> {
    for fd in 0..=2 {
        // SAFETY: fds 0-2 are only inspected, not owned; an unopened one fails fstat.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        // SO_DOMAIN: fails with ENOTSOCK (or EBADF) for anything that is not a socket.
        let mut domain: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `domain`.
        let r = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&borrowed),
                libc::SOL_SOCKET,
                libc::SO_DOMAIN,
                (&raw mut domain).cast(),
                &mut len,
            )
        };
        if r != 0 {
            continue;
        }
        let family = match domain {
            libc::AF_INET => "AF_INET",
            libc::AF_INET6 => "AF_INET6",
            _ => continue,
        };
        return Err(SandboxError::SocketStdio { fd, family });
    }
    Ok(())
}

/// Puts the process in a Landlock domain scoped against abstract unix sockets (ptrace-class
/// access outside the domain is refused by any Landlock domain). Needs `no_new_privs`.
pub fn landlock() -> Result<(), SandboxError> {
    let status = Ruleset::default()
        .scope(Scope::AbstractUnixSocket)
        .and_then(|r| r.create())
        .and_then(landlock::RulesetCreated::restrict_self)
        .map_err(|e| SandboxError::Landlock {
            status: e.to_string(),
        })?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok(()),
        other => Err(SandboxError::Landlock {
            status: format!("{other:?} at best-effort ABI {:?}", ABI::V6),
        }),
    }
}

/// The seccomp filter: `EPERM` for sockets of other families and for io_uring.
pub fn seccomp_filter() -> Result<BpfProgram, SandboxError> {
    let err = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    let arg = |index: u8, op: SeccompCmpOp, value: i32| {
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value as u64).map_err(err)
    };
    // A rule matches (and the call is refused) when every condition holds.
    let mut other_family = Vec::new();
    for family in ALLOWED_FAMILIES {
        other_family.push(arg(0, SeccompCmpOp::Ne, family)?);
    }
    let mut other_netlink = vec![arg(0, SeccompCmpOp::Eq, libc::AF_NETLINK)?];
    for protocol in ALLOWED_NETLINK {
        other_netlink.push(arg(2, SeccompCmpOp::Ne, protocol)?);
    }
    let socket_rules = vec![
        SeccompRule::new(other_family).map_err(err)?,
        SeccompRule::new(other_netlink).map_err(err)?,
    ];
    let socketpair_rules =
        vec![SeccompRule::new(vec![arg(0, SeccompCmpOp::Ne, libc::AF_UNIX)?]).map_err(err)?];
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [
        (libc::SYS_socket, socket_rules),
        (libc::SYS_socketpair, socketpair_rules),
        // No rule: refused whatever the arguments.
        (libc::SYS_io_uring_setup, Vec::new()),
        (libc::SYS_io_uring_enter, Vec::new()),
        (libc::SYS_io_uring_register, Vec::new()),
    ]
    .into_iter()
    .collect();
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

/// Installs the seccomp filter on this thread (exec is single-threaded here). Needs
/// `no_new_privs`.
pub fn seccomp() -> Result<(), SandboxError> {
    let program = seccomp_filter()?;
    seccompiler::apply_filter(&program).map_err(|e| SandboxError::Seccomp(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_builds() {
        let program = seccomp_filter().unwrap();
        assert!(program.len() > 10);
    }

    #[test]
    fn a_child_under_the_filter_gets_eperm_for_vsock_and_packet_but_not_for_inet() {
        // In a forked child, so the test process keeps its own syscalls.
        // SAFETY: the child only makes async-signal-safe calls before _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = (|| {
                // SAFETY: plain prctl.
                if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                    return 10;
                }
                if seccomp().is_err() {
                    return 11;
                }
                let try_socket = |family: i32, ty: i32| {
                    // SAFETY: plain syscalls.
                    let fd = unsafe { libc::socket(family, ty, 0) };
                    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                    if fd >= 0 {
                        // SAFETY: our own descriptor.
                        unsafe { libc::close(fd) };
                        0
                    } else {
                        errno
                    }
                };
                if try_socket(libc::AF_VSOCK, libc::SOCK_STREAM) != libc::EPERM {
                    return 12;
                }
                if try_socket(libc::AF_PACKET, libc::SOCK_DGRAM) != libc::EPERM {
                    return 13;
                }
                if try_socket(libc::AF_INET, libc::SOCK_STREAM) != 0 {
                    return 14;
                }
                if try_socket(libc::AF_UNIX, libc::SOCK_STREAM) != 0 {
                    return 15;
                }
                0
            })();
            // SAFETY: leaving the forked child without running the test harness's atexit.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }
}
