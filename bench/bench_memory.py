"""Bytes per live TCP state: fill a table with N established connections (real
handshakes through StateTable.test) and measure with tracemalloc and RSS.

    python bench/bench_memory.py [--states N]
"""

from __future__ import annotations

import argparse
import gc
import resource
import tracemalloc

import workload

from statetable import StateTable, TableConfig, decode_frame


def rss_bytes() -> int:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--states", type=int, default=1_000_000)
    ap.add_argument(
        "--tracemalloc",
        action="store_true",
        help="also count Python allocations (exact, but ~10x slower)",
    )
    args = ap.parse_args()
    n = args.states
    # Decode in chunks so the input frames are not counted as table memory.
    table = StateTable(TableConfig(limit_states=n + 1))
    gc.collect()
    rss0 = rss_bytes()
    if args.tracemalloc:
        tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for i in range(n):
        for f in workload.handshake(i):
            table.test(decode_frame(f, 1), 1.0)
    gc.collect()
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = rss_bytes()
    assert table.count == n, table.count
    print(f"{n:,} established TCP states")
    if args.tracemalloc:
        print(f"tracemalloc: {(used - base) / n:8.1f} bytes/state")
        print(f"RSS growth : {(rss1 - rss0) / n:8.1f} bytes/state (includes tracemalloc's own)")
    else:
        print(f"RSS growth : {(rss1 - rss0) / n:8.1f} bytes/state")


if __name__ == "__main__":
    main()
