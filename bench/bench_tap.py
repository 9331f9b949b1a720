"""What a tap costs the node: its packet rate with a tap on and off, interleaved.

    .venv/bin/python bench/bench_tap.py [FLOWS] [ROUNDS] [PHASE]

Builds a capture of real-shaped TCP traffic (bench/workload.py: FLOWS flows, ROUNDS
data/ACK rounds each; default 2000 x 250 = 1,006,000 frames), then, once per case,
replays it at full speed into a node served over real gRPC, with a real pfdump process
attached to pcap0 for the whole replay:

- ``pfdump -w /dev/null``: every frame offered to the tap;
- ``pfdump -w /dev/null tcp port 80``: the same with a filter the node evaluates.

The node runs on CPU 1 and pfdump on CPU 0. Every PHASE replay batches (default 8 x 4,096
frames) the bench switches the tap off or on: off, the tap is out of the interface's list,
so the source takes its untapped path (one ``if taps:`` a frame) and pfdump waits; on, the
node counts, filters and buffers every frame and sends what pfdump reads. Each on phase is
compared with the mean of the off phases around it. This VM's speed drifts by +-25 % from
one second to the next, which swamps a 10 % effect in replays run one after another, but
hardly moves within one phase pair.

It prints, per case, the median of those paired costs (target: <= 10 %), the cost from
all on and all off phases together, the node's main-thread CPU per frame on and off, and
the tap's counters.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import established, handshake  # noqa: E402
from pfsync.logs import limit_grpc_call_errors  # noqa: E402
from pfsync.node import REPLAY_BATCH, Node, tune_process  # noqa: E402
from pfsync.pcap import PcapWriter  # noqa: E402
from pfsync.tap_service import TapService  # noqa: E402
from pfsync.v1 import tap_pb2_grpc  # noqa: E402

BIN = Path(sys.executable).parent
NODE_CPU, READER_CPU = 1, 0


def make_capture(path: Path, flows: int, rounds: int) -> int:
    n = 0
    with PcapWriter(path) as w:
        for i in range(flows):
            for frame in handshake(i):
                w.write(n * 1e-6, frame)
                n += 1
        for frame in established(flows, rounds):
            w.write(n * 1e-6, frame)
            n += 1
    return n


# One phase: was the tap on, frames replayed, seconds, main-thread CPU seconds.
Phase = tuple[bool, int, float, float]


async def interleaved(
    capture: Path, filter_words: list[str], phase: int
) -> tuple[list[Phase], str]:
    """Replay ``capture`` with a pfdump attached, the tap switched on and off every
    ``phase`` replay batches; the phases and the tap's counters."""
    tune_process()  # as pfsyncd runs
    limit_grpc_call_errors()
    node = Node(0x1A2B3C4D, limit_states=1_000_000)
    taps = node.taps.interface("pcap0")  # so pfdump can attach before the replay starts
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    tap_pb2_grpc.add_TapServiceServicer_to_server(TapService(node.taps), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    dump = subprocess.Popen(
        ["taskset", "-c", str(READER_CPU), BIN / "pfdump", "-N", f"127.0.0.1:{port}"]
        + ["-i", "pcap0", "-w", "/dev/null", *filter_words],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not node.taps.taps:
            await asyncio.sleep(0.01)
        tap = next(iter(node.taps.taps.values()))
        taps.remove(tap)  # off for the first phase
        phases: list[Phase] = []
        source = node.start_replay(capture, 0)
        on, frames = False, 0
        started, cpu = time.perf_counter(), time.thread_time()
        # The replay yields once per batch; this task runs in between and ends a phase
        # after `phase` batches.
        while not source.done:
            await asyncio.sleep(0)
            if source.frames - frames >= phase * REPLAY_BATCH:
                now, now_cpu = time.perf_counter(), time.thread_time()
                phases.append((on, source.frames - frames, now - started, now_cpu - cpu))
                on, frames, started, cpu = not on, source.frames, now, now_cpu
                if on:
                    taps.append(tap)
                else:
                    taps.remove(tap)
        deadline = time.monotonic() + 10
        while tap.buffered and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        note = f"tap recv {tap.received} capt {tap.captured} drop {tap.dropped}"
        return phases, note
    finally:
        dump.send_signal(2)
        await asyncio.get_running_loop().run_in_executor(None, dump.wait, 10)
        deadline = time.monotonic() + 5  # the stream ends with pfdump: no call to cancel
        while node.taps.taps and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await server.stop(None)


def report(name: str, phases: list[Phase], note: str) -> None:
    """The median paired cost of the on phases, and the totals."""
    rates = [(on, n / seconds) for on, n, seconds, _ in phases]
    costs = []
    for i, (on, rate) in enumerate(rates):
        if on and 0 < i < len(rates) - 1:
            costs.append(100 * (1 - rate / ((rates[i - 1][1] + rates[i + 1][1]) / 2)))

    def totals(on: bool) -> tuple[float, float]:
        n = sum(p[1] for p in phases if p[0] == on)
        return n / sum(p[2] for p in phases if p[0] == on), sum(
            p[3] for p in phases if p[0] == on
        ) / n

    (rate_on, cpu_on), (rate_off, cpu_off) = totals(True), totals(False)
    quartiles = statistics.quantiles(costs, n=4)
    print(
        f"{name}: {len(costs)} phase pairs, median cost {statistics.median(costs):.1f} %"
        f" (quartiles {quartiles[0]:.1f} / {quartiles[2]:.1f} %)\n"
        f"    all phases: off {rate_off:,.0f} frames/s, on {rate_on:,.0f} frames/s,"
        f" cost {100 * (1 - rate_on / rate_off):.1f} %; node CPU/frame off"
        f" {cpu_off * 1e6:.2f} us, on {cpu_on * 1e6:.2f} us"
        f" ({100 * (cpu_on / cpu_off - 1):+.1f} %)\n"
        f"    {note}"
    )


def main() -> None:
    os.sched_setaffinity(0, {NODE_CPU})
    flows = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 250
    phase = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    with tempfile.TemporaryDirectory() as tmp:
        capture = Path(tmp) / "bench.pcap"
        frames = make_capture(capture, flows, rounds)
        print(
            f"capture: {frames} frames, {flows} flows x {rounds} rounds; phases of {phase} batches"
        )
        for name, words in [
            ("pfdump -w /dev/null", []),
            ("pfdump -w /dev/null tcp port 80", ["tcp", "port", "80"]),
        ]:
            report(name, *asyncio.run(interleaved(capture, words, phase)))
        print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
