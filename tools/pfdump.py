"""pfdump: tcpdump for a pfsyncd node's interfaces, through the Tap API.

``pfdump -i IFACE [-w FILE] [-c N] [-s SNAPLEN] [-B FRAMES] [FILTER...]``

- ``-i`` an interface of the node: a live capture's name, ``pcapN`` (the Nth --pcap
  replay), ``inject`` (frames fed by Inject) or ``pfsync0`` (the sync frames, link type
  USER0 = 147 holding one serialized pfsync.v1.SyncFrame; tap.proto says why);
- without ``-w``, one line per frame, tcpdump's layout with absolute sequence numbers:
  ``12:34:56.789012 IP 192.0.2.1.40000 > 192.0.2.2.80: Flags [S], seq 1, win 65535,
  length 0`` (UDP: ``UDP, length N``; ICMP: ``ICMP echo request, id 1, seq 1, length N``;
  pfsync0: ``pfsync Out: sender 1a2b3c4d seq 5 ack 3 INS 2, length 180``);
- ``-w FILE`` writes a pcap file instead (the frames' own link type; ``-`` is stdout),
  which Wireshark and the project's reader (pfsync.pcap.read_capture) open;
- ``-c N`` stops after N frames; ``-s`` cuts frames to SNAPLEN bytes; ``-B`` is the tap's
  buffer on the node, in frames (a reader slower than the interface loses the excess:
  counted, reported at the end as "dropped by the node");
- FILTER: tap.proto's tcpdump-like subset (``tcp and port 80``, ``host ::1``,
  ``not udp``, ``src net 10.0.0.0/8``), checked by the node;
- ``--json``: one JSON object per frame per line.

At the end (``-c`` reached, Ctrl-C), three lines on stderr as tcpdump prints them. Taps
are an admin feature: a refused call fails in one line. Usage errors exit 2, an
unreachable node 1, never a traceback.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import grpc

from pfsync.pcap import PcapWriter
from pfsync.v1 import tap_pb2 as pb
from tools.client import (
    Node,
    ToolArgumentParser,
    ToolError,
    UsageError,
    add_common_arguments,
    count_arg,
    resolve_target,
    run_tool,
)
from tools.framedecode import (
    DIRECTION_NAMES,
    LINKTYPE_ETHERNET,
    LINKTYPE_USER0,
    RECORD,
    Record,
    clock_text,
    decode,
    records,
    records_of_columns,
)

PROG = "pfdump"
SNAPLEN_MAX = 262144
BUFFER_MAX = 1 << 20


def build_parser() -> ToolArgumentParser:
    """pfdump's flags."""
    parser = ToolArgumentParser(prog=PROG, description="Print or save a node interface's frames.")
    parser.add_argument("-i", dest="interface", required=True, metavar="IFACE", help="interface")
    parser.add_argument("-w", dest="write", metavar="FILE", help="write a pcap file ('-': stdout)")
    parser.add_argument(
        "-c", dest="count", type=count_arg(1, 1 << 62), metavar="N", help="stop after N frames"
    )
    parser.add_argument(
        "-s", dest="snaplen", type=count_arg(1, SNAPLEN_MAX), metavar="SNAPLEN", help="bytes kept"
    )
    parser.add_argument(
        "-B",
        dest="buffer",
        type=count_arg(1, BUFFER_MAX),
        metavar="FRAMES",
        help="the tap's buffer on the node, in frames (default 4096)",
    )
    parser.add_argument("-n", action="store_true", help="numeric output (always; accepted)")
    parser.add_argument("filter", nargs="*", help="filter expression (tcpdump-like subset)")
    add_common_arguments(parser)
    return parser


