//! Hostile neighbours: hosts and local processes that only hold
//! connections open must not lock peers, clients or the CLI out, nor fill
//! the logs (docs/operations.md, "Troubleshooting").
//!
//! Each test runs real daemons in a private network namespace and floods
//! them with idle connections from a thread of its own, reopening every
//! connection the daemon closes, while the real peers and clients carry on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::faults::{start_primary, with_witness};
use common::*;

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;
const PING: &str = "ping-timeout = \"1s\"";
/// An address of the test's namespace that is no node of the config.
const STRANGER: &str = "127.0.0.9";
/// Idle connections each flood keeps open per target, as in the report
/// that found the outage.
const FLOOD_CONNECTIONS: usize = 64;

/// Idle TCP connections from one source address, each reopened as soon
/// as the daemon closes it, until dropped.
struct Flood {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Flood {
    fn start(from: &str, targets: &[SocketAddr]) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let from: IpAddr = from.parse().unwrap();
        let targets = targets.to_vec();
        let thread = {
            let (stop, opened) = (stop.clone(), opened.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let mut holders = Vec::new();
                    for target in targets {
                        for _ in 0..FLOOD_CONNECTIONS {
                            let (stop, opened) = (stop.clone(), opened.clone());
                            holders.push(tokio::spawn(hold_open(from, target, stop, opened)));
                        }
                    }
                    for holder in holders {
                        let _ = holder.await;
                    }
                });
            })
        };
        Flood {
            stop,
            opened,
            thread: Some(thread),
        }
    }

    fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Keeps one connection open without a word, reopening it when closed.
async fn hold_open(
    from: IpAddr,
    target: SocketAddr,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
) {
    use tokio::io::AsyncReadExt;
    while !stop.load(Ordering::Relaxed) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        let Ok(mut stream) = socket.connect(target).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        opened.fetch_add(1, Ordering::Relaxed);
        // Read (and ignore) whatever the daemon says until it hangs up.
        let mut buf = [0u8; 512];
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) | Err(_) => {}
            }
        }
    }
}

/// Log lines of `node` that a refused connection (or a count of them) can
/// cause, written after `mark` lines.
fn refusal_lines(cluster: &Cluster, node: &str, mark: usize) -> usize {
    log_text(cluster, node)
        .lines()
        .skip(mark)
        .filter(|line| line.contains("refused") || line.contains("counted, not logged"))
        .count()
}

fn log_lines(cluster: &Cluster, node: &str) -> usize {
    log_text(cluster, node).lines().count()
}

fn replication_address(cluster: &Cluster, node: &str) -> SocketAddr {
    cluster.spec(node).address.parse().unwrap()
}

/// `disconnect beta` then `connect beta` on alpha; returns how long beta
/// took to be Connected again.
fn reconnect_beta(cluster: &Cluster) -> Duration {
    let (code, stdout, stderr) = cluster.cmd("alpha", &["disconnect", "beta"]);
    assert_eq!(code, 0, "disconnect: {stdout}{stderr}");
    cluster.wait_status("alpha", "beta StandAlone", |s| {
        peer_of(s, "beta")["connection"] == "StandAlone"
    });
    let started = Instant::now();
    let (code, stdout, stderr) = cluster.cmd("alpha", &["connect", "beta"]);
    assert_eq!(code, 0, "connect: {stdout}{stderr}");
    cluster.wait_status("alpha", "beta Connected again", |s| {
        let beta = peer_of(s, "beta");
        beta["connection"] == "Connected" && beta["peer_disk"] == "UpToDate"
    });
    started.elapsed()
}

/// Whether `status` is the Primary holding I/O while it records the new
/// generation that beta's deliberate disconnection calls for, with the
/// witness connected.
fn recording_after_disconnect(status: &serde_json::Value) -> bool {
    let connection = |peer: &str| {
        status["peers"]
            .as_array()
            .and_then(|peers| peers.iter().find(|p| p["node"] == peer))
            .map(|p| p["connection"].clone())
    };
    status["io_suspended"] == true
        && connection("beta").is_some_and(|c| c != "Connected")
        && connection("witness").is_some_and(|c| c == "Connected")
}

