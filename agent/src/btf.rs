//! Kernel struct offsets from the running kernel's BTF.
//!
//! Rust eBPF has no CO-RE field relocations, so the agent reads the offsets
//! the programs need from `/sys/kernel/btf/vmlinux` (raw BTF) at load time
//! and writes them into the programs' `OFFSETS` global. The parser knows
//! only what that needs: types and strings, struct/union members (descending
//! into anonymous members: `file.f_path` sits in an anonymous union on 6.12+).

use std::path::{Path, PathBuf};

use portcullis_common::KernelOffsets;

/// Default location of the running kernel's BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading btf file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed btf: {0}")]
    Malformed(&'static str),
    #[error("btf has unknown type kind {kind} (type id {id})")]
    UnknownKind { kind: u32, id: u32 },
    #[error("btf has no struct {name}")]
    NoStruct { name: String },
    #[error("btf struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("btf member {strukt}.{member} is not a struct or union")]
    NotComposite { strukt: String, member: String },
    #[error("btf member {strukt}.{member} is a bitfield")]
    Bitfield { strukt: String, member: String },
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Offset in bits from the start of the enclosing struct.
    bit_offset: u32,
    /// Non-zero for a bitfield (kind_flag encoding).
    bitfield_size: u32,
}

#[derive(Debug)]
struct Type {
    name_off: u32,
    kind: u32,
    /// `size_or_type`: the referenced type for modifiers/typedefs.
    size_or_type: u32,
    members: Vec<Member>,
}

