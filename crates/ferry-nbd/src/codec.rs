//! Sans-I/O NBD codec: encoders for options and requests, and incremental decoders that work on
//! a byte buffer and never touch a socket. The client, the server and the fuzz targets all use
//! these functions, so what the fuzzer exercises is what runs in production.
//!
//! Every decoder treats its input as hostile: lengths are checked against limits *before* any
//! buffering or allocation, cookies must match a request in flight, chunks must lie inside the
//! request they answer, and a reply must cover a READ exactly once.

use crate::proto::{self, chunk, cmd, rep};
use ferry_core::ExtentMap;
use std::ops::Range;

/// Largest option payload either side accepts (names are ≤ 4096 bytes; descriptions are short).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest BLOCK_STATUS chunk accepted: proto.md asks servers for ≤ 2^20 descriptors.
pub const MAX_BLOCK_STATUS_LEN: u32 = 4 + 8 * ((1 << 20) + 1);
/// Largest error chunk: a 4096-byte message plus the fixed fields.
pub const MAX_ERROR_CHUNK_LEN: u32 = 4 + 2 + 4096 + 8;

/// A protocol violation found while decoding. The caller adds server and export names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

fn perr<T>(msg: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(msg.into()))
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

// ---------------------------------------------------------------------------------------------
// Handshake and options
// ---------------------------------------------------------------------------------------------

/// Parses the 18-byte newstyle greeting and returns the handshake flags.
pub fn decode_greeting(b: &[u8; 18]) -> Result<u16, ProtocolError> {
    let magic = be_u64(b, 0);
    if magic != proto::NBDMAGIC {
        return perr(format!(
            "bad greeting magic {magic:#018x}: not an NBD server"
        ));
    }
    let second = be_u64(b, 8);
    if second == proto::OLDSTYLE_MAGIC {
        return perr("server speaks the oldstyle protocol, which is not supported");
    }
    if second != proto::IHAVEOPT {
        return perr(format!("bad newstyle magic {second:#018x}"));
    }
    let flags = be_u16(b, 16);
    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return perr("server does not support fixed newstyle negotiation");
    }
    Ok(flags)
}

