"""A client not written in Python: tests/node_client/client.js (@grpc/grpc-js and
@grpc/proto-loader with default options, loading only proto/) against a real pfsyncd that
replayed real kernel traffic. The script lists states, filters by a text address, reads and
sets a sysctl, kills one state by its text id, checks health per service, watches the
changes with WatchStates and attaches a tap (reading the packed frame records); this test
checks its JSON report and, through pfctl and pfsysctl, the node's real state afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from pfsync.v1 import control_pb2 as pb
from pfsync.v1 import sysctl_pb2 as spb
from tests.test_e2e import BIN, HOSTID, node, pfctl, real_pcap  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "node_client" / "client.js"


def node_runtime() -> str:
    """The node binary, or skip when Node.js or the npm packages are missing."""
    runtime = shutil.which("node")
    if runtime is None:
        pytest.skip("Node.js is not installed (scripts/setup.sh installs it with apt as root)")
    for package in ("@grpc/grpc-js", "@grpc/proto-loader"):
        if not (REPO / "node_modules" / package).is_dir():
            pytest.skip(f"{package} is not installed (scripts/setup.sh runs npm ci)")
    return runtime


@pytest.mark.slow
def test_node_js_client_lists_sets_kills_and_checks_health(node: str) -> None:  # noqa: F811
    runtime = node_runtime()
    before = json.loads(pfctl(node, "-s", "states", "--json").stdout)["states"]
    result = subprocess.run(
        [runtime, str(SCRIPT), node], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    # proto-loader's defaults give enums as numbers: 1 is SERVING.
    serving = health_pb2.HealthCheckResponse.SERVING
    assert report["health"] == {
        "": serving,
        "pfsync.v1.ControlService": serving,
        "pfsync.v1.SysctlService": serving,
    }
    # The listing matches pfctl's, ids and addresses as text.
    assert sorted(s["id"] for s in report["states"]) == sorted(s["id"] for s in before)
    assert {s["creatorid"] for s in report["states"]} == {HOSTID}
    assert {s["af"] for s in report["states"]} == {pb.ADDRESS_FAMILY_IPV4, pb.ADDRESS_FAMILY_IPV6}
    udp = next(s for s in report["states"] if s["proto"] == 17)
    assert udp["src_state"] in (pb.UDP_PEER_STATE_SINGLE, pb.UDP_PEER_STATE_MULTIPLE)
    assert udp["src_packets_type"] == "object"  # a Long: default options keep 64 bits
    assert int(udp["src_packets"]) >= 1
    assert udp["id"] in report["by_address"]
    assert all(
        udp["src_address"] in (s["src_address"], s["dst_address"])
        for s in report["states"]
        if s["id"] in report["by_address"]
    )
    assert len(report["by_address"]) < len(report["states"])  # the IPv6 state is not there

    assert report["sysctl"] == {
        "type": spb.SYSCTL_TYPE_INT,
        "before": "30",
        "previous": "30",
        "after": "42",
    }
    # The node really changed: pfsysctl (another client) reads the new value.
    out = subprocess.run(
        [BIN / "pfsysctl", "-N", node, "-n", "net.inet.tcp.mslt.remote"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout == "42\n"

    # The state the script killed by id is gone, and only that one.
    kill = report["kill"]
    assert (kill["found"], kill["killed"]) == (1, 1)
    assert report["after_kill"] == 0
    after = json.loads(pfctl(node, "-s", "states", "--json").stdout)["states"]
    after = [s for s in after if s["src_address"] != "192.0.2.1"]  # the tapped frame's state
    assert sorted(s["id"] for s in after) == sorted(
        s["id"] for s in before if s["id"] != kill["id"]
    )

    # The tap on "inject" gave back the injected frame, whole, in a packed record.
    tap = report["tap"]
    assert (tap["frame_count"], tap["length"], tap["caplen"], tap["linktype"]) == (1, 46, 46, 1)
    assert tap["same_bytes"] and tap["captured"] == "1"
    assert abs(tap["time_ms"] - tap["now_ms"]) < 60_000
    # WatchStates saw the kill of the victim, and the insert of the injected frame's state.
    kinds = {(e["kind"], e["id"], e["reason"]) for e in report["events"]}
    assert (pb.STATE_EVENT_KIND_REMOVE, kill["id"], "killed") in kinds
    assert any(
        e["kind"] == pb.STATE_EVENT_KIND_INSERT and e["src_address"] == "192.0.2.1"
        for e in report["events"]
    )

    assert report["bad_address"]["code"] == 3  # INVALID_ARGUMENT
    assert "\n" not in report["bad_address"]["details"]
    assert report["bad_address"]["details"].startswith("address: not an IP address")
