//! hablk under a real Pacemaker + Corosync cluster (three nodes, one per set
//! of namespaces): the OCF agent as a promotable clone, ext4 mounted by
//! `ocf:heartbeat:Filesystem` on the Promoted node, and the failovers a
//! DRBD user relies on. Assertions read `crm_mon --output-as=xml` and
//! hablk's own status and events; nothing waits on a sleep.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Instant;

use common::pacemaker::{seconds_since, PcmkCluster};

fn other(node: &str) -> &'static str {
    if node == "alpha" {
        "beta"
    } else {
        "alpha"
    }
}

/// Waits until `node` is back as an UpToDate, connected Unpromoted copy.
fn wait_resynced(cluster: &PcmkCluster, node: &str) {
    cluster.wait_status(node, "back Connected and UpToDate", |s| {
        s["disk"] == "UpToDate"
            && s["role"] == "Secondary"
            && s["peers"].as_array().is_some_and(|peers| {
                peers
                    .iter()
                    .all(|p| p["connection"] == "Connected" && p["split_brain"] == false)
            })
    });
}

#[test]
fn ocf_tester_passes_on_the_agent() {
    let cluster = PcmkCluster::up();
    // A one-node resource: ocf-tester drives the agent outside Pacemaker's
    // control, through start, promote (with the block device), demote
    // and stop.
    let d = cluster.dir.path().join("solo");
    std::fs::create_dir_all(&d).unwrap();
    let disk = d.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let config = d.join("solo.toml");
    std::fs::write(
        &config,
        format!(
            "[resource]\nname = \"solo\"\n\n[[node]]\nname = \"alpha\"\nid = 0\n\
             address = \"127.0.0.1:7790\"\nnbd = \"127.0.0.1:10810\"\ndisk = \"{}\"\n",
            disk.display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    cluster.exec_ok("alpha", &["hablk", "-c", &config, "create-md"]);
    let output = cluster.exec(
        "alpha",
        &[
            "ocf-tester",
            "-v",
            "-n",
            "solo",
            "-o",
            &format!("config={config}"),
            "/usr/lib/ocf/resource.d/hablk/hablk",
        ],
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && text.contains("passed all tests"),
        "ocf-tester: {text}"
    );
    // It did promote with a device, and stop left nothing behind.
    assert!(
        text.contains("Testing: promotion of promoted resource"),
        "{text}"
    );
    let leftovers = cluster.sh(
        "alpha",
        "ls /dev/hablk; ls /run/hablk/ocf/solo 2>/dev/null || true",
    );
    assert!(leftovers.trim().is_empty(), "left behind: {leftovers}");
    // validate-all names a bad config.
    let bad = cluster.exec(
        "alpha",
        &[
            "env",
            "OCF_RESKEY_config=/nonexistent.toml",
            "/usr/lib/ocf/resource.d/hablk/hablk",
            "validate-all",
        ],
    );
    assert_eq!(bad.status.code(), Some(5), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent.toml"));
}

#[test]
fn a_killed_primary_node_fails_over_with_its_filesystem() {
    let cluster = PcmkCluster::up();
    let first = cluster.configure_clone();
    cluster.configure_filesystem(&first);
    let written = cluster.write_files(&first, "before", 8);

    let killed_at = Instant::now();
    cluster.kill(&first);
    let survivor = other(&first);
    cluster.wait_mon(survivor, "fs and app on the survivor", |s| {
        s.promoted().as_deref() == Some(survivor)
            && s.running_on("fs").as_deref() == Some(survivor)
            && s.running_on("app").as_deref() == Some(survivor)
    });
    println!(
        "kill -9 of {first} → filesystem mounted on {survivor}: {:.2} s",
        seconds_since(killed_at)
    );
    assert!(cluster.mounted(survivor));
    assert_eq!(cluster.read_files(survivor, "before"), written);
    cluster.write_files(survivor, "after", 2);

    // Unmounted by Pacemaker, the file system checks clean.
    cluster.exec_ok(survivor, &["crm", "resource", "stop", "app"]);
    cluster.exec_ok(survivor, &["crm", "resource", "stop", "fs"]);
    cluster.wait_mon(survivor, "fs stopped", |s| s.running_on("fs").is_none());
    let fsck = cluster.exec(survivor, &["fsck.ext4", "-n", "-f", "/dev/hablk/r0"]);
    assert!(fsck.status.success(), "fsck -n: {fsck:?}");
    cluster.exec_ok(survivor, &["crm", "resource", "start", "fs"]);
    cluster.exec_ok(survivor, &["crm", "resource", "start", "app"]);

    // The killed node comes back as a resynced, Unpromoted copy.
    cluster.start(&first);
    wait_resynced(&cluster, &first);
    let state = cluster.wait_mon(survivor, "everything running again", |s| {
        s.online.len() == 3 && s.unpromoted().len() == 2 && s.running_on("app").is_some()
    });
    assert_eq!(state.promoted().as_deref(), Some(survivor));
}

#[test]
fn an_isolated_primary_steps_down_and_the_majority_takes_over() {
    let cluster = PcmkCluster::up();
    let first = cluster.configure_clone();
    cluster.configure_filesystem(&first);
    let written = cluster.write_files(&first, "before", 4);
    let majority = other(&first);

    let events = cluster.dir.path().join("events.json");
    let watcher = run_events(&cluster, majority, &events);
    let isolated_at = Instant::now();
    cluster.isolate(&first);
    cluster.wait_mon(majority, "the majority promotes and mounts", |s| {
        s.promoted().as_deref() == Some(majority) && s.running_on("fs").as_deref() == Some(majority)
    });
    println!(
        "partition → filesystem mounted on {majority}: {:.2} s",
        seconds_since(isolated_at)
    );
    assert_eq!(cluster.read_files(majority, "before"), written);
    // The isolated side has no Corosync quorum: it stops its resources,
    // and its hablk is no Primary.
    cluster.wait_mon(&first, "the isolated node without quorum", |s| !s.quorum);
    wait_for_not_primary(&cluster, &first);
    assert!(!cluster.mounted(&first));
    let after = cluster.write_files(majority, "after", 2);

    cluster.heal(&first);
    wait_resynced(&cluster, &first);
    let state = cluster.wait_mon(majority, "the healed node Unpromoted", |s| {
        s.online.len() == 3 && s.unpromoted().len() == 2
    });
    assert_eq!(state.promoted().as_deref(), Some(majority));
    assert_eq!(cluster.read_files(majority, "after"), after);
    drop(watcher);
    let seen = std::fs::read_to_string(&events).unwrap_or_default();
    assert!(
        !seen.contains("\"split_brain\":true"),
        "split-brain reported: {seen}"
    );
}

#[test]
fn a_planned_move_hands_the_filesystem_over() {
    let cluster = PcmkCluster::up();
    let first = cluster.configure_clone();
    cluster.configure_filesystem(&first);
    let written = cluster.write_files(&first, "before", 4);
    let target = other(&first);

    let moved_at = Instant::now();
    cluster.exec_ok(
        "alpha",
        &[
            "crm_resource",
            "--move",
            "--promoted",
            "--resource",
            "vol-clone",
            "--node",
            target,
        ],
    );
    let state = cluster.wait_mon(target, "the move done", |s| {
        s.promoted().as_deref() == Some(target)
            && s.running_on("fs").as_deref() == Some(target)
            && s.running_on("app").as_deref() == Some(target)
    });
    println!(
        "planned move {first} → {target}: {:.2} s",
        seconds_since(moved_at)
    );
    assert!(
        state.failures.is_empty(),
        "failed actions: {:?}",
        state.failures
    );
    assert_eq!(cluster.read_files(target, "before"), written);
    // The old Primary stays an UpToDate copy: nothing was lost or forced.
    wait_resynced(&cluster, &first);
    cluster.exec_ok(
        "alpha",
        &["crm_resource", "--clear", "--resource", "vol-clone"],
    );
}

#[test]
fn an_outdated_node_is_never_promoted() {
    let cluster = PcmkCluster::up();
    let first = cluster.configure_clone();
    cluster.configure_filesystem(&first);
    let stale = other(&first);

    // The other data node dies; writes go on without it (the witness
    // keeps the quorum and records the new generation).
    cluster.kill(stale);
    cluster.wait_status(&first, "the peer gone", |s| {
        s["peers"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["node"] == stale && p["connection"] != "Connected")
        })
    });
    let written = cluster.write_files(&first, "without", 4);
    // Now the Primary's node dies too, and the stale node returns.
    cluster.kill(&first);
    cluster.start(stale);
    let events = cluster.dir.path().join("events.json");
    cluster.wait_status(stale, "the stale node Outdated", |s| {
        s["disk"] == "Outdated"
    });
    let watcher = run_events(&cluster, stale, &events);
    cluster.wait_mon("witness", "the stale node's instance Unpromoted", |s| {
        s.unpromoted().iter().any(|n| n == stale)
    });
    // Pacemaker has decided, with the Outdated disk in view: no score, no
    // promotion.
    cluster.wait_idle("witness");
    let state = cluster.mon("witness").unwrap();
    assert_eq!(state.promoted(), None, "{state:?}");
    let score = cluster.exec(
        stale,
        &["crm_attribute", "--promotion=vol", "--query", "--quiet"],
    );
    assert!(
        !score.status.success() || String::from_utf8_lossy(&score.stdout).trim().is_empty(),
        "the stale node has a promotion score: {score:?}"
    );

    // The node with the data returns: it is promoted, the stale one resyncs.
    cluster.start(&first);
    cluster.wait_mon("witness", "the current node promoted with its fs", |s| {
        s.promoted().as_deref() == Some(first.as_str())
            && s.running_on("fs").as_deref() == Some(first.as_str())
    });
    assert_eq!(cluster.read_files(&first, "without"), written);
    wait_resynced(&cluster, stale);
    drop(watcher);
    let seen = std::fs::read_to_string(&events).unwrap_or_default();
    let promoted_itself = seen.lines().any(|line| {
        serde_json::from_str::<serde_json::Value>(line)
            .is_ok_and(|event| event["object"] == "resource" && event["role"] == "Primary")
    });
    assert!(!promoted_itself, "the stale node became Primary: {seen}");
}

/// `hablk events --json` on `node`, written to `file` until dropped.
fn run_events(cluster: &PcmkCluster, node: &str, file: &std::path::Path) -> KillOnDrop {
    let out = std::fs::File::create(file).unwrap();
    let config = cluster.config.display().to_string();
    let child = cluster
        .command(node, &["hablk", "-c", &config, "events", "--json"])
        .stdout(out)
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

#[derive(Debug)]
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_not_primary(cluster: &PcmkCluster, node: &str) {
    common::wait_for_within(common::pacemaker::PCMK_WAIT, || {
        match cluster.status(node) {
            None => Some(()),
            Some(s) if s["role"] != "Primary" => Some(()),
            _ => None,
        }
    })
    .unwrap_or_else(|| panic!("{node} still Primary\n{}", cluster.logs()));
}

/// Seconds since midnight (UTC) of a Pacemaker or Corosync log line
/// (`Dec 07 05:52:24.047 ...`).
fn log_time(line: &str) -> Option<f64> {
    let clock = line.split_whitespace().nth(2)?;
    let mut parts = clock.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

fn now_of_day() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (now.as_secs_f64()) % 86_400.0
}

/// When the first line of `log` (on `node`) after `since` containing
/// `needle` was written, relative to `since`.
fn logged_after(cluster: &PcmkCluster, node: &str, log: &str, since: f64, needle: &str) -> f64 {
    let text = std::fs::read_to_string(cluster.dir.path().join(node).join(log)).unwrap();
    text.lines()
        .filter(|line| line.contains(needle))
        .filter_map(log_time)
        .find(|time| *time >= since)
        .map_or(f64::NAN, |time| time - since)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Failover and planned-move times, five of each, with where the time
/// goes. Not part of the suite (it measures, it asserts little): run with
/// `cargo nextest run --test pacemaker --run-ignored only --no-capture`.
#[test]
#[ignore]
fn failover_timings() {
    const ROUNDS: usize = 5;
    let cluster = PcmkCluster::up();
    let mut primary = cluster.configure_clone();
    cluster.configure_filesystem(&primary);
    let (mut totals, mut membership, mut promote_start, mut promote_end, mut mounted) =
        (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        let written = cluster.write_files(&primary, &format!("round{round}"), 2);
        let survivor = other(&primary);
        let since = now_of_day();
        let start = Instant::now();
        cluster.kill(&primary);
        cluster.wait_mon(survivor, "failed over", |s| {
            s.running_on("fs").as_deref() == Some(survivor)
        });
        totals.push(seconds_since(start));
        let pcmk = "var-log/pacemaker/pacemaker.log";
        membership.push(logged_after(
            &cluster,
            survivor,
            "var-log/corosync/corosync.log",
            since,
            "A new membership",
        ));
        promote_start.push(logged_after(
            &cluster,
            survivor,
            pcmk,
            since,
            "Requesting local execution of promote operation for vol",
        ));
        promote_end.push(logged_after(
            &cluster,
            survivor,
            pcmk,
            since,
            "Result of promote operation for vol",
        ));
        mounted.push(logged_after(
            &cluster,
            survivor,
            pcmk,
            since,
            "Result of start operation for fs",
        ));
        assert_eq!(
            cluster.read_files(survivor, &format!("round{round}")),
            written
        );
        cluster.start(&primary);
        wait_resynced(&cluster, &primary);
        cluster.wait_mon(survivor, "all back", |s| {
            s.unpromoted().len() == 2 && s.running_on("app").is_some()
        });
        primary = survivor.to_owned();
    }
    println!(
        "kill -9 → fs mounted, median of {ROUNDS}: {:.2} s (all: {totals:.2?})",
        median(&mut totals.clone())
    );
    println!(
        "  Corosync membership at {:.2} s, promote requested at {:.2} s, promoted at {:.2} s, \
         mounted at {:.2} s (medians, from the survivor's logs)",
        median(&mut membership),
        median(&mut promote_start),
        median(&mut promote_end),
        median(&mut mounted)
    );
    let mut moves = vec![];
    for _ in 0..ROUNDS {
        let target = other(&primary);
        let start = Instant::now();
        cluster.exec_ok(
            "witness",
            &[
                "crm_resource",
                "--move",
                "--promoted",
                "--resource",
                "vol-clone",
                "--node",
                target,
            ],
        );
        cluster.wait_mon(target, "moved", |s| {
            s.running_on("app").as_deref() == Some(target)
        });
        moves.push(seconds_since(start));
        cluster.exec_ok(
            "witness",
            &["crm_resource", "--clear", "--resource", "vol-clone"],
        );
        wait_resynced(&cluster, &primary);
        primary = target.to_owned();
    }
    println!(
        "planned move → app running on the target, median of {ROUNDS}: {:.2} s (all: {moves:.2?})",
        median(&mut moves.clone())
    );
}

#[test]
fn pacemaker_recovers_a_daemon_that_died() {
    let cluster = PcmkCluster::up();
    let first = cluster.configure_clone();
    cluster.configure_filesystem(&first);
    let written = cluster.write_files(&first, "before", 4);
    let second = other(&first);
    let kill_daemon = |node: &str| {
        cluster.exec_ok(
            node,
            &["pkill", "-KILL", "-f", "--", &format!("-n {node} up$")],
        );
    };

    // The Unpromoted copy's daemon dies: its monitor says "not running",
    // Pacemaker starts it again, and it catches up.
    kill_daemon(second);
    cluster.wait_mon(&first, "the monitor failure seen", |s| {
        s.failures
            .iter()
            .any(|(op, node, _)| op.starts_with("vol_monitor") && node == second)
    });
    wait_resynced(&cluster, second);

    // The Primary's daemon dies under the mounted file system: Pacemaker
    // stops the file system, recovers the clone (in place, its default)
    // and mounts the file system again on the Promoted node, every file
    // intact.
    kill_daemon(&first);
    let state = cluster.wait_mon(second, "fs and app recovered", |s| {
        s.failures
            .iter()
            .any(|(op, node, _)| op.starts_with("vol_monitor") && node == first.as_str())
            && s.promoted().is_some()
            && s.running_on("fs") == s.promoted()
            && s.running_on("app") == s.promoted()
    });
    let promoted = state.promoted().unwrap();
    assert_eq!(cluster.read_files(&promoted, "before"), written);
    wait_resynced(&cluster, other(&promoted));
}

#[test]
fn pacemaker_restarts_a_node_whose_disk_failed_once_it_is_replaced() {
    let cluster = PcmkCluster::up_with_disks_on_tmpfs();
    let primary = cluster.configure_clone();
    cluster.configure_filesystem(&primary);
    let copy = other(&primary);

    // The copy's disk fills up: its next writes fail (ENOSPC), hablk
    // detaches it, the monitor reports the instance failed.
    cluster.resize_disk_fs(copy, "4M");
    let m = cluster.mount_dir().display().to_string();
    let written = cluster.sh(
        &primary,
        &format!("cd {m} && head -c 16M /dev/urandom > big && sync -f big && md5sum big"),
    );
    cluster.wait_mon(&primary, "the copy's monitor failure", |s| {
        s.failures
            .iter()
            .any(|(op, node, _)| op.starts_with("vol_monitor") && node == copy)
    });
    // The Primary served on without it.
    assert_eq!(
        cluster.sh(&primary, &format!("cd {m} && md5sum big")),
        written
    );

    // A disk with room again. Pacemaker's restart may have come first and
    // failed (a start failure keeps the instance off the node until
    // cleaned up), so the operator cleans up, as after any replaced disk:
    // the restart attaches the disk and the resync brings it up to date.
    cluster.resize_disk_fs(copy, "128M");
    cluster.exec_ok(&primary, &["crm", "resource", "cleanup", "vol-clone"]);
    wait_resynced(&cluster, copy);
    let state = cluster.wait_mon(&primary, "the copy Unpromoted again", |s| {
        s.unpromoted().iter().any(|n| n == copy)
    });
    assert_eq!(state.promoted().as_deref(), Some(primary.as_str()));
}
