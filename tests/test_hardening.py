"""Issue 7 (hardening), items 1-7 and 13: each reproduced through the real interface first
(a real pfsyncd process, the real console scripts, real signals, a real truncated file)."""

from __future__ import annotations

import json
import os
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
