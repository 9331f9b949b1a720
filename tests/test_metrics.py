"""``pfsyncd --metrics``: Prometheus text scraped over HTTP from real nodes fed real traffic."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pfsync.pcap import read_capture
from tests import traffic

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(
    addr: str, path: str = "/metrics"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def wait_for(addr: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    deadline = time.monotonic() + 30
    while True:
        try:
            return scrape(addr)
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def real_pcap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("metrics") / "real.pcap"
    with traffic.isolated_loopback():
        with traffic.capture_to_pcap(path):
            traffic.client_close_first()
            traffic.udp_exchange()
    return path


@pytest.fixture(scope="module")
def pair(real_pcap: Path) -> Iterator[tuple[str, str]]:
    """Node A replays the capture and syncs to node B; yields both metrics addresses."""
    sync_b = f"127.0.0.1:{free_port()}"
    metrics_a, metrics_b = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    common = ["--sysctl", "net.inet.tcp.mslt.loopback=600"]
    b = subprocess.Popen(
        [BIN / "pfsyncd", "--control", f"127.0.0.1:{free_port()}", "--sync-listen", sync_b,
         "--metrics", metrics_b, "--hostid", "b", *common],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for(metrics_b)
    a = subprocess.Popen(
        [BIN / "pfsyncd", "--control", f"127.0.0.1:{free_port()}", "--sync-listen", "",
         "--peer", sync_b, "--metrics", metrics_a, "--hostid", "a", "--pcap", str(real_pcap),
         *common],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield metrics_a, metrics_b
    finally:
        for proc in (a, b):
            proc.terminate()
            proc.wait(10)


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_counters_match_the_replay(pair: tuple[str, str], real_pcap: Path) -> None:
    frames = [f for _, _, f in read_capture(real_pcap)]
    metrics_a, metrics_b = pair
    deadline = time.monotonic() + 30
    while True:
        a = wait_for(metrics_a)
        b = scrape(metrics_b)
        key = ("interface_packets_total", (("direction", "in"), ("interface", "pcap0")))
        records = b.get(("vtw_records", (("class", "loopback"), ("family", "ipv4"))), 0)
        synced = value(b, "pf_states") + records
        if a.get(key) == len(frames) and synced >= 2:
            break
        assert time.monotonic() < deadline, (a.get(key), synced)
        time.sleep(0.2)
    assert value(a, "interface_bytes_total", interface="pcap0", direction="in") == sum(
        len(f) for f in frames
    )
    assert value(a, "pf_packets_total", verdict="pass") == len(frames)
    assert value(a, "pf_packets_total", verdict="block") == 0
    assert value(a, "pf_tcp_events_total", event="connattempt") == 1
    assert value(a, "pf_tcp_events_total", event="closed") == 1
    assert value(a, "pf_states") == 1  # the UDP state; TCP is a VTW record
    assert value(a, "vtw_records", family="ipv4", **{"class": "loopback"}) == 1
    assert value(a, "pf_states_limit") == 100000
    assert value(a, "pool_inuse", owner="states") == 1
    # Sync: A sent frames to B, B received them; the lag histogram counted them.
    out = [k for k in a if k[0] == "pfsync_peer_frames_total" and ("direction", "out") in k[1]]
    assert out and sum(a[k] for k in out) >= 1
    assert value(b, "interface_packets_total", interface="pfsync0", direction="in") >= 1
    assert value(a, "pfsync_stats_total", counter="opackets") >= 1
    lag = [k for k in a if k[0] == "pfsync_lag_ms_bucket" and ("le", "+Inf") in k[1]]
    assert lag


def test_unknown_paths_and_bad_requests(pair: tuple[str, str]) -> None:
    metrics_a, _ = pair
    with pytest.raises(urllib.error.HTTPError) as failure:
        urllib.request.urlopen(f"http://{metrics_a}/nope", timeout=10)
    assert failure.value.code == 404
    host, port = metrics_a.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 404")
    # The node still answers.
    assert ("pf_states", ()) in scrape(metrics_a)


def test_metrics_port_in_use_fails_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        out = subprocess.run(
            [BIN / "pfsyncd", "--control", f"127.0.0.1:{free_port()}", "--sync-listen", "",
             "--metrics", addr],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if "metrics" in line]
    assert lines == [f"pfsyncd: cannot serve metrics on {addr}: Address already in use"]
