"""The pfsync engine (pfsync/sync/engine.py) with real tables, two or more engines wired in
memory (tests/sync_harness.py). Frames are serialized and parsed as on the wire; time is
driven by hand through ``now``, ``next_timer`` and ``handle_timer``.

The expectations follow REFERENCE.md section 3 (pfsync's rules) and issue 8.
"""

from __future__ import annotations

import pytest

from pfsync.sync import engine as eng
from pfsync.sync import wire
from pfsync.v1 import sync_pb2 as pb
from statetable import PASS
from statetable import timeouts as tmo
from statetable.state import (
    ESTABLISHED,
    FIN_WAIT_2,
    FLAG_NOSYNC,
    MULTIPLE,
    SINGLE,
    State,
)
from tests import packets
from tests.packets import ACK, FIN, PSH, RST, SYN
from tests.sync_harness import (
    SimNode,
    connect,
    disconnect,
    flush_all,
    make_node,
    snapshot,
    transfer,
)

T0 = 100.0
HOST_A, HOST_B, HOST_C = 0x0A, 0x0B, 0x0C

# ---- helpers -------------------------------------------------------------------------


def pair(**settings: object) -> tuple[SimNode, SimNode]:
    """A dials B; both connected and quiet (hellos exchanged, bulk done)."""
    a = make_node("a", HOST_A, T0, **settings)
    b = make_node("b", HOST_B, T0, **settings)
    connect(a, b, T0)
    transfer([a, b], T0)
    assert a.engine.ready and b.engine.ready
    return a, b


def addrs(i: int, v6: bool = False) -> tuple[str, str]:
    if v6:
        return f"2001:db8::{i + 1:x}", "2001:db8:1::5"
    return f"10.1.{i // 250}.{i % 250 + 1}", "10.2.0.2"


class Tcp:
    """One TCP conversation fed to a node as Ethernet frames (every segment must pass)."""

    def __init__(
        self, node: SimNode, i: int = 0, v6: bool = False, cisn: int = 1000, sisn: int = 5000
    ) -> None:
        self.node = node
        self.client, self.server = addrs(i, v6)
        self.cport, self.sport = 40000 + i, 443
        self.cseq, self.sseq = cisn, sisn

    def c(self, flags: int, now: float, dlen: int = 0, opts: bytes = b"") -> int:
        frame = packets.tcp(
            self.client,
            self.server,
            self.cport,
            self.sport,
            flags,
            self.cseq,
            self.sseq if flags & ACK else 0,
            65535,
            b"x" * dlen,
            opts,
        )
        self.cseq += dlen + (1 if flags & (SYN | FIN) else 0)
        return self.node.feed(frame, now)

    def s(self, flags: int, now: float, dlen: int = 0, opts: bytes = b"") -> int:
        frame = packets.tcp(
            self.server,
            self.client,
            self.sport,
            self.cport,
            flags,
            self.sseq,
            self.cseq,
            65535,
            b"y" * dlen,
            opts,
        )
        self.sseq += dlen + (1 if flags & (SYN | FIN) else 0)
        return self.node.feed(frame, now)

    def open(self, now: float) -> Tcp:
        opts = packets.tcp_options(1460, 7)
        assert self.c(SYN, now, opts=opts) == PASS
        assert self.s(SYN | ACK, now, opts=opts) == PASS
        assert self.c(ACK, now) == PASS
        return self

    def data(self, now: float, rounds: int = 1) -> Tcp:
        for _ in range(rounds):
            assert self.c(ACK | PSH, now, 100) == PASS
            assert self.s(ACK | PSH, now, 300) == PASS
            assert self.c(ACK, now) == PASS
        return self

    def close(self, now: float) -> Tcp:
        assert self.c(FIN | ACK, now) == PASS
        assert self.s(ACK, now) == PASS
        assert self.s(FIN | ACK, now) == PASS
        assert self.c(ACK, now) == PASS
        return self

    def reset(self, now: float) -> Tcp:
        assert self.c(RST, now) == PASS
        return self


def udp(node: SimNode, now: float, i: int = 0, v6: bool = False, reply: bool = True) -> None:
    c, s = addrs(i, v6)
    assert node.feed(packets.udp(c, s, 5000 + i, 53, b"q"), now) == PASS
    if reply:
        assert node.feed(packets.udp(s, c, 53, 5000 + i, b"a"), now) == PASS


def ping(node: SimNode, now: float, i: int = 0, v6: bool = False) -> None:
    c, s = addrs(i, v6)
    assert node.feed(packets.icmp_echo(c, s, 7 + i), now) == PASS
    assert node.feed(packets.icmp_echo(s, c, 7 + i, reply=True), now) == PASS


def assert_converged(*nodes: SimNode) -> None:
    first = nodes[0]
    for other in nodes[1:]:
        assert snapshot(first.table) == snapshot(other.table)
        assert first.engine.digest.value == other.engine.digest.value
        assert first.engine.digest.states == other.engine.digest.states
        assert first.table.count == other.table.count
        assert first.table.half_open == other.table.half_open


def only_state(node: SimNode) -> State:
    states = list(node.table.states())
    assert len(states) == 1, states
    return states[0]


def link(node: SimNode, peer: SimNode) -> eng.PeerLink:
    return node.engine.peers[node.links[peer.name]]


def actions(node: SimNode, peer: SimNode, now: float) -> list[pb.SyncFrame]:
    """What ``node`` sends ``peer`` now, leaving out frames that only carry a digest."""
    frames = node.engine.frames_to_send(node.links[peer.name], now)
    bare = {"sender", "ack", "digest"}
    return [f for f in frames if {fd.name for fd, _ in f.ListFields()} - bare]


def deliver(frame: pb.SyncFrame, to: SimNode, sender: SimNode, now: float = T0) -> None:
    """Hand a (hand-built) frame to ``to`` as if ``sender`` had sent it."""
    data = frame.SerializeToString()
    to.engine.receive(to.links[sender.name], pb.SyncFrame.FromString(data), now, len(data))
    to.changes(now)


def full_frame(states: list[State], now: float = T0, group: str = "updates") -> pb.SyncFrame:
    frame = pb.SyncFrame(sender=HOST_A)
    wire.put_states(getattr(frame, group), states, tmo.DEFAULTS, now)
    return frame


def counters(node: SimNode) -> dict[str, int]:
    return dict(node.engine.stats.counters)


