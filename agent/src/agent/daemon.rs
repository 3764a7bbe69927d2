//! The node agent (SPEC §6) and `apply --from-metadata`.
//!
//! Both read the metadata ([`crate::agent::metadata`]), decide whether the root
//! must move ([`decide`]), run the ordinary pipeline ([`crate::apply::run`],
//! which takes the shared apply lock, journals, runs hooks and writes the
//! live status) and keep their own record of what they applied and what
//! failed ([`AgentRecord`], `agent.json` in the runtime directory, next to
//! the live status).
//!
//! The daemon loop ([`run`]) reacts to inotify events (debounced), rescans
//! periodically, retries a failed target with exponential backoff (never a
//! hot loop), and on SIGTERM never interrupts a swap: an update that has not
//! reached the swap stops at the next safe point, one that has finishes.
//! SIGHUP reloads the configuration and forgets the backoff.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context, Result};

use crate::agent::decide::{decide, Decision};
use crate::agent::from_metadata::record_outcome;
use crate::agent::metadata::{MetadataSource, OS_CONFIG_FILES_ENV};
use crate::agent::record::AgentRecord;
use crate::agent::sdnotify::Notifier;
use crate::agent::watch::{Debouncer, DirWatcher};
use crate::apply::{self, ApplyOptions, ApplyReport};
use crate::engine::config::Config;
use crate::fs::rootfs::RootFs;
use crate::sys::backoff::FailureBook;
use crate::sys::error::ExitKind;
use crate::sys::progress::Progress;

/// Lock held by a running agent, so only one agent serves a root.
const AGENT_LOCK: &str = "agent.lock";
/// Environment variable the agent sets for everything it runs (hooks):
/// `agent`. Unset when `apply` runs from the command line or os-refresh-config.
pub const MODE_ENV: &str = "IMAGEUPD_MODE";

/// Messages to the daemon loop.
enum Msg {
    /// The filesystem under the metadata changed.
    Changed,
    /// A signal arrived.
    Signal(i32),
    /// The update worker finished.
    Done(Box<Result<ApplyReport>>),
}

/// An update under way in the worker thread.
struct Running {
    id: String,
    from: String,
    key: String,
    started: SystemTime,
}

/// The daemon.
struct Agent {
    root: PathBuf,
    rt: PathBuf,
    cfg: Config,
    source: MetadataSource,
    notifier: Notifier,
    tx: mpsc::Sender<Msg>,
    watcher: DirWatcher,
    debouncer: Debouncer,
    retry_at: Option<Instant>,
    running: Option<Running>,
    cancel: Arc<AtomicBool>,
    stopping: bool,
    /// Failures kept in memory too, so that the backoff holds even when the
    /// record cannot be written.
    failures: FailureBook,
    /// The fleet rollout this node takes part in (`[rollout]`), and whether
    /// a claim left by an earlier run has been looked for.
    fleet: Option<(Arc<crate::fleet::Rollout>, bool)>,
    /// Change tracking of the root between updates, when it could start.
    tracker: Option<Arc<crate::fs::track::Tracker>>,
}

