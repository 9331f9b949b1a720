"""The Control gRPC service: the node's side of pfctl (grpc.aio adapter, no logic of its own
beyond translating between the table and the wire contract)."""

from __future__ import annotations

import ipaddress
import math

import grpc

from pfsync.admin import require_admin
from pfsync.listing import YIELD_CHECK, Lease, ListingGate
from pfsync.node import MALFORMED, Node
from pfsync.v1 import control_pb2 as pb
from pfsync.v1 import control_pb2_grpc
from statetable import keys
from statetable import timeouts as tmo
from statetable.counters import PFRES_NAMES
from statetable.state import FLAG_NOSYNC, TIME_WAIT, Peer, State
from statetable.table import BLOCK
from statetable.vtw import PeerView, Vestigial

CHUNK = 1000  # states per ListStates message: ~200 KB, far below 4 MiB
MAX_INJECT_FRAMES = 65536
NO_RULE = 0xFFFFFFFF
LIMITS = ("states", "src-nodes", "frags", "tables", "table-entries")


def peer_to_pb(peer: Peer) -> pb.PeerState:
    """One peer on the wire (seqdiff and mss are not tracked: always 0)."""
    return pb.PeerState(
        state=peer.state,
        seqlo=peer.seqlo,
        seqhi=peer.seqhi,
        max_win=peer.max_win,
        wscale=peer.wscale,
        packets=peer.packets,
        bytes=peer.bytes,
    )


def state_to_pb(node: Node, st: State, now: float) -> pb.State:
    """A table state on the wire, with age and remaining lifetime relative to ``now``."""
    sa, sp, da, dp = st.endpoints()
    return pb.State(
        id=st.id,
        creatorid=st.creatorid,
        af=st.af,
        proto=st.proto,
        ifname="all",
        direction=st.direction,
        src_addr=sa,
        dst_addr=da,
        src_port=sp,
        dst_port=dp,
        src=peer_to_pb(st),
        dst=peer_to_pb(st.dst),
        timeout=tmo.name_of(st.timeout),
        age_seconds=max(0, int(now - st.creation)),
        expires_in=_expires_in(node.table.expires_at(st), now),
        rule=NO_RULE,
        nosync=bool(st.flags & FLAG_NOSYNC),
    )


def _expires_in(expires: float, now: float) -> int:
    # A state unlinked while a listing runs expires at -inf: it is due now, not an error.
    return max(0, int(expires - now + 0.999)) if math.isfinite(expires) else 0


def vestigial_to_pb(rec: Vestigial, now: float) -> pb.State:
    """A VTW record on the wire: no counters, no creation time (the record keeps neither)."""
    sa, sp, da, dp = keys.unpack(rec.key)
    return pb.State(
        id=rec.id,
        creatorid=rec.creatorid,
        af=rec.af,
        proto=6,
        ifname="all",
        direction=pb.State.IN,
        src_addr=sa,
        dst_addr=da,
        src_port=sp,
        dst_port=dp,
        src=_record_peer(rec.src),
        dst=_record_peer(rec.dst),
        timeout=tmo.name_of(tmo.TIME_WAIT),
        expires_in=max(0, int(rec.expire - now + 0.999)),
        rule=NO_RULE,
        vestigial=True,
    )


def _record_peer(peer: PeerView) -> pb.PeerState:
    # The connection is in TIME_WAIT whatever pf state each side last reached.
    return pb.PeerState(
        state=TIME_WAIT,
        seqlo=peer.seqlo,
        seqhi=peer.seqhi,
        max_win=peer.max_win,
        wscale=peer.wscale,
    )


def _address_match(addr: bytes, match: pb.HostMatch) -> bool:
    if not match.addr:
        return True
    if len(match.addr) != len(addr):
        return False
    net = ipaddress.ip_network((match.addr, match.prefix_len), strict=False)
    return ipaddress.ip_address(addr) in net