/// Encodes the greeting a server sends.
pub fn encode_greeting(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&proto::NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Encodes an option request: `IHAVEOPT, u32 option, u32 length, data`.
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Data of `NBD_OPT_GO`/`NBD_OPT_INFO`: export name and the info items asked for.
pub fn encode_go_data(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::with_capacity(6 + export.len() + 2 * infos.len());
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Data of `NBD_OPT_SET_META_CONTEXT`/`LIST_META_CONTEXT`.
pub fn encode_meta_context_data(export: &str, queries: &[String]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Header of an option reply: `u64 magic, u32 option, u32 type, u32 length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// Payload length (already checked against [`MAX_OPTION_LEN`]).
    pub len: u32,
}

/// Decodes an option reply header, checking that it answers `expected_option`.
pub fn decode_option_reply_header(
    b: &[u8; 20],
    expected_option: u32,
) -> Result<OptionReplyHeader, ProtocolError> {
    let magic = be_u64(b, 0);
    if magic != proto::OPT_REPLY_MAGIC {
        return perr(format!(
            "bad option reply magic {magic:#018x} answering {}",
            proto::opt_name(expected_option)
        ));
    }
    let option = be_u32(b, 8);
    if option != expected_option {
        return perr(format!(
            "option reply is for option {option}, expected {} ({expected_option})",
            proto::opt_name(expected_option)
        ));
    }
    let h = OptionReplyHeader {
        option,
        reply_type: be_u32(b, 12),
        len: be_u32(b, 16),
    };
    if h.len > MAX_OPTION_LEN {
        return perr(format!(
            "option reply to {} claims {} bytes (limit {MAX_OPTION_LEN})",
            proto::opt_name(option),
            h.len
        ));
    }
    if h.reply_type == rep::ACK && h.len != 0 {
        return perr(format!(
            "NBD_REP_ACK to {} carries {} bytes",
            proto::opt_name(option),
            h.len
        ));
    }
    Ok(h)
}

/// Encodes an option reply (server side).
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoItem {
    /// Size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Block size constraints.
    BlockSize {
        /// Minimum.
        min: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// Name or description text.
    Text(u16, String),
    /// An item this client does not know; ignored per proto.md.
    Unknown(u16),
}

/// Parses the payload of an `NBD_REP_INFO` reply.
pub fn decode_info(d: &[u8]) -> Result<InfoItem, ProtocolError> {
    if d.len() < 2 {
        return perr("NBD_REP_INFO shorter than its 2-byte type");
    }
    let t = be_u16(d, 0);
    match t {
        proto::info::EXPORT => {
            if d.len() != 12 {
                return perr(format!(
                    "NBD_INFO_EXPORT has {} bytes, expected 12",
                    d.len()
                ));
            }
            Ok(InfoItem::Export {
                size: be_u64(d, 2),
                flags: be_u16(d, 10),
            })
        }
        proto::info::BLOCK_SIZE => {
            if d.len() != 14 {
                return perr(format!(
                    "NBD_INFO_BLOCK_SIZE has {} bytes, expected 14",
                    d.len()
                ));
            }
            let (min, preferred, max) = (be_u32(d, 2), be_u32(d, 6), be_u32(d, 10));
            let pow2 = |v: u32| v != 0 && v.is_power_of_two();
            if !pow2(min) || min > 65536 || !pow2(preferred) || preferred < min || max < preferred {
                return perr(format!(
                    "NBD_INFO_BLOCK_SIZE is inconsistent: min {min}, preferred {preferred}, max {max}"
                ));
            }
            Ok(InfoItem::BlockSize {
                min,
                preferred,
                max,
            })
        }
        proto::info::NAME | proto::info::DESCRIPTION => Ok(InfoItem::Text(
            t,
            String::from_utf8_lossy(&d[2..]).into_owned(),
        )),
        other => Ok(InfoItem::Unknown(other)),
    }
}

/// Parses `NBD_REP_META_CONTEXT`: `u32 id, name`.
pub fn decode_meta_context(d: &[u8]) -> Result<(u32, String), ProtocolError> {
    if d.len() < 5 {
        return perr(format!("NBD_REP_META_CONTEXT has only {} bytes", d.len()));
    }
    let name = std::str::from_utf8(&d[4..])
        .map_err(|_| ProtocolError("NBD_REP_META_CONTEXT name is not UTF-8".into()))?;
    Ok((be_u32(d, 0), name.to_string()))
}

/// Parses `NBD_REP_SERVER`: `u32 namelen, name, description`.
pub fn decode_list_entry(d: &[u8]) -> Result<(String, String), ProtocolError> {
    if d.len() < 4 {
        return perr("NBD_REP_SERVER shorter than its name length");
    }
    let n = be_u32(d, 0) as usize;
    if n > d.len() - 4 {
        return perr(format!(
            "NBD_REP_SERVER name length {n} exceeds the {}-byte reply",
            d.len()
        ));
    }
    Ok((
        String::from_utf8_lossy(&d[4..4 + n]).into_owned(),
        String::from_utf8_lossy(&d[4 + n..]).into_owned(),
    ))
}

/// Parses the reply to `NBD_OPT_EXPORT_NAME`: `u64 size, u16 flags` (zeros are read separately).
pub fn decode_export_name_reply(b: &[u8; 10]) -> (u64, u16) {
    (be_u64(b, 0), be_u16(b, 8))
}

// ---------------------------------------------------------------------------------------------
// Server side: option data parsers
// ---------------------------------------------------------------------------------------------

/// Parsed data of `NBD_OPT_GO`/`INFO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    /// Export name.
    pub export: String,
    /// Info items requested.
    pub infos: Vec<u16>,
}

/// Parses `NBD_OPT_GO`/`INFO` data from a client.
pub fn decode_go_data(d: &[u8]) -> Result<GoRequest, ProtocolError> {
    if d.len() < 6 {
        return perr("GO/INFO data shorter than 6 bytes");
    }
    let n = be_u32(d, 0) as usize;
    if n > d.len() - 6 {
        return perr(format!("export name length {n} exceeds the option data"));
    }
    let export = std::str::from_utf8(&d[4..4 + n])
        .map_err(|_| ProtocolError("export name is not UTF-8".into()))?
        .to_string();
    let count = be_u16(d, 4 + n) as usize;
    let rest = &d[6 + n..];
    if rest.len() != 2 * count {
        return perr(format!(
            "GO/INFO asks for {count} info items but carries {} bytes",
            rest.len()
        ));
    }
    let infos = rest.chunks_exact(2).map(|c| be_u16(c, 0)).collect();
    Ok(GoRequest { export, infos })
}

/// Parses `NBD_OPT_SET_META_CONTEXT`/`LIST_META_CONTEXT` data from a client.
pub fn decode_meta_context_data(d: &[u8]) -> Result<(String, Vec<String>), ProtocolError> {
    if d.len() < 8 {
        return perr("meta context data shorter than 8 bytes");
    }
    let n = be_u32(d, 0) as usize;
    if n > d.len() - 8 {
        return perr(format!("export name length {n} exceeds the option data"));
    }
    let export = std::str::from_utf8(&d[4..4 + n])
        .map_err(|_| ProtocolError("export name is not UTF-8".into()))?
        .to_string();
    let count = be_u32(d, 4 + n) as usize;
    let mut at = 8 + n;
    // Each query takes at least 4 bytes, which bounds `count` by the data we hold.
    if count > (d.len() - at) / 4 {
        return perr(format!(
            "{count} meta context queries cannot fit the option data"
        ));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        if d.len() - at < 4 {
            return perr("meta context query length truncated");
        }
        let l = be_u32(d, at) as usize;
        at += 4;
        if l > d.len() - at {
            return perr(format!(
                "meta context query length {l} exceeds the option data"
            ));
        }
        let q = std::str::from_utf8(&d[at..at + l])
            .map_err(|_| ProtocolError("meta context query is not UTF-8".into()))?;
        queries.push(q.to_string());
        at += l;
    }
    if at != d.len() {
        return perr("trailing bytes after meta context queries");
    }
    Ok((export, queries))
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests
// ---------------------------------------------------------------------------------------------

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub cmd: u16,
    /// Cookie (handle) echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length (for WRITE, the payload that follows).
    pub length: u32,
}

impl Request {
    /// Encodes the 28-byte header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes a request header (server side). `Ok(None)` means more bytes are needed.
    pub fn decode(b: &[u8]) -> Result<Option<Self>, ProtocolError> {
        if b.len() < REQUEST_LEN {
            return Ok(None);
        }
        let magic = be_u32(b, 0);
        if magic != proto::REQUEST_MAGIC {
            return perr(format!("bad request magic {magic:#010x}"));
        }
        Ok(Some(Self {
            flags: be_u16(b, 4),
            cmd: be_u16(b, 6),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            length: be_u32(b, 24),
        }))
    }
}

/// What a server must do with a decoded request after [`check_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestCheck {
    /// Valid: serve it.
    Ok,
    /// Invalid: reply with this errno (after consuming any WRITE payload).
    Reject(u32),
}

/// Server-side validation of a request against the export. Returns the number of payload bytes
/// that follow the header (WRITE only) or a protocol error when the stream cannot be trusted any
/// further (payload beyond `max_payload`, unknown command): the server then drops the connection.
pub fn check_request(
    r: &Request,
    export_size: u64,
    max_payload: u32,
    read_only: bool,
) -> Result<(usize, RequestCheck), ProtocolError> {
    use proto::errno::*;
    let payload = if r.cmd == cmd::WRITE {
        if r.length > max_payload {
            return perr(format!(
                "WRITE of {} bytes exceeds the {max_payload}-byte limit",
                r.length
            ));
        }
        r.length as usize
    } else {
        0
    };
    let in_range = r
        .offset
        .checked_add(u64::from(r.length))
        .is_some_and(|end| end <= export_size);
    let check = match r.cmd {
        cmd::READ | cmd::WRITE if r.length > max_payload => RequestCheck::Reject(EOVERFLOW),
        cmd::READ | cmd::CACHE | cmd::BLOCK_STATUS if !in_range => RequestCheck::Reject(EINVAL),
        cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES if read_only => RequestCheck::Reject(EPERM),
        cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES if !in_range => RequestCheck::Reject(ENOSPC),
        cmd::READ | cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES | cmd::BLOCK_STATUS
            if r.length == 0 =>
        {
            RequestCheck::Reject(EINVAL)
        }
        cmd::READ
        | cmd::WRITE
        | cmd::DISC
        | cmd::FLUSH
        | cmd::TRIM
        | cmd::CACHE
        | cmd::WRITE_ZEROES
        | cmd::BLOCK_STATUS => RequestCheck::Ok,
        _ => RequestCheck::Reject(EINVAL),
    };
    Ok((payload, check))
}

// ---------------------------------------------------------------------------------------------
// Transmission: replies (client side)
// ---------------------------------------------------------------------------------------------

/// What the client knows about a request in flight, for validating its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// `NBD_CMD_*`.
    pub cmd: u16,
    /// Request offset.
    pub offset: u64,
    /// Request length.
    pub length: u32,
}