/// Run the agent for `root` until SIGTERM or SIGINT.
pub fn run(root: &Path) -> Result<()> {
    let rf = RootFs::open(root).context(ExitKind::Usage)?;
    let root = rf.path.clone();
    let rt = rf.runtime_dir();
    drop(rf);
    std::fs::create_dir_all(&rt).with_context(|| format!("creating {}", rt.display()))?;
    let lock_path = rt.join(AGENT_LOCK);
    let lf = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _agent_lock = nix::fcntl::Flock::lock(lf, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| {
            anyhow!(
                "another imageupd agent already serves {} ({}: {e})",
                root.display(),
                lock_path.display()
            )
        })
        .context(ExitKind::Locked)?;
    let cfg = Config::load(&root)?;
    // Settle a kernel change recorded before this boot, and drop the
    // modules no kernel needs any more (logged; never fatal).
    if let Err(e) = RootFs::open(&root).and_then(|rf| crate::boot::confirm::confirm_boot(&rf)) {
        tracing::warn!("boot check: {e:#}");
    }
    // Hooks can tell they run under the agent (and e.g. re-run configuration).
    // Set before any thread starts.
    std::env::set_var(MODE_ENV, "agent");

    let (tx, rx) = mpsc::channel::<Msg>();
    let stx = tx.clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if stx.send(Msg::Signal(s)).is_err() {
                    break;
                }
            }
        })
        .context("starting the signal thread")?;
    let wtx = tx.clone();
    let watcher = DirWatcher::new(move || {
        let _ = wtx.send(Msg::Changed);
    })?;
    let source = cfg
        .agent
        .metadata_source(std::env::var(OS_CONFIG_FILES_ENV).ok());
    let cancel = Arc::new(AtomicBool::new(false));
    let fleet = crate::fleet::Rollout::open(&root, &rt, &cfg)?;
    if let Some(f) = &fleet {
        f.set_cancel(cancel.clone());
        f.spawn_heartbeat()?;
        tracing::info!("rollout: {}", f.describe());
    }
    let tracker = start_tracking(&root, &cfg);
    let mut agent = Agent {
        tracker,
        debouncer: Debouncer::new(Duration::from_millis(cfg.agent.debounce_ms)),
        root,
        rt,
        cfg,
        source,
        notifier: Notifier::from_env(),
        tx,
        watcher,
        retry_at: None,
        running: None,
        cancel,
        stopping: false,
        failures: FailureBook::default(),
        fleet: fleet.map(|f| (f, false)),
    };
    agent.record(|r| {
        r.agent_pid = Some(std::process::id());
        r.state = "watching".into();
    });
    // The textfile exists from the start (the last apply's, or empty).
    agent.write_metrics();
    tracing::info!(
        "imageupd agent watching {} for {}",
        agent.source.describe(),
        agent.root.display()
    );
    agent
        .notifier
        .ready(&format!("watching {}", agent.source.describe()));
    let res = agent.main_loop(&rx);
    if let Some((f, _)) = &agent.fleet {
        f.shutdown();
    }
    agent.record(|r| {
        r.agent_pid = None;
        r.state = "stopped".into();
    });
    res
}

/// Start tracking changes to the root (logged, never fatal: without it
/// every plan walks the whole root, as `apply` from the command line does).
fn start_tracking(root: &Path, cfg: &Config) -> Option<Arc<crate::fs::track::Tracker>> {
    if !cfg.agent.track_changes {
        tracing::info!(
            "change tracking is off (track_changes = false): every plan walks the whole root"
        );
        return None;
    }
    match crate::fs::track::Tracker::start(root, cfg.agent.track_max_dirs) {
        Ok(t) => {
            tracing::info!("tracking changes to the filesystem of {}", root.display());
            Some(t)
        }
        Err(e) => {
            tracing::warn!("change tracking unavailable, every plan walks the whole root: {e:#}");
            None
        }
    }
}

impl Agent {
    /// The node's metrics textfile, after each update attempt (logged,
    /// never fatal: the agent's job is the update).
    fn write_metrics(&self) {
        let res =
            RootFs::open(&self.root).and_then(|rf| crate::agent::metrics::write(&rf, &self.cfg));
        if let Err(e) = res {
            tracing::warn!("cannot write the metrics textfile: {e:#}");
        }
    }

    fn record(&self, f: impl FnOnce(&mut AgentRecord)) {
        if let Err(e) = AgentRecord::update(&self.rt, f) {
            tracing::warn!("cannot write the agent record: {e:#}");
        }
    }

