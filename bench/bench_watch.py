"""Does WatchStates keep up with 50,000 events/s?

    .venv/bin/python bench/bench_watch.py [RATE] [SECONDS]

A node (real grpc.aio ControlService) makes table changes at RATE events/s (default
50,000) for SECONDS (default 4): new UDP states, one frame and one INSERT event each
(the cheapest change to make, so the node's time goes to the watch, not to tracking),
fed to the table in 10 ms slices. A watcher in its own
process (a plain grpc client, counting) streams every change. Printed: events made, events
the watcher received and missed, the rate the node actually sustained (it also does the
feeding), and how long after the last change the watcher had everything.

Kept up = the node sustained the rate, nothing missed, and the whole stream in within a
second of the last change.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pfsync.control import ControlService  # noqa: E402
from pfsync.node import Node, tune_process  # noqa: E402
from pfsync.v1 import control_pb2_grpc  # noqa: E402
from tests.packets import udp  # noqa: E402

WATCHER = r"""
import json, sys, time, grpc
from pfsync.v1 import control_pb2 as pb, control_pb2_grpc
addr, want = sys.argv[1], int(sys.argv[2])
stub = control_pb2_grpc.ControlServiceStub(grpc.insecure_channel(addr))
got = missed = 0
last = None
call = stub.WatchStates(pb.WatchStatesRequest(queue_events=1 << 20), timeout=120)
for n, msg in enumerate(call):
    if n == 0:
        print("ready", flush=True)
    got += len(msg.events)
    missed += msg.missed
    last = time.time()
    if got + missed >= want:
        break
call.cancel()
print(json.dumps({"got": got, "missed": missed, "last": last}), flush=True)
"""

SLICE = 0.01
# The node on one CPU, the watcher on the other, as bench_tap runs them: the rate then
# shows the node's own work, not the CPU a client on the same core takes from it.
NODE_CPU, WATCHER_CPU = 1, 0


async def run(rate: int, seconds: float) -> dict[str, float]:
    tune_process()  # as pfsyncd runs
    node = Node(0x1A2B3C4D, limit_states=1_000_000)
    made = [0]
    node.add_consumer(lambda changes, now: made.__setitem__(0, made[0] + _events(changes)))
    server = grpc.aio.server()
    control_pb2_grpc.add_ControlServiceServicer_to_server(ControlService(node), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # Events per connection (insert, transitions, vestigial), measured on a spare table.
    per_flow = _events_per_flow()
    want = int(rate * seconds) // per_flow * per_flow
    watcher = subprocess.Popen(  # started first: building the frames takes a while
        ["taskset", "-c", str(WATCHER_CPU), sys.executable, "-c", WATCHER]
        + [f"127.0.0.1:{port}", str(want)],
        stdout=subprocess.PIPE,
        text=True,
    )
    loop = asyncio.get_running_loop()
    assert watcher.stdout is not None
    await loop.run_in_executor(None, watcher.stdout.readline)  # "ready"
    flows_per_slice = max(1, int(rate * SLICE / per_flow))
    # Frames built beforehand: building them is the benchmark's work, not the node's.
    frames = [_flow(i) for i in range(want // per_flow + flows_per_slice)]
    flow = 0
    cpu = time.process_time()
    start = time.perf_counter()
    while made[0] < want:
        due = start + (flow // flows_per_slice) * SLICE
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        now = node.clock()
        for _ in range(flows_per_slice):
            for frame in frames[flow]:
                node.feed(frame, 1, now)
            flow += 1
        node.publish_changes()
        await asyncio.sleep(0)
    end = time.time()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    out = await loop.run_in_executor(None, watcher.stdout.readline)
    await loop.run_in_executor(None, watcher.wait, 30)
    await server.stop(None)
    result = json.loads(out)
    return {
        "made": made[0],
        "rate": made[0] / elapsed,
        "got": result["got"],
        "missed": result["missed"],
        "behind": (result["last"] or end) - end,
        "cpu_us": cpu / made[0] * 1e6,
    }


def _events(changes: list[object]) -> int:
    # Bare States (packet-only updates) are not events a default watcher gets.
    from statetable.events import StateMoved
    from statetable.state import State

    return sum(1 for c in changes if type(c) is not State and type(c) is not StateMoved)


def _flow(i: int) -> list[bytes]:
    return [udp(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "192.0.2.1", 1024, 53)]


def _events_per_flow() -> int:
    node = Node(1)
    made = [0]
    node.add_consumer(lambda changes, now: made.__setitem__(0, made[0] + _events(changes)))
    for frame in _flow(0):
        node.feed(frame, 1, 0.0)
    node.publish_changes()
    return made[0]


def main() -> None:
    os.sched_setaffinity(0, {NODE_CPU})
    rate = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    r = asyncio.run(run(rate, seconds))
    # The node both makes the changes and serves the watcher: below 95 % of the target
    # rate it did not keep up either, even when the watcher lost nothing.
    kept = (
        r["missed"] == 0
        and r["got"] == r["made"]
        and r["behind"] < 1.0
        and r["rate"] >= 0.95 * rate
    )
    print(
        f"target {rate:,} events/s for {seconds:g} s: made {r['made']:,.0f} at "
        f"{r['rate']:,.0f} events/s; watcher got {r['got']:,.0f}, missed {r['missed']:,.0f}, "
        f"all in {max(0.0, r['behind']):.2f} s after the last change: "
        + ("kept up" if kept else "did NOT keep up")
    )
    # The node's CPU per event (making the change, queueing, converting, sending): what
    # one core can sustain, whatever else the machine runs meanwhile.
    print(
        f"node CPU {r['cpu_us']:.1f} us per event (one core: {1e6 / r['cpu_us']:,.0f} "
        f"events/s); load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