/// Polls the Primary's quorum from a thread of its own until dropped;
/// [`QuorumWatch::lost`] says whether it ever read `false`.
struct QuorumWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<String>>>,
}

impl QuorumWatch {
    fn start(cluster: &Cluster, node: &str) -> QuorumWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let mut command = cluster.hablk(node);
        command.args(["status", "--json"]);
        let program = command.get_program().to_owned();
        let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut lost = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let output = Command::new(&program).args(&args).output().unwrap();
                    let text = String::from_utf8_lossy(&output.stdout).into_owned();
                    match serde_json::from_str::<serde_json::Value>(&text) {
                        Ok(status) if status["quorum"] == true => {}
                        // The test's own `disconnect beta` has the Primary
                        // record a new generation, holding I/O meanwhile,
                        // which status reports as no quorum: the witness
                        // is there, nothing was lost to the flood.
                        Ok(status) if recording_after_disconnect(&status) => {}
                        _ => {
                            lost.push(format!("{text}{}", String::from_utf8_lossy(&output.stderr)))
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                lost
            })
        };
        QuorumWatch {
            stop,
            thread: Some(thread),
        }
    }

    fn lost(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

#[test]
fn strangers_holding_the_replication_port_cannot_keep_peers_apart() {
    isolate_network();
    let mut cluster = with_witness(DISK, PING);
    start_primary(&mut cluster);

    let quiet = reconnect_beta(&cluster);

    // A stranger holds connections to every port alpha dials, and the
    // witness's host misbehaves toward beta as well.
    let beta_mark = log_lines(&cluster, "beta");
    let flood_started = Instant::now();
    let watch = QuorumWatch::start(&cluster, "alpha");
    let strangers = Flood::start(
        STRANGER,
        &[
            replication_address(&cluster, "beta"),
            replication_address(&cluster, "witness"),
        ],
    );
    let witness_host = cluster
        .spec("witness")
        .address
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    let peer_host = Flood::start(&witness_host, &[replication_address(&cluster, "beta")]);
    wait_for("the floods to be refused a few hundred times", || {
        (strangers.opened() > 300 && peer_host.opened() > 100).then_some(())
    });
    let flooded = reconnect_beta(&cluster);
    // A witness that restarts is found again through its flooded port too
    // (alpha keeps quorum with beta meanwhile).
    cluster.kill("witness");
    cluster.wait_status("alpha", "the witness gone", |s| {
        peer_of(s, "witness")["connection"] != "Connected"
    });
    cluster.up("witness");
    for node in ["alpha", "beta"] {
        cluster.wait_status(node, "the witness back", |s| {
            peer_of(s, "witness")["connection"] == "Connected"
        });
    }
    // The floods go on until beta has logged a count of what it refused
    // (one line per interval): the reconnections happened during them.
    let summary = wait_log(&cluster, "beta", "more connections refused in the last");
    let opened = strangers.opened() + peer_host.opened();
    drop(strangers);
    drop(peer_host);
    let lost = watch.lost();
    let seconds = flood_started.elapsed().as_secs_f64();
    eprintln!(
        "beta reconnected in {quiet:?} without a flood, {flooded:?} under it \
         ({opened} connections opened in {seconds:.1} s)"
    );
    assert!(
        lost.is_empty(),
        "alpha lost quorum during the flood: {lost:?}"
    );

    // Every refusal of the flood fits in a few lines per interval.
    let lines = refusal_lines(&cluster, "beta", beta_mark);
    let intervals = (seconds / 10.0).ceil() as usize + 1;
    assert!(
        lines <= intervals * 6,
        "beta logged {lines} refusal lines for {opened} refused connections in {seconds:.1} s"
    );
    assert!(
        summary.contains(STRANGER),
        "the count names the source: {summary}"
    );
    // The cluster works on.
    qemu_io_ok(&cluster.nbd_uri("alpha"), "write -P 0x5c 0 1M");
    wait_sync(&cluster, "alpha");
}

fn qemu_io_ok(uri: &str, command: &str) {
    let output = run(Command::new("qemu-io").args(["-f", "raw", "-c", command, uri]));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && !text.contains("failed"),
        "qemu-io {command}: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn control_socket(cluster: &Cluster, node: &str) -> PathBuf {
    cluster.dir.path().join(format!("{node}.sock"))
}

/// An `events` watcher on the control socket, held open.
fn watcher(socket: &PathBuf) -> UnixStream {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .write_all(b"{\"command\":\"events\",\"now\":false}\n")
        .unwrap();
    stream
}

/// Waits (at most a generous 10 s) for the daemon to close a connection
/// that has sent nothing; fails if it stays open.
fn assert_closed_while_silent(mut connection: impl std::io::Read, what: &str) {
    let mut buf = [0u8; 256];
    loop {
        match connection.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what} was not closed: {e}"),
        }
    }
}

