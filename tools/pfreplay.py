"""pfreplay: stream pcap/pcapng captures into a running pfsyncd node through batched Inject.

``pfreplay [-N NODE] [--token-file F] [--speed X] [--loop N] [--limit N] FILE...`` reads each
capture with the node's own reader (``pfsync.pcap.read_capture``) and sends its frames, in
file order, as ``Inject`` calls of up to ``--batch`` frames (and at most ``BATCH_BYTES`` of
frame data, far under gRPC's 4 MiB message limit). It is how users and the failover tests
feed a running node, and it gives the same table as ``pfsyncd --pcap`` on the same file.

- ``--speed 0`` (the default) sends as fast as the node takes them; ``--speed 1`` keeps
  the capture's own timing (each file's first packet goes at once, the others at their
  offset from it), ``--speed 2`` twice as fast.
- The next batch is read and encoded (to bytes) while the node tracks the current one,
  so between two calls there is only the round trip. Only one call is in flight: the node
  does not keep the order of concurrent calls (measured: with 16 small calls in flight,
  SYN|ACKs overtook their SYNs), and a replay must arrive in capture order. Deeper
  pipelining needs an ordered stream in the API.
- Every file is read once before anything is sent: a missing, empty or corrupt file is
  refused (exit 2, one line naming the file and byte offset) without touching the node,
  and the progress bar knows its total.
- At the end one summary line: packets sent (answered by the node), passed, blocked,
  ``state-mismatch`` (the node's PFRES counter, read before and after: it counts every
  source of the node, not only this replay) and decode errors; ``--json`` prints it as
  one JSON object.

Exit status: 0 every packet delivered; 1 the node could not be reached or was lost
mid-way (the line says how many packets it had acknowledged); 2 a usage error or an
unreadable/corrupt file.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from pfsync.pcap import CaptureError, read_capture
from pfsync.v1 import control_pb2 as pb
from tools.client import (
    Node,
    ToolArgumentParser,
    ToolError,
    UsageError,
    add_common_arguments,
    count_arg,
    print_json,
    resolve_target,
    run_tool,
)

PROG = "pfreplay"

#: Frames per Inject call. The node tracks a batch without yielding its event loop, so
#: this is also how long other API calls may wait (~40 ms here); 4096 is the node's own
#: batch when it replays --pcap, and larger batches gain little (BENCHMARKS.md).
DEFAULT_BATCH = 4096
#: The node refuses larger calls (pfsync/control.py MAX_INJECT_FRAMES).
MAX_BATCH = 65536
#: Frame bytes per call: with one frame at most 256 KiB (pfsync.pcap.MAX_CAPLEN), a call
#: stays under ~1.3 MiB, well below gRPC's 4 MiB default message limit.
BATCH_BYTES = 1 << 20
#: Protobuf's per-frame cost on the wire (tags, lengths, linktype), rounded up.
FRAME_OVERHEAD = 24
#: Inject calls in flight. Concurrent unary calls may be tracked out of order by the node
#: (grpc.aio runs each as its own task, started when its message is complete), so never
#: more than one: the overlap comes from building the next request meanwhile.
IN_FLIGHT = 1
#: Deadline of one Inject: the largest batch takes about a second to track.
INJECT_TIMEOUT = 30.0
#: At --speed > 0, frames due within this many seconds go out together (fewer calls).
PACE_SLACK = 0.002
#: Progress bar refresh period, seconds.
PROGRESS_PERIOD = 0.1
PROGRESS_WIDTH = 24

Record = tuple[float, int, bytes]  # (timestamp, linktype, frame), as read_capture yields

# --- the wire: every use of the generated API is in these four functions, so a renamed
# service, message or field is followed here and nowhere else. --------------------------


def inject_method(node: Node) -> Any:
    """Control.Inject on ``node``'s channel, taking requests already encoded (build_request).

    Encoding is done while the previous call is tracked; left to the stub, it would sit on
    the critical path between two calls (measured: 45k against 63-79k packets/s).
    """
    method = pb.DESCRIPTOR.services_by_name["ControlService"].methods_by_name["Inject"]
    return node.channel.unary_unary(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=None,
        response_deserializer=pb.InjectResponse.FromString,
    )


def build_request(records: Sequence[Record]) -> bytes:
    """One encoded InjectRequest carrying ``records`` in order."""
    request = pb.InjectRequest()
    add = request.frames.add  # about 2x faster than building Frame objects and a list
    # capture_time is left out: the node stamps every frame itself (see Frame in
    # control.proto), and a Timestamp per frame would cost more than the frame's bytes.
    for _ts, linktype, data in records:
        add(linktype=linktype, data=data)
    encoded: bytes = request.SerializeToString()
    return encoded


def read_reply(reply: pb.InjectResponse) -> tuple[int, int, int]:
    """``(passed, blocked, decode_errors)`` of one Inject reply."""
    return reply.passed, reply.blocked, reply.errors


def read_state_mismatch(node: Node) -> int:
    """The node's ``state-mismatch`` counter (GetInfo's PFRES counters)."""
    info = node.call(node.control.GetInfo, pb.GetInfoRequest())
    for counter in info.counters:
        if counter.name == "state-mismatch":
            return int(counter.value)
    raise ToolError(f"node {node.target.address} reports no state-mismatch counter")


# --- command line -----------------------------------------------------------------------


def _speed(text: str) -> float:
    """An argparse type: a finite speed factor >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 (as fast as possible) or more: {text}")
    return value


