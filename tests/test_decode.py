"""decode_frame(): every link type it claims, IPv4/IPv6 header walking, TCP/UDP/ICMP fields.

The decoder's contract (statetable/decode.py): a packet tuple
``(proto, key, flags, seq, ack, win, dlen, iplen, opt)`` or an int (a PFRES reason or
NOT_IP), and it never raises. Frames are built here byte by byte (or with tests/packets.py)
so every expected field is known.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statetable import decode_frame
from statetable.counters import PFRES_BADOFF, PFRES_FRAG, PFRES_SHORT
from statetable.decode import NOT_IP
from tests import packets
from tests.packets import ACK, FIN, PSH, RST, SYN

# ---- helpers -------------------------------------------------------------------------

A4, B4, R4 = "192.0.2.1", "198.51.100.7", "203.0.113.254"
A6, B6, R6 = "2001:db8::1", "2001:db8:ffff::2", "2001:db8:aaaa::fe"

LINKTYPES: tuple[int, ...] = (0, 1, 101, 108, 113, 228, 229, 276)
RESULT_INTS = frozenset((PFRES_SHORT, PFRES_BADOFF, PFRES_FRAG, NOT_IP))

HOP_BY_HOP, ROUTING, FRAGMENT, AUTH, DEST_OPTS = 0, 43, 44, 51, 60


def addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def key(src: str, dst: str, sport: int, dport: int) -> bytes:
    return addr(src) + addr(dst) + struct.pack("!HH", sport, dport)


def tcp_header(
    sport: int,
    dport: int,
    flags: int,
    seq: int = 0,
    ack: int = 0,
    win: int = 65535,
    options: bytes = b"",
    doff: int | None = None,
) -> bytes:
    """A bare TCP header (``doff`` overrides the data offset, in 32-bit words)."""
    off = (5 + len(options) // 4) if doff is None else doff
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, win, 0, 0) + options


def udp_header(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(
    src: str,
    dst: str,
    proto: int,
    l4: bytes,
    options: bytes = b"",
    frag: int = 0,
    total: int | None = None,
    ihl: int | None = None,
) -> bytes:
    """An IPv4 packet; ``frag`` is the raw flags+offset field; ``options`` sets ihl > 5."""
    assert len(options) % 4 == 0
    hl = 5 + len(options) // 4 if ihl is None else ihl
    length = 20 + len(options) + len(l4) if total is None else total
    return (
        struct.pack("!BBHHHBBH", 0x40 | hl, 0, length, 0x1234, frag, 64, proto, 0)
        + addr(src)
        + addr(dst)
        + options
        + l4
    )


def ipv6(
    src: str,
    dst: str,
    chain: list[tuple[int, bytes]],
    proto: int,
    l4: bytes,
    plen: int | None = None,
) -> bytes:
    """An IPv6 packet with extension headers ``chain``: (header type, header bytes after
    the next-header byte). Each header's next-header byte is filled in here."""
    types = [t for t, _ in chain] + [proto]
    ext = b"".join(bytes([types[i + 1]]) + body for i, (_, body) in enumerate(chain))
    payload = ext + l4
    length = len(payload) if plen is None else plen
    return struct.pack("!IHBB", 6 << 28, length, types[0], 64) + addr(src) + addr(dst) + payload


def ext_options(units: int) -> bytes:
    """Body (after next-header) of a hop-by-hop/dest-opts header of (units + 1) * 8 bytes."""
    size = (units + 1) * 8
    return bytes([units]) + bytes([1, size - 4]) + b"\0" * (size - 4)  # one PadN option


def ext_routing() -> bytes:
    """Body of a 24-byte type-0 routing header (hdr ext len 2, one address)."""
    return bytes([2, 0, 0]) + b"\0" * 4 + addr("2001:db8::99")


def ext_fragment(offset: int, more: bool) -> bytes:
    return bytes([0]) + struct.pack("!HI", (offset << 3) | int(more), 0xCAFE)


def ext_auth(words: int = 4) -> bytes:
    """Body of an AH header of (words + 2) * 4 bytes."""
    size = (words + 2) * 4
    return bytes([words]) + b"\0\0" + struct.pack("!II", 0x100, 1) + b"\0" * (size - 12)


def icmp4(kind: int, code: int, rest: bytes = b"\0\0\0\0", body: bytes = b"") -> bytes:
    return struct.pack("!BBH", kind, code, 0) + rest + body


