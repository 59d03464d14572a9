#!/usr/bin/env python3
"""Deterministic benchmark disks for tests/bench/engine.sh (seeded; nothing copied from the machine).

  gen-workload.py w16    PATH   16 GiB raw: 4 GiB non-zero data (zstd-1 about 2.5:1) in 64 MiB
                                extents, 1 GiB of allocated (written) zeros, the rest holes
  gen-workload.py holes  PATH   16 GiB raw, all holes
  gen-workload.py random PATH   4 GiB raw of incompressible data
  gen-workload.py huge   PATH   2 TiB sparse raw with 1 GiB of data in 16 extents
  gen-workload.py dirty  PATH   print qemu-io commands writing 1 % of W16 in clustered 1 MiB runs

Every 4 KiB block carries its own offset, so no two chunks are equal (dedup cannot flatter us);
the rest of each 256-byte line is 96 random bytes and 160 bytes of words.
"""
import os
import random
import sys

GiB = 1 << 30
MiB = 1 << 20
SEED = 20261122
WORDS = (b"the quick brown fox jumps over lazy dog kernel block device sector inode journal "
         b"extent cluster page cache buffer write read sync flush commit snapshot backup restore "
         b"volume partition filesystem directory metadata allocation bitmap").split()


def pool(seed: int, size: int = 16 * MiB) -> bytes:
    """`size` bytes of compressible, non-repeating content."""
    rng = random.Random(seed)
    lines = []
    for _ in range(size // 256):
        text = b" ".join(rng.choice(WORDS) for _ in range(40))[:160].ljust(160, b".")
        lines.append(rng.randbytes(96) + text)
    return b"".join(lines)


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
