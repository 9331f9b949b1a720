"""End to end: the real pfsyncd and pfctl console scripts, over real gRPC on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pfsync.pcap import PcapWriter
from pfsync.v1 import control_pb2 as pb
from pfsync.v1 import control_pb2_grpc
from tests import traffic
from tests.packets import ACK, SYN, eth, tcp, tcp_options, udp

BIN = Path(sys.executable).parent
HOSTID = "1a2b3c4d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pfctl(addr: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "pfctl", "-N", addr, *args], capture_output=True, text=True, timeout=30
    )


def wait_replayed(addr: str, sources: int = 1) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = pfctl(addr, "-s", "info", "--json")
        if out.returncode == 0:
            info = json.loads(out.stdout)["info"]
            srcs = info.get("sources", [])
            if len(srcs) == sources and all(s["done"] for s in srcs):
                return info
        time.sleep(0.1)
    raise AssertionError("replay did not finish")


@pytest.fixture
def real_pcap(tmp_path: Path) -> tuple[Path, list[traffic.Connection]]:
    """A capture of real kernel connections made in a fresh namespace."""
    path = tmp_path / "real.pcap"
    with traffic.isolated_loopback():
        with traffic.capture_to_pcap(path):
            conns = [traffic.client_close_first(), traffic.udp_exchange(), traffic.ipv6()]
    return path, conns


@pytest.fixture
def node(real_pcap: tuple[Path, list[traffic.Connection]]) -> Iterator[str]:
    addr = f"127.0.0.1:{free_port()}"
    # Loopback TIME_WAIT would last 2 s; keep the closed connections' records for the test.
    proc = subprocess.Popen(
        [
            BIN / "pfsyncd",
            "--pcap",
            str(real_pcap[0]),
            "--control",
            addr,
            "--hostid",
            HOSTID,
            "--sysctl",
            "net.inet.tcp.mslt.loopback=600",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_replayed(addr)
        yield addr
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


@pytest.mark.slow
def test_pfctl_shows_replayed_real_traffic(node: str, real_pcap) -> None:
    _, conns = real_pcap
    out = pfctl(node, "-s", "states", "-vv")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    tcp_rows = [line for line in lines if line.startswith("all tcp ")]
    assert len(tcp_rows) == 2  # IPv4 and IPv6 connections
    v4 = conns[0]
    row = f"all tcp {v4.server[0]}:{v4.server[1]} <- {v4.client[0]}:{v4.client[1]}"
    # Closed: vestigial (VTW) records, shown as TIME_WAIT on both sides.
    assert any(r.startswith(row) and r.endswith("TIME_WAIT:TIME_WAIT") for r in tcp_rows)
    v6 = conns[2]
    assert any(f"::1[{v6.client[1]}]" in r for r in tcp_rows)
    assert any(r.startswith("all udp ") for r in lines)
    assert sum(f"creatorid: {HOSTID}" in r for r in lines) == 3
    assert any(r.strip().startswith("[") and "wscale" in r for r in lines)

    info = pfctl(node, "-s", "info")
    assert info.returncode == 0
    # Only the UDP state is a full state; the closed TCP connections are VTW records.
    assert any(r.split()[:3] == ["current", "entries", "1"] for r in info.stdout.splitlines())
    assert any(r.split()[:2] == ["state-mismatch", "0"] for r in info.stdout.splitlines())

    states = json.loads(pfctl(node, "-s", "states", "--json").stdout)["states"]
    assert {s["proto"] for s in states} == {6, 17}
    assert sorted(s.get("vestigial", False) for s in states) == [False, True, True]
    assert all(s["timeout"] == "tcp.timewait" for s in states if s["proto"] == 6)


@pytest.mark.slow
def test_inject_kill_and_flush(node: str) -> None:
    frames = [
        tcp(
            "192.0.2.1", "198.51.100.7", 40000, 443, SYN, 77, 0, 64240, options=tcp_options(1460, 7)
        ),
        tcp(
            "198.51.100.7",
            "192.0.2.1",
            443,
            40000,
            SYN | ACK,
            900,
            78,
            65160,
            options=tcp_options(1460, 7),
        ),
        tcp("192.0.2.1", "198.51.100.7", 40000, 443, ACK, 78, 901, 502),
        tcp("192.0.2.9", "198.51.100.7", 40001, 443, ACK, 5, 5, 502),  # no state
        eth(b"\x45\x00\x00\x30"),
    ]  # torn IPv4
    with grpc.insecure_channel(node) as channel:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        reply = stub.Inject(pb.InjectRequest(frames=[pb.Frame(linktype=1, data=f) for f in frames]))
    assert list(reply.verdicts) == [pb.VERDICT_PASS] * 3 + [pb.VERDICT_BLOCK, pb.VERDICT_ERROR]
    assert (reply.passed, reply.blocked, reply.errors) == (3, 1, 1)

    states = json.loads(pfctl(node, "-s", "states", "--json").stdout)["states"]
    mine = [s for s in states if s["dst_port"] == 443]
    established = "TCP_PEER_STATE_ESTABLISHED"
    assert len(mine) == 1
    assert mine[0]["src"]["tcp_state"] == mine[0]["dst"]["tcp_state"] == established
    killed = pfctl(node, "-k", "id", "-k", f"{mine[0]['id']}/{HOSTID}")
    assert killed.returncode == 0 and "killed 1 states" in killed.stderr

    by_host = pfctl(node, "-k", "::1")
    assert by_host.returncode == 0 and "killed 1 states" in by_host.stderr
    flushed = pfctl(node, "-F", "states")
    assert flushed.returncode == 0 and "2 states cleared" in flushed.stderr
    info = json.loads(pfctl(node, "-s", "info", "--json").stdout)["info"]
    assert info["current_entries"] == 0
    assert {c["name"]: int(c["value"]) for c in info["counters"]}["short"] == 1


def test_corrupt_capture_reports_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "broken.pcap"
    with PcapWriter(path) as w:
        w.write(1.0, udp("10.0.0.1", "10.0.0.2", 1, 2, b"x"))
    path.write_bytes(path.read_bytes() + b"\x01\x02\x03")  # a torn record header
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [BIN / "pfsyncd", "--pcap", str(path), "--control", addr, "--exit-after-replay"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "offset" in line]
    assert len(errors) == 1 and "broken.pcap: truncated" in errors[0], proc.stderr
    assert "replayed 1 frames" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pcap", "/nonexistent.pcap"], "/nonexistent.pcap"),
        (["--hostid", "xyz"], "hostid"),
        (["--control", "nowhere"], "control"),
        (["--replay-speed", "-1"], "replay_speed"),
        (["--bogus"], "unrecognized"),
    ],
)
def test_pfsyncd_usage_errors_are_one_line(argv: list[str], message: str) -> None:
    proc = subprocess.run([BIN / "pfsyncd", *argv], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("pfsyncd: ")


def test_help_of_every_console_script() -> None:
    for tool in ("pfsyncd", "pfctl", "pfsysctl"):
        proc = subprocess.run([BIN / tool, "--help"], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and "usage" in proc.stdout.lower()


@pytest.mark.slow
def test_live_capture_tracks_kernel_traffic() -> None:
    """pfsyncd --capture lo inside a private namespace sees a real connection live."""
    with traffic.isolated_loopback() as ns:
        addr = f"127.0.0.1:{free_port()}"
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                BIN / "pfsyncd",
                "--capture",
                "lo",
                "--control",
                addr,
                "--sysctl",
                "net.inet.tcp.mslt.loopback=60",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        in_ns = ["ip", "netns", "exec", ns, BIN / "pfctl", "-N", addr]
        try:
            deadline = time.monotonic() + 20
            while subprocess.run([*in_ns, "-s", "info"], capture_output=True).returncode:
                assert time.monotonic() < deadline and proc.poll() is None, "node did not start"
                time.sleep(0.1)
            conn = traffic.client_close_first()
            row = f"all tcp {conn.server[0]}:{conn.server[1]} <- {conn.client[0]}:{conn.client[1]}"
            deadline = time.monotonic() + 10
            while True:
                out = subprocess.run([*in_ns, "-s", "states"], capture_output=True, text=True)
                rows = [r for r in out.stdout.splitlines() if r.startswith(row)]
                if rows and rows[0].endswith("TIME_WAIT:TIME_WAIT"):
                    break
                assert time.monotonic() < deadline, out.stdout
                time.sleep(0.1)
            info = subprocess.run([*in_ns, "-s", "info"], capture_output=True, text=True).stdout
            assert any(r.split()[:2] == ["state-mismatch", "0"] for r in info.splitlines())
        finally:
            proc.terminate()
            assert proc.wait(10) == 0
