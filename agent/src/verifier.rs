//! What the kernel's verifier said about our programs: a one-line diagnosis
//! when it refuses one (the full log goes to a file, never to stderr), and
//! what each accepted program cost it, which `tests/verifier_budget.rs`
//! holds under [`BUDGET_INSNS`].

use std::{
    fmt,
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    programs::{LsmAttachType, ProgramError, ProgramType},
    sys::is_program_supported,
};
use nix::errno::Errno;

use crate::loader::{self, Hook, LoadOptions, LoaderError, PROGRAMS, ProgramSpec};

/// Most instructions the verifier may process for any one program: a tenth
/// of its 1M limit. Builds of one kernel version differ by enough to push a
/// program near the limit over it (6.18.44 refused what 6.18 had accepted),
/// so a program must stay far inside.
pub const BUDGET_INSNS: u32 = 100_000;

/// Why `BPF_PROG_LOAD` (or the steps before it) failed, said in one line.
#[derive(Debug)]
pub struct Refusal {
    /// The syscall's errno, when it got that far.
    pub errno: Option<Errno>,
    /// errno name and its meaning (`E2BIG: argument list too long`), or
    /// the error itself when it did not come from the syscall.
    pub reason: String,
    /// The verifier's closing statistics (`processed N insns ...`).
    pub summary: Option<String>,
    /// Where the full verifier log was written.
    pub log: Option<PathBuf>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)?;
        if let Some(s) = &self.summary {
            write!(f, "; verifier: {s}")?;
        }
        if let Some(p) = &self.log {
            write!(f, "; full verifier log in {}", p.display())?;
        }
        Ok(())
    }
}

impl Refusal {
    /// Summarises `err` from loading `program`, writing the verifier log (if
    /// any) under the system's temporary directory.
    pub fn new(program: &str, err: &ProgramError) -> Self {
        let ProgramError::LoadError {
            io_error,
            verifier_log,
        } = err
        else {
            return Self {
                errno: None,
                reason: crate::loader::error_chain(err),
                summary: None,
                log: None,
            };
        };
        let errno = io_error.raw_os_error().map(Errno::from_raw);
        let reason = match errno {
            Some(e) => format!("{e:?}: {}", e.desc()),
            None => io_error.to_string(),
        };
        let text = verifier_log.to_string();
        let summary = closing_line(&text);
        let log = (!text.trim().is_empty())
            .then(|| std::env::temp_dir().join(format!("portcullis-verifier-{program}.log")))
            .filter(|p| std::fs::write(p, &text).is_ok());
        tracing::debug!(program, log = %text, "verifier log");
        Self {
            errno,
            reason,
            summary,
            log,
        }
    }
}

/// The verifier's statistics line, or its last non-empty line.
fn closing_line(log: &str) -> Option<String> {
    let lines = || log.lines().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .rfind(|l| l.starts_with("processed "))
        .or_else(|| lines().next_back())
        .map(str::to_owned)
}

/// What one program cost the verifier, or why it was not loaded.
#[derive(Debug)]
pub struct Cost {
    pub program: &'static str,
    pub hook: &'static str,
    pub outcome: Result<Measured, String>,
}

/// `verified_insns` from `bpf_prog_info` (kernel 5.16+) and the wall time
/// of the load, which is almost all verification.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub insns: Option<u32>,
    pub time: Duration,
}

/// Loads every program the agent may use, primaries and fallbacks alike,
/// without attaching any. LSM programs are tried only where `bpf` is an
/// active LSM and aya's probe can load a trivial LSM program
/// (`Err("skipped: ...")` otherwise: some kernels list `bpf` and still
/// refuse every LSM program with EPERM); a refusal is the program's `Err`.
pub fn costs(opts: &LoadOptions) -> Result<Vec<Cost>, LoaderError> {
    let (mut ebpf, kbtf) = loader::open_object(opts, None)?;
    let lsm = loader::bpf_lsm_enabled()
        && is_program_supported(ProgramType::Lsm(LsmAttachType::Mac)).unwrap_or(false);
    Ok(PROGRAMS
        .iter()
        .map(|spec| Cost {
            program: spec.program,
            hook: spec.hook.name(),
            outcome: match spec.hook {
                Hook::Lsm(_) if !lsm => Err("skipped: this kernel refuses BPF-LSM".into()),
                _ => measure(&mut ebpf, spec, &kbtf),
            },
        })
        .collect())
}

fn measure(ebpf: &mut Ebpf, spec: &ProgramSpec, kbtf: &aya::Btf) -> Result<Measured, String> {
    let start = Instant::now();
    loader::load_program(ebpf, spec, kbtf).map_err(|e| loader::error_chain(&e))?;
    let time = start.elapsed();
    let prog = ebpf
        .program(spec.program)
        .ok_or_else(|| format!("program {} vanished", spec.program))?;
    // `Program::info` works for every program type.
    let info = prog.info().map_err(|e| e.to_string())?;
    Ok(Measured {
        insns: info.verified_instruction_count(),
        time,
    })
}

/// The costs as a table, one program a line.
pub fn table(costs: &[Cost]) -> String {
    let mut out = format!(
        "{:<14} {:<22} {:>14} {:>10}  budget {BUDGET_INSNS}\n",
        "program", "hook", "verified_insns", "time_ms"
    );
    for c in costs {
        let row = match &c.outcome {
            Ok(m) => format!(
                "{:>14} {:>10.1}",
                m.insns.map_or("n/a".into(), |n| n.to_string()),
                m.time.as_secs_f64() * 1e3
            ),
            Err(e) => format!("  {e}"),
        };
        out.push_str(&format!("{:<14} {:<22} {row}\n", c.program, c.hook));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statistics_line_is_the_summary() {
        let log = "0: (b7) r0 = 0\nBPF program is too large. Processed 1000001 insn\n\
                   processed 1000001 insns (limit 1000000) max_states_per_insn 39\n\n";
        assert_eq!(
            closing_line(log).as_deref(),
            Some("processed 1000001 insns (limit 1000000) max_states_per_insn 39")
        );
        assert_eq!(closing_line("a\nlast\n").as_deref(), Some("last"));
        assert_eq!(closing_line(""), None);
    }
}