# ---- 1. convergence -------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True])
def test_tcp_handshake_data_close_converge_with_a_vtw_record_on_both(v6: bool) -> None:
    a, b = pair()
    conn = Tcp(a, v6=v6).open(T0)
    flush_all([a, b], T0)
    assert only_state(b).state == ESTABLISHED
    assert_converged(a, b)
    conn.data(T0 + 1, 3)
    flush_all([a, b], T0 + 1)
    assert_converged(a, b)
    conn.close(T0 + 2)
    flush_all([a, b], T0 + 2)
    assert a.table.count == b.table.count == 0
    assert len(list(a.table.vestigial())) == len(list(b.table.vestigial())) == 1
    rec = next(iter(b.table.vestigial()))
    assert rec.src.state >= FIN_WAIT_2 and rec.dst.state >= FIN_WAIT_2
    assert_converged(a, b)


def test_time_wait_reaches_a_peer_with_vtw_off_as_a_full_state() -> None:
    a, b = pair()
    b.table.set_vtw_enabled(False)
    conn = Tcp(a).open(T0).data(T0)
    flush_all([a, b], T0)
    conn.close(T0 + 1)
    flush_all([a, b], T0 + 1)
    assert len(list(a.table.vestigial())) == 1 and a.table.count == 0
    st = only_state(b)
    assert st.timeout == tmo.TIME_WAIT and st.state >= FIN_WAIT_2
    assert snapshot(a.table) == snapshot(b.table)
    assert a.engine.digest.value == b.engine.digest.value


def test_time_wait_from_a_vtw_off_node_becomes_a_record_on_a_vtw_on_peer() -> None:
    a, b = pair()
    a.table.set_vtw_enabled(False)
    conn = Tcp(a).open(T0).data(T0)
    flush_all([a, b], T0)
    conn.close(T0 + 1)
    flush_all([a, b], T0 + 1)
    assert only_state(a).timeout == tmo.TIME_WAIT
    assert b.table.count == 0 and len(list(b.table.vestigial())) == 1
    assert snapshot(a.table) == snapshot(b.table)
    assert a.engine.digest.value == b.engine.digest.value


def test_rst_reaches_the_peer() -> None:
    a, b = pair()
    conn = Tcp(a).open(T0).data(T0)
    flush_all([a, b], T0)
    conn.reset(T0 + 1)
    flush_all([a, b], T0 + 1)
    assert_converged(a, b)
    assert snapshot(b.table)


@pytest.mark.parametrize("v6", [False, True])
def test_udp_and_icmp_converge(v6: bool) -> None:
    a, b = pair()
    udp(a, T0, 1, v6, reply=False)
    ping(a, T0, 2, v6)
    flush_all([a, b], T0)
    assert_converged(a, b)
    udp_b = [st for st in b.table.states() if st.proto == 17]
    assert udp_b[0].state == SINGLE and udp_b[0].dst.state == 0
    udp(a, T0 + 1, 1, v6)
    udp(a, T0 + 1, 1, v6)
    flush_all([a, b], T0 + 1)
    assert_converged(a, b)
    udp_b = [st for st in b.table.states() if st.proto == 17]
    assert udp_b[0].state == MULTIPLE and udp_b[0].dst.state == MULTIPLE
    assert udp_b[0].timeout == tmo.UDP_MULTIPLE


def test_half_open_counts_agree_during_a_handshake() -> None:
    a, b = pair()
    conn = Tcp(a)
    conn.c(SYN, T0, opts=packets.tcp_options(1460, 7))
    flush_all([a, b], T0)
    assert a.table.half_open == b.table.half_open == 1
    conn.s(SYN | ACK, T0, opts=packets.tcp_options(1460, 7))
    conn.c(ACK, T0)
    flush_all([a, b], T0)
    assert a.table.half_open == b.table.half_open == 0
    assert_converged(a, b)


def test_changes_on_both_sides_converge() -> None:
    a, b = pair()
    for i in range(5):
        Tcp(a, i).open(T0).data(T0)
        Tcp(b, 100 + i).open(T0)
        udp(b, T0, 200 + i)
    flush_all([a, b], T0)
    assert a.table.count == 15
    assert_converged(a, b)


def test_expiry_travels_relative_and_purge_agrees() -> None:
    a, b = pair()
    udp(a, T0, 1, reply=False)
    flush_all([a, b], T0)
    # udp.first is 60 s: not due on either side at 59 s, due on both at 61 s.
    assert a.table.purge(T0 + 59, 1000) == b.table.purge(T0 + 59, 1000) == 0
    assert a.table.purge(T0 + 61, 1000) == 1
    a.changes(T0 + 61)
    assert b.table.purge(T0 + 61, 1000) == 1
    b.changes(T0 + 61)
    flush_all([a, b], T0 + 61)
    assert a.table.count == b.table.count == 0
    assert a.engine.digest.value == b.engine.digest.value == 0
    # Each side's DEL_C finds the state gone on the other: pfsync counts that badstate.
    assert counters(a)["badstate"] == counters(b)["badstate"] == 1


# ---- 2. coalescing ----------------------------------------------------------------------


def test_many_packets_within_flush_ms_leave_as_one_update() -> None:
    a, b = pair()
    conn = Tcp(a).open(T0)
    flush_all([a, b], T0)
    out = a.engine.stats.actions_out
    before = dict(out)
    conn.data(T0 + 1, 10)  # 30 packets, one state
    assert a.engine.frames_to_send(a.links["b"], T0 + 1) == []  # flush_ms not yet due
    flush_all([a, b], T0 + 1)
    assert out["upd_c"] - before["upd_c"] == 1
    assert out["upd"] == before["upd"] and out["ins"] == before["ins"]
    assert_converged(a, b)


def test_an_insert_then_updates_leave_as_one_insert() -> None:
    a, b = pair()
    Tcp(a).open(T0).data(T0, 3)
    flush_all([a, b], T0)
    out = a.engine.stats.actions_out
    assert out["ins"] == 1 and out["upd_c"] == 0 and out["upd"] == 0
    assert b.engine.stats.actions_in["ins"] == 1
    assert_converged(a, b)


def test_an_insert_removed_before_the_flush_sends_nothing() -> None:
    a, b = pair()
    sent = link(a, b).frames_out
    udp(a, T0, 1)
    a.table.kill(only_state(a))
    a.changes(T0)
    flush_all([a, b], T0)
    assert link(a, b).frames_out == sent
    assert a.engine.stats.actions_out["ins"] == 0
    assert a.engine.stats.actions_out["del_c"] == 0
    assert b.table.count == 0


