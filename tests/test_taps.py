"""Taps and pfdump: real pfsyncd nodes, the real pfdump/pfsysctl console scripts, frames fed
through Inject and real pfsync streams; pcap files read back with the project's reader."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pfsync.pcap import read_capture
from pfsync.tap_service import columns_message
from pfsync.taps import Batch, FilterError, TapHub, compile_filter
from pfsync.v1 import control_pb2 as pb
from pfsync.v1 import control_pb2_grpc, sync_pb2, tap_pb2, tap_pb2_grpc
from statetable import decode_frame
from tests.packets import ACK, SYN, icmp_echo, tcp, udp
from tests.test_e2e import BIN, free_port
from tools.framedecode import records, records_of_columns

TIME = r"\d\d:\d\d:\d\d\.\d{6}"
FRAMES = [
    tcp("10.0.0.1", "10.0.0.2", 40000, 80, SYN, seq=1000),
    tcp("10.0.0.2", "10.0.0.1", 80, 40000, SYN | ACK, seq=5000, ack=1001),
    udp("10.0.0.1", "10.0.0.3", 5353, 53, b"q" * 12),
    icmp_echo("10.0.0.1", "10.0.0.4", 7, seq=3),
    tcp("2001:db8::1", "2001:db8::2", 40001, 443, SYN, seq=1),
]
LINES = [
    rf"{TIME} IP 10\.0\.0\.1\.40000 > 10\.0\.0\.2\.80: Flags \[S\], seq 1000, win 65535, length 0",
    rf"{TIME} IP 10\.0\.0\.2\.80 > 10\.0\.0\.1\.40000: Flags \[S\.\], seq 5000, ack 1001, "
    r"win 65535, length 0",
    rf"{TIME} IP 10\.0\.0\.1\.5353 > 10\.0\.0\.3\.53: UDP, length 12",
    rf"{TIME} IP 10\.0\.0\.1 > 10\.0\.0\.4: ICMP echo request, id 7, seq 3, length 8",
    rf"{TIME} IP6 2001:db8::1\.40001 > 2001:db8::2\.443: Flags \[S\], seq 1, win 65535, length 0",
]


def start_node(*extra: str) -> tuple[subprocess.Popen[str], str]:
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [BIN / "pfsyncd", "--control", addr, "--hostid", "1a2b3c4d", *extra],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = subprocess.run(
            [BIN / "pfctl", "-N", addr, "-s", "info"], capture_output=True, timeout=30
        )
        if out.returncode == 0:
            return proc, addr
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("node did not start")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    assert proc.wait(10) == 0


@pytest.fixture
def node() -> Iterator[str]:
    proc, addr = start_node("--sync-listen", "")
    try:
        yield addr
    finally:
        stop(proc)


def inject(addr: str, frames: list[bytes]) -> None:
    with grpc.insecure_channel(addr) as channel:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        stub.Inject(pb.InjectRequest(frames=[pb.Frame(linktype=1, data=f) for f in frames]))


def tool(name: str, addr: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / name, "-N", addr, *args], capture_output=True, text=True, timeout=timeout
    )


def start_tool(name: str, addr: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [BIN / name, "-N", addr, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sysctl(addr: str, name: str) -> str:
    out = tool("pfsysctl", addr, name)
    assert out.returncode == 0, out.stderr
    return out.stdout


def wait_taps(addr: str, count: int) -> None:
    """Until the node has ``count`` taps attached (net.bpf.stats.peers)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if sysctl(addr, "net.bpf.stats.peers").split()[-1] == str(count):
            return
        time.sleep(0.05)
    raise AssertionError(f"never {count} taps")


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return out, err


def test_pfdump_prints_a_line_per_frame(node: str) -> None:
    dump = start_tool("pfdump", node, "-i", "inject", "-c", str(len(FRAMES)))
    wait_taps(node, 1)
    inject(node, FRAMES)
    out, err = finish(dump)
    lines = out.splitlines()
    assert len(lines) == len(LINES)
    for line, pattern in zip(lines, LINES, strict=True):
        assert re.fullmatch(pattern, line), line
    assert err.splitlines() == [
        "pfdump: listening on inject (tap 1), snapshot length 262144 bytes",
        f"{len(FRAMES)} packets captured",
        f"{len(FRAMES)} packets received by filter",
        "0 packets dropped by the node",
    ]


