//! The `blkrep` command line: the CLI edge (anyhow lives only here).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use blkrep::config::{Config, DEFAULT_CONFIG_PATH};
use blkrep::control::{self, ErrorCode, Request, Response};

/// Exit status when the daemon cannot be reached.
const EXIT_NO_DAEMON: u8 = 8;
/// Exit status when this user may not use the control socket.
const EXIT_FORBIDDEN: u8 = 10;

#[derive(Parser)]
#[command(
    name = "blkrep",
    version,
    about = "Userspace synchronous block replication: DRBD's job without a kernel module",
    after_help = "Exit status: 0 done, 1 failed, 2 bad request or usage, 3 not attached, \
4 outdated (local data not up to date), 5 no quorum, 6 peer still primary, \
7 diverged histories, 8 daemon not reachable, 9 busy (the export is in use), \
10 not allowed to use the control socket."
)]
struct Cli {
    /// Node configuration file.
    #[arg(long, short, global = true, env = "BLKREP_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Log filter: error, warn, info, debug, trace, or per module
    /// (`blkrep::link=debug,info`).
    #[arg(long, global = true, env = "BLKREP_LOG", default_value = "info")]
    log_level: String,
    /// Append the log to this file instead of stderr (daemon and witness
    /// log to stderr by default, which systemd sends to the journal).
    #[arg(long, global = true, env = "BLKREP_LOG_FILE")]
    log_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a cluster CA or issue node certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Write fresh metadata for a volume on this node's backing disk.
    CreateMd {
        /// Volume name.
        volume: String,
        /// Overwrite existing metadata or a disk that looks in use.
        #[arg(long)]
        force: bool,
    },
    /// Run the node agent (one per node; systemd service).
    Daemon,
    /// Run the witness (on a third machine; --config names its own file).
    Witness,
    /// Resolve a split brain on the node whose changes are to be thrown
    /// away: its copy is overwritten by a full resync from the peer.
    Resolve {
        /// Volume name.
        volume: String,
        /// Required: say that this node's changes are discarded.
        #[arg(long, required = true)]
        discard_local: bool,
    },
    /// Bring a volume up on this node (as secondary).
    Attach {
        /// Volume name.
        volume: String,
    },
    /// Take a volume down on this node (a primary demotes first, telling
    /// the peer and the witness; refused while the export is in use, as
    /// `demote` is).
    Detach {
        /// Volume name.
        volume: String,
        /// Disconnect the export's users (NBD clients, holders of the ublk
        /// device) instead of refusing while they are there.
        #[arg(long)]
        force: bool,
    },
    /// Make this node the writer and export the volume here (the failover
    /// hook; with a witness it needs the witness's consent). A copy still
    /// being resynced may be promoted while its up-to-date source is
    /// connected: it serves through the source until it is complete.
    #[command(visible_alias = "promote")]
    Primary {
        /// Volume name.
        volume: String,
        /// Promote a copy that is not known to be up to date (the first
        /// primary of a new volume needs this). Only for a peer lost for
        /// good: it starts a new data history marked forced; whatever this
        /// copy lacks is gone from the volume, and if the other copy returns
        /// both refuse to sync (split brain) until `resolve` picks the copy
        /// to discard.
        #[arg(long)]
        force: bool,
    },
    /// Stop being the writer on this node (returns once the witness, if
    /// any, recorded it). Refused (exit 9) while the export is in use: an
    /// NBD client connected, the ublk device mounted or held open
    /// exclusively.
    #[command(visible_alias = "demote")]
    Secondary {
        /// Volume name.
        volume: String,
        /// Disconnect the export's users (NBD clients, holders of the ublk
        /// device) instead of refusing while they are there.
        #[arg(long)]
        force: bool,
    },
    /// Show role, disk and peer state, export, resync progress.
    Status {
        /// Only this volume.
        volume: Option<String>,
        /// Print the stable JSON report instead of text.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Keep watching VOLUME: a live progress bar on a terminal, one
        /// plain line per interval otherwise.
        #[arg(long, requires = "volume")]
        watch: bool,
        /// Update interval for --watch.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Stop --watch after this many updates (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Compare every chunk with the peer's copy while the volume is in use;
    /// differing chunks are reported and marked out of sync.
    Verify {
        /// Volume name.
        volume: String,
    },
    /// Copy the chunks marked out of sync to the peer.
    Resync {
        /// Volume name.
        volume: String,
        /// Exchange digests first and send only chunks that differ.
        #[arg(long)]
        checksum: bool,
    },
    /// Set up a throw-away two-node cluster on loopback, replicate a verified
    /// write through NBD, and compare both copies.
    Demo(blkrep::demo::DemoArgs),
    /// Benchmark the replicated volume against the raw backing disk.
    Bench(blkrep::bench::BenchArgs),
    /// Test and drill helpers.
    #[command(subcommand)]
    Debug(DebugCommand),
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create a cluster CA (ca.pem, ca.key) in DIR.
    Ca {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a certificate for NODE signed by the CA.
    Issue {
        /// Node name (as in the config's [nodes]).
        node: String,
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// Output directory (NODE.pem, NODE.key).
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650, allow_negative_numbers = true)]
        days: i64,
    },
}

