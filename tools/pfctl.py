"""pfctl: show and steer a pfsyncd node's state table the way OpenBSD's pfctl(8) does.

Supported, with pfctl's meaning and output:

- ``-s states|info|timeouts|memory|all`` (any unambiguous prefix, as pfctl accepts),
  ``-v`` / ``-vv`` for more detail;
- ``-k host [-k host]`` kills states from the first host (address, name or
  ``address/prefix``) to the second; ``-k id -k ID[/CREATORID]`` kills one state by its
  hex sync identity;
- ``-F states|info|all`` clears states and/or counters; ``-q`` hides the messages that
  ``-k`` and ``-F`` print on stderr;
- the tools' common ``-N/--node``, ``--token-file`` and ``--json`` (note that pfctl's own
  ``-N``, "no name resolution", gives way to the tools' node option).

As in pfctl, the show runs first, then the flush, then the kill. pfctl's ``-K`` kills
source tracking nodes, which a pfsyncd node does not keep, so it fails with a message.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from pfsync.v1 import control_pb2 as pb
from tools.client import (
    Node,
    ToolArgumentParser,
    ToolError,
    UsageError,
    add_common_arguments,
    message_to_dict,
    print_json,
    resolve_target,
    run_tool,
)
from tools.pfctl_format import (
    format_info,
    format_memory,
    format_state,
    format_sync,
    format_timeouts,
    state_to_json,
)

PROG = "pfctl"
SHOW_MODIFIERS = ("states", "info", "timeouts", "memory", "sync", "all")
FLUSH_MODIFIERS = ("states", "info", "all")

# sscanf("%llx/%x") as pfctl parses a state id; an optional 0x, as %x accepts.
_STATE_ID = re.compile(r"(?:0[xX])?([0-9a-fA-F]+)(?:/(?:0[xX])?([0-9a-fA-F]+))?")


@dataclass(frozen=True)
class KillById:
    """``-k id -k ID[/CREATORID]``: one state; creatorid 0 means the node's own hostid."""

    id: int
    creatorid: int

    def request(self) -> pb.KillStatesRequest:
        """The KillStates request: ids travel as hex text, which no client can round."""
        creatorid = f"{self.creatorid:08x}" if self.creatorid else ""
        return pb.KillStatesRequest(id=f"{self.id:016x}", creatorid=creatorid)


@dataclass(frozen=True)
class KillByHost:
    """``-k host [-k host]``: states from any src address to any dst address (None: any)."""

    sources: list[pb.AddressMatch]
    destinations: list[pb.AddressMatch] | None


def lookup_option(word: str, choices: Sequence[str], what: str) -> str:
    """Return the choice ``word`` abbreviates, as pfctl_lookup_option does."""
    matches = [choice for choice in choices if word and choice.startswith(word)]
    if not matches:
        raise UsageError(f"Unknown {what} modifier '{word}'")
    if len(matches) > 1:
        raise UsageError(f"{word} is ambiguous")
    return matches[0]


def parse_state_id(text: str) -> KillById:
    """Parse ``ID[/CREATORID]`` (hex) as ``pfctl -k id`` does."""
    match = _STATE_ID.fullmatch(text.strip())
    if match is None:
        raise UsageError("wrong id format specified")
    state_id = int(match.group(1), 16)
    creatorid = int(match.group(2), 16) if match.group(2) else 0
    if state_id >= 1 << 64 or creatorid >= 1 << 32:
        raise UsageError("wrong id format specified")
    if state_id == 0:
        raise UsageError("cannot kill id 0")
    return KillById(state_id, creatorid)


