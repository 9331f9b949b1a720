"""Live capture against pcap replay: the highest packet rate a node tracks on a veth with zero
drops, the drop rate at twice that, and the same node's replay rate of those packets.

    sudo .venv/bin/python bench/bench_capture.py [--seconds 2] [--start 20000]

A pcap of real-shaped traffic is built first (TCP connections with handshake, data, ACKs and
close, and UDP request/response flows, many of each at once; Ethernet frames from A's MAC to
B's). `tcpreplay` in namespace A sends it over a veth at paced rates (`--pps`), looping with
new addresses each loop (`--unique-ip`, so every loop is new flows); a `pfsyncd --capture`
node in namespace B tracks B's end. On two or more CPUs the node has CPU 1 and the generator
CPU 0 (the kernel's veth path runs on the sender's CPU).

The rate climbs by 25 % per step, each against an empty table. A step is sustained when the
node counted every frame sent, its ring dropped none, and it had tracked them all within
`--lag` of the last one sent: the 64 MiB ring holds seconds of traffic, so a step above the
node's pace shows no drops until the ring is full, only a growing backlog. A step that falls
short is tried once more (the machine may be shared); the last sustained rate is the result.
Then the node gets twice that for `--double-seconds` (long enough to fill the ring): the drop
rate (frames sent but not tracked / sent) and the node's own pace (tracked / time until it
caught up) are reported. Last, the pcap is replayed by `pfsyncd --pcap --exit-after-replay`
on the node's CPU: the target is live >= 0.8 x replay with zero drops.

Both are also given per CPU second of the node (its CPU time read from /proc; the replay's
less that of a node replaying an empty pcap): on a shared machine the live node, which has
the generator beside it, gets a smaller share of its CPU than the replaying one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workload  # noqa: E402
from pfsync.pcap import PcapWriter  # noqa: E402
from tests import traffic  # noqa: E402
from tests.livenode import BIN, LiveNode, live_node  # noqa: E402
from tests.packets import udp  # noqa: E402

NODE_CPU, GENERATOR_CPU = 1, 0
DNS = "192.0.2.53"


def unshape(pair: traffic.VethPair) -> None:
    """Take the token-bucket qdisc veth_pair puts on both ends off again: it costs the
    generator a fifth of its rate, and a veth's default (noqueue) is what a host has."""
    for ns, ifname in ((pair.netns_a, pair.if_a), (pair.netns_b, pair.if_b)):
        subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", ifname, "root"], check=True)


def build_pcap(path: Path, pair: traffic.VethPair, args: argparse.Namespace) -> int:
    """Write one loop of the traffic, frames from A's MAC to B's; return its frame count.
    Connections (bench/workload.py) and UDP flows run in groups of `args.concurrent`
    connections, round by round, as many clients at once would."""
    mac_a, mac_b = _mac(pair.netns_a, pair.if_a), _mac(pair.netns_b, pair.if_b)
    ether = bytes.fromhex(mac_b.replace(":", "") + mac_a.replace(":", ""))
    count = 0
    with PcapWriter(path) as writer:

        def put(frames: list[bytes]) -> None:
            nonlocal count
            for frame in frames:
                writer.write(count * 1e-5, ether + frame[12:])
                count += 1

        for first in range(0, args.connections, args.concurrent):
            group = range(first, min(first + args.concurrent, args.connections))
            flows = range(
                first * args.udp_flows // args.connections,
                group.stop * args.udp_flows // args.connections,
            )
            for i in group:
                put(workload.handshake(i))
            for r in range(args.rounds):
                for i in group:
                    put(workload.exchange(i, r))
                for j in flows:
                    client, port = f"10.200.{(j >> 8) & 255}.{j & 255}", 20000 + j % 40000
                    put(
                        [
                            udp(client, DNS, port, 53, b"q" * 40),
                            udp(DNS, client, 53, port, b"r" * 120),
                        ]
                    )
            for i in group:
                put(workload.close(i, args.rounds))
    return count


def _mac(ns: str, ifname: str) -> str:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "link", "show", ifname], capture_output=True, text=True, check=True
    ).stdout
    mac: str = json.loads(out)[0]["address"]
    return mac


