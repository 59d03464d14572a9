//! The client's reply decoder and per-request reassembly on arbitrary server bytes.
//! The first 15 bytes choose the request in flight and the reply mode.
#![no_main]

use ferry_nbd::codec::Pending;
use ferry_nbd::proto::cmd;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 15 {
        return;
    }
    let command = [cmd::READ, cmd::BLOCK_STATUS, cmd::WRITE, cmd::FLUSH][usize::from(data[0] % 4)];
    let offset = u64::from_be_bytes(data[1..9].try_into().unwrap());
    // Keep requests small so the fuzzer can afford to cover them with data.
    let length = u32::from_be_bytes(data[9..13].try_into().unwrap()) % 65536 + 1;
    let structured = data[13] & 1 == 1;
    let pending = Pending {
        cmd: command,
        offset: offset % (1 << 40),
        length,
    };
    let _ = ferry_nbd::fuzzing::decode_reply_stream(&data[14..], pending, structured);
});
