//! `binaries:` on a rule: the rule applies only to connections made by these executables, as
//! the kernel recorded them at `connect()` (device and inode of the file the task executed).
//!
//! Paths are resolved to (device, inode) when the policy is loaded and again, lazily, at most
//! every [`REFRESH`] (a package upgrade replaces the file, and with it the inode). With
//! `sha256:`, a file whose content differs matches nothing; the hash is computed again only
//! when the file's `stat` changes. For an interpreter this is the interpreter, not the script.
//!
//! An unknown executable (a kernel without BTF, a record from before a restart) never matches
//! an allow rule and always matches a deny or limit rule: fail closed.

use std::{
    io::Read as _,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

use crate::sys::FileId;

/// How often the paths are resolved again.
pub const REFRESH: Duration = Duration::from_secs(5);

/// One `binaries:` entry.
#[derive(Debug, Clone)]
pub struct Binary {
    pub path: PathBuf,
    pub sha256: Option<[u8; 32]>,
}

/// What a path resolved to, and the `stat` it was resolved from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resolved {
    id: FileId,
    /// (size, mtime ns, ctime ns): a change means hashing again.
    stamp: (u64, i64, i64),
    /// The content matched `sha256` (true without one).
    content_ok: bool,
}

#[derive(Debug)]
struct State {
    at: Instant,
    resolved: Vec<Option<Resolved>>,
}

/// The executables of one rule.
#[derive(Debug)]
pub struct Binaries {
    list: Vec<Binary>,
    state: Mutex<State>,
}

impl Binaries {
    pub fn new(list: Vec<Binary>) -> Binaries {
        let resolved = list.iter().map(|b| resolve(b, None)).collect();
        Binaries {
            list,
            state: Mutex::new(State {
                at: Instant::now(),
                resolved,
            }),
        }
    }

    /// Does `exe` (from the kernel record; `None` when unknown) match? `unknown` is what an
    /// unknown executable counts as.
    pub fn matches(&self, exe: Option<FileId>, unknown: bool) -> bool {
        let Some(exe) = exe else {
            return unknown;
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.at.elapsed() >= REFRESH {
            let fresh: Vec<_> = self
                .list
                .iter()
                .zip(&state.resolved)
                .map(|(b, old)| resolve(b, old.as_ref()))
                .collect();
            state.resolved = fresh;
            state.at = Instant::now();
        }
        state
            .resolved
            .iter()
            .flatten()
            .any(|r| r.content_ok && r.id == exe)
    }

    /// `/usr/bin/gh, /usr/bin/git (sha256 3f2a…)`
    pub fn describe(&self) -> String {
        let items: Vec<String> = self
            .list
            .iter()
            .map(|b| match &b.sha256 {
                Some(h) => format!("{} (sha256 {}…)", b.path.display(), &hex::encode(h)[..8]),
                None => b.path.display().to_string(),
            })
            .collect();
        items.join(", ")
    }
}

/// Resolves one entry; a file that cannot be read matches nothing. `old` spares the hash
/// when the file has not changed.
fn resolve(b: &Binary, old: Option<&Resolved>) -> Option<Resolved> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(&b.path).ok()?;
    let id = FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let stamp = (
        meta.size(),
        meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
    );
    if let Some(old) = old
        && old.id == id
        && old.stamp == stamp
    {
        return Some(old.clone());
    }
    let content_ok = match &b.sha256 {
        None => true,
        Some(want) => sha256_of(&b.path).is_some_and(|got| got == *want),
    };
    Some(Resolved {
        id,
        stamp,
        content_ok,
    })
}

fn sha256_of(path: &std::path::Path) -> Option<[u8; 32]> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Some(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_matches_its_file_and_a_hash_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, b"#!/bin/sh\necho hi\n").unwrap();
        let id = FileId::of_path(&tool).unwrap();
        let plain = Binaries::new(vec![Binary {
            path: tool.clone(),
            sha256: None,
        }]);
        assert!(plain.matches(Some(id), false));
        assert!(!plain.matches(Some(FileId { dev: 1, ino: 2 }), false));
        assert!(!plain.matches(None, false));
        assert!(plain.matches(None, true));
        let right: [u8; 32] = Sha256::digest(b"#!/bin/sh\necho hi\n").into();
        let hashed = Binaries::new(vec![Binary {
            path: tool.clone(),
            sha256: Some(right),
        }]);
        assert!(hashed.matches(Some(id), false));
        let wrong = Binaries::new(vec![Binary {
            path: tool.clone(),
            sha256: Some([0; 32]),
        }]);
        assert!(!wrong.matches(Some(id), false));
        assert!(wrong.describe().contains("(sha256 00000000…)"));
        // A missing file matches nothing.
        let gone = Binaries::new(vec![Binary {
            path: dir.path().join("gone"),
            sha256: None,
        }]);
        assert!(!gone.matches(Some(id), false));
    }
}
