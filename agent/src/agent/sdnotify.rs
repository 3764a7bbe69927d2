//! The systemd notification protocol (`sd_notify(3)`), for `Type=notify`
//! units: `READY=1`, `STATUS=…`, `STOPPING=1` and `WATCHDOG=1` datagrams to
//! `$NOTIFY_SOCKET` (a path, or an abstract socket when it starts with `@`).
//!
//! Without `$NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Environment variable naming the notification socket.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
/// Environment variable with the watchdog timeout, in microseconds.
pub const WATCHDOG_USEC_ENV: &str = "WATCHDOG_USEC";
/// Environment variable with the pid the watchdog is meant for.
pub const WATCHDOG_PID_ENV: &str = "WATCHDOG_PID";
/// Longest STATUS text sent, in bytes; longer texts are cut.
pub const MAX_STATUS_BYTES: usize = 512;

/// A connection to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier that does nothing.
    pub fn disabled() -> Self {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// From the environment systemd gives a `Type=notify` service. A socket
    /// that cannot be used is logged and ignored: the daemon still runs.
    pub fn from_env() -> Self {
        let socket = std::env::var_os(NOTIFY_SOCKET_ENV);
        let usec = std::env::var(WATCHDOG_USEC_ENV).ok();
        let pid = std::env::var(WATCHDOG_PID_ENV).ok();
        let watchdog = watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id());
        let target = socket.and_then(|s| match connect(&s.to_string_lossy()) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(
                    "cannot use ${NOTIFY_SOCKET_ENV}={}: {e}",
                    s.to_string_lossy()
                );
                None
            }
        });
        let watchdog = watchdog.filter(|_| target.is_some());
        Notifier { target, watchdog }
    }

    /// For tests: notify to `socket` with an optional watchdog interval.
    pub fn to_socket(socket: &str, watchdog: Option<Duration>) -> io::Result<Self> {
        Ok(Notifier {
            target: Some(connect(socket)?),
            watchdog,
        })
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the unit's `WatchdogSec`, or
    /// `None` when the watchdog is off.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Send raw `KEY=VALUE` lines.
    pub fn send(&self, msg: &str) -> io::Result<()> {
        match &self.target {
            Some((sock, addr)) => sock.send_to_addr(msg.as_bytes(), addr).map(|_| ()),
            None => Ok(()),
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.log(self.send(&format!("READY=1\nSTATUS={}", clean(status))));
    }

    /// `STATUS=…`: the one line `systemctl status` shows.
    pub fn status(&self, status: &str) {
        self.log(self.send(&format!("STATUS={}", clean(status))));
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        self.log(self.send(&format!("STOPPING=1\nSTATUS={}", clean(status))));
    }

    /// `WATCHDOG=1`: still alive.
    pub fn watchdog(&self) {
        self.log(self.send("WATCHDOG=1"));
    }

    fn log(&self, r: io::Result<()>) {
        if let Err(e) = r {
            tracing::debug!("sd_notify failed: {e}");
        }
    }
}

fn connect(socket: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match socket.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None if socket.starts_with('/') => SocketAddr::from_pathname(socket)?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an absolute path or @abstract name",
            ))
        }
    };
    Ok((UnixDatagram::unbound()?, addr))
}

/// Half of `WATCHDOG_USEC` when the watchdog is meant for `me` (no
/// `WATCHDOG_PID`, or ours).
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(p) = pid {
        if p.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    let us: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(us / 2))
}

/// One line, at most [`MAX_STATUS_BYTES`].
fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    if out.len() > MAX_STATUS_BYTES {
        let mut cut = MAX_STATUS_BYTES;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::to_socket(path.to_str().unwrap(), None).unwrap();
        assert!(n.enabled());
        n.ready("watching\nmetadata");
        n.status(&"x".repeat(2000));
        n.watchdog();
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        for _ in 0..3 {
            let k = server.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..k]).into_owned());
        }
        assert_eq!(got[0], "READY=1\nSTATUS=watching metadata");
        assert_eq!(got[1].len(), "STATUS=".len() + MAX_STATUS_BYTES);
        assert_eq!(got[2], "WATCHDOG=1");
    }

    #[test]
    fn abstract_sockets_and_disabled() {
        let name = format!("imageupd-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Notifier::to_socket(&format!("@{name}"), None)
            .unwrap()
            .status("hi");
        let mut buf = [0u8; 64];
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"STATUS=hi");
        let off = Notifier::disabled();
        assert!(!off.enabled());
        off.ready("nobody listens");
        assert!(Notifier::to_socket("relative", None).is_err());
    }

    #[test]
    fn watchdog_interval_is_half_and_for_us() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        assert_eq!(watchdog_interval(Some("junk"), None, 7), None);
    }
}
