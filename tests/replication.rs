//! Replication between data nodes (docs/design.md, "Safety rules"): the
//! initial sync, synchronous writes, bitmap resync after a Secondary or the
//! Primary went away, verify and invalidate, protocols A and B, and faults
//! (garbage on the replication port, mismatched peers, a stopped peer, a
//! failing backing disk). Every scenario ends by comparing the nodes' data
//! areas (md5 over the `size_bytes` their status reports).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
const BLOCK: u64 = 4 * KIB;

/// Every test config: a ping timeout a loaded 2-core machine does not trip
/// by accident.
const PING: &str = "ping-timeout = \"1s\"";
/// Two data nodes where one goes away: a majority of two is both, so the
/// Primary goes on alone only with `quorum = "off"` (quorum is the next
/// issue's subject).
const ALONE_OK: &str = "ping-timeout = \"1s\"\nquorum = \"off\"";

// --- helpers ----------------------------------------------------------------

/// Runs qemu-io commands against `uri`; every one must succeed.
#[track_caller]
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    let stdout = stdout_of(command.arg(uri));
    assert!(
        !stdout.contains("failed") && !stdout.contains("error"),
        "qemu-io {commands:?}: {stdout}"
    );
    stdout
}

/// Writes `data` at `offset` of a node's backing file, behind the daemon's
/// back (like `dd conv=notrunc`).
fn write_behind(path: &Path, offset: u64, data: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(data, offset).unwrap();
    file.sync_all().unwrap();
}

#[track_caller]
fn wait_connected(cluster: &Cluster, node: &str, peer: &str) -> Value {
    cluster.wait_status(node, &format!("{peer} Connected"), |s| {
        let p = peer_of(s, peer);
        p["connection"] == "Connected" && p["peer_disk"] != "DUnknown"
    })
}

#[track_caller]
fn wait_not_connected(cluster: &Cluster, node: &str, peer: &str) -> Value {
    cluster.wait_status(node, &format!("{peer} not Connected"), |s| {
        peer_of(s, peer)["connection"] != "Connected"
    })
}

/// `skip-initial-sync` on `node`; waits until every node is UpToDate.
#[track_caller]
fn skip_initial_sync(cluster: &Cluster, node: &str) {
    let (code, stdout, stderr) = cluster.cmd(node, &["skip-initial-sync"]);
    assert_eq!(code, 0, "skip-initial-sync: {stdout}{stderr}");
    for node in &cluster.nodes {
        cluster.wait_status(&node.name, "UpToDate after skip-initial-sync", |s| {
            s["disk"] == "UpToDate"
        });
    }
}

/// `primary` on `node`; returns the data size.
#[track_caller]
fn promote(cluster: &Cluster, node: &str) -> u64 {
    let (code, stdout, stderr) = cluster.cmd(node, &["primary"]);
    assert_eq!(code, 0, "primary: {stdout}{stderr}");
    let status = cluster.status(node);
    assert_eq!(status["role"], "Primary", "{status}");
    status["size_bytes"].as_u64().unwrap()
}

/// `skip-initial-sync`, then at once `primary` on `primary` (the user
/// story of a new cluster); returns the data size.
#[track_caller]
fn skip_sync_and_promote(cluster: &Cluster, primary: &str) -> u64 {
    skip_initial_sync(cluster, primary);
    promote(cluster, primary)
}

/// How many lines a node's log has: a mark for [`log_fields`].
fn log_mark(cluster: &Cluster, node: &str) -> usize {
    log_text(cluster, node).lines().count()
}

/// The numeric `key=value` field of the log lines after line `since` that
/// contain `needle`.
fn log_fields(cluster: &Cluster, node: &str, since: usize, needle: &str, key: &str) -> Vec<u64> {
    log_text(cluster, node)
        .lines()
        .skip(since)
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|word| word.strip_prefix(&format!("{key}=")))
                .map(|v| {
                    v.parse()
                        .unwrap_or_else(|_| panic!("{key} in {l:?} is no number"))
                })
        })
        .collect()
}

/// Data bytes each resync with `node` as the source sent (after `since`).
fn resync_sent(cluster: &Cluster, node: &str, since: usize) -> Vec<u64> {
    log_fields(
        cluster,
        node,
        since,
        "resync done (source)",
        "data_bytes_sent",
    )
}

/// Out-of-sync bytes of each resync `node` streamed as the source, after
/// the bitmap exchange (after `since`).
fn resync_sizes(cluster: &Cluster, node: &str, since: usize) -> Vec<u64> {
    log_fields(
        cluster,
        node,
        since,
        "resync: streaming",
        "out_of_sync_bytes",
    )
}

