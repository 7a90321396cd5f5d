//! Splicing in the kernel: once a connection is decided and spliced (TLS judged on its SNI,
//! `tcp:` rules), its two sockets go into the sockhash whose `sk_skb` verdict sends every
//! byte received on one out of the other. No byte is copied through user space; this task
//! only waits for the ends to finish and passes each FIN on.
//!
//! # Not losing or reordering a byte
//! Bytes can arrive on either socket while the pair is put in the maps. So:
//! 1. both sockets' `SO_RCVLOWAT` is raised, which holds what arrives in their receive queues
//!    without running any data-ready callback;
//! 2. both ends' records, then both sockets, go into the maps;
//! 3. `SO_RCVLOWAT` back to 1 runs each socket's data-ready callback, now the verdict's, on
//!    what was held, in order.
//!
//! Everything after the bytes user space already read (the peeked prefix, which the caller
//! has written upstream) therefore goes through the verdict. A byte the verdict cannot place
//! is counted as dropped, and the connection is reset rather than left corrupt.
//!
//! # Passing a FIN on
//! A FIN from one side must reach the other only after every byte before it. When a socket
//! reports its peer's FIN (`EPOLLRDHUP`), this waits until the verdict has processed all it
//! received (`tcpi_bytes_received` = what user space read + what the verdict sent or dropped
//! plus 1 for the FIN) and the other socket has taken all of it into its send queue (acked +
//! queued, from a base read at the start), then shuts the other socket's write side.
//!
//! The sockets are watched by one thread with its own epoll set that asks only for hang-ups
//! and errors, so data moving through the kernel wakes nothing in user space.

use std::{
    collections::HashMap,
    io,
    net::TcpStream as StdStream,
    os::fd::{AsFd as _, BorrowedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::{
    net::TcpStream,
    sync::{mpsc, watch},
};

use crate::{
    bpf::{Kernel, splice::End},
    sys::tcp,
};

/// `SO_RCVBUF` and `SO_SNDBUF` of spliced sockets.
const SPLICE_BUFFER: usize = 4 << 20;

/// What ended a spliced connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Both sides finished with a FIN.
    Closed,
    /// The kill switch or a reload cut it.
    Cut,
    /// One side reset, or bytes were lost: both sides got a reset.
    Reset(String),
}

/// Byte counts of a spliced connection, counted in the kernel.
#[derive(Debug, Clone)]
pub struct Spliced {
    /// From the agent to the upstream, the prefix user space read included.
    pub up: u64,
    /// From the upstream to the agent.
    pub down: u64,
    pub ended: Ended,
}

/// The in-kernel splice of the proxy: the kernel's maps and the hang-up watcher.
pub struct Splicer {
    kernel: Arc<Kernel>,
    watcher: Arc<Watcher>,
}

impl Splicer {
    /// `None` when the kernel refused the splice program (the proxy then copies), or the
    /// watcher thread could not start.
    pub fn new(kernel: Arc<Kernel>) -> Option<Arc<Self>> {
        kernel.splice()?;
        match Watcher::start() {
            Ok(watcher) => Some(Arc::new(Self { kernel, watcher })),
            Err(e) => {
                tracing::warn!("spliced connections are copied through user space: {e}");
                None
            }
        }
    }

    /// Hands `client` (of `agent`) and `upstream` to the kernel. `prefix` is how many bytes
    /// user space read from the client (and wrote upstream).
    pub fn start(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        prefix: u64,
        agent: u32,
    ) -> Start<'_> {
        // Nothing was moved: the streams go back to the runtime, to be copied there.
        let give_back = |a: StdStream, b: StdStream, why: String| {
            let _ = tcp::set_rcvlowat(a.as_fd(), 1);
            let _ = tcp::set_rcvlowat(b.as_fd(), 1);
            match (TcpStream::from_std(a), TcpStream::from_std(b)) {
                (Ok(a), Ok(b)) => Start::Copy(a, b, why),
                _ => Start::Lost(format!(
                    "{why}, and the sockets cannot go back to the runtime"
                )),
            }
        };
        // Out of tokio's reactor: data moving in the kernel must not wake a proxy thread.
        let (a, b) = match (client.into_std(), upstream.into_std()) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return Start::Lost("cannot take the sockets out of the runtime".into()),
        };
        let setup = || -> io::Result<(u64, u64, u64, u64)> {
            tcp::set_rcvlowat(a.as_fd(), i32::MAX)?;
            tcp::set_rcvlowat(b.as_fd(), i32::MAX)?;
            // The verdict takes skbs off the receive queue without a `recvmsg`, so the kernel
            // never grows the receive window (autotuning runs in `recvmsg`); and the kernel's
            // sender, finding a full send buffer, retries a scheduler tick later rather than
            // when space frees. Buffers that fill a fast path at once avoid both; memory is
            // charged only while bytes wait.
            tcp::set_buffers(a.as_fd(), SPLICE_BUFFER)?;
            tcp::set_buffers(b.as_fd(), SPLICE_BUFFER)?;
            Ok((
                tcp::cookie(a.as_fd())?,
                tcp::cookie(b.as_fd())?,
                tcp::written(a.as_fd())?,
                tcp::written(b.as_fd())?,
            ))
        };
        let (ca, cb, base_a, base_b) = match setup() {
            Ok(v) => v,
            Err(e) => return give_back(a, b, format!("reading the sockets failed: {e}")),
        };
        let maps = self.kernel.splice().expect("checked in new");
        let joined = maps.join(
            End {
                fd: a.as_fd(),
                cookie: ca,
            },
            End {
                fd: b.as_fd(),
                cookie: cb,
            },
            agent,
        );
        if let Err(e) = joined {
            // Held data never met the verdict (the thresholds are still raised), unless a
            // socket was in the map for a moment under memory pressure: then it is lost.
            let (ra, rb) = maps.leave(ca, cb);
            let lost = [ra, rb]
                .iter()
                .flatten()
                .any(|r| r.dropped > 0 || r.bytes > 0);
            if lost {
                tcp::reset_on_close(a.as_fd());
                tcp::reset_on_close(b.as_fd());
                return Start::Lost("bytes moved while the splice was being set up".into());
            }
            return give_back(a, b, e.to_string());
        }
        // Run the verdict on whatever arrived while the thresholds were raised.
        let _ = tcp::set_rcvlowat(a.as_fd(), 1);
        let _ = tcp::set_rcvlowat(b.as_fd(), 1);
        let (events, tokens) = match self.watcher.watch(a.as_fd(), b.as_fd()) {
            Ok(v) => v,
            Err(e) => {
                maps.leave(ca, cb);
                tcp::reset_on_close(a.as_fd());
                tcp::reset_on_close(b.as_fd());
                return Start::Lost(format!("cannot watch the sockets: {e}"));
            }
        };
        Start::Spliced(Session {
            splicer: self,
            ends: [
                Side {
                    stream: a,
                    cookie: ca,
                    consumed: prefix,
                    base: base_a,
                    eof: false,
                    passed_on: false,
                },
                Side {
                    stream: b,
                    cookie: cb,
                    consumed: 0,
                    base: base_b,
                    eof: false,
                    passed_on: false,
                },
            ],
            prefix,
            events,
            tokens,
        })
    }
}

