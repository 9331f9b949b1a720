"""Issue 7 (hardening), items 3, 8-12: the control API under hostile or careless clients,
each reproduced through a real pfsyncd process and the real console scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from pfsync.pcap import PcapWriter
from tests.certs import make_ca, make_cert
from tests.packets import udp
from tests.test_e2e import BIN, free_port, pfctl
from tests.test_hardening import running


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
