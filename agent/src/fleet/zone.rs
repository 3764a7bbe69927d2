//! The clock of the maintenance windows: `UTC`, a fixed offset, or an IANA
//! time zone (`Europe/Berlin`), whose offset changes with daylight saving
//! time. Windows are written in local wall-clock time, as zincati's
//! `periodic` strategy does, so a `Sat 22:00` window stays at 22:00 local
//! across a DST change.
//!
//! An IANA name is looked up once, when the configuration is loaded: in the
//! node's `/usr/share/zoneinfo` first (kept current by the image's tzdata),
//! else in the copy of the time zone database built into the binary, so a
//! minimal image without tzdata still gets the right rules. After that,
//! [`Zone::offset_at`] is pure.
//!
//! Local times that a DST change skips never occur (a window starting in
//! the skipped hour opens at the first minute after it that it covers);
//! local times that repeat occur twice, and a window covering them is open
//! both times. Both follow from deciding on the local time at each instant.

use anyhow::{bail, Context, Result};
use serde::{Serialize, Serializer};

use super::window::parse_offset;

/// Longest IANA zone name accepted, in bytes (the longest real one,
/// `America/Argentina/ComodRivadavia`, has 32).
const MAX_NAME_BYTES: usize = 64;

/// The time zone the windows are written in.
#[derive(Clone, Debug)]
pub enum Zone {
    /// UTC or a fixed offset from it.
    Fixed {
        /// As written (`UTC`, `+02:00`).
        name: String,
        /// Offset from UTC, in seconds.
        offset_secs: i32,
    },
    /// An IANA time zone with its rules.
    Iana {
        /// The IANA name (`Europe/Berlin`).
        name: String,
        /// The zone's rules (transitions and the POSIX rule after them).
        tz: jiff::tz::TimeZone,
    },
}

impl Default for Zone {
    fn default() -> Zone {
        Zone::Fixed {
            name: "UTC".into(),
            offset_secs: 0,
        }
    }
}

impl PartialEq for Zone {
    fn eq(&self, other: &Zone) -> bool {
        self.name() == other.name()
    }
}

impl Serialize for Zone {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl Zone {
    /// Parse `time_zone` as written: `UTC`, `Z`, `±HH:MM`, or an IANA name,
    /// which is looked up in the time zone database (the one I/O here).
    pub fn parse(s: &str) -> Result<Zone> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("utc") || t == "Z" || t.starts_with('+') || t.starts_with('-') {
            return Ok(Zone::Fixed {
                name: t.to_owned(),
                offset_secs: parse_offset(t)?,
            });
        }
        check_iana_name(t)?;
        let bundled = jiff::tz::TimeZoneDatabase::bundled();
        let tz = lookup(t, jiff::tz::db(), &bundled).with_context(|| {
            format!(
                "time_zone {t:?} is not a time zone of the IANA database \
                 (use a name such as \"Europe/Berlin\", \"UTC\" or an offset such as \"+02:00\")"
            )
        })?;
        Ok(Zone::Iana {
            name: t.to_owned(),
            tz,
        })
    }

    /// The name as configured.
    pub fn name(&self) -> &str {
        match self {
            Zone::Fixed { name, .. } | Zone::Iana { name, .. } => name,
        }
    }

    /// Offset from UTC at `unix_secs`, in seconds (pure).
    pub fn offset_at(&self, unix_secs: i64) -> i32 {
        match self {
            Zone::Fixed { offset_secs, .. } => *offset_secs,
            Zone::Iana { tz, .. } => match jiff::Timestamp::from_second(unix_secs) {
                Ok(ts) => tz.to_offset(ts).seconds(),
                // Outside jiff's range (±9999 years): no DST rule applies.
                Err(_) => 0,
            },
        }
    }
}

/// `name` in the node's database, else in the bundled one: a node's tzdata
/// may be missing altogether or split (Debian moved the old aliases such
/// as `US/Eastern` to tzdata-legacy).
fn lookup(
    name: &str,
    system: &jiff::tz::TimeZoneDatabase,
    bundled: &jiff::tz::TimeZoneDatabase,
) -> Result<jiff::tz::TimeZone> {
    match system.get(name) {
        Ok(tz) => Ok(tz),
        Err(sys_err) => bundled
            .get(name)
            .map_err(|e| anyhow::anyhow!("{e} (node's database: {sys_err})")),
    }
}

/// Refuse names that could not be an IANA zone before any lookup: the
/// database is a directory tree, and a name must never walk out of it.
fn check_iana_name(t: &str) -> Result<()> {
    let ok_byte = |b: u8| b.is_ascii_alphanumeric() || b"/_+-".contains(&b);
    if t.is_empty()
        || t.len() > MAX_NAME_BYTES
        || !t.bytes().all(ok_byte)
        || t.starts_with('/')
        || t.split('/').any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!(
            "time_zone {t:?} is neither UTC, an offset such as \"+02:00\", \
             nor an IANA zone name such as \"Europe/Berlin\""
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-01-15 12:00 UTC and 2024-07-15 12:00 UTC.
    const WINTER: i64 = 1_705_320_000;
    const SUMMER: i64 = 1_721_044_800;

    #[test]
    fn fixed_offsets_and_utc() {
        assert_eq!(Zone::parse("UTC").unwrap().offset_at(SUMMER), 0);
        assert_eq!(Zone::parse("+02:00").unwrap().offset_at(WINTER), 7200);
        assert_eq!(Zone::parse("-05:30").unwrap().offset_at(SUMMER), -19_800);
        assert_eq!(Zone::default().name(), "UTC");
    }

    #[test]
    fn iana_zones_follow_daylight_saving() {
        let berlin = Zone::parse("Europe/Berlin").unwrap();
        assert_eq!(berlin.offset_at(WINTER), 3600);
        assert_eq!(berlin.offset_at(SUMMER), 7200);
        let ny = Zone::parse("America/New_York").unwrap();
        assert_eq!(ny.offset_at(WINTER), -5 * 3600);
        assert_eq!(ny.offset_at(SUMMER), -4 * 3600);
        // The switch itself: 2024-03-31 01:00 UTC, Berlin goes +1 → +2.
        let switch = 1_711_846_800;
        assert_eq!(berlin.offset_at(switch - 1), 3600);
        assert_eq!(berlin.offset_at(switch), 7200);
        assert_eq!(
            Zone::parse("Asia/Kolkata").unwrap().offset_at(SUMMER),
            19_800
        );
        assert_eq!(serde_json::to_string(&berlin).unwrap(), "\"Europe/Berlin\"");
    }

    #[test]
    fn a_node_without_tzdata_uses_the_bundled_database() {
        let none = jiff::tz::TimeZoneDatabase::none();
        let bundled = jiff::tz::TimeZoneDatabase::bundled();
        let tz = lookup("Europe/Berlin", &none, &bundled).unwrap();
        assert_eq!(
            tz.to_offset(jiff::Timestamp::from_second(SUMMER).unwrap())
                .seconds(),
            7200
        );
        // Positive control: with neither database the name is refused.
        assert!(lookup("Europe/Berlin", &none, &none).is_err());
    }

    #[test]
    fn bad_names_are_refused_before_any_lookup() {
        for bad in [
            "",
            "Mars/Olympus_Mons",
            "../../etc/passwd",
            "/etc/localtime",
            "Europe//Berlin",
            "Europe/./Berlin",
            "Europe/Berlin\0",
            "+25:00",
        ] {
            let e = Zone::parse(bad).unwrap_err();
            assert!(
                format!("{e:#}").contains("time_zone"),
                "{bad:?}: unclear error {e:#}"
            );
        }
    }
}
