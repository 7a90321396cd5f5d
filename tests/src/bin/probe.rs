//! Socket probe run inside enrolled cgroups by the end-to-end tests. Prints one result line;
//! exit status 0 on success, 1 when the operation failed (the line says how).
//!
//! ADDR is IP:PORT or NAME:PORT; names go through the system resolver (getaddrinfo), so DNS
//! takes the path a real program's would.
//!
//! probe tcp ADDR [HOST]      connect, print peer, send GET / with Host, print status line
//! probe tcp-hold ADDR SECS   connect, send GET with keep-alive, hold the connection
//! probe udp ADDR             send one datagram
//! probe bind ADDR tcp|udp    bind a socket there; print "bound" or the error
//! probe raw-icmp IP          send an ICMP echo on a raw socket, wait for the reply
//! probe ping IP              send an ICMP echo on a ping socket, wait for the reply
//! probe whoami               print uid and NoNewPrivs
//! probe cgroup               print the cgroup v2 path
//! probe child ARGS...        run `probe ARGS...` as a child and print its cgroup first
//! probe loop ADDR HOST MS    connect-and-GET forever every MS ms, one line per attempt
//! probe stream ADDR HOST     GET with keep-alive, print "connected", then read until the
//!                            stream ends and print how ("ended reset", "ended eof", ...)
//! probe hold ADDR            connect (no request), print "connected", read until it ends
//! probe again ADDR HOST SECS GET, print "first ok", wait SECS, GET again on the same
//!                            connection, print "second ok" or "second failed ..."
//! probe dns SERVER NAME TYPE [tcp]   one query; prints "rcode R answers N [addrs] from SRC"
//! probe delay MS MODE ARGS... wait MS milliseconds, then run MODE
//! probe mptcp ADDR HOST      like tcp, on an MPTCP socket (IPPROTO_MPTCP)
//! probe bound DEV ADDR       connect a socket bound to DEV (SO_BINDTODEVICE)
//! probe raw ADDR BYTES       send BYTES (`\r`, `\n`, `\t`, `\\` escapes; `@FILE` reads a file),
//!                            print everything received until the peer closes (5 s at most)
//! probe ws ADDR HOST PATH    WebSocket-style upgrade; on 101 send "ping" and print the echo
//! probe streams N ADDR HOST  open N keep-alive streams (a GET answered on each), print
//!                            "ready", then wait until all have ended and a new connect
//!                            fails; print "closed T_LAST refused T_REFUSED" (CLOCK_MONOTONIC ns)
//! probe dns-flood SERVER N SUFFIX  N A queries for distinct names `q<i>.SUFFIX` on one UDP
//!                            socket, each waiting for its reply (1 s); print
//!                            "replies R of N"
//! probe tls-streams N ADDR HOST  open N keep-alive TLS connections (trusting SSL_CERT_FILE),
//!                            one GET answered on each; print "ready" and hold them until
//!                            stdin closes
//! probe refused-udp ADDR    print "ready", connect a UDP socket to ADDR (port 53) every 20 µs
//!                            until EPERM; print "refused T" (CLOCK_MONOTONIC ns)
//! probe blob-up ADDR N       to a `Blob` upstream: send N blob bytes, half-close, print
//!                            "sent N SHA reply COUNT SHA"
//! probe blob-down ADDR N     from a `Blob` upstream: read N blob bytes (N = 0: without end,
//!                            printing "flowing" after the first MiB) until the stream ends;
//!                            print "got COUNT SHA", or "ended HOW after COUNT"
//! probe storm IPV4:PORT N THREADS  N connects (one socket per thread, connect again after
//!                            each refusal), as fast as THREADS threads go; print
//!                            "refused R other O"

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(run(&args));
}

