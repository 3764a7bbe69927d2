//! Getting imageupd onto nodes and seeing it work (issue 14): the Debian
//! package installed into a chroot of the v1 fixture tree and removed
//! again; a golden image built with the diskimage-builder element,
//! published and applied onto a v1 root; the node's metrics textfile after
//! an apply and `serve`'s /metrics after traffic, checked by promtool and
//! against the numbers `apply --json` reports.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::serve::Server;
use common::*;

// ---------------------------------------------------------------------------
// Helpers.

/// The .deb of the binary under test (`packaging/deb/build.sh --binary`,
/// through tests/fixtures/build-dib-image.sh --deb-only, which caches it by
/// the binary's digest: in CI, .ci/run's background build of the
/// diskimage-builder fixture has made it already); its path.
fn deb() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let t = Instant::now();
        let o = Run::new(repo_root().join("tests/fixtures/build-dib-image.sh"))
            .arg("--binary")
            .arg(bin())
            .arg("--deb-only")
            // xz of a 20 MiB binary: ~1 min on an idle CI machine, far
            // more on a loaded one.
            .timeout(Duration::from_secs(1200))
            .ok();
        let p = PathBuf::from(o.stdout.trim());
        let size = std::fs::metadata(&p)
            .unwrap_or_else(|e| {
                panic!(
                    "build-dib-image.sh printed {}: {e}\n{}",
                    p.display(),
                    o.describe()
                )
            })
            .len();
        eprintln!(
            "the .deb {} ({} KiB) ready in {:.1?}",
            p.display(),
            size / 1024,
            t.elapsed()
        );
        p
    })
}

/// `chroot ROOT ARGS...`.
fn chroot<I, S>(root: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Run::new("chroot")
        .arg(root)
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DEBIAN_FRONTEND", "noninteractive")
}

/// The samples of a text exposition: `name{labels}` to value (labels as
/// written).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let v: f64 = v
                .parse()
                .unwrap_or_else(|e| panic!("bad value in {l:?}: {e}"));
            (k.to_string(), v)
        })
        .collect()
}

