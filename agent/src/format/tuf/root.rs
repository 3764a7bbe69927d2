//! The root of trust: which keys sign roots, manifests (`targets`) and the
//! timestamp, with a threshold for each; rotated by a chain of versions,
//! each signed by a threshold of both the previous and its own root keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{check_expiry, Envelope, Keys, Role, TufError};
use crate::format::sign::{key_id, parse_public};

/// Kind name of root envelopes.
pub const KIND: &str = "root";
/// The roles a root must name.
pub const ROLES: [&str; 3] = ["root", "targets", "timestamp"];

/// A root as written (the envelope's payload).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RootDoc {
    /// Always `root`.
    #[serde(rename = "type")]
    pub kind: String,
    /// 1, 2, …: each rotation adds one.
    pub version: u64,
    /// RFC 3339; a node refuses a root past it.
    pub expires: String,
    /// Public keys (`imageupd-ed25519-public …` lines) by key id.
    pub keys: BTreeMap<String, String>,
    /// `root`, `targets` and `timestamp`.
    pub roles: BTreeMap<String, Role>,
}

/// A verified, parsed root.
#[derive(Debug, Clone)]
pub struct Root {
    /// As written.
    pub doc: RootDoc,
    /// Its keys, parsed.
    pub keys: Keys,
    /// The stored envelope bytes (kept by the node).
    pub bytes: Vec<u8>,
}

impl RootDoc {
    /// Check the document's own consistency and parse its keys.
    pub fn check(&self) -> Result<Keys, TufError> {
        let bad = |m: String| Err(TufError::Malformed(format!("root: {m}")));
        if self.kind != KIND {
            return bad(format!("type {:?}, not \"root\"", self.kind));
        }
        if self.version == 0 {
            return bad("version 0 (versions start at 1)".into());
        }
        super::parse_time(&self.expires)?;
        let mut keys = Keys::new();
        for (id, text) in &self.keys {
            let k = parse_public(text)
                .map_err(|e| TufError::Malformed(format!("root: key {id}: {e:#}")))?;
            if key_id(&k) != *id {
                return bad(format!("key listed as {id} has id {}", key_id(&k)));
            }
            keys.insert(id.clone(), k);
        }
        for r in ROLES {
            let Some(role) = self.roles.get(r) else {
                return bad(format!("no {r:?} role"));
            };
            if role.threshold == 0 || role.threshold as usize > role.keyids.len() {
                return bad(format!(
                    "role {r:?}: threshold {} with {} key(s)",
                    role.threshold,
                    role.keyids.len()
                ));
            }
            if let Some(k) = role.keyids.iter().find(|k| !keys.contains_key(*k)) {
                return bad(format!("role {r:?} names unknown key {k}"));
            }
        }
        if let Some(r) = self.roles.keys().find(|r| !ROLES.contains(&r.as_str())) {
            return bad(format!("unknown role {r:?}"));
        }
        Ok(keys)
    }
}

impl Root {
    fn unverified(bytes: &[u8]) -> Result<(Envelope, Root), TufError> {
        let env = Envelope::parse(bytes)?;
        let payload = env.payload_of(KIND)?;
        let doc: RootDoc = serde_json::from_slice(&payload)
            .map_err(|e| TufError::Malformed(format!("root: {e}")))?;
        let keys = doc.check()?;
        Ok((
            env,
            Root {
                doc,
                keys,
                bytes: bytes.to_vec(),
            },
        ))
    }

    /// A root trusted out of band (the node's anchor, or the one it kept):
    /// it must still carry a threshold of its own root keys, so a root
    /// that was never signed cannot be installed by mistake.
    pub fn anchor(bytes: &[u8]) -> Result<Root, TufError> {
        let (env, root) = Root::unverified(bytes)?;
        env.verify(
            &format!("root v{}", root.doc.version),
            &root.keys,
            root.role("root"),
        )?;
        Ok(root)
    }

    /// The next root of the chain (TUF 5.3.4–5.3.5): signed by a threshold
    /// of this root's root keys and of its own, and exactly one version on.
    pub fn update(&self, next: &[u8]) -> Result<Root, TufError> {
        let (env, new) = Root::unverified(next)?;
        let what = format!("root v{}", new.doc.version);
        env.verify(
            &format!("{what} (by the keys of v{})", self.doc.version),
            &self.keys,
            self.role("root"),
        )?;
        env.verify(
            &format!("{what} (by its own keys)"),
            &new.keys,
            new.role("root"),
        )?;
        if new.doc.version != self.doc.version + 1 {
            return Err(TufError::Version {
                what: "root".into(),
                want: self.doc.version + 1,
                got: new.doc.version,
            });
        }
        Ok(new)
    }

    /// Refuse the final root of the chain when it has expired (TUF 5.3.10;
    /// `now` is the run's start time, Unix seconds).
    pub fn check_fresh(&self, now: i64) -> Result<(), TufError> {
        check_expiry(
            &format!("root v{}", self.doc.version),
            &self.doc.expires,
            now,
        )
    }

    /// A role (present: checked at parse).
    pub fn role(&self, name: &str) -> &Role {
        &self.doc.roles[name]
    }

    /// Whether `role`'s keys differ between two roots: then the node
    /// forgets the timestamp version it saw (TUF 5.3.11, fast-forward
    /// recovery), since the old keys may have signed a huge version.
    pub fn role_keys_changed(&self, other: &Root, role: &str) -> bool {
        self.role(role).keyids != other.role(role).keyids
    }
}
