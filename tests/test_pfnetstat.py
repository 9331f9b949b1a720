"""pfnetstat: the real console script against a real node fed real kernel traffic.

Every mode's output is checked line by line (REFERENCE.md section 5 and sections 3-4 for
the pfsync and VTW layouts), ``--json`` is parsed, bad flags exit 2 in one line, an
unreachable node exits 1, and nothing prints a traceback. The formatters' exact layouts
(plurals, -ss, -B from a hand-built sysctl reply) are tested without a node.
"""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pfsync.v1 import control_pb2 as cpb
from pfsync.v1 import control_pb2_grpc
from pfsync.v1 import sysctl_pb2 as pb
from tests import traffic
from tests.packets import SYN, eth, tcp, tcp_options, udp
from tools import netstat_format as fmt
from tools.pfnetstat import parse_bpf_peers

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pfnetstat(addr: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "pfnetstat", "-N", addr, *args], capture_output=True, text=True, timeout=timeout
    )


def ok(addr: str, *args: str) -> list[str]:
    out = pfnetstat(addr, *args)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    return out.stdout.splitlines()


def wait_replayed(addr: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = pfnetstat(addr, "-I", "pcap0", "--json")
        if out.returncode == 0:
            channel = grpc.insecure_channel(addr)
            info = control_pb2_grpc.ControlServiceStub(channel).GetInfo(
                cpb.GetInfoRequest(), timeout=5
            )
            channel.close()
            if info.sources and all(s.done for s in info.sources):
                return
        time.sleep(0.1)
    raise AssertionError("replay did not finish")


@pytest.fixture(scope="module")
def real_pcap(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[traffic.Connection]]:
    """Real kernel connections: TCP over IPv4 closed by the client, UDP, TCP over IPv6."""
    path = tmp_path_factory.mktemp("netstat") / "real.pcap"
    with traffic.isolated_loopback():
        with traffic.capture_to_pcap(path):
            conns = [traffic.client_close_first(), traffic.udp_exchange(), traffic.ipv6()]
    return path, conns


@pytest.fixture(scope="module")
def node(real_pcap: tuple[Path, list[traffic.Connection]]) -> Iterator[str]:
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            BIN / "pfsyncd",
            "--pcap",
            str(real_pcap[0]),
            "--control",
            addr,
            "--sync-listen",
            "",
            # Keep the closed connections' TIME_WAIT records for the test's length.
            "--sysctl",
            "net.inet.tcp.mslt.loopback=600",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_replayed(addr)
        yield addr
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def frames_in(path: Path) -> tuple[int, int]:
    from pfsync.pcap import read_capture

    frames = [f for _, _, f in read_capture(path)]
    return len(frames), sum(len(f) for f in frames)


# ---- -s ---------------------------------------------------------------------------


def test_stats_all_sections_line_by_line(node: str) -> None:
    lines = ok(node, "-s")
    tcp_section = lines[: lines.index("udp:")]
    # Two TCP connections (IPv4 and IPv6), each a full handshake and an orderly close.
    assert tcp_section == [
        "tcp:",
        "\t2 connection requests",
        "\t2 connection accepts",
        "\t2 connections established",
        "\t2 connections closed",
        "\t0 connections reset",
        "\t0 segments dropped for state mismatch",
        "\t0 segments dropped for no state",
        "\t0 segments passed in TIME_WAIT",
        "\t0 connections tracked",
        "\t\t0 half-open connections",
        "\t2 vestigial time-wait records",
    ]
    udp_at = lines.index("udp:")
    assert lines[udp_at : udp_at + 3] == ["udp:", "\t1 state created", "\t1 state tracked"]
    assert [line for line in lines if not line.startswith("\t")] == [
        "tcp:",
        "udp:",
        "icmp:",
        "pf:",
        "pfsync:",
    ]
    pf_at = lines.index("pf:")
    assert lines[pf_at + 1].endswith(" packets passed")
    assert lines[pf_at + 2] == "\t0 packets blocked"


def test_stats_one_protocol_and_hidden_zeros(node: str) -> None:
    assert ok(node, "-s", "-p", "udp") == ["udp:", "\t1 state created", "\t1 state tracked"]
    assert ok(node, "-ss", "-p", "tcp") == [
        "tcp:",
        "\t2 connection requests",
        "\t2 connection accepts",
        "\t2 connections established",
        "\t2 connections closed",
        "\t2 vestigial time-wait records",
    ]


def test_stats_tcp_vestigial_layout(node: str) -> None:
    lines = ok(node, "-s", "-p", "tcp", "-V")
    vtw = lines[12:]
    assert vtw[:3] == ["\t\t2 inserts", "\t\t0 deletes", "\t\t0 assassinations"]
    assert vtw[3] == "\tvestigial time-wait lookup_connect"
    assert [line.split()[1] for line in vtw[4:12]] == list(fmt.VTW_HASH_FIELDS)
    assert vtw[12] == "\tvestigial time-wait lookup_port"
    assert len(vtw) == 21
    assert all(line.startswith("\t\t") for line in vtw[4:12] + vtw[13:])


def test_stats_pfsync_layout(node: str) -> None:
    lines = ok(node, "-s", "-p", "pfsync")
    assert lines == [
        "pfsync:",
        "\t0 packets received (IPv4)",
        "\t0 packets received (IPv6)",
        "\t\t0 packets discarded for bad interface",
        "\t\t0 packets discarded for bad ttl",
        "\t\t0 packets shorter than header",
        "\t\t0 packets discarded for bad version",
        "\t\t0 packets discarded for bad HMAC",
        "\t\t0 packets discarded for bad action",
        "\t\t0 packets discarded for short packet",
        "\t\t0 states discarded for bad values",
        "\t\t0 stale states",
        "\t\t0 failed state lookup/inserts",
        "\t0 packets sent (IPv4)",
        "\t0 packets sent (IPv6)",
        "\t\t0 send failed due to mbuf memory error",
        "\t\t0 send error",
    ]
    assert ok(node, "-ss", "-p", "pfsync") == ["pfsync:"]


def test_pfsync_plural_rules() -> None:
    stats = dict.fromkeys(("ipackets", "stale", "badstate", "oerrors", "onomem"), 1)
    stats["opackets"] = 2
    assert fmt.format_section("pfsync", stats, hide_zeros=True) == [
        "pfsync:",
        "\t1 packet received (IPv4)",
        "\t\t1 stale state",
        "\t\t1 failed state lookup/insert",
        "\t2 packets sent (IPv4)",
        "\t\t1 send failed due to mbuf memory error",
        "\t\t1 send error",
    ]
    assert fmt.counter_line("\t{n} state search{es}", 1) == "\t1 state search"
    assert fmt.counter_line("\t{n} state search{es}", 0) == "\t0 state searches"


def test_stats_json(node: str) -> None:
    document = json.loads("\n".join(ok(node, "-s", "--json")))
    assert set(document) == {"tcp", "udp", "icmp", "pf", "pfsync"}
    assert document["tcp"]["connattempt"] == 2
    assert document["udp"]["states"] == 1
    document = json.loads("\n".join(ok(node, "-s", "-p", "tcp", "-V", "--json")))
    assert document["tcp_vtw"]["ins"] == 2


# ---- -a ---------------------------------------------------------------------------

HEADER = "Proto  Local Address" + " " * 33 + "Foreign Address" + " " * 31 + "(state)"


def test_connections(node: str, real_pcap: tuple[Path, list[traffic.Connection]]) -> None:
    conns = {c.shape: c for c in real_pcap[1]}
    udp_conn = conns["udp_exchange"]
    lines = ok(node, "-a")
    assert lines[0] == "Active Internet connections (including servers)"
    assert lines[1] == HEADER
    # The closed TCP connections are vestigial records now: listed with -V only.
    assert lines[2:] == [
        fmt.format_connection(
            {
                "proto": "udp",
                "local": f"127.0.0.1.{udp_conn.server[1]}",
                "foreign": f"127.0.0.1.{udp_conn.client[1]}",
                "state": "",
            }
        )
    ]
    assert lines[2].split() == ["udp", f"127.0.0.1.{udp_conn.server[1]}",
                                f"127.0.0.1.{udp_conn.client[1]}"]  # fmt: skip


def test_connections_vestigial_with_expires(
    node: str, real_pcap: tuple[Path, list[traffic.Connection]]
) -> None:
    conns = {c.shape: c for c in real_pcap[1]}
    lines = ok(node, "-a", "-V")
    assert lines[1] == HEADER + "      Expires"
    rows = [line.split() for line in lines[2:]]
    tcp4, tcp6 = conns["client_close_first"], conns["ipv6"]
    by_proto = {row[0]: row for row in rows}
    assert by_proto["tcp"][1:4] == [
        f"127.0.0.1.{tcp4.server[1]}",
        f"127.0.0.1.{tcp4.client[1]}",
        "TIME_WAIT",
    ]
    assert by_proto["tcp6"][1:4] == [f"::1.{tcp6.server[1]}", f"::1.{tcp6.client[1]}", "TIME_WAIT"]
    # 2 x MSL of loopback (600 s), less the seconds since the replay.
    assert 1100 <= int(by_proto["tcp"][4].rstrip("s")) <= 1200
    assert [row[0] for row in (r.split() for r in ok(node, "-a", "-V", "-f", "inet6")[2:])] == [
        "tcp6"
    ]
    assert {r.split()[0] for r in ok(node, "-a", "-V", "-n", "-f", "inet")[2:]} == {"udp", "tcp"}
    document = json.loads("\n".join(ok(node, "-a", "-V", "--json")))
    assert sorted(c["proto"] for c in document["connections"]) == ["tcp", "tcp6", "udp"]


# ---- -i, -I, -w -------------------------------------------------------------------


def test_interfaces(node: str, real_pcap: tuple[Path, list[traffic.Connection]]) -> None:
    frames, nbytes = frames_in(real_pcap[0])
    lines = ok(node, "-i")
    assert lines[0].split() == [
        "Name", "Mtu", "Network", "Address", "Ipkts", "Ierrs", "Opkts", "Oerrs", "Colls"
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"inject", "pcap0", "pfsync0"}
    assert rows["pcap0"] == ["pcap0", "-", "<pcap>", "...", str(frames), "0", "0", "0", "0"][:3] + [
        rows["pcap0"][3],
        str(frames),
        "0",
        "0",
        "0",
        "0",
    ]
    assert rows["inject"][1:] == ["-", "<inject>", "-", "0", "0", "0", "0", "0"]
    assert rows["pfsync0"][1:] == ["-", "<pfsync>", "-", "0", "0", "0", "0", "0"]
    lines = ok(node, "-i", "-b", "-d")
    assert lines[0].split()[-3:] == ["Ibytes", "Obytes", "Drop"]
    pcap0 = next(line.split() for line in lines if line.startswith("pcap0"))
    assert pcap0[-3:] == [str(nbytes), "0", "0"]
    document = json.loads("\n".join(ok(node, "-i", "--json")))
    by_name = {i["name"]: i for i in document["interfaces"]}
    assert by_name["pcap0"]["ipackets"] == frames
    assert by_name["pcap0"]["ibytes"] == nbytes


def test_interval_lines(node: str, real_pcap: tuple[Path, list[traffic.Connection]]) -> None:
    frames, _ = frames_in(real_pcap[0])
    started = time.monotonic()
    lines = ok(node, "-I", "pcap0", "-w", "1", "-c", "3")
    assert time.monotonic() - started >= 2  # two intervals between three lines
    assert lines[:2] == fmt.interval_banner("pcap0")
    assert lines[0].split() == ["pcap0", "in", "pcap0", "out", "total", "in", "total", "out"]
    assert lines[1].split() == ["packets", "errs", "packets", "errs", "colls"] * 2
    # First line: totals since start; then deltas (the replay is over: zero).
    assert lines[2].split() == [str(frames), "0", "0", "0", "0"] * 2
    assert lines[3:] == [lines[3]] * 2
    assert lines[3].split() == ["0"] * 10
    out = pfnetstat(node, "-I", "pcap0", "-w", "1", "-c", "2", "--json")
    assert out.returncode == 0
    first, second = (json.loads(line) for line in out.stdout.splitlines())
    assert first["pcap0"]["ipackets"] == frames and second["pcap0"]["ipackets"] == 0


def test_interval_banner_every_21_lines(node: str) -> None:
    # Formatting only: 22 lines need the banner twice, the second after 21 rows.
    lines = ok(node, "-I", "inject", "-w", "1", "-c", "1")
    assert len(lines) == 3
    rows = []
    for i in range(22):
        if i % fmt.BANNER_EVERY == 0:
            rows += fmt.interval_banner("inject")
        rows.append(fmt.interval_row({}, {}))
    assert rows.index(fmt.interval_banner("inject")[0], 1) == 23


def test_inject_counts_on_the_inject_interface(node: str) -> None:
    channel = grpc.insecure_channel(node)
    stub = control_pb2_grpc.ControlServiceStub(channel)
    frames = [
        eth(tcp("198.51.100.1", "198.51.100.2", 40000, 80, SYN, 7, 0, options=tcp_options(1460))),
        eth(udp("198.51.100.1", "198.51.100.2", 5353, 53, b"q")),
        # An IPv4 frame cut inside its header: too short to track, an input error.
        eth(udp("198.51.100.1", "198.51.100.2", 5353, 53, b"q"))[:20],
    ]
    reply = stub.Inject(
        cpb.InjectRequest(frames=[cpb.Frame(data=f, linktype=1) for f in frames]), timeout=10
    )
    channel.close()
    assert reply.errors == 1
    document = json.loads("\n".join(ok(node, "-I", "inject", "--json")))
    (inject,) = document["interfaces"]
    assert inject["ipackets"] == 3
    assert inject["ierrors"] == 1
    assert inject["ibytes"] == sum(len(f) for f in frames)


# ---- -m, -B ----------------------------------------------------------------------


def test_memory(node: str) -> None:
    lines = ok(node, "-m")
    assert lines[0].split() == ["Owner", "Inuse", "Bytes", "Peak", "Limit", "Description"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert {"states", "replay_log", "sync_pending", "vtw.ipv4.loopback"} <= set(rows)
    assert rows["vtw.ipv4.loopback"][1] == "1"  # the closed IPv4 connection's record
    assert rows["vtw.ipv6.loopback"][1] == "1"
    assert rows["states"][4] == "100000"
    assert lines[-1].split()[0] == "total"
    document = json.loads("\n".join(ok(node, "-m", "--json")))
    pools = {p["name"]: p for p in document["pools"]}
    assert pools["states"]["limit"] == 100000
    assert pools["vtw.ipv4.loopback"]["peak"] >= 1


def test_bpf_without_taps_says_so_in_one_line(node: str) -> None:
    for args in (["-B"], ["-s", "-B"], ["-s", "-p", "bpf"]):
        out = pfnetstat(node, *args)
        assert out.returncode == 1
        assert out.stdout == ""
        assert len(out.stderr.splitlines()) == 1
        assert "no net.bpf" in out.stderr


def test_bpf_formats_from_a_hand_built_sysctl_reply() -> None:
    stats = pb.SysctlNode(
        name="net.bpf.stats",
        type=pb.SYSCTL_TYPE_STRUCT,
        fields=pb.SysctlStruct(
            fields=[
                pb.SysctlField(name="recv", value=120),
                pb.SysctlField(name="capt", value=100),
                pb.SysctlField(name="drop", value=1),
            ]
        ),
    )
    from tools.pfnetstat import struct_fields

    assert fmt.format_section("bpf", struct_fields(stats)) == [
        "bpf:",
        "\t120 total packets received",
        "\t100 total packets captured",
        "\t1 total packets dropped",
    ]
    peers = pb.SysctlNode(
        name="net.bpf.peers",
        type=pb.SYSCTL_TYPE_STRING,
        text=json.dumps(
            [
                {
                    "pid": 4242,
                    "ifname": "pfsync0",
                    "recv": 120,
                    "drop": 1,
                    "capt": 100,
                    "state": "W",
                    "promisc": True,
                    "immediate": True,
                    "bufsize": 32768,
                    "comm": "pfdump",
                    "filter": "tcp port 80",
                }
            ]
        ),
    )
    assert fmt.format_bpf_peers(parse_bpf_peers(peers)) == [
        "Active BPF peers",
        "  PID Int            Recv       Drop       Capt Flags  Bufsize Comm",
        " 4242 pfsync0         120          1        100 WPR--    32768 pfdump [tcp port 80]",
    ]
    as_struct = pb.SysctlNode(
        name="net.bpf.peers",
        type=pb.SYSCTL_TYPE_STRUCT,
        fields=pb.SysctlStruct(
            fields=[pb.SysctlField(name="0.pid", value=7), pb.SysctlField(name="0.recv", value=3)]
        ),
    )
    assert parse_bpf_peers(as_struct) == [{"pid": 7, "recv": 3}]


# ---- errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["-x"],
        [],
        ["-s", "-a"],
        ["-a", "-p", "tcp"],
        ["-s", "-p", "nosuch"],
        ["-s", "-p", "udp", "-V"],
        ["-i", "-f", "inet"],
        ["-a", "-f", "ipx"],
        ["-I", "pcap0", "-w", "0"],
        ["-I", "pcap0", "-w", "x"],
        ["-i", "-w", "1"],
        ["-I", "pcap0", "-c", "2"],
        ["-m", "-b"],
        ["-I", "nosuch"],
    ],
)
def test_bad_flags_exit_2_in_one_line(node: str, args: list[str]) -> None:
    out = pfnetstat(node, *args)
    assert out.returncode == 2, out
    assert out.stdout == ""
    assert len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith("pfnetstat: ")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args", [["-s"], ["-a"], ["-i"], ["-m"], ["-I", "x", "-w", "1"]])
