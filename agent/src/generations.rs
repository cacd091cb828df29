//! The name tables of recent policy generations, so each decision line is
//! named by the generation that decided it.
//!
//! Rule ids and policy bits restart with every compile, so an event read
//! after a flip, or after a restart from the pinned ring buffer, would be
//! named with the wrong generation's tables. Every identity carries its
//! generation number into the kernel (`IdentityConfig::generation`), every
//! event carries it back, and the reader looks that generation up here: the
//! recent ones in memory, and, when a directory is configured, those of
//! earlier agent instances on disk. A generation found nowhere is logged as
//! unknown, never under another generation's names.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::compile::{Compiled, RuleInfo};

/// A replaced generation's names are dropped once the reader has drained
/// the ring buffer this long after the replacement (more than the maps'
/// retirement grace, during which a hook may still decide under it).
const GRACE: Duration = Duration::from_secs(2);
/// At most this many generations in memory, when the reader lags behind a
/// reload storm (older ones are then logged as unknown, never misnamed).
const MAX_KEPT: usize = 256;
/// The newest generations always kept on disk, for the next instance.
const KEEP_ON_DISK: usize = 16;

/// What naming one generation's events takes.
#[derive(Debug, Default)]
pub struct Names {
    pub generation: u32,
    pub policies: Vec<String>,
    /// Identity → indexes into `policies`, by policy bit.
    pub identity_policies: BTreeMap<u32, Vec<usize>>,
    /// `rules[rule_id]`.
    pub rules: Arc<Vec<RuleInfo>>,
    /// `(dev, ino)` → a path a policy named it by.
    pub inode_paths: Arc<BTreeMap<(u32, u64), PathBuf>>,
}

impl Names {
    /// A generation's tables (the rule tables are shared, not copied).
    pub fn of(c: &Compiled) -> Self {
        Self {
            generation: c.generation,
            policies: c.policies.clone(),
            identity_policies: c.identity_policies.clone(),
            rules: Arc::clone(&c.rules),
            inode_paths: Arc::clone(&c.inode_paths),
        }
    }
}

/// The on-disk form: `<gen>.rules.json` is written once per generation
/// (it may be large), `<gen>.identities.json` again whenever a new cgroup
/// adds an identity to the generation.
#[derive(Serialize, Deserialize)]
struct StoredRules {
    policies: Vec<String>,
    /// `(policy, rule)` by rule id.
    rules: Vec<(String, String)>,
    inode_paths: Vec<(u32, u64, PathBuf)>,
}

/// The recent generations, newest last, and where earlier instances left
/// theirs.
#[derive(Debug, Default, Clone)]
pub struct Generations {
    /// The generation in force: also the workload tables (cgroup paths,
    /// pods) every line is decorated with.
    pub current: Arc<Compiled>,
    recent: BTreeMap<u32, Kept>,
    dir: Option<PathBuf>,
    /// When the reader last found the ring buffer empty (shared with the
    /// reader's snapshots).
    caught_up: Arc<Mutex<Option<Instant>>>,
}

#[derive(Debug, Clone)]
struct Kept {
    names: Arc<Names>,
    /// When another generation replaced this one.
    replaced: Option<Instant>,
    /// The rule table last written to disk for it.
    stored_rules: Option<Arc<Vec<RuleInfo>>>,
}

impl Generations {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            ..Self::default()
        }
    }

    /// The highest generation number an earlier instance stored, so ours
    /// start above it.
    pub fn stored_max(&self) -> Option<u32> {
        let dir = self.dir.as_deref()?;
        stored(dir).into_iter().max()
    }

    /// Makes `c` the generation in force and keeps its names in memory.
    /// The returned job writes them to disk: run it after releasing the
    /// lock the reader takes, since at 100 000 rules the file is large.
    #[must_use]
    pub fn publish(&mut self, c: Arc<Compiled>) -> Store {
        let now = Instant::now();
        if self.current.generation != c.generation
            && let Some(old) = self.recent.get_mut(&self.current.generation)
        {
            old.replaced = Some(now);
        }
        let names = Arc::new(Names::of(&c));
        let with_rules = self
            .recent
            .get(&c.generation)
            .and_then(|k| k.stored_rules.as_ref())
            .is_none_or(|r| !Arc::ptr_eq(r, &names.rules));
        self.recent.insert(
            c.generation,
            Kept {
                names: Arc::clone(&names),
                replaced: None,
                stored_rules: Some(Arc::clone(&names.rules)),
            },
        );
        // Drop what no unread event can need: replaced, and the reader has
        // been caught up since the grace period after that.
        let caught_up = *self.caught_up.lock().unwrap_or_else(|e| e.into_inner());
        self.recent.retain(|_, k| {
            k.replaced
                .zip(caught_up)
                .is_none_or(|(r, up)| up <= r + GRACE)
        });
        while self.recent.len() > MAX_KEPT {
            self.recent.pop_first();
        }
        self.current = c;
        Store {
            dir: self.dir.clone(),
            names,
            with_rules,
            keep: self.recent.keys().copied().collect(),
        }
    }

    /// Makes `c`'s names known before the kernel can decide under it: before
    /// the flip, and before a new cgroup points at a new identity. The
    /// reader may read such an event before `publish`.
    pub fn announce(&mut self, c: &Compiled) {
        let names = Arc::new(Names::of(c));
        match self.recent.get_mut(&c.generation) {
            Some(k) => k.names = names,
            None => {
                self.recent.insert(
                    c.generation,
                    Kept {
                        names,
                        replaced: None,
                        stored_rules: None,
                    },
                );
            }
        }
    }

    /// An announced generation that never went into force (its flip
    /// failed): its names go like a replaced generation's.
    pub fn withdraw(&mut self, generation: u32) {
        if generation != self.current.generation
            && let Some(k) = self.recent.get_mut(&generation)
        {
            k.replaced = Some(Instant::now());
        }
    }

    /// Called by the reader whenever it has drained the ring buffer.
    pub fn mark_caught_up(&self) {
        *self.caught_up.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// The names of `generation`, from memory or from what an earlier
    /// instance stored (cached in `cache`).
    pub fn names(
        &self,
        generation: u32,
        cache: &mut BTreeMap<u32, Option<Arc<Names>>>,
    ) -> Option<Arc<Names>> {
        if let Some(k) = self.recent.get(&generation) {
            return Some(Arc::clone(&k.names));
        }
        let dir = self.dir.as_deref()?;
        cache
            .entry(generation)
            .or_insert_with(|| load(dir, generation).map(Arc::new))
            .clone()
    }
}

