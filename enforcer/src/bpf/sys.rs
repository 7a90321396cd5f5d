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

use aya_obj::generated::{BPF_F_REPLACE, bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type};

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
