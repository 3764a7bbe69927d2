//! Helpers shared by the integration tests: running the `imageupd` binary,
//! the cached fixture trees, scratch directories, stores and keys, loop-mounted
//! filesystems, and two independent oracles that never use imageupd's code:
//!
//! * [`oracle`]: `rsync -naHAX --delete --checksum --itemize-changes` with the
//!   preserve list excluded; it prints nothing when ROOT equals IMAGE.
//! * [`meta_diff`]: a walk of both trees comparing type, content digest,
//!   symlink target, device number, mode, owner, mtime to the nanosecond,
//!   every xattr, and hardlink groups (which rsync does not check when a
//!   group is split).
//!
//! Every test binary includes this module and uses a different subset of it.
#![allow(dead_code)]

pub mod etcd;
pub mod fleet;
pub mod oracle;
pub mod serve;

pub use oracle::*;

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::Digest as _;

// ---------------------------------------------------------------------------
// Exit codes of the CLI contract.

pub const EXIT_OK: i32 = 0;
pub const EXIT_ERROR: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_DRIFT: i32 = 3;
pub const EXIT_UNTRUSTED: i32 = 4;
pub const EXIT_PREFLIGHT: i32 = 5;
pub const EXIT_PRE_HOOK: i32 = 6;
pub const EXIT_POST_HOOK: i32 = 7;
pub const EXIT_LOCKED: i32 = 8;
pub const EXIT_SOURCE: i32 = 9;

/// zstd level used by every publish in the tests (speed over ratio).
pub const LEVEL: &str = "3";

/// Default time limit for one imageupd run; a hang fails the test instead of
/// blocking CI.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The workspace root (the repository).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf()
}

/// The imageupd binary built for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_imageupd")
}

/// Abbreviate long outputs in panic messages.
pub fn clip(s: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    if lines.len() <= max_lines {
        s.to_string()
    } else {
        let mut out = lines[..max_lines].join("\n");
        out.push_str(&format!("\n... ({} more lines)", lines.len() - max_lines));
        out
    }
}

// ---------------------------------------------------------------------------
// Running commands.

/// The result of one finished process.
pub struct Out {
    /// The command line, for messages.
    pub cmd: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Out {
    /// Exit code, `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Terminating signal, if any.
    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }

    /// Everything about the run, for panic messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {}{}\nelapsed: {:.2?}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
            self.cmd,
            match (self.code(), self.signal()) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(s)) => format!("killed by signal {s}"),
                _ => "unknown".into(),
            },
            if self.timed_out { " (TIMED OUT, killed)" } else { "" },
            self.elapsed,
            clip(&self.stdout, 200),
            clip(&self.stderr, 200),
        )
    }

    /// Assert the exit code.
    #[track_caller]
    pub fn expect_code(self, code: i32) -> Out {
        if self.code() != Some(code) || self.timed_out {
            panic!("expected exit code {code}\n{}", self.describe());
        }
        self
    }

    /// Assert success.
    #[track_caller]
    pub fn expect_ok(self) -> Out {
        self.expect_code(EXIT_OK)
    }

    /// stdout parsed as the single JSON object `--json` promises.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_str::<serde_json::Value>(self.stdout.trim()) {
            Ok(v) if v.is_object() => v,
            Ok(_) => panic!("--json output is not a JSON object\n{}", self.describe()),
            Err(e) => panic!(
                "--json output is not one JSON object ({e})\n{}",
                self.describe()
            ),
        }
    }

    /// stdout + stderr, for substring checks on messages.
    pub fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// A command about to run, with a time limit.
pub struct Run {
    cmd: Command,
    desc: String,
    timeout: Duration,
}

fn quote(s: &OsStr) -> String {
    let t = s.to_string_lossy();
    if !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        t.into_owned()
    } else {
        format!("'{}'", t.replace('\'', "'\\''"))
    }
}

