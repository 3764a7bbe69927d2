use super::*;
use serde_json::json;

#[test]
fn merge_like_os_apply_config() {
    let a = json!({"x": {"a": 1, "b": {"c": 2}}, "l": [1, 2], "s": "old", "n": {"k": 1}});
    let b = json!({"x": {"b": {"d": 3}, "e": null}, "l": [3], "s": {"now": "obj"}, "n": null});
    let m = merge_all([&a, &b]);
    assert_eq!(
        m,
        json!({"x": {"a": 1, "b": {"c": 2, "d": 3}, "e": null}, "l": [3], "s": {"now": "obj"}, "n": null})
    );
    // Non-object top levels and empty objects are ignored.
    let m2 = merge_all([
        &a,
        &json!([1, 2]),
        &json!("str"),
        &json!(null),
        &json!({}),
        &json!(7),
    ]);
    assert_eq!(m2, a);
    // An object over a scalar replaces it; a scalar over an object too.
    assert_eq!(
        merge_all([&json!({"k": 1}), &json!({"k": {"a": 1}})]),
        json!({"k": {"a": 1}})
    );
    assert_eq!(
        merge_all([&json!({"k": {"a": 1}}), &json!({"k": 2})]),
        json!({"k": 2})
    );
    assert_eq!(merge_all(std::iter::empty()), json!({}));
}

#[test]
fn dotted_lookup_with_indexes_and_nulls() {
    let d = json!({"a": {"b": [{"c": "x"}, null, 5, [true]]}, "n": null, "s": "str", "e": "", "dot": {"": 1}});
    assert_eq!(lookup(&d, "a.b.0.c"), Some(&json!("x")));
    assert_eq!(lookup(&d, "a.b.1"), None, "null is missing");
    assert_eq!(lookup(&d, "a.b.1.c"), None);
    assert_eq!(lookup(&d, "a.b.2"), Some(&json!(5)));
    assert_eq!(
        lookup(&d, "a.b.-1.0"),
        Some(&json!(true)),
        "negative index as in Python"
    );
    assert_eq!(lookup(&d, "a.b.-5"), None);
    assert_eq!(lookup(&d, "a.b.4"), None);
    assert_eq!(lookup(&d, "a.b.+2"), Some(&json!(5)));
    assert_eq!(lookup(&d, "a.b. 2 "), Some(&json!(5)));
    assert_eq!(lookup(&d, "a.b.0_0"), Some(&json!({"c": "x"})));
    assert_eq!(lookup(&d, "a.b._0"), None);
    assert_eq!(lookup(&d, "a.b.x"), None);
    assert_eq!(lookup(&d, "n"), None);
    assert_eq!(lookup(&d, "s.0"), None, "strings are not indexable");
    assert_eq!(lookup(&d, "e"), Some(&json!("")));
    assert_eq!(lookup(&d, "missing"), None);
    assert_eq!(lookup(&d, "dot."), Some(&json!(1)));
    assert_eq!(
        lookup(&json!({"a": {"0": "k"}}), "a.0"),
        Some(&json!("k")),
        "object keys are strings"
    );
}

#[test]
fn raw_rendering_matches_python() {
    assert_eq!(render_raw(&json!("abc")), "abc");
    assert_eq!(render_raw(&json!(12)), "12");
    assert_eq!(render_raw(&json!(-3)), "-3");
    assert_eq!(render_raw(&json!(2.5)), "2.5");
    assert_eq!(render_raw(&json!(3.0)), "3.0");
    assert_eq!(render_raw(&json!(1e20)), "1e+20");
    assert_eq!(render_raw(&json!(true)), "true");
    assert_eq!(
        render_raw(&json!([1, "a", null, {"k": false}])),
        r#"[1, "a", null, {"k": false}]"#
    );
    assert_eq!(render_raw(&json!({"é": "\n"})), r#"{"\u00e9": "\n"}"#);
}

#[test]
fn wanted_validates_ids_and_sources() {
    let s = |doc: Value| Snapshot {
        doc,
        files: vec![],
        changed_at: None,
    };
    let w = s(json!({"image_id": "v2", "image_source": " /srv/store "}))
        .wanted("image_id", "image_source")
        .unwrap();
    assert_eq!(
        w,
        Some(Wanted {
            id: "v2".into(),
            source: Some("/srv/store".into())
        })
    );
    assert_eq!(
        s(json!({"image_id": null}))
            .wanted("image_id", "image_source")
            .unwrap(),
        None
    );
    assert_eq!(
        s(json!({"a": {"b": [{"id": 42}]}}))
            .wanted("a.b.0.id", "src")
            .unwrap()
            .unwrap()
            .id,
        "42"
    );
    assert!(s(json!({"image_id": {"x": 1}}))
        .wanted("image_id", "s")
        .is_err());
    assert!(s(json!({"image_id": "../etc"}))
        .wanted("image_id", "s")
        .is_err());
    assert!(s(json!({"image_id": "v1", "s": 3}))
        .wanted("image_id", "s")
        .is_err());
}

#[test]
fn reading_tolerates_nothing_half_written() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.json");
    let b = d.path().join("b.json");
    std::fs::write(&a, r#"{"image_id": "v1", "x": {"y": 1}}"#).unwrap();
    std::fs::write(&b, r#"{"image_id": "v2"}"#).unwrap();
    let list = d.path().join(OS_CONFIG_FILES_JSON);
    std::fs::write(
        &list,
        serde_json::to_vec(&json!([a, b, d.path().join("absent.json")])).unwrap(),
    )
    .unwrap();
    let src = MetadataSource::Occ {
        cache_dir: d.path().to_path_buf(),
        env_files: None,
    };
    let snap = src.read().unwrap();
    assert_eq!(snap.doc, json!({"image_id": "v2", "x": {"y": 1}}));
    assert_eq!(snap.files, vec![a.clone(), b.clone()]);
    assert!(snap.changed_at.is_some());
    assert_eq!(src.watch_dirs(), vec![d.path().to_path_buf()]);
    // $OS_CONFIG_FILES wins over the list file.
    let env = MetadataSource::Occ {
        cache_dir: d.path().to_path_buf(),
        env_files: Some(format!("{}:", a.display())),
    };
    assert_eq!(env.read().unwrap().doc["image_id"], "v1");
    // Half-written: an error naming the file, never an empty document.
    std::fs::write(&b, r#"{"image_id": "v"#).unwrap();
    let e = src.read().unwrap_err();
    assert!(
        matches!(&e, MetadataError::Invalid { path, .. } if path == &b),
        "{e}"
    );
    std::fs::write(&b, "").unwrap();
    assert!(src.read().is_err());
    std::fs::write(&list, "{\"not\": \"a list\"}").unwrap();
    assert!(matches!(src.read(), Err(MetadataError::NotAList { .. })));
    // No list file at all: no metadata.
    std::fs::remove_file(&list).unwrap();
    assert_eq!(src.read().unwrap().doc, json!({}));
    // Plain file: must be an object; absent means no metadata.
    let plain = MetadataSource::File(a.clone());
    assert_eq!(plain.read().unwrap().doc["image_id"], "v1");
    std::fs::write(&a, "[1]").unwrap();
    assert!(matches!(
        plain.read(),
        Err(MetadataError::NotAnObject { .. })
    ));
    std::fs::remove_file(&a).unwrap();
    assert_eq!(plain.read().unwrap().files.len(), 0);
}
