//! Signed checkpoints: what makes the decision trail verifiable against
//! something an attacker who can write the file does not hold.
//!
//! The hash chain (`chain.rs`) alone starts from a public genesis, so whoever
//! can write the file can rewrite a line and recompute every `chain` after
//! it. With `--trail-key`, the agent periodically appends a checkpoint line
//! that signs (ed25519) the chain head so far:
//!
//! `{"checkpoint":{"signed_seq":N,"signed_chain":"<head after line N>","key":"<public key>","time":"…"},"sig":"…"}`
//!
//! The checkpoint is itself sealed into the chain like any line, so it
//! cannot be moved or dropped without breaking the chain after it either.
//! `verify-log --public-key` recomputes the chain and checks every
//! checkpoint: its signature against the given key, and that the head it
//! signed is the head recomputed at that point. A rewritten trail with a
//! recomputed chain therefore fails at its first checkpoint after the edit.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use crate::chain::{Chain, ChainError, hex, unhex};

/// Opens every signed message, so a signature for anything else the key
/// signs can never pass for a checkpoint. v2 signs every field of the
/// checkpoint (v1 left `key` and `time` out).
const DOMAIN: &str = "portcullis-trail-checkpoint-v2";

#[derive(Debug, thiserror::Error)]
pub enum TrailError {
    #[error("{path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The canonical message of a checkpoint: every field of it, space
/// separated (none can hold a space: digits, hex, RFC 3339 time). ed25519
/// already binds the public key into each signature (RFC 8032 hashes it
/// with the message); naming it here too keeps that true of the message
/// alone.
fn message(seq: u64, head: &str, key: &str, time: &str) -> String {
    format!("{DOMAIN} {seq} {head} {key} {time}")
}

/// Writes a new signing key (the 32-byte seed as hex, mode 0600) to `out`
/// and its public key to `out.pub`. Returns the public key.
pub fn keygen(out: &Path) -> Result<String, TrailError> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|source| TrailError::Write {
            path: "/dev/urandom".into(),
            source,
        })?;
    let key = SigningKey::from_bytes(&seed);
    let public = hex(key.verifying_key().as_bytes());
    let write = |path: &Path, text: String, mode: u32| {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|source| TrailError::Write {
                path: path.to_path_buf(),
                source,
            })
    };
    write(out, format!("{}\n", hex(&seed)), 0o600)?;
    let mut public_path = out.as_os_str().to_owned();
    public_path.push(".pub");
    write(Path::new(&public_path), format!("{public}\n"), 0o644)?;
    Ok(public)
}

fn read_hex<const N: usize>(path: &Path, what: &str) -> Result<[u8; N], TrailError> {
    let key_err = |reason: String| TrailError::Key {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| key_err(format!("cannot read: {e}")))?;
    unhex::<N>(text.trim()).ok_or_else(|| key_err(format!("not a {what} ({} hex digits)", 2 * N)))
}

/// A public key file (`portcullis keygen` writes `KEY.pub`).
pub fn load_public(path: &Path) -> Result<VerifyingKey, TrailError> {
    let bytes = read_hex::<32>(path, "public key")?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| TrailError::Key {
        path: path.to_path_buf(),
        reason: format!("not an ed25519 public key: {e}"),
    })
}

/// When the agent signs: every `lines` lines, or after `interval` when a
/// line was written since the last checkpoint, before a rotation and on
/// shutdown.
pub struct Signer {
    key: SigningKey,
    public: String,
    lines: u64,
    interval: Duration,
    unsigned: u64,
    last: Instant,
}

impl Signer {
    pub fn load(path: &Path, lines: u64, interval: Duration) -> Result<Self, TrailError> {
        let key = SigningKey::from_bytes(&read_hex::<32>(path, "signing key seed")?);
        Ok(Self {
            public: hex(key.verifying_key().as_bytes()),
            key,
            lines: lines.max(1),
            interval,
            unsigned: 0,
            last: Instant::now(),
        })
    }

    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// Counts a line written; true when a checkpoint is due by count.
    pub fn wrote(&mut self) -> bool {
        self.unsigned += 1;
        self.unsigned >= self.lines
    }

