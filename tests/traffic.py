"""Real kernel traffic for replay tests: scenarios that make connections, and a capture into pcap.

Each scenario drives plain sockets of the Linux TCP/IP stack through one connection shape and
returns a `Connection` naming its endpoints. The orderly ones end with `shutdown` and then wait
until both sockets report TCP_CLOSE, which the kernel only reaches once the last FIN has been
ACKed, so the whole close sequence is on the wire when a scenario returns. A scenario runs in the
calling thread's network namespace; `isolated_loopback()` gives a private one whose `lo` behaves
like a wire (MTU 1500, one segment per frame), free of other programs' loopback traffic.

    with isolated_loopback(), capture_to_pcap(path) as capture:
        conn = client_close_first()

Simultaneous close needs both FINs in flight at once, which loopback cannot do (delivery is
synchronous) and netem cannot help with here (the kernel has no sch_netem). `veth_pair()` puts
a token-bucket qdisc on both ends of a veth link; `simultaneous_close` queues ~50 ms of filler
datagrams on both sides and then shuts both sockets down, so each FIN waits behind the filler
while the other FIN is sent: they cross every time.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass

from pfsync.afpacket import PacketCapture
from pfsync.pcap import PcapWriter

STRAGGLER_WAIT = 0.1  # seconds to keep capturing after the traffic, for frames still queued
IO_TIMEOUT = 2.0  # no scenario step may take longer; a hang becomes an error
BULK_SNDBUF = 64 * 1024
TCP_CLOSE = 7  # tcpi_state
TCPI_OPT_WSCALE = 4  # tcpi_options bit

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Connection:
    """One connection (or datagram exchange) a scenario made.

    For ICMP echo the client "port" is the echo identifier and the server port is 0.
    """

    shape: str
    family: socket.AddressFamily
    proto: int  # socket.IPPROTO_TCP, IPPROTO_UDP or IPPROTO_ICMP
    client: tuple[str, int]
    server: tuple[str, int]


@dataclass
class CaptureResult:
    """Filled in when `capture_to_pcap` ends: frames written and frames the kernel dropped."""

    path: str
    packets: int = 0
    dropped: int = 0


@dataclass(frozen=True)
class VethPair:
    """Two namespaces joined by a veth link, each end shaped by a token-bucket qdisc."""

    netns_a: str
    netns_b: str
    if_a: str
    if_b: str
    addr_a: str
    addr_b: str
    rate_bps: int
    addr6_a: str = "fd00:199::1"
    addr6_b: str = "fd00:199::2"

    def set_rate(self, rate_bps: int) -> None:
        """Change both ends' token-bucket rate (slow for crossing FINs, fast for bulk data)."""
        for ns, ifname in ((self.netns_a, self.if_a), (self.netns_b, self.if_b)):
            tbf = f"root tbf rate {rate_bps}bit burst {_burst(rate_bps)} limit 200000"
            _run("tc", "-n", ns, "qdisc", "change", "dev", ifname, *tbf.split())


