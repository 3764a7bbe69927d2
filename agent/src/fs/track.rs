//! Change tracking: between two walks of the root, which directories
//! changed, so the next plan re-reads only those (SPEC §6, the agent).
//!
//! The agent marks the root's whole filesystem with fanotify
//! (`FAN_MARK_FILESYSTEM`, reporting directory handles and names), so the
//! kernel tells it of every create, delete, move, attribute and content
//! change on it, whoever makes it and through whichever mount. A drain
//! thread keeps the kernel's queue short; each walk first drains what is
//! queued, so every change made before the walk began is either in the set
//! it is handed or read by the walk itself, and every change after lands
//! in the next set.
//!
//! The tracker vouches only for an unbroken interval: the walk it hands
//! the previous walk's objects to ([`Tracker::begin`]) must follow a walk of
//! this same process with nothing lost in between. Anything it cannot vouch
//! for makes the walk a full one, and the reason is reported: the first walk
//! since the agent started, a queue overflow, too many changed directories,
//! a changed preserve list, a mount added or removed below the root, a
//! handle it could not resolve, or a walk that did not finish.

use std::collections::{BTreeSet, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use anyhow::{Context, Result};
use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};

use crate::format::manifest::RelPath;
use crate::fs::node::Node;

pub mod events;
pub mod walk;

use events::Handle;

/// Default bound on the changed directories remembered between walks;
/// beyond it the next walk is a full one (a mass change is cheaper to walk
/// than to list directory by directory).
pub const DEFAULT_MAX_DIRS: usize = 16_384;
/// Bytes read from the fanotify descriptor at a time (64 KiB: about a
/// thousand events).
const READ_BYTES: usize = 64 << 10;
/// How often the drain thread wakes to read the queue when nothing
/// arrives, in ms (it also wakes when events arrive).
const DRAIN_POLL_MS: u16 = 1000;
/// Once events arrive, how long the drain thread lets more gather before
/// it reads, in ms: a busy log file on the root's filesystem then costs a
/// few reads a second, not one per write (the kernel merges repeats of the
/// same event while they wait in the queue).
const DRAIN_BATCH_MS: u64 = 200;

/// Why the last walk cannot be trusted when no walk has handed its objects
/// back yet.
const NO_WALK_YET: &str = "first walk since the agent started";
/// Why the last walk cannot be trusted while it runs (or when it failed).
const UNFINISHED: &str = "the last walk did not finish";

/// What a walk leaves for the next one.
pub struct Baseline {
    /// The walk's objects, in manifest order, each with the content digest
    /// the plan took it to hold (`known`).
    pub nodes: Vec<Node>,
    /// What shaped the walk (the preserve list and skipped paths); a
    /// different one makes the next walk full.
    pub key: String,
    /// Mount points at or below the root when it walked.
    pub mounts: Vec<Vec<u8>>,
    /// When that walk began, ns since the epoch: an inode whose ctime is
    /// within [`crate::fs::stamps::RACY_NS`] of it may have changed again
    /// unseen by its ctime (see [`crate::fs::stamps`]).
    pub walk_start_ns: i64,
}

/// The changed directories a walk must read again.
#[derive(Debug, Default)]
pub struct Changes {
    /// Paths of directories whose entries changed, or whose own
    /// attributes did (then their parent is in the set too).
    pub dirs: BTreeSet<RelPath>,
    /// Directory handles the kernel reported that no longer resolve
    /// (removed since: their parents are in `dirs`).
    pub stale: u64,
}

#[derive(Default)]
struct State {
    /// Changed directories since the last drain: handle, and whether the
    /// event was on the directory itself.
    dirty: HashSet<(Handle, bool)>,
    /// Why the interval since the last walk cannot be vouched for.
    lost: Option<String>,
    /// The last walk's objects, until the next walk takes them.
    baseline: Option<Baseline>,
    /// Mount points below the root when the walk under way began; `Some`
    /// from [`Tracker::begin`] until [`Tracker::finish`].
    walk_mounts: Option<Vec<Vec<u8>>>,
    /// A walk began and never handed its objects back.
    unfinished: bool,
}

/// A live fanotify mark on the root's filesystem and what it has seen.
pub struct Tracker {
    fan: Fanotify,
    /// The root as this process names it (canonical), for handle paths.
    root: PathBuf,
    /// The root, as the mount `open_by_handle_at` resolves handles on.
    root_fd: OwnedFd,
    max_dirs: usize,
    /// Test-only: forget every change heard of so far whenever another
    /// process causes one (the tracking test's positive control: changes
    /// behind the agent's back go unseen).
    blind: bool,
    state: Mutex<State>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker").field("root", &self.root).finish()
    }
}