def build_parser() -> ToolArgumentParser:
    """Return pfreplay's command line parser."""
    parser = ToolArgumentParser(
        prog=PROG,
        description="Stream pcap/pcapng captures into a running pfsyncd node (batched Inject).",
        epilog="Exit status: 0 all delivered, 1 node unreachable or lost mid-way, "
        "2 usage error or unreadable/corrupt file.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", type=Path, help="pcap/pcapng files")
    parser.add_argument(
        "--speed",
        type=_speed,
        default=0.0,
        metavar="X",
        help="0: as fast as possible (default); 1: the capture's timing; 2: twice as fast",
    )
    parser.add_argument(
        "--loop",
        type=count_arg(0),
        default=1,
        metavar="N",
        help="replay the files N times (0: until interrupted; default 1)",
    )
    parser.add_argument(
        "--limit", type=count_arg(1), metavar="N", help="stop after N packets in all"
    )
    parser.add_argument(
        "--batch",
        type=count_arg(1, MAX_BATCH),
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"frames per Inject call (default {DEFAULT_BATCH}; also capped at "
        f"{BATCH_BYTES >> 20} MiB of frame data)",
    )
    add_common_arguments(parser)
    return parser


# --- reading ----------------------------------------------------------------------------


def _open(path: Path) -> Iterator[Record]:
    """``read_capture(path)``, with a directory refused as the other bad files are."""
    if path.is_dir():
        raise UsageError(f"{path}: is a directory")
    try:
        return read_capture(path)
    except CaptureError as exc:
        raise UsageError(str(exc)) from None


def count_packets(path: Path) -> int:
    """Read a whole capture once: its packet count, or ``UsageError`` naming what is wrong."""
    packets = 0
    try:
        for _ in _open(path):
            packets += 1
    except CaptureError as exc:
        raise UsageError(str(exc)) from None
    return packets


# --- sending ----------------------------------------------------------------------------


