"""Issue 7 (hardening), items 3, 8-12: the control API under hostile or careless clients,
each reproduced through a real pfsyncd process and the real console scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from pfsync.pcap import PcapWriter
from pfsync.v1 import control_pb2 as pb
from pfsync.v1 import control_pb2_grpc
from tests.certs import make_ca, make_cert
from tests.packets import udp
from tests.test_e2e import BIN, free_port, pfctl
from tests.test_hardening import info, running


def tool(*argv: str | bytes, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a console script (argv may hold raw bytes, as a shell passes them)."""
    return subprocess.run(
        [BIN / str(argv[0]), *argv[1:]],
        capture_output=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def one_line(proc: subprocess.CompletedProcess, code: int) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- item 9: TLS and read restriction --------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = make_ca(tmp_path)
    server = make_cert(ca, tmp_path, "node1", ips=["127.0.0.1"], dns=["localhost"])
    client = make_cert(ca, tmp_path, "pfctl-admin")
    return {
        "ca": ca.cert,
        "cert": server.cert,
        "key": server.key,
        "client_cert": client.cert,
        "client_key": client.key,
    }


def test_control_api_over_tls(pki: dict[str, Path]) -> None:
    tls = ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])]
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [BIN / "pfsyncd", "--control", addr, *tls], stderr=subprocess.PIPE, text=True
    )
    try:
        args = ["pfctl", "-N", addr, "-s", "info"]
        for _ in range(100):
            ok = tool(*args, "--tls-ca", str(pki["ca"]))
            if ok.returncode == 0:
                break
        assert ok.returncode == 0 and b"Status: Enabled" in ok.stdout, ok.stderr
        via_env = tool(*args, env={"PFSYNC_TLS_CA": str(pki["ca"])})
        assert via_env.returncode == 0
        # A plain-text client cannot talk to a TLS node: one line, exit 1.
        assert "cannot reach node" in one_line(tool(*args), 1)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        assert "TLS" in proc.stderr.read()


def test_mutual_tls_requires_a_client_certificate(pki: dict[str, Path]) -> None:
    tls = ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), "--tls-ca", str(pki["ca"])]
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([BIN / "pfsyncd", "--control", addr, *tls], stderr=subprocess.PIPE)
    try:
        args = ["pfctl", "-N", addr, "-s", "info", "--tls-ca", str(pki["ca"])]
        client = ["--tls-cert", str(pki["client_cert"]), "--tls-key", str(pki["client_key"])]
        for _ in range(100):
            ok = tool(*args, *client)
            if ok.returncode == 0:
                break
        assert ok.returncode == 0, ok.stderr
        assert "cannot reach node" in one_line(tool(*args), 1)  # no client certificate
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


def test_read_token_restricts_reads(tmp_path: Path) -> None:
    read, admin = tmp_path / "read.token", tmp_path / "admin.token"
    read.write_text("reader-token\n")
    admin.write_text("admin-token\n")
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [BIN / "pfsyncd", "--control", addr, "--read-token-file", str(read),
         "--admin-token-file", str(admin)],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(100):
            ok = tool("pfctl", "-N", addr, "-s", "info", "--token-file", str(read))
            if ok.returncode == 0:
                break
        assert ok.returncode == 0, ok.stderr
        assert "wants a token" in one_line(tool("pfctl", "-N", addr, "-s", "info"), 1)
        listing = tool("pfctl", "-N", addr, "-s", "states", env={"PFSYNC_TOKEN": "wrong"})
        assert "wants a token" in one_line(listing, 1)
        # The admin token reads too; the read token does not administer.
        assert tool("pfsysctl", "-N", addr, "-a", "--token-file", str(admin)).returncode == 0
        flush = tool("pfctl", "-N", addr, "-F", "states", "--token-file", str(read))
        assert "admin token" in one_line(flush, 1)
        # Health stays open for load balancers.
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(addr) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


def test_plain_text_on_a_network_address_warns() -> None:
    # 0.0.0.0 is every address of this host; the node must say its API is in clear text.
    with running(addr=f"0.0.0.0:{free_port()}") as (_, proc):
        proc.terminate()
        proc.wait(10)
        log = proc.stderr.read()
    assert "without TLS" in log and "read calls are open" in log


# ---- item 10: the tools' bad input is one line ----------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["pfctl", "-k", "a..b"],
        ["pfctl", "-k", "x" * 64 + ".example"],
        ["pfctl", "-k", b"\xff"],
        ["pfctl", "-N", b"\xff:7070", "-s", "info"],
        ["pfsysctl", b"net.\xff"],
        ["pfsysctl", "-w", b"net.pf.limit.states=\xff"],
        ["pfctl", "-N", "", "-s", "info"],
    ],
)
def test_tool_bad_input_is_one_line(argv: list[str | bytes]) -> None:
    one_line(tool(*argv), 2)


def test_non_ascii_token_is_one_line() -> None:
    proc = tool("pfctl", "-s", "info", env={"PFSYNC_TOKEN": "t\u00f6ken"})
    assert "printable ASCII" in one_line(proc, 2)


# ---- item 11: a capture file name that is not UTF-8 ------------------------------------------


def test_non_utf8_capture_name_keeps_getinfo(tmp_path: Path) -> None:
    name = os.fsencode(tmp_path) + b"/caf\xe9.pcap"
    with PcapWriter(name.decode(sys.getfilesystemencoding(), "surrogateescape")) as w:
        w.write(1.0, udp("10.0.0.1", "10.0.0.2", 1, 53))
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([BIN / "pfsyncd", "--control", addr, "--pcap", name])
    try:
        for _ in range(100):
            out = pfctl(addr, "-s", "info", "--json")
            if out.returncode == 0 and json.loads(out.stdout)["info"]["sources"][0]["done"]:
                break
        source = json.loads(out.stdout)["info"]["sources"][0]
        assert source["name"].endswith("caf\\xe9.pcap") and int(source["frames"]) == 1
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


