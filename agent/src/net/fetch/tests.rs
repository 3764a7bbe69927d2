use super::*;
use crate::format::codec::max_compressed;

#[test]
fn ca_file_from_cli_wins_and_config_is_read_below_the_root() {
    let root = Path::new("/srv/node");
    let o = NetOptions::for_root(None, Some(Path::new("/etc/imageupd/ca.pem")), root);
    assert_eq!(
        o.ca_file.as_deref(),
        Some(Path::new("/srv/node/etc/imageupd/ca.pem"))
    );
    let o = NetOptions::for_root(
        Some(Path::new("/tmp/ca.pem")),
        Some(Path::new("/etc/x.pem")),
        root,
    );
    assert_eq!(o.ca_file.as_deref(), Some(Path::new("/tmp/ca.pem")));
    assert!(NetOptions::for_root(None, None, root).ca_file.is_none());
}

#[test]
fn backoff_jitter_stays_within_a_quarter() {
    for _ in 0..100 {
        let d = jitter(Duration::from_millis(1000));
        assert!(
            d >= Duration::from_millis(750) && d < Duration::from_millis(1250),
            "{d:?}"
        );
    }
}

#[test]
fn status_errors_are_found_under_context() {
    let e = anyhow!(StatusError {
        url: "http://x/".into(),
        status: 404
    })
    .context("fetching");
    assert!(is_status(&e, &[404]));
    assert!(!is_status(&e, &[403]));
    assert!(!is_status(&anyhow!("404"), &[404]));
}

#[test]
fn compressed_bound_exceeds_zstd_worst_case() {
    for size in [0u64, 1, 1000, 1 << 20, 100 << 20] {
        let data: Vec<u8> = (0..size.min(1 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let c = zstd::encode_all(&data[..], 19).expect("zstd");
        assert!((c.len() as u64) <= max_compressed(data.len() as u64));
    }
}
