//! The few `bpf(2)` commands aya 0.14 keeps private: opening a pinned link, reading its info
//! (with the cgroup it is attached to) and `BPF_LINK_UPDATE`. A small safe wrapper over the
//! kernel ABI structs aya-obj generates.

use std::{
    ffi::CString,
    io, mem,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::{
    BPF_F_REPLACE, bpf_attach_type::BPF_LSM_CGROUP, bpf_attr, bpf_cmd, bpf_link_info,
    bpf_link_type, bpf_prog_type::BPF_PROG_TYPE_LSM,
};

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, zero-initialised bpf_attr of the size we pass; the kernel
    // reads and writes only within it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a pinned object (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    attr.__bindgen_anon_4.pathname = cpath.as_ptr() as u64;
    let fd = sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What the kernel says about a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// For a cgroup link: the cgroup it is attached to; 0 once detached.
    pub cgroup_id: Option<u64>,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // SAFETY: all-zero is a valid bpf_link_info.
    let mut info: bpf_link_info = unsafe { mem::zeroed() };
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = size_of::<bpf_link_info>() as u32;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let cgroup_id = if info.type_ == bpf_link_type::BPF_LINK_TYPE_CGROUP as u32 {
        // SAFETY: the kernel filled the cgroup member for a cgroup link.
        Some(unsafe { info.__bindgen_anon_1.cgroup.cgroup_id })
    } else {
        None
    };
    Ok(LinkInfo {
        id: info.id,
        prog_id: info.prog_id,
        cgroup_id,
    })
}

/// `BPF_LINK_UPDATE`: atomically swaps the link's program for `new_prog`, provided it still
/// runs `old_prog` (`BPF_F_REPLACE`), so concurrent updaters cannot clobber each other. The
/// hook never runs without a program.
pub fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    old_prog: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = new_prog.as_raw_fd() as u32;
    if let Some(old) = old_prog {
        attr.link_update.__bindgen_anon_2.old_prog_fd = old.as_raw_fd() as u32;
        attr.link_update.flags = BPF_F_REPLACE;
    }
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// `BPF_PROG_GET_FD_BY_ID`.
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    attr.__bindgen_anon_6.__bindgen_anon_1.prog_id = id;
    let fd = sys_bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether this kernel runs per-cgroup BPF LSM programs: loads `r0 = 1; exit` as
/// `BPF_PROG_TYPE_LSM` / `BPF_LSM_CGROUP` on `bpf_lsm_socket_create`. aya 0.14 can load such
/// programs, but only from an object; a probe needs none. Err says why not (the kernel's
/// error and verifier log). Seen failing with EPERM on kernels that cannot patch their text
/// for BPF trampolines (a PVM guest), even with CONFIG_BPF_LSM and `bpf` in the LSM list.
pub fn probe_lsm_cgroup() -> Result<(), String> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"))?;
    let id = btf
        .id_by_type_name_kind("bpf_lsm_socket_create", aya_obj::btf::BtfKind::Func)
        .map_err(|e| format!("the kernel has no BPF LSM hooks (CONFIG_BPF_LSM): {e}"))?;
    // BPF_MOV64_IMM(R0, 1); BPF_EXIT_INSN()
    let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    // SAFETY: the prog-load member of the union, on a zeroed attr.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = BPF_PROG_TYPE_LSM as u32;
    load.expected_attach_type = BPF_LSM_CGROUP as u32;
    load.attach_btf_id = id;
    load.insns = insns.as_ptr() as u64;
    load.insn_cnt = insns.len() as u32;
    load.license = license.as_ptr() as u64;
    load.log_level = 1;
    load.log_size = log.len() as u32;
    load.log_buf = log.as_mut_ptr() as u64;
    match sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => {
            // SAFETY: a new descriptor we own; closed at once.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            Ok(())
        }
        Err(e) => {
            let end = log.iter().position(|&c| c == 0).unwrap_or(log.len());
            let log = String::from_utf8_lossy(&log[..end]);
            let e = crate::sys::io_text(&e);
            Err(if log.trim().is_empty() {
                format!("the kernel refuses BPF LSM programs ({e})")
            } else {
                format!("the kernel refuses BPF LSM programs ({e}): {}", log.trim())
            })
        }
    }
}
