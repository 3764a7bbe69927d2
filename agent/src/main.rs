//! The `imageupd` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use imageupd::engine::config::KernelPolicy;
use imageupd::publish::image::PublishOptions;
use imageupd::sys::error::ExitKind;

mod cli;

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
4 untrusted input (signature, digest, manifest, downgrade, another role); 5 preflight refused (space, conflicts; root unchanged); \
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
    /// Metrics for Prometheus at /metrics (see docs/metrics.md).
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
        /// Serve the Prometheus metrics (GET /metrics, plain HTTP) on this
        /// address only; without it /metrics is answered on --listen.
        #[arg(long)]
        metrics_listen: Option<String>,
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
        /// Secret key to sign the manifest with (repeatable: a root whose
        /// targets role needs k signatures needs k keys here); without it
        /// the image is unsigned and nodes refuse it unless they allow
        /// unsigned images.
        #[arg(long)]
        key: Vec<PathBuf>,
        /// Online key that re-signs the store's index (timestamp.json)
        /// once the image is in: nodes with a root of trust need it.
        #[arg(long)]
        timestamp_key: Option<PathBuf>,
        /// Lifetime of that index, in hours.
        #[arg(long, default_value_t = imageupd::publish::trust::DEFAULT_INDEX_HOURS)]
        timestamp_hours: u64,
        /// Id of the image this one succeeds: its nodes get an update
        /// delta, and the packs are laid out for them.
        #[arg(long)]
        parent: Option<String>,
        /// Without --parent, write no update delta from the store's newest
        /// image (written by default when that image shares at least half
        /// of this one's objects, as for builds published as they come).
        #[arg(long, conflicts_with = "parent")]
        no_delta: bool,
        /// Release channel: nodes compare release numbers within a channel.
        #[arg(long, default_value = imageupd::format::manifest::DEFAULT_CHANNEL)]
        channel: String,
        /// Release number on the channel (default: one above the highest in
        /// the store); must be above every image already on the channel.
        #[arg(long)]
        release: Option<u64>,
        /// The node role this image is for (e.g. compute-x86_64); nodes whose
        /// `compatible` key names another role refuse it.
        #[arg(long)]
        compatible: Option<String>,
        /// zstd level for new objects (1-22).
        #[arg(long, default_value_t = imageupd::publish::image::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
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
        #[command(flatten)]
        progress: ProgressArg,
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
    /// Check the node's configuration and show it as it takes effect.
    ///
    /// Reads /etc/imageupd/config.toml and config.d/*.toml below the root,
    /// merged key by key, and checks every key, the [rollout] and [health]
    /// tables included: exits 1 naming the file and key on an error (image
    /// builds run it so that a typo fails the build, not the node).
    Config {
        #[command(flatten)]
        root: RootArg,
        /// Print the effective configuration as JSON.
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
        #[command(flatten)]
        progress: ProgressArg,
    },
    /// Fleet rollout: the slots, in-progress records, failures and halts
    /// of the node groups, kept in etcd (see docs/fleet.md).
    Fleet {
        #[command(subcommand)]
        cmd: cli::fleet::FleetCmd,
    },
    /// The store's root of trust (k-of-n keys per role, rotation,
    /// revocation) and its signed, expiring index.
    Trust {
        #[command(subcommand)]
        cmd: cli::trust::TrustCmd,
    },
    /// Make bare disks a bootable node of an image: partitions, filesystems,
    /// the signed image, /etc/fstab, UEFI loader, configdrive.
    ///
    /// Every input is checked (scheme, configdrive inputs, disks, the
    /// image's signature) before any disk is written; the partition tables
    /// are written last, so a disk whose run stopped half-way does not boot.
    /// Run again with the same inputs, it continues where it stopped, or
    /// prints "nothing to do". The node's root trusts the keys of
    /// --trusted-keys and can be updated in place by `apply` later. See
    /// docs/provision.md for the scheme and configdrive formats.
    ///
    /// With --whole-disk, the published whole-disk image of the image is
    /// written instead (one disk, no scheme), first MiB last.
    Provision {
        /// Store directory or http(s):// store URL.
        #[arg(long)]
        from: String,
        /// Image id.
        #[arg(long)]
        id: String,
        /// Partitioning scheme (TOML, or JSON starting with `{`); required
        /// unless --whole-disk.
        #[arg(long, required_unless_present = "whole_disk")]
        scheme: Option<PathBuf>,
        /// Write the whole-disk image the image was published from (a .raw
        /// given to `publish`; its size and sha256 are in the signed
        /// manifest) onto the one --disk instead of partitioning: streamed
        /// from the store, its digest checked in-stream, the first MiB
        /// written last, only after the digest matched. No --scheme; with
        /// --configdrive, a 64 MiB config-2 partition is added at the end
        /// of the disk (a GPT image, a disk 65 MiB larger than the image).
        #[arg(long, conflicts_with = "scheme")]
        whole_disk: bool,
        /// A disk: a block device or a disk image file, as PATH (in the
        /// scheme's order) or NAME=PATH; repeat for each disk.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        /// Configdrive inputs (TOML or JSON): uuid, hostname, keys,
        /// network, user_data parts.
        #[arg(long)]
        configdrive: Option<PathBuf>,
        /// Directory of trusted publisher keys (*.pub), also installed into
        /// the node's /etc/imageupd/trusted.d.
        #[arg(long, default_value = imageupd::provision::DEFAULT_KEYS_DIR)]
        trusted_keys: PathBuf,
        /// Root of trust (a store's root.json, k-of-n keys per role): the
        /// image must be signed by its targets keys and listed in the
        /// store's signed index, as `apply` checks against a node's
        /// /etc/imageupd/root.json; installed there on the new root.
        /// Default: this system's /etc/imageupd/root.json when present.
        #[arg(long)]
        root_of_trust: Option<PathBuf>,
        /// Accept an unsigned image.
        #[arg(long)]
        allow_unsigned: bool,
        /// Extra CA certificate(s) (PEM) for an https:// source.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Print the plan (byte offsets, UUIDs) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// JSON: progress lines on stderr, the report (or plan) on stdout.
        #[arg(long)]
        json: bool,
        /// POST the final report (or the error) as JSON to this URL.
        #[arg(long)]
        report_url: Option<String>,
    },
    /// List the deterministic fault points (for crash tests).
    #[command(hide = true)]
    FaultPoints,
    /// Write man pages (DIR/man1) and bash, zsh and fish completions
    /// (DIR/completions) generated from this command line (packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory.
        dir: PathBuf,
    },
}

