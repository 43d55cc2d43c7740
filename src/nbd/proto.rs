//! NBD wire constants and codecs (the NBD protocol spec, `doc/proto.md`).
//!
//! Everything here is pure: bytes in, typed values or encoded bytes out.
//! Every function that reads client bytes is total — any input yields a
//! value or a typed error, never a panic — and is exercised by the fuzz
//! targets under `fuzz/` and by property tests.

use bytes::{BufMut, BytesMut};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;

/// Largest READ or WRITE we serve (advertised as the maximum block size).
pub const MAX_REQUEST_BYTES: u32 = 32 << 20;
/// A too-large WRITE's payload is read and dropped up to this size, so the
/// connection stays usable; beyond it the stream is unrecoverable and the
/// connection is closed.
pub const MAX_DRAIN_BYTES: u32 = 64 << 20;
/// Option payloads are small (names ≤ 4096 bytes by the spec, a few
/// queries); anything larger is a broken or hostile client.
pub const MAX_OPTION_BYTES: u32 = 64 << 10;
/// Strings in options: the spec's limit.
pub const MAX_STRING_BYTES: usize = 4096;
/// Queries in one meta-context option.
pub const MAX_META_QUERIES: u32 = 128;
/// Descriptors in one BLOCK_STATUS reply; the client asks again for the rest.
pub const MAX_BLOCK_STATUS_DESCRIPTORS: usize = 1024;
/// Preferred block size advertised to clients.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation.
pub const META_CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The error values a reply may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

/// An option sent by the client during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info {
        export: String,
        requests: Vec<u16>,
    },
    Go {
        export: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    ListMetaContext {
        export: String,
        queries: Vec<String>,
    },
    SetMetaContext {
        export: String,
        queries: Vec<String>,
    },
    Unknown(u32),
}

/// Why an option's data could not be understood (answered with
/// `NBD_REP_ERR_INVALID`, the handshake goes on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOption(pub &'static str);

struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], InvalidOption> {
        if self.data.len() < n {
            return Err(InvalidOption(what));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, InvalidOption> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, InvalidOption> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self, len: usize, what: &'static str) -> Result<String, InvalidOption> {
        if len > MAX_STRING_BYTES {
            return Err(InvalidOption("string longer than 4096 bytes"));
        }
        let bytes = self.take(len, what)?;
        let text = std::str::from_utf8(bytes).map_err(|_| InvalidOption("string is not UTF-8"))?;
        if text.contains('\0') {
            return Err(InvalidOption("string contains NUL"));
        }
        Ok(text.to_owned())
    }
    fn prefixed_string(&mut self, what: &'static str) -> Result<String, InvalidOption> {
        let len = self.u32(what)? as usize;
        self.string(len, what)
    }
    fn finish(&self) -> Result<(), InvalidOption> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(InvalidOption("trailing bytes after option data"))
        }
    }
}

