//! The two D-Bus calls a kernel change needs (SPEC §8), with zbus's
//! blocking API: systemd's `StartUnit("kexec.target",
//! "replace-irreversibly")`, and a reboot through logind (`Reboot`), or
//! systemd's `reboot.target` where logind is not running.
//!
//! The bus is injectable ([`Bus::Address`]) so that tests talk to a private
//! `dbus-daemon` with a fake service instead of the host's systemd.

use std::time::Duration;

use anyhow::{Context, Result};
use zbus::zvariant::OwnedObjectPath;

/// systemd's bus name.
pub const SYSTEMD_DEST: &str = "org.freedesktop.systemd1";
/// systemd's manager object.
pub const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";
/// systemd's manager interface.
pub const SYSTEMD_MANAGER: &str = "org.freedesktop.systemd1.Manager";
/// logind's bus name.
pub const LOGIND_DEST: &str = "org.freedesktop.login1";
/// logind's manager object.
pub const LOGIND_PATH: &str = "/org/freedesktop/login1";
/// logind's manager interface.
pub const LOGIND_MANAGER: &str = "org.freedesktop.login1.Manager";
/// The unit that kexecs into the loaded kernel.
pub const KEXEC_TARGET: &str = "kexec.target";
/// The unit that reboots.
pub const REBOOT_TARGET: &str = "reboot.target";
/// Job mode for both: like `systemctl kexec`/`reboot`, nothing can cancel it.
pub const JOB_MODE: &str = "replace-irreversibly";
/// Longest wait for a method reply, in seconds.
pub const CALL_TIMEOUT_SECS: u64 = 25;

/// Errors meaning "logind is not there", after which a reboot goes to
/// systemd directly; any other logind error (say, a denial) is reported.
const LOGIND_ABSENT: [&str; 4] = [
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownMethod",
];
/// Prefix of the errors of a failed bus activation (logind could not be
/// started): also "not there".
const ACTIVATION_FAILED: &str = "org.freedesktop.DBus.Error.Spawn.";

/// Which bus to call.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Bus {
    /// The system bus (zbus honours `DBUS_SYSTEM_BUS_ADDRESS`).
    #[default]
    System,
    /// A bus at this address, e.g. a test's private `dbus-daemon`.
    Address(String),
}

impl Bus {
    /// Words for error messages.
    pub fn describe(&self) -> String {
        match self {
            Bus::System => "the system bus".into(),
            Bus::Address(a) => format!("the bus at {a}"),
        }
    }
}

/// How a reboot was requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebootVia {
    /// logind's `Reboot`.
    Logind,
    /// systemd's `reboot.target` (logind was not running).
    Systemd,
}

/// A connection to the bus, for the calls below.
pub struct Manager {
    conn: zbus::blocking::Connection,
    bus: Bus,
}

impl Manager {
    /// Connect to `bus`.
    pub fn connect(bus: &Bus) -> Result<Manager> {
        let builder = match bus {
            Bus::System => zbus::blocking::connection::Builder::system(),
            Bus::Address(a) => zbus::blocking::connection::Builder::address(a.as_str()),
        }
        .with_context(|| format!("invalid D-Bus address for {}", bus.describe()))?;
        let conn = builder
            .method_timeout(Duration::from_secs(CALL_TIMEOUT_SECS))
            .build()
            .with_context(|| format!("connecting to {}", bus.describe()))?;
        Ok(Manager {
            conn,
            bus: bus.clone(),
        })
    }

    /// systemd's `StartUnit(unit, mode)`; returns the job's object path.
    pub fn start_unit(&self, unit: &str, mode: &str) -> Result<String> {
        let reply = self
            .conn
            .call_method(
                Some(SYSTEMD_DEST),
                SYSTEMD_PATH,
                Some(SYSTEMD_MANAGER),
                "StartUnit",
                &(unit, mode),
            )
            .with_context(|| {
                format!(
                    "asking systemd on {} to start {unit} ({mode})",
                    self.bus.describe()
                )
            })?;
        let job: OwnedObjectPath = reply
            .body()
            .deserialize()
            .with_context(|| format!("reading systemd's reply to StartUnit({unit})"))?;
        Ok(job.as_str().to_string())
    }

