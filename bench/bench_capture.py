"""Live capture against pcap replay: the highest packet rate a node tracks on a veth with zero
drops, the drop rate at twice that, and the same node's replay rate of those packets.

    sudo .venv/bin/python bench/bench_capture.py [--seconds 2] [--flows 1000]

A generator process in namespace A sends real UDP datagrams of many flows (frames B's
kernel takes in) at a paced rate over a veth to namespace B, where a
`pfsyncd --capture` node tracks them. The rate climbs by 25 % until the node's source counts
kernel drops (its TPACKET_V3 ring overflowed); the last rate without drops is the result.
When the generator, not the node, is what tops out (a Python sender on a busy 2-core
machine), the node's own live pace is measured apart: the node is stopped, a burst fills its
ring, and the time it takes to empty the ring after it resumes gives its live packets/s.
One step's traffic is also captured into a pcap, which `pfsyncd --pcap --exit-after-replay`
replays as fast as it can: the target is live >= 0.8 x replay with zero drops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import traffic  # noqa: E402
from tests.livenode import BIN, live_node  # noqa: E402

# Frames are built once (Ethernet/IPv4/UDP, one per flow, addressed to B's MAC so B's
# kernel takes them in) and sent from A's end of the veth through an AF_PACKET socket: a
# Python UDP socket tops out near 50k sends/s here, a packet socket near 170k.
GENERATOR = r"""
import socket, struct, sys, time
ifname, src, dst, dst_mac, rate, seconds, flows = sys.argv[1:8]
rate, seconds, flows = float(rate), float(seconds), int(flows)
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind((ifname, 0))
src_mac = sock.getsockname()[4]

def checksum(data):
    total = sum(struct.unpack("!10H", data))
    total = (total & 0xFFFF) + (total >> 16)
    return ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF

