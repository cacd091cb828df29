//! Loading and attaching one program (`ProgramSpec`) to its hook.

use std::{fs::File, os::fd::AsFd as _, path::Path};

use aya::{
    Btf, Ebpf,
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupDevice, CgroupSock, CgroupSockAddr, Lsm, TracePoint,
        links::FdLink,
    },
};

use super::{AttachedLink, Hook, LoadOptions, LoaderError, ProgramSpec, TRACEFS, error_chain};
use crate::verifier::Refusal;

/// [`attach`], with a refusal said in one line, and the programs named in
/// `opts.refuse_programs` refused without trying. A privilege error is
/// passed on as it is: it means the agent lacks a capability, which is a
/// deployment error to stop on, not a kernel limit to degrade around.
pub(super) fn try_attach(
    ebpf: &mut Ebpf,
    spec: &ProgramSpec,
    opts: &LoadOptions,
    kbtf: &Btf,
) -> Result<Result<Vec<AttachedLink>, String>, LoaderError> {
    if opts.refuse_programs.iter().any(|p| p == spec.program) {
        return Ok(Err("refused by --test-refuse-program".into()));
    }
    match attach(ebpf, spec, opts, kbtf) {
        Ok(link) => Ok(Ok(link)),
        // An LSM program's EPERM is the kernel refusing BPF-LSM, as where
        // `bpf` is listed in `lsm=` but the build refuses its programs.
        Err(e @ LoaderError::Load { .. })
            if e.is_privilege()
                && spec.fallback.is_none()
                && !matches!(spec.hook, Hook::Lsm(_)) =>
        {
            Err(e)
        }
        Err(e) => Ok(Err(error_chain(&e))),
    }
}

/// Loads (verifies) `spec`'s program without attaching it.
pub(crate) fn load_program(
    ebpf: &mut Ebpf,
    spec: &ProgramSpec,
    kbtf: &Btf,
) -> Result<(), LoaderError> {
    let program = spec.program;
    let hook = spec.hook.name();
    let prog = ebpf
        .program_mut(program)
        .ok_or(LoaderError::MissingProgram { program })?;
    let wrong_type = |source| LoaderError::ProgramType {
        program,
        hook,
        source,
    };
    let result = match spec.hook {
        Hook::SockAddr => <&mut CgroupSockAddr>::try_from(prog)
            .map_err(wrong_type)?
            .load(),
        Hook::Device => <&mut CgroupDevice>::try_from(prog)
            .map_err(wrong_type)?
            .load(),
        Hook::SockCreate => <&mut CgroupSock>::try_from(prog)
            .map_err(wrong_type)?
            .load(),
        Hook::Lsm(name) => <&mut Lsm>::try_from(prog)
            .map_err(wrong_type)?
            .load(name, kbtf),
        Hook::BtfTracepoint(name) => <&mut BtfTracePoint>::try_from(prog)
            .map_err(wrong_type)?
            .load(name, kbtf),
        Hook::Tracepoint { .. } => <&mut TracePoint>::try_from(prog)
            .map_err(wrong_type)?
            .load(),
    };
    result.map_err(|e| LoaderError::Load {
        program,
        hook,
        refusal: Refusal::new(program, &e),
    })
}

fn attach(
    ebpf: &mut Ebpf,
    spec: &ProgramSpec,
    opts: &LoadOptions,
    kbtf: &Btf,
) -> Result<Vec<AttachedLink>, LoaderError> {
    load_program(ebpf, spec, kbtf)?;
    let program = spec.program;
    let hook = spec.hook.name();
    let prog = ebpf
        .program_mut(program)
        .ok_or(LoaderError::MissingProgram { program })?;
    let wrong_type = |source| LoaderError::ProgramType {
        program,
        hook,
        source,
    };
    let attach_err = |source| LoaderError::Attach {
        program,
        hook,
        source,
    };
    match spec.hook {
        Hook::SockAddr | Hook::SockCreate => {
            let cgroup = open_cgroup_root(program, opts)?;
            // aya attaches with bpf_link_create (kernel >= 5.7), and cgroup
            // links always coexist with other programs (multi semantics);
            // that syscall rejects BPF_F_ALLOW_MULTI with EINVAL, so the
            // mode must be the default here.
            let mode = CgroupAttachMode::Single;
            let link = if let Hook::SockAddr = spec.hook {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(wrong_type)?;
                let id = p.attach(cgroup, mode).map_err(attach_err)?;
                FdLink::try_from(p.take_link(id).map_err(attach_err)?)
            } else {
                let p: &mut CgroupSock = prog.try_into().map_err(wrong_type)?;
                let id = p.attach(cgroup, mode).map_err(attach_err)?;
                FdLink::try_from(p.take_link(id).map_err(attach_err)?)
            };
            link.map(|l| vec![AttachedLink::Aya(l)])
                .map_err(|source| LoaderError::LinkNotPinnable { program, source })
        }
        Hook::Device => {
            let p: &mut CgroupDevice = prog.try_into().map_err(wrong_type)?;
            let cgroup = open_cgroup_root(program, opts)?;
            let prog_fd = p.fd().map_err(attach_err)?;
            // A link, so it coexists with the runtime's per-container device
            // programs and the kernel ANDs their verdicts.
            crate::bpf_sys::cgroup_link_create(
                prog_fd.as_fd(),
                cgroup.as_fd(),
                crate::bpf_sys::BPF_CGROUP_DEVICE,
            )
            .map(|l| vec![AttachedLink::Raw(l)])
            .map_err(|source| LoaderError::RawAttach {
                program,
                hook,
                source,
            })
        }
        Hook::Lsm(_) => {
            let p: &mut Lsm = prog.try_into().map_err(wrong_type)?;
            let id = p.attach().map_err(attach_err)?;
            Ok(vec![AttachedLink::Aya(
                p.take_link(id).map_err(attach_err)?.into(),
            )])
        }
        Hook::BtfTracepoint(_) => {
            let p: &mut BtfTracePoint = prog.try_into().map_err(wrong_type)?;
            let id = p.attach().map_err(attach_err)?;
            Ok(vec![AttachedLink::Aya(
                p.take_link(id).map_err(attach_err)?.into(),
            )])
        }
        Hook::Tracepoint {
            category, events, ..
        } => {
            if !Path::new(TRACEFS).join("events").exists() {
                crate::mounts::mount_pseudo_fs("tracefs", Path::new(TRACEFS));
            }
            let p: &mut TracePoint = prog.try_into().map_err(wrong_type)?;
            let mut links = Vec::with_capacity(events.len());
            for event in events {
                let id = p.attach(category, event).map_err(attach_err)?;
                let link = p.take_link(id).map_err(attach_err)?;
                let link = FdLink::try_from(link)
                    .map_err(|source| LoaderError::LinkNotPinnable { program, source })?;
                links.push(AttachedLink::Aya(link));
            }
            Ok(links)
        }
    }
}

fn open_cgroup_root(program: &'static str, opts: &LoadOptions) -> Result<File, LoaderError> {
    File::open(&opts.cgroup_root).map_err(|source| LoaderError::Cgroup {
        program,
        path: opts.cgroup_root.clone(),
        source,
    })
}
