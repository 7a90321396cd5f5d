//! Destroying the TCP sockets of a set of cgroups with sock_diag `SOCK_DESTROY`
//! (`CONFIG_INET_DIAG_DESTROY`), so the kill switch stops flows at once instead of letting
//! dropped packets stall them for minutes. Messages are built and parsed by
//! netlink-packet-sock-diag.

use std::collections::HashSet;

use netlink_packet_core::{
    DefaultNla, Emitable as _, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, Nla as _,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use super::sched::urgently;

/// `SOCK_DESTROY` netlink message type (linux/sock_diag.h).
const SOCK_DESTROY: u16 = 21;
/// `INET_DIAG_CGROUP_ID` attribute (linux/inet_diag.h), always sent since Linux 5.7.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `INET_DIAG_REQ_BYTECODE` request attribute: a filter program run on every socket
/// (linux/inet_diag.h).
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// `INET_DIAG_BC_CGROUP_COND` filter op: the socket's cgroup v2 id equals the u64 after the
/// op (linux/inet_diag.h, since Linux 5.9).
const INET_DIAG_BC_CGROUP_COND: u8 = 13;
/// Up to this many cgroups are dumped one by one, each filtered in the kernel, which then
/// reports only their sockets; past it one unfiltered dump reports every TCP socket of the
/// host and the cgroups are picked here.
const FILTERED_DUMPS_MAX: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("sock_diag netlink socket: {0}; is CONFIG_INET_DIAG enabled?")]
    Socket(std::io::Error),
    #[error("sock_diag dump failed: {0}")]
    Dump(String),
}

/// A socket found in one of the cgroups.
#[derive(Debug, Clone)]
struct Found {
    family: u8,
    id: SocketId,
    /// The state the dump saw; `None`: any.
    states: Option<u8>,
}

/// Destroys every TCP socket (any state) whose cgroup id is in `cgroups`: the agent's own
/// end of every stream, so its reads fail at once whatever the proxy is doing. Returns how
/// many were destroyed. Sockets that vanish meanwhile are not errors.
pub fn destroy_tcp_in(cgroups: &HashSet<u64>) -> Result<usize, SockDiagError> {
    if cgroups.is_empty() {
        return Ok(0);
    }
    let t0 = std::time::Instant::now();
    let mut socket = diag_socket()?;
    let mut found = Vec::new();
    for family in [AF_INET, AF_INET6] {
        found.extend(dump(&mut socket, family, cgroups)?);
    }
    let dumped = t0.elapsed();
    let mut destroyed = 0;
    for batch in found.chunks(DESTROY_BATCH) {
        destroyed += destroy_batch(&mut socket, batch)?;
    }
    tracing::debug!(
        found = found.len(),
        destroyed,
        dump_us = dumped.as_micros() as u64,
        total_us = t0.elapsed().as_micros() as u64,
        "sock_diag destroy"
    );
    Ok(destroyed)
}

/// A netlink socket talking to the kernel's sock_diag.
fn diag_socket() -> Result<Socket, SockDiagError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(SockDiagError::Socket)?;
    socket.bind_auto().map_err(SockDiagError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(SockDiagError::Socket)?;
    Ok(socket)
}

/// One TCP socket, named exactly: its addresses and its cookie.
///
/// The cookie is what makes a destroy by address safe. Once a socket is gone (a stream that
/// closed between the kill switch's list and its destroy), the kernel's lookup by address
/// falls back to a listening socket on the local address, and without a cookie to check it
/// would destroy that instead: the proxy's listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketRef {
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    /// `SO_COOKIE`: unique to the socket while the host is up.
    pub cookie: u64,
}

