"""Real pfsyncd nodes for the pfsync tests: processes on loopback ports chosen at run time,
read through the real console scripts (pfctl, pfsysctl) and real gRPC calls.

    with NodeSet(tmp_path) as nodes:
        a, b = nodes.pair()
        a.inject(frames)
        wait_for(lambda: a.listing() == b.listing())

Every node a NodeSet started is killed when the block ends, whatever happened in it.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pfsync.pcap import read_capture
from pfsync.tls import channel_credentials
from pfsync.v1 import control_pb2 as pb
from pfsync.v1 import control_pb2_grpc, sysctl_pb2_grpc
from pfsync.v1 import sysctl_pb2 as spb
from tests.certs import Pem, make_cert
from tools.client import message_to_dict

BIN = Path(sys.executable).parent
SYNC_SERVICE = "pfsync.v1.SyncService"
# Loopback TIME_WAIT would end after 2 s; the tests compare TIME_WAIT records, so keep them.
KEEP_TIME_WAIT = "net.inet.tcp.mslt.loopback=600"
INJECT_BATCH = 4096

T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], T],
    timeout: float = 15.0,
    interval: float = 0.1,
    what: str = "",
    detail: Callable[[], object] | None = None,
) -> T:
    """Poll ``condition`` until it returns something true; AssertionError at the deadline
    (with ``detail()`` in its message, to show what the nodes said)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            more = f": {detail()}" if detail is not None else ""
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what or condition}{more}"
            )
        time.sleep(interval)


# "age 00:00:01, expires in 00:00:29, " differs between two nodes by the time they read it.
_TIMES = re.compile(r"age \d+:\d\d:\d\d, expires in \d+:\d\d:\d\d, ")
_COUNTS = re.compile(r"\d+:\d+ pkts, \d+:\d+ bytes")