def _pin(pid: int, cpu: int) -> None:
    """Every thread of `pid` (a gRPC node has several) onto `cpu`."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), {cpu})


def send(pair: traffic.VethPair, pcap: Path, rate: float, count: int, pin: bool) -> dict[str, Any]:
    """Send `count` frames of the pcap from A at `rate` packets/s (above what tcpreplay can
    do, it sends as fast as it can: `sent_pps` tells)."""
    taskset = ["taskset", "-c", str(GENERATOR_CPU)] if pin else []
    out = subprocess.run(
        ["ip", "netns", "exec", pair.netns_a, *taskset, "tcpreplay", "-i", pair.if_a]
        + ["--preload-pcap", "--no-flow-stats", "--loop=0", "--unique-ip", f"--limit={count}"]
        + [f"--pps={round(rate)}", str(pcap)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    actual = re.search(r"Actual: (\d+) packets .* in ([\d.]+) seconds", out)
    failed = re.search(r"Failed packets:\s+(\d+)", out)
    assert actual and failed, out
    sent, seconds = int(actual.group(1)), float(actual.group(2))
    return {"sent": sent, "failed": int(failed.group(1)), "seconds": seconds}


# Runs in the node's namespace over one gRPC channel (pfctl per poll would start a Python
# process each time and take the node's CPU). "clear": empty the table (each step starts with
# no states) and take the source's counts as the base. "wait N": poll GetInfo every 10 ms until
# the source's frames + drops grew by N since the base (or stopped growing for a second) and
# print the wall-clock time that happened, with the frames and drops since the base.
POLLER = r"""
import sys, time, grpc
from pfsync.v1 import control_pb2 as pb, control_pb2_grpc
stub = control_pb2_grpc.ControlServiceStub(grpc.insecure_channel(sys.argv[1]))
def counts():
    src = stub.GetInfo(pb.GetInfoRequest(), timeout=10).sources[0]
    return src.frames, src.drops
base = counts()
print("ready", flush=True)
for line in sys.stdin:
    if line.startswith("clear"):
        stub.ClearStates(pb.ClearStatesRequest(), timeout=60)
        base = counts()
        print("ok", flush=True)
        continue
    target, last, moved = int(line.split()[1]), None, time.time()
    while True:
        now = counts()
        if now[0] + now[1] - base[0] - base[1] >= target:
            break
        if now != last:
            last, moved = now, time.time()
        elif time.time() - moved > 1:
            break
        time.sleep(0.01)
    print(time.time(), now[0] - base[0], now[1] - base[1], flush=True)
