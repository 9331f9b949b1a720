"""pfwatch: a pfsyncd node's state changes, live (conntrack -E for the pf state table).

``pfwatch [-p PROTO] [-a ADDRESS] [-e KINDS] [-u [-I SECONDS]] [-q EVENTS] [-c N]``

One line per change, the state as ``pfctl -s states`` prints it:

    12:34:56.789012 [NEW] all tcp 192.0.2.2:80 <- 192.0.2.1:40000       SYN_SENT:CLOSED id ID/CID
    12:34:56.790101 [UPDATE] all tcp ... ESTABLISHED:ESTABLISHED id ID/CID was SYN_SENT:CLOSED
    12:34:57.000000 [VESTIGIAL] all tcp ... TIME_WAIT:TIME_WAIT id ... was FIN_WAIT_2:FIN_WAIT_2
    12:35:30.000000 [DESTROY] all udp ... MULTIPLE:MULTIPLE id ... expired
    12:35:30.000001 [MISSED] 1200 events

ID/CID are the 16 and 8 hex digits of pfctl -vv. A change applied from a sync peer ends
in ``peer``. ``[MISSED] N events`` says this
watcher fell behind (its queue on the node, ``-q``, was full) and N changes were lost
there; the node never waits for a watcher.

- ``-p`` tcp, udp, icmp, icmp6 or a protocol number; ``-a`` states with this address on
  either side; ``-e`` a comma list of new, update, vestigial, destroy (default all);
- ``-u`` also reports updates made by packets alone (windows, counters), at most one per
  state per ``-I`` seconds (default 1);
- ``-c N`` stops after N events; ``--json`` prints one JSON object per event per line.

Once the watch is in place, ``pfwatch: watching ADDR`` on stderr. Usage errors exit 2, an
unreachable node 1, never a traceback; Ctrl-C ends it (exit 0).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from pfsync.v1 import control_pb2 as pb
from tools.client import (
    Node,
    ToolArgumentParser,
    UsageError,
    add_common_arguments,
    count_arg,
    message_to_dict,
    resolve_target,
    run_tool,
)
from tools.framedecode import clock_text
from tools.pfctl_format import _peer_states, format_state

PROG = "pfwatch"
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58, "ipv6-icmp": 58}
KINDS = {
    "new": pb.STATE_EVENT_KIND_INSERT,
    "update": pb.STATE_EVENT_KIND_UPDATE,
    "vestigial": pb.STATE_EVENT_KIND_VESTIGIAL,
    "destroy": pb.STATE_EVENT_KIND_REMOVE,
}
LABELS = {
    pb.STATE_EVENT_KIND_INSERT: "[NEW]",
    pb.STATE_EVENT_KIND_UPDATE: "[UPDATE]",
    pb.STATE_EVENT_KIND_VESTIGIAL: "[VESTIGIAL]",
    pb.STATE_EVENT_KIND_REMOVE: "[DESTROY]",
}


def _protocol(text: str) -> int:
    if text.lower() in PROTOCOLS:
        return PROTOCOLS[text.lower()]
    if text.isascii() and text.isdigit() and 0 < int(text) <= 255:
        return int(text)
    raise UsageError(f"unknown protocol {text[:40]!r}")


def _kinds(text: str) -> list[Any]:  # StateEventKind values
    kinds = []
    for word in text.split(","):
        if word.strip().lower() not in KINDS:
            raise UsageError(f"unknown event kind {word[:40]!r} (new, update, vestigial, destroy)")
        kinds.append(KINDS[word.strip().lower()])
    return kinds


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{text[:40]!r} is not a number of seconds") from None
    if not 0.01 <= value <= 86400:
        raise UsageError(f"{value:g} is out of range 0.01..86400 seconds")
    return value


def build_parser() -> ToolArgumentParser:
    """pfwatch's flags."""
    parser = ToolArgumentParser(prog=PROG, description="Print a node's state changes live.")
    parser.add_argument("-p", dest="proto", type=_protocol, metavar="PROTO", help="protocol")
    parser.add_argument("-a", dest="address", metavar="ADDRESS", help="address on either side")
    parser.add_argument("-e", dest="kinds", type=_kinds, metavar="KINDS", help="event kinds")
    parser.add_argument("-u", dest="packets", action="store_true", help="packet-only updates")
    parser.add_argument(
        "-I", dest="interval", type=_seconds, metavar="SECONDS", help="with -u: per-state interval"
    )
    parser.add_argument(
        "-q",
        dest="queue",
        type=count_arg(),
        metavar="EVENTS",
        help="queue on the node (default 65536)",
    )
    parser.add_argument(
        "-c", dest="count", type=count_arg(), metavar="N", help="stop after N events"
    )
    add_common_arguments(parser)
    return parser


def format_event(event: pb.StateEvent) -> str:
    """One event's line (see the module doc)."""
    st = event.state
    line = f"{clock_text(event.time.ToNanoseconds())} {LABELS.get(event.kind, '[?]')} "
    line += format_state(st)[0] + f" id {st.id}/{st.creatorid}"
    if event.HasField("old_src") and event.kind != pb.STATE_EVENT_KIND_REMOVE:
        # Printed in the same order as the state's own peers (pfctl's direction rule).
        first, second = (
            (event.old_src, event.old_dst)
            if st.direction == pb.DIRECTION_OUT
            else (event.old_dst, event.old_src)
        )
        was = _peer_states(st.proto, first, second)
        if was != _peer_states(*_printed(st)):
            line += f" was {was}"
    if event.reason:
        line += f" {event.reason}"
    if event.from_peer:
        line += " peer"
    return line


def _printed(st: pb.State) -> tuple[int, pb.PeerState, pb.PeerState]:
    if st.direction == pb.DIRECTION_OUT:
        return st.proto, st.src, st.dst
    return st.proto, st.dst, st.src


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.interval is not None and not args.packets:
        raise UsageError("-I needs -u")
    target = resolve_target(args)
    request = pb.WatchStatesRequest(
        proto=args.proto or 0,
        address=args.address or "",
        kinds=args.kinds or [],
        packet_updates=args.packets,
    )
    if args.interval is not None:
        interval = Duration()
        interval.FromNanoseconds(int(args.interval * 1e9))
        request.packet_update_interval.CopyFrom(interval)
    if args.queue is not None:
        request.queue_events = args.queue
    seen = 0
    with Node(target) as node:
        call = node.control.WatchStates(request, metadata=node.metadata)
        try:
            for n, message in enumerate(call):
                if n == 0:
                    print(f"{PROG}: watching {target.address}", file=sys.stderr, flush=True)
                lines = []
                for event in message.events:
                    lines.append(_line(event, args.json))
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        break
                if message.missed:
                    lines.append(_missed(message.missed, args.json))
                if lines:
                    sys.stdout.write("\n".join(lines) + "\n")
                    sys.stdout.flush()
                if args.count is not None and seen >= args.count:
                    break
        except grpc.RpcError as exc:
            raise node.failure(exc) from None
        except KeyboardInterrupt:
            pass
        finally:
            call.cancel()
    return 0


def _line(event: pb.StateEvent, as_json: bool) -> str:
    if not as_json:
        return format_event(event)
    document: dict[str, Any] = message_to_dict(event)
    return json.dumps(document)


def _missed(count: int, as_json: bool) -> str:
    if as_json:
        return json.dumps({"missed": count})
    return f"{clock_text(time.time_ns())} [MISSED] {count} events"


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    return run_tool(PROG, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
