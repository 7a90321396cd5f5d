//! Operating-system primitives the daemon's services share: nothing here knows about agents
//! or policies.
//!
//! # Layout
//! - [`listeners`]: listening sockets, kept in systemd's file-descriptor store across restarts.
//! - [`sockdiag`]: destroying TCP sockets in the kernel with sock_diag `SOCK_DESTROY`.
//! - [`sched`]: real-time and nice priorities around the kill switch.
//! - [`tcp`]: cookies, byte counts and receive thresholds of TCP sockets (the kernel splice).
//! - this module: the open-file limit, the network namespace cookie, systemd readiness and
//!   watchdog, termination signals, resets on close and private directories.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    time::Duration,
};

pub mod fileid;
pub mod listeners;
pub mod sched;
pub mod sockdiag;
pub mod tcp;

pub use fileid::FileId;

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("reading the network namespace cookie failed ({0}); Linux 5.14 or newer is needed")]
    NetnsCookie(std::io::Error),
    #[error("creating {path}: {io}", io = crate::sys::io_text(source))]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Returns the memory that start-up freed to the operating system. The daemon's start parses
/// the kernel's BTF and the trust roots, tens of MiB that are freed at once, and mimalloc
/// keeps freed pages of a thread that then stays idle (the starting thread does) resident
/// for good: 100 MiB idle instead of about 30.
pub fn release_startup_memory() {
    // SAFETY: mi_collect has no preconditions; it only frees what is unused.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Every proxied connection holds two descriptors: lifts the soft open-file limit to the hard
/// one (a failure is logged: the daemon still works, with fewer connections).
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
    }
}

/// The calling process's network namespace cookie (`SO_NETNS_COOKIE`).
pub fn netns_cookie() -> Result<u64, SysError> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(SysError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(SysError::NetnsCookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// Tells systemd the service is ready (a no-op without `NOTIFY_SOCKET`), and when systemd
/// asked for a watchdog, feeds it every half interval for as long as `alive` says so.
pub fn notify_ready(status: &str, alive: impl Fn() -> bool + Send + 'static) {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                if alive() {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
        });
    }
}

/// Tells systemd the service is stopping.
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Waits for SIGTERM or SIGINT.
pub async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Makes the socket's close send a reset (`SO_LINGER` 0) instead of a FIN. The reset goes
/// out when the stream is dropped.
pub fn reset_on_close(stream: &tokio::net::TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ =
        nix::sys::socket::setsockopt(&stream.as_fd(), nix::sys::socket::sockopt::Linger, &linger);
}

/// An I/O error's text without the " (os error N)" that repeats what the text says, for
/// messages that already name the path.
pub fn io_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// Creates `dir` and its parents with mode 0755 (less the umask).
pub fn create_dir(dir: &Path) -> Result<(), SysError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| SysError::CreateDir {
            path: dir.to_owned(),
            source,
        })
}

/// How long a back-off after a failed `accept` lasts (EMFILE and friends), so a listener
/// loop does not spin.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