impl SocketRef {
    /// The connected socket `fd`, whose addresses the caller knows; `None` when its cookie
    /// cannot be read.
    pub fn new(
        fd: &impl std::os::fd::AsFd,
        local: std::net::SocketAddr,
        remote: std::net::SocketAddr,
    ) -> Option<SocketRef> {
        use std::os::fd::AsRawFd as _;
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a u64.
        let r = unsafe {
            libc::getsockopt(
                fd.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        (r == 0 && len as usize == size_of::<u64>()).then_some(SocketRef {
            local,
            remote,
            cookie,
        })
    }

    /// The cookie as `inet_diag_sockid` carries it: two u32 words, the low one first.
    fn diag_cookie(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&(self.cookie as u32).to_ne_bytes());
        out[4..].copy_from_slice(&((self.cookie >> 32) as u32).to_ne_bytes());
        out
    }
}

/// Destroys these TCP sockets, found by their addresses and checked by their cookies (no
/// dump): the kill switch knows our end of every proxied stream. The kernel sends each peer
/// a reset. Returns how many were destroyed; sockets that closed meanwhile are not errors.
pub fn destroy_tcp(sockets: &[SocketRef]) -> Result<usize, SockDiagError> {
    if sockets.is_empty() {
        return Ok(0);
    }
    let mut socket = diag_socket()?;
    let found: Vec<Found> = sockets
        .iter()
        .map(|s| {
            let (local, remote) = (unmap(s.local), unmap(s.remote));
            Found {
                family: if local.is_ipv4() { AF_INET } else { AF_INET6 },
                id: SocketId {
                    source_port: local.port(),
                    destination_port: remote.port(),
                    source_address: local.ip(),
                    destination_address: remote.ip(),
                    interface_id: 0,
                    cookie: s.diag_cookie(),
                },
                states: None,
            }
        })
        .collect();
    let mut destroyed = 0;
    for batch in found.chunks(DESTROY_BATCH) {
        destroyed += destroy_batch(&mut socket, batch)?;
    }
    Ok(destroyed)
}

/// [`destroy_tcp`] split over one thread per CPU (this one included), all under
/// `SCHED_FIFO` ([`urgently`]): the kernel's work per socket (the reset, its delivery over
/// loopback, the wake-ups) dominates, and it runs in parallel on different sockets. Small sets
/// stay on this thread. Returns how many were destroyed; the first error wins.
pub fn destroy_tcp_urgently(sockets: &[SocketRef]) -> Result<usize, SockDiagError> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let parts = cpus.min(sockets.len().div_ceil(PARALLEL_MIN)).clamp(1, 8);
    // The helpers are started from inside: they inherit the real-time policy, so the kernel
    // places each at once on a CPU that runs no real-time task. Started before it, one may
    // wait behind this thread on its CPU until the end (seen: half the sockets destroyed
    // one after the other instead of side by side).
    urgently(|| {
        if parts == 1 {
            return destroy_tcp(sockets);
        }
        let chunk = sockets.len().div_ceil(parts);
        let mut chunks = sockets.chunks(chunk);
        let first = chunks.next().unwrap_or_default();
        std::thread::scope(|scope| {
            let others: Vec<_> = chunks
                .map(|part| scope.spawn(move || destroy_tcp(part)))
                .collect();
            let mut total = destroy_tcp(first)?;
            for handle in others {
                total += handle
                    .join()
                    .map_err(|_| SockDiagError::Dump("a destroying thread panicked".into()))??;
            }
            Ok(total)
        })
    })
}

/// Fewer sockets than this per thread are not worth a thread.
const PARALLEL_MIN: usize = 256;

/// An IPv4-mapped IPv6 address as the IPv4 one: an IPv4 socket seen from a dual-stack
/// listener.
fn unmap(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr {
        std::net::SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => std::net::SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Destroy requests sent in one `sendmsg` (the errors of a batch that fails whole must fit
/// the receive buffer).
const DESTROY_BATCH: usize = 128;

fn request(family: u8, id: SocketId, states: StateFlags) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states,
        socket_id: id,
    })
}

fn serialize(flags: u16, seq: u32, msg: SockDiagMessage, message_type: Option<u16>) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(header, msg.into());
    packet.finalize();
    if let Some(t) = message_type {
        packet.header.message_type = t;
    }
    let mut buf = vec![0; packet.header.length as usize];
    packet.serialize(&mut buf[..]);
    buf
}