def _burst(rate_bps: int) -> int:
    """One frame of burst at slow rates; at fast ones, enough for the kernel timer's tick."""
    return max(1600, rate_bps // 8 // 250)


# --- network namespaces -------------------------------------------------------------------------


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


def _ip(*args: str) -> None:
    _run("ip", *args)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def netns(prefix: str = "pfst") -> Iterator[str]:
    """Create a network namespace with a unique name and `lo` up; delete it afterwards."""
    name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        _ip("netns", "delete", name)


@contextmanager
def entered_netns(name: str) -> Iterator[None]:
    """Move the calling thread into namespace `name` and back.

    Sockets made meanwhile stay in that namespace, and so do threads started meanwhile.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


@contextmanager
def isolated_loopback() -> Iterator[str]:
    """Run the block in a fresh namespace whose `lo` frames look like Ethernet on a wire.

    MTU 1500 and gso_max_segs 1 make the kernel hand over one TCP segment per frame, as a real
    NIC capture shows, instead of 64 KiB GSO frames.
    """
    with netns() as name:
        _ip("-n", name, "link", "set", "lo", "mtu", "1500", "gso_max_segs", "1")
        with entered_netns(name):
            yield name


@contextmanager
def veth_pair(rate_bps: int = 1_000_000) -> Iterator[VethPair]:
    """Two fresh namespaces, 10.199.0.1 and 10.199.0.2 (fd00:199::1 and ::2), joined by a veth
    link; deleted afterwards.

    Each end gets a token-bucket qdisc of `rate_bps` with a one-frame burst, so anything queued
    behind `n` bytes of earlier traffic leaves about ``8 * n / rate_bps`` seconds later.
    """
    with netns() as ns_a, netns() as ns_b:
        pair = VethPair(ns_a, ns_b, "pfveth0", "pfveth1", "10.199.0.1", "10.199.0.2", rate_bps)
        _ip("-n", ns_a, "link", "add", pair.if_a, "type", "veth", "peer", "name", pair.if_b)
        _ip("-n", ns_a, "link", "set", pair.if_b, "netns", ns_b)
        ends = (
            (ns_a, pair.if_a, pair.addr_a, pair.addr6_a),
            (ns_b, pair.if_b, pair.addr_b, pair.addr6_b),
        )
        for ns, ifname, addr, addr6 in ends:
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            _ip("-n", ns, "addr", "add", f"{addr6}/64", "dev", ifname, "nodad")
            _ip("-n", ns, "link", "set", ifname, "up", "gso_max_segs", "1")
            tbf = f"root tbf rate {rate_bps}bit burst {_burst(rate_bps)} limit 200000"
            _run("tc", "-n", ns, "qdisc", "add", "dev", ifname, *tbf.split())
        yield pair


def _socket_in(
    ns: str, family: socket.AddressFamily, kind: socket.SocketKind, proto: int = 0
) -> socket.socket:
    with entered_netns(ns):
        return socket.socket(family, kind, proto)


# Set by `across(pair)`: the scenarios then put clients in namespace A and servers in B.
_ACROSS: ContextVar[VethPair | None] = ContextVar("across", default=None)


@contextmanager
def across(pair: VethPair) -> Iterator[None]:
    """Run the scenarios called in the block across `pair`: client in A, server in B.

    Pass the server's address (``pair.addr_b`` or ``pair.addr6_b``) as the scenario's host.
    """
    token = _ACROSS.set(pair)
    try:
        yield
    finally:
        _ACROSS.reset(token)


def _new_socket(
    server_side: bool, family: socket.AddressFamily, kind: socket.SocketKind, proto: int = 0
) -> socket.socket:
    pair = _ACROSS.get()
    if pair is None:
        return socket.socket(family, kind, proto)
    return _socket_in(pair.netns_b if server_side else pair.netns_a, family, kind, proto)


def _client_host(host: str) -> str:
    """The address a client binds to: the server's own (loopback), or A's across a pair."""
    pair = _ACROSS.get()
    if pair is None:
        return host
    return pair.addr6_a if ":" in host else pair.addr_a


# --- capture ------------------------------------------------------------------------------------


@contextmanager
def capture_to_pcap(
    path: str | os.PathLike[str], ifname: str = "lo", netns: str | None = None
) -> Iterator[CaptureResult]:
    """Capture `ifname` into a pcap file while the block runs.

    The capture socket is bound before the block starts; after it, capturing goes on for
    `STRAGGLER_WAIT`, then every queued frame is written and the file is closed. The capture
    runs in the calling thread's namespace unless `netns` names another.
    """
    result = CaptureResult(os.fspath(path))
    ready, stop = threading.Event(), threading.Event()
    failures: list[BaseException] = []
    thread = threading.Thread(
        target=_capture_thread, args=(result, ifname, netns, ready, stop, failures), daemon=True
    )
    thread.start()
    if not ready.wait(IO_TIMEOUT) or failures:
        stop.set()
        thread.join()
        raise failures[0] if failures else TimeoutError(f"capture on {ifname} did not start")
    try:
        yield result
    finally:
        time.sleep(STRAGGLER_WAIT)
        stop.set()
        thread.join()
    if failures:
        raise failures[0]


def _capture_thread(
    result: CaptureResult,
    ifname: str,
    ns: str | None,
    ready: threading.Event,
    stop: threading.Event,
    failures: list[BaseException],
) -> None:
    try:
        with entered_netns(ns) if ns else nullcontext():
            capture = PacketCapture.open(ifname)
        with capture, PcapWriter(result.path, capture.linktype) as writer:
            ready.set()
            while not stop.is_set():
                select.select([capture], [], [], 0.02)
                _drain(capture, writer)
            _drain(capture, writer)
            stats = capture.stats()
            result.packets, result.dropped = stats.received, stats.dropped
    except BaseException as e:  # handed to the test thread, which re-raises it
        failures.append(e)
    finally:
        ready.set()


def _drain(capture: PacketCapture, writer: PcapWriter) -> None:
    while (record := capture.recv()) is not None:
        writer.write(record[0], record[2])


# --- TCP helpers --------------------------------------------------------------------------------


def _tcp_pair(family: socket.AddressFamily, host: str) -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) pair; the listener is gone once the server side is accepted."""
    with _new_socket(True, family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen(1)
        client = _new_socket(False, family, socket.SOCK_STREAM)
        client.settimeout(IO_TIMEOUT)
        client.connect(listener.getsockname()[:2])
        server = listener.accept()[0]
        server.settimeout(IO_TIMEOUT)
    return client, server


def established_pair(host: str = "127.0.0.1") -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) TCP pair, for captures that start after the handshake."""
    return _tcp_pair(_family(host), host)


def _describe(shape: str, client: socket.socket, server: socket.socket, proto: int) -> Connection:
    return Connection(
        shape, client.family, proto, client.getsockname()[:2], server.getsockname()[:2]
    )


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def _exchange(client: socket.socket, server: socket.socket) -> None:
    """A little request/response, so both directions carry data before the close."""
    client.sendall(b"GET /state HTTP/1.0\r\n\r\n")
    _recv_exact(server, 23)
    server.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
    _recv_exact(client, 19)


def _expect_eof(sock: socket.socket) -> None:
    if sock.recv(1) != b"":
        raise ConnectionError("expected the peer's FIN, got data")


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def _await_closed(*socks: socket.socket) -> None:
    """Wait until every socket is in TCP_CLOSE: its final FIN/ACK or RST exchange is done."""
    deadline = time.monotonic() + IO_TIMEOUT
    while any(_tcp_state(s) != TCP_CLOSE for s in socks):
        if time.monotonic() > deadline:
            raise TimeoutError(f"TCP states {[_tcp_state(s) for s in socks]} never reached CLOSE")
        time.sleep(0.001)


def _orderly(shape: str, family: socket.AddressFamily, host: str, server_first: bool) -> Connection:
    client, server = _tcp_pair(family, host)
    with client, server:
        conn = _describe(shape, client, server, socket.IPPROTO_TCP)
        _exchange(client, server)
        first, second = (server, client) if server_first else (client, server)
        first.shutdown(socket.SHUT_WR)
        _expect_eof(second)
        second.shutdown(socket.SHUT_WR)
        _expect_eof(first)
        _await_closed(client, server)
    return conn


# --- scenarios ----------------------------------------------------------------------------------


def client_close_first(host: str = "127.0.0.1") -> Connection:
    """Data both ways, then the client sends the first FIN and the server answers with its own."""
    return _orderly("client_close_first", _family(host), host, server_first=False)


def server_close_first(host: str = "127.0.0.1") -> Connection:
    """Data both ways, then the server sends the first FIN."""
    return _orderly("server_close_first", _family(host), host, server_first=True)


def ipv6(host: str = "::1") -> Connection:
    """A request/response over IPv6 with a client-first orderly close."""
    return _orderly("ipv6", socket.AF_INET6, host, server_first=False)


def half_close(host: str = "127.0.0.1") -> Connection:
    """The client shuts down its sending side; the server keeps sending, then closes."""
    client, server = _tcp_pair(_family(host), host)
    with client, server:
        conn = _describe("half_close", client, server, socket.IPPROTO_TCP)
        _exchange(client, server)
        client.shutdown(socket.SHUT_WR)
        _expect_eof(server)
        late = b"data sent after the client's FIN\n"
        server.sendall(late)
        _recv_exact(client, len(late))
        server.shutdown(socket.SHUT_WR)
        _expect_eof(client)
        _await_closed(client, server)
    return conn


def rst_abort(host: str = "127.0.0.1") -> Connection:
    """After some data the client closes with SO_LINGER 0, which sends RST instead of FIN."""
    client, server = _tcp_pair(_family(host), host)
    with server:
        with client:
            conn = _describe("rst_abort", client, server, socket.IPPROTO_TCP)
            _exchange(client, server)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            server.recv(1)
        except ConnectionResetError:
            pass
        else:
            raise ConnectionError("expected the client's RST")
        _await_closed(server)
    return conn


def bulk_transfer(size: int = 8 * 1024 * 1024, host: str = "127.0.0.1") -> Connection:
    """The client sends `size` bytes while the server reads; both SYNs carry window scaling."""
    client, server = _tcp_pair(_family(host), host)
    with client, server:
        conn = _describe("bulk_transfer", client, server, socket.IPPROTO_TCP)
        # Fewer segments in flight: with a large send buffer, segments queued on both CPUs'
        # loopback backlogs get reordered and the kernel fast-retransmits hundreds of them.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BULK_SNDBUF)
        if not _tcp_info_options(client) & TCPI_OPT_WSCALE:
            raise RuntimeError("window scaling was not negotiated (net.ipv4.tcp_window_scaling=0?)")
        counted: list[int] = []
        reader = threading.Thread(target=lambda: counted.append(_read_to_eof(server)))
        reader.start()
        client.sendall(bytes(size))
        client.shutdown(socket.SHUT_WR)
        reader.join()
        if counted != [size]:
            raise ConnectionError(f"server read {counted} bytes, expected {size}")
        server.shutdown(socket.SHUT_WR)
        _expect_eof(client)
        _await_closed(client, server)
    return conn


def _read_to_eof(sock: socket.socket) -> int:
    total = 0
    while chunk := sock.recv(1 << 16):
        total += len(chunk)
    return total


def _tcp_info_options(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[5]


def connection_refused(host: str = "127.0.0.1") -> Connection:
    """A SYN to a port with no listener, answered by RST|ACK."""
    family = _family(host)
    # Bound but not listening: the port stays ours, and the kernel still answers SYNs with RST.
    with (
        _new_socket(True, family, socket.SOCK_STREAM) as closed,
        _new_socket(False, family, socket.SOCK_STREAM) as client,
    ):
        closed.bind((host, 0))
        client.bind(
            (_client_host(host), 0)
        )  # an explicit bind keeps the client port readable after the failure
        client.settimeout(IO_TIMEOUT)
        conn = Connection(
            "connection_refused",
            family,
            socket.IPPROTO_TCP,
            client.getsockname()[:2],
            closed.getsockname()[:2],
        )
        try:
            client.connect(closed.getsockname()[:2])
        except ConnectionRefusedError:
            return conn
    raise ConnectionError("connect to a closed port succeeded")


def udp_exchange(host: str = "127.0.0.1") -> Connection:
    """One UDP datagram each way."""
    family = _family(host)
    with (
        _new_socket(True, family, socket.SOCK_DGRAM) as server,
        _new_socket(False, family, socket.SOCK_DGRAM) as client,
    ):
        for sock, bind_to in ((server, host), (client, _client_host(host))):
            sock.bind((bind_to, 0))
            sock.settimeout(IO_TIMEOUT)
        client.sendto(b"query", server.getsockname())
        data, peer = server.recvfrom(2048)
        server.sendto(data.upper(), peer)
        client.recvfrom(2048)
        return Connection(
            "udp_exchange",
            family,
            socket.IPPROTO_UDP,
            client.getsockname()[:2],
            server.getsockname()[:2],
        )


def icmp_echo(host: str = "127.0.0.1") -> Connection:
    """An ICMP echo request from a raw socket, and the kernel's echo reply."""
    ident = secrets.randbits(16)
    request = _icmp_echo_request(ident, seq=1, payload=b"pfsync icmp echo")
    with _new_socket(False, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.sendto(request, (host, 0))
        while True:  # a raw socket also sees the request itself come back in on lo
            packet = sock.recv(2048)
            icmp = packet[(packet[0] & 0x0F) * 4 :]
            if icmp[0] == 0 and struct.unpack_from("!H", icmp, 4)[0] == ident:
                return Connection(
                    "icmp_echo",
                    socket.AF_INET,
                    socket.IPPROTO_ICMP,
                    (_client_host(host), ident),
                    (host, 0),
                )


def _icmp_echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, _inet_checksum(header + payload), ident, seq) + payload


def _inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def simultaneous_close(pair: VethPair, filler_bytes: int = 6000) -> Connection:
    """Both ends send FIN before either FIN arrives, so the FINs cross on the veth link.

    The client lives in namespace A, the server in B. Just before the close each side queues
    `filler_bytes` of UDP in its own qdisc; the two shutdowns, microseconds apart, then queue
    the FINs behind it, and neither FIN reaches its peer before the other FIN has been sent.
    """
    family = socket.AF_INET
    listener = _socket_in(pair.netns_b, family, socket.SOCK_STREAM)
    client = _socket_in(pair.netns_a, family, socket.SOCK_STREAM)
    filler_a = _socket_in(pair.netns_a, family, socket.SOCK_DGRAM)
    sink_b = _socket_in(pair.netns_b, family, socket.SOCK_DGRAM)
    filler_b = _socket_in(pair.netns_b, family, socket.SOCK_DGRAM)
    sink_a = _socket_in(pair.netns_a, family, socket.SOCK_DGRAM)
    with listener, client, filler_a, sink_b, filler_b, sink_a:
        listener.bind((pair.addr_b, 0))
        listener.listen(1)
        sink_a.bind((pair.addr_a, 0))
        sink_b.bind((pair.addr_b, 0))
        client.settimeout(IO_TIMEOUT)
        client.connect(listener.getsockname())
        server = listener.accept()[0]
        with server:
            server.settimeout(IO_TIMEOUT)
            conn = _describe("simultaneous_close", client, server, socket.IPPROTO_TCP)
            _exchange(client, server)
            for filler, sink in ((filler_a, sink_b), (filler_b, sink_a)):
                for offset in range(0, filler_bytes, 1000):
                    filler.sendto(bytes(min(1000, filler_bytes - offset)), sink.getsockname())
            client.shutdown(socket.SHUT_WR)
            server.shutdown(socket.SHUT_WR)
            _expect_eof(client)
            _expect_eof(server)
            _await_closed(client, server)
    return conn


def udp_one_way(host: str = "127.0.0.1", datagrams: int = 3) -> Connection:
    """Datagrams from the client to a bound server socket that never answers."""
    family = _family(host)
    with (
        _new_socket(True, family, socket.SOCK_DGRAM) as server,
        _new_socket(False, family, socket.SOCK_DGRAM) as client,
    ):
        server.bind((host, 0))
        server.settimeout(IO_TIMEOUT)
        client.bind((_client_host(host), 0))
        for _ in range(datagrams):
            client.sendto(b"one way", server.getsockname()[:2])
            server.recvfrom(2048)
        return Connection(
            "udp_one_way",
            family,
            socket.IPPROTO_UDP,
            client.getsockname()[:2],
            server.getsockname()[:2],
        )


def time_wait_reuse(host: str = "127.0.0.1", count: int = 5) -> list[Connection]:
    """`count` short connections between the same two ports, one after the other.

    The server closes first, so the server side holds TIME_WAIT and each new SYN from the
    same client port meets it there (RFC 1122's SYN in TIME_WAIT: the server reopens).
    """
    family = _family(host)
    conns: list[Connection] = []
    with _new_socket(True, family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(4)
        client_addr = (_client_host(host), 0)
        for _ in range(count):
            client = _new_socket(False, family, socket.SOCK_STREAM)
            with client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                client.bind(client_addr)
                client.settimeout(IO_TIMEOUT)
                client_addr = client.getsockname()[:2]
                client.connect(listener.getsockname()[:2])
                server = listener.accept()[0]
                with server:
                    server.settimeout(IO_TIMEOUT)
                    conns.append(_describe("time_wait_reuse", client, server, socket.IPPROTO_TCP))
                    _exchange(client, server)
                    server.shutdown(socket.SHUT_WR)
                    _expect_eof(client)
                    client.shutdown(socket.SHUT_WR)
                    _expect_eof(server)
                    _await_closed(client)
    return conns


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
