"""Frame builder for tests and benchmarks: Ethernet/IPv4/IPv6 with TCP, UDP or ICMP.

Only for making inputs; the product never builds packets. Checksums are left zero
(the table does not check them, as pf does not on the fast path).
"""

from __future__ import annotations

import ipaddress
import struct

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def _ip(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def tcp_options(mss: int | None = None, wscale: int | None = None) -> bytes:
    """TCP options as a SYN carries them, padded to 4 bytes."""
    out = b""
    if mss is not None:
        out += struct.pack("!BBH", 2, 4, mss)
    if wscale is not None:
        out += struct.pack("!BBBB", 1, 3, 3, wscale)
    while len(out) % 4:
        out += b"\0"
    return out


def tcp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: int,
    seq: int = 0,
    ack: int = 0,
    win: int = 65535,
    payload: bytes = b"",
    options: bytes = b"",
) -> bytes:
    """An Ethernet frame with a TCP segment."""
    hdr = struct.pack(
        "!HHIIBBHHH",
        sport,
        dport,
        seq & 0xFFFFFFFF,
        ack & 0xFFFFFFFF,
        (5 + len(options) // 4) << 4,
        flags,
        win,
        0,
        0,
    )
    return ip(src, dst, 6, hdr + options + payload)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"") -> bytes:
    """An Ethernet frame with a UDP datagram."""
    return ip(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def icmp_echo(src: str, dst: str, ident: int, seq: int = 1, reply: bool = False) -> bytes:
    """An Ethernet frame with an ICMP (or ICMPv6) echo request or reply."""
    v6 = ":" in src
    kind = (129 if reply else 128) if v6 else (0 if reply else 8)
    return ip(src, dst, 58 if v6 else 1, struct.pack("!BBHHH", kind, 0, 0, ident, seq))


def icmp_error(src: str, dst: str, kind: int, code: int, quoted: bytes) -> bytes:
    """An Ethernet frame with an ICMP error quoting ``quoted`` (an IP packet)."""
    v6 = ":" in src
    return ip(src, dst, 58 if v6 else 1, struct.pack("!BBHI", kind, code, 0, 0) + quoted[:48])


def ip(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    """An Ethernet frame around an IPv4 or IPv6 packet."""
    return eth(ip_packet(src, dst, proto, l4), v6=":" in src)


def ip_packet(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    """A bare IPv4 or IPv6 packet."""
    if ":" in src:
        return struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + _ip(src) + _ip(dst) + l4
    return (
        struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0)
        + _ip(src)
        + _ip(dst)
        + l4
    )


def eth(packet: bytes, v6: bool = False) -> bytes:
    """An Ethernet header (zero MACs, as on Linux loopback) around ``packet``."""
    return b"\0" * 12 + (b"\x86\xdd" if v6 else b"\x08\x00") + packet
