"""pf's TCP window tracking (statetable/tcp.py) driven through real frames and a real table.

Every packet is an Ethernet frame from tests/packets.py, decoded by decode_frame() and fed
to StateTable.test(). The expectations follow OpenBSD's pf_tcp_track_full() (pf.c): a
segment must fit the receiver's window (seqlo..seqhi of the other side, scaled), may ack
at most what was sent, and moves the peer states on SYN/FIN/RST. The first part walks
hand-built sequences; the second generates whole correct conversations (hypothesis) and
checks the window-tracking invariants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from statetable import (
    BLOCK,
    PASS,
    RemoveReason,
    StateInserted,
    StateRemoved,
    StateTable,
    TableConfig,
    decode_frame,
)
from statetable import timeouts as tmo
from statetable.counters import (
    FCNT_STATE_INSERT,
    FCNT_STATE_REMOVALS,
    FCNT_STATE_SEARCH,
    PFRES_BADSTATE,
)
from statetable.state import (
    CLOSED,
    CLOSING,
    ESTABLISHED,
    FIN_WAIT_2,
    SYN_SENT,
    TIME_WAIT,
    Peer,
    State,
)
from statetable.timeouts import UNLINKED
from statetable.vtw import VtwConfig
from tests import packets
from tests.changes import Recorder
from tests.packets import ACK, FIN, PSH, RST, SYN

M = 0xFFFFFFFF
H = 0x80000000
MAXACKWINDOW = 65535 + 1500
T0 = 1000.0
TW_REMOTE = 60  # TIME_WAIT of the "remote" MSLT class: 2 x 30 s

# ---- helpers -------------------------------------------------------------------------


class Conn:
    """One TCP connection (client -> server) through a real StateTable."""

    def __init__(
        self,
        table: StateTable | None = None,
        v6: bool = False,
        client: str | None = None,
        server: str | None = None,
        cport: int = 49152,
        sport: int = 443,
    ) -> None:
        # VTW off by default: these tests look at the full state through TIME_WAIT too.
        self.table = (
            table if table is not None else StateTable(TableConfig(vtw=VtwConfig(enable=False)))
        )
        self.client = client or ("2001:db8::c" if v6 else "10.1.0.1")
        self.server = server or ("2001:db8::5" if v6 else "10.2.0.2")
        self.cport, self.sport = cport, sport
        self.now = T0

    def send(
        self,
        from_client: bool,
        flags: int,
        seq: int,
        ack: int = 0,
        win: int = 65535,
        dlen: int = 0,
        options: bytes = b"",
    ) -> int:
        if from_client:
            src, dst, sp, dp = self.client, self.server, self.cport, self.sport
        else:
            src, dst, sp, dp = self.server, self.client, self.sport, self.cport
        frame = packets.tcp(src, dst, sp, dp, flags, seq, ack, win, b"\0" * dlen, options)
        pkt = decode_frame(frame, 1)
        assert isinstance(pkt, tuple), pkt
        return self.table.test(pkt, self.now)

    def c(
        self,
        flags: int,
        seq: int,
        ack: int = 0,
        win: int = 65535,
        dlen: int = 0,
        options: bytes = b"",
    ) -> int:
        """A segment from the client."""
        return self.send(True, flags, seq, ack, win, dlen, options)

    def s(
        self,
        flags: int,
        seq: int,
        ack: int = 0,
        win: int = 65535,
        dlen: int = 0,
        options: bytes = b"",
    ) -> int:
        """A segment from the server."""
        return self.send(False, flags, seq, ack, win, dlen, options)

    @property
    def st(self) -> State:
        states = [s for s in self.table.states() if s.proto == 6]
        assert len(states) == 1, states
        return states[0]

    def peers(self) -> tuple[int, int]:
        return self.st.state, self.st.dst.state

    @property
    def mismatches(self) -> int:
        return self.table.pfres[PFRES_BADSTATE]


def handshake(
    conn: Conn,
    cisn: int = 1000,
    sisn: int = 5000,
    cwin: int = 65535,
    swin: int = 65535,
    cws: int | None = None,
    sws: int | None = None,
    ack_win: int | None = None,
) -> None:
    """SYN, SYN|ACK, ACK; every one must pass."""
    assert conn.c(SYN, cisn, win=cwin, options=packets.tcp_options(1460, cws)) == PASS
    assert (
        conn.s(SYN | ACK, sisn, cisn + 1, win=swin, options=packets.tcp_options(1460, sws)) == PASS
    )
    assert conn.c(ACK, cisn + 1, sisn + 1, win=cwin if ack_win is None else ack_win) == PASS


def established(cisn: int = 1000, sisn: int = 5000, **kw: int) -> Conn:
    conn = Conn()
    handshake(conn, cisn, sisn, **kw)
    return conn


def close_client_first(conn: Conn, cseq: int, sseq: int) -> None:
    """Client FIN, server ACK, server FIN, client ACK (cseq/sseq: next sequence numbers)."""
    assert conn.c(FIN | ACK, cseq, sseq) == PASS
    assert conn.s(ACK, sseq, cseq + 1) == PASS
    assert conn.s(FIN | ACK, sseq, cseq + 1) == PASS
    assert conn.c(ACK, cseq + 1, sseq + 1) == PASS


def peer_snapshot(p: Peer) -> tuple[int, ...]:
    return p.state, p.seqlo, p.seqhi, p.max_win, p.wscale


def seq_geq(a: int, b: int) -> bool:
    return ((a - b) & M) < H


# ---- handshake ------------------------------------------------------------------------


def test_syn_creates_a_half_open_state() -> None:
    conn = Conn()
    assert conn.c(SYN, 1000, win=64240) == PASS
    st = conn.st
    assert conn.peers() == (SYN_SENT, CLOSED)
    assert st.seqlo == 1000 and st.seqhi == 1002 and st.max_win == 64240
    assert st.dst.seqhi == 1 and st.dst.max_win == 1
    assert st.timeout == tmo.TCP_FIRST
    assert conn.table.expires_at(st) == T0 + 120
    assert conn.table.half_open == 1


def test_syn_ack_gives_established_syn_sent() -> None:
    conn = Conn()
    conn.c(SYN, 1000)
    assert conn.s(SYN | ACK, 5000, 1001, win=28960) == PASS
    assert conn.peers() == (ESTABLISHED, SYN_SENT)
    assert conn.st.timeout == tmo.TCP_OPENING
    assert conn.st.dst.seqlo == 5001 and conn.st.dst.max_win == 28960
    assert conn.st.seqhi == 1001 + 28960  # client may send one server window


def test_ack_completes_the_handshake() -> None:
    conn = established()
    assert conn.peers() == (ESTABLISHED, ESTABLISHED)
    assert conn.st.timeout == tmo.TCP_ESTABLISHED
    assert conn.table.expires_at(conn.st) == T0 + 86400
    assert conn.mismatches == 0


def test_half_open_counter_follows_the_source_peer() -> None:
    conn = Conn()
    table = conn.table
    conn.c(SYN, 1000)
    assert table.half_open == 1
    conn.s(SYN | ACK, 5000, 1001)  # source peer now ESTABLISHED
    assert table.half_open == 0
    conn.c(ACK, 1001, 5001)
    assert table.half_open == 0
    other = Conn(table, cport=50000)
    other.c(SYN, 77)
    assert table.half_open == 1
    table.clear()
    assert table.half_open == 0


def test_connection_refused_rst_closes_the_half_open_state() -> None:
    conn = Conn()
    conn.c(SYN, 1000)
    assert conn.s(RST | ACK, 0, 1001, win=0) == PASS
    assert conn.peers() == (TIME_WAIT, TIME_WAIT)
    assert conn.st.timeout == tmo.TIME_WAIT
    assert conn.table.expires_at(conn.st) == conn.now + TW_REMOTE
    assert conn.table.half_open == 0


def test_retransmitted_syn_passes() -> None:
    conn = Conn()
    conn.c(SYN, 1000)
    conn.now += 1
    assert conn.c(SYN, 1000) == PASS
    assert conn.peers() == (SYN_SENT, CLOSED)
    assert conn.table.count == 1


# ---- close shapes and timeouts ------------------------------------------------------------


def test_client_close_first_walks_the_timeouts() -> None:
    conn = established()
    expect = [
        (lambda: conn.c(FIN | ACK, 1001, 5001), (CLOSING, ESTABLISHED), tmo.TCP_CLOSING),
        (lambda: conn.s(ACK, 5001, 1002), (FIN_WAIT_2, ESTABLISHED), tmo.TCP_CLOSING),
        (lambda: conn.s(FIN | ACK, 5001, 1002), (FIN_WAIT_2, CLOSING), tmo.TCP_FINWAIT),
    ]
    for step, (send, peers, timeout) in enumerate(expect):
        conn.now = T0 + step + 1
        assert send() == PASS, step
        assert conn.peers() == peers, step
        assert conn.st.timeout == timeout, step
        assert conn.st.expire == conn.now
        assert conn.table.expires_at(conn.st) == conn.now + tmo.DEFAULTS[timeout]
    # The last ACK: both FINs acknowledged, TIME_WAIT for 2 x MSL (remote: 60 s), not
    # pf's tcp.closed.
    conn.now += 1
    assert conn.c(ACK, 1002, 5002) == PASS
    assert conn.peers() == (FIN_WAIT_2, FIN_WAIT_2)
    assert conn.st.timeout == tmo.TIME_WAIT
    assert conn.table.expires_at(conn.st) == conn.now + TW_REMOTE
    assert conn.mismatches == 0


def test_server_close_first_reaches_fin_wait_2_both() -> None:
    conn = established()
    assert conn.s(FIN | ACK, 5001, 1001) == PASS
    assert conn.peers() == (ESTABLISHED, CLOSING)
    assert conn.st.timeout == tmo.TCP_CLOSING
    assert conn.c(ACK, 1001, 5002) == PASS
    assert conn.peers() == (ESTABLISHED, FIN_WAIT_2)
    assert conn.c(FIN | ACK, 1001, 5002) == PASS
    assert conn.peers() == (CLOSING, FIN_WAIT_2)
    assert conn.st.timeout == tmo.TCP_FINWAIT
    assert conn.s(ACK, 5002, 1002) == PASS
    assert conn.peers() == (FIN_WAIT_2, FIN_WAIT_2)
    assert conn.st.timeout == tmo.TIME_WAIT
    assert conn.table.expires_at(conn.st) == conn.now + TW_REMOTE


def test_simultaneous_close() -> None:
    conn = established()
    assert conn.c(FIN | ACK, 1001, 5001) == PASS
    assert conn.s(FIN | ACK, 5001, 1001) == PASS  # sent before the client's FIN arrived
    assert conn.st.state >= CLOSING and conn.st.dst.state >= CLOSING
    assert conn.st.timeout in (tmo.TCP_FINWAIT, tmo.TCP_CLOSED)
    assert conn.c(ACK, 1002, 5002) == PASS
    assert conn.s(ACK, 5002, 1002) == PASS
    assert conn.peers() == (FIN_WAIT_2, FIN_WAIT_2)
    assert conn.st.timeout == tmo.TIME_WAIT
    assert conn.mismatches == 0


def test_half_close_server_keeps_sending() -> None:
    conn = established()
    conn.c(FIN | ACK, 1001, 5001)
    conn.s(ACK, 5001, 1002)
    for i in range(5):
        assert conn.s(ACK | PSH, 5001 + i * 1000, 1002, dlen=1000) == PASS
        assert conn.c(ACK, 1002, 5001 + (i + 1) * 1000) == PASS
    assert conn.peers() == (FIN_WAIT_2, ESTABLISHED)
    assert conn.st.timeout == tmo.TCP_CLOSING
    close_seq = 5001 + 5000
    assert conn.s(FIN | ACK, close_seq, 1002) == PASS
    assert conn.c(ACK, 1002, close_seq + 1) == PASS
    assert conn.peers() == (FIN_WAIT_2, FIN_WAIT_2)


def test_data_then_close_with_fin_on_the_last_segment() -> None:
    conn = established()
    assert conn.c(ACK | PSH, 1001, 5001, dlen=300) == PASS
    assert conn.s(ACK | PSH, 5001, 1301, dlen=2000) == PASS
    assert conn.c(FIN | ACK, 1301, 7001, dlen=10) == PASS  # data + FIN
    assert conn.st.seqlo == 1312
    assert conn.s(FIN | ACK, 7001, 1312) == PASS
    assert conn.c(ACK, 1312, 7002) == PASS
    assert conn.peers() == (FIN_WAIT_2, FIN_WAIT_2)
    assert conn.mismatches == 0


# ---- RST ---------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_rst_exact_match_passes_and_sets_time_wait(delta: int) -> None:
    conn = established()
    conn.c(ACK | PSH, 1001, 5001, dlen=100)
    assert conn.st.seqlo == 1101
    conn.now += 5
    assert conn.c(RST | ACK, 1101 + delta, 5001) == PASS
    assert conn.peers() == (TIME_WAIT, TIME_WAIT)
    assert conn.st.timeout == tmo.TIME_WAIT
    assert conn.st.expire == conn.now + TW_REMOTE


def test_rst_without_ack_from_the_server_passes() -> None:
    conn = established()
    assert conn.s(RST, 5001) == PASS
    assert conn.peers() == (TIME_WAIT, TIME_WAIT)


def test_rst_ack_with_zero_ack_passes() -> None:
    conn = established()
    conn.c(ACK | PSH, 1001, 5001, dlen=10)
    assert conn.c(RST | ACK, 1011, 0) == PASS
    assert conn.peers() == (TIME_WAIT, TIME_WAIT)


@pytest.mark.parametrize("offset", [2, 500, 30000, 10**6, 2**31 - 1, -2, -50000])
def test_rst_with_seq_off_the_mark_is_blocked(offset: int) -> None:
    conn = established()
    conn.c(ACK | PSH, 1001, 5001, dlen=100)
    before = peer_snapshot(conn.st), peer_snapshot(conn.st.dst)
    assert conn.c(RST | ACK, (1101 + offset) & M, 5001) == BLOCK
    assert conn.mismatches == 1
    assert conn.table.blocked == 1
    assert (peer_snapshot(conn.st), peer_snapshot(conn.st.dst)) == before
    assert conn.peers() == (ESTABLISHED, ESTABLISHED)


# ---- windows -----------------------------------------------------------------------------


def test_data_up_to_the_window_passes_and_one_byte_more_is_blocked() -> None:
    conn = established(swin=1000)  # the server offers 1000 bytes
    assert conn.st.seqhi == 1001 + 1000
    assert conn.c(ACK | PSH, 1001, 5001, dlen=1001) == BLOCK
    assert conn.mismatches == 1
    assert conn.c(ACK | PSH, 1001, 5001, dlen=1000) == PASS
    assert conn.c(ACK | PSH, 2001, 5001, dlen=1) == BLOCK  # window is full
    assert conn.s(ACK, 5001, 2001, win=1000) == PASS  # acked, window reopens
    assert conn.c(ACK | PSH, 2001, 5001, dlen=1000) == PASS
    assert conn.mismatches == 2


def test_fin_needs_no_window_space() -> None:
    conn = established(swin=100)
    assert conn.c(ACK | PSH, 1001, 5001, dlen=100) == PASS
    assert conn.c(FIN | ACK, 1101, 5001) == PASS
    assert conn.peers() == (CLOSING, ESTABLISHED)


def test_zero_window_allows_one_byte_probe() -> None:
    conn = established()
    conn.c(ACK | PSH, 1001, 5001, dlen=100)
    assert conn.s(ACK, 5001, 1101, win=0) == PASS
    assert conn.st.seqhi == 1001 + 65535  # seqhi never shrinks
    conn2 = established(swin=0)
    assert conn2.st.seqhi == 1002  # ack + max(0, 1)
    assert conn2.c(ACK | PSH, 1001, 5001, dlen=1) == PASS
    assert conn2.c(ACK | PSH, 1002, 5001, dlen=1) == BLOCK


def test_retransmission_within_one_window_back_passes() -> None:
    # 600 bytes at a time, each acked with a 1000-byte window.
    conn = established(swin=1000)
    seq = 1001
    for _ in range(3):
        assert conn.c(ACK | PSH, seq, 5001, dlen=600) == PASS
        seq += 600
        assert conn.s(ACK, 5001, seq, win=1000) == PASS
    assert conn.st.seqlo == 2801 and conn.st.dst.max_win == 1000
    # Exactly one window back (seq == seqlo - max_win) passes; one byte further is blocked.
    assert conn.c(ACK | PSH, 2801 - 1000, 5001, dlen=100) == PASS
    assert conn.c(ACK | PSH, 2801 - 1001, 5001, dlen=100) == BLOCK
    assert conn.st.seqlo == 2801  # retransmissions do not move seqlo back
    assert conn.mismatches == 1


def test_ack_far_beyond_what_was_sent_is_blocked() -> None:
    conn = established()
    conn.s(ACK | PSH, 5001, 1001, dlen=100)
    # ackskew = dst.seqlo - ack must stay >= -MAXACKWINDOW.
    assert conn.c(ACK, 1001, 5101 + MAXACKWINDOW) == PASS
    assert conn.c(ACK, 1001, 5101 + MAXACKWINDOW + 1) == BLOCK


def test_ack_too_far_behind_is_blocked() -> None:
    conn = established()
    seq = 5001
    for _ in range(3):
        assert conn.s(ACK | PSH, seq, 1001, dlen=60000) == PASS
        seq += 60000
        assert conn.c(ACK, 1001, seq) == PASS
    # An ack more than MAXACKWINDOW behind the server's seqlo.
    assert conn.c(ACK, 1001, seq - MAXACKWINDOW) == PASS
    assert conn.c(ACK, 1001, seq - MAXACKWINDOW - 1) == BLOCK


def test_syn_window_has_the_scale_removed() -> None:
    conn = Conn()
    assert conn.c(SYN, 1000, win=65535, options=packets.tcp_options(1460, 7)) == PASS
    assert conn.st.wscale == 0x87
    assert conn.st.max_win == 512  # ceil(65535 / 128)
    assert conn.s(SYN | ACK, 5000, 1001, win=65535, options=packets.tcp_options(1460, 3)) == PASS
    assert conn.st.dst.wscale == 0x83
    assert conn.st.dst.max_win == 8192  # ceil(65535 / 8)
    assert conn.st.dst.seqhi == 5001 + (512 << 7)
    assert conn.st.seqhi == 1001 + (8192 << 3)


def test_window_scaling_when_both_syns_carry_it() -> None:
    conn = Conn()
    assert conn.c(SYN, 1000, win=1280, options=packets.tcp_options(1460, 7)) == PASS
    assert conn.s(SYN | ACK, 5000, 1001, win=800, options=packets.tcp_options(1460, 3)) == PASS
    assert conn.st.dst.seqhi == 5001 + 1280  # SYN windows are not scaled
    assert conn.st.seqhi == 1001 + 800
    assert conn.c(ACK, 1001, 5001, win=20) == PASS  # 20 << 7 = 2560 bytes
    assert conn.st.dst.seqhi == 5001 + 2560
    assert conn.s(ACK, 5001, 1001, win=1000) == PASS  # 1000 << 3 = 8000 bytes
    assert conn.st.seqhi == 1001 + 8000
    assert conn.st.dst.max_win == 1000
    assert conn.c(ACK | PSH, 1001, 5001, win=20, dlen=8001) == BLOCK
    assert conn.c(ACK | PSH, 1001, 5001, win=20, dlen=8000) == PASS
    assert conn.s(ACK | PSH, 5001, 9001, win=1000, dlen=2560) == PASS
    assert conn.s(ACK | PSH, 5001 + 2560, 9001, win=1000, dlen=1) == BLOCK
    assert conn.mismatches == 2


def test_large_window_scale_shift_14() -> None:
    conn = Conn()
    conn.c(SYN, 1000, options=packets.tcp_options(1460, 14))
    conn.s(SYN | ACK, 5000, 1001, options=packets.tcp_options(1460, 14))
    conn.c(ACK, 1001, 5001, win=4)
    assert conn.s(ACK, 5001, 1001, win=65535) == PASS
    assert conn.st.seqhi == (1001 + (65535 << 14)) & M
    seq = 1001
    for _ in range(20):  # far beyond 64 KiB, all within the window
        assert conn.c(ACK | PSH, seq, 5001, win=4, dlen=60000) == PASS
        seq += 60000
    assert conn.mismatches == 0


@pytest.mark.parametrize(("cws", "sws"), [(7, None), (None, 7)])
def test_window_scaling_needs_both_sides(cws: int | None, sws: int | None) -> None:
    conn = Conn()
    assert conn.c(SYN, 1000, win=65535, options=packets.tcp_options(1460, cws)) == PASS
    assert conn.s(SYN | ACK, 5000, 1001, win=20000, options=packets.tcp_options(1460, sws)) == PASS
    assert conn.st.wscale == 0 and conn.st.dst.wscale == 0
    assert conn.st.max_win == 65535  # client's window restored, unscaled
    assert conn.c(ACK, 1001, 5001, win=30000) == PASS
    assert conn.st.dst.seqhi == 5001 + 65535  # 30000 was not shifted past the SYN window
    assert conn.s(ACK, 5001, 1001, win=1000) == PASS
    assert conn.c(ACK | PSH, 1001, 5001, dlen=20001) == BLOCK  # 20000: SYN|ACK window
    assert conn.c(ACK | PSH, 1001, 5001, dlen=20000) == PASS


def test_wscale_on_a_later_segment_is_ignored() -> None:
    conn = Conn()
    conn.c(SYN, 1000)
    conn.s(SYN | ACK, 5000, 1001)
    conn.c(ACK, 1001, 5001, options=packets.tcp_options(wscale=9))
    assert conn.st.wscale == 0 and conn.st.dst.wscale == 0


# ---- sequence wrap -----------------------------------------------------------------------


def test_sequence_numbers_wrap_around() -> None:
    cisn, sisn = 2**32 - 50, 2**32 - 20000
    conn = established(cisn, sisn)
    cseq, sseq = (cisn + 1) & M, (sisn + 1) & M
    assert conn.c(ACK | PSH, cseq, sseq, dlen=1000) == PASS  # crosses 2**32
    cseq = (cseq + 1000) & M
    assert cseq == 951
    assert conn.st.seqlo == 951
    assert conn.s(ACK | PSH, sseq, cseq, dlen=15000) == PASS
    sseq = (sseq + 15000) & M
    assert conn.s(ACK | PSH, sseq, cseq, dlen=15000) == PASS  # crosses 2**32
    sseq = (sseq + 15000) & M
    assert sseq == 10001
    assert conn.c(ACK, cseq, sseq) == PASS
    assert conn.st.dst.seqlo == 10001
    # Retransmission from before the wrap still counts as "one window back".
    assert conn.c(ACK | PSH, (cisn + 1) & M, sseq, dlen=1000) == PASS
    assert conn.st.seqlo == 951
    close_client_first(conn, cseq, sseq)
    assert conn.peers() == (FIN_WAIT_2, FIN_WAIT_2)
    assert conn.mismatches == 0


def test_out_of_window_detection_across_the_wrap() -> None:
    conn = established(2**32 - 10, 5000, swin=1000)
    # Window ends at (2**32 - 9) + 1000 = 991 after wrapping.
    assert conn.st.seqhi == 991
    assert conn.c(ACK | PSH, 2**32 - 9, 5001, dlen=1001) == BLOCK
    assert conn.c(ACK | PSH, 2**32 - 9, 5001, dlen=1000) == PASS


# ---- after close: pf's loose match (one side done) and TIME_WAIT (both done) -----------


def half_closed_conn() -> Conn:
    """The client closed and was acked, the server still sends: (FIN_WAIT_2, ESTABLISHED)."""
    conn = established()
    conn.c(ACK | PSH, 1001, 5001, dlen=100)
    conn.s(ACK, 5001, 1101)
    conn.now = T0 + 1
    conn.c(FIN | ACK, 1101, 5001)
    conn.s(ACK, 5001, 1102)
    assert conn.peers() == (FIN_WAIT_2, ESTABLISHED)
    assert conn.st.seqlo == 1102 and conn.st.seqhi == 1102 + 65535
    return conn


def closed_conn() -> Conn:
    """A connection closed client first, in TIME_WAIT since T0 + 1."""
    conn = established()
    conn.c(ACK | PSH, 1001, 5001, dlen=100)
    conn.s(ACK, 5001, 1101)
    conn.now = T0 + 1
    close_client_first(conn, 1101, 5001)
    assert conn.peers() == (FIN_WAIT_2, FIN_WAIT_2)
    assert conn.st.timeout == tmo.TIME_WAIT
    assert conn.st.seqlo == 1102 and conn.st.dst.seqlo == 5002
    return conn


def test_loose_match_after_half_close_does_not_refresh_the_timeout() -> None:
    conn = half_closed_conn()
    conn.now = T0 + 30
    # A stray ACK whose ack is wildly ahead fails the window check (ackskew) but passes
    # the loose match: the client is done.
    assert conn.c(ACK, 1102, 5001 + 100000) == PASS
    assert conn.st.expire == T0 + 1
    assert conn.mismatches == 0
    # The same packet on an established connection is blocked.
    live = established()
    assert live.c(ACK, 1001, 5001 + 100000) == BLOCK


def test_loose_match_accepts_data_up_to_maxackwindow_past_seqhi() -> None:
    # pf: SEQ_GEQ(src->seqhi + MAXACKWINDOW, data_end) && SEQ_GEQ(seq, src->seqlo - MAXACKWINDOW)
    conn = half_closed_conn()
    seqhi = conn.st.seqhi
    assert conn.c(ACK | PSH, seqhi + 10000, 5001, dlen=50000) == PASS  # ends < seqhi + 67035
    assert conn.mismatches == 0


def test_loose_match_blocks_data_ending_beyond_seqhi_plus_maxackwindow() -> None:
    conn = half_closed_conn()
    seqhi = conn.st.seqhi
    assert conn.c(ACK | PSH, seqhi + MAXACKWINDOW - 1000, 5001, dlen=1001) == BLOCK
    assert conn.mismatches == 1


def test_loose_match_blocks_data_more_than_maxackwindow_behind() -> None:
    conn = half_closed_conn()
    assert conn.c(ACK | PSH, (1102 - MAXACKWINDOW - 1) & M, 5001, dlen=10) == BLOCK
    assert conn.c(ACK | PSH, (1102 - MAXACKWINDOW) & M, 5001 + 100000, dlen=10) == PASS


def test_time_wait_blocks_what_pf_would_loosely_pass() -> None:
    conn = closed_conn()
    conn.now = T0 + 30
    assert conn.c(ACK, 1102, 5002 + 100000) == BLOCK  # acks data never sent
    assert conn.c(ACK | PSH, 1102, 5002, dlen=10) == BLOCK  # new data after close
    assert conn.st.expire == T0 + 1 + TW_REMOTE
    assert conn.mismatches == 2


def test_retransmitted_fin_in_time_wait_restarts_the_timer() -> None:
    conn = closed_conn()
    conn.now = T0 + 30
    assert conn.c(FIN | ACK, 1101, 5002) == PASS  # retransmitted FIN
    assert conn.st.expire == T0 + 30 + TW_REMOTE
    assert conn.st.timeout == tmo.TIME_WAIT
    assert conn.s(ACK, 5002, 1102) == PASS  # and the other side's re-ACK
    assert conn.mismatches == 0


def test_fin_before_the_server_answered_moves_client_to_closing() -> None:
    # The client gives up: FIN|ACK with an ack for a SYN never seen (dst < SYN_SENT, so
    # the ack is not checked).
    conn = Conn()
    conn.c(SYN, 1000)
    assert conn.c(FIN | ACK, 1001, 123456) == PASS
    assert conn.st.state == CLOSING


# ---- state reuse ----------------------------------------------------------------------------


def test_pure_syn_on_a_closed_state_reuses_it() -> None:
    conn = closed_conn()
    recorder = Recorder(conn.table)
    old = conn.st
    inserts = conn.table.fcounters[FCNT_STATE_INSERT]
    removals = conn.table.fcounters[FCNT_STATE_REMOVALS]
    conn.now = T0 + 50
    assert conn.c(SYN, 777777, win=1234) == PASS
    new = conn.st
    assert new is not old and new.id != old.id
    events = recorder.events
    assert [type(e) for e in events] == [StateRemoved, StateInserted]
    assert isinstance(events[0], StateRemoved)
    assert events[0].state is old and events[0].reason == RemoveReason.REUSED
    assert events[1].state is new
    assert old.timeout == UNLINKED
    assert conn.peers() == (SYN_SENT, CLOSED)
    assert new.seqlo == 777777 and new.max_win == 1234 and new.creation == T0 + 50
    assert new.timeout == tmo.TCP_FIRST
    assert conn.table.count == 1
    assert conn.table.fcounters[FCNT_STATE_INSERT] == inserts + 1
    assert conn.table.fcounters[FCNT_STATE_REMOVALS] == removals + 1
    assert conn.table.half_open == 1
    assert conn.table.get_by_id(old.id, old.creatorid) is None
    assert conn.table.get_by_id(new.id, new.creatorid) is new
    # The new connection proceeds normally.
    assert conn.s(SYN | ACK, 99, 777778) == PASS
    assert conn.c(ACK, 777778, 100) == PASS
    assert conn.peers() == (ESTABLISHED, ESTABLISHED)


def test_reuse_by_a_syn_from_the_other_side() -> None:
    conn = closed_conn()
    old = conn.st
    assert conn.s(SYN, 424242) == PASS
    new = conn.st
    assert new is not old
    sa, sp, da, dp = new.endpoints()
    assert sp == conn.sport and dp == conn.cport  # keyed from the server's SYN


def test_reuse_after_rst() -> None:
    conn = established()
    conn.c(RST, 1001)
    assert conn.peers() == (TIME_WAIT, TIME_WAIT)
    old = conn.st
    assert conn.c(SYN, 9000) == PASS
    assert conn.st is not old


def test_syn_on_a_state_not_fully_closed_is_not_reused() -> None:
    conn = established()
    conn.c(FIN | ACK, 1001, 5001)
    conn.s(ACK, 5001, 1002)
    assert conn.peers() == (FIN_WAIT_2, ESTABLISHED)
    old = conn.st
    conn.c(SYN, 9000)  # tracked, not reused
    assert conn.st is old
    assert conn.table.fcounters[FCNT_STATE_INSERT] == 1
    assert conn.table.fcounters[FCNT_STATE_REMOVALS] == 0


@pytest.mark.parametrize("flags", [SYN | RST, SYN | FIN])
def test_syn_with_rst_or_fin_on_a_closed_state_creates_no_state(flags: int) -> None:
    # Only a pure SYN may create a TCP state (on an empty table SYN|RST and SYN|FIN are
    # blocked); reusing a closed state's key must not open that back door.
    empty = Conn()
    assert empty.c(flags, 9000) == BLOCK and empty.table.count == 0
    conn = closed_conn()
    old = conn.st
    conn.c(flags, 9000)
    created = [s for s in conn.table.states() if s is not old]
    assert created == []


def test_syn_ack_on_a_closed_state_is_not_a_reuse() -> None:
    conn = closed_conn()
    old = conn.st
    conn.c(SYN | ACK, 9000, 5002)
    assert conn.st is old


# ---- counters --------------------------------------------------------------------------------


def test_search_insert_removal_counters() -> None:
    conn = Conn()
    handshake(conn)  # 3 searches, 1 insert
    close_client_first(conn, 1001, 5001)  # 4 more searches
    fc = conn.table.fcounters
    assert fc[FCNT_STATE_SEARCH] == 7
    assert fc[FCNT_STATE_INSERT] == 1
    assert fc[FCNT_STATE_REMOVALS] == 0
    conn.c(SYN, 10)  # reuse: one removal, one insert
    assert fc[FCNT_STATE_SEARCH] == 8
    assert fc[FCNT_STATE_INSERT] == 2
    assert fc[FCNT_STATE_REMOVALS] == 1
    assert Conn(conn.table, cport=1).c(ACK, 5, 5) == BLOCK  # a search too
    assert fc[FCNT_STATE_SEARCH] == 9
    assert conn.table.passed == 8 and conn.table.blocked == 1


def test_packet_and_byte_counters_per_peer() -> None:
    conn = established()
    conn.c(ACK | PSH, 1001, 5001, dlen=100)
    conn.s(ACK | PSH, 5001, 1101, dlen=1000)
    st = conn.st
    assert st.packets == 3 and st.bytes == 44 + 40 + 140  # SYN carries an MSS
    assert st.dst.packets == 2 and st.dst.bytes == 44 + 1040


# ---- property tests: generated correct conversations ---------------------------------------


@dataclass(frozen=True)
class Seg:
    """One segment of a generated conversation (sequence numbers unwrapped)."""

    client: bool
    flags: int
    seq: int
    ack: int
    win: int
    dlen: int = 0
    options: bytes = b""


@dataclass
class End:
    """One TCP endpoint of the model (absolute, unwrapped sequence numbers)."""

    isn: int
    offer: int | None
    shift: int = 0  # its receive window's scale, once both sides offered one
    snd_nxt: int = 0
    rcv_nxt: int = 0
    right_edge: int = 0  # it may send up to here (peer's ack + window, as delivered)
    win: int = 65535  # the window field it puts in its segments
    fin_sent: bool = False
    fin_rcvd: bool = False
    last: tuple[int, int, bool] | None = None  # its latest segment: (seq, dlen, fin)


@dataclass
class Conversation:
    segments: list[Seg]
    shape: str
    final: tuple[int, int]
    client: End
    server: End
    queues: dict[bool, list[tuple[int, int, int, int, bool]]] = field(default_factory=dict)


SHAPES = ("client_first", "server_first", "simultaneous", "rst_client", "rst_server", "open")
ISN = st.one_of(st.integers(0, M), st.integers(2**32 - 200_000, M), st.integers(1, 100_000))
SYN_WIN = st.one_of(st.integers(1, 65535), st.integers(1, 3000), st.just(65535))
WIN = st.one_of(st.integers(0, 65535), st.integers(1, 2000), st.just(65535))


class Model:
    """Two endpoints exchanging in-order segments; pf sees each one when it is sent."""

    def __init__(self, client: End, server: End) -> None:
        self.ends = {True: client, False: server}
        # In flight, per sender: (end, ack, window edge, has_ack, fin)
        self.queues: dict[bool, list[tuple[int, int, int, int, bool]]] = {True: [], False: []}
        self.segments: list[Seg] = []

    def emit(
        self,
        client: bool,
        flags: int,
        seq: int,
        dlen: int = 0,
        options: bytes = b"",
        win: int | None = None,
    ) -> None:
        me = self.ends[client]
        win = me.win if win is None else win
        ack = me.rcv_nxt if flags & ACK else 0
        self.segments.append(Seg(client, flags, seq, ack, win, dlen, options))
        fin = bool(flags & FIN)
        end = seq + dlen + (1 if flags & SYN else 0) + (1 if fin else 0)
        shift = 0 if flags & SYN else me.shift
        self.queues[client].append((end, ack, ack + (win << shift), flags & ACK, fin))
        me.snd_nxt = max(me.snd_nxt, end)
        if fin:
            me.fin_sent = True
        if dlen or fin:
            me.last = (seq, dlen, fin)

    def deliver(self, sender: bool) -> None:
        end, ack, edge, has_ack, fin = self.queues[sender].pop(0)
        peer = self.ends[not sender]
        peer.rcv_nxt = max(peer.rcv_nxt, end)
        if fin:
            peer.fin_rcvd = True
        if has_ack:
            peer.right_edge = max(peer.right_edge, edge)

    def deliver_all(self) -> None:
        while self.queues[True] or self.queues[False]:
            for side in (True, False):
                if self.queues[side]:
                    self.deliver(side)

    def room(self, side: bool) -> int:
        me = self.ends[side]
        return me.right_edge - me.snd_nxt

    def ensure_room(self, side: bool) -> None:
        """Make the peer open its window so ``side`` may send a FIN.

        A FIN occupies sequence space, so a receiver only accepts it inside its window
        (RFC 9293 3.10.7.4); correct stacks do not send one into a full window. (pf's
        window check uses the data end and would let it through, but the sender's next
        pure ACK then lies past seqhi and only loose-matches or is blocked.)
        """
        if self.room(side) >= 1:
            return
        self.deliver_all()
        peer = not side
        self.ends[peer].win = max(self.ends[peer].win, 1)
        self.emit(peer, ACK, self.ends[peer].snd_nxt)
        self.deliver(peer)


@st.composite
def conversations(draw: st.DrawFn, shapes: tuple[str, ...] = SHAPES) -> Conversation:
    scaling = draw(st.sampled_from(["both", "client", "server", "none"]))
    cws = draw(st.integers(0, 14)) if scaling in ("both", "client") else None
    sws = draw(st.integers(0, 14)) if scaling in ("both", "server") else None
    client = End(draw(ISN), cws)
    server = End(draw(ISN), sws)
    model = Model(client, server)
    both = cws is not None and sws is not None
    client.shift = cws if both and cws is not None else 0
    server.shift = sws if both and sws is not None else 0

    # Handshake (SYN windows are never scaled).
    client.snd_nxt = client.isn
    model.emit(True, SYN, client.isn, options=packets.tcp_options(1460, cws), win=draw(SYN_WIN))
    model.deliver(True)
    syn_win = model.segments[-1].win
    server.right_edge = server.isn + 1 + syn_win
    server.snd_nxt = server.isn
    model.emit(
        False, SYN | ACK, server.isn, options=packets.tcp_options(1460, sws), win=draw(SYN_WIN)
    )
    model.deliver(False)
    client.right_edge = client.isn + 1 + model.segments[-1].win
    client.win = draw(WIN)
    server.win = draw(WIN)
    model.emit(True, ACK, client.snd_nxt)
    model.deliver(True)

    shape = draw(st.sampled_from(shapes))
    may_fin = {True: shape == "client_first", False: shape == "server_first"}

    for _ in range(draw(st.integers(0, 40))):
        actions: list[tuple[str, bool]] = []
        for side in (True, False):
            me = model.ends[side]
            if not me.fin_sent and me.right_edge - me.snd_nxt > 0:
                actions.append(("data", side))
            actions.append(("ack", side))
            if model.queues[side]:
                actions.append(("deliver", side))
                actions.append(("deliver", side))
            if me.last is not None:
                actions.append(("retransmit", side))
            if (
                not me.fin_sent
                and model.room(side) >= 1
                and (may_fin[side] or (shape in ("client_first", "server_first") and me.fin_rcvd))
            ):
                actions.append(("fin", side))
        if (
            shape == "simultaneous"
            and not client.fin_sent
            and model.room(True) >= 1
            and model.room(False) >= 1
        ):
            actions.append(("fins", True))
        kind, side = draw(st.sampled_from(actions))
        me = model.ends[side]
        if kind == "data":
            room = min(me.right_edge - me.snd_nxt, 65000)
            dlen = draw(st.one_of(st.just(room), st.integers(1, room)))
            if draw(st.booleans()):
                me.win = draw(WIN)
            model.emit(side, ACK | PSH, me.snd_nxt, dlen)
        elif kind == "ack":
            if draw(st.booleans()):
                me.win = draw(WIN)
            model.emit(side, ACK, me.snd_nxt)
        elif kind == "deliver":
            model.deliver(side)
        elif kind == "retransmit":
            assert me.last is not None
            seq, dlen, fin = me.last
            model.emit(side, ACK | (FIN if fin else PSH), seq, dlen)
        elif kind == "fin":
            model.emit(side, FIN | ACK, me.snd_nxt)
        else:  # both FINs cross on the wire
            first = draw(st.booleans())
            for s in (first, not first):
                model.emit(s, FIN | ACK, model.ends[s].snd_nxt)

    # Finish the chosen shape.
    if shape in ("rst_client", "rst_server"):
        side = shape == "rst_client"
        me = model.ends[side]
        model.emit(side, draw(st.sampled_from([RST, RST | ACK])), me.snd_nxt)
        final = (TIME_WAIT, TIME_WAIT)
    else:
        if shape != "open":
            if shape == "simultaneous" and not client.fin_sent:
                model.ensure_room(True)
                model.ensure_room(False)
                model.emit(True, FIN | ACK, client.snd_nxt)
                model.emit(False, FIN | ACK, server.snd_nxt)
            first = shape != "server_first"
            if not model.ends[first].fin_sent:
                model.ensure_room(first)
                model.emit(first, FIN | ACK, model.ends[first].snd_nxt)
            model.deliver_all()
            if not model.ends[not first].fin_sent:
                model.ensure_room(not first)
                model.emit(not first, FIN | ACK, model.ends[not first].snd_nxt)
        model.deliver_all()
        model.emit(True, ACK, client.snd_nxt)
        model.emit(False, ACK, server.snd_nxt)
        model.deliver_all()
        final = (ESTABLISHED, ESTABLISHED) if shape == "open" else (FIN_WAIT_2, FIN_WAIT_2)
    return Conversation(model.segments, shape, final, client, server, model.queues)


def replay(conv: Conversation) -> Conn:
    """Feed a conversation through a fresh table, checking every packet's invariants."""
    conn = Conn()
    seqlo: dict[bool, int | None] = {True: None, False: None}
    for i, seg in enumerate(conv.segments):
        conn.now = T0 + i
        verdict = conn.send(
            seg.client, seg.flags, seg.seq & M, seg.ack & M, seg.win, seg.dlen, seg.options
        )
        assert verdict == PASS, (i, seg)
        assert conn.mismatches == 0, i
        st = conn.st
        for side, peer in ((True, st), (False, st.dst)):
            if peer.seqlo == 0 and seqlo[side] is None:
                continue  # server side not seen yet
            old = seqlo[side]
            if old is not None:
                assert seq_geq(peer.seqlo, old), (i, side, old, peer.seqlo)
            seqlo[side] = peer.seqlo
    return conn


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv=conversations())
def test_generated_conversations_pass_every_packet(conv: Conversation) -> None:
    conn = replay(conv)
    assert conn.peers() == conv.final, conv.shape
    assert conn.table.count == 1
    assert conn.table.half_open == 0
    expected_timeout = {
        (FIN_WAIT_2, FIN_WAIT_2): tmo.TIME_WAIT,
        (TIME_WAIT, TIME_WAIT): tmo.TIME_WAIT,
        (ESTABLISHED, ESTABLISHED): tmo.TCP_ESTABLISHED,
    }[conv.final]
    assert conn.st.timeout == expected_timeout


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    conv=conversations(),
    from_client=st.booleans(),
    extra=st.integers(1, 1 << 20),
    dlen=st.integers(0, 1400),
    fin=st.booleans(),
)
def test_segment_far_beyond_seqhi_is_blocked(
    conv: Conversation, from_client: bool, extra: int, dlen: int, fin: bool
) -> None:
    assume(dlen > 0 or fin)  # a bare ACK's seq is not checked by pf
    conn = replay(conv)
    st = conn.st
    src, dst = (st, st.dst) if from_client else (st.dst, st)
    # pf treats a packet from a peer whose seqlo is 0 as that peer's first packet.
    assume(src.seqlo != 0)
    dws = dst.wscale & 0x0F if src.wscale and dst.wscale else 0
    seq = (src.seqhi + (dst.max_win << dws) + MAXACKWINDOW + extra) & M
    end = conv.client if from_client else conv.server
    before = peer_snapshot(st), peer_snapshot(st.dst)
    flags = ACK | (FIN if fin else PSH)
    assert conn.send(from_client, flags, seq, end.rcv_nxt & M, end.win, dlen) == BLOCK
    assert conn.mismatches == 1
    assert (peer_snapshot(st), peer_snapshot(st.dst)) == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv=conversations(shapes=("client_first", "server_first", "simultaneous")), isn=ISN)
