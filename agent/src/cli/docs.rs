//! `imageupd generate-docs DIR` (hidden; for packaging): man pages for
//! imageupd and each of its visible subcommands, and shell completions,
//! generated from the command-line definitions so that they never drift:
//!
//! - `DIR/man1/imageupd.1`, `DIR/man1/imageupd-<sub>.1`,
//!   `DIR/man1/imageupd-<sub>-<subsub>.1` (roff, clap_mangen);
//! - `DIR/completions/imageupd.bash`, `_imageupd` (zsh), `imageupd.fish`
//!   (clap_complete).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Command;
use clap_complete::Shell;

/// Name of the program in pages and completions.
const BIN: &str = "imageupd";

/// Write the man pages and completions of `cmd` below `dir`.
pub(crate) fn generate_docs(mut cmd: Command, dir: &Path) -> Result<u8> {
    cmd.build();
    let man = dir.join("man1");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    let mut pages = Vec::new();
    man_pages(&cmd, BIN, BIN, &man, &mut pages)?;
    let comp = dir.join("completions");
    std::fs::create_dir_all(&comp).with_context(|| format!("creating {}", comp.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let p = clap_complete::generate_to(shell, &mut cmd, BIN, &comp)
            .with_context(|| format!("writing {shell} completions into {}", comp.display()))?;
        pages.push(p);
    }
    for p in &pages {
        println!("{}", p.display());
    }
    Ok(0)
}

/// The page of `cmd` named `name` (invoked as `bin`, e.g. `imageupd
/// boot-check`), then those of its visible subcommands.
fn man_pages(
    cmd: &Command,
    name: &str,
    bin: &str,
    dir: &Path,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    // clap takes a 'static name without its "string" feature; this
    // one-shot command leaks a few bytes per page rather than widen clap.
    let static_name: &'static str = Box::leak(name.to_string().into_boxed_str());
    let page = cmd.clone().name(static_name).bin_name(bin);
    let mut buf = Vec::new();
    clap_mangen::Man::new(page)
        .title(name.to_uppercase())
        .section("1")
        .source(format!("{BIN} {}", env!("CARGO_PKG_VERSION")))
        .manual("imageupd manual")
        .render(&mut buf)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let p = dir.join(format!("{name}.1"));
    std::fs::write(&p, &buf).with_context(|| format!("writing {}", p.display()))?;
    out.push(p);
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        man_pages(
            sub,
            &format!("{name}-{}", sub.get_name()),
            &format!("{bin} {}", sub.get_name()),
            dir,
            out,
        )?;
    }
    Ok(())
}