class SyncNode:
    """One pfsyncd process: its addresses, its flags, and the tools that read it."""

    def __init__(
        self, workdir: Path, name: str, hostid: str, sync_port: int, args: Sequence[str]
    ) -> None:
        self.name, self.hostid = name, hostid
        self.control = f"127.0.0.1:{free_port()}"
        self.sync = f"127.0.0.1:{sync_port}"
        self.args = list(args)
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None

    # ---- life cycle ---------------------------------------------------------------------

    def start(self, *extra: str, wait: bool = True) -> SyncNode:
        """Start the process (again), and wait until its control API answers."""
        argv = [
            str(BIN / "pfsyncd"),
            "--hostid",
            self.hostid,
            "--control",
            self.control,
            "--sync-listen",
            self.sync,
            "--sysctl",
            KEEP_TIME_WAIT,
            *self.args,
            *extra,
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            wait_for(self._answers, 20, what=f"{self.name}'s control API ({self.log})")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited {self.proc.returncode}: {self.log_text()}")
        return self.pfctl("-s", "sync", check=False).returncode == 0

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """kill -9 and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_channel()

    def terminate(self, timeout: float = 10) -> int:
        """SIGTERM; returns the exit status."""
        assert self.proc is not None
        self.proc.terminate()
        status = self.proc.wait(timeout)
        self._close_channel()
        return status

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    # ---- console scripts ----------------------------------------------------------------

    def _tls(self) -> dict[str, str]:
        """The node's --tls-cert/--tls-key/--tls-ca, which also guard its control API: the
        tools present the same certificate (the CA requires one of every client)."""
        return {
            flag: self.args[i + 1]
            for i, flag in enumerate(self.args[:-1])
            if flag in ("--tls-cert", "--tls-key", "--tls-ca")
        }

    def tool(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a console script against this node."""
        tls = [part for flag, path in self._tls().items() for part in (flag, path)]
        out = subprocess.run(
            [str(BIN / tool), "-N", self.control, *tls, *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check:
            assert out.returncode == 0, f"{tool} {args}: {out.stderr}"
        return out

    def pfctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.tool("pfctl", *args, check=check)

    def sync_status(self) -> dict[str, Any]:
        """``pfctl -s sync --json``."""
        return dict(json.loads(self.pfctl("-s", "sync", "--json").stdout)["sync"])

    def info(self) -> dict[str, Any]:
        """``pfctl -s info --json``."""
        return dict(json.loads(self.pfctl("-s", "info", "--json").stdout)["info"])

    def counter(self, name: str) -> int:
        """One of pf's counters (``pfctl -s info``: state-mismatch, match, ...)."""
        counters = {c["name"]: int(c["value"]) for c in self.info()["counters"]}
        return counters[name]

    def entries(self) -> int:
        """States plus TIME_WAIT records, as listed by ``pfctl -s states``."""
        return len(json.loads(self.pfctl("-s", "states", "--json").stdout)["states"])

    def listing(self, counters: bool = True) -> list[str]:
        """``pfctl -s states -vv``, one block per state, sorted, without the two times
        that depend on the moment of reading (age, expires in). ``counters=False`` drops
        the packet and byte counts too: pfsync's compressed updates carry none, so each
        node counts the packets it saw itself, as pf does."""
        blocks: list[str] = []
        for line in self.pfctl("-s", "states", "-vv").stdout.splitlines():
            if line.startswith("   ") and blocks:
                line = _TIMES.sub("", line)
                if not counters:
                    line = _COUNTS.sub("", line)
                blocks[-1] += "\n" + line
            elif line.strip():
                blocks.append(line)
        return sorted(blocks)

    def stats(self) -> dict[str, int]:
        """``net.inet.pfsync.stats`` read with pfsysctl, without its prefix."""
        out = self.tool("pfsysctl", "net.inet.pfsync.stats").stdout
        prefix = "net.inet.pfsync.stats."
        fields = {}
        for line in out.splitlines():
            name, _, value = line.partition(" = ")
            fields[name.removeprefix(prefix)] = int(value)
        return fields

    def sysctl(self, *assignments: str) -> subprocess.CompletedProcess[str]:
        return self.tool("pfsysctl", "-w", *assignments, check=False)

    def digest(self) -> str:
        return str(self.sync_status()["digest"])

    # ---- gRPC (for polling: a console script costs half a second to start) ---------------

    def status(self) -> dict[str, Any]:
        """GetSyncStatus, as ``pfctl -s sync --json`` shows it."""
        stub = control_pb2_grpc.ControlServiceStub(self.channel())
        try:
            return message_to_dict(stub.GetSyncStatus(pb.GetSyncStatusRequest(), timeout=10))
        except grpc.RpcError:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} died (exit {self.proc.returncode}): {self.log_text()[-2000:]}"
                ) from None
            raise

    def ready(self) -> bool:
        return bool(self.status()["ready"])

    def stat(self, field: str) -> int:
        """One field of net.inet.pfsync.stats (GetSysctl)."""
        stub = sysctl_pb2_grpc.SysctlServiceStub(self.channel())
        node = stub.GetSysctl(spb.GetSysctlRequest(name="net.inet.pfsync.stats"), timeout=10)
        return next(f.value for f in node.node.fields.fields if f.name == field)

    def count_states(self) -> int:
        """States plus TIME_WAIT records (ListStates)."""
        stub = control_pb2_grpc.ControlServiceStub(self.channel())
        return sum(len(r.states) for r in stub.ListStates(pb.ListStatesRequest(), timeout=10))

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            tls = self._tls()
            if tls:
                credentials = channel_credentials(
                    Path(tls["--tls-ca"]), Path(tls["--tls-cert"]), Path(tls["--tls-key"])
                )
                self._channel = grpc.secure_channel(self.control, credentials)
            else:
                self._channel = grpc.insecure_channel(self.control)
        return self._channel

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def inject(self, frames: Iterable[bytes], linktype: int = 1) -> pb.InjectResponse:
        """Feed frames through ControlService.Inject (one call per INJECT_BATCH frames);
        returns the last reply."""
        stub = control_pb2_grpc.ControlServiceStub(self.channel())
        batch = [pb.Frame(linktype=linktype, data=f) for f in frames]
        reply = pb.InjectResponse()
        for i in range(0, len(batch), INJECT_BATCH):
            reply = stub.Inject(pb.InjectRequest(frames=batch[i : i + INJECT_BATCH]), timeout=30)
        return reply

    def health(self, service: str = SYNC_SERVICE) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel())
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


