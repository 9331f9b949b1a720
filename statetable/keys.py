"""State keys: the bytes a packet's addresses and ports make.

Layout: ``src addr | dst addr | src port | dst port`` (4+4+2+2 = 12 bytes for IPv4,
16+16+2+2 = 36 for IPv6), exactly as IPv4/IPv6 and TCP/UDP headers lay these fields
out, so the decoder builds a key with two slices and one concatenation. The protocol is
not in the key: the table keeps one dict per protocol. A state is stored under the key
of its first packet; a packet from the other side finds it under ``reverse(key)``.
ICMP queries use the echo id as both ports.
"""

from __future__ import annotations

import ipaddress
import struct

_PORTS = struct.Struct("!HH")


def make(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """The key of a packet from ``src:sport`` to ``dst:dport``."""
    return src + dst + _PORTS.pack(sport, dport)


def reverse(key: bytes) -> bytes:
    """The key of a packet going the other way."""
    n = (len(key) - 4) >> 1
    return key[n : n + n] + key[:n] + key[-2:] + key[-4:-2]


def family(key: bytes) -> int:
    """4 for an IPv4 key, 6 for IPv6."""
    return 4 if len(key) == 12 else 6


def unpack(key: bytes) -> tuple[bytes, int, bytes, int]:
    """(src, sport, dst, dport) of a key."""
    n = (len(key) - 4) >> 1
    sport, dport = _PORTS.unpack_from(key, n + n)
    return key[:n], sport, key[n : n + n], dport


def format_address(addr: bytes) -> str:
    """Printable form of a 4- or 16-byte address."""
    return str(ipaddress.ip_address(addr))


def format_endpoint(addr: bytes, port: int) -> str:
    """pfctl's form: ``1.2.3.4:80`` or ``2001:db8::1[80]``."""
    if len(addr) == 4:
        return f"{format_address(addr)}:{port}"
    return f"{format_address(addr)}[{port}]"
