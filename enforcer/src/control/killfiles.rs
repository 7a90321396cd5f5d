//! The kill-switch files: a file that stops an agent now.
//!
//! One global file (config `kill_switch`) and one per agent (`<state_dir>/kill/<agent>`).
//! A file that exists engages the switch; removing it lifts it. Any error other than "not
//! found" (a permission problem, EIO, a symlink, a directory in the way) counts as engaged:
//! the switch fails closed. Files are examined with `lstat`, never followed.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// The state the files describe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KillState {
    pub global: bool,
    /// Agents whose own file engages the switch.
    pub agents: BTreeSet<String>,
}

impl KillState {
    /// Is this agent cut off (globally or by its own file)?
    pub fn kills(&self, agent: &str) -> bool {
        self.global || self.agents.contains(agent)
    }
}

/// Is the switch at `path` engaged? Only a clean "not found" means no.
pub fn engaged(path: &Path) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!(path = %path.display(), "kill switch file unreadable ({e}); treating it as engaged");
            true
        }
    }
}

/// Where the files are.
#[derive(Debug, Clone)]
pub struct KillFiles {
    pub global: PathBuf,
    pub agent_dir: PathBuf,
}

impl KillFiles {
    pub fn agent(&self, name: &str) -> PathBuf {
        self.agent_dir.join(name)
    }

    /// Reads the switch for the global file and each of `agents`.
    pub fn read(&self, agents: &[String]) -> KillState {
        KillState {
            global: engaged(&self.global),
            agents: agents
                .iter()
                .filter(|a| engaged(&self.agent(a)))
                .cloned()
                .collect(),
        }
    }

    /// The directories to watch.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.agent_dir.clone()];
        if let Some(p) = self.global.parent() {
            dirs.push(p.to_owned());
        }
        dirs
    }
}

/// What changed between two states, per agent: `true` engaged, `false` lifted.
pub fn changes(before: &KillState, after: &KillState, agents: &[String]) -> BTreeMap<String, bool> {
    agents
        .iter()
        .filter_map(|a| {
            let (b, n) = (before.kills(a), after.kills(a));
            (b != n).then(|| (a.clone(), n))
        })
        .collect()
}

/// `enforcer kill`: creates the file (without following a symlink at its place).
pub fn create(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(path)
    {
        Ok(_) => Ok(()),
        // Something is already there (a symlink, a directory): that engages the switch too.
        Err(_) if std::fs::symlink_metadata(path).is_ok() => Ok(()),
        Err(e) => Err(e),
    }
}

/// `enforcer revive`: removes the file (a symlink is removed, not its target).
pub fn remove(path: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> KillFiles {
        KillFiles {
            global: dir.join("killswitch"),
            agent_dir: dir.join("kill"),
        }
    }

    #[test]
    fn files_engage_and_lift_per_agent_and_globally() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        let agents = vec!["a".to_string(), "b".to_string()];
        assert_eq!(f.read(&agents), KillState::default());
        create(&f.agent("a")).unwrap();
        let s = f.read(&agents);
        assert!(s.kills("a") && !s.kills("b"));
        create(&f.global).unwrap();
        let s2 = f.read(&agents);
        assert!(s2.kills("a") && s2.kills("b"));
        assert_eq!(
            changes(&s, &s2, &agents),
            BTreeMap::from([("b".to_string(), true)])
        );
        assert!(remove(&f.global).unwrap());
        assert!(remove(&f.agent("a")).unwrap());
        assert!(!remove(&f.agent("a")).unwrap());
        assert_eq!(f.read(&agents), KillState::default());
    }

    #[test]
    fn a_symlink_counts_as_engaged_even_when_dangling() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &f.global).unwrap();
        assert!(engaged(&f.global));
        // `kill` over an existing symlink keeps it engaged and does not write through it.
        create(&f.global).unwrap();
        assert!(!dir.path().join("nowhere").exists());
    }

    #[test]
    fn an_unreadable_path_counts_as_engaged() {
        let dir = tempfile::tempdir().unwrap();
        // A path through a regular file fails with ENOTDIR, not ENOENT.
        std::fs::write(dir.path().join("file"), b"").unwrap();
        assert!(engaged(&dir.path().join("file/killswitch")));
    }
}
