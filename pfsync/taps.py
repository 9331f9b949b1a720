"""Taps: bpf(4) for the node's packet sources (the node side of pfdump and netstat -B).

Every source of frames (a live capture, a replayed file, Inject, pfsync0) hands its
frames to the taps attached to its interface, through one list per interface that the
source holds on to (:meth:`TapHub.interface`). The list is empty while nobody taps, and
the sources test it before doing anything (``if taps:``), so an untapped node pays one
truth test per frame.

While tapped, a source adds each frame to a :class:`Batch`: when the node handled it, the
record the source read (time, link type, bytes) and the packet the table's decoder made
of it, three list appends of objects that exist anyway. It hands the batch to every tap
(:meth:`Batch.hand_over`) every `TAP_BATCH` frames and before it next awaits.

A :class:`Tap` is a bounded buffer, like bpf's store buffer: :meth:`Tap.put` counts,
filters and copies a batch into a few flat arrays (times, lengths, link types,
directions, the captured bytes); what does not fit is dropped and counted (bpf's
``drop``) and the node goes on, whatever the reader does. Small batches and flat arrays
keep the node's working set small: frames held as objects until a reader took them kept
megabytes of the node's heap from reuse, and cache misses, not instructions, were most
of what a tap cost (BENCHMARKS.md, taps). The gRPC side (:mod:`pfsync.tap_service`)
sends the arrays as FrameColumns, or packs them into records.

Filters are a tcpdump-like subset (tap.proto documents the language), compiled once per
tap into one Python function over a batch's decoded packets, as bpf compiles its programs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import struct
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, compress

from pfsync.pcap import Record
from statetable.decode import NOT_IP, Packet

# pcap's private link type that pfsync0 frames use (tap.proto says why).
LINKTYPE_USER0 = 147
PFSYNC_IF = "pfsync0"
INJECT_IF = "inject"
DIRECTION_NONE, DIRECTION_IN, DIRECTION_OUT = 0, 1, 2

# Frames a source gathers before it hands them to its taps: few enough that they stay
# in the CPU's cache until the taps copied them (see above).
TAP_BATCH = 256
BUFFER_DEFAULT = 4096
BUFFER_MAX = 1 << 20
SNAPLEN_MAX = 262144

# One record's header in AttachResponse.records (tap.proto, "Frame records").
RECORD = struct.Struct("<qIIHBx")

# FrameColumns' columns as on the wire (tap.proto): node times (float64), lengths,
# captured lengths and link types (uint32), as little-endian arrays; directions, a byte
# each; and the frames' captured bytes, one after the other.
Columns = tuple[bytes, bytes, bytes, bytes, bytes, bytes]

# A compiled filter: select(pkts), does each frame match? (see Batch)
Select = Callable[[list[Packet | int]], list[bool]]


class FilterError(ValueError):
    """A filter that does not parse; the message is one line."""


# --- the filter language ---------------------------------------------------------------

# The filter becomes the source of one function that tests each frame of a batch by the
# packet decode_frame made of it (an int for a frame it made none of): p[0] its protocol,
# p[1] its statetable.keys key: src address, dst address, src port, dst port, so an IPv4
# key is 12 bytes and an IPv6 key 36, and the ports are its last 4 bytes. One
# comprehension costs a sixth of calling a tree of closures per frame, and ports are
# compared byte by byte because a slice makes a new bytes object (BENCHMARKS.md, taps).
# Only the parser's own snippets and repr() of the numbers and bytes it parsed go into
# the source.
_TEMPLATE = """\
def select(pkts):
    return [type(p) is tuple and {} for p in pkts]