def test_maxupd_forces_the_frame_out() -> None:
    a, b = pair(maxupd=4)
    conn = Tcp(a).open(T0)
    flush_all([a, b], T0)
    sent = link(a, b).frames_out
    assert conn.c(ACK | PSH, T0 + 1, 10) == PASS
    assert conn.s(ACK, T0 + 1) == PASS
    assert a.engine.frames_to_send(a.links["b"], T0 + 1) == []
    assert conn.c(ACK | PSH, T0 + 1, 10) == PASS
    assert conn.s(ACK, T0 + 1) == PASS  # the 4th update
    frames = a.engine.frames_to_send(a.links["b"], T0 + 1)
    assert len(frames) == 1 and len(frames[0].compressed.id) == 1
    assert link(a, b).frames_out == sent + 1


def test_maxupd_zero_sends_a_tcp_state_at_its_second_change() -> None:
    # OpenBSD counts updates of a state already queued (sync_updates >= maxupdates), so
    # with 0 the first change of an idle state waits and any further one sends at once.
    a, b = pair(maxupd=0)
    conn = Tcp(a).open(T0)
    transfer([a, b], T0)
    assert b.table.count == 1  # SYN queued the INS, SYN|ACK forced it out
    flush_all([a, b], T0)  # the ACK's update waited for flush_ms
    for i in range(3):
        now = T0 + 2 + i
        conn.c(ACK | PSH, now, 10)
        assert actions(a, b, now) == []
        conn.s(ACK, now)
        frames = actions(a, b, now)
        assert len(frames) == 1 and list(frames[0].compressed.id) == [only_state(a).id]


def test_udp_updates_are_not_counted_for_maxupd() -> None:
    a, b = pair(maxupd=2)
    udp(a, T0, 1)
    flush_all([a, b], T0)
    for _ in range(5):
        udp(a, T0 + 1, 1)
    assert a.engine.frames_to_send(a.links["b"], T0 + 1) == []


def test_an_update_of_a_state_the_peer_just_changed_leaves_at_once() -> None:
    a, b = pair()
    conn = Tcp(a).open(T0)
    flush_all([a, b], T0)
    # Now b sees the connection's traffic (failover): b's update goes to a at once.
    conn.node = b
    conn.c(ACK | PSH, T0 + 1, 10)
    frames = b.engine.frames_to_send(b.links["a"], T0 + 1)
    assert len(frames) == 1 and len(frames[0].compressed.id) == 1
    for f in frames:
        deliver(f, a, b, T0 + 1)
    # a's next update of that state, within 2 s of b's change, is not held either.
    conn.node = a
    conn.s(ACK, T0 + 1.5)
    assert len(actions(a, b, T0 + 1.5)) == 1
    # After 2 s quiet, updates coalesce again.
    conn.s(ACK | PSH, T0 + 4, 10)
    assert actions(a, b, T0 + 4) == []


def test_flush_ms_through_next_timer_and_handle_timer() -> None:
    a, b = pair(flush_ms=50)
    udp(a, T0, 1)
    due = a.engine.next_timer()
    assert due is not None and due == pytest.approx(T0 + 0.050)
    a.engine.handle_timer(T0 + 0.049)
    assert a.engine.frames_to_send(a.links["b"], T0 + 0.049) == []
    a.engine.handle_timer(due)
    frames = a.engine.frames_to_send(a.links["b"], due)
    assert len(frames) == 1 and len(frames[0].inserts.id) == 1


def test_frame_states_budget_splits_a_burst_into_frames() -> None:
    a, b = pair(frame_states=10)
    for i in range(25):
        udp(a, T0, i, reply=False)
    flush_all([a, b], T0)
    assert a.engine.sequence == 3
    assert_converged(a, b)


# ---- 3. no echo, NOSYNC ------------------------------------------------------------------


def test_a_state_from_a_peer_is_not_sent_back() -> None:
    a, b = pair()
    conn = Tcp(a).open(T0).data(T0)
    udp(a, T0, 1)
    flush_all([a, b], T0)
    conn.data(T0 + 1).close(T0 + 2)
    flush_all([a, b], T0 + 2)
    b_out = b.engine.stats.actions_out
    for name in ("ins", "upd", "upd_c", "del_c", "vtw", "clr"):
        assert b_out[name] == 0, name
    assert b.engine.sequence == 0
    # The removal on a (purge) is not echoed either.
    a.table.purge(T0 + 1000, 1000)
    a.changes(T0 + 1000)
    flush_all([a, b], T0 + 1000)
    assert b.engine.sequence == 0
    assert_converged(a, b)


def test_nosync_states_are_never_sent() -> None:
    a, b = pair()
    udp(a, T0, 1, reply=False)
    st = only_state(a)
    st.flags |= FLAG_NOSYNC
    flush_all([a, b], T0)  # the insert was recorded before the flag: it went
    assert b.table.count == 1
    udp(a, T0 + 1, 1)
    a.table.kill(st)
    a.changes(T0 + 1)
    flush_all([a, b], T0 + 1)
    assert b.table.count == 1
    assert a.engine.stats.actions_out["upd_c"] == 0
    assert a.engine.stats.actions_out["del_c"] == 0


def test_a_nosync_state_is_not_in_a_bulk_update() -> None:
    a = make_node("a", HOST_A, T0)
    udp(a, T0, 1)
    udp(a, T0, 2)
    next(iter(a.table.states())).flags |= FLAG_NOSYNC
    b = make_node("b", HOST_B, T0)
    connect(b, a, T0)
    transfer([a, b], T0)
    assert b.engine.ready and b.table.count == 1


# ---- 4. receive side ----------------------------------------------------------------------


def foreign_state(i: int = 0, proto: int = 6, hostid: int = HOST_A) -> State:
    """A state made by a table of its own (not synced), for hand-built frames."""
    node = make_node("x", hostid, T0)
    if proto == 6:
        Tcp(node, i).open(T0).data(T0)
    elif proto == 17:
        udp(node, T0, i)
    else:
        ping(node, T0, i)
    return only_state(node)


