"""pf's named timeouts: their numeric ids (PFTM_*, as pfsync carries them), names and defaults.

``expires_at`` is pf_state_expires(): a state's lifetime is its timeout, scaled down
linearly between ``adaptive.start`` and ``adaptive.end`` states, and zero beyond ``end``.
"""

from __future__ import annotations

# Index = pf's PFTM_* value (the number pfsync puts on the wire).
(
    TCP_FIRST,
    TCP_OPENING,
    TCP_ESTABLISHED,
    TCP_CLOSING,
    TCP_FINWAIT,
    TCP_CLOSED,
    UDP_FIRST,
    UDP_SINGLE,
    UDP_MULTIPLE,
    ICMP_FIRST,
    ICMP_ERROR,
    OTHER_FIRST,
    OTHER_SINGLE,
    OTHER_MULTIPLE,
    FRAG,
    INTERVAL,
    ADAPTIVE_START,
    ADAPTIVE_END,
    SRC_TRACK,
    TS_DIFF,
) = range(20)
PFTM_MAX = 20
# Pseudo-timeouts above PFTM_MAX: a State.timeout value that is no configurable timeout.
# A state already unlinked from the table that may still sit in the purge queue (pf's
# PFTM_UNLINKED).
UNLINKED = 22
# Not a pf timeout: a full state in TIME_WAIT (VTW off). Its ``expire`` holds the absolute
# expiry (2 x MSL of its class, see statetable.mslt), which adaptive timeouts never scale.
TIME_WAIT = 23
# Largest value a timeout may be set to (pf keeps them in a C int).
TIMEOUT_MAX = (1 << 31) - 1
# Number of timeout ids, pseudo ones included: the size of a table indexed by State.timeout.
TIMEOUT_IDS = TIME_WAIT + 1

NAMES: tuple[str, ...] = (
    "tcp.first",
    "tcp.opening",
    "tcp.established",
    "tcp.closing",
    "tcp.finwait",
    "tcp.closed",
    "udp.first",
    "udp.single",
    "udp.multiple",
    "icmp.first",
    "icmp.error",
    "other.first",
    "other.single",
    "other.multiple",
    "frag",
    "interval",
    "adaptive.start",
    "adaptive.end",
    "src.track",
    "tcp.tsdiff",
)
DEFAULTS: tuple[int, ...] = (
    120,
    30,
    86400,
    900,
    45,
    90,
    60,
    30,
    60,
    20,
    10,
    60,
    30,
    60,
    60,
    10,
    60000,
    120000,
    0,
    30,
)
# The order ``pfctl -s timeouts`` prints them in (pfctl_parser.c pf_timeouts[]).
DISPLAY_ORDER: tuple[int, ...] = (
    TCP_FIRST,
    TCP_OPENING,
    TCP_ESTABLISHED,
    TCP_CLOSING,
    TCP_FINWAIT,
    TCP_CLOSED,
    TS_DIFF,
    UDP_FIRST,
    UDP_SINGLE,
    UDP_MULTIPLE,
    ICMP_FIRST,
    ICMP_ERROR,
    OTHER_FIRST,
    OTHER_SINGLE,
    OTHER_MULTIPLE,
    FRAG,
    INTERVAL,
    ADAPTIVE_START,
    ADAPTIVE_END,
    SRC_TRACK,
)
BY_NAME: dict[str, int] = {name: i for i, name in enumerate(NAMES)}


def name_of(timeout: int) -> str:
    """The pf name of a timeout id (``unlinked`` for a state already removed)."""
    if timeout < PFTM_MAX:
        return NAMES[timeout]
    return "tcp.timewait" if timeout == TIME_WAIT else "unlinked"


def adaptive_scale(values: list[int], states: int) -> float | None:
    """Factor applied to every timeout at this table size; None means "expire now".

    Returns 1.0 when adaptive timeouts are off or not yet reached.
    """
    start, end = values[ADAPTIVE_START], values[ADAPTIVE_END]
    if not start or not end or states <= start or start >= end:
        return 1.0
    if states >= end:
        return None
    return (end - states) / (end - start)
