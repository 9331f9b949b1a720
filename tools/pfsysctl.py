"""pfsysctl: read and set a pfsyncd node's sysctl tree, the way BSD's sysctl(8) does.

- ``pfsysctl NAME...`` prints ``NAME = VALUE`` for each node; a NAME that is a subtree
  (``net.inet.tcp.vtw``) prints every node below it, a struct node prints one line per
  field (``net.inet.tcp.vtw.stats.ins = 3``), and ``STRUCT.FIELD`` prints that field;
- ``pfsysctl -a`` prints the whole tree;
- ``pfsysctl -w NAME=VALUE...`` sets nodes and prints ``NAME: OLD -> NEW``;
- ``-n`` prints values only, ``-d`` descriptions instead of values;
- the tools' common ``-N/--node``, ``--token-file`` and ``--json``.

Unknown names, bad values and read-only nodes are refused by the node in one line,
exit status 2 (a usage error); an unreachable node exits 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from pfsync.v1 import sysctl_pb2 as pb
from tools.client import (
    Node,
    ToolArgumentParser,
    UsageError,
    add_common_arguments,
    message_to_dict,
    print_json,
    resolve_target,
    run_tool,
)

PROG = "pfsysctl"


def node_lines(
    node: pb.SysctlNode, values_only: bool = False, descriptions: bool = False
) -> list[str]:
    """The lines sysctl(8) prints for one node (one per field of a struct node)."""
    if descriptions:
        return [f"{node.name}: {node.description}"]
    kind = node.WhichOneof("value")
    if kind == "fields":
        pairs = [(f"{node.name}.{f.name}", str(f.value)) for f in node.fields.fields]
    elif kind == "flag":
        pairs = [(node.name, "1" if node.flag else "0")]
    elif kind == "integer":
        pairs = [(node.name, str(node.integer))]
    else:
        pairs = [(node.name, node.text)]
    return [value if values_only else f"{name} = {value}" for name, value in pairs]


def _value_text(node: pb.SysctlNode) -> str:
    return node_lines(node, values_only=True)[0]


def _run(argv: Sequence[str] | None) -> int:
    parser = ToolArgumentParser(
        prog=PROG, description="Read and set a pfsyncd node's sysctl tree (like sysctl(8))."
    )
    parser.add_argument("-a", action="store_true", help="list every node")
    parser.add_argument(
        "-w", action="store_true", help="set: each argument is NAME=VALUE (admin call)"
    )
    parser.add_argument("-n", action="store_true", help="print values without names")
    parser.add_argument("-d", action="store_true", help="print descriptions, not values")
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="node, subtree or STRUCT.FIELD names (NAME=VALUE with -w)",
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.a and (args.names or args.w):
        raise UsageError("-a takes no names and cannot be combined with -w")
    if not args.a and not args.names:
        raise UsageError("give NAME..., -w NAME=VALUE... or -a")
    if args.w:
        for item in args.names:
            if "=" not in item or not item.partition("=")[0]:
                raise UsageError(f"-w needs NAME=VALUE, got {item!r}")
    elif any("=" in name for name in args.names):
        raise UsageError("NAME=VALUE needs -w")

    document: list[dict[str, Any]] = []
    lines: list[str] = []
    with Node(resolve_target(args)) as node:
        if args.w:
            for item in args.names:
                name, _, value = item.partition("=")
                reply = node.call(
                    node.sysctl.SetSysctl, pb.SetSysctlRequest(name=name, value=value)
                )
                document.append(message_to_dict(reply))
                lines.append(
                    _value_text(reply.node)
                    if args.n
                    else f"{name}: {_value_text(reply.previous)} -> {_value_text(reply.node)}"
                )
        else:
            for prefix in [""] if args.a else args.names:
                listing = node.call(node.sysctl.ListSysctls, pb.ListSysctlsRequest(prefix=prefix))
                for found in listing.nodes:
                    document.append(message_to_dict(found))
                    lines += node_lines(found, args.n, args.d)
    if args.json:
        print_json({"nodes": document})
    else:
        print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run pfsysctl with ``argv`` (default: the process arguments); return the exit status."""
    return run_tool(PROG, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
