//! A whole connection: a canned handshake (chosen by the first input byte)
//! followed by the rest of the input as the transmission-phase byte stream,
//! served by the real `serve` against a real volume on a small temp file.
//!
//! The connection must never panic, and must end once the client's bytes
//! run out and its in-flight requests finish.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hablk::cluster::lease::Lease;
use hablk::config::{Config, IoEngineKind, Protocol};
use hablk::meta::tracker::Tracker;
use hablk::meta::MetaStore;
use hablk::nbd::handshake::handshake;
use hablk::nbd::proto::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, META_CONTEXT_BASE_ALLOCATION, OPT_GO,
    OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
};
use hablk::nbd::transmission::serve;
use hablk::nbd::ExportPolicy;
use hablk::storage::Storage;
use hablk::volume::{ExportInfo, Gate, Volume, VolumeParts};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const EXPORT_BYTES: u64 = 256 << 10;
/// The disk holds the export and the internal metadata behind it.
const DISK_BYTES: u64 = 8 << 20;
/// Real time: the volume's I/O threads complete outside the runtime.
const CONNECTION_LIMIT: Duration = Duration::from_secs(30);
/// The shared byte budget, in units of 1 KiB.
const BUDGET_UNITS: usize = 64 << 10;

/// One volume for the whole run: a single-node resource on a temp file,
/// with internal metadata as `create-md` makes it. The files are unlinked
/// once open.
fn volume() -> Option<Arc<Volume>> {
    static VOLUME: OnceLock<Option<Arc<Volume>>> = OnceLock::new();
    VOLUME
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("hablk-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).ok()?;
            let volume = open_volume(&dir);
            let _ = std::fs::remove_dir_all(&dir);
            volume
        })
        .clone()
}

fn open_volume(dir: &Path) -> Option<Arc<Volume>> {
    let disk = dir.join("alpha.img");
    std::fs::File::create(&disk)
        .ok()?
        .set_len(DISK_BYTES)
        .ok()?;
    let text = format!(
        "[resource]\nname = \"r0\"\n\n[[node]]\nname = \"alpha\"\nid = 0\n\
         address = \"127.0.0.1:7789\"\ncontrol = \"{}\"\n\
         nbd = \"127.0.0.1:10809\"\ndisk = \"{}\"\n",
        dir.join("alpha.sock").display(),
        disk.display()
    );
    let config = Config::parse(&dir.join("hablk.toml"), &text).ok()?;
    let node = config.node("alpha").ok()?.clone();
    let meta = MetaStore::create(&config, &node, false).ok()?;
    let superblock = meta.superblock().clone();
    let capacity = superblock.layout.data_capacity_bytes;
    let storage = Storage::open(&disk, IoEngineKind::Threads, false, capacity).ok()?;
    let tracker = Tracker::open(meta.path().to_owned(), &superblock).ok()?;
    let parts = VolumeParts {
        resource: "r0".to_owned(),
        me: node.id,
        protocol: Protocol::C,
        data_nodes: hablk::vocabulary::node::NodeSet::of(node.id),
        storage: Arc::new(storage),
        tracker,
        lease: Arc::new(Lease::new(Duration::from_secs(5))),
    };
    let gate = Gate::Open {
        size_bytes: EXPORT_BYTES.min(capacity),
    };
    Some(Arc::new(Volume::new(parts, gate)))
}

struct VolumePolicy(Arc<Volume>);

impl ExportPolicy for VolumePolicy {
    fn export_name(&self) -> &str {
        self.0.resource()
    }
    fn description(&self) -> String {
        "fuzzing export".to_owned()
    }
    fn probe(&self) -> Result<ExportInfo, String> {
        self.0.export()
    }
    async fn attach(&self) -> Result<ExportInfo, String> {
        self.0.export()
    }
}

fn option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A well-behaved client's handshake; `mode` bit 0 asks for structured
/// replies, bit 1 also for `base:allocation`.
fn canned_handshake(mode: u8) -> Vec<u8> {
    let mut out = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    if mode & 1 != 0 {
        option(&mut out, OPT_STRUCTURED_REPLY, &[]);
        if mode & 2 != 0 {
            let query = META_CONTEXT_BASE_ALLOCATION.as_bytes();
            let mut data = Vec::new();
            data.extend_from_slice(&0u32.to_be_bytes()); // default export
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&(query.len() as u32).to_be_bytes());
            data.extend_from_slice(query);
            option(&mut out, OPT_SET_META_CONTEXT, &data);
        }
    }
    let mut go = 0u32.to_be_bytes().to_vec(); // default export
    go.extend_from_slice(&0u16.to_be_bytes()); // no info requests
    option(&mut out, OPT_GO, &go);
    out
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, requests)) = input.split_first() else {
        return;
    };
    let Some(volume) = volume() else {
        return;
    };
    let mut stream = canned_handshake(mode);
    stream.extend_from_slice(requests);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build();
    let Ok(runtime) = runtime else {
        return;
    };
    runtime.block_on(async {
        let (client, mut server) = tokio::io::duplex(256 << 10);
        let policy = VolumePolicy(volume.clone());
        let server_side = async move {
            let Ok(session) = handshake(&mut server, &policy).await else {
                panic!("the canned handshake failed");
            };
            let budget = Arc::new(Semaphore::new(BUDGET_UNITS));
            let drain = CancellationToken::new();
            // Errors (bad magic, a vanished client) end only the connection.
            let _ = serve(server, session, volume, budget, drain, "fuzz".to_owned()).await;
        };
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let send = async move {
            let _ = to_server.write_all(&stream).await;
            let _ = to_server.shutdown().await;
        };
        let receive = async move {
            let mut sink = Vec::new();
            let _ = from_server.read_to_end(&mut sink).await;
        };
        let everything = async { tokio::join!(server_side, send, receive) };
        if tokio::time::timeout(CONNECTION_LIMIT, everything)
            .await
            .is_err()
        {
            panic!("the connection did not end after the client's bytes ran out");
        }
    });
});
