"""pfnetstat: a pfsyncd node's netstat, read through its gRPC API only (the sysctl tree first).

- ``-s`` every protocol section (tcp, udp, icmp, pf, pfsync, bpf); ``-p PROTO`` only one;
  ``-ss`` hides zero counters; ``-s -p tcp -V`` adds the vestigial time-wait statistics;
- ``-a`` connections (``-V``: with an Expires column; ``-n`` numeric, the default;
  ``-f inet|inet6``);
- ``-i`` interfaces (every packet source), ``-b`` bytes, ``-d`` drops;
  ``-I IF -w N`` one line every N seconds (first the totals, then deltas; banner every
  21 lines), ``-c N`` stops after N lines;
- ``-m`` memory by owner; ``-B`` taps (admin call on the node); ``-s -B`` tap totals;
- the tools' common ``-N/--node``, ``--token-file``, ``--json``.

Figures come from sysctl nodes (net.inet.tcp.stats, net.inet.pfsync.stats,
net.interfaces.*, kern.pool.*, net.bpf.*), connections from ListStates. Usage errors exit
2 in one line, an unreachable node 1.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc

from pfsync.v1 import control_pb2 as cpb
from pfsync.v1 import sysctl_pb2 as pb
from tools import netstat_format as fmt
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

PROG = "pfnetstat"
PROTOCOLS = ("tcp", "udp", "icmp", "pf", "pfsync", "bpf")
STAT_NODES = {
    "tcp": "net.inet.tcp.stats",
    "udp": "net.inet.udp.stats",
    "icmp": "net.inet.icmp.stats",
    "pf": "net.pf.stats",
    "pfsync": "net.inet.pfsync.stats",
    "bpf": "net.bpf.stats",
}
# Sections that need a feature the node may not have (no sync engine, no taps).
OPTIONAL = {"pfsync", "bpf"}


class Sysctl:
    """Reads of one node's sysctl tree: struct nodes as dicts."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def list(self, prefix: str, missing_ok: bool = False) -> list[pb.SysctlNode]:
        """The nodes under ``prefix`` ([] for an unknown prefix when ``missing_ok``)."""
        try:
            reply = self.node.sysctl.ListSysctls(
                pb.ListSysctlsRequest(prefix=prefix),
                timeout=self.node.timeout,
                metadata=self.node.metadata,
            )
        except grpc.RpcError as exc:
            # NOT_FOUND: the node has no such node (a feature it does not run).
            if (
                missing_ok
                and isinstance(exc, grpc.Call)
                and exc.code() is grpc.StatusCode.NOT_FOUND
            ):
                return []
            raise self.node.failure(exc) from None
        return list(reply.nodes)

    def fields(self, name: str, missing_ok: bool = False) -> dict[str, int] | None:
        """A struct node's fields, or None when the node lacks it (``missing_ok``)."""
        found = [n for n in self.list(name, missing_ok) if n.name == name]
        if not found:
            if missing_ok:
                return None
            raise ToolError(f"node {self.node.target.address} has no {name}")
        return struct_fields(found[0])


def struct_fields(node: pb.SysctlNode) -> dict[str, int]:
    """A struct sysctl node's fields as a dict (an int node: ``{"value": n}``)."""
    if node.WhichOneof("value") == "fields":
        return {f.name: int(f.value) for f in node.fields.fields}
    return {"value": int(node.integer)}


def groups(nodes: Sequence[pb.SysctlNode], prefix: str) -> list[tuple[str, str, dict[str, int]]]:
    """(name below ``prefix``, description, fields) of struct nodes, sorted by name."""
    return [
        (n.name.removeprefix(prefix + "."), n.description, struct_fields(n))
        for n in sorted(nodes, key=lambda n: n.name)
        if n.WhichOneof("value") == "fields"
    ]


def _parser() -> ToolArgumentParser:
    parser = ToolArgumentParser(
        prog=PROG, description="Show a pfsyncd node's netstat-style counters (like netstat(1))."
    )
    mode = parser.add_argument_group("modes")
    mode.add_argument("-s", action="count", default=0, help="protocol statistics (-ss: no zeros)")
    mode.add_argument("-a", action="store_true", help="connections, TIME_WAIT included")
    mode.add_argument("-i", action="store_true", help="interface table")
    mode.add_argument("-I", metavar="IFACE", help="one interface (with -w: a line per interval)")
    mode.add_argument("-m", action="store_true", help="memory by owner")
    mode.add_argument("-B", action="store_true", help="active taps (-s -B: tap totals)")
    parser.add_argument("-p", metavar="PROTO", choices=PROTOCOLS, help="with -s: one protocol")
    parser.add_argument(
        "-V", action="store_true", help="vestigial time-wait: -s -p tcp statistics, -a records"
    )
    parser.add_argument("-n", action="store_true", help="numeric addresses (the default)")
    parser.add_argument("-f", metavar="FAMILY", choices=("inet", "inet6"), help="with -a")
    parser.add_argument("-b", action="store_true", help="with -i: bytes")
    parser.add_argument("-d", action="store_true", help="with -i: drops")
    parser.add_argument("-w", metavar="SECONDS", type=count_arg(), help="with -I: interval")
    parser.add_argument("-c", metavar="COUNT", type=count_arg(), help="with -w: lines to print")
    add_common_arguments(parser)
    return parser


