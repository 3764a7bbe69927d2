//! Running external commands so that their stderr always ends up in the error.

use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// Run a command to completion; on failure the error names the command, its
/// exit status and its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!("{shown} failed ({}): {}", out.status, stderr.trim());
    }
    Ok(out)
}