/// Seconds since midnight (UTC) of a log line's timestamp
/// (`2026-01-01T12:34:56.789012Z ...`).
fn log_time(line: &str) -> f64 {
    let time = line
        .split_whitespace()
        .next()
        .and_then(|stamp| stamp.split('T').nth(1))
        .and_then(|t| t.strip_suffix('Z'))
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"));
    time.split(':')
        .map(|part| part.parse::<f64>().unwrap())
        .fold(0.0, |acc, part| acc * 60.0 + part)
}

/// How long each resync `node` drove as the source took (after `since`):
/// from "resync: streaming" to "resync done (source)".
fn resync_durations(cluster: &Cluster, node: &str, since: usize) -> Vec<Duration> {
    let log = log_text(cluster, node);
    let mut started = None;
    let mut out = Vec::new();
    for line in log.lines().skip(since) {
        if line.contains("resync: streaming") {
            started = Some(log_time(line));
        } else if line.contains("resync done (source)") {
            if let Some(start) = started.take() {
                let mut secs = log_time(line) - start;
                if secs < 0.0 {
                    secs += 86_400.0;
                }
                out.push(Duration::from_secs_f64(secs));
            }
        }
    }
    out
}

/// Sets a flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Writes while a peer is away, known exactly in 4 KiB blocks: 3 MiB
/// aligned, one block, and 5000 bytes straddling two blocks.
const AWAY_WRITES: [&str; 3] = [
    "write -P 0xa1 1M 3M",
    "write -P 0xa2 10M 4k",
    "write -P 0xa3 20971620 5000",
];
const AWAY_BYTES: u64 = (768 + 1 + 2) * BLOCK;

// --- 1. initial sync ----------------------------------------------------------

#[test]
fn initial_full_sync_after_primary_force() {
    isolate_network();
    // A slow resync, so its progress can be seen in status.
    let mut cluster = Cluster::two_nodes(DISK, &format!("{PING}\nresync-rate = \"2MiB\""));
    // Data on alpha's disk before the cluster ever ran.
    let first = random_bytes(3 * MIB);
    write_behind(&cluster.disk("alpha"), MIB, &first);
    write_behind(&cluster.disk("alpha"), 40 * MIB, &[0x5a; BLOCK as usize]);
    up_all(&mut cluster);
    for (node, peer) in [("alpha", "beta"), ("beta", "alpha")] {
        let status = cluster.status(node);
        assert_eq!(status["disk"], "Inconsistent", "{status}");
        assert_eq!(status["role"], "Secondary", "{status}");
        assert_eq!(peer_of(&status, peer)["peer_disk"], "Inconsistent");
    }
    let (code, _, stderr) = cluster.cmd("alpha", &["primary"]);
    assert_eq!(
        code, 3,
        "Inconsistent data is not promotable without --force"
    );
    assert!(stderr.contains("--force"), "{stderr}");

    let alpha_events = cluster.events("alpha");
    let beta_disk_events = cluster.events("beta");
    let beta_sync_events = cluster.events("beta");
    let mark = log_mark(&cluster, "alpha");
    let stop = AtomicBool::new(false);
    let samples = std::thread::scope(|scope| {
        // alpha's status, sampled all along the resync.
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                samples.push(cluster.status("alpha"));
            }
            samples
        });
        // Stops the sampler however this closure ends (a panic included).
        let _stop_sampler = SetOnDrop(&stop);
        let (code, stdout, stderr) = cluster.cmd("alpha", &["primary", "--force"]);
        assert_eq!(code, 0, "primary --force: {stdout}{stderr}");
        alpha_events.wait_for("alpha SyncSource toward beta", |e| {
            e["object"] == "peer-device" && e["peer"] == "beta" && e["replication"] == "SyncSource"
        });
        beta_sync_events.wait_for("beta SyncTarget from alpha", |e| {
            e["object"] == "peer-device" && e["peer"] == "alpha" && e["replication"] == "SyncTarget"
        });
        beta_disk_events.wait_for("beta Inconsistent while it is the target", |e| {
            e["object"] == "resource" && e["disk"] == "Inconsistent"
        });
        beta_disk_events.wait_for("beta UpToDate at the end", |e| {
            e["object"] == "resource" && e["disk"] == "UpToDate"
        });
        wait_sync(&cluster, "alpha");
        wait_sync(&cluster, "beta");
        drop(_stop_sampler);
        sampler.join().unwrap()
    });
    // Progress, rate and ETA while it ran.
    let during = samples
        .iter()
        .map(|s| peer_of(s, "beta"))
        .find(|p| p["sync"]["active"] == true && p["sync"]["bytes_per_sec"].as_u64() > Some(0))
        .unwrap_or_else(|| panic!("no status showed the resync running: {samples:?}"));
    let sync = &during["sync"];
    assert_eq!(sync["direction"], "source", "{during}");
    let percent = sync["percent"].as_f64().unwrap();
    assert!((0.0..100.0).contains(&percent), "{during}");
    assert!(sync["eta_seconds"].is_u64(), "{during}");
    assert!(
        during["out_of_sync_bytes"].as_u64().unwrap() > 0,
        "{during}"
    );

    let size = cluster.status("alpha")["size_bytes"].as_u64().unwrap();
    assert!(size > 41 * MIB && size <= DISK, "{size}");
    assert_eq!(cluster.status("beta")["size_bytes"], size);
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_eq!(read_at(&cluster.disk("beta"), MIB, 3 * MIB), first);
    assert_in_sync(&cluster, "alpha", "beta");
    assert_eq!(peer_of(&cluster.status("beta"), "alpha")["role"], "Primary");
    // Hash-based: only the blocks that differ cross the wire.
    assert_eq!(resync_sent(&cluster, "alpha", mark), vec![3 * MIB + BLOCK]);
}

