//! `hablk-durability`: the durability checker.
//!
//! `write` streams distinct, numbered 4 KiB blocks to an NBD export with
//! many requests in flight and journals every write it sent and every
//! acknowledgement it got, until the connection dies (the Primary was
//! killed or cut off) or the time is up. `verify` reads every block the
//! journal mentions from an export (the newly promoted Primary) and checks
//! the promise: every acknowledged block holds exactly its last
//! acknowledged version or a later one that was sent; an unacknowledged
//! block holds old or new data — never anything else.
//!
//! Each block carries its own identity (seed, block, version) and a
//! checksum over a pattern derived from them, so any other content —
//! stale, torn, or foreign — is detected.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use rand::{Rng, SeedableRng};

use hablk::nbd::proto::{
    RequestHeader, CMD_DISC, CMD_READ, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, OPT_GO, REP_ACK, SIMPLE_REPLY_MAGIC,
};

const BLOCK: usize = 4096;
const MAGIC: u64 = 0x6861_626c_6b64_7572; // "hablkdur"

/// Checks that acknowledged writes survive a failover.
#[derive(Debug, Parser)]
#[command(name = "hablk-durability", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write numbered blocks until the connection dies or time is up.
    Write {
        /// nbd://HOST:PORT/EXPORT
        #[arg(long)]
        uri: String,
        #[arg(long)]
        journal: PathBuf,
        /// Blocks to spread the writes over.
        #[arg(long, default_value_t = 2048)]
        blocks: u64,
        /// First block used (to leave room for others).
        #[arg(long, default_value_t = 0)]
        first_block: u64,
        /// Requests in flight.
        #[arg(long, default_value_t = 64)]
        depth: usize,
        /// Stop after this many seconds (default: until the connection dies).
        #[arg(long)]
        seconds: Option<f64>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Check every block in the journal against an export.
    Verify {
        #[arg(long)]
        uri: String,
        #[arg(long)]
        journal: PathBuf,
    },
}

fn parse_uri(uri: &str) -> Result<(String, String)> {
    let rest = uri
        .strip_prefix("nbd://")
        .ok_or_else(|| anyhow!("URI must start with nbd://"))?;
    let (address, name) = rest.split_once('/').unwrap_or((rest, ""));
    Ok((address.to_owned(), name.to_owned()))
}

/// Connects and negotiates with OPT_GO (simple replies).
fn connect(uri: &str) -> Result<TcpStream> {
    let (address, name) = parse_uri(uri)?;
    let mut stream =
        TcpStream::connect(&address).with_context(|| format!("connecting to {address}"))?;
    stream.set_nodelay(true)?;
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting)?;
    if u64::from_be_bytes(greeting[..8].try_into()?) != NBDMAGIC
        || u64::from_be_bytes(greeting[8..16].try_into()?) != IHAVEOPT
    {
        bail!("not an NBD newstyle server");
    }
    stream.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
    let mut option = Vec::new();
    option.extend_from_slice(&IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&OPT_GO.to_be_bytes());
    option.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    option.extend_from_slice(&(name.len() as u32).to_be_bytes());
    option.extend_from_slice(name.as_bytes());
    option.extend_from_slice(&0u16.to_be_bytes());
    stream.write_all(&option)?;
    loop {
        let mut header = [0u8; 20];
        stream.read_exact(&mut header)?;
        if u64::from_be_bytes(header[..8].try_into()?) != OPTION_REPLY_MAGIC {
            bail!("bad option reply");
        }
        let reply = u32::from_be_bytes(header[12..16].try_into()?);
        let len = u32::from_be_bytes(header[16..20].try_into()?) as usize;
        let mut data = vec![0u8; len];
        stream.read_exact(&mut data)?;
        if reply == REP_ACK {
            return Ok(stream);
        }
        if reply & (1 << 31) != 0 {
            bail!("server refused OPT_GO: {}", String::from_utf8_lossy(&data));
        }
    }
}

/// The content of version `version` of `block`.
fn block_content(seed: u64, block: u64, version: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK];
    data[..8].copy_from_slice(&MAGIC.to_le_bytes());
    data[8..16].copy_from_slice(&seed.to_le_bytes());
    data[16..24].copy_from_slice(&block.to_le_bytes());
    data[24..32].copy_from_slice(&version.to_le_bytes());
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ block.rotate_left(20) ^ version.rotate_left(40));
    rng.fill(&mut data[36..]);
    let crc = crc32c::crc32c(&data[36..]);
    data[32..36].copy_from_slice(&crc.to_le_bytes());
    data
}

