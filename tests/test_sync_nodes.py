"""pfsync between real pfsyncd processes on loopback (issue 8): convergence, bulk
updates and readiness, failover, resumption, meshes, repairs, hostile peers, mTLS,
shutdown and deferral. Nodes listen on ports chosen at run time and are read through the
real console scripts; traffic is real kernel traffic captured in a private namespace,
fed through ControlService.Inject (tests/syncnodes.py has the helpers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from tests import traffic
from tests.syncnodes import (
    NodeSet,
    capture_frames,
    close_all,
    converged,
    established,
    frames_only,
    sync_report,
    wait_for,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def kernel_frames(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Ethernet frames of real kernel traffic: closed TCP connections (TIME_WAIT),
    connections still open, a reset one, IPv6, UDP and ICMP echo."""
    path = tmp_path_factory.mktemp("capture") / "kernel.pcap"
    with traffic.isolated_loopback(), traffic.capture_to_pcap(path):
        for _ in range(4):
            traffic.client_close_first()
            traffic.server_close_first()
        traffic.rst_abort()
        traffic.ipv6()
        traffic.udp_exchange()
        traffic.udp_exchange("::1")
        traffic.icmp_echo()
        traffic.bulk_transfer(256 * 1024)
        still_open = established(6)
        still_open += established(2, "::1")
    close_all(still_open)
    return list(frames_only(capture_frames(path)))


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[NodeSet]:
    with NodeSet(tmp_path) as made:
        yield made


def test_two_nodes_converge_on_real_traffic(nodes: NodeSet, kernel_frames: list[bytes]) -> None:
    a, b = nodes.mesh(2)
    wait_for(lambda: a.ready() and b.ready(), what="both nodes ready")
    reply = a.inject(kernel_frames)
    assert reply.errors == 0
    wait_for(
        lambda: converged([a, b]),
        15,
        what="convergence",
        detail=lambda: sync_report([a, b]),
    )
    listing = a.listing()
    assert listing == b.listing()
    assert any("TIME_WAIT:TIME_WAIT" in block for block in listing)
    assert any("ESTABLISHED:ESTABLISHED" in block for block in listing)
    assert any(block.startswith("all udp ") for block in listing)
    assert any(block.startswith("all icmp ") for block in listing)
    assert all(f"creatorid: {a.hostid}" in block for block in listing)
    assert a.entries() == b.entries() == len(listing)
    assert a.digest() == b.digest() != "0000000000000000"
    # B made nothing itself, A saw nothing from B.
    assert (
        b.counter("state-mismatch") == 0
        and b.info()["current_entries"] == a.info()["current_entries"]
    )