fn run(args: &[String]) -> i32 {
    match args.first().map(String::as_str) {
        Some("tcp") => tcp(&args[1], args.get(2).map(String::as_str)),
        Some("tcp-hold") => tcp_hold(&args[1], args[2].parse().unwrap_or(5)),
        Some("udp") => udp(&args[1]),
        Some("dns-flood") => dns_flood(&args[1], args[2].parse().unwrap_or(1), &args[3]),
        Some("storm") => storm(
            &args[1],
            args[2].parse().unwrap_or(1),
            args[3].parse().unwrap_or(1),
        ),
        Some("bind") => bind(&args[1], args.get(2).map_or("tcp", String::as_str)),
        Some("raw-icmp") => icmp(&args[1], libc::SOCK_RAW),
        Some("ping") => icmp(&args[1], libc::SOCK_DGRAM),
        Some("whoami") => whoami(),
        Some("cgroup") => {
            println!("cgroup {}", cgroup());
            0
        }
        Some("child") => child(&args[1..]),
        Some("loop") => loop_get(&args[1], &args[2], args[3].parse().unwrap_or(100)),
        Some("stream") => stream(&args[1], Some(&args[2])),
        Some("hold") => stream(&args[1], None),
        Some("again") => again(&args[1], &args[2], args[3].parse().unwrap_or(1)),
        Some("dns") => dns(
            &args[1],
            &args[2],
            &args[3],
            args.get(4).map(String::as_str) == Some("tcp"),
        ),
        Some("streams") => streams(args[1].parse().unwrap_or(1), &args[2], &args[3]),
        Some("raw") => raw(&args[1], &args[2]),
        Some("ws") => ws(&args[1], &args[2], &args[3]),
        Some("mptcp") => mptcp(&args[1], &args[2]),
        Some("bound") => bound(&args[1], &args[2]),
        Some("refused-udp") => refused_udp(&args[1]),
        Some("tls-streams") => tls_streams(args[1].parse().unwrap_or(1), &args[2], &args[3]),
        Some("blob-up") => blob_up(&args[1], args[2].parse().unwrap_or(0)),
        Some("blob-down") => blob_down(&args[1], args[2].parse().unwrap_or(0)),
        Some("delay") => {
            std::thread::sleep(Duration::from_millis(args[1].parse().unwrap_or(0)));
            run(&args[2..])
        }
        _ => {
            eprintln!("usage: see the source");
            2
        }
    }
}

fn cgroup() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("?")
        .to_owned()
}

/// The value, or print "error ..." and return exit status 1.
macro_rules! or_fail {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                println!("error {e}");
                return 1;
            }
        }
    };
}

/// IP:PORT as is; NAME:PORT through getaddrinfo (IPv4 first).
fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs as _;
    let all: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolve {addr}: {e}"))?
        .collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| format!("resolve {addr}: no address"))
}

fn get(addr: &str, host: Option<&str>) -> Result<(SocketAddr, String), String> {
    let addr = resolve(addr)?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e} (os error {})", e.raw_os_error().unwrap_or(0)))?;
    let peer = s.peer_addr().map_err(|e| format!("getpeername: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let host = host.map(str::to_owned).unwrap_or_else(|| addr.to_string());
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    Ok((peer, text))
}

fn tcp(addr: &str, host: Option<&str>) -> i32 {
    match get(addr, host) {
        Ok((peer, text)) => {
            let status = text.lines().next().unwrap_or("(no response)");
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
            println!("peer {peer} status {status} body {body}");
            0
        }
        Err(e) => {
            println!("error {e}");
            1
        }
    }
}

fn tcp_hold(addr: &str, secs: u64) -> i32 {
    let addr = or_fail!(resolve(addr));
    match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(mut s) => {
            println!("connected");
            let _ = std::io::stdout().flush();
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            std::thread::sleep(Duration::from_secs(secs));
            0
        }
        Err(e) => {
            println!("error connect: {e}");
            1
        }
    }
}

fn udp(addr: &str) -> i32 {
    let addr: SocketAddr = addr.parse().expect("address");
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let s = UdpSocket::bind(bind).expect("bind");
    match s.send_to(b"probe", addr) {
        Ok(_) => {
            println!("sent");
            0
        }
        Err(e) => {
            println!(
                "error send: {e} (os error {})",
                e.raw_os_error().unwrap_or(0)
            );
            1
        }
    }
}

