//! ed25519 keys and detached manifest signatures.
//!
//! Key files are one line of text, so they can be pasted into config
//! management: `imageupd-ed25519-secret <base64 seed>` and
//! `imageupd-ed25519-public <base64 key> <comment>`. A signature file is JSON:
//! `{"alg":"ed25519","key_id":"<hex>","sig":"<base64>"}` over the exact bytes
//! of the signed file, so it can be checked before anything is decompressed
//! or parsed; a file signed by several keys (a k-of-n `targets` role, see
//! [`crate::format::tuf`]) holds one such line per key.

use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// First word of a secret key file.
const SECRET_TAG: &str = "imageupd-ed25519-secret";
/// First word of a public key file.
const PUBLIC_TAG: &str = "imageupd-ed25519-public";
/// Signature algorithm name in signature files.
const ALG: &str = "ed25519";

/// Why a signature check failed; callers map these to "untrusted input".
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// No signature file next to the manifest.
    #[error("the manifest is not signed (no signature file); refusing it. Publish with --key, or set allow_unsigned = true in /etc/imageupd/config.toml (or pass --allow-unsigned) to accept unsigned images")]
    Unsigned,
    /// The signature file is malformed.
    #[error("the signature file is malformed: {0}")]
    Malformed(String),
    /// Fewer distinct keys of the role signed than its threshold.
    #[error("{valid} valid signature(s) of the root's targets keys; {threshold} required")]
    BelowThreshold {
        /// Distinct valid signatures of the role's keys.
        valid: usize,
        /// Required by the root.
        threshold: u32,
    },
    /// No trusted key verifies the signature.
    #[error("the manifest signature (key id {key_id}) does not verify with any of the {trusted} trusted key(s) in {dir}")]
    NotTrusted {
        /// Key id claimed by the signature.
        key_id: String,
        /// How many keys were tried.
        trusted: usize,
        /// Where the trusted keys came from.
        dir: String,
    },
}

/// A detached signature file.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// Always "ed25519".
    pub alg: String,
    /// Short id of the signing key (first 8 bytes of sha256 of the public key, hex).
    pub key_id: String,
    /// Base64 signature.
    pub sig: String,
}