def echo(kind: int, ident: int, seq: int = 1) -> bytes:
    return struct.pack("!BBHHH", kind, 0, 0, ident, seq)


# Link layers around a bare IP packet, by name.
def link_ethernet(pkt: bytes, v6: bool) -> bytes:
    return packets.eth(pkt, v6)


def link_vlan(pkt: bytes, v6: bool) -> bytes:
    et = b"\x86\xdd" if v6 else b"\x08\x00"
    return b"\x02" * 12 + b"\x81\x00" + struct.pack("!H", 42) + et + pkt


def link_qinq(pkt: bytes, v6: bool) -> bytes:
    et = b"\x86\xdd" if v6 else b"\x08\x00"
    return b"\x02" * 12 + b"\x88\xa8\x00\x07\x81\x00\x00\x2a" + et + pkt


def link_sll(pkt: bytes, v6: bool) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02" * 6, 0x86DD if v6 else 0x0800) + pkt


def link_sll2(pkt: bytes, v6: bool) -> bytes:
    return struct.pack("!HHIHBB8s", 0x86DD if v6 else 0x0800, 0, 3, 1, 0, 6, b"\x02" * 6) + pkt


def link_raw(pkt: bytes, v6: bool) -> bytes:
    return pkt


def null_header(af: int, little: bool) -> bytes:
    return struct.pack("<I" if little else ">I", af)


@dataclass(frozen=True)
class Link:
    name: str
    linktype: int
    wrap: Callable[[bytes, bool], bytes]
    v4: bool = True
    v6: bool = True


LINKS: tuple[Link, ...] = (
    Link("ethernet", 1, link_ethernet),
    Link("vlan", 1, link_vlan),
    Link("qinq", 1, link_qinq),
    Link("raw101", 101, link_raw),
    Link("ipv4-228", 228, link_raw, v6=False),
    Link("ipv6-229", 229, link_raw, v4=False),
    Link("sll", 113, link_sll),
    Link("sll2", 276, link_sll2),
    Link("null-le-af2", 0, lambda p, v6: null_header(2, True) + p, v6=False),
    Link("null-be-af2", 0, lambda p, v6: null_header(2, False) + p, v6=False),
    *(
        Link(f"null-le-af{af}", 0, lambda p, v6, af=af: null_header(af, True) + p, v4=False)
        for af in (24, 28, 30)
    ),
    *(
        Link(
            f"null-be-af{af}",
            0,
            lambda p, v6, af=af: null_header(af, False) + p,
            v4=False,
        )
        for af in (24, 28, 30)
    ),
    Link("loop-af2", 108, lambda p, v6: null_header(2, False) + p, v6=False),
    Link("loop-af24", 108, lambda p, v6: null_header(24, False) + p, v4=False),
    Link("loop-af28", 108, lambda p, v6: null_header(28, False) + p, v4=False),
    Link("loop-af30", 108, lambda p, v6: null_header(30, False) + p, v4=False),
)
LINK_HEADER = {
    "ethernet": 14,
    "vlan": 18,
    "qinq": 22,
    "raw101": 0,
    "ipv4-228": 0,
    "ipv6-229": 0,
    "sll": 16,
    "sll2": 20,
}


def link_len(link: Link) -> int:
    return LINK_HEADER.get(link.name, 4)


@dataclass(frozen=True)
class Case:
    """A bare IP packet, what it decodes to, and how many bytes of it the decoder needs."""

    name: str
    packet: bytes
    v6: bool
    expected: tuple
    need: int  # bytes (from the IP header) below which the result is PFRES_SHORT
    full: int  # bytes from which the result is exactly ``expected``


