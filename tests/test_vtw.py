"""Vestigial TIME_WAIT (statetable/vtw.py) and MSLT classes (statetable/mslt.py) via a real table.

Every packet is a frame from tests/packets.py, decoded and fed to ``StateTable.test`` through
the ``Conn`` helper of tests/test_tcp_tracking.py; time is injected. The last part is a
property test: a generated conversation plus a random tail of late segments gets exactly
the same verdicts, PFRES counters and TIME_WAIT contents with VTW on as with VTW off.
"""

from __future__ import annotations

import ipaddress
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from statetable import BLOCK, PASS, StateTable, TableConfig, keys
from statetable import timeouts as tmo
from statetable.counters import FCNT_STATE_INSERT, FCNT_STATE_SEARCH, PFRES_BADSTATE, PFRES_MATCH
from statetable.events import RemoveReason, StateInserted, StateVestigial, VestigialRemoved
from statetable.mslt import CLASSLESS, LOCAL, LOOPBACK, REMOTE, MsltConfig, Network
from statetable.state import CLOSED, FIN_WAIT_2, SYN_SENT, TIME_WAIT, Peer, State
from statetable.vtw import (
    ENTRIES_MAX,
    PeerView,
    Pool,
    PoolCorruption,
    Vestigial,
    VtwConfig,
    VtwStats,
)
from tests.changes import Recorder
from tests.packets import ACK, FIN, PSH, RST, SYN
from tests.test_tcp_tracking import (
    T0,
    Conn,
    Conversation,
    M,
    close_client_first,
    conversations,
    handshake,
    replay,
)

LIFETIME = {LOOPBACK: 2.0, LOCAL: 10.0, REMOTE: 60.0, CLASSLESS: 60.0}
NETS: list[Network] = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:1::/64")]


pytestmark = pytest.mark.usefixtures("checked_pools")

# ---- helpers -------------------------------------------------------------------------------


def vtw_table(**config: Any) -> StateTable:
    """A table with VTW on (the default) and the given TableConfig fields."""
    return StateTable(TableConfig(**config))


def closed(
    table: StateTable,
    at: float = T0,
    client: str | None = None,
    server: str | None = None,
    cport: int = 49152,
    sport: int = 443,
) -> Conn:
    """A connection opened and closed client-first at time ``at`` (all four FIN steps)."""
    conn = Conn(
        table,
        v6=client is not None and ":" in client,
        client=client,
        server=server,
        cport=cport,
        sport=sport,
    )
    conn.now = at
    handshake(conn)
    close_client_first(conn, 1001, 5001)
    return conn


