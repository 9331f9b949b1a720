"""pf's reason counters (PFRES_*) and the state-table counters shown by ``pfctl -s info``."""

from __future__ import annotations

# Index = pf's PFRES_* value; the order is the one pfctl prints.
PFRES_NAMES: tuple[str, ...] = (
    "match",
    "bad-offset",
    "fragment",
    "short",
    "normalize",
    "memory",
    "bad-timestamp",
    "congestion",
    "ip-option",
    "proto-cksum",
    "state-mismatch",
    "state-insert",
    "state-limit",
    "src-limit",
    "synproxy",
    "translate",
    "no-route",
)
(
    PFRES_MATCH,
    PFRES_BADOFF,
    PFRES_FRAG,
    PFRES_SHORT,
    PFRES_NORM,
    PFRES_MEMORY,
    PFRES_TS,
    PFRES_CONGEST,
    PFRES_IPOPTIONS,
    PFRES_PROTCKSUM,
    PFRES_BADSTATE,
    PFRES_STATEINS,
    PFRES_MAXSTATES,
    PFRES_SRCLIMIT,
    PFRES_SYNPROXY,
    PFRES_TRANSLATE,
    PFRES_NOROUTE,
) = range(17)

# pf's FCNT_STATE_* counters: how often the table was searched, inserted into, removed from.
FCNT_STATE_SEARCH, FCNT_STATE_INSERT, FCNT_STATE_REMOVALS = range(3)
