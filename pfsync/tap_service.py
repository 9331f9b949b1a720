"""The TapService gRPC service: taps on the wire (thin adapter around pfsync.taps)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from pfsync.admin import require_admin
from pfsync.node import SHUTTING_DOWN
from pfsync.taps import BUFFER_DEFAULT, BUFFER_MAX, SNAPLEN_MAX, FilterError, Tap, TapHub
from pfsync.v1 import tap_pb2 as pb
from pfsync.v1 import tap_pb2_grpc

# Bytes of records per AttachResponse: far below gRPC's 4 MiB, large enough that the
# per-message cost vanishes at a few hundred thousand frames a second.
MESSAGE_BYTES = 1 << 20


def _counters(tap: Tap) -> pb.TapCounters:
    return pb.TapCounters(received=tap.received, captured=tap.captured, dropped=tap.dropped)


class TapService(tap_pb2_grpc.TapServiceServicer):
    """Serves a node's taps; both calls are admin calls, refusals counted."""

    def __init__(self, hub: TapHub, admin_token: str | None = None) -> None:
        self.hub = hub
        self.admin_token = admin_token

    async def _require_admin(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            await require_admin(context, self.admin_token)
        except BaseException:
            # abort() raises; a refusal is counted (net.bpf.stats denied) on its way out.
            self.hub.count_denied()
            raise

    async def Attach(
        self, request: pb.AttachRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.AttachResponse]:
        await self._require_admin(context)
        hub = self.hub
        buffer_frames = (
            request.buffer_frames if request.HasField("buffer_frames") else BUFFER_DEFAULT
        )
        snaplen = request.snaplen if request.HasField("snaplen") else SNAPLEN_MAX
        if not 1 <= buffer_frames <= BUFFER_MAX:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"buffer_frames: want 1 to {BUFFER_MAX}"
            )
        if not 1 <= snaplen <= SNAPLEN_MAX:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"snaplen: want 1 to {SNAPLEN_MAX}"
            )
        if hub.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        if request.interface not in hub.names():
            shown = request.interface[:64]
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no interface {shown!r} on this node (have: {', '.join(hub.names())})",
            )
        try:
            tap = hub.attach(
                request.interface,
                request.filter,
                buffer_frames,
                snaplen,
                request.pid,
                request.command,
                context.peer(),
            )
        except FilterError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        try:
            yield pb.AttachResponse(tap_id=tap.tap_id, counters=_counters(tap))
            while True:
                if not tap.buffered:
                    tap.waiting = True
                    await tap.wake.wait()
                    tap.waiting = False
                tap.wake.clear()
                if hub.closing:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                # One message at a time: while the client reads it, the node goes on
                # filling the buffer (or dropping, when the client is slow).
                if request.columns:
                    yield columns_message(tap, hub.wall_offset())
                    continue
                records, count = tap.take(hub.wall_offset(), MESSAGE_BYTES)
                yield pb.AttachResponse(
                    records=records, frame_count=count, counters=_counters(tap), tap_id=tap.tap_id
                )
        finally:
            hub.detach(tap)

    async def ListTaps(
        self, request: pb.ListTapsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListTapsResponse:
        await self._require_admin(context)
        return pb.ListTapsResponse(
            taps=[
                pb.TapInfo(
                    tap_id=tap.tap_id,
                    pid=tap.pid,
                    command=tap.command,
                    peer=tap.peer,
                    interface=tap.interface,
                    flags=tap.flags,
                    counters=_counters(tap),
                    buffer_frames=tap.buffer_frames,
                    buffered_frames=tap.buffered,
                    filter=tap.filter,
                )
                for tap in self.hub.taps.values()
            ]
        )


def columns_message(
    tap: Tap, wall_offset: float, max_bytes: int = MESSAGE_BYTES
) -> pb.AttachResponse:
    """The next frames of ``tap`` as FrameColumns.

    Each column is already on the wire form of its packed field (tap.proto says why), so
    the fields are written as tag, length and bytes and parsed in one call: upb copies
    them, where adding elements one by one cost ~1,000 instructions a frame.
    """
    columns = tap.take_columns(max_bytes)
    parts: list[bytes] = []
    for tag, raw in zip(_COLUMN_TAGS, columns, strict=True):
        if raw:
            parts += (tag, _varint(len(raw)), raw)
    message = pb.AttachResponse(counters=_counters(tap), tap_id=tap.tap_id)
    message.columns.MergeFromString(b"".join(parts))
    message.columns.wall_offset = wall_offset
    message.frame_count = len(message.columns.node_times)
    return message


def _varint(value: int) -> bytes:
    """``value`` as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Tags (field number, wire type 2: length-delimited) of the columns Tap.take_columns
# returns, in its order, from the descriptor: tap.proto stays the one source.
_COLUMN_TAGS = tuple(
    _varint(pb.FrameColumns.DESCRIPTOR.fields_by_name[name].number << 3 | 2)
    for name in ("node_times", "lengths", "caplens", "linktypes", "directions", "data")
)
