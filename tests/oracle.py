"""The Linux kernel's nf_conntrack as an independent tracker, and the rules to compare with it.

`enable_conntrack(ns)` loads an nftables ruleset that uses conntrack state in namespace `ns`
(that is what makes the kernel track the namespace's connections); `kernel_flows(ns)` reads
the table with ``conntrack -L``. `judge(flow, state)` says whether the node's state
for a flow agrees with the kernel's entry, with the rules the README documents ("Checked
against the Linux kernel").
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

# Conntrack in both hooks: the input chain accepts what conntrack calls new/established/
# related, and both chains count what it calls invalid (the kernel's own "state-mismatch").
RULESET = """
table inet pfsync_oracle {
  chain input {
    type filter hook input priority 0; policy accept;
    ct state invalid counter
    ct state { new, established, related } counter accept
  }
  chain output {
    type filter hook output priority 0; policy accept;
    ct state invalid counter
  }
}
"""

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class KernelFlow:
    """One nf_conntrack entry: original direction's endpoints, protocol and TCP state."""

    proto: int
    src: Endpoint
    dst: Endpoint
    state: str  # TCP: ESTABLISHED, TIME_WAIT, CLOSE, ...; other protocols: "" (none)
    replied: bool  # the kernel saw the reply direction (not [UNREPLIED])

    @property
    def endpoints(self) -> frozenset[Endpoint]:
        """The flow's two ends, unordered (the node and the kernel may name them differently)."""
        return frozenset((self.src, self.dst))


def _text(address: str) -> str:
    return str(ip_address(address))  # one spelling for IPv6 on both sides


def enable_conntrack(ns: str) -> None:
    """Make the kernel track every connection of namespace `ns` (nft rules using ct state)."""
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"],
        input=RULESET,
        text=True,
        check=True,
        capture_output=True,
    )


def invalid_packets(ns: str) -> int:
    """Packets the kernel's conntrack judged invalid in `ns` (the ruleset's counters)."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "pfsync_oracle"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    import json

    total = 0
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if not rule:
            continue
        exprs = rule["expr"]
        if any(e.get("match", {}).get("right") == "invalid" for e in exprs):
            total += sum(e["counter"]["packets"] for e in exprs if "counter" in e)
    return total


def kernel_flows(ns: str) -> list[KernelFlow]:
    """Every entry of the kernel's conntrack table in `ns` (IPv4 and IPv6).

    Read as ``conntrack -L -o extended`` text: its XML output leaves out the ICMP echo id.
    """
    flows = []
    for family in ("ipv4", "ipv6"):
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "conntrack", "-L", "-f", family, "-o", "extended"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        flows += [_parse(line) for line in out.splitlines() if line.strip()]
    return flows


def _parse(line: str) -> KernelFlow:
    """One line: ``ipv4 2 tcp 6 119 TIME_WAIT src=.. dst=.. sport=.. dport=.. [flags] src=..``.

    The first src/dst/sport/dport/id are the original direction's; the second the reply's.
    """
    fields = line.split()
    proto = int(fields[3])
    state = fields[5] if proto == 6 and "=" not in fields[5] else ""
    original: dict[str, str] = {}
    for token in fields[5:]:
        key, sep, value = token.partition("=")
        if sep and key not in original:
            original[key] = value
    if proto in (1, 58):  # ICMP: the echo id stands for both ports, as in pf
        sport = dport = int(original.get("id", "0"))
    else:
        sport, dport = int(original.get("sport", "0")), int(original.get("dport", "0"))
    return KernelFlow(
        proto,
        (_text(original["src"]), sport),
        (_text(original["dst"]), dport),
        state,
        "[UNREPLIED]" not in fields,
    )


def node_endpoints(state: dict[str, Any]) -> frozenset[Endpoint]:
    """A node state's two ends, unordered, in the kernel's spelling."""
    return frozenset(
        (
            (_text(state["src_address"]), int(state["src_port"])),
            (_text(state["dst_address"]), int(state["dst_port"])),
        )
    )


def peer_states(state: dict[str, Any]) -> tuple[str, str]:
    """The node state's two peer-state names, short (``ESTABLISHED``, ``SINGLE``, ...)."""
    names = []
    for side in ("src", "dst"):
        peer = state[side]
        value = peer.get("tcp_state") or peer.get("udp_state") or peer.get("icmp_state") or ""
        names.append(value.split("_PEER_STATE_")[-1])
    return names[0], names[1]


