use super::*;
use crate::manifest::{Entry, FileType, Manifest, FORMAT_VERSION};
use crate::store::{self, Store};

fn d(n: u8) -> Digest {
    Digest([n; 32])
}

fn sample() -> Header {
    Header {
        from: "v1".into(),
        from_sha256: d(1),
        to: "v2:1".into(),
        to_sha256: d(2),
        sig: Some(b"signature bytes".to_vec()),
        manifest_len: 123_456,
        mpatch_len: 789,
        payload_len: 5_000_000,
        objects: vec![
            Object {
                digest: d(3),
                size: 1 << 20,
                kind: Kind::Full,
            },
            Object {
                digest: d(4),
                size: 300_000,
                kind: Kind::Patch {
                    from: d(5),
                    from_size: 299_000,
                    path: RelPath(b"usr/bin/less".to_vec()),
                    len: 1234,
                },
            },
        ],
    }
}

#[test]
fn header_round_trips() {
    let h = sample();
    let mut bytes = h.encode();
    let head = bytes.len();
    bytes.extend_from_slice(b"manifest patch and payload follow");
    let (back, at) = Header::parse(&bytes).expect("parse");
    assert_eq!(back, h);
    assert_eq!(at, head);
    assert_eq!(Header::head_len(&bytes), Ok(head));
    assert_eq!(back.payload_raw_len(), (1 << 20) + 1234);
    assert_eq!(back.file_len(at), head as u64 + 789 + 5_000_000);
    let unsigned = Header { sig: None, ..h };
    assert_eq!(
        Header::parse(&unsigned.encode()).expect("parse").0,
        unsigned
    );
}

#[test]
fn truncated_headers_are_errors_not_panics() {
    let bytes = sample().encode();
    for n in 0..bytes.len() {
        let e = Header::parse(&bytes[..n]).expect_err("truncated header parsed");
        assert!(matches!(e, FormatError::Truncated(_)), "{n}: {e}");
    }
}

