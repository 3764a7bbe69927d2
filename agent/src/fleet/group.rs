//! The etcd key layout of a group and a pure view of it.
//!
//! Under `<prefix>/groups/<group>/`:
//!
//! | key | lease | value |
//! |---|---|---|
//! | `nodes/<id>` | node's | [`NodeState`]: registration (counts for `N%`) and what the node waits for |
//! | `slots/<i>` | node's | holder's id: liveness of the holder of slot `i` |
//! | `claims/<i>` | none | [`Claim`]: slot `i` is taken; the semaphore itself |
//! | `inprogress/<id>` | none | [`InProgress`]: the node is disrupted (names its slot) |
//! | `failed/<id>` | none | [`Failed`]: the node's health gate failed this target |
//! | `halted` | none | [`Halted`]: the circuit breaker tripped |
//!
//! A slot `i < K` is taken by one transaction: if neither `slots/<i>` nor
//! `claims/<i>` nor `halted` exists, put all of `slots/<i>`, `claims/<i>`
//! and `inprogress/<id>`. Only `claims/*` count holders, and they are
//! persistent: a holder that crashes keeps its slot until it converges and
//! passes its gate, or an operator releases it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::etcd::Kv;

/// What a node publishes about itself in `nodes/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    /// `idle`, `waiting`, `holding`, `gating`, `rolling-back`, …
    pub state: String,
    /// Why it waits, or what it does.
    pub why: String,
    /// Image it moves to.
    pub target: Option<String>,
    /// Image it runs.
    pub current: Option<String>,
    /// When this was written, epoch ms.
    pub updated_ms: u64,
}

/// `claims/<i>`: who holds slot `i`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Holder.
    pub node: String,
    /// Image it moves to.
    pub target: String,
    /// When it took the slot, epoch ms.
    pub since_ms: u64,
}

/// `inprogress/<id>`: a node inside its disruption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgress {
    /// Its slot.
    pub slot: u32,
    /// Image it moves to.
    pub target: String,
    /// Since when, epoch ms.
    pub since_ms: u64,
}

/// `failed/<id>`: a node whose health gate failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    /// The target that failed.
    pub target: String,
    /// The failed checks.
    pub reason: String,
    /// Whether the node went back to its previous image.
    pub rolled_back: bool,
    /// When, epoch ms.
    pub at_ms: u64,
}

/// `halted`: the group's circuit breaker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Halted {
    /// The target that failed too often.
    pub target: String,
    /// Failed nodes when it tripped.
    pub failures: u32,
    /// The node whose failure tripped it.
    pub by: String,
    /// When, epoch ms.
    pub at_ms: u64,
}

/// The keys of one group.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `<prefix>/groups/<group>/`
    pub base: String,
}

impl Keys {
    /// The keys of `group` under `prefix`.
    pub fn new(prefix: &str, group: &str) -> Keys {
        Keys {
            base: format!("{prefix}/groups/{group}/"),
        }
    }
    /// `nodes/<id>`.
    pub fn node(&self, id: &str) -> String {
        format!("{}nodes/{id}", self.base)
    }
    /// `slots/<i>`.
    pub fn slot(&self, i: u32) -> String {
        format!("{}slots/{i}", self.base)
    }
    /// `claims/<i>`.
    pub fn claim(&self, i: u32) -> String {
        format!("{}claims/{i}", self.base)
    }
    /// `inprogress/<id>`.
    pub fn inprogress(&self, id: &str) -> String {
        format!("{}inprogress/{id}", self.base)
    }
    /// `failed/<id>`.
    pub fn failed(&self, id: &str) -> String {
        format!("{}failed/{id}", self.base)
    }
    /// `halted`.
    pub fn halted(&self) -> String {
        format!("{}halted", self.base)
    }
}

/// A group as read at one revision.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupView {
    /// The read's revision.
    pub revision: i64,
    /// Registered nodes.
    pub nodes: BTreeMap<String, NodeState>,
    /// Live holders by slot (lease-bound).
    pub slots: BTreeMap<u32, String>,
    /// Claims by slot (persistent): the holders.
    pub claims: BTreeMap<u32, Claim>,
    /// Nodes inside their disruption.
    pub inprogress: BTreeMap<String, InProgress>,
    /// Nodes whose gate failed.
    pub failed: BTreeMap<String, Failed>,
    /// The breaker, if tripped.
    pub halted: Option<Halted>,
    /// Keys that could not be parsed (reported, ignored).
    pub unreadable: Vec<String>,
}

