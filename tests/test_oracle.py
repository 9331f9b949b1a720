"""The Linux kernel as referee: a live `pfsyncd --capture` node checked against nf_conntrack.

Two namespaces joined by a veth: clients in A, servers in B. The kernel tracks B's
connections (nftables rules using conntrack state); a real node captures B's end of the veth
live. Real traffic of every shape flows, made by the kernel's own stacks; then each flow the
kernel tracked is looked up in the node (read with `pfctl -s states --json`, as a user would)
and the two views are compared with `tests.oracle.judge`. A disagreement prints the flow and
both views. The differences that are pf's rules rather than Linux's are tested on their own
(README, "Checked against the Linux kernel").
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests import oracle, traffic
from tests.livenode import LiveNode, live_node
from tests.oracle import KernelFlow

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and conntrack need root"),
    pytest.mark.skipif(
        not (shutil.which("conntrack") and shutil.which("nft")),
        reason="conntrack and nft missing (scripts/setup.sh installs them as root)",
    ),
]

SLOW_BPS = 1_000_000  # simultaneous close: each FIN waits behind ~50 ms of filler
FAST_BPS = 400_000_000
MSL = 60  # seconds: no TIME_WAIT record of the run expires before the comparison
SHORT_MSL = 1


@dataclass
class Run:
    """What one run of every shape left behind, in the kernel and in the node."""

    pair: traffic.VethPair
    node: LiveNode
    conns: list[traffic.Connection]
    kernel: list[KernelFlow]
    states: list[dict[str, Any]]
    info: dict[str, Any]
    picked_up: traffic.Connection  # opened before the node started: pf never saw its SYN
    expired: traffic.Connection  # closed with a 1 s MSL, then 3 s passed
    extra: dict[str, Any] = field(default_factory=dict)

    def node_state(self, conn: traffic.Connection) -> dict[str, Any] | None:
        """The node's state (or TIME_WAIT record) for a connection, by its endpoints."""
        want = _endpoints(conn)
        found = [s for s in self.states if oracle.node_endpoints(s) == want]
        assert len(found) <= 1, f"{len(found)} node states for {conn}: {found}"
        return found[0] if found else None

    def kernel_flow(self, conn: traffic.Connection) -> KernelFlow | None:
        """The kernel's conntrack entry for a connection."""
        want = _endpoints(conn)
        found = [f for f in self.kernel if f.endpoints == want and f.proto == conn.proto]
        assert len(found) <= 1, f"{len(found)} kernel entries for {conn}"
        return found[0] if found else None


def _endpoints(conn: traffic.Connection) -> frozenset[tuple[str, int]]:
    client, server = conn.client, conn.server
    if conn.proto == socket.IPPROTO_ICMP:  # pf and conntrack key echoes by their id
        client, server = client, (server[0], client[1])
    return frozenset(((oracle._text(client[0]), client[1]), (oracle._text(server[0]), server[1])))


