//! Path globs for policies: matching, and the validators `parse` applies to
//! every pattern before it reaches the rest of the agent.
//!
//! Patterns work over `/`-separated paths, one segment at a time:
//!
//! - `*` matches any run of characters within one segment (including none,
//!   and including a leading `.`: unlike a shell, dotfiles are not special,
//!   so `deny: ["/etc/ml/*"]` also covers `/etc/ml/.hidden`);
//! - `?` matches exactly one character within a segment;
//! - `[abc]`, `[a-z]`, `[!a-z]` (or `[^a-z]`) match one character of a class;
//! - `**` as a whole segment matches zero or more whole segments, so `/a/**`
//!   matches `/a`, `/a/b` and `/a/b/c`.
//!
//! No regex engine: patterns are short and the matcher backtracks only over
//! `*` and `**`, so it is small enough to read and to mirror in the kernel.

/// Whether `path` matches `pattern` (see the module docs for the syntax).
///
/// A `**` that is not a whole segment behaves like `*`; the validators
/// reject that spelling, so policies never contain it.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let pat: Vec<&str> = pattern.split('/').collect();
    let segs: Vec<&str> = path.split('/').collect();
    match_segments(&pat, &segs)
}

fn match_segments(pat: &[&str], segs: &[&str]) -> bool {
    match pat.split_first() {
        None => segs.is_empty(),
        Some((&"**", rest)) => {
            // Collapse runs of `**` so `/a/**/**/b` costs no more than `/a/**/b`.
            let rest_start = rest.iter().take_while(|p| **p == "**").count();
            let rest = &rest[rest_start..];
            (0..=segs.len()).any(|skip| match_segments(rest, &segs[skip..]))
        }
        Some((p, rest)) => match segs.split_first() {
            Some((s, srest)) => match_segment(p, s) && match_segments(rest, srest),
            None => false,
        },
    }
}

/// One segment: `*`, `?` and classes, with the classic single-star
/// backtracking (remember the last `*` and retry from one character later).
fn match_segment(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    while pi < p.len() && p[pi] == '*' {
                        pi += 1;
                    }
                    star = Some((pi, ti));
                    continue;
                }
                '?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = match_class(&p, pi, t[ti]) {
                        if matched {
                            pi = next;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == '[' {
                        // An unclosed `[` is a literal (validators reject it anyway).
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Match `c` against the class starting at `p[start] == '['`. Returns
/// whether it matched and the index just past `]`, or `None` when the class
/// is not closed.
fn match_class(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let lo = *p.get(i)?;
        // `]` right after `[` (or `[!`) is a member, as in shells.
        if lo == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&hi| hi != ']') {
            let hi = p[i + 2];
            matched |= lo <= c && c <= hi;
            i += 3;
        } else {
            matched |= lo == c;
            i += 1;
        }
    }
}

/// Longest pattern accepted (the kernel's `PATH_MAX`).
pub const MAX_PATTERN_LEN: usize = 4096;

/// Validate an executable or file path glob: absolute, no empty, `.` or `..`
/// segments, no trailing `/`, and `**` only as the whole last segment
/// ("this directory and everything below").
///
/// The error is a message for the user, without the pattern's location.
pub fn validate_path_glob(p: &str) -> Result<(), String> {
    if p == "/" {
        return Err("path '/' names only the root directory (write '/**' for everything)".into());
    }
    validate_common(p)?;
    let segs: Vec<&str> = p.split('/').skip(1).collect();
    let last = segs.len() - 1;
    for (i, seg) in segs.iter().enumerate() {
        if *seg == "**" && i != last {
            return Err(format!(
                "path '{p}': '**' is only allowed as the last segment (meaning everything below)"
            ));
        }
    }
    Ok(())
}

/// Validate a cgroup path glob: like [`validate_path_glob`], except that `**`
/// may appear as any whole segment (`/kubepods.slice/**/cri-containerd-*.scope`)
/// and the root cgroup `/` is allowed on its own.
pub fn validate_cgroup_glob(p: &str) -> Result<(), String> {
    if p == "/" {
        return Ok(());
    }
    validate_common(p)
}

/// Validate a systemd unit name glob (`triton*.service`): a single segment,
/// so no `/` and no `**`.
pub fn validate_unit_glob(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("unit pattern must not be empty".into());
    }
    if p.contains('/') {
        return Err(format!(
            "unit pattern '{p}' must not contain '/' (it matches a unit name such as 'nginx.service')"
        ));
    }
    if p.contains("**") {
        return Err(format!(
            "unit pattern '{p}': '**' has no meaning in a unit name, use '*'"
        ));
    }
    check_chars(p, p)?;
    check_classes(p, p)
}