def test_pfdump_filter_and_json(node: str) -> None:
    dump = start_tool("pfdump", node, "-i", "inject", "-c", "2", "--json", "tcp", "port", "80")
    wait_taps(node, 1)
    inject(node, FRAMES)
    out, _ = finish(dump)
    docs = [json.loads(line) for line in out.splitlines()]
    assert [(d["src"], d["sport"], d["dst"], d["dport"]) for d in docs] == [
        ("10.0.0.1", 40000, "10.0.0.2", 80),
        ("10.0.0.2", 80, "10.0.0.1", 40000),
    ]
    assert all(d["proto"] == 6 and d["linktype"] == 1 and d["interface"] == "inject" for d in docs)


def test_pfdump_writes_a_pcap_the_reader_opens(node: str, tmp_path: Path) -> None:
    path = tmp_path / "out.pcap"
    dump = start_tool("pfdump", node, "-i", "inject", "-c", "5", "-w", str(path), "-s", "40")
    wait_taps(node, 1)
    inject(node, FRAMES)
    finish(dump)
    got = list(read_capture(path))
    assert [(linktype, frame) for _, linktype, frame in got] == [(1, f[:40]) for f in FRAMES]
    assert all(abs(ts - time.time()) < 60 for ts, _, _ in got)
    # Each record keeps the frame's original length, as tcpdump -s writes it.
    data, pos, lengths = path.read_bytes(), 24, []
    while pos < len(data):
        _, _, caplen, length = struct.unpack_from("<IIII", data, pos)
        lengths.append(length)
        pos += 16 + caplen
    assert lengths == [len(f) for f in FRAMES]


def test_a_tap_takes_batches_from_its_attach_on() -> None:
    """In process: a batch handed over after the tap attached in its middle; the filter,
    the buffer's bound, snaplen and the message size."""
    hub = TapHub(clock=lambda: 10.0)
    taps = hub.interface("pcap0")
    tap = hub.attach("pcap0", "not udp", buffer_frames=3, snaplen=40)
    batch = Batch()
    batch.add(9.5, (9.5, 1, FRAMES[0]), decode_frame(FRAMES[0], 1))  # before the attach
    for i, frame in enumerate([*FRAMES, b"\xff" * 20]):  # the last one is not IP
        batch.add(10.0 + i, (10.0 + i, 1, frame), decode_frame(frame, 1))
    batch.hand_over(taps)
    assert batch.records == []
    # 6 frames since the attach; UDP and the non-IP frame do not match; 1 of 4 is dropped.
    assert (tap.received, tap.captured, tap.dropped, tap.buffered) == (6, 4, 1, 3)
    first, n = tap.take(100.0, 40)  # a message ends with the frame whose bytes fill it
    second, m = tap.take(100.0, 1 << 20)
    assert (n, m, tap.buffered) == (1, 2, 0)
    got = [(r.time_ns, r.length, r.data) for r in records(first + second)]
    kept = [0, 1, 3]
    assert got == [(int((110.0 + i) * 1e9), len(FRAMES[i]), FRAMES[i][:40]) for i in kept]
    assert tap.take(100.0, 1 << 20) == (b"", 0)


def test_messages_cross_batches_in_order() -> None:
    """Frames buffered from several batches come out in order, each message ending with the
    frame whose captured bytes reach the message size, whichever batch that frame is in."""
    hub = TapHub(clock=lambda: 10.0)
    taps = hub.interface("pcap0")
    tap = hub.attach("pcap0", buffer_frames=1000)
    sent = []
    for b in range(4):
        batch = Batch()
        for i in range(7):
            frame, now = FRAMES[(b + i) % len(FRAMES)], 10.0 + b + i / 10
            batch.add(now, (now, 1, frame), decode_frame(frame, 1))
            sent.append((int(now * 1e9), frame))
        batch.hand_over(taps)
    max_bytes = 3 * len(FRAMES[0]) + 1
    got, sizes = [], []
    while tap.buffered:
        blob, n = tap.take(0.0, max_bytes)
        taken = list(records(blob))
        assert len(taken) == n >= 1
        sizes.append([len(r.data) for r in taken])
        got += [(r.time_ns, r.data) for r in taken]
    assert got == sent
    assert all(sum(s[:-1]) < max_bytes <= sum(s) for s in sizes[:-1])
    assert tap.buffered_bytes == 0 and tap.take(0.0, max_bytes) == (b"", 0)


