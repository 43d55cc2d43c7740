//! The fixed newstyle handshake: option haggling until the client picks
//! the export (`OPT_GO` / `OPT_EXPORT_NAME`) or leaves.
//!
//! Only the Primary exports the resource: on any other node `OPT_GO` and
//! `OPT_INFO` get `NBD_REP_ERR_POLICY` with the reason (e.g. "r0 is
//! Secondary on beta; Primary: alpha"), and `OPT_EXPORT_NAME`, which cannot
//! carry an error, closes the connection. Unknown options get
//! `NBD_REP_ERR_UNSUP` and the handshake goes on.

use bytes::{BufMut, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::*;
use super::ExportPolicy;
use crate::volume::ExportInfo;

/// How the handshake ended without entering transmission.
#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("connection lost during handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("client sent unknown flags {0:#x}")]
    BadClientFlags(u32),
    #[error("client sent bad option magic {0:#018x} (not an NBD client?)")]
    BadOptionMagic(u64),
    #[error("client sent an option of {0} bytes (limit {MAX_OPTION_BYTES})")]
    OptionTooLarge(u32),
    #[error("client asked for export '{0}' with OPT_EXPORT_NAME, which does not exist")]
    UnknownExport(String),
    #[error("client sent an unusable export name with OPT_EXPORT_NAME: {0}")]
    InvalidExportName(&'static str),
    #[error("export refused with OPT_EXPORT_NAME: {0}")]
    ExportRefused(String),
    #[error("client aborted the handshake")]
    Aborted,
    #[error("client sent nothing within {} s of the greeting", FIRST_BYTES_TIMEOUT.as_secs())]
    Silent,
}

/// A client must answer the greeting (its flags) within this time; every
/// NBD client does so at once. The whole handshake has its own, longer
/// bound (`server::HANDSHAKE_TIMEOUT`).
pub const FIRST_BYTES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the client and server agreed on for the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub export: ExportInfo,
    pub structured: bool,
    pub base_allocation: bool,
}

impl Session {
    pub fn negotiated(&self) -> Negotiated {
        Negotiated {
            export_bytes: self.export.size_bytes,
            structured: self.structured,
            base_allocation: self.base_allocation,
            min_block_bytes: min_block_bytes(&self.export),
            fast_zero: self.export.fast_zero,
        }
    }
}

fn min_block_bytes(export: &ExportInfo) -> u32 {
    if export.direct {
        512
    } else {
        1
    }
}

/// Transmission flags for an export.
pub fn transmission_flags(export: &ExportInfo, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_CACHE
        | FLAG_CAN_MULTI_CONN;
    if structured {
        flags |= FLAG_SEND_DF;
    }
    if export.fast_zero {
        flags |= FLAG_SEND_FAST_ZERO;
    }
    flags
}

struct Haggle<'a, P: ExportPolicy> {
    policy: &'a P,
    structured: bool,
    base_allocation: bool,
    out: BytesMut,
}

enum Next {
    Continue,
    Transmit(ExportInfo),
}

