//! `imageupd apply --from-metadata`: one decision and one update, recorded
//! for `status`.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, Result};

use crate::agent::decide::{decide, Decision};
use crate::agent::metadata::{MetadataSource, Snapshot, OS_CONFIG_FILES_ENV};
use crate::agent::record::{AgentRecord, Applied};
use crate::apply::{self, ApplyOptions, ApplyReport};
use crate::engine::config::{Config, KernelPolicy};
use crate::fs::rootfs::RootFs;
use crate::sys::backoff::epoch_ms;
use crate::sys::error::ExitKind;
use crate::sys::progress::Progress;

/// Options of `imageupd apply --from-metadata` (and `plan --from-metadata`).
#[derive(Debug, Clone, Default)]
pub struct FromMetadataOptions {
    /// The root.
    pub root: PathBuf,
    /// `--from`, overriding the metadata's source.
    pub from: Option<String>,
    /// `--allow-unsigned`.
    pub allow_unsigned: bool,
    /// `--allow-downgrade` (local intent; the agent never sets it).
    pub allow_downgrade: bool,
    /// `--kernel-policy`.
    pub kernel_policy: Option<KernelPolicy>,
    /// Plan only (`plan --from-metadata`, `apply --download-only`): resolve,
    /// verify and plan, change nothing, record nothing.
    pub dry_run: bool,
    /// `--ca-file` for an `https://` source.
    pub ca_file: Option<PathBuf>,
}

/// Read the metadata source the configuration names.
pub fn read_metadata(cfg: &Config) -> (MetadataSource, Result<Snapshot>) {
    let src = cfg
        .agent
        .metadata_source(std::env::var(OS_CONFIG_FILES_ENV).ok());
    let snap = src.read().map_err(anyhow::Error::new);
    (src, snap)
}

/// `imageupd apply --from-metadata`: resolve the target from the metadata
/// and apply it, or report "nothing to do" without touching anything when
/// the root already runs it. Records the outcome for `status`.
pub fn apply_from_metadata(o: &FromMetadataOptions, progress: &Progress) -> Result<ApplyReport> {
    let root = RootFs::open(&o.root).context(ExitKind::Usage)?;
    let cfg = Config::load(&root.path)?;
    let rt = root.runtime_dir();
    let (src, snap) = read_metadata(&cfg);
    let snap = match snap {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("{e:#}");
            if !o.dry_run {
                let _ = AgentRecord::update(&rt, |r| {
                    r.metadata_source = src.describe();
                    r.metadata_error = Some(msg.clone());
                });
            }
            return Err(e.context(format!(
                "cannot use the metadata ({}); {} was not changed",
                src.describe(),
                root.path.display()
            )));
        }
    };
    let decision = decide(&root, &cfg, &snap, o.from.as_deref())?;
    let (id, from, key, resume) = match decision {
        Decision::Nothing { why, id } => {
            progress.line(&format!("nothing to do: {why}"));
            if !o.dry_run {
                AgentRecord::update(&rt, |r| {
                    r.metadata_source = src.describe();
                    r.metadata_error = None;
                    if let Some(i) = &id {
                        let key_src = r.wanted_source.clone().unwrap_or_default();
                        r.saw(i, &key_src, &snap);
                    }
                    if r.agent_pid.is_none() {
                        r.state = "cli".into();
                    }
                })?;
            }
            return Ok(ApplyReport {
                result: "nothing-to-do".into(),
                id: id.unwrap_or_default(),
                from_id: root.image_id()?,
                root: root.path.display().to_string(),
                warnings: vec![why],
                ..Default::default()
            });
        }
        Decision::Apply {
            id,
            from,
            key,
            resume,
        } => (id, from, key, resume),
    };
    // The fleet rollout: the same slots, gate and hold-back as the agent.
    let fleet = match o.dry_run {
        true => None,
        false => crate::fleet::Rollout::open(&root.path, &rt, &cfg)?,
    };
    if let Some(rep) = held_back(&root, fleet.as_ref(), &snap, &id, resume, o, progress)? {
        return Ok(rep);
    }
    if !o.dry_run {
        AgentRecord::update(&rt, |r| {
            r.metadata_source = src.describe();
            r.saw(&id, &from, &snap);
        })?;
    }
    let opts = ApplyOptions {
        root: root.path.clone(),
        from: Some(from.clone()),
        id: Some(id.clone()),
        allow_unsigned: o.allow_unsigned,
        allow_downgrade: o.allow_downgrade,
        kernel_policy: o.kernel_policy,
        dry_run: o.dry_run,
        cancel: None,
        ca_file: o.ca_file.clone(),
        slot: fleet
            .clone()
            .map(|f| f as std::sync::Arc<dyn crate::apply::gate::SlotGate>),
        keep_replaced: crate::fleet::keeps_replaced(&root.path, &cfg),
        tracker: None,
    };
    let root_path = root.path.clone();
    drop(root);
    let started = SystemTime::now();
    let res = apply::run(&opts, progress);
    let res = match o.dry_run {
        true => res,
        false => crate::fleet::settle(&root_path, &cfg, fleet.as_deref(), &id, res, progress),
    };
    if let Some(f) = &fleet {
        f.shutdown();
    }
    if !o.dry_run {
        let policy = cfg.agent.backoff();
        AgentRecord::update(&rt, |r| {
            record_outcome(r, &id, &from, &key, &res, started, &policy);
            if r.agent_pid.is_none() {
                r.state = "cli".into();
            }
        })?;
    }
    res
}