fn dns_flood(server: &str, n: u32, suffix: &str) -> i32 {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RecordType},
    };
    let server: SocketAddr = server.parse().expect("server address");
    let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(1))).ok();
    sock.connect(server).expect("connect");
    let mut buf = vec![0u8; 4096];
    let mut replies = 0;
    for i in 0..n {
        let mut msg = Message::new((i & 0xffff) as u16, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(
            Name::from_ascii(format!("q{i}.{suffix}.")).expect("name"),
            RecordType::A,
        ));
        if sock.send(&msg.to_vec().expect("encode")).is_err() {
            continue;
        }
        if sock.recv(&mut buf).is_ok() {
            replies += 1;
        }
    }
    println!("replies {replies} of {n}");
    0
}

fn storm(addr: &str, n: u64, threads: u64) -> i32 {
    let SocketAddr::V4(addr) = addr.parse().expect("IPv4 address") else {
        panic!("storm takes an IPv4 address");
    };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                // SAFETY: plain socket(2) and connect(2) with a valid sockaddr_in.
                unsafe {
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                    assert!(fd >= 0, "socket");
                    let (mut refused, mut other) = (0u64, 0u64);
                    for _ in 0..n / threads {
                        let rc = libc::connect(
                            fd,
                            (&raw const sin).cast(),
                            size_of::<libc::sockaddr_in>() as libc::socklen_t,
                        );
                        if rc < 0 && *libc::__errno_location() == libc::EPERM {
                            refused += 1;
                        } else {
                            other += 1;
                        }
                    }
                    libc::close(fd);
                    (refused, other)
                }
            })
        })
        .collect();
    let (mut refused, mut other) = (0, 0);
    for w in workers {
        let (r, o) = w.join().expect("storm thread");
        refused += r;
        other += o;
    }
    println!("refused {refused} other {other}");
    0
}

fn bind(addr: &str, proto: &str) -> i32 {
    let addr: SocketAddr = addr.parse().expect("address");
    let result = if proto == "udp" {
        UdpSocket::bind(addr).map(drop)
    } else {
        std::net::TcpListener::bind(addr).map(drop)
    };
    match result {
        Ok(()) => {
            println!("bound");
            0
        }
        Err(e) => {
            println!(
                "error bind: {e} (os error {})",
                e.raw_os_error().unwrap_or(0)
            );
            1
        }
    }
}

/// ICMP echo to an IPv4 address on a raw (root) or ping (unprivileged) socket.
fn icmp(ip: &str, kind: libc::c_int) -> i32 {
    let ip: std::net::Ipv4Addr = ip.parse().expect("IPv4 address");
    // SAFETY: plain socket calls with checked results; buffers are local.
    unsafe {
        let fd = libc::socket(libc::AF_INET, kind, libc::IPPROTO_ICMP);
        if fd < 0 {
            println!("error socket: {}", std::io::Error::last_os_error());
            return 1;
        }
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        );
        // type 8 echo request, code 0, checksum, id 0x4242, seq 1, payload.
        let mut pkt = [
            8u8, 0, 0, 0, 0x42, 0x42, 0, 1, b'p', b'r', b'o', b'b', b'e', 0, 0, 0,
        ];
        let sum = checksum(&pkt);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip.octets()),
            },
            sin_zero: [0; 8],
        };
        let sent = libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        if sent < 0 {
            println!("error send: {}", std::io::Error::last_os_error());
            libc::close(fd);
            return 1;
        }
        let mut buf = [0u8; 1500];
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                break;
            }
            let n = n as usize;
            // Raw sockets deliver the IP header; ping sockets do not.
            let icmp = if kind == libc::SOCK_RAW {
                &buf[(buf[0] & 0x0f) as usize * 4..n]
            } else {
                &buf[..n]
            };
            if icmp.first() == Some(&0) {
                println!("reply");
                libc::close(fd);
                return 0;
            }
        }
        println!("error no reply");
        libc::close(fd);
        1
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn whoami() -> i32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let nnp = status
        .lines()
        .find_map(|l| l.strip_prefix("NoNewPrivs:"))
        .map(str::trim)
        .unwrap_or("?")
        .to_owned();
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    println!("uid {uid} no_new_privs {nnp}");
    0
}

