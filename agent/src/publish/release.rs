//! The release number `publish` gives an image: one more than the highest
//! on its channel among the store's images, or the operator's `--release`,
//! which must be higher than all of them (nodes refuse a lower release than
//! they have installed, so a store must never go backwards on a channel).

use anyhow::{bail, Context, Result};

use crate::format::manifest;
use crate::fs::store::Store;
use crate::sys::error::ExitKind;

/// The release for a new image on `channel`; `explicit` is `--release`.
pub fn assign(st: &Store, channel: &str, explicit: Option<u64>) -> Result<u64> {
    manifest::validate_label(channel)
        .map_err(anyhow::Error::msg)
        .context("--channel")
        .context(ExitKind::Usage)?;
    let idx = st.index()?;
    // Images published before releases existed are release 0 on `default`.
    let highest = idx
        .images
        .iter()
        .filter(|e| e.channel.as_deref().unwrap_or(manifest::DEFAULT_CHANNEL) == channel)
        .map(|e| (e.release.unwrap_or(0), e.id.as_str()))
        .max();
    next(highest, channel, explicit)
}

/// The rule on its own: `highest` is the channel's highest (release, id).
fn next(highest: Option<(u64, &str)>, channel: &str, explicit: Option<u64>) -> Result<u64> {
    match (explicit, highest) {
        (Some(0), _) => Err(anyhow::anyhow!("--release must be at least 1")).context(ExitKind::Usage),
        (Some(n), Some((h, id))) if n <= h => Err(anyhow::anyhow!(
            "--release {n} is not above release {h} (image {id:?}) on channel {channel:?}; nodes that installed it would refuse this image. Pass a higher --release, or none to get {}",
            h + 1
        ))
        .context(ExitKind::Usage),
        (Some(n), _) => Ok(n),
        (None, Some((h, _))) => match h.checked_add(1) {
            Some(n) => Ok(n),
            None => bail!("channel {channel:?} has no release number left"),
        },
        (None, None) => Ok(1),
    }
}

#[cfg(test)]
mod tests {
    use super::next;

    #[test]
    fn releases_increase_per_channel() {
        assert_eq!(next(None, "default", None).unwrap(), 1);
        assert_eq!(next(Some((4, "v4")), "default", None).unwrap(), 5);
        assert_eq!(next(Some((4, "v4")), "default", Some(9)).unwrap(), 9);
        assert!(next(Some((4, "v4")), "default", Some(4)).is_err());
        assert!(next(Some((4, "v4")), "default", Some(3)).is_err());
        assert!(next(None, "default", Some(0)).is_err());
        assert_eq!(next(None, "default", Some(7)).unwrap(), 7);
    }
}
