#!/usr/bin/env python3
"""Pure codec throughput (no ZFS, no pipes): fletcher-4 and the stream reader/re-stamper.

  fletcher4-update   Fletcher4().update() over one 256 MiB buffer of random bytes
  blocksum-128k      BlockSum.of() on each 128 KiB slice of it (one call per WRITE payload)
  copy-only          readinto() of the stream in header/128 KiB chunks, no checksums: the floor
  reader             StreamReader over an in-memory stream, records only (verify + fingerprint)
  reader+writer      StreamReader + StampedWriter into a null sink (the receive data path)
  reader+writev      the same, written with writev to /dev/null (adds the syscalls)
  stamped: ...       the same three on a stamped copy of the stream (as modern OpenZFS sends it)
  trusting: ...      ... with payload checksums taken from the stamps (records_trusting_stamps, what
                     pieces mode does into an OpenZFS receiver, which checks the stamps itself)

The stream is synthesised with the codec (OBJECT + 128 KiB WRITE records of random data, END with
the right checksum), or read from a file made with `zfs send POOL/FS@SNAP > FILE` (--stream FILE).

    python3 bench/codec_bench.py --json bench-codec.json
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from snapferry.core.streamio import write_all
from snapferry.zfs.codec.fletcher import BlockSum, Fletcher4
from snapferry.zfs.codec.records import HEADER_SIZE, Begin, RecordType, end_header
from snapferry.zfs.codec.stream import StampedWriter, StreamReader

MiB = 1 << 20
RECORD = 128 << 10


def synth_stream(size_mib: int, seed: int = 0) -> bytes:
    """A full-stream-shaped ZFS stream of about size_mib MiB of WRITE payloads."""
    rng = np.random.default_rng(seed)
    data = rng.bytes(size_mib * MiB)
    begin = Begin(
        versioninfo=1,
        creation_time=int(time.time()),
        objset_type=2,
        flags=4,
        toguid=int(rng.integers(1, 2**63)),
        fromguid=0,
        toname="bench/fs@s",
    )
    out = bytearray(begin.encode())
    per_object = 64 * MiB // RECORD
    for i in range(0, len(data) // RECORD):
        obj = 2 + i // per_object
        if i % per_object == 0:
            header = bytearray(HEADER_SIZE)
            struct.pack_into("<IIQIIII", header, 0, RecordType.OBJECT, 0, obj, 19, 44, RECORD, 168)
            struct.pack_into("<I", header, 36, 0)  # raw_bonuslen 0: payload is round8(bonuslen)
            out += header
            out += bytes(168)
        header = bytearray(HEADER_SIZE)
        struct.pack_into("<IIQIIQQQ", header, 0, RecordType.WRITE, 0, obj, 19, 0, (i % per_object) * RECORD, RECORD, begin.toguid)
        out += header
        out += data[i * RECORD : (i + 1) * RECORD]
    out += end_header(Fletcher4().update(out), begin.toguid)
    return bytes(out)


def best_and_median(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def stamped(stream: bytes) -> bytes:
    """The stream with every record's running checksum filled in, as OpenZFS 0.7+ writes it."""
    out: list[bytes] = []
    process(stream, lambda parts: out.extend(bytes(p) for p in parts))
    return b"".join(out)


def process(stream: bytes, sink: Callable[..., None] | None, trusting: bool = False) -> int:
    reader = StreamReader(io.BytesIO(stream))
    first = reader.read_begin()
    assert first is not None
    begin, begin_bytes = first
    writer = StampedWriter(sink) if sink is not None else None
    if writer is not None:
        writer.begin(begin, begin_bytes[HEADER_SIZE:])
    n = 0
    read = reader.records_trusting_stamps if trusting else reader.records
    for record in read(begin_bytes, len(begin_bytes), len(begin_bytes)):
        if record.kind == RecordType.END:
            if writer is not None:
                writer.end(begin.toguid)
            break
        if writer is not None:
            writer.record(record)
        n += 1
    return n


def blocks(view: memoryview) -> None:
    for i in range(0, len(view), RECORD):
        BlockSum.of(view[i : i + RECORD])


def copy_only(stream: bytes) -> None:
    src = io.BytesIO(stream)
    buf = memoryview(bytearray(RECORD))
    header = memoryview(bytearray(HEADER_SIZE))
    while src.readinto(header) == HEADER_SIZE:
        src.readinto(buf)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fletcher-mib", type=int, default=256)
    ap.add_argument("--stream-mib", type=int, default=256, help="size of the synthesised stream")
    ap.add_argument("--stream", metavar="FILE", help="use this zfs send stream instead of a synthesised one")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()

    results: dict[str, dict[str, float]] = {}

    def report(name: str, nbytes: int, times: tuple[float, float]) -> None:
        best, med = times
        results[name] = {"bytes": nbytes, "best_s": best, "median_s": med, "gb_per_s": nbytes / 1e9 / med, "s_per_gb": med / (nbytes / 1e9)}
        print(
            f"{name:<20} {nbytes / MiB:7.0f} MiB  median {med:7.3f} s  {nbytes / 1e9 / med:6.2f} GB/s"
            f"  ({med / (nbytes / 1e9):.2f} CPU s/GB)",
            flush=True,
        )

    buf = np.random.default_rng(1).bytes(args.fletcher_mib * MiB)
    report("fletcher4-update", len(buf), best_and_median(lambda: Fletcher4().update(buf), args.repeat))
    report("blocksum-128k", len(buf), best_and_median(lambda: blocks(memoryview(buf)), args.repeat))

    if args.stream:
        stream = Path(args.stream).read_bytes()
        source = args.stream
    else:
        stream = synth_stream(args.stream_mib)
        source = f"synthesised, {args.stream_mib} MiB of 128 KiB WRITE records"
    print(f"stream: {source}, {len(stream)} bytes", flush=True)
    report("copy-only", len(stream), best_and_median(lambda: copy_only(stream), args.repeat))
    report("reader", len(stream), best_and_median(lambda: process(stream, None), args.repeat))
    report("reader+writer", len(stream), best_and_median(lambda: process(stream, lambda parts: None), args.repeat))
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        report("reader+writev", len(stream), best_and_median(lambda: process(stream, lambda parts: write_all(fd, parts)), args.repeat))
        modern = stamped(stream)
        sinks: dict[str, Callable[..., None] | None] = {"reader": None, "+writer": lambda parts: None}
        sinks["+writev"] = lambda parts: write_all(fd, parts)
        for trusting in (False, True):
            tag = "trusting" if trusting else "stamped"
            for name, sink in sinks.items():
                report(f"{tag}: {name}", len(modern), best_and_median(functools.partial(process, modern, sink, trusting), args.repeat))
    finally:
        os.close(fd)

    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
                    "stream": source,
                    "stream_bytes": len(stream),
                    "repeat": args.repeat,
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
