"""A node: one state table and the packet sources that feed it.

This is the thin I/O shell around :mod:`statetable`: it owns the clock, decodes frames,
counts what the decoder rejects, runs the purge timer and the packet sources (pcap
replay, live AF_PACKET capture). The gRPC servicers read and steer it.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pfsync.netstat_nodes import PoolPeaks, add_interface_node, add_netstat_nodes
from pfsync.pcap import CaptureError, read_capture
from pfsync.sysctl import add_bpf_nodes, build_tree
from pfsync.taps import INJECT_IF, TAP_BATCH, Batch, Tap, TapHub
from statetable import PASS, StateTable, TableConfig, decode_frame
from statetable.decode import NOT_IP, Packet
from statetable.mslt import Network

if TYPE_CHECKING:
    from pfsync.sync.peer import SyncDriver

log = logging.getLogger("pfsyncd")

# Frames handled between two yields to the event loop (replay at full speed, live capture
# bursts): large enough that the loop's overhead vanishes, small enough that API calls
# wait only milliseconds.
REPLAY_BATCH = 4096
PURGE_PERIOD = 1.0
# The status details of a long-lived API stream (taps, watchers) the node ends as it stops.
SHUTTING_DOWN = "the node is shutting down"
# Node.feed's verdict for a frame too broken to track (counted short/bad-offset/fragment).
MALFORMED = 2
# The cyclic garbage collector's thresholds for a node process (CPython's are 700, 10, 10).
# A node allocates a few objects per packet and keeps its states, which hold no cycles, for
# minutes to days: at 700 it runs a young collection every ~100 new states and keeps
# re-traversing the table as the states age through the generations. At these figures a
# new UDP state costs ~6,400 instructions less (callgrind, 200,000 states: 23.09G -> 21.82G
# for the whole run); garbage cycles (asyncio, gRPC) wait at most 50,000 allocations.
GC_THRESHOLDS = (50_000, 20, 100)
# glibc malloc for a node process: blocks up to MMAP_THRESHOLD come from the heap, and up
# to TRIM_THRESHOLD of free memory at its top stays there. With glibc's defaults (128 KiB,
# adjusted as blocks come and go) a serialized message of a few hundred KiB (a tap's
# FrameColumns, a listing page, a sync batch) was often a fresh mmap or a fresh top of the
# heap, its every page faulted in and given back after the send: serializing 200 KiB took
# 297 us instead of 13 (BENCHMARKS.md, taps).
MALLOC_MMAP_THRESHOLD = 4 << 20
MALLOC_TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameters


def tune_process() -> None:
    """Tune a node process's memory management: the garbage collector's thresholds
    (`GC_THRESHOLDS`) and, with glibc, malloc's (`MALLOC_MMAP_THRESHOLD`)."""
    gc.set_threshold(*GC_THRESHOLDS)
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc only
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)


def wire_text(text: str) -> str:
    """``text`` with the undecodable bytes of a file name (surrogate escapes) as ``\\xNN``.

    Protobuf strings must be UTF-8: one such name would make every GetInfo fail.
    """
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class PacketSource:
    """Progress of one capture file or interface (shown by GetInfo)."""

    kind: str
    name: str
    frames: int = 0
    # netstat -i figures (net.interfaces.<ifname>): bytes read, frames too broken to
    # track (ierrors) and frames pf blocked (drops).
    bytes: int = 0
    errors: int = 0
    blocked: int = 0
    # Live capture: frames the kernel dropped because the capture ring was full (GetInfo's
    # PacketSource.drops; also counted in the interface's drops).
    kernel_drops: int = 0
    done: bool = False
    error: str = ""
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    # Its interface name (a capture's own, pcapN for the Nth replay) and the taps on it.
    ifname: str = ""
    taps: list[Tap] = field(default_factory=list, repr=False)