#[test]
fn idle_connections_cannot_lock_out_the_cli_or_nbd_clients() {
    isolate_network();
    let mut cluster = Cluster::single(DISK, "");
    cluster.up("alpha");
    let (code, stdout, stderr) = cluster.cmd("alpha", &["primary"]);
    assert_eq!(code, 0, "primary: {stdout}{stderr}");
    let mark = log_lines(&cluster, "alpha");
    let socket = control_socket(&cluster, "alpha");

    // Every watcher slot taken: status is still answered, and one watcher
    // too many is told why.
    let mut watchers: Vec<UnixStream> = Vec::new();
    for _ in 0..64 {
        watchers.push(watcher(&socket));
    }
    let (code, stdout, stderr) = cluster.cmd("alpha", &["status"]);
    assert_eq!(code, 0, "status beside 64 watchers: {stdout}{stderr}");
    wait_for("the 64 watchers to be followed", || {
        let mut extra = watcher(&socket);
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = String::new();
        use std::io::Read;
        let _ = extra.read_to_string(&mut answer);
        answer
            .contains("already serves 64 events watchers")
            .then_some(())
    });

    // Silent connections that never send a request give way.
    let mut silent: Vec<UnixStream> = Vec::new();
    for _ in 0..100 {
        silent.push(UnixStream::connect(&socket).unwrap());
    }
    let (code, stdout, stderr) = cluster.cmd("alpha", &["status"]);
    assert_eq!(
        code, 0,
        "status beside 100 silent connections: {stdout}{stderr}"
    );

    // A silent connection is closed after the request-line timeout, a
    // silent NBD client after the greeting's.
    let quiet = UnixStream::connect(&socket).unwrap();
    quiet
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_closed_while_silent(quiet, "a silent control connection");
    let quiet =
        std::net::TcpStream::connect(format!("127.0.0.1:{}", cluster.spec("alpha").nbd_port))
            .unwrap();
    quiet
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_closed_while_silent(quiet, "an NBD client silent after the greeting");

    // NBD: a stranger holds idle connections open; clients still attach.
    let nbd: SocketAddr = format!("127.0.0.1:{}", cluster.spec("alpha").nbd_port)
        .parse()
        .unwrap();
    let flood = Flood::start(STRANGER, &[nbd, nbd, nbd, nbd, nbd]);
    wait_for("the NBD flood to be refused a few hundred times", || {
        (flood.opened() > 500).then_some(())
    });
    qemu_io_ok(&cluster.nbd_uri("alpha"), "write -P 0x3a 0 64k");
    let output = run(Command::new("nbdinfo").args(["--size", &cluster.nbd_uri("alpha")]));
    assert!(
        output.status.success(),
        "nbdinfo under the flood: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    drop(flood);
    drop(silent);
    drop(watchers);
    let (code, stdout, stderr) = cluster.cmd("alpha", &["status"]);
    assert_eq!(code, 0, "status after the floods: {stdout}{stderr}");
    let lines = refusal_lines(&cluster, "alpha", mark);
    assert!(lines <= 30, "alpha logged {lines} refusal lines");
}
