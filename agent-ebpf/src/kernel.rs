//! Reading kernel structs through the offsets the agent took from BTF.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use portcullis_common::KernelOffsets;

/// Filled by the agent from the running kernel's BTF before load
/// (`EbpfLoader::override_global`); all zero (`valid == 0`) otherwise, in
/// which case every hook that needs it fails open.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    file_dentry: 0,
    file_f_mode: 0,
    file_f_inode: 0,
    dentry_d_parent: 0,
    dentry_d_inode: 0,
    dentry_d_name: 0,
    inode_i_ino: 0,
    inode_i_sb: 0,
    super_block_s_dev: 0,
    linux_binprm_file: 0,
    linux_binprm_filename: 0,
    task_struct_files: 0,
    task_struct_mm: 0,
    files_struct_fdt: 0,
    fdtable_max_fds: 0,
    fdtable_fd: 0,
    mm_struct_exe_file: 0,
    pt_regs_orig_ax: 0,
    valid: 0,
    _pad: 0,
};

/// The offsets, or `None` when the agent did not fill them.
#[inline(always)]
pub fn offsets() -> Option<KernelOffsets> {
    // SAFETY: a plain read of a global; volatile so LLVM does not fold the
    // compile-time zeros into the code (the loader rewrites .rodata).
    let o = unsafe { core::ptr::read_volatile(&OFFSETS) };
    if o.valid == 0 { None } else { Some(o) }
}

/// Reads a `T` at `base + off`.
#[inline(always)]
pub fn read<T>(base: *const u8, off: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address itself.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T) }
        .map_err(|e| e as i64)
}

/// Reads a pointer at `base + off`; a null pointer is an error.
#[inline(always)]
pub fn read_ptr(base: *const u8, off: u32) -> Result<*const u8, i64> {
    let p = read::<u64>(base, off)? as *const u8;
    if p.is_null() { Err(-1) } else { Ok(p) }
}

/// (dev, ino) of a dentry's inode.
#[inline(always)]
pub fn dentry_id(o: &KernelOffsets, dentry: *const u8) -> Result<(u32, u64), i64> {
    let inode = read_ptr(dentry, o.dentry_d_inode)?;
    let ino = read::<u64>(inode, o.inode_i_ino)?;
    let sb = read_ptr(inode, o.inode_i_sb)?;
    let dev = read::<u32>(sb, o.super_block_s_dev)?;
    Ok((dev, ino))
}

/// (dev, ino) of the current task's executable; (0, 0) for kernel threads.
#[inline(always)]
pub fn current_exe(o: &KernelOffsets) -> Result<(u32, u64), i64> {
    // SAFETY: helper without arguments.
    let task = unsafe { aya_ebpf::helpers::generated::bpf_get_current_task() } as *const u8;
    let mm = read::<u64>(task, o.task_struct_mm)? as *const u8;
    if mm.is_null() {
        return Ok((0, 0));
    }
    let exe = read::<u64>(mm, o.mm_struct_exe_file)? as *const u8;
    if exe.is_null() {
        return Ok((0, 0));
    }
    let dentry = read_ptr(exe, o.file_dentry)?;
    dentry_id(o, dentry)
}