def test_columns_carry_what_records_carry() -> None:
    """The same frames, taken as records by one tap and as FrameColumns by another (the
    form pfdump asks for), give the same records once the client packs the columns,
    snaplen cut and message size included; a node's inconsistent columns are refused."""
    hub = TapHub(clock=lambda: 10.0)
    taps = hub.interface("pcap0")
    as_records = hub.attach("pcap0", snaplen=40)
    as_columns = hub.attach("pcap0", snaplen=40)
    batch = Batch()
    for i, frame in enumerate([*FRAMES, b"\xff" * 20]):
        batch.add(10.0 + i / 3, (0.0, 1, frame), decode_frame(frame, 1))
    batch.hand_over(taps)
    taken = 0
    for max_bytes in (40, 1 << 20):  # a message ends with the frame whose bytes fill it
        records_blob, n = as_records.take(100.0, max_bytes)
        message = columns_message(as_columns, 100.0, max_bytes)
        assert message.frame_count == n == len(message.columns.node_times)
        assert records_of_columns(message.columns) == records_blob
        taken += n
    assert taken == len(FRAMES) + 1 and n > 1 and as_columns.buffered == 0
    message.columns.caplens[0] += 1
    with pytest.raises(ValueError, match="do not add up"):
        records_of_columns(message.columns)
    del message.columns.linktypes[0]
    with pytest.raises(ValueError, match="different lengths"):
        records_of_columns(message.columns)


def test_a_slow_reader_drops_without_slowing_the_node(node: str) -> None:
    """A tap of 4 frames whose reader reads nothing: the node takes all 300 frames,
    the tap keeps 4 and counts the rest as dropped, in the stream and in net.bpf.peers."""
    with grpc.insecure_channel(node) as channel:
        stub = tap_pb2_grpc.TapServiceStub(channel)
        call = stub.Attach(tap_pb2.AttachRequest(interface="inject", buffer_frames=4, pid=42))
        first = next(call)
        assert first.frame_count == 0 and first.tap_id == 1
        frames = [udp("10.0.1.1", "10.0.1.2", 1000 + i, 53) for i in range(300)]
        started = time.monotonic()
        inject(node, frames)
        assert time.monotonic() - started < 10
        peers = sysctl(node, "net.bpf.peers")
        assert re.fullmatch(
            r"net\.bpf\.peers = id=1 pid=42 comm=- if=inject flags=[IW]-RS- recv=300 drop=296 "
            r"capt=300 bufsize=4 buffered=\d peer=ipv4:127\.0\.0\.1:\d+ filter=\n",
            peers,
        ), peers
        second = next(call)
        assert second.frame_count == 4
        assert (second.counters.received, second.counters.dropped) == (300, 296)
        listed = stub.ListTaps(tap_pb2.ListTapsRequest()).taps
        assert [(t.interface, t.pid, t.counters.dropped) for t in listed] == [("inject", 42, 296)]
        call.cancel()
    wait_taps(node, 0)
    stats = sysctl(node, "net.bpf.stats").splitlines()
    assert stats == [
        "net.bpf.stats.recv = 300",
        "net.bpf.stats.capt = 300",
        "net.bpf.stats.drop = 296",
        "net.bpf.stats.peers = 0",
        "net.bpf.stats.attached = 1",
        "net.bpf.stats.denied = 0",
    ]


def test_pfsync0_frames_are_sync_frames(tmp_path: Path) -> None:
    """Taps on A's pfsync0, then a peer B connects: its hello and bulk frames are tapped."""
    a_sync = f"127.0.0.1:{free_port()}"
    a, a_addr = start_node("--sync-listen", a_sync)
    b = None
    try:
        assert tool("pfdump", a_addr, "-i", "pfsync0", "tcp").returncode == 2
        path = tmp_path / "sync.pcap"
        dump = start_tool("pfdump", a_addr, "-i", "pfsync0", "-c", "2", "-w", str(path))
        text = start_tool("pfdump", a_addr, "-i", "pfsync0", "-c", "2")
        wait_taps(a_addr, 2)
        b, _ = start_node("--sync-listen", "", "--peer", a_sync, "--hostid", "2b2b2b2b")
        finish(dump)
        out, _ = finish(text)
        got = list(read_capture(path))
        assert [linktype for _, linktype, _ in got] == [147, 147]
        senders = {sync_pb2.SyncFrame.FromString(data).sender for _, _, data in got}
        assert senders <= {0x1A2B3C4D, 0x2B2B2B2B}
        lines = out.splitlines()
        assert len(lines) == 2
        for line in lines:
            assert re.fullmatch(
                rf"{TIME} pfsync (In|Out): sender (1a2b3c4d|2b2b2b2b) seq \d+ ack \d+"
                r"( [A-Za-z_]+( \d+)?)*, length \d+",
                line,
            ), line
        assert any(" hello" in line for line in lines)
    finally:
        if b is not None:
            stop(b)
        stop(a)


