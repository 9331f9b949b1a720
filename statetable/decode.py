"""Frame decoder: link layer -> IPv4/IPv6 -> TCP/UDP/ICMP/ICMPv6, into one flat tuple.

``decode_frame(frame, linktype)`` returns either a :data:`Packet`

    (proto, key, flags, seq, ack, win, dlen, iplen, opt)

(positions named by the ``P_*`` constants below) or an int: a PFRES reason (``short``,
``bad-offset``, ``fragment``) or ``NOT_IP``. It never raises on any input.

- ``key``: see :mod:`statetable.keys` (addresses and ports as the packet carries them).
- TCP: ``flags``/``seq``/``ack``/``win`` from the header, ``dlen`` = payload length,
  ``opt`` = the SYN's window scale in pf's encoding (``0x80 | shift``) or 0.
- ICMP/ICMPv6: the TCP positions are reused: ``flags`` = type, ``seq`` = code; ``opt`` =
  for an error message, the ``(proto, key)`` of the packet it quotes, else None.
- UDP and other protocols: ``flags``/``seq``/``ack``/``win`` are 0, ``opt`` 0 or None.
- ``iplen``: the IP total length (what pf counts in its byte counters).

The packet is a plain tuple, not a NamedTuple or dataclass, on purpose: this runs once
per packet and a tuple is the cheapest record Python has (BENCHMARKS.md, "Design choices
measured on the hot path": a frozen dataclass per packet costs more than the whole dict
lookup); the P_* names give the positions instead.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from statetable.counters import PFRES_BADOFF, PFRES_FRAG, PFRES_SHORT
from statetable.state import WSCALE_FLAG

# A decoded packet (see the module doc). The last field's type depends on the protocol
# (int for TCP, the quoted (proto, key) or None for ICMP), hence Any.
Packet = tuple[int, bytes, int, int, int, int, int, int, Any]
# Positions in a Packet (Final, so a type checker knows each field's type at pkt[P_*]).
P_PROTO: Final = 0
P_KEY: Final = 1
P_FLAGS: Final = 2  # ICMP: the type
P_SEQ: Final = 3  # ICMP: the code
P_ACK: Final = 4
P_WIN: Final = 5
P_DLEN: Final = 6
P_IPLEN: Final = 7
P_OPT: Final = 8

NOT_IP = -1

# IP protocol numbers.
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58

# pcap link types (the ones the decoder reads).
LINKTYPE_NULL = 0  # BSD loopback: 4-byte host-order address family, then the IP packet
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # bare IPv4 or IPv6 packet
LINKTYPE_LOOP = 108  # OpenBSD loopback: like NULL but the family is in network order
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

# TCP header flags.
TH_FIN, TH_SYN, TH_RST, TH_PUSH, TH_ACK, TH_URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
TCP_MAX_WINSHIFT = 14

_IP4 = struct.Struct("!BxHxxHxB")  # version/ihl, total length, fragment, protocol
_IP6 = struct.Struct("!4xHB")  # payload length, next header
_TCP = struct.Struct("!IIBBH")  # seq, ack, data offset, flags, window (from +4)
_U16 = struct.Struct("!H")
_U32LE = struct.Struct("<I")
_U32BE = struct.Struct("!I")

_ETH_IPV4, _ETH_IPV6, _ETH_VLAN, _ETH_QINQ = 0x0800, 0x86DD, 0x8100, 0x88A8
# BSD loopback address families: AF_INET is 2 everywhere; AF_INET6 differs by BSD.
_BSD_AF_INET6 = frozenset((24, 28, 30, 10))

_IPV6_EXT_HEADERS = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options
_ICMP_QUERIES = frozenset((0, 8, 13, 14, 15, 16, 17, 18))
_ICMP_ERRORS = frozenset((3, 4, 5, 11, 12))
_ICMP6_QUERIES = frozenset((128, 129))
_ICMP6_ERRORS = frozenset((1, 2, 3, 4))
_NO_PORTS = b"\0\0\0\0"


def decode_frame(frame: bytes, linktype: int) -> Packet | int:
    """Decode one captured frame of the given pcap link type (see module doc)."""
    if linktype == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return PFRES_SHORT
        ethertype = (frame[12] << 8) | frame[13]
        off = 14
        while ethertype == _ETH_VLAN or ethertype == _ETH_QINQ:
            if len(frame) < off + 4:
                return PFRES_SHORT
            ethertype = (frame[off + 2] << 8) | frame[off + 3]
            off += 4
        if ethertype == _ETH_IPV4:
            return decode_ipv4(frame, off)
        if ethertype == _ETH_IPV6:
            return decode_ipv6(frame, off)
        return NOT_IP
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return decode_ip(frame, 0)
    if linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return PFRES_SHORT
        return _by_ethertype(frame, (frame[14] << 8) | frame[15], 16)
    if linktype == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20:
            return PFRES_SHORT
        return _by_ethertype(frame, (frame[0] << 8) | frame[1], 20)
    if linktype == LINKTYPE_NULL or linktype == LINKTYPE_LOOP:
        if len(frame) < 4:
            return PFRES_SHORT
        # DLT_NULL stores the family in the capturing host's byte order, DLT_LOOP in
        # network order; a family is small, so whichever reading is small is right.
        family = _U32BE.unpack_from(frame)[0]
        if family > 0xFFFF:
            family = _U32LE.unpack_from(frame)[0]
        if family == 2:
            return decode_ipv4(frame, 4)
        if family in _BSD_AF_INET6:
            return decode_ipv6(frame, 4)
        return NOT_IP
    return NOT_IP


def _by_ethertype(frame: bytes, ethertype: int, off: int) -> Packet | int:
    if ethertype == _ETH_IPV4:
        return decode_ipv4(frame, off)
    if ethertype == _ETH_IPV6:
        return decode_ipv6(frame, off)
    return NOT_IP


def decode_ip(frame: bytes, off: int) -> Packet | int:
    """Decode an IP packet of either version starting at ``off``."""
    if len(frame) <= off:
        return PFRES_SHORT
    version = frame[off] >> 4
    if version == 4:
        return decode_ipv4(frame, off)
    if version == 6:
        return decode_ipv6(frame, off)
    return NOT_IP


def decode_ipv4(frame: bytes, off: int) -> Packet | int:
    """Decode an IPv4 packet starting at ``off``."""
    if len(frame) < off + 20:
        return PFRES_SHORT
    vhl, iplen, frag, proto = _IP4.unpack_from(frame, off)
    ihl = (vhl & 0x0F) << 2
    if vhl >> 4 != 4:
        return NOT_IP
    if ihl < 20:
        return PFRES_BADOFF
    if iplen < ihl:
        return PFRES_SHORT
    if frag & 0x1FFF:
        return PFRES_FRAG  # a later fragment: no transport header
    if len(frame) < off + ihl:
        return PFRES_SHORT
    return _transport(
        frame, off + ihl, proto, frame[off + 12 : off + 20], iplen - ihl, iplen, False
    )


def decode_ipv6(frame: bytes, off: int) -> Packet | int:
    """Decode an IPv6 packet starting at ``off``, skipping extension headers."""
    if len(frame) < off + 40:
        return PFRES_SHORT
    if frame[off] >> 4 != 6:
        return NOT_IP
    plen, nxt = _IP6.unpack_from(frame, off)
    ips = frame[off + 8 : off + 40]
    p = off + 40
    end = p + plen
    while True:
        if nxt in _IPV6_EXT_HEADERS or nxt == 51:
            if len(frame) < p + 2:
                return PFRES_SHORT
            hlen = (frame[p + 1] + 2) << 2 if nxt == 51 else (frame[p + 1] + 1) << 3
            nxt = frame[p]
            p += hlen
            if p > end:
                return PFRES_BADOFF
        elif nxt == 44:  # fragment header
            if len(frame) < p + 8:
                return PFRES_SHORT
            if _U16.unpack_from(frame, p + 2)[0] & 0xFFF8:
                return PFRES_FRAG
            nxt = frame[p]
            p += 8
            if p > end:
                return PFRES_BADOFF
        else:
            break
    return _transport(frame, p, nxt, ips, end - p, plen + 40, True)


def _transport(
    frame: bytes, l4: int, proto: int, ips: bytes, l4len: int, iplen: int, v6: bool
) -> Packet | int:
    """Decode the transport header at ``l4``; ``l4len`` is its length from the IP header."""
    if proto == IPPROTO_TCP:
        if len(frame) < l4 + 20 or l4len < 20:
            return PFRES_SHORT
        seq, ack, offx, flags, win = _TCP.unpack_from(frame, l4 + 4)
        thl = (offx >> 4) << 2
        if thl < 20:
            return PFRES_BADOFF
        if thl > l4len:
            return PFRES_SHORT
        opt = _syn_wscale(frame, l4 + 20, l4 + thl) if flags & TH_SYN and thl > 20 else 0
        return (proto, ips + frame[l4 : l4 + 4], flags, seq, ack, win, l4len - thl, iplen, opt)
    if proto == IPPROTO_UDP:
        if len(frame) < l4 + 8 or l4len < 8:
            return PFRES_SHORT
        return (proto, ips + frame[l4 : l4 + 4], 0, 0, 0, 0, l4len - 8, iplen, 0)
    if proto == IPPROTO_ICMP or proto == IPPROTO_ICMPV6:
        if len(frame) < l4 + 8 or l4len < 8:
            return PFRES_SHORT
        icmp_type, code = frame[l4], frame[l4 + 1]
        queries, errors = (_ICMP6_QUERIES, _ICMP6_ERRORS) if v6 else (_ICMP_QUERIES, _ICMP_ERRORS)
        inner = None
        if icmp_type in queries:
            ident = frame[l4 + 4 : l4 + 6]
            key = ips + ident + ident
        else:
            key = ips + _NO_PORTS
            if icmp_type in errors:
                inner = _quoted(frame, l4 + 8, v6)
                if isinstance(inner, int):
                    return inner
        return (proto, key, icmp_type, code, 0, 0, l4len - 8, iplen, inner)
    return (proto, ips + _NO_PORTS, 0, 0, 0, 0, l4len, iplen, None)


def _quoted(frame: bytes, off: int, v6: bool) -> tuple[int, bytes] | int:
    """(proto, key) of the packet an ICMP error quotes: its IP header + 8 bytes."""
    if v6:
        if len(frame) < off + 40:
            return PFRES_SHORT
        proto = frame[off + 6]
        ips, l4 = frame[off + 8 : off + 40], off + 40
        # Extension headers in the quote are rare; only the common chain is walked.
        while proto in _IPV6_EXT_HEADERS:
            if len(frame) < l4 + 2:
                return PFRES_SHORT
            proto, l4 = frame[l4], l4 + ((frame[l4 + 1] + 1) << 3)
    else:
        if len(frame) < off + 20:
            return PFRES_SHORT
        ihl = (frame[off] & 0x0F) << 2
        if ihl < 20:
            return PFRES_BADOFF
        proto = frame[off + 9]
        ips, l4 = frame[off + 12 : off + 20], off + ihl
    if proto == IPPROTO_TCP or proto == IPPROTO_UDP:
        if len(frame) < l4 + 4:
            return PFRES_SHORT
        return proto, ips + frame[l4 : l4 + 4]
    if proto == IPPROTO_ICMP or proto == IPPROTO_ICMPV6:
        if len(frame) < l4 + 6:
            return PFRES_SHORT
        ident = frame[l4 + 4 : l4 + 6]
        return proto, ips + ident + ident
    return proto, ips + _NO_PORTS


def _syn_wscale(frame: bytes, p: int, end: int) -> int:
    """pf_get_wscale(): the window-scale option of a SYN, as ``0x80 | shift`` (0: none)."""
    end = min(end, len(frame))
    while p < end:
        kind = frame[p]
        if kind == 0:
            break
        if kind == 1:
            p += 1
            continue
        if p + 1 >= end:
            break
        olen = frame[p + 1]
        if olen < 2:
            break
        if kind == 3 and olen >= 3 and p + 2 < end:
            return min(frame[p + 2], TCP_MAX_WINSHIFT) | WSCALE_FLAG
        p += olen
    return 0
