//! Test harness: real `hablk` processes with their own disks, configs and
//! control sockets in a temp dir, inside a private network namespace.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod faults;
pub mod pacemaker;

/// How long a test waits for anything (a daemon to answer, an event).
pub const WAIT: Duration = Duration::from_secs(30);

pub fn hablk_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hablk")
}

/// Moves this test (the calling thread and every process it starts) into
/// a private network namespace with only `lo`, so fixed ports never collide
/// and nothing a test does can touch the host's network.
pub fn isolate_network() {
    // SAFETY: unshare with a flag constant; no memory is passed.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET) failed ({}); cluster tests need root",
        std::io::Error::last_os_error()
    );
    run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));
}

pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

#[track_caller]
pub fn run_ok(command: &mut Command) -> Output {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?} failed: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Waits until `check` returns `Some`, or panics with `what`.
#[track_caller]
pub fn wait_for<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    wait_for_within(WAIT, check).unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// Polls `check` until it returns `Some`, for at most `timeout`; `None`
/// when it never did (the caller says what was missing).
pub fn wait_for_within<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Settings of a test node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub id: u8,
    pub address: String,
    pub nbd_port: u16,
    /// `None`: a witness.
    pub disk_bytes: Option<u64>,
    /// Where the disk lives (default: the cluster dir).
    pub disk_dir: Option<PathBuf>,
}

impl NodeSpec {
    /// Data node `id` on `127.0.0.{id+1}`: replication port 7789, NBD port
    /// 10809.
    pub fn data(name: &str, id: u8, disk_bytes: u64) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            id,
            address: format!("127.0.0.{}:7789", id + 1),
            nbd_port: 10809,
            disk_bytes: Some(disk_bytes),
            disk_dir: None,
        }
    }
}

/// The entry for `peer` in a `status --json` object.
pub fn peer_of(status: &Value, peer: &str) -> Value {
    status["peers"]
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["node"] == peer))
        .cloned()
        .unwrap_or_else(|| panic!("no peer {peer} in {status}"))
}

/// A resource of test nodes sharing one config file.
#[derive(Debug)]
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub nodes: Vec<NodeSpec>,
    daemons: Vec<Option<Child>>,
}

impl Cluster {
    /// Writes a config for `nodes` with `resource_extra` lines added to
    /// `[resource]`, creates their disks, and runs `create-md` on each.
    pub fn new(nodes: Vec<NodeSpec>, resource_extra: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut text = format!("[resource]\nname = \"r0\"\n{resource_extra}\n");
        for node in &nodes {
            text.push_str(&format!(
                "\n[[node]]\nname = \"{}\"\nid = {}\naddress = \"{}\"\ncontrol = \"{}\"\n",
                node.name,
                node.id,
                node.address,
                dir.path().join(format!("{}.sock", node.name)).display()
            ));
            match node.disk_bytes {
                Some(bytes) => {
                    let disk_dir = node
                        .disk_dir
                        .clone()
                        .unwrap_or_else(|| dir.path().to_owned());
                    let disk = disk_dir.join(format!("{}.img", node.name));
                    std::fs::File::create(&disk)
                        .unwrap()
                        .set_len(bytes)
                        .unwrap();
                    text.push_str(&format!(
                        "nbd = \"{}:{}\"\ndisk = \"{}\"\n",
                        node.address.split(':').next().unwrap(),
                        node.nbd_port,
                        disk.display()
                    ));
                }
                None => text.push_str(&format!(
                    "meta = \"{}\"\n",
                    dir.path().join(format!("{}.meta", node.name)).display()
                )),
            }
        }
        let config = dir.path().join("hablk.toml");
        std::fs::write(&config, text).unwrap();
        let daemons = nodes.iter().map(|_| None).collect();
        let cluster = Cluster {
            dir,
            config,
            nodes,
            daemons,
        };
        for node in &cluster.nodes {
            run_ok(cluster.hablk(&node.name).arg("create-md"));
        }
        cluster
    }

