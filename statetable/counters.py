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


class ProtoStats:
    """Per-protocol counters behind ``net.inet.{tcp,udp,icmp}.stats`` (netstat -s).

    Each is bumped where the table already branches for a rare event (a state created,
    a handshake step, a close, a drop), never on the common per-packet path, so they cost
    nothing measurable (bench/bench_track.py). Segment and packet totals are not kept per
    protocol for that reason; the table's ``passed``/``blocked`` hold them for all.
    """

    __slots__ = (
        "tcp_connattempt",
        "tcp_accepts",
        "tcp_connects",
        "tcp_closed",
        "tcp_resets",
        "tcp_badstate",
        "tcp_nostate",
        "tcp_timewait_passed",
        "udp_states",
        "icmp_states",
        "icmp_errors_passed",
        "icmp_errors_blocked",
        "other_states",
    )

    def __init__(self) -> None:
        self.tcp_connattempt = 0
        self.tcp_accepts = 0
        self.tcp_connects = 0
        self.tcp_closed = 0
        self.tcp_resets = 0
        self.tcp_badstate = 0
        self.tcp_nostate = 0
        self.tcp_timewait_passed = 0
        self.udp_states = 0
        self.icmp_states = 0
        self.icmp_errors_passed = 0
        self.icmp_errors_blocked = 0
        self.other_states = 0

    def items(self, prefix: str) -> list[tuple[str, int]]:
        """``(name, value)`` of the counters named ``prefix_*``, without the prefix."""
        head = prefix + "_"
        return [
            (name.removeprefix(head), int(getattr(self, name)))
            for name in self.__slots__
            if name.startswith(head)
        ]