#[derive(clap::Args, Clone, Copy)]
struct ProgressArg {
    /// Also write progress as JSON lines to this open file descriptor:
    /// phases, bytes and objects done of each task, messages, and the
    /// result last (see `imageupd::sys::progress`; bootc's --progress-fd
    /// is the precedent).
    #[arg(long, value_name = "FD")]
    progress_fd: Option<u32>,
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
    /// Accept an image whose signed release is below the highest this node
    /// has installed on its channel (a deliberate, local rollback).
    #[arg(long)]
    allow_downgrade: bool,
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

fn run(cli: Cli) -> Result<u8> {
    match cli.cmd {
        Cmd::Serve {
            store,
            listen,
            tls_cert,
            tls_key,
            throttle,
            metrics_listen,
        } => cli::serve(imageupd::publish::serve::ServeOptions {
            store,
            listen,
            tls_cert,
            tls_key,
            throttle_bps: throttle,
            metrics_listen,
        }),
        Cmd::Keygen { out, comment } => cli::keygen(&out, &comment),
        Cmd::Publish {
            store,
            id,
            key,
            timestamp_key,
            timestamp_hours,
            parent,
            no_delta,
            channel,
            release,
            compatible,
            level,
            json,
            source,
        } => cli::publish(
            PublishOptions {
                store,
                id,
                keys: key,
                timestamp_key,
                timestamp_hours,
                parent,
                no_delta,
                level,
                threads: cli::threads(),
                channel,
                release,
                compatible,
            },
            &source,
            json,
        ),
        Cmd::Plan { target, root, json } => cli::apply(target, root, None, json, true, None),
        Cmd::Apply {
            target,
            root,
            kernel_policy,
            download_only,
            json,
            progress,
        } => cli::apply(
            target,
            root,
            kernel_policy,
            json,
            download_only,
            progress.progress_fd,
        ),
        Cmd::Agent { root } => imageupd::agent::daemon::run(&root.root).map(|_| 0),
        Cmd::Verify {
            root,
            checksum,
            json,
        } => cli::verify(&root.root, checksum, json),
        Cmd::Status { root, json } => cli::status::status(&root.root, json),
        Cmd::Config { root, json } => cli::config(&root.root, json),
        Cmd::Reboot {
            root,
            kernel_policy,
        } => cli::reboot(&root.root, kernel_policy),
        Cmd::BootCheck { root, json } => cli::boot_check(&root.root, json),
        Cmd::Rollback {
            root,
            from,
            json,
            progress,
        } => cli::rollback(&root.root, from, json, progress.progress_fd),
        Cmd::Fleet { cmd } => cli::fleet::run(cmd),
        Cmd::Trust { cmd } => cli::trust::run(cmd),
        Cmd::Provision {
            from,
            id,
            scheme,
            whole_disk,
            disks,
            configdrive,
            trusted_keys,
            root_of_trust,
            allow_unsigned,
            ca_file,
            dry_run,
            json,
            report_url,
        } => cli::provision::provision(cli::provision::Args {
            opts: imageupd::provision::ProvisionOptions {
                from,
                id,
                disks,
                keys_dir: trusted_keys,
                root_of_trust,
                allow_unsigned,
                ca_file,
                dry_run,
                json,
                ..Default::default()
            },
            scheme,
            whole_disk,
            configdrive,
            report_url,
        }),
        Cmd::FaultPoints => cli::fault_points(),
        Cmd::GenerateDocs { dir } => {
            cli::docs::generate_docs(<Cli as clap::CommandFactory>::command(), &dir)
        }
    }
}