    /// True when lines wait for a checkpoint and the interval has passed.
    pub fn due_by_time(&self) -> bool {
        self.unsigned > 0 && self.last.elapsed() >= self.interval
    }

    pub fn pending(&self) -> bool {
        self.unsigned > 0
    }

    /// The checkpoint line (unsealed) for the chain as it stands.
    pub fn checkpoint(&mut self, chain: &Chain, time: &str) -> String {
        let head = chain.head_hex();
        let sig = self
            .key
            .sign(message(chain.seq(), &head, &self.public, time).as_bytes());
        self.unsigned = 0;
        self.last = Instant::now();
        format!(
            "{{\"checkpoint\":{{\"signed_seq\":{},\"signed_chain\":\"{head}\",\"key\":\"{}\",\"time\":\"{time}\"}},\"sig\":\"{}\"}}",
            chain.seq(),
            self.public,
            hex(&sig.to_bytes())
        )
    }
}

/// What `verify-log --public-key` found.
#[derive(Debug, PartialEq, Eq)]
pub struct Signed {
    pub lines: usize,
    pub first_seq: u64,
    pub checkpoints: usize,
    /// The last seq a valid checkpoint covers (0: none).
    pub covered_seq: u64,
    /// Lines of the files that the last valid checkpoint covers (checkpoint
    /// lines included, a first line taken as given not).
    pub covered_lines: usize,
    /// Lines after the last valid checkpoint (not signed yet).
    pub unsigned: usize,
    /// The first line was taken as given: the lines before it were rotated
    /// away and it is not a checkpoint, so nothing vouches for its content.
    pub first_unchecked: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("line {line}: checkpoint {why}")]
    Bad { line: usize, why: String },
}

/// Checks one checkpoint line's signature against `key`; returns the seq
/// and head it signed.
fn signed_head(n: usize, line: &str, key: &VerifyingKey) -> Result<(u64, String), CheckpointError> {
    let bad = |why: &str| CheckpointError::Bad {
        line: n,
        why: why.to_owned(),
    };
    let v: serde_json::Value = serde_json::from_str(line).map_err(|_| bad("is not JSON"))?;
    let c = &v["checkpoint"];
    let seq = c["signed_seq"]
        .as_u64()
        .ok_or_else(|| bad("has no signed_seq"))?;
    let head = c["signed_chain"]
        .as_str()
        .ok_or_else(|| bad("has no signed_chain"))?;
    let public = hex(key.as_bytes());
    if c["key"].as_str() != Some(public.as_str()) {
        return Err(bad("is signed by another key"));
    }
    let time = c["time"].as_str().ok_or_else(|| bad("has no time"))?;
    let sig = v["sig"]
        .as_str()
        .map(str::trim)
        .and_then(unhex::<64>)
        .map(|b| Signature::from_bytes(&b))
        .ok_or_else(|| bad("has no signature"))?;
    // Strict: no small-order key or non-canonical signature passes.
    key.verify_strict(message(seq, head, &public, time).as_bytes(), &sig)
        .map_err(|_| bad("signature does not verify: the checkpoint was forged or edited"))?;
    Ok((seq, head.to_owned()))
}

