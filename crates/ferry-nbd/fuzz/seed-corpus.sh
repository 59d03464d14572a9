#!/bin/sh
# Seeds the fuzz corpora with well-formed frames so the fuzzer starts from valid protocol.
set -eu
cd "$(dirname "$0")"
mkdir -p corpus/reply corpus/request corpus/options
# reply: selector (READ, offset 4096, length 8, structured) + one OFFSET_DATA chunk with DONE.
printf '\000\000\000\000\000\000\000\020\000\000\000\000\007\001' > corpus/reply/read_structured
printf '\146\216\063\357\000\001\000\001\000\000\000\000\000\000\000\001\000\000\000\020' >> corpus/reply/read_structured
printf '\000\000\000\000\000\000\020\000ABCDEFGH' >> corpus/reply/read_structured
# reply: simple reply with data.
printf '\000\000\000\000\000\000\000\020\000\000\000\000\007\000' > corpus/reply/read_simple
printf '\147\104\146\230\000\000\000\000\000\000\000\000\000\000\000\001ABCDEFGH' >> corpus/reply/read_simple
# request: a READ and a WRITE of 4 bytes.
printf '\045\140\225\023\000\000\000\000\000\000\000\000\000\000\000\001\000\000\000\000\000\000\000\000\000\000\020\000' > corpus/request/read
printf '\045\140\225\023\000\000\000\001\000\000\000\000\000\000\000\002\000\000\000\000\000\000\000\000\000\000\000\004abcd' > corpus/request/write
# options: GO data for export "disk0" asking for BLOCK_SIZE.
printf '\000\000\000\005disk0\000\001\000\003' > corpus/options/go
printf '\000\000\000\005disk0\000\000\000\001\000\000\000\017base:allocation' > corpus/options/meta
