//! The outcome of a `portcullis test` run, as text for people and as JSON
//! or JUnit XML for CI systems.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use portcullis_common::{VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY};
use serde::Serialize;

use super::file::{Case, Expect};
use crate::evaluate::Outcome;

pub fn verdict_name(v: u8) -> &'static str {
    match v {
        VERDICT_ALLOW => "allow",
        VERDICT_DENY => "deny",
        VERDICT_AUDIT => "audit",
        _ => "unknown",
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Decided {
    pub verdict: &'static str,
    pub policy: String,
    pub rule: String,
    /// Every rule that matched, `policy: rule`.
    pub matched: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Expected {
    pub verdict: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub file: PathBuf,
    pub line: usize,
    pub name: String,
    pub passed: bool,
    pub expected: Expected,
    pub got: Decided,
}

/// A rule named in full (`files[0] /etc/shadow`) or by its place alone
/// (`files[0]`).
fn rule_matches(want: &str, got: &str) -> bool {
    got == want || got.split_once(' ').is_some_and(|(place, _)| place == want)
}

/// The verdict must be the expected one, and so must the deciding policy
/// and rule where given. An allow that no rule logs is decided by no rule
/// in the kernel (it is not logged), so for an allow the expected policy
/// and rule may also be those of an allow rule that matched.
fn meets(e: &Expect, got: &Outcome) -> bool {
    let by = |policy: &str, rule: &str| {
        e.policy.as_ref().is_none_or(|p| p == policy)
            && e.rule.as_ref().is_none_or(|r| rule_matches(r, rule))
    };
    e.verdict == got.decision.verdict
        && (by(&got.policy, &got.rule)
            || (got.decision.verdict == VERDICT_ALLOW && got.matched.iter().any(|(p, r)| by(p, r))))
}

impl CaseResult {
    pub fn new(file: &Path, case: &Case, got: Outcome) -> Self {
        Self {
            file: file.to_owned(),
            line: case.line,
            name: case.name.clone(),
            passed: meets(&case.expect, &got),
            expected: Expected {
                verdict: verdict_name(case.expect.verdict),
                policy: case.expect.policy.clone(),
                rule: case.expect.rule.clone(),
            },
            got: Decided {
                verdict: verdict_name(got.decision.verdict),
                matched: got
                    .matched
                    .iter()
                    .map(|(p, r)| format!("{p}: {r}"))
                    .collect(),
                policy: got.policy,
                rule: got.rule,
            },
        }
    }

    fn decided_by(&self) -> String {
        let mut by = if self.got.policy.is_empty() {
            format!("{} (no policy)", self.got.rule)
        } else {
            format!("{}: {}", self.got.policy, self.got.rule)
        };
        if !self.got.matched.is_empty() {
            let _ = write!(by, "; rules matched: {}", self.got.matched.join(", "));
        }
        by
    }

    /// What went wrong, in one line.
    pub fn failure(&self) -> String {
        let e = &self.expected;
        let mut want = e.verdict.to_owned();
        if let Some(p) = &e.policy {
            let _ = write!(want, " by policy {p}");
        }
        if let Some(r) = &e.rule {
            let _ = write!(want, " by rule {r}");
        }
        format!(
            "expected {want}, got {} by {}",
            self.got.verdict,
            self.decided_by()
        )
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub cases: Vec<CaseResult>,
    /// `(policy, rule)` of every rule the tested policies compiled to.
    #[serde(skip)]
    pub rules: BTreeSet<(String, String)>,
    /// Those that matched at least one case.
    #[serde(skip)]
    pub decided: BTreeSet<(String, String)>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.cases.iter().filter(|c| !c.passed).count()
    }

    /// One line per failure (`file:line: name: ...`) and a summary.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.cases {
            if !c.passed {
                let _ = writeln!(
                    out,
                    "{}:{}: FAIL {}: {}",
                    c.file.display(),
                    c.line,
                    c.name,
                    c.failure()
                );
            }
        }
        let _ = writeln!(
            out,
            "{} cases, {} passed, {} failed",
            self.cases.len(),
            self.cases.len() - self.failed(),
            self.failed()
        );
        out
    }

    pub fn json(&self, uncovered: &[String]) -> String {
        serde_json::json!({
            "cases": self.cases,
            "passed": self.cases.len() - self.failed(),
            "failed": self.failed(),
            "uncovered": uncovered,
        })
        .to_string()
    }

    /// JUnit XML, one `testsuite` per test file, as Jenkins, GitLab and
    /// GitHub test reporters read it.
    pub fn junit(&self) -> String {
        let mut files: Vec<&Path> = self.cases.iter().map(|c| c.file.as_path()).collect();
        files.dedup();
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            out,
            "<testsuites name=\"portcullis test\" tests=\"{}\" failures=\"{}\">",
            self.cases.len(),
            self.failed()
        );
        for f in files {
            let cases: Vec<&CaseResult> = self.cases.iter().filter(|c| c.file == f).collect();
            let file = xml(&f.display().to_string());
            let _ = writeln!(
                out,
                "  <testsuite name=\"{file}\" tests=\"{}\" failures=\"{}\">",
                cases.len(),
                cases.iter().filter(|c| !c.passed).count()
            );
            for c in cases {
                let _ = write!(
                    out,
                    "    <testcase name=\"{}\" classname=\"{file}\" file=\"{file}\" line=\"{}\"",
                    xml(&c.name),
                    c.line
                );
                if c.passed {
                    out.push_str("/>\n");
                } else {
                    let _ = writeln!(
                        out,
                        ">\n      <failure message=\"{}\">{}:{}: {}</failure>\n    </testcase>",
                        xml(&c.failure()),
                        file,
                        c.line,
                        xml(&c.failure())
                    );
                }
            }
            out.push_str("  </testsuite>\n");
        }
        out.push_str("</testsuites>\n");
        out
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
