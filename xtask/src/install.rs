//! `cargo xtask install` and `cargo xtask uninstall`.
//!
//! Installs the release binary, the systemd units (with `ExecStart` pointing at the chosen
//! prefix), a default `/etc/enforcer/enforcer.yaml`, the example policies and the docs;
//! creates the state and log directories with their owners and modes, and the `enforcer`
//! group used by `admin_group`. `--destdir` stages everything under another root (for
//! packagers and tests) and then touches nothing on the host itself.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run_cmd;

/// The group allowed to enrol itself through the admin socket.
pub const GROUP: &str = "enforcer";

/// Where things go.
pub struct Layout {
    /// `--destdir`: everything is written below it ("/" for a real install).
    pub destdir: PathBuf,
    /// `--prefix`: binary in `<prefix>/bin`, docs in `<prefix>/share/doc/enforcer`.
    pub prefix: PathBuf,
}

impl Layout {
    pub fn at(&self, path: &Path) -> PathBuf {
        self.destdir.join(path.strip_prefix("/").unwrap_or(path))
    }
    pub fn bin(&self) -> PathBuf {
        self.prefix.join("bin/enforcer")
    }
    fn doc(&self) -> PathBuf {
        self.prefix.join("share/doc/enforcer")
    }
    fn staged(&self) -> bool {
        self.destdir != Path::new("/")
    }
}

const UNITS: &str = "/etc/systemd/system";
const ETC: &str = "/etc/enforcer";
const STATE: &str = "/var/lib/enforcer";
const LOGS: &str = "/var/log/enforcer";

/// The configuration installed when none exists.
const DEFAULT_CONFIG: &str = "\
# enforcer configuration. Every key is optional; see README.md for the reference.
# Changes to `agents` are picked up without a restart (or `systemctl reload enforcer`).
state_dir: /var/lib/enforcer
runtime_dir: /run/enforcer
bpffs_dir: /sys/fs/bpf/enforcer
admin_group: enforcer
proxy_port: 1001
dns_port: 1002
metrics_listen: 127.0.0.1:15090
audit_log: /var/log/enforcer/audit.jsonl
security_mode: strict
agents: []
# agents:
#   - name: sales-agent
#     policy: /etc/enforcer/policies/checkrd-sales-agent.yaml
#     cgroups: [agents.slice]
";

/// The unit file with `ExecStart` pointing at the layout's binary and `Documentation=` at
/// its installed README.
pub fn unit_for(root: &Path, layout: &Layout) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(root.join("systemd/enforcer.service"))?;
    Ok(text
        .replace(
            "/usr/local/bin/enforcer",
            &layout.bin().display().to_string(),
        )
        .replace(
            "file:///usr/local/share/doc/enforcer/README.md",
            &format!("file://{}", layout.doc().join("README.md").display()),
        ))
}

/// The variables `enforcer exec` points at the CA bundle (enforcer/src/cmd/exec.rs keeps the
/// list; the example drop-in must set every one).
const CA_VARS: [&str; 9] = [
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "CARGO_HTTP_CAINFO",
    "PIP_CERT",
    "AWS_CA_BUNDLE",
    "DENO_CERT",
];

/// Where the daemon writes the CA bundle with the default `runtime_dir`.
const CA_BUNDLE: &str = "/run/enforcer/ca-bundle.pem";

fn write(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    eprintln!("xtask: installed {}", path.display());
    Ok(())
}