/// Decodes one option's data.
pub fn parse_option(code: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
    let mut cursor = Cursor { data };
    let no_data = |option: ClientOption| {
        if data.is_empty() {
            Ok(option)
        } else {
            Err(InvalidOption("option takes no data"))
        }
    };
    match code {
        OPT_EXPORT_NAME => {
            let name = cursor.string(data.len(), "export name")?;
            Ok(ClientOption::ExportName(name))
        }
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_data(ClientOption::List),
        OPT_STARTTLS => no_data(ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        OPT_INFO | OPT_GO => {
            let export = cursor.prefixed_string("export name")?;
            let count = cursor.u16("number of info requests")?;
            let mut requests = Vec::with_capacity(usize::from(count).min(16));
            for _ in 0..count {
                requests.push(cursor.u16("info request")?);
            }
            cursor.finish()?;
            Ok(if code == OPT_INFO {
                ClientOption::Info { export, requests }
            } else {
                ClientOption::Go { export, requests }
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let export = cursor.prefixed_string("export name")?;
            let count = cursor.u32("number of queries")?;
            if count > MAX_META_QUERIES {
                return Err(InvalidOption("too many meta context queries"));
            }
            let mut queries = Vec::with_capacity(count as usize);
            for _ in 0..count {
                queries.push(cursor.prefixed_string("query")?);
            }
            cursor.finish()?;
            Ok(if code == OPT_LIST_META_CONTEXT {
                ClientOption::ListMetaContext { export, queries }
            } else {
                ClientOption::SetMetaContext { export, queries }
            })
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// Whether `query` selects the `base:allocation` context.
pub fn query_selects_base_allocation(query: &str) -> bool {
    query == "base:" || query == META_CONTEXT_BASE_ALLOCATION
}

/// Encodes an option reply header and its data.
pub fn option_reply(out: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// A request header, as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// The request magic was wrong: the stream cannot be resynchronised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

impl RequestHeader {
    /// Decodes the 28-byte header (the caller has checked the length).
    pub fn parse(bytes: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader, BadMagic> {
        let u32_at =
            |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        let magic = u32_at(0);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes([bytes[4], bytes[5]]),
            command: u16::from_be_bytes([bytes[6], bytes[7]]),
            handle: u64_at(8),
            offset: u64_at(16),
            length: u32_at(24),
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.command);
        out.put_u64(self.handle);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }

    /// What to do with the bytes that follow the header.
    pub fn payload(&self) -> Payload {
        if self.command != CMD_WRITE {
            Payload::None
        } else if self.length <= MAX_REQUEST_BYTES {
            Payload::Data(self.length)
        } else if self.length <= MAX_DRAIN_BYTES {
            Payload::Drain(self.length)
        } else {
            Payload::TooLarge
        }
    }
}

/// The payload following a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    None,
    /// Read this many bytes of write data.
    Data(u32),
    /// Read and drop this many bytes, then answer `EINVAL`.
    Drain(u32),
    /// Close the connection: the payload is too large to drain.
    TooLarge,
}

/// What was negotiated for this connection, for request validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub export_bytes: u64,
    pub structured: bool,
    pub base_allocation: bool,
    /// 1, or 512 with O_DIRECT.
    pub min_block_bytes: u32,
    pub fast_zero: bool,
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        may_punch: bool,
        fast_only: bool,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
}

/// A request refused before it reaches the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub errno: Errno,
    pub reason: &'static str,
}

fn refuse(errno: Errno, reason: &'static str) -> Refusal {
    Refusal { errno, reason }
}

/// Checks a request against the negotiated export; pure and total.
pub fn validate(header: &RequestHeader, n: &Negotiated) -> Result<Command, Refusal> {
    let offset = header.offset;
    let length = header.length;
    let allowed_flags = CMD_FLAG_FUA
        | match header.command {
            CMD_READ if n.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    let known = matches!(
        header.command,
        CMD_READ
            | CMD_WRITE
            | CMD_DISC
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    );
    if !known {
        return Err(refuse(Errno::Inval, "unknown command"));
    }
    if header.flags & !allowed_flags != 0 {
        return Err(refuse(Errno::Inval, "flag not valid for this command"));
    }
    let fua = header.flags & CMD_FLAG_FUA != 0;
    let end = offset.checked_add(u64::from(length));
    let in_range = end.is_some_and(|end| end <= n.export_bytes);
    let aligned = u64::from(n.min_block_bytes) <= 1
        || (offset % u64::from(n.min_block_bytes) == 0 && length % n.min_block_bytes == 0);
    let ranged = |out_of_range: Errno| -> Result<(), Refusal> {
        if length == 0 {
            return Err(refuse(Errno::Inval, "zero length"));
        }
        if !in_range {
            return Err(refuse(out_of_range, "beyond the end of the export"));
        }
        if !aligned {
            return Err(refuse(
                Errno::Inval,
                "not aligned to the minimum block size",
            ));
        }
        Ok(())
    };
    match header.command {
        CMD_READ => {
            if length > MAX_REQUEST_BYTES {
                return Err(refuse(Errno::Inval, "larger than the maximum block size"));
            }
            ranged(Errno::Inval)?;
            Ok(Command::Read { offset, length })
        }
        CMD_WRITE => {
            if length > MAX_REQUEST_BYTES {
                return Err(refuse(Errno::Inval, "larger than the maximum block size"));
            }
            ranged(Errno::NoSpc)?;
            Ok(Command::Write {
                offset,
                length,
                fua,
            })
        }
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => {
            if offset != 0 || length != 0 {
                return Err(refuse(Errno::Inval, "flush with nonzero offset or length"));
            }
            Ok(Command::Flush)
        }
        CMD_TRIM => {
            ranged(Errno::Inval)?;
            Ok(Command::Trim {
                offset,
                length,
                fua,
            })
        }
        CMD_CACHE => {
            ranged(Errno::Inval)?;
            Ok(Command::Cache { offset, length })
        }
        CMD_WRITE_ZEROES => {
            let fast_only = header.flags & CMD_FLAG_FAST_ZERO != 0;
            if fast_only && !n.fast_zero {
                return Err(refuse(Errno::NotSup, "fast zero is not supported here"));
            }
            ranged(Errno::NoSpc)?;
            Ok(Command::WriteZeroes {
                offset,
                length,
                fua,
                may_punch: header.flags & CMD_FLAG_NO_HOLE == 0,
                fast_only,
            })
        }
        CMD_BLOCK_STATUS => {
            if !n.base_allocation {
                return Err(refuse(Errno::Inval, "no metadata context was negotiated"));
            }
            ranged(Errno::Inval)?;
            Ok(Command::BlockStatus {
                offset,
                length,
                req_one: header.flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
        _ => Err(refuse(Errno::Inval, "unknown command")),
    }
}

/// Simple reply header (data, if any, follows).
pub fn simple_reply(out: &mut BytesMut, handle: u64, error: u32) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(handle);
}

/// Structured reply chunk header.
pub fn structured_header(
    out: &mut BytesMut,
    flags: u16,
    reply_type: u16,
    handle: u64,
    length: u32,
) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(reply_type);
    out.put_u64(handle);
    out.put_u32(length);
}

/// A structured error chunk with a message for humans.
pub fn structured_error(out: &mut BytesMut, handle: u64, errno: Errno, message: &str) {
    let message = &message.as_bytes()[..message.len().min(MAX_STRING_BYTES)];
    structured_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + message.len() as u32,
    );
    out.put_u32(errno as u32);
    out.put_u16(message.len() as u16);
    out.put_slice(message);
}

/// The header of an OFFSET_DATA chunk carrying all of a read's data
/// (which follows), marked as the final chunk.
pub fn read_data_header(out: &mut BytesMut, handle: u64, offset: u64, data_len: u32) {
    structured_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        8 + data_len,
    );
    out.put_u64(offset);
}

/// A BLOCK_STATUS chunk for base:allocation; `extents` are (length, flags).
pub fn block_status_reply(out: &mut BytesMut, handle: u64, extents: &[(u32, u32)]) {
    structured_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        4 + 8 * extents.len() as u32,
    );
    out.put_u32(BASE_ALLOCATION_ID);
    for &(length, flags) in extents {
        out.put_u32(length);
        out.put_u32(flags);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn negotiated() -> Negotiated {
        Negotiated {
            export_bytes: 1 << 20,
            structured: true,
            base_allocation: true,
            min_block_bytes: 1,
            fast_zero: true,
        }
    }

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            handle: 7,
            offset,
            length,
        }
    }

    #[test]
    fn header_round_trip() {
        let h = header(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let mut out = BytesMut::new();
        h.encode(&mut out);
        let bytes: [u8; REQUEST_HEADER_BYTES] = out[..].try_into().unwrap();
        assert_eq!(RequestHeader::parse(&bytes).unwrap(), h);
    }

    #[test]
    fn bad_magic_is_reported() {
        let bytes = [0u8; REQUEST_HEADER_BYTES];
        assert_eq!(RequestHeader::parse(&bytes), Err(BadMagic(0)));
    }

    #[test]
    fn range_errors_follow_the_contract() {
        let n = negotiated();
        let end = n.export_bytes;
        assert_eq!(
            validate(&header(CMD_READ, 0, end - 1, 2), &n)
                .unwrap_err()
                .errno,
            Errno::Inval
        );
        assert_eq!(
            validate(&header(CMD_TRIM, 0, end, 1), &n)
                .unwrap_err()
                .errno,
            Errno::Inval
        );
        assert_eq!(
            validate(&header(CMD_WRITE, 0, end - 1, 2), &n)
                .unwrap_err()
                .errno,
            Errno::NoSpc
        );
        assert_eq!(
            validate(&header(CMD_WRITE_ZEROES, 0, end, 4096), &n)
                .unwrap_err()
                .errno,
            Errno::NoSpc
        );
        assert_eq!(
            validate(&header(CMD_READ, 0, u64::MAX, 2), &n)
                .unwrap_err()
                .errno,
            Errno::Inval,
            "offset overflow is out of range, not a panic"
        );
        assert!(validate(&header(CMD_READ, 0, end - 4096, 4096), &n).is_ok());
    }

    #[test]
    fn unknown_commands_and_flags_are_einval() {
        let n = negotiated();
        assert_eq!(
            validate(&header(42, 0, 0, 1), &n).unwrap_err().errno,
            Errno::Inval
        );
        assert_eq!(
            validate(&header(CMD_READ, 1 << 9, 0, 1), &n)
                .unwrap_err()
                .errno,
            Errno::Inval
        );
        assert_eq!(
            validate(&header(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), &n)
                .unwrap_err()
                .errno,
            Errno::Inval
        );
        // FUA is accepted on every command.
        assert!(validate(&header(CMD_READ, CMD_FLAG_FUA, 0, 1), &n).is_ok());
    }

    #[test]
    fn oversized_requests() {
        let n = Negotiated {
            export_bytes: 1 << 40,
            ..negotiated()
        };
        let big = MAX_REQUEST_BYTES + 1;
        assert_eq!(
            validate(&header(CMD_READ, 0, 0, big), &n)
                .unwrap_err()
                .errno,
            Errno::Inval
        );
        assert_eq!(header(CMD_WRITE, 0, 0, big).payload(), Payload::Drain(big));
        assert_eq!(
            header(CMD_WRITE, 0, 0, MAX_DRAIN_BYTES + 1).payload(),
            Payload::TooLarge
        );
        assert_eq!(header(CMD_READ, 0, 0, big).payload(), Payload::None);
        // Trims and zeroes have no payload and no size limit.
        assert!(validate(&header(CMD_TRIM, 0, 0, u32::MAX), &n).is_ok());
    }

    #[test]
    fn block_status_needs_a_context_and_df_needs_structured_replies() {
        let mut n = negotiated();
        n.base_allocation = false;
        assert!(validate(&header(CMD_BLOCK_STATUS, 0, 0, 1), &n).is_err());
        n.structured = false;
        assert!(validate(&header(CMD_READ, CMD_FLAG_DF, 0, 1), &n).is_err());
    }

    #[test]
    fn fast_zero_without_support_is_enotsup() {
        let n = Negotiated {
            fast_zero: false,
            ..negotiated()
        };
        assert_eq!(
            validate(&header(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1), &n)
                .unwrap_err()
                .errno,
            Errno::NotSup
        );
    }

    #[test]
    fn direct_io_requires_alignment() {
        let n = Negotiated {
            min_block_bytes: 512,
            ..negotiated()
        };
        assert!(validate(&header(CMD_READ, 0, 512, 512), &n).is_ok());
        assert!(validate(&header(CMD_READ, 0, 1, 512), &n).is_err());
    }

    #[test]
    fn options_parse() {
        let mut go = Vec::new();
        go.extend_from_slice(&2u32.to_be_bytes());
        go.extend_from_slice(b"r0");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_option(OPT_GO, &go).unwrap(),
            ClientOption::Go {
                export: "r0".into(),
                requests: vec![INFO_BLOCK_SIZE]
            }
        );
        assert!(parse_option(OPT_GO, &go[..5]).is_err());
        assert!(parse_option(OPT_LIST, b"x").is_err());
        assert_eq!(
            parse_option(99, b"junk").unwrap(),
            ClientOption::Unknown(99)
        );
        let mut meta = Vec::new();
        meta.extend_from_slice(&0u32.to_be_bytes());
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_option(OPT_SET_META_CONTEXT, &meta).unwrap(),
            ClientOption::SetMetaContext {
                export: String::new(),
                queries: vec!["base:allocation".into()]
            }
        );
    }

    proptest! {
        #[test]
        fn option_parser_is_total(code in 0u32..16, data in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_option(code, &data);
        }

        #[test]
        fn request_decoder_is_total(bytes in prop::array::uniform28(any::<u8>()),
                                    export in 0u64..u64::MAX, structured: bool, ctx: bool) {
            if let Ok(h) = RequestHeader::parse(&bytes) {
                let n = Negotiated { export_bytes: export, structured, base_allocation: ctx,
                                     min_block_bytes: 1, fast_zero: true };
                let _ = h.payload();
                if let Ok(cmd) = validate(&h, &n) {
                    // Whatever is accepted lies inside the export.
                    match cmd {
                        Command::Read { offset, length } | Command::Write { offset, length, .. }
                        | Command::Trim { offset, length, .. } | Command::Cache { offset, length }
                        | Command::WriteZeroes { offset, length, .. }
                        | Command::BlockStatus { offset, length, .. } => {
                            prop_assert!(offset + u64::from(length) <= export);
                            prop_assert!(length > 0);
                        }
                        Command::Disconnect | Command::Flush => {}
                    }
                }
            }
        }
    }
}
