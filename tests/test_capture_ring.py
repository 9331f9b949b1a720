"""Live capture through the TPACKET_V3 ring: batches, drops counted and exported, and the
one-line errors (no rights, no interface, an interface that goes down or disappears)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pfsync.afpacket import InterfaceGone, PacketCapture
from tests import traffic
from tests.livenode import BIN, live_node, poll

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="live capture needs root")

FAST_BPS = 10_000_000_000


def _send_udp(pair: traffic.VethPair, count: int, size: int) -> None:
    """`count` datagrams of `size` bytes from namespace A to B (a bound, silent receiver)."""
    with traffic.entered_netns(pair.netns_b):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with traffic.entered_netns(pair.netns_a):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sink, sender:
        sink.bind((pair.addr_b, 0))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        target, payload = sink.getsockname(), bytes(size)
        sent = 0
        while sent < count:
            try:
                sender.sendto(payload, target)
                sent += 1
            except OSError:  # ENOBUFS: the qdisc is full for a moment
                time.sleep(0.001)


def test_one_read_takes_every_frame_of_the_ready_blocks() -> None:
    with traffic.veth_pair(FAST_BPS) as pair:
        with traffic.entered_netns(pair.netns_b):
            capture = PacketCapture.open(pair.if_b)
        with capture:
            _send_udp(pair, 300, 100)
            time.sleep(0.1)  # a block that is not full is handed over after 10 ms
            batch = capture.read_batch(10_000)
            assert capture.read_batch() == [] and capture.recv() is None
            stats = capture.stats()
    udp = [f for f in batch if f[2][12:14] == b"\x08\x00" and f[2][23] == socket.IPPROTO_UDP]
    assert len(udp) == 300 and stats.received == len(batch) and stats.dropped == 0
    assert all(len(f[2]) == 14 + 20 + 8 + 100 for f in udp)
    assert abs(batch[0][0] - time.time()) < 5


def test_frames_that_find_the_ring_full_are_counted_as_drops() -> None:
    """A 2-block ring of 4 KiB that nobody reads holds a few dozen frames; the rest are
    dropped by the kernel and counted, so received + dropped covers every frame sent."""
    with traffic.veth_pair(FAST_BPS) as pair:
        with traffic.entered_netns(pair.netns_b):
            capture = PacketCapture.open(pair.if_b, block_size=4096, blocks=2)
        with capture:
            _send_udp(pair, 500, 200)
            time.sleep(0.1)
            received = []
            while batch := capture.read_batch():
                received += batch
            stats = capture.stats()
    assert 0 < stats.received == len(received) < 100
    assert stats.received + stats.dropped >= 500 and stats.dropped > 400


@pytest.mark.slow
def test_the_node_exports_the_kernel_drops_of_its_interface() -> None:
    """A node stopped (SIGSTOP) while more than its ring holds arrives: after SIGCONT its
    GetInfo source counts what the kernel dropped, and frames + drops cover what was sent."""
    sent = 100_000
    with traffic.veth_pair(FAST_BPS) as pair:
        with live_node(pair.netns_b, pair.if_b, args=("--sync-listen", "")) as node:
            node.proc.send_signal(signal.SIGSTOP)
            try:
                _send_udp(pair, sent, 1000)  # ~110 MB of frames for a 64 MiB ring
            finally:
                node.proc.send_signal(signal.SIGCONT)
            source = poll(lambda: _quiet_source(node), timeout=30)
            assert int(source["drops"]) > 0 and not source["error"]
            assert int(source["frames"]) + int(source["drops"]) >= sent
            verbose = node.pfctl("-s", "info", "-v").stdout
            row = next(r for r in verbose.splitlines() if r.strip().startswith("capture pfveth1"))
            assert row.split()[-1] == source["drops"], verbose
            # The interface counters (netstat -i) count them among the interface's drops.
            sysctl = subprocess.run(
                ["ip", "netns", "exec", node.netns, BIN / "pfsysctl", "-N", node.control]
                + ["-n", "net.interfaces.pfveth1.drops"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert int(sysctl.stdout) >= int(source["drops"]), sysctl


def _quiet_source(node: object) -> dict[str, str] | None:
    """The capture source once its frame count stopped moving for half a second."""
    from tests.livenode import LiveNode

    assert isinstance(node, LiveNode)
    first = node.info()["sources"][0]
    time.sleep(0.5)
    second = node.info()["sources"][0]
    return second if second["frames"] == first["frames"] else None


def test_not_root_is_a_one_line_error() -> None:
    proc = subprocess.run(
        [
            # Root without CAP_NET_RAW: the capability, not the uid, is what is missing
            # (a user such as nobody may not even read a checkout under a private dir).
            "setpriv",
            "--bounding-set=-net_raw",
            "--inh-caps=-all",
            BIN / "pfsyncd",
            "--capture",
            "lo",
            "--control",
            "127.0.0.1:0",
            "--sync-listen",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    errors = [r for r in proc.stderr.splitlines() if "capture" in r]
    assert proc.returncode == 1 and errors == [
        "pfsyncd: capture on lo: not permitted (live capture needs root or CAP_NET_RAW)"
    ], proc.stderr


def test_no_such_interface_is_a_one_line_error() -> None:
    proc = subprocess.run(
        [BIN / "pfsyncd", "--capture", "nosuch0", "--control", "127.0.0.1:0", "--sync-listen", ""],
        capture_output=True,
        text=True,
        timeout=60,
    )
    errors = [r for r in proc.stderr.splitlines() if "capture" in r]
    assert proc.returncode == 1 and errors == ["pfsyncd: capture on nosuch0: no such interface"]


def test_reading_a_deleted_interface_raises_interface_gone() -> None:
    with traffic.veth_pair(FAST_BPS) as pair:
        with traffic.entered_netns(pair.netns_b):
            capture = PacketCapture.open(pair.if_b)
        with capture:
            subprocess.run(["ip", "-n", pair.netns_a, "link", "del", pair.if_a], check=True)
            with pytest.raises(InterfaceGone, match="capture on pfveth1: interface disappeared"):
                poll(lambda: capture.read_batch() and False, timeout=5)


@pytest.mark.slow
def test_the_node_outlives_its_interface() -> None:
    """Down: one log line, capture resumes when it is up again. Deleted: one log line, the
    source shows the error, the node keeps serving (and, as with a failed replay, exits 1
    when stopped, because a source failed)."""
    with traffic.veth_pair(FAST_BPS) as pair:
        with live_node(pair.netns_b, pair.if_b, args=("--sync-listen", ""), exit_code=1) as node:
            subprocess.run(["ip", "-n", pair.netns_b, "link", "set", pair.if_b, "down"], check=True)
            poll(lambda: "interface went down" in node.log(), timeout=10)
            subprocess.run(["ip", "-n", pair.netns_b, "link", "set", pair.if_b, "up"], check=True)
            time.sleep(0.5)  # the link's carrier and IPv6 address come back
            before = int(node.info()["sources"][0]["frames"])
            poll(lambda: _send_and_count(pair, node) > before, timeout=15)

            subprocess.run(["ip", "-n", pair.netns_a, "link", "del", pair.if_a], check=True)
            source = poll(lambda: (s := node.info()["sources"][0])["error"] and s, timeout=10)
            assert source["error"] == "capture on pfveth1: interface disappeared"
            assert source["done"] is True
            gone = [r for r in node.log().splitlines() if "interface disappeared" in r]
            assert len(gone) == 1 and gone[0].endswith("the node keeps running without it"), gone
            assert node.proc.poll() is None and node.pfctl("-s", "states").returncode == 0


def _send_and_count(pair: traffic.VethPair, node: object) -> int:
    from tests.livenode import LiveNode

    assert isinstance(node, LiveNode)
    _send_udp(pair, 5, 100)
    time.sleep(0.2)
    return int(node.info()["sources"][0]["frames"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tcpreplay") is None, reason="tcpreplay not installed")
def test_the_node_tracks_every_frame_tcpreplay_sends_at_a_modest_rate(tmp_path: Path) -> None:
    """bench/bench_capture.py's live step, small: real-shaped TCP and UDP from a pcap, sent by
    tcpreplay at 10k frames/s over two loops (new addresses each), all tracked, none dropped."""
    from bench import bench_capture

    shape = argparse.Namespace(connections=40, udp_flows=20, rounds=2, concurrent=20)
    pcap = tmp_path / "shape.pcap"
    with traffic.veth_pair() as pair:
        bench_capture.unshape(pair)
        frames = bench_capture.build_pcap(pcap, pair, shape)
        assert frames == 40 * (3 + 2 * 2 + 3) + 20 * 2 * 2
        with live_node(pair.netns_b, pair.if_b, args=("--sync-listen", "")) as node:
            with bench_capture.poller(node) as watch:
                rig = bench_capture.Rig(pair, watch, node.proc.pid, pcap, pin=False)
                step = bench_capture.live_step(rig, 10_000, 2 * frames / 10_000, max_lag=1.0)
            assert step["sent"] == 2 * frames and step["send_failed"] == 0, step
            assert step["frames"] >= step["sent"] and step["ring_drops"] == 0, step
            states, mismatches = node.states(), node.counter("state-mismatch")
    # Two loops of 40 connections and 20 UDP flows (the link's own IPv6 chatter aside), and
    # protocol-correct to the tracker even with tcpreplay's per-loop addresses.
    protos = sorted(s["proto"] for s in states if s["af"] == "ADDRESS_FAMILY_IPV4")
    assert protos == [socket.IPPROTO_TCP] * 80 + [socket.IPPROTO_UDP] * 40, protos
    assert mismatches == 0
