//! A pod's service account, from the token the kubelet projects for it.
//!
//! CRI does not carry the service account, and asking the API server would
//! make every node agent depend on it. The kubelet writes each pod's bound
//! service account token under its root directory
//! (`<kubelet-root>/pods/<uid>/volumes/kubernetes.io~projected/<volume>/token`);
//! the token's (unverified) JWT claims name the account. The file is
//! written by the kubelet on the host and mounted read-only into the pod, so
//! the workload cannot forge it. The signature is not checked: the agent
//! trusts the kubelet's files as it trusts the runtime's socket.

use std::path::Path;

use base64::Engine as _;

/// What the token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    pub namespace: String,
    pub name: String,
}

/// The service account of pod `uid`, if the kubelet projected a token for it
/// (pods with `automountServiceAccountToken: false` have none).
pub fn read(kubelet_root: &Path, uid: &str) -> Option<TokenIdentity> {
    let projected = kubelet_root
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~projected");
    let mut volumes: Vec<_> = std::fs::read_dir(projected)
        .ok()?
        .filter_map(|e| e.ok())
        .collect();
    volumes.sort_by_key(|e| e.file_name());
    volumes
        .iter()
        .find_map(|v| std::fs::read_to_string(v.path().join("token")).ok())
        .and_then(|t| parse_token(t.trim()))
}

/// The claims of a Kubernetes service account JWT: the bound-token form
/// (`kubernetes.io.serviceaccount.name`) or the `sub` every form carries
/// (`system:serviceaccount:<namespace>:<name>`).
pub fn parse_token(token: &str) -> Option<TokenIdentity> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    if let Some(k) = claims.get("kubernetes.io")
        && let (Some(ns), Some(name)) = (
            k.get("namespace").and_then(|v| v.as_str()),
            k.pointer("/serviceaccount/name").and_then(|v| v.as_str()),
        )
    {
        return Some(TokenIdentity {
            namespace: ns.into(),
            name: name.into(),
        });
    }
    let sub = claims.get("sub")?.as_str()?;
    let rest = sub.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    Some(TokenIdentity {
        namespace: ns.into(),
        name: name.into(),
    })
}

/// Builds an unsigned token with these claims (tests, and the end-to-end
/// tests' stand-in for the kubelet).
pub fn fake_token(namespace: &str, name: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let claims = serde_json::json!({
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": "0"}},
    });
    format!(
        "{}.{}.sig",
        b64(r#"{"alg":"RS256"}"#),
        b64(&claims.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_and_legacy_claims() {
        let t = fake_token("ml", "triton");
        assert_eq!(
            parse_token(&t),
            Some(TokenIdentity {
                namespace: "ml".into(),
                name: "triton".into()
            })
        );
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let legacy = format!(
            "h.{}.s",
            b64(r#"{"sub":"system:serviceaccount:default:builder"}"#)
        );
        assert_eq!(
            parse_token(&legacy),
            Some(TokenIdentity {
                namespace: "default".into(),
                name: "builder".into()
            })
        );
        assert_eq!(parse_token("garbage"), None);
        assert_eq!(
            parse_token(&format!("h.{}.s", b64(r#"{"sub":"alice"}"#))),
            None
        );
    }

    #[test]
    fn reads_the_projected_volume() {
        let root = std::env::temp_dir().join(format!("portcullis-sa-{}", std::process::id()));
        let uid = "0f2c3b1e-7a4d-4c8e-9b1a-2d3e4f5a6b7c";
        let dir = root.join(format!(
            "pods/{uid}/volumes/kubernetes.io~projected/kube-api-access-x"
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), fake_token("ml", "triton")).unwrap();
        assert_eq!(read(&root, uid).map(|t| t.name), Some("triton".into()));
        assert_eq!(read(&root, "other"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