/// What [`Splicer::start`] did.
pub enum Start<'a> {
    /// The kernel moves the bytes; run the session to the end.
    Spliced(Session<'a>),
    /// The kernel would not take the pair, and nothing moved: copy the streams in user space.
    Copy(TcpStream, TcpStream, String),
    /// The connection is lost (it has been reset): only the reason is left.
    Lost(String),
}

/// One socket of a spliced pair.
struct Side {
    stream: StdStream,
    cookie: u64,
    /// Bytes user space read from it before the splice.
    consumed: u64,
    /// [`tcp::written`] when the splice started.
    base: u64,
    /// Its peer sent a FIN (or hung up).
    eof: bool,
    /// That FIN was passed on to the other socket.
    passed_on: bool,
}

/// A connection being spliced in the kernel.
pub struct Session<'a> {
    splicer: &'a Splicer,
    ends: [Side; 2],
    prefix: u64,
    events: Events,
    tokens: [u64; 2],
}

impl Session<'_> {
    /// Waits until both sides are done, one resets, or `cut` turns true (then both are
    /// reset). The sockets are closed when this returns.
    pub async fn run(mut self, cut: &mut watch::Receiver<bool>) -> Spliced {
        let mut backoff = Duration::from_micros(100);
        let ended = loop {
            if let Some(ended) = self.step() {
                break ended;
            }
            let draining = self.ends.iter().any(|s| s.eof && !s.passed_on);
            let tick = async {
                if draining {
                    tokio::time::sleep(backoff).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Some((side, flags)) => {
                        if flags.contains(EpollFlags::EPOLLERR) {
                            let err = self.ends[side].stream.take_error().ok().flatten();
                            let who = if side == 0 { "the agent" } else { "the upstream" };
                            break Ended::Reset(match err {
                                Some(e) => format!("{who} ended the connection: {e}"),
                                None => format!("{who} ended the connection"),
                            });
                        }
                        if flags.intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP) {
                            self.ends[side].eof = true;
                            backoff = Duration::from_micros(100);
                        }
                    }
                    None => break Ended::Reset("the splice watcher stopped".into()),
                },
                r = cut.wait_for(|k| *k) => {
                    let _ = r;
                    break Ended::Cut;
                }
                () = tick => backoff = (backoff * 2).min(Duration::from_millis(20)),
            }
        };
        self.finish(ended)
    }

    /// Passes on every FIN whose bytes have all gone through; `Some` once the connection is
    /// over.
    fn step(&mut self) -> Option<Ended> {
        let maps = self.splicer.kernel.splice().expect("checked in new");
        for from in 0..2 {
            let to = 1 - from;
            let record = maps.end(self.ends[from].cookie)?;
            if record.dropped > 0 {
                return Some(Ended::Reset(format!(
                    "{} bytes could not be passed on in the kernel",
                    record.dropped
                )));
            }
            let side = &self.ends[from];
            if !side.eof || side.passed_on {
                continue;
            }
            let (Ok(received), Ok(written)) = (
                tcp::received(side.stream.as_fd()),
                tcp::written(self.ends[to].stream.as_fd()),
            ) else {
                return Some(Ended::Reset("cannot read the sockets' byte counts".into()));
            };
            // All received but the FIN went through the verdict, and all of that is in the
            // other socket's send queue.
            let processed = side.consumed + record.bytes + 1 >= received;
            let absorbed = written.saturating_sub(self.ends[to].base) >= record.bytes;
            tracing::trace!(
                from,
                received,
                consumed = side.consumed,
                bytes = record.bytes,
                written,
                base = self.ends[to].base,
                processed,
                absorbed,
                "splice: FIN to pass on"
            );
            if processed && absorbed {
                if tcp::shutdown_write(self.ends[to].stream.as_fd()).is_err() {
                    return Some(Ended::Reset("passing the FIN on failed".into()));
                }
                self.ends[from].passed_on = true;
            }
        }
        self.ends
            .iter()
            .all(|s| s.passed_on)
            .then_some(Ended::Closed)
    }

    fn finish(self, ended: Ended) -> Spliced {
        let [a, b] = &self.ends;
        self.splicer
            .watcher
            .unwatch(self.tokens, a.stream.as_fd(), b.stream.as_fd());
        let maps = self.splicer.kernel.splice().expect("checked in new");
        let (ra, rb) = maps.leave(a.cookie, b.cookie);
        if ended != Ended::Closed {
            tcp::reset_on_close(a.stream.as_fd());
            tcp::reset_on_close(b.stream.as_fd());
        }
        // Dropping `self` closes both sockets.
        Spliced {
            up: self.prefix + ra.map_or(0, |r| r.bytes),
            down: rb.map_or(0, |r| r.bytes),
            ended,
        }
    }
}