    /// A single data node on 127.0.0.1 with the given engine.
    pub fn single(disk_bytes: u64, resource_extra: &str) -> Cluster {
        Cluster::new(
            vec![NodeSpec {
                name: "alpha".into(),
                id: 0,
                address: "127.0.0.1:7789".into(),
                nbd_port: 10809,
                disk_bytes: Some(disk_bytes),
                disk_dir: None,
            }],
            resource_extra,
        )
    }

    /// Data nodes `names[i]` with id `i`, replication on
    /// `127.0.0.{i+1}:7789`, NBD on the same address port 10809, each with
    /// a disk of `disk_bytes` (create-md already run on each).
    pub fn data_nodes(names: &[&str], disk_bytes: u64, resource_extra: &str) -> Cluster {
        let nodes = names
            .iter()
            .enumerate()
            .map(|(i, name)| NodeSpec::data(name, i as u8, disk_bytes))
            .collect();
        Cluster::new(nodes, resource_extra)
    }

    /// `alpha` and `beta`.
    pub fn two_nodes(disk_bytes: u64, resource_extra: &str) -> Cluster {
        Cluster::data_nodes(&["alpha", "beta"], disk_bytes, resource_extra)
    }

    /// `alpha`, `beta` and `gamma`.
    pub fn three_nodes(disk_bytes: u64, resource_extra: &str) -> Cluster {
        Cluster::data_nodes(&["alpha", "beta", "gamma"], disk_bytes, resource_extra)
    }

    pub fn spec(&self, name: &str) -> &NodeSpec {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    fn index(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap()
    }

    /// `hablk -c CONFIG -n NODE` ready for a subcommand.
    pub fn hablk(&self, node: &str) -> Command {
        let mut command = Command::new(hablk_bin());
        command.arg("-c").arg(&self.config).arg("-n").arg(node);
        command
    }

    pub fn disk(&self, node: &str) -> PathBuf {
        let spec = self.spec(node);
        spec.disk_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().to_owned())
            .join(format!("{node}.img"))
    }

    pub fn log(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.log"))
    }

    /// Starts `hablk up` and waits until its control socket answers.
    pub fn up(&mut self, node: &str) {
        let config = self.config.clone();
        self.up_with_config(node, &config);
    }

    /// Starts `hablk up` for `node` with another config file (a node whose
    /// config differs from its peers'), and waits until it answers.
    pub fn up_with_config(&mut self, node: &str, config: &Path) {
        self.up_with(node, config, &[]);
    }

    /// Starts `hablk up` with extra environment variables (e.g. FAILPOINTS
    /// in a fault-injection build).
    pub fn up_with_env(&mut self, node: &str, env: &[(&str, &str)]) {
        let config = self.config.clone();
        self.up_with(node, &config, env);
    }

