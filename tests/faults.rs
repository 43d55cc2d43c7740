//! Faults injected inside the daemon (a build with the `failpoints`
//! feature; `scripts/test.sh` runs the suite that way). Without the feature
//! this file has no tests.
#![cfg(feature = "failpoints")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::*;

const DISK: u64 = 64 << 20;

/// Every peer frame carries a crc32c: a frame damaged on the wire drops the
/// connection (counted in status), the connection is re-established, no
/// damaged byte reaches a disk, and the nodes end identical.
#[test]
fn corrupted_frames_drop_the_connection_and_write_nothing_bad() {
    isolate_network();
    let nodes = vec![
        NodeSpec::data("alpha", 0, DISK),
        NodeSpec::data("beta", 1, DISK),
    ];
    let mut cluster = Cluster::new(nodes, "ping-timeout = \"1s\"\nquorum = \"off\"");
    // About one frame in thirty from alpha is damaged after its checksum.
    cluster.up_with_env("alpha", &[("FAILPOINTS", "peer-corrupt-frame=3%return")]);
    cluster.up("beta");
    wait_for("alpha and beta to connect", || {
        (cluster.status("alpha")["peers"][0]["connection"] == "Connected").then_some(())
    });
    // Connections drop now and then: retry until the cluster-wide steps go
    // through.
    wait_for("skip-initial-sync", || {
        (cluster.cmd("alpha", &["skip-initial-sync"]).0 == 0).then_some(())
    });
    wait_for("primary", || {
        (cluster.cmd("alpha", &["primary"]).0 == 0).then_some(())
    });
    let uri = cluster.nbd_uri("alpha");
    for round in 0..20u64 {
        let pattern = format!("write -P {} {}M 1M", round + 1, round);
        run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", &pattern, &uri]));
    }
    wait_for("damaged frames to be noticed", || {
        let beta = cluster.status("beta");
        (beta["peers"][0]["corrupt_frames"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    let log = std::fs::read_to_string(cluster.log("beta")).unwrap();
    assert!(
        log.contains("checksum mismatch"),
        "beta logs the damaged frame"
    );
    // Stop damaging (a restart without the fault point), let them reconnect
    // and resync what the drops missed.
    cluster.kill("alpha");
    cluster.up("alpha");
    wait_for("alpha and beta to reconnect", || {
        let beta = cluster.status("beta");
        (beta["peers"][0]["connection"] == "Connected" && beta["disk"] == "UpToDate").then_some(())
    });
    assert_eq!(cluster.cmd("beta", &["wait-sync", "--timeout", "30s"]).0, 0);
    let size = cluster.status("beta")["size_bytes"].as_u64().unwrap();
    assert_eq!(
        md5_of(&cluster.disk("alpha"), size),
        md5_of(&cluster.disk("beta"), size),
        "no damaged byte was written and everything was resynced"
    );
}

/// A node that becomes a resync target first records its disk as
/// Inconsistent, so that a crash mid-resync never leaves half-overwritten
/// data recorded as current. If that superblock write fails, the node takes
/// no block: its disk counts as failed (Diskless), the source is refused,
/// and after a restart with a working disk it resyncs and ends identical.
#[test]
fn a_sync_target_that_cannot_record_inconsistent_takes_no_data() {
    isolate_network();
    let nodes = vec![
        NodeSpec::data("alpha", 0, DISK),
        NodeSpec::data("beta", 1, DISK),
    ];
    let mut cluster = Cluster::new(nodes, "ping-timeout = \"1s\"\nquorum = \"off\"");
    cluster.up("alpha");
    cluster.up("beta");
    wait_all_connected(&cluster, "alpha");
    run_ok(cluster.hablk("alpha").arg("skip-initial-sync"));
    run_ok(cluster.hablk("alpha").arg("primary"));
    let size = cluster.status("alpha")["size_bytes"].as_u64().unwrap();
    cluster.kill("beta");
    let uri = cluster.nbd_uri("alpha");
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 1M 4M", &uri]));
    let beta_before = cluster.data_md5("beta", size);

    cluster.up_with_env(
        "beta",
        &[("FAILPOINTS", "sync-target-persist-fails=return")],
    );
    cluster.wait_status("beta", "beta's disk given up", |s| s["disk"] == "Diskless");
    wait_log(
        &cluster,
        "beta",
        "could not record its disk as Inconsistent",
    );
    let alpha = cluster.status("alpha");
    assert_eq!(alpha["role"], "Primary", "{alpha}");
    assert_eq!(alpha["disk"], "UpToDate", "{alpha}");
    assert_eq!(
        cluster.data_md5("beta", size),
        beta_before,
        "beta took resync data"
    );

    // A working disk again: the resync goes through.
    cluster.kill("beta");
    cluster.up("beta");
    cluster.wait_status("beta", "beta resynced", |s| {
        s["disk"] == "UpToDate" && s["peers"][0]["replication"] == "Established"
    });
    assert_in_sync(&cluster, "alpha", "beta");
}
