"""Taps: bpf(4) for the node's packet sources (the node side of pfdump and netstat -B).

Every source of frames (a live capture, a replayed file, Inject, pfsync0) hands its
frames to the taps attached to its interface, through one list per interface that the
source holds on to (:meth:`TapHub.interface`). The list is empty while nobody taps, and
the sources test it before doing anything (``if taps:``), so an untapped node pays one
truth test per frame.

A :class:`Tap` is a bounded buffer: :meth:`Tap.put` runs on the node's hot path, counts,
filters and appends; when the buffer is full the frame is dropped and counted (bpf's
``drop``) and the node goes on, whatever the reader does. The gRPC side
(:mod:`pfsync.tap_service`) takes whole buffers and packs them into records.

Filters are a tcpdump-like subset (tap.proto documents the language), compiled once per
tap into a predicate over the frame as the table's decoder sees it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from statetable import decode_frame, keys

# pcap's private link type that pfsync0 frames use (tap.proto says why).
LINKTYPE_USER0 = 147
PFSYNC_IF = "pfsync0"
INJECT_IF = "inject"
DIRECTION_NONE, DIRECTION_IN, DIRECTION_OUT = 0, 1, 2

BUFFER_DEFAULT = 4096
BUFFER_MAX = 1 << 20
SNAPLEN_MAX = 262144

# One record's header in AttachResponse.records (tap.proto, "Frame records").
RECORD = struct.Struct("<qIIHBx")

Match = Callable[[bytes, int], bool]


class FilterError(ValueError):
    """A filter that does not parse; the message is one line."""


# --- the filter language ---------------------------------------------------------------

# A decoded frame for the filter: (proto, src address, src port, dst address, dst port).
_Fields = tuple[int, bytes, int, bytes, int]
_Test = Callable[[_Fields], bool]
_PROTOS = {"tcp": (6,), "udp": (17,), "icmp": (1,), "icmp6": (58,)}
_TOKEN = re.compile(r"\(|\)|&&|\|\||!|[^\s()!]+")


def _fields(frame: bytes, linktype: int) -> _Fields | None:
    pkt = decode_frame(frame, linktype)
    if type(pkt) is not tuple:
        return None
    sa, sp, da, dp = keys.unpack(pkt[1])
    return pkt[0], sa, sp, da, dp


def compile_filter(text: str) -> Match | None:
    """A predicate ``match(frame, linktype)`` for a filter; None for the empty filter."""
    tokens = _TOKEN.findall(text)
    if not tokens:
        return None
    parser = _Parser(tokens)
    test = parser.expr()
    if parser.pos != len(tokens):
        raise FilterError(f"filter: unexpected {tokens[parser.pos]!r}")

    def match(frame: bytes, linktype: int) -> bool:
        fields = _fields(frame, linktype)
        return fields is not None and test(fields)

    return match


class _Parser:
    """Recursive descent: expr = term {or term}; term = factor {[and] factor};
    factor = not factor | ( expr ) | primitive."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str:
        return self.tokens[self.pos].lower() if self.pos < len(self.tokens) else ""

    def take(self, what: str) -> str:
        if self.pos >= len(self.tokens):
            raise FilterError(f"filter: {what} expected at the end")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def expr(self) -> _Test:
        tests = [self.term()]
        while self.peek() in ("or", "||"):
            self.pos += 1
            tests.append(self.term())
        return tests[0] if len(tests) == 1 else lambda f: any(t(f) for t in tests)

    def term(self) -> _Test:
        # As in tcpdump, juxtaposition is "and" too: "tcp port 80" = "tcp and port 80".
        tests = [self.factor()]
        while self.peek() not in ("", "or", "||", ")"):
            if self.peek() in ("and", "&&"):
                self.pos += 1
            tests.append(self.factor())
        return tests[0] if len(tests) == 1 else lambda f: all(t(f) for t in tests)

    def factor(self) -> _Test:
        word = self.peek()
        if word in ("not", "!"):
            self.pos += 1
            inner = self.factor()
            return lambda f: not inner(f)
        if word == "(":
            self.pos += 1
            inner = self.expr()
            if self.take("')'") != ")":
                raise FilterError(f"filter: ')' expected, got {self.tokens[self.pos - 1]!r}")
            return inner
        return self.primitive()

    def primitive(self) -> _Test:
        word = self.take("a primitive").lower()
        if word in _PROTOS:
            protos = _PROTOS[word]
            return lambda f: f[0] in protos
        if word in ("ip", "ip6"):
            size = 4 if word == "ip" else 16
            return lambda f: len(f[1]) == size
        side = ""
        if word in ("src", "dst"):
            side, word = word, self.take("host, net or port").lower()
        if word == "host":
            addr = self._address(self.take("an address"))
            return _sided(side, lambda a: a == addr, 1)
        if word == "net":
            net = self._network(self.take("a network"))
            size = 4 if net.version == 4 else 16
            return _sided(side, lambda a: len(a) == size and ipaddress.ip_address(a) in net, 1)
        if word == "port":
            text = self.take("a port")
            if not (text.isascii() and text.isdigit() and int(text) <= 65535):
                raise FilterError(f"filter: port {text[:20]!r} is not 0..65535")
            port = int(text)
            return _sided(side, lambda p: p == port, 2)
        raise FilterError(f"filter: unknown primitive {word[:20]!r}")

    @staticmethod
    def _address(text: str) -> bytes:
        try:
            return ipaddress.ip_address(text).packed
        except ValueError:
            raise FilterError(f"filter: not an IP address: {text[:64]!r}") from None

    @staticmethod
    def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise FilterError(f"filter: not a network: {text[:64]!r}") from None