def resolve_hosts(spec: str) -> list[pb.AddressMatch]:
    """Resolve ``host`` or ``address/prefix`` into the addresses to match (pfctl_addrprefix).

    A name may resolve to several addresses, of both families; each becomes one match.
    """
    host, has_prefix, prefix_text = spec.partition("/")
    # As in pfctl, a prefix is only allowed after a numeric address.
    flags = socket.AI_NUMERICHOST if has_prefix else 0
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM, flags=flags)
    except socket.gaierror as exc:
        raise ToolError(f"{spec}: {exc.strerror}") from None
    except UnicodeError:  # the idna codec: an empty or over-long label ("a..b")
        raise UsageError(f"{spec}: not a valid host name") from None
    prefix_len: int | None = None
    if has_prefix:
        # The first result's family bounds the prefix, as in pfctl.
        limit = 128 if infos[0][0] == socket.AF_INET6 else 32
        if not (prefix_text.isascii() and prefix_text.isdigit()):
            raise UsageError(f"prefix is invalid: {prefix_text}")
        prefix_len = int(prefix_text)
        if prefix_len > limit:
            raise UsageError(f"prefix is too large: {prefix_text}")
    matches: list[pb.AddressMatch] = []
    seen: set[str] = set()
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        # Drop an IPv6 zone ("fe80::1%em0"): states carry bare addresses.
        # inet_ntop(inet_pton()) gives one spelling per address, so duplicates collapse.
        addr = socket.inet_ntop(
            family, socket.inet_pton(family, str(sockaddr[0]).partition("%")[0])
        )
        if addr in seen:
            continue
        seen.add(addr)
        match = pb.AddressMatch(address=addr)
        if prefix_len is not None:
            match.prefix_len = prefix_len
        matches.append(match)
    return matches


def parse_kill(keys: Sequence[str]) -> KillById | KillByHost:
    """Turn the ``-k`` arguments into what to kill, checking them before any call."""
    if len(keys) > 2:
        raise UsageError("can only specify -k twice")
    if keys[0] == "id":
        if len(keys) != 2 or not keys[1]:
            raise UsageError("no id specified")
        return parse_state_id(keys[1])
    if keys[0] in ("label", "key"):
        raise UsageError(f"-k {keys[0]} is not supported by pfsyncd nodes")
    sources = resolve_hosts(keys[0])
    destinations = resolve_hosts(keys[1]) if len(keys) == 2 else None
    return KillByHost(sources, destinations)


def build_parser() -> ToolArgumentParser:
    """Return pfctl's command line parser."""
    parser = ToolArgumentParser(
        prog=PROG, description="Show and steer a pfsyncd node's state table."
    )
    parser.add_argument(
        "-s", dest="show", metavar="modifier", help="show: " + ", ".join(SHOW_MODIFIERS)
    )
    parser.add_argument(
        "-F", dest="flush", metavar="modifier", help="flush: " + ", ".join(FLUSH_MODIFIERS)
    )
    parser.add_argument(
        "-k",
        dest="kill",
        action="append",
        metavar="key",
        help="kill states: host [-k host], or id -k ID[/CREATORID] (hex)",
    )
    parser.add_argument(
        "-K",
        dest="kill_src_nodes",
        action="append",
        metavar="key",
        help="kill source tracking nodes (not kept by pfsyncd nodes)",
    )
    parser.add_argument(
        "-v", dest="verbose", action="count", default=0, help="more detail (-vv: even more)"
    )
    parser.add_argument("-q", dest="quiet", action="store_true", help="no messages on stderr")
    add_common_arguments(parser)
    return parser


class _Titles:
    """Section titles of ``-s all``: a blank line before each one but the first."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.first = True

    def print(self, title: str) -> None:
        """Print ``title`` (after a blank line unless it is the first), if enabled."""
        if not self.enabled:
            return
        if not self.first:
            print()
        self.first = False
        print(title)


def _print_lines(lines: Sequence[str]) -> None:
    """Write lines to stdout in one call (a chunk of states is thousands of lines)."""
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")


@dataclass(frozen=True)
class _Section:
    """One unary section of ``-s``: where it comes from and how it is shown."""

    title: str  # above it in ``-s all`` (pfctl's titles)
    rpc: str  # ControlService method
    request: type[Message]
    json_field: str | None  # the field --json keeps (None: the whole response)
    render: Callable[[Any, int], list[str]]  # (response, verbosity) -> lines


# In pfctl's order for ``-s all`` (sync is not part of it, as in pfctl).
_SECTIONS: dict[str, _Section] = {
    "info": _Section("INFO:", "GetInfo", pb.GetInfoRequest, None, format_info),
    "timeouts": _Section(
        "TIMEOUTS:",
        "GetTimeouts",
        pb.GetTimeoutsRequest,
        "timeouts",
        lambda m, v: format_timeouts(m),
    ),
    "memory": _Section(
        "LIMITS:", "GetMemory", pb.GetMemoryRequest, "limits", lambda m, v: format_memory(m)
    ),
    "sync": _Section(
        "SYNC:", "GetSyncStatus", pb.GetSyncStatusRequest, None, lambda m, v: format_sync(m)
    ),
}
_IN_ALL = ("info", "timeouts", "memory")


def _show(node: Node, what: str, verbose: int, document: dict[str, Any] | None) -> None:
    """Print (or put in ``document``) the sections of ``-s what``, in pfctl's order."""
    titles = _Titles(enabled=what == "all")
    if what in ("states", "all"):
        _show_states(node, verbose, document, titles)
    for name in _IN_ALL if what == "all" else (what,) if what in _SECTIONS else ():
        section = _SECTIONS[name]
        reply = node.call(getattr(node.control, section.rpc), section.request())
        if document is not None:
            data = message_to_dict(reply)
            document[name] = data if section.json_field is None else data[section.json_field]
        else:
            titles.print(section.title)
            _print_lines(section.render(reply, verbose))


