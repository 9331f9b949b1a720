"""pfreplay into a running node vs. the node replaying the same file itself (`pfsyncd --pcap`).

Writes one large capture of protocol-correct TCP (bench/workload.py: handshakes, then data
segments each ACKed, flows interleaved), then, for each round, starts fresh nodes and
measures packets/s of:

- ``pfsyncd --pcap FILE --exit-after-replay``: the node's own log line "replayed N frames
  in T s" (reading, decoding and tracking; no gRPC);
- ``pfreplay FILE`` into an empty node, with the default batch (4096) and ``--batch 1024``:
  pfreplay's own ``seconds`` (first call to last reply), and end to end (the process's
  wall time, which adds start-up and the read-through that checks the file).

Every run must pass every packet and count no state-mismatch. Rounds are interleaved and
the best of each is printed (noise only adds time).

    .venv/bin/python bench/bench_pfreplay.py [--flows 20000] [--rounds 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import established, handshake  # noqa: E402
from pfsync.pcap import PcapWriter  # noqa: E402

BIN = Path(sys.executable).parent
NODE_FLAGS = ("--limit-states", "4000000", "--hostid", "be0c0001")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_capture(path: Path, flows: int, rounds: int) -> int:
    """The capture: every handshake, then ``rounds`` data+ACK exchanges per flow."""
    count = 0
    with PcapWriter(path) as writer:
        ts = 1_700_000_000.0
        for i in range(flows):
            for frame in handshake(i):
                writer.write(ts, frame)
                ts += 1e-6
                count += 1
        for frame in established(flows, rounds):
            writer.write(ts, frame)
            ts += 1e-6
            count += 1
    return count


def run_pcap(path: Path, packets: int) -> float:
    """packets/s of ``pfsyncd --pcap`` by the node's own timing."""
    out = subprocess.run(
        [
            BIN / "pfsyncd",
            "--pcap",
            str(path),
            "--exit-after-replay",
            "--control",
            f"127.0.0.1:{free_port()}",
            *NODE_FLAGS,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"replayed (\d+) frames from .* in ([\d.]+) s", out.stderr)
    assert match and int(match.group(1)) == packets, out.stderr
    return packets / float(match.group(2))


def run_pfreplay(path: Path, packets: int, *flags: str) -> tuple[float, float]:
    """(packets/s by pfreplay's own timing, packets/s end to end) into a fresh node."""
    addr = f"127.0.0.1:{free_port()}"
    node = subprocess.Popen(
        [BIN / "pfsyncd", "--control", addr, *NODE_FLAGS], stderr=subprocess.DEVNULL
    )
    try:
        while subprocess.run(
            [BIN / "pfctl", "-N", addr, "-s", "info"], capture_output=True
        ).returncode:
            time.sleep(0.05)
        started = time.perf_counter()
        out = subprocess.run(
            [BIN / "pfreplay", "-N", addr, "--json", *flags, str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - started
    finally:
        node.terminate()
        node.wait()
    summary = json.loads(out.stdout)
    assert summary["sent"] == summary["passed"] == packets, summary
    assert summary["state_mismatch"] == 0, summary
    return packets / summary["seconds"], packets / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pcap"
        packets = write_capture(path, args.flows, args.rounds)
        size = path.stat().st_size
        print(f"capture: {packets} packets, {size / 1e6:.1f} MB, {args.flows} TCP flows")
        runs: dict[str, Callable[[], tuple[float, ...]]] = {
            "pfsyncd --pcap": lambda: (run_pcap(path, packets),),
            "pfreplay": lambda: run_pfreplay(path, packets),
            "pfreplay --batch 1024": lambda: run_pfreplay(path, packets, "--batch", "1024"),
        }
        best: dict[str, tuple[float, ...]] = {}
        for _ in range(args.repeat):
            for name, measure in runs.items():
                figures = measure()
                best[name] = tuple(
                    max(a, b) for a, b in zip(best.get(name, figures), figures, strict=True)
                )
        base = best["pfsyncd --pcap"][0]
        print(f"best of {args.repeat}, packets/s (ratio to pfsyncd --pcap):")
        for name, figures in best.items():
            text = f"  {name:28s} {figures[0]:>10,.0f}  ({figures[0] / base:.2f}x)"
            if len(figures) > 1:
                text += f"   end to end {figures[1]:>10,.0f}  ({figures[1] / base:.2f}x)"
            print(text)


if __name__ == "__main__":
    main()
