//! Roles, quorum, generations and split-brain safety under real faults
//! (docs/design.md, "Safety rules"): promotion refusals and
//! `--override-quorum`, a Primary cut off by a network partition (both
//! `on-no-quorum` policies), two-node split-brain and its resolution,
//! auto-promote, `secondary`/`down` with clients attached, randomized
//! durability rounds (`kill -9`, `SIGSTOP`, partitions) checked by
//! `hablk-durability`, and an ext4 failover.
//!
//! Every test runs in its own network namespace; partitions are nftables
//! rules on the nodes' replication addresses (tests/common/faults.rs).
//! In every scenario the test looks at `status` of every reachable node
//! and asserts that at most one Primary holds quorum.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::faults::*;
use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;
/// 1 s in tests: a loaded 2-core machine makes 500 ms flaky.
const PING: &str = "ping-timeout = \"1s\"";
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a promotion may take after the Primary was lost: the lease
/// wait (one ping timeout) plus detection, with room for a loaded machine.
const PROMOTE_WITHIN: Duration = Duration::from_secs(15);

// --- helpers ----------------------------------------------------------------

fn names(cluster: &Cluster) -> Vec<String> {
    cluster.nodes.iter().map(|n| n.name.clone()).collect()
}

fn refs(names: &[String]) -> Vec<&str> {
    names.iter().map(String::as_str).collect()
}

/// Runs qemu-io commands; returns whether all succeeded, and the output.
fn qemu_io_result(uri: &str, commands: &[&str]) -> (bool, String) {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    let output = run(command.arg(uri));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let ok = output.status.success()
        && !text.contains("failed")
        && !text.contains("error")
        && !text.contains("Error");
    (ok, text)
}

/// Runs qemu-io commands; every one must succeed.
#[track_caller]
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let (ok, text) = qemu_io_result(uri, commands);
    assert!(ok, "qemu-io {uri} {commands:?}: {text}");
    text
}

/// qemu-io started in the background.
fn qemu_io_background(uri: &str, commands: &[&str]) -> Child {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    command
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a background qemu-io; returns (success, output).
fn qemu_io_wait(mut child: Child) -> (bool, String) {
    let status = wait_for("qemu-io to finish", || child.try_wait().unwrap());
    let mut text = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let ok = status.success()
        && !text.contains("failed")
        && !text.contains("error")
        && !text.contains("Error");
    (ok, text)
}

/// Asserts that `len` bytes at `offset` of a node's backing disk are all
/// `byte`.
#[track_caller]
fn assert_disk_holds(cluster: &Cluster, node: &str, offset: u64, len: u64, byte: u8) {
    let data = read_at(&cluster.disk(node), offset, len);
    let wrong = data.iter().position(|&b| b != byte);
    assert!(
        wrong.is_none(),
        "{node}'s disk at {offset}+{}: {:#04x}, expected {byte:#04x}",
        wrong.unwrap_or(0),
        data[wrong.unwrap_or(0)]
    );
}

/// No event in `events` (drained now) reported a split-brain.
#[track_caller]
fn assert_no_split_brain_event(events: &EventStream, node: &str) {
    let flagged: Vec<Value> = events
        .drain()
        .into_iter()
        .filter(|e| e["split_brain"] == true)
        .collect();
    assert!(
        flagged.is_empty(),
        "{node} reported a split-brain: {flagged:?}"
    );
}

fn is_change(event: &Value, object: &str, key: &str, value: &str) -> bool {
    event["kind"] == "change" && event["object"] == object && event[key] == value
}

fn is_call(event: &Value, command: &str, result: &str) -> bool {
    event["kind"] == "call" && event["command"] == command && event["result"] == result
}

/// What went wrong in a scenario that goes on to show more: each problem is
/// printed when found (so a later panic does not hide it) and the test
/// fails at the end with all of them.
#[derive(Debug, Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, problem: String) {
        eprintln!("PROBLEM: {problem}");
        self.0.push(problem);
    }

    #[track_caller]
    fn check(self) {
        assert!(self.0.is_empty(), "{}", self.0.join("\n"));
    }
}

// --- 1. promotion refusals ----------------------------------------------------

#[test]
fn primary_without_quorum_is_refused_and_override_quorum_is_loud() {
    isolate_network();
    let mut cluster = with_witness(DISK, PING);
    up_all(&mut cluster);
    let (code, stdout, stderr) = cluster.cmd("alpha", &["skip-initial-sync"]);
    assert_eq!(code, 0, "skip-initial-sync: {stdout}{stderr}");
    for node in ["alpha", "beta"] {
        cluster.wait_status(node, "UpToDate", |s| s["disk"] == "UpToDate");
    }
    let size = cluster.status("alpha")["size_bytes"].as_u64().unwrap();

    // beta and the witness leave cleanly: alpha sees 1 of 3 voters.
    for node in ["beta", "witness"] {
        let (code, stdout, stderr) = cluster.cmd(node, &["down"]);
        assert_eq!(code, 0, "down on {node}: {stdout}{stderr}");
        assert!(cluster.wait_exit(node).success());
    }
    cluster.wait_status("alpha", "no quorum", |s| {
        s["quorum"] == false
            && s["peers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["connection"] != "Connected")
    });

    let events = cluster.events("alpha");
    let (code, stdout, stderr) = cluster.cmd("alpha", &["primary"]);
    assert_eq!(code, 3, "primary without quorum: {stdout}{stderr}");
    assert!(
        stderr.contains("refused: no quorum (sees 1 of 3 voters: alpha); needs 2"),
        "{stderr}"
    );
    let refused = events.wait_for("primary refused (call line)", |e| {
        is_call(e, "primary", "refused")
    });
    assert!(
        refused["reason"].as_str().unwrap().contains("no quorum"),
        "{refused}"
    );
    assert_eq!(cluster.status("alpha")["role"], "Secondary");
    // A refusal is also a log line.
    wait_log(&cluster, "alpha", "no quorum (sees 1 of 3 voters: alpha)");

    // --override-quorum promotes, loudly.
    let (code, stdout, stderr) = cluster.cmd("alpha", &["primary", "--override-quorum"]);
    assert_eq!(code, 0, "primary --override-quorum: {stdout}{stderr}");
    let call = events.wait_for("override recorded as a call line", |e| {
        is_call(e, "primary", "done")
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("WITHOUT QUORUM"))
    });
    assert!(
        call["reason"]
            .as_str()
            .unwrap()
            .contains("--override-quorum"),
        "{call}"
    );
    events.wait_for("role Primary", |e| {
        is_change(e, "resource", "role", "Primary")
    });
    let warning = wait_log(&cluster, "alpha", "PROMOTED WITHOUT QUORUM");
    assert!(warning.contains("WARN"), "not a warning: {warning}");
    let status = cluster.status("alpha");
    assert_eq!(status["role"], "Primary", "{status}");
    assert_eq!(status["quorum"], false, "{status}");
    assert_eq!(status["io_suspended"], false, "{status}");

    // It serves writes while the override lasts.
    let uri = cluster.nbd_uri("alpha");
    qemu_io(&uri, &["write -P 0x42 1M 1M", "read -P 0x42 1M 1M"]);

    // Quorum returns: the override ends, beta is resynced.
    cluster.up("witness");
    cluster.up("beta");
    cluster.wait_status("alpha", "quorum back", |s| {
        s["quorum"] == true && all_connected(s)
    });
    wait_log(&cluster, "alpha", "--override-quorum no longer in effect");
    wait_sync(&cluster, "alpha");
    assert_in_sync(&cluster, "alpha", "beta");
    assert_eq!(
        one_primary_with_quorum(&cluster, &["alpha", "beta", "witness"]).as_deref(),
        Some("alpha")
    );
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_disk_holds(&cluster, "beta", MIB, MIB, 0x42);
}