/// A decoded reply frame. Payload positions are relative to the start of the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyFrame {
    /// A simple reply; `data` holds READ data on success.
    Simple {
        /// Cookie.
        cookie: u64,
        /// Errno (0 = success).
        error: u32,
        /// READ data within the frame.
        data: Range<usize>,
    },
    /// One structured reply chunk.
    Chunk {
        /// Cookie.
        cookie: u64,
        /// Last chunk of this reply.
        done: bool,
        /// The chunk.
        chunk: Chunk,
    },
}

impl ReplyFrame {
    /// The cookie the frame answers.
    pub fn cookie(&self) -> u64 {
        match self {
            Self::Simple { cookie, .. } | Self::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// A structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// Data at `offset`; bytes at `data` within the frame.
    Data {
        /// Disk offset.
        offset: u64,
        /// Position within the frame.
        data: Range<usize>,
    },
    /// Zeros.
    Hole {
        /// Disk offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Block status for one context.
    BlockStatus {
        /// Context id.
        context_id: u32,
        /// `(length, flags)` descriptors.
        extents: Vec<(u32, u32)>,
    },
    /// An error.
    Error {
        /// Errno.
        error: u32,
        /// Server's message (lossy UTF-8, may be empty).
        message: String,
        /// Offset of the failure, for `ERROR_OFFSET`.
        offset: Option<u64>,
    },
}

/// Result of one [`ReplyDecoder::decode`] step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// The buffer holds less than a whole frame; at least this many bytes are needed in total.
    Incomplete(usize),
    /// A frame occupying the first `len` bytes of the buffer.
    Frame {
        /// The frame.
        frame: ReplyFrame,
        /// Bytes consumed.
        len: usize,
    },
}

/// Incremental reply decoder. It is stateless apart from the negotiated reply mode; per-request
/// state (coverage, completion) lives in [`ReplyAssembler`].
#[derive(Debug, Clone, Copy)]
pub struct ReplyDecoder {
    /// Structured replies were negotiated.
    pub structured: bool,
}

impl ReplyDecoder {
    /// Decodes the frame at the start of `buf`. `lookup` returns the request in flight for a
    /// cookie. Lengths are validated from the header alone, so a hostile length fails before
    /// anything is buffered for it.
    pub fn decode(
        &self,
        buf: &[u8],
        lookup: impl Fn(u64) -> Option<Pending>,
    ) -> Result<Decoded, ProtocolError> {
        if buf.len() < 4 {
            return Ok(Decoded::Incomplete(4));
        }
        match be_u32(buf, 0) {
            proto::SIMPLE_REPLY_MAGIC => {
                if buf.len() < 16 {
                    return Ok(Decoded::Incomplete(16));
                }
                let error = be_u32(buf, 4);
                let cookie = be_u64(buf, 8);
                let p = lookup(cookie).ok_or_else(|| {
                    ProtocolError(format!("simple reply for unknown cookie {cookie:#x}"))
                })?;
                let data_len = if p.cmd == cmd::READ && error == 0 {
                    p.length as usize
                } else {
                    0
                };
                let total = 16 + data_len;
                if buf.len() < total {
                    return Ok(Decoded::Incomplete(total));
                }
                Ok(Decoded::Frame {
                    frame: ReplyFrame::Simple {
                        cookie,
                        error,
                        data: 16..total,
                    },
                    len: total,
                })
            }
            proto::STRUCTURED_REPLY_MAGIC if self.structured => {
                if buf.len() < 20 {
                    return Ok(Decoded::Incomplete(20));
                }
                let flags = be_u16(buf, 4);
                let ctype = be_u16(buf, 6);
                let cookie = be_u64(buf, 8);
                let plen = be_u32(buf, 16);
                let p = lookup(cookie).ok_or_else(|| {
                    ProtocolError(format!(
                        "structured reply chunk for unknown cookie {cookie:#x}"
                    ))
                })?;
                let limit = chunk_len_limit(ctype, &p)?;
                if plen > limit {
                    return perr(format!(
                        "{} chunk type {ctype} for {} of {} bytes at offset {} claims {plen} \
                         payload bytes (limit {limit})",
                        chunk_name(ctype),
                        proto::cmd_name(p.cmd),
                        p.length,
                        p.offset
                    ));
                }
                let total = 20 + plen as usize;
                if buf.len() < total {
                    return Ok(Decoded::Incomplete(total));
                }
                let chunk = decode_chunk(ctype, &buf[20..total], &p)?;
                Ok(Decoded::Frame {
                    frame: ReplyFrame::Chunk {
                        cookie,
                        done: flags & chunk::FLAG_DONE != 0,
                        chunk: shift_chunk(chunk, 20),
                    },
                    len: total,
                })
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                perr("structured reply chunk although structured replies were not negotiated")
            }
            proto::EXTENDED_REPLY_MAGIC => {
                perr("extended-header reply although extended headers were not negotiated")
            }
            m => perr(format!("bad reply magic {m:#010x}")),
        }
    }
}

fn chunk_name(t: u16) -> &'static str {
    match t {
        chunk::NONE => "NONE",
        chunk::OFFSET_DATA => "OFFSET_DATA",
        chunk::OFFSET_HOLE => "OFFSET_HOLE",
        chunk::BLOCK_STATUS => "BLOCK_STATUS",
        chunk::ERROR => "ERROR",
        chunk::ERROR_OFFSET => "ERROR_OFFSET",
        _ => "unknown",
    }
}

fn chunk_len_limit(ctype: u16, p: &Pending) -> Result<u32, ProtocolError> {
    Ok(match ctype {
        chunk::NONE => 0,
        chunk::OFFSET_DATA => p.length.saturating_add(8),
        chunk::OFFSET_HOLE => 12,
        chunk::BLOCK_STATUS => MAX_BLOCK_STATUS_LEN,
        t if t & chunk::FLAG_ERROR != 0 => MAX_ERROR_CHUNK_LEN,
        t => return perr(format!("unknown structured reply chunk type {t}")),
    })
}

fn shift_chunk(c: Chunk, by: usize) -> Chunk {
    match c {
        Chunk::Data { offset, data } => Chunk::Data {
            offset,
            data: data.start + by..data.end + by,
        },
        other => other,
    }
}

fn within(p: &Pending, offset: u64, len: u64) -> bool {
    offset >= p.offset
        && offset
            .checked_add(len)
            .is_some_and(|end| end <= p.offset + u64::from(p.length))
}

/// Decodes a chunk payload; `Data` ranges are relative to the payload.
fn decode_chunk(ctype: u16, d: &[u8], p: &Pending) -> Result<Chunk, ProtocolError> {
    let what = || {
        format!(
            "{} of {} bytes at offset {}",
            proto::cmd_name(p.cmd),
            p.length,
            p.offset
        )
    };
    match ctype {
        chunk::NONE => Ok(Chunk::None),
        chunk::OFFSET_DATA | chunk::OFFSET_HOLE if p.cmd != cmd::READ => perr(format!(
            "{} chunk in the reply to {}",
            chunk_name(ctype),
            what()
        )),
        chunk::OFFSET_DATA => {
            if d.len() <= 8 {
                return perr(format!(
                    "OFFSET_DATA chunk without data answering {}",
                    what()
                ));
            }
            let offset = be_u64(d, 0);
            let len = (d.len() - 8) as u64;
            if !within(p, offset, len) {
                return perr(format!(
                    "OFFSET_DATA chunk of {len} bytes at offset {offset} lies outside {}",
                    what()
                ));
            }
            Ok(Chunk::Data {
                offset,
                data: 8..d.len(),
            })
        }
        chunk::OFFSET_HOLE => {
            if d.len() != 12 {
                return perr(format!(
                    "OFFSET_HOLE chunk of {} bytes, expected 12",
                    d.len()
                ));
            }
            let offset = be_u64(d, 0);
            let len = be_u32(d, 8);
            if len == 0 || !within(p, offset, u64::from(len)) {
                return perr(format!(
                    "OFFSET_HOLE chunk of {len} bytes at offset {offset} lies outside {}",
                    what()
                ));
            }
            Ok(Chunk::Hole { offset, len })
        }
        chunk::BLOCK_STATUS => {
            if p.cmd != cmd::BLOCK_STATUS {
                return perr(format!("BLOCK_STATUS chunk in the reply to {}", what()));
            }
            if d.len() < 12 || (d.len() - 4) % 8 != 0 {
                return perr(format!(
                    "BLOCK_STATUS chunk of {} bytes is not a context id plus descriptors",
                    d.len()
                ));
            }
            let context_id = be_u32(d, 0);
            let mut extents = Vec::with_capacity((d.len() - 4) / 8);
            for c in d[4..].chunks_exact(8) {
                let (len, flags) = (be_u32(c, 0), be_u32(c, 4));
                if len == 0 {
                    return perr(format!(
                        "zero-length block status descriptor answering {}",
                        what()
                    ));
                }
                extents.push((len, flags));
            }
            Ok(Chunk::BlockStatus {
                context_id,
                extents,
            })
        }
        t if t & chunk::FLAG_ERROR != 0 => {
            if d.len() < 6 {
                return perr(format!("error chunk of {} bytes is truncated", d.len()));
            }
            let error = be_u32(d, 0);
            let mlen = be_u16(d, 4) as usize;
            let extra = if t == chunk::ERROR_OFFSET { 8 } else { 0 };
            if t == chunk::ERROR || t == chunk::ERROR_OFFSET {
                if 6 + mlen + extra != d.len() {
                    return perr(format!(
                        "error chunk message length {mlen} does not fit its {}-byte payload",
                        d.len()
                    ));
                }
            } else if 6 + mlen > d.len() {
                return perr(format!(
                    "error chunk message length {mlen} exceeds its {}-byte payload",
                    d.len()
                ));
            }
            if error == 0 {
                return perr("error chunk with error code 0");
            }
            let message = String::from_utf8_lossy(&d[6..6 + mlen]).into_owned();
            let offset = if t == chunk::ERROR_OFFSET {
                let o = be_u64(d, 6 + mlen);
                if !within(p, o, 1) {
                    return perr(format!("ERROR_OFFSET at {o} lies outside {}", what()));
                }
                Some(o)
            } else {
                None
            };
            Ok(Chunk::Error {
                error,
                message,
                offset,
            })
        }
        t => perr(format!("unknown structured reply chunk type {t}")),
    }
}

/// The server reported an error for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// Errno.
    pub error: u32,
    /// Server message, possibly empty.
    pub message: String,
    /// Offset of the failure, if the server named one.
    pub offset: Option<u64>,
}