impl Tracker {
    /// Mark the filesystem holding `root` and start draining its events.
    /// Needs `CAP_SYS_ADMIN` and Linux 5.9 or later.
    pub fn start(root: &Path, max_dirs: usize) -> Result<Arc<Tracker>> {
        let root = root
            .canonicalize()
            .with_context(|| format!("resolving {}", root.display()))?;
        let flags = InitFlags::FAN_CLOEXEC
            | InitFlags::FAN_NONBLOCK
            | InitFlags::FAN_CLASS_NOTIF
            | InitFlags::from_bits_retain(libc::FAN_REPORT_DFID_NAME);
        let fan = Fanotify::init(flags, EventFFlags::O_RDONLY | EventFFlags::O_CLOEXEC)
            .context("fanotify_init (change tracking needs CAP_SYS_ADMIN and Linux 5.9)")?;
        let mask = MaskFlags::FAN_CREATE
            | MaskFlags::FAN_DELETE
            | MaskFlags::FAN_MOVED_FROM
            | MaskFlags::FAN_MOVED_TO
            | MaskFlags::FAN_ATTRIB
            | MaskFlags::FAN_MODIFY
            | MaskFlags::FAN_CLOSE_WRITE
            | MaskFlags::FAN_DELETE_SELF
            | MaskFlags::FAN_MOVE_SELF
            | MaskFlags::FAN_ONDIR;
        fan.mark(
            MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
            mask,
            nix::fcntl::AT_FDCWD,
            Some(&root),
        )
        .with_context(|| format!("fanotify_mark of the filesystem of {}", root.display()))?;
        let root_fd: OwnedFd = std::fs::File::open(&root)
            .with_context(|| format!("opening {}", root.display()))?
            .into();
        let t = Arc::new(Tracker {
            fan,
            root,
            root_fd,
            max_dirs: max_dirs.max(1),
            blind: crate::sys::fault::unsafe_skip(crate::sys::fault::SKIP_TRACK_EVENTS),
            state: Mutex::new(State {
                lost: Some(NO_WALK_YET.into()),
                ..State::default()
            }),
        });
        spawn_drain(Arc::downgrade(&t))?;
        Ok(t)
    }

    /// Begin a walk: drain the queue, take the changed directories and the
    /// last walk's objects. `Err` says why the walk must be a full one
    /// (the tracker then vouches again from this walk on).
    pub fn begin(&self, key: &str) -> Result<(Baseline, Changes), String> {
        let mounts = mounts_below(&self.root).map_err(|e| format!("{e:#}"));
        let (dirty, lost, baseline) = {
            let mut st = self.state.lock().map_err(|_| "tracker lock poisoned")?;
            self.drain(&mut st);
            let dirty = std::mem::take(&mut st.dirty);
            let mut lost = st.lost.take();
            if std::mem::replace(&mut st.unfinished, true) {
                lost.get_or_insert_with(|| UNFINISHED.into());
            }
            st.walk_mounts = mounts.as_ref().ok().cloned();
            (dirty, lost, st.baseline.take())
        };
        let mounts = mounts?;
        if let Some(why) = lost {
            return Err(why);
        }
        let base = baseline.ok_or(NO_WALK_YET)?;
        if base.key != key {
            return Err("the preserve list changed".into());
        }
        if base.mounts != mounts {
            return Err("mounts below the root changed".into());
        }
        let changes = self.resolve(dirty)?;
        for d in changes.dirs.iter().take(20) {
            tracing::debug!("changed since the last walk: {d}");
        }
        Ok((base, changes))
    }

    /// A walk is done: its objects are the next walk's baseline.
    pub fn finish(&self, nodes: Vec<Node>, key: String, walk_start_ns: i64) {
        if let Ok(mut st) = self.state.lock() {
            let Some(mounts) = st.walk_mounts.take() else {
                return;
            };
            // Something lost while the walk ran stays lost.
            st.unfinished = false;
            st.baseline = Some(Baseline {
                nodes,
                key,
                mounts,
                walk_start_ns,
            });
        }
    }

