"""Live capture and real kernel traffic: each scenario's pcap has the shape its name promises."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pfsync.afpacket import InterfaceError, PacketCapture
from pfsync.pcap import read_capture
from statetable.decode import LINKTYPE_ETHERNET
from tests import traffic
from tests.traffic import Connection

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
TCPOPT_WSCALE = 3


@dataclass(frozen=True)
class Segment:
    """The fields of one captured packet that the shape checks look at."""

    from_client: bool
    proto: int
    flags: int = 0
    seq: int = 0
    ack: int = 0
    payload: int = 0
    options: bytes = b""
    icmp_type: int = -1

    def has(self, flags: int) -> bool:
        return self.flags & flags == flags


def packets_of(path: Path, conn: Connection) -> list[Segment]:
    """Decode the packets of `conn` (either direction) from an Ethernet pcap, in capture order."""
    client = (ipaddress.ip_address(conn.client[0]), conn.client[1])
    server = (ipaddress.ip_address(conn.server[0]), conn.server[1])
    segments = []
    for _ts, linktype, frame in read_capture(path):
        assert linktype == LINKTYPE_ETHERNET
        decoded = _decode(frame)
        if decoded is None or decoded[0] != conn.proto:
            continue
        proto, src_addr, dst_addr, segment = decoded
        if proto == socket.IPPROTO_ICMP:  # no ports: match the echo identifier
            if struct.unpack_from("!H", segment, 4)[0] == conn.client[1]:
                segments.append(Segment(segment[0] == 8, proto, icmp_type=segment[0]))
            continue
        src, dst = (src_addr, _port(segment, 0)), (dst_addr, _port(segment, 2))
        if (src, dst) in ((client, server), (server, client)):
            segments.append(_segment(src == client, proto, segment))
    return segments


def _port(segment: bytes, offset: int) -> int:
    port: int = struct.unpack_from("!H", segment, offset)[0]
    return port


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _decode(frame: bytes) -> tuple[int, Address, Address, bytes] | None:
    """(protocol, source, destination, transport segment) of an IP-in-Ethernet frame."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    ip = frame[14:]
    if ethertype == ETH_IPV4:
        end = struct.unpack_from("!H", ip, 2)[0]
        src, dst = ipaddress.ip_address(ip[12:16]), ipaddress.ip_address(ip[16:20])
        return ip[9], src, dst, ip[(ip[0] & 0x0F) * 4 : end]
    if ethertype == ETH_IPV6:  # loopback traffic carries no extension headers
        end = 40 + struct.unpack_from("!H", ip, 4)[0]
        return ip[6], ipaddress.ip_address(ip[8:24]), ipaddress.ip_address(ip[24:40]), ip[40:end]
    return None


def _segment(from_client: bool, proto: int, segment: bytes) -> Segment:
    if proto == socket.IPPROTO_UDP:
        return Segment(from_client, proto, payload=len(segment) - 8)
    seq, ack, offset_byte, flags = struct.unpack_from("!IIBB", segment, 4)
    header_len = (offset_byte >> 4) * 4
    return Segment(
        from_client, proto, flags, seq, ack, len(segment) - header_len, segment[20:header_len]
    )


def tcp_options(options: bytes) -> dict[int, bytes]:
    """Option kind -> value, for a TCP options field."""
    found, pos = {}, 0
    while pos < len(options):
        kind = options[pos]
        if kind == 0:
            break
        if kind == 1:
            pos += 1
            continue
        length = options[pos + 1]
        found[kind] = options[pos + 2 : pos + length]
        pos += length
    return found


def capture_scenario(
    tmp_path: Path, scenario: Callable[[], Connection]
) -> tuple[Connection, list[Segment]]:
    """Run a loopback scenario in a private namespace under capture; return its packets."""
    path = tmp_path / "capture.pcap"
    with traffic.isolated_loopback(), traffic.capture_to_pcap(path) as capture:
        conn = scenario()
    assert capture.dropped == 0
    assert capture.packets == sum(1 for _ in read_capture(path))
    return conn, packets_of(path, conn)