def _sided(side: str, test: Callable[[Any], bool], pos: int) -> _Test:
    """``test`` on the source (pos 1/2), destination (3/4) or either side's field."""
    if side == "src":
        return lambda f: test(f[pos])
    if side == "dst":
        return lambda f: test(f[pos + 2])
    return lambda f: test(f[pos]) or test(f[pos + 2])


# --- taps --------------------------------------------------------------------------------


class Tap:
    """One reader's bounded buffer on one interface."""

    __slots__ = (
        "tap_id",
        "interface",
        "filter",
        "match",
        "buffer_frames",
        "snaplen",
        "pid",
        "command",
        "peer",
        "buffer",
        "wake",
        "received",
        "captured",
        "dropped",
        "waiting",
    )

    def __init__(
        self,
        tap_id: int,
        interface: str,
        filter_text: str,
        buffer_frames: int,
        snaplen: int,
        pid: int = 0,
        command: str = "",
        peer: str = "",
    ) -> None:
        self.tap_id = tap_id
        self.interface = interface
        self.filter = filter_text
        self.match = compile_filter(filter_text)
        self.buffer_frames = buffer_frames
        self.snaplen = snaplen
        self.pid = pid
        self.command = command
        self.peer = peer
        # (node clock, linktype, frame, direction), oldest first.
        self.buffer: list[tuple[float, int, bytes, int]] = []
        self.wake = asyncio.Event()
        self.received = self.captured = self.dropped = 0
        self.waiting = False  # the reader waits for frames (bpf's W state)

    def put(self, now: float, linktype: int, frame: bytes, direction: int = 0) -> None:
        """Offer one frame (the hot path: count, filter, append or drop)."""
        self.received += 1
        match = self.match
        if match is not None and not match(frame, linktype):
            return
        self.captured += 1
        buf = self.buffer
        if len(buf) >= self.buffer_frames:
            self.dropped += 1
            return
        if not buf:
            self.wake.set()
        buf.append((now, linktype, frame, direction))

    def take(self, wall_offset: float, max_bytes: int) -> tuple[bytes, int]:
        """Pack buffered frames into records, up to about ``max_bytes``: (records, count)."""
        # Plain and flat: this runs once per frame on the node's loop (bench_tap.py).
        buf, snaplen, pack = self.buffer, self.snaplen, RECORD.pack
        parts: list[bytes] = []
        append = parts.append
        size = n = 0
        for now, linktype, frame, direction in buf:
            length = len(frame)
            if length > snaplen:
                frame = frame[:snaplen]
            append(pack(int((now + wall_offset) * 1e9), length, len(frame), linktype, direction))
            append(frame)
            n += 1
            size += length
            if size >= max_bytes:
                break
        del buf[:n]
        return b"".join(parts), n

    @property
    def flags(self) -> str:
        """netstat -B's flags: state, then P R S H (immediate and see-sent are always on)."""
        return ("W" if self.waiting else "I") + "-RS-"


@dataclass
class TapTotals:
    """Counters of every tap since the node started (net.bpf.stats)."""

    received: int = 0
    captured: int = 0
    dropped: int = 0
    denied: int = 0  # attach/list calls refused (no admin rights)
    attached: int = 0