fn validate_common(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("path must not be empty".into());
    }
    if p.len() > MAX_PATTERN_LEN {
        return Err(format!(
            "path is {} bytes long, longer than the limit of {MAX_PATTERN_LEN}",
            p.len()
        ));
    }
    if !p.starts_with('/') {
        return Err(format!(
            "path '{p}' is not absolute (it must start with '/')"
        ));
    }
    check_chars(p, p)?;
    if p.len() > 1 && p.ends_with('/') {
        let trimmed = p.trim_end_matches('/');
        return Err(format!(
            "path '{p}' ends with '/' (write '{trimmed}/**' for everything below it, or '{trimmed}' for the path itself)"
        ));
    }
    for seg in p.split('/').skip(1) {
        match seg {
            "" => return Err(format!("path '{p}' has an empty segment ('//')")),
            "." | ".." => {
                return Err(format!(
                    "path '{p}' contains a '{seg}' segment (write the path without it)"
                ));
            }
            "**" => {}
            s if s.contains("**") => {
                return Err(format!(
                    "path '{p}': '**' must be a whole segment ('{s}' mixes it with other characters; use '*' within a segment)"
                ));
            }
            s => check_classes(p, s)?,
        }
    }
    Ok(())
}

fn check_chars(whole: &str, s: &str) -> Result<(), String> {
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!(
            "path '{}' contains the control character {:?}",
            whole.escape_debug(),
            c
        ));
    }
    Ok(())
}