def describe_node(state: dict[str, Any] | None) -> str:
    """One line for a node state (or its absence), for disagreement messages."""
    if state is None:
        return "node: no state"
    src, dst = peer_states(state)
    kind = "vestigial " if state.get("vestigial") else ""
    return (
        f"node: {kind}{state['src_address']}:{state['src_port']} -> "
        f"{state['dst_address']}:{state['dst_port']} proto {state['proto']} {src}:{dst}"
    )


def describe_kernel(flow: KernelFlow | None) -> str:
    """One line for a conntrack entry (or its absence), for disagreement messages."""
    if flow is None:
        return "kernel: no entry"
    replied = "" if flow.replied else " [UNREPLIED]"
    return (
        f"kernel: {flow.src[0]}:{flow.src[1]} -> {flow.dst[0]}:{flow.dst[1]} "
        f"proto {flow.proto} {flow.state or '-'}{replied}"
    )


CLOSED_TCP = {"TIME_WAIT", "FIN_WAIT_2"}  # both sides closed: pf's TIME_WAIT condition


def is_neighbor_discovery(state: dict[str, Any]) -> bool:
    """An ICMPv6 state that is no echo: neighbor discovery or MLD, which pf keeps states for
    and nf_conntrack leaves untracked."""
    if state["proto"] != 58:
        return False
    ends = oracle_addresses(state)
    return any(a.is_multicast or a.is_link_local for a in ends) or (
        int(state["src_port"]) == 0 and int(state["dst_port"]) == 0
    )


def oracle_addresses(state: dict[str, Any]) -> list[Any]:
    """The node state's two addresses, parsed."""
    return [ip_address(state["src_address"]), ip_address(state["dst_address"])]


def judge(flow: KernelFlow, state: dict[str, Any] | None) -> str | None:
    """None if the node's view of `flow` agrees with the kernel's, else why not."""
    if state is None:
        return "the kernel tracked this flow, the node has no state for it"
    src, dst = peer_states(state)
    if flow.proto != 6:
        # pf's ICMP peer states stay 0:0 (pfctl shows them so); the packet counters say
        # whether both directions were seen, for UDP and ICMP alike.
        both = all(int(state[side]["packets"]) > 0 for side in ("src", "dst"))
        if flow.replied and not both:
            return "the kernel saw replies, the node saw one direction only"
        if not flow.replied and both:
            return "the kernel saw no reply, the node saw both directions"
        return None
    if flow.state == "ESTABLISHED":
        return None if (src, dst) == ("ESTABLISHED", "ESTABLISHED") else "not ESTABLISHED"
    if flow.state in ("TIME_WAIT", "CLOSE"):
        if src in CLOSED_TCP and dst in CLOSED_TCP:
            return None
        return f"the kernel has it closed ({flow.state}), the node has {src}:{dst}"
    return None  # opening and closing states in between: nothing to compare yet


def judge_refused(flow: KernelFlow | None, state: dict[str, Any] | None) -> str | None:
    """A SYN answered by RST: the kernel deletes such an entry at once (its only reply was
    an RST); the node keeps the SYN's state, closed by the RST, never established."""
    if flow is not None:
        return "the kernel kept an entry for a refused connection"
    if state is None:
        return "the node saw no SYN"
    if "ESTABLISHED" in peer_states(state):
        return "the node established a refused connection"
    return None