class TapHub:
    """The node's taps, by interface; the sources hold the per-interface lists."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._interfaces: dict[str, list[Tap]] = {}
        self.taps: dict[int, Tap] = {}
        self._next_id = 1
        self._closed = TapTotals()
        # Called with True when the first pfsync0 tap attaches, False when the last leaves.
        self.on_sync_tapped: Callable[[bool], None] | None = None

    def interface(self, name: str) -> list[Tap]:
        """The list of taps on ``name``, made known if new; a source keeps this list."""
        return self._interfaces.setdefault(name, [])

    def names(self) -> list[str]:
        """Known interfaces, in the order they appeared."""
        return list(self._interfaces)

    def wall_offset(self) -> float:
        """Add to a node clock reading to get wall-clock (epoch) seconds."""
        return time.time() - self.clock()

    def attach(
        self,
        interface: str,
        filter_text: str = "",
        buffer_frames: int = BUFFER_DEFAULT,
        snaplen: int = SNAPLEN_MAX,
        pid: int = 0,
        command: str = "",
        peer: str = "",
    ) -> Tap:
        """A new tap (KeyError for an unknown interface, FilterError for a bad filter)."""
        taps = self._interfaces[interface]
        if interface == PFSYNC_IF and filter_text.strip():
            raise FilterError("filter: pfsync0 frames are not IP; attach without a filter")
        tap = Tap(self._next_id, interface, filter_text, buffer_frames, snaplen, pid, command, peer)
        self._next_id += 1
        self.taps[tap.tap_id] = tap
        taps.append(tap)
        self._closed.attached += 1
        if interface == PFSYNC_IF and len(taps) == 1 and self.on_sync_tapped is not None:
            self.on_sync_tapped(True)
        return tap

    def detach(self, tap: Tap) -> None:
        """Remove a tap; its counters go to the totals."""
        if self.taps.pop(tap.tap_id, None) is None:
            return
        taps = self._interfaces[tap.interface]
        taps.remove(tap)
        closed = self._closed
        closed.received += tap.received
        closed.captured += tap.captured
        closed.dropped += tap.dropped
        if tap.interface == PFSYNC_IF and not taps and self.on_sync_tapped is not None:
            self.on_sync_tapped(False)

    def count_denied(self) -> None:
        """An attach or listing was refused."""
        self._closed.denied += 1

    def totals(self) -> TapTotals:
        """Every tap's counters, the attached ones included."""
        t = self._closed
        live = self.taps.values()
        return TapTotals(
            t.received + sum(x.received for x in live),
            t.captured + sum(x.captured for x in live),
            t.dropped + sum(x.dropped for x in live),
            t.denied,
            t.attached,
        )

    def put_sync_frame(self, frame: bytes, outgoing: bool) -> None:
        """A serialized SyncFrame went to (or came from) a peer: hand it to pfsync0's taps."""
        now = self.clock()
        direction = DIRECTION_OUT if outgoing else DIRECTION_IN
        for tap in self._interfaces.get(PFSYNC_IF, ()):
            tap.put(now, LINKTYPE_USER0, frame, direction)

    # ---- sysctl views ------------------------------------------------------------------

    def stats(self) -> list[tuple[str, int]]:
        """The fields of net.bpf.stats (netstat -s -B)."""
        t = self.totals()
        return [
            ("recv", t.received),
            ("capt", t.captured),
            ("drop", t.dropped),
            ("peers", len(self.taps)),
            ("attached", t.attached),
            ("denied", t.denied),
        ]

    def peers_text(self) -> str:
        """net.bpf.peers: one line per tap, ``key=value`` fields, the filter last.

        ``id=1 pid=4242 comm=pfdump if=lo flags=W-RS- recv=10 drop=0 capt=10
        bufsize=4096 buffered=0 peer=ipv4:127.0.0.1:40000 filter=tcp port 80``
        (values have no spaces, except the filter, which runs to the end of the line).
        """
        lines = []
        for tap in self.taps.values():
            lines.append(
                f"id={tap.tap_id} pid={tap.pid} comm={_word(tap.command) or '-'}"
                f" if={tap.interface} flags={tap.flags} recv={tap.received}"
                f" drop={tap.dropped} capt={tap.captured} bufsize={tap.buffer_frames}"
                f" buffered={len(tap.buffer)} peer={_word(tap.peer) or '-'}"
                f" filter={' '.join(tap.filter.split())}"
            )
        return "\n".join(lines)


def _word(text: str) -> str:
    """``text`` made one printable word (client-supplied names go into a line format)."""
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)[:64]
