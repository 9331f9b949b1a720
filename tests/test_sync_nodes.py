"""pfsync between real pfsyncd processes on loopback (issue 8): convergence, bulk
updates and readiness, failover, resumption, meshes, repairs, hostile peers, mTLS,
shutdown and deferral. Nodes listen on ports chosen at run time and are read through the
real console scripts; traffic is real kernel traffic captured in a private namespace,
fed through ControlService.Inject (tests/syncnodes.py has the helpers)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from pfsync.v1 import sync_pb2 as spb
from tests import traffic
from tests.certs import make_ca
from tests.packets import SYN, tcp, udp
from tests.syncnodes import (
    LinkCut,
    NodeSet,
    SyncNode,
    capture_frames,
    client_side,
    close_all,
    converged,
    established,
    frames_only,
    free_port,
    split_flows,
    sync_report,
    tls_flags,
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


def test_bulk_update_before_ready(nodes: NodeSet, kernel_frames: list[bytes]) -> None:
    """A node started next to a peer that holds states is not ready (health NOT_SERVING,
    pfctl -s sync says it waits) until the bulk update ends; then it holds every state."""
    a = nodes.make("a", "a0000001").start()
    a.inject(kernel_frames)
    held = a.count_states()
    assert held > 10
    a.signal(signal.SIGSTOP)  # A cannot answer yet: B must say it waits
    b = nodes.make("b", "b0000002", ["--peer", a.sync]).start()
    status = b.sync_status()
    assert not status["ready"] and "waiting for a bulk update" in status["ready_reason"]
    text = b.pfctl("-s", "sync").stdout
    assert "NOT ready" in text.splitlines()[0] and "waiting for a bulk update" in text
    assert b.health() == NOT_SERVING
    a.signal(signal.SIGCONT)
    wait_for(b.ready, 15, what="B ready", detail=lambda: sync_report([a, b]))
    assert b.health() == SERVING
    assert b.count_states() == held
    assert b.stats()["input.bus"] == 2  # START and END
    assert b.listing() == a.listing()


@pytest.mark.slow
def test_peer_down_retries_then_gives_up(nodes: NodeSet) -> None:
    """With its only peer down a node asks for a bulk update every 2 s, 12 times, and
    says so; then it gives up waiting and reports ready."""
    nowhere = f"127.0.0.1:{free_port()}"
    b = nodes.make("b", "b0000002", ["--peer", nowhere]).start()
    first = wait_for(
        lambda: "attempt" in (r := b.status()["ready_reason"]) and r, 5, what="an attempt"
    )
    assert not b.ready() and b.health() == NOT_SERVING
    start = int(first.split("attempt ")[1].split()[0])
    later = wait_for(
        lambda: (
            (r := b.status()["ready_reason"]).startswith("waiting")
            and int(r.split("attempt ")[1].split()[0]) >= start + 2
            and r
        ),
        8,
        what="two more attempts",
    )
    assert later.endswith("of 12)")
    gave_up = wait_for(b.ready, 30, interval=0.5, what="give-up")
    assert gave_up
    assert b.status()["ready_reason"] == "gave up waiting for a bulk update"
    assert b.health() == SERVING
    assert "gave up" in b.pfctl("-s", "sync").stdout


@pytest.mark.slow
def test_failover_then_restarted_node_gets_bulk(nodes: NodeSet, kernel_frames: list[bytes]) -> None:
    """First half of every flow into A, kill -9 A, the rest into B: B tracks the flows
    as well as one node that saw everything; A restarted empty is ready only with B's
    whole table."""
    flows = split_flows(kernel_frames)
    first = [f for flow in flows for f in flow[: len(flow) // 2]]
    rest = [f for flow in flows for f in flow[len(flow) // 2 :]]
    alone = nodes.make("alone", "c0000003").start()
    a, b = nodes.mesh(2)
    wait_for(lambda: a.ready() and b.ready(), what="ready")
    a.inject(first)
    wait_for(
        lambda: converged([a, b]), 15, what="B has A's half", detail=lambda: sync_report([a, b])
    )
    a.kill()
    b.inject(rest)
    alone.inject(kernel_frames)  # now, so short timeouts (ICMP 10 s) run alike on both
    assert b.counter("state-mismatch") <= alone.counter("state-mismatch")
    assert b.info()["current_entries"] == alone.info()["current_entries"]
    assert b.count_states() == alone.count_states()

    a.start(wait=False)
    wait_for(a._answers, 20, what="A's control API")
    while not a.ready():  # every time A is asked before it is ready, it must say so
        assert a.health() == NOT_SERVING
    assert a.count_states() == b.count_states()
    assert a.listing() == b.listing()
    assert a.stats()["input.bus"] >= 2


def frames_made(node: SyncNode) -> int:
    """Actions the node put in frames so far (frames are built even with no peer up)."""
    return sum(node.stat(f"output.{action}") for action in ("ins", "upd_c", "vtw", "del_c"))


@pytest.mark.slow
def test_cut_stream_resumes_from_replay_log(nodes: NodeSet, kernel_frames: list[bytes]) -> None:
    """A short cut of the network between A and B: B catches up from A's replay log, no
    bulk update; a cut with more frames than net.pfsync.replay_log falls back to one."""
    flows = split_flows(kernel_frames)
    b = nodes.make("b", "b0000002").start()
    a = nodes.make("a", "a0000001", ["--sysctl", "net.pfsync.replay_log=8"])
    with LinkCut(b.sync) as link:
        a.start("--peer", link.address)
        wait_for(lambda: a.ready() and b.ready(), what="ready")
        a.inject(flows[0])
        wait_for(lambda: converged([a, b]), what="first flow synced")
        before_a, before_b = a.stats(), b.stats()

        link.cut()
        wait_for(lambda: not a.status()["peers"][0]["connected"], what="A sees the cut")
        for flow in flows[1:4]:  # three frames: fewer than the log holds
            a.inject(flow)
        link.mend()
        wait_for(lambda: converged([a, b]), 20, what="resume", detail=lambda: sync_report([a, b]))
        after_a, after_b = a.stats(), b.stats()
        assert after_a["replay_log.hits"] > before_a["replay_log.hits"]
        assert after_a["bulk_fallbacks"] == before_a["bulk_fallbacks"]
        assert after_b["input.bus"] == before_b["input.bus"]
        assert a.listing() == b.listing()

        link.cut()
        wait_for(lambda: not a.status()["peers"][0]["connected"], what="A sees the cut")
        for flow in flows[4:]:  # a frame per flow (each waits for the last): more than 8
            made = frames_made(a)
            a.inject(flow)
            wait_for(lambda n=made: frames_made(a) > n, 5, 0.01, what="a frame")
        assert len(flows[4:]) > 8
        link.mend()
        wait_for(lambda: converged([a, b]), 20, what="bulk", detail=lambda: sync_report([a, b]))
        final_a, final_b = a.stats(), b.stats()
        assert final_a["bulk_fallbacks"] > after_a["bulk_fallbacks"]
        assert final_b["input.bus"] > after_b["input.bus"]
        assert a.listing() == b.listing()


def test_three_node_mesh_converges(nodes: NodeSet, kernel_frames: list[bytes]) -> None:
    """Three nodes each dialing the other two (pairs dialed both ways): traffic into
    each of them ends in one table on all three."""
    trio = nodes.mesh(3)
    wait_for(lambda: all(n.ready() for n in trio), what="ready")
    flows = split_flows(kernel_frames)
    for i, node in enumerate(trio):
        node.inject([f for flow in flows[i::3] for f in flow])
    wait_for(lambda: converged(trio), 20, what="mesh", detail=lambda: sync_report(trio))
    listings = [n.listing() for n in trio]
    assert listings[0] == listings[1] == listings[2]
    for node in trio:
        assert any(f"creatorid: {node.hostid}" in block for block in listings[0])
        up = [p for p in node.status()["peers"] if p["connected"]]
        assert len(up) == 2  # one stream per pair, the duplicate dropped


def test_asymmetric_path_is_repaired(nodes: NodeSet, kernel_frames: list[bytes]) -> None:
    """Each connection's client side goes through A and its server side through B (an
    asymmetric path), packet by packet without waiting for sync: updates arrive stale or
    out of order, and the tables still end identical."""
    defer = ["--sysctl", "net.pfsync.defer=1"]  # a new state reaches the peer first
    a, b = nodes.mesh(2, defer)
    wait_for(lambda: a.ready() and b.ready(), what="ready")
    flows = [f for f in split_flows(kernel_frames) if len(f) < 100]  # no bulk transfer
    for flow in flows:
        for frame in flow:
            (a if client_side(frame, flow[0]) else b).inject([frame])
    wait_for(lambda: converged([a, b]), 20, what="repair", detail=lambda: sync_report([a, b]))
    # The digests cover identities and peer levels, not windows: the last window update
    # may still be on its way when they agree (seen once under load). Each node counted
    # the packets it saw (compressed updates carry no counters).
    wait_for(
        lambda: a.listing(counters=False) == b.listing(counters=False),
        10,
        what="windows",
        detail=lambda: "\n".join(set(a.listing(counters=False)) ^ set(b.listing(counters=False))),
    )
    assert a.count_states() == b.count_states() > 0


def test_sync_settings_at_run_time(nodes: NodeSet) -> None:
    """net.pfsync.maxupd and flush_ms are set at run time and read back; out-of-range
    values are refused in one line with exit 2."""
    a = nodes.make("a", "a0000001").start()
    done = a.sysctl("net.pfsync.maxupd=4", "net.pfsync.flush_ms=50")
    assert done.returncode == 0, done.stderr
    assert a.tool("pfsysctl", "-n", "net.pfsync.maxupd").stdout.strip() == "4"
    assert a.tool("pfsysctl", "-n", "net.pfsync.flush_ms").stdout.strip() == "50"
    assert "maxupd 4  flush 50ms" in a.pfctl("-s", "sync").stdout
    for bad in ("net.pfsync.maxupd=256", "net.pfsync.flush_ms=0", "net.pfsync.flush_ms=1001"):
        refused = a.sysctl(bad)
        assert refused.returncode == 2
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "Traceback" not in refused.stderr
    assert a.tool("pfsysctl", "-n", "net.pfsync.maxupd").stdout.strip() == "4"


def test_sigterm_flushes_pending_changes(nodes: NodeSet, kernel_frames: list[bytes]) -> None:
    """SIGTERM with changes still waiting for their flush: A sends them, exits 0, and B
    holds them."""
    a, b = nodes.mesh(2, ["--sysctl", "net.pfsync.flush_ms=1000"])
    wait_for(lambda: converged([a, b]), what="ready and quiet")
    a.inject(kernel_frames)
    expected = a.listing()
    assert a.terminate() == 0
    assert b.listing() == expected


def test_kill_9_of_a_peer_is_survived(nodes: NodeSet, kernel_frames: list[bytes]) -> None:
    """kill -9 of B: A keeps serving and tracking; B restarted gets A's table and A's
    stream to it comes back."""
    flows = split_flows(kernel_frames)
    a, b = nodes.mesh(2)
    wait_for(lambda: a.ready() and b.ready(), what="ready")
    a.inject(flows[0])
    b.kill()
    reply = a.inject([f for flow in flows[1:] for f in flow])
    assert reply.errors == 0 and a.alive
    assert a.health() == SERVING and a.ready()
    wait_for(lambda: not any(p["connected"] for p in a.status()["peers"]), what="A sees B go")
    b.start()
    wait_for(lambda: converged([a, b]), 20, what="reconnect", detail=lambda: sync_report([a, b]))
    assert b.listing() == a.listing()


# ---- hostile peers ----------------------------------------------------------------------

EXCHANGE = "/pfsync.v1.SyncService/Exchange"


def hello(creatorid: int = 0xBAD0BAD0, version: int = 1) -> spb.SyncFrame:
    return spb.SyncFrame(
        sender=creatorid, hello=spb.Hello(version=version, creatorid=creatorid, epoch=7)
    )


def states(n: int, creatorid: int = 0xBAD0BAD0) -> spb.StateColumns:
    """``n`` well-formed UDP states as columns."""
    cols = spb.StateColumns()
    cols.id.extend(range(1, n + 1))
    cols.creatorid.extend([creatorid] * n)
    cols.protocol.extend([17] * n)
    cols.src_address.extend([bytes([10, 9, i >> 8 & 255, i & 255]) for i in range(n)])
    cols.dst_address.extend([bytes([192, 0, 2, 1])] * n)
    cols.src_port.extend([40000] * n)
    cols.dst_port.extend([53] * n)
    cols.direction.extend([1] * n)
    cols.msl_class.extend([0] * n)
    cols.timeout.extend([0] * n)
    cols.expires_in_ms.extend([30000] * n)
    cols.age_ms.extend([0] * n)
    for peer in (cols.src, cols.dst):
        for column in (peer.state, peer.seqlo, peer.seqhi, peer.max_win, peer.wscale):
            column.extend([1] * n)
        peer.wscale_seen.extend([False] * n)
        peer.packets.extend([1] * n)
        peer.bytes.extend([40] * n)
    return cols


def send_raw(node: SyncNode, messages: list[bytes]) -> str:
    """Dial the node's SyncService and send ``messages`` as they are (raw bytes on the
    stream, no serializer); returns how the stream ended."""
    with grpc.insecure_channel(node.sync) as channel:
        call = channel.stream_stream(EXCHANGE)(iter(messages), timeout=10)
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            return str(exc.code())
    return "OK"


def frames(*items: spb.SyncFrame | bytes) -> list[bytes]:
    return [
        i if isinstance(i, bytes) else spb.ExchangeRequest(frame=i).SerializeToString()
        for i in items
    ]


def test_hostile_peer_frames_are_counted_and_change_nothing(
    nodes: NodeSet, kernel_frames: list[bytes]
) -> None:
    a, b = nodes.mesh(2)
    wait_for(lambda: a.ready() and b.ready(), what="ready")
    flows = split_flows(kernel_frames)
    a.inject([f for flow in flows[:-1] for f in flow])
    wait_for(lambda: converged([a, b]), what="synced")
    table = a.listing()
    before = a.stats()

    send_raw(a, [b"\xff\xff\xff\xff garbage, not a protobuf message"])
    send_raw(a, frames(hello(version=99), spb.SyncFrame(clear=[int(a.hostid, 16)])))
    send_raw(a, frames(spb.SyncFrame(clear=[int(a.hostid, 16)]), spb.SyncFrame(inserts=states(3))))

    uneven = states(5)
    del uneven.creatorid[-1]
    bad_value = states(5)
    bad_value.timeout[2] = 99
    bad_direction = states(50_000)
    bad_direction.direction[-1] = 7
    uneven_big = states(50_000)
    del uneven_big.src.seqlo[-1]
    unknown = spb.SyncFrame(inserts=states(2)).SerializeToString() + b"\xf8\x06\x01"  # field 111
    send_raw(
        a,
        frames(
            hello(),
            spb.SyncFrame(inserts=uneven),
            spb.SyncFrame(updates=bad_value),
            spb.SyncFrame(inserts=bad_direction),
            spb.SyncFrame(updates=uneven_big),
            spb.ExchangeRequest(frame=spb.SyncFrame.FromString(unknown)).SerializeToString(),
        ),
    )
    after = wait_for(
        lambda: (s := a.stats())["badact"] > before["badact"] and s, what="the last frame counted"
    )
    assert after["badver"] == before["badver"] + 1
    assert (
        after["hdrops"] >= before["hdrops"] + 3
    )  # the two frames after a bad hello, two before any
    assert after["badlen"] == before["badlen"] + 3  # with the garbage
    assert after["badval"] == before["badval"] + 2
    assert after["badact"] == before["badact"] + 1
    assert a.alive and a.listing() == table

    # The real peer is still served.
    a.inject(flows[-1])
    wait_for(lambda: converged([a, b]), what="sync after the attack")
    assert b.listing() == a.listing() != table


def test_hostile_listener_does_not_stop_the_dialer(nodes: NodeSet) -> None:
    """A node dials a "peer" that answers with bytes that are no frame: each stream is
    counted (badlen) and dropped, and the node keeps redialing."""
    port = free_port()

    def garbage(requests: object, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"\xff\xff\xff\xff not a frame"

    handler = grpc.method_handlers_generic_handler(
        "pfsync.v1.SyncService", {"Exchange": grpc.stream_stream_rpc_method_handler(garbage)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        a = nodes.make("a", "a0000001", ["--peer", f"127.0.0.1:{port}"]).start()
        wait_for(lambda: a.stat("badlen") >= 3, 15, what="three streams counted")
        assert a.alive and "not a SyncFrame" in a.status()["peers"][0]["last_error"]
    finally:
        server.stop(None)


# ---- mTLS ---------------------------------------------------------------------------------


def test_mtls_peers_sync_and_strangers_stay_out(
    nodes: NodeSet, kernel_frames: list[bytes], tmp_path: Path
) -> None:
    """Two nodes with certificates of one CA sync; a node whose certificate another CA
    signed never gets in; one with a good certificate but a name not in --peer-allow is
    refused and counted as badauth. Neither outsider learns a state or changes A's."""
    ca = make_ca(tmp_path, "pfsync-ca")
    a = nodes.make("a", "a0000001")
    b = nodes.make("b", "b0000002")
    a.args += [*tls_flags(tmp_path, ca, "node-a"), "--peer-allow", "node-b"]
    a.args += ["--peer", b.sync]
    b.args += [*tls_flags(tmp_path, ca, "node-b"), "--peer-allow", "node-a"]
    b.args += ["--peer", a.sync]
    a.start(), b.start()
    wait_for(lambda: a.ready() and b.ready(), what="ready")
    a.inject(kernel_frames)
    wait_for(lambda: converged([a, b]), what="TLS sync", detail=lambda: sync_report([a, b]))
    assert a.listing() == b.listing()
    table = a.listing()
    badauth = a.stat("badauth")

    (tmp_path / "other").mkdir()
    other_ca = make_ca(tmp_path / "other", "other-ca")
    stranger = nodes.make("stranger", "c0000003")
    stranger.args += [*tls_flags(tmp_path / "other", other_ca, "node-b"), "--peer", a.sync]
    intruder = nodes.make("intruder", "d0000004")
    intruder.args += [*tls_flags(tmp_path, ca, "intruder"), "--peer", a.sync]
    stranger.start(), intruder.start()
    wait_for(lambda: a.stat("badauth") > badauth, what="the intruder refused")
    for outsider in (stranger, intruder):
        wait_for(lambda o=outsider: o.status()["peers"][0]["last_error"], what="a refusal")
    for outsider in (stranger, intruder):
        peer = outsider.status()["peers"][0]
        assert not peer["connected"], peer
        assert outsider.count_states() == 0 and not outsider.ready()
    assert a.listing() == table
    assert [p["creatorid"] for p in a.status()["peers"] if p["connected"]] == [b.hostid]
    # A new state still reaches the allowed peer.
    a.inject([udp("192.0.2.77", "198.51.100.1", 5353, 53, b"q")])
    wait_for(lambda: converged([a, b]), what="sync after the refusals")
    assert stranger.count_states() == intruder.count_states() == 0