    /// Read everything queued (the descriptor does not block).
    fn drain(&self, st: &mut State) {
        let mut buf = vec![0u8; READ_BYTES];
        loop {
            let n = match nix::unistd::read(self.fan.as_fd(), &mut buf) {
                Ok(0) | Err(nix::errno::Errno::EAGAIN) => return,
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    st.lost = Some(format!("reading fanotify events: {e}"));
                    return;
                }
            };
            match events::parse(&buf[..n]) {
                Ok(evs) => {
                    for e in evs {
                        self.note(st, e);
                    }
                }
                Err(e) => st.lost = Some(format!("{e}")),
            }
        }
    }

    fn note(&self, st: &mut State, e: events::Event) {
        if e.fd >= 0 {
            // Not in this reporting mode; never leak one.
            let _ = nix::unistd::close(e.fd);
        }
        if e.overflowed() {
            st.lost = Some("the kernel's event queue overflowed".into());
        }
        if st.lost.is_some() || (self.blind && e.pid != std::process::id() as i32) {
            st.dirty.clear();
            return;
        }
        if let Some(h) = e.dir {
            let own = e.name.as_deref() == Some(b".");
            st.dirty.insert((h, own));
            if st.dirty.len() > self.max_dirs {
                st.lost = Some(format!("more than {} directories changed", self.max_dirs));
                st.dirty.clear();
            }
        }
    }

    /// The paths below the root of the changed directories.
    fn resolve(&self, dirty: HashSet<(Handle, bool)>) -> Result<Changes, String> {
        let mut c = Changes::default();
        for (h, own) in dirty {
            let fd =
                match crate::sys::handle::open_by_handle(self.root_fd.as_fd(), h.htype, &h.bytes) {
                    Ok(fd) => fd,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOENT)) => {
                        c.stale += 1;
                        continue;
                    }
                    Err(e) => return Err(format!("cannot resolve a changed directory: {e}")),
                };
            let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(|e| format!("cannot name a changed directory: {e}"))?;
            let Some(rel) = rel_below(&self.root, &link) else {
                // Removed (" (deleted)") or outside the root: its parent's
                // event covers the first, the walk never sees the second.
                c.stale += 1;
                continue;
            };
            if own {
                if let Some(p) = rel.parent() {
                    c.dirs.insert(p);
                }
            }
            c.dirs.insert(rel);
        }
        Ok(c)
    }
}

/// `path` relative to `root`, when it is at or below it.
fn rel_below(root: &Path, path: &Path) -> Option<RelPath> {
    use std::os::unix::ffi::OsStrExt;
    let rest = path.strip_prefix(root).ok()?;
    let b = rest.as_os_str().as_bytes();
    if b.is_empty() {
        return Some(RelPath::root());
    }
    if b.ends_with(b" (deleted)") {
        return None;
    }
    Some(RelPath(b.to_vec()))
}

/// Mount points strictly below `root`, sorted (`/proc/self/mountinfo`).
pub fn mounts_below(root: &Path) -> Result<Vec<Vec<u8>>> {
    let info = std::fs::read("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse_mounts_below(&info, root))
}

/// The mount points strictly below `root` in mountinfo text (field 5,
/// octal escapes kept as they are).
fn parse_mounts_below(info: &[u8], root: &Path) -> Vec<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let r = root.as_os_str().as_bytes();
    let mut prefix = r.to_vec();
    if !prefix.ends_with(b"/") {
        prefix.push(b'/');
    }
    let mut out: Vec<Vec<u8>> = info
        .split(|&b| b == b'\n')
        .filter_map(|l| l.split(|&b| b == b' ').nth(4))
        .filter(|m| m.starts_with(&prefix) && m.len() > prefix.len())
        .map(<[u8]>::to_vec)
        .collect();
    out.sort();
    out
}

/// Keep the kernel's queue short between walks.
fn spawn_drain(t: Weak<Tracker>) -> Result<()> {
    std::thread::Builder::new()
        .name("track".into())
        .spawn(move || loop {
            let Some(t) = t.upgrade() else { return };
            let mut fds = [nix::poll::PollFd::new(
                t.fan.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(DRAIN_POLL_MS));
            if ready.is_ok_and(|n| n > 0) {
                std::thread::sleep(std::time::Duration::from_millis(DRAIN_BATCH_MS));
            }
            let locked = t.state.lock();
            if let Ok(mut st) = locked {
                t.drain(&mut st);
            }
        })
        .context("starting the change-tracking thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_below_the_root_only() {
        let info = b"22 1 0:21 / / rw - ext4 /dev/vda rw\n\
            30 22 0:30 / /mnt/root rw - ext4 /dev/loop0 rw\n\
            31 30 0:31 / /mnt/root/var rw - ext4 /dev/loop1 rw\n\
            32 22 0:32 / /mnt/rootfoo rw - ext4 /dev/loop2 rw\n\
            33 30 0:33 / /mnt/root/boot/efi rw - vfat /dev/loop3 rw\n";
        let m = parse_mounts_below(info, Path::new("/mnt/root"));
        assert_eq!(
            m,
            vec![b"/mnt/root/boot/efi".to_vec(), b"/mnt/root/var".to_vec()]
        );
        let all = parse_mounts_below(info, Path::new("/"));
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn paths_below_the_root() {
        let r = Path::new("/mnt/root");
        assert_eq!(rel_below(r, Path::new("/mnt/root")), Some(RelPath::root()));
        assert_eq!(
            rel_below(r, Path::new("/mnt/root/usr/lib")),
            Some(RelPath(b"usr/lib".to_vec()))
        );
        assert_eq!(rel_below(r, Path::new("/mnt/rootfoo/x")), None);
        assert_eq!(rel_below(r, Path::new("/mnt/root/gone (deleted)")), None);
        assert_eq!(
            rel_below(Path::new("/"), Path::new("/etc")),
            Some(RelPath(b"etc".to_vec()))
        );
    }
}