fn child(args: &[String]) -> i32 {
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe)
        .arg("cgroup")
        .output()
        .expect("spawn child");
    print!("child {}", String::from_utf8_lossy(&out.stdout));
    let status = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args(args)
        .status()
        .expect("spawn child");
    status.code().unwrap_or(1)
}

fn loop_get(addr: &str, host: &str, ms: u64) -> i32 {
    loop {
        match get(addr, Some(host)) {
            Ok((_, text)) => println!("ok {}", text.lines().next().unwrap_or("")),
            Err(e) => println!("fail {e}"),
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Opens a connection (sending a keep-alive GET when `host` is given), then waits for it to
/// end and says how. A reset shows as "ended reset", a sock_diag destroy as "ended aborted".
fn stream(addr: &str, host: Option<&str>) -> i32 {
    let addr = or_fail!(resolve(addr));
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            println!(
                "error connect: {e} (os error {})",
                e.raw_os_error().unwrap_or(0)
            );
            return 1;
        }
    };
    if let Some(host) = host {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            println!("error write");
            return 1;
        }
        let mut first = [0u8; 512];
        match s.read(&mut first) {
            Ok(n) if n > 0 => {}
            other => {
                println!("error no response: {other:?}");
                return 1;
            }
        }
    }
    println!("connected");
    let _ = std::io::stdout().flush();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                println!("ended eof");
                return 0;
            }
            Ok(_) => {}
            Err(e) => {
                let how = match e.kind() {
                    std::io::ErrorKind::ConnectionReset => "reset".to_string(),
                    std::io::ErrorKind::ConnectionAborted => "aborted".to_string(),
                    _ => format!("error {e}"),
                };
                println!("ended {how}");
                return 0;
            }
        }
    }
}

/// Two GETs on one keep-alive connection, `secs` apart.
fn again(addr: &str, host: &str, secs: u64) -> i32 {
    let addr = or_fail!(resolve(addr));
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            println!(
                "error connect: {e} (os error {})",
                e.raw_os_error().unwrap_or(0)
            );
            return 1;
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut buf = [0u8; 4096];
    let ok = |s: &mut TcpStream, buf: &mut [u8]| {
        s.write_all(req.as_bytes()).is_ok()
            && matches!(s.read(buf), Ok(n) if n > 0 && buf[..n].starts_with(b"HTTP/1.1 200"))
    };
    if !ok(&mut s, &mut buf) {
        println!("first failed");
        return 1;
    }
    println!("first ok");
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(secs));
    if ok(&mut s, &mut buf) {
        println!("second ok");
        0
    } else {
        println!("second failed");
        1
    }
}

/// One DNS query with hickory-proto, over UDP (a connected socket, like glibc) or TCP.
fn dns(server: &str, name: &str, rtype: &str, tcp: bool) -> i32 {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RData, RecordType},
    };
    let server: SocketAddr = server.parse().expect("server address");
    let rtype: RecordType = rtype.parse().expect("record type");
    let mut msg = Message::new(0x4242, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(
        Name::from_ascii(format!("{name}.")).expect("name"),
        rtype,
    ));
    let bytes = msg.to_vec().expect("encode");
    let (reply, from) = if tcp {
        let mut s = match TcpStream::connect_timeout(&server, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(e) => {
                println!(
                    "error connect: {e} (os error {})",
                    e.raw_os_error().unwrap_or(0)
                );
                return 1;
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let from = s.peer_addr().expect("peer");
        let _ = s.write_all(&(bytes.len() as u16).to_be_bytes());
        let _ = s.write_all(&bytes);
        let mut len = [0u8; 2];
        if s.read_exact(&mut len).is_err() {
            println!("error no reply");
            return 1;
        }
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if s.read_exact(&mut buf).is_err() {
            println!("error short reply");
            return 1;
        }
        (buf, from)
    } else {
        let sock = UdpSocket::bind(if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })
        .expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5))).ok();
        if let Err(e) = sock.connect(server).and_then(|()| sock.send(&bytes)) {
            println!(
                "error send: {e} (os error {})",
                e.raw_os_error().unwrap_or(0)
            );
            return 1;
        }
        let mut buf = vec![0u8; 4096];
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => (buf[..n].to_vec(), from),
            Err(e) => {
                println!("error no reply: {e}");
                return 1;
            }
        }
    };
    let reply = match Message::from_vec(&reply) {
        Ok(m) => m,
        Err(e) => {
            println!("error bad reply: {e}");
            return 1;
        }
    };
    let addrs: Vec<String> = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    println!(
        "rcode {} answers {} [{}] from {from}",
        reply.metadata.response_code,
        reply.answers.len(),
        addrs.join(",")
    );
    0
}