#[test]
fn resync_rate_bounds_bitmap_and_hash_resyncs() {
    const MOVED: u64 = 4 * MIB;
    isolate_network();
    let mut cluster = Cluster::two_nodes(DISK, &format!("{ALONE_OK}\nresync-rate = \"4MiB\""));
    up_all(&mut cluster);
    let size = skip_sync_and_promote(&cluster, "alpha");
    let uri = cluster.nbd_uri("alpha");
    let source = cluster.dir.path().join("random.img");
    random_file(&source, MOVED);

    // Bitmap-based: 4 MiB written while beta was down.
    let (code, _, stderr) = cluster.cmd("beta", &["down"]);
    assert_eq!(code, 0, "{stderr}");
    cluster.wait_exit("beta");
    wait_not_connected(&cluster, "alpha", "beta");
    run_ok(Command::new("nbdcopy").arg(&source).arg(&uri));
    let mark = log_mark(&cluster, "alpha");
    cluster.up("beta");
    wait_connected(&cluster, "alpha", "beta");
    cluster.wait_status("alpha", "the resync running", |s| {
        peer_of(s, "beta")["sync"]["active"] == true
    });
    let (code, _, stderr) = cluster.cmd("alpha", &["wait-sync", "--timeout", "100ms"]);
    assert_eq!(code, 1, "wait-sync times out during the resync: {stderr}");
    assert!(stderr.contains("timed out"), "{stderr}");
    wait_sync(&cluster, "alpha");
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_eq!(resync_sent(&cluster, "alpha", mark), vec![MOVED]);
    let took = resync_durations(&cluster, "alpha", mark);
    assert_eq!(took.len(), 1, "{took:?}");
    assert!(
        took[0] >= Duration::from_millis(800),
        "4 MiB at resync-rate 4MiB took {took:?}"
    );

    // Hash-based: beta's copy of those 4 MiB garbled, then invalidated.
    write_behind(&cluster.disk("beta"), 0, &random_bytes(MOVED));
    let mark = log_mark(&cluster, "alpha");
    let events = cluster.events("beta");
    let (code, _, stderr) = cluster.cmd("beta", &["invalidate"]);
    assert_eq!(code, 0, "{stderr}");
    events.wait_for("beta invalidated", |e| {
        e["object"] == "resource" && e["disk"] == "Inconsistent"
    });
    wait_sync(&cluster, "beta");
    wait_sync(&cluster, "alpha");
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_eq!(resync_sent(&cluster, "alpha", mark), vec![MOVED]);
    let took = resync_durations(&cluster, "alpha", mark);
    assert_eq!(took.len(), 1, "{took:?}");
    assert!(
        took[0] >= Duration::from_millis(800),
        "4 MiB of differing blocks at resync-rate 4MiB took {took:?}"
    );
}

// --- 2. writes through NBD ------------------------------------------------------

#[test]
fn writes_through_nbd_reach_the_secondary_before_they_are_acknowledged() {
    isolate_network();
    let mut cluster = Cluster::two_nodes(DISK, PING);
    up_all(&mut cluster);
    let size = skip_sync_and_promote(&cluster, "alpha");
    let uri = cluster.nbd_uri("alpha");

    let source = cluster.dir.path().join("random.img");
    random_file(&source, 8 * MIB);
    run_ok(Command::new("nbdcopy").arg(&source).arg(&uri));
    qemu_io(
        &uri,
        &[
            "write -P 0x22 9M 3M",
            "write -P 0x33 52429312 6000",
            "write -P 0x44 20M 2M",
            "write -z 20M 512k",
            "discard 21M 512k",
        ],
    );
    // Protocol C: acknowledged means written on beta too, no wait needed.
    assert_identical(&cluster, &["alpha", "beta"], size);
    let beta = cluster.disk("beta");
    assert_eq!(read_at(&beta, 0, 8 * MIB), std::fs::read(&source).unwrap());
    assert!(read_at(&beta, 9 * MIB, 3 * MIB).iter().all(|&b| b == 0x22));
    assert!(read_at(&beta, 20 * MIB, 512 * KIB).iter().all(|&b| b == 0));
    assert!(read_at(&beta, 20 * MIB + 512 * KIB, 512 * KIB)
        .iter()
        .all(|&b| b == 0x44));
    assert!(read_at(&beta, 21 * MIB, 512 * KIB).iter().all(|&b| b == 0));

    wait_sync(&cluster, "alpha");
    wait_sync(&cluster, "beta");
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_in_sync(&cluster, "alpha", "beta");
    let beta_status = cluster.status("beta");
    assert_eq!(peer_of(&beta_status, "alpha")["role"], "Primary");
    assert_eq!(
        beta_status["generation"],
        cluster.status("alpha")["generation"]
    );
    // A client of the Secondary is told who is Primary (qemu prints the
    // server's message; libnbd only with LIBNBD_DEBUG=1).
    let refused = run(Command::new("qemu-img").args(["info", &cluster.nbd_uri("beta")]));
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{text}");
    assert!(
        text.contains("r0 is Secondary on beta; Primary: alpha"),
        "{text}"
    );
}