/// Short id of a public key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&crate::format::manifest::Digest::of(key.as_bytes()).0[..8])
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Generate a new key pair and write `out` (secret, 0600) and `out.pub`.
pub fn keygen(out: &Path, comment: &str) -> Result<VerifyingKey> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed)
        .map_err(|e| anyhow::anyhow!("reading random bytes for the key: {e}"))?;
    let sk = SigningKey::from_bytes(&seed);
    let vk = sk.verifying_key();
    let pub_path = pub_path(out);
    for p in [out, pub_path.as_path()] {
        if p.exists() {
            bail!(
                "{} already exists; refusing to overwrite a key",
                p.display()
            );
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    writeln!(f, "{SECRET_TAG} {}", b64().encode(seed))
        .with_context(|| format!("writing {}", out.display()))?;
    std::fs::write(
        &pub_path,
        format!("{PUBLIC_TAG} {} {comment}\n", b64().encode(vk.as_bytes())),
    )
    .with_context(|| format!("writing {}", pub_path.display()))?;
    Ok(vk)
}

/// `FILE.pub` for a secret key `FILE`.
pub fn pub_path(secret: &Path) -> std::path::PathBuf {
    let mut s = secret.as_os_str().to_owned();
    s.push(".pub");
    s.into()
}

/// Parse a secret key file's text.
pub fn parse_secret(text: &str) -> Result<SigningKey> {
    let mut it = text.split_whitespace();
    if it.next() != Some(SECRET_TAG) {
        bail!("not an imageupd secret key (expected it to start with {SECRET_TAG:?})");
    }
    let seed = b64()
        .decode(it.next().unwrap_or_default())
        .context("secret key is not valid base64")?;
    let seed: [u8; 32] = seed
        .try_into()
        .map_err(|_| anyhow::anyhow!("secret key is not 32 bytes"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Parse a public key file's text.
pub fn parse_public(text: &str) -> Result<VerifyingKey> {
    let mut it = text.split_whitespace();
    if it.next() != Some(PUBLIC_TAG) {
        bail!("not an imageupd public key (expected it to start with {PUBLIC_TAG:?})");
    }
    let raw = b64()
        .decode(it.next().unwrap_or_default())
        .context("public key is not valid base64")?;
    let raw: [u8; 32] = raw
        .try_into()
        .map_err(|_| anyhow::anyhow!("public key is not 32 bytes"))?;
    VerifyingKey::from_bytes(&raw).context("public key is not a valid ed25519 point")
}

/// Load a secret key file.
pub fn load_secret(path: &Path) -> Result<SigningKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading key {}", path.display()))?;
    parse_secret(&text).with_context(|| format!("in {}", path.display()))
}

/// Sign bytes, producing the signature file's content.
pub fn sign(key: &SigningKey, data: &[u8]) -> Vec<u8> {
    let sig = key.sign(data);
    let f = SignatureFile {
        alg: ALG.into(),
        key_id: key_id(&key.verifying_key()),
        sig: b64().encode(sig.to_bytes()),
    };
    let mut v = serde_json::to_vec(&f).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Sign the file at `data_path` with the key at `key_path`, writing
/// `data_path.sig`.
pub fn sign_file(key_path: &Path, data_path: &Path) -> Result<()> {
    let key = load_secret(key_path)?;
    let data =
        std::fs::read(data_path).with_context(|| format!("reading {}", data_path.display()))?;
    let mut sig_path = data_path.as_os_str().to_owned();
    sig_path.push(".sig");
    std::fs::write(&sig_path, sign(&key, &data)).with_context(|| format!("writing {:?}", sig_path))
}

/// The signature lines of a signature file (at least one).
fn parse_lines(
    sig_file: &[u8],
) -> Result<Vec<(SignatureFile, ed25519_dalek::Signature)>, SignatureError> {
    let text =
        std::str::from_utf8(sig_file).map_err(|_| SignatureError::Malformed("not UTF-8".into()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: SignatureFile =
            serde_json::from_str(line).map_err(|e| SignatureError::Malformed(e.to_string()))?;
        if f.alg != ALG {
            return Err(SignatureError::Malformed(format!(
                "unsupported algorithm {:?}",
                f.alg
            )));
        }
        let raw = b64()
            .decode(&f.sig)
            .map_err(|e| SignatureError::Malformed(e.to_string()))?;
        let raw: [u8; 64] = raw
            .try_into()
            .map_err(|_| SignatureError::Malformed("signature is not 64 bytes".into()))?;
        out.push((f, ed25519_dalek::Signature::from_bytes(&raw)));
    }
    if out.is_empty() {
        return Err(SignatureError::Malformed("no signature in the file".into()));
    }
    Ok(out)
}

/// Check `data` against a signature file's bytes with any of `trusted`.
pub fn verify(
    data: &[u8],
    sig_file: Option<&[u8]>,
    trusted: &[VerifyingKey],
    dir: &str,
) -> Result<String, SignatureError> {
    let lines = parse_lines(sig_file.ok_or(SignatureError::Unsigned)?)?;
    for (_, sig) in &lines {
        for k in trusted {
            if k.verify_strict(data, sig).is_ok() {
                return Ok(key_id(k));
            }
        }
    }
    Err(SignatureError::NotTrusted {
        key_id: lines[0].0.key_id.clone(),
        trusted: trusted.len(),
        dir: dir.into(),
    })
}

/// Check `data` against a threshold of `role`'s keys: the distinct key ids
/// whose signature verifies, at least `role.threshold` of them.
pub fn verify_role(
    data: &[u8],
    sig_file: Option<&[u8]>,
    keys: &crate::format::tuf::Keys,
    role: &crate::format::tuf::Role,
) -> Result<Vec<String>, SignatureError> {
    let lines = parse_lines(sig_file.ok_or(SignatureError::Unsigned)?)?;
    let mut ok = std::collections::BTreeSet::new();
    for (f, sig) in &lines {
        if !role.keyids.contains(&f.key_id) {
            continue;
        }
        if keys
            .get(&f.key_id)
            .is_some_and(|k| k.verify_strict(data, sig).is_ok())
        {
            ok.insert(f.key_id.clone());
        }
    }
    if ok.len() < role.threshold as usize {
        return Err(SignatureError::BelowThreshold {
            valid: ok.len(),
            threshold: role.threshold,
        });
    }
    Ok(ok.into_iter().collect())
}

/// Sign `data` with every key, one signature line each.
pub fn sign_all(keys: &[SigningKey], data: &[u8]) -> Vec<u8> {
    keys.iter().flat_map(|k| sign(k, data)).collect()
}

/// Load every `*.pub` in a trusted-keys directory; a missing directory means
/// no trusted keys. A malformed key file is an error, not silently skipped.
pub fn load_trusted(dir: &Path) -> Result<Vec<VerifyingKey>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(e).with_context(|| format!("reading trusted keys in {}", dir.display()))
        }
    };
    let mut paths: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let mut keys = Vec::new();
    for p in paths {
        if p.extension().and_then(|e| e.to_str()) != Some("pub") {
            continue;
        }
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("reading trusted key {}", p.display()))?;
        keys.push(parse_public(&text).with_context(|| format!("trusted key {}", p.display()))?);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k");
        let vk = keygen(&k, "test").unwrap();
        let sk = load_secret(&k).unwrap();
        let pk = parse_public(&std::fs::read_to_string(pub_path(&k)).unwrap()).unwrap();
        assert_eq!(vk, pk);
        let sig = sign(&sk, b"hello");
        assert_eq!(
            verify(b"hello", Some(&sig), &[pk], "t").unwrap(),
            key_id(&pk)
        );
        assert!(matches!(
            verify(b"hellO", Some(&sig), &[pk], "t"),
            Err(SignatureError::NotTrusted { .. })
        ));
        assert!(matches!(
            verify(b"hello", None, &[pk], "t"),
            Err(SignatureError::Unsigned)
        ));
        assert!(matches!(
            verify(b"hello", Some(b"{}"), &[pk], "t"),
            Err(SignatureError::Malformed(_))
        ));
        let other = keygen(&d.path().join("o"), "o").unwrap();
        assert!(matches!(
            verify(b"hello", Some(&sig), &[other], "t"),
            Err(SignatureError::NotTrusted { .. })
        ));
        assert!(keygen(&k, "again").is_err(), "must not overwrite");
    }

    #[test]
    fn threshold_of_a_role() {
        let ks: Vec<SigningKey> = (1..=3).map(|n| SigningKey::from_bytes(&[n; 32])).collect();
        let keys: crate::format::tuf::Keys = ks
            .iter()
            .map(|k| (key_id(&k.verifying_key()), k.verifying_key()))
            .collect();
        let role = crate::format::tuf::Role {
            keyids: keys.keys().take(2).cloned().collect(),
            threshold: 2,
        };
        let two = sign_all(&ks[..2], b"m");
        assert_eq!(
            verify_role(b"m", Some(&two), &keys, &role).unwrap().len(),
            2
        );
        // One key twice is one signature.
        let dup = sign_all(&[ks[0].clone(), ks[0].clone()], b"m");
        assert!(matches!(
            verify_role(b"m", Some(&dup), &keys, &role),
            Err(SignatureError::BelowThreshold { valid: 1, .. })
        ));
        // A key outside the role (the third) does not count.
        let out = sign_all(&[ks[0].clone(), ks[2].clone()], b"m");
        assert!(verify_role(b"m", Some(&out), &keys, &role).is_err());
        // Any single valid line still satisfies the legacy any-key check.
        assert!(verify(b"m", Some(&out), &[ks[2].verifying_key()], "t").is_ok());
    }
}
