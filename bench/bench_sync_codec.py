"""pfsync frame codec: microseconds per state to build+serialize and to parse+read a batch of
full states, as sync.proto's columns (wire.put_states / wire.read_states) against one
message per state in a ``repeated`` field (a bench-only layout with the same fields,
built here with descriptor_pb2; it is not part of proto/).

    python bench/bench_sync_codec.py [--batch 512] [--batches 40] [--repeat 5]

Both layouts carry the same states (real TCP states of established flows, tracked from
tests/packets.py frames) and do the same Python work around the codec: the record layout
reads and validates the same fields and builds the same State objects as read_states.
Times are CPU time of this process (time.process_time): the machine is shared, and wall
time would count other processes' turns on the CPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import workload
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import api_implementation

from pfsync.sync import wire
from pfsync.v1 import control_pb2
from pfsync.v1 import sync_pb2 as pb
from statetable import StateTable, TableConfig, decode_frame, keys
from statetable import timeouts as tmo
from statetable.mslt import FLAG_MASK as MSLT_FLAGS
from statetable.mslt import FLAG_SHIFT as MSLT_SHIFT
from statetable.state import FLAG_OUT, PACKET, TIME_WAIT, U16, Peer, State

_F = descriptor_pb2.FieldDescriptorProto
_IN, _OUT = control_pb2.DIRECTION_IN, control_pb2.DIRECTION_OUT


def record_layout() -> tuple[type, type]:
    """(StateRecord, StateRecords): one message per state, the fields of StateColumns."""
    fd = descriptor_pb2.FileDescriptorProto(
        name="bench/pfsync_records.proto",
        package="pfsyncbench",
        syntax="proto3",
        dependency=["pfsync/v1/control.proto"],
    )

    def add(msg: descriptor_pb2.DescriptorProto, name: str, kind: int, **kw: object) -> None:
        msg.field.add(
            name=name, number=len(msg.field) + 1, type=kind, label=_F.LABEL_OPTIONAL, **kw
        )

    peer = fd.message_type.add(name="PeerRecord")
    for name in ("state", "seqlo", "seqhi", "max_win", "wscale"):
        add(peer, name, _F.TYPE_UINT32)
    add(peer, "wscale_seen", _F.TYPE_BOOL)
    add(peer, "packets", _F.TYPE_UINT64)
    add(peer, "bytes", _F.TYPE_UINT64)
    rec = fd.message_type.add(name="StateRecord")
    add(rec, "id", _F.TYPE_FIXED64)
    add(rec, "creatorid", _F.TYPE_FIXED32)
    add(rec, "protocol", _F.TYPE_UINT32)
    add(rec, "src_address", _F.TYPE_BYTES)
    add(rec, "dst_address", _F.TYPE_BYTES)
    add(rec, "src_port", _F.TYPE_UINT32)
    add(rec, "dst_port", _F.TYPE_UINT32)
    add(rec, "direction", _F.TYPE_ENUM, type_name=".pfsync.v1.Direction")
    add(rec, "msl_class", _F.TYPE_UINT32)
    add(rec, "timeout", _F.TYPE_UINT32)
    add(rec, "expires_in_ms", _F.TYPE_UINT32)
    add(rec, "age_ms", _F.TYPE_UINT64)
    add(rec, "src", _F.TYPE_MESSAGE, type_name=".pfsyncbench.PeerRecord")
    add(rec, "dst", _F.TYPE_MESSAGE, type_name=".pfsyncbench.PeerRecord")
    batch = fd.message_type.add(name="StateRecords")
    batch.field.add(
        name="states",
        number=1,
        type=_F.TYPE_MESSAGE,
        label=_F.LABEL_REPEATED,
        type_name=".pfsyncbench.StateRecord",
    )
    pool = descriptor_pool.Default()
    pool.Add(fd)
    classes = message_factory.GetMessages([fd], pool=pool)
    return classes["pfsyncbench.StateRecord"], classes["pfsyncbench.StateRecords"]


StateRecord, StateRecords = record_layout()


def _peer_kw(p: Peer) -> dict[str, object]:
    return {
        "state": p.state + 1,
        "seqlo": p.seqlo,
        "seqhi": p.seqhi,
        "max_win": p.max_win,
        "wscale": p.wscale & 0x0F,
        "wscale_seen": p.wscale & 0x80 != 0,
        "packets": p.traffic >> 48,
        "bytes": p.traffic & (PACKET - 1),
    }


def put_records(
    batch: object, states: Sequence[State], timeouts: Sequence[int], now: float
) -> None:
    """One StateRecord per state (what columns replace)."""
    add = batch.states.add  # type: ignore[attr-defined]
    for st in states:
        src, sport, dst, dport = keys.unpack(st.key)
        add(
            id=st.id,
            creatorid=st.creatorid,
            protocol=st.proto,
            src_address=src,
            dst_address=dst,
            src_port=sport,
            dst_port=dport,
            direction=_OUT if st.flags & FLAG_OUT else _IN,
            msl_class=(st.flags & MSLT_FLAGS) >> MSLT_SHIFT,
            timeout=st.timeout,
            expires_in_ms=wire._remaining_ms(st, timeouts, now),
            age_ms=max(0, int((now - st.creation) * 1000)),
            src=_peer_kw(st),
            dst=_peer_kw(st.dst),
        )


def _read_peer(p: Peer, r: object) -> None:
    state, max_win, shift = r.state - 1, r.max_win, r.wscale  # type: ignore[attr-defined]
    if not 0 <= state <= TIME_WAIT or max_win > 0xFFFF or shift > 14:
        raise wire.FrameError("badval", "peer out of range")
    p.state, p.seqlo, p.seqhi = state, r.seqlo, r.seqhi  # type: ignore[attr-defined]
    p.max_win = U16[max_win]
    p.wscale = shift | 0x80 if r.wscale_seen else shift  # type: ignore[attr-defined]
    p.traffic = r.packets * PACKET + r.bytes  # type: ignore[attr-defined]


def read_records(batch: object, now: float, timeouts: Sequence[int]) -> list[State]:
    """States from StateRecords, with read_states' checks."""
    out: list[State] = []
    for r in batch.states:  # type: ignore[attr-defined]
        a, b = r.src_address, r.dst_address
        if len(a) != len(b) or (len(a) != 4 and len(a) != 16):
            raise wire.FrameError("badval", "address")
        if r.protocol > 255 or r.src_port > 0xFFFF or r.dst_port > 0xFFFF:
            raise wire.FrameError("badval", "protocol or port")
        timeout, direction = r.timeout, r.direction
        if timeout >= tmo.PFTM_MAX and timeout != tmo.TIME_WAIT:
            raise wire.FrameError("badval", "timeout")
        if (direction != _IN and direction != _OUT) or r.msl_class > pb.MSL_CLASS_LOOPBACK:
            raise wire.FrameError("badval", "direction or class")
        st = State(keys.make(a, b, r.src_port, r.dst_port), r.protocol, r.id, r.creatorid,
                   now - r.age_ms / 1000)  # fmt: skip
        st.flags = (FLAG_OUT if direction == _OUT else 0) | (r.msl_class << MSLT_SHIFT)
        st.timeout = timeout
        st.expire = wire.expire_from_wire(timeout, r.expires_in_ms, timeouts, now)
        _read_peer(st, r.src)
        _read_peer(st.dst, r.dst)
        out.append(st)
    return out