def test_unreachable_node_exits_1(args: list[str]) -> None:
    out = pfnetstat(f"127.0.0.1:{free_port()}", *args)
    assert out.returncode == 1
    assert out.stderr.startswith("pfnetstat: cannot reach node ")
    assert len(out.stderr.splitlines()) == 1


# ---- authorization ---------------------------------------------------------------


def test_denied_admin_calls_are_counted(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [BIN / "pfsyncd", "--control", addr, "--sync-listen", "", "--admin-token-file", token],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while pfnetstat(addr, "-s", "-p", "pf").returncode:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        denied = subprocess.run(
            [BIN / "pfsysctl", "-N", addr, "-w", "net.pfsync.maxupd=5"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert denied.returncode == 1
        assert len(denied.stderr.splitlines()) == 1
        # Reads stay open; the refusal is counted.
        assert "\t1 admin call denied" in ok(addr, "-s", "-p", "pf")
        allowed = subprocess.run(
            [BIN / "pfsysctl", "-N", addr, "--token-file", token, "-w", "net.pfsync.maxupd=5"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert allowed.returncode == 0, allowed.stderr
        assert "\t1 admin call denied" in ok(addr, "-s", "-p", "pf")
    finally:
        proc.terminate()
        proc.wait(10)


# ---- layering --------------------------------------------------------------------

# The core and the node. Allowed from pfsync: the generated stubs, certificate loading
# (pfsync.tls) and the capture file reader pfreplay uses (pfsync.pcap): none imports more.
FORBIDDEN = ("statetable", "pfsync.sync", "pfsync.node", "pfsync.daemon", "pfsync.control")
ALLOWED = ("pfsync.v1", "pfsync.tls", "pfsync.pcap")


def test_tools_import_no_core_or_engine() -> None:
    for path in sorted((ROOT / "tools").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for item in ast.walk(tree):
            names: list[str] = []
            if isinstance(item, ast.Import):
                names = [alias.name for alias in item.names]
            elif isinstance(item, ast.ImportFrom) and item.module:
                names = [item.module]
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
                if name.startswith("pfsync"):
                    assert name.startswith(ALLOWED), f"{path.name}: {name}"
    # And at run time, nothing pulls them in indirectly. (pfreplay is left out: pfsync.pcap
    # takes LINKTYPE_ETHERNET from statetable.decode, which loads the statetable package.)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tools.pfnetstat, tools.pfctl, tools.pfsysctl; "
            "print([m for m in sys.modules if m.startswith(" + repr(FORBIDDEN) + ")])",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert probe.stdout.strip() == "[]"
