"""The ControlService gRPC service: the node's side of pfctl (grpc.aio adapter, no logic of
its own beyond translating between the table and the wire contract in control.proto)."""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from pfsync.admin import require_admin
from pfsync.listing import YIELD_CHECK, Lease, ListingGate
from pfsync.node import MALFORMED, Node
from pfsync.sync.engine import PeerLink
from pfsync.taps import Batch
from pfsync.v1 import control_pb2 as pb
from pfsync.v1 import control_pb2_grpc
from pfsync.watch import (
    INSERT,
    PACKET,
    QUEUE_DEFAULT,
    QUEUE_MAX,
    QUEUE_MIN,
    REMOVE,
    UPDATE,
    VESTIGIAL,
    Queued,
    Watcher,
    WatchHub,
)
from statetable import decode_frame, keys
from statetable import timeouts as tmo
from statetable.counters import PFRES_NAMES
from statetable.events import StateUpdated, StateVestigial, VestigialRemoved
from statetable.state import FLAG_NOSYNC, TIME_WAIT, WSCALE_FLAG, WSCALE_MASK, Peer, State
from statetable.table import BLOCK, PASS
from statetable.vtw import PeerView, Vestigial

CHUNK = 1000  # states per ListStates message: ~200 KB, far below 4 MiB
MAX_INJECT_FRAMES = 65536
LIMITS = ("states", "src-nodes", "frags", "tables", "table-entries")
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_ICMPV6 = 1, 6, 58

_FAMILY = {4: pb.ADDRESS_FAMILY_IPV4, 6: pb.ADDRESS_FAMILY_IPV6}
_DIRECTION = {1: pb.DIRECTION_IN, 2: pb.DIRECTION_OUT}
_VERDICT = {PASS: pb.VERDICT_PASS, BLOCK: pb.VERDICT_BLOCK, MALFORMED: pb.VERDICT_ERROR}
_SOURCE_KIND = {"pcap": pb.PACKET_SOURCE_KIND_PCAP, "capture": pb.PACKET_SOURCE_KIND_CAPTURE}
_HEX = re.compile(r"[0-9a-fA-F]+")


class BadRequest(ValueError):
    """A request field that does not parse; the message is one line for INVALID_ARGUMENT."""


# --- table -> wire --------------------------------------------------------------------------


def address_text(addr: bytes) -> str:
    """4 or 16 network-order bytes as text (inet_ntop: mapped IPv6 prints dotted, as pf)."""
    return socket.inet_ntop(socket.AF_INET if len(addr) == 4 else socket.AF_INET6, addr)


def _state_field(proto: int) -> str:
    """The PeerState oneof member that holds a peer's level for this IP protocol."""
    if proto == IPPROTO_TCP:
        return "tcp_state"
    return "icmp_state" if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6) else "udp_state"


def peer_to_pb(
    peer: Peer | PeerView,
    proto: int,
    level: int | None = None,
    msg: pb.PeerState | None = None,
) -> pb.PeerState:
    """One peer on the wire (seqdiff and mss are not tracked: always 0), filled into
    ``msg`` when given (a field of the State being built: no copy).

    The enums number pf's levels from 1 (0 means unset), hence ``+ 1``. ``level`` overrides
    the peer's own (a TIME_WAIT record's peers are in TIME_WAIT whatever they last reached).
    """
    if msg is None:
        msg = pb.PeerState()
    msg.seqlo = peer.seqlo
    msg.seqhi = peer.seqhi
    msg.max_win = peer.max_win
    msg.wscale_offered = bool(peer.wscale & WSCALE_FLAG)
    msg.wscale = peer.wscale & WSCALE_MASK
    setattr(msg, _state_field(proto), (peer.state if level is None else level) + 1)
    if isinstance(peer, Peer):
        msg.packets = peer.packets
        msg.bytes = peer.bytes
    return msg


