//! Test harness: real `hablk` processes with their own disks, configs and
//! control sockets in a temp dir, inside a private network namespace.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

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
pub fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
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
        let log = std::fs::File::create(self.log(node)).unwrap();
        let child = self
            .hablk(node)
            .arg("up")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let index = self.index(node);
        self.daemons[index] = Some(child);
        wait_for(&format!("{node} to answer status"), || {
            let output = self.hablk(node).arg("status").output().unwrap();
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

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
