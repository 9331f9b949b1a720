"""Real kernel TCP/UDP/ICMP traffic, captured into a pcap and replayed into the table.

Each shape is made by the Linux stack itself (tests/traffic.py) inside a fresh network
namespace, captured with AF_PACKET into a real pcap file, then replayed through
decode_frame -> StateTable.test. Per connection we assert the pf peer states reached and
that no packet of the capture was counted ``state-mismatch``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from pfsync.pcap import read_capture
from statetable import StateTable, TableConfig, decode_frame, keys
from statetable import timeouts as tmo
from statetable.counters import PFRES_BADSTATE, PFRES_MATCH
from statetable.decode import NOT_IP
from statetable.state import ESTABLISHED, FIN_WAIT_2, MULTIPLE, SINGLE, TIME_WAIT, WSCALE_FLAG
from statetable.vtw import VtwConfig
from tests import traffic

pytestmark = pytest.mark.slow


def replay(path: Path, vtw: bool = False) -> tuple[StateTable, int]:
    """Replay a capture into a fresh table; returns it and the number of frames.

    VTW is off unless asked for, so closed connections stay full states whose pf peer
    states and counters these tests look at (tests/test_vtw_traffic.py covers VTW).
    """
    table = StateTable(TableConfig(vtw=VtwConfig(enable=vtw)))
    frames = 0
    for ts, linktype, frame in read_capture(path):
        pkt = decode_frame(frame, linktype)
        if pkt == NOT_IP:  # ARP on the veth link
            continue
        assert isinstance(pkt, tuple), f"frame {frames} did not decode: {pkt}"
        table.test(pkt, ts)
        frames += 1
    return table, frames


def state_of(table: StateTable, conn: traffic.Connection):
    """The state the connection's first packet (client -> server) created."""
    sport, dport = conn.client[1], conn.server[1]
    if conn.proto == socket.IPPROTO_ICMP:
        dport = sport  # pf keys ICMP queries by echo id both ways
    key = keys.make(
        ipaddress.ip_address(conn.client[0]).packed,
        ipaddress.ip_address(conn.server[0]).packed,
        sport,
        dport,
    )
    found = table.find(conn.proto, key)
    assert found is not None, f"no state for {conn}"
    st, from_src = found
    assert from_src, "the state's source must be the client"
    return st


def run_shape(
    tmp_path: Path, shape: Callable[[], traffic.Connection]
) -> tuple[StateTable, traffic.Connection, int]:
    pcap = tmp_path / "capture.pcap"
    with traffic.isolated_loopback():
        with traffic.capture_to_pcap(pcap) as result:
            conn = shape()
    assert result.dropped == 0
    table, frames = replay(pcap)
    assert table.pfres[PFRES_BADSTATE] == 0, "a legitimate packet was a state-mismatch"
    assert table.blocked == 0
    return table, conn, frames


CLOSED_SHAPES = {
    "client_close_first": traffic.client_close_first,
    "server_close_first": traffic.server_close_first,
    "half_close": traffic.half_close,
    "ipv6": traffic.ipv6,
}


@pytest.mark.parametrize("name", sorted(CLOSED_SHAPES))
def test_orderly_close_reaches_fin_wait_2_both(tmp_path: Path, name: str) -> None:
    table, conn, _ = run_shape(tmp_path, CLOSED_SHAPES[name])
    st = state_of(table, conn)
    assert (st.state, st.dst.state) == (FIN_WAIT_2, FIN_WAIT_2)
    assert st.timeout == tmo.TIME_WAIT
    assert st.packets > 3 and st.dst.packets > 3
    assert table.half_open == 0


def test_ipv6_state_is_ipv6(tmp_path: Path) -> None:
    table, conn, _ = run_shape(tmp_path, traffic.ipv6)
    assert conn.family == socket.AF_INET6
    assert state_of(table, conn).af == 6


def test_rst_abort_sets_time_wait_both(tmp_path: Path) -> None:
    table, conn, _ = run_shape(tmp_path, traffic.rst_abort)
    st = state_of(table, conn)
    assert (st.state, st.dst.state) == (TIME_WAIT, TIME_WAIT)


