//! Socket probe run inside enrolled cgroups by the end-to-end tests. Prints one result line;
//! exit status 0 on success, 1 when the operation failed (the line says how).
//!
//! probe tcp ADDR [HOST]      connect, print peer, send GET / with Host, print status line
//! probe tcp-hold ADDR SECS   connect, send GET with keep-alive, hold the connection
//! probe udp ADDR             send one datagram
//! probe raw-icmp IP          send an ICMP echo on a raw socket, wait for the reply
//! probe ping IP              send an ICMP echo on a ping socket, wait for the reply
//! probe whoami               print uid and NoNewPrivs
//! probe cgroup               print the cgroup v2 path
//! probe child ARGS...        run `probe ARGS...` as a child and print its cgroup first
//! probe loop ADDR HOST MS    connect-and-GET forever every MS ms, one line per attempt
//! probe raw ADDR BYTES        send BYTES (`\r`, `\n`, `\t`, `\\` escapes; `@FILE` reads a file),
//!                             print everything received until the peer closes (5 s at most)
//! probe ws ADDR HOST PATH     WebSocket-style upgrade; on 101 send "ping" and print the echo

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("tcp") => tcp(&args[1], args.get(2).map(String::as_str)),
        Some("tcp-hold") => tcp_hold(&args[1], args[2].parse().unwrap_or(5)),
        Some("udp") => udp(&args[1]),
        Some("raw-icmp") => icmp(&args[1], libc::SOCK_RAW),
        Some("ping") => icmp(&args[1], libc::SOCK_DGRAM),
        Some("whoami") => whoami(),
        Some("cgroup") => {
            println!("cgroup {}", cgroup());
            0
        }
        Some("child") => child(&args[1..]),
        Some("loop") => loop_get(&args[1], &args[2], args[3].parse().unwrap_or(100)),
        Some("raw") => raw(&args[1], &args[2]),
        Some("ws") => ws(&args[1], &args[2], &args[3]),
        _ => {
            eprintln!("usage: see the source");
            2
        }
    };
    std::process::exit(code);
}

fn cgroup() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("?")
        .to_owned()
}

fn get(addr: &str, host: Option<&str>) -> Result<(SocketAddr, String), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("bad address: {e}"))?;
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
    let addr: SocketAddr = addr.parse().expect("address");
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
            std::mem::size_of::<libc::timeval>() as u32,
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
            std::mem::size_of::<libc::sockaddr_in>() as u32,
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
    let addr: SocketAddr = addr.parse().expect("address");
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
    let addr: SocketAddr = addr.parse().expect("address");
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