@dataclass
class Summary:
    """What a replay did: the summary line and the ``--json`` object."""

    sent: int = 0  # frames the node answered for
    passed: int = 0
    blocked: int = 0
    state_mismatch: int = 0
    decode_errors: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The one-line summary printed at the end."""
        rate = self.sent / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.sent} packets sent in {self.seconds:.2f} s ({rate:.0f} packets/s): "
            f"{self.passed} passed, {self.blocked} blocked, "
            f"{self.state_mismatch} state-mismatch, {self.decode_errors} decode errors"
        )

    def document(self) -> dict[str, Any]:
        """The ``--json`` object."""
        doc = asdict(self)
        doc["seconds"] = round(self.seconds, 6)
        doc["packets_per_second"] = round(self.sent / self.seconds) if self.seconds > 0 else 0
        return doc


class NodeLost(ToolError):
    """The node stopped answering after ``delivered`` packets (exit status 1)."""

    def __init__(self, address: str, delivered: int, reason: str) -> None:
        super().__init__(f"lost node {address} after {delivered} packets were delivered: {reason}")
        self.delivered = delivered


# Failures that mean the node (or the path to it) is gone rather than that it refused us.
_LOST = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
)


class Injector:
    """Sends batches as Inject calls, at most ``window`` in flight, and tallies the replies.

    With ``window`` 1 (what pfreplay uses, see ``IN_FLIGHT``) batches are tracked in the
    order sent. Replies are taken in order, so ``summary.sent`` counts a prefix of the
    replay: the packets the node has certainly tracked.
    """

    def __init__(self, node: Node, window: int, summary: Summary) -> None:
        self.node = node
        self.window = window
        self.summary = summary
        self._inject = inject_method(node)
        self._pending: deque[tuple[grpc.Future, int]] = deque()

    def submit(self, records: list[Record]) -> None:
        """Start one Inject call for ``records`` once the window has room."""
        request = build_request(records)  # encoded while the previous call is tracked
        while len(self._pending) >= self.window:
            self._collect()
        future = self._inject.future(request, timeout=INJECT_TIMEOUT, metadata=self.node.metadata)
        self._pending.append((future, len(records)))

    def poll(self) -> None:
        """Take the replies that have arrived, without waiting."""
        while self._pending and self._pending[0][0].done():
            self._collect()

    def drain(self) -> None:
        """Wait for every call in flight."""
        while self._pending:
            self._collect()

    def _collect(self) -> None:
        future, frames = self._pending.popleft()
        try:
            reply = future.result()
        except grpc.RpcError as exc:
            for other, _ in self._pending:
                other.cancel()
            self._pending.clear()
            raise self._failure(exc) from None
        passed, blocked, errors = read_reply(reply)
        summary = self.summary
        summary.sent += frames
        summary.passed += passed
        summary.blocked += blocked
        summary.decode_errors += errors

    def _failure(self, exc: grpc.RpcError) -> ToolError:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        if code not in _LOST:
            return self.node.failure(exc, INJECT_TIMEOUT)  # e.g. a missing token
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            reason = f"no answer within {INJECT_TIMEOUT:g}s"
        else:
            details = exc.details() if isinstance(exc, grpc.Call) else ""
            # gRPC's "failed to connect ...; last error: ...: Connection refused": the tail
            reason = " ".join((details or code.name.lower()).split()).rsplit(": ", 1)[-1]
        return NodeLost(self.node.target.address, self.summary.sent, reason)


class Progress:
    """A one-line progress bar on stderr, redrawn at most every ``PROGRESS_PERIOD``."""

    def __init__(self, stream: TextIO, total: int | None) -> None:
        self.stream = stream
        self.total = total
        self.started = time.monotonic()
        self._next = 0.0
        self._drawn = False

    def update(self, done: int, force: bool = False) -> None:
        """Redraw with ``done`` packets acknowledged, if it is time to."""
        now = time.monotonic()
        if now < self._next and not force:
            return
        self._next = now + PROGRESS_PERIOD
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            fraction = min(1.0, done / self.total)
            filled = int(fraction * PROGRESS_WIDTH)
            bar = "#" * filled + "-" * (PROGRESS_WIDTH - filled)
            text = f"[{bar}] {fraction:4.0%} {done}/{self.total}"
        else:
            text = f"{done} packets"
        self.stream.write(f"\r{text}  {rate:,.0f}/s  {elapsed:.1f}s\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the bar so the summary (or an error) starts on a clean line."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class NoProgress(Progress):
    """Progress when stderr is not a terminal: nothing is drawn."""

    def __init__(self) -> None:
        super().__init__(sys.stderr, None)

    def update(self, done: int, force: bool = False) -> None:
        """Draw nothing."""

    def close(self) -> None:
        """Nothing to erase."""


class Replay:
    """One run of pfreplay: the files, the pacing, the batches."""

    def __init__(self, args: argparse.Namespace, injector: Injector, progress: Progress) -> None:
        self.args = args
        self.injector = injector
        self.progress = progress
        self.batch: list[Record] = []
        self.batch_bytes = 0
        self.queued = 0  # packets taken from the files so far

    def run(self) -> None:
        """Send every packet (up to ``--limit``), then wait for the last replies."""
        passes = 0
        while self.args.loop == 0 or passes < self.args.loop:
            for path in self.args.files:
                if not self._send_file(path):
                    break
            else:
                passes += 1
                continue
            break
        self._flush()
        self.injector.drain()
        self.progress.update(self.injector.summary.sent, force=True)

    def _send_file(self, path: Path) -> bool:
        """Send one pass over one file; False once ``--limit`` is reached."""
        speed, limit = self.args.speed, self.args.limit
        origin: tuple[float, float] | None = None  # (first timestamp, when it was sent)
        try:
            for record in _open(path):
                if limit is not None and self.queued >= limit:
                    return False
                if speed:
                    now = time.monotonic()
                    if origin is None:
                        origin = (record[0], now)
                    wait = origin[1] + (record[0] - origin[0]) / speed - now
                    if wait > PACE_SLACK:
                        self._flush()
                        self._sleep(wait)
                self.batch.append(record)
                self.batch_bytes += len(record[2]) + FRAME_OVERHEAD
                self.queued += 1
                if len(self.batch) >= self.args.batch or self.batch_bytes >= BATCH_BYTES:
                    self._flush()
        except CaptureError as exc:
            # The file changed since it was checked: keep what was sent, then say so.
            self._flush()
            self.injector.drain()
            raise UsageError(
                f"{exc} ({self.injector.summary.sent} packets were delivered)"
            ) from None
        return limit is None or self.queued < limit

    def _flush(self) -> None:
        if self.batch:
            self.injector.submit(self.batch)
            self.batch, self.batch_bytes = [], 0
        self.injector.poll()
        self.progress.update(self.injector.summary.sent)

    def _sleep(self, seconds: float) -> None:
        """Sleep, taking replies and redrawing the bar meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, PROGRESS_PERIOD))
            self.injector.poll()
            self.progress.update(self.injector.summary.sent)


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    target = resolve_target(args)
    # Every file is read in full before the node is touched: a bad file changes nothing.
    per_pass = sum(count_packets(path) for path in args.files)
    total = per_pass * args.loop if args.loop else None
    if args.limit is not None:
        total = args.limit if total is None else min(total, args.limit)
    summary = Summary(files=[str(path) for path in args.files])
    progress: Progress = Progress(sys.stderr, total) if sys.stderr.isatty() else NoProgress()
    with Node(target) as node:
        mismatch_before = read_state_mismatch(node)
        started = time.monotonic()
        try:
            if per_pass:  # (--loop 0 over empty files would spin forever)
                Replay(args, Injector(node, IN_FLIGHT, summary), progress).run()
        finally:
            progress.close()
        summary.seconds = time.monotonic() - started
        try:
            mismatch_after = read_state_mismatch(node)
        except ToolError as exc:
            raise NodeLost(target.address, summary.sent, f"reading counters: {exc}") from None
    # A `pfctl -F info` meanwhile would make the difference negative; it is then unknown.
    summary.state_mismatch = max(0, mismatch_after - mismatch_before)
    if args.json:
        print_json(summary.document())
    else:
        print(summary.line())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run pfreplay with ``argv`` (default: the process arguments); return the exit status."""
    return run_tool(PROG, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
