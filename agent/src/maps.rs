//! Writing a compiled policy generation into the kernel maps.
//!
//! A swap never shows a syscall a half-applied policy: the new generation's
//! rules are written under identity numbers the old one does not use, then
//! each cgroup is pointed at its new identity with one map update (atomic per
//! cgroup), and only then are the old generation's entries deleted
//! ([`PolicyMaps::retire`], scheduled by the daemon after a grace period),
//! because a hook that read a cgroup's old identity just before the flip may
//! still be about to look up that identity's rules. The grace only batches
//! deletions: what makes them safe is that `retire` first waits, with the
//! kernel's own barrier ([`HookBarrier`]), for every hook running since the
//! last flip to return. If a write fails before the flip
//! (a map is full), the new entries are removed again and the old generation
//! stays in force untouched. If the flip itself fails half-way (`IDENTITIES`
//! is full of cgroups), the cgroups flipped so far are pointed back at their
//! old identities and the new generation is retired like a replaced one
//! ([`MapsError::Flip`]): every cgroup ends on the old generation, never some
//! on each.

use std::{collections::BTreeSet, hash::Hash, sync::Arc};

use aya::{
    Ebpf, Pod,
    maps::{HashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use portcullis_common::{
    DeviceKey, DeviceRuleSet, IdentityConfig, InodeKey, InodeRuleSet, MAP_DEVICE_RULES,
    MAP_EXEC_RULES, MAP_FILE_RULES, MAP_IDENTITIES, MAP_IDENTITY_CFG, MAP_NET_RULES, MAP_ONLY_FROM,
    NET_KEY_DATA_LEN, NetRuleSet,
};

use crate::{compile::Compiled, hook_barrier::HookBarrier};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// The flip failed after `flipped` cgroups; they were pointed back at
    /// their old identities, so the old generation is whole again. The new
    /// generation's rules are still in the maps: retire them like a replaced
    /// generation (after the grace period, since a hook may have read a new
    /// identity before the undo).
    #[error(
        "map {MAP_IDENTITIES} refused cgroup {cgroup} ({flipped} of {total} cgroups flipped, then undone)"
    )]
    Flip {
        cgroup: u64,
        flipped: usize,
        total: usize,
        #[source]
        source: MapError,
    },
}

type NetKey = [u8; NET_KEY_DATA_LEN];

