"""`pfctl -s states | wc -l` over a large table, and the node's RSS meanwhile (issue 10).

Writes a capture of N TCP handshakes (bench/workload.py), starts ``pfsyncd --pcap FILE
--replay-speed 0 --limit-states 2N``, waits until the table holds N states, then times
``pfctl -N ADDR -s states | wc -l`` (the console script, through a real pipe) while a
thread samples the node's VmRSS every 20 ms. Prints the wall time, the line count and the
RSS before and at its peak during the listing.

Targets: <= 15 s at 1,000,000 states, RSS growth < 20 %.

    .venv/bin/python bench/bench_listing.py [--states 1000000] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import handshake  # noqa: E402
from pfsync.pcap import PcapWriter  # noqa: E402

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_capture(path: Path, flows: int) -> None:
    """Every flow's handshake: ``flows`` ESTABLISHED states once replayed."""
    with PcapWriter(path) as writer:
        ts = 1_700_000_000.0
        for i in range(flows):
            for frame in handshake(i):
                writer.write(ts, frame)
                ts += 1e-6


def rss_kib(pid: int) -> int:
    """VmRSS of a process (Linux /proc), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def current_entries(addr: str) -> int:
    out = subprocess.run(
        [BIN / "pfctl", "-N", addr, "-s", "info"], capture_output=True, text=True, check=False
    )
    for line in out.stdout.splitlines():
        if "current entries" in line:
            return int(line.split()[2])
    return -1


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc/PID/stat), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_cpu_seconds() -> float:
    """CPU time of this process's waited-for children (the shell, pfctl and wc)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(addr: str, pid: int) -> tuple[float, int, int, int, float, float]:
    """(seconds, lines, RSS before KiB, peak RSS during KiB, node CPU s, client CPU s) of
    one piped listing. The CPU times tell what the listing costs whatever else runs on
    the machine: on two idle cores the wall time is about the larger of the two."""
    before = rss_kib(pid)
    node_cpu, client_cpu = cpu_seconds(pid), client_cpu_seconds()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    out = subprocess.run(
        f"{BIN / 'pfctl'} -N {addr} -s states | wc -l",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - started
    node_cpu, client_cpu = cpu_seconds(pid) - node_cpu, client_cpu_seconds() - client_cpu
    done.set()
    sampler.join()
    return seconds, int(out.stdout.strip()), before, peak, node_cpu, client_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--capture", type=Path, help="keep the capture here and reuse it if present"
    )
    args = parser.parse_args()
    n = args.states
    with tempfile.TemporaryDirectory() as tmp:
        path = args.capture or Path(tmp) / "listing.pcap"
        if not path.exists():
            t0 = time.perf_counter()
            write_capture(path, n)
            print(f"capture: {3 * n:,} frames ({time.perf_counter() - t0:.1f} s to write)")
        addr = f"127.0.0.1:{free_port()}"
        node = subprocess.Popen(
            [
                BIN / "pfsyncd",
                "--control",
                addr,
                "--sync-listen",
                "",
                "--pcap",
                str(path),
                "--replay-speed",
                "0",
                "--limit-states",
                str(2 * n),
                # pf's adaptive timeouts (60,000..120,000 states by default) would expire
                # the table as it fills: off, as a large table's pf.conf would set them.
                "--sysctl",
                "net.pf.timeout.adaptive.start=0",
                "--sysctl",
                "net.pf.timeout.adaptive.end=0",
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            t0 = time.perf_counter()
            while current_entries(addr) < n:
                if node.poll() is not None:
                    raise SystemExit("the node exited")
                time.sleep(1.0)
            print(f"filled {n:,} states in {time.perf_counter() - t0:.1f} s")
            for _ in range(args.repeat):
                seconds, lines, before, peak, node_cpu, client_cpu = measure(addr, node.pid)
                growth = (peak - before) / before
                print(
                    f"pfctl -s states | wc -l: {lines:,} lines in {seconds:.2f} s "
                    f"({lines / seconds:,.0f} states/s); CPU: node {node_cpu:.2f} s, "
                    f"pfctl+wc {client_cpu:.2f} s; node RSS {before / 1024:.0f} MiB "
                    f"-> peak {peak / 1024:.0f} MiB (+{growth:.1%}); load {os.getloadavg()[0]:.1f}"
                )
                ok = seconds <= 15 and growth < 0.20 and lines == n
                print("target (<= 15 s, RSS growth < 20 %):", "met" if ok else "MISSED")
        finally:
            node.terminate()
            node.wait()


if __name__ == "__main__":
    main()
