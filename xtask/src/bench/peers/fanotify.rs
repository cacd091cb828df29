//! File-open and exec peer: the `fanotify-peer` binary (a minimal fanotify
//! permission-event blocker, see `xtask/src/bin/fanotify-peer.rs`) fed the
//! same file and exec rules as the agent.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use super::super::workload::{FS, Files};

pub struct Peer {
    child: Child,
}

impl Peer {
    /// Writes the rules for `n` rules per kind and starts the peer; returns
    /// once its mark is in place.
    pub fn start(bin: &Path, rules_file: &Path, n: usize) -> Result<Self> {
        let f = Files::new();
        let mut rules = String::new();
        let _ = writeln!(rules, "allow-open {}\ndeny-open {}", f.allowed, f.denied);
        let _ = writeln!(rules, "allow-exec {}", f.tiny);
        for i in 0..n.saturating_sub(2) {
            let _ = writeln!(rules, "allow-open {}", Files::filler(i));
        }
        for i in 0..n.saturating_sub(1) {
            let _ = writeln!(rules, "allow-exec {}", Files::filler(i));
        }
        std::fs::write(rules_file, rules)?;
        let mut child = Command::new(bin)
            .arg(FS)
            .arg(rules_file)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("fanotify peer did not start: {line:?}");
        }
        Ok(Self { child })
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