/// Verifies the chain of `files` (oldest first) and every checkpoint in it
/// against `key`. A checkpoint as the first line of a trail whose start was
/// rotated away (the agent opens every new file with one) anchors it: the
/// line is checked against the head it signed, not taken as given.
pub fn verify(files: &[PathBuf], key: &VerifyingKey) -> Result<Signed, (PathBuf, CheckpointError)> {
    let (mut checkpoints, mut covered_seq, mut covered_lines, mut seen) = (0, 0, 0, 0);
    let mut first_unchecked = false;
    let (lines, first_seq, _) = crate::chain::verify_with(files, |n, line, before| {
        seen += 1;
        if !line.starts_with("{\"checkpoint\":") {
            first_unchecked |= before.is_none();
            return Ok(None);
        }
        let (seq, head) = signed_head(n, line, key)?;
        // The signature is good; the head it signed must be the one the
        // lines before it hash to now.
        let vouched = match before {
            Some(b) if b.seq() != seq || b.head_hex() != head => {
                return Err(CheckpointError::Bad {
                    line: n,
                    why: format!(
                        "signed seq {seq} with another chain: a line before it was rewritten"
                    ),
                });
            }
            Some(_) => None,
            None => Some(Chain::at(seq, &head).ok_or(CheckpointError::Bad {
                line: n,
                why: "signed_chain is not 64 hex digits".to_owned(),
            })?),
        };
        checkpoints += 1;
        covered_seq = seq;
        covered_lines = seen;
        Ok(vouched)
    })?;
    Ok(Signed {
        lines,
        first_seq,
        checkpoints,
        covered_seq,
        covered_lines: covered_lines - usize::from(first_unchecked && covered_lines > 0),
        unsigned: lines - covered_lines,
        first_unchecked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Rotation, Sink};

    /// A fresh directory for one test, and a key made in it.
    fn setup(name: &str) -> (PathBuf, PathBuf, VerifyingKey) {
        let dir =
            std::env::temp_dir().join(format!("portcullis-trail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key_path = dir.join("trail.key");
        keygen(&key_path).unwrap();
        let public = load_public(&dir.join("trail.key.pub")).unwrap();
        (dir, key_path, public)
    }

    /// Seven decision lines signed every three: d d d C d d d C d.
    fn signed_trail(dir: &Path, key: &Path) -> PathBuf {
        let mut signer = Signer::load(key, 3, Duration::from_secs(3600)).unwrap();
        let mut chain = Chain::default();
        let mut lines = Vec::new();
        for i in 0..7 {
            lines.push(chain.seal(&format!("{{\"verdict\":\"deny\",\"pid\":{i}}}")));
            if signer.wrote() {
                let cp = signer.checkpoint(&chain, "t");
                lines.push(chain.seal(&cp));
            }
        }
        let f = dir.join("d.jsonl");
        std::fs::write(&f, lines.join("\n") + "\n").unwrap();
        f
    }

    fn read_lines(f: &Path) -> Vec<String> {
        std::fs::read_to_string(f)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(f: &Path, lines: &[String]) {
        std::fs::write(f, lines.join("\n") + "\n").unwrap();
    }

    /// The attacker's rewrite: `edit` each line's body, then recompute every
    /// `seq` and `chain` from the genesis.
    fn recompute(lines: &[String], mut edit: impl FnMut(usize, String) -> String) -> Vec<String> {
        let mut chain = Chain::default();
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let body = l.rsplit_once(",\"seq\":").unwrap().0.to_owned() + "}";
                chain.seal(&edit(i, body))
            })
            .collect()
    }

    fn is_checkpoint(l: &str) -> bool {
        l.starts_with("{\"checkpoint\":")
    }

    #[test]
    fn a_signed_trail_verifies() {
        let (dir, key, public) = setup("roundtrip");
        let f = signed_trail(&dir, &key);
        let ok = verify(std::slice::from_ref(&f), &public).unwrap();
        // Checkpoints after the 3rd and 6th decisions (seq 3 and 7 signed).
        assert_eq!(
            ok,
            Signed {
                lines: 9,
                first_seq: 1,
                checkpoints: 2,
                covered_seq: 7,
                covered_lines: 8,
                unsigned: 1,
                first_unchecked: false,
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_recomputed_chain_fails_at_the_first_checkpoint_after_the_edit() {
        let (dir, key, public) = setup("recomputed");
        let f = signed_trail(&dir, &key);
        let lines = read_lines(&f);

        let forged = recompute(&lines, |i, b| {
            if i == 1 {
                b.replace("deny", "allow")
            } else {
                b
            }
        });
        write_lines(&f, &forged);
        assert!(
            crate::chain::verify(std::slice::from_ref(&f)).is_ok(),
            "the chain alone is fooled"
        );
        let err = verify(std::slice::from_ref(&f), &public).unwrap_err().1;
        assert!(
            matches!(&err, CheckpointError::Bad { line: 4, why } if why.contains("another chain")),
            "{err}"
        );

        // Nor can the checkpoint be made to name the new head.
        let mut new_head = Chain::default();
        for l in &forged[..3] {
            new_head.check(0, l, false).unwrap();
        }
        let old_head = serde_json::from_str::<serde_json::Value>(&lines[3]).unwrap()["checkpoint"]
            ["signed_chain"]
            .as_str()
            .unwrap()
            .to_owned();
        let forged = recompute(&lines, |i, b| match i {
            1 => b.replace("deny", "allow"),
            3 => b.replace(&old_head, &new_head.head_hex()),
            _ => b,
        });
        write_lines(&f, &forged);
        let err = verify(std::slice::from_ref(&f), &public).unwrap_err().1;
        assert!(
            matches!(&err, CheckpointError::Bad { line: 4, why } if why.contains("signature does not verify")),
            "{err}"
        );

        // Dropping a checkpoint shifts every seq after it: the next one fails.
        let mut dropped = lines.clone();
        dropped.remove(3);
        write_lines(&f, &recompute(&dropped, |_, b| b));
        let err = verify(std::slice::from_ref(&f), &public).unwrap_err().1;
        assert!(
            matches!(&err, CheckpointError::Bad { line: 7, why } if why.contains("another chain")),
            "{err}"
        );

        // Dropping them all leaves no checkpoint of the key (verify-log fails).
        let none: Vec<String> = lines
            .iter()
            .filter(|l| !is_checkpoint(l))
            .cloned()
            .collect();
        write_lines(&f, &recompute(&none, |_, b| b));
        assert_eq!(
            verify(std::slice::from_ref(&f), &public)
                .unwrap()
                .checkpoints,
            0
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_keys_checkpoints_are_rejected() {
        let (dir, _, public) = setup("wrongkey");
        let (other_dir, other_key, other_public) = setup("wrongkey-other");
        let f = signed_trail(&other_dir, &other_key);
        let err = verify(std::slice::from_ref(&f), &public).unwrap_err().1;
        assert!(
            matches!(&err, CheckpointError::Bad { line: 4, why } if why.contains("another key")),
            "{err}"
        );
        // Naming our key over the other key's signature does not help.
        let ours = hex(public.as_bytes());
        let theirs = hex(other_public.as_bytes());
        let relabelled = recompute(&read_lines(&f), |_, b| b.replace(&theirs, &ours));
        write_lines(&f, &relabelled);
        let err = verify(std::slice::from_ref(&f), &public).unwrap_err().1;
        assert!(
            err.to_string().contains("signature does not verify"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&other_dir).unwrap();
    }

    #[test]
    fn a_truncated_tail_is_reported_not_failed() {
        let (dir, key, public) = setup("truncated");
        let f = signed_trail(&dir, &key);
        let lines = read_lines(&f);
        // Cut after two decisions past the first checkpoint: d d d C d d.
        write_lines(&f, &lines[..6]);
        let ok = verify(std::slice::from_ref(&f), &public).unwrap();
        assert_eq!(
            (
                ok.lines,
                ok.checkpoints,
                ok.covered_seq,
                ok.covered_lines,
                ok.unsigned
            ),
            (6, 1, 3, 4, 2)
        );
        // Cut before any checkpoint: intact, but nothing signed.
        write_lines(&f, &lines[..2]);
        let ok = verify(std::slice::from_ref(&f), &public).unwrap();
        assert_eq!((ok.checkpoints, ok.covered_lines, ok.unsigned), (0, 0, 2));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_checkpoint_as_last_line_resumes() {
        let (dir, key, public) = setup("resume");
        let f = dir.join("d.jsonl");
        let rotation = Rotation {
            max_bytes: 0,
            keep: 0,
        };
        let signer = || Some(Signer::load(&key, 1000, Duration::from_secs(3600)).unwrap());
        for run in 0..3 {
            let mut sink = Sink::open(Some(f.clone()), rotation, signer()).unwrap();
            sink.write_line(&format!("{{\"run\":{run},\"i\":0}}"))
                .unwrap();
            sink.write_line(&format!("{{\"run\":{run},\"i\":1}}"))
                .unwrap();
            // A clean stop signs the tail: the file ends with a checkpoint.
            drop(sink);
            let lines = read_lines(&f);
            assert!(is_checkpoint(lines.last().unwrap()), "{lines:?}");
            assert_eq!(Chain::resume(&f).seq(), 3 * (run + 1));
        }
        let ok = verify(std::slice::from_ref(&f), &public).unwrap();
        assert_eq!(
            (ok.lines, ok.checkpoints, ok.covered_seq, ok.unsigned),
            (9, 3, 8, 0)
        );
        // A stop with nothing new to sign adds nothing.
        drop(Sink::open(Some(f.clone()), rotation, signer()).unwrap());
        assert_eq!(read_lines(&f).len(), 9);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rotated_file_verifies_alone_from_its_opening_checkpoint() {
        let (dir, key, public) = setup("rotated");
        let f = dir.join("d.jsonl");
        let rotation = Rotation {
            max_bytes: 1200,
            keep: 3,
        };
        let signer = Signer::load(&key, 1000, Duration::from_secs(3600)).unwrap();
        let mut sink = Sink::open(Some(f.clone()), rotation, Some(signer)).unwrap();
        for i in 0..20 {
            sink.write_line(&format!("{{\"verdict\":\"deny\",\"pid\":{i}}}"))
                .unwrap();
        }
        drop(sink);
        let f1 = dir.join("d.jsonl.1");
        let (old, new) = (read_lines(&f1), read_lines(&f));
        assert!(
            is_checkpoint(old.last().unwrap()),
            "a rotated file ends signed: {old:?}"
        );
        assert!(is_checkpoint(&new[0]), "a new file opens signed: {new:?}");
        let both = verify(&[f1.clone(), f.clone()], &public).unwrap();
        assert_eq!(both.unsigned, 0);
        // Alone, the live file is anchored at its opening checkpoint and
        // checked from it: every line of it is covered.
        let alone = verify(std::slice::from_ref(&f), &public).unwrap();
        assert!(alone.first_seq > 1 && !alone.first_unchecked, "{alone:?}");
        assert_eq!(alone.covered_lines, new.len());
        // So even its first decision line cannot be edited...
        let mut edited = new.clone();
        edited[1] = edited[1].replacen("deny", "allow", 1);
        write_lines(&f, &edited);
        let err = verify(std::slice::from_ref(&f), &public).unwrap_err().1;
        assert!(
            matches!(
                err,
                CheckpointError::Chain(ChainError::Mismatch { line: 2, .. })
            ),
            "{err}"
        );
        // ...nor the opening checkpoint (its signature covers its time).
        let mut edited = new.clone();
        edited[0] = edited[0].replacen("\"time\":\"2", "\"time\":\"1", 1);
        write_lines(&f, &edited);
        let err = verify(std::slice::from_ref(&f), &public).unwrap_err().1;
        assert!(
            matches!(&err, CheckpointError::Bad { line: 1, why } if why.contains("signature does not verify")),
            "{err}"
        );
        // Without the opening checkpoint, the first line is taken as given
        // (its predecessor is gone), and said so.
        write_lines(&f, &new[1..]);
        let alone = verify(std::slice::from_ref(&f), &public).unwrap();
        assert!(alone.first_unchecked, "{alone:?}");
        assert_eq!(alone.covered_lines, new.len() - 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
