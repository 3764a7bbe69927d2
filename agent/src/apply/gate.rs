//! The one question the pipeline asks a fleet rollout: may this node be
//! disrupted now? Asked between the durability sync and the pre-apply
//! hooks, so fetch, verify and stage never wait for it.

/// What the pipeline asks before it disrupts the node.
pub trait SlotGate: Send + Sync + std::fmt::Debug {
    /// Called just before the pre-apply hooks; returns once the node may
    /// quiesce for `target`. An error stops the update before its swap
    /// (the root is unchanged).
    fn before_quiesce(&self, target: &str) -> anyhow::Result<()>;
}
