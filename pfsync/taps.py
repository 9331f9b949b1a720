"""Taps: bpf(4) for the node's packet sources (the node side of pfdump and netstat -B).

Every source of frames (a live capture, a replayed file, Inject, pfsync0) hands its
frames to the taps attached to its interface, through one list per interface that the
source holds on to (:meth:`TapHub.interface`). The list is empty while nobody taps, and
the sources test it before doing anything (``if taps:``), so an untapped node pays one
truth test per frame.

While tapped, a source adds each frame, with the protocol and key the table's decoder
found in it, to a :class:`Batch`, and hands the batch to every tap
(:meth:`Batch.hand_over`) before it next awaits: once per replay batch, capture wake-up
or Inject call. A batch and a tap's buffer hold their frames as columns, one list per
field: the node's hot path pays a few list appends per frame, and the lists hold only
floats, ints and bytes, which the garbage collector does not track (keeping a tuple per
frame made it run every few hundred frames and walk the whole heap now and then:
BENCHMARKS.md, taps).

A :class:`Tap` is a bounded buffer: :meth:`Tap.put` counts, filters and appends a
batch; what does not fit is dropped and counted (bpf's ``drop``) and the node goes on,
whatever the reader does. The gRPC side (:mod:`pfsync.tap_service`) takes buffered
frames and packs them into records.

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
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, compress, islice, repeat

from statetable.decode import NOT_IP, Packet

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

# A compiled filter: select(protos, keys), does each frame match? (see Batch)
Select = Callable[[list[int], list[bytes | None]], list[bool]]


class FilterError(ValueError):
    """A filter that does not parse; the message is one line."""


# --- the filter language ---------------------------------------------------------------

# The filter becomes the source of one function that tests each frame of a batch by its
# protocol and statetable.keys key: src address, dst address, src port, dst port, so an
# IPv4 key is 12 bytes and an IPv6 key 36, and the ports are its last 4 bytes; None for a
# frame the decoder did not make a packet of. One comprehension costs a sixth of calling
# a tree of closures per frame, and ports are compared byte by byte because a slice makes
# a new bytes object (BENCHMARKS.md, taps). Only the parser's own snippets and repr() of
# the numbers and bytes it parsed go into the source.
_TEMPLATE = """\
def select(protos, keys):
    return [key is not None and {} for proto, key in zip(protos, keys)]