/// Per-request reply state: collects chunks, rejects overlaps and late chunks, and checks that a
/// successful READ is covered exactly.
#[derive(Debug, Clone)]
pub struct ReplyAssembler {
    pending: Pending,
    covered: ExtentMap,
    error: Option<ServerError>,
    block_status: Vec<(u32, Vec<(u32, u32)>)>,
    done: bool,
}

/// What a finished reply delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success. For BLOCK_STATUS, the descriptors per context.
    Ok(Vec<(u32, Vec<(u32, u32)>)>),
    /// The server reported an error.
    Failed(ServerError),
}

impl ReplyAssembler {
    /// State for a new request.
    pub fn new(pending: Pending) -> Self {
        Self {
            pending,
            covered: ExtentMap::new(),
            error: None,
            block_status: Vec::new(),
            done: false,
        }
    }

    /// The request this reply answers.
    pub fn pending(&self) -> Pending {
        self.pending
    }

    /// Accounts for one frame. Returns the finished outcome when the reply is complete.
    /// Data chunks are only validated here; the caller copies their bytes.
    pub fn accept(&mut self, frame: &ReplyFrame) -> Result<Option<Outcome>, ProtocolError> {
        if self.done {
            return perr("frame after the reply was complete");
        }
        let p = self.pending;
        match frame {
            ReplyFrame::Simple { error, .. } => {
                if !self.covered.is_empty() || !self.block_status.is_empty() || self.error.is_some()
                {
                    return perr("simple reply in the middle of a structured reply");
                }
                self.done = true;
                if *error != 0 {
                    return Ok(Some(Outcome::Failed(ServerError {
                        error: *error,
                        message: String::new(),
                        offset: None,
                    })));
                }
                if p.cmd == cmd::BLOCK_STATUS {
                    return perr("simple success reply to BLOCK_STATUS carries no extents");
                }
                return Ok(Some(Outcome::Ok(Vec::new())));
            }
            ReplyFrame::Chunk { done, chunk, .. } => {
                match chunk {
                    Chunk::None => {
                        if !*done {
                            return perr("NONE chunk without the DONE flag");
                        }
                    }
                    Chunk::Data { offset, data } => {
                        self.cover(*offset, (data.end - data.start) as u64)?
                    }
                    Chunk::Hole { offset, len } => self.cover(*offset, u64::from(*len))?,
                    Chunk::BlockStatus {
                        context_id,
                        extents,
                    } => {
                        if self.block_status.iter().any(|(id, _)| id == context_id) {
                            return perr(format!(
                                "two BLOCK_STATUS chunks for context {context_id}"
                            ));
                        }
                        self.block_status.push((*context_id, extents.clone()));
                    }
                    Chunk::Error {
                        error,
                        message,
                        offset,
                    } => {
                        // Keep the first error; later ones add nothing the caller can act on.
                        self.error.get_or_insert(ServerError {
                            error: *error,
                            message: message.clone(),
                            offset: *offset,
                        });
                    }
                }
                if !*done {
                    return Ok(None);
                }
            }
        }
        self.done = true;
        if let Some(e) = self.error.take() {
            return Ok(Some(Outcome::Failed(e)));
        }
        match p.cmd {
            cmd::READ if self.covered.total_len() != u64::from(p.length) => perr(format!(
                "reply to READ of {} bytes at offset {} covers only {} bytes",
                p.length,
                p.offset,
                self.covered.total_len()
            )),
            cmd::BLOCK_STATUS if self.block_status.is_empty() => perr(format!(
                "reply to BLOCK_STATUS of {} bytes at offset {} has no descriptors",
                p.length, p.offset
            )),
            _ => Ok(Some(Outcome::Ok(std::mem::take(&mut self.block_status)))),
        }
    }