/// The sum of the samples of family NAME.
fn sum(s: &BTreeMap<String, f64>, name: &str) -> f64 {
    s.iter()
        .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// `promtool check metrics` on TEXT: (exit code, its output).
fn promtool(text: &str, dir: &Path) -> (Option<i32>, String) {
    let f = dir.join(format!("promtool-{}.prom", std::process::id()));
    std::fs::write(&f, text).expect("write exposition");
    let o = Run::new("bash")
        .arg("-c")
        .arg("promtool check metrics < \"$1\"")
        .arg("promtool")
        .arg(&f)
        .run();
    (o.code(), o.all_output())
}

#[track_caller]
fn assert_promtool_clean(text: &str, dir: &Path, what: &str) {
    let (code, out) = promtool(text, dir);
    assert_eq!(
        code,
        Some(0),
        "promtool check metrics refused {what}:\n{out}\n{text}"
    );
    assert!(
        out.trim().is_empty(),
        "promtool has remarks on {what}:\n{out}"
    );
}

/// The `--progress-fd` stream of an apply from a URL: JSON lines, the
/// phases, the download task complete (its objects those `apply --json`
/// reports), and the result last.
#[track_caller]
fn assert_progress_lines(text: &str, download: &serde_json::Value) {
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let phases: Vec<&str> = lines
        .iter()
        .filter(|l| l["type"] == "phase")
        .filter_map(|l| l["phase"].as_str())
        .collect();
    for p in [
        "planned", "fetched", "staged", "quiesced", "swapped", "resumed",
    ] {
        assert!(phases.contains(&p), "phase {p} missing: {phases:?}");
    }
    let done = lines
        .iter()
        .find(|l| l["type"] == "bytes" && l["task"] == "download" && l["done"] == true)
        .unwrap_or_else(|| panic!("no finished download task in\n{text}"));
    assert_eq!(done["bytes"], done["bytes_total"], "{done}");
    assert_eq!(done["objects"], download["objects"], "{done} vs {download}");
    assert_eq!(
        done["objects_total"], download["objects"],
        "{done} vs {download}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "bytes" && l["task"] == "staging" && l["done"] == true),
        "no finished staging task in\n{text}"
    );
    let last = lines.last().expect("progress lines");
    assert_eq!(last["type"], "result", "{last}");
    assert_eq!(last["result"], "applied", "{last}");
}

/// `curl -fsS URL`.
#[track_caller]
fn get(url: &str) -> String {
    cmd("curl", ["-fsS", "--max-time", "20", url])
}

// ---------------------------------------------------------------------------
// The Debian package.

/// Every file the package must ship, below the root.
const PACKAGED: &[&str] = &[
    "usr/bin/imageupd",
    "usr/lib/systemd/system/imageupd-agent.service",
    "usr/lib/systemd/system/imageupd-boot-check.service",
    "usr/lib/systemd/system/imageupd-publisher.service",
    "usr/libexec/os-refresh-config/pre-configure.d/50-imageupd-stage",
    "usr/libexec/os-refresh-config/configure.d/10-imageupd-apply",
    "usr/share/imageupd/hooks/README.md",
    "usr/share/imageupd/hooks/pre-apply.d/10-stop-units",
    "usr/share/imageupd/hooks/post-apply.d/10-daemon-reload",
    "usr/share/imageupd/hooks/post-apply.d/50-configure",
    "usr/share/imageupd/hooks/post-apply.d/90-start-units",
    "usr/share/imageupd/hooks/abort.d/90-start-units",
    "usr/share/man/man1/imageupd.1.gz",
    "usr/share/man/man1/imageupd-apply.1.gz",
    "usr/share/man/man1/imageupd-fleet.1.gz",
    "usr/share/bash-completion/completions/imageupd",
    "usr/share/zsh/vendor-completions/_imageupd",
    "usr/share/fish/vendor_completions.d/imageupd.fish",
    "usr/share/doc/imageupd/copyright",
    "etc/imageupd/config.toml",
];

/// The package in a chroot of a bookworm fixture tree with systemd: the
/// VM tests' k47 (v1 plus systemd and a kernel; v1 itself is minbase,
/// without systemd, so `systemd-analyze verify` could not resolve even
/// sysinit.target in it).
#[test]
fn deb_installs_into_a_fixture_chroot_and_removes_cleanly() {
    let s = scratch("deb");
    let root = s.join("root");
    let k47 = common::vm::vm_trees().join("k47");
    copy_tree(&k47, &root);
    let deb = deb();
    std::fs::copy(deb, root.join("tmp/imageupd.deb")).expect("copy the .deb into the chroot");

    let o = chroot(&root, ["dpkg", "-i", "/tmp/imageupd.deb"]).ok();
    assert!(
        !o.all_output().contains("daemon-reload"),
        "postinst must not call systemctl without a running systemd\n{}",
        o.describe()
    );
    for f in PACKAGED {
        assert!(root.join(f).exists(), "{f} is not installed");
    }
    for f in [
        "usr/bin/imageupd",
        "usr/libexec/os-refresh-config/configure.d/10-imageupd-apply",
        "usr/share/imageupd/hooks/pre-apply.d/10-stop-units",
    ] {
        let m = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(root.join(f)).unwrap().permissions(),
        );
        assert_eq!(m & 0o777, 0o755, "{f} mode");
    }
    for d in [
        "var/lib/imageupd",
        "etc/imageupd/config.d",
        "etc/imageupd/trusted.d",
    ] {
        assert!(root.join(d).is_dir(), "{d} is not created");
    }
    // Nothing enabled, nothing started.
    assert!(
        !root
            .join("etc/systemd/system/multi-user.target.wants/imageupd-agent.service")
            .exists(),
        "installing the package must not enable the agent"
    );
    let st = chroot(
        &root,
        [
            "dpkg-query",
            "-W",
            "-f",
            "${Status} ${Conffiles}",
            "imageupd",
        ],
    )
    .ok();
    assert!(
        st.stdout.starts_with("install ok installed")
            && st.stdout.contains("/etc/imageupd/config.toml"),
        "dpkg status and conffiles: {}",
        st.stdout
    );

    // The binary runs in the chroot, and reads the packaged default
    // configuration (every key commented: the defaults).
    let v = chroot(&root, ["/usr/bin/imageupd", "--version"]).ok();
    assert_eq!(
        v.stdout.trim(),
        format!("imageupd {}", env!("CARGO_PKG_VERSION"))
    );
    let c = chroot(&root, ["imageupd", "config", "--json"]).ok();
    assert_eq!(c.json()["kernel_policy"], "kexec", "{}", c.describe());
    assert_eq!(
        c.json()["sources"][0],
        "/etc/imageupd/config.toml",
        "{}",
        c.describe()
    );

    // The units as installed.
    let units: Vec<String> = [
        "imageupd-agent",
        "imageupd-boot-check",
        "imageupd-publisher",
    ]
    .iter()
    .map(|u| format!("/usr/lib/systemd/system/{u}.service"))
    .collect();
    let o = Run::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(&units)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .run();
    assert_eq!(
        o.code(),
        Some(0),
        "systemd-analyze verify\n{}",
        o.describe()
    );
    assert!(
        !o.stderr.contains("imageupd"),
        "systemd-analyze has remarks on the units\n{}",
        o.describe()
    );

    // One man page for imageupd and each visible subcommand (nested ones
    // too), each rendering without a warning.
    let pages: Vec<PathBuf> = std::fs::read_dir(root.join("usr/share/man/man1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("imageupd")
        })
        .collect();
    let help = imageupd(["--help"]).ok().stdout;
    let subs: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  ") || l.is_empty())
        // Command names are indented two spaces; wrapped descriptions more.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(subs.contains(&"apply") && subs.contains(&"serve"), "{help}");
    for sub in &subs {
        let p = root.join(format!("usr/share/man/man1/imageupd-{sub}.1.gz"));
        assert!(pages.contains(&p), "no man page for `imageupd {sub}`");
    }
    assert!(
        !pages
            .iter()
            .any(|p| p.to_string_lossy().contains("fault-points")
                || p.to_string_lossy().contains("generate-docs")),
        "hidden commands get no man page: {pages:?}"
    );
    for p in &pages {
        let o = Run::new("man")
            .arg("-l")
            .arg(p)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_STDERR", "1")
            .run();
        assert_eq!(
            o.code(),
            Some(0),
            "man -l {}\n{}",
            p.display(),
            o.describe()
        );
        assert!(
            o.stdout.contains("NAME")
                && o.stdout.contains("SYNOPSIS")
                && o.stdout.contains("imageupd"),
            "man -l {} renders no page\n{}",
            p.display(),
            clip(&o.stdout, 20)
        );
        assert!(
            o.stderr.trim().is_empty(),
            "man -l {} warns\n{}",
            p.display(),
            o.stderr
        );
    }
    let apply_page = Run::new("man")
        .arg("-l")
        .arg(root.join("usr/share/man/man1/imageupd-apply.1.gz"))
        .env("MANPAGER", "cat")
        .ok()
        .stdout;
    assert!(
        apply_page.contains("--from-metadata") && apply_page.contains("--kernel-policy"),
        "imageupd-apply(1) lacks the options:\n{}",
        clip(&apply_page, 40)
    );

    // The bash completions load and complete subcommands and options.
    let comp = root.join("usr/share/bash-completion/completions/imageupd");
    let o = Run::new("bash")
        .arg("-c")
        .arg(
            r#"source "$1" && complete -p imageupd &&
               COMP_WORDS=(imageupd ap); COMP_CWORD=1; COMP_LINE="imageupd ap"; COMP_POINT=11;
               _imageupd imageupd ap imageupd; echo "sub: ${COMPREPLY[*]}";
               COMP_WORDS=(imageupd apply --from-m); COMP_CWORD=2; COMP_LINE="imageupd apply --from-m"; COMP_POINT=23;
               _imageupd imageupd --from-m apply; echo "opt: ${COMPREPLY[*]}""#,
        )
        .arg("bash")
        .arg(&comp)
        .ok();
    assert!(
        o.stdout.contains("-F _imageupd imageupd") && o.stdout.contains("sub: apply"),
        "bash completion of subcommands\n{}",
        o.describe()
    );
    assert!(
        o.stdout.contains("opt: --from-metadata"),
        "bash completion of options\n{}",
        o.describe()
    );
    // zsh and fish files are what those shells load (their syntax is
    // checked only by name and head here: neither shell is installed).
    let z =
        std::fs::read_to_string(root.join("usr/share/zsh/vendor-completions/_imageupd")).unwrap();
    assert!(z.starts_with("#compdef imageupd"), "{}", clip(&z, 3));
    let f = std::fs::read_to_string(root.join("usr/share/fish/vendor_completions.d/imageupd.fish"))
        .unwrap();
    assert!(f.contains("complete -c imageupd"), "{}", clip(&f, 3));

    // Removal: every packaged file goes except the conffile.
    std::fs::write(
        root.join("etc/imageupd/config.d/50-local.toml"),
        "threads = 1\n",
    )
    .unwrap();
    chroot(&root, ["dpkg", "-r", "imageupd"]).ok();
    for f in PACKAGED.iter().filter(|f| !f.starts_with("etc/")) {
        assert!(!root.join(f).exists(), "{f} is still there after dpkg -r");
    }
    assert!(
        root.join("etc/imageupd/config.toml").is_file(),
        "dpkg -r must keep the conffile"
    );
    assert!(
        root.join("etc/imageupd/config.d/50-local.toml").is_file(),
        "dpkg -r must keep the operator's fragments"
    );
    let st = chroot(&root, ["dpkg-query", "-W", "-f", "${Status}", "imageupd"]).ok();
    assert_eq!(st.stdout, "deinstall ok config-files");
}