#[test]
fn three_data_nodes_a_cut_off_node_is_refused_and_the_majority_promotes() {
    isolate_network();
    let mut cluster = Cluster::three_nodes(DISK, PING);
    up_all(&mut cluster);
    let (code, stdout, stderr) = cluster.cmd("alpha", &["skip-initial-sync"]);
    assert_eq!(code, 0, "skip-initial-sync: {stdout}{stderr}");
    for node in ["alpha", "beta", "gamma"] {
        cluster.wait_status(node, "UpToDate", |s| s["disk"] == "UpToDate");
    }
    let size = cluster.status("alpha")["size_bytes"].as_u64().unwrap();

    let mut partition = Partition::new();
    partition.isolate(&cluster, "alpha");
    cluster.wait_status("alpha", "no quorum", |s| s["quorum"] == false);
    for node in ["beta", "gamma"] {
        cluster.wait_status(node, "alpha gone", |s| {
            peer_of(s, "alpha")["connection"] != "Connected"
        });
    }
    let (code, stdout, stderr) = cluster.cmd("alpha", &["primary"]);
    assert_eq!(code, 3, "primary on the cut-off node: {stdout}{stderr}");
    assert!(
        stderr.contains("refused: no quorum (sees 1 of 3 voters: alpha); needs 2"),
        "{stderr}"
    );

    // beta sees beta and gamma: 2 of 3.
    promote(&cluster, "beta", PROMOTE_WITHIN);
    assert_eq!(
        one_primary_with_quorum(&cluster, &["alpha", "beta", "gamma"]).as_deref(),
        Some("beta")
    );
    qemu_io(&cluster.nbd_uri("beta"), &["write -P 0x5c 0 2M"]);

    partition.heal();
    for node in ["alpha", "gamma"] {
        cluster.wait_status(node, "back in sync with beta", |s| {
            let p = peer_of(s, "beta");
            s["disk"] == "UpToDate"
                && p["connection"] == "Connected"
                && p["replication"] == "Established"
                && p["out_of_sync_bytes"] == 0
        });
    }
    wait_sync(&cluster, "beta");
    assert_in_sync(&cluster, "beta", "alpha");
    assert_in_sync(&cluster, "beta", "gamma");
    assert_identical(&cluster, &["alpha", "beta", "gamma"], size);
    assert_disk_holds(&cluster, "alpha", 0, 2 * MIB, 0x5c);
}

