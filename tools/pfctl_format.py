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


def format_address(address: str) -> str:
    """Return an address as the node wrote it (inet_ntop's form), or ``?`` when it has none,
    as pfctl prints when inet_ntop fails."""
    return address or "?"


def format_host(address: str, port: int, af: int) -> str:
    """Return ``addr:port`` (IPv4) or ``addr[port]`` (IPv6); no port when it is 0."""
    text = format_address(address)
    if not port:
        return text
    return f"{text}[{port}]" if af == pb.ADDRESS_FAMILY_IPV6 else f"{text}:{port}"


def _level(peer: pb.PeerState, proto: int) -> int:
    """pf's number for a peer's level: the wire enums count from 1 (0 is "unset").

    The enum member read follows the state's protocol, as pf's meaning of the number does;
    an unset level reads as pf's 0.
    """
    value: int
    if proto == IPPROTO_TCP:
        value = peer.tcp_state
    elif proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        value = peer.icmp_state
    else:
        value = peer.udp_state
    return max(value - 1, 0)


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
    a, b = _level(first, proto), _level(second, proto)
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
    if state.direction == pb.DIRECTION_OUT:
        first = format_host(state.src_address, state.src_port, state.af)
        second = format_host(state.dst_address, state.dst_port, state.af)
        arrow, peer1, peer2 = "->", state.src, state.dst
    else:
        # pf takes every direction but OUT down this branch, so do we.
        first = format_host(state.dst_address, state.dst_port, state.af)
        second = format_host(state.src_address, state.src_port, state.af)
        arrow, peer1, peer2 = "<-", state.dst, state.src
    proto = PROTOCOL_NAMES.get(state.proto, str(state.proto))
    # "    " after the hosts, then "   " before the states: pf prints them separately.
    lines = [
        f"{state.ifname} {proto} {first} {arrow} {second}       "
        + _peer_states(state.proto, peer1, peer2)
    ]
    if verbose and state.proto == IPPROTO_TCP:
        # wscale is shown only when both sides offered it (pf keeps it 0 otherwise).
        both_scale = peer1.wscale_offered and peer2.wscale_offered
        seq1 = format_seq(peer1)
        seq2 = format_seq(peer2)
        if both_scale:
            seq1 += f" wscale {peer1.wscale}"
            seq2 += f" wscale {peer2.wscale}"
        lines.append(f"   {seq1}  {seq2}")
    if verbose:
        line = (
            f"   age {_hms(state.age_seconds)}, expires in {_hms(state.expires_in_seconds)}, "
            f"{state.src.packets}:{state.dst.packets} pkts, "
            f"{state.src.bytes}:{state.dst.bytes} bytes"
        )
        if state.HasField("rule"):
            line += f", rule {state.rule}"
        lines.append(line)
    if verbose >= 2:
        # The node sends %016x / %08x already; zfill keeps pf's widths for shorter text.
        lines.append(f"   id: {state.id.zfill(16)} creatorid: {state.creatorid.zfill(8)}")
    return lines


def _counter_row(name: str, value: int, runtime: int) -> str:
    """A ``Total`` row with its ``Rate`` column, blank when pf has no running time."""
    rate = f"{value / runtime:14.1f}/s" if runtime > 0 else f"{'':14s}"
    return f"  {name:<25s} {value:14d} {rate}"


def format_info(info: pb.GetInfoResponse, verbose: int = 0) -> list[str]:
    """Return the lines ``pfctl -s info`` prints (with ``-v``, also the hostid and the
    node's packet sources: frames read and frames the kernel dropped, per source).

    pf's -v sections this node has no data for (ruleset checksum, source tracking,
    fragments, limit counters, syncookie watermarks) are not printed.
    """
    runtime = info.enabled_for.seconds
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
        lines += [f"Hostid:   0x{info.hostid.zfill(8)}", ""]
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
    if verbose and info.sources:
        # Not in pf (its packets come from interfaces): where this node's frames come from.
        lines.append(f"{'Packet sources':<27s} {'Frames':>14s} {'Drops':>16s}")
        for src in info.sources:
            kind = "capture" if src.kind == pb.PACKET_SOURCE_KIND_CAPTURE else "pcap"
            row = f"  {kind + ' ' + src.name:<25s} {src.frames:14d} {src.drops:16d}"
            if src.error:
                row += f"  error: {src.error}"
            elif src.done:
                row += "  done"
            lines.append(row)
    return lines


def format_timeouts(timeouts: pb.GetTimeoutsResponse) -> list[str]:
    """Return the lines ``pfctl -s timeouts`` prints, in the node's (pf's) order."""
    return [
        f"{t.name:<20s} {t.states:10d} states"
        if t.WhichOneof("value") == "states"
        else f"{t.name:<20s} {t.duration.seconds:10d}s"
        for t in timeouts.timeouts
    ]


def format_memory(memory: pb.GetMemoryResponse) -> list[str]:
    """Return the lines ``pfctl -s memory`` prints: one hard limit per pool."""
    return [
        f"{limit.name:<13s} "
        + ("unlimited" if limit.unlimited else f"hard limit {limit.hard_limit:8d}")
        for limit in memory.limits
    ]


def state_to_json(state: pb.State) -> dict[str, Any]:
    """Return a state as a JSON-ready dict (proto3 JSON; addresses and ids are text)."""
    return message_to_dict(state)


def _ms(duration: Any) -> str:
    millis = duration.ToMilliseconds()
    return f"{millis}ms" if millis < 10_000 else f"{millis // 1000}s"


def format_sync(status: pb.GetSyncStatusResponse) -> list[str]:
    """``pfctl -s sync``: readiness, settings, digests and one row per peer stream."""
    if not status.enabled:
        return [f"pfsync: off{'':35}hostid 0x{status.hostid}"]
    state = "ready" if status.ready else "NOT ready"
    lines = [
        f"{f'pfsync: {state} ({status.ready_reason})':<47} hostid 0x{status.hostid}",
        f"  listen {status.listen_address or '-'}  maxupd {status.maxupd}  "
        f"flush {_ms(status.flush_interval)}  defer {'on' if status.defer else 'off'}",
        f"  digest {status.digest} over {status.digest_states} states",
    ]
    if not status.peers:
        return lines + ["  no peers"]
    lines.append(
        f"  {'Peer':<24} {'Up':<4} {'Creatorid':<9} {'Bulk':<9} {'Frames in/out':>17} "
        f"{'States in/out':>19} {'Lag p50/p99':>13} Digest"
    )
    for p in status.peers:
        address = ("<- " if p.inbound else "-> ") + p.address
        lag = f"{_ms(p.lag_p50)}/{_ms(p.lag_p99)}" if p.HasField("lag_p99") else "-"
        if not p.peer_digest:
            digest = "-"
        else:
            digest = "agrees" if p.digest_agrees else f"differs ({p.peer_digest})"
        lines.append(
            f"  {address:<24} {'yes' if p.connected else 'no':<4} {p.creatorid or '-':<9} "
            f"{p.bulk or '-':<9} {f'{p.frames_in}/{p.frames_out}':>17} "
            f"{f'{p.states_in}/{p.states_out}':>19} {lag:>13} {digest}"
        )
        if p.last_error:
            lines.append(f"    last error: {p.last_error}")
    return lines
