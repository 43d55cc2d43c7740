//! Faults for cluster tests (issue 5): network partitions as nftables
//! rules inside the test's private network namespace, promotion that waits
//! out a lost Primary's lease, the "never two Primaries" check, the
//! durability checker, and an ext4 file system on an export that can be
//! abandoned when its server dies.
//!
//! Nothing here touches the host's network: every nft command first checks
//! that the calling thread is in a network namespace of its own (see
//! [`super::isolate_network`]).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{run, run_ok, up_all, wait_for, Cluster, NodeSpec};

/// The nftables table every partition rule lives in.
const TABLE: &str = "hablktest";

/// Panics unless the calling thread is in a network namespace other than
/// the one of pid 1 (the host's, or the container's): nft must never run
/// outside [`super::isolate_network`].
pub fn assert_private_network() {
    assert!(
        in_private_network(),
        "refusing to run nft in the initial network namespace: call isolate_network() first"
    );
}

/// Whether the calling thread has a network namespace of its own: one
/// that differs from the process's main thread's (a test runs on a thread
/// of its own and `isolate_network` unshares only that thread) and from
/// pid 1's (when readable). False when in doubt.
pub fn in_private_network() -> bool {
    let Ok(mine) = std::fs::read_link("/proc/thread-self/ns/net") else {
        return false;
    };
    let Ok(main_thread) = std::fs::read_link("/proc/self/ns/net") else {
        return false;
    };
    if mine == main_thread {
        return false;
    }
    match std::fs::read_link("/proc/1/ns/net") {
        Ok(init) => init != mine,
        Err(_) => true,
    }
}

/// IP and port of a node's replication address.
fn ip_port(spec: &NodeSpec) -> (String, u16) {
    let (ip, port) = spec.address.rsplit_once(':').expect("address is IP:PORT");
    (ip.to_owned(), port.parse().expect("port"))
}

/// One direction of a cut: packets of replication connections from one
/// node's address to another's are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cut {
    from: (String, u16),
    to: (String, u16),
}

/// A set of network cuts between nodes, as nftables rules in a table of
/// our own. Only replication traffic is dropped (matched by the nodes' IPs
/// *and* replication ports), so NBD clients and the control sockets keep
/// working. Dropping the value heals everything.
#[derive(Debug, Default)]
pub struct Partition {
    cuts: Vec<Cut>,
}

impl Partition {
    pub fn new() -> Partition {
        assert_private_network();
        Partition::default()
    }

    /// Drops everything `from` sends to `to` (one direction only).
    pub fn cut_one_way(&mut self, cluster: &Cluster, from: &str, to: &str) {
        let cut = Cut {
            from: ip_port(cluster.spec(from)),
            to: ip_port(cluster.spec(to)),
        };
        if !self.cuts.contains(&cut) {
            self.cuts.push(cut);
        }
        self.apply();
    }

    /// Cuts `a` and `b` apart, both directions.
    pub fn cut(&mut self, cluster: &Cluster, a: &str, b: &str) {
        self.cut_one_way(cluster, a, b);
        self.cut_one_way(cluster, b, a);
    }

    /// Cuts `node` off from every other node, both directions.
    pub fn isolate(&mut self, cluster: &Cluster, node: &str) {
        for other in cluster.nodes.iter().filter(|n| n.name != node) {
            self.cut(cluster, node, &other.name);
        }
    }

    /// Cuts only what `node` sends to every other node (it still hears
    /// them).
    pub fn isolate_outgoing(&mut self, cluster: &Cluster, node: &str) {
        for other in cluster.nodes.iter().filter(|n| n.name != node) {
            self.cut_one_way(cluster, node, &other.name);
        }
    }

    /// Cuts only what every other node sends to `node` (it still talks to
    /// them).
    pub fn isolate_incoming(&mut self, cluster: &Cluster, node: &str) {
        for other in cluster.nodes.iter().filter(|n| n.name != node) {
            self.cut_one_way(cluster, &other.name, node);
        }
    }

