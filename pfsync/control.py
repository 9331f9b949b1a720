"""The ControlService gRPC service: the node's side of pfctl (grpc.aio adapter, no logic of
its own beyond translating between the table and the wire contract in control.proto)."""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from pfsync.admin import require_admin
from pfsync.listing import YIELD_CHECK, Lease, ListingGate
from pfsync.node import MALFORMED, SHUTTING_DOWN, Node
from pfsync.state_pb import IPPROTO_TCP, EventHeads, fill_event, fill_state, fill_vestigial
from pfsync.sync.engine import PeerLink
from pfsync.taps import Batch
from pfsync.v1 import control_pb2 as pb
from pfsync.v1 import control_pb2_grpc
from pfsync.watch import (
    INSERT,
    QUEUE_DEFAULT,
    QUEUE_MAX,
    QUEUE_MIN,
    REMOVE,
    UPDATE,
    VESTIGIAL,
    Watcher,
    WatchHub,
)
from statetable import decode_frame, keys
from statetable import timeouts as tmo
from statetable.counters import PFRES_NAMES
from statetable.state import State
from statetable.table import BLOCK, PASS
from statetable.vtw import Vestigial

CHUNK = 1000  # states per ListStates message: ~200 KB, far below 4 MiB
MAX_INJECT_FRAMES = 65536
LIMITS = ("states", "src-nodes", "frags", "tables", "table-entries")

_FAMILY = {4: pb.ADDRESS_FAMILY_IPV4, 6: pb.ADDRESS_FAMILY_IPV6}
_DIRECTION = {1: pb.DIRECTION_IN, 2: pb.DIRECTION_OUT}
_VERDICT = {PASS: pb.VERDICT_PASS, BLOCK: pb.VERDICT_BLOCK, MALFORMED: pb.VERDICT_ERROR}
_SOURCE_KIND = {"pcap": pb.PACKET_SOURCE_KIND_PCAP, "capture": pb.PACKET_SOURCE_KIND_CAPTURE}
# What the table's expires_at says of a state no longer in it.
_GONE = float("-inf")
_HEX = re.compile(r"[0-9a-fA-F]+")


class BadRequest(ValueError):
    """A request field that does not parse; the message is one line for INVALID_ARGUMENT."""


# --- wire -> table --------------------------------------------------------------------------


def parse_address(text: str, what: str) -> bytes:
    """Text address to network-order bytes; ``BadRequest`` in one line if it does not parse."""
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        raise BadRequest(f"{what}: not an IP address: {text[:64]!r}") from None


def parse_hex(text: str, digits: int, what: str) -> int:
    """1 to ``digits`` hex digits (an optional 0x, as pfctl's %x) to an int."""
    bare = text[2:] if text[:2] in ("0x", "0X") else text
    if not (0 < len(bare) <= digits and _HEX.fullmatch(bare)):
        raise BadRequest(f"{what}: want 1 to {digits} hex digits, got {text[:64]!r}")
    return int(bare, 16)


@dataclass(frozen=True)
class _Network:
    """An AddressMatch, parsed: matches addresses of its length within its prefix."""

    size: int
    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    @classmethod
    def parse(cls, match: pb.AddressMatch, what: str) -> _Network:
        addr = parse_address(match.address, f"{what}.address")
        bits = 8 * len(addr)
        prefix = match.prefix_len if match.HasField("prefix_len") else bits
        if prefix > bits:
            raise BadRequest(f"{what}.prefix_len: {prefix} is longer than the address ({bits})")
        return cls(len(addr), ipaddress.ip_network((addr, prefix), strict=False))

    def __contains__(self, addr: bytes) -> bool:
        return len(addr) == self.size and ipaddress.ip_address(addr) in self.network


@dataclass(frozen=True)
class _Identity:
    """A state's (id, creatorid) from a request's text fields."""

    id: int
    creatorid: int

    @classmethod
    def parse(cls, id_text: str, creatorid_text: str, hostid: int) -> _Identity:
        state_id = parse_hex(id_text, 16, "id")
        if state_id == 0:
            raise BadRequest("id: must not be 0")
        creatorid = parse_hex(creatorid_text, 8, "creatorid") if creatorid_text else hostid
        return cls(state_id, creatorid)

    def owns(self, item: State | Vestigial) -> bool:
        return item.id == self.id and item.creatorid == self.creatorid


