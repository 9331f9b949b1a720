"""WatchStates: the table's changes streamed to watchers (conntrack -E), never stalling it.

Each :class:`Watcher` is a consumer of the node's change lists (``Node.add_consumer``).
Its :meth:`Watcher.consume` runs inside the node's work (a packet batch, a purge, an API
call): it only classifies, filters and appends to a bounded queue; a full queue counts the
event as missed instead of waiting. The gRPC side takes the whole queue, converts it to
messages (the costly part, done outside the node's work) and reports the missed count
after the events that preceded the gap.

A bare ``State`` in a change list means packets moved its windows, counters or expiry
without a peer-state change. Every packet of a busy connection does that, so those are
reported only on request, at most once per state per interval (the newest figures then).
``StateMoved`` (a TIME_WAIT connection changing form when net.inet.tcp.vtw.enable flips)
changes nothing a watcher sees and is not reported.

While any watcher exists, :class:`WatchHub` hands the table's changes out every
``PUBLISH_PERIOD`` so events arrive within milliseconds even on a node with no pfsync
peers (whose driver would otherwise be the one to do it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from statetable import keys
from statetable.events import (
    StateInserted,
    StateRemoved,
    StateUpdated,
    StateVestigial,
    VestigialRemoved,
)
from statetable.state import State

# The wire enum's numbers (control.proto StateEventKind).
INSERT, UPDATE, VESTIGIAL, REMOVE = 1, 2, 3, 4
# A bare State: a packet-only update (reported as UPDATE, on request only).
PACKET = 0
_KIND_OF: dict[type, int] = {
    State: PACKET,
    StateInserted: INSERT,
    StateUpdated: UPDATE,
    StateVestigial: VESTIGIAL,
    StateRemoved: REMOVE,
    VestigialRemoved: REMOVE,
}
IPPROTO_TCP = 6

QUEUE_DEFAULT = 65536
QUEUE_MIN, QUEUE_MAX = 16, 1 << 20
PUBLISH_PERIOD = 0.02
# Packet-update timestamps kept per watcher before the old ones are forgotten.
PACKET_MEMORY = 1 << 18

# One queued change: (kind, the change object, node clock when handed out).
Queued = tuple[int, object, float]


class Watcher:
    """One WatchStates stream's filter and bounded queue."""

    def __init__(
        self,
        proto: int = 0,
        address: bytes | None = None,
        kinds: frozenset[int] = frozenset((INSERT, UPDATE, VESTIGIAL, REMOVE)),
        packet_interval: float | None = None,
        queue_events: int = QUEUE_DEFAULT,
    ) -> None:
        self.proto = proto
        self.address = address
        self.kinds = set(kinds)
        if packet_interval is not None and UPDATE in kinds:
            self.kinds.add(PACKET)
        self.packet_interval = packet_interval or 0.0
        self.queue_events = queue_events
        self.queue: list[Queued] = []
        self.missed = 0
        self.wake = asyncio.Event()
        # (id, creatorid) -> when its last packet update was queued.
        self._last_packet: dict[tuple[int, int], float] = {}

    def consume(self, changes: list[object], now: float) -> None:
        """The node's change fan-out: classify, filter, queue or count as missed."""
        kinds, kind_of, queue = self.kinds, _KIND_OF, self.queue
        proto, address = self.proto, self.address
        for change in changes:
            kind = kind_of.get(type(change), -1)
            if kind not in kinds:
                continue
            if proto or address is not None:
                if type(change) is VestigialRemoved:
                    key, p = change.key, IPPROTO_TCP
                else:
                    st: Any = change if kind == PACKET else change.state  # type: ignore[attr-defined]
                    key, p = st.key, st.proto
                if proto and p != proto:
                    continue
                if address is not None:
                    sa, _, da, _ = keys.unpack(key)
                    if address != sa and address != da:
                        continue
            if kind == PACKET and not self._packet_due(change, now):  # type: ignore[arg-type]
                continue
            if len(queue) >= self.queue_events:
                self.missed += 1
                continue
            if not queue:
                self.wake.set()
            queue.append((kind, change, now))

    def _packet_due(self, st: State, now: float) -> bool:
        ident = (st.id, st.creatorid)
        last = self._last_packet.get(ident)
        if last is not None and now - last < self.packet_interval:
            return False
        if len(self._last_packet) >= PACKET_MEMORY:
            self._last_packet.clear()  # bounded; at worst one extra update per state
        self._last_packet[ident] = now
        return True

    def take(self, limit: int) -> tuple[list[Queued], int]:
        """Up to ``limit`` queued changes, and the missed count when the queue is emptied
        by this take (those events came after everything queued), else 0."""
        batch = self.queue[:limit]
        del self.queue[:limit]
        missed = 0
        if not self.queue:
            missed, self.missed = self.missed, 0
        return batch, missed


class WatchHub:
    """The node's watchers and the publishing ticker they need."""

    def __init__(
        self, add: Callable[..., None], remove: Callable[..., None], publish: Callable[[], None]
    ) -> None:
        self._add, self._remove, self._publish = add, remove, publish
        self.watchers: list[Watcher] = []
        self._ticker: asyncio.Task[None] | None = None
        self.closing = False  # the node stops: every watcher's stream ends

    def close(self) -> None:
        """The node stops: wake every watcher, whose stream then ends (a stream the
        server cancelled instead makes grpc print a traceback)."""
        self.closing = True
        for watcher in self.watchers:
            watcher.wake.set()

    def attach(self, watcher: Watcher) -> None:
        """Start handing changes to ``watcher``."""
        # Changes recorded before this watcher existed are not its business: hand them
        # out first (the table only records while someone consumes anyway).
        self._publish()
        self._add(watcher.consume)
        self.watchers.append(watcher)
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def detach(self, watcher: Watcher) -> None:
        """Stop handing changes to ``watcher``."""
        if watcher not in self.watchers:
            return
        self.watchers.remove(watcher)
        self._remove(watcher.consume)
        if not self.watchers and self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    async def _tick(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(PUBLISH_PERIOD)
                self._publish()