    /// Removes every cut.
    pub fn heal(&mut self) {
        self.cuts.clear();
        self.apply();
    }

    pub fn is_cut(&self) -> bool {
        !self.cuts.is_empty()
    }

    /// Replaces the table with the current rules, atomically (one nft
    /// transaction).
    fn apply(&self) {
        assert_private_network();
        let mut rules = String::new();
        for cut in &self.cuts {
            let ((from_ip, from_port), (to_ip, to_port)) = (&cut.from, &cut.to);
            // Connections `from` opened (to the peer's listening port) and
            // connections `to` opened (answered from `from`'s listening port).
            rules.push_str(&format!(
                "    ip saddr {from_ip} ip daddr {to_ip} tcp dport {to_port} drop\n\
                 \x20   ip saddr {from_ip} ip daddr {to_ip} tcp sport {from_port} drop\n"
            ));
        }
        let mut script = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
        if !self.cuts.is_empty() {
            script.push_str(&format!("table inet {TABLE} {{\n"));
            for (chain, hook) in [("out", "output"), ("in", "input")] {
                script.push_str(&format!(
                    "  chain {chain} {{\n    type filter hook {hook} priority 0; policy accept;\n{rules}  }}\n"
                ));
            }
            script.push_str("}\n");
        }
        nft(&script);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if self.is_cut() && in_private_network() {
            let _ = nft_output(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"));
        }
    }
}

fn nft_output(script: &str) -> Output {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("writing to nft");
    child.wait_with_output().expect("nft")
}

fn nft(script: &str) {
    let output = nft_output(script);
    assert!(
        output.status.success(),
        "nft failed ({}): {}\nscript:\n{script}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

// --- topologies --------------------------------------------------------------

/// A witness: no disk, only votes and generations.
pub fn witness_spec(name: &str, id: u8) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        id,
        address: format!("127.0.0.{}:7789", id + 1),
        nbd_port: 10809,
        disk_bytes: None,
        disk_dir: None,
    }
}

/// `alpha` (127.0.0.1) and `beta` (127.0.0.2) with disks of `disk_bytes`,
/// and the diskless `witness` (127.0.0.3).
/// Starts every node, `skip-initial-sync`, and `primary` on `alpha` (with
/// quorum); returns the data size.
#[track_caller]
pub fn start_primary(cluster: &mut Cluster) -> u64 {
    up_all(cluster);
    let (code, stdout, stderr) = cluster.cmd("alpha", &["skip-initial-sync"]);
    assert_eq!(code, 0, "skip-initial-sync: {stdout}{stderr}");
    let data_nodes: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| n.disk_bytes.is_some())
        .map(|n| n.name.clone())
        .collect();
    for name in data_nodes {
        cluster.wait_status(&name, "UpToDate", |s| s["disk"] == "UpToDate");
    }
    let (code, stdout, stderr) = cluster.cmd("alpha", &["primary"]);
    assert_eq!(code, 0, "primary: {stdout}{stderr}");
    let status = cluster.status("alpha");
    assert_eq!(status["role"], "Primary", "{status}");
    assert_eq!(status["quorum"], true, "{status}");
    status["size_bytes"].as_u64().unwrap()
}

pub fn with_witness(disk_bytes: u64, resource_extra: &str) -> Cluster {
    Cluster::new(
        vec![
            NodeSpec::data("alpha", 0, disk_bytes),
            NodeSpec::data("beta", 1, disk_bytes),
            witness_spec("witness", 2),
        ],
        resource_extra,
    )
}

/// Every spec with its replication and NBD ports moved by `offset` (a
/// fresh set of ports per round of a test that builds many clusters).
pub fn shift_ports(mut nodes: Vec<NodeSpec>, offset: u16) -> Vec<NodeSpec> {
    for node in &mut nodes {
        let (ip, port) = ip_port(node);
        node.address = format!("{ip}:{}", port + offset);
        node.nbd_port += offset;
    }
    nodes
}

// --- roles -------------------------------------------------------------------

