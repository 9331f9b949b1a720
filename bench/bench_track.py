"""Tracking speed: packets/s through StateTable.test for established flows, decode+track
from a pcap file, and whole connection lifecycles, against a floor loop that only unpacks
headers and does one dict lookup per packet over the same frames.

    python bench/bench_track.py [--flows N] [--rounds N] [--conns N]
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import workload

from pfsync.pcap import PcapWriter, read_capture
from statetable import StateTable, TableConfig, decode_frame
from statetable.vtw import VtwConfig


def best_of(fn: Callable[[], float], repeat: int = 3) -> float:
    """The smallest of ``repeat`` timings that ``fn`` returns (noise only adds time)."""
    return min(fn() for _ in range(repeat))


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """A timing function for ``fn`` as a whole."""

    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--conns", type=int, default=50000)
    args = ap.parse_args()

    handshakes = [f for i in range(args.flows) for f in workload.handshake(i)]
    frames = list(workload.established(args.flows, args.rounds))
    setup = [decode_frame(f, 1) for f in handshakes]
    pkts = [decode_frame(f, 1) for f in frames]

    def new_table() -> StateTable:
        table = StateTable(TableConfig(limit_states=10**7))
        for p in setup:
            table.test(p, 0.0)
        return table

    def track() -> float:
        table = new_table()
        test = table.test
        t0 = time.perf_counter()
        for p in pkts:
            test(p, 1.0)
        elapsed = time.perf_counter() - t0
        assert table.pfres[10] == 0, "state-mismatch in a correct workload"
        return elapsed

    with tempfile.TemporaryDirectory() as tmp:
        pcap = Path(tmp) / "established.pcap"
        with PcapWriter(pcap) as w:
            for i, f in enumerate(frames):
                w.write(1.0 + i * 1e-6, f)

        def pcap_track() -> float:
            table = new_table()
            test = table.test
            t0 = time.perf_counter()
            for ts, linktype, frame in read_capture(pcap):
                pkt = decode_frame(frame, linktype)
                if type(pkt) is tuple:
                    test(pkt, ts)
            elapsed = time.perf_counter() - t0
            assert table.pfres[10] == 0 and table.passed == len(frames) + args.flows * 3
            return elapsed

        t_pcap = best_of(pcap_track)
        t_read = best_of(timed(lambda: sum(1 for _ in read_capture(pcap))))

    t_track = best_of(track)
    hdr = struct.Struct("!IIBBH")

    def floor() -> None:
        get = {p[1]: p for p in setup}.get
        unpack = hdr.unpack_from
        for f in frames:
            unpack(f, 38)
            get(f[26:34] + f[34:38])

    t_floor = best_of(timed(floor))
    t_decode = best_of(timed(lambda: [decode_frame(f, 1) for f in frames]))
    conn_pkts = [decode_frame(f, 1) for i in range(args.conns) for f in workload.lifecycle(i)]

    def lifecycles(vtw: bool) -> Callable[[], None]:
        def run() -> None:
            test = StateTable(TableConfig(limit_states=10**7, vtw=VtwConfig(enable=vtw))).test
            for p in conn_pkts:
                test(p, 1.0)

        return run

    # Each lifecycle ends in TIME_WAIT: a VTW record (the default) or a full state.
    t_life = best_of(timed(lifecycles(True)))
    t_life_full = best_of(timed(lifecycles(False)))
    n = len(frames)
    print(
        f"established tracking  : {n / t_track:12,.0f} packets/s "
        f"({n:,} packets over {args.flows:,} flows)"
    )
    print(f"pcap read+decode+track: {n / t_pcap:12,.0f} packets/s")
    print(f"pcap read only        : {n / t_read:12,.0f} records/s")
    print(f"decode only           : {n / t_decode:12,.0f} packets/s")
    print(
        f"floor (unpack+lookup) : {n / t_floor:12,.0f} packets/s; tracking takes "
        f"{t_track / t_floor:.2f}x the floor"
    )
    print(
        f"connection lifecycles : {args.conns / t_life:12,.0f} /s "
        f"({len(conn_pkts) / t_life:,.0f} packets/s, 8 packets each), ending as VTW records"
    )
    print(
        f"  same, vtw off       : {args.conns / t_life_full:12,.0f} /s "
        f"(ending as full TIME_WAIT states)"
    )


if __name__ == "__main__":
    main()