def _check(args: Any) -> str:
    """The mode the flags ask for; UsageError for combinations netstat refuses."""
    modes = [
        m
        for m, on in (
            ("s", args.s),
            ("a", args.a),
            ("i", args.i),
            ("I", args.I is not None),
            ("m", args.m),
        )
        if on
    ]
    if args.B and args.s:
        modes = ["sB" if m == "s" else m for m in modes]
    elif args.B:
        modes.append("B")
    if len(modes) != 1:
        raise UsageError("give one of -s, -a, -i, -I IFACE, -m, -B")
    mode = modes[0]
    if args.p and mode != "s":
        raise UsageError("-p needs -s")
    if args.V and mode not in ("s", "a"):
        raise UsageError("-V needs -s -p tcp or -a")
    if args.V and mode == "s" and args.p not in (None, "tcp"):
        raise UsageError("-V shows TCP statistics: -s -p tcp -V")
    if args.f and mode != "a":
        raise UsageError("-f needs -a")
    if (args.b or args.d) and mode not in ("i", "I"):
        raise UsageError("-b and -d need -i or -I")
    if args.w is not None and mode != "I":
        raise UsageError("-w needs -I IFACE")
    if args.c is not None and args.w is None:
        raise UsageError("-c needs -w")
    if mode == "I" and not args.I.strip():
        raise UsageError("-I needs an interface name")
    return mode


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    mode = _check(args)
    with Node(resolve_target(args)) as node:
        tree = Sysctl(node)
        if mode == "s":
            return _stats(tree, args)
        if mode == "sB":
            return _stats(tree, args, only="bpf")
        if mode == "a":
            return _connections(node, args)
        if mode == "i":
            return _interfaces(tree, args)
        if mode == "I":
            return _interval(tree, args) if args.w else _one_interface(tree, args)
        if mode == "m":
            return _memory(tree, args)
        return _bpf_peers(tree, args)


def _stats(tree: Sysctl, args: Any, only: str | None = None) -> int:
    wanted = [only or args.p] if (only or args.p) else list(PROTOCOLS)
    document: dict[str, Any] = {}
    lines: list[str] = []
    for proto in wanted:
        explicit = len(wanted) == 1
        stats = tree.fields(STAT_NODES[proto], missing_ok=proto in OPTIONAL)
        if stats is None:
            if explicit:
                raise ToolError(
                    f"node {tree.node.target.address} has no {STAT_NODES[proto]}"
                    + (" (no taps on this node)" if proto == "bpf" else "")
                )
            continue
        if proto == "pf":
            denied = tree.list("net.pf.api.denied", missing_ok=True)
            if denied:
                stats["denied"] = int(denied[0].integer)
        document[proto] = stats
        lines += fmt.format_section(proto, stats, hide_zeros=args.s >= 2)
        if proto == "tcp" and args.V:
            vtw = tree.fields("net.inet.tcp.vtw.stats")
            assert vtw is not None
            document["tcp_vtw"] = vtw
            lines += fmt.format_vtw(vtw, hide_zeros=args.s >= 2)
    _emit(args, document, lines)
    return 0


def _emit(args: Any, document: Any, lines: list[str]) -> None:
    if args.json:
        print_json(document)
    elif lines:
        print("\n".join(lines))


def _connections(node: Node, args: Any) -> int:
    rows = []
    for chunk in node.stream(node.control.ListStates, cpb.ListStatesRequest()):
        for state in chunk.states:
            if state.vestigial and not args.V:
                continue  # compact TIME_WAIT records are listed with -V
            if args.f == "inet" and state.af != cpb.ADDRESS_FAMILY_IPV4:
                continue
            if args.f == "inet6" and state.af != cpb.ADDRESS_FAMILY_IPV6:
                continue
            rows.append(fmt.connection_row(state))
    if args.json:
        print_json({"connections": rows})
        return 0
    out = sys.stdout
    out.write("\n".join(fmt.connections_header(args.V)) + "\n")
    for row in rows:
        out.write(fmt.format_connection(row, args.V) + "\n")
    return 0


