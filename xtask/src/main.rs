//! `cargo xtask`: build, run, test and benchmark enforcer, installing the toolchain pieces a
//! fresh machine lacks (idempotently, saying what it does).
//!
//! - `cargo xtask build [--release]`
//! - `cargo xtask run [--release]`: build, then `enforcer daemon` on an embedded default
//!   configuration (state under `.enforcer-run/`, listeners on loopback, agent `demo`).
//! - `cargo xtask test`: fmt, clippy `-D warnings`, unit tests, the privileged end-to-end
//!   tests and `policy check` of every shipped policy.
//! - `cargo xtask bench [--secs N] [--runs N] [--only policy|credentials|proxy|splice|kill]`: the policy-engine,
//!   proxy and kill-switch benchmarks (root, but for `--only policy`; installs wrk and oha
//!   when missing), each written to its section of `BENCHMARKS.md`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;
mod bootstrap;
mod install;

#[derive(Parser)]
#[command(name = "xtask", about = "Build, run and test enforcer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing, then build enforcer (with its eBPF programs).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `enforcer daemon` on the embedded default configuration.
    Run {
        #[arg(long)]
        release: bool,
    },
    /// fmt, clippy -D warnings, unit tests, privileged end-to-end tests, policy checks,
    /// systemd unit verification.
    Test,
    /// Build the release binary and install it with the systemd units, a default config,
    /// the example policies, the state and log directories and the `enforcer` group.
    Install {
        /// Binary in PREFIX/bin, docs in PREFIX/share/doc/enforcer; written into the unit's
        /// ExecStart.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Stage everything below this directory instead of / (packaging).
        #[arg(long, default_value = "/")]
        destdir: PathBuf,
    },
    /// Reverse `install`: stop and disable the unit, detach the eBPF programs, remove the
    /// files. Configuration, state and logs stay unless --purge.
    Uninstall {
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        #[arg(long, default_value = "/")]
        destdir: PathBuf,
        #[arg(long)]
        purge: bool,
    },
    /// Benchmarks, written to BENCHMARKS.md: the policy engine, the proxy against direct
    /// connections and the kill switch (root, but for `--only policy`).
    Bench {
        /// Seconds per measured run.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Runs of each measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Run one benchmark only.
        #[arg(long, value_enum)]
        only: Option<bench::Part>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Cmd::Build { release } => {
            bootstrap::ensure_toolchain()?;
            build(release)?;
        }
        Cmd::Run { release } => {
            bootstrap::ensure_toolchain()?;
            build(release)?;
            run(&root, release)?;
        }
        Cmd::Test => {
            bootstrap::ensure_toolchain()?;
            bootstrap::ensure_test_tools()?;
            test(&root)?;
        }
        Cmd::Install { prefix, destdir } => {
            bootstrap::ensure_toolchain()?;
            build_install()?;
            let layout = install::Layout { destdir, prefix };
            install::install(&root, &layout, &root.join("target/release/enforcer"))?;
        }
        Cmd::Uninstall {
            prefix,
            destdir,
            purge,
        } => install::uninstall(&install::Layout { destdir, prefix }, purge)?,
        Cmd::Bench { secs, runs, only } => {
            bootstrap::ensure_toolchain()?;
            bench::run(&root, secs, runs, only)?;
        }
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_owned()
}

/// Runs a command, failing with its command line when it fails.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", display(cmd));
    }
    Ok(())
}

pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The release binary alone, for `install`: no test crates.
fn build_install() -> anyhow::Result<()> {
    run_cmd(cargo().args(["build", "--release", "-p", "enforcer", "--bin", "enforcer"]))
}

/// A rebuild of the eBPF programs prints one progress line, not the nested cargo's output.
fn check_ebpf_build_is_quiet(root: &Path) -> anyhow::Result<()> {
    let main = root.join("enforcer-ebpf/src/main.rs");
    let file = std::fs::File::options().append(true).open(&main)?;
    file.set_modified(std::time::SystemTime::now())?;
    let mut cmd = cargo();
    cmd.args(["build", "-p", "enforcer"]);
    eprintln!(
        "xtask: running {} (after touching {})",
        display(&cmd),
        main.display()
    );
    let out = cmd.output().context("running cargo build")?;
    let text = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("cargo build failed:\n{text}");
    }
    let noise = text
        .lines()
        .filter(|l| l.starts_with("warning: enforcer@"))
        .count();
    if noise > 1 {
        bail!("rebuilding the eBPF programs printed {noise} warning lines (at most 1):\n{text}");
    }
    eprintln!("xtask: the eBPF rebuild printed {noise} line");
    Ok(())
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "enforcer", "-p", "enforcer-tests"]);
    if release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd)
}

/// The configuration `cargo xtask run` starts the daemon with. Paths are relative to the
/// config file, which lives in `.enforcer-run/`.
const RUN_CONFIG: &str = "\
# Written by `cargo xtask run`: a local, loopback-only daemon for trying enforcer out.
state_dir: state
runtime_dir: run
bpffs_dir: /sys/fs/bpf/enforcer-dev
audit_log: audit.jsonl
proxy_port: 1001
dns_port: 1002
metrics_listen: 127.0.0.1:15090
agents:
  - name: demo
    policy: ../policies/demo.yaml
";

