"""pfreplay end to end: the real console script against real pfsyncd processes over gRPC.

Captures are either real kernel traffic (tests/traffic.py, in a private namespace) or
frames built by tests/packets.py written with the project's PcapWriter when the test is
about timing rather than content. Nodes listen on ports picked at run time.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pfsync.pcap import PcapWriter
from tests import traffic
from tests.packets import ACK, FIN, PSH, SYN, tcp, tcp_options, udp

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
HOSTID = "5eed0001"
# Loopback TIME_WAIT lasts 2 s; keep closed connections' records while the test compares.
KEEP_TIME_WAIT = ("--sysctl", "net.inet.tcp.mslt.loopback=600")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tool: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [BIN / tool, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def pfreplay(addr: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run("pfreplay", "-N", addr, *args, **kwargs)


def info(addr: str) -> dict[str, Any]:
    out = run("pfctl", "-N", addr, "-s", "info", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["info"]


def counter(document: dict[str, Any], name: str) -> int:
    return next(int(c["value"]) for c in document["counters"] if c["name"] == name)


@contextmanager
def node(*extra: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A pfsyncd process on a free port, ready for calls; terminated afterwards."""
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [BIN / "pfsyncd", "--control", addr, "--hostid", HOSTID, *KEEP_TIME_WAIT, *extra],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while run("pfctl", "-N", addr, "-s", "info").returncode != 0:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "node did not start"
            time.sleep(0.1)
        yield addr, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def assert_one_line_error(out: subprocess.CompletedProcess[str], code: int) -> str:
    """The tools' failure contract: exit code, one stderr line, no traceback, no stdout."""
    assert out.returncode == code, (out.returncode, out.stderr)
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pfreplay: "), out.stderr
    return lines[0]


def write_timed_capture(path: Path, packets: int, spacing: float) -> Path:
    """UDP datagrams of one flow, ``spacing`` seconds apart in capture time."""
    with PcapWriter(path) as writer:
        for i in range(packets):
            src, dst, sport, dport = ("10.1.0.1", "10.1.0.2", 4000, 53)
            if i % 2:
                src, dst, sport, dport = dst, src, dport, sport
            writer.write(1_700_000_000.0 + i * spacing, udp(src, dst, sport, dport, b"q%d" % i))
    return path


def write_flows_capture(path: Path, flows: int) -> Path:
    """Whole TCP connections (handshake, data both ways, FIN both ways), one after another."""
    with PcapWriter(path) as writer:
        ts = 1_700_000_000.0
        for i in range(flows):
            c, s, port = f"10.2.{i >> 8}.{i & 255}", "192.0.2.80", 20000 + i
            for frame in (
                tcp(c, s, port, 80, SYN, 100, 0, 64240, options=tcp_options(1460, 7)),
                tcp(s, c, 80, port, SYN | ACK, 900, 101, 65160, options=tcp_options(1460, 7)),
                tcp(c, s, port, 80, ACK, 101, 901, 502),
                tcp(c, s, port, 80, ACK | PSH, 101, 901, 502, payload=b"GET / HTTP/1.0\r\n\r\n"),
                tcp(s, c, 80, port, ACK | PSH, 901, 119, 509, payload=b"HTTP/1.0 200 OK\r\n"),
                tcp(c, s, port, 80, FIN | ACK, 119, 918, 502),
                tcp(s, c, 80, port, FIN | ACK, 918, 120, 509),
                tcp(c, s, port, 80, ACK, 120, 919, 502),
            ):
                writer.write(ts, frame)
                ts += 0.0001
    return path


@pytest.fixture
def flows_pcap(tmp_path: Path) -> Path:
    return write_flows_capture(tmp_path / "flows.pcap", 50)  # 400 packets


@pytest.fixture
def running() -> Iterator[str]:
    with node() as (addr, _):
        yield addr


# --- what is sent, and the summary ------------------------------------------------------


def test_fast_replay_summary_line(running: str, flows_pcap: Path) -> None:
    out = pfreplay(running, str(flows_pcap))
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # no progress bar when stderr is not a terminal
    line = out.stdout.strip()
    assert re.fullmatch(
        r"400 packets sent in [\d.]+ s \(\d+ packets/s\): 400 passed, 0 blocked, "
        r"0 state-mismatch, 0 decode errors",
        line,
    ), line
    after = info(running)
    assert after["packets_passed"] == "400"
    assert counter(after, "state-mismatch") == 0