/// What the watcher reports for a pair: which side (0 the agent's, 1 the upstream's), and
/// its epoll flags.
type Events = mpsc::UnboundedReceiver<(usize, EpollFlags)>;
type Reporter = mpsc::UnboundedSender<(usize, EpollFlags)>;

/// One thread, one epoll set asking only for hang-ups and errors of spliced sockets.
struct Watcher {
    epoll: Epoll,
    /// Epoll token → side and the pair's sender.
    subscribers: Mutex<HashMap<u64, (usize, Reporter)>>,
    next: AtomicU64,
}

impl Watcher {
    fn start() -> io::Result<Arc<Self>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let watcher = Arc::new(Self {
            epoll,
            subscribers: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        });
        let w = watcher.clone();
        std::thread::Builder::new()
            .name("splice-watch".into())
            .spawn(move || w.run())?;
        Ok(watcher)
    }

    fn run(&self) {
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("the splice watcher failed: {e}; spliced connections end");
                    // Dropping the senders ends every session with a reset.
                    self.subscribers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clear();
                    return;
                }
            };
            let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
            for ev in &events[..n] {
                if let Some((side, tx)) = subs.get(&ev.data()) {
                    let _ = tx.send((*side, ev.events()));
                }
            }
        }
    }

    fn watch(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> io::Result<(Events, [u64; 2])> {
        let (tx, rx) = mpsc::unbounded_channel();
        let base = self.next.fetch_add(2, Ordering::Relaxed);
        let tokens = [base, base + 1];
        {
            let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
            subs.insert(tokens[0], (0, tx.clone()));
            subs.insert(tokens[1], (1, tx));
        }
        // Edge-triggered hang-ups only: errors and hang-ups are always reported, data never.
        let flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        let added = self
            .epoll
            .add(a, EpollEvent::new(flags, tokens[0]))
            .and_then(|()| self.epoll.add(b, EpollEvent::new(flags, tokens[1])));
        if let Err(e) = added {
            self.unwatch(tokens, a, b);
            return Err(e.into());
        }
        Ok((rx, tokens))
    }

    fn unwatch(&self, tokens: [u64; 2], a: BorrowedFd<'_>, b: BorrowedFd<'_>) {
        let _ = self.epoll.delete(a);
        let _ = self.epoll.delete(b);
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.remove(&tokens[0]);
        subs.remove(&tokens[1]);
    }
}
