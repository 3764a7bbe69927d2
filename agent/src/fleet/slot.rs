//! The slot lifecycle of one node, as a plain state machine (the style of
//! [`crate::engine::lifecycle`]): an enum of phases, an enum of events, and guarded
//! transitions, so a coordination bug (say, releasing a slot before the
//! health gate) becomes an error instead of a silent capacity loss.
//!
//! ```text
//! idle ─wait→ waiting ─acquired→ holding ─applied→ gating ─passed→ releasing ─released→ idle
//!                 │                 │  └─aborted→ releasing       │ └─failed→ rolling-back ─rolled-back→ releasing
//!                 └─cancelled→ idle └─reboot→ across-reboot ─booted→ gating
//! idle ─reclaimed→ holding   (a persistent in-progress record of this node was found)
//! ```

use serde::{Deserialize, Serialize};

/// Where the node is with respect to its group's slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotPhase {
    /// Not asking for a slot.
    Idle,
    /// Staged, waiting for a window, a phase, a free slot or etcd.
    Waiting,
    /// Holding a slot: hooks and swap run.
    Holding,
    /// Holding a slot: the health gate runs.
    Gating,
    /// Holding a slot: a required check failed, going back to the old image.
    RollingBack,
    /// Holding a slot across a kernel change's reboot.
    AcrossReboot,
    /// Giving the slot back.
    Releasing,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotEvent {
    /// The update is staged and needs a slot.
    Wait,
    /// The slot was taken.
    Acquired,
    /// A slot this node took before (a persistent in-progress record) was
    /// found and is held again.
    Reclaimed,
    /// The update stopped while waiting (shutdown).
    Cancelled,
    /// Hooks and swap are done; the health gate starts.
    Applied,
    /// The update stopped before or during its disruption (a pre-apply
    /// hook failed, the window closed): give the slot back.
    Aborted,
    /// Every required check passed.
    Passed,
    /// A required check failed.
    Failed,
    /// The rollback finished (or failed: the slot is kept by the record).
    RolledBack,
    /// The kernel changed: keep the slot across the reboot.
    Reboot,
    /// The node booted the new kernel; the gate runs again.
    Booted,
    /// The slot and the in-progress record are gone.
    Released,
}

/// An event not allowed in the current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid slot transition: `{event:?}` in phase `{from:?}`")]
pub struct BadSlotTransition {
    /// The phase (unchanged).
    pub from: SlotPhase,
    /// The refused event.
    pub event: SlotEvent,
}

impl SlotPhase {
    /// The phase after `ev`.
    pub fn next(self, ev: SlotEvent) -> Result<SlotPhase, BadSlotTransition> {
        use SlotEvent as E;
        use SlotPhase as P;
        let to = match (self, ev) {
            (P::Idle, E::Wait) => P::Waiting,
            (P::Idle | P::Waiting, E::Reclaimed) => P::Holding,
            (P::Waiting, E::Acquired) => P::Holding,
            (P::Waiting, E::Cancelled) => P::Idle,
            (P::Holding, E::Applied) => P::Gating,
            (P::Holding, E::Aborted) => P::Releasing,
            (P::Gating, E::Passed) => P::Releasing,
            (P::Gating, E::Failed) => P::RollingBack,
            (P::Gating, E::Reboot) => P::AcrossReboot,
            (P::AcrossReboot, E::Booted) => P::Gating,
            (P::RollingBack, E::RolledBack) => P::Releasing,
            (P::Releasing, E::Released) => P::Idle,
            (from, event) => return Err(BadSlotTransition { from, event }),
        };
        Ok(to)
    }

    /// Whether the node counts against its group's budget in this phase.
    pub fn holds(self) -> bool {
        matches!(
            self,
            SlotPhase::Holding
                | SlotPhase::Gating
                | SlotPhase::RollingBack
                | SlotPhase::AcrossReboot
                | SlotPhase::Releasing
        )
    }
}

/// The slot lifecycle, with the slot index while one is held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMachine {
    /// Current phase.
    pub phase: SlotPhase,
    /// Index of the held slot.
    pub slot: Option<u32>,
}

impl Default for SlotMachine {
    fn default() -> Self {
        SlotMachine {
            phase: SlotPhase::Idle,
            slot: None,
        }
    }
}

impl SlotMachine {
    /// Take a step; `Acquired`/`Reclaimed` carry the slot index.
    pub fn step(
        &mut self,
        ev: SlotEvent,
        slot: Option<u32>,
    ) -> Result<SlotPhase, BadSlotTransition> {
        let to = self.phase.next(ev)?;
        if matches!(ev, SlotEvent::Acquired | SlotEvent::Reclaimed) {
            if slot.is_none() {
                return Err(BadSlotTransition {
                    from: self.phase,
                    event: ev,
                });
            }
            self.slot = slot;
        }
        if to == SlotPhase::Idle {
            self.slot = None;
        }
        self.phase = to;
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SlotEvent as E;
    use SlotPhase as P;

    #[test]
    fn happy_path_and_guards() {
        let mut m = SlotMachine::default();
        for (ev, want) in [
            (E::Wait, P::Waiting),
            (E::Acquired, P::Holding),
            (E::Applied, P::Gating),
            (E::Failed, P::RollingBack),
            (E::RolledBack, P::Releasing),
            (E::Released, P::Idle),
        ] {
            assert_eq!(m.step(ev, Some(2)).unwrap(), want);
        }
        assert_eq!(m.slot, None);
        // A slot is never given back before the gate ran or the update aborted.
        for p in [
            P::Idle,
            P::Waiting,
            P::Holding,
            P::Gating,
            P::RollingBack,
            P::AcrossReboot,
        ] {
            assert!(p.next(E::Released).is_err(), "{p:?}");
        }
        assert!(
            P::Waiting.next(E::Applied).is_err(),
            "no disruption without a slot"
        );
        assert!(P::Idle.next(E::Acquired).is_err());
        let mut m = SlotMachine::default();
        assert!(
            m.step(E::Reclaimed, None).is_err(),
            "a slot needs its index"
        );
        m.step(E::Reclaimed, Some(0)).unwrap();
        m.step(E::Applied, None).unwrap();
        assert_eq!(m.step(E::Reboot, None).unwrap(), P::AcrossReboot);
        assert!(m.phase.holds());
        assert_eq!(m.step(E::Booted, None).unwrap(), P::Gating);
        assert!(!P::Waiting.holds() && !P::Idle.holds());
    }
}