/// Holds `n` streams open and reports when the last one ended and when a new connect was
/// refused, for the kill-switch benchmark.
fn streams(n: usize, addr: &str, host: &str) -> i32 {
    use std::os::fd::AsRawFd as _;
    // SAFETY: plain get/setrlimit on our own process.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let addr = or_fail!(resolve(addr));
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => s,
            Err(e) => {
                println!("error connect: {e}");
                return 1;
            }
        };
        let mut first = [0u8; 512];
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        if s.write_all(req.as_bytes()).is_err() || !matches!(s.read(&mut first), Ok(k) if k > 0) {
            println!("error no response");
            return 1;
        }
        conns.push(s);
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    // epoll, not poll: poll re-registers all n descriptors on every wake, which at 1,000
    // streams would make the client, not the kill switch, the slow part.
    // SAFETY: plain syscalls on descriptors this function owns; `events` outlives each call.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(
        ep >= 0,
        "epoll_create1: {}",
        std::io::Error::last_os_error()
    );
    for (i, c) in conns.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: i as u64,
        };
        // SAFETY: `ep` and the socket are open descriptors; `ev` outlives the call.
        let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c.as_raw_fd(), &mut ev) };
        assert_eq!(r, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut ended = vec![false; n];
    let mut open = n;
    let mut last = 0;
    // Whether new connects are refused is checked as soon as the first stream has ended (the
    // daemon sets the kernel flag before it resets streams), not after the last: checked at
    // the end, the time to drain every reset would be charged to the refusal too.
    let refused_now = || match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Some(enforcer_tests::monotonic_ns()),
        _ => None,
    };
    let mut refused = None;
    let mut first = 0u64;
    while open > 0 {
        // SAFETY: `events` has room for the count passed.
        let r = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 30_000) };
        if r <= 0 {
            println!("error timeout with {open} streams open");
            return 1;
        }
        for ev in &events[..r as usize] {
            let i = ev.u64 as usize;
            if ended[i] {
                continue;
            }
            let mut buf = [0u8; 512];
            match (&conns[i]).read(&mut buf) {
                Ok(k) if k > 0 => continue,
                _ => {
                    ended[i] = true;
                    let fd = conns[i].as_raw_fd();
                    // SAFETY: both descriptors are open; DEL takes no event.
                    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
                    open -= 1;
                    last = enforcer_tests::monotonic_ns();
                    if first == 0 {
                        first = last;
                    }
                }
            }
        }
        if refused.is_none() && open < n {
            refused = refused_now();
        }
    }
    // SAFETY: `ep` is ours and closed once.
    unsafe { libc::close(ep) };
    // New connects must be refused by now; poll until they are.
    let refused = loop {
        if let Some(t) = refused.or_else(refused_now) {
            break t;
        }
        std::thread::sleep(Duration::from_micros(100));
    };
    // `first`: when the first stream ended, i.e. when the kill switch's resets began to
    // arrive; the rest, up to `last`, is this client reading them.
    println!("closed {last} refused {refused} first {first}");
    0
}