frames = []
payload = bytes(64)
for i in range(flows):
    udp = struct.pack("!HHHH", 10000 + i, 9000 + i % 7, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    frames.append(bytes.fromhex(dst_mac.replace(":", "")) + src_mac + b"\x08\x00" + ip + udp)
total = int(rate * seconds)
send = sock.send
start = time.perf_counter()
sent = 0
while sent < total:
    due = min(total, int((time.perf_counter() - start) * rate) + 32)
    while sent < due:
        try:
            send(frames[sent % flows])
            sent += 1
        except OSError:
            time.sleep(0.0005)
    ahead = sent / rate - (time.perf_counter() - start)
    if ahead > 0:
        time.sleep(ahead)
print(sent, time.perf_counter() - start)
"""


def _mac(ns: str, ifname: str) -> str:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "link", "show", ifname], capture_output=True, text=True, check=True
    ).stdout
    mac: str = json.loads(out)[0]["address"]
    return mac


def generate(pair: traffic.VethPair, rate: float, seconds: float, flows: int) -> tuple[int, float]:
    """Send `rate` packets/s for `seconds` from namespace A; (packets sent, seconds taken)."""
    dst_mac = _mac(pair.netns_b, pair.if_b)
    out = subprocess.run(
        ["ip", "netns", "exec", pair.netns_a, sys.executable, "-c", GENERATOR]
        + [pair.if_a, pair.addr_a, pair.addr_b, dst_mac, str(rate), str(seconds), str(flows)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), float(out[1])


def source(node: object) -> tuple[int, int]:
    """(frames, drops) of the node's capture source, once it stopped moving."""
    last = (-1, -1)
    while True:
        src = node.info()["sources"][0]  # type: ignore[attr-defined]
        now = (int(src["frames"]), int(src["drops"]))
        if now == last:
            return now
        last = now
        time.sleep(0.3)


def live_step(node: object, pair: traffic.VethPair, rate: float, args: argparse.Namespace) -> dict:
    frames0, drops0 = source(node)
    sent, took = generate(pair, rate, args.seconds, args.flows)
    frames, drops = source(node)
    return {
        "rate": rate,
        "sent": sent,
        "achieved_pps": sent / took,
        "frames": frames - frames0,
        "drops": drops - drops0,
    }


# Polls GetInfo every 10 ms over one gRPC channel, inside the node's namespace, and prints
# the wall-clock time the capture source's frames + drops reached the target: pfctl per poll
# would start a Python process each time and take the node's CPU away from it.
POLLER = r"""
import sys, time, grpc
from pfsync.v1 import control_pb2 as pb, control_pb2_grpc
addr, target = sys.argv[1], int(sys.argv[2])
stub = control_pb2_grpc.ControlServiceStub(grpc.insecure_channel(addr))
def seen():
    src = stub.GetInfo(pb.GetInfoRequest(), timeout=10).sources[0]
    return src.frames + src.drops
base = seen()
print("ready", flush=True)
deadline = time.time() + 120
while seen() - base < target and time.time() < deadline:
    time.sleep(0.01)
print(time.time(), seen() - base, flush=True)
"""


def drain_rate(node: object, pair: traffic.VethPair, packets: int, flows: int) -> dict:
    """The node's own live pace, free of the generator's: stop the node (SIGSTOP), let
    `packets` frames pile up in its ring, resume it and time how fast it empties the ring."""
    proc, netns, control = node.proc, node.netns, node.control  # type: ignore[attr-defined]
    frames0, drops0 = source(node)
    poller = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", POLLER, control, str(packets)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert poller.stdout is not None and poller.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGSTOP)
    try:
        sent, _took = generate(pair, packets, 1.0, flows)
    finally:
        resumed = time.time()
        proc.send_signal(signal.SIGCONT)
    done = float(poller.stdout.readline().split()[0])
    poller.wait()
    frames, drops = source(node)
    return {
        "sent": sent,
        "frames": frames - frames0,
        "drops": drops - drops0,
        "drain_pps": (frames - frames0) / (done - resumed),
    }


def replay_rate(pcap: Path) -> tuple[int, float]:
    out = subprocess.run(
        [
            BIN / "pfsyncd",
            "--pcap",
            str(pcap),
            "--exit-after-replay",
            "--control",
            "127.0.0.1:0",
            "--sync-listen",
            "",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    found = re.search(r"replayed (\d+) frames from .* in ([\d.]+) s", out)
    assert found, out
    return int(found.group(1)), float(found.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each step")
    parser.add_argument("--flows", type=int, default=1000, help="UDP flows (source ports)")
    parser.add_argument("--start", type=float, default=20000, help="first rate, packets/s")
    parser.add_argument(
        "--burst", type=int, default=150000, help="frames queued in the ring for the drain"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_capture: needs root (namespaces, live capture)")
    steps = []
    with traffic.veth_pair(10_000_000_000) as pair:
        with live_node(pair.netns_b, pair.if_b, args=("--sync-listen", "")) as node:
            rate, best, short = args.start, None, 0
            while True:
                step = live_step(node, pair, rate, args)
                steps.append(step)
                print(json.dumps(step), file=sys.stderr)
                if step["drops"]:
                    break
                if best is None or step["achieved_pps"] > best["achieved_pps"]:
                    best = step
                # The generator itself tops out: two steps short of their rate end it.
                short = short + 1 if step["achieved_pps"] < 0.9 * rate else 0
                if short == 2:
                    break
                rate *= 1.25
            assert best is not None, "drops at the first rate"
            double = live_step(node, pair, best["achieved_pps"] * 2, args)
            drain = drain_rate(node, pair, args.burst, args.flows)
            print(json.dumps(drain), file=sys.stderr)
            limited_by = "drops" if steps[-1]["drops"] else "generator"
        # The same traffic as the best step, captured to a pcap and replayed by a fresh node.
        with tempfile.TemporaryDirectory() as tmp:
            pcap = Path(tmp) / "bench.pcap"
            with traffic.capture_to_pcap(pcap, pair.if_b, pair.netns_b) as captured:
                generate(pair, best["rate"], args.seconds, args.flows)
            frames, seconds = replay_rate(pcap)
    replay_pps = frames / seconds
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
        "python": platform.python_version(),
        "live_zero_drop_pps": round(best["achieved_pps"]),
        "live_limited_by": limited_by,
        "double_rate_pps": round(double["achieved_pps"]),
        "double_rate_drop_fraction": round(double["drops"] / max(1, double["sent"]), 4),
        "pcap_frames": frames,
        "pcap_capture_drops": captured.dropped,
        "live_drain_pps": round(drain["drain_pps"]),
        "live_drain_drops": drain["drops"],
        "replay_pps": round(replay_pps),
        "live_over_replay": round(drain["drain_pps"] / replay_pps, 2),
        "target_met": drain["drain_pps"] >= 0.8 * replay_pps and drain["drops"] == 0,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28s} {value}")


if __name__ == "__main__":
    main()
