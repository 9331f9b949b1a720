"""What a tap costs the node: replay packet rate with no tap, and with pfdump attached.

    .venv/bin/python bench/bench_tap.py [FLOWS] [ROUNDS] [REPEAT]

Builds a capture of real-shaped TCP traffic (bench/workload.py: FLOWS flows, ROUNDS
data/ACK rounds each; default 2000 x 100 = 406,000 frames), then replays it at full speed
into a node served over real gRPC, three ways, in REPEAT rounds (default 9):

- ``no tap``: nobody taps pcap0 (the sources' ``if taps:`` test only);
- ``tap, pfdump -w /dev/null``: a real pfdump process (another core's worth of client)
  attached to pcap0 for the whole replay, reading every frame;
- ``tap, filter 'tcp port 80'``: the same with a filter the node evaluates per frame.

It prints the median frames/s of each, the median of each round's cost relative to that
round's untapped replay (target: <= 10 %) and of the node's CPU per frame, plus the pfdump
figures (captured, dropped). The node's work per frame is tracking plus, with a tap,
counting, buffering and filling FrameColumns (what pfdump asks for); the client runs in
its own process on the other CPU.
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
from pfsync.node import Node, tune_gc  # noqa: E402
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


async def replay_rate(capture: Path, filter_words: list[str] | None) -> tuple[float, float, str]:
    """Frames/s and the node's CPU microseconds per frame of one full-speed replay; with
    ``filter_words`` a pfdump is attached."""
    tune_gc()  # as pfsyncd runs
    node = Node(0x1A2B3C4D, limit_states=1_000_000)
    node.taps.interface("pcap0")  # so pfdump can attach before the replay starts
    server = grpc.aio.server()
    tap_pb2_grpc.add_TapServiceServicer_to_server(TapService(node.taps), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    dump = None
    try:
        if filter_words is not None:
            # pfdump on the other core: the node's rate then shows its own tap work, not
            # the CPU a client on the same core would take from it.
            dump = subprocess.Popen(
                ["taskset", "-c", str(READER_CPU), BIN / "pfdump", "-N", f"127.0.0.1:{port}"]
                + ["-i", "pcap0", "-w", "/dev/null", *filter_words],
                stderr=subprocess.PIPE,
                text=True,
            )
            while not node.taps.taps:
                await asyncio.sleep(0.01)
        start, cpu = time.perf_counter(), time.process_time()
        source = node.start_replay(capture, 0)
        assert source.task is not None
        await source.task
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        note = ""
        if dump is not None:
            # Let pfdump take what is buffered, then stop it and read its figures.
            tap = next(iter(node.taps.taps.values()))
            deadline = time.monotonic() + 10
            while tap.buffered and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            note = f"tap recv {tap.received} capt {tap.captured} drop {tap.dropped}"
            dump.send_signal(2)
            await asyncio.get_running_loop().run_in_executor(None, dump.wait, 10)
        return source.frames / elapsed, cpu / source.frames * 1e6, note
    finally:
        if dump is not None and dump.poll() is None:
            dump.kill()
        await server.stop(None)


def main() -> None:
    os.sched_setaffinity(0, {NODE_CPU})
    flows = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    repeat = int(sys.argv[3]) if len(sys.argv) > 3 else 9
    with tempfile.TemporaryDirectory() as tmp:
        capture = Path(tmp) / "bench.pcap"
        frames = make_capture(capture, flows, rounds)
        print(f"capture: {frames} frames, {flows} flows x {rounds} rounds")
        cases = [
            ("no tap", None),
            ("tap, pfdump -w /dev/null", []),
            ("tap, filter 'tcp port 80'", ["tcp", "port", "80"]),
        ]
        # Rounds of every case back to back; each tapped replay is compared with the
        # untapped one of its own round, and the median of those paired costs is shown:
        # on a VM whose speed drifts by +-25 % between minutes, a best-of-N across cases
        # compares different moments.
        runs: dict[str, list[tuple[float, float, str]]] = {name: [] for name, _ in cases}
        for _ in range(repeat):
            for name, words in cases:
                runs[name].append(asyncio.run(replay_rate(capture, words)))
        base = runs["no tap"]
        for name, _ in cases:
            costs = [100 * (1 - r[0] / b[0]) for r, b in zip(runs[name], base, strict=True)]
            cpu_costs = [100 * (r[1] / b[1] - 1) for r, b in zip(runs[name], base, strict=True)]
            rate, cost = statistics.median(r[0] for r in runs[name]), statistics.median(costs)
            print(
                f"{name:28s} {rate:10,.0f} frames/s (median)  cost {cost:5.1f} %"
                f"  node CPU/frame {statistics.median(cpu_costs):+5.1f} %  {runs[name][-1][2]}"
            )
        print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