/// Identifies a block's content: Some((seed, block, version)) if it is
/// one this tool wrote, intact.
fn identify(data: &[u8]) -> Option<(u64, u64, u64)> {
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap_or_default());
    if data.len() != BLOCK || word(0) != MAGIC {
        return None;
    }
    let (seed, block, version) = (word(8), word(16), word(24));
    (block_content(seed, block, version) == data).then_some((seed, block, version))
}

struct Shared {
    in_flight: Mutex<BTreeMap<u64, (u64, u64)>>,
    room: Condvar,
    journal: Mutex<BufWriter<File>>,
}

fn write(
    uri: &str,
    journal: PathBuf,
    blocks: u64,
    first_block: u64,
    depth: usize,
    seconds: Option<f64>,
    seed: u64,
) -> Result<()> {
    let stream = connect(uri)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    let file = File::create(&journal).with_context(|| format!("creating {}", journal.display()))?;
    let shared = Arc::new(Shared {
        in_flight: Mutex::new(BTreeMap::new()),
        room: Condvar::new(),
        journal: Mutex::new(BufWriter::new(file)),
    });
    writeln!(
        shared.journal.lock().map_err(|_| anyhow!("poisoned"))?,
        "seed {seed}"
    )?;
    let reader_shared = shared.clone();
    let acks = std::thread::spawn(move || -> (u64, u64) {
        let (mut acked, mut failed) = (0, 0);
        let mut header = [0u8; 16];
        while reader.read_exact(&mut header).is_ok() {
            let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
            let error = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
            let handle = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
            if magic != SIMPLE_REPLY_MAGIC {
                break;
            }
            let Ok(mut in_flight) = reader_shared.in_flight.lock() else {
                break;
            };
            let Some((block, version)) = in_flight.remove(&handle) else {
                break;
            };
            drop(in_flight);
            reader_shared.room.notify_one();
            if let Ok(mut journal) = reader_shared.journal.lock() {
                if error == 0 {
                    acked += 1;
                    let _ = writeln!(journal, "A {block} {version}");
                } else {
                    failed += 1;
                    let _ = writeln!(journal, "E {block} {version} {error}");
                }
                let _ = journal.flush();
            }
        }
        reader_shared.room.notify_all();
        (acked, failed)
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut versions: BTreeMap<u64, u64> = BTreeMap::new();
    let started = Instant::now();
    let deadline = seconds.map(|s| started + Duration::from_secs_f64(s));
    let mut handle = 0u64;
    let mut sent = 0u64;
    'send: loop {
        if deadline.is_some_and(|d| Instant::now() >= d) || acks.is_finished() {
            break;
        }
        let block = {
            let mut in_flight = shared.in_flight.lock().map_err(|_| anyhow!("poisoned"))?;
            while in_flight.len() >= depth {
                let (guard, timeout) = shared
                    .room
                    .wait_timeout(in_flight, Duration::from_millis(200))
                    .map_err(|_| anyhow!("poisoned"))?;
                in_flight = guard;
                if timeout.timed_out() && acks.is_finished() {
                    break 'send;
                }
            }
            let busy: BTreeSet<u64> = in_flight.values().map(|v| v.0).collect();
            let mut block = first_block + rng.gen_range(0..blocks);
            while busy.contains(&block) {
                block = first_block + rng.gen_range(0..blocks);
            }
            let version = versions.entry(block).or_insert(0);
            *version += 1;
            handle += 1;
            in_flight.insert(handle, (block, *version));
            (block, *version)
        };
        writeln!(
            shared.journal.lock().map_err(|_| anyhow!("poisoned"))?,
            "S {} {}",
            block.0,
            block.1
        )?;
        let header = RequestHeader {
            flags: 0,
            command: CMD_WRITE,
            handle,
            offset: block.0 * BLOCK as u64,
            length: BLOCK as u32,
        };
        let mut bytes = bytes::BytesMut::new();
        header.encode(&mut bytes);
        if writer
            .write_all(&bytes)
            .and_then(|()| writer.write_all(&block_content(seed, block.0, block.1)))
            .and_then(|()| writer.flush())
            .is_err()
        {
            break;
        }
        sent += 1;
    }
    if deadline.is_some() {
        // Let what is in flight complete, then leave politely.
        let waited = Instant::now();
        while shared
            .in_flight
            .lock()
            .map(|f| !f.is_empty())
            .unwrap_or(false)
            && waited.elapsed() < Duration::from_secs(30)
            && !acks.is_finished()
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let disc = RequestHeader {
            flags: 0,
            command: CMD_DISC,
            handle: 0,
            offset: 0,
            length: 0,
        };
        let mut bytes = bytes::BytesMut::new();
        disc.encode(&mut bytes);
        let _ = writer.write_all(&bytes).and_then(|()| writer.flush());
        let _ = writer.get_ref().shutdown(std::net::Shutdown::Both);
    }
    let (acked, failed) = acks.join().map_err(|_| anyhow!("ack reader panicked"))?;
    shared
        .journal
        .lock()
        .map_err(|_| anyhow!("poisoned"))?
        .flush()?;
    println!(
        "sent {sent} writes, {acked} acknowledged, {failed} failed, {} unanswered",
        sent - acked - failed
    );
    Ok(())
}

fn verify(uri: &str, journal: PathBuf) -> Result<bool> {
    let file = File::open(&journal).with_context(|| format!("opening {}", journal.display()))?;
    let mut seed = None;
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut sent: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["seed", s] => seed = Some(s.parse::<u64>()?),
            ["S", b, v] => {
                sent.entry(b.parse()?).or_default().insert(v.parse()?);
            }
            ["A", b, v] => {
                let (b, v): (u64, u64) = (b.parse()?, v.parse()?);
                let entry = acked.entry(b).or_insert(v);
                *entry = (*entry).max(v);
            }
            _ => {}
        }
    }
    let seed = seed.ok_or_else(|| anyhow!("journal has no seed line"))?;
    let stream = connect(uri)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    let mut bad = Vec::new();
    let (mut acked_ok, mut unacked_old, mut unacked_new) = (0u64, 0u64, 0u64);
    for (&block, versions) in &sent {
        let header = RequestHeader {
            flags: 0,
            command: CMD_READ,
            handle: block,
            offset: block * BLOCK as u64,
            length: BLOCK as u32,
        };
        let mut bytes = bytes::BytesMut::new();
        header.encode(&mut bytes);
        writer.write_all(&bytes)?;
        writer.flush()?;
        let mut reply = [0u8; 16];
        reader.read_exact(&mut reply)?;
        let error = u32::from_be_bytes(reply[4..8].try_into()?);
        if error != 0 {
            bail!("read of block {block} failed with error {error}");
        }
        let mut data = vec![0u8; BLOCK];
        reader.read_exact(&mut data)?;
        let found = if data.iter().all(|&b| b == 0) {
            None
        } else {
            Some(identify(&data))
        };
        let last_acked = acked.get(&block).copied();
        let verdict = match (found, last_acked) {
            (None, None) => {
                unacked_old += 1;
                Ok(())
            }
            (None, Some(v)) => Err(format!(
                "block {block}: zeroes, but version {v} was acknowledged"
            )),
            (Some(None), _) => Err(format!(
                "block {block}: content this tool never wrote (corrupt or foreign)"
            )),
            (Some(Some((s, b, v))), last) => {
                if s != seed || b != block {
                    Err(format!("block {block}: holds block {b} of seed {s}"))
                } else if !versions.contains(&v) {
                    Err(format!("block {block}: version {v} was never sent"))
                } else if last.is_some_and(|a| v < a) {
                    Err(format!(
                        "block {block}: version {v}, but version {} was acknowledged",
                        last.unwrap_or(0)
                    ))
                } else {
                    if last == Some(v) {
                        acked_ok += 1;
                    } else if last.is_none() || v > last.unwrap_or(0) {
                        unacked_new += 1;
                    }
                    Ok(())
                }
            }
        };
        if let Err(problem) = verdict {
            bad.push(problem);
        }
    }
    println!(
        "verified {} blocks: {acked_ok} hold their last acknowledged version, {unacked_new} a newer unacknowledged one, {unacked_old} were never acknowledged and read as zeroes; {} violations",
        sent.len(),
        bad.len()
    );
    for problem in bad.iter().take(20) {
        println!("VIOLATION {problem}");
    }
    Ok(bad.is_empty())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Write {
            uri,
            journal,
            blocks,
            first_block,
            depth,
            seconds,
            seed,
        } => write(&uri, journal, blocks, first_block, depth, seconds, seed).map(|()| true),
        Command::Verify { uri, journal } => verify(&uri, journal),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("hablk-durability: {e:#}");
            ExitCode::from(2)
        }
    }
}