impl Run {
    /// Any program.
    pub fn new(program: impl AsRef<OsStr>) -> Run {
        let program = program.as_ref();
        let mut cmd = Command::new(program);
        // Node-side defaults must never leak in from the environment.
        for k in [
            "IMAGEUPD_ROOT",
            "IMAGEUPD_FAULT",
            "IMAGEUPD_SKIP_SPACE_CHECK",
            "OS_CONFIG_FILES",
        ] {
            cmd.env_remove(k);
        }
        cmd.env("LC_ALL", "C");
        Run {
            cmd,
            desc: quote(program),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Run {
        self.desc.push(' ');
        self.desc.push_str(&quote(a.as_ref()));
        self.cmd.arg(a);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Run {
        self.desc = format!(
            "{}={} {}",
            k.as_ref().to_string_lossy(),
            quote(v.as_ref()),
            self.desc
        );
        self.cmd.env(k, v);
        self
    }

    pub fn timeout(mut self, t: Duration) -> Run {
        self.timeout = t;
        self
    }

    /// The command line, for messages.
    pub fn describe(&self) -> &str {
        &self.desc
    }

    /// The underlying command (to spawn and kill it yourself).
    pub fn into_command(self) -> (Command, String) {
        (self.cmd, self.desc)
    }

    /// Run to completion (or the time limit), capturing stdout and stderr.
    pub fn run(mut self) -> Out {
        let start = Instant::now();
        self.cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self
            .cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.desc));
        let mut so = child.stdout.take().expect("piped stdout");
        let mut se = child.stderr.take().expect("piped stderr");
        let t_out = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = so.read_to_end(&mut v);
            v
        });
        let t_err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = se.read_to_end(&mut v);
            v
        });
        let mut timed_out = false;
        let status = loop {
            match child.try_wait().expect("waiting for child") {
                Some(s) => break s,
                None if start.elapsed() > self.timeout => {
                    timed_out = true;
                    let _ = child.kill();
                    break child.wait().expect("waiting for killed child");
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
        Out {
            cmd: self.desc,
            status,
            stdout,
            stderr,
            elapsed: start.elapsed(),
            timed_out,
        }
    }

    #[track_caller]
    pub fn ok(self) -> Out {
        self.run().expect_ok()
    }

    #[track_caller]
    pub fn code(self, code: i32) -> Out {
        self.run().expect_code(code)
    }
}

/// `imageupd ARGS...`
pub fn imageupd<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Run::new(bin()).args(args)
}

/// Run a shell command line (bash -c), panic unless it succeeds, return stdout.
#[track_caller]
pub fn sh(script: &str) -> String {
    Run::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .ok()
        .stdout
}

/// Run a program with arguments, panic unless it succeeds, return stdout.
#[track_caller]
pub fn cmd<I, S>(program: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Run::new(program).args(args).ok().stdout
}

// ---------------------------------------------------------------------------
// Fixture trees, scratch space.

/// Where build-trees.sh keeps the real trees.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("IMAGEUPD_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/imageupd-test".into())
}

/// The cached debootstrap trees.
pub struct Trees {
    /// bookworm minbase.
    pub v1: PathBuf,
    /// v1 + less, vim-tiny, iproute2, an edited /etc/login.defs.
    pub v2: PathBuf,
    /// v1 with one binary changed.
    pub v3: PathBuf,
}

impl Trees {
    pub fn get(&self, id: &str) -> &Path {
        match id {
            "v1" => &self.v1,
            "v2" => &self.v2,
            "v3" => &self.v3,
            _ => panic!("no fixture tree {id}"),
        }
    }
}

/// The real trees, built by tests/fixtures/build-trees.sh when the cache is
/// not complete yet.
pub fn trees() -> &'static Trees {
    static T: OnceLock<Trees> = OnceLock::new();
    T.get_or_init(|| {
        let c = cache_dir();
        if !c.join(".complete").exists() {
            eprintln!(
                "fixture trees missing in {}; running build-trees.sh",
                c.display()
            );
            Run::new(repo_root().join("tests/fixtures/build-trees.sh"))
                .timeout(Duration::from_secs(1800))
                .ok();
        }
        Trees {
            v1: c.join("v1"),
            v2: c.join("v2"),
            v3: c.join("v3"),
        }
    })
}

