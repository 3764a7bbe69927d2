//! Where log records go: the systemd journal (with priorities and fields)
//! when stderr is connected to it, stderr otherwise.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Environment variable with the log filter (`tracing` env-filter syntax,
/// e.g. `info` or `imageupd=debug`).
pub const LOG_ENV: &str = "IMAGEUPD_LOG";

/// Whether stderr is the journal: systemd sets `$JOURNAL_STREAM` to the
/// `device:inode` of the stream it connected to stderr.
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// Install the global subscriber: `$IMAGEUPD_LOG`, else `default_filter`.
pub fn init(default_filter: &str) {
    let filter =
        || EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new(default_filter));
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_syslog_identifier("imageupd".into());
                if tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .try_init()
                    .is_ok()
                {
                    return;
                }
            }
            Err(e) => eprintln!("imageupd: cannot log to the journal ({e}); logging to stderr"),
        }
    }
    // Colours only for a person at a terminal: a log file or a pipe gets
    // plain lines.
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