class ControlService(control_pb2_grpc.ControlServicer):
    """Serves a node's table. Admin calls need the token, or a loopback client if none."""

    def __init__(self, node: Node, admin_token: str | None = None) -> None:
        self.node = node
        self.admin_token = admin_token
        self.listings = ListingGate()

    async def _require_admin(self, context: grpc.aio.ServicerContext) -> None:
        await require_admin(context, self.admin_token)

    async def ListStates(
        self, request: pb.ListStatesRequest, context: grpc.aio.ServicerContext
    ) -> None:
        if request.address and len(request.address) not in (4, 16):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "address must be 4 or 16 bytes")
        async with self.listings.slot(context) as lease:
            await self._list_states(request, lease)

    async def _list_states(self, request: pb.ListStatesRequest, lease: Lease) -> None:
        node = self.node
        creatorid = request.creatorid or node.hostid
        if request.id:
            found = node.table.get_by_id(request.id, creatorid)
            states = [found] if found is not None else []
        else:
            states = list(node.table.states())
        records: list[Vestigial] = []
        if not request.proto or request.proto == 6:
            records = [
                rec
                for rec in node.table.vestigial()
                if not request.id or (rec.id, rec.creatorid) == (request.id, creatorid)
            ]
        now = node.clock()
        expires_at = node.table.expires_at
        chunk: list[pb.State] = []
        for n, item in enumerate([*states, *records], 1):
            if n % YIELD_CHECK == 0:
                await lease.pace()  # let other calls in: a listing is long
            is_state = isinstance(item, State)
            if is_state and request.proto and item.proto != request.proto:
                continue
            if is_state and expires_at(item) == -math.inf:  # left the table meanwhile
                continue
            if request.address:
                sa, _, da, _ = keys.unpack(item.key)
                if request.address not in (sa, da):
                    continue
            chunk.append(
                state_to_pb(node, item, now)
                if is_state  # type: ignore[arg-type]
                else vestigial_to_pb(item, now)
            )  # type: ignore[arg-type]
            if len(chunk) == CHUNK:
                await lease.send(pb.StatesChunk(states=chunk))
                chunk = []
        if chunk:
            await lease.send(pb.StatesChunk(states=chunk))

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.Info:
        node, table = self.node, self.node.table
        searches, inserts, removals = table.fcounters
        return pb.Info(
            running=True,
            enabled_seconds=int(node.clock() - node.started),
            hostid=node.hostid,
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
                    kind=s.kind, name=s.name, frames=s.frames, done=s.done, error=s.error
                )
                for s in node.sources
            ],
            packets_passed=table.passed,
            packets_blocked=table.blocked,
        )

    async def GetTimeouts(
        self, request: pb.GetTimeoutsRequest, context: grpc.aio.ServicerContext
    ) -> pb.Timeouts:
        values = self.node.table.timeouts
        return pb.Timeouts(
            timeouts=[
                pb.Timeout(
                    name=tmo.NAMES[i],
                    seconds=values[i],
                    unit="states" if tmo.NAMES[i].startswith("adaptive.") else "s",
                )
                for i in tmo.DISPLAY_ORDER
            ]
        )

    async def GetMemory(
        self, request: pb.GetMemoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.Memory:
        # Only states are limited here; the other pools of pf do not exist in this node.
        hard = {"states": self.node.table.limit_states}
        return pb.Memory(limits=[pb.Limit(name=n, hard_limit=hard.get(n, NO_RULE)) for n in LIMITS])

    async def Inject(
        self, request: pb.InjectRequest, context: grpc.aio.ServicerContext
    ) -> pb.InjectReply:
        await self._require_admin(context)
        if len(request.frames) > MAX_INJECT_FRAMES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_INJECT_FRAMES} frames per call"
            )
        node = self.node
        feed, now = node.feed, node.clock()
        verdicts = [feed(f.data, f.linktype, now) for f in request.frames]
        blocked, errors = verdicts.count(BLOCK), verdicts.count(MALFORMED)
        return pb.InjectReply(
            passed=len(verdicts) - blocked - errors,
            blocked=blocked,
            errors=errors,
            verdicts=verdicts,
        )

    async def KillStates(
        self, request: pb.KillRequest, context: grpc.aio.ServicerContext
    ) -> pb.KillReply:
        await self._require_admin(context)
        table = self.node.table
        if request.by_id:
            creatorid = request.creatorid or self.node.hostid
            st = table.get_by_id(request.id, creatorid)
            victims = [st] if st is not None else []
            records = table.kill_vestigial(
                lambda rec: (rec.id, rec.creatorid) == (request.id, creatorid)
            )
        else:
            for match in (request.src, request.dst):
                if match.addr and len(match.addr) not in (4, 16):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "addresses must be 4 or 16 bytes"
                    )
                if match.prefix_len > 8 * max(len(match.addr), 4):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prefix too long")

            def matches(key: bytes) -> bool:
                sa, _, da, _ = keys.unpack(key)
                return _address_match(sa, request.src) and _address_match(da, request.dst)

            victims = [st for st in table.states() if matches(st.key)]
            records = table.kill_vestigial(lambda rec: matches(rec.key))
        for st in victims:
            table.kill(st)
        return pb.KillReply(killed=len(victims) + records)

    async def ClearStates(
        self, request: pb.ClearRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClearReply:
        await self._require_admin(context)
        return pb.ClearReply(cleared=self.node.table.clear())

    async def ClearCounters(
        self, request: pb.ClearCountersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClearCountersReply:
        await self._require_admin(context)
        self.node.clear_counters()
        return pb.ClearCountersReply()