/// A TCP socket of the given protocol, connected to `addr`.
fn socket_connect(
    addr: SocketAddr,
    protocol: libc::c_int,
    device: Option<&str>,
) -> Result<TcpStream, String> {
    use std::os::fd::FromRawFd as _;
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls; the descriptor is owned by the TcpStream from here on.
    let stream = unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM, protocol);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        TcpStream::from_raw_fd(fd)
    };
    if let Some(dev) = device {
        use std::os::fd::AsRawFd as _;
        // SAFETY: setsockopt with a valid buffer of the given length.
        let r = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                dev.as_ptr().cast(),
                dev.len() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(format!(
                "SO_BINDTODEVICE: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let sa = socket2_addr(addr);
    // SAFETY: connect with a sockaddr of the right length.
    let r = unsafe {
        use std::os::fd::AsRawFd as _;
        libc::connect(stream.as_raw_fd(), sa.0.as_ptr().cast(), sa.1)
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "connect: {e} (os error {})",
            e.raw_os_error().unwrap_or(0)
        ));
    }
    Ok(stream)
}

/// The sockaddr bytes of an address.
fn socket2_addr(addr: SocketAddr) -> (Vec<u8>, libc::socklen_t) {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: viewing a plain C struct as bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&raw const sin).cast::<u8>(),
                    size_of::<libc::sockaddr_in>(),
                )
            };
            (
                bytes.to_vec(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: viewing a plain C struct as bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&raw const sin6).cast::<u8>(),
                    size_of::<libc::sockaddr_in6>(),
                )
            };
            (
                bytes.to_vec(),
                size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

fn mptcp(addr: &str, host: &str) -> i32 {
    let addr = or_fail!(resolve(addr));
    let mut s = match socket_connect(addr, 262, None) {
        Ok(s) => s,
        Err(e) => {
            println!("error {e}");
            return 1;
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes());
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    println!("status {}", text.lines().next().unwrap_or("(none)"));
    0
}

fn bound(dev: &str, addr: &str) -> i32 {
    let addr = or_fail!(resolve(addr));
    match socket_connect(addr, 0, Some(dev)) {
        Ok(_) => {
            println!("connected");
            0
        }
        Err(e) => {
            println!("error {e}");
            1
        }
    }
}

/// `\r`, `\n`, `\t`, `\\` escapes, or `@FILE`.
fn unescape(arg: &str) -> Vec<u8> {
    if let Some(path) = arg.strip_prefix('@') {
        return std::fs::read(path).expect("read bytes file");
    }
    let mut out = Vec::new();
    let mut chars = arg.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut b = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some(other) => {
                let mut b = [0u8; 4];
                out.extend_from_slice(other.encode_utf8(&mut b).as_bytes());
            }
            None => out.push(b'\\'),
        }
    }
    out
}

fn raw(addr: &str, bytes: &str) -> i32 {
    let addr = or_fail!(resolve(addr));
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            println!(
                "error connect: {e} (os error {})",
                e.raw_os_error().unwrap_or(0)
            );
            return 1;
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    if let Err(e) = s.write_all(&unescape(bytes)) {
        println!("error write: {e}");
        return 1;
    }
    let mut resp = Vec::new();
    let closed = match s.read_to_end(&mut resp) {
        Ok(_) => "closed",
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
        Err(_) => "open",
    };
    println!("{}", String::from_utf8_lossy(&resp));
    println!("connection {closed}");
    0
}

fn ws(addr: &str, host: &str, path: &str) -> i32 {
    let addr = or_fail!(resolve(addr));
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            println!("error connect: {e}");
            return 1;
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        println!("error write");
        return 1;
    }
    // The head, byte by byte, so nothing after it is consumed.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text.lines().next().unwrap_or("(no response)").to_owned();
    println!("status {status}");
    if !status.contains(" 101 ") {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        println!("body {}", String::from_utf8_lossy(&rest));
        return 0;
    }
    if s.write_all(b"ping").is_err() {
        println!("error write after upgrade");
        return 1;
    }
    let mut echo = [0u8; 4];
    match s.read_exact(&mut echo) {
        Ok(()) => println!("echo {}", String::from_utf8_lossy(&echo)),
        Err(e) => println!("error echo: {e}"),
    }
    0
}

