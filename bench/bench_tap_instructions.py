"""What a tap costs the node, in instructions (the shared VM's timings are too noisy).

    .venv/bin/python bench/bench_tap_instructions.py make FILE [FLOWS] [ROUNDS]
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/bench_tap_instructions.py MODE FILE

``make`` writes a capture of bench/workload.py traffic (default 2000 flows x 10 rounds =
46,000 frames). Each MODE is one in-process replay of FILE at full speed:

- ``none``: nobody taps pcap0;
- ``drop``: a tap nobody reads: its buffer fills, then every frame is counted and dropped;
- ``read``: a reader in the node's loop takes every frame as records (no gRPC, no client);
- ``columns``: the same as FrameColumns, the form pfdump asks for;
- ``filter``: ``read`` with the filter ``tcp port 80`` (every frame matches);
- ``filter-columns``: ``columns`` with that filter (what ``pfdump tcp port 80`` costs).

Run each mode under callgrind and subtract ``none``, then divide by the frame count: the
tap's instructions per frame, to compare with what ``none`` spends on each frame above a
replay of a capture of 3 frames (``make FILE 1 0``).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_tap import make_capture  # noqa: E402
from pfsync.node import Node, tune_process  # noqa: E402
from pfsync.tap_service import MESSAGE_BYTES, columns_message  # noqa: E402
from pfsync.taps import Tap  # noqa: E402
from pfsync.v1 import tap_pb2 as pb  # noqa: E402

MODES = ("none", "drop", "read", "columns", "filter", "filter-columns")


async def read_all(tap: Tap, columns: bool) -> None:
    """Build the messages the gRPC sender builds (records, or FrameColumns as pfdump asks
    for), without sending them."""
    while True:
        if not tap.buffered:
            await tap.wake.wait()
        tap.wake.clear()
        if columns:
            columns_message(tap, 0.0)
        else:
            records, count = tap.take(0.0, MESSAGE_BYTES)
            pb.AttachResponse(records=records, frame_count=count)
        await asyncio.sleep(0)


async def replay(capture: Path, mode: str) -> int:
    tune_process()  # as pfsyncd runs
    node = Node(0x1A2B3C4D, limit_states=1_000_000)
    node.taps.interface("pcap0")
    reader = None
    if mode != "none":
        tap = node.taps.attach("pcap0", "tcp port 80" if mode.startswith("filter") else "")
        if mode != "drop":
            reader = asyncio.create_task(read_all(tap, mode.endswith("columns")))
    source = node.start_replay(capture, 0)
    assert source.task is not None
    await source.task
    if reader is not None:
        reader.cancel()
    return source.frames


def main() -> None:
    mode, path = (sys.argv[1], Path(sys.argv[2])) if len(sys.argv) > 2 else ("", Path())
    if mode == "make":
        flows = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
        rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 10
        print(f"{path}: {make_capture(path, flows, rounds)} frames")
    elif mode in MODES:
        print(f"{mode}: {asyncio.run(replay(path, mode))} frames")
    else:
        sys.exit(f"usage: bench_tap_instructions.py make|{'|'.join(MODES)} FILE [FLOWS ROUNDS]")


if __name__ == "__main__":
    main()