#[test]
fn three_nodes_replicate_every_write_to_both_secondaries() {
    isolate_network();
    let mut cluster = Cluster::three_nodes(DISK, PING);
    up_all(&mut cluster);
    let size = skip_sync_and_promote(&cluster, "alpha");
    let uri = cluster.nbd_uri("alpha");
    let source = cluster.dir.path().join("random.img");
    random_file(&source, 4 * MIB);
    run_ok(Command::new("nbdcopy").arg(&source).arg(&uri));
    qemu_io(
        &uri,
        &["write -P 0x3a 10M 2M", "write -P 0x3b 33554532 10000"],
    );
    // Protocol C: on both Secondaries before the client hears "done".
    assert_identical(&cluster, &["alpha", "beta", "gamma"], size);
    for node in ["alpha", "beta", "gamma"] {
        wait_sync(&cluster, node);
    }
    assert_identical(&cluster, &["alpha", "beta", "gamma"], size);
    assert_in_sync(&cluster, "alpha", "beta");
    assert_in_sync(&cluster, "alpha", "gamma");
    assert_in_sync(&cluster, "beta", "gamma");
    let generation = cluster.status("alpha")["generation"].clone();
    for node in ["beta", "gamma"] {
        let status = cluster.status(node);
        assert_eq!(status["generation"], generation, "{status}");
        assert_eq!(peer_of(&status, "alpha")["role"], "Primary", "{status}");
    }
}

// --- 3. a Secondary goes away and comes back -------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Away {
    Kill,
    Down,
}

fn secondary_goes_away_and_comes_back(away: Away) {
    isolate_network();
    let mut cluster = Cluster::two_nodes(DISK, ALONE_OK);
    up_all(&mut cluster);
    let size = skip_sync_and_promote(&cluster, "alpha");
    let uri = cluster.nbd_uri("alpha");
    qemu_io(&uri, &["write -P 0x11 0 16M"]);
    assert_identical(&cluster, &["alpha", "beta"], size);

    match away {
        Away::Kill => cluster.kill("beta"),
        Away::Down => {
            let (code, stdout, stderr) = cluster.cmd("beta", &["down"]);
            assert_eq!(code, 0, "down: {stdout}{stderr}");
            assert!(cluster.wait_exit("beta").success());
        }
    }
    let status = wait_not_connected(&cluster, "alpha", "beta");
    assert_eq!(status["role"], "Primary", "{status}");
    assert_eq!(peer_of(&status, "beta")["out_of_sync_bytes"], 0, "{status}");

    qemu_io(&uri, &AWAY_WRITES);
    let status = cluster.status("alpha");
    let peer = peer_of(&status, "beta");
    assert_eq!(peer["connection"], "Connecting", "{status}");
    assert_eq!(peer["peer_disk"], "DUnknown", "{status}");
    assert_eq!(
        peer["out_of_sync_bytes"], AWAY_BYTES,
        "the bitmap holds exactly the blocks written while beta was away: {status}"
    );
    // Redundancy is gone, and both `wait-sync` and `status` say who is
    // missing (a node that is away counts as out of sync).
    let (code, stdout, stderr) = cluster.cmd("alpha", &["wait-sync", "--timeout", "1s"]);
    assert_eq!(code, 1, "wait-sync with beta away: {stdout}{stderr}");
    assert!(stderr.contains("not in sync: beta: Connecting"), "{stderr}");
    let text = cluster.cmd("alpha", &["status"]).1;
    assert!(text.contains("in-sync:no (beta: Connecting)"), "{text}");

    let mark = log_mark(&cluster, "alpha");
    cluster.up("beta");
    // It reconnects by itself: no `connect` here.
    wait_connected(&cluster, "alpha", "beta");
    wait_sync(&cluster, "alpha");
    wait_sync(&cluster, "beta");
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_in_sync(&cluster, "alpha", "beta");
    assert!(read_at(&cluster.disk("beta"), MIB, 3 * MIB)
        .iter()
        .all(|&b| b == 0xa1));

    let union = resync_sizes(&cluster, "alpha", mark);
    let sent = resync_sent(&cluster, "alpha", mark);
    match away {
        Away::Down => {
            // A clean stop leaves nothing of beta's own to resync: exactly
            // what was written while it was away crosses.
            assert_eq!(union, vec![AWAY_BYTES], "resync size");
            assert_eq!(sent, vec![AWAY_BYTES], "resync data sent");
        }
        Away::Kill => {
            // beta's activity-log extents (4 MiB each) may add to it.
            assert_eq!(union.len(), 1, "one resync: {union:?}");
            assert!(union[0] >= AWAY_BYTES, "{union:?}");
            assert!(union[0] <= AWAY_BYTES + 16 * MIB, "{union:?}");
        }
    }

    let text = cluster.cmd("alpha", &["status"]).1;
    assert!(text.contains("in-sync:yes"), "{text}");

    // Replication goes on after the resync.
    qemu_io(&uri, &["write -P 0xb7 30M 1M"]);
    assert_identical(&cluster, &["alpha", "beta"], size);
}

