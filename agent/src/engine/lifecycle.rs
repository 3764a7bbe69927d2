//! The update lifecycle (SPEC §6): idle → planned → fetched → staged →
//! quiesced → swapped → resumed → (reboot-pending) → idle, or failed.
//!
//! Modelled on zincati's update agent: a plain enum whose transitions are
//! guarded, so an engine bug (say, swapping before quiescing) becomes an
//! error instead of a silently wrong status.
//!
//! **Convention.** A phase is entered when its step *begins*: the engine
//! advances with [`Event::Quiesced`] just before it runs the pre-apply hooks,
//! with [`Event::Swapped`] just before the first rename, and with
//! [`Event::Resumed`] just before the post-apply hooks. So the time spent in
//! a phase is the duration of its step, and [`Lifecycle::quiesce_window`]
//! (entering `quiesced` to entering `resumed`) is exactly SPEC §5's quiesce
//! window, step 5 start to step 7 start.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where an update is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// No update under way.
    Idle,
    /// Resolving the target and planning against the root.
    Planned,
    /// Fetching the content the root and cache lack.
    Fetched,
    /// Staging new content on the root's filesystem; services still run.
    Staged,
    /// Running the pre-apply hooks: services are going down.
    Quiesced,
    /// Renaming staged content into place and committing.
    Swapped,
    /// Running the post-apply hooks: services are coming back.
    Resumed,
    /// Committed; the node must boot the new kernel.
    RebootPending,
    /// The update stopped on an error; see the caller's last error.
    Failed,
}

/// What happened, driving [`Phase::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Event {
    /// Planning starts.
    Planned,
    /// The plan is empty: the root already matches the target.
    NothingToDo,
    /// Fetching starts.
    Fetched,
    /// Staging starts.
    Staged,
    /// The pre-apply hooks start.
    Quiesced,
    /// The swap starts.
    Swapped,
    /// The post-apply hooks start.
    Resumed,
    /// The update is done and the target kernel differs from the running one.
    KernelChanged,
    /// The node booted (the reboot the kernel policy asked for happened).
    Rebooted,
    /// A step failed.
    Failed,
    /// Back to idle: the update is done, or the failure has been dealt with.
    Reset,
}

/// An event that is not allowed in the current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid update lifecycle transition: event `{event}` is not allowed in phase `{from}` (allowed: {})",
    allowed_list(*.from)
)]
pub struct InvalidTransition {
    /// The phase the lifecycle was in (and stays in).
    pub from: Phase,
    /// The refused event.
    pub event: Event,
}

fn allowed_list(from: Phase) -> String {
    let allowed: Vec<&str> = from.allowed_events().map(Event::as_str).collect();
    if allowed.is_empty() {
        "none".to_owned()
    } else {
        allowed.join(", ")
    }
}

impl Phase {
    /// Every phase, in lifecycle order.
    pub const ALL: [Phase; 9] = [
        Phase::Idle,
        Phase::Planned,
        Phase::Fetched,
        Phase::Staged,
        Phase::Quiesced,
        Phase::Swapped,
        Phase::Resumed,
        Phase::RebootPending,
        Phase::Failed,
    ];

    /// The phase after `ev`, or why `ev` is not allowed now.
    pub fn next(self, ev: Event) -> Result<Phase, InvalidTransition> {
        use Event as E;
        use Phase as P;
        let to = match (self, ev) {
            (P::Idle, E::Planned) => P::Planned,
            (P::Planned, E::NothingToDo) => P::Idle,
            (P::Planned, E::Fetched) => P::Fetched,
            (P::Fetched, E::Staged) => P::Staged,
            (P::Staged, E::Quiesced) => P::Quiesced,
            (P::Quiesced, E::Swapped) => P::Swapped,
            (P::Swapped, E::Resumed) => P::Resumed,
            (P::Resumed, E::KernelChanged) => P::RebootPending,
            (P::Resumed, E::Reset) => P::Idle,
            (P::RebootPending, E::Rebooted) => P::Idle,
            (P::Failed, E::Reset) => P::Idle,
            // Nothing is under way in Idle to fail, and a second failure
            // while Failed is the engine's to record, not a new phase.
            (from, E::Failed) if !matches!(from, P::Idle | P::Failed) => P::Failed,
            (from, event) => return Err(InvalidTransition { from, event }),
        };
        Ok(to)
    }

