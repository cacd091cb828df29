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

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};

use crate::chain::{Chain, ChainError};

/// What the signature covers, besides the seq and head it names: a
/// signature for anything else the key signs can never pass for one.
const DOMAIN: &str = "portcullis-trail-checkpoint-v1";

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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn message(seq: u64, head: &str) -> String {
    format!("{DOMAIN} {seq} {head}")
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
    unhex::<N>(&text).ok_or_else(|| key_err(format!("not a {what} ({} hex digits)", 2 * N)))
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
        let sig = self.key.sign(message(chain.seq(), &head).as_bytes());
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
    /// Decision lines after the last checkpoint (not signed yet).
    pub unsigned: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("line {line}: checkpoint {why}")]
    Bad { line: usize, why: String },
}

/// Verifies the chain of `files` (oldest first) and every checkpoint in it
/// against `key`.
pub fn verify(files: &[PathBuf], key: &VerifyingKey) -> Result<Signed, (PathBuf, CheckpointError)> {
    let (mut checkpoints, mut covered, mut unsigned) = (0, 0, 0);
    let (lines, first_seq, _) = crate::chain::verify_with(files, |n, line, before| {
        if !line.starts_with("{\"checkpoint\":") {
            unsigned += 1;
            return Ok(());
        }
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
        if c["key"].as_str() != Some(hex(key.as_bytes()).as_str()) {
            return Err(bad("is signed by another key"));
        }
        let sig = v["sig"]
            .as_str()
            .and_then(unhex::<64>)
            .map(|b| Signature::from_bytes(&b))
            .ok_or_else(|| bad("has no signature"))?;
        key.verify(message(seq, head).as_bytes(), &sig)
            .map_err(|_| bad("signature does not verify: the checkpoint was forged or edited"))?;
        // The signature is good; the head it signed must be the one the
        // lines before it hash to now.
        if before.is_some_and(|b| b.seq() != seq || b.head_hex() != head) {
            return Err(bad(&format!(
                "signed seq {seq} with another chain: a line before it was rewritten"
            )));
        }
        checkpoints += 1;
        covered = seq;
        unsigned = 0;
        Ok(())
    })?;
    Ok(Signed {
        lines,
        first_seq,
        checkpoints,
        covered_seq: covered,
        unsigned,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed_trail(dir: &Path) -> (PathBuf, VerifyingKey) {
        std::fs::create_dir_all(dir).unwrap();
        let key_path = dir.join("trail.key");
        let _ = std::fs::remove_file(&key_path);
        let _ = std::fs::remove_file(dir.join("trail.key.pub"));
        keygen(&key_path).unwrap();
        let public = load_public(&dir.join("trail.key.pub")).unwrap();
        let mut signer = Signer::load(&key_path, 3, Duration::from_secs(3600)).unwrap();
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
        (f, public)
    }

    #[test]
    fn checkpoints_verify_and_a_recomputed_chain_does_not() {
        let dir = std::env::temp_dir().join(format!("portcullis-trail-{}", std::process::id()));
        let (f, public) = signed_trail(&dir);
        let ok = verify(std::slice::from_ref(&f), &public).unwrap();
        // 7 lines, checkpoints after lines 3 and 6 (seq 3 and 7 signed).
        assert_eq!(ok.checkpoints, 2);
        assert_eq!((ok.lines, ok.covered_seq, ok.unsigned), (9, 7, 1));

        // The attacker's rewrite: edit line 2, recompute every chain value.
        let text = std::fs::read_to_string(&f).unwrap();
        let mut chain = Chain::default();
        let forged: Vec<String> = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                let body = l.rsplit_once(",\"seq\":").unwrap().0.to_owned() + "}";
                let body = if i == 1 {
                    body.replace("deny", "allow")
                } else {
                    body
                };
                chain.seal(&body)
            })
            .collect();
        std::fs::write(&f, forged.join("\n") + "\n").unwrap();
        assert!(
            crate::chain::verify(std::slice::from_ref(&f)).is_ok(),
            "the chain alone is fooled"
        );
        let err = verify(std::slice::from_ref(&f), &public).unwrap_err().1;
        assert!(
            matches!(&err, CheckpointError::Bad { line: 4, why } if why.contains("another chain")),
            "{err}"
        );

        // Another key's checkpoints are not ours.
        let (f, _) = signed_trail(&dir.join("other"));
        let err = verify(std::slice::from_ref(&f), &public).unwrap_err().1;
        assert!(err.to_string().contains("another key"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
