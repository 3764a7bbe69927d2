//! Weekly maintenance windows (zincati's `periodic` strategy): a node takes
//! a slot only inside one, and checks again once it holds the slot. Pure:
//! the caller passes the time and the zone's offset at that time
//! ([`super::zone::Zone::offset_at`]).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Minutes in a week.
pub const WEEK_MINUTES: u32 = 7 * 24 * 60;
/// Minutes in a day.
const DAY_MINUTES: u32 = 24 * 60;
/// Day names, Monday first, as accepted in `days`.
const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// One `[[rollout.window]]` as written.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// Days the window starts on: `Mon` … `Sun` (or full English names).
    pub days: Vec<String>,
    /// Local start time, `HH:MM`.
    pub start_time: String,
    /// Length in minutes (1 to a week).
    pub length_minutes: u32,
}

/// A parsed window: start minutes within the week (Monday 00:00 = 0) and
/// a length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Minute of the week of each start, local time.
    pub starts: Vec<u32>,
    /// Length, in minutes.
    pub length_minutes: u32,
}

impl Window {
    /// Parse a spec (pure).
    pub fn from_spec(s: &WindowSpec) -> Result<Window> {
        if s.length_minutes == 0 || s.length_minutes > WEEK_MINUTES {
            bail!("window length_minutes must be 1..={WEEK_MINUTES}");
        }
        let (h, m) = s
            .start_time
            .split_once(':')
            .with_context(|| format!("start_time {:?} is not HH:MM", s.start_time))?;
        let (h, m): (u32, u32) = (
            h.parse().context("start_time hour")?,
            m.parse().context("start_time minute")?,
        );
        if h > 23 || m > 59 {
            bail!("start_time {:?} is not a time of day", s.start_time);
        }
        if s.days.is_empty() {
            bail!("window days must not be empty");
        }
        let mut starts = Vec::new();
        for d in &s.days {
            let i = DAYS
                .iter()
                .position(|n| d.len() >= 3 && n.eq_ignore_ascii_case(&d[..3]))
                .with_context(|| format!("unknown day {d:?} (Mon … Sun)"))?;
            starts.push(i as u32 * DAY_MINUTES + h * 60 + m);
        }
        Ok(Window {
            starts,
            length_minutes: s.length_minutes,
        })
    }

    /// Whether minute-of-week `mow` (local) falls inside this window; a
    /// window may wrap past Sunday midnight.
    pub fn contains(&self, mow: u32) -> bool {
        self.starts
            .iter()
            .any(|&s| (mow + WEEK_MINUTES - s) % WEEK_MINUTES < self.length_minutes)
    }
}

/// Parse a time zone: `UTC`, `Z`, or an offset `+HH:MM` / `-HH:MM`; the
/// offset from UTC in seconds (pure).
pub fn parse_offset(tz: &str) -> Result<i32> {
    let t = tz.trim();
    if t.eq_ignore_ascii_case("utc") || t == "Z" || t == "Etc/UTC" {
        return Ok(0);
    }
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'+') => (1, &t[1..]),
        Some(b'-') => (-1, &t[1..]),
        _ => bail!("time_zone {tz:?}: not UTC or an offset like +02:00"),
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
    let (h, m): (i32, i32) = (
        h.parse().with_context(|| format!("time_zone {tz:?}"))?,
        m.parse().with_context(|| format!("time_zone {tz:?}"))?,
    );
    if h > 14 || m > 59 {
        bail!("time_zone {tz:?} is out of range");
    }
    Ok(sign * (h * 3600 + m * 60))
}

/// Local minute of the week (Monday 00:00 = 0) at `unix_secs` with the
/// given offset.
pub fn minute_of_week(unix_secs: i64, offset_secs: i32) -> u32 {
    let local = unix_secs + offset_secs as i64;
    let minutes = local.div_euclid(60);
    let days = minutes.div_euclid(DAY_MINUTES as i64);
    // 1970-01-01 was a Thursday (Monday-first index 3).
    let dow = (days + 3).rem_euclid(7) as u32;
    dow * DAY_MINUTES + minutes.rem_euclid(DAY_MINUTES as i64) as u32
}

/// Whether a node may be disrupted at `unix_secs`: no windows means always.
pub fn is_open(windows: &[Window], offset_secs: i32, unix_secs: i64) -> bool {
    windows.is_empty() || {
        let mow = minute_of_week(unix_secs, offset_secs);
        windows.iter().any(|w| w.contains(mow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(days: &[&str], start: &str, len: u32) -> Window {
        Window::from_spec(&WindowSpec {
            days: days.iter().map(|s| s.to_string()).collect(),
            start_time: start.into(),
            length_minutes: len,
        })
        .unwrap()
    }

    #[test]
    fn weekly_windows() {
        // 2024-01-01 00:00 UTC was a Monday.
        let mon = 1_704_067_200;
        assert_eq!(minute_of_week(mon, 0), 0);
        assert_eq!(minute_of_week(mon + 86_400 * 6 + 60, 0), 6 * 1440 + 1);
        let sat = w(&["Sat"], "22:00", 180);
        let sat22 = mon + 5 * 86_400 + 22 * 3600;
        assert!(!is_open(std::slice::from_ref(&sat), 0, sat22 - 60));
        assert!(is_open(std::slice::from_ref(&sat), 0, sat22));
        assert!(is_open(std::slice::from_ref(&sat), 0, sat22 + 179 * 60));
        assert!(!is_open(std::slice::from_ref(&sat), 0, sat22 + 180 * 60));
        // Wraps past Sunday midnight.
        let sun = w(&["sunday"], "23:00", 120);
        assert!(is_open(
            std::slice::from_ref(&sun),
            0,
            mon + 7 * 86_400 + 30 * 60
        ));
        // Offsets: 22:00 at +02:00 is 20:00 UTC.
        assert!(is_open(std::slice::from_ref(&sat), 7200, sat22 - 2 * 3600));
        assert!(is_open(&[], 0, 0), "no windows: always open");
        assert_eq!(parse_offset("-05:30").unwrap(), -(5 * 3600 + 1800));
        assert!(parse_offset("Europe/Berlin").is_err());
        for (d, s, l) in [
            ("Xyz", "01:00", 5),
            ("Mon", "24:00", 5),
            ("Mon", "1", 5),
            ("Mon", "01:00", 0),
        ] {
            assert!(Window::from_spec(&WindowSpec {
                days: vec![d.into()],
                start_time: s.into(),
                length_minutes: l
            })
            .is_err());
        }
    }
}