/// The policy maps, taken out of the loaded object and owned by the one task
/// that applies policy.
pub struct PolicyMaps {
    identities: HashMap<MapData, u64, u32>,
    identity_cfg: HashMap<MapData, u32, IdentityConfig>,
    net: LpmTrie<MapData, NetKey, NetRuleSet>,
    exec: HashMap<MapData, InodeKey, InodeRuleSet>,
    files: HashMap<MapData, InodeKey, InodeRuleSet>,
    only_from: HashMap<MapData, InodeKey, u32>,
    devices: HashMap<MapData, DeviceKey, DeviceRuleSet>,
    /// `None` where the kernel refused the barrier's maps: deletions then
    /// rely on the grace period alone (logged at start).
    barrier: Option<HookBarrier>,
    /// A cgroup was pointed at another identity since the last wait.
    repointed: bool,
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, MapsError> {
    let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
    T::try_from(map).map_err(|source| MapsError::Map { name, source })
}

fn err(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// Inserts the `new` entries that `old` (what the kernel holds) lacks or
/// holds with another value, and returns the keys it added. On failure it
/// removes those again and returns the error. An entry already there with
/// the same value is not rewritten: the kernel recycles a replaced element
/// of a preallocated hash map at once, under any hook still reading it.
/// (Live entries never change value: each generation has its own identity
/// numbers, which every key carries.)
fn insert_all<K: Pod + Ord + Hash, V: Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    new: impl IntoIterator<Item = (K, V)>,
    old: &dyn Fn(&K) -> Option<V>,
) -> Result<Vec<K>, MapsError> {
    let mut added = Vec::new();
    for (k, v) in new {
        let before = old(&k);
        if before == Some(v) {
            continue;
        }
        if let Err(e) = map.insert(k, v, 0) {
            for k in &added {
                let _ = map.remove(k);
            }
            return Err(err(name)(e));
        }
        if before.is_none() {
            added.push(k);
        }
    }
    Ok(added)
}

impl PolicyMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            identities: take(ebpf, MAP_IDENTITIES)?,
            identity_cfg: take(ebpf, MAP_IDENTITY_CFG)?,
            net: take(ebpf, MAP_NET_RULES)?,
            exec: take(ebpf, MAP_EXEC_RULES)?,
            files: take(ebpf, MAP_FILE_RULES)?,
            only_from: take(ebpf, MAP_ONLY_FROM)?,
            devices: take(ebpf, MAP_DEVICE_RULES)?,
            barrier: HookBarrier::new()
                .inspect_err(|e| {
                    tracing::warn!(
                        error = %e,
                        "the kernel refused the hook barrier's array of maps: replaced rules are \
                         deleted after the grace period alone, which a preempted hook can outlast"
                    )
                })
                .ok(),
            repointed: false,
        })
    }

    /// Puts generation `new` in force in place of `old` (what the kernel
    /// holds now, if anything). `old`'s rules stay in the maps until
    /// [`PolicyMaps::retire`]. See the module docs for the ordering.
    pub fn apply(&mut self, old: Option<&Compiled>, new: &Compiled) -> Result<(), MapsError> {
        let empty = Compiled::default();
        let old = old.unwrap_or(&empty);
        let mut undo = Undo::default();
        if let Err(e) = self.write_rules(old, new, &mut undo) {
            self.rollback(&undo);
            return Err(e);
        }
        // The flip: one update per cgroup. An update of a key already there
        // never fails for room (the kernel keeps spare elements for that), so
        // undoing the cgroups flipped so far cannot fail for a full map.
        let mut flipped = Vec::new();
        self.repointed = true;
        for (&cg, &id) in &new.cgroups {
            if let Err(source) = self.identities.insert(cg, id, 0) {
                for cg in &flipped {
                    match old.cgroups.get(cg) {
                        Some(id) => {
                            let _ = self.identities.insert(*cg, *id, 0);
                        }
                        None => {
                            let _ = self.identities.remove(cg);
                        }
                    }
                }
                return Err(MapsError::Flip {
                    cgroup: cg,
                    flipped: flipped.len(),
                    total: new.cgroups.len(),
                    source,
                });
            }
            flipped.push(cg);
        }
        for cg in old
            .cgroups
            .keys()
            .filter(|cg| !new.cgroups.contains_key(cg))
        {
            let _ = self.identities.remove(cg);
        }
        Ok(())
    }

    /// Deletes the rules of a generation no cgroup points at any more,
    /// keeping any entry `live` (the generation in force) also has, once no
    /// hook that may have read one of its identities is still running.
    /// Failures leave only unreachable entries.
    pub fn retire(&mut self, old: &Compiled, new: &Compiled) {
        self.wait_for_hooks();
        for id in old
            .identity_cfg
            .keys()
            .filter(|k| !new.identity_cfg.contains_key(k))
        {
            let _ = self.identity_cfg.remove(id);
        }
        for k in old.exec.keys().filter(|k| !new.exec.contains_key(k)) {
            let _ = self.exec.remove(k);
        }
        for k in old.files.keys().filter(|k| !new.files.contains_key(k)) {
            let _ = self.files.remove(k);
        }
        for k in old.only_from.difference(&new.only_from) {
            let _ = self.only_from.remove(k);
        }
        for k in old.devices.keys().filter(|k| !new.devices.contains_key(k)) {
            let _ = self.devices.remove(k);
        }
        for (len, data) in old.net.keys().filter(|k| !new.net.contains_key(k)) {
            let _ = self.net.remove(&Key::new(*len, *data));
        }
    }

    /// What the maps hold now (keys and values, no names): the policy an
    /// earlier agent instance left in pinned maps, to be replaced and retired
    /// like any old generation.
    pub fn snapshot(&self) -> Compiled {
        Compiled {
            cgroups: self.identities.iter().filter_map(Result::ok).collect(),
            identity_cfg: self.identity_cfg.iter().filter_map(Result::ok).collect(),
            exec: Arc::new(self.exec.iter().filter_map(Result::ok).collect()),
            files: Arc::new(self.files.iter().filter_map(Result::ok).collect()),
            only_from: Arc::new(self.only_from.keys().filter_map(Result::ok).collect()),
            devices: Arc::new(self.devices.iter().filter_map(Result::ok).collect()),
            net: Arc::new(
                self.net
                    .iter()
                    .filter_map(Result::ok)
                    .map(|(k, v)| ((k.prefix_len(), k.data()), v))
                    .collect(),
            ),
            ..Compiled::default()
        }
    }

    fn write_rules(
        &mut self,
        old: &Compiled,
        new: &Compiled,
        undo: &mut Undo,
    ) -> Result<(), MapsError> {
        undo.only_from = insert_all(
            &mut self.only_from,
            MAP_ONLY_FROM,
            new.only_from.iter().map(|k| (*k, 1u32)),
            &|k| old.only_from.contains(k).then_some(1),
        )?;
        undo.exec = insert_all(
            &mut self.exec,
            MAP_EXEC_RULES,
            new.exec.iter().map(|(k, v)| (*k, *v)),
            &|k| old.exec.get(k).copied(),
        )?;
        undo.files = insert_all(
            &mut self.files,
            MAP_FILE_RULES,
            new.files.iter().map(|(k, v)| (*k, *v)),
            &|k| old.files.get(k).copied(),
        )?;
        undo.devices = insert_all(
            &mut self.devices,
            MAP_DEVICE_RULES,
            new.devices.iter().map(|(k, v)| (*k, *v)),
            &|k| old.devices.get(k).copied(),
        )?;
        for (&(len, data), v) in new.net.iter() {
            if old.net.get(&(len, data)) == Some(v) {
                continue;
            }
            self.net
                .insert(&Key::new(len, data), *v, 0)
                .map_err(err(MAP_NET_RULES))?;
            if !old.net.contains_key(&(len, data)) {
                undo.net.insert((len, data));
            }
        }
        undo.identity_cfg = insert_all(
            &mut self.identity_cfg,
            MAP_IDENTITY_CFG,
            new.identity_cfg.iter().map(|(k, v)| (*k, *v)),
            &|k| old.identity_cfg.get(k).copied(),
        )?;
        Ok(())
    }

    fn rollback(&mut self, undo: &Undo) {
        for k in &undo.only_from {
            let _ = self.only_from.remove(k);
        }
        for k in &undo.exec {
            let _ = self.exec.remove(k);
        }
        for k in &undo.files {
            let _ = self.files.remove(k);
        }
        for k in &undo.devices {
            let _ = self.devices.remove(k);
        }
        for (len, data) in &undo.net {
            let _ = self.net.remove(&Key::new(*len, *data));
        }
        for k in &undo.identity_cfg {
            let _ = self.identity_cfg.remove(k);
        }
    }

    /// Waits for the hooks running since a cgroup was last repointed (none
    /// since the last wait: nothing to wait for).
    fn wait_for_hooks(&mut self) {
        if !std::mem::take(&mut self.repointed) {
            return;
        }
        if let Some(Err(e)) = self.barrier.as_ref().map(HookBarrier::wait) {
            tracing::warn!(error = %e, "hook barrier failed; deleting after the grace period alone");
        }
    }

    /// Drops a removed cgroup's mapping (its id is never reused, so this only
    /// frees the map slot).
    pub fn remove_cgroup(&mut self, cgroup_id: u64) {
        let _ = self.identities.remove(&cgroup_id);
    }

    /// Points one cgroup at an identity (a cgroup created since the last
    /// full apply).
    pub fn set_cgroup(&mut self, cgroup_id: u64, identity: u32) -> Result<(), MapsError> {
        self.repointed = true;
        self.identities
            .insert(cgroup_id, identity, 0)
            .map_err(err(MAP_IDENTITIES))
    }

    /// Writes the rules and config of identities `new` has and `old` lacks
    /// (used when a new cgroup brings a policy set not seen before).
    pub fn add_identities(&mut self, old: &Compiled, new: &Compiled) -> Result<(), MapsError> {
        let mut undo = Undo::default();
        let r = self.write_rules(old, new, &mut undo);
        if r.is_err() {
            self.rollback(&undo);
        }
        r
    }
}

/// Keys a failed write added, to remove again.
#[derive(Default)]
struct Undo {
    only_from: Vec<InodeKey>,
    exec: Vec<InodeKey>,
    files: Vec<InodeKey>,
    devices: Vec<DeviceKey>,
    net: BTreeSet<(u32, NetKey)>,
    identity_cfg: Vec<u32>,
}
