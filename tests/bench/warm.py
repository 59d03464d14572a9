#!/usr/bin/env python3
"""Reads the allocated parts of files (SEEK_DATA/SEEK_HOLE) or every file under directories, so
a timed run starts from the page cache. This machine's kernel pages out memory idle for about a
minute (DAMON reclaim), so without this a benchmark's source is partly on disk, partly cached."""
import os
import sys


def warm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            os.lseek(fd, data, os.SEEK_SET)
            left = hole - data
            while left > 0:
                n = len(f.read(min(left, 8 << 20)))
                if n == 0:
                    break
                left -= n
            pos = hole


for p in sys.argv[1:]:
    if os.path.isdir(p):
        for root, _, files in os.walk(p):
            for name in files:
                warm(os.path.join(root, name))
    else:
        warm(p)
