//! A loopback HTTP/HTTPS upstream for `cargo xtask bench`, serving until killed.
//!
//! enforcer-upstream http ADDR THREADS
//! enforcer-upstream https ADDR THREADS CA_PEM_OUT NAME...
//! enforcer-upstream relay ADDR TARGET
//!
//! `https` makes a test CA, writes its certificate to CA_PEM_OUT and serves a leaf for the
//! NAMEs. `relay` is the benchmark's reference hop: a bare TCP relay to TARGET threaded like
//! the daemon's proxy (one single-threaded tokio runtime per CPU, `copy_bidirectional`, no
//! policy, no audit), so the cost of one more hop on this machine is measured apart from
//! enforcer's.
//! Prints `ready ADDR` once listening.

use std::{io::Write as _, net::SocketAddr};

use enforcer_tests::web::{TestCa, WebUpstream};

fn main() {
    // The memory benchmark holds 10,000 connections open through the proxy.
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!(
            "usage: enforcer-upstream (http ADDR THREADS | https ADDR THREADS CA_PEM NAME... \
             | relay ADDR TARGET)"
        );
        std::process::exit(2)
    };
    let (Some(mode), Some(addr), Some(threads)) = (args.first(), args.get(1), args.get(2)) else {
        usage()
    };
    let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
    if mode == "relay" {
        let target: SocketAddr = threads.parse().unwrap_or_else(|_| usage());
        relay(addr, target);
    }
    let threads: usize = threads.parse().unwrap_or_else(|_| usage());
    let ip = addr.ip().to_string();
    let upstream = match mode.as_str() {
        "http" => WebUpstream::start(&ip, addr.port(), "bench", None, threads),
        "https" => {
            let (Some(ca_out), names) = (args.get(3), &args[4.min(args.len())..]) else {
                usage()
            };
            if names.is_empty() {
                usage()
            }
            let ca = TestCa::new("enforcer bench CA");
            ca.write_pem(std::path::Path::new(ca_out));
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            WebUpstream::start(
                &ip,
                addr.port(),
                "bench",
                Some(ca.server_config(&names)),
                threads,
            )
        }
        _ => usage(),
    };
    println!("ready {}", upstream.addr);
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}

/// Relays every connection on `addr` to `target` until killed, with the daemon's proxy
/// threading: one acceptor, connections handed round robin to one single-threaded runtime
/// per CPU.
fn relay(addr: SocketAddr, target: SocketAddr) -> ! {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let queues: Vec<_> = (0..threads)
        .map(|_| {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                runtime.block_on(async move {
                    while let Some(down) = rx.recv().await {
                        tokio::spawn(async move {
                            let Ok(mut down) = tokio::net::TcpStream::from_std(down) else {
                                return;
                            };
                            let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                                return;
                            };
                            let _ = (down.set_nodelay(true), up.set_nodelay(true));
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        });
                    }
                });
            });
            tx
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
        println!("ready {}", listener.local_addr().expect("a bound address"));
        let _ = std::io::stdout().flush();
        for i in 0.. {
            let Ok((down, _)) = listener.accept().await else {
                continue;
            };
            if let Ok(down) = down.into_std() {
                let _ = queues[i % threads].send(down);
            }
        }
        unreachable!("the accept loop never ends")
    })
}
