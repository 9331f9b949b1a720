"""pfsync end to end: two real pfsyncd processes on loopback, A makes states, B is its peer.

    python bench/bench_sync.py [--only NAME ...] [--flows N] [--bulk-states N] ...

Figures (each on a fresh pair of nodes, so histograms and tables start empty):

- rate: new flows (handshake + data rounds) injected into A as fast as its Control API
  takes them; state changes (tracked packets) per second from the first Inject until
  B's table digest equals A's;
- bulk: A holds --bulk-states states (a generated pcap of SYNs, --pcap); B starts with
  --peer A; time from B's stream start (its first sight of the bulk) to B ready;
- lag: paced Inject into A at --lag-rate changes/s for --lag-seconds; A's GetSyncStatus
  lag p50/p99 for B (frame's oldest change -> B's acknowledgement, bucket bounds);
- replay: A's --pcap replay rate (its log line) with B attached against A alone;
- batch: new states through A to B with net.pfsync.frame_states 1024 and 1 (one gRPC
  message per state), same pair, same run.

Frames come from tests/packets.py templates with addresses and ports patched per flow
(checksums are zero there, as the table does not check them).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pfsync.pcap import PcapWriter  # noqa: E402
from pfsync.v1 import control_pb2 as cpb  # noqa: E402
from pfsync.v1 import control_pb2_grpc, sysctl_pb2, sysctl_pb2_grpc  # noqa: E402
from tests.packets import ACK, PSH, SYN, tcp, tcp_options  # noqa: E402

BIN = Path(sys.executable).parent
HOST_A, HOST_B = "0000000a", "0000000b"
# pf's adaptive timeouts default to 60k..120k states here: beyond that every state would
# expire at once. The benchmarks hold up to 1M states, so they start scaling far above.
_NO_ADAPTIVE = (
    "--sysctl", "net.pf.timeout.adaptive.end=4000000",
    "--sysctl", "net.pf.timeout.adaptive.start=3000000",
)  # fmt: skip
INJECT_CHUNK = 8192  # frames per Inject call (~0.6 MB; the control API takes 4 MB)

# ---- traffic ----------------------------------------------------------------------------

_C, _S = "10.0.0.1", "192.0.2.1"


def _templates(rounds: int) -> list[tuple[bool, bytes]]:
    """One flow's packets as (from client?, frame) of flow 0, to be patched per flow."""
    out = [
        (True, tcp(_C, _S, 1024, 80, SYN, 1000, 0, 64240, options=tcp_options(1460, 7))),
        (False, tcp(_S, _C, 80, 1024, SYN | ACK, 5000, 1001, 65160, options=tcp_options(1460, 7))),
        (True, tcp(_C, _S, 1024, 80, ACK, 1001, 5001, 502)),
    ]
    for r in range(rounds):
        cseq = 1001 + r * 100
        out.append((True, tcp(_C, _S, 1024, 80, ACK | PSH, cseq, 5001, 502, payload=b"x" * 100)))
        out.append((False, tcp(_S, _C, 80, 1024, ACK, 5001, cseq + 100, 509)))
    return out


def _flow_id(i: int) -> tuple[bytes, bytes]:
    """Client address (10.0.0.0/8) and port of flow ``i`` (unique for i < 2^24)."""
    return (0x0A000000 | i).to_bytes(4, "big"), (1024 + i % 60000).to_bytes(2, "big")


def flow_frames(first: int, count: int, rounds: int) -> Iterator[bytes]:
    """Flows ``first..first+count``: handshake then ``rounds`` data exchanges, each flow
    sent whole before the next (so every packet is a state change in A's table)."""
    tpls = _templates(rounds)
    for i in range(first, first + count):
        cip, port = _flow_id(i)
        for client, t in tpls:
            if client:  # src address 26..30, sport 34..36
                yield t[:26] + cip + t[30:34] + port + t[36:]
            else:  # dst address 30..34, dport 36..38
                yield t[:30] + cip + t[34:36] + port + t[38:]


def _syns(first: int, count: int) -> Iterator[bytes]:
    """One SYN per flow: each makes one new state."""
    t = _templates(0)[0][1]
    for i in range(first, first + count):
        cip, port = _flow_id(i)
        yield t[:26] + cip + t[30:34] + port + t[36:]


def write_pcap(path: Path, frames: Iterator[bytes]) -> int:
    n = 0
    with PcapWriter(path) as w:
        for n, f in enumerate(frames, 1):
            w.write(1.0 + n * 1e-6, f)
    return n