fn run(root: &Path, release: bool) -> anyhow::Result<()> {
    let dir = root.join(".enforcer-run");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("enforcer.yaml");
    std::fs::write(&config, RUN_CONFIG)?;
    let bin = root
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("enforcer");
    let sudo = if is_root() { "" } else { "sudo " };
    let sudo_user = std::env::var("SUDO_USER").ok();
    eprintln!();
    eprintln!("xtask: starting enforcer daemon with {}", config.display());
    eprintln!("xtask: in another terminal, run a command under the demo agent's policy:");
    eprintln!();
    eprintln!(
        "    {}",
        try_line(&bin, &config, is_root(), sudo_user.as_deref())
    );
    eprintln!();
    eprintln!(
        "xtask: `{sudo}{} --config {} status` shows counters; the audit log is {}",
        bin.display(),
        config.display(),
        dir.join("audit.jsonl").display()
    );
    eprintln!();
    let mut cmd = if is_root() {
        Command::new(&bin)
    } else {
        eprintln!("xtask: the daemon needs root; running it through sudo");
        let mut c = Command::new("sudo");
        c.arg(&bin);
        c
    };
    cmd.arg("--config").arg(&config).arg("daemon");
    run_cmd(&mut cmd)
}

/// The line `cargo xtask run` prints to try the demo agent, which must work pasted as it is:
/// enforcer exec refuses to run a command as root, so a root shell names a user, and under
/// sudo (or as a user, through sudo) exec drops to the sudo caller by itself.
fn try_line(bin: &Path, config: &Path, root: bool, sudo_user: Option<&str>) -> String {
    let exec = format!(
        "{} --config {} exec --agent demo",
        bin.display(),
        config.display()
    );
    let curl = "-- curl -sv https://example.com/";
    match (root, sudo_user) {
        // A root shell: no sudo caller to fall back to.
        (true, None | Some("root")) => format!("{exec} --user nobody {curl}"),
        // Under sudo, or as a user: sudo again, and exec runs the command as that user.
        _ => format!("sudo {exec} {curl}"),
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn test(root: &Path) -> anyhow::Result<()> {
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // The default members: everything but the eBPF crate, which only builds for the BPF
    // target and is linted for it below.
    run_cmd(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    bootstrap::clippy_ebpf()?;
    build(false)?;
    check_ebpf_build_is_quiet(root)?;
    if !is_root() {
        bail!(
            "the end-to-end tests load eBPF programs and need root: run `sudo -E cargo xtask test` \
             (the unit tests, fmt and clippy above passed)"
        );
    }
    sweep_test_leftovers();
    // The end-to-end tests fail, rather than skip, when their prerequisites are missing.
    run_cmd(
        cargo()
            .args(["test", "--no-fail-fast"])
            .env("ENFORCER_E2E", "require"),
    )?;
    let bin = root.join("target/debug/enforcer");
    let mut policies: Vec<PathBuf> = std::fs::read_dir(root.join("policies"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    policies.sort();
    run_cmd(
        Command::new(&bin)
            .arg("policy")
            .arg("check")
            .args(&policies),
    )?;
    install::verify_units(root, &bin)?;
    install::self_test(root, &bin)?;
    eprintln!("xtask: all checks passed");
    Ok(())
}

/// Removes what an interrupted test run left behind (a test killed before its clean-up ran):
/// bpffs pins named `enforcer-test-*` and agent cgroups `t*-<pid>x<n>` whose test process is
/// gone. Tests clean up after themselves; this covers the runs that were killed.
fn sweep_test_leftovers() {
    // Daemons of a killed test run (their configs live in /tmp/enforcer-e2e-*) outlive it.
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("/enforcer-e2e-")
                && cmdline.contains("daemon")
                && let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>()
            {
                eprintln!("xtask: stopping a daemon left by an interrupted test run (pid {pid})");
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    // Names are <prefix><pid>x<n>.
    let owner = |name: &str| -> Option<String> {
        let digits: String = name
            .rsplit_once('x')?
            .0
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect();
        Some(digits.chars().rev().collect())
    };
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("enforcer-test-") && owner(&name).is_some_and(|p| !alive(&p)) {
                eprintln!("xtask: removing stale test pins /sys/fs/bpf/{name}");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let Some(mount) = mountinfo.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (f.get(sep + 1) == Some(&"cgroup2")).then(|| PathBuf::from(f[4]))
    }) else {
        return;
    };
    if let Ok(entries) = std::fs::read_dir(mount.join("enforcer.slice")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('t')
                && name.contains('-')
                && owner(&name).is_some_and(|p| !p.is_empty() && !alive(&p))
            {
                eprintln!("xtask: removing stale test cgroup {}", e.path().display());
                let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
                std::thread::sleep(std::time::Duration::from_millis(100));
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_demo_line_never_asks_to_run_as_root() {
        let (bin, cfg) = (
            Path::new("/w/target/debug/enforcer"),
            Path::new("/w/.enforcer-run/e.yaml"),
        );
        let root_shell = try_line(bin, cfg, true, None);
        assert!(root_shell.contains("--user nobody"), "{root_shell}");
        assert!(!root_shell.starts_with("sudo"), "{root_shell}");
        assert_eq!(try_line(bin, cfg, true, Some("root")), root_shell);
        for line in [
            try_line(bin, cfg, true, Some("alice")),
            try_line(bin, cfg, false, None),
        ] {
            assert!(line.starts_with("sudo /w/target/debug/enforcer --config /w/.enforcer-run/e.yaml exec --agent demo -- curl"), "{line}");
            assert!(!line.contains("--user"), "{line}");
        }
    }
}
