use super::*;
use crate::format::delta::{delta_rel, patch_decode, Header, Kind, Payload};
use crate::format::manifest::{Entry, FileType, FORMAT_VERSION};

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
        channel: Some("default".into()),
        release: Some(1),
        compatible: None,
        disk: None,
        entries,
    };
    let (stored, _) = match parent {
        Some(p) => {
            let (ps, _) = st.read_manifest_raw(p).expect("parent manifest");
            crate::format::codec::encode_manifest_framed_child(&m, &ps).expect("encode")
        }
        None => crate::format::codec::encode_manifest_framed(&m).expect("encode"),
    };
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
    let m = crate::format::codec::decode_manifest(&stored).expect("decode");
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
    let p_json = manifest_json(&p_stored).expect("json");
    let mpatch = &bytes[at..at + h.mpatch_len as usize];
    let json = patch_decode(&p_json, mpatch, h.manifest_len).expect("manifest patch");
    assert_eq!(json, m.to_json());
    let parent = crate::format::mframes::Unframed::new(&p_stored, 1 << 30).expect("unframe");
    let (again, _) =
        crate::format::mframes::encode_reusing(&json, h.frame_level, &parent.by_piece())
            .expect("encode");
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
