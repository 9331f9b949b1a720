"""pfctl output and behaviour, checked against OpenBSD's formats.

The expected lines are written out in full (trailing blanks included) from the printf
formats in OpenBSD's sbin/pfctl (pf_print_state.c, pfctl_parser.c print_status, pfctl.c).
The first part feeds hand-built messages to the pure formatters; the second runs the
real console script and an in-process fake node for usage errors, titles, kill and flush.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from pfsync.v1 import control_pb2 as pb
from pfsync.v1 import control_pb2_grpc
from tools import pfctl
from tools.pfctl_format import (
    format_info,
    format_memory,
    format_state,
    format_timeouts,
    state_to_json,
)

PFCTL = Path(sys.executable).parent / "pfctl"

ESTABLISHED = pb.TCP_PEER_STATE_ESTABLISHED
TIME_WAIT = pb.TCP_PEER_STATE_TIME_WAIT
SYN_SENT = pb.TCP_PEER_STATE_SYN_SENT
CLOSED = pb.TCP_PEER_STATE_CLOSED
NO_TRAFFIC, SINGLE, MULTIPLE = (
    pb.UDP_PEER_STATE_NO_TRAFFIC,
    pb.UDP_PEER_STATE_SINGLE,
    pb.UDP_PEER_STATE_MULTIPLE,
)
IPV4, IPV6 = pb.ADDRESS_FAMILY_IPV4, pb.ADDRESS_FAMILY_IPV6


def tcp_in_state() -> pb.State:
    """An inbound ssh connection: 192.0.2.20:51034 (client, src) to 192.0.2.10:22."""
    return pb.State(
        id="5f3e000000000001",
        creatorid="1234abcd",
        af=IPV4,
        proto=6,
        ifname="all",
        direction=pb.DIRECTION_IN,
        src_address="192.0.2.20",
        dst_address="192.0.2.10",
        src_port=51034,
        dst_port=22,
        src=pb.PeerState(
            tcp_state=ESTABLISHED,
            seqlo=3000000000,
            seqhi=3000064240,
            wscale_offered=True,
            wscale=7,
            packets=10,
            bytes=1500,
        ),
        dst=pb.PeerState(
            tcp_state=ESTABLISHED,
            seqlo=1234567,
            seqhi=1298823,
            wscale_offered=True,
            wscale=6,
            packets=8,
            bytes=4000,
        ),
        timeout="tcp.established",
        age_seconds=3723,
        expires_in_seconds=86398,
        rule=0,
    )


# --- states -----------------------------------------------------------------------------


def test_tcp_inbound_prints_dst_first() -> None:
    assert format_state(tcp_in_state()) == [
        "all tcp 192.0.2.10:22 <- 192.0.2.20:51034       ESTABLISHED:ESTABLISHED"
    ]


def test_tcp_verbose_lines_follow_printed_order() -> None:
    """-v: windows and wscales in printed (dst, src) order; pkts/bytes in src:dst order."""
    assert format_state(tcp_in_state(), verbose=1) == [
        "all tcp 192.0.2.10:22 <- 192.0.2.20:51034       ESTABLISHED:ESTABLISHED",
        "   [1234567 + 64256] wscale 6  [3000000000 + 64240] wscale 7",
        "   age 01:02:03, expires in 23:59:58, 10:8 pkts, 1500:4000 bytes, rule 0",
    ]


def test_tcp_very_verbose_adds_identity() -> None:
    assert format_state(tcp_in_state(), verbose=2)[-1] == (
        "   id: 5f3e000000000001 creatorid: 1234abcd"
    )


def test_tcp_ipv6_outbound_seqdiff_wrap_and_one_sided_wscale() -> None:
    """OUT prints src -> dst; IPv6 ports in brackets; wscale needs both peers; the window
    wraps in 32-bit sequence space; seqdiff shows as (+N); no rule, no ", rule"."""
    state = pb.State(
        id="0000000000000001",
        creatorid="00000002",
        af=IPV6,
        proto=6,
        ifname="all",
        direction=pb.DIRECTION_OUT,
        src_address="2001:db8::1",
        dst_address="2001:db8::2",
        src_port=51000,
        dst_port=443,
        src=pb.PeerState(
            tcp_state=SYN_SENT,
            seqlo=4294967000,
            seqhi=500,
            seqdiff=77,
            wscale_offered=True,
            wscale=2,
            packets=1,
            bytes=80,
        ),
        dst=pb.PeerState(tcp_state=CLOSED),
        age_seconds=360000,
        expires_in_seconds=29,
    )
    assert format_state(state, verbose=2) == [
        "all tcp 2001:db8::1[51000] -> 2001:db8::2[443]       SYN_SENT:CLOSED",
        "   [4294967000 + 796](+77)  [0 + 0]",
        "   age 100:00:00, expires in 00:00:29, 1:0 pkts, 80:0 bytes",
        "   id: 0000000000000001 creatorid: 00000002",
    ]


def test_udp_names_and_direction_swap() -> None:
    out = pb.State(
        af=IPV4,
        proto=17,
        ifname="all",
        direction=pb.DIRECTION_OUT,
        src_address="192.0.2.1",
        dst_address="198.51.100.53",
        src_port=53000,
        dst_port=53,
        src=pb.PeerState(udp_state=MULTIPLE),
        dst=pb.PeerState(udp_state=SINGLE),
    )
    assert format_state(out) == [
        "all udp 192.0.2.1:53000 -> 198.51.100.53:53       MULTIPLE:SINGLE"
    ]
    inbound = pb.State()
    inbound.CopyFrom(out)
    inbound.direction = pb.DIRECTION_IN
    assert format_state(inbound) == [
        "all udp 198.51.100.53:53 <- 192.0.2.1:53000       SINGLE:MULTIPLE"
    ]


def test_udp_verbose_has_no_sequence_line() -> None:
    state = pb.State(
        af=IPV4,
        proto=17,
        ifname="all",
        direction=pb.DIRECTION_OUT,
        src_address="192.0.2.1",
        dst_address="192.0.2.2",
        src_port=1,
        dst_port=2,
        src=pb.PeerState(udp_state=SINGLE, packets=1, bytes=60),
        dst=pb.PeerState(udp_state=NO_TRAFFIC),
        age_seconds=5,
        expires_in_seconds=25,
        rule=3,
    )
    assert format_state(state, verbose=1) == [
        "all udp 192.0.2.1:1 -> 192.0.2.2:2       SINGLE:NO_TRAFFIC",
        "   age 00:00:05, expires in 00:00:25, 1:0 pkts, 60:0 bytes, rule 3",
    ]


def test_icmp_states_are_numbers_and_echo_id_shows_on_both_sides() -> None:
    state = pb.State(
        af=IPV4,
        proto=1,
        ifname="all",
        direction=pb.DIRECTION_OUT,
        src_address="192.0.2.1",
        dst_address="192.0.2.2",
        src_port=4242,
        dst_port=4242,
        src=pb.PeerState(icmp_state=pb.ICMP_PEER_STATE_NO_TRAFFIC),
        dst=pb.PeerState(icmp_state=pb.ICMP_PEER_STATE_NO_TRAFFIC),
    )
    assert format_state(state) == ["all icmp 192.0.2.1:4242 -> 192.0.2.2:4242       0:0"]
    v6 = pb.State(
        af=IPV6,
        proto=58,
        ifname="all",
        direction=pb.DIRECTION_IN,
        src_address="fe80::2",
        dst_address="fe80::1",
        src_port=7,
        dst_port=7,
        src=pb.PeerState(icmp_state=pb.ICMP_PEER_STATE_SINGLE),
        dst=pb.PeerState(icmp_state=pb.ICMP_PEER_STATE_NO_TRAFFIC),
    )
    assert format_state(v6) == ["all ipv6-icmp fe80::1[7] <- fe80::2[7]       0:1"]


def test_other_protocols_use_named_levels_and_no_ports() -> None:
    """pf_print_state.c names the levels of every protocol but ICMP (NO_TRAFFIC...)."""
    gre = pb.State(
        af=IPV4,
        proto=47,
        ifname="all",
        direction=pb.DIRECTION_OUT,
        src_address="192.0.2.1",
        dst_address="192.0.2.2",
        src=pb.PeerState(udp_state=SINGLE),
        dst=pb.PeerState(udp_state=NO_TRAFFIC),
    )
    assert format_state(gre) == ["all gre 192.0.2.1 -> 192.0.2.2       SINGLE:NO_TRAFFIC"]
    unknown = pb.State()
    unknown.CopyFrom(gre)
    unknown.proto = 253
    unknown.src.udp_state = 8  # pf's 7, beyond MULTIPLE: pf falls back to numbers
    assert format_state(unknown) == ["all 253 192.0.2.1 -> 192.0.2.2       7:0"]


def test_vestigial_prints_like_time_wait() -> None:
    state = tcp_in_state()
    state.vestigial = True
    state.src.tcp_state = state.dst.tcp_state = TIME_WAIT
    assert format_state(state)[0].endswith("       TIME_WAIT:TIME_WAIT")


@pytest.mark.parametrize(
    ("levels", "column"),
    [
        ((pb.TCP_PEER_STATE_PROXY_SRC, ESTABLISHED), "PROXY:SRC"),
        ((ESTABLISHED, pb.TCP_PEER_STATE_PROXY_DST), "PROXY:DST"),
        ((14, ESTABLISHED), "<BAD STATE LEVELS 4:13>"),  # a value this client does not know
    ],
)
def test_tcp_levels_beyond_time_wait(levels: tuple[int, int], column: str) -> None:
    state = tcp_in_state()
    state.src.tcp_state, state.dst.tcp_state = levels
    assert format_state(state)[0].endswith("       " + column)


def test_mapped_ipv6_and_missing_address() -> None:
    """The node's text is printed as sent (mapped IPv6 dotted); a missing address is '?'."""
    state = pb.State(
        af=IPV6,
        proto=17,
        ifname="all",
        direction=pb.DIRECTION_OUT,
        src_address="::ffff:192.0.2.1",
        dst_address="",
        src_port=1,
        dst_port=2,
        src=pb.PeerState(udp_state=SINGLE),
        dst=pb.PeerState(udp_state=NO_TRAFFIC),
    )
    assert format_state(state) == ["all udp ::ffff:192.0.2.1[1] -> ?[2]       SINGLE:NO_TRAFFIC"]