class NodeSet:
    """Nodes made for one test; all killed when the ``with`` block ends."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: list[SyncNode] = []

    def __enter__(self) -> NodeSet:
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)  # a stopped node must die too
            node.kill()

    def make(
        self, name: str, hostid: str, args: Sequence[str] = (), sync_port: int | None = None
    ) -> SyncNode:
        """A node not started yet (so its addresses can be handed to others first)."""
        node = SyncNode(self.workdir, name, hostid, sync_port or free_port(), args)
        self.nodes.append(node)
        return node

    def mesh(self, count: int, args: Sequence[str] = (), start: bool = True) -> list[SyncNode]:
        """``count`` nodes, each with every other one as --peer (a full mesh)."""
        nodes = [
            self.make(f"node{i}", f"{0xA0000001 + i * 0x01010101:08x}", args) for i in range(count)
        ]
        for node in nodes:
            for other in nodes:
                if other is not node:
                    node.args += ["--peer", other.sync]
        if start:
            for node in nodes:
                node.start()
        return nodes


def converged(nodes: Sequence[SyncNode]) -> bool:
    """Equal digests everywhere, each node's connected peers agreeing with it (a node
    compares only while no frames are in flight either way)."""
    statuses = [n.status() for n in nodes]
    if len({s["digest"] for s in statuses}) != 1:
        return False
    for status in statuses:
        up = [p for p in status.get("peers", []) if p.get("connected")]
        if len(up) != len(nodes) - 1 or not all(p.get("digest_agrees") for p in up):
            return False
    return True


def sync_report(nodes: Sequence[SyncNode]) -> str:
    """What each node says of its sync (for failure messages)."""
    lines = []
    for n in nodes:
        s = n.status() if n.alive else {}
        lines.append(f"{n.name}: entries={n.count_states() if n.alive else '-'} {s}")
    return "\n".join(lines)


def capture_frames(path: Path) -> list[tuple[int, bytes]]:
    """(linktype, frame) of every record of a capture file."""
    return [(linktype, frame) for _, linktype, frame in read_capture(path)]


def frames_only(records: Iterable[tuple[int, bytes]]) -> Iterator[bytes]:
    for linktype, frame in records:
        assert linktype == 1, "the tests' captures are Ethernet"
        yield frame


def established(count: int, host: str = "127.0.0.1") -> list[socket.socket]:
    """``count`` real kernel TCP connections with data both ways, left open (ESTABLISHED
    in a capture made meanwhile); the caller closes the sockets."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen(count)
        for _ in range(count):
            client = socket.create_connection(listener.getsockname()[:2], timeout=2)
            server, _ = listener.accept()
            server.settimeout(2)
            client.sendall(b"hello")
            assert server.recv(5) == b"hello"
            server.sendall(b"world")
            assert client.recv(5) == b"world"
            socks += [client, server]
    return socks


def close_all(socks: Iterable[socket.socket]) -> None:
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        sock.close()


def flow_of(frame: bytes) -> tuple[int, frozenset[tuple[bytes, int]]] | None:
    """The connection an Ethernet frame belongs to (either direction), or None."""
    ethertype = int.from_bytes(frame[12:14], "big")
    ip = frame[14:]
    if ethertype == 0x0800:
        proto, src, dst, l4 = ip[9], ip[12:16], ip[16:20], ip[(ip[0] & 0x0F) * 4 :]
    elif ethertype == 0x86DD:
        proto, src, dst, l4 = ip[6], ip[8:24], ip[24:40], ip[40:]
    else:
        return None
    if proto in (6, 17):
        ports = (int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big"))
    else:
        ports = (int.from_bytes(l4[4:6], "big"), 0)  # ICMP echo id
    return proto, frozenset({(src, ports[0]), (dst, ports[1])})


def split_flows(frames: Iterable[bytes]) -> list[list[bytes]]:
    """Frames grouped by connection, each group in capture order."""
    flows: dict[object, list[bytes]] = {}
    for frame in frames:
        flows.setdefault(flow_of(frame), []).append(frame)
    return [group for key, group in flows.items() if key is not None]


def client_side(frame: bytes, first: bytes) -> bool:
    """Whether ``frame`` travels in the direction of ``first`` (its flow's first frame)."""
    ethertype = int.from_bytes(frame[12:14], "big")
    span = slice(26, 30) if ethertype == 0x0800 else slice(22, 38)
    return frame[span] == first[span]


class LinkCut:
    """A TCP relay standing for the network between two peers: the test cuts it (every
    connection through it closes and new ones are refused) and mends it."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._up = threading.Event()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> LinkCut:
        self.mend()
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.cut()
        self._thread.join(5)

    def cut(self) -> None:
        """Close every relayed connection; new ones are closed as they arrive."""
        self._up.clear()
        with self._lock:
            for sock in self._conns:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._conns.clear()

    def mend(self) -> None:
        """Relay connections again."""
        self._up.set()

    def _serve(self) -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", self.port))
            listener.listen(16)
            listener.settimeout(0.05)
            self._ready.set()
            while not self._stop.is_set():
                try:
                    inside, _ = listener.accept()
                except (TimeoutError, OSError):
                    continue
                if not self._up.is_set():
                    inside.close()
                    continue
                try:
                    outside = socket.create_connection(self.target, timeout=2)
                except OSError:
                    inside.close()
                    continue
                outside.settimeout(None)
                inside.settimeout(None)
                with self._lock:
                    self._conns += [inside, outside]
                for one, other in ((inside, outside), (outside, inside)):
                    threading.Thread(target=_pipe, args=(one, other), daemon=True).start()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def tls_flags(workdir: Path, ca: Pem, name: str) -> list[str]:
    """The pfsyncd TLS flags of a node certificate named ``name`` (CN and DNS SAN, IP SAN
    127.0.0.1 so a dialer can check the listener it reached) signed by ``ca``."""
    node = make_cert(ca, workdir, name, ips=["127.0.0.1"])
    return ["--tls-cert", str(node.cert), "--tls-key", str(node.key), "--tls-ca", str(ca.cert)]
