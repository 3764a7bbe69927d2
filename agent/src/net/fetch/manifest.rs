//! Fetching a manifest frame by frame ([`crate::format::mframes`]): the frames the
//! node's stored manifests (current and previous, in its state directory)
//! already hold are reused, the others fetched with `Range` requests, one
//! per run of adjacent missing frames. The result is checked against the
//! manifest's signature by the caller like a whole download; when anything
//! is off, the manifest is fetched whole instead.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;

use anyhow::{anyhow, bail, Context, Result};

use super::{read_failed, Attempt, HttpStore};
use crate::format::manifest::Digest;
use crate::format::mframes::{self, FrameList, FRAMES_NAME, MAX_FRAMES_BYTES};
use crate::fs::rootfs::{CURRENT_MANIFEST, PREVIOUS_MANIFEST};

/// Known frames fewer than this many bytes between two missing ones are
/// fetched along with them (one request instead of two).
const RUN_GAP: u64 = 64 * 1024;

impl HttpStore {
    /// The stored manifest of image `id` assembled from frames, or `None`
    /// when it has to be fetched whole.
    pub(super) fn manifest_by_frames(&self, id: &str) -> Option<Vec<u8>> {
        let dir = self.state_dir.as_ref()?;
        let local: Vec<Vec<u8>> = [CURRENT_MANIFEST, PREVIOUS_MANIFEST]
            .iter()
            .filter_map(|n| std::fs::read(dir.join(OsStr::from_bytes(n))).ok())
            .collect();
        if local.is_empty() {
            return None;
        }
        match self.assemble(id, &local) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::info!("fetching the manifest of {id:?} whole: {e:#}");
                None
            }
        }
    }

    fn assemble(&self, id: &str, local: &[Vec<u8>]) -> Result<Vec<u8>> {
        let list = self.get_small(&format!("images/{id}/{FRAMES_NAME}"), MAX_FRAMES_BYTES)?;
        let list: FrameList = serde_json::from_slice(&list).context("parsing the frame list")?;
        let total = mframes::check_list(&list)?;
        if total > self.limits.max_manifest_bytes {
            bail!("frame list adds up to {total} bytes");
        }
        let known = mframes::known_frames(local);
        let f = &list.frames;
        // Runs of missing frames [i, j), merged across known frames when
        // those are fewer than RUN_GAP bytes (cheaper than a round trip).
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, fr) in f.iter().enumerate() {
            if known.contains_key(&fr.sha256) {
                continue;
            }
            match runs.last_mut() {
                Some((_, b)) if fr.offset - (f[*b - 1].offset + f[*b - 1].len) <= RUN_GAP => {
                    *b = i + 1;
                }
                _ => runs.push((i, i + 1)),
            }
        }
        let mut out = Vec::with_capacity(total as usize);
        let mut i = 0;
        for (a, b) in runs {
            for fr in &f[i..a] {
                out.extend_from_slice(&known[&fr.sha256]);
            }
            let (start, end) = (f[a].offset, f[b - 1].offset + f[b - 1].len);
            let body = self.get_range(id, start, end)?;
            for fr in &f[a..b] {
                let at = (fr.offset - start) as usize;
                if Digest::of(&body[at..at + fr.len as usize]).to_hex() != fr.sha256 {
                    bail!("frame at byte {} does not match the frame list", fr.offset);
                }
            }
            out.extend_from_slice(&body);
            i = b;
        }
        for fr in &f[i..] {
            out.extend_from_slice(&known[&fr.sha256]);
        }
        Ok(out)
    }

    /// Bytes `start..end` of image `id`'s stored manifest (206 only).
    fn get_range(&self, id: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        let url = self.join(&format!("images/{id}/{}", crate::fs::store::MANIFEST_NAME))?;
        self.retrying(&url, || {
            let resp = self.send_range(&url, Some(format!("bytes={start}-{}", end - 1)))?;
            if resp.status().as_u16() != 206 {
                return Err(Attempt::Fatal(anyhow!(
                    "{url}: HTTP {} to a range request",
                    resp.status()
                )));
            }
            let mut body = Vec::with_capacity((end - start) as usize);
            match self.body(resp, end - start).read_to_end(&mut body) {
                Ok(_) if body.len() as u64 == end - start => Ok(body),
                Ok(n) => Err(Attempt::Retry(anyhow!(
                    "{url}: range body ended after {n} bytes"
                ))),
                Err(e) => Err(read_failed(e, &url)),
            }
        })
    }
}