def state_to_pb(
    st: State, now: float, expires_at: Callable[[State], float], msg: pb.State | None = None
) -> pb.State:
    """A table state on the wire, with age and remaining lifetime relative to ``now``.

    ``expires_at`` is the table's (it depends on the timeouts and adaptive scaling).
    Filled into ``msg`` when given: a listing builds each state in place in its chunk
    (``states.add()``), field by field, which costs a third less than building a State
    from keyword arguments and copying it, nested peers and all, into the chunk
    (bench/bench_listing.py).
    """
    if msg is None:
        msg = pb.State()
    sa, sp, da, dp = st.endpoints()
    msg.id = f"{st.id:016x}"
    msg.creatorid = f"{st.creatorid:08x}"
    msg.af = _FAMILY[st.af]
    msg.proto = st.proto
    msg.ifname = "all"
    msg.direction = _DIRECTION.get(st.direction, pb.DIRECTION_UNSPECIFIED)
    msg.src_address = address_text(sa)
    msg.dst_address = address_text(da)
    msg.src_port = sp
    msg.dst_port = dp
    peer_to_pb(st, st.proto, msg=msg.src)
    peer_to_pb(st.dst, st.proto, msg=msg.dst)
    msg.timeout = tmo.name_of(st.timeout)
    msg.age_seconds = max(0, int(now - st.creation))
    msg.expires_in_seconds = _expires_in(expires_at(st), now)
    msg.nosync = bool(st.flags & FLAG_NOSYNC)
    return msg


def _expires_in(expires: float, now: float) -> int:
    # A state unlinked while a listing runs expires at -inf: it is due now, not an error.
    return max(0, int(expires - now + 0.999)) if math.isfinite(expires) else 0


def _record_pb(
    key: bytes, id: int, creatorid: int, src: pb.PeerState, dst: pb.PeerState
) -> pb.State:
    """A TIME_WAIT record's fields on the wire (listings and watch events share them)."""
    sa, sp, da, dp = keys.unpack(key)
    return pb.State(
        id=f"{id:016x}",
        creatorid=f"{creatorid:08x}",
        af=_FAMILY[keys.family(key)],
        proto=IPPROTO_TCP,
        ifname="all",
        direction=pb.DIRECTION_IN,
        src_address=address_text(sa),
        dst_address=address_text(da),
        src_port=sp,
        dst_port=dp,
        src=src,
        dst=dst,
        timeout=tmo.name_of(tmo.TIME_WAIT),
        vestigial=True,
    )


def vestigial_to_pb(rec: Vestigial, now: float) -> pb.State:
    """A VTW record on the wire: no counters, no creation time (the record keeps neither)."""
    msg = _record_pb(
        rec.key,
        rec.id,
        rec.creatorid,
        peer_to_pb(rec.src, IPPROTO_TCP, TIME_WAIT),
        peer_to_pb(rec.dst, IPPROTO_TCP, TIME_WAIT),
    )
    msg.expires_in_seconds = max(0, int(rec.expire - now + 0.999))
    return msg


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
            # Snapshot first: the table may change while the stream waits on the client.
            if identity is not None:
                found = table.get_by_id(identity.id, identity.creatorid)
                states = [found] if found is not None else []
            else:
                states = [st for st in table.states() if not proto or st.proto == proto]
            records = (
                [rec for rec in table.vestigial() if identity is None or identity.owns(rec)]
                if not proto or proto == IPPROTO_TCP
                else []
            )
            await self._send_listing(states, records, wanted, lease)

    async def _send_listing(
        self,
        states: list[State],
        records: list[Vestigial],
        wanted: Callable[[State | Vestigial], bool],
        lease: Lease,
    ) -> None:
        """Convert and send in chunks, pacing so a long listing lets other calls in."""
        now, expires_at = self.node.clock(), self.node.table.expires_at
        chunk = pb.ListStatesResponse()
        for n, st in enumerate(states, 1):
            if n % YIELD_CHECK == 0:
                await lease.pace()
            # A state that left the table since the snapshot is not listed.
            if wanted(st) and math.isfinite(expires_at(st)):
                state_to_pb(st, now, expires_at, chunk.states.add())
                if len(chunk.states) == CHUNK:
                    await lease.send(chunk)
                    chunk = pb.ListStatesResponse()
        for n, rec in enumerate(records, 1):
            if n % YIELD_CHECK == 0:
                await lease.pace()
            if wanted(rec):
                chunk.states.append(vestigial_to_pb(rec, now))
                if len(chunk.states) == CHUNK:
                    await lease.send(chunk)
                    chunk = pb.ListStatesResponse()
        if chunk.states:
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
                tapped.add(now, f.linktype, f.data, pkt)
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
        hub.attach(watcher)
        try:
            yield pb.WatchStatesResponse()
            while True:
                if not watcher.queue and not watcher.missed:
                    await watcher.wake.wait()
                watcher.wake.clear()
                batch, missed = watcher.take(CHUNK)
                offset = time.time() - node.clock()
                events = [_event_to_pb(q, node, offset) for q in batch]
                yield pb.WatchStatesResponse(events=events, missed=missed)
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


