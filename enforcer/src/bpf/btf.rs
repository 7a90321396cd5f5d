//! The field offsets the connect hooks follow to name the caller's executable
//! (`task_struct->mm->exe_file->f_inode->{i_ino, i_sb->s_dev}`), computed from the running
//! kernel's BTF.
//!
//! aya's Rust eBPF has no CO-RE field relocations, so the kernel programs cannot ask the
//! loader to fix these offsets up; the daemon reads them from `/sys/kernel/btf/vmlinux` and
//! writes them into `GlobalConfig::task_offsets`. Members inside anonymous structs and unions
//! (recent kernels keep `mm_struct.exe_file` in one) are found with their enclosing offsets
//! added. When BTF is missing or a member is not where it should be, the offsets stay zero
//! and every record names an unknown executable.

use std::{path::Path, sync::OnceLock};

use btfparse::{Offset, Readable, TypeInformation, TypeVariant};
use enforcer_common::TaskOffsets;

/// Where the running kernel publishes its BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Largest BTF file read (vmlinux BTF is a few MiB).
const MAX_BTF_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error("cannot read the kernel's BTF at {path}: {message}")]
    Btf { path: String, message: String },
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
}

/// What a member must be for the kernel program to read it the way it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// A pointer (8 bytes on the 64-bit targets enforcer supports).
    Pointer,
    /// An integer of this many bytes.
    Int(usize),
}

/// The offsets for the running kernel, computed once per process. The first failure is
/// logged as a warning (naming what is missing); later calls return the same zero set
/// silently.
pub fn running_kernel() -> TaskOffsets {
    static OFFSETS: OnceLock<TaskOffsets> = OnceLock::new();
    *OFFSETS.get_or_init(|| match task_offsets(Path::new(VMLINUX)) {
        Ok(offsets) => {
            tracing::debug!(?offsets, "kernel field offsets for the caller's executable");
            offsets
        }
        Err(e) => {
            tracing::warn!(
                "{e}: connections will not record the executable that made them \
                 (the caller's executable is unknown)"
            );
            TaskOffsets::default()
        }
    })
}

/// BTF bytes in memory, for the parser (btfparse, Apache-2.0, reads through this trait).
struct InMemory(Vec<u8>);

impl Readable for InMemory {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let src = start
            .checked_add(buffer.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| {
                btfparse::Error::new(btfparse::ErrorKind::EOF, "read past the end of the BTF")
            })?;
        buffer.copy_from_slice(src);
        Ok(())
    }
}

/// The parsed BTF of the file at `path`.
fn parse(path: &Path) -> Result<TypeInformation, OffsetsError> {
    use std::io::Read as _;
    let err = |message: String| OffsetsError::Btf {
        path: path.display().to_string(),
        message,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_BTF_BYTES).read_to_end(&mut bytes))
        .map_err(|e| err(e.to_string()))?;
    TypeInformation::new(&InMemory(bytes)).map_err(|e| err(format!("{e:?}")))
}

/// The offsets from the BTF file at `path`.
pub fn task_offsets(path: &Path) -> Result<TaskOffsets, OffsetsError> {
    task_offsets_from(&parse(path)?)
}

/// The offsets from parsed BTF; `known` is set only when every one was found.
fn task_offsets_from(btf: &TypeInformation) -> Result<TaskOffsets, OffsetsError> {
    Ok(TaskOffsets {
        task_mm: member_offset(btf, "task_struct", "mm", Shape::Pointer)?,
        mm_exe_file: member_offset(btf, "mm_struct", "exe_file", Shape::Pointer)?,
        file_inode: member_offset(btf, "file", "f_inode", Shape::Pointer)?,
        inode_ino: member_offset(btf, "inode", "i_ino", Shape::Int(8))?,
        inode_sb: member_offset(btf, "inode", "i_sb", Shape::Pointer)?,
        sb_dev: member_offset(btf, "super_block", "s_dev", Shape::Int(4))?,
        known: 1,
        _pad0: 0,
    })
}

/// Byte offset of `field` in `struct name` (members of anonymous structs and unions
/// included: the parser looks into them), checked to have `shape`.
fn member_offset(
    btf: &TypeInformation,
    name: &str,
    field: &str,
    shape: Shape,
) -> Result<u32, OffsetsError> {
    let what = || {
        let shape = match shape {
            Shape::Pointer => "a pointer".to_owned(),
            Shape::Int(n) => format!("a {n}-byte integer"),
        };
        OffsetsError::Missing(format!("struct {name} member {field} ({shape})"))
    };
    let id = btf.id_of(name).ok_or_else(what)?;
    if !matches!(btf.from_id(id), Some(TypeVariant::Struct(_))) {
        return Err(what());
    }
    let (member_type, offset) = btf.offset_of(id, field).map_err(|_| what())?;
    let Offset::ByteOffset(bytes) = offset else {
        // A bitfield cannot be read as a whole pointer or integer.
        return Err(what());
    };
    let fits = match shape {
        Shape::Pointer => btf.pointee_tid(member_type).is_ok(),
        Shape::Int(n) => {
            resolves_to_int(btf, member_type) && btf.size_of(member_type).ok() == Some(n)
        }
    };
    if fits { Ok(bytes) } else { Err(what()) }
}

/// Is type `id` an integer once typedefs and qualifiers are looked through?
fn resolves_to_int(btf: &TypeInformation, mut id: u32) -> bool {
    for _ in 0..16 {
        id = match btf.from_id(id) {
            Some(TypeVariant::Int(_)) => return true,
            Some(TypeVariant::Typedef(t)) => *t.tid(),
            Some(TypeVariant::Const(t)) => *t.tid(),
            Some(TypeVariant::Volatile(t)) => *t.tid(),
            _ => return false,
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's kernel publishes BTF; every offset is found, non-zero, and the members
    /// of one struct sit at distinct offsets.
    #[test]
    fn offsets_are_found_in_the_running_kernel() {
        let path = Path::new(VMLINUX);
        assert!(path.exists(), "{VMLINUX} is missing: the kernel has no BTF");
        let o = task_offsets(path).unwrap();
        assert_eq!(o.known, 1);
        for (name, off) in [
            ("task_struct.mm", o.task_mm),
            ("mm_struct.exe_file", o.mm_exe_file),
            ("file.f_inode", o.file_inode),
            ("inode.i_ino", o.inode_ino),
            ("inode.i_sb", o.inode_sb),
            ("super_block.s_dev", o.sb_dev),
        ] {
            assert_ne!(off, 0, "{name}");
            // Well inside the structs (task_struct, the largest, is a few KiB).
            assert!(off < 16 * 1024, "{name} at {off}");
        }
        assert_ne!(o.inode_ino, o.inode_sb);
        // Pointers are 8-byte aligned; i_ino is an unsigned long, s_dev a u32.
        for off in [
            o.task_mm,
            o.mm_exe_file,
            o.file_inode,
            o.inode_sb,
            o.inode_ino,
        ] {
            assert_eq!(off % 8, 0, "{o:?}");
        }
        assert_eq!(o.sb_dev % 4, 0);
        assert_eq!(running_kernel(), o);
    }

    /// Something the BTF does not have is named in the error.
    #[test]
    fn a_missing_member_is_named() {
        let btf = parse(Path::new(VMLINUX)).unwrap();
        let err = member_offset(&btf, "inode", "no_such_member", Shape::Pointer).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the kernel's BTF has no struct inode member no_such_member (a pointer)"
        );
        // A member of the wrong shape is refused too.
        assert!(member_offset(&btf, "inode", "i_sb", Shape::Int(8)).is_err());
        let err = task_offsets(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }
}
