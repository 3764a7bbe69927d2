//! A simulated fleet for the rollout tests: small synthetic images in a
//! signed store, and N nodes, each its own root directory, its own
//! `imageupd agent` process and its own tiny HTTP service (an `imageupd
//! serve` on a loopback port) that its pre-apply hook stops and its
//! post-apply hook starts again. Hooks append `node stop|start NANOS`
//! lines (one O_APPEND write each) to a shared events file.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::etcd::{EtcdServer, History, Keys};
use super::http::free_port;
use super::*;

/// The group every test node is in.
pub const GROUP: &str = "compute";
/// Key prefix the nodes use.
pub const PREFIX: &str = "/imageupd";

/// Wall clock in ns (what the hooks' `date +%s%N` writes).
pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

/// Write a small synthetic image tree for `id` (a few files, some shared
/// between ids, some not).
pub fn make_tree(dir: &Path, id: &str) {
    for (p, body) in [
        ("etc/app/version", id.to_string()),
        ("etc/app/shared.conf", "listen = 127.0.0.1\n".to_string()),
        (
            "usr/share/app/data-1",
            format!("payload one of {id}\n").repeat(200),
        ),
        ("usr/share/app/data-2", "unchanged payload\n".repeat(300)),
        ("usr/bin/app", format!("#!/bin/sh\necho app {id}\n")),
    ] {
        let f = dir.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, body).unwrap();
    }
    std::fs::set_permissions(
        dir.join("usr/bin/app"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("var/lib")).unwrap();
}

/// Settings of one fleet.
#[derive(Clone)]
pub struct FleetSpec {
    /// Number of nodes.
    pub nodes: usize,
    /// Extra `[rollout]` lines.
    pub rollout: String,
    /// Images to publish (the first is installed).
    pub images: Vec<String>,
    /// Lease, s.
    pub lease_secs: u64,
}

impl Default for FleetSpec {
    fn default() -> Self {
        FleetSpec {
            nodes: 12,
            rollout: "max_unavailable = 3\n".into(),
            images: vec!["A".into(), "B".into()],
            lease_secs: 3,
        }
    }
}

/// One node.
pub struct FleetNode {
    /// Its id (`node00` …).
    pub id: String,
    /// Its root.
    pub root: PathBuf,
    /// Its metadata file.
    pub meta: PathBuf,
    /// Its service's port.
    pub port: u16,
    /// Its directory (outside the root).
    pub dir: PathBuf,
    agent: Option<Child>,
}

impl FleetNode {
    /// Start its agent.
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let (mut c, _) = imageupd(["agent", "--root"]).arg(&self.root).into_command();
        c.env("IMAGEUPD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.agent = Some(c.spawn().expect("start agent"));
    }

    /// SIGKILL its agent.
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its agent's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Point its metadata at `id` (with extra top-level keys).
    pub fn want(&self, id: &str, store: &Path, extra: &serde_json::Value) {
        let mut doc = serde_json::json!({"image_id": id, "image_source": store});
        if let (Some(d), Some(e)) = (doc.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                d.insert(k.clone(), v.clone());
            }
        }
        let tmp = self.meta.with_extension("tmp");
        std::fs::write(&tmp, doc.to_string()).unwrap();
        std::fs::rename(&tmp, &self.meta).unwrap();
    }

    /// `etc/image_id`.
    pub fn image(&self) -> Option<String> {
        image_id(&self.root)
    }

    /// Write a health check.
    pub fn check(&self, kind: &str, name: &str, body: &str) {
        bash_script(
            &self
                .root
                .join("etc/imageupd/health.d")
                .join(format!("{kind}.d"))
                .join(name),
            body,
        );
    }

    /// Is its service up?
    pub fn up(&self) -> bool {
        port_up(self.port)
    }
}

