//! The content-addressed store on disk.
//!
//! ```text
//! STORE/imageupd-store.json              marker + format version
//! STORE/objects/<aa>/<sha256>            zstd frame of one file's content (immutable)
//! STORE/images/<id>/manifest.json.zst    the image manifest (immutable)
//! STORE/images/<id>/manifest.json.zst.sig  detached ed25519 signature
//! STORE/images/<id>/manifest.frames.json  the manifest's zstd frames (crate::format::mframes)
//! STORE/images/<id>/packs.idx.zst        where the image's objects sit in packs (crate::format::pack)
//! STORE/images/<id>/packs.idx.zst.sig    its detached ed25519 signature
//! STORE/images/<id>/deltas/<parent>.delta  update from the parent (publish --parent; crate::format::delta)
//! STORE/packs/<sha256>.pack              concatenated object frames (immutable)
//! STORE/disks/<id>/<name>, SHA256SUMS    a published disk image (crate::publish::disk)
//! STORE/index.json                       list of images (the only mutable file)
//! ```
//!
//! Everything but `index.json` is immutable and named by content or by id, so
//! any static HTTP server, cache or CDN can serve a store.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::format::manifest::{self, Digest, Manifest};

/// Name of the marker file at the top of a store.
pub const MARKER: &str = "imageupd-store.json";
/// Store layout version written by this build.
pub const STORE_FORMAT: u32 = 1;
/// File name of a manifest inside `images/<id>/`.
pub const MANIFEST_NAME: &str = "manifest.json.zst";
/// Signature file name inside `images/<id>/`.
pub const SIG_NAME: &str = "manifest.json.zst.sig";

/// Contents of the marker file.
#[derive(Serialize, Deserialize)]
struct MarkerFile {
    format: u32,
}

/// One line of `index.json`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct IndexEntry {
    /// Image id.
    pub id: String,
    /// Parent image id.
    pub parent: Option<String>,
    /// Creation time (RFC 3339).
    pub created: String,
    /// sha256 of `manifest.json.zst`.
    pub manifest_sha256: String,
    /// Number of entries.
    pub entries: usize,
    /// Content bytes of regular files.
    pub bytes: u64,
    /// Whether a signature was published.
    pub signed: bool,
    /// Release channel (absent for images published before releases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Release number on the channel (absent: release 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    /// Disk images published with it (provisioning artifacts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskEntry>,
}

/// `index.json`.
#[derive(Serialize, Deserialize, Default)]
pub struct Index {
    /// Format version ([`STORE_FORMAT`]).
    pub format: u32,
    /// Published images, oldest first.
    pub images: Vec<IndexEntry>,
}

/// A store directory on the local filesystem.
#[derive(Clone, Debug)]
pub struct Store {
    path: PathBuf,
}

/// Relative path of an object in the store.
pub fn object_rel(d: &Digest) -> String {
    let h = d.to_hex();
    format!("objects/{}/{}", &h[..2], h)
}

impl Store {
    /// True if `path` holds a store.
    pub fn is_store(path: &Path) -> bool {
        path.join(MARKER).is_file()
    }

    /// Open an existing store, checking its format.
    pub fn open(path: &Path) -> Result<Store> {
        let marker = path.join(MARKER);
        let text = fs::read(&marker).with_context(|| {
            format!("{} is not an imageupd store (no {MARKER})", path.display())
        })?;
        let m: MarkerFile = serde_json::from_slice(&text)
            .with_context(|| format!("parsing {}", marker.display()))?;
        if m.format != STORE_FORMAT {
            bail!(
                "store {} has format {} but this imageupd reads format {STORE_FORMAT}",
                path.display(),
                m.format
            );
        }
        Ok(Store {
            path: path.to_path_buf(),
        })
    }

