//! A file's identity as `stat(2)` gives it, and as the kernel records it for a caller's
//! executable: what decisions about executables compare (never paths).

use std::path::Path;

use enforcer_common::ExeId;

/// A file's identity in `stat(2)` terms: `st_dev` (glibc's `makedev` encoding) and `st_ino`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    /// The identity of the file at `path`, symlinks followed.
    pub fn of_path(path: &Path) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(path)?;
        Ok(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// The identity the kernel recorded, `None` when it is unknown. The kernel keeps `dev_t`
    /// as `major << 20 | minor`; `stat` reports `makedev(major, minor)`.
    ///
    /// These agree for files on ordinary block-device and memory filesystems (ext4, xfs,
    /// tmpfs). btrfs subvolumes and overlayfs report other numbers to `stat` than their
    /// superblock's, so there [`FileId::of_path`] of the same file differs.
    pub fn from_kernel(id: ExeId) -> Option<FileId> {
        if id.is_unknown() {
            return None;
        }
        Some(FileId {
            dev: nix::sys::stat::makedev(u64::from(id.major()), u64::from(id.minor())),
            ino: id.ino,
        })
    }
}

impl std::fmt::Display for FileId {
    /// `st_dev:st_ino` in decimal, as `stat -c %d:%i` prints them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.dev, self.ino)
    }
}