// ---------------------------------------------------------------------------
// Metrics.

#[test]
fn metrics_after_apply_and_of_serve_pass_promtool_and_match_apply_json() {
    let s = scratch("metrics");
    let store = shared_store();
    store.image("v2");

    // promtool catches what it must (positive control of the checker).
    let (code, out) = promtool(
        "# TYPE imageupd_bad counter\nimageupd_bad 1\nimageupd_bad 2\n",
        s.path(),
    );
    assert_ne!(
        code,
        Some(0),
        "promtool accepted a counter without _total, twice: {out}"
    );

    let mut srv = Server::start(
        &store.dir,
        "127.0.0.1:0",
        &["--metrics-listen".as_ref(), "127.0.0.1:0".as_ref()],
        &s.join("serve.log"),
    );
    let murl = srv
        .line
        .split("metrics on ")
        .nth(1)
        .unwrap_or_else(|| panic!("no metrics address in {:?}", srv.line))
        .to_string();
    let before = get(&murl);
    assert_promtool_clean(&before, s.path(), "serve's /metrics before traffic");
    assert_eq!(sum(&samples(&before), "imageupd_serve_requests_total"), 0.0);
    // With --metrics-listen the store's listener does not answer /metrics.
    let o = Run::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{}metrics", srv.url))
        .ok();
    assert_eq!(o.stdout, "404");
    // ... and counts that answer (kind other, 4xx): the baseline.
    let base = samples(&get(&murl));
    assert_eq!(
        base["imageupd_serve_requests_total{kind=\"other\",status=\"4xx\"}"],
        1.0
    );

    // A node at v1, its textfile where node_exporter reads it.
    let root = s.join("root");
    node_at_v1(&root);
    std::fs::create_dir_all(root.join("etc/imageupd/config.d")).unwrap();
    std::fs::write(
        root.join("etc/imageupd/config.d/50-metrics.toml"),
        "metrics_file = \"/var/lib/node-exporter/imageupd.prom\"\n",
    )
    .unwrap();
    let tf = root.join("var/lib/node-exporter/imageupd.prom");
    assert!(!tf.exists());
    let pf = s.join("progress.jsonl");
    let out = Run::new("bash")
        .arg("-c")
        .arg(
            "exec \"$1\" apply --from \"$2\" --id v2 --root \"$3\" --json --progress-fd 3 3>\"$4\"",
        )
        .arg("bash")
        .arg(bin())
        .arg(&srv.url)
        .arg(&root)
        .arg(&pf)
        .ok();
    let j = out.json();
    assert_eq!(j["result"], "applied", "{}", out.describe());
    let d = &j["download"];
    assert_progress_lines(&std::fs::read_to_string(&pf).unwrap(), d);
    let text = std::fs::read_to_string(&tf).expect("the textfile after an apply");
    assert_promtool_clean(&text, s.path(), "the node's textfile");
    let m = samples(&text);
    let want = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("{k} missing from\n{text}"))
    };
    assert_eq!(want("imageupd_image_info{image=\"v2\"}"), 1.0);
    assert_eq!(want("imageupd_last_apply_result{result=\"applied\"}"), 1.0);
    assert_eq!(want("imageupd_last_apply_result{result=\"failed\"}"), 0.0);
    assert_eq!(
        want("imageupd_last_apply_fetched_bytes"),
        d["bytes"].as_f64().unwrap()
    );
    assert_eq!(
        want("imageupd_last_apply_fetch_requests"),
        d["requests"].as_f64().unwrap()
    );
    assert_eq!(
        want("imageupd_last_apply_fetched_objects"),
        d["objects"].as_f64().unwrap()
    );
    assert!(d["bytes"].as_u64().unwrap() > 0, "{d}");
    assert_eq!(
        want("imageupd_last_apply_quiesce_seconds"),
        j["quiesce_ms"].as_f64().unwrap() / 1000.0
    );
    assert_eq!(
        want("imageupd_last_apply_duration_seconds"),
        j["total_ms"].as_f64().unwrap() / 1000.0
    );
    for (phase, ms) in j["phases"].as_object().unwrap() {
        assert_eq!(
            want(&format!(
                "imageupd_last_apply_phase_seconds{{phase=\"{phase}\"}}"
            )),
            ms.as_f64().unwrap() / 1000.0
        );
    }
    assert_eq!(want("imageupd_reboot_required"), 0.0);
    assert_eq!(want("imageupd_agent_failing_targets"), 0.0);
    let t = want("imageupd_last_apply_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 600.0..=now + 1.0).contains(&t),
        "timestamp {t}, now {now}"
    );

    // The server counted the same traffic.
    let after = get(&murl);
    assert_promtool_clean(&after, s.path(), "serve's /metrics after traffic");
    let sm = samples(&after);
    let since = |name: &str| sum(&sm, name) - sum(&base, name);
    assert_eq!(
        since("imageupd_serve_response_bytes_total"),
        d["bytes"].as_f64().unwrap(),
        "serve's bytes vs apply --json's download.bytes\n{after}"
    );
    assert_eq!(
        since("imageupd_serve_requests_total"),
        d["requests"].as_f64().unwrap(),
        "serve's requests vs apply --json's download.requests\n{after}"
    );
    assert_eq!(sm["imageupd_serve_requests_in_flight"], 0.0);
    assert_eq!(sm["imageupd_serve_errors_total"], 0.0);
    let objects = sm["imageupd_serve_requests_total{kind=\"object\",status=\"2xx\"}"]
        + sm["imageupd_serve_requests_total{kind=\"pack\",status=\"2xx\"}"]
        + sm["imageupd_serve_requests_total{kind=\"delta\",status=\"2xx\"}"];
    assert!(objects >= 1.0, "no content request counted\n{after}");

    // A refused path and a missing image count as 4xx; a failed apply
    // shows in the textfile.
    let o = imageupd([
        "apply",
        "--from",
        &srv.url,
        "--id",
        "no-such-image",
        "--root",
    ])
    .arg(&root)
    .run();
    assert_ne!(o.code(), Some(0), "{}", o.describe());
    let text = std::fs::read_to_string(&tf).unwrap();
    assert_promtool_clean(&text, s.path(), "the textfile after a failure");
    let m = samples(&text);
    assert_eq!(
        m["imageupd_last_apply_result{result=\"failed\"}"], 1.0,
        "{text}"
    );
    assert_eq!(m["imageupd_image_info{image=\"v2\"}"], 1.0, "{text}");
    let failed = samples(&get(&murl));
    let fourxx = |m: &BTreeMap<String, f64>| -> f64 {
        m.iter()
            .filter(|(k, _)| {
                k.starts_with("imageupd_serve_requests_total{") && k.contains("status=\"4xx\"")
            })
            .map(|(_, v)| v)
            .sum()
    };
    assert!(
        fourxx(&failed) > fourxx(&sm),
        "the failed lookup is not counted as 4xx: {failed:?}"
    );
    srv.term();

    // Without --metrics-listen, /metrics is on the store's listener.
    let srv2 = Server::local(&store.dir, &s.join("serve2.log"));
    let text = get(&format!("{}metrics", srv2.url));
    assert_promtool_clean(&text, s.path(), "/metrics on the store's listener");
    assert!(text.contains("# TYPE imageupd_serve_requests_total counter"));
}