def test_an_update_of_an_unknown_state_imports_it() -> None:
    a, b = pair()
    st = foreign_state(3)
    deliver(full_frame([st]), b, a)
    got = only_state(b)
    assert (got.id, got.creatorid) == (st.id, st.creatorid)
    assert snapshot(b.table) == {(st.id, st.creatorid): snapshot_of(st)}
    assert b.engine.stats.actions_in["upd"] == 1
    assert b.table.half_open == 0
    # A second copy (the same) changes nothing and is not stale.
    deliver(full_frame([st]), b, a)
    assert b.table.count == 1 and counters(b)["stale"] == 0


def snapshot_of(st: State) -> tuple[object, ...]:
    node = make_node("y", HOST_C, T0)
    clone = wire.read_states(full_frame([st]).updates, T0, tmo.DEFAULTS)[0]
    node.table.insert(clone)
    return snapshot(node.table)[(st.id, st.creatorid)]


def test_a_compressed_update_of_an_unknown_state_is_answered_by_a_request() -> None:
    a, b = pair()
    conn = Tcp(a).open(T0)
    flush_all([a, b], T0)
    st = only_state(a)
    # b loses the state without telling a (applied as a peer's delete: not sent).
    assert b.table.apply_delete(st.id, st.creatorid)
    b.changes(T0)
    conn.data(T0 + 1)
    frames = actions(a, b, T0 + 2)
    assert len(frames[0].compressed.id) == 1
    for f in frames:
        deliver(f, b, a, T0 + 2)
    reply = actions(b, a, T0 + 2)
    assert list(reply[0].update_requests.id) == [st.id]
    for f in reply:
        deliver(f, a, b, T0 + 2)
    answer = actions(a, b, T0 + 2)
    assert list(answer[0].updates.id) == [st.id] and not answer[0].sequence
    for f in answer:
        deliver(f, b, a, T0 + 2)
    assert_converged(a, b)


def test_an_update_request_for_an_unknown_state_counts_badstate() -> None:
    a, b = pair()
    frame = pb.SyncFrame(sender=HOST_A)
    wire.put_ids(frame.update_requests, [(12345, HOST_B)])
    deliver(frame, b, a)
    assert counters(b)["badstate"] == 1
    assert actions(b, a, T0) == []


def test_an_update_request_for_a_known_state_is_answered_in_full() -> None:
    a, b = pair()
    udp(b, T0, 1)
    flush_all([a, b], T0)
    st = only_state(b)
    frame = pb.SyncFrame(sender=HOST_A)
    wire.put_ids(frame.update_requests, [(st.id, st.creatorid)])
    deliver(frame, b, a, T0 + 1)
    out = actions(b, a, T0 + 1)
    assert list(out[0].updates.id) == [st.id]


def _diverge(a: SimNode, b: SimNode, conn: Tcp, client: bool, server: bool, now: float) -> None:
    """b sees packets of the connection a never hears of (their changes are dropped)."""
    silent = SimNode("b-silent", b.table, b.engine)
    silent.changes = lambda now: b.table.take_changes()  # type: ignore[method-assign,assignment,return-value]
    conn.node = silent
    if client:
        assert conn.c(ACK | PSH, now, 100) == PASS
    if server:
        assert conn.s(ACK | PSH, now, 100) == PASS
    conn.node = a


@pytest.mark.parametrize(
    ("client", "server"), [(True, False), (False, True), (True, True)], ids=["src", "dst", "both"]
)
def test_stale_rule_sends_our_copy_back_and_the_sender_converges(
    client: bool, server: bool
) -> None:
    a, b = pair()
    conn = Tcp(a).open(T0).data(T0)
    flush_all([a, b], T0)
    mine = snapshot(b.table)
    _diverge(a, b, conn, client, server, T0 + 1)
    newer = snapshot(b.table)
    assert newer != mine
    # a's update of its older copy: only the side a did not see moves on b.
    assert conn.c(ACK, T0 + 1) == PASS if not client else conn.s(ACK, T0 + 1) == PASS
    a.changes(T0 + 1)
    flush_all([a, b], T0 + 1)
    assert counters(b)["stale"] == 1
    assert b.engine.stats.actions_out["upd"] >= 1  # b's copy went back, in full
    assert counters(a)["stale"] == 0
    assert_converged(a, b)
    st = only_state(b)
    if client:
        assert (st.state, st.seqlo) == newer[(st.id, st.creatorid)][2][:2]  # type: ignore[index]


def test_a_wholly_older_update_does_not_move_timeout_or_expiry() -> None:
    a, b = pair()
    conn = Tcp(a).open(T0).data(T0)
    flush_all([a, b], T0)
    old = full_frame([only_state(a)], T0)
    _diverge(a, b, conn, True, True, T0 + 5)
    st = only_state(b)
    before = (st.timeout, st.expire, st.seqlo, st.dst.seqlo)
    deliver(old, b, a, T0 + 5)
    assert (st.timeout, st.expire, st.seqlo, st.dst.seqlo) == before
    assert counters(b)["stale"] == 1


def test_non_tcp_states_only_go_forward() -> None:
    a, b = pair()
    udp(a, T0, 1)
    udp(a, T0, 1)
    flush_all([a, b], T0)
    st = only_state(b)
    assert (st.state, st.dst.state) == (MULTIPLE, MULTIPLE)
    older = full_frame([st], T0)
    older.updates.src.state[0] = SINGLE + 1  # on the wire: control.proto enum numbers (pf + 1)
    older.updates.dst.state[0] = 0 + 1
    deliver(older, b, a, T0 + 1)
    assert (st.state, st.dst.state) == (MULTIPLE, MULTIPLE)
    assert counters(b)["stale"] == 1
    out = actions(b, a, T0 + 1)
    assert list(out[0].updates.id) == [st.id]


def test_deletes_remove_states_and_time_wait_records() -> None:
    a, b = pair()
    Tcp(a, 1).open(T0).data(T0).close(T0)
    Tcp(a, 2).open(T0)
    udp(a, T0, 3)
    flush_all([a, b], T0)
    assert b.table.count == 2 and len(list(b.table.vestigial())) == 1
    a.table.kill_vestigial(lambda rec: True)
    for st in list(a.table.states()):
        a.table.kill(st)
    a.changes(T0 + 1)
    flush_all([a, b], T0 + 1)
    assert b.engine.stats.actions_in["del_c"] == 3
    assert b.table.count == 0 and not list(b.table.vestigial())
    assert_converged(a, b)


