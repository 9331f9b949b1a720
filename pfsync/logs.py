"""Logging that a client cannot flood: gRPC's per-call error reports, one line each and
rate-limited.

grpc.aio logs every exception a call raises on the ``grpc._cython.cygrpc`` logger with a
traceback, including a request whose protobuf does not parse (which any client can send
in a loop). `CallErrorFilter` turns such a record into one line and lets at most
`BURST` through per `WINDOW` seconds, reporting how many it dropped once the window ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

GRPC_LOGGER = "grpc._cython.cygrpc"
BURST = 5
WINDOW = 10.0


class CallErrorFilter(logging.Filter):
    """One line per record, at most ``burst`` records per ``window`` seconds."""

    def __init__(
        self,
        burst: int = BURST,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.clock = clock
        self.window_start = -window
        self.passed = 0
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Shorten ``record`` to one line; False if over the rate."""
        now = self.clock()
        if now - self.window_start >= self.window:
            if self.dropped:
                record.msg = f"{self.dropped} similar messages suppressed; then: {record.msg}"
            self.window_start, self.passed, self.dropped = now, 0, 0
        if self.passed >= self.burst:
            self.dropped += 1
            return False
        self.passed += 1
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            detail = " ".join(str(exc).split())[:200]
            record.msg = f"{record.getMessage()}: {detail}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def limit_grpc_call_errors() -> CallErrorFilter:
    """Install the filter on gRPC's logger (once) and return it."""
    logger = logging.getLogger(GRPC_LOGGER)
    for existing in logger.filters:
        if isinstance(existing, CallErrorFilter):
            return existing
    limiter = CallErrorFilter()
    logger.addFilter(limiter)
    return limiter