#[test]
fn bad_magic_version_and_lengths_are_refused() {
    let good = sample().encode();
    let mut b = good.clone();
    b[0] ^= 0xff;
    assert_eq!(Header::parse(&b), Err(FormatError::BadMagic));
    let mut b = good.clone();
    b[8] = 2;
    assert_eq!(Header::parse(&b), Err(FormatError::Version(2)));
    let mut b = good.clone();
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Header::parse(&b),
        Err(FormatError::TooLarge { what: "header", .. })
    ));
    // A manifest larger than any manifest may be.
    let h = Header {
        manifest_len: MAX_MANIFEST_BYTES + 1,
        ..sample()
    };
    assert!(matches!(
        Header::parse(&h.encode()),
        Err(FormatError::TooLarge {
            what: "manifest",
            ..
        })
    ));
    // A patch longer than its object can compress to.
    let mut h = sample();
    h.objects[1].kind = Kind::Patch {
        from: d(5),
        from_size: 1,
        path: RelPath(b"x".to_vec()),
        len: 1 << 30,
    };
    assert!(matches!(
        Header::parse(&h.encode()),
        Err(FormatError::TooLarge { what: "patch", .. })
    ));
    // Paths that escape, ids that are not ids.
    for bad in [&b"../etc/shadow"[..], b"/etc/shadow", b".", b"a//b"] {
        let mut h = sample();
        if let Kind::Patch { path, .. } = &mut h.objects[1].kind {
            *path = RelPath(bad.to_vec());
        }
        assert!(
            matches!(Header::parse(&h.encode()), Err(FormatError::Invalid(_))),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    let h = Header {
        to: "../x".into(),
        ..sample()
    };
    assert!(matches!(
        Header::parse(&h.encode()),
        Err(FormatError::Invalid(_))
    ));
    // Trailing bytes inside the header, an object count beyond the bytes.
    let mut b = good.clone();
    let hl = u32::from_le_bytes([b[12], b[13], b[14], b[15]]) + 1;
    b[12..16].copy_from_slice(&hl.to_le_bytes());
    b.push(0);
    assert!(matches!(Header::parse(&b), Err(FormatError::Invalid(_))));
    let mut h = sample().encode();
    // Overlong varint.
    let tail = h.split_off(PREFIX_LEN);
    let mut body = vec![0xffu8; 11];
    body.extend_from_slice(&tail);
    let mut b = h;
    b[12..16].copy_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(&body);
    assert!(Header::parse(&b).is_err());
}

#[test]
fn patches_round_trip_and_are_small() {
    let old: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let mut new = old.clone();
    new[1000..1010].copy_from_slice(b"0123456789");
    new.extend_from_slice(b"appended");
    let p = patch_encode(&old, &new, 19).expect("encode");
    assert!(
        p.len() < 200,
        "patch of a 10-byte change is {} bytes",
        p.len()
    );
    assert_eq!(
        patch_decode(&old, &p, new.len() as u64).expect("decode"),
        new
    );
    // Bounded output, and a wrong reference does not give the content.
    assert!(patch_decode(&old, &p, new.len() as u64 - 1).is_err());
    let other = vec![7u8; old.len()];
    assert!(patch_decode(&other, &p, new.len() as u64).map_or(true, |v| v != new));
}

fn file(path: &str, content: &[u8]) -> Entry {
    Entry {
        path: RelPath(path.as_bytes().to_vec()),
        ftype: FileType::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        size: content.len() as u64,
        sha256: Some(Digest::of(content)),
        target: None,
        rdev: None,
        xattrs: Default::default(),
    }
}

fn image(st: &Store, id: &str, parent: Option<&str>, files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut entries = vec![Entry {
        path: RelPath::root(),
        ftype: FileType::Dir,
        mode: 0o755,
        size: 0,
        sha256: None,
        ..file(".", b"")
    }];
    for (p, c) in files {
        st.put_object(&Digest::of(c), *c, 3).expect("object");
        entries.push(file(p, c));
    }
    let m = Manifest {
        format: FORMAT_VERSION,
        id: id.into(),
        parent: parent.map(str::to_string),
        created: "2026-01-01T00:00:00Z".into(),
        kernel: None,
        entries,
    };
    let (stored, _) = store::encode_manifest_framed(&m).expect("encode");
    st.put_image(&m, &stored, None).expect("put image");
    stored
}

fn noise(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

#[test]
fn build_then_decode_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = Store::create_or_open(dir.path()).expect("store");
    let big_old = noise(300_000, 1);
    let mut big_new = big_old.clone();
    big_new[5000..5020].copy_from_slice(&[9u8; 20]);
    let same = noise(1000, 2);
    let fresh = noise(50_000, 3);
    let small_old = b"tiny".to_vec();
    let small_new = b"tinier".to_vec();
    let p_stored = image(
        &st,
        "p",
        None,
        &[
            ("big", &big_old),
            ("etc_small", &small_old),
            ("same", &same),
        ],
    );
    let stored = image(
        &st,
        "t",
        Some("p"),
        &[
            ("big", &big_new),
            ("etc_small", &small_new),
            ("new_file", &fresh),
            ("new_twin", &fresh),
            ("same", &same),
        ],
    );
    let m = store::decode_manifest(&stored).expect("decode");
    let rep = build(&st, &m, &stored, Some(b"sig"), "p", 2).expect("build");
    assert_eq!((rep.objects, rep.patched_objects), (3, 1), "{rep:?}");
    let bytes = std::fs::read(dir.path().join(delta_rel("t", "p"))).expect("delta file");
    assert_eq!(bytes.len() as u64, rep.bytes);
    let (h, at) = Header::parse(&bytes).expect("parse");
    assert_eq!(h.file_len(at), bytes.len() as u64);
    assert_eq!((h.from.as_str(), h.to.as_str()), ("p", "t"));
    assert_eq!(h.from_sha256, Digest::of(&p_stored));
    assert_eq!(h.to_sha256, Digest::of(&stored));
    assert_eq!(h.sig.as_deref(), Some(&b"sig"[..]));

    // The manifest: patch against the parent's JSON, re-encoded to the
    // stored bytes.
    let p_json = build::manifest_json(&p_stored).expect("json");
    let mpatch = &bytes[at..at + h.mpatch_len as usize];
    let json = patch_decode(&p_json, mpatch, h.manifest_len).expect("manifest patch");
    assert_eq!(json, m.to_json());
    let (again, _) = crate::mframes::encode(&json, store::MANIFEST_LEVEL).expect("encode");
    assert_eq!(Digest::of(&again), h.to_sha256);

    // The payload, object by object.
    let payload = &bytes[at + h.mpatch_len as usize..];
    let mut p = Payload::new(payload).expect("payload");
    let want: Vec<&[u8]> = vec![&big_new, &small_new, &fresh];
    for (o, content) in h.objects.iter().zip(want) {
        let reference = match &o.kind {
            Kind::Patch { path, .. } => {
                assert_eq!(path.0, b"big");
                Some(&big_old[..])
            }
            Kind::Full => None,
        };
        let mut out = Vec::new();
        p.object(o, reference, &mut out).expect("object");
        assert_eq!(out, content);
    }
    p.finish().expect("end of payload");

    // A wrong reference or a damaged payload is an error, never content.
    let mut p = Payload::new(payload).expect("payload");
    let mut out = Vec::new();
    let wrong = vec![0u8; big_old.len()];
    assert!(p.object(&h.objects[0], Some(&wrong), &mut out).is_err());
    let mut damaged = payload.to_vec();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x55;
    let mut p = Payload::new(&damaged[..]).expect("payload");
    let ok = h.objects.iter().all(|o| {
        let reference = matches!(o.kind, Kind::Patch { .. }).then_some(&big_old[..]);
        p.object(o, reference, &mut io::sink()).is_ok()
    });
    assert!(!ok, "a damaged payload decoded cleanly");
}

use std::io;