def _show_states(
    node: Node, verbose: int, document: dict[str, Any] | None, titles: _Titles
) -> None:
    """``-s states``: streamed, printed chunk by chunk."""
    stream = node.stream(node.control.ListStates, pb.ListStatesRequest())
    if document is not None:
        document["states"] = [state_to_json(s) for chunk in stream for s in chunk.states]
        return
    titled = False
    for chunk in stream:
        # pfctl prints the title only above a non-empty table.
        if chunk.states and not titled:
            titles.print("STATES:")
            titled = True
        _print_lines([line for s in chunk.states for line in format_state(s, verbose)])


class _Say:
    """pfctl's action messages: stderr, unless -q."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr)


def _flush(node: Node, what: str, say: _Say, document: dict[str, Any] | None) -> None:
    """Clear states and/or counters (``-F``), states first as ``pfctl -F all`` does."""
    flushed: dict[str, Any] = {}
    if what in ("states", "all"):
        cleared = node.call(node.control.ClearStates, pb.ClearStatesRequest()).cleared
        say(f"{cleared} states cleared")
        flushed["states"] = cleared
    if what in ("info", "all"):
        node.call(node.control.ClearCounters, pb.ClearCountersRequest())
        say("pf: statistics cleared")
        flushed["info"] = True
    if document is not None:
        document["flushed"] = flushed


def _kill(
    node: Node, target: KillById | KillByHost, say: _Say, document: dict[str, Any] | None
) -> None:
    """Kill states (``-k``) and report the counts as pfctl does."""
    if isinstance(target, KillById):
        killed = node.call(node.control.KillStates, target.request()).killed
        say(f"killed {killed} states")
        if document is not None:
            document["killed"] = {"states": killed}
        return
    killed = sources = destinations = 0
    for src in target.sources:
        sources += 1
        if target.destinations is None:
            killed += node.call(node.control.KillStates, pb.KillStatesRequest(src=src)).killed
            continue
        # pfctl restarts the destination count for every source, so the message shows
        # the count of the last source; kept for the same output.
        destinations = 0
        for dst in target.destinations:
            if (":" in dst.address) != (":" in src.address):  # another address family
                continue
            destinations += 1
            request = pb.KillStatesRequest(src=src, dst=dst)
            killed += node.call(node.control.KillStates, request).killed
    say(f"killed {killed} states from {sources} sources and {destinations} destinations")
    if document is not None:
        document["killed"] = {
            "states": killed,
            "sources": sources,
            "destinations": destinations,
        }


def _run(argv: Sequence[str] | None) -> int:
    args: argparse.Namespace = build_parser().parse_args(argv)
    show = lookup_option(args.show, SHOW_MODIFIERS, "show") if args.show is not None else None
    flush = lookup_option(args.flush, FLUSH_MODIFIERS, "flush") if args.flush is not None else None
    # Checked (and names resolved) before connecting, so a bad -k changes nothing.
    kill = parse_kill(args.kill) if args.kill else None
    if args.kill_src_nodes:
        raise ToolError("-K: pfsyncd nodes keep no source tracking nodes")
    if show is None and flush is None and kill is None:
        raise UsageError("nothing to do: give -s, -F or -k")
    target = resolve_target(args)
    document: dict[str, Any] | None = {} if args.json else None
    say = _Say(args.quiet)
    with Node(target) as node:
        if show is not None:
            _show(node, show, args.verbose, document)
        if flush is not None:
            _flush(node, flush, say, document)
        if kill is not None:
            _kill(node, kill, say, document)
    if document is not None:
        print_json(document)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run pfctl with ``argv`` (default: the process arguments); return the exit status."""
    return run_tool(PROG, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
