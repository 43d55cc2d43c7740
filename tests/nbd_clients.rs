//! Real NBD clients against a single Primary, on both storage engines:
//! nbdinfo, nbdcopy, qemu-img, qemu-io, fio, and an ext4 file system
//! through nbdfuse and a loop device.
//!
//! Each scenario is a function taking the engine, run by one test per
//! engine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::process::Command;

use common::faults::ExportFs;
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The storage engine a test runs on.
#[derive(Debug, Clone, Copy)]
enum Engine {
    /// The default (`io` not set): io_uring.
    Uring,
    Threads,
}

impl Engine {
    fn config(self) -> &'static str {
        match self {
            Engine::Uring => "",
            Engine::Threads => "io = \"threads\"",
        }
    }
}

/// A single node, promoted; returns it with its NBD URI and export size.
fn primary(engine: Engine, disk_bytes: u64) -> (Cluster, String, u64) {
    isolate_network();
    let mut cluster = Cluster::single(disk_bytes, engine.config());
    cluster.up("alpha");
    let (code, _, stderr) = cluster.cmd("alpha", &["primary"]);
    assert_eq!(code, 0, "primary: {stderr}");
    let size = cluster.status("alpha")["size_bytes"].as_u64().unwrap();
    let uri = cluster.nbd_uri("alpha");
    (cluster, uri, size)
}

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    let stdout = stdout_of(command.arg(uri));
    assert!(!stdout.contains("failed"), "qemu-io {commands:?}: {stdout}");
    stdout
}

/// `nbdinfo --map --json`: (offset, length, description) per extent.
fn allocation_map(uri: &str) -> Vec<(u64, u64, String)> {
    let map: Value = serde_json::from_str(&stdout_of(
        Command::new("nbdinfo").args(["--map", "--json", uri]),
    ))
    .unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["description"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------

fn nbdinfo_reports_the_export_and_its_allocation(engine: Engine) {
    let (_cluster, uri, size) = primary(engine, 64 * MIB);

    let info: Value =
        serde_json::from_str(&stdout_of(Command::new("nbdinfo").args(["--json", &uri]))).unwrap();
    assert_eq!(info["protocol"], "newstyle-fixed");
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "r0");
    assert_eq!(export["export-size"].as_u64().unwrap(), size);
    assert_eq!(export["is_read_only"], false);
    for flag in [
        "can_multi_conn",
        "can_fua",
        "can_flush",
        "can_trim",
        "can_zero",
        "can_cache",
    ] {
        assert_eq!(export[flag], true, "{flag}");
    }
    assert_eq!(export["block_size_minimum"], 1);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 32 * MIB);
    assert!(
        export["contexts"]
            .as_array()
            .unwrap()
            .contains(&Value::from("base:allocation")),
        "{export}"
    );

    // A fresh disk is one hole.
    assert_eq!(
        allocation_map(&uri),
        vec![(0, size, "hole,zero".to_owned())]
    );

    // Written data shows as data; a TRIM of part of it leaves a hole.
    qemu_io(&uri, &["write -P 0x5a 4M 1M"]);
    assert_eq!(
        allocation_map(&uri),
        vec![
            (0, 4 * MIB, "hole,zero".to_owned()),
            (4 * MIB, MIB, "data".to_owned()),
            (5 * MIB, size - 5 * MIB, "hole,zero".to_owned()),
        ]
    );
    qemu_io(&uri, &["discard 4M 512k"]);
    assert_eq!(
        allocation_map(&uri),
        vec![
            (0, 4 * MIB + MIB / 2, "hole,zero".to_owned()),
            (4 * MIB + MIB / 2, MIB / 2, "data".to_owned()),
            (5 * MIB, size - 5 * MIB, "hole,zero".to_owned()),
        ]
    );
    qemu_io(&uri, &["read -P 0 4M 512k", "read -P 0x5a 4608k 512k"]);
}

#[test]
fn nbdinfo_reports_the_export_and_its_allocation_uring() {
    nbdinfo_reports_the_export_and_its_allocation(Engine::Uring);
}

#[test]
fn nbdinfo_reports_the_export_and_its_allocation_threads() {
    nbdinfo_reports_the_export_and_its_allocation(Engine::Threads);
}

// ---------------------------------------------------------------------------

