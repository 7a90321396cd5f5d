//! The daemon's listening sockets and systemd's file-descriptor store.
//!
//! Under systemd (`NOTIFY_SOCKET` set) every proxy and resolver socket is handed to the
//! service manager with `FDSTORE=1` once bound. After a crash or restart, systemd passes them
//! back (`LISTEN_FDS`, named by `LISTEN_FDNAMES`) and they are reused instead of bound again:
//! during the gap the kernel keeps completing handshakes into their backlogs, so an agent's
//! connect waits for the new daemon instead of failing.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use tokio::net::{TcpListener, TcpSocket, UdpSocket};

/// A listening socket that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "binding {name} to {proto} {addr}: {io}; is another enforcer running, or is the port \
         taken? (`ss -lntup` shows who holds it)", io = crate::sys::io_text(source))]
    Bind {
        name: String,
        proto: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("setting up {name} on {addr}: {io}", io = crate::sys::io_text(source))]
    Setup {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Sockets systemd handed back, by name.
#[derive(Default)]
pub struct Inherited {
    fds: HashMap<String, OwnedFd>,
}

impl Inherited {
    /// Takes `LISTEN_FDS` (and unsets the variables so nothing else inherits them).
    ///
    /// # Safety
    /// Must run while the process is single-threaded (it changes the environment).
    pub unsafe fn from_env() -> Inherited {
        // SAFETY: the caller guarantees no other thread reads the environment.
        let fds = match unsafe { sd_notify::listen_fds_with_names_and_unset_env() } {
            Ok(fds) => fds,
            Err(e) => {
                eprintln!("enforcer: ignoring LISTEN_FDS: {e}");
                return Inherited::default();
            }
        };
        let fds = fds
            // SAFETY: systemd passed these descriptors to us; nothing else owns them.
            .map(|(fd, name)| (name, unsafe { OwnedFd::from_raw_fd(fd) }))
            .collect();
        Inherited { fds }
    }

    fn take(&mut self, name: &str, addr: SocketAddr, kind: libc::c_int) -> Option<OwnedFd> {
        let fd = self.fds.remove(name)?;
        // Only reuse a socket of the right type bound where the config now says.
        let ok_addr =
            nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd())
                .ok()
                .and_then(|s| {
                    s.as_sockaddr_in()
                        .map(|a| SocketAddr::from((a.ip(), a.port())))
                        .or_else(|| {
                            s.as_sockaddr_in6()
                                .map(|a| SocketAddr::from((a.ip(), a.port())))
                        })
                })
                == Some(addr);
        let ok_kind = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
            .map(|t| t as libc::c_int == kind)
            .unwrap_or(false);
        if ok_addr && ok_kind {
            tracing::info!(name, %addr, "reusing the socket systemd kept for us");
            Some(fd)
        } else {
            tracing::warn!(name, %addr, "dropping a stored socket that no longer matches the config");
            None
        }
    }

    /// Names of stored sockets nobody took (config changed): systemd should forget them.
    pub fn leftovers(&self) -> Vec<String> {
        self.fds.keys().cloned().collect()
    }
}

/// A TCP listener on `addr`: the inherited one, or a new one.
pub fn tcp(
    inherited: &mut Inherited,
    name: &str,
    addr: SocketAddr,
) -> Result<TcpListener, ListenError> {
    let setup = |source| ListenError::Setup {
        name: name.to_owned(),
        addr,
        source,
    };
    if let Some(fd) = inherited.take(name, addr, libc::SOCK_STREAM) {
        let std = std::net::TcpListener::from(fd);
        std.set_nonblocking(true).map_err(setup)?;
        return TcpListener::from_std(std).map_err(setup);
    }
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(setup)?;
    socket.set_reuseaddr(true).map_err(setup)?;
    socket.bind(addr).map_err(|source| ListenError::Bind {
        name: name.to_owned(),
        proto: "tcp",
        addr,
        source,
    })?;
    socket.listen(4096).map_err(setup)
}

