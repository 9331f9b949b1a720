"""Table objects on the control.proto wire: states, TIME_WAIT records and change events.

Listings and WatchStates convert every state they send, so this is the API's hot path
(a million states for ``pfctl -s states``, 50,000 events a second for a watcher). What
makes it cheap, measured in bench/bench_listing.py and bench/bench_watch.py:

- messages are filled in place (``chunk.states.add()``, ``event.state``): a message
  passed to a constructor or appended is copied, nested peers and all;
- upb charges ~0.2 us per field set, so a zero is not set (proto3 leaves it unset on the
  wire anyway: the message is the same) and the peers' windows are skipped for the
  protocols that have none;
- the text forms come from lookups (timeout names, creatorids) and one ``inet_ntop`` per
  address, not from generic helpers.
"""

from __future__ import annotations

import math
import socket
import struct
from collections.abc import Callable
from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from pfsync.v1 import control_pb2 as pb
from pfsync.watch import UPDATE
from statetable import timeouts as tmo
from statetable.events import (
    StateInserted,
    StateRemoved,
    StateUpdated,
    StateVestigial,
    VestigialRemoved,
)
from statetable.state import (
    BYTES_MASK,
    FLAG_NOSYNC,
    FLAG_OUT,
    TIME_WAIT,
    WSCALE_FLAG,
    WSCALE_MASK,
    Peer,
    State,
)
from statetable.vtw import PeerView, Vestigial

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_ICMPV6 = 1, 6, 58

_IPV4, _IPV6 = pb.ADDRESS_FAMILY_IPV4, pb.ADDRESS_FAMILY_IPV6
_IN, _OUT = pb.DIRECTION_IN, pb.DIRECTION_OUT
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
_ntop = socket.inet_ntop
_ports = struct.Struct("!HH").unpack_from
# A timeout id's name, indexed by State.timeout (pseudo ids included).
_TIMEOUT_NAMES = tuple(tmo.name_of(i) for i in range(tmo.TIMEOUT_IDS))
_TIME_WAIT_NAME = tmo.name_of(tmo.TIME_WAIT)
# The PeerState oneof member that holds a peer's level, by IP protocol ("udp_state" else).
_LEVEL_FIELD = {IPPROTO_TCP: "tcp_state", IPPROTO_ICMP: "icmp_state", IPPROTO_ICMPV6: "icmp_state"}
# Creatorid texts: a table holds states of a handful of creators (itself and its peers).
_CREATOR_TEXT: dict[int, str] = {}


def _creator_text(creatorid: int) -> str:
    if len(_CREATOR_TEXT) >= 4096:  # bounded whatever peers claim to be
        _CREATOR_TEXT.clear()
    text = _CREATOR_TEXT[creatorid] = f"{creatorid:08x}"
    return text


def _fill_identity(msg: pb.State, key: bytes, id: int, creatorid: int) -> None:
    """Identity, family, addresses and ports (everything a key and an id make)."""
    msg.id = f"{id:016x}"
    msg.creatorid = _CREATOR_TEXT.get(creatorid) or _creator_text(creatorid)
    msg.ifname = "all"
    if len(key) == 12:
        msg.af = _IPV4
        msg.src_address = _ntop(_AF_INET, key[:4])
        msg.dst_address = _ntop(_AF_INET, key[4:8])
        sport, dport = _ports(key, 8)
    else:
        msg.af = _IPV6
        msg.src_address = _ntop(_AF_INET6, key[:16])
        msg.dst_address = _ntop(_AF_INET6, key[16:32])
        sport, dport = _ports(key, 32)
    if sport:
        msg.src_port = sport
    if dport:
        msg.dst_port = dport


def _fill_windows(msg: pb.PeerState, peer: Peer | PeerView) -> None:
    """A TCP peer's sequence window and scale (seqdiff and mss are not tracked)."""
    if peer.seqlo:
        msg.seqlo = peer.seqlo
    if peer.seqhi:
        msg.seqhi = peer.seqhi
    if peer.max_win:
        msg.max_win = peer.max_win
    wscale = peer.wscale
    if wscale & WSCALE_FLAG:
        msg.wscale_offered = True
    if wscale & WSCALE_MASK:
        msg.wscale = wscale & WSCALE_MASK


def fill_state(
    msg: pb.State, st: State, now: float, expires: float, src_level: int, dst_level: int
) -> None:
    """A table state into ``msg`` (fresh), with age and the time left until ``expires``.

    The levels are pf's numbers (the wire enums count from 1, 0 meaning unset); they are
    given because an event reports the levels the change made, which a state that kept
    changing since may no longer have.
    """
    _fill_identity(msg, st.key, st.id, st.creatorid)
    proto = st.proto
    msg.proto = proto
    flags = st.flags
    msg.direction = _OUT if flags & FLAG_OUT else _IN
    if flags & FLAG_NOSYNC:
        msg.nosync = True
    src, dst, peer = msg.src, msg.dst, st.dst
    field = _LEVEL_FIELD.get(proto, "udp_state")
    setattr(src, field, src_level + 1)
    setattr(dst, field, dst_level + 1)
    if proto == IPPROTO_TCP:
        _fill_windows(src, st)
        _fill_windows(dst, peer)
    traffic = st.traffic
    if traffic:
        src.packets = traffic >> 48
        src.bytes = traffic & BYTES_MASK
    traffic = peer.traffic
    if traffic:
        dst.packets = traffic >> 48
        dst.bytes = traffic & BYTES_MASK
    timeout = st.timeout
    msg.timeout = _TIMEOUT_NAMES[timeout] if timeout < tmo.TIMEOUT_IDS else "unlinked"
    age = int(now - st.creation)
    if age > 0:
        msg.age_seconds = age
    if expires > now:  # not an unlinked state's -inf, nor due
        msg.expires_in_seconds = int(expires - now + 0.999)