# ---- items 3 and 8: listings under churn and load -------------------------------------------

LIST_METHOD = "/pfsync.v1.ControlService/ListStates"

# A load generator in its own process (so its CPU does not disturb the latency measured
# here): READERS listings read to the end as raw bytes, STALLED ones never read.
LOAD = """
import asyncio, sys, time, grpc
async def main(addr, readers, stalled):
    async with grpc.aio.insecure_channel(addr) as ch:
        listing = ch.unary_stream(sys.argv[4], request_serializer=None, response_deserializer=None)
        async def read():
            n = 0
            async for chunk in listing(b"", timeout=300):
                n += len(chunk)
            return n
        idle = [listing(b"", timeout=300) for _ in range(stalled)]
        start = time.monotonic()
        sizes = await asyncio.gather(*(read() for _ in range(readers)))
        print(len(sizes), min(sizes), round(time.monotonic() - start, 1), flush=True)
        for call in idle:
            call.cancel()
asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def inject_flows(addr: str, count: int) -> None:
    """``count`` distinct UDP flows, injected as admin from loopback."""
    with grpc.insecure_channel(addr) as channel:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        for start in range(0, count, 20000):
            frames = [
                pb.Frame(
                    linktype=1,
                    data=udp(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "192.0.2.1", 999, 53),
                )
                for i in range(start, min(count, start + 20000))
            ]
            stub.Inject(pb.InjectRequest(frames=frames), timeout=60)


def test_listing_survives_states_leaving_the_table() -> None:
    """Was OverflowError (int(-inf)) for states unlinked after the listing began."""
    with running("--limit-states", "200000") as (addr, _):
        inject_flows(addr, 50000)
        with grpc.insecure_channel(addr) as channel:
            listing = channel.unary_stream(
                LIST_METHOD,
                request_serializer=pb.ListStatesRequest.SerializeToString,
                response_deserializer=pb.ListStatesResponse.FromString,
            )
            chunks = listing(pb.ListStatesRequest(), timeout=60)
            first = next(chunks)
            assert pfctl(addr, "-F", "states").returncode == 0
            rest = list(chunks)  # raised StatusCode.UNKNOWN before the fix
        assert len(first.states) + sum(len(c.states) for c in rest) <= 50000
        assert int(info(addr)["current_entries"]) == 0


@pytest.mark.slow
def test_getinfo_stays_fast_under_listing_load() -> None:
    """Listing clients on a 50k-state table (10 reading, 20 stalled): GetInfo took up to
    1.6 s with 200 of them; now it waits for a few slices at most. The bound is on the 95th
    percentile: on a shared 2-core machine a single call can lose the CPU to another
    process (seen: one of 100 at 132 ms while other test suites ran)."""
    # UDP states would expire during a long run; keep them for the whole test.
    keep = [f"--sysctl=net.pf.timeout.udp.{t}=86400" for t in ("first", "single", "multiple")]
    with running("--limit-states", "200000", *keep) as (addr, proc):
        inject_flows(addr, 50000)
        load = subprocess.Popen(
            [sys.executable, "-c", LOAD, addr, "10", "20", LIST_METHOD],
            stdout=subprocess.PIPE,
            text=True,
        )
        latencies = []
        with grpc.insecure_channel(addr) as channel:
            stub = control_pb2_grpc.ControlServiceStub(channel)
            stub.GetInfo(pb.GetInfoRequest(), timeout=5)
            time.sleep(1)
            while load.poll() is None and len(latencies) < 100:
                start = time.perf_counter()
                stub.GetInfo(pb.GetInfoRequest(), timeout=5)
                latencies.append(time.perf_counter() - start)
                time.sleep(0.05)
        done, smallest, seconds = load.communicate(timeout=300)[0].split()[:3]
        assert load.returncode == 0 and int(done) == 10
        assert int(smallest) > 50000 * 40  # every listing had every state
        latencies.sort()
        print(
            f"GetInfo under load: median {latencies[len(latencies) // 2] * 1e3:.1f} ms, "
            f"max {latencies[-1] * 1e3:.1f} ms; 10 listings in {seconds} s"
        )
        assert latencies[int(len(latencies) * 0.95)] < 0.1, latencies[-5:]
        assert latencies[-1] < 0.5, latencies[-5:]
        assert proc.poll() is None


# ---- item 12: malformed protobuf requests ----------------------------------------------------


def test_malformed_requests_log_one_line_rate_limited() -> None:
    """Was a multi-line server traceback per request: a log flood any client could cause."""
    with running() as (addr, proc):
        with grpc.insecure_channel(addr) as channel:
            raw = channel.unary_unary(
                "/pfsync.v1.ControlService/GetInfo",
                request_serializer=None,
                response_deserializer=None,
            )
            for _ in range(200):
                with pytest.raises(grpc.RpcError):
                    raw(b"\xff\xff\xff\xff\x0f", timeout=5)  # a varint that never ends
        assert int(info(addr)["hostid"], 16) > 0  # still serving
        proc.terminate()
        assert proc.wait(10) == 0
        log = proc.stderr.read().splitlines()
    reports = [line for line in log if "DecodeError" in line]
    assert 1 <= len(reports) <= 5, log
    assert not any("Traceback" in line for line in log)