"""
_PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58}
_KEY_LEN = {4: 12, 16: 36}  # key length by address length
_TOKEN = re.compile(r"\(|\)|&&|\|\||!|[^\s()!]+")


def compile_filter(text: str) -> Select | None:
    """``select(pkts)``: for each frame (what ``decode_frame`` made of it, as
    :class:`Batch` holds them), does it match the filter? None for the empty filter. A
    frame that is not IP (or too broken to decode) matches no filter, not even
    ``not tcp``."""
    tokens = _TOKEN.findall(text)
    if not tokens:
        return None
    parser = _Parser(tokens)
    namespace: dict[str, Select] = {}
    builtins = {"type": type, "tuple": tuple, "len": len, "int": int}
    try:
        source = parser.expr()
        if parser.pos != len(tokens):
            raise FilterError(f"filter: unexpected {tokens[parser.pos]!r}")
        exec(_TEMPLATE.format(source), {"__builtins__": builtins}, namespace)
    except (RecursionError, SyntaxError):  # the parser's or Python's nesting limit
        raise FilterError("filter: nested too deeply") from None
    return namespace["select"]


class _Parser:
    """Recursive descent: expr = term {or term}; term = factor {[and] factor};
    factor = not factor | ( expr ) | primitive. Each method returns Python source."""

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

    def expr(self) -> str:
        tests = [self.term()]
        while self.peek() in ("or", "||"):
            self.pos += 1
            tests.append(self.term())
        return tests[0] if len(tests) == 1 else "(" + " or ".join(tests) + ")"

    def term(self) -> str:
        # As in tcpdump, juxtaposition is "and" too: "tcp port 80" = "tcp and port 80".
        tests = [self.factor()]
        while self.peek() not in ("", "or", "||", ")"):
            if self.peek() in ("and", "&&"):
                self.pos += 1
            tests.append(self.factor())
        return tests[0] if len(tests) == 1 else "(" + " and ".join(tests) + ")"

    def factor(self) -> str:
        word = self.peek()
        if word in ("not", "!"):
            self.pos += 1
            return f"(not {self.factor()})"
        if word == "(":
            self.pos += 1
            inner = self.expr()
            if self.take("')'") != ")":
                raise FilterError(f"filter: ')' expected, got {self.tokens[self.pos - 1]!r}")
            return inner
        return self.primitive()

    def primitive(self) -> str:
        word = self.take("a primitive").lower()
        if word in _PROTOS:
            return f"p[0] == {_PROTOS[word]}"
        if word in ("ip", "ip6"):
            return f"len(p[1]) == {_KEY_LEN[4 if word == 'ip' else 16]}"
        side = ""
        if word in ("src", "dst"):
            side, word = word, self.take("host, net or port").lower()
        if word == "host":
            addr = self._address(self.take("an address"))
            return _either(side, lambda a: f"{a} == {addr!r}", len(addr))
        if word == "net":
            net = self._network(self.take("a network"))
            mask, base = int(net.netmask), int(net.network_address)
            size = net.max_prefixlen // 8
            return _either(side, lambda a: f"int.from_bytes({a}, 'big') & {mask} == {base}", size)
        if word == "port":
            text = self.take("a port")
            if not (text.isascii() and text.isdigit() and int(text) <= 65535):
                raise FilterError(f"filter: port {text[:20]!r} is not 0..65535")
            hi, lo = divmod(int(text), 256)
            tests = {
                "src": f"(p[1][-4] == {hi} and p[1][-3] == {lo})",
                "dst": f"(p[1][-2] == {hi} and p[1][-1] == {lo})",
            }
            return tests[side] if side else f"({tests['src']} or {tests['dst']})"
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


def _either(side: str, test: Callable[[str], str], size: int) -> str:
    """``test`` of the source address, the destination address (``side``) or either, on
    keys of the family whose addresses are ``size`` bytes."""
    src, dst = f"p[1][:{size}]", f"p[1][{size}:{2 * size}]"
    if side:
        tested = test(src if side == "src" else dst)
    else:
        tested = f"({test(src)} or {test(dst)})"
    return f"(len(p[1]) == {_KEY_LEN[size]} and {tested})"


# --- taps --------------------------------------------------------------------------------


class Batch:
    """Frames an interface handled, oldest first, for its taps: one list per field.

    A source keeps one batch and the lists' ``append`` methods (see :meth:`add` for
    what goes in); :meth:`hand_over` empties the lists in place.
    """

    __slots__ = ("times", "records", "pkts", "direction")

    def __init__(self, direction: int = DIRECTION_NONE) -> None:
        self.times: list[float] = []  # node clock when the frame was handled
        self.records: list[Record] = []  # as the source read it: time, link type, bytes
        self.pkts: list[Packet | int] = []  # what decode_frame made of it, for filters
        self.direction = direction  # of every frame in the batch

    def add(self, now: float, record: Record, pkt: Packet | int) -> None:
        """Add one frame and what ``decode_frame`` made of it (the hot loops inline this)."""
        self.times.append(now)
        self.records.append(record)
        self.pkts.append(pkt)

    def hand_over(self, taps: list[Tap]) -> None:
        """Give the frames to each of ``taps``, then empty the batch."""
        for tap in taps:
            tap.put(self)
        self.times.clear()
        self.records.clear()
        self.pkts.clear()


class Tap:
    """One reader's bounded buffer on one interface."""

    __slots__ = (
        "tap_id",
        "interface",
        "filter",
        "select",
        "buffer_frames",
        "snaplen",
        "pid",
        "command",
        "peer",
        "chunks",
        "buffered",
        "buffered_bytes",
        "wake",
        "received",
        "captured",
        "dropped",
        "waiting",
        "since",
    )

    def __init__(
        self,
        tap_id: int,
        interface: str,
        filter_text: str,
        buffer_frames: int,
        snaplen: int,
        since: float,
        pid: int = 0,
        command: str = "",
        peer: str = "",
    ) -> None:
        self.tap_id = tap_id
        self.interface = interface
        self.filter = filter_text
        self.select = compile_filter(filter_text)
        self.buffer_frames = buffer_frames
        self.snaplen = snaplen
        self.pid = pid
        self.command = command
        self.peer = peer
        # The buffer, oldest first: a Columns chunk per put, joined when a reader takes
        # them (a growing array was copied at each of its reallocations).
        self.chunks: deque[Columns] = deque()
        self.buffered = 0  # frames in the buffer
        self.buffered_bytes = 0  # their captured bytes
        self.wake = asyncio.Event()
        self.received = self.captured = self.dropped = 0
        self.waiting = False  # the reader waits for frames (bpf's W state)
        self.since = since  # node clock at attach: older frames of a batch are not ours

    def put(self, batch: Batch) -> None:
        """Offer a batch: count, filter, buffer what fits, count the rest as dropped."""
        times, records = batch.times, batch.records
        if times and times[0] < self.since:  # attached in the middle of this batch
            cut = bisect_left(times, self.since)
            times, records = times[cut:], records[cut:]
            pkts = batch.pkts[cut:]
        else:
            pkts = batch.pkts
        self.received += len(records)
        if self.select is not None:
            keep = self.select(pkts)
            times, records = list(compress(times, keep)), list(compress(records, keep))
        n = len(records)
        self.captured += n
        room = self.buffer_frames - self.buffered
        if n > room:
            self.dropped += n - room
            n = room
            times, records = times[:n], records[:n]
        if not n:
            return
        if not self.buffered:
            self.wake.set()
        _, linktypes, frames = zip(*records, strict=True)
        sizes = list(map(len, frames))
        lengths = caplens = struct.pack(f"<{n}I", *sizes)
        if max(sizes) > self.snaplen:  # bpf keeps snaplen bytes at capture
            snaplen = self.snaplen
            frames = tuple(frame[:snaplen] for frame in frames)
            caplens = struct.pack(f"<{n}I", *map(len, frames))
        data = b"".join(frames)
        self.chunks.append(
            (
                struct.pack(f"<{n}d", *times),
                lengths,
                caplens,
                struct.pack(f"<{n}I", *linktypes),
                bytes((batch.direction,)) * n,
                data,
            )
        )
        self.buffered += n
        self.buffered_bytes += len(data)

    def take_columns(self, max_bytes: int) -> Columns:
        """The oldest buffered frames as tap.proto's FrameColumns columns (see `Columns`),
        up to the frame whose captured bytes reach ``max_bytes``; removed from the
        buffer. Whole chunks are joined; only the last one taken may be split, so a long
        backlog is not copied for each message."""
        # A header alone is RECORD.size bytes, so no more frames go than that many
        # headers would fill.
        limit = max(1, max_bytes // RECORD.size)
        taken: list[Columns] = []
        n = size = 0
        while self.chunks and n < limit and size < max_bytes:
            chunk = self.chunks.popleft()
            taken.append(chunk)
            n, size = n + len(chunk[4]), size + len(chunk[5])
        if n > limit or size > max_bytes:  # the last chunk goes in part
            last = taken.pop()
            n, size = n - len(last[4]), size - len(last[5])
            room = min(len(last[4]), limit - n)
            ends = list(accumulate(struct.unpack(f"<{room}I", last[2][: 4 * room])))
            m = min(bisect_left(ends, max_bytes - size) + 1, room)
            cut = ends[m - 1]
            times, lengths, caplens, linktypes, directions, data = last
            taken.append(
                (
                    times[: 8 * m],
                    lengths[: 4 * m],
                    caplens[: 4 * m],
                    linktypes[: 4 * m],
                    directions[:m],
                    data[:cut],
                )
            )
            rest = (times[8 * m :], lengths[4 * m :], caplens[4 * m :], linktypes[4 * m :])
            self.chunks.appendleft((*rest, directions[m:], data[cut:]))
            n, size = n + m, size + cut
        self.buffered -= n
        self.buffered_bytes -= size
        if not taken:
            return b"", b"", b"", b"", b"", b""
        times, lengths, caplens, linktypes, directions, data = (
            b"".join(column) for column in zip(*taken, strict=True)
        )
        return times, lengths, caplens, linktypes, directions, data

    def take(self, wall_offset: float, max_bytes: int) -> tuple[bytes, int]:
        """Pack buffered frames into records, up to about ``max_bytes``: (records, count)."""
        times, lengths, caplens, linktypes, directions, data = self.take_columns(max_bytes)
        n = len(directions)
        columns = zip(
            struct.unpack(f"<{n}d", times),
            struct.unpack(f"<{n}I", lengths),
            struct.unpack(f"<{n}I", caplens),
            struct.unpack(f"<{n}I", linktypes),
            directions,
            strict=True,
        )
        # Plain and flat: this runs once per frame on the node's loop. It beat packing
        # whole columns with map(RECORD.pack, ...) (BENCHMARKS.md, taps).
        pack, pos = RECORD.pack, 0
        parts: list[bytes] = []
        append = parts.append
        for now, length, caplen, linktype, direction in columns:
            append(pack(int((now + wall_offset) * 1e9), length, caplen, linktype, direction))
            append(data[pos : pos + caplen])
            pos += caplen
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
        self.closing = False  # the node stops: every tap's stream ends

    def close(self) -> None:
        """The node stops: wake every tap's reader, whose stream then ends (a stream the
        server cancelled instead makes grpc print a traceback)."""
        self.closing = True
        for tap in self.taps.values():
            tap.wake.set()

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
        tap = Tap(
            self._next_id,
            interface,
            filter_text,
            buffer_frames,
            snaplen,
            self.clock(),
            pid,
            command,
            peer,
        )
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
        batch = Batch(DIRECTION_OUT if outgoing else DIRECTION_IN)
        now = self.clock()
        batch.add(now, (now, LINKTYPE_USER0, frame), NOT_IP)
        batch.hand_over(self._interfaces.get(PFSYNC_IF, []))

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
                f" buffered={tap.buffered} peer={_word(tap.peer) or '-'}"
                f" filter={' '.join(tap.filter.split())}"
            )
        return "\n".join(lines)


def _word(text: str) -> str:
    """``text`` made one printable word (client-supplied names go into a line format)."""
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)[:64]
