"""pfctl's text output, reproduced from OpenBSD: proto messages in, lines out.

Every function here is pure (no I/O, no node), so the exact output can be tested from
hand-built messages. The layouts follow OpenBSD's sources, which win over any summary:

- ``format_state``: ``print_state`` and ``print_seq`` in ``sbin/pfctl/pf_print_state.c``;
- ``format_info``: ``print_status`` in ``sbin/pfctl/pfctl_parser.c``;
- ``format_timeouts`` / ``format_memory``: ``pfctl_show_timeouts`` / ``pfctl_show_limits``
  in ``sbin/pfctl/pfctl.c``.

Trailing blanks are part of pf's output (``current entries`` rows end in an empty ``%14s``
column) and are kept, so scripts that compare with pfctl see the same bytes.
"""

from __future__ import annotations

import socket
from typing import Any

from pfsync.v1 import control_pb2 as pb
from tools.client import message_to_dict

#: TCP peer states, indexed by number (``tcpstates[]`` from netinet/tcp_fsm.h).
TCP_STATE_NAMES = (
    "CLOSED",
    "LISTEN",
    "SYN_SENT",
    "SYN_RCVD",
    "ESTABLISHED",
    "CLOSE_WAIT",
    "FIN_WAIT_1",
    "CLOSING",
    "LAST_ACK",
    "FIN_WAIT_2",
    "TIME_WAIT",
)
#: pf's synproxy pseudo-states follow the TCP ones (PF_TCPS_PROXY_SRC/DST in pfvar.h).
TCPS_PROXY_SRC = len(TCP_STATE_NAMES)
TCPS_PROXY_DST = TCPS_PROXY_SRC + 1
#: Peer states of UDP and other protocols (PFUDPS_NAMES and PFOTHERS_NAMES are equal).
SINGLE_STATE_NAMES = ("NO_TRAFFIC", "SINGLE", "MULTIPLE")

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_ICMPV6 = 58

#: Protocol names as OpenBSD's /etc/protocols spells them (what getprotobynumber returns
#: there). A fixed table keeps the output the same whatever host pfctl runs on; numbers
#: not listed print as digits, as pfctl does when the lookup fails.
PROTOCOL_NAMES = {
    1: "icmp",
    2: "igmp",
    4: "ipencap",
    6: "tcp",
    17: "udp",
    41: "ipv6",
    47: "gre",
    50: "esp",
    51: "ah",
    58: "ipv6-icmp",
    103: "pim",
    108: "ipcomp",
    112: "carp",
    132: "sctp",
    240: "pfsync",
}

#: pf's ``(u_int32_t)-1``: no rule (State.rule) or no limit (Limit.hard_limit).
UINT32_NONE = 0xFFFFFFFF
#: Low bits of PeerState.wscale that hold the shift (PF_WSCALE_MASK).
WSCALE_MASK = 0x0F


def format_address(addr: bytes, af: int) -> str:
    """Return an address as inet_ntop writes it, or ``?`` as pfctl prints on failure.

    ``socket.inet_ntop`` is used rather than ``ipaddress`` because it, like OpenBSD's,
    writes IPv4-mapped addresses as ``::ffff:192.0.2.1``.
    """
    family = {4: (socket.AF_INET, 4), 6: (socket.AF_INET6, 16)}.get(af)
    if family is None or len(addr) != family[1]:
        return "?"
    return socket.inet_ntop(family[0], addr)


def format_host(addr: bytes, port: int, af: int) -> str:
    """Return ``addr:port`` (IPv4) or ``addr[port]`` (IPv6); no port when it is 0."""
    text = format_address(addr, af)
    if not port:
        return text
    return f"{text}:{port}" if af == 4 else f"{text}[{port}]"


def format_seq(peer: pb.PeerState) -> str:
    """Return ``[seqlo + window]`` with ``(+seqdiff)`` when modulated (pfctl's print_seq)."""
    # The window is seqhi - seqlo in 32-bit sequence space, as the C unsigned subtraction.
    window = (peer.seqhi - peer.seqlo) & 0xFFFFFFFF
    text = f"[{peer.seqlo} + {window}]"
    return f"{text}(+{peer.seqdiff})" if peer.seqdiff else text


def _hms(seconds: int) -> str:
    """``%.2u:%.2u:%.2u`` of hours, minutes, seconds; hours are not wrapped into days."""
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{sec:02d}"


def _peer_states(proto: int, first: pb.PeerState, second: pb.PeerState) -> str:
    """The ``A:B`` state column, named per protocol as print_state names it."""
    a, b = first.state, second.state
    if proto == IPPROTO_TCP:
        if a < len(TCP_STATE_NAMES) and b < len(TCP_STATE_NAMES):
            return f"{TCP_STATE_NAMES[a]}:{TCP_STATE_NAMES[b]}"
        if TCPS_PROXY_SRC in (a, b):
            return "PROXY:SRC"
        if TCPS_PROXY_DST in (a, b):
            return "PROXY:DST"
        return f"<BAD STATE LEVELS {a}:{b}>"
    # UDP and every protocol but ICMP have NO_TRAFFIC/SINGLE/MULTIPLE levels; ICMP's are
    # plain counters ("XXX ICMP doesn't really have state levels" in pf_print_state.c).
    named = proto not in (IPPROTO_ICMP, IPPROTO_ICMPV6)
    if named and a < len(SINGLE_STATE_NAMES) and b < len(SINGLE_STATE_NAMES):
        return f"{SINGLE_STATE_NAMES[a]}:{SINGLE_STATE_NAMES[b]}"
    return f"{a}:{b}"


