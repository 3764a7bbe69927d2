//! TUF's client rules, one test each (numbers from the TUF 1.0 spec).

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;

use super::root::RootDoc;
use super::*;
use crate::format::sign::key_id;

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn pubtext(k: &SigningKey) -> String {
    use base64::Engine as _;
    format!(
        "imageupd-ed25519-public {} test",
        base64::engine::general_purpose::STANDARD.encode(k.verifying_key().as_bytes())
    )
}

fn role(ks: &[&SigningKey], threshold: u32) -> Role {
    Role {
        keyids: ks.iter().map(|k| key_id(&k.verifying_key())).collect(),
        threshold,
    }
}

/// A root document: root keys `rk` (threshold `rt`), one targets key and one timestamp key.
fn doc(version: u64, rk: &[&SigningKey], rt: u32, ts: &SigningKey, expires: &str) -> RootDoc {
    let tk = key(200);
    let mut keys = BTreeMap::new();
    for k in rk.iter().copied().chain([&tk, ts]) {
        keys.insert(key_id(&k.verifying_key()), pubtext(k));
    }
    let mut roles = BTreeMap::new();
    roles.insert("root".to_string(), role(rk, rt));
    roles.insert("targets".to_string(), role(&[&tk], 1));
    roles.insert("timestamp".to_string(), role(&[ts], 1));
    RootDoc {
        kind: "root".into(),
        version,
        expires: expires.into(),
        keys,
        roles,
    }
}

const FAR: &str = "2099-01-01T00:00:00Z";

fn signed(d: &RootDoc, by: &[&SigningKey]) -> Vec<u8> {
    let mut e = Envelope::new("root", &serde_json::to_vec(d).unwrap());
    for k in by {
        e.sign(k).unwrap();
    }
    e.to_bytes()
}

#[test]
fn anchor_needs_its_own_threshold() {
    let (a, b, s) = (key(1), key(2), key(9));
    let d = doc(1, &[&a, &b], 2, &s, FAR);
    assert!(Root::anchor(&signed(&d, &[&a, &b])).is_ok());
    assert!(matches!(
        Root::anchor(&signed(&d, &[&a])),
        Err(TufError::Threshold {
            valid: 1,
            threshold: 2,
            ..
        })
    ));
}

#[test]
fn rule_5_3_4_a_key_counts_once() {
    let (a, b, s) = (key(1), key(2), key(9));
    let d = doc(1, &[&a, &b], 2, &s, FAR);
    let mut e = Envelope::new("root", &serde_json::to_vec(&d).unwrap());
    e.sign(&a).unwrap();
    let dup = e.signatures[0].clone();
    e.signatures.push(dup);
    assert!(matches!(
        Root::anchor(&e.to_bytes()),
        Err(TufError::Threshold { valid: 1, .. })
    ));
}

#[test]
fn rule_5_3_4_and_5_new_root_needs_old_and_new_keys() {
    let (a, b, c, s) = (key(1), key(2), key(3), key(9));
    let v1 = Root::anchor(&signed(&doc(1, &[&a, &b], 2, &s, FAR), &[&a, &b])).unwrap();
    // v2 rotates b out for c.
    let d2 = doc(2, &[&a, &c], 2, &s, FAR);
    assert!(v1.update(&signed(&d2, &[&a, &b, &c])).is_ok());
    // Only the new keys: a stolen pair of new keys cannot take over.
    assert!(matches!(
        v1.update(&signed(&d2, &[&a, &c])),
        Err(TufError::Threshold { .. })
    ));
    // Only the old keys: the new root must be able to sign for itself.
    assert!(matches!(
        v1.update(&signed(&d2, &[&a, &b])),
        Err(TufError::Threshold { .. })
    ));
}

#[test]
fn rule_5_3_5_versions_follow_one_by_one() {
    let (a, s) = (key(1), key(9));
    let v1 = Root::anchor(&signed(&doc(1, &[&a], 1, &s, FAR), &[&a])).unwrap();
    for v in [1, 3] {
        assert!(matches!(
            v1.update(&signed(&doc(v, &[&a], 1, &s, FAR), &[&a])),
            Err(TufError::Version { want: 2, .. })
        ));
    }
}

#[test]
fn rule_5_3_10_expired_final_root_is_refused() {
    let (a, s) = (key(1), key(9));
    let r = Root::anchor(&signed(
        &doc(1, &[&a], 1, &s, "2024-01-01T00:00:00Z"),
        &[&a],
    ))
    .unwrap();
    let jan2 = parse_time("2024-01-02T00:00:00Z").unwrap();
    assert!(matches!(r.check_fresh(jan2), Err(TufError::Expired { .. })));
    assert!(r.check_fresh(jan2 - 2 * 86_400).is_ok());
}

