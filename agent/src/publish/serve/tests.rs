use super::*;

#[test]
fn paths_are_confined() {
    let ok =
        |p: &str| resolve_path(p).map(|(r, c)| (String::from_utf8_lossy(&r.0).into_owned(), c));
    assert_eq!(
        ok("/index.json"),
        Ok(("index.json".into(), CacheClass::Revalidate))
    );
    assert_eq!(
        ok("/imageupd-store.json").map(|x| x.1),
        Ok(CacheClass::Revalidate)
    );
    assert_eq!(
        ok("/objects/ab/abcd"),
        Ok(("objects/ab/abcd".into(), CacheClass::Immutable))
    );
    assert_eq!(
        ok("/images/v1%3A2/manifest.json.zst").map(|x| x.0),
        Ok("images/v1:2/manifest.json.zst".into())
    );
    assert_eq!(ok("/packs/ab.pack").map(|x| x.1), Ok(CacheClass::Immutable));
    assert_eq!(
        ok("/disks/SHA256SUMS").map(|x| x.1),
        Ok(CacheClass::Revalidate)
    );
    for bad in [
        "/../etc/passwd",
        "/objects/../../etc/passwd",
        "/%2e%2e/etc/passwd",
        "/objects/%2E%2E/x",
        "/objects%2f..%2fx",
        "/objects/a%00b",
        "/objects//x",
        "objects/x",
        "/objects/./x",
        "/objects/a\\b",
        "/objects/%zz",
    ] {
        assert!(
            matches!(resolve_path(bad), Err(PathRefusal::Bad(_))),
            "{bad} must be refused as bad"
        );
    }
    for nf in [
        "/",
        "/tmp/x",
        "/objects",
        "/etc/passwd",
        "/objects/.tmp123",
        "/index.json/x",
        "/images/",
    ] {
        assert!(resolve_path(nf).is_err(), "{nf} must not be served");
    }
}

#[test]
fn ranges() {
    assert_eq!(
        parse_range("bytes=0-9", 100),
        RangeSpec::Part { start: 0, end: 9 }
    );
    assert_eq!(
        parse_range("bytes=90-", 100),
        RangeSpec::Part { start: 90, end: 99 }
    );
    assert_eq!(
        parse_range("bytes=90-200", 100),
        RangeSpec::Part { start: 90, end: 99 }
    );
    assert_eq!(
        parse_range("bytes=-10", 100),
        RangeSpec::Part { start: 90, end: 99 }
    );
    assert_eq!(
        parse_range("bytes=-1000", 100),
        RangeSpec::Part { start: 0, end: 99 }
    );
    assert_eq!(parse_range("bytes=100-", 100), RangeSpec::Unsatisfiable);
    assert_eq!(parse_range("bytes=-0", 100), RangeSpec::Unsatisfiable);
    assert_eq!(parse_range("bytes=0-", 0), RangeSpec::Unsatisfiable);
    assert_eq!(parse_range("bytes=5-3", 100), RangeSpec::Full);
    assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeSpec::Full);
    assert_eq!(parse_range("items=0-1", 100), RangeSpec::Full);
}