#[derive(Subcommand)]
enum DebugCommand {
    /// Make the local disk of VOLUME fail every I/O (needs
    /// `debug.fault_injection = true` in the config).
    FailDisk {
        /// Volume name.
        volume: String,
    },
    /// Tear the next local write (of at least 8 KiB) of VOLUME as a power
    /// cut would: half of it reaches the disk, it never completes (needs
    /// `debug.fault_injection = true`).
    TearWrite {
        /// Volume name.
        volume: String,
    },
    /// Cut this node's power (drills: needs `debug.fault_injection` and
    /// `debug.volatile_cache`): every volume keeps a seeded subset of the
    /// writes no flush covered, and the daemon ends at once.
    PowerCut {
        /// Seeds which unflushed writes survive.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Make every local write of VOLUME wait DELAY_MS first (0: normal
    /// again; needs `debug.fault_injection = true`).
    SlowDisk {
        /// Volume name.
        volume: String,
        /// Added latency per write in milliseconds.
        #[arg(long)]
        delay_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Daemon) {
        // A CLI whose output is piped into `head` or `grep -q` should end
        // quietly when the pipe closes, like any other Unix tool.
        // SAFETY: signal() with SIG_DFL installs no handler code; called
        // before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if let Err(e) = init_logging(&cli) {
        eprintln!("blkrep: {}", error_text(&e));
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("blkrep: {}", error_text(&e));
            ExitCode::from(1)
        }
    }
}

/// Logs to stderr (colour only on a terminal) or, with `--log-file`, to
/// that file (no colour).
fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .with_context(|| format!("bad --log-level / BLKREP_LOG {:?}", cli.log_level))?;
    let (writer, ansi) = match &cli.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the log file {}", path.display()))?;
            (BoxMakeWriter::new(std::sync::Mutex::new(file)), false)
        }
        None => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        ),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .init();
    Ok(())
}

/// An error and its causes, each said once (a message that already quotes
/// its cause, as "cannot read config X: No such file", does not get the
/// cause appended again).
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// I/O buffers (up to 1 MiB each, allocated and freed per request) come
/// from the heap instead of fresh mmaps: glibc maps allocations above 128 KiB
/// on their own, so each 1 MiB write paid 256 page faults, page clearing and
/// an munmap (7 % of the daemons' time under 1 MiB writes). Up to 64 MiB of
/// freed heap is kept for reuse.
fn keep_io_buffers_in_the_heap() {
    // SAFETY: mallopt only changes allocator tunables; called before the
    // runtime starts any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// The daemon's and the witness's runtime: one thread drives every task.
/// A replicated write crosses about a dozen tasks (frontend, volume, store
/// completion, link writer, QUIC driver); on one thread those hand-offs are
/// queue pushes, while a thread pool turns many of them into cross-thread
/// wake-ups (futex + context switch, ~8 us each on a small VM) for work that
/// takes a few microseconds. Measured with `blkrep bench`: fewer context
/// switches per write (12 -> 6) and more IOPS at depth 32.
fn service_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    keep_io_buffers_in_the_heap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| with_config_hint(e.into(), path))
}

