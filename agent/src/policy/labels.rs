//! Kubernetes label selectors (`metav1.LabelSelector`) for `selector.podLabels`.
//!
//! Semantics follow Kubernetes exactly, so a selector copied from a
//! Deployment or NetworkPolicy means the same thing here:
//!
//! - `matchLabels` and every `matchExpressions` requirement are ANDed.
//! - `In`: the label is present and its value is one of `values`.
//! - `NotIn`: the label is absent, or present with a value not in `values`.
//! - `Exists` / `DoesNotExist`: presence only; `values` must be empty.
//! - An empty selector (`podLabels: {}`) matches every pod.
//!
//! Keys and values are validated as the API server validates them
//! (`[prefix/]name`, name at most 63 characters, prefix a DNS subdomain), so
//! a selector that could never match a real label is refused at load time.

use std::collections::BTreeMap;

/// A validated label selector.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<LabelRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRequirement {
    pub key: String,
    pub operator: LabelOperator,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Whether a pod with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl LabelRequirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            LabelOperator::In => value.is_some_and(|v| self.values.contains(v)),
            LabelOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            LabelOperator::Exists => value.is_some(),
            LabelOperator::DoesNotExist => value.is_none(),
        }
    }
}

const MAX_NAME: usize = 63;
const MAX_PREFIX: usize = 253;

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters: the
/// shape of a label name and of a non-empty label value.
fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_NAME {
        return Err(format!(
            "{what} '{s}' is {} characters long, longer than the limit of {MAX_NAME}",
            s.len()
        ));
    }
    let edge = |c: char| c.is_ascii_alphanumeric();
    let inner = |c: char| edge(c) || matches!(c, '-' | '_' | '.');
    let ok = s.chars().next().is_some_and(edge)
        && s.chars().last().is_some_and(edge)
        && s.chars().all(inner);
    if !ok {
        return Err(format!(
            "{what} '{s}' is invalid: use letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A label key: `name` or `prefix/name`, the prefix a lowercase DNS subdomain.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("label key must not be empty".into());
    }
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            let dns_ok = !prefix.is_empty()
                && prefix.len() <= MAX_PREFIX
                && prefix.split('.').all(|part| {
                    !part.is_empty()
                        && part.len() <= MAX_NAME
                        && part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                        && part.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                        && part
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                });
            if !dns_ok {
                return Err(format!(
                    "label key '{key}': prefix '{prefix}' is not a lowercase DNS subdomain"
                ));
            }
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err(format!("label key '{key}' has an empty name after '/'"));
    }
    check_name("label key", name).map_err(|m| {
        if name == key {
            m
        } else {
            format!("label key '{key}': {m}")
        }
    })
}

/// A label value: empty, or shaped like a label name.
pub fn validate_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    check_name("label value", value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, operator: LabelOperator, values: &[&str]) -> LabelRequirement {
        LabelRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let sel = LabelSelector {
            match_labels: labels(&[("app", "triton")]),
            match_expressions: vec![req("tier", LabelOperator::In, &["gpu", "cpu"])],
        };
        assert!(sel.matches(&labels(&[("app", "triton"), ("tier", "gpu")])));
        assert!(
            !sel.matches(&labels(&[("app", "triton")])),
            "In needs the key"
        );
        assert!(!sel.matches(&labels(&[("app", "triton"), ("tier", "edge")])));
        assert!(!sel.matches(&labels(&[("app", "vllm"), ("tier", "gpu")])));
    }

    #[test]
    fn operators_follow_kubernetes() {
        let not_in = LabelSelector {
            match_expressions: vec![req("env", LabelOperator::NotIn, &["prod"])],
            ..Default::default()
        };
        assert!(not_in.matches(&labels(&[])), "NotIn matches an absent key");
        assert!(not_in.matches(&labels(&[("env", "dev")])));
        assert!(!not_in.matches(&labels(&[("env", "prod")])));

        let exists = LabelSelector {
            match_expressions: vec![req("gpu", LabelOperator::Exists, &[])],
            ..Default::default()
        };
        assert!(exists.matches(&labels(&[("gpu", "")])));
        assert!(!exists.matches(&labels(&[])));

        let absent = LabelSelector {
            match_expressions: vec![req("gpu", LabelOperator::DoesNotExist, &[])],
            ..Default::default()
        };
        assert!(absent.matches(&labels(&[("x", "y")])));
        assert!(!absent.matches(&labels(&[("gpu", "a100")])));

        assert!(
            LabelSelector::default().matches(&labels(&[])),
            "empty selects all"
        );
    }

    #[test]
    fn keys_and_values_are_validated_like_the_api_server() {
        for ok in [
            "app",
            "app.kubernetes.io/name",
            "a_b-c.d",
            "x/Y",
            "example.com/A1",
        ] {
            assert_eq!(validate_key(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-app",
            "app-",
            "/name",
            "Example.com/x",
            "a/b/c",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
        assert_eq!(validate_value(""), Ok(()));
        assert_eq!(validate_value("v1.2_3"), Ok(()));
        assert!(validate_value("a b").is_err());
        assert!(validate_value("-x").is_err());
    }
}