impl FleetNode {
    /// The engine's runtime directory of this root (`/run/imageupd/roots/`
    /// and the first 16 hex digits of sha256 of the canonical root path).
    pub fn runtime_dir(&self) -> Option<PathBuf> {
        use sha2::Digest as _;
        use std::os::unix::ffi::OsStrExt as _;
        let canon = std::fs::canonicalize(&self.root).ok()?;
        let h = sha2::Sha256::digest(canon.as_os_str().as_bytes());
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        Some(Path::new("/run/imageupd/roots").join(&hex[..16]))
    }
}

impl Drop for FleetNode {
    fn drop(&mut self) {
        self.kill_agent();
        if let Some(rt) = self.runtime_dir() {
            if rt.join("fleet.json").exists() || rt.join("status.json").exists() {
                let _ = std::fs::remove_dir_all(rt);
            }
        }
        // The service, started by a hook, is not our child: its pid file.
        if let Ok(p) = std::fs::read_to_string(self.dir.join("svc.pid")) {
            if let Ok(pid) = p.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Whether 127.0.0.1:`port` accepts a connection.
pub fn port_up(port: u16) -> bool {
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok()
}

/// A `#!/bin/bash` script.
pub fn bash_script(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/bin/bash\nset -u\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A fleet: etcd, a store, nodes.
///
/// Fields drop in order: the nodes (agents, then services, by the pid
/// files in their directories) before etcd, and the scratch last.
pub struct Fleet {
    /// Nodes.
    pub nodes: Vec<FleetNode>,
    /// etcd.
    pub etcd: EtcdServer,
    /// The store.
    pub store: PathBuf,
    /// Image trees by id.
    pub trees: BTreeMap<String, PathBuf>,
    /// The events file.
    pub events: PathBuf,
    key: Key,
    /// Scratch (dropped last).
    pub s: Scratch,
}

impl Fleet {
    /// Build the fleet (nodes installed at the first image, services up,
    /// agents not started yet).
    pub fn new(name: &str, spec: &FleetSpec) -> Fleet {
        let s = scratch(name);
        let etcd = EtcdServer::start(name);
        let key = keygen(&s.join("keys"), "publisher");
        let store = s.join("store");
        let mut f = Fleet {
            events: s.join("events.log"),
            s,
            etcd,
            store,
            trees: BTreeMap::new(),
            nodes: Vec::new(),
            key,
        };
        for id in &spec.images {
            f.publish(id);
        }
        let first = spec.images[0].clone();
        for i in 0..spec.nodes {
            let n = f.make_node(i, &first, spec);
            f.nodes.push(n);
        }
        f
    }

    /// Publish image `id` (a synthetic tree).
    pub fn publish(&mut self, id: &str) {
        let t = self.s.join("trees").join(id);
        make_tree(&t, id);
        publish(&self.store, id, Some(&self.key), None, &t);
        self.trees.insert(id.to_string(), t);
    }

    fn make_node(&self, i: usize, first: &str, spec: &FleetSpec) -> FleetNode {
        let id = format!("node{i:02}");
        let dir = self.s.join(&id);
        let root = dir.join("root");
        std::fs::create_dir_all(&dir).unwrap();
        make_root(&self.trees[first], &root, &self.key);
        let port = free_port();
        let meta = dir.join("meta.json");
        let n = FleetNode {
            id: id.clone(),
            root: root.clone(),
            meta: meta.clone(),
            port,
            dir: dir.clone(),
            agent: None,
        };
        n.want(first, &self.store, &serde_json::json!({}));
        write_config(
            &root,
            &format!(
                "[agent]\nmetadata_file = \"{}\"\ndebounce_ms = 100\nrescan_secs = 1\nbackoff_min_secs = 1\nbackoff_max_secs = 2\n\n[health]\ntimeout_secs = 20\n\n[rollout]\netcd = [\"{}\"]\ngroup = \"{GROUP}\"\nprefix = \"{PREFIX}\"\nnode_id = \"{id}\"\nlease_secs = {}\npoll_ms = 200\n{}",
                meta.display(),
                self.etcd.url,
                spec.lease_secs,
                spec.rollout
            ),
        );
        // The service serves the fleet's store (any directory it accepts).
        let www = &self.store;
        let (ev, pidf) = (self.events.display(), dir.join("svc.pid"));
        let pidf = pidf.display();
        // Windows of 1, 1.5 or 2 s, so that they overlap.
        let pause = ["1", "1.5", "2"][i % 3];
        let svc = format!(
            "nohup {bin} serve --store {www} --listen 127.0.0.1:{port} >/dev/null 2>&1 &\necho $! > {pidf}\nfor _ in $(seq 1 500); do (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && break; sleep 0.01; done",
            bin = bin(),
            www = www.display()
        );
        let start = format!("{svc}\necho \"{id} start $(date +%s%N)\" >> {ev}");
        let stop = format!(
            "echo \"{id} stop $(date +%s%N)\" >> {ev}\nif [ -f {pidf} ]; then kill -9 $(cat {pidf}) 2>/dev/null; rm -f {pidf}; fi\nfor _ in $(seq 1 500); do (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null || break; sleep 0.01; done\nsleep {pause}"
        );
        // Adopted before the hooks exist: no event, no service started twice.
        apply(&self.store, first, &root, &[]).expect_ok();
        assert_eq!(image_id(&root).as_deref(), Some(first));
        let hooks = root.join("etc/imageupd/hooks");
        bash_script(&hooks.join("pre-apply.d/10-stop-service"), &stop);
        bash_script(&hooks.join("post-apply.d/90-start-service"), &start);
        bash_script(&hooks.join("abort.d/90-start-service"), &start);
        n.check(
            "required",
            "10-service-answers",
            &format!("(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null"),
        );
        // The service runs before the rollout (not an event: no window).
        Run::new("bash").arg("-c").arg(&svc).ok();
        assert!(n.up(), "{id}'s service did not come up");
        n
    }

    /// Start every agent.
    pub fn start_agents(&mut self) {
        for n in &mut self.nodes {
            n.start_agent();
        }
    }

    /// Point every node at `id`.
    pub fn want_all(&self, id: &str, extra: &serde_json::Value) {
        for n in &self.nodes {
            n.want(id, &self.store, extra);
        }
    }

    /// The node named `id`.
    pub fn node(&self, id: &str) -> &FleetNode {
        self.nodes.iter().find(|n| n.id == id).expect("node")
    }

    /// Registered nodes.
    pub fn registered(&self) -> usize {
        self.etcd
            .range(&format!("{PREFIX}/groups/{GROUP}/nodes/"), 0)
            .len()
    }

    /// Wait until every agent registered.
    pub fn wait_registered(&self) {
        self.wait(Duration::from_secs(60), "every node registered", |f| {
            f.registered() == f.nodes.len()
        });
    }

    /// A prober over every node's service.
    pub fn prober(&self) -> Prober {
        Prober::start(self.nodes.iter().map(|n| n.port).collect())
    }

    /// Wait until some node opened its window; that node's id.
    pub fn wait_first_window(&self) -> String {
        self.wait(Duration::from_secs(60), "a first window", |f| {
            f.events().iter().any(|e| e.1)
        });
        self.events().iter().find(|e| e.1).unwrap().0.clone()
    }

    /// Keys under the group's `kind/` now.
    pub fn keys(&self, kind: &str) -> Keys {
        self.etcd
            .range(&format!("{PREFIX}/groups/{GROUP}/{kind}"), 0)
    }

    /// Poll `cond` every 200 ms; panic with the fleet's state after `limit`.
    pub fn wait(&self, limit: Duration, what: &str, mut cond: impl FnMut(&Fleet) -> bool) {
        let t = Instant::now();
        while !cond(self) {
            if t.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting for {what}\n{}",
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait until the nodes in `ids` run `image` and nothing is claimed.
    pub fn wait_converged(&self, ids: &[&str], image: &str, limit: Duration) {
        self.wait(limit, &format!("{ids:?} on {image}"), |f| {
            ids.iter()
                .all(|i| f.node(i).image().as_deref() == Some(image))
                && f.keys("claims/").is_empty()
                && f.keys("inprogress/").is_empty()
        });
    }

    /// Every node id.
    pub fn ids(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.id.clone()).collect()
    }

    /// The events so far: (node, is_stop, ns).
    pub fn events(&self) -> Vec<(String, bool, i128)> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3)
                    .then(|| (f[0].to_string(), f[1] == "stop", f[2].parse().unwrap_or(0)))
            })
            .collect()
    }

    /// Everything about the fleet, for panic messages.
    pub fn describe(&self) -> String {
        let mut o = String::new();
        let st = imageupd([
            "fleet",
            "status",
            "--etcd",
            &self.etcd.url,
            "--prefix",
            PREFIX,
        ])
        .run();
        o.push_str(&st.stdout);
        for n in &self.nodes {
            o.push_str(&format!(
                "--- {} on {:?}, up {} ---\n{}\n",
                n.id,
                n.image(),
                n.up(),
                clip(&tail(&n.log(), 15), 15)
            ));
        }
        o.push_str(&format!(
            "--- events ---\n{}",
            clip(
                &std::fs::read_to_string(&self.events).unwrap_or_default(),
                80
            )
        ));
        o
    }

    /// Assert every node in `ids` runs `image`, checked by `verify` and
    /// the rsync oracle.
    #[track_caller]
    pub fn assert_on(&self, ids: &[&str], image: &str) {
        for i in ids {
            let n = self.node(i);
            assert_eq!(n.image().as_deref(), Some(image), "{i}");
            assert_converged(&self.trees[image], &n.root, &format!("{i} on {image}"));
            let v = verify(&n.root, true);
            assert_eq!(v.code(), Some(EXIT_OK), "{i}: verify\n{}", v.describe());
        }
    }
}

/// Last `n` lines.
pub fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

/// The most intervals open at once among `(node, is_stop, t)` events (a
/// stop opens the node's window, its next start closes it; a window never
/// closed stays open). The sweep behind the "at most K down" check.
pub fn max_overlap(events: &[(String, bool, i128)]) -> usize {
    let mut ev: Vec<(i128, bool, String)> =
        events.iter().map(|(n, s, t)| (*t, *s, n.clone())).collect();
    // At equal times, closes before opens.
    ev.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut open = std::collections::BTreeSet::new();
    let mut max = 0;
    for (_, stop, n) in ev {
        if stop {
            open.insert(n);
        } else {
            open.remove(&n);
        }
        max = max.max(open.len());
    }
    max
}

/// Samples every service every 20 ms from a thread.
pub struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// (ms since start, services up) per sample.
    pub samples: Arc<Mutex<Vec<(u64, usize)>>>,
}

impl Prober {
    /// Start sampling `ports`.
    pub fn start(ports: Vec<u16>) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s2, m2) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            while !s2.load(Ordering::SeqCst) {
                let up = ports.iter().filter(|p| port_up(**p)).count();
                m2.lock()
                    .unwrap()
                    .push((t0.elapsed().as_millis() as u64, up));
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Prober {
            stop,
            thread: Some(thread),
            samples,
        }
    }

    /// Stop; (samples, fewest up).
    pub fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let s = self.samples.lock().unwrap();
        (s.len(), s.iter().map(|x| x.1).min().unwrap_or(0))
    }
}

/// For each revision of a history (see `EtcdServer::history`), how many
/// keys were present; the largest.
pub fn max_keys(history: &History) -> usize {
    history.iter().map(|(_, k)| k.len()).max().unwrap_or(0)
}
