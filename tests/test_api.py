"""The gRPC API as outside programs meet it, against a real pfsyncd process: health per
service, reflection v1 and v1alpha with the .proto comments, text addresses and ids,
one-line INVALID_ARGUMENT for bad input, and the README's `buf curl` command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from pfsync.v1 import control_pb2 as pb
from pfsync.v1 import control_pb2_grpc
from tests.test_e2e import HOSTID, node, real_pcap  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent
BUF = REPO / "node_modules" / ".bin" / "buf"
SERVICES = ("pfsync.v1.ControlService", "pfsync.v1.SysctlService")


def list_states(addr: str, **filters: str | int) -> list[pb.State]:
    with grpc.insecure_channel(addr) as channel:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        request = pb.ListStatesRequest(**filters)
        return [s for chunk in stub.ListStates(request, timeout=10) for s in chunk.states]


def refused(call: object) -> str:
    """Run ``call`` and return the details of the INVALID_ARGUMENT it must end with."""
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    details: str = err.value.details()  # type: ignore[attr-defined]
    assert "\n" not in details and details
    return details


@pytest.mark.slow
def test_health_answers_each_service(node: str) -> None:  # noqa: F811
    with grpc.insecure_channel(node) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", *SERVICES):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="pfsync.v1.Control"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def reflect(
    addr: str, version: str, request: rpb.ServerReflectionRequest
) -> rpb.ServerReflectionResponse:
    """One request on the reflection stream of ``version`` (v1 or v1alpha).

    The two versions share their message layout, so the v1alpha classes encode both.
    """
    with grpc.insecure_channel(addr) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=rpb.ServerReflectionRequest.SerializeToString,
            response_deserializer=rpb.ServerReflectionResponse.FromString,
        )
        return next(iter(call(iter([request]), timeout=5)))


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_serves_both_versions_with_comments(node: str, version: str) -> None:  # noqa: F811
    listed = reflect(node, version, rpb.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert names >= {
        *SERVICES,
        "grpc.health.v1.Health",
        f"grpc.reflection.{version}.ServerReflection",
    }

    reply = reflect(
        node,
        version,
        rpb.ServerReflectionRequest(file_containing_symbol="pfsync.v1.ControlService"),
    )
    files = {}
    for blob in reply.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
        files[proto.name] = proto
    assert set(files) >= {"pfsync/v1/control.proto", "google/protobuf/duration.proto"}
    comments = [
        loc.leading_comments
        for loc in files["pfsync/v1/control.proto"].source_code_info.location
        if loc.leading_comments
    ]
    assert any("Read and steer a node's state table" in c for c in comments)
    assert any("2^53" in c for c in comments)  # State.id's documentation travels too

    missing = reflect(node, version, rpb.ServerReflectionRequest(file_containing_symbol="no.Such"))
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


@pytest.mark.slow
def test_text_addresses_and_ids_filter_and_kill(node: str) -> None:  # noqa: F811
    states = list_states(node)
    assert {s.af for s in states} == {pb.ADDRESS_FAMILY_IPV4, pb.ADDRESS_FAMILY_IPV6}
    assert all(re.fullmatch(r"[0-9a-f]{16}", s.id) for s in states)
    assert {s.creatorid for s in states} == {HOSTID}
    v6 = [s for s in states if s.af == pb.ADDRESS_FAMILY_IPV6]
    assert [s.src_address for s in v6] == ["::1"]
    udp = next(s for s in states if s.proto == 17)
    assert udp.src.WhichOneof("state") == "udp_state"
    assert udp.src.udp_state != pb.UDP_PEER_STATE_UNSPECIFIED

    # Text filters: an address in any usual spelling; an id with or without creatorid.
    assert [s.id for s in list_states(node, address="0:0:0:0:0:0:0:1")] == [v6[0].id]
    assert [s.id for s in list_states(node, id=udp.id)] == [udp.id]
    assert [s.id for s in list_states(node, id=udp.id.lstrip("0"), creatorid=HOSTID)] == [udp.id]
    assert list_states(node, id=udp.id, creatorid="00000001") == []
    assert len(list_states(node, creatorid=HOSTID)) == len(states)

    for filters, field in [
        ({"address": "10.0.0.300"}, "address"),
        ({"address": "127.0.0.1\nsecond line"}, "address"),
        ({"id": "xyz"}, "id"),
        ({"id": "1" * 17}, "id"),
        ({"id": "1", "creatorid": "123456789"}, "creatorid"),
    ]:
        assert refused(lambda f=filters: list_states(node, **f)).startswith(field)

    with grpc.insecure_channel(node) as channel:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        for request in [
            pb.KillStatesRequest(),
            pb.KillStatesRequest(id="0"),
            pb.KillStatesRequest(id="1", src=pb.AddressMatch(address="::1")),
            pb.KillStatesRequest(src=pb.AddressMatch(address="::1", prefix_len=129)),
            pb.KillStatesRequest(
                src=pb.AddressMatch(address="::1"), dst=pb.AddressMatch(address="127.0.0.1")
            ),
        ]:
            refused(lambda r=request: stub.KillStates(r, timeout=5))
        assert len(list_states(node)) == len(states)  # refused requests killed nothing

        # No prefix_len: one host, not "every address" (which 0 would mean).
        reply = stub.KillStates(pb.KillStatesRequest(src=pb.AddressMatch(address="::2")))
        assert reply.killed == 0
        reply = stub.KillStates(pb.KillStatesRequest(id=udp.id, creatorid=udp.creatorid))
        assert reply.killed == 1
    assert list_states(node, id=udp.id) == []
    assert len(list_states(node)) == len(states) - 1


@pytest.mark.slow
def test_typed_timeouts_limits_and_info(node: str) -> None:  # noqa: F811
    with grpc.insecure_channel(node) as channel:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        timeouts = {t.name: t for t in stub.GetTimeouts(pb.GetTimeoutsRequest()).timeouts}
        limits = {lim.name: lim for lim in stub.GetMemory(pb.GetMemoryRequest()).limits}
        info = stub.GetInfo(pb.GetInfoRequest())
    assert timeouts["adaptive.start"].WhichOneof("value") == "states"
    assert timeouts["tcp.established"].duration.seconds == 86400
    assert not limits["states"].unlimited and limits["states"].hard_limit > 0
    assert limits["frags"].unlimited
    assert info.hostid == HOSTID
    assert [s.kind for s in info.sources] == [pb.PACKET_SOURCE_KIND_PCAP]


def readme_command(marker: str) -> str:
    """The first command line in README's API section that starts with ``marker``."""
    section = (REPO / "README.md").read_text().split("## API", 1)[1]
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith(marker)]
    assert lines, f"README API section shows no {marker!r} command"
    return lines[0]


@pytest.mark.slow
def test_readme_buf_curl_command_works(node: str) -> None:  # noqa: F811
    """The README's grpcurl-style example, run as written (with this node's address)."""
    if not BUF.exists():
        pytest.skip("buf is not installed (scripts/setup.sh installs it with npm)")
    command = readme_command("node_modules/.bin/buf curl").replace("127.0.0.1:7070", node)
    result = subprocess.run(
        ["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    states = json.loads(result.stdout)["states"]
    assert states and all(s["creatorid"] == HOSTID for s in states)


def test_node_js_is_there_when_npm_is() -> None:
    """Where npm is installed, setup installed the Node.js test client's packages."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed here (and could not be installed by setup.sh)")
    assert (REPO / "node_modules" / "@grpc" / "grpc-js").is_dir()
    assert (REPO / "node_modules" / "@grpc" / "proto-loader").is_dir()