def test_connection_refused(tmp_path: Path) -> None:
    table, conn, frames = run_shape(tmp_path, traffic.connection_refused)
    st = state_of(table, conn)
    assert (st.state, st.dst.state) == (TIME_WAIT, TIME_WAIT)
    assert frames == 2  # the SYN and the RST|ACK that refuses it, nothing else


def test_bulk_transfer_with_window_scaling(tmp_path: Path) -> None:
    table, conn, frames = run_shape(tmp_path, traffic.bulk_transfer)
    st = state_of(table, conn)
    assert frames > 1000
    assert st.wscale & WSCALE_FLAG and st.dst.wscale & WSCALE_FLAG
    assert (st.state, st.dst.state) == (FIN_WAIT_2, FIN_WAIT_2)
    assert st.bytes + st.dst.bytes > 8 * 1024 * 1024


def test_simultaneous_close(tmp_path: Path) -> None:
    pcap = tmp_path / "capture.pcap"
    with traffic.veth_pair() as pair:
        with traffic.capture_to_pcap(pcap, ifname=pair.if_a, netns=pair.netns_a):
            conn = traffic.simultaneous_close(pair)
    table, _ = replay(pcap)
    assert table.pfres[PFRES_BADSTATE] == 0
    st = state_of(table, conn)
    assert (st.state, st.dst.state) == (FIN_WAIT_2, FIN_WAIT_2)


def test_udp_exchange(tmp_path: Path) -> None:
    table, conn, _ = run_shape(tmp_path, traffic.udp_exchange)
    st = state_of(table, conn)
    assert st.state >= SINGLE and st.dst.state >= SINGLE
    assert MULTIPLE in (st.state, st.dst.state)


def test_icmp_echo(tmp_path: Path) -> None:
    table, conn, _ = run_shape(tmp_path, traffic.icmp_echo)
    st = state_of(table, conn)
    # On loopback request and reply carry the same addresses and id, so both count as
    # the source's: one state, both packets.
    assert st.packets + st.dst.packets == 2  # the request and the reply
    assert table.count == 1


def test_a_capture_of_several_shapes_ends_in_closed_states(tmp_path: Path) -> None:
    """Every TCP connection of a mixed capture ends in a closed pair of peer states."""
    pcap = tmp_path / "mixed.pcap"
    with traffic.isolated_loopback():
        with traffic.capture_to_pcap(pcap):
            conns = [
                traffic.client_close_first(),
                traffic.server_close_first(),
                traffic.rst_abort(),
            ]
    table, _ = replay(pcap)
    assert table.pfres[PFRES_BADSTATE] == 0
    for conn in conns:
        st = state_of(table, conn)
        assert st.state >= FIN_WAIT_2 and st.dst.state >= FIN_WAIT_2
        assert st.state >= ESTABLISHED


def test_a_connection_picked_up_mid_flow_gets_no_state(tmp_path: Path) -> None:
    """A capture that starts after the handshake: pf creates TCP states only from a SYN,
    so every segment of that connection is blocked by the implicit rule (``match``),
    none is a state-mismatch, and a connection opened during the capture is tracked."""
    pcap = tmp_path / "midflow.pcap"
    with traffic.isolated_loopback():
        client, server = traffic.established_pair()
        with client, server, traffic.capture_to_pcap(pcap):
            for _ in range(3):
                client.sendall(b"ping")
                assert server.recv(16) == b"ping"
            later = traffic.client_close_first()
    table, frames = replay(pcap)
    assert table.pfres[PFRES_BADSTATE] == 0
    # The 3 data segments and their acks are all blocked by the implicit rule; `match`
    # counts those and the one state the later connection created.
    assert table.blocked >= 3
    assert table.pfres[PFRES_MATCH] == table.blocked + 1
    assert table.count == 1
    st = state_of(table, later)
    assert st.state >= FIN_WAIT_2 and st.dst.state >= FIN_WAIT_2
    assert frames == table.passed + table.blocked