fn dump(
    socket: &mut Socket,
    family: u8,
    cgroups: &HashSet<u64>,
) -> Result<Vec<Found>, SockDiagError> {
    // Why filter in the kernel: on a busy host an unfiltered dump serialises every TCP
    // socket (with 1,000 killed streams open, about 4,000 sockets and 3-10 ms), while the
    // kill switch needs only the killed cgroups' few.
    if cgroups.len() <= FILTERED_DUMPS_MAX {
        let mut out = Vec::new();
        for &cgroup in cgroups {
            match dump_filtered(socket, family, Some(cgroup), cgroups) {
                Ok(found) => out.extend(found),
                Err(e) => {
                    // A kernel without the cgroup filter refuses the program: fall back to
                    // the unfiltered dump, which destroys the same sockets, only slower.
                    tracing::debug!("sock_diag cgroup filter refused ({e}); dumping unfiltered");
                    return dump_filtered(socket, family, None, cgroups);
                }
            }
        }
        return Ok(out);
    }
    dump_filtered(socket, family, None, cgroups)
}

/// Dumps the TCP sockets of `family` (only those of cgroup `filter`, when given, as the
/// kernel filters them) and keeps those in `cgroups`.
fn dump_filtered(
    socket: &mut Socket,
    family: u8,
    filter: Option<u64>,
    cgroups: &HashSet<u64>,
) -> Result<Vec<Found>, SockDiagError> {
    let id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut message = serialize(
        NLM_F_REQUEST | NLM_F_DUMP,
        0,
        request(family, id, StateFlags::all()),
        None,
    );
    if let Some(cgroup) = filter {
        append_attribute(
            &mut message,
            &DefaultNla::new(INET_DIAG_REQ_BYTECODE, cgroup_filter(cgroup)),
        );
    }
    socket
        .send(&message, 0)
        .map_err(|e| SockDiagError::Dump(e.to_string()))?;
    let mut out = Vec::new();
    recv_until(socket, Wait::ForMore, |payload| match payload {
        NetlinkPayload::Done(_) => Ok(false),
        NetlinkPayload::Error(e) => Err(SockDiagError::Dump(format!("{e:?}"))),
        // The cgroup is checked here too: the filter only saves work.
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r))
            if cgroup_of(&r).is_some_and(|c| cgroups.contains(&c)) =>
        {
            out.push(Found {
                family,
                id: r.header.socket_id.clone(),
                states: Some(r.header.state),
            });
            Ok(true)
        }
        _ => Ok(true),
    })?;
    Ok(out)
}

/// A sock_diag filter program matching the sockets of one cgroup: a single
/// `INET_DIAG_BC_CGROUP_COND` op (`struct inet_diag_bc_op { u8 code; u8 yes; u16 no; }`, then
/// the u64 id). The kernel runs it with `len` = its length: a match jumps `yes` = 12 bytes,
/// to exactly the end (accept); a miss jumps `no` = 16, past the end (reject).
fn cgroup_filter(cgroup: u64) -> Vec<u8> {
    const OP_LEN: u8 = 4 + 8;
    let mut bc = vec![INET_DIAG_BC_CGROUP_COND, OP_LEN];
    bc.extend_from_slice(&(u16::from(OP_LEN) + 4).to_ne_bytes());
    bc.extend_from_slice(&cgroup.to_ne_bytes());
    bc
}

/// Appends a request attribute to a serialized netlink message and updates its length.
fn append_attribute(message: &mut Vec<u8>, nla: &DefaultNla) {
    let at = message.len();
    message.resize(at + nla.buffer_len(), 0);
    nla.emit(&mut message[at..]);
    let len = message.len() as u32;
    NetlinkBuffer::new(&mut message[..]).set_length(len);
}

/// Which messages [`recv_until`] waits for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Until `each` says stop.
    ForMore,
    /// None: only those already queued, then it stops.
    Never,
}

