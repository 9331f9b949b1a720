"""pf-style state table: a sans-I/O core.

Nothing here reads a clock, opens a socket or imports asyncio/grpc: every call takes
``now`` (seconds, float) and returns verdicts; state changes are reported to an optional
listener as small frozen event objects (see :mod:`statetable.events`).
"""

from statetable.decode import decode_frame
from statetable.events import RemoveReason, StateInserted, StateRemoved, StateUpdated
from statetable.state import Peer, State
from statetable.table import BLOCK, PASS, StateTable, TableConfig

__all__ = [
    "BLOCK",
    "PASS",
    "Peer",
    "RemoveReason",
    "State",
    "StateInserted",
    "StateRemoved",
    "StateTable",
    "StateUpdated",
    "TableConfig",
    "decode_frame",
]
