//! A real Pacemaker + Corosync cluster for tests: `scripts/pacemaker-cluster.sh`
//! (one node per set of namespaces) with one hablk resource, `r0`, over
//! data nodes `alpha` and `beta` and the diskless `witness`, managed by the
//! OCF agent as a promotable clone, with an ext4 Filesystem and a Dummy
//! service on the Promoted node. Everything is torn down when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{hablk_bin, run, wait_for_within};

/// Disk of each data node.
pub const DISK_BYTES: u64 = 64 << 20;
/// How long a test waits for the cluster to reach a state: Pacemaker
/// transitions on a loaded 2-core machine take seconds each.
pub const PCMK_WAIT: Duration = Duration::from_secs(120);

/// What `crm_mon --output-as=xml` says, reduced to what the tests ask.
#[derive(Debug, Clone)]
pub struct CrmState {
    pub online: Vec<String>,
    /// (resource id, role, node) of every active instance.
    pub instances: Vec<(String, String, String)>,
    /// (resource id, node, exit reason) of every failed action.
    pub failures: Vec<(String, String, String)>,
    pub quorum: bool,
}

impl CrmState {
    fn parse(xml: &str) -> Option<CrmState> {
        let doc = roxmltree::Document::parse(xml).ok()?;
        let online = doc
            .descendants()
            .filter(|n| n.has_tag_name("node") && n.attribute("online") == Some("true"))
            .filter_map(|n| n.attribute("name").map(str::to_owned))
            .collect();
        let instances = doc
            .descendants()
            .filter(|n| n.has_tag_name("resource") && n.attribute("active") == Some("true"))
            .filter_map(|n| {
                let node = n.children().find(|c| c.has_tag_name("node"))?;
                Some((
                    n.attribute("id")?.to_owned(),
                    n.attribute("role")?.to_owned(),
                    node.attribute("name")?.to_owned(),
                ))
            })
            .collect();
        let failures = doc
            .descendants()
            .filter(|n| n.has_tag_name("failure"))
            .map(|n| {
                (
                    n.attribute("op_key").unwrap_or_default().to_owned(),
                    n.attribute("node").unwrap_or_default().to_owned(),
                    n.attribute("exitreason").unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let quorum = doc
            .descendants()
            .find(|n| n.has_tag_name("current_dc"))
            .and_then(|n| n.attribute("with_quorum"))
            == Some("true");
        Some(CrmState {
            online,
            instances,
            failures,
            quorum,
        })
    }

    /// The node where the clone is Promoted (only one may be).
    pub fn promoted(&self) -> Option<String> {
        let promoted: Vec<&String> = self
            .instances
            .iter()
            .filter(|(id, role, _)| id == "vol" && role == "Promoted")
            .map(|(_, _, node)| node)
            .collect();
        assert!(promoted.len() <= 1, "two Promoted instances: {self:?}");
        promoted.first().map(|node| (*node).clone())
    }

    /// The node a primitive runs on.
    pub fn running_on(&self, id: &str) -> Option<String> {
        self.instances
            .iter()
            .find(|(rid, role, _)| rid == id && role == "Started")
            .map(|(_, _, node)| node.clone())
    }

    /// Nodes where the clone runs Unpromoted.
    pub fn unpromoted(&self) -> Vec<String> {
        self.instances
            .iter()
            .filter(|(id, role, _)| id == "vol" && role == "Unpromoted")
            .map(|(_, _, node)| node.clone())
            .collect()
    }
}

#[derive(Debug)]
pub struct PcmkCluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    script: PathBuf,
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

impl PcmkCluster {
    /// Starts Pacemaker and Corosync on alpha, beta and witness, and
    /// writes the resource's config and metadata (nothing configured in
    /// Pacemaker yet).
    pub fn up() -> PcmkCluster {
        PcmkCluster::launch(false)
    }

    /// [`PcmkCluster::up`] with each data node's disk alone on a tmpfs of
    /// its own, which [`PcmkCluster::resize_disk_fs`] shrinks (the disk
    /// fails: writes get ENOSPC) or grows (a replaced disk).
    pub fn up_with_disks_on_tmpfs() -> PcmkCluster {
        PcmkCluster::launch(true)
    }

    fn launch(disks_on_tmpfs: bool) -> PcmkCluster {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pacemaker-cluster.sh");
        let cluster = PcmkCluster {
            config: dir.path().join("r0.toml"),
            dir,
            script,
        };
        // Before the nodes start: they see the host's mounts as they were.
        for node in ["alpha", "beta"] {
            let disk_dir = cluster.disk_dir(node);
            std::fs::create_dir_all(&disk_dir).unwrap();
            if disks_on_tmpfs {
                let output = run(Command::new("mount")
                    .args(["-t", "tmpfs", "-o", "size=128M", "tmpfs"])
                    .arg(&disk_dir));
                assert!(output.status.success(), "tmpfs: {}", text(&output));
            }
        }
        let output = run(Command::new(&cluster.script)
            .arg("up")
            .arg(cluster.dir.path())
            .args(["alpha", "beta", "witness"])
            .env("HABLK_BIN", hablk_bin()));
        assert!(output.status.success(), "cluster up: {}", text(&output));
        let d = cluster.dir.path().display();
        let mut config = String::from("[resource]\nname = \"r0\"\nping-timeout = \"1s\"\n");
        for (id, node) in ["alpha", "beta", "witness"].iter().enumerate() {
            config.push_str(&format!(
                "\n[[node]]\nname = \"{node}\"\nid = {id}\naddress = \"10.213.0.{}:7789\"\n",
                id + 1
            ));
            if *node == "witness" {
                config.push_str(&format!("meta = \"{d}/witness/witness.meta\"\n"));
            } else {
                let disk = cluster.disk_dir(node).join("disk.img");
                std::fs::File::create(&disk)
                    .unwrap()
                    .set_len(DISK_BYTES)
                    .unwrap();
                config.push_str(&format!(
                    "nbd = \"127.0.0.1:10809\"\ndisk = \"{}\"\n",
                    disk.display()
                ));
            }
        }
        std::fs::write(&cluster.config, config).unwrap();
        for node in ["alpha", "beta", "witness"] {
            cluster.hablk_ok(node, &["create-md"]);
        }
        std::fs::create_dir_all(cluster.mount_dir()).unwrap();
        cluster
    }

    /// Where a data node's disk lives.
    pub fn disk_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join("disks").join(node)
    }

    /// Resizes the tmpfs under a data node's disk
    /// ([`PcmkCluster::up_with_disks_on_tmpfs`]).
    pub fn resize_disk_fs(&self, node: &str, size: &str) {
        let output = run(Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.disk_dir(node)));
        assert!(output.status.success(), "remount: {}", text(&output));
    }

    /// Where the Filesystem resource mounts r0 (on whichever node).
    pub fn mount_dir(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// A command to run inside `node`.
    pub fn command(&self, node: &str, args: &[&str]) -> Command {
        let mut command = Command::new(&self.script);
        command
            .arg("exec")
            .arg(self.dir.path())
            .arg(node)
            .args(args);
        command
    }

    /// Runs a command inside `node`.
    pub fn exec(&self, node: &str, args: &[&str]) -> Output {
        run(&mut self.command(node, args))
    }

    /// Waits until Pacemaker has nothing left to do: the DC, as `from`
    /// sees it, is idle (every transition carried out).
    pub fn wait_idle(&self, from: &str) {
        wait_for_within(PCMK_WAIT, || {
            let xml = self.exec(from, &["crm_mon", "-1", "--output-as=xml"]);
            let xml = String::from_utf8_lossy(&xml.stdout).into_owned();
            let doc = roxmltree::Document::parse(&xml).ok()?;
            let dc = doc
                .descendants()
                .find(|n| n.has_tag_name("current_dc"))?
                .attribute("name")?
                .to_owned();
            let state = self.exec(from, &["crmadmin", "--quiet", "--status", &dc]);
            let text = text(&state);
            text.contains("S_IDLE").then_some(())
        })
        .unwrap_or_else(|| panic!("the cluster never became idle\n{}", self.logs()));
    }

    pub fn exec_ok(&self, node: &str, args: &[&str]) -> String {
        let output = self.exec(node, args);
        assert!(
            output.status.success(),
            "{args:?} on {node}: {}",
            text(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A shell command inside `node`.
    pub fn sh(&self, node: &str, script: &str) -> String {
        self.exec_ok(node, &["sh", "-c", script])
    }

    pub fn hablk(&self, node: &str, args: &[&str]) -> Output {
        let config = self.config.display().to_string();
        let mut full = vec!["hablk", "-c", &config];
        full.extend_from_slice(args);
        self.exec(node, &full)
    }

    pub fn hablk_ok(&self, node: &str, args: &[&str]) -> String {
        let output = self.hablk(node, args);
        assert!(
            output.status.success(),
            "hablk {args:?} on {node}: {}",
            text(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `hablk status --json` on `node`; `None` when its daemon is not
    /// running (or the node is down).
    pub fn status(&self, node: &str) -> Option<Value> {
        let output = self.hablk(node, &["status", "--json"]);
        output
            .status
            .success()
            .then(|| serde_json::from_slice(&output.stdout).ok())
            .flatten()
    }

    fn script(&self, verb: &str, node: &str) {
        let output = run(Command::new(&self.script)
            .arg(verb)
            .arg(self.dir.path())
            .arg(node));
        assert!(output.status.success(), "{verb} {node}: {}", text(&output));
    }

    /// `kill -9` of the whole node: Pacemaker, Corosync, hablk, nbdfuse.
    pub fn kill(&self, node: &str) {
        self.script("kill", node);
    }

    /// Starts a killed node again (Corosync and Pacemaker; Pacemaker then
    /// starts the clone instance).
    pub fn start(&self, node: &str) {
        self.script("start", node);
    }

    /// Drops every packet between `node` and the others.
    pub fn isolate(&self, node: &str) {
        self.script("isolate", node);
    }

    pub fn heal(&self, node: &str) {
        self.script("heal", node);
    }

    /// Loads crm shell configuration lines (`crm configure load update`).
    pub fn configure(&self, lines: &str) {
        let file = self.dir.path().join(format!(
            "crm-{}.txt",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::write(&file, lines).unwrap();
        self.exec_ok(
            "alpha",
            &[
                "crm",
                "configure",
                "load",
                "update",
                &file.display().to_string(),
            ],
        );
    }

    /// The cluster as `from` sees it; `None` if `from` cannot say.
    pub fn mon(&self, from: &str) -> Option<CrmState> {
        let output = self.exec(from, &["crm_mon", "-1", "--output-as=xml"]);
        CrmState::parse(&String::from_utf8_lossy(&output.stdout))
    }

    /// Waits until `from` sees a state that `check` accepts.
    pub fn wait_mon(&self, from: &str, what: &str, check: impl Fn(&CrmState) -> bool) -> CrmState {
        let mut last = None;
        wait_for_within(PCMK_WAIT, || {
            let state = self.mon(from)?;
            let ok = check(&state);
            last = Some(state.clone());
            ok.then_some(state)
        })
        .unwrap_or_else(|| panic!("{what}: last seen {last:?}\n{}", self.logs()))
    }

    /// Waits until hablk's status on `node` satisfies `check`.
    pub fn wait_status(&self, node: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        wait_for_within(PCMK_WAIT, || self.status(node).filter(|s| check(s))).unwrap_or_else(|| {
            panic!(
                "{what}: last status {:?}\n{}",
                self.status(node),
                self.logs()
            )
        })
    }

    /// The agent's and the daemons' recent log lines, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in ["alpha", "beta", "witness"] {
            let pacemaker = self
                .dir
                .path()
                .join(node)
                .join("var-log/pacemaker/pacemaker.log");
            let text = std::fs::read_to_string(pacemaker).unwrap_or_default();
            let agent: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("hablk-ocf") || l.contains("ocf-exit-reason"))
                .collect();
            out.push_str(&format!(
                "--- {node}: agent\n{}\n",
                agent[agent.len().saturating_sub(15)..].join("\n")
            ));
            let daemon = self
                .dir
                .path()
                .join(node)
                .join(format!("var-log/hablk/r0-{node}.log"));
            let text = std::fs::read_to_string(daemon).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "--- {node}: daemon\n{}\n",
                lines[lines.len().saturating_sub(15)..].join("\n")
            ));
        }
        out
    }

    /// The clone over all three nodes; the first sync skipped (empty
    /// disks); returns the node Pacemaker promoted.
    pub fn configure_clone(&self) -> String {
        self.configure(&format!(
            "primitive vol ocf:hablk:hablk params config={} \
             op monitor interval=5s role=Promoted op monitor interval=6s role=Unpromoted\n\
             clone vol-clone vol meta promotable=true promoted-max=1 clone-max=3 notify=true\n",
            self.config.display()
        ));
        self.wait_mon("alpha", "the clone running Unpromoted on 3 nodes", |s| {
            s.unpromoted().len() == 3
        });
        self.hablk_ok("alpha", &["skip-initial-sync"]);
        let state = self.wait_mon("alpha", "a Promoted node", |s| s.promoted().is_some());
        state.promoted().unwrap()
    }

    /// ext4 on the Promoted node's /dev/hablk/r0, then a Filesystem and a
    /// Dummy service colocated with and ordered after the promotion.
    pub fn configure_filesystem(&self, promoted: &str) {
        self.exec_ok(promoted, &["mkfs.ext4", "-q", "/dev/hablk/r0"]);
        self.configure(&format!(
            "primitive fs ocf:heartbeat:Filesystem params device=/dev/hablk/r0 \
             directory={} fstype=ext4 op monitor interval=10s\n\
             primitive app ocf:heartbeat:Dummy op monitor interval=10s\n\
             colocation fs-with-vol inf: fs vol-clone:Promoted\n\
             order vol-before-fs Mandatory: vol-clone:promote fs:start\n\
             colocation app-with-fs inf: app fs\n\
             order fs-before-app Mandatory: fs app\n",
            self.mount_dir().display()
        ));
        self.wait_mon("alpha", "fs and app on the Promoted node", |s| {
            s.running_on("app").as_deref() == Some(promoted)
                && s.running_on("fs").as_deref() == Some(promoted)
        });
    }

    /// Whether r0's file system is mounted on `node`.
    pub fn mounted(&self, node: &str) -> bool {
        self.exec(node, &["findmnt", &self.mount_dir().display().to_string()])
            .status
            .success()
    }

    /// Writes `count` files of random data on `node`'s mounted file
    /// system, each made durable with `sync -f`; returns their md5 sums.
    pub fn write_files(&self, node: &str, prefix: &str, count: usize) -> String {
        let m = self.mount_dir().display().to_string();
        self.sh(
            node,
            &format!(
                "set -e; cd {m}; for i in $(seq {count}); do \
                 head -c $((64 * 1024 + i * 4096)) /dev/urandom > {prefix}-$i; \
                 sync -f {prefix}-$i; done; md5sum {prefix}-*"
            ),
        )
    }

    /// The md5 sums of the files with `prefix` as `node` reads them.
    pub fn read_files(&self, node: &str, prefix: &str) -> String {
        let m = self.mount_dir().display().to_string();
        self.sh(node, &format!("cd {m} && md5sum {prefix}-*"))
    }
}

impl Drop for PcmkCluster {
    fn drop(&mut self) {
        let output = run(Command::new(&self.script).arg("down").arg(self.dir.path()));
        if !output.status.success() {
            eprintln!("pacemaker-cluster.sh down: {}", text(&output));
        }
        for node in ["alpha", "beta"] {
            let _ = run(Command::new("umount").arg("-l").arg(self.disk_dir(node)));
        }
    }
}

/// Seconds since `start`, for the timings the tests print.
pub fn seconds_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}
