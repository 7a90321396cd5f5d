//! CPU scheduling around the kill switch. Stopping an agent is urgent; our own tear-down of
//! its streams afterwards is not, and on a small host both compete with the agent for the
//! same cores.
//!
//! - [`urgently`] runs the destroying of an agent's streams under `SCHED_FIFO`, so nothing
//!   else on the host runs on the CPUs it uses until it is done: not the agents it stops, and
//!   not the wake-ups it causes in them and in our proxy threads.
//! - [`Yielders`] lowers the proxy threads to nice 19 while they tear down the streams the
//!   kill switch cut (each closes both ends, resets the upstream and writes a completion
//!   record: about 20 µs of CPU per stream). The killed agents read their resets first.
//!
//! Both need `CAP_SYS_NICE`. Without it the kill switch works all the same, only slower on a
//! busy host.

use std::sync::{Arc, Mutex};

/// The real-time priority [`urgently`] takes: the lowest, so kernel threads with real-time
/// priorities of their own still run first.
const FIFO_PRIORITY: libc::c_int = 1;
/// The nice value of a deferred thread: the lowest priority short of `SCHED_IDLE`, which
/// could starve it for good on a busy host.
const DEFERRED_NICE: libc::c_int = 19;

/// Runs `f` with the calling thread under `SCHED_FIFO`, then puts the thread's policy back.
///
/// The kill switch destroys streams under it: the agents it stops, however busy, must not be
/// able to starve the thread that stops them, and every reset it sends wakes a reader that
/// would otherwise take the CPU from it, one stream at a time. (On a 2-vCPU VM with the proxy
/// threads lowered too, 1,000 streams ended as their client sees it at a median of 5.9-7.2
/// ms at nice -20, and 4.3-4.6 ms under `SCHED_FIFO`, of which the destroying itself takes
/// 2.2-3.0 ms.) The kernel's real-time throttling still leaves other tasks 5% of each
/// second.
///
/// Where `SCHED_FIFO` is refused (no `CAP_SYS_NICE`, a `RestrictRealtime=` unit) the thread
/// runs at nice -20 instead; where that is refused too, as it was.
pub fn urgently<T>(f: impl FnOnce() -> T) -> T {
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscalls on the calling thread (pid 0); `param` outlives the call.
    let (policy, readable) = unsafe {
        let policy = libc::sched_getscheduler(0);
        (
            policy,
            policy >= 0 && libc::sched_getparam(0, &mut param) == 0,
        )
    };
    // A thread that is already real-time (a helper started by an urgent thread inherits
    // its policy) is left as it is.
    if readable && (policy == libc::SCHED_FIFO || policy == libc::SCHED_RR) {
        return f();
    }
    let fifo = libc::sched_param {
        sched_priority: FIFO_PRIORITY,
    };
    let realtime = readable
        && policy == libc::SCHED_OTHER
        // SAFETY: as above; `fifo` outlives the call.
        && unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &fifo) } == 0;
    if !realtime {
        return at_nice(-20, f);
    }
    let out = f();
    // Back to SCHED_OTHER: the thread's nice value was kept meanwhile. Leaving real-time
    // needs no privilege.
    // SAFETY: as above.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        tracing::warn!(
            "cannot take this thread out of SCHED_FIFO after the kill switch: {}",
            std::io::Error::last_os_error()
        );
    }
    out
}

/// Runs `f` with the calling thread at `nice`, then puts its nice value back; runs it as it
/// is when that is refused.
fn at_nice<T>(nice: libc::c_int, f: impl FnOnce() -> T) -> T {
    let tid = nix::unistd::gettid().as_raw();
    let before = nice_of(tid);
    let raised = before.is_some_and(|_| set_nice(tid, nice).is_ok());
    let out = f();
    if raised
        && let Some(before) = before
        && let Err(e) = set_nice(tid, before)
    {
        tracing::warn!("cannot restore this thread's CPU priority after the kill switch: {e}");
    }
    out
}

/// A thread's nice value, or `None` when it cannot be read.
fn nice_of(tid: libc::pid_t) -> Option<libc::c_int> {
    // getpriority returns the nice value, which may be -1: errno tells an error apart.
    nix::errno::Errno::clear();
    // SAFETY: a plain syscall on a thread id; no memory is passed.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    (nice != -1 || nix::errno::Errno::last_raw() == 0).then_some(nice)
}

