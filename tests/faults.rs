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