def test_state_json_has_text_addresses() -> None:
    document = state_to_json(tcp_in_state())
    assert document["src_address"] == "192.0.2.20"
    assert document["dst_address"] == "192.0.2.10"
    assert document["direction"] == "DIRECTION_IN"
    assert document["id"] == "5f3e000000000001"  # text, as pfctl -vv prints it
    assert document["src"]["seqlo"] == 3000000000
    assert document["src"]["tcp_state"] == "TCP_PEER_STATE_ESTABLISHED"
    assert document["rule"] == 0
    json.dumps(document)


# --- info, timeouts, memory ---------------------------------------------------------------

PFRES = [
    "match",
    "bad-offset",
    "fragment",
    "short",
    "normalize",
    "memory",
    "bad-timestamp",
    "congestion",
    "ip-option",
    "proto-cksum",
    "state-mismatch",
    "state-insert",
    "state-limit",
    "src-limit",
    "synproxy",
    "translate",
    "no-route",
]


def sample_info(enabled_seconds: int) -> pb.GetInfoResponse:
    counters = [pb.Counter(name=name, value=0) for name in PFRES]
    counters[0].value = 23
    counters[10].value = 5
    return pb.GetInfoResponse(
        running=True,
        enabled_for=Duration(seconds=enabled_seconds),
        hostid="deadbeef",
        debug="err",
        current_entries=4,
        half_open_tcp=1,
        searches=350,
        inserts=12,
        removals=8,
        counters=counters,
    )


