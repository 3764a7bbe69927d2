//! The publisher's side of the store's trust metadata: drafting roots,
//! signing them offline (k of n, one key holder at a time), publishing
//! `root/<N>.root.json` once a draft carries enough signatures, and
//! (re)signing the index (`timestamp.json`) with the online key.
//!
//! Operator flow: `trust init` drafts root v1 naming the keys of each role;
//! each root key holder runs `trust sign`; `trust publish` checks the
//! thresholds and installs it in the store; nodes get the same file as
//! `/etc/imageupd/root.json`. Rotation (or revoking a key) is `trust
//! rotate` → signatures by a threshold of the old root keys and of the new
//! ones → `trust publish`. `publish --timestamp-key`, or a periodic `trust
//! timestamp`, keeps the index fresh.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::format::sign;
use crate::format::tuf::root::{RootDoc, ROLES};
use crate::format::tuf::timestamp::{self, Listing, Timestamp};
use crate::format::tuf::{format_time, Envelope, Role, Root};
use crate::fs::store::{self, Store};

/// Directory of root versions in the store.
pub const ROOT_DIR: &str = "root";
/// Default lifetime of a root, in days.
pub const DEFAULT_ROOT_DAYS: u64 = 365;
/// Default lifetime of an index, in hours (TUF suggests about a day for
/// timestamp metadata signed by an online key).
pub const DEFAULT_INDEX_HOURS: u64 = 24;

/// Keys and threshold of one role, as the operator names them.
#[derive(Debug, Clone, Default)]
pub struct RoleKeys {
    /// Public key files.
    pub keys: Vec<PathBuf>,
    /// Signatures required (default 1).
    pub threshold: Option<u32>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn add_role(doc: &mut RootDoc, name: &str, rk: &RoleKeys) -> Result<()> {
    let mut ids = BTreeSet::new();
    for p in &rk.keys {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let k = sign::parse_public(&text).with_context(|| format!("public key {}", p.display()))?;
        let id = sign::key_id(&k);
        doc.keys.insert(id.clone(), text.trim().to_owned());
        ids.insert(id);
    }
    doc.roles.insert(
        name.to_owned(),
        Role {
            keyids: ids,
            threshold: rk.threshold.unwrap_or(1),
        },
    );
    Ok(())
}

/// Drop keys no role names any more (a revoked key leaves the root).
fn prune_keys(doc: &mut RootDoc) {
    let used: BTreeSet<String> = doc.roles.values().flat_map(|r| r.keyids.clone()).collect();
    doc.keys.retain(|id, _| used.contains(id));
}

fn write_draft(doc: &RootDoc, out: &Path) -> Result<()> {
    doc.check()
        .map_err(|e| anyhow!(e))
        .context("the draft root")?;
    let env = Envelope::new(
        crate::format::tuf::root::KIND,
        &serde_json::to_vec_pretty(doc)?,
    );
    if out.exists() {
        bail!(
            "{} exists; refusing to overwrite a root draft",
            out.display()
        );
    }
    std::fs::write(out, env.to_bytes()).with_context(|| format!("writing {}", out.display()))
}

/// `trust init`: draft root v1 naming every role's keys.
pub fn init(roles: &BTreeMap<String, RoleKeys>, days: u64, out: &Path) -> Result<()> {
    let mut doc = RootDoc {
        kind: crate::format::tuf::root::KIND.into(),
        version: 1,
        expires: format_time(now() + days as i64 * 86_400),
        keys: BTreeMap::new(),
        roles: BTreeMap::new(),
    };
    for r in ROLES {
        let rk = roles
            .get(r)
            .filter(|k| !k.keys.is_empty())
            .ok_or_else(|| anyhow!("name at least one key for the {r} role (--{r}-key)"))?;
        add_role(&mut doc, r, rk)?;
    }
    write_draft(&doc, out)
}

/// The newest root published in the store, verified along its chain from
/// version 1; `None` when the store has none.
pub fn latest(st: &Store) -> Result<Option<Root>> {
    let read = |v: u64| st.trust_file(&format!("{ROOT_DIR}/{v}.root.json"));
    let Some(first) = read(1)? else {
        return Ok(None);
    };
    let mut root = Root::anchor(&first)
        .map_err(|e| anyhow!(e))
        .context("the store's root/1.root.json")?;
    while let Some(b) = read(root.doc.version + 1)? {
        root = root
            .update(&b)
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("the store's root/{}.root.json", root.doc.version + 1))?;
    }
    Ok(Some(root))
}

