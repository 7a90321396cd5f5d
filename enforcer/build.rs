//! Builds `enforcer-ebpf` for the BPF target with aya-build, so the binary can embed the
//! object with `include_bytes_aligned!`.
//!
//! `AYA_BUILD_SKIP=1` skips the kernel build (useful for `cargo check` without bpf-linker);
//! an empty object is written then, and `enforcer daemon` refuses to start with it.

use std::{env, fs, path::PathBuf};

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set"));
    let ebpf_dir = manifest_dir
        .parent()
        .expect("enforcer/ sits inside the workspace")
        .join("enforcer-ebpf");
    let ebpf_dir = ebpf_dir.to_str().expect("workspace path is UTF-8");

    let package = aya_build::Package {
        name: "enforcer-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    // aya-build forwards every line the nested cargo prints as a `cargo:warning` (about 160
    // "Compiling ..." lines on a fresh build): keep that cargo quiet. Its errors and real
    // compiler warnings still come through, and a failure below says what to do.
    // SAFETY: a build script is single-threaded here; nothing else reads the environment.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    if let Err(err) = aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        panic!(
            "building the eBPF programs failed: {err:#}\n\
             Run `cargo xtask build`: it installs the nightly's rust-src, LLVM 22 and bpf-linker \
             when they are missing, and checks that their LLVM versions match."
        );
    }
    println!("cargo:warning=built the eBPF programs (enforcer-ebpf, bpfel-unknown-none)");
    // With AYA_BUILD_SKIP set, aya-build writes nothing: leave an empty object behind so the
    // crate still compiles; the loader rejects it at run time with a clear message.
    let object = out_dir.join("enforcer");
    if !object.exists() {
        fs::write(&object, []).expect("write empty eBPF placeholder");
    }
}
