use super::*;
use std::io::Read as _;

fn dir(p: &str) -> Entry {
    Entry {
        path: RelPath(p.as_bytes().to_vec()),
        ftype: FileType::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_ns: 1,
        size: 0,
        sha256: None,
        target: None,
        rdev: None,
        xattrs: Xattrs::new(),
    }
}

fn file(p: &[u8]) -> Entry {
    Entry {
        path: RelPath(p.to_vec()),
        ftype: FileType::File,
        sha256: Some(Digest::of(b"x")),
        size: 1,
        ..dir("x")
    }
}

fn manifest(entries: Vec<Entry>) -> Manifest {
    Manifest {
        format: FORMAT_VERSION,
        id: "v1".into(),
        parent: None,
        created: "now".into(),
        kernel: None,
        channel: Some("default".into()),
        release: Some(1),
        compatible: None,
        disk: None,
        entries,
    }
}

#[test]
fn roundtrip_with_binary_names_and_xattrs() {
    let mut f = file(b"a/\xff\xfe");
    f.xattrs.insert(
        RawBytes(b"security.capability".to_vec()),
        XattrValue(vec![1, 0, 0, 2, 0, 32]),
    );
    let m = manifest(vec![dir("."), dir("a"), f]);
    let bytes = m.to_json();
    let back = Manifest::parse(&bytes).unwrap();
    assert_eq!(m, back);
    assert!(String::from_utf8_lossy(&bytes)
        .contains("\"hex\":\"61 2fff fe\"".replace(' ', "").as_str()));
}