def test_new_syn_after_any_generated_close_reuses_the_state(conv: Conversation, isn: int) -> None:
    conn = replay(conv)
    old = conn.st
    assert conn.c(SYN, isn) == PASS
    assert conn.st is not old and conn.peers() == (SYN_SENT, CLOSED)
    assert conn.table.fcounters[FCNT_STATE_INSERT] == 2
    assert conn.table.fcounters[FCNT_STATE_REMOVALS] == 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    conv=conversations(shapes=("client_first", "server_first", "simultaneous")),
    from_client=st.booleans(),
    dlen=st.integers(1, 1400),
    data=st.data(),
)
def test_after_close_new_data_is_blocked_and_duplicates_pass(
    conv: Conversation, from_client: bool, dlen: int, data: st.DataObject
) -> None:
    # TIME_WAIT: a segment adding sequence space is refused; one repeating data already
    # seen (at most one window back) is a retransmission and passes.
    conn = replay(conv)
    st_ = conn.st
    src, dst = (st_, st_.dst) if from_client else (st_.dst, st_)
    assume(src.seqlo != 0)
    end = conv.client if from_client else conv.server
    ack = dst.seqlo
    ahead = data.draw(st.integers(1 - dlen, 1 << 20), label="ahead")
    seq = (src.seqlo + ahead) & M
    assert conn.send(from_client, ACK | PSH, seq, ack, end.win, dlen) == BLOCK
    dws = dst.wscale & 0x0F if src.wscale and dst.wscale else 0
    window = dst.max_win << dws
    assume(window >= dlen)
    back = data.draw(st.integers(dlen, window), label="back")
    seq = (src.seqlo - back) & M
    assert conn.send(from_client, ACK | PSH, seq, ack, end.win, dlen) == PASS
    assert conn.mismatches == 1