    /// Start `kexec.target`: systemd stops everything and boots the loaded
    /// kernel. Returns the job path.
    pub fn kexec(&self) -> Result<String> {
        self.start_unit(KEXEC_TARGET, JOB_MODE)
    }

    /// Reboot: logind's `Reboot(false)`, or `reboot.target` through systemd
    /// when logind is not on the bus.
    pub fn reboot(&self) -> Result<RebootVia> {
        let logind = self.conn.call_method(
            Some(LOGIND_DEST),
            LOGIND_PATH,
            Some(LOGIND_MANAGER),
            "Reboot",
            &(false,),
        );
        match logind {
            Ok(_) => Ok(RebootVia::Logind),
            Err(zbus::Error::MethodError(name, _, _))
                if LOGIND_ABSENT.contains(&name.as_str())
                    || name.starts_with(ACTIVATION_FAILED) =>
            {
                tracing::info!(
                    "logind is not available ({name}); asking systemd for {REBOOT_TARGET}"
                );
                self.start_unit(REBOOT_TARGET, JOB_MODE)
                    .map(|_| RebootVia::Systemd)
            }
            Err(e) => Err(e)
                .with_context(|| format!("asking logind on {} to reboot", self.bus.describe())),
        }
    }
}

/// A private `dbus-daemon` and fake systemd/logind services, for tests
/// (this module's and [`crate::boot::reboot`]'s).
#[cfg(test)]
pub mod testbus {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};

    use zbus::zvariant::OwnedObjectPath;

    /// Calls the fakes received, e.g. `StartUnit kexec.target replace-irreversibly`.
    pub type Calls = Arc<Mutex<Vec<String>>>;

    /// A bus of our own: every name may be owned, nothing is activated.
    const CONFIG: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:tmpdir=/tmp</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#;

    /// A private `dbus-daemon` (a session bus without service activation),
    /// killed on drop.
    pub struct PrivateBus {
        child: Child,
        _config: tempfile::NamedTempFile,
        /// Its address.
        pub address: String,
    }

    impl PrivateBus {
        /// Start one (needs the `dbus-daemon` binary: package `dbus`).
        pub fn start() -> PrivateBus {
            let config = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(config.path(), CONFIG).unwrap();
            let mut child = Command::new("dbus-daemon")
                .arg(format!("--config-file={}", config.path().display()))
                .args(["--nofork", "--nopidfile", "--print-address=1"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("starting dbus-daemon (install the dbus package)");
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .expect("reading the bus address");
            assert!(!line.trim().is_empty(), "dbus-daemon printed no address");
            PrivateBus {
                child,
                _config: config,
                address: line.trim().to_string(),
            }
        }
    }

    impl Drop for PrivateBus {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    struct FakeSystemd {
        calls: Calls,
    }

    #[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
    impl FakeSystemd {
        fn start_unit(&self, name: String, mode: String) -> zbus::fdo::Result<OwnedObjectPath> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("StartUnit {name} {mode}"));
            if name == "fail.target" {
                return Err(zbus::fdo::Error::Failed("refused by the fake".into()));
            }
            Ok(OwnedObjectPath::try_from("/org/freedesktop/systemd1/job/42").unwrap())
        }
    }

    struct FakeLogind {
        calls: Calls,
        deny: bool,
    }

    #[zbus::interface(name = "org.freedesktop.login1.Manager")]
    impl FakeLogind {
        fn reboot(&self, interactive: bool) -> zbus::fdo::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("Reboot {interactive}"));
            if self.deny {
                return Err(zbus::fdo::Error::AccessDenied("denied by the fake".into()));
            }
            Ok(())
        }
    }

    /// Fake services on a bus; they stop serving when dropped.
    pub struct Fakes {
        _conns: Vec<zbus::blocking::Connection>,
        /// What they were asked.
        pub calls: Calls,
    }

    /// Serve a fake systemd, and a fake logind unless `logind` is `None`
    /// (`Some(true)`: one that denies every reboot).
    pub fn serve(address: &str, logind: Option<bool>) -> Fakes {
        let calls = Calls::default();
        let mut conns = vec![zbus::blocking::connection::Builder::address(address)
            .unwrap()
            .name(super::SYSTEMD_DEST)
            .unwrap()
            .serve_at(
                super::SYSTEMD_PATH,
                FakeSystemd {
                    calls: calls.clone(),
                },
            )
            .unwrap()
            .build()
            .expect("serving the fake systemd")];
        if let Some(deny) = logind {
            conns.push(
                zbus::blocking::connection::Builder::address(address)
                    .unwrap()
                    .name(super::LOGIND_DEST)
                    .unwrap()
                    .serve_at(
                        super::LOGIND_PATH,
                        FakeLogind {
                            calls: calls.clone(),
                            deny,
                        },
                    )
                    .unwrap()
                    .build()
                    .expect("serving the fake logind"),
            );
        }
        Fakes {
            _conns: conns,
            calls,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testbus::*;
    use super::*;

    fn calls(f: &Fakes) -> Vec<String> {
        f.calls.lock().unwrap().clone()
    }

    #[test]
    fn kexec_starts_kexec_target_irreversibly() {
        let bus = PrivateBus::start();
        let fakes = serve(&bus.address, Some(false));
        let m = Manager::connect(&Bus::Address(bus.address.clone())).unwrap();
        assert_eq!(m.kexec().unwrap(), "/org/freedesktop/systemd1/job/42");
        assert_eq!(
            calls(&fakes),
            ["StartUnit kexec.target replace-irreversibly"]
        );
    }

    #[test]
    fn reboot_through_logind_then_systemd() {
        let bus = PrivateBus::start();
        let addr = Bus::Address(bus.address.clone());
        {
            let fakes = serve(&bus.address, Some(false));
            assert_eq!(
                Manager::connect(&addr).unwrap().reboot().unwrap(),
                RebootVia::Logind
            );
            assert_eq!(calls(&fakes), ["Reboot false"]);
        }
        // Without logind on the bus, systemd's reboot.target.
        let fakes = serve(&bus.address, None);
        assert_eq!(
            Manager::connect(&addr).unwrap().reboot().unwrap(),
            RebootVia::Systemd
        );
        assert_eq!(
            calls(&fakes),
            ["StartUnit reboot.target replace-irreversibly"]
        );
    }

    #[test]
    fn errors_name_the_call_and_the_reply() {
        let bus = PrivateBus::start();
        let addr = Bus::Address(bus.address.clone());
        let fakes = serve(&bus.address, Some(true));
        let err = format!(
            "{:#}",
            Manager::connect(&addr).unwrap().reboot().unwrap_err()
        );
        assert!(
            err.contains("logind") && err.contains("denied by the fake"),
            "{err}"
        );
        assert_eq!(
            calls(&fakes),
            ["Reboot false"],
            "a denial must not fall back to systemd"
        );
        let err = format!(
            "{:#}",
            Manager::connect(&addr)
                .unwrap()
                .start_unit("fail.target", JOB_MODE)
                .unwrap_err()
        );
        assert!(
            err.contains("fail.target") && err.contains("refused by the fake"),
            "{err}"
        );
        drop(fakes);
        // The fakes leave the bus asynchronously: until the bus daemon has
        // seen them go, a call can still reach one (NoReply).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let err = loop {
            let err = format!(
                "{:#}",
                Manager::connect(&addr).unwrap().kexec().unwrap_err()
            );
            if !err.contains("NoReply") || std::time::Instant::now() > deadline {
                break err;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(
            err.contains("kexec.target") && err.contains("ServiceUnknown"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            Manager::connect(&Bus::Address("unix:path=/nonexistent/bus".into()))
                .err()
                .unwrap()
        );
        assert!(err.contains("/nonexistent/bus"), "{err}");
    }
}