def test_info() -> None:
    lines = format_info(sample_info(93784))  # 1 day 02:03:04
    assert lines[:9] == [
        "Status: Enabled for 1 days 02:03:04              Debug: err",
        "",
        "State Table                          Total             Rate",
        "  current entries                        4               ",
        "  half-open tcp                          1               ",
        "  searches                             350            0.0/s",
        "  inserts                               12            0.0/s",
        "  removals                               8            0.0/s",
        "Counters",
    ]
    assert lines[9] == "  match                                 23            0.0/s"
    assert lines[19] == "  state-mismatch                         5            0.0/s"
    assert lines[25] == "  no-route                               0            0.0/s"
    assert len(lines) == 9 + len(PFRES)


def test_info_rates_and_verbose_hostid() -> None:
    lines = format_info(sample_info(100), verbose=1)
    assert lines[:5] == [
        "Status: Enabled for 0 days 00:01:40              Debug: err",
        "",
        "Hostid:   0xdeadbeef",
        "",
        "State Table                          Total             Rate",
    ]
    assert lines[7] == "  searches                             350            3.5/s"
    assert lines[8] == "  inserts                               12            0.1/s"


def test_info_disabled_has_no_rates() -> None:
    info = sample_info(0)
    info.running = False
    info.debug = "debug"
    lines = format_info(info)
    assert lines[0] == "Status: Disabled                               Debug: debug"
    assert lines[5] == "  searches                             350               "