/// A UDP socket on `addr`: the inherited one, or a new one.
pub fn udp(
    inherited: &mut Inherited,
    name: &str,
    addr: SocketAddr,
) -> Result<UdpSocket, ListenError> {
    let setup = |source| ListenError::Setup {
        name: name.to_owned(),
        addr,
        source,
    };
    let std = match inherited.take(name, addr, libc::SOCK_DGRAM) {
        Some(fd) => std::net::UdpSocket::from(fd),
        None => std::net::UdpSocket::bind(addr).map_err(|source| ListenError::Bind {
            name: name.to_owned(),
            proto: "udp",
            addr,
            source,
        })?,
    };
    std.set_nonblocking(true).map_err(setup)?;
    UdpSocket::from_std(std).map_err(setup)
}

/// Hands a socket to systemd's fd store (a no-op without `NOTIFY_SOCKET`).
pub fn store(name: &str, fd: std::os::fd::BorrowedFd<'_>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let state = [
        sd_notify::NotifyState::FdStore,
        sd_notify::NotifyState::FdName(name),
    ];
    if let Err(e) = sd_notify::notify_with_fds(&state, &[fd]) {
        tracing::warn!(
            name,
            "cannot store the socket with systemd ({e}); a restart will refuse connects briefly"
        );
    }
}

/// Asks systemd to forget stored sockets that no longer match the config.
pub fn forget(names: &[String]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    for name in names {
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::FdStoreRemove,
            sd_notify::NotifyState::FdName(name),
        ]);
    }
}

/// Stores every listener under its name.
pub fn store_all(sockets: &[(&str, std::os::fd::BorrowedFd<'_>)]) {
    for (name, fd) in sockets {
        store(name, fd.as_fd());
    }
}

/// The daemon's listening sockets: the proxy on 127.0.0.1 and `[::1]` at `proxy_port`, the
/// resolver on both at `dns_port` over UDP and TCP.
pub struct Listeners {
    pub proxy_v4: TcpListener,
    pub proxy_v6: TcpListener,
    pub dns_udp_v4: UdpSocket,
    pub dns_udp_v6: UdpSocket,
    pub dns_tcp_v4: TcpListener,
    pub dns_tcp_v6: TcpListener,
}

impl Listeners {
    /// Takes the sockets systemd kept across a restart, binds the others, hands them all to
    /// systemd's store, and asks it to forget any stored socket that is no longer wanted.
    pub fn open(
        mut inherited: Inherited,
        proxy_port: u16,
        dns_port: u16,
    ) -> Result<Listeners, ListenError> {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let inherited = &mut inherited;
        let listeners = Listeners {
            proxy_v4: tcp(inherited, "proxy-v4", SocketAddr::new(v4, proxy_port))?,
            proxy_v6: tcp(inherited, "proxy-v6", SocketAddr::new(v6, proxy_port))?,
            dns_udp_v4: udp(inherited, "dns-udp-v4", SocketAddr::new(v4, dns_port))?,
            dns_udp_v6: udp(inherited, "dns-udp-v6", SocketAddr::new(v6, dns_port))?,
            dns_tcp_v4: tcp(inherited, "dns-tcp-v4", SocketAddr::new(v4, dns_port))?,
            dns_tcp_v6: tcp(inherited, "dns-tcp-v6", SocketAddr::new(v6, dns_port))?,
        };
        forget(&inherited.leftovers());
        store_all(&[
            ("proxy-v4", listeners.proxy_v4.as_fd()),
            ("proxy-v6", listeners.proxy_v6.as_fd()),
            ("dns-udp-v4", listeners.dns_udp_v4.as_fd()),
            ("dns-udp-v6", listeners.dns_udp_v6.as_fd()),
            ("dns-tcp-v4", listeners.dns_tcp_v4.as_fd()),
            ("dns-tcp-v6", listeners.dns_tcp_v6.as_fd()),
        ]);
        Ok(listeners)
    }
}
