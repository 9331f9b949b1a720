"""States <-> the column messages of ``proto/pfsync/v1/sync.proto``.

Encoding reads State objects (or TIME_WAIT copies of VTW records) into one Python list
per column and extends each protobuf column once: upb copies a list in C, so a batch
costs one call per column instead of one message per state (bench/bench_sync_codec.py
measures both layouts). Decoding validates whole columns first (lengths, then value
ranges) and builds State objects only for states it will hand to the table.

Times on the wire are relative (see the .proto): a state's expiry is sent as the
milliseconds left at its *unscaled* timeout, so adaptive timeouts on either side do not
distort it, and rebuilt on arrival as ``expire = now + left - timeout``, as pfsync does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from pfsync.v1 import control_pb2
from pfsync.v1 import sync_pb2 as pb
from statetable import keys
from statetable import timeouts as tmo
from statetable.mslt import FLAG_MASK as MSLT_FLAGS
from statetable.mslt import FLAG_SHIFT as MSLT_SHIFT
from statetable.state import FLAG_OUT, MULTIPLE, PACKET, TIME_WAIT, U16, Peer, State

# Wire direction values (pb.Direction).
_IN, _OUT = control_pb2.DIRECTION_IN, control_pb2.DIRECTION_OUT
_U32 = 0xFFFFFFFF
_MAX_CLASS = pb.MSL_CLASS_LOOPBACK
# wscale on the wire: the shift and a flag; in a Peer: pf's 0x80 | shift.
_WSCALE_FLAG = 0x80
_WSCALE_SHIFT = 0x0F
_MAX_WSCALE = 14


class FrameError(ValueError):
    """A frame a peer must not send; ``counter`` names the pfsync statistic it costs."""

    def __init__(self, counter: str, message: str) -> None:
        super().__init__(message)
        self.counter = counter


def _remaining_ms(st: State, timeouts: Sequence[int], now: float) -> int:
    """Milliseconds until ``st`` expires at its unscaled timeout (0 if due)."""
    timeout = st.timeout
    if timeout == tmo.TIME_WAIT:
        left = st.expire - now
    else:
        left = st.expire + timeouts[timeout] - now
    if left <= 0:
        return 0
    return min(int(left * 1000), _U32)


def expire_from_wire(timeout: int, left_ms: int, timeouts: Sequence[int], now: float) -> float:
    """A State.expire for a state that has ``left_ms`` to live on ``timeout``."""
    if timeout == tmo.TIME_WAIT:
        return now + left_ms / 1000
    return now + left_ms / 1000 - timeouts[timeout]


def put_peers(cols: pb.PeerColumns, peers: Sequence[Peer], counters: bool) -> None:
    """Append one side of each state to ``cols``."""
    cols.state.extend([p.state + 1 for p in peers])  # control.proto's enum numbers
    cols.seqlo.extend([p.seqlo for p in peers])
    cols.seqhi.extend([p.seqhi for p in peers])
    cols.max_win.extend([p.max_win for p in peers])
    cols.wscale.extend([p.wscale & _WSCALE_SHIFT for p in peers])
    cols.wscale_seen.extend([p.wscale & _WSCALE_FLAG != 0 for p in peers])
    if counters:
        cols.packets.extend([p.traffic >> 48 for p in peers])
        cols.bytes.extend([p.traffic & (PACKET - 1) for p in peers])


def put_states(
    cols: pb.StateColumns, states: list[State], timeouts: Sequence[int], now: float
) -> None:
    """Append full states to ``cols`` (INS, UPD, VTW and bulk content)."""
    split = [keys.unpack(st.key) for st in states]
    cols.id.extend([st.id for st in states])
    cols.creatorid.extend([st.creatorid for st in states])
    cols.protocol.extend([st.proto for st in states])
    cols.src_address.extend([k[0] for k in split])
    cols.src_port.extend([k[1] for k in split])
    cols.dst_address.extend([k[2] for k in split])
    cols.dst_port.extend([k[3] for k in split])
    cols.direction.extend([_OUT if st.flags & FLAG_OUT else _IN for st in states])
    classes = [(st.flags & MSLT_FLAGS) >> MSLT_SHIFT for st in states]  # class + 1: the enum
    cols.msl_class.extend(cast("list[pb.MslClass]", classes))
    cols.timeout.extend([st.timeout for st in states])
    cols.expires_in_ms.extend([_remaining_ms(st, timeouts, now) for st in states])
    cols.age_ms.extend([max(0, int((now - st.creation) * 1000)) for st in states])
    put_peers(cols.src, states, True)
    put_peers(cols.dst, [st.dst for st in states], True)


def put_compressed(
    cols: pb.CompressedColumns, states: list[State], timeouts: Sequence[int], now: float
) -> None:
    """Append compressed updates (UPD_C) of states to ``cols``."""
    cols.id.extend([st.id for st in states])
    cols.creatorid.extend([st.creatorid for st in states])
    cols.timeout.extend([st.timeout for st in states])
    cols.expires_in_ms.extend([_remaining_ms(st, timeouts, now) for st in states])
    put_peers(cols.src, states, False)
    put_peers(cols.dst, [st.dst for st in states], False)


def put_ids(cols: pb.IdColumns, ids: Iterable[tuple[int, int]]) -> None:
    """Append (id, creatorid) pairs to ``cols``."""
    pairs = list(ids)
    cols.id.extend([i for i, _ in pairs])
    cols.creatorid.extend([c for _, c in pairs])


def read_ids(cols: pb.IdColumns) -> list[tuple[int, int]]:
    """(id, creatorid) pairs of an IdColumns (``badlen`` if the columns differ)."""
    ids, creators = list(cols.id), list(cols.creatorid)
    if len(ids) != len(creators):
        raise FrameError("badlen", "id columns of different lengths")
    return list(zip(ids, creators, strict=True))


@dataclass(frozen=True, slots=True)
class PeerColumn:
    """One side of a batch, as plain lists (validated)."""

    state: list[int]
    seqlo: list[int]
    seqhi: list[int]
    max_win: list[int]
    wscale: list[int]  # pf's encoding: 0x80 | shift when the SYN carried the option
    packets: list[int]
    bytes: list[int]


def _read_peers(cols: pb.PeerColumns, n: int, counters: bool) -> PeerColumn:
    state = [s - 1 for s in cols.state]  # back from control.proto's enum numbers
    seqlo, seqhi, max_win = list(cols.seqlo), list(cols.seqhi), list(cols.max_win)
    shift, seen = list(cols.wscale), list(cols.wscale_seen)
    if counters:
        packets, nbytes = list(cols.packets), list(cols.bytes)
    else:
        packets = nbytes = [0] * n
    if any(len(c) != n for c in (state, seqlo, seqhi, max_win, shift, seen, packets, nbytes)):
        raise FrameError("badlen", "peer columns of different lengths")
    if n and (max(max_win) > 0xFFFF or max(shift) > _MAX_WSCALE):
        raise FrameError("badval", "window or window scale out of range")
    if n and (max(packets) >= 1 << 16 or max(nbytes) >= PACKET):
        # State.traffic keeps 16 bits of packets above 48 bits of bytes per peer.
        packets = [min(p, (1 << 16) - 1) for p in packets]
        nbytes = [min(b, PACKET - 1) for b in nbytes]
    wscale = [s | _WSCALE_FLAG if f else s for s, f in zip(shift, seen, strict=True)]
    return PeerColumn(state, seqlo, seqhi, max_win, wscale, packets, nbytes)


def _check_common(
    n: int, timeout: list[int], src: PeerColumn, dst: PeerColumn, proto: list[int] | None
) -> None:
    """pfsync's value checks (``badval``): timeout and peer states in range."""
    if not n:
        return
    if any(t >= tmo.PFTM_MAX and t != tmo.TIME_WAIT for t in timeout):
        raise FrameError("badval", "unknown timeout")
    if proto is None:
        low = min(min(src.state), min(dst.state))
        top = max(max(src.state), max(dst.state))
        if low < 0 or top > TIME_WAIT:
            raise FrameError("badval", "peer state out of range")
        return
    for i in range(n):
        last = TIME_WAIT if proto[i] == 6 else MULTIPLE
        if not (0 <= src.state[i] <= last and 0 <= dst.state[i] <= last):
            raise FrameError("badval", "peer state out of range")