/// `trust rotate`: draft the next root from the store's newest, with the
/// roles named here replaced (keys no role names any more are revoked).
pub fn rotate(st: &Store, roles: &BTreeMap<String, RoleKeys>, days: u64, out: &Path) -> Result<()> {
    let cur = latest(st)?.ok_or_else(|| anyhow!("the store has no root yet: use trust init"))?;
    let mut doc = cur.doc.clone();
    doc.version += 1;
    doc.expires = format_time(now() + days as i64 * 86_400);
    for (name, rk) in roles {
        if !ROLES.contains(&name.as_str()) {
            bail!("unknown role {name:?}");
        }
        if rk.keys.is_empty() {
            if let Some(t) = rk.threshold {
                if let Some(r) = doc.roles.get_mut(name) {
                    r.threshold = t;
                }
            }
            continue;
        }
        add_role(&mut doc, name, rk)?;
    }
    prune_keys(&mut doc);
    write_draft(&doc, out)
}

/// `trust sign`: add the signature of the secret key at `key` to a draft.
pub fn sign_draft(file: &Path, key: &Path) -> Result<String> {
    let b = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let mut env = Envelope::parse(&b).map_err(|e| anyhow!(e))?;
    let sk = sign::load_secret(key)?;
    env.sign(&sk).map_err(|e| anyhow!(e))?;
    store::write_atomic(file, &env.to_bytes())?;
    Ok(sign::key_id(&sk.verifying_key()))
}

/// `trust publish`: install a signed root as the store's next version,
/// after the same checks a node makes; also copies it to `root.json` at
/// the store's top (the file to put on nodes).
pub fn publish_root(st: &Store, file: &Path) -> Result<u64> {
    let b = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let root = match latest(st)? {
        None => Root::anchor(&b).map_err(|e| anyhow!(e)).context("root v1 must be signed by a threshold of its own root keys")?,
        Some(cur) => cur.update(&b).map_err(|e| anyhow!(e)).with_context(|| {
            format!("the next root must be version {} signed by a threshold of both v{}'s and its own root keys", cur.doc.version + 1, cur.doc.version)
        })?,
    };
    let dir = st.path().join(ROOT_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    store::write_atomic(&dir.join(format!("{}.root.json", root.doc.version)), &b)?;
    store::write_atomic(&st.path().join("root.json"), &b)?;
    Ok(root.doc.version)
}

/// `trust timestamp` (and `publish --timestamp-key`): sign a new index
/// listing every image of the store, one version above the current one.
pub fn timestamp(st: &Store, key: &Path, hours: u64) -> Result<u64> {
    let sk = sign::load_secret(key)?;
    if let Some(root) = latest(st)? {
        let id = sign::key_id(&sk.verifying_key());
        if !root.role(timestamp::KIND).keyids.contains(&id) {
            bail!(
                "key {id} is not a timestamp key of the store's root v{}: nodes would refuse this index",
                root.doc.version
            );
        }
    }
    let prev = match st.trust_file(timestamp::FILE_NAME)? {
        Some(b) => {
            let env = Envelope::parse(&b).map_err(|e| anyhow!(e))?;
            let t: Timestamp =
                serde_json::from_slice(&env.payload_of(timestamp::KIND).map_err(|e| anyhow!(e))?)
                    .context("the store's timestamp.json")?;
            t.version
        }
        None => 0,
    };
    let mut images = BTreeMap::new();
    for e in st.index()?.images {
        let stored = std::fs::read(st.image_dir(&e.id).join(store::MANIFEST_NAME))
            .with_context(|| format!("reading the manifest of {}", e.id))?;
        images.insert(
            e.id.clone(),
            Listing {
                sha256: crate::format::manifest::Digest::of(&stored).to_hex(),
                length: stored.len() as u64,
                channel: e
                    .channel
                    .clone()
                    .unwrap_or_else(|| crate::format::manifest::DEFAULT_CHANNEL.into()),
                release: e.release.unwrap_or(0),
            },
        );
    }
    let t = now();
    let ts = Timestamp {
        kind: timestamp::KIND.into(),
        version: prev + 1,
        issued: format_time(t),
        expires: format_time(t + hours as i64 * 3600),
        images,
    };
    let mut env = Envelope::new(timestamp::KIND, &serde_json::to_vec(&ts)?);
    env.sign(&sk).map_err(|e| anyhow!(e))?;
    store::write_atomic(&st.path().join(timestamp::FILE_NAME), &env.to_bytes())?;
    Ok(ts.version)
}
