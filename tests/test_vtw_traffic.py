"""Vestigial TIME_WAIT against real kernel traffic, replayed from pcap.

Each test makes one connection with the Linux stack in a private namespace
(tests/traffic.py), captures it to a pcap file, and replays it into two tables that
differ only in ``net.inet.tcp.vtw.enable``. Then late segments are built from the
*captured* sequence numbers (the very frames of each side's last FIN or RST, re-sent
later, and a crafted segment of new data) and fed to both tables at the same times.
Every verdict must be the same in both tables; the VTW table must hold the connection
as a loopback-class record (127.0.0.1 or ::1 at both ends: 2 s of TIME_WAIT).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pfsync.pcap import read_capture
from statetable import BLOCK, PASS, StateTable, TableConfig, decode_frame, keys
from statetable import timeouts as tmo
from statetable.counters import PFRES_BADSTATE, PFRES_MATCH
from statetable.decode import NOT_IP
from statetable.events import RemoveReason, VestigialRemoved
from statetable.mslt import LOOPBACK
from statetable.state import FIN_WAIT_2, TIME_WAIT
from statetable.vtw import Vestigial, VtwConfig, quantize
from tests import packets, traffic
from tests.changes import Recorder
from tests.packets import ACK, FIN, PSH, RST

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("checked_pools")]

LOOPBACK_TIME_WAIT = 2.0  # 2 x the default loopback MSL of 1 s


@dataclass(frozen=True)
class Frame:
    """One captured frame and what it decodes to."""

    ts: float
    linktype: int
    data: bytes
    pkt: tuple


@dataclass
class Twin:
    """Two tables, VTW on and off, fed the same frames at the same times."""

    on: StateTable = field(default_factory=lambda: StateTable(TableConfig()))
    off: StateTable = field(
        default_factory=lambda: StateTable(TableConfig(vtw=VtwConfig(enable=False)))
    )
    verdicts: list[int] = field(default_factory=list)
    recorder: Recorder = field(init=False)

    def __post_init__(self) -> None:
        self.recorder = Recorder(self.on)

    def send(self, data: bytes, linktype: int, ts: float) -> int:
        """Feed one frame to both tables; their verdicts must agree."""
        pkt = decode_frame(data, linktype)
        assert isinstance(pkt, tuple), pkt
        on, off = self.on.test(pkt, ts), self.off.test(pkt, ts)
        assert on == off, f"frame {len(self.verdicts)}: VTW on {on}, off {off}"
        self.verdicts.append(on)
        return on

    def purge(self, now: float) -> int:
        """Purge both tables; they must remove the same number of connections."""
        on, off = self.on.purge(now), self.off.purge(now)
        assert on == off, (on, off)
        return on


def capture(
    tmp_path: Path, shape: Callable[[], traffic.Connection]
) -> tuple[traffic.Connection, list[Frame]]:
    """Run a traffic shape on an isolated loopback and read its capture back."""
    pcap = tmp_path / "capture.pcap"
    with traffic.isolated_loopback():
        with traffic.capture_to_pcap(pcap) as result:
            conn = shape()
    assert result.dropped == 0
    frames = []
    for ts, linktype, data in read_capture(pcap):
        pkt = decode_frame(data, linktype)
        if pkt != NOT_IP:
            assert isinstance(pkt, tuple), pkt
            frames.append(Frame(ts, linktype, data, pkt))
    assert frames, "nothing captured"
    return conn, frames


def client_key(conn: traffic.Connection) -> bytes:
    return keys.make(
        ipaddress.ip_address(conn.client[0]).packed,
        ipaddress.ip_address(conn.server[0]).packed,
        conn.client[1],
        conn.server[1],
    )


def replay_capture(twin: Twin, frames: list[Frame], key: bytes) -> float:
    """Replay every captured frame into both tables; returns the time the connection
    became a record (the frame after which the VTW table holds it)."""
    closed_at = None
    for f in frames:
        assert twin.send(f.data, f.linktype, f.ts) == PASS
        if closed_at is None and any(r.key == key for r in twin.on.vestigial()):
            closed_at = f.ts
    assert closed_at is not None, "the connection never reached TIME_WAIT"
    assert twin.on.pfres[PFRES_BADSTATE] == 0 and twin.off.pfres[PFRES_BADSTATE] == 0
    return closed_at


def record(table: StateTable, key: bytes) -> Vestigial:
    """The one record of a connection (and no full state for it)."""
    found = [r for r in table.vestigial() if r.key == key]
    assert len(found) == 1, found
    assert table.find(6, key) is None
    return found[0]


def last_from(frames: list[Frame], key: bytes, flag: int) -> Frame:
    """The last captured frame with ``flag`` sent under ``key``."""
    found = [f for f in frames if f.pkt[1] == key and f.pkt[2] & flag]
    assert found, f"no frame with flag {flag:#x}"
    return found[-1]


def new_data_after(conn: traffic.Connection, last: Frame, payload: bytes) -> bytes:
    """A client segment carrying new data just past the client's last sequence number."""
    _, _, flags, seq, ack, win, dlen, _, _ = last.pkt
    nxt = seq + dlen + (1 if flags & FIN else 0)
    return packets.tcp(
        conn.client[0],
        conn.server[0],
        conn.client[1],
        conn.server[1],
        ACK | PSH,
        nxt,
        ack,
        win,
        payload,
    )