def read_states(cols: pb.StateColumns, now: float, timeouts: Sequence[int]) -> list[State]:
    """Validated States built from full-state columns (FrameError if any is bad)."""
    ids, creators, protos = list(cols.id), list(cols.creatorid), list(cols.protocol)
    srcs, dsts = list(cols.src_address), list(cols.dst_address)
    sports, dports = list(cols.src_port), list(cols.dst_port)
    dirs, classes = list(cols.direction), list(cols.msl_class)
    timeout, left, age = list(cols.timeout), list(cols.expires_in_ms), list(cols.age_ms)
    n = len(ids)
    columns = (creators, protos, srcs, dsts, sports, dports, dirs, classes, timeout, left, age)
    if any(len(c) != n for c in columns):
        raise FrameError("badlen", "state columns of different lengths")
    src = _read_peers(cols.src, n, True)
    dst = _read_peers(cols.dst, n, True)
    if n == 0:
        return []
    _check_common(n, timeout, src, dst, protos)
    if max(protos) > 255 or max(sports) > 0xFFFF or max(dports) > 0xFFFF:
        raise FrameError("badval", "protocol or port out of range")
    if any(d != _IN and d != _OUT for d in dirs) or max(classes) > _MAX_CLASS:
        raise FrameError("badval", "bad direction or MSL class")
    for a, b in zip(srcs, dsts, strict=True):
        if len(a) != len(b) or (len(a) != 4 and len(a) != 16):
            raise FrameError("badval", "address is neither IPv4 nor IPv6")
    out: list[State] = []
    u16 = U16
    for i in range(n):
        st = State(keys.make(srcs[i], dsts[i], sports[i], dports[i]), protos[i], ids[i],
                   creators[i], now - age[i] / 1000)  # fmt: skip
        st.flags = (FLAG_OUT if dirs[i] == _OUT else 0) | (classes[i] << MSLT_SHIFT)
        st.timeout = timeout[i]
        st.expire = expire_from_wire(timeout[i], left[i], timeouts, now)
        st.state, st.seqlo, st.seqhi = src.state[i], src.seqlo[i], src.seqhi[i]
        st.max_win, st.wscale = u16[src.max_win[i]], src.wscale[i]
        st.traffic = src.packets[i] * PACKET + src.bytes[i]
        d = st.dst
        d.state, d.seqlo, d.seqhi = dst.state[i], dst.seqlo[i], dst.seqhi[i]
        d.max_win, d.wscale = u16[dst.max_win[i]], dst.wscale[i]
        d.traffic = dst.packets[i] * PACKET + dst.bytes[i]
        out.append(st)
    return out


@dataclass(frozen=True, slots=True)
class Compressed:
    """A validated batch of compressed updates, as columns."""

    ids: list[int]
    creators: list[int]
    timeout: list[int]
    expires_in_ms: list[int]
    src: PeerColumn
    dst: PeerColumn


def read_compressed(cols: pb.CompressedColumns) -> Compressed:
    """Validated compressed-update columns (FrameError if any is bad)."""
    ids, creators = list(cols.id), list(cols.creatorid)
    timeout, left = list(cols.timeout), list(cols.expires_in_ms)
    n = len(ids)
    if len(creators) != n or len(timeout) != n or len(left) != n:
        raise FrameError("badlen", "compressed columns of different lengths")
    src = _read_peers(cols.src, n, False)
    dst = _read_peers(cols.dst, n, False)
    _check_common(n, timeout, src, dst, None)
    return Compressed(ids, creators, timeout, left, src, dst)
