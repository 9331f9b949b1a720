"""The sysctl nodes pfnetstat reads: protocol statistics, interfaces and memory by owner.

NetBSD's netstat reads every figure through sysctl; so does ``pfnetstat`` here, through
the node's Sysctl API. Every value is read from counters the table, the packet sources and
the pfsync engine keep anyway, at the time of the read: nothing here runs per packet.

- ``net.inet.tcp.stats``, ``net.inet.udp.stats``, ``net.inet.icmp.stats``: per-protocol
  counters (statetable.counters.ProtoStats) and current state counts;
- ``net.pf.stats``: the table's totals (passed, blocked, searches, inserts, removals);
- ``net.pf.api.denied``: admin calls refused (pfsync.admin.REFUSALS);
- ``net.interfaces.<if>``: one struct per packet source (``ipackets``, ``ierrors``,
  ``opackets``, ``oerrors``, ``drops``, ``ibytes``, ``obytes``, ``mtu``): each capture
  interface by its name, each pcap replay as ``pcapN``, ``inject`` for the Inject API and
  ``pfsync0`` for sync frames; its description says what it is;
- ``kern.pool.<owner>``: memory by owner (``inuse``, ``bytes``, ``peak``, ``limit``): the
  state table, each VTW pool, the replay log, pending sync frames. ``peak`` is the
  highest ``inuse`` seen by a read or by the node's once-a-second sample
  (:meth:`PoolPeaks.sample`), so a burst shorter than a second may be missed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pfsync.admin import REFUSALS
from pfsync.sysctl import Kind, SysctlNode, SysctlTree
from statetable.decode import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from statetable.mslt import CLASS_NAMES

if TYPE_CHECKING:
    from pfsync.node import Node, PacketSource
    from pfsync.sync.engine import SyncEngine

Fields = list[tuple[str, int]]

# Bytes one live state costs, measured by bench/bench_memory.py at 1,000,000 TCP states
# (BENCHMARKS.md): the state objects are Python objects, so this is an estimate.
STATE_BYTES = 581
# Rough size of one pending pfsync change (a dict slot and its counter) and of one kept
# frame's message (a frame carries up to a few hundred states, ~100 bytes each).
PENDING_BYTES = 100
# The link MTU the tools show for sources that have none (pcap, inject, pfsync0).
NO_MTU = 0

INTERFACE_FIELDS = ("ipackets", "ierrors", "opackets", "oerrors", "drops", "ibytes", "obytes")


class PoolPeaks:
    """High-water marks of ``inuse`` per ``kern.pool`` owner."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self.owners: dict[str, Callable[[], tuple[int, int, int]]] = {}

    def add(self, name: str, read: Callable[[], tuple[int, int, int]]) -> None:
        """Register an owner: ``read() -> (inuse, bytes, limit)``."""
        self.owners[name] = read

    def fields(self, name: str) -> Fields:
        """The struct fields of one owner, updating its peak."""
        inuse, nbytes, limit = self.owners[name]()
        peak = self.peaks[name] = max(self.peaks.get(name, 0), inuse)
        return [("inuse", inuse), ("bytes", nbytes), ("peak", peak), ("limit", limit)]

    def sample(self) -> None:
        """Read every owner once (the node calls this every second)."""
        for name in self.owners:
            self.fields(name)


def _struct(tree: SysctlTree, name: str, description: str, read: Callable[[], Fields]) -> None:
    tree.add(SysctlNode(name, Kind.STRUCT, description, read))


