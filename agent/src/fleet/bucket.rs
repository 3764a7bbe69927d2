//! Phased rollout: a node is admitted to a target when its bucket, a salted
//! and stable function of (target id, node id), is below the metadata's
//! `rollout_percent`. The salt is the target id, so each release picks a
//! different set of canaries; the function is SHA-256, so it is the same on
//! every machine and every release of imageupd.

use sha2::{Digest, Sha256};

/// The bucket of `node` for `target`, in [0, 100): the first 8 bytes of
/// `sha256(target ‖ 0x00 ‖ node)` as a big-endian integer, scaled by
/// 100 / 2^64. Pure and stable.
pub fn bucket(target: &str, node: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(target.as_bytes());
    h.update([0u8]);
    h.update(node.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(b) as f64) / 18_446_744_073_709_551_616.0 * 100.0
}

/// Whether `node` is admitted to `target` at `percent` (None: everyone).
pub fn admitted(target: &str, node: &str, percent: Option<f64>) -> bool {
    percent.is_none_or(|p| bucket(target, node) < p)
}

/// Read a percentage from a metadata value: a number or a numeric string,
/// 0–100 (pure).
pub fn parse_percent(v: &serde_json::Value) -> Result<f64, String> {
    let p = match v {
        serde_json::Value::Number(n) => n.as_f64().ok_or("not a number")?,
        serde_json::Value::String(s) => s
            .trim()
            .trim_end_matches('%')
            .parse::<f64>()
            .map_err(|_| format!("{s:?} is not a number"))?,
        other => return Err(format!("{other} is not a number")),
    };
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{p} is not within 0..=100"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_spread() {
        // Fixed vector: stable across releases (changing it breaks fleets).
        let b = bucket("img-2", "node07");
        assert_eq!(b, 43.63150568305606, "computed by Python's hashlib");
        assert!((0.0..100.0).contains(&b));
        let n = (0..1000)
            .filter(|i| bucket("t", &format!("n{i}")) < 25.0)
            .count();
        assert!((180..320).contains(&n), "{n} of 1000 below 25");
        assert!(admitted("t", "n", None));
        assert!(admitted("t", "n", Some(100.0)));
        assert!(!admitted("t", "n", Some(0.0)));
        assert_eq!(parse_percent(&serde_json::json!("25%")).unwrap(), 25.0);
        assert!(parse_percent(&serde_json::json!(101)).is_err());
        // Salted: the ordering differs between targets.
        let a: Vec<bool> = (0..32)
            .map(|i| bucket("a", &format!("n{i}")) < 50.0)
            .collect();
        let z: Vec<bool> = (0..32)
            .map(|i| bucket("z", &format!("n{i}")) < 50.0)
            .collect();
        assert_ne!(a, z);
    }
}