/// Reads netlink messages and hands each payload to `each`, until it returns `Ok(false)` (or,
/// with [`Wait::Never`], until none is queued).
fn recv_until(
    socket: &mut Socket,
    wait: Wait,
    mut each: impl FnMut(NetlinkPayload<SockDiagMessage>) -> Result<bool, SockDiagError>,
) -> Result<(), SockDiagError> {
    let mut buf = vec![0u8; 64 * 1024];
    let flags = match wait {
        Wait::ForMore => 0,
        Wait::Never => libc::MSG_DONTWAIT,
    };
    loop {
        let size = match socket.recv(&mut &mut buf[..], flags) {
            Ok(size) => size,
            Err(e) if wait == Wait::Never && e.kind() == std::io::ErrorKind::WouldBlock => {
                return Ok(());
            }
            Err(e) => return Err(SockDiagError::Dump(e.to_string())),
        };
        let mut offset = 0;
        while offset < size {
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&buf[offset..size])
                .map_err(|e| SockDiagError::Dump(e.to_string()))?;
            let len = msg.header.length as usize;
            if !each(msg.payload)? {
                return Ok(());
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

fn cgroup_of(r: &InetResponse) -> Option<u64> {
    r.nlas.iter().find_map(|nla| match nla {
        Nla::Other(attr) if attr.kind() == INET_DIAG_CGROUP_ID && attr.value_len() == 8 => {
            let mut v = [0u8; 8];
            attr.emit_value(&mut v);
            Some(u64::from_ne_bytes(v))
        }
        _ => None,
    })
}

/// Sends `SOCK_DESTROY` for every socket in `batch` in one `sendmsg`, then counts the
/// failures. Returns how many succeeded.
///
/// No ack is asked for: the kernel handles netlink requests to it synchronously, inside the
/// `sendmsg`, and answers a failed request with an error message even so. When the send
/// returns, every request has been handled and the errors are already queued on our socket;
/// a success leaves nothing to allocate, queue or read (on a 2-vCPU VM, 1,000 destroys took
/// 1.9-2.0 ms this way against 2.3 ms with an ack each).
fn destroy_batch(socket: &mut Socket, batch: &[Found]) -> Result<usize, SockDiagError> {
    let mut out = Vec::new();
    for (seq, f) in batch.iter().enumerate() {
        let states = f.states.map_or(StateFlags::all(), |st| {
            StateFlags::from_bits_truncate(1 << st)
        });
        out.extend(serialize(
            NLM_F_REQUEST,
            seq as u32 + 1,
            request(f.family, f.id.clone(), states),
            Some(SOCK_DESTROY),
        ));
    }
    socket
        .send(&out, 0)
        .map_err(|e| SockDiagError::Dump(e.to_string()))?;
    let mut failed = 0;
    recv_until(socket, Wait::Never, |payload| {
        // Most often ENOENT: the socket closed meanwhile.
        if let NetlinkPayload::Error(e) = payload
            && e.code.is_some()
        {
            failed += 1;
        }
        Ok(true)
    })?;
    Ok(batch.len().saturating_sub(failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our cgroup's id, and a connected pair of TCP sockets created in it; the client's
    /// local port.
    fn own_sockets() -> (u64, (std::net::TcpStream, std::net::TcpStream), u16) {
        let hierarchy = crate::cgroup::Hierarchy::discover().expect("cgroup2 is mounted");
        let own = hierarchy.of_pid(std::process::id()).unwrap();
        let id = crate::cgroup::cgroup_id(&own).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let port = client.local_addr().unwrap().port();
        let (server, _) = listener.accept().unwrap();
        (id, (client, server), port)
    }

    /// A socket of ours, named exactly.
    fn own_ref(s: &std::net::TcpStream) -> SocketRef {
        SocketRef::new(s, s.local_addr().unwrap(), s.peer_addr().unwrap()).unwrap()
    }

    fn ports(found: &[Found]) -> Vec<u16> {
        found.iter().map(|f| f.id.source_port).collect()
    }

    #[test]
    fn destroys_are_counted_without_acks_and_the_peer_reads_a_reset() {
        use std::io::Read as _;
        let pairs: Vec<_> = (0..3).map(|_| own_sockets().1).collect();
        // Our server ends, as the proxy knows its own ends; one of them twice: the second
        // destroy fails and is not counted.
        let mut ends: Vec<_> = pairs.iter().map(|(_, server)| own_ref(server)).collect();
        assert_eq!(ends[0].local, pairs[0].1.local_addr().unwrap());
        assert_eq!(ends[0].remote, pairs[0].1.peer_addr().unwrap());
        ends.push(ends[0]);
        assert_eq!(destroy_tcp(&ends).unwrap(), 3);
        for (mut client, _) in pairs {
            let mut buf = [0u8; 8];
            let err = client.read(&mut buf).expect_err("the stream was reset");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        }
    }

    #[test]
    fn a_destroy_by_address_never_reaches_the_listener() {
        // A stream accepted by a listener, then closed: the kernel's lookup of its addresses
        // now finds the listener, which has the same local address. The cookie keeps the
        // destroy off it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let gone = own_ref(&server);
        drop(client);
        drop(server);
        assert_eq!(destroy_tcp(&[gone]).unwrap(), 0);
        let again = std::net::TcpStream::connect(listener.local_addr().unwrap());
        assert!(again.is_ok(), "the listener was destroyed: {again:?}");
        // The same request without a cookie (INET_DIAG_NOCOOKIE) does reach it, which is
        // what this guards against.
        let mut socket = diag_socket().unwrap();
        let blind = Found {
            family: AF_INET,
            id: SocketId {
                source_port: gone.local.port(),
                destination_port: gone.remote.port(),
                source_address: gone.local.ip(),
                destination_address: gone.remote.ip(),
                interface_id: 0,
                cookie: [0xff; 8],
            },
            states: None,
        };
        assert_eq!(
            destroy_batch(&mut socket, std::slice::from_ref(&blind)).unwrap(),
            1
        );
        let refused = std::net::TcpStream::connect(listener.local_addr().unwrap());
        assert!(refused.is_err(), "{refused:?}");
    }

    #[test]
    fn the_kernel_filters_a_dump_by_cgroup() {
        let (own, _sockets, port) = own_sockets();
        let mut socket = diag_socket().unwrap();
        let wanted = HashSet::from([own]);
        // Filtered on our cgroup: our client socket is there.
        let found = dump_filtered(&mut socket, AF_INET, Some(own), &wanted).unwrap();
        assert!(ports(&found).contains(&port), "{:?}", ports(&found));
        // Filtered on another cgroup id: the kernel reports nothing, so nothing of ours is
        // kept although ours is wanted (an ignored filter would let it through).
        let found = dump_filtered(&mut socket, AF_INET, Some(own ^ 0x5a5a), &wanted).unwrap();
        assert!(found.is_empty(), "{:?}", ports(&found));
        // Unfiltered: the same socket, picked here.
        let found = dump_filtered(&mut socket, AF_INET, None, &wanted).unwrap();
        assert!(ports(&found).contains(&port));
    }

    #[test]
    fn many_cgroups_are_dumped_at_once_and_picked_here() {
        let (own, _sockets, port) = own_sockets();
        let mut socket = diag_socket().unwrap();
        let few = HashSet::from([own, own ^ 1]);
        let many: HashSet<u64> = (0..FILTERED_DUMPS_MAX as u64 + 1)
            .map(|i| own ^ (i << 1))
            .collect();
        assert!(many.contains(&own) && many.len() > FILTERED_DUMPS_MAX);
        for set in [&few, &many] {
            let found = dump(&mut socket, AF_INET, set).unwrap();
            assert!(ports(&found).contains(&port), "{} cgroups", set.len());
        }
    }

    #[test]
    fn the_filter_program_is_one_cgroup_op() {
        let bc = cgroup_filter(0x0102_0304_0506_0708);
        assert_eq!(bc.len(), 12);
        assert_eq!(bc[0], INET_DIAG_BC_CGROUP_COND);
        assert_eq!(bc[1], 12, "a match lands exactly on the end");
        assert_eq!(
            u16::from_ne_bytes([bc[2], bc[3]]),
            16,
            "a miss jumps past it"
        );
        assert_eq!(
            u64::from_ne_bytes(bc[4..].try_into().unwrap()),
            0x0102_0304_0506_0708
        );
    }
}