    fn cover(&mut self, offset: u64, len: u64) -> Result<(), ProtocolError> {
        let range = offset..offset + len;
        if self.covered.intersects(range.clone()) {
            return perr(format!(
                "READ reply chunks overlap at {len} bytes at offset {offset}"
            ));
        }
        self.covered.insert(range);
        Ok(())
    }
}

/// Encodes a simple reply header (server side).
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Encodes a structured chunk header (server side); the payload of `len` bytes follows.
pub fn encode_chunk_header(out: &mut Vec<u8>, cookie: u64, flags: u16, ctype: u16, len: u32) {
    out.extend_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&ctype.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Turns BLOCK_STATUS descriptors starting at `offset` into extents clipped to `end`; stops at
/// the first descriptor that would overflow. Returns `(extent, flags)` pairs.
pub fn descriptors_to_extents(offset: u64, end: u64, d: &[(u32, u32)]) -> Vec<(Range<u64>, u32)> {
    let mut pos = offset;
    let mut out = Vec::with_capacity(d.len());
    for &(len, flags) in d {
        if pos >= end {
            break;
        }
        let next = pos.saturating_add(u64::from(len)).min(end);
        out.push((pos..next, flags));
        pos = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunk_frame(cookie: u64, flags: u16, ctype: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_chunk_header(&mut v, cookie, flags, ctype, payload.len() as u32);
        v.extend_from_slice(payload);
        v
    }

    const READ: Pending = Pending {
        cmd: cmd::READ,
        offset: 4096,
        length: 8,
    };

    fn lookup(c: u64) -> Option<Pending> {
        (c == 7).then_some(READ)
    }

    #[test]
    fn simple_read_reply_waits_for_data() {
        let d = ReplyDecoder { structured: false };
        let mut b = Vec::new();
        encode_simple_reply(&mut b, 7, 0);
        assert_eq!(d.decode(&b, lookup).unwrap(), Decoded::Incomplete(24));
        b.extend_from_slice(&[1; 8]);
        let Decoded::Frame { frame, len } = d.decode(&b, lookup).unwrap() else {
            panic!("expected a frame")
        };
        assert_eq!(len, 24);
        let mut a = ReplyAssembler::new(READ);
        assert_eq!(a.accept(&frame).unwrap(), Some(Outcome::Ok(vec![])));
    }

    #[test]
    fn structured_read_must_cover_exactly() {
        let d = ReplyDecoder { structured: true };
        let mut data = 4096u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[9; 4]);
        let f1 = chunk_frame(7, 0, chunk::OFFSET_DATA, &data);
        let mut hole = 4100u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&4u32.to_be_bytes());
        let f2 = chunk_frame(7, chunk::FLAG_DONE, chunk::OFFSET_HOLE, &hole);
        let mut a = ReplyAssembler::new(READ);
        for (f, last) in [(&f1, false), (&f2, true)] {
            let Decoded::Frame { frame, .. } = d.decode(f, lookup).unwrap() else {
                panic!()
            };
            let out = a.accept(&frame).unwrap();
            assert_eq!(out.is_some(), last);
        }
        // Only half covered.
        let mut a = ReplyAssembler::new(READ);
        let f = chunk_frame(7, chunk::FLAG_DONE, chunk::OFFSET_DATA, &data);
        let Decoded::Frame { frame, .. } = d.decode(&f, lookup).unwrap() else {
            panic!()
        };
        assert!(a.accept(&frame).unwrap_err().0.contains("covers only 4"));
    }

    #[test]
    fn hostile_replies_are_rejected() {
        let d = ReplyDecoder { structured: true };
        // Wrong cookie.
        let mut b = Vec::new();
        encode_simple_reply(&mut b, 8, 0);
        assert!(
            d.decode(&b, lookup)
                .unwrap_err()
                .0
                .contains("unknown cookie")
        );
        // Overlong length fails from the header alone.
        let mut b = Vec::new();
        encode_chunk_header(&mut b, 7, 0, chunk::OFFSET_DATA, u32::MAX);
        assert!(d.decode(&b, lookup).unwrap_err().0.contains("limit"));
        // Data outside the request.
        let mut data = 0u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[1; 4]);
        let f = chunk_frame(7, 0, chunk::OFFSET_DATA, &data);
        assert!(d.decode(&f, lookup).unwrap_err().0.contains("outside"));
        // Bad magic.
        assert!(
            d.decode(&[0xde, 0xad, 0xbe, 0xef, 0], lookup)
                .unwrap_err()
                .0
                .contains("magic")
        );
        // Structured without negotiation.
        let plain = ReplyDecoder { structured: false };
        let f = chunk_frame(7, 1, chunk::NONE, &[]);
        assert!(plain.decode(&f, lookup).is_err());
    }

    #[test]
    fn go_and_meta_context_data_round_trip() {
        let g = decode_go_data(&encode_go_data("disk0", &[3, 1])).unwrap();
        assert_eq!(g.export, "disk0");
        assert_eq!(g.infos, vec![3, 1]);
        let q = vec![
            "base:allocation".to_string(),
            "qemu:dirty-bitmap:b0".to_string(),
        ];
        let (e, got) = decode_meta_context_data(&encode_meta_context_data("x", &q)).unwrap();
        assert_eq!((e.as_str(), got), ("x", q));
        assert!(decode_meta_context_data(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    fn arb_pending() -> impl Strategy<Value = Pending> {
        (
            prop_oneof![Just(cmd::READ), Just(cmd::BLOCK_STATUS), Just(cmd::WRITE)],
            0u64..1 << 20,
            1u32..4096,
        )
            .prop_map(|(cmd, offset, length)| Pending {
                cmd,
                offset,
                length,
            })
    }

    proptest! {
        // The fuzz target's entry point on random input: never panics, never loops.
        #[test]
        fn decode_stream_never_panics(p in arb_pending(), structured: bool,
                                      bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = crate::fuzzing::decode_reply_stream(&bytes, p, structured);
        }

        #[test]
        fn mutated_valid_reply_never_panics(p in arb_pending(), flips in proptest::collection::vec((0usize..64, any::<u8>()), 0..4)) {
            let mut data = p.offset.to_be_bytes().to_vec();
            data.extend(std::iter::repeat_n(5u8, p.length as usize));
            let mut b = chunk_frame(1, chunk::FLAG_DONE, chunk::OFFSET_DATA, &data);
            for (i, v) in flips {
                let n = b.len();
                b[i % n] = v;
            }
            let _ = crate::fuzzing::decode_reply_stream(&b, p, true);
        }

        #[test]
        fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = crate::fuzzing::decode_request_stream(&bytes);
        }
    }
}
