"""StateTable: creation policy, UDP/ICMP/other tracking, ICMP errors, limits, purge,
adaptive timeouts, change events, sync-style insert, clear and counters.

Real frames (tests/packets.py) go through decode_frame() and StateTable.test(); time is
passed in explicitly, as the sans-I/O table expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import get_args

import pytest

import statetable.table as table_module
from statetable import (
    BLOCK,
    PASS,
    RemoveReason,
    State,
    StateInserted,
    StateTable,
    StateUpdated,
    TableConfig,
    decode_frame,
    keys,
)
from statetable import timeouts as tmo
from statetable.counters import (
    FCNT_STATE_INSERT,
    FCNT_STATE_REMOVALS,
    FCNT_STATE_SEARCH,
    PFRES_BADSTATE,
    PFRES_MATCH,
    PFRES_MAXSTATES,
    PFRES_SHORT,
    PFRES_STATEINS,
)
from statetable.events import Event
from statetable.mslt import CLASSLESS, MSL_MAX, REMOTE
from statetable.state import CLOSED, ESTABLISHED, MULTIPLE, NO_TRAFFIC, SINGLE, SYN_SENT
from tests import packets
from tests.changes import Recorder
from tests.packets import ACK, FIN, RST, SYN

A, B, R = "10.0.0.1", "10.0.0.2", "10.0.0.254"
A6, B6, R6 = "2001:db8::a", "2001:db8::b", "2001:db8::fe"
T0 = 1000.0

# ---- helpers -------------------------------------------------------------------------


def decoded(frame: bytes) -> tuple:
    pkt = decode_frame(frame, 1)
    assert isinstance(pkt, tuple), pkt
    return pkt


def send(table: StateTable, frame: bytes, now: float = T0) -> int:
    return table.test(decoded(frame), now)


def state_of(table: StateTable, frame: bytes) -> State:
    """The state a frame belongs to (either direction)."""
    proto, key = decoded(frame)[:2]
    found = table.find(proto, key)
    assert found is not None, "no state"
    return found[0]


def udp(
    src: str = A, dst: str = B, sport: int = 5000, dport: int = 53, payload: bytes = b"q"
) -> bytes:
    return packets.udp(src, dst, sport, dport, payload)


def udp_flows(table: StateTable, n: int, now: float = T0, first_port: int = 10000) -> list[State]:
    """``n`` distinct UDP states, each created by one packet at ``now``."""
    out = []
    for i in range(n):
        frame = udp(sport=first_port + i)
        assert send(table, frame, now) == PASS
        out.append(state_of(table, frame))
    return out


def gre(src: str = A, dst: str = B) -> bytes:
    return packets.ip(src, dst, 47, b"\x00\x00\x08\x00" + b"g" * 16)


def tcp_handshake(
    table: StateTable,
    src: str = A,
    dst: str = B,
    sport: int = 40000,
    dport: int = 80,
    now: float = T0,
) -> State:
    assert send(table, packets.tcp(src, dst, sport, dport, SYN, 100), now) == PASS
    assert send(table, packets.tcp(dst, src, dport, sport, SYN | ACK, 900, 101), now) == PASS
    frame = packets.tcp(src, dst, sport, dport, ACK, 101, 901)
    assert send(table, frame, now) == PASS
    return state_of(table, frame)


def timeout_of(name: str) -> int:
    return tmo.DEFAULTS[tmo.BY_NAME[name]]


def test_table_config_rejects_unknown_and_negative_timeouts() -> None:
    with pytest.raises(ValueError):
        TableConfig(timeouts={"tcp.bogus": 1})
    with pytest.raises(ValueError):
        TableConfig(timeouts={"udp.first": -1})
    with pytest.raises(ValueError):
        TableConfig(limit_states=0)


# ---- UDP -------------------------------------------------------------------------------


def test_udp_first_packet_creates_single_no_traffic() -> None:
    table = StateTable()
    assert send(table, udp()) == PASS
    st = state_of(table, udp())
    assert (st.state, st.dst.state) == (SINGLE, NO_TRAFFIC)
    assert st.proto == 17 and st.af == 4
    assert st.timeout == tmo.UDP_FIRST
    assert table.expires_at(st) == T0 + 60
    assert st.endpoints() == (bytes([10, 0, 0, 1]), 5000, bytes([10, 0, 0, 2]), 53)
    assert table.count == 1
    assert table.pfres[PFRES_MATCH] == 1 and table.passed == 1


def test_udp_more_packets_one_way_stay_single() -> None:
    table = StateTable()
    send(table, udp())
    assert send(table, udp(), T0 + 5) == PASS
    st = state_of(table, udp())
    assert (st.state, st.dst.state) == (SINGLE, NO_TRAFFIC)
    assert st.timeout == tmo.UDP_SINGLE
    assert st.expire == T0 + 5
    assert table.expires_at(st) == T0 + 5 + 30


def test_udp_single_to_multiple() -> None:
    table = StateTable()
    send(table, udp())
    reply = udp(B, A, 53, 5000)
    assert send(table, reply, T0 + 1) == PASS
    st = state_of(table, reply)
    assert (st.state, st.dst.state) == (MULTIPLE, SINGLE)
    assert st.timeout == tmo.UDP_SINGLE
    assert table.expires_at(st) == T0 + 1 + 30
    assert send(table, udp(), T0 + 2) == PASS
    assert (st.state, st.dst.state) == (MULTIPLE, MULTIPLE)
    assert st.timeout == tmo.UDP_MULTIPLE
    assert table.expires_at(st) == T0 + 2 + 60
    assert send(table, reply, T0 + 3) == PASS
    assert st.timeout == tmo.UDP_MULTIPLE
    assert table.count == 1


def test_udp_counts_packets_and_ip_bytes_per_side() -> None:
    table = StateTable()
    send(table, udp(payload=b"x" * 100))
    send(table, udp(payload=b"x" * 10))
    send(table, udp(B, A, 53, 5000, b"y" * 500))
    st = state_of(table, udp())
    assert (st.packets, st.bytes) == (2, 128 + 38)
    assert (st.dst.packets, st.dst.bytes) == (1, 528)


def test_udp_other_ports_are_other_states() -> None:
    table = StateTable()
    send(table, udp(sport=1))
    send(table, udp(sport=2))
    send(table, udp(B, A, 53, 3))  # not a reply to either: a third state
    assert table.count == 3


# ---- ICMP and other protocols ------------------------------------------------------------


def test_icmp_echo_state_and_reply() -> None:
    table = StateTable()
    request = packets.icmp_echo(A, B, 0x1234)
    assert send(table, request) == PASS
    st = state_of(table, request)
    assert st.proto == 1 and st.timeout == tmo.ICMP_FIRST
    assert table.expires_at(st) == T0 + 20
    assert st.endpoints()[1] == st.endpoints()[3] == 0x1234
    reply = packets.icmp_echo(B, A, 0x1234, reply=True)
    assert send(table, reply, T0 + 1) == PASS
    assert state_of(table, reply) is st
    assert st.timeout == tmo.ICMP_ERROR
    assert table.expires_at(st) == T0 + 1 + 10
    assert st.dst.packets == 1
    assert table.count == 1


def test_icmp_echo_ids_are_separate_states() -> None:
    table = StateTable()
    send(table, packets.icmp_echo(A, B, 1))
    send(table, packets.icmp_echo(A, B, 2))
    assert table.count == 2


def test_icmp6_echo_state() -> None:
    table = StateTable()
    request = packets.icmp_echo(A6, B6, 77)
    assert send(table, request) == PASS
    st = state_of(table, request)
    assert st.proto == 58 and st.af == 6 and len(st.key) == 36
    assert send(table, packets.icmp_echo(B6, A6, 77, reply=True), T0 + 1) == PASS
    assert st.timeout == tmo.ICMP_ERROR and table.count == 1


def test_other_protocol_gre() -> None:
    table = StateTable()
    assert send(table, gre()) == PASS
    st = state_of(table, gre())
    assert st.proto == 47
    assert (st.state, st.dst.state) == (SINGLE, NO_TRAFFIC)
    assert st.timeout == tmo.OTHER_FIRST
    assert table.expires_at(st) == T0 + timeout_of("other.first")
    assert send(table, gre(B, A), T0 + 1) == PASS
    assert (st.state, st.dst.state) == (MULTIPLE, SINGLE)
    assert st.timeout == tmo.OTHER_SINGLE
    assert table.expires_at(st) == T0 + 1 + timeout_of("other.single")
    assert send(table, gre(), T0 + 2) == PASS
    assert st.timeout == tmo.OTHER_MULTIPLE
    assert table.expires_at(st) == T0 + 2 + timeout_of("other.multiple")
    assert table.count == 1
    # Another protocol between the same hosts is another state.
    send(table, packets.ip(A, B, 50, b"\0" * 12))
    assert table.count == 2


# ---- ICMP errors -------------------------------------------------------------------------


def quoted(frame: bytes) -> bytes:
    """The IP packet inside an Ethernet frame (what an ICMP error quotes)."""
    return frame[14:]


def test_icmp_error_quoting_a_tracked_tcp_connection_passes() -> None:
    table = StateTable()
    syn = packets.tcp(A, B, 40000, 80, SYN, 100)
    send(table, syn)
    st = state_of(table, syn)
    error = packets.icmp_error(R, A, 3, 1, quoted(syn))
    assert send(table, error, T0 + 3) == PASS
    assert table.count == 1  # errors never create states
    assert st.expire == T0  # nor refresh the one they match
    assert table.passed == 2


def test_icmp_error_quoting_a_reply_direction_packet_passes() -> None:
    table = StateTable()
    send(table, udp())
    reply = udp(B, A, 53, 5000)
    assert send(table, packets.icmp_error(R, B, 3, 3, quoted(reply))) == PASS


def test_icmp_error_quoting_an_echo_request_passes() -> None:
    table = StateTable()
    request = packets.icmp_echo(A, B, 9)
    send(table, request)
    assert send(table, packets.icmp_error(R, A, 11, 0, quoted(request))) == PASS


def test_icmp6_error_quoting_a_tracked_flow_passes() -> None:
    table = StateTable()
    flow = packets.udp(A6, B6, 1000, 2000, b"z")
    send(table, flow)
    assert send(table, packets.icmp_error(R6, A6, 1, 4, quoted(flow))) == PASS
    other = packets.udp(A6, B6, 1001, 2000, b"z")
    assert send(table, packets.icmp_error(R6, A6, 1, 4, quoted(other))) == BLOCK


def test_icmp_error_quoting_an_untracked_connection_is_blocked() -> None:
    table = StateTable()
    send(table, udp())
    blocked = table.blocked
    stray = packets.tcp(A, B, 40000, 80, SYN, 100)
    assert send(table, packets.icmp_error(R, A, 3, 1, quoted(stray))) == BLOCK
    assert table.blocked == blocked + 1
    assert table.count == 1
    # Same addresses and ports as the UDP state, but quoting TCP: no match either.
    tcp_same = packets.tcp(A, B, 5000, 53, SYN, 1)
    assert send(table, packets.icmp_error(R, A, 3, 3, quoted(tcp_same))) == BLOCK


# ---- TCP creation policy -----------------------------------------------------------------


@pytest.mark.parametrize(
    "flags", [ACK, SYN | ACK, FIN | ACK, RST, RST | ACK, SYN | FIN, SYN | RST, 0]
)
def test_tcp_without_state_needs_a_pure_syn(flags: int) -> None:
    table = StateTable()
    assert send(table, packets.tcp(A, B, 40000, 80, flags, 100, 5)) == BLOCK
    assert table.count == 0
    assert table.pfres[PFRES_MATCH] == 1
    assert table.pfres[PFRES_BADSTATE] == 0
    assert table.blocked == 1 and table.passed == 0
    assert table.fcounters[FCNT_STATE_SEARCH] == 1
    assert table.fcounters[FCNT_STATE_INSERT] == 0


def test_syn_with_ece_cwr_or_push_still_creates() -> None:
    table = StateTable()
    assert send(table, packets.tcp(A, B, 40000, 80, SYN | 0x40 | 0x80, 100)) == PASS
    st = state_of(table, packets.tcp(A, B, 40000, 80, SYN, 100))
    assert (st.state, st.dst.state) == (SYN_SENT, CLOSED)


# ---- state limit -------------------------------------------------------------------------


def test_state_limit() -> None:
    table = StateTable(TableConfig(limit_states=3))
    udp_flows(table, 3)
    assert send(table, udp(sport=99)) == BLOCK
    assert table.count == 3
    assert table.pfres[PFRES_MAXSTATES] == 1
    assert table.pfres[PFRES_MATCH] == 4
    assert table.blocked == 1
    assert send(table, packets.tcp(A, B, 40000, 80, SYN, 1)) == BLOCK
    assert table.pfres[PFRES_MAXSTATES] == 2
    assert table.half_open == 0
    assert send(table, gre()) == BLOCK
    assert send(table, packets.icmp_echo(A, B, 1)) == BLOCK
    assert table.pfres[PFRES_MAXSTATES] == 4
    # Existing states keep working while the table is full.
    assert send(table, udp(B, A, 53, 10000)) == PASS
    # Room again after a removal.
    table.kill(state_of(table, udp(sport=10001)))
    assert send(table, udp(sport=99)) == PASS
    assert table.count == 3


def test_state_limit_of_one_blocks_the_second_creation() -> None:
    table = StateTable(TableConfig(limit_states=1))
    tcp_handshake(table)
    assert send(table, packets.tcp(A, B, 40001, 80, SYN, 1)) == BLOCK
    assert table.pfres[PFRES_MAXSTATES] == 1


# ---- purge -------------------------------------------------------------------------------


def test_state_expires_exactly_at_expire_plus_timeout() -> None:
    table = StateTable()
    recorder = Recorder(table)
    send(table, udp(), 100.0)
    st = state_of(table, udp())
    assert table.expires_at(st) == 160.0
    assert table.purge(159.999) == 0
    assert table.count == 1
    recorder.clear()
    assert table.purge(160.0) == 1
    assert table.count == 0
    assert table.find(17, st.key) is None
    assert recorder.kinds() == ["removed:expired"]
    assert recorder.events[0].state is st
    assert table.fcounters[FCNT_STATE_REMOVALS] == 1


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("udp.first", lambda t, now: send(t, udp(), now)),
        ("icmp.first", lambda t, now: send(t, packets.icmp_echo(A, B, 3), now)),
        ("other.first", lambda t, now: send(t, gre(), now)),
        ("tcp.first", lambda t, now: send(t, packets.tcp(A, B, 1, 2, SYN, 10), now)),
        ("tcp.established", lambda t, now: tcp_handshake(t, now=now)),
    ],
)
def test_each_timeout_expires_on_time(
    name: str, make: Callable[[StateTable, float], object]
) -> None:
    table = StateTable()
    make(table, 50.0)
    limit = 50.0 + timeout_of(name)
    assert table.purge(math.nextafter(limit, 0)) == 0
    assert table.purge(limit) == 1


def test_configured_timeouts_are_used() -> None:
    table = StateTable(TableConfig(timeouts={"udp.first": 5, "tcp.established": 7}))
    send(table, udp(), 0.0)
    st = tcp_handshake(table, now=0.0)
    assert table.expires_at(state_of(table, udp())) == 5.0
    assert table.expires_at(st) == 7.0
    assert table.purge(7.0, maxcheck=10) == 2


def test_live_states_survive_purge() -> None:
    table = StateTable()
    send(table, udp(), 0.0)
    send(table, udp(sport=1), 0.0)
    send(table, udp(), 50.0)  # refreshed: now udp.single from 50
    assert table.purge(60.0, maxcheck=10) == 1
    assert table.count == 1
    assert table.purge(79.9, maxcheck=10) == 0
    assert table.purge(80.0, maxcheck=10) == 1


def test_incremental_purge_bounds_the_work_per_call() -> None:
    table = StateTable()
    udp_flows(table, 25, now=0.0)
    removed = []
    for _ in range(20):
        n = table.purge(1000.0, maxcheck=4)
        assert n <= 4
        removed.append(n)
        if table.count == 0:
            break
    assert sum(removed) == 25
    assert len(removed) <= math.ceil(25 / 4) + 1
    assert table.fcounters[FCNT_STATE_REMOVALS] == 25


def test_incremental_purge_sweeps_live_and_expired_states() -> None:
    table = StateTable()
    udp_flows(table, 10, now=0.0, first_port=100)  # expire at 60
    udp_flows(table, 10, now=50.0, first_port=200)  # expire at 110
    total = 0
    for _ in range(30):
        n = table.purge(100.0, maxcheck=3)
        assert n <= 3
        total += n
    assert total == 10
    assert table.count == 10


def test_default_maxcheck_is_one_plus_states_per_interval() -> None:
    table = StateTable()  # interval 10
    udp_flows(table, 100, now=0.0)
    assert table.purge(1000.0) == 1 + 100 // 10
    table2 = StateTable(TableConfig(timeouts={"interval": 50}))
    udp_flows(table2, 100, now=0.0)
    assert table2.purge(1000.0) == 1 + 100 // 50


def test_states_created_during_a_sweep_are_seen_by_the_next_sweep() -> None:
    table = StateTable()
    udp_flows(table, 6, now=0.0, first_port=100)
    assert table.purge(1000.0, maxcheck=2) == 2  # sweep started
    udp_flows(table, 3, now=0.0, first_port=500)  # added mid-sweep, also expired
    total = 2
    for _ in range(10):
        total += table.purge(1000.0, maxcheck=2)
    assert total == 9 and table.count == 0


def test_states_removed_mid_sweep_are_not_removed_twice() -> None:
    table = StateTable()
    states = udp_flows(table, 6, now=0.0)
    assert table.purge(1000.0, maxcheck=1) == 1  # queue snapshot taken
    table.kill(states[3])
    table.kill(states[4])
    total = 1
    for _ in range(10):
        total += table.purge(1000.0, maxcheck=2)
    assert total == 4
    assert table.count == 0
    assert table.fcounters[FCNT_STATE_REMOVALS] == 6


def test_purged_flow_starts_a_fresh_state() -> None:
    table = StateTable()
    send(table, udp(), 0.0)
    old = state_of(table, udp())
    table.purge(1000.0)
    assert send(table, udp(), 1000.0) == PASS
    new = state_of(table, udp())
    assert new is not old and new.id == old.id + 1
    assert new.timeout == tmo.UDP_FIRST


# ---- adaptive timeouts -------------------------------------------------------------------

ADAPTIVE = TableConfig(timeouts={"adaptive.start": 4, "adaptive.end": 8})


@pytest.mark.parametrize(
    ("states", "lifetime"),
    [
        (1, 60.0),
        (4, 60.0),
        (5, 45.0),
        (6, 30.0),
        (7, 15.0),
    ],
)
def test_adaptive_scaling_between_start_and_end(states: int, lifetime: float) -> None:
    table = StateTable(ADAPTIVE)
    flows = udp_flows(table, states, now=0.0)
    assert table.expires_at(flows[0]) == pytest.approx(lifetime)
    assert table.purge(lifetime - 0.01, maxcheck=100) == 0
    assert table.purge(lifetime, maxcheck=100) == states


@pytest.mark.parametrize("states", [8, 9, 12])
def test_adaptive_everything_expires_at_and_above_end(states: int) -> None:
    table = StateTable(ADAPTIVE)
    flows = udp_flows(table, states, now=10.0)
    established = tcp_handshake(table, now=10.0)
    assert table.expires_at(flows[0]) == 10.0
    assert table.expires_at(established) == 10.0
    assert table.purge(9.99, maxcheck=100) == 0
    assert table.purge(10.0, maxcheck=100) == states + 1
    assert table.count == 0


def test_adaptive_scale_follows_the_table_size() -> None:
    table = StateTable(ADAPTIVE)
    flows = udp_flows(table, 6, now=0.0)
    assert table.expires_at(flows[0]) == pytest.approx(30.0)
    table.kill(flows[5])
    table.kill(flows[4])
    assert table.expires_at(flows[0]) == pytest.approx(60.0)


def test_adaptive_off_when_start_is_not_below_end() -> None:
    table = StateTable(TableConfig(timeouts={"adaptive.start": 8, "adaptive.end": 8}))
    flows = udp_flows(table, 10, now=0.0)
    assert table.expires_at(flows[0]) == 60.0
    table0 = StateTable(TableConfig(timeouts={"adaptive.start": 0, "adaptive.end": 8}))
    flows = udp_flows(table0, 10, now=0.0)
    assert table0.expires_at(flows[0]) == 60.0


# ---- change events ---------------------------------------------------------------------


def test_events_for_a_tcp_connection() -> None:
    table = StateTable()
    recorder = Recorder(table)
    st = tcp_handshake(table)
    assert recorder.kinds() == ["inserted", "updated", "updated"]
    assert all(e.state is st for e in recorder.events)
    recorder.clear()
    assert send(table, packets.tcp(A, B, 40000, 80, ACK, 10**9, 901, payload=b"x")) == BLOCK
    assert send(table, packets.tcp(A, B, 40001, 80, ACK, 1, 1)) == BLOCK  # no state
    send(table, packets.icmp_error(R, A, 3, 1, quoted(packets.tcp(A, B, 40000, 80, ACK, 1))))
    assert recorder.events == []
    table.kill(st)
    assert recorder.kinds() == ["removed:killed"]


def test_events_for_udp_and_purge() -> None:
    table = StateTable()
    recorder = Recorder(table)
    send(table, udp(), 0.0)
    send(table, udp(B, A, 53, 5000), 1.0)
    st = state_of(table, udp())
    assert recorder.kinds() == ["inserted", "updated"]
    assert isinstance(recorder.events[0], StateInserted)
    assert isinstance(recorder.events[1], StateUpdated)
    recorder.clear()
    table.purge(1000.0)
    assert recorder.kinds() == ["removed:expired"] and recorder.events[0].state is st


def test_events_for_clear_with_reasons() -> None:
    table = StateTable()
    recorder = Recorder(table)
    udp_flows(table, 3)
    recorder.clear()
    assert table.clear() == 3
    assert recorder.kinds() == ["removed:flushed"] * 3
    udp_flows(table, 2)
    recorder.clear()
    table.clear(table.hostid, reason=RemoveReason.PEER)
    assert recorder.kinds() == ["removed:peer"] * 2


def test_no_event_objects_are_built_without_a_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise AssertionError("event built while nobody reads changes")

    for name in get_args(Event):
        monkeypatch.setattr(table_module, name.__name__, boom)
    table = StateTable()
    st = tcp_handshake(table)
    send(table, udp())
    send(table, udp(B, A, 53, 5000))
    table.kill(st)
    # A connection closed both ways: a VTW record (StateVestigial), then expired from its
    # pool by the purge below (VestigialRemoved).
    tcp_handshake(table, sport=40001)
    for frame in (
        packets.tcp(A, B, 40001, 80, FIN | ACK, 101, 901),
        packets.tcp(B, A, 80, 40001, ACK, 901, 102),
        packets.tcp(B, A, 80, 40001, FIN | ACK, 901, 102),
        packets.tcp(A, B, 40001, 80, ACK, 102, 902),
    ):
        assert send(table, frame) == PASS
    assert table.count == 1 and table.vtw.live == 1  # the UDP state and the record
    table.purge(T0 + 10**6)
    assert table.count == 0 and table.vtw.live == 0
    assert table.take_changes() == []


def test_recording_started_later_sees_only_later_changes() -> None:
    table = StateTable()
    send(table, udp())
    recorder = Recorder(table)
    send(table, udp())
    assert recorder.kinds() == ["updated"]


# ---- identity, insert, clear -------------------------------------------------------------


def test_ids_and_get_by_id() -> None:
    table = StateTable(TableConfig(hostid=0xABCD, id_base=1000))
    a, b = udp_flows(table, 2)
    assert (a.id, a.creatorid) == (1000, 0xABCD)
    assert (b.id, b.creatorid) == (1001, 0xABCD)
    assert table.get_by_id(1000, 0xABCD) is a
    assert table.get_by_id(1001, 0xABCD) is b
    assert table.get_by_id(1000, 0x1234) is None
    assert table.get_by_id(999, 0xABCD) is None
    table.kill(a)
    assert table.get_by_id(1000, 0xABCD) is None
    assert table.new_id() == 1002
    c = udp_flows(table, 1, first_port=7)[0]
    assert c.id == 1003


def peer_state(
    key: bytes, proto: int = 17, id: int = 77, creatorid: int = 0xBEEF, now: float = T0
) -> State:
    st = State(key, proto, id, creatorid, now)
    st.state = SINGLE
    st.timeout = tmo.UDP_SINGLE
    return st


FLOW_KEY = decoded(udp())[1]


def test_insert_a_peer_state() -> None:
    table = StateTable()
    recorder = Recorder(table)
    st = peer_state(FLOW_KEY)
    assert table.insert(st) is True
    assert table.count == 1
    assert table.get_by_id(77, 0xBEEF) is st
    assert table.fcounters[FCNT_STATE_INSERT] == 1
    assert recorder.kinds() == ["inserted"]
    # Packets of that flow, either way, now match it.
    assert send(table, udp()) == PASS
    assert send(table, udp(B, A, 53, 5000)) == PASS
    assert table.count == 1
    assert st.packets == 1 and st.dst.packets == 1
    assert table.ids_for(0xBEEF) == [st]


def test_insert_refuses_duplicates() -> None:
    table = StateTable()
    assert table.insert(peer_state(FLOW_KEY))
    assert table.insert(peer_state(FLOW_KEY, id=78)) is False  # same key
    assert table.insert(peer_state(keys.reverse(FLOW_KEY), id=79)) is False  # reversed key
    other_key = decoded(udp(sport=6000))[1]
    assert table.insert(peer_state(other_key, id=77)) is False  # same identity
    assert table.pfres[PFRES_STATEINS] == 3
    assert table.count == 1
    # A local state's flow is a duplicate too.
    send(table, udp(sport=7000))
    assert table.insert(peer_state(decoded(udp(sport=7000))[1], id=80)) is False
    assert table.pfres[PFRES_STATEINS] == 4
    # Same key, other protocol: fine.
    assert table.insert(peer_state(FLOW_KEY, proto=6, id=81))


def test_insert_respects_the_state_limit() -> None:
    table = StateTable(TableConfig(limit_states=1))
    assert table.insert(peer_state(FLOW_KEY))
    assert table.insert(peer_state(decoded(udp(sport=1))[1], id=2)) is False
    assert table.pfres[PFRES_MAXSTATES] == 1
    assert table.pfres[PFRES_STATEINS] == 0


def test_insert_tcp_half_open_state_counts_half_open() -> None:
    table = StateTable()
    key = decoded(packets.tcp(A, B, 1, 2, SYN))[1]
    st = State(key, 6, 5, 0xBEEF, T0)
    st.state = SYN_SENT
    assert table.insert(st)
    assert table.half_open == 1
    table.kill(st)
    assert table.half_open == 0
    est = State(key, 6, 6, 0xBEEF, T0)
    est.state = est.dst.state = ESTABLISHED
    assert table.insert(est)
    assert table.half_open == 0


def test_remove_twice_is_harmless() -> None:
    table = StateTable()
    st = udp_flows(table, 1)[0]
    table.kill(st)
    table.kill(st)
    table.remove(st, RemoveReason.EXPIRED)
    assert table.count == 0
    assert table.fcounters[FCNT_STATE_REMOVALS] == 1


def test_clear_everything() -> None:
    table = StateTable()
    udp_flows(table, 3)
    tcp_handshake(table)
    send(table, packets.tcp(A, B, 40001, 80, SYN, 1))  # half-open
    send(table, packets.icmp_echo(A, B, 1))
    send(table, packets.udp(A6, B6, 1, 2))
    assert table.count == 7 and table.half_open == 1
    assert table.clear() == 7
    assert table.count == 0 and table.half_open == 0
    assert list(table.states()) == []
    assert table.fcounters[FCNT_STATE_REMOVALS] == 7
    # Cleared flows: UDP starts over, TCP mid-stream is blocked.
    assert send(table, udp(sport=10000)) == PASS
    assert send(table, packets.tcp(A, B, 40000, 80, ACK, 101, 901)) == BLOCK


def test_clear_one_creator() -> None:
    table = StateTable(TableConfig(hostid=1))
    local = udp_flows(table, 2)
    for i in range(3):
        assert table.insert(peer_state(decoded(udp(sport=20000 + i))[1], id=i, creatorid=2))
    assert table.insert(peer_state(decoded(udp(sport=30000))[1], id=0, creatorid=3))
    assert table.clear(2) == 3
    assert table.count == 3
    assert table.ids_for(2) == []
    assert sorted(s.id for s in table.ids_for(1)) == sorted(s.id for s in local)
    assert table.clear(99) == 0
    assert table.clear(1) == 2
    assert [s.creatorid for s in table.states()] == [3]


def test_malformed_frames_are_blocked_under_their_reason() -> None:
    table = StateTable()
    table.block_malformed(PFRES_SHORT)
    table.block_malformed(PFRES_SHORT)
    assert table.pfres[PFRES_SHORT] == 2 and table.blocked == 2 and table.passed == 0


def test_set_timeout_applies_to_existing_states() -> None:
    table = StateTable()
    send(table, udp(), 100.0)
    st = state_of(table, udp())
    table.set_timeout(tmo.UDP_FIRST, 5)
    assert table.expires_at(st) == 105.0
    assert table.purge(105.0) == 1


@pytest.mark.parametrize(
    ("timeout", "seconds"), [(tmo.PFTM_MAX, 1), (-1, 1), (0, -1), (0, 1 << 31)]
)
def test_set_timeout_refuses_unknown_ids_and_out_of_range_values(
    timeout: int, seconds: int
) -> None:
    table = StateTable()
    with pytest.raises(ValueError):
        table.set_timeout(timeout, seconds)
    assert table.timeouts == list(tmo.DEFAULTS)


def test_set_limit_states_takes_effect_for_the_next_creation() -> None:
    table = StateTable()
    udp_flows(table, 2)
    table.set_limit_states(2)
    assert send(table, udp(sport=99)) == BLOCK and table.pfres[PFRES_MAXSTATES] == 1
    with pytest.raises(ValueError):
        table.set_limit_states(0)
    assert table.limit_states == 2


def test_set_mslt_changes_the_time_wait_lifetime_and_validates() -> None:
    table = StateTable()
    table.set_mslt(remote=7)
    assert table.mslt.time_wait(REMOTE) == 14.0
    table.set_mslt(enable=False)
    assert table.mslt.state_class(keys.make(bytes(4), bytes(4), 1, 2), 0) == CLASSLESS
    with pytest.raises(ValueError):
        table.set_mslt(remote=MSL_MAX + 1)
    with pytest.raises(ValueError, match="unknown"):
        table.set_mslt(remot=7)
    assert table.mslt.time_wait(REMOTE) == 14.0


def test_clear_counters() -> None:
    table = StateTable(TableConfig(limit_states=2))
    tcp_handshake(table)
    send(table, packets.tcp(A, B, 40001, 80, SYN, 1))
    send(table, packets.tcp(A, B, 40002, 80, SYN, 1))  # state-limit
    send(table, packets.tcp(A, B, 40003, 80, ACK, 1, 1))  # no state
    assert table.pfres[PFRES_MAXSTATES] == 1 and table.blocked == 2
    table.clear_counters()
    assert table.pfres == [0] * len(table.pfres)
    assert table.fcounters == [0, 0, 0]
    assert table.passed == 0 and table.blocked == 0
    assert table.count == 2 and table.half_open == 1  # gauges, not counters
    assert send(table, udp()) == BLOCK  # still full
    assert table.pfres[PFRES_MAXSTATES] == 1
    assert table.fcounters[FCNT_STATE_SEARCH] == 1


# ---- IPv6 --------------------------------------------------------------------------------


def test_ipv6_tcp_connection() -> None:
    table = StateTable()
    st = tcp_handshake(table, A6, B6)
    assert st.af == 6 and len(st.key) == 36
    assert (st.state, st.dst.state) == (ESTABLISHED, ESTABLISHED)
    assert keys.format_endpoint(*st.endpoints()[:2]) == "2001:db8::a[40000]"
    fin = packets.tcp(A6, B6, 40000, 80, FIN | ACK, 101, 901)
    assert send(table, fin) == PASS


def test_ipv6_udp_and_ipv4_udp_with_the_same_ports_are_distinct() -> None:
    table = StateTable()
    send(table, packets.udp(A6, B6, 5000, 53, b"q"))
    send(table, udp())
    assert table.count == 2
    st6 = state_of(table, packets.udp(B6, A6, 53, 5000, b"r"))
    assert st6.af == 6
    assert send(table, packets.udp(B6, A6, 53, 5000, b"r")) == PASS
    assert (st6.state, st6.dst.state) == (MULTIPLE, SINGLE)
    st4 = state_of(table, udp())
    assert (st4.state, st4.dst.state) == (SINGLE, NO_TRAFFIC)


def test_ipv6_states_purge_and_clear() -> None:
    table = StateTable()
    send(table, packets.udp(A6, B6, 1, 2), 0.0)
    send(table, packets.icmp_echo(A6, B6, 5), 0.0)
    assert table.purge(20.0, maxcheck=10) == 1  # icmp.first
    assert table.purge(60.0, maxcheck=10) == 1  # udp.first
    assert table.count == 0


def test_searches_count_every_packet() -> None:
    table = StateTable()
    frames = [
        udp(),
        udp(B, A, 53, 5000),
        gre(),
        packets.icmp_echo(A, B, 1),
        packets.tcp(A, B, 1, 2, ACK, 1, 1),
        packets.icmp_error(R, A, 3, 1, quoted(udp())),
    ]
    for frame in frames:
        send(table, frame)
    assert table.fcounters[FCNT_STATE_SEARCH] == len(frames)
    assert table.fcounters[FCNT_STATE_INSERT] == 3