def ip(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def client_key(conn: Conn) -> bytes:
    """The key the connection's state and record are stored under (client -> server)."""
    return (
        ip(conn.client)
        + ip(conn.server)
        + conn.cport.to_bytes(2, "big")
        + conn.sport.to_bytes(2, "big")
    )


def only_record(table: StateTable) -> Vestigial:
    records = list(table.vestigial())
    assert len(records) == 1, records
    return records[0]


def peer_view(p: Peer) -> PeerView:
    """A full state's peer as a record would hold it."""
    return PeerView(p.state, p.seqlo, p.seqhi, p.max_win, p.wscale)


def record_of(st_: State, expire: float, cls: int) -> Vestigial:
    """What a full state in TIME_WAIT must look like as a record."""
    return Vestigial(
        st_.key, st_.id, st_.creatorid, peer_view(st_), peer_view(st_.dst), expire, cls
    )


def tcp_states(table: StateTable) -> list[State]:
    return [s for s in table.states() if s.proto == 6]


# ---- MSLT classes --------------------------------------------------------------------------

CLASS_CASES = [
    # (client, server, local_nets, expected class)
    ("127.0.0.1", "127.0.0.1", [], LOOPBACK),
    ("127.0.0.1", "127.9.8.7", [], LOOPBACK),
    ("192.0.2.7", "192.0.2.7", [], LOOPBACK),  # equal addresses
    ("10.1.0.1", "10.2.0.2", NETS, LOCAL),
    ("10.1.0.1", "192.0.2.1", NETS, REMOTE),  # only one end local
    ("10.1.0.1", "10.2.0.2", [], REMOTE),
    ("::1", "::1", [], LOOPBACK),
    ("2001:db8:1::c", "2001:db8:1::5", NETS, LOCAL),
    ("fe80::1", "fe80::2", [], LOCAL),  # link-local is on-link
    ("2001:db8:1::c", "2001:db8:2::5", NETS, REMOTE),
    ("2001:db8:2::c", "2001:db8:3::5", [], REMOTE),
]


@pytest.mark.parametrize("client,server,nets,cls", CLASS_CASES)
def test_closed_connection_becomes_a_record_of_its_mslt_class(
    client: str, server: str, nets: list[Network], cls: int
) -> None:
    """A closed connection leaves the main table for one record of the right class and expiry."""
    table = vtw_table(local_nets=nets)
    conn = closed(table, client=client, server=server)
    assert table.count == 0 and tcp_states(table) == []
    rec = only_record(table)
    assert rec.key == client_key(conn)
    assert rec.af == (6 if ":" in client else 4)
    assert rec.cls == cls
    assert rec.expire == T0 + LIFETIME[cls]
    assert (rec.src.state, rec.dst.state) == (FIN_WAIT_2, FIN_WAIT_2)
    assert table.pfres[PFRES_BADSTATE] == 0


@pytest.mark.parametrize("client,server,nets,cls", CLASS_CASES)
def test_mslt_off_makes_every_record_classless_with_60_seconds(
    client: str, server: str, nets: list[Network], cls: int
) -> None:
    """With MSLT off the class is 0 and TIME_WAIT lasts 2 x the remote MSL, whatever the ends."""
    table = vtw_table(local_nets=nets, mslt=MsltConfig(enable=False))
    closed(table, client=client, server=server)
    rec = only_record(table)
    assert rec.cls == CLASSLESS
    assert rec.expire == T0 + 60.0


def test_changing_the_loopback_msl_changes_new_records_only() -> None:
    """mslt.config.loopback is read when a record is made; older records keep their expiry."""
    table = vtw_table()
    closed(table, client="127.0.0.1", server="127.0.0.1", cport=1000)
    table.mslt.config.loopback = 7
    closed(table, at=T0 + 1, client="127.0.0.1", server="127.0.0.1", cport=1001)
    expiries = {rec.key[-4:-2]: rec.expire for rec in table.vestigial()}
    assert expiries == {
        (1000).to_bytes(2, "big"): T0 + 2.0,
        (1001).to_bytes(2, "big"): T0 + 1 + 14.0,
    }


def test_rst_closed_connection_is_a_record_too() -> None:
    """An RST puts both peers in TIME_WAIT; the connection leaves the main table at once."""
    table = vtw_table()
    conn = Conn(table)
    handshake(conn)
    assert conn.c(RST | ACK, 1001, 5001) == PASS
    rec = only_record(table)
    assert (rec.src.state, rec.dst.state) == (TIME_WAIT, TIME_WAIT)
    assert rec.expire == T0 + 60.0 and table.count == 0 and table.half_open == 0


# ---- the record's fields -------------------------------------------------------------------


def _scaled_close(conn: Conn) -> None:
    handshake(conn, cisn=4_294_967_000, sisn=77, cws=7, sws=2, ack_win=501)
    assert conn.c(ACK | PSH, 4_294_967_001, 78, win=501, dlen=900) == PASS  # wraps past 2**32
    assert conn.s(ACK | PSH, 78, 605, win=12000, dlen=1400) == PASS
    assert conn.s(FIN | ACK, 1478, 605, win=12000) == PASS
    assert conn.c(ACK, 605, 1479, win=480) == PASS
    assert conn.c(FIN | ACK, 605, 1479, win=480) == PASS
    assert conn.s(ACK, 1479, 606, win=12000) == PASS


def _plain_close(conn: Conn) -> None:
    handshake(conn)
    close_client_first(conn, 1001, 5001)


def _rst_close(conn: Conn) -> None:
    handshake(conn, swin=3000)
    assert conn.s(ACK | PSH, 5001, 1001, dlen=700) == PASS
    assert conn.s(RST, 5701) == PASS


@pytest.mark.parametrize("close", [_plain_close, _scaled_close, _rst_close])
def test_record_fields_equal_the_full_state_just_before(close: Callable[[Conn], None]) -> None:
    """key, id, creatorid and both peers' seqlo/seqhi/max_win/wscale/state survive the move;
    they also equal what the same packets leave in a VTW-off table's full state."""
    on, off = vtw_table(), StateTable(TableConfig(vtw=VtwConfig(enable=False)))
    seen: list[Vestigial] = []

    on.record_changes()
    close(Conn(on))
    for event in on.take_changes():
        if isinstance(event, StateVestigial):
            seen.append(record_of(event.state, 0.0, 0))
    close(Conn(off))
    rec = only_record(on)
    assert len(seen) == 1
    assert (rec.key, rec.id, rec.creatorid, rec.src, rec.dst) == (
        seen[0].key,
        seen[0].id,
        seen[0].creatorid,
        seen[0].src,
        seen[0].dst,
    )
    full = tcp_states(off)[0]
    assert full.timeout == tmo.TIME_WAIT
    assert rec == record_of(full, full.expire, REMOTE)
    assert rec.creatorid == 1 and rec.id == 1 << 32


# ---- late segments -------------------------------------------------------------------------


@pytest.mark.parametrize("from_client", [True, False])
def test_late_retransmitted_fin_passes_and_restarts_the_timer(from_client: bool) -> None:
    """A FIN/ACK repeated inside the window passes, and the record now expires 2*MSL later."""
    table = vtw_table()
    conn = closed(table)
    conn.now = T0 + 45
    if from_client:
        assert conn.c(FIN | ACK, 1001, 5001) == PASS
    else:
        assert conn.s(FIN | ACK, 5001, 1002) == PASS
    rec = only_record(table)
    assert rec.expire == T0 + 45 + 60
    assert table.pfres[PFRES_BADSTATE] == 0 and table.count == 0
    conn.now = T0 + 100  # past the first expiry, before the restarted one
    assert table.purge(conn.now) == 0
    assert conn.c(ACK, 1002, 5002) == PASS


def test_duplicate_last_ack_passes_and_restarts_the_timer() -> None:
    """The last ACK repeated (its FIN was retransmitted to us) passes."""
    table = vtw_table()
    conn = closed(table)
    conn.now = T0 + 10
    assert conn.c(ACK, 1002, 5002) == PASS
    assert conn.s(ACK, 5002, 1002) == PASS
    assert only_record(table).expire == T0 + 10 + 60
    assert table.pfres[PFRES_BADSTATE] == 0


@pytest.mark.parametrize("from_client", [True, False])
def test_exact_rst_removes_the_record_and_passes(from_client: bool) -> None:
    """An RST whose seq is exactly the sender's seqlo ends TIME_WAIT (counted as del)."""
    table = vtw_table()
    conn = closed(table)
    verdict = conn.c(RST, 1002) if from_client else conn.s(RST | ACK, 5002, 1002)
    assert verdict == PASS
    assert list(table.vestigial()) == [] and table.vtw.live == 0
    assert table.vtw.stats.dels == 1 and table.vtw.stats.kill == 0
    assert table.pfres[PFRES_BADSTATE] == 0
    # Nothing is left for a late ACK to match: it meets the implicit block rule.
    matched = table.pfres[PFRES_MATCH]
    assert conn.c(ACK, 1002, 5002) == BLOCK
    assert table.pfres[PFRES_MATCH] == matched + 1 and table.pfres[PFRES_BADSTATE] == 0


@pytest.mark.parametrize("seq", [1001, 1003, 1002 + 65535, 1002 - 65535])
def test_rst_off_the_mark_is_blocked_and_keeps_the_record(seq: int) -> None:
    """In TIME_WAIT only an exact RST counts (the tracker's +-1 slack does not apply)."""
    table = vtw_table()
    conn = closed(table)
    before = only_record(table)
    conn.now = T0 + 1
    assert conn.c(RST, seq & M) == BLOCK
    assert table.pfres[PFRES_BADSTATE] == 1
    assert only_record(table) == before


@pytest.mark.parametrize("from_client", [True, False])
def test_pure_syn_frees_the_record_and_creates_a_fresh_state(from_client: bool) -> None:
    """A pure SYN reuses the 4-tuple: the record goes (del), a new half-open state comes."""
    table = vtw_table()
    conn = closed(table)
    inserts = table.fcounters[FCNT_STATE_INSERT]
    conn.now = T0 + 5
    verdict = conn.c(SYN, 90000) if from_client else conn.s(SYN, 123456)
    assert verdict == PASS
    assert list(table.vestigial()) == []
    assert table.vtw.stats.dels == 1 and table.vtw.stats.ins == 1
    assert table.fcounters[FCNT_STATE_INSERT] == inserts + 1
    assert table.count == 1 and table.half_open == 1
    new = conn.st
    assert (new.state, new.dst.state) == (SYN_SENT, CLOSED)
    assert new.seqlo == (90000 if from_client else 123456)
    assert new.creation == T0 + 5
    assert new.key == (client_key(conn) if from_client else keys.reverse(client_key(conn)))


@pytest.mark.parametrize("flags", [SYN | ACK, SYN | RST, SYN | FIN])
def test_syn_with_other_flags_is_no_reuse(flags: int) -> None:
    """Only a pure SYN reopens; SYN|ACK, SYN|RST, SYN|FIN on a record are state-mismatches."""
    table = vtw_table()
    conn = closed(table)
    assert conn.c(flags, 1001, 5002) == BLOCK
    assert table.pfres[PFRES_BADSTATE] == 1
    assert table.count == 0 and table.vtw.live == 1


@pytest.mark.parametrize(
    "from_client,dlen,fin",
    [(True, 100, False), (False, 1, False), (True, 0, True), (False, 10, True)],
)
def test_new_data_after_close_is_a_state_mismatch(from_client: bool, dlen: int, fin: bool) -> None:
    """A segment adding sequence space after both FINs is blocked; the record is untouched."""
    table = vtw_table()
    conn = closed(table)
    before = only_record(table)
    conn.now = T0 + 3
    flags = ACK | (FIN if fin else PSH)
    verdict = (
        conn.c(flags, 1002, 5002, dlen=dlen)
        if from_client
        else conn.s(flags, 5002, 1002, dlen=dlen)
    )
    assert verdict == BLOCK
    assert table.pfres[PFRES_BADSTATE] == 1 and table.blocked == 1
    assert only_record(table) == before


# ---- the pool: eviction, expiry, resize -----------------------------------------------------


def test_full_pool_evicts_the_oldest_record() -> None:
    """entries=8 holds 7 records; the 8th close evicts the first one (kill, EVICTED event)."""
    table = vtw_table(vtw=VtwConfig(entries=8))
    events = Recorder(table)
    conns = [closed(table, at=T0 + i, cport=1000 + i) for i in range(8)]
    keys_left = [rec.key for rec in table.vestigial()]
    assert keys_left == [client_key(c) for c in conns[1:]]
    assert table.vtw.stats.kill == 1 and table.vtw.stats.ins == 8 and table.vtw.live == 7
    removed = [e for e in events if isinstance(e, VestigialRemoved)]
    assert [(e.key, e.reason) for e in removed] == [(client_key(conns[0]), RemoveReason.EVICTED)]
    # The evicted connection is gone: its late FIN finds no state.
    conns[0].now = T0 + 9
    matched = table.pfres[PFRES_MATCH]
    assert conns[0].c(FIN | ACK, 1001, 5001) == BLOCK
    assert table.pfres[PFRES_MATCH] == matched + 1 and table.pfres[PFRES_BADSTATE] == 0


def test_purge_expires_records_exactly_at_their_expiry() -> None:
    """purge(t) keeps a record while t < expiry and frees it (EXPIRED) at t == expiry."""
    table = vtw_table()
    events = Recorder(table)
    closed(table, cport=1000)
    closed(table, at=T0 + 5, cport=1001)
    assert table.purge(T0 + 60 - 1e-6) == 0 and table.vtw.live == 2
    assert table.purge(T0 + 60) == 1
    assert [rec.key[-4:-2] for rec in table.vestigial()] == [(1001).to_bytes(2, "big")]
    assert table.purge(T0 + 65) == 1 and table.vtw.live == 0
    reasons = [e.reason for e in events if isinstance(e, VestigialRemoved)]
    assert reasons == [RemoveReason.EXPIRED, RemoveReason.EXPIRED]
    assert table.vtw.stats.dels == 2


@pytest.mark.parametrize(
    "flags,verdict,created", [(ACK, BLOCK, 0), (FIN | ACK, BLOCK, 0), (SYN, PASS, 1)]
)
def test_packet_after_expiry_before_purge_sees_no_state(
    flags: int, verdict: int, created: int
) -> None:
    """A due record is never matched: the packet is handled as if there were none."""
    table = vtw_table()
    conn = closed(table)
    conn.now = T0 + 60
    matched = table.pfres[PFRES_MATCH]  # the implicit rule (block) or a creation
    assert conn.c(flags, 1001 if flags & FIN else 1002, 5002 if flags & ACK else 0) == verdict
    assert table.vtw.live == 0 and table.vtw.stats.dels == 1
    assert table.pfres[PFRES_BADSTATE] == 0
    assert table.pfres[PFRES_MATCH] == matched + 1
    assert table.count == created


def test_shrinking_the_pools_keeps_the_newest_records() -> None:
    """set_vtw_entries(8) on 10 records keeps the 7 newest, with their expiries, oldest first."""
    table = vtw_table(vtw=VtwConfig(entries=16))
    conns = [closed(table, at=T0 + i, cport=1000 + i) for i in range(10)]
    table.set_vtw_entries(8)
    recs = list(table.vestigial())
    assert [r.key for r in recs] == [client_key(c) for c in conns[3:]]
    assert [r.expire for r in recs] == [T0 + i + 60 for i in range(3, 10)]
    assert table.vtw.stats.kill == 3 and table.vtw.stats.ins == 10 and table.vtw.live == 7
    assert all(p.capacity == 7 for p in table.vtw.pools.values())
    # The survivors still work: a late FIN restarts, an exact RST closes.
    conns[9].now = T0 + 20
    assert conns[9].c(FIN | ACK, 1001, 5001) == PASS
    assert conns[5].c(RST, 1002) == PASS
    assert table.vtw.live == 6 and table.pfres[PFRES_BADSTATE] == 0


def test_growing_the_pools_keeps_every_record() -> None:
    """set_vtw_entries to a larger size moves every record over, none killed."""
    table = vtw_table(vtw=VtwConfig(entries=8))
    conns = [closed(table, at=T0 + i, cport=1000 + i) for i in range(5)]
    before = list(table.vestigial())
    table.set_vtw_entries(64)
    assert list(table.vestigial()) == before
    assert table.vtw.stats.kill == 0
    assert [r.key for r in before] == [client_key(c) for c in conns]


def _mixed_time_wait(table: StateTable) -> list[Conn]:
    """Closed connections of three classes and two families, plus one still open."""
    conns = [
        closed(table, at=T0, client="10.1.0.1", server="10.2.0.2"),  # local
        closed(table, at=T0 + 1, client="127.0.0.1", server="127.0.0.1"),  # loopback
        closed(table, at=T0 + 2, client="192.0.2.1", server="198.51.100.1"),  # remote
        closed(table, at=T0 + 3, client="2001:db8:1::c", server="2001:db8:1::5"),
    ]
    rst = Conn(table, cport=7000)
    rst.now = T0 + 4
    handshake(rst)
    assert rst.c(RST, 1001) == PASS
    opened = Conn(table, cport=8000)
    handshake(opened)
    return conns + [rst, opened]


def test_vtw_off_and_on_again_keeps_every_time_wait_connection() -> None:
    """set_vtw_enabled(False) turns every record into a TIME_WAIT state with the same fields
    and expiry; set_vtw_enabled(True) turns them back into the same records."""
    table = vtw_table(local_nets=NETS)
    conns = _mixed_time_wait(table)
    records = sorted(table.vestigial(), key=lambda r: r.key)
    assert len(records) == 5 and table.count == 1
    assert {r.cls for r in records} == {LOCAL, LOOPBACK, REMOTE}

    table.set_vtw_enabled(False)
    assert list(table.vestigial()) == [] and table.vtw.live == 0
    assert table.count == 6
    waiting = sorted(
        (s for s in tcp_states(table) if s.timeout == tmo.TIME_WAIT), key=lambda s: s.key
    )
    assert [
        record_of(s, table.expires_at(s), r.cls) for s, r in zip(waiting, records, strict=True)
    ] == records

    table.set_vtw_enabled(True)
    assert sorted(table.vestigial(), key=lambda r: r.key) == records
    assert table.count == 1 and tcp_states(table)[0].key == client_key(conns[-1])
    # And they still behave as TIME_WAIT: the loopback one expires 2 s after its close.
    assert table.purge(T0 + 3) == 1
    assert table.vtw.live == 4


def test_vtw_switched_on_later_takes_over_full_time_wait_states() -> None:
    """Connections closed with VTW off become records (same expiry) when VTW is switched on,
    and verdicts for their late segments are unchanged."""
    table = StateTable(TableConfig(vtw=VtwConfig(enable=False), local_nets=NETS))
    conns = _mixed_time_wait(table)
    waiting = {s.key: table.expires_at(s) for s in tcp_states(table) if s.timeout == tmo.TIME_WAIT}
    assert len(waiting) == 5
    table.set_vtw_enabled(True)
    assert {r.key: r.expire for r in table.vestigial()} == waiting
    assert table.count == 1
    local = conns[0]
    local.now = T0 + 9
    assert local.c(FIN | ACK, 1001, 5001) == PASS
    assert local.c(ACK | PSH, 1002, 5002, dlen=1) == BLOCK
    assert table.pfres[PFRES_BADSTATE] == 1


# ---- lookups and statistics -----------------------------------------------------------------


def test_time_wait_endpoint_finds_the_record_by_the_initiators_address_and_port() -> None:
    """The port hash answers "is client addr:port held by TIME_WAIT?" and counts each lookup."""
    table = vtw_table()
    conn = closed(table)
    other = closed(table, cport=50000)
    port = table.vtw.stats.port
    found = table.time_wait_endpoint(ip(conn.client), conn.cport)
    assert [r.key for r in found] == [client_key(conn)]
    assert (port.look, port.hit, port.miss) == (1, 1, 0)
    assert [r.key for r in table.time_wait_endpoint(ip(other.client), 50000)] == [client_key(other)]
    assert table.time_wait_endpoint(ip(conn.server), conn.sport) == []  # the responder
    assert table.time_wait_endpoint(ip(conn.client), 49153) == []
    assert table.time_wait_endpoint(ip("10.9.9.9"), conn.cport) == []
    assert (port.look, port.hit, port.miss) == (5, 2, 3)
    assert port.probe >= port.hit and port.max_probe >= 1
    assert table.time_wait_endpoint(ip("2001:db8::c"), conn.cport) == []  # no IPv6 pool


def test_connect_hash_statistics_add_up() -> None:
    """ins/dels/kill follow the records; connect look == hit + miss; searches are counted
    once for the main table and once more when VTW is consulted."""
    table = vtw_table()
    a = closed(table, cport=1000)
    b = closed(table, cport=1001)
    c = closed(table, cport=1002)
    stats = table.vtw.stats
    con = stats.connect
    assert (stats.ins, stats.dels, stats.kill, table.vtw.live) == (3, 0, 0, 3)
    searches = table.fcounters[FCNT_STATE_SEARCH]
    look, hit, miss = con.look, con.hit, con.miss
    a.now = b.now = c.now = T0 + 1
    assert a.c(FIN | ACK, 1001, 5001) == PASS  # forward key: 1 hit
    assert b.s(FIN | ACK, 5001, 1002) == PASS  # reverse: 1 miss then 1 hit
    assert b.c(RST, 1002) == PASS  # close: 1 hit
    assert c.c(SYN, 4242) == PASS  # reuse: 1 hit
    stray = Conn(table, cport=3000)
    assert stray.c(ACK, 1, 1) == BLOCK  # no record: 2 misses
    assert table.fcounters[FCNT_STATE_SEARCH] == searches + 2 * 5
    assert (con.look - look, con.hit - hit, con.miss - miss) == (7, 4, 3)
    assert con.look == con.hit + con.miss
    assert con.probe >= con.hit and con.max_probe >= 1
    assert (stats.ins, stats.dels, stats.kill, table.vtw.live) == (3, 2, 0, 1)
    assert stats.ins - stats.dels - stats.kill == table.vtw.live
    assert table.purge(T0 + 61) == 1
    assert (stats.ins, stats.dels, stats.kill, table.vtw.live) == (3, 3, 0, 0)


def test_events_for_every_way_a_record_comes_and_goes() -> None:
    """StateVestigial on entering TIME_WAIT; VestigialRemoved with CLOSED, REUSED, EXPIRED,
    KILLED and FLUSHED carrying the record's key, id and creatorid."""
    table = vtw_table()
    events = Recorder(table)
    conns = [closed(table, cport=1000 + i) for i in range(5)]
    vest = [e for e in events if isinstance(e, StateVestigial)]
    assert [e.state.key for e in vest] == [client_key(c) for c in conns]
    assert all((e.state.state, e.state.dst.state) == (FIN_WAIT_2, FIN_WAIT_2) for e in vest)
    ids = {e.state.key: e.state.id for e in vest}
    events.clear()

    conns[0].now = conns[1].now = T0 + 1
    conns[0].c(RST, 1002)
    conns[1].c(SYN, 7)
    assert table.kill_vestigial(lambda r: r.key == client_key(conns[2])) == 1
    assert table.purge(T0 + 60) == 2  # conns[3] and [4]
    removed = [e for e in events if isinstance(e, VestigialRemoved)]
    assert [(e.key, e.reason) for e in removed] == [
        (client_key(conns[0]), RemoveReason.CLOSED),
        (client_key(conns[1]), RemoveReason.REUSED),
        (client_key(conns[2]), RemoveReason.KILLED),
        (client_key(conns[3]), RemoveReason.EXPIRED),
        (client_key(conns[4]), RemoveReason.EXPIRED),
    ]
    assert all(e.id == ids[e.key] and e.creatorid == 1 for e in removed)
    assert any(isinstance(e, StateInserted) and e.state.key == client_key(conns[1]) for e in events)


def test_clear_flushes_records_with_an_event() -> None:
    """clear() removes records too, as FLUSHED."""
    table = vtw_table()
    events = Recorder(table)
    conn = closed(table)
    assert table.clear() == 1
    assert table.vtw.live == 0
    assert [(e.key, e.reason) for e in events if isinstance(e, VestigialRemoved)] == [
        (client_key(conn), RemoveReason.FLUSHED)
    ]


# ---- configuration and memory ----------------------------------------------------------------


def _ipv4_pool(entries: int) -> Pool:
    table = vtw_table(vtw=VtwConfig(entries=entries))
    closed(table)
    return table.vtw.pools[(4, REMOTE)]


def test_ipv4_pool_costs_64_bytes_per_slot() -> None:
    """Flat arrays only: 64 bytes per slot for IPv4 (88 with IPv6 keys), nothing per record."""
    pool = Pool(4, REMOTE, 65536, VtwStats(), 0, slots=65536)
    assert pool.capacity == 65535
    assert pool.nbytes == 64 * 65536
    pool6 = Pool(6, REMOTE, 65536, VtwStats(), 0, slots=65536)
    assert pool6.nbytes == (64 + 24) * 65536


def test_a_pool_grows_with_its_records_up_to_its_size() -> None:
    """A pool starts small and doubles when full, keeping every record findable;
    evictions start only at its limit."""
    table = vtw_table(vtw=VtwConfig(entries=4096))
    first = closed(table, cport=1)
    small = table.vtw.pools[(4, REMOTE)].nbytes
    for i in range(2, 4096):  # straight into the pools: 4,094 closes' worth of records
        st_ = State(keys.make(ip("10.1.0.1"), ip("10.2.0.1"), i, 443), 6, i, 1, T0)
        st_.state = st_.dst.state = TIME_WAIT
        assert table.vtw.insert(st_, REMOTE, T0 + 60, T0)
    table.vtw.check()
    pool = table.vtw.pools[(4, REMOTE)]
    assert small < pool.nbytes == 64 * 4096
    assert table.vtw.live == 4095 and table.vtw.stats.kill == 0
    assert table.vestigial_by_id(2, 1) is not None
    assert table.vtw.find(client_key(first), keys.reverse(client_key(first))) is not None
    closed(table, cport=2)
    assert table.vtw.live == 4095 and table.vtw.stats.kill == 1


def test_the_largest_pool_size_costs_memory_only_for_records() -> None:
    """net.inet.tcp.vtw.entries at its maximum allocates nothing up front, and a few
    records cost a small pool, not 2**24 slots' worth."""
    table = vtw_table()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        table.set_vtw_entries(ENTRIES_MAX)
        for i in range(100):
            closed(table, cport=1000 + i)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert table.vtw.live == 100 and table.vtw.usage()[0][3] == ENTRIES_MAX - 1
    assert grown < 1_000_000  # ~64 B x INITIAL_SLOTS plus the table's 100 packets


def test_a_pool_allocates_what_it_counts() -> None:
    """tracemalloc sees the pool's arrays and little else: no hidden over-allocation."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        pool = Pool(4, REMOTE, 65536, VtwStats(), 0, slots=65536)
        allocated = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert pool.nbytes == 64 * 65536
    assert pool.nbytes <= allocated < pool.nbytes + 16384
    assert allocated / pool.capacity < 64.1


def test_a_creator_the_pool_cannot_name_stays_a_full_time_wait_state() -> None:
    """Records name creators by a 16-bit index; a 65,537th creator keeps a full state,
    which behaves exactly as a record would."""
    table = vtw_table()
    closed(table, cport=1000)
    for creatorid in range(2, 65537):  # 65,535 more creators (65,536 in all), a record each
        st_ = State(keys.make(bytes(4), bytes(4), creatorid & 0xFFFF, 2), 6, 1, creatorid, T0)
        st_.state = st_.dst.state = TIME_WAIT
        assert table.vtw.insert(st_, REMOTE, T0 + 60, T0)
    table.hostid = 0x77777777
    conn = closed(table, cport=2000)
    assert table.vtw.live == 65535 and table.count == 1
    st = conn.st
    assert st.timeout == tmo.TIME_WAIT and st.creatorid == 0x77777777
    conn.now += 5
    assert conn.c(FIN | ACK, 1001, 5001) == PASS  # a late FIN still passes
    assert conn.c(ACK | PSH, 1002, 5002, dlen=10) == BLOCK  # new data does not


@pytest.mark.parametrize("entries", [1000, 3, 2, 65535, 1 << 25])
def test_pool_size_must_be_a_power_of_two_in_range(entries: int) -> None:
    """VtwConfig refuses sizes that are not a power of two >= 4 (pydantic ValidationError)."""
    with pytest.raises(ValidationError):
        VtwConfig(entries=entries)
    with pytest.raises(ValidationError):
        TableConfig(vtw={"entries": entries})
    assert VtwConfig(entries=1024).entries == 1024


def test_retransmission_in_a_full_pool_kills_no_other_connection() -> None:
    """A PASSed retransmission must not cost another connection its TIME_WAIT."""
    table = vtw_table(vtw=VtwConfig(entries=8))
    conns = [closed(table, at=T0 + i, cport=1000 + i) for i in range(7)]
    conns[3].now = T0 + 10
    assert conns[3].c(FIN | ACK, 1001, 5001) == PASS
    assert table.vtw.live == 7 and table.vtw.stats.kill == 0
    # It is now the newest: the next close evicts the oldest (conns[0]), not it.
    closed(table, at=T0 + 11, cport=2000)
    assert table.vtw.stats.kill == 1
    ports = sorted(keys.unpack(rec.key)[1] for rec in table.vestigial())
    assert ports == [1001, 1002, 1003, 1004, 1005, 1006, 2000]


def test_slot_freed_early_is_reused_before_any_eviction() -> None:
    """A record closed by RST frees its slot at once: a full pool evicts only when it
    really holds capacity records."""
    table = vtw_table(vtw=VtwConfig(entries=8))
    conns = [closed(table, at=T0 + i, cport=1000 + i) for i in range(7)]
    rec = next(r for r in table.vestigial() if keys.unpack(r.key)[1] == 1003)
    assert conns[3].c(RST, rec.src.seqlo) == PASS
    assert table.vtw.live == 6
    closed(table, at=T0 + 8, cport=2000)
    assert table.vtw.live == 7 and table.vtw.stats.kill == 0


# ---- property: VTW on and off give the same verdicts -----------------------------------------

# (from client, flags, seq delta, ack delta, dlen, time step, purge first)
Late = tuple[bool, int, int, int, int, float, bool]
TAIL_FLAGS = (ACK, FIN | ACK, RST, RST | ACK, SYN, SYN | ACK, PSH | ACK)
NEAR = st.one_of(st.just(0), st.sampled_from([1, -1]), st.integers(-3000, 3000))
STEP = st.one_of(st.just(0.0), st.floats(0, 5), st.floats(55, 130))


@st.composite
def tails(draw: st.DrawFn) -> list[Late]:
    """Extra segments: (from client, flags, seq delta, ack delta, dlen, time step, purge)."""
    return draw(
        st.lists(
            st.tuples(
                st.booleans(),
                st.sampled_from(TAIL_FLAGS),
                NEAR,
                NEAR,
                st.one_of(st.just(0), st.integers(1, 1400)),
                STEP,
                st.sampled_from([False, False, False, True]),
            ),
            max_size=12,
        )
    )


def _time_wait_view(table: StateTable) -> list[tuple]:
    """Every TIME_WAIT connection (full state or record) as comparable fields."""
    out = [(r.key, r.id, r.src, r.dst, r.expire, r.cls) for r in table.vestigial()]
    for s in tcp_states(table):
        if s.timeout == tmo.TIME_WAIT:
            cls = table.mslt.state_class(s.key, s.flags)
            out.append((s.key, s.id, peer_view(s), peer_view(s.dst), s.expire, cls))
    return sorted(out)


def _live_view(table: StateTable) -> list[tuple]:
    """Every TCP state not in TIME_WAIT."""
    return sorted(
        (s.key, s.id, peer_view(s), peer_view(s.dst), s.timeout, s.expire)
        for s in tcp_states(table)
        if s.timeout != tmo.TIME_WAIT
    )


@settings(
    max_examples=200,
    deadline=None,
    # checked_pools patches StateTable once per test; every example runs under it.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(conv=conversations(), tail=tails())
def test_vtw_on_and_off_give_identical_verdicts(conv: Conversation, tail: list[Late]) -> None:
    """For any conversation plus late segments, VTW changes where TIME_WAIT lives, never a
    verdict, a PFRES counter, a purge count or a TIME_WAIT connection's fields."""
    off = replay(conv)  # VTW off; every packet checked
    on = Conn(vtw_table(vtw=VtwConfig(enable=True)))
    for i, seg in enumerate(conv.segments):
        on.now = T0 + i
        assert (
            on.send(seg.client, seg.flags, seg.seq & M, seg.ack & M, seg.win, seg.dlen, seg.options)
            == PASS
        ), i
    assert on.table.pfres == off.table.pfres
    assert _time_wait_view(on.table) == _time_wait_view(off.table)

    now = off.now
    verdicts: dict[str, list[int]] = {"on": [], "off": []}
    for from_client, flags, dseq, dack, dlen, step, purge in tail:
        now += step
        end = conv.client if from_client else conv.server
        seq, ack = (end.snd_nxt + dseq) & M, (end.rcv_nxt + dack) & M
        for name, conn in (("on", on), ("off", off)):
            conn.now = now
            if purge:
                verdicts[name].append(-1 - conn.table.purge(now))
            verdicts[name].append(conn.send(from_client, flags, seq, ack, end.win, dlen))
        assert verdicts["on"] == verdicts["off"]
        assert on.table.pfres == off.table.pfres
        assert _time_wait_view(on.table) == _time_wait_view(off.table)
        assert _live_view(on.table) == _live_view(off.table)
        assert on.table.count + on.table.vtw.live == off.table.count
    assert (on.table.passed, on.table.blocked) == (off.table.passed, off.table.blocked)


# ---- long uptimes: a pool's 32-bit tick range -----------------------------------------------

DAY = 86400.0


def test_a_pool_is_rebuilt_when_expiries_leave_its_tick_range() -> None:
    """Expiries are uint32 ticks of 1/1024 s around a pool's base (+-24 days): a record
    made weeks later rebuilds the pool around the new time, moving the live records and
    freeing those long due, and everything still matches exactly."""
    table = vtw_table(mslt=MsltConfig(remote=3600))  # TIME_WAIT 2 h
    events = Recorder(table)
    closed(table, at=T0, cport=1000)  # due at T0 + 2 h
    first = table.vtw.pools[(4, REMOTE)]
    late = closed(table, at=T0 + 30 * DAY, cport=2000)
    pool = table.vtw.pools[(4, REMOTE)]
    assert pool is not first and pool.fits(T0 + 30 * DAY)
    assert [keys.unpack(r.key)[1] for r in table.vestigial()] == [2000]
    assert any(isinstance(e, VestigialRemoved) and e.reason is RemoveReason.EXPIRED for e in events)
    assert table.vtw.live == 1 and table.vtw.stats.ins - table.vtw.stats.dels == 1
    # The surviving record keeps its exact expiry and its behaviour.
    assert only_record(table).expire == T0 + 30 * DAY + 7200
    late.now += 60
    assert late.c(FIN | ACK, 1001, 5001) == PASS
    assert only_record(table).expire == T0 + 30 * DAY + 60 + 7200


def test_a_restart_past_the_tick_range_rebuilds_and_keeps_the_record() -> None:
    """A record restarted so late that its new expiry leaves the range (a pool whose
    base is old) is moved to a rebuilt pool and keeps working."""
    table = vtw_table(mslt=MsltConfig(remote=3600))
    conn = closed(table, at=T0, cport=1000)
    pool = table.vtw.pools[(4, REMOTE)]
    # A late FIN every hour keeps the record for weeks, until a restart leaves the range.
    while pool.fits(conn.now + 3600 + 7200):
        conn.now += 3600
        assert conn.c(FIN | ACK, 1001, 5001) == PASS
    assert table.vtw.pools[(4, REMOTE)] is pool
    conn.now += 3600
    assert conn.c(FIN | ACK, 1001, 5001) == PASS
    assert table.vtw.pools[(4, REMOTE)] is not pool
    assert table.vtw.live == 1 and only_record(table).expire == conn.now + 7200


# ---- the (id, creatorid) index and the invariants ----------------------------------------


def test_records_are_found_and_removed_by_sync_identity() -> None:
    """A peer's delete names a record by (id, creatorid): found without a scan, removed
    with an event, and other creators' records with the same id are left alone."""
    table = vtw_table()
    events = Recorder(table)
    conns = [closed(table, cport=1000 + i) for i in range(3)]
    ids = [r.id for r in table.vestigial()]
    table.hostid = 0x99
    closed(table, cport=2000)
    other = only_record_of(table, 0x99)
    found = table.vestigial_by_id(ids[1], 1)
    assert found is not None and found.key == client_key(conns[1])
    assert table.vestigial_by_id(ids[1], 0x99) is None
    assert table.vestigial_by_id(other.id, 0x99) == other
    assert table.remove_vestigial_by_id(ids[1], 1, RemoveReason.PEER)
    assert not table.remove_vestigial_by_id(ids[1], 1, RemoveReason.PEER)
    assert table.vestigial_by_id(ids[1], 1) is None
    assert [(e.key, e.reason) for e in events if isinstance(e, VestigialRemoved)] == [
        (client_key(conns[1]), RemoveReason.PEER)
    ]
    assert sorted(r.id for r in table.vestigial()) == sorted([ids[0], ids[2], other.id])


def only_record_of(table: StateTable, creatorid: int) -> Vestigial:
    (record,) = [r for r in table.vestigial() if r.creatorid == creatorid]
    return record


def test_unlinking_a_slot_missing_from_its_chain_fails_loudly() -> None:
    """A record whose hash bucket lost it raises PoolCorruption on removal (it used to
    loop forever)."""
    table = vtw_table()
    closed(table, cport=1000)
    closed(table, cport=1001)
    pool = table.vtw.pools[(4, REMOTE)]
    oldest = next(pool.slots())
    for heads in (pool.key_heads, pool.port_heads, pool.id_heads):
        for bucket in range(len(heads)):
            if heads[bucket] == oldest:
                heads[bucket] = 0
    with pytest.raises(PoolCorruption):
        table.vtw.check()
    with pytest.raises(PoolCorruption, match="not in the chain"):
        table.vtw.remove(pool, oldest, RemoveReason.KILLED)


@pytest.mark.parametrize("damage", ["age", "free", "live", "tag"])
def test_check_finds_each_kind_of_damage(damage: str) -> None:
    table = vtw_table()
    for i in range(3):
        closed(table, cport=1000 + i)
    table.vtw.check()
    pool = table.vtw.pools[(4, REMOTE)]
    first, second, _ = pool.slots()
    if damage == "age":
        pool.older[second] = 0
    elif damage == "free":
        pool.newer[pool.free] = first  # the free list runs into a record
    elif damage == "live":
        pool.live += 1
    else:
        pool.tags[first] ^= 1
    with pytest.raises(PoolCorruption):
        pool.check()