/// A config that is missing at the default path: say how to name another.
fn with_config_hint(e: anyhow::Error, path: &std::path::Path) -> anyhow::Error {
    if path == std::path::Path::new(DEFAULT_CONFIG_PATH) && !path.exists() {
        e.context(format!(
            "no config at the default path {DEFAULT_CONFIG_PATH}: write one (README, \"Quickstart\"), or name another with --config PATH or BLKREP_CONFIG"
        ))
    } else {
        e
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Cert(CertCommand::Ca { out }) => {
            blkrep::cert::create_ca(&out)?;
            println!("created cluster CA in {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Cert(CertCommand::Issue {
            node,
            ca,
            out,
            days,
        }) => {
            blkrep::cert::issue(&node, &ca, &out, days)?;
            println!("issued certificate for {node} in {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::CreateMd { volume, force } => create_md(&cli.config, &volume, force),
        Command::Daemon => {
            let cfg = load(&cli.config)?;
            service_runtime()?.block_on(async move {
                let daemon = blkrep::daemon::Daemon::start(cfg).await?;
                wait_for_signal().await;
                tracing::info!("shutting down");
                daemon.shutdown().await;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Witness => {
            let cfg = blkrep::config::WitnessConfig::load(&cli.config)?;
            service_runtime()?.block_on(async move {
                let server = blkrep::witness::WitnessServer::start(&cfg)?;
                wait_for_signal().await;
                tracing::info!("witness shutting down");
                server.shutdown();
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Resolve { volume, .. } => request(&cli.config, Request::Resolve { volume }, false),
        Command::Attach { volume } => request(&cli.config, Request::Attach { volume }, false),
        Command::Detach { volume, force } => {
            request(&cli.config, Request::Detach { volume, force }, false)
        }
        Command::Primary { volume, force } => {
            request(&cli.config, Request::Primary { volume, force }, false)
        }
        Command::Secondary { volume, force } => {
            request(&cli.config, Request::Secondary { volume, force }, false)
        }
        Command::Status {
            volume: Some(volume),
            watch: true,
            interval_ms,
            count,
            ..
        } => watch(&cli.config, &volume, interval_ms, count),
        Command::Status { volume, json, .. } => {
            request(&cli.config, Request::Status { volume }, json)
        }
        Command::Verify { volume } => verify(&cli.config, &volume),
        Command::Resync { volume, checksum } => {
            request(&cli.config, Request::Resync { volume, checksum }, false)
        }
        Command::Debug(DebugCommand::FailDisk { volume }) => {
            request(&cli.config, Request::FailDisk { volume }, false)
        }
        Command::Debug(DebugCommand::TearWrite { volume }) => {
            request(&cli.config, Request::TearWrite { volume }, false)
        }
        Command::Debug(DebugCommand::PowerCut { seed }) => {
            request(&cli.config, Request::PowerCut { seed }, false)
        }
        Command::Debug(DebugCommand::SlowDisk { volume, delay_ms }) => {
            request(&cli.config, Request::SlowDisk { volume, delay_ms }, false)
        }
        Command::Demo(args) => match runtime()?.block_on(blkrep::demo::run(args)) {
            Ok(true) => Ok(ExitCode::SUCCESS),
            Ok(false) => Ok(ExitCode::from(1)),
            Err(e @ blkrep::demo::DemoError::Interrupted) => {
                eprintln!("{e}");
                Ok(ExitCode::from(130))
            }
            Err(e) => Err(e.into()),
        },
        Command::Bench(args) => {
            runtime()?.block_on(blkrep::bench::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn create_md(config: &std::path::Path, volume: &str, force: bool) -> anyhow::Result<ExitCode> {
    let cfg = load(config)?;
    let v = cfg
        .volume(volume)
        .with_context(|| format!("volume {volume:?} is not in {}", config.display()))?;
    let node = v
        .nodes
        .get(&cfg.node)
        .with_context(|| format!("volume {volume:?} is not configured on node {}", cfg.node))?;
    // Refuse while the daemon has the volume attached.
    if cfg.control_socket.exists() {
        let rt = runtime()?;
        let status = rt.block_on(control::call(
            &cfg.control_socket,
            &Request::Status {
                volume: Some(volume.to_string()),
            },
        ));
        if let Ok(Response::Status(s)) = status
            && s.volumes.iter().any(|x| x.attached)
        {
            anyhow::bail!("volume {volume} is attached; detach it before writing new metadata");
        }
    }
    // Overwriting a disk that holds a filesystem with internal metadata:
    // the volume is then smaller than the filesystem on it.
    let signature = match node.meta_location() {
        blkrep::config::MetaLocation::Internal if force => {
            blkrep::meta::device::MetaDevice::data_signature(&node.disk).unwrap_or(None)
        }
        _ => None,
    };
    let layout = blkrep::volume::create_metadata(
        &node.disk,
        &node.meta_location(),
        volume,
        v.chunk_bytes,
        force,
    )?;
    let place = match node.meta_location() {
        blkrep::config::MetaLocation::Internal => {
            format!("internal, at the end of {}", node.disk.display())
        }
        blkrep::config::MetaLocation::External(p) => format!("in {}", p.display()),
    };
    println!(
        "wrote metadata for {volume} ({place}): data on {}, {} data bytes, bitmap chunk {} bytes",
        node.disk.display(),
        layout.data_bytes,
        v.chunk_bytes
    );
    if let Some(sig) = signature {
        println!(
            "warning: {} held {sig}: internal metadata takes its last bytes, so the volume ({} bytes) is smaller than that filesystem or volume expects and it will not fit (fsck through the export reports the size mismatch); recreate it on the volume, or use external metadata (meta = \"/absolute/path\") to keep the whole device",
            node.disk.display(),
            layout.data_bytes
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn request(config: &std::path::Path, req: Request, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = load(config)?;
    let rt = runtime()?;
    let resp = match rt.block_on(control::call(&cfg.control_socket, &req)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("blkrep: {e}");
            return Ok(ExitCode::from(match e {
                control::ControlError::Forbidden { .. } => EXIT_FORBIDDEN,
                _ => EXIT_NO_DAEMON,
            }));
        }
    };
    match resp {
        Response::Ok { message } => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        Response::Status(s) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", blkrep::control::status::render_text(&s));
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Error { code, message } => {
            eprintln!("blkrep: {message}");
            Ok(ExitCode::from(exit_byte(code)))
        }
    }
}

/// `verify VOL`: starts the verify, waits for it and prints what differs.
fn verify(config: &std::path::Path, volume: &str) -> anyhow::Result<ExitCode> {
    let code = request(
        config,
        Request::Verify {
            volume: volume.to_string(),
        },
        false,
    )?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    let cfg = load(config)?;
    let rt = runtime()?;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let req = Request::Status {
            volume: Some(volume.to_string()),
        };
        let v = match rt.block_on(control::call(&cfg.control_socket, &req)) {
            Ok(Response::Status(s)) => s.volumes.into_iter().next(),
            Ok(_) => None,
            Err(e) => {
                eprintln!("blkrep: {e}");
                return Ok(ExitCode::from(EXIT_NO_DAEMON));
            }
        };
        let Some(v) = v else {
            anyhow::bail!("no status for volume {volume}")
        };
        if v.verify.is_some() {
            continue;
        }
        let Some(r) = v.last_verify else {
            anyhow::bail!("the verify of {volume} left no result")
        };
        println!(
            "{volume}: verified {} of {} bytes{}; {} bytes differ",
            r.checked_bytes,
            r.total_bytes,
            if r.aborted {
                " (aborted: link lost)"
            } else {
                ""
            },
            r.mismatched_bytes
        );
        for m in &r.mismatches {
            println!("  differs: offset {} length {}", m.offset, m.bytes);
        }
        if r.mismatched_bytes > 0 {
            println!(
                "marked out of sync; run `blkrep resync {volume}` to copy them from this node"
            );
        }
        return Ok(if r.aborted {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        });
    }
}

/// The wall-clock time of day (UTC) for `--watch` lines: `14:03:07`.
fn wall_clock_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let day = secs % 86_400;
    format!("{:02}:{:02}:{:02}Z", day / 3600, day % 3600 / 60, day % 60)
}

/// `status VOL --watch`: a progress bar on a terminal, plain lines otherwise.
fn watch(
    config: &std::path::Path,
    volume: &str,
    interval_ms: u64,
    count: u64,
) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let cfg = load(config)?;
    let rt = runtime()?;
    let tty = std::io::stdout().is_terminal();
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stdout());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg}\n[{bar:40}] {percent:>3}%")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut n = 0u64;
    loop {
        let req = Request::Status {
            volume: Some(volume.to_string()),
        };
        let report = match rt.block_on(control::call(&cfg.control_socket, &req)) {
            Ok(Response::Status(s)) => s.volumes.into_iter().next(),
            Ok(Response::Error { code, message }) => {
                bar.finish_and_clear();
                eprintln!("blkrep: {message}");
                return Ok(ExitCode::from(exit_byte(code)));
            }
            Ok(_) => None,
            Err(e) => {
                bar.finish_and_clear();
                eprintln!("blkrep: {e}");
                return Ok(ExitCode::from(EXIT_NO_DAEMON));
            }
        };
        let Some(v) = report else {
            anyhow::bail!("no status for volume {volume}");
        };
        let line = format!(
            "{} {}",
            wall_clock_now(),
            blkrep::control::status::watch_line(&v)
        );
        if tty {
            let (len, pos) = match &v.resync {
                Some(r) => (r.total_bytes.max(1), r.done_bytes),
                None => (1, u64::from(v.out_of_sync_bytes == 0)),
            };
            bar.set_length(len);
            bar.set_position(pos);
            bar.set_message(line);
            // (Drawing is rate-limited: without this the first state drawn,
            // before the position was set, stayed up until something
            // changed, e.g. 0 % on a volume in sync.)
            bar.force_draw();
        } else {
            println!("{line}");
        }
        n += 1;
        if count != 0 && n >= count {
            if tty {
                bar.abandon();
            }
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(std::time::Duration::from_millis(interval_ms.max(50)));
    }
}

fn exit_byte(code: ErrorCode) -> u8 {
    u8::try_from(code.exit_code()).unwrap_or(1)
}