FIN_SHAPES = {
    "client_close_first": traffic.client_close_first,
    "server_close_first": traffic.server_close_first,
    "ipv6": traffic.ipv6,
}


@pytest.mark.parametrize("name", sorted(FIN_SHAPES))
def test_orderly_close_becomes_a_loopback_record_and_late_fins_pass(
    tmp_path: Path, name: str
) -> None:
    """A kernel-closed connection is a 2 s loopback record; each side's captured last FIN,
    re-sent later, passes and restarts the timer; new data is blocked; purge ends it; and
    every verdict equals the VTW-off table's."""
    conn, frames = capture(tmp_path, FIN_SHAPES[name])
    key = client_key(conn)
    twin = Twin()
    closed_at = replay_capture(twin, frames, key)

    rec = record(twin.on, key)
    assert rec.cls == LOOPBACK and rec.af == (6 if name == "ipv6" else 4)
    assert rec.expire == quantize(closed_at + LOOPBACK_TIME_WAIT)
    assert (rec.src.state, rec.dst.state) == (FIN_WAIT_2, FIN_WAIT_2)
    assert twin.on.count == 0
    full = twin.off.find(6, key)
    assert full is not None and full[0].timeout == tmo.TIME_WAIT
    assert twin.off.expires_at(full[0]) == rec.expire

    client_fin = last_from(frames, key, FIN)
    server_fin = last_from(frames, keys.reverse(key), FIN)
    t1 = closed_at + 1.0
    assert twin.send(client_fin.data, client_fin.linktype, t1) == PASS
    assert record(twin.on, key).expire == quantize(t1 + LOOPBACK_TIME_WAIT)
    t2 = t1 + 0.5
    assert twin.send(server_fin.data, server_fin.linktype, t2) == PASS
    expire = record(twin.on, key).expire
    assert expire == quantize(t2 + LOOPBACK_TIME_WAIT)
    assert twin.on.pfres[PFRES_BADSTATE] == 0

    late = new_data_after(conn, client_fin, b"data after close")
    assert twin.send(late, client_fin.linktype, t2 + 0.1) == BLOCK
    assert twin.on.pfres[PFRES_BADSTATE] == 1
    assert record(twin.on, key).expire == expire  # a blocked segment restarts nothing

    assert twin.purge(expire - 0.001) == 0
    assert record(twin.on, key).expire == expire
    assert twin.purge(expire) == 1
    assert list(twin.on.vestigial()) == [] and twin.off.find(6, key) is None
    assert [e.reason for e in twin.recorder.events if isinstance(e, VestigialRemoved)] == [
        RemoveReason.EXPIRED
    ]
    matched = twin.on.pfres[PFRES_MATCH]
    assert twin.send(client_fin.data, client_fin.linktype, expire + 0.1) == BLOCK
    assert twin.on.pfres[PFRES_MATCH] == matched + 1  # no state: the implicit block
    assert twin.on.pfres == twin.off.pfres
    assert len(twin.verdicts) == len(frames) + 4


def test_rst_abort_becomes_a_loopback_record_until_its_exact_rst(tmp_path: Path) -> None:
    """An RST-aborted connection is a 2 s loopback record with both peers in TIME_WAIT; the
    server's captured last segment re-sent passes; new data and an RST one off are blocked;
    the captured RST re-sent exactly closes the record; verdicts equal VTW off's."""
    conn, frames = capture(tmp_path, traffic.rst_abort)
    key = client_key(conn)
    twin = Twin()
    closed_at = replay_capture(twin, frames, key)

    rst = last_from(frames, key, RST)
    assert rst.ts == closed_at
    rec = record(twin.on, key)
    assert rec.cls == LOOPBACK and rec.af == 4
    assert (rec.src.state, rec.dst.state) == (TIME_WAIT, TIME_WAIT)
    assert rec.expire == quantize(closed_at + LOOPBACK_TIME_WAIT)
    assert rec.src.seqlo == rst.pkt[3]  # the RST's seq is the client's next

    server_last = [f for f in frames if f.pkt[1] == keys.reverse(key)][-1]
    t1 = closed_at + 1.0
    assert twin.send(server_last.data, server_last.linktype, t1) == PASS
    assert record(twin.on, key).expire == quantize(t1 + LOOPBACK_TIME_WAIT)

    late = new_data_after(conn, rst, b"data after abort")
    assert twin.send(late, rst.linktype, t1 + 0.1) == BLOCK
    _, _, flags, seq, ack, win, _, _, _ = rst.pkt
    off_by_one = packets.tcp(
        conn.client[0], conn.server[0], conn.client[1], conn.server[1], flags, seq + 1, ack, win
    )
    assert twin.send(off_by_one, rst.linktype, t1 + 0.2) == BLOCK
    assert twin.on.pfres[PFRES_BADSTATE] == 2
    assert record(twin.on, key).expire == quantize(t1 + LOOPBACK_TIME_WAIT)

    assert twin.send(rst.data, rst.linktype, t1 + 0.3) == PASS
    assert list(twin.on.vestigial()) == [] and twin.off.find(6, key) is None
    assert [e.reason for e in twin.recorder.events if isinstance(e, VestigialRemoved)] == [
        RemoveReason.CLOSED
    ]
    assert twin.send(server_last.data, server_last.linktype, t1 + 0.4) == BLOCK
    assert twin.purge(t1 + 10) == 0
    assert twin.on.pfres == twin.off.pfres
    assert twin.on.vtw.stats.dels == 1 and twin.on.vtw.stats.kill == 0
