//! Watching the metadata (SPEC §6): inotify through the `notify` crate on
//! the directories holding the metadata files, a [`Debouncer`] so a burst of
//! writes (os-collect-config rewrites several files per change) is read once,
//! and a periodic rescan by the caller as a safety net for anything inotify
//! misses (a directory created later, a network filesystem).
//!
//! Directories are watched rather than files because os-collect-config
//! replaces files by rename, which would silently end a watch on the old
//! inode. A directory that does not exist yet is covered by watching its
//! nearest existing ancestor until it appears.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher};

/// How many quiet periods a continuous stream of events may postpone a read:
/// the longest delay is this times the debounce.
pub const MAX_DELAY_FACTOR: u32 = 10;

/// Coalesces bursts of events: fires once the events have been quiet for
/// `quiet`, or at the latest `max_delay` after the first event of the burst,
/// so a file rewritten forever still gets read.
#[derive(Debug, Clone)]
pub struct Debouncer {
    quiet: Duration,
    max_delay: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Debouncer {
    /// A debouncer with quiet time `quiet` and longest delay
    /// [`MAX_DELAY_FACTOR`]`·quiet`.
    pub fn new(quiet: Duration) -> Self {
        Debouncer {
            quiet,
            max_delay: quiet * MAX_DELAY_FACTOR,
            first: None,
            last: None,
        }
    }

    /// An event happened at `now`.
    pub fn event(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// Whether events are waiting.
    pub fn pending(&self) -> bool {
        self.first.is_some()
    }

    /// When the pending burst is due, if any.
    pub fn deadline(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        Some((last + self.quiet).min(first + self.max_delay))
    }

    /// True (once per burst) when the burst is due at `now`.
    pub fn fire(&mut self, now: Instant) -> bool {
        match self.deadline() {
            Some(d) if now >= d => {
                self.first = None;
                self.last = None;
                true
            }
            _ => false,
        }
    }
}

/// Whether a filesystem event can mean changed metadata. Reads (open,
/// close without writing, access) are ignored, so the agent's own reads can
/// never wake it up again.
pub fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// An inotify watch on a changing set of directories. Each relevant event
/// calls the callback given to [`DirWatcher::new`].
pub struct DirWatcher {
    inner: notify::RecommendedWatcher,
    /// Directories watched now (after ancestor substitution).
    watched: Vec<PathBuf>,
}

impl DirWatcher {
    /// A watcher that calls `on_change` (from its own thread) for each
    /// event that may change the metadata.
    pub fn new<F: Fn() + Send + 'static>(on_change: F) -> Result<Self> {
        let inner =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(ev) if is_change(&ev.kind) => on_change(),
                Ok(_) => {}
                // Overflow and friends: let the caller rescan.
                Err(e) => {
                    tracing::warn!("metadata watch error: {e}; rescanning");
                    on_change();
                }
            })
            .context("starting the inotify watcher")?;
        Ok(DirWatcher {
            inner,
            watched: Vec::new(),
        })
    }

    /// Watch exactly `dirs` (or, for those that do not exist, their nearest
    /// existing ancestors). Cheap when nothing changed; call after each read.
    pub fn set(&mut self, dirs: &[PathBuf]) {
        let mut want: Vec<PathBuf> = Vec::new();
        for d in dirs {
            if let Some(w) = existing_ancestor(d) {
                if !want.contains(&w) {
                    want.push(w);
                }
            }
        }
        let old = std::mem::take(&mut self.watched);
        for d in &old {
            if !want.contains(d) {
                let _ = self.inner.unwatch(d);
            }
        }
        for d in want {
            if old.contains(&d) {
                self.watched.push(d);
                continue;
            }
            match self.inner.watch(&d, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::debug!("watching {}", d.display());
                    self.watched.push(d);
                }
                Err(e) => tracing::warn!(
                    "cannot watch {}: {e}; relying on the periodic rescan",
                    d.display()
                ),
            }
        }
    }

    /// The directories watched now.
    pub fn watched(&self) -> &[PathBuf] {
        &self.watched
    }
}

/// `dir` itself if it is a directory, else its nearest existing ancestor.
fn existing_ancestor(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .find(|a| !a.as_os_str().is_empty() && a.is_dir())
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn debounce_waits_for_quiet_and_caps_the_delay() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(100 * MS);
        assert!(!d.pending());
        assert_eq!(d.deadline(), None);
        assert!(!d.fire(t0 + 10_000 * MS), "nothing pending");
        d.event(t0);
        d.event(t0 + 50 * MS);
        assert_eq!(d.deadline(), Some(t0 + 150 * MS));
        assert!(!d.fire(t0 + 149 * MS));
        assert!(d.fire(t0 + 150 * MS));
        assert!(!d.fire(t0 + 151 * MS), "fires once per burst");
        // A never-ending burst still fires after MAX_DELAY_FACTOR quiet times.
        let mut d = Debouncer::new(100 * MS);
        let mut fired_at = None;
        for i in 0..50u32 {
            let now = t0 + i * 50 * MS;
            if d.fire(now) {
                fired_at = Some(i * 50);
                break;
            }
            d.event(now);
        }
        assert_eq!(fired_at, Some(1000));
    }

    #[test]
    fn reads_are_not_changes() {
        use notify::event::{CreateKind, ModifyKind, RenameMode};
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
    }

    #[test]
    fn watcher_sees_renames_into_a_late_directory() {
        let d = tempfile::tempdir().unwrap();
        let meta = d.path().join("later/meta");
        let (tx, rx) = mpsc::channel();
        let mut w = DirWatcher::new(move || {
            let _ = tx.send(());
        })
        .unwrap();
        w.set(std::slice::from_ref(&meta));
        assert_eq!(w.watched(), &[d.path().to_path_buf()]);
        std::fs::create_dir(d.path().join("later")).unwrap();
        rx.recv_timeout(Duration::from_secs(5))
            .expect("event for the created directory");
        std::fs::create_dir(&meta).unwrap();
        w.set(std::slice::from_ref(&meta));
        assert_eq!(w.watched(), std::slice::from_ref(&meta));
        while rx.recv_timeout(Duration::from_millis(200)).is_ok() {}
        // Reading is not an event.
        std::fs::write(d.path().join("x"), "1").unwrap();
        let _ = std::fs::read_dir(&meta).unwrap().count();
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "reads must not wake the watcher"
        );
        let tmp = meta.join(".tmp");
        std::fs::write(&tmp, "{}").unwrap();
        std::fs::rename(&tmp, meta.join("m.json")).unwrap();
        rx.recv_timeout(Duration::from_secs(5))
            .expect("event for the rename");
        // The rename's own events may trail it on a loaded machine: wait
        // for quiet before checking that a read stays silent.
        while rx.recv_timeout(Duration::from_millis(200)).is_ok() {}
        let _ = std::fs::read(meta.join("m.json")).unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "reading a file must not wake the watcher"
        );
    }
}
