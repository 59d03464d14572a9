//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the proptests: they drive the
//! production decoders over arbitrary bytes exactly as the client and server do.

use crate::codec::{
    Decoded, Outcome, Pending, ProtocolError, ReplyAssembler, ReplyDecoder, Request, check_request,
    decode_go_data, decode_info, decode_list_entry, decode_meta_context, decode_meta_context_data,
};

/// Decodes a stream of reply frames answering one request in flight (cookie 1), as the client's
/// reader does, until the reply completes, the input ends or an error is found.
pub fn decode_reply_stream(
    mut buf: &[u8],
    pending: Pending,
    structured: bool,
) -> Result<Option<Outcome>, ProtocolError> {
    let dec = ReplyDecoder { structured };
    let mut asm = ReplyAssembler::new(pending);
    loop {
        match dec.decode(buf, |c| (c == 1).then_some(pending))? {
            Decoded::Incomplete(n) => {
                assert!(n > buf.len(), "decoder asked for no new bytes");
                return Ok(None);
            }
            Decoded::Frame { frame, len } => {
                assert!(len > 0 && len <= buf.len());
                if let Some(out) = asm.accept(&frame)? {
                    return Ok(Some(out));
                }
                buf = &buf[len..];
            }
        }
    }
}

/// Decodes a stream of requests as the server does (export of 1 MiB, 64 KiB payload limit),
/// skipping WRITE payloads, until the input ends or the stream becomes untrustworthy.
pub fn decode_request_stream(mut buf: &[u8]) -> Result<usize, ProtocolError> {
    let mut n = 0;
    while let Some(r) = Request::decode(buf)? {
        let (payload, _check) = check_request(&r, 1 << 20, 64 << 10, n % 2 == 0)?;
        let total = crate::codec::REQUEST_LEN + payload;
        if buf.len() < total {
            break;
        }
        buf = &buf[total..];
        n += 1;
    }
    Ok(n)
}

/// Runs every option-data parser (both sides) over `d`.
pub fn decode_options(d: &[u8]) {
    let _ = decode_go_data(d);
    let _ = decode_meta_context_data(d);
    let _ = decode_info(d);
    let _ = decode_meta_context(d);
    let _ = decode_list_entry(d);
}
