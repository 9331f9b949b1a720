"""Capture files: writer/reader round trips, hand-built files in both byte orders, every defect."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfsync.pcap import (
    MAX_CAPLEN,
    CaptureError,
    PcapngWriter,
    PcapWriter,
    read_capture,
)
from statetable.decode import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
)

FRAMES = [
    (1700000000.123456, b"\x01" * 60),
    (1700000000.5, b""),
    (1700000001.000001, bytes(range(256)) * 6),
]
SHB, IDB, PB, SPB, EPB = 0x0A0D0D0A, 1, 2, 3, 6


def write(tmp_path: Path, data: bytes, name: str = "capture.pcap") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- hand-built files ---------------------------------------------------------------------------


def pcap_file(
    order: str, records: list[tuple[int, int, bytes]], magic: int = 0xA1B2C3D4, linktype: int = 1
) -> bytes:
    """A classic pcap file; records are (seconds, fraction, frame)."""
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for sec, frac, frame in records:
        out += struct.pack(order + "IIII", sec, frac, len(frame), len(frame)) + frame
    return out


def block(order: str, btype: int, body: bytes) -> bytes:
    """A pcapng block: body padded to 4 bytes, lengths before and after."""
    body += bytes(-len(body) % 4)
    length = len(body) + 12
    return struct.pack(order + "II", btype, length) + body + struct.pack(order + "I", length)


def shb(order: str) -> bytes:
    return block(order, SHB, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + bytes(-len(value) % 4)


def idb(order: str, linktype: int, *options: bytes, snaplen: int = 0) -> bytes:
    opts = b"".join(options) + option(order, 0, b"") if options else b""
    return block(order, IDB, struct.pack(order + "HHI", linktype, 0, snaplen) + opts)


def epb(order: str, interface: int, ticks: int, frame: bytes) -> bytes:
    head = struct.pack(
        order + "IIIII", interface, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame)
    )
    return block(order, EPB, head + frame)


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", [PcapWriter, PcapngWriter])
@pytest.mark.parametrize(
    "linktype", [LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_NULL, LINKTYPE_LINUX_SLL2]
)
def test_round_trip(
    tmp_path: Path, writer: type[PcapWriter] | type[PcapngWriter], linktype: int
) -> None:
    path = tmp_path / "out"
    with writer(path, linktype=linktype) as w:
        for ts, frame in FRAMES:
            w.write(ts, frame)
    records = list(read_capture(path))
    assert [(lt, frame) for _ts, lt, frame in records] == [(linktype, f) for _t, f in FRAMES]
    assert all(
        abs(ts - want) < 1e-6 for (ts, _lt, _f), (want, _) in zip(records, FRAMES, strict=True)
    )


@pytest.mark.parametrize("writer", [PcapWriter, PcapngWriter])
def test_writer_on_open_file_and_snaplen(
    writer: type[PcapWriter] | type[PcapngWriter], tmp_path: Path
) -> None:
    buf = io.BytesIO()
    with writer(buf, snaplen=100) as w:
        w.write(1.0, bytes(300))
    assert not buf.closed  # a file the writer did not open is left open
    records = list(read_capture(write(tmp_path, buf.getvalue())))
    assert records == [(1.0, LINKTYPE_ETHERNET, bytes(100))]


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize(
    ("magic", "frac", "seconds"), [(0xA1B2C3D4, 250000, 0.25), (0xA1B23C4D, 123456789, 0.123456789)]
)
def test_classic_byte_orders_and_resolutions(
    tmp_path: Path, order: str, magic: int, frac: int, seconds: float
) -> None:
    data = pcap_file(order, [(1000, frac, b"frame-1"), (1001, 0, b"frame-2")], magic, LINKTYPE_RAW)
    records = list(read_capture(write(tmp_path, data)))
    assert records == [
        (1000 + seconds, LINKTYPE_RAW, b"frame-1"),
        (1001.0, LINKTYPE_RAW, b"frame-2"),
    ]


def test_classic_linktype_ignores_fcs_bits(tmp_path: Path) -> None:
    data = pcap_file("<", [(1, 0, b"x")], linktype=0x1000_0000 | LINKTYPE_ETHERNET)
    assert next(read_capture(write(tmp_path, data)))[1] == LINKTYPE_ETHERNET


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng_blocks_and_sections(tmp_path: Path, order: str) -> None:
    other = ">" if order == "<" else "<"
    data = (
        shb(order)
        + idb(order, LINKTYPE_ETHERNET)  # no if_tsresol: microseconds
        + idb(
            order,
            LINKTYPE_RAW,
            option(order, 9, b"\x03"),
            option(order, 14, struct.pack(order + "q", 100)),
        )
        + idb(order, LINKTYPE_IPV4, option(order, 9, b"\x94"))  # 2^-20 seconds
        + epb(order, 0, 1_500_000, b"us")
        + block(order, 0x0BAD, b"unknown block, skipped")
        + epb(order, 1, 2_500, b"ms+offset")
        + epb(order, 2, 3 << 20, b"pow2")
        + block(order, SPB, struct.pack(order + "I", 6) + b"simple")
        + block(order, PB, struct.pack(order + "HHIIII", 1, 0, 0, 4_000, 3, 3) + b"old")
        + shb(other)  # a new section: new byte order, interfaces numbered from 0 again
        + idb(other, LINKTYPE_LINUX_SLL2, option(other, 9, b"\x09"))
        + epb(other, 0, 7_000_000_001, b"ns")
    )
    records = list(read_capture(write(tmp_path, data, "capture.pcapng")))
    assert records == [
        (1.5, LINKTYPE_ETHERNET, b"us"),
        (102.5, LINKTYPE_RAW, b"ms+offset"),
        (3.0, LINKTYPE_IPV4, b"pow2"),
        (3.0, LINKTYPE_ETHERNET, b"simple"),  # an SPB has no timestamp: the previous one is kept
        (104.0, LINKTYPE_RAW, b"old"),
        (7.000000001, LINKTYPE_LINUX_SLL2, b"ns"),
    ]


def test_simple_packet_block_is_cut_to_snaplen(tmp_path: Path) -> None:
    data = (
        shb("<")
        + idb("<", LINKTYPE_RAW, snaplen=4)
        + block("<", SPB, struct.pack("<I", 10) + b"0123456789")
    )
    assert list(read_capture(write(tmp_path, data))) == [(0.0, LINKTYPE_RAW, b"0123")]


def test_empty_capture_has_no_records(tmp_path: Path) -> None:
    assert list(read_capture(write(tmp_path, pcap_file("<", [])))) == []
    assert list(read_capture(write(tmp_path, shb("<") + idb("<", 1), "x.pcapng"))) == []


# --- defects ------------------------------------------------------------------------------------

GOOD = pcap_file("<", [(1, 0, b"a" * 10), (2, 0, b"b" * 10)])  # records at 24 and 50
NG = shb("<") + idb("<", LINKTYPE_ETHERNET)  # 28 + 20 bytes
NG_EPB = NG + epb("<", 0, 1, b"abcd")  # the EPB is at 48, 36 bytes long

CORRUPT: dict[str, tuple[bytes, str, int]] = {
    "bad magic": (b"\x00" * 40, "not a pcap or pcapng file", 0),
    "tiny file": (b"\xd4\xc3", "file too short for a capture header", 0),
    "short pcap header": (GOOD[:20], "truncated pcap file header", 0),
    "short record header": (GOOD + b"\x01\x02\x03", "truncated record header", 76),
    "record past eof": (GOOD[:-1], "captured length 10 runs past the end of the file", 50),
    "absurd caplen": (
        GOOD[:24] + struct.pack("<IIII", 1, 0, MAX_CAPLEN + 1, 60) + bytes(60),
        "absurd captured length",
        24,
    ),
    "short section header": (NG[:20], "truncated section header block", 0),
    "bad byte-order magic": (
        NG[:8] + b"\x01\x02\x03\x04" + NG[12:],
        "bad pcapng byte-order magic",
        8,
    ),
    "bad version": (NG[:12] + b"\x02\x00" + NG[14:], "unsupported pcapng version 2", 12),
    "short block header": (NG + b"\x06\x00\x00\x00\x10", "truncated block header", 48),
    "length not multiple of 4": (NG + struct.pack("<III", EPB, 14, 14), "bad block length 14", 48),
    "length below 12": (NG + struct.pack("<III", EPB, 8, 8), "bad block length 8", 48),
    "block past eof": (NG_EPB[:-4], "block length 36 runs past the end of the file", 48),
    "trailing length mismatch": (
        NG_EPB[:-4] + struct.pack("<I", 40),
        "does not match trailing length 40",
        48,
    ),
    "unknown interface": (
        NG + epb("<", 1, 1, b"abcd"),
        "packet references unknown interface 1",
        48,
    ),
    "packet before any interface": (shb("<") + epb("<", 0, 1, b"abcd"), "unknown interface 0", 28),
    "epb caplen past block": (
        NG + block("<", EPB, struct.pack("<IIIII", 0, 0, 0, 9, 9) + b"abcd"),
        "runs past the end of its block",
        48,
    ),
    "epb absurd caplen": (
        NG + block("<", EPB, struct.pack("<IIIII", 0, 0, 0, MAX_CAPLEN + 1, 9)),
        "absurd captured length",
        48,
    ),
    "short epb": (
        NG + block("<", EPB, b"\x00" * 8),
        "enhanced packet block too short (20 bytes)",
        48,
    ),
    "short idb": (shb("<") + block("<", IDB, b""), "interface description block too short", 28),
    "spb without interface": (
        shb("<") + block("<", SPB, struct.pack("<I", 1) + b"x"),
        "unknown interface 0",
        28,
    ),
    "option past block": (
        shb("<") + block("<", IDB, struct.pack("<HHIHH", 1, 0, 0, 9, 40)),
        "option 9 runs past the end of its block",
        44,
    ),
    "bad second section": (NG_EPB + NG_EPB[:8] + b"\x00" * 20, "bad pcapng byte-order magic", 92),
}


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_file_names_file_and_offset(tmp_path: Path, name: str) -> None:
    data, what, offset = CORRUPT[name]
    path = write(tmp_path, data, "bad.pcap")
    with pytest.raises(CaptureError) as err:
        list(read_capture(path))
    message = str(err.value)
    assert message.startswith(f"{path}: ") and what in message
    assert message.endswith(f" at byte offset {offset}") and "\n" not in message
    assert err.value.offset == offset


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pcap"
    with pytest.raises(CaptureError, match=rf"^{path}: No such file or directory$"):
        read_capture(path)


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, b"")
    with pytest.raises(CaptureError, match=rf"^{path}: empty file at byte offset 0$"):
        read_capture(path)


def test_directory_is_not_a_capture(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="Is a directory"):
        read_capture(tmp_path)


def test_header_errors_raise_before_iteration(tmp_path: Path) -> None:
    """A bad file is reported when it is opened, not when the first packet is wanted."""
    with pytest.raises(CaptureError):
        read_capture(write(tmp_path, b"\x00" * 40))


# --- arbitrary input ----------------------------------------------------------------------------

VALID = [
    GOOD,
    NG_EPB + epb("<", 0, 5, b"xyz"),
    shb(">") + idb(">", 1, option(">", 9, b"\x86")) + epb(">", 0, 9, b"q"),
]
MAGICS = [
    b"",
    struct.pack("<I", 0xA1B2C3D4),
    struct.pack(">I", 0xA1B23C4D),
    NG[:8],
    NG,
    NG_EPB,
    GOOD,
]


def parse_or_capture_error(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        for ts, linktype, frame in read_capture(path):
            assert isinstance(ts, float) and 0 <= linktype <= 0xFFFF and len(frame) <= MAX_CAPLEN
    except CaptureError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prefix=st.sampled_from(MAGICS), tail=st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_capture_error(
    tmp_path: Path, prefix: bytes, tail: bytes
) -> None:
    parse_or_capture_error(tmp_path / "fuzz", prefix + tail)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_mutated_files_parse_or_raise_capture_error(tmp_path: Path, data: st.DataObject) -> None:
    """Valid files with a few bytes changed and perhaps cut short."""
    mutated = bytearray(data.draw(st.sampled_from(VALID)))
    for _ in range(data.draw(st.integers(1, 4))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    length = data.draw(st.just(len(mutated)) | st.integers(0, len(mutated)))
    parse_or_capture_error(tmp_path / "fuzz", bytes(mutated[:length]))
