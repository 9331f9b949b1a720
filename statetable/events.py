"""Change events the table reports to its listener (the pfsync engine).

They are built only when a listener is set, so a table nobody watches pays nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from statetable.state import State


class RemoveReason(enum.Enum):
    """Why a state left the table."""

    EXPIRED = "expired"  # purge found it past its timeout
    KILLED = "killed"  # pfctl -k / Kill RPC
    FLUSHED = "flushed"  # pfctl -F states / CLR
    REUSED = "reused"  # a new SYN reused the 4-tuple of a closed state
    PEER = "peer"  # a sync peer deleted it (pfsync DEL_C); not re-announced
    CLOSED = "closed"  # an exact RST ended its TIME_WAIT
    EVICTED = "evicted"  # its VTW pool was full and it was the oldest ("assassinated")


@dataclass(frozen=True, slots=True)
class StateInserted:
    """A new state entered the table."""

    state: State


@dataclass(frozen=True, slots=True)
class StateUpdated:
    """A packet changed a state (its peers, windows or timeout)."""

    state: State


@dataclass(frozen=True, slots=True)
class StateRemoved:
    """A state left the table."""

    state: State
    reason: RemoveReason


@dataclass(frozen=True, slots=True)
class StateVestigial:
    """A state entered TIME_WAIT and left the main table for a VTW record."""

    state: State


@dataclass(frozen=True, slots=True)
class VestigialRemoved:
    """A VTW record left its pool (its state is gone for good)."""

    key: bytes
    id: int
    creatorid: int
    reason: RemoveReason


Event = StateInserted | StateUpdated | StateRemoved | StateVestigial | VestigialRemoved
Listener = Callable[[Event], None]
