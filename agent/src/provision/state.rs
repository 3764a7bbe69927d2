//! Where a provisioning run is, as an enum state machine with guarded
//! transitions, and the on-disk marker that carries it across a crash.
//!
//! The marker is a 4 KiB record just below the first MiB of every disk of
//! the plan (no partition starts there: the planner aligns the first one
//! at 1 MiB or more, and GPT ends at byte 24 KiB with 4096-byte sectors).
//! It names the plan and the inputs it was written for, so a re-run with
//! the same inputs continues from the last completed step, and one with
//! other inputs starts over. Pure: encoding and decoding only.

use serde::{Deserialize, Serialize};

/// Byte offset of the marker on each disk.
pub const MARKER_OFFSET: u64 = (1 << 20) - MARKER_LEN as u64;
/// Length of the marker record in bytes (one 4096-byte sector).
pub const MARKER_LEN: usize = 4096;
/// First bytes of a marker.
const MAGIC: &[u8] = b"IMAGEUPD-PROVISION-1\n";

/// The steps of a run, in order. Each names the last one completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Nothing done (no marker for these inputs).
    Fresh,
    /// Old tables wiped (first and last MiB zeroed), marker written.
    Wiped,
    /// Every filesystem made.
    Formatted,
    /// The image applied to the root, every object verified.
    Applied,
    /// /etc/fstab written.
    Fstab,
    /// Bootloader on the ESP.
    Bootloader,
    /// Configdrive written.
    Configdrive,
    /// Partition tables written: the disk can boot.
    Table,
    /// Marker says done; a re-run has nothing to do.
    Done,
}

/// A transition that skips or repeats a step.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("provisioning cannot go from step {from:?} to {to:?}")]
pub struct BadTransition {
    /// Current step.
    pub from: Step,
    /// Asked-for step.
    pub to: Step,
}

impl Step {
    /// The step after this one.
    pub fn next(self) -> Option<Step> {
        use Step::*;
        Some(match self {
            Fresh => Wiped,
            Wiped => Formatted,
            Formatted => Applied,
            Applied => Fstab,
            Fstab => Bootloader,
            Bootloader => Configdrive,
            Configdrive => Table,
            Table => Done,
            Done => return None,
        })
    }

    /// Move to `to`, which must be the next step.
    pub fn advance(self, to: Step) -> Result<Step, BadTransition> {
        if self.next() == Some(to) {
            Ok(to)
        } else {
            Err(BadTransition { from: self, to })
        }
    }

    /// True when `step` still has to run from here.
    pub fn pending(self, step: Step) -> bool {
        step > self
    }
}

/// The marker's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The last completed step.
    pub step: Step,
    /// [`super::plan::Plan::digest`].
    pub plan: String,
    /// Digest of the other inputs (image id, configdrive, trusted keys).
    pub inputs: String,
}

impl Marker {
    /// The record as written to disk: magic, JSON, zero padding.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend(serde_json::to_vec(self).unwrap_or_default());
        b.resize(MARKER_LEN, 0);
        b
    }

    /// The marker in a record read from disk; `None` when there is none
    /// (zeros, another tool's bytes, or a torn or foreign record).
    pub fn decode(b: &[u8]) -> Option<Marker> {
        let rest = b.strip_prefix(MAGIC)?;
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        serde_json::from_slice(&rest[..end]).ok()
    }

    /// Where a run with these inputs starts: after the marker's step when
    /// it was written for the same plan and inputs, else from scratch.
    pub fn resume_from(found: Option<&Marker>, plan: &str, inputs: &str) -> Step {
        match found {
            Some(m) if m.plan == plan && m.inputs == inputs => m.step,
            _ => Step::Fresh,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_advance_one_at_a_time() {
        let mut s = Step::Fresh;
        let mut n = 0;
        while let Some(t) = s.next() {
            s = s.advance(t).unwrap();
            n += 1;
        }
        assert_eq!((s, n), (Step::Done, 8));
        assert_eq!(
            Step::Wiped.advance(Step::Applied),
            Err(BadTransition {
                from: Step::Wiped,
                to: Step::Applied
            })
        );
        assert!(Step::Formatted.advance(Step::Formatted).is_err());
        assert!(Step::Done.advance(Step::Fresh).is_err());
        assert!(Step::Formatted.pending(Step::Applied));
        assert!(!Step::Formatted.pending(Step::Formatted));
    }

    #[test]
    fn marker_round_trip_and_resume() {
        let m = Marker {
            step: Step::Applied,
            plan: "p".into(),
            inputs: "i".into(),
        };
        let b = m.encode();
        assert_eq!(b.len(), MARKER_LEN);
        assert_eq!(Marker::decode(&b), Some(m.clone()));
        assert_eq!(Marker::decode(&[0u8; MARKER_LEN]), None);
        let mut torn = b.clone();
        torn[MAGIC.len() + 3] = b'}';
        assert_eq!(Marker::decode(&torn), None);
        assert_eq!(Marker::resume_from(Some(&m), "p", "i"), Step::Applied);
        assert_eq!(Marker::resume_from(Some(&m), "p", "other"), Step::Fresh);
        assert_eq!(Marker::resume_from(Some(&m), "q", "i"), Step::Fresh);
        assert_eq!(Marker::resume_from(None, "p", "i"), Step::Fresh);
        assert!(MARKER_OFFSET + MARKER_LEN as u64 <= 1 << 20);
    }
}