def test_clear_by_creator_removes_only_that_creators_states_and_records() -> None:
    a, b = pair()
    Tcp(a, 1).open(T0).close(T0)
    udp(a, T0, 2)
    Tcp(b, 3).open(T0).close(T0)
    udp(b, T0, 4)
    flush_all([a, b], T0)
    assert b.table.count == 2 and len(list(b.table.vestigial())) == 2
    assert a.table.clear(HOST_A) == 2
    a.changes(T0 + 1)
    flush_all([a, b], T0 + 1)
    assert b.engine.stats.actions_in["clr"] == 1
    assert [st.creatorid for st in b.table.states()] == [HOST_B]
    assert [rec.creatorid for rec in b.table.vestigial()] == [HOST_B]
    assert_converged(a, b)


# ---- 5. hostile frames ------------------------------------------------------------------


def _hostile(mutate: object, group: str = "updates") -> tuple[SimNode, SimNode, pb.SyncFrame]:
    a, b = pair()
    Tcp(a, 1).open(T0)
    udp(b, T0, 2)
    flush_all([a, b], T0)
    frame = full_frame([foreign_state(5), foreign_state(6, 17)], T0, group)
    mutate(getattr(frame, group))  # type: ignore[operator]
    return a, b, frame


def _bad_address(cols: pb.StateColumns) -> None:
    cols.src_address[1] = b"\x01\x02\x03"
    cols.dst_address[1] = b"\x01\x02\x03"


HOSTILE = {
    "short id column": ("badlen", lambda c: c.id.pop()),
    "long port column": ("badlen", lambda c: c.src_port.append(7)),
    "short peer column": ("badlen", lambda c: c.dst.seqlo.pop()),
    "short wscale_seen": ("badlen", lambda c: c.src.wscale_seen.pop()),
    "timeout": ("badval", lambda c: c.timeout.__setitem__(0, tmo.PFTM_MAX)),
    "tcp peer state": ("badval", lambda c: c.src.state.__setitem__(0, 12)),
    "udp peer state": ("badval", lambda c: c.dst.state.__setitem__(1, 4)),
    "direction": ("badval", lambda c: c.direction.__setitem__(0, 0)),
    "address length": ("badval", _bad_address),
    "mixed families": ("badval", lambda c: c.src_address.__setitem__(0, bytes(16))),
    "port": ("badval", lambda c: c.dst_port.__setitem__(0, 70000)),
    "wscale": ("badval", lambda c: c.src.wscale.__setitem__(0, 15)),
    "max_win": ("badval", lambda c: c.src.max_win.__setitem__(0, 1 << 16)),
    "protocol": ("badval", lambda c: c.protocol.__setitem__(0, 300)),
    "msl class": ("badval", lambda c: c.msl_class.__setitem__(0, 9)),
}


