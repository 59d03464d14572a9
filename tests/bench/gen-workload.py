#!/usr/bin/env python3
"""Deterministic benchmark disks for tests/bench/engine.sh (seeded; nothing copied from the machine).

  gen-workload.py w16    PATH   16 GiB raw: 4 GiB non-zero data (zstd-1 about 2.4:1, OS-like mix) in 64 MiB
                                extents, 1 GiB of allocated (written) zeros, the rest holes
  gen-workload.py holes  PATH   16 GiB raw, all holes
  gen-workload.py random PATH   4 GiB raw of incompressible data
  gen-workload.py huge   PATH   2 TiB sparse raw with 1 GiB of data in 16 extents
  gen-workload.py dirty  PATH   print qemu-io commands writing 1 % of W16 in clustered 1 MiB runs

Every 4 KiB block carries its own offset, so no two chunks are equal (dedup cannot flatter us);
see pool() for the content mix.
"""
import os
import random
import struct
import sys

GiB = 1 << 30
MiB = 1 << 20
SEED = 20261122
WORDS = (b"the quick brown fox jumps over lazy dog kernel block device sector inode journal "
         b"extent cluster page cache buffer write read sync flush commit snapshot backup restore "
         b"volume partition filesystem directory metadata allocation bitmap").split()


def pool(seed: int, size: int = 16 * MiB) -> bytes:
    """`size` bytes of OS-disk-like content, about 2.4:1 with zstd -1 on 1 MiB blocks, in
    64 KiB segments of four kinds: already-compressed data (12 %), text (20 %), machine code
    (38 %) and tables of fixed records (30 %). Version 2: version 1 (random bytes mixed into every
    line) compressed only 1.9:1 and was slower to compress than real OS data."""
    rng = random.Random(seed)
    syl = [bytes([rng.choice(b"bcdfghjklmnprstvwz"), rng.choice(b"aeiouy")]) for _ in range(80)]
    vocab = [b"".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(2000)]
    zipf = [1.0 / (i + 1) for i in range(len(vocab))]
    ops = [rng.randbytes(rng.randint(2, 10)) for _ in range(400)]
    opw = [1.0 / (i + 1) for i in range(len(ops))]
    fields = [rng.choice(vocab)[:12].ljust(12, b"\0") for _ in range(32)]
    seg = 64 * 1024
    out = []
    for _ in range(size // seg):
        kind = rng.random()
        if kind < 0.12:
            b = rng.randbytes(seg)
        elif kind < 0.32:
            parts = []
            for k, w in enumerate(rng.choices(vocab, zipf, k=seg // 5)):
                parts.append(w)
                parts.append(b"\n" if k % 11 == 10 else (b", " if k % 7 == 3 else b" "))
                if k % 29 == 0:
                    parts.append(str(rng.randint(0, 99999)).encode() + b" ")
            b = b"".join(parts)
        elif kind < 0.70:
            parts = []
            n = 0
            while n < seg:
                o = rng.choices(ops, opw)[0]
                parts.append(o)
                n += len(o)
                if rng.random() < 0.15:
                    parts.append(struct.pack("<I", rng.getrandbits(rng.choice((8, 16, 32)))))
                    n += 4
            b = b"".join(parts)
        else:
            base = rng.getrandbits(32)
            b = b"".join(
                rng.choice(fields)
                + struct.pack("<IIHH", (base + r * rng.choice((1, 8, 4096))) & 0xFFFFFFFF,
                              rng.getrandbits(12), rng.getrandbits(4), 0)
                + bytes(36)
                for r in range(seg // 64))
        out.append(b[:seg].ljust(seg, b"\0"))
    return b"".join(out)


def write_data(f, offset: int, length: int, src: bytes) -> None:
    """Writes `length` bytes at `offset` from `src` (cycled), stamping each 4 KiB block."""
    pos = 0
    while pos < length:
        n = min(4 * MiB, length - pos)
        start = ((offset + pos) // MiB * 7919 * 4096) % (len(src) - 4 * MiB)
        buf = bytearray(src[start:start + n])
        for b in range(0, n, 4096):
            buf[b:b + 8] = (offset + pos + b).to_bytes(8, "little")
        f.seek(offset + pos)
        f.write(buf)
        pos += n


def w16(path: str) -> None:
    src = pool(SEED)
    with open(path, "wb") as f:
        f.truncate(16 * GiB)
        # 64 data extents of 64 MiB every 256 MiB: 4 GiB.
        for i in range(64):
            write_data(f, i * 256 * MiB, 64 * MiB, src)
        # 1 GiB of written zeros in 16 extents of 64 MiB, between the data.
        zeros = bytes(4 * MiB)
        for i in range(16):
            base = i * 1024 * MiB + 128 * MiB
            for k in range(16):
                f.seek(base + k * 4 * MiB)
                f.write(zeros)


def holes(path: str) -> None:
    with open(path, "wb") as f:
        f.truncate(16 * GiB)


def rnd(path: str) -> None:
    rng = random.Random(SEED + 1)
    with open(path, "wb") as f:
        for _ in range(4 * GiB // (4 * MiB)):
            f.write(rng.randbytes(4 * MiB))


def huge(path: str) -> None:
    src = pool(SEED + 2)
    with open(path, "wb") as f:
        f.truncate(2048 * GiB)
        for i in range(16):
            write_data(f, i * 128 * GiB + 7 * MiB, 64 * MiB, src)


def dirty() -> None:
    """1 % of 16 GiB = 164 MiB in clustered 1 MiB runs (41 clusters of 4 MiB) inside the data."""
    rng = random.Random(SEED + 3)
    for c in range(41):
        extent = rng.randrange(64)
        at = extent * 256 * MiB + rng.randrange(0, 60) * MiB
        print(f"write -P {c % 250 + 1} {at} {4 * MiB}")


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "dirty":
        dirty()
    else:
        {"w16": w16, "holes": holes, "random": rnd, "huge": huge}[kind](sys.argv[2])
        os.sync()