    fn up_with(&mut self, node: &str, config: &Path, env: &[(&str, &str)]) {
        let log = std::fs::File::create(self.log(node)).unwrap();
        let child = Command::new(hablk_bin())
            .arg("-c")
            .arg(config)
            .arg("-n")
            .arg(node)
            .arg("up")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let index = self.index(node);
        self.daemons[index] = Some(child);
        wait_for(&format!("{node} to answer status"), || {
            let output = Command::new(hablk_bin())
                .arg("-c")
                .arg(config)
                .args(["-n", node, "status"])
                .output()
                .unwrap();
            if output.status.success() {
                return Some(());
            }
            if let Some(child) = self.daemons[index].as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "{node} exited with {status}: {}",
                        std::fs::read_to_string(self.log(node)).unwrap_or_default()
                    );
                }
            }
            None
        });
    }

    /// Runs a command on a node; returns (exit code, stdout, stderr).
    pub fn cmd(&self, node: &str, args: &[&str]) -> (i32, String, String) {
        let output = run(self.hablk(node).args(args));
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    #[track_caller]
    pub fn status(&self, node: &str) -> Value {
        let (code, stdout, stderr) = self.cmd(node, &["status", "--json"]);
        assert_eq!(code, 0, "status failed: {stderr}");
        serde_json::from_str(&stdout).unwrap()
    }

    /// `kill -9`.
    pub fn kill(&mut self, node: &str) {
        let index = self.index(node);
        if let Some(mut child) = self.daemons[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id of a running daemon.
    pub fn pid(&self, node: &str) -> u32 {
        self.daemons[self.index(node)]
            .as_ref()
            .expect("daemon not running")
            .id()
    }

    /// Sends a signal (`libc::SIGSTOP`, `SIGCONT`, ...) to a daemon.
    pub fn signal(&self, node: &str, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid(node)).unwrap();
        // SAFETY: kill(2) on our own child's pid; no memory is passed.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Stops a daemon with SIGSTOP and returns once every one of its threads
    /// is stopped: kill(2) only queues the signal, and a loaded machine may
    /// let the daemon run on (receive, write, acknowledge) for a while.
    pub fn stop(&self, node: &str) {
        self.signal(node, libc::SIGSTOP);
        let pid = self.pid(node);
        wait_for(&format!("every thread of {node} to stop"), || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
            let all_stopped = tasks.flatten().all(|task| {
                std::fs::read_to_string(task.path().join("stat"))
                    .ok()
                    .and_then(|stat| {
                        // "pid (comm) S ...": the state follows the last ')'.
                        let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
                        Some(state == 'T')
                    })
                    .unwrap_or(false)
            });
            all_stopped.then_some(())
        });
    }

    /// Waits until `check` holds for the node's `status --json`; returns
    /// that status.
    #[track_caller]
    pub fn wait_status(&self, node: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.status(node);
            if check(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {node}: {what}; last status: {status}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The entry for `peer` in a node's status.
    pub fn peer_status(&self, node: &str, peer: &str) -> Value {
        peer_of(&self.status(node), peer)
    }

    /// md5 of a node's data area: the first `size_bytes` of its disk.
    pub fn data_md5(&self, node: &str, size_bytes: u64) -> String {
        md5_of(&self.disk(node), size_bytes)
    }

    /// Waits for a daemon to exit by itself (after `down`).
    pub fn wait_exit(&mut self, node: &str) -> std::process::ExitStatus {
        let index = self.index(node);
        let mut child = self.daemons[index].take().expect("daemon not running");
        wait_for(&format!("{node} to exit"), || child.try_wait().unwrap())
    }

    pub fn nbd_uri(&self, node: &str) -> String {
        let spec = self.spec(node);
        format!(
            "nbd://{}:{}/r0",
            spec.address.split(':').next().unwrap(),
            spec.nbd_port
        )
    }

    /// Starts `events --json` and returns a reader of the lines that follow
    /// its snapshot.
    pub fn events(&self, node: &str) -> EventStream {
        let mut child = self
            .hablk(node)
            .args(["events", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    if tx.send(value).is_err() {
                        break;
                    }
                }
            }
        });
        let stream = EventStream { child, lines: rx };
        // Subscribed once the snapshot has been sent: nothing after is lost.
        stream.wait_for("end of the events snapshot", |e| {
            e["kind"] == "end-of-snapshot"
        });
        stream
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The daemons' side of a failed test.
            for node in &self.nodes {
                let log = std::fs::read_to_string(self.log(&node.name)).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(80)..];
                eprintln!("--- {} log (last {} lines) ---", node.name, tail.len());
                for line in tail {
                    eprintln!("{}", strip_ansi(line));
                }
            }
        }
        for child in self.daemons.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Lines of `hablk events --json`.
#[derive(Debug)]
pub struct EventStream {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl EventStream {
    /// Waits for an event whose fields match all `(key, value)` pairs.
    #[track_caller]
    pub fn wait_for(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(event) if matches(&event) => return event,
                Ok(_) => continue,
                Err(_) => panic!("timed out waiting for event: {what}"),
            }
        }
    }
}

