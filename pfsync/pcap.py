"""Capture-file I/O: read classic pcap and pcapng, write either.

`read_capture` is a packet source for replay, so its record loops are the hot path of
`pfsyncd --pcap`: the file is read a megabyte at a time with plain ``read`` calls and each
record costs one precompiled `struct.Struct.unpack_from`, one slice and the yielded tuple
(measured >1.2M records/s for small packets). Everything else (headers, options, block
bookkeeping, a record that straddles two chunks) is written for the reader.

The file is deliberately not mmapped: a mapped file that is truncated while it is read
(``cp`` over it, log rotation) kills the process with SIGBUS. With ``read`` a file that
shrinks ends the replay with a `CaptureError`; one that grows is read to its new end.

Every defect in a file raises `CaptureError` with a one-line message naming the file and the
byte offset of the header or block that is wrong, so a user can look at it with a hex dump.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, BinaryIO, Self

# pcap LINKTYPE_ETHERNET; not imported from statetable, so tools may use this module alone.
LINKTYPE_ETHERNET = 1

# A record claiming more than this is corruption, not a packet (Linux GSO frames stay < 64 KiB).
MAX_CAPLEN = 256 * 1024
# A pcapng block longer than this is corruption too (it would have to be held in memory whole).
MAX_BLOCK = 16 * 1024 * 1024
# Bytes read from the file at a time: large enough that the read calls cost nothing per record.
READ_CHUNK = 1024 * 1024

_PCAP_MAGIC_US = 0xA1B2C3D4
_PCAP_MAGIC_NS = 0xA1B23C4D
_PCAP_FILE_HEADER = "IHHiIII"  # magic, major, minor, thiszone, sigfigs, snaplen, network

_PCAPNG_SHB = 0x0A0D0D0A  # a palindrome, so it reads the same in either byte order
_PCAPNG_BOM = 0x1A2B3C4D
_PCAPNG_IDB = 0x00000001
_PCAPNG_PB = 0x00000002  # obsolete Packet Block
_PCAPNG_SPB = 0x00000003
_PCAPNG_EPB = 0x00000006
_OPT_ENDOFOPT = 0
_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14

Record = tuple[float, int, bytes]
_Unpack = Callable[..., tuple[Any, ...]]


class CaptureError(Exception):
    """A capture file is missing, empty or corrupt; the message names the file and byte offset."""

    def __init__(self, path: str, what: str, offset: int | None = None) -> None:
        where = "" if offset is None else f" at byte offset {offset}"
        super().__init__(f"{path}: {what}{where}")
        self.path = path
        self.what = what
        self.offset = offset


class _Source:
    """The open capture file, read a chunk at a time.

    The record loops work on one ``bytes`` chunk and positions within it; ``base`` is the
    file offset of the chunk's first byte, so errors raised with chunk positions are turned
    into file offsets by `rebase`.
    """

    __slots__ = ("base", "file", "name", "read", "shrank", "size")

    def __init__(self, name: str, file: BinaryIO) -> None:
        self.name = name
        self.file = file
        info = os.fstat(file.fileno())
        # Only a regular file has a size to compare with (pipes and devices just end).
        self.size: int | None = info.st_size if stat.S_ISREG(info.st_mode) else None
        self.base = 0
        self.read = 0  # bytes read so far
        self.shrank = False

    def refill(self, buf: bytes, pos: int, need: int) -> bytes:
        """``buf[pos:]`` followed by more of the file, until it holds ``need`` bytes or the
        file ends; the result's first byte is at file offset ``base``."""
        self.base += pos
        parts = [buf[pos:]]
        have = len(buf) - pos
        while have < need:
            try:
                more = self.file.read(max(READ_CHUNK, need - have))
            except OSError as exc:
                raise CaptureError(self.name, exc.strerror or str(exc), self.read) from None
            if not more:
                # Shorter than when it was opened: truncated under us (cp, log rotation).
                self.shrank = self.size is not None and self.read < self.size
                break
            parts.append(more)
            have += len(more)
            self.read += len(more)
        return b"".join(parts)

    def rebase(self, exc: CaptureError) -> CaptureError:
        """The same error at a file offset (or, if the file shrank, saying so)."""
        offset = None if exc.offset is None else self.base + exc.offset
        if self.shrank:
            what = f"file shrank to {self.read} bytes while being read (it had {self.size})"
            return CaptureError(self.name, what, offset)
        return CaptureError(self.name, exc.what, offset)

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def read_capture(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Yield ``(timestamp_seconds, linktype, frame_bytes)`` for each packet of a pcap/pcapng file.

    The file format is detected from its first four bytes. Missing, empty and malformed files
    raise `CaptureError` here; corruption further in raises it while iterating.
    """
    name = os.fspath(path)
    try:
        src = _Source(name, open(name, "rb", buffering=0))
    except OSError as e:
        raise CaptureError(name, e.strerror or str(e)) from None
    try:
        # The first read holds at least the file header (24 bytes) or first SHB (28).
        return _records(name, src, src.refill(b"", 0, max(READ_CHUNK, 28)))
    except CaptureError:
        src.close()
        raise


def _records(name: str, src: _Source, buf: bytes) -> Iterator[Record]:
    """Pick the format by its magic number and return the matching record loop."""
    if not buf:
        raise CaptureError(name, "empty file", 0)
    if len(buf) < 4:
        raise CaptureError(name, "file too short for a capture header", 0)
    first = buf[:4]
    if first == _PCAPNG_SHB.to_bytes(4, "little"):
        return _pcapng_loop(name, src, buf, _section_at(name, buf, 0))
    for order in "<>":
        magic = struct.unpack(order + "I", first)[0]
        if magic in (_PCAP_MAGIC_US, _PCAP_MAGIC_NS):
            return _pcap_records(name, src, buf, order, magic == _PCAP_MAGIC_NS)
    raise CaptureError(name, f"not a pcap or pcapng file (magic 0x{first.hex()})", 0)


# --- classic pcap -------------------------------------------------------------------------------


def _pcap_records(name: str, src: _Source, buf: bytes, order: str, nanos: bool) -> Iterator[Record]:
    """Check the 24-byte file header, then return the record loop."""
    header = struct.Struct(order + _PCAP_FILE_HEADER)
    if len(buf) < header.size:
        raise CaptureError(name, "truncated pcap file header", 0)
    linktype = header.unpack_from(buf, 0)[6] & 0xFFFF  # the upper bits carry FCS information
    record = struct.Struct(order + "IIII")
    return _pcap_loop(name, src, buf, record, 1e9 if nanos else 1e6, linktype)


def _pcap_loop(
    name: str, src: _Source, buf: bytes, record: struct.Struct, ticks: float, linktype: int
) -> Iterator[Record]:
    # Hot path: locals only, and no bounds check before unpack_from: its struct.error at the end
    # of a chunk (free in 3.11 until raised, once per chunk) and the caplen check that every
    # record needs anyway are where we leave the inner loop to read more of the file.
    unpack = record.unpack_from
    end = len(buf)
    pos = 24
    caplen = 0
    try:
        while True:
            try:
                while True:
                    sec, frac, caplen, _origlen = unpack(buf, pos)
                    data = pos + 16
                    stop = data + caplen
                    if stop > end or caplen > MAX_CAPLEN:
                        break
                    yield sec + frac / ticks, linktype, buf[data:stop]
                    pos = stop
                need = 16 + caplen  # a record that runs past the chunk
            except struct.error:
                need = 16  # a record header that runs past the chunk
            if caplen > MAX_CAPLEN:
                raise _bad_caplen(name, caplen, pos)
            buf = src.refill(buf, pos, need)
            pos, end = 0, len(buf)
            if end < need:
                if not end and not src.shrank:
                    return
                if need == 16:
                    raise CaptureError(name, "truncated record header", 0)
                raise _bad_caplen(name, caplen, 0)
    except CaptureError as exc:
        raise src.rebase(exc) from None
    finally:
        src.close()


def _bad_caplen(name: str, caplen: int, offset: int) -> CaptureError:
    if caplen > MAX_CAPLEN:
        return CaptureError(name, f"absurd captured length {caplen}", offset)
    return CaptureError(name, f"captured length {caplen} runs past the end of the file", offset)


# --- pcapng -------------------------------------------------------------------------------------


class _Interface:
    """What an Interface Description Block says about the packets that reference it."""

    __slots__ = ("divisor", "linktype", "offset", "snaplen")

    def __init__(self, linktype: int, snaplen: int, divisor: float, offset: int) -> None:
        self.linktype = linktype
        self.snaplen = snaplen
        self.divisor = divisor  # timestamp ticks per second
        self.offset = offset  # if_tsoffset, seconds


class _Section:
    """Byte-order-specific decoders for one section (each SHB may switch byte order)."""

    def __init__(self, order: str) -> None:
        self.block_head = struct.Struct(order + "II")
        self.u32 = struct.Struct(order + "I")
        self.idb = struct.Struct(order + "HHI")
        self.epb = struct.Struct(order + "IIIII")  # interface, ts high, ts low, caplen, origlen
        # obsolete Packet Block: interface, drops, ts high, ts low, caplen, origlen
        self.pb = struct.Struct(order + "HHIIII")
        self.option = struct.Struct(order + "HH")
        self.tsoffset = struct.Struct(order + "q")
        self.interfaces: list[_Interface] = []

    def hot_decoders(self) -> tuple[_Unpack, _Unpack, _Unpack, list[_Interface]]:
        """The bound decoders and interface list that the block loop keeps in locals."""
        return (
            self.block_head.unpack_from,
            self.u32.unpack_from,
            self.epb.unpack_from,
            self.interfaces,
        )


def _pcapng_loop(name: str, src: _Source, buf: bytes, section: _Section) -> Iterator[Record]:
    # Hot path: Enhanced Packet Blocks are nearly every block of a capture, so their checks are
    # inlined with the section's decoders held in locals; when a check fails, the matching helper
    # is called only to build the precise error. Rarer blocks go through the helpers directly.
    # A block that runs past the chunk is completed by reading more (blocks are held whole).
    end = len(buf)
    pos = 0
    last_ts = 0.0  # Simple Packet Blocks have no timestamp: they get the previous packet's
    head, u32, epb, interfaces = section.hot_decoders()
    try:
        while True:
            if end - pos < 12:
                buf = src.refill(buf, pos, 12)
                pos, end = 0, len(buf)
                if not end:
                    if src.shrank:
                        raise CaptureError(name, "file shrank", 0)
                    return
                if end < 12:
                    raise CaptureError(name, "truncated block header", 0)
            btype, length = head(buf, pos)
            if btype == _PCAPNG_SHB and (pos or src.base):
                if end - pos < 28:
                    buf = src.refill(buf, pos, 28)
                    pos, end = 0, len(buf)
                section = _section_at(name, buf, pos)
                head, u32, epb, interfaces = section.hot_decoders()
                length = head(buf, pos)[1]
            block_end = pos + length
            if length < 12 or length % 4 or block_end > end or u32(buf, block_end - 4)[0] != length:
                if block_end > end and length <= MAX_BLOCK:  # runs past the chunk: read more
                    buf = src.refill(buf, pos, length)
                    pos, end, block_end = 0, len(buf), length
                _check_block(name, buf, section, pos, length)
            if btype == _PCAPNG_SHB:
                _need(name, length, 28, "section header block", pos)
            elif btype == _PCAPNG_EPB:
                if length < 32:
                    _need(name, length, 32, "enhanced packet block", pos)
                index, ts_high, ts_low, caplen, _origlen = epb(buf, pos + 8)
                data = pos + 28
                if index >= len(interfaces) or caplen > MAX_CAPLEN or data + caplen > block_end - 4:
                    _epb(name, buf, section, pos, length)
                iface = interfaces[index]
                last_ts = ((ts_high << 32) | ts_low) / iface.divisor + iface.offset
                yield last_ts, iface.linktype, buf[data : data + caplen]
            elif btype == _PCAPNG_SPB:
                yield _spb(name, buf, section, pos, length, last_ts)
            elif btype == _PCAPNG_IDB:
                interfaces.append(_idb(name, buf, section, pos, length))
            elif btype == _PCAPNG_PB:
                record = _pb(name, buf, section, pos, length)
                last_ts = record[0]
                yield record
            pos = block_end
    except CaptureError as exc:
        raise src.rebase(exc) from None
    finally:
        src.close()


def _section_at(name: str, buf: bytes, pos: int) -> _Section:
    """Read a Section Header Block's byte-order magic and version; return fresh section state."""
    if len(buf) - pos < 28:
        raise CaptureError(name, "truncated section header block", pos)
    bom = buf[pos + 8 : pos + 12]
    for order in "<>":
        if struct.unpack(order + "I", bom)[0] == _PCAPNG_BOM:
            section = _Section(order)
            break
    else:
        raise CaptureError(name, f"bad pcapng byte-order magic 0x{bom.hex()}", pos + 8)
    major = struct.unpack_from(order + "H", buf, pos + 12)[0]
    if major != 1:
        raise CaptureError(name, f"unsupported pcapng version {major}", pos + 12)
    return section


def _check_block(name: str, buf: bytes, section: _Section, pos: int, length: int) -> None:
    if length < 12 or length % 4:
        raise CaptureError(name, f"bad block length {length}", pos)
    if length > MAX_BLOCK:
        raise CaptureError(name, f"absurd block length {length}", pos)
    if pos + length > len(buf):
        raise CaptureError(name, f"block length {length} runs past the end of the file", pos)
    trailer = section.u32.unpack_from(buf, pos + length - 4)[0]
    if trailer != length:
        raise CaptureError(
            name, f"block length {length} does not match trailing length {trailer}", pos
        )


def _need(name: str, length: int, minimum: int, what: str, pos: int) -> None:
    if length < minimum:
        raise CaptureError(name, f"{what} too short ({length} bytes)", pos)


def _idb(name: str, buf: bytes, section: _Section, pos: int, length: int) -> _Interface:
    _need(name, length, 20, "interface description block", pos)
    linktype, _reserved, snaplen = section.idb.unpack_from(buf, pos + 8)
    iface = _Interface(linktype, snaplen, 1e6, 0)
    for code, value_pos, value_len in _options(name, buf, section, pos + 16, pos + length - 4):
        if code == _OPT_IF_TSRESOL and value_len >= 1:
            resol = buf[value_pos]
            # MSB clear: 10^-n seconds; MSB set: 2^-n seconds
            iface.divisor = 2.0 ** (resol & 0x7F) if resol & 0x80 else 10.0**resol
        elif code == _OPT_IF_TSOFFSET and value_len >= 8:
            iface.offset = section.tsoffset.unpack_from(buf, value_pos)[0]
    return iface


def _options(
    name: str, buf: bytes, section: _Section, pos: int, end: int
) -> Iterator[tuple[int, int, int]]:
    """Yield ``(code, value_offset, value_length)`` for the options between pos and end."""
    while pos + 4 <= end:
        code, value_len = section.option.unpack_from(buf, pos)
        if code == _OPT_ENDOFOPT:
            return
        if pos + 4 + value_len > end:
            raise CaptureError(name, f"option {code} runs past the end of its block", pos)
        yield code, pos + 4, value_len
        pos += 4 + (value_len + 3) // 4 * 4


def _interface(name: str, section: _Section, index: int, pos: int) -> _Interface:
    if index >= len(section.interfaces):
        raise CaptureError(name, f"packet references unknown interface {index}", pos)
    return section.interfaces[index]


def _packet_data(name: str, buf: bytes, pos: int, data: int, caplen: int, block_end: int) -> bytes:
    if caplen > MAX_CAPLEN:
        raise CaptureError(name, f"absurd captured length {caplen}", pos)
    if data + caplen > block_end:
        raise CaptureError(name, f"captured length {caplen} runs past the end of its block", pos)
    return buf[data : data + caplen]


def _epb(name: str, buf: bytes, section: _Section, pos: int, length: int) -> Record:
    _need(name, length, 32, "enhanced packet block", pos)
    index, ts_high, ts_low, caplen, _origlen = section.epb.unpack_from(buf, pos + 8)
    iface = _interface(name, section, index, pos)
    frame = _packet_data(name, buf, pos, pos + 28, caplen, pos + length - 4)
    return ((ts_high << 32) | ts_low) / iface.divisor + iface.offset, iface.linktype, frame


def _pb(name: str, buf: bytes, section: _Section, pos: int, length: int) -> Record:
    _need(name, length, 32, "packet block", pos)
    index, _drops, ts_high, ts_low, caplen, _origlen = section.pb.unpack_from(buf, pos + 8)
    iface = _interface(name, section, index, pos)
    frame = _packet_data(name, buf, pos, pos + 28, caplen, pos + length - 4)
    return ((ts_high << 32) | ts_low) / iface.divisor + iface.offset, iface.linktype, frame


def _spb(name: str, buf: bytes, section: _Section, pos: int, length: int, ts: float) -> Record:
    _need(name, length, 16, "simple packet block", pos)
    iface = _interface(name, section, 0, pos)  # an SPB always belongs to the first interface
    origlen = section.u32.unpack_from(buf, pos + 8)[0]
    caplen = min(origlen, length - 16, iface.snaplen or origlen)
    return ts, iface.linktype, _packet_data(name, buf, pos, pos + 12, caplen, pos + length - 4)


# --- writers ------------------------------------------------------------------------------------


class _Writer:
    """Shared file handling: accept a path or an open binary file; close only what we opened."""

    def __init__(self, path_or_file: str | os.PathLike[str] | BinaryIO, snaplen: int) -> None:
        self.snaplen = snaplen
        if isinstance(path_or_file, (str, os.PathLike)):
            self._file: BinaryIO = open(path_or_file, "wb")
            self._owned = True
        else:
            self._file = path_or_file
            self._owned = False

    def flush(self) -> None:
        """Push buffered records to the operating system."""
        self._file.flush()

    def close(self) -> None:
        """Flush, and close the file if this writer opened it."""
        if self._owned:
            self._file.close()
        else:
            self._file.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PcapWriter(_Writer):
    """Write a classic pcap file: microsecond timestamps, little-endian."""

    # A record's header: seconds, microseconds, bytes captured, original length.
    RECORD = struct.Struct("<IIII")

    def __init__(
        self,
        path_or_file: str | os.PathLike[str] | BinaryIO,
        linktype: int = LINKTYPE_ETHERNET,
        snaplen: int = 262144,
    ) -> None:
        super().__init__(path_or_file, snaplen)
        header = struct.pack("<" + _PCAP_FILE_HEADER, _PCAP_MAGIC_US, 2, 4, 0, 0, snaplen, linktype)
        self._file.write(header)

    def write(self, ts: float, frame: bytes) -> None:
        """Append one packet captured at `ts` (seconds), truncated to the snap length."""
        sec, usec = divmod(round(ts * 1_000_000), 1_000_000)
        data = frame[: self.snaplen]
        self._file.write(self.RECORD.pack(sec, usec, len(data), len(frame)))
        self._file.write(data)

    def write_records(self, records: bytes) -> None:
        """Append records already in pcap's layout (a :attr:`RECORD` header, then the
        captured bytes, each at most the snap length): many frames with one call."""
        self._file.write(records)


class PcapngWriter(_Writer):
    """Write pcapng: one section, one interface with nanosecond `if_tsresol`, and EPBs."""

    _epb = struct.Struct("<IIIIIII")  # type, length, interface, ts high, ts low, caplen, origlen

    def __init__(
        self,
        path_or_file: str | os.PathLike[str] | BinaryIO,
        linktype: int = LINKTYPE_ETHERNET,
        snaplen: int = 262144,
    ) -> None:
        super().__init__(path_or_file, snaplen)
        shb = struct.pack("<IIIHHq", _PCAPNG_SHB, 28, _PCAPNG_BOM, 1, 0, -1) + struct.pack("<I", 28)
        tsresol = struct.pack("<HHB3x", _OPT_IF_TSRESOL, 1, 9) + struct.pack(
            "<HH", _OPT_ENDOFOPT, 0
        )
        idb_len = 20 + len(tsresol)
        idb = struct.pack("<IIHHI", _PCAPNG_IDB, idb_len, linktype, 0, snaplen) + tsresol
        self._file.write(shb + idb + struct.pack("<I", idb_len))

    def write(self, ts: float, frame: bytes) -> None:
        """Append one packet captured at `ts` (seconds), truncated to the snap length."""
        ticks = round(ts * 1_000_000_000)
        data = frame[: self.snaplen]
        pad = -len(data) % 4
        length = 32 + len(data) + pad
        head = self._epb.pack(
            _PCAPNG_EPB, length, 0, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(frame)
        )
        self._file.write(head + data + bytes(pad) + length.to_bytes(4, "little"))