def _cases() -> list[Case]:
    out: list[Case] = []
    # TCP SYN with MSS + wscale over IPv4; opt visible only once the options are there.
    opts = packets.tcp_options(mss=1460, wscale=7)
    l4 = tcp_header(40000, 443, SYN, seq=0xDEADBEEF, win=29200, options=opts)
    out.append(
        Case(
            "tcp4-syn",
            ipv4(A4, B4, 6, l4),
            False,
            (6, key(A4, B4, 40000, 443), SYN, 0xDEADBEEF, 0, 29200, 0, 20 + len(l4), 0x87),
            20 + 20,
            20 + len(l4),
        )
    )
    # TCP data segment over IPv4 with IP options (ihl = 7).
    l4 = tcp_header(443, 40000, ACK | PSH, seq=7, ack=0xDEADBEF0, win=501) + b"x" * 100
    ipopts = b"\x94\x04\x00\x00" + b"\x01\x01\x01\x00"  # router alert, NOPs, EOL
    out.append(
        Case(
            "tcp4-ipopts",
            ipv4(B4, A4, 6, l4, options=ipopts),
            False,
            (6, key(B4, A4, 443, 40000), ACK | PSH, 7, 0xDEADBEF0, 501, 100, 28 + len(l4), 0),
            28 + 20,
            28 + 20,
        )
    )
    # UDP over IPv4.
    l4 = udp_header(5353, 53, b"q" * 33)
    out.append(
        Case(
            "udp4",
            ipv4(A4, B4, 17, l4),
            False,
            (17, key(A4, B4, 5353, 53), 0, 0, 0, 0, 33, 20 + len(l4), 0),
            28,
            28,
        )
    )
    # ICMP echo request/reply: the id is both "ports".
    out.append(
        Case(
            "icmp4-echo",
            ipv4(A4, B4, 1, echo(8, 0xBEEF) + b"p" * 8),
            False,
            (1, key(A4, B4, 0xBEEF, 0xBEEF), 8, 0, 0, 0, 8, 36, None),
            28,
            28,
        )
    )
    out.append(
        Case(
            "icmp4-echo-reply",
            ipv4(B4, A4, 1, echo(0, 0xBEEF)),
            False,
            (1, key(B4, A4, 0xBEEF, 0xBEEF), 0, 0, 0, 0, 0, 28, None),
            28,
            28,
        )
    )
    # ICMP errors quoting TCP, UDP and an echo request (with IP options in the quote).
    quoted = ipv4(A4, B4, 6, tcp_header(40000, 443, SYN, seq=1))[:28]
    out.append(
        Case(
            "icmp4-unreach-tcp",
            ipv4(R4, A4, 1, icmp4(3, 1, body=quoted)),
            False,
            (1, key(R4, A4, 0, 0), 3, 1, 0, 0, 28, 56, (6, key(A4, B4, 40000, 443))),
            20 + 8 + 20 + 4,
            20 + 8 + 20 + 4,
        )
    )
    quoted = ipv4(A4, B4, 17, udp_header(5353, 53), options=b"\x01\x01\x01\x01")
    out.append(
        Case(
            "icmp4-timex-udp-ipopts",
            ipv4(R4, A4, 1, icmp4(11, 0, body=quoted)),
            False,
            (1, key(R4, A4, 0, 0), 11, 0, 0, 0, 32, 60, (17, key(A4, B4, 5353, 53))),
            20 + 8 + 24 + 4,
            20 + 8 + 24 + 4,
        )
    )
    quoted = ipv4(A4, B4, 1, echo(8, 0x0102))
    out.append(
        Case(
            "icmp4-unreach-echo",
            ipv4(R4, A4, 1, icmp4(3, 3, body=quoted)),
            False,
            (1, key(R4, A4, 0, 0), 3, 3, 0, 0, 28, 56, (1, key(A4, B4, 0x0102, 0x0102))),
            20 + 8 + 20 + 6,
            20 + 8 + 20 + 6,
        )
    )
    # "Other" protocol: GRE.
    out.append(
        Case(
            "gre4",
            ipv4(A4, B4, 47, b"\0\0\x08\x00" + b"g" * 20),
            False,
            (47, key(A4, B4, 0, 0), 0, 0, 0, 0, 24, 44, None),
            20,
            20,
        )
    )
    # A first IPv4 fragment (MF, offset 0) decodes.
    l4 = udp_header(1000, 2000, b"f" * 40)
    out.append(
        Case(
            "udp4-first-fragment",
            ipv4(A4, B4, 17, l4, frag=0x2000),
            False,
            (17, key(A4, B4, 1000, 2000), 0, 0, 0, 0, 40, 68, 0),
            28,
            28,
        )
    )

    # IPv6: TCP through hop-by-hop, routing, destination options and a first fragment.
    l4 = tcp_header(50000, 22, SYN, seq=99, win=64800, options=packets.tcp_options(1440, 20))
    chain = [
        (HOP_BY_HOP, ext_options(0)),
        (ROUTING, ext_routing()),
        (DEST_OPTS, ext_options(1)),
        (FRAGMENT, ext_fragment(0, True)),
    ]
    extlen = 8 + 24 + 16 + 8
    out.append(
        Case(
            "tcp6-exthdrs",
            ipv6(A6, B6, chain, 6, l4),
            True,
            (6, key(A6, B6, 50000, 22), SYN, 99, 0, 64800, 0, 40 + extlen + len(l4), 0x80 | 14),
            40 + extlen + 20,
            40 + extlen + len(l4),
        )
    )
    l4 = udp_header(546, 547, b"d" * 10)
    out.append(
        Case(
            "udp6-ah",
            ipv6(A6, B6, [(AUTH, ext_auth(4))], 17, l4),
            True,
            (17, key(A6, B6, 546, 547), 0, 0, 0, 0, 10, 40 + 24 + 18, 0),
            40 + 24 + 8,
            40 + 24 + 8,
        )
    )
    out.append(
        Case(
            "icmp6-echo",
            ipv6(A6, B6, [], 58, echo(128, 4242) + b"e" * 16),
            True,
            (58, key(A6, B6, 4242, 4242), 128, 0, 0, 0, 16, 40 + 24, None),
            48,
            48,
        )
    )
    out.append(
        Case(
            "icmp6-echo-reply",
            ipv6(B6, A6, [], 58, echo(129, 4242)),
            True,
            (58, key(B6, A6, 4242, 4242), 129, 0, 0, 0, 0, 48, None),
            48,
            48,
        )
    )
    quoted = ipv6(A6, B6, [], 6, tcp_header(50000, 22, ACK, seq=5))[:48]
    out.append(
        Case(
            "icmp6-unreach-tcp",
            ipv6(R6, A6, [], 58, icmp4(1, 4, body=quoted)),
            True,
            (58, key(R6, A6, 0, 0), 1, 4, 0, 0, 48, 96, (6, key(A6, B6, 50000, 22))),
            40 + 8 + 44,
            40 + 8 + 44,
        )
    )
    quoted = ipv6(A6, B6, [(HOP_BY_HOP, ext_options(0))], 17, udp_header(7, 9))
    out.append(
        Case(
            "icmp6-toobig-udp-hbh",
            ipv6(R6, A6, [], 58, icmp4(2, 0, b"\0\0\x05\x00", quoted)),
            True,
            (58, key(R6, A6, 0, 0), 2, 0, 0, 0, 56, 104, (17, key(A6, B6, 7, 9))),
            40 + 8 + 48 + 4,
            40 + 8 + 48 + 4,
        )
    )
    quoted = ipv6(A6, B6, [], 58, echo(128, 77))
    out.append(
        Case(
            "icmp6-timex-echo",
            ipv6(R6, A6, [], 58, icmp4(3, 0, body=quoted)),
            True,
            (58, key(R6, A6, 0, 0), 3, 0, 0, 0, 48, 96, (58, key(A6, B6, 77, 77))),
            40 + 8 + 46,
            40 + 8 + 46,
        )
    )
    return out