def _settle(node: LiveNode, quiet: float = 0.5) -> None:
    """Wait until the node has read every frame: its frame count stops moving."""
    last = -1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        frames = sum(int(s["frames"]) for s in node.info()["sources"])
        if frames == last:
            return
        last = frames
        time.sleep(quiet)
    raise AssertionError("the node kept reading frames for 20 s")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One veth, one node, every shape; the kernel's and the node's tables read at the end."""
    with traffic.veth_pair(SLOW_BPS) as pair:
        oracle.enable_conntrack(pair.netns_b)
        # Opened before the node starts: the kernel tracks it from its SYN, the node never
        # sees a SYN for it.
        early_client, early_server = _connect_across(pair)
        args = ("--sync-listen", "", "--sysctl", f"net.inet.tcp.mslt.local={SHORT_MSL}")
        log_dir = tmp_path_factory.mktemp("oracle")
        with live_node(pair.netns_b, pair.if_b, args=args, log_dir=log_dir) as node:
            conns: list[traffic.Connection] = []
            with traffic.across(pair):
                # TIME_WAIT by MSLT: with a 1 s MSL the node forgets it after 2 s, the
                # kernel keeps TIME_WAIT 120 s. First, so that it expires while the rest
                # runs (a class's records leave in the order they came).
                expired = traffic.client_close_first(pair.addr_b)
                expired_at = time.monotonic()
                set_msl = _pfsysctl(node, f"net.inet.tcp.mslt.local={MSL}")
                assert set_msl.returncode == 0, set_msl.stderr
                conns.append(traffic.simultaneous_close(pair))
                pair.set_rate(FAST_BPS)
                host, host6 = pair.addr_b, pair.addr6_b
                conns.append(traffic.client_close_first(host))
                conns.append(traffic.server_close_first(host))
                conns.append(traffic.half_close(host))
                conns.append(traffic.bulk_transfer(4 * 1024 * 1024, host))
                conns.append(traffic.ipv6(host6))
                conns.append(traffic.client_close_first(host6))
                conns.append(traffic.udp_exchange(host))
                conns.append(traffic.udp_exchange(host6))
                conns.append(traffic.udp_one_way(host))
                conns.append(traffic.icmp_echo(host))
                conns.extend(traffic.time_wait_reuse(host, count=5))
                # The kernel keeps an RST-ended entry only 10 s (CLOSE): these come last.
                conns.append(traffic.rst_abort(host))
                conns.append(traffic.rst_abort(host6))
                conns.append(traffic.connection_refused(host))
                conns.append(traffic.connection_refused(host6))
                picked_up = _finish_early(early_client, early_server)
            _settle(node)
            # The purge runs once a second: 2 x MSL and one purge after the close at most.
            time.sleep(max(0.0, expired_at + 2 * SHORT_MSL + 1.5 - time.monotonic()))
            states, info = node.states(), node.info()
            kernel = oracle.kernel_flows(pair.netns_b)
            yield Run(pair, node, conns, kernel, states, info, picked_up, expired)


def _pfsysctl(node: LiveNode, assignment: str) -> Any:
    import subprocess

    from tests.livenode import BIN

    return subprocess.run(
        ["ip", "netns", "exec", node.netns, BIN / "pfsysctl", "-N", node.control, "-w", assignment],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _connect_across(pair: traffic.VethPair) -> tuple[socket.socket, socket.socket]:
    with traffic.across(pair):
        return traffic.established_pair(pair.addr_b)


def _finish_early(client: socket.socket, server: socket.socket) -> traffic.Connection:
    """Data both ways on the connection opened before the node, then an orderly close."""
    with client, server:
        conn = traffic.Connection(
            "picked_up",
            client.family,
            socket.IPPROTO_TCP,
            client.getsockname()[:2],
            server.getsockname()[:2],
        )
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        server.sendall(b"pong")
        assert client.recv(4) == b"pong"
        client.shutdown(socket.SHUT_WR)
        assert server.recv(1) == b""
        server.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
    return conn


def _disagreement(run: Run, conn: traffic.Connection) -> str | None:
    flow, state = run.kernel_flow(conn), run.node_state(conn)
    if conn.shape == "connection_refused":
        why = oracle.judge_refused(flow, state)
    elif flow is None:
        why = "the kernel has no entry for a connection the test made"
    else:
        why = oracle.judge(flow, state)
    if why is None:
        return None
    return (
        f"{conn.shape} {conn.client} -> {conn.server}: {why}\n  "
        f"{oracle.describe_kernel(flow)}\n  {oracle.describe_node(state)}"
    )


SHAPES = [
    "simultaneous_close",
    "client_close_first",
    "server_close_first",
    "half_close",
    "bulk_transfer",
    "ipv6",
    "udp_exchange",
    "udp_one_way",
    "icmp_echo",
    "time_wait_reuse",
    "rst_abort",
    "connection_refused",
]


@pytest.mark.parametrize("shape", SHAPES)
def test_the_node_agrees_with_the_kernel(run: Run, shape: str) -> None:
    conns = [c for c in run.conns if c.shape == shape]
    assert conns, f"no connection of shape {shape}"
    disagreements = [d for c in conns if (d := _disagreement(run, c))]
    assert not disagreements, "\n".join(disagreements)


def test_closed_tcp_connections_are_time_wait_in_the_node(run: Run) -> None:
    """The orderly closes end as TIME_WAIT in both: the kernel's entry and the node's record."""
    for conn in run.conns:
        if conn.proto != socket.IPPROTO_TCP or conn.shape in ("rst_abort", "connection_refused"):
            continue
        flow, state = run.kernel_flow(conn), run.node_state(conn)
        assert flow is not None and flow.state == "TIME_WAIT", oracle.describe_kernel(flow)
        assert state is not None and oracle.peer_states(state) == ("TIME_WAIT", "TIME_WAIT"), (
            oracle.describe_node(state)
        )


def test_every_flow_on_the_veth_is_known_to_both(run: Run) -> None:
    """No flow only one side knows, apart from the documented differences."""
    veth = {run.pair.addr_a, run.pair.addr_b, run.pair.addr6_a, run.pair.addr6_b}
    documented = {_endpoints(run.picked_up), _endpoints(run.expired)}
    documented |= {_endpoints(c) for c in run.conns if c.shape == "connection_refused"}
    kernel = {f.endpoints for f in run.kernel if {a for a, _ in f.endpoints} <= veth} - documented
    node = {
        oracle.node_endpoints(s) for s in run.states if not oracle.is_neighbor_discovery(s)
    } - documented
    assert kernel == node, (
        f"only in the kernel: {sorted(map(sorted, kernel - node))}\n"
        f"only in the node: {sorted(map(sorted, node - kernel))}"
    )


def test_zero_state_mismatch_on_accepted_traffic(run: Run) -> None:
    counters = {c["name"]: int(c["value"]) for c in run.info["counters"]}
    assert oracle.invalid_packets(run.pair.netns_b) == 0, "the kernel itself judged packets invalid"
    assert counters["state-mismatch"] == 0, run.node.log()
    source = run.info["sources"][0]
    assert source["name"] == run.pair.if_b and int(source["drops"]) == 0 and not source["error"]


# --- differences by design (README, "Checked against the Linux kernel") --------------------------


def test_a_connection_picked_up_mid_flow_is_tracked_by_the_kernel_only(run: Run) -> None:
    """Linux (nf_conntrack_tcp_loose=1) picks up an established connection from any segment;
    pf creates TCP states only from a SYN: the node blocks its packets as `match` (the
    implicit block rule), never as `state-mismatch`."""
    flow = run.kernel_flow(run.picked_up)
    assert flow is not None and flow.state == "TIME_WAIT", oracle.describe_kernel(flow)
    assert run.node_state(run.picked_up) is None
    counters = {c["name"]: int(c["value"]) for c in run.info["counters"]}
    assert counters["match"] >= 8 and counters["state-mismatch"] == 0


def test_time_wait_ends_by_mslt_in_the_node_and_by_120_s_in_the_kernel(run: Run) -> None:
    """The kernel holds TIME_WAIT 120 s; the node 2 x MSL of the connection's class."""
    flow = run.kernel_flow(run.expired)
    assert flow is not None and flow.state == "TIME_WAIT", oracle.describe_kernel(flow)
    assert run.node_state(run.expired) is None