def inject_requests(frames: Iterator[bytes], chunk: int = INJECT_CHUNK) -> list[bytes]:
    """Serialized InjectRequests (built before the clock starts)."""
    out, batch = [], []
    for f in frames:
        batch.append(cpb.Frame(data=f, linktype=1))
        if len(batch) == chunk:
            out.append(cpb.InjectRequest(frames=batch).SerializeToString())
            batch = []
    if batch:
        out.append(cpb.InjectRequest(frames=batch).SerializeToString())
    return out


# ---- nodes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeProc:
    """One pfsyncd process and a Control/Sysctl client for it."""

    def __init__(self, name: str, tmp: Path, hostid: str, *flags: str, listen: bool = True):
        self.name = name
        self.control = f"127.0.0.1:{free_port()}"
        self.sync = f"127.0.0.1:{free_port()}" if listen else ""
        self.log = tmp / f"{name}-{time.monotonic_ns()}.log"
        argv = [str(BIN / "pfsyncd"), "--control", self.control, "--hostid", hostid]
        argv += ["--sync-listen", self.sync, "--limit-states", "2000000", *_NO_ADAPTIVE, *flags]
        profile = os.environ.get("BENCH_PYSPY", "")  # e.g. "A,B": collapsed stacks in /tmp
        if name in profile.split(","):
            out = f"/tmp/pyspy-{name}-{os.getpid()}-{time.monotonic_ns()}.txt"
            argv = [str(BIN / "py-spy"), "record", "-r", "200", "-f", "raw", "-o", out, "--"] + argv
        self.started = time.monotonic()
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(argv, stderr=err, stdout=subprocess.DEVNULL)
        self.channel = grpc.insecure_channel(
            self.control, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        self.stub = control_pb2_grpc.ControlServiceStub(self.channel)
        self.sysctl = sysctl_pb2_grpc.SysctlServiceStub(self.channel)
        self._inject = self.channel.unary_unary(
            "/pfsync.v1.ControlService/Inject",
            request_serializer=None,
            response_deserializer=cpb.InjectResponse.FromString,
        )

    def wait_up(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited: {self.log.read_text()}")
            try:
                self.status()
                return
            except grpc.RpcError:
                time.sleep(0.05)
        raise SystemExit(f"{self.name} did not come up")

    def status(self) -> cpb.GetSyncStatusResponse:
        return self.stub.GetSyncStatus(cpb.GetSyncStatusRequest(), timeout=10)

    def info(self) -> cpb.GetInfoResponse:
        return self.stub.GetInfo(cpb.GetInfoRequest(), timeout=10)

    def set_sysctl(self, name: str, value: str) -> None:
        self.sysctl.SetSysctl(sysctl_pb2.SetSysctlRequest(name=name, value=value), timeout=10)

    def inject(self, requests: list[bytes], in_flight: int = 2) -> int:
        """Send pre-serialized InjectRequests, ``in_flight`` at a time; frames passed."""
        passed, pending = 0, []
        for req in requests:
            pending.append(self._inject.future(req, timeout=120))
            if len(pending) >= in_flight:
                passed += pending.pop(0).result().passed
        for fut in pending:
            passed += fut.result().passed
        return passed

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            # Under py-spy, stop its child so py-spy writes its output and exits itself.
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            pids = kids.read_text().split() if kids.exists() else []
            for pid in pids if "py-spy" in self.proc.args[0] else []:
                os.kill(int(pid), 15)
            if not pids or "py-spy" not in self.proc.args[0]:
                self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(pred: Callable[[], bool], timeout: float, poll: float = 0.01) -> float:
    """Poll ``pred`` until true; returns the monotonic time it was first seen true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(poll)
    raise SystemExit("timed out waiting")


def pair(tmp: Path, *a_flags: str, b_flags: tuple[str, ...] = ()) -> tuple[NodeProc, NodeProc]:
    """A listens, B dials A; returns once B is ready (its bulk update from A is done)."""
    a = NodeProc("A", tmp, HOST_A, *a_flags)
    a.wait_up()
    b = NodeProc("B", tmp, HOST_B, "--peer", a.sync, *b_flags, listen=False)
    b.wait_up()
    wait_for(lambda: b.status().ready, 60, 0.05)
    return a, b


def converged(a: NodeProc, b: NodeProc, states: int) -> Callable[[], bool]:
    def check() -> bool:
        sb = b.status()
        if sb.digest_states != states:
            return False
        return bool(sb.digest == a.status().digest)

    return check


# ---- figures ----------------------------------------------------------------------------


def bench_rate(tmp: Path, flows: int, rounds: int) -> None:
    frames = list(flow_frames(0, flows, rounds))
    requests = inject_requests(iter(frames))
    a, b = pair(tmp)
    try:
        t0 = time.monotonic()
        passed = a.inject(requests)
        t_a = time.monotonic()
        t_b = wait_for(converged(a, b, flows), 300)
        assert passed == len(frames), (passed, len(frames))
        n = len(frames)
        sa, sb = a.status(), b.status()
        out = sa.peers[0].states_out
        print(
            f"rate: {flows:,} flows x {3 + 2 * rounds} packets = {n:,} state changes on A; "
            f"injected in {t_a - t0:.2f} s, B's digest equal {t_b - t0:.2f} s after the start"
        )
        print(
            f"  replicated state changes/s end to end: {n / (t_b - t0):,.0f} "
            f"(target >= 300,000); A alone takes them at {n / (t_a - t0):,.0f}/s"
        )
        print(
            f"  state messages A sent: {out:,} in {sa.peers[0].frames_out:,} frames "
            f"({n / max(out, 1):.1f} changes coalesced per message); B applied "
            f"{sb.peers[0].states_in:,} at {sb.peers[0].states_in / (t_b - t0):,.0f}/s"
        )
    finally:
        a.stop()
        b.stop()


def bench_bulk(tmp: Path, states: int) -> None:
    pcap = tmp / "syn.pcap"
    write_pcap(pcap, _syns(0, states))
    # SYN-only states live tcp.first (120 s): longer than a loaded machine takes here.
    first = ("--sysctl", "net.pf.timeout.tcp.first=3600")
    a = NodeProc("A", tmp, HOST_A, "--pcap", str(pcap), *first)
    b = None
    try:
        a.wait_up()
        wait_for(lambda: a.status().digest_states == states, 600, 0.2)
        b = NodeProc("B", tmp, HOST_B, "--peer", a.sync, *first, listen=False)
        nb = b
        b.wait_up()
        t_up = time.monotonic()
        t_start = wait_for(
            lambda: bool(nb.status().peers and nb.status().peers[0].states_in > 0), 60, 0.005
        )
        t_ready = wait_for(lambda: nb.status().ready, 120, 0.005)
        sb = b.status()
        print(
            f"bulk: {states:,} states on A; B: API up -> first bulk states "
            f"{t_start - t_up:.2f} s, first bulk states -> ready {t_ready - t_start:.2f} s "
            f"(target <= 3 s), {states / (t_ready - t_start):,.0f} states/s; "
            f"B holds {sb.digest_states:,}, digests equal: {sb.digest == a.status().digest}"
        )
    finally:
        a.stop()
        if b is not None:
            b.stop()


def bench_lag(tmp: Path, rate: int, seconds: float) -> None:
    tick = 0.02
    per_tick = int(rate * tick)
    rounds = 2  # 7 changes per flow
    flows = int(rate * seconds) // 7 + 1
    frames = list(flow_frames(0, flows, rounds))
    requests = inject_requests(iter(frames), per_tick)
    a, b = pair(tmp)
    try:
        t0 = time.monotonic()
        late, calls = 0.0, []
        for i, req in enumerate(requests):
            due = t0 + i * tick
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            else:
                late = max(late, now - due)
            t_call = time.monotonic()
            a._inject(req, timeout=60)
            calls.append(time.monotonic() - t_call)
        t_end = time.monotonic()
        t_b = wait_for(converged(a, b, flows), 120)
        peer = a.status().peers[0]
        p50 = peer.lag_p50.ToMilliseconds() if peer.HasField("lag_p50") else None
        p99 = peer.lag_p99.ToMilliseconds() if peer.HasField("lag_p99") else None
        print(
            f"lag: {len(frames):,} changes paced at {rate:,}/s ({per_tick} per Inject every "
            f"{tick * 1000:.0f} ms) for {t_end - t0:.1f} s (achieved "
            f"{len(frames) / (t_end - t0):,.0f}/s, worst pacing delay {late * 1000:.0f} ms)"
        )
        print(
            f"  Inject calls: median {1000 * sorted(calls)[len(calls) // 2]:.1f} ms, "
            f"slowest {', '.join(f'{1000 * c:.0f}' for c in sorted(calls)[-3:])} ms\n"
            f"  A's lag to B: p50 <= {p50} ms, p99 <= {p99} ms (target p99 <= 50 ms); "
            f"B equal {1000 * (t_b - t_end):.0f} ms after the last Inject returned"
        )
    finally:
        a.stop()
        b.stop()


_REPLAYED = re.compile(r"replayed (\d+) frames from .* in ([\d.]+) s")


def _replay_rate(log: Path) -> float:
    m = _REPLAYED.search(log.read_text())
    if m is None:
        raise SystemExit(f"no replay line in {log}: {log.read_text()}")
    return int(m.group(1)) / float(m.group(2))


def bench_replay(tmp: Path, flows: int, rounds: int, repeat: int) -> None:
    pcap = tmp / "traffic.pcap"
    n = write_pcap(pcap, flow_frames(0, flows, rounds))
    alone, synced = [], []

    def run_a(*flags: str) -> tuple[float, float]:
        """A's replay rate (its log) and the CPU seconds its whole process used."""
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        a = NodeProc("A", tmp, HOST_A, "--pcap", str(pcap), "--exit-after-replay", *flags,
                     listen=False)  # fmt: skip
        a.proc.wait(600)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        a.stop()
        cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        return _replay_rate(a.log), cpu

    for _ in range(repeat):
        rate, cpu_alone = run_a()
        alone.append(rate)
        b = NodeProc("B", tmp, HOST_B)
        b.wait_up()
        rate, cpu_synced = run_a("--peer", b.sync)
        synced.append(rate)
        sb = b.status()
        got = sb.digest_states
        b.stop()
        print(
            f"replay: {n:,} frames: alone {alone[-1]:,.0f} frames/s, with B attached "
            f"{synced[-1]:,.0f} frames/s = {synced[-1] / alone[-1]:.2f}x (target >= 0.8x); "
            f"B got {got:,} of {flows:,} states; A's CPU (whole process) {cpu_alone:.1f} s "
            f"alone, {cpu_synced:.1f} s synced = {cpu_alone / cpu_synced:.2f}x"
        )
    ratios = [s / a for s, a in zip(synced, alone, strict=True)]
    print(f"  ratios over {repeat} runs: {', '.join(f'{r:.2f}' for r in ratios)}")


def bench_batch(tmp: Path, batched: int, single: int, chunk: int) -> None:
    """Each Inject of ``chunk`` new states waits for B to hold them before the next, in
    both modes: a writer that falls OUTBOX_LIMIT frames behind is cut (by design), which
    one frame per state would otherwise reach within a few Injects."""
    a, b = pair(tmp)
    try:
        total, rates = 0, {}
        for frame_states, count in ((1024, batched), (1, single), (1024, batched)):
            a.set_sysctl("net.pfsync.frame_states", str(frame_states))
            before = a.status().peers[0].frames_out
            t0, t_inject = time.monotonic(), 0.0
            for i in range(0, count, chunk):
                requests = inject_requests(_syns(total + i, min(chunk, count - i)), chunk)
                t_call = time.monotonic()
                a.inject(requests, in_flight=1)
                t_inject += time.monotonic() - t_call
                wait_for(converged(a, b, total + min(i + chunk, count)), 600, 0.002)
            t = time.monotonic() - t0
            total += count
            frames = a.status().peers[0].frames_out - before
            rate = count / t
            rates.setdefault(frame_states, []).append((rate, count / (t - t_inject)))
            print(
                f"batch: frame_states {frame_states:5}: {count:,} new states A -> B in "
                f"{t:.2f} s = {rate:,.0f} states/s ({frames:,} frames; A's Inject calls "
                f"{t_inject:.2f} s, the rest {count / (t - t_inject):,.0f} states/s)"
            )
        best = max(rates[1024])
        print(
            f"  batched / one message per state: {best[0] / rates[1][0][0]:.1f}x end to end, "
            f"{best[1] / rates[1][0][1]:.1f}x without A's Inject time (target >= 30x)"
        )
    finally:
        a.stop()
        b.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only", nargs="*", default=["rate", "bulk", "lag", "replay", "batch"],
        help="figures to run (default: all)",
    )  # fmt: skip
    ap.add_argument("--flows", type=int, default=100_000, help="rate: new flows (default 100k)")
    ap.add_argument("--rounds", type=int, default=2, help="rate: data rounds per flow")
    ap.add_argument("--bulk-states", type=int, default=1_000_000)
    ap.add_argument("--lag-rate", type=int, default=50_000, help="changes/s (default 50k)")
    ap.add_argument("--lag-seconds", type=float, default=10.0)
    ap.add_argument("--replay-flows", type=int, default=20_000)
    ap.add_argument("--replay-rounds", type=int, default=25)
    ap.add_argument("--repeat", type=int, default=2, help="replay: runs of each mode")
    ap.add_argument("--batched", type=int, default=100_000, help="batch: states, 1024/frame")
    ap.add_argument("--single", type=int, default=10_000, help="batch: states, 1/frame")
    ap.add_argument("--chunk", type=int, default=2000, help="batch: frames per Inject")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if "rate" in args.only:
            bench_rate(tmp, args.flows, args.rounds)
        if "bulk" in args.only:
            bench_bulk(tmp, args.bulk_states)
        if "lag" in args.only:
            bench_lag(tmp, args.lag_rate, args.lag_seconds)
        if "replay" in args.only:
            bench_replay(tmp, args.replay_flows, args.replay_rounds, args.repeat)
        if "batch" in args.only:
            bench_batch(tmp, args.batched, args.single, args.chunk)


if __name__ == "__main__":
    main()
