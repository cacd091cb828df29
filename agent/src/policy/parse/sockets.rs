//! Validation of `spec.network.sockets` (see `policy::sockets`).

use super::{Cx, Location, SNode, line_of};
use crate::policy::{DefaultAction, SocketKind, SocketRule, SocketRules};

impl Cx<'_> {
    /// `sockets` as written, or, when absent, what an egress default
    /// implies (`egress_default`, `None` without an egress section).
    pub(super) fn sockets(
        &mut self,
        sockets: Option<(Location, &SNode)>,
        egress_default: Option<DefaultAction>,
    ) -> Option<Option<SocketRules>> {
        let Some((at, n)) = sockets else {
            return Some(
                (egress_default == Some(DefaultAction::Deny)).then(|| SocketRules {
                    default: DefaultAction::Deny,
                    allow: vec![],
                    deny: vec![],
                }),
            );
        };
        let mut f = self.map(
            n,
            "spec.network.sockets",
            Some(&["default", "allow", "deny"]),
        )?;
        f.at = at;
        let default = match f.get("default") {
            Some(_) => self.default_action(&f),
            None => Some(egress_default.unwrap_or_default()),
        };
        let allow = self.socket_list(f.get("allow"), &f.path("allow"));
        let deny = self.socket_list(f.get("deny"), &f.path("deny"));
        Some(Some(SocketRules {
            default: default?,
            allow: allow?,
            deny: deny?,
        }))
    }

    fn socket_list(&mut self, n: Option<&SNode>, path: &str) -> Option<Vec<SocketRule>> {
        let Some(n) = n else { return Some(Vec::new()) };
        let items = self.seq(n, path)?;
        let mut rules = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.choice(
                item,
                &format!("{path}[{i}]"),
                "socket kind",
                &SocketKind::ALL,
            ) {
                Some(kind) => rules.push(SocketRule {
                    kind,
                    line: line_of(item.referenced),
                }),
                None => ok = false,
            }
        }
        ok.then_some(rules)
    }
}