TIMEOUT_ROWS = [
    ("tcp.first", 120),
    ("tcp.opening", 30),
    ("tcp.established", 86400),
    ("tcp.closing", 900),
    ("tcp.finwait", 45),
    ("tcp.closed", 90),
    ("tcp.tsdiff", 30),
    ("udp.first", 60),
    ("udp.single", 30),
    ("udp.multiple", 60),
    ("icmp.first", 20),
    ("icmp.error", 10),
    ("other.first", 60),
    ("other.single", 30),
    ("other.multiple", 60),
    ("frag", 60),
    ("interval", 10),
    ("adaptive.start", 60000),
    ("adaptive.end", 120000),
    ("src.track", 0),
]


def test_timeouts() -> None:
    timeouts = pb.GetTimeoutsResponse(
        timeouts=[
            pb.Timeout(name=name, states=value)
            if "adaptive" in name
            else pb.Timeout(name=name, duration=Duration(seconds=value))
            for name, value in TIMEOUT_ROWS
        ]
    )
    lines = format_timeouts(timeouts)
    assert lines[0] == "tcp.first                   120s"
    assert lines[2] == "tcp.established           86400s"
    assert lines[17] == "adaptive.start            60000 states"
    assert lines[18] == "adaptive.end             120000 states"
    assert lines[19] == "src.track                     0s"
    assert len(lines) == 20


def test_memory() -> None:
    memory = pb.GetMemoryResponse(
        limits=[
            pb.Limit(name="states", hard_limit=100000),
            pb.Limit(name="src-nodes", hard_limit=10000),
            pb.Limit(name="frags", hard_limit=1536),
            pb.Limit(name="tables", hard_limit=1000),
            pb.Limit(name="table-entries", unlimited=True),
        ]
    )
    assert format_memory(memory) == [
        "states        hard limit   100000",
        "src-nodes     hard limit    10000",
        "frags         hard limit     1536",
        "tables        hard limit     1000",
        "table-entries unlimited",
    ]


# --- the console script: usage errors and an unreachable node ------------------------------