fn set_nice(tid: libc::pid_t, nice: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a plain syscall on a thread id; no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Threads whose work can wait while the kill switch acts (the proxy threads), with the nice
/// values they return to.
#[derive(Debug)]
pub struct Yielders {
    threads: Vec<(libc::pid_t, libc::c_int)>,
    /// Deferrals in force; the threads are lowered while this is above zero.
    deferrals: Mutex<usize>,
}

impl Yielders {
    /// The threads `tids`, whose current nice values are the ones they return to. `None`
    /// when this process may not raise a thread's priority back (no `CAP_SYS_NICE`):
    /// lowering the proxy threads would then be for good.
    pub fn new(tids: &[libc::pid_t]) -> Option<Arc<Yielders>> {
        if !may_raise_priority() {
            return None;
        }
        let threads = tids
            .iter()
            .filter_map(|&tid| nice_of(tid).map(|nice| (tid, nice)))
            .collect();
        Some(Arc::new(Yielders {
            threads,
            deferrals: Mutex::new(0),
        }))
    }

    /// Lowers the threads to nice 19 until the returned guard (and every other one taken
    /// meanwhile) is dropped.
    pub fn defer(self: &Arc<Self>) -> Deferral {
        let mut n = self.deferrals.lock().unwrap_or_else(|e| e.into_inner());
        if *n == 0 {
            for &(tid, _) in &self.threads {
                // A thread that has exited is no error; the others are lowered all the same.
                let _ = set_nice(tid, DEFERRED_NICE);
            }
        }
        *n += 1;
        Deferral(self.clone())
    }

    fn restore(&self) {
        let mut n = self.deferrals.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n > 0 {
            return;
        }
        for &(tid, nice) in &self.threads {
            if let Err(e) = set_nice(tid, nice)
                && e.raw_os_error() != Some(libc::ESRCH)
            {
                tracing::warn!(
                    tid,
                    "cannot put a proxy thread back to nice {nice} after the kill switch: {e}"
                );
            }
        }
    }
}

/// The proxy threads stay lowered while this lives.
#[derive(Debug)]
pub struct Deferral(Arc<Yielders>);

impl Drop for Deferral {
    fn drop(&mut self) {
        self.0.restore();
    }
}

/// Can this process raise a thread's priority? Tried on a thread of its own, lowered and
/// raised back, since a capability set or `RLIMIT_NICE` may each allow it.
fn may_raise_priority() -> bool {
    std::thread::Builder::new()
        .name("nice-probe".into())
        .spawn(|| {
            let tid = nix::unistd::gettid().as_raw();
            nice_of(tid).is_some_and(|nice| {
                nice < DEFERRED_NICE
                    && set_nice(tid, DEFERRED_NICE).is_ok()
                    && set_nice(tid, nice).is_ok()
            })
        })
        .ok()
        .and_then(|t| t.join().ok())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> libc::c_int {
        // SAFETY: a plain syscall on the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    /// Can this process take `SCHED_FIFO`? Tried on a thread of its own (root may still be
    /// refused, by a cgroup without a real-time budget).
    fn may_be_real_time() -> bool {
        std::thread::spawn(|| {
            let fifo = libc::sched_param {
                sched_priority: FIFO_PRIORITY,
            };
            // SAFETY: plain syscall on this scratch thread.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &fifo) == 0 }
        })
        .join()
        .unwrap()
    }

    #[test]
    fn urgently_runs_real_time_and_puts_the_thread_back() {
        let tid = nix::unistd::gettid().as_raw();
        let nice = nice_of(tid).unwrap();
        let (inside, inside_nice) = urgently(|| (policy(), nice_of(tid).unwrap()));
        if may_be_real_time() {
            assert_eq!(inside, libc::SCHED_FIFO);
        } else if may_raise_priority() {
            assert_eq!((inside, inside_nice), (libc::SCHED_OTHER, -20));
        } else {
            assert_eq!((inside, inside_nice), (libc::SCHED_OTHER, nice));
        }
        assert_eq!(policy(), libc::SCHED_OTHER);
        assert_eq!(nice_of(tid), Some(nice));
    }

    #[test]
    fn helpers_started_by_an_urgent_thread_are_urgent_too() {
        if !may_be_real_time() {
            eprintln!("skipped: SCHED_FIFO is refused here");
            return;
        }
        // destroy_tcp_urgently's helpers rely on this: they do not raise themselves.
        let helper = urgently(|| std::thread::spawn(policy).join().unwrap());
        assert_eq!(helper, libc::SCHED_FIFO);
        assert_eq!(policy(), libc::SCHED_OTHER);
    }

    /// A thread that waits until told to end, and its id.
    fn idle_thread() -> (
        libc::pid_t,
        std::sync::mpsc::Sender<()>,
        std::thread::JoinHandle<()>,
    ) {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
            let _ = stop_rx.recv();
        });
        (tid_rx.recv().unwrap(), stop_tx, handle)
    }

    #[test]
    fn deferred_threads_are_lowered_until_the_last_deferral_ends() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: raising a priority back needs root");
            return;
        }
        let (a, stop_a, ha) = idle_thread();
        let (b, stop_b, hb) = idle_thread();
        let nice_a = nice_of(a).unwrap();
        set_nice(b, nice_a + 1).unwrap();
        let yielders = Yielders::new(&[a, b]).expect("root may raise priorities");
        let first = yielders.defer();
        assert_eq!((nice_of(a), nice_of(b)), (Some(19), Some(19)));
        let second = yielders.defer();
        drop(first);
        assert_eq!(nice_of(a), Some(19), "still deferred by the second kill");
        drop(second);
        assert_eq!((nice_of(a), nice_of(b)), (Some(nice_a), Some(nice_a + 1)));
        // A thread that ended meanwhile is skipped.
        drop(stop_b);
        hb.join().unwrap();
        drop(yielders.defer());
        assert_eq!(nice_of(a), Some(nice_a));
        drop(stop_a);
        ha.join().unwrap();
    }
}