fn nbdcopy_and_qemu_img_round_trip_64_mib(engine: Engine) {
    const DATA: u64 = 64 * MIB;
    let (cluster, uri, size) = primary(engine, 96 * MIB);
    let source = cluster.dir.path().join("source.img");
    random_file(&source, DATA);

    run_ok(Command::new("nbdcopy").arg(&source).arg(&uri));
    let compare = |expect: i32| {
        let output = run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&source)
            .arg(&uri));
        assert_eq!(
            output.status.code(),
            Some(expect),
            "qemu-img compare: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // The export is larger than the file: compare checks the rest is zero.
    assert!(compare(0).contains("Images are identical"));

    // compare does look: one changed byte in the middle is found (it
    // reports the start of its 512-byte sector).
    let offset = 10 * MIB + 12345;
    let mut byte = [0u8];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&source)
            .unwrap()
            .read_exact_at(&mut byte, offset)
            .unwrap();
    }
    qemu_io(&uri, &[&format!("write -P {} {offset} 1", !byte[0])]);
    assert!(compare(1).contains(&format!(
        "Content mismatch at offset {}!",
        offset / 512 * 512
    )));
    qemu_io(&uri, &[&format!("write -P {} {offset} 1", byte[0])]);
    compare(0);

    let copy = cluster.dir.path().join("copy.img");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), size);
    assert_eq!(md5_of(&copy, DATA), md5_of(&source, DATA));
    let mut rest = Vec::new();
    std::fs::File::open(&copy)
        .unwrap()
        .take(size)
        .read_to_end(&mut rest)
        .unwrap();
    assert!(
        rest[DATA as usize..].iter().all(|&b| b == 0),
        "beyond the data the export reads as zeroes"
    );
}

#[test]
fn nbdcopy_and_qemu_img_round_trip_64_mib_uring() {
    nbdcopy_and_qemu_img_round_trip_64_mib(Engine::Uring);
}

#[test]
fn nbdcopy_and_qemu_img_round_trip_64_mib_threads() {
    nbdcopy_and_qemu_img_round_trip_64_mib(Engine::Threads);
}

// ---------------------------------------------------------------------------

fn qemu_io_patterns_fua_discard_and_zeroes(engine: Engine) {
    let (_cluster, uri, size) = primary(engine, 64 * MIB);

    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 1M",
            "write -f -P 0x22 1M 1M",
            // Unaligned: the minimum block size is 1.
            "write -P 0x33 4097 1000",
            // Many in flight on one connection, then a flush.
            "aio_write -P 0x41 8M 64k",
            "aio_write -P 0x42 9M 64k",
            "aio_write -f -P 0x43 10M 64k",
            "aio_write -P 0x44 11M 64k",
            "aio_flush",
            "flush",
            "read -P 0x11 0 4097",
            "read -P 0x33 4097 1000",
            "read -P 0x11 5097 1043479",
            "read -P 0x22 1M 1M",
        ],
    );
    // A second connection sees the same, including the in-flight writes.
    qemu_io(
        &uri,
        &[
            "read -P 0x41 8M 64k",
            "read -P 0x42 9M 64k",
            "read -P 0x43 10M 64k",
            "read -P 0x44 11M 64k",
            "read -P 0 11328k 64k",
        ],
    );

    // Discard and write-zeroes (with and without unmap, with FUA) leave
    // zeroes exactly where asked.
    qemu_io(
        &uri,
        &[
            "discard 0 64k",
            "write -z 128k 64k",
            "write -z -u 256k 64k",
            "write -z -f 384k 64k",
            "read -P 0 0 64k",
            "read -P 0x11 64k 64k",
            "read -P 0 128k 64k",
            "read -P 0x11 192k 64k",
            "read -P 0 256k 64k",
            "read -P 0x11 320k 64k",
            "read -P 0 384k 64k",
            "read -P 0x11 448k 64k",
            "read -P 0x22 1M 1M",
        ],
    );

    // The last byte of the export is writable.
    let last = size - 1;
    qemu_io(
        &uri,
        &[
            &format!("write -f -P 0x99 {last} 1"),
            &format!("read -P 0x99 {last} 1"),
        ],
    );
    // A mismatch is caught (the checks above are not vacuous).
    let output = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x22 0 4k"])
        .arg(&uri));
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("Pattern verification failed"));
}

#[test]
fn qemu_io_patterns_fua_discard_and_zeroes_uring() {
    qemu_io_patterns_fua_discard_and_zeroes(Engine::Uring);
}

#[test]
fn qemu_io_patterns_fua_discard_and_zeroes_threads() {
    qemu_io_patterns_fua_discard_and_zeroes(Engine::Threads);
}