class Node:
    """A state table, its clock, and the sources that feed it."""

    def __init__(
        self,
        hostid: int,
        limit_states: int = 100000,
        local_nets: Sequence[Network] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.started = clock()
        self.hostid = hostid
        # pf numbers states from (boot time << 32) so ids stay unique across restarts.
        self.table = StateTable(
            TableConfig(
                hostid=hostid,
                id_base=int(time.time()) << 32,
                limit_states=limit_states,
                local_nets=list(local_nets),
            )
        )
        # Taps (pfdump) on every packet source; Inject's frames come in on "inject".
        self.taps = TapHub(clock)
        self.inject_taps = self.taps.interface(INJECT_IF)
        self.sysctl = build_tree(self)
        add_bpf_nodes(self.sysctl, self.taps)
        self.non_ip = 0
        self.sources: list[PacketSource] = []
        # Frames of the Inject API, counted as an interface for netstat -i.
        self.inject_source = PacketSource("inject", "inject")
        self.pool_peaks = PoolPeaks()
        add_netstat_nodes(self)
        # Readers of the table's changes (the pfsync driver, watch streams): each gets
        # every change list the node takes from the table (statetable.events).
        self._consumers: list[Callable[[list[object], float], None]] = []
        # The pfsync driver when the node syncs (pfsync.sync.peer.SyncDriver).
        self.sync: SyncDriver | None = None

    def add_consumer(self, consumer: Callable[[list[object], float], None]) -> None:
        """Hand every later change of the table to ``consumer(changes, now)``."""
        if not self._consumers:
            self.table.record_changes()
        self._consumers.append(consumer)

    def remove_consumer(self, consumer: Callable[[list[object], float], None]) -> None:
        """Stop handing changes to ``consumer``."""
        self._consumers.remove(consumer)
        if not self._consumers:
            self.table.record_changes(False)

    def publish_changes(self) -> None:
        """Take the table's recorded changes and give them to every consumer."""
        if not self._consumers:
            return
        changes = self.table.take_changes()
        if changes:
            now = self.clock()
            for consumer in self._consumers:
                consumer(changes, now)

    def feed(self, frame: bytes, linktype: int, now: float) -> int:
        """Decode and test one frame: PASS, BLOCK or MALFORMED (see :meth:`feed_decoded`)."""
        return self.feed_decoded(decode_frame(frame, linktype), now)

    def feed_decoded(self, pkt: Packet | int, now: float) -> int:
        """Test one frame as ``decode_frame`` returned it: PASS, BLOCK or MALFORMED.

        Frames that are not IP pass (pf never sees them) and are counted as ``non-ip``.
        The sources decode frames themselves, so their taps filter on the same packet.
        """
        if type(pkt) is tuple:
            return self.table.test(pkt, now)
        if pkt == NOT_IP:
            self.non_ip += 1
            return PASS
        self.table.block_malformed(cast(int, pkt))  # short, bad-offset or fragment
        return MALFORMED

    async def settle(self) -> None:
        """After an API call changed the table: hand its changes out now and, with pfsync
        deferral on, wait until peers acknowledged the new states (at most 20 ms)."""
        self.publish_changes()
        if self.sync is not None:
            await self.sync.release_deferred()

    def count_frame(self, source: PacketSource, frame: bytes, verdict: int) -> None:
        """Count one frame of ``source`` for its interface figures."""
        source.frames += 1
        source.bytes += len(frame)
        if verdict:
            if verdict == MALFORMED:
                source.errors += 1
            else:
                source.blocked += 1

    def decoder_counters(self) -> list[tuple[str, int]]:
        """Frames the decoder kept from the table, by reason."""
        return [("non-ip", self.non_ip)]

    def clear_counters(self) -> None:
        """pfctl -F info."""
        self.table.clear_counters()
        self.non_ip = 0

    # ---- background work ---------------------------------------------------------------

    async def purge_forever(self) -> None:
        """Expire states once a second with bounded work (pf's purge thread)."""
        while True:
            await asyncio.sleep(PURGE_PERIOD)
            self.table.purge(self.clock())
            self.publish_changes()
            self.pool_peaks.sample()

    def start_replay(self, path: Path, speed: float) -> PacketSource:
        """Replay a capture file into the table in the background."""
        ifname = f"pcap{sum(s.kind == 'pcap' for s in self.sources)}"
        source = PacketSource("pcap", wire_text(str(path)), ifname=ifname)
        source.taps = self.taps.interface(ifname)
        source.task = asyncio.get_running_loop().create_task(self._replay(source, path, speed))
        self.sources.append(source)
        add_interface_node(self, source)
        return source

    async def _replay(self, source: PacketSource, path: Path, speed: float) -> None:
        feed, clock, count, taps = self.feed_decoded, self.clock, self.count_frame, source.taps
        decode = decode_frame
        # Frames for the taps, handed over every TAP_BATCH and before each await (pfsync.taps).
        tapped = Batch()
        add_time, add_record, add_pkt = (
            tapped.times.append,
            tapped.records.append,
            tapped.pkts.append,
        )
        left = TAP_BATCH  # frames until the batch goes to the taps
        start = clock()
        first_ts: float | None = None
        try:
            for record in read_capture(path):
                ts, linktype, frame = record
                if speed > 0:
                    if first_ts is None:
                        first_ts = ts
                    delay = start + (ts - first_ts) / speed - clock()
                    if delay > 0:
                        tapped.hand_over(taps)
                        await asyncio.sleep(delay)
                # Also at speed > 0: a replay behind its schedule still lets the API (and
                # the taps' readers) in between batches.
                if source.frames % REPLAY_BATCH == 0:
                    tapped.hand_over(taps)
                    await asyncio.sleep(0)
                now = clock()
                pkt = decode(frame, linktype)
                count(source, frame, feed(pkt, now))
                if taps:  # an empty list while nobody taps: the only cost then
                    add_time(now)  # Batch.add, inlined
                    add_record(record)
                    add_pkt(pkt)
                    left -= 1
                    if not left:
                        tapped.hand_over(taps)
                        left = TAP_BATCH
        except CaptureError as exc:
            source.error = wire_text(str(exc))
            log.error("%s", exc)
        finally:
            tapped.hand_over(taps)
            source.done = True
        elapsed = clock() - start
        log.info("replayed %d frames from %s in %.2f s", source.frames, path, elapsed)

    def start_capture(self, ifname: str) -> PacketSource:
        """Track live traffic of an interface (Linux AF_PACKET ring; needs root).

        A bad name or missing rights raise a one-line `InterfaceError`. Later trouble never
        stops the node: an interface that goes down is logged (capture resumes when it is up
        again); one that disappears ends this source with its error, logged in one line.
        """
        from pfsync.afpacket import InterfaceGone, PacketCapture

        cap = PacketCapture.open(ifname)
        source = PacketSource("capture", ifname, ifname=ifname)
        taps = source.taps = self.taps.interface(ifname)
        loop = asyncio.get_running_loop()
        feed, clock, count, decode = self.feed_decoded, self.clock, self.count_frame, decode_frame
        tapped = Batch()  # this wake-up's frames for the taps
        add_time, add_record, add_pkt = (
            tapped.times.append,
            tapped.records.append,
            tapped.pkts.append,
        )

        def readable() -> None:
            try:
                # At most about one batch per wake-up, so a flood cannot starve the API.
                frames = cap.read_batch(REPLAY_BATCH)
            except InterfaceGone as exc:
                loop.remove_reader(cap.fileno())
                source.kernel_drops = cap.stats().dropped
                cap.close()
                source.error, source.done = str(exc), True
                log.error("%s; the node keeps running without it", exc)
                return
            left = TAP_BATCH  # frames until the batch goes to the taps
            for record in frames:
                _ts, linktype, frame = record
                now = clock()
                pkt = decode(frame, linktype)
                count(source, frame, feed(pkt, now))
                if taps:  # an empty list while nobody taps: the only cost then
                    add_time(now)  # Batch.add, inlined
                    add_record(record)
                    add_pkt(pkt)
                    left -= 1
                    if not left:
                        tapped.hand_over(taps)
                        left = TAP_BATCH
            if tapped.records:
                tapped.hand_over(taps)
            source.kernel_drops = cap.stats().dropped
            if cap.link_went_down():
                log.warning("capture on %s: interface went down; waiting for it", ifname)

        loop.add_reader(cap.fileno(), readable)
        self.sources.append(source)
        add_interface_node(self, source)
        return source
