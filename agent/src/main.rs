//! `portcullis`: the agent daemon and its CLI.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use portcullis::{chain, daemon, explain, pin, pod, policy, policy_test, trail};

mod cli_explain;

#[derive(Parser)]
#[command(version, about = "Host access enforcement for Linux workloads (eBPF)")]
struct Cli {
    /// Diagnostic log format (on stderr). Decisions always go out as JSON.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load the kernel programs and enforce the given policies.
    Run {
        /// Policy file or directory of *.yaml files (repeatable).
        #[arg(long = "policy", short = 'p', required = true)]
        policies: Vec<PathBuf>,
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, default_value = "127.0.0.1:9090")]
        metrics_addr: SocketAddr,
        /// Append decisions (JSON lines) to this file instead of stdout.
        #[arg(long)]
        decisions_file: Option<PathBuf>,
        /// Rotate the decisions file when it would exceed this many bytes
        /// (0: never).
        #[arg(long, default_value_t = 100 << 20)]
        decisions_max_bytes: u64,
        /// Rotated decision files to keep (FILE.1 .. FILE.N).
        #[arg(long, default_value_t = 5)]
        decisions_keep: u32,
        /// Where the name tables of recent policy generations are kept, so
        /// events an earlier instance left in the pinned ring buffer are
        /// named by the generation that decided them. Default: beside the
        /// decisions file (`FILE.generations`); none when logging to stdout.
        #[arg(long)]
        generations_dir: Option<PathBuf>,
        /// procfs the node's device classes are read from (GPUs, dynamic
        /// majors); a stand-in tree for tests.
        #[arg(long, default_value = "/proc", hide = true)]
        host_proc: PathBuf,
        /// Sign the chain head with this ed25519 key (from `portcullis
        /// keygen`) in checkpoint lines of the trail. Keep it where governed
        /// workloads cannot read it (a Secret mounted into the agent only).
        #[arg(long)]
        trail_key: Option<PathBuf>,
        /// Checkpoint after this many lines.
        #[arg(long, default_value_t = 1000)]
        checkpoint_lines: u64,
        /// Checkpoint after this many seconds when lines were written since.
        #[arg(long, default_value_t = 10.0)]
        checkpoint_interval: f64,
        /// Capacity of one policy map, `MAP=N` (repeatable; MAP as in the
        /// `portcullis_map_capacity` metric, e.g. `identities=131072`).
        #[arg(long = "map-capacity", value_name = "MAP=N")]
        map_capacity: Vec<String>,
        /// Use the tracepoint backends even where BPF-LSM is available.
        #[arg(long)]
        force_fallback: bool,
        /// Refuse to start when connect, exec or open cannot be enforced on
        /// any backend. Without it the agent enforces what loaded and
        /// reports the gap (log ERROR, /readyz 503, backend="none").
        #[arg(long)]
        require_hooks: bool,
        /// Treat this program as refused by the kernel (repeatable): how
        /// the tests exercise degraded mode. Not for production use.
        #[arg(long, hide = true)]
        test_refuse_program: Vec<String>,
        /// Seconds between checks of the policy files for changes.
        #[arg(long, default_value_t = 1.0)]
        watch_interval: f64,
        /// Seconds between full rescans of the cgroup tree.
        #[arg(long, default_value_t = 5.0)]
        rescan_interval: f64,
        /// bpffs directory where programs' links and the policy maps are
        /// pinned, so enforcement outlives the agent and a restart adopts it.
        #[arg(long, default_value = pin::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Pin nothing: programs detach when the agent exits.
        #[arg(long, conflicts_with = "detach_on_exit")]
        no_pin: bool,
        /// Remove the pins on exit (SIGINT/SIGTERM), so enforcement stops with
        /// the agent. A crash (SIGKILL) still leaves the last policy enforced.
        #[arg(long)]
        detach_on_exit: bool,
        /// CRI runtime socket for pod metadata (namespace, labels, container
        /// names); pod selectors need it. Unreachable: logged once, cgroups
        /// are classified by path only.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        cri_socket: PathBuf,
        /// Do not ask a CRI runtime: pod selectors match nothing.
        #[arg(long)]
        no_cri: bool,
        /// The kubelet's root directory (service account tokens of pods).
        #[arg(long, default_value = "/var/lib/kubelet")]
        kubelet_root: PathBuf,
    },
    /// Check the hash chain of decision log files (oldest first, e.g.
    /// `F.2 F.1 F`); names the first modified, removed or inserted line.
    VerifyLog {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also check every signed checkpoint against this public key
        /// (`KEY.pub` from `portcullis keygen`); fails without one.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// With --public-key: fail when lines follow the last checkpoint
        /// (by default they are reported; a trail of a stopped agent ends
        /// signed, a running agent's has up to --checkpoint-lines or
        /// --checkpoint-interval of unsigned lines).
        #[arg(long, requires = "public_key")]
        require_signed_tail: bool,
    },
    /// Make an ed25519 key for signing trail checkpoints: the key at OUT
    /// (mode 0600, for `run --trail-key`) and its public key at OUT.pub (for
    /// `verify-log --public-key`).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Remove everything the agent pinned: programs detach, enforcement stops.
    Uninstall {
        /// The pin directory the agent ran with.
        #[arg(long, default_value = pin::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Run policy test files (kind PolicyTest) against the policies they
    /// name, with the kernel's decision logic on the host; exits 1 when a
    /// case fails or a file is invalid.
    Test {
        /// Test files or directories of *.yaml test files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Also write the results as JUnit XML to this file.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Also write the results (and the uncovered rules) as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// List the rules that matched no case.
        #[arg(long)]
        coverage: bool,
    },
    /// Say how the given policies decide one request, or each decision-log
    /// line read from --log (`-`: stdin): the identity, the policies that
    /// select it, every rule that matched and why the verdict is what it is.
    Explain {
        #[arg(long = "policy", short = 'p', required = true)]
        policies: Vec<PathBuf>,
        /// Decision-log lines to explain (a file, or - for stdin).
        #[arg(long, conflicts_with_all = ["exec", "open", "connect", "device", "socket"])]
        log: Option<PathBuf>,
        /// The cgroup v2 path of the acting task.
        #[arg(long, default_value = "/")]
        cgroup: String,
        #[arg(long, default_value_t = 0)]
        uid: u32,
        /// The acting executable (for onlyFrom).
        #[arg(long, default_value = "")]
        exe: String,
        #[arg(long, value_name = "PATH")]
        exec: Option<String>,
        #[arg(long, value_name = "PATH")]
        open: Option<String>,
        /// A device open or mknod: `c MAJOR:MINOR` or `b MAJOR:MINOR`.
        #[arg(long, value_name = "DEVICE")]
        device: Option<String>,
        /// A socket of a kind beyond TCP and UDP: `raw`, `icmp`,
        /// `inet-other` (optionally `/inet6`: `raw/inet6`) or `packet`.
        #[arg(long, value_name = "KIND")]
        socket: Option<String>,
        /// With --open: read, write or read_write; with --device also mknod.
        #[arg(long, default_value = "read")]
        access: String,
        #[arg(long, value_name = "IP:PORT")]
        connect: Option<String>,
        /// With --connect: UDP instead of TCP.
        #[arg(long)]
        udp: bool,
        #[arg(long)]
        json: bool,
    },
    /// Decide every line of decision logs again under candidate policies and
    /// report what would change; exits 1 when anything would.
    Replay {
        #[arg(long = "policy", short = 'p', required = true)]
        policies: Vec<PathBuf>,
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON Schema of a document kind, for editors (the YAML
    /// language server) and CI (the repository's `schemas/` holds both).
    Schema {
        #[arg(value_enum)]
        kind: SchemaKind,
    },
    /// Check policy files; print every error with file, line, column and field.
    Validate {
        /// Policy files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum SchemaKind {
    HostPolicy,
    PolicyTest,
}

/// Where a verified trail starts.
fn anchored(first_seq: u64) -> String {
    if first_seq <= 1 {
        "from the first line".to_owned()
    } else {
        format!("anchored at seq {first_seq}")
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: escape codes in files break log shippers.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Test {
            paths,
            junit,
            json,
            coverage,
        } => policy_test::cli(&paths, junit.as_deref(), json.as_deref(), coverage),
        Command::Explain {
            policies,
            log,
            cgroup,
            uid,
            exe,
            exec,
            open,
            access,
            connect,
            device,
            socket,
            udp,
            json,
        } => {
            let mut given = [
                ("exec", exec),
                ("open", open),
                ("connect", connect),
                ("device", device),
                ("socket", socket),
            ]
            .into_iter()
            .filter_map(|(action, target)| Some((action, target?)));
            let request = given.next();
            if given.next().is_some() {
                eprintln!("give one of --exec, --open, --connect, --device and --socket");
                return ExitCode::FAILURE;
            }
            let one = request.map(|(action, target)| {
                explain::Request::from_args(action, &cgroup, uid, &exe, &target, &access, udp)
            });
            cli_explain::explain(&policies, log.as_deref(), one, json)
        }
        Command::Replay {
            policies,
            files,
            json,
        } => cli_explain::replay(&policies, &files, json),
        Command::Schema { kind } => {
            print!(
                "{}",
                match kind {
                    SchemaKind::HostPolicy => policy::schema::host_policy(),
                    SchemaKind::PolicyTest => policy_test::schema(),
                }
            );
            ExitCode::SUCCESS
        }
        Command::Validate { paths } => match policy::load_paths(&paths) {
            Ok(policies) => {
                println!("ok: {} valid policies", policies.len());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in &errors {
                    eprintln!("{e}");
                }
                eprintln!("{} error(s)", errors.len());
                ExitCode::FAILURE
            }
        },
        Command::VerifyLog {
            files,
            public_key: None,
            ..
        } => match chain::verify(&files) {
            Ok((lines, first)) => {
                println!(
                    "ok: {lines} lines, chain intact ({}); checkpoints not checked: give --public-key to tell a recomputed chain from the agent's",
                    anchored(first)
                );
                ExitCode::SUCCESS
            }
            Err((file, e)) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::FAILURE
            }
        },
        Command::VerifyLog {
            files,
            public_key: Some(key),
            require_signed_tail,
        } => {
            let key = match trail::load_public(&key) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("portcullis verify-log: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match trail::verify(&files, &key) {
                Ok(s) if s.checkpoints == 0 => {
                    eprintln!(
                        "{} lines, chain intact, but no checkpoint signed by this key: nothing proves the agent wrote them",
                        s.lines
                    );
                    ExitCode::FAILURE
                }
                Ok(s) if require_signed_tail && s.unsigned > 0 => {
                    eprintln!(
                        "{} lines, chain intact, signed up to seq {}, but {} lines after the last checkpoint are not signed (--require-signed-tail)",
                        s.lines, s.covered_seq, s.unsigned
                    );
                    ExitCode::FAILURE
                }
                Ok(s) => {
                    if s.first_unchecked {
                        println!(
                            "note: the first line (seq {}) is taken as given: the lines before it are not among the files and it is no checkpoint; give the older files to check it",
                            s.first_seq
                        );
                    }
                    println!(
                        "ok: {} lines, chain intact ({}), {} checkpoints signed by this key; signed up to seq {} ({} lines covered), {} lines after it not signed yet",
                        s.lines,
                        anchored(s.first_seq),
                        s.checkpoints,
                        s.covered_seq,
                        s.covered_lines,
                        s.unsigned
                    );
                    ExitCode::SUCCESS
                }
                Err((file, e)) => {
                    eprintln!("{}: {e}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Keygen { out } => match trail::keygen(&out) {
            Ok(public) => {
                println!(
                    "wrote the signing key to {} (mode 0600) and the public key {public} to {}.pub",
                    out.display(),
                    out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("portcullis keygen: {:#}", anyhow::Error::from(e));
                ExitCode::FAILURE
            }
        },
        Command::Uninstall { pin_dir } => match pin::uninstall(&pin_dir) {
            Ok(n) => {
                println!(
                    "removed {n} pins under {}; enforcement stopped",
                    pin_dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("portcullis uninstall: {:#}", anyhow::Error::from(e));
                ExitCode::FAILURE
            }
        },
        Command::Run {
            policies,
            metrics_addr,
            decisions_file,
            decisions_max_bytes,
            decisions_keep,
            generations_dir,
            map_capacity,
            trail_key,
            checkpoint_lines,
            checkpoint_interval,
            host_proc,
            force_fallback,
            require_hooks,
            test_refuse_program,
            watch_interval,
            rescan_interval,
            pin_dir,
            no_pin,
            detach_on_exit,
            cri_socket,
            no_cri,
            kubelet_root,
        } => {
            init_logging(cli.log_format);
            let generations_dir = generations_dir.or_else(|| {
                decisions_file.as_ref().map(|f| {
                    let mut dir = f.clone().into_os_string();
                    dir.push(".generations");
                    PathBuf::from(dir)
                })
            });
            let mut map_sizes = portcullis::loader::MapSizes::default();
            for spec in &map_capacity {
                if let Err(e) = map_sizes.set(spec) {
                    eprintln!("portcullis run: --map-capacity {e}");
                    return ExitCode::from(2);
                }
            }
            let cfg = daemon::Config {
                policy_paths: policies,
                metrics_addr,
                decisions_file,
                decisions_rotation: portcullis::events::Rotation {
                    max_bytes: decisions_max_bytes,
                    keep: decisions_keep,
                },
                generations_dir,
                map_sizes,
                trail: trail_key.map(|key| daemon::TrailConfig {
                    key,
                    every_lines: checkpoint_lines,
                    every: Duration::from_secs_f64(checkpoint_interval.max(0.1)),
                }),
                host_proc,
                force_fallback,
                require_hooks,
                refuse_programs: test_refuse_program,
                watch_interval: Duration::from_secs_f64(watch_interval.max(0.05)),
                rescan_interval: Duration::from_secs_f64(rescan_interval.max(0.05)),
                pin_dir: (!no_pin).then_some(pin_dir),
                detach_on_exit,
                pods: pod::ResolverConfig {
                    cri_socket: (!no_cri).then_some(cri_socket),
                    kubelet_root,
                    ..Default::default()
                },
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("portcullis: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(daemon::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{:#}", anyhow::Error::from(e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}
