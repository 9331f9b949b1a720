"""WatchStates and pfwatch: real nodes, the real pfwatch console script, changes made with
Inject (tests/packets.py) and with a real kernel connection replayed by pfreplay."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from pfsync.v1 import control_pb2 as pb
from pfsync.v1 import control_pb2_grpc
from tests import traffic
from tests.packets import ACK, FIN, SYN, tcp, udp
from tests.test_e2e import free_port
from tests.test_taps import TIME, finish, inject, node, start_tool, tool  # noqa: F401

ID = r"[0-9a-f]{16}/1a2b3c4d"


def wait_watchers(addr: str, *procs: subprocess.Popen[str]) -> None:
    """Until each pfwatch says its watch is in place (its first stderr line)."""
    for proc in procs:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line == f"pfwatch: watching {addr}\n", line


def handshake() -> list[bytes]:
    return [
        tcp("10.0.0.1", "10.0.0.2", 40000, 80, SYN, seq=1000),
        tcp("10.0.0.2", "10.0.0.1", 80, 40000, SYN | ACK, seq=5000, ack=1001),
        tcp("10.0.0.1", "10.0.0.2", 40000, 80, ACK, seq=1001, ack=5001),
    ]


def test_pfwatch_prints_inserts_updates_and_removals(node: str) -> None:  # noqa: F811
    watch = start_tool("pfwatch", node, "-c", "5")
    wait_watchers(node, watch)
    inject(node, handshake() + [udp("10.0.0.1", "10.0.0.3", 5353, 53)])
    assert tool("pfctl", node, "-k", "10.0.0.1", "-k", "10.0.0.3").returncode == 0
    out, _ = finish(watch)
    lines = out.splitlines()
    patterns = [
        rf"{TIME} \[NEW\] all tcp 10\.0\.0\.2:80 <- 10\.0\.0\.1:40000 +CLOSED:SYN_SENT id {ID}",
        rf"{TIME} \[UPDATE\] all tcp 10\.0\.0\.2:80 <- 10\.0\.0\.1:40000 +SYN_SENT:ESTABLISHED "
        rf"id {ID} was CLOSED:SYN_SENT",
        rf"{TIME} \[UPDATE\] all tcp 10\.0\.0\.2:80 <- 10\.0\.0\.1:40000 +"
        rf"ESTABLISHED:ESTABLISHED id {ID} was SYN_SENT:ESTABLISHED",
        rf"{TIME} \[NEW\] all udp 10\.0\.0\.3:53 <- 10\.0\.0\.1:5353 +NO_TRAFFIC:SINGLE id {ID}",
        rf"{TIME} \[DESTROY\] all udp 10\.0\.0\.3:53 <- 10\.0\.0\.1:5353 +NO_TRAFFIC:SINGLE "
        rf"id {ID} killed",
    ]
    assert len(lines) == len(patterns), out
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line), line


def test_filters_and_json(node: str) -> None:  # noqa: F811
    watch = start_tool("pfwatch", node, "-p", "udp", "-e", "destroy", "-c", "1", "--json")
    by_address = start_tool("pfwatch", node, "-a", "10.0.0.9", "-c", "1", "--json")
    wait_watchers(node, watch, by_address)
    inject(node, handshake() + [udp("10.0.0.1", "10.0.0.9", 1, 53)])
    assert tool("pfctl", node, "-F", "states").returncode == 0
    (line,) = finish(watch)[0].splitlines()
    event = json.loads(line)
    assert event["kind"] == "STATE_EVENT_KIND_REMOVE" and event["reason"] == "flushed"
    assert event["state"]["proto"] == 17
    (line,) = finish(by_address)[0].splitlines()
    event = json.loads(line)
    assert event["kind"] == "STATE_EVENT_KIND_INSERT"
    assert event["state"]["dst_address"] == "10.0.0.9"


def test_an_event_carries_the_state_as_a_listing_shows_it(node: str) -> None:  # noqa: F811
    """The UPDATE that made a connection ESTABLISHED carries what ListStates lists for it
    right after (windows, wscale, counters, timeout), not only levels; the same for a
    UDP insert (its own protocol's levels, no windows)."""
    with grpc.insecure_channel(node) as channel:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        call = stub.WatchStates(pb.WatchStatesRequest(), timeout=30)
        events = iter(e for msg in call for e in msg.events)
        next(call)  # the first message: the watch is in place
        inject(node, handshake() + [udp("10.0.0.1", "10.0.0.9", 1, 53)])
        got = [next(events) for _ in range(4)]  # insert, two transitions, udp insert
        call.cancel()
        listed = {
            (s.proto, s.dst_address): s
            for chunk in stub.ListStates(pb.ListStatesRequest())
            for s in chunk.states
        }
    established, udp_insert = got[2], got[3]
    assert established.kind == pb.STATE_EVENT_KIND_UPDATE
    assert established.old_dst.tcp_state == pb.TCP_PEER_STATE_SYN_SENT
    tcp_state = listed[6, "10.0.0.2"]
    assert tcp_state.src.seqlo == 1000 and tcp_state.src.max_win > 0
    for field in ("age_seconds", "expires_in_seconds"):  # seconds apart at most
        tcp_state.ClearField(field)
        established.state.ClearField(field)
    assert established.state == tcp_state
    assert udp_insert.kind == pb.STATE_EVENT_KIND_INSERT
    assert udp_insert.state.src.udp_state == pb.UDP_PEER_STATE_SINGLE
    assert udp_insert.state.dst.udp_state == pb.UDP_PEER_STATE_NO_TRAFFIC
    assert udp_insert.state.src.packets == 1 and not udp_insert.state.src.seqlo
    assert udp_insert.state.id == listed[17, "10.0.0.9"].id


def test_a_watcher_that_falls_behind_is_told_how_many_it_missed(node: str) -> None:  # noqa: F811
    """1000 inserts in one Inject call against a queue of 16: 16 events, then 984 missed;
    the node did not wait (the call returns at once), and the stream goes on after it."""
    watch = start_tool("pfwatch", node, "-q", "16", "-c", "17")
    wait_watchers(node, watch)
    started = time.monotonic()
    inject(node, [udp("10.0.2.1", "10.0.2.2", 1000 + i, 53) for i in range(1000)])
    assert time.monotonic() - started < 10
    inject(node, [udp("10.0.3.1", "10.0.3.2", 7, 53)])
    lines = finish(watch)[0].splitlines()
    assert len(lines) == 18
    assert all(" [NEW] all udp 10.0.2.2:53 <- 10.0.2.1:" in line for line in lines[:16])
    assert re.fullmatch(rf"{TIME} \[MISSED\] 984 events", lines[16])
    assert " [NEW] all udp 10.0.3.2:53 <- 10.0.3.1:7 " in lines[17]


def test_packet_updates_only_on_request_and_rate_limited(node: str) -> None:  # noqa: F811
    watch = start_tool("pfwatch", node, "-u", "-I", "60", "-e", "update", "-c", "3")
    wait_watchers(node, watch)
    data = [
        tcp("10.0.0.1", "10.0.0.2", 40000, 80, ACK, seq=1001 + i, ack=5001, payload=b"x")
        for i in range(20)
    ]
    inject(node, handshake() + data)
    inject(node, [tcp("10.0.0.1", "10.0.0.2", 40000, 80, FIN | ACK, seq=1021, ack=5001)])
    lines = finish(watch)[0].splitlines()
    # The two transitions of the handshake, one packet update (not 20), then the FIN.
    assert [line.split()[1] for line in lines] == ["[UPDATE]"] * 3
    assert "was" not in lines[2] or "FIN_WAIT" in lines[2]
    assert sum("ESTABLISHED:ESTABLISHED id" in line and "was" not in line for line in lines) == 1


@pytest.mark.slow
def test_real_connection_through_pfreplay(node: str, tmp_path: Path) -> None:  # noqa: F811
    """A real kernel TCP connection, captured and replayed: insert, transitions, TIME_WAIT."""
    path = tmp_path / "real.pcap"
    with traffic.isolated_loopback():
        with traffic.capture_to_pcap(path):
            conn = traffic.client_close_first()
    watch = start_tool("pfwatch", node, "-p", "tcp", "-e", "new,vestigial", "-c", "2")
    wait_watchers(node, watch)
    assert tool("pfreplay", node, str(path)).returncode == 0
    lines = finish(watch)[0].splitlines()
    server = f"{conn.server[0]}:{conn.server[1]}"
    client = f"{conn.client[0]}:{conn.client[1]}"
    assert re.fullmatch(
        rf"{TIME} \[NEW\] all tcp {server} <- {client} +CLOSED:SYN_SENT id {ID}", lines[0]
    )
    assert re.fullmatch(
        rf"{TIME} \[VESTIGIAL\] all tcp {server} <- {client} +TIME_WAIT:TIME_WAIT id {ID}"
        r" was \w+:\w+",
        lines[1],
    )


def test_bad_requests_and_flags(node: str) -> None:  # noqa: F811
    for args in (["-p", "nope"], ["-e", "born"], ["-I", "5"], ["-c", "0"], ["-a", "x.y"]):
        out = tool("pfwatch", node, *args)
        assert out.returncode == 2, (args, out)
        assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("pfwatch: ")
        assert "Traceback" not in out.stderr
    with grpc.insecure_channel(node) as channel:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            next(stub.WatchStates(pb.WatchStatesRequest(queue_events=1)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unreachable_node_exits_1() -> None:
    out = tool("pfwatch", f"127.0.0.1:{free_port()}")
    assert out.returncode == 1
    assert re.fullmatch(r"pfwatch: cannot reach node 127\.0\.0\.1:\d+: .+\n", out.stderr)
