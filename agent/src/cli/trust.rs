//! `imageupd trust init|rotate|sign|publish|timestamp`: the store's root of
//! trust (k-of-n keys per role, rotated by a chain of signed versions) and
//! its signed index. See the README's "Keys and the root of trust".

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use imageupd::fs::store::Store;
use imageupd::publish::trust::{self, RoleKeys, DEFAULT_INDEX_HOURS, DEFAULT_ROOT_DAYS};
use imageupd::sys::error::ExitKind;

/// Keys of the three roles, as options.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct RoleArgs {
    /// Public key (FILE.pub) of a root key holder (repeatable). Root keys
    /// sign new root versions; keep them offline.
    #[arg(long = "root-key")]
    root_key: Vec<PathBuf>,
    /// Root signatures a new root needs.
    #[arg(long)]
    root_threshold: Option<u32>,
    /// Public key that signs manifests at `publish --key` (repeatable).
    #[arg(long = "targets-key")]
    targets_key: Vec<PathBuf>,
    /// Manifest signatures a node requires (k of the targets keys).
    #[arg(long)]
    targets_threshold: Option<u32>,
    /// Public key of the online key that signs the index (repeatable).
    #[arg(long = "timestamp-key")]
    timestamp_key: Vec<PathBuf>,
    /// Index signatures a node requires.
    #[arg(long)]
    timestamp_threshold: Option<u32>,
    /// Lifetime of the root, in days.
    #[arg(long, default_value_t = DEFAULT_ROOT_DAYS)]
    expires_days: u64,
}

impl RoleArgs {
    fn roles(&self) -> BTreeMap<String, RoleKeys> {
        let mut m = BTreeMap::new();
        for (name, keys, threshold) in [
            ("root", &self.root_key, self.root_threshold),
            ("targets", &self.targets_key, self.targets_threshold),
            ("timestamp", &self.timestamp_key, self.timestamp_threshold),
        ] {
            if !keys.is_empty() || threshold.is_some() {
                m.insert(
                    name.to_owned(),
                    RoleKeys {
                        keys: keys.clone(),
                        threshold,
                    },
                );
            }
        }
        m
    }
}

/// The trust subcommands.
#[derive(Subcommand)]
pub(crate) enum TrustCmd {
    /// Draft root version 1 (unsigned) naming the keys of every role.
    ///
    /// Then each root key holder runs `trust sign`, and `trust publish`
    /// installs it; put the same file on every node as
    /// /etc/imageupd/root.json.
    Init {
        #[command(flatten)]
        roles: RoleArgs,
        /// Where to write the draft.
        #[arg(long)]
        out: PathBuf,
    },
    /// Draft the next root version from the store's newest: the roles named
    /// here get new keys (a key no role names any more is revoked).
    ///
    /// It must be signed by a threshold of the current root keys AND of
    /// its own root keys before `trust publish` takes it.
    Rotate {
        /// Store directory.
        #[arg(long)]
        store: PathBuf,
        #[command(flatten)]
        roles: RoleArgs,
        /// Where to write the draft.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add one key holder's signature to a root draft (offline).
    Sign {
        /// Secret key file.
        #[arg(long)]
        key: PathBuf,
        /// The draft.
        file: PathBuf,
    },
    /// Check a signed root draft as a node would and install it as the
    /// store's next root version (also copied to the store's root.json).
    Publish {
        /// Store directory.
        #[arg(long)]
        store: PathBuf,
        /// The signed draft.
        file: PathBuf,
    },
    /// Re-sign the store's index (timestamp.json) listing every image,
    /// one version up; run it more often than --expires-hours (cron).
    Timestamp {
        /// Store directory.
        #[arg(long)]
        store: PathBuf,
        /// The online timestamp key (secret).
        #[arg(long)]
        key: PathBuf,
        /// Lifetime of the index, in hours.
        #[arg(long, default_value_t = DEFAULT_INDEX_HOURS)]
        expires_hours: u64,
    },
}

fn store(p: &std::path::Path) -> Result<Store> {
    Store::open(p).context(ExitKind::Usage)
}

/// Run a trust subcommand.
pub(crate) fn run(cmd: TrustCmd) -> Result<u8> {
    match cmd {
        TrustCmd::Init { roles, out } => {
            trust::init(&roles.roles(), roles.expires_days, &out).context(ExitKind::Usage)?;
            println!(
                "wrote root v1 draft {}: have each root key holder run `imageupd trust sign`",
                out.display()
            );
        }
        TrustCmd::Rotate {
            store: s,
            roles,
            out,
        } => {
            trust::rotate(&store(&s)?, &roles.roles(), roles.expires_days, &out)
                .context(ExitKind::Usage)?;
            println!(
                "wrote {}: it needs signatures of the current root keys and of its own",
                out.display()
            );
        }
        TrustCmd::Sign { key, file } => {
            let id = trust::sign_draft(&file, &key)?;
            println!("signed {} with key {id}", file.display());
        }
        TrustCmd::Publish { store: s, file } => {
            let v = trust::publish_root(&store(&s)?, &file).context(ExitKind::Untrusted)?;
            println!("installed root v{v} in {}", s.display());
        }
        TrustCmd::Timestamp {
            store: s,
            key,
            expires_hours,
        } => {
            let v = trust::timestamp(&store(&s)?, &key, expires_hours)?;
            println!("signed the index of {}, version {v}", s.display());
        }
    }
    Ok(0)
}