"""
_PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58}
_KEY_LEN = {4: 12, 16: 36}  # key length by address length
_TOKEN = re.compile(r"\(|\)|&&|\|\||!|[^\s()!]+")


def compile_filter(text: str) -> Select | None:
    """``select(protos, keys)``: for each frame (its protocol and key, as :class:`Batch`
    holds them), does it match the filter? None for the empty filter. A frame that is not
    IP (or too broken to decode) matches no filter, not even ``not tcp``."""
    tokens = _TOKEN.findall(text)
    if not tokens:
        return None
    parser = _Parser(tokens)
    namespace: dict[str, Select] = {}
    builtins = {"zip": zip, "len": len, "int": int}
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
            return f"proto == {_PROTOS[word]}"
        if word in ("ip", "ip6"):
            return f"len(key) == {_KEY_LEN[4 if word == 'ip' else 16]}"
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
                "src": f"(key[-4] == {hi} and key[-3] == {lo})",
                "dst": f"(key[-2] == {hi} and key[-1] == {lo})",
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
    src, dst = f"key[:{size}]", f"key[{size}:{2 * size}]"
    if side:
        tested = test(src if side == "src" else dst)
    else:
        tested = f"({test(src)} or {test(dst)})"
    return f"(len(key) == {_KEY_LEN[size]} and {tested})"


# --- taps --------------------------------------------------------------------------------


class Batch:
    """Frames an interface handled, oldest first, for its taps: one list per field.

    A source keeps one batch and the lists' ``append`` methods (see :meth:`add` for
    what goes in); :meth:`hand_over` empties the lists in place.
    """

    __slots__ = ("times", "linktypes", "frames", "protos", "keys", "direction")

    def __init__(self, direction: int = DIRECTION_NONE) -> None:
        self.times: list[float] = []  # node clock when the frame was handled
        self.linktypes: list[int] = []
        self.frames: list[bytes] = []
        # For filters, from decode_frame's packet: its protocol and key; 0 and None for a
        # frame that is not IP or too broken to decode.
        self.protos: list[int] = []
        self.keys: list[bytes | None] = []
        self.direction = direction  # of every frame in the batch

    def add(self, now: float, linktype: int, frame: bytes, pkt: Packet | int) -> None:
        """Add one frame and what ``decode_frame`` made of it (the hot loops inline this)."""
        self.times.append(now)
        self.linktypes.append(linktype)
        self.frames.append(frame)
        if type(pkt) is tuple:
            self.protos.append(pkt[0])
            self.keys.append(pkt[1])
        else:
            self.protos.append(0)
            self.keys.append(None)

    def hand_over(self, taps: list[Tap]) -> None:
        """Give the frames to each of ``taps``, then empty the batch."""
        for tap in taps:
            tap.put(self)
        self.times.clear()
        self.linktypes.clear()
        self.frames.clear()
        self.protos.clear()
        self.keys.clear()


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
        "times",
        "linktypes",
        "frames",
        "directions",
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
        # The buffer, oldest first, as Batch's columns (with a direction per frame).
        self.times: list[float] = []
        self.linktypes: list[int] = []
        self.frames: list[bytes] = []
        self.directions: list[int] = []
        self.wake = asyncio.Event()
        self.received = self.captured = self.dropped = 0
        self.waiting = False  # the reader waits for frames (bpf's W state)
        self.since = since  # node clock at attach: older frames of a batch are not ours

    def put(self, batch: Batch) -> None:
        """Offer a batch: count, filter, buffer what fits, count the rest as dropped."""
        times, linktypes, frames = batch.times, batch.linktypes, batch.frames
        protos, keys = batch.protos, batch.keys
        if times and times[0] < self.since:  # attached in the middle of this batch
            cut = bisect_left(times, self.since)
            times, linktypes, frames = times[cut:], linktypes[cut:], frames[cut:]
            protos, keys = protos[cut:], keys[cut:]
        self.received += len(frames)
        if self.select is not None:
            keep = self.select(protos, keys)
            times = list(compress(times, keep))
            linktypes = list(compress(linktypes, keep))
            frames = list(compress(frames, keep))
        n = len(frames)
        self.captured += n
        room = self.buffer_frames - len(self.frames)
        if n > room:
            self.dropped += n - room
            n = room
            times, linktypes, frames = times[:n], linktypes[:n], frames[:n]
        if n:
            if not self.frames:
                self.wake.set()
            self.times += times
            self.linktypes += linktypes
            self.frames += frames
            self.directions += repeat(batch.direction, n)

    def _take(self, max_bytes: int) -> tuple[list[float], list[int], list[bytes], list[int]]:
        """The oldest buffered frames, up to about ``max_bytes``, as columns: times,
        linktypes, frames (whole), directions; removed from the buffer."""
        # Up to the frame that reaches max_bytes; a header alone is RECORD.size bytes, so
        # no more frames are looked at than that many headers would fill.
        ends = list(accumulate(map(len, islice(self.frames, max_bytes // RECORD.size))))
        n = min(bisect_left(ends, max_bytes) + 1, len(ends))
        taken = self.times[:n], self.linktypes[:n], self.frames[:n], self.directions[:n]
        del self.times[:n], self.linktypes[:n], self.frames[:n], self.directions[:n]
        return taken

    def take_columns(
        self, max_bytes: int
    ) -> tuple[list[float], list[int], list[int], list[int], list[int], bytes]:
        """Buffered frames as tap.proto's FrameColumns: node times, lengths, captured
        lengths, linktypes, directions and the captured bytes joined. Only C loops
        (map, join) touch each frame: no header to pack."""
        times, linktypes, frames, directions = self._take(max_bytes)
        lengths = list(map(len, frames))
        caplens = lengths
        if lengths and max(lengths) > self.snaplen:
            snaplen = self.snaplen
            frames = [frame[:snaplen] for frame in frames]
            caplens = list(map(len, frames))
        return times, lengths, caplens, linktypes, directions, b"".join(frames)

    def take(self, wall_offset: float, max_bytes: int) -> tuple[bytes, int]:
        """Pack buffered frames into records, up to about ``max_bytes``: (records, count)."""
        times, linktypes, frames, directions = self._take(max_bytes)
        # Plain and flat: this runs once per frame on the node's loop. It beat packing
        # whole columns with map(RECORD.pack, ...) (BENCHMARKS.md, taps).
        snaplen, pack = self.snaplen, RECORD.pack
        parts: list[bytes] = []
        append = parts.append
        columns = zip(times, linktypes, frames, directions, strict=True)
        for now, linktype, frame, direction in columns:
            length = len(frame)
            if length > snaplen:
                frame = frame[:snaplen]
            append(pack(int((now + wall_offset) * 1e9), length, len(frame), linktype, direction))
            append(frame)
        return b"".join(parts), len(frames)

    @property
    def buffered(self) -> int:
        """Frames waiting in the buffer."""
        return len(self.frames)

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
        batch.add(self.clock(), LINKTYPE_USER0, frame, NOT_IP)
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
