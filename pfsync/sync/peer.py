"""The pfsync0 interface: gRPC streams to peers around one :class:`SyncEngine`.

Thin by design: everything pfsync decides lives in the engine; this module moves its
frames. ``SyncDriver`` owns

- one dialer per configured peer (``--peer``): a bidirectional ``Exchange`` stream,
  redialed with exponential back-off (0.1 s doubling to 5 s, with jitter) after a cut;
- the ``SyncService`` servicer that accepts streams dialed by other nodes, after
  checking their certificate names against ``--peer-allow`` when mTLS is on (a refusal
  counts ``badauth`` and never reaches the engine or the table);
- one writer per stream that sends what the engine queues, woken when there is more;
- a ticker that hands the table's changes to the engine and runs its timers.

gRPC's flow control is the back-pressure: a writer awaits each write, so a slow peer
fills only its engine outbox, which the engine bounds (it cuts the peer; the peer
resumes from the replay log or gets a bulk update).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

import grpc
from google.protobuf.message import DecodeError

from pfsync.sync.engine import DEFER_SECONDS, SyncEngine
from pfsync.tls import peer_names
from pfsync.v1 import sync_pb2 as pb
from pfsync.v1 import sync_pb2_grpc

log = logging.getLogger("pfsyncd.sync")

# 4 MiB is gRPC's default receive limit; bulk frames stay far below it, but a peer may
# be configured with larger frames, so both ends accept up to this much.
MAX_MESSAGE = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
]
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
# The longest a stopping node waits for its peers to take what it still had to send.
STOP_DRAIN_SECONDS = 2.0


class SyncDriver(sync_pb2_grpc.SyncServiceServicer):
    """Runs the engine for a node: its streams, its timers, its readiness."""

    def __init__(
        self,
        engine: SyncEngine,
        publish: Callable[[], None],
        clock: Callable[[], float],
        peers: Sequence[str] = (),
        credentials: grpc.ChannelCredentials | None = None,
        allow: Sequence[str] = (),
        on_ready: Callable[[bool], None] | None = None,
        listen_address: str = "",
    ) -> None:
        self.engine = engine
        self.listen_address = listen_address
        # New states the engine holds for deferral, since the last release_deferred().
        self._held: list[tuple[int, int]] = []
        self._publish = publish
        self.clock = clock
        self.peer_addresses = list(peers)
        # Dialing: TLS credentials (None: plain text); listening: names allowed to sync.
        self.credentials = credentials
        self.allow = set(allow)
        self._on_ready = on_ready
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._tick = asyncio.Event()
        self._stopping = False
        self._was_ready: bool | None = None
        # pfsync0 taps (pfsync.taps): while one is attached, called with every frame in
        # (False) and out (True), serialized; None costs one test per frame.
        self.tap: Callable[[bytes, bool], None] | None = None
        now = clock()
        for addr in self.peer_addresses:
            engine.add_peer(addr, now, configured=True, v6=addr.startswith("["))

    # ---- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the ticker and one dialer per configured peer."""
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._ticker()))
        for addr in self.peer_addresses:
            self._tasks.append(loop.create_task(self._dial(addr)))
        self._check_ready()

    async def stop(self) -> None:
        """Send what is pending (bounded wait), then close every stream."""
        self._stopping = True
        self.pump(force=True)
        deadline = self.clock() + STOP_DRAIN_SECONDS
        while self.clock() < deadline and any(
            link.connected and link.outbox for link in self.engine.peers.values()
        ):
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for event in self._wake.values():
            event.set()

    # ---- the engine's clock and the table's changes ------------------------------------

    def consume(self, changes: list[object], now: float) -> None:
        """The node's change fan-out calls this with what the table recorded."""
        held = self.engine.handle_changes(changes, now)
        if held:
            self._held += held
            self.poke()

    async def release_deferred(self) -> None:
        """Wait until the states held for deferral are acknowledged or timed out (the
        engine releases each within DEFER_SECONDS; the ticker runs at its deadlines)."""
        held, self._held = self._held, []
        if not held:
            return
        self.pump()
        deadline = self.clock() + 4 * DEFER_SECONDS  # a bound even if the ticker is late
        while any(self.engine.is_held(ident) for ident in held) and self.clock() < deadline:
            await asyncio.sleep(0.001)
        self.engine.take_released()

    def pump(self, force: bool = False) -> None:
        """Bring the engine up to date (changes, timers) and wake the writers."""
        self._publish()
        now = self.clock()
        if force:
            self.engine.flush(now)
        due = self.engine.next_timer()
        if due is not None and due <= now:
            self.engine.handle_timer(now)
        for event in self._wake.values():
            event.set()
        self._check_ready()

    def poke(self) -> None:
        """Something changed outside the ticker's rhythm (an API call): run it now."""
        self._tick.set()

    async def _ticker(self) -> None:
        while True:
            self.pump()
            now = self.clock()
            due = self.engine.next_timer()
            flush = self.engine.settings.flush_ms / 1000
            delay = flush if due is None else min(max(due - now, 0.0), flush)
            try:
                await asyncio.wait_for(self._tick.wait(), delay)
            except TimeoutError:
                pass
            self._tick.clear()

    def _check_ready(self) -> None:
        ready = self.engine.ready
        if ready != self._was_ready:
            self._was_ready = ready
            if self._on_ready is not None:
                self._on_ready(ready)

    # ---- one stream's two directions ----------------------------------------------------

    def _undecodable(self, name: str) -> str:
        """A peer sent bytes that are no frame: count it (``badlen``: its lengths do not
        fit its bytes); the caller ends that stream only."""
        self.engine.stats.count("badlen")
        error = "a frame that is not a SyncFrame message: stream closed"
        link = self.engine.peers.get(name)
        if link is not None:
            link.last_error = error
        return error

    def _receive(self, name: str, frame: pb.SyncFrame) -> None:
        if self.tap is not None:
            self.tap(frame.SerializeToString(), False)
        try:
            self.engine.receive(name, frame, self.clock(), frame.ByteSize())
        except Exception as exc:  # a bug must cost one frame, not the stream or the node
            log.error("pfsync: a frame from %s was dropped: %s: %s", name, type(exc).__name__, exc)
            link = self.engine.peers.get(name)
            if link is not None:
                link.last_error = f"frame dropped: {type(exc).__name__}: {exc}"
        self.pump()

    async def _outgoing(
        self, name: str, reader: asyncio.Future[None] | None = None
    ) -> AsyncIterator[pb.SyncFrame]:
        """The engine's frames for ``name`` as they come, until the engine drops the link
        or (on the listening side) the peer's half of the stream, ``reader``, ends."""
        wake = self._wake.setdefault(name, asyncio.Event())
        waiter: asyncio.Task[Literal[True]] | None = None
        try:
            while reader is None or not reader.done():
                frames = self.engine.frames_to_send(name, self.clock())
                link = self.engine.peers.get(name)
                for frame in frames:
                    if link is not None:
                        link.bytes_out += frame.ByteSize()
                    if self.tap is not None:
                        self.tap(frame.SerializeToString(), True)
                    yield frame
                if link is None or not link.connected:
                    return
                if frames:
                    continue
                if reader is None:
                    await wake.wait()
                else:
                    waiter = asyncio.ensure_future(wake.wait())
                    either: set[asyncio.Future[Any]] = {waiter, reader}
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                wake.clear()
        finally:
            if waiter is not None:
                waiter.cancel()

    # ---- dialing -------------------------------------------------------------------------

    def _channel(self, addr: str) -> grpc.aio.Channel:
        if self.credentials is not None:
            return grpc.aio.secure_channel(addr, self.credentials, options=CHANNEL_OPTIONS)
        return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)

    async def _dial(self, addr: str) -> None:
        backoff = BACKOFF_FIRST
        while not self._stopping:
            if self.engine.superseded(addr):
                await asyncio.sleep(1.0)  # the peer's own stream to us carries the sync
                continue
            error = ""
            async with self._channel(addr) as channel:
                stub = sync_pb2_grpc.SyncServiceStub(channel)
                self.engine.peer_up(addr, self.clock(), v6=addr.startswith("["))
                requests = (pb.ExchangeRequest(frame=f) async for f in self._outgoing(addr))
                call = stub.Exchange(requests)
                try:
                    async for response in call:
                        if response is None:  # grpc logged bytes it could not decode
                            error = self._undecodable(addr)
                            break
                        if backoff != BACKOFF_FIRST:
                            log.info("sync stream to %s up", addr)
                            backoff = BACKOFF_FIRST
                        self._receive(addr, response.frame)
                except grpc.aio.AioRpcError as exc:
                    error = f"{exc.code().name}: {exc.details()}"
                finally:
                    self.engine.peer_down(addr, self.clock(), error)
                    self._wake.pop(addr, None)
                    call.cancel()
            if self._stopping:
                return
            if error:
                log.debug("sync stream to %s: %s", addr, error)
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, BACKOFF_MAX)

    # ---- the listening side (SyncService) ---------------------------------------------

    async def Exchange(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[pb.ExchangeRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ExchangeResponse]:
        """A peer dialed us: run the stream until either side closes it."""
        if self.allow:
            names = peer_names(context)
            if not self.allow.intersection(names):
                self.engine.stats.count("badauth")
                log.warning("refused sync peer %s (certificate names %s)", context.peer(), names)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "peer not allowed")
        name = f"in:{context.peer()}"
        self.engine.peer_up(name, self.clock(), v6=context.peer().startswith("ipv6"))
        reader = asyncio.ensure_future(self._read(name, request_iterator))
        try:
            async for frame in self._outgoing(name, reader):
                yield pb.ExchangeResponse(frame=frame)
        finally:
            reader.cancel()
            self.engine.peer_down(name, self.clock())
            self._wake.pop(name, None)

    async def _read(self, name: str, requests: AsyncIterator[pb.ExchangeRequest]) -> None:
        try:
            async for request in requests:
                self._receive(name, request.frame)
        except DecodeError:
            self._undecodable(name)
