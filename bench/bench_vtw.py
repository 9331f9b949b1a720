"""TIME_WAIT churn with VTW on and off: bytes per entry, lifecycles/s, GC time.

Measures bytes per TIME_WAIT entry (tracemalloc and RSS), connection lifecycles/s with
~64k connections in TIME_WAIT, and the time the garbage collector takes meanwhile.

    python bench/bench_vtw.py [--seconds S] [--live N] [--mode both|vtw|full]
                              [--repeat N] [--profile]

Every lifecycle is a whole connection on a new 4-tuple: the 8 packets of
``workload.lifecycle`` (handshake, request, response, FIN/ACK both ways, last ACK) with
the addresses swapped for loopback ones (127.x.y.z:p -> 127.0.0.1:80), so MSLT puts it in
the loopback class: TIME_WAIT lasts 2 x MSL = 2 s. A simulated clock advances by
2 s / --live per lifecycle (so --live connections closed within the last 2 s, i.e. are
in TIME_WAIT, at any moment) and ``purge(now)`` runs once per simulated second, as the
node does. Each mode runs in its own processes so RSS and the GC are not shared:

- vtw:  ``vtw.enable=1``: a closed connection leaves the main table for a pool record;
- full: ``vtw.enable=0``: it stays a full State with timeout TIME_WAIT until purged.

Memory: one pool's worth of connections (--entries - 1) closed without purge, measured
from before the first close, so the pool's preallocated arrays count in full. Steady
state: the smallest pool holding --live records (a pool frees due records before each
insert), --seconds of wall time after a warm-up, GC collections timed through
``gc.callbacks``; afterwards a stretch timed call by call shows where the time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable

import workload
from bench_memory import rss_bytes

from statetable import StateTable, TableConfig, decode_frame
from statetable.counters import PFRES_BADSTATE
from statetable.mslt import MsltConfig
from statetable.timeouts import INTERVAL
from statetable.vtw import VtwConfig

MODES = ("full", "vtw")
_KEY = struct.Struct("!IIHH")
_SERVER = 0x7F000001  # 127.0.0.1:80
_CLIENTS = 0x7F000002  # client addresses from 127.0.0.2 up, 60,000 ports each
_PORTS = 60000
START = 1000.0  # simulated clock at the first lifecycle


def lifecycle_template() -> list[tuple[bool, tuple]]:
    """(from-the-client, packet fields after the key) of each packet of a lifecycle."""
    pkts = [decode_frame(f, 1) for f in workload.lifecycle(0)]
    key = pkts[0][1]
    return [(p[1] == key, p[2:]) for p in pkts]


class Churn:
    """Lifecycles ``i = first, first + 1, ...`` through a table, the clock at
    START + i * step, ``purge(now)`` whenever the clock passes a whole second."""

    def __init__(
        self,
        table: StateTable,
        step: float,
        purge: bool = True,
        test: Callable[[tuple, float], int] | None = None,
    ) -> None:
        self.table = table
        self.step = step
        self.steps = lifecycle_template()
        self.test = test or table.test
        self.next_purge = float(int(START) + 1) if purge else float("inf")
        self.held: list[tuple[int, int]] = []  # entries held before and after each purge

    def _purge(self, now: float) -> None:
        table = self.table
        before = entries_held(table)
        table.purge(now)
        self.held.append((before, entries_held(table)))
        self.next_purge += 1.0

    def run(self, first: int, n: int) -> None:
        """``n`` lifecycles from number ``first``."""
        test, steps, step, pack = self.test, self.steps, self.step, _KEY.pack
        for i in range(first, first + n):
            now = START + i * step
            if now >= self.next_purge:
                self._purge(now)
            hi, port = divmod(i, _PORTS)
            port += 1024
            client = _CLIENTS + hi
            k = pack(client, _SERVER, port, 80)
            rk = pack(_SERVER, client, 80, port)
            for fwd, tail in steps:
                test((6, k if fwd else rk) + tail, now)

    def run_timed(self, first: int, n: int) -> list[float]:
        """As :meth:`run`, timing each call: seconds spent in each of the 8 packets of a
        lifecycle, then in purge."""
        test, steps, step, pack = self.test, self.steps, self.step, _KEY.pack
        clock = time.perf_counter
        acc = [0.0] * (len(steps) + 1)
        for i in range(first, first + n):
            now = START + i * step
            if now >= self.next_purge:
                t0 = clock()
                self._purge(now)
                acc[-1] += clock() - t0
            hi, port = divmod(i, _PORTS)
            port += 1024
            client = _CLIENTS + hi
            k = pack(client, _SERVER, port, 80)
            rk = pack(_SERVER, client, 80, port)
            for j, (fwd, tail) in enumerate(steps):
                pkt = (6, k if fwd else rk) + tail
                t0 = clock()
                test(pkt, now)
                acc[j] += clock() - t0
        return acc


def new_table(mode: str, entries: int, msl: int) -> StateTable:
    """A table for ``mode`` ("full" or "vtw") with pools of ``entries`` slots."""
    return StateTable(
        TableConfig(
            limit_states=10**7,
            vtw=VtwConfig(enable=mode == "vtw", entries=entries),
            mslt=MsltConfig(loopback=msl),
        )
    )


def entries_held(table: StateTable) -> int:
    """Full states plus VTW records (in this workload: the TIME_WAIT connections)."""
    return table.count + table.vtw.live


# ---- worker: one mode, one phase, in its own process ----------------------------------


def memory_phase(mode: str, entries: int, msl: int) -> dict:
    """Fill to a full pool's worth of TIME_WAIT entries (no purge), measured from before
    the first close (so a pool's creation is included): RSS first, in this fresh process,
    then tracemalloc on a second table after warming the code paths."""
    n = entries - 1
    step = 2.0 * msl / n
    out: dict = {"entries": n}
    for how in ("rss", "tracemalloc"):
        if how == "tracemalloc":
            # Not before the RSS fill: a freed pool raises glibc's mmap threshold, and the
            # next pool then reuses resident heap pages (RSS would under-count it).
            Churn(new_table(mode, entries, msl), step, purge=False).run(0, 16)
        table = new_table(mode, entries, msl)
        churn = Churn(table, step, purge=False)
        gc.collect()
        if how == "rss":
            rss0 = rss_bytes()
        else:
            tracemalloc.start()
            traced0, _ = tracemalloc.get_traced_memory()
        churn.run(0, n)
        gc.collect()
        if how == "rss":
            out["rss"] = (rss_bytes() - rss0) / n
        else:
            traced1, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            out["traced"] = (traced1 - traced0) / n
        assert table.blocked == 0
        if mode == "vtw":
            assert table.count == 0 and table.vtw.live == n, (table.count, table.vtw.live)
            out["pool_bytes"] = sum(p.nbytes for p in table.vtw.pools.values())
        else:
            assert table.count == n, table.count
        del table, churn
        gc.collect()
    return out


def steady_phase(mode: str, args: argparse.Namespace) -> dict:
    """Warm up to steady state, then run --seconds of wall time with GC callbacks."""
    tw = 2.0 * args.msl
    step = tw / args.live
    # A pool frees due records before each insert, so it holds exactly the connections
    # in TIME_WAIT: the smallest pool with room for --live of them (and a few more).
    entries = 4
    while entries - 1 < args.live * 1.001:
        entries *= 2
    table = new_table(mode, entries, args.msl)
    churn = Churn(table, step)
    # Full states are freed by purge's sweep (1 + count / interval states a call), up to
    # two sweeps after they are due: warm up over that long, in both modes alike.
    warmup = tw + 2 * table.timeouts[INTERVAL] + 2
    chunk = 1024
    i = 0
    while i * step < warmup:
        churn.run(i, chunk)
        i += chunk
    warm_purges = len(churn.held)

    # Harness floor: the same loop and packet tuples into a no-op test.
    floor = Churn(table, step, purge=False, test=lambda p, now: 0)
    t0 = time.perf_counter()
    floor.run(0, 50000)
    floor_us = (time.perf_counter() - t0) / 50000 * 1e6

    gc_time = [0.0]
    gc_count = [0, 0, 0]
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - started[0]
            gc_count[info["generation"]] += 1

    vs = table.vtw.stats
    counts0 = (vs.ins, vs.dels, vs.kill, dict(vs.connect.items()), dict(vs.port.items()))
    gc.callbacks.append(on_gc)
    first = i
    t0 = time.perf_counter()
    deadline = t0 + args.seconds
    while True:
        churn.run(i, chunk)
        i += chunk
        now = time.perf_counter()
        if now >= deadline:
            break
    elapsed = now - t0
    gc.callbacks.remove(on_gc)
    done = i - first
    held = churn.held[warm_purges:] or [(entries_held(table), entries_held(table))]
    hashes = {}
    for name, h, before in (("connect", vs.connect, counts0[3]), ("port", vs.port, counts0[4])):
        # Counts over the timed run; max_* are maxima since the table was made.
        hashes[name] = {k: v - before[k] if not k.startswith("max") else v for k, v in h.items()}
    out = {
        "entries": entries,
        "warmup": warmup,
        "lifecycles": done,
        "elapsed": elapsed,
        "rate": done / elapsed,
        "floor_us": floor_us,
        "sim_seconds": done * step,
        "gc_time": gc_time[0],
        "gc_count": gc_count,
        "held_before_purge": [min(b for b, _ in held), max(b for b, _ in held)],
        "held_after_purge": [min(a for _, a in held), max(a for _, a in held)],
        "held_mean": sum(b + a for b, a in held) / (2 * len(held)),
        "vtw": {
            "ins": vs.ins - counts0[0],
            "dels": vs.dels - counts0[1],
            "kill": vs.kill - counts0[2],
            **hashes,
        },
        "usage": table.vtw.usage(),
    }
    # Where the time goes, without a profiler: each packet of a lifecycle, and purge, over
    # one simulated second (so exactly one purge).
    second = round(1.0 / step)
    acc = churn.run_timed(i, second)
    i += second
    out["breakdown_us"] = [a / second * 1e6 for a in acc]
    out["second"] = second
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        churn.run(i, second)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(16)
        out["profile"] = text.getvalue()
    assert table.blocked == 0 and table.pfres[PFRES_BADSTATE] == 0, "blocked packets"
    return out


# ---- driver --------------------------------------------------------------------------


def spawn(phase: str, mode: str, args: argparse.Namespace) -> dict:
    """Run one phase of one mode in a new process; its JSON result."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        phase,
        "--mode",
        mode,
        "--seconds",
        str(args.seconds),
        "--live",
        str(args.live),
        "--entries",
        str(args.entries),
        "--msl",
        str(args.msl),
        "--repeat",
        "1",
    ] + (["--profile"] if args.profile else [])
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout)


