"""Tracking speed: packets/s through StateTable.test for established flows and for whole
connection lifecycles, against a floor loop that only unpacks headers and does one dict
lookup per packet over the same frames.

    python bench/bench_track.py [--flows N] [--rounds N] [--conns N]
"""

from __future__ import annotations

import argparse
import struct
import time

import workload
from statetable import StateTable, TableConfig, decode_frame


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--conns", type=int, default=50000)
    args = ap.parse_args()

    frames = list(workload.established(args.flows, args.rounds))
    pkts = [decode_frame(f, 1) for f in frames]
    setup = [decode_frame(f, 1) for i in range(args.flows) for f in workload.handshake(i)]

    def track() -> None:
        table = StateTable(TableConfig(limit_states=10**7))
        for p in setup:
            table.test(p, 0.0)
        test = table.test
        t0 = time.perf_counter()
        for p in pkts:
            test(p, 1.0)
        track.elapsed = time.perf_counter() - t0          # type: ignore[attr-defined]
        assert table.pfres[10] == 0, "state-mismatch in a correct workload"

    best_track = min((track(), track.elapsed)[1] for _ in range(3))  # type: ignore[attr-defined]

    hdr = struct.Struct("!IIBBH")

    def floor() -> None:
        d = {p[1]: p for p in setup}
        get = d.get
        for f in frames:
            hdr.unpack_from(f, 38)
            get(f[26:34] + f[34:38])

    t_floor = _best(floor)
    t_decode = _best(lambda: [decode_frame(f, 1) for f in frames])

    conn_frames = [decode_frame(f, 1) for i in range(args.conns) for f in workload.lifecycle(i)]

    def lifecycles() -> None:
        table = StateTable(TableConfig(limit_states=10**7))
        test = table.test
        for p in conn_frames:
            test(p, 1.0)

    t_life = _best(lifecycles)
    n = len(pkts)
    print(f"established tracking : {n / best_track:12,.0f} packets/s ({n} packets, "
          f"{args.flows} flows)")
    print(f"decode only          : {n / t_decode:12,.0f} packets/s")
    print(f"floor (unpack+lookup): {n / t_floor:12,.0f} packets/s  "
          f"tracking costs {best_track / t_floor:.2f}x the floor")
    print(f"connection lifecycles: {args.conns / t_life:12,.0f} /s "
          f"({len(conn_frames) / t_life:,.0f} packets/s)")


if __name__ == "__main__":
    main()