CASES = _cases()
CASE_IDS = [c.name for c in CASES]


def link_cases() -> list[tuple[Link, Case]]:
    return [(link, case) for link in LINKS for case in CASES if (link.v6 if case.v6 else link.v4)]


LINK_CASES = link_cases()
LINK_CASE_IDS = [f"{link.name}-{case.name}" for link, case in LINK_CASES]


def frame_of(link: Link, case: Case) -> bytes:
    return link.wrap(case.packet, case.v6)


def assert_decoder_result(result: object) -> None:
    """The contract: a 9-tuple with a proper key, or one of the known ints."""
    if isinstance(result, int):
        assert result in RESULT_INTS
        return
    assert isinstance(result, tuple) and len(result) == 9
    proto, k, flags, seq, ack, win, dlen, iplen, opt = result
    assert 0 <= proto <= 255
    assert isinstance(k, bytes) and len(k) in (12, 36)
    assert all(isinstance(v, int) for v in (flags, seq, ack, win, dlen, iplen))
    if opt is not None and not isinstance(opt, int):
        inner_proto, inner_key = opt
        assert 0 <= inner_proto <= 255 and len(inner_key) == len(k)


# ---- every link type ------------------------------------------------------------------


@pytest.mark.parametrize(("link", "case"), LINK_CASES, ids=LINK_CASE_IDS)
def test_every_link_type_decodes_every_packet(link: Link, case: Case) -> None:
    assert decode_frame(frame_of(link, case), link.linktype) == case.expected


