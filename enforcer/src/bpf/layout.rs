//! The layout of pinned maps. A daemon reusing maps pinned by an enforcer built with other
//! key or value layouts would misread them, so every pinned map is checked against this
//! build's layout (`enforcer_common::LAYOUT_VERSION`) before anything is loaded, and a
//! mismatch is refused loudly. No migration is offered: version 3 added the caller's
//! executable to `OrigDst` and the kernel field offsets to `GlobalConfig`, so version-2 pins
//! are refused (detach, then start again). When a layout changes, the version is bumped and,
//! where worth it, a migration added here.

use std::{mem::size_of, path::Path};

use aya::maps::MapData;
use enforcer_common::{
    AgentCounters, AgentState, AllowKey, AllowValue, DnsClient, GlobalConfig, LAYOUT_VERSION,
    MAX_AGENTS, OrigDst, SockKey, maps,
};

use super::BpfError;

/// (name, key size, value size, max entries) of every pinned map but the ring buffer.
fn expected() -> [(&'static str, usize, usize, u32); 8] {
    [
        (maps::CONFIG, 4, size_of::<GlobalConfig>(), 1),
        (maps::CGROUP_AGENT, 8, 4, 4096),
        (maps::AGENTS, 4, size_of::<AgentState>(), MAX_AGENTS),
        // LPM trie keys carry a 4-byte prefix length.
        (
            maps::ALLOW,
            4 + size_of::<AllowKey>(),
            size_of::<AllowValue>(),
            65536,
        ),
        (maps::ORIG_BY_COOKIE, 8, size_of::<OrigDst>(), 65536),
        (
            maps::ORIG_BY_TUPLE,
            size_of::<SockKey>(),
            size_of::<OrigDst>(),
            65536,
        ),
        (
            maps::DNS_CLIENTS,
            size_of::<SockKey>(),
            size_of::<DnsClient>(),
            16384,
        ),
        (maps::COUNTERS, 4, size_of::<AgentCounters>(), MAX_AGENTS),
    ]
}

/// Checks every map already pinned in `dir`.
pub fn check_pinned(dir: &Path) -> Result<(), BpfError> {
    for (name, key, value, max) in expected() {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let Ok(map) = MapData::from_pin(&path) else {
            continue;
        };
        let Ok(info) = map.info() else { continue };
        let found = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (key, value, max) {
            return Err(BpfError::Layout {
                map: name,
                dir: dir.to_owned(),
                found: format!(
                    "key {} bytes, value {} bytes, {} entries",
                    found.0, found.1, found.2
                ),
                expected: format!("key {key} bytes, value {value} bytes, {max} entries"),
                version: LAYOUT_VERSION,
            });
        }
    }
    Ok(())
}
