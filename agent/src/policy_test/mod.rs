//! `portcullis test`: policy test files run against the policies they name,
//! decided by the host evaluator (`crate::evaluate`), which runs the
//! kernel's own combining code over the compiled map contents.
//!
//! Paths are resolved in a fixture, not on the machine running the tests:
//! each test file gets a fresh temporary directory standing for `/`, holding
//! every path its cases name (exec targets, opened files, workload
//! executables) and the file's `fixture` list. Policy globs are resolved
//! under it exactly as the agent resolves them under `/`. So a test means
//! the same in CI, on a laptop and on the node, and a case that needs a
//! glob to match a file names that file.

mod file;
mod report;

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

pub use file::{Case, Expect, KIND, Request, TestFile, schema};
pub use report::{CaseResult, Report, verdict_name};

use portcullis_common::{ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE};

use crate::{
    compile::{self, CgroupInfo, Compiled, Numbering, kernel_dev},
    evaluate::{self, Outcome},
    node_devices::DevNum,
    pod::{ContainerMetadata, Lookup, PodMetadata, allocated::AllocatedDevice},
    policy::{self, PolicyError},
};

/// Runs every test file in `paths` (files, or directories of `*.yaml`
/// files). Errors in a test file or in a policy it names are returned, all
/// of them, with file, line and field; nothing is then run.
pub fn run(paths: &[PathBuf]) -> Result<Report, Vec<PolicyError>> {
    let mut report = Report::default();
    let mut errors = Vec::new();
    for path in test_files(paths).map_err(|e| vec![e])? {
        match run_file(&path) {
            Ok((results, rules, decided)) => {
                report.cases.extend(results);
                report.rules.extend(rules);
                report.decided.extend(decided);
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(report)
    } else {
        Err(errors)
    }
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> PolicyError {
    PolicyError {
        file: path.to_owned(),
        line: 0,
        column: 0,
        field: "file".into(),
        message: e.to_string(),
    }
}

fn test_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PolicyError> {
    let mut out = Vec::new();
    for p in paths {
        if !p.is_dir() {
            out.push(p.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = fs::read_dir(p)
            .map_err(|e| io_error(p, e))?
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|f| {
                let name = f.file_name().unwrap_or_default().to_string_lossy();
                !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
            })
            .collect();
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// `(policy, rule)` of every rule compiled.
type RuleNames = BTreeSet<(String, String)>;

fn run_file(path: &Path) -> Result<(Vec<CaseResult>, RuleNames, RuleNames), Vec<PolicyError>> {
    let text = fs::read_to_string(path).map_err(|e| vec![io_error(path, e)])?;
    let t = file::parse(path, &text)?;
    let policies = policy::load_paths(&t.policies)?;
    let fixture = Fixture::new(&t).map_err(|e| vec![io_error(path, e)])?;
    let cgroups: Vec<CgroupInfo> = t.cases.iter().enumerate().map(cgroup_of).collect();
    let node = Arc::new(
        t.node_proc
            .as_deref()
            .map(crate::node_devices::NodeDevices::discover)
            .unwrap_or_default(),
    );
    let compiled =
        compile::compile_under(&policies, &cgroups, Numbering::OFFLINE, node, &fixture.root)
            .map_err(|e| vec![io_error(path, e)])?;
    let mut decided = RuleNames::new();
    let mut results = Vec::new();
    for (i, case) in t.cases.iter().enumerate() {
        let got =
            decide(&compiled, &fixture, i as u64 + 1, case).map_err(|e| vec![io_error(path, e)])?;
        decided.extend(got.matched.iter().cloned());
        results.push(CaseResult::new(path, case, got));
    }
    let rules = compiled
        .rules
        .iter()
        .skip(1)
        .map(|r| (r.policy.clone(), r.rule.clone()))
        .collect();
    Ok((results, rules, decided))
}

/// Case `i`'s workload as the agent would see its cgroup (`id` i + 1).
fn cgroup_of((i, case): (usize, &Case)) -> CgroupInfo {
    let w = &case.workload;
    let mut cg = CgroupInfo::new(i as u64 + 1, w.cgroup.clone());
    if let Some(p) = &w.pod {
        cg.pod = Lookup::Known(Arc::new(PodMetadata {
            uid: String::new(),
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            labels: p.labels.clone(),
            service_account: p.service_account.clone(),
            container: p.container.as_ref().map(|name| ContainerMetadata {
                id: String::new(),
                name: name.clone(),
                image: String::new(),
                allocated: p
                    .allocated_devices
                    .iter()
                    .filter_map(|d| allocated(d))
                    .collect(),
            }),
            provisional: false,
        }));
    }
    cg
}

/// A device number a workload states as allocated (validated when the
/// file was read).
fn allocated(device: &str) -> Option<AllocatedDevice> {
    let (kind, major, minor) = crate::evaluate::parse_device(device)?;
    Some(AllocatedDevice {
        host_path: String::new(),
        number: Some(DevNum {
            block: kind == portcullis_common::DEVICE_BLOCK,
            major,
            minor: Some(minor),
        }),
        access: ACCESS_READ | ACCESS_WRITE | ACCESS_MKNOD,
    })
}

fn decide(c: &Compiled, fx: &Fixture, cgroup_id: u64, case: &Case) -> std::io::Result<Outcome> {
    let exe = match &case.workload.exe {
        Some(p) => fx.inode(p)?,
        None => (0, 0),
    };
    let action = case.request.try_map_path(|p| fx.levels(p))?;
    Ok(evaluate::evaluate(
        c,
        cgroup_id,
        case.workload.uid,
        exe,
        &action,
    ))
}

/// A temporary directory standing for `/`; removed when dropped.
struct Fixture {
    root: PathBuf,
}

impl Fixture {
    fn new(t: &TestFile) -> std::io::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("portcullis-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        let fx = Self { root };
        let mut files: BTreeSet<&str> = BTreeSet::new();
        let mut dirs: BTreeSet<&str> = BTreeSet::new();
        for f in &t.fixture {
            match f.strip_suffix('/') {
                Some(d) => dirs.insert(d),
                None => files.insert(f),
            };
        }
        for c in &t.cases {
            if let Some(path) = c.request.path() {
                files.insert(path);
            }
            if let Some(e) = &c.workload.exe {
                files.insert(e);
            }
        }
        for d in dirs {
            fs::create_dir_all(fx.at(d))?;
        }
        for f in files {
            let p = fx.at(f);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).map_err(|e| {
                    std::io::Error::other(format!("fixture: {f} needs a directory above it: {e}"))
                })?;
            }
            if !p.is_file() {
                fs::File::create(&p)
                    .map_err(|e| std::io::Error::other(format!("fixture: {f}: {e}")))?;
            }
        }
        Ok(fx)
    }

    fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn inode(&self, path: &str) -> std::io::Result<(u32, u64)> {
        let m = fs::metadata(self.at(path))?;
        Ok((kernel_dev(m.dev()), m.ino()))
    }

    /// The walk's levels from `path` up to the fixture root, which stands
    /// for the filesystem root where the kernel's walk ends.
    fn levels(&self, path: &str) -> std::io::Result<Vec<(u32, u64)>> {
        let mut out = evaluate::levels(&self.at(path))?;
        let root = self.inode("/")?;
        if let Some(i) = out.iter().position(|l| *l == root) {
            out.truncate(i + 1);
        }
        Ok(out)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// The `portcullis test` command: failures and the summary on stdout,
/// errors on stderr, reports where asked.
pub fn cli(
    paths: &[PathBuf],
    junit: Option<&Path>,
    json: Option<&Path>,
    coverage: bool,
) -> std::process::ExitCode {
    let report = match run(paths) {
        Ok(r) => r,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("{} error(s): no case was run", errors.len());
            return std::process::ExitCode::FAILURE;
        }
    };
    let uncovered = uncovered(&report);
    print!("{}", report.text());
    if coverage {
        println!("{} rule(s) matched no case:", uncovered.len());
        for u in &uncovered {
            println!("  {u}");
        }
    }
    let writes = [
        junit.map(|p| (p, report.junit())),
        json.map(|p| (p, report.json(&uncovered))),
    ];
    for (path, text) in writes.into_iter().flatten() {
        if let Err(e) = fs::write(path, text) {
            eprintln!("{}: {e}", path.display());
            return std::process::ExitCode::FAILURE;
        }
    }
    if report.failed() == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Rules of the policies a run loaded that matched no case, as
/// `policy: rule`.
pub fn uncovered(report: &Report) -> Vec<String> {
    report
        .rules
        .difference(&report.decided)
        .map(|(p, r)| format!("{p}: {r}"))
        .collect()
}
