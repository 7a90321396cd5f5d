//! The kernel splice: a sockhash of the daemon's own sockets with the `splice_verdict`
//! program attached, so the bytes of a connection spliced after its decision move from one
//! socket to the other in the kernel (see `enforcer-ebpf/src/splice.rs`).
//!
//! This file owns the two maps. The choreography that puts a pair of sockets in them without
//! losing or reordering a byte lives with the proxy (`proxy/sockmap.rs`).

use std::{os::fd::BorrowedFd, sync::Mutex};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, SockHash},
    programs::{Program, SkSkb},
};
use enforcer_common::{SpliceEnd, maps, programs};

use super::{BpfError, lock, map_error, take_map};

/// The spliced sockets and their ends' records.
pub struct SpliceMaps {
    socks: Mutex<SockHash<MapData, u64>>,
    ends: Mutex<HashMap<MapData, u64, SpliceEnd>>,
}

/// One of the two sockets of a spliced connection.
#[derive(Clone, Copy)]
pub struct End<'a> {
    pub fd: BorrowedFd<'a>,
    /// Its `SO_COOKIE`.
    pub cookie: u64,
}

impl SpliceMaps {
    /// Loads the verdict program and attaches it to the sockhash. An error names what the
    /// kernel refused; the proxy then splices in user space.
    pub(super) fn open(ebpf: &mut Ebpf) -> Result<Self, String> {
        let program: &mut SkSkb = match ebpf.program_mut(programs::SPLICE_VERDICT) {
            Some(Program::SkSkb(p)) => p,
            _ => {
                return Err(format!(
                    "the eBPF object has no {}",
                    programs::SPLICE_VERDICT
                ));
            }
        };
        program
            .load()
            .map_err(|e| format!("the kernel refused the sk_skb verdict program: {e}"))?;
        let socks: SockHash<MapData, u64> = take_map(ebpf, maps::SPLICE_SOCKS)
            .map_err(|e| format!("the splice sockhash is unusable: {e}"))?;
        let ends = take_map(ebpf, maps::SPLICE_ENDS)
            .map_err(|e| format!("the splice map is unusable: {e}"))?;
        let program: &mut SkSkb = match ebpf.program_mut(programs::SPLICE_VERDICT) {
            Some(Program::SkSkb(p)) => p,
            _ => unreachable!("checked above"),
        };
        // The attachment lives as long as the map and the loaded program, both held by the
        // daemon until it exits.
        program
            .attach(socks.fd())
            .map_err(|e| format!("the kernel refused to attach the sk_skb verdict: {e}"))?;
        Ok(Self {
            socks: Mutex::new(socks),
            ends: Mutex::new(ends),
        })
    }

    /// Splices `a` and `b` of `agent`: both records first, then both sockets, so that the
    /// verdict never runs on an end whose peer it cannot place. On an error, what was added is
    /// removed again; the caller then knows (from [`Self::end`]) whether bytes were dropped.
    pub fn join(&self, a: End<'_>, b: End<'_>, agent: u32) -> Result<(), BpfError> {
        let record = |peer| SpliceEnd {
            peer,
            bytes: 0,
            dropped: 0,
            agent,
            _pad0: 0,
        };
        {
            let mut ends = lock(&self.ends);
            ends.insert(a.cookie, record(b.cookie), 0)
                .map_err(map_error(maps::SPLICE_ENDS))?;
            if let Err(e) = ends.insert(b.cookie, record(a.cookie), 0) {
                let _ = ends.remove(&a.cookie);
                return Err(map_error(maps::SPLICE_ENDS)(e));
            }
        }
        let mut socks = lock(&self.socks);
        if let Err(e) = socks.insert(a.cookie, a.fd, 0) {
            return Err(map_error(maps::SPLICE_SOCKS)(e));
        }
        if let Err(e) = socks.insert(b.cookie, b.fd, 0) {
            let _ = socks.remove(&a.cookie);
            return Err(map_error(maps::SPLICE_SOCKS)(e));
        }
        Ok(())
    }

    /// The record of the end with `cookie`, as the verdict has counted it.
    pub fn end(&self, cookie: u64) -> Option<SpliceEnd> {
        lock(&self.ends).get(&cookie, 0).ok()
    }

    /// Takes both sockets out of the sockhash (closing them would too) and returns their
    /// final records.
    pub fn leave(&self, a: u64, b: u64) -> (Option<SpliceEnd>, Option<SpliceEnd>) {
        {
            let mut socks = lock(&self.socks);
            let _ = socks.remove(&a);
            let _ = socks.remove(&b);
        }
        let mut ends = lock(&self.ends);
        let records = (ends.get(&a, 0).ok(), ends.get(&b, 0).ok());
        let _ = ends.remove(&a);
        let _ = ends.remove(&b);
        records
    }
}
