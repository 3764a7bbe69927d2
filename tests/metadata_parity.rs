//! Merge and key-lookup parity with the real os-apply-config 14.1.0
//! (`os-apply-config --key K --type raw`, files passed in $OS_CONFIG_FILES
//! as os-collect-config does): generated metadata sets with nested objects,
//! lists, nulls, overrides and non-object top levels; for each, dozens of
//! keys (present, null, missing, list indexes including negative ones,
//! indexes into strings). Our [`MetadataSource`] read + [`lookup`] must give
//! exactly what the tool prints, and "missing" exactly when it exits 1.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::nodekit;
use common::*;
use imageupd::agent::metadata::{lookup, render_raw, MetadataSource};
use serde_json::{json, Map, Value};

const KEYS: [&str; 6] = ["a", "b", "image_id", "list", "0", "x"];

fn gen_value(rng: &mut Rng, depth: u32) -> Value {
    let r = rng.unit();
    if depth >= 3 || r < 0.35 {
        return match (rng.next_u64() % 9) as u32 {
            0 => Value::Null,
            1 => json!(true),
            2 => json!((rng.next_u64() % 1000) as i64 - 500),
            3 => json!([0.5, 2.25, 1e20, -7.0][(rng.next_u64() % 4) as usize]),
            4 => json!(""),
            5 => json!("héllo wörld"),
            6 => json!(format!("id-{}", rng.next_u64() % 50)),
            _ => json!(format!("s{}", rng.next_u64() % 7)),
        };
    }
    if r < 0.7 {
        let mut m = Map::new();
        for _ in 0..(1 + rng.next_u64() % 4) {
            let k = KEYS[(rng.next_u64() % KEYS.len() as u64) as usize];
            m.insert(k.to_string(), gen_value(rng, depth + 1));
        }
        Value::Object(m)
    } else {
        Value::Array(
            (0..(rng.next_u64() % 4))
                .map(|_| gen_value(rng, depth + 1))
                .collect(),
        )
    }
}

/// A top-level document: mostly objects, sometimes something os-apply-config
/// ignores.
fn gen_doc(rng: &mut Rng) -> Value {
    match rng.next_u64() % 10 {
        0 => json!([1, {"image_id": "from-a-list"}]),
        1 => json!("a string"),
        2 => json!({}),
        3 => Value::Null,
        _ => {
            let mut m = Map::new();
            for _ in 0..(2 + rng.next_u64() % 4) {
                let k = KEYS[(rng.next_u64() % KEYS.len() as u64) as usize];
                m.insert(k.to_string(), gen_value(rng, 1));
            }
            Value::Object(m)
        }
    }
}

/// Every dotted path in `v` (with negative forms of list indexes), plus
/// paths one step past each leaf.
fn paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                out.insert(join(k));
                paths(c, &join(k), out);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                out.insert(join(&i.to_string()));
                out.insert(join(&format!("-{}", a.len() - i)));
                paths(c, &join(&i.to_string()), out);
            }
            out.insert(join(&a.len().to_string()));
        }
        _ => {
            out.insert(join("0"));
            out.insert(join("a"));
        }
    }
}

struct Oac {
    venv: PathBuf,
}

impl Oac {
    /// What os-apply-config prints for KEY (without the final newline), or
    /// None when it says the key does not exist (exit 1).
    fn key(&self, files: &str, key: &str) -> Option<String> {
        let out = Run::new(self.venv.join("bin/os-apply-config"))
            .args(["--key", key, "--type", "raw"])
            .env("OS_CONFIG_FILES", files)
            .run();
        match out.code() {
            Some(0) => Some(
                out.stdout
                    .strip_suffix('\n')
                    .unwrap_or(&out.stdout)
                    .to_string(),
            ),
            Some(1) if out.stderr.contains("does not exist") => None,
            _ => panic!("os-apply-config failed unexpectedly\n{}", out.describe()),
        }
    }
}

/// Our answer, compared with the tool's: strings and numbers byte for byte,
/// JSON (objects, lists, booleans) by value (key order differs).
fn same(ours: Option<&Value>, theirs: Option<&str>) -> bool {
    match (ours, theirs) {
        (None, None) => true,
        (Some(v @ (Value::Object(_) | Value::Array(_) | Value::Bool(_))), Some(t)) => {
            serde_json::from_str::<Value>(t).ok().as_ref() == Some(v)
        }
        (Some(v), Some(t)) => render_raw(v) == t,
        _ => false,
    }
}

