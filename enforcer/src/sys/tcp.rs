//! TCP socket facts and settings the in-kernel splice needs, read with `getsockopt` and
//! `ioctl` on the daemon's own sockets.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `SO_COOKIE`: unique to the socket while the host is up.
pub fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a u64.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    // SAFETY: all-zero is a valid tcp_info.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // `tcpi_bytes_received` and `tcpi_bytes_acked` came in Linux 4.1 and 4.2.
    if (len as usize) < std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TCP_INFO without byte counts (Linux 4.2 or newer is needed)",
        ));
    }
    Ok(info)
}

/// Sequence space received so far: every data byte, plus one once a FIN has arrived
/// (`tcpi_bytes_received`, which counts up to `rcv_nxt`).
pub fn received(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(tcp_info(fd)?.tcpi_bytes_received)
}

/// Sequence space handed to the socket for sending so far, up to a constant per socket
/// (its SYN): bytes acknowledged plus bytes still queued (`SIOCOUTQ`). Read in that order, the
/// sum never overstates: what is acknowledged between the two reads leaves the queue.
pub fn written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let acked = tcp_info(fd)?.tcpi_bytes_acked;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + u64::try_from(queued).unwrap_or(0))
}

/// `SO_RCVLOWAT`. Raising it holds received data in the socket's queue (no wake-up, no
/// verdict) until the queue is that long; lowering it to 1 runs the socket's data-ready
/// callback at once for what is queued (`tcp_set_rcvlowat`).
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    // SAFETY: setsockopt reads one int.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const bytes).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `SO_RCVBUFFORCE` and `SO_SNDBUFFORCE` (past `net.core.rmem_max` and `wmem_max`; needs
/// CAP_NET_ADMIN): the kernel doubles each for bookkeeping, and a set size turns that
/// buffer's autotuning off.
pub fn set_buffers(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(&fd, sockopt::RcvBufForce, &bytes)?;
    setsockopt(&fd, sockopt::SndBufForce, &bytes)?;
    Ok(())
}

/// Sends a FIN after what is queued (`shutdown(SHUT_WR)`).
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Write)
        .map_err(io::Error::from)
}

/// Makes the next close send a reset instead of a FIN.
pub fn reset_on_close(fd: BorrowedFd<'_>) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Linger, &linger);
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write as _,
        net::{Shutdown, TcpListener, TcpStream},
        os::fd::AsFd as _,
        time::Duration,
    };

    use super::*;

    /// The byte accounting the splice relies on: received counts data plus one for the FIN,
    /// and written grows by exactly what was written.
    #[test]
    fn counts_data_and_fin() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let before = written(client.as_fd()).unwrap();
        client.write_all(&[7u8; 1000]).unwrap();
        assert_eq!(written(client.as_fd()).unwrap() - before, 1000);
        let wait = |want: u64| {
            for _ in 0..200 {
                if received(server.as_fd()).unwrap() == want {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("received never reached {want}");
        };
        wait(1000);
        client.shutdown(Shutdown::Write).unwrap();
        wait(1001);
        assert_ne!(
            cookie(client.as_fd()).unwrap(),
            cookie(server.as_fd()).unwrap()
        );
    }
}
