"""Capture reader speed: frames/s of `read_capture` over a generated pcap and pcapng file.

    .venv/bin/python bench/bench_pcap.py [FRAMES] [DIR]

Writes two captures of FRAMES small UDP frames (default 2,000,000) into DIR (default a
temporary directory), then reads each three times and prints the best rate. Only the
reader is timed: no table, so the figure is the ceiling replay can reach.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from pfsync.pcap import PcapngWriter, PcapWriter, read_capture
from tests.packets import udp


def make(path: Path, writer: type[PcapWriter] | type[PcapngWriter], frames: int) -> None:
    """A capture of `frames` UDP frames between 256 address pairs."""
    templates = [udp(f"10.0.{i}.1", "10.1.0.1", 1024 + i, 53, b"x" * 40) for i in range(256)]
    with writer(path) as w:
        for n in range(frames):
            w.write(n * 1e-5, templates[n & 255])


def rate(path: Path) -> tuple[float, int]:
    """Best frames/s over three reads, and the frame count."""
    best, count = 0.0, 0
    for _ in range(3):
        start = time.perf_counter()
        count = sum(1 for _ in read_capture(path))
        best = max(best, count / (time.perf_counter() - start))
    return best, count


def main() -> None:
    frames = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tmp)
        for name, writer in (("pcap", PcapWriter), ("pcapng", PcapngWriter)):
            path = where / f"bench.{name}"
            if not path.exists():
                make(path, writer, frames)
            fps, count = rate(path)
            size = path.stat().st_size / 1e6
            print(f"{name:7s} {count} frames, {size:.0f} MB: {fps / 1e6:.2f} M frames/s")


if __name__ == "__main__":
    main()
