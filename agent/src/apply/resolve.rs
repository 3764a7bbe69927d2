//! Step "resolve": which image, from where, and its trusted manifest.

use std::os::fd::{AsFd, OwnedFd};

use anyhow::{anyhow, Context, Result};

use super::context::Ctx;
use super::ApplyReport;
use crate::engine::journal::Journal;
use crate::engine::lifecycle::Event;
use crate::engine::releases;
use crate::format::manifest::Manifest;
use crate::format::sign;
use crate::format::trust::{Resolved, Trust};
use crate::net::keep_source::{self, KeepSource};
use crate::net::source::Source;
use crate::sys::error::ExitKind;

/// The update's target, resolved.
pub(super) struct Target {
    /// Its image id.
    pub(super) id: String,
    /// Where it comes from.
    pub(super) source: Source,
    /// Its manifest, verified, with the stored bytes.
    pub(super) resolved: Resolved,
    /// Worker threads for hashing and downloads.
    pub(super) threads: usize,
    /// The state directory, when the root has one yet.
    pub(super) state: Option<OwnedFd>,
    /// The journal of an interrupted update this run converges.
    pub(super) interrupted: Option<Journal>,
}

impl Target {
    /// The target's manifest.
    pub(super) fn manifest(&self) -> &Manifest {
        &self.resolved.manifest
    }
}

/// Resolve the target: arguments first, else an interrupted update; open
/// its source and fetch and verify its manifest.
pub(super) fn resolve(ctx: &mut Ctx<'_>, report: &mut ApplyReport) -> Result<Target> {
    let state = ctx.root.state_dir()?;
    let journal = match &state {
        Some(s) => Journal::load(s.as_fd())?,
        None => None,
    };
    let interrupted = journal.as_ref().filter(|j| j.interrupted()).cloned();
    let (id, from) = target_and_source(ctx, interrupted.as_ref())?;
    if let Some(j) = &interrupted {
        report.resumed = true;
        ctx.progress.line(&format!(
            "an update to {} was interrupted during {:?}; converging",
            j.target, j.phase
        ));
    }
    ctx.status.target = Some(id.clone());
    ctx.status.source = Some(from.clone());
    report.id = id.clone();
    report.from_id = ctx.root.image_id()?;
    ctx.advance(Event::Planned);
    let mut net = crate::net::fetch::NetOptions::for_root(
        ctx.opts.ca_file.as_deref(),
        ctx.cfg.ca_file.as_deref(),
        &ctx.root.path,
    );
    net.limits = ctx.cfg.fetch.clone();
    let source = open_source(&from, &id, &net, state.as_ref())?;
    report.source = source.describe();
    report.rollback_in_place = source.is_keep();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let tuf = super::trust::refresh(
        &ctx.root.path,
        state.as_ref(),
        &source,
        ctx.cfg.allow_expired_index,
        now,
    )?;
    let keys_dir = ctx.root.path.join("etc/imageupd/trusted.d");
    let keys = match &tuf {
        // With a root of trust its targets keys sign, not trusted.d.
        Some(v) => v
            .root
            .role("targets")
            .keyids
            .iter()
            .filter_map(|k| v.root.keys.get(k).copied())
            .collect(),
        None => sign::load_trusted(&keys_dir)?,
    };
    let trust = Trust {
        keys: &keys,
        keys_dir: match &tuf {
            Some(v) => format!("{} (root v{})", super::trust::ANCHOR, v.root.doc.version),
            None => keys_dir.display().to_string(),
        },
        allow_unsigned: ctx.opts.allow_unsigned || ctx.cfg.allow_unsigned,
        tuf: tuf.as_ref().map(|v| (&v.root, v.index.as_ref())),
    };
    let threads = ctx.cfg.threads();
    let resolved = source.manifest(&id, &trust, threads)?;
    report.index = tuf.and_then(|v| {
        let (channel, _) = releases::release_of(&resolved.manifest);
        let mut r = v.report?;
        r.newest_on_channel = v
            .index
            .as_ref()
            .and_then(|ix| ix.newest_on(channel))
            .map(|(i, n)| (i.to_owned(), n));
        Some(r)
    });
    if let Some((newer, n)) = report
        .index
        .as_ref()
        .and_then(|i| i.newest_on_channel.clone())
    {
        let (channel, release) = releases::release_of(&resolved.manifest);
        if n > release {
            let w = format!(
                "the store's signed index lists a newer release on channel {channel:?}: {n} (image {newer}) \
                 than the {release} of {id}; is this node's metadata stale?"
            );
            tracing::warn!("{w}");
            report.warnings.push(w);
        }
    }
    check_release(ctx, state.as_ref(), &resolved, report, interrupted.as_ref())?;
    report.signed_by = resolved.signed_by.clone();
    report.download = source.download_report();
    Ok(Target {
        id,
        source,
        resolved,
        threads,
        state,
        interrupted,
    })
}

/// Open `from`; a `keep+` location is the keep area and the node's record
/// of `id` in front of the original source (a rollback in place).
fn open_source(
    from: &str,
    id: &str,
    net: &crate::net::fetch::NetOptions,
    state: Option<&OwnedFd>,
) -> Result<Source> {
    let Some(inner) = keep_source::strip_keep(from) else {
        return Source::open_with(from, net);
    };
    let inner = Source::open_with(inner, net)?;
    let record = match state {
        Some(s) => crate::engine::record::stored_record_of(s.as_fd(), id)?,
        None => None,
    };
    let keep = KeepSource::open(state.map(|s| s.as_fd()), record, inner)?;
    Ok(Source::Keep(Box::new(keep)))
}

/// Downgrade protection and the node's role, before anything is fetched:
/// refused (exit 4) unless the root already runs this image, the image is
/// the target of an interrupted update this node began, or the operator
/// allowed a downgrade locally.
fn check_release(
    ctx: &Ctx<'_>,
    state: Option<&OwnedFd>,
    r: &Resolved,
    report: &ApplyReport,
    interrupted: Option<&Journal>,
) -> Result<()> {
    let id = &r.manifest.id;
    if report.from_id.as_deref() == Some(id.as_str()) {
        return Ok(());
    }
    let marks = match state {
        Some(s) => releases::load(s.as_fd()).context(ExitKind::Untrusted)?,
        None => releases::Marks::default(),
    };
    let resuming = interrupted.is_some_and(|j| &j.target == id);
    releases::check(
        &marks,
        &r.manifest,
        ctx.cfg.compatible.as_deref(),
        ctx.opts.allow_downgrade || resuming,
    )
    .map_err(anyhow::Error::from)
    .context(ExitKind::Untrusted)
}

/// The image id and source: `--id` and `--from`, else the interrupted
/// update's.
fn target_and_source(ctx: &Ctx<'_>, interrupted: Option<&Journal>) -> Result<(String, String)> {
    let id = ctx
        .opts
        .id
        .clone()
        .or_else(|| interrupted.map(|j| j.target.clone()))
        .ok_or_else(|| anyhow!("no target image: pass --id ID (or --from-metadata)"))
        .context(ExitKind::Usage)?;
    let from = ctx
        .opts
        .from
        .clone()
        .or_else(|| {
            interrupted
                .filter(|j| j.target == id)
                .map(|j| j.source.clone())
        })
        .ok_or_else(|| anyhow!("no source: pass --from STORE_OR_IMAGE_DIR"))
        .context(ExitKind::Usage)?;
    Ok((id, from))
}
