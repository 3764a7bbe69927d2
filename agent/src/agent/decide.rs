//! Whether the root must move: the decision from a metadata snapshot,
//! apart from the daemon that acts on it.

use std::os::fd::AsFd;

use anyhow::{anyhow, Context, Result};

use crate::agent::metadata::Snapshot;
use crate::engine::config::Config;
use crate::engine::journal::Journal;
use crate::fs::rootfs::RootFs;
use crate::net::keep_source::strip_keep;
use crate::sys::backoff::target_key;
use crate::sys::error::ExitKind;

/// What to do about the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: the root already runs the image (or none is asked for).
    Nothing {
        /// Why, for the operator.
        why: String,
        /// The id asked for, if any.
        id: Option<String>,
    },
    /// Update the root.
    Apply {
        /// Target image.
        id: String,
        /// Source to take it from.
        from: String,
        /// Backoff key.
        key: String,
        /// An interrupted update is being converged.
        resume: bool,
    },
}

/// Decide from a metadata snapshot. `from` (the command line's `--from`)
/// beats the metadata's source, which beats `default_source`. An update an
/// earlier run left half-done is always converged, metadata or not; an
/// interrupted rollback in place (a `keep+` journal) from its own source.
pub fn decide(
    root: &RootFs,
    cfg: &Config,
    snap: &Snapshot,
    from: Option<&str>,
) -> Result<Decision> {
    let a = &cfg.agent;
    let wanted = snap.wanted(&a.image_id_key, &a.image_source_key)?;
    let journal = match root.state_dir()? {
        Some(s) => Journal::load(s.as_fd())?,
        None => None,
    };
    let interrupted = journal.filter(|j| j.interrupted());
    // An interrupted rollback in place is finished first, whatever the
    // metadata says: it still names the image that failed its gate.
    if let Some(j) = interrupted
        .as_ref()
        .filter(|j| strip_keep(&j.source).is_some())
    {
        return Ok(Decision::Apply {
            key: target_key(&j.target, Some(&j.source)),
            id: j.target.clone(),
            from: j.source.clone(),
            resume: true,
        });
    }
    let current = root.image_id()?;
    let Some(w) = wanted else {
        if let Some(j) = interrupted {
            let from = from.map(str::to_owned).unwrap_or(j.source.clone());
            return Ok(Decision::Apply {
                key: target_key(&j.target, Some(&from)),
                id: j.target,
                from,
                resume: true,
            });
        }
        return Ok(Decision::Nothing {
            why: format!("the metadata names no image (key {:?})", a.image_id_key),
            id: None,
        });
    };
    let resume = interrupted.is_some();
    if current.as_deref() == Some(w.id.as_str()) && !resume {
        return Ok(Decision::Nothing {
            why: format!("{} already runs image {}", root.path.display(), w.id),
            id: Some(w.id),
        });
    }
    let src = from
        .map(str::to_owned)
        .or(w.source)
        .or_else(|| a.default_source.clone())
        .or_else(|| interrupted.as_ref().filter(|j| j.target == w.id).map(|j| j.source.clone()))
        .ok_or_else(|| {
            anyhow!(
                "the metadata asks for image {} but names no source (key {:?}) and no default_source is configured in [agent]; pass --from",
                w.id,
                a.image_source_key
            )
        })
        .context(ExitKind::Usage)?;
    Ok(Decision::Apply {
        key: target_key(&w.id, Some(&src)),
        id: w.id,
        from: src,
        resume,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::journal::JournalPhase;

    /// A root with a journal of an update to `a` from `source`, in `phase`.
    fn root_with_journal(dir: &std::path::Path, source: &str, phase: JournalPhase) -> RootFs {
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/image_id"), "b\n").unwrap();
        let root = RootFs::open(dir).unwrap();
        let state = root.ensure_state_dir().unwrap();
        let mut j = Journal {
            target: "a".into(),
            from: Some("b".into()),
            source: source.into(),
            phase,
            remounted_rw: false,
            started: String::new(),
            updated: String::new(),
        };
        j.store(state.as_fd(), phase).unwrap();
        root
    }

    fn wants_b() -> Snapshot {
        Snapshot {
            doc: serde_json::json!({"image_id": "b", "image_source": "http://store.example/"}),
            files: Vec::new(),
            changed_at: None,
        }
    }

    #[test]
    fn an_interrupted_rollback_in_place_is_finished_whatever_the_metadata_says() {
        let d = tempfile::tempdir().unwrap();
        let root = root_with_journal(d.path(), "keep+/srv/store", JournalPhase::Swapping);
        let got = decide(&root, &Config::default(), &wants_b(), Some("/other")).unwrap();
        assert_eq!(
            got,
            Decision::Apply {
                id: "a".into(),
                from: "keep+/srv/store".into(),
                key: target_key("a", Some("keep+/srv/store")),
                resume: true,
            }
        );
    }

    #[test]
    fn an_interrupted_update_goes_where_the_metadata_says() {
        // The control: an ordinary interrupted journal does not override
        // the metadata's image.
        let d = tempfile::tempdir().unwrap();
        let root = root_with_journal(d.path(), "/srv/store", JournalPhase::Swapping);
        let got = decide(&root, &Config::default(), &wants_b(), None).unwrap();
        assert!(
            matches!(&got, Decision::Apply { id, resume: true, .. } if id == "b"),
            "{got:?}"
        );
        // A finished rollback's journal is no reason to move.
        let d = tempfile::tempdir().unwrap();
        let root = root_with_journal(d.path(), "keep+/srv/store", JournalPhase::Committed);
        let got = decide(&root, &Config::default(), &wants_b(), None).unwrap();
        assert!(matches!(got, Decision::Nothing { .. }), "{got:?}");
    }
}