impl<P: ExportPolicy> Haggle<'_, P> {
    fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        option_reply(&mut self.out, option, reply_type, data);
    }

    fn error(&mut self, option: u32, reply_type: u32, message: &str) {
        if reply_type == REP_ERR_UNSUP {
            // Clients probe for optional features: not worth a log line.
            tracing::debug!(option, reason = message, "NBD option not supported");
            self.reply(option, reply_type, message.as_bytes());
            return;
        }
        tracing::info!(
            option,
            reply_type = format_args!("{reply_type:#x}"),
            reason = message,
            "NBD option refused"
        );
        self.reply(option, reply_type, message.as_bytes());
    }

    fn known_export(&self, name: &str) -> bool {
        name.is_empty() || name == self.policy.export_name()
    }

    fn unknown_export(&mut self, option: u32, name: &str) {
        let message = format!(
            "unknown export '{name}'; this server exports '{}'",
            self.policy.export_name()
        );
        self.error(option, REP_ERR_UNKNOWN, &message);
    }

    fn info(&mut self, option: u32, export: &ExportInfo, requests: &[u16]) {
        let mut data = BytesMut::with_capacity(12);
        data.put_u16(INFO_EXPORT);
        data.put_u64(export.size_bytes);
        data.put_u16(transmission_flags(export, self.structured));
        self.reply(option, REP_INFO, &data);
        let mut data = BytesMut::with_capacity(14);
        data.put_u16(INFO_BLOCK_SIZE);
        data.put_u32(min_block_bytes(export));
        data.put_u32(PREFERRED_BLOCK_BYTES);
        data.put_u32(MAX_REQUEST_BYTES);
        self.reply(option, REP_INFO, &data);
        if requests.contains(&INFO_NAME) {
            let mut data = BytesMut::new();
            data.put_u16(INFO_NAME);
            data.put_slice(self.policy.export_name().as_bytes());
            self.reply(option, REP_INFO, &data);
        }
        if requests.contains(&INFO_DESCRIPTION) {
            let mut data = BytesMut::new();
            data.put_u16(INFO_DESCRIPTION);
            data.put_slice(self.policy.description().as_bytes());
            self.reply(option, REP_INFO, &data);
        }
        self.reply(option, REP_ACK, &[]);
    }

    fn meta_contexts(&mut self, option: u32, export: &str, queries: &[String]) -> Option<bool> {
        if !self.structured {
            self.error(
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
            return None;
        }
        if !self.known_export(export) {
            self.unknown_export(option, export);
            return None;
        }
        let selected = if option == OPT_LIST_META_CONTEXT && queries.is_empty() {
            true
        } else {
            queries.iter().any(|q| query_selects_base_allocation(q))
        };
        if selected {
            let mut data = BytesMut::new();
            data.put_u32(if option == OPT_SET_META_CONTEXT {
                BASE_ALLOCATION_ID
            } else {
                0
            });
            data.put_slice(META_CONTEXT_BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &data);
        }
        self.reply(option, REP_ACK, &[]);
        Some(selected)
    }

    async fn handle(&mut self, code: u32, data: &[u8]) -> Result<Next, HandshakeError> {
        let option = match parse_option(code, data) {
            Ok(option) => option,
            // OPT_EXPORT_NAME has no error reply: the client would read
            // one as the export's size and flags. Close instead.
            Err(InvalidOption(why)) if code == OPT_EXPORT_NAME => {
                return Err(HandshakeError::InvalidExportName(why));
            }
            Err(InvalidOption(why)) => {
                self.error(code, REP_ERR_INVALID, why);
                return Ok(Next::Continue);
            }
        };
        match option {
            ClientOption::ExportName(name) => {
                if !self.known_export(&name) {
                    return Err(HandshakeError::UnknownExport(name));
                }
                return match self.policy.attach().await {
                    Ok(export) => Ok(Next::Transmit(export)),
                    Err(reason) => Err(HandshakeError::ExportRefused(reason)),
                };
            }
            ClientOption::Abort => {
                self.reply(code, REP_ACK, &[]);
                return Err(HandshakeError::Aborted);
            }
            ClientOption::List => {
                let name = self.policy.export_name().as_bytes().to_vec();
                let mut data = BytesMut::with_capacity(4 + name.len());
                data.put_u32(name.len() as u32);
                data.put_slice(&name);
                self.reply(code, REP_SERVER, &data);
                self.reply(code, REP_ACK, &[]);
            }
            ClientOption::StartTls => {
                self.error(code, REP_ERR_POLICY, "TLS is not offered by this server");
            }
            ClientOption::StructuredReply => {
                self.structured = true;
                self.reply(code, REP_ACK, &[]);
            }
            ClientOption::Info { export, requests } | ClientOption::Go { export, requests } => {
                if !self.known_export(&export) {
                    self.unknown_export(code, &export);
                    return Ok(Next::Continue);
                }
                let verdict = if code == OPT_GO {
                    self.policy.attach().await
                } else {
                    self.policy.probe()
                };
                match verdict {
                    Ok(info) => {
                        self.info(code, &info, &requests);
                        if code == OPT_GO {
                            return Ok(Next::Transmit(info));
                        }
                    }
                    Err(reason) => self.error(code, REP_ERR_POLICY, &reason),
                }
            }
            ClientOption::ListMetaContext { export, queries } => {
                self.meta_contexts(code, &export, &queries);
            }
            ClientOption::SetMetaContext { export, queries } => {
                if let Some(selected) = self.meta_contexts(code, &export, &queries) {
                    self.base_allocation = selected;
                }
            }
            ClientOption::Unknown(other) => {
                let message = format!("option {other} is not supported");
                self.error(code, REP_ERR_UNSUP, &message);
            }
        }
        Ok(Next::Continue)
    }
}

/// Runs the handshake; returns the session once the client enters the
/// transmission phase.
pub async fn handshake<S, P>(stream: &mut S, policy: &P) -> Result<Session, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    P: ExportPolicy,
{
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBDMAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let client_flags = tokio::time::timeout(FIRST_BYTES_TIMEOUT, stream.read_u32())
        .await
        .map_err(|_| HandshakeError::Silent)??;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::BadClientFlags(client_flags));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut haggle = Haggle {
        policy,
        structured: false,
        base_allocation: false,
        out: BytesMut::with_capacity(256),
    };
    loop {
        let magic = stream.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        let code = stream.read_u32().await?;
        let length = stream.read_u32().await?;
        if length > MAX_OPTION_BYTES {
            return Err(HandshakeError::OptionTooLarge(length));
        }
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data).await?;
        let next = haggle.handle(code, &data).await;
        if !haggle.out.is_empty() {
            stream.write_all(&haggle.out).await?;
            haggle.out.clear();
        }
        match next? {
            Next::Continue => stream.flush().await?,
            Next::Transmit(export) => {
                if code == OPT_EXPORT_NAME {
                    let mut reply = BytesMut::with_capacity(134);
                    reply.put_u64(export.size_bytes);
                    reply.put_u16(transmission_flags(&export, haggle.structured));
                    if !no_zeroes {
                        reply.put_bytes(0, 124);
                    }
                    stream.write_all(&reply).await?;
                }
                stream.flush().await?;
                return Ok(Session {
                    export,
                    structured: haggle.structured,
                    base_allocation: haggle.base_allocation && haggle.structured,
                });
            }
        }
    }
}