# ---- deferral -----------------------------------------------------------------------------


def test_deferral_waits_for_the_peer(nodes: NodeSet) -> None:
    """net.pfsync.defer=1: Inject of a SYN returns once B acknowledged the new state (B
    holds it when the reply arrives); with B stopped the reply still comes after the
    20 ms deferral, not later."""
    a, b = nodes.mesh(2, ["--sysctl", "net.pfsync.defer=1"])
    wait_for(lambda: converged([a, b]), what="ready and quiet")
    for port in range(41000, 41010):
        reply = a.inject([tcp("192.0.2.1", "198.51.100.7", port, 443, SYN, 1000, 0)])
        assert reply.passed == 1
        assert b.count_states() == port - 41000 + 1  # read at once: no waiting here
    assert a.stat("deferred") == 10
    assert a.stat("defer_timeouts") == 0

    b.signal(signal.SIGSTOP)
    try:
        timeouts = a.stat("defer_timeouts")
        start = time.monotonic()
        reply = a.inject([tcp("192.0.2.1", "198.51.100.7", 42000, 443, SYN, 1000, 0)])
        elapsed = time.monotonic() - start
        assert reply.passed == 1
        assert 0.018 <= elapsed < 0.25, elapsed
        assert a.stat("defer_timeouts") == timeouts + 1
    finally:
        b.signal(signal.SIGCONT)
