//! The node's side of the coordination: registration and lease, taking and
//! giving back a slot, failure records and the circuit breaker. Every wait
//! is a decision that is logged and published (`nodes/<id>`, and the local
//! `fleet.json` for `status`). etcd unreachable means wait: no slot is
//! taken without etcd, but a node holding one finishes its window.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::config::RolloutConfig;
use super::etcd::{Cmp, Etcd, EtcdOptions, Op};
use super::group::{Claim, Failed, GroupView, Halted, InProgress, Keys, NodeState};
use super::slot::{SlotEvent, SlotMachine, SlotPhase};
use crate::engine::config::Config;
use crate::sys::backoff::epoch_ms;

/// File name of the node's rollout record, in the runtime directory.
pub const RECORD_NAME: &str = "fleet.json";

/// What `status` shows about the node's rollout.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FleetRecord {
    /// Node id.
    pub node: String,
    /// Group.
    pub group: String,
    /// Slot phase.
    pub phase: Option<SlotPhase>,
    /// Held slot.
    pub slot: Option<u32>,
    /// What the node published.
    pub state: NodeState,
    /// The group's breaker, as last seen.
    pub halted: Option<Halted>,
}

impl FleetRecord {
    /// The record of runtime directory `rt`, if any.
    pub fn load(rt: &Path) -> Option<FleetRecord> {
        std::fs::read(rt.join(RECORD_NAME))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }
}

/// The node id: `[rollout] node_id`, else derived from `etc/machine-id`
/// (an application-specific id, as systemd recommends: the first 32 hex
/// digits of sha256("imageupd-fleet:" ‖ machine-id)).
pub fn node_id(root: &Path, cfg: &RolloutConfig) -> Result<String> {
    if let Some(id) = &cfg.node_id {
        return Ok(id.clone());
    }
    let p = root.join("etc/machine-id");
    let mid = std::fs::read_to_string(&p)
        .with_context(|| format!("reading {} (or set [rollout] node_id)", p.display()))?;
    let mid = mid.trim();
    if mid.is_empty() {
        bail!("{} is empty; set [rollout] node_id", p.display());
    }
    let d =
        crate::format::manifest::Digest::of(format!("imageupd-fleet:{mid}").as_bytes()).to_hex();
    Ok(d[..32].to_owned())
}

/// The etcd client a `[rollout]` table describes.
pub fn client(cfg: &RolloutConfig) -> Result<Etcd> {
    Etcd::new(&EtcdOptions {
        endpoints: cfg.etcd.clone(),
        ca_file: cfg.ca_file.clone(),
        identity: cfg.cert_file.clone().zip(cfg.key_file.clone()),
        credentials: cfg.username.clone().zip(cfg.password.clone()),
    })
}

