"""Paired capture: two synced nodes, each capturing its own end of the same veth traffic.

Node A captures A's end of the veth in namespace A, node B the other end in namespace B;
they sync over a second, dedicated veth (as the README advises: pfsync on its own link, not
on the traffic it tracks). Both see every connection's packets, so both make a state for
each connection with their own creatorid; the lower creatorid's state wins on both nodes
(README, "Both nodes see the same traffic"). Checked: one state per connection in each
table, identical listings (`pfctl -s states -vv`) and table digests (`pfctl -s sync`), and
zero `state-mismatch` on both.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests import oracle, traffic
from tests.livenode import LiveNode, live_node, poll

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

SYNC_A, SYNC_B = "10.198.0.1", "10.198.0.2"


@contextmanager
def sync_link(pair: traffic.VethPair) -> Iterator[None]:
    """A second veth between the two namespaces, for the pfsync streams only."""
    subprocess.run(
        ["ip", "-n", pair.netns_a, "link", "add", "pfsync0", "type", "veth", "peer", "pfsync1"],
        check=True,
    )
    subprocess.run(["ip", "-n", pair.netns_a, "link", "set", "pfsync1", "netns", pair.netns_b])
    for ns, ifname, addr in ((pair.netns_a, "pfsync0", SYNC_A), (pair.netns_b, "pfsync1", SYNC_B)):
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", ifname, "up"], check=True)
    yield  # deleted with the namespaces


def _listing(node: LiveNode) -> list[str]:
    """`pfctl -s states -vv` without the lines that differ by nature (ages, counters of
    packets this node did not see itself), sorted."""
    rows = node.pfctl("-s", "states", "-vv").stdout.splitlines()
    return sorted(r for r in rows if r.startswith("all ") or r.strip().startswith("id:"))


def _identities(states: list[dict[str, Any]]) -> dict[frozenset[tuple[str, int]], str]:
    out: dict[frozenset[tuple[str, int]], str] = {}
    for s in states:
        ends = oracle.node_endpoints(s)
        assert ends not in out, f"two states for one connection: {out[ends]} and {s}"
        out[ends] = f"{s['id']}/{s['creatorid']}"
    return out


def test_two_nodes_capturing_both_ends_keep_one_table() -> None:
    with traffic.veth_pair(400_000_000) as pair, sync_link(pair):
        common = ("--sysctl", "net.inet.tcp.mslt.local=60")
        a_args = ("--hostid", "a1", "--sync-listen", f"{SYNC_A}:7071", "--peer", f"{SYNC_B}:7071")
        b_args = ("--hostid", "b2", "--sync-listen", f"{SYNC_B}:7071", "--peer", f"{SYNC_A}:7071")
        with (
            live_node(pair.netns_a, pair.if_a, args=a_args + common) as node_a,
            live_node(pair.netns_b, pair.if_b, args=b_args + common) as node_b,
        ):
            poll(lambda: node_a.sync()["ready"] and node_b.sync()["ready"], timeout=30)
            with traffic.across(pair):
                conns = [traffic.client_close_first(pair.addr_b) for _ in range(3)]
                conns.append(traffic.server_close_first(pair.addr_b))
                conns.append(traffic.udp_exchange(pair.addr_b))
                conns.append(traffic.ipv6(pair.addr6_b))
                conns.append(traffic.rst_abort(pair.addr_b))
                client, server = traffic.established_pair(pair.addr_b)
            with client, server:
                client.sendall(b"still open")
                assert server.recv(10) == b"still open"

                def agreed() -> bool:
                    # One moment's view: an entry can expire between two later reads.
                    a, b = node_a.sync(), node_b.sync()
                    return (
                        a["digest"] == b["digest"]
                        and _listing(node_a) == _listing(node_b)
                        and node_a.info()["current_entries"] == node_b.info()["current_entries"]
                    )

                poll(agreed, timeout=30, interval=0.5)
                states_a, states_b = node_a.states(), node_b.states()
                ids_a, ids_b = _identities(states_a), _identities(states_b)
                assert ids_a == ids_b
                for conn in conns:
                    ends = frozenset(
                        (oracle._text(h), p) for h, p in (conn.client[:2], conn.server[:2])
                    )
                    assert ids_a[ends].endswith("/000000a1"), (conn, ids_a[ends])
                for node in (node_a, node_b):
                    counters = {c["name"]: int(c["value"]) for c in node.info()["counters"]}
                    assert counters["state-mismatch"] == 0, node.log()
                # Peers compare digests every 3 s: the verdict follows the digests above.
                poll(lambda: all(_digest_agrees(n) for n in (node_a, node_b)), timeout=15)


def _digest_agrees(node: LiveNode) -> bool:
    return any(p["connected"] and p["digest_agrees"] for p in node.sync()["peers"])