/// A parsed BTF blob (types and strings only).
#[derive(Debug)]
pub struct Btf {
    /// Index = type id; id 0 is `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, BtfError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(BtfError::Malformed("truncated"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// Reads and parses a raw BTF file.
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.into(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses raw (little-endian) BTF.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if u16_at(data, 0)? != MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian raw btf)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_sec = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();

        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            size_or_type: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < types_sec.len() {
            let id = types.len() as u32;
            let name_off = u32_at(types_sec, at)?;
            let info = u32_at(types_sec, at + 4)?;
            let size_or_type = u32_at(types_sec, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let trailing = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + 12 * i;
                        let offset = u32_at(types_sec, m + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (offset & 0xff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        members.push(Member {
                            name_off: u32_at(types_sec, m)?,
                            type_id: u32_at(types_sec, m + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    12 * vlen
                }
                _ => return Err(BtfError::UnknownKind { kind, id }),
            };
            at += trailing;
            types.push(Type {
                name_off,
                kind,
                size_or_type,
                members,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        &s[..s.iter().position(|&c| c == 0).unwrap_or(s.len())]
    }

    /// Strips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return Some(t),
            }
        }
        None
    }

    fn find_struct(&self, name: &str) -> Option<&Type> {
        self.types.iter().find(|t| {
            (t.kind == KIND_STRUCT || t.kind == KIND_UNION)
                && !t.members.is_empty()
                && self.name(t.name_off) == name.as_bytes()
        })
    }

    /// Bit offset and type of member `name` of `t`, looking inside anonymous
    /// struct/union members.
    fn member_in(&self, t: &Type, name: &str, depth: u32) -> Option<(u32, Member)> {
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            let mname = self.name(m.name_off);
            if mname == name.as_bytes() {
                return Some((m.bit_offset, *m));
            }
            if mname.is_empty()
                && let Some(inner) = self.resolve(m.type_id)
                && (inner.kind == KIND_STRUCT || inner.kind == KIND_UNION)
                && let Some((off, found)) = self.member_in(inner, name, depth + 1)
            {
                return Some((m.bit_offset + off, found));
            }
        }
        None
    }

    /// Byte offset of `path` (`"f_path.dentry"`: members separated by dots)
    /// inside struct `strukt`.
    pub fn offset_of(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut t = self.find_struct(strukt).ok_or_else(|| BtfError::NoStruct {
            name: strukt.to_owned(),
        })?;
        let mut bits = 0;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let (off, m) = self
                .member_in(t, part, 0)
                .ok_or_else(|| BtfError::NoMember {
                    strukt: strukt.to_owned(),
                    member: path.to_owned(),
                })?;
            if m.bitfield_size != 0 || off % 8 != 0 {
                return Err(BtfError::Bitfield {
                    strukt: strukt.to_owned(),
                    member: path.to_owned(),
                });
            }
            bits += off;
            if parts.peek().is_some() {
                t = self
                    .resolve(m.type_id)
                    .filter(|t| t.kind == KIND_STRUCT || t.kind == KIND_UNION)
                    .ok_or_else(|| BtfError::NotComposite {
                        strukt: strukt.to_owned(),
                        member: part.to_owned(),
                    })?;
            }
        }
        Ok(bits / 8)
    }
}

/// Every offset the programs need, from the BTF at `btf_path`.
pub fn kernel_offsets(btf_path: &Path) -> Result<KernelOffsets, BtfError> {
    let btf = Btf::from_file(btf_path)?;
    offsets_from(&btf)
}

/// Every offset the programs need, from parsed BTF.
pub fn offsets_from(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    Ok(KernelOffsets {
        file_dentry: btf.offset_of("file", "f_path.dentry")?,
        file_f_mode: btf.offset_of("file", "f_mode")?,
        file_f_inode: btf.offset_of("file", "f_inode")?,
        dentry_d_parent: btf.offset_of("dentry", "d_parent")?,
        dentry_d_inode: btf.offset_of("dentry", "d_inode")?,
        dentry_d_name: btf.offset_of("dentry", "d_name.name")?,
        inode_i_ino: btf.offset_of("inode", "i_ino")?,
        inode_i_sb: btf.offset_of("inode", "i_sb")?,
        super_block_s_dev: btf.offset_of("super_block", "s_dev")?,
        linux_binprm_file: btf.offset_of("linux_binprm", "file")?,
        linux_binprm_filename: btf.offset_of("linux_binprm", "filename")?,
        task_struct_files: btf.offset_of("task_struct", "files")?,
        task_struct_mm: btf.offset_of("task_struct", "mm")?,
        files_struct_fdt: btf.offset_of("files_struct", "fdt")?,
        fdtable_max_fds: btf.offset_of("fdtable", "max_fds")?,
        fdtable_fd: btf.offset_of("fdtable", "fd")?,
        mm_struct_exe_file: btf.offset_of("mm_struct", "exe_file")?,
        pt_regs_orig_ax: btf.offset_of("pt_regs", "orig_ax")?,
        valid: 1,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Option<Btf> {
        let p = Path::new(VMLINUX_BTF);
        if !p.exists() {
            eprintln!("skipped: {VMLINUX_BTF} is missing");
            return None;
        }
        Some(Btf::from_file(p).expect("host btf parses"))
    }

    /// `(file.f_path, linux_binprm.file, file.f_path.dentry)` measured with
    /// `bpftool btf dump ... format raw` on the kernels this project is
    /// tested on (the host, and the Debian kernels `cargo xtask vm` boots).
    /// `f_path` moved into an anonymous union in 6.12, so the parser must
    /// descend into anonymous members to find it there.
    const MEASURED_LAYOUTS: &[(&str, (u32, u32, u32))] = &[
        ("6.1.", (16, 64, 24)),
        ("6.12.", (64, 64, 72)),
        ("6.18.", (64, 64, 72)),
    ];

    fn running_release() -> String {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    #[test]
    fn host_offsets_match_known_layout() {
        let Some(btf) = host() else { return };
        let f_path = btf.offset_of("file", "f_path").unwrap();
        let bprm_file = btf.offset_of("linux_binprm", "file").unwrap();
        let dentry = btf.offset_of("file", "f_path.dentry").unwrap();
        // True of every kernel: `struct path` is { mnt, dentry }, and a
        // dotted path adds the offsets of its members.
        assert_eq!(btf.offset_of("path", "mnt").unwrap(), 0);
        assert_eq!(btf.offset_of("path", "dentry").unwrap(), 8);
        assert_eq!(dentry, f_path + 8);
        // The exact numbers, on the kernels whose layout was measured.
        let release = running_release();
        match MEASURED_LAYOUTS
            .iter()
            .find(|(prefix, _)| release.starts_with(prefix))
        {
            Some((_, want)) => assert_eq!(
                (f_path, bprm_file, dentry),
                *want,
                "(file.f_path, linux_binprm.file, file.f_path.dentry) on {release}"
            ),
            None => eprintln!(
                "kernel {release}: no measured layout to compare with; \
                 checked the invariants only (f_path at {f_path})"
            ),
        }
    }

    #[test]
    fn host_kernel_offsets_are_all_filled() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipped: {VMLINUX_BTF} is missing");
            return;
        }
        let o = kernel_offsets(Path::new(VMLINUX_BTF)).unwrap();
        assert_eq!(o.valid, 1);
        assert!(o.dentry_d_name > o.dentry_d_parent, "{o:?}");
        assert!(
            o.mm_struct_exe_file > 0 && o.task_struct_mm > 0 && o.pt_regs_orig_ax > 0,
            "{o:?}"
        );
    }

    #[test]
    fn errors_name_the_missing_member() {
        let Some(btf) = host() else { return };
        let e = btf
            .offset_of("file", "no_such_member")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "btf struct file has no member no_such_member");
        assert!(matches!(
            btf.offset_of("no_such_struct_xyz", "a"),
            Err(BtfError::NoStruct { .. })
        ));
        assert!(matches!(
            Btf::parse(&[0, 0, 0, 0]),
            Err(BtfError::Malformed(_))
        ));
    }
}