# Truncation: every packet on Ethernet, and two packets (v4, v6) on every link type.
TRUNCATION_CASES = [(LINKS[0], case) for case in CASES] + [
    (link, case)
    for link, case in LINK_CASES
    if link is not LINKS[0] and case.name in ("tcp4-syn", "tcp6-exthdrs")
]


@pytest.mark.parametrize(
    ("link", "case"),
    TRUNCATION_CASES,
    ids=[f"{link.name}-{case.name}" for link, case in TRUNCATION_CASES],
)
def test_truncated_frames_at_every_length(link: Link, case: Case) -> None:
    frame = frame_of(link, case)
    head = link_len(link)
    for n in range(len(frame) + 1):
        got = decode_frame(frame[:n], link.linktype)
        if n < head + case.need:
            assert got == PFRES_SHORT, (n, got)
        elif n >= head + case.full:
            assert got == case.expected, n
        else:
            # Between the fixed TCP header and the end of its options: still a packet,
            # only the window-scale option may be lost.
            assert isinstance(got, tuple) and got[:8] == case.expected[:8], n


def test_ethernet_frames_from_the_packet_builder() -> None:
    frame = packets.tcp(A4, B4, 1, 2, SYN | ACK, seq=10, ack=20, win=1000, payload=b"abc")
    assert decode_frame(frame, 1) == (6, key(A4, B4, 1, 2), SYN | ACK, 10, 20, 1000, 3, 43, 0)
    frame = packets.udp(A6, B6, 53, 5353, b"zz")
    assert decode_frame(frame, 1) == (17, key(A6, B6, 53, 5353), 0, 0, 0, 0, 2, 50, 0)


def test_ethernet_padding_is_not_payload() -> None:
    # A 60-byte minimum Ethernet frame: the IP total length, not the frame, gives dlen.
    frame = packets.tcp(A4, B4, 1, 2, ACK, seq=1, ack=1) + b"\0" * 6
    got = decode_frame(frame, 1)
    assert isinstance(got, tuple) and got[6] == 0 and got[7] == 40


def test_non_ip_frames() -> None:
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"\0" * 28
    assert decode_frame(arp, 1) == NOT_IP
    assert decode_frame(link_sll(b"\0" * 28, False)[:14] + b"\x08\x06" + b"\0" * 28, 113) == NOT_IP
    assert decode_frame(null_header(7, True) + b"\x45" + b"\0" * 40, 0) == NOT_IP
    assert decode_frame(b"\x55" + b"\0" * 40, 101) == NOT_IP  # IP version 5
    assert decode_frame(packets.eth(b"\x60" + b"\0" * 40), 1) == NOT_IP  # v6 in a v4 ethertype
    assert decode_frame(packets.udp(A4, B4, 1, 2), 147) == NOT_IP  # unknown link type


def test_short_link_headers() -> None:
    for linktype, minimum in (
        (1, 14),
        (113, 16),
        (276, 20),
        (0, 4),
        (108, 4),
        (101, 1),
        (228, 1),
        (229, 1),
    ):
        for n in range(minimum):
            assert decode_frame(b"\0" * n, linktype) == PFRES_SHORT, (linktype, n)
    # A VLAN tag cut short.
    assert decode_frame(b"\0" * 12 + b"\x81\x00\x00", 1) == PFRES_SHORT


# ---- IPv4 ---------------------------------------------------------------------------------


def test_ipv4_header_length_below_five_words_is_bad_offset() -> None:
    pkt = ipv4(A4, B4, 17, udp_header(1, 2), ihl=4)
    assert decode_frame(pkt, 101) == PFRES_BADOFF


def test_ipv4_total_length_below_header_length_is_short() -> None:
    pkt = ipv4(A4, B4, 17, udp_header(1, 2), options=b"\x01" * 8, total=24)
    assert decode_frame(pkt, 101) == PFRES_SHORT


@pytest.mark.parametrize("frag", [0x0001, 0x2001, 0x1FFF, 0x00B9])
def test_ipv4_later_fragment_is_fragment(frag: int) -> None:
    pkt = ipv4(A4, B4, 6, tcp_header(1, 2, ACK), frag=frag)
    assert decode_frame(pkt, 101) == PFRES_FRAG


def test_ipv4_dont_fragment_flag_is_not_a_fragment() -> None:
    pkt = ipv4(A4, B4, 17, udp_header(1, 2), frag=0x4000)
    assert decode_frame(pkt, 101) == (17, key(A4, B4, 1, 2), 0, 0, 0, 0, 0, 28, 0)