"""


@contextmanager
def poller(node: LiveNode) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", node.netns, sys.executable, "-c", POLLER, node.control],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _ask(proc: subprocess.Popen[str], line: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


@dataclass(frozen=True)
class Rig:
    """What a live step needs: the veth, the poller, the node's pid, the pcap, and whether
    the node and the generator have a CPU each."""

    pair: traffic.VethPair
    watch: subprocess.Popen[str]
    node_pid: int
    pcap: Path
    pin: bool


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` (every thread) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def live_step(rig: Rig, rate: float, seconds: float, max_lag: float) -> dict[str, Any]:
    """One paced step against an empty table: what was sent, tracked and dropped, how long
    after the last frame sent the node had tracked them all (`lag`), whether it sustained
    the rate (every frame tracked, none dropped, `lag` at most `max_lag`), and the node's
    CPU time over the step (its share of a CPU, the frames it tracked per CPU second)."""
    assert _ask(rig.watch, "clear") == "ok"
    cpu = _cpu_seconds(rig.node_pid)
    sent = send(rig.pair, rig.pcap, rate, round(rate * seconds), rig.pin)
    ended = time.time()
    done, frames, drops = _ask(rig.watch, f"wait {sent['sent']}").split()
    cpu = _cpu_seconds(rig.node_pid) - cpu
    lag = max(0.0, float(done) - ended)
    return {
        "rate": round(rate),
        "sent": sent["sent"],
        "send_failed": sent["failed"],
        "sent_pps": round(sent["sent"] / sent["seconds"]),
        "frames": int(frames),
        "ring_drops": int(drops),
        "lost": max(0, sent["sent"] - int(frames)),
        "lag": round(lag, 3),
        "tracked_pps": round(int(frames) / (sent["seconds"] + lag)),
        "node_cpu_share": round(cpu / (sent["seconds"] + lag), 2),
        "frames_per_cpu_s": round(int(frames) / max(cpu, 0.01)),
        "sustained": int(frames) >= sent["sent"] and int(drops) == 0 and lag <= max_lag,
    }


def replay_rate(pcap: Path, pin: bool) -> tuple[int, float, float]:
    """`pfsyncd --pcap` of `pcap`: frames, seconds, and the CPU seconds the replay took (the
    node's CPU time less that of a node replaying an empty pcap: starting, stopping)."""
    taskset = ["taskset", "-c", str(NODE_CPU)] if pin else []
    empty = pcap.with_name("empty.pcap")
    PcapWriter(empty).close()
    runs = []
    for path in (empty, pcap):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(
            [*taskset, str(BIN / "pfsyncd"), "--pcap", str(path), "--exit-after-replay"]
            + ["--control", "127.0.0.1:0", "--sync-listen", ""],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        found = re.search(r"replayed (\d+) frames from .* in ([\d.]+) s", out)
        assert found, out
        runs.append((int(found.group(1)), float(found.group(2)), cpu))
    frames, seconds, cpu = runs[1]
    return frames, seconds, cpu - runs[0][2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each step")
    parser.add_argument("--start", type=float, default=20000, help="first rate, packets/s")
    parser.add_argument(
        "--lag", type=float, default=0.1, help="seconds the node may trail the last frame"
    )
    parser.add_argument("--double-seconds", type=float, default=8.0, help="the 2x step's length")
    parser.add_argument("--connections", type=int, default=2000, help="TCP connections per loop")
    parser.add_argument("--udp-flows", type=int, default=1000, help="UDP flows per loop")
    parser.add_argument("--rounds", type=int, default=16, help="data exchanges per flow")
    parser.add_argument("--concurrent", type=int, default=500, help="connections open at once")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_capture: needs root (namespaces, live capture)")
    if shutil.which("tcpreplay") is None:
        sys.exit("bench_capture: tcpreplay not found (apt-get install tcpreplay; setup.sh does)")
    pin = (os.cpu_count() or 1) >= 2
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, traffic.veth_pair() as pair:
        unshape(pair)
        pcap = Path(tmp) / "bench.pcap"
        pcap_frames = build_pcap(pcap, pair, args)
        with live_node(pair.netns_b, pair.if_b, args=("--sync-listen", "")) as node:
            if pin:
                _pin(node.proc.pid, NODE_CPU)
            with poller(node) as watch:
                rig = Rig(pair, watch, node.proc.pid, pcap, pin)
                rate, best = args.start, None
                while True:
                    # The machine is shared: a step that falls short gets one more try.
                    for _try in range(2):
                        step = live_step(rig, rate, args.seconds, args.lag)
                        print(json.dumps(step), file=sys.stderr)
                        if step["sustained"]:
                            break
                    if not step["sustained"] or step["sent_pps"] < 0.9 * rate:
                        break
                    best = step
                    rate *= 1.25
                if best is None:
                    sys.exit(f"bench_capture: no step sustained at {rate:.0f}/s; lower --start")
                limited_by = "node" if not step["sustained"] else "generator"
                double = live_step(rig, 2 * best["sent_pps"], args.double_seconds, args.lag)
                print(json.dumps(double), file=sys.stderr)
        replay_frames, replay_seconds, replay_cpu = replay_rate(pcap, pin)
    replay_pps = replay_frames / replay_seconds
    replay_per_cpu = replay_frames / max(replay_cpu, 0.01)
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
        "python": platform.python_version(),
        "load_before_after": [round(x, 2) for x in load_before + os.getloadavg()],
        "pcap_frames": pcap_frames,
        "live_zero_drop_pps": best["sent_pps"],
        "live_limited_by": limited_by,
        "live_node_cpu_share": best["node_cpu_share"],
        "double_target_pps": round(2 * best["sent_pps"]),
        "double_sent_pps": double["sent_pps"],
        "double_sent": double["sent"],
        "double_ring_drops": double["ring_drops"],
        "double_drop_fraction": round(double["lost"] / max(1, double["sent"]), 4),
        "double_node_pps": double["tracked_pps"],
        "double_node_cpu_share": double["node_cpu_share"],
        "double_frames_per_cpu_s": double["frames_per_cpu_s"],
        "replay_pps": round(replay_pps),
        "replay_frames_per_cpu_s": round(replay_per_cpu),
        "live_over_replay": round(best["sent_pps"] / replay_pps, 2),
        "per_cpu_s_live_over_replay": round(double["frames_per_cpu_s"] / replay_per_cpu, 2),
        "target_met": best["sent_pps"] >= 0.8 * replay_pps,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:24s} {value}")


if __name__ == "__main__":
    main()
