//! The whole fixed-newstyle handshake: the input is everything the client
//! sends, fed to the real `handshake` over an in-memory pipe.
//!
//! The handshake must never panic and must end once the client's bytes run
//! out. Time is paused on a current-thread runtime, so the timeout fires
//! only if the handshake waits on nothing but the clock (a hang), and a
//! slow instrumented build never trips it.
#![no_main]

use std::time::Duration;

use hablk::nbd::handshake::handshake;
use hablk::nbd::proto::{
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC,
};
use hablk::nbd::ExportPolicy;
use hablk::volume::ExportInfo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const EXPORT: ExportInfo = ExportInfo {
    size_bytes: 1 << 20,
    fast_zero: true,
    direct: false,
};
/// Far more than any handshake on an in-memory pipe takes; virtual time.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(60);
/// Greeting: NBDMAGIC, IHAVEOPT, handshake flags.
const GREETING_BYTES: usize = 18;
/// Option reply header: magic, option, type, length.
const OPTION_REPLY_HEADER_BYTES: usize = 20;

/// Exports one fixed export to every client.
struct FixedExport;

impl ExportPolicy for FixedExport {
    fn export_name(&self) -> &str {
        "r0"
    }
    fn description(&self) -> String {
        "fuzzing export".to_owned()
    }
    fn probe(&self) -> Result<ExportInfo, String> {
        Ok(EXPORT)
    }
    async fn attach(&self) -> Result<ExportInfo, String> {
        Ok(EXPORT)
    }
}

/// Checks the framing of what the server sent: the greeting, whole option
/// replies, and at most the reply to `NBD_OPT_EXPORT_NAME` at the end.
fn check_server_bytes(out: &[u8], transmitting: bool) {
    assert!(out.len() >= GREETING_BYTES, "greeting not sent");
    assert_eq!(out[..8], NBDMAGIC.to_be_bytes());
    assert_eq!(out[8..16], IHAVEOPT.to_be_bytes());
    assert_eq!(
        out[16..18],
        (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()
    );
    let mut rest = &out[GREETING_BYTES..];
    while rest.starts_with(&OPTION_REPLY_MAGIC.to_be_bytes()) {
        assert!(rest.len() >= OPTION_REPLY_HEADER_BYTES, "torn option reply");
        let length = u32::from_be_bytes([rest[16], rest[17], rest[18], rest[19]]) as usize;
        assert!(
            rest.len() >= OPTION_REPLY_HEADER_BYTES + length,
            "torn option reply"
        );
        rest = &rest[OPTION_REPLY_HEADER_BYTES + length..];
    }
    if !rest.is_empty() {
        // Only the export-name reply may follow: size, flags, maybe zeroes.
        assert!(transmitting, "stray bytes after the option replies");
        assert!(
            rest.len() == 10 || rest.len() == 134,
            "bad export-name reply"
        );
        assert_eq!(rest[..8], EXPORT.size_bytes.to_be_bytes());
    }
}

fuzz_target!(|input: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build();
    let Ok(runtime) = runtime else {
        return;
    };
    runtime.block_on(async {
        let (client, mut server) = tokio::io::duplex(64 << 10);
        let server_side = async move {
            let result = handshake(&mut server, &FixedExport).await;
            // Closing the server's end lets the client's reader finish.
            drop(server);
            result
        };
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let send = async move {
            // The server may hang up first; that is its right.
            let _ = to_server.write_all(input).await;
            let _ = to_server.shutdown().await;
        };
        let receive = async move {
            let mut out = Vec::new();
            let _ = from_server.read_to_end(&mut out).await;
            out
        };
        let everything = async { tokio::join!(server_side, send, receive) };
        let Ok((result, (), out)) = tokio::time::timeout(HANDSHAKE_LIMIT, everything).await else {
            panic!("the handshake did not end after the client's bytes ran out");
        };
        if let Ok(session) = &result {
            assert_eq!(session.export, EXPORT);
            assert!(!session.base_allocation || session.structured);
        }
        check_server_bytes(&out, result.is_ok());
    });
});
