"""Synthetic but protocol-correct traffic for the benchmarks.

Every flow does a real handshake, then data and ACKs that advance sequence numbers as a
TCP stack would, so the tracker takes its normal in-window path for every packet.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.packets import ACK, FIN, PSH, SYN, tcp, tcp_options  # noqa: E402


def _addrs(i: int) -> tuple[str, str, int]:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", "192.0.2.1", 1024 + (i % 60000)


def handshake(i: int) -> list[bytes]:
    """SYN, SYN|ACK, ACK of flow ``i``."""
    c, s, port = _addrs(i)
    return [
        tcp(c, s, port, 80, SYN, 1000, 0, 64240, options=tcp_options(1460, 7)),
        tcp(s, c, 80, port, SYN | ACK, 5000, 1001, 65160, options=tcp_options(1460, 7)),
        tcp(c, s, port, 80, ACK, 1001, 5001, 502),
    ]


def established(flows: int, rounds: int, size: int = 100) -> Iterator[bytes]:
    """``rounds`` data segments per flow, each ACKed by the server, flows interleaved."""
    for r in range(rounds):
        for i in range(flows):
            c, s, port = _addrs(i)
            cseq = 1001 + r * size
            yield tcp(c, s, port, 80, ACK | PSH, cseq, 5001, 502, payload=b"x" * size)
            yield tcp(s, c, 80, port, ACK, 5001, cseq + size, 509)


def exchange(i: int, r: int, size: int = 100) -> list[bytes]:
    """Round ``r`` of flow ``i``: a request of ``size`` bytes and a response of as many."""
    c, s, port = _addrs(i)
    cseq, sseq = 1001 + r * size, 5001 + r * size
    return [
        tcp(c, s, port, 80, ACK | PSH, cseq, sseq, 502, payload=b"x" * size),
        tcp(s, c, 80, port, ACK | PSH, sseq, cseq + size, 509, payload=b"y" * size),
    ]


def close(i: int, rounds: int, size: int = 100) -> list[bytes]:
    """After ``rounds`` exchanges: the client closes first (FIN/ACK both ways, last ACK)."""
    c, s, port = _addrs(i)
    cseq, sseq = 1001 + rounds * size, 5001 + rounds * size
    return [
        tcp(c, s, port, 80, FIN | ACK, cseq, sseq, 502),
        tcp(s, c, 80, port, FIN | ACK, sseq, cseq + 1, 509),
        tcp(c, s, port, 80, ACK, cseq + 1, sseq + 1, 502),
    ]


def lifecycle(i: int, size: int = 100) -> list[bytes]:
    """A whole connection: handshake, one request/response, client closes first."""
    return handshake(i) + exchange(i, 0, size) + close(i, 1, size)