def assert_handshake(segments: list[Segment]) -> None:
    syn, syn_ack, ack = segments[:3]
    assert syn.from_client and syn.flags == SYN
    assert not syn_ack.from_client and syn_ack.flags == SYN | ACK and syn_ack.ack == syn.seq + 1
    assert ack.from_client and ack.flags == ACK and ack.ack == syn_ack.seq + 1
    assert sum(s.has(SYN) for s in segments) == 2  # each frame once: no loopback duplicates


def fin_end(segment: Segment) -> int:
    """The sequence number that ACKs this FIN."""
    return (segment.seq + segment.payload + 1) & 0xFFFFFFFF


def assert_orderly_close(segments: list[Segment], closer_is_client: bool) -> None:
    """First FIN from `closer`, then the peer's FIN, then the final ACK of the peer's FIN."""
    assert not any(s.has(RST) for s in segments)
    fins = [s for s in segments if s.has(FIN)]
    assert [f.from_client for f in fins] == [closer_is_client, not closer_is_client]
    last = segments[-1]
    assert (
        last.from_client == closer_is_client and last.flags == ACK and last.ack == fin_end(fins[1])
    )


def assert_data_both_ways(segments: list[Segment]) -> None:
    assert any(s.payload for s in segments if s.from_client)
    assert any(s.payload for s in segments if not s.from_client)


# --- PacketCapture ------------------------------------------------------------------------------


def test_bad_interface_is_a_one_line_error() -> None:
    with pytest.raises(InterfaceError) as err:
        PacketCapture.open("nosuch0")
    assert str(err.value) == "capture on nosuch0: no such interface"
    assert isinstance(err.value, OSError)


def test_capture_to_pcap_reports_a_bad_interface(tmp_path: Path) -> None:
    with (
        pytest.raises(InterfaceError, match="nosuch0"),
        traffic.capture_to_pcap(tmp_path / "x.pcap", "nosuch0"),
    ):
        pytest.fail("the block must not run")


def test_loopback_frames_are_seen_once() -> None:
    with traffic.isolated_loopback(), PacketCapture.open("lo") as capture:
        assert capture.linktype == LINKTYPE_ETHERNET
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"once", ("127.0.0.1", 9))  # no listener: an ICMP port unreachable follows
        time.sleep(0.05)
        records = []
        while (record := capture.recv()) is not None:
            records.append(record)
        stats = capture.stats()
    assert len(records) == 2 and stats.received == 2 and stats.dropped == 0
    assert records[0][2].endswith(b"once") and abs(records[0][0] - time.time()) < 5


# --- real traffic -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_client_close_first(tmp_path: Path, host: str) -> None:
    conn, segments = capture_scenario(tmp_path, lambda: traffic.client_close_first(host))
    assert conn.shape == "client_close_first"
    assert_handshake(segments)
    assert_data_both_ways(segments)
    assert_orderly_close(segments, closer_is_client=True)


@pytest.mark.slow
def test_server_close_first(tmp_path: Path) -> None:
    _conn, segments = capture_scenario(tmp_path, traffic.server_close_first)
    assert_handshake(segments)
    assert_data_both_ways(segments)
    assert_orderly_close(segments, closer_is_client=False)


@pytest.mark.slow
def test_ipv6(tmp_path: Path) -> None:
    conn, segments = capture_scenario(tmp_path, traffic.ipv6)
    assert conn.family == socket.AF_INET6 and conn.client[0] == "::1"
    assert_handshake(segments)
    assert_data_both_ways(segments)
    assert_orderly_close(segments, closer_is_client=True)