/// Runs `primary` on `node` until the refusal is no longer about the lost
/// Primary (its lease, or a node still connected to it); every try must be
/// refused. Returns the last refusal.
fn refused_for_good(cluster: &Cluster, node: &str, settled: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, stdout, stderr) = cluster.cmd(node, &["primary"]);
        assert_eq!(
            code,
            3,
            "{node} missed writes, yet primary gave: {stdout}{stderr}\nstatus: {}",
            cluster.status(node)
        );
        if settled(&stderr) {
            return stderr;
        }
        assert!(
            Instant::now() < deadline,
            "last refusal: {stderr}\nstatus: {}",
            cluster.status(node)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The refusal of a node whose data is older than a generation a visible
/// node knows: rule (d) ("X knows a newer generation"), or rule (c) once
/// the node has marked itself Outdated.
fn newer_generation_refusal(stderr: &str) -> bool {
    stderr.contains("knows a newer generation than this node's data")
        || stderr.contains("refused: disk is Outdated")
}

#[test]
fn a_data_node_that_missed_writes_is_refused_even_with_the_witness() {
    isolate_network();
    let mut cluster = with_witness(DISK, PING);
    let size = start_primary(&mut cluster);
    let alpha_uri = cluster.nbd_uri("alpha");
    qemu_io(&alpha_uri, &["write -P 0x11 0 1M"]);
    let old = cluster.status("alpha")["generation"].clone();

    // alpha and beta lose each other; both still see the witness. alpha
    // starts a new generation, recorded on the witness, and writes what
    // beta never gets.
    let mut partition = Partition::new();
    partition.cut(&cluster, "alpha", "beta");
    let status = cluster.wait_status("alpha", "a new generation without beta", |s| {
        peer_of(s, "beta")["connection"] != "Connected"
            && s["generation"] != old
            && s["quorum"] == true
            && s["io_suspended"] == false
    });
    let newer = status["generation"].clone();
    cluster.wait_status("witness", "the new generation recorded", |s| {
        s["known_generation"] == newer
    });
    qemu_io(&alpha_uri, &["write -P 0x22 0 1M"]);
    cluster.wait_status("beta", "alpha gone", |s| {
        peer_of(s, "alpha")["connection"] != "Connected" && s["quorum"] == true
    });
    assert_eq!(
        one_primary_with_quorum(&cluster, &["alpha", "beta", "witness"]).as_deref(),
        Some("alpha")
    );

    // alpha dies. beta has quorum with the witness's vote, but the witness
    // remembers the newer generation: beta is refused, for good.
    cluster.kill("alpha");
    let events = cluster.events("beta");
    let refusal = refused_for_good(&cluster, "beta", newer_generation_refusal);
    assert!(
        refusal.contains("refused: witness knows a newer generation")
            || refusal.contains("refused: disk is Outdated"),
        "{refusal}"
    );
    events.wait_for("the refusal as a call line", |e| {
        is_call(e, "primary", "refused")
            && e["reason"].as_str().is_some_and(newer_generation_refusal)
    });
    // --override-quorum overrides rule (a) only.
    let (code, stdout, stderr) = cluster.cmd("beta", &["primary", "--override-quorum"]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(newer_generation_refusal(&stderr), "{stderr}");
    let status = cluster.status("beta");
    assert_eq!(status["role"], "Secondary", "{status}");
    assert_eq!(status["quorum"], true, "{status}");
    assert_eq!(
        one_primary_with_quorum(&cluster, &["beta", "witness"]),
        None
    );

    // The old Primary returns with the newest data: beta is resynced from
    // it and then holds what it had missed.
    partition.heal();
    cluster.up("alpha");
    cluster.wait_status("alpha", "peers connected", all_connected);
    wait_sync(&cluster, "beta");
    assert_in_sync(&cluster, "alpha", "beta");
    promote(&cluster, "beta", PROMOTE_WITHIN);
    qemu_io(&cluster.nbd_uri("beta"), &["read -P 0x22 0 1M"]);
    assert_eq!(
        one_primary_with_quorum(&cluster, &["alpha", "beta", "witness"]).as_deref(),
        Some("beta")
    );
    assert_identical(&cluster, &["alpha", "beta"], size);
}

#[test]
fn a_restarted_data_node_that_missed_writes_becomes_outdated_and_is_refused() {
    isolate_network();
    let mut cluster = with_witness(DISK, PING);
    let size = start_primary(&mut cluster);
    let alpha_uri = cluster.nbd_uri("alpha");
    qemu_io(&alpha_uri, &["write -P 0x11 0 1M"]);
    let old = cluster.status("alpha")["generation"].clone();

    // beta dies; alpha starts a new generation, recorded on the witness,
    // and writes what beta never gets; then alpha dies too.
    cluster.kill("beta");
    let status = cluster.wait_status("alpha", "a new generation without beta", |s| {
        peer_of(s, "beta")["connection"] != "Connected"
            && s["generation"] != old
            && s["io_suspended"] == false
    });
    let newer = status["generation"].clone();
    cluster.wait_status("witness", "the new generation recorded", |s| {
        s["known_generation"] == newer
    });
    qemu_io(&alpha_uri, &["write -P 0x22 0 1M"]);
    cluster.kill("alpha");

    // beta restarts and meets the witness (a quorum) which knows a newer
    // generation: its data is complete but older, i.e. Outdated (a
    // Consistent node becomes UpToDate or Outdated on meeting a quorum),
    // and it is refused.
    cluster.up("beta");
    cluster.wait_status("beta", "witness connected", |s| {
        s["quorum"] == true && peer_of(s, "witness")["connection"] == "Connected"
    });
    let (code, stdout, stderr) = cluster.cmd("beta", &["primary"]);
    assert_eq!(
        code, 3,
        "beta missed writes, yet primary gave: {stdout}{stderr}"
    );
    let status = cluster.wait_status("beta", "Outdated after meeting the witness", |s| {
        s["disk"] == "Outdated"
    });
    assert_eq!(status["role"], "Secondary", "{status}");
    let refusal = refused_for_good(&cluster, "beta", newer_generation_refusal);
    assert!(newer_generation_refusal(&refusal), "{refusal}");

    // alpha returns with the newest data: beta is resynced from it.
    cluster.up("alpha");
    cluster.wait_status("alpha", "peers connected", all_connected);
    wait_sync(&cluster, "beta");
    assert_in_sync(&cluster, "alpha", "beta");
    promote(&cluster, "beta", PROMOTE_WITHIN);
    qemu_io(&cluster.nbd_uri("beta"), &["read -P 0x22 0 1M"]);
    assert_identical(&cluster, &["alpha", "beta"], size);
}

// --- 2. a partitioned Primary -------------------------------------------------

#[test]
fn partitioned_primary_fails_io_with_eio_and_rejoins_after_the_majority_promoted() {
    isolate_network();
    let mut cluster = with_witness(DISK, &format!("{PING}\non-no-quorum = \"io-error\""));
    let size = start_primary(&mut cluster);
    let (alpha_uri, beta_uri) = (cluster.nbd_uri("alpha"), cluster.nbd_uri("beta"));
    qemu_io(&alpha_uri, &["write -P 0x11 0 4M"]);
    let alpha_events = cluster.events("alpha");
    let alpha_all = cluster.events("alpha");
    let beta_all = cluster.events("beta");

    let mut problems = Problems::default();

    let mut partition = Partition::new();
    partition.isolate(&cluster, "alpha");
    let cut = Instant::now();
    // A write issued now fails with EIO within about the ping timeout.
    let (ok, text) = qemu_io_result(&alpha_uri, &["write -P 0x66 8M 64k"]);
    let answered_after = cut.elapsed();
    let acknowledged_when_cut = ok;
    if ok {
        problems.add(format!(
            "a write issued after the cut was acknowledged by the cut-off Primary after \
             {answered_after:?}: {text}"
        ));
    } else {
        assert!(text.contains("Input/output error"), "{text}");
        assert!(
            answered_after < PING_TIMEOUT * 2,
            "the write failed only after {answered_after:?} (ping timeout {PING_TIMEOUT:?})"
        );
    }
    alpha_events.wait_for("alpha loses quorum", |e| {
        e["kind"] == "change" && e["object"] == "resource" && e["quorum"] == false
    });
    let status = cluster.status("alpha");
    assert_eq!(status["quorum"], false, "{status}");
    assert_eq!(status["io_suspended"], false, "{status}");
    // Without a lease it serves no reads either.
    let (ok, text) = qemu_io_result(&alpha_uri, &["read 0 4k"]);
    assert!(!ok, "a read on the cut-off Primary succeeded: {text}");

    // The majority side promotes beta after the lease wait.
    promote(&cluster, "beta", PROMOTE_WITHIN);
    assert_eq!(
        one_primary_with_quorum(&cluster, &["alpha", "beta", "witness"]).as_deref(),
        Some("beta")
    );
    qemu_io(&beta_uri, &["write -P 0x77 1M 1M"]);
    if acknowledged_when_cut {
        let (held, _) = qemu_io_result(&beta_uri, &["read -P 0x66 8M 64k"]);
        if !held {
            problems.add(
                "the write alpha acknowledged after the cut is not on the new Primary: \
                 an acknowledged write was lost"
                    .into(),
            );
        }
    }
    // alpha still acknowledges nothing.
    let (ok, text) = qemu_io_result(&alpha_uri, &["write -P 0x99 2M 64k"]);
    assert!(!ok, "the old Primary acknowledged a write: {text}");
    let alpha_role = cluster.status("alpha")["role"].clone();
    assert_eq!(
        one_primary_with_quorum(&cluster, &["alpha", "beta", "witness"]).as_deref(),
        Some("beta")
    );

    // Heal: alpha recognises the newer generation, steps down (if it was
    // still Primary) and is resynced, with no manual step.
    partition.heal();
    if alpha_role == "Primary" {
        alpha_events.wait_for("alpha steps down", |e| {
            is_change(e, "resource", "role", "Secondary")
        });
    }
    let beta_generation = cluster.status("beta")["generation"].clone();
    cluster.wait_status("alpha", "resynced from beta", |s| {
        let p = peer_of(s, "beta");
        s["generation"] == beta_generation
            && s["disk"] == "UpToDate"
            && p["replication"] == "Established"
            && p["out_of_sync_bytes"] == 0
    });
    wait_sync(&cluster, "beta");
    assert_in_sync(&cluster, "alpha", "beta");
    assert_eq!(cluster.status("alpha")["role"], "Secondary");
    assert_eq!(
        one_primary_with_quorum(&cluster, &["alpha", "beta", "witness"]).as_deref(),
        Some("beta")
    );
    assert_no_split_brain_event(&alpha_all, "alpha");
    assert_no_split_brain_event(&beta_all, "beta");
    assert_identical(&cluster, &["alpha", "beta"], size);
    // The writes alpha failed are nowhere; beta's are everywhere.
    qemu_io(
        &beta_uri,
        &[
            "read -P 0x11 0 1M",
            "read -P 0x77 1M 1M",
            "read -P 0x11 2M 2M",
        ],
    );
    if !acknowledged_when_cut {
        qemu_io(&beta_uri, &["read -P 0 8M 64k"]);
    }
    problems.check();
}

#[test]
fn partitioned_primary_with_suspend_io_completes_held_writes_when_it_heals() {
    isolate_network();
    let mut cluster = with_witness(DISK, &format!("{PING}\non-no-quorum = \"suspend-io\""));
    let size = start_primary(&mut cluster);
    let alpha_uri = cluster.nbd_uri("alpha");
    qemu_io(&alpha_uri, &["write -P 0x11 0 4M"]);

    let mut partition = Partition::new();
    partition.isolate(&cluster, "alpha");
    cluster.wait_status("alpha", "no quorum, I/O suspended", |s| {
        s["quorum"] == false && s["io_suspended"] == true && s["role"] == "Primary"
    });
    let mut writer =
        qemu_io_background(&alpha_uri, &["write -P 0x55 1M 64k", "read -P 0x55 1M 64k"]);
    // Held, not failed: still waiting well past the ping timeout.
    std::thread::sleep(PING_TIMEOUT * 2);
    assert!(
        writer.try_wait().unwrap().is_none(),
        "the write during the partition did not wait"
    );
    assert_eq!(cluster.status("alpha")["io_suspended"], true);
    assert_eq!(
        one_primary_with_quorum(&cluster, &["alpha", "beta", "witness"]),
        None
    );

    partition.heal();
    let (ok, text) = qemu_io_wait(writer);
    assert!(ok, "the held write failed after the heal: {text}");
    let status = cluster.wait_status("alpha", "quorum back", |s| {
        s["quorum"] == true && s["io_suspended"] == false && all_connected(s)
    });
    assert_eq!(status["role"], "Primary");
    wait_sync(&cluster, "alpha");
    // The acknowledged write is on beta (which reports UpToDate).
    assert_disk_holds(&cluster, "beta", MIB, 64 * KIB, 0x55);
    assert_disk_holds(&cluster, "beta", MIB + 64 * KIB, 64 * KIB, 0x11);
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_in_sync(&cluster, "alpha", "beta");
    assert_eq!(
        one_primary_with_quorum(&cluster, &["alpha", "beta", "witness"]).as_deref(),
        Some("alpha")
    );
}

#[test]
fn held_writes_fail_when_the_majority_promoted_during_the_partition() {
    isolate_network();
    let mut cluster = with_witness(DISK, &format!("{PING}\non-no-quorum = \"suspend-io\""));
    let size = start_primary(&mut cluster);
    let (alpha_uri, beta_uri) = (cluster.nbd_uri("alpha"), cluster.nbd_uri("beta"));
    qemu_io(&alpha_uri, &["write -P 0x11 0 4M"]);
    let alpha_all = cluster.events("alpha");

    let mut partition = Partition::new();
    partition.isolate(&cluster, "alpha");
    cluster.wait_status("alpha", "no quorum, I/O suspended", |s| {
        s["quorum"] == false && s["io_suspended"] == true
    });
    let mut writer = qemu_io_background(&alpha_uri, &["write -P 0x55 1M 64k"]);
    promote(&cluster, "beta", PROMOTE_WITHIN);
    qemu_io(&beta_uri, &["write -P 0x77 2M 64k"]);
    assert!(
        writer.try_wait().unwrap().is_none(),
        "the write on the cut-off Primary was not held"
    );
    assert_eq!(
        one_primary_with_quorum(&cluster, &["alpha", "beta", "witness"]).as_deref(),
        Some("beta")
    );

    // Heal: alpha meets the newer generation, steps down, and fails what
    // it was holding with EIO.
    partition.heal();
    let (ok, text) = qemu_io_wait(writer);
    assert!(
        !ok,
        "a held write was acknowledged by the old Primary: {text}"
    );
    let mut problems = Problems::default();
    if !text.contains("Input/output error") {
        problems.add(format!("the held write did not fail with EIO: {text}"));
    }
    let beta_generation = cluster.status("beta")["generation"].clone();
    cluster.wait_status("alpha", "Secondary, resynced from beta", |s| {
        let p = peer_of(s, "beta");
        s["role"] == "Secondary"
            && s["generation"] == beta_generation
            && s["disk"] == "UpToDate"
            && p["replication"] == "Established"
            && p["out_of_sync_bytes"] == 0
    });
    wait_sync(&cluster, "beta");
    assert_in_sync(&cluster, "alpha", "beta");
    assert_no_split_brain_event(&alpha_all, "alpha");
    assert_identical(&cluster, &["alpha", "beta"], size);
    qemu_io(
        &beta_uri,
        &[
            "read -P 0x11 1M 64k",
            "read -P 0x77 2M 64k",
            "read -P 0x11 3M 1M",
        ],
    );
    assert_eq!(
        one_primary_with_quorum(&cluster, &["alpha", "beta", "witness"]).as_deref(),
        Some("beta")
    );
    problems.check();
}

// --- 3. two-node split-brain ----------------------------------------------------

/// Two nodes with `quorum = "off"`, alpha Primary with 0x11 over the first
/// 4 MiB; cut apart, beta promoted too. Returns the data size and the cut.
fn split_brain_setup(cluster: &mut Cluster) -> (u64, Partition) {
    let size = start_primary(cluster);
    qemu_io(&cluster.nbd_uri("alpha"), &["write -P 0x11 0 4M"]);
    wait_sync(cluster, "alpha");
    let mut partition = Partition::new();
    partition.cut(cluster, "alpha", "beta");
    cluster.wait_status("alpha", "beta gone", |s| {
        peer_of(s, "beta")["connection"] != "Connected"
    });
    cluster.wait_status("beta", "alpha gone", |s| {
        peer_of(s, "alpha")["connection"] != "Connected"
    });
    // With quorum off both may be Primary: that is the split-brain.
    promote(cluster, "beta", PROMOTE_WITHIN);
    for node in ["alpha", "beta"] {
        let status = cluster.status(node);
        assert_eq!(status["role"], "Primary", "{node}: {status}");
    }
    (size, partition)
}

#[test]
fn two_node_split_brain_is_detected_and_resolved_by_discard_my_data() {
    isolate_network();
    let mut cluster = Cluster::two_nodes(DISK, &format!("{PING}\nquorum = \"off\""));
    let (size, mut partition) = split_brain_setup(&mut cluster);
    let (alpha_uri, beta_uri) = (cluster.nbd_uri("alpha"), cluster.nbd_uri("beta"));
    qemu_io(&alpha_uri, &["write -P 0xaa 1M 64k"]);
    qemu_io(&beta_uri, &["write -P 0xbb 2M 64k"]);
    let alpha_events = cluster.events("alpha");
    let beta_events = cluster.events("beta");
    // What goes wrong without stopping the scenario (checked at the end).
    let mut problems = Problems::default();

    partition.heal();
    for (node, peer, events) in [
        ("alpha", "beta", &alpha_events),
        ("beta", "alpha", &beta_events),
    ] {
        events.wait_for(&format!("{node}: split-brain with {peer}"), |e| {
            e["object"] == "connection" && e["peer"] == peer && e["split_brain"] == true
        });
        let status = cluster.wait_status(node, "StandAlone", |s| {
            peer_of(s, peer)["connection"] == "StandAlone"
        });
        let p = peer_of(&status, peer);
        assert_eq!(p["split_brain"], true, "{node}: {status}");
        assert_eq!(status["role"], "Primary", "{node}: {status}");
    }
    // wait-sync refuses at once on split-brain.
    let (code, stdout, stderr) = cluster.cmd("alpha", &["wait-sync", "--timeout", "10s"]);
    assert_eq!(code, 3, "wait-sync during split-brain: {stdout}{stderr}");

    // Nothing was overwritten: each side still holds what it wrote, and
    // only that.
    assert_disk_holds(&cluster, "alpha", MIB, 64 * KIB, 0xaa);
    assert_disk_holds(&cluster, "alpha", 2 * MIB, 64 * KIB, 0x11);
    assert_disk_holds(&cluster, "beta", MIB, 64 * KIB, 0x11);
    assert_disk_holds(&cluster, "beta", 2 * MIB, 64 * KIB, 0xbb);
    // Both are still Primary (status says so): each serves its own data.
    for (uri, commands) in [
        (&alpha_uri, ["read -P 0xaa 1M 64k", "read -P 0x11 2M 64k"]),
        (&beta_uri, ["read -P 0x11 1M 64k", "read -P 0xbb 2M 64k"]),
    ] {
        let (ok, text) = qemu_io_result(uri, &commands);
        if !ok {
            problems.add(format!(
                "a Primary in split-brain (status role Primary) does not serve {uri}: {text}"
            ));
        }
    }

    // beta is the victim.
    let (code, stdout, stderr) = cluster.cmd("beta", &["secondary"]);
    assert_eq!(code, 0, "secondary on beta: {stdout}{stderr}");
    let (code, stdout, stderr) = cluster.cmd("beta", &["connect", "--discard-my-data"]);
    assert_eq!(code, 0, "connect --discard-my-data: {stdout}{stderr}");
    let (code, stdout, stderr) = cluster.cmd("alpha", &["connect"]);
    assert_eq!(code, 0, "connect on alpha: {stdout}{stderr}");
    let alpha_generation = cluster.status("alpha")["generation"].clone();
    cluster.wait_status("beta", "resynced from alpha", |s| {
        let p = peer_of(s, "alpha");
        s["generation"] == alpha_generation
            && s["disk"] == "UpToDate"
            && p["replication"] == "Established"
            && p["out_of_sync_bytes"] == 0
    });
    assert!(
        beta_events
            .drain()
            .iter()
            .any(|e| e["object"] == "peer-device"
                && e["peer"] == "alpha"
                && e["replication"] == "SyncTarget"),
        "beta was never SyncTarget"
    );
    wait_sync(&cluster, "beta");
    wait_sync(&cluster, "alpha");
    assert_in_sync(&cluster, "alpha", "beta");
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_disk_holds(&cluster, "beta", MIB, 64 * KIB, 0xaa);
    assert_disk_holds(&cluster, "beta", 2 * MIB, 64 * KIB, 0x11);
    assert_eq!(cluster.status("alpha")["role"], "Primary");
    assert_eq!(cluster.status("beta")["role"], "Secondary");
    // The survivor goes on serving.
    let (ok, text) = qemu_io_result(&alpha_uri, &["write -P 0xcc 3M 64k", "read -P 0xaa 1M 64k"]);
    if !ok {
        problems.add(format!(
            "the survivor (status role Primary) does not serve after the resolution: {text}"
        ));
    }
    problems.check();
}

#[test]
fn discard_zero_changes_resolves_a_split_brain_where_one_side_wrote_nothing() {
    isolate_network();
    let mut cluster = Cluster::two_nodes(
        DISK,
        &format!("{PING}\nquorum = \"off\"\nafter-split-brain = \"discard-zero-changes\""),
    );
    let (size, mut partition) = split_brain_setup(&mut cluster);
    // beta was promoted in its own generation but writes nothing.
    let (code, stdout, stderr) = cluster.cmd("beta", &["secondary"]);
    assert_eq!(code, 0, "secondary on beta: {stdout}{stderr}");
    qemu_io(&cluster.nbd_uri("alpha"), &["write -P 0xaa 1M 64k"]);
    let alpha_all = cluster.events("alpha");
    let beta_events = cluster.events("beta");

    partition.heal();
    let alpha_generation = cluster.status("alpha")["generation"].clone();
    cluster.wait_status("beta", "resynced from alpha", |s| {
        let p = peer_of(s, "alpha");
        s["generation"] == alpha_generation
            && s["disk"] == "UpToDate"
            && p["connection"] == "Connected"
            && p["replication"] == "Established"
            && p["out_of_sync_bytes"] == 0
    });
    let seen = beta_events.drain();
    assert!(
        seen.iter().any(|e| e["object"] == "peer-device"
            && e["peer"] == "alpha"
            && e["replication"] == "SyncTarget"),
        "beta was never SyncTarget: {seen:?}"
    );
    assert!(
        !seen.iter().any(|e| e["split_brain"] == true),
        "beta reported a split-brain: {seen:?}"
    );
    wait_sync(&cluster, "beta");
    wait_sync(&cluster, "alpha");
    assert_in_sync(&cluster, "alpha", "beta");
    assert_no_split_brain_event(&alpha_all, "alpha");
    assert_identical(&cluster, &["alpha", "beta"], size);
    assert_disk_holds(&cluster, "beta", MIB, 64 * KIB, 0xaa);
    wait_log(&cluster, "beta", "discard-zero-changes");
}

// --- 4. auto-promote ----------------------------------------------------------

#[test]
fn auto_promote_promotes_on_the_first_client_and_demotes_after_the_last() {
    isolate_network();
    let mut cluster = with_witness(DISK, &format!("{PING}\nauto-promote = true"));
    up_all(&mut cluster);
    let (code, stdout, stderr) = cluster.cmd("alpha", &["skip-initial-sync"]);
    assert_eq!(code, 0, "skip-initial-sync: {stdout}{stderr}");
    for node in ["alpha", "beta"] {
        cluster.wait_status(node, "UpToDate", |s| s["disk"] == "UpToDate");
    }
    let (alpha_uri, beta_uri) = (cluster.nbd_uri("alpha"), cluster.nbd_uri("beta"));
    assert_eq!(cluster.status("alpha")["role"], "Secondary");

    let alpha_events = cluster.events("alpha");
    qemu_io(&alpha_uri, &["write -P 0x31 0 64k", "read -P 0x31 0 64k"]);
    let left = Instant::now();
    alpha_events.wait_for("alpha auto-promoted", |e| {
        is_change(e, "resource", "role", "Primary")
    });
    alpha_events.wait_for("alpha demoted after the last client", |e| {
        is_change(e, "resource", "role", "Secondary")
    });
    let after = left.elapsed();
    assert!(
        after >= Duration::from_millis(500) && after <= Duration::from_secs(3),
        "demoted {after:?} after the last client left (about a second expected)"
    );

    // While a client holds alpha, beta cannot be auto-promoted.
    let client = HeldClient::connect(&alpha_uri);
    cluster.wait_status("alpha", "Primary with a client", |s| {
        s["role"] == "Primary" && s["nbd"]["clients"] == 1
    });
    let beta_events = cluster.events("beta");
    let (ok, text) = qemu_io_result(&beta_uri, &["read 0 4k"]);
    assert!(!ok, "beta served a client while alpha is Primary: {text}");
    beta_events.wait_for("the refused promotion as a call line", |e| {
        e["kind"] == "call" && e["result"] == "refused"
    });
    assert_eq!(cluster.status("beta")["role"], "Secondary");
    assert_eq!(
        one_primary_with_quorum(&cluster, &["alpha", "beta", "witness"]).as_deref(),
        Some("alpha")
    );
    client.close();
    alpha_events.wait_for("alpha demoted again", |e| {
        is_change(e, "resource", "role", "Secondary")
    });

    // Now a client of beta promotes beta, and it has alpha's data.
    qemu_io(&beta_uri, &["read -P 0x31 0 64k", "write -P 0x32 64k 64k"]);
    beta_events.wait_for("beta auto-promoted", |e| {
        is_change(e, "resource", "role", "Primary")
    });
    beta_events.wait_for("beta demoted", |e| {
        is_change(e, "resource", "role", "Secondary")
    });
    wait_sync(&cluster, "beta");
    assert_disk_holds(&cluster, "alpha", 64 * KIB, 64 * KIB, 0x32);
}

// --- 5. secondary and down with clients attached ------------------------------

/// alpha Primary with a held client; beta stopped so that a write the
/// client sends now stays in flight (protocol C waits for beta) until beta
/// is declared lost. Returns the client with the write (0x5a at `offset`)
/// in flight, and its answer if it came already (after beta's loss).
fn client_with_a_write_in_flight(cluster: &Cluster, offset: u64) -> (HeldClient, Option<String>) {
    let mut client = HeldClient::connect(&cluster.nbd_uri("alpha"));
    cluster.wait_status("alpha", "one client", |s| s["nbd"]["clients"] == 1);
    // The client works, and commands refuse while it is attached.
    assert_eq!(client.eval("h.pwrite(b'\\x21' * 4096, 0)"), "ok ");
    for command in ["secondary", "down"] {
        let (code, stdout, stderr) = cluster.cmd("alpha", &[command]);
        assert_eq!(
            code, 3,
            "{command} with a client attached: {stdout}{stderr}"
        );
        assert!(stderr.contains("NBD client(s) attached"), "{stderr}");
        assert!(stderr.contains("--force"), "{stderr}");
    }
    assert_eq!(cluster.status("alpha")["role"], "Primary");

    cluster.stop("beta");
    client.send(&format!("h.pwrite(b'\\x5a' * 65536, {offset})"));
    // Protocol C: with beta stopped, the write is acknowledged only once
    // alpha has handled beta's loss (a ping timeout later). Should an
    // answer come already, alpha must by then have dropped beta.
    let early = client.answer(Duration::from_millis(300));
    if early.is_some() {
        let status = cluster.status("alpha");
        assert_ne!(
            peer_of(&status, "beta")["connection"],
            "Connected",
            "a protocol C write was acknowledged while its only data peer was stopped and still connected: {status}"
        );
    }
    (client, early)
}

#[test]
fn secondary_refuses_with_clients_and_force_finishes_in_flight_writes() {
    isolate_network();
    let mut cluster = with_witness(DISK, PING);
    let size = start_primary(&mut cluster);
    let events = cluster.events("alpha");
    let (mut client, early) = client_with_a_write_in_flight(&cluster, MIB);
    events.wait_for("secondary refused (call line)", |e| {
        is_call(e, "secondary", "refused")
    });

    let (code, stdout, stderr) = cluster.cmd("alpha", &["secondary", "--force"]);
    assert_eq!(code, 0, "secondary --force: {stdout}{stderr}");
    // The write in flight was acknowledged, then the client was cut off.
    assert_eq!(
        early.or_else(|| client.answer(WAIT)).as_deref(),
        Some("ok "),
        "the in-flight write was not acknowledged"
    );
    let next = client.eval("h.pread(4096, 0)");
    assert!(
        next.starts_with("error"),
        "a request after demotion: {next}"
    );
    let status = cluster.status("alpha");
    assert_eq!(status["role"], "Secondary", "{status}");
    assert_eq!(status["nbd"]["clients"], 0, "{status}");
    drop(client);

    // beta returns and is resynced; promoted, it holds the write.
    cluster.signal("beta", libc::SIGCONT);
    cluster.wait_status("alpha", "beta back", all_connected);
    wait_sync(&cluster, "alpha");
    promote(&cluster, "beta", PROMOTE_WITHIN);
    qemu_io(&cluster.nbd_uri("beta"), &["read -P 0x5a 1M 64k"]);
    assert_identical(&cluster, &["alpha", "beta"], size);
}

#[test]
fn down_refuses_with_clients_and_force_finishes_in_flight_writes() {
    isolate_network();
    let mut cluster = with_witness(DISK, PING);
    let size = start_primary(&mut cluster);
    let events = cluster.events("alpha");
    let (mut client, early) = client_with_a_write_in_flight(&cluster, 2 * MIB);
    events.wait_for("down refused (call line)", |e| {
        is_call(e, "down", "refused")
    });

    let (code, stdout, stderr) = cluster.cmd("alpha", &["down", "--force"]);
    assert_eq!(code, 0, "down --force: {stdout}{stderr}");
    assert_eq!(
        early.or_else(|| client.answer(WAIT)).as_deref(),
        Some("ok "),
        "the in-flight write was not acknowledged"
    );
    let status = cluster.wait_exit("alpha");
    assert!(status.success(), "alpha exited with {status}");
    let next = client.eval("h.pread(4096, 0)");
    assert!(next.starts_with("error"), "a request after down: {next}");
    drop(client);

    // alpha comes back with the newest data; beta is resynced and, once
    // promoted, holds the write.
    cluster.signal("beta", libc::SIGCONT);
    cluster.up("alpha");
    cluster.wait_status("alpha", "peers back", all_connected);
    wait_sync(&cluster, "beta");
    promote(&cluster, "beta", PROMOTE_WITHIN);
    qemu_io(&cluster.nbd_uri("beta"), &["read -P 0x5a 2M 64k"]);
    assert_identical(&cluster, &["alpha", "beta"], size);
}

#[test]
fn down_refuses_when_the_primary_would_lose_quorum() {
    isolate_network();
    // The witness never starts: alpha is Primary with 2 of 3 voters.
    let mut cluster = with_witness(DISK, PING);
    cluster.up("alpha");
    cluster.up("beta");
    cluster.wait_status("alpha", "beta connected", |s| {
        let beta = peer_of(s, "beta");
        beta["connection"] == "Connected" && beta["peer_disk"] != "DUnknown"
    });
    let (code, stdout, stderr) = cluster.cmd("alpha", &["skip-initial-sync"]);
    assert_eq!(code, 0, "skip-initial-sync: {stdout}{stderr}");
    cluster.wait_status("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    let (code, stdout, stderr) = cluster.cmd("alpha", &["primary"]);
    assert_eq!(code, 0, "primary: {stdout}{stderr}");
    cluster.wait_status("beta", "alpha seen as Primary", |s| {
        peer_of(s, "alpha")["role"] == "Primary"
    });

    let (code, stdout, stderr) = cluster.cmd("beta", &["down"]);
    assert_eq!(
        code, 3,
        "down that costs alpha its quorum: {stdout}{stderr}"
    );
    assert!(
        stderr.contains("alpha is Primary and would lose quorum if beta left"),
        "{stderr}"
    );
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(cluster.status("alpha")["quorum"], true);

    let (code, stdout, stderr) = cluster.cmd("beta", &["down", "--force"]);
    assert_eq!(code, 0, "down --force: {stdout}{stderr}");
    assert!(cluster.wait_exit("beta").success());
    cluster.wait_status("alpha", "no quorum without beta", |s| s["quorum"] == false);
}

// --- 6. durability rounds -------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
    Partition,
}

/// The seed of a run: `HABLK_DURABILITY_SEED` to replay one, else random.
fn base_seed() -> u64 {
    std::env::var("HABLK_DURABILITY_SEED")
        .ok()
        .map(|s| s.trim().parse().expect("HABLK_DURABILITY_SEED is a number"))
        .unwrap_or_else(|| rand::thread_rng().gen())
}

fn durability_rounds(fault: Fault, rounds: u16) {
    isolate_network();
    let base = base_seed();
    eprintln!(
        "durability rounds ({fault:?}): seed {base} (replay with HABLK_DURABILITY_SEED={base})"
    );
    let started = Instant::now();
    for round in 0..rounds {
        let seed = base.wrapping_add(u64::from(round).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        durability_round(fault, round, seed);
    }
    eprintln!(
        "durability rounds ({fault:?}): {rounds} rounds in {:?}",
        started.elapsed()
    );
}

/// Looks at every node in `nodes`; records two Primaries with quorum as a
/// problem (once per `when`). Returns the Primary with quorum, if one.
fn look(
    cluster: &Cluster,
    nodes: &[&str],
    when: &str,
    problems: &mut Vec<String>,
) -> Option<String> {
    match primary_with_quorum(cluster, nodes) {
        Ok(primary) => primary,
        Err(problem) => {
            if !problems.iter().any(|p| p.starts_with(when)) {
                problems.push(format!("{when}: {problem}"));
            }
            None
        }
    }
}

fn durability_round(fault: Fault, round: u16, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let three_data = rng.gen_bool(0.3);
    let suspend = rng.gen_bool(0.5);
    let delay = Duration::from_millis(rng.gen_range(100..1200));
    let blocks: u64 = rng.gen_range(512..4096);
    let cut_mode = rng.gen_range(0..3u8);
    let survivor = if three_data && rng.gen_bool(0.5) {
        "gamma"
    } else {
        "beta"
    };
    let specs = if three_data {
        vec![
            NodeSpec::data("alpha", 0, DISK),
            NodeSpec::data("beta", 1, DISK),
            NodeSpec::data("gamma", 2, DISK),
        ]
    } else {
        vec![
            NodeSpec::data("alpha", 0, DISK),
            NodeSpec::data("beta", 1, DISK),
            witness_spec("witness", 2),
        ]
    };
    let policy = if suspend { "suspend-io" } else { "io-error" };
    let cut = match (fault, cut_mode) {
        (Fault::Partition, 0) => ", cut both ways",
        (Fault::Partition, 1) => ", cut what alpha sends",
        (Fault::Partition, _) => ", cut what alpha receives",
        _ => "",
    };
    let what = format!(
        "{fault:?}{cut}, {}, on-no-quorum {policy}, fault after {delay:?}, {blocks} blocks, \
         promote {survivor}",
        if three_data {
            "3 data nodes"
        } else {
            "2 data + witness"
        }
    );
    eprintln!("round {round}: seed {seed}: {what}");
    // Fresh ports each round: nothing of the last round's cluster answers.
    let offset = 10 * (round % 100);
    let mut cluster = Cluster::new(
        shift_ports(specs, offset),
        &format!("{PING}\non-no-quorum = \"{policy}\""),
    );
    let all = names(&cluster);
    start_primary(&mut cluster);
    let others: Vec<String> = all.iter().filter(|n| *n != "alpha").cloned().collect();
    let mut problems: Vec<String> = Vec::new();

    let tail = match fault {
        Fault::Kill | Fault::Stop => 1.0,
        Fault::Partition => 2.5,
    };
    let mut checker = Checker::start(
        &cluster.nbd_uri("alpha"),
        cluster.dir.path(),
        blocks,
        seed,
        delay.as_secs_f64() + tail,
    );
    checker.wait_acknowledged(1);
    std::thread::sleep(delay);
    assert_eq!(
        one_primary_with_quorum(&cluster, &refs(&all)).as_deref(),
        Some("alpha")
    );

    let mut partition = None;
    match fault {
        Fault::Kill => cluster.kill("alpha"),
        Fault::Stop => cluster.signal("alpha", libc::SIGSTOP),
        Fault::Partition => {
            let mut cut = Partition::new();
            match cut_mode {
                0 => cut.isolate(&cluster, "alpha"),
                1 => cut.isolate_outgoing(&cluster, "alpha"),
                _ => cut.isolate_incoming(&cluster, "alpha"),
            }
            partition = Some(cut);
        }
    }
    let reachable: Vec<&str> = match fault {
        Fault::Partition => refs(&all),
        Fault::Kill | Fault::Stop => refs(&others),
    };

    // Promote a surviving data node, looking at everyone between tries.
    let started = Instant::now();
    loop {
        look(&cluster, &reachable, "while promoting", &mut problems);
        let (code, stdout, stderr) = cluster.cmd(survivor, &["primary"]);
        if code == 0 {
            break;
        }
        assert_eq!(code, 3, "primary on {survivor}: {stdout}{stderr}");
        assert!(
            started.elapsed() < PROMOTE_WITHIN,
            "round {round} (seed {seed}): {survivor} not promoted after {:?}: {stderr}\n{}",
            started.elapsed(),
            problems.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let promoted_after = started.elapsed();
    let primary = look(
        &cluster,
        &reachable,
        "right after the promotion",
        &mut problems,
    );
    if primary.as_deref() != Some(survivor) && problems.is_empty() {
        problems.push(format!(
            "right after the promotion, the Primary with quorum is {primary:?}, not {survivor}"
        ));
    }

    // Let the old Primary go on as it would, then end the writer.
    match fault {
        Fault::Kill => {}
        Fault::Stop => {
            cluster.signal("alpha", libc::SIGCONT);
            look(&cluster, &refs(&all), "right after SIGCONT", &mut problems);
        }
        Fault::Partition => {
            look(&cluster, &refs(&all), "during the partition", &mut problems);
            if suspend {
                // Held writes end only when alpha meets the newer
                // generation.
                partition.as_mut().unwrap().heal();
            }
        }
    }
    let summary = checker.finish(WAIT).unwrap_or_else(|problem| {
        problems.push(format!("the writer to alpha: {problem}"));
        String::new()
    });
    if let Some(cut) = partition.as_mut() {
        cut.heal();
    }
    if fault != Fault::Kill {
        // The old Primary meets the newer generation: it steps down, with
        // no split-brain flagged anywhere.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            look(
                &cluster,
                &refs(&all),
                "after the old Primary came back",
                &mut problems,
            );
            let alpha = cluster.status("alpha");
            let new = cluster.status(survivor);
            let flagged = [&alpha, &new].iter().any(|s| {
                s["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["split_brain"] == true)
            });
            if alpha["role"] == "Secondary"
                && alpha["quorum"] == true
                && alpha["generation"] == new["generation"]
                && !flagged
            {
                break;
            }
            if flagged || Instant::now() > deadline {
                problems.push(format!(
                    "the old Primary did not rejoin under {survivor}'s generation{}:\nalpha: {alpha}\n{survivor}: {new}",
                    if flagged { " (split-brain flagged)" } else { " within 10 s" }
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let primary = look(&cluster, &reachable, "at the end", &mut problems);
    if primary.as_deref() != Some(survivor) {
        problems.push(format!(
            "at the end, the Primary with quorum is {primary:?}, not {survivor}"
        ));
    }

    let verified = match checker.verify(&cluster.nbd_uri(survivor)) {
        Ok(verified) => verified,
        Err((1, violations)) => {
            problems.push(format!(
                "acknowledged writes lost on {survivor}:\n{violations}"
            ));
            String::new()
        }
        Err((_, why)) => {
            problems.push(format!(
                "{survivor} (status role {}) does not serve: {why}",
                cluster.status(survivor)["role"]
            ));
            // What it holds, read from its disk.
            match checker.verify_disk(
                &cluster.disk(survivor),
                &format!("127.0.0.9:{}", 10900 + offset),
            ) {
                Ok(verified) => verified,
                Err((_, violations)) => {
                    problems.push(format!(
                        "acknowledged writes lost on {survivor}'s disk:\n{violations}"
                    ));
                    String::new()
                }
            }
        }
    };
    eprintln!("round {round}: promoted after {promoted_after:?}; {summary}; {verified}");
    if summary.contains(" 0 acknowledged") {
        problems.push(format!(
            "nothing was acknowledged before the fault: {summary}"
        ));
    }
    if !problems.is_empty() {
        // The daemons' side, without the per-request and per-state noise.
        for node in &all {
            eprintln!("--- {node} log (filtered) ---");
            for line in log_text(&cluster, node)
                .lines()
                .filter(|l| !l.contains("NBD request failed") && !l.contains("state Change"))
            {
                eprintln!("{line}");
            }
        }
    }
    assert!(
        problems.is_empty(),
        "round {round} (seed {seed}: {what}) failed:\n{}",
        problems.join("\n")
    );
}

#[test]
fn durability_rounds_kill_9() {
    durability_rounds(Fault::Kill, 7);
}

#[test]
fn durability_rounds_sigstop() {
    durability_rounds(Fault::Stop, 7);
}

#[test]
fn durability_rounds_partition() {
    durability_rounds(Fault::Partition, 7);
}

// --- 7. file system failover ---------------------------------------------------

#[test]
fn ext4_survives_kill_9_of_the_primary_and_mounts_on_the_promoted_node() {
    isolate_network();
    let mut cluster = with_witness(64 * MIB, PING);
    start_primary(&mut cluster);
    let dir = tempfile::tempdir().unwrap();
    let sources = cluster.dir.path().join("sources");
    std::fs::create_dir_all(sources.join("dir")).unwrap();
    let files: [(&str, u64); 4] = [
        ("big", 8 * MIB),
        ("medium", 3 * MIB + 4321),
        ("small", 100),
        ("dir/nested", 200_000),
    ];
    for (name, bytes) in files {
        random_file(&sources.join(name), bytes);
    }

    let mut fs = ExportFs::attach(&cluster.nbd_uri("alpha"), dir.path(), "alpha");
    fs.mkfs();
    fs.mount();
    std::fs::create_dir(fs.mount_dir.join("dir")).unwrap();
    for (name, _) in files {
        let target = fs.mount_dir.join(name);
        std::fs::copy(sources.join(name), &target).unwrap();
        run_ok(Command::new("sync").arg("-f").arg(&target));
    }
    // More, not synced: it may or may not survive, but the file system
    // must stay consistent.
    random_file(&fs.mount_dir.join("unsynced"), 2 * MIB);

    cluster.kill("alpha");
    fs.abandon();

    promote(&cluster, "beta", PROMOTE_WITHIN);
    assert_eq!(
        one_primary_with_quorum(&cluster, &["beta", "witness"]).as_deref(),
        Some("beta")
    );
    let mut fs = ExportFs::attach(&cluster.nbd_uri("beta"), dir.path(), "beta");
    // Mounting replays the journal.
    fs.mount();
    for (name, bytes) in files {
        let target = fs.mount_dir.join(name);
        assert_eq!(
            std::fs::metadata(&target).map(|m| m.len()).ok(),
            Some(bytes),
            "{name}"
        );
        assert_eq!(
            md5_of(&target, bytes),
            md5_of(&sources.join(name), bytes),
            "{name}"
        );
    }
    fs.umount();
    let (code, output) = fs.fsck();
    assert_eq!(code, 0, "fsck.ext4 -n -f found problems:\n{output}");
    fs.detach();
}
