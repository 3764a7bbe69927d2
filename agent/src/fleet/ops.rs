//! Operator commands: `imageupd fleet status|release|resume`. They read and
//! write the same keys as the nodes ([`super::group`]); nothing else keeps
//! state.

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;

use super::config::RolloutConfig;
use super::etcd::{Cmp, Etcd, Op};
use super::group::{GroupView, Keys};

/// Where the operator commands find etcd.
#[derive(Debug)]
pub struct Target {
    /// Client.
    pub etcd: Etcd,
    /// Key prefix.
    pub prefix: String,
    /// Default group (the node's).
    pub group: Option<String>,
}

impl Target {
    /// From a node's `[rollout]` table, with command-line overrides.
    pub fn new(
        cfg: Option<&RolloutConfig>,
        etcd: &[String],
        prefix: Option<&str>,
    ) -> Result<Target> {
        let mut c = match cfg {
            Some(c) => c.clone(),
            None if etcd.is_empty() => {
                bail!("no [rollout] table in the node's configuration: pass --etcd URL")
            }
            None => RolloutConfig::merge(None, Default::default())?,
        };
        if !etcd.is_empty() {
            c.etcd = etcd.to_vec();
        }
        if let Some(p) = prefix {
            c.prefix = p.to_owned();
        }
        Ok(Target {
            etcd: super::coord::client(&c)?,
            prefix: c.prefix.clone(),
            group: cfg.map(|c| c.group.clone()),
        })
    }

    /// Every group with keys under the prefix.
    pub fn groups(&self) -> Result<Vec<String>> {
        let base = format!("{}/groups/", self.prefix);
        let (_, kvs) = self.etcd.range_prefix(&base)?;
        let set: BTreeSet<String> = kvs
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(&base))
            .filter_map(|r| r.split('/').next())
            .map(str::to_owned)
            .collect();
        Ok(set.into_iter().collect())
    }

    /// One group's view.
    pub fn view(&self, group: &str) -> Result<GroupView> {
        let keys = Keys::new(&self.prefix, group);
        let (rev, kvs) = self.etcd.range_prefix(&keys.base)?;
        Ok(GroupView::from_kvs(&keys, rev, &kvs))
    }
}

/// One group, as `fleet status` reports it.
#[derive(Debug, Serialize)]
pub struct GroupStatus {
    /// Name.
    pub group: String,
    /// Everything read.
    #[serde(flatten)]
    pub view: GroupView,
    /// Holders whose lease is gone (crashed or cut off): they still count.
    pub holders_without_lease: Vec<String>,
    /// Nodes waiting, and why.
    pub waiting: Vec<(String, String)>,
}

/// `fleet status`: every group (or `group`).
pub fn status(t: &Target, group: Option<&str>) -> Result<Vec<GroupStatus>> {
    let groups = match group {
        Some(g) => vec![g.to_owned()],
        None => t.groups()?,
    };
    groups
        .into_iter()
        .map(|g| {
            let view = t.view(&g)?;
            let holders_without_lease = view
                .claims
                .iter()
                .filter(|(i, c)| view.slots.get(i) != Some(&c.node))
                .map(|(_, c)| c.node.clone())
                .collect();
            let waiting = view
                .nodes
                .iter()
                .filter(|(_, s)| s.state == "waiting" || s.state == "failed")
                .map(|(n, s)| (n.clone(), s.why.clone()))
                .collect();
            Ok(GroupStatus {
                group: g,
                view,
                holders_without_lease,
                waiting,
            })
        })
        .collect()
}

/// `fleet status` as text.
pub fn render(groups: &[GroupStatus]) -> String {
    let mut o = String::new();
    if groups.is_empty() {
        o.push_str("no groups in etcd\n");
    }
    for g in groups {
        let v = &g.view;
        o.push_str(&format!(
            "group {} (rev {}): {} node(s) registered\n",
            g.group,
            v.revision,
            v.nodes.len()
        ));
        if let Some(h) = &v.halted {
            o.push_str(&format!(
                "  HALTED: {} node(s) failed {} (last: {}); `imageupd fleet resume {}`\n",
                h.failures, h.target, h.by, g.group
            ));
        }
        for (i, c) in &v.claims {
            let live = if g.holders_without_lease.contains(&c.node) {
                "lease gone: down or cut off, still counts"
            } else {
                "alive"
            };
            o.push_str(&format!(
                "  slot {i}: {} -> {} ({live})\n",
                c.node, c.target
            ));
        }
        for (n, ip) in &v.inprogress {
            o.push_str(&format!(
                "  in progress: {n} -> {} (slot {})\n",
                ip.target, ip.slot
            ));
        }
        for (n, f) in &v.failed {
            o.push_str(&format!(
                "  failed: {n} on {} ({}){}\n",
                f.target,
                f.reason,
                if f.rolled_back { ", rolled back" } else { "" }
            ));
        }
        for (n, why) in &g.waiting {
            o.push_str(&format!("  waiting: {n}: {why}\n"));
        }
    }
    o
}

/// `fleet release NODE`: drop the node's claim and in-progress record (an
/// operator vouches that it is no longer disrupted). What was removed.
pub fn release(t: &Target, group: &str, node: &str) -> Result<serde_json::Value> {
    let keys = Keys::new(&t.prefix, group);
    let v = t.view(group)?;
    let mut slots = Vec::new();
    for (i, c) in v.claims.iter().filter(|(_, c)| c.node == node) {
        let bytes = serde_json::to_vec(c)?;
        let (ok, _) = t.etcd.txn(
            &[Cmp::ValueIs(keys.claim(*i), bytes)],
            &[Op::Delete(keys.claim(*i)), Op::Delete(keys.slot(*i))],
        )?;
        if ok {
            slots.push(*i);
        }
    }
    let ip = t
        .etcd
        .delete(&keys.inprogress(node))
        .context("deleting the in-progress record")?;
    if slots.is_empty() && ip == 0 {
        bail!("node {node} holds no slot and has no in-progress record in group {group}");
    }
    Ok(json!({"group": group, "node": node, "released_slots": slots, "inprogress_removed": ip > 0}))
}

/// `fleet resume GROUP`: lift the circuit breaker.
pub fn resume(t: &Target, group: &str) -> Result<serde_json::Value> {
    let keys = Keys::new(&t.prefix, group);
    let n = t.etcd.delete(&keys.halted())?;
    Ok(json!({"group": group, "was_halted": n > 0}))
}