#[test]
fn rule_5_3_11_timestamp_key_rotation_is_seen() {
    let (a, s, s2) = (key(1), key(9), key(10));
    let v1 = Root::anchor(&signed(&doc(1, &[&a], 1, &s, FAR), &[&a])).unwrap();
    let v2 = v1
        .update(&signed(&doc(2, &[&a], 1, &s2, FAR), &[&a]))
        .unwrap();
    assert!(v1.role_keys_changed(&v2, "timestamp"));
    assert!(!v1.role_keys_changed(&v2, "root"));
}

#[test]
fn root_documents_are_checked() {
    let (a, s) = (key(1), key(9));
    let mut d = doc(1, &[&a], 1, &s, FAR);
    d.roles.get_mut("root").unwrap().threshold = 2;
    assert!(matches!(d.check(), Err(TufError::Malformed(_))));
    let mut d = doc(1, &[&a], 1, &s, FAR);
    let (id, text) = d.keys.pop_first().unwrap();
    d.keys.insert(format!("{id}00"), text);
    assert!(d.check().is_err(), "a key listed under another id");
    let mut d = doc(1, &[&a], 1, &s, FAR);
    d.roles.remove("timestamp");
    assert!(d.check().is_err());
}

fn ts_env(v: u64, expires: &str, by: &SigningKey, images: BTreeMap<String, Listing>) -> Vec<u8> {
    let t = Timestamp {
        kind: "timestamp".into(),
        version: v,
        issued: "2023-12-01T00:00:00Z".into(),
        expires: expires.into(),
        images,
    };
    let mut e = Envelope::new("timestamp", &serde_json::to_vec(&t).unwrap());
    e.sign(by).unwrap();
    e.to_bytes()
}

fn listing(bytes: &[u8], release: u64) -> Listing {
    Listing {
        sha256: crate::format::manifest::Digest::of(bytes).to_hex(),
        length: bytes.len() as u64,
        channel: "default".into(),
        release,
    }
}

#[test]
fn rule_5_4_timestamp_signed_never_older_and_fresh() {
    let (a, s, other) = (key(1), key(9), key(11));
    let root = Root::anchor(&signed(&doc(1, &[&a], 1, &s, FAR), &[&a])).unwrap();
    let imgs = BTreeMap::from([("v2".to_string(), listing(b"manifest-v2", 2))]);
    let t5 = ts_env(5, FAR, &s, imgs.clone());
    assert_eq!(Timestamp::verify(&t5, &root, Some(5)).unwrap().version, 5);
    assert!(matches!(
        Timestamp::verify(&t5, &root, Some(6)),
        Err(TufError::Version {
            want: 6,
            got: 5,
            ..
        })
    ));
    assert!(matches!(
        Timestamp::verify(&ts_env(5, FAR, &other, imgs.clone()), &root, None),
        Err(TufError::Threshold { .. })
    ));
    // A root envelope offered as the index.
    assert!(matches!(
        Timestamp::verify(&signed(&doc(1, &[&a], 1, &s, FAR), &[&a]), &root, None),
        Err(TufError::WrongKind { .. })
    ));
    let old = Timestamp::verify(&ts_env(7, "2024-01-01T00:00:00Z", &s, imgs), &root, None).unwrap();
    assert!(matches!(
        old.check_fresh(parse_time(FAR).unwrap() - 1),
        Err(TufError::Expired { .. })
    ));
}

#[test]
fn snapshot_binds_each_manifest() {
    let s = key(9);
    let imgs = BTreeMap::from([
        ("v1".to_string(), listing(b"manifest-v1", 1)),
        ("v2".to_string(), listing(b"manifest-v2", 2)),
    ]);
    let a = key(1);
    let root = Root::anchor(&signed(&doc(1, &[&a], 1, &s, FAR), &[&a])).unwrap();
    let t = Timestamp::verify(&ts_env(1, FAR, &s, imgs), &root, None).unwrap();
    assert!(t.check_listed("v2", b"manifest-v2").is_ok());
    assert!(matches!(
        t.check_listed("v2", b"manifest-v1"),
        Err(TufError::NotListed(_))
    ));
    assert!(matches!(
        t.check_listed("v3", b"manifest-v2"),
        Err(TufError::NotListed(_))
    ));
    assert_eq!(t.newest_on("default"), Some(("v2", 2)));
}

#[test]
fn revoked_timestamp_key_no_longer_signs() {
    let (a, s, s2) = (key(1), key(9), key(10));
    let v1 = Root::anchor(&signed(&doc(1, &[&a], 1, &s, FAR), &[&a])).unwrap();
    let v2 = v1
        .update(&signed(&doc(2, &[&a], 1, &s2, FAR), &[&a]))
        .unwrap();
    let by_old = ts_env(3, FAR, &s, BTreeMap::new());
    assert!(
        Timestamp::verify(&by_old, &v1, None).is_ok(),
        "control: v1 trusts it"
    );
    assert!(matches!(
        Timestamp::verify(&by_old, &v2, None),
        Err(TufError::Threshold { .. })
    ));
}