fn mkdir(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Installs from `root` (the workspace); `binary` is the built enforcer.
pub fn install(root: &Path, layout: &Layout, binary: &Path) -> anyhow::Result<()> {
    if !layout.staged() && !crate::is_root() {
        bail!("installing needs root: run `sudo -E cargo xtask install`");
    }
    write(&layout.at(&layout.bin()), &std::fs::read(binary)?, 0o755)?;
    write(
        &layout.at(&Path::new(UNITS).join("enforcer.service")),
        unit_for(root, layout)?.as_bytes(),
        0o644,
    )?;
    write(
        &layout.at(&Path::new(UNITS).join("agents.slice")),
        &std::fs::read(root.join("systemd/agents.slice"))?,
        0o644,
    )?;
    for doc in ["README.md", "ARCHITECTURE.md"] {
        write(
            &layout.at(&layout.doc().join(doc)),
            &std::fs::read(root.join(doc))?,
            0o644,
        )?;
    }
    for example in std::fs::read_dir(root.join("systemd/examples"))?.flatten() {
        write(
            &layout.at(&layout.doc().join("examples").join(example.file_name())),
            &std::fs::read(example.path())?,
            0o644,
        )?;
    }
    let etc = layout.at(Path::new(ETC));
    mkdir(&etc, 0o755)?;
    let config = etc.join("enforcer.yaml");
    if config.exists() {
        eprintln!("xtask: keeping the existing {}", config.display());
    } else {
        write(&config, DEFAULT_CONFIG.as_bytes(), 0o644)?;
    }
    for policy in std::fs::read_dir(root.join("policies"))?.flatten() {
        let dest = etc.join("policies").join(policy.file_name());
        if dest.exists() {
            continue;
        }
        write(&dest, &std::fs::read(policy.path())?, 0o644)?;
    }
    // State is private to the daemon; logs are for root and auditors.
    mkdir(&layout.at(Path::new(STATE)), 0o700)?;
    mkdir(&layout.at(Path::new(LOGS)), 0o750)?;
    if layout.staged() {
        eprintln!(
            "xtask: staged under {}; no group created, systemd not touched",
            layout.destdir.display()
        );
        return Ok(());
    }
    ensure_group()?;
    if systemd_running() {
        run_cmd(Command::new("systemctl").arg("daemon-reload"))?;
    }
    eprintln!();
    eprintln!("xtask: installed. Next:");
    eprintln!("    edit /etc/enforcer/enforcer.yaml (add agents), then");
    eprintln!("    systemctl enable --now enforcer");
    eprintln!("    {} status", layout.bin().display());
    Ok(())
}

fn ensure_group() -> anyhow::Result<()> {
    let exists = Command::new("getent")
        .args(["group", GROUP])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !exists {
        eprintln!("xtask: creating the system group {GROUP} (admin_group)");
        run_cmd(Command::new("groupadd").args(["--system", GROUP]))?;
    }
    Ok(())
}

/// Reverses `install`. The configuration, state and logs stay unless `purge`.
pub fn uninstall(layout: &Layout, purge: bool) -> anyhow::Result<()> {
    if !layout.staged() && !crate::is_root() {
        bail!("uninstalling needs root: run `sudo -E cargo xtask uninstall`");
    }
    let bin = layout.at(&layout.bin());
    if !layout.staged() {
        if systemd_running() {
            let _ =
                run_cmd(Command::new("systemctl").args(["disable", "--now", "enforcer.service"]));
        }
        // The daemon is stopped: remove the pinned programs and maps.
        if bin.exists() {
            let _ = run_cmd(Command::new(&bin).args(["detach", "--all"]));
        }
    }
    let mut remove = vec![
        bin,
        layout.at(&Path::new(UNITS).join("enforcer.service")),
        layout.at(&Path::new(UNITS).join("agents.slice")),
    ];
    let doc = layout.at(&layout.doc());
    for path in remove.drain(..) {
        match std::fs::remove_file(&path) {
            Ok(()) => eprintln!("xtask: removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    if doc.exists() {
        std::fs::remove_dir_all(&doc)?;
        eprintln!("xtask: removed {}", doc.display());
    }
    if purge {
        for dir in [ETC, STATE, LOGS] {
            let dir = layout.at(Path::new(dir));
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
                eprintln!("xtask: removed {}", dir.display());
            }
        }
        if !layout.staged() {
            let _ = run_cmd(Command::new("groupdel").arg(GROUP));
        }
    } else {
        eprintln!("xtask: kept {ETC}, {STATE} and {LOGS} (pass --purge to remove them)");
    }
    if !layout.staged() && systemd_running() {
        run_cmd(Command::new("systemctl").arg("daemon-reload"))?;
    }
    Ok(())
}

/// `systemd-analyze verify` on every unit, with `ExecStart` pointing at `bin` (verify checks
/// that the command exists).
pub fn verify_units(root: &Path, bin: &Path) -> anyhow::Result<()> {
    let dir = tempdir("enforcer-units")?;
    let unit = std::fs::read_to_string(root.join("systemd/enforcer.service"))?
        .replace("/usr/local/bin/enforcer", &bin.display().to_string());
    std::fs::write(dir.join("enforcer.service"), unit)?;
    std::fs::copy(root.join("systemd/agents.slice"), dir.join("agents.slice"))?;
    std::fs::copy(
        root.join("systemd/examples/sales-agent.service"),
        dir.join("sales-agent.service"),
    )?;
    std::fs::create_dir_all(dir.join("sales-agent.service.d"))?;
    std::fs::copy(
        root.join("systemd/examples/agent-service.conf"),
        dir.join("sales-agent.service.d/enforcer.conf"),
    )?;
    let units = ["enforcer.service", "agents.slice", "sales-agent.service"].map(|u| dir.join(u));
    let result = run_cmd(
        Command::new("systemd-analyze")
            .arg("verify")
            .args(&units)
            .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display())),
    );
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Stages an install under a temporary root, checks it, and uninstalls it again.
pub fn self_test(root: &Path, binary: &Path) -> anyhow::Result<()> {
    let destdir = tempdir("enforcer-install")?;
    let layout = Layout {
        destdir: destdir.clone(),
        prefix: PathBuf::from("/opt/enforcer"),
    };
    let result = (|| {
        install(root, &layout, binary)?;
        let unit = std::fs::read_to_string(destdir.join("etc/systemd/system/enforcer.service"))?;
        if !unit.contains("ExecStart=/opt/enforcer/bin/enforcer daemon") {
            bail!("the installed unit does not start /opt/enforcer/bin/enforcer");
        }
        // Documentation= names a file the install wrote.
        let doc = unit
            .lines()
            .find_map(|l| l.strip_prefix("Documentation=file://"))
            .context("the unit has no file:// Documentation=")?;
        if !layout.at(Path::new(doc)).is_file() {
            bail!("the unit's Documentation= names {doc}, which the install did not write");
        }
        // The CA bundle stays readable by every enrolled user under the unit's UMask=0077:
        // the runtime directory is 0755 (the daemon chmods the bundle itself), the state
        // directory, with the CA key, 0700.
        for want in [
            "UMask=0077",
            "RuntimeDirectoryMode=0755",
            "StateDirectoryMode=0700",
        ] {
            if !unit.lines().any(|l| l == want) {
                bail!("the unit lacks {want}");
            }
        }
        let dropin = std::fs::read_to_string(
            destdir.join("opt/enforcer/share/doc/enforcer/examples/agent-service.conf"),
        )?;
        for var in CA_VARS {
            if !dropin.contains(&format!("Environment={var}={CA_BUNDLE}")) {
                bail!("the example drop-in does not set {var}={CA_BUNDLE}");
            }
        }
        let readme = std::fs::read_to_string(root.join("README.md"))?;
        if !readme.contains(CA_BUNDLE) || readme.contains("ca/bundle.pem") {
            bail!("README.md does not name the CA bundle at {CA_BUNDLE}");
        }
        for path in [
            "opt/enforcer/bin/enforcer",
            "etc/enforcer/enforcer.yaml",
            "etc/enforcer/policies/demo.yaml",
        ] {
            if !destdir.join(path).exists() {
                bail!("install did not create {path}");
            }
        }
        let mode = std::fs::metadata(destdir.join("var/lib/enforcer"))?
            .permissions()
            .mode()
            & 0o777;
        if mode != 0o700 {
            bail!("state directory mode is {mode:o}, expected 700");
        }
        uninstall(&layout, true)?;
        if destdir.join("opt/enforcer/bin/enforcer").exists()
            || destdir.join("etc/enforcer").exists()
        {
            bail!("uninstall --purge left files behind");
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&destdir);
    result
}

fn tempdir(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