/// Runs `primary` on `node` until it succeeds (it is refused while the
/// others still back the old Primary's lease, or still see it); panics
/// after `timeout` with the last refusal. Returns how long it took.
pub fn promote(cluster: &Cluster, node: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (code, stdout, stderr) = cluster.cmd(node, &["primary"]);
        if code == 0 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "primary on {node} still not done after {:?}: exit {code}: {stdout}{stderr}",
            started.elapsed()
        );
        assert_eq!(
            code, 3,
            "primary on {node} failed rather than being refused: {stdout}{stderr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Takes `status --json` of every node in `reachable` and asserts that at
/// most one of them is Primary with quorum; returns that one. Nodes that
/// are stopped or dead must not be listed (their control socket would not
/// answer).
pub fn one_primary_with_quorum(cluster: &Cluster, reachable: &[&str]) -> Option<String> {
    primary_with_quorum(cluster, reachable).unwrap_or_else(|problem| panic!("{problem}"))
}

/// Like [`one_primary_with_quorum`], but returns two Primaries with quorum
/// (and every status taken) as an error instead of panicking.
pub fn primary_with_quorum(
    cluster: &Cluster,
    reachable: &[&str],
) -> Result<Option<String>, String> {
    let statuses: Vec<(String, Value)> = reachable
        .iter()
        .map(|n| ((*n).to_owned(), cluster.status(n)))
        .collect();
    let holders: Vec<&str> = statuses
        .iter()
        .filter(|(_, s)| s["role"] == "Primary" && s["quorum"] == true)
        .map(|(n, _)| n.as_str())
        .collect();
    if holders.len() > 1 {
        return Err(format!(
            "two Primaries with quorum: {holders:?}\n{}",
            statuses
                .iter()
                .map(|(n, s)| format!("{n}: {s}"))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    Ok(holders.first().map(|n| (*n).to_owned()))
}

// --- the durability checker --------------------------------------------------

pub fn durability_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hablk-durability")
}

/// A running `hablk-durability write`.
#[derive(Debug)]
pub struct Checker {
    child: Option<Child>,
    pub journal: PathBuf,
    log: PathBuf,
}

impl Checker {
    /// Starts writing to `uri` (`blocks` blocks, 64 in flight) until the
    /// connection dies or `seconds` are up.
    pub fn start(uri: &str, dir: &Path, blocks: u64, seed: u64, seconds: f64) -> Checker {
        let journal = dir.join(format!("journal-{seed}"));
        let log = dir.join(format!("checker-{seed}.log"));
        let child = Command::new(durability_bin())
            .args(["write", "--uri", uri, "--journal"])
            .arg(&journal)
            .args([
                "--blocks",
                &blocks.to_string(),
                "--depth",
                "64",
                "--seed",
                &seed.to_string(),
                "--seconds",
                &format!("{seconds:.3}"),
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("checker log"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("hablk-durability write");
        Checker {
            child: Some(child),
            journal,
            log,
        }
    }

    /// Acknowledged writes in the journal so far.
    pub fn acknowledged(&self) -> usize {
        std::fs::read_to_string(&self.journal)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("A "))
            .count()
    }

    /// Waits until at least `n` writes were acknowledged.
    pub fn wait_acknowledged(&self, n: usize) {
        wait_for(&format!("{n} acknowledged writes"), || {
            (self.acknowledged() >= n).then_some(())
        });
    }

    /// Waits (up to `timeout`) for the writer to end; returns its summary
    /// line, or why it did not end well (a writer still running after
    /// `timeout` is killed: only its unanswered writes may then be missing
    /// from the journal).
    pub fn finish(&mut self, timeout: Duration) -> Result<String, String> {
        let mut child = self.child.take().expect("checker already finished");
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("checker") {
                break status;
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "hablk-durability write still waiting for answers after {timeout:?} \
                     (killed); journal: {} lines",
                    std::fs::read_to_string(&self.journal)
                        .unwrap_or_default()
                        .lines()
                        .count()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let summary = std::fs::read_to_string(&self.log).unwrap_or_default();
        if status.success() {
            Ok(summary.trim().to_owned())
        } else {
            Err(format!(
                "hablk-durability write exited with {status}: {summary}"
            ))
        }
    }

    /// `hablk-durability verify` against `uri`: its summary, or its exit
    /// code (1: violations, 2: could not read) and output.
    pub fn verify(&self, uri: &str) -> Result<String, (i32, String)> {
        assert!(self.child.is_none(), "verify after the writer ended");
        let output = run(Command::new(durability_bin())
            .args(["verify", "--uri", uri, "--journal"])
            .arg(&self.journal));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if output.status.success() {
            Ok(text.trim().to_owned())
        } else {
            Err((output.status.code().unwrap_or(-1), text.trim().to_owned()))
        }
    }

    /// `hablk-durability verify` against a node's backing disk itself,
    /// served read-only by nbdkit on `listen` (IP:PORT) for the time of
    /// the check: what the node holds, whether or not it serves.
    pub fn verify_disk(&self, disk: &Path, listen: &str) -> Result<String, (i32, String)> {
        assert!(self.child.is_none(), "verify after the writer ended");
        let (ip, port) = listen.rsplit_once(':').expect("IP:PORT");
        let mut verify = format!(
            "'{}' verify --uri nbd://{listen}/r0 --journal '",
            durability_bin()
        );
        verify.push_str(&self.journal.display().to_string());
        verify.push('\'');
        let output = run(Command::new("nbdkit")
            .args(["-r", "-f", "-i", ip, "-p", port, "file"])
            .arg(disk)
            .args(["--run", &verify]));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if output.status.success() {
            Ok(text.trim().to_owned())
        } else {
            Err((output.status.code().unwrap_or(-1), text.trim().to_owned()))
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// --- a file system on an export -----------------------------------------------

/// An ext4 file system on an export: nbdfuse → loop device → mount. Every
/// step taken is undone when dropped, even if the test failed; after the
/// server died, [`ExportFs::abandon`] tears it down the only way that
/// works then (`umount -l`, `losetup -d`, `fusermount3 -u`).
#[derive(Debug)]
pub struct ExportFs {
    pub fuse_dir: PathBuf,
    pub mount_dir: PathBuf,
    nbdfuse: Option<Child>,
    loop_device: Option<String>,
    mounted: bool,
}

impl ExportFs {
    /// Starts nbdfuse on `uri` and attaches a loop device to its file.
    pub fn attach(uri: &str, dir: &Path, tag: &str) -> ExportFs {
        let fuse_dir = dir.join(format!("fuse-{tag}"));
        let mount_dir = dir.join(format!("mnt-{tag}"));
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mount_dir).unwrap();
        let pid_file = dir.join(format!("nbdfuse-{tag}.pid"));
        let log = std::fs::File::create(dir.join(format!("nbdfuse-{tag}.log"))).unwrap();
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pid_file)
            .arg(fuse_dir.join("disk"))
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut fs = ExportFs {
            fuse_dir,
            mount_dir,
            nbdfuse: Some(child),
            loop_device: None,
            mounted: false,
        };
        wait_for("nbdfuse to serve", || {
            if let Some(status) = fs.nbdfuse.as_mut().unwrap().try_wait().unwrap() {
                panic!("nbdfuse exited with {status}");
            }
            std::fs::read_to_string(&pid_file)
                .ok()
                .filter(|pid| !pid.trim().is_empty())
        });
        let output = run_ok(
            Command::new("losetup")
                .args(["-f", "--show"])
                .arg(fs.fuse_dir.join("disk")),
        );
        fs.loop_device = Some(String::from_utf8(output.stdout).unwrap().trim().to_owned());
        fs
    }

    pub fn device(&self) -> &str {
        self.loop_device.as_deref().unwrap()
    }

    pub fn mkfs(&self) {
        run_ok(Command::new("mkfs.ext4").args(["-q", self.device()]));
    }

    pub fn mount(&mut self) {
        run_ok(
            Command::new("mount")
                .arg(self.device())
                .arg(&self.mount_dir),
        );
        self.mounted = true;
    }

    pub fn umount(&mut self) {
        run_ok(Command::new("umount").arg(&self.mount_dir));
        self.mounted = false;
    }

    /// `fsck.ext4 -n -f` on the (unmounted) device: its exit code and
    /// output.
    pub fn fsck(&self) -> (i32, String) {
        assert!(!self.mounted);
        let output = run(Command::new("fsck.ext4").args(["-n", "-f", self.device()]));
        (
            output.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    }

    /// Clean teardown: unmounted already; detach the loop device, unmount
    /// nbdfuse, which then exits.
    pub fn detach(mut self) {
        assert!(!self.mounted);
        let device = self.loop_device.take().unwrap();
        run_ok(Command::new("losetup").args(["-d", &device]));
        wait_for("fusermount3 -u to succeed", || {
            run(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir))
                .status
                .success()
                .then_some(())
        });
        let mut child = self.nbdfuse.take().unwrap();
        let status = wait_for("nbdfuse to exit", || child.try_wait().unwrap());
        assert!(status.success(), "nbdfuse exited with {status}");
    }

    /// Teardown after the server died under a mounted file system:
    /// `umount -l`, `losetup -d`, `fusermount3 -u` (lazily if it is still
    /// busy), and nbdfuse is reaped.
    pub fn abandon(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        if self.mounted {
            let _ = run(Command::new("umount").arg("-l").arg(&self.mount_dir));
            self.mounted = false;
        }
        if let Some(device) = self.loop_device.take() {
            let _ = run(Command::new("losetup").args(["-d", &device]));
        }
        if let Some(mut child) = self.nbdfuse.take() {
            let unmounted = run(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir))
                .status
                .success();
            if !unmounted {
                let _ = run(Command::new("fusermount3")
                    .args(["-u", "-z"])
                    .arg(&self.fuse_dir));
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ExportFs {
    fn drop(&mut self) {
        self.teardown();
    }
}

// --- an NBD client that stays attached ---------------------------------------

/// An `nbdsh` client connected to an export, driven line by line: each
/// line written to it is a Python statement run with `h` connected; it
/// answers each with one line (`ok ...` or `error ...`).
#[derive(Debug)]
pub struct HeldClient {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

const HELD_CLIENT: &str = r#"
import sys
print("connected", flush=True)
for line in sys.stdin:
    try:
        result = eval(line.strip())
        print("ok", "" if result is None else repr(result), flush=True)
    except Exception as e:
        print("error", type(e).__name__, str(e).replace("\n", " "), flush=True)
"#;

impl HeldClient {
    /// Connects (OPT_GO) to `uri` and waits until the connection is up.
    pub fn connect(uri: &str) -> HeldClient {
        let mut child = super::nbdsh_command()
            .args(["-u", uri, "-c", HELD_CLIENT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nbdsh");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let client = HeldClient {
            child,
            stdin,
            lines: rx,
        };
        let first = client.answer(super::WAIT);
        assert_eq!(
            first.as_deref(),
            Some("connected"),
            "nbdsh did not connect to {uri}"
        );
        client
    }

    /// Sends one Python expression (e.g. `h.pwrite(b"x" * 4096, 0)`).
    pub fn send(&mut self, expression: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{expression}").expect("writing to nbdsh");
        stdin.flush().expect("flushing nbdsh's stdin");
    }

    /// The next answer line, if one comes within `timeout`.
    pub fn answer(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Runs an expression and returns its answer.
    pub fn eval(&mut self, expression: &str) -> String {
        self.send(expression);
        self.answer(super::WAIT)
            .unwrap_or_else(|| panic!("no answer from nbdsh to {expression}"))
    }

    /// Closes stdin (the script ends and disconnects) and reaps nbdsh.
    pub fn close(mut self) {
        self.stdin.take();
        let _ = wait_for("nbdsh to exit", || self.child.try_wait().unwrap());
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