/// The fleet's hold-back (a failed gate, the phased rollout) as a
/// `held-back` report; starts the rollout's lease when the update goes on.
fn held_back(
    root: &RootFs,
    fleet: Option<&std::sync::Arc<crate::fleet::Rollout>>,
    snap: &Snapshot,
    id: &str,
    resume: bool,
    o: &FromMetadataOptions,
    progress: &Progress,
) -> Result<Option<ApplyReport>> {
    if o.dry_run {
        return Ok(None);
    }
    let pct = fleet.and_then(|r| crate::agent::metadata::lookup(&snap.doc, &r.percent_key()));
    let Some(why) = crate::fleet::hold_back(&root.path, fleet.map(|f| &**f), pct, id, resume)
    else {
        if let Some(f) = fleet {
            f.spawn_heartbeat()?;
        }
        return Ok(None);
    };
    progress.line(&format!("not updating to {id} now: {why}"));
    Ok(Some(ApplyReport {
        result: "held-back".into(),
        id: id.to_owned(),
        from_id: root.image_id()?,
        root: root.path.display().to_string(),
        warnings: vec![why],
        ..Default::default()
    }))
}

/// Fold an apply's outcome into the record.
pub(super) fn record_outcome(
    r: &mut AgentRecord,
    id: &str,
    from: &str,
    key: &str,
    res: &Result<ApplyReport>,
    started: SystemTime,
    policy: &crate::sys::backoff::Backoff,
) {
    let now = SystemTime::now();
    match res {
        Ok(rep) => {
            r.last_result = Some(rep.result.clone());
            r.failures.succeeded(key);
            if rep.result == "applied" {
                r.last_error = None;
                r.last_applied = Some(applied_record(r, id, from, rep, started, false));
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            let committed = ExitKind::of(e) == ExitKind::PostApplyHook;
            r.last_result = Some(
                if committed {
                    "failed-committed"
                } else {
                    "failed"
                }
                .into(),
            );
            r.last_error = Some(msg.clone());
            if committed {
                // The root runs the image: nothing to retry, but say so.
                r.failures.succeeded(key);
                let rep = ApplyReport {
                    total_ms: epoch_ms(now).saturating_sub(epoch_ms(started)),
                    ..Default::default()
                };
                r.last_applied = Some(applied_record(r, id, from, &rep, started, true));
            } else {
                r.failures.failed(key, &msg, now, policy);
            }
        }
    }
}

pub(super) fn applied_record(
    r: &AgentRecord,
    id: &str,
    from: &str,
    rep: &ApplyReport,
    started: SystemTime,
    post_failed: bool,
) -> Applied {
    // The commit precedes the post-apply hooks.
    let post = rep.phases.get("post-apply-hooks").copied().unwrap_or(0);
    let committed_ms = epoch_ms(started).saturating_add(rep.total_ms.saturating_sub(post));
    let changed = if r.wanted.as_deref() == Some(id) {
        r.metadata_changed_ms
    } else {
        None
    };
    Applied {
        id: id.to_owned(),
        from: rep.from_id.clone(),
        source: from.to_owned(),
        committed_ms,
        metadata_changed_ms: changed,
        metadata_to_commit_ms: changed.map(|c| committed_ms.saturating_sub(c)),
        apply_ms: rep.total_ms,
        quiesce_ms: rep.quiesce_ms,
        phases_ms: rep.phases.clone(),
        post_apply_failed: post_failed,
        download: rep.download.clone(),
        walk: serde_json::to_value(&rep.walk)
            .ok()
            .filter(|_| !rep.walk.mode.is_empty()),
    }
}