def report(mem: dict, steady: dict, args: argparse.Namespace) -> None:
    modes = [m for m in MODES if m in steady]
    n = mem[modes[0]]["entries"]
    print(
        f"TIME_WAIT 2 x MSL = {2 * args.msl} s (loopback class), {args.live:,} closes per "
        f"TIME_WAIT period, purge once per simulated second"
    )
    print()
    print(
        f"memory, filled to {n:,} TIME_WAIT entries (pool of {args.entries:,} slots), "
        f"bytes per entry:"
    )
    print(f"  {'':32}" + "".join(f"{m:>18}" for m in modes))
    print(f"  {'tracemalloc':32}" + "".join(f"{mem[m]['traced']:18,.1f}" for m in modes))
    print(f"  {'RSS growth':32}" + "".join(f"{mem[m]['rss']:18,.1f}" for m in modes))
    if "vtw" in mem:
        print(
            f"  (vtw pool arrays by Pool.nbytes: {mem['vtw']['pool_bytes']:,} bytes = "
            f"{mem['vtw']['pool_bytes'] / n:.2f} per record)"
        )
    print()
    s0 = steady[modes[0]]
    runs = f", best of {args.repeat}" if args.repeat > 1 else ""
    print(
        f"steady state, {args.seconds:g} s of wall time per mode{runs} (after "
        f"{s0['warmup']:g} simulated s of warm-up; vtw pool of {s0['entries']:,} slots):"
    )
    rows = [
        ("lifecycles", lambda s: f"{s['lifecycles']:,}"),
        ("lifecycles/s", lambda s: f"{s['rate']:,.0f}"),
        ("packets/s", lambda s: f"{s['rate'] * 8:,.0f}"),
        ("us per lifecycle", lambda s: f"{1e6 / s['rate']:.2f}"),
        ("  of which harness (no-op test)", lambda s: f"{s['floor_us']:.2f}"),
        ("simulated seconds", lambda s: f"{s['sim_seconds']:.1f}"),
        ("entries held, mean", lambda s: f"{s['held_mean']:,.0f}"),
        ("entries held, after purge", lambda s: "{:,}-{:,}".format(*s["held_after_purge"])),
        ("entries held, before purge", lambda s: "{:,}-{:,}".format(*s["held_before_purge"])),
        ("GC time (s)", lambda s: f"{s['gc_time']:.3f}"),
        ("GC time (% of run)", lambda s: f"{100 * s['gc_time'] / s['elapsed']:.1f}"),
        ("GC collections gen0/1/2", lambda s: "/".join(str(c) for c in s["gc_count"])),
    ]
    print(f"  {'':32}" + "".join(f"{m:>18}" for m in modes))
    for name, fmt in rows:
        print(f"  {name:32}" + "".join(f"{fmt(steady[m]):>18}" for m in modes))
    print(
        f"  us per lifecycle by call, {s0['second']:,} lifecycles (one simulated second) "
        f"timed call by call:"
    )
    labels = [
        "SYN",
        "SYN|ACK",
        "ACK",
        "request",
        "response",
        "FIN|ACK",
        "FIN|ACK",
        "last ACK",
        "purge (per lifecycle)",
    ]
    for j, label in enumerate(labels):
        print(f"    {label:30}" + "".join(f"{steady[m]['breakdown_us'][j]:18.2f}" for m in modes))
    print(f"    {'total':30}" + "".join(f"{sum(steady[m]['breakdown_us']):18.2f}" for m in modes))
    if "vtw" in steady:
        v = steady["vtw"]["vtw"]
        print()
        print(f"vtw over the timed run: ins {v['ins']:,}, del {v['dels']:,}, kill {v['kill']:,}")
        for name in ("connect", "port"):
            h = v[name]
            per = h["probe"] / h["look"] if h["look"] else 0.0
            print(
                f"  {name:7} hash: look {h['look']:,} (hit {h['hit']:,}, miss {h['miss']:,}),"
                f" probes/lookup {per:.3f}, losing {h['losing']:,}; max_chain "
                f"{h['max_chain']}, max_probe {h['max_probe']}, max_loss {h['max_loss']}"
            )
        for name, used, free, cap, nbytes in steady["vtw"]["usage"]:
            print(f"  pool {name}: {used:,} in use, {free:,} free of {cap:,}, {nbytes:,} bytes")
    if args.profile:
        for m in modes:
            print(
                f"\ncProfile, {s0['second']:,} steady-state lifecycles (one simulated second), {m}:"
            )
            print(
                "\n".join(
                    line
                    for line in steady[m]["profile"].strip().splitlines()
                    if line.strip() and "Ordered by" not in line and "List reduced" not in line
                )
            )
    print()
    if "full" in mem and "vtw" in mem:
        f, v = mem["full"]["traced"], mem["vtw"]["traced"]
        fr, vr = mem["full"]["rss"], mem["vtw"]["rss"]
        print(
            f"memory per TIME_WAIT entry: full {f:,.0f} B, vtw {v:,.1f} B ({v / f:.3f} = "
            f"1/{f / v:.1f}); RSS: full {fr:,.0f} B, vtw {vr:,.1f} B (1/{fr / vr:.1f})"
        )
    if "full" in steady and "vtw" in steady:
        f, v = steady["full"]["rate"], steady["vtw"]["rate"]
        print(f"lifecycles/s: full {f:,.0f}, vtw {v:,.0f} ({v / f:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--seconds",
        type=float,
        default=15.0,
        help="wall time of the steady-state run per mode (default 15)",
    )
    ap.add_argument(
        "--live",
        type=int,
        default=65000,
        help="connections in TIME_WAIT at any moment, i.e. closed within the "
        "last 2 x MSL (default 65000)",
    )
    ap.add_argument("--mode", choices=("both", *MODES), default="both")
    ap.add_argument(
        "--entries",
        type=int,
        default=65536,
        help="VTW pool slots for the memory fill, filled to entries - 1 (default 65536)",
    )
    ap.add_argument(
        "--msl", type=int, default=1, help="loopback MSL in seconds (default 1: TIME_WAIT 2 s)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="steady-state runs per mode, alternating modes; the best is kept",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile one simulated second of lifecycles per mode",
    )
    ap.add_argument("--worker", choices=("memory", "steady"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        phase = (
            memory_phase(args.mode, args.entries, args.msl)
            if args.worker == "memory"
            else steady_phase(args.mode, args)
        )
        json.dump(phase, sys.stdout)
        return
    modes = MODES if args.mode == "both" else (args.mode,)
    mem = {m: spawn("memory", m, args) for m in modes}
    steady: dict[str, dict] = {}
    for _ in range(args.repeat):
        for m in modes:
            result = spawn("steady", m, args)
            if m not in steady or result["rate"] > steady[m]["rate"]:
                steady[m] = result
    report(mem, steady, args)


if __name__ == "__main__":
    main()
