"""The sysctl tree, the Sysctl gRPC service and pfsysctl, against real pfsyncd processes."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pfsync.node import Node
from pfsync.sysctl import SysctlError
from pfsync.v1 import control_pb2 as cpb
from pfsync.v1 import control_pb2_grpc, sysctl_pb2, sysctl_pb2_grpc
from statetable import timeouts as tmo
from tests.packets import ACK, FIN, SYN, tcp
from tests.test_e2e import BIN, free_port, pfctl

# ---- the tree, in process -------------------------------------------------------------


def test_every_knob_of_the_issue_is_in_the_tree_with_its_default() -> None:
    tree = Node(1).sysctl
    values = {n.name: n.get() for n in tree.list()}
    assert values["net.inet.tcp.vtw.enable"] is True
    assert values["net.inet.tcp.vtw.entries"] == 65536
    assert values["net.inet.tcp.mslt.enable"] is True
    assert (
        values["net.inet.tcp.mslt.loopback"],
        values["net.inet.tcp.mslt.local"],
        values["net.inet.tcp.mslt.remote"],
    ) == (1, 5, 30)
    assert values["net.pf.timeout.tcp.established"] == 86400
    assert values["net.pf.limit.states"] == 100000


def test_set_changes_the_table() -> None:
    node = Node(1)
    tree, table = node.sysctl, node.table
    assert tree.set("net.inet.tcp.mslt.remote", "7") == (30, 7)
    assert table.mslt.time_wait(1) == 14.0
    tree.set("net.pf.timeout.tcp.established", "0x10")
    assert table.timeouts[tmo.TCP_ESTABLISHED] == 16
    tree.set("net.inet.tcp.vtw.entries", "256")
    assert table.vtw.entries == 256
    tree.set("net.inet.tcp.vtw.enable", "off")
    assert table.vtw.enabled is False
    tree.set("net.pf.limit.states", "5")
    assert table.limit_states == 5


@pytest.mark.parametrize(
    "name, value, code",
    [
        ("net.inet.tcp.vtw.entries", "1000", "invalid"),  # not a power of two
        ("net.inet.tcp.vtw.entries", "2", "invalid"),  # below the minimum
        ("net.inet.tcp.vtw.entries", "lots", "invalid"),
        ("net.inet.tcp.vtw.enable", "2", "invalid"),
        ("net.inet.tcp.mslt.local", "-1", "invalid"),
        ("net.inet.tcp.mslt.local", "3601", "invalid"),
        ("net.inet.tcp.vtw.stats", "1", "read-only"),
        ("net.inet.tcp.mslt.local_nets", "10.0.0.0/8", "read-only"),
        ("net.inet.tcp.vtw", "1", "not-found"),  # a subtree, not a node
        ("kern.nothing", "1", "not-found"),
    ],
)
def test_bad_names_and_values_are_refused_in_one_line(name: str, value: str, code: str) -> None:
    node = Node(1)
    before = {n.name: n.get() for n in node.sysctl.list() if n.name != "net.inet.tcp.vtw.stats"}
    with pytest.raises(SysctlError) as err:
        node.sysctl.set(name, value)
    assert err.value.code == code
    assert "\n" not in str(err.value) and str(err.value)
    after = {n.name: n.get() for n in node.sysctl.list() if n.name != "net.inet.tcp.vtw.stats"}
    assert after == before


def test_struct_fields_and_subtrees_resolve() -> None:
    tree = Node(1).sysctl
    node, fields = tree.get("net.inet.tcp.vtw.stats.lookup_connect")
    assert node.name == "net.inet.tcp.vtw.stats"
    assert [f for f, _ in fields] == [
        f"lookup_connect.{n}"
        for n in ("look", "hit", "miss", "probe", "losing", "max_chain", "max_probe", "max_loss")
    ]
    assert tree.get("net.inet.tcp.vtw.stats.kill")[1] == [("kill", 0)]
    assert [n.name for n in tree.list("net.inet.tcp.vtw")] == [
        "net.inet.tcp.vtw.enable",
        "net.inet.tcp.vtw.entries",
        "net.inet.tcp.vtw.stats",
    ]
    with pytest.raises(SysctlError):
        tree.get("net.inet.tcp.vtw.stats.nothing")
    with pytest.raises(SysctlError):
        tree.list("net.inet.tc")  # prefixes match whole components only


# ---- a real node ----------------------------------------------------------------------


def pfsysctl(addr: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "pfsysctl", "-N", addr, *args], capture_output=True, text=True, timeout=30
    )


def start_node(*args: str) -> tuple[subprocess.Popen[str], str]:
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [BIN / "pfsyncd", "--control", addr, *args], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 20
    while pfsysctl(addr, "net.inet.tcp.vtw.enable").returncode:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "node did not start"
        time.sleep(0.1)
    return proc, addr


@pytest.fixture
def node_with_config(tmp_path: Path) -> Iterator[str]:
    config = tmp_path / "node.toml"
    config.write_text(
        'local_net = ["192.0.2.0/24"]\n\n[sysctl]\n'
        '"net.inet.tcp.vtw.entries" = 1024\n'
        '"net.inet.tcp.mslt.remote" = 600\n'
        '"net.inet.tcp.mslt.enable" = true\n'
    )
    # The flag wins over the file for the same name, the file's other names stay.
    proc, addr = start_node("--config", str(config), "--sysctl", "net.inet.tcp.mslt.remote=900")
    try:
        yield addr
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def closed_connection(client: str, cport: int) -> list[bytes]:
    """A whole TCP connection, client closes first, as Ethernet frames."""
    srv = "198.51.100.7"
    return [
        tcp(client, srv, cport, 80, SYN, 100, 0, 64240),
        tcp(srv, client, 80, cport, SYN | ACK, 900, 101, 65160),
        tcp(client, srv, cport, 80, ACK, 101, 901, 502),
        tcp(client, srv, cport, 80, FIN | ACK, 101, 901, 502),
        tcp(srv, client, 80, cport, ACK, 901, 102, 509),
        tcp(srv, client, 80, cport, FIN | ACK, 901, 102, 509),
        tcp(client, srv, cport, 80, ACK, 102, 902, 502),
    ]


def inject(addr: str, frames: list[bytes]) -> list[int]:
    with grpc.insecure_channel(addr) as channel:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        reply = stub.Inject(
            cpb.InjectRequest(frames=[cpb.Frame(linktype=1, data=f) for f in frames])
        )
    return list(reply.verdicts)


@pytest.mark.slow
def test_start_up_sysctls_from_file_and_flags(node_with_config: str) -> None:
    out = pfsysctl(node_with_config, "net.inet.tcp.vtw.entries", "net.inet.tcp.mslt")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "net.inet.tcp.vtw.entries = 1024" in lines
    assert "net.inet.tcp.mslt.remote = 900" in lines
    assert "net.inet.tcp.mslt.local_nets = 192.0.2.0/24" in lines
    assert pfsysctl(node_with_config, "-n", "net.inet.tcp.mslt.enable").stdout == "1\n"


@pytest.mark.slow
def test_vtw_toggle_at_run_time_loses_no_connection(node_with_config: str) -> None:
    addr = node_with_config
    frames = [f for i in range(20) for f in closed_connection(f"203.0.113.{i + 1}", 40000 + i)]
    assert inject(addr, frames) == [cpb.VERDICT_PASS] * len(frames)

    def rows() -> list[dict]:
        out = pfctl(addr, "-s", "states", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["states"]

    before = rows()
    assert len(before) == 20 and all(s["vestigial"] for s in before)
    stats = pfsysctl(addr, "net.inet.tcp.vtw.stats").stdout.splitlines()
    assert "net.inet.tcp.vtw.stats.ins = 20" in stats
    assert "net.inet.tcp.vtw.stats.class.ipv4.remote.inuse = 20" in stats
    assert "net.inet.tcp.vtw.stats.class.ipv4.remote.bytes = 65536" in stats  # 1024 x 64 B

    out = pfsysctl(addr, "-w", "net.inet.tcp.vtw.enable=0")
    assert out.returncode == 0 and out.stdout == "net.inet.tcp.vtw.enable: 1 -> 0\n"
    full = rows()
    assert len(full) == 20 and not any(s.get("vestigial") for s in full)
    key = ("id", "src_address", "src_port", "dst_port")
    assert sorted(tuple(s[k] for k in key) for s in full) == sorted(
        tuple(s[k] for k in key) for s in before
    )

    assert pfsysctl(addr, "-w", "net.inet.tcp.vtw.enable=1").returncode == 0
    again = rows()
    assert len(again) == 20 and all(s["vestigial"] for s in again)
    # A late retransmitted FIN from a client still passes, a new SYN reopens.
    fin = closed_connection("203.0.113.1", 40000)[3]
    syn = tcp("203.0.113.1", "198.51.100.7", 40000, 80, SYN, 5000, 0, 64240)
    assert inject(addr, [fin, syn]) == [cpb.VERDICT_PASS] * 2
    assert len([s for s in rows() if not s.get("vestigial")]) == 1

    # pfctl -k and -F reach records too.
    killed = pfctl(addr, "-k", "203.0.113.2")
    assert killed.returncode == 0 and "killed 1 states" in killed.stderr
    assert len(rows()) == 19
    flushed = pfctl(addr, "-F", "states")
    assert flushed.returncode == 0 and rows() == []
    stats = pfsysctl(addr, "net.inet.tcp.vtw.stats.class.ipv4.remote.inuse").stdout
    assert stats == "net.inet.tcp.vtw.stats.class.ipv4.remote.inuse = 0\n"


@pytest.mark.slow
def test_pfsysctl_errors_exit_2_in_one_line(node_with_config: str) -> None:
    addr = node_with_config
    for args, message in [
        (["-w", "net.inet.tcp.vtw.entries=1000"], "not a power of two"),
        (["kern.bogus"], "unknown sysctl name"),
        (["-w", "net.inet.tcp.vtw.stats=0"], "read-only"),
        (["-w", "net.inet.tcp.vtw.enable"], "NAME=VALUE"),
        (["net.inet.tcp.vtw.enable=1"], "needs -w"),
        ([], "give NAME"),
        (["-a", "net.inet"], "-a takes no names"),
    ]:
        out = pfsysctl(addr, *args)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("pfsysctl: ") and message in lines[0]
    assert pfsysctl(addr, "net.inet.tcp.vtw.entries").stdout == "net.inet.tcp.vtw.entries = 1024\n"
    unreachable = pfsysctl(f"127.0.0.1:{free_port()}", "-a")
    assert unreachable.returncode == 1 and "cannot reach node" in unreachable.stderr


@pytest.mark.slow
def test_all_lists_every_node_and_json_is_typed(node_with_config: str) -> None:
    out = pfsysctl(node_with_config, "-a")
    names = [line.split(" = ")[0] for line in out.stdout.splitlines()]
    assert "net.inet.tcp.vtw.stats.lookup_port.max_loss" in names
    assert "net.pf.timeout.tcp.closed" in names
    doc = json.loads(
        pfsysctl(
            node_with_config, "--json", "net.inet.tcp.vtw.enable", "net.inet.tcp.vtw.entries"
        ).stdout
    )
    assert [(n["type"], n.get("flag"), n.get("integer")) for n in doc["nodes"]] == [
        ("SYSCTL_TYPE_BOOL", True, None),
        ("SYSCTL_TYPE_INT", None, "1024"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--sysctl", "net.inet.tcp.vtw.entries=12"], "not a power of two"),
        (["--sysctl", "net.nothing=1"], "unknown sysctl name"),
        (["--sysctl", "novalue"], "is not NAME=VALUE"),
        (["--local-net", "10.0.0.0/33"], "bad network"),
    ],
)
def test_bad_start_up_settings_exit_2(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [BIN / "pfsyncd", "--control", f"127.0.0.1:{free_port()}", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("pfsyncd: ")


@pytest.mark.slow
async def test_sysctl_service_over_grpc(node_with_config: str) -> None:
    """Programs use the same API: typed values, NOT_FOUND / INVALID_ARGUMENT codes."""
    async with grpc.aio.insecure_channel(node_with_config) as channel:
        stub = sysctl_pb2_grpc.SysctlServiceStub(channel)
        reply = await stub.GetSysctl(sysctl_pb2.GetSysctlRequest(name="net.inet.tcp.mslt.remote"))
        node = reply.node
        assert node.integer == 900 and node.writable
        changed = await stub.SetSysctl(
            sysctl_pb2.SetSysctlRequest(name="net.inet.tcp.mslt.remote", value="45")
        )
        assert (changed.previous.integer, changed.node.integer) == (900, 45)
        for call, code in [
            (
                stub.GetSysctl(sysctl_pb2.GetSysctlRequest(name="x" * 300)),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (
                stub.GetSysctl(sysctl_pb2.GetSysctlRequest(name="net.none")),
                grpc.StatusCode.NOT_FOUND,
            ),
            (
                stub.SetSysctl(
                    sysctl_pb2.SetSysctlRequest(name="net.inet.tcp.vtw.stats", value="1")
                ),
                grpc.StatusCode.FAILED_PRECONDITION,
            ),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == code
