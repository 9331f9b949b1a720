"""Bounds for streamed listings (ListStates): how many run, how long a slow reader may hold one,
and how often a listing lets the event loop serve other calls.

A listing of a large table is the one call whose cost grows with the table, so without
bounds 200 concurrent listings share the loop 200 ways (each finishing late) and every
other call, ``pfctl -s info`` included, waits behind them; a reader that stops reading
would pin its snapshot and buffers for ever. Here:

- at most `MAX_OPEN` listings hold a snapshot (8 bytes per state) at once, the next
  `MAX_WAITING` wait their turn holding nothing but their call, beyond that a call is
  refused (RESOURCE_EXHAUSTED);
- of those, at most `MAX_BUSY` convert states at once, each yielding to the loop after
  `SLICE` seconds of work, so any other call waits at most `MAX_BUSY` such slices; a
  listing waiting for its reader gives its busy slot up;
- each chunk is written under a deadline: a reader that takes no chunk for
  `STALL_SECONDS` loses its stream, and with it its snapshot and its open slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.protobuf.message import Message

MAX_OPEN = 64
MAX_BUSY = 1
MAX_WAITING = 1024
# A listing checks the clock every YIELD_CHECK states and yields once it has worked SLICE
# seconds: a yield costs milliseconds in a grpc.aio loop, so yielding by count either
# wastes half the time (small counts) or stalls the loop on a slow machine (large ones).
YIELD_CHECK = 64
SLICE = 0.005
# How long a write may keep the busy slot (serializing and handing the chunk to gRPC core).
HANDOFF = 0.05
STALL_SECONDS = 10.0


class ListingGate:
    """Admission and pacing for one service's streamed listings."""

    def __init__(
        self,
        max_open: int = MAX_OPEN,
        max_busy: int = MAX_BUSY,
        max_waiting: int = MAX_WAITING,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        self.max_waiting = max_waiting
        self.stall_seconds = stall_seconds
        self.waiting = 0
        self._open = asyncio.Semaphore(max_open)
        self._busy = asyncio.Semaphore(max_busy)

    @asynccontextmanager
    async def slot(self, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Lease]:
        """An open and a busy slot for the body (abort if too many calls wait already)."""
        if self.waiting >= self.max_waiting:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "too many listings in progress; retry later"
            )
        self.waiting += 1
        try:
            await self._open.acquire()
        finally:
            self.waiting -= 1
        lease = Lease(self, context)
        try:
            await lease.take()
            yield lease
        finally:
            lease.give_back()
            self._open.release()


class Lease:
    """One listing's hold on the gate: the busy slot is held except while `send` waits."""

    def __init__(self, gate: ListingGate, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.gate = gate
        self.context = context
        self.busy = False
        self.since = 0.0

    async def pace(self) -> None:
        """Yield to the event loop if this listing has worked a whole slice."""
        if time.perf_counter() - self.since >= SLICE:
            await asyncio.sleep(0)
            self.since = time.perf_counter()

    async def take(self) -> None:
        """Wait for a busy slot."""
        await self.gate._busy.acquire()
        self.busy = True
        self.since = time.perf_counter()

    def give_back(self) -> None:
        """Release the busy slot if held."""
        if self.busy:
            self.busy = False
            self.gate._busy.release()

    async def send(self, message: Message) -> None:
        """Write one message; drop the stream if the reader takes nothing for the gate's
        ``stall_seconds``. The busy slot is kept while the chunk is serialized (that is
        work too) and given up if the reader is slow to take it."""
        write = asyncio.ensure_future(self.context.write(message))
        done, _ = await asyncio.wait({write}, timeout=HANDOFF)
        if done:
            write.result()
            self.since = time.perf_counter()
            return
        self.give_back()
        try:
            await asyncio.wait_for(write, self.gate.stall_seconds)
        except TimeoutError:
            await self.context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"reader took no data for {self.gate.stall_seconds:g} s",
            )
        await self.take()
