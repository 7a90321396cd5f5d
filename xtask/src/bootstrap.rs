//! Installing what a fresh machine lacks, idempotently: the nightly's rust-src, LLVM 22
//! (Debian's llvm-22-dev) and bpf-linker built against it. Each step checks first, says what
//! it installs, and when it cannot install (not root, not Debian) stops with the exact
//! commands to run.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{display, is_root, run_cmd};

/// The nightly that builds the eBPF crate (aya-build's default).
const NIGHTLY: &str = "nightly";
/// LLVM major of that nightly and of bpf-linker; they must agree.
const LLVM_MAJOR: u32 = 22;
const LLVM_PACKAGES: [&str; 4] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];

pub fn ensure_toolchain() -> anyhow::Result<()> {
    ensure_nightly()?;
    ensure_rust_src()?;
    ensure_llvm()?;
    ensure_bpf_linker()?;
    check_llvm_majors()
}

fn ensure_nightly() -> anyhow::Result<()> {
    if output("rustc", &[&format!("+{NIGHTLY}"), "-vV"]).is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing the {NIGHTLY} toolchain (it builds the eBPF programs)");
    run_cmd(Command::new("rustup").args([
        "toolchain",
        "install",
        NIGHTLY,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
    .context("installing the nightly failed; run `rustup toolchain install nightly --component rust-src`")
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let sysroot = output("rustc", &[&format!("+{NIGHTLY}"), "--print", "sysroot"])
        .context("rustc +nightly --print sysroot failed")?;
    let library = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if library.exists() {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src for {NIGHTLY} (needed by -Z build-std=core)");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

fn llvm_config() -> String {
    format!("/usr/lib/llvm-{LLVM_MAJOR}/bin/llvm-config")
}

fn ensure_llvm() -> anyhow::Result<()> {
    if Path::new(&llvm_config()).exists() {
        return Ok(());
    }
    let install = format!(
        "apt-get update && apt-get install -y {}",
        LLVM_PACKAGES.join(" ")
    );
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "LLVM {LLVM_MAJOR} development files are missing and this is not a Debian system; \
             install LLVM {LLVM_MAJOR} (llvm-config at {}) with your package manager",
            llvm_config()
        );
    }
    if !is_root() {
        bail!("LLVM {LLVM_MAJOR} is missing; install it as root:\n    sudo sh -c '{install}'");
    }
    eprintln!(
        "xtask: installing LLVM {LLVM_MAJOR} for bpf-linker: {}",
        LLVM_PACKAGES.join(" ")
    );
    apt_install(&LLVM_PACKAGES)
}

/// `apt-get install`, refreshing the package lists first when a package is unknown.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    if run_cmd(&mut install).is_ok() {
        return Ok(());
    }
    eprintln!("xtask: refreshing the package lists and retrying");
    run_cmd(Command::new("apt-get").arg("update"))?;
    run_cmd(&mut install)
}

fn bpf_linker_llvm_major() -> Option<u32> {
    let path = which("bpf-linker")?;
    let ldd = output("ldd", &[path.to_str()?])?;
    // Dynamically linked: libLLVM.so.22.1 or libLLVM-22.so.
    ldd.split_whitespace().find_map(|w| {
        let rest = w
            .strip_prefix("libLLVM.so.")
            .or_else(|| w.strip_prefix("libLLVM-"))?;
        rest.split(['.', '-']).next()?.parse().ok()
    })
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if which("bpf-linker").is_some() && bpf_linker_llvm_major() == Some(LLVM_MAJOR) {
        return Ok(());
    }
    let cmd = format!(
        "PATH=/usr/lib/llvm-{LLVM_MAJOR}/bin:$PATH cargo install bpf-linker --no-default-features --features llvm-{LLVM_MAJOR} --force"
    );
    eprintln!("xtask: installing bpf-linker against LLVM {LLVM_MAJOR} (a few minutes): {cmd}");
    let path = format!(
        "/usr/lib/llvm-{LLVM_MAJOR}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
                "--force",
            ])
            .env("PATH", path),
    )
    .with_context(|| format!("installing bpf-linker failed; run it by hand:\n    {cmd}"))
}