#[test]
fn lookup_matches_os_apply_config() {
    let oac = Oac {
        venv: nodekit::venv(),
    };
    let s = scratch("parity");
    let mut rng = Rng::new(0x1ea7_beef);
    let mut checked = 0;
    let mut found = 0;
    for set in 0..8 {
        let n = 2 + (rng.next_u64() % 3) as usize;
        let mut files = Vec::new();
        for i in 0..n {
            let p = s.join(format!("set{set}-{i}.json"));
            std::fs::write(&p, serde_json::to_vec_pretty(&gen_doc(&mut rng)).unwrap()).unwrap();
            files.push(p);
        }
        // A listed file that does not exist is skipped by both.
        files.insert(1, s.join(format!("set{set}-absent.json")));
        let joined = files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let snap = MetadataSource::Occ {
            cache_dir: s.path().to_path_buf(),
            env_files: Some(joined.clone()),
        }
        .read()
        .expect("read generated metadata");
        let mut keys = BTreeSet::new();
        paths(&snap.doc, "", &mut keys);
        for f in &files {
            if let Ok(b) = std::fs::read(f) {
                paths(&serde_json::from_slice(&b).unwrap(), "", &mut keys);
            }
        }
        keys.extend(
            [
                "missing", "image_id", "a.b.0", "list.+0", "list. 1", "list.0_0",
            ]
            .map(String::from),
        );
        // Keep the run short: at most 14 keys per set, spread over the set.
        let keys: Vec<String> = keys.into_iter().collect();
        let step = keys.len().div_ceil(14).max(1);
        for key in keys.iter().step_by(step) {
            let ours = lookup(&snap.doc, key);
            let theirs = oac.key(&joined, key);
            assert!(
                same(ours, theirs.as_deref()),
                "key {key:?} of set {set}: ours {:?}, os-apply-config {:?}\nmerged: {}\nfiles: {joined}",
                ours.map(render_raw),
                theirs,
                serde_json::to_string_pretty(&snap.doc).unwrap()
            );
            checked += 1;
            found += usize::from(ours.is_some());
        }
    }
    eprintln!("{checked} keys checked, {found} present");
    assert!(
        checked >= 60 && found >= 20 && checked - found >= 10,
        "the generator must exercise present and missing keys ({checked} checked, {found} found)"
    );
}

#[test]
fn list_file_and_null_override_match_os_apply_config() {
    // The os_config_files.json route (no $OS_CONFIG_FILES), and the TripleO
    // shape: a StructuredConfig deployment key carrying image_id, overridden
    // by null in a later file.
    let oac = nodekit::venv();
    let s = scratch("parity-list");
    let a = s.join("heat_local.json");
    let b = s.join("deploy.json");
    let c = s.join("override.json");
    std::fs::write(&a, r#"{"image_id": "old", "deep": {"k": [1, {"v": "x"}]}}"#).unwrap();
    std::fs::write(
        &b,
        r#"{"image_id": "v2", "image_source": "/srv/store", "deep": {"k": null}}"#,
    )
    .unwrap();
    std::fs::write(&c, r#"[{"image_id": "ignored"}]"#).unwrap();
    let list = s.join("os_config_files.json");
    std::fs::write(&list, serde_json::to_vec(&json!([a, b, c])).unwrap()).unwrap();
    let snap = MetadataSource::Occ {
        cache_dir: s.path().to_path_buf(),
        env_files: None,
    }
    .read()
    .unwrap();
    for key in ["image_id", "image_source", "deep.k", "deep.k.0", "deep"] {
        let out = Run::new(oac.join("bin/os-apply-config"))
            .args(["--key", key, "--type", "raw", "--os-config-files"])
            .arg(&list)
            .run();
        let theirs = (out.code() == Some(0)).then(|| out.stdout.trim_end_matches('\n').to_string());
        assert!(
            same(lookup(&snap.doc, key), theirs.as_deref()),
            "key {key}: ours {:?} vs {:?}\n{}",
            lookup(&snap.doc, key),
            theirs,
            out.describe()
        );
    }
    assert_eq!(
        snap.wanted("image_id", "image_source").unwrap().unwrap().id,
        "v2"
    );
}