#[test]
fn rejects_traversal_and_absolute() {
    for bad in [
        &b"a/../etc"[..],
        b"/etc",
        b"a//b",
        b"a/./b",
        b"a/b\0c",
        b"a/",
    ] {
        let m = manifest(vec![dir("."), dir("a"), file(bad)]);
        let err = Manifest::parse(&m.to_json()).unwrap_err();
        assert!(
            matches!(err, ManifestError::BadPath { .. }),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn rejects_escape_through_symlink_parent() {
    let mut l = dir("a");
    l.ftype = FileType::Symlink;
    l.target = Some(RawBytes(b"/etc".to_vec()));
    let m = manifest(vec![dir("."), l, file(b"a/passwd")]);
    let err = Manifest::parse(&m.to_json()).unwrap_err();
    assert!(
        err.to_string().contains("parent is not a directory"),
        "{err}"
    );
}

#[test]
fn rejects_unknown_version() {
    let mut m = manifest(vec![dir(".")]);
    m.format = 99;
    let err = Manifest::parse(&m.to_json()).unwrap_err();
    assert!(matches!(err, ManifestError::UnknownVersion { found: 99 }));
}

#[test]
fn rejects_unsorted_and_duplicates() {
    let m = manifest(vec![dir("."), dir("b"), dir("a")]);
    assert!(Manifest::parse(&m.to_json()).is_err());
    let m = manifest(vec![dir("."), dir("a"), dir("a")]);
    assert!(Manifest::parse(&m.to_json()).is_err());
}

#[test]
fn tree_order_puts_dir_before_children() {
    let a = RelPath(b"a".to_vec());
    let ab = RelPath(b"a/b".to_vec());
    let adot = RelPath(b"a.b".to_vec());
    assert!(a.tree_cmp(&ab).is_lt());
    assert!(ab.tree_cmp(&adot).is_lt());
    assert!(RelPath::root().tree_cmp(&a).is_lt());
    assert!(a.tree_cmp(&RelPath::root()).is_gt());
}

#[test]
fn relpath_helpers() {
    let p = RelPath(b"usr/bin/ls".to_vec());
    assert_eq!(p.parent().unwrap().0, b"usr/bin");
    assert_eq!(p.file_name(), b"ls");
    assert_eq!(p.depth(), 3);
    assert!(p.starts_with(&RelPath(b"usr".to_vec())));
    assert!(!p.starts_with(&RelPath(b"us".to_vec())));
    assert_eq!(RelPath(b"x".to_vec()).parent().unwrap(), RelPath::root());
}

#[test]
fn validates_image_ids() {
    assert!(validate_image_id("0b4d5c0e-1b2a-4c3d-9e8f-7a6b5c4d3e2f").is_ok());
    assert!(validate_image_id("build-2026.11.21").is_ok());
    for bad in ["", "../x", "a/b", ".hidden", "-x", "a b"] {
        assert!(validate_image_id(bad).is_err(), "{bad}");
    }
}

#[test]
fn entry_lookup_follows_tree_order_not_byte_order() {
    // Tree order: a, a/c, a-b, a.d, b — a bytewise search goes astray at
    // a-b and a.d, which sort before a/c byte for byte.
    let names = [".", "a", "a/c", "a/c/x", "a-b", "a-b/y", "a.d", "b", "b/z"];
    let m = manifest(names.iter().map(|n| dir(n)).collect());
    let m = Manifest::parse(&m.to_json()).expect("tree-ordered manifest parses");
    for n in names {
        let p = RelPath(n.as_bytes().to_vec());
        assert_eq!(m.entry(&p).map(|e| &e.path), Some(&p), "{n}");
    }
    let bytewise = |p: &[u8]| {
        m.entries
            .binary_search_by(|e| e.path.0.as_slice().cmp(p))
            .is_ok()
    };
    assert!(
        names[1..].iter().any(|n| !bytewise(n.as_bytes())),
        "positive control: a bytewise search must miss some of these"
    );
    assert!(m.entry(&RelPath(b"a/d".to_vec())).is_none());
}

#[test]
fn id_of_head_reads_the_first_line_only() {
    let m = manifest(vec![dir("."), dir("a")]);
    let json = m.to_json();
    assert_eq!(id_of_head(&json).as_deref(), Some("v1"));
    // The entries are not looked at.
    let cut = json.iter().position(|&b| b == b'\n').expect("head line") + 1;
    let mut junk = json[..cut].to_vec();
    junk.extend_from_slice(b"not json at all");
    assert_eq!(id_of_head(&junk).as_deref(), Some("v1"));
    assert_eq!(
        id_of_head(b"{\"id\":\"v1\",\"entries\":[]}"),
        None,
        "one line"
    );
    assert_eq!(id_of_head(b"{\"id\":\"../x\",\"entries\":[\n]}"), None);
}

fn disk() -> DiskArtifact {
    DiskArtifact {
        file: "node.raw".into(),
        format: DiskFormat::Raw,
        size: 1 << 30,
        sha256: Digest::of(b"disk"),
    }
}

#[test]
fn disk_record_round_trips_in_the_head() {
    let m = Manifest {
        disk: Some(disk()),
        ..manifest(vec![dir("."), dir("a")])
    };
    let json = m.to_json();
    let head = &json[..json.iter().position(|&b| b == b'\n').expect("head")];
    let head = String::from_utf8_lossy(head);
    assert!(head.contains("\"disk\":{"), "{head}");
    assert_eq!(Manifest::parse(&json).unwrap(), m);
    assert_eq!(id_of_head(&json).as_deref(), Some("v1"));
    // Rendering is stable: the signed bytes can be rebuilt from the JSON.
    assert_eq!(Manifest::parse(&json).unwrap().to_json(), json);
}

#[test]
fn manifests_without_a_disk_still_parse() {
    let m = manifest(vec![dir("."), dir("a")]);
    let json = m.to_json();
    assert!(!String::from_utf8_lossy(&json).contains("\"disk\""));
    assert_eq!(Manifest::parse(&json).unwrap().disk, None);
    // A format 1 manifest as written before releases existed.
    let legacy = br#"{"format":1,"id":"old","parent":null,"created":"t","kernel":null,"entries":[
{"path":".","type":"dir","mode":493,"uid":0,"gid":0,"mtime_ns":1}
]}
"#;
    assert_eq!(Manifest::parse(legacy).unwrap().disk, None);
}

#[test]
fn bad_disk_records_are_refused() {
    let good = Manifest {
        disk: Some(disk()),
        ..manifest(vec![dir(".")])
    };
    let json = String::from_utf8(good.to_json()).unwrap();
    let cases = [
        ("a path", json.replace("\"node.raw\"", "\"../node.raw\"")),
        ("SHA256SUMS", json.replace("\"node.raw\"", "\"SHA256SUMS\"")),
        ("format", json.replace("\"raw\"", "\"vmdk\"")),
        ("size 0", json.replace("\"size\":1073741824", "\"size\":0")),
        (
            "digest",
            json.replace(&Digest::of(b"disk").to_hex(), "abcd"),
        ),
        (
            "unknown key",
            json.replace("\"file\":", "\"url\":\"http://x/\",\"file\":"),
        ),
    ];
    for (what, bad) in cases {
        assert_ne!(bad, json, "{what}: the case changed nothing");
        assert!(Manifest::parse(bad.as_bytes()).is_err(), "{what}: {bad}");
    }
    // A format 1 manifest carries no disk.
    let legacy = Manifest {
        format: LEGACY_FORMAT,
        channel: None,
        release: None,
        ..good.clone()
    };
    let e = Manifest::parse(&legacy.to_json()).unwrap_err();
    assert!(e.to_string().contains("no disk"), "{e}");
    // Positive control: the good one parses.
    assert!(Manifest::parse(json.as_bytes()).is_ok());
}

#[test]
fn digests_parse_from_hex_in_either_case_and_nothing_else() {
    let d = Digest::of(b"abc");
    let hex = d.to_hex();
    assert_eq!(Digest::from_hex(&hex), Ok(d));
    assert_eq!(Digest::from_hex(&hex.to_uppercase()), Ok(d));
    assert!(Digest::from_hex(&hex[..62])
        .unwrap_err()
        .contains("not 32 bytes"));
    assert!(Digest::from_hex(&format!("{hex}00")).is_err());
    let mut bad = hex.clone().into_bytes();
    bad[10] = b'g';
    assert!(Digest::from_hex(std::str::from_utf8(&bad).unwrap())
        .unwrap_err()
        .contains("not hex"));
    let back: Digest = serde_json::from_str(&format!("\"{hex}\"")).unwrap();
    assert_eq!(back, d);
    assert!(serde_json::from_str::<Digest>("17").is_err());
}

fn hardlink(p: &[u8], to: &[u8]) -> Entry {
    Entry {
        path: RelPath(p.to_vec()),
        ftype: FileType::Hardlink,
        target: Some(RawBytes(to.to_vec())),
        mode: 0,
        mtime_ns: 0,
        ..dir("x")
    }
}

#[test]
fn parents_and_hardlink_targets_are_checked_in_tree_order() {
    // Deep subtrees, then siblings and a name sorting between "a" and "a/…".
    let ok = manifest(vec![
        dir("."),
        dir("a"),
        dir("a/b"),
        dir("a/b/c"),
        file(b"a/b/c/f"),
        file(b"a/b/g"),
        hardlink(b"a/b/h", b"a/b/c/f"),
        file(b"a/z"),
        dir("a.d"),
        file(b"a.d/x"),
        hardlink(b"top", b"a/z"),
    ]);
    Manifest::parse(&ok.to_json()).expect("a well-formed tree");
    let missing = manifest(vec![dir("."), dir("a"), file(b"a/b/c")]);
    let err = Manifest::parse(&missing.to_json()).unwrap_err();
    assert!(
        err.to_string().contains("parent directory is missing"),
        "{err}"
    );
    let under_file = manifest(vec![dir("."), file(b"a"), dir("b"), file(b"b/x")]);
    Manifest::parse(&under_file.to_json()).expect("siblings of a file");
    for (target, why) in [
        (&b"a/later"[..], "listed earlier"),
        (b"a", "listed earlier"),
        (b"nothing", "listed earlier"),
    ] {
        let m = manifest(vec![
            dir("."),
            dir("a"),
            hardlink(b"a/k", target),
            file(b"a/later"),
        ]);
        let err = Manifest::parse(&m.to_json()).unwrap_err();
        assert!(err.to_string().contains(why), "{target:?}: {err}");
    }
}

#[test]
fn line_by_line_parse_takes_only_the_canonical_layout() {
    let m = manifest(vec![
        dir("."),
        dir("a"),
        file(b"a/f"),
        hardlink(b"a/g", b"a/f"),
    ]);
    let json = m.to_json();
    let by_lines = match parse_lines(&json[..], u64::MAX) {
        Ok(x) => x,
        Err(_) => panic!("the canonical layout is read line by line"),
    };
    assert_eq!(by_lines, Manifest::parse(&json).unwrap());
    let one = manifest(vec![dir(".")]);
    assert!(parse_lines(&one.to_json()[..], u64::MAX).is_ok());
    // Valid JSON in another layout, invalid JSON, and a manifest that
    // fails its checks: all left to the whole-document parse.
    let pretty = serde_json::to_vec_pretty(&m).unwrap();
    assert!(Manifest::parse(&pretty).is_ok());
    let text = String::from_utf8(json.clone()).unwrap();
    let trailing_comma = text.replace("\n]}", ",\n]}");
    let garbage_after = format!("{text}x");
    let no_tail = text.trim_end().trim_end_matches("]}").to_string();
    let unsorted = manifest(vec![dir("."), file(b"b"), file(b"a")]).to_json();
    for (what, doc) in [
        ("pretty", pretty.clone()),
        ("trailing comma", trailing_comma.into_bytes()),
        ("garbage after", garbage_after.into_bytes()),
        ("no tail", no_tail.into_bytes()),
        ("unsorted", unsorted),
    ] {
        assert!(
            matches!(
                parse_lines(&doc[..], u64::MAX),
                Err(LinesError::NotCanonical)
            ),
            "{what}"
        );
    }
    assert!(matches!(
        parse_lines(&json[..], 10),
        Err(LinesError::Read(_))
    ));
    // Through the codec: the same manifest either way, the same errors.
    let stored = zstd::encode_all(&json[..], 3).unwrap();
    assert_eq!(
        crate::format::codec::decode_manifest(&stored).unwrap(),
        by_lines
    );
    let stored = zstd::encode_all(&pretty[..], 3).unwrap();
    assert_eq!(
        crate::format::codec::decode_manifest(&stored).unwrap(),
        by_lines
    );
    let mut v = m.clone();
    v.format = 99;
    let stored = zstd::encode_all(&v.to_json()[..], 3).unwrap();
    let err = crate::format::codec::decode_manifest(&stored).unwrap_err();
    assert!(format!("{err:#}").contains("format version 99"), "{err:#}");
}

#[test]
fn line_by_line_parse_stops_at_the_bound_inside_a_line() {
    // An endless first line (a bomb of zeros) is cut at the bound, not
    // read whole.
    let endless = std::io::repeat(0).take(1 << 40);
    let r = std::io::BufReader::new(endless);
    assert!(matches!(parse_lines(r, 1 << 20), Err(LinesError::Read(_))));
}
