"""pfdump's frame decoder: a frame's link, IP and transport headers, for one summary line.

The tools are gRPC clients only and may not import the node's own decoder
(``statetable.decode``), so this is a second, small reading of the same wire formats:
Ethernet (with VLAN tags), Linux SLL/SLL2, raw IP, BSD loopback; IPv4, IPv6 (skipping the
usual extension headers); TCP, UDP, ICMP, ICMPv6. It never raises on any input: what it
cannot read it reports as truncated or as another protocol. Plus the tap records of
tap.proto ("Frame records") and pfsync0's frames (a serialized SyncFrame).
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from pfsync.v1 import sync_pb2
from pfsync.v1 import tap_pb2 as pb

LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LOOP = 0, 1, 101, 108
LINKTYPE_LINUX_SLL, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL2 = 113, 228, 229, 276
LINKTYPE_USER0 = 147  # pfsync0: one serialized pfsync.v1.SyncFrame (tap.proto)

# tap.proto's record header: time_ns, length, caplen, linktype, direction, reserved.
RECORD = struct.Struct("<qIIHBx")
DIRECTION_NAMES = {0: "", 1: "In", 2: "Out"}

_TCP_FLAGS: tuple[tuple[int, str], ...] = (
    (0x02, "S"), (0x01, "F"), (0x04, "R"), (0x08, "P"), (0x20, "U"), (0x40, "E"),
    (0x80, "W"), (0x10, "."),
)  # fmt: skip
_ICMP_NAMES = {0: "echo reply", 8: "echo request", 3: "unreachable", 11: "time exceeded"}
_ICMP6_NAMES = {128: "echo request", 129: "echo reply", 1: "unreachable", 3: "time exceeded"}
_IPV6_EXT = (0, 43, 60)
_PFSYNC_SECTIONS = (
    ("hello", "hello"),
    ("clear", "CLR"),
    ("inserts", "INS"),
    ("updates", "UPD"),
    ("time_wait", "VTW"),
    ("compressed", "UPD_C"),
    ("update_requests", "UPD_REQ"),
    ("deletes", "DEL_C"),
    ("insert_acks", "INS_ACK"),
    ("bulk", "BUS"),
    ("digest", "digest"),
    ("ack_requested", "ACK_REQ"),
)


@dataclass(frozen=True)
class Record:
    """One frame of a tap stream."""

    time_ns: int
    length: int
    linktype: int
    direction: int
    data: bytes


def records(blob: bytes) -> Iterator[Record]:
    """The records of an AttachResponse (a truncated tail is ignored)."""
    pos, end = 0, len(blob)
    while pos + RECORD.size <= end:
        time_ns, length, caplen, linktype, direction = RECORD.unpack_from(blob, pos)
        pos += RECORD.size
        yield Record(time_ns, length, linktype, direction, blob[pos : pos + caplen])
        pos += caplen


def records_of_columns(columns: pb.FrameColumns) -> bytes:
    """FrameColumns (AttachRequest.columns) as the records of an AttachResponse: the node
    sends columns to spare itself a header per frame; the client packs them instead."""
    offset, data, pack = columns.wall_offset, columns.data, RECORD.pack
    count = len(columns.node_times)
    sizes = (len(columns.lengths), len(columns.caplens), len(columns.linktypes))
    if sizes != (count,) * 3 or len(columns.directions) != count:
        raise ValueError("the node sent frame columns of different lengths")
    if sum(columns.caplens) != len(data):
        raise ValueError("the node sent frame columns whose lengths do not add up to its data")
    parts: list[bytes] = []
    pos = 0
    for now, length, caplen, linktype, direction in zip(
        columns.node_times,
        columns.lengths,
        columns.caplens,
        columns.linktypes,
        columns.directions,
        strict=True,
    ):
        parts.append(pack(int((now + offset) * 1e9), length, caplen, linktype, direction))
        parts.append(data[pos : pos + caplen])
        pos += caplen
    return b"".join(parts)


def clock_text(time_ns: int) -> str:
    """Local time of day with microseconds, as tcpdump prints it."""
    seconds, ns = divmod(time_ns, 1_000_000_000)
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{ns // 1000:06d}"


@dataclass
class Decoded:
    """What pfdump prints and --json shows of a frame."""

    family: str = ""  # "IP", "IP6" or "" (not IP)
    src: str = ""
    dst: str = ""
    proto: int = 0
    sport: int | None = None
    dport: int | None = None
    summary: str = ""


def decode(data: bytes, linktype: int, length: int, direction: int = 0) -> Decoded:
    """Decode a frame into its summary (``length``: the frame's original length)."""
    try:
        return _decode(data, linktype, length, direction)
    except (IndexError, struct.error, ValueError):
        return Decoded(summary=f"[|truncated], length {length}")
    except Exception as exc:  # noqa: BLE001 (a line per frame, never a traceback)
        return Decoded(summary=f"[|undecodable: {type(exc).__name__}], length {length}")


def _decode(data: bytes, linktype: int, length: int, direction: int) -> Decoded:
    if linktype == LINKTYPE_USER0:
        return Decoded(summary=_pfsync(data, length, direction))
    off, ethertype = _link(data, linktype)
    if ethertype == 0x0800:
        return _ipv4(data, off)
    if ethertype == 0x86DD:
        return _ipv6(data, off)
    if ethertype is None:
        return Decoded(summary=f"linktype {linktype}, length {length}")
    return Decoded(summary=f"ethertype 0x{ethertype:04x}, length {length}")


def _link(data: bytes, linktype: int) -> tuple[int, int | None]:
    """(offset of the network header, its ethertype) for a link type."""
    if linktype == LINKTYPE_ETHERNET:
        ethertype, off = struct.unpack_from("!H", data, 12)[0], 14
        while ethertype in (0x8100, 0x88A8):
            ethertype, off = struct.unpack_from("!H", data, off + 2)[0], off + 4
        return off, ethertype
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return 0, 0x0800 if data[0] >> 4 == 4 else 0x86DD
    if linktype == LINKTYPE_LINUX_SLL:
        return 16, struct.unpack_from("!H", data, 14)[0]
    if linktype == LINKTYPE_LINUX_SLL2:
        return 20, struct.unpack_from("!H", data, 0)[0]
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        family = struct.unpack_from("!I", data)[0]
        if family > 0xFFFF:
            family = struct.unpack_from("<I", data)[0]
        return 4, 0x0800 if family == 2 else 0x86DD if family in (10, 24, 28, 30) else -1
    return 0, None


def _ipv4(data: bytes, off: int) -> Decoded:
    ihl = (data[off] & 0x0F) * 4
    total, frag, proto = struct.unpack_from("!H2xH1xB", data, off + 2)
    src = str(ipaddress.IPv4Address(data[off + 12 : off + 16]))
    dst = str(ipaddress.IPv4Address(data[off + 16 : off + 20]))
    if frag & 0x1FFF:
        return Decoded("IP", src, dst, proto, summary=f"IP {src} > {dst}: ip-proto-{proto} frag")
    end = min(len(data), off + total) if total else len(data)
    return _transport("IP", src, dst, proto, data[off + ihl : end], total - ihl)


def _ipv6(data: bytes, off: int) -> Decoded:
    plen, proto = struct.unpack_from("!HB", data, off + 4)
    src = str(ipaddress.IPv6Address(data[off + 8 : off + 24]))
    dst = str(ipaddress.IPv6Address(data[off + 24 : off + 40]))
    pos, remaining = off + 40, plen
    while proto in _IPV6_EXT:
        size = (data[pos + 1] + 1) * 8
        proto, pos, remaining = data[pos], pos + size, remaining - size
    return _transport("IP6", src, dst, proto, data[pos : pos + remaining], remaining)


def _transport(family: str, src: str, dst: str, proto: int, l4: bytes, l4len: int) -> Decoded:
    d = Decoded(family, src, dst, proto)
    if proto == 6:
        d.sport, d.dport, seq, ack, doff, flags, win = struct.unpack_from("!HHIIBBH", l4)
        letters = "".join(c for bit, c in _TCP_FLAGS if flags & bit) or "none"
        text = f"Flags [{letters}], seq {seq}"
        if flags & 0x10:
            text += f", ack {ack}"
        text += f", win {win}, length {max(0, l4len - (doff >> 4) * 4)}"
        d.summary = f"{family} {src}.{d.sport} > {dst}.{d.dport}: {text}"
    elif proto == 17:
        d.sport, d.dport = struct.unpack_from("!HH", l4)
        d.summary = f"{family} {src}.{d.sport} > {dst}.{d.dport}: UDP, length {l4len - 8}"
    elif proto in (1, 58):
        kind, code = l4[0], l4[1]
        names: dict[int, str] = _ICMP_NAMES if proto == 1 else _ICMP6_NAMES
        word = "ICMP" if proto == 1 else "ICMP6"
        text = f"{word} {names[kind]}" if kind in names else f"{word} type {kind} code {code}"
        if (proto == 1 and kind in (0, 8)) or (proto == 58 and kind in (128, 129)):
            ident, seq = struct.unpack_from("!HH", l4, 4)
            text += f", id {ident}, seq {seq}"
        d.summary = f"{family} {src} > {dst}: {text}, length {l4len}"
    else:
        d.summary = f"{family} {src} > {dst}: ip-proto-{proto}, length {l4len}"
    return d


def _pfsync(data: bytes, length: int, direction: int) -> str:
    """``pfsync Out: sender 1a2b3c4d seq 5 ack 3 INS 2 UPD_C 10, length 180``."""
    try:
        frame = sync_pb2.SyncFrame.FromString(data)
    except DecodeError:
        return f"pfsync [|malformed], length {length}"
    head = f"pfsync {DIRECTION_NAMES.get(direction, '')}".rstrip()
    parts = [f"sender {frame.sender:08x}", f"seq {frame.sequence}", f"ack {frame.ack}"]
    for field, name in _PFSYNC_SECTIONS:
        value = getattr(frame, field)
        if field == "clear" and value:
            parts.append(f"{name} {len(value)}")
        elif field != "clear" and frame.HasField(field):
            count = _rows(value)
            parts.append(name if count is None else f"{name} {count}")
    return f"{head}: {' '.join(parts)}, length {length}"


def _rows(columns: object) -> int | None:
    """Rows of a columns message: the length of its first repeated field (None: not one)."""
    for _, value in columns.ListFields():  # type: ignore[attr-defined]
        if not isinstance(value, (bytes, str, int)) and hasattr(value, "__len__"):
            return len(value)
    return None