    fn main_loop(&mut self, rx: &mpsc::Receiver<Msg>) -> Result<()> {
        let rescan = Duration::from_secs(self.cfg.agent.rescan_secs);
        let mut next_rescan = Instant::now();
        let mut eval_now = true;
        let wd = self.notifier.watchdog_interval();
        let mut next_wd = Instant::now();
        loop {
            let now = Instant::now();
            if let Some(iv) = wd {
                if now >= next_wd {
                    self.notifier.watchdog();
                    next_wd = now + iv;
                }
            }
            let retry_due = self.retry_at.is_some_and(|t| now >= t);
            if self.debouncer.fire(now) || now >= next_rescan || retry_due || eval_now {
                eval_now = false;
                next_rescan = now + rescan;
                if retry_due {
                    self.retry_at = None;
                }
                if !self.stopping {
                    self.evaluate();
                }
            }
            if self.stopping && self.running.is_none() {
                self.notifier.stopping("stopped");
                tracing::info!("imageupd agent stopped");
                return Ok(());
            }
            let mut wake = next_rescan;
            for t in [
                self.debouncer.deadline(),
                self.retry_at,
                wd.map(|_| next_wd),
            ]
            .into_iter()
            .flatten()
            {
                wake = wake.min(t);
            }
            match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(Msg::Changed) => self.debouncer.event(Instant::now()),
                Ok(Msg::Signal(s)) if s == signal_hook::consts::SIGHUP => {
                    tracing::info!(
                        "SIGHUP: reloading the configuration and retrying failed updates now"
                    );
                    match Config::load(&self.root) {
                        Ok(c) => {
                            self.source = c
                                .agent
                                .metadata_source(std::env::var(OS_CONFIG_FILES_ENV).ok());
                            self.debouncer =
                                Debouncer::new(Duration::from_millis(c.agent.debounce_ms));
                            self.cfg = c;
                        }
                        Err(e) => tracing::error!("keeping the old configuration: {e:#}"),
                    }
                    self.failures = FailureBook::default();
                    self.record(|r| r.failures = FailureBook::default());
                    self.retry_at = None;
                    eval_now = true;
                }
                Ok(Msg::Signal(s)) => {
                    if !self.stopping {
                        self.stopping = true;
                        match &self.running {
                            Some(run) => {
                                let msg = format!("stopping (signal {s}): the update to {} stops before its swap, or finishes if the swap began", run.id);
                                tracing::info!("{msg}");
                                self.notifier.stopping(&msg);
                                self.cancel.store(true, Ordering::SeqCst);
                            }
                            None => self.notifier.stopping("stopping"),
                        }
                        self.record(|r| r.state = "stopping".into());
                    }
                }
                Ok(Msg::Done(res)) => {
                    self.finished(*res);
                    eval_now = true;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(anyhow!("the agent's event channel closed"))
                }
            }
        }
    }

    /// Read the metadata and start an update if one is due.
    fn evaluate(&mut self) {
        let snap = self.source.read();
        // Re-aim the watches: the list of files may have changed.
        self.watcher.set(&self.source.watch_dirs());
        let snap = match snap {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("{e}");
                tracing::warn!("{msg}; not acting on it");
                self.notifier.status(&format!("metadata unreadable: {msg}"));
                let desc = self.source.describe();
                self.record(|r| {
                    r.metadata_source = desc;
                    r.metadata_error = Some(msg);
                    r.state = "metadata-error".into();
                });
                return;
            }
        };
        let decision = RootFs::open(&self.root).and_then(|rf| decide(&rf, &self.cfg, &snap, None));
        let desc = self.source.describe();
        match decision {
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!("{msg}; not acting on it");
                self.notifier
                    .status(&format!("cannot act on the metadata: {msg}"));
                self.record(|r| {
                    r.metadata_source = desc;
                    r.metadata_error = Some(msg);
                    r.state = "metadata-error".into();
                });
            }
            Ok(Decision::Nothing { why, id }) => {
                self.recover_fleet();
                if id.is_some() {
                    self.failures = FailureBook::default();
                }
                let running = self.running.is_some();
                self.notifier.status(&if running {
                    "applying".to_owned()
                } else {
                    format!("idle: {why}")
                });
                self.record(|r| {
                    r.metadata_source = desc;
                    r.metadata_error = None;
                    if let Some(i) = &id {
                        let s = r.wanted_source.clone().unwrap_or_default();
                        r.saw(i, &s, &snap);
                        // The root runs what is asked for: nothing to retry.
                        r.failures = FailureBook::default();
                    } else {
                        r.wanted = None;
                    }
                    if !running {
                        r.state = "watching".into();
                    }
                });
            }
            Ok(Decision::Apply {
                id,
                from,
                key,
                resume,
            }) => {
                self.record(|r| {
                    r.metadata_source = desc;
                    r.saw(&id, &from, &snap);
                    // Failures of targets the metadata no longer asks for
                    // are history.
                    r.failures.retain_only(&key);
                });
                if self.running.is_some() {
                    return; // re-evaluated when it finishes
                }
                self.failures.retain_only(&key);
                // The record also holds failures of `apply --from-metadata`.
                let now = SystemTime::now();
                let recorded = AgentRecord::load(&self.rt)
                    .map(|r| r.failures.wait(&key, now))
                    .unwrap_or_default();
                let wait = self.failures.wait(&key, now).max(recorded);
                if !wait.is_zero() {
                    let at = Instant::now() + wait;
                    if self.retry_at.is_none_or(|t| t > at) {
                        self.retry_at = Some(at);
                    }
                    let msg = format!(
                        "update to {id} failed before; retrying in {}s",
                        wait.as_secs().max(1)
                    );
                    tracing::info!("{msg}");
                    self.notifier.status(&msg);
                    self.record(|r| r.state = "backing-off".into());
                    return;
                }
                let rollout = self.fleet.as_ref().map(|f| &*f.0);
                let pct = rollout
                    .and_then(|r| crate::agent::metadata::lookup(&snap.doc, &r.percent_key()));
                if let Some(why) = crate::fleet::hold_back(&self.root, rollout, pct, &id, resume) {
                    tracing::debug!("not updating to {id}: {why}");
                    self.notifier.status(&format!("holding back {id}: {why}"));
                    self.record(|r| r.state = "held-back".into());
                    return;
                }
                self.start(id, from, key, resume);
            }
        }
    }

    /// Once per run, settle a slot an earlier run of this agent left
    /// claimed (it died inside its window) when the root already runs its
    /// target.
    fn recover_fleet(&mut self) {
        if let Some((f, done @ false)) = &mut self.fleet {
            match crate::fleet::recover(&self.root, &self.cfg, f) {
                Ok(()) => *done = true,
                Err(e) => tracing::warn!("rollout: recovering our earlier claim: {e:#}"),
            }
        }
    }

    fn start(&mut self, id: String, from: String, key: String, resume: bool) {
        let msg = if resume {
            format!("converging an interrupted update to {id} from {from}")
        } else {
            format!("updating to {id} from {from}")
        };
        tracing::info!("{msg}");
        self.notifier.status(&msg);
        self.record(|r| r.state = "applying".into());
        self.cancel.store(false, Ordering::SeqCst);
        let opts = ApplyOptions {
            root: self.root.clone(),
            from: Some(from.clone()),
            id: Some(id.clone()),
            allow_unsigned: false,
            // Whatever the metadata names must not be below the mark.
            allow_downgrade: false,
            kernel_policy: None,
            dry_run: false,
            cancel: Some(self.cancel.clone()),
            ca_file: None,
            slot: self
                .fleet
                .as_ref()
                .map(|f| f.0.clone() as Arc<dyn crate::apply::gate::SlotGate>),
            keep_replaced: crate::fleet::keeps_replaced(&self.root, &self.cfg),
            tracker: self.tracker.clone(),
        };
        let tx = self.tx.clone();
        let (root, cfg, target) = (self.root.clone(), self.cfg.clone(), id.clone());
        let fleet = self.fleet.as_ref().map(|f| f.0.clone());
        let spawned = std::thread::Builder::new()
            .name("apply".into())
            .spawn(move || {
                let progress = Progress::new(false);
                let res = apply::run(&opts, &progress);
                let res =
                    crate::fleet::settle(&root, &cfg, fleet.as_deref(), &target, res, &progress);
                let _ = tx.send(Msg::Done(Box::new(res)));
            });
        match spawned {
            Ok(_) => {
                self.running = Some(Running {
                    id,
                    from,
                    key,
                    started: SystemTime::now(),
                })
            }
            Err(e) => tracing::error!("cannot start the update thread: {e}"),
        }
    }

    fn finished(&mut self, res: Result<ApplyReport>) {
        let Some(run) = self.running.take() else {
            return;
        };
        // Stopped at a safe point for shutdown: not a failure of the target.
        let stopped = match &res {
            Err(e)
                if self.stopping
                    && self.cancel.load(Ordering::SeqCst)
                    && ExitKind::of(e) != ExitKind::PostApplyHook =>
            {
                Some(format!("{e:#}"))
            }
            _ => None,
        };
        if let Some(msg) = stopped {
            tracing::info!("update to {} stopped for shutdown: {msg}", run.id);
            self.record(|r| {
                r.last_result = Some("stopped".into());
                r.last_error = Some(msg);
            });
            return;
        }
        let policy = self.cfg.agent.backoff();
        let (id, from, key, started) = (run.id, run.from, run.key, run.started);
        match &res {
            Err(e) if ExitKind::of(e) != ExitKind::PostApplyHook => {
                self.failures
                    .failed(&key, &format!("{e:#}"), SystemTime::now(), &policy);
            }
            _ => self.failures.succeeded(&key),
        }
        let attempts = self.failures.by_target.get(&key).map(|f| f.attempts);
        self.record(|r| record_outcome(r, &id, &from, &key, &res, started, &policy));
        self.write_metrics();
        match &res {
            Ok(rep) => {
                let msg = format!(
                    "{} {id}: quiesce {} ms, total {} ms",
                    rep.result,
                    rep.quiesce_ms.unwrap_or(0),
                    rep.total_ms
                );
                tracing::info!("{msg}");
                self.notifier.status(&msg);
            }
            Err(e) => {
                let n = attempts.unwrap_or(0);
                let delay = policy.delay(n);
                if n > 0 {
                    tracing::error!(
                        "update to {id} failed (attempt {n}; next try in {}s): {e:#}",
                        delay.as_secs()
                    );
                    self.notifier.status(&format!(
                        "update to {id} failed (attempt {n}); retry in {}s",
                        delay.as_secs()
                    ));
                } else {
                    tracing::error!("update to {id}: {e:#}");
                    self.notifier
                        .status(&format!("update to {id} committed, but: {e}"));
                }
            }
        }
    }
}