def test_json_summary(running: str, flows_pcap: Path) -> None:
    out = pfreplay(running, "--json", str(flows_pcap))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert {k: summary[k] for k in ("sent", "passed", "blocked", "state_mismatch")} == {
        "sent": 400,
        "passed": 400,
        "blocked": 0,
        "state_mismatch": 0,
    }
    assert summary["decode_errors"] == 0
    assert summary["files"] == [str(flows_pcap)]
    assert summary["seconds"] > 0 and summary["packets_per_second"] > 0


def test_state_mismatch_and_blocked_come_from_the_node(running: str, tmp_path: Path) -> None:
    """Data beyond the peer's window is blocked; the node counts it state-mismatch."""
    path = tmp_path / "mismatch.pcap"
    c, s = "10.4.0.1", "192.0.2.80"
    too_much = tcp(c, s, 30000, 80, ACK | PSH, 101, 901, 502, payload=b"x" * 1001)
    with PcapWriter(path) as writer:
        for i, frame in enumerate(
            [
                tcp(c, s, 30000, 80, SYN, 100, 0, 64240, options=tcp_options(1460)),
                tcp(s, c, 80, 30000, SYN | ACK, 900, 101, 1000, options=tcp_options(1460)),
                tcp(c, s, 30000, 80, ACK, 101, 901, 502),
                too_much,  # the server offered 1000 bytes
                too_much,
                too_much,
                tcp(c, s, 30000, 80, ACK, 101, 901, 502),
            ]
        ):
            writer.write(1.0 + i, frame)
    before = info(running)
    summary = json.loads(pfreplay(running, "--json", str(path)).stdout)
    after = info(running)
    assert (summary["sent"], summary["passed"], summary["blocked"]) == (7, 4, 3)
    assert summary["state_mismatch"] == 3
    assert counter(after, "state-mismatch") - counter(before, "state-mismatch") == 3


def test_decode_errors_counted(running: str, tmp_path: Path) -> None:
    path = tmp_path / "torn.pcap"
    with PcapWriter(path) as writer:
        writer.write(1.0, udp("10.3.0.1", "10.3.0.2", 1, 2))
        writer.write(2.0, b"\0" * 12 + b"\x08\x00" + b"\x45\x00\x00\x30")  # torn IPv4 header
    summary = json.loads(pfreplay(running, "--json", str(path)).stdout)
    assert (summary["sent"], summary["passed"], summary["decode_errors"]) == (2, 1, 1)


def test_loop_and_limit(running: str, flows_pcap: Path, tmp_path: Path) -> None:
    looped = json.loads(pfreplay(running, "--json", "--loop", "3", str(flows_pcap)).stdout)
    assert looped["sent"] == 1200
    limited = json.loads(pfreplay(running, "--json", "--limit", "13", str(flows_pcap)).stdout)
    assert limited["sent"] == 13
    # --limit counts across loops and files.
    other = write_timed_capture(tmp_path / "udp.pcap", 10, 0.001)
    both = pfreplay(running, "--json", "--loop", "2", "--limit", "405", str(flows_pcap), str(other))
    assert json.loads(both.stdout)["sent"] == 405
    two_files = pfreplay(running, "--json", "--loop", "2", str(flows_pcap), str(other))
    assert json.loads(two_files.stdout)["sent"] == 820


def test_small_batches_keep_order(running: str, tmp_path: Path) -> None:
    """Hundreds of small calls are tracked in capture order: no SYN|ACK overtakes its SYN.

    (With 16 calls in flight this failed on a loaded machine: 2 of 2400 packets blocked.)
    """
    path = write_flows_capture(tmp_path / "many.pcap", 300)
    out = pfreplay(running, "--json", "--batch", "7", str(path))
    summary = json.loads(out.stdout)
    assert (summary["sent"], summary["passed"], summary["state_mismatch"]) == (2400, 2400, 0)


def test_progress_bar_only_on_a_terminal(running: str, tmp_path: Path) -> None:
    """With stderr on a pseudo-terminal the bar is drawn there, then erased; stdout is as usual."""
    path = write_timed_capture(tmp_path / "bar.pcap", 6, 0.1)
    controller, terminal = pty.openpty()
    try:
        out = subprocess.run(
            [BIN / "pfreplay", "-N", running, "--speed", "1", str(path)],
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            timeout=30,
        )
        os.close(terminal)
        terminal = -1
        drawn = b""
        while select.select([controller], [], [], 0.5)[0]:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert out.returncode == 0
    assert out.stdout.startswith("6 packets sent in ")
    text = drawn.decode()
    assert "\r[" in text and "6/6" in text and "100%" in text, text
    assert text.endswith("\r\x1b[K"), text  # erased before the summary


# --- timing ------------------------------------------------------------------------------