    /// Open a store, creating an empty one if the directory is new or empty.
    pub fn create_or_open(path: &Path) -> Result<Store> {
        if Store::is_store(path) {
            return Store::open(path);
        }
        fs::create_dir_all(path.join("objects"))
            .with_context(|| format!("creating store {}", path.display()))?;
        fs::create_dir_all(path.join("images"))?;
        fs::create_dir_all(path.join("tmp"))?;
        write_atomic(
            &path.join(MARKER),
            &serde_json::to_vec(&MarkerFile {
                format: STORE_FORMAT,
            })?,
        )?;
        Ok(Store {
            path: path.to_path_buf(),
        })
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scratch space on the store's filesystem.
    pub fn tmp_dir(&self) -> Result<PathBuf> {
        let t = self.path.join("tmp");
        fs::create_dir_all(&t).with_context(|| format!("creating {}", t.display()))?;
        Ok(t)
    }

    /// Where an object lives.
    pub fn object_path(&self, d: &Digest) -> PathBuf {
        self.path.join(object_rel(d))
    }

    /// True if the object is present.
    pub fn has_object(&self, d: &Digest) -> bool {
        self.object_path(d).is_file()
    }

    /// Store content read from `r` (which must hash to `d`) as an object.
    /// Returns the compressed size. Written to a temp file and renamed, so a
    /// reader never sees a partial object.
    pub fn put_object<R: Read>(&self, d: &Digest, r: R, level: i32) -> Result<u64> {
        self.put_object_sized(d, r, None, level)
    }

    /// [`Store::put_object`] with the content size in bytes known up front:
    /// zstd then sizes its tables to the input (at high levels, much faster
    /// for small files) and records the size in the frame header.
    pub fn put_object_sized<R: Read>(
        &self,
        d: &Digest,
        r: R,
        size: Option<u64>,
        level: i32,
    ) -> Result<u64> {
        let final_path = self.object_path(d);
        if final_path.is_file() {
            return Ok(0);
        }
        let dir = final_path.parent().unwrap_or(&self.path);
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp =
            tempfile::NamedTempFile::new_in(self.tmp_dir()?).context("creating a temp object")?;
        let mut enc = zstd::stream::write::Encoder::new(tmp, level)?;
        enc.include_checksum(false)?;
        if size.is_some() {
            enc.set_pledged_src_size(size)?;
        }
        let mut vr = crate::format::stream::VerifyReader::new(r);
        io::copy(&mut vr, &mut enc).context("compressing object")?;
        let tmp = enc.finish()?;
        let (got, _) = vr.digest()?;
        if &got != d {
            bail!("content changed while publishing (expected {d}, read {got})");
        }
        let size = tmp.as_file().metadata()?.len();
        // World-readable, so a stock web server running as another user can serve it.
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))?;
        tmp.persist(&final_path)
            .with_context(|| format!("storing object {}", final_path.display()))?;
        Ok(size)
    }

    /// Open an object for reading its decompressed content (unverified: wrap
    /// it in a [`crate::format::stream::VerifyReader`]).
    pub fn open_object(
        &self,
        d: &Digest,
    ) -> io::Result<zstd::stream::read::Decoder<'static, io::BufReader<fs::File>>> {
        let f = fs::File::open(self.object_path(d))?;
        zstd::stream::read::Decoder::new(f)
    }

    /// Directory of an image.
    pub fn image_dir(&self, id: &str) -> PathBuf {
        self.path.join("images").join(id)
    }

    /// True if the image exists.
    pub fn has_image(&self, id: &str) -> bool {
        self.image_dir(id).join(MANIFEST_NAME).is_file()
    }

    /// A trust-metadata file under the store (`timestamp.json`,
    /// `root/<N>.root.json`); `None` when absent. Bounded like a download.
    pub fn trust_file(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        use std::io::Read as _;
        let cap = crate::format::tuf::envelope::MAX_ENVELOPE_BYTES as u64;
        let p = self.path.join(rel);
        let f = match fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        let mut b = Vec::new();
        f.take(cap + 1)
            .read_to_end(&mut b)
            .with_context(|| format!("reading {}", p.display()))?;
        if b.len() as u64 > cap {
            bail!("{} is larger than {cap} bytes", p.display());
        }
        Ok(Some(b))
    }

    /// Raw stored manifest bytes and signature bytes (if any).
    pub fn read_manifest_raw(&self, id: &str) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
        manifest::validate_image_id(id).map_err(anyhow::Error::msg)?;
        let dir = self.image_dir(id);
        let m = fs::read(dir.join(MANIFEST_NAME)).with_context(|| {
            format!(
                "image {id:?} is not in store {} (no {})",
                self.path.display(),
                dir.join(MANIFEST_NAME).display()
            )
        })?;
        let sig = match fs::read(dir.join(SIG_NAME)) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", dir.join(SIG_NAME).display()))
            }
        };
        Ok((m, sig))
    }

    /// Write an image's manifest (and signature), then add it to the index.
    pub fn put_image(&self, m: &Manifest, stored: &[u8], sig: Option<&[u8]>) -> Result<()> {
        self.put_image_with(m, stored, sig, Vec::new())
    }

    /// [`Store::put_image`], recording the disk images already installed
    /// under `disks/<id>/` in the index.
    pub fn put_image_with(
        &self,
        m: &Manifest,
        stored: &[u8],
        sig: Option<&[u8]>,
        disks: Vec<DiskEntry>,
    ) -> Result<()> {
        let dir = self.image_dir(&m.id);
        if dir.join(MANIFEST_NAME).exists() {
            bail!(
                "image {:?} already exists in {}; image ids are immutable",
                m.id,
                self.path.display()
            );
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(sig) = sig {
            write_atomic(&dir.join(SIG_NAME), sig)?;
        }
        // The manifest goes last: its presence is what publishes the image.
        write_atomic(&dir.join(MANIFEST_NAME), stored)?;
        let mut idx = self.index()?;
        idx.format = STORE_FORMAT;
        idx.images.retain(|e| e.id != m.id);
        idx.images.push(IndexEntry {
            id: m.id.clone(),
            parent: m.parent.clone(),
            created: m.created.clone(),
            manifest_sha256: Digest::of(stored).to_hex(),
            entries: m.entries.len(),
            bytes: m.content_bytes(),
            signed: sig.is_some(),
            channel: m.channel.clone(),
            release: m.release,
            disks,
        });
        write_atomic(
            &self.path.join("index.json"),
            &serde_json::to_vec_pretty(&idx)?,
        )
    }

    /// The index (empty if absent).
    pub fn index(&self) -> Result<Index> {
        match fs::read(self.path.join("index.json")) {
            Ok(b) => serde_json::from_slice(&b).context("parsing index.json"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index {
                format: STORE_FORMAT,
                images: vec![],
            }),
            Err(e) => Err(e).context("reading index.json"),
        }
    }
}

/// Write a file via temp + fsync + rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_replacing(path, data, true)
}

/// Replace a runtime file (live status, the plan handed to hooks under
/// `/run`) by temp file + rename, without fsync: readers never see it torn,
/// and it need not outlive a power loss (it lives on tmpfs on a real node).
pub fn write_volatile(path: &Path, data: &[u8]) -> Result<()> {
    write_replacing(path, data, false)
}

fn write_replacing(path: &Path, data: &[u8], durable: bool) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(data)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))?;
    if durable {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A disk image's container format (defined with the manifest, which
/// signs it).
pub use crate::format::manifest::DiskFormat;

/// A published disk image, as recorded in `index.json` (`disks` of an image).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskEntry {
    /// File name (the basename of the published source).
    pub name: String,
    /// Container format.
    pub format: DiskFormat,
    /// Size of the file in bytes.
    pub size: u64,
    /// sha256 of the file, hex.
    pub sha256: String,
    /// Path of the file relative to the store (`disks/<id>/<name>`).
    pub path: String,
    /// Path of its checksum file relative to the store (`disks/<id>/SHA256SUMS`).
    pub sha256sums: String,
}
