use super::*;

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
        frame_level: 1,
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
    b[8] = 3;
    assert_eq!(Header::parse(&b), Err(FormatError::Version(3)));
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

#[test]
fn version_1_headers_read_with_all_frames_at_the_manifest_level() {
    let h = Header {
        frame_level: crate::format::codec::MANIFEST_LEVEL,
        ..sample()
    };
    let v1 = h.encode_as(1);
    assert_eq!(Header::parse(&v1).expect("parse v1").0, h);
    assert!(v1.len() < h.encode().len(), "v1 has no frame level field");
    for bad in [0, crate::format::codec::MANIFEST_LEVEL + 1] {
        let e = Header::parse(
            &Header {
                frame_level: bad,
                ..sample()
            }
            .encode(),
        )
        .expect_err("frame level out of range");
        assert!(matches!(e, FormatError::Invalid(_)), "{bad}: {e}");
    }
}