def test_speed_one_keeps_capture_timing(running: str, tmp_path: Path) -> None:
    path = write_timed_capture(tmp_path / "second.pcap", 21, 0.05)  # spans 1.0 s
    fast = json.loads(pfreplay(running, "--json", str(path)).stdout)
    assert fast["seconds"] < 0.5
    t0 = time.monotonic()
    real = pfreplay(running, "--json", "--speed", "1", str(path))
    wall = time.monotonic() - t0
    summary = json.loads(real.stdout)
    assert summary["sent"] == 21
    assert 0.95 <= summary["seconds"] <= 1.5, summary["seconds"]
    assert wall >= 1.0
    double = json.loads(pfreplay(running, "--json", "--speed", "2", str(path)).stdout)
    assert 0.45 <= double["seconds"] <= 0.9, double["seconds"]


def test_speed_one_restarts_timing_for_each_file_and_loop(running: str, tmp_path: Path) -> None:
    path = write_timed_capture(tmp_path / "half.pcap", 6, 0.1)  # spans 0.5 s
    summary = json.loads(
        pfreplay(running, "--json", "--speed", "1", "--loop", "2", str(path)).stdout
    )
    assert summary["sent"] == 12
    assert 0.95 <= summary["seconds"] <= 1.5, summary["seconds"]


# --- failures -----------------------------------------------------------------------------


def test_node_killed_mid_replay_exits_1_with_delivered_count(tmp_path: Path) -> None:
    path = write_timed_capture(tmp_path / "slow.pcap", 400, 0.01)  # 4 s at --speed 1
    with node() as (addr, proc):
        replay = subprocess.Popen(
            [BIN / "pfreplay", "-N", addr, "--speed", "1", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        stdout, stderr = replay.communicate(timeout=60)
    out = subprocess.CompletedProcess(replay.args, replay.returncode, stdout, stderr)
    line = assert_one_line_error(out, 1)
    match = re.fullmatch(
        rf"pfreplay: lost node {re.escape(addr)} after (\d+) packets were delivered: .+", line
    )
    assert match, line
    assert 20 < int(match.group(1)) < 400


def test_unreachable_node_exits_1(flows_pcap: Path) -> None:
    out = pfreplay(f"127.0.0.1:{free_port()}", str(flows_pcap))
    assert "cannot reach node" in assert_one_line_error(out, 1)


def test_missing_file_exits_2(running: str, tmp_path: Path) -> None:
    line = assert_one_line_error(pfreplay(running, str(tmp_path / "nope.pcap")), 2)
    assert line == f"pfreplay: {tmp_path / 'nope.pcap'}: No such file or directory"


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda b: b[: len(b) - 30], "runs past the end of the file at byte offset"),
        (lambda b: b"\x13\x37\xbe\xef" + b[4:], "not a pcap or pcapng file"),
        (lambda b: b"", "empty file"),
    ],
    ids=["truncated", "bad-magic", "empty"],
)
def test_corrupt_file_exits_2_and_sends_nothing(
    running: str, flows_pcap: Path, tmp_path: Path, damage: Any, expected: str
) -> None:
    """A file that is bad anywhere is refused before the node sees any packet of any file."""
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(damage(flows_pcap.read_bytes()))
    line = assert_one_line_error(pfreplay(running, str(flows_pcap), str(bad)), 2)
    assert line.startswith(f"pfreplay: {bad}: ") and expected in line, line
    assert info(running)["searches"] == "0"


@pytest.mark.parametrize(
    "args",
    [
        ("--speed", "-1"),
        ("--speed", "fast"),
        ("--loop", "-2"),
        ("--limit", "0"),
        ("--batch", "0"),
        ("--batch", "70000"),
        ("--bogus",),
        (),
    ],
)
def test_bad_flags_exit_2(running: str, flows_pcap: Path, args: Sequence[str]) -> None:
    files = [str(flows_pcap)] if args else []
    assert_one_line_error(pfreplay(running, *args, *files), 2)
    assert info(running)["searches"] == "0"


def test_help() -> None:
    out = run("pfreplay", "--help")
    assert out.returncode == 0
    for flag in ("--speed", "--loop", "--limit", "--batch", "--json", "--token-file", "-N"):
        assert flag in out.stdout


# --- admin token --------------------------------------------------------------------------


