//! cgroup v2: finding the mount, naming cgroups, creating them, and moving processes.
//!
//! The mount is discovered from `/proc/self/mountinfo`, never assumed: it is `/sys/fs/cgroup` on
//! most hosts and `/sys/fs/cgroup/unified` on hybrid ones. A cgroup's id (what the eBPF helpers
//! return) is the inode number of its directory.

use std::{
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup2 filesystem is mounted (checked /proc/self/mountinfo); enforcer needs the \
         unified hierarchy: boot with systemd.unified_cgroup_hierarchy=1 or mount one with \
         `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NoCgroup2,
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(String),
    #[error("cgroup path '{0}' must not contain '..' or be empty")]
    BadPath(PathBuf),
    #[error("cgroup {path} does not exist; create it first (for a systemd unit, start the unit)")]
    Missing { path: PathBuf },
    #[error("cannot create cgroup {path}: {io}", io = crate::sys::io_text(source))]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot move process {pid} into {path}: {io}", io = crate::sys::io_text(source))]
    Move {
        pid: u32,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the cgroup of process {pid}: {io}; has it exited?", io = crate::sys::io_text(source))]
    ProcCgroup { pid: u32, source: std::io::Error },
    #[error("cannot stat cgroup {path}: {io}", io = crate::sys::io_text(source))]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The cgroup2 hierarchy.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    mount: PathBuf,
}

impl Hierarchy {
    /// Finds the cgroup2 mount of this process's mount namespace.
    pub fn discover() -> Result<Self, CgroupError> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| CgroupError::MountInfo(e.to_string()))?;
        let infos =
            <procfs::process::MountInfos as procfs::FromBufRead>::from_buf_read(text.as_bytes())
                .map_err(|e| CgroupError::MountInfo(e.to_string()))?;
        infos
            .into_iter()
            .find(|m| m.fs_type == "cgroup2")
            .map(|m| Self {
                mount: m.mount_point,
            })
            .ok_or(CgroupError::NoCgroup2)
    }

    /// A hierarchy rooted at `mount` (tests).
    pub fn at(mount: PathBuf) -> Self {
        Self { mount }
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Resolves a cgroup path given absolute (under the mount, or as `/proc/PID/cgroup` shows
    /// it) or relative to the mount. Refuses `..` components.
    pub fn resolve(&self, path: &Path) -> Result<PathBuf, CgroupError> {
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(CgroupError::BadPath(path.to_owned()));
        }
        if path.starts_with(&self.mount) {
            return Ok(path.to_owned());
        }
        let relative: PathBuf = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        Ok(self.mount.join(relative))
    }

    /// The path relative to the mount, with a leading `/`, as `/proc/PID/cgroup` shows it.
    pub fn relative(&self, path: &Path) -> String {
        let rel = path.strip_prefix(&self.mount).unwrap_or(path);
        format!("/{}", rel.display())
    }

    /// Creates the cgroup (and its parents) if missing.
    ///
    /// Directories it creates get mode 0755 whatever the umask (the unit runs with
    /// `UMask=0077`): `enforcer exec` run by a non-root member of the admin group must stat
    /// an agent's cgroup to learn its id, and a cgroup directory holds no secret; what
    /// matters, writing its control files, stays root's.
    pub fn ensure(&self, path: &Path) -> Result<PathBuf, CgroupError> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.resolve(path)?;
        let missing: Vec<PathBuf> = path
            .ancestors()
            .take_while(|a| a.starts_with(&self.mount) && *a != self.mount && !a.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(&path).map_err(|source| CgroupError::Create {
            path: path.clone(),
            source,
        })?;
        for dir in missing.iter().rev() {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(
                |source| CgroupError::Create {
                    path: dir.clone(),
                    source,
                },
            )?;
        }
        Ok(path)
    }

    /// The cgroup a process belongs to (absolute path).
    pub fn of_pid(&self, pid: u32) -> Result<PathBuf, CgroupError> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(|source| CgroupError::ProcCgroup { pid, source })?;
        // The unified hierarchy's line is "0::/path".
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| CgroupError::ProcCgroup {
                pid,
                source: std::io::Error::other("no cgroup2 line in /proc/PID/cgroup"),
            })?;
        self.resolve(Path::new(rel.trim()))
    }

    /// Moves a process (all its threads) into `path`.
    pub fn move_pid(&self, pid: u32, path: &Path) -> Result<(), CgroupError> {
        let procs = path.join("cgroup.procs");
        let result = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .and_then(|mut f| f.write_all(pid.to_string().as_bytes()));
        result.map_err(|source| CgroupError::Move {
            pid,
            path: path.to_owned(),
            source,
        })
    }

    /// Processes directly in `path`.
    pub fn pids(&self, path: &Path) -> Vec<u32> {
        std::fs::read_to_string(path.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }
}

/// The id the eBPF helpers report for a cgroup: its directory's inode number.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(meta.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CgroupError::Missing {
            path: path.to_owned(),
        }),
        Err(source) => Err(CgroupError::Stat {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The ids of a cgroup and every cgroup below it.
pub fn subtree_ids(path: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        if let Ok(id) = cgroup_id(&dir) {
            out.push(id);
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

/// True if `inner` is `outer` or lies below it.
pub fn is_within(inner: &Path, outer: &Path) -> bool {
    inner.starts_with(outer)
}

/// The process and all its descendants, from every process's parent id in `/proc`
/// (`/proc/PID/task/*/children` needs CONFIG_PROC_CHILDREN, which many kernels lack).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(all) = procfs::process::all_processes() {
        for proc in all.flatten() {
            if let Ok(stat) = proc.stat()
                && let (Ok(p), Ok(pp)) = (u32::try_from(stat.pid), u32::try_from(stat.ppid))
            {
                parents.push((p, pp));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        for &(child, parent) in &parents {
            if parent == p && !out.contains(&child) {
                out.push(child);
            }
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_accepts_absolute_relative_and_proc_forms() {
        let h = Hierarchy::at(PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(
            h.resolve(Path::new("system.slice/x.service")).unwrap(),
            Path::new("/sys/fs/cgroup/unified/system.slice/x.service")
        );
        assert_eq!(
            h.resolve(Path::new("/system.slice/x.service")).unwrap(),
            Path::new("/sys/fs/cgroup/unified/system.slice/x.service")
        );
        assert_eq!(
            h.resolve(Path::new("/sys/fs/cgroup/unified/a")).unwrap(),
            Path::new("/sys/fs/cgroup/unified/a")
        );
        assert!(h.resolve(Path::new("a/../../etc")).is_err());
        assert_eq!(h.relative(Path::new("/sys/fs/cgroup/unified/a/b")), "/a/b");
    }

    #[test]
    fn discovers_this_machines_cgroup2_mount() {
        // Every supported host has a unified hierarchy somewhere.
        let h = Hierarchy::discover().expect("cgroup2 mounted");
        assert!(h.mount().join("cgroup.procs").exists());
        let own = h.of_pid(std::process::id()).unwrap();
        assert!(own.starts_with(h.mount()));
        assert!(cgroup_id(&own).unwrap() > 0);
    }

    #[test]
    fn process_tree_contains_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let tree = process_tree(std::process::id());
        assert!(tree.contains(&child.id()), "{tree:?}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