    /// The events allowed in this phase.
    pub fn allowed_events(self) -> impl Iterator<Item = Event> {
        Event::ALL
            .into_iter()
            .filter(move |&ev| self.next(ev).is_ok())
    }

    /// Whether services are down (the pre-apply hooks have run or are
    /// running, and the post-apply hooks have not started).
    pub fn is_quiesced(self) -> bool {
        matches!(self, Phase::Quiesced | Phase::Swapped)
    }

    /// Whether the root may hold a mix of old and new paths: true while the
    /// swap can be under way. Quiesced counts too, so the answer stays
    /// conservative even if the engine starts renaming before it advances.
    pub fn root_may_be_mixed(self) -> bool {
        matches!(self, Phase::Quiesced | Phase::Swapped)
    }

    /// The phase's name as shown by `status`, e.g. `reboot-pending`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Planned => "planned",
            Phase::Fetched => "fetched",
            Phase::Staged => "staged",
            Phase::Quiesced => "quiesced",
            Phase::Swapped => "swapped",
            Phase::Resumed => "resumed",
            Phase::RebootPending => "reboot-pending",
            Phase::Failed => "failed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Event {
    /// Every event.
    pub const ALL: [Event; 11] = [
        Event::Planned,
        Event::NothingToDo,
        Event::Fetched,
        Event::Staged,
        Event::Quiesced,
        Event::Swapped,
        Event::Resumed,
        Event::KernelChanged,
        Event::Rebooted,
        Event::Failed,
        Event::Reset,
    ];

