"""pfnetstat's text output, in NetBSD netstat's layouts: sysctl values in, lines out.

Every function here is pure (no I/O, no node), so the exact output can be tested from
hand-built replies. Statistics come as ``{field: value}`` dicts of a struct sysctl node
(``net.inet.tcp.stats`` and friends); connections as ``pfsync.v1.State`` messages.

- ``-s`` sections (``format_section``): ``proto:`` then one tab-indented line per counter,
  ``%llu thing%s`` with the plural ``s`` only when the count is not 1, zero lines hidden
  with ``-ss``; ``pfsync`` in OpenBSD's ``pfsync_stats`` order and words, the VTW block of
  ``-s -p tcp -V`` in NetBSD's (REFERENCE.md sections 3 and 4);
- ``-a`` (``format_connections``), ``-i`` (``format_interfaces``), ``-I IF -w N``
  (``interval_banner``/``interval_row``), ``-m`` (``format_memory``), ``-B``
  (``format_bpf_peers``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pfsync.v1 import control_pb2 as pb
from tools.pfctl_format import PROTOCOL_NAMES, TCP_STATE_NAMES

Stats = Mapping[str, int]

# (field, text, plural): text holds "{n}" and "{s}" (the plural suffix, or "" for 1);
# plural False prints the text as is for every count (OpenBSD's p2()).
Line = tuple[str, str]

TCP_LINES: tuple[Line, ...] = (
    ("connattempt", "\t{n} connection request{s}"),
    ("accepts", "\t{n} connection accept{s}"),
    ("connects", "\t{n} connection{s} established"),
    ("closed", "\t{n} connection{s} closed"),
    ("resets", "\t{n} connection{s} reset"),
    ("badstate", "\t{n} segment{s} dropped for state mismatch"),
    ("nostate", "\t{n} segment{s} dropped for no state"),
    ("timewait_passed", "\t{n} segment{s} passed in TIME_WAIT"),
    ("states", "\t{n} connection{s} tracked"),
    ("half_open", "\t\t{n} half-open connection{s}"),
    ("vestigial", "\t{n} vestigial time-wait record{s}"),
)
UDP_LINES: tuple[Line, ...] = (
    ("states", "\t{n} state{s} created"),
    ("current", "\t{n} state{s} tracked"),
)
ICMP_LINES: tuple[Line, ...] = (
    ("states", "\t{n} query state{s} created"),
    ("current", "\t{n} query state{s} tracked"),
    ("errors_passed", "\t{n} error{s} passed for a tracked connection"),
    ("errors_blocked", "\t{n} error{s} blocked for no tracked connection"),
)
PF_LINES: tuple[Line, ...] = (
    ("passed", "\t{n} packet{s} passed"),
    ("blocked", "\t{n} packet{s} blocked"),
    ("states", "\t{n} state{s} in the table"),
    ("searches", "\t{n} state search{es}"),
    ("inserts", "\t{n} state insert{s}"),
    ("removals", "\t{n} state removal{s}"),
    ("other_states", "\t{n} other-protocol state{s} created"),
    ("non_ip", "\t{n} non-IP frame{s} passed"),
    ("denied", "\t{n} admin call{s} denied"),
)
# OpenBSD usr.bin/netstat/if.c pfsync_stats(), in REFERENCE.md's order.
PFSYNC_LINES: tuple[Line, ...] = (
    ("ipackets", "\t{n} packet{s} received (IPv4)"),
    ("ipackets6", "\t{n} packet{s} received (IPv6)"),
    ("badif", "\t\t{n} packet{s} discarded for bad interface"),
    ("badttl", "\t\t{n} packet{s} discarded for bad ttl"),
    ("hdrops", "\t\t{n} packet{s} shorter than header"),
    ("badver", "\t\t{n} packet{s} discarded for bad version"),
    ("badauth", "\t\t{n} packet{s} discarded for bad HMAC"),
    ("badact", "\t\t{n} packet{s} discarded for bad action"),
    ("badlen", "\t\t{n} packet{s} discarded for short packet"),
    ("badval", "\t\t{n} state{s} discarded for bad values"),
    ("stale", "\t\t{n} stale state{s}"),
    ("badstate", "\t\t{n} failed state lookup/insert{s}"),
    ("opackets", "\t{n} packet{s} sent (IPv4)"),
    ("opackets6", "\t{n} packet{s} sent (IPv6)"),
    ("onomem", "\t\t{n} send failed due to mbuf memory error"),
    ("oerrors", "\t\t{n} send error"),
)
BPF_LINES: tuple[Line, ...] = (
    ("recv", "\t{n} total packets received"),
    ("capt", "\t{n} total packets captured"),
    ("drop", "\t{n} total packets dropped"),
)
# NetBSD's names of the per-hash VTW statistics, in netstat's order.
VTW_HASH_FIELDS = ("look", "hit", "miss", "probe", "losing", "max_chain", "max_probe", "max_loss")

SECTIONS: dict[str, tuple[Line, ...]] = {
    "tcp": TCP_LINES,
    "udp": UDP_LINES,
    "icmp": ICMP_LINES,
    "pf": PF_LINES,
    "pfsync": PFSYNC_LINES,
    "bpf": BPF_LINES,
}


def counter_line(template: str, n: int) -> str:
    """One counter line: ``{s}`` is "s" and ``{es}`` "es" unless ``n`` is 1."""
    return template.format(n=n, s="" if n == 1 else "s", es="" if n == 1 else "es")


def format_section(name: str, stats: Stats, hide_zeros: bool = False) -> list[str]:
    """``name:`` and one line per counter of ``SECTIONS[name]``; absent fields are 0."""
    lines = [f"{name}:"]
    for field, template in SECTIONS[name]:
        n = int(stats.get(field, 0))
        if n or not hide_zeros:
            lines.append(counter_line(template, n))
    return lines


def format_vtw(stats: Stats, hide_zeros: bool = False) -> list[str]:
    """The lines ``netstat -s -p tcp -V`` appends (NetBSD's layout, net.inet.tcp.vtw.stats)."""
    lines: list[str] = []

    def add(text: str, n: int) -> None:
        if n or not hide_zeros:
            lines.append(f"\t\t{n} {text}")

    add("inserts", int(stats.get("ins", 0)))
    add("deletes", int(stats.get("del", 0)))
    add("assassinations", int(stats.get("kill", 0)))
    for hash_name in ("lookup_connect", "lookup_port"):
        lines.append(f"\tvestigial time-wait {hash_name}")
        for field in VTW_HASH_FIELDS:
            add(field, int(stats.get(f"{hash_name}.{field}", 0)))
    return lines


# ---- -a: connections ----------------------------------------------------------------

CONNECTIONS_TITLE = "Active Internet connections (including servers)"


def _endpoint(address: str, port: int) -> str:
    """BSD netstat's ``addr.port`` (``*`` for port 0)."""
    return f"{address or '*'}.{port if port else '*'}"


def _tcp_level(peer: pb.PeerState) -> int:
    return max(peer.tcp_state - 1, 0)


def connection_state(state: pb.State) -> str:
    """The ``(state)`` column: TIME_WAIT once both peers are done, else the TCP state of
    the side that opened the connection; blank for protocols without TCP states."""
    if state.proto != 6:
        return ""
    src, dst = _tcp_level(state.src), _tcp_level(state.dst)
    fin_wait_2 = TCP_STATE_NAMES.index("FIN_WAIT_2")
    if state.vestigial or (src >= fin_wait_2 and dst >= fin_wait_2):
        return "TIME_WAIT"
    return TCP_STATE_NAMES[src] if src < len(TCP_STATE_NAMES) else str(src)


def connection_row(state: pb.State) -> dict[str, Any]:
    """One connection as pfnetstat -a shows it (and --json prints it).

    Local is the node's side as pfctl prints it first: the source of an outbound state,
    the destination of an inbound one.
    """
    if state.direction == pb.DIRECTION_OUT:
        local = _endpoint(state.src_address, state.src_port)
        foreign = _endpoint(state.dst_address, state.dst_port)
    else:
        local = _endpoint(state.dst_address, state.dst_port)
        foreign = _endpoint(state.src_address, state.src_port)
    proto = PROTOCOL_NAMES.get(state.proto, str(state.proto))
    if state.af == pb.ADDRESS_FAMILY_IPV6:
        proto += "6"
    return {
        "proto": proto,
        "local": local,
        "foreign": foreign,
        "state": connection_state(state),
        "expires": state.expires_in_seconds,
        "vestigial": state.vestigial,
    }


def connections_header(expires: bool = False) -> list[str]:
    """The title and column header of ``-a`` (``-V`` adds Expires)."""
    head = f"{'Proto':<6} {'Local Address':<45} {'Foreign Address':<45} {'(state)':<12}"
    if expires:
        head += " Expires"
    return [CONNECTIONS_TITLE, head.rstrip()]


def format_connection(row: Mapping[str, Any], expires: bool = False) -> str:
    """One ``-a`` row."""
    line = f"{row['proto']:<6} {row['local']:<45} {row['foreign']:<45} {row['state']:<12}"
    if expires:
        line += f" {row['expires']}s"
    return line.rstrip()


def format_connections(rows: Iterable[Mapping[str, Any]], expires: bool = False) -> list[str]:
    """The whole ``-a`` output."""
    return connections_header(expires) + [format_connection(r, expires) for r in rows]


# ---- -i and -I: interfaces ---------------------------------------------------------

KIND_NETWORK = {"inject": "<inject>", "pfsync0": "<pfsync>"}


def interface_network(name: str, description: str) -> str:
    """The Network column: what kind of packet source the interface is."""
    if name in KIND_NETWORK:
        return KIND_NETWORK[name]
    if description.startswith("pcap replay"):
        return "<pcap>"
    return "<Link>"


def interface_address(description: str) -> str:
    """The Address column: a replay's file (its tail if long), else ``-``."""
    if not description.startswith("pcap replay of "):
        return "-"
    path = description.removeprefix("pcap replay of ")
    return path if len(path) <= 17 else "..." + path[-14:]


def format_interfaces(
    interfaces: Sequence[tuple[str, str, Stats]], show_bytes: bool = False, drops: bool = False
) -> list[str]:
    """``netstat -i`` (``-b``: bytes instead of packets and errors; ``-d``: a Drop column).

    ``interfaces``: (name, description, net.interfaces.<name> fields) sorted by name.
    """
    head = f"{'Name':<9} {'Mtu':>5} {'Network':<9} {'Address':<17}"
    if show_bytes:
        head += f" {'Ibytes':>12} {'Obytes':>12}"
    else:
        head += f" {'Ipkts':>10} {'Ierrs':>5} {'Opkts':>10} {'Oerrs':>5} {'Colls':>5}"
    if drops:
        head += f" {'Drop':>5}"
    lines = [head]
    for name, description, s in interfaces:
        mtu = str(s.get("mtu", 0) or "-")
        address = interface_address(description)
        line = f"{name:<9} {mtu:>5} {interface_network(name, description):<9} {address:<17}"
        if show_bytes:
            line += f" {s.get('ibytes', 0):>12} {s.get('obytes', 0):>12}"
        else:
            line += (
                f" {s.get('ipackets', 0):>10} {s.get('ierrors', 0):>5}"
                f" {s.get('opackets', 0):>10} {s.get('oerrors', 0):>5} {0:>5}"
            )
        if drops:
            line += f" {s.get('drops', 0):>5}"
        lines.append(line)
    return lines


#: netstat -w prints its banner again after this many lines.
BANNER_EVERY = 21
INTERVAL_FIELDS = ("ipackets", "ierrors", "opackets", "oerrors")


def interval_banner(ifname: str) -> list[str]:
    """The two banner lines of ``-I IF -w N``."""
    group = f"{'packets':>8} {'errs':>5} {'packets':>8} {'errs':>5} {'colls':>5}"
    return [
        f"{ifname + ' in':>14} {ifname + ' out':>20}   {'total in':>14} {'total out':>20}",
        f"{group}   {group}",
    ]


def interval_row(iface: Stats, total: Stats) -> str:
    """One ``-w`` line: the interface's and all interfaces' packets and errors."""

    def group(s: Stats) -> str:
        ip, ie, op, oe = (int(s.get(f, 0)) for f in INTERVAL_FIELDS)
        return f"{ip:>8} {ie:>5} {op:>8} {oe:>5} {0:>5}"

    return f"{group(iface)}   {group(total)}"


def delta(now: Stats, before: Stats | None) -> dict[str, int]:
    """``now - before`` per interval field (``now`` itself for the first line)."""
    return {f: int(now.get(f, 0)) - int((before or {}).get(f, 0)) for f in INTERVAL_FIELDS}


# ---- -m: memory by owner -----------------------------------------------------------


def format_memory(owners: Sequence[tuple[str, str, Stats]]) -> list[str]:
    """``-m``: one row per ``kern.pool`` owner: in use, bytes, peak, limit, description."""
    lines = [f"{'Owner':<24} {'Inuse':>10} {'Bytes':>12} {'Peak':>10} {'Limit':>10}  Description"]
    for name, description, s in owners:
        limit = s.get("limit", 0)
        lines.append(
            f"{name:<24} {s.get('inuse', 0):>10} {s.get('bytes', 0):>12} "
            f"{s.get('peak', 0):>10} {str(limit) if limit else '-':>10}  {description}"
        )
    total = sum(int(s.get("bytes", 0)) for _, _, s in owners)
    lines.append(f"{'total':<24} {'':>10} {total:>12}")
    return lines


# ---- -B: taps (bpf peers) -----------------------------------------------------------

#: BPF peer flags in netstat's order: state letter, then P R S H (or -).
BPF_FLAG_LETTERS = (("promisc", "P"), ("immediate", "R"), ("see_sent", "S"), ("hdrcmplt", "H"))


def bpf_flags(peer: Mapping[str, Any]) -> str:
    """netstat -B's Flags: state (I idle, W waiting, T timed out, - none), then P/R/S/H."""
    state = str(peer.get("state", "-"))[:1] or "-"
    return state + "".join(letter if peer.get(key) else "-" for key, letter in BPF_FLAG_LETTERS)


def format_bpf_peers(peers: Sequence[Mapping[str, Any]]) -> list[str]:
    """``netstat -B``: ``Active BPF peers`` and one row per tap."""
    lines = [
        "Active BPF peers",
        f"{'PID':>5} {'Int':<8} {'Recv':>10} {'Drop':>10} {'Capt':>10} {'Flags':<6} "
        f"{'Bufsize':>7} Comm",
    ]
    for p in peers:
        comm = str(p.get("comm", ""))
        if p.get("filter"):
            comm += f" [{p['filter']}]"
        lines.append(
            f"{p.get('pid', 0):>5} {str(p.get('ifname', '')):<8} {p.get('recv', 0):>10} "
            f"{p.get('drop', 0):>10} {p.get('capt', 0):>10} {bpf_flags(p):<6} "
            f"{p.get('bufsize', 0):>7} {comm}".rstrip()
        )
    return lines