/// The synthetic pair (s1, s2) from tests/fixtures/synthetic.sh, cached
/// under the fixture cache keyed by the script's digest; built atomically
/// (to a temporary directory, then renamed) so concurrent test processes
/// never see a half-built pair.
pub fn synthetic() -> &'static (PathBuf, PathBuf) {
    static S: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    S.get_or_init(|| {
        let script = repo_root().join("tests/fixtures/synthetic.sh");
        let digest = hex_of(&sha2::Sha256::digest(
            std::fs::read(&script).expect("read synthetic.sh"),
        ))[..16]
            .to_string();
        let base = cache_dir();
        std::fs::create_dir_all(&base).expect("create fixture cache");
        let dir = base.join(format!("synthetic-{digest}"));
        if !dir.join("s2").exists() {
            let tmp = base.join(format!("synthetic-{digest}.tmp.{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            Run::new(&script).arg(&tmp).ok();
            if std::fs::rename(&tmp, &dir).is_err() {
                // Another process won the race; its pair is identical.
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        (dir.join("s1"), dir.join("s2"))
    })
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// This process's scratch directory, under the target dir (same filesystem
/// as the fixture cache on CI machines, so copies are cheap). Scratch left
/// behind by earlier test processes that have died is removed (after lazily
/// unmounting anything still mounted below it).
pub fn scratch_base() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        let top = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&top).expect("create CARGO_TARGET_TMPDIR");
        if let Ok(rd) = std::fs::read_dir(&top) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("imageupd-test-") {
                    if !Path::new("/proc").join(pid).exists() {
                        for m in mounts_under(&e.path()).into_iter().rev() {
                            let _ = Command::new("umount").arg("-l").arg(&m).status();
                        }
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let b = top.join(format!("imageupd-test-{}", std::process::id()));
        std::fs::create_dir_all(&b).expect("create scratch base");
        b
    })
}

/// A fresh scratch directory, removed when dropped (kept when
/// IMAGEUPD_TEST_KEEP is set, for debugging).
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("IMAGEUPD_TEST_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping scratch {}", d.keep().display());
            }
        }
    }
}

/// A new scratch directory whose name starts with `name`.
pub fn scratch(name: &str) -> Scratch {
    let d = tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(scratch_base())
        .expect("create scratch dir");
    let path = d.path().to_path_buf();
    Scratch { dir: Some(d), path }
}

/// `cp -a SRC DST` (DST must not exist).
#[track_caller]
pub fn copy_tree(src: &Path, dst: &Path) {
    assert!(!dst.exists(), "copy_tree: {} already exists", dst.display());
    cmd("cp", [OsStr::new("-a"), src.as_os_str(), dst.as_os_str()]);
}

/// Make DST an exact copy of SRC again: `rsync -aHAX --delete --numeric-ids`.
/// Never uses imageupd.
#[track_caller]
pub fn reset_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("create reset target");
    let mut s = src.as_os_str().to_owned();
    s.push("/");
    let mut d = dst.as_os_str().to_owned();
    d.push("/");
    cmd(
        "rsync",
        [
            OsStr::new("-aHAX"),
            OsStr::new("--delete"),
            OsStr::new("--numeric-ids"),
            &s,
            &d,
        ],
    );
}

// ---------------------------------------------------------------------------
// The preserve list.

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("read osrelease")
        .trim()
        .to_string()
}