// ---------------------------------------------------------------------------

fn fio_verifies_crc32c_over_four_connections(engine: Engine) {
    const JOBS: u64 = 4;
    const JOB_BYTES: u64 = 8 * MIB;
    let (cluster, uri, _) = primary(engine, 64 * MIB);
    let report = cluster.dir.path().join("fio.json");
    let output = run(Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            // Sizes on both sides of the server's read chunk, mixed.
            "--bsrange=4k-1m",
            "--iodepth=32",
            &format!("--numjobs={JOBS}"),
            &format!("--size={JOB_BYTES}"),
            &format!("--offset_increment={JOB_BYTES}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // No verify state files left behind.
            "--verify_state_save=0",
            "--output-format=json",
        ])
        .arg(format!("--output={}", report.display()))
        .current_dir(cluster.dir.path()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "fio failed: {}\n{stderr}\n{}",
        output.status,
        std::fs::read_to_string(&report).unwrap_or_default()
    );
    assert!(!stderr.contains("verify:"), "{stderr}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let jobs = report["jobs"].as_array().unwrap();
    assert_eq!(jobs.len() as u64, JOBS);
    for job in jobs {
        assert_eq!(job["error"], 0, "{job}");
        assert_eq!(
            job["write"]["io_bytes"].as_u64().unwrap(),
            JOB_BYTES,
            "all written"
        );
        assert_eq!(
            job["read"]["io_bytes"].as_u64().unwrap(),
            JOB_BYTES,
            "all verified"
        );
    }
    assert_eq!(cluster.status("alpha")["role"], "Primary");
}

#[test]
fn fio_verifies_crc32c_over_four_connections_uring() {
    fio_verifies_crc32c_over_four_connections(Engine::Uring);
}

#[test]
fn fio_verifies_crc32c_over_four_connections_threads() {
    fio_verifies_crc32c_over_four_connections(Engine::Threads);
}

// ---------------------------------------------------------------------------

fn ext4_on_nbdfuse_survives_fsck_and_a_remount(engine: Engine) {
    // The cluster outlives the file system on it (dropped in reverse).
    let (cluster, uri, _) = primary(engine, 96 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let sources = cluster.dir.path().join("sources");
    std::fs::create_dir(&sources).unwrap();
    let files: [(&str, u64); 4] = [
        ("big", 16 * MIB),
        ("medium", 3 * MIB + 4321),
        ("small", 100),
        ("dir/nested", 200_000),
    ];
    std::fs::create_dir(sources.join("dir")).unwrap();
    for (name, bytes) in files {
        random_file(&sources.join(name), bytes);
    }

    let mut fs = ExportFs::attach(&uri, dir.path(), "1");
    run_ok(Command::new("mkfs.ext4").args(["-q", fs.device()]));
    fs.mount();
    std::fs::create_dir(fs.mount_dir.join("dir")).unwrap();
    for (name, _) in files {
        let target = fs.mount_dir.join(name);
        std::fs::copy(sources.join(name), &target).unwrap();
        run_ok(Command::new("sync").arg("-f").arg(&target));
    }
    fs.umount();
    let fsck = run(Command::new("fsck.ext4").args(["-n", "-f", fs.device()]));
    assert_eq!(
        fsck.status.code(),
        Some(0),
        "fsck found problems:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    fs.detach();

    // Everything anew (no cache of the first round): the data comes back
    // from the server.
    let mut fs = ExportFs::attach(&uri, dir.path(), "2");
    fs.mount();
    for (name, bytes) in files {
        assert_eq!(
            md5_of(&fs.mount_dir.join(name), bytes),
            md5_of(&sources.join(name), bytes),
            "{name}"
        );
        assert_eq!(
            std::fs::metadata(fs.mount_dir.join(name)).unwrap().len(),
            bytes
        );
    }
    fs.umount();
    fs.detach();
    wait_for("nbdfuse's connections to close", || {
        (cluster.status("alpha")["nbd"]["clients"] == 0).then_some(())
    });
}

#[test]
fn ext4_on_nbdfuse_survives_fsck_and_a_remount_uring() {
    ext4_on_nbdfuse_survives_fsck_and_a_remount(Engine::Uring);
}

#[test]
fn ext4_on_nbdfuse_survives_fsck_and_a_remount_threads() {
    ext4_on_nbdfuse_survives_fsck_and_a_remount(Engine::Threads);
}
