"""Changes the table reports: the seam between the table and its consumers.

A table records changes only while someone reads them (``StateTable.record_changes``);
then every change is appended to one list that the owner takes with
``StateTable.take_changes()`` and hands to each consumer (the pfsync engine, watch
streams), as aioquic's connection hands out its events. A table nobody reads pays
one ``is None`` test per change.

The per-packet case is the cheap one: a packet that moved a state's windows, counters or
expiry but not its peer states appends the :class:`~statetable.state.State` itself (no
object is built). Everything else is a small frozen event below. Consumers key changes
by ``(state.id, state.creatorid)``.

``origin`` says who caused a change: ``LOCAL`` (this node's packets, timers and
operators) or ``PEER`` (applied from a sync peer's frame; the sync engine never sends
those back, so nothing echoes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from statetable.state import State


class RemoveReason(enum.Enum):
    """Why a state left the table."""

    EXPIRED = "expired"  # purge found it past its timeout
    KILLED = "killed"  # pfctl -k / Kill RPC
    FLUSHED = "flushed"  # pfctl -F states / CLR: every state of its creator went
    REUSED = "reused"  # a new SYN reused the 4-tuple of a closed state
    PEER = "peer"  # a sync peer deleted it (pfsync DEL_C)
    CLOSED = "closed"  # an exact RST ended its TIME_WAIT
    EVICTED = "evicted"  # its VTW pool was full and it was the oldest ("assassinated")


class Origin(enum.IntEnum):
    """Who caused a change."""

    LOCAL = 0
    PEER = 1


@dataclass(frozen=True, slots=True)
class StateInserted:
    """A new state entered the table, its peers then at ``src_state``/``dst_state``.

    Events carry the peer states they saw because the State object keeps changing after
    the event was recorded, and a consumer may read the list later (the digest needs
    what was true at each step)."""

    state: State
    src_state: int
    dst_state: int
    origin: Origin = Origin.LOCAL


@dataclass(frozen=True, slots=True)
class StateUpdated:
    """A state's peer states changed (a transition), or a peer's update was applied.

    ``old_src``/``old_dst`` are the peer states before the change and ``new_src``/
    ``new_dst`` after it (all equal when only windows, timeout or expiry moved).
    """

    state: State
    old_src: int
    old_dst: int
    new_src: int
    new_dst: int
    origin: Origin = Origin.LOCAL


@dataclass(frozen=True, slots=True)
class StateRemoved:
    """A state left the table."""

    state: State
    reason: RemoveReason
    origin: Origin = Origin.LOCAL


@dataclass(frozen=True, slots=True)
class StateVestigial:
    """A state entered TIME_WAIT and left the main table for a VTW record.

    ``state`` is the detached State (its peers as they were); ``expire`` the record's
    absolute expiry, ``cls`` its MSLT class, ``old_src``/``old_dst`` the peer states
    before the packet (or peer update) that ended the connection.
    """

    state: State
    expire: float
    cls: int
    old_src: int
    old_dst: int
    origin: Origin = Origin.LOCAL


@dataclass(frozen=True, slots=True)
class VestigialRemoved:
    """A VTW record left its pool (its connection is gone for good)."""

    key: bytes
    id: int
    creatorid: int
    src_state: int
    dst_state: int
    reason: RemoveReason
    origin: Origin = Origin.LOCAL


@dataclass(frozen=True, slots=True)
class StateMoved:
    """A TIME_WAIT connection changed form (``net.inet.tcp.vtw.enable`` switched): it is
    now a VTW record (``to_vestigial``) or the full State ``state``. Nothing else changed,
    so the sync engine sends nothing for it."""

    state: State
    to_vestigial: bool


Event = StateInserted | StateUpdated | StateRemoved | StateVestigial | VestigialRemoved | StateMoved