/// A node taking part in a rollout.
#[derive(Debug)]
pub struct Rollout {
    root: PathBuf,
    rt: PathBuf,
    cfg: Mutex<RolloutConfig>,
    /// The node's id.
    pub node: String,
    keys: Keys,
    etcd: Etcd,
    lease: Mutex<i64>,
    machine: Mutex<SlotMachine>,
    claim: Mutex<Option<Vec<u8>>>,
    state: Mutex<NodeState>,
    cancel: Mutex<Option<Arc<AtomicBool>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Rollout {
    /// The rollout of the node `root` configured by `cfg`; `None` without
    /// a `[rollout]` table. No connection is made.
    pub fn open(root: &Path, rt: &Path, cfg: &Config) -> Result<Option<Arc<Rollout>>> {
        let Some(r) = &super::config::rollout(cfg)? else {
            return Ok(None);
        };
        let node = node_id(root, r)?;
        Ok(Some(Arc::new(Rollout {
            root: root.to_path_buf(),
            rt: rt.to_path_buf(),
            keys: Keys::new(&r.prefix, &r.group),
            etcd: client(r)?,
            cfg: Mutex::new(r.clone()),
            node,
            lease: Mutex::new(0),
            machine: Mutex::new(SlotMachine::default()),
            claim: Mutex::new(None),
            state: Mutex::new(NodeState::default()),
            cancel: Mutex::new(None),
        })))
    }

    /// The current `[rollout]` settings (re-read from the node's
    /// configuration, so a SIGHUP'd edit of windows applies to a waiting
    /// node too).
    pub fn cfg(&self) -> RolloutConfig {
        if let Ok(c) = Config::load(&self.root) {
            if let Ok(Some(r)) = super::config::rollout(&c) {
                if r.group == lock(&self.cfg).group {
                    *lock(&self.cfg) = r;
                }
            }
        }
        lock(&self.cfg).clone()
    }

    /// The metadata key of the phased-rollout percentage.
    pub fn percent_key(&self) -> String {
        lock(&self.cfg).percent_key.clone()
    }

    /// The slot phase.
    pub fn phase(&self) -> SlotPhase {
        lock(&self.machine).phase
    }

    /// Take a step of the slot lifecycle (an invalid one is logged).
    pub fn step(&self, ev: SlotEvent, slot: Option<u32>) {
        let r = lock(&self.machine).step(ev, slot);
        if let Err(e) = r {
            tracing::error!("{e}");
        }
        self.save_record(None);
    }

    /// Use `cancel` to stop waiting (the agent's shutdown flag).
    pub fn set_cancel(&self, cancel: Arc<AtomicBool>) {
        *lock(&self.cancel) = Some(cancel);
    }

    fn cancelled(&self) -> bool {
        lock(&self.cancel)
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    }

    /// Write the local record; `halted`: the group's breaker as just seen
    /// (None: as recorded before).
    fn save_record(&self, halted: Option<Option<Halted>>) {
        let cfg = lock(&self.cfg).clone();
        let m = lock(&self.machine).clone();
        let mut rec = FleetRecord::load(&self.rt).unwrap_or_default();
        rec.node = self.node.clone();
        rec.group = cfg.group;
        rec.phase = Some(m.phase);
        rec.slot = m.slot;
        rec.state = lock(&self.state).clone();
        if let Some(h) = halted {
            rec.halted = h;
        }
        let path = self.rt.join(RECORD_NAME);
        let saved = std::fs::create_dir_all(&self.rt)
            .map_err(anyhow::Error::from)
            .and_then(|()| serde_json::to_vec_pretty(&rec).map_err(anyhow::Error::from))
            .and_then(|b| crate::fs::store::write_volatile(&path, &b));
        if let Err(e) = saved {
            // Only `status` reads it; the rollout goes on.
            tracing::warn!(
                "rollout: cannot save the node's rollout record {}: {e:#}",
                path.display()
            );
        }
    }

    /// Publish what the node does (logged when it changes).
    pub fn publish(&self, state: &str, why: &str, target: Option<&str>) {
        let changed = {
            let mut s = lock(&self.state);
            let changed = s.state != state || s.why != why || s.target.as_deref() != target;
            if changed {
                s.state = state.to_owned();
                s.why = why.to_owned();
                s.target = target.map(str::to_owned);
                s.current = crate::fs::rootfs::RootFs::open(&self.root)
                    .ok()
                    .and_then(|r| r.image_id().ok().flatten());
                s.updated_ms = epoch_ms(SystemTime::now());
            }
            changed
        };
        if changed {
            tracing::info!(
                "rollout: {state}{}{why}",
                if why.is_empty() { "" } else { ": " }
            );
            self.save_record(None);
            if let Err(e) = self.put_node() {
                // The next change or heartbeat puts it again.
                tracing::warn!("rollout: cannot publish the node's state ({state}) in etcd: {e:#}");
            }
        }
    }

    fn put_node(&self) -> Result<()> {
        let lease = self.ensure_lease()?;
        let v = serde_json::to_vec(&*lock(&self.state))?;
        self.etcd.put(&self.keys.node(&self.node), &v, lease)?;
        Ok(())
    }

    fn ensure_lease(&self) -> Result<i64> {
        let mut l = lock(&self.lease);
        if *l == 0 {
            let ttl = lock(&self.cfg).lease_secs;
            *l = self.etcd.lease_grant(ttl)?;
            tracing::info!("rollout: lease {:x} granted ({ttl} s)", *l);
        }
        Ok(*l)
    }

    /// One heartbeat: refresh the lease, or take a new one and put the
    /// node's lease-bound keys again.
    pub fn heartbeat(&self) -> Result<()> {
        let cur = *lock(&self.lease);
        if cur != 0 && self.etcd.lease_keepalive(cur)? > 0 {
            return Ok(());
        }
        *lock(&self.lease) = 0;
        self.put_node()?;
        let slot = lock(&self.machine).slot;
        if let Some(i) = slot.filter(|_| self.phase().holds()) {
            let lease = self.ensure_lease()?;
            self.etcd
                .put(&self.keys.slot(i), self.node.as_bytes(), lease)?;
        }
        Ok(())
    }

    /// Keep the lease alive from a thread, every third of its TTL.
    pub fn spawn_heartbeat(self: &Arc<Self>) -> Result<()> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("fleet-lease".into())
            .spawn(move || loop {
                if let Err(e) = me.heartbeat() {
                    tracing::debug!("rollout: lease keepalive: {e:#}");
                }
                let secs = lock(&me.cfg).lease_secs;
                std::thread::sleep(Duration::from_millis(secs * 1000 / 3));
            })
            .context("starting the lease thread")?;
        Ok(())
    }