def test_streams_end_in_one_line_when_the_node_stops() -> None:
    """SIGTERM while a pfdump and a pfwatch are attached: each stream ends with UNAVAILABLE
    (the tools exit 1 with one line saying why), and the node exits 0 without a traceback
    (grpc prints one for a stream it has to cancel at shutdown)."""
    proc, addr = start_node("--sync-listen", "")
    tools = [start_tool("pfdump", addr, "-i", "inject"), start_tool("pfwatch", addr)]
    for started in tools:
        assert started.stderr is not None
        line = started.stderr.readline()  # "listening on ..." / "watching ..."
        assert "listening" in line or "watching" in line, line
    proc.terminate()
    assert proc.wait(15) == 0
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert "Traceback" not in log and "CancelledError" not in log, log
    for ended in tools:
        _, err = ended.communicate(timeout=30)
        assert ended.returncode == 1, err
        assert err.strip().count("\n") == 0 and "the node is shutting down" in err, err


def test_admin_only_and_one_line_failures(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    proc, addr = start_node("--sync-listen", "", "--admin-token-file", str(token))
    try:
        out = tool("pfdump", addr, "-i", "inject", "-c", "1")
        assert out.returncode == 1
        assert len(out.stderr.splitlines()) == 1 and "token" in out.stderr
        peers = tool("pfsysctl", addr, "net.bpf.peers")
        assert peers.returncode == 1 and len(peers.stderr.splitlines()) == 1
        assert sysctl(addr, "net.bpf.stats.denied").split()[-1] == "1"
        allowed = tool("pfsysctl", addr, "--token-file", str(token), "net.bpf.peers")
        assert allowed.returncode == 0 and allowed.stdout == "net.bpf.peers = \n"
    finally:
        stop(proc)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-i", "inject", "-c", "0"],
        ["-i", "inject", "-c", "x"],
        ["-i", "inject", "-s", "999999999"],
        ["-i", "inject", "tcp", "port", "99999"],
        ["-i", "inject", "host", "nohost"],
        ["-i", "inject", "(", "tcp"],
        ["-i", "eth9"],
        ["-i", "inject", "-w", "/nonexistent/dir/x.pcap"],
    ],
)
def test_bad_flags_exit_2_in_one_line(node: str, args: list[str]) -> None:
    out = tool("pfdump", node, *args)
    assert out.returncode == 2, out
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("pfdump: ")
    assert out.stdout == ""


def test_unknown_interface_names_the_known_ones(node: str) -> None:
    out = tool("pfdump", node, "-i", "eth9")
    assert out.stderr == "pfdump: no interface 'eth9' on this node (have: inject)\n"


def test_unreachable_node_exits_1() -> None:
    out = tool("pfdump", f"127.0.0.1:{free_port()}", "-i", "inject")
    assert out.returncode == 1
    assert re.fullmatch(r"pfdump: cannot reach node 127\.0\.0\.1:\d+: .+\n", out.stderr)


def test_filter_language() -> None:
    cases = {
        "": [True] * 5,
        "tcp": [True, True, False, False, True],
        "tcp port 80": [True, True, False, False, False],
        "udp or icmp": [False, False, True, True, False],
        "not tcp and not udp": [False, False, False, True, False],
        "src host 10.0.0.1 && !(port 53)": [True, False, False, True, False],
        "dst net 10.0.0.0/30": [True, True, True, False, False],
        "ip6": [False, False, False, False, True],
        "src port 40000 || dst port 53": [True, False, True, False, False],
    }
    for text, expected in cases.items():
        select = compile_filter(text)
        pkts = [decode_frame(frame, 1) for frame in FRAMES]
        got = [True] * len(FRAMES) if select is None else select(pkts)
        assert got == expected, text
    deep = ("(" * 400 + "tcp" + ")" * 400, "not " * 400 + "tcp")
    for bad in ("port", "tcp and", "(tcp", "tcp )", "host 1.2.3", "frob", "port -1", *deep):
        with pytest.raises(FilterError):
            compile_filter(bad)


def test_tools_import_no_statetable() -> None:
    code = (
        "import sys, tools.pfdump, tools.pfwatch, tools.framedecode; "
        "print([m for m in sys.modules if m.startswith(('statetable', 'pfsync.sync', "
        "'pfsync.node', 'pfsync.control'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout == "[]\n", out.stderr