fn connect_or_print(addr: &str) -> Result<TcpStream, i32> {
    let addr = resolve(addr).map_err(|e| {
        println!("error resolve: {e}");
        1
    })?;
    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| {
        println!(
            "error connect: {e} (os error {})",
            e.raw_os_error().unwrap_or(0)
        );
        1
    })
}

fn blob_up(addr: &str, n: u64) -> i32 {
    use sha2::Digest as _;
    let mut s = match connect_or_print(addr) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut bytes = enforcer_tests::BlobBytes::default();
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    if s.write_all(b"sink\n").is_err() {
        println!("error write");
        return 1;
    }
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        bytes.fill(&mut buf[..k]);
        hash.update(&buf[..k]);
        if let Err(e) = s.write_all(&buf[..k]) {
            println!("error write after {}: {e}", n - left);
            return 1;
        }
        left -= k as u64;
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut reply = String::new();
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    if let Err(e) = s.read_to_string(&mut reply) {
        println!("error reply: {e}");
        return 1;
    }
    println!(
        "sent {n} {} reply {}",
        hex::encode(hash.finalize()),
        reply.trim()
    );
    0
}

fn blob_down(addr: &str, n: u64) -> i32 {
    use sha2::Digest as _;
    let mut s = match connect_or_print(addr) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if s.write_all(format!("source {n}\n").as_bytes()).is_err() {
        println!("error write");
        return 1;
    }
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut count = 0u64;
    let mut told = false;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                hash.update(&buf[..k]);
                count += k as u64;
                if n == 0 && !told && count >= 1 << 20 {
                    println!("flowing");
                    let _ = std::io::stdout().flush();
                    told = true;
                }
            }
            Err(e) => {
                let how = match e.kind() {
                    std::io::ErrorKind::ConnectionReset => "reset".to_string(),
                    other => format!("{other:?}"),
                };
                println!("ended {how} after {count}");
                return 1;
            }
        }
    }
    if n == 0 {
        println!("ended eof after {count}");
        return 1;
    }
    println!("got {count} {}", hex::encode(hash.finalize()));
    0
}

/// `refused-udp ADDR`: prints "ready", then connects a UDP socket to ADDR (a DNS port, which
/// the kernel hook rewrites to the resolver without a packet) every 20 µs until the connect
/// fails with EPERM; prints "refused T" (CLOCK_MONOTONIC ns). Nothing reaches the daemon, so
/// the kill switch is timed without loading it.
fn refused_udp(addr: &str) -> i32 {
    let addr = or_fail!(resolve(addr));
    println!("ready");
    let _ = std::io::stdout().flush();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let socket = or_fail!(UdpSocket::bind("0.0.0.0:0"));
    while std::time::Instant::now() < deadline {
        match socket.connect(addr) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                println!("refused {}", enforcer_tests::monotonic_ns());
                return 0;
            }
            _ => std::thread::sleep(Duration::from_micros(20)),
        }
    }
    println!("error never refused");
    1
}

fn raise_nofile() {
    // SAFETY: plain get/setrlimit on our own process.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

fn tls_streams(n: usize, addr: &str, host: &str) -> i32 {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    raise_nofile();
    let addr = or_fail!(resolve(addr));
    let bundle = or_fail!(std::env::var("SSL_CERT_FILE"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in or_fail!(CertificateDer::pem_file_iter(&bundle)).flatten() {
        let _ = roots.add(cert);
    }
    let config = std::sync::Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    // HOST may carry a port (for the Host header); the TLS name is without it.
    let tls_name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let name = or_fail!(ServerName::try_from(tls_name.to_owned()));
    let req = format!("GET /v1/bench HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let tcp = match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => s,
            Err(e) => {
                println!("error connect {i}: {e}");
                return 1;
            }
        };
        tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let conn = or_fail!(rustls::ClientConnection::new(config.clone(), name.clone()));
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut first = [0u8; 512];
        if let Err(e) = tls.write_all(req.as_bytes()) {
            println!("error write {i}: {e}");
            return 1;
        }
        if !matches!(tls.read(&mut first), Ok(k) if k > 0) {
            println!("error no response {i}");
            return 1;
        }
        conns.push(tls);
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(conns);
    0
}