/// The contract's preserve list, as rsync exclude patterns anchored at the
/// transfer root, plus the engine's runtime directory `/run/imageupd/`
/// (its lock lives there when the root is a plain directory).
pub fn preserve_excludes() -> Vec<String> {
    let k = kernel_release();
    let mut v: Vec<String> = [
        "/etc/image_id",
        "/etc/machine-id",
        "/etc/hostname",
        "/etc/hosts",
        "/etc/fstab",
        "/etc/ssh/ssh_host_*",
        "/etc/imageupd/",
        "/var/lib/imageupd/",
        "/var/lib/os-collect-config/",
        "/var/log/",
        "/home/",
        "/root/",
        "/tmp/",
        "/var/tmp/",
        "/mnt/state/",
        "/lost+found",
        "/run/imageupd/",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("/lib/modules/{k}/"));
    v.push(format!("/usr/lib/modules/{k}/"));
    v
}

/// True when the relative path (no leading slash; "." is the top) is on the
/// preserve list (see [`preserve_excludes`]).
pub fn is_preserved(rel: &[u8]) -> bool {
    static DIRS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let dirs = DIRS.get_or_init(|| {
        let k = kernel_release();
        let mut d: Vec<Vec<u8>> = [
            "etc/imageupd",
            "var/lib/imageupd",
            "var/lib/os-collect-config",
            "var/log",
            "home",
            "root",
            "tmp",
            "var/tmp",
            "mnt/state",
            "run/imageupd",
            "lost+found",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        d.push(format!("lib/modules/{k}").into_bytes());
        d.push(format!("usr/lib/modules/{k}").into_bytes());
        d
    });
    const FILES: [&[u8]; 5] = [
        b"etc/image_id",
        b"etc/machine-id",
        b"etc/hostname",
        b"etc/hosts",
        b"etc/fstab",
    ];
    if FILES.contains(&rel) || rel.starts_with(b"etc/ssh/ssh_host_") {
        return true;
    }
    dirs.iter()
        .any(|d| rel == d.as_slice() || (rel.starts_with(d) && rel.get(d.len()) == Some(&b'/')))
}

/// The staging/state area the engine may use freely.
pub fn is_state(rel: &[u8]) -> bool {
    rel == b"var/lib/imageupd" || rel.starts_with(b"var/lib/imageupd/")
}

// ---------------------------------------------------------------------------
// Keys, trust, config, stores.

/// A signing key pair made by `imageupd keygen`.
#[derive(Clone)]
pub struct Key {
    pub secret: PathBuf,
    pub public: PathBuf,
}

/// `imageupd keygen --out DIR/NAME`.
#[track_caller]
pub fn keygen(dir: &Path, name: &str) -> Key {
    std::fs::create_dir_all(dir).expect("create key dir");
    let secret = dir.join(name);
    imageupd([
        OsStr::new("keygen"),
        OsStr::new("--out"),
        secret.as_os_str(),
    ])
    .ok();
    let mut public = secret.as_os_str().to_owned();
    public.push(".pub");
    let public = PathBuf::from(public);
    assert!(
        public.is_file(),
        "keygen did not write {}",
        public.display()
    );
    let mode = std::fs::metadata(&secret)
        .expect("secret key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        mode,
        0o600,
        "secret key {} must be mode 0600",
        secret.display()
    );
    Key { secret, public }
}

/// Trust KEY on the node ROOT: copy KEY.pub into ROOT/etc/imageupd/trusted.d/.
pub fn trust(root: &Path, key: &Key) {
    let d = root.join("etc/imageupd/trusted.d");
    std::fs::create_dir_all(&d).expect("create trusted.d");
    let name = key.public.file_name().expect("key file name");
    std::fs::copy(&key.public, d.join(name)).expect("copy public key");
}

/// Write ROOT/etc/imageupd/config.toml.
pub fn write_config(root: &Path, toml: &str) {
    let d = root.join("etc/imageupd");
    std::fs::create_dir_all(&d).expect("create etc/imageupd");
    std::fs::write(d.join("config.toml"), toml).expect("write config.toml");
}

/// `imageupd publish --store STORE --id ID [--key K] [--parent P] --level 3 SOURCE`.
#[track_caller]
pub fn publish(
    store: &Path,
    id: &str,
    key: Option<&Key>,
    parent: Option<&str>,
    source: &Path,
) -> Out {
    let mut r = imageupd(["publish", "--store"])
        .arg(store)
        .args(["--id", id, "--level", LEVEL]);
    if let Some(k) = key {
        r = r.arg("--key").arg(&k.secret);
    }
    if let Some(p) = parent {
        r = r.args(["--parent", p]);
    }
    r.arg(source).ok()
}

/// `imageupd apply --from SRC --id ID --root ROOT --json` plus EXTRA; the
/// exit code is not checked.
pub fn apply(src: &Path, id: &str, root: &Path, extra: &[&str]) -> Out {
    imageupd(["apply", "--from"])
        .arg(src)
        .args(["--id", id, "--root"])
        .arg(root)
        .arg("--json")
        .args(extra)
        .run()
}

/// Like [`apply`], asserting success and `"result"` == EXPECT_RESULT.
#[track_caller]
pub fn apply_ok(src: &Path, id: &str, root: &Path, expect_result: &str) -> Out {
    let out = apply(src, id, root, &[]).expect_ok();
    let j = out.json();
    assert_eq!(
        j["result"].as_str(),
        Some(expect_result),
        "unexpected apply result\n{}",
        out.describe()
    );
    out
}

/// `imageupd verify --root ROOT [--checksum] --json`; exit code unchecked.
pub fn verify(root: &Path, checksum: bool) -> Out {
    let mut r = imageupd(["verify", "--root"]).arg(root).arg("--json");
    if checksum {
        r = r.arg("--checksum");
    }
    r.run()
}

/// Content of ROOT/etc/image_id, trimmed.
pub fn image_id(root: &Path) -> Option<String> {
    std::fs::read_to_string(root.join("etc/image_id"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Assert the full post-apply contract: both oracles clean, `verify
/// --checksum` exit 0, /etc/image_id == ID.
#[track_caller]
pub fn assert_applied(image: &Path, root: &Path, id: &str, context: &str) {
    assert_converged(image, root, context);
    assert_eq!(
        image_id(root).as_deref(),
        Some(id),
        "{context}: /etc/image_id"
    );
    let v = verify(root, true);
    assert_eq!(
        v.code(),
        Some(EXIT_OK),
        "{context}: verify --checksum after apply\n{}",
        v.describe()
    );
}

/// A store shared by all tests of one test binary; images are published
/// (signed, level 3) the first time a test asks for them.
pub struct SharedStore {
    pub dir: PathBuf,
    pub key: Key,
    published: Mutex<BTreeSet<String>>,
}

impl SharedStore {
    /// Make sure image ID (v1, v2, v3, s1 or s2) is in the store; returns
    /// the tree it was published from.
    #[track_caller]
    pub fn image(&self, id: &str) -> PathBuf {
        let mut done = self.published.lock().unwrap_or_else(|e| e.into_inner());
        self.publish_locked(id, &mut done)
    }

    #[track_caller]
    fn publish_locked(&self, id: &str, done: &mut BTreeSet<String>) -> PathBuf {
        let src = fixture_tree(id);
        if !done.contains(id) {
            // v2 and v3 are published as successors of v1, s2 of s1; a
            // parent must be in the store first.
            let parent = match id {
                "v2" | "v3" => Some("v1"),
                "s2" => Some("s1"),
                _ => None,
            };
            if let Some(p) = parent {
                self.publish_locked(p, done);
            }
            let t = Instant::now();
            publish(&self.dir, id, Some(&self.key), parent, &src);
            eprintln!("published {id} in {:.1?}", t.elapsed());
            done.insert(id.to_string());
        }
        src
    }
}

/// The source tree of a fixture image id.
pub fn fixture_tree(id: &str) -> PathBuf {
    match id {
        "v1" | "v2" | "v3" => trees().get(id).to_path_buf(),
        "s1" => synthetic().0.clone(),
        "s2" => synthetic().1.clone(),
        _ => panic!("unknown fixture image {id}"),
    }
}

/// This test binary's shared store.
pub fn shared_store() -> &'static SharedStore {
    static S: OnceLock<SharedStore> = OnceLock::new();
    S.get_or_init(|| {
        let base = scratch_base().join("shared");
        std::fs::create_dir_all(&base).expect("create shared dir");
        let key = keygen(&base, "publisher");
        SharedStore {
            dir: base.join("store"),
            key,
            published: Mutex::new(BTreeSet::new()),
        }
    })
}

/// A scratch node root: a copy of TREE that trusts KEY.
#[track_caller]
pub fn make_root(tree: &Path, dst: &Path, key: &Key) {
    copy_tree(tree, dst);
    trust(dst, key);
}

/// A scratch node installed at image ID: a copy of its tree that trusts
/// the store's key, adopted by an apply of ID (so the node's current image,
/// state and /etc/image_id are ID's).
#[track_caller]
pub fn install_root(store: &SharedStore, id: &str, dst: &Path) -> PathBuf {
    let tree = store.image(id);
    make_root(&tree, dst, &store.key);
    let out = apply(&store.dir, id, dst, &[]).expect_ok();
    assert_eq!(
        image_id(dst).as_deref(),
        Some(id),
        "applying {id} to a copy of {id} must record /etc/image_id (adoption)\n{}",
        out.describe()
    );
    tree
}

/// The update s1 -> s2 is committed: /etc/image_id, content only s2 has,
/// and `verify` clean. (For tests whose subject is not the content itself;
/// full convergence is checked by [`assert_applied`] in tests/engine.rs.)
#[track_caller]
pub fn assert_committed_s2(root: &Path, context: &str) {
    assert_eq!(
        image_id(root).as_deref(),
        Some("s2"),
        "{context}: /etc/image_id"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("new/p/one"))
            .ok()
            .as_deref(),
        Some("new 1\n"),
        "{context}: new/p/one"
    );
    assert!(
        root.join("types/file2dir").is_dir(),
        "{context}: types/file2dir is not a directory"
    );
    assert!(!root.join("gone").exists(), "{context}: gone/ still exists");
    let v = verify(root, false);
    assert_eq!(
        v.code(),
        Some(EXIT_OK),
        "{context}: verify after the apply\n{}",
        v.describe()
    );
}

/// Object path in a store for a sha256 hex digest.
pub fn object_path(store: &Path, sha256: &str) -> PathBuf {
    store.join("objects").join(&sha256[..2]).join(sha256)
}

/// Read and decompress STORE/images/ID/manifest.json.zst.
pub fn read_manifest(store: &Path, id: &str) -> serde_json::Value {
    let p = store.join("images").join(id).join("manifest.json.zst");
    let raw = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    let json =
        zstd::decode_all(&raw[..]).unwrap_or_else(|e| panic!("{} is not zstd: {e}", p.display()));
    serde_json::from_slice(&json).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

/// A manifest entry's path as bytes (string or {"hex": ...}).
pub fn entry_path(e: &serde_json::Value) -> Vec<u8> {
    match &e["path"] {
        serde_json::Value::String(s) => s.as_bytes().to_vec(),
        v => {
            let h = v["hex"]
                .as_str()
                .unwrap_or_else(|| panic!("bad entry path {v}"));
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex"))
                .collect()
        }
    }
}

// ---------------------------------------------------------------------------
// Mounts.

fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// (mount point, per-mount options, superblock options) of every mount.
pub fn mountinfo() -> Vec<(PathBuf, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((
                unescape_mountinfo(f.get(4)?),
                f.get(5)?.to_string(),
                f.get(sep + 3).unwrap_or(&"").to_string(),
            ))
        })
        .collect()
}

/// Mount points at or below DIR, in mount order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mountinfo()
        .into_iter()
        .map(|m| m.0)
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Whether the topmost mount at MNT is read-only (per-mount flag), or
/// None when nothing is mounted there.
pub fn mount_readonly(mnt: &Path) -> Option<bool> {
    mountinfo()
        .into_iter()
        .rfind(|m| m.0 == mnt)
        .map(|m| m.1.split(',').any(|o| o == "ro"))
}

/// A loop-mounted ext4 filesystem, unmounted when dropped.
pub struct LoopFs {
    pub img: PathBuf,
    pub mnt: PathBuf,
    mounted: bool,
}

impl LoopFs {
    /// Make an ext4 image of SIZE_MB in DIR (populated from TREE with
    /// `mkfs.ext4 -d` when given) and mount it at DIR/mnt, read-only if RO.
    #[track_caller]
    pub fn create(dir: &Path, size_mb: u64, tree: Option<&Path>, ro: bool) -> LoopFs {
        let img = dir.join("fs.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).expect("create mount point");
        // -m 0: no blocks reserved for root (the tests run as root, and
        // free-space tests need "full" to mean full).
        let mut args: Vec<OsString> = ["-q", "-F", "-t", "ext4", "-I", "256", "-m", "0"]
            .iter()
            .map(OsString::from)
            .collect();
        if let Some(t) = tree {
            args.push("-d".into());
            args.push(t.as_os_str().to_owned());
        }
        args.push(img.as_os_str().to_owned());
        args.push(format!("{size_mb}M").into());
        cmd("mkfs.ext4", args);
        let opts = if ro { "loop,ro" } else { "loop" };
        cmd(
            "mount",
            [
                OsStr::new("-o"),
                OsStr::new(opts),
                img.as_os_str(),
                mnt.as_os_str(),
            ],
        );
        let fs = LoopFs {
            img,
            mnt,
            mounted: true,
        };
        assert_eq!(
            mount_readonly(&fs.mnt),
            Some(ro),
            "mount state of {}",
            fs.mnt.display()
        );
        fs
    }

    /// Remount read-only or read-write.
    #[track_caller]
    pub fn remount(&self, ro: bool) {
        let opts = if ro { "remount,ro" } else { "remount,rw" };
        cmd(
            "mount",
            [OsStr::new("-o"), OsStr::new(opts), self.mnt.as_os_str()],
        );
    }

    /// Read-only state from /proc/self/mountinfo.
    pub fn readonly(&self) -> Option<bool> {
        mount_readonly(&self.mnt)
    }

    /// Unmount now (idempotent).
    pub fn umount(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.mnt)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
            self.mounted = false;
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        self.umount();
    }
}

// ---------------------------------------------------------------------------
// Misc.

/// A small deterministic PRNG (xorshift64*), so randomised tests replay.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Write an executable shell script.
pub fn write_script(path: &Path, body: &str) {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).expect("create script dir");
    }
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
}

/// Remove the update deltas (`images/*/deltas/`) from STORE, a private
/// (hard-linked) copy: nodes then update through packs, loose objects and
/// manifest frames, as from a store published without `--parent`.
pub fn hide_deltas(store: &Path) {
    let Ok(images) = std::fs::read_dir(store.join("images")) else {
        return;
    };
    for e in images.flatten() {
        let d = e.path().join("deltas");
        if d.is_dir() {
            std::fs::remove_dir_all(&d)
                .unwrap_or_else(|err| panic!("removing {}: {err}", d.display()));
        }
    }
}

/// A hard-linked copy of the shared store at DST without update deltas
/// (see [`hide_deltas`]), holding at least images v1, v2 and v3.
pub fn shared_store_without_deltas(dst: &Path) -> PathBuf {
    let store = shared_store();
    for id in ["v1", "v2", "v3"] {
        store.image(id);
    }
    cmd(
        "cp",
        [OsStr::new("-al"), store.dir.as_os_str(), dst.as_os_str()],
    );
    hide_deltas(dst);
    dst.to_path_buf()
}