impl GroupView {
    /// Build from the keys under `keys.base` (pure).
    pub fn from_kvs(keys: &Keys, revision: i64, kvs: &[Kv]) -> GroupView {
        let mut g = GroupView {
            revision,
            ..Default::default()
        };
        for kv in kvs {
            let Some(rest) = kv.key.strip_prefix(&keys.base) else {
                continue;
            };
            let (kind, name) = rest.split_once('/').unwrap_or((rest, ""));
            let ok = match kind {
                "nodes" => serde_json::from_slice(&kv.value)
                    .map(|v| g.nodes.insert(name.to_owned(), v))
                    .is_ok(),
                "slots" => name
                    .parse()
                    .map(|i| {
                        g.slots
                            .insert(i, String::from_utf8_lossy(&kv.value).into_owned())
                    })
                    .is_ok(),
                "claims" => match (name.parse(), serde_json::from_slice(&kv.value)) {
                    (Ok(i), Ok(c)) => g.claims.insert(i, c).is_none(),
                    _ => false,
                },
                "inprogress" => serde_json::from_slice(&kv.value)
                    .map(|v| g.inprogress.insert(name.to_owned(), v))
                    .is_ok(),
                "failed" => serde_json::from_slice(&kv.value)
                    .map(|v| g.failed.insert(name.to_owned(), v))
                    .is_ok(),
                "halted" => serde_json::from_slice(&kv.value)
                    .map(|v| g.halted = Some(v))
                    .is_ok(),
                _ => true,
            };
            if !ok {
                g.unreadable.push(kv.key.clone());
            }
        }
        g
    }

    /// The lowest slot below `k` that is neither claimed nor held.
    pub fn free_slot(&self, k: u32) -> Option<u32> {
        (0..k).find(|i| !self.claims.contains_key(i) && !self.slots.contains_key(i))
    }

    /// The slot `node` claims, if any (its in-progress record survived).
    pub fn claim_of(&self, node: &str) -> Option<(u32, &Claim)> {
        self.claims
            .iter()
            .find(|(_, c)| c.node == node)
            .map(|(i, c)| (*i, c))
    }

    /// Nodes that failed `target`.
    pub fn failures_of(&self, target: &str) -> usize {
        self.failed.values().filter(|f| f.target == target).count()
    }

    /// Holders (claims), for messages: `node07@0 node02@1`.
    pub fn holders(&self) -> String {
        let v: Vec<String> = self
            .claims
            .iter()
            .map(|(i, c)| format!("{}@{i}", c.node))
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(" ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> Kv {
        Kv {
            key: k.into(),
            value: v.as_bytes().to_vec(),
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        }
    }

    #[test]
    fn view_and_free_slots() {
        let k = Keys::new("/p", "g");
        let claim = r#"{"node":"a","target":"B","since_ms":1}"#;
        let g = GroupView::from_kvs(
            &k,
            9,
            &[
                kv(
                    "/p/groups/g/nodes/a",
                    r#"{"state":"holding","why":"","target":null,"current":null,"updated_ms":0}"#,
                ),
                kv(
                    "/p/groups/g/nodes/b",
                    r#"{"state":"waiting","why":"slot","target":null,"current":null,"updated_ms":0}"#,
                ),
                kv("/p/groups/g/claims/0", claim),
                kv("/p/groups/g/slots/1", "c"),
                kv(
                    "/p/groups/g/failed/b",
                    r#"{"target":"B","reason":"x","rolled_back":true,"at_ms":2}"#,
                ),
                kv("/p/groups/g/claims/x", claim),
            ],
        );
        assert_eq!(g.nodes.len(), 2);
        assert_eq!(g.free_slot(3), Some(2), "0 claimed, 1 held by a live lease");
        assert_eq!(g.free_slot(2), None);
        assert_eq!(g.claim_of("a").map(|c| c.0), Some(0));
        assert_eq!(g.failures_of("B"), 1);
        assert_eq!(g.unreadable, vec!["/p/groups/g/claims/x".to_string()]);
        assert_eq!(g.holders(), "a@0");
    }
}