def test_token(tmp_path: Path, flows_pcap: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-it\n")
    with node("--admin-token-file", str(token_file)) as (addr, _):
        refused = assert_one_line_error(pfreplay(addr, str(flows_pcap)), 1)
        assert "wants a token" in refused
        assert "wants a token" in assert_one_line_error(
            pfreplay(addr, "--token-file", str(wrong), str(flows_pcap)), 1
        )
        assert info(addr)["searches"] == "0"
        ok = pfreplay(addr, "--json", "--token-file", str(token_file), str(flows_pcap))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["sent"] == 400
        env = {**os.environ, "PFSYNC_TOKEN": "s3cret-token"}
        by_env = pfreplay(addr, "--json", "--limit", "8", str(flows_pcap), env=env)
        assert by_env.returncode == 0, by_env.stderr
        assert json.loads(by_env.stdout)["sent"] == 8
    empty = tmp_path / "empty-token"
    empty.write_text("")
    line = assert_one_line_error(
        pfreplay("127.0.0.1:1", "--token-file", str(empty), str(flows_pcap)), 2
    )
    assert "is empty" in line


# --- the same table as pfsyncd --pcap ------------------------------------------------------


# The two nodes take the capture seconds apart (more on a loaded machine): pf's short
# timeouts (icmp.error is 10 s) would expire a state on one node and not yet on the other.
LONG_TIMEOUTS = tuple(
    arg
    for name in ("tcp.first", "tcp.opening", "tcp.finwait", "tcp.closed", "udp.first")
    + ("udp.single", "udp.multiple", "icmp.first", "icmp.error")
    for arg in ("--sysctl", f"net.pf.timeout.{name}=3600")
)


def comparable_states(addr: str) -> list[dict[str, Any]]:
    """The table as JSON, without what differs between two nodes by design or by clock."""
    out = run("pfctl", "-N", addr, "-s", "states", "--json")
    assert out.returncode == 0, out.stderr
    states = json.loads(out.stdout)["states"]
    for state in states:
        for volatile in ("id", "age_seconds", "expires_in_seconds"):
            state.pop(volatile, None)
    return states


def comparable_info(document: dict[str, Any]) -> dict[str, Any]:
    keep = ("current_entries", "half_open_tcp", "searches", "inserts", "removals")
    keep += ("counters", "decoder_counters", "packets_passed", "packets_blocked")
    return {k: document.get(k) for k in keep}


@pytest.fixture
def kernel_pcap(tmp_path: Path) -> Path:
    """Real connections of the Linux stack, of every shape the tracker distinguishes."""
    path = tmp_path / "kernel.pcap"
    with traffic.isolated_loopback():
        with traffic.capture_to_pcap(path) as result:
            traffic.client_close_first()
            traffic.server_close_first()
            traffic.half_close()
            traffic.rst_abort()
            traffic.connection_refused()
            traffic.bulk_transfer(size=2 * 1024 * 1024)
            traffic.udp_exchange()
            traffic.icmp_echo()
            traffic.ipv6()
            # Two connections left open: full ESTABLISHED states, not TIME_WAIT records.
            with socket.create_server(("127.0.0.1", 0)) as listener:
                open_pairs = []
                for _ in range(2):
                    client = socket.create_connection(listener.getsockname(), timeout=2)
                    server = listener.accept()[0]
                    client.sendall(b"ping")
                    assert server.recv(4) == b"ping"
                    open_pairs.append((client, server))
    for client, server in open_pairs:
        client.close()
        server.close()
    assert result.dropped == 0
    return path


@pytest.mark.parametrize("flags", [(), ("--batch", "16")], ids=["default", "small-batches"])
def test_same_table_as_pcap_replay(kernel_pcap: Path, flags: Sequence[str]) -> None:
    with (
        node("--pcap", str(kernel_pcap), *LONG_TIMEOUTS) as (by_pcap, _),
        node(*LONG_TIMEOUTS) as (by_inject, _),
    ):
        deadline = time.monotonic() + 30
        while not all(s["done"] for s in info(by_pcap)["sources"]):
            assert time.monotonic() < deadline, "--pcap replay did not finish"
            time.sleep(0.05)
        out = pfreplay(by_inject, "--json", *flags, str(kernel_pcap))
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)

        listing_pcap = run("pfctl", "-N", by_pcap, "-s", "states").stdout
        listing_inject = run("pfctl", "-N", by_inject, "-s", "states").stdout
        assert listing_inject == listing_pcap
        assert len(listing_pcap.splitlines()) >= 10
        assert comparable_states(by_inject) == comparable_states(by_pcap)
        info_pcap, info_inject = info(by_pcap), info(by_inject)
        assert comparable_info(info_inject) == comparable_info(info_pcap)

    assert summary["sent"] == int(info_pcap["sources"][0]["frames"])
    assert summary["passed"] == int(info_pcap["packets_passed"])
    assert summary["blocked"] == int(info_pcap.get("packets_blocked", 0))
    assert summary["state_mismatch"] == counter(info_pcap, "state-mismatch") == 0
