//! A tamper-evident decision trail: every decision line carries `seq` (its
//! number, from 1) and `chain`, the SHA-256 of the previous line's `chain`
//! followed by this line without its `chain` field. Editing, deleting,
//! inserting or reordering any line breaks every `chain` after it;
//! `portcullis verify-log` finds the first broken line. Only cutting off the
//! tail cannot be seen from the file alone: ship the lines off the host (or
//! compare with `portcullis_decisions_logged_total`) to anchor it. The chain
//! alone has no key: see `trail.rs` for the signed checkpoints that make a
//! recomputed chain detectable.
//!
//! The chain survives restarts and rotation: a new agent resumes from the
//! last line of the decision file (or of `FILE.1` right after a rotation).

use std::{
    io::{Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
};

use sha2::{Digest as _, Sha256};

/// Seals lines in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    seq: u64,
    head: [u8; 32],
}

impl Default for Chain {
    /// The genesis: `seq` 0, head all zeros.
    fn default() -> Self {
        Self {
            seq: 0,
            head: [0; 32],
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("line {line}: not a sealed decision line ({reason})")]
    Malformed { line: usize, reason: &'static str },
    #[error("line {line}: seq {found}, expected {expected}: a line before it was removed or added")]
    Seq {
        line: usize,
        found: u64,
        expected: u64,
    },
    #[error("line {line} (seq {seq}): chain mismatch: this line or one before it was modified")]
    Mismatch { line: usize, seq: u64 },
}

/// Lowercase hex of `bytes` (chain heads here, keys and signatures in
/// `trail`).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `N` bytes that exactly `2 * N` hex digits spell, or `None`.
pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Chain {
    /// Appends `seq` and `chain` to `json` (one JSON object, no newline).
    pub fn seal(&mut self, json: &str) -> String {
        let body = json.strip_suffix('}').unwrap_or(json);
        let sep = if body.ends_with('{') { "" } else { "," };
        self.seq += 1;
        let core = format!("{body}{sep}\"seq\":{}}}", self.seq);
        self.head = Sha256::new()
            .chain_update(self.head)
            .chain_update(core.as_bytes())
            .finalize()
            .into();
        format!(
            "{},\"chain\":\"{}\"}}",
            &core[..core.len() - 1],
            hex(&self.head)
        )
    }

    /// Checks one sealed line against the chain so far and advances it.
    /// `anchor`: accept this line's chain as given (the first line of a
    /// trail whose beginning was rotated away).
    pub fn check(&mut self, n: usize, line: &str, anchor: bool) -> Result<(), ChainError> {
        let malformed = |reason| ChainError::Malformed { line: n, reason };
        let (core_body, tail) = line
            .rsplit_once(",\"chain\":\"")
            .ok_or(malformed("no chain field"))?;
        let chain = unhex(
            tail.strip_suffix("\"}")
                .ok_or(malformed("chain is not the last field"))?,
        )
        .ok_or(malformed("chain is not 64 hex digits"))?;
        let seq: u64 = core_body
            .rsplit_once("\"seq\":")
            .and_then(|(_, s)| s.parse().ok())
            .ok_or(malformed("no seq field"))?;
        if anchor {
            *self = Self { seq, head: chain };
            return Ok(());
        }
        if seq != self.seq + 1 {
            return Err(ChainError::Seq {
                line: n,
                found: seq,
                expected: self.seq + 1,
            });
        }
        let core = format!("{core_body}}}");
        let expect: [u8; 32] = Sha256::new()
            .chain_update(self.head)
            .chain_update(core.as_bytes())
            .finalize()
            .into();
        if expect != chain {
            return Err(ChainError::Mismatch { line: n, seq });
        }
        *self = Self { seq, head: chain };
        Ok(())
    }

    /// The length `seal(json)` will return, without advancing the chain
    /// (so the writer can rotate, and sign the old file, before sealing).
    pub fn sealed_len(&self, json: &str) -> usize {
        let body = json.strip_suffix('}').unwrap_or(json);
        let sep = usize::from(!body.ends_with('{'));
        let digits = (self.seq + 1).to_string().len();
        body.len() + sep + "\"seq\":".len() + digits + ",\"chain\":\"".len() + 64 + "\"}".len()
    }

    /// The chain after line `seq` whose `chain` is `head` (hex), as a signed
    /// checkpoint vouches for it.
    pub fn at(seq: u64, head: &str) -> Option<Self> {
        Some(Self {
            seq,
            head: unhex(head)?,
        })
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The head after the last sealed line, as the `chain` field shows it.
    pub fn head_hex(&self) -> String {
        hex(&self.head)
    }

    /// Resumes after the last sealed line of the decision file at `path`
    /// (or of `path.1` when `path` is empty or missing, as right after a
    /// rotation). Unreadable or unsealed files start a new chain.
    pub fn resume(path: &Path) -> Self {
        let rotated = {
            let mut s = path.as_os_str().to_owned();
            s.push(".1");
            PathBuf::from(s)
        };
        for p in [path, rotated.as_path()] {
            if let Some(last) = last_line(p) {
                let mut c = Self::default();
                if c.check(0, &last, true).is_ok() {
                    return c;
                }
                return Self::default();
            }
        }
        Self::default()
    }
}

/// The last non-empty line of a file (reading at most its last 1 MiB).
fn last_line(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(1 << 20);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = String::new();
    f.read_to_string(&mut buf).ok()?;
    buf.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::to_owned)
}

/// Verifies decision files given oldest first (e.g. `F.2 F.1 F`). A trail
/// starting at `seq` 1 is checked from the genesis; one whose start was
/// rotated away is anchored at its first line. Returns the number of lines
/// and the first `seq`.
pub fn verify(files: &[PathBuf]) -> Result<(usize, u64), (PathBuf, ChainError)> {
    verify_with(files, |_, _, _| Ok(None)).map(|(lines, first, _)| (lines, first))
}

/// [`verify`], calling `each(line number, line, chain before it)` on every
/// line first (`None` before an anchored first line, whose predecessor is
/// gone). For that line `each` may return the chain before it, when it can
/// vouch for it (a signed checkpoint names the head it follows): the line is
/// then checked against it instead of taken as given. Returns the number of
/// lines, the first and the last `seq`.
pub fn verify_with<E: From<ChainError>>(
    files: &[PathBuf],
    mut each: impl FnMut(usize, &str, Option<&Chain>) -> Result<Option<Chain>, E>,
) -> Result<(usize, u64, u64), (PathBuf, E)> {
    let mut chain = Chain::default();
    let (mut count, mut first) = (0usize, 0u64);
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|_| {
            (
                file.clone(),
                E::from(ChainError::Malformed {
                    line: 0,
                    reason: "unreadable file",
                }),
            )
        })?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let mut anchor = count == 0 && !line.contains("\"seq\":1,");
            let vouched =
                each(i + 1, line, (!anchor).then_some(&chain)).map_err(|e| (file.clone(), e))?;
            if let Some(before) = vouched.filter(|_| anchor) {
                chain = before;
                anchor = false;
            }
            chain
                .check(i + 1, line, anchor)
                .map_err(|e| (file.clone(), E::from(e)))?;
            if count == 0 {
                first = chain.seq();
            }
            count += 1;
        }
    }
    Ok((count, first, chain.seq()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trail(n: u64) -> Vec<String> {
        let mut c = Chain::default();
        (0..n)
            .map(|i| c.seal(&format!("{{\"verdict\":\"deny\",\"pid\":{i}}}")))
            .collect()
    }

    fn check_all(lines: &[String]) -> Result<(), ChainError> {
        let mut c = Chain::default();
        for (i, l) in lines.iter().enumerate() {
            c.check(i + 1, l, false)?;
        }
        Ok(())
    }

    #[test]
    fn sealed_lines_are_json_and_verify() {
        let lines = trail(5);
        for (i, l) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["seq"], i as u64 + 1);
            assert_eq!(v["chain"].as_str().unwrap().len(), 64);
        }
        assert_eq!(check_all(&lines), Ok(()));
    }

    #[test]
    fn any_edit_removal_or_reorder_is_found_at_its_line() {
        let lines = trail(5);
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("deny", "allow");
        assert_eq!(
            check_all(&edited),
            Err(ChainError::Mismatch { line: 3, seq: 3 })
        );
        let mut removed = lines.clone();
        removed.remove(1);
        assert_eq!(
            check_all(&removed),
            Err(ChainError::Seq {
                line: 2,
                found: 3,
                expected: 2
            })
        );
        let mut swapped = lines.clone();
        swapped.swap(3, 4);
        assert!(check_all(&swapped).is_err());
        // Renumbering to hide a removal still breaks the chain.
        let mut renumbered = lines.clone();
        renumbered.remove(1);
        renumbered[1] = renumbered[1].replace("\"seq\":3", "\"seq\":2");
        assert_eq!(
            check_all(&renumbered),
            Err(ChainError::Mismatch { line: 2, seq: 2 })
        );
    }

    #[test]
    fn sealed_len_is_the_length_seal_returns() {
        let mut c = Chain::default();
        for json in ["{\"i\":1}", "{}", "{\"path\":\"/etc/shadow\"}"] {
            for _ in 0..11 {
                let expect = c.sealed_len(json);
                assert_eq!(c.seal(json).len(), expect, "{json} at seq {}", c.seq());
            }
        }
    }

    #[test]
    fn resumes_from_the_last_line_of_the_file_or_its_rotation() {
        let dir = std::env::temp_dir().join(format!("portcullis-chain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("d.jsonl");
        let mut c = Chain::default();
        let lines: Vec<String> = (0..3).map(|i| c.seal(&format!("{{\"i\":{i}}}"))).collect();
        std::fs::write(dir.join("d.jsonl.1"), lines.join("\n") + "\n").unwrap();
        let mut resumed = Chain::resume(&f);
        assert_eq!(resumed, c);
        let next = resumed.seal("{\"i\":3}");
        std::fs::write(&f, format!("{next}\n")).unwrap();
        assert_eq!(verify(&[dir.join("d.jsonl.1"), f.clone()]), Ok((4, 1)));
        // Without the rotated file the trail is anchored at seq 4.
        assert_eq!(verify(std::slice::from_ref(&f)), Ok((1, 4)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