@pytest.mark.parametrize("group", ["updates", "inserts", "time_wait"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_bad_state_frame_is_counted_and_changes_nothing(case: str, group: str) -> None:
    counter, mutate = HOSTILE[case]
    a, b, frame = _hostile(mutate, group)
    before, digest, count = snapshot(b.table), b.engine.digest.value, counters(b)
    deliver(frame, b, a, T0)
    assert snapshot(b.table) == before and b.engine.digest.value == digest
    after = counters(b)
    assert after[counter] == count[counter] + 1
    assert {k for k in after if after[k] != count[k]} == {counter, "ipackets"}
    assert actions(b, a, T0) == []


def test_a_frame_with_a_bad_compressed_column_changes_nothing() -> None:
    a, b = pair()
    Tcp(a, 1).open(T0)
    flush_all([a, b], T0)
    st = only_state(a)
    frame = pb.SyncFrame(sender=HOST_A)
    wire.put_compressed(frame.compressed, [st], tmo.DEFAULTS, T0)
    frame.compressed.src.state[0] = 99
    wire.put_states(frame.updates, [foreign_state(7)], tmo.DEFAULTS, T0)
    before = snapshot(b.table)
    deliver(frame, b, a)
    assert snapshot(b.table) == before and counters(b)["badval"] == 1
    frame.compressed.src.state[0] = 4
    frame.compressed.timeout.append(1)
    deliver(frame, b, a)
    assert snapshot(b.table) == before and counters(b)["badlen"] == 1


def test_id_columns_of_different_lengths_are_badlen() -> None:
    a, b = pair()
    udp(a, T0, 1)
    flush_all([a, b], T0)
    st = only_state(b)
    frame = pb.SyncFrame(sender=HOST_A)
    frame.deletes.id.extend([st.id, 5])
    frame.deletes.creatorid.append(st.creatorid)
    deliver(frame, b, a)
    assert b.table.count == 1 and counters(b)["badlen"] == 1


def test_a_non_tcp_time_wait_or_a_udp_state_in_time_wait_is_badval() -> None:
    a, b = pair()
    frame = full_frame([foreign_state(1, 17)], T0, "time_wait")
    deliver(frame, b, a)
    assert b.table.count == 0 and counters(b)["badval"] == 1
    frame = full_frame([foreign_state(1, 17)], T0)
    frame.updates.timeout[0] = tmo.TIME_WAIT
    deliver(frame, b, a)
    assert b.table.count == 0 and counters(b)["badval"] == 2


def test_an_unknown_field_is_badact() -> None:
    a, b = pair()
    frame = full_frame([foreign_state(1)])
    # Field 99, varint 1: an action this version does not know.
    data = frame.SerializeToString() + bytes([0x98, 0x06, 0x01])
    b.engine.receive(b.links["a"], pb.SyncFrame.FromString(data), T0, len(data))
    b.changes(T0)
    assert counters(b)["badact"] == 1 and b.table.count == 0


def test_actions_before_a_hello_are_hdrops() -> None:
    a = make_node("a", HOST_A, T0)
    b = make_node("b", HOST_B, T0)
    connect(a, b, T0)
    deliver(full_frame([foreign_state(1)]), b, a)
    assert counters(b)["hdrops"] == 1 and b.table.count == 0


def test_a_hello_of_another_version_is_badver_and_the_stream_stays_mute() -> None:
    a = make_node("a", HOST_A, T0)
    b = make_node("b", HOST_B, T0)
    connect(a, b, T0)
    hello = pb.SyncFrame(sender=HOST_A, hello=pb.Hello(version=2, creatorid=HOST_A, epoch=7))
    deliver(hello, b, a)
    assert counters(b)["badver"] == 1
    deliver(full_frame([foreign_state(1)]), b, a)
    assert counters(b)["hdrops"] == 1 and b.table.count == 0
    assert b.engine.frames_to_send(b.links["a"], T0) == []


def test_a_huge_batch_is_applied_or_rejected_whole() -> None:
    a, b = pair()
    n = 50_000
    src = foreign_state(1)
    frame = full_frame([src])
    cols = frame.updates
    # 50k distinct states built column-wise (ids and client ports vary).
    for name in cols.DESCRIPTOR.fields_by_name:
        col = getattr(cols, name)
        if name in ("src", "dst"):
            for pname in col.DESCRIPTOR.fields_by_name:
                pcol = getattr(col, pname)
                pcol.extend([pcol[0]] * (n - 1))
        elif name == "id":
            col.extend(range(src.id + 1, src.id + n))
        elif name == "src_port":
            col[0] = 1
            col.extend(range(2, n + 1))
        else:
            col.extend([col[0]] * (n - 1))
    bad = pb.SyncFrame()
    bad.CopyFrom(frame)
    bad.updates.dst.max_win.pop()
    deliver(bad, b, a)
    assert counters(b)["badlen"] == 1 and b.table.count == 0
    deliver(frame, b, a)
    assert b.table.count == n and b.engine.digest.states == n
    assert counters(b)["badval"] == counters(b)["badstate"] == 0


# ---- 6. bulk update ---------------------------------------------------------------------


def _populated(n: int) -> SimNode:
    a = make_node("a", HOST_A, T0)
    for i in range(n):
        Tcp(a, i).open(T0).data(T0)
    for i in range(n, n + 5):
        Tcp(a, i).open(T0).close(T0)
    udp(a, T0, 1)
    ping(a, T0, 2, v6=True)
    return a


def test_a_fresh_node_gets_everything_by_bulk_and_then_is_ready() -> None:
    a = _populated(30)
    b = make_node("b", HOST_B, T0, bulk_states=7)
    connect(b, a, T0)
    assert not b.engine.ready
    # Step by step: b's hello and request, then a's BUS START ... END.
    for f in b.engine.frames_to_send(b.links["a"], T0):
        deliver(f, a, b)
    frames = a.engine.frames_to_send(a.links["b"], T0)
    bulk = [f for f in frames if f.HasField("bulk")]
    assert [f.bulk.status for f in bulk] == [pb.BULK_STATUS_KIND_START, pb.BULK_STATUS_KIND_END]
    for f in frames:
        assert not b.engine.ready
        deliver(f, b, a)
    assert b.engine.ready and not b.engine.bulk_gave_up
    assert b.table.count == 32 and len(list(b.table.vestigial())) == 5
    assert link(b, a).bulk_received == 37
    assert_converged(a, b)


def test_a_bulk_larger_than_one_call_comes_in_several_calls() -> None:
    a = _populated(100)
    b = make_node("b", HOST_B, T0, bulk_states=3)
    connect(b, a, T0)
    transfer([a, b], T0)
    assert b.engine.ready
    assert_converged(a, b)


def test_without_an_answer_bulk_requests_repeat_every_2s_and_give_up_after_12() -> None:
    b = make_node("b", HOST_B, T0)
    a = make_node("a", HOST_A, T0)
    connect(b, a, T0)
    requests = []
    for f in b.engine.frames_to_send(b.links["a"], T0):
        if f.HasField("hello"):
            deliver(f, a, b)  # the hellos cross, but a never answers a bulk request
        if (0, 0) in wire.read_ids(f.update_requests):
            requests.append(T0)
    for f in a.engine.frames_to_send(a.links["b"], T0):
        if f.HasField("hello"):
            deliver(f, b, a)
    now = T0
    while now < T0 + 40:
        b.engine.handle_timer(now)
        for f in b.engine.frames_to_send(b.links["a"], now):
            if (0, 0) in wire.read_ids(f.update_requests):
                requests.append(now)
        if b.engine.ready:
            break
        now = b.engine.next_timer() or now + 1
        now = min(now, requests[-1] + 2 if requests else now)
    assert len(requests) == 12
    assert [round(t - requests[0], 6) for t in requests] == [2.0 * i for i in range(12)]
    assert b.engine.ready and b.engine.bulk_gave_up
    assert now == pytest.approx(requests[-1] + 2)


def test_a_peer_that_never_says_hello_gets_one_request_and_the_node_gives_up() -> None:
    # Requests queued on a stream the peer has not answered would all arrive together
    # (and start a bulk each): only the one sent with the hello goes out.
    b = make_node("b", HOST_B, T0)
    a = make_node("a", HOST_A, T0)
    connect(b, a, T0)
    sent = 0
    now = T0
    while not b.engine.ready and now < T0 + 40:
        b.engine.handle_timer(now)
        for f in b.engine.frames_to_send(b.links["a"], now):
            sent += (0, 0) in wire.read_ids(f.update_requests)
        now += 0.5
    assert sent == 1
    assert b.engine.ready and b.engine.bulk_gave_up
    assert b.engine.bulk_attempts == eng.BULK_ATTEMPTS
    assert now == pytest.approx(T0 + eng.BULK_ATTEMPTS * eng.BULK_RETRY_SECONDS + 0.5, abs=1)


def test_a_node_without_peers_is_ready_at_once_and_a_listener_stays_ready() -> None:
    a = make_node("a", HOST_A, T0)
    assert a.engine.ready
    b = make_node("b", HOST_B, T0)
    connect(b, a, T0)
    assert a.engine.ready and not b.engine.ready


def test_a_listener_with_states_made_before_any_peer_sends_them() -> None:
    # a listens and already holds states; b dials and asks for a bulk.
    a = _populated(3)
    b = make_node("b", HOST_B, T0)
    connect(b, a, T0)
    transfer([a, b], T0)
    assert_converged(a, b)


@pytest.mark.parametrize("flushed", [False, True])
def test_a_fresh_listener_gets_the_states_a_dialer_made_before_it_connected(
    flushed: bool,
) -> None:
    a = _populated(3)
    if flushed:
        a.engine.handle_timer(T0 + 1)  # flushed with nobody to tell
    b = make_node("b", HOST_B, T0)
    connect(a, b, T0 + 2)
    flush_all([a, b], T0 + 2)
    assert_converged(a, b)


def test_a_listener_returns_to_a_dialer_that_made_states_alone() -> None:
    a, b = pair()
    disconnect(a, b, T0)
    del a.engine.peers[a.links["b"]]  # a forgot its peer (reconfigured), b is still up
    Tcp(a, 1).open(T0)
    a.engine.handle_timer(T0 + 1)
    connect(a, b, T0 + 2)
    flush_all([a, b], T0 + 2)
    assert_converged(a, b)
    assert b.table.count == 1


# ---- 7. resume -----------------------------------------------------------------------------


def test_a_short_cut_resumes_from_the_replay_log_without_a_bulk() -> None:
    a, b = pair()
    Tcp(a, 1).open(T0)
    flush_all([a, b], T0)
    bus = a.engine.stats.actions_out["bus"], b.engine.stats.actions_out["bus"]
    hits = a.engine.log.hits, b.engine.log.hits
    disconnect(a, b, T0 + 1)
    Tcp(a, 2).open(T0 + 1).close(T0 + 1)
    udp(a, T0 + 1, 3)
    Tcp(b, 4).open(T0 + 1)
    for node in (a, b):
        node.engine.handle_timer(T0 + 2)
    connect(a, b, T0 + 3)
    transfer([a, b], T0 + 3)
    assert (a.engine.stats.actions_out["bus"], b.engine.stats.actions_out["bus"]) == bus
    assert a.engine.log.hits == hits[0] + 1 and b.engine.log.hits == hits[1] + 1
    assert a.engine.stats.bulk_fallbacks == b.engine.stats.bulk_fallbacks == 0
    assert_converged(a, b)
    # And again: the listener's resume point survives a second cut.
    disconnect(a, b, T0 + 4)
    Tcp(b, 5).open(T0 + 4)
    b.engine.handle_timer(T0 + 5)
    connect(a, b, T0 + 6)
    transfer([a, b], T0 + 6)
    assert b.engine.stats.actions_out["bus"] == bus[1]
    assert_converged(a, b)


def test_a_long_cut_falls_back_to_a_bulk_update() -> None:
    a, b = pair(replay_log=4)
    disconnect(a, b, T0)
    for i in range(10):
        udp(a, T0 + i, i)
        Tcp(b, 100 + i).open(T0 + i)
        a.engine.handle_timer(T0 + i + 0.5)
        b.engine.handle_timer(T0 + i + 0.5)
    assert a.engine.sequence == b.engine.sequence == 10
    connect(a, b, T0 + 20)
    transfer([a, b], T0 + 20)
    assert a.engine.stats.bulk_fallbacks == b.engine.stats.bulk_fallbacks == 1
    assert_converged(a, b)
    assert a.table.count == 20


def test_a_peer_process_restart_gets_a_bulk() -> None:
    a, b = pair()
    Tcp(a, 1).open(T0)
    udp(a, T0, 2)
    flush_all([a, b], T0)
    disconnect(a, b, T0 + 1)
    fresh = make_node("b", HOST_B, T0 + 1)  # b restarted empty (new epoch)
    fresh.engine.epoch += 1
    connect(a, fresh, T0 + 2)
    transfer([a, fresh], T0 + 2)
    assert_converged(a, fresh)


# ---- 8. digest -------------------------------------------------------------------------------


def test_drift_is_found_by_the_digest_and_repaired() -> None:
    a, b = pair(digest_interval=1.0)
    for i in range(4):
        Tcp(a, i).open(T0)
    flush_all([a, b], T0)
    st = next(iter(a.table.states()))
    # A bug behind the sync's back: b loses a state and tells no one.
    assert b.table.apply_delete(st.id, st.creatorid)
    b.changes(T0 + 1)
    assert a.engine.digest.value != b.engine.digest.value
    now = T0 + 1
    for _ in range(eng.DIGEST_STRIKES + 2):
        now += 1.0
        transfer([a, b], now)
    assert a.engine.stats.digest_mismatches + b.engine.stats.digest_mismatches >= eng.DIGEST_STRIKES
    assert a.engine.stats.repairs + b.engine.stats.repairs >= 1
    assert_converged(a, b)


def test_equal_digests_count_no_mismatch() -> None:
    a, b = pair(digest_interval=1.0)
    Tcp(a, 1).open(T0)
    flush_all([a, b], T0)
    for i in range(6):
        transfer([a, b], T0 + 2 + i)
    assert a.engine.stats.actions_in["digest"] >= 3
    assert a.engine.stats.digest_mismatches == b.engine.stats.digest_mismatches == 0


# ---- 9. deferral -----------------------------------------------------------------------------


def _syn(node: SimNode, i: int, now: float) -> list[tuple[int, int]]:
    c, s = addrs(i)
    frame = packets.tcp(c, s, 30000 + i, 80, SYN, 1, 0, 65535, b"", packets.tcp_options(1460))
    from statetable import decode_frame

    node.table.test(decode_frame(frame, 1), now)  # type: ignore[arg-type]
    return node.engine.handle_changes(node.table.take_changes(), now)


def test_a_deferred_insert_is_released_by_the_peers_ack() -> None:
    a, b = pair(defer=True)
    held = _syn(a, 1, T0)
    st = only_state(a)
    assert held == [(st.id, HOST_A)]
    assert a.engine.take_released() == []
    frames = actions(a, b, T0)  # a deferred insert leaves at once
    assert list(frames[0].ack_requested.id) == [st.id]
    for f in frames:
        deliver(f, b, a, T0 + 0.001)
    for f in actions(b, a, T0 + 0.001):
        assert list(f.insert_acks.id) == [st.id]
        deliver(f, a, b, T0 + 0.002)
    assert a.engine.take_released() == [(st.id, HOST_A)]
    assert a.engine.stats.defer_timeouts == 0


def test_a_deferred_insert_is_released_after_20ms_without_an_ack() -> None:
    a, b = pair(defer=True)
    held = _syn(a, 1, T0)
    assert a.engine.next_timer() == pytest.approx(T0 + eng.DEFER_SECONDS)
    a.engine.handle_timer(T0 + 0.019)
    assert a.engine.take_released() == []
    a.engine.handle_timer(T0 + eng.DEFER_SECONDS)
    assert a.engine.take_released() == held
    assert a.engine.stats.defer_timeouts == 1


def test_at_most_128_inserts_are_held() -> None:
    a, b = pair(defer=True)
    held = []
    for i in range(200):
        held += _syn(a, i, T0)
    assert len(held) == eng.DEFER_MAX
    a.engine.handle_timer(T0 + 1)
    assert sorted(a.engine.take_released()) == sorted(held)


def test_no_deferral_without_a_peer_or_when_off() -> None:
    a = make_node("a", HOST_A, T0, defer=True)
    assert _syn(a, 1, T0) == []
    a, b = pair()
    assert _syn(a, 1, T0) == []


# ---- 10. mesh and duplicate streams ------------------------------------------------------------


def test_a_three_node_mesh_converges() -> None:
    a = make_node("a", HOST_A, T0)
    b = make_node("b", HOST_B, T0)
    c = make_node("c", HOST_C, T0)
    Tcp(a, 1).open(T0)
    connect(a, b, T0)
    connect(b, c, T0)
    connect(a, c, T0)
    nodes = [a, b, c]
    transfer(nodes, T0)
    assert all(n.engine.ready for n in nodes)
    for i, node in enumerate(nodes):
        Tcp(node, 10 + i).open(T0 + 1).data(T0 + 1)
        udp(node, T0 + 1, 20 + i)
        Tcp(node, 30 + i).open(T0 + 1).close(T0 + 1)
    flush_all(nodes, T0 + 1)
    assert_converged(a, b, c)
    assert a.table.count == 7
    # Removals and a creator's flush travel the mesh too.
    b.table.clear(HOST_A)
    b.changes(T0 + 2)
    flush_all(nodes, T0 + 2)
    assert_converged(a, b, c)
    assert {st.creatorid for st in c.table.states()} == {HOST_B, HOST_C}


def test_two_streams_between_one_pair_apply_frames_from_one_only() -> None:
    carried, a, b = _both_dial()
    # Whatever the dialers send, each node applies the other's frames from one stream.
    assert [
        ln for ln in ("to-b", "from-b") if ln in a.engine.peers and a.engine.peers[ln].connected
    ] == ["to-b"]
    assert carried[("a", "to-b")] > 0 and carried[("a", "from-b")] == 0
    assert snapshot(a.table) == snapshot(b.table)
    assert a.engine.digest.value == b.engine.digest.value


def test_two_streams_between_one_pair_carry_frames_on_one_only() -> None:
    carried, a, b = _both_dial()
    used = {k for k in carried if carried[k]}
    assert used in ({("a", "to-b"), ("b", "from-a")}, {("b", "to-a"), ("a", "from-b")})


def _both_dial() -> tuple[dict[tuple[str, str], int], SimNode, SimNode]:
    a = make_node("a", HOST_A, T0)
    b = make_node("b", HOST_B, T0)
    # Both dial: a's "to-b" meets b's "from-a"; b's "to-a" meets a's "from-b".
    wires = {("a", "to-b"): ("b", "from-a"), ("b", "to-a"): ("a", "from-b")}
    wires.update({v: k for k, v in list(wires.items())})
    nodes = {"a": a, "b": b}
    a.engine.add_peer("to-b", T0)
    b.engine.add_peer("to-a", T0)
    for name, ln in wires:
        nodes[name].engine.peer_up(ln, T0)
    carried: dict[tuple[str, str], int] = dict.fromkeys(wires, 0)

    def pump(now: float) -> None:
        for _ in range(100):
            moved = 0
            for (name, ln), (pname, pln) in wires.items():
                node, peer = nodes[name], nodes[pname]
                node.engine.handle_timer(now)
                for f in node.engine.frames_to_send(ln, now):
                    if {fd.name for fd, _ in f.ListFields()} - {"sender", "ack", "hello"}:
                        carried[(name, ln)] += 1
                    data = f.SerializeToString()
                    peer.engine.receive(pln, pb.SyncFrame.FromString(data), now, len(data))
                    peer.changes(now)
                    moved += 1
            if not moved:
                return

    pump(T0)
    # b's own bulk request went out on the stream that lost; its retry (2 s later) asks
    # on the one kept.
    pump(T0 + eng.BULK_RETRY_SECONDS)
    assert a.engine.ready and b.engine.ready
    before = dict(carried)
    for i in range(5):
        Tcp(a, i).open(T0 + 1)
        udp(b, T0 + 1, 10 + i)
    for node in (a, b):
        node.engine.handle_timer(T0 + 3)
    pump(T0 + 3)
    return {k: carried[k] - before[k] for k in carried}, a, b


@pytest.mark.parametrize("frame_states", [1, 1024])
@pytest.mark.parametrize("vtw", [True, False])
def test_ports_reused_within_one_flush_reach_the_peer(frame_states: int, vtw: bool) -> None:
    # The old connection's delete and the new one's insert leave together: the peer must
    # drop the old state before it takes the new one with the same key.
    a, b = pair(frame_states=frame_states)
    a.table.set_vtw_enabled(vtw)
    b.table.set_vtw_enabled(vtw)
    Tcp(a, 1).open(T0).data(T0).close(T0)
    flush_all([a, b], T0)
    Tcp(a, 1, cisn=900_000).open(T0 + 5)
    udp(a, T0 + 5, 2)
    flush_all([a, b], T0 + 5)
    assert counters(b)["badstate"] == 0
    assert_converged(a, b)
    assert a.table.count == 2


# ---- both nodes see the same traffic (each captures its own end of a link) ---------------


@pytest.mark.parametrize("sync_before_close", [True, False])
def test_both_nodes_seeing_a_connection_keep_the_lower_creatorids_state(
    sync_before_close: bool,
) -> None:
    """Each node makes a state for the same connection; the lower creatorid's wins on both
    (A's here), whether they sync while it is open or only once both closed it."""
    a, b = pair()
    on_a, on_b = Tcp(a), Tcp(b)
    on_a.open(T0)
    on_b.open(T0)
    if sync_before_close:
        flush_all([a, b], T0)
        assert only_state(a).creatorid == only_state(b).creatorid == HOST_A
        assert_converged(a, b)
    on_a.data(T0 + 1).close(T0 + 1)
    on_b.data(T0 + 1).close(T0 + 1)
    flush_all([a, b], T0 + 1)
    assert_converged(a, b)
    records = [list(n.table.vestigial()) for n in (a, b)]
    assert [len(r) for r in records] == [1, 1] and a.table.count == b.table.count == 0
    assert records[0][0].creatorid == records[1][0].creatorid == HOST_A
    assert counters(a)["badstate"] >= 1 and counters(b)["badstate"] == 0