@pytest.mark.parametrize("words", [6, 10, 15])
def test_ipv4_options_of_every_size(words: int) -> None:
    options = b"\x01" * ((words - 5) * 4)
    pkt = ipv4(A4, B4, 6, tcp_header(9, 10, ACK, seq=3, ack=4, win=5) + b"xy", options=options)
    assert decode_frame(pkt, 101) == (6, key(A4, B4, 9, 10), ACK, 3, 4, 5, 2, words * 4 + 22, 0)


def test_ipv4_transport_length_comes_from_total_length() -> None:
    # A snapped capture: the IP header claims 1000 bytes of payload the frame lacks.
    pkt = ipv4(A4, B4, 6, tcp_header(1, 2, ACK), total=20 + 20 + 1000)
    assert decode_frame(pkt, 101) == (6, key(A4, B4, 1, 2), ACK, 0, 0, 65535, 1000, 1040, 0)


def test_ipv4_total_length_too_small_for_transport_header_is_short() -> None:
    assert decode_frame(ipv4(A4, B4, 6, tcp_header(1, 2, ACK), total=39), 101) == PFRES_SHORT
    assert decode_frame(ipv4(A4, B4, 17, udp_header(1, 2), total=27), 101) == PFRES_SHORT
    assert decode_frame(ipv4(A4, B4, 1, echo(8, 1), total=27), 101) == PFRES_SHORT


# ---- IPv6 extension headers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "chain",
    [
        [(HOP_BY_HOP, ext_options(0))],
        [(ROUTING, ext_routing())],
        [(DEST_OPTS, ext_options(3))],
        [(FRAGMENT, ext_fragment(0, True))],
        [(AUTH, ext_auth(6))],
        [
            (HOP_BY_HOP, ext_options(1)),
            (DEST_OPTS, ext_options(0)),
            (ROUTING, ext_routing()),
            (FRAGMENT, ext_fragment(0, True)),
            (AUTH, ext_auth(4)),
            (DEST_OPTS, ext_options(0)),
        ],
    ],
    ids=["hbh", "routing", "dstopts", "frag0", "ah", "all"],
)
def test_ipv6_extension_headers_are_skipped(chain: list[tuple[int, bytes]]) -> None:
    l4 = tcp_header(1111, 2222, ACK | FIN, seq=5, ack=6, win=7) + b"0123456789"
    pkt = ipv6(A6, B6, chain, 6, l4)
    assert decode_frame(pkt, 229) == (
        6,
        key(A6, B6, 1111, 2222),
        ACK | FIN,
        5,
        6,
        7,
        10,
        len(pkt),
        0,
    )


@pytest.mark.parametrize("offset", [1, 185, 8191])
def test_ipv6_later_fragment_is_fragment(offset: int) -> None:
    for more in (True, False):
        chain = [(HOP_BY_HOP, ext_options(0)), (FRAGMENT, ext_fragment(offset, more))]
        pkt = ipv6(A6, B6, chain, 17, udp_header(1, 2, b"zz"))
        assert decode_frame(pkt, 229) == PFRES_FRAG


def test_ipv6_atomic_fragment_decodes() -> None:
    pkt = ipv6(A6, B6, [(FRAGMENT, ext_fragment(0, False))], 17, udp_header(1, 2, b"zz"))
    assert decode_frame(pkt, 229) == (17, key(A6, B6, 1, 2), 0, 0, 0, 0, 2, len(pkt), 0)


def test_ipv6_extension_header_beyond_payload_length_is_bad_offset() -> None:
    # The hop-by-hop header says 16 bytes, the payload length only leaves room for 8.
    pkt = ipv6(A6, B6, [(HOP_BY_HOP, ext_options(1))], 59, b"", plen=8)
    assert decode_frame(pkt, 229) == PFRES_BADOFF


def test_ipv6_fragment_header_beyond_payload_length_is_not_a_packet() -> None:
    # Payload length 0, yet a fragment header follows: no packet tuple may come out of
    # this (other extension headers give PFRES_BADOFF here); certainly not one whose
    # payload length (dlen) is negative.
    pkt = ipv6(A6, B6, [(FRAGMENT, ext_fragment(0, True))], 47, b"\0" * 8, plen=0)
    got = decode_frame(pkt, 229)
    assert got in (PFRES_BADOFF, PFRES_SHORT), got