def sample_states(n: int) -> tuple[list[State], list[int]]:
    """``n`` established TCP states with real windows and counters, and the timeouts."""
    table = StateTable(TableConfig(limit_states=n + 10))
    for i in range(n):
        for f in workload.handshake(i):
            pkt = decode_frame(f, 1)
            assert type(pkt) is tuple
            table.test(pkt, 1.0)
    for f in workload.established(n, 1):
        pkt = decode_frame(f, 1)
        assert type(pkt) is tuple
        table.test(pkt, 1.0)
    states = list(table.states())
    assert len(states) == n
    return states, list(table.timeouts)


def best_of(repeat: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512, help="states per batch (default 512)")
    ap.add_argument("--batches", type=int, default=40, help="batches per timing (default 40)")
    ap.add_argument("--repeat", type=int, default=5, help="timings, best kept (default 5)")
    args = ap.parse_args()
    states, timeouts = sample_states(args.batch * args.batches)
    chunks = [states[i : i + args.batch] for i in range(0, len(states), args.batch)]
    now = 2.0
    n = len(states)

    def build_columns() -> list[bytes]:
        out = []
        for chunk in chunks:
            frame = pb.SyncFrame()
            wire.put_states(frame.updates, chunk, timeouts, now)
            out.append(frame.SerializeToString())
        return out

    def build_records() -> list[bytes]:
        out = []
        for chunk in chunks:
            batch = StateRecords()
            put_records(batch, chunk, timeouts, now)
            out.append(batch.SerializeToString())
        return out

    col_data, rec_data = build_columns(), build_records()

    def read_columns() -> None:
        for data in col_data:
            wire.read_states(pb.SyncFrame.FromString(data).updates, now, timeouts)

    def read_recs() -> None:
        for data in rec_data:
            read_records(StateRecords.FromString(data), now, timeouts)

    # The two layouts must carry the same states.
    a = wire.read_states(pb.SyncFrame.FromString(col_data[0]).updates, now, timeouts)
    b = read_records(StateRecords.FromString(rec_data[0]), now, timeouts)
    for x, y in zip(a, b, strict=True):
        assert (x.key, x.id, x.seqhi, x.dst.max_win, x.traffic, x.expire) == (
            y.key, y.id, y.seqhi, y.dst.max_win, y.traffic, y.expire)  # fmt: skip

    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            t0 = time.process_time()
            fn()
            return time.process_time() - t0

        return run

    figures = {}
    # Interleaved, so drift on a shared machine touches both layouts alike.
    for _ in range(args.repeat):
        for name, fn in (
            ("columns build", build_columns),
            ("records build", build_records),
            ("columns read", read_columns),
            ("records read", read_recs),
        ):
            t = timed(fn)()
            figures[name] = min(figures.get(name, t), t)
    us = {k: v / n * 1e6 for k, v in figures.items()}
    print(
        f"protobuf backend {api_implementation.Type()}, {args.batch} states per batch, "
        f"{n:,} states, best of {args.repeat}"
    )
    print(f"{'layout':34} {'build+serialize':>16} {'parse+read':>12}   bytes/state")
    print(
        f"{'one message per state (repeated)':34} {us['records build']:13.2f} us "
        f"{us['records read']:9.2f} us   {sum(map(len, rec_data)) / n:8.1f}"
    )
    print(
        f"{'columns (sync.proto)':34} {us['columns build']:13.2f} us "
        f"{us['columns read']:9.2f} us   {sum(map(len, col_data)) / n:8.1f}"
    )
    print(
        f"columns are {us['records build'] / us['columns build']:.2f}x faster to build, "
        f"{us['records read'] / us['columns read']:.2f}x faster to read"
    )


if __name__ == "__main__":
    main()
