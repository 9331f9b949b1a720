"""The TapService gRPC service: taps on the wire (thin adapter around pfsync.taps)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from pfsync.admin import require_admin
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
    """The next frames of ``tap`` as FrameColumns (packed fields filled from lists)."""
    times, lengths, caplens, linktypes, directions, data = tap.take_columns(max_bytes)
    message = pb.AttachResponse(frame_count=len(times), counters=_counters(tap), tap_id=tap.tap_id)
    columns = message.columns
    columns.node_times.extend(times)
    columns.wall_offset = wall_offset
    columns.lengths.extend(lengths)
    columns.caplens.extend(caplens)
    columns.linktypes.extend(linktypes)
    columns.directions.extend(directions)  # type: ignore[arg-type]  # TapDirection values
    columns.data = data
    return message