/// Every `[` opens a class that closes within the same segment and is not empty.
fn check_classes(whole: &str, seg: &str) -> Result<(), String> {
    let p: Vec<char> = seg.chars().collect();
    let mut i = 0;
    while i < p.len() {
        if p[i] == '[' {
            match match_class(&p, i, '\0') {
                Some((_, next)) => {
                    for w in p[i + 1..next - 1].windows(3) {
                        if w[1] == '-' && w[0] > w[2] {
                            return Err(format!(
                                "pattern '{whole}': character range '{}-{}' is reversed",
                                w[0], w[2]
                            ));
                        }
                    }
                    i = next;
                }
                None => {
                    return Err(format!(
                        "pattern '{whole}': unclosed '[' in a character class"
                    ));
                }
            }
        } else {
            i += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_star_within_one_segment() {
        assert!(glob_match("/usr/bin/python3", "/usr/bin/python3"));
        assert!(!glob_match("/usr/bin/python3", "/usr/bin/python"));
        assert!(glob_match("/usr/bin/python3*", "/usr/bin/python3"));
        assert!(glob_match("/usr/bin/python3*", "/usr/bin/python3.11"));
        assert!(!glob_match("/usr/bin/python3*", "/usr/bin/python3/x"));
        assert!(glob_match("/usr/*/python3", "/usr/bin/python3"));
        assert!(!glob_match("/usr/*/python3", "/usr/local/bin/python3"));
        assert!(glob_match("/a/*.service", "/a/triton.service"));
        assert!(glob_match("/a/*x*y*", "/a/xxyy"));
        assert!(!glob_match("/a/*x*y", "/a/xxyyz"));
        assert!(glob_match("/a/*", "/a/.hidden"), "dotfiles are not special");
    }

    #[test]
    fn question_mark_is_one_char() {
        assert!(glob_match("/a/b?c", "/a/bxc"));
        assert!(!glob_match("/a/b?c", "/a/bc"));
        assert!(!glob_match("/a/b?c", "/a/b/c"));
        assert!(glob_match("/a/é?", "/a/éé"), "characters, not bytes");
    }

    #[test]
    fn classes_ranges_and_negation() {
        assert!(glob_match("/dev/sd[ab]", "/dev/sda"));
        assert!(!glob_match("/dev/sd[ab]", "/dev/sdc"));
        assert!(glob_match("/dev/tty[0-9]", "/dev/tty7"));
        assert!(!glob_match("/dev/tty[0-9]", "/dev/ttyS"));
        assert!(glob_match("/dev/tty[!0-9]", "/dev/ttyS"));
        assert!(glob_match("/dev/tty[^0-9]", "/dev/ttyS"));
        assert!(!glob_match("/dev/tty[!0-9]", "/dev/tty1"));
        assert!(glob_match("/x/[]a]", "/x/]"));
        assert!(glob_match("/x/[a-]", "/x/-"));
    }

    #[test]
    fn double_star_matches_zero_or_more_segments() {
        for path in ["/a", "/a/b", "/a/b/c", "/a/.b/c"] {
            assert!(glob_match("/a/**", path), "{path}");
        }
        assert!(!glob_match("/a/**", "/ab"));
        assert!(!glob_match("/a/**", "/b/a"));
        assert!(glob_match("/**", "/"));
        assert!(glob_match("/**", "/anything/at/all"));
        assert!(glob_match("/k/**/c-*.scope", "/k/c-1.scope"));
        assert!(glob_match("/k/**/c-*.scope", "/k/x/y/c-1.scope"));
        assert!(!glob_match("/k/**/c-*.scope", "/k/x/y/d-1.scope"));
        assert!(glob_match("/k/**/**/z", "/k/z"));
    }

    #[test]
    fn pathological_patterns_terminate() {
        let path = format!("/{}", "a/".repeat(30) + "b");
        assert!(!glob_match("/**/**/**/**/**/c", &path));
        assert!(!glob_match(
            "/a*a*a*a*a*a*a*c",
            &format!("/{}", "a".repeat(60))
        ));
    }

    #[test]
    fn path_glob_validation() {
        for ok in [
            "/usr/bin/python3*",
            "/opt/triton/**",
            "/**",
            "/dev/sd[a-z]",
            "/a/b?",
        ] {
            assert_eq!(validate_path_glob(ok), Ok(()), "{ok}");
        }
        let cases = [
            ("", "path must not be empty"),
            (
                "/",
                "path '/' names only the root directory (write '/**' for everything)",
            ),
            (
                "usr/bin/x",
                "path 'usr/bin/x' is not absolute (it must start with '/')",
            ),
            (
                "/a/../b",
                "path '/a/../b' contains a '..' segment (write the path without it)",
            ),
            (
                "/a/./b",
                "path '/a/./b' contains a '.' segment (write the path without it)",
            ),
            ("/a//b", "path '/a//b' has an empty segment ('//')"),
            (
                "/etc/ml/",
                "path '/etc/ml/' ends with '/' (write '/etc/ml/**' for everything below it, or '/etc/ml' for the path itself)",
            ),
            (
                "/a/**/b",
                "path '/a/**/b': '**' is only allowed as the last segment (meaning everything below)",
            ),
            (
                "/a/b**",
                "path '/a/b**': '**' must be a whole segment ('b**' mixes it with other characters; use '*' within a segment)",
            ),
            (
                "/a/[bc",
                "pattern '/a/[bc': unclosed '[' in a character class",
            ),
            (
                "/a/[z-a]",
                "pattern '/a/[z-a]': character range 'z-a' is reversed",
            ),
            (
                "/a/b\nc",
                "path '/a/b\\nc' contains the control character '\\n'",
            ),
        ];
        for (p, msg) in cases {
            assert_eq!(validate_path_glob(p), Err(msg.to_string()), "{p:?}");
        }
        assert!(validate_path_glob(&format!("/{}", "a".repeat(MAX_PATTERN_LEN))).is_err());
    }

    #[test]
    fn cgroup_glob_validation() {
        for ok in [
            "/",
            "/**",
            "/kubepods.slice/**",
            "/kubepods.slice/**/cri-*.scope",
            "/portcullis-demo/**",
        ] {
            assert_eq!(validate_cgroup_glob(ok), Ok(()), "{ok}");
        }
        assert_eq!(
            validate_cgroup_glob("kubepods.slice"),
            Err("path 'kubepods.slice' is not absolute (it must start with '/')".into())
        );
        assert!(validate_cgroup_glob("/a/../b").is_err());
        assert!(validate_cgroup_glob("/a/x**").is_err());
    }

    #[test]
    fn unit_glob_validation() {
        assert_eq!(validate_unit_glob("triton*.service"), Ok(()));
        assert_eq!(
            validate_unit_glob(""),
            Err("unit pattern must not be empty".into())
        );
        assert_eq!(
            validate_unit_glob("system.slice/x.service"),
            Err("unit pattern 'system.slice/x.service' must not contain '/' (it matches a unit name such as 'nginx.service')".into())
        );
        assert_eq!(
            validate_unit_glob("x**.service"),
            Err("unit pattern 'x**.service': '**' has no meaning in a unit name, use '*'".into())
        );
        assert!(validate_unit_glob("x[.service").is_err());
    }
}