def _level(proto: int, level: int) -> pb.PeerState:
    """A PeerState with only its level (the wire enums number pf's levels from 1)."""
    msg = pb.PeerState()
    setattr(msg, _state_field(proto), level + 1)
    return msg


def _event_to_pb(queued: Queued, node: Node, offset: float) -> pb.StateEvent:
    """One queued change on the wire; ``offset`` turns the node clock into wall time.

    Flat on purpose (one constructor per message, no CopyFrom, no windows): this runs
    for every event a watcher gets, 50,000 a second in bench/bench_watch.py, where the
    listing's state_to_pb cost several times as much.
    """
    kind, change, now = queued
    wall = now + offset
    seconds = int(wall)
    ctype = type(change)
    if ctype is VestigialRemoved:
        when = Timestamp(seconds=seconds, nanos=int((wall - seconds) * 1e9))
        return _record_removed(change, when)  # type: ignore[arg-type]
    st: State = change if kind == PACKET else change.state  # type: ignore[assignment,attr-defined]
    proto = st.proto
    field = _state_field(proto)
    src_level, dst_level = st.state, st.dst.state
    old_src = old_dst = None
    vestigial, timeout = False, st.timeout
    expires = 0
    if ctype is StateUpdated:
        src_level, dst_level = change.new_src, change.new_dst  # type: ignore[attr-defined]
        old_src, old_dst = change.old_src, change.old_dst  # type: ignore[attr-defined]
    elif ctype is StateVestigial:
        src_level = dst_level = TIME_WAIT  # as a vestigial record lists
        old_src, old_dst = change.old_src, change.old_dst  # type: ignore[attr-defined]
        vestigial, timeout = True, tmo.TIME_WAIT
        expires = max(0, int(change.expire - now + 0.999))  # type: ignore[attr-defined]
    elif kind == INSERT:
        src_level, dst_level = change.src_state, change.dst_state  # type: ignore[attr-defined]
    if kind != REMOVE and not vestigial:
        expires = _expires_in(node.table.expires_at(st), now)
    sa, sp, da, dp = keys.unpack(st.key)
    dst = st.dst
    # Fields set in place: passing built submessages to a constructor copies them.
    event = pb.StateEvent(kind=cast("pb.StateEventKind", UPDATE if kind == PACKET else kind))
    event.time.seconds = seconds
    event.time.nanos = int((wall - seconds) * 1e9)
    msg = event.state
    msg.id = f"{st.id:016x}"
    msg.creatorid = f"{st.creatorid:08x}"
    msg.af = _FAMILY[4 if len(sa) == 4 else 6]
    msg.proto = proto
    msg.ifname = "all"
    msg.direction = _DIRECTION.get(st.direction, pb.DIRECTION_UNSPECIFIED)
    msg.src_address = address_text(sa)
    msg.dst_address = address_text(da)
    msg.src_port = sp
    msg.dst_port = dp
    src_pb, dst_pb = msg.src, msg.dst
    setattr(src_pb, field, src_level + 1)
    setattr(dst_pb, field, dst_level + 1)
    src_pb.packets, src_pb.bytes = st.packets, st.bytes
    dst_pb.packets, dst_pb.bytes = dst.packets, dst.bytes
    msg.timeout = tmo.name_of(timeout)
    msg.age_seconds = max(0, int(now - st.creation))
    msg.expires_in_seconds = expires
    if vestigial:
        msg.vestigial = True
    if kind == REMOVE:
        event.reason = change.reason.value  # type: ignore[attr-defined]
    if kind != PACKET and change.origin:  # type: ignore[attr-defined]
        event.from_peer = True
    if old_src is not None:
        setattr(event.old_src, field, old_src + 1)
        setattr(event.old_dst, field, old_dst + 1)  # type: ignore[operator]
    return event


def _record_removed(change: VestigialRemoved, when: Timestamp) -> pb.StateEvent:
    """A VTW record left: what the record kept (identity, addresses, TIME_WAIT peers)."""
    return pb.StateEvent(
        kind=cast("pb.StateEventKind", REMOVE),
        time=when,
        state=_record_pb(
            change.key,
            change.id,
            change.creatorid,
            _level(IPPROTO_TCP, change.src_state),
            _level(IPPROTO_TCP, change.dst_state),
        ),
        reason=change.reason.value,
        from_peer=bool(change.origin),
    )
