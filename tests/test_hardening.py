"""Issue 7 (hardening), items 1-7 and 13: each reproduced through the real interface first
(a real pfsyncd process, the real console scripts, real signals, a real truncated file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pfsync import pcap
from pfsync.pcap import PcapngWriter, PcapWriter, read_capture
from tests.packets import udp
from tests.test_e2e import BIN, free_port, pfctl

LOCAL = "127.0.0.1"


def wait_ready(addr: str, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    """Wait until the node answers GetInfo (fail early if it died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pfsyncd exited {proc.returncode}: {proc.stderr.read()}")
        if pfctl(addr, "-s", "info").returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("node did not come up")


@contextmanager
def running(*args: str, addr: str | None = None) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A real pfsyncd on a run-time port; stopped (SIGTERM) and reaped afterwards."""
    addr = addr or f"{LOCAL}:{free_port()}"
    proc = subprocess.Popen(
        [BIN / "pfsyncd", "--control", addr, *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(addr, proc)
        yield addr, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(15)
        proc.stderr.close()


def info(addr: str, *extra: str) -> dict:
    out = pfctl(addr, "-s", "info", "--json", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["info"]


def slow_capture(path: Path, frames: int, spacing: float, payload: int = 1400) -> None:
    """A capture of UDP flows (256 of them) at ``spacing`` seconds per frame."""
    templates = [udp(f"10.9.{i}.1", "10.8.0.1", 2000 + i, 53, b"p" * payload) for i in range(256)]
    with PcapWriter(path) as w:
        for n in range(frames):
            w.write(n * spacing, templates[n % 256])


# ---- item 2: a capture that shrinks or grows under a replay -------------------------------


def test_truncating_a_capture_during_replay_keeps_the_node(tmp_path: Path) -> None:
    """Was SIGBUS (exit 135, every state lost): the reader mmapped the file."""
    path = tmp_path / "slow.pcap"
    slow_capture(path, 20000, 0.001)  # 29 MB over 20 s, read 1 MiB (~700 frames) at a time
    with running("--pcap", str(path), "--replay-speed", "1") as (addr, proc):
        time.sleep(1.5)
        os.truncate(path, 1000)
        deadline = time.monotonic() + 10
        while not info(addr)["sources"][0]["done"]:
            assert time.monotonic() < deadline, "replay did not end"
            time.sleep(0.1)
        now = info(addr)
        assert proc.poll() is None
        assert "shrank to" in now["sources"][0]["error"]
        assert int(now["current_entries"]) == 256  # every flow seen before the cut is kept
        proc.terminate()
        assert proc.wait(10) == 1  # a failed source
        lines = proc.stderr.read().splitlines()
    assert sum("shrank" in line for line in lines) == 1, lines
    assert not any("Traceback" in line for line in lines)


def test_growing_a_capture_during_replay_reads_to_its_new_end(tmp_path: Path) -> None:
    path = tmp_path / "grow.pcap"
    slow_capture(path, 4000, 0.0005)  # 2 s of replay
    extra = tmp_path / "extra.pcap"
    slow_capture(extra, 100, 0.0005)
    with running("--pcap", str(path), "--replay-speed", "1") as (addr, proc):
        with path.open("ab") as f:
            f.write(extra.read_bytes()[24:])  # records only, no second file header
        deadline = time.monotonic() + 15
        while not info(addr)["sources"][0]["done"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        source = info(addr)["sources"][0]
        assert source["error"] == "" and int(source["frames"]) == 4100
        assert proc.poll() is None


@pytest.mark.parametrize("writer", [PcapWriter, PcapngWriter])
def test_records_straddling_read_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: type
) -> None:
    """Tiny read chunks put nearly every record across a chunk boundary: same records."""
    path = tmp_path / "c.cap"
    frames = [udp("10.0.0.1", "10.0.0.2", 1000 + n, 53, b"y" * (n % 50)) for n in range(300)]
    with writer(path) as w:
        for n, frame in enumerate(frames):
            w.write(n * 0.5, frame)
    whole = list(read_capture(path))
    monkeypatch.setattr(pcap, "READ_CHUNK", 7)
    assert list(read_capture(path)) == whole
    assert [f for _, _, f in whole] == frames


def one_line_failure(argv: list[str], code: int = 2) -> str:
    """Run pfsyncd expecting it to refuse to start; return its single stderr line."""
    proc = subprocess.run([BIN / "pfsyncd", *argv], capture_output=True, text=True, timeout=30)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pfsyncd: "), proc.stderr
    return lines[0]


# ---- item 1: an empty admin token must not make everyone admin ----------------------------


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_admin_token_file_refuses_to_start(tmp_path: Path, content: str) -> None:
    token = tmp_path / "admin.token"
    token.write_text(content)
    line = one_line_failure(["--admin-token-file", str(token), "--control", f"{LOCAL}:0"])
    assert "admin token file is empty" in line


def test_bare_bearer_header_is_not_admin(tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    token.write_text("s3cret\n")
    with running("--admin-token-file", str(token)) as (addr, _):
        env = {**os.environ, "PFSYNC_TOKEN": " "}
        out = subprocess.run(
            [BIN / "pfctl", "-N", addr, "-F", "states"], capture_output=True, text=True, env=env
        )
        assert out.returncode == 1 and "wants a token" in out.stderr
        ok = subprocess.run(
            [BIN / "pfctl", "-N", addr, "-F", "states", "--token-file", str(token)],
            capture_output=True,
            text=True,
        )
        assert ok.returncode == 0, ok.stderr


# ---- item 4: signals ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_exit_after_replay(tmp_path: Path, sig: signal.Signals) -> None:
    """Were ignored until the replay ended (serve waited on the replay tasks only)."""
    path = tmp_path / "long.pcap"
    slow_capture(path, 1000, 1.0, payload=10)  # 1000 s at real time
    with running("--pcap", str(path), "--replay-speed", "1", "--exit-after-replay") as (_, proc):
        proc.send_signal(sig)
        assert proc.wait(5) == 0


def test_sighup_reloads_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('limit_states = 5000\n[sysctl]\n"net.pf.timeout.udp.first" = 61\n')
    with running("--config", str(config)) as (addr, proc):
        pfsysctl = [BIN / "pfsysctl", "-N", addr, "-n", "net.pf.limit.states"]
        config.write_text('limit_states = 7000\n[sysctl]\n"net.pf.timeout.udp.first" = 62\n')
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while subprocess.run(pfsysctl, capture_output=True, text=True).stdout.strip() != "7000":
            assert time.monotonic() < deadline, "limit not reloaded"
            time.sleep(0.1)
        udp_first = [BIN / "pfsysctl", "-N", addr, "-n", "net.pf.timeout.udp.first"]
        assert subprocess.run(udp_first, capture_output=True, text=True).stdout.strip() == "62"
        # A broken file on the next SIGHUP is logged and ignored: the node keeps running.
        config.write_text("limit_states = 0\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None
        assert subprocess.run(pfsysctl, capture_output=True, text=True).stdout.strip() == "7000"
        proc.terminate()
        assert proc.wait(10) == 0
        log = proc.stderr.read()
    assert "SIGHUP: config reloaded (" in log and "net.pf.limit.states 5000 -> 7000" in log
    assert "SIGHUP: config not reloaded: invalid setting limit_states" in log
    assert "Traceback" not in log


# ---- item 5: start-up failures are one line -------------------------------------------------


def test_control_address_failures_are_one_line(tmp_path: Path) -> None:
    with running() as (addr, _):
        assert "Address already in use" in one_line_failure(["--control", addr], 1)
    assert "cannot resolve" in one_line_failure(["--control", "no-such-host.invalid:7070"], 1)
    # TEST-NET-1: an address no interface of this machine has.
    assert "Cannot assign" in one_line_failure(["--control", "192.0.2.1:7070"], 1)


def test_unusable_token_files_are_one_line(tmp_path: Path) -> None:
    assert "Is a directory" in one_line_failure(["--admin-token-file", str(tmp_path)])
    binary = tmp_path / "binary.token"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "not UTF-8" in one_line_failure(["--admin-token-file", str(binary)])
    spaced = tmp_path / "spaced.token"
    spaced.write_text("two words")
    assert "printable ASCII" in one_line_failure(["--read-token-file", str(spaced)])
    missing = tmp_path / "missing.token"
    assert "No such file" in one_line_failure(["--admin-token-file", str(missing)])


# ---- item 6: IPv6 loopback is loopback ----------------------------------------------------


def test_admin_calls_from_ipv6_loopback(tmp_path: Path) -> None:
    with running(addr=f"[::1]:{free_port()}") as (addr, _):
        out = pfctl(addr, "-F", "states")
        assert out.returncode == 0 and "0 states cleared" in out.stderr, out.stderr


# ---- item 7: one range for the state limit ---------------------------------------------------


def test_limit_states_flag_has_the_sysctl_range() -> None:
    assert "limit_states" in one_line_failure(["--limit-states", "10000000000"])
    assert "limit_states" in one_line_failure(["--limit-states", "0"])
    with running("--limit-states", str((1 << 31) - 1)) as (addr, _):
        out = pfctl(addr, "-s", "memory")
        assert out.returncode == 0 and "2147483647" in out.stdout, out.stderr


# ---- item 13: hostid in TOML, sysctl integers ----------------------------------------------


def test_toml_hostid_integer_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("hostid = 12345\n")
    line = one_line_failure(["--config", str(config)])
    assert 'hostid = "3039"' in line  # says how to write it
    config.write_text('hostid = "3039"\n')
    with running("--config", str(config)) as (addr, _):
        assert int(info(addr)["hostid"], 16) == 0x3039  # 8 hex digits on the wire


def test_sysctl_integers_are_ascii_and_errors_short() -> None:
    with running() as (addr, _):
        base = [BIN / "pfsysctl", "-N", addr, "-w"]
        arabic = subprocess.run(
            [*base, "net.pf.limit.states=\u0661\u0662\u0663"], capture_output=True, text=True
        )
        assert arabic.returncode == 2 and "is not an integer" in arabic.stderr
        huge = subprocess.run(
            [*base, "net.pf.limit.states=" + "9" * 5000], capture_output=True, text=True
        )
        assert huge.returncode == 2 and "..." in huge.stderr and len(huge.stderr) < 200
        big = subprocess.run(
            [*base, "net.pf.limit.states=" + "9" * 1000], capture_output=True, text=True
        )
        assert big.returncode == 2 and "out of range" in big.stderr and len(big.stderr) < 200
        under = subprocess.run([*base, "net.pf.limit.states=1_000"], capture_output=True, text=True)
        assert under.returncode == 2
        ok = subprocess.run([*base, "net.pf.limit.states=0x100"], capture_output=True, text=True)
        assert ok.returncode == 0 and "-> 256" in ok.stdout