class _Output:
    """Where frames go: lines on stdout, JSON lines, or a pcap file."""

    def __init__(self, path: str | None, as_json: bool, interface: str) -> None:
        self.path = path
        self.as_json = as_json
        self.interface = interface
        self.writer: PcapWriter | None = None
        self.linktype: int | None = None
        self.other_linktype = 0  # frames not written: not the file's link type

    def records(self, blob: bytes, limit: int) -> int:
        """Print or write the records of one message, at most ``limit``: how many were read."""
        if self.path is not None:
            return self._write(blob, limit)
        n = 0
        for rec in itertools.islice(records(blob), limit):
            self._print(rec)
            n += 1
        return n

    def _print(self, rec: Record) -> None:
        d = decode(rec.data, rec.linktype, rec.length, rec.direction)
        if self.as_json:
            document = {
                "time_ns": rec.time_ns,
                "interface": self.interface,
                "linktype": rec.linktype,
                "length": rec.length,
                "caplen": len(rec.data),
                "direction": DIRECTION_NAMES.get(rec.direction, ""),
                "family": d.family,
                "src": d.src,
                "dst": d.dst,
                "proto": d.proto,
                "sport": d.sport,
                "dport": d.dport,
                "summary": d.summary,
            }
            sys.stdout.write(json.dumps(document) + "\n")
        else:
            sys.stdout.write(f"{clock_text(rec.time_ns)} {d.summary}\n")

    def _write(self, blob: bytes, limit: int) -> int:
        """Tap records to pcap records, one write per message: pfdump shares the CPUs with
        the node it taps, so this loop does as little as it can per frame (bench_tap.py)."""
        if len(blob) < RECORD.size:
            return 0
        if self.writer is None:
            self._open(RECORD.unpack_from(blob)[3])
        assert self.writer is not None
        unpack, pack, linktype = RECORD.unpack_from, PcapWriter.RECORD.pack, self.linktype
        view = memoryview(blob)
        parts: list[bytes | memoryview] = []
        append = parts.append
        pos = n = 0
        end = len(blob) - RECORD.size
        while pos <= end and n < limit:
            time_ns, length, caplen, frame_linktype, _direction = unpack(blob, pos)
            pos += RECORD.size
            if frame_linktype == linktype:
                usec = (time_ns + 500) // 1000
                append(pack(usec // 1_000_000, usec % 1_000_000, caplen, length))
                append(view[pos : pos + caplen])
            else:
                self.other_linktype += 1
            pos += caplen
            n += 1
        self.writer.write_records(b"".join(parts))
        return n

    def _open(self, linktype: int) -> None:
        assert self.path is not None
        target: str | BinaryIO = self.path
        if self.path == "-":
            target = os.fdopen(sys.stdout.fileno(), "wb", closefd=False)
        try:
            self.writer = PcapWriter(target, linktype=linktype, snaplen=SNAPLEN_MAX)
        except OSError as exc:
            raise ToolError(f"{self.path}: {exc.strerror or exc}") from None
        self.linktype = linktype

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        else:
            sys.stdout.flush()

    def close(self) -> None:
        if self.path is not None and self.writer is None:
            # Nothing came: still leave a valid (empty) capture, as tcpdump does.
            self._open(LINKTYPE_USER0 if self.interface == "pfsync0" else LINKTYPE_ETHERNET)
        if self.writer is not None:
            self.writer.close()


def _check_output(path: str | None) -> None:
    """Fail before attaching when -w names a file that cannot be written."""
    if path is None or path == "-":
        return
    parent = Path(path).parent
    if not parent.is_dir():
        raise UsageError(f"{path}: no such directory")
    if Path(path).is_dir():
        raise UsageError(f"{path}: is a directory")


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    target = resolve_target(args)
    _check_output(args.write)
    request = pb.AttachRequest(
        interface=args.interface,
        filter=" ".join(args.filter),
        pid=os.getpid(),
        command=PROG,
        columns=True,  # the node's cheaper form: pfdump packs the records on its own CPU
    )
    if args.snaplen is not None:
        request.snaplen = args.snaplen
    if args.buffer is not None:
        request.buffer_frames = args.buffer
    out = _Output(args.write, args.json, args.interface)
    seen = 0
    counters = pb.TapCounters()
    with Node(target) as node:
        call = node.taps.Attach(request, metadata=node.metadata)
        try:
            for n, message in enumerate(call):
                counters = message.counters
                if n == 0:
                    print(
                        f"{PROG}: listening on {args.interface} (tap {message.tap_id}), "
                        f"snapshot length {args.snaplen or SNAPLEN_MAX} bytes",
                        file=sys.stderr,
                    )
                try:
                    blob = records_of_columns(message.columns)
                except ValueError as exc:
                    raise ToolError(str(exc)) from None
                seen += out.records(blob, (args.count or sys.maxsize) - seen)
                out.flush()
                if args.count is not None and seen >= args.count:
                    break
        except grpc.RpcError as exc:
            raise node.failure(exc) from None
        except KeyboardInterrupt:
            pass  # tcpdump's way: Ctrl-C ends the capture, the figures follow
        finally:
            call.cancel()
            out.close()
    print(f"{seen} packets captured", file=sys.stderr)
    print(f"{counters.captured} packets received by filter", file=sys.stderr)
    print(f"{counters.dropped} packets dropped by the node", file=sys.stderr)
    if out.other_linktype:
        print(
            f"{PROG}: {out.other_linktype} frames of another link type not written",
            file=sys.stderr,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    return run_tool(PROG, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
