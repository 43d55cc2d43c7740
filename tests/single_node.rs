//! A single-node resource driven through the CLI: metadata, roles, the
//! control socket, and what NBD clients see in each role.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::*;

const DISK: u64 = 64 << 20;

#[test]
fn up_refuses_a_disk_without_metadata_and_says_to_run_create_md() {
    isolate_network();
    let cluster = Cluster::single(DISK, "");
    // Wipe the metadata create-md wrote.
    let disk = cluster.disk("alpha");
    std::fs::File::create(&disk).unwrap().set_len(DISK).unwrap();
    let (code, _, stderr) = cluster.cmd("alpha", &["up"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("run `hablk create-md` first"), "{stderr}");
}

#[test]
fn create_md_refuses_to_overwrite_without_force() {
    isolate_network();
    let cluster = Cluster::single(DISK, "");
    let (code, _, stderr) = cluster.cmd("alpha", &["create-md"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--force"), "{stderr}");
    let (code, _, _) = cluster.cmd("alpha", &["create-md", "--force"]);
    assert_eq!(code, 0);
}

#[test]
fn bad_config_is_refused_with_exit_2_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[resource]\nname = \"r0\"\nprotocl = \"C\"\n").unwrap();
    let output = run(Command::new(hablk_bin())
        .arg("-c")
        .arg(&config)
        .args(["-n", "alpha", "status"]));
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.toml:3"), "{stderr}");
    assert!(stderr.contains("protocl"), "{stderr}");
}

#[test]
fn commands_without_a_daemon() {
    isolate_network();
    let cluster = Cluster::single(DISK, "");
    let (code, _, stderr) = cluster.cmd("alpha", &["status"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("not running"), "{stderr}");
    let (code, _, _) = cluster.cmd("alpha", &["down"]);
    assert_eq!(code, 0, "down with no daemon is done");
    let (code, _, stderr) = cluster.cmd("alpha", &["verify"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("not running"), "{stderr}");
}

#[test]
fn roles_status_and_nbd_export() {
    isolate_network();
    let mut cluster = Cluster::single(DISK, "");
    cluster.up("alpha");
    let uri = cluster.nbd_uri("alpha");

    let status = cluster.status("alpha");
    assert_eq!(status["role"], "Secondary");
    assert_eq!(status["disk"], "UpToDate", "a lone data node is current");
    assert_eq!(status["quorum"], true);
    assert_eq!(status["generation"], "0000000000000000");

    // Secondary: OPT_GO is refused with the reason.
    let refused = nbdsh(&uri, "pass");
    assert!(!refused.status.success());

    let events = cluster.events("alpha");
    let (code, stdout, _) = cluster.cmd("alpha", &["primary"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("Primary"), "{stdout}");
    events.wait_for("role change to Primary", |e| {
        e["kind"] == "change" && e["object"] == "resource" && e["role"] == "Primary"
    });
    let (code, _, _) = cluster.cmd("alpha", &["primary"]);
    assert_eq!(code, 0, "primary on a Primary is done");

    let status = cluster.status("alpha");
    assert_eq!(status["role"], "Primary");
    assert_ne!(
        status["generation"], "0000000000000000",
        "promotion starts a generation"
    );
    assert_eq!(status["generation"], status["known_generation"]);
    let size = status["size_bytes"].as_u64().unwrap();
    assert!(
        size > 0 && size < DISK,
        "metadata takes the end of the disk"
    );

    let info = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"].as_u64().unwrap(), size);
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["can_fua"], true);
    assert_eq!(export["block_size_maximum"], 32 << 20);

    // A client stays attached while we try to demote.
    let mut client = nbdsh_command()
        .args(["-u", &uri, "-c", "import time; time.sleep(60)"])
        .spawn()
        .unwrap();
    wait_for("client to attach", || {
        (cluster.status("alpha")["nbd"]["clients"] == 1).then_some(())
    });
    let (code, _, stderr) = cluster.cmd("alpha", &["secondary"]);
    assert_eq!(code, 3, "secondary with a client attached is refused");
    assert!(stderr.contains("NBD client(s) attached"), "{stderr}");
    let (code, _, stderr) = cluster.cmd("alpha", &["down"]);
    assert_eq!(code, 3);
    assert!(stderr.contains("--force"), "{stderr}");
    events.wait_for("the refusal as a call event", |e| {
        e["kind"] == "call" && e["command"] == "down" && e["result"] == "refused"
    });

    let (code, _, _) = cluster.cmd("alpha", &["secondary", "--force"]);
    assert_eq!(code, 0);
    assert_eq!(
        cluster.status("alpha")["nbd"]["clients"],
        0,
        "--force disconnected it"
    );
    let _ = client.kill();
    let _ = client.wait();
    assert_eq!(cluster.status("alpha")["role"], "Secondary");

    let (code, _, _) = cluster.cmd("alpha", &["secondary"]);
    assert_eq!(code, 0, "secondary on a Secondary is done");
    let (code, stdout, _) = cluster.cmd("alpha", &["events", "--now"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("exists resource node:alpha"), "{stdout}");
    assert!(stdout.contains("end-of-snapshot"), "{stdout}");

    let (code, _, _) = cluster.cmd("alpha", &["down"]);
    assert_eq!(code, 0);
    assert!(cluster.wait_exit("alpha").success());
    assert!(
        !cluster.dir.path().join("alpha.sock").exists(),
        "control socket removed"
    );
}

#[test]
fn data_survives_a_restart() {
    isolate_network();
    let mut cluster = Cluster::single(DISK, "");
    cluster.up("alpha");
    assert_eq!(cluster.cmd("alpha", &["primary"]).0, 0);
    let uri = cluster.nbd_uri("alpha");
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 1M 2M", &uri]));
    let generation = cluster.status("alpha")["generation"].clone();
    assert_eq!(cluster.cmd("alpha", &["down"]).0, 0);
    cluster.wait_exit("alpha");

    cluster.up("alpha");
    assert_eq!(cluster.status("alpha")["generation"], generation);
    assert_eq!(cluster.cmd("alpha", &["primary"]).0, 0);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x5a 1M 2M", &uri]));
}

#[test]
fn a_second_daemon_for_the_same_node_is_refused() {
    isolate_network();
    let mut cluster = Cluster::single(DISK, "");
    cluster.up("alpha");
    let (code, _, stderr) = cluster.cmd("alpha", &["up"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("already running"), "{stderr}");
    assert_eq!(
        cluster.status("alpha")["role"],
        "Secondary",
        "the first one is unharmed"
    );
}