@pytest.mark.slow
def test_half_close(tmp_path: Path) -> None:
    _conn, segments = capture_scenario(tmp_path, traffic.half_close)
    assert_handshake(segments)
    client_fin = next(i for i, s in enumerate(segments) if s.from_client and s.has(FIN))
    server_fin = next(i for i, s in enumerate(segments) if not s.from_client and s.has(FIN))
    late_data = [
        i for i, s in enumerate(segments) if not s.from_client and s.payload and i > client_fin
    ]
    assert late_data and client_fin < late_data[0] <= server_fin
    assert segments[-1].from_client and segments[-1].ack == fin_end(segments[server_fin])


@pytest.mark.slow
def test_rst_abort(tmp_path: Path) -> None:
    _conn, segments = capture_scenario(tmp_path, traffic.rst_abort)
    assert_handshake(segments)
    assert not any(s.has(FIN) for s in segments)
    assert segments[-1].from_client and segments[-1].has(RST)


@pytest.mark.slow
def test_bulk_transfer(tmp_path: Path) -> None:
    size = 8 * 1024 * 1024
    _conn, segments = capture_scenario(tmp_path, lambda: traffic.bulk_transfer(size))
    assert len(segments) > 1000
    assert_handshake(segments)
    for syn in segments[:2]:
        assert TCPOPT_WSCALE in tcp_options(syn.options)
    first_byte = segments[0].seq + 1
    sent = max(
        (s.seq + s.payload - first_byte) % 2**32 for s in segments if s.from_client and s.payload
    )
    assert sent == size  # the kernel may retransmit a few segments that loopback reordered
    assert_orderly_close(segments, closer_is_client=True)


@pytest.mark.slow
def test_connection_refused(tmp_path: Path) -> None:
    _conn, segments = capture_scenario(tmp_path, traffic.connection_refused)
    syn, rst = segments
    assert syn.from_client and syn.flags == SYN
    assert not rst.from_client and rst.flags == RST | ACK and rst.ack == syn.seq + 1


@pytest.mark.slow
def test_udp_exchange(tmp_path: Path) -> None:
    _conn, segments = capture_scenario(tmp_path, traffic.udp_exchange)
    assert [(s.from_client, s.payload) for s in segments] == [(True, 5), (False, 5)]


@pytest.mark.slow
def test_icmp_echo(tmp_path: Path) -> None:
    _conn, segments = capture_scenario(tmp_path, traffic.icmp_echo)
    assert [(s.from_client, s.icmp_type) for s in segments] == [(True, 8), (False, 0)]


@pytest.mark.slow
def test_simultaneous_close_fins_cross(tmp_path: Path) -> None:
    path = tmp_path / "veth.pcap"
    with (
        traffic.veth_pair() as pair,
        traffic.capture_to_pcap(path, pair.if_a, pair.netns_a) as capture,
    ):
        conn = traffic.simultaneous_close(pair)
    assert capture.dropped == 0
    segments = packets_of(path, conn)
    assert_handshake(segments)
    fins = {s.from_client: (i, s) for i, s in enumerate(segments) if s.has(FIN)}
    assert set(fins) == {True, False}
    last_fin = max(i for i, _s in fins.values())
    for side, (_i, fin) in fins.items():
        first_ack = next(
            i
            for i, s in enumerate(segments)
            if s.from_client != side and s.has(ACK) and s.ack == fin_end(fin)
        )
        assert last_fin < first_ack  # both FINs were on the wire before either was ACKed
    assert not any(s.has(RST) for s in segments)


@pytest.mark.slow
def test_capture_on_the_host_loopback(tmp_path: Path) -> None:
    """The default namespace's `lo`: GSO frames and other programs' traffic, filtered by port."""
    path = tmp_path / "lo.pcap"
    with traffic.capture_to_pcap(path) as capture:
        conn = traffic.client_close_first()
    assert capture.dropped == 0
    segments = packets_of(path, conn)
    assert_handshake(segments)
    assert_orderly_close(segments, closer_is_client=True)