def _chunks(rows: Iterable[pb.State]) -> Iterator[pb.ListStatesResponse]:
    chunk: list[pb.State] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK:
            yield pb.ListStatesResponse(states=chunk)
            chunk = []
    if chunk:
        yield pb.ListStatesResponse(states=chunk)


class ControlService(control_pb2_grpc.ControlServiceServicer):
    """Serves a node's table. Admin calls need the token, or a loopback client if none."""

    def __init__(self, node: Node, admin_token: str | None = None) -> None:
        self.node = node
        self.admin_token = admin_token
        self.listings = ListingGate()
        self.watches = WatchHub(node.add_consumer, node.remove_consumer, node.publish_changes)

    async def _require_admin(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await require_admin(context, self.admin_token)

    async def ListStates(
        self, request: pb.ListStatesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        node, table = self.node, self.node.table
        try:
            address = parse_address(request.address, "address") if request.address else None
            identity = (
                _Identity.parse(request.id, request.creatorid, node.hostid) if request.id else None
            )
            creatorid = (
                parse_hex(request.creatorid, 8, "creatorid")
                if request.creatorid and identity is None
                else None
            )
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        proto = request.proto

        def wanted(item: State | Vestigial) -> bool:
            if creatorid is not None and item.creatorid != creatorid:
                return False
            if address is not None:
                sa, _, da, _ = keys.unpack(item.key)
                return address in (sa, da)
            return True

        async with self.listings.slot(context) as lease:
            # Snapshot first (8 bytes a state): the table may change while the stream
            # waits on the client.
            if identity is not None:
                found = table.get_by_id(identity.id, identity.creatorid)
                states = [found] if found is not None else []
            elif proto:
                states = [st for st in table.states() if st.proto == proto]
            else:
                states = list(table.states())
            if address is not None or creatorid is not None:
                states = [st for st in states if wanted(st)]
            records = (
                [
                    rec
                    for rec in table.vestigial()
                    if (identity is None or identity.owns(rec)) and wanted(rec)
                ]
                if not proto or proto == IPPROTO_TCP
                else []
            )
            await self._send_listing(states, records, lease)

    async def _send_listing(
        self, states: list[State], records: list[Vestigial], lease: Lease
    ) -> None:
        """Convert and send in chunks, pacing so a long listing lets other calls in."""
        now, expires_at = self.node.clock(), self.node.table.expires_at
        chunk = pb.ListStatesResponse()
        add, room = chunk.states.add, CHUNK
        for start in range(0, len(states), YIELD_CHECK):
            await lease.pace()
            for st in states[start : start + YIELD_CHECK]:
                expires = expires_at(st)
                if expires == _GONE:  # it left the table since the snapshot: not listed
                    continue
                fill_state(add(), st, now, expires, st.state, st.dst.state)
                room -= 1
                if not room:
                    await lease.send(chunk)
                    chunk = pb.ListStatesResponse()
                    add, room = chunk.states.add, CHUNK
        for start in range(0, len(records), YIELD_CHECK):
            await lease.pace()
            for rec in records[start : start + YIELD_CHECK]:
                fill_vestigial(add(), rec, now)
                room -= 1
                if not room:
                    await lease.send(chunk)
                    chunk = pb.ListStatesResponse()
                    add, room = chunk.states.add, CHUNK
        if room < CHUNK:
            await lease.send(chunk)

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetInfoResponse:
        node, table = self.node, self.node.table
        searches, inserts, removals = table.fcounters
        return pb.GetInfoResponse(
            running=True,
            enabled_for=Duration(seconds=int(node.clock() - node.started)),
            hostid=f"{node.hostid:08x}",
            debug="err",
            current_entries=table.count,
            half_open_tcp=table.half_open,
            searches=searches,
            inserts=inserts,
            removals=removals,
            counters=[
                pb.Counter(name=n, value=v) for n, v in zip(PFRES_NAMES, table.pfres, strict=True)
            ],
            decoder_counters=[pb.Counter(name=n, value=v) for n, v in node.decoder_counters()],
            sources=[
                pb.PacketSource(
                    kind=_SOURCE_KIND.get(s.kind, pb.PACKET_SOURCE_KIND_UNSPECIFIED),
                    name=s.name,
                    frames=s.frames,
                    done=s.done,
                    error=s.error,
                    drops=s.kernel_drops,
                )
                for s in node.sources
            ],
            packets_passed=table.passed,
            packets_blocked=table.blocked,
        )

    async def GetTimeouts(
        self, request: pb.GetTimeoutsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetTimeoutsResponse:
        values = self.node.table.timeouts
        timeouts = []
        for i in tmo.DISPLAY_ORDER:
            name = tmo.NAMES[i]
            if name.startswith("adaptive."):  # state counts, not times
                timeouts.append(pb.Timeout(name=name, states=values[i]))
            else:
                timeouts.append(pb.Timeout(name=name, duration=Duration(seconds=values[i])))
        return pb.GetTimeoutsResponse(timeouts=timeouts)

    async def GetMemory(
        self, request: pb.GetMemoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetMemoryResponse:
        # Only states are limited here; the other pools of pf do not exist in this node.
        hard = {"states": self.node.table.limit_states}
        limits = [
            pb.Limit(name=n, hard_limit=hard[n]) if n in hard else pb.Limit(name=n, unlimited=True)
            for n in LIMITS
        ]
        return pb.GetMemoryResponse(limits=limits)

    async def Inject(
        self, request: pb.InjectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.InjectResponse:
        await self._require_admin(context)
        if len(request.frames) > MAX_INJECT_FRAMES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_INJECT_FRAMES} frames per call"
            )
        node = self.node
        feed, now = node.feed_decoded, node.clock()
        pkts = [decode_frame(f.data, f.linktype) for f in request.frames]
        verdicts = [feed(pkt, now) for pkt in pkts]
        for f, verdict in zip(request.frames, verdicts, strict=True):
            node.count_frame(node.inject_source, f.data, verdict)
        if node.inject_taps and pkts:
            tapped = Batch()
            for f, pkt in zip(request.frames, pkts, strict=True):
                tapped.add(now, (now, f.linktype, f.data), pkt)
            tapped.hand_over(node.inject_taps)
        # pfsync deferral holds the reply until peers acknowledged the new states.
        await node.settle()
        blocked, errors = verdicts.count(BLOCK), verdicts.count(MALFORMED)
        return pb.InjectResponse(
            passed=len(verdicts) - blocked - errors,
            blocked=blocked,
            errors=errors,
            verdicts=[_VERDICT[v] for v in verdicts],
        )

    async def KillStates(
        self, request: pb.KillStatesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.KillStatesResponse:
        await self._require_admin(context)
        table = self.node.table
        try:
            victims, predicate = self._kill_targets(request)
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        records = table.kill_vestigial(predicate)
        for st in victims:
            table.kill(st)
        return pb.KillStatesResponse(killed=len(victims) + records)

    def _kill_targets(
        self, request: pb.KillStatesRequest
    ) -> tuple[list[State], Callable[[Vestigial], bool]]:
        """The full states to kill and a predicate choosing the records to kill."""
        table = self.node.table
        by_hosts = request.HasField("src") or request.HasField("dst")
        if request.id:
            if by_hosts:
                raise BadRequest("give id or src/dst, not both")
            identity = _Identity.parse(request.id, request.creatorid, self.node.hostid)
            found = table.get_by_id(identity.id, identity.creatorid)
            return ([found] if found is not None else []), identity.owns
        if request.creatorid:
            raise BadRequest("creatorid needs id")
        if not request.src.address:
            raise BadRequest("give id, or src.address (with an optional dst)")
        src = _Network.parse(request.src, "src")
        dst = _Network.parse(request.dst, "dst") if request.dst.address else None
        if dst is not None and dst.size != src.size:
            raise BadRequest("src and dst must be of one address family")

        def matches(key: bytes) -> bool:
            sa, _, da, _ = keys.unpack(key)
            return sa in src and (dst is None or da in dst)

        return [st for st in table.states() if matches(st.key)], lambda rec: matches(rec.key)

    async def ClearStates(
        self, request: pb.ClearStatesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ClearStatesResponse:
        await self._require_admin(context)
        cleared = self.node.table.clear()
        await self.node.settle()
        return pb.ClearStatesResponse(cleared=cleared)

    async def ClearCounters(
        self, request: pb.ClearCountersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ClearCountersResponse:
        await self._require_admin(context)
        self.node.clear_counters()
        return pb.ClearCountersResponse()

    async def WatchStates(
        self, request: pb.WatchStatesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchStatesResponse]:
        try:
            watcher = _watcher(request)
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        node, hub = self.node, self.watches
        if hub.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        hub.attach(watcher)
        try:
            yield pb.WatchStatesResponse()
            while True:
                if not watcher.queue and not watcher.missed:
                    await watcher.wake.wait()
                watcher.wake.clear()
                if hub.closing:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                batch, missed = watcher.take(CHUNK)
                heads = EventHeads(time.time() - node.clock())
                response = pb.WatchStatesResponse(missed=missed)
                add, expires_at = response.events.add, node.table.expires_at
                for kind, change, now in batch:
                    fill_event(add(), kind, change, now, heads, expires_at)
                yield response
        finally:
            hub.detach(watcher)

    async def GetSyncStatus(
        self, request: pb.GetSyncStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetSyncStatusResponse:
        driver = self.node.sync
        if driver is None:
            return pb.GetSyncStatusResponse(
                enabled=False,
                ready=True,
                ready_reason="pfsync is off",
                hostid=f"{self.node.hostid:08x}",
            )
        engine = driver.engine
        settings = engine.settings
        return pb.GetSyncStatusResponse(
            enabled=True,
            ready=engine.ready,
            ready_reason=engine.ready_reason(),
            hostid=f"{self.node.hostid:08x}",
            listen_address=driver.listen_address,
            maxupd=settings.maxupd,
            flush_interval=_duration(settings.flush_ms / 1000),
            defer=settings.defer,
            digest=f"{engine.digest.value:016x}",
            digest_states=engine.digest.states,
            peers=[_sync_peer(link) for link in sorted(engine.peers.values(), key=_peer_order)],
        )


def _peer_order(link: PeerLink) -> tuple[bool, str]:
    return (not link.configured, link.name)


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _sync_peer(link: PeerLink) -> pb.SyncPeer:
    """One peer stream as GetSyncStatus shows it."""
    peer = pb.SyncPeer(
        address=link.name.removeprefix("in:"),
        inbound=not link.configured,
        connected=link.connected and link.creatorid is not None,
        creatorid="" if link.creatorid is None else f"{link.creatorid:08x}",
        bulk="receiving" if link.bulk_in else "sending" if link.bulk_out is not None else "",
        frames_in=link.frames_in,
        frames_out=link.frames_out,
        bytes_in=link.bytes_in,
        bytes_out=link.bytes_out,
        states_in=link.states_in,
        states_out=link.states_out,
        last_error=link.last_error,
        peer_digest="" if link.peer_digest is None else f"{link.peer_digest:016x}",
        digest_agrees=link.digest_agrees,
    )
    p50, p99 = link.lag_percentile(0.5), link.lag_percentile(0.99)
    if p50 is not None and p99 is not None:
        peer.lag_p50.CopyFrom(_duration(min(p50, 1e6) / 1000))
        peer.lag_p99.CopyFrom(_duration(min(p99, 1e6) / 1000))
    return peer


# --- WatchStates -------------------------------------------------------------------------

_EVENT_KINDS = {
    pb.STATE_EVENT_KIND_INSERT: INSERT,
    pb.STATE_EVENT_KIND_UPDATE: UPDATE,
    pb.STATE_EVENT_KIND_VESTIGIAL: VESTIGIAL,
    pb.STATE_EVENT_KIND_REMOVE: REMOVE,
}


def _watcher(request: pb.WatchStatesRequest) -> Watcher:
    """A Watcher from a request; ``BadRequest`` in one line for a bad field."""
    address = parse_address(request.address, "address") if request.address else None
    kinds = set()
    for kind in request.kinds:
        if kind not in _EVENT_KINDS:
            raise BadRequest(f"kinds: {kind} is not a StateEventKind")
        kinds.add(_EVENT_KINDS[kind])
    queue = request.queue_events if request.HasField("queue_events") else QUEUE_DEFAULT
    if not QUEUE_MIN <= queue <= QUEUE_MAX:
        raise BadRequest(f"queue_events: want {QUEUE_MIN} to {QUEUE_MAX}, got {queue}")
    interval = None
    if request.packet_updates:
        interval = 1.0
        if request.HasField("packet_update_interval"):
            interval = request.packet_update_interval.ToNanoseconds() / 1e9
            if interval < 0.01:
                raise BadRequest("packet_update_interval: at least 10 ms")
    if request.proto > 255:
        raise BadRequest(f"proto: {request.proto} is not an IP protocol number")
    return Watcher(
        request.proto, address, frozenset(kinds or _EVENT_KINDS.values()), interval, queue
    )
