//! The executable of a caller, as the kernel named it at `connect()`: the file's identity
//! (device and inode), which is what can be trusted, and a path for people to read.
//!
//! The identity comes from the kernel record ([`ExeId`], read inside the connect hook, so it
//! races with neither `exec` nor pid reuse). The path is only for display: it is what
//! `/proc/PID/exe` says when the record is read, kept only when that path names the same file
//! (a process that exited, exec'd since, runs a deleted file or lives in another mount
//! namespace gets none). Decisions that depend on the executable compare [`FileId`]s, never
//! paths.

use std::sync::Arc;

use enforcer_common::ExeId;

pub use crate::sys::FileId;

/// The executable that made a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exe {
    /// From the kernel record: the file that was running at `connect()`.
    pub id: FileId,
    /// A path to that same file, for display only (see the module docs).
    pub path: Option<Arc<str>>,
}

impl Exe {
    /// The executable of a kernel record made by process `pid`; `None` when the kernel could
    /// not name it. Reads `/proc/PID/exe` for the display path.
    pub fn of_record(id: ExeId, pid: u32) -> Option<Exe> {
        let id = FileId::from_kernel(id)?;
        let path = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .filter(|path| FileId::of_path(path).is_ok_and(|found| found == id))
            .and_then(|path| path.to_str().map(Arc::from));
        Some(Exe { id, path })
    }

    /// The path, or `dev:ino` when no path could be confirmed.
    pub fn display(&self) -> String {
        match &self.path {
            Some(path) => path.to_string(),
            None => self.id.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::MetadataExt as _, path::Path};

    use super::*;

    /// What the kernel would record for the file at `path`: its superblock's major and minor
    /// in the kernel's `dev_t` encoding.
    fn kernel_id_of(path: &Path) -> ExeId {
        let meta = std::fs::metadata(path).unwrap();
        let (major, minor) = (
            nix::sys::stat::major(meta.dev()),
            nix::sys::stat::minor(meta.dev()),
        );
        ExeId {
            ino: meta.ino(),
            dev: u32::try_from(major << ExeId::MINOR_BITS | minor).unwrap(),
            _pad: 0,
        }
    }

    #[test]
    fn kernel_dev_t_converts_to_st_dev() {
        let exe = std::env::current_exe().unwrap();
        let id = FileId::from_kernel(kernel_id_of(&exe)).unwrap();
        assert_eq!(id, FileId::of_path(&exe).unwrap());
        // Numbers past the old 8-bit fields land where glibc puts them.
        let big = ExeId {
            ino: 7,
            dev: (300 << 20) | 70_000,
            _pad: 0,
        };
        assert_eq!(
            FileId::from_kernel(big).unwrap().dev,
            nix::sys::stat::makedev(300, 70_000)
        );
        assert_eq!(
            nix::sys::stat::major(FileId::from_kernel(big).unwrap().dev),
            300
        );
        assert_eq!(FileId::from_kernel(ExeId::default()), None);
    }

    #[test]
    fn the_path_is_kept_only_for_the_same_file() {
        let me = std::env::current_exe().unwrap().canonicalize().unwrap();
        let pid = std::process::id();
        let exe = Exe::of_record(kernel_id_of(&me), pid).unwrap();
        assert_eq!(exe.path.as_deref(), me.to_str());
        assert_eq!(exe.display(), me.to_str().unwrap());

        // Another file's identity: /proc/self/exe does not name it, so no path.
        let other = kernel_id_of(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/Cargo.toml"
        )));
        let exe = Exe::of_record(other, pid).unwrap();
        assert_eq!(exe.path, None);
        assert_eq!(exe.display(), exe.id.to_string());
        assert!(exe.display().contains(':'));

        assert_eq!(Exe::of_record(ExeId::default(), pid), None);
    }
}
