//! `portcullis replay --policy <candidate> <decisions.jsonl>...`: every
//! decision of a trail decided again under a candidate policy, and what
//! would change. The audit-to-enforce workflow: run the audit version for a
//! while, replay its trail against the enforce version, ship it when
//! nothing would change.
//!
//! Only logged decisions can be replayed: denies, audits, and allows of
//! rules with `log: true`. The kernel counts the other allows
//! (`portcullis_decisions_total`) without recording the request.

use std::{io::BufRead as _, path::PathBuf};

use portcullis_common::{VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY};
use serde::Serialize;

use crate::{
    compile::unnumbered,
    explain::{self, Request},
    policy::Policy,
    policy_test::verdict_name,
};

#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Allowed (or only audited) before, denied by the candidate.
    NewlyDenied,
    /// Denied (or audited) before, allowed by the candidate.
    NewlyAllowed,
    /// Denied before, only audited by the candidate.
    NowAudit,
    /// Same verdict, another policy or rule decides.
    RuleChanged,
}

#[derive(Debug, Serialize)]
pub struct Changed {
    pub file: PathBuf,
    pub line: usize,
    pub change: Change,
    pub request: Request,
    pub before: Verdict,
    pub after: Verdict,
}

#[derive(Debug, Serialize, Clone)]
pub struct Verdict {
    pub verdict: String,
    pub policy: String,
    pub rule: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub replayed: usize,
    /// Lines that are not decisions (checkpoints, devices).
    pub skipped: usize,
    pub changed: Vec<Changed>,
    /// Lines that could not be replayed, `file:line: why`.
    pub errors: Vec<String>,
}

fn classify(before: &str, after: u8) -> Option<Change> {
    let denied_before = before == "deny";
    let allowed_before = before == "allow";
    match after {
        VERDICT_DENY if !denied_before => Some(Change::NewlyDenied),
        VERDICT_ALLOW if !allowed_before => Some(Change::NewlyAllowed),
        VERDICT_AUDIT if denied_before => Some(Change::NowAudit),
        VERDICT_AUDIT if allowed_before => Some(Change::NewlyDenied),
        _ => None,
    }
}

/// One decision line: where it is, what was asked, what was decided.
struct Logged {
    file: PathBuf,
    line: usize,
    request: Request,
    before: Verdict,
}

/// Replays every decision line of `files` under `candidate`, compiled
/// once for every workload the lines name.
pub fn replay(candidate: &[Policy], files: &[PathBuf]) -> Result<Report, String> {
    let mut report = Report::default();
    let mut logged = Vec::new();
    for file in files {
        let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|e| format!("{}: {e}", file.display()))?;
            let at = || format!("{}:{}", file.display(), i + 1);
            match Request::from_log_line(&line) {
                Ok(Some(request)) => {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    let field = |f: &str| v[f].as_str().unwrap_or_default().to_owned();
                    logged.push(Logged {
                        file: file.clone(),
                        line: i + 1,
                        request,
                        before: Verdict {
                            verdict: field("verdict"),
                            policy: field("policy"),
                            rule: field("rule"),
                        },
                    });
                }
                Ok(None) => report.skipped += 1,
                Err(e) => report.errors.push(format!("{}: {e}", at())),
            }
        }
    }
    let requests: Vec<Request> = logged.iter().map(|l| l.request.clone()).collect();
    let (_, outcomes) = explain::decide_all(candidate, &requests)?;
    for (l, out) in logged.into_iter().zip(outcomes) {
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                report
                    .errors
                    .push(format!("{}:{}: {e}", l.file.display(), l.line));
                continue;
            }
        };
        report.replayed += 1;
        let after = Verdict {
            verdict: verdict_name(out.decision.verdict).into(),
            policy: out.policy,
            rule: out.rule,
        };
        // Rule numbers shift when a rule is inserted above: compare what
        // the rules say, as reload logs do.
        let same_rule = l.before.policy == after.policy
            && unnumbered(&l.before.rule) == unnumbered(&after.rule);
        let change = classify(&l.before.verdict, out.decision.verdict)
            .or((!same_rule && l.before.verdict != "allow").then_some(Change::RuleChanged));
        if let Some(change) = change {
            report.changed.push(Changed {
                file: l.file,
                line: l.line,
                change,
                request: l.request,
                before: l.before,
                after,
            });
        }
    }
    Ok(report)
}

impl Report {
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        for c in &self.changed {
            let r = &c.request;
            let _ = writeln!(
                s,
                "{}:{}: {:?}: {} {} in {}: {} by {}: {} -> {} by {}: {}",
                c.file.display(),
                c.line,
                c.change,
                r.action,
                r.target,
                r.cgroup,
                c.before.verdict,
                c.before.policy,
                c.before.rule,
                c.after.verdict,
                c.after.policy,
                c.after.rule
            );
        }
        for e in &self.errors {
            let _ = writeln!(s, "{e}: not replayed");
        }
        let count = |k: Change| self.changed.iter().filter(|c| c.change == k).count();
        let _ = writeln!(
            s,
            "{} decisions replayed: {} newly denied, {} newly allowed, {} now audit only, {} decided by another rule",
            self.replayed,
            count(Change::NewlyDenied),
            count(Change::NewlyAllowed),
            count(Change::NowAudit),
            count(Change::RuleChanged)
        );
        s
    }
}