fn check_llvm_majors() -> anyhow::Result<()> {
    let nightly = output("rustc", &[&format!("+{NIGHTLY}"), "-vV"]).unwrap_or_default();
    let nightly_major: Option<u32> = nightly
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.parse().ok());
    let linker_major = bpf_linker_llvm_major();
    match (nightly_major, linker_major) {
        (Some(n), Some(l)) if n == l => Ok(()),
        (n, l) => bail!(
            "LLVM mismatch: rustc +{NIGHTLY} uses LLVM {}, bpf-linker uses LLVM {}. They must \
             match or the eBPF link fails. Install LLVM {} development files and rebuild \
             bpf-linker:\n    PATH=/usr/lib/llvm-{}/bin:$PATH cargo install bpf-linker \
             --no-default-features --features llvm-{} --force",
            n.map_or("?".into(), |v| v.to_string()),
            l.map_or("?".into(), |v| v.to_string()),
            n.unwrap_or(LLVM_MAJOR),
            n.unwrap_or(LLVM_MAJOR),
            n.unwrap_or(LLVM_MAJOR),
        ),
    }
}

/// Tools the end-to-end tests drive: `ip` (network namespaces), `setpriv`, `systemd-analyze`.
/// Where the tests' Python SDKs (openai, anthropic) are installed: a venv of the system's
/// `/usr/bin/python3`, outside any home directory, so `nobody` can run it.
pub const TEST_VENV: &str = "/opt/enforcer-test/venv";
/// The Python packages the SDK tests use, from PyPI.
const TEST_PY_PACKAGES: [&str; 2] = ["openai", "anthropic"];

pub fn ensure_test_tools() -> anyhow::Result<()> {
    ensure_packages()?;
    ensure_test_venv()
}

/// The venv with the agent SDKs the tests drive: made once, kept (idempotent: skipped when
/// the packages import).
fn ensure_test_venv() -> anyhow::Result<()> {
    let python = Path::new(TEST_VENV).join("bin/python");
    let imports = |python: &Path| {
        Command::new(python)
            .args(["-c", "import openai, anthropic"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if imports(&python) {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the SDK tests need a venv at {TEST_VENV}: sudo /usr/bin/python3 -m venv {TEST_VENV} \
             && sudo {TEST_VENV}/bin/pip install {}",
            TEST_PY_PACKAGES.join(" ")
        );
    }
    if !python.exists() {
        if Command::new("/usr/bin/python3")
            .args(["-c", "import venv, ensurepip"])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            eprintln!("xtask: installing python3-venv for the SDK tests");
            apt_install(&["python3-venv"])?;
        }
        eprintln!("xtask: creating {TEST_VENV} for the SDK tests");
        run_cmd(Command::new("/usr/bin/python3").args(["-m", "venv", TEST_VENV]))?;
    }
    eprintln!(
        "xtask: installing {} from PyPI into {TEST_VENV}",
        TEST_PY_PACKAGES.join(", ")
    );
    run_cmd(
        Command::new(Path::new(TEST_VENV).join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(TEST_PY_PACKAGES),
    )?;
    // Readable and runnable by every user: the tests run the SDKs as nobody.
    run_cmd(Command::new("chmod").args(["-R", "a+rX", "/opt/enforcer-test"]))?;
    if !imports(&python) {
        bail!("{TEST_VENV}: openai and anthropic still do not import after installing them");
    }
    Ok(())
}

fn ensure_packages() -> anyhow::Result<()> {
    let wanted = [
        ("ip", "iproute2"),
        ("setpriv", "util-linux"),
        ("systemd-analyze", "systemd"),
        ("curl", "curl"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(tool, _)| which(tool).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "the tests need {}; install them: sudo apt-get install -y {}",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing test tools: {}", missing.join(" "));
    apt_install(&missing)
}

/// clippy on the eBPF crate, for its own target.
pub fn clippy_ebpf() -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args([
        &format!("+{NIGHTLY}"),
        "clippy",
        "-p",
        "enforcer-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--target-dir",
        "target/ebpf-clippy",
        "--",
        "-D",
        "warnings",
    ]);
    run_cmd(&mut cmd).with_context(|| format!("{} failed", display(&cmd)))
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|h| h.join("bin"));
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