def add_netstat_nodes(node: Node) -> None:
    """The table's statistics, the ``inject`` interface and the table's memory pools."""
    tree, table = node.sysctl, node.table
    stats = table.stats

    def tcp_stats() -> Fields:
        return [
            *stats.items("tcp"),
            ("states", table.proto_count(IPPROTO_TCP)),
            ("half_open", table.half_open),
            ("vestigial", sum(pool.live for pool in table.vtw.pools.values())),
        ]

    def count(*protos: int) -> int:
        return sum(table.proto_count(p) for p in protos)

    _struct(
        tree,
        "net.inet.tcp.stats",
        "TCP connections tracked: requests, accepts, established, closed, reset, drops",
        tcp_stats,
    )
    _struct(
        tree,
        "net.inet.udp.stats",
        "UDP states created and current",
        lambda: [*stats.items("udp"), ("current", count(IPPROTO_UDP))],
    )
    _struct(
        tree,
        "net.inet.icmp.stats",
        "ICMP/ICMPv6 query states, errors passed and blocked",
        lambda: [*stats.items("icmp"), ("current", count(IPPROTO_ICMP, IPPROTO_ICMPV6))],
    )

    def pf_stats() -> Fields:
        searches, inserts, removals = table.fcounters
        return [
            ("passed", table.passed),
            ("blocked", table.blocked),
            ("states", table.count),
            ("searches", searches),
            ("inserts", inserts),
            ("removals", removals),
            ("other_states", stats.other_states),
            ("non_ip", node.non_ip),
        ]

    _struct(tree, "net.pf.stats", "pf totals: packets passed/blocked, state operations", pf_stats)
    tree.add(
        SysctlNode(
            "net.pf.api.denied",
            Kind.INT,
            "admin calls refused (PERMISSION_DENIED or UNAUTHENTICATED) since start",
            lambda: REFUSALS.admin,
        )
    )
    add_interface_node(node, node.inject_source)

    peaks = node.pool_peaks
    peaks.add("states", lambda: (table.count, table.count * STATE_BYTES, table.limit_states))
    _struct(tree, "kern.pool.states", "the state table", lambda: peaks.fields("states"))
    vtw = table.vtw
    for af in (4, 6):
        for cls, cname in enumerate(CLASS_NAMES):
            owner = f"vtw.ipv{af}.{cname}"

            def read(af: int = af, cls: int = cls) -> tuple[int, int, int]:
                pool = vtw.pools.get((af, cls))
                if pool is None:
                    return 0, 0, vtw.entries
                return pool.live, pool.nbytes, pool.limit

            peaks.add(owner, read)
            _struct(
                tree,
                f"kern.pool.{owner}",
                f"VTW pool of IPv{af} TIME_WAIT records, MSLT class {cname}",
                lambda owner=owner: peaks.fields(owner),  # type: ignore[misc]
            )


def interface_name(node: Node, source: PacketSource) -> str:
    """``net.interfaces`` name of a source: a capture's interface, ``pcapN``, ``inject``."""
    if source.kind == "pcap":
        return f"pcap{[s for s in node.sources if s.kind == 'pcap'].index(source)}"
    return source.name


def add_interface_node(node: Node, source: PacketSource) -> None:
    """``net.interfaces.<if>`` for one packet source (call when it starts)."""
    what = {
        "pcap": f"pcap replay of {source.name}",
        "capture": f"live capture on {source.name}",
        "inject": "frames sent with the Inject API",
    }.get(source.kind, source.name)

    def fields() -> Fields:
        return [
            ("ipackets", source.frames),
            ("ierrors", source.errors),
            ("opackets", 0),
            ("oerrors", 0),
            # pf's blocked frames, and a live capture's frames the kernel dropped for lack
            # of room in the ring (issue 11): both are frames this interface lost.
            ("drops", source.blocked + source.kernel_drops),
            ("ibytes", source.bytes),
            ("obytes", 0),
            ("mtu", NO_MTU),
        ]

    source.ifname = interface_name(node, source)
    _struct(node.sysctl, f"net.interfaces.{source.ifname}", what, fields)


# pfsync's input discards (netstat -s -p pfsync's indented lines) and output failures.
_SYNC_IN_ERRORS = ("badif", "badttl", "hdrops", "badver", "badauth", "badact", "badlen")
_SYNC_OUT_ERRORS = ("onomem", "oerrors")


def add_sync_netstat_nodes(node: Node, engine: SyncEngine) -> None:
    """``net.interfaces.pfsync0`` and the pfsync memory owners, for a node that syncs."""
    tree, counters = node.sysctl, engine.stats.counters

    def pfsync0() -> Fields:
        links = list(engine.peers.values())
        return [
            ("ipackets", sum(link.frames_in for link in links)),
            ("ierrors", sum(counters[n] for n in _SYNC_IN_ERRORS)),
            ("opackets", sum(link.frames_out for link in links)),
            ("oerrors", sum(counters[n] for n in _SYNC_OUT_ERRORS)),
            ("drops", counters["badval"] + counters["badstate"]),
            ("ibytes", sum(link.bytes_in for link in links)),
            ("obytes", sum(link.bytes_out for link in links)),
            ("mtu", NO_MTU),
        ]

    _struct(tree, "net.interfaces.pfsync0", "pfsync frames exchanged with peers", pfsync0)
    peaks = node.pool_peaks

    def replay_log() -> tuple[int, int, int]:
        frames = engine.log.frames()
        return len(frames), sum(f.ByteSize() for f in frames), engine.log.capacity

    def pending() -> tuple[int, int, int]:
        changes = engine.pending_changes()
        queued = sum(len(link.outbox) for link in engine.peers.values())
        return changes + queued, changes * PENDING_BYTES, 0

    peaks.add("replay_log", replay_log)
    peaks.add("sync_pending", pending)
    _struct(
        tree,
        "kern.pool.replay_log",
        "pfsync frames kept for peers that reconnect",
        lambda: peaks.fields("replay_log"),
    )
    _struct(
        tree,
        "kern.pool.sync_pending",
        "pfsync changes waiting for their frame, and frames queued for peers",
        lambda: peaks.fields("sync_pending"),
    )