def test_ipv6_payload_length_too_small_for_transport_is_short() -> None:
    pkt = ipv6(A6, B6, [], 6, tcp_header(1, 2, ACK), plen=19)
    assert decode_frame(pkt, 229) == PFRES_SHORT
    pkt = ipv6(A6, B6, [(DEST_OPTS, ext_options(0))], 17, udp_header(1, 2), plen=15)
    assert decode_frame(pkt, 229) == PFRES_SHORT


# ---- TCP header and options ---------------------------------------------------------------


def syn_opt(options: bytes, flags: int = SYN) -> int:
    got = decode_frame(ipv4(A4, B4, 6, tcp_header(1, 2, flags, options=options)), 101)
    assert isinstance(got, tuple)
    return got[8]


@pytest.mark.parametrize(
    ("shift", "expected"),
    [
        (0, 0x80),
        (1, 0x81),
        (7, 0x87),
        (13, 0x8D),
        (14, 0x8E),
        (15, 0x8E),
        (200, 0x8E),
        (255, 0x8E),
    ],
)
def test_syn_window_scale_is_flagged_and_capped_at_14(shift: int, expected: int) -> None:
    assert syn_opt(packets.tcp_options(wscale=shift)) == expected
    assert syn_opt(packets.tcp_options(mss=1460, wscale=shift), SYN | ACK) == expected


def test_syn_without_window_scale_gives_zero() -> None:
    assert syn_opt(b"") == 0
    assert syn_opt(packets.tcp_options(mss=1460)) == 0
    # SACK-permitted + timestamps, no window scale.
    assert syn_opt(b"\x04\x02\x08\x0a" + b"\0" * 8 + b"\x01" * 4) == 0


def test_window_scale_on_a_non_syn_segment_is_ignored() -> None:
    options = packets.tcp_options(mss=1460, wscale=7)
    for flags in (ACK, ACK | PSH, FIN | ACK, RST):
        assert syn_opt(options, flags) == 0


def test_window_scale_option_walk() -> None:
    ws = b"\x03\x03\x05"
    assert syn_opt(b"\x01" * 5 + ws) == 0x85  # NOP padding
    assert syn_opt(b"\x02\x04\x05\xb4" + b"\x08\x0a" + b"\0" * 8 + ws + b"\0" * 3) == 0x85
    assert syn_opt(b"\x00" + ws + b"\0" * 4) == 0  # EOL first
    assert syn_opt(b"\x02\x01" + ws + b"\0" * 3) == 0  # bad length stops it
    assert syn_opt(b"\x01\x01\x01\x03") == 0  # option cut by header end
    assert syn_opt(b"\x01\x01\x03\x03") == 0  # value cut by header end
    assert syn_opt(b"\x03\x02\x07\x00") == 0  # wscale of length 2


def test_tcp_data_offset_below_five_is_bad_offset() -> None:
    for doff in range(5):
        pkt = ipv4(A4, B4, 6, tcp_header(1, 2, ACK, doff=doff) + b"\0" * 40)
        assert decode_frame(pkt, 101) == PFRES_BADOFF


def test_tcp_data_offset_beyond_ip_length_is_short() -> None:
    pkt = ipv4(A4, B4, 6, tcp_header(1, 2, ACK, doff=15) + b"\0" * 20)  # 60 > 40
    assert decode_frame(pkt, 101) == PFRES_SHORT


def test_tcp_fields_are_unsigned_32_bit() -> None:
    pkt = ipv4(A4, B4, 6, tcp_header(65535, 0, 0xFF, seq=0xFFFFFFFF, ack=0x80000000, win=0))
    assert decode_frame(pkt, 101) == (
        6,
        key(A4, B4, 65535, 0),
        0xFF,
        0xFFFFFFFF,
        0x80000000,
        0,
        0,
        40,
        0,
    )


# ---- ICMP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [0, 8, 13, 14, 15, 16, 17, 18])
def test_icmp_queries_use_the_id_as_both_ports(kind: int) -> None:
    got = decode_frame(ipv4(A4, B4, 1, echo(kind, 0xA1B2, seq=9)), 101)
    assert got == (1, key(A4, B4, 0xA1B2, 0xA1B2), kind, 0, 0, 0, 0, 28, None)


@pytest.mark.parametrize("kind", [9, 10, 42])
def test_other_icmp_types_have_no_ports_and_no_quote(kind: int) -> None:
    got = decode_frame(ipv4(A4, B4, 1, echo(kind, 0xA1B2)), 101)
    assert got == (1, key(A4, B4, 0, 0), kind, 0, 0, 0, 0, 28, None)