def _fill_record(
    msg: pb.State, key: bytes, id: int, creatorid: int, src_level: int, dst_level: int
) -> None:
    """A TIME_WAIT record's fields into ``msg`` (fresh): TCP, inbound, the given levels.
    No counters and no age: a record keeps neither."""
    _fill_identity(msg, key, id, creatorid)
    msg.proto = IPPROTO_TCP
    msg.direction = _IN
    msg.timeout = _TIME_WAIT_NAME
    msg.vestigial = True
    msg.src.tcp_state = cast("pb.TcpPeerState", src_level + 1)
    msg.dst.tcp_state = cast("pb.TcpPeerState", dst_level + 1)


def fill_vestigial(msg: pb.State, rec: Vestigial, now: float) -> None:
    """A VTW record as a listing shows it: both peers in TIME_WAIT, with their windows."""
    _fill_record(msg, rec.key, rec.id, rec.creatorid, TIME_WAIT, TIME_WAIT)
    _fill_windows(msg.src, rec.src)
    _fill_windows(msg.dst, rec.dst)
    left = max(0, int(rec.expire - now + 0.999))
    if left:
        msg.expires_in_seconds = left


class EventHeads:
    """The serialized ``kind``, ``time`` and ``from_peer`` of events, one per distinct set.

    The changes a watcher takes at once share a few hand-out times, and merging these few
    bytes into an event costs less than setting a nested Timestamp in each (measured with
    callgrind: ~5,000 instructions less per event). One per response: it only grows.
    """

    def __init__(self, offset: float) -> None:
        self.offset = offset  # node clock -> wall clock
        self._heads: dict[tuple[int, bool, float], bytes] = {}

    def get(self, kind: int, from_peer: bool, now: float) -> bytes:
        """The head of an event of this wire kind and origin handed out at node time ``now``."""
        key = (kind, from_peer, now)
        head = self._heads.get(key)
        if head is None:
            wall = now + self.offset
            seconds = int(wall)
            head = self._heads[key] = pb.StateEvent(
                kind=cast("pb.StateEventKind", kind),
                time=Timestamp(seconds=seconds, nanos=int((wall - seconds) * 1e9)),
                from_peer=from_peer,
            ).SerializeToString()
        return head


def fill_event(
    event: pb.StateEvent,
    kind: int,
    change: object,
    now: float,
    heads: EventHeads,
    expires_at: Callable[[State], float],
) -> None:
    """One change, queued by a watcher at node time ``now``, into ``event`` (fresh).

    ``kind`` is the watcher's (a bare State, a packet-only update, is an UPDATE on the
    wire); ``expires_at`` the table's, for a live state's expiry as of sending.
    """
    ctype = type(change)
    if ctype is State:
        event.MergeFromString(heads.get(UPDATE, False, now))
        st = cast(State, change)
        fill_state(event.state, st, now, expires_at(st), st.state, st.dst.state)
        return
    event.MergeFromString(heads.get(kind, bool(cast(StateRemoved, change).origin), now))
    if ctype is VestigialRemoved:
        gone = cast(VestigialRemoved, change)
        # What the record kept: identity, addresses, ports, its peers' last levels.
        _fill_record(event.state, gone.key, gone.id, gone.creatorid, gone.src_state, gone.dst_state)
        event.reason = gone.reason.value
        return
    st = cast(StateRemoved, change).state
    msg = event.state
    if ctype is StateInserted:
        inserted = cast(StateInserted, change)
        fill_state(msg, st, now, expires_at(st), inserted.src_state, inserted.dst_state)
    elif ctype is StateUpdated:
        updated = cast(StateUpdated, change)
        fill_state(msg, st, now, expires_at(st), updated.new_src, updated.new_dst)
        _fill_old(event, st.proto, updated.old_src, updated.old_dst)
    elif ctype is StateVestigial:
        moved = cast(StateVestigial, change)
        # As a vestigial record lists: both peers in TIME_WAIT, expiring with the record.
        fill_state(msg, st, now, moved.expire, TIME_WAIT, TIME_WAIT)
        msg.timeout = _TIME_WAIT_NAME
        msg.vestigial = True
        _fill_old(event, st.proto, moved.old_src, moved.old_dst)
    else:
        removed = cast(StateRemoved, change)
        fill_state(msg, st, now, -math.inf, st.state, st.dst.state)
        event.reason = removed.reason.value


def _fill_old(event: pb.StateEvent, proto: int, old_src: int, old_dst: int) -> None:
    field = _LEVEL_FIELD.get(proto, "udp_state")
    setattr(event.old_src, field, old_src + 1)
    setattr(event.old_dst, field, old_dst + 1)