    /// The group as etcd has it now.
    pub fn view(&self) -> Result<GroupView> {
        let (rev, kvs) = self.etcd.range_prefix(&self.keys.base)?;
        Ok(GroupView::from_kvs(&self.keys, rev, &kvs))
    }

    fn sleep_poll(&self) {
        std::thread::sleep(Duration::from_millis(lock(&self.cfg).poll_ms));
    }

    /// Wait until this node may disrupt for `target`: inside a window, the
    /// group not halted, a slot taken (or this node's own claim found
    /// again). Errors only when cancelled.
    pub fn acquire(&self, target: &str) -> Result<u32> {
        if self.phase() == SlotPhase::Idle {
            self.step(SlotEvent::Wait, None);
        }
        loop {
            if self.cancelled() {
                self.step(SlotEvent::Cancelled, None);
                self.publish("idle", "stopped while waiting for a slot", Some(target));
                bail!("stopped on request while waiting for a rollout slot");
            }
            match self.try_acquire(target) {
                Ok(Some(i)) => return Ok(i),
                Ok(None) => {}
                Err(e) => self.publish(
                    "waiting",
                    &format!("etcd: {e:#} (no window opens without etcd)"),
                    Some(target),
                ),
            }
            self.sleep_poll();
        }
    }

    fn window_open(&self, cfg: &RolloutConfig) -> bool {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        super::window::is_open(&cfg.windows, cfg.time_zone.offset_at(now), now)
    }

    fn try_acquire(&self, target: &str) -> Result<Option<u32>> {
        let cfg = self.cfg();
        self.ensure_lease()?;
        let g = self.view()?;
        if FleetRecord::load(&self.rt).is_none_or(|r| r.halted != g.halted) {
            self.save_record(Some(g.halted.clone()));
        }
        if let Some((i, c)) = g.claim_of(&self.node) {
            let bytes = serde_json::to_vec(c)?;
            let lease = self.ensure_lease()?;
            let (ok, rev) = self.etcd.txn(
                &[Cmp::ValueIs(self.keys.claim(i), bytes.clone())],
                &[Op::Put(
                    self.keys.slot(i),
                    self.node.as_bytes().to_vec(),
                    lease,
                )],
            )?;
            if ok {
                *lock(&self.claim) = Some(bytes);
                self.step(SlotEvent::Reclaimed, Some(i));
                self.publish(
                    "holding",
                    &format!("slot {i} again (our in-progress record, rev {rev})"),
                    Some(target),
                );
                return Ok(Some(i));
            }
            return Ok(None);
        }
        if !self.window_open(&cfg) {
            self.publish("waiting", "outside the maintenance window", Some(target));
            return Ok(None);
        }
        if let Some(h) = &g.halted {
            self.publish(
                "waiting",
                &format!(
                    "group {} is halted ({} failed {}); `imageupd fleet resume {}` lifts it",
                    cfg.group, h.failures, h.target, cfg.group
                ),
                Some(target),
            );
            return Ok(None);
        }
        let k = cfg.max_unavailable.resolve(g.nodes.len());
        let Some(i) = g.free_slot(k) else {
            self.publish(
                "waiting",
                &format!(
                    "for a slot ({k} of {} nodes; holders {})",
                    g.nodes.len(),
                    g.holders()
                ),
                Some(target),
            );
            return Ok(None);
        };
        let now = epoch_ms(SystemTime::now());
        let claim = serde_json::to_vec(&Claim {
            node: self.node.clone(),
            target: target.to_owned(),
            since_ms: now,
        })?;
        let ip = serde_json::to_vec(&InProgress {
            slot: i,
            target: target.to_owned(),
            since_ms: now,
        })?;
        let lease = self.ensure_lease()?;
        let (ok, rev) = self.etcd.txn(
            &[
                Cmp::Absent(self.keys.slot(i)),
                Cmp::Absent(self.keys.claim(i)),
                Cmp::Absent(self.keys.halted()),
            ],
            &[
                Op::Put(self.keys.slot(i), self.node.as_bytes().to_vec(), lease),
                Op::Put(self.keys.claim(i), claim.clone(), 0),
                Op::Put(self.keys.inprogress(&self.node), ip, 0),
            ],
        )?;
        if !ok {
            return Ok(None); // lost a race: look again
        }
        *lock(&self.claim) = Some(claim);
        self.step(SlotEvent::Acquired, Some(i));
        if !self.window_open(&self.cfg()) {
            tracing::info!("rollout: the window closed as slot {i} was taken; giving it back");
            self.step(SlotEvent::Aborted, None);
            self.release()?;
            self.step(SlotEvent::Wait, None);
            return Ok(None);
        }
        self.publish(
            "holding",
            &format!("slot {i} of {k} (rev {rev})"),
            Some(target),
        );
        Ok(Some(i))
    }

