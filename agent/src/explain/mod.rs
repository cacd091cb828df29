//! `portcullis explain` and `portcullis replay`: one request, or the lines of
//! a decision log, decided again on this machine against given policies by
//! the host evaluator, with every step of the decision shown.
//!
//! Requests come from the decision log's own fields (README "Decision
//! log"), so a line piped in from the trail is explained as the kernel saw
//! it. Paths are resolved on this machine's filesystem (run it on the node,
//! or where the same paths exist). The log does not record pod labels or
//! the service account: a policy selecting by them selects no replayed
//! line, and says so.

mod request;

use std::{os::unix::fs::MetadataExt as _, path::Path, sync::Arc};

pub use request::Request;
use serde::Serialize;

use crate::{
    compile::{self, Compiled, Numbering, kernel_dev, select_cgroup},
    evaluate::{self, Outcome},
    node_devices::NodeDevices,
    policy::Policy,
    policy_test::verdict_name,
};

/// Compiles `policies` once for the cgroups of all `reqs` (resolving paths
/// and device kinds on this machine) and decides each.
pub fn decide_all(
    policies: &[Policy],
    reqs: &[Request],
) -> Result<(Compiled, Vec<Result<Outcome, String>>), String> {
    // One cgroup per distinct (path, pod), numbered from 1.
    let mut ids: std::collections::HashMap<(String, Option<String>), u64> = Default::default();
    let mut cgroups = Vec::new();
    let mut id_of = Vec::with_capacity(reqs.len());
    for r in reqs {
        let key = (r.cgroup.clone(), r.pod.as_ref().map(|p| format!("{p:?}")));
        let next = ids.len() as u64 + 1;
        let id = *ids.entry(key).or_insert_with(|| {
            let mut cg = r.cgroup_info();
            cg.id = next;
            cgroups.push(cg);
            next
        });
        id_of.push(id);
    }
    let node = Arc::new(NodeDevices::discover(Path::new("/proc")));
    let c = compile::compile_on(policies, &cgroups, Numbering::OFFLINE, node)
        .map_err(|e| e.to_string())?;
    let outs = reqs
        .iter()
        .zip(id_of)
        .map(|(r, id)| {
            let exe = std::fs::metadata(&r.exe)
                .map(|m| (kernel_dev(m.dev()), m.ino()))
                .unwrap_or((0, 0));
            Ok(evaluate::evaluate(&c, id, r.uid, exe, &r.action()?))
        })
        .collect();
    Ok((c, outs))
}

/// Where `rule` (`files[1] /etc/x`, `exec.allow[0] /usr/**`,
/// `network.egress.deny[2] …`, `devices.allow[0] …`,
/// `network.sockets.allow[0] raw`) is written in
/// `policy`: `file:line`.
pub fn rule_place(policy: &Policy, rule: &str) -> Option<String> {
    let place = rule.split(' ').next()?;
    let (list, index) = place.strip_suffix(']')?.split_once('[')?;
    let i: usize = index.parse().ok()?;
    let line = match list {
        "files" => policy.files.get(i)?.path.line,
        "exec.allow" => policy.exec.as_ref()?.allow.get(i)?.line,
        "exec.deny" => policy.exec.as_ref()?.deny.get(i)?.line,
        "network.egress.allow" => policy.egress.as_ref()?.allow.get(i)?.line,
        "network.egress.deny" => policy.egress.as_ref()?.deny.get(i)?.line,
        "devices.allow" => policy.devices.as_ref()?.allow.get(i)?.line,
        "devices.deny" => policy.devices.as_ref()?.deny.get(i)?.line,
        "network.sockets.allow" => policy.sockets.as_ref()?.allow.get(i)?.line,
        "network.sockets.deny" => policy.sockets.as_ref()?.deny.get(i)?.line,
        _ => return None,
    };
    Some(format!("{}:{line}", policy.source.display()))
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub request: Request,
    /// `IDENTITY_UNRESTRICTED` (0) when no policy selects the cgroup.
    pub identity: u32,
    /// `name (file)` of each policy selecting the workload.
    pub policies: Vec<String>,
    /// Policies that apply to the cgroup but not to this uid.
    pub not_for_uid: Vec<String>,
    /// Policies that cannot select a logged line: they need pod labels or
    /// a service account, which the log does not record.
    pub unjudged: Vec<String>,
    pub matched: Vec<MatchedRule>,
    pub verdict: &'static str,
    pub policy: String,
    pub rule: String,
    /// The precedence step that decided, in words.
    pub why: String,
}