// ---------------------------------------------------------------------------
// The diskimage-builder element.

/// The element's settings for the image build.
struct ElementEnv {
    key: Key,
    config: String,
}

impl ElementEnv {
    fn vars(&self, mode: &str) -> Vec<(String, String)> {
        vec![
            ("IMAGEUPD_DEB".into(), deb().display().to_string()),
            ("IMAGEUPD_MODE".into(), mode.into()),
            (
                "IMAGEUPD_TRUSTED_KEY".into(),
                self.key.public.display().to_string(),
            ),
            ("IMAGEUPD_CONFIG".into(), self.config.clone()),
        ]
    }
}

/// The venv tests/setup.sh installs diskimage-builder into.
fn venv() -> PathBuf {
    PathBuf::from(std::env::var("IMAGEUPD_TEST_VENV").unwrap_or("/opt/imageupd-venv".into()))
}

/// Build TREE with the element's scripts run the way diskimage-builder
/// runs them (environment.d sourced, extra-data.d on the host with
/// TMP_HOOKS_PATH, install.d inside the chroot by dib-run-parts), on a
/// copy of the v1 fixture tree.
fn element_in_chroot(tree: &Path, hooks: &Path, env: &[(String, String)]) -> Out {
    let element = repo_root().join("packaging/dib/imageupd");
    let drp = venv().join("bin/dib-run-parts");
    assert!(
        drp.is_file(),
        "{} missing: run tests/setup.sh fixtures",
        drp.display()
    );
    let mut r = Run::new("bash")
        .arg("-c")
        .arg(
            r#"set -euo pipefail
            element=$1 tree=$2 hooks=$3 drp=$4
            for f in "$element"/environment.d/*; do source "$f"; done
            export TMP_HOOKS_PATH=$hooks
            mkdir -p "$hooks"
            "$drp" "$element/extra-data.d"
            cp -a "$element/install.d" "$hooks/install.d"
            rm -rf "$tree/tmp/in_target.d"
            cp -a "$hooks" "$tree/tmp/in_target.d"
            cp "$drp" "$tree/tmp/in_target.d/dib-run-parts"
            chroot "$tree" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin IMAGEUPD_MODE="$IMAGEUPD_MODE" \
                bash /tmp/in_target.d/dib-run-parts /tmp/in_target.d/install.d
            rm -rf "$tree/tmp/in_target.d""#,
        )
        .arg("element")
        .arg(&element)
        .arg(tree)
        .arg(hooks)
        .arg(&drp);
    for (k, v) in env {
        r = r.env(k, v);
    }
    r.timeout(Duration::from_secs(300)).run()
}

/// tests/fixtures/build-dib-image.sh's image for the binary under test: a
/// real `disk-image-create -t tar debian-minimal imageupd` (agent mode, the
/// fixture's key, its `[agent]`/`[rollout]` config), cached by the
/// binary's digest. `.ci/run` starts that build in the background as soon
/// as the test binaries are compiled; this waits for it (the script's
/// lock), or builds it when nothing did. A failed build panics with the
/// end of diskimage-builder's log.
struct DibImage {
    /// image.tar, imageupd.deb, keys/, build.log.
    dir: PathBuf,
    /// The publisher key the element installed into the image.
    key: Key,
}

fn dib_image() -> DibImage {
    let t = Instant::now();
    let o = Run::new(repo_root().join("tests/fixtures/build-dib-image.sh"))
        .arg("--binary")
        .arg(bin())
        // Waiting for the background build and, when there was none, a
        // build of our own: ~5 min on an idle CI machine.
        .timeout(Duration::from_secs(2400))
        .ok();
    let dir = PathBuf::from(o.stdout.trim());
    assert!(
        dir.join("image.tar").is_file(),
        "build-dib-image.sh printed {}\n{}",
        dir.display(),
        o.describe()
    );
    eprintln!(
        "diskimage-builder image {} ready after {:.1?} (waited or built)",
        dir.display(),
        t.elapsed()
    );
    let key = Key {
        secret: dir.join("keys/publisher"),
        public: dir.join("keys/publisher.pub"),
    };
    DibImage { dir, key }
}

/// The element's settings used by the tests: the publisher's key, an
/// `[agent]` and a `[rollout]` table.
fn element_env(key: &Key, mode: &str) -> ElementEnv {
    ElementEnv {
        key: key.clone(),
        config: format!(
            "[agent]\ndefault_source = \"https://images.example/store\"\n\n[rollout]\n\
             etcd = [\"http://10.0.0.1:2379\"]\ngroup = \"compute\"\nmax_unavailable = 2\n# {mode}\n"
        ),
    }
}

/// UNIT is enabled in TREE: its multi-user.target.wants link resolves,
/// inside the tree, to the packaged unit (systemctl may write the /lib or
/// the /usr/lib path: the same file on a merged-/usr tree).
#[track_caller]
fn assert_enabled(tree: &Path, unit: &str) {
    let link = tree
        .join("etc/systemd/system/multi-user.target.wants")
        .join(unit);
    let target = std::fs::read_link(&link)
        .unwrap_or_else(|e| panic!("{unit} is not enabled ({}: {e})", link.display()));
    // Resolve the target inside the tree, following the tree's own
    // relative links (lib -> usr/lib), never the host's.
    let mut cur = tree.to_path_buf();
    for c in target.strip_prefix("/").unwrap_or(&target).components() {
        cur.push(c);
        if let Ok(t) = std::fs::read_link(&cur) {
            assert!(t.is_relative(), "{} is an absolute link", cur.display());
            cur.pop();
            cur.push(t);
        }
    }
    let want = tree.join("usr/lib/systemd/system").join(unit);
    assert!(want.is_file(), "{} missing", want.display());
    assert_eq!(
        std::fs::canonicalize(&cur).ok(),
        std::fs::canonicalize(&want).ok(),
        "{unit} link {} does not name the packaged unit",
        target.display()
    );
}

/// The image tree has imageupd installed and set up as the element was
/// told (MODE agent or orc).
#[track_caller]
fn assert_element_applied(tree: &Path, key: &Key, mode: &str) {
    assert!(tree.join("usr/bin/imageupd").is_file());
    let st = chroot(tree, ["dpkg-query", "-W", "-f", "${Status}", "imageupd"]).ok();
    assert_eq!(st.stdout, "install ok installed");
    let agent = "imageupd-agent.service";
    match mode {
        "agent" => assert_enabled(tree, agent),
        _ => assert!(
            !tree
                .join("etc/systemd/system/multi-user.target.wants")
                .join(agent)
                .exists(),
            "{mode} mode leaves the agent disabled"
        ),
    }
    assert_enabled(tree, "imageupd-boot-check.service");
    let kname = key.public.file_name().unwrap();
    assert_eq!(
        std::fs::read(tree.join("etc/imageupd/trusted.d").join(kname)).unwrap(),
        std::fs::read(&key.public).unwrap(),
        "the trusted key"
    );
    let c = imageupd(["config", "--json", "--root"])
        .arg(tree)
        .ok()
        .json();
    assert_eq!(c["agent"]["default_source"], "https://images.example/store");
    assert_eq!(c["rollout"]["group"], "compute");
}

/// diskimage-builder from PyPI built a debian-minimal filesystem image (a
/// tarball) with the element (agent mode, a key and a config); it is
/// published, signed by that key, and applied onto a v1 root, which then
/// runs imageupd, enabled.
#[test]
fn dib_image_with_the_element_applies_onto_v1() {
    let s = scratch("dib");
    let img = dib_image();
    let key = &img.key;
    let tarball = img.dir.join("image.tar");
    let log = std::fs::read_to_string(img.dir.join("build.log")).unwrap();
    assert!(
        log.contains("diskimage-builder version")
            && log.contains("Expanded element dependencies to:")
            && log.contains("imageupd installed (agent mode)"),
        "not diskimage-builder's log of a build with the element:\n{}",
        clip(&log, 20)
    );

    // The image as diskimage-builder wrote it.
    let tree = s.join("image-tree");
    std::fs::create_dir_all(&tree).unwrap();
    cmd(
        "tar",
        [
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-xpf",
            &tarball.display().to_string(),
            "-C",
            &tree.display().to_string(),
        ],
    );
    assert!(
        tree.join("etc/debian_version").is_file() && tree.join("usr/bin/apt-get").is_file(),
        "not a Debian tree"
    );
    assert_element_applied(&tree, key, "agent");
    let v = chroot(&tree, ["imageupd", "--version"]).ok();
    assert_eq!(
        v.stdout.trim(),
        format!("imageupd {}", env!("CARGO_PKG_VERSION"))
    );

    // Publish the golden image (the tarball diskimage-builder wrote) and
    // apply it onto a v1 root.
    let store = s.join("store");
    let t = Instant::now();
    publish(&store, "golden", Some(key), None, &tarball);
    let root = s.join("root");
    make_root(&fixture_tree("v1"), &root, key);
    assert!(!root.join("usr/bin/imageupd").exists());
    let out = apply(&store, "golden", &root, &[]).expect_ok();
    assert_eq!(out.json()["result"], "applied", "{}", out.describe());
    eprintln!("published and applied the dib image in {:.1?}", t.elapsed());
    assert_applied(&tree, &root, "golden", "the dib image applied onto v1");
    let v = chroot(&root, ["imageupd", "--version"]).ok();
    assert_eq!(
        v.stdout.trim(),
        format!("imageupd {}", env!("CARGO_PKG_VERSION"))
    );
    assert_enabled(&root, "imageupd-agent.service");
    assert_enabled(&root, "imageupd-boot-check.service");
    let st = chroot(&root, ["dpkg-query", "-W", "-f", "${Status}", "imageupd"]).ok();
    assert_eq!(st.stdout, "install ok installed");
    // /etc/imageupd is node-local (preserved): an updated node keeps its
    // own keys and configuration; a node provisioned from the image gets
    // the image's.
    assert!(!root.join("etc/imageupd/config.d/50-dib.toml").exists());
}

/// The element's scripts run as diskimage-builder runs them, in a chroot
/// of a fixture tree with systemd (the VM tests' k47: v1 is minbase): the
/// os-refresh-config choice, and the settings it refuses (each would
/// otherwise make a node that cannot update).
#[test]
fn dib_element_orc_mode_and_refusals_in_a_chroot() {
    let s = scratch("element");
    let key = keygen(&s.join("keys"), "publisher");
    let tree = s.join("tree");
    let k47 = common::vm::vm_trees().join("k47");
    assert!(
        k47.join("usr/bin/systemctl").is_file(),
        "{} has no systemd: run tests/setup.sh fixtures",
        k47.display()
    );
    copy_tree(&k47, &tree);

    // Refusals first (the tree stays without imageupd when they fail
    // before dpkg): an unknown mode, a missing package, a bad config.
    let o = element_in_chroot(
        &tree,
        &s.join("h1"),
        &element_env(&key, "x").vars("neither"),
    );
    assert_ne!(
        o.code(),
        Some(0),
        "IMAGEUPD_MODE=neither must fail\n{}",
        o.describe()
    );
    assert!(
        o.stderr.contains("IMAGEUPD_MODE must be agent or orc"),
        "{}",
        o.describe()
    );
    let mut vars = element_env(&key, "x").vars("orc");
    vars[0].1 = s.join("missing.deb").display().to_string();
    let o = element_in_chroot(&tree, &s.join("h2"), &vars);
    assert_ne!(
        o.code(),
        Some(0),
        "a missing .deb must fail\n{}",
        o.describe()
    );
    assert!(!tree.join("usr/bin/imageupd").exists());
    let mut bad = element_env(&key, "x");
    bad.config = "[agent]\nno_such_key = 1\n".into();
    let o = element_in_chroot(&tree, &s.join("h3"), &bad.vars("orc"));
    assert_ne!(
        o.code(),
        Some(0),
        "a bad config must fail the build\n{}",
        o.describe()
    );
    assert!(o.all_output().contains("no_such_key"), "{}", o.describe());

    // Positive control: the same run with a good config.
    let o = element_in_chroot(&tree, &s.join("h4"), &element_env(&key, "orc").vars("orc"));
    assert_eq!(o.code(), Some(0), "the element's scripts\n{}", o.describe());
    assert!(
        o.stdout.contains("imageupd installed (orc mode)"),
        "{}",
        o.describe()
    );
    assert!(
        o.stderr.contains("os-refresh-config is not in the image"),
        "the orc warning\n{}",
        o.describe()
    );
    assert_element_applied(&tree, &key, "orc");
    assert!(tree
        .join("usr/libexec/os-refresh-config/configure.d/10-imageupd-apply")
        .is_file());
}