def test_a_refused_connection_has_no_established_state(run: Run) -> None:
    """The kernel deletes the entry of a SYN whose only answer was an RST at once; the node
    keeps the SYN's state (pf's first-packet rule), closed by the RST (TIME_WAIT by MSLT)."""
    for conn in (c for c in run.conns if c.shape == "connection_refused"):
        flow, state = run.kernel_flow(conn), run.node_state(conn)
        assert flow is None, oracle.describe_kernel(flow)
        assert state is not None and oracle.peer_states(state) == ("TIME_WAIT", "TIME_WAIT"), (
            oracle.describe_node(state)
        )


def test_neighbor_discovery_has_states_in_the_node_only(run: Run) -> None:
    """pf keeps states for ICMPv6 neighbor discovery and MLD; nf_conntrack leaves them
    untracked."""
    nd = [s for s in run.states if oracle.is_neighbor_discovery(s)]
    assert any(
        oracle.node_endpoints(s) == {(run.pair.addr6_a, 0), (run.pair.addr6_b, 0)} for s in nd
    ), [oracle.describe_node(s) for s in nd]
    assert not [f for f in run.kernel if f.proto == 58 and f.src[1] == 0 == f.dst[1]]


def test_a_disagreement_prints_the_flow_and_both_views(run: Run) -> None:
    """The comparison itself: a node view that is wrong is reported with both views."""
    conn = next(c for c in run.conns if c.shape == "client_close_first")
    state = dict(run.node_state(conn) or {})
    state["src"] = {"tcp_state": "TCP_PEER_STATE_ESTABLISHED"}
    flow = run.kernel_flow(conn)
    assert flow is not None
    why = oracle.judge(flow, state)
    assert why is not None and "TIME_WAIT" in why
    assert "ESTABLISHED" in oracle.describe_node(state)
    assert "TIME_WAIT" in oracle.describe_kernel(flow)