/// Writing one generation's names to disk (see [`Generations::publish`]).
pub struct Store {
    dir: Option<PathBuf>,
    names: Arc<Names>,
    with_rules: bool,
    /// Generations still kept in memory (their files stay too).
    keep: BTreeSet<u32>,
}

impl Store {
    /// Best effort: a failure costs only the naming of this generation's
    /// events after a restart, and is logged.
    pub fn run(self) {
        if let Some(dir) = &self.dir
            && let Err(e) = store(dir, &self.names, self.with_rules, &self.keep)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not store the generation's names; its events are unnamed after a restart");
        }
    }
}

fn stored(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            name.to_str()?.strip_suffix(".rules.json")?.parse().ok()
        })
        .collect()
}

/// Writes through a temporary file and a rename, so a reader never sees
/// half a table.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn store(dir: &Path, n: &Names, with_rules: bool, keep: &BTreeSet<u32>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let g = n.generation;
    if with_rules {
        let rules = StoredRules {
            policies: n.policies.clone(),
            rules: n
                .rules
                .iter()
                .map(|r| (r.policy.clone(), r.rule.clone()))
                .collect(),
            inode_paths: n
                .inode_paths
                .iter()
                .map(|(&(dev, ino), p)| (dev, ino, p.clone()))
                .collect(),
        };
        write_atomic(
            &dir.join(format!("{g}.rules.json")),
            &serde_json::to_vec(&rules)?,
        )?;
        let mut all = stored(dir);
        all.sort_unstable();
        let old = all.len().saturating_sub(KEEP_ON_DISK);
        for old in all[..old].iter().filter(|g| !keep.contains(g)) {
            let _ = std::fs::remove_file(dir.join(format!("{old}.rules.json")));
            let _ = std::fs::remove_file(dir.join(format!("{old}.identities.json")));
        }
    }
    write_atomic(
        &dir.join(format!("{g}.identities.json")),
        &serde_json::to_vec(&n.identity_policies)?,
    )
}

fn load(dir: &Path, generation: u32) -> Option<Names> {
    let read = |what: &str| std::fs::read(dir.join(format!("{generation}.{what}.json"))).ok();
    let rules: StoredRules = serde_json::from_slice(&read("rules")?).ok()?;
    let identity_policies = serde_json::from_slice(&read("identities")?).ok()?;
    Some(Names {
        generation,
        policies: rules.policies,
        identity_policies,
        rules: Arc::new(
            rules
                .rules
                .into_iter()
                .map(|(policy, rule)| RuleInfo { policy, rule })
                .collect(),
        ),
        inode_paths: Arc::new(
            rules
                .inode_paths
                .into_iter()
                .map(|(dev, ino, p)| ((dev, ino), p))
                .collect(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(g: u32, policy: &str) -> Arc<Compiled> {
        let mut c = Compiled {
            generation: g,
            policies: vec![policy.into()],
            ..Compiled::default()
        };
        c.identity_policies.insert(3, vec![0]);
        c.rules = Arc::new(vec![
            RuleInfo {
                policy: String::new(),
                rule: "default".into(),
            },
            RuleInfo {
                policy: policy.into(),
                rule: format!("network.egress.deny[0] 10.{g}.0.0/16"),
            },
        ]);
        Arc::new(c)
    }

    #[test]
    fn each_generation_keeps_its_names_and_a_restart_reads_them_back() {
        let dir = std::env::temp_dir().join(format!("portcullis-gens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut g = Generations::new(Some(dir.clone()));
        g.publish(generation(7, "old")).run();
        g.publish(generation(8, "new")).run();
        let mut cache = BTreeMap::new();
        assert_eq!(g.names(7, &mut cache).unwrap().policies, ["old"]);
        assert_eq!(g.names(8, &mut cache).unwrap().policies, ["new"]);

        let restarted = Generations::new(Some(dir.clone()));
        assert_eq!(restarted.stored_max(), Some(8));
        let old = restarted.names(7, &mut cache).expect("stored");
        assert_eq!(old.rules[1].rule, "network.egress.deny[0] 10.7.0.0/16");
        assert_eq!(old.identity_policies[&3], [0]);
        assert!(restarted.names(9, &mut cache).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