#[derive(Debug, Serialize)]
pub struct MatchedRule {
    pub policy: String,
    pub rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

/// Decides `req` and says how.
pub fn explain(policies: &[Policy], req: Request) -> Result<Explanation, String> {
    let (c, mut outs) = decide_all(policies, std::slice::from_ref(&req))?;
    let out = outs.pop().expect("one request")?;
    let by_name = |name: &str| policies.iter().find(|p| p.name == name);
    let selected = select_cgroup(policies, &req.cgroup_info());
    let cfg = c
        .identity_cfg
        .get(&out.identity)
        .copied()
        .unwrap_or_default();
    let active = evaluate::active_policies(&cfg, req.uid);
    let (mut applying, mut not_for_uid) = (Vec::new(), Vec::new());
    for (bit, &i) in selected.iter().enumerate() {
        let p = &policies[i];
        let text = format!("{} ({})", p.name, p.source.display());
        if active & (1 << bit) != 0 {
            applying.push(text);
        } else {
            not_for_uid.push(text);
        }
    }
    let unjudged = policies
        .iter()
        .filter(|p| p.selector.pod_labels.is_some() || p.selector.service_account.is_some())
        .map(|p| p.name.clone())
        .collect();
    let matched = out
        .matched
        .iter()
        .map(|(p, r)| MatchedRule {
            policy: p.clone(),
            rule: r.clone(),
            at: by_name(p).and_then(|pol| rule_place(pol, r)),
        })
        .collect();
    let why = why(&out);
    Ok(Explanation {
        request: req,
        identity: out.identity,
        policies: applying,
        not_for_uid,
        unjudged,
        matched,
        verdict: verdict_name(out.decision.verdict),
        policy: out.policy,
        rule: out.rule,
        why,
    })
}

fn why(out: &Outcome) -> String {
    use portcullis_common::{RULE_ID_DEFAULT, VERDICT_ALLOW, VERDICT_AUDIT};
    let d = &out.decision;
    if out.identity == portcullis_common::IDENTITY_UNRESTRICTED {
        return "no policy selects this workload: allowed".into();
    }
    match (d.verdict, d.hit.rule_id == RULE_ID_DEFAULT) {
        (VERDICT_ALLOW, _) if out.matched.is_empty() => {
            "no rule matched and no policy of this action defaults to deny: allowed".into()
        }
        (VERDICT_ALLOW, _) => {
            "only allow rules matched, and each default-deny policy had one of its own: allowed"
                .into()
        }
        (VERDICT_AUDIT, true) => format!(
            "audit policy {} defaults to deny and none of its own rules allowed: logged, allowed",
            out.policy
        ),
        (VERDICT_AUDIT, false) => {
            "an audit-mode rule denies and no enforce rule does: logged, allowed".into()
        }
        (_, true) if out.policy.is_empty() => format!("{}: denied", out.rule),
        (_, true) => format!(
            "policy {} defaults to deny and none of its own rules allowed: denied",
            out.policy
        ),
        _ => "an enforce rule denies; deny beats allow: denied".into(),
    }
}

impl Explanation {
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let r = &self.request;
        let mut s = format!(
            "request: {} {}{} by uid {} ({}) in cgroup {}\n",
            r.action,
            r.target,
            r.access
                .as_ref()
                .map(|a| format!(" ({a})"))
                .unwrap_or_default(),
            r.uid,
            if r.exe.is_empty() {
                "exe unknown"
            } else {
                &r.exe
            },
            r.cgroup
        );
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        let _ = writeln!(s, "identity: {}", self.identity);
        let _ = writeln!(s, "policies selecting it: {}", list(&self.policies));
        if !self.not_for_uid.is_empty() {
            let _ = writeln!(s, "not for uid {}: {}", r.uid, list(&self.not_for_uid));
        }
        if !self.unjudged.is_empty() {
            let _ = writeln!(
                s,
                "cannot select a logged line (pod labels or service account are not logged): {}",
                list(&self.unjudged)
            );
        }
        let _ = writeln!(s, "rules that matched, in the kernel's order:");
        if self.matched.is_empty() {
            s.push_str("  none\n");
        }
        for m in &self.matched {
            let at =
                m.at.as_ref()
                    .map(|a| format!("  ({a})"))
                    .unwrap_or_default();
            let _ = writeln!(s, "  {}: {}{at}", m.policy, m.rule);
        }
        let _ = writeln!(s, "why: {}", self.why);
        let by = if self.policy.is_empty() {
            self.rule.clone()
        } else {
            format!("{}: {}", self.policy, self.rule)
        };
        let _ = writeln!(s, "verdict: {} by {by}", self.verdict);
        s
    }
}