def format_state(state: pb.State, verbose: int = 0) -> list[str]:
    """Return the lines ``pfctl -s states`` prints for one state (``-v``: 1, ``-vv``: 2).

    pf prints a state from the node's point of view: an outbound state as
    ``src -> dst``, an inbound one as ``dst <- src``, and the peer states, sequence
    windows and wscales in that same printed order; packet and byte counts stay in
    src:dst order. Vestigial (VTW) records already carry TIME_WAIT peers and print
    like any TCP state.
    """
    if state.direction == pb.State.OUT:
        first = format_host(state.src_addr, state.src_port, state.af)
        second = format_host(state.dst_addr, state.dst_port, state.af)
        arrow, peer1, peer2 = "->", state.src, state.dst
    else:
        # pf takes every direction but OUT down this branch, so do we.
        first = format_host(state.dst_addr, state.dst_port, state.af)
        second = format_host(state.src_addr, state.src_port, state.af)
        arrow, peer1, peer2 = "<-", state.dst, state.src
    proto = PROTOCOL_NAMES.get(state.proto, str(state.proto))
    # "    " after the hosts, then "   " before the states: pf prints them separately.
    lines = [
        f"{state.ifname} {proto} {first} {arrow} {second}       "
        + _peer_states(state.proto, peer1, peer2)
    ]
    if verbose and state.proto == IPPROTO_TCP:
        # wscale is shown only when both sides offered it (pf keeps it 0 otherwise).
        both_scale = bool(peer1.wscale and peer2.wscale)
        seq1 = format_seq(peer1)
        seq2 = format_seq(peer2)
        if both_scale:
            seq1 += f" wscale {peer1.wscale & WSCALE_MASK}"
            seq2 += f" wscale {peer2.wscale & WSCALE_MASK}"
        lines.append(f"   {seq1}  {seq2}")
    if verbose:
        line = (
            f"   age {_hms(state.age_seconds)}, expires in {_hms(state.expires_in)}, "
            f"{state.src.packets}:{state.dst.packets} pkts, "
            f"{state.src.bytes}:{state.dst.bytes} bytes"
        )
        if state.rule != UINT32_NONE:
            line += f", rule {state.rule}"
        lines.append(line)
    if verbose >= 2:
        lines.append(f"   id: {state.id:016x} creatorid: {state.creatorid:08x}")
    return lines


def _counter_row(name: str, value: int, runtime: int) -> str:
    """A ``Total`` row with its ``Rate`` column, blank when pf has no running time."""
    rate = f"{value / runtime:14.1f}/s" if runtime > 0 else f"{'':14s}"
    return f"  {name:<25s} {value:14d} {rate}"


def format_info(info: pb.Info, verbose: int = 0) -> list[str]:
    """Return the lines ``pfctl -s info`` prints (with ``-v``, also the hostid).

    pf's -v sections this node has no data for (ruleset checksum, source tracking,
    fragments, limit counters, syncookie watermarks) are not printed.
    """
    runtime = info.enabled_seconds
    status = "Enabled" if info.running else "Disabled"
    if runtime:
        minutes, sec = divmod(runtime, 60)
        hours, minutes = divmod(minutes, 60)
        days, hours = divmod(hours, 24)
        statline = f"Status: {status} for {days} days {hours:02d}:{minutes:02d}:{sec:02d}"
    else:
        statline = f"Status: {status}"
    lines = [f"{statline:<44s}{'Debug: ' + info.debug:>15s}", ""]
    if verbose:
        lines += [f"Hostid:   0x{info.hostid:08x}", ""]
    lines.append(f"{'State Table':<27s} {'Total':>14s} {'Rate':>16s}")
    # Gauges have no rate: pf prints an empty %14s column, trailing blanks included.
    lines.append(f"  {'current entries':<25s} {info.current_entries:14d} {'':14s}")
    lines.append(f"  {'half-open tcp':<25s} {info.half_open_tcp:14d} {'':14s}")
    for name, value in (
        ("searches", info.searches),
        ("inserts", info.inserts),
        ("removals", info.removals),
    ):
        lines.append(_counter_row(name, value, runtime))
    lines.append("Counters")
    lines.extend(_counter_row(c.name, c.value, runtime) for c in info.counters)
    return lines


def format_timeouts(timeouts: pb.Timeouts) -> list[str]:
    """Return the lines ``pfctl -s timeouts`` prints, in the node's (pf's) order."""
    return [
        f"{t.name:<20s} {t.seconds:10d}" + ("s" if t.unit == "s" else f" {t.unit}")
        for t in timeouts.timeouts
    ]


def format_memory(memory: pb.Memory) -> list[str]:
    """Return the lines ``pfctl -s memory`` prints: one hard limit per pool."""
    return [
        f"{limit.name:<13s} "
        + ("unlimited" if limit.hard_limit == UINT32_NONE else f"hard limit {limit.hard_limit:8d}")
        for limit in memory.limits
    ]


def state_to_json(state: pb.State) -> dict[str, Any]:
    """Return a state as a JSON-ready dict, with addresses as text rather than base64."""
    document = message_to_dict(state)
    document["src_addr"] = format_address(state.src_addr, state.af)
    document["dst_addr"] = format_address(state.dst_addr, state.af)
    return document