    /// The event's name, e.g. `nothing-to-do`.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Planned => "planned",
            Event::NothingToDo => "nothing-to-do",
            Event::Fetched => "fetched",
            Event::Staged => "staged",
            Event::Quiesced => "quiesced",
            Event::Swapped => "swapped",
            Event::Resumed => "resumed",
            Event::KernelChanged => "kernel-changed",
            Event::Rebooted => "rebooted",
            Event::Failed => "failed",
            Event::Reset => "reset",
        }
    }

    /// True for the events that end an apply run (its final status is
    /// written once, by the caller, after them).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Event::NothingToDo | Event::KernelChanged | Event::Failed | Event::Reset
        )
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One update attempt's walk through the phases, with timings.
///
/// Make one per attempt: durations of a phase visited twice are summed.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    phase: Phase,
    /// Each phase entered, with when (since `start`), oldest first; starts
    /// with `(Idle, 0)`.
    history: Vec<(Phase, Duration)>,
    start: Instant,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// A lifecycle in [`Phase::Idle`], with its clock starting now.
    pub fn new() -> Self {
        Lifecycle {
            phase: Phase::Idle,
            history: vec![(Phase::Idle, Duration::ZERO)],
            start: Instant::now(),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Each phase entered and when, relative to [`Lifecycle::new`], oldest
    /// first.
    pub fn history(&self) -> &[(Phase, Duration)] {
        &self.history
    }

    /// Applies `ev` now. On error nothing changes.
    pub fn advance(&mut self, ev: Event) -> Result<Phase, InvalidTransition> {
        let at = self.start.elapsed();
        self.advance_at(ev, at)
    }

    /// Applies `ev` as if it happened `at` after [`Lifecycle::new`]; for
    /// replaying a journal and for tests. A time earlier than the last entry
    /// is taken as the last entry's time, so durations are never negative.
    pub fn advance_at(&mut self, ev: Event, at: Duration) -> Result<Phase, InvalidTransition> {
        let to = self.phase.next(ev)?;
        let last = self.history.last().map_or(Duration::ZERO, |&(_, t)| t);
        self.history.push((to, at.max(last)));
        self.phase = to;
        Ok(to)
    }

    /// Time spent in each phase that has been left, in milliseconds, keyed by
    /// [`Phase::as_str`]. The current phase is not counted: its duration is
    /// not known yet.
    pub fn durations_ms(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for pair in self.history.windows(2) {
            let (phase, entered) = pair[0];
            let left = pair[1].1;
            let ms = u64::try_from((left - entered).as_millis()).unwrap_or(u64::MAX);
            let total: &mut u64 = out.entry(phase.as_str().to_owned()).or_default();
            *total = total.saturating_add(ms);
        }
        out
    }

    /// The downtime users care about: from entering [`Phase::Quiesced`] to
    /// entering [`Phase::Resumed`], for the latest quiesce. `None` until
    /// services resume, and when the update failed before they did (the abort
    /// path is not a resume).
    pub fn quiesce_window(&self) -> Option<Duration> {
        let q = self
            .history
            .iter()
            .rposition(|&(p, _)| p == Phase::Quiesced)?;
        let quiesced_at = self.history[q].1;
        let resumed_at = self.history[q + 1..]
            .iter()
            .find(|&&(p, _)| p == Phase::Resumed)?
            .1;
        Some(resumed_at - quiesced_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_events_are_the_ones_that_end_a_run() {
        let terminal: Vec<Event> = Event::ALL.into_iter().filter(|e| e.is_terminal()).collect();
        assert_eq!(
            terminal,
            [
                Event::NothingToDo,
                Event::KernelChanged,
                Event::Failed,
                Event::Reset
            ]
        );
    }
    use Event as E;
    use Phase as P;

    /// Every allowed transition, and nothing else.
    const ALLOWED: &[(Phase, Event, Phase)] = &[
        (P::Idle, E::Planned, P::Planned),
        (P::Planned, E::NothingToDo, P::Idle),
        (P::Planned, E::Fetched, P::Fetched),
        (P::Fetched, E::Staged, P::Staged),
        (P::Staged, E::Quiesced, P::Quiesced),
        (P::Quiesced, E::Swapped, P::Swapped),
        (P::Swapped, E::Resumed, P::Resumed),
        (P::Resumed, E::KernelChanged, P::RebootPending),
        (P::Resumed, E::Reset, P::Idle),
        (P::RebootPending, E::Rebooted, P::Idle),
        (P::Failed, E::Reset, P::Idle),
        (P::Planned, E::Failed, P::Failed),
        (P::Fetched, E::Failed, P::Failed),
        (P::Staged, E::Failed, P::Failed),
        (P::Quiesced, E::Failed, P::Failed),
        (P::Swapped, E::Failed, P::Failed),
        (P::Resumed, E::Failed, P::Failed),
        (P::RebootPending, E::Failed, P::Failed),
    ];

    #[test]
    fn allowed_transitions() {
        for &(from, ev, to) in ALLOWED {
            assert_eq!(from.next(ev), Ok(to), "{from} --{ev}-->");
        }
    }

    #[test]
    fn every_other_pair_is_forbidden() {
        let mut forbidden = 0;
        for from in Phase::ALL {
            for ev in Event::ALL {
                if ALLOWED.iter().any(|&(f, e, _)| f == from && e == ev) {
                    continue;
                }
                assert_eq!(
                    from.next(ev),
                    Err(InvalidTransition { from, event: ev }),
                    "{from} --{ev}--> must be refused"
                );
                forbidden += 1;
            }
        }
        assert_eq!(
            forbidden,
            Phase::ALL.len() * Event::ALL.len() - ALLOWED.len()
        );
    }

    #[test]
    fn selected_forbidden_transitions() {
        // The ones an engine bug would most plausibly attempt.
        for (from, ev) in [
            (P::Staged, E::Swapped),   // swap without quiescing
            (P::Fetched, E::Quiesced), // quiesce before staging
            (P::Idle, E::Failed),      // nothing under way
            (P::Failed, E::Failed),
            (P::RebootPending, E::Reset),
            (P::Swapped, E::KernelChanged), // before post-apply hooks
            (P::Idle, E::Reset),
        ] {
            assert!(from.next(ev).is_err(), "{from} --{ev}-->");
        }
    }

    #[test]
    fn invalid_transition_message() {
        let err = P::Staged.next(E::Swapped).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid update lifecycle transition: event `swapped` is not allowed in phase `staged` (allowed: quiesced, failed)"
        );
    }

    #[test]
    fn predicates() {
        for p in Phase::ALL {
            let down = matches!(p, P::Quiesced | P::Swapped);
            assert_eq!(p.is_quiesced(), down, "{p}");
            assert_eq!(p.root_may_be_mixed(), down, "{p}");
        }
    }

    #[test]
    fn serde_names_match_as_str() {
        for p in Phase::ALL {
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
            let back: Phase = serde_json::from_str(&format!("\"{p}\"")).unwrap();
            assert_eq!(back, p);
        }
        for e in Event::ALL {
            assert_eq!(serde_json::to_string(&e).unwrap(), format!("\"{e}\""));
        }
        assert_eq!(P::RebootPending.as_str(), "reboot-pending");
        assert_eq!(E::NothingToDo.as_str(), "nothing-to-do");
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A full update with a kernel change, at known times.
    fn full_run() -> Lifecycle {
        let mut lc = Lifecycle::new();
        for (ev, at) in [
            (E::Planned, 0),
            (E::Fetched, 10),
            (E::Staged, 110),
            (E::Quiesced, 130),
            (E::Swapped, 160),
            (E::Resumed, 170),
            (E::KernelChanged, 200),
        ] {
            lc.advance_at(ev, ms(at)).unwrap();
        }
        lc
    }

    #[test]
    fn durations_per_phase() {
        let lc = full_run();
        assert_eq!(lc.phase(), P::RebootPending);
        let want: BTreeMap<String, u64> = [
            ("idle", 0),
            ("planned", 10),
            ("fetched", 100),
            ("staged", 20),
            ("quiesced", 30),
            ("swapped", 10),
            ("resumed", 30),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(lc.durations_ms(), want);
        assert_eq!(lc.quiesce_window(), Some(ms(40)));
        assert_eq!(lc.history().len(), 8);
    }

    #[test]
    fn repeated_phases_are_summed() {
        let mut lc = Lifecycle::new();
        lc.advance_at(E::Planned, ms(5)).unwrap();
        lc.advance_at(E::NothingToDo, ms(8)).unwrap();
        lc.advance_at(E::Planned, ms(20)).unwrap();
        lc.advance_at(E::NothingToDo, ms(24)).unwrap();
        let d = lc.durations_ms();
        assert_eq!(d["idle"], 5 + 12);
        assert_eq!(d["planned"], 3 + 4);
        assert_eq!(lc.quiesce_window(), None);
    }

    #[test]
    fn quiesce_window_is_none_until_resumed_or_after_failure() {
        let mut lc = Lifecycle::new();
        for (ev, at) in [
            (E::Planned, 0),
            (E::Fetched, 1),
            (E::Staged, 2),
            (E::Quiesced, 3),
        ] {
            lc.advance_at(ev, ms(at)).unwrap();
        }
        assert_eq!(lc.quiesce_window(), None);
        lc.advance_at(E::Failed, ms(9)).unwrap();
        assert_eq!(lc.quiesce_window(), None);
        assert_eq!(lc.durations_ms()["quiesced"], 6);
        assert!(!lc.durations_ms().contains_key("failed"));
    }

    #[test]
    fn refused_event_changes_nothing() {
        let mut lc = full_run();
        let before = lc.history().to_vec();
        let err = lc.advance_at(E::Swapped, ms(999)).unwrap_err();
        assert_eq!(err.from, P::RebootPending);
        assert_eq!(lc.phase(), P::RebootPending);
        assert_eq!(lc.history(), before.as_slice());
    }

    #[test]
    fn time_never_runs_backwards() {
        let mut lc = Lifecycle::new();
        lc.advance_at(E::Planned, ms(50)).unwrap();
        lc.advance_at(E::Fetched, ms(10)).unwrap();
        assert_eq!(lc.durations_ms()["planned"], 0);
    }

    #[test]
    fn advance_uses_the_clock() {
        let mut lc = Lifecycle::default();
        assert_eq!(lc.advance(E::Planned), Ok(P::Planned));
        std::thread::sleep(ms(20));
        assert_eq!(lc.advance(E::NothingToDo), Ok(P::Idle));
        assert!(lc.durations_ms()["planned"] >= 20);
    }
}
