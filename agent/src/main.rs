//! The `imageupd` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use imageupd::apply::{self, ApplyOptions};
use imageupd::engine::config::KernelPolicy;
use imageupd::publish::image::{self as publish, PublishOptions};
use imageupd::sys::error::ExitKind;
use imageupd::sys::progress::Progress;

/// In-place golden-image updates for deployed Linux nodes.
///
/// Publish a built root filesystem into a signed, content-addressed store on
/// the master; on each node, `apply` moves the root to that image in place:
/// only changed files are fetched and staged, services are quiesced by hooks
/// only for the atomic swap, and a crash at any point leaves every file
/// wholly old or wholly new.
#[derive(Parser)]
#[command(name = "imageupd", version, about, long_about, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Exit codes, shown in --help.
const EXIT_CODES: &str = "Exit codes: 0 ok or nothing to do; 1 error; 2 usage; 3 drift found (verify); \
4 untrusted input (signature, digest, manifest); 5 preflight refused (space, conflicts; root unchanged); \
6 pre-apply hook failed (root unchanged); 7 post-apply hook failed (update committed); \
8 another apply holds the lock; 9 source unavailable.";

#[derive(clap::Args, Clone)]
struct RootArg {
    /// The root filesystem to act on; node configuration, keys, hooks and
    /// state are all read below it.
    #[arg(long, env = "IMAGEUPD_ROOT", default_value = "/")]
    root: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a store over HTTP(S) for nodes (any static web server can too).
    ///
    /// GET answers 200 with Content-Length, HEAD gives Content-Length and
    /// Last-Modified, byte ranges are honoured; objects and images are sent
    /// as immutable, the index as revalidate-always. Nothing outside the
    /// store is ever served. SIGTERM/SIGINT shut down gracefully. Prints
    /// `listening on URL` once ready; access log at info level.
    Serve {
        /// Store directory.
        #[arg(long)]
        store: PathBuf,
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = imageupd::publish::serve::DEFAULT_LISTEN)]
        listen: String,
        /// PEM certificate chain: serve HTTPS.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Send each body at most this many bytes per second (tests, demos).
        #[arg(long, hide = true)]
        throttle: Option<u64>,
    },
    /// Make an ed25519 signing key pair: FILE (secret, mode 0600) and FILE.pub.
    ///
    /// Put FILE.pub into /etc/imageupd/trusted.d/ on every node; keep FILE on
    /// the build host and pass it to `publish --key`.
    Keygen {
        /// Where to write the secret key.
        #[arg(long)]
        out: PathBuf,
        /// Comment stored in the public key file.
        #[arg(long, default_value = "imageupd")]
        comment: String,
    },
    /// Ingest a built image (directory, .tar, .tar.gz, .tar.zst, .raw, .qcow2) into a store.
    ///
    /// Objects already in the store are shared, so publishing a new version
    /// of an image costs only what changed.
    Publish {
        /// Store directory (created if it does not exist).
        #[arg(long)]
        store: PathBuf,
        /// Id of the new image (immutable once published).
        #[arg(long)]
        id: String,
        /// Secret key to sign the manifest with; without it the image is
        /// unsigned and nodes refuse it unless they allow unsigned images.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Id of the image this one succeeds.
        #[arg(long)]
        parent: Option<String>,
        /// zstd level for new objects (1-22).
        #[arg(long, default_value_t = publish::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
        level: i32,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// The image: a directory, a tarball or a disk image.
        source: PathBuf,
    },
    /// Show what an apply would do, changing nothing.
    Plan {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        root: RootArg,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Update the root in place to an image.
    ///
    /// Exits 0 with "nothing to do" when the root already matches. Resumes an
    /// interrupted update when run without --id.
    Apply {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        root: RootArg,
        /// What to do if the image boots another kernel (kexec, reboot, defer).
        #[arg(long)]
        kernel_policy: Option<KernelPolicy>,
        /// Resolve, verify and plan against the root, but change nothing:
        /// os-refresh-config's pre-configure.d step, so that a bad source or
        /// signature fails the run before configure.d.
        #[arg(long)]
        download_only: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare the root with its current image and report drift (exit 3).
    Verify {
        #[command(flatten)]
        root: RootArg,
        /// Hash every file instead of trusting size and mtime.
        #[arg(long)]
        checksum: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Current image, update phase, last result and error.
    Status {
        #[command(flatten)]
        root: RootArg,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the node agent: watch the metadata and apply the image it names.
    ///
    /// Reads os-collect-config's cache (or the [agent] metadata_file), reacts
    /// to changes through inotify with a periodic rescan, retries failures
    /// with exponential backoff, and speaks sd_notify (READY, STATUS,
    /// WATCHDOG) under systemd. SIGTERM never interrupts a swap; SIGHUP
    /// reloads the configuration and retries at once.
    Agent {
        #[command(flatten)]
        root: RootArg,
    },
    /// Boot the kernel of the current image now, after a deferred kernel change.
    ///
    /// Runs the pre-reboot hooks, then kexecs into the image's kernel with
    /// the running command line (falling back to a reboot), or reboots.
    /// Does nothing when no kernel change is pending.
    Reboot {
        #[command(flatten)]
        root: RootArg,
        /// kexec or reboot (default: the configured policy; defer means kexec).
        #[arg(long)]
        kernel_policy: Option<KernelPolicy>,
    },
    /// After a boot: record a pending kernel change complete (the image's
    /// kernel runs) or failed, and remove module directories neither the
    /// image nor the running kernel uses. Run at boot by
    /// imageupd-boot-check.service and by the agent at start.
    BootCheck {
        #[command(flatten)]
        root: RootArg,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply the previous image again (the one before the last update).
    ///
    /// Uses the source the last update came from unless --from is given;
    /// content still in the root is reused, so only what differs is fetched.
    Rollback {
        #[command(flatten)]
        root: RootArg,
        /// Store directory or URL to take the previous image from.
        #[arg(long)]
        from: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the deterministic fault points (for crash tests).
    #[command(hide = true)]
    FaultPoints,
}

#[derive(clap::Args, Clone)]
struct TargetArgs {
    /// Store directory, http(s):// store URL, or a directory holding a
    /// mounted image.
    #[arg(long)]
    from: Option<String>,
    /// Extra CA certificate(s) (PEM) to trust for an https:// source,
    /// besides the system's roots (overrides the config key `ca_file`).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Target image id.
    #[arg(long, conflicts_with = "from_metadata")]
    id: Option<String>,
    /// Take the image id (and source, unless --from is given) from the node
    /// metadata: os-collect-config's cache, or the [agent] metadata_file.
    /// Exits 0 with "nothing to do" when /etc/image_id already matches.
    #[arg(long)]
    from_metadata: bool,
    /// Accept an unsigned manifest.
    #[arg(long)]
    allow_unsigned: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            imageupd::sys::logging::init("warn");
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // The agent's and the server's logs are at info level.
    imageupd::sys::logging::init(
        if matches!(cli.cmd, Cmd::Agent { .. } | Cmd::Serve { .. }) {
            "info"
        } else {
            "warn"
        },
    );
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let kind = ExitKind::of(&e);
            // The chain already names the kind (it is attached as context).
            eprintln!("imageupd: {e:#}");
            ExitCode::from(kind.code() as u8)
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn run(cli: Cli) -> Result<u8> {
    match cli.cmd {
        Cmd::Serve {
            store,
            listen,
            tls_cert,
            tls_key,
            throttle,
        } => {
            imageupd::publish::serve::serve(&imageupd::publish::serve::ServeOptions {
                store,
                listen,
                tls_cert,
                tls_key,
                throttle_bps: throttle,
            })?;
            Ok(0)
        }
        Cmd::Keygen { out, comment } => {
            let vk = imageupd::format::sign::keygen(&out, &comment)?;
            println!(
                "wrote {} and {} (key id {})",
                out.display(),
                imageupd::format::sign::pub_path(&out).display(),
                imageupd::format::sign::key_id(&vk)
            );
            Ok(0)
        }
        Cmd::Publish {
            store,
            id,
            key,
            parent,
            level,
            json,
            source,
        } => {
            let threads = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2);
            let opts = PublishOptions {
                store,
                id,
                key,
                parent,
                level,
                threads,
            };
            let r = publish::publish(&opts, &source, &Progress::new(json))?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "published {} ({} entries, {}): {} new objects ({} compressed), {} shared{}{}",
                    r.id,
                    r.entries,
                    imageupd::sys::progress::human_bytes(r.content_bytes),
                    r.new_objects,
                    imageupd::sys::progress::human_bytes(r.new_object_bytes),
                    r.reused_objects,
                    if r.signed { ", signed" } else { ", UNSIGNED" },
                    r.kernel
                        .map(|k| format!(", kernel {k}"))
                        .unwrap_or_default()
                );
            }
            Ok(0)
        }
        Cmd::Plan { target, root, json } => run_apply(target, root, None, json, true),
        Cmd::Apply {
            target,
            root,
            kernel_policy,
            download_only,
            json,
        } => run_apply(target, root, kernel_policy, json, download_only),
        Cmd::Agent { root } => {
            imageupd::agent::daemon::run(&root.root)?;
            Ok(0)
        }
        Cmd::Verify {
            root,
            checksum,
            json,
        } => {
            let threads = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2);
            let r = imageupd::engine::verify::verify(&root.root, checksum, threads)?;
            if json {
                print_json(&r)?;
            } else if r.clean() {
                println!(
                    "{} matches image {} ({} entries checked{})",
                    root.root.display(),
                    r.id,
                    r.checked,
                    if checksum { ", contents hashed" } else { "" }
                );
            } else {
                println!("{} drifted from image {}:", root.root.display(), r.id);
                for d in &r.modified {
                    println!("  modified {} ({})", d.path, d.what.join(", "));
                }
                for p in &r.missing {
                    println!("  missing  {p}");
                }
                for p in &r.extra {
                    println!("  extra    {p}");
                }
            }
            Ok(if r.clean() {
                0
            } else {
                ExitKind::Drift.code() as u8
            })
        }
        Cmd::Status { root, json } => status(&root.root, json),
        Cmd::Reboot {
            root,
            kernel_policy,
        } => {
            let rf = imageupd::fs::rootfs::RootFs::open(&root.root).context(ExitKind::Usage)?;
            let cfg = imageupd::engine::config::Config::load(&rf.path)?;
            let act = imageupd::boot::reboot::Actuator::host();
            match imageupd::boot::reboot::reboot_now(
                &act,
                &rf,
                &cfg,
                kernel_policy,
                &Progress::new(false),
            )? {
                Some(a) => println!("{}: {}", rf.path.display(), a.as_str()),
                None => println!(
                    "no kernel change is pending on {}: nothing to do",
                    rf.path.display()
                ),
            }
            Ok(0)
        }
        Cmd::BootCheck { root, json } => {
            let rf = imageupd::fs::rootfs::RootFs::open(&root.root).context(ExitKind::Usage)?;
            let r = imageupd::boot::reboot::confirm_boot(&rf)?;
            if json {
                print_json(&r)?;
            } else {
                if let Some(rec) = &r.record {
                    println!("kernel:   {}", rec.describe());
                }
                for p in &r.pruned {
                    println!("removed stale modules {p}");
                }
            }
            Ok(match &r.record {
                Some(rec)
                    if rec.state == imageupd::boot::reboot::KernelState::Failed && r.confirmed =>
                {
                    1
                }
                _ => 0,
            })
        }
        Cmd::Rollback { root, from, json } => {
            let r = apply::rollback(&root.root, from, &Progress::new(json))?;
            if json {
                print_json(&r)?;
            } else {
                print!("{}", apply::human_summary(&r));
            }
            Ok(0)
        }
        Cmd::FaultPoints => {
            for p in imageupd::sys::fault::POINTS {
                println!("{p}");
            }
            Ok(0)
        }
    }
}

fn run_apply(
    target: TargetArgs,
    root: RootArg,
    kernel_policy: Option<KernelPolicy>,
    json: bool,
    dry_run: bool,
) -> Result<u8> {
    let r = if target.from_metadata {
        let o = imageupd::agent::daemon::FromMetadataOptions {
            root: root.root,
            from: target.from,
            allow_unsigned: target.allow_unsigned,
            kernel_policy,
            dry_run,
            ca_file: target.ca_file.clone(),
        };
        imageupd::agent::daemon::apply_from_metadata(&o, &Progress::new(json))?
    } else {
        let opts = ApplyOptions {
            root: root.root,
            from: target.from,
            id: target.id,
            allow_unsigned: target.allow_unsigned,
            kernel_policy,
            dry_run,
            cancel: None,
            ca_file: target.ca_file,
        };
        apply::run(&opts, &Progress::new(json))?
    };
    if json {
        print_json(&r)?;
    } else {
        print!("{}", apply::human_summary(&r));
    }
    Ok(0)
}

fn status(root: &std::path::Path, json: bool) -> Result<u8> {
    let rf = imageupd::fs::rootfs::RootFs::open(root).context(ExitKind::Usage)?;
    let live = imageupd::engine::status::Status::load(&rf.runtime_dir())?;
    let journal = match rf.state_dir()? {
        Some(s) => imageupd::engine::journal::Journal::load(std::os::fd::AsFd::as_fd(&s))?,
        None => None,
    };
    let current = rf.image_id()?;
    let pending = journal
        .as_ref()
        .filter(|j| j.interrupted())
        .map(|j| j.target.clone());
    let agent = imageupd::agent::daemon::AgentRecord::load(&rf.runtime_dir())
        .ok()
        .filter(|a| *a != Default::default());
    let kernel = imageupd::boot::reboot::load(&rf)?;
    let reboot_required = kernel
        .as_ref()
        .is_some_and(|k| k.state == imageupd::boot::reboot::KernelState::Pending);
    if json {
        print_json(&serde_json::json!({
            "root": rf.path,
            "current": current,
            "pending": pending,
            "phase": live.as_ref().map_or(imageupd::engine::lifecycle::Phase::Idle, |s| s.phase),
            "journal": journal,
            "status": live,
            "agent": agent,
            "kernel": {
                "running": imageupd::fs::rootfs::running_release().filter(|_| rf.is_host_root()),
                "reboot_required": reboot_required,
                "record": kernel,
            },
        }))?;
    } else {
        println!("root:     {}", rf.path.display());
        println!("current:  {}", current.as_deref().unwrap_or("(none)"));
        if let Some(p) = &pending {
            println!("pending:  {p} (interrupted; `imageupd apply` converges)");
        }
        if let Some(s) = &live {
            println!("phase:    {}", s.phase);
            println!(
                "last:     {} {} at {}",
                s.result,
                s.target.as_deref().unwrap_or(""),
                s.updated
            );
            if s.reboot_required {
                println!(
                    "reboot:   required ({})",
                    s.reboot_reason.as_deref().unwrap_or("")
                );
            }
            if let Some(q) = s.quiesce_ms {
                println!("quiesce:  {q} ms");
            }
            if let Some(e) = &s.last_error {
                println!("error:    {e}");
            }
        }
        if let Some(k) = &kernel {
            let what = if reboot_required {
                "reboot:  "
            } else {
                "kernel:  "
            };
            println!("{what} {}", k.describe());
        }
        if let Some(a) = &agent {
            println!("agent:    {} ({})", a.state, a.metadata_source);
            if let Some(w) = &a.wanted {
                println!(
                    "wanted:   {w} from {}",
                    a.wanted_source.as_deref().unwrap_or("?")
                );
            }
            if let Some(e) = &a.metadata_error {
                println!("metadata: {e}");
            }
            if let Some(l) = &a.last_applied {
                if let Some(ms) = l.metadata_to_commit_ms {
                    println!(
                        "latency:  {ms} ms from the metadata write to the commit of {}",
                        l.id
                    );
                }
            }
            for (k, f) in &a.failures.by_target {
                println!(
                    "failing:  {k}: {} attempt(s), last: {}",
                    f.attempts, f.last_error
                );
            }
        }
    }
    Ok(0)
}