    /// Give the slot back (and drop the in-progress record); retried until
    /// etcd answers. Only this node's own claim is removed.
    pub fn release(&self) -> Result<()> {
        let Some(i) = lock(&self.machine).slot else {
            return Ok(());
        };
        let bytes = lock(&self.claim).clone();
        loop {
            let r = (|| -> Result<()> {
                let bytes = match bytes.clone() {
                    Some(b) => b,
                    None => match self.view()?.claim_of(&self.node) {
                        Some((_, c)) => serde_json::to_vec(c)?,
                        None => Vec::new(),
                    },
                };
                let (ok, rev) = self.etcd.txn(
                    &[Cmp::ValueIs(self.keys.claim(i), bytes)],
                    &[
                        Op::Delete(self.keys.claim(i)),
                        Op::Delete(self.keys.slot(i)),
                        Op::Delete(self.keys.inprogress(&self.node)),
                    ],
                )?;
                if !ok {
                    tracing::warn!(
                        "rollout: slot {i} was no longer ours (released by an operator?)"
                    );
                    self.etcd.delete(&self.keys.inprogress(&self.node))?;
                }
                tracing::info!("rollout: released slot {i} (rev {rev})");
                Ok(())
            })();
            match r {
                Ok(()) => break,
                Err(e) if self.cancelled() => {
                    return Err(
                        e.context("stopping: the in-progress record stays until the next start")
                    )
                }
                Err(e) => {
                    tracing::warn!("rollout: cannot release slot {i} yet: {e:#}");
                    self.sleep_poll();
                }
            }
        }
        *lock(&self.claim) = None;
        self.step(SlotEvent::Released, None);
        self.publish("idle", "", None);
        Ok(())
    }

    /// Record that `target` failed this node's gate; trip the breaker when
    /// `max_failures` nodes of the group failed it. Whether it tripped.
    pub fn record_failure(&self, target: &str, reason: &str, rolled_back: bool) -> Result<bool> {
        let cfg = self.cfg();
        let f = Failed {
            target: target.to_owned(),
            reason: reason.to_owned(),
            rolled_back,
            at_ms: epoch_ms(SystemTime::now()),
        };
        self.etcd
            .put(&self.keys.failed(&self.node), &serde_json::to_vec(&f)?, 0)?;
        let Some(maxf) = cfg.max_failures else {
            return Ok(false);
        };
        let g = self.view()?;
        let n = g.failures_of(target);
        let limit = maxf.resolve(g.nodes.len()) as usize;
        if n < limit || g.halted.is_some() {
            return Ok(g.halted.is_some());
        }
        let h = Halted {
            target: target.to_owned(),
            failures: n as u32,
            by: self.node.clone(),
            at_ms: f.at_ms,
        };
        self.etcd.txn(
            &[Cmp::Absent(self.keys.halted())],
            &[Op::Put(self.keys.halted(), serde_json::to_vec(&h)?, 0)],
        )?;
        tracing::error!(
            "rollout: {n} node(s) of group {} failed {target} (max_failures {limit}): group halted",
            cfg.group
        );
        self.save_record(Some(Some(h)));
        Ok(true)
    }

    /// Forget this node's failure record (it passed a gate).
    pub fn clear_failure(&self) {
        if let Err(e) = self.etcd.delete(&self.keys.failed(&self.node)) {
            tracing::warn!("rollout: cannot clear the failure record: {e:#}");
        }
    }

    /// After a restart: this node's claim, if etcd still has one.
    pub fn own_claim(&self) -> Result<Option<(u32, Claim)>> {
        Ok(self
            .view()?
            .claim_of(&self.node)
            .map(|(i, c)| (i, c.clone())))
    }

    /// Hold `slot` again after a restart without an update to converge
    /// (the root already runs the claim's target).
    pub fn readopt(&self, slot: u32, claim: &Claim) -> Result<()> {
        *lock(&self.claim) = Some(serde_json::to_vec(claim)?);
        self.step(SlotEvent::Reclaimed, Some(slot));
        Ok(())
    }

    /// Revoke the lease (clean shutdown): the node's live keys go at once.
    pub fn shutdown(&self) {
        let l = std::mem::take(&mut *lock(&self.lease));
        if l != 0 {
            if let Err(e) = self.etcd.lease_revoke(l) {
                // The lease then expires by itself after lease_secs.
                tracing::warn!("rollout: cannot revoke lease {l:x} at shutdown: {e:#}");
            }
        }
    }

    /// For messages.
    pub fn describe(&self) -> String {
        let c = lock(&self.cfg);
        format!(
            "node {} of group {} ({})",
            self.node,
            c.group,
            c.etcd.join(", ")
        )
    }
}
