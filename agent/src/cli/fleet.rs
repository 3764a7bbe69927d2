//! `imageupd fleet status|release|resume`: the operator's view of the
//! rollout state kept in etcd (see docs/fleet.md).

use anyhow::{Context, Result};
use clap::Subcommand;

use imageupd::fleet::ops;
use imageupd::sys::error::ExitKind;

use super::print_json;

/// Where to find etcd.
#[derive(clap::Args, Clone)]
pub(crate) struct FleetArgs {
    #[command(flatten)]
    root: crate::RootArg,
    /// etcd client URL (repeatable); default: the node's [rollout] etcd.
    #[arg(long)]
    etcd: Vec<String>,
    /// Key prefix in etcd; default: the node's [rollout] prefix.
    #[arg(long)]
    prefix: Option<String>,
}

/// The fleet subcommands.
#[derive(Subcommand)]
pub(crate) enum FleetCmd {
    /// Per group: holders, in-progress records, failures, halt, and the
    /// nodes waiting and why.
    Status {
        #[command(flatten)]
        at: FleetArgs,
        /// Only this group.
        #[arg(long)]
        group: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give back NODE's slot and drop its in-progress record (the operator
    /// vouches that the node is no longer disrupted).
    Release {
        #[command(flatten)]
        at: FleetArgs,
        /// Group (default: the node's [rollout] group).
        #[arg(long)]
        group: Option<String>,
        /// The node id.
        node: String,
    },
    /// Lift GROUP's circuit breaker: nodes may start the failed target again.
    Resume {
        #[command(flatten)]
        at: FleetArgs,
        /// The group.
        group: String,
    },
}

/// Run one fleet subcommand.
pub(crate) fn run(cmd: FleetCmd) -> Result<u8> {
    let (FleetCmd::Status { at, .. } | FleetCmd::Release { at, .. } | FleetCmd::Resume { at, .. }) =
        &cmd;
    let cfg = imageupd::engine::config::Config::load(&at.root.root)?;
    let rollout = imageupd::fleet::config::rollout(&cfg).context(ExitKind::Usage)?;
    let t = ops::Target::new(rollout.as_ref(), &at.etcd, at.prefix.as_deref())
        .context(ExitKind::Usage)?;
    let group = |g: Option<String>| {
        g.or(t.group.clone())
            .ok_or_else(|| anyhow::anyhow!("pass --group (no [rollout] group on this node)"))
            .context(ExitKind::Usage)
    };
    match cmd {
        FleetCmd::Status { group: g, json, .. } => {
            let s = ops::status(&t, g.as_deref())?;
            if json {
                print_json(&serde_json::json!({ "groups": s }))?;
            } else {
                print!("{}", ops::render(&s));
            }
        }
        FleetCmd::Release { group: g, node, .. } => {
            print_json(&ops::release(&t, &group(g)?, &node)?)?
        }
        FleetCmd::Resume { group: g, .. } => print_json(&ops::resume(&t, &g)?)?,
    }
    Ok(0)
}