impl EventStream {
    /// The events received so far, without waiting for more.
    pub fn drain(&self) -> Vec<Value> {
        self.lines.try_iter().collect()
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` without ANSI escape sequences (the daemons' logs are coloured).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, then a final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// md5 of the first `bytes` of a file.
pub fn md5_of(path: &Path, bytes: u64) -> String {
    let output = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("head -c {bytes} '{}' | md5sum", path.display())),
    );
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// `nbdsh`, run with the system Python that has libnbd's bindings (a
/// python3 earlier on PATH may lack them).
pub fn nbdsh_command() -> Command {
    let mut command = Command::new("/usr/bin/python3");
    command.args(["-m", "nbd"]);
    command
}

/// Runs an nbdsh (python) script against `uri`; `h` is the connected handle.
pub fn nbdsh(uri: &str, script: &str) -> Output {
    nbdsh_command()
        .args(["-u", uri, "-c", script])
        .output()
        .expect("nbdsh")
}

// --- helpers shared by the test binaries ------------------------------------------

/// A command's stdout; the command must succeed.
pub fn stdout_of(command: &mut Command) -> String {
    String::from_utf8(run_ok(command).stdout).unwrap()
}

pub fn random_bytes(len: u64) -> Vec<u8> {
    use std::io::Read;
    let mut data = Vec::new();
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .take(len)
        .read_to_end(&mut data)
        .unwrap();
    data
}

pub fn random_file(path: &Path, len: u64) {
    std::fs::write(path, random_bytes(len)).unwrap();
}

pub fn read_at(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).unwrap();
    let mut data = vec![0; len as usize];
    file.read_exact_at(&mut data, offset).unwrap();
    data
}

/// A daemon log without ANSI colour codes.
pub fn log_text(cluster: &Cluster, node: &str) -> String {
    strip_ansi(&std::fs::read_to_string(cluster.log(node)).unwrap_or_default())
}

/// Waits until a node's log has a line containing `needle`; returns it.
#[track_caller]
pub fn wait_log(cluster: &Cluster, node: &str, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = log_text(cluster, node);
        if let Some(line) = log.lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no line with {needle:?} in {node}'s log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every peer of this status is Connected and has reported its disk.
pub fn all_connected(status: &Value) -> bool {
    status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["connection"] == "Connected" && p["peer_disk"] != "DUnknown")
}

#[track_caller]
pub fn wait_all_connected(cluster: &Cluster, node: &str) -> Value {
    cluster.wait_status(node, "every peer Connected", all_connected)
}

/// Starts every node and waits until each sees every other one connected
/// with its report (peer disk known).
pub fn up_all(cluster: &mut Cluster) {
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    for name in &names {
        cluster.up(name);
    }
    for name in &names {
        wait_all_connected(cluster, name);
    }
}

/// `wait-sync` on `node` must return 0.
#[track_caller]
pub fn wait_sync(cluster: &Cluster, node: &str) {
    let started = Instant::now();
    let (code, stdout, stderr) = cluster.cmd(node, &["wait-sync", "--timeout", "30s"]);
    assert_eq!(
        code,
        0,
        "wait-sync on {node} after {:?}: {stdout}{stderr}\nstatus: {}",
        started.elapsed(),
        cluster.status(node)
    );
}

/// The data areas (first `size` bytes) of `nodes` are byte-identical.
#[track_caller]
pub fn assert_identical(cluster: &Cluster, nodes: &[&str], size: u64) {
    let sums: Vec<(String, String)> = nodes
        .iter()
        .map(|n| ((*n).to_owned(), cluster.data_md5(n, size)))
        .collect();
    assert!(
        sums.windows(2).all(|w| w[0].1 == w[1].1),
        "data areas differ: {sums:?}"
    );
}

/// Both nodes see each other Connected, UpToDate, Established, nothing out
/// of sync, no resync running and no split-brain.
#[track_caller]
pub fn assert_in_sync(cluster: &Cluster, a: &str, b: &str) {
    for (node, peer) in [(a, b), (b, a)] {
        let status = cluster.status(node);
        assert_eq!(status["disk"], "UpToDate", "{node}: {status}");
        let p = peer_of(&status, peer);
        assert_eq!(p["connection"], "Connected", "{node}: {status}");
        assert_eq!(p["peer_disk"], "UpToDate", "{node}: {status}");
        assert_eq!(p["replication"], "Established", "{node}: {status}");
        assert_eq!(p["split_brain"], false, "{node}: {status}");
        assert_eq!(p["out_of_sync_bytes"], 0, "{node}: {status}");
        assert_eq!(p["sync"]["active"], false, "{node}: {status}");
    }
}