def run_pfctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PFSYNC_")}
    environ.update(env or {})
    return subprocess.run(
        [str(PFCTL), *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-s", "bogus"], "pfctl: Unknown show modifier 'bogus'"),
        (["-F", "rules"], "pfctl: Unknown flush modifier 'rules'"),
        ([], "pfctl: nothing to do: give -s, -F or -k"),
        (["-k", "id"], "pfctl: no id specified"),
        (["-k", "id", "-k", "xyz"], "pfctl: wrong id format specified"),
        (["-k", "id", "-k", "0/1"], "pfctl: cannot kill id 0"),
        (["-k", "a", "-k", "b", "-k", "c"], "pfctl: can only specify -k twice"),
        (["-k", "192.0.2.0/33"], "pfctl: prefix is too large: 33"),
        (
            ["-s", "info", "--token-file", "/nonexistent/token"],
            "pfctl: cannot read token file /nonexistent/token: No such file or directory",
        ),
        (["-s", "info", "extra"], "pfctl: unrecognized arguments: extra"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = run_pfctl(*args)
    assert result.returncode == 2
    assert result.stderr == message + "\n"
    assert result.stdout == ""


def test_unreachable_node_exits_1_with_one_line() -> None:
    port = closed_port()
    result = run_pfctl("-s", "info", "-N", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"pfctl: cannot reach node 127.0.0.1:{port}: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_node_from_environment() -> None:
    port = closed_port()
    result = run_pfctl("-s", "states", env={"PFSYNC_NODE": f"127.0.0.1:{port}"})
    assert result.returncode == 1
    assert result.stderr.startswith(f"pfctl: cannot reach node 127.0.0.1:{port}: ")


# --- pfctl against an in-process fake node ------------------------------------------------


class FakeControl(control_pb2_grpc.ControlServiceServicer):
    """Canned answers; records what pfctl sent."""

    def __init__(self) -> None:
        self.kills: list[pb.KillStatesRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.states = [tcp_in_state()]

    def ListStates(
        self, request: pb.ListStatesRequest, context: Any
    ) -> Iterator[pb.ListStatesResponse]:
        self.metadata.append(dict(context.invocation_metadata()))
        yield pb.ListStatesResponse(states=self.states)

    def GetInfo(self, request: pb.GetInfoRequest, context: Any) -> pb.GetInfoResponse:
        return sample_info(100)

    def GetTimeouts(self, request: pb.GetTimeoutsRequest, context: Any) -> pb.GetTimeoutsResponse:
        return pb.GetTimeoutsResponse(
            timeouts=[pb.Timeout(name="tcp.first", duration=Duration(seconds=120))]
        )

    def GetMemory(self, request: pb.GetMemoryRequest, context: Any) -> pb.GetMemoryResponse:
        return pb.GetMemoryResponse(limits=[pb.Limit(name="states", hard_limit=100000)])

    def KillStates(self, request: pb.KillStatesRequest, context: Any) -> pb.KillStatesResponse:
        self.kills.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        return pb.KillStatesResponse(killed=1)

    def ClearStates(self, request: pb.ClearStatesRequest, context: Any) -> pb.ClearStatesResponse:
        return pb.ClearStatesResponse(cleared=3)

    def ClearCounters(
        self, request: pb.ClearCountersRequest, context: Any
    ) -> pb.ClearCountersResponse:
        return pb.ClearCountersResponse()


@pytest.fixture
def fake_node(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeControl]:
    servicer = FakeControl()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    control_pb2_grpc.add_ControlServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("PFSYNC_NODE", f"127.0.0.1:{port}")
    monkeypatch.delenv("PFSYNC_TOKEN", raising=False)
    yield servicer
    server.stop(None)


def test_show_all_sections_and_titles(
    fake_node: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pfctl.main(["-s", "all"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        "STATES:",
        "all tcp 192.0.2.10:22 <- 192.0.2.20:51034       ESTABLISHED:ESTABLISHED",
        "",
    ]
    assert out[3:5] == ["INFO:", "Status: Enabled for 0 days 00:01:40              Debug: err"]
    assert out[-6:] == [
        "",
        "TIMEOUTS:",
        "tcp.first                   120s",
        "",
        "LIMITS:",
        "states        hard limit   100000",
    ]


def test_show_all_without_states_has_no_states_title(
    fake_node: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_node.states = []
    assert pfctl.main(["-s", "a"]) == 0
    assert capsys.readouterr().out.startswith("INFO:\nStatus: Enabled")


def test_kill_by_id(fake_node: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    assert pfctl.main(["-k", "id", "-k", "5f3e000000000001/1234ABCD"]) == 0
    assert fake_node.kills == [pb.KillStatesRequest(id="5f3e000000000001", creatorid="1234abcd")]
    assert capsys.readouterr().err == "killed 1 states\n"


def test_kill_by_hosts(fake_node: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    assert pfctl.main(["-k", "192.0.2.20", "-k", "192.0.2.0/24"]) == 0
    assert fake_node.kills == [
        pb.KillStatesRequest(
            src=pb.AddressMatch(address="192.0.2.20"),
            dst=pb.AddressMatch(address="192.0.2.0", prefix_len=24),
        )
    ]
    assert capsys.readouterr().err == "killed 1 states from 1 sources and 1 destinations\n"


def test_flush_all_and_quiet(fake_node: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    assert pfctl.main(["-F", "all"]) == 0
    assert capsys.readouterr().err == "3 states cleared\npf: statistics cleared\n"
    assert pfctl.main(["-q", "-F", "states"]) == 0
    assert capsys.readouterr().err == ""


def test_token_is_sent_as_bearer(
    fake_node: FakeControl, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PFSYNC_TOKEN", "from-env")
    assert pfctl.main(["-s", "states"]) == 0
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert pfctl.main(["-q", "-k", "id", "-k", "1", "--token-file", str(token_file)]) == 0
    assert [m.get("authorization") for m in fake_node.metadata] == [
        "Bearer from-env",
        "Bearer from-file",
    ]


def test_json_output(fake_node: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    assert pfctl.main(["-s", "all", "--json", "-q", "-F", "states"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [s["dst_address"] for s in document["states"]] == ["192.0.2.10"]
    assert document["info"]["current_entries"] == 4
    assert document["info"]["counters"][0] == {"name": "match", "value": "23"}
    assert document["timeouts"] == [{"name": "tcp.first", "duration": "120s"}]
    assert document["memory"] == [{"name": "states", "unlimited": False, "hard_limit": 100000}]
    assert document["flushed"] == {"states": 3}