def _interface_list(tree: Sysctl) -> list[tuple[str, str, dict[str, int]]]:
    return fmt_sorted(groups(tree.list("net.interfaces", missing_ok=True), "net.interfaces"))


def fmt_sorted(
    items: list[tuple[str, str, dict[str, int]]],
) -> list[tuple[str, str, dict[str, int]]]:
    """Interfaces in netstat's order: by name."""
    return sorted(items, key=lambda item: item[0])


def _interfaces(tree: Sysctl, args: Any) -> int:
    interfaces = _interface_list(tree)
    if args.json:
        print_json({"interfaces": [{"name": n, "description": d, **s} for n, d, s in interfaces]})
        return 0
    print("\n".join(fmt.format_interfaces(interfaces, args.b, args.d)))
    return 0


def _find_interface(
    interfaces: list[tuple[str, str, dict[str, int]]], name: str, tree: Sysctl
) -> dict[str, int]:
    for n, _, s in interfaces:
        if n == name:
            return s
    known = ", ".join(n for n, _, _ in interfaces) or "none"
    raise UsageError(f"no interface {name!r} on node {tree.node.target.address} (has: {known})")


def _one_interface(tree: Sysctl, args: Any) -> int:
    interfaces = _interface_list(tree)
    _find_interface(interfaces, args.I, tree)
    chosen = [item for item in interfaces if item[0] == args.I]
    if args.json:
        print_json({"interfaces": [{"name": n, "description": d, **s} for n, d, s in chosen]})
        return 0
    print("\n".join(fmt.format_interfaces(chosen, args.b, args.d)))
    return 0


def _interval(tree: Sysctl, args: Any) -> int:
    before: tuple[dict[str, int], dict[str, int]] | None = None
    printed = 0
    try:
        while True:
            interfaces = _interface_list(tree)
            iface = _find_interface(interfaces, args.I, tree)
            total = {f: sum(s.get(f, 0) for _, _, s in interfaces) for f in fmt.INTERVAL_FIELDS}
            now = (dict(iface), total)
            d_if = fmt.delta(now[0], before[0] if before else None)
            d_total = fmt.delta(now[1], before[1] if before else None)
            before = now
            if args.json:
                line = json.dumps({"interface": args.I, args.I: d_if, "total": d_total})
                print(line, flush=True)
            else:
                if printed % fmt.BANNER_EVERY == 0:
                    print("\n".join(fmt.interval_banner(args.I)))
                print(fmt.interval_row(d_if, d_total), flush=True)
            printed += 1
            if args.c is not None and printed >= args.c:
                return 0
            time.sleep(args.w)
    except KeyboardInterrupt:
        return 0


def _memory(tree: Sysctl, args: Any) -> int:
    owners = groups(tree.list("kern.pool", missing_ok=True), "kern.pool")
    if args.json:
        print_json({"pools": [{"name": n, "description": d, **s} for n, d, s in owners]})
        return 0
    print("\n".join(fmt.format_memory(owners)))
    return 0


_BPF_INTS = ("id", "pid", "recv", "drop", "capt", "bufsize", "buffered")


def parse_bpf_peers(node: pb.SysctlNode) -> list[dict[str, Any]]:
    """The taps of ``net.bpf.peers``: one line per tap, ``key=value`` words (``id pid comm
    if flags recv drop capt bufsize buffered peer``), then ``filter=`` to the line's end."""
    if node.WhichOneof("value") != "text":
        raise ToolError("net.bpf.peers is not a text node")
    peers: list[dict[str, Any]] = []
    for line in (node.text or "").splitlines():
        head, _, expression = line.partition(" filter=")
        peer: dict[str, Any] = {"filter": expression}
        for word in head.split():
            key, sep, value = word.partition("=")
            if not sep:
                raise ToolError(f"net.bpf.peers: cannot read {word!r}")
            peer["ifname" if key == "if" else key] = int(value) if key in _BPF_INTS else value
        peers.append(peer)
    return peers


def _bpf_peers(tree: Sysctl, args: Any) -> int:
    found = [n for n in tree.list("net.bpf.peers", missing_ok=True) if n.name == "net.bpf.peers"]
    if not found:
        raise ToolError(f"node {tree.node.target.address} has no net.bpf.peers (no taps)")
    peers = parse_bpf_peers(found[0])
    if args.json:
        print_json({"peers": peers})
        return 0
    print("\n".join(fmt.format_bpf_peers(peers)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run pfnetstat with ``argv`` (default: the process arguments); return the exit status."""
    return run_tool(PROG, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