#[test]
fn secondary_killed_reconnects_and_is_resynced() {
    secondary_goes_away_and_comes_back(Away::Kill);
}

#[test]
fn secondary_down_resyncs_only_what_was_written_while_away() {
    secondary_goes_away_and_comes_back(Away::Down);
}

// --- 4. the Primary dies mid-write ----------------------------------------------

/// A background writer that is killed when dropped.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn primary_killed_during_heavy_writes_resyncs_its_activity_log() {
    const REGION: u64 = 8 * MIB;
    isolate_network();
    let mut cluster = Cluster::two_nodes(DISK, ALONE_OK);
    up_all(&mut cluster);
    let size = skip_sync_and_promote(&cluster, "alpha");
    let uri = cluster.nbd_uri("alpha");

    let fio = Background(
        Command::new("fio")
            .args([
                "--name=heavy",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bsrange=4k-64k",
                "--iodepth=32",
                "--offset=0",
                &format!("--size={REGION}"),
                "--time_based",
                "--runtime=60",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    cluster.wait_status("alpha", "fio attached", |s| s["nbd"]["clients"] == 1);
    // Writes in full flow.
    std::thread::sleep(Duration::from_millis(1500));
    cluster.kill("alpha");
    drop(fio);

    let beta = wait_not_connected(&cluster, "beta", "alpha");
    assert_eq!(beta["role"], "Secondary");

    cluster.up("alpha");
    wait_connected(&cluster, "alpha", "beta");
    wait_sync(&cluster, "alpha");
    wait_sync(&cluster, "beta");
    // The crashed Primary's activity log bounds the resync to the extents
    // fio wrote to.
    // (alpha's log starts with this run.)
    let union = resync_sizes(&cluster, "alpha", 0);
    assert_eq!(union.len(), 1, "one resync from alpha: {union:?}");
    assert!(union[0] > 0 && union[0] <= REGION, "{union:?}");
    assert_identical(&cluster, &["alpha", "beta"], size);

    let (code, stdout, stderr) = cluster.cmd("alpha", &["primary"]);
    assert_eq!(code, 0, "primary after the restart: {stdout}{stderr}");
    qemu_io(&uri, &["write -P 0x99 40M 1M", "read -P 0x99 40M 1M"]);
    wait_sync(&cluster, "alpha");
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_in_sync(&cluster, "alpha", "beta");
}

// --- 5. verify and invalidate -----------------------------------------------------

#[test]
fn verify_finds_a_corrupted_block_and_invalidate_refetches() {
    isolate_network();
    let mut cluster = Cluster::two_nodes(DISK, ALONE_OK);
    up_all(&mut cluster);
    let size = skip_sync_and_promote(&cluster, "alpha");
    let uri = cluster.nbd_uri("alpha");
    qemu_io(&uri, &["write -P 0x5c 0 16M"]);
    assert_identical(&cluster, &["alpha", "beta"], size);

    let (code, stdout, stderr) = cluster.cmd("alpha", &["verify"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("all blocks identical"), "{stdout}");

    // Corrupt one block of beta's disk behind its back.
    let beta_disk = cluster.disk("beta");
    write_behind(&beta_disk, 7 * MIB + 3 * BLOCK, &random_bytes(BLOCK));
    assert_ne!(
        cluster.data_md5("alpha", size),
        cluster.data_md5("beta", size)
    );

    let (code, stdout, stderr) = cluster.cmd("alpha", &["verify", "beta"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("1 block(s) (4096 bytes) differ"),
        "verify reports the block: {stdout}"
    );
    let status = cluster.status("alpha");
    assert_eq!(
        peer_of(&status, "beta")["out_of_sync_bytes"],
        BLOCK,
        "{status}"
    );

    // The next connect resyncs what verify marked.
    let mark = log_mark(&cluster, "alpha");
    let (code, _, stderr) = cluster.cmd("alpha", &["disconnect", "beta"]);
    assert_eq!(code, 0, "{stderr}");
    let status = wait_not_connected(&cluster, "alpha", "beta");
    assert_eq!(peer_of(&status, "beta")["connection"], "StandAlone");
    let (code, _, stderr) = cluster.cmd("alpha", &["wait-sync", "--timeout", "30s"]);
    assert_eq!(code, 3, "wait-sync refuses at once on StandAlone: {stderr}");
    assert!(stderr.contains("StandAlone"), "{stderr}");
    let (code, _, stderr) = cluster.cmd("alpha", &["connect", "beta"]);
    assert_eq!(code, 0, "{stderr}");
    wait_connected(&cluster, "alpha", "beta");
    wait_sync(&cluster, "alpha");
    wait_sync(&cluster, "beta");
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_in_sync(&cluster, "alpha", "beta");
    let union = resync_sizes(&cluster, "alpha", mark);
    assert_eq!(union.len(), 1, "one resync: {union:?}");
    assert!(
        union[0] >= BLOCK,
        "it covers the block verify marked: {union:?}"
    );
    let (code, stdout, _) = cluster.cmd("alpha", &["verify"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("all blocks identical"), "{stdout}");

    // invalidate: beta throws its data away and re-fetches it; only the
    // blocks whose hashes differ (one more corrupted one) cross.
    write_behind(&beta_disk, 12 * MIB + 5 * BLOCK, &random_bytes(BLOCK));
    let (code, _, stderr) = cluster.cmd("alpha", &["invalidate"]);
    assert_eq!(code, 3, "a Primary cannot invalidate itself");
    assert!(stderr.contains("demote"), "{stderr}");
    let events = cluster.events("beta");
    let mark = log_mark(&cluster, "alpha");
    let (code, stdout, stderr) = cluster.cmd("beta", &["invalidate"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    events.wait_for("beta Inconsistent", |e| {
        e["object"] == "resource" && e["disk"] == "Inconsistent"
    });
    wait_sync(&cluster, "beta");
    wait_sync(&cluster, "alpha");
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_in_sync(&cluster, "alpha", "beta");
    assert_eq!(
        resync_sizes(&cluster, "alpha", mark),
        vec![size.div_ceil(BLOCK) * BLOCK],
        "invalidate resyncs everything"
    );
    assert_eq!(
        resync_sent(&cluster, "alpha", mark),
        vec![BLOCK],
        "only the block whose hash differs crosses"
    );
}

// --- 6. faults ---------------------------------------------------------------------

/// crc32c (Castagnoli), as the peer frames carry it.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A peer frame: body length, crc32c of the body, body.
fn frame(body: &[u8], crc: u32) -> Vec<u8> {
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Sends `junk` to a replication port; the daemon must close the
/// connection (EOF or reset) within the handshake timeout.
fn send_garbage(address: &str, junk: &[u8], then_close: bool) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(junk);
    if then_close {
        // Vanish mid-frame.
        return;
    }
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!(
                "{address} did not close a connection sending garbage after {:?}: {e}",
                started.elapsed()
            ),
        }
    }
}

/// Events received so far on a stream, without waiting.
fn connection_changes(events: &EventStream, peer: &str) -> Vec<Value> {
    events
        .drain()
        .into_iter()
        .filter(|e| e["object"] == "connection" && e["peer"] == peer)
        .collect()
}

#[test]
fn garbage_on_the_replication_port_is_refused_and_peers_stay_connected() {
    isolate_network();
    let mut cluster = Cluster::two_nodes(DISK, PING);
    up_all(&mut cluster);
    let size = skip_sync_and_promote(&cluster, "alpha");
    let uri = cluster.nbd_uri("alpha");
    let alpha_events = cluster.events("alpha");
    let beta_events = cluster.events("beta");

    let mut http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    http.extend(random_bytes(4 * KIB));
    let body = random_bytes(100);
    let garbage: Vec<(&str, Vec<u8>, bool)> = vec![
        ("an HTTP request", http, false),
        (
            "a frame with a bad crc",
            frame(&body, crc32c(&body) ^ 1),
            false,
        ),
        (
            "a frame that does not decode",
            frame(&body, crc32c(&body)),
            false,
        ),
        ("a frame larger than any", vec![0xff; 8], false),
        (
            "a frame cut short",
            frame(&body, crc32c(&body))[..50].to_vec(),
            true,
        ),
    ];
    for (what, junk, close) in &garbage {
        for address in ["127.0.0.1:7789", "127.0.0.2:7789"] {
            eprintln!("{what} to {address}");
            send_garbage(address, junk, *close);
        }
    }
    // beta takes them from alpha's host through the handshake, which
    // refuses them; alpha's host is no other node's, so alpha closes them
    // before any handshake.
    wait_log(&cluster, "beta", "garbage on the replication port");
    wait_log(
        &cluster,
        "alpha",
        "not the address of any node in the config",
    );

    // The real connection never blinked, and replication goes on.
    qemu_io(&uri, &["write -P 0x6d 3M 2M"]);
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_in_sync(&cluster, "alpha", "beta");
    assert_eq!(
        connection_changes(&alpha_events, "beta"),
        Vec::<Value>::new()
    );
    assert_eq!(
        connection_changes(&beta_events, "alpha"),
        Vec::<Value>::new()
    );
}

/// `gamma` restarted with a config of its own; it must be refused by
/// both peers with `reason` in the logs while alpha and beta go on.
fn refused_peer(
    cluster: &mut Cluster,
    config_text: &str,
    create_md: bool,
    reasons: &[(&str, &str)],
) {
    let alpha_events = cluster.events("alpha");
    let config = cluster.dir.path().join("gamma-bad.toml");
    std::fs::write(&config, config_text).unwrap();
    if create_md {
        run_ok(Command::new(hablk_bin()).arg("-c").arg(&config).args([
            "-n",
            "gamma",
            "create-md",
            "--force",
        ]));
    }
    cluster.up_with_config("gamma", &config);
    for (node, reason) in reasons {
        wait_log(cluster, node, reason);
    }
    let status = cluster.status("alpha");
    assert_ne!(
        peer_of(&status, "gamma")["connection"],
        "Connected",
        "{status}"
    );
    assert_eq!(
        peer_of(&status, "beta")["connection"],
        "Connected",
        "{status}"
    );
    assert_eq!(
        peer_of(&status, "beta")["peer_disk"],
        "UpToDate",
        "{status}"
    );
    assert_eq!(status["role"], "Primary");
    assert_eq!(
        connection_changes(&alpha_events, "beta"),
        Vec::<Value>::new(),
        "alpha-beta never blinked"
    );
    let size = status["size_bytes"].as_u64().unwrap();
    qemu_io(&cluster.nbd_uri("alpha"), &["write -P 0x4e 5M 1M"]);
    assert_identical(cluster, &["alpha", "beta"], size);
    let down = run(Command::new(hablk_bin())
        .arg("-c")
        .arg(&config)
        .args(["-n", "gamma", "down"]));
    assert!(down.status.success(), "down gamma: {down:?}");
    cluster.wait_exit("gamma");
}

#[test]
fn peers_with_wrong_secret_resource_or_smaller_disk_are_refused() {
    isolate_network();
    let mut cluster = Cluster::three_nodes(DISK, &format!("{PING}\nsecret = \"right\""));
    up_all(&mut cluster);
    skip_initial_sync(&cluster, "alpha");
    // Settled before the promotion (three_nodes_replicate_every_write_to_
    // both_secondaries covers promoting at once).
    for node in ["alpha", "beta", "gamma"] {
        wait_sync(&cluster, node);
    }
    promote(&cluster, "alpha");
    let (code, _, stderr) = cluster.cmd("gamma", &["down"]);
    assert_eq!(code, 0, "{stderr}");
    cluster.wait_exit("gamma");
    wait_not_connected(&cluster, "alpha", "gamma");
    let good = std::fs::read_to_string(&cluster.config).unwrap();

    // A wrong secret.
    let text = good.replace("secret = \"right\"", "secret = \"wrong\"");
    refused_peer(
        &mut cluster,
        &text,
        false,
        &[("alpha", "wrong secret"), ("gamma", "wrong secret")],
    );

    // Another resource (its disk re-created for it).
    let text = good.replace("name = \"r0\"", "name = \"r1\"");
    refused_peer(
        &mut cluster,
        &text,
        true,
        &[
            ("alpha", "peer serves resource 'r1', this node 'r0'"),
            ("gamma", "peer serves resource 'r0', this node 'r1'"),
        ],
    );

    // A disk smaller than the data size.
    let gamma_disk = cluster.disk("gamma");
    let small = gamma_disk.with_file_name("gamma-small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(DISK / 2)
        .unwrap();
    let text = good.replace(
        &format!("disk = \"{}\"", gamma_disk.display()),
        &format!("disk = \"{}\"", small.display()),
    );
    assert_ne!(text, good);
    refused_peer(
        &mut cluster,
        &text,
        true,
        &[
            ("alpha", "gamma's disk holds"),
            ("beta", "gamma's disk holds"),
            ("gamma", "less than r0's data size"),
        ],
    );
}

#[test]
fn a_stopped_secondary_is_dropped_tracked_and_resynced_after_sigcont() {
    isolate_network();
    let mut cluster = Cluster::two_nodes(DISK, ALONE_OK);
    up_all(&mut cluster);
    let size = skip_sync_and_promote(&cluster, "alpha");
    let uri = cluster.nbd_uri("alpha");
    qemu_io(&uri, &["write -P 0x12 0 8M"]);

    cluster.stop("beta");
    let started = Instant::now();
    // The Primary goes on: these complete once beta is declared lost.
    qemu_io(&uri, &AWAY_WRITES);
    let took = started.elapsed();
    let status = cluster.status("alpha");
    let peer = peer_of(&status, "beta");
    assert_ne!(peer["connection"], "Connected", "{status}");
    assert_eq!(
        peer["out_of_sync_bytes"], AWAY_BYTES,
        "bitmap tracks the writes beta missed: {status}"
    );
    assert!(
        took < Duration::from_secs(10),
        "writes stalled for {took:?}"
    );
    qemu_io(&uri, &["read -P 0xa1 1M 3M"]);
    // Stopped for well over the ping timeout.
    while started.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.signal("beta", libc::SIGCONT);

    wait_connected(&cluster, "alpha", "beta");
    wait_sync(&cluster, "alpha");
    wait_sync(&cluster, "beta");
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_in_sync(&cluster, "alpha", "beta");
}

// --- 7. a failing backing disk on a Secondary -----------------------------------

/// A small tmpfs, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new(bytes: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
                .arg(dir.path()),
        );
        Tmpfs { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_secondary_whose_disk_fails_goes_diskless_and_the_primary_goes_on() {
    isolate_network();
    // Declared first: dropped after the cluster (whose daemons use it).
    let tmpfs = Tmpfs::new(16 * MIB);
    let mut beta = NodeSpec::data("beta", 1, DISK);
    beta.disk_dir = Some(tmpfs.path());
    let mut cluster = Cluster::new(vec![NodeSpec::data("alpha", 0, DISK), beta], ALONE_OK);
    up_all(&mut cluster);
    let size = skip_sync_and_promote(&cluster, "alpha");
    let uri = cluster.nbd_uri("alpha");

    // 24 MiB does not fit on beta's 16 MiB tmpfs: its writes fail (ENOSPC).
    qemu_io(&uri, &["write -P 0x3c 0 24M", "flush"]);
    let beta = cluster.wait_status("beta", "beta's disk detached", |s| {
        s["disk"] == "Diskless" || s["disk"] == "Failed"
    });
    let beta_disk = beta["disk"].clone();
    wait_log(&cluster, "beta", "backing disk failed");
    let alpha = cluster.wait_status("alpha", "beta's failed disk seen", |s| {
        peer_of(s, "beta")["peer_disk"] == beta_disk
    });
    assert_eq!(alpha["role"], "Primary");
    assert_eq!(alpha["disk"], "UpToDate");
    assert_eq!(
        peer_of(&alpha, "beta")["connection"],
        "Connected",
        "{alpha}"
    );

    // The Primary keeps acknowledging writes and tracks what beta lacks.
    qemu_io(
        &uri,
        &[
            "write -P 0x3d 40M 4M",
            "flush",
            "read -P 0x3d 40M 4M",
            "read -P 0x3c 0 24M",
        ],
    );
    let alpha = cluster.status("alpha");
    let oos = peer_of(&alpha, "beta")["out_of_sync_bytes"]
        .as_u64()
        .unwrap();
    assert!(oos >= 4 * MIB, "{alpha}");
    assert!(oos <= size, "{alpha}");
    let (code, _, stderr) = cluster.cmd("beta", &["primary", "--force"]);
    assert_eq!(
        code, 3,
        "a node with a failed disk is never promoted: {stderr}"
    );
}

// --- 8. protocols A and B ----------------------------------------------------------

fn protocol_replicates(protocol: &str) {
    isolate_network();
    let mut cluster = Cluster::two_nodes(DISK, &format!("{PING}\nprotocol = \"{protocol}\""));
    up_all(&mut cluster);
    let size = skip_sync_and_promote(&cluster, "alpha");
    let uri = cluster.nbd_uri("alpha");
    let source = cluster.dir.path().join("random.img");
    random_file(&source, 8 * MIB);
    run_ok(Command::new("nbdcopy").arg(&source).arg(&uri));
    qemu_io(
        &uri,
        &[
            "write -P 0x71 10M 4M",
            "write -P 0x72 30M 64k",
            "write -z 11M 1M",
            "aio_write -P 0x73 40M 1M",
            "aio_write -P 0x74 41M 1M",
            "aio_flush",
            "flush",
        ],
    );
    // A FLUSH reply means durable on every connected peer, whatever the
    // protocol.
    assert_identical(&cluster, &["alpha", "beta"], size);
    wait_sync(&cluster, "alpha");
    wait_sync(&cluster, "beta");
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_in_sync(&cluster, "alpha", "beta");
    assert_eq!(
        read_at(&cluster.disk("beta"), 0, 8 * MIB),
        std::fs::read(&source).unwrap()
    );
}

#[test]
fn protocol_a_replicates() {
    protocol_replicates("A");
}

#[test]
fn protocol_b_replicates() {
    protocol_replicates("B");
}