@pytest.mark.parametrize("kind", [3, 4, 5, 11, 12])
def test_every_icmp_error_type_quotes(kind: int) -> None:
    quoted = ipv4(B4, A4, 17, udp_header(53, 5353))
    got = decode_frame(ipv4(R4, B4, 1, icmp4(kind, 0, body=quoted)), 101)
    assert isinstance(got, tuple) and got[8] == (17, key(B4, A4, 53, 5353))


@pytest.mark.parametrize("kind", [1, 2, 3, 4])
def test_every_icmp6_error_type_quotes(kind: int) -> None:
    quoted = ipv6(B6, A6, [], 17, udp_header(53, 5353))
    got = decode_frame(ipv6(R6, B6, [], 58, icmp4(kind, 0, body=quoted)), 229)
    assert isinstance(got, tuple) and got[8] == (17, key(B6, A6, 53, 5353))


def test_icmp_error_quoting_other_protocol() -> None:
    quoted = ipv4(A4, B4, 47, b"\0" * 8)
    got = decode_frame(ipv4(R4, A4, 1, icmp4(3, 2, body=quoted)), 101)
    assert isinstance(got, tuple) and got[8] == (47, key(A4, B4, 0, 0))


def test_icmp_error_quoting_bad_ipv4_header_is_bad_offset() -> None:
    quoted = bytearray(ipv4(A4, B4, 6, tcp_header(1, 2, SYN))[:28])
    quoted[0] = 0x43
    assert decode_frame(ipv4(R4, A4, 1, icmp4(3, 1, body=bytes(quoted))), 101) == PFRES_BADOFF


def test_icmp6_error_with_quoted_extension_header_cut_short_is_short() -> None:
    # The quote's hop-by-hop header starts at byte 88 of the IP packet; cut there (or one
    # byte later) the quoted chain cannot be walked, so the error is too short to match
    # anything. It must not come out as a packet quoting "protocol 0" (hop-by-hop).
    quoted = ipv6(A6, B6, [(HOP_BY_HOP, ext_options(0))], 17, udp_header(7, 9))
    pkt = ipv6(R6, A6, [], 58, icmp4(2, 0, b"\0\0\x05\x00", quoted))
    for n in (88, 89):
        assert decode_frame(pkt[:n], 229) == PFRES_SHORT, n


def test_icmp_error_from_the_packet_builder() -> None:
    quoted = packets.ip_packet(A4, B4, 17, udp_header(1000, 53))
    frame = packets.icmp_error(R4, A4, 3, 3, quoted)
    got = decode_frame(frame, 1)
    assert isinstance(got, tuple)
    assert got[0] == 1 and got[2:4] == (3, 3) and got[8] == (17, key(A4, B4, 1000, 53))
    frame = packets.icmp_echo(A6, B6, 0x0BAD, reply=True)
    assert decode_frame(frame, 1) == (58, key(A6, B6, 0x0BAD, 0x0BAD), 129, 0, 0, 0, 0, 48, None)


# ---- robustness ---------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(frame=st.binary(max_size=160), linktype=st.sampled_from(LINKTYPES + (147, 12)))
def test_arbitrary_bytes_never_raise(frame: bytes, linktype: int) -> None:
    assert_decoder_result(decode_frame(frame, linktype))


@settings(max_examples=200, deadline=None)
@given(
    version=st.sampled_from([4, 6]),
    rest=st.binary(min_size=0, max_size=120),
    linktype=st.sampled_from([101, 1, 0]),
)
def test_arbitrary_ip_looking_bytes_never_raise(version: int, rest: bytes, linktype: int) -> None:
    # Start with a plausible version nibble so the fuzzing reaches the IP and L4 code.
    pkt = bytes([version << 4 | 5]) + rest
    frame = {
        101: pkt,
        1: packets.eth(pkt, version == 6),
        0: null_header(2 if version == 4 else 24, True) + pkt,
    }[linktype]
    assert_decoder_result(decode_frame(frame, linktype))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(LINK_CASES) - 1),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 200)),
)
def test_mutated_valid_frames_never_raise(
    index: int, flips: list[tuple[int, int]], cut: int | None
) -> None:
    link, case = LINK_CASES[index]
    frame = bytearray(frame_of(link, case))
    for pos, value in flips:
        frame[pos % len(frame)] = value
    if cut is not None:
        del frame[cut:]
    assert_decoder_result(decode_frame(bytes(frame), link.linktype))
