"""A real `pfsyncd --capture` process inside a network namespace, read only through `pfctl`.

    with live_node(pair.netns_b, pair.if_b) as node:
        ... traffic ...
        states = node.states()      # pfctl -s states --json
        info = node.info()          # pfctl -s info --json

The node's control API listens on 127.0.0.1 inside the namespace; `pfctl` runs there too
(``ip netns exec``), so nothing of the node is imported: the tests see what a user sees.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
START_TIMEOUT = 30.0  # a loaded 2-core machine starts a Python gRPC node in a few seconds


@dataclass
class LiveNode:
    """A running node: its namespace, control address, process and log file."""

    netns: str
    control: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)

    def pfctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run pfctl against this node, in its namespace."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, BIN / "pfctl", "-N", self.control, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def _json(self, *args: str) -> dict[str, Any]:
        out = self.pfctl(*args, "--json")
        if out.returncode:
            raise AssertionError(f"pfctl {' '.join(args)}: {out.stderr.strip()}\n{self.log()}")
        document: dict[str, Any] = json.loads(out.stdout)
        return document

    def states(self) -> list[dict[str, Any]]:
        """Every state and TIME_WAIT record, as `pfctl -s states --json` gives them."""
        states: list[dict[str, Any]] = self._json("-s", "states")["states"]
        return states

    def info(self) -> dict[str, Any]:
        """`pfctl -s info --json`'s info object."""
        info: dict[str, Any] = self._json("-s", "info")["info"]
        return info

    def sync(self) -> dict[str, Any]:
        """`pfctl -s sync --json`'s sync object."""
        sync: dict[str, Any] = self._json("-s", "sync")["sync"]
        return sync

    def counter(self, name: str) -> int:
        """One of pf's PFRES counters (`state-mismatch`, `match`, ...)."""
        return int(next(c["value"] for c in self.info()["counters"] if c["name"] == name))

    def log(self) -> str:
        """What the node wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")


def _free_port() -> int:
    # The node lives in a fresh namespace where every port is free; avoid the well-known ones.
    return random.randint(20000, 60000)


@contextmanager
def live_node(
    netns: str,
    *capture: str,
    args: tuple[str, ...] = (),
    log_dir: Path | None = None,
    exit_code: int = 0,
) -> Iterator[LiveNode]:
    """Start ``pfsyncd --capture IFACE...`` in `netns`; wait until `pfctl -s info` answers.

    The node is stopped with SIGTERM afterwards and must exit with `exit_code` (1 when one
    of its sources failed).
    """
    control = f"127.0.0.1:{_free_port()}"
    argv = [str(BIN / "pfsyncd"), "--control", control]
    for ifname in capture:
        argv += ["--capture", ifname]
    argv += list(args)
    log_path = Path(log_dir or "/tmp") / f"pfsyncd-{netns}-{os.getpid()}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv], stdout=log_file, stderr=subprocess.STDOUT
        )
    node = LiveNode(netns, control, proc, log_path, argv)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while node.pfctl("-s", "info").returncode:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"node did not start: {node.log()}")
            time.sleep(0.1)
        yield node
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                code = proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        else:
            code = proc.returncode
        assert code == exit_code, f"node exited {code}: {node.log()}"


def poll(check: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    """Call `check()` until it returns something true; return it, or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s")
        time.sleep(interval)
