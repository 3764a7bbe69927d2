//! Exit codes (documented in the README; stable).
//!
//! Errors travel as `anyhow::Error`; the place that knows what kind of
//! failure it is attaches an [`ExitKind`] as context, and `main` finds it
//! anywhere in the chain.

use std::fmt;

/// Classes of failure, each with a stable process exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Anything not classified below (exit 1).
    Other,
    /// Bad command line or argument value (exit 2).
    Usage,
    /// `verify` found drift (exit 3).
    Drift,
    /// Untrusted input: signature, digest, manifest format or path (exit 4).
    Untrusted,
    /// Preflight refused: free space, path conflicts (exit 5). Root unchanged.
    Preflight,
    /// A pre-apply hook failed; abort hooks ran; root unchanged (exit 6).
    PreApplyHook,
    /// A post-apply hook failed; the update is committed (exit 7).
    PostApplyHook,
    /// Another apply holds the lock (exit 8).
    Locked,
    /// The source could not be read: missing image or object, I/O (exit 9).
    Source,
}

impl ExitKind {
    /// The process exit code.
    pub fn code(self) -> i32 {
        match self {
            ExitKind::Other => 1,
            ExitKind::Usage => 2,
            ExitKind::Drift => 3,
            ExitKind::Untrusted => 4,
            ExitKind::Preflight => 5,
            ExitKind::PreApplyHook => 6,
            ExitKind::PostApplyHook => 7,
            ExitKind::Locked => 8,
            ExitKind::Source => 9,
        }
    }

    /// Find the classification of an error, `Other` if none.
    pub fn of(err: &anyhow::Error) -> ExitKind {
        err.downcast_ref::<ExitKind>()
            .copied()
            .unwrap_or(ExitKind::Other)
    }
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExitKind::Other => "error",
            ExitKind::Usage => "invalid argument",
            ExitKind::Drift => "drift",
            ExitKind::Untrusted => "untrusted input",
            ExitKind::Preflight => "preflight check failed",
            ExitKind::PreApplyHook => "pre-apply hook failed",
            ExitKind::PostApplyHook => "post-apply hook failed",
            ExitKind::Locked => "locked",
            ExitKind::Source => "source unavailable",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn found_under_more_context() {
        let e: anyhow::Result<()> = Err(anyhow::anyhow!("bad sig"));
        let e = e
            .context(ExitKind::Untrusted)
            .context("applying v2")
            .unwrap_err();
        assert_eq!(ExitKind::of(&e), ExitKind::Untrusted);
        assert_eq!(ExitKind::of(&anyhow::anyhow!("x")), ExitKind::Other);
    }
}
